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

/// The `herald` binary's allocator, so that a server run in the bench's
/// process (replicas, flood, attestation) allocates as the shipped one.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
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

/// `d` in milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
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
    pub p999: Duration,
    pub max: Duration,
    /// CPU cores busy on average (server and clients).
    pub cores: f64,
    /// Server CPU per request.
    pub server_cpu: Duration,
    /// Client CPU per request.
    pub client_cpu: Duration,
    /// Of the server's, SQLite's connection threads, per request.
    pub sqlite_cpu: Duration,
    /// The machine's own stalls over the run, from [`StallProbe`].
    pub stalls: Stalls,
}

/// How late a thread outside every runtime woke from short sleeps during a
/// run: a wake-up tens of ms late on an otherwise responsive machine means
/// no vCPU ran it — the machine stalled, not the server.
#[derive(Clone, Debug, Default)]
pub struct Stalls {
    /// The latest wake-up: how late, and when (since the run's start).
    pub worst: (Duration, Duration),
    /// Wake-ups at least [`STALL`] late.
    pub count: usize,
}

/// A wake-up this late counts as a stall: several times the scheduler's
/// own latency for a thread that has slept (a few ms at most on 2 cores).
pub const STALL: Duration = Duration::from_millis(20);

/// How long the probe sleeps: short beside the stalls it looks for, long
/// enough that its 200 wake-ups a second do not disturb the run.
const PROBE_SLEEP: Duration = Duration::from_millis(5);

/// A thread that sleeps 5 ms at a time and records how late it wakes.
/// Requests slow together while the probe also woke late were held up by
/// the machine (`HERALD_BENCH_SLOWEST` prints both, with the time each
/// happened); slow while the probe was on time, by the server.
pub struct StallProbe {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(Duration, Duration)>>,
}

/// The probe's thread name: its CPU is neither the server's nor the
/// clients'.
const PROBE_THREAD: &str = "bench-probe";

impl StallProbe {
    /// Starts probing; times are reported relative to `start`.
    pub fn start(start: Instant) -> StallProbe {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name(PROBE_THREAD.into())
            .spawn(move || {
                let mut late = Vec::new();
                while !flag.load(Ordering::Relaxed) {
                    let before = Instant::now();
                    std::thread::sleep(PROBE_SLEEP);
                    let overshoot = before.elapsed().saturating_sub(PROBE_SLEEP);
                    late.push((overshoot, before.duration_since(start)));
                }
                late
            })
            .unwrap();
        StallProbe { stop, thread }
    }

    /// Stops probing; prints the worst wake-ups with `HERALD_BENCH_SLOWEST`.
    pub fn finish(self) -> Stalls {
        self.stop.store(true, Ordering::Relaxed);
        let mut late = self.thread.join().unwrap();
        late.sort();
        if std::env::var_os("HERALD_BENCH_SLOWEST").is_some() {
            println!(
                "  probe woke late (ms late @ ms after start): {}",
                largest_at(&mut late, 6, 1)
            );
        }
        Stalls {
            worst: late.last().copied().unwrap_or_default(),
            count: late.iter().filter(|(by, _)| *by >= STALL).count(),
        }
    }
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

/// The server's process, when it runs in one of its own
/// ([`ServerProcess`]): the CPU split then reads its threads, and every
/// thread of this process is the load generator's.
static SERVER_PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// (server total, clients, of which SQLite threads) CPU time so far.
pub fn cpu_split3() -> (Duration, Duration, Duration) {
    if let Some(pid) = SERVER_PID.get() {
        let (server, sqlite) = process_cpu(&format!("/proc/{pid}/task"));
        let client = thread_cpu("/proc/self/task")
            .into_iter()
            .filter(|(comm, _)| comm != PROBE_THREAD)
            .map(|(_, cpu)| cpu)
            .sum();
        return (server, client, sqlite);
    }
    let (mut server, mut client, mut sqlite) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    for (comm, cpu) in thread_cpu("/proc/self/task") {
        if comm.starts_with("sqlx-sqlite") {
            sqlite += cpu;
        }
        if comm.starts_with(SERVER_THREADS)
            || comm.starts_with("herald-store")
            || comm.starts_with("sqlx-sqlite")
        {
            server += cpu;
        } else if comm.starts_with(CLIENT_THREADS) {
            client += cpu;
        }
    }
    (server, client, sqlite)
}

/// (all threads, of which SQLite's) CPU time so far of the process whose
/// task directory is `tasks`.
pub fn process_cpu(tasks: &str) -> (Duration, Duration) {
    thread_cpu(tasks).into_iter().fold(
        (Duration::ZERO, Duration::ZERO),
        |(all, sqlite), (comm, cpu)| {
            let of_sqlite = if comm.starts_with("sqlx-sqlite") {
                cpu
            } else {
                Duration::ZERO
            };
            (all + cpu, sqlite + of_sqlite)
        },
    )
}

/// Each thread's name and user + system CPU time so far, from the task
/// directory `tasks` (`/proc/<pid>/task`).
fn thread_cpu(tasks: &str) -> Vec<(String, Duration)> {
    let mut threads = Vec::new();
    for t in std::fs::read_dir(tasks).unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            continue; // a thread that ended since the listing
        };
        let (head, rest) = stat.split_once(") ").unwrap();
        let comm = head.rsplit('(').next().unwrap_or("").to_owned();
        let f: Vec<&str> = rest.split(' ').collect();
        // utime and stime, in clock ticks of 10 ms.
        let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
        threads.push((comm, Duration::from_millis(ticks * 10)));
    }
    threads
}

/// A `herald server` in a process of its own (the release binary this
/// bench was built with), so that the load generator — this process —
/// neither shares its allocator, runtime or caches nor blurs its CPU
/// accounting: server CPU per request is the server process's own
/// (`/proc/<pid>/task`, every thread, SQLite's counted apart).
///
/// With `HERALD_BENCH_PERF=<dir>`, [`ServerProcess::profile`] records each
/// timed phase with `perf record` into `<dir>/<phase>.data`; with
/// `HERALD_BENCH_PERF_GRAPH=<mode>` also with call graphs (`fp`: complete
/// for the kernel, a frame or two in code built without frame pointers;
/// `dwarf`: complete, at a higher recording cost).
pub struct ServerProcess {
    child: std::process::Child,
    /// The server's gRPC (TLS) address.
    pub grpc_addr: std::net::SocketAddr,
    /// The server's plain HTTP address.
    pub http_addr: std::net::SocketAddr,
    /// The trust bundle's X.509 authorities (DER), from `bundle.pem`.
    pub anchors: Vec<Vec<u8>>,
    /// How long from spawning to `listening`.
    pub cold_start: Duration,
}

impl ServerProcess {
    /// Starts `herald server --config <config>` (the bench's build, or
    /// the executable `HERALD_BENCH_SERVER` names) whose data directory is
    /// `data_dir`; returns once it listens. Its log goes to
    /// `<data_dir>/server.log`.
    pub fn start(config: &std::path::Path, data_dir: &std::path::Path) -> ServerProcess {
        use std::io::{BufRead, BufReader};
        std::fs::create_dir_all(data_dir).unwrap();
        let log = std::fs::File::create(data_dir.join("server.log")).unwrap();
        let t0 = Instant::now();
        // HERALD_BENCH_SERVER names another build to compare (runs alternated).
        let bin = std::env::var_os("HERALD_BENCH_SERVER")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_herald").into());
        let mut child = std::process::Command::new(bin)
            .args(["server", "--config"])
            .arg(config)
            .env_remove("HERALD_CONFIG")
            .stdout(std::process::Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut banner = String::new();
        let listening = loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                let _ = child.kill();
                panic!(
                    "herald server exited before listening: {banner}{}",
                    std::fs::read_to_string(data_dir.join("server.log")).unwrap_or_default()
                );
            }
            banner.push_str(&line);
            if let Some(rest) = line.strip_prefix("listening ") {
                break rest.trim().to_owned();
            }
        };
        let cold_start = t0.elapsed();
        std::thread::spawn(move || for _ in reader.lines() {});
        let addr = |key: &str| -> std::net::SocketAddr {
            listening
                .split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                .unwrap()
                .parse()
                .unwrap()
        };
        let bundle = std::fs::read(data_dir.join("bundle.pem")).unwrap();
        let anchors = pem::parse_many(&bundle)
            .unwrap()
            .into_iter()
            .map(|p| p.into_contents())
            .collect();
        SERVER_PID
            .set(child.id())
            .expect("one server process per bench run");
        ServerProcess {
            grpc_addr: addr("grpc"),
            http_addr: addr("http"),
            anchors,
            cold_start,
            child,
        }
    }

    /// Runs `phase` while `perf record` samples the server process, when
    /// `HERALD_BENCH_PERF` names a directory; otherwise just runs it.
    /// After the phase, prints how many write transactions the store made
    /// during it, how many of them were guarded batches written again
    /// checked, and how many took [`herald_store::SLOW_WRITE`] or more
    /// (from the server's `/metrics`): a burst of slow requests with none
    /// is not the store's.
    pub async fn profile<T>(&self, name: &str, phase: impl std::future::Future<Output = T>) -> T {
        let before = self.store_writes().await;
        let result = self.record(name, phase).await;
        let after = self.store_writes().await;
        let rewritten = match (before.rewritten, after.rewritten) {
            (Some(b), Some(a)) => format!("{} rewritten", a - b),
            _ => "rewrites not counted".to_owned(),
        };
        println!(
            "  store: {} write transactions in this phase ({rewritten}), {} of them ≥ {} ms; the longest since start {:.1} ms",
            after.transactions - before.transactions,
            after.slow - before.slow,
            herald_store::SLOW_WRITE.as_millis(),
            after.longest_seconds * 1e3
        );
        result
    }

    /// The store's write counters, from the server's `/metrics`.
    async fn store_writes(&self) -> StoreWrites {
        let text = reqwest::get(format!("http://{}/metrics", self.http_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let value = |name: &str| -> Option<f64> {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
                .map(|v| v.trim().parse().unwrap())
        };
        let needed =
            |name: &str| value(name).unwrap_or_else(|| panic!("{name} missing from /metrics"));
        StoreWrites {
            transactions: needed("herald_store_write_transactions_total") as u64,
            // Absent from builds before guarded batches (`HERALD_BENCH_SERVER`).
            rewritten: value("herald_store_rewritten_write_transactions_total").map(|v| v as u64),
            slow: needed("herald_store_slow_write_transactions_total") as u64,
            longest_seconds: needed("herald_store_longest_write_transaction_seconds"),
        }
    }

    /// Runs `phase`, under `perf record` when `HERALD_BENCH_PERF` is set.
    async fn record<T>(&self, name: &str, phase: impl std::future::Future<Output = T>) -> T {
        let Some(dir) = std::env::var_os("HERALD_BENCH_PERF") else {
            return phase.await;
        };
        let out = std::path::Path::new(&dir).join(format!("{name}.data"));
        // An earlier run's file would look like this one's having started.
        let _ = std::fs::remove_file(&out);
        // System-wide: `perf record -p` misses threads the server starts
        // after it attached (sqlx opens SQLite connections, each a thread,
        // on demand). The report is filtered to the server's pid.
        let mut perf = std::process::Command::new("perf")
            .args(["record", "-q", "-a", "-k", "CLOCK_MONOTONIC", "-F", "1999"])
            .args(
                std::env::var("HERALD_BENCH_PERF_GRAPH")
                    .ok()
                    .map(|mode| ["--call-graph".to_owned(), mode])
                    .into_iter()
                    .flatten(),
            )
            .arg("-o")
            .arg(&out)
            .spawn()
            .expect("HERALD_BENCH_PERF is set but perf cannot be started");
        // perf attaches asynchronously; its output file appears once it has.
        while !out.exists() {
            if let Some(exit) = perf.try_wait().unwrap() {
                panic!(
                    "perf record exited before recording ({exit}): is perf installed and allowed?"
                );
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let result = phase.await;
        let status = std::process::Command::new("kill")
            .args(["-INT", &perf.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        perf.wait().unwrap();
        println!(
            "  (perf profile: perf report -i {} --pid {})",
            out.display(),
            self.child.id()
        );
        result
    }

    /// Stops the server (SIGTERM: it drains and closes the store) and
    /// waits for it to exit.
    pub fn stop(mut self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let exit = self.child.wait().unwrap();
        assert!(exit.success(), "herald server exited with {exit}");
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// The `n` largest of `(how long, when)` pairs, as `ms@ms` words (the
/// first with `decimals` decimals); sorts `pairs`.
pub fn largest_at(pairs: &mut [(Duration, Duration)], n: usize, decimals: usize) -> String {
    pairs.sort();
    let words: Vec<String> = pairs
        .iter()
        .rev()
        .take(n)
        .map(|(d, at)| {
            format!(
                "{:.*}@{:.0}",
                decimals,
                d.as_secs_f64() * 1e3,
                at.as_secs_f64() * 1e3
            )
        })
        .collect();
    words.join(" ")
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
    let probe = StallProbe::start(start);
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
                    lat.push((scheduled.elapsed(), scheduled - start));
                }
                lat
            })
        })
        .collect();
    let mut timed = Vec::with_capacity(n);
    for t in tasks {
        timed.extend(t.await.unwrap());
    }
    if std::env::var_os("HERALD_BENCH_SLOWEST").is_some() {
        // When the slowest requests were sent: together, a stall of the
        // whole server; spread out, queueing.
        println!(
            "  slowest (ms latency @ ms sent after start): {}",
            largest_at(&mut timed, 12, 0)
        );
    }
    let mut all: Vec<Duration> = timed.into_iter().map(|(lat, _)| lat).collect();
    let elapsed = start.elapsed();
    let stalls = probe.finish();
    let (srv1, cli1, sql1) = cpu_split3();
    all.sort();
    Run {
        rate: per_sec(n, elapsed),
        p50: percentile(&all, 0.5),
        p99: percentile(&all, 0.99),
        p999: percentile(&all, 0.999),
        max: all.last().copied().unwrap_or_default(),
        cores: if SERVER_PID.get().is_some() {
            (srv1 + cli1).saturating_sub(srv0 + cli0).as_secs_f64() / elapsed.as_secs_f64()
        } else {
            (cpu_time() - cpu0).as_secs_f64() / elapsed.as_secs_f64()
        },
        server_cpu: srv1.saturating_sub(srv0) / n as u32,
        client_cpu: cli1.saturating_sub(cli0) / n as u32,
        sqlite_cpu: sql1.saturating_sub(sql0) / n as u32,
        stalls,
    }
}

pub fn print_run(name: &str, r: &Run, ceiling: f64) {
    // A ceiling that was not measured (NaN) prints as such, not as a share.
    let share = |rate: f64| {
        if ceiling.is_finite() {
            format!("{:>4.1}% of ceiling", 100.0 * rate / ceiling)
        } else {
            "ceiling not measured".to_owned()
        }
    };
    println!(
        "  {name:<26} {:>6.0}/s  p50 {:>5.2} ms  p99 {:>5.2} ms  {}  | CPU {:.2} cores: server {:>3.0} µs/req (SQLite {:>3.0}), clients {:>3.0} µs/req",
        r.rate,
        r.p50.as_secs_f64() * 1e3,
        r.p99.as_secs_f64() * 1e3,
        share(r.rate),
        r.cores,
        us(r.server_cpu),
        us(r.sqlite_cpu),
        us(r.client_cpu),
    );
    println!(
        "  {:<26} p99.9 {:.2} ms  max {:.2} ms  | machine: latest wake-up {:.1} ms late @ {:.0} ms, {} ≥ {} ms",
        "",
        r.p999.as_secs_f64() * 1e3,
        r.max.as_secs_f64() * 1e3,
        r.stalls.worst.0.as_secs_f64() * 1e3,
        r.stalls.worst.1.as_secs_f64() * 1e3,
        r.stalls.count,
        STALL.as_millis(),
    );
    if r.server_cpu > Duration::ZERO {
        let capacity = 2.0 / r.server_cpu.as_secs_f64();
        println!(
            "  {:<26} server alone on both cores: {capacity:>6.0}/s = {}",
            "",
            share(capacity)
        );
    }
}

/// The store's write counters at one moment (the server's `/metrics`).
struct StoreWrites {
    transactions: u64,
    /// `None` for a server that does not count them.
    rewritten: Option<u64>,
    slow: u64,
    longest_seconds: f64,
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
    herald_server::ServerConfig::from_toml(&oidc_server_toml(dir, td, policies, issuer, issuer_ca))
        .unwrap()
}

/// [`oidc_server_config`] as TOML, for a [`ServerProcess`]; the data
/// directory is `dir/data`.
pub fn oidc_server_toml(
    dir: &std::path::Path,
    td: &str,
    policies: &std::path::Path,
    issuer: &str,
    issuer_ca: &std::path::Path,
) -> String {
    use std::os::unix::fs::PermissionsExt;
    let kek = dir.join("kek");
    std::fs::write(&kek, "5a".repeat(32)).unwrap();
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    format!(
        "trust_domain = \"{td}\"\ndata_dir = \"{}\"\n[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n[ca]\nkey_encryption_key_file = \"{}\"\n[rate_limit]\nper_caller_rate = 0.0\n[policy]\ndir = \"{}\"\n[[oidc.issuers]]\nissuer = \"{issuer}\"\naudiences = [\"herald\"]\nextra_roots = \"{}\"\nmin_refresh_interval = \"0s\"\n",
        dir.join("data").display(),
        kek.display(),
        policies.display(),
        issuer_ca.display(),
    )
}
