//! Herald's server.
//!
//! [`start`] opens the store, loads (or creates) the CA, issues the server's
//! own TLS certificate, and serves:
//! - gRPC over TLS (`herald.v1.SvidService`, `herald.v1.BundleService`);
//! - plain HTTP: `/v1/bundle` (SPIFFE bundle JWKS), `/v1/bundle.pem`,
//!   `/healthz`, `/readyz`.
//!
//! Every issuance takes one path, [`decision`]: a transport starts a
//! [`decision::Run`], a flow ([`flows`], or [`attestation`] for the TPM
//! stream) verifies the evidence and asks policy, and the run authorizes,
//! issues ([`issue`]) and commits. See ARCHITECTURE.md.
#![forbid(unsafe_code)]

pub mod attestation;
pub mod authority;
pub mod bundle_endpoint;
pub mod checkpoint;
pub mod config;
pub mod decision;
pub mod dev_issuer;
pub mod exchange;
pub mod exchange_service;
pub mod federation;
pub mod flows;
pub mod grpc_oversize;
pub mod http;
pub mod http_exchange;
pub mod issue;
mod listener;
pub mod metrics;
pub mod rate_limit;
pub mod replica;
pub mod rotation;
pub mod status;
pub mod svid_service;
pub mod tls;
pub mod workload_service;

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_proto::v1::bundle_service_server::{BundleService, BundleServiceServer};
use herald_proto::v1::svid_service_server::SvidServiceServer;
use herald_proto::v1::token_exchange_service_server::TokenExchangeServiceServer;
use herald_proto::v1::{GetTrustBundleRequest, TrustBundle as TrustBundleMsg};
use herald_store::Store;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

pub use authority::CaState;
pub use config::ServerConfig;

/// Largest gRPC message the server decodes.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Time a client has to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors that stop the server from starting.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Bad or missing configuration.
    #[error("configuration: {0}")]
    Config(String),
    /// The datastore failed.
    #[error("datastore: {0}")]
    Store(#[from] herald_store::StoreError),
    /// The CA failed.
    #[error("CA: {0}")]
    Ca(#[from] herald_ca::CaError),
    /// TLS setup failed.
    #[error("TLS: {0}")]
    Tls(String),
    /// Binding or serving a listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Unix time now, seconds.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The attestation policies and the OIDC verifier their evidence needs.
pub struct PolicyState {
    /// Verifies tokens from the configured issuers (none configured: every
    /// OIDC token is refused).
    pub oidc: Arc<herald_attest::OidcVerifier>,
    /// The policies in effect (hot-reloaded).
    pub policies: Arc<herald_policy::PolicyStore>,
}

impl std::fmt::Debug for PolicyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyState")
            .field("oidc", &self.oidc)
            .finish_non_exhaustive()
    }
}

/// Where the hot-reloaded policy set stands.
#[derive(Debug, Clone, Default)]
pub struct PolicyStatus {
    /// Increases with every accepted change of the policy directory.
    pub generation: u64,
    /// Why the newest change was refused (the previous set stays active).
    pub last_error: Option<String>,
    /// Fingerprint of the directory content last looked at.
    fingerprint: Option<[u8; 32]>,
    /// Fingerprint of the set in effect: what replicas compare.
    active: Option<[u8; 32]>,
}

/// State shared by every request.
#[derive(Debug)]
pub struct Shared {
    /// The datastore.
    pub store: Store,
    /// The configuration in effect.
    pub config: ServerConfig,
    /// Policies; `None` when no policy directory is configured, and then
    /// every issuance is refused (deny by default).
    pub policy: Option<PolicyState>,
    /// The policy set's reload state, for `/v1/policies`.
    pub policy_status: std::sync::Mutex<PolicyStatus>,
    /// Per-caller token buckets for token exchange.
    pub limiter: rate_limit::RateLimiter,
    /// Rate-limited refusals, audited in aggregate.
    pub floods: rate_limit::FloodLog,
    /// The server-wide budget of refusals audited one record each.
    pub refusal_budget: herald_core::rate_limit::RateLimiter<()>,
    /// Prometheus metrics.
    pub metrics: metrics::Metrics,
    /// Bumped whenever the policy set is replaced: node agents' registration
    /// streams wake on it.
    pub policy_generation: watch::Sender<u64>,
    /// Bumped whenever the key ring in effect is replaced (a rotation here
    /// or on another replica): agents' registration streams push the new
    /// bundle on it.
    pub ring_generation: watch::Sender<u64>,
    /// The database's node-ban sequence as last polled: agents'
    /// registration streams recheck their node's standing when it moves.
    pub ban_generation: watch::Sender<u64>,
    /// This replica's name in the shared database (heartbeats, leases).
    pub replica_id: String,
    /// Bumped whenever the federated bundles in effect change: agents'
    /// registration streams push them on it.
    pub federation_generation: watch::Sender<u64>,
    ca: RwLock<Arc<CaState>>,
    federation: RwLock<Arc<federation::FederationState>>,
}

impl Shared {
    /// The first of `names` that is one of the server's own DNS names: an
    /// SVID carrying it would pass for the server with a TLS client that
    /// checks names. Workload registrations with such names are refused
    /// at load, and only they grant DNS names (renewable lineages carry
    /// none): this is the check behind that one, at signing.
    pub fn reserved_dns_name<'a>(&self, names: &'a [String]) -> Option<&'a str> {
        names
            .iter()
            .find(|n| {
                let key = herald_policy::dns_name_key(n);
                self.config
                    .tls
                    .dns_names
                    .iter()
                    .any(|own| herald_policy::dns_name_key(own) == key)
            })
            .map(String::as_str)
    }

    /// The policies and OIDC verifier; refused when none are configured.
    pub fn policy_state(&self) -> Result<&PolicyState, status::Refusal> {
        self.policy.as_ref().ok_or_else(|| {
            status::Refusal::new(
                herald_core::ErrorCode::PolicyDenied,
                "no policy directory is configured: every issuance is refused (deny by default)",
            )
        })
    }

    /// The policy set in effect; refused when none is configured.
    pub fn policies(&self) -> Result<Arc<herald_policy::PolicySet>, status::Refusal> {
        Ok(self.policy_state()?.policies.current())
    }

    /// The CA state in effect now.
    pub fn ca(&self) -> Arc<CaState> {
        match self.ca.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Hex SHA-256 of the policy set in effect (empty without policies) and
    /// this replica's policy generation.
    pub fn policy_digest(&self) -> (String, u64) {
        let status = match self.policy_status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        (
            status.active.map(hex::encode).unwrap_or_default(),
            status.generation,
        )
    }

    /// The federated bundles in effect now.
    pub fn federation(&self) -> Arc<federation::FederationState> {
        match self.federation.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts reloaded federated bundles in effect and wakes the agents'
    /// registration streams.
    pub fn set_federation(&self, state: Arc<federation::FederationState>) {
        match self.federation.write() {
            Ok(mut g) => *g = state,
            Err(poisoned) => *poisoned.into_inner() = state,
        }
        self.federation_generation.send_modify(|g| *g += 1);
    }

    /// Puts a reloaded key ring in effect and wakes whoever pushes bundles.
    pub fn set_ca(&self, state: Arc<CaState>) {
        match self.ca.write() {
            Ok(mut g) => *g = state,
            Err(poisoned) => *poisoned.into_inner() = state,
        }
        self.ring_generation.send_modify(|g| *g += 1);
    }
}

/// A running server.
pub struct RunningServer {
    /// The bound gRPC address.
    pub grpc_addr: SocketAddr,
    /// The bound HTTP address.
    pub http_addr: SocketAddr,
    /// The bound HTTPS address, when configured.
    pub https_addr: Option<SocketAddr>,
    /// The bound bundle endpoint address, when configured.
    pub bundle_endpoint_addr: Option<SocketAddr>,
    /// The DEV-ONLY OIDC issuer's URL (`--dev` only).
    pub dev_issuer: Option<String>,
    /// State, for in-process callers (tests, benchmarks).
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// Stops accepting, lets in-flight requests finish, and flushes the store.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        self.shared.store.close().await;
    }
}

fn listener_ips(cfg: &ServerConfig) -> Vec<IpAddr> {
    let mut ips = Vec::new();
    for addr in [cfg.listen.grpc, cfg.listen.http]
        .into_iter()
        .chain(cfg.listen.https)
    {
        let ip = addr.ip();
        if ip.is_unspecified() {
            ips.push(IpAddr::from([127, 0, 0, 1]));
        } else if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    ips.dedup();
    ips
}

/// Starts the server; returns once both listeners are bound.
pub async fn start(config: ServerConfig) -> Result<RunningServer, ServerError> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| ServerError::Config(format!("{}: {e}", config.data_dir.display())))?;
    let store = Store::open(&config.database_url()).await?;
    let kek = authority::load_kek(&config)?;
    let now = unix_now();
    let ca_state = authority::load_or_create(&store, &config, &kek, now).await?;
    // Kept for the key-ring refresh and rotation (sealed keys are opened
    // when a rotation puts them in effect).
    let kek = Arc::new(kek);
    write_bundle_file(&config, &ca_state)?;

    let ips = listener_ips(&config);
    let identity =
        ca_state
            .ca
            .issue_server_identity(&config.tls.dns_names, &ips, config.tls.ttl, now)?;
    let cert = Arc::new(tls::RotatingCert::new(
        &identity.cert_chain,
        &identity.key_pkcs8,
    )?);
    let acceptor = TlsAcceptor::from(Arc::new(tls::server_config(cert.clone())?));
    let cert_for_https = cert.clone();

    let grpc_listener = TcpListener::bind(config.listen.grpc).await?;
    let http_listener = TcpListener::bind(config.listen.http).await?;
    let grpc_addr = grpc_listener.local_addr()?;
    let http_addr = http_listener.local_addr()?;
    let https_listener = match config.listen.https {
        Some(addr) => Some(TcpListener::bind(addr).await?),
        None => None,
    };
    let https_addr = match &https_listener {
        Some(l) => Some(l.local_addr()?),
        None => None,
    };
    let bundle_endpoint = match &config.federation.bundle_endpoint {
        Some(ep) => {
            let resolver: Arc<dyn rustls::server::ResolvesServerCert> =
                match (&ep.cert_file, &ep.key_file) {
                    (Some(c), Some(k)) => Arc::new(bundle_endpoint::FileCert::new(c, k)?),
                    _ => cert.clone(),
                };
            Some((TcpListener::bind(ep.listen).await?, resolver))
        }
        None => None,
    };
    let bundle_endpoint_addr = match &bundle_endpoint {
        Some((l, _)) => Some(l.local_addr()?),
        None => None,
    };

    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut config = config;
    if config.jwt.issuer.is_none() {
        // The bound address, not the configured one: port 0 means "any".
        config.jwt.issuer = Some(format!("http://{http_addr}"));
    }
    // DEV ONLY: the local OIDC issuer serves before the verifier exists
    // (which may fetch its discovery document), and its policy joins the
    // directory's.
    let mut dev_policies = Vec::new();
    let mut dev_task = None;
    let mut dev_issuer_url = None;
    if config.dev_issuer {
        let dev = dev_issuer::start(&config).await?;
        config.oidc.issuers.push(dev.issuer_config());
        dev_policies.push(dev.policy_source());
        dev_issuer_url = Some(dev.url().to_owned());
        dev_task = Some(dev.serve(shutdown.subscribe()));
    }
    let policy = policy_state(&config, dev_policies)?;
    let fingerprint = config.policy.dir.as_deref().map(policy_fingerprint);
    let limiter = rate_limit::RateLimiter::new(
        config.rate_limit.per_caller_rate,
        config.rate_limit.per_caller_burst,
        rate_limit::MAX_CALLERS,
    );
    let federation_sequence = store.sequences().await?.federation;
    let federated = federation::FederationState::load(&store, federation_sequence).await?;
    for t in &config.federation.trust_domains {
        if t.url.is_none() && federated.bundle(&t.trust_domain).is_none() {
            tracing::warn!(trust_domain = %t.trust_domain, "federated trust domain has no url and no bundle: set one with `herald federation set`");
        }
    }
    let shared = Arc::new(Shared {
        federation_generation: watch::Sender::new(1),
        federation: RwLock::new(Arc::new(federated)),
        limiter,
        floods: rate_limit::FloodLog::default(),
        refusal_budget: herald_core::rate_limit::RateLimiter::new(
            config.rate_limit.refusal_audit_rate,
            config.rate_limit.refusal_audit_burst,
            1,
        ),
        metrics: metrics::Metrics::new(),
        policy_generation: watch::Sender::new(1),
        ring_generation: watch::Sender::new(1),
        ban_generation: watch::Sender::new(0),
        replica_id: replica::new_id(),
        store,
        config,
        policy,
        policy_status: std::sync::Mutex::new(PolicyStatus {
            generation: 1,
            last_error: None,
            fingerprint,
            active: fingerprint,
        }),
        ca: RwLock::new(ca_state),
    });
    let tasks = vec![
        tokio::spawn(serve_grpc(
            shared.clone(),
            grpc_listener,
            acceptor,
            shutdown_rx.clone(),
        )),
        tokio::spawn(http::serve(
            shared.clone(),
            http_listener,
            shutdown_rx.clone(),
        )),
        tokio::spawn(rotate_server_cert(
            shared.clone(),
            cert,
            ips,
            identity.not_after,
            shutdown_rx.clone(),
        )),
        tokio::spawn(replica::run(
            shared.clone(),
            grpc_addr.to_string(),
            shutdown_rx.clone(),
        )),
        tokio::spawn(checkpoint::run(shared.clone(), shutdown_rx.clone())),
        tokio::spawn(rate_limit::report(shared.clone(), shutdown_rx.clone())),
        tokio::spawn(federation::run(shared.clone(), shutdown_rx.clone())),
        tokio::spawn(rotation::run(shared.clone(), kek, shutdown_rx)),
    ];

    let mut tasks = tasks;
    tasks.extend(dev_task);
    if let Some(listener) = https_listener {
        let acceptor = TlsAcceptor::from(Arc::new(tls::https_config(cert_for_https)?));
        tasks.push(tokio::spawn(http::serve_tls(
            shared.clone(),
            listener,
            acceptor,
            shutdown.subscribe(),
        )));
    }
    if let Some((listener, resolver)) = bundle_endpoint {
        tasks.push(tokio::spawn(bundle_endpoint::serve(
            shared.clone(),
            listener,
            resolver,
            shutdown.subscribe(),
        )));
    }
    if let Some(p) = &shared.policy {
        tasks.push(tokio::spawn(watch_policies(
            shared.clone(),
            shutdown.subscribe(),
        )));
        tasks.push(tokio::spawn(refresh_jwks(
            p.oidc.clone(),
            shutdown.subscribe(),
        )));
    }
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        https_addr,
        bundle_endpoint_addr,
        dev_issuer: dev_issuer_url,
        shared,
        shutdown,
        tasks,
    })
}

/// Loads the policies (and builds the OIDC verifier their evidence needs)
/// when a policy directory is configured; a broken policy set stops the
/// start. Without one, every issuance is refused.
fn policy_state(
    cfg: &ServerConfig,
    extra: Vec<(std::path::PathBuf, String)>,
) -> Result<Option<PolicyState>, ServerError> {
    let Some(dir) = &cfg.policy.dir else {
        tracing::warn!("no policy.dir: every issuance is refused (deny by default)");
        return Ok(None);
    };
    let opts = herald_policy::LoadOptions {
        trust_domain: cfg.trust_domain.clone(),
        reserved_dns_names: cfg.tls.dns_names.clone(),
    };
    let policies = herald_policy::PolicyStore::with_extra(dir.clone(), extra, opts)
        .map_err(|e| ServerError::Config(format!("policies in {}: {e}", dir.display())))?;
    let verifier = herald_attest::OidcVerifier::new(cfg.oidc.issuers.clone())
        .map_err(|e| ServerError::Config(e.to_string()))?;
    let current = policies.current();
    let unconfigured: Vec<&str> = current
        .oidc_issuers()
        .into_iter()
        .filter(|i| !verifier.issuers().contains(i))
        .collect();
    if cfg.dev && !unconfigured.is_empty() {
        // The example policies name real CI platforms; in dev mode that is
        // expected, and the dev issuer is the one to try.
        tracing::info!(
            issuers = unconfigured.join(", "),
            "dev: example policies name issuers that are not configured; try the dev issuer (herald dev token)"
        );
    } else {
        for issuer in unconfigured {
            tracing::warn!(
                issuer,
                "a policy names an issuer that is not configured under [[oidc.issuers]]"
            );
        }
    }
    tracing::info!(
        policies = current.len(),
        issuers = verifier.issuers().len(),
        "policies loaded"
    );
    Ok(Some(PolicyState {
        oidc: Arc::new(verifier),
        policies: Arc::new(policies),
    }))
}

/// SHA-256 over the names and contents of the directory's policy files
/// (`*.yaml`, `*.yml`; files they refer to, such as EK roots, are not in it).
fn policy_fingerprint(dir: &std::path::Path) -> [u8; 32] {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    names.sort();
    for path in names {
        let is_policy = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if !is_policy {
            continue;
        }
        // The file name, not the path: replicas compare fingerprints.
        let name = path.file_name().unwrap_or_default();
        ctx.update(name.as_encoded_bytes());
        ctx.update(&[0]);
        if let Ok(bytes) = std::fs::read(&path) {
            ctx.update(&(bytes.len() as u64).to_be_bytes());
            ctx.update(&bytes);
        }
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

/// Hot reload: when the policy directory changes, load it; a broken set is
/// refused (logged, shown on `/v1/policies`) and the last good one stays.
async fn watch_policies(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    let (Some(ex), Some(dir)) = (&shared.policy, shared.config.policy.dir.clone()) else {
        return;
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(shared.config.policy.reload_interval) => {}
            () = wait_shutdown(shutdown.clone()) => return,
        }
        let dir2 = dir.clone();
        let Ok(fp) = tokio::task::spawn_blocking(move || policy_fingerprint(&dir2)).await else {
            continue;
        };
        let unchanged = match shared.policy_status.lock() {
            Ok(s) => s.fingerprint == Some(fp),
            Err(p) => p.into_inner().fingerprint == Some(fp),
        };
        if unchanged {
            continue;
        }
        let store = ex.policies.clone();
        let result = tokio::task::spawn_blocking(move || store.reload()).await;
        let mut status = match shared.policy_status.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        };
        status.fingerprint = Some(fp);
        match result {
            Ok(Ok(n)) => {
                status.active = Some(fp);
                status.generation += 1;
                status.last_error = None;
                shared.policy_generation.send_replace(status.generation);
                tracing::info!(
                    policies = n,
                    generation = status.generation,
                    "policies reloaded"
                );
            }
            Ok(Err(e)) => {
                let msg = e.to_string();
                tracing::warn!(error = %msg, "policy reload refused; the previous set stays active");
                status.last_error = Some(msg);
            }
            Err(e) => tracing::error!(error = %e, "policy reload task failed"),
        }
    }
}

/// Refreshes issuers' JWKS on schedule (each issuer's `refresh_interval`),
/// checking once a minute which are due.
async fn refresh_jwks(verifier: Arc<herald_attest::OidcVerifier>, shutdown: watch::Receiver<bool>) {
    loop {
        verifier.refresh_due().await;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(60)) => {}
            () = wait_shutdown(shutdown.clone()) => return,
        }
    }
}

pub(crate) fn write_bundle_file(cfg: &ServerConfig, ca: &CaState) -> Result<(), ServerError> {
    let path = cfg.data_dir.join("bundle.pem");
    let tmp = cfg.data_dir.join(".bundle.pem.tmp");
    std::fs::write(&tmp, ca.bundle.to_pem())?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

pub(crate) async fn wait_shutdown(mut rx: watch::Receiver<bool>) {
    while !*rx.borrow() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

async fn serve_grpc(
    shared: Arc<Shared>,
    tcp: TcpListener,
    acceptor: TlsAcceptor,
    shutdown: watch::Receiver<bool>,
) {
    let limits = listener::Limits::new(&shared.config.listen);
    let (incoming, accept) = listener::grpc_incoming(tcp, acceptor, limits, shutdown.clone());
    let svid = SvidServiceServer::new(svid_service::SvidApi::new(shared.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let exchange =
        TokenExchangeServiceServer::new(exchange_service::ExchangeApi::new(shared.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let attestation =
        herald_proto::v1::node_attestation_service_server::NodeAttestationServiceServer::new(
            attestation::NodeAttestationApi::new(shared.clone()),
        )
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let workloads = herald_proto::v1::workload_service_server::WorkloadServiceServer::new(
        workload_service::WorkloadApi::new(shared.clone()),
    )
    .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let oversize = grpc_oversize::OversizeLayer::new(shared.clone());
    let bundle =
        BundleServiceServer::new(BundleApi { shared }).max_decoding_message_size(MAX_MESSAGE_BYTES);
    let result = tonic::transport::Server::builder()
        .timeout(Duration::from_secs(30))
        .layer(oversize)
        // Pings keep live idle connections (agents' registration streams)
        // reading, inside listen.idle_timeout; dead ones are dropped.
        .http2_keepalive_interval(Some(Duration::from_secs(60)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
        .add_service(svid)
        .add_service(attestation)
        .add_service(workloads)
        .add_service(exchange)
        .add_service(bundle)
        .serve_with_incoming_shutdown(incoming, wait_shutdown(shutdown))
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "gRPC server stopped");
    }
    accept.abort();
}

async fn rotate_server_cert(
    shared: Arc<Shared>,
    cert: Arc<tls::RotatingCert>,
    ips: Vec<IpAddr>,
    mut not_after: i64,
    shutdown: watch::Receiver<bool>,
) {
    loop {
        let now = unix_now();
        let wait = ((not_after - now) / 2).max(30) as u64;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(wait)) => {}
            () = wait_shutdown(shutdown.clone()) => return,
        }
        let cfg = &shared.config;
        match shared.ca().ca.issue_server_identity(
            &cfg.tls.dns_names,
            &ips,
            cfg.tls.ttl,
            unix_now(),
        ) {
            Ok(id) => match cert.replace(&id.cert_chain, &id.key_pkcs8) {
                Ok(()) => {
                    not_after = id.not_after;
                    tracing::info!(not_after, "server certificate rotated");
                }
                Err(e) => tracing::error!(error = %e, "server certificate rotation failed"),
            },
            Err(e) => tracing::error!(error = %e, "server certificate rotation failed"),
        }
    }
}

struct BundleApi {
    shared: Arc<Shared>,
}

#[tonic::async_trait]
impl BundleService for BundleApi {
    async fn get_trust_bundle(
        &self,
        _request: tonic::Request<GetTrustBundleRequest>,
    ) -> Result<tonic::Response<TrustBundleMsg>, tonic::Status> {
        let ca = self.shared.ca();
        let jwks = ca
            .bundle
            .to_jwks()
            .map_err(|e| status::Refusal::from(e).to_status())?;
        Ok(tonic::Response::new(TrustBundleMsg {
            trust_domain: ca.bundle.trust_domain.to_string(),
            x509_authorities: ca.bundle.x509_authorities.clone(),
            jwks: jwks.to_string(),
            sequence: ca.bundle.sequence,
        }))
    }
}
