//! SPIFFE federation: the bundles of the foreign trust domains this one
//! federates with (`[[federation.trust_domains]]`).
//!
//! Each bundle is fetched from its trust domain's bundle endpoint, checked
//! ([`ForeignBundle::parse`]: a document can only describe the trust domain
//! it was fetched for) and kept in the datastore, where it only moves
//! forward by `spiffe_sequence` and survives a failed fetch. Replicas share
//! it: one replica at a time fetches a trust domain (a lease per trust
//! domain), every replica reloads the set when the store's federation
//! sequence moves ([`crate::rotation::refresh`]) and pushes it to the
//! agents whose registrations federate with it. Every change and refusal
//! is an audit record; the refresher audits a failure when its cause
//! changes and when the bundle becomes stale, not at every attempt, and
//! backs off on consecutive failures (see [`next_delay`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use herald_ca::bundle::{BundleError, ForeignBundle, MAX_FOREIGN_BUNDLE_BYTES};
use herald_core::{AuditEvent, ErrorCode, Outcome, TrustDomain};
use herald_store::{BundleUpdate, FederatedBundleRecord, NewFederatedBundle, Store, StoreError};
use tokio::sync::watch;

use crate::config::{BundleEndpointProfile, FederatedTrustDomain, FederationConfig};
use crate::{Shared, wait_shutdown};

/// The audit action of a stored bundle change.
pub const ACTION_UPDATE: &str = "federation.bundle_update";
/// The audit action of a refused document.
pub const ACTION_REFUSED: &str = "federation.bundle_refused";
/// The audit action of a failed fetch.
pub const ACTION_UNREACHABLE: &str = "federation.fetch_failed";
/// The audit action of a bundle removed by an operator.
pub const ACTION_DELETE: &str = "federation.bundle_delete";
/// The audit action of a bundle that became stale: its endpoint has
/// failed for longer than [`stale_after`] since it was last confirmed.
pub const ACTION_STALE: &str = "federation.bundle_stale";

/// How long a bundle fetched from an endpoint may go unconfirmed before
/// it is stale (`herald federation status`, the `federation.bundle_stale`
/// audit record): three refresh intervals at their longest.
pub fn stale_after(cfg: &FederationConfig) -> Duration {
    cfg.max_refresh.saturating_mul(3)
}

/// The federated bundles in effect on this replica.
#[derive(Debug, Default)]
pub struct FederationState {
    /// The store's federation sequence they were loaded at.
    pub sequence: u64,
    /// By trust domain: the stored record and its parsed bundle.
    pub bundles: BTreeMap<TrustDomain, (FederatedBundleRecord, ForeignBundle)>,
}

impl FederationState {
    /// Reads every stored bundle. A stored document that no longer parses
    /// (it was checked when stored) is left out and logged.
    pub async fn load(store: &Store, sequence: u64) -> Result<FederationState, StoreError> {
        let mut bundles = BTreeMap::new();
        for r in store.federated_bundles().await? {
            let parsed = TrustDomain::new(&r.trust_domain)
                .map_err(|e| e.to_string())
                .and_then(|td| {
                    ForeignBundle::parse(&td, r.jwks.as_bytes())
                        .map(|b| (td, b))
                        .map_err(|e| e.to_string())
                });
            match parsed {
                Ok((td, b)) => {
                    bundles.insert(td, (r, b));
                }
                Err(e) => {
                    tracing::error!(trust_domain = %r.trust_domain, error = %e, "stored federated bundle unusable");
                }
            }
        }
        Ok(FederationState { sequence, bundles })
    }

    /// The bundle of `td`, if one is held.
    pub fn bundle(&self, td: &TrustDomain) -> Option<&ForeignBundle> {
        self.bundles.get(td).map(|(_, b)| b)
    }
}

/// The bundles held for `wanted` as API messages, in trust-domain order;
/// a trust domain with no bundle held is left out (its workloads cannot
/// authenticate it until one is fetched or set).
pub fn bundle_messages<'a>(
    shared: &Shared,
    wanted: impl IntoIterator<Item = &'a TrustDomain>,
) -> Vec<herald_proto::v1::TrustBundle> {
    let held = shared.federation();
    let mut wanted: Vec<&TrustDomain> = wanted.into_iter().collect();
    wanted.sort();
    wanted.dedup();
    wanted
        .into_iter()
        .filter_map(|td| {
            let b = held.bundle(td)?;
            Some(herald_proto::v1::TrustBundle {
                trust_domain: td.to_string(),
                x509_authorities: b.x509_authorities.clone(),
                jwks: b.to_jwks().to_string(),
                sequence: b.sequence.unwrap_or_default(),
            })
        })
        .collect()
}

/// Why a fetch produced no bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchFailure {
    /// The endpoint could not be read (connection, TLS, HTTP status,
    /// timeout).
    #[error("{0}")]
    Unreachable(String),
    /// The endpoint's certificate was refused: under `https_spiffe` its
    /// SVID does not chain to the trust domain's bundle or names another
    /// SPIFFE ID than `endpoint_spiffe_id`. Not the partner, so refused,
    /// not merely unreachable.
    #[error("{0}")]
    Unauthenticated(String),
    /// The endpoint answered with a document that was refused.
    #[error("{0}")]
    Refused(String),
}

impl FetchFailure {
    /// The stable code it is audited with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FetchFailure::Unreachable(_) => ErrorCode::FederationEndpointUnreachable,
            FetchFailure::Unauthenticated(_) => ErrorCode::FederationEndpointUnauthenticated,
            FetchFailure::Refused(_) => ErrorCode::FederationBundleRefused,
        }
    }

    /// The audit action it is recorded under: refused (the endpoint or
    /// its document was not acceptable) or failed (not reached).
    pub fn action(&self) -> &'static str {
        match self {
            FetchFailure::Unreachable(_) => ACTION_UNREACHABLE,
            FetchFailure::Unauthenticated(_) | FetchFailure::Refused(_) => ACTION_REFUSED,
        }
    }
}

/// What one refresh of a trust domain did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshOutcome {
    /// A new bundle was stored.
    Updated {
        /// Its `spiffe_sequence`.
        sequence: Option<u64>,
    },
    /// The endpoint served the bundle already held.
    Unchanged,
    /// Nothing was stored; the last good bundle stays.
    Failed(FetchFailure),
}

impl RefreshOutcome {
    /// A short label (metrics, CLI).
    pub fn label(&self) -> &'static str {
        match self {
            RefreshOutcome::Updated { .. } => "updated",
            RefreshOutcome::Unchanged => "unchanged",
            RefreshOutcome::Failed(FetchFailure::Unreachable(_)) => "unreachable",
            RefreshOutcome::Failed(FetchFailure::Refused(_)) => "refused",
            RefreshOutcome::Failed(FetchFailure::Unauthenticated(_)) => "unauthenticated",
        }
    }
}

/// Reads a bundle file given in configuration or to `herald federation
/// set`: a SPIFFE bundle document, or PEM CA certificates (which become a
/// bundle of X.509 authorities without a sequence).
pub fn parse_bundle_file(td: &TrustDomain, bytes: &[u8]) -> Result<ForeignBundle, BundleError> {
    let text = std::str::from_utf8(bytes).unwrap_or_default();
    if text.trim_start().starts_with("-----BEGIN") {
        let certs: Vec<Vec<u8>> = pem::parse_many(bytes)
            .map_err(|e| BundleError::Malformed(format!("PEM: {e}")))?
            .into_iter()
            .filter(|p| p.tag() == "CERTIFICATE")
            .map(pem::Pem::into_contents)
            .collect();
        let doc = serde_json::json!({
            "keys": certs.iter().map(|der| serde_json::json!({
                "use": "x509-svid",
                "x5c": [base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der)],
            })).collect::<Vec<_>>(),
        });
        return ForeignBundle::parse(td, doc.to_string().as_bytes());
    }
    ForeignBundle::parse(td, bytes)
}

/// Fetches `td`'s bundle document from its endpoint and checks it.
/// `known` is the bundle held for it (stored, else bootstrap): under
/// `https_spiffe` the endpoint's SVID must chain to it.
pub async fn fetch(
    cfg: &FederationConfig,
    td: &FederatedTrustDomain,
    known: Option<&ForeignBundle>,
) -> Result<ForeignBundle, FetchFailure> {
    let unreachable = |m: String| FetchFailure::Unreachable(m);
    let Some(url) = td.url.as_deref() else {
        return Err(unreachable(
            "no endpoint url is configured (set the bundle by hand)".into(),
        ));
    };
    let mut builder = reqwest::Client::builder()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .https_only(true);
    match td.profile {
        BundleEndpointProfile::HttpsWeb => {
            if let Some(path) = &td.ca_file {
                let pem = std::fs::read(path)
                    .map_err(|e| unreachable(format!("ca_file {}: {e}", path.display())))?;
                let roots = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| unreachable(format!("ca_file {}: {e}", path.display())))?;
                builder = builder.tls_certs_only(roots);
            }
        }
        BundleEndpointProfile::HttpsSpiffe => {
            let expected = td
                .endpoint_spiffe_id
                .clone()
                .ok_or_else(|| unreachable("no endpoint_spiffe_id".into()))?;
            let roots = known
                .map(|b| b.x509_authorities.clone())
                .filter(|r| !r.is_empty())
                .ok_or_else(|| {
                    unreachable(format!(
                        "no bundle of {} to authenticate its endpoint with (configure bootstrap_bundle)",
                        td.trust_domain
                    ))
                })?;
            let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
            let mut anchors = rustls::RootCertStore::empty();
            for der in roots {
                anchors
                    .add(rustls::pki_types::CertificateDer::from(der))
                    .map_err(|e| unreachable(format!("{}'s bundle: {e}", td.trust_domain)))?;
            }
            // SPIFFE authentication: chain to the trust domain's bundle and
            // the endpoint's SPIFFE ID; bundle endpoint SVIDs (SPIRE's among
            // them) carry no host names to check.
            let verifier = herald_client::server_id::PinnedServerVerifier::spiffe_id_only(
                anchors,
                provider.clone(),
                expected,
            )
            .map_err(|e| unreachable(e.to_string()))?;
            let tls = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| unreachable(format!("TLS: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(verifier))
                .with_no_client_auth();
            builder = builder.tls_backend_preconfigured(tls);
        }
    }
    let client = builder
        .build()
        .map_err(|e| unreachable(herald_attest::http_fetch::describe(&e)))?;
    use herald_attest::http_fetch::{FetchError, get_capped};
    let body = match get_capped(&client, url, "application/json", MAX_FOREIGN_BUNDLE_BYTES).await {
        Ok(b) => b,
        Err(e @ FetchError::TooLarge(_)) => {
            return Err(FetchFailure::Refused(format!("GET {url}: {e}")));
        }
        Err(e @ FetchError::Certificate(_)) => {
            return Err(FetchFailure::Unauthenticated(format!("GET {url}: {e}")));
        }
        Err(e) => return Err(unreachable(format!("GET {url}: {e}"))),
    };
    ForeignBundle::parse(&td.trust_domain, &body)
        .map_err(|e| FetchFailure::Refused(format!("GET {url}: {e}")))
}

/// The bundle held for `td` in the store, or else its bootstrap bundle;
/// an unreadable or malformed bootstrap bundle is a refusal (audited like
/// any other), not only a log line.
fn known_bundle(
    td: &FederatedTrustDomain,
    stored: Option<&FederatedBundleRecord>,
) -> Result<Option<ForeignBundle>, FetchFailure> {
    if let Some(b) =
        stored.and_then(|r| ForeignBundle::parse(&td.trust_domain, r.jwks.as_bytes()).ok())
    {
        return Ok(Some(b));
    }
    let Some(path) = td.bootstrap_bundle.as_ref() else {
        return Ok(None);
    };
    std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| parse_bundle_file(&td.trust_domain, &bytes).map_err(|e| e.to_string()))
        .map(Some)
        .map_err(|e| FetchFailure::Refused(format!("bootstrap_bundle {}: {e}", path.display())))
}

fn event(action: &str, caller: &str, td: &TrustDomain) -> AuditEvent {
    let mut e = AuditEvent::new(action, caller);
    e.spiffe_id = Some(td.id().to_string());
    e
}

/// Stores `bundle` for its trust domain with its audit record, unless it
/// is not newer than the one held: then it is refused, and the caller
/// records the failure ([`record_failure`], or [`refresh`]'s own).
pub async fn store_bundle(
    store: &Store,
    bundle: &ForeignBundle,
    source: &str,
    caller: &str,
) -> Result<RefreshOutcome, StoreError> {
    let td = &bundle.trust_domain;
    let mut audit = event(ACTION_UPDATE, caller, td);
    audit.detail = Some(format!(
        "{source}: spiffe_sequence {}, {} X.509 and {} JWT authorities",
        bundle.sequence.map_or("none".into(), |s| s.to_string()),
        bundle.x509_authorities.len(),
        bundle.jwt_authorities.len()
    ));
    let new = NewFederatedBundle {
        trust_domain: td.to_string(),
        jwks: bundle.to_jwks().to_string(),
        sequence: bundle.sequence,
        refresh_hint_secs: bundle.refresh_hint_secs,
        source: source.to_owned(),
        now_ms: herald_core::audit::now_ms(),
    };
    match store.put_federated_bundle(&new, audit).await? {
        BundleUpdate::Stored => Ok(RefreshOutcome::Updated {
            sequence: bundle.sequence,
        }),
        BundleUpdate::Unchanged => Ok(RefreshOutcome::Unchanged),
        BundleUpdate::NotNewer { stored, offered } => {
            let failure = FetchFailure::Refused(format!(
                "spiffe_sequence {} does not move past the stored {stored}",
                offered.map_or("(none)".into(), |s| s.to_string())
            ));
            Ok(RefreshOutcome::Failed(failure))
        }
    }
}

/// The audit record of `failure` under `action`.
fn failure_event(
    action: &str,
    caller: &str,
    td: &TrustDomain,
    failure: &FetchFailure,
) -> AuditEvent {
    let mut audit = event(action, caller, td);
    audit.outcome = match failure {
        FetchFailure::Unreachable(_) => Outcome::Error,
        FetchFailure::Unauthenticated(_) | FetchFailure::Refused(_) => Outcome::Denied,
    };
    audit.reason = Some(failure.code());
    audit.detail = Some(failure.to_string());
    audit
}

/// Records `failure` for `td` (its last error) with its audit record: an
/// operator's command (`herald federation set` of a malformed file,
/// `refresh`) is audited every time.
pub async fn record_failure(
    store: &Store,
    td: &TrustDomain,
    failure: &FetchFailure,
    caller: &str,
) -> Result<(), StoreError> {
    let audit = failure_event(failure.action(), caller, td, failure);
    store
        .record_federation_failure(
            td.as_str(),
            &failure.to_string(),
            herald_core::audit::now_ms(),
            Some(audit),
        )
        .await
}

/// Which audit record, if any, the refresher writes for `failure`: one
/// when its cause differs from the last error recorded (in the store, or
/// remembered by this replica when no bundle is stored), and one when the
/// bundle crosses into staleness; nothing for the same failure again, so
/// a dead partner costs a few records, not one per attempt.
fn failure_audit(
    cfg: &FederationConfig,
    failure: &FetchFailure,
    stored: Option<&FederatedBundleRecord>,
    remembered: Option<&str>,
    now_ms: i64,
) -> Option<&'static str> {
    let cause = failure.to_string();
    let previous = stored.and_then(|r| r.last_error.as_deref()).or(remembered);
    if let Some(r) = stored {
        let stale_at = r
            .checked_at_ms
            .saturating_add(i64::try_from(stale_after(cfg).as_millis()).unwrap_or(i64::MAX));
        let was_stale = r.last_error_at_ms.is_some_and(|t| t >= stale_at);
        if now_ms >= stale_at && !was_stale {
            return Some(ACTION_STALE);
        }
    }
    (previous != Some(cause.as_str())).then(|| failure.action())
}

/// How failures are audited by [`refresh`].
#[derive(Debug, Clone, Copy)]
pub enum FailureAudit<'a> {
    /// Every failure (an operator's `herald federation refresh`).
    Always,
    /// The refresher's: once per cause and when the bundle becomes stale
    /// (see [`failure_audit`]); the argument is the last failure this
    /// replica saw for the trust domain, for when none is stored.
    OncePerCause(Option<&'a str>),
}

/// Fetches `td`'s bundle once and stores the result: a newer bundle, or
/// the failure (recorded as the last error and audited as `audit` says;
/// the last good bundle stays). Also returns the `spiffe_refresh_hint` of
/// the bundle now held, for scheduling the next fetch.
pub async fn refresh(
    store: &Store,
    cfg: &FederationConfig,
    td: &FederatedTrustDomain,
    caller: &str,
    audit: FailureAudit<'_>,
) -> Result<(RefreshOutcome, Option<u64>), StoreError> {
    let stored = store.federated_bundle(td.trust_domain.as_str()).await?;
    let held_hint = stored.as_ref().and_then(|r| r.refresh_hint_secs);
    let fetched = match known_bundle(td, stored.as_ref()) {
        Ok(known) => fetch(cfg, td, known.as_ref()).await,
        Err(f) => Err(f),
    };
    let failure = match fetched {
        Ok(bundle) => match store_bundle(store, &bundle, "endpoint", caller).await? {
            RefreshOutcome::Failed(f) => f,
            outcome => {
                let hint = match outcome {
                    RefreshOutcome::Updated { .. } => bundle.refresh_hint_secs,
                    _ => held_hint,
                };
                return Ok((outcome, hint));
            }
        },
        Err(f) => f,
    };
    tracing::warn!(trust_domain = %td.trust_domain, code = failure.code().as_str(), error = %failure, "federated bundle not updated");
    let now_ms = herald_core::audit::now_ms();
    let action = match audit {
        FailureAudit::Always => Some(failure.action()),
        FailureAudit::OncePerCause(remembered) => {
            failure_audit(cfg, &failure, stored.as_ref(), remembered, now_ms)
        }
    };
    let event = action.map(|a| {
        let mut e = failure_event(a, caller, &td.trust_domain, &failure);
        if a == ACTION_STALE {
            e.detail = Some(format!(
                "not confirmed for more than {} (3 × max_refresh); last error: {failure}",
                humantime::format_duration(stale_after(cfg))
            ));
        }
        e
    });
    store
        .record_federation_failure(
            td.trust_domain.as_str(),
            &failure.to_string(),
            now_ms,
            event,
        )
        .await?;
    Ok((RefreshOutcome::Failed(failure), held_hint))
}

/// Removes `td`'s bundle (audited); `false` if none was held.
pub async fn delete(store: &Store, td: &TrustDomain, caller: &str) -> Result<bool, StoreError> {
    store
        .delete_federated_bundle(td.as_str(), event(ACTION_DELETE, caller, td))
        .await
}

/// When to fetch again after `outcome`: the foreign refresh hint, bounded
/// by configuration; after `failures` failures in a row, `retry` doubled
/// for each after the first, up to `max_refresh` (a dead partner is not
/// polled every 30 s forever; a success resets the count).
fn next_delay(
    cfg: &FederationConfig,
    outcome: &RefreshOutcome,
    hint: Option<u64>,
    failures: u32,
) -> Duration {
    match outcome {
        RefreshOutcome::Failed(_) => {
            let doublings = failures.saturating_sub(1).min(31);
            cfg.retry
                .saturating_mul(1u32 << doublings)
                .min(cfg.max_refresh)
        }
        _ => hint
            .map(Duration::from_secs)
            .unwrap_or(cfg.max_refresh)
            .clamp(cfg.min_refresh, cfg.max_refresh),
    }
}

/// Reloads the federated bundles into `shared` if the store's federation
/// sequence moved; wakes the registration streams.
pub async fn reload_if_moved(shared: &Shared, sequence: u64) -> Result<(), StoreError> {
    if shared.federation().sequence == sequence {
        return Ok(());
    }
    let state = FederationState::load(&shared.store, sequence).await?;
    tracing::info!(
        sequence,
        trust_domains = state.bundles.len(),
        "federated bundles reloaded"
    );
    shared.set_federation(Arc::new(state));
    Ok(())
}

/// One configured trust domain in the refresher: when it is due, and its
/// failures in a row (for the back-off and the once-per-cause audit).
struct Schedule {
    at: tokio::time::Instant,
    td: FederatedTrustDomain,
    failures: u32,
    last_failure: Option<String>,
}

/// The replica's federation loop: fetches each configured trust domain
/// with an endpoint when due, one replica per trust domain at a time.
pub async fn run(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    let cfg = shared.config.federation.clone();
    let caller = format!("server:{}", shared.replica_id);
    let mut due: Vec<Schedule> = cfg
        .trust_domains
        .iter()
        .filter(|t| t.url.is_some())
        .map(|t| Schedule {
            at: tokio::time::Instant::now(),
            td: t.clone(),
            failures: 0,
            last_failure: None,
        })
        .collect();
    if due.is_empty() {
        return;
    }
    loop {
        let now = tokio::time::Instant::now();
        for d in due.iter_mut().filter(|d| d.at <= now) {
            let td = &d.td;
            let lease = format!("federation:{}", td.trust_domain);
            // Held while fetching; extended below to the next fetch.
            let lease_ms = cfg.min_refresh.as_millis() as i64;
            let now_ms = herald_core::audit::now_ms();
            let mine = match shared
                .store
                .try_lease(&lease, &shared.replica_id, now_ms, lease_ms)
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(error = %e, "federation lease unavailable");
                    false
                }
            };
            let delay = if mine {
                let audit = FailureAudit::OncePerCause(d.last_failure.as_deref());
                match refresh(&shared.store, &cfg, td, &caller, audit).await {
                    Ok((outcome, hint)) => {
                        // Counted at every attempt, audited once per cause.
                        shared
                            .metrics
                            .record_federation_fetch(td.trust_domain.as_str(), outcome.label());
                        if let RefreshOutcome::Failed(f) = &outcome {
                            d.failures = d.failures.saturating_add(1);
                            d.last_failure = Some(f.to_string());
                        } else {
                            d.failures = 0;
                            d.last_failure = None;
                        }
                        next_delay(&cfg, &outcome, hint, d.failures)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "federated bundle could not be recorded");
                        cfg.retry
                    }
                }
            } else {
                // Another replica holds it until its next fetch: look again
                // after the interval it will use, not every min_refresh, so
                // that each other replica costs one lease attempt per
                // interval; should the holder die, one of them fetches at
                // most one interval late.
                let hint = shared
                    .federation()
                    .bundles
                    .get(&td.trust_domain)
                    .and_then(|(r, _)| r.refresh_hint_secs);
                next_delay(&cfg, &RefreshOutcome::Unchanged, hint, 0)
            };
            if mine {
                // The lease now covers the whole interval, so the other
                // replicas (checking once an interval) leave the next
                // fetch to this one; should it die, one of them takes over.
                let until = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                if let Err(e) = shared
                    .store
                    .try_lease(
                        &lease,
                        &shared.replica_id,
                        herald_core::audit::now_ms(),
                        until,
                    )
                    .await
                {
                    tracing::warn!(error = %e, "federation lease not extended");
                }
            }
            d.at = tokio::time::Instant::now() + delay;
        }
        // Put what changed in effect here at once, not at the next poll.
        match shared.store.sequences().await {
            Ok(seq) => {
                if let Err(e) = reload_if_moved(&shared, seq.federation).await {
                    tracing::warn!(error = %e, "federated bundles reload failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "federation sequence unavailable"),
        }
        let next = due
            .iter()
            .map(|d| d.at)
            .min()
            .unwrap_or_else(|| tokio::time::Instant::now() + cfg.max_refresh);
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = wait_shutdown(shutdown.clone()) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_follows_the_hint_within_bounds_and_backs_off_on_failures() {
        let cfg = FederationConfig::default();
        let ok = RefreshOutcome::Unchanged;
        assert_eq!(
            next_delay(&cfg, &ok, Some(300), 0),
            Duration::from_secs(300)
        );
        assert_eq!(next_delay(&cfg, &ok, Some(1), 0), cfg.min_refresh);
        assert_eq!(next_delay(&cfg, &ok, Some(1 << 40), 0), cfg.max_refresh);
        assert_eq!(next_delay(&cfg, &ok, None, 0), cfg.max_refresh);
        let failed = RefreshOutcome::Failed(FetchFailure::Unreachable("x".into()));
        // 30 s, 60 s, 120 s, … up to max_refresh (3600 s), whatever the hint.
        let delays: Vec<u64> = (1..=9)
            .map(|n| next_delay(&cfg, &failed, Some(300), n).as_secs())
            .collect();
        assert_eq!(delays, [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(next_delay(&cfg, &failed, None, u32::MAX), cfg.max_refresh);
    }

    fn record(checked_at_ms: i64, last_error: Option<(&str, i64)>) -> FederatedBundleRecord {
        FederatedBundleRecord {
            trust_domain: "partner.test".into(),
            jwks: "{}".into(),
            sequence: Some(1),
            refresh_hint_secs: Some(300),
            source: "endpoint".into(),
            updated_at_ms: checked_at_ms,
            checked_at_ms,
            last_error: last_error.map(|(e, _)| e.to_owned()),
            last_error_at_ms: last_error.map(|(_, t)| t),
        }
    }

    #[test]
    fn a_failure_is_audited_when_its_cause_changes_and_when_the_bundle_becomes_stale() {
        let cfg = FederationConfig::default();
        let stale_ms = stale_after(&cfg).as_millis() as i64;
        let down = FetchFailure::Unreachable("connection refused".into());
        let hostile = FetchFailure::Refused("older sequence".into());
        // The first failure after a success, and a new cause: audited.
        let fresh = record(0, None);
        assert_eq!(
            failure_audit(&cfg, &down, Some(&fresh), None, 1_000),
            Some(ACTION_UNREACHABLE)
        );
        let failing = record(0, Some(("connection refused", 1_000)));
        assert_eq!(
            failure_audit(&cfg, &down, Some(&failing), None, 31_000),
            None
        );
        assert_eq!(
            failure_audit(&cfg, &hostile, Some(&failing), None, 31_000),
            Some(ACTION_REFUSED)
        );
        // Crossing into staleness: once.
        assert_eq!(
            failure_audit(&cfg, &down, Some(&failing), None, stale_ms),
            Some(ACTION_STALE)
        );
        let stale = record(0, Some(("connection refused", stale_ms)));
        assert_eq!(
            failure_audit(&cfg, &down, Some(&stale), None, stale_ms + 3_600_000),
            None
        );
        // No bundle stored: this replica's memory decides.
        assert_eq!(
            failure_audit(&cfg, &down, None, None, 0),
            Some(ACTION_UNREACHABLE)
        );
        assert_eq!(
            failure_audit(&cfg, &down, None, Some("connection refused"), 0),
            None
        );
    }
}
