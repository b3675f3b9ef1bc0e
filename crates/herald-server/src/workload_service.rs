//! `herald.v1.WorkloadService`: what a node agent may ask for its
//! workloads. Every call is gated on the caller's node SVID
//! ([`crate::flows::node`]: issued here, matching its record, a live
//! lineage rooted in a node attestation under a node policy still in
//! effect); every credential is then one decision on the one path
//! ([`crate::flows::workload`]: the node's policy must register the
//! identity) and descends from the node SVID, so revoking or banning the
//! node revokes it.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use herald_attest::VerifiedSvid;
use herald_core::{ErrorCode, EvidenceType};
use herald_policy::Registration;
use herald_proto::v1::workload_service_server::WorkloadService;
use herald_proto::v1::{
    BatchNewX509SvidsRequest, BatchNewX509SvidsResponse, CloudCredentials,
    NewCloudCredentialsRequest, NewJwtSvidRequest, NewJwtSvidResponse, RegistrationSet,
    SyncRegistrationsRequest, TrustBundle, WorkloadSvidResult, X509SvidResponse,
};
use herald_store::NodeStatus;
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::decision::{Granted, RequestedCredential, Run};
use crate::issue::Issued;
use crate::status::Refusal;
use crate::svid_service::{peer_certs, x509_response};

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

/// The registrations in effect for `node`.
fn registrations(shared: &Shared, node: &VerifiedSvid) -> Vec<Registration> {
    shared
        .policies()
        .ok()
        .and_then(|set| {
            set.policy(node.policy.as_deref().unwrap_or_default())
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

fn registration_set(shared: &Shared, node: &VerifiedSvid) -> RegistrationSet {
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
            federates_with: r.federates_with.iter().map(ToString::to_string).collect(),
        })
        .collect();
    let federated = federated_bundles(shared, &regs);
    // The revision is a digest of everything the agent acts on.
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for r in &registrations {
        ctx.update(format!("{r:?}").as_bytes());
    }
    for b in std::iter::once(&bundle).chain(&federated) {
        ctx.update(b.trust_domain.as_bytes());
        ctx.update(&b.sequence.to_be_bytes());
        ctx.update(b.jwks.as_bytes());
        for a in &b.x509_authorities {
            ctx.update(a);
        }
    }
    let d = ctx.finish();
    let mut rev = [0u8; 8];
    rev.copy_from_slice(&d.as_ref()[..8]);
    RegistrationSet {
        registrations,
        revision: u64::from_be_bytes(rev),
        bundle: Some(bundle),
        federated_bundles: federated,
    }
}

/// The bundles held for the foreign trust domains `regs` federate with.
fn federated_bundles(shared: &Shared, regs: &[Registration]) -> Vec<TrustBundle> {
    crate::federation::bundle_messages(shared, regs.iter().flat_map(|r| &r.federates_with))
}

type SyncStream = Pin<Box<dyn Stream<Item = Result<RegistrationSet, Status>> + Send>>;

impl WorkloadApi {
    /// The calling node, or its refusal (audited as `action`).
    async fn node<T>(
        &self,
        request: &Request<T>,
        action: &'static str,
    ) -> Result<VerifiedSvid, Status> {
        let shared = &*self.shared;
        let mut run = Run::start(
            shared,
            action,
            "grpc",
            request.remote_addr(),
            EvidenceType::X509Svid,
        );
        let chain = peer_certs(request);
        match crate::flows::serving_node(shared, &mut run, chain.as_deref()).await {
            // Each credential the node then asks for is a decision of its
            // own, audited on its own.
            Ok(node) => Ok(node),
            Err(r) => Err(run.refuse(r).await.to_status()),
        }
    }

    /// One workload credential for `node`: the one decision path.
    async fn issue(
        &self,
        action: &'static str,
        node: &VerifiedSvid,
        spiffe_id: &str,
        wanted: impl FnOnce(&herald_policy::Decision) -> Result<RequestedCredential, Refusal>,
    ) -> Result<Granted, Refusal> {
        let shared = &*self.shared;
        let mut run = Run::start(shared, action, "grpc", None, EvidenceType::X509Svid);
        run.audit.caller = node.spiffe_id.to_string();
        let span = run.span();
        let result = tracing::Instrument::instrument(
            async {
                let decided = crate::flows::workload(shared, &mut run, node, spiffe_id)?;
                let wanted = wanted(&decided.decision)?;
                run.issue(decided, &wanted).await
            },
            span,
        )
        .await;
        run.finish(result).await
    }
}

#[tonic::async_trait]
impl WorkloadService for WorkloadApi {
    async fn new_cloud_credentials(
        &self,
        request: Request<NewCloudCredentialsRequest>,
    ) -> Result<Response<CloudCredentials>, Status> {
        let node = self.node(&request, "cloud_credentials.workload").await?;
        let req = request.into_inner();
        let issued = self
            .issue("cloud_credentials.workload", &node, &req.spiffe_id, |d| {
                // The role is the registration's: the one its grants name.
                let role = d.grants.cloud_roles.first().ok_or_else(|| {
                    Refusal::new(
                        ErrorCode::CredentialNotGranted,
                        format!("{} has no cloud role", req.spiffe_id),
                    )
                })?;
                Ok(RequestedCredential::Cloud {
                    role_arn: role.role_arn.clone(),
                    session_name: req.session_name.clone(),
                    session_policy: None,
                    ttl: None,
                })
            })
            .await
            .map_err(|r| r.to_status())?;
        let Issued::Cloud {
            creds, role_arn, ..
        } = issued.issued
        else {
            return Err(Refusal::new(ErrorCode::Internal, "unexpected credential").to_status());
        };
        Ok(Response::new(CloudCredentials {
            access_key_id: creds.access_key_id.clone(),
            secret_access_key: creds.secret_access_key.to_string(),
            session_token: creds.session_token.clone(),
            expiration: crate::exchange_service::iso8601(creds.expiration),
            role_arn,
        }))
    }

    type SyncRegistrationsStream = SyncStream;

    async fn sync_registrations(
        &self,
        request: Request<SyncRegistrationsRequest>,
    ) -> Result<Response<Self::SyncRegistrationsStream>, Status> {
        let node = self.node(&request, "workload.sync").await?;
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
            // A federated bundle fetched or set on any replica.
            let mut federation = shared.federation_generation.subscribe();
            let mut last = None;
            loop {
                let set = registration_set(&shared, &node);
                if last != Some(set.revision) {
                    last = Some(set.revision);
                    if tx.send(Ok(set)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    r = ring.changed() => if r.is_err() { return },
                    r = federation.changed() => if r.is_err() { return },
                    r = bans.changed() => {
                        if r.is_err() {
                            return;
                        }
                        match shared.store.node_by_spiffe_id(node.spiffe_id.as_str()).await {
                            Ok(Some(n)) if n.status == NodeStatus::Active => {}
                            Ok(_) => {
                                let refusal = Refusal::new(ErrorCode::NodeBanned, "the node is banned");
                                // The stream ends: the agent stops serving.
                                if tx.send(Err(refusal.to_status())).await.is_err() {
                                    tracing::debug!("the agent left before hearing of its ban");
                                }
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
        if request.get_ref().requests.len() > MAX_BATCH {
            let mut run = Run::start(
                &self.shared,
                "x509_svid.workload",
                "grpc",
                request.remote_addr(),
                EvidenceType::X509Svid,
            );
            // Charged like any call, so a flood of oversized batches is
            // throttled and audited in aggregate, not record by record.
            let r = run.admit().err().unwrap_or_else(|| {
                Refusal::new(
                    ErrorCode::RequestTooLarge,
                    format!("at most {MAX_BATCH} SVIDs per batch"),
                )
            });
            return Err(run.refuse(r).await.to_status());
        }
        let node = self.node(&request, "x509_svid.workload").await?;
        let req = request.into_inner();
        // Concurrently, so the group-commit writer lands the batch in few
        // transactions.
        let results = futures::future::join_all(req.requests.iter().map(|r| {
            let csr = r.csr.clone();
            async {
                let granted = self
                    .issue("x509_svid.workload", &node, &r.spiffe_id, |_| {
                        Ok(RequestedCredential::X509Svid { csr, ttl: None })
                    })
                    .await?;
                x509_response(granted.issued)
            }
        }))
        .await;
        let results = req
            .requests
            .iter()
            .zip(results)
            .map(
                |(r, res): (_, Result<X509SvidResponse, Refusal>)| match res {
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
                },
            )
            .collect();
        Ok(Response::new(BatchNewX509SvidsResponse { results }))
    }

    async fn new_jwt_svid(
        &self,
        request: Request<NewJwtSvidRequest>,
    ) -> Result<Response<NewJwtSvidResponse>, Status> {
        let node = self.node(&request, "jwt_svid.workload").await?;
        let req = request.into_inner();
        let granted = self
            .issue("jwt_svid.workload", &node, &req.spiffe_id, |_| {
                Ok(RequestedCredential::JwtSvid {
                    audiences: req.audiences.clone(),
                    ttl: None,
                })
            })
            .await
            .map_err(|r| r.to_status())?;
        let Issued::Jwt { token } = granted.issued else {
            return Err(Refusal::new(ErrorCode::Internal, "unexpected credential").to_status());
        };
        Ok(Response::new(NewJwtSvidResponse {
            token,
            expires_at: granted.expires_at,
        }))
    }
}
