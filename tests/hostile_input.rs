//! Hostile input against the running binary: every refusal of the HTTP
//! endpoints — parameter and protocol errors, wrong methods, oversized and
//! unreadable bodies, malformed request heads, failed introspection
//! authentication — answered in the shape its clients parse (STS XML,
//! OAuth JSON), with its stable code, and audited; floods refused before
//! any work and audited in aggregate; slow and idle clients cut off while
//! others are served.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;
use herald_store::Store;

fn post(path: &str, body: &str) -> Vec<u8> {
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn sts(params: &str) -> Vec<u8> {
    post("/", params)
}

/// Sends one STS call from the loopback address `from`; the whole response.
async fn sts_from(from: [u8; 4], http: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((from, 0))).unwrap();
    let mut s = socket.connect(http).await.unwrap();
    s.write_all(&sts(STS_OK)).await.unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp).await;
    String::from_utf8_lossy(&resp).into_owned()
}

/// A client of `server` trusting `site`'s bundle, on 127.0.0.1.
async fn client_of(site: &Site, server: &Server) -> herald_client::HeraldClient {
    let anchors = pem_file_certs(&site.bundle_pem());
    herald_client::HeraldClient::connect(&server.url(), &anchors, None)
        .await
        .unwrap()
}

const STS_OK: &str = "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=arn:aws:iam::123456789012:role/deploy&RoleSessionName=ci&WebIdentityToken=eyJhbGciOi.not.a.token";

/// How a refusal must look.
enum Shape {
    /// STS error XML with this `<Code>`.
    Sts(&'static str),
    /// OAuth error JSON with this `error`.
    OAuth(&'static str),
}

struct Case {
    name: &'static str,
    /// A good request answered on the same connection first (keep-alive).
    before: Option<Vec<u8>>,
    request: Vec<u8>,
    shape: Shape,
    code: &'static str,
    /// The HTTP status the endpoint answers.
    status: u16,
}

fn case(
    name: &'static str,
    request: Vec<u8>,
    shape: Shape,
    code: &'static str,
    status: u16,
) -> Case {
    Case {
        name,
        before: None,
        request,
        shape,
        code,
        status,
    }
}

/// A good request that keeps its connection open, answered 200.
const KEEP_ALIVE_GET: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";

/// Sends `before` on a fresh connection, reads its whole answer (which must
/// be 200 and keep the connection open), then sends `request` on the same
/// connection: its (status, head in lowercase, body) as
/// [`raw_http_bytes`] gives them.
fn raw_http_after(
    addr: std::net::SocketAddr,
    before: &[u8],
    request: &[u8],
) -> (u16, String, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(before).unwrap();
    let mut first = Vec::new();
    let mut byte = [0u8; 1];
    while !first.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut byte).unwrap(), 1, "the first answer was cut");
        first.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&first).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).unwrap();
    s.write_all(request).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    parse_http_response(&resp)
}

fn cases() -> Vec<Case> {
    use Shape::*;
    let with = |k: &str, v: &str| {
        let mut pairs: Vec<(String, String)> = serde_urlencoded::from_str(STS_OK).unwrap();
        pairs.retain(|(pk, _)| pk != k);
        pairs.push((k.into(), v.into()));
        sts(&serde_urlencoded::to_string(pairs).unwrap())
    };
    let without = |k: &str| {
        let mut pairs: Vec<(String, String)> = serde_urlencoded::from_str(STS_OK).unwrap();
        pairs.retain(|(pk, _)| pk != k);
        sts(&serde_urlencoded::to_string(pairs).unwrap())
    };
    let rfc = |body: &str| post("/v1/token", body);
    let good_rfc = "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Atoken-exchange&subject_token=abcd&subject_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Ajwt&audience=a";
    let big = "x".repeat(70 * 1024);
    vec![
        case("STS RoleSessionName unicode", with("RoleSessionName", "café-ci"), Sts("InvalidParameterValue"), "invalid_request", 400),
        case("STS RoleSessionName 1 char", with("RoleSessionName", "a"), Sts("InvalidParameterValue"), "invalid_request", 400),
        case("STS RoleSessionName 65 chars", with("RoleSessionName", &"a".repeat(65)), Sts("InvalidParameterValue"), "invalid_request", 400),
        case("STS DurationSeconds 899", with("DurationSeconds", "899"), Sts("InvalidParameterValue"), "invalid_request", 400),
        case("STS DurationSeconds 43201", with("DurationSeconds", "43201"), Sts("InvalidParameterValue"), "invalid_request", 400),
        case("STS DurationSeconds -1", with("DurationSeconds", "-1"), Sts("InvalidParameterValue"), "invalid_request", 400),
        case("STS DurationSeconds 9e2", with("DurationSeconds", "9e2"), Sts("InvalidParameterValue"), "invalid_request", 400),
        case("STS Policy over 2048", with("Policy", &"p".repeat(2049)), Sts("PackedPolicyTooLarge"), "request_too_large", 400),
        case("STS malformed RoleArn", with("RoleArn", "role/deploy"), Sts("InvalidParameterValue"), "invalid_request", 400),
        case("STS missing token", without("WebIdentityToken"), Sts("MissingParameter"), "invalid_request", 400),
        case("STS token over 20000", with("WebIdentityToken", &"t".repeat(20_001)), Sts("InvalidParameterValue"), "invalid_request", 400),
        case("STS unknown Action", with("Action", "GetCallerIdentity"), Sts("InvalidAction"), "invalid_request", 400),
        case("STS missing Action", without("Action"), Sts("MissingAction"), "invalid_request", 400),
        case("STS wrong Version", with("Version", "2020-01-01"), Sts("InvalidParameterValue"), "invalid_request", 400),
        case("STS repeated parameter", sts(&format!("{STS_OK}&RoleSessionName=again")), Sts("InvalidParameterCombination"), "invalid_request", 400),
        case("STS malformed form", sts("Action=%FF%FE&Version=2011-06-15"), Sts("MalformedInput"), "invalid_request", 400),
        case("STS oversized body", sts(&format!("{STS_OK}&Pad={big}")), Sts("RequestEntityTooLarge"), "request_too_large", 413),
        case("STS GET without parameters", b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), Sts("MissingAction"), "invalid_request", 400),
        case("STS PUT", b"PUT / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_vec(), Sts("InvalidAction"), "invalid_request", 405),
        case(
            "STS bad chunk size",
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec(),
            Sts("MalformedInput"),
            "invalid_request",
            400,
        ),
        case(
            "STS bad Content-Length",
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 12abc\r\n\r\nAction=x".to_vec(),
            Sts("MalformedInput"),
            "invalid_request",
            400,
        ),
        case(
            "STS conflicting Content-Length",
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
            Sts("MalformedInput"),
            "invalid_request",
            400,
        ),
        case("RFC 8693 wrong grant", rfc("grant_type=password"), OAuth("unsupported_grant_type"), "invalid_request", 400),
        case("RFC 8693 no subject_token", rfc(&good_rfc.replace("subject_token=abcd&", "")), OAuth("invalid_request"), "invalid_request", 400),
        case("RFC 8693 bad subject_token_type", rfc(&good_rfc.replace("token-type%3Ajwt", "token-type%3Asaml2")), OAuth("invalid_request"), "invalid_request", 400),
        case("RFC 8693 requested_token_type", rfc(&format!("{good_rfc}&requested_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token")), OAuth("invalid_request"), "invalid_request", 400),
        case("RFC 8693 actor without type", rfc(&format!("{good_rfc}&actor_token=x")), OAuth("invalid_request"), "invalid_request", 400),
        case("RFC 8693 no audience", rfc(&good_rfc.replace("&audience=a", "")), OAuth("invalid_target"), "invalid_request", 400),
        case("RFC 8693 repeated parameter", rfc(&format!("{good_rfc}&subject_token=again")), OAuth("invalid_request"), "invalid_request", 400),
        case("RFC 8693 malformed form", rfc("%%%"), OAuth("invalid_request"), "invalid_request", 400),
        case("RFC 8693 oversized body", rfc(&format!("{good_rfc}&pad={big}")), OAuth("invalid_request"), "request_too_large", 413),
        case("RFC 8693 GET", b"GET /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), OAuth("invalid_request"), "invalid_request", 405),
        case(
            "RFC 8693 bad Content-Length",
            b"POST /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: -5\r\n\r\n".to_vec(),
            OAuth("invalid_request"),
            "invalid_request",
            400,
        ),
        case(
            "RFC 8693 bad header",
            b"POST /v1/token HTTP/1.1\r\nHost: x\r\nBad Header: yes\r\n\r\n".to_vec(),
            OAuth("invalid_request"),
            "invalid_request",
            400,
        ),
        case("introspection without a caller", post("/v1/introspect", "token=abc"), OAuth("invalid_client"), "client_unauthenticated", 401),
        case(
            "introspection with a bogus bearer",
            b"POST /v1/introspect HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer eyJ.x.y\r\nContent-Length: 9\r\n\r\ntoken=abc".to_vec(),
            OAuth("invalid_client"),
            "client_unauthenticated",
            401,
        ),
        case(
            "STS Transfer-Encoding with Content-Length",
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n".to_vec(),
            Sts("MalformedInput"),
            "invalid_request",
            400,
        ),
        case(
            "STS oversized head",
            format!("POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: {}\r\nContent-Length: 0\r\n\r\n", "p".repeat(20 * 1024)).into_bytes(),
            Sts("MalformedInput"),
            "request_too_large",
            431,
        ),
        case(
            "RFC 8693 oversized head",
            format!("POST /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\nX-Pad: {}\r\nContent-Length: 0\r\n\r\n", "p".repeat(20 * 1024)).into_bytes(),
            OAuth("invalid_request"),
            "request_too_large",
            431,
        ),
        Case {
            before: Some(KEEP_ALIVE_GET.to_vec()),
            ..case(
                "RFC 8693 malformed second request on a kept-alive connection",
                b"POST /v1/token HTTP/1.1\r\nHost: x\r\nContent-Length: 12abc\r\n\r\n".to_vec(),
                OAuth("invalid_request"),
                "invalid_request",
                400,
            )
        },
        Case {
            before: Some(KEEP_ALIVE_GET.to_vec()),
            ..case(
                "STS oversized second head on a kept-alive connection",
                format!("POST / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n", "p".repeat(20 * 1024)).into_bytes(),
                Sts("MalformedInput"),
                "request_too_large",
                431,
            )
        },
    ]
}

async fn audit_count(store: &Store) -> u64 {
    store.audit_head().await.unwrap().map_or(0, |(seq, _)| seq)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_is_typed_in_its_transports_shape_and_audited() {
    let site = Site::with_extra("[rate_limit]\nper_caller_rate = 0.0\n");
    let server = site.start();
    let store = Store::open(&site.db_url()).await.unwrap();
    let (mut tried, mut refused, mut typed, mut audited) = (0, 0, 0, 0);
    let mut failures = Vec::new();
    for c in cases() {
        tried += 1;
        let before = audit_count(&store).await;
        let (status, head, body) = match &c.before {
            None => raw_http_bytes(server.http, &c.request),
            Some(before) => raw_http_after(server.http, before, &c.request),
        };
        let is_refused = status == c.status;
        let code_ok = head.contains(&format!("herald-error-code: {}", c.code));
        let shape_ok = match &c.shape {
            Shape::Sts(code) => {
                body.starts_with("<ErrorResponse") && body.contains(&format!("<Code>{code}</Code>"))
            }
            Shape::OAuth(error) => {
                serde_json::from_str::<serde_json::Value>(&body).is_ok_and(|v| v["error"] == *error)
            }
        };
        // Refusals made before a handler are audited off the request's
        // task: wait for the record (bounded).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = None;
        while Instant::now() < deadline {
            let now = audit_count(&store).await;
            if now > before {
                last = store.audit_records(now - 1, 1).await.unwrap().pop();
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let audit_ok = last.as_ref().is_some_and(|r| {
            r.event.reason.map(|c| c.as_str()) == Some(c.code) && audit_count_matches(before, r.seq)
        });
        refused += usize::from(is_refused);
        typed += usize::from(code_ok && shape_ok);
        audited += usize::from(audit_ok);
        if !(is_refused && code_ok && shape_ok && audit_ok) {
            failures.push(format!(
                "{}: status {status} (want {}), typed {code_ok}/{shape_ok}, audited {audit_ok} ({:?})\n{head}\n{body}",
                c.name,
                c.status,
                last.map(|r| r.event)
            ));
        }
    }
    // gRPC messages over the server's cap, refused by tonic's decoder
    // before any handler: typed and audited all the same.
    let anchors = herald_client::files::from_pem(
        "CERTIFICATE",
        &std::fs::read_to_string(site.bundle_pem()).unwrap(),
    )
    .unwrap();
    let channel = herald_client::HeraldClient::connect(&server.url(), &anchors, None)
        .await
        .unwrap()
        .channel();
    use herald_proto::v1::{
        ExchangeTokenRequest, MintX509SvidRequest, RenewX509SvidRequest,
        svid_service_client::SvidServiceClient,
        token_exchange_service_client::TokenExchangeServiceClient,
    };
    let big = vec![0u8; 70 * 1024];
    let grpc_cases: Vec<(&str, &str, Result<(), tonic::Status>)> = vec![
        (
            "gRPC mint over 64 KiB",
            "x509_svid.mint",
            SvidServiceClient::new(channel.clone())
                .mint_x509_svid(MintX509SvidRequest {
                    join_token: "x".into(),
                    csr: big.clone(),
                })
                .await
                .map(drop),
        ),
        (
            "gRPC renew over 64 KiB",
            "x509_svid.renew",
            SvidServiceClient::new(channel.clone())
                .renew_x509_svid(RenewX509SvidRequest { csr: big.clone() })
                .await
                .map(drop),
        ),
        (
            "gRPC exchange over 64 KiB",
            "exchange",
            TokenExchangeServiceClient::new(channel.clone())
                .exchange_token(ExchangeTokenRequest {
                    subject_token: "y".repeat(70 * 1024),
                    ..Default::default()
                })
                .await
                .map(drop),
        ),
    ];
    for (name, action, result) in grpc_cases {
        tried += 1;
        let before_records = store.audit_records(0, 1_000_000).await.unwrap();
        let status = result.err();
        let is_refused = status.is_some();
        let code_ok = status.as_ref().is_some_and(|s| {
            s.metadata()
                .get("herald-error-code")
                .is_some_and(|v| v == "request_too_large")
        });
        let audit_ok = before_records.iter().any(|r| {
            r.event.action == action
                && r.event.reason.map(|c| c.as_str()) == Some("request_too_large")
        });
        refused += usize::from(is_refused);
        typed += usize::from(code_ok);
        audited += usize::from(audit_ok);
        if !(is_refused && code_ok && audit_ok) {
            failures.push(format!("{name}: {status:?}, audited {audit_ok}"));
        }
    }
    println!(
        "bad-input matrix: {tried} tried, {refused} refused, {typed} typed, {audited} audited"
    );
    assert!(failures.is_empty(), "{}", failures.join("\n---\n"));
    // Nothing was issued, the server is up, the chain is whole.
    assert_eq!(server.http_get("/healthz").0, 200);
    store.verify_audit_chain(1, None).await.unwrap();
}

/// Exactly one record was written for the request.
fn audit_count_matches(before: u64, seq: u64) -> bool {
    seq == before + 1
}

#[test]
fn slow_and_idle_clients_are_cut_off_while_others_are_served() {
    let site = Site::new();
    extend_section(
        &site.config(),
        "listen",
        "header_read_timeout = \"1s\"\nidle_timeout = \"2s\"\nmax_connections = 8\n",
    );
    let server = site.start();

    // A client dribbling its request head, a byte every 200 ms.
    let slow = std::thread::spawn({
        let addr = server.http;
        move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                .unwrap();
            let started = Instant::now();
            for _ in 0..100 {
                std::thread::sleep(Duration::from_millis(200));
                if s.write_all(b"a").is_err() {
                    break;
                }
                let mut probe = [0u8; 1];
                s.set_nonblocking(true).unwrap();
                let closed = matches!(s.read(&mut probe), Ok(0));
                s.set_nonblocking(false).unwrap();
                if closed {
                    break;
                }
            }
            started.elapsed()
        }
    });
    // Meanwhile everyone else is served.
    for _ in 0..5 {
        assert_eq!(server.http_get("/healthz").0, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    let took = slow.join().unwrap();
    assert!(
        took < Duration::from_secs(15),
        "the dribbling client kept its connection for {took:?}"
    );

    // gRPC: a TLS client that never sends the HTTP/2 preface is closed.
    let mut tls = tls_to(&site, server.grpc).unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let closed = loop {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => break started.elapsed(),
            Ok(_) => {}
        }
    };
    assert!(
        closed < Duration::from_secs(15),
        "silent gRPC client kept for {closed:?}"
    );

    // The connection cap: past it new connections are closed at once.
    let idle: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect(server.http).unwrap())
        .collect();
    let (status, _, _) = raw_http_bytes(
        server.http,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 0, "a connection over the cap is closed unanswered");
    drop(idle);
    // Once they are gone, service resumes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, _, _) = raw_http_bytes(
            server.http,
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "service did not resume");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_is_refused_before_any_work_and_audited_in_aggregate() {
    let site = Site::with_extra(
        "[rate_limit]\nper_caller_rate = 5.0\nper_caller_burst = 10\nreport_interval = \"500ms\"\n",
    );
    let server = site.start();
    let store = Store::open(&site.db_url()).await.unwrap();
    let before = audit_count(&store).await;
    // The flood: 300 STS calls from 127.0.0.2.
    let http = server.http;
    let flood = tokio::spawn(async move {
        let mut statuses = std::collections::BTreeMap::new();
        for _ in 0..300 {
            let text = sts_from([127, 0, 0, 2], http).await;
            let throttled = text.contains("<Code>Throttling</Code>");
            *statuses
                .entry((text.get(9..12).unwrap_or("").to_owned(), throttled))
                .or_insert(0) += 1;
        }
        statuses
    });
    // Meanwhile, a legitimate caller on 127.0.0.1 mints: never throttled.
    let client = client_of(&site, &server).await;
    for i in 0..8 {
        let token = site.token(&format!("spiffe://{TRUST_DOMAIN}/legit/{i}"));
        client
            .mint_x509_svid(
                &token,
                herald_client::keys::generate_key_and_csr().unwrap().csr_der,
            )
            .await
            .unwrap();
    }
    let statuses = flood.await.unwrap();
    let throttled: u32 = statuses
        .iter()
        .filter(|((_, t), _)| *t)
        .map(|(_, n)| n)
        .sum();
    assert!(throttled >= 280, "{statuses:?}");
    // The audit log grew by the legitimate work, the few flood requests the
    // burst admitted (refused one by one), and a handful of aggregates —
    // not by 300 records.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (aggregated, total) = loop {
        let records = store.audit_records(before, 10_000).await.unwrap();
        let summed: u64 = records
            .iter()
            .filter(|r| r.event.action == "rate_limited" && r.event.caller == "peer:127.0.0.2")
            .map(|r| {
                r.event
                    .detail
                    .as_deref()
                    .and_then(|d| d.split(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum();
        if summed >= u64::from(throttled) {
            break (summed, records.len());
        }
        assert!(
            Instant::now() < deadline,
            "aggregates: {summed} of {throttled}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(aggregated, u64::from(throttled));
    assert!(
        total < 60,
        "{total} audit records for a 300-request flood and 8 mints"
    );
    store.verify_audit_chain(1, None).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_many_addresses_is_audited_in_aggregate_past_the_servers_budget() {
    // Every address stays under its own limit; the server-wide refusal
    // audit budget (10 at once, then next to nothing) is what holds.
    let site = Site::with_extra(
        "[rate_limit]\nper_caller_rate = 5.0\nper_caller_burst = 10\nreport_interval = \"500ms\"\nrefusal_audit_rate = 0.001\nrefusal_audit_burst = 10\n",
    );
    let server = site.start();
    let store = Store::open(&site.db_url()).await.unwrap();
    let before = audit_count(&store).await;
    const ADDRESSES: u8 = 30;
    const EACH: u32 = 5;
    let http = server.http;
    let mut refused = 0u32;
    for a in 0..ADDRESSES {
        for _ in 0..EACH {
            let text = sts_from([127, 0, 1, 10 + a], http).await;
            assert!(!text.contains("<Code>Throttling</Code>"), "{a}: {text}");
            assert!(text.contains("<Code>InvalidIdentityToken</Code>"), "{text}");
            refused += 1;
        }
    }
    // A legitimate caller is served while the budget is spent, and its
    // issuance is audited as always.
    let client = client_of(&site, &server).await;
    let token = site.token(&format!("spiffe://{TRUST_DOMAIN}/legit/0"));
    let minted = client
        .mint_x509_svid(
            &token,
            herald_client::keys::generate_key_and_csr().unwrap().csr_der,
        )
        .await
        .unwrap();
    // Every refusal is in the log: 10 one by one, the rest counted by
    // caller, action and code.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (single, aggregated, total) = loop {
        let records = store.audit_records(before, 10_000).await.unwrap();
        let single = records
            .iter()
            .filter(|r| {
                r.event.action == "exchange.cloud_credentials"
                    && r.event.reason == Some(herald_core::ErrorCode::TokenMalformed)
            })
            .count() as u64;
        let aggregated: u64 = records
            .iter()
            .filter(|r| r.event.action == "refusals_aggregated")
            .map(|r| {
                assert_eq!(
                    r.event.reason,
                    Some(herald_core::ErrorCode::RefusalsAggregated)
                );
                assert!(
                    r.event.caller.starts_with("peer:127.0.1."),
                    "{}",
                    r.event.caller
                );
                let d = r.event.detail.as_deref().unwrap();
                assert!(
                    d.contains("exchange.cloud_credentials/token_malformed x"),
                    "{d}"
                );
                d.split(' ').next().unwrap().parse::<u64>().unwrap()
            })
            .sum();
        if single + aggregated >= u64::from(refused) {
            break (single, aggregated, records.len());
        }
        assert!(
            Instant::now() < deadline,
            "single {single} + aggregated {aggregated} of {refused}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(single, 10, "the burst, one record each");
    assert_eq!(single + aggregated, u64::from(refused));
    assert!(
        total <= 10 + usize::from(ADDRESSES) + 5,
        "{total} audit records for {refused} refusals"
    );
    let issued = store.issued(&minted.serial).await.unwrap();
    assert!(issued.is_some(), "the legitimate mint was committed");
    store.verify_audit_chain(1, None).await.unwrap();
}

/// A connection a slow client writes to and probes.
trait Conn: Read + Write {
    fn tcp(&self) -> &TcpStream;
}

impl Conn for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Conn for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn tcp(&self) -> &TcpStream {
        &self.sock
    }
}

/// A TLS connection to `addr` trusting `site`'s bundle, handshake done.
fn tls_to(
    site: &Site,
    addr: std::net::SocketAddr,
) -> std::io::Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let anchors = herald_client::files::from_pem(
        "CERTIFICATE",
        &std::fs::read_to_string(site.bundle_pem()).unwrap(),
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for a in anchors {
        roots
            .add(rustls_pki_types::CertificateDer::from(a))
            .unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls_pki_types::ServerName::IpAddress(addr.ip().into());
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    tls.flush()?; // completes the handshake
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(tls)
}

/// `GET path` over HTTPS on a fresh connection: the status (0 when the
/// connection failed or the answer was not HTTP).
fn https_get(site: &Site, addr: std::net::SocketAddr, path: &str) -> u16 {
    let Ok(mut tls) = tls_to(site, addr) else {
        return 0;
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    if tls.write_all(request.as_bytes()).is_err() {
        return 0;
    }
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    // A server closing without close_notify ends the answer all the same.
    while let Ok(n @ 1..) = tls.read(&mut buf) {
        resp.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&resp)
        .get(9..12)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Writes `prefix`, then `trickle` a byte every 200 ms (over and over)
/// until the server answers or closes; how long that took, and what it
/// answered. Panics past `limit`.
fn dribble(
    conn: &mut dyn Conn,
    prefix: &[u8],
    trickle: &[u8],
    limit: Duration,
) -> (Duration, String) {
    let started = Instant::now();
    conn.write_all(prefix).unwrap();
    conn.flush().unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    for b in trickle.iter().cycle() {
        assert!(
            started.elapsed() < limit,
            "a dribbling client kept its connection for {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(200)); // the client's pace
        if conn.write_all(&[*b]).and_then(|()| conn.flush()).is_err() {
            break;
        }
        conn.tcp().set_nonblocking(true).unwrap();
        let probe = conn.read(&mut buf);
        conn.tcp().set_nonblocking(false).unwrap();
        match probe {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Ok(n @ 1..) => {
                answer.extend_from_slice(&buf[..n]);
                while let Ok(n @ 1..) = conn.read(&mut buf) {
                    answer.extend_from_slice(&buf[..n]);
                }
                break;
            }
            _ => break,
        }
    }
    (
        started.elapsed(),
        String::from_utf8_lossy(&answer).into_owned(),
    )
}

#[test]
fn dribbling_heads_bodies_and_grpc_requests_are_cut_off_while_others_are_served() {
    // An idle timeout far beyond the test: what cuts the dribblers off is
    // the head, body and first-request deadlines, whose clocks progress
    // does not reset.
    let site = Site::new();
    extend_section(
        &site.config(),
        "listen",
        "header_read_timeout = \"1s\"\nbody_read_timeout = \"1s\"\nidle_timeout = \"5m\"\nmax_connections = 8\n",
    );
    let server = site.start();
    let https = server.https.expect("the site listens on HTTPS");
    let limit = Duration::from_secs(15);

    // HTTP: a POST whose body comes a byte every 200 ms.
    let slow_body = std::thread::spawn({
        let addr = server.http;
        move || {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            let head = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 60000\r\n\r\nAction=";
            dribble(&mut s, head, b"a", limit)
        }
    });
    // HTTPS: a request head dribbled after the handshake.
    let slow_head = std::thread::spawn({
        let mut tls = tls_to(&site, https).unwrap();
        move || {
            dribble(
                &mut tls,
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ",
                b"a",
                limit,
            )
        }
    });
    // gRPC: the HTTP/2 preface at once, then the first request's HEADERS
    // frame a byte at a time (each byte keeps the connection from idling).
    let slow_grpc = std::thread::spawn({
        let mut tls = tls_to(&site, server.grpc).unwrap();
        move || {
            let headers = [&[0u8, 0, 64, 1, 4, 0, 0, 0, 1][..], &[0u8; 64]].concat();
            dribble(
                &mut tls,
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0",
                &headers,
                limit,
            )
        }
    });
    // Meanwhile everyone else is served, on every listener.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let grpc_client = rt.block_on(client_of(&site, &server));
    let mut served = 0;
    while ![&slow_body, &slow_head].iter().all(|t| t.is_finished()) || !slow_grpc.is_finished() {
        assert_eq!(server.http_get("/healthz").0, 200);
        assert_eq!(https_get(&site, https, "/healthz"), 200);
        let bundle = rt.block_on(grpc_client.trust_bundle()).unwrap();
        assert!(!bundle.x509_authorities.is_empty());
        served += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(served > 0);
    let (body_took, answer) = slow_body.join().unwrap();
    let (head_took, _) = slow_head.join().unwrap();
    let (grpc_took, _) = slow_grpc.join().unwrap();
    println!(
        "slow clients cut off after: HTTP body {body_took:?}, HTTPS head {head_took:?}, gRPC first request {grpc_took:?} (deadlines 1s)"
    );
    for took in [body_took, head_took, grpc_took] {
        assert!(
            took >= Duration::from_millis(800),
            "cut off before its deadline: {took:?}"
        );
        assert!(took < Duration::from_secs(5), "kept for {took:?}");
    }
    // The slow body is refused in its endpoint's shape, typed and audited.
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let lower = answer.to_ascii_lowercase();
    assert!(
        lower.contains("herald-error-code: request_timeout"),
        "{answer}"
    );
    assert!(lower.contains("connection: close"), "{answer}");
    assert!(answer.contains("<Code>RequestTimeout</Code>"), "{answer}");
    rt.block_on(async {
        let store = Store::open(&site.db_url()).await.unwrap();
        let records = store.audit_records(0, 100_000).await.unwrap();
        assert!(
            records
                .iter()
                .any(|r| r.event.action == "exchange.cloud_credentials"
                    && r.event.reason == Some(herald_core::ErrorCode::RequestTimeout)),
            "no request_timeout audit record"
        );
    });

    // The HTTPS connection cap: past it new connections are closed at once
    // (before the handshake), and service resumes once they are gone.
    let held: Vec<TcpStream> = (0..8).map(|_| TcpStream::connect(https).unwrap()).collect();
    assert_eq!(
        https_get(&site, https, "/healthz"),
        0,
        "a connection over the cap was served"
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while https_get(&site, https, "/healthz") != 200 {
        assert!(Instant::now() < deadline, "HTTPS service did not resume");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_entry_point_is_rate_limited_per_caller_before_any_work_and_audited_in_aggregate() {
    use herald_proto::v1::{
        AttestHello, AttestRequest, BatchNewX509SvidsRequest, MintX509SvidRequest,
        RenewX509SvidRequest, WorkloadSvidRequest, attest_request,
        node_attestation_service_client::NodeAttestationServiceClient,
        svid_service_client::SvidServiceClient, workload_service_client::WorkloadServiceClient,
    };
    let site = Site::with_extra(
        "[rate_limit]\nper_caller_rate = 0.001\nper_caller_burst = 1\nreport_interval = \"300ms\"\n",
    );
    let server = site.start();
    let store = Store::open(&site.db_url()).await.unwrap();
    let token = site.token(&format!("spiffe://{TRUST_DOMAIN}/limited"));
    let client = client_of(&site, &server).await;
    let channel = client.channel();
    let code = |s: &tonic::Status| {
        s.metadata()
            .get("herald-error-code")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    // The caller's one admitted call, refused for its own reason: the
    // checks run while the caller is within its limit.
    let err = SvidServiceClient::new(channel.clone())
        .renew_x509_svid(RenewX509SvidRequest { csr: vec![1] })
        .await
        .unwrap_err();
    assert_eq!(code(&err), "mtls_required");
    let before = audit_count(&store).await;

    // Past the limit each entry point answers rate_limited, not what its
    // evidence would have earned: a valid join token (an SVID), no client
    // certificate (mtls_required), no caller (401), a bogus TPM hello.
    let kc = herald_client::keys::generate_key_and_csr().unwrap();
    let mint = SvidServiceClient::new(channel.clone())
        .mint_x509_svid(MintX509SvidRequest {
            join_token: token.clone(),
            csr: kc.csr_der.clone(),
        })
        .await;
    let renew = SvidServiceClient::new(channel.clone())
        .renew_x509_svid(RenewX509SvidRequest {
            csr: kc.csr_der.clone(),
        })
        .await;
    let batch = WorkloadServiceClient::new(channel.clone())
        .batch_new_x509_svids(BatchNewX509SvidsRequest {
            requests: vec![WorkloadSvidRequest::default()],
        })
        .await;
    let hello = AttestRequest {
        step: Some(attest_request::Step::Hello(AttestHello {
            ek_public: vec![1, 2, 3],
            ..Default::default()
        })),
    };
    let attest = async {
        let mut stream = NodeAttestationServiceClient::new(channel.clone())
            .attest(tokio_stream::iter(vec![hello]))
            .await?
            .into_inner();
        stream.message().await.map(drop)
    }
    .await;
    for (what, result) in [
        ("mint", mint.map(drop)),
        ("renew", renew.map(drop)),
        ("workload batch", batch.map(drop)),
        ("attestation stream", attest),
    ] {
        let err = result.expect_err(what);
        assert_eq!(code(&err), "rate_limited", "{what}: {err:?}");
    }
    let (status, head, body) = raw_http_bytes(server.http, &post("/v1/introspect", "token=abc"));
    assert_eq!(status, 429, "{body}");
    assert!(head.contains("herald-error-code: rate_limited"), "{head}");
    // Before any store work: the join token is unused.
    let tokens = store.list_join_tokens().await.unwrap();
    assert!(tokens.iter().all(|t| t.used_at.is_none()), "{tokens:?}");

    // Audited in aggregate: the caller's rate_limited record counts each
    // entry point; none was written on its own.
    let wanted = [
        "x509_svid.mint x1",
        "x509_svid.renew x1",
        "x509_svid.workload x1",
        "node.attest x1",
        "introspect x1",
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    let records = loop {
        let records = store.audit_records(before, 10_000).await.unwrap();
        let counted: u64 = records
            .iter()
            .filter(|r| r.event.action == "rate_limited")
            .map(|r| {
                let d = r.event.detail.as_deref().unwrap_or_default();
                d.split(' ').next().unwrap_or("0").parse::<u64>().unwrap()
            })
            .sum();
        if counted >= 5 {
            assert_eq!(counted, 5);
            break records;
        }
        assert!(Instant::now() < deadline, "aggregated: {records:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let summary = records
        .iter()
        .filter(|r| r.event.action == "rate_limited")
        .map(|r| {
            assert_eq!(r.event.reason, Some(herald_core::ErrorCode::RateLimited));
            assert_eq!(r.event.caller, "peer:127.0.0.1");
            r.event.detail.clone().unwrap()
        })
        .collect::<Vec<_>>()
        .join("; ");
    for w in wanted {
        assert!(summary.contains(w), "{w} not in {summary}");
    }
    assert!(
        records.iter().all(|r| r.event.action == "rate_limited"),
        "written one by one: {:?}",
        records.iter().map(|r| &r.event.action).collect::<Vec<_>>()
    );
    store.verify_audit_chain(1, None).await.unwrap();
}
