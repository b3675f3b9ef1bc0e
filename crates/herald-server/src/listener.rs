//! Accepting connections without letting a client hold the server: a cap
//! on open connections per listener, a deadline on the TLS handshake, on
//! an HTTP request's head (also between keep-alive requests) and on a gRPC
//! connection's first bytes, and an idle timeout on gRPC connections (live
//! clients answer the server's keep-alive pings well within it). A client
//! dribbling its headers is cut off; everyone else is served.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Sleep;
use tokio_rustls::TlsAcceptor;

use crate::config::ListenConfig;
use crate::{HANDSHAKE_TIMEOUT, Shared, wait_shutdown};

/// Connections refused because a listener was at its cap, since start.
pub static CONNECTIONS_REFUSED: AtomicU64 = AtomicU64::new(0);
/// Connections closed for a slow head or idleness, since start.
pub static CONNECTIONS_TIMED_OUT: AtomicU64 = AtomicU64::new(0);

/// A listener's connection budget.
#[derive(Clone)]
pub struct Limits {
    connections: Arc<Semaphore>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

impl Limits {
    /// The limits `cfg` sets, one budget per listener.
    pub fn new(cfg: &ListenConfig) -> Limits {
        Limits {
            connections: Arc::new(Semaphore::new(cfg.max_connections)),
            header_read_timeout: cfg.header_read_timeout,
            idle_timeout: cfg.idle_timeout,
        }
    }

    /// A slot for one more connection, or `None` at the cap.
    fn admit(&self) -> Option<OwnedSemaphorePermit> {
        let permit = self.connections.clone().try_acquire_owned().ok();
        if permit.is_none() {
            CONNECTIONS_REFUSED.fetch_add(1, Ordering::Relaxed);
        }
        permit
    }
}

/// Accepts the next connection within the cap; `None` at shutdown.
async fn accept(
    listener: &TcpListener,
    limits: &Limits,
    shutdown: &watch::Receiver<bool>,
) -> Option<(TcpStream, SocketAddr, OwnedSemaphorePermit)> {
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = wait_shutdown(shutdown.clone()) => return None,
        };
        // Over the cap: closed at once, before any work on its behalf.
        let Some(permit) = limits.admit() else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        return Some((tcp, peer, permit));
    }
}

/// Serves `router` over HTTP/1.1 (over TLS when `tls` is given) until
/// shutdown, within `limits`.
pub async fn serve_http(
    shared: Arc<Shared>,
    router: Router,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) {
    while let Some((tcp, peer, permit)) = accept(&listener, &limits, &shutdown).await {
        let (router, tls, limits, shutdown) = (
            router.clone(),
            tls.clone(),
            limits.clone(),
            shutdown.clone(),
        );
        let shared = shared.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => {
                    let io = FirstHeadCheck::new(tcp, shared, peer);
                    serve_http_conn(io, peer, router, &limits, shutdown).await;
                }
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let io = FirstHeadCheck::new(stream, shared, peer);
                            serve_http_conn(io, peer, router, &limits, shutdown).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => {
                            CONNECTIONS_TIMED_OUT.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(%peer, "TLS handshake timed out");
                        }
                    }
                }
            }
        });
    }
}

async fn serve_http_conn<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    limits: &Limits,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tower::ServiceExt;
    let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        // Handlers learn the caller's address as they would from axum::serve.
        req.extensions_mut()
            .insert(axum::extract::ConnectInfo(peer));
        router.clone().oneshot(req.map(axum::body::Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        () = wait_shutdown(shutdown.clone()) => {
            conn.as_mut().graceful_shutdown();
            let _ = shutdown.changed().await;
            conn.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            CONNECTIONS_TIMED_OUT.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%peer, "HTTP request head not received in time: connection closed");
        } else if e.is_parse() {
            // Hyper has answered a malformed request head with a bare
            // 4xx; count it (its path, and so its shape, is unknown).
            tracing::info!(%peer, error = %e, "malformed HTTP request");
        } else {
            tracing::debug!(%peer, error = %e, "HTTP connection ended");
        }
    }
}

/// Longest request head the first-request check reads (hyper's own limit
/// applies past it).
const MAX_HEAD: usize = 16 * 1024;

/// Checks the first request head of a connection before hyper parses it,
/// so a malformed one (a bad request line or header, an invalid
/// `Content-Length` or `Transfer-Encoding`, an oversized head) is answered
/// in the shape its path's clients parse — STS XML, OAuth JSON — and
/// audited, instead of hyper's bare 400. Later requests on a kept-alive
/// connection are hyper's to judge.
pub struct FirstHeadCheck<T> {
    inner: T,
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// Bytes of the first head seen so far, while checking.
    head: Option<Vec<u8>>,
    /// A refusal being written; the connection ends after it.
    reply: Option<(Vec<u8>, usize)>,
}

impl<T> FirstHeadCheck<T> {
    fn new(inner: T, shared: Arc<Shared>, peer: SocketAddr) -> Self {
        Self {
            inner,
            shared,
            peer,
            head: Some(Vec::new()),
            reply: None,
        }
    }
}

/// Why a complete (or oversized) request head is refused, if it is: the
/// path (when the request line parsed), the code and a message.
fn check_head(head: &[u8]) -> Option<(Option<String>, herald_core::ErrorCode, String)> {
    use herald_core::ErrorCode;
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(head);
    let path = req.path.map(str::to_owned);
    match parsed {
        Err(e) => {
            let code = if e == httparse::Error::TooManyHeaders {
                ErrorCode::RequestTooLarge
            } else {
                ErrorCode::InvalidRequest
            };
            return Some((path, code, format!("malformed request head: {e}")));
        }
        Ok(httparse::Status::Partial) if head.len() >= MAX_HEAD => {
            return Some((
                path,
                ErrorCode::RequestTooLarge,
                format!("the request head exceeds {MAX_HEAD} bytes"),
            ));
        }
        Ok(httparse::Status::Partial) => return None,
        Ok(httparse::Status::Complete(_)) => {}
    }
    let mut lengths = Vec::new();
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).ok().map(str::trim);
            match v.and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if v.is_some_and(|v| v.bytes().all(|b| b.is_ascii_digit())) => {
                    lengths.push(n)
                }
                _ => {
                    return Some((
                        path,
                        ErrorCode::InvalidRequest,
                        "Content-Length is not a number".into(),
                    ));
                }
            }
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.rsplit(',').next().map(str::trim) != Some("chunked") {
                return Some((
                    path,
                    ErrorCode::InvalidRequest,
                    "Transfer-Encoding must end with chunked".into(),
                ));
            }
            if !lengths.is_empty() {
                return Some((
                    path,
                    ErrorCode::InvalidRequest,
                    "both Content-Length and Transfer-Encoding".into(),
                ));
            }
        }
    }
    if lengths.windows(2).any(|w| w[0] != w[1]) {
        return Some((
            path,
            ErrorCode::InvalidRequest,
            "conflicting Content-Length headers".into(),
        ));
    }
    None
}

impl<T: AsyncRead + AsyncWrite + Unpin> FirstHeadCheck<T> {
    /// Refuses the request: audits it (off this task) and queues the
    /// shaped answer.
    fn refuse(&mut self, path: Option<String>, code: herald_core::ErrorCode, message: String) {
        let (status, content_type, body) =
            crate::http_exchange::malformed_head(path.as_deref(), code, &message);
        let reply = format!(
            "HTTP/1.1 {} {}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\n{}: {}\r\nconnection: close\r\n\r\n{body}",
            status.as_u16(),
            status.canonical_reason().unwrap_or(""),
            body.len(),
            crate::status::ERROR_CODE_METADATA,
            code.as_str(),
        );
        self.reply = Some((reply.into_bytes(), 0));
        let (shared, peer) = (self.shared.clone(), self.peer);
        let action = crate::http_exchange::action_of(path.as_deref());
        tokio::spawn(async move {
            let mut run = crate::decision::Run::start(
                &shared,
                action,
                "http",
                Some(peer),
                herald_core::EvidenceType::Oidc,
            );
            let refusal = match run.admit() {
                Err(r) => r,
                Ok(()) => crate::status::Refusal::new(code, message),
            };
            run.refuse(refusal).await;
        });
    }

    /// Writes the queued refusal; `Ready` once it is out.
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.reply {
            if *written == bytes.len() {
                return Pin::new(&mut self.inner).poll_flush(cx);
            }
            match Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(n)) => *written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for FirstHeadCheck<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.reply.is_some() {
            // The refusal went out (or could not): hyper sees the end.
            return match this.poll_reply(cx) {
                Poll::Ready(_) => Poll::Ready(Ok(())),
                Poll::Pending => Poll::Pending,
            };
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(head)) = (&r, this.head.as_mut()) {
            head.extend_from_slice(&buf.filled()[before..]);
            let verdict = check_head(head);
            let complete = head.windows(4).any(|w| w == b"\r\n\r\n");
            match verdict {
                Some((path, code, message)) => {
                    this.head = None;
                    buf.set_filled(before);
                    this.refuse(path, code, message);
                    return match this.poll_reply(cx) {
                        Poll::Ready(_) => Poll::Ready(Ok(())),
                        Poll::Pending => Poll::Pending,
                    };
                }
                // A good first head: hyper takes it from here.
                None if complete || buf.filled().len() == before => this.head = None,
                None => {}
            }
        }
        r
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for FirstHeadCheck<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The gRPC server's incoming connections.
pub type GrpcIncoming = tokio_stream::wrappers::ReceiverStream<
    io::Result<Guarded<tokio_rustls::server::TlsStream<TcpStream>>>,
>;

/// Accepts TLS connections for the gRPC server within `limits`: each
/// connection is a [`Guarded`] stream that holds its slot and enforces the
/// first-bytes deadline and the idle timeout.
pub fn grpc_incoming(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) -> (GrpcIncoming, tokio::task::JoinHandle<()>) {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let accept_task = tokio::spawn(async move {
        while let Some((tcp, peer, permit)) = accept(&listener, &limits, &shutdown).await {
            let (acceptor, tx, limits) = (acceptor.clone(), tx.clone(), limits.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let guarded = Guarded::new(tls, permit, &limits);
                        let _ = tx.send(Ok(guarded)).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => {
                        CONNECTIONS_TIMED_OUT.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    (tokio_stream::wrappers::ReceiverStream::new(rx), accept_task)
}

/// A connection that holds its listener slot until it closes, and fails
/// its reads when the client is silent too long: `first` for the first
/// bytes, `idle` afterwards.
pub struct Guarded<T> {
    inner: T,
    _permit: OwnedSemaphorePermit,
    deadline: Pin<Box<Sleep>>,
    idle: Duration,
}

impl<T> Guarded<T> {
    fn new(inner: T, permit: OwnedSemaphorePermit, limits: &Limits) -> Self {
        Self {
            inner,
            _permit: permit,
            deadline: Box::pin(tokio::time::sleep(limits.header_read_timeout)),
            idle: limits.idle_timeout,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    let next = tokio::time::Instant::now() + self.idle;
                    self.deadline.as_mut().reset(next);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    CONNECTIONS_TIMED_OUT.fetch_add(1, Ordering::Relaxed);
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client sent nothing in time",
                    )))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Guarded<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}
