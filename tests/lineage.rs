//! No path around policy, tried as an attacker would, against the real
//! binary: join tokens serve only their purpose, a presented certificate
//! must be the one Herald recorded under its serial (signed by the CA key
//! that issued it, never merely chaining to a shared upstream root),
//! lineages renew only within their policy's age, only a node attestation's
//! lineage acts as a node, workload SVIDs never renew themselves, and a ban
//! reaches everything descending from the node. Every refusal is audited
//! with its code.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use common::node::{NodeSite, start_agent, wait_status};
use common::*;
use herald_client::files::read_svid_dir;
use herald_client::keys::generate_key_and_csr;
use herald_client::{ClientIdentity, HeraldClient};
use herald_core::{ErrorCode, EvidenceType, JoinTokenPurpose};
use herald_proto::v1::workload_service_client::WorkloadServiceClient;
use herald_proto::v1::{BatchNewX509SvidsRequest, WorkloadSvidRequest, X509SvidResponse};
use herald_store::{NewJoinToken, Store};
use herald_test_tpm::SoftTpm;

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn identity(resp: &X509SvidResponse, key_pkcs8: Vec<u8>) -> ClientIdentity {
    ClientIdentity {
        cert_chain: resp.cert_chain.clone(),
        key_pkcs8,
    }
}

/// Mints an SVID with `token`; returns it with its key, as an identity.
async fn mint(client: &HeraldClient, token: &str) -> (X509SvidResponse, ClientIdentity) {
    let kc = generate_key_and_csr().unwrap();
    let resp = client.mint_x509_svid(token, kc.csr_der).await.unwrap();
    let id = identity(&resp, kc.key_pkcs8);
    (resp, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_serves_only_its_purpose() {
    let site = Site::new();
    let server = site.start();
    let store = Store::open(&site.db_url()).await.unwrap();
    let client = HeraldClient::connect(
        &server.url(),
        &common::pem_file_certs(&site.bundle_pem()),
        None,
    )
    .await
    .unwrap();
    let id = format!("spiffe://{TRUST_DOMAIN}/ci/db/production");
    // A token made as an MFA policy's second factor mints nothing alone —
    // even though a join-token policy would accept the identity.
    let second = site.token_with(&id, &["--purpose", "second-factor", "--policy", "db-mfa"]);
    let csr = || generate_key_and_csr().unwrap().csr_der;
    assert_refused(
        &store,
        client.mint_x509_svid(&second, csr()).await,
        ErrorCode::JoinTokenWrongPurpose,
        "x509_svid.mint",
    )
    .await;
    // Nor does a node's enrolment factor.
    let node = site.token_with(&id, &["--purpose", "node"]);
    assert_refused(
        &store,
        client.mint_x509_svid(&node, csr()).await,
        ErrorCode::JoinTokenWrongPurpose,
        "x509_svid.mint",
    )
    .await;
    // Refused tokens stay unused: the operator's second factor still works
    // for what it was made for.
    let listed = stdout(&ok(site.herald(&["token", "list"])));
    let second_line = listed
        .lines()
        .find(|l| l.contains("second_factor"))
        .unwrap();
    assert!(second_line.contains("unused"), "{listed}");
    // A bootstrap token mints, and the record names its lineage's policy.
    let boot = site.token(&id);
    let (svid, _) = mint(&client, &boot).await;
    let rec = store.issued(&svid.serial).await.unwrap().unwrap();
    assert_eq!(rec.policy.as_deref(), Some("e2e-bootstrap"));
    assert_eq!(rec.origin, Some(herald_core::Origin::Bootstrap));
    assert_eq!(rec.root_serial, svid.serial);
    // The CLI refuses tokens that could never serve: a second factor naming
    // no policy, a break-glass token without a reason or past its time box.
    let refused = |args: &[&str]| {
        let mut all = vec!["token", "create", "--spiffe-id", &id];
        all.extend_from_slice(args);
        let out = site.herald(&all);
        assert!(!out.status.success(), "{args:?} was accepted");
        stderr(&out)
    };
    assert!(refused(&["--purpose", "second-factor"]).contains("--policy"));
    assert!(!refused(&["--break-glass"]).is_empty());
    assert!(refused(&["--break-glass", "--reason", "x", "--ttl", "2h"]).contains("ttl_too_long"));

    // The server's own identity: this bootstrap policy's prefix is the whole
    // trust domain, yet no token (not even one written straight into the
    // store) mints spiffe://<td>/herald/server — clients pin the server by it.
    let server_id = format!("spiffe://{TRUST_DOMAIN}/herald/server");
    let out = site.herald(&["token", "create", "--spiffe-id", &server_id]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("spiffe_id_reserved"),
        "{}",
        stderr(&out)
    );
    let forged = herald_attest::join_token::generate().unwrap();
    store
        .create_join_token(
            NewJoinToken {
                token_hash: forged.hash,
                token_id: forged.token_id.clone(),
                spiffe_id: server_id.clone(),
                created_at: now(),
                expires_at: now() + 600,
                created_by: "operator:mallory".into(),
                purpose: JoinTokenPurpose::Bootstrap,
                policies: Vec::new(),
                reason: None,
            },
            herald_core::AuditEvent::new("join_token.create", "operator:mallory"),
        )
        .await
        .unwrap();
    assert_refused(
        &store,
        client.mint_x509_svid(&forged.token, csr()).await,
        ErrorCode::SpiffeIdReserved,
        "x509_svid.mint",
    )
    .await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_is_time_boxed_never_renews_and_stands_out_with_its_reason() {
    let site = Site::new();
    let server = site.start();
    let store = Store::open(&site.db_url()).await.unwrap();
    let client = HeraldClient::connect(
        &server.url(),
        &common::pem_file_certs(&site.bundle_pem()),
        None,
    )
    .await
    .unwrap();
    let expired = herald_attest::join_token::generate().unwrap();
    store
        .create_join_token(
            NewJoinToken {
                token_hash: expired.hash,
                token_id: expired.token_id.clone(),
                spiffe_id: format!("spiffe://{TRUST_DOMAIN}/ops/db"),
                created_at: now() - 7200,
                expires_at: now() - 3600,
                created_by: "operator:alice".into(),
                purpose: JoinTokenPurpose::BreakGlass,
                policies: Vec::new(),
                reason: Some("incident 42".into()),
            },
            herald_core::AuditEvent::new("join_token.create", "operator:alice"),
        )
        .await
        .unwrap();
    assert_refused(
        &store,
        client
            .mint_x509_svid(&expired.token, generate_key_and_csr().unwrap().csr_der)
            .await,
        ErrorCode::JoinTokenExpired,
        "x509_svid.mint",
    )
    .await;
    let last = store
        .audit_records(0, 100_000)
        .await
        .unwrap()
        .pop()
        .unwrap();
    assert_eq!(last.event.evidence_type, Some(EvidenceType::BreakGlass));
    // A live one mints, and is the report's break-glass use.
    let glass = site.token_with(
        &format!("spiffe://{TRUST_DOMAIN}/ops/db"),
        &["--break-glass", "--reason", "incident 43", "--ttl", "5m"],
    );
    let (svid, identity) = mint(&client, &glass).await;
    let report: serde_json::Value = serde_json::from_str(&stdout(&ok(
        site.herald(&["report", "--since", "1h", "--format", "json"])
    )))
    .unwrap();
    let uses = report["break_glass"].as_array().unwrap();
    assert_eq!(uses.len(), 1, "{report}");
    assert_eq!(uses[0]["serial"], svid.serial);
    assert_eq!(uses[0]["reason"], "incident 43", "{report}");
    assert!(
        uses[0]["token_created_by"]
            .as_str()
            .is_some_and(|c| c.starts_with("operator:")),
        "{report}"
    );
    // The emergency identity lasts one SVID lifetime: it does not renew.
    let holder = HeraldClient::connect(
        &server.url(),
        &common::pem_file_certs(&site.bundle_pem()),
        Some(identity),
    )
    .await
    .unwrap();
    assert_refused(
        &store,
        holder
            .renew_x509_svid(generate_key_and_csr().unwrap().csr_der)
            .await,
        ErrorCode::CredentialNotRenewable,
        "x509_svid.renew",
    )
    .await;
    // A record that outlives the time box (written around the CLI) is
    // refused once the box has passed, whatever its expiry says.
    let long = herald_attest::join_token::generate().unwrap();
    store
        .create_join_token(
            NewJoinToken {
                token_hash: long.hash,
                token_id: long.token_id.clone(),
                spiffe_id: format!("spiffe://{TRUST_DOMAIN}/ops/db"),
                created_at: now() - 7200,
                expires_at: now() + 86_400,
                created_by: "operator:mallory".into(),
                purpose: JoinTokenPurpose::BreakGlass,
                policies: Vec::new(),
                reason: Some("standing access".into()),
            },
            herald_core::AuditEvent::new("join_token.create", "operator:mallory"),
        )
        .await
        .unwrap();
    assert_refused(
        &store,
        client
            .mint_x509_svid(&long.token, generate_key_and_csr().unwrap().csr_der)
            .await,
        ErrorCode::JoinTokenExpired,
        "x509_svid.mint",
    )
    .await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lineage_renews_only_within_its_policy_age() {
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("short.yaml"),
        common::BOOTSTRAP_POLICY.replace("max_lineage_age: 1h", "max_lineage_age: 2s"),
    )
    .unwrap();
    let site = Site::with_extra(&format!(
        "[policy]\ndir = \"{}\"\n",
        policies.path().display()
    ));
    let server = site.start();
    let store = Store::open(&site.db_url()).await.unwrap();
    let anchors = common::pem_file_certs(&site.bundle_pem());
    let client = HeraldClient::connect(&server.url(), &anchors, None)
        .await
        .unwrap();
    let token = site.token(&format!("spiffe://{TRUST_DOMAIN}/svc/short"));
    let minted_at = Instant::now();
    let (first, id) = mint(&client, &token).await;
    let holder = HeraldClient::connect(&server.url(), &anchors, Some(id))
        .await
        .unwrap();
    // Renewals continue the lineage: same root, parent = what was presented.
    let renewed = holder
        .renew_x509_svid(generate_key_and_csr().unwrap().csr_der)
        .await
        .unwrap();
    let rec = store.issued(&renewed.serial).await.unwrap().unwrap();
    assert_eq!(rec.parent_serial.as_deref(), Some(first.serial.as_str()));
    assert_eq!(rec.root_serial, first.serial);
    // Then, once the lineage is older than its policy allows, nothing
    // renews it — however fresh the presented SVID.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        match holder
            .renew_x509_svid(generate_key_and_csr().unwrap().csr_der)
            .await
        {
            Ok(_) => {
                assert!(
                    Instant::now() < deadline,
                    "the lineage renewed past its age"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            Err(e) => break e,
        }
    };
    assert!(minted_at.elapsed() >= Duration::from_secs(2));
    assert_refused(
        &store,
        Err::<(), _>(refused),
        ErrorCode::LineageTooOld,
        "x509_svid.renew",
    )
    .await;
    drop(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaf_forged_under_a_shared_upstream_root_renews_nothing() {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose, SanType, SerialNumber,
    };
    // The organisation's root, under which Herald is one intermediate —
    // and the attacker holds another.
    let root_key = KeyPair::generate().unwrap();
    let mut root = CertificateParams::new(vec![]).unwrap();
    root.distinguished_name
        .push(DnType::CommonName, "Acme Root");
    root.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    root.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root_cert = root.self_signed(&root_key).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert_path = dir.path().join("upstream.pem");
    let key_path = dir.path().join("upstream.key");
    std::fs::write(&cert_path, root_cert.pem()).unwrap();
    std::fs::write(&key_path, root_key.serialize_pem()).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let site = Site::new();
    extend_section(
        &site.config(),
        "ca",
        &format!(
            "upstream_cert = \"{}\"\nupstream_key = \"{}\"\n",
            cert_path.display(),
            key_path.display()
        ),
    );
    let server = site.start();
    let store = Store::open(&site.db_url()).await.unwrap();
    let anchors = common::pem_file_certs(&site.bundle_pem());
    assert_eq!(
        anchors,
        vec![root_cert.der().to_vec()],
        "the bundle is the upstream root"
    );
    // The root names no trust domain: the client must be told which
    // server identity to expect.
    assert!(matches!(
        HeraldClient::connect(&server.url(), &anchors, None).await,
        Err(herald_client::ClientError::Input(_))
    ));
    let pin = herald_client::ServerId::parse(TRUST_DOMAIN).unwrap();
    let client = HeraldClient::connect_to(&server.url(), &anchors, None, &pin)
        .await
        .unwrap();
    let spiffe_id = format!("spiffe://{TRUST_DOMAIN}/svc/payments");
    let (genuine, genuine_id) = mint(&client, &site.token(&spiffe_id)).await;

    // Another CA under the same root, issuing a leaf with the genuine
    // serial and SPIFFE ID for the attacker's own key.
    let root_issuer = Issuer::new(root, root_key);
    let rogue_key = KeyPair::generate().unwrap();
    let mut rogue = CertificateParams::new(vec![]).unwrap();
    rogue
        .distinguished_name
        .push(DnType::CommonName, "Rogue CA");
    rogue.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rogue.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    let rogue_cert = rogue.signed_by(&rogue_key, &root_issuer).unwrap();
    let rogue_issuer = Issuer::new(rogue, rogue_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut leaf = CertificateParams::new(vec![]).unwrap();
    leaf.subject_alt_names = vec![SanType::URI(spiffe_id.as_str().try_into().unwrap())];
    leaf.is_ca = IsCa::ExplicitNoCa;
    leaf.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    leaf.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    leaf.serial_number = Some(SerialNumber::from_slice(
        &hex::decode(&genuine.serial).unwrap(),
    ));
    let forged = leaf.signed_by(&leaf_key, &rogue_issuer).unwrap();
    // It is a valid SVID under the published bundle — what the old check
    // accepted — yet it renews nothing.
    let chain = vec![forged.der().to_vec(), rogue_cert.der().to_vec()];
    assert_eq!(verifies(&chain, &anchors), Ok(()));
    let attacker = HeraldClient::connect_to(
        &server.url(),
        &anchors,
        Some(ClientIdentity {
            cert_chain: chain,
            key_pkcs8: leaf_key.serialize_der(),
        }),
        &pin,
    )
    .await
    .unwrap();
    assert_refused(
        &store,
        attacker
            .renew_x509_svid(generate_key_and_csr().unwrap().csr_der)
            .await,
        ErrorCode::SvidRecordMismatch,
        "x509_svid.renew",
    )
    .await;
    // The genuine holder renews.
    let holder = HeraldClient::connect_to(&server.url(), &anchors, Some(genuine_id), &pin)
        .await
        .unwrap();
    holder
        .renew_x509_svid(generate_key_and_csr().unwrap().csr_der)
        .await
        .unwrap();
    drop(server);
}

const WEB: &str = "spiffe://e2e.herald.test/workload/web";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_node_lineage_acts_as_a_node_and_a_ban_ends_everything_under_it() {
    require_tool("swtpm");
    let tpm = SoftTpm::start().unwrap();
    let site = NodeSite::with_workloads(
        &[&tpm],
        "1h",
        &format!("spiffe://{TRUST_DOMAIN}/node/tpm/{{ek_hash}}"),
        "",
        &format!(
            "workloads:\n  - spiffe_id: {WEB}\n    selectors: [\"unix:uid:0\"]\n    jwt_audiences: [api]\n"
        ),
    );
    // A join-token policy broad enough to mint a node's own SPIFFE ID: the
    // workload service, not this policy, must tell the two apart.
    write_bootstrap_policy(&site.dir.path().join("policies"));
    let server = site.start();
    let store = Store::open(&format!(
        "sqlite://{}",
        site.dir.path().join("data/herald.db").display()
    ))
    .await
    .unwrap();
    let agent_dir = tempfile::tempdir().unwrap();
    let agent = start_agent(&site.agent_config(&tpm, agent_dir.path()));
    let status = wait_status(agent_dir.path(), 60, "attested", |s| s.state == "ready");
    let node_id = status.spiffe_id.unwrap();
    let node_svid = read_svid_dir(&agent_dir.path().join("state/node")).unwrap();
    let anchors = node_svid.bundle.clone();
    let url = server.url();
    let as_caller = |identity| {
        let url = url.clone();
        let anchors = anchors.clone();
        async move {
            let c = HeraldClient::connect(&url, &anchors, Some(identity))
                .await
                .unwrap();
            (c.clone(), WorkloadServiceClient::new(c.channel()))
        }
    };
    let batch = |spiffe_id: &str, csr: Vec<u8>| BatchNewX509SvidsRequest {
        requests: vec![WorkloadSvidRequest {
            spiffe_id: spiffe_id.into(),
            csr,
        }],
    };

    // The attested node gets its registered workload's SVID.
    let (_, mut node) = as_caller(ClientIdentity {
        cert_chain: node_svid.cert_chain.clone(),
        key_pkcs8: node_svid.key_pkcs8.clone(),
    })
    .await;
    let kc = generate_key_and_csr().unwrap();
    let result = node
        .batch_new_x509_svids(batch(WEB, kc.csr_der))
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    let workload_svid = result
        .svid
        .unwrap_or_else(|| panic!("{}", result.error_message));
    let rec = store.issued(&workload_svid.serial).await.unwrap().unwrap();
    assert_eq!(rec.origin, Some(herald_core::Origin::Workload));
    assert_eq!(rec.parent_serial, status.serial);

    // An SVID minted with a join token for the node's own SPIFFE ID is no
    // node: its lineage began with a token, not a TPM quote.
    let plain = HeraldClient::connect(&url, &anchors, None).await.unwrap();
    let (minted, minted_id) = mint(&plain, &site_token(&site, &node_id)).await;
    assert_eq!(minted.spiffe_id, node_id);
    let (_, mut impostor) = as_caller(minted_id).await;
    let err = impostor
        .batch_new_x509_svids(batch(WEB, generate_key_and_csr().unwrap().csr_der))
        .await
        .unwrap_err();
    assert_refused(
        &store,
        Err::<(), _>(herald_client::ClientError::from(err)),
        ErrorCode::NodeUnknown,
        "x509_svid.workload",
    )
    .await;

    // A workload SVID is never renewed with the workload's own key: the
    // agent has it re-issued against the current registrations.
    let (workload, _) = as_caller(identity(&workload_svid, kc.key_pkcs8.clone())).await;
    assert_refused(
        &store,
        workload
            .renew_x509_svid(generate_key_and_csr().unwrap().csr_der)
            .await,
        ErrorCode::CredentialNotRenewable,
        "x509_svid.renew",
    )
    .await;

    // Banning the node revokes its workloads' credentials with it.
    ok(site.herald(&["node", "ban", &node_id, "--reason", "stolen"]));
    assert!(store.is_revoked(&workload_svid.serial).await.unwrap());
    assert_refused(
        &store,
        workload
            .renew_x509_svid(generate_key_and_csr().unwrap().csr_der)
            .await,
        ErrorCode::SvidRevoked,
        "x509_svid.renew",
    )
    .await;
    let err = node
        .batch_new_x509_svids(batch(WEB, generate_key_and_csr().unwrap().csr_der))
        .await
        .unwrap_err();
    assert_eq!(
        herald_client::ClientError::from(err).code(),
        Some(ErrorCode::SvidRevoked)
    );
    drop(agent);
    drop(server);
}

/// A bootstrap token for `id` from a node site's CLI.
fn site_token(site: &NodeSite, id: &str) -> String {
    let out = ok(site.herald(&["token", "create", "--spiffe-id", id, "--ttl", "10m"]));
    stdout(&out).trim().to_owned()
}
