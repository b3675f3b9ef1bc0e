//! vTPMs without an EK certificate (trusted by their EK's hash) and
//! continuous attestation (a fresh quote with every node-SVID renewal),
//! against the real server, real software TPMs and the real agent.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::node::{NodeSite, start_agent, wait_status, x509_ids};
use common::{Server, TRUST_DOMAIN, ok, require_tool, stdout};
use herald_agent::attest::{NodeSvid, attest, reattest};
use herald_agent::tpm::TpmHandle;
use herald_client::{ClientError, ClientIdentity, HeraldClient, keys};
use herald_core::ErrorCode;
use herald_test_tpm::SoftTpm;

const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A node policy over PCRs 0 and 7 (pristine swtpm values) with the given
/// `evidence.tpm` trust lines, renewing only with a fresh quote.
fn node_policy(trust: &str, ttl: &str) -> String {
    format!(
        "name: nodes\nevidence:\n  tpm:\n{trust}    pcrs: [0, 7]\n    reattest: every_renewal\n    golden:\n      - {{ name: pristine, pcrs: {{ 0: \"{ZERO}\", 7: \"{ZERO}\" }} }}\nspiffe_id:\n  prefix: spiffe://{TRUST_DOMAIN}/node/\n  template: \"spiffe://{TRUST_DOMAIN}/node/tpm/{{ek_hash}}\"\ngrants:\n  x509_svid: {{ max_ttl: {ttl} }}\n"
    )
}

fn ek_hash(tpm: &TpmHandle) -> String {
    let public = herald_attest::tpm::TpmPublic::parse(&tpm.identity().ek_public).unwrap();
    herald_attest::tpm::ek_hash(&public)
}

async fn open(tpm: &SoftTpm, state: &Path) -> TpmHandle {
    std::fs::create_dir_all(state).unwrap();
    TpmHandle::open(&tpm.tcti(), state).await.unwrap()
}

/// What the workload service answers `client` (a node agent's connection):
/// the stable code of its refusal, if it refused.
async fn workload_refusal(client: &HeraldClient) -> Option<ErrorCode> {
    use herald_proto::v1::BatchNewX509SvidsRequest;
    use herald_proto::v1::workload_service_client::WorkloadServiceClient;
    WorkloadServiceClient::new(client.channel())
        .batch_new_x509_svids(BatchNewX509SvidsRequest {
            requests: Vec::new(),
        })
        .await
        .err()
        .and_then(|s| ClientError::from(s).code())
}

fn code<T: std::fmt::Debug>(r: &Result<T, herald_agent::attest::AttestError>) -> Option<ErrorCode> {
    match r {
        Err(herald_agent::attest::AttestError::Client(e)) => e.code(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Measures something into PCR 7: the node's state drifts off the golden set.
fn extend_pcr7(tpm: &SoftTpm) {
    let pcr = format!("7:sha256={}", "ab".repeat(32));
    tpm.tool(&std::env::temp_dir(), &["tpm2_pcrextend", &pcr])
        .unwrap();
}

fn node_row(site: &NodeSite) -> serde_json::Value {
    let list = stdout(&ok(site.herald(&["node", "list", "--json"])));
    assert_eq!(list.lines().count(), 1, "{list}");
    serde_json::from_str(list.lines().next().unwrap()).unwrap()
}

/// A client authenticated (mTLS) with `svid`.
async fn as_node(server: &Server, bundle: &[Vec<u8>], svid: &NodeSvid) -> HeraldClient {
    HeraldClient::connect(
        &server.url(),
        bundle,
        Some(ClientIdentity {
            cert_chain: svid.response.cert_chain.clone(),
            key_pkcs8: svid.key_pkcs8.clone(),
        }),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vtpm_is_trusted_by_its_ek_hash_and_renews_only_with_a_fresh_matching_quote() {
    require_tool("swtpm");
    herald_test_tpm::require_tpm2_tools().unwrap();
    let mut vtpm = SoftTpm::start().unwrap();
    let other = SoftTpm::start().unwrap();
    let unlisted = SoftTpm::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    // A vTPM in the NitroTPM manner: no EK certificate in NV.
    vtpm.tool(work.path(), &["tpm2_nvundefine", "0x01c00002", "-C", "p"])
        .unwrap();
    let mut tv = open(&vtpm, &work.path().join("v")).await;
    assert!(tv.identity().ek_certificate.is_empty());
    let to = open(&other, &work.path().join("o")).await;
    let tu = open(&unlisted, &work.path().join("u")).await;
    let (hv, ho) = (ek_hash(&tv), ek_hash(&to));

    let site = NodeSite::new(&[], "10m", "unused", "");
    std::fs::write(
        site.dir.path().join("policies/nodes.yaml"),
        node_policy(&format!("    ek_hashes: [\"{hv}\", \"{ho}\"]\n"), "10m"),
    )
    .unwrap();
    let server = site.start();
    let bundle = common::pem_file_certs(&site.dir.path().join("data/bundle.pem"));
    let anon = HeraldClient::connect(&server.url(), &bundle, None)
        .await
        .unwrap();

    // An EK neither certified by a listed root nor listed by hash.
    let refused = attest(&anon, &tu, None).await;
    assert_eq!(code(&refused), Some(ErrorCode::TpmEkCertificateUntrusted));

    // The listed vTPM enrols with no certificate at all.
    let first = attest(&anon, &tv, None).await.unwrap();
    let id = format!("spiffe://{TRUST_DOMAIN}/node/tpm/{hv}");
    assert_eq!(first.response.spiffe_id, id);
    let row = node_row(&site);
    assert_eq!(row["ek_hash"], hv.as_str());
    assert_eq!(row["last_quote_result"], "ok");

    // Plain renewal is refused: the policy wants a fresh quote.
    let node = as_node(&server, &bundle, &first).await;
    let plain = node
        .renew_x509_svid(keys::generate_key_and_csr().unwrap().csr_der)
        .await;
    assert_eq!(
        plain.as_ref().err().and_then(ClientError::code),
        Some(ErrorCode::ReattestationRequired),
        "{plain:?}"
    );

    // A node in good standing is served.
    assert_eq!(workload_refusal(&node).await, None);

    // A renewal with a fresh quote: same identity, a new SVID.
    let renewed = reattest(&node, &tv).await.unwrap();
    assert_eq!(renewed.response.spiffe_id, id);
    assert_ne!(renewed.response.serial, first.response.serial);
    let node = as_node(&server, &bundle, &renewed).await;

    // Refused renewals, each with its code:
    // without the node SVID,
    assert_eq!(
        code(&reattest(&anon, &tv).await),
        Some(ErrorCode::MtlsRequired)
    );
    // from another (trusted) TPM presenting this node's SVID,
    assert_eq!(
        code(&reattest(&node, &to).await),
        Some(ErrorCode::NodeEkChanged)
    );
    // with another AK under the same EK (a new agent state directory),
    drop(tv);
    let fresh_ak = open(&vtpm, &work.path().join("v2")).await;
    assert_eq!(
        code(&reattest(&node, &fresh_ak).await),
        Some(ErrorCode::TpmAkChanged)
    );
    drop(fresh_ak);
    tv = open(&vtpm, &work.path().join("v")).await;
    // with PCRs that drifted off every golden set.
    extend_pcr7(&vtpm);
    assert_eq!(
        code(&reattest(&node, &tv).await),
        Some(ErrorCode::TpmPcrOffPolicy)
    );
    let row = node_row(&site);
    assert_eq!(row["last_quote_result"], "tpm_pcr_off_policy", "{row}");
    assert_ne!(row["last_quote_at"], "-", "{row}");
    // Its node SVID is unexpired, yet the server gives a drifted node's
    // agent nothing for its workloads until it re-attests.
    assert_eq!(
        workload_refusal(&node).await,
        Some(ErrorCode::ReattestationRequired)
    );

    // Restored: a power cycle resets the PCRs (and moves resetCount on,
    // which is no rollback); the next renewal's quote is accepted.
    drop(tv);
    vtpm.restart().unwrap();
    let tv = open(&vtpm, &work.path().join("v")).await;
    let again = reattest(&node, &tv).await.unwrap();
    assert_eq!(again.response.spiffe_id, id);
    assert_eq!(node_row(&site)["last_quote_result"], "ok");
    assert_eq!(workload_refusal(&node).await, None, "served again");

    // Counters behind the registry's (a replayed TPM state) refuse it.
    common::node::advance_registry_reset_counts(&site.dir.path().join("data/herald.db")).await;
    let node = as_node(&server, &bundle, &again).await;
    assert_eq!(
        code(&reattest(&node, &tv).await),
        Some(ErrorCode::TpmCounterRollback)
    );
    assert_eq!(node_row(&site)["last_quote_result"], "tpm_counter_rollback");

    // Every refusal is audited with its code; the chain holds.
    let audit = stdout(&ok(site.herald(&["audit", "export", "--since", "1h"])));
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"x509_svid.renew\"") && l.contains("reattestation_required")),
        "{audit}"
    );
    for want in [
        ErrorCode::MtlsRequired,
        ErrorCode::NodeEkChanged,
        ErrorCode::TpmAkChanged,
        ErrorCode::TpmPcrOffPolicy,
        ErrorCode::TpmCounterRollback,
    ] {
        assert!(
            audit
                .lines()
                .any(|l| l.contains("\"node.reattest\"") && l.contains(want.as_str())),
            "{want} not audited: {audit}"
        );
    }
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"node.attest\"") && l.contains("tpm_ek_certificate_untrusted"))
    );
    ok(site.herald(&["audit", "verify"]));
    drop(server);
}

#[test]
fn the_agent_stops_serving_workloads_when_a_renewal_quote_is_refused_until_it_reattests() {
    use std::os::unix::fs::MetadataExt;
    require_tool("swtpm");
    herald_test_tpm::require_tpm2_tools().unwrap();
    let mut tpm = SoftTpm::start().unwrap();
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let workload = format!("spiffe://{TRUST_DOMAIN}/workload/app");
    let site = NodeSite::new(&[&tpm], "4s", "unused", "");
    std::fs::write(
        site.dir.path().join("policies/nodes.yaml"),
        format!(
            "{}workloads:\n  - spiffe_id: {workload}\n    selectors: [\"unix:uid:{uid}\"]\n    ttl: 1h\n",
            node_policy(
                "    ek_roots: [root0.pem]\n    ek_intermediates: [inter0.pem]\n",
                "4s"
            )
        ),
    )
    .unwrap();
    let server = site.start();
    let agent_dir = tempfile::tempdir().unwrap();
    let config = site.agent_config(&tpm, agent_dir.path());
    let socket = agent_dir.path().join("agent.sock");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[workload_api]\nsocket = \"{}\"\n",
        socket.display()
    ));
    std::fs::write(&config, text).unwrap();
    let agent = start_agent(&config);
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Renewals carry fresh quotes; the workload is served.
    let renewed = wait_status(agent_dir.path(), 60, "two quote renewals", |s| {
        s.quote_renewals && s.renewals >= 2
    });
    assert_eq!(renewed.attestations, 1);
    assert!(!renewed.workloads_suspended);
    let served = || rt.block_on(x509_ids(&socket));
    // The workload gets its SVID (within 30 s).
    let wait_served = || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while served().map_or(true, |ids| ids != vec![workload.clone()]) {
            assert!(std::time::Instant::now() < deadline, "{:?}", served());
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    };
    wait_served();

    // PCR drift: the next renewal is refused, and the workloads with it.
    extend_pcr7(&tpm);
    let refused = wait_status(agent_dir.path(), 60, "the refused quote", |s| {
        s.workloads_suspended && s.last_error_code.as_deref() == Some("tpm_pcr_off_policy")
    });
    assert!(refused.failures >= 1);
    let denied = served().unwrap_err();
    assert_eq!(denied.code(), tonic::Code::PermissionDenied, "{denied:?}");
    assert_eq!(node_row(&site)["last_quote_result"], "tpm_pcr_off_policy");

    // Restored (a power cycle resets the PCRs): the agent re-attests in
    // full and serves its workloads again.
    tpm.restart().unwrap();
    let back = wait_status(agent_dir.path(), 90, "re-attested", |s| {
        s.attestations >= 2 && !s.workloads_suspended
    });
    assert_eq!(back.spiffe_id, renewed.spiffe_id);
    wait_served();
    assert_eq!(node_row(&site)["last_quote_result"], "ok");
    let audit = stdout(&ok(site.herald(&["audit", "export", "--since", "1h"])));
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"node.reattest\"") && l.contains("tpm_pcr_off_policy")),
        "{audit}"
    );
    ok(site.herald(&["audit", "verify"]));
    drop(agent);
    drop(server);
}
