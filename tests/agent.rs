//! The node agent end to end: a real swtpm (EK certificate chain from
//! swtpm_setup's local CA), the real `herald server` and `herald agent`
//! binaries. The agent attests, rotates its node SVID on a short TTL,
//! survives a server restart, and is refused after `herald node ban`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::process::Command;

use common::node::{NodeSite, start_agent, wait_status};
use common::{TRUST_DOMAIN, herald_bin, ok, require_tool, stdout};
use herald_agent::AgentStatus;
use herald_test_tpm::SoftTpm;

#[test]
fn agent_attests_rotates_survives_a_restart_and_is_refused_after_a_ban() {
    require_tool("swtpm");
    require_tool("openssl");
    let tpm = SoftTpm::start().unwrap();
    let site = NodeSite::new(
        &[&tpm],
        "6s",
        &format!("spiffe://{TRUST_DOMAIN}/node/tpm/{{ek_hash}}"),
        "",
    );
    let server = site.start();
    let agent_dir = tempfile::tempdir().unwrap();
    let config = site.agent_config(&tpm, agent_dir.path());
    let _agent = start_agent(&config);

    // Attested: a node SVID named after the EK hash, on disk, verifying
    // against the trust bundle with openssl.
    let first = wait_status(agent_dir.path(), 60, "attested", |s| {
        s.attestations == 1 && s.serial.is_some()
    });
    let spiffe_id = first.spiffe_id.clone().unwrap();
    assert!(
        spiffe_id.starts_with(&format!("spiffe://{TRUST_DOMAIN}/node/tpm/")),
        "{spiffe_id}"
    );
    let svid = agent_dir.path().join("state/node/svid.pem");
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(agent_dir.path().join("bundle.pem"))
        .arg(&svid)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = agent_dir.path().join("state/node/svid.key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The registry knows the node.
    let list = stdout(&ok(site.herald(&["node", "list", "--json"])));
    let node: serde_json::Value = serde_json::from_str(list.lines().next().unwrap()).unwrap();
    assert_eq!(node["spiffe_id"], spiffe_id.as_str());
    assert_eq!(node["status"], "active");
    assert_eq!(node["policy"], "nodes");
    assert_eq!(node["golden_set"], "pristine");
    assert_eq!(node["attestations"], 1);

    // Two rotations on the 6 s TTL, each a new serial, same identity.
    let rotated = wait_status(agent_dir.path(), 60, "two renewals", |s| s.renewals >= 2);
    assert_eq!(rotated.spiffe_id.as_deref(), Some(spiffe_id.as_str()));
    assert_ne!(rotated.serial, first.serial);
    assert_eq!(rotated.attestations, 1, "renewals must not re-attest");

    // The server's metrics saw the TPM attestation and where in their
    // lifetime the renewals came (rotation compliance / lag).
    let (code, metrics) = server.http_get("/metrics");
    assert_eq!(code, 200);
    let renewals: f64 = metrics
        .lines()
        .find(|l| l.starts_with("herald_renewal_lifetime_fraction_count"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or_else(|| panic!("no renewal histogram in {metrics}"));
    assert!(renewals >= 2.0, "{renewals}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("herald_attestation_total")
                && l.contains("evidence_type=\"tpm\"")),
        "{metrics}"
    );

    // The coverage report counts the TPM attestation as hardware-backed
    // (renewals are X.509-SVID evidence, so the share is below one).
    let report = stdout(&ok(
        site.herald(&["report", "--since", "1h", "--format", "json"])
    ));
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(
        report["attestation_by_method"]["tpm"]["verified"], 1,
        "{report}"
    );
    let hw = report["hardware_backed_rate"].as_f64().unwrap();
    assert!(hw > 0.0 && hw < 1.0, "{report}");
    assert!(report["mfa_enforcement_rate"].as_f64().unwrap() >= hw);

    // `herald agent status` shows it.
    let status = Command::new(herald_bin())
        .args(["agent", "--config"])
        .arg(&config)
        .arg("status")
        .output()
        .unwrap();
    assert!(stdout(&status).contains(&spiffe_id), "{}", stdout(&status));

    // A server restart: the agent keeps its identity and renews against
    // the restarted server.
    server.stop();
    let during = AgentStatus::read(&agent_dir.path().join("state/status.json")).unwrap();
    let server = site.start();
    let after = wait_status(agent_dir.path(), 60, "a renewal after the restart", |s| {
        s.renewals > during.renewals
    });
    assert_eq!(after.spiffe_id.as_deref(), Some(spiffe_id.as_str()));

    // Ban: renewal refused, re-attestation refused with node_banned.
    let out = ok(site.herald(&["node", "ban", &spiffe_id, "--reason", "stolen"]));
    assert!(stdout(&out).contains("banned"), "{}", stdout(&out));
    wait_status(agent_dir.path(), 60, "refused as banned", |s| {
        s.last_error_code.as_deref() == Some("node_banned")
    });
    let list = stdout(&ok(site.herald(&["node", "list", "--json"])));
    assert!(list.contains("\"banned\""), "{list}");
    // Both the ban and the refused attestation are in the audit log.
    let audit = stdout(&ok(site.herald(&["audit", "export", "--since", "1h"])));
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"node.ban\"") && l.contains(&spiffe_id)),
        "{audit}"
    );
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"node.attest\"") && l.contains("node_banned")),
        "{audit}"
    );
    ok(site.herald(&["audit", "verify"]));
    drop(server);
}

#[test]
fn the_agent_fails_over_to_another_server() {
    require_tool("swtpm");
    let tpm = SoftTpm::start().unwrap();
    let site = NodeSite::new(
        &[&tpm],
        "6s",
        &format!("spiffe://{TRUST_DOMAIN}/node/tpm/{{ek_hash}}"),
        "",
    );
    // Two replicas sharing one PostgreSQL: the CA, node registry and audit
    // chain live in the database, so either serves the agent.
    let pg = common::PgSchema::new("agent_failover");
    common::set_database_url(&site.config(), &pg.url);
    let first = site.start();
    let port_b = common::node::free_port();
    let config_b = site.dir.path().join("herald-b.toml");
    let text = std::fs::read_to_string(site.config()).unwrap();
    std::fs::write(
        &config_b,
        text.replace(
            &format!("grpc = \"127.0.0.1:{}\"", site.grpc_port),
            &format!("grpc = \"127.0.0.1:{port_b}\""),
        ),
    )
    .unwrap();
    let second = common::Server::start(&config_b);
    let agent_dir = tempfile::tempdir().unwrap();
    let config = site.agent_config(&tpm, agent_dir.path());
    let text = std::fs::read_to_string(&config).unwrap();
    let url_a = format!("https://127.0.0.1:{}", site.grpc_port);
    let url_b = format!("https://127.0.0.1:{port_b}");
    std::fs::write(
        &config,
        text.replace(
            &format!("servers = [\"{url_a}\"]"),
            &format!("servers = [\"{url_a}\", \"{url_b}\"]"),
        ),
    )
    .unwrap();
    let _agent = start_agent(&config);
    let attested = wait_status(agent_dir.path(), 60, "attested", |s| s.attestations == 1);
    assert_eq!(attested.server.as_deref(), Some(url_a.as_str()));
    // The first replica dies (SIGKILL): the agent renews through the second.
    drop(first);
    let moved = wait_status(
        agent_dir.path(),
        60,
        "a renewal through the second server",
        |s| s.renewals >= 1 && s.server.as_deref() == Some(url_b.as_str()),
    );
    assert_eq!(moved.spiffe_id, attested.spiffe_id);
    assert_eq!(
        moved.attestations, 1,
        "failover must not need a re-attestation"
    );
    ok(site.herald(&["audit", "verify"]));
    drop(second);
}

/// `herald-agent`, the node agent's own executable: the same agent as
/// `herald agent` (attests, serves the Workload API) and a clean stop on
/// SIGTERM, from a binary about half the size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_herald_agent_binary_attests_serves_workloads_and_stops_cleanly() {
    require_tool("swtpm");
    let bin = env!("CARGO_BIN_EXE_herald-agent");
    let (small, full) = (
        std::fs::metadata(bin).unwrap().len(),
        std::fs::metadata(herald_bin()).unwrap().len(),
    );
    assert!(
        small < full * 3 / 4,
        "herald-agent {small} B, herald {full} B"
    );
    let tpm = SoftTpm::start().unwrap();
    let uid = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").unwrap().uid()
    };
    let site = common::node::NodeSite::with_workloads(
        &[&tpm],
        "1h",
        &format!("spiffe://{TRUST_DOMAIN}/node/tpm/{{ek_hash}}"),
        "",
        &format!(
            "workloads:\n  - spiffe_id: spiffe://{TRUST_DOMAIN}/workload/small\n    selectors: [\"unix:uid:{uid}\"]\n"
        ),
    );
    let _server = site.start();
    let agent_dir = tempfile::tempdir().unwrap();
    let config = site.agent_config(&tpm, agent_dir.path());
    let socket = agent_dir.path().join("api/agent.sock");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[workload_api]\nsocket = \"{}\"\n",
        socket.display()
    ));
    std::fs::write(&config, text).unwrap();

    let check = Command::new(bin)
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(check.status.success());
    assert!(stdout(&check).ends_with(": ok\n"), "{}", stdout(&check));
    let missing = Command::new(bin)
        .args(["--config", "/nonexistent/agent.toml"])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("herald-agent: error[config]"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );

    let mut agent = common::node::Agent(
        Command::new(bin)
            .arg("--config")
            .arg(&config)
            .env("HERALD_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_status(agent_dir.path(), 60, "attested", |s| s.state == "ready");
    assert_eq!(
        common::node::x509_ids(&socket).await.unwrap(),
        vec![format!("spiffe://{TRUST_DOMAIN}/workload/small")]
    );
    let kill = Command::new("kill")
        .args(["-TERM", &agent.0.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let status = loop {
        if let Some(s) = agent.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still running after SIGTERM"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(status.success(), "{status:?}");
}
