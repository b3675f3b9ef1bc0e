//! The SPIFFE Workload API on a Unix socket (`proto/spiffe/workload.proto`).
//!
//! Every call: the `workload.spiffe.io: true` metadata or
//! `InvalidArgument`; the caller attested from its peer credentials (no
//! TLS, no client auth); no matching registration → `PermissionDenied`.
//! Streams send the caller's full state at once and again on every change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use herald_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use herald_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use tokio::sync::watch;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::attestor::{Attestor, Facts};
use super::{Entry, Upstream, WorkloadCache};

/// The metadata every Workload API call must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// How long a first fetch waits for the agent's first sync or first SVIDs.
const FIRST_STATE_WAIT: Duration = Duration::from_secs(30);

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    cache: Arc<WorkloadCache>,
    upstream: Upstream,
    attestor: Arc<Attestor>,
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn check_header<T>(req: &Request<T>) -> Result<(), Status> {
    match req.metadata().get(SECURITY_HEADER).map(|v| v.to_str()) {
        Some(Ok("true")) => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

fn concat(ders: &[Vec<u8>]) -> Vec<u8> {
    ders.iter().flat_map(|d| d.iter().copied()).collect()
}

impl WorkloadApi {
    /// A service over `cache`, fetching JWT-SVIDs through `upstream`.
    pub fn new(cache: Arc<WorkloadCache>, upstream: Upstream) -> Self {
        Self {
            cache,
            upstream,
            attestor: Arc::new(Attestor::default()),
        }
    }

    fn attest<T>(&self, req: &Request<T>) -> Result<Facts, Status> {
        let info = req
            .extensions()
            .get::<UdsConnectInfo>()
            .and_then(|i| i.peer_cred)
            .ok_or_else(|| Status::permission_denied("no peer credentials on this connection"))?;
        self.attestor
            .attest(info.uid(), info.gid(), info.pid())
            .map_err(|e| Status::permission_denied(e.to_string()))
    }

    /// Waits until the first registration set has arrived (the agent may
    /// have just started).
    async fn synced(&self) {
        let mut rx = self.cache.subscribe();
        let wait = async {
            while !self.cache.read(|s| s.synced) {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(FIRST_STATE_WAIT, wait).await;
    }

    fn entries_for(&self, facts: &Facts) -> Result<Vec<Entry>, Status> {
        let entries = self.cache.matching(&facts.selectors);
        if entries.is_empty() {
            tracing::info!(
                pid = facts.pid,
                "Workload API caller matches no registration"
            );
            return Err(Status::permission_denied("no identity issued"));
        }
        Ok(entries)
    }

    fn x509_response(&self, entries: &[Entry]) -> Option<X509svidResponse> {
        let bundle = self.cache.read(|s| concat(&s.bundle_x509));
        let mut seen_hints = std::collections::HashSet::new();
        let svids: Vec<X509svid> = entries
            .iter()
            .filter_map(|e| {
                let svid = e.svid.as_ref()?;
                // Hints are unique per response (the first registration wins).
                let hint = if !e.hint.is_empty() && seen_hints.insert(e.hint.clone()) {
                    e.hint.clone()
                } else {
                    String::new()
                };
                Some(X509svid {
                    spiffe_id: e.spiffe_id.clone(),
                    x509_svid: concat(&svid.chain),
                    x509_svid_key: svid.key_pkcs8.to_vec(),
                    bundle: bundle.clone(),
                    hint,
                })
            })
            .collect();
        (!svids.is_empty()).then_some(X509svidResponse {
            svids,
            crl: Vec::new(),
            federated_bundles: HashMap::new(),
        })
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        check_header(&request)?;
        let facts = self.attest(&request)?;
        self.synced().await;
        self.entries_for(&facts)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let api = self.clone();
        tokio::spawn(async move {
            let mut changes = api.cache.subscribe();
            let mut last: Option<Vec<String>> = None;
            loop {
                changes.borrow_and_update();
                let entries = api.cache.matching(&facts.selectors);
                if entries.is_empty() {
                    let _ = tx
                        .send(Err(Status::permission_denied("no identity issued")))
                        .await;
                    return;
                }
                if let Some(resp) = api.x509_response(&entries) {
                    // Push only when something changed: serials or the set's revision.
                    let serials: Vec<String> = entries
                        .iter()
                        .filter_map(|e| e.svid.as_ref().map(|s| s.serial.clone()))
                        .chain(std::iter::once(api.cache.read(|s| s.revision).to_string()))
                        .collect();
                    if last.as_ref() != Some(&serials) {
                        last = Some(serials);
                        if tx.send(Ok(resp)).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        let facts = self.attest(&request)?;
        self.synced().await;
        self.entries_for(&facts)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let cache = self.cache.clone();
        tokio::spawn(push_on_change(cache, tx, |s| {
            (!s.bundle_x509.is_empty()).then(|| X509BundlesResponse {
                crl: Vec::new(),
                bundles: HashMap::from([(
                    format!("spiffe://{}", s.trust_domain),
                    concat(&s.bundle_x509),
                )]),
            })
        }));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        let facts = self.attest(&request)?;
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        self.synced().await;
        let mut entries = self.entries_for(&facts)?;
        if !req.spiffe_id.is_empty() {
            entries.retain(|e| e.spiffe_id == req.spiffe_id);
            if entries.is_empty() {
                return Err(Status::permission_denied(format!(
                    "no identity {} for this caller",
                    req.spiffe_id
                )));
            }
        }
        let mut svids = Vec::new();
        let mut last_err = None;
        for e in entries {
            if !req.audience.iter().all(|a| e.jwt_audiences.contains(a)) {
                continue;
            }
            match super::jwt_svid(&self.cache, &self.upstream, &e.spiffe_id, &req.audience).await {
                Ok(token) => svids.push(Jwtsvid {
                    spiffe_id: e.spiffe_id.clone(),
                    svid: token,
                    hint: e.hint.clone(),
                }),
                Err(err) => last_err = Some(err),
            }
        }
        if svids.is_empty() {
            return Err(match last_err {
                Some(e) => Status::unavailable(format!("could not fetch a JWT-SVID: {e}")),
                None => Status::permission_denied(
                    "no identity of this caller may have a JWT-SVID for these audiences",
                ),
            });
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        check_header(&request)?;
        let facts = self.attest(&request)?;
        self.synced().await;
        self.entries_for(&facts)?;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(push_on_change(self.cache.clone(), tx, |s| {
            jwt_only_jwks(&s.bundle_jwks).map(|jwks| JwtBundlesResponse {
                bundles: HashMap::from([(format!("spiffe://{}", s.trust_domain), jwks)]),
            })
        }));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let facts = self.attest(&request)?;
        self.synced().await;
        self.entries_for(&facts)?;
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let (jwks, td) = self
            .cache
            .read(|s| (s.bundle_jwks.clone(), s.trust_domain.clone()));
        let (spiffe_id, claims) = super::jwt::validate(&req.svid, &req.audience, &jwks, &td)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id,
            claims: Some(super::jwt::to_struct(claims)),
        }))
    }
}

/// The JWT authorities of a SPIFFE bundle JWKS, as JWKS JSON bytes.
fn jwt_only_jwks(jwks: &str) -> Option<Vec<u8>> {
    let v: serde_json::Value = serde_json::from_str(jwks).ok()?;
    let keys: Vec<serde_json::Value> = v["keys"]
        .as_array()?
        .iter()
        .filter(|k| k["use"] == "jwt-svid")
        .cloned()
        .collect();
    serde_json::to_vec(&serde_json::json!({ "keys": keys })).ok()
}

/// Sends `make(state)` now and whenever the state changes to something new.
async fn push_on_change<T: Clone + PartialEq + Send + 'static>(
    cache: Arc<WorkloadCache>,
    tx: tokio::sync::mpsc::Sender<Result<T, Status>>,
    make: impl Fn(&super::State) -> Option<T> + Send + 'static,
) {
    let mut changes = cache.subscribe();
    let mut last: Option<T> = None;
    loop {
        changes.borrow_and_update();
        if let Some(msg) = cache.read(&make)
            && last.as_ref() != Some(&msg)
        {
            last = Some(msg.clone());
            if tx.send(Ok(msg)).await.is_err() {
                return;
            }
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

/// Binds the Workload API socket at `path`: the directory is created
/// 0755, a stale socket (nothing listening) is replaced, a live one is an
/// error; the socket itself is 0777 — every local process may call, and
/// attestation decides what it gets.
pub fn bind(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("{} is in use by another agent", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))?;
    Ok(listener)
}

/// Serves the Workload API on `listener` until `shutdown`.
pub async fn serve(
    api: WorkloadApi,
    listener: tokio::net::UnixListener,
    socket: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_proto::workload::FILE_DESCRIPTOR_SET)
        .build_v1()
        .ok();
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let router = tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(api))
        .add_optional_service(reflection);
    let result = router
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.changed().await;
        })
        .await;
    let _ = std::fs::remove_file(&socket);
    result
}
