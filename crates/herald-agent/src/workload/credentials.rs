//! An ECS-style container-credentials endpoint on loopback, so an AWS SDK
//! in a function runtime gets its workload's scoped session credentials
//! with no code change (`AWS_CONTAINER_CREDENTIALS_FULL_URI`,
//! `AWS_CONTAINER_AUTHORIZATION_TOKEN`).
//!
//! The caller is identified by the kernel, not by what it sends: the
//! loopback TCP connection's owner uid, read from `/proc/net/tcp{,6}`.
//! Registrations whose selectors that uid satisfies and that name a
//! `cloud_role` are served; `GET /v1/credentials/<hint>` picks one when
//! there are several.
//!
//! Loopback is reachable from every browser on the machine, so each
//! request must also show it is no web page's: its `Host` is a loopback
//! name (a DNS-rebinding page sends its own host name; refused 403
//! `host_not_loopback`), and it carries the authorization token, which the
//! endpoint never runs without (401 `unauthorized`). Each uid is
//! rate-limited (429 `rate_limited`) before the token is even compared.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use herald_core::Selector;
use serde_json::json;
use tokio::sync::watch;

use zeroize::Zeroizing;

use super::limit::RateLimiter;
use super::{Upstream, WorkloadCache};
use crate::config::{MIN_TOKEN_LEN, RateLimitConfig};

/// How long a request waits for the agent's first registration sync.
const FIRST_STATE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Clone)]
struct Ctx {
    cache: Arc<WorkloadCache>,
    upstream: Upstream,
    token: Arc<Zeroizing<String>>,
    local: SocketAddr,
    limiter: Arc<RateLimiter>,
}

/// Whether a `Host` header names this machine's loopback: an address in
/// 127.0.0.0/8 (the endpoint may listen on any), `[::1]` or `localhost`
/// (any case), with an optional port. A page that rebinds its own DNS name
/// to 127.0.0.1 still sends that name.
pub fn is_loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6] or [v6]:port
        match rest.split_once(']') {
            Some((v6, tail)) if tail.is_empty() || is_port(tail) => {
                return v6 == "::1";
            }
            _ => return false,
        }
    } else {
        match host.rsplit_once(':') {
            Some((name, port)) if is_port(&format!(":{port}")) => name,
            Some(_) => return false,
            None => host,
        }
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::Ipv4Addr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn is_port(tail: &str) -> bool {
    tail.strip_prefix(':')
        .is_some_and(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
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
    let text = super::attestor::read_proc(table).ok()?;
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
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !is_loopback_host(host) {
        tracing::warn!(
            %peer,
            host = %host.chars().take(64).collect::<String>(),
            "credentials request refused: Host is not loopback (DNS rebinding?)"
        );
        return error(
            StatusCode::FORBIDDEN,
            "host_not_loopback",
            "the Host header must be a loopback address or localhost",
        );
    }
    let Some(uid) = peer_uid(&peer, &ctx.local) else {
        return error(
            StatusCode::FORBIDDEN,
            "no_identity",
            "the caller could not be identified",
        );
    };
    if !ctx.limiter.allow(uid, Instant::now()) {
        tracing::debug!(uid, "credentials request refused: rate limited");
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            "too many requests from this uid; retry later",
        );
    }
    let got = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if aws_lc_rs::constant_time::verify_slices_are_equal(got.as_bytes(), ctx.token.as_bytes())
        .is_err()
    {
        tracing::warn!(uid, "credentials request refused: wrong or missing token");
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "wrong or missing authorization token",
        );
    }
    // The agent may have just started: wait for its first registrations.
    ctx.cache.synced(FIRST_STATE_WAIT).await;
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

/// Serves the endpoint on `listener` until `shutdown`; refuses to start
/// with a token shorter than [`MIN_TOKEN_LEN`].
pub async fn serve(
    cache: Arc<WorkloadCache>,
    upstream: Upstream,
    token: Zeroizing<String>,
    rate_limit: RateLimitConfig,
    listener: tokio::net::TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    if token.chars().count() < MIN_TOKEN_LEN {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "the credentials endpoint needs an authorization token of at least {MIN_TOKEN_LEN} characters"
            ),
        ));
    }
    let local = listener.local_addr()?;
    let ctx = Ctx {
        cache,
        upstream,
        token: Arc::new(token),
        local,
        limiter: Arc::new(super::limit::limiter(rate_limit)),
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

    #[test]
    fn only_loopback_host_names_pass() {
        for ok in [
            "127.0.0.1",
            "127.0.0.1:8790",
            "localhost",
            "LocalHost:80",
            "[::1]",
            "[::1]:8790",
            "127.0.0.2:8790",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "",
            "evil.example",
            "evil.example:8790",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "127.1",
            "0.0.0.0",
            "[::1]evil",
            "[::2]:80",
            "127.0.0.1:",
            "127.0.0.1:80:80",
            "localhost:http",
            "127.0.0.1:123456",
            "::1",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }
}
