//! Shared benchmark harness: closed- and open-loop drivers, latency
//! percentiles, and CPU accounting split by thread name (server workers,
//! SQLite threads, benchmark clients).
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_docs
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The run's request count: `HERALD_BENCH_N`, or `default`.
pub fn bench_n(default: usize) -> usize {
    std::env::var("HERALD_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn per_sec(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

pub struct Run {
    pub rate: f64,
    pub p50: Duration,
    pub p99: Duration,
    /// CPU cores busy on average (this process: server and clients).
    pub cores: f64,
    /// Server CPU per request.
    pub server_cpu: Duration,
    /// Client CPU per request.
    pub client_cpu: Duration,
    /// Of the server's, SQLite's connection threads, per request.
    pub sqlite_cpu: Duration,
}

/// The server's and the benchmark clients' thread names: the CPU split
/// below tells the two sides apart by them.
pub const SERVER_THREADS: &str = "herald-server";
/// See [`SERVER_THREADS`].
pub const CLIENT_THREADS: &str = "bench-client";

/// A 2-worker runtime whose threads are named `name` (server and clients
/// share the 2 cores, on separate runtimes, so each side's CPU per request
/// can be reported).
pub fn runtime(name: &str) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(name)
        .enable_all()
        .build()
        .unwrap()
}

/// CPU time so far of this process's threads, split into the server's
/// (tokio workers named `herald-server`, the store's `herald-store` thread
/// and sqlx's SQLite threads) and the benchmark clients' (`bench-client`).
pub fn cpu_split() -> (Duration, Duration) {
    let (server, client, _) = cpu_split3();
    (server, client)
}

/// (server total, clients, of which SQLite threads) CPU time so far.
pub fn cpu_split3() -> (Duration, Duration, Duration) {
    let mut sqlite = 0u64;
    let mut server = 0u64;
    let mut client = 0u64;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
                continue;
            };
            let Some((head, rest)) = stat.split_once(") ") else {
                continue;
            };
            let comm = head.rsplit('(').next().unwrap_or("");
            let f: Vec<&str> = rest.split(' ').collect();
            let ticks = f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            if comm.starts_with("sqlx-sqlite") {
                sqlite += ticks;
            }
            if comm.starts_with(SERVER_THREADS)
                || comm.starts_with("herald-store")
                || comm.starts_with("sqlx-sqlite")
            {
                server += ticks;
            } else if comm.starts_with(CLIENT_THREADS) {
                client += ticks;
            }
        }
    }
    (
        Duration::from_millis(server * 10),
        Duration::from_millis(client * 10),
        Duration::from_millis(sqlite * 10),
    )
}

/// User + system CPU time of this process so far.
pub fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of /proc/PID/stat (11 and 12 after the comm field).
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / 100.0)
}

/// Runs `n` calls of `op(i)` over `conc` concurrent tasks; `pace` = Some(rate) paces an open loop.
pub async fn drive<F, Fut>(n: usize, conc: usize, pace: Option<f64>, op: F) -> Run
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu0 = cpu_time();
    let (srv0, cli0, sql0) = cpu_split3();
    let start = Instant::now();
    let tasks: Vec<_> = (0..conc)
        .map(|_| {
            let (op, next) = (op.clone(), next.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let scheduled = match pace {
                        Some(rate) => {
                            let at = start + Duration::from_secs_f64(i as f64 / rate);
                            tokio::time::sleep_until(at.into()).await;
                            at
                        }
                        None => Instant::now(),
                    };
                    op(i).await;
                    lat.push(scheduled.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = start.elapsed();
    all.sort();
    Run {
        rate: per_sec(n, elapsed),
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        cores: (cpu_time() - cpu0).as_secs_f64() / elapsed.as_secs_f64(),
        server_cpu: cpu_split().0.saturating_sub(srv0) / n as u32,
        client_cpu: cpu_split().1.saturating_sub(cli0) / n as u32,
        sqlite_cpu: cpu_split3().2.saturating_sub(sql0) / n as u32,
    }
}

pub fn print_run(name: &str, r: &Run, ceiling: f64) {
    println!(
        "  {name:<26} {:>6.0}/s  p50 {:>5.2} ms  p99 {:>5.2} ms  {:>4.1}% of ceiling  | CPU {:.2} cores: server {:>3.0} µs/req (SQLite {:>3.0}), clients {:>3.0} µs/req",
        r.rate,
        r.p50.as_secs_f64() * 1e3,
        r.p99.as_secs_f64() * 1e3,
        100.0 * r.rate / ceiling,
        r.cores,
        us(r.server_cpu),
        us(r.sqlite_cpu),
        us(r.client_cpu),
    );
    if r.server_cpu > Duration::ZERO {
        let capacity = 2.0 / r.server_cpu.as_secs_f64();
        println!(
            "  {:<26} server alone on both cores: {capacity:>6.0}/s = {:.1}% of ceiling",
            "",
            100.0 * capacity / ceiling
        );
    }
}

/// Trust domain of the TPM benchmarks' servers.
pub const TPM_TD: &str = "bench.herald.test";
/// An all-zero SHA-256 PCR value (PCR 0 of a fresh swtpm).
pub const ZERO_PCR: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Starts an in-process server in `dir` whose node policy trusts `tpm`'s EK
/// chain, selects `pcrs` (YAML list, e.g. `[0, 7]`) with PCR 0 golden at
/// zero, and ends with `policy_tail` (e.g. a `workloads:` section).
pub async fn tpm_node_server(
    dir: &std::path::Path,
    tpm: &herald_test_tpm::SoftTpm,
    pcrs: &str,
    policy_tail: &str,
) -> herald_server::RunningServer {
    let kek = dir.join("kek");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&kek, "5a".repeat(32)).unwrap();
        std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::copy(tpm.ek_root_pem_path(), policies.join("root.pem")).unwrap();
    std::fs::copy(tpm.ek_intermediate_pem_path(), policies.join("inter.pem")).unwrap();
    let td = TPM_TD;
    std::fs::write(
        policies.join("nodes.yaml"),
        format!("name: nodes\nevidence:\n  tpm:\n    ek_roots: [root.pem]\n    ek_intermediates: [inter.pem]\n    pcrs: {pcrs}\n    golden:\n      - {{ name: g, pcrs: {{ 0: \"{ZERO_PCR}\" }} }}\nspiffe_id:\n  prefix: spiffe://{td}/node/\n  template: \"spiffe://{td}/node/{{ek_hash}}\"\ngrants:\n  x509_svid: {{ max_ttl: 1h }}\n{policy_tail}"),
    )
    .unwrap();
    let toml = format!(
        "trust_domain = \"{td}\"\ndata_dir = \"{}\"\n[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n[ca]\nkey_encryption_key_file = \"{}\"\n[rate_limit]\n# One load generator is one address: the per-address limit would\n# measure itself.\nper_caller_rate = 0.0\n[policy]\ndir = \"{}\"\n",
        dir.join("data").display(),
        kek.display(),
        policies.display()
    );
    let cfg = herald_server::ServerConfig::from_toml(&toml).unwrap();
    herald_server::start(cfg).await.unwrap()
}

/// Writes a join-token policy for `td` (bootstrap tokens mint SVIDs under
/// `spiffe://td/bench/`) into `dir/policies` and returns the `[policy]`
/// section that points a server at it.
pub fn bootstrap_policy_section(dir: &std::path::Path, td: &str) -> String {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("bench-bootstrap.yaml"),
        format!(
            "name: bench-bootstrap\nevidence:\n  join_token: {{ purposes: [bootstrap] }}\nspiffe_id:\n  prefix: spiffe://{td}/bench/\ngrants:\n  x509_svid: {{ max_ttl: 24h }}\n"
        ),
    )
    .unwrap();
    format!("[policy]\ndir = \"{}\"\n", policies.display())
}

/// A bootstrap join token record bound to `spiffe_id`, valid for an hour:
/// (the token, what the store keeps).
pub fn bootstrap_token(spiffe_id: String) -> (String, herald_store::NewJoinToken) {
    let t = herald_attest::join_token::generate().unwrap();
    let now = herald_server::unix_now();
    let rec = herald_store::NewJoinToken {
        token_hash: t.hash,
        token_id: t.token_id.clone(),
        spiffe_id,
        created_at: now,
        expires_at: now + 3600,
        created_by: "bench".into(),
        purpose: herald_core::JoinTokenPurpose::Bootstrap,
        policies: Vec::new(),
        reason: None,
    };
    (t.token, rec)
}

/// A bench server's configuration: a KEK in `dir`, loopback listeners on
/// free ports, no per-address rate limit (one generator is one address),
/// the policies in `policies`, and one OIDC issuer trusted through its CA
/// with keys refreshed without delay.
pub fn oidc_server_config(
    dir: &std::path::Path,
    td: &str,
    policies: &std::path::Path,
    issuer: &str,
    issuer_ca: &std::path::Path,
) -> herald_server::ServerConfig {
    use std::os::unix::fs::PermissionsExt;
    let kek = dir.join("kek");
    std::fs::write(&kek, "5a".repeat(32)).unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let toml = format!(
        "trust_domain = \"{td}\"\ndata_dir = \"{}\"\n[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n[ca]\nkey_encryption_key_file = \"{}\"\n[rate_limit]\nper_caller_rate = 0.0\n[policy]\ndir = \"{}\"\n[[oidc.issuers]]\nissuer = \"{issuer}\"\naudiences = [\"herald\"]\nextra_roots = \"{}\"\nmin_refresh_interval = \"0s\"\n",
        dir.join("data").display(),
        kek.display(),
        policies.display(),
        issuer_ca.display(),
    );
    herald_server::ServerConfig::from_toml(&toml).unwrap()
}
