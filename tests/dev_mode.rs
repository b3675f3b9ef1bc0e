//! `herald server --dev` shows every flow: its DEV-ONLY OIDC issuer,
//! `herald dev token`, and exchanges of that token; and the issuer exists
//! nowhere but under `--dev`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::node::free_port;
use common::*;
use serde_json::Value;

/// `herald server --dev` in a scratch data directory on free ports; the
/// banner lines up to `listening …` and the child (killed on drop).
struct DevServer {
    child: Child,
    banner: String,
    data: tempfile::TempDir,
}

impl Drop for DevServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl DevServer {
    fn start() -> DevServer {
        let data = tempfile::tempdir().unwrap();
        let child = Command::new(herald_bin())
            .args(["server", "--dev"])
            // The repository root, where ./attestation-policies is.
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("HERALD_DATA_DIR", data.path())
            .env("HERALD_LISTEN_GRPC", "127.0.0.1:0")
            .env("HERALD_LISTEN_HTTP", "127.0.0.1:0")
            .env("HERALD_LOG", "warn")
            .env_remove("HERALD_CONFIG")
            .env_remove("HERALD_KEK")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // Owned (and killed on drop) before anything can fail.
        let mut server = DevServer {
            child,
            banner: String::new(),
            data,
        };
        let mut reader = BufReader::new(server.child.stdout.take().unwrap());
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap() == 0 {
                panic!(
                    "herald server --dev exited before it was ready: {}",
                    server.banner
                );
            }
            server.banner.push_str(&line);
            if line.starts_with("listening ") {
                std::thread::spawn(move || for _ in reader.lines() {});
                return server;
            }
        }
    }

    fn addr(&self, key: &str) -> std::net::SocketAddr {
        self.banner
            .lines()
            .find_map(|l| l.strip_prefix("listening "))
            .and_then(|l| {
                l.split_whitespace()
                    .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
            })
            .unwrap()
            .parse()
            .unwrap()
    }

    fn dev_issuer(&self) -> Option<String> {
        self.banner.lines().find_map(|l| {
            l.trim()
                .strip_prefix("DEV OIDC")
                .map(|r| r.split_whitespace().next().unwrap().to_owned())
        })
    }

    fn herald(&self, args: &[&str]) -> std::process::Output {
        Command::new(herald_bin())
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("HERALD_DATA_DIR", self.data.path())
            .env_remove("HERALD_CONFIG")
            .output()
            .unwrap()
    }

    fn dev_token(&self, extra: &[&str]) -> String {
        let mut args = vec!["dev", "token"];
        args.extend_from_slice(extra);
        stdout(&ok(self.herald(&args))).trim().to_owned()
    }
}

fn claims_of(jwt: &str) -> Value {
    use base64::Engine as _;
    let payload = jwt.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn rfc8693(http: std::net::SocketAddr, token: &str) -> (u16, String) {
    let form = serde_urlencoded::to_string([
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", token),
        (
            "subject_token_type",
            "urn:ietf:params:oauth:token-type:id_token",
        ),
        ("audience", "demo-service"),
    ])
    .unwrap();
    raw_http(
        http,
        &format!(
            "POST /v1/token HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ),
    )
}

#[test]
fn dev_mode_exchanges_a_dev_token_for_a_jwt_svid_and_session_credentials() {
    let server = DevServer::start();
    let issuer = server
        .dev_issuer()
        .unwrap_or_else(|| panic!("no DEV OIDC line in the banner: {}", server.banner));
    assert!(issuer.starts_with("http://127.0.0.1:"), "{issuer}");
    assert!(server.banner.contains("DEV ONLY"), "{}", server.banner);

    // Discovery and JWKS are served on loopback, and name the issuer exactly.
    let issuer_addr: std::net::SocketAddr = issuer.trim_start_matches("http://").parse().unwrap();
    let (status, body) = raw_http(
        issuer_addr,
        "GET /.well-known/openid-configuration HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    let discovery: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(discovery["issuer"], issuer.as_str());

    // The key is the owner's alone.
    use std::os::unix::fs::PermissionsExt;
    let key = server.data.path().join("dev-oidc/signing-key.der");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");

    // A CI-shaped token, claims overridable.
    let token = server.dev_token(&["--claim", "environment=staging"]);
    let claims = claims_of(&token);
    assert_eq!(claims["iss"], issuer.as_str());
    assert_eq!(claims["aud"], "herald-dev");
    assert_eq!(claims["repository"], "dev/demo");
    assert_eq!(claims["environment"], "staging");
    assert!(claims["jti"].as_str().is_some());

    // RFC 8693: the token for a JWT-SVID under the dev policy's prefix.
    let http = server.addr("http");
    let (status, body) = rfc8693(http, &token);
    assert_eq!(status, 200, "{body}");
    let resp: Value = serde_json::from_str(&body).unwrap();
    let svid = claims_of(resp["access_token"].as_str().unwrap());
    assert_eq!(svid["sub"], "spiffe://dev.herald.test/ci/dev/dev/staging");
    assert_eq!(svid["aud"], "demo-service");
    // Single use: the same token again is a replay.
    let (status, body) = rfc8693(http, &token);
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_grant"), "{body}");
    // The dev policy still decides: another branch is refused.
    let (status, body) = rfc8693(http, &server.dev_token(&["--claim", "ref=refs/heads/x"]));
    assert_eq!(status, 400, "{body}");

    // The STS API: a fresh token for session credentials of the dev role.
    let token = server.dev_token(&[]);
    let form = serde_urlencoded::to_string([
        ("Action", "AssumeRoleWithWebIdentity"),
        ("Version", "2011-06-15"),
        ("RoleArn", "arn:aws:iam::000000000000:role/dev-deploy"),
        ("RoleSessionName", "dev-test"),
        ("WebIdentityToken", token.as_str()),
    ])
    .unwrap();
    let (status, body) = raw_http(
        http,
        &format!(
            "POST / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("<AccessKeyId>"), "{body}");
    assert!(body.contains("dev-deploy"), "{body}");
}

#[test]
fn dev_token_needs_the_dev_servers_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(herald_bin())
        .args(["dev", "token", "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("error[dev_issuer_unavailable]"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("herald server --dev"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn the_dev_issuer_exists_only_under_dev() {
    // A configuration file cannot ask for it: the switches are no keys.
    let dir = tempfile::tempdir().unwrap();
    for key in ["dev_issuer", "dev"] {
        let f = dir.path().join("c.toml");
        std::fs::write(
            &f,
            format!("trust_domain = \"a.test\"\ndata_dir = \"/x\"\n{key} = true\n"),
        )
        .unwrap();
        let out = Command::new(herald_bin())
            .args(["config", "check"])
            .arg(&f)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{key}");
        assert!(stderr(&out).contains(key), "{}", stderr(&out));
    }

    // A server started from a file serves no dev issuer and trusts none.
    let site = Site::new();
    let server = site.start();
    assert!(!server.banner.contains("DEV OIDC"), "{}", server.banner);
    assert!(!Path::new(&site.data_dir().join("dev-oidc")).exists());
    let (_, body) = server.http_get("/v1/policies");
    assert!(!body.contains("dev-ci"), "{body}");
    let out = Command::new(herald_bin())
        .args(["dev", "token", "--data-dir"])
        .arg(site.data_dir())
        .output()
        .unwrap();
    assert!(!out.status.success(), "a dev token without the dev server");
}

/// The fenced block following `<!-- readme-test: NAME -->` in README.md:
/// the README's own text, not a copy.
fn readme_block(name: &str) -> String {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let marker = format!("<!-- readme-test: {name} -->");
    let after = readme
        .split_once(&marker)
        .unwrap_or_else(|| panic!("README.md has no {marker}"))
        .1;
    let body = after.split_once("```").unwrap().1;
    let body = body.split_once('\n').unwrap().1;
    body.split_once("```").unwrap().0.to_owned()
}

/// `PATH` with the built `herald` first, as a reader who installed it has.
fn path_with_herald() -> String {
    let bin_dir = Path::new(herald_bin()).parent().unwrap();
    format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap())
}

/// Runs README block `name` with bash beside `server`: from a scratch
/// repository root (where the quickstarts run) whose `.herald-dev` is the
/// dev server's data directory, with the server's addresses in
/// `HERALD_SERVER` and `HERALD_HTTP`. Returns the output and the root.
fn run_beside(server: &DevServer, name: &str) -> (std::process::Output, tempfile::TempDir) {
    let work = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(server.data.path(), work.path().join(".herald-dev")).unwrap();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &readme_block(name)])
        .current_dir(work.path())
        .env("PATH", path_with_herald())
        .env("HERALD_SERVER", format!("https://{}", server.addr("grpc")))
        .env("HERALD_HTTP", format!("http://{}", server.addr("http")))
        .env("HERALD_DATA_DIR", server.data.path())
        .env_remove("HERALD_CONFIG")
        .output()
        .unwrap();
    (out, work)
}

#[test]
fn the_readme_ci_exchange_quickstart_runs_as_written() {
    require_tool("bash");
    let server = DevServer::start();
    let (out, work) = run_beside(&server, "ci-exchange");
    let text = stdout(&ok(out));
    assert!(
        text.contains("spiffe://dev.herald.test/ci/dev/dev/demo"),
        "{text}"
    );
    assert!(text.contains("session credentials: ASIA"), "{text}");
    assert!(work.path().join("ci-svid/svid.pem").is_file());
}

#[test]
fn the_readme_github_actions_quickstart_is_a_workflow_and_a_valid_policy() {
    let workflow: Value = serde_yaml_ng::from_str(&readme_block("github-workflow")).unwrap();
    assert_eq!(workflow["permissions"]["id-token"], "write");
    let steps = workflow["jobs"]["deploy"]["steps"].as_array().unwrap();
    let run = steps
        .iter()
        .find_map(|s| s["run"].as_str())
        .expect("a run step");
    assert!(
        run.contains("herald exchange") && run.contains("--github-actions"),
        "{run}"
    );

    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("deploy.yaml");
    std::fs::write(&policy, readme_block("github-policy")).unwrap();
    for args in [
        vec!["policy", "check", dir.path().to_str().unwrap()],
        vec!["policy", "explain", policy.to_str().unwrap()],
    ] {
        let mut args = args;
        args.extend(["--trust-domain", "example.org"]);
        let out = Command::new(herald_bin()).args(&args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
}

/// A free loopback port whose successor is free too (swtpm's command and
/// control ports).
fn free_port_pair() -> u16 {
    loop {
        let a = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// Kills a process group (the quickstart's background server, agent and
/// swtpm) when dropped.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", "--", &format!("-{}", self.0)])
            .status();
    }
}

#[test]
fn the_readme_swtpm_agent_quickstart_runs_as_written() {
    use std::os::unix::process::CommandExt as _;
    for tool in [
        "bash",
        "curl",
        "swtpm",
        "swtpm_setup",
        "swtpm_localca",
        "timeout",
    ] {
        require_tool(tool);
    }
    let work = tempfile::tempdir().unwrap();
    let path = path_with_herald();
    let (grpc, http) = (free_port(), free_port());
    // Output to files, not pipes: the block leaves the server, the agent
    // and swtpm running in the background, holding whatever it was given.
    let out_path = work.path().join("stdout");
    let err_path = work.path().join("stderr");
    let mut child = Command::new("timeout")
        .args(["180", "bash", "-euo", "pipefail", "-c"])
        .arg(readme_block("swtpm-agent"))
        .current_dir(work.path())
        .env("PATH", path)
        .env("TPM_PORT", free_port_pair().to_string())
        .env("HERALD_LISTEN_GRPC", format!("127.0.0.1:{grpc}"))
        .env("HERALD_LISTEN_HTTP", format!("127.0.0.1:{http}"))
        .env("HERALD_SERVER", format!("https://127.0.0.1:{grpc}"))
        .env("HERALD_HTTP", format!("http://127.0.0.1:{http}"))
        .env("HERALD_LOG", "warn")
        .env_remove("HERALD_CONFIG")
        .env_remove("HERALD_KEK")
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let group = Group(child.id());
    let status = child.wait().unwrap();
    drop(group);
    let text = std::fs::read_to_string(&out_path).unwrap();
    let errors = std::fs::read_to_string(&err_path).unwrap();
    assert!(
        status.success(),
        "{status}\nstdout: {text}\nstderr: {errors}"
    );
    assert!(text.contains("spiffe://example.org/app/me"), "{text}");
    assert!(text.contains("spiffe://example.org/node/"), "{text}");
    assert!(work.path().join("tpm-quickstart/svid/svid.pem").is_file());
}

#[test]
fn the_readme_serverless_quickstart_runs_as_written() {
    for tool in ["bash", "curl", "sed"] {
        require_tool(tool);
    }
    let server = DevServer::start();
    let (out, work) = run_beside(&server, "serverless");
    let text = stdout(&ok(out));
    assert!(text.contains("access key: ASIA"), "{text}");
    assert!(text.contains("expires:    20"), "{text}");
    assert!(text.contains("JWT-SVID: eyJ"), "{text}");
    // The JWT-SVID names the function's identity under the dev policy.
    let body = std::fs::read_to_string(work.path().join("jwt-svid.json")).unwrap();
    let resp: Value = serde_json::from_str(&body).unwrap();
    let svid = claims_of(resp["access_token"].as_str().unwrap());
    assert_eq!(svid["sub"], "spiffe://dev.herald.test/ci/dev/dev/functions");
    assert_eq!(svid["aud"], "demo-service");
}

#[test]
fn the_readme_serverless_issuer_and_policy_are_valid_together() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir(&policies).unwrap();
    let policy_file = repo.join("attestation-policies/serverless-platform.yaml");
    std::fs::copy(&policy_file, policies.join("functions.yaml")).unwrap();
    // The README's issuer entry in a server configuration whose policy
    // directory holds the platform policy: the check the server makes.
    let config = dir.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"dev.herald.test\"\ndata_dir = \"/x\"\n[policy]\ndir = \"{}\"\n{}",
            policies.display(),
            readme_block("serverless-issuer")
        ),
    )
    .unwrap();
    for args in [
        vec!["config", "check", config.to_str().unwrap()],
        vec!["policy", "check", "--config", config.to_str().unwrap()],
        vec!["policy", "test", policies.to_str().unwrap()],
    ] {
        let out = Command::new(herald_bin())
            .args(&args)
            .env_remove("HERALD_CONFIG")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    // The issuer and audience the README trusts are the policy's.
    let issuer: toml::Table = toml::from_str(&readme_block("serverless-issuer")).unwrap();
    let issuer = &issuer["oidc"]["issuers"][0];
    let policy: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(&policy_file).unwrap()).unwrap();
    assert_eq!(
        issuer["issuer"].as_str(),
        policy["evidence"]["oidc"]["issuer"].as_str()
    );
    let audiences = policy["evidence"]["oidc"]["audiences"].as_array().unwrap();
    assert!(
        audiences
            .iter()
            .any(|a| a.as_str() == issuer["audiences"][0].as_str())
    );
    assert!(
        policy["grants"]["cloud"][0]["scope"].is_object(),
        "scoped credentials"
    );
}

#[test]
fn the_readme_real_tpm_quickstart_runs_on_a_software_tpm() {
    // No machine the tests run on has a TPM at /dev/tpmrm0 (and a test
    // must not depend on, or change, one that does): the block runs as
    // written with TCTI naming a swtpm, the only line that differs. The
    // swtpm's local CA stands in for the vendor whose roots step 2 tells
    // the reader to download.
    for tool in ["bash", "tpm2_nvread", "tpm2_pcrread", "openssl", "awk"] {
        require_tool(tool);
    }
    let tpm = herald_test_tpm::SoftTpm::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let node = work.path().join("herald-node");
    std::fs::create_dir_all(node.join("ek-roots")).unwrap();
    std::fs::copy(tpm.ek_root_pem_path(), node.join("ek-roots/root.pem")).unwrap();
    std::fs::copy(
        tpm.ek_intermediate_pem_path(),
        node.join("ek-roots/intermediate.pem"),
    )
    .unwrap();
    let grpc = free_port();
    let path = path_with_herald();
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &readme_block("tpm-device")])
        .current_dir(work.path())
        .env("PATH", path)
        .env("TCTI", tpm.tcti())
        .env("HERALD_SERVER", format!("https://127.0.0.1:{grpc}"))
        .env_remove("HERALD_CONFIG")
        .output()
        .unwrap();
    let text = stdout(&ok(out));
    assert!(text.contains("ek.pem: OK"), "{text}");
    assert!(text.contains("agent.toml: ok"), "{text}");

    // What the block wrote admits that TPM: a server whose policy.dir is
    // the block's directory, and the block's agent.toml with only its
    // system paths moved into the test's directory.
    let kek = work.path().join("kek");
    std::fs::write(&kek, common::KEK_HEX).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
    let data = work.path().join("data");
    let config = work.path().join("herald.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"example.org\"\ndata_dir = \"{}\"\n[listen]\ngrpc = \"127.0.0.1:{grpc}\"\nhttp = \"127.0.0.1:0\"\n[ca]\nkey_encryption_key_file = \"{}\"\n[policy]\ndir = \"{}\"\n",
            data.display(),
            kek.display(),
            node.display()
        ),
    )
    .unwrap();
    let _server = Server::start(&config);
    let agent_dir = work.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    std::fs::copy(data.join("bundle.pem"), agent_dir.join("bundle.pem")).unwrap();
    let agent_toml = std::fs::read_to_string(node.join("agent.toml"))
        .unwrap()
        .replace(
            "/var/lib/herald-agent/bundle.pem",
            &agent_dir.join("bundle.pem").display().to_string(),
        )
        .replace(
            "\"/var/lib/herald-agent\"",
            &format!("\"{}\"", agent_dir.join("state").display()),
        )
        .replace(
            "/run/herald/agent.sock",
            &agent_dir.join("agent.sock").display().to_string(),
        );
    assert!(agent_toml.contains(&tpm.tcti()), "{agent_toml}");
    let agent_config = agent_dir.join("agent.toml");
    std::fs::write(&agent_config, agent_toml).unwrap();
    let _agent = common::node::start_agent(&agent_config);
    let status = common::node::wait_status(&agent_dir, 90, "attested", |s| s.spiffe_id.is_some());
    assert!(
        status
            .spiffe_id
            .unwrap()
            .starts_with("spiffe://example.org/node/"),
    );
}

/// The repository file at `path`, as the YAML documents it holds.
fn manifest_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

#[test]
fn the_readme_kubernetes_quickstart_names_manifests_that_fit_together() {
    // No cluster here (and `kubectl apply --dry-run=client` still wants
    // one): the block's own lines are checked against the manifests.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let block = readme_block("kubernetes");
    let words: Vec<&str> = block.split_whitespace().collect();
    let after = |flag: &str| -> Vec<String> {
        words
            .windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].to_owned())
            .collect()
    };
    let applied = after("-f");
    assert_eq!(
        applied,
        [
            "deploy/kubernetes/herald-server.yaml",
            "deploy/kubernetes/herald-agent.yaml"
        ]
    );
    // What the block creates by hand.
    let mut made: Vec<String> = words
        .windows(3)
        .filter(|w| {
            (w[0] == "create" && w[1] == "configmap") || (w[0] == "secret" && w[1] == "generic")
        })
        .map(|w| w[2].to_owned())
        .collect();
    made.extend(after("namespace"));
    assert!(made.contains(&"herald-kek".to_owned()), "{made:?}");

    let mut docs = Vec::new();
    for file in &applied {
        docs.extend(manifest_docs(&repo.join(file)));
    }
    let named = |kind: &str, name: &str| {
        docs.iter()
            .any(|d| d["kind"] == kind && d["metadata"]["name"] == name)
    };
    // Every ConfigMap and Secret the workloads mount or read is in the
    // manifests or made by the block.
    let mut wanted = Vec::new();
    for d in &docs {
        let spec = &d["spec"]["template"]["spec"];
        for v in spec["volumes"].as_array().into_iter().flatten() {
            if let Some(name) = v["configMap"]["name"].as_str()
                && v["configMap"]["optional"] != true
            {
                wanted.push(("ConfigMap", name.to_owned()));
            }
        }
        let containers = spec["containers"].as_array().into_iter().flatten();
        let inits = spec["initContainers"].as_array().into_iter().flatten();
        for c in containers.chain(inits) {
            for e in c["env"].as_array().into_iter().flatten() {
                if let Some(name) = e["valueFrom"]["secretKeyRef"]["name"].as_str() {
                    wanted.push(("Secret", name.to_owned()));
                }
            }
            // The herald image is distroless: no shell to run.
            if c["command"][0] == "/bin/sh" {
                assert!(
                    !c["image"].as_str().unwrap().contains("herald"),
                    "{c:?} runs a shell in the distroless herald image"
                );
            }
        }
    }
    for (kind, name) in &wanted {
        assert!(
            named(kind, name) || made.contains(name),
            "{kind} {name} is neither in the manifests nor made by the block"
        );
    }
    // The policies ConfigMap the block makes is the one the server mounts.
    assert!(made.contains(&"herald-policies".to_owned()), "{made:?}");
    assert!(made.contains(&"herald-bundle".to_owned()), "{made:?}");
    // What the block waits on and forwards exists, with that port.
    assert!(named("Deployment", "herald"));
    assert!(named("DaemonSet", "herald-agent"));
    assert!(block.contains("rollout status deployment/herald\n"));
    assert!(block.contains("rollout status daemonset/herald-agent\n"));
    let service = docs
        .iter()
        .find(|d| d["kind"] == "Service" && d["metadata"]["name"] == "herald")
        .unwrap();
    assert!(
        service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == 8080)
    );
    assert!(block.contains("port-forward service/herald 8080:8080"));
    // The configurations they embed are valid.
    let mut trust_domain = None;
    for d in &docs {
        if let Some(text) = d["data"]["herald.toml"].as_str() {
            let cfg = herald_server::ServerConfig::from_toml(text).unwrap();
            cfg.validate().unwrap();
            trust_domain = Some(cfg.trust_domain.to_string());
        }
        if let Some(text) = d["data"]["agent.toml"].as_str() {
            let cfg = herald_agent::AgentConfig::parse(text).unwrap();
            assert!(cfg.workload_api.unwrap().kubernetes.is_some());
        }
    }

    // The node policy, beside the EK roots it names (the example swtpm CA
    // standing in for a vendor's), validates, and serves pods by k8s selectors.
    let policies = tempfile::tempdir().unwrap();
    let text = readme_block("kubernetes-policy");
    std::fs::write(policies.path().join("nodes.yaml"), &text).unwrap();
    for (from, to) in [
        ("example-swtpm-root.pem", "ek-root.pem"),
        ("example-swtpm-intermediate.pem", "ek-intermediate.pem"),
    ] {
        std::fs::copy(
            repo.join("attestation-policies/tpm-roots").join(from),
            policies.path().join(to),
        )
        .unwrap();
    }
    // ... for the trust domain of the server the block deploys.
    let trust_domain = trust_domain.expect("the server manifest embeds herald.toml");
    let out = Command::new(herald_bin())
        .args(["policy", "check"])
        .arg(policies.path())
        .args(["--trust-domain", &trust_domain])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let policy: Value = serde_yaml_ng::from_str(&text).unwrap();
    let workloads = policy["workloads"].as_array().unwrap();
    assert!(!workloads.is_empty());
    for w in workloads {
        for s in w["selectors"].as_array().unwrap() {
            assert!(s.as_str().unwrap().starts_with("k8s:"), "{s}");
        }
    }
}
