//! `herald.v1.WorkloadService`: what a node agent may ask for its
//! workloads. One gate for every call — the caller's node SVID (mTLS) →
//! issued here and not revoked → an active node in the registry — then the
//! node's registrations (from the policy that admitted it) decide which
//! SPIFFE IDs it may have SVIDs for.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use herald_ca::csr::{MAX_CSR_LEN, verify_csr};
use herald_ca::svid::{SvidInfo, verify_x509_svid};
use herald_ca::{JwtSvidClaims, X509Grant};
use herald_core::{AuditEvent, ErrorCode, EvidenceType};
use herald_policy::Registration;
use herald_proto::v1::workload_service_server::WorkloadService;
use herald_proto::v1::{
    BatchNewX509SvidsRequest, BatchNewX509SvidsResponse, CloudCredentials,
    NewCloudCredentialsRequest, NewJwtSvidRequest, NewJwtSvidResponse, RegistrationSet,
    SyncRegistrationsRequest, TrustBundle, WorkloadSvidResult, X509SvidResponse,
};
use herald_store::{Commit, Committed, IssuedCredential, NodeRecord, NodeStatus};
use tonic::{Request, Response, Status};

use crate::status::Refusal;
use crate::{Shared, unix_now};

/// Most SVIDs one batch may ask for.
pub const MAX_BATCH: usize = 100;
/// How soon a registration stream retries its node's standing check after
/// the store failed to answer it.
const RECHECK_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// The gRPC service.
pub struct WorkloadApi {
    shared: Arc<Shared>,
}

impl WorkloadApi {
    /// Serves from `shared` state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// The authenticated node behind a call.
struct Caller {
    node: NodeRecord,
    svid: SvidInfo,
}

/// Checks the node SVID chain the caller presented.
async fn authenticate(shared: &Shared, peer: Option<Vec<Vec<u8>>>) -> Result<Caller, Refusal> {
    let chain = peer.filter(|c| !c.is_empty()).ok_or_else(|| {
        Refusal::new(
            ErrorCode::MtlsRequired,
            "present the node SVID as the TLS client certificate",
        )
    })?;
    let ca = shared.ca();
    let svid = verify_x509_svid(
        &chain,
        &ca.bundle.x509_authorities,
        ca.ca.trust_domain(),
        unix_now(),
    )
    .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
    match shared.store.credential_status(&svid.serial_hex).await? {
        None => {
            return Err(Refusal::new(
                ErrorCode::SvidInvalid,
                "the presented SVID was not issued by this server",
            ));
        }
        Some(s) if s.revoked => {
            return Err(Refusal::new(
                ErrorCode::SvidRevoked,
                "the presented SVID has been revoked",
            ));
        }
        Some(_) => {}
    }
    let node = shared
        .store
        .node_by_spiffe_id(svid.spiffe_id.as_str())
        .await?
        .ok_or_else(|| {
            Refusal::new(
                ErrorCode::NodeUnknown,
                "the presented SVID is not an attested node's",
            )
        })?;
    if node.status == NodeStatus::Banned {
        return Err(Refusal::new(ErrorCode::NodeBanned, "the node is banned"));
    }
    Ok(Caller { node, svid })
}

/// The registrations in effect for `node`.
fn registrations(shared: &Shared, node: &NodeRecord) -> Vec<Registration> {
    shared
        .exchange
        .as_ref()
        .and_then(|ex| {
            ex.policies
                .current()
                .policy(&node.policy)
                .map(|p| p.registrations().to_vec())
        })
        .unwrap_or_default()
}

fn bundle_message(shared: &Shared) -> TrustBundle {
    let ca = shared.ca();
    TrustBundle {
        trust_domain: ca.ca.trust_domain().to_string(),
        x509_authorities: ca.bundle.x509_authorities.clone(),
        jwks: ca
            .bundle
            .to_jwks()
            .map(|v| v.to_string())
            .unwrap_or_default(),
        sequence: ca.bundle.sequence,
    }
}

fn registration_set(shared: &Shared, node: &NodeRecord) -> RegistrationSet {
    let regs = registrations(shared, node);
    let bundle = bundle_message(shared);
    let registrations: Vec<herald_proto::v1::Registration> = regs
        .iter()
        .map(|r| herald_proto::v1::Registration {
            spiffe_id: r.spiffe_id.to_string(),
            selectors: r.selectors.iter().map(ToString::to_string).collect(),
            ttl_seconds: r.ttl.as_secs().min(u64::from(u32::MAX)) as u32,
            dns_names: r.dns_names.clone(),
            jwt_audiences: r.jwt_audiences.clone(),
            hint: r.hint.clone(),
            cloud_role: r.cloud_role.clone().unwrap_or_default(),
        })
        .collect();
    // The revision is a digest of everything the agent acts on.
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for r in &registrations {
        ctx.update(format!("{r:?}").as_bytes());
    }
    ctx.update(&bundle.sequence.to_be_bytes());
    for a in &bundle.x509_authorities {
        ctx.update(a);
    }
    let d = ctx.finish();
    let mut rev = [0u8; 8];
    rev.copy_from_slice(&d.as_ref()[..8]);
    RegistrationSet {
        registrations,
        revision: u64::from_be_bytes(rev),
        bundle: Some(bundle),
    }
}

/// The registration for `spiffe_id` among this node's, or the refusal.
fn registered<'a>(regs: &'a [Registration], spiffe_id: &str) -> Result<&'a Registration, Refusal> {
    regs.iter()
        .find(|r| r.spiffe_id.as_str() == spiffe_id)
        .ok_or_else(|| {
            Refusal::new(
                ErrorCode::WorkloadNotRegistered,
                format!("{spiffe_id} is not registered for this node's workloads"),
            )
        })
}

fn peer_certs<T>(req: &Request<T>) -> Option<Vec<Vec<u8>>> {
    req.peer_certs()
        .map(|certs| certs.iter().map(|c| c.to_vec()).collect())
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<RegistrationSet, Status>> + Send>>;

impl WorkloadApi {
    async fn issue_one(
        &self,
        caller: &Caller,
        regs: &[Registration],
        spiffe_id: &str,
        csr: &[u8],
    ) -> Result<X509SvidResponse, Refusal> {
        let started = Instant::now();
        let mut audit = AuditEvent::new("x509_svid.workload", caller.svid.spiffe_id.to_string());
        audit.evidence_type = Some(EvidenceType::X509Svid);
        audit.evidence_digest = Some(caller.svid.serial_hex.clone());
        audit.policy = Some(caller.node.policy.clone());
        audit.spiffe_id = Some(spiffe_id.to_owned());
        let result = async {
            if csr.len() > MAX_CSR_LEN {
                return Err(Refusal::new(
                    ErrorCode::RequestTooLarge,
                    "CSR exceeds its size cap",
                ));
            }
            let reg = registered(regs, spiffe_id)?;
            let csr = verify_csr(csr)?;
            let now = unix_now();
            let ca = self.shared.ca();
            let issued = ca.ca.issue_x509_svid(
                &csr,
                &X509Grant {
                    spiffe_id: reg.spiffe_id.clone(),
                    ttl: reg.ttl,
                    dns_names: reg.dns_names.clone(),
                },
                now,
            )?;
            audit.serial = Some(issued.serial_hex.clone());
            let record = crate::svid_service::record(
                &issued,
                &csr.spki_sha256,
                &audit,
                Some(caller.svid.serial_hex.clone()),
                now,
            );
            let commit = Commit {
                consume_join_token: None,
                consume_replay: None,
                now_s: now,
                issued: Some(record),
                audit: audit.clone(),
            };
            match self.shared.store.commit(commit).await? {
                Committed::Done { .. } => {}
                Committed::TokenRejected(code) => {
                    return Err(Refusal::new(code, "unexpected token rejection"));
                }
            }
            let mut cert_chain = vec![issued.cert_der.clone()];
            cert_chain.extend(issued.intermediates.iter().cloned());
            Ok(X509SvidResponse {
                spiffe_id: issued.spiffe_id.to_string(),
                cert_chain,
                bundle: ca.bundle.x509_authorities.clone(),
                serial: issued.serial_hex.clone(),
                expires_at: issued.not_after,
            })
        }
        .await;
        let span = tracing::Span::current();
        match &result {
            Ok(_) => crate::metrics::record_decision(&self.shared, &span, &audit, started),
            Err(r) => {
                let event = audit.deny(r.code);
                if !r.audited
                    && let Err(e) = self.shared.store.audit(event.clone()).await
                {
                    tracing::error!(error = %e, "could not write the audit record of a refusal");
                }
                crate::metrics::record_decision(&self.shared, &span, &event, started);
            }
        }
        result
    }

    /// Audits a refusal of the node itself (authentication) and turns it
    /// into a status.
    async fn refuse_caller(&self, action: &str, r: Refusal, caller: String) -> Status {
        let mut audit = AuditEvent::new(action, caller);
        audit.evidence_type = Some(EvidenceType::X509Svid);
        let event = audit.deny(r.code);
        if let Err(e) = self.shared.store.audit(event).await {
            tracing::error!(error = %e, "could not write the audit record of a refusal");
        }
        r.to_status()
    }
}

fn peer_addr<T>(req: &Request<T>) -> String {
    req.remote_addr()
        .map_or_else(|| "peer:unknown".to_owned(), |a| format!("peer:{a}"))
}

impl WorkloadApi {
    fn cloud_credentials(
        &self,
        caller: &Caller,
        req: &NewCloudCredentialsRequest,
        audit: &mut AuditEvent,
    ) -> Result<(CloudCredentials, IssuedCredential), Refusal> {
        let regs = registrations(&self.shared, &caller.node);
        let reg = registered(&regs, &req.spiffe_id)?;
        let role_arn = reg.cloud_role.clone().ok_or_else(|| {
            Refusal::new(
                ErrorCode::CredentialNotGranted,
                format!("{} has no cloud role", req.spiffe_id),
            )
        })?;
        if !crate::exchange::valid_session_name(&req.session_name) {
            return Err(Refusal::new(
                ErrorCode::InvalidRequest,
                "RoleSessionName must be 2-64 characters of [A-Za-z0-9_+=,.@-]",
            ));
        }
        let role = self
            .shared
            .exchange
            .as_ref()
            .and_then(|ex| {
                ex.policies
                    .current()
                    .policy(&caller.node.policy)
                    .and_then(|p| p.grants().cloud_role(&role_arn).cloned())
            })
            .ok_or_else(|| {
                Refusal::new(
                    ErrorCode::RoleNotGranted,
                    format!("the node's policy no longer grants {role_arn}"),
                )
            })?;
        let now = unix_now();
        let ttl = self.shared.config.cloud.default_ttl.min(role.max_ttl);
        let expires_at = now + ttl.as_secs() as i64;
        let at = |t: i64| {
            time::OffsetDateTime::from_unix_timestamp(t)
                .map_err(|_| Refusal::new(ErrorCode::Internal, "time out of range"))
        };
        let mut serial = [0u8; 16];
        aws_lc_rs::rand::fill(&mut serial)
            .map_err(|_| Refusal::new(ErrorCode::Internal, "no randomness"))?;
        let serial = hex::encode(serial);
        let ca = self.shared.ca();
        let keyring = ca.sessions();
        let creds = keyring
            .mint(&herald_cloud_creds::MintRequest {
                spiffe_id: reg.spiffe_id.to_string(),
                role_arn: role_arn.clone(),
                session_name: req.session_name.clone(),
                scope: role.scope.clone(),
                policy: caller.node.policy.clone(),
                serial: serial.clone(),
                issued_at: at(now)?,
                expires_at: at(expires_at)?,
            })
            .map_err(|e| {
                tracing::error!(error = %e, "minting session credentials failed");
                Refusal::new(ErrorCode::Internal, "minting session credentials failed")
            })?;
        audit.serial = Some(serial.clone());
        let record = IssuedCredential {
            serial,
            kind: "cloud_session".into(),
            spiffe_id: reg.spiffe_id.to_string(),
            not_before: now,
            not_after: expires_at,
            issued_at: now,
            evidence_type: EvidenceType::X509Svid.as_str().into(),
            evidence_digest: audit.evidence_digest.clone(),
            policy: audit.policy.clone(),
            parent_serial: Some(caller.svid.serial_hex.clone()),
            public_key_sha256: herald_ca::sha256_hex(creds.access_key_id.as_bytes()),
            ca_key_id: keyring.active_id().to_owned(),
        };
        let expiration = time::OffsetDateTime::from_unix_timestamp(expires_at)
            .ok()
            .and_then(|t| {
                t.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        Ok((
            CloudCredentials {
                access_key_id: creds.access_key_id.clone(),
                secret_access_key: creds.secret_access_key.to_string(),
                session_token: creds.session_token.clone(),
                expiration,
                role_arn,
            },
            record,
        ))
    }
}

#[tonic::async_trait]
impl WorkloadService for WorkloadApi {
    async fn new_cloud_credentials(
        &self,
        request: Request<NewCloudCredentialsRequest>,
    ) -> Result<Response<CloudCredentials>, Status> {
        let started = Instant::now();
        let peer = peer_addr(&request);
        let caller = match authenticate(&self.shared, peer_certs(&request)).await {
            Ok(c) => c,
            Err(r) => {
                return Err(self
                    .refuse_caller("cloud_credentials.workload", r, peer)
                    .await);
            }
        };
        let req = request.into_inner();
        let mut audit = AuditEvent::new(
            "cloud_credentials.workload",
            caller.svid.spiffe_id.to_string(),
        );
        audit.evidence_type = Some(EvidenceType::X509Svid);
        audit.evidence_digest = Some(caller.svid.serial_hex.clone());
        audit.policy = Some(caller.node.policy.clone());
        audit.spiffe_id = Some(req.spiffe_id.clone());
        let span = tracing::Span::current();
        match self.cloud_credentials(&caller, &req, &mut audit) {
            Ok((creds, record)) => {
                let commit = Commit {
                    consume_join_token: None,
                    consume_replay: None,
                    now_s: record.issued_at,
                    issued: Some(record),
                    audit: audit.clone(),
                };
                match self.shared.store.commit(commit).await {
                    Ok(Committed::Done { .. }) => {
                        crate::metrics::record_decision(&self.shared, &span, &audit, started);
                        Ok(Response::new(creds))
                    }
                    Ok(Committed::TokenRejected(code)) => {
                        Err(Refusal::new(code, "unexpected token rejection").to_status())
                    }
                    Err(e) => Err(Refusal::from(e).to_status()),
                }
            }
            Err(r) => {
                let event = audit.deny(r.code);
                let _ = self.shared.store.audit(event.clone()).await;
                crate::metrics::record_decision(&self.shared, &span, &event, started);
                Err(r.to_status())
            }
        }
    }

    type SyncRegistrationsStream = SyncStream;

    async fn sync_registrations(
        &self,
        request: Request<SyncRegistrationsRequest>,
    ) -> Result<Response<Self::SyncRegistrationsStream>, Status> {
        let peer = peer_addr(&request);
        let caller = match authenticate(&self.shared, peer_certs(&request)).await {
            Ok(c) => c,
            Err(r) => return Err(self.refuse_caller("workload.sync", r, peer).await),
        };
        let shared = self.shared.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            let mut changes = shared.policy_generation.subscribe();
            // A new key ring (a rotation on any replica) changes the set's
            // revision: the agent gets the bundle as soon as it is reloaded.
            let mut ring = shared.ring_generation.subscribe();
            // A ban anywhere (polled with the bundle sequence) makes every
            // stream recheck its node: a banned node's stream ends within
            // `ca.bundle_poll`, and no stream polls the database meanwhile.
            let mut bans = shared.ban_generation.subscribe();
            let mut last = None;
            loop {
                let set = registration_set(&shared, &caller.node);
                if last != Some(set.revision) {
                    last = Some(set.revision);
                    if tx.send(Ok(set)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    r = ring.changed() => if r.is_err() { return },
                    r = bans.changed() => {
                        if r.is_err() {
                            return;
                        }
                        match shared.store.node_by_spiffe_id(caller.node.spiffe_id.as_str()).await {
                            Ok(Some(n)) if n.status == NodeStatus::Active => {}
                            Ok(_) => {
                                let _ = tx
                                    .send(Err(Refusal::new(ErrorCode::NodeBanned, "the node is banned").to_status()))
                                    .await;
                                return;
                            }
                            Err(e) => {
                                // Unanswered: ask again shortly rather than
                                // miss this ban.
                                tracing::warn!(error = %e, "node standing check failed");
                                tokio::time::sleep(RECHECK_RETRY).await;
                                bans.mark_changed();
                            }
                        }
                    }
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn batch_new_x509_svids(
        &self,
        request: Request<BatchNewX509SvidsRequest>,
    ) -> Result<Response<BatchNewX509SvidsResponse>, Status> {
        let peer = peer_addr(&request);
        let caller = match authenticate(&self.shared, peer_certs(&request)).await {
            Ok(c) => c,
            Err(r) => return Err(self.refuse_caller("x509_svid.workload", r, peer).await),
        };
        let req = request.into_inner();
        if req.requests.len() > MAX_BATCH {
            return Err(Refusal::new(
                ErrorCode::RequestTooLarge,
                format!("at most {MAX_BATCH} SVIDs per batch"),
            )
            .to_status());
        }
        let regs = registrations(&self.shared, &caller.node);
        // Concurrently, so the group-commit writer lands the batch in few
        // transactions.
        let results = futures::future::join_all(
            req.requests
                .iter()
                .map(|r| self.issue_one(&caller, &regs, &r.spiffe_id, &r.csr)),
        )
        .await;
        let results = req
            .requests
            .iter()
            .zip(results)
            .map(|(r, res)| match res {
                Ok(svid) => WorkloadSvidResult {
                    spiffe_id: r.spiffe_id.clone(),
                    svid: Some(svid),
                    error_code: String::new(),
                    error_message: String::new(),
                },
                Err(e) => WorkloadSvidResult {
                    spiffe_id: r.spiffe_id.clone(),
                    svid: None,
                    error_code: e.code.as_str().to_owned(),
                    error_message: e.message,
                },
            })
            .collect();
        Ok(Response::new(BatchNewX509SvidsResponse { results }))
    }

    async fn new_jwt_svid(
        &self,
        request: Request<NewJwtSvidRequest>,
    ) -> Result<Response<NewJwtSvidResponse>, Status> {
        let started = Instant::now();
        let peer = peer_addr(&request);
        let caller = match authenticate(&self.shared, peer_certs(&request)).await {
            Ok(c) => c,
            Err(r) => return Err(self.refuse_caller("jwt_svid.workload", r, peer).await),
        };
        let req = request.into_inner();
        let mut audit = AuditEvent::new("jwt_svid.workload", caller.svid.spiffe_id.to_string());
        audit.evidence_type = Some(EvidenceType::X509Svid);
        audit.evidence_digest = Some(caller.svid.serial_hex.clone());
        audit.policy = Some(caller.node.policy.clone());
        audit.spiffe_id = Some(req.spiffe_id.clone());
        let regs = registrations(&self.shared, &caller.node);
        let result = (|| {
            let reg = registered(&regs, &req.spiffe_id)?;
            if req.audiences.is_empty() || req.audiences.len() > 16 {
                return Err(Refusal::new(
                    ErrorCode::InvalidRequest,
                    "a JWT-SVID needs 1-16 audiences",
                ));
            }
            if let Some(a) = req
                .audiences
                .iter()
                .find(|a| !reg.jwt_audiences.contains(a))
            {
                return Err(Refusal::new(
                    ErrorCode::AudienceNotGranted,
                    format!(
                        "{} may not get a JWT-SVID for audience {a:?}",
                        req.spiffe_id
                    ),
                ));
            }
            let now = unix_now();
            let ttl = self.shared.config.jwt.default_ttl.min(reg.ttl);
            let expires_at = now + ttl.as_secs() as i64;
            let mut jti = [0u8; 16];
            aws_lc_rs::rand::fill(&mut jti)
                .map_err(|_| Refusal::new(ErrorCode::Internal, "no randomness"))?;
            let token = self.shared.ca().jwt.sign_jwt_svid(&JwtSvidClaims {
                spiffe_id: reg.spiffe_id.clone(),
                audiences: req.audiences.clone(),
                issued_at: now,
                expires_at,
                jti: hex::encode(jti),
                issuer: Some(self.shared.config.jwt_issuer()),
            })?;
            Ok(NewJwtSvidResponse { token, expires_at })
        })();
        let span = tracing::Span::current();
        match result {
            Ok(r) => {
                crate::metrics::record_decision(&self.shared, &span, &audit, started);
                if let Err(e) = self.shared.store.audit(audit).await {
                    tracing::error!(error = %e, "could not write the audit record");
                    return Err(
                        Refusal::new(ErrorCode::StoreUnavailable, "audit failed").to_status()
                    );
                }
                Ok(Response::new(r))
            }
            Err(r) => {
                let event = audit.deny(r.code);
                let _ = self.shared.store.audit(event.clone()).await;
                crate::metrics::record_decision(&self.shared, &span, &event, started);
                Err(r.to_status())
            }
        }
    }
}
