//! Node attestation without a TPM, against the real server: Kubernetes-
//! and GCP-shaped platform tokens from the real OIDC test issuer, and AWS
//! instance identity documents from a test signer read through an IMDSv2
//! stand-in. Every refusal comes back with its stable code and is audited;
//! and `herald agent` with a platform token file attests and serves a
//! workload its SVID.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use common::aws::{Imds, TestSigner};
use common::node::{start_agent, wait_status, x509_ids};
use common::{Server, Site, TRUST_DOMAIN, ok, stdout};
use herald_agent::attest::{NodeEvidence, attest_without_tpm};
use herald_client::{ClientError, HeraldClient, keys};
use herald_core::ErrorCode;
use herald_proto::v1::node_attestation_service_client::NodeAttestationServiceClient;
use herald_proto::v1::{
    AttestHello, AttestRequest, AttestResponse, AwsInstanceIdentity, X509SvidResponse,
    attest_request, attest_response,
};
use herald_test_oidc::{Alg, TestIssuer, now};

const AUD: &str = "herald";
const ACCOUNT: &str = "123456789012";

/// The policies: Kubernetes nodes of cluster c1 (the agent's service
/// account only), GCP instances of project acme, AWS instances of one account.
fn policies(dir: &Path, issuer: &str, signer: &TestSigner) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("aws.pem"), &signer.cert_pem).unwrap();
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    std::fs::write(
        dir.join("a-k8s.yaml"),
        format!(
            r#"name: k8s-nodes
evidence:
  platform_token: {{ issuer: "{issuer}", audiences: [{AUD}], cluster: c1 }}
pins:
  kubernetes.io.namespace: herald-system
  kubernetes.io.serviceaccount.name: herald-agent
spiffe_id:
  prefix: spiffe://{TRUST_DOMAIN}/k8s/
  template: "spiffe://{TRUST_DOMAIN}/k8s/{{cluster}}/node/{{node}}"
grants:
  x509_svid: {{ max_ttl: 10m }}
workloads:
  - spiffe_id: spiffe://{TRUST_DOMAIN}/workload/web
    selectors: ["unix:uid:{uid}"]
"#
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("b-gce.yaml"),
        format!(
            r#"name: gce-instances
evidence:
  platform_token: {{ issuer: "{issuer}", audiences: [{AUD}] }}
pins: {{ platform: gcp, project_id: acme }}
spiffe_id:
  prefix: spiffe://{TRUST_DOMAIN}/gce/
  template: "spiffe://{TRUST_DOMAIN}/gce/{{project_id}}/{{zone}}/{{instance_name}}"
grants:
  x509_svid: {{ max_ttl: 10m }}
"#
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("c-aws.yaml"),
        format!(
            r#"name: aws-instances
evidence:
  aws_iid: {{ certificates: [aws.pem], max_age: 1h }}
pins: {{ account: "{ACCOUNT}" }}
condition: claims.instance_type == "m5.large"
spiffe_id:
  prefix: spiffe://{TRUST_DOMAIN}/aws/
  template: "spiffe://{TRUST_DOMAIN}/aws/{{account}}/{{region}}/{{instance_id}}"
grants:
  x509_svid: {{ max_ttl: 10m }}
"#
        ),
    )
    .unwrap();
}

struct Env {
    site: Site,
    issuer: TestIssuer,
    signer: TestSigner,
    _policies: tempfile::TempDir,
}

impl Env {
    async fn new() -> Env {
        let issuer = TestIssuer::start().await;
        let signer = TestSigner::new();
        let policies_dir = tempfile::tempdir().unwrap();
        policies(policies_dir.path(), issuer.issuer(), &signer);
        let site = Site::with_extra(&format!(
            "[policy]\ndir = \"{}\"\n[[oidc.issuers]]\nissuer = \"{}\"\naudiences = [\"{AUD}\"]\nextra_roots = \"{}\"\nhttp_timeout = \"1s\"\nmin_refresh_interval = \"0s\"\n",
            policies_dir.path().display(),
            issuer.issuer(),
            issuer.ca_pem_path().display()
        ));
        Env {
            site,
            issuer,
            signer,
            _policies: policies_dir,
        }
    }

    fn bundle(&self) -> Vec<Vec<u8>> {
        common::pem_file_certs(&self.site.bundle_pem())
    }

    fn psat(&self, node: Option<&str>) -> String {
        self.issuer.sign(
            Alg::ES256,
            &self
                .issuer
                .kubernetes_claims(AUD, "herald-system", "herald-agent", node),
        )
    }
}

/// One hello (evidence + CSR) and the server's answer.
async fn hello(
    server: &Server,
    bundle: &[Vec<u8>],
    fill: impl FnOnce(&mut AttestHello),
) -> Result<X509SvidResponse, ClientError> {
    let client = HeraldClient::connect(&server.url(), bundle, None)
        .await
        .unwrap();
    let key = keys::generate_key_and_csr().unwrap();
    let mut h = AttestHello {
        csr: key.csr_der,
        ..AttestHello::default()
    };
    fill(&mut h);
    let mut api = NodeAttestationServiceClient::new(client.channel());
    let request = AttestRequest {
        step: Some(attest_request::Step::Hello(h)),
    };
    let mut responses = api
        .attest(tokio_stream::once(request))
        .await
        .map_err(ClientError::from)?
        .into_inner();
    match responses.message().await {
        Ok(Some(AttestResponse {
            step: Some(attest_response::Step::Result(r)),
        })) => Ok(r),
        Ok(other) => panic!("expected the result, got {other:?}"),
        Err(e) => Err(ClientError::from(e)),
    }
}

fn code<T: std::fmt::Debug>(r: &Result<T, ClientError>) -> ErrorCode {
    match r {
        Ok(v) => panic!("expected a refusal, got {v:?}"),
        Err(e) => e
            .code()
            .unwrap_or_else(|| panic!("refusal without a code: {e}")),
    }
}

fn audited(site: &Site, codes: &[ErrorCode]) {
    let audit = stdout(&ok(site.herald(&["audit", "export", "--since", "1h"])));
    for c in codes {
        assert!(
            audit
                .lines()
                .any(|l| l.contains("\"node.attest\"") && l.contains(&format!("\"{c}\""))),
            "{c} not audited:\n{audit}"
        );
    }
    ok(site.herald(&["audit", "verify"]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_tokens_attest_nodes_once_and_every_refusal_is_audited() {
    let env = Env::new().await;
    let server = env.site.start();
    let bundle = env.bundle();

    // A Kubernetes node: its agent's projected token names the node.
    let token = env.psat(Some("node-1"));
    let svid = hello(&server, &bundle, |h| h.platform_token = token.clone())
        .await
        .unwrap();
    assert_eq!(
        svid.spiffe_id,
        format!("spiffe://{TRUST_DOMAIN}/k8s/c1/node/node-1")
    );
    // The same token again: single use.
    let replay = hello(&server, &bundle, |h| h.platform_token = token.clone()).await;
    assert_eq!(code(&replay), ErrorCode::TokenReplayed);
    // A fresh token of the same node re-attests it.
    let again = env.psat(Some("node-1"));
    hello(&server, &bundle, |h| h.platform_token = again)
        .await
        .unwrap();

    // Refusals.
    let wrong_aud = env.issuer.sign(
        Alg::ES256,
        &env.issuer
            .kubernetes_claims("vault", "herald-system", "herald-agent", Some("node-2")),
    );
    let mut other =
        env.issuer
            .kubernetes_claims(AUD, "herald-system", "herald-agent", Some("node-2"));
    other["iss"] = "https://other-cluster.example".into();
    let other_cluster = env.issuer.sign(Alg::ES256, &other);
    let other_sa = env.issuer.sign(
        Alg::ES256,
        &env.issuer
            .kubernetes_claims(AUD, "payments", "api", Some("node-2")),
    );
    let no_node = env.psat(None);
    let mut expired =
        env.issuer
            .kubernetes_claims(AUD, "herald-system", "herald-agent", Some("node-2"));
    expired["exp"] = (now() - 3600).into();
    let expired = env.issuer.sign(Alg::ES256, &expired);
    let forged = env.issuer.sign_forged(
        Alg::ES256,
        &env.issuer
            .kubernetes_claims(AUD, "herald-system", "herald-agent", Some("node-2")),
    );
    let cases = [
        ("wrong audience", wrong_aud, ErrorCode::TokenAudienceInvalid),
        (
            "other cluster's issuer",
            other_cluster,
            ErrorCode::TokenIssuerUnknown,
        ),
        ("another service account", other_sa, ErrorCode::PolicyDenied),
        ("no node claim", no_node, ErrorCode::NodeTokenClaimsMissing),
        ("expired", expired, ErrorCode::TokenExpired),
        ("forged", forged, ErrorCode::TokenSignatureInvalid),
    ];
    for (what, token, want) in &cases {
        let r = hello(&server, &bundle, |h| h.platform_token = token.clone()).await;
        assert_eq!(code(&r), *want, "{what}");
    }
    // Neither a TPM nor a CSR: refused before any verification.
    let bare = hello(&server, &bundle, |h| {
        h.platform_token = env.psat(Some("node-3"));
        h.csr.clear();
    })
    .await;
    assert_eq!(code(&bare), ErrorCode::InvalidRequest);

    // A GCP instance-identity token.
    let gce = env.issuer.sign(
        Alg::RS256,
        &env.issuer.gce_claims(AUD, "acme", "europe-west1-b", "vm-1"),
    );
    let svid = hello(&server, &bundle, |h| h.platform_token = gce)
        .await
        .unwrap();
    assert_eq!(
        svid.spiffe_id,
        format!("spiffe://{TRUST_DOMAIN}/gce/acme/europe-west1-b/vm-1")
    );
    let other_project = env.issuer.sign(
        Alg::RS256,
        &env.issuer
            .gce_claims(AUD, "elsewhere", "europe-west1-b", "vm-2"),
    );
    let r = hello(&server, &bundle, |h| h.platform_token = other_project).await;
    assert_eq!(code(&r), ErrorCode::PolicyDenied);

    // A node identity is held by one node: a node of another UID claiming
    // node-1's name (a recreated node) is refused until an operator resets it.
    let mut twin =
        env.issuer
            .kubernetes_claims(AUD, "herald-system", "herald-agent", Some("node-1"));
    twin["kubernetes.io"]["node"]["uid"] = "uid-recreated".into();
    let twin = env.issuer.sign(Alg::ES256, &twin);
    let r = hello(&server, &bundle, |h| h.platform_token = twin.clone()).await;
    assert_eq!(code(&r), ErrorCode::NodeEkChanged);

    let mut codes: Vec<ErrorCode> = cases.iter().map(|c| c.2).collect();
    codes.extend([
        ErrorCode::TokenReplayed,
        ErrorCode::InvalidRequest,
        ErrorCode::NodeEkChanged,
    ]);
    audited(&env.site, &codes);
    let nodes = stdout(&ok(env.site.herald(&["node", "list", "--json"])));
    assert_eq!(nodes.lines().count(), 2, "{nodes}");
    // A banned node's fresh tokens are refused.
    ok(env.site.herald(&[
        "node",
        "ban",
        &format!("spiffe://{TRUST_DOMAIN}/k8s/c1/node/node-1"),
    ]));
    let r = hello(&server, &bundle, |h| {
        h.platform_token = env.psat(Some("node-1"))
    })
    .await;
    assert_eq!(code(&r), ErrorCode::NodeBanned);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aws_instances_enrol_once_bound_to_their_agent_key() {
    let env = Env::new().await;
    let server = env.site.start();
    let bundle = env.bundle();
    let instance = "i-0123456789abcdef0";
    let doc = TestSigner::document(ACCOUNT, "eu-west-1", instance, now() - 60);
    let sig = env.signer.sign(&doc);

    // The agent's own IMDSv2 client, against the stand-in.
    let imds = Imds::start(doc.clone(), sig.clone()).await;
    let read =
        herald_agent::imds::instance_identity(&imds.url(), std::time::Duration::from_secs(2))
            .await
            .unwrap();
    assert_eq!(read.document, doc);
    assert_eq!(imds.state.lock().unwrap().tokens_issued, 1);
    // Without the session token IMDSv2 answers nothing.
    let plain = reqwest::get(format!(
        "{}/latest/dynamic/instance-identity/document",
        imds.url()
    ))
    .await
    .unwrap();
    assert_eq!(plain.status().as_u16(), 401);

    let client = HeraldClient::connect(&server.url(), &bundle, None)
        .await
        .unwrap();
    let enrolment = keys::generate_key_and_csr().unwrap();
    let again = |k: &keys::KeyAndCsr| keys::csr_for_key(&k.key_pkcs8).unwrap();
    let svid = attest_without_tpm(
        &client,
        NodeEvidence::AwsIid(read.clone()),
        again(&enrolment),
        None,
    )
    .await
    .unwrap();
    assert_eq!(
        svid.response.spiffe_id,
        format!("spiffe://{TRUST_DOMAIN}/aws/{ACCOUNT}/eu-west-1/{instance}")
    );
    // The same instance with the same agent key re-attests.
    attest_without_tpm(
        &client,
        NodeEvidence::AwsIid(read.clone()),
        again(&enrolment),
        None,
    )
    .await
    .unwrap();
    // Anyone else holding the document (another key) is refused.
    let thief = attest_without_tpm(
        &client,
        NodeEvidence::AwsIid(read.clone()),
        keys::generate_key_and_csr().unwrap(),
        None,
    )
    .await
    .map(|s| s.response);
    let thief_code = match &thief {
        Err(herald_agent::attest::AttestError::Client(e)) => e.code(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(thief_code, Some(ErrorCode::NodeAgentKeyChanged));
    // After an operator's reset, a new agent key enrols the instance.
    ok(env.site.herald(&[
        "node",
        "reset",
        &format!("spiffe://{TRUST_DOMAIN}/aws/{ACCOUNT}/eu-west-1/{instance}"),
    ]));
    let rebuilt = keys::generate_key_and_csr().unwrap();
    attest_without_tpm(
        &client,
        NodeEvidence::AwsIid(read.clone()),
        again(&rebuilt),
        None,
    )
    .await
    .unwrap();
    let old =
        attest_without_tpm(&client, NodeEvidence::AwsIid(read), again(&enrolment), None).await;
    assert!(old.is_err(), "the old key no longer enrols the instance");

    // Refusals.
    let iid = |document: Vec<u8>, signature: String| {
        move |h: &mut AttestHello| {
            h.aws_iid = Some(AwsInstanceIdentity {
                document,
                signature,
            })
        }
    };
    let other_signer = TestSigner::new();
    let fresh = TestSigner::document(ACCOUNT, "eu-west-1", "i-0fffffffffffffff1", now() - 60);
    let tampered = String::from_utf8(doc.clone())
        .unwrap()
        .replace("m5.large", "m5.24xlarge")
        .into_bytes();
    let other_account =
        TestSigner::document("210987654321", "eu-west-1", "i-0aaaaaaaaaaaaaaa2", now());
    let stale = TestSigner::document(ACCOUNT, "eu-west-1", "i-0bbbbbbbbbbbbbbb3", now() - 7200);
    let cases = [
        (
            "signed by another key",
            iid(fresh.clone(), other_signer.sign(&fresh)),
            ErrorCode::AwsIidSignatureInvalid,
        ),
        (
            "tampered after signing",
            iid(tampered, sig.clone()),
            ErrorCode::AwsIidSignatureInvalid,
        ),
        (
            "another account",
            iid(other_account.clone(), env.signer.sign(&other_account)),
            ErrorCode::PolicyDenied,
        ),
        (
            "launched two hours ago",
            iid(stale.clone(), env.signer.sign(&stale)),
            ErrorCode::AwsIidStale,
        ),
        (
            "not base64",
            iid(fresh.clone(), "%%%".into()),
            ErrorCode::AwsIidMalformed,
        ),
    ];
    let mut codes = vec![ErrorCode::NodeAgentKeyChanged];
    for (what, fill, want) in cases {
        let r = hello(&server, &bundle, fill).await;
        assert_eq!(code(&r), want, "{what}");
        codes.push(want);
    }
    audited(&env.site, &codes);
}

/// `herald agent` with a platform token file: attests, then serves a
/// workload its SVID over the Workload API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_attests_with_a_platform_token_file_and_serves_workloads() {
    let env = Env::new().await;
    let server = env.site.start();
    let agent_dir = tempfile::tempdir().unwrap();
    let dir = agent_dir.path();
    std::fs::copy(env.site.bundle_pem(), dir.join("bundle.pem")).unwrap();
    let token_file = dir.join("token");
    std::fs::write(&token_file, env.psat(Some("node-7"))).unwrap();
    let socket = dir.join("api/agent.sock");
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "servers = [\"{}\"]\ntrust_bundle = \"{}\"\ndata_dir = \"{}\"\n[attestation]\nmethod = \"platform_token\"\nplatform_token_file = \"{}\"\n[rotation]\nbackoff_min = \"200ms\"\nbackoff_max = \"1s\"\n[workload_api]\nsocket = \"{}\"\n",
            server.url(),
            dir.join("bundle.pem").display(),
            dir.join("state").display(),
            token_file.display(),
            socket.display(),
        ),
    )
    .unwrap();
    let _agent = start_agent(&config);
    let status = wait_status(dir, 60, "ready", |s| s.state == "ready");
    assert_eq!(
        status.spiffe_id.as_deref(),
        Some(format!("spiffe://{TRUST_DOMAIN}/k8s/c1/node/node-7").as_str())
    );
    // The workload (this test process) gets its SVID.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match x509_ids(&socket).await {
            Ok(ids) if ids == [format!("spiffe://{TRUST_DOMAIN}/workload/web")] => break,
            other => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no workload SVID: {other:?}"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
    let audit = stdout(&ok(env.site.herald(&["audit", "export", "--since", "1h"])));
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"node.attest\"") && l.contains("\"platform_token\"")),
        "{audit}"
    );
}
