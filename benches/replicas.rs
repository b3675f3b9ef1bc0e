//! Scale-out benchmark (issue 6): X.509 SVID issuance with 1, 2 and 3
//! server replicas on PostgreSQL against one server on SQLite.
//!
//! For each setup, over gRPC + mTLS on loopback with 64 concurrent callers
//! spread over the replicas: renewals (the steady-state issuance) and mints
//! (join-token consumption, the single-use path), throughput, p50/p99;
//! then what each issuance cost the database: statements and batched reads
//! from Herald's own counters, transactions and tuples from
//! `pg_stat_database`, bytes from the tables' growth, WAL bytes and
//! full-page images from `pg_stat_wal` (each phase starting from a
//! `CHECKPOINT`), and the CPU the PostgreSQL processes used.
//!
//! Everything — replicas, PostgreSQL and the load generator — shares this
//! machine's 2 cores, so more replicas add coordination, not CPU; the
//! figures show the per-issuance cost a capacity model scales from.
//!
//! Run: `cargo bench --bench replicas` (env `HERALD_BENCH_N`, default 3000
//! issuances per phase; `HERALD_BENCH_SETUPS`, e.g. `sqlite,pg1`, for some
//! setups only; `HERALD_TEST_PG_URL` for another PostgreSQL).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use herald_client::keys::generate_key_and_csr;
use herald_client::{ClientIdentity, HeraldClient};
use herald_store::{QueryStats, Store};
use sqlx::Connection;

mod common;
use common::*;

const TD: &str = "bench.herald.test";
const CONC: usize = 64;
/// Connections (mTLS identities) per replica.
const HOLDERS: usize = 4;

fn pg_base_url() -> String {
    std::env::var("HERALD_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// CPU time so far of every `postgres` process on the machine.
fn postgres_cpu() -> Duration {
    let mut ticks = 0u64;
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            continue;
        };
        let Some((head, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        if !head.ends_with("(postgres") {
            continue;
        }
        let f: Vec<&str> = rest.split_whitespace().collect();
        ticks += f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Duration::from_secs_f64(ticks as f64 / 100.0)
}

/// `pg_stat_database` counters of the bench database and the size of the
/// tables an issuance writes, in the bench's schema.
#[derive(Debug, Clone, Copy, Default)]
struct PgCounters {
    xact: i64,
    inserted: i64,
    fetched: i64,
    bytes: i64,
    /// `pg_stat_wal`: WAL written and the full-page images in it (the
    /// whole server's, which here serves only this bench).
    wal_bytes: i64,
    wal_fpi: i64,
}

async fn pg_counters(url: &str) -> PgCounters {
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    // Every phase starts from a checkpoint, so each pays its full-page
    // images alike (the first change to a page after a checkpoint logs the
    // whole page): the worst case, and comparable between runs. It needs
    // a superuser or `pg_checkpoint`; without, the WAL figures depend on
    // when PostgreSQL last checkpointed.
    if let Err(e) = sqlx::query("CHECKPOINT").execute(&mut c).await {
        println!("    (CHECKPOINT refused, WAL figures not from a checkpoint: {e})");
    }
    // Each backend flushes its statistics when it goes idle, at most once a
    // second and up to 10 s late under contention: read until two reads a
    // second apart agree (this connection's own few transactions aside).
    let mut last = read_pg_counters(&mut c).await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = read_pg_counters(&mut c).await;
        let settled = now.inserted == last.inserted && now.xact - last.xact <= 8;
        last = now;
        if settled {
            break;
        }
    }
    c.close().await.unwrap();
    last
}

async fn read_pg_counters(c: &mut sqlx::PgConnection) -> PgCounters {
    sqlx::query("SELECT pg_stat_clear_snapshot()")
        .execute(&mut *c)
        .await
        .unwrap();
    let (xact, inserted, fetched): (i64, i64, i64) = sqlx::query_as(
        "SELECT xact_commit + xact_rollback, tup_inserted, tup_fetched FROM pg_stat_database WHERE datname = current_database()",
    )
    .fetch_one(&mut *c)
    .await
    .unwrap();
    let (bytes,): (i64,) = sqlx::query_as(
        "SELECT (pg_total_relation_size('issued_credentials') + pg_total_relation_size('audit_log'))::bigint",
    )
    .fetch_one(&mut *c)
    .await
    .unwrap();
    let (wal_bytes, wal_fpi): (i64, i64) =
        sqlx::query_as("SELECT wal_bytes::bigint, wal_fpi FROM pg_stat_wal")
            .fetch_one(&mut *c)
            .await
            .unwrap();
    PgCounters {
        xact,
        inserted,
        fetched,
        bytes,
        wal_bytes,
        wal_fpi,
    }
}

fn sum_stats(servers: &[herald_server::RunningServer]) -> QueryStats {
    let mut t = QueryStats::default();
    for s in servers {
        let q = s.shared.store.query_stats();
        t.transactions += q.transactions;
        t.commits += q.commits;
        t.write_statements += q.write_statements;
        t.reads += q.reads;
    }
    t
}

fn report_costs(
    n: usize,
    q0: QueryStats,
    q1: QueryStats,
    pg: Option<(PgCounters, PgCounters, Duration)>,
) {
    let n = n as f64;
    let txns = (q1.transactions - q0.transactions) as f64;
    println!(
        "    Herald's queries per issuance: {:.2} write statements + {:.2} batched reads = {:.2}  ({:.1} issuances per write transaction)",
        (q1.write_statements - q0.write_statements) as f64 / n,
        (q1.reads - q0.reads) as f64 / n,
        ((q1.write_statements - q0.write_statements) + (q1.reads - q0.reads)) as f64 / n,
        (q1.commits - q0.commits) as f64 / txns.max(1.0),
    );
    if let Some((a, b, cpu)) = pg {
        println!(
            "    PostgreSQL saw per issuance: {:.2} transactions, {:.2} rows inserted, {:.2} rows fetched, {:.0} bytes of table+index growth, {:.0} µs of its CPU",
            (b.xact - a.xact) as f64 / n,
            (b.inserted - a.inserted) as f64 / n,
            (b.fetched - a.fetched) as f64 / n,
            (b.bytes - a.bytes) as f64 / n,
            cpu.as_secs_f64() * 1e6 / n,
        );
        println!(
            "    PostgreSQL's WAL per issuance (from a checkpoint): {:.0} bytes, {:.2} full-page images",
            (b.wal_bytes - a.wal_bytes) as f64 / n,
            (b.wal_fpi - a.wal_fpi) as f64 / n,
        );
    }
}

fn print_phase(name: &str, r: &Run) {
    println!(
        "  {name:<30} {:>6.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  | this process {:.2} cores",
        r.rate,
        r.p50.as_secs_f64() * 1e3,
        r.p99.as_secs_f64() * 1e3,
        r.cores,
    );
}

async fn setup(
    sh: &tokio::runtime::Handle,
    replicas: usize,
    database_url: &str,
    dir: &std::path::Path,
) -> Vec<herald_server::RunningServer> {
    let kek = dir.join("kek");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::write(&kek, "5a".repeat(32)).unwrap();
        std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut servers = Vec::new();
    for i in 0..replicas {
        let toml = format!(
            "trust_domain = \"{TD}\"\ndata_dir = \"{}\"\ndatabase_url = \"{database_url}\"\n[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n[ca]\nkey_encryption_key_file = \"{}\"\n[rate_limit]\n# One load generator is one address: the per-address limit would\n# measure itself.\nper_caller_rate = 0.0\n{}",
            dir.join(format!("data-{i}")).display(),
            kek.display(),
            common::bootstrap_policy_section(dir, TD)
        );
        let cfg = herald_server::ServerConfig::from_toml(&toml).unwrap();
        servers.push(sh.spawn(herald_server::start(cfg)).await.unwrap().unwrap());
    }
    servers
}

async fn tokens(store: &Store, n: usize, tag: &str) -> Vec<String> {
    let mut out = Vec::with_capacity(n);
    let mut pending = Vec::new();
    for i in 0..n {
        let (token, rec) = common::bootstrap_token(format!("spiffe://{TD}/bench/{tag}/{i}"));
        let s = store.clone();
        pending.push(tokio::spawn(async move {
            s.create_join_token(
                rec,
                herald_core::AuditEvent::new("join_token.create", "bench"),
            )
            .await
            .unwrap()
        }));
        out.push(token);
        // A few at a time: thousands at once wait for the pool's eight
        // connections past its acquire timeout on a slow disk.
        if pending.len() == 64 {
            for p in pending.drain(..) {
                p.await.unwrap();
            }
        }
    }
    for p in pending {
        p.await.unwrap();
    }
    out
}

async fn run_setup(
    sh: &tokio::runtime::Handle,
    label: &str,
    replicas: usize,
    database_url: &str,
    n: usize,
    csrs: Arc<Vec<Vec<u8>>>,
) {
    let dir = tempfile::tempdir().unwrap();
    let servers = setup(sh, replicas, database_url, dir.path()).await;
    let is_pg = database_url.starts_with("postgres");
    println!("## {label}");
    let anchors = servers[0].shared.ca().bundle.x509_authorities.clone();
    let urls: Vec<String> = servers
        .iter()
        .map(|s| format!("https://{}", s.grpc_addr))
        .collect();
    let store = servers[0].shared.store.clone();
    let tag = format!("r{replicas}-{}", if is_pg { "pg" } else { "sqlite" });
    let toks = Arc::new(tokens(&store, n + replicas * HOLDERS, &tag).await);

    // Renewal: HOLDERS mTLS connections per replica, callers spread over all.
    let mut holders = Vec::new();
    for (r, url) in urls.iter().enumerate() {
        let minting = HeraldClient::connect(url, &anchors, None).await.unwrap();
        for h in 0..HOLDERS {
            let kc = generate_key_and_csr().unwrap();
            let resp = minting
                .mint_x509_svid(&toks[n + r * HOLDERS + h], kc.csr_der)
                .await
                .unwrap();
            let id = ClientIdentity {
                cert_chain: resp.cert_chain,
                key_pkcs8: kc.key_pkcs8,
            };
            holders.push(
                HeraldClient::connect(url, &anchors, Some(id))
                    .await
                    .unwrap(),
            );
        }
    }
    let holders = Arc::new(holders);

    let measure = |phase: &'static str| {
        let servers = &servers;
        async move {
            let pg = if is_pg {
                Some((pg_counters(database_url).await, postgres_cpu()))
            } else {
                None
            };
            (phase, sum_stats(servers), pg)
        }
    };

    let (_, q0, pg0) = measure("renew").await;
    let (hs, cs) = (holders.clone(), csrs.clone());
    let renew = drive(n, CONC, None, move |i| {
        let (hs, cs) = (hs.clone(), cs.clone());
        async move {
            hs[i % hs.len()]
                .renew_x509_svid(cs[i].clone())
                .await
                .unwrap();
        }
    })
    .await;
    let (_, q1, pg1) = measure("renew").await;
    print_phase("renew (mTLS)", &renew);
    report_costs(
        n,
        q0,
        q1,
        pg0.zip(pg1).map(|((a, c0), (b, c1))| (a, b, c1 - c0)),
    );

    let mut minters = Vec::new();
    for url in &urls {
        for _ in 0..HOLDERS {
            minters.push(HeraldClient::connect(url, &anchors, None).await.unwrap());
        }
    }
    let minters = Arc::new(minters);
    let (_, q0, pg0) = measure("mint").await;
    let (ms, cs, tk) = (minters.clone(), csrs.clone(), toks.clone());
    let mint = drive(n, CONC, None, move |i| {
        let (ms, cs, tk) = (ms.clone(), cs.clone(), tk.clone());
        async move {
            ms[i % ms.len()]
                .mint_x509_svid(&tk[i], cs[n + i].clone())
                .await
                .unwrap();
        }
    })
    .await;
    let (_, q1, pg1) = measure("mint").await;
    print_phase("mint (join token)", &mint);
    report_costs(
        n,
        q0,
        q1,
        pg0.zip(pg1).map(|((a, c0), (b, c1))| (a, b, c1 - c0)),
    );

    let report = store.verify_audit_chain(1, None).await.unwrap();
    println!("  audit chain verified: {} records", report.records);
    for s in servers {
        sh.spawn(s.shutdown()).await.unwrap();
    }
}

/// Whether `HERALD_BENCH_SETUPS` (comma-separated: `sqlite`, `pg1`, `pg2`,
/// `pg3`; all when unset) asks for this setup.
fn wanted(setup: &str) -> bool {
    std::env::var("HERALD_BENCH_SETUPS")
        .map(|v| v.split(',').any(|s| s.trim() == setup))
        .unwrap_or(true)
}

fn main() {
    let n = bench_n(3000);
    let csrs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..n * 2)
            .map(|_| generate_key_and_csr().unwrap().csr_der)
            .collect(),
    );
    let server_rt = runtime(SERVER_THREADS);
    let sh = server_rt.handle().clone();
    let rt = runtime(CLIENT_THREADS);
    rt.block_on(async move {
        println!(
            "# issuance on 2 cores shared by replicas, PostgreSQL and {CONC} callers; {n} issuances per phase"
        );
        let dir = tempfile::tempdir().unwrap();
        let sqlite = format!("sqlite://{}", dir.path().join("bench.db").display());
        if wanted("sqlite") {
            run_setup(&sh, "1 replica, SQLite", 1, &sqlite, n, csrs.clone()).await;
        }
        let base = pg_base_url();
        for replicas in (1..=3).filter(|r| wanted(&format!("pg{r}"))) {
            let schema = format!("herald_bench_{}_{replicas}", std::process::id());
            let url = Store::create_postgres_schema(&base, &schema).await.unwrap();
            let label = format!("{replicas} replica(s), PostgreSQL");
            run_setup(&sh, &label, replicas, &url, n, csrs.clone()).await;
            Store::drop_postgres_schema(&base, &schema).await.unwrap();
        }
    });
    drop(server_rt);
}
