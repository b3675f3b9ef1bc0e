//! Prometheus / OpenMetrics metrics, derived in one place from the audit
//! event every decision produces, so the figures and the audit log cannot
//! disagree about what happened.

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use herald_core::{AuditEvent, ErrorCode, EvidenceType, Outcome};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::Shared;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuanceLabels {
    credential_type: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttestationLabels {
    evidence_type: &'static str,
    result: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabels {
    issuer: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FederationLabels {
    trust_domain: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FederationFetchLabels {
    trust_domain: String,
    outcome: &'static str,
}

/// The server's metrics.
pub struct Metrics {
    registry: Registry,
    issuance: Family<IssuanceLabels, Counter>,
    latency: Family<IssuanceLabels, Histogram>,
    attestation: Family<AttestationLabels, Counter>,
    policy_denials: Family<PolicyLabels, Counter>,
    replays: Counter,
    rate_limited: Counter,
    break_glass: Counter,
    audit_failures: Counter,
    jwks_fetches: Family<IssuerLabels, Counter<u64, AtomicU64>>,
    jwks_failures: Family<IssuerLabels, Counter<u64, AtomicU64>>,
    ca_expiry: Gauge,
    bundle_expiry: Gauge,
    bundle_sequence: Gauge,
    renewal_fraction: Histogram,
    federation_fetches: Family<FederationFetchLabels, Counter>,
    federation_age: Family<FederationLabels, Gauge>,
    federation_sequence: Family<FederationLabels, Gauge>,
    store_transactions: Counter<u64, AtomicU64>,
    store_commits: Counter<u64, AtomicU64>,
    store_pending: Gauge,
    store_slow: Counter<u64, AtomicU64>,
    store_rewritten: Counter<u64, AtomicU64>,
    store_longest: Gauge<f64, AtomicU64>,
    // The same decisions as OpenTelemetry instruments: no-ops unless the
    // binary installed an OTLP meter provider.
    otel_issuance: opentelemetry::metrics::Counter<u64>,
    otel_latency: opentelemetry::metrics::Histogram<f64>,
    otel_attestation: opentelemetry::metrics::Counter<u64>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The credential kind an audit action concerns.
pub fn credential_type(action: &str) -> &'static str {
    match action {
        "exchange.jwt_svid" => "jwt_svid",
        "exchange.cloud_credentials" | "cloud_credentials.workload" => "cloud_credentials",
        "jwt_svid.workload" => "jwt_svid",
        a if a.starts_with("x509_svid.") || a == "exchange.x509_svid" || a == "node.attest" => {
            "x509_svid"
        }
        _ => "other",
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("herald");
        let issuance = Family::<IssuanceLabels, Counter>::default();
        registry.register(
            "issuance",
            "Credential requests by credential type and outcome",
            issuance.clone(),
        );
        let latency = Family::<IssuanceLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0005, 2.0, 14))
        });
        registry.register(
            "issuance_duration_seconds",
            "Time from request to response (decision, issuance, durable commit)",
            latency.clone(),
        );
        let attestation = Family::<AttestationLabels, Counter>::default();
        registry.register(
            "attestation",
            "Evidence verification results by evidence type and failure reason",
            attestation.clone(),
        );
        let policy_denials = Family::<PolicyLabels, Counter>::default();
        registry.register(
            "policy_denials",
            "Requests refused by policy, by the policy that came closest",
            policy_denials.clone(),
        );
        let replays = Counter::default();
        registry.register(
            "replay_rejections",
            "Replayed single-use evidence (OIDC jti, join tokens)",
            replays.clone(),
        );
        let rate_limited = Counter::default();
        registry.register(
            "rate_limited",
            "Requests refused by the per-caller rate limit",
            rate_limited.clone(),
        );
        let break_glass = Counter::default();
        registry.register(
            "break_glass_uses",
            "Credentials issued on a break-glass join token",
            break_glass.clone(),
        );
        let audit_failures = Counter::default();
        registry.register(
            "audit_write_failures",
            "Refusals whose audit record could not be written (each is also logged)",
            audit_failures.clone(),
        );
        let jwks_fetches = Family::<IssuerLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "jwks_fetches",
            "Successful OIDC discovery + JWKS fetches by issuer",
            jwks_fetches.clone(),
        );
        let jwks_failures = Family::<IssuerLabels, Counter<u64, AtomicU64>>::default();
        registry.register(
            "jwks_fetch_failures",
            "Failed OIDC discovery or JWKS fetches by issuer",
            jwks_failures.clone(),
        );
        let ca_expiry = Gauge::default();
        registry.register(
            "ca_expiry_timestamp_seconds",
            "notAfter of the active signing CA, Unix seconds",
            ca_expiry.clone(),
        );
        let bundle_expiry = Gauge::default();
        registry.register(
            "trust_bundle_expiry_timestamp_seconds",
            "Earliest notAfter among the trust bundle's X.509 authorities, Unix seconds",
            bundle_expiry.clone(),
        );
        let bundle_sequence = Gauge::default();
        registry.register(
            "trust_bundle_sequence",
            "spiffe_sequence of the published trust bundle",
            bundle_sequence.clone(),
        );
        let renewal_fraction = Histogram::new([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]);
        registry.register(
            "renewal_lifetime_fraction",
            "How much of the replaced credential's lifetime had passed when it was renewed (agents aim at 0.5 ± jitter; near 1 is rotation lag)",
            renewal_fraction.clone(),
        );
        let federation_fetches = Family::<FederationFetchLabels, Counter>::default();
        registry.register(
            "federation_fetches",
            "Fetches of federated trust domains' bundles by outcome (updated, unchanged, refused, unreachable)",
            federation_fetches.clone(),
        );
        let federation_age = Family::<FederationLabels, Gauge>::default();
        registry.register(
            "federation_bundle_staleness_seconds",
            "Seconds since a federated trust domain's bundle was last confirmed by its endpoint (or set)",
            federation_age.clone(),
        );
        let federation_sequence = Family::<FederationLabels, Gauge>::default();
        registry.register(
            "federation_bundle_sequence",
            "spiffe_sequence of the federated bundle held (-1: none in the document)",
            federation_sequence.clone(),
        );
        let store_transactions = Counter::<u64, AtomicU64>::default();
        registry.register(
            "store_write_transactions",
            "Write transactions of the store's group-commit writer (this replica)",
            store_transactions.clone(),
        );
        let store_commits = Counter::<u64, AtomicU64>::default();
        registry.register(
            "store_commits",
            "Commits (issuances, refusals, audit events) in those transactions: their ratio is the batch size",
            store_commits.clone(),
        );
        let store_pending = Gauge::default();
        registry.register(
            "store_pending_commits",
            "Requests past admission whose commit has not yet been sent (a small batch waits briefly for them)",
            store_pending.clone(),
        );
        let store_slow = Counter::<u64, AtomicU64>::default();
        registry.register(
            "store_slow_write_transactions",
            format!(
                "Write transactions that took {} ms or more, retries included: every request in them, and behind them, waited as long",
                herald_store::SLOW_WRITE.as_millis()
            ),
            store_slow.clone(),
        );
        let store_rewritten = Counter::<u64, AtomicU64>::default();
        registry.register(
            "store_rewritten_write_transactions",
            "Write transactions first tried in one round trip on the guess that nothing in them is refused, which guessed wrong and were written again (SQLite): refusals and audit records written outside the group commit each cost one",
            store_rewritten.clone(),
        );
        let store_longest = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "store_longest_write_transaction_seconds",
            "The longest a write transaction took since start",
            store_longest.clone(),
        );
        let meter = opentelemetry::global::meter("herald");
        let otel_issuance = meter
            .u64_counter("herald.issuance")
            .with_description("Credential requests by credential type and outcome")
            .build();
        let otel_latency = meter
            .f64_histogram("herald.issuance.duration")
            .with_unit("s")
            .with_description("Time from request to response")
            .build();
        let otel_attestation = meter
            .u64_counter("herald.attestation")
            .with_description("Evidence verification results by evidence type and failure reason")
            .build();
        Self {
            otel_issuance,
            otel_latency,
            otel_attestation,
            registry,
            issuance,
            latency,
            attestation,
            policy_denials,
            replays,
            rate_limited,
            break_glass,
            audit_failures,
            jwks_fetches,
            jwks_failures,
            ca_expiry,
            bundle_expiry,
            bundle_sequence,
            renewal_fraction,
            federation_fetches,
            federation_age,
            federation_sequence,
            store_transactions,
            store_commits,
            store_pending,
            store_slow,
            store_rewritten,
            store_longest,
        }
    }

    /// Counts one fetch of a federated trust domain's bundle.
    pub fn record_federation_fetch(&self, trust_domain: &str, outcome: &'static str) {
        self.federation_fetches
            .get_or_create(&FederationFetchLabels {
                trust_domain: trust_domain.to_owned(),
                outcome,
            })
            .inc();
    }

    /// Counts a refusal whose audit record could not be written.
    pub fn record_audit_failure(&self) {
        self.audit_failures.inc();
    }

    /// Records when, within its lifetime, a credential was renewed.
    pub fn record_renewal(&self, not_before: i64, not_after: i64, now: i64) {
        let life = (not_after - not_before).max(1) as f64;
        self.renewal_fraction
            .observe(((now - not_before) as f64 / life).clamp(0.0, 1.0));
    }

    /// Records one decision from its audit event.
    pub fn record(&self, event: &AuditEvent, started: Instant) {
        // Every label value is a static string: recording allocates nothing
        // once a label combination has been seen.
        let labels = IssuanceLabels {
            credential_type: credential_type(&event.action),
            outcome: event.outcome.as_str(),
        };
        self.issuance.get_or_create(&labels).inc();
        self.latency
            .get_or_create(&labels)
            .observe(started.elapsed().as_secs_f64());
        let evidence = event.evidence_type.map_or("none", EvidenceType::as_str);
        let reason = event.reason.map_or("", ErrorCode::as_str);
        let evidence_failed = event.reason.is_some_and(is_evidence_failure);
        let result = match event.outcome {
            Outcome::Success => "verified",
            _ if evidence_failed => "failed",
            _ => "verified",
        };
        let failure_reason = if evidence_failed { reason } else { "" };
        self.attestation
            .get_or_create(&AttestationLabels {
                evidence_type: evidence,
                result,
                reason: failure_reason,
            })
            .inc();
        use opentelemetry::KeyValue as Kv;
        let issuance_attrs = [
            Kv::new("credential_type", labels.credential_type),
            Kv::new("outcome", labels.outcome),
        ];
        self.otel_issuance.add(1, &issuance_attrs);
        self.otel_latency
            .record(started.elapsed().as_secs_f64(), &issuance_attrs);
        self.otel_attestation.add(
            1,
            &[
                Kv::new("evidence_type", evidence),
                Kv::new("result", result),
                Kv::new("reason", failure_reason),
            ],
        );
        match event.reason {
            Some(
                ErrorCode::PolicyDenied
                | ErrorCode::FactorMissing
                | ErrorCode::SpiffeIdEscapesPrefix
                | ErrorCode::CredentialNotGranted
                | ErrorCode::RoleNotGranted
                | ErrorCode::AudienceNotGranted
                | ErrorCode::SessionPolicyTooBroad
                | ErrorCode::CredentialNotRenewable
                | ErrorCode::LineageTooOld
                | ErrorCode::ReattestationRequired
                | ErrorCode::WorkloadNotRegistered,
            ) => {
                self.policy_denials
                    .get_or_create(&PolicyLabels {
                        policy: event.policy.clone().unwrap_or_else(|| "none".into()),
                    })
                    .inc();
            }
            Some(ErrorCode::TokenReplayed | ErrorCode::JoinTokenUsed) => {
                self.replays.inc();
            }
            Some(ErrorCode::RateLimited) => {
                self.rate_limited.inc();
            }
            _ => {}
        }
        if event.outcome == Outcome::Success
            && event.evidence_type == Some(EvidenceType::BreakGlass)
        {
            self.break_glass.inc();
        }
    }

    /// The OpenMetrics text exposition, with scrape-time values refreshed.
    /// `federation_checked` is each federated bundle's `checked_at_ms` as
    /// the store holds it (read per scrape: the replica that fetched may
    /// be another, and an unchanged fetch does not reload the bundles);
    /// without it, the loaded bundles' own times are used.
    pub fn render(&self, shared: &Shared, federation_checked: Option<&[(String, i64)]>) -> String {
        let ca = shared.ca();
        self.ca_expiry.set(ca.ca.not_after());
        let earliest = ca
            .bundle
            .x509_authorities
            .iter()
            .filter_map(|der| x509_parser::parse_x509_certificate(der).ok())
            .map(|(_, c)| c.validity().not_after.timestamp())
            .min();
        if let Some(t) = earliest {
            self.bundle_expiry.set(t);
        }
        self.bundle_sequence
            .set(i64::try_from(ca.bundle.sequence).unwrap_or(i64::MAX));
        if let Some(p) = &shared.policy {
            for s in p.oidc.stats() {
                let labels = IssuerLabels { issuer: s.issuer };
                let fetched = self.jwks_fetches.get_or_create(&labels);
                fetched
                    .inner()
                    .store(s.fetches, std::sync::atomic::Ordering::Relaxed);
                let failed = self.jwks_failures.get_or_create(&labels);
                failed
                    .inner()
                    .store(s.failures, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let now_ms = herald_core::audit::now_ms();
        let checked: std::collections::HashMap<&str, i64> = federation_checked
            .unwrap_or_default()
            .iter()
            .map(|(t, at)| (t.as_str(), *at))
            .collect();
        for (td, (record, bundle)) in &shared.federation().bundles {
            let labels = FederationLabels {
                trust_domain: td.to_string(),
            };
            let checked_at_ms = checked
                .get(td.as_str())
                .copied()
                .unwrap_or(record.checked_at_ms);
            self.federation_age
                .get_or_create(&labels)
                .set((now_ms - checked_at_ms).max(0) / 1000);
            self.federation_sequence.get_or_create(&labels).set(
                bundle
                    .sequence
                    .map_or(-1, |s| i64::try_from(s).unwrap_or(i64::MAX)),
            );
        }
        let store = shared.store.query_stats();
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        self.store_transactions
            .inner()
            .store(store.transactions, relaxed);
        self.store_commits.inner().store(store.commits, relaxed);
        self.store_slow
            .inner()
            .store(store.slow_transactions, relaxed);
        self.store_rewritten
            .inner()
            .store(store.rewritten_transactions, relaxed);
        self.store_longest
            .set(store.longest_transaction.as_secs_f64());
        self.store_pending
            .set(i64::try_from(shared.store.pending_commits()).unwrap_or(i64::MAX));
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        out
    }
}

/// Whether a refusal code means the evidence itself failed verification
/// (as opposed to policy, input or capacity).
pub fn is_evidence_failure(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::JoinTokenMalformed
            | ErrorCode::JoinTokenUnknown
            | ErrorCode::JoinTokenExpired
            | ErrorCode::JoinTokenUsed
            | ErrorCode::JoinTokenWrongPurpose
            | ErrorCode::MtlsRequired
            | ErrorCode::SvidInvalid
            | ErrorCode::SvidExpired
            | ErrorCode::SvidRevoked
            | ErrorCode::SvidRecordMismatch
            | ErrorCode::ForeignTrustDomain
            | ErrorCode::TokenMalformed
            | ErrorCode::TokenIssuerUnknown
            | ErrorCode::TokenAlgorithmRefused
            | ErrorCode::TokenKeyUnknown
            | ErrorCode::TokenSignatureInvalid
            | ErrorCode::TokenExpired
            | ErrorCode::TokenNotYetValid
            | ErrorCode::TokenIssuedInFuture
            | ErrorCode::TokenAudienceInvalid
            | ErrorCode::TokenClaimsInvalid
            | ErrorCode::TokenReplayed
            | ErrorCode::IssuerUnavailable
            | ErrorCode::TpmStructureMalformed
            | ErrorCode::TpmEkCertificateUntrusted
            | ErrorCode::TpmEkCertificateInvalid
            | ErrorCode::TpmEkPublicMismatch
            | ErrorCode::TpmAkRefused
            | ErrorCode::TpmCredentialMismatch
            | ErrorCode::TpmQuoteSignatureInvalid
            | ErrorCode::TpmQuoteSignerMismatch
            | ErrorCode::TpmNonceMismatch
            | ErrorCode::TpmNonceReplayed
            | ErrorCode::TpmPcrSelectionMismatch
            | ErrorCode::TpmPcrDigestMismatch
            | ErrorCode::TpmCounterRollback
            | ErrorCode::NodeEkChanged
            | ErrorCode::NodeTokenClaimsMissing
            | ErrorCode::AwsIidMalformed
            | ErrorCode::AwsIidSignatureInvalid
            | ErrorCode::AwsIidStale
            | ErrorCode::NodeAgentKeyChanged
            | ErrorCode::AttestationTimeout
            | ErrorCode::AttestationProtocol
    )
}

/// Records a decision in the metrics and on its request span (never the
/// evidence itself: the audit event carries only digests).
pub fn record_decision(
    shared: &Shared,
    span: &tracing::Span,
    event: &AuditEvent,
    started: Instant,
) {
    shared.metrics.record(event, started);
    let latency_ms = started.elapsed().as_secs_f64() * 1e3;
    span.record(
        "evidence_type",
        event.evidence_type.map_or("none", EvidenceType::as_str),
    );
    span.record("policy", event.policy.as_deref().unwrap_or(""));
    span.record("outcome", event.outcome.as_str());
    span.record("reason", event.reason.map_or("", ErrorCode::as_str));
    span.record("latency_ms", latency_ms);
    span.in_scope(|| match (event.outcome, event.reason) {
        (Outcome::Success, _) => tracing::debug!("granted"),
        // A flood is summarised, not logged line by line.
        (_, Some(ErrorCode::RateLimited)) => tracing::debug!("refused"),
        _ => tracing::info!("refused"),
    });
}
