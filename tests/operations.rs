//! Operating Herald: configuration checks, deployment files, audit export.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use serde_json::Value;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn herald(args: &[&str]) -> std::process::Output {
    Command::new(herald_bin())
        .args(args)
        .env_remove("HERALD_CONFIG")
        .env_remove("HERALD_KEK")
        .output()
        .unwrap()
}

#[test]
fn the_example_config_passes_config_check_and_a_broken_one_does_not() {
    let example = repo("deploy/herald.example.toml");
    let out = ok(herald(&["config", "check", example.to_str().unwrap()]));
    assert!(stdout(&out).starts_with("ok: "), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("2 OIDC issuer(s)"),
        "{}",
        stdout(&out)
    );

    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "unknown key",
            "trust_domain = \"a.test\"\ndata_dir = \"/x\"\nbogus = 1\n",
        ),
        (
            "bad value",
            "trust_domain = \"a.test\"\ndata_dir = \"/x\"\n[svid]\nx509_ttl = \"1s\"\n",
        ),
        (
            "bad issuer",
            "trust_domain = \"a.test\"\ndata_dir = \"/x\"\n[[oidc.issuers]]\nissuer = \"http://issuer.example\"\naudiences = [\"a\"]\n",
        ),
    ];
    for (what, text) in cases {
        let f = dir.path().join("bad.toml");
        std::fs::write(&f, text).unwrap();
        let out = herald(&["config", "check", f.to_str().unwrap()]);
        assert!(!out.status.success(), "{what}");
        assert!(
            stderr(&out).contains("error[config_invalid]"),
            "{what}: {}",
            stderr(&out)
        );
    }
    // A policy directory that would be refused fails the check too.
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("p.yaml"), "name: [broken\n").unwrap();
    let f = dir.path().join("with-policies.toml");
    std::fs::write(
        &f,
        format!(
            "trust_domain = \"a.test\"\ndata_dir = \"/x\"\n[policy]\ndir = \"{}\"\n",
            policies.display()
        ),
    )
    .unwrap();
    let out = herald(&["config", "check", f.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("p.yaml"), "{}", stderr(&out));
    // The shipped policies register web.internal: a server that calls
    // itself that would hand its name to a workload, and is refused.
    let examples = repo("attestation-policies");
    for (names, refused) in [
        ("[\"herald.internal\"]", false),
        ("[\"Web.Internal\"]", true),
    ] {
        std::fs::write(
            &f,
            format!(
                "trust_domain = \"dev.herald.test\"\ndata_dir = \"/x\"\n[tls]\ndns_names = {names}\n[policy]\ndir = \"{}\"\n",
                examples.display()
            ),
        )
        .unwrap();
        let out = herald(&["config", "check", f.to_str().unwrap()]);
        assert_eq!(!out.status.success(), refused, "{names}: {}", stderr(&out));
        assert_eq!(
            stderr(&out).contains("one of the server's own names"),
            refused,
            "{}",
            stderr(&out)
        );
    }
}

/// A multi-document Kubernetes manifest of the repository: its documents
/// and their kinds, in order.
fn manifest(path: &str) -> (Vec<Value>, Vec<String>) {
    let text = std::fs::read_to_string(repo(path)).unwrap();
    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let kinds = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_owned())
        .collect();
    (docs, kinds)
}

#[test]
fn kubernetes_manifests_parse_with_the_expected_kinds_and_probes() {
    let (docs, kinds) = manifest("deploy/kubernetes/herald-server.yaml");
    let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ConfigMap",
            "PersistentVolumeClaim",
            "Deployment",
            "Service"
        ]
    );
    let deployment = &docs[3];
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["env"][0]["valueFrom"]["secretKeyRef"]["name"],
        "herald-kek"
    );
    // The embedded server configuration is valid.
    let toml = docs[1]["data"]["herald.toml"].as_str().unwrap();
    let cfg = herald_server::ServerConfig::from_toml(toml).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg.listen.https.unwrap().port(), 8444);
}

#[test]
fn the_replicas_manifest_runs_several_servers_on_postgres() {
    let (docs, kinds) = manifest("deploy/kubernetes/herald-server-replicas.yaml");
    let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
    assert_eq!(
        kinds,
        [
            "Namespace",
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "Service",
            "Service"
        ]
    );
    let deployment = &docs[2];
    assert!(deployment["spec"]["replicas"].as_u64().unwrap() >= 2);
    let env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap();
    assert!(env.iter().any(|e| e["name"] == "HERALD_DATABASE_URL"
        && e["valueFrom"]["secretKeyRef"]["name"] == "herald-db"));
    assert_eq!(docs[5]["spec"]["clusterIP"], "None", "headless, for agents");
    let toml = docs[1]["data"]["herald.toml"].as_str().unwrap();
    let mut cfg = herald_server::ServerConfig::from_toml(toml).unwrap();
    cfg.apply_env(|k| {
        (k == "HERALD_DATABASE_URL").then(|| "postgres://herald@db.example.org/herald".to_owned())
    })
    .unwrap();
    cfg.validate().unwrap();
    assert!(cfg.database_url().starts_with("postgres://"));
}

#[test]
fn the_agent_daemonset_mounts_the_tpm_and_its_config_is_valid() {
    let (docs, kinds) = manifest("deploy/kubernetes/herald-agent.yaml");
    let kinds: Vec<&str> = kinds.iter().map(String::as_str).collect();
    assert_eq!(
        kinds,
        [
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "ConfigMap",
            "DaemonSet"
        ]
    );
    let spec = &docs[4]["spec"]["template"]["spec"];
    let volumes = spec["volumes"].as_array().unwrap();
    assert!(
        volumes.iter().any(
            |v| v["hostPath"]["path"] == "/dev/tpmrm0" && v["hostPath"]["type"] == "CharDevice"
        )
    );
    assert!(
        volumes
            .iter()
            .any(|v| v["hostPath"]["path"] == "/run/herald")
    );
    let container = &spec["containers"][0];
    // The TPM device and other users' /proc/<pid>/exe need root with the
    // device allowed: privileged, as root (the image's user is nonroot).
    assert_eq!(container["securityContext"]["privileged"], true);
    assert_eq!(container["securityContext"]["runAsUser"], 0);
    assert_eq!(container["command"][0], "/usr/local/bin/herald-agent");
    assert_eq!(container["args"][0], "--config");
    let cfg =
        herald_agent::AgentConfig::parse(docs[3]["data"]["agent.toml"].as_str().unwrap()).unwrap();
    assert_eq!(cfg.tpm.tcti, "device:/dev/tpmrm0");
    let api = cfg.workload_api.unwrap();
    assert_eq!(
        api.socket,
        std::path::PathBuf::from("/run/herald/agent.sock")
    );
    // Workload attestation needs the callers' /proc entries.
    assert_eq!(spec["hostPID"], true);
    // Kubernetes attestation: the local kubelet on the host network, with
    // the agent's own service account, allowed exactly `get nodes/pods`,
    // the kubelet's certificate verified for the node's name.
    let k8s = api.kubernetes.expect("[workload_api.kubernetes]");
    assert_eq!(k8s.kubelet_url, "https://127.0.0.1:10250");
    assert!(!k8s.skip_kubelet_verification);
    assert_eq!(k8s.kubelet_server_name.as_deref(), Some("{node_name}"));
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(spec["serviceAccountName"], "herald-agent");
    assert!(
        spec["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == "HERALD_NODE_NAME"
                && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    );
    assert_eq!(docs[0]["metadata"]["name"], "herald-agent");
    assert_eq!(
        docs[1]["rules"],
        serde_json::json!([{"apiGroups": [""], "resources": ["nodes/pods"], "verbs": ["get"]}])
    );
    assert_eq!(docs[2]["roleRef"]["name"], docs[1]["metadata"]["name"]);
    assert_eq!(docs[2]["subjects"][0]["name"], "herald-agent");
    assert_eq!(docs[2]["subjects"][0]["namespace"], "herald");
    // The documented example is valid too, and checked by the CLI.
    let out = herald(&[
        "agent",
        "--config",
        repo("deploy/agent.example.toml").to_str().unwrap(),
        "check",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        bad.path(),
        "servers = [\"http://plain\"]\ntrust_bundle = \"b\"\ndata_dir = \"d\"\n",
    )
    .unwrap();
    let out = herald(&["agent", "--config", bad.path().to_str().unwrap(), "check"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("https://"), "{}", stderr(&out));
}

#[test]
fn the_systemd_unit_is_hardened() {
    let unit = std::fs::read_to_string(repo("deploy/systemd/herald-server.service")).unwrap();
    for line in [
        "User=herald",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateDevices=yes",
        "CapabilityBoundingSet=",
        "ExecStart=/usr/local/bin/herald server --config /etc/herald/herald.toml",
    ] {
        assert!(unit.lines().any(|l| l == line), "missing {line}");
    }
    let agent = std::fs::read_to_string(repo("deploy/systemd/herald-agent.service")).unwrap();
    for line in [
        "User=herald-agent",
        "SupplementaryGroups=tss",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/tpmrm0 rw",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "CapabilityBoundingSet=",
        "ExecStart=/usr/local/bin/herald-agent --config /etc/herald/agent.toml",
    ] {
        assert!(
            agent.lines().any(|l| l == line),
            "agent unit: missing {line}"
        );
    }
    let containerfile = std::fs::read_to_string(repo("deploy/container/Containerfile")).unwrap();
    assert!(containerfile.contains("USER nonroot"));
    assert!(containerfile.contains("/usr/local/bin/herald-agent"));
}

#[test]
fn audit_export_writes_one_json_line_per_decision_in_the_window() {
    let site = Site::new();
    let server = site.start();
    let token = site.token(&format!("spiffe://{TRUST_DOMAIN}/ops/a"));
    let out_dir = tempfile::tempdir().unwrap();
    ok(site.mint(&server, &token, out_dir.path()));
    // A refusal, to see both outcomes.
    assert!(!site.mint(&server, &token, out_dir.path()).status.success());
    server.stop();

    let out = ok(site.herald(&["audit", "export", "--since", "1h", "--format", "jsonl"]));
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mints: Vec<&Value> = lines
        .iter()
        .filter(|l| l["action"] == "x509_svid.mint")
        .collect();
    assert_eq!(mints.len(), 2, "{lines:?}");
    assert_eq!(mints[0]["outcome"], "success");
    assert_eq!(mints[0]["credential_type"], "x509_svid");
    assert_eq!(mints[0]["evidence_type"], "join_token");
    assert!(mints[0]["serial"].is_string());
    assert_eq!(mints[1]["outcome"], "denied");
    assert_eq!(mints[1]["reason"], "join_token_used");
    for l in &lines {
        for field in ["seq", "time", "caller", "action", "outcome", "hash"] {
            assert!(!l[field].is_null(), "{field} in {l}");
        }
    }
    let seqs: Vec<u64> = lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    // A window in the past is empty; a bad time is one clear error.
    let out = ok(site.herald(&["audit", "export", "--until", "2020-01-01T00:00:00Z"]));
    assert_eq!(stdout(&out), "");
    let out = site.herald(&["audit", "export", "--since", "yesterday-ish"]);
    assert!(
        stderr(&out).contains("error[invalid_request]"),
        "{}",
        stderr(&out)
    );
}

fn scrape(server: &Server) -> Value {
    use std::io::Write;
    let (status, body) = server.http_get("/metrics");
    assert_eq!(status, 200);
    let python = repo(".venv/bin/python");
    assert!(
        python.exists(),
        "run `bash scripts/install-deps.sh` (it installs prometheus_client)"
    );
    let mut child = Command::new(python)
        .arg(repo("tests/python/parse_metrics.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "not valid OpenMetrics: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn sample(m: &Value, key: &str) -> f64 {
    m.get(key).and_then(Value::as_f64).unwrap_or(0.0)
}

#[test]
fn metrics_parse_as_openmetrics_and_move_with_issuances_and_refusals() {
    let site = Site::new();
    let server = site.start();
    let before = scrape(&server);
    let token = site.token(&format!("spiffe://{TRUST_DOMAIN}/ops/m"));
    let out_dir = tempfile::tempdir().unwrap();
    ok(site.mint(&server, &token, out_dir.path()));
    assert!(!site.mint(&server, &token, out_dir.path()).status.success());
    // A break-glass mint is counted as one; a bootstrap mint is not.
    let glass = site.token_with(
        &format!("spiffe://{TRUST_DOMAIN}/ops/glass"),
        &["--break-glass", "--reason", "metrics test"],
    );
    ok(site.mint(&server, &glass, tempfile::tempdir().unwrap().path()));
    let after = scrape(&server);
    let ok_key = "herald_issuance_total{credential_type=x509_svid,outcome=success}";
    let denied_key = "herald_issuance_total{credential_type=x509_svid,outcome=denied}";
    assert_eq!(
        sample(&after, ok_key) - sample(&before, ok_key),
        2.0,
        "{after}"
    );
    assert_eq!(
        sample(&after, denied_key) - sample(&before, denied_key),
        1.0
    );
    assert_eq!(
        sample(&after, "herald_replay_rejections_total{}")
            - sample(&before, "herald_replay_rejections_total{}"),
        1.0
    );
    assert_eq!(sample(&after, "herald_break_glass_uses_total{}"), 1.0);
    let failed =
        "herald_attestation_total{evidence_type=join_token,reason=join_token_used,result=failed}";
    assert_eq!(sample(&after, failed), 1.0, "{after}");
    let count = "herald_issuance_duration_seconds_count{credential_type=x509_svid,outcome=success}";
    assert_eq!(sample(&after, count), 2.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as f64;
    assert!(sample(&after, "herald_ca_expiry_timestamp_seconds{}") > now);
    let bundle_expiry = sample(&after, "herald_trust_bundle_expiry_timestamp_seconds{}");
    assert!(
        bundle_expiry > now
            && bundle_expiry <= sample(&after, "herald_ca_expiry_timestamp_seconds{}") + 1.0
    );
}

#[test]
fn report_figures_match_a_known_sequence_of_decisions() {
    let site = Site::new();
    let server = site.start();
    let a_dir = tempfile::tempdir().unwrap();
    let b_dir = tempfile::tempdir().unwrap();
    let glass = ["--break-glass", "--reason", "incident 7"];
    let a = site.token_with(&format!("spiffe://{TRUST_DOMAIN}/ops/a"), &glass);
    // b is a bootstrap token: a break-glass SVID never renews.
    let b = site.token(&format!("spiffe://{TRUST_DOMAIN}/ops/b"));
    ok(site.mint(&server, &a, a_dir.path())); // break-glass 1
    assert!(!site.mint(&server, &a, a_dir.path()).status.success()); // replay
    assert!(
        !site
            .mint(&server, "not-a-token", b_dir.path())
            .status
            .success()
    ); // bad evidence
    ok(site.mint(&server, &b, b_dir.path())); // bootstrap
    ok(site.herald(&[
        "svid",
        "renew",
        "--server",
        &server.url(),
        "--out",
        b_dir.path().to_str().unwrap(),
    ])); // renewal of b's SVID
    server.stop();

    // The window runs into the future so the fresh SVIDs' expiries fall in it.
    let until = humantime::format_rfc3339_seconds(
        std::time::SystemTime::now() + std::time::Duration::from_secs(2 * 3600),
    )
    .to_string();
    let out = ok(site.herald(&[
        "report", "--since", "1h", "--until", &until, "--format", "json",
    ]));
    let r: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(r["requests"], 5, "{r}");
    assert_eq!(r["issued"], 3);
    assert_eq!(r["refused"], 2);
    assert_eq!(r["errors"], 0);
    assert_eq!(r["issuance_error_rate"], 0.0);
    assert_eq!(r["authentication_success_rate"], 0.6);
    assert_eq!(r["mfa_enforcement_rate"], 0.0);
    assert_eq!(r["attestation_by_method"]["break_glass"]["attempts"], 2);
    assert_eq!(r["attestation_by_method"]["break_glass"]["verified"], 1);
    assert_eq!(r["attestation_by_method"]["join_token"]["attempts"], 2);
    assert_eq!(r["attestation_by_method"]["join_token"]["verified"], 1);
    assert_eq!(r["attestation_by_method"]["x509_svid"]["attempts"], 1);
    assert_eq!(r["attestation_by_method"]["x509_svid"]["success_rate"], 1.0);
    assert_eq!(r["replay_attempts"], 1);
    assert_eq!(r["bypass_attempts"], 0);
    let bg = r["break_glass"].as_array().unwrap();
    assert_eq!(bg.len(), 1, "{r}");
    assert_eq!(bg[0]["spiffe_id"], format!("spiffe://{TRUST_DOMAIN}/ops/a"));
    assert_eq!(bg[0]["reason"], "incident 7");
    let ttl = &r["ttl_distribution"]["x509_svid"];
    assert_eq!(ttl["count"], 3);
    let p50 = ttl["p50_s"].as_i64().unwrap();
    assert!((3600..=3700).contains(&p50), "{ttl}");
    assert_eq!(r["rotation_due"], 3);
    assert_eq!(r["rotated_in_time"], 1);
    // The text form carries the same figures.
    let text = stdout(&ok(site.herald(&["report", "--since", "1h"])));
    assert!(text.contains("break-glass uses"), "{text}");
    assert!(
        text.lines()
            .any(|l| l.starts_with("replay attempts") && l.trim_end().ends_with(" 1")),
        "{text}"
    );
    // And the HTML page: well-formed enough for Python's parser, with the
    // same counts and one chart per measure.
    let html = stdout(&ok(
        site.herald(&["report", "--since", "1h", "--format", "html"])
    ));
    assert!(html.starts_with("<!doctype html>"));
    assert!(
        html.contains("<tr><th>replay attempts</th><td class=\"n\">1</td></tr>"),
        "{html}"
    );
    assert!(html.matches("<svg").count() >= 5, "{html}");
    assert!(!html.contains("<script"));
    let check = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, html.parser\nclass P(html.parser.HTMLParser):\n  def __init__(s):\n    super().__init__(); s.stack=[]\n  def handle_starttag(s,t,a):\n    if t not in ('meta','br'): s.stack.append(t)\n  def handle_startendtag(s,t,a):\n    pass\n  def handle_endtag(s,t):\n    assert s.stack and s.stack.pop()==t, t\np=P(); p.feed(sys.stdin.read()); assert not p.stack, p.stack; print('ok')",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(html.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// What a small OTLP/HTTP receiver has seen.
#[derive(Default)]
struct Received {
    /// (span name, attributes as key=value strings)
    spans: Vec<(String, Vec<String>)>,
    metrics: Vec<String>,
}

async fn otlp_receiver() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Received>>,
) {
    use axum::body::Bytes;
    use axum::extract::State;
    use opentelemetry_proto::tonic::collector::metrics::v1::{
        ExportMetricsServiceRequest, ExportMetricsServiceResponse,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    use prost::Message;
    type Shared = std::sync::Arc<std::sync::Mutex<Received>>;
    let seen: Shared = Default::default();
    const PROTO: (axum::http::HeaderName, &str) =
        (axum::http::header::CONTENT_TYPE, "application/x-protobuf");
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(|State(seen): State<Shared>, body: Bytes| async move {
                let req = ExportTraceServiceRequest::decode(body).unwrap();
                let mut seen = seen.lock().unwrap();
                for rs in req.resource_spans {
                    for ss in rs.scope_spans {
                        for span in ss.spans {
                            let attrs = span
                                .attributes
                                .iter()
                                .map(|kv| {
                                    let v = kv.value.as_ref().and_then(|v| v.value.as_ref());
                                    format!("{}={}", kv.key, match v {
                                        Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => s.clone(),
                                        Some(other) => format!("{other:?}"),
                                        None => String::new(),
                                    })
                                })
                                .collect();
                            seen.spans.push((span.name, attrs));
                        }
                    }
                }
                ([PROTO], ExportTraceServiceResponse::default().encode_to_vec())
            }),
        )
        .route(
            "/v1/metrics",
            axum::routing::post(|State(seen): State<Shared>, body: Bytes| async move {
                let req = ExportMetricsServiceRequest::decode(body).unwrap();
                let mut seen = seen.lock().unwrap();
                for rm in req.resource_metrics {
                    for sm in rm.scope_metrics {
                        for m in sm.metrics {
                            seen.metrics.push(m.name);
                        }
                    }
                }
                ([PROTO], ExportMetricsServiceResponse::default().encode_to_vec())
            }),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_and_metrics_of_an_issuance_arrive_over_otlp() {
    let (addr, seen) = otlp_receiver().await;
    let site = Site::new();
    let server = Server::start_with_env(
        &site.config(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
            ("OTEL_METRIC_EXPORT_INTERVAL", "300".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ],
    );
    let token = site.token(&format!("spiffe://{TRUST_DOMAIN}/ops/otel"));
    let out_dir = tempfile::tempdir().unwrap();
    let minted = tokio::task::spawn_blocking({
        let token = token.clone();
        let dir = out_dir.path().to_path_buf();
        let site_cfg = site.config();
        let url = server.url();
        let bundle = site.bundle_pem();
        move || {
            Command::new(herald_bin())
                .args([
                    "svid",
                    "mint",
                    "--join-token",
                    &token,
                    "--server",
                    &url,
                    "--bundle",
                ])
                .arg(bundle)
                .arg("--out")
                .arg(dir)
                .env("HERALD_CONFIG", site_cfg)
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    ok(minted);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        {
            let seen = seen.lock().unwrap();
            let span = seen.spans.iter().find(|(name, _)| name == "decision");
            let metric = seen.metrics.iter().any(|m| m == "herald.issuance");
            if let (Some((_, attrs)), true) = (span, metric) {
                assert!(attrs.contains(&"outcome=success".to_string()), "{attrs:?}");
                assert!(
                    attrs.contains(&"evidence_type=join_token".to_string()),
                    "{attrs:?}"
                );
                assert!(
                    attrs.contains(&"action=x509_svid.mint".to_string()),
                    "{attrs:?}"
                );
                // Never the token itself.
                assert!(!attrs.iter().any(|a| a.contains(&token)), "{attrs:?}");
                assert!(seen.metrics.iter().any(|m| m == "herald.issuance.duration"));
                break;
            }
        }
        if std::time::Instant::now() >= deadline {
            let seen = seen.lock().unwrap();
            panic!(
                "no span/metric over OTLP: {:?} {:?}",
                seen.spans, seen.metrics
            );
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    drop(server);
}

/// A periodic audit checkpoint leaves the machine over OTLP as it is made:
/// the `audit.checkpoint` span carries the same head (seq, hash) and JWS
/// as the file written to `audit.checkpoint_dir`, and that JWS, taken from
/// the span alone, verifies with `herald audit verify --checkpoint`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_is_shipped_over_otlp_with_the_files_chain_head() {
    let (addr, seen) = otlp_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let site = Site::with_extra(&format!(
        "[audit]\ncheckpoint_interval = \"200ms\"\ncheckpoint_dir = \"{}\"\n",
        dir.path().display()
    ));
    let server = Server::start_with_env(
        &site.config(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{addr}")),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".into()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
        ],
    );
    // Something to checkpoint.
    let token = site.token(&format!("spiffe://{TRUST_DOMAIN}/ops/checkpoint"));
    let out = tempfile::tempdir().unwrap();
    ok(site.mint(&server, &token, out.path()));

    // The first checkpoint file, and the span that carries the same JWS.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (file, attrs) = loop {
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .min();
        if let Some(file) = file {
            let body: Value =
                serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
            let jws = format!("checkpoint={}", body["checkpoint"].as_str().unwrap());
            let seen = seen.lock().unwrap();
            let span = seen
                .spans
                .iter()
                .find(|(name, attrs)| name == "audit.checkpoint" && attrs.contains(&jws));
            if let Some((_, attrs)) = span {
                break (body, attrs.clone());
            }
        }
        if std::time::Instant::now() >= deadline {
            let seen = seen.lock().unwrap();
            let names: Vec<&String> = seen.spans.iter().map(|(n, _)| n).collect();
            panic!("no audit.checkpoint span matching a checkpoint file: spans {names:?}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    let seq = file["seq"].as_u64().unwrap();
    let hash = file["hash"].as_str().unwrap();
    assert_eq!(hash.len(), 64, "{file}");
    assert!(
        attrs.contains(&format!("hash={hash}")),
        "the span's chain head is the file's: {attrs:?} vs {file}"
    );
    // (A u64 field travels as a string attribute.)
    assert!(
        attrs.contains(&format!("seq={seq}")) || attrs.contains(&format!("seq=IntValue({seq})")),
        "{attrs:?} vs {file}"
    );
    let kid = file["key"]["kid"].as_str().unwrap();
    assert!(
        attrs.contains(&format!("key_id={kid}")),
        "{attrs:?} vs {file}"
    );
    let jws = attrs
        .iter()
        .find_map(|a| a.strip_prefix("checkpoint="))
        .unwrap();
    server.stop();
    // What arrived off the machine is a checkpoint the log must match.
    let shipped = dir.path().join("shipped.jws");
    std::fs::write(&shipped, jws).unwrap();
    let verified = ok(site.herald(&["audit", "verify", "--checkpoint", shipped.to_str().unwrap()]));
    assert!(
        stdout(&verified).contains(&format!("record {seq} matches")),
        "{}",
        stdout(&verified)
    );
}

/// Runs the Envoy API type check on `config`: (success, stdout, stderr).
fn envoy_check(config: &Value) -> (bool, Value, String) {
    use std::io::Write;
    let python = repo(".venv/bin/python");
    assert!(
        python.exists(),
        "run `bash scripts/install-deps.sh` (it installs envoy-data-plane)"
    );
    let mut child = Command::new(python)
        .arg(repo("tests/python/envoy_bootstrap.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(config.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let found = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (
        out.status.success(),
        found,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_envoy_example_is_envoy_config_taking_its_secrets_from_the_agent() {
    let text = std::fs::read_to_string(repo("deploy/envoy/envoy-sds.yaml")).unwrap();
    let config: Value = serde_yaml_ng::from_str(&text).unwrap();
    let (ok, found, err) = envoy_check(&config);
    assert!(ok, "{err}");
    // The SDS cluster dials the socket the example agent config serves.
    let agent = std::fs::read_to_string(repo("deploy/agent.example.toml")).unwrap();
    let pipes = found["pipes"].as_array().unwrap();
    assert_eq!(pipes.len(), 1, "{found}");
    assert!(
        agent.contains(&format!("socket = \"{}\"", pipes[0].as_str().unwrap())),
        "{found}"
    );
    // Every secret it asks for is a name the agent's SDS serves.
    use herald_agent::workload::sds::{ALL_BUNDLES, DEFAULT_SVID, ROOT_CA};
    let names: Vec<&str> = found["sds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert_eq!(names.len(), 4, "{found}");
    for name in names {
        assert!(
            [DEFAULT_SVID, ROOT_CA, ALL_BUNDLES].contains(&name)
                || herald_core::SpiffeId::parse(name).is_ok(),
            "{name}"
        );
    }
    // The check can fail: a misspelt field is refused.
    let mut broken = config.clone();
    broken["static_resources"]["clusters"][0]["conect_timeout"] = "1s".into();
    let (ok, _, err) = envoy_check(&broken);
    assert!(!ok && err.contains("conect_timeout"), "{err}");
}

#[test]
fn config_defaults_prints_the_real_defaults_as_toml() {
    let out = ok(herald(&["config", "defaults"]));
    let text = stdout(&out);
    // With the two required keys it is a configuration the server accepts.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("defaults.toml");
    std::fs::write(
        &f,
        format!("trust_domain = \"a.test\"\ndata_dir = \"/x\"\n{text}"),
    )
    .unwrap();
    let check = herald(&["config", "check", f.to_str().unwrap()]);
    assert!(check.status.success(), "{}", stderr(&check));
    let table: toml::Table = toml::from_str(&text).unwrap();
    assert_eq!(table["listen"]["grpc"].as_str(), Some("127.0.0.1:8443"));
    assert!(
        table["listen"].get("https").is_none(),
        "HTTPS is off by default"
    );
    assert!(text.contains("# require_jti = false"), "{text}");
}

#[test]
fn policy_check_takes_the_trust_domain_from_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    std::fs::write(
        policies.join("p.yaml"),
        "name: p\nevidence:\n  join_token: { purposes: [bootstrap] }\nspiffe_id:\n  prefix: spiffe://prod.example/svc/\ngrants:\n  x509_svid: { max_ttl: 1h }\n",
    )
    .unwrap();
    let cfg = |td: &str| {
        let f = dir.path().join(format!("{td}.toml"));
        std::fs::write(
            &f,
            format!(
                "trust_domain = \"{td}\"\ndata_dir = \"/x\"\n[policy]\ndir = \"{}\"\n",
                policies.display()
            ),
        )
        .unwrap();
        f
    };
    // The policy's prefix is in prod.example: that server accepts it ...
    let good = cfg("prod.example");
    let out = ok(herald(&[
        "policy",
        "check",
        "--config",
        good.to_str().unwrap(),
    ]));
    assert!(
        stdout(&out).contains("for trust domain prod.example"),
        "{}",
        stdout(&out)
    );
    // ... a server of another trust domain refuses it, directory given or not.
    let other = cfg("other.example");
    for args in [
        vec!["policy", "check", "--config", other.to_str().unwrap()],
        vec![
            "policy",
            "check",
            policies.to_str().unwrap(),
            "--config",
            other.to_str().unwrap(),
        ],
    ] {
        let out = herald(&args);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            stderr(&out).contains("error[policy_invalid]"),
            "{}",
            stderr(&out)
        );
    }
    // Without --config and --trust-domain, a directory is required.
    let out = herald(&["policy", "check"]);
    assert!(!out.status.success());
}

#[test]
fn piped_logs_carry_no_colour_codes_and_the_banner_names_every_listener() {
    use std::io::Read;
    let site = Site::new();
    let mut child = Command::new(herald_bin())
        .args(["server", "--config"])
        .arg(site.config())
        .env("HERALD_LOG", "info")
        .env_remove("HERALD_KEK")
        .env_remove("NO_COLOR")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout_pipe = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut stdout_pipe, &mut line).unwrap();
        if n == 0 {
            let _ = child.kill();
            panic!("server exited before it was ready: {banner}");
        }
        banner.push_str(&line);
        if line.starts_with("listening ") {
            break;
        }
    }
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let mut logs = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    child.wait().unwrap();
    assert!(logs.contains("INFO"), "the server logged nothing: {logs}");
    assert!(
        !logs.contains("\x1b["),
        "ANSI codes in piped logs: {logs:?}"
    );
    assert!(!banner.contains("\x1b["), "{banner:?}");
    let https = banner
        .lines()
        .find_map(|l| l.strip_prefix("listening "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix("https="))
        })
        .unwrap();
    for listener in ["gRPC (TLS)", "HTTP ", "HTTPS "] {
        assert!(banner.contains(listener), "{listener} missing: {banner}");
    }
    assert!(
        banner.contains(&format!("https://{https}")),
        "the HTTPS listener is not in the banner: {banner}"
    );
}

#[test]
fn policy_explain_describes_every_example_policy() {
    let mut seen = 0;
    for entry in std::fs::read_dir(repo("attestation-policies")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let out = ok(herald(&["policy", "explain", path.to_str().unwrap()]));
        let text = stdout(&out);
        let name = path.file_stem().unwrap().to_str().unwrap();
        assert!(text.contains("Accepts"), "{name}: {text}");
        assert!(text.contains("Grants"), "{name}: {text}");
        assert!(text.contains("deny by default"), "{name}: {text}");
        seen += 1;
    }
    assert!(seen >= 5);
    // A file the server would refuse is not explained.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "name: bad\nevidence: {}\n").unwrap();
    let out = herald(&["policy", "explain", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("error[policy_invalid]"),
        "{}",
        stderr(&out)
    );
}

// The documented example configurations against the code's defaults:
// every key a default has is shown with that default, nothing else is set
// but the keys without one, and what is off by default is commented out.

/// Every leaf key of a TOML table as a dotted path, with its value
/// (arrays are leaves).
fn leaves(prefix: &str, t: &toml::Table, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in t {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(inner) => leaves(&path, inner, out),
            other => out.push((path, other.clone())),
        }
    }
}

fn lookup<'a>(t: &'a toml::Table, path: &str) -> Option<&'a toml::Value> {
    let mut parts = path.split('.');
    let mut v = t.get(parts.next()?)?;
    for p in parts {
        v = v.as_table()?.get(p)?;
    }
    Some(v)
}

#[test]
fn the_server_example_config_shows_every_real_default() {
    use herald_server::ServerConfig;
    use herald_server::config::{REQUIRED_KEYS, UNSET_BY_DEFAULT};
    const EXAMPLE: &str = include_str!("../deploy/herald.example.toml");
    // Unknown keys anywhere (deny_unknown_fields) fail here.
    let parsed = ServerConfig::from_toml(EXAMPLE).unwrap();
    parsed.validate().unwrap();
    let raw: toml::Table = toml::from_str(EXAMPLE).unwrap();
    // Serialised back, durations and numbers compare by value, not spelling.
    let normalised = toml::Table::try_from(&parsed).unwrap();
    let defaults = toml::Table::try_from(ServerConfig::new(
        parsed.trust_domain.clone(),
        parsed.data_dir.clone(),
    ))
    .unwrap();

    let mut want = Vec::new();
    leaves("", &defaults, &mut want);
    let mut problems = Vec::new();
    for (path, value) in &want {
        if REQUIRED_KEYS.contains(&path.as_str()) || path == "oidc.issuers" {
            continue;
        }
        if lookup(&raw, path).is_none() {
            problems.push(format!(
                "{path}: missing from the example (default {value})"
            ));
        } else if lookup(&normalised, path) != Some(value) {
            problems.push(format!(
                "{path}: the example says {:?}, the default is {value}",
                lookup(&raw, path)
            ));
        }
    }
    // Nothing is set that is not a default, apart from the required keys
    // and the issuer entries; what is off by default is commented out.
    let mut given = Vec::new();
    leaves("", &raw, &mut given);
    for (path, _) in &given {
        let known = REQUIRED_KEYS.contains(&path.as_str())
            || path == "oidc.issuers"
            || want.iter().any(|(p, _)| p == path);
        if !known {
            problems.push(format!("{path}: set in the example but not a default"));
        }
    }
    for key in UNSET_BY_DEFAULT {
        let leaf = key.rsplit('.').next().unwrap_or(key);
        let shown = EXAMPLE
            .lines()
            .any(|l| l.starts_with(&format!("# {leaf} = ")));
        if !shown {
            problems.push(format!("{key}: not shown commented out"));
        }
    }
    // Issuers: the first shows every key at its default; no entry sets a
    // non-default value beyond `issuer` and `audiences`.
    let issuers = raw["oidc"]["issuers"].as_array().unwrap();
    for (i, entry) in issuers.iter().enumerate() {
        let entry = entry.as_table().unwrap();
        let cfg = &parsed.oidc.issuers[i];
        let default =
            herald_attest::oidc::IssuerConfig::new(cfg.issuer.clone(), cfg.audiences.clone());
        let default = toml::Table::try_from(&default).unwrap();
        let actual = toml::Table::try_from(cfg).unwrap();
        for (k, v) in &default {
            match entry.get(k) {
                None if i == 0 => {
                    problems.push(format!("oidc.issuers[0].{k}: missing (default {v})"))
                }
                Some(_) if actual.get(k) != Some(v) => problems.push(format!(
                    "oidc.issuers[{i}].{k}: {:?} is not the default {v}",
                    entry.get(k)
                )),
                _ => {}
            }
        }
        for k in entry.keys() {
            if !default.contains_key(k) {
                problems.push(format!("oidc.issuers[{i}].{k}: set but not a default"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// An agent example with its commented-out keys and tables switched on:
/// `# key = value` and `# [table]` lines lose their `# `; prose stays.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix("# ") {
            Some(rest)
                if (rest.starts_with('[') && rest.ends_with(']'))
                    || rest.split_once(" = ").is_some_and(|(k, _)| {
                        k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                    }) =>
            {
                rest
            }
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_agent_example_config_shows_every_real_default() {
    use herald_agent::AgentConfig;
    use herald_agent::config::{REQUIRED_IN_TABLES, REQUIRED_KEYS, UNSET_BY_DEFAULT};
    const EXAMPLE: &str = include_str!("../deploy/agent.example.toml");
    // The example enables the Workload API (the reason most nodes run an
    // agent) although it is off by default.
    const ENABLED_IN_EXAMPLE: &[&str] = &["workload_api"];
    // As given, and with every commented-out key switched on: both are
    // valid (unknown keys anywhere fail, deny_unknown_fields).
    AgentConfig::parse(EXAMPLE).unwrap();
    let full_text = uncommented(EXAMPLE);
    let full = AgentConfig::parse(&full_text).unwrap();
    let raw: toml::Table = toml::from_str(EXAMPLE).unwrap();
    let shown: toml::Table = toml::from_str(&full_text).unwrap();
    // Serialised back, durations, sizes and numbers compare by value.
    let normalised = toml::Table::try_from(&full).unwrap();
    let defaults = toml::Table::try_from(AgentConfig::every_table_at_defaults().unwrap()).unwrap();
    let no_default = |p: &str| REQUIRED_KEYS.contains(&p) || REQUIRED_IN_TABLES.contains(&p);

    let mut want = Vec::new();
    leaves("", &defaults, &mut want);
    let mut problems = Vec::new();
    for (path, value) in &want {
        if no_default(path) {
            continue;
        }
        if lookup(&shown, path).is_none() {
            problems.push(format!(
                "{path}: missing from the example (default {value})"
            ));
        } else if lookup(&normalised, path) != Some(value) {
            problems.push(format!(
                "{path}: the example says {:?}, the default is {value}",
                lookup(&shown, path)
            ));
        }
    }
    let mut given = Vec::new();
    leaves("", &shown, &mut given);
    for (path, _) in &given {
        let known = no_default(path)
            || UNSET_BY_DEFAULT.contains(&path.as_str())
            || want.iter().any(|(p, _)| p == path);
        if !known {
            problems.push(format!("{path}: set in the example but not a default"));
        }
    }
    for key in UNSET_BY_DEFAULT {
        if lookup(&shown, key).is_none() {
            problems.push(format!("{key}: not shown in the example"));
        }
        if lookup(&raw, key).is_some() && !ENABLED_IN_EXAMPLE.contains(key) {
            problems.push(format!("{key}: off by default but not commented out"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn agent_defaults_print_as_toml_that_parses_back_to_the_defaults() {
    use herald_agent::AgentConfig;
    use herald_agent::config::REQUIRED_KEYS;
    let text = stdout(&ok(herald(&["config", "defaults", "--agent"])));
    assert_eq!(text, AgentConfig::defaults_toml().unwrap());
    assert!(!text.contains("\nservers"), "{text}");
    assert!(text.contains("tcti = \"device:/dev/tpmrm0\""), "{text}");
    assert!(
        text.contains("# max_executable_size = \"512MiB\""),
        "{text}"
    );
    assert!(text.contains("# retry_interval = \"250ms\""), "{text}");
    // With the required keys it is the defaults, optional tables off ...
    let required = "servers = [\"https://h:1\"]\ntrust_bundle = \"/b\"\ndata_dir = \"/d\"\n";
    let back = AgentConfig::parse(&format!("{required}{text}")).unwrap();
    assert!(back.workload_api.is_none() && back.credentials_endpoint.is_none());
    // ... and switched on, every table at its defaults.
    let on = AgentConfig::parse(&uncommented(&format!("{required}{text}"))).unwrap();
    let mut want = toml::Table::try_from(AgentConfig::every_table_at_defaults().unwrap()).unwrap();
    let mut got = toml::Table::try_from(on).unwrap();
    for k in REQUIRED_KEYS {
        want.remove(*k);
        got.remove(*k);
    }
    assert_eq!(got, want);
}
