//! Accepting connections without letting a client hold the server: a cap
//! on open connections per listener, a deadline on the TLS handshake, on
//! an HTTP request's head (also between keep-alive requests) and body (in
//! `http_exchange::read_body`), on a gRPC connection's first request and on
//! every HTTP/2 frame a client begins, and an idle timeout on gRPC
//! connections (live clients answer the server's keep-alive pings well
//! within it). A client dribbling its headers or body is cut off; everyone
//! else is served. Every HTTP/1 request head is checked before hyper sees
//! it, so a malformed one is refused in its endpoint's shape and audited.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
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
                    let io = HeadCheck::new(tcp, shared, peer);
                    serve_http_conn(io, peer, router, &limits, shutdown).await;
                }
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let io = HeadCheck::new(stream, shared, peer);
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

/// Longest request head accepted: past it, `request_too_large` (431) in
/// the endpoint's shape, before hyper's own, larger limit.
const MAX_HEAD: usize = 16 * 1024;

/// Checks every request head of a connection before hyper parses it, so a
/// malformed one (a bad request line or header, an invalid
/// `Content-Length` or `Transfer-Encoding`, an oversized head) is answered
/// in the shape its path's clients parse — STS XML, OAuth JSON — and
/// audited, instead of hyper's bare 400. It follows the connection from
/// request to request by their bodies' framing (see [`Framing`]), so the
/// second request on a kept-alive connection is checked like the first.
pub struct HeadCheck<T> {
    inner: T,
    shared: Arc<Shared>,
    peer: SocketAddr,
    /// Where the client's byte stream is.
    framing: Framing,
    /// The audit of a refusal, which completes before the refusal is sent
    /// (a client that has its answer can count on the record).
    audit: Option<tokio::task::JoinHandle<()>>,
    /// A refusal being written; the connection ends after it.
    reply: Option<(Vec<u8>, usize)>,
    /// How far the connection is closed.
    closing: Closing,
}

impl<T> HeadCheck<T> {
    fn new(inner: T, shared: Arc<Shared>, peer: SocketAddr) -> Self {
        Self {
            inner,
            shared,
            peer,
            framing: Framing::Head(Vec::new()),
            audit: None,
            reply: None,
            closing: Closing::Open,
        }
    }
}

/// How long a closing HTTP connection still reads what the client sends
/// (and drops it), and how much: closing a socket with unread bytes resets
/// it, which can destroy the answer in flight to a client still sending (a
/// refused head's rest, an unread body).
const LINGER: Duration = Duration::from_secs(1);
/// See [`LINGER`].
const LINGER_BYTES: usize = 64 * 1024;

/// How far a connection is closed.
enum Closing {
    Open,
    /// Our side is shut; the client's bytes are drained until it closes,
    /// the deadline passes or this many more bytes have come.
    Lingering(Pin<Box<Sleep>>, usize),
    Closed,
}

/// Where a connection's request stream is, as the head check follows it
/// from one request to the next.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// In a request head: its bytes so far (at most [`MAX_HEAD`] + 1).
    Head(Vec<u8>),
    /// In a body with this many bytes still to come.
    Length(u64),
    /// In a chunked body.
    Chunked(Chunk),
    /// Past a body it could not follow (hyper refuses it, and closes the
    /// connection): no more checks.
    Lost,
}

/// Where a chunked body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// A chunk's size line: the size so far, whether a digit was seen, and
    /// whether the line is past its digits (an extension).
    Size { size: u64, digits: bool, ext: bool },
    /// Chunk data still to come.
    Data(u64),
    /// The line end after a chunk's data.
    DataEnd,
    /// The trailer lines after the last chunk: the current line's length.
    Trailers(usize),
}

/// How the body of a request with a good head is framed.
#[derive(Debug, PartialEq, Eq)]
enum Body {
    None,
    Length(u64),
    Chunked,
}

/// The check of a request head so far.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// Not complete yet.
    Partial,
    /// A good head of this many bytes, its body framed so.
    Complete(usize, Body),
    /// Refused: the path (when the request line parsed), the code and a
    /// message.
    Refuse(Option<String>, herald_core::ErrorCode, String),
}

/// A refusal found in the bytes of one read.
#[derive(Debug, PartialEq, Eq)]
struct Refused {
    /// Where in the bytes the refused head starts (0 when it began in an
    /// earlier read): what comes before belongs to the request before it.
    at: usize,
    path: Option<String>,
    code: herald_core::ErrorCode,
    message: String,
}

impl Framing {
    /// Follows the client's next bytes; a refusal when a head in them is
    /// refused.
    fn feed(&mut self, mut bytes: &[u8]) -> Option<Refused> {
        let mut offset = 0;
        while !bytes.is_empty() {
            let used = match self {
                Framing::Lost => return None,
                Framing::Head(head) => {
                    let start = head.len();
                    let room = (MAX_HEAD + 1).saturating_sub(start).min(bytes.len());
                    head.extend_from_slice(&bytes[..room]);
                    match check_head(head) {
                        Verdict::Partial => return None,
                        Verdict::Refuse(path, code, message) => {
                            let at = if start == 0 { offset } else { 0 };
                            return Some(Refused {
                                at,
                                path,
                                code,
                                message,
                            });
                        }
                        Verdict::Complete(len, body) => {
                            *self = match body {
                                Body::Length(n) if n > 0 => Framing::Length(n),
                                Body::Chunked => Framing::Chunked(Chunk::Size {
                                    size: 0,
                                    digits: false,
                                    ext: false,
                                }),
                                Body::None | Body::Length(_) => Framing::Head(Vec::new()),
                            };
                            len - start
                        }
                    }
                }
                Framing::Length(left) => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *left -= n as u64;
                    if *left == 0 {
                        *self = Framing::Head(Vec::new());
                    }
                    n
                }
                Framing::Chunked(Chunk::Data(left)) => {
                    let n = usize::try_from(*left)
                        .unwrap_or(usize::MAX)
                        .min(bytes.len());
                    *left -= n as u64;
                    if *left == 0 {
                        *self = Framing::Chunked(Chunk::DataEnd);
                    }
                    n
                }
                Framing::Chunked(chunk) => {
                    *self = match chunk.next(bytes[0]) {
                        Some(Some(next)) => Framing::Chunked(next),
                        Some(None) => Framing::Head(Vec::new()),
                        None => Framing::Lost,
                    };
                    1
                }
            };
            offset += used;
            bytes = &bytes[used..];
        }
        None
    }
}

impl Chunk {
    /// The state after byte `b` outside chunk data: `Some(None)` at the
    /// body's end, `None` when the body is not one hyper would accept.
    /// Lenient where hyper may be strict (a lone LF): hyper refuses those
    /// itself.
    fn next(self, b: u8) -> Option<Option<Chunk>> {
        Some(Some(match (self, b) {
            (Chunk::Size { size, digits, .. }, b'\n') => match (digits, size) {
                (false, _) => return None,
                (true, 0) => Chunk::Trailers(0),
                (true, n) => Chunk::Data(n),
            },
            (Chunk::Size { .. }, b'\r') => self,
            (Chunk::Size { ext: true, .. }, _) => self,
            (Chunk::Size { size, .. }, b) if b.is_ascii_hexdigit() => {
                let digit = u64::from((b as char).to_digit(16)?);
                Chunk::Size {
                    size: size.checked_mul(16)?.checked_add(digit)?,
                    digits: true,
                    ext: false,
                }
            }
            (
                Chunk::Size {
                    size, digits: true, ..
                },
                b';' | b' ' | b'\t',
            ) => Chunk::Size {
                size,
                digits: true,
                ext: true,
            },
            (Chunk::Size { .. }, _) => return None,
            (Chunk::Data(_), _) => return None,
            (Chunk::DataEnd, b'\r') => self,
            (Chunk::DataEnd, b'\n') => Chunk::Size {
                size: 0,
                digits: false,
                ext: false,
            },
            (Chunk::DataEnd, _) => return None,
            (Chunk::Trailers(0), b'\n') => return Some(None),
            (Chunk::Trailers(_), b'\n') => Chunk::Trailers(0),
            (Chunk::Trailers(_), b'\r') => self,
            (Chunk::Trailers(n), _) => Chunk::Trailers(n.saturating_add(1)),
        }))
    }
}

/// The check of a request head so far (`head` may run past its end).
fn check_head(head: &[u8]) -> Verdict {
    use herald_core::ErrorCode;
    let mut headers = [httparse::EMPTY_HEADER; 100];
    let mut req = httparse::Request::new(&mut headers);
    let parsed = req.parse(head);
    let path = req.path.map(str::to_owned);
    let too_large = |path| {
        Verdict::Refuse(
            path,
            ErrorCode::RequestTooLarge,
            format!("the request head exceeds {MAX_HEAD} bytes"),
        )
    };
    let invalid =
        |path, message: &str| Verdict::Refuse(path, ErrorCode::InvalidRequest, message.into());
    let len = match parsed {
        Err(e) => {
            let code = if e == httparse::Error::TooManyHeaders {
                ErrorCode::RequestTooLarge
            } else {
                ErrorCode::InvalidRequest
            };
            return Verdict::Refuse(path, code, format!("malformed request head: {e}"));
        }
        Ok(httparse::Status::Partial) if head.len() > MAX_HEAD => return too_large(path),
        Ok(httparse::Status::Partial) => return Verdict::Partial,
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => return too_large(path),
        Ok(httparse::Status::Complete(n)) => n,
    };
    let mut lengths = Vec::new();
    let mut chunked = false;
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let v = std::str::from_utf8(h.value).ok().map(str::trim);
            match v.and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if v.is_some_and(|v| v.bytes().all(|b| b.is_ascii_digit())) => {
                    lengths.push(n)
                }
                _ => return invalid(path, "Content-Length is not a number"),
            }
        }
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            let v = String::from_utf8_lossy(h.value).to_ascii_lowercase();
            if v.rsplit(',').next().map(str::trim) != Some("chunked") {
                return invalid(path, "Transfer-Encoding must end with chunked");
            }
            chunked = true;
        }
    }
    // Either order: a length beside chunked is how requests are smuggled
    // past a proxy that reads the other one.
    if chunked && !lengths.is_empty() {
        return invalid(path, "both Content-Length and Transfer-Encoding");
    }
    if lengths.windows(2).any(|w| w[0] != w[1]) {
        return invalid(path, "conflicting Content-Length headers");
    }
    let body = match (chunked, lengths.first()) {
        (true, _) => Body::Chunked,
        (false, Some(&n)) => Body::Length(n),
        (false, None) => Body::None,
    };
    Verdict::Complete(len, body)
}

impl<T: AsyncRead + AsyncWrite + Unpin> HeadCheck<T> {
    /// Refuses the request: audits it (off this task; the answer waits for
    /// the record) and queues the shaped answer.
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
        self.audit = Some(tokio::spawn(async move {
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
        }));
    }

    /// Shuts the connection down, then lingers (see [`LINGER`]); `Ready`
    /// once it is closed, whatever the client did.
    fn poll_close(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            match &mut self.closing {
                Closing::Open => match Pin::new(&mut self.inner).poll_shutdown(cx) {
                    Poll::Pending => return Poll::Pending,
                    // Between requests the client owes nothing: an idle
                    // kept-alive connection closes at once.
                    Poll::Ready(Ok(())) if matches!(&self.framing, Framing::Head(h) if h.is_empty()) =>
                    {
                        self.closing = Closing::Closed;
                    }
                    Poll::Ready(Ok(())) => {
                        let deadline = Box::pin(tokio::time::sleep(LINGER));
                        self.closing = Closing::Lingering(deadline, LINGER_BYTES);
                    }
                    Poll::Ready(Err(_)) => self.closing = Closing::Closed,
                },
                Closing::Lingering(deadline, left) => {
                    if *left == 0 || deadline.as_mut().poll(cx).is_ready() {
                        self.closing = Closing::Closed;
                        continue;
                    }
                    let mut scratch = [0u8; 2048];
                    let mut drained = ReadBuf::new(&mut scratch);
                    match Pin::new(&mut self.inner).poll_read(cx, &mut drained) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(())) if !drained.filled().is_empty() => {
                            *left = left.saturating_sub(drained.filled().len());
                        }
                        Poll::Ready(_) => self.closing = Closing::Closed,
                    }
                }
                Closing::Closed => return Poll::Ready(()),
            }
        }
    }

    /// Writes the queued refusal once its audit is done, then closes the
    /// connection; `Ready` once that is done.
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.reply.is_some() {
            // Errors end the answer; the close is attempted all the same.
            ready!(self.poll_write_reply(cx)).ok();
            self.reply = None;
        }
        self.poll_close(cx)
    }

    /// Writes the queued refusal once its audit is done; `Ready` once it
    /// is out.
    fn poll_write_reply(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(audit) = self.audit.as_mut() {
            match Pin::new(audit).poll(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(_) => self.audit = None,
            }
        }
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

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for HeadCheck<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.reply.is_some() || !matches!(this.closing, Closing::Open) {
            // The refusal went out (or could not): hyper sees the end.
            ready!(this.poll_reply(cx));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &r
            && let Some(refused) = this.framing.feed(&buf.filled()[before..])
        {
            this.framing = Framing::Lost;
            // Hyper gets the request before the refused head, if this
            // read carried its end (a pipelining client), and answers it;
            // the refusal goes out on hyper's next read.
            buf.set_filled(before + refused.at);
            this.refuse(refused.path, refused.code, refused.message);
            if refused.at == 0 {
                ready!(this.poll_reply(cx));
                return Poll::Ready(Ok(()));
            }
        }
        r
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for HeadCheck<T> {
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

    /// Hyper's close — after an answer to a request whose body it did not
    /// read, say — lingers too.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_close(cx));
        Poll::Ready(Ok(()))
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
/// its reads when the client is too slow: its first request's headers must
/// be complete within `header_read_timeout` of the handshake, any frame it
/// begins must be finished within `header_read_timeout`, and between
/// frames it may be silent for `idle_timeout`. The first two deadlines are
/// not moved by progress, so a client dribbling a byte at a time is cut
/// off as surely as a silent one.
pub struct Guarded<T> {
    inner: T,
    _permit: OwnedSemaphorePermit,
    deadline: Pin<Box<Sleep>>,
    /// What the deadline is for.
    phase: Phase,
    frames: H2Frames,
    header_read: Duration,
    idle: Duration,
}

/// Which of a gRPC connection's deadlines runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Until the first request's headers are complete (fixed).
    FirstRequest,
    /// Until the frame begun is complete (fixed).
    Frame,
    /// Between frames (moved by every read).
    Idle,
}

impl<T> Guarded<T> {
    fn new(inner: T, permit: OwnedSemaphorePermit, limits: &Limits) -> Self {
        Self {
            inner,
            _permit: permit,
            deadline: Box::pin(tokio::time::sleep(limits.header_read_timeout)),
            phase: Phase::FirstRequest,
            frames: H2Frames::default(),
            header_read: limits.header_read_timeout,
            idle: limits.idle_timeout,
        }
    }

    /// Moves the deadline after `bytes` were read.
    fn advance(&mut self, bytes: &[u8]) {
        self.frames.feed(bytes);
        let now = tokio::time::Instant::now();
        let next = match (
            self.phase,
            self.frames.first_request,
            self.frames.mid_frame(),
        ) {
            (Phase::FirstRequest, false, _) | (Phase::Frame, true, true) => return,
            (_, true, true) => (Phase::Frame, now + self.header_read),
            (_, true, false) => (Phase::Idle, now + self.idle),
            // Unreachable: the first request, once seen, stays seen.
            (_, false, _) => return,
        };
        self.phase = next.0;
        self.deadline.as_mut().reset(next.1);
    }

    /// The read error of a client cut off.
    fn cut_off(&self) -> io::Error {
        CONNECTIONS_TIMED_OUT.fetch_add(1, Ordering::Relaxed);
        let why = match self.phase {
            Phase::FirstRequest => "the client's first request did not arrive in time",
            Phase::Frame => "the client did not finish a frame in time",
            Phase::Idle => "the client sent nothing in time",
        };
        io::Error::new(io::ErrorKind::TimedOut, why)
    }
}

/// Follows the HTTP/2 frames a client sends — the connection preface, then
/// 9-byte frame headers and their payloads — without decoding them: enough
/// to know when its first request's headers are complete and whether it
/// is in the middle of a frame.
#[derive(Debug, Default)]
struct H2Frames {
    /// Bytes of the 24-byte client preface seen.
    preface: usize,
    /// The frame header being read, and how much of it.
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes of the current frame still to come.
    payload_left: u32,
    /// The current frame ends a request's header block.
    ends_headers: bool,
    /// A request's header block has been complete.
    first_request: bool,
}

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n`, the client connection preface.
const H2_PREFACE_LEN: usize = 24;

impl H2Frames {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.preface < H2_PREFACE_LEN {
                let n = (H2_PREFACE_LEN - self.preface).min(bytes.len());
                self.preface += n;
                bytes = &bytes[n..];
            } else if self.payload_left > 0 {
                let n = usize::try_from(self.payload_left)
                    .unwrap_or(usize::MAX)
                    .min(bytes.len());
                // n <= payload_left, a u32.
                self.payload_left -= n as u32;
                bytes = &bytes[n..];
                if self.payload_left == 0 {
                    self.frame_done();
                }
            } else {
                let n = (9 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == 9 {
                    let h = self.header;
                    self.header_len = 0;
                    self.payload_left = u32::from_be_bytes([0, h[0], h[1], h[2]]);
                    let stream = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
                    // HEADERS (1) or CONTINUATION (9) with END_HEADERS (4)
                    // on a request stream.
                    self.ends_headers = matches!(h[3], 1 | 9) && h[4] & 4 != 0 && stream != 0;
                    if self.payload_left == 0 {
                        self.frame_done();
                    }
                }
            }
        }
    }

    fn frame_done(&mut self) {
        self.first_request |= std::mem::take(&mut self.ends_headers);
    }

    /// Part of the preface or of a frame has arrived, not all of it.
    fn mid_frame(&self) -> bool {
        (self.preface > 0 && self.preface < H2_PREFACE_LEN)
            || self.header_len > 0
            || self.payload_left > 0
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
                    // A dribbler is always readable: the fixed deadlines
                    // are checked on every read, not only when it waits.
                    let late = self.phase != Phase::Idle
                        && tokio::time::Instant::now() >= self.deadline.deadline();
                    if late {
                        return Poll::Ready(Err(self.cut_off()));
                    }
                    self.advance(&buf.filled()[before..]);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(self.cut_off())),
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

#[cfg(test)]
mod tests {
    use super::*;
    use herald_core::ErrorCode;

    /// Feeds `reads` one by one; the refusal, with the index of its read.
    fn follow(reads: &[&[u8]]) -> (Framing, Option<(usize, Refused)>) {
        let mut f = Framing::Head(Vec::new());
        for (i, r) in reads.iter().enumerate() {
            if let Some(refused) = f.feed(r) {
                return (f, Some((i, refused)));
            }
        }
        (f, None)
    }

    #[test]
    fn every_head_on_a_connection_is_checked_across_bodies() {
        let bad = b"POST /v1/token HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n";
        // After a length-framed body, in one read (pipelined) and dribbled.
        let first = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nabcde";
        let pipelined = [&first[..], &bad[..]].concat();
        let (_, refused) = follow(&[&pipelined]);
        let (i, r) = refused.unwrap();
        assert_eq!((i, r.at), (0, first.len()));
        assert_eq!(r.path.as_deref(), Some("/v1/token"));
        assert_eq!(r.code, ErrorCode::InvalidRequest);
        let bytes: Vec<&[u8]> = pipelined.chunks(3).collect();
        let (_, refused) = follow(&bytes);
        assert_eq!(refused.unwrap().1.code, ErrorCode::InvalidRequest);
        // After a chunked body with an extension and a trailer.
        let chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nabcde\r\n10\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\n";
        let (_, refused) = follow(&[&chunked[..], &bad[..]]);
        let (i, r) = refused.unwrap();
        assert_eq!((i, r.at), (1, 0));
        // Good requests one after another are passed, and the follower
        // ends each at its head's start.
        let get = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
        let (f, refused) = follow(&[&first[..], &chunked[..], &get[..], &get[..5]]);
        assert!(refused.is_none());
        assert_eq!(f, Framing::Head(get[..5].to_vec()));
        // A chunked body hyper refuses: the follower stops, hyper closes.
        let (f, refused) = follow(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            bad,
        ]);
        assert!(refused.is_none());
        assert_eq!(f, Framing::Lost);
    }

    #[test]
    fn heads_are_refused_for_size_smuggling_and_bad_lengths() {
        let oversized = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(MAX_HEAD));
        // In one read or several: 431's code either way.
        for reads in [
            vec![oversized.as_bytes()],
            oversized.as_bytes().chunks(4096).collect(),
        ] {
            let (_, refused) = follow(&reads);
            assert_eq!(refused.unwrap().1.code, ErrorCode::RequestTooLarge);
        }
        for head in [
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        ] {
            let (_, refused) = follow(&[head.as_bytes()]);
            let r = refused.unwrap_or_else(|| panic!("{head:?} passed")).1;
            assert_eq!(
                (r.code, r.path.as_deref()),
                (ErrorCode::InvalidRequest, Some("/"))
            );
        }
    }

    #[test]
    fn the_h2_follower_sees_the_first_header_block_end() {
        let mut f = H2Frames::default();
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        f.feed(&preface[..10]);
        assert!(f.mid_frame() && !f.first_request);
        f.feed(&preface[10..]);
        assert!(!f.mid_frame());
        // SETTINGS (empty), then HEADERS without END_HEADERS and its
        // CONTINUATION with it, dribbled a byte at a time.
        let frame = |len: u32, kind: u8, flags: u8, stream: u32| {
            let mut v = len.to_be_bytes()[1..].to_vec();
            v.extend([kind, flags]);
            v.extend(stream.to_be_bytes());
            v.extend(std::iter::repeat_n(0u8, len as usize));
            v
        };
        f.feed(&frame(0, 4, 0, 0));
        let headers = frame(3, 1, 0, 1);
        let continuation = frame(2, 9, 4, 1);
        for b in &headers {
            f.feed(&[*b]);
        }
        assert!(!f.first_request && !f.mid_frame());
        for b in &continuation[..continuation.len() - 1] {
            f.feed(&[*b]);
            assert!(f.mid_frame() && !f.first_request);
        }
        f.feed(&continuation[continuation.len() - 1..]);
        assert!(f.first_request && !f.mid_frame());
        // END_HEADERS on stream 0 is no request.
        let mut g = H2Frames::default();
        g.feed(preface);
        g.feed(&frame(1, 1, 4, 0));
        assert!(!g.first_request);
    }
}
