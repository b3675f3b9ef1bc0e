//! The one decision path.
//!
//! Every issuance — join-token mint, renewal, token exchange (gRPC, RFC
//! 8693, STS), node attestation, workload SVIDs, JWT-SVIDs and session
//! credentials — runs through a [`Run`]:
//!
//! ```text
//! Run::start (span, audit event)
//!   → a flow verifies its evidence and asks policy      (crate::flows)  → Decided
//!   → Run::issue: policy authorizes the wanted credential (herald_policy::Decision::authorize)
//!                → the issuer signs it                    (crate::issue)
//!                → the store commits it: token use, replay key, parent's
//!                  standing, node registry, issued record, audit record — one transaction
//!   → Run::finish: metrics and span; a refusal is audited with its code
//!                  before the caller sees it (an audit failure is logged and counted, never dropped)
//! ```
//!
//! Transports only translate requests into [`Run`]s and outcomes into
//! their own shapes; flows only gather evidence. Nothing issues outside
//! this module.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use herald_core::{AuditEvent, ErrorCode, EvidenceType, SpiffeId};
use herald_policy::{CredentialRequest, Decision, Defaults, Denial};
use herald_store::{Commit, Committed, NodeAttestation, NodeCommitted, ReplayKey};
use tracing::Instrument;

use crate::issue::{Issued, Lineage};
use crate::status::Refusal;
use crate::{Shared, unix_now};

/// The credential a caller asks for.
#[derive(Debug, Clone)]
pub enum RequestedCredential {
    /// An X.509 SVID for the CSR's key.
    X509Svid {
        /// PKCS#10 DER.
        csr: Vec<u8>,
        /// Requested lifetime; `None` = the grant's or the server's default.
        ttl: Option<Duration>,
    },
    /// A JWT-SVID for these audiences.
    JwtSvid {
        /// At least one.
        audiences: Vec<String>,
        /// Requested lifetime.
        ttl: Option<Duration>,
    },
    /// Cloud-style session credentials for a role.
    Cloud {
        /// The role; must be granted.
        role_arn: String,
        /// AWS-style session name.
        session_name: String,
        /// Optional narrower session policy (JSON).
        session_policy: Option<String>,
        /// Requested lifetime.
        ttl: Option<Duration>,
    },
}

impl RequestedCredential {
    /// What policy is asked to authorize.
    fn as_policy_request(&self) -> CredentialRequest<'_> {
        match self {
            Self::X509Svid { ttl, .. } => CredentialRequest::X509Svid { ttl: *ttl },
            Self::JwtSvid { audiences, ttl } => CredentialRequest::JwtSvid {
                audiences,
                ttl: *ttl,
            },
            Self::Cloud {
                role_arn,
                session_policy,
                ttl,
                ..
            } => CredentialRequest::Cloud {
                role_arn,
                session_policy: session_policy.as_deref(),
                ttl: *ttl,
            },
        }
    }
}

/// What a flow established from its evidence: policy's decision and what
/// the commit must record with the credential.
#[derive(Debug)]
pub struct Decided {
    /// Policy's decision: the identity and what it may be granted.
    pub decision: Decision,
    /// The credential presented to get this one (renewal, workloads),
    /// whose lineage the new one continues.
    pub parent: Option<Parent>,
    /// A join token the commit consumes.
    pub join_token: Option<[u8; 32]>,
    /// A single-use OIDC token key the commit records.
    pub replay: Option<ReplayKey>,
    /// A node attestation the commit writes to the registry with the node SVID.
    pub node: Option<NodeAttestation>,
    /// For a renewal: the validity of the credential it replaces (rotation
    /// lag metric).
    pub renews: Option<(i64, i64)>,
}

impl Decided {
    /// A decision on fresh evidence, with nothing else to record yet.
    pub fn new(decision: Decision) -> Decided {
        Decided {
            decision,
            parent: None,
            join_token: None,
            replay: None,
            node: None,
            renews: None,
        }
    }
}

/// A verified credential the new one descends from.
#[derive(Debug, Clone)]
pub struct Parent {
    /// Its serial.
    pub serial: String,
    /// Its lineage's root.
    pub root_serial: String,
    /// When its lineage's fresh evidence was presented, Unix seconds.
    pub root_at: i64,
    /// Hex SHA-256 of its key: a credential never reuses its parent's key.
    pub spki_sha256: String,
}

impl From<&herald_attest::VerifiedSvid> for Parent {
    fn from(s: &herald_attest::VerifiedSvid) -> Self {
        Parent {
            serial: s.serial.clone(),
            root_serial: s.root_serial.clone(),
            root_at: s.root_at,
            spki_sha256: s.spki_sha256.clone(),
        }
    }
}

/// An issued credential and the decision behind it.
#[derive(Debug)]
pub struct Granted {
    /// The policy that granted it.
    pub policy: String,
    /// The SPIFFE ID it was issued to.
    pub spiffe_id: SpiffeId,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// The credential.
    pub issued: Issued,
}

/// One decision in progress: its span, its audit event, its clock.
pub struct Run<'s> {
    shared: &'s Shared,
    span: tracing::Span,
    started: Instant,
    action: &'static str,
    peer: Option<IpAddr>,
    admitted: bool,
    /// Held from admission until this run's commit is sent: the store's
    /// writer waits briefly for it rather than commit a small batch alone.
    pending: Option<herald_store::PendingCommit>,
    /// The audit event; flows fill in the caller, evidence digests, policy
    /// and SPIFFE ID as they learn them, so a refusal records how far the
    /// request got.
    pub audit: AuditEvent,
}

impl<'s> Run<'s> {
    /// Starts a decision on `action` (`x509_svid.mint`, `exchange.jwt_svid`,
    /// `node.attest`, ...) asked through `transport` from `peer` (the
    /// audit record's caller until the evidence says more).
    pub fn start(
        shared: &'s Shared,
        action: &'static str,
        transport: &'static str,
        peer: Option<SocketAddr>,
        evidence_type: EvidenceType,
    ) -> Run<'s> {
        let caller = peer.map_or_else(|| "peer:unknown".to_owned(), |a| format!("peer:{a}"));
        let span = tracing::info_span!(
            "decision",
            action,
            transport,
            evidence_type = tracing::field::Empty,
            policy = tracing::field::Empty,
            outcome = tracing::field::Empty,
            reason = tracing::field::Empty,
            latency_ms = tracing::field::Empty,
        );
        let mut audit = AuditEvent::new(action, caller);
        audit.evidence_type = Some(evidence_type);
        Run {
            shared,
            span,
            started: Instant::now(),
            action,
            peer: peer.map(|a| a.ip()),
            admitted: false,
            pending: None,
            audit,
        }
    }

    /// Admits the request past the caller's rate limit — the first thing
    /// every transport and flow does, before any crypto or store work. Past
    /// the limit the refusal is counted for the caller's aggregated audit
    /// record, never written on its own. Once per run.
    pub fn admit(&mut self) -> Result<(), Refusal> {
        if std::mem::replace(&mut self.admitted, true) {
            return Ok(());
        }
        match self.peer {
            Some(ip) if !self.shared.limiter.allow(ip, Instant::now()) => Err(Refusal::new(
                ErrorCode::RateLimited,
                "too many requests from this address; retry later",
            )),
            _ => {
                // Granted or refused from here on, it ends in a commit.
                self.pending = Some(self.shared.store.expect_commit());
                Ok(())
            }
        }
    }

    /// The request's span, for the work done on its behalf.
    pub fn span(&self) -> tracing::Span {
        self.span.clone()
    }

    /// Records policy's decision (or the policy that came closest to one)
    /// on the audit event.
    pub fn decided(&mut self, d: Result<Decision, Denial>) -> Result<Decision, Refusal> {
        match d {
            Ok(d) => {
                self.audit.policy = Some(d.policy.clone());
                self.audit.spiffe_id = Some(d.spiffe_id.to_string());
                Ok(d)
            }
            Err(d) => {
                if d.policy.is_some() {
                    self.audit.policy = d.policy.clone();
                }
                Err(Refusal::new(d.code, d.reason))
            }
        }
    }

    /// The shared tail of every issuance: policy authorizes `wanted`
    /// against the decision, the issuer signs it, and the store commits it
    /// with everything `decided` says to record — or refuses it, audited.
    pub async fn issue(
        &mut self,
        decided: Decided,
        wanted: &RequestedCredential,
    ) -> Result<Granted, Refusal> {
        let span = self.span.clone();
        self.issue_inner(decided, wanted).instrument(span).await
    }

    async fn issue_inner(
        &mut self,
        decided: Decided,
        wanted: &RequestedCredential,
    ) -> Result<Granted, Refusal> {
        let shared = self.shared;
        let Decided {
            decision,
            parent,
            join_token,
            replay,
            node,
            renews,
        } = decided;
        let defaults = Defaults {
            x509_ttl: shared.config.svid.x509_ttl,
            jwt_ttl: shared.config.jwt.default_ttl,
            cloud_ttl: shared.config.cloud.default_ttl,
        };
        let grant = decision
            .authorize(&wanted.as_policy_request(), &defaults)
            .map_err(|d| Refusal::new(d.code, d.reason))?;
        let now = unix_now();
        let lineage = Lineage {
            origin: decision.origin,
            parent: parent.clone(),
        };
        let ca = shared.ca();
        let (issued, record) = crate::issue::issue(
            shared,
            &ca,
            &decision,
            &grant,
            wanted,
            &lineage,
            &self.audit,
            now,
        )?;
        self.audit.serial = Some(record.serial.clone());
        let expires_at = record.not_after;
        // Sent now: the writer no longer waits for it.
        self.pending = None;
        let refused = match node {
            Some(attestation) => match shared
                .store
                .commit_node_attestation(
                    attestation,
                    record,
                    join_token,
                    replay,
                    self.audit.clone(),
                )
                .await?
            {
                NodeCommitted::Done(_) => None,
                NodeCommitted::Refused(code) => Some(code),
            },
            None => match shared
                .store
                .commit(Commit {
                    consume_join_token: join_token,
                    consume_replay: replay,
                    parent: parent.map(|p| p.serial),
                    now_s: now,
                    issued: Some(record),
                    audit: self.audit.clone(),
                })
                .await?
            {
                Committed::Done { .. } => None,
                Committed::Refused(code) => Some(code),
            },
        };
        if let Some(code) = refused {
            // Signed but never recorded nor returned: the commit wrote only
            // the refusal's audit record.
            self.audit.serial = None;
            return Err(Refusal {
                code,
                message: refusal_message(code).into(),
                audited: true,
            });
        }
        if let Some((not_before, not_after)) = renews {
            shared.metrics.record_renewal(not_before, not_after, now);
        }
        Ok(Granted {
            policy: decision.policy,
            spiffe_id: decision.spiffe_id,
            expires_at,
            issued,
        })
    }

    /// Ends the decision: a refusal is audited (unless the commit already
    /// wrote it) before the caller sees it; metrics and the span record
    /// the outcome either way.
    pub async fn finish<T>(self, result: Result<T, Refusal>) -> Result<T, Refusal> {
        match result {
            Ok(v) => {
                crate::metrics::record_decision(self.shared, &self.span, &self.audit, self.started);
                Ok(v)
            }
            Err(r) => Err(self.refuse(r).await),
        }
    }

    /// Ends the decision with a refusal — also one decided before any
    /// evidence was looked at (a malformed request): audited like any other,
    /// except rate-limited ones, which go into their caller's aggregated
    /// record (a flood must not become a durable write per request).
    ///
    /// Past the server-wide refusal audit budget (a flood from many
    /// addresses, each under its own limit) a refusal is counted into its
    /// caller's aggregated record instead: still audited, with its action
    /// and code, but not a durable write per request.
    pub async fn refuse(mut self, r: Refusal) -> Refusal {
        self.pending = None;
        let event = self.audit.clone().deny(r.code);
        let aggregate = r.code == ErrorCode::RateLimited
            || (!r.audited && !self.shared.refusal_budget.allow((), Instant::now()));
        if aggregate {
            self.shared
                .floods
                .count(self.peer, self.action, r.code, herald_core::audit::now_ms());
        } else if !r.audited
            && let Err(e) = self.shared.store.audit(event.clone()).await
        {
            self.shared.metrics.record_audit_failure();
            tracing::error!(parent: &self.span, error = %e, code = %r.code,
                "could not write the audit record of a refusal");
        }
        crate::metrics::record_decision(self.shared, &self.span, &event, self.started);
        Refusal { audited: true, ..r }
    }
}

/// What the caller is told when the commit itself refused.
fn refusal_message(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::TokenReplayed => "the token was already used (tokens are single-use)",
        ErrorCode::JoinTokenUsed | ErrorCode::JoinTokenExpired | ErrorCode::JoinTokenUnknown => {
            "the join token can no longer be used"
        }
        ErrorCode::SvidRevoked => "the presented SVID's lineage has been revoked",
        ErrorCode::NodeBanned => "the node is banned",
        ErrorCode::TpmCounterRollback => "the TPM's reset/restart counters went backwards",
        ErrorCode::NodeEkChanged => "another TPM already holds this node identity",
        _ => "the datastore refused the issuance",
    }
}
