//! Node attestation without a TPM (issue 19, parts 1–2): end-to-end
//! latency of a platform-token attestation (Kubernetes-shaped projected
//! service-account token from the real OIDC test issuer, ES256) and of an
//! AWS instance identity attestation (IMDS-shaped document, RSA-2048
//! signature), each a hello + CSR → node SVID over the gRPC stream against
//! an in-process server on SQLite, every one a new node (enrolment: a
//! registry insert, the SVID and its audit record in one transaction).
//!
//! Prints, per method: the bare verification (token verify through the
//! server's own OIDC verifier, cached JWKS; document signature verify),
//! sequential latency p50/p99 (one attestation at a time), and throughput
//! with 8 concurrent agents with the server's CPU per attestation.
//!
//! Run: `cargo bench --bench node_platform` (`HERALD_BENCH_N` scales counts).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

#[path = "../tests/common/aws.rs"]
#[allow(dead_code)]
mod aws;
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws::TestSigner;
use common::*;
use herald_agent::attest::{NodeEvidence, attest_without_tpm};
use herald_agent::imds::InstanceIdentity;
use herald_client::keys;
use herald_test_oidc::{Alg, TestIssuer};

const TD: &str = "bench.herald.test";
const ACCOUNT: &str = "123456789012";

fn report(name: &str, lat: &mut [Duration]) {
    lat.sort_unstable();
    let mean = lat.iter().sum::<Duration>() / lat.len() as u32;
    println!(
        "  {name:<34} p50 {:>6.2} ms  p99 {:>6.2} ms  mean {:>6.2} ms  ({} sequential)",
        percentile(lat, 0.5).as_secs_f64() * 1e3,
        percentile(lat, 0.99).as_secs_f64() * 1e3,
        mean.as_secs_f64() * 1e3,
        lat.len()
    );
}

fn main() {
    let n = bench_n(400);
    let server_rt = runtime(SERVER_THREADS);
    let sh = server_rt.handle().clone();
    let rt = runtime(CLIENT_THREADS);
    rt.block_on(async move {
        let issuer = Arc::new(sh.spawn(TestIssuer::start()).await.unwrap());
        let signer = TestSigner::new();
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("aws.pem"), &signer.cert_pem).unwrap();
        std::fs::write(
            policies.join("k8s.yaml"),
            format!(
                "name: k8s\nevidence:\n  platform_token: {{ issuer: \"{}\", audiences: [herald], cluster: c1 }}\npins: {{ kubernetes.io.namespace: herald-system }}\nspiffe_id:\n  prefix: spiffe://{TD}/k8s/\n  template: \"spiffe://{TD}/k8s/{{cluster}}/node/{{node}}\"\ngrants:\n  x509_svid: {{ max_ttl: 1h }}\n",
                issuer.issuer()
            ),
        )
        .unwrap();
        std::fs::write(
            policies.join("aws.yaml"),
            format!(
                "name: aws\nevidence:\n  aws_iid: {{ certificates: [aws.pem], max_age: 1h }}\npins: {{ account: \"{ACCOUNT}\" }}\nspiffe_id:\n  prefix: spiffe://{TD}/aws/\n  template: \"spiffe://{TD}/aws/{{account}}/{{instance_id}}\"\ngrants:\n  x509_svid: {{ max_ttl: 1h }}\n"
            ),
        )
        .unwrap();
        let cfg = oidc_server_config(
            dir.path(),
            TD,
            &policies,
            issuer.issuer(),
            issuer.ca_pem_path(),
        );
        let server = sh.spawn(herald_server::start(cfg)).await.unwrap().unwrap();
        let url = format!("https://{}", server.grpc_addr);
        let anchors = server.shared.ca().bundle.x509_authorities.clone();

        // Evidence and keys made ahead (not timed): every attestation is a
        // new node with a fresh single-use token / its own document.
        let total = 3 * n + 200;
        let t0 = Instant::now();
        let tokens: Vec<String> = (0..total)
            .map(|i| {
                issuer.sign(
                    Alg::ES256,
                    &issuer.kubernetes_claims("herald", "herald-system", "herald-agent", Some(&format!("node-{i}"))),
                )
            })
            .collect();
        let now = herald_server::unix_now();
        let docs: Vec<InstanceIdentity> = (0..total)
            .map(|i| {
                let document = TestSigner::document(ACCOUNT, "eu-west-1", &format!("i-{i:017x}"), now - 60);
                let signature = signer.sign(&document);
                InstanceIdentity { document, signature }
            })
            .collect();
        let keys: Vec<keys::KeyAndCsr> = (0..2 * total).map(|_| keys::generate_key_and_csr().unwrap()).collect();
        println!(
            "(made {total} tokens, {total} signed documents and {} keys in {:.1} s)",
            keys.len(),
            t0.elapsed().as_secs_f64()
        );
        let tokens = Arc::new(std::sync::Mutex::new(tokens));
        let docs = Arc::new(std::sync::Mutex::new(docs));
        let keys = Arc::new(std::sync::Mutex::new(keys));

        println!(
            "# node attestation without a TPM ({} cores visible)",
            std::thread::available_parallelism().map_or(1, |c| c.get())
        );
        // Bare verification, one core.
        let oidc = server.shared.policy.as_ref().unwrap().oidc.clone();
        let probe: Vec<String> = tokens.lock().unwrap().drain(..200).collect();
        oidc.verify(&probe[0], herald_server::unix_now()).await.unwrap();
        let t = Instant::now();
        for tok in &probe {
            std::hint::black_box(oidc.verify(tok, herald_server::unix_now()).await.unwrap());
        }
        let token_verify = t.elapsed() / probe.len() as u32;
        let key = signer.public_key();
        let probe_docs: Vec<InstanceIdentity> = docs.lock().unwrap().drain(..200).collect();
        let t = Instant::now();
        for d in &probe_docs {
            std::hint::black_box(
                herald_attest::aws_iid::verify(std::slice::from_ref(&key), &d.document, &d.signature).unwrap(),
            );
        }
        let doc_verify = t.elapsed() / probe_docs.len() as u32;
        println!("## bare verification (one core)");
        println!("  platform token (ES256, OIDC verifier)  {:>7.1} µs", us(token_verify));
        println!("  identity document (RSA-2048 SHA-256)   {:>7.1} µs", us(doc_verify));

        let client = herald_client::HeraldClient::connect(&url, &anchors, None).await.unwrap();
        let next_token = {
            let tokens = tokens.clone();
            move || tokens.lock().unwrap().pop().unwrap()
        };
        let next_doc = {
            let docs = docs.clone();
            move || docs.lock().unwrap().pop().unwrap()
        };
        let next_key = {
            let keys = keys.clone();
            move || keys.lock().unwrap().pop().unwrap()
        };
        // Warm-up: one of each.
        attest_without_tpm(&client, NodeEvidence::PlatformToken(next_token()), next_key(), None).await.unwrap();
        attest_without_tpm(&client, NodeEvidence::AwsIid(next_doc()), next_key(), None).await.unwrap();

        println!("## end to end, sequential: agent attest call → gRPC → server (verify, policy, sign, SQLite commit) → node SVID");
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let (tok, key) = (next_token(), next_key());
            let s = Instant::now();
            attest_without_tpm(&client, NodeEvidence::PlatformToken(tok), key, None).await.unwrap();
            lat.push(s.elapsed());
        }
        report("platform token (Kubernetes PSAT)", &mut lat);
        let mut lat = Vec::with_capacity(n);
        for _ in 0..n {
            let (doc, key) = (next_doc(), next_key());
            let s = Instant::now();
            attest_without_tpm(&client, NodeEvidence::AwsIid(doc), key, None).await.unwrap();
            lat.push(s.elapsed());
        }
        report("AWS instance identity document", &mut lat);

        println!("## 8 concurrent agents (closed loop), every attestation a new node");
        let client = Arc::new(client);
        for method in ["platform token", "AWS identity document"] {
            let (client, next_token, next_doc, next_key) =
                (client.clone(), next_token.clone(), next_doc.clone(), next_key.clone());
            let aws = method.starts_with("AWS");
            let r = drive(n, 8, None, move |_| {
                let client = client.clone();
                let evidence = if aws {
                    NodeEvidence::AwsIid(next_doc())
                } else {
                    NodeEvidence::PlatformToken(next_token())
                };
                let key = next_key();
                async move {
                    attest_without_tpm(&client, evidence, key, None).await.unwrap();
                }
            })
            .await;
            println!(
                "  {method:<26} {:>6.0}/s  p50 {:>5.2} ms  p99 {:>5.2} ms | server CPU {:>4.0} µs/attestation (SQLite {:>3.0})",
                r.rate,
                r.p50.as_secs_f64() * 1e3,
                r.p99.as_secs_f64() * 1e3,
                us(r.server_cpu),
                us(r.sqlite_cpu),
            );
        }
        drop(server);
    });
}
