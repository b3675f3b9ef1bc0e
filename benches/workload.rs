//! Workload API benchmark (BRIEF §8, issue: Workload API on the agent).
//!
//! Prints, from one run on this machine, with a real swtpm, an in-process
//! server (SQLite) and the real `herald agent` binary:
//! 1. Workload API fetch latency from the agent's cache (p50/p99), many
//!    concurrent callers, X.509 (FetchX509SVID first message) and JWT,
//!    with 100 registrations on the node and again with 1,000;
//! 2. the spread of 1,000 workload SVID renewals over time (per-second
//!    histogram of the renewals after the initial issuance) — no lock-step;
//! 3. the agent's resident memory with 100 and 1,000 registrations;
//! 4. Envoy SDS: the agent's memory with 100 SDS streams open, and the time
//!    from a rotation (the server's issuance) to the push on each stream.
//!
//! Run: `cargo bench --bench workload` (`HERALD_BENCH_N` scales the fetches;
//! `HERALD_BENCH_ONLY=fetch` stops after the fetch phases).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use herald_client::workload_api::WorkloadApiClient;
use herald_test_tpm::SoftTpm;

const TD: &str = TPM_TD;

/// (VmRSS, RssAnon) in KiB: all resident pages, and the private ones
/// (the rest are clean pages of the executable, shared and reclaimable).
fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

struct Site {
    _dir: tempfile::TempDir,
    server: herald_server::RunningServer,
}

/// JWT-SVIDs the bench fetches once each, not cached.
const JWT_MISSES: usize = 200;

async fn site(tpm: &SoftTpm, registrations: usize, ttl: &str) -> Site {
    let dir = tempfile::tempdir().unwrap();
    // One registration matches the benchmark process (uid 0); the others
    // are other workloads on the node (distinct cgroups) the agent keeps
    // SVIDs for all the same.
    // The bench's audiences: `api`, fetched from cache, and `miss-<i>`,
    // each fetched once (a JWT-SVID the agent must get from the server).
    let misses: Vec<String> = (0..JWT_MISSES).map(|i| format!("miss-{i}")).collect();
    let mut w = format!(
        "workloads:\n  - {{ spiffe_id: spiffe://{TD}/w/bench, selectors: [\"unix:uid:0\"], ttl: {ttl}, jwt_audiences: [api, {}], hint: bench }}\n",
        misses.join(", ")
    );
    for i in 1..registrations {
        w.push_str(&format!(
            "  - {{ spiffe_id: spiffe://{TD}/w/svc-{i}, selectors: [\"cgroup:/bench.slice/svc-{i}.service\"], ttl: {ttl} }}\n"
        ));
    }
    let server = tpm_node_server(dir.path(), tpm, "[0, 7]", &w).await;
    Site { _dir: dir, server }
}

struct AgentProc {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    socket: std::path::PathBuf,
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_agent(site: &Site, tpm: &SoftTpm) -> AgentProc {
    let dir = tempfile::tempdir().unwrap();
    let anchors = site.server.shared.ca().bundle.x509_authorities.clone();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(
        &bundle,
        herald_client::files::to_pem("CERTIFICATE", &anchors),
    )
    .unwrap();
    let socket = dir.path().join("agent.sock");
    let cfg = dir.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            // Every caller here is uid 0: the per-uid rate limit is off so
            // the fetch path itself is measured.
            "servers = [\"https://{}\"]\ntrust_bundle = \"{}\"\ndata_dir = \"{}\"\n[tpm]\ntcti = \"{}\"\n[workload_api]\nsocket = \"{}\"\nrate_limit = {{ per_second = 0, burst = 1 }}\n",
            site.server.grpc_addr,
            bundle.display(),
            dir.path().join("state").display(),
            tpm.tcti(),
            socket.display()
        ),
    )
    .unwrap();
    // The node agent's own executable (what a node runs): its RSS is the
    // agent's, not that of the pages of a binary that also holds the server.
    // HERALD_BENCH_AGENT names another build to compare (e.g. the `agent`
    // profile's, `target/agent/herald-agent`).
    let bin = std::env::var_os("HERALD_BENCH_AGENT")
        .unwrap_or_else(|| env!("CARGO_BIN_EXE_herald-agent").into());
    let child = std::process::Command::new(bin)
        .arg("--config")
        .arg(&cfg)
        .env("HERALD_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    AgentProc {
        child,
        _dir: dir,
        socket,
    }
}

/// Workload SVIDs issued so far (from the audit log).
async fn workload_issuances(site: &Site) -> Vec<i64> {
    let store = &site.server.shared.store;
    let mut out = Vec::new();
    let mut after = 0;
    loop {
        let page = store.audit_records(after, 5000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        out.extend(
            page.iter()
                .filter(|r| {
                    r.event.action == "x509_svid.workload"
                        && r.event.outcome == herald_core::Outcome::Success
                })
                .map(|r| r.event.time_ms),
        );
    }
    out
}

async fn wait_issued(site: &Site, n: usize, secs: u64) -> Duration {
    let t = Instant::now();
    while workload_issuances(site).await.len() < n {
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "SVIDs not issued in time"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    t.elapsed()
}

async fn wait_socket(path: &Path) -> WorkloadApiClient {
    let t = Instant::now();
    loop {
        if let Ok(c) = WorkloadApiClient::connect(path).await
            && c.fetch_x509().await.is_ok()
        {
            return c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "Workload API not ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `conc` callers, one connection each, `per` FetchX509SVID calls each
/// (first message), served from the agent's cache;
/// prints throughput, p50, p99, p99.9 and max, and how late the machine's
/// stall probe woke at worst meanwhile (a tail that coincides with a late
/// probe was the machine's, not the agent's).
async fn fetch_phase(socket: &Arc<std::path::PathBuf>, conc: usize, per: usize, label: &str) {
    let mut timed: Vec<(Duration, Duration)> = Vec::with_capacity(conc * per);
    let mut first: Vec<Duration> = Vec::with_capacity(conc);
    // Every caller connects and makes its first call, then all start the
    // timed calls together: the first call on each of `conc` connections
    // opened at once waits behind the others' handshakes, a cost of
    // connecting (reported apart), not of a fetch from cache.
    let ready = Arc::new(tokio::sync::Barrier::new(conc + 1));
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let (socket, ready) = (socket.clone(), ready.clone());
            tokio::spawn(async move {
                let s = Instant::now();
                let c = WorkloadApiClient::connect(&socket).await.unwrap();
                assert_eq!(c.fetch_x509().await.unwrap().svids.len(), 1);
                let first = s.elapsed();
                ready.wait().await;
                let t = Instant::now();
                let mut v = Vec::with_capacity(per);
                for _ in 0..per {
                    let s = Instant::now();
                    let r = c.fetch_x509().await.unwrap();
                    assert_eq!(r.svids.len(), 1);
                    v.push((s.elapsed(), s - t));
                }
                (first, v)
            })
        })
        .collect();
    ready.wait().await;
    let t = Instant::now();
    let probe = StallProbe::start(t);
    for task in tasks {
        let (f, v) = task.await.unwrap();
        first.push(f);
        timed.extend(v);
    }
    let total = t.elapsed();
    first.sort_unstable();
    let stalls = probe.finish();
    if std::env::var_os("HERALD_BENCH_SLOWEST").is_some() {
        println!(
            "    slowest (ms latency @ ms sent after start): {}",
            largest_at(&mut timed, 12, 2)
        );
    }
    let mut lat: Vec<Duration> = timed.into_iter().map(|(d, _)| d).collect();
    lat.sort_unstable();
    println!(
        "FetchX509SVID from cache{label}, {conc:>2} concurrent caller(s), {} fetches: {:>6.0}/s, p50 {:.3} ms, p99 {:.3} ms (target p99 ≤ {} ms)",
        lat.len(),
        per_sec(lat.len(), total),
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
        if conc > 4 { 2 } else { 1 }
    );
    println!(
        "    p99.9 {:.3} ms, max {:.3} ms | machine: latest wake-up {:.1} ms late @ {:.0} ms | connect and first call, {conc} at once: p50 {:.3} ms, max {:.3} ms",
        ms(percentile(&lat, 0.999)),
        ms(lat.last().copied().unwrap_or_default()),
        ms(stalls.worst.0),
        ms(stalls.worst.1),
        ms(percentile(&first, 0.5)),
        ms(first.last().copied().unwrap_or_default()),
    );
}

fn main() {
    let n = bench_n(20_000);
    let rt = runtime(CLIENT_THREADS);
    println!("# Workload API benchmark");
    match std::env::var_os("HERALD_BENCH_AGENT") {
        Some(a) => println!("(agent: {})", Path::new(&a).display()),
        None => println!(
            "(agent: this build's, {}; nodes run the `agent` profile's: HERALD_BENCH_AGENT=target/agent/herald-agent)",
            env!("CARGO_BIN_EXE_herald-agent")
        ),
    }
    rt.block_on(async {
        // 1. Fetch latency from cache, 100 registrations.
        let tpm = SoftTpm::start().unwrap();
        let s = site(&tpm, 100, "1h").await;
        let agent = start_agent(&s, &tpm);
        let issued = wait_issued(&s, 100, 120).await;
        let client = wait_socket(&agent.socket).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss100 = rss_kib(agent.child.id());
        println!(
            "## 100 registrations: all SVIDs issued {:.2} s after start; agent RSS {:.1} MiB, of which private (anonymous) {:.1} MiB (target ≤ 20 MiB)",
            issued.as_secs_f64(),
            rss100.0 as f64 / 1024.0,
            rss100.1 as f64 / 1024.0
        );
        drop(client);
        let socket = Arc::new(agent.socket.clone());
        for conc in [1usize, 4, 32] {
            fetch_phase(&socket, conc, (n / conc / 4).max(10), "").await;
        }
        // JWT-SVIDs from cache (the first fetch goes to the server).
        let c = WorkloadApiClient::connect(&agent.socket).await.unwrap();
        let mut raw = herald_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(
            // Reuse the client's connection through a fresh request each time.
            tonic::transport::Endpoint::from_static("http://x")
                .connect_with_connector(tower::service_fn({
                    let p = agent.socket.clone();
                    move |_| {
                        let p = p.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(p).await?,
                            ))
                        }
                    }
                }))
                .await
                .unwrap(),
        );
        drop(c);
        let jwt_req = |audience: &str| {
            let mut r = tonic::Request::new(herald_proto::workload::JwtsvidRequest {
                audience: vec![audience.to_owned()],
                spiffe_id: String::new(),
            });
            r.metadata_mut().insert("workload.spiffe.io", "true".parse().unwrap());
            r
        };
        raw.fetch_jwtsvid(jwt_req("api")).await.unwrap();
        // From cache: `api` again and again. Not cached: each call a new
        // audience, which the agent asks the server for (over its
        // connection to it).
        let cached = vec!["api".to_owned(); (n / 10).max(100)];
        let misses: Vec<String> = (0..JWT_MISSES).map(|i| format!("miss-{i}")).collect();
        for (what, audiences) in [
            ("from cache", cached),
            ("not cached (a new audience each call, from the server)", misses),
        ] {
            let mut jl = Vec::with_capacity(audiences.len());
            for audience in &audiences {
                let s = Instant::now();
                raw.fetch_jwtsvid(jwt_req(audience)).await.unwrap();
                jl.push(s.elapsed());
            }
            jl.sort_unstable();
            println!(
                "FetchJWTSVID {what}, one caller, {} calls: p50 {:.3} ms, p99 {:.3} ms",
                jl.len(),
                percentile(&jl, 0.5).as_secs_f64() * 1e3,
                percentile(&jl, 0.99).as_secs_f64() * 1e3
            );
        }
        drop(raw);
        drop(agent);
        drop(s);
        drop(tpm);
        // HERALD_BENCH_ONLY=fetch stops after the fetch phases at 100
        // registrations (for alternated runs of two agent builds and for
        // profiling).
        if std::env::var("HERALD_BENCH_ONLY").is_ok_and(|v| v == "fetch") {
            return;
        }

        // 2 + 3. 1,000 registrations on a 40 s TTL: issuance, RSS, renewal spread.
        let tpm = SoftTpm::start().unwrap();
        let s = site(&tpm, 1000, "40s").await;
        let agent = start_agent(&s, &tpm);
        let issued = wait_issued(&s, 1000, 300).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss1000 = rss_kib(agent.child.id());
        println!(
            "## 1,000 registrations: all SVIDs issued {:.2} s after start (batches of 100); agent RSS {:.1} MiB, private {:.1} MiB",
            issued.as_secs_f64(),
            rss1000.0 as f64 / 1024.0,
            rss1000.1 as f64 / 1024.0
        );
        // Fetches from cache with 1,000 registrations to match against. This
        // agent has not seen the callers' executable yet: its first call
        // hashes it (once per executable version), timed apart so that the
        // phases measure the cache.
        let t = Instant::now();
        drop(wait_socket(&agent.socket).await);
        println!(
            "First fetch from a new agent (hashes the caller's {:.0} MB executable): {:.1} ms",
            std::fs::metadata(std::env::current_exe().unwrap())
                .unwrap()
                .len() as f64
                / 1e6,
            t.elapsed().as_secs_f64() * 1e3
        );
        let socket = Arc::new(agent.socket.clone());
        for conc in [4usize, 32] {
            fetch_phase(&socket, conc, (n / conc / 4).max(10), " (1,000 registrations)").await;
        }
        // 1,000 Workload API streams held open (FetchX509SVID, first
        // message received), over 50 connections.
        const OPEN: usize = 1000;
        let mut held = Vec::with_capacity(OPEN);
        let mut conns = Vec::new();
        for _ in 0..50 {
            conns.push(WorkloadApiClient::connect(&agent.socket).await.unwrap());
        }
        for i in 0..OPEN {
            let mut stream = conns[i % conns.len()].watch_x509().await.unwrap();
            let first = stream.message().await.unwrap().unwrap();
            assert_eq!(first.svids.len(), 1);
            held.push(stream);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let rss_streams = rss_kib(agent.child.id());
        println!(
            "## 1,000 registrations and {OPEN} Workload API streams open: agent RSS {:.1} MiB, private {:.1} MiB (target ≤ 48 MB)",
            rss_streams.0 as f64 / 1024.0,
            rss_streams.1 as f64 / 1024.0
        );
        drop(held);
        drop(conns);
        // Fetches while the 1,000 SVIDs renew: 4 callers, one fetch a
        // millisecond each, stamped with when they were sent (Unix ms, as
        // the audit records' times) and kept for the renewal window.
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let fetchers: Vec<_> = (0..4)
            .map(|_| {
                let (socket, stop) = (socket.clone(), stop.clone());
                tokio::spawn(async move {
                    let c = WorkloadApiClient::connect(&socket).await.unwrap();
                    let mut tick = tokio::time::interval(Duration::from_millis(1));
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    let mut v = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        tick.tick().await;
                        let sent = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .unwrap()
                            .as_millis() as i64;
                        let t = Instant::now();
                        assert_eq!(c.fetch_x509().await.unwrap().svids.len(), 1);
                        v.push((t.elapsed(), sent));
                    }
                    v
                })
            })
            .collect();
        // Wait for the first generation of renewals (0.5 ± 0.1 of 40 s).
        let first = workload_issuances(&s).await;
        let start_ms = *first.iter().min().unwrap();
        wait_issued(&s, 2000, 120).await;
        let all = workload_issuances(&s).await;
        let mut renewals: Vec<i64> = all.into_iter().filter(|t| *t > start_ms + 10_000).collect();
        renewals.sort_unstable();
        renewals.truncate(1000);
        let mut buckets = std::collections::BTreeMap::<i64, usize>::new();
        for t in &renewals {
            *buckets.entry((t - start_ms) / 1000).or_default() += 1;
        }
        let max = buckets.values().copied().max().unwrap_or(0);
        println!("renewals of the 1,000 SVIDs, seconds after first issuance (TTL 40 s, renew at 0.5 ± 0.1):");
        for (sec, count) in &buckets {
            println!("  {sec:>3} s {count:>4} {}", "#".repeat(count * 50 / max.max(1)));
        }
        println!(
            "  largest second holds {max} of {} renewals ({:.1} %): spread, not lock-step",
            renewals.len(),
            max as f64 * 100.0 / renewals.len().max(1) as f64
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (from, to) = (
            renewals.first().copied().unwrap_or(0),
            renewals.last().copied().unwrap_or(0),
        );
        let mut during = Vec::new();
        for f in fetchers {
            during.extend(
                f.await
                    .unwrap()
                    .into_iter()
                    .filter(|(_, sent)| (from..=to).contains(sent))
                    .map(|(d, _)| d),
            );
        }
        during.sort_unstable();
        assert!(!during.is_empty(), "no fetch was sent while the SVIDs renewed");
            println!(
            "FetchX509SVID while the 1,000 SVIDs renew (4 callers, one fetch a ms each, {} fetches over {:.1} s): p50 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms",
            during.len(),
            (to - from) as f64 / 1e3,
            ms(percentile(&during, 0.5)),
            ms(percentile(&during, 0.99)),
            ms(percentile(&during, 0.999)),
            ms(during.last().copied().unwrap_or_default()),
        );
        drop(agent);
        drop(s);
        drop(tpm);

        // 4. Envoy SDS: 100 streams open on one agent, then a rotation.
        sds_phase().await;
    });
}

/// The leaf serial (lowercase hex, no leading zeros) of an SDS TLS
/// certificate secret.
fn sds_leaf_serial(
    secret: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret,
) -> Option<String> {
    use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::secret::Type;
    let Some(Type::TlsCertificate(t)) = &secret.r#type else {
        return None;
    };
    let Some(Specifier::InlineBytes(pem_chain)) = t.certificate_chain.as_ref()?.specifier.as_ref()
    else {
        return None;
    };
    let leaf = pem::parse_many(pem_chain).ok()?.into_iter().next()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.contents()).ok()?;
    Some(
        hex::encode(cert.raw_serial())
            .trim_start_matches('0')
            .to_owned(),
    )
}

async fn sds_phase() {
    use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use prost::Message;
    const STREAMS: usize = 100;
    const TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
    let tpm = SoftTpm::start().unwrap();
    let s = site(&tpm, 1, "12s").await;
    let agent = start_agent(&s, &tpm);
    wait_issued(&s, 1, 120).await;
    drop(wait_socket(&agent.socket).await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = rss_kib(agent.child.id());
    let channel = tonic::transport::Endpoint::from_static("http://sds")
        .connect_with_connector(tower::service_fn({
            let p = agent.socket.clone();
            move |_| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }
        }))
        .await
        .unwrap();
    // Each stream: ask, ACK, then wait for the push of the next SVID and
    // note when it arrived (Unix ms) and which serial it carries.
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::channel::<()>(STREAMS);
    let tasks: Vec<_> = (0..STREAMS)
        .map(|_| {
            let channel = channel.clone();
            let opened = opened_tx.clone();
            tokio::spawn(async move {
                let mut client = SecretDiscoveryServiceClient::new(channel);
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                let ask = |version: &str, nonce: &str| DiscoveryRequest {
                    version_info: version.into(),
                    response_nonce: nonce.into(),
                    resource_names: vec!["default".into(), "ROOTCA".into()],
                    type_url: TYPE.into(),
                    ..DiscoveryRequest::default()
                };
                tx.send(ask("", "")).await.unwrap();
                let mut stream = client
                    .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .unwrap()
                    .into_inner();
                let first = stream.message().await.unwrap().unwrap();
                let serial =
                    |r: &envoy_types::pb::envoy::service::discovery::v3::DiscoveryResponse| {
                        r.resources
                            .iter()
                            .filter_map(|a| Secret::decode(&a.value[..]).ok())
                            .find_map(|s| sds_leaf_serial(&s))
                            .unwrap()
                    };
                let before = serial(&first);
                tx.send(ask(&first.version_info, &first.nonce))
                    .await
                    .unwrap();
                opened.send(()).await.unwrap();
                loop {
                    let next = stream.message().await.unwrap().unwrap();
                    let at = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .unwrap()
                        .as_millis() as i64;
                    let now = serial(&next);
                    tx.send(ask(&next.version_info, &next.nonce)).await.unwrap();
                    if now != before {
                        return (now, at);
                    }
                }
            })
        })
        .collect();
    drop(opened_tx);
    for _ in 0..STREAMS {
        opened_rx.recv().await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open = rss_kib(agent.child.id());
    let mut pushes = Vec::new();
    for t in tasks {
        pushes.push(
            tokio::time::timeout(Duration::from_secs(60), t)
                .await
                .unwrap()
                .unwrap(),
        );
    }
    // When the server issued each new serial (its audit record).
    let store = &s.server.shared.store;
    let records = store.audit_records(0, 100_000).await.unwrap();
    let issued_at = |serial: &str| {
        records
            .iter()
            .find(|r| {
                r.event.action == "x509_svid.workload"
                    && r.event.serial.as_deref().map(|s| s.trim_start_matches('0')) == Some(serial)
            })
            .map(|r| r.event.time_ms)
            .unwrap()
    };
    let mut lat: Vec<Duration> = pushes
        .iter()
        .map(|(serial, at)| Duration::from_millis((at - issued_at(serial)).max(0) as u64))
        .collect();
    lat.sort_unstable();
    println!(
        "## SDS: agent RSS {:.1} MiB (private {:.1}) idle, {:.1} MiB (private {:.1}) with {STREAMS} SDS streams open",
        idle.0 as f64 / 1024.0,
        idle.1 as f64 / 1024.0,
        open.0 as f64 / 1024.0,
        open.1 as f64 / 1024.0
    );
    println!(
        "  rotation → push on {STREAMS} open streams (server issuance to the stream's receipt): p50 {} ms, p99 {} ms, max {} ms",
        percentile(&lat, 0.5).as_millis(),
        percentile(&lat, 0.99).as_millis(),
        lat.last().map_or(0, |d| d.as_millis())
    );
    drop(agent);
}
