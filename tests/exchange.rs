//! OIDC token exchange end to end: a real HTTPS OIDC issuer, the real
//! `herald` binary, and clients nobody here wrote (boto3 for AWS STS, PyJWT
//! for JWT-SVIDs, openssl for X.509 SVIDs). Every refusal is checked for
//! its stable code and its audit record.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use herald_client::{ClientIdentity, HeraldClient, keys};
use herald_core::{ErrorCode, EvidenceType, Outcome};
use herald_proto::v1::exchange_token_request::Credential as Wanted;
use herald_proto::v1::exchange_token_response::Credential as Given;
use herald_proto::v1::{
    CloudCredentialsParams, ExchangeTokenRequest, JwtSvidParams, X509SvidParams,
};
use herald_store::Store;
use herald_test_oidc::{Alg, TestIssuer, now};
use serde_json::{Value, json};

const ROLE: &str = "arn:aws:iam::123456789012:role/deploy";
const AUD: &str = "herald";

fn python() -> PathBuf {
    let p = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"));
    assert!(
        p.exists(),
        "{} is missing: run `bash scripts/install-deps.sh` (it installs boto3 and PyJWT)",
        p.display()
    );
    p
}

fn run_python(script: &str, input: &Value) -> Value {
    use std::io::Write;
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(script);
    let mut child = Command::new(python())
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The policies of these tests, for the test issuer's URL.
fn policies(issuer: &str) -> Vec<(&'static str, String)> {
    let td = TRUST_DOMAIN;
    vec![
        (
            "10-deploy.yaml",
            format!(
                r#"name: e2e-deploy
description: Deploys of acme/webapp from main into production
evidence:
  oidc:
    issuer: {issuer}
    audiences: [{AUD}]
pins:
  repository: acme/webapp
  repository_owner_id: "1342004"
condition: claims.ref == "refs/heads/main" && claims.environment == "production"
spiffe_id:
  prefix: spiffe://{td}/ci/github/
  template: "spiffe://{td}/ci/github/{{repository_owner}}/{{environment}}"
grants:
  x509_svid: {{ max_ttl: 30m, federates_with: [spiffe://partner.herald.test] }}
  jwt_svid: {{ max_ttl: 10m, audiences: [deployer, "https://artifacts.example.com", herald-introspection] }}
  cloud:
    - role_arn: {ROLE}
      max_ttl: 2h
      scope:
        Version: "2012-10-17"
        Statement:
          - Effect: Allow
            Action: ["s3:GetObject", "s3:PutObject"]
            Resource: ["arn:aws:s3:::acme-artifacts/*"]
"#
            ),
        ),
        (
            "20-tools.yaml",
            format!(
                r#"name: e2e-tools
description: Tool jobs, one identity per environment name (a claim the job controls)
evidence:
  oidc:
    issuer: {issuer}
    audiences: [{AUD}]
pins:
  repository: acme/tools
spiffe_id:
  prefix: spiffe://{td}/ci/tools/
  template: "spiffe://{td}/ci/tools/{{environment}}"
grants:
  jwt_svid: {{ max_ttl: 5m, audiences: [deployer] }}
"#
            ),
        ),
        (
            "30-db-mfa.yaml",
            format!(
                r#"name: e2e-db-mfa
description: Production database role, only with a CI token AND a join token (machine MFA)
evidence:
  oidc:
    issuer: {issuer}
    audiences: [{AUD}]
  require: [join_token]
pins:
  repository: acme/db
spiffe_id:
  prefix: spiffe://{td}/ci/db/
  template: "spiffe://{td}/ci/db/{{environment}}"
grants:
  jwt_svid: {{ max_ttl: 5m, audiences: [postgres] }}
"#
            ),
        ),
    ]
}

struct Env {
    issuer: TestIssuer,
    site: Site,
    server: Server,
    policy_dir: PathBuf,
    _policies: tempfile::TempDir,
}

impl Env {
    async fn start() -> Env {
        Self::start_with("").await
    }

    /// `extra` is appended to the server's TOML.
    async fn start_with(extra: &str) -> Env {
        let issuer = TestIssuer::start().await;
        let policies_tmp = tempfile::tempdir().unwrap();
        let policy_dir = policies_tmp.path().to_path_buf();
        for (name, text) in policies(issuer.issuer()) {
            std::fs::write(policy_dir.join(name), text).unwrap();
        }
        let site = Site::with_extra(
            &(format!(
                "[policy]\ndir = \"{}\"\nreload_interval = \"1s\"\n[[oidc.issuers]]\nissuer = \"{}\"\naudiences = [\"{AUD}\"]\nextra_roots = \"{}\"\nhttp_timeout = \"1s\"\nmin_refresh_interval = \"0s\"\n",
                policy_dir.display(),
                issuer.issuer(),
                issuer.ca_pem_path().display()
            ) + extra),
        );
        let server = site.start();
        Env {
            issuer,
            site,
            server,
            policy_dir,
            _policies: policies_tmp,
        }
    }

    /// `/v1/policies`: the policy set in effect and the last reload error.
    fn policy_status(&self) -> Value {
        let (status, body) = self.server.http_get("/v1/policies");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    fn http(&self) -> String {
        format!("http://{}", self.server.http)
    }

    fn token(&self, repo: &str, git_ref: &str, env: &str) -> String {
        self.issuer.sign(
            Alg::RS256,
            &self.issuer.github_claims(AUD, repo, git_ref, env),
        )
    }

    fn deploy_token(&self) -> String {
        self.token("acme/webapp", "refs/heads/main", "production")
    }

    async fn client(&self, identity: Option<ClientIdentity>) -> HeraldClient {
        let anchors = common::pem_file_certs(&self.site.bundle_pem());
        HeraldClient::connect(&self.server.url(), &anchors, identity)
            .await
            .unwrap()
    }

    async fn store(&self) -> Store {
        Store::open(&self.site.db_url()).await.unwrap()
    }

    /// The newest audit record.
    async fn last_audit(&self) -> herald_core::AuditEvent {
        let store = self.store().await;
        let report = store.verify_audit_chain(0, None).await.unwrap();
        let rec = store
            .audit_records(report.last_seq - 1, 1)
            .await
            .unwrap()
            .pop()
            .unwrap();
        store.close().await;
        rec.event
    }
}

/// A JWT-SVID for the introspection audience: how a resource server
/// authenticates to `POST /v1/introspect`.
async fn introspector(env: &Env) -> String {
    let resp = env
        .client(None)
        .await
        .exchange_token(jwt_request(&env.deploy_token(), &["herald-introspection"]))
        .await
        .unwrap();
    match resp.credential {
        Some(Given::JwtSvid(j)) => j.token,
        other => panic!("{other:?}"),
    }
}

/// `POST /v1/introspect` with `form`, authenticated by `bearer` (from
/// [`introspector`]); the JSON answer.
async fn introspect(env: &Env, bearer: &str, form: &[(&str, &str)]) -> Value {
    reqwest::Client::new()
        .post(format!("{}/v1/introspect", env.http()))
        .bearer_auth(bearer)
        .form(form)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn jwt_request(token: &str, audiences: &[&str]) -> ExchangeTokenRequest {
    ExchangeTokenRequest {
        subject_token: token.to_string(),
        join_token: String::new(),
        ttl_seconds: 0,
        credential: Some(Wanted::JwtSvid(JwtSvidParams {
            audiences: audiences.iter().map(|s| s.to_string()).collect(),
        })),
    }
}

fn cloud_request(token: &str, role: &str, policy: &str, ttl: u32) -> ExchangeTokenRequest {
    ExchangeTokenRequest {
        subject_token: token.to_string(),
        join_token: String::new(),
        ttl_seconds: ttl,
        credential: Some(Wanted::Cloud(CloudCredentialsParams {
            role_arn: role.to_string(),
            session_name: "ci-run-42".into(),
            session_policy: policy.to_string(),
        })),
    }
}

/// Asserts the request is refused with `code` and audited with that reason
/// (and no serial), and that no credential was recorded for it.
async fn assert_refused(env: &Env, req: ExchangeTokenRequest, code: ErrorCode) {
    let client = env.client(None).await;
    let err = client.exchange_token(req).await.unwrap_err();
    assert_eq!(err.code(), Some(code), "{err}");
    let audit = env.last_audit().await;
    assert_eq!(audit.reason, Some(code), "audit record of {code}");
    assert_ne!(audit.outcome, Outcome::Success);
    assert!(audit.serial.is_none());
    assert!(audit.action.starts_with("exchange."), "{}", audit.action);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svid_over_grpc_verifies_with_pyjwt_through_discovery() {
    let env = Env::start().await;
    let client = env.client(None).await;
    let resp = client
        .exchange_token(jwt_request(&env.deploy_token(), &["deployer"]))
        .await
        .unwrap();
    assert_eq!(
        resp.spiffe_id,
        format!("spiffe://{TRUST_DOMAIN}/ci/github/acme/production")
    );
    assert_eq!(resp.policy, "e2e-deploy");
    let Some(Given::JwtSvid(jwt)) = resp.credential else {
        panic!("no JWT-SVID")
    };
    let verdict = run_python(
        "verify_jwt_svid.py",
        &json!({"issuer": env.http(), "token": jwt.token, "audience": "deployer"}),
    );
    assert_eq!(verdict["ok"], true, "{verdict}");
    assert_eq!(verdict["claims"]["sub"], resp.spiffe_id);
    assert_eq!(verdict["header"]["typ"], "JWT");
    assert_eq!(
        verdict["header"].as_object().unwrap().len(),
        3,
        "alg, kid, typ only"
    );
    let ttl =
        verdict["claims"]["exp"].as_i64().unwrap() - verdict["claims"]["iat"].as_i64().unwrap();
    assert_eq!(ttl, 300, "the configured default, under the 10m cap");
    // The same token for another audience is refused by PyJWT.
    let wrong = run_python(
        "verify_jwt_svid.py",
        &json!({"issuer": env.http(), "token": jwt.token, "audience": "someone-else"}),
    );
    assert_eq!(wrong["ok"], false);
    // The decision is audited as an OIDC-backed success with its policy.
    let audit = env.last_audit().await;
    assert_eq!(audit.outcome, Outcome::Success);
    assert_eq!(audit.evidence_type, Some(EvidenceType::Oidc));
    assert_eq!(audit.policy.as_deref(), Some("e2e-deploy"));
    assert!(audit.caller.starts_with("oidc:"));
    // Introspection needs an authenticated caller (RFC 7662 §2.1).
    let http = reqwest::Client::new();
    let url = format!("{}/v1/introspect", env.http());
    let anonymous = http
        .post(&url)
        .form(&[("token", jwt.token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    assert!(anonymous.headers().contains_key("www-authenticate"));
    let wrong_audience = http
        .post(&url)
        .bearer_auth(&jwt.token)
        .form(&[("token", jwt.token.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(
        wrong_audience.status(),
        401,
        "a deployer JWT-SVID is not an introspection credential"
    );
    // Introspection says active, then nothing for garbage.
    let bearer = introspector(&env).await;
    let active = introspect(&env, &bearer, &[("token", jwt.token.as_str())]).await;
    assert_eq!(active["active"], true);
    assert_eq!(active["sub"], resp.spiffe_id);
    let inactive = introspect(&env, &bearer, &[("token", "not-a-token")]).await;
    assert_eq!(inactive, json!({"active": false}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_svid_via_the_cli_passes_openssl_verify() {
    require_tool("openssl");
    let env = Env::start().await;
    let dir = tempfile::tempdir().unwrap();
    // The policy's grant federates with a partner whose bundle was set by
    // hand: the SVID comes with it.
    let partner_ca = {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.subject_alt_names = vec![rcgen::SanType::URI(
            "spiffe://partner.herald.test".try_into().unwrap(),
        )];
        p.self_signed(&key).unwrap()
    };
    let partner_file = dir.path().join("partner.pem");
    std::fs::write(&partner_file, partner_ca.pem()).unwrap();
    ok(env.site.herald(&[
        "federation",
        "set",
        "partner.herald.test",
        partner_file.to_str().unwrap(),
    ]));
    // Wait until the server has reloaded it (its metrics say so).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !env
        .server
        .http_get("/metrics")
        .1
        .contains("trust_domain=\"partner.herald.test\"")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "federated bundle not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, env.deploy_token()).unwrap();
    let out_dir = dir.path().join("svid");
    let out = ok(env.site.herald(&[
        "exchange",
        "--server",
        &env.server.url(),
        "--bundle",
        env.site.bundle_pem().to_str().unwrap(),
        "--token-file",
        token_file.to_str().unwrap(),
        "--x509",
        "--ttl",
        "20m",
        "--out",
        out_dir.to_str().unwrap(),
    ]));
    assert!(
        stderr(&out).contains("by policy e2e-deploy"),
        "{}",
        stderr(&out)
    );
    let verify = Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(out_dir.join("bundle.pem"))
        .arg(out_dir.join("svid.pem"))
        .output()
        .unwrap();
    assert!(verify.status.success(), "{}", stdout(&verify));
    assert_eq!(
        common::pem_file_certs(&out_dir.join("federated/partner.herald.test.pem")),
        vec![partner_ca.der().to_vec()]
    );
    let pem = std::fs::read_to_string(out_dir.join("svid.pem")).unwrap();
    let der = herald_client::files::from_pem("CERTIFICATE", &pem).unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&der[0]).unwrap();
    let life = cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
    assert!(
        (1200..=1260).contains(&life),
        "20m plus the backdate, got {life}s"
    );

    // The token was single-use: the same file again is a replay.
    let again = env.site.herald(&[
        "exchange",
        "--server",
        &env.server.url(),
        "--bundle",
        env.site.bundle_pem().to_str().unwrap(),
        "--token-file",
        token_file.to_str().unwrap(),
        "--jwt-audience",
        "deployer",
    ]);
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("error[token_replayed]"),
        "{}",
        stderr(&again)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc8693_token_endpoint_issues_and_refuses_in_oauth_terms() {
    let env = Env::start().await;
    let http = reqwest::Client::new();
    let post = |form: Vec<(&'static str, String)>| {
        let http = http.clone();
        let url = format!("{}/v1/token", env.http());
        async move {
            let resp = http.post(url).form(&form).send().await.unwrap();
            let status = resp.status().as_u16();
            let code = resp
                .headers()
                .get("herald-error-code")
                .map(|v| v.to_str().unwrap().to_string());
            (status, code, resp.json::<Value>().await.unwrap())
        }
    };
    let base = |token: String, aud: &str| {
        vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange".to_string(),
            ),
            ("subject_token", token),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:id_token".to_string(),
            ),
            ("audience", aud.to_string()),
        ]
    };
    let token = env.deploy_token();
    let (status, _, body) = post(base(token.clone(), "deployer")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["issued_token_type"],
        "urn:ietf:params:oauth:token-type:jwt"
    );
    assert_eq!(body["token_type"], "Bearer");
    assert!(body["expires_in"].as_i64().unwrap() > 250);
    assert_eq!(body["access_token"].as_str().unwrap().split('.').count(), 3);

    // Replay of the same subject token: invalid_grant.
    let (status, code, body) = post(base(token, "deployer")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
    assert_eq!(code.as_deref(), Some("token_replayed"));
    // An audience the policy does not grant: invalid_target.
    let (status, code, body) = post(base(env.deploy_token(), "elsewhere")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_target"))
    );
    assert_eq!(code.as_deref(), Some("audience_not_granted"));
    // A branch the policy does not allow: unauthorized_client.
    let feature = env.token("acme/webapp", "refs/heads/feature", "production");
    let (_, code, body) = post(base(feature, "deployer")).await;
    assert_eq!(body["error"], "unauthorized_client");
    assert_eq!(code.as_deref(), Some("policy_denied"));
    // Protocol errors.
    let mut wrong_grant = base(env.deploy_token(), "deployer");
    wrong_grant[0].1 = "client_credentials".into();
    let (status, _, body) = post(wrong_grant).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("unsupported_grant_type"))
    );
    let mut wrong_type = base(env.deploy_token(), "deployer");
    wrong_type[2].1 = "urn:ietf:params:oauth:token-type:saml2".into();
    let (_, _, body) = post(wrong_type).await;
    assert_eq!(body["error"], "invalid_request");

    // The decisions show in the metrics: issuances, the policy denial, the
    // replay, the issuer's JWKS fetch — and, every request answered, no
    // commit still promised to the store's writer.
    let (_, metrics) = env.server.http_get("/metrics");
    for line in [
        "herald_store_pending_commits 0".to_string(),
        "herald_issuance_total{credential_type=\"jwt_svid\",outcome=\"success\"} 1".to_string(),
        "herald_policy_denials_total{policy=\"e2e-deploy\"} 2".to_string(),
        "herald_replay_rejections_total 1".to_string(),
        format!(
            "herald_jwks_fetches_total{{issuer=\"{}\"}} 1",
            env.issuer.issuer()
        ),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line} not in\n{metrics}"
        );
    }
    let value = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in\n{metrics}"))
    };
    let (transactions, commits) = (
        value("herald_store_write_transactions_total"),
        value("herald_store_commits_total"),
    );
    // The issuance, the replay and the two policy denials above at least,
    // each with its audit record, went through the writer.
    assert!(transactions >= 1 && commits >= transactions && commits >= 4);
    // The writer timed them: the longest took some time, and no more of
    // them were slow than there were.
    assert!(value("herald_store_slow_write_transactions_total") <= transactions);
    // The replay was refused inside its transaction: on SQLite its batch,
    // guessed to go through, was written again checked.
    let rewritten = value("herald_store_rewritten_write_transactions_total");
    assert!(rewritten >= 1 && rewritten <= transactions, "{rewritten}");
    let longest: f64 = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("herald_store_longest_write_transaction_seconds ")?
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("longest write transaction not in\n{metrics}"));
    assert!(longest > 0.0 && longest < 60.0, "{longest}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boto3_assume_role_with_web_identity_and_sigv4_verification() {
    let env = Env::start().await;
    // Over the HTTPS listener, verifying Herald's certificate with its bundle.
    let https = format!("https://{}", env.server.https.unwrap());
    let bundle = env.site.bundle_pem();
    let sts = |token: String, extra: Value| {
        let mut req = json!({
            "endpoint": https,
            "verify": bundle.to_str().unwrap(),
            "role_arn": ROLE,
            "session_name": "ci-run-42",
            "token": token,
        });
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        run_python("sts_assume_role.py", &req)
    };
    let body = "{\"hello\":\"world\"}";
    let resp = sts(
        env.deploy_token(),
        json!({"duration": 1800, "sign": {
            "method": "POST", "url": "https://artifacts.example.com/upload/a%20b?x=1&a=2",
            "body": body, "region": "us-east-1", "service": "s3"}}),
    );
    assert_eq!(resp["ok"], true, "{resp}");
    let creds = &resp["credentials"];
    assert!(creds["AccessKeyId"].as_str().unwrap().starts_with("ASIA"));
    assert_eq!(
        resp["assumed_role_user"]["Arn"],
        "arn:aws:sts::123456789012:assumed-role/deploy/ci-run-42"
    );
    assert_eq!(resp["subject"], "repo:acme/webapp:environment:production");
    assert_eq!(resp["audience"], AUD);

    // A downstream service verifies the SDK-signed request with Herald's
    // verification library and the session keyring.
    let keyring = load_keyring(&env).await;
    let signed = &resp["signed"];
    let request = signed_request(signed);
    let opts = herald_cloud_creds::sigv4::VerifyOptions {
        region: Some("us-east-1".into()),
        service: Some("s3".into()),
        max_skew: Duration::from_secs(300),
        single_encode_path: true,
    };
    let at = time::OffsetDateTime::now_utc();
    let caller = herald_cloud_creds::sigv4::verify_request(&keyring, &request, &opts, at).unwrap();
    assert_eq!(
        caller.claims.spiffe_id,
        format!("spiffe://{TRUST_DOMAIN}/ci/github/acme/production")
    );
    caller
        .authorize("s3:PutObject", "arn:aws:s3:::acme-artifacts/builds/1.tar")
        .unwrap();
    assert!(
        caller
            .authorize(
                "s3:DeleteObject",
                "arn:aws:s3:::acme-artifacts/builds/1.tar"
            )
            .is_err()
    );
    // One flipped byte of the body fails.
    let mut tampered = signed_request(signed);
    tampered.body[3] ^= 1;
    assert!(herald_cloud_creds::sigv4::verify_request(&keyring, &tampered, &opts, at).is_err());
    // Expired: the same request judged after the credential's lifetime.
    let later = at + time::Duration::hours(2);
    assert!(herald_cloud_creds::sigv4::verify_request(&keyring, &request, &opts, later).is_err());

    // Introspection reports the scope; revocation is visible there.
    let bearer = introspector(&env).await;
    let active = introspect(
        &env,
        &bearer,
        &[
            ("token", creds["SessionToken"].as_str().unwrap()),
            ("access_key_id", creds["AccessKeyId"].as_str().unwrap()),
        ],
    )
    .await;
    assert_eq!(active["active"], true, "{active}");
}

async fn load_keyring(env: &Env) -> herald_cloud_creds::SessionKeyring {
    let kek = herald_ca::KeyEncryptionKey::from_text(KEK_HEX).unwrap();
    let store = env.store().await;
    let mut keys = Vec::new();
    let mut active = String::new();
    for k in store.ca_keys().await.unwrap() {
        if k.kind == "session" {
            let raw = kek.open(&k.key_id, &k.encrypted_key).unwrap();
            keys.push((
                k.key_id.clone(),
                <[u8; 32]>::try_from(raw.as_slice()).unwrap(),
            ));
            if k.status == "active" {
                active = k.key_id.clone();
            }
        }
    }
    store.close().await;
    herald_cloud_creds::SessionKeyring::from_keys(keys, &active).unwrap()
}

fn signed_request(signed: &Value) -> herald_cloud_creds::sigv4::SignedRequest {
    let url = reqwest::Url::parse(signed["url"].as_str().unwrap()).unwrap();
    let mut headers: Vec<(String, String)> = signed["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // The HTTP client adds Host on the wire; botocore signed it.
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        headers.push(("Host".into(), url.host_str().unwrap().to_string()));
    }
    herald_cloud_creds::sigv4::SignedRequest {
        method: signed["method"].as_str().unwrap().to_string(),
        path: url.path().to_string(),
        query: url.query().unwrap_or("").to_string(),
        headers,
        body: signed["body"].as_str().unwrap().as_bytes().to_vec(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_errors_are_aws_shaped() {
    let env = Env::start().await;
    let sts = |token: String, extra: Value| {
        let mut req = json!({
            "endpoint": env.http(),
            "role_arn": ROLE,
            "session_name": "ci-run-42",
            "token": token,
        });
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        run_python("sts_assume_role.py", &req)
    };
    let cases: Vec<(String, Value, &str, u16)> = vec![
        (
            env.deploy_token(),
            json!({"role_arn": "arn:aws:iam::123456789012:role/admin"}),
            "AccessDenied",
            403,
        ),
        (
            env.deploy_token(),
            json!({"duration": 7201}),
            "InvalidParameterValue",
            400,
        ),
        (
            env.deploy_token(),
            json!({"policy": "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"s3:*\",\"Resource\":\"*\"}]}"}),
            "MalformedPolicyDocument",
            400,
        ),
        (
            env.issuer.sign(Alg::ES256, &{
                let mut c =
                    env.issuer
                        .github_claims(AUD, "acme/webapp", "refs/heads/main", "production");
                c["exp"] = json!(now() - 600);
                c
            }),
            json!({}),
            "ExpiredTokenException",
            400,
        ),
        (
            env.token("acme/webapp", "refs/heads/dev", "production"),
            json!({}),
            "IDPRejectedClaim",
            403,
        ),
        ("not.a.token".into(), json!({}), "InvalidIdentityToken", 400),
    ];
    for (token, extra, code, status) in cases {
        let resp = sts(token, extra.clone());
        assert_eq!(resp["ok"], false, "{extra}: {resp}");
        assert_eq!(resp["code"], code, "{extra}: {resp}");
        assert_eq!(resp["status"], status, "{extra}: {resp}");
    }
    // A narrower session policy is fine and binds the narrower scope.
    let narrow = sts(
        env.deploy_token(),
        json!({"policy": "{\"Version\":\"2012-10-17\",\"Statement\":[{\"Effect\":\"Allow\",\"Action\":\"s3:GetObject\",\"Resource\":\"arn:aws:s3:::acme-artifacts/web/*\"}]}"}),
    );
    assert_eq!(narrow["ok"], true, "{narrow}");
    let keyring = load_keyring(&env).await;
    let c = &narrow["credentials"];
    let claims = keyring
        .open(
            c["AccessKeyId"].as_str().unwrap(),
            c["SessionToken"].as_str().unwrap(),
            time::OffsetDateTime::now_utc(),
        )
        .unwrap();
    assert!(
        claims
            .scope
            .allows("s3:GetObject", "arn:aws:s3:::acme-artifacts/web/x")
    );
    assert!(
        !claims
            .scope
            .allows("s3:PutObject", "arn:aws:s3:::acme-artifacts/web/x")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_with_their_code_and_audited() {
    let env = Env::start().await;
    let iss = &env.issuer;
    let claims = || iss.github_claims(AUD, "acme/webapp", "refs/heads/main", "production");
    let with = |patch: Value| {
        let mut c = claims();
        for (k, v) in patch.as_object().unwrap() {
            if v.is_null() {
                c.as_object_mut().unwrap().remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let t = now();
    let cases: Vec<(String, ErrorCode)> = vec![
        (
            iss.sign(Alg::RS256, &with(json!({"exp": t - 300}))),
            ErrorCode::TokenExpired,
        ),
        (
            iss.sign(Alg::RS256, &with(json!({"nbf": t + 600}))),
            ErrorCode::TokenNotYetValid,
        ),
        (
            iss.sign(Alg::RS256, &with(json!({"iat": t + 600}))),
            ErrorCode::TokenIssuedInFuture,
        ),
        (
            iss.sign(
                Alg::RS256,
                &with(json!({"iss": "https://token.actions.githubusercontent.com"})),
            ),
            ErrorCode::TokenIssuerUnknown,
        ),
        (
            iss.sign(Alg::RS256, &with(json!({"aud": "other"}))),
            ErrorCode::TokenAudienceInvalid,
        ),
        (
            iss.sign(Alg::RS256, &with(json!({"aud": null}))),
            ErrorCode::TokenAudienceInvalid,
        ),
        (iss.unsigned(&claims()), ErrorCode::TokenAlgorithmRefused),
        (
            iss.hs256_with_public_key(&claims()),
            ErrorCode::TokenAlgorithmRefused,
        ),
        (
            iss.sign_with_unpublished_key(Alg::ES256, &claims()),
            ErrorCode::TokenKeyUnknown,
        ),
        (
            iss.sign_forged(Alg::RS256, &claims()),
            ErrorCode::TokenSignatureInvalid,
        ),
        (
            iss.sign(Alg::RS256, &with(json!({"pad": "x".repeat(20_000)}))),
            ErrorCode::RequestTooLarge,
        ),
    ];
    for (token, code) in cases {
        assert_refused(&env, jwt_request(&token, &["deployer"]), code).await;
    }

    // Replay: the second use of a token is refused, and only one credential exists.
    let token = env.deploy_token();
    let client = env.client(None).await;
    client
        .exchange_token(jwt_request(&token, &["deployer"]))
        .await
        .unwrap();
    assert_refused(
        &env,
        jwt_request(&token, &["deployer"]),
        ErrorCode::TokenReplayed,
    )
    .await;

    // Claims that try to escape the SPIFFE ID prefix.
    for env_claim in ["../../admin", "a/b", "x%2fy", "..", ""] {
        let token = env.token("acme/tools", "refs/heads/main", env_claim);
        assert_refused(
            &env,
            jwt_request(&token, &["deployer"]),
            ErrorCode::SpiffeIdEscapesPrefix,
        )
        .await;
    }

    // Grants: role, duration cap, session policy scope, credential kind.
    let t = env.deploy_token();
    assert_refused(
        &env,
        cloud_request(&t, "arn:aws:iam::123456789012:role/admin", "", 0),
        ErrorCode::RoleNotGranted,
    )
    .await;
    assert_refused(
        &env,
        cloud_request(&env.deploy_token(), ROLE, "", 3 * 3600),
        ErrorCode::TtlTooLong,
    )
    .await;
    assert_refused(
        &env,
        cloud_request(
            &env.deploy_token(),
            ROLE,
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"s3:*","Resource":"arn:aws:s3:::acme-artifacts/*"}]}"#,
            0,
        ),
        ErrorCode::SessionPolicyTooBroad,
    )
    .await;
    assert_refused(
        &env,
        cloud_request(&env.deploy_token(), ROLE, "{not json", 0),
        ErrorCode::SessionPolicyMalformed,
    )
    .await;
    let tools = env.token("acme/tools", "refs/heads/main", "staging");
    let (kc, _) = (keys::generate_key_and_csr().unwrap(), ());
    assert_refused(
        &env,
        ExchangeTokenRequest {
            subject_token: tools,
            join_token: String::new(),
            ttl_seconds: 0,
            credential: Some(Wanted::X509Svid(X509SvidParams { csr: kc.csr_der })),
        },
        ErrorCode::CredentialNotGranted,
    )
    .await;

    // The server never failed: the audit chain is intact.
    let store = env.store().await;
    store.verify_audit_chain(0, None).await.unwrap();
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_issuer_fails_fast_with_issuer_unavailable() {
    let env = Env::start().await;
    env.issuer.set_delay(Duration::from_secs(20));
    let started = std::time::Instant::now();
    assert_refused(
        &env,
        jwt_request(&env.deploy_token(), &["deployer"]),
        ErrorCode::IssuerUnavailable,
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_mfa_needs_both_factors_bound_to_one_identity() {
    let env = Env::start().await;
    let id = format!("spiffe://{TRUST_DOMAIN}/ci/db/production");
    let db_token = || env.token("acme/db", "refs/heads/main", "production");
    // The CI token alone is not enough.
    assert_refused(
        &env,
        jwt_request(&db_token(), &["postgres"]),
        ErrorCode::FactorMissing,
    )
    .await;
    let second_factor = ["--purpose", "second-factor", "--policy", "e2e-db-mfa"];
    // A join token bound to another identity is no factor for this one.
    let other = env.site.token_with(
        &format!("spiffe://{TRUST_DOMAIN}/ci/db/staging"),
        &second_factor,
    );
    let mut req = jwt_request(&db_token(), &["postgres"]);
    req.join_token = other;
    assert_refused(&env, req, ErrorCode::FactorMissing).await;
    // A bootstrap token for the right identity is refused as a second
    // factor, and stays unused for what it was made for.
    let bootstrap = env.site.token(&id);
    let mut req = jwt_request(&db_token(), &["postgres"]);
    req.join_token = bootstrap;
    assert_refused(&env, req, ErrorCode::JoinTokenWrongPurpose).await;
    // A second factor made for another policy is none for this one.
    let elsewhere = env.site.token_with(
        &id,
        &["--purpose", "second-factor", "--policy", "e2e-deploy"],
    );
    let mut req = jwt_request(&db_token(), &["postgres"]);
    req.join_token = elsewhere;
    assert_refused(&env, req, ErrorCode::FactorMissing).await;
    // Both factors: granted, audited as two-factor, join token consumed.
    let join = env.site.token_with(&id, &second_factor);
    let client = env.client(None).await;
    let mut req = jwt_request(&db_token(), &["postgres"]);
    req.join_token = join.clone();
    let resp = client.exchange_token(req).await.unwrap();
    assert_eq!(resp.spiffe_id, id);
    let audit = env.last_audit().await;
    assert_eq!(audit.evidence_type, Some(EvidenceType::OidcAndJoinToken));
    assert_eq!(audit.evidence_type.unwrap().factor_count(), 2);
    assert_eq!(audit.evidence_digest.unwrap().split('+').count(), 2);
    let mut again = jwt_request(&db_token(), &["postgres"]);
    again.join_token = join;
    assert_refused(&env, again, ErrorCode::JoinTokenUsed).await;
}

/// Polls `/v1/policies` until `pred` holds (bounded; no fixed sleeps).
async fn wait_policy_status(env: &Env, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = env.policy_status();
        if pred(&status) {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "policy status never matched: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_hot_reload_keeps_the_last_good_set() {
    let env = Env::start().await;
    let client = env.client(None).await;
    let first = env.policy_status();
    assert_eq!(first["policies"].as_array().unwrap().len(), 3, "{first}");
    assert!(first["last_error"].is_null());
    // Break a file: the reload is refused with the file named, the running
    // set stays, and deploys keep working.
    std::fs::write(env.policy_dir.join("20-tools.yaml"), "name: [unclosed\n").unwrap();
    let broken = wait_policy_status(&env, |s| !s["last_error"].is_null()).await;
    assert!(
        broken["last_error"]
            .as_str()
            .unwrap()
            .contains("20-tools.yaml"),
        "{broken}"
    );
    assert_eq!(broken["generation"], first["generation"]);
    client
        .exchange_token(jwt_request(&env.deploy_token(), &["deployer"]))
        .await
        .unwrap();
    // Fix it with a change: the new rule applies.
    let fixed = policies(env.issuer.issuer())
        .into_iter()
        .find(|(n, _)| *n == "20-tools.yaml")
        .unwrap()
        .1
        .replace("audiences: [deployer]", "audiences: [deployer, linter]");
    std::fs::write(env.policy_dir.join("20-tools.yaml"), fixed).unwrap();
    let first_gen = first["generation"].as_u64().unwrap();
    wait_policy_status(&env, |s| {
        s["last_error"].is_null() && s["generation"].as_u64().unwrap() > first_gen
    })
    .await;
    let t = env.token("acme/tools", "refs/heads/main", "lint");
    let r = client
        .exchange_token(jwt_request(&t, &["linter"]))
        .await
        .unwrap();
    assert_eq!(
        r.spiffe_id,
        format!("spiffe://{TRUST_DOMAIN}/ci/tools/lint")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn herald_is_an_oidc_issuer_for_its_own_jwts() {
    let env = Env::start().await;
    let (status, body) = env.server.http_get("/.well-known/openid-configuration");
    assert_eq!(status, 200);
    let doc: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["issuer"], env.http());
    let (status, body) = env.server.http_get("/.well-known/jwks.json");
    assert_eq!(status, 200);
    let jwks: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(jwks["keys"][0]["alg"], "ES256");
    let (_, body) = env.server.http_get("/v1/bundle");
    let bundle: Value = serde_json::from_str(&body).unwrap();
    let uses: Vec<&str> = bundle["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["use"].as_str().unwrap())
        .collect();
    assert!(
        uses.contains(&"x509-svid") && uses.contains(&"jwt-svid"),
        "{uses:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_aws_sdk_web_identity_provider_gets_credentials_from_herald() {
    let env = Env::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("web-identity-token");
    std::fs::write(&token_file, env.deploy_token()).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/sdk_web_identity.py");
    let out = Command::new(python())
        .arg(script)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir.path())
        .env("AWS_CONFIG_FILE", dir.path().join("none"))
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.path().join("none"))
        .env("AWS_ROLE_ARN", ROLE)
        .env("AWS_ROLE_SESSION_NAME", "fn-cold-start")
        .env("AWS_WEB_IDENTITY_TOKEN_FILE", &token_file)
        .env("AWS_ENDPOINT_URL_STS", env.http())
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["method"], "assume-role-with-web-identity", "{v}");
    assert!(v["access_key"].as_str().unwrap().starts_with("ASIA"), "{v}");
    assert_eq!(v["has_token"], true);
    let audit = env.last_audit().await;
    assert_eq!(audit.action, "exchange.cloud_credentials");
    assert_eq!(audit.outcome, Outcome::Success);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_fetches_the_github_actions_token_and_writes_credentials_files() {
    let env = Env::start().await;
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("aws/credentials");
    let run = |args: &[&str], actions: bool| {
        let mut cmd = Command::new(herald_bin());
        cmd.args(["exchange", "--server", &env.server.url(), "--bundle"])
            .arg(env.site.bundle_pem())
            .args(args)
            .env_remove("HERALD_KEK");
        if actions {
            cmd.env(
                "ACTIONS_ID_TOKEN_REQUEST_URL",
                env.issuer.actions_token_request_url(),
            )
            .env(
                "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
                herald_test_oidc::ACTIONS_REQUEST_TOKEN,
            )
            // The runner's token service is HTTPS with the test CA.
            .env("SSL_CERT_FILE", env.issuer.ca_pem_path());
        }
        cmd.output().unwrap()
    };
    // Cloud credentials as an AWS shared-credentials file, mode 0600.
    let out = ok(run(
        &[
            "--github-actions",
            AUD,
            "--role-arn",
            ROLE,
            "--format",
            "aws-credentials",
            "--profile",
            "deploy",
            "--out",
            creds.to_str().unwrap(),
        ],
        true,
    ));
    assert!(
        stderr(&out).contains("by policy e2e-deploy"),
        "{}",
        stderr(&out)
    );
    let text = std::fs::read_to_string(&creds).unwrap();
    assert!(
        text.starts_with("[deploy]\naws_access_key_id = ASIA"),
        "{text}"
    );
    assert!(text.contains("aws_session_token = "));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&creds).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A JWT-SVID as shell exports.
    let out = ok(run(
        &[
            "--github-actions",
            AUD,
            "--jwt-audience",
            "deployer",
            "--format",
            "env",
        ],
        true,
    ));
    let line = stdout(&out);
    let token = line.trim().strip_prefix("export HERALD_JWT_SVID=").unwrap();
    assert_eq!(token.split('.').count(), 3);
    // Without the runner's variables: one clear line with a stable code.
    let out = run(
        &["--github-actions", AUD, "--jwt-audience", "deployer"],
        false,
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("error[invalid_request]"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("id-token: write"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_caller_is_rate_limited_before_verification_and_audited() {
    let env = Env::start_with(
        "[rate_limit]\nper_caller_rate = 0.01\nper_caller_burst = 3\nreport_interval = \"300ms\"\n",
    )
    .await;
    let client = env.client(None).await;
    for _ in 0..3 {
        client
            .exchange_token(jwt_request(&env.deploy_token(), &["deployer"]))
            .await
            .unwrap();
    }
    let fetches = env.issuer.jwks_fetches();
    let records_before = env
        .store()
        .await
        .verify_audit_chain(0, None)
        .await
        .unwrap()
        .records;
    // Even a token that would be refused anyway costs the caller nothing
    // more than the refusal: no signature check, no JWKS fetch.
    env.issuer.rotate(false);
    for _ in 0..20 {
        let err = client
            .exchange_token(jwt_request(&env.deploy_token(), &["deployer"]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::RateLimited), "{err}");
    }
    assert_eq!(env.issuer.jwks_fetches(), fetches);
    // Over HTTP too, as OAuth's and STS's throttling answers.
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/token", env.http()))
        .form(&[
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", &env.deploy_token()),
            ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("audience", "deployer"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["herald-error-code"], "rate_limited");
    // The flood is audited in aggregate: one record per caller per
    // interval, with its count and what it asked for, not one durable
    // write per refusal.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (summaries, counted) = loop {
        let store = env.store().await;
        let records = store.audit_records(records_before, 10_000).await.unwrap();
        store.close().await;
        let summaries: Vec<_> = records
            .iter()
            .filter(|r| r.event.action == "rate_limited")
            .map(|r| r.event.clone())
            .collect();
        let counted: u64 = summaries
            .iter()
            .map(|e| {
                let d = e.detail.as_deref().unwrap_or_default();
                d.split(' ').next().unwrap_or("0").parse::<u64>().unwrap()
            })
            .sum();
        if counted >= 21 {
            break (summaries, counted);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "aggregated records: {summaries:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(counted, 21);
    assert!(
        summaries.len() <= 3,
        "{} records for 21 refusals",
        summaries.len()
    );
    for s in &summaries {
        assert_eq!(s.reason, Some(ErrorCode::RateLimited));
        assert!(s.caller.starts_with("peer:127.0.0.1"), "{}", s.caller);
        assert!(
            s.detail.as_deref().unwrap().contains("exchange.jwt_svid x"),
            "{s:?}"
        );
    }
}

/// An SVID for `id` minted with a bootstrap token, as an mTLS identity.
async fn bootstrap_identity(env: &Env, id: &str) -> ClientIdentity {
    let kc = keys::generate_key_and_csr().unwrap();
    let resp = env
        .client(None)
        .await
        .mint_x509_svid(&env.site.token(id), kc.csr_der)
        .await
        .unwrap();
    ClientIdentity {
        cert_chain: resp.cert_chain,
        key_pkcs8: kc.key_pkcs8,
    }
}

/// Asserts an exchange presenting `identity` (mTLS) is refused with `code`,
/// audited as such.
async fn assert_refused_with(
    env: &Env,
    identity: ClientIdentity,
    req: ExchangeTokenRequest,
    code: ErrorCode,
) {
    let err = env
        .client(Some(identity))
        .await
        .exchange_token(req)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(code), "{err}");
    let audit = env.last_audit().await;
    assert_eq!(audit.reason, Some(code), "audit record of {code}");
    assert_eq!(audit.evidence_type, Some(EvidenceType::OidcAndX509Svid));
    assert!(audit.serial.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchanged_svid_never_renews_and_an_svid_factor_is_checked_in_full() {
    let env = Env::start().await;
    let td = TRUST_DOMAIN;
    // A policy whose second factor is the caller's own SVID, and bootstrap
    // tokens to mint such SVIDs.
    write_bootstrap_policy(&env.policy_dir);
    std::fs::write(
        env.policy_dir.join("40-svc-mfa.yaml"),
        format!(
            r#"name: e2e-svc-mfa
evidence:
  oidc:
    issuer: {}
    audiences: [{AUD}]
  require: [x509_svid]
pins:
  repository: acme/svc
spiffe_id:
  prefix: spiffe://{td}/ci/svc/
  template: "spiffe://{td}/ci/svc/{{environment}}"
grants:
  x509_svid: {{ max_ttl: 15m }}
"#,
            env.issuer.issuer()
        ),
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while env.policy_status()["policies"].as_array().unwrap().len() != 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "policies not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let svc = |env_name: &str| env.token("acme/svc", "refs/heads/main", env_name);
    let x509 = |token: String| ExchangeTokenRequest {
        subject_token: token,
        join_token: String::new(),
        ttl_seconds: 0,
        credential: Some(Wanted::X509Svid(X509SvidParams {
            csr: keys::generate_key_and_csr().unwrap().csr_der,
        })),
    };
    let prod = format!("spiffe://{td}/ci/svc/production");

    // Both factors: an exchange-issued SVID...
    let factor = bootstrap_identity(&env, &prod).await;
    let kc = keys::generate_key_and_csr().unwrap();
    let mut req = x509(svc("production"));
    req.credential = Some(Wanted::X509Svid(X509SvidParams { csr: kc.csr_der }));
    let resp = env
        .client(Some(ClientIdentity {
            cert_chain: factor.cert_chain.clone(),
            key_pkcs8: factor.key_pkcs8.clone(),
        }))
        .await
        .exchange_token(req)
        .await
        .unwrap();
    let Some(Given::X509Svid(exchanged)) = resp.credential else {
        panic!("no X.509 SVID");
    };
    assert_eq!(exchanged.spiffe_id, prod);
    // ...which never renews: the job presents fresh evidence instead.
    let err = env
        .client(Some(ClientIdentity {
            cert_chain: exchanged.cert_chain,
            key_pkcs8: kc.key_pkcs8,
        }))
        .await
        .renew_x509_svid(keys::generate_key_and_csr().unwrap().csr_der)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::CredentialNotRenewable), "{err}");
    assert_eq!(
        env.last_audit().await.reason,
        Some(ErrorCode::CredentialNotRenewable)
    );

    // A revoked SVID is no factor.
    let serial = herald_attest::svid::parse_x509_svid(&factor.cert_chain[0])
        .unwrap()
        .serial_hex;
    ok(env
        .site
        .herald(&["revoke", "--serial", &serial, "--reason", "test"]));
    assert_refused_with(
        &env,
        factor,
        x509(svc("production")),
        ErrorCode::SvidRevoked,
    )
    .await;

    // Nor is one from another deployment of the same trust domain.
    let elsewhere = Site::new();
    let other_server = elsewhere.start();
    let kc = keys::generate_key_and_csr().unwrap();
    let anchors = common::pem_file_certs(&elsewhere.bundle_pem());
    let foreign = HeraldClient::connect(&other_server.url(), &anchors, None)
        .await
        .unwrap()
        .mint_x509_svid(&elsewhere.token(&prod), kc.csr_der)
        .await
        .unwrap();
    assert_refused_with(
        &env,
        ClientIdentity {
            cert_chain: foreign.cert_chain,
            key_pkcs8: kc.key_pkcs8,
        },
        x509(svc("production")),
        ErrorCode::SvidInvalid,
    )
    .await;

    // Nor one whose lineage belongs to a banned node.
    let staging = format!("spiffe://{td}/ci/svc/staging");
    let store = env.store().await;
    let node_serial = "5e5e5e5e5e5e5e5e".to_string();
    store
        .commit_node_attestation(
            herald_store::NodeAttestation {
                ek_hash: "ee".repeat(32),
                spiffe_id: staging.clone(),
                ak_name: "000b".into(),
                policy: "e2e-nodes".into(),
                reset_count: 1,
                restart_count: 0,
                clock: 0,
                firmware_version: 1,
                golden_set: None,
                now_s: now(),
            },
            herald_store::IssuedCredential {
                serial: node_serial.clone(),
                kind: "x509_svid".into(),
                spiffe_id: staging.clone(),
                not_before: now(),
                not_after: now() + 600,
                issued_at: now(),
                evidence_type: "tpm".into(),
                evidence_digest: None,
                policy: Some("e2e-nodes".into()),
                parent_serial: None,
                public_key_sha256: String::new(),
                ca_key_id: String::new(),
                origin: Some(herald_core::Origin::Node),
                root_serial: node_serial,
                root_at: now(),
                cert_sha256: None,
            },
            None,
            None,
            herald_core::AuditEvent::new("node.attest", "test"),
        )
        .await
        .unwrap();
    store.close().await;
    ok(env
        .site
        .herald(&["node", "ban", &staging, "--reason", "stolen"]));
    // Minted after the ban, for the banned node's identity: not revoked by
    // the ban's sweep, but its lineage is the banned node's.
    let late = bootstrap_identity(&env, &staging).await;
    assert_refused_with(&env, late, x509(svc("staging")), ErrorCode::NodeBanned).await;
    drop(other_server);
}

/// The CLI's two lines: `herald: error[code]: …` (stable, scripts match
/// it) and `  fix: …`; returns the fix.
fn code_and_fix(out: &std::process::Output, code: &str) -> String {
    assert!(!out.status.success());
    let text = stderr(out);
    let mut lines = text.lines().filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    assert!(
        first.starts_with(&format!("herald: error[{code}]: ")),
        "{text}"
    );
    let fix = lines
        .next()
        .and_then(|l| l.strip_prefix("  fix: "))
        .unwrap_or_else(|| panic!("no fix line: {text}"));
    fix.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_errors_name_what_to_do() {
    // An issuer whose HTTPS certificate the server does not trust (no
    // extra_roots for it), beside the trusted one.
    let untrusted = TestIssuer::start().await;
    let env = Env::start_with(&format!(
        "[[oidc.issuers]]\nissuer = \"{}\"\naudiences = [\"{AUD}\"]\nhttp_timeout = \"1s\"\nmin_refresh_interval = \"0s\"\n",
        untrusted.issuer()
    ))
    .await;
    let exchange_with = |bundle: &Path, token: &str| {
        Command::new(herald_bin())
            .args(["exchange", "--server", &env.server.url(), "--bundle"])
            .arg(bundle)
            .args(["--token-env", "T", "--jwt-audience", "deployer"])
            .env("T", token)
            .env_remove("HERALD_KEK")
            .output()
            .unwrap()
    };
    let exchange = |token: &str| exchange_with(&env.site.bundle_pem(), token);

    let token = untrusted.sign(
        Alg::RS256,
        &untrusted.github_claims(AUD, "acme/webapp", "refs/heads/main", "production"),
    );
    let fix = code_and_fix(&exchange(&token), "issuer_unavailable");
    assert!(fix.contains("extra_roots"), "{fix}");
    assert!(fix.contains("certificate"), "{fix}");

    // A bundle that is no Herald bundle, and another Herald server's: the
    // server's certificate is refused.
    let fix = code_and_fix(
        &exchange_with(untrusted.ca_pem_path(), &env.deploy_token()),
        "invalid_input",
    );
    assert!(fix.contains("--server-spiffe-id"), "{fix}");
    let stranger = Site::new();
    let _stranger_server = stranger.start();
    let fix = code_and_fix(
        &exchange_with(&stranger.bundle_pem(), &env.deploy_token()),
        "unavailable",
    );
    assert!(fix.contains("does not chain to --bundle"), "{fix}");

    // A call site that knows the cause gives its own fix.
    let out = Command::new(herald_bin())
        .args(["exchange", "--server", &env.server.url(), "--bundle"])
        .arg(env.site.bundle_pem())
        .args([
            "--token-env",
            "HERALD_TEST_UNSET",
            "--jwt-audience",
            "deployer",
        ])
        .env_remove("HERALD_TEST_UNSET")
        .output()
        .unwrap();
    let fix = code_and_fix(&out, "invalid_request");
    assert!(fix.contains("export HERALD_TEST_UNSET"), "{fix}");

    // A token that is no JWT.
    let fix = code_and_fix(&exchange("not-a-jwt"), "token_malformed");
    assert!(fix.contains("base64url"), "{fix}");
    // A replayed token.
    let token = env.deploy_token();
    ok(exchange(&token));
    let fix = code_and_fix(&exchange(&token), "token_replayed");
    assert!(fix.contains("fresh token"), "{fix}");

    // A configuration file that does not exist.
    let out = Command::new(herald_bin())
        .args(["server", "--config", "/nonexistent/herald.toml"])
        .output()
        .unwrap();
    let fix = code_and_fix(&out, "config");
    assert!(fix.contains("does not exist"), "{fix}");

    // A port another process holds (a site of its own: one server per data directory).
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other = Site::new();
    let out = Command::new(herald_bin())
        .args(["server", "--config"])
        .arg(other.config())
        .env("HERALD_LISTEN_GRPC", held.local_addr().unwrap().to_string())
        .env("HERALD_LISTEN_HTTP", "127.0.0.1:0")
        .env("HERALD_LOG", "error")
        .env_remove("HERALD_KEK")
        .output()
        .unwrap();
    let fix = code_and_fix(&out, "startup");
    assert!(fix.contains("ss -ltnp"), "{fix}");
}

/// Introspection of an X.509 SVID given as PEM makes renewal's check: a
/// certificate carrying a genuine serial, SPIFFE ID and public key, but
/// signed by another CA, is not Herald's and is not active.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn introspecting_an_x509_svid_checks_its_record_and_the_ca_that_signed_it() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
        SanType, SerialNumber, SubjectPublicKeyInfo,
    };
    let env = Env::start().await;
    let before = env.policy_status()["policies"].as_array().unwrap().len();
    write_bootstrap_policy(&env.policy_dir);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while env.policy_status()["policies"].as_array().unwrap().len() != before + 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "policies not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = format!("spiffe://{TRUST_DOMAIN}/svc/introspected");
    let genuine = bootstrap_identity(&env, &id).await;
    let info = herald_attest::svid::parse_x509_svid(&genuine.cert_chain[0]).unwrap();
    let (_, parsed) = x509_parser::parse_x509_certificate(&genuine.cert_chain[0]).unwrap();

    // The same serial, SPIFFE ID and public key, under the attacker's CA.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(vec![]).unwrap();
    ca.distinguished_name.push(DnType::CommonName, "Rogue CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let rogue = Issuer::new(ca, ca_key);
    let mut leaf = CertificateParams::new(vec![]).unwrap();
    leaf.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.serial_number = Some(SerialNumber::from_slice(
        &hex::decode(&info.serial_hex).unwrap(),
    ));
    let spki = SubjectPublicKeyInfo::from_der(parsed.tbs_certificate.subject_pki.raw).unwrap();
    let forged = leaf.signed_by(&spki, &rogue).unwrap();

    let bearer = introspector(&env).await;
    let introspect_pem = |der: &[u8]| {
        let pem = herald_client::files::to_pem("CERTIFICATE", &[der.to_vec()]);
        let (env, bearer) = (&env, bearer.clone());
        async move {
            introspect(
                env,
                &bearer,
                &[("token", pem.as_str()), ("token_type_hint", "x509_svid")],
            )
            .await
        }
    };
    let active = introspect_pem(&genuine.cert_chain[0]).await;
    assert_eq!(active["active"], true, "{active}");
    assert_eq!(active["sub"], id.as_str());
    assert_eq!(active["serial"], info.serial_hex.as_str());
    let refused = introspect_pem(forged.der()).await;
    assert_eq!(
        refused["active"], false,
        "a leaf from another CA with the genuine serial and key: {refused}"
    );
}
