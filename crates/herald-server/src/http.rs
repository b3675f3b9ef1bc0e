//! The plain-HTTP listener: trust bundle, health and readiness, and the
//! HTTP faces of token exchange (see [`crate::http_exchange`]).

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
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
        // Any method: a wrong one is refused in the endpoint's own shape,
        // and audited, like every other refusal.
        .route("/v1/token", any(http_exchange::token_exchange))
        .route("/v1/introspect", any(http_exchange::introspect))
        .route("/", any(http_exchange::sts))
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

/// Serves the routes until shutdown, within the listener limits.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, shutdown: watch::Receiver<bool>) {
    let limits = crate::listener::Limits::new(&shared.config.listen);
    let routes = router(shared.clone());
    crate::listener::serve_http(shared, routes, listener, None, limits, shutdown).await;
}

/// Serves the routes over TLS until shutdown, within the listener limits.
pub async fn serve_tls(
    shared: Arc<Shared>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shutdown: watch::Receiver<bool>,
) {
    let limits = crate::listener::Limits::new(&shared.config.listen);
    let routes = router(shared.clone());
    crate::listener::serve_http(shared, routes, listener, Some(acceptor), limits, shutdown).await;
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

/// The SPIFFE bundle document (also the bundle endpoint's).
pub(crate) async fn bundle_jwks(State(shared): State<Arc<Shared>>) -> Response {
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
    // Only when federating: one small read (no documents) per scrape.
    let checked = if shared.federation().bundles.is_empty() {
        None
    } else {
        match shared.store.federation_checked_at().await {
            Ok(rows) => Some(rows),
            Err(e) => {
                tracing::warn!(error = %e, "federation check times unavailable");
                None
            }
        }
    };
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        shared.metrics.render(&shared, checked.as_deref()),
    )
        .into_response()
}
