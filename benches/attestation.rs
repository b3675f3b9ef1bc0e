//! TPM node attestation benchmark (BRIEF §8, issue: TPM attestation + agent).
//!
//! Prints, from one run on this machine, against a real swtpm:
//! 1. quote verification per second (signature, strict parse, signer,
//!    nonce, selection, PCR digest) next to the bare ECDSA P-256 verify of
//!    the same signature — the target is within 2× of it;
//! 2. the other server-side steps: EK chain verification, software
//!    MakeCredential (RSA-OAEP + KDFa + AES-CFB + HMAC);
//! 3. attestations per second end to end (agent TPM layer → gRPC stream →
//!    in-process server on SQLite), sequential (swtpm serves one client),
//!    with the time split between the TPM and everything else;
//! 4. the resident memory of a running `herald agent` that has attested.
//!
//! Run: `cargo bench --bench attestation` (`HERALD_BENCH_N` scales counts).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use herald_agent::tpm::{NodeTpm, PCR_BANK_SHA256, TpmHandle};
use herald_attest::tpm::*;
use herald_test_tpm::SoftTpm;

fn pem_ders(path: &std::path::Path) -> Vec<Vec<u8>> {
    pem::parse_many(std::fs::read(path).unwrap())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect()
}

fn rss_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

fn main() {
    let n = bench_n(20_000);
    let tpm = SoftTpm::start().unwrap();
    let state = tempfile::tempdir().unwrap();

    // One real quote from the TPM, verified many times.
    let (identity, quote, nonce, tpm_open, tpm_quote) = {
        let t = Instant::now();
        let mut node = NodeTpm::open(&tpm.tcti(), state.path()).unwrap();
        let tpm_open = t.elapsed();
        let nonce = attestation_nonce_binding(&[1; 32], b"spki");
        let t = Instant::now();
        let q = node
            .quote(&nonce, PCR_BANK_SHA256, &[0, 1, 2, 3, 4, 5, 6, 7])
            .unwrap();
        (node.identity().clone(), q, nonce, tpm_open, t.elapsed())
    };
    let ak = TpmPublic::parse(&identity.ak_public).unwrap();
    let ek = TpmPublic::parse(&identity.ek_public).unwrap();
    let signer = qualified_name_under_ek(&ek, &ak).unwrap();
    let selection = PcrSelection {
        bank: PcrBank::Sha256,
        pcrs: (0..8).collect(),
    };
    let input = QuoteInput {
        ak: &ak,
        expected_signer: &signer,
        attest: &quote.attest,
        signature: &quote.signature,
        expected_extra_data: &nonce,
        selection: &selection,
        pcr_values: &quote.pcr_values,
    };
    verify_quote(&input).unwrap();

    // The bare ECDSA verify of the same signature over the same bytes.
    let mut r = quote.signature[4..].to_vec();
    let rl = u16::from_be_bytes([r[0], r[1]]) as usize;
    let rv = r[2..2 + rl].to_vec();
    r.drain(..2 + rl);
    let sl = u16::from_be_bytes([r[0], r[1]]) as usize;
    let sv = r[2..2 + sl].to_vec();
    let mut fixed = vec![0u8; 64];
    fixed[32 - rv.len()..32].copy_from_slice(&rv);
    fixed[64 - sv.len()..].copy_from_slice(&sv);
    let herald_agent_point = {
        let KeyDetail::Ecc { x, y, .. } = &ak.detail else {
            panic!()
        };
        let mut p = vec![4u8];
        p.extend(std::iter::repeat_n(0, 32 - x.len()));
        p.extend_from_slice(x);
        p.extend(std::iter::repeat_n(0, 32 - y.len()));
        p.extend_from_slice(y);
        p
    };
    let key = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        &herald_agent_point,
    );
    let reps = n;
    let t = Instant::now();
    for _ in 0..reps {
        key.verify(std::hint::black_box(&quote.attest), &fixed)
            .unwrap();
    }
    let bare = t.elapsed() / reps as u32;
    let t = Instant::now();
    for _ in 0..reps {
        std::hint::black_box(verify_quote(std::hint::black_box(&input)).unwrap());
    }
    let full = t.elapsed() / reps as u32;
    println!(
        "# TPM attestation benchmark ({} cores visible)",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    println!("## quote verification (one core, {reps} reps, 8 PCRs)");
    println!(
        "bare ECDSA P-256 verify (aws-lc-rs):  {:>8.1} µs  {:>8.0}/s",
        us(bare),
        1e6 / us(bare)
    );
    println!(
        "verify_quote (all checks):           {:>8.1} µs  {:>8.0}/s  = {:.2}× the bare verify (target ≤ 2×)",
        us(full),
        1e6 / us(full),
        full.as_secs_f64() / bare.as_secs_f64()
    );

    // Other server-side steps.
    let trust = EkTrust::from_der(
        &pem_ders(&tpm.ek_root_pem_path()),
        &pem_ders(&tpm.ek_intermediate_pem_path()),
    )
    .unwrap();
    let m = (n / 10).max(200);
    let t = Instant::now();
    for _ in 0..m {
        let v = verify_ek_certificate(
            &trust,
            &identity.ek_certificate,
            &[],
            std::time::SystemTime::now(),
        )
        .unwrap();
        check_ek_public_matches(&ek, &v).unwrap();
    }
    let chain = t.elapsed() / m as u32;
    let t = Instant::now();
    for _ in 0..m {
        std::hint::black_box(make_credential(&ek, &ak.name().unwrap(), &[7; 32]).unwrap());
    }
    let mc = t.elapsed() / m as u32;
    println!(
        "EK chain (2 RSA signatures) + EK match: {:>6.1} µs",
        us(chain)
    );
    println!(
        "software MakeCredential (RSA-2048 OAEP): {:>5.1} µs",
        us(mc)
    );
    println!(
        "TPM (swtpm): open + EK + load AK {:.1} ms, quote of 8 PCRs + PCR read {:.1} ms",
        tpm_open.as_secs_f64() * 1e3,
        tpm_quote.as_secs_f64() * 1e3
    );

    // End to end against an in-process server.
    let rt = runtime(SERVER_THREADS);
    let attestations = (n / 200).clamp(20, 200);
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let server = tpm_node_server(dir.path(), &tpm, "[0, 1, 2, 3, 4, 5, 6, 7]", "").await;
        let url = format!("https://{}", server.grpc_addr);
        let anchors = server.shared.ca().bundle.x509_authorities.clone();
        let client = herald_client::HeraldClient::connect(&url, &anchors, None).await.unwrap();
        let handle = TpmHandle::open(&tpm.tcti(), state.path()).await.unwrap();
        // Warm-up (enrolment), then timed re-attestations.
        herald_agent::attest::attest(&client, &handle, None).await.unwrap();
        let (cpu0, _) = cpu_split();
        let mut lat = Vec::with_capacity(attestations);
        let t = Instant::now();
        for _ in 0..attestations {
            let s = Instant::now();
            herald_agent::attest::attest(&client, &handle, None).await.unwrap();
            lat.push(s.elapsed());
        }
        let total = t.elapsed();
        let (cpu1, _) = cpu_split();
        lat.sort_unstable();
        // The TPM's share: activation + quote, timed alone.
        let t = Instant::now();
        for _ in 0..attestations {
            let cred = make_credential(&ek, &ak.name().unwrap(), &[3; 32]).unwrap();
            handle.activate_credential(cred.id_object, cred.encrypted_secret).await.unwrap();
            handle.quote(nonce.to_vec(), PCR_BANK_SHA256, (0..8).collect()).await.unwrap();
        }
        let tpm_part = t.elapsed() / attestations as u32;
        let per = total / attestations as u32;
        println!("## end to end: agent TPM layer → gRPC stream → server (SQLite), {attestations} sequential attestations on one swtpm");
        println!(
            "{:.1} attestations/s, p50 {:.1} ms, p99 {:.1} ms; per attestation: TPM (ActivateCredential + Quote + PCR read) {:.1} ms, everything else {:.1} ms (server CPU {:.0} µs incl. SQLite)",
            per_sec(attestations, total),
            percentile(&lat, 0.5).as_secs_f64() * 1e3,
            percentile(&lat, 0.99).as_secs_f64() * 1e3,
            tpm_part.as_secs_f64() * 1e3,
            (per.saturating_sub(tpm_part)).as_secs_f64() * 1e3,
            us((cpu1 - cpu0) / attestations as u32),
        );
        drop(handle);
        drop(client);

        // Agent resident memory: the real binary, attested and idle.
        let bin = env!("CARGO_BIN_EXE_herald");
        let agent_dir = tempfile::tempdir().unwrap();
        let bundle = agent_dir.path().join("bundle.pem");
        std::fs::write(&bundle, herald_client::files::to_pem("CERTIFICATE", &anchors)).unwrap();
        let cfg = agent_dir.path().join("agent.toml");
        std::fs::write(
            &cfg,
            format!(
                "servers = [\"{url}\"]\ntrust_bundle = \"{}\"\ndata_dir = \"{}\"\n[tpm]\ntcti = \"{}\"\n",
                bundle.display(),
                agent_dir.path().join("state").display(),
                tpm.tcti()
            ),
        )
        .unwrap();
        let mut child = std::process::Command::new(bin)
            .args(["agent", "--config"])
            .arg(&cfg)
            .env("HERALD_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let status = agent_dir.path().join("state/status.json");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if herald_agent::AgentStatus::read(&status).is_ok_and(|s| s.state == "ready") {
                break;
            }
            assert!(Instant::now() < deadline, "the agent did not attest");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let rss = rss_kib(child.id(), "VmRSS:").unwrap_or(0);
        let anon = rss_kib(child.id(), "RssAnon:").unwrap_or(0);
        println!(
            "## agent resident memory (attested, idle, node SVID cached): {:.1} MiB, of which private (anonymous) {:.1} MiB; the rest are clean pages of the one `herald` executable",
            rss as f64 / 1024.0,
            anon as f64 / 1024.0
        );
        let _ = child.kill();
        let _ = child.wait();
        drop(server);
    });
}
