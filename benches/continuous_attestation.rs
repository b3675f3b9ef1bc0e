//! Continuous attestation benchmark (issue 19, parts 3–4), on swtpm.
//!
//! Prints, from one run on this machine, against a real swtpm and an
//! in-process server on SQLite, each step as the agent takes it (a fresh
//! mTLS connection per renewal, the newest SVID presented each time):
//! 1. end-to-end TPM attestation latency (enrolment path: EK chain, AK,
//!    MakeCredential → ActivateCredential, quote, policy, commit);
//! 2. node-SVID renewal latency without a fresh quote (`RenewX509Svid`);
//! 3. node-SVID renewal latency with a fresh quote (`reattest:
//!    every_renewal`: the attestation stream over mTLS, quote checked as at
//!    enrolment, no credential activation).
//!
//! Run: `cargo bench --bench continuous_attestation` (`HERALD_BENCH_N`
//! sets the number of each).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use herald_agent::attest::{NodeSvid, attest, reattest};
use herald_agent::tpm::TpmHandle;
use herald_client::{ClientIdentity, HeraldClient, keys};
use herald_test_tpm::SoftTpm;

fn line(what: &str, lat: &mut [Duration]) {
    lat.sort_unstable();
    let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
    println!(
        "{what:<52} mean {:>6.1} ms  p50 {:>6.1} ms  p99 {:>6.1} ms  ({} runs)",
        mean.as_secs_f64() * 1e3,
        percentile(lat, 0.5).as_secs_f64() * 1e3,
        percentile(lat, 0.99).as_secs_f64() * 1e3,
        lat.len()
    );
}

async fn as_node(url: &str, anchors: &[Vec<u8>], svid: &NodeSvid) -> HeraldClient {
    HeraldClient::connect(
        url,
        anchors,
        Some(ClientIdentity {
            cert_chain: svid.response.cert_chain.clone(),
            key_pkcs8: svid.key_pkcs8.clone(),
        }),
    )
    .await
    .unwrap()
}

fn main() {
    let n = bench_n(40);
    let tpm = SoftTpm::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let rt = runtime(SERVER_THREADS);
    rt.block_on(async {
        let handle = TpmHandle::open(&tpm.tcti(), state.path()).await.unwrap();
        println!(
            "# continuous attestation on swtpm ({} cores visible), 8 PCRs quoted",
            std::thread::available_parallelism().map_or(1, |n| n.get())
        );

        // A policy that renews without a fresh quote.
        let dir = tempfile::tempdir().unwrap();
        let server = tpm_node_server(dir.path(), &tpm, "[0, 1, 2, 3, 4, 5, 6, 7]", "").await;
        let url = format!("https://{}", server.grpc_addr);
        let anchors = server.shared.ca().bundle.x509_authorities.clone();
        let anon = HeraldClient::connect(&url, &anchors, None).await.unwrap();
        let mut enrol = Vec::with_capacity(n);
        let mut svid = None;
        for _ in 0..n {
            let t = Instant::now();
            svid = Some(attest(&anon, &handle, None).await.unwrap());
            enrol.push(t.elapsed());
        }
        let mut svid = svid.unwrap();
        let mut plain = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let client = as_node(&url, &anchors, &svid).await;
            let key = keys::generate_key_and_csr().unwrap();
            let response = client.renew_x509_svid(key.csr_der).await.unwrap();
            plain.push(t.elapsed());
            svid = NodeSvid {
                response,
                key_pkcs8: key.key_pkcs8,
            };
        }
        drop(anon);
        drop(server);

        // The same node under `reattest: every_renewal`.
        let dir = tempfile::tempdir().unwrap();
        let server = tpm_node_server(
            dir.path(),
            &tpm,
            "[0, 1, 2, 3, 4, 5, 6, 7]\n    reattest: every_renewal",
            "",
        )
        .await;
        let url = format!("https://{}", server.grpc_addr);
        let anchors = server.shared.ca().bundle.x509_authorities.clone();
        let anon = HeraldClient::connect(&url, &anchors, None).await.unwrap();
        let mut svid = attest(&anon, &handle, None).await.unwrap();
        let mut quoted = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let client = as_node(&url, &anchors, &svid).await;
            svid = reattest(&client, &handle).await.unwrap();
            quoted.push(t.elapsed());
        }
        // The TPM's own share of a renewal with a fresh quote.
        let mut tpm_only = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            handle
                .quote(
                    vec![7; 32],
                    herald_agent::tpm::PCR_BANK_SHA256,
                    (0..8).collect(),
                )
                .await
                .unwrap();
            tpm_only.push(t.elapsed());
        }
        line("TPM attestation, end to end (enrolment path)", &mut enrol);
        line(
            "node-SVID renewal, no quote (RenewX509Svid, mTLS)",
            &mut plain,
        );
        line(
            "node-SVID renewal with a fresh quote (stream, mTLS)",
            &mut quoted,
        );
        line("  of which the swtpm quote + PCR read alone", &mut tpm_only);
        drop(anon);
        drop(handle);
        drop(server);
    });
}
