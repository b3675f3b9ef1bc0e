//! X.509 SVID issuance benchmark (BRIEF §8).
//!
//! Prints, from one run on this machine:
//! 1. signing backends: ECDSA P-256 sign/verify with aws-lc-rs (used) and the pure-Rust `p256` crate;
//! 2. the crypto ceiling: CSR verify + leaf build/sign, on 1 and 2 threads;
//! 3. end to end over gRPC+TLS on loopback against an in-process server on
//!    SQLite with durable audit records: mint (join token) and renew (mTLS),
//!    throughput, p50/p99 and the ratio to the ceiling;
//! 4. p99 at 80% of the measured peak rate (open loop).
//!
//! Run: `cargo bench --bench issuance` (env `HERALD_BENCH_N` scales the request count).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use herald_ca::authority::CaMaterial;
use herald_ca::csr::verify_csr;
use herald_ca::{CertificateAuthority, X509Grant};
use herald_client::keys::generate_key_and_csr;
use herald_client::{ClientIdentity, HeraldClient};
use herald_core::TrustDomain;

mod common;
use common::*;

const TD: &str = "bench.herald.test";

fn backends() {
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_ASN1, ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair,
        UnparsedPublicKey,
    };
    use p256::ecdsa::signature::{Signer, Verifier};
    let msg = [7u8; 300];
    let n = 3000;
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let kp = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
    let t = Instant::now();
    let mut sig = None;
    for _ in 0..n {
        sig = Some(kp.sign(&rng, &msg).unwrap());
    }
    let aws_sign = t.elapsed() / n as u32;
    let sig = sig.unwrap();
    let pk = UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, kp.public_key().as_ref().to_vec());
    let t = Instant::now();
    for _ in 0..n {
        pk.verify(&msg, sig.as_ref()).unwrap();
    }
    let aws_verify = t.elapsed() / n as u32;

    let sk = p256::ecdsa::SigningKey::from_slice(&[0x42; 32]).unwrap();
    let vk = p256::ecdsa::VerifyingKey::from(&sk);
    let t = Instant::now();
    let mut psig: Option<p256::ecdsa::Signature> = None;
    for _ in 0..n / 4 {
        psig = Some(sk.sign(&msg));
    }
    let p_sign = t.elapsed() / (n / 4) as u32;
    let psig = psig.unwrap();
    let t = Instant::now();
    for _ in 0..n / 4 {
        vk.verify(&msg, &psig).unwrap();
    }
    let p_verify = t.elapsed() / (n / 4) as u32;
    println!("## ECDSA P-256, one core");
    println!(
        "  aws-lc-rs   sign {:>6.1} µs   verify {:>6.1} µs   (used on every hot path)",
        us(aws_sign),
        us(aws_verify)
    );
    println!(
        "  p256 crate  sign {:>6.1} µs   verify {:>6.1} µs",
        us(p_sign),
        us(p_verify)
    );
}

fn test_ca() -> Arc<CertificateAuthority> {
    let td = TrustDomain::new(TD).unwrap();
    let now = herald_server::unix_now();
    let m = CaMaterial::generate_root(&td, Duration::from_secs(86400), now).unwrap();
    Arc::new(
        CertificateAuthority::load(td, &m.key_id, &m.cert_der, &m.chain_der, &m.key_pkcs8).unwrap(),
    )
}

/// CSR verify + leaf build/sign per second with `threads` threads.
fn ceiling(csrs: &Arc<Vec<Vec<u8>>>, threads: usize, per_thread: usize) -> f64 {
    let ca = test_ca();
    let td = TrustDomain::new(TD).unwrap();
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (ca, csrs, td) = (ca.clone(), csrs.clone(), td.clone());
            std::thread::spawn(move || {
                let grant = X509Grant {
                    spiffe_id: td.spiffe_id("/bench/w").unwrap(),
                    ttl: Duration::from_secs(3600),
                    dns_names: vec![],
                };
                let now = herald_server::unix_now();
                for i in 0..per_thread {
                    let csr = verify_csr(&csrs[(t * per_thread + i) % csrs.len()]).unwrap();
                    std::hint::black_box(ca.issue_x509_svid(&csr, &grant, now).unwrap());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    per_sec(threads * per_thread, start.elapsed())
}

fn conc_store() -> usize {
    64
}

fn main() {
    let n = bench_n(6000);
    // HERALD_BENCH_ONLY=mint runs just the end-to-end mint phase (for profiling).
    let only_mint = std::env::var("HERALD_BENCH_ONLY").is_ok_and(|v| v == "mint");
    if !only_mint {
        backends();
    }

    let csrs: Arc<Vec<Vec<u8>>> = Arc::new(
        (0..n * 2)
            .map(|_| generate_key_and_csr().unwrap().csr_der)
            .collect(),
    );
    let (c1, c2) = if only_mint {
        // Not measured: the runs below say so instead of a share.
        (f64::NAN, f64::NAN)
    } else {
        (ceiling(&csrs, 1, 3000), ceiling(&csrs, 2, 3000))
    };
    if !only_mint {
        println!("## crypto ceiling: CSR verify + leaf build/sign");
        println!("  1 thread   {c1:>8.0}/s ({:.1} µs each)", 1e6 / c1);
        println!("  2 threads  {c2:>8.0}/s   <- ceiling for the ratios below");
    }

    // The server runs in a process of its own (the release `herald`
    // binary, as deployed); this process is the load generator.
    let rt = runtime(CLIENT_THREADS);
    rt.block_on(async move {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let kek = dir.path().join("kek");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&kek, "5a".repeat(32)).unwrap();
            std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let toml = format!(
            "trust_domain = \"{TD}\"\ndata_dir = \"{}\"\n[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n[ca]\nkey_encryption_key_file = \"{}\"\n[rate_limit]\n# One load generator is one address: the per-address limit would\n# measure itself.\nper_caller_rate = 0.0\n{}",
            data.display(),
            kek.display(),
            common::bootstrap_policy_section(dir.path(), TD)
        );
        let config = dir.path().join("herald.toml");
        std::fs::write(&config, toml).unwrap();
        let server = ServerProcess::start(&config, &data);
        println!(
            "## server cold start (process start, new SQLite DB, CA generation, listeners): {:.1} ms",
            server.cold_start.as_secs_f64() * 1e3
        );
        let url = format!("https://{}", server.grpc_addr);
        let anchors = server.anchors.clone();
        let conns = 4;

        // Join tokens are written to the server's database from here, as
        // `herald token create` does (not timed).
        let db = format!("sqlite://{}", data.join("herald.db").display());
        let tokens_store = herald_store::Store::open(&db).await.unwrap();
        // Peak mint, the renewing holders, and three paced mint phases.
        let token_count = 4 * n + conns;
        let mut tokens = Vec::with_capacity(token_count);
        for chunk in (0..token_count).collect::<Vec<_>>().chunks(256) {
            let mut pending = Vec::new();
            for &i in chunk {
                let (token, rec) = common::bootstrap_token(format!("spiffe://{TD}/bench/{i}"));
                let s = tokens_store.clone();
                pending.push(tokio::spawn(async move { s.create_join_token(rec, herald_core::AuditEvent::new("join_token.create", "bench")).await.unwrap() }));
                tokens.push(token);
            }
            for p in pending {
                p.await.unwrap();
            }
        }
        tokens_store.close().await;
        let tokens = Arc::new(tokens);

        // The store on its own, in this process on a database of its own:
        // where the non-crypto time goes.
        store_alone(dir.path(), &tokens, n.min(4000)).await;

        // A pool of connections; HTTP/2 multiplexes the concurrent calls over them.
        let conc: usize = std::env::var("HERALD_BENCH_CONC").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
        let mut clients = Vec::new();
        for _ in 0..conns {
            clients.push(HeraldClient::connect(&url, &anchors, None).await.unwrap());
        }
        let clients = Arc::new(clients);

        println!("## end to end over gRPC + TLS on loopback, server in its own process, SQLite (durable, audit in the same transaction), {conc} concurrent callers");
        let (cl, tk, cs) = (clients.clone(), tokens.clone(), csrs.clone());
        let mint = server
            .profile(
                "mint",
                drive(n, conc, None, move |i| {
                    let (cl, tk, cs) = (cl.clone(), tk.clone(), cs.clone());
                    async move {
                        cl[i % cl.len()].mint_x509_svid(&tk[i], cs[i].clone()).await.unwrap();
                    }
                }),
            )
            .await;
        print_run("mint (join token), peak", &mint, c2);

        // Latency under paced (open-loop) load: at 80% of the measured peak, and lower.
        let mut next_token = n + conns;
        for share in [0.8, 0.6, 0.4] {
            let target = mint.rate * share;
            let m = n.min((target * 3.0) as usize).max(500);
            let first = next_token;
            next_token += m;
            let (cl, tk, cs) = (clients.clone(), tokens.clone(), csrs.clone());
            let paced = server
                .profile(
                    &format!("mint-{:.0}", share * 100.0),
                    drive(m, conc * 4, Some(target), move |i| {
                        let (cl, tk, cs) = (cl.clone(), tk.clone(), cs.clone());
                        async move {
                            cl[i % cl.len()].mint_x509_svid(&tk[first + i], cs[i % cs.len()].clone()).await.unwrap();
                        }
                    }),
                )
                .await;
            print_run(&format!("mint at {target:.0}/s ({:.0}%)", share * 100.0), &paced, c2);
        }

        if only_mint {
            server.stop();
            return;
        }

        // Renewal: each holder renews over its own mTLS connection.
        let mut holders = Vec::new();
        for h in 0..conns {
            let kc = generate_key_and_csr().unwrap();
            let r = clients[0].mint_x509_svid(&tokens[n + h], kc.csr_der).await.unwrap();
            holders.push(HeraldClient::connect(&url, &anchors, Some(ClientIdentity { cert_chain: r.cert_chain, key_pkcs8: kc.key_pkcs8 })).await.unwrap());
        }
        let holders = Arc::new(holders);
        let (hs, cs) = (holders.clone(), csrs.clone());
        let renew = server
            .profile(
                "renew",
                drive(n, conc, None, move |i| {
                    let (hs, cs) = (hs.clone(), cs.clone());
                    async move {
                        hs[i % hs.len()].renew_x509_svid(cs[n + i].clone()).await.unwrap();
                    }
                }),
            )
            .await;
        print_run("renew (mTLS), peak", &renew, c2);

        // Latency under paced (open-loop) load: at 80% of the measured peak, and lower.
        for share in [0.8, 0.6, 0.4] {
            let target = renew.rate * share;
            let m = n.min((target * 3.0) as usize).max(500);
            let (hs, cs) = (holders.clone(), csrs.clone());
            let paced = server
                .profile(
                    &format!("renew-{:.0}", share * 100.0),
                    drive(m, conc * 4, Some(target), move |i| {
                        let (hs, cs) = (hs.clone(), cs.clone());
                        async move {
                            hs[i % hs.len()].renew_x509_svid(cs[i % cs.len()].clone()).await.unwrap();
                        }
                    }),
                )
                .await;
            print_run(&format!("renew at {target:.0}/s ({:.0}%)", share * 100.0), &paced, c2);
        }

        server.stop();
        let store = herald_store::Store::open(&db).await.unwrap();
        let report = store.verify_audit_chain(1, None).await.unwrap();
        println!("## audit chain verified: {} records", report.records);
    });
}

/// Token lookups and issuance commits on a store in this process, on a
/// database of its own: what SQLite costs per request without the rest.
async fn store_alone(dir: &std::path::Path, tokens: &[String], m: usize) {
    let store = herald_store::Store::open(&format!("sqlite://{}", dir.join("alone.db").display()))
        .await
        .unwrap();
    let mut hashes = Vec::with_capacity(m);
    for (i, t) in tokens.iter().take(m).enumerate() {
        let (_, mut rec) = common::bootstrap_token(format!("spiffe://{TD}/alone/{i}"));
        rec.token_hash = herald_attest::join_token::parse(t).unwrap();
        hashes.push(rec.token_hash);
        store
            .create_join_token(
                rec,
                herald_core::AuditEvent::new("join_token.create", "bench"),
            )
            .await
            .unwrap();
    }
    let hashes = Arc::new(hashes);
    let cpu = || common::process_cpu("/proc/self/task");
    let t = (Instant::now(), cpu());
    let (st, hs) = (store.clone(), hashes.clone());
    let reads = futures::future::join_all((0..conc_store()).map(|c| {
        let (st, hs) = (st.clone(), hs.clone());
        async move {
            for i in (c..hs.len()).step_by(conc_store()) {
                st.join_token(&hs[i]).await.unwrap().unwrap();
            }
        }
    }));
    reads.await;
    let reads = (
        per_sec(m, t.0.elapsed()),
        us(cpu().0.saturating_sub((t.1).0)) / m as f64,
    );
    let t = (Instant::now(), cpu());
    let w0 = store.query_stats();
    let st = store.clone();
    let commits = futures::future::join_all((0..conc_store()).map(|c| {
        let st = st.clone();
        async move {
            for i in (c..m).step_by(conc_store()) {
                let mut audit = herald_core::AuditEvent::new("bench.commit", "bench");
                audit.serial = Some(format!("ff{i:030x}"));
                let issued = herald_store::IssuedCredential {
                    serial: format!("ff{i:030x}"),
                    kind: "x509_svid".into(),
                    spiffe_id: format!("spiffe://{TD}/bench/c"),
                    not_before: 0,
                    not_after: 1,
                    issued_at: 0,
                    evidence_type: "join_token".into(),
                    evidence_digest: None,
                    policy: None,
                    parent_serial: None,
                    public_key_sha256: String::new(),
                    ca_key_id: String::new(),
                    origin: Some(herald_core::Origin::Bootstrap),
                    root_serial: format!("ff{i:030x}"),
                    root_at: 0,
                    cert_sha256: Some(format!("{i:064x}")),
                };
                st.commit(herald_store::Commit {
                    consume_join_token: None,
                    consume_replay: None,
                    parent: None,
                    now_s: 0,
                    issued: Some(issued),
                    audit,
                })
                .await
                .unwrap();
            }
        }
    }));
    commits.await;
    let commits = (
        per_sec(m, t.0.elapsed()),
        us(cpu().0.saturating_sub((t.1).0)) / m as f64,
    );
    let w1 = store.query_stats();
    println!(
        "## the store alone (SQLite via sqlx, in the generator's process), {} concurrent",
        conc_store()
    );
    println!(
        "  token lookup (pool read)   {:>8.0}/s   {:>5.1} µs CPU each (all threads)",
        reads.0, reads.1
    );
    println!(
        "  issuance+audit commit      {:>8.0}/s   {:>5.1} µs CPU each (all threads; group commit: {:.1} commits per write transaction)",
        commits.0,
        commits.1,
        (w1.commits - w0.commits) as f64 / (w1.transactions - w0.transactions).max(1) as f64
    );
    store.close().await;
}
