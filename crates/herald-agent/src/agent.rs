//! The node identity's life: attest, keep the node SVID on disk, renew it
//! over mTLS at about half its lifetime (with jitter), re-attest when a
//! renewal is refused or the SVID has expired, back off with jitter while
//! the servers are unreachable — and meanwhile keep the valid cached SVID.
//!
//! This is the one place where the node identity is refreshed; every step
//! is reflected in `status.json`, which `herald agent status` prints.
//!
//! Continuous attestation: when the server answers a renewal with
//! `reattestation_required` (the node policy's `evidence.tpm.reattest`),
//! this and later renewals go over the attestation stream with a fresh
//! quote ([`crate::attest::reattest`]). A refused fresh quote (PCR drift,
//! counter rollback, another EK or AK) stops the workloads being served
//! ([`WorkloadCache::suspend`]) until a full attestation succeeds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_client::files::{self, SvidFiles};
use herald_client::{ClientError, ClientIdentity, HeraldClient, ServerId, keys};
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::attest::{
    AttestError, NodeEvidence, NodeSvid, attest_with_platform_token, attest_without_tpm,
    reattest_with_platform_token,
};
use crate::config::AgentConfig;
use crate::config::AttestationMethod;
use crate::tpm::TpmHandle;
use crate::workload::WorkloadCache;

/// What `status.json` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct AgentStatus {
    /// `starting`, `attesting`, `ready`, `backing_off`.
    pub state: String,
    /// The node's SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// The current node SVID's serial.
    pub serial: Option<String>,
    /// Its notAfter, Unix seconds.
    pub expires_at: Option<i64>,
    /// When the agent received it, Unix seconds.
    pub received_at: Option<i64>,
    /// When the agent will next renew (or retry), Unix seconds.
    pub next_rotation: Option<i64>,
    /// The server last used successfully.
    pub server: Option<String>,
    /// Successful attestations since start.
    pub attestations: u64,
    /// Successful renewals since start.
    pub renewals: u64,
    /// Failed attempts since start.
    pub failures: u64,
    /// The last failure, with its stable code when the server gave one.
    pub last_error: Option<String>,
    /// The stable code of the last refusal.
    pub last_error_code: Option<String>,
    /// Whether renewals carry a fresh TPM quote (the node policy requires it).
    #[serde(default)]
    pub quote_renewals: bool,
    /// Whether workloads are refused because the node's fresh quote was.
    #[serde(default)]
    pub workloads_suspended: bool,
    /// The agent's process ID.
    pub pid: u32,
}

impl AgentStatus {
    /// Reads a status file.
    pub fn read(path: &std::path::Path) -> Result<AgentStatus, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

/// Errors that stop the agent (everything else is retried).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Local state could not be written.
    #[error("{0}")]
    Local(String),
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The SVID on disk, if it is still valid.
struct Current {
    files: SvidFiles,
    spiffe_id: String,
    serial: String,
    not_before: i64,
    not_after: i64,
}

fn inspect(files: SvidFiles) -> Option<Current> {
    use x509_parser::prelude::*;
    let leaf = files.cert_chain.first()?;
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let spiffe_id = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
        })?;
    Some(Current {
        spiffe_id,
        serial: hex::encode(cert.raw_serial())
            .trim_start_matches('0')
            .to_owned(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        files,
    })
}

/// The node agent.
pub struct Agent {
    cfg: AgentConfig,
    tpm: Option<TpmHandle>,
    workloads: Option<std::sync::Arc<WorkloadCache>>,
    status: AgentStatus,
    server_index: usize,
    backoff: Duration,
}

enum Step {
    Attest,
    Renew,
}

impl Agent {
    /// An agent for `cfg`; nothing happens until [`Agent::run`].
    pub fn new(cfg: AgentConfig) -> Agent {
        let backoff = cfg.rotation.backoff_min;
        Agent {
            cfg,
            tpm: None,
            workloads: None,
            status: AgentStatus {
                state: "starting".into(),
                pid: std::process::id(),
                ..AgentStatus::default()
            },
            server_index: 0,
            backoff,
        }
    }

    /// The workload cache to suspend while the node's identity is refused.
    pub fn with_workloads(mut self, cache: Option<std::sync::Arc<WorkloadCache>>) -> Agent {
        self.workloads = cache;
        self
    }

    fn suspend_workloads(&mut self) {
        if let Some(w) = &self.workloads {
            w.suspend();
        }
        if !self.status.workloads_suspended {
            tracing::warn!(
                "the node's fresh quote was refused: workloads are not served until it attests again"
            );
        }
        self.status.workloads_suspended = true;
    }

    fn resume_workloads(&mut self) {
        if let Some(w) = &self.workloads {
            w.resume();
        }
        self.status.workloads_suspended = false;
    }

    fn write_status(&self) {
        let path = self.cfg.status_path();
        match serde_json::to_vec_pretty(&self.status) {
            Ok(bytes) => {
                if let Err(e) = files::write_atomic(&path, &bytes, 0o644) {
                    tracing::warn!(error = %e, "could not write the status file");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not encode the status"),
        }
    }

    fn current(&self) -> Option<Current> {
        let c = inspect(files::read_svid_dir(&self.cfg.svid_dir()).ok()?)?;
        (c.not_after > now_s()).then_some(c)
    }

    fn bundle(&self) -> Result<Vec<Vec<u8>>, String> {
        let text = std::fs::read_to_string(&self.cfg.trust_bundle)
            .map_err(|e| format!("{}: {e}", self.cfg.trust_bundle.display()))?;
        files::from_pem("CERTIFICATE", &text)
    }

    /// When to renew `c`: `renew_fraction` of its lifetime from when it
    /// was received, ± jitter.
    fn renew_at(&self, c: &Current) -> i64 {
        let start = match self.status.received_at {
            Some(r) if self.status.serial.as_deref() == Some(&c.serial) => r,
            _ => c.not_before,
        };
        let life = (c.not_after - start).max(1) as f64;
        let r = &self.cfg.rotation;
        let jitter = rand::rng().random_range(-r.jitter_fraction..=r.jitter_fraction);
        start + (life * (r.renew_fraction + jitter)).round() as i64
    }

    /// Runs until `shutdown` turns true.
    pub async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), AgentError> {
        std::fs::create_dir_all(&self.cfg.data_dir)
            .map_err(|e| AgentError::Local(format!("{}: {e}", self.cfg.data_dir.display())))?;
        let mut force_attest = false;
        loop {
            let current = if force_attest { None } else { self.current() };
            let step = match &current {
                None => Step::Attest,
                Some(c) => {
                    self.status.spiffe_id = Some(c.spiffe_id.clone());
                    self.status.serial = Some(c.serial.clone());
                    self.status.expires_at = Some(c.not_after);
                    let at = self.renew_at(c);
                    self.status.next_rotation = Some(at);
                    if self.status.state != "backing_off" {
                        self.status.state = "ready".into();
                    }
                    self.write_status();
                    let wait = Duration::from_secs((at - now_s()).max(0) as u64);
                    if !wait.is_zero() {
                        tokio::select! {
                            _ = tokio::time::sleep(wait) => {}
                            _ = shutdown.changed() => return Ok(()),
                        }
                    }
                    if *shutdown.borrow() {
                        return Ok(());
                    }
                    Step::Renew
                }
            };
            let outcome = match step {
                Step::Attest => self.attest_any().await,
                Step::Renew => match current {
                    Some(c) => self.renew_any(c).await,
                    None => continue,
                },
            };
            match outcome {
                Ok(()) => {
                    force_attest = false;
                    self.resume_workloads();
                    self.backoff = self.cfg.rotation.backoff_min;
                    self.status.state = "ready".into();
                    self.status.last_error = None;
                    self.status.last_error_code = None;
                    self.write_status();
                }
                Err((e, refused)) => {
                    // A renewal's fresh quote refused: the node's state is
                    // no longer what policy admits, so neither are its
                    // workloads, until a full attestation succeeds.
                    if refused.is_some() && (self.status.quote_renewals || force_attest) {
                        self.suspend_workloads();
                    }
                    self.status.failures += 1;
                    self.status.last_error_code = refused.map(|c| c.as_str().to_owned());
                    self.status.last_error = Some(e.clone());
                    tracing::warn!(error = %e, "node identity step failed");
                    // A refused renewal means the server no longer honours
                    // this SVID (revoked, banned, key rotated): only fresh
                    // TPM evidence can restore the identity.
                    if refused.is_some() {
                        force_attest = true;
                    }
                    let pause = self.next_backoff();
                    self.status.state = "backing_off".into();
                    self.status.next_rotation = Some(now_s() + pause.as_secs() as i64);
                    self.write_status();
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = shutdown.changed() => return Ok(()),
                    }
                }
            }
            if *shutdown.borrow() {
                return Ok(());
            }
        }
    }

    /// Exponential backoff with full jitter in [backoff/2, backoff].
    fn next_backoff(&mut self) -> Duration {
        let b = self.backoff;
        self.backoff = (b * 2).min(self.cfg.rotation.backoff_max);
        let ms = b.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(ms / 2..=ms.max(1)))
    }

    /// The server identity to pin: the configured one, else the trust
    /// domain of the node SVID the agent holds (`node_leaf`), else the
    /// one the trust bundle names.
    fn server_id(&self, node_leaf: Option<&[u8]>) -> ServerId {
        self.cfg
            .server_id()
            .or_else(|| node_leaf.and_then(ServerId::of_svid))
            .unwrap_or_default()
    }

    fn servers(&self) -> Vec<String> {
        let n = self.cfg.servers.len();
        (0..n)
            .map(|i| self.cfg.servers[(self.server_index + i) % n].clone())
            .collect()
    }

    fn store(&mut self, server: &str, svid: NodeSvid, renewal: bool) -> Result<(), String> {
        let bundle = svid.response.bundle.clone();
        files::write_svid_dir(
            &self.cfg.svid_dir(),
            &SvidFiles {
                cert_chain: svid.response.cert_chain.clone(),
                key_pkcs8: svid.key_pkcs8,
                bundle: bundle.clone(),
            },
        )
        .map_err(|e| e.to_string())?;
        if !bundle.is_empty() {
            // Later connections trust what the server now publishes (a CA
            // rotation reaches the agent before SVIDs signed by the new key).
            files::write_atomic(
                &self.cfg.trust_bundle,
                files::to_pem("CERTIFICATE", &bundle).as_bytes(),
                0o644,
            )
            .map_err(|e| e.to_string())?;
        }
        self.status.spiffe_id = Some(svid.response.spiffe_id.clone());
        self.status.serial = Some(svid.response.serial.clone());
        self.status.expires_at = Some(svid.response.expires_at);
        self.status.received_at = Some(now_s());
        self.status.server = Some(server.to_owned());
        if renewal {
            self.status.renewals += 1;
        } else {
            self.status.attestations += 1;
        }
        tracing::info!(
            spiffe_id = %svid.response.spiffe_id,
            serial = %svid.response.serial,
            expires_at = svid.response.expires_at,
            renewal,
            "node SVID stored"
        );
        Ok(())
    }

    async fn attest_any(&mut self) -> Result<(), (String, Option<herald_core::ErrorCode>)> {
        self.status.state = "attesting".into();
        self.write_status();
        let bundle = self.bundle().map_err(|e| (e, None))?;
        let join_token = self.cfg.join_token().map_err(|e| (e, None))?;
        let platform_token = self
            .cfg
            .attestation
            .platform_token()
            .map_err(|e| (format!("platform token: {e}"), None))?;
        if self.cfg.attestation.method != AttestationMethod::Tpm {
            return self
                .attest_without_tpm(&bundle, join_token, platform_token)
                .await;
        }
        self.open_tpm().await?;
        let mut last = (String::from("no server"), None);
        for (i, server) in self.servers().into_iter().enumerate() {
            let pin = self.server_id(None);
            let client = match HeraldClient::connect_to(&server, &bundle, None, &pin).await {
                Ok(c) => c,
                Err(e) => {
                    last = (format!("{server}: {e}"), None);
                    continue;
                }
            };
            let Some(tpm) = self.tpm.as_ref() else {
                break;
            };
            match attest_with_platform_token(
                &client,
                tpm,
                join_token.clone(),
                platform_token.clone(),
            )
            .await
            {
                Ok(svid) => {
                    self.server_index = (self.server_index + i) % self.cfg.servers.len();
                    return self.store(&server, svid, false).map_err(|e| (e, None));
                }
                Err(AttestError::Client(ClientError::Transport(e))) => {
                    last = (format!("{server}: {e}"), None);
                }
                Err(AttestError::Tpm(e)) => {
                    // Reopen the TPM next time (it may have been reset).
                    self.tpm = None;
                    return Err((format!("TPM: {e}"), None));
                }
                Err(AttestError::Client(e)) => {
                    let code = e.code();
                    return Err((format!("attestation refused by {server}: {e}"), code));
                }
                Err(e) => last = (format!("{server}: {e}"), None),
            }
        }
        Err(last)
    }

    /// An attestation with a platform token or the AWS instance identity
    /// document. For AWS the CSR is always of the enrolment key kept in
    /// `<data_dir>/node/enrolment.key`: the server binds the instance to it.
    async fn attest_without_tpm(
        &mut self,
        bundle: &[Vec<u8>],
        join_token: Option<String>,
        platform_token: Option<String>,
    ) -> Result<(), (String, Option<herald_core::ErrorCode>)> {
        let a = &self.cfg.attestation;
        let evidence = match a.method {
            AttestationMethod::AwsIid => NodeEvidence::AwsIid(
                crate::imds::instance_identity(&a.imds_url, a.imds_timeout)
                    .await
                    .map_err(|e| (e, None))?,
            ),
            _ => NodeEvidence::PlatformToken(
                platform_token.ok_or_else(|| ("no platform token file".to_owned(), None))?,
            ),
        };
        let mut last = (String::from("no server"), None);
        for (i, server) in self.servers().into_iter().enumerate() {
            let key = match a.method {
                AttestationMethod::AwsIid => self.enrolment_key(),
                _ => keys::generate_key_and_csr().map_err(|e| e.to_string()),
            }
            .map_err(|e| (e, None))?;
            let pin = self.server_id(None);
            let client = match HeraldClient::connect_to(&server, bundle, None, &pin).await {
                Ok(c) => c,
                Err(e) => {
                    last = (format!("{server}: {e}"), None);
                    continue;
                }
            };
            match attest_without_tpm(&client, evidence.clone(), key, join_token.clone()).await {
                Ok(svid) => {
                    self.server_index = (self.server_index + i) % self.cfg.servers.len();
                    return self.store(&server, svid, false).map_err(|e| (e, None));
                }
                Err(AttestError::Client(ClientError::Transport(e))) => {
                    last = (format!("{server}: {e}"), None);
                }
                Err(AttestError::Client(e)) => {
                    let code = e.code();
                    return Err((format!("attestation refused by {server}: {e}"), code));
                }
                Err(e) => last = (format!("{server}: {e}"), None),
            }
        }
        Err(last)
    }

    /// The AWS agent's enrolment key (created 0600 on first use) and a CSR for it.
    fn enrolment_key(&self) -> Result<keys::KeyAndCsr, String> {
        let path = self.cfg.data_dir.join("node").join("enrolment.key");
        match std::fs::read(&path) {
            Ok(pkcs8) => keys::csr_for_key(&pkcs8).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = keys::generate_key_and_csr().map_err(|e| e.to_string())?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                }
                files::write_atomic(&path, &key.key_pkcs8, 0o600)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                Ok(key)
            }
            Err(e) => Err(format!("{}: {e}", path.display())),
        }
    }

    async fn open_tpm(&mut self) -> Result<&TpmHandle, (String, Option<herald_core::ErrorCode>)> {
        if self.tpm.is_none() {
            let tpm = TpmHandle::open(&self.cfg.tpm.tcti, &self.cfg.data_dir)
                .await
                .map_err(|e| (e.to_string(), None))?;
            self.tpm = Some(tpm);
        }
        self.tpm.as_ref().ok_or_else(|| ("no TPM".to_owned(), None))
    }

    /// Renews the node SVID with a fresh quote over the attestation stream.
    async fn renew_with_quote(
        &mut self,
        client: &HeraldClient,
        server: &str,
    ) -> Result<NodeSvid, (String, Option<herald_core::ErrorCode>, bool)> {
        // A policy that requires the platform token beside the TPM
        // requires it at every attestation, renewals included.
        let platform_token = self
            .cfg
            .attestation
            .platform_token()
            .map_err(|e| (format!("platform token: {e}"), None, false))?;
        let tpm = self.open_tpm().await.map_err(|(e, c)| (e, c, false))?;
        match reattest_with_platform_token(client, tpm, platform_token).await {
            Ok(svid) => Ok(svid),
            Err(AttestError::Client(ClientError::Transport(e))) => {
                Err((format!("{server}: {e}"), None, true))
            }
            Err(AttestError::Tpm(e)) => {
                // Reopen the TPM next time (it may have been reset).
                self.tpm = None;
                Err((format!("TPM: {e}"), None, false))
            }
            Err(AttestError::Client(e)) => {
                let code = e.code();
                Err((
                    format!("renewal's fresh quote refused by {server}: {e}"),
                    code,
                    false,
                ))
            }
            Err(e) => Err((format!("{server}: {e}"), None, true)),
        }
    }

    async fn renew_any(
        &mut self,
        c: Current,
    ) -> Result<(), (String, Option<herald_core::ErrorCode>)> {
        let bundle = self.bundle().map_err(|e| (e, None))?;
        let mut last = (String::from("no server"), None);
        for (i, server) in self.servers().into_iter().enumerate() {
            let identity = ClientIdentity {
                cert_chain: c.files.cert_chain.clone(),
                key_pkcs8: c.files.key_pkcs8.clone(),
            };
            let pin = self.server_id(c.files.cert_chain.first().map(Vec::as_slice));
            let client =
                match HeraldClient::connect_to(&server, &bundle, Some(identity), &pin).await {
                    Ok(c) => c,
                    Err(e) => {
                        last = (format!("{server}: {e}"), None);
                        continue;
                    }
                };
            let renewed = if self.status.quote_renewals {
                self.renew_with_quote(&client, &server).await
            } else {
                let key = keys::generate_key_and_csr().map_err(|e| (e.to_string(), None))?;
                match client.renew_x509_svid(key.csr_der).await {
                    Ok(response) => Ok(NodeSvid {
                        response,
                        key_pkcs8: key.key_pkcs8,
                    }),
                    // The node policy wants a fresh quote with every
                    // renewal (or now): from here on, renew with one.
                    Err(e) if e.code() == Some(herald_core::ErrorCode::ReattestationRequired) => {
                        tracing::info!("the node policy requires a fresh TPM quote to renew");
                        self.status.quote_renewals = true;
                        self.renew_with_quote(&client, &server).await
                    }
                    Err(ClientError::Transport(e)) => Err((format!("{server}: {e}"), None, true)),
                    Err(e) => {
                        let code = e.code();
                        Err((format!("renewal refused by {server}: {e}"), code, false))
                    }
                }
            };
            match renewed {
                Ok(svid) => {
                    self.server_index = (self.server_index + i) % self.cfg.servers.len();
                    return self.store(&server, svid, true).map_err(|e| (e, None));
                }
                Err((e, code, true)) => last = (e, code),
                Err((e, code, false)) => return Err((e, code)),
            }
        }
        Err(last)
    }
}
