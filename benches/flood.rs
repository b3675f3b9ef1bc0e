//! Flood benchmark (issue 16 §1): does legitimate issuance hold while a
//! flood is refused?
//!
//! An in-process server (SQLite, default rate limits: 200/s, burst 400 per
//! source address) serves paced legitimate mints (join token over gRPC +
//! TLS from 127.0.0.1) in three phases:
//! 1. alone;
//! 2. while a flood generator — this binary re-executed as its own
//!    process — hammers the STS endpoint from one address (127.0.0.2) over
//!    keep-alive connections as fast as the server answers;
//! 3. while the generator spreads the same flood over 64 source addresses
//!    (127.0.1.0–63), each within its own burst for a while: refusals then
//!    take the full path (parse, refuse, audit one by one).
//!
//! Prints per phase: the legitimate mints' p50/p99/max latency, the flood's
//! answered rate split into throttled and otherwise refused, the server's
//! CPU per second, and the audit records the flood caused.
//!
//! Run: `cargo bench --bench flood` (`HERALD_BENCH_SECS` sets each phase's
//! length, default 8 s).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use herald_client::HeraldClient;
use herald_client::keys::generate_key_and_csr;

const TD: &str = "bench.herald.test";
/// Legitimate mints per second during every phase.
const LEGIT_RATE: f64 = 50.0;
/// The generator's concurrent keep-alive connections (at least one per
/// source address).
const FLOOD_CONNS: usize = 32;

const STS_BODY: &str = "Action=AssumeRoleWithWebIdentity&Version=2011-06-15&RoleArn=arn:aws:iam::123456789012:role/deploy&RoleSessionName=flood&WebIdentityToken=eyJhbGciOi.not.a.token";

fn main() {
    if let Ok(target) = std::env::var("HERALD_FLOOD_TARGET") {
        flood_process(&target);
        return;
    }
    let secs: u64 = std::env::var("HERALD_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let server_rt = runtime(SERVER_THREADS);
    let sh = server_rt.handle().clone();
    let rt = runtime(CLIENT_THREADS);
    println!("# Flood benchmark: legitimate mints at {LEGIT_RATE:.0}/s, {secs} s per phase");
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let kek = dir.path().join("kek");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&kek, "5a".repeat(32)).unwrap();
            std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let toml = format!(
            "trust_domain = \"{TD}\"\ndata_dir = \"{}\"\n[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n[ca]\nkey_encryption_key_file = \"{}\"\n[rate_limit]\nreport_interval = \"1s\"\n{}",
            dir.path().join("data").display(),
            kek.display(),
            bootstrap_policy_section(dir.path(), TD)
        );
        let cfg = herald_server::ServerConfig::from_toml(&toml).unwrap();
        let server = sh.spawn(herald_server::start(cfg)).await.unwrap().unwrap();
        let url = format!("https://{}", server.grpc_addr);
        let http = server.http_addr;
        let anchors = server.shared.ca().bundle.x509_authorities.clone();
        let store = server.shared.store.clone();
        let per_phase = (LEGIT_RATE * secs as f64) as usize;

        let mut tokens = Vec::new();
        for i in 0..per_phase * 3 {
            let (token, rec) = bootstrap_token(format!("spiffe://{TD}/bench/{i}"));
            store
                .create_join_token(rec, herald_core::AuditEvent::new("join_token.create", "bench"))
                .await
                .unwrap();
            tokens.push(token);
        }
        let tokens = Arc::new(tokens);
        let csrs: Arc<Vec<Vec<u8>>> =
            Arc::new((0..per_phase * 3).map(|_| generate_key_and_csr().unwrap().csr_der).collect());
        let client = Arc::new(HeraldClient::connect(&url, &anchors, None).await.unwrap());

        let phases: [(&str, usize); 3] = [
            ("no flood", 0),
            ("flood from 1 address", 1),
            ("flood from 64 addresses", 64),
        ];
        for (p, (name, sources)) in phases.into_iter().enumerate() {
            let seq0 = store.audit_head().await.unwrap().map_or(0, |h| h.0);
            let flood = (sources > 0).then(|| spawn_flood(http, sources, secs + 1));
            // Let the generator reach full speed before measuring.
            if flood.is_some() {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            let (srv0, _) = cpu_split();
            let t0 = Instant::now();
            let (cl, tk, cs) = (client.clone(), tokens.clone(), csrs.clone());
            let base = p * per_phase;
            let mut lat = Vec::with_capacity(per_phase);
            let handles: Vec<_> = (0..per_phase)
                .map(|i| {
                    let (cl, tk, cs) = (cl.clone(), tk.clone(), cs.clone());
                    let at = t0 + Duration::from_secs_f64(i as f64 / LEGIT_RATE);
                    tokio::spawn(async move {
                        tokio::time::sleep_until(at.into()).await;
                        cl.mint_x509_svid(&tk[base + i], cs[base + i].clone())
                            .await
                            .unwrap();
                        at.elapsed()
                    })
                })
                .collect();
            for h in handles {
                lat.push(h.await.unwrap());
            }
            let elapsed = t0.elapsed();
            let server_cores = cpu_split().0.saturating_sub(srv0).as_secs_f64() / elapsed.as_secs_f64();
            lat.sort();
            let report = flood.map(finish_flood);
            // Throttled refusals reach the audit log as per-address
            // aggregates every report interval (1 s here): let the last
            // one be written.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let records = store.audit_records(seq0, 1_000_000).await.unwrap();
            let flood_records = records
                .iter()
                .filter(|r| r.event.caller.starts_with("peer:127.0.0.2") || r.event.caller.starts_with("peer:127.0.1."))
                .count();
            let aggregates = records
                .iter()
                .filter(|r| r.event.action == "rate_limited")
                .count();
            println!("## {name}");
            println!(
                "  legitimate mints  {:>5} at {LEGIT_RATE:.0}/s   p50 {:>6.2} ms   p99 {:>6.2} ms   max {:>6.2} ms",
                lat.len(),
                lat[lat.len() / 2].as_secs_f64() * 1e3,
                percentile(&lat, 0.99).as_secs_f64() * 1e3,
                lat[lat.len() - 1].as_secs_f64() * 1e3,
            );
            println!("  server CPU        {server_cores:.2} cores");
            if let Some(r) = report {
                println!(
                    "  flood             {:>8.0} requests/s answered: {:.0}/s throttled, {:.0}/s refused after admission, {} errors",
                    r.answered as f64 / r.secs,
                    r.throttled as f64 / r.secs,
                    (r.answered - r.throttled) as f64 / r.secs,
                    r.errors
                );
                println!(
                    "  audit             {flood_records} records for {} flood requests ({aggregates} of them aggregates)",
                    r.answered
                );
            }
        }
        let chain = store.verify_audit_chain(1, None).await.unwrap();
        println!("## audit chain verified: {} records", chain.records);
        sh.spawn(server.shutdown()).await.unwrap();
    });
    drop(server_rt);
}

struct FloodReport {
    answered: u64,
    throttled: u64,
    errors: u64,
    secs: f64,
}

fn spawn_flood(target: SocketAddr, sources: usize, secs: u64) -> std::process::Child {
    std::process::Command::new(std::env::current_exe().unwrap())
        .env("HERALD_FLOOD_TARGET", target.to_string())
        .env("HERALD_FLOOD_SOURCES", sources.to_string())
        .env("HERALD_FLOOD_SECS", secs.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish_flood(child: std::process::Child) -> FloodReport {
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "the flood generator failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let field = |k: &str| -> f64 {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(k))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {k} in {text:?}"))
    };
    FloodReport {
        answered: field("answered=") as u64,
        throttled: field("throttled=") as u64,
        errors: field("errors=") as u64,
        secs: field("secs="),
    }
}

/// The generator: `FLOOD_CONNS` keep-alive connections, each sending STS
/// requests back to back from one of the source addresses, for the given
/// time. Prints its counts on stdout.
fn flood_process(target: &str) {
    let target: SocketAddr = target.parse().unwrap();
    let sources: usize = std::env::var("HERALD_FLOOD_SOURCES")
        .unwrap()
        .parse()
        .unwrap();
    let secs: u64 = std::env::var("HERALD_FLOOD_SECS").unwrap().parse().unwrap();
    let rt = runtime("flood");
    let (answered, throttled, errors, elapsed) = rt.block_on(async move {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let request = Arc::new(
            format!(
                "POST / HTTP/1.1\r\nHost: flood\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{STS_BODY}",
                STS_BODY.len()
            )
            .into_bytes(),
        );
        let t0 = Instant::now();
        let tasks: Vec<_> = (0..FLOOD_CONNS.max(sources))
            .map(|c| {
                let request = request.clone();
                let source = if sources == 1 {
                    Ipv4Addr::new(127, 0, 0, 2)
                } else {
                    Ipv4Addr::new(127, 0, 1, (c % sources) as u8)
                };
                tokio::spawn(flood_connection(target, source, request, deadline))
            })
            .collect();
        let (mut a, mut t, mut e) = (0, 0, 0);
        for task in tasks {
            let (x, y, z) = task.await.unwrap();
            a += x;
            t += y;
            e += z;
        }
        (a, t, e, t0.elapsed())
    });
    println!(
        "answered={answered} throttled={throttled} errors={errors} secs={:.3}",
        elapsed.as_secs_f64()
    );
}

/// One connection's loop from `source` (reconnecting when the server
/// closes it). Returns (answered, throttled, errors).
async fn flood_connection(
    target: SocketAddr,
    source: Ipv4Addr,
    request: Arc<Vec<u8>>,
    deadline: Instant,
) -> (u64, u64, u64) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut answered, mut throttled, mut errors) = (0u64, 0u64, 0u64);
    'connect: while Instant::now() < deadline {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(IpAddr::V4(source), 0)).unwrap();
        let Ok(mut s) = socket.connect(target).await else {
            errors += 1;
            continue;
        };
        let mut buf = Vec::with_capacity(4096);
        while Instant::now() < deadline {
            if s.write_all(&request).await.is_err() {
                errors += 1;
                break;
            }
            buf.clear();
            // Read one response: its head, then Content-Length bytes.
            let (head_len, body_len) = loop {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        errors += 1;
                        continue 'connect;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
                let mut headers = [httparse::EMPTY_HEADER; 32];
                let mut resp = httparse::Response::new(&mut headers);
                if let Ok(httparse::Status::Complete(len)) = resp.parse(&buf) {
                    let body = resp
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<usize>().ok())
                        .unwrap_or(0);
                    break (len, body);
                }
            };
            while buf.len() < head_len + body_len {
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        errors += 1;
                        continue 'connect;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            answered += 1;
            const THROTTLED: &[u8] = b"<Code>Throttling</Code>";
            if buf[head_len..]
                .windows(THROTTLED.len())
                .any(|w| w == THROTTLED)
            {
                throttled += 1;
            }
        }
    }
    (answered, throttled, errors)
}
