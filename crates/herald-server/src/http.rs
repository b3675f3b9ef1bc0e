//! The plain-HTTP listener: trust bundle, health and readiness.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Shared;

/// The HTTP routes.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/v1/bundle", get(bundle_jwks))
        .route("/v1/bundle.pem", get(bundle_pem))
        .with_state(shared)
}

/// Serves the routes until shutdown.
pub async fn serve(shared: Arc<Shared>, listener: TcpListener, shutdown: watch::Receiver<bool>) {
    let app = router(shared);
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(crate::wait_shutdown(shutdown))
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "HTTP server stopped");
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
