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
//! agents whose registrations federate with it. Every change, refusal and
//! failure is an audit record.

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
    /// The endpoint could not be read (connection, TLS, endpoint SPIFFE
    /// ID, HTTP status, timeout).
    #[error("{0}")]
    Unreachable(String),
    /// The endpoint answered with a document that was refused.
    #[error("{0}")]
    Refused(String),
}

impl FetchFailure {
    /// The stable code it is audited with.
    pub fn code(&self) -> ErrorCode {
        match self {
            FetchFailure::Unreachable(_) => ErrorCode::FederationEndpointUnreachable,
            FetchFailure::Refused(_) => ErrorCode::FederationBundleRefused,
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
        Err(e) => return Err(unreachable(format!("GET {url}: {e}"))),
    };
    ForeignBundle::parse(&td.trust_domain, &body)
        .map_err(|e| FetchFailure::Refused(format!("GET {url}: {e}")))
}

/// The bundle held for `td` in the store, or else its bootstrap bundle.
fn known_bundle(
    td: &FederatedTrustDomain,
    stored: Option<&FederatedBundleRecord>,
) -> Option<ForeignBundle> {
    if let Some(b) =
        stored.and_then(|r| ForeignBundle::parse(&td.trust_domain, r.jwks.as_bytes()).ok())
    {
        return Some(b);
    }
    let path = td.bootstrap_bundle.as_ref()?;
    match std::fs::read(path)
        .map_err(|e| e.to_string())
        .and_then(|bytes| parse_bundle_file(&td.trust_domain, &bytes).map_err(|e| e.to_string()))
    {
        Ok(b) => Some(b),
        Err(e) => {
            tracing::error!(trust_domain = %td.trust_domain, path = %path.display(), error = %e, "bootstrap bundle unusable");
            None
        }
    }
}

fn event(action: &str, caller: &str, td: &TrustDomain) -> AuditEvent {
    let mut e = AuditEvent::new(action, caller);
    e.spiffe_id = Some(td.id().to_string());
    e
}

/// Stores `bundle` for its trust domain with its audit record, unless it
/// is not newer than the one held (then refused and audited).
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
            record_failure(store, td, &failure, caller).await?;
            Ok(RefreshOutcome::Failed(failure))
        }
    }
}

async fn record_failure(
    store: &Store,
    td: &TrustDomain,
    failure: &FetchFailure,
    caller: &str,
) -> Result<(), StoreError> {
    let action = match failure {
        FetchFailure::Unreachable(_) => ACTION_UNREACHABLE,
        FetchFailure::Refused(_) => ACTION_REFUSED,
    };
    let mut audit = event(action, caller, td);
    audit.outcome = match failure {
        FetchFailure::Unreachable(_) => Outcome::Error,
        FetchFailure::Refused(_) => Outcome::Denied,
    };
    audit.reason = Some(failure.code());
    audit.detail = Some(failure.to_string());
    store
        .record_federation_failure(
            td.as_str(),
            &failure.to_string(),
            herald_core::audit::now_ms(),
            audit,
        )
        .await
}

/// Fetches `td`'s bundle once and stores the result: a newer bundle, or
/// the failure (audited; the last good bundle stays). Also returns the
/// `spiffe_refresh_hint` of the bundle now held, for scheduling the next
/// fetch.
pub async fn refresh(
    store: &Store,
    cfg: &FederationConfig,
    td: &FederatedTrustDomain,
    caller: &str,
) -> Result<(RefreshOutcome, Option<u64>), StoreError> {
    let stored = store
        .federated_bundles()
        .await?
        .into_iter()
        .find(|r| r.trust_domain == td.trust_domain.as_str());
    let known = known_bundle(td, stored.as_ref());
    let held_hint = stored.as_ref().and_then(|r| r.refresh_hint_secs);
    match fetch(cfg, td, known.as_ref()).await {
        Ok(bundle) => {
            let outcome = store_bundle(store, &bundle, "endpoint", caller).await?;
            let hint = match outcome {
                RefreshOutcome::Updated { .. } => bundle.refresh_hint_secs,
                _ => held_hint,
            };
            Ok((outcome, hint))
        }
        Err(failure) => {
            tracing::warn!(trust_domain = %td.trust_domain, code = failure.code().as_str(), error = %failure, "federated bundle not updated");
            record_failure(store, &td.trust_domain, &failure, caller).await?;
            Ok((RefreshOutcome::Failed(failure), held_hint))
        }
    }
}

/// Removes `td`'s bundle (audited); `false` if none was held.
pub async fn delete(store: &Store, td: &TrustDomain, caller: &str) -> Result<bool, StoreError> {
    store
        .delete_federated_bundle(td.as_str(), event(ACTION_DELETE, caller, td))
        .await
}

/// When to fetch again after `outcome`: the foreign refresh hint, bounded
/// by configuration; sooner after a failure.
fn next_delay(cfg: &FederationConfig, outcome: &RefreshOutcome, hint: Option<u64>) -> Duration {
    let hinted = hint
        .map(Duration::from_secs)
        .unwrap_or(cfg.max_refresh)
        .clamp(cfg.min_refresh, cfg.max_refresh);
    match outcome {
        RefreshOutcome::Failed(_) => cfg.retry.min(hinted),
        _ => hinted,
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

/// The replica's federation loop: fetches each configured trust domain
/// with an endpoint when due, one replica per trust domain at a time.
pub async fn run(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    let cfg = shared.config.federation.clone();
    let caller = format!("server:{}", shared.replica_id);
    let mut due: Vec<(tokio::time::Instant, FederatedTrustDomain)> = cfg
        .trust_domains
        .iter()
        .filter(|t| t.url.is_some())
        .map(|t| (tokio::time::Instant::now(), t.clone()))
        .collect();
    if due.is_empty() {
        return;
    }
    loop {
        let now = tokio::time::Instant::now();
        for (at, td) in due.iter_mut().filter(|(at, _)| *at <= now) {
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
                match refresh(&shared.store, &cfg, td, &caller).await {
                    Ok((outcome, hint)) => {
                        shared
                            .metrics
                            .record_federation_fetch(td.trust_domain.as_str(), outcome.label());
                        next_delay(&cfg, &outcome, hint)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "federated bundle could not be recorded");
                        cfg.retry
                    }
                }
            } else {
                cfg.min_refresh
            };
            if mine {
                // The lease now covers the whole interval, so the other
                // replicas (checking every min_refresh) leave the next
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
            *at = tokio::time::Instant::now() + delay;
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
            .map(|(at, _)| *at)
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
    fn refresh_follows_the_hint_within_bounds_and_retries_sooner() {
        let cfg = FederationConfig::default();
        let ok = RefreshOutcome::Unchanged;
        assert_eq!(next_delay(&cfg, &ok, Some(300)), Duration::from_secs(300));
        assert_eq!(next_delay(&cfg, &ok, Some(1)), cfg.min_refresh);
        assert_eq!(next_delay(&cfg, &ok, Some(1 << 40)), cfg.max_refresh);
        assert_eq!(next_delay(&cfg, &ok, None), cfg.max_refresh);
        let failed = RefreshOutcome::Failed(FetchFailure::Unreachable("x".into()));
        assert_eq!(next_delay(&cfg, &failed, Some(3000)), cfg.retry);
    }
}
