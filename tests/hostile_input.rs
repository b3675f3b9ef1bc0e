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
    request: Vec<u8>,
    shape: Shape,
    code: &'static str,
}

fn case(name: &'static str, request: Vec<u8>, shape: Shape, code: &'static str) -> Case {
    Case {
        name,
        request,
        shape,
        code,
    }
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
        case("STS RoleSessionName unicode", with("RoleSessionName", "café-ci"), Sts("InvalidParameterValue"), "invalid_request"),
        case("STS RoleSessionName 1 char", with("RoleSessionName", "a"), Sts("InvalidParameterValue"), "invalid_request"),
        case("STS RoleSessionName 65 chars", with("RoleSessionName", &"a".repeat(65)), Sts("InvalidParameterValue"), "invalid_request"),
        case("STS DurationSeconds 899", with("DurationSeconds", "899"), Sts("InvalidParameterValue"), "invalid_request"),
        case("STS DurationSeconds 43201", with("DurationSeconds", "43201"), Sts("InvalidParameterValue"), "invalid_request"),
        case("STS DurationSeconds -1", with("DurationSeconds", "-1"), Sts("InvalidParameterValue"), "invalid_request"),
        case("STS DurationSeconds 9e2", with("DurationSeconds", "9e2"), Sts("InvalidParameterValue"), "invalid_request"),
        case("STS Policy over 2048", with("Policy", &"p".repeat(2049)), Sts("PackedPolicyTooLarge"), "request_too_large"),
        case("STS malformed RoleArn", with("RoleArn", "role/deploy"), Sts("InvalidParameterValue"), "invalid_request"),
        case("STS missing token", without("WebIdentityToken"), Sts("MissingParameter"), "invalid_request"),
        case("STS token over 20000", with("WebIdentityToken", &"t".repeat(20_001)), Sts("InvalidParameterValue"), "invalid_request"),
        case("STS unknown Action", with("Action", "GetCallerIdentity"), Sts("InvalidAction"), "invalid_request"),
        case("STS missing Action", without("Action"), Sts("MissingAction"), "invalid_request"),
        case("STS wrong Version", with("Version", "2020-01-01"), Sts("InvalidParameterValue"), "invalid_request"),
        case("STS repeated parameter", sts(&format!("{STS_OK}&RoleSessionName=again")), Sts("InvalidParameterCombination"), "invalid_request"),
        case("STS malformed form", sts("Action=%FF%FE&Version=2011-06-15"), Sts("MalformedInput"), "invalid_request"),
        case("STS oversized body", sts(&format!("{STS_OK}&Pad={big}")), Sts("RequestEntityTooLarge"), "request_too_large"),
        case("STS GET without parameters", b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), Sts("MissingAction"), "invalid_request"),
        case("STS PUT", b"PUT / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 0\r\n\r\n".to_vec(), Sts("InvalidAction"), "invalid_request"),
        case(
            "STS bad chunk size",
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".to_vec(),
            Sts("MalformedInput"),
            "invalid_request",
        ),
        case(
            "STS bad Content-Length",
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 12abc\r\n\r\nAction=x".to_vec(),
            Sts("MalformedInput"),
            "invalid_request",
        ),
        case(
            "STS conflicting Content-Length",
            b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd".to_vec(),
            Sts("MalformedInput"),
            "invalid_request",
        ),
        case("RFC 8693 wrong grant", rfc("grant_type=password"), OAuth("unsupported_grant_type"), "invalid_request"),
        case("RFC 8693 no subject_token", rfc(&good_rfc.replace("subject_token=abcd&", "")), OAuth("invalid_request"), "invalid_request"),
        case("RFC 8693 bad subject_token_type", rfc(&good_rfc.replace("token-type%3Ajwt", "token-type%3Asaml2")), OAuth("invalid_request"), "invalid_request"),
        case("RFC 8693 requested_token_type", rfc(&format!("{good_rfc}&requested_token_type=urn%3Aietf%3Aparams%3Aoauth%3Atoken-type%3Aaccess_token")), OAuth("invalid_request"), "invalid_request"),
        case("RFC 8693 actor without type", rfc(&format!("{good_rfc}&actor_token=x")), OAuth("invalid_request"), "invalid_request"),
        case("RFC 8693 no audience", rfc(&good_rfc.replace("&audience=a", "")), OAuth("invalid_target"), "invalid_request"),
        case("RFC 8693 repeated parameter", rfc(&format!("{good_rfc}&subject_token=again")), OAuth("invalid_request"), "invalid_request"),
        case("RFC 8693 malformed form", rfc("%%%"), OAuth("invalid_request"), "invalid_request"),
        case("RFC 8693 oversized body", rfc(&format!("{good_rfc}&pad={big}")), OAuth("invalid_request"), "request_too_large"),
        case("RFC 8693 GET", b"GET /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec(), OAuth("invalid_request"), "invalid_request"),
        case(
            "RFC 8693 bad Content-Length",
            b"POST /v1/token HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: -5\r\n\r\n".to_vec(),
            OAuth("invalid_request"),
            "invalid_request",
        ),
        case(
            "RFC 8693 bad header",
            b"POST /v1/token HTTP/1.1\r\nHost: x\r\nBad Header: yes\r\n\r\n".to_vec(),
            OAuth("invalid_request"),
            "invalid_request",
        ),
        case("introspection without a caller", post("/v1/introspect", "token=abc"), OAuth("invalid_client"), "client_unauthenticated"),
        case(
            "introspection with a bogus bearer",
            b"POST /v1/introspect HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer eyJ.x.y\r\nContent-Length: 9\r\n\r\ntoken=abc".to_vec(),
            OAuth("invalid_client"),
            "client_unauthenticated",
        ),
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
        let (status, head, body) = raw_http_bytes(server.http, &c.request);
        let is_refused = (400..500).contains(&status);
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
                "{}: status {status}, typed {code_ok}/{shape_ok}, audited {audit_ok} ({:?})\n{head}\n{body}",
                c.name,
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
    let text = std::fs::read_to_string(site.config()).unwrap();
    std::fs::write(
        site.config(),
        text.replacen(
            "https = \"127.0.0.1:0\"\n",
            "https = \"127.0.0.1:0\"\nheader_read_timeout = \"1s\"\nidle_timeout = \"2s\"\nmax_connections = 8\n",
            1,
        ),
    )
    .unwrap();
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
    let config = std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth(),
    );
    let name = rustls_pki_types::ServerName::IpAddress(server.grpc.ip().into());
    let mut conn = rustls::ClientConnection::new(config, name).unwrap();
    let mut tcp = TcpStream::connect(server.grpc).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut tls = rustls::Stream::new(&mut conn, &mut tcp);
    tls.flush().unwrap(); // completes the handshake
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
