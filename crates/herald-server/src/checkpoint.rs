//! Signed checkpoints of the audit chain's head: written periodically by
//! one replica (a lease), on demand by `herald audit checkpoint`, stored in
//! the database, written to `audit.checkpoint_dir` and emitted as a span
//! (so OTLP ships it off the machine), and checked by `herald audit verify
//! --checkpoint FILE`.
//!
//! Trust in a checkpoint comes from its signer: an `audit` key of the key
//! ring whose sealed private key opens under the KEK and matches the
//! published point. A database writer without the KEK can add a key row,
//! but not one that opens — so cannot sign a checkpoint that verifies.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use herald_ca::checkpoint::{Checkpoint, CheckpointError};
use herald_ca::{JwtSigner, KeyEncryptionKey};
use herald_core::{AuditEvent, EvidenceType};
use herald_store::{CheckpointRecord, Store, StoreError};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::{ServerError, Shared, wait_shutdown};

/// The lease that lets one replica write the periodic checkpoints.
pub const LEASE: &str = "audit-checkpoint";

/// Why verifying against a checkpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The checkpoint file is not one.
    #[error("checkpoint file: {0}")]
    File(String),
    /// The checkpoint does not verify against this deployment's audit keys.
    #[error("forged checkpoint: {0}")]
    Forged(#[from] CheckpointError),
    /// The checkpoint is another trust domain's.
    #[error("the checkpoint is trust domain {0}'s")]
    OtherTrustDomain(String),
    /// The log ends before the checkpoint's head: records were removed.
    #[error(
        "the audit log was truncated: it ends at record {ends_at}, the checkpoint covers {seq}"
    )]
    Truncated {
        /// The last record left.
        ends_at: u64,
        /// The checkpoint's head.
        seq: u64,
    },
    /// The chain verifies, but not to the checkpoint's hash: history was
    /// rewritten and the hashes recomputed.
    #[error(
        "the audit log was rewritten: record {seq} no longer has the hash its checkpoint signed"
    )]
    Rewritten {
        /// The checkpoint's head.
        seq: u64,
    },
    /// The datastore failed (or the chain itself is broken).
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl VerifyError {
    /// The CLI's stable code.
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::File(_) => "invalid_request",
            VerifyError::Forged(_) | VerifyError::OtherTrustDomain(_) => "audit_checkpoint_forged",
            VerifyError::Truncated { .. } => "audit_truncated",
            VerifyError::Rewritten { .. } => "audit_rewritten",
            VerifyError::Store(StoreError::AuditChainBroken { .. }) => "audit_chain_broken",
            VerifyError::Store(_) => "store_unavailable",
        }
    }
}

/// A checkpoint as written to a file: the JWS and, for verifiers off the
/// machine, the public key that signed it.
pub fn file_json(record: &CheckpointRecord, trust_domain: &str, key: &JwtSigner) -> Value {
    json!({
        "trust_domain": trust_domain,
        "seq": record.seq,
        "hash": hex::encode(record.hash),
        "time_ms": record.time_ms,
        "checkpoint": record.jws,
        "key": key.public_jwk("sig"),
    })
}

/// Signs the current head with `key` and stores it (with its audit record,
/// by `caller`). `Ok(None)` when the log is empty or the head already has
/// a checkpoint.
pub async fn create(
    store: &Store,
    key: &JwtSigner,
    trust_domain: &str,
    caller: &str,
) -> Result<Option<CheckpointRecord>, ServerError> {
    let Some((seq, hash)) = store.audit_head().await? else {
        return Ok(None);
    };
    let time_ms = herald_core::audit::now_ms();
    let jws = Checkpoint {
        trust_domain: trust_domain.to_owned(),
        seq,
        hash,
        time_ms,
    }
    .sign(key)?;
    let record = CheckpointRecord {
        seq,
        hash,
        time_ms,
        key_id: key.kid().to_owned(),
        jws,
    };
    let mut audit = AuditEvent::new("audit.checkpoint", caller);
    audit.evidence_type = Some(EvidenceType::Operator);
    audit.serial = Some(seq.to_string());
    audit.evidence_digest = Some(hex::encode(hash));
    audit.policy = Some(record.key_id.clone());
    Ok(store
        .record_checkpoint(&record, audit)
        .await?
        .then_some(record))
}

/// The audit keys of the key ring that a KEK holder created: each sealed
/// private key opens under `kek` and matches its published point. Every
/// status counts: a retired key still vouches for what it signed.
pub async fn trusted_keys(
    store: &Store,
    kek: &KeyEncryptionKey,
) -> Result<Vec<(String, Vec<u8>)>, ServerError> {
    let mut out = Vec::new();
    for k in store.ca_keys().await? {
        if k.kind != "audit" {
            continue;
        }
        let opened = kek
            .open(&k.key_id, &k.encrypted_key)
            .ok()
            .and_then(|pkcs8| JwtSigner::from_pkcs8(&k.key_id, &pkcs8).ok());
        match opened {
            Some(signer) if signer.public_point() == k.cert_der.as_slice() => {
                out.push((k.key_id, k.cert_der));
            }
            _ => {
                tracing::warn!(key_id = %k.key_id, "an audit key that does not open under the KEK is ignored")
            }
        }
    }
    Ok(out)
}

/// What a checkpoint vouches for, once verified.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The checkpoint.
    pub checkpoint: Checkpoint,
    /// The key that signed it.
    pub key_id: String,
    /// Records after it (the log went on).
    pub records_after: u64,
}

/// Checks the log against a checkpoint JWS: signed by a trusted audit key,
/// of this trust domain, the chain intact up to it, its head still there
/// with the same hash.
pub async fn verify(
    store: &Store,
    keys: &[(String, Vec<u8>)],
    trust_domain: &str,
    jws: &str,
) -> Result<Verified, VerifyError> {
    let (checkpoint, key_id) = Checkpoint::verify(jws, |kid| {
        keys.iter()
            .find(|(k, _)| k == kid)
            .map(|(_, point)| point.clone())
    })?;
    if checkpoint.trust_domain != trust_domain {
        return Err(VerifyError::OtherTrustDomain(checkpoint.trust_domain));
    }
    let whole = store.verify_audit_chain(1, None).await?;
    if whole.last_seq < checkpoint.seq {
        return Err(VerifyError::Truncated {
            ends_at: whole.last_seq,
            seq: checkpoint.seq,
        });
    }
    let upto = store.verify_audit_chain(1, Some(checkpoint.seq)).await?;
    if upto.last_seq != checkpoint.seq || upto.last_hash != checkpoint.hash {
        return Err(VerifyError::Rewritten {
            seq: checkpoint.seq,
        });
    }
    Ok(Verified {
        records_after: whole.last_seq - checkpoint.seq,
        checkpoint,
        key_id,
    })
}

/// Reads the JWS out of a checkpoint file (the JSON `file_json` writes, or
/// a bare JWS).
pub fn read_file(path: &Path) -> Result<String, VerifyError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| VerifyError::File(format!("{}: {e}", path.display())))?;
    let text = text.trim();
    if text.starts_with('{') {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| VerifyError::File(format!("{}: {e}", path.display())))?;
        v.get("checkpoint")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| VerifyError::File(format!("{}: no \"checkpoint\"", path.display())))
    } else {
        Ok(text.to_owned())
    }
}

/// Writes a checkpoint file into `dir` (`checkpoint-<seq>.json`, atomically).
pub fn write_file(dir: &Path, body: &Value, seq: u64) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("checkpoint-{seq:012}.json"));
    let tmp = dir.join(format!(".checkpoint-{seq:012}.json.tmp"));
    std::fs::write(&tmp, format!("{body}\n"))?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Writes a checkpoint every `audit.checkpoint_interval` while the head
/// moves, on the replica that holds the lease.
pub async fn run(shared: Arc<Shared>, shutdown: watch::Receiver<bool>) {
    let interval = shared.config.audit.checkpoint_interval;
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = wait_shutdown(shutdown.clone()) => return,
        }
        let lease_ms = (interval.as_millis() as i64).saturating_mul(2);
        match shared
            .store
            .try_lease(
                LEASE,
                &shared.replica_id,
                herald_core::audit::now_ms(),
                lease_ms,
            )
            .await
        {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "checkpoint lease unavailable");
                continue;
            }
        }
        let ca = shared.ca();
        let td = shared.config.trust_domain.to_string();
        match create(&shared.store, &ca.audit, &td, "server").await {
            Ok(Some(record)) => {
                let body = file_json(&record, &td, &ca.audit);
                // A span of its own: with OTLP export configured, every
                // checkpoint leaves the machine as it is made.
                let span = tracing::info_span!(
                    "audit.checkpoint",
                    seq = record.seq,
                    hash = %hex::encode(record.hash),
                    key_id = %record.key_id,
                    checkpoint = %record.jws,
                );
                span.in_scope(|| tracing::info!("audit checkpoint signed"));
                if let Some(dir) = &shared.config.audit.checkpoint_dir
                    && let Err(e) = write_file(dir, &body, record.seq)
                {
                    tracing::error!(error = %e, dir = %dir.display(), "could not write the checkpoint file");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, "could not write an audit checkpoint"),
        }
    }
}
