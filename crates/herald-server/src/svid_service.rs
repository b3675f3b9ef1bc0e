//! `herald.v1.SvidService`: the decision path for X.509 SVIDs.
//!
//! Every request follows one path — check input → verify evidence → grant →
//! issue → commit (issuance and audit record in one transaction) → respond —
//! and every refusal is audited with its stable code before the caller sees it.

use std::sync::Arc;

use herald_ca::csr::{MAX_CSR_LEN, verify_csr};
use herald_ca::svid::verify_x509_svid;
use herald_ca::{X509Grant, sha256_hex};
use herald_core::{AuditEvent, ErrorCode, EvidenceType};
use herald_proto::v1::svid_service_server::SvidService;
use herald_proto::v1::{MintX509SvidRequest, RenewX509SvidRequest, X509SvidResponse};
use herald_store::{Commit, Committed, IssuedCredential};
use tonic::{Request, Response, Status};

use crate::join_token::{self, MAX_TOKEN_LEN};
use crate::status::Refusal;
use crate::{Shared, unix_now};

/// The gRPC service.
pub struct SvidApi {
    shared: Arc<Shared>,
}

impl SvidApi {
    /// Serves from `shared` state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

fn peer_of<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map_or_else(|| "peer:unknown".to_owned(), |a| format!("peer:{a}"))
}

/// Audits a refusal (unless the store already did), records it, and turns
/// it into a status.
async fn refuse(
    shared: &Shared,
    audit: AuditEvent,
    r: Refusal,
    span: &tracing::Span,
    started: std::time::Instant,
) -> Status {
    let event = audit.deny(r.code);
    if !r.audited
        && let Err(e) = shared.store.audit(event.clone()).await
    {
        tracing::error!(error = %e, "could not write the audit record of a refusal");
    }
    crate::metrics::record_decision(shared, span, &event, started);
    r.to_status()
}

fn request_span(action: &'static str) -> tracing::Span {
    tracing::info_span!(
        "svid",
        action,
        evidence_type = tracing::field::Empty,
        policy = tracing::field::Empty,
        outcome = tracing::field::Empty,
        reason = tracing::field::Empty,
        latency_ms = tracing::field::Empty,
    )
}

fn response(issued: &herald_ca::IssuedX509, bundle: &herald_ca::TrustBundle) -> X509SvidResponse {
    let mut cert_chain = vec![issued.cert_der.clone()];
    cert_chain.extend(issued.intermediates.iter().cloned());
    X509SvidResponse {
        spiffe_id: issued.spiffe_id.to_string(),
        cert_chain,
        bundle: bundle.x509_authorities.clone(),
        serial: issued.serial_hex.clone(),
        expires_at: issued.not_after,
    }
}

/// What the store records of an issued X.509 SVID, from its audit event.
pub(crate) fn record(
    issued: &herald_ca::IssuedX509,
    csr_spki_sha256: &str,
    audit: &AuditEvent,
    parent: Option<String>,
    now: i64,
) -> IssuedCredential {
    IssuedCredential {
        serial: issued.serial_hex.clone(),
        kind: "x509_svid".into(),
        spiffe_id: issued.spiffe_id.to_string(),
        not_before: issued.not_before,
        not_after: issued.not_after,
        issued_at: now,
        evidence_type: audit
            .evidence_type
            .map_or_else(String::new, |e| e.as_str().to_owned()),
        evidence_digest: audit.evidence_digest.clone(),
        policy: audit.policy.clone(),
        parent_serial: parent,
        public_key_sha256: csr_spki_sha256.to_owned(),
        ca_key_id: issued.ca_key_id.clone(),
    }
}

impl SvidApi {
    async fn mint(
        &self,
        req: MintX509SvidRequest,
        audit: &mut AuditEvent,
    ) -> Result<X509SvidResponse, Refusal> {
        if req.join_token.len() > MAX_TOKEN_LEN || req.csr.len() > MAX_CSR_LEN {
            return Err(Refusal::new(
                ErrorCode::RequestTooLarge,
                "join token or CSR exceeds its size cap",
            ));
        }
        let hash = join_token::parse(&req.join_token).ok_or_else(|| {
            Refusal::new(ErrorCode::JoinTokenMalformed, "not a Herald join token")
        })?;
        audit.evidence_digest = Some(hex::encode(hash));
        let now = unix_now();
        let token = join_token::lookup(&self.shared.store, &hash).await?;
        audit.spiffe_id = Some(token.spiffe_id.clone());
        audit.policy = Some(format!("join_token:{}", token.token_id));
        let spiffe_id = join_token::usable(&token, now)?;
        let csr = verify_csr(&req.csr)?;
        let ca = self.shared.ca();
        let grant = X509Grant {
            spiffe_id,
            ttl: self.shared.config.svid.x509_ttl,
            dns_names: Vec::new(),
        };
        let issued = ca.ca.issue_x509_svid(&csr, &grant, now)?;
        audit.serial = Some(issued.serial_hex.clone());
        let commit = Commit {
            consume_join_token: Some(hash),
            consume_replay: None,
            now_s: now,
            issued: Some(record(&issued, &csr.spki_sha256, audit, None, now)),
            audit: audit.clone(),
        };
        match self.shared.store.commit(commit).await? {
            Committed::Done { .. } => Ok(response(&issued, &ca.bundle)),
            Committed::TokenRejected(code) => Err(Refusal {
                code,
                message: "the join token can no longer be used".into(),
                audited: true,
            }),
        }
    }

    async fn renew(
        &self,
        peer_certs: Option<Vec<Vec<u8>>>,
        req: RenewX509SvidRequest,
        audit: &mut AuditEvent,
    ) -> Result<X509SvidResponse, Refusal> {
        if req.csr.len() > MAX_CSR_LEN {
            return Err(Refusal::new(
                ErrorCode::RequestTooLarge,
                "CSR exceeds its size cap",
            ));
        }
        let chain = peer_certs.filter(|c| !c.is_empty()).ok_or_else(|| {
            Refusal::new(
                ErrorCode::MtlsRequired,
                "present your current SVID as the TLS client certificate",
            )
        })?;
        audit.evidence_digest = Some(sha256_hex(&chain[0]));
        let now = unix_now();
        let ca = self.shared.ca();
        let current = verify_x509_svid(
            &chain,
            &ca.bundle.x509_authorities,
            ca.ca.trust_domain(),
            now,
        )
        .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
        audit.caller = current.spiffe_id.to_string();
        audit.spiffe_id = Some(current.spiffe_id.to_string());
        audit.policy = Some("renewal".into());
        let store = &self.shared.store;
        match store.credential_status(&current.serial_hex).await? {
            None => {
                return Err(Refusal::new(
                    ErrorCode::SvidInvalid,
                    "the presented SVID was not issued by this server",
                ));
            }
            Some(status) if status.revoked => {
                return Err(Refusal::new(
                    ErrorCode::SvidRevoked,
                    "the presented SVID has been revoked",
                ));
            }
            // A banned node's SVID may have been issued after the ban swept
            // its credentials: the registry has the last word (answered by
            // the same batched lookup).
            Some(status) if status.node_banned => {
                return Err(Refusal::new(ErrorCode::NodeBanned, "the node is banned"));
            }
            Some(_) => {}
        }
        let csr = verify_csr(&req.csr)?;
        if csr.spki_sha256 == current.spki_sha256 {
            return Err(Refusal::new(
                ErrorCode::RenewSameKey,
                "the CSR reuses the current SVID's key",
            ));
        }
        // A renewal never lives longer than the credential it replaces was
        // granted (a node policy's short TTL survives rotation).
        let granted = (current.not_after - current.not_before)
            .saturating_sub(herald_ca::authority::CLOCK_SKEW.as_secs() as i64)
            .max(1) as u64;
        let grant = X509Grant {
            spiffe_id: current.spiffe_id.clone(),
            ttl: self
                .shared
                .config
                .svid
                .x509_ttl
                .min(std::time::Duration::from_secs(granted)),
            dns_names: current.dns_names.clone(),
        };
        let issued = ca.ca.issue_x509_svid(&csr, &grant, now)?;
        audit.serial = Some(issued.serial_hex.clone());
        let commit = Commit {
            consume_join_token: None,
            consume_replay: None,
            now_s: now,
            issued: Some(record(
                &issued,
                &csr.spki_sha256,
                audit,
                Some(current.serial_hex),
                now,
            )),
            audit: audit.clone(),
        };
        match store.commit(commit).await? {
            Committed::Done { .. } => {
                self.shared
                    .metrics
                    .record_renewal(current.not_before, current.not_after, now);
                Ok(response(&issued, &ca.bundle))
            }
            Committed::TokenRejected(code) => Err(Refusal::new(code, "unexpected token rejection")),
        }
    }
}

#[tonic::async_trait]
impl SvidService for SvidApi {
    async fn mint_x509_svid(
        &self,
        request: Request<MintX509SvidRequest>,
    ) -> Result<Response<X509SvidResponse>, Status> {
        let started = std::time::Instant::now();
        let span = request_span("x509_svid.mint");
        let mut audit = AuditEvent::new("x509_svid.mint", peer_of(&request));
        audit.evidence_type = Some(EvidenceType::JoinToken);
        let result = tracing::Instrument::instrument(
            self.mint(request.into_inner(), &mut audit),
            span.clone(),
        )
        .await;
        match result {
            Ok(resp) => {
                crate::metrics::record_decision(&self.shared, &span, &audit, started);
                Ok(Response::new(resp))
            }
            Err(r) => Err(refuse(&self.shared, audit, r, &span, started).await),
        }
    }

    async fn renew_x509_svid(
        &self,
        request: Request<RenewX509SvidRequest>,
    ) -> Result<Response<X509SvidResponse>, Status> {
        let started = std::time::Instant::now();
        let span = request_span("x509_svid.renew");
        let mut audit = AuditEvent::new("x509_svid.renew", peer_of(&request));
        audit.evidence_type = Some(EvidenceType::X509Svid);
        let peer_certs = request
            .peer_certs()
            .map(|certs| certs.iter().map(|c| c.to_vec()).collect());
        let result = tracing::Instrument::instrument(
            self.renew(peer_certs, request.into_inner(), &mut audit),
            span.clone(),
        )
        .await;
        match result {
            Ok(resp) => {
                crate::metrics::record_decision(&self.shared, &span, &audit, started);
                Ok(Response::new(resp))
            }
            Err(r) => Err(refuse(&self.shared, audit, r, &span, started).await),
        }
    }
}
