//! The SPIFFE Workload API on a Unix socket (`proto/spiffe/workload.proto`).
//!
//! Every call: the `workload.spiffe.io: true` metadata or
//! `InvalidArgument`; the caller's uid within its rate limit or
//! `ResourceExhausted` (before any other work); the caller attested from
//! its peer credentials (no TLS, no client auth), as the same process
//! running the same executable as when it connected, or `PermissionDenied`;
//! no matching registration → `PermissionDenied`. Streams send the
//! caller's full state at once and again on every change, and end with
//! `PermissionDenied` if the caller has since executed another program.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use herald_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use herald_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use super::attestor::{AttestError, Attestor, Facts, Peer};
use super::limit::RateLimiter;
use herald_core::Selector;

use super::{Entry, Upstream, WorkloadCache};
use crate::config::WorkloadApiConfig;

/// The metadata every Workload API call must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// How long a first fetch waits for the agent's first sync or first SVIDs.
const FIRST_STATE_WAIT: Duration = Duration::from_secs(30);
/// Longest the first X.509-SVID answer waits for SVIDs still being issued.
const FIRST_COMPLETE_WAIT: Duration = Duration::from_secs(10);

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    cache: Arc<WorkloadCache>,
    upstream: Upstream,
    attestor: Arc<Attestor>,
    limiter: Arc<RateLimiter>,
    kubernetes: Option<Arc<super::k8s::K8sAttestor>>,
}

/// What the agent observed about a connection's peer when it accepted it
/// (tonic hands it to every call on the connection).
#[derive(Debug, Clone)]
pub struct CallerInfo {
    /// The peer's uid, when the kernel gave credentials.
    pub uid: Option<u32>,
    /// The pinned process, or why it could not be pinned.
    pub peer: Result<Arc<Peer>, AttestError>,
}

/// An accepted Workload API connection and its [`CallerInfo`].
#[derive(Debug)]
pub struct CallerStream {
    inner: tokio::net::UnixStream,
    info: CallerInfo,
    /// What the client sends passes through here, so that clients naming
    /// the socket path as `:authority` are served (see `h2_authority`).
    rewriter: super::h2_authority::AuthorityRewriter,
}

impl CallerStream {
    /// Pins the process behind `stream` now, at accept time: what it runs
    /// from here on is compared with this.
    pub fn accept(stream: tokio::net::UnixStream) -> CallerStream {
        let cred = stream.peer_cred().ok();
        let peer = match cred {
            Some(c) => Peer::observe(c.uid(), c.gid(), c.pid()).map(Arc::new),
            None => Err(AttestError::NoCredentials),
        };
        CallerStream {
            inner: stream,
            info: CallerInfo {
                uid: cred.map(|c| c.uid()),
                peer,
            },
            rewriter: super::h2_authority::AuthorityRewriter::new(),
        }
    }
}

impl Connected for CallerStream {
    type ConnectInfo = CallerInfo;

    fn connect_info(&self) -> CallerInfo {
        self.info.clone()
    }
}

impl AsyncRead for CallerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        loop {
            if this.rewriter.has_output() {
                let n = this.rewriter.take(buf.initialize_unfilled());
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            let mut scratch = [0u8; 8192];
            let mut read = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => this.rewriter.feed(read.filled())?,
                other => return other,
            }
        }
    }
}

impl AsyncWrite for CallerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// A refusal for a caller over its rate limit, with Herald's stable code.
fn rate_limited() -> Status {
    let mut status = Status::resource_exhausted(
        "rate_limited: too many Workload API calls from this uid; retry later",
    );
    status.metadata_mut().insert(
        herald_client::ERROR_CODE_METADATA,
        tonic::metadata::MetadataValue::from_static("rate_limited"),
    );
    status
}

/// A refusal with Herald's stable code in `herald-error-code` and as the
/// message's prefix.
fn coded(code: herald_core::ErrorCode, message: String) -> Status {
    let mut status = match code.class() {
        herald_core::error::ErrorClass::Unavailable => Status::unavailable(message),
        _ => Status::permission_denied(message),
    };
    status.metadata_mut().insert(
        herald_client::ERROR_CODE_METADATA,
        tonic::metadata::MetadataValue::from_static(code.as_str()),
    );
    status
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
    /// A service over `cache`, fetching JWT-SVIDs through `upstream`, with
    /// `cfg`'s hashing cap and rate limit.
    pub fn new(cache: Arc<WorkloadCache>, upstream: Upstream, cfg: &WorkloadApiConfig) -> Self {
        #[allow(unused_mut)]
        let mut attestor = Attestor::new(cfg.max_executable_size);
        #[cfg(feature = "test-hooks")]
        if let Some(root) = cfg
            .kubernetes
            .as_ref()
            .and_then(|k| k.test_proc_root.clone())
        {
            attestor = attestor.with_test_proc_root(root);
        }
        Self {
            cache,
            upstream,
            attestor: Arc::new(attestor),
            limiter: Arc::new(super::limit::limiter(cfg.rate_limit)),
            kubernetes: None,
        }
    }

    /// Adds Kubernetes attestation: callers in a pod's container get its
    /// `k8s:*` selectors, or no identity if the kubelet does not list it.
    pub fn with_kubernetes(mut self, k8s: Arc<super::k8s::K8sAttestor>) -> Self {
        self.kubernetes = Some(k8s);
        self
    }

    /// The cache it serves from.
    pub(crate) fn cache(&self) -> &Arc<WorkloadCache> {
        &self.cache
    }

    /// Rate-limits, then attests the caller on a blocking thread.
    pub(crate) async fn attest<T>(&self, req: &Request<T>) -> Result<(Arc<Peer>, Facts), Status> {
        let info = req
            .extensions()
            .get::<CallerInfo>()
            .cloned()
            .ok_or_else(|| Status::permission_denied("no peer credentials on this connection"))?;
        if let Some(uid) = info.uid
            && !self.limiter.allow(uid, Instant::now())
        {
            tracing::debug!(uid, "Workload API call refused: rate limited");
            return Err(rate_limited());
        }
        let refuse = |uid: Option<u32>, pid: Option<i32>, e: AttestError| {
            tracing::warn!(?uid, ?pid, error = %e, "Workload API caller refused");
            Status::permission_denied(e.to_string())
        };
        let peer = info.peer.map_err(|e| refuse(info.uid, None, e))?;
        let known = self.attestor.attest_known(&peer);
        let facts = match known {
            Some(facts) => facts,
            None => {
                let (attestor, p) = (self.attestor.clone(), peer.clone());
                tokio::task::spawn_blocking(move || attestor.attest(&p))
                    .await
                    .map_err(|_| Status::internal("workload attestation failed"))?
            }
        };
        let mut facts = facts.map_err(|e| refuse(Some(peer.uid), Some(peer.pid), e))?;
        if let Some(k8s) = &self.kubernetes {
            let found = k8s.selectors(&facts.cgroup).await.map_err(|e| {
                tracing::warn!(
                    uid = peer.uid,
                    pid = peer.pid,
                    code = %e.code(),
                    error = %e,
                    "Workload API caller refused"
                );
                coded(e.code(), e.to_string())
            })?;
            if !found.is_empty() {
                // The lookup may have taken a while: the selectors are the
                // pinned process's only if it is still there.
                peer.unchanged()
                    .map_err(|e| refuse(Some(peer.uid), Some(peer.pid), e))?;
                facts.selectors.extend(found);
                facts.selectors.sort();
                facts.selectors.dedup();
            }
        }
        Ok((peer, facts))
    }

    pub(crate) async fn synced(&self) {
        self.cache.synced(FIRST_STATE_WAIT).await;
    }

    pub(crate) fn entries_for(&self, facts: &Facts) -> Result<Vec<Arc<Entry>>, Status> {
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

    /// What an X.509 answer stands for — its SVIDs' serials and the
    /// registration set's revision: a stream pushes again only when it
    /// changes.
    fn x509_version(&self, entries: &[Arc<Entry>]) -> Vec<String> {
        entries
            .iter()
            .filter_map(|e| e.svid.as_ref().map(|s| s.serial.clone()))
            .chain(std::iter::once(self.cache.read(|s| s.revision).to_string()))
            .collect()
    }

    fn x509_response(
        &self,
        entries: &[Arc<Entry>],
        facts: &[Selector],
    ) -> Option<X509svidResponse> {
        let (bundle, federated_bundles) = self.cache.read(|s| {
            let federated = s
                .federated_for(facts)
                .into_iter()
                .map(|b| (format!("spiffe://{}", b.trust_domain), concat(&b.x509)))
                .collect::<HashMap<_, _>>();
            (concat(&s.bundle_x509), federated)
        });
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
            federated_bundles,
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
        let (peer, facts) = self.attest(&request).await?;
        self.synced().await;
        // Subscribed before matching: a change after the match shows on
        // the watch, so the first answer, built from this match, is never
        // left standing stale.
        let mut changes = self.cache.subscribe();
        let matched = self.entries_for(&facts)?;
        // The usual call, every SVID already there: its first answer is
        // built here and leaves with the response's headers — one write to
        // the socket and one wake-up of the caller instead of two.
        let first = matched
            .iter()
            .all(|e| e.svid.is_some())
            .then(|| self.x509_response(&matched, &facts.selectors))
            .flatten();
        let (first, mut last, mut matched) = match first {
            Some(resp) => (Some(resp), Some(self.x509_version(&matched)), None),
            None => (None, None, Some(matched)),
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let api = self.clone();
        tokio::spawn(async move {
            // The caller was attested just now: a first answer made here
            // needs no check; every later one does.
            let mut checked = last.is_none();
            if last.is_some() {
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    () = tx.closed() => return,
                }
            }
            // A template instance is issued on first use: the first answer
            // waits (a bounded time) for every SVID the caller is entitled
            // to, so a one-shot fetch gets them all.
            let complete_by = tokio::time::Instant::now() + FIRST_COMPLETE_WAIT;
            loop {
                if !std::mem::take(&mut checked)
                    && let Err(e) = peer.unchanged()
                {
                    tracing::warn!(pid = peer.pid, error = %e, "Workload API stream ended");
                    let _ = tx.send(Err(Status::permission_denied(e.to_string()))).await;
                    return;
                }
                // The first pass answers with what the call matched; later
                // ones mark the watch seen before they match again.
                let entries = match matched.take() {
                    Some(entries) => entries,
                    None => {
                        changes.borrow_and_update();
                        api.cache.matching(&facts.selectors)
                    }
                };
                if entries.is_empty() {
                    let _ = tx
                        .send(Err(Status::permission_denied("no identity issued")))
                        .await;
                    return;
                }
                let incomplete = last.is_none()
                    && entries.iter().any(|e| e.svid.is_none())
                    && tokio::time::Instant::now() < complete_by;
                if incomplete {
                    tokio::select! {
                        r = changes.changed() => if r.is_err() { return },
                        () = tokio::time::sleep_until(complete_by) => {}
                        () = tx.closed() => return,
                    }
                    continue;
                }
                if let Some(resp) = api.x509_response(&entries, &facts.selectors) {
                    let version = api.x509_version(&entries);
                    if last.as_ref() != Some(&version) {
                        last = Some(version);
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
        Ok(Response::new(answered_then(first, rx)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        check_header(&request)?;
        let (peer, facts) = self.attest(&request).await?;
        self.synced().await;
        self.entries_for(&facts)?;
        let selectors = facts.selectors.clone();
        Ok(Response::new(watched(self.cache.clone(), peer, move |s| {
            (!s.bundle_x509.is_empty()).then(|| X509BundlesResponse {
                crl: Vec::new(),
                bundles: s
                    .federated_for(&selectors)
                    .into_iter()
                    .map(|b| (b.trust_domain.as_str(), concat(&b.x509)))
                    .chain(std::iter::once((
                        s.trust_domain.as_str(),
                        concat(&s.bundle_x509),
                    )))
                    .map(|(td, der)| (format!("spiffe://{td}"), der))
                    .collect(),
            })
        })))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        check_header(&request)?;
        let (_, facts) = self.attest(&request).await?;
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
        let (peer, facts) = self.attest(&request).await?;
        self.synced().await;
        self.entries_for(&facts)?;
        let selectors = facts.selectors.clone();
        Ok(Response::new(watched(self.cache.clone(), peer, move |s| {
            let own = jwt_only_jwks(&s.bundle_jwks)?;
            let mut bundles = HashMap::from([(format!("spiffe://{}", s.trust_domain), own)]);
            for b in s.federated_for(&selectors) {
                if let Some(jwks) = jwt_only_jwks(&b.jwks) {
                    bundles.insert(format!("spiffe://{}", b.trust_domain), jwks);
                }
            }
            Some(JwtBundlesResponse { bundles })
        })))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        check_header(&request)?;
        let (_, facts) = self.attest(&request).await?;
        self.synced().await;
        self.entries_for(&facts)?;
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        // The token names its trust domain; it is then verified only with
        // that domain's keys (and its `sub` must stay in that domain).
        let claimed = super::jwt::claimed_trust_domain(&req.svid)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let (jwks, td) = self
            .cache
            .read(|s| {
                if claimed == s.trust_domain {
                    return Some((s.bundle_jwks.clone(), s.trust_domain.clone()));
                }
                s.federated_for(&facts.selectors)
                    .into_iter()
                    .find(|b| b.trust_domain == claimed)
                    .map(|b| (b.jwks.clone(), b.trust_domain.clone()))
            })
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "no bundle for trust domain {claimed}: this caller does not federate with it"
                ))
            })?;
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

/// The stream of `make(state)`: its first answer made now — so it leaves
/// with the response's headers, in one write — then each new one whenever
/// the state changes, while `peer` is still the process that connected.
fn watched<T: Clone + PartialEq + Send + 'static>(
    cache: Arc<WorkloadCache>,
    peer: Arc<Peer>,
    make: impl Fn(&super::State) -> Option<T> + Send + 'static,
) -> BoxStream<T> {
    // Subscribed before the first answer is made: a change after it shows.
    let mut changes = cache.subscribe();
    // The caller was attested just now: the first answer needs no check.
    let first = cache.read(&make);
    let mut last = first.clone();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                () = tx.closed() => return,
            }
            changes.borrow_and_update();
            if let Err(e) = peer.unchanged() {
                tracing::warn!(pid = peer.pid, error = %e, "Workload API stream ended");
                let _ = tx.send(Err(Status::permission_denied(e.to_string()))).await;
                return;
            }
            if let Some(msg) = cache.read(&make)
                && last.as_ref() != Some(&msg)
            {
                last = Some(msg.clone());
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
            }
        }
    });
    answered_then(first, rx)
}

/// A response stream that yields `first` at once — ready when hyper polls
/// the body right after the headers, so both leave in one write — then
/// whatever the stream's task sends on `rx`.
fn answered_then<T: Send + 'static>(
    first: Option<T>,
    rx: tokio::sync::mpsc::Receiver<Result<T, Status>>,
) -> BoxStream<T> {
    Box::pin(
        futures::stream::iter(first.map(Ok)).chain(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
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

/// Serves the Workload API and Envoy SDS on `listener` until `shutdown`.
pub async fn serve(
    api: WorkloadApi,
    sds: super::sds::Sds,
    listener: tokio::net::UnixListener,
    socket: PathBuf,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), tonic::transport::Error> {
    // Reflection in both versions: grpcurl before 1.9 (and other older
    // tools) speak only v1alpha.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_proto::workload::FILE_DESCRIPTOR_SET)
        .build_v1()
        .ok();
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(herald_proto::workload::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .ok();
    use futures::StreamExt;
    // Each connection's peer is pinned as it is accepted, before it can
    // send a request.
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener)
        .map(|accepted| accepted.map(CallerStream::accept));
    let sds = sds.into_service();
    let router = tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(api))
        .add_service(sds)
        .add_optional_service(reflection)
        .add_optional_service(reflection_v1alpha);
    let result = router
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.changed().await;
        })
        .await;
    let _ = std::fs::remove_file(&socket);
    result
}
