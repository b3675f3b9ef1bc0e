//! The whole agent as one process runs it: the Workload API (with SDS and
//! the credentials endpoint when configured) and its registration sync and
//! rotation, beside the node identity loop — until the shutdown future
//! completes. `herald agent` and the smaller `herald-agent` binary both
//! start the agent here, so there is one place that wires it.

use std::future::Future;
use std::sync::Arc;

use crate::{Agent, AgentConfig, AgentError, workload};

/// Why the agent could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// A configured listener or attestor could not be set up.
    #[error("config: {0}")]
    Config(String),
    /// The node identity loop failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// A task of the agent's panicked or was cancelled.
    #[error("internal: {0}")]
    Internal(String),
}

impl RunError {
    /// The stable code printed with the error.
    pub fn code(&self) -> &'static str {
        match self {
            RunError::Config(_) => "config",
            RunError::Agent(_) => "agent",
            RunError::Internal(_) => "internal",
        }
    }
}

/// Runs the agent configured by `cfg` until `shutdown` completes, then
/// stops every task and returns how the node identity loop ended.
pub async fn run(cfg: AgentConfig, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let (tx, rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    // The node identity loop suspends the workloads while the node's fresh
    // quote is refused (continuous attestation).
    let mut workload_cache = None;
    if let Some(w) = &cfg.workload_api {
        let listener = workload::api::bind(&w.socket).map_err(|e| {
            RunError::Config(format!("workload_api.socket {}: {e}", w.socket.display()))
        })?;
        let cache =
            workload::WorkloadCache::new(cfg.rotation.renew_fraction, cfg.rotation.jitter_fraction);
        workload_cache = Some(cache.clone());
        let upstream = workload::Upstream::new(
            cfg.servers.clone(),
            cfg.trust_bundle.clone(),
            cfg.svid_dir(),
            cfg.server_id(),
        );
        tasks.push(tokio::spawn(workload::run_sync(
            cache.clone(),
            upstream.clone(),
            rx.clone(),
        )));
        tasks.push(tokio::spawn(workload::run_rotation(
            cache.clone(),
            upstream.clone(),
            rx.clone(),
        )));
        if let Some(c) = &cfg.credentials_endpoint {
            let token = cfg
                .credentials_token()
                .map_err(RunError::Config)?
                .ok_or_else(|| RunError::Config("credentials_endpoint needs its token".into()))?;
            let rate_limit = c.rate_limit;
            let listener = tokio::net::TcpListener::bind(c.listen).await.map_err(|e| {
                RunError::Config(format!("credentials_endpoint.listen {}: {e}", c.listen))
            })?;
            let (cache, upstream, srx) = (cache.clone(), upstream.clone(), rx.clone());
            tasks.push(tokio::spawn(async move {
                if let Err(e) =
                    workload::credentials::serve(cache, upstream, token, rate_limit, listener, srx)
                        .await
                {
                    tracing::error!(error = %e, "the credentials endpoint stopped");
                }
            }));
            tracing::info!(listen = %c.listen, "credentials endpoint listening");
        }
        let mut api = workload::api::WorkloadApi::new(cache, upstream, w);
        if let Some(k) = &w.kubernetes {
            let k8s = workload::k8s::K8sAttestor::new(k).map_err(RunError::Config)?;
            api = api.with_kubernetes(Arc::new(k8s));
            tracing::info!(kubelet = %k.kubelet_url, "Kubernetes workload attestation on");
        }
        let sds = workload::sds::Sds::new(api.clone());
        let socket = w.socket.clone();
        let srx = rx.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = workload::api::serve(api, sds, listener, socket, srx).await {
                tracing::error!(error = %e, "the Workload API stopped");
            }
        }));
        tracing::info!(socket = %w.socket.display(), "Workload API listening");
    }
    let node = tokio::spawn(Agent::new(cfg).with_workloads(workload_cache).run(rx));
    shutdown.await;
    let _ = tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    match node.await {
        Ok(r) => r.map_err(RunError::from),
        Err(e) => Err(RunError::Internal(e.to_string())),
    }
}

/// SIGTERM or Ctrl-C. The SIGTERM handler is installed when this is
/// called, not when it is first awaited: a service manager's SIGTERM sent
/// right after the "ready" line is then a clean shutdown, not the default
/// death by signal.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate()).ok();
    async move {
        match term {
            Some(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            None => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
