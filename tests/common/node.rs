//! A server site with a TPM node policy, for agent and Workload API tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use herald_agent::AgentStatus;

use herald_test_tpm::SoftTpm;

use super::{KEK_HEX, Server, TRUST_DOMAIN, herald_bin};

const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A free loopback port (the server must come back on the same one).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server site whose node policy trusts `tpms`' EK roots.
pub struct NodeSite {
    pub dir: tempfile::TempDir,
    pub grpc_port: u16,
}

impl NodeSite {
    pub fn new(tpms: &[&SoftTpm], ttl: &str, template: &str, extra: &str) -> NodeSite {
        Self::with_workloads(tpms, ttl, template, extra, "")
    }

    /// As `new`, with a `workloads:` section appended to the node policy.
    pub fn with_workloads(
        tpms: &[&SoftTpm],
        ttl: &str,
        template: &str,
        extra: &str,
        workloads: &str,
    ) -> NodeSite {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let kek = dir.path().join("kek");
        std::fs::write(&kek, KEK_HEX).unwrap();
        std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        let (mut roots, mut inters) = (Vec::new(), Vec::new());
        for (i, t) in tpms.iter().enumerate() {
            std::fs::copy(t.ek_root_pem_path(), policies.join(format!("root{i}.pem"))).unwrap();
            std::fs::copy(
                t.ek_intermediate_pem_path(),
                policies.join(format!("inter{i}.pem")),
            )
            .unwrap();
            roots.push(format!("root{i}.pem"));
            inters.push(format!("inter{i}.pem"));
        }
        let policy = format!(
            "name: nodes\nevidence:\n  tpm:\n    ek_roots: [{}]\n    ek_intermediates: [{}]\n    pcrs: [0, 1, 2, 7]\n    golden:\n      - {{ name: pristine, pcrs: {{ 0: \"{ZERO}\", 7: \"{ZERO}\" }} }}\nspiffe_id:\n  prefix: spiffe://{TRUST_DOMAIN}/node/\n  template: \"{template}\"\ngrants:\n  x509_svid: {{ max_ttl: {ttl} }}\n",
            roots.join(", "),
            inters.join(", ")
        );
        std::fs::write(policies.join("nodes.yaml"), format!("{policy}{workloads}")).unwrap();
        let grpc_port = free_port();
        let cfg = format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{}\"\n[listen]\ngrpc = \"127.0.0.1:{grpc_port}\"\nhttp = \"127.0.0.1:0\"\n[ca]\nkey_encryption_key_file = \"{}\"\n[policy]\ndir = \"{}\"\n{extra}\n",
            dir.path().join("data").display(),
            kek.display(),
            policies.display(),
        );
        std::fs::write(dir.path().join("herald.toml"), cfg).unwrap();
        NodeSite { dir, grpc_port }
    }

    pub fn config(&self) -> PathBuf {
        self.dir.path().join("herald.toml")
    }

    pub fn start(&self) -> Server {
        Server::start(&self.config())
    }

    pub fn herald(&self, args: &[&str]) -> std::process::Output {
        Command::new(herald_bin())
            .args(args)
            .env("HERALD_CONFIG", self.config())
            .output()
            .unwrap()
    }

    /// An agent configuration for `tpm` against this site.
    pub fn agent_config(&self, tpm: &SoftTpm, agent_dir: &Path) -> PathBuf {
        std::fs::create_dir_all(agent_dir).unwrap();
        std::fs::copy(
            self.dir.path().join("data/bundle.pem"),
            agent_dir.join("bundle.pem"),
        )
        .unwrap();
        let cfg = format!(
            "servers = [\"https://127.0.0.1:{}\"]\ntrust_bundle = \"{}\"\ndata_dir = \"{}\"\n[tpm]\ntcti = \"{}\"\n[rotation]\nbackoff_min = \"200ms\"\nbackoff_max = \"1s\"\n",
            self.grpc_port,
            agent_dir.join("bundle.pem").display(),
            agent_dir.join("state").display(),
            tpm.tcti(),
        );
        let path = agent_dir.join("agent.toml");
        std::fs::write(&path, cfg).unwrap();
        path
    }
}

/// A running `herald agent`; killed on drop.
pub struct Agent(pub Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn start_agent(config: &Path) -> Agent {
    Agent(
        Command::new(herald_bin())
            .args(["agent", "--config"])
            .arg(config)
            .env("HERALD_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

/// Polls the agent's status file until `pred` holds (or fails after `secs`).
pub fn wait_status(
    dir: &Path,
    secs: u64,
    what: &str,
    pred: impl Fn(&AgentStatus) -> bool,
) -> AgentStatus {
    let path = dir.join("state/status.json");
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(s) = AgentStatus::read(&path) {
            if pred(&s) {
                return s;
            }
            last = Some(s);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("agent status never reached: {what}; last: {last:#?}");
}

/// A raw Workload API client on `socket` (every call must add the header).
pub async fn raw_client(
    socket: &Path,
) -> herald_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<
    tonic::transport::Channel,
> {
    let socket = socket.to_path_buf();
    let channel = tonic::transport::Endpoint::from_static("http://x")
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .unwrap();
    herald_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel)
}

pub fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    req
}

/// The SPIFFE IDs of the first X509-SVID response on `socket`, or the refusal.
pub async fn x509_ids(socket: &Path) -> Result<Vec<String>, tonic::Status> {
    let mut stream = raw_client(socket)
        .await
        .fetch_x509svid(with_header(herald_proto::workload::X509svidRequest {}))
        .await?
        .into_inner();
    let first = stream.message().await?.expect("a first response");
    let mut ids: Vec<String> = first.svids.into_iter().map(|s| s.spiffe_id).collect();
    ids.sort();
    Ok(ids)
}

/// Runs `tests/python/exec_after_connect.py` (connect to `agent_socket`,
/// relay the connection at `relay`, then act as `target` says) and waits
/// for its "ready <pid>": the child and the pid the agent pinned.
pub fn exec_after_connect(agent_socket: &Path, relay: &Path, target: &str) -> (Child, u32) {
    use std::io::BufRead;
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/exec_after_connect.py"
    );
    let mut child = Command::new("python3")
        .arg(script)
        .arg(agent_socket)
        .arg(relay)
        .arg(target)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let pid: u32 = line
        .strip_prefix("ready ")
        .unwrap_or_else(|| panic!("helper said {line:?}"))
        .trim()
        .parse()
        .unwrap();
    (child, pid)
}

/// Moves the registry's recorded TPM reset counter of every node 100 ahead
/// in the SQLite datastore at `db`: the TPM's next quote then looks like a
/// rolled-back (replayed or cloned) TPM state.
pub async fn advance_registry_reset_counts(db: &Path) {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("UPDATE nodes SET reset_count = reset_count + 100")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
}
