//! gRPC messages over [`MAX_MESSAGE_BYTES`](crate::MAX_MESSAGE_BYTES):
//! tonic refuses them while decoding, before any handler runs, with a bare
//! `OutOfRange`. This layer turns that answer into Herald's typed refusal
//! (`request_too_large`, with its `herald-error-code`) and audits it under
//! the method's action, through `decision::Run` like every other refusal.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use herald_core::{ErrorCode, EvidenceType};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::Shared;
use crate::decision::Run;
use crate::status::Refusal;

/// What tonic's decoder says when a message exceeds the configured cap.
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// Wraps every gRPC service of the server.
#[derive(Clone)]
pub struct OversizeLayer {
    shared: Arc<Shared>,
}

impl OversizeLayer {
    /// The layer for `shared`'s server.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl<S> tower::Layer<S> for OversizeLayer {
    type Service = Oversize<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Oversize {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// See [`OversizeLayer`].
#[derive(Clone)]
pub struct Oversize<S> {
    inner: S,
    shared: Arc<Shared>,
}

/// The action an oversized call to `path` is audited under: the one its
/// handler would have used (the exchange's credential kind is unknown
/// until the message is read).
fn action_of(path: &str) -> (&'static str, EvidenceType) {
    let method = path.rsplit('/').next().unwrap_or("");
    match method {
        "MintX509Svid" => ("x509_svid.mint", EvidenceType::JoinToken),
        "RenewX509Svid" => ("x509_svid.renew", EvidenceType::X509Svid),
        "ExchangeToken" => ("exchange", EvidenceType::Oidc),
        "Attest" => ("node.attest", EvidenceType::Tpm),
        "SyncRegistrations" => ("workload.sync", EvidenceType::X509Svid),
        "BatchNewX509Svids" => ("x509_svid.workload", EvidenceType::X509Svid),
        "NewJwtSvid" => ("jwt_svid.workload", EvidenceType::X509Svid),
        "NewCloudCredentials" => ("cloud_credentials.workload", EvidenceType::X509Svid),
        _ => ("grpc.request", EvidenceType::X509Svid),
    }
}

fn peer_of<B>(req: &http::Request<B>) -> Option<SocketAddr> {
    let ext = req.extensions();
    ext.get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.get_ref().remote_addr())
        .or_else(|| {
            ext.get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr)
        })
}

/// Whether tonic answered "message too large": a trailers-only response
/// whose status sits in the headers.
fn too_large<B>(res: &http::Response<B>) -> bool {
    let h = res.headers();
    h.get("grpc-status").is_some_and(|v| v.as_bytes() == b"11")
        && h.get("grpc-message").is_some_and(|m| {
            // grpc-message is percent-encoded; the prefix has no escapes
            // but its spaces may be `%20`.
            let m = String::from_utf8_lossy(m.as_bytes()).replace("%20", " ");
            m.starts_with(TONIC_TOO_LARGE)
        })
}

impl<S, B> tower::Service<http::Request<B>> for Oversize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (action, evidence) = action_of(req.uri().path());
        let peer = peer_of(&req);
        let shared = self.shared.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let res = fut.await?;
            if !too_large(&res) {
                return Ok(res);
            }
            let mut run = Run::start(&shared, action, "grpc", peer, evidence);
            let refusal = run.admit().err().unwrap_or_else(|| {
                Refusal::new(
                    ErrorCode::RequestTooLarge,
                    format!("a message exceeds {} bytes", crate::MAX_MESSAGE_BYTES),
                )
            });
            Ok(run.refuse(refusal).await.to_status().into_http())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tonics_size_refusal_is_rewritten() {
        let res = |status: &str, message: &str| {
            http::Response::builder()
                .header("grpc-status", status)
                .header("grpc-message", message)
                .body(())
                .unwrap()
        };
        assert!(too_large(&res(
            "11",
            "Error,%20decoded%20message%20length%20too%20large:%20found%2070000%20bytes"
        )));
        assert!(too_large(&res(
            "11",
            "Error, decoded message length too large: found 70000 bytes"
        )));
        assert!(!too_large(&res("11", "something else out of range")));
        assert!(!too_large(&res(
            "3",
            "Error, decoded message length too large"
        )));
        assert_eq!(
            action_of("/herald.v1.SvidService/MintX509Svid").0,
            "x509_svid.mint"
        );
    }
}
