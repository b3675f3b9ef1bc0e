//! An ECS-style container-credentials endpoint on loopback, so an AWS SDK
//! in a function runtime gets its workload's scoped session credentials
//! with no code change (`AWS_CONTAINER_CREDENTIALS_FULL_URI`,
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN`).
//!
//! The caller is identified by the kernel, not by what it sends: the
//! loopback TCP connection's owner uid, read from `/proc/net/tcp{,6}`.
//! Registrations whose selectors that uid satisfies and that name a
//! `cloud_role` are served; `GET /v1/credentials/<hint>` picks one when
//! there are several. The optional authorization token is an extra check.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use herald_core::Selector;
use serde_json::json;
use tokio::sync::watch;

use super::{Upstream, WorkloadCache};

#[derive(Clone)]
struct Ctx {
    cache: Arc<WorkloadCache>,
    upstream: Upstream,
    token: Option<Arc<String>>,
    local: SocketAddr,
}

fn hex_addr(a: &SocketAddr) -> String {
    match a {
        SocketAddr::V4(v4) => {
            let o = v4.ip().octets();
            format!(
                "{:02X}{:02X}{:02X}{:02X}:{:04X}",
                o[3],
                o[2],
                o[1],
                o[0],
                v4.port()
            )
        }
        SocketAddr::V6(v6) => {
            // /proc/net/tcp6 prints the address as four host-order u32 words.
            let mut s = String::new();
            for chunk in v6.ip().octets().chunks(4) {
                s.push_str(&format!(
                    "{:02X}{:02X}{:02X}{:02X}",
                    chunk[3], chunk[2], chunk[1], chunk[0]
                ));
            }
            format!("{s}:{:04X}", v6.port())
        }
    }
}

/// The uid owning the client end of a loopback connection `peer` → `local`.
pub fn peer_uid(peer: &SocketAddr, local: &SocketAddr) -> Option<u32> {
    let (p, l) = (hex_addr(peer), hex_addr(local));
    let table = if peer.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let text = std::fs::read_to_string(table).ok()?;
    text.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() > 7 && f[1] == p && f[2] == l).then(|| f[7].parse().ok())?
    })
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        axum::Json(json!({ "code": code, "message": message })),
    )
        .into_response()
}

async fn credentials(
    State(ctx): State<Ctx>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    hint: Option<Path<String>>,
) -> Response {
    if let Some(want) = &ctx.token {
        let got = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        if aws_lc_rs::constant_time::verify_slices_are_equal(got.as_bytes(), want.as_bytes())
            .is_err()
        {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "wrong or missing authorization token",
            );
        }
    }
    let Some(uid) = peer_uid(&peer, &ctx.local) else {
        return error(
            StatusCode::FORBIDDEN,
            "no_identity",
            "the caller could not be identified",
        );
    };
    let facts = [Selector::Uid(uid)];
    let mut entries: Vec<_> = ctx
        .cache
        .matching(&facts)
        .into_iter()
        .filter(|e| !e.cloud_role.is_empty())
        .collect();
    if let Some(Path(h)) = &hint {
        entries.retain(|e| &e.hint == h);
    }
    let entry = match entries.as_slice() {
        [one] => one.clone(),
        [] => {
            return error(
                StatusCode::FORBIDDEN,
                "no_identity",
                "no cloud role is registered for this caller",
            );
        }
        _ => {
            return error(
                StatusCode::BAD_REQUEST,
                "ambiguous",
                "several workloads match: ask for /v1/credentials/<hint>",
            );
        }
    };
    let session = if entry.hint.is_empty() {
        "herald-workload".to_owned()
    } else {
        format!("herald-{}", entry.hint)
    };
    match super::cloud_credentials(&ctx.cache, &ctx.upstream, &entry.spiffe_id, &session).await {
        Ok(c) => axum::Json(json!({
            "AccessKeyId": c.access_key_id,
            "SecretAccessKey": c.secret_access_key,
            "Token": c.session_token,
            "Expiration": c.expiration,
            "RoleArn": c.role_arn,
        }))
        .into_response(),
        Err(e) => {
            tracing::warn!(error = %e, spiffe_id = %entry.spiffe_id, "cloud credentials unavailable");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "credentials are unavailable; retry",
            )
        }
    }
}

/// Serves the endpoint on `listener` until `shutdown`.
pub async fn serve(
    cache: Arc<WorkloadCache>,
    upstream: Upstream,
    token: Option<String>,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let ctx = Ctx {
        cache,
        upstream,
        token: token.map(Arc::new),
        local,
    };
    let app = axum::Router::new()
        .route("/v1/credentials", get(credentials))
        .route("/v1/credentials/{hint}", get(credentials))
        .with_state(ctx);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        let _ = shutdown.changed().await;
    })
    .await
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_loopback_connection_is_traced_to_its_owner() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (_s, peer) = l.accept().unwrap();
        assert_eq!(peer, c.local_addr().unwrap());
        let uid: u32 = std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap();
        assert_eq!(peer_uid(&peer, &l.local_addr().unwrap()), Some(uid));
        let elsewhere: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(peer_uid(&elsewhere, &l.local_addr().unwrap()), None);
    }
}
