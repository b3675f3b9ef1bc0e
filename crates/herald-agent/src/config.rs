//! `agent.toml`: where the servers are, how to trust them, which TPM, where
//! to keep state, and how to pace rotation. Every key is documented in
//! `deploy/agent.example.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Errors reading the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Keys without a default: every `agent.toml` sets them.
pub const REQUIRED_KEYS: &[&str] = &["servers", "trust_bundle", "data_dir"];

/// Keys without a default inside a table that is itself optional: set
/// whenever the table is.
pub const REQUIRED_IN_TABLES: &[&str] = &[
    "workload_api.socket",
    "credentials_endpoint.listen",
    "credentials_endpoint.authorization_token_file",
];

/// Keys and tables that are unset (the feature off, or derived) unless a
/// file gives them; `herald config defaults --agent` and
/// `deploy/agent.example.toml` show each commented out.
pub const UNSET_BY_DEFAULT: &[&str] = &[
    "server_spiffe_id",
    "join_token_file",
    "workload_api",
    "workload_api.kubernetes",
    "workload_api.kubernetes.kubelet_server_name",
    "workload_api.kubernetes.node_name",
    "credentials_endpoint",
    "attestation.platform_token_file",
];

/// The optional tables, each at its defaults, the keys they require given
/// placeholders: parsed rather than built, so these are exactly the
/// defaults the agent applies to a file.
const EVERY_TABLE: &str = r#"servers = ["https://herald.example.org:8443"]
trust_bundle = "/var/lib/herald-agent/bundle.pem"
data_dir = "/var/lib/herald-agent"
[workload_api]
socket = "/run/herald/agent.sock"
[workload_api.kubernetes]
[credentials_endpoint]
listen = "127.0.0.1:8790"
authorization_token_file = "/etc/herald/ecs-token"
"#;

/// The agent's configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Server gRPC addresses (`https://host:port`), tried in order; the
    /// agent moves to the next on failure.
    pub servers: Vec<String>,
    /// PEM file with the trust anchors for the servers' TLS certificates
    /// (the Herald trust bundle); replaced by each newer bundle received.
    pub trust_bundle: PathBuf,
    /// Directory for the AK blobs, the node SVID and the status file.
    pub data_dir: PathBuf,
    /// The SPIFFE ID the servers' certificates must carry, besides chaining
    /// to the trust bundle and matching the host name: a full ID, or a
    /// trust domain meaning its `spiffe://<td>/herald/server`. When absent:
    /// the node SVID's trust domain once the node has one, before that the
    /// trust domain the bundle's CA certificates name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_spiffe_id: Option<String>,
    /// File holding a join token for the first attestation, when the node
    /// policy requires one (also `HERALD_AGENT_JOIN_TOKEN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub join_token_file: Option<PathBuf>,
    /// Threads running the agent's async work (the `herald-agent`
    /// executable; `herald agent` shares its process's runtime). One by
    /// default: a Workload API fetch is tens of microseconds, and a second
    /// worker costs more in hand-offs between the two than it adds
    /// (`docs/performance.md`, "Fewer system calls, one worker, …"). The
    /// TPM, hashing and `/proc` waits run on threads of their own either
    /// way.
    #[serde(default = "default_worker_threads")]
    pub worker_threads: usize,
    /// The TPM.
    #[serde(default)]
    pub tpm: TpmConfig,
    /// How the node proves itself: a TPM (the default), a platform token,
    /// or an AWS instance identity document.
    #[serde(default)]
    pub attestation: AttestationConfig,
    /// Rotation pacing.
    #[serde(default)]
    pub rotation: RotationConfig,
    /// The SPIFFE Workload API for local workloads; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_api: Option<WorkloadApiConfig>,
    /// The ECS-style container-credentials endpoint; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_endpoint: Option<CredentialsEndpointConfig>,
}

fn default_worker_threads() -> usize {
    1
}

/// Most worker threads an `agent.toml` may ask for.
pub const MAX_WORKER_THREADS: usize = 256;

/// An ECS-style container-credentials endpoint on loopback: AWS SDKs find
/// it through `AWS_CONTAINER_CREDENTIALS_FULL_URI=http://<listen>/v1/credentials`
/// (and `AWS_CONTAINER_AUTHORIZATION_TOKEN`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsEndpointConfig {
    /// Loopback address to listen on.
    pub listen: std::net::SocketAddr,
    /// File holding the token callers must send in `Authorization`
    /// (required, at least [`MIN_TOKEN_LEN`] characters): loopback is
    /// reachable from a browser, and the token is what a web page cannot
    /// know.
    pub authorization_token_file: PathBuf,
    /// Requests per caller (uid).
    #[serde(default = "RateLimitConfig::credentials_endpoint")]
    pub rate_limit: RateLimitConfig,
}

/// Shortest authorization token the credentials endpoint starts with.
pub const MIN_TOKEN_LEN: usize = 16;

/// The Workload API endpoint.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadApiConfig {
    /// Unix socket path; workloads find it through `SPIFFE_ENDPOINT_SOCKET=unix://<path>`.
    pub socket: PathBuf,
    /// Largest executable the agent hashes for `unix:sha256` selectors
    /// (`"512MiB"`; bytes, or KiB/MiB/GiB). A caller whose executable is
    /// larger is refused rather than stalling the agent.
    #[serde(
        default = "default_max_executable_size",
        deserialize_with = "deserialize_size",
        serialize_with = "serialize_size"
    )]
    pub max_executable_size: u64,
    /// Calls per caller (uid).
    #[serde(default = "RateLimitConfig::workload_api")]
    pub rate_limit: RateLimitConfig,
    /// Kubernetes workload attestation (`k8s:*` selectors from the
    /// kubelet's pod list); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubernetes: Option<KubernetesConfig>,
}

/// `[workload_api.kubernetes]`: where the kubelet is and how the agent
/// authenticates to it and trusts it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesConfig {
    /// The kubelet's HTTPS endpoint (its `/pods` is read), default
    /// `https://127.0.0.1:10250` (the agent on the host network).
    #[serde(default = "default_kubelet_url")]
    pub kubelet_url: String,
    /// The name the kubelet's serving certificate is verified for when it
    /// does not name the URL's address (kubelet certificates name the
    /// node, rarely 127.0.0.1): the agent dials the URL's IP address and
    /// checks this name. `"{node_name}"` stands for the node's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubelet_server_name: Option<String>,
    /// The agent's service-account token, sent as a bearer token; read
    /// for every fetch (the kubelet rotates it), never logged.
    #[serde(default = "default_token_path")]
    pub token_path: PathBuf,
    /// PEM CA the kubelet's serving certificate must chain to (and name
    /// the URL's host).
    #[serde(default = "default_kubelet_ca_path")]
    pub kubelet_ca_path: PathBuf,
    /// Accept any kubelet certificate: only when it cannot be verified
    /// (self-signed kubelet certificates); must be set explicitly.
    #[serde(default)]
    pub skip_kubelet_verification: bool,
    /// This node's name: pods the kubelet places elsewhere are ignored.
    /// When absent, `HERALD_NODE_NAME` (the downward API's `spec.nodeName`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// How long a fetched pod list answers lookups.
    #[serde(default = "default_cache_ttl", with = "humantime_serde_compat")]
    pub cache_ttl: Duration,
    /// Pause between fetches while a caller's container is not listed yet.
    #[serde(default = "default_retry_interval", with = "humantime_serde_compat")]
    pub retry_interval: Duration,
    /// Fresh lists looked in before a caller is refused
    /// (`kubernetes_workload_not_found`).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Connect and request timeout for the kubelet.
    #[serde(default = "default_kubelet_timeout", with = "humantime_serde_compat")]
    pub timeout: Duration,
    /// Test builds only (the `test-hooks` feature): read callers' cgroup
    /// files from `<test_proc_root>/<pid>/cgroup`, so a test process can
    /// stand for a container. Production builds refuse the key.
    #[cfg(feature = "test-hooks")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_proc_root: Option<PathBuf>,
}

fn default_kubelet_url() -> String {
    "https://127.0.0.1:10250".into()
}
fn default_token_path() -> PathBuf {
    "/var/run/secrets/kubernetes.io/serviceaccount/token".into()
}
fn default_kubelet_ca_path() -> PathBuf {
    "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt".into()
}
fn default_cache_ttl() -> Duration {
    Duration::from_secs(1)
}
fn default_retry_interval() -> Duration {
    Duration::from_millis(250)
}
fn default_max_attempts() -> u32 {
    20
}
fn default_kubelet_timeout() -> Duration {
    Duration::from_secs(5)
}

fn default_max_executable_size() -> u64 {
    512 << 20
}

/// A token bucket per caller: `per_second` sustained, `burst` at once;
/// `per_second = 0` turns limiting off.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per second, sustained.
    pub per_second: f64,
    /// Requests at once.
    pub burst: u32,
}

impl RateLimitConfig {
    /// Workload API default: streams are long-lived, so a well-behaved
    /// workload opens a handful of calls a minute; this leaves room for
    /// every process of a uid starting at once.
    pub fn workload_api() -> Self {
        Self {
            per_second: 50.0,
            burst: 200,
        }
    }

    /// Credentials endpoint default: SDKs cache credentials until near
    /// expiry.
    pub fn credentials_endpoint() -> Self {
        Self {
            per_second: 10.0,
            burst: 40,
        }
    }
}

/// Parses `"512MiB"`, `"64KiB"`, `"1GiB"` or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("size {text:?}: expected a number of bytes, KiB, MiB or GiB"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        other => {
            return Err(format!(
                "size {text:?}: unknown unit {other:?} (B, KiB, MiB, GiB)"
            ));
        }
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

/// Writes a size as people write it: the largest binary unit that divides
/// it exactly (`"512MiB"`), else bytes.
fn serialize_size<S: serde::Serializer>(n: &u64, s: S) -> Result<S::Ok, S::Error> {
    for (shift, unit) in [(30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if *n != 0 && n.is_multiple_of(1u64 << shift) {
            return s.serialize_str(&format!("{}{unit}", n >> shift));
        }
    }
    s.serialize_u64(*n)
}

fn deserialize_size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(t) => parse_size(&t).map_err(serde::de::Error::custom),
    }
}

/// The node's evidence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttestationMethod {
    /// A TPM 2.0 quote (with `platform_token_file` set: and a platform
    /// token, for a policy requiring both).
    #[default]
    Tpm,
    /// A platform OIDC token read from `platform_token_file` (a Kubernetes
    /// projected service-account token, a GCP instance-identity token).
    PlatformToken,
    /// The AWS EC2 instance identity document, read over IMDSv2.
    AwsIid,
}

/// `[attestation]`: how the node proves itself.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationConfig {
    /// `tpm` (default), `platform_token` or `aws_iid`.
    #[serde(default)]
    pub method: AttestationMethod,
    /// The platform token file, read afresh at each attestation (the
    /// kubelet rotates a projected token in place). Required for
    /// `platform_token`; with `tpm`, sent beside the quote.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform_token_file: Option<PathBuf>,
    /// The instance metadata service's base URL (tests point it at a
    /// loopback stand-in).
    #[serde(default = "default_imds_url")]
    pub imds_url: String,
    /// Timeout of each IMDS request.
    #[serde(default = "default_imds_timeout", with = "humantime_serde_compat")]
    pub imds_timeout: Duration,
}

fn default_imds_url() -> String {
    "http://169.254.169.254".into()
}

fn default_imds_timeout() -> Duration {
    Duration::from_secs(2)
}

impl Default for AttestationConfig {
    fn default() -> Self {
        Self {
            method: AttestationMethod::Tpm,
            platform_token_file: None,
            imds_url: default_imds_url(),
            imds_timeout: default_imds_timeout(),
        }
    }
}

impl AttestationConfig {
    /// The platform token, read now.
    pub fn platform_token(&self) -> Result<Option<String>, String> {
        match &self.platform_token_file {
            Some(p) => std::fs::read_to_string(p)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|e| format!("{}: {e}", p.display())),
            None => Ok(None),
        }
    }
}

/// Which TPM.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TpmConfig {
    /// tss-esapi TCTI: `device:/dev/tpmrm0` (the kernel resource manager),
    /// `swtpm:host=127.0.0.1,port=2321`, `tabrmd:`.
    #[serde(default = "default_tcti")]
    pub tcti: String,
}

fn default_tcti() -> String {
    "device:/dev/tpmrm0".into()
}

impl Default for TpmConfig {
    fn default() -> Self {
        Self {
            tcti: default_tcti(),
        }
    }
}

/// When to renew and how to back off.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// Renew when this fraction of the lifetime has passed.
    #[serde(default = "default_renew_fraction")]
    pub renew_fraction: f64,
    /// ± this fraction of the lifetime of random jitter, so a fleet never
    /// renews in lock-step.
    #[serde(default = "default_jitter_fraction")]
    pub jitter_fraction: f64,
    /// First retry delay after a failure.
    #[serde(default = "default_backoff_min", with = "humantime_serde_compat")]
    pub backoff_min: Duration,
    /// Longest retry delay.
    #[serde(default = "default_backoff_max", with = "humantime_serde_compat")]
    pub backoff_max: Duration,
}

fn default_renew_fraction() -> f64 {
    0.5
}
fn default_jitter_fraction() -> f64 {
    0.1
}
fn default_backoff_min() -> Duration {
    Duration::from_secs(1)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(60)
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            renew_fraction: default_renew_fraction(),
            jitter_fraction: default_jitter_fraction(),
            backoff_min: default_backoff_min(),
            backoff_max: default_backoff_max(),
        }
    }
}

mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        herald_core::duration::serialize(d, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

impl AgentConfig {
    /// Every key at its default, every optional table present at its
    /// defaults (the keys without one given placeholders).
    pub fn every_table_at_defaults() -> Result<AgentConfig, String> {
        Self::parse(EVERY_TABLE)
    }

    /// Every key with its real default, as TOML — what `herald config
    /// defaults --agent` prints. Serialised from what parsing gives, so it
    /// cannot drift from what the agent does; the required keys are listed
    /// in comments and the optional tables are shown commented out.
    pub fn defaults_toml() -> Result<String, String> {
        let cfg = Self::every_table_at_defaults()?;
        let body = toml::to_string(&cfg).map_err(|e| format!("serialising defaults: {e}"))?;
        let mut out = String::from(
            "# Herald agent configuration: every key with its default\n\
             # (`herald config defaults --agent`; deploy/agent.example.toml explains each).\n\
             #\n\
             # Required, no default:\n\
             #   servers = [\"https://herald.example.org:8443\"]\n\
             #   trust_bundle = \"/var/lib/herald-agent/bundle.pem\"\n\
             #   data_dir = \"/var/lib/herald-agent\"\n\
             # Off (unset) unless given: ",
        );
        out.push_str(&UNSET_BY_DEFAULT.join(", "));
        out.push_str("\n# Required when their table is given: ");
        out.push_str(&REQUIRED_IN_TABLES.join(", "));
        out.push('\n');
        let mut optional_table = false;
        for line in body.lines() {
            if let Some(header) = line.strip_prefix('[') {
                let name = header.trim_end_matches(']');
                optional_table = UNSET_BY_DEFAULT
                    .iter()
                    .any(|t| name == *t || name.starts_with(&format!("{t}.")));
            } else if REQUIRED_KEYS
                .iter()
                .any(|k| line.starts_with(&format!("{k} = ")))
            {
                continue;
            }
            if optional_table && !line.is_empty() {
                out.push_str("# ");
            }
            out.push_str(line);
            out.push('\n');
        }
        Ok(out)
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| ConfigError::Invalid {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<AgentConfig, String> {
        let cfg: AgentConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_WORKER_THREADS).contains(&self.worker_threads) {
            return Err(format!(
                "worker_threads must be from 1 to {MAX_WORKER_THREADS}, not {}",
                self.worker_threads
            ));
        }
        if self.servers.is_empty() {
            return Err("servers must name at least one server".into());
        }
        for s in &self.servers {
            if !s.starts_with("https://") {
                return Err(format!("server {s:?} must be an https:// address"));
            }
        }
        if let Some(c) = &self.credentials_endpoint
            && !c.listen.ip().is_loopback()
        {
            return Err("credentials_endpoint.listen must be a loopback address".into());
        }
        if let Some(id) = &self.server_spiffe_id {
            herald_client::ServerId::parse(id).map_err(|e| format!("server_spiffe_id: {e}"))?;
        }
        let a = &self.attestation;
        if a.method == AttestationMethod::PlatformToken && a.platform_token_file.is_none() {
            return Err(
                "attestation.method = \"platform_token\" needs attestation.platform_token_file"
                    .into(),
            );
        }
        if a.method == AttestationMethod::AwsIid
            && !(a.imds_url.starts_with("http://") || a.imds_url.starts_with("https://"))
        {
            return Err("attestation.imds_url must be an http:// or https:// URL".into());
        }
        for (name, limit) in [
            (
                "workload_api",
                self.workload_api.as_ref().map(|w| w.rate_limit),
            ),
            (
                "credentials_endpoint",
                self.credentials_endpoint.as_ref().map(|c| c.rate_limit),
            ),
        ] {
            if let Some(l) = limit
                && (!l.per_second.is_finite() || l.per_second < 0.0 || l.burst == 0)
            {
                return Err(format!(
                    "{name}.rate_limit: per_second must be >= 0 (0 = off) and burst >= 1"
                ));
            }
        }
        if let Some(w) = &self.workload_api
            && w.max_executable_size == 0
        {
            return Err("workload_api.max_executable_size must be > 0".into());
        }
        if let Some(k) = self
            .workload_api
            .as_ref()
            .and_then(|w| w.kubernetes.as_ref())
        {
            if !k.kubelet_url.starts_with("https://") {
                return Err("workload_api.kubernetes.kubelet_url must be an https:// URL".into());
            }
            if k.max_attempts == 0 || k.max_attempts > 600 {
                return Err("workload_api.kubernetes.max_attempts must be within 1..=600".into());
            }
            if k.retry_interval.is_zero() || k.timeout.is_zero() {
                return Err(
                    "workload_api.kubernetes.retry_interval and timeout must be > 0".into(),
                );
            }
        }
        if self.credentials_endpoint.is_some() && self.workload_api.is_none() {
            return Err(
                "credentials_endpoint needs [workload_api] (registrations are synced there)".into(),
            );
        }
        let r = &self.rotation;
        if !(0.1..=0.9).contains(&r.renew_fraction) {
            return Err("rotation.renew_fraction must be within 0.1..=0.9".into());
        }
        if !(0.0..=0.3).contains(&r.jitter_fraction) {
            return Err("rotation.jitter_fraction must be within 0..=0.3".into());
        }
        if r.backoff_min.is_zero() || r.backoff_max < r.backoff_min {
            return Err("rotation.backoff_min must be > 0 and <= backoff_max".into());
        }
        Ok(())
    }

    /// The join token, from `HERALD_AGENT_JOIN_TOKEN` or `join_token_file`.
    pub fn join_token(&self) -> Result<Option<String>, String> {
        if let Ok(t) = std::env::var("HERALD_AGENT_JOIN_TOKEN")
            && !t.trim().is_empty()
        {
            return Ok(Some(t.trim().to_owned()));
        }
        match &self.join_token_file {
            Some(p) => std::fs::read_to_string(p)
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|e| format!("{}: {e}", p.display())),
            None => Ok(None),
        }
    }

    /// The configured server identity pin, if any (validated at load).
    pub fn server_id(&self) -> Option<herald_client::ServerId> {
        self.server_spiffe_id
            .as_deref()
            .and_then(|s| herald_client::ServerId::parse(s).ok())
    }

    /// The credentials endpoint's token, read from its file: refused when
    /// it is shorter than [`MIN_TOKEN_LEN`] (the endpoint never runs
    /// without one).
    pub fn credentials_token(&self) -> Result<Option<zeroize::Zeroizing<String>>, String> {
        let Some(c) = &self.credentials_endpoint else {
            return Ok(None);
        };
        let p = &c.authorization_token_file;
        let text = zeroize::Zeroizing::new(
            std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?,
        );
        let token = zeroize::Zeroizing::new(text.trim().to_owned());
        if token.chars().count() < MIN_TOKEN_LEN {
            return Err(format!(
                "{}: the credentials endpoint's authorization token must be at least {MIN_TOKEN_LEN} characters",
                p.display()
            ));
        }
        Ok(Some(token))
    }

    /// Where the node SVID lives.
    pub fn svid_dir(&self) -> PathBuf {
        self.data_dir.join("node")
    }

    /// The status file `herald agent status` reads.
    pub fn status_path(&self) -> PathBuf {
        self.data_dir.join("status.json")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const BASE: &str = "servers = [\"https://h:1\"]\ntrust_bundle = \"/b\"\ndata_dir = \"/d\"\n";

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("64 KiB"), Ok(64 << 10));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "MiB", "12MB", "-1", "99999999999999GiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn worker_threads_default_to_one_and_are_bounded() {
        assert_eq!(AgentConfig::parse(BASE).unwrap().worker_threads, 1);
        let four = AgentConfig::parse(&format!("worker_threads = 4\n{BASE}")).unwrap();
        assert_eq!(four.worker_threads, 4);
        for bad in ["0", "257", "-1", "\"two\""] {
            let e = AgentConfig::parse(&format!("worker_threads = {bad}\n{BASE}"))
                .map(|c| c.worker_threads)
                .unwrap_err();
            assert!(e.contains("worker_threads"), "{bad}: {e}");
        }
    }

    #[test]
    fn workload_api_defaults_and_limits_are_checked() {
        let cfg = AgentConfig::parse(&format!("{BASE}[workload_api]\nsocket = \"/s\"\n")).unwrap();
        let w = cfg.workload_api.unwrap();
        assert_eq!(w.max_executable_size, 512 << 20);
        assert_eq!(w.rate_limit, RateLimitConfig::workload_api());
        let cfg = AgentConfig::parse(&format!(
            "{BASE}[workload_api]\nsocket = \"/s\"\nmax_executable_size = \"1MiB\"\nrate_limit = {{ per_second = 0, burst = 1 }}\n"
        ))
        .unwrap();
        assert_eq!(cfg.workload_api.unwrap().max_executable_size, 1 << 20);
        for bad in [
            "max_executable_size = 0",
            "max_executable_size = \"lots\"",
            "rate_limit = { per_second = -1, burst = 5 }",
            "rate_limit = { per_second = 5, burst = 0 }",
        ] {
            assert!(
                AgentConfig::parse(&format!("{BASE}[workload_api]\nsocket = \"/s\"\n{bad}\n"))
                    .is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn kubernetes_attestation_defaults_and_limits() {
        let cfg = AgentConfig::parse(&format!(
            "{BASE}[workload_api]\nsocket = \"/s\"\n[workload_api.kubernetes]\n"
        ))
        .unwrap();
        let k = cfg.workload_api.unwrap().kubernetes.unwrap();
        assert_eq!(k.kubelet_url, "https://127.0.0.1:10250");
        assert_eq!(
            k.token_path,
            PathBuf::from("/var/run/secrets/kubernetes.io/serviceaccount/token")
        );
        assert!(!k.skip_kubelet_verification);
        assert_eq!((k.cache_ttl, k.max_attempts), (Duration::from_secs(1), 20));
        for bad in [
            "kubelet_url = \"http://127.0.0.1:10255\"",
            "max_attempts = 0",
            "retry_interval = \"0s\"",
            "skip_kubelet_verification = \"yes\"",
            "kubelet_port = 10250",
        ] {
            assert!(
                AgentConfig::parse(&format!(
                    "{BASE}[workload_api]\nsocket = \"/s\"\n[workload_api.kubernetes]\n{bad}\n"
                ))
                .is_err(),
                "{bad}"
            );
        }
        // The test hook is no key of a production build.
        let hook = AgentConfig::parse(&format!(
            "{BASE}[workload_api]\nsocket = \"/s\"\n[workload_api.kubernetes]\ntest_proc_root = \"/tmp\"\n"
        ));
        assert_eq!(hook.is_ok(), cfg!(feature = "test-hooks"));
    }

    #[test]
    fn the_credentials_endpoint_needs_a_token_and_the_server_pin_must_parse() {
        let endpoint = "[workload_api]\nsocket = \"/s\"\n[credentials_endpoint]\nlisten = \"127.0.0.1:8790\"\n";
        let err = AgentConfig::parse(&format!("{BASE}{endpoint}")).unwrap_err();
        assert!(err.contains("authorization_token_file"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        let cfg = AgentConfig::parse(&format!(
            "{BASE}{endpoint}authorization_token_file = \"{}\"\n",
            file.display()
        ))
        .unwrap();
        assert!(cfg.credentials_token().is_err(), "a missing file");
        std::fs::write(&file, "short\n").unwrap();
        assert!(cfg.credentials_token().is_err(), "a short token");
        std::fs::write(&file, "0123456789abcdef\n").unwrap();
        assert_eq!(
            cfg.credentials_token().unwrap().unwrap().as_str(),
            "0123456789abcdef"
        );

        let pinned = AgentConfig::parse(&format!(
            "server_spiffe_id = \"spiffe://example.org/herald/server\"\n{BASE}"
        ))
        .unwrap();
        assert!(matches!(
            pinned.server_id(),
            Some(herald_client::ServerId::Exact(_))
        ));
        assert!(
            AgentConfig::parse(&format!("server_spiffe_id = \"Not A Domain\"\n{BASE}")).is_err()
        );
        assert_eq!(AgentConfig::parse(BASE).unwrap().server_id(), None);
    }
}
