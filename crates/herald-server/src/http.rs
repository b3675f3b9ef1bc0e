//! The plain-HTTP listener: trust bundle, health and readiness, and the
//! HTTP faces of token exchange (see [`crate::http_exchange`]).

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{Shared, http_exchange};

/// Largest HTTP request body accepted (a token exchange form with a
/// session policy fits many times over).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The HTTP routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/bundle", get(bundle_jwks))
        .route("/v1/bundle.pem", get(bundle_pem))
        .route("/v1/token", post(http_exchange::token_exchange))
        .route("/v1/introspect", post(http_exchange::introspect))
        .route("/", post(http_exchange::sts))
        .route(
            "/.well-known/openid-configuration",
            get(http_exchange::openid_configuration),
        )
        .route("/.well-known/jwks.json", get(http_exchange::jwks))
        .route("/v1/policies", get(policies))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(shared)
}

/// Serves the routes until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, shutdown: watch::Receiver<bool>) {
    let app = router(shared);
    let app = app.into_make_service_with_connect_info::<std::net::SocketAddr>();
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(crate::wait_shutdown(shutdown))
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server stopped");
    }
}

/// Serves the routes over TLS until shutdown. Handshakes run in their own
/// tasks (bounded by a timeout), so a slow client never holds up accepts.
pub async fn serve_tls(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shutdown: watch::Receiver<bool>,
) {
    let local = listener.local_addr();
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let accept = tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let handshake = acceptor.accept(tcp);
                if let Ok(Ok(tls)) = tokio::time::timeout(crate::HANDSHAKE_TIMEOUT, handshake).await
                {
                    let _ = tx.send((tls, peer)).await;
                }
            });
        }
    });
    // tap_io: axum implements ConnectInfo<SocketAddr> for tapped listeners
    // of any kind, which is how handlers learn the caller's address here.
    let listener =
        axum::serve::ListenerExt::tap_io(TlsListener { rx, local }, |_: &mut TlsConn| {});
    let app = router(shared).into_make_service_with_connect_info::<std::net::SocketAddr>();
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(crate::wait_shutdown(shutdown))
        .await
    {
        tracing::error!(error = %e, "HTTPS server stopped");
    }
    accept.abort();
}

type TlsConn = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;

struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(TlsConn, std::net::SocketAddr)>,
    local: std::io::Result<std::net::SocketAddr>,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsConn;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept loop is gone (shutdown): wait for the graceful
            // shutdown to end the server.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        match &self.local {
            Ok(a) => Ok(*a),
            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
        }
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    match shared.store.ping().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "not ready: datastore");
            (StatusCode::SERVICE_UNAVAILABLE, "datastore unavailable").into_response()
        }
    }
}

async fn bundle_jwks(State(shared): State<Arc<Shared>>) -> Response {
    match shared.ca().bundle.to_jwks() {
        Ok(v) => ([(header::CONTENT_TYPE, "application/json")], v.to_string()).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "bundle encoding failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "bundle unavailable").into_response()
        }
    }
}

async fn bundle_pem(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/x-pem-file")],
        shared.ca().bundle.to_pem(),
    )
        .into_response()
}

/// `GET /v1/policies`: the names of the policies in effect, the reload
/// generation and, if the newest change was refused, why.
async fn policies(State(shared): State<Arc<Shared>>) -> Response {
    let (generation, last_error) = match shared.policy_status.lock() {
        Ok(s) => (s.generation, s.last_error.clone()),
        Err(p) => {
            let s = p.into_inner();
            (s.generation, s.last_error.clone())
        }
    };
    let names: Vec<String> = shared
        .policy
        .as_ref()
        .map(|ex| {
            ex.policies
                .current()
                .names()
                .into_iter()
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::json!({
            "generation": generation,
            "policies": names,
            "last_error": last_error,
        })
        .to_string(),
    )
        .into_response()
}

/// `GET /metrics`: OpenMetrics text.
async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(&shared),
    )
        .into_response()
}
