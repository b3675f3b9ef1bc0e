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

#[test]
fn the_readme_ci_exchange_quickstart_runs_as_written() {
    require_tool("bash");
    let server = DevServer::start();
    // The quickstart runs from the repository root, where .herald-dev is
    // the dev server's data directory: a scratch root with that link.
    let work = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(server.data.path(), work.path().join(".herald-dev")).unwrap();
    let bin_dir = Path::new(herald_bin()).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &readme_block("ci-exchange")])
        .current_dir(work.path())
        .env("PATH", path)
        .env("HERALD_SERVER", format!("https://{}", server.addr("grpc")))
        .env("HERALD_DATA_DIR", server.data.path())
        .env_remove("HERALD_CONFIG")
        .output()
        .unwrap();
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
    let bin_dir = Path::new(herald_bin()).parent().unwrap();
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap());
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
