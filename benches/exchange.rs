//! OIDC token exchange benchmark (BRIEF §8, issue: CI/CD and serverless exchange).
//!
//! Prints, from one run on this machine:
//! 1. the crypto ceiling: RS256 verify (the CI token) + ES256 sign (the
//!    JWT-SVID), on 1 and 2 threads;
//! 2. policy evaluation alone (CEL compiled at load), per request;
//! 3. end to end against an in-process server on SQLite (durable audit
//!    record and single-use jti in one transaction), a real HTTPS OIDC
//!    issuer for discovery/JWKS, concurrent callers:
//!    - gRPC `ExchangeToken` → JWT-SVID and → cloud session credentials;
//!    - HTTP `POST /v1/token` (RFC 8693) → JWT-SVID;
//!    - HTTP `POST /` (AWS STS AssumeRoleWithWebIdentity) → credentials.
//!
//!    Each with throughput, p50/p99, ratio to the ceiling, server CPU per request;
//! 4. p99 at 80% of the gRPC JWT-SVID peak (open loop).
//!
//! Run: `cargo bench --bench exchange` (`HERALD_BENCH_N` scales the request count).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

mod common;

use std::sync::Arc;
use std::time::Instant;

use common::*;
use herald_client::HeraldClient;
use herald_proto::v1::exchange_token_request::Credential as Wanted;
use herald_proto::v1::{CloudCredentialsParams, ExchangeTokenRequest, JwtSvidParams};
use herald_test_oidc::{Alg, TestIssuer};

const TD: &str = "bench.herald.test";
const ROLE: &str = "arn:aws:iam::123456789012:role/deploy";

fn policy(issuer: &str) -> String {
    format!(
        r#"name: bench-deploy
description: Benchmark policy shaped like a real GitHub Actions deploy policy
evidence:
  oidc:
    issuer: {issuer}
    audiences: [herald]
pins:
  repository: acme/webapp
  repository_owner_id: "1342004"
condition: claims.ref == "refs/heads/main" && claims.environment == "production" && claims.ref_protected == true
spiffe_id:
  prefix: spiffe://{TD}/ci/github/
  template: "spiffe://{TD}/ci/github/{{repository_owner}}/{{environment}}"
grants:
  jwt_svid: {{ max_ttl: 10m, audiences: [deployer] }}
  cloud:
    - role_arn: {ROLE}
      max_ttl: 1h
      scope:
        Version: "2012-10-17"
        Statement:
          - Effect: Allow
            Action: ["s3:GetObject", "s3:PutObject"]
            Resource: ["arn:aws:s3:::acme-artifacts/*"]
"#
    )
}

/// RS256 verify of a GitHub-shaped token + ES256 sign of a JWT-SVID, per second.
fn ceiling(tokens: &Arc<Vec<String>>, jwks: &serde_json::Value, threads: usize, per: usize) -> f64 {
    let jwk = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kty"] == "RSA")
        .unwrap()
        .clone();
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk).unwrap();
    let key = Arc::new(jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap());
    let (signer, _) = herald_ca::JwtSigner::generate().unwrap();
    let signer = Arc::new(signer);
    let start = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (tokens, key, signer) = (tokens.clone(), key.clone(), signer.clone());
            std::thread::spawn(move || {
                for i in 0..per {
                    let tok = &tokens[(t * per + i) % tokens.len()];
                    let (msg, sig) = tok.rsplit_once('.').unwrap();
                    assert!(jsonwebtoken::crypto::verify(
                        sig,
                        msg.as_bytes(),
                        &key,
                        jsonwebtoken::Algorithm::RS256
                    )
                    .unwrap());
                    let claims = serde_json::json!({"sub": "spiffe://bench.herald.test/x", "aud": "deployer", "exp": 1, "iat": 0, "jti": i});
                    std::hint::black_box(signer.sign_claims(&claims).unwrap());
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    per_sec(threads * per, start.elapsed())
}

fn main() {
    let n = bench_n(3000);
    let server_rt = runtime(SERVER_THREADS);
    let sh = server_rt.handle().clone();
    let rt = runtime(CLIENT_THREADS);
    rt.block_on(async move {
        let issuer = sh.spawn(TestIssuer::start()).await.unwrap();
        let issuer = Arc::new(issuer);
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(policies.join("deploy.yaml"), policy(issuer.issuer())).unwrap();
        let cfg = oidc_server_config(
            dir.path(),
            TD,
            &policies,
            issuer.issuer(),
            issuer.ca_pem_path(),
        );
        let server = sh.spawn(herald_server::start(cfg)).await.unwrap().unwrap();

        // Single-use tokens, minted ahead (RS256, GitHub-shaped; not timed).
        // Four peak phases, three paced ones (each at most 3 s of load) and the warm-up.
        let total = n * 7 + 2000;
        let t0 = Instant::now();
        let mint_tokens = |count: usize| {
            let issuer = issuer.clone();
            std::thread::spawn(move || {
                (0..count)
                    .map(|_| {
                        issuer.sign(
                            Alg::RS256,
                            &issuer.github_claims("herald", "acme/webapp", "refs/heads/main", "production"),
                        )
                    })
                    .collect::<Vec<_>>()
            })
        };
        let (a, b) = (mint_tokens(total / 2), mint_tokens(total - total / 2));
        let mut tokens = a.join().unwrap();
        tokens.extend(b.join().unwrap());
        println!("(minted {} test tokens in {:.1} s)", tokens.len(), t0.elapsed().as_secs_f64());
        let tokens = Arc::new(tokens);

        let jwks = fetch_jwks(&issuer).await;
        let c1 = ceiling(&tokens, &jwks, 1, 2000);
        let c2 = ceiling(&tokens, &jwks, 2, 2000);
        println!("## crypto ceiling: RS256 verify (CI token) + ES256 sign (JWT-SVID)");
        println!("  1 thread   {c1:>8.0}/s ({:.1} µs each)", 1e6 / c1);
        println!("  2 threads  {c2:>8.0}/s   <- ceiling for the ratios below");

        // Policy evaluation alone.
        let ex = server.shared.policy.as_ref().unwrap();
        let set = ex.policies.current();
        let claims = issuer.github_claims("herald", "acme/webapp", "refs/heads/main", "production");
        let mut claims = claims.as_object().unwrap().clone();
        herald_attest::oidc::claims::normalise(&mut claims);
        let evidence = herald_policy::Evidence {
            oidc: Some(herald_policy::OidcEvidence {
                issuer: issuer.issuer().to_string(),
                audiences: vec!["herald".into()],
                claims,
            }),
            ..herald_policy::Evidence::default()
        };
        let reps = 20_000;
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(set.evaluate(&evidence).unwrap());
        }
        let eval = t.elapsed() / reps;
        println!("## policy evaluation (pins + CEL condition + SPIFFE ID template, compiled at load)");
        println!("  {:.1} µs per request", us(eval));

        // Recording one decision: Prometheus families and histogram, OTel
        // instruments (no-op without a provider), the request span.
        let mut event = herald_core::AuditEvent::new("exchange.jwt_svid", "bench");
        event.evidence_type = Some(herald_core::EvidenceType::Oidc);
        event.policy = Some("bench-deploy".into());
        let span = tracing::info_span!("exchange", outcome = tracing::field::Empty);
        let t = Instant::now();
        for _ in 0..reps {
            herald_server::metrics::record_decision(&server.shared, &span, &event, t);
        }
        println!("## recording a decision (metrics + span fields, no log subscriber)");
        println!("  {:.2} µs per request", us(t.elapsed() / reps));
        // The in-process server served the figures above; end to end, the
        // server runs in a process of its own (the release `herald`
        // binary, as deployed) and this process is the load generator.
        sh.spawn(server.shutdown()).await.unwrap();
        let process_dir = dir.path().join("process");
        std::fs::create_dir_all(&process_dir).unwrap();
        let config = process_dir.join("herald.toml");
        std::fs::write(
            &config,
            oidc_server_toml(&process_dir, TD, &policies, issuer.issuer(), issuer.ca_pem_path()),
        )
        .unwrap();
        let server = ServerProcess::start(&config, &process_dir.join("data"));

        // Clients.
        let url = format!("https://{}", server.grpc_addr);
        let anchors = server.anchors.clone();
        let conc: usize = std::env::var("HERALD_BENCH_CONC").ok().and_then(|v| v.parse().ok()).unwrap_or(64);
        let mut clients = Vec::new();
        for _ in 0..4 {
            clients.push(HeraldClient::connect(&url, &anchors, None).await.unwrap());
        }
        let clients = Arc::new(clients);
        let http = reqwest::Client::builder().pool_max_idle_per_host(conc).build().unwrap();
        let http_base = format!("http://{}", server.http_addr);
        let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let take = {
            let (tokens, next) = (tokens.clone(), next.clone());
            move || tokens[next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)].clone()
        };
        let take = Arc::new(take);

        println!("## end to end on loopback, server in its own process, SQLite (jti + issued + audit in one transaction), {conc} concurrent callers");
        // Warm-up: JWKS fetched, connections up.
        for _ in 0..50 {
            grpc_jwt(&clients, 0, take()).await;
        }
        let (cl, tk) = (clients.clone(), take.clone());
        let jwt = server
            .profile(
                "exchange-grpc-jwt",
                drive(n, conc, None, move |i| {
                    let (cl, tk) = (cl.clone(), tk.clone());
                    async move { grpc_jwt(&cl, i, tk()).await }
                }),
            )
            .await;
        print_run("gRPC → JWT-SVID", &jwt, c2);
        let (cl, tk) = (clients.clone(), take.clone());
        let cloud = server
            .profile(
                "exchange-grpc-cloud",
                drive(n, conc, None, move |i| {
                    let (cl, tk) = (cl.clone(), tk.clone());
                    async move {
                        let req = ExchangeTokenRequest {
                            subject_token: tk(),
                            join_token: String::new(),
                            ttl_seconds: 0,
                            credential: Some(Wanted::Cloud(CloudCredentialsParams {
                                role_arn: ROLE.into(),
                                session_name: "bench".into(),
                                session_policy: String::new(),
                            })),
                        };
                        cl[i % cl.len()].exchange_token(req).await.unwrap();
                    }
                }),
            )
            .await;
        print_run("gRPC → cloud credentials", &cloud, c2);
        let (hc, hb, tk) = (http.clone(), http_base.clone(), take.clone());
        let rfc = server
            .profile(
                "exchange-rfc8693",
                drive(n, conc, None, move |_| {
                    let (hc, hb, tk) = (hc.clone(), hb.clone(), tk.clone());
                    async move {
                        post_ok(
                            &hc,
                            format!("{hb}/v1/token"),
                            &[
                                ("grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"),
                                ("subject_token", &tk()),
                                ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
                                ("audience", "deployer"),
                            ],
                        )
                        .await;
                    }
                }),
            )
            .await;
        print_run("HTTP RFC 8693 → JWT-SVID", &rfc, c2);
        let (hc, hb, tk) = (http.clone(), http_base.clone(), take.clone());
        let sts = server
            .profile(
                "exchange-sts",
                drive(n, conc, None, move |_| {
                    let (hc, hb, tk) = (hc.clone(), hb.clone(), tk.clone());
                    async move {
                        post_ok(
                            &hc,
                            format!("{hb}/"),
                            &[
                                ("Action", "AssumeRoleWithWebIdentity"),
                                ("Version", "2011-06-15"),
                                ("RoleArn", ROLE),
                                ("RoleSessionName", "bench"),
                                ("WebIdentityToken", &tk()),
                            ],
                        )
                        .await;
                    }
                }),
            )
            .await;
        print_run("HTTP STS → cloud creds", &sts, c2);

        // Latency under paced (open-loop) load, gRPC → JWT-SVID.
        for share in [0.8, 0.6, 0.4] {
            let remaining = tokens.len() - next.load(std::sync::atomic::Ordering::Relaxed);
            let rate = jwt.rate * share;
            let paced = remaining.min(n).min((rate * 3.0) as usize);
            let (cl, tk) = (clients.clone(), take.clone());
            let run = server
                .profile(
                    &format!("exchange-grpc-jwt-{:.0}", share * 100.0),
                    drive(paced, 256, Some(rate), move |i| {
                        let (cl, tk) = (cl.clone(), tk.clone());
                        async move { grpc_jwt(&cl, i, tk()).await }
                    }),
                )
                .await;
            print_run(&format!("gRPC → JWT at {rate:.0}/s ({:.0}%)", share * 100.0), &run, c2);
        }
        server.stop();
    });
    drop(server_rt);
}

/// POSTs `form` to `url` and reads the whole answer, which must be 200.
async fn post_ok(client: &reqwest::Client, url: String, form: &[(&str, &str)]) {
    let resp = client.post(url).form(form).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
}

async fn grpc_jwt(clients: &[HeraldClient], i: usize, token: String) {
    let req = ExchangeTokenRequest {
        subject_token: token,
        join_token: String::new(),
        ttl_seconds: 0,
        credential: Some(Wanted::JwtSvid(JwtSvidParams {
            audiences: vec!["deployer".into()],
        })),
    };
    clients[i % clients.len()]
        .exchange_token(req)
        .await
        .unwrap();
}

async fn fetch_jwks(issuer: &TestIssuer) -> serde_json::Value {
    let ca = std::fs::read(issuer.ca_pem_path()).unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(&ca).unwrap())
        .build()
        .unwrap();
    client
        .get(format!("{}/jwks", issuer.issuer()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}
