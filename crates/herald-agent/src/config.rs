//! `agent.toml`: where the servers are, how to trust them, which TPM, where
//! to keep state, and how to pace rotation. Every key is documented in
//! `deploy/agent.example.toml`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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

/// The agent's configuration.
#[derive(Debug, Clone, Deserialize)]
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
    #[serde(default)]
    pub server_spiffe_id: Option<String>,
    /// File holding a join token for the first attestation, when the node
    /// policy requires one (also `HERALD_AGENT_JOIN_TOKEN`).
    #[serde(default)]
    pub join_token_file: Option<PathBuf>,
    /// The TPM.
    #[serde(default)]
    pub tpm: TpmConfig,
    /// Rotation pacing.
    #[serde(default)]
    pub rotation: RotationConfig,
    /// The SPIFFE Workload API for local workloads; off when absent.
    #[serde(default)]
    pub workload_api: Option<WorkloadApiConfig>,
    /// The ECS-style container-credentials endpoint; off when absent.
    #[serde(default)]
    pub credentials_endpoint: Option<CredentialsEndpointConfig>,
}

/// An ECS-style container-credentials endpoint on loopback: AWS SDKs find
/// it through `AWS_CONTAINER_CREDENTIALS_FULL_URI=http://<listen>/v1/credentials`
/// (and `AWS_CONTAINER_AUTHORIZATION_TOKEN`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CredentialsEndpointConfig {
    /// Loopback address to listen on.
    pub listen: std::net::SocketAddr,
    /// File holding the token callers must send in `Authorization`; when
    /// absent, no token is required (the caller's uid still decides).
    #[serde(default)]
    pub authorization_token_file: Option<PathBuf>,
}

/// The Workload API endpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadApiConfig {
    /// Unix socket path; workloads find it through `SPIFFE_ENDPOINT_SOCKET=unix://<path>`.
    pub socket: PathBuf,
}

/// Which TPM.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

impl AgentConfig {
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

    /// Where the node SVID lives.
    pub fn svid_dir(&self) -> PathBuf {
        self.data_dir.join("node")
    }

    /// The status file `herald agent status` reads.
    pub fn status_path(&self) -> PathBuf {
        self.data_dir.join("status.json")
    }
}
