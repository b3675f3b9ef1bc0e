//! Harness for end-to-end tests: runs the real `herald` binary.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod aws;
pub mod kubelet;
pub mod node;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const TRUST_DOMAIN: &str = "e2e.herald.test";
/// A fixed test KEK (tests need it to reach into the CA like an attacker or operator would).
pub const KEK_HEX: &str = "4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b4b";

/// The join-token policy every test site gets unless it brings its own
/// `[policy]`: bootstrap and break-glass tokens mint anywhere in the test
/// trust domain (node identities included: the workload service, not this
/// policy, is what keeps a minted SVID from acting as a node).
pub const BOOTSTRAP_POLICY: &str = "name: e2e-bootstrap
description: join tokens mint SVIDs in the test trust domain
evidence:
  join_token: { purposes: [bootstrap, break_glass] }
spiffe_id:
  prefix: spiffe://e2e.herald.test/
grants:
  x509_svid: { max_ttl: 24h, max_lineage_age: 1h }
tests:
  - name: a bootstrap token mints its own identity
    evidence: { join_token: { spiffe_id: spiffe://e2e.herald.test/svc } }
    expect: { allow: true, spiffe_id: spiffe://e2e.herald.test/svc }
  - name: a second-factor token mints nothing
    evidence: { join_token: { spiffe_id: spiffe://e2e.herald.test/svc, purpose: second_factor, policies: [x] } }
    expect: { allow: false, code: policy_denied }
";

/// Writes [`BOOTSTRAP_POLICY`] into a policy directory.
pub fn write_bootstrap_policy(dir: &Path) {
    std::fs::write(dir.join("e2e-bootstrap.yaml"), BOOTSTRAP_POLICY).unwrap();
}

/// The certificates (DER) of a PEM file: a bundle, an SVID chain.
pub fn pem_file_certs(path: &Path) -> Vec<Vec<u8>> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    herald_client::files::from_pem("CERTIFICATE", &text).unwrap()
}

pub fn herald_bin() -> &'static str {
    env!("CARGO_BIN_EXE_herald")
}

/// A server's data directory and configuration file.
pub struct Site {
    pub dir: tempfile::TempDir,
}

impl Site {
    pub fn new() -> Self {
        Self::with_extra("")
    }

    /// `extra` is appended to the TOML (e.g. an `[svid]` section). Without
    /// a `[policy]` section in it, the site gets a policy directory holding
    /// [`BOOTSTRAP_POLICY`].
    pub fn with_extra(extra: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let kek = dir.path().join("kek");
        std::fs::write(&kek, KEK_HEX).unwrap();
        std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
        let data = dir.path().join("data");
        let mut extra = extra.to_owned();
        if !extra.contains("[policy]") {
            let policies = dir.path().join("policies");
            std::fs::create_dir(&policies).unwrap();
            write_bootstrap_policy(&policies);
            extra.push_str(&format!("\n[policy]\ndir = \"{}\"\n", policies.display()));
        }
        let cfg = format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{}\"\n[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\nhttps = \"127.0.0.1:0\"\n[ca]\nkey_encryption_key_file = \"{}\"\n{extra}\n",
            data.display(),
            kek.display()
        );
        std::fs::write(dir.path().join("herald.toml"), cfg).unwrap();
        Self { dir }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("herald.toml")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn db_url(&self) -> String {
        format!("sqlite://{}", self.data_dir().join("herald.db").display())
    }

    pub fn bundle_pem(&self) -> PathBuf {
        self.data_dir().join("bundle.pem")
    }

    pub fn start(&self) -> Server {
        Server::start(&self.config())
    }

    /// Runs `herald <args>` with this site's config in the environment.
    pub fn herald(&self, args: &[&str]) -> Output {
        Command::new(herald_bin())
            .args(args)
            .env("HERALD_CONFIG", self.config())
            .env_remove("HERALD_KEK")
            .output()
            .unwrap()
    }

    /// `herald svid mint` against `server` into `out`, with this site's bundle.
    pub fn mint(&self, server: &Server, token: &str, out: &Path) -> Output {
        self.herald(&[
            "svid",
            "mint",
            "--join-token",
            token,
            "--server",
            &server.url(),
            "--bundle",
            self.bundle_pem().to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ])
    }

    /// `herald token create` (a bootstrap token), returning the token.
    pub fn token(&self, spiffe_id: &str) -> String {
        self.token_with(spiffe_id, &[])
    }

    /// `herald token create` with extra arguments (`--purpose`, `--policy`,
    /// `--break-glass`, `--ttl`), returning the token.
    pub fn token_with(&self, spiffe_id: &str, args: &[&str]) -> String {
        let mut all = vec!["token", "create", "--spiffe-id", spiffe_id];
        if !args.contains(&"--ttl") {
            all.extend(["--ttl", "10m"]);
        }
        all.extend_from_slice(args);
        let out = self.herald(&all);
        assert!(
            out.status.success(),
            "token create failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    }
}

struct ChildGuard(Option<Child>);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A running `herald server`; killed on drop.
pub struct Server {
    pub child: Child,
    pub grpc: SocketAddr,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    pub startup_line: String,
    /// Everything the server printed on stdout up to and including `listening …`.
    pub banner: String,
}

impl Server {
    pub fn start(config: &Path) -> Server {
        Self::start_with_env(config, &[])
    }

    /// Starts the server with extra environment variables.
    pub fn start_with_env(config: &Path, env: &[(&str, String)]) -> Server {
        let mut child = Command::new(herald_bin())
            .args(["server", "--config"])
            .arg(config)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .env("HERALD_LOG", "warn")
            .env_remove("HERALD_KEK")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        // Until the server is handed over, a failed assertion must not leave it running.
        let mut guard = ChildGuard(Some(child));
        let mut reader = BufReader::new(stdout);
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut first = String::new();
        let mut banner = String::new();
        loop {
            let mut line = String::new();
            let n = reader.read_line(&mut line).unwrap();
            assert!(n > 0, "herald server exited before it was ready");
            if first.is_empty() {
                first = line.clone();
            }
            banner.push_str(&line);
            if let Some(rest) = line.trim().strip_prefix("listening ") {
                let mut grpc = None;
                let mut http = None;
                let mut https = None;
                for kv in rest.split_whitespace() {
                    match kv.split_once('=') {
                        Some(("grpc", v)) => grpc = Some(v.parse().unwrap()),
                        Some(("http", v)) => http = Some(v.parse().unwrap()),
                        Some(("https", v)) => https = Some(v.parse().unwrap()),
                        _ => {}
                    }
                }
                // Keep draining stdout so the server never blocks on a full pipe.
                std::thread::spawn(move || for _ in reader.lines() {});
                return Server {
                    child: guard.0.take().unwrap(),
                    grpc: grpc.unwrap(),
                    http: http.unwrap(),
                    https,
                    startup_line: first,
                    banner,
                };
            }
            assert!(Instant::now() < deadline, "server not ready in time");
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.grpc)
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let status = self.child.wait().unwrap();
        assert!(status.success(), "server exited with {status}");
    }

    /// Plain HTTP GET on the server's HTTP listener; returns (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        self.http_request(&format!(
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        ))
    }

    /// Plain HTTP POST of a form on the server's HTTP listener, with an
    /// optional bearer token; returns (status, body).
    pub fn http_post_form(&self, path: &str, bearer: Option<&str>, form: &str) -> (u16, String) {
        let auth = bearer
            .map(|b| format!("Authorization: Bearer {b}\r\n"))
            .unwrap_or_default();
        self.http_request(&format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{form}",
            form.len()
        ))
    }

    /// Sends `request` as is on a fresh connection to the HTTP listener;
    /// returns (status, body).
    fn http_request(&self, request: &str) -> (u16, String) {
        raw_http(self.http, request)
    }
}

/// Sends `request` as is on a fresh connection to `addr`; returns
/// (status, body).
pub fn raw_http(addr: SocketAddr, request: &str) -> (u16, String) {
    let (status, _, body) = raw_http_bytes(addr, request.as_bytes());
    (status, body)
}

/// A raw HTTP exchange on a fresh connection, for requests no HTTP client
/// would send: (status, head in lowercase, body). Status 0 when the answer
/// is not HTTP.
pub fn raw_http_bytes(addr: SocketAddr, request: &[u8]) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(request).unwrap();
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    parse_http_response(&resp)
}

/// An HTTP response as read: (status, head in lowercase, body). Status 0
/// when it is not HTTP.
pub fn parse_http_response(resp: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(resp).into_owned();
    let status = text.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a command succeeded, printing its output if not.
pub fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "command failed\nstdout: {}\nstderr: {}",
        stdout(&o),
        stderr(&o)
    );
    o
}

/// Checks a required external tool is installed; fails loudly (never skips) when it is not.
pub fn require_tool(name: &str) {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is required by this test (install it: see .ci/run)"
    );
}

/// The PostgreSQL the tests use: `HERALD_TEST_PG_URL`, by default the
/// machine's own (`scripts/ensure-postgres.sh` starts it).
pub fn pg_base_url() -> String {
    std::env::var("HERALD_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Runs a future on a runtime of its own, on a thread of its own: usable
/// from sync tests, async tests and `Drop` alike.
fn block_on<T: Send + 'static>(f: impl std::future::Future<Output = T> + Send + 'static) -> T {
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .join()
    .unwrap()
}

/// A PostgreSQL schema of this test's own (so runs never collide); dropped
/// when the test passes, kept for inspection when it fails.
pub struct PgSchema {
    base: String,
    name: String,
    /// A URL whose connections use the schema.
    pub url: String,
}

impl PgSchema {
    pub fn new(tag: &str) -> PgSchema {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let base = pg_base_url();
        let name = format!(
            "herald_e2e_{}_{}_{tag}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let (b, n) = (base.clone(), name.clone());
        let url = block_on(
            async move { herald_store::Store::create_postgres_schema(&b, &n).await },
        )
        .unwrap_or_else(|e| {
            panic!("PostgreSQL at {base} (HERALD_TEST_PG_URL; see scripts/ensure-postgres.sh): {e}")
        });
        PgSchema { base, name, url }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("keeping PostgreSQL schema {} for inspection", self.name);
            return;
        }
        let (b, n) = (self.base.clone(), self.name.clone());
        let _ = block_on(async move { herald_store::Store::drop_postgres_schema(&b, &n).await });
    }
}

/// Points a server configuration file at `database_url` (a top-level key,
/// so it goes before the first section).
pub fn set_database_url(config: &Path, database_url: &str) {
    let text = std::fs::read_to_string(config).unwrap();
    let at = text.find("\n[").unwrap();
    let text = format!(
        "{}\ndatabase_url = \"{database_url}\"{}",
        &text[..at],
        &text[at..]
    );
    std::fs::write(config, text).unwrap();
}

/// Adds `lines` (TOML keys, each ending in a newline) to the `[section]`
/// table of a server configuration file.
pub fn extend_section(config: &Path, section: &str, lines: &str) {
    let header = format!("[{section}]\n");
    let text = std::fs::read_to_string(config).unwrap();
    assert!(
        text.contains(&header),
        "no [{section}] table in {}",
        config.display()
    );
    std::fs::write(
        config,
        text.replacen(&header, &format!("{header}{lines}"), 1),
    )
    .unwrap();
}

/// Whether `chain` verifies as an X.509 SVID against `anchors`.
pub fn verifies(chain: &[Vec<u8>], anchors: &[Vec<u8>]) -> Result<(), String> {
    use rustls_pki_types::{CertificateDer, UnixTime};
    let anchors: Vec<_> = anchors
        .iter()
        .map(|a| {
            webpki::anchor_from_trusted_cert(&CertificateDer::from(a.as_slice()))
                .map(|t| t.to_owned())
                .map_err(|e| format!("{e:?}"))
        })
        .collect::<Result<_, _>>()?;
    let ee = CertificateDer::from(chain[0].as_slice());
    let ee = webpki::EndEntityCert::try_from(&ee).map_err(|e| format!("{e:?}"))?;
    let inters: Vec<_> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &anchors,
        &inters,
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| format!("{e:?}"))
}

/// Asserts a refusal carries `code` and that the newest audit record for
/// `action` says so (denied, with that reason).
pub async fn assert_refused<T: std::fmt::Debug>(
    store: &herald_store::Store,
    r: Result<T, herald_client::ClientError>,
    code: herald_core::ErrorCode,
    action: &str,
) {
    let err = r.expect_err("request should have been refused");
    assert_eq!(err.code(), Some(code), "wrong code: {err}");
    let records = store.audit_records(0, 100_000).await.unwrap();
    let last = records
        .iter()
        .rev()
        .find(|r| r.event.action == action)
        .unwrap_or_else(|| panic!("no audit record for {action}"));
    assert_eq!(
        last.event.reason,
        Some(code),
        "audit record: {:?}",
        last.event
    );
    assert_eq!(last.event.outcome, herald_core::Outcome::Denied);
}
