//! The datastore's SQL, written once and compiled for each backend (this
//! file is a module of both `crate::sqlite` and `crate::postgres`; `Db`,
//! `Pool` and the dialect constants come from the parent).

use std::sync::{Arc, Mutex};

use herald_core::{AuditEvent, ErrorCode, EvidenceType, Outcome};
use sqlx::{QueryBuilder, Row};
use tokio::sync::{mpsc, oneshot};

use super::lineage::{begin_revocation, finish_revocation};
use super::{BEGIN_WRITE, Db, DbRow, MAX_PARAMS, Options, Pool, Tx, reader, writer};
use crate::{
    AuditRecord, CaKeyRecord, ChainRow, Commit, Committed, CredentialStatus, GENESIS,
    IssuedCredential, JoinTokenRecord, Lookup, NewJoinToken, ReplicaRecord, Sequences, StoreError,
    WriteRequest, WriterStats, chain_rows, hash32,
};

/// One backend's connection pool, writer task and lookup batcher.
#[derive(Debug)]
pub(crate) struct Backend {
    pub(crate) pool: Pool,
    pub(crate) stats: Arc<WriterStats>,
    lookups: mpsc::Sender<Lookup>,
    tx: Mutex<Option<mpsc::Sender<WriteRequest>>>,
    /// Resolves when the writer's thread has drained and stopped.
    writer_done: Mutex<Option<oneshot::Receiver<()>>>,
    /// A statement run first in every write transaction to take the
    /// store-wide write lock (PostgreSQL); SQLite's `BEGIN IMMEDIATE` is one.
    pub(crate) write_lock: Option<String>,
}

impl Backend {
    /// Starts the writer and the lookup batcher (each on a connection of
    /// its own, opened from `opts`) beside a migrated `pool` for the rest.
    ///
    /// Both run on a thread and runtime of their own: a batch is several
    /// round trips to the database, and on a runtime busy with requests
    /// each resumption would wait behind every ready request task —
    /// measured on PostgreSQL, that wait, not the database, was 85% of a
    /// write batch's time.
    pub(crate) fn start(
        pool: Pool,
        opts: Options,
        write_lock: Option<String>,
    ) -> Result<Backend, StoreError> {
        let (tx, rx) = mpsc::channel(4096);
        let stats = Arc::new(WriterStats::default());
        let (done_tx, writer_done) = oneshot::channel();
        let (lookups, lookup_rx) = mpsc::channel(4096);
        let (lock, writer_stats, reader_stats) = (write_lock.clone(), stats.clone(), stats.clone());
        std::thread::Builder::new()
            .name("herald-store".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(async move {
                        let reader =
                            tokio::spawn(reader::run(opts.clone(), lookup_rx, reader_stats));
                        writer::run(opts, lock, rx, writer_stats).await;
                        reader.abort();
                    }),
                    // Callers then get `WriterGone`.
                    Err(e) => tracing::error!(error = %e, "the datastore writer could not start"),
                }
                let _ = done_tx.send(());
            })
            .map_err(StoreError::WriterStart)?;
        Ok(Backend {
            pool,
            stats,
            lookups,
            tx: Mutex::new(Some(tx)),
            writer_done: Mutex::new(Some(writer_done)),
            write_lock,
        })
    }

    fn sender(&self) -> Result<mpsc::Sender<WriteRequest>, StoreError> {
        self.tx
            .lock()
            .map_err(|_| StoreError::WriterGone)?
            .clone()
            .ok_or(StoreError::WriterGone)
    }

    /// Readiness probe.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Stores a join token and its audit record in one transaction.
    pub async fn create_join_token(
        &self,
        token: NewJoinToken,
        audit: AuditEvent,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, token_id, spiffe_id, created_at, expires_at, used_at, created_by, \
             purpose, policies, reason) VALUES ($1, $2, $3, $4, $5, NULL, $6, $7, $8, $9)",
        )
        .bind(token.token_hash.as_slice())
        .bind(&token.token_id)
        .bind(&token.spiffe_id)
        .bind(token.created_at)
        .bind(token.expires_at)
        .bind(&token.created_by)
        .bind(token.purpose.as_str())
        .bind(token.policies.join(","))
        .bind(&token.reason)
        .execute(&mut *tx)
        .await?;
        let seq = append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await?;
        Ok(seq)
    }

    /// Looks a join token up by hash (batched with concurrent lookups).
    pub async fn join_token(
        &self,
        token_hash: &[u8; 32],
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.lookups
            .send(Lookup::JoinToken(*token_hash, reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Every join token, newest first.
    pub async fn list_join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT token_id, spiffe_id, created_at, expires_at, used_at, created_by, purpose, policies, reason \
             FROM join_tokens ORDER BY created_at DESC",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(join_token_from_row).collect()
    }

    /// Group-commits a token consumption, an issued credential and an audit
    /// record atomically. If the token cannot be consumed, only the audit
    /// event — rewritten as a refusal with the reason — is written.
    pub async fn commit(&self, c: Commit) -> Result<Committed, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(WriteRequest { commit: c, reply })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// An issued credential by serial.
    pub async fn issued(&self, serial: &str) -> Result<Option<IssuedCredential>, StoreError> {
        let row = sqlx::query(
            "SELECT serial, kind, spiffe_id, not_before, not_after, issued_at, evidence_type, evidence_digest, \
             policy, parent_serial, public_key_sha256, ca_key_id, origin, root_serial, root_at, cert_sha256 \
             FROM issued_credentials WHERE serial = $1",
        )
        .bind(serial)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| -> Result<IssuedCredential, StoreError> {
            Ok(IssuedCredential {
                serial: r.try_get(0)?,
                kind: r.try_get(1)?,
                spiffe_id: r.try_get(2)?,
                not_before: r.try_get(3)?,
                not_after: r.try_get(4)?,
                issued_at: r.try_get(5)?,
                evidence_type: r.try_get(6)?,
                evidence_digest: r.try_get(7)?,
                policy: r.try_get(8)?,
                parent_serial: r.try_get(9)?,
                public_key_sha256: r.try_get(10)?,
                ca_key_id: r.try_get(11)?,
                origin: herald_core::Origin::from_code(&r.try_get::<String, _>(12)?),
                root_serial: r.try_get(13)?,
                root_at: r.try_get(14)?,
                cert_sha256: r.try_get(15)?,
            })
        })
        .transpose()
    }

    /// Whether `serial` was issued here and, if so, whether it is revoked —
    /// the renewal check, in one (batched) query.
    pub async fn credential_status(
        &self,
        serial: &str,
    ) -> Result<Option<CredentialStatus>, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.lookups
            .send(Lookup::CredentialStatus(serial.to_owned(), reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Whether `serial` is revoked.
    pub async fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query("SELECT 1 FROM revocations WHERE serial = $1")
            .bind(serial)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    /// Revokes an issued credential and everything descending from it
    /// (revocations and the audit record in one transaction); returns how
    /// many unexpired credentials that revoked, or `None` when no such
    /// credential was issued. Revoking twice keeps the first revocation.
    pub async fn revoke(
        &self,
        serial: &str,
        reason: &str,
        revoked_by: &str,
        audit: AuditEvent,
    ) -> Result<Option<u64>, StoreError> {
        let mut tx = self.begin_write().await?;
        let exists = sqlx::query("SELECT 1 FROM issued_credentials WHERE serial = $1")
            .bind(serial)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !exists {
            return Ok(None);
        }
        let mut qb = begin_revocation();
        qb.push("serial = ").push_bind(serial.to_owned());
        finish_revocation(&mut qb, audit.time_ms / 1000, reason, revoked_by);
        let n = qb.build().execute(&mut *tx).await?.rows_affected();
        append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await?;
        Ok(Some(n))
    }

    /// The CA key ring, oldest first.
    pub async fn ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, kind, status, cert_der, chain_der, encrypted_key, not_before, not_after, created_at, \
             status_since FROM ca_keys ORDER BY created_at, key_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CaKeyRecord {
                    key_id: r.try_get(0)?,
                    kind: r.try_get(1)?,
                    status: r.try_get(2)?,
                    cert_der: r.try_get(3)?,
                    chain_der: r.try_get(4)?,
                    encrypted_key: r.try_get(5)?,
                    not_before: r.try_get(6)?,
                    not_after: r.try_get(7)?,
                    created_at: r.try_get(8)?,
                    status_since: r.try_get(9)?,
                })
            })
            .collect()
    }

    /// Adds `key` — unless the ring already holds a key of its kind whose
    /// status is one of `unless_status` (`Ok(false)`, nothing written) —
    /// and bumps the bundle sequence, with its audit record, in one
    /// transaction. The check runs under the write lock, so replicas
    /// starting (or rotating) together add one key, not one each.
    pub async fn insert_ca_key_unless(
        &self,
        key: CaKeyRecord,
        unless_status: &[&str],
        audit: AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        if !unless_status.is_empty() {
            let mut qb = QueryBuilder::<Db>::new("SELECT 1 FROM ca_keys WHERE kind = ");
            qb.push_bind(&key.kind).push(" AND status IN (");
            let mut list = qb.separated(", ");
            for st in unless_status {
                list.push_bind(*st);
            }
            qb.push(") LIMIT 1");
            if qb.build().fetch_optional(&mut *tx).await?.is_some() {
                tx.rollback().await?;
                return Ok(false);
            }
        }
        sqlx::query(
            "INSERT INTO ca_keys (key_id, kind, status, cert_der, chain_der, encrypted_key, not_before, not_after, \
             created_at, status_since) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&key.key_id)
        .bind(&key.kind)
        .bind(&key.status)
        .bind(&key.cert_der)
        .bind(&key.chain_der)
        .bind(&key.encrypted_key)
        .bind(key.not_before)
        .bind(key.not_after)
        .bind(key.created_at)
        .bind(key.status_since)
        .execute(&mut *tx)
        .await?;
        bump_sequence(&mut tx, BUNDLE_SEQUENCE).await?;
        append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Moves keys between statuses in one transaction, bumping the bundle
    /// sequence, with the audit record: each `(key_id, from, to)` must find
    /// its key in `from`, else nothing changes and the answer is
    /// `Ok(false)` (another replica moved it first).
    pub async fn transition_ca_keys(
        &self,
        changes: &[(&str, &str, &str)],
        now_s: i64,
        audit: AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        for (key_id, from, to) in changes {
            let done = sqlx::query(
                "UPDATE ca_keys SET status = $1, status_since = $2 WHERE key_id = $3 AND status = $4",
            )
            .bind(*to)
            .bind(now_s)
            .bind(*key_id)
            .bind(*from)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if done != 1 {
                tx.rollback().await?;
                return Ok(false);
            }
        }
        bump_sequence(&mut tx, BUNDLE_SEQUENCE).await?;
        append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// When the last credential `key_id` signed expires (Unix seconds);
    /// `None` if it signed none.
    pub async fn last_expiry_signed_by(&self, key_id: &str) -> Result<Option<i64>, StoreError> {
        let (v,): (Option<i64>,) =
            sqlx::query_as("SELECT MAX(not_after) FROM issued_credentials WHERE ca_key_id = $1")
                .bind(key_id)
                .fetch_one(&self.pool)
                .await?;
        Ok(v)
    }

    /// Takes or renews the lease `name` for `holder` until `now_ms + ttl_ms`;
    /// `Ok(false)` while another holder's lease is unexpired.
    pub async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at <= $4",
        )
        .bind(name)
        .bind(holder)
        .bind(now_ms.saturating_add(ttl_ms))
        .bind(now_ms)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(done == 1)
    }

    /// The bundle's `spiffe_sequence` (0 before any CA key).
    pub async fn bundle_sequence(&self) -> Result<u64, StoreError> {
        Ok(self.sequences().await?.bundle)
    }

    /// The change counters every replica polls, in one query.
    pub async fn sequences(&self) -> Result<Sequences, StoreError> {
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT key, value FROM meta WHERE key IN ($1, $2, $3)")
                .bind(BUNDLE_SEQUENCE)
                .bind(BAN_SEQUENCE)
                .bind(FEDERATION_SEQUENCE)
                .fetch_all(&self.pool)
                .await?;
        let mut seq = Sequences::default();
        for (key, value) in rows {
            let v = value
                .parse()
                .map_err(|_| StoreError::Corrupt(format!("{key} is not a number")))?;
            match key.as_str() {
                BUNDLE_SEQUENCE => seq.bundle = v,
                BAN_SEQUENCE => seq.bans = v,
                _ => seq.federation = v,
            }
        }
        Ok(seq)
    }

    /// Records (or refreshes) a replica's heartbeat; no audit record (it is
    /// not a decision) and no write lock (it touches no chain).
    pub async fn record_replica(&self, r: &ReplicaRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO replicas (replica_id, address, version, started_at, last_seen_ms, \
             bundle_sequence, policy_digest, policy_generation) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (replica_id) DO UPDATE SET address = excluded.address, \
             last_seen_ms = excluded.last_seen_ms, bundle_sequence = excluded.bundle_sequence, \
             policy_digest = excluded.policy_digest, policy_generation = excluded.policy_generation",
        )
        .bind(&r.replica_id)
        .bind(&r.address)
        .bind(&r.version)
        .bind(r.started_at)
        .bind(r.last_seen_ms)
        .bind(r.bundle_sequence as i64)
        .bind(&r.policy_digest)
        .bind(r.policy_generation as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Replicas seen since `since_ms`, most recently seen first.
    pub async fn replicas(&self, since_ms: i64) -> Result<Vec<ReplicaRecord>, StoreError> {
        let rows: Vec<ReplicaRow> = sqlx::query_as(
            "SELECT replica_id, address, version, started_at, last_seen_ms, bundle_sequence, \
             policy_digest, policy_generation FROM replicas WHERE last_seen_ms >= $1 \
             ORDER BY last_seen_ms DESC, replica_id",
        )
        .bind(since_ms)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| ReplicaRecord {
                replica_id: r.0,
                address: r.1,
                version: r.2,
                started_at: r.3,
                last_seen_ms: r.4,
                bundle_sequence: r.5.max(0) as u64,
                policy_digest: r.6,
                policy_generation: r.7.max(0) as u64,
            })
            .collect())
    }

    /// Forgets replicas not seen since `before_ms`; returns how many.
    pub async fn forget_replicas(&self, before_ms: i64) -> Result<u64, StoreError> {
        Ok(sqlx::query("DELETE FROM replicas WHERE last_seen_ms < $1")
            .bind(before_ms)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// Up to `limit` audit records after `after_seq`, in order.
    pub async fn audit_records(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, time_ms, caller, action, evidence_type, evidence_digest, policy, spiffe_id, serial, \
             outcome, reason, prev_hash, hash, detail FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// Lifetimes of the credentials issued in `[since_s, until_s)`:
    /// (kind, not_before, not_after), for TTL distributions.
    pub async fn issued_lifetimes(
        &self,
        since_s: i64,
        until_s: i64,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT kind, not_before, not_after FROM issued_credentials \
             WHERE issued_at >= $1 AND issued_at < $2",
        )
        .bind(since_s)
        .bind(until_s)
        .fetch_all(&self.pool)
        .await?)
    }

    /// X.509 SVIDs whose validity ended in `[since_s, until_s)`, each with
    /// when its first renewal was issued (if ever): (serial, SPIFFE ID,
    /// not_after, first renewal's issued_at).
    pub async fn rotation_outcomes(
        &self,
        since_s: i64,
        until_s: i64,
    ) -> Result<Vec<(String, String, i64, Option<i64>)>, StoreError> {
        Ok(sqlx::query_as(
            "SELECT c.serial, c.spiffe_id, c.not_after, MIN(k.issued_at) FROM issued_credentials c \
             LEFT JOIN issued_credentials k ON k.parent_serial = c.serial \
             WHERE c.kind = 'x509_svid' AND c.not_after >= $1 AND c.not_after < $2 \
             GROUP BY c.serial, c.spiffe_id, c.not_after",
        )
        .bind(since_s)
        .bind(until_s)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Up to `limit` audit records after `after_seq` whose time lies in
    /// `[since_ms, until_ms)`, in order (for export and reports; page with
    /// the last `seq` returned).
    pub async fn audit_records_between(
        &self,
        since_ms: i64,
        until_ms: i64,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, time_ms, caller, action, evidence_type, evidence_digest, policy, spiffe_id, serial, \
             outcome, reason, prev_hash, hash, detail FROM audit_log \
             WHERE seq > $1 AND time_ms >= $2 AND time_ms < $3 ORDER BY seq LIMIT $4",
        )
        .bind(after_seq as i64)
        .bind(since_ms)
        .bind(until_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// Stops the writer after it drains, and closes the pool.
    pub async fn close(&self) {
        let tx = self.tx.lock().ok().and_then(|mut g| g.take());
        drop(tx);
        let done = self.writer_done.lock().ok().and_then(|mut g| g.take());
        if let Some(done) = done {
            let _ = done.await;
        }
        self.pool.close().await;
    }

    /// Opens a write transaction holding the store-wide write lock, so
    /// writers (threads, processes, replicas) append to one audit chain.
    pub(crate) async fn begin_write(&self) -> Result<Tx, StoreError> {
        let mut tx = self.pool.begin_with(BEGIN_WRITE).await?;
        if let Some(lock) = &self.write_lock {
            sqlx::query(sqlx::AssertSqlSafe(lock.clone()))
                .execute(&mut *tx)
                .await?;
        }
        Ok(tx)
    }
}

impl Backend {
    /// The audit chain's head.
    pub async fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        let row: Option<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?;
        row.map(|(seq, hash)| Ok((seq as u64, hash32(hash, "hash")?)))
            .transpose()
    }

    /// Stores a checkpoint and its audit record.
    pub async fn record_checkpoint(
        &self,
        c: &crate::CheckpointRecord,
        audit: AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let inserted = sqlx::query(
            "INSERT INTO audit_checkpoints (seq, hash, time_ms, key_id, jws) VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (seq) DO NOTHING",
        )
        .bind(c.seq as i64)
        .bind(c.hash.to_vec())
        .bind(c.time_ms)
        .bind(&c.key_id)
        .bind(&c.jws)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if inserted {
            append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    /// Every checkpoint, oldest first.
    pub async fn checkpoints(&self) -> Result<Vec<crate::CheckpointRecord>, StoreError> {
        let rows: Vec<(i64, Vec<u8>, i64, String, String)> = sqlx::query_as(
            "SELECT seq, hash, time_ms, key_id, jws FROM audit_checkpoints ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(seq, hash, time_ms, key_id, jws)| {
                Ok(crate::CheckpointRecord {
                    seq: seq as u64,
                    hash: hash32(hash, "hash")?,
                    time_ms,
                    key_id,
                    jws,
                })
            })
            .collect()
    }
}

fn join_token_from_row(r: &DbRow) -> Result<JoinTokenRecord, StoreError> {
    join_token_record(
        r.try_get(0)?,
        r.try_get(1)?,
        r.try_get(2)?,
        r.try_get(3)?,
        r.try_get(4)?,
        r.try_get(5)?,
        (r.try_get(6)?, r.try_get(7)?, r.try_get(8)?),
    )
}

/// A join token record from its columns: token_id, spiffe_id, created_at,
/// expires_at, used_at, created_by and (purpose, policies, reason).
pub(crate) fn join_token_record(
    token_id: String,
    spiffe_id: String,
    created_at: i64,
    expires_at: i64,
    used_at: Option<i64>,
    created_by: String,
    (purpose, policies, reason): (String, String, Option<String>),
) -> Result<JoinTokenRecord, StoreError> {
    Ok(JoinTokenRecord {
        token_id,
        spiffe_id,
        created_at,
        expires_at,
        used_at,
        created_by,
        purpose: herald_core::JoinTokenPurpose::from_code(&purpose)
            .ok_or_else(|| StoreError::Corrupt(format!("join token purpose {purpose:?}")))?,
        policies: policies
            .split(',')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect(),
        reason,
    })
}

fn audit_from_row(r: &DbRow) -> Result<AuditRecord, StoreError> {
    let corrupt = |what: &str, v: &str| StoreError::Corrupt(format!("audit {what} {v:?}"));
    let evidence_type: Option<String> = r.try_get(4)?;
    let outcome: String = r.try_get(9)?;
    let reason: Option<String> = r.try_get(10)?;
    let seq: i64 = r.try_get(0)?;
    Ok(AuditRecord {
        seq: seq as u64,
        event: AuditEvent {
            time_ms: r.try_get(1)?,
            caller: r.try_get(2)?,
            action: r.try_get(3)?,
            evidence_type: evidence_type
                .map(|s| EvidenceType::from_code(&s).ok_or_else(|| corrupt("evidence_type", &s)))
                .transpose()?,
            evidence_digest: r.try_get(5)?,
            policy: r.try_get(6)?,
            spiffe_id: r.try_get(7)?,
            serial: r.try_get(8)?,
            outcome: Outcome::from_code(&outcome).ok_or_else(|| corrupt("outcome", &outcome))?,
            reason: reason
                .map(|s| ErrorCode::from_code(&s).ok_or_else(|| corrupt("reason", &s)))
                .transpose()?,
            detail: r.try_get(13)?,
        },
        prev_hash: hash32(r.try_get(11)?, "prev_hash")?,
        hash: hash32(r.try_get(12)?, "hash")?,
    })
}

/// Bound parameters per row of [`push_issued_insert`]: one per column.
pub(crate) const ISSUED_ROW_PARAMS: usize = 16;

/// Appends a multi-row `INSERT INTO issued_credentials` statement to `qb`
/// ([`ISSUED_ROW_PARAMS`] bound parameters per row); `issued` must not be
/// empty. The one column list for every path that records an issuance.
pub(crate) fn push_issued_insert<'a>(
    qb: &mut QueryBuilder<Db>,
    issued: impl IntoIterator<Item = &'a IssuedCredential>,
) {
    qb.push(
        "INSERT INTO issued_credentials (serial, kind, spiffe_id, not_before, not_after, issued_at, evidence_type, \
         evidence_digest, policy, parent_serial, public_key_sha256, ca_key_id, origin, root_serial, root_at, cert_sha256) ",
    );
    qb.push_values(issued, |mut b, i| {
        b.push_bind(i.serial.clone())
            .push_bind(i.kind.clone())
            .push_bind(i.spiffe_id.clone())
            .push_bind(i.not_before)
            .push_bind(i.not_after)
            .push_bind(i.issued_at)
            .push_bind(i.evidence_type.clone())
            .push_bind(i.evidence_digest.clone())
            .push_bind(i.policy.clone())
            .push_bind(i.parent_serial.clone())
            .push_bind(i.public_key_sha256.clone())
            .push_bind(i.ca_key_id.clone())
            .push_bind(i.origin.map_or("", herald_core::Origin::as_str))
            .push_bind(i.root_serial.clone())
            .push_bind(i.root_at)
            .push_bind(i.cert_sha256.clone());
    });
}

/// Bound parameters per row of [`push_audit_insert`]: one per column.
pub(crate) const AUDIT_ROW_PARAMS: usize = 14;

/// Appends a multi-row `INSERT INTO audit_log` statement to `qb`
/// ([`AUDIT_ROW_PARAMS`] bound parameters per row).
pub(crate) fn push_audit_insert(qb: &mut QueryBuilder<Db>, rows: &[ChainRow<'_>]) {
    qb.push(
        "INSERT INTO audit_log (seq, time_ms, caller, action, evidence_type, evidence_digest, policy, \
         spiffe_id, serial, outcome, reason, prev_hash, hash, detail) ",
    );
    qb.push_values(rows, |mut b, (seq, e, prev, hash)| {
        b.push_bind(*seq as i64)
            .push_bind(e.time_ms)
            .push_bind(e.caller.clone())
            .push_bind(e.action.clone())
            .push_bind(e.evidence_type.map(|t| t.as_str()))
            .push_bind(e.evidence_digest.clone())
            .push_bind(e.policy.clone())
            .push_bind(e.spiffe_id.clone())
            .push_bind(e.serial.clone())
            .push_bind(e.outcome.as_str())
            .push_bind(e.reason.map(|r| r.as_str()))
            .push_bind(prev.to_vec())
            .push_bind(hash.to_vec())
            .push_bind(e.detail.clone());
    });
}

/// A `replicas` row as selected by `Backend::replicas`.
type ReplicaRow = (String, String, String, i64, i64, i64, String, i64);

/// The trust bundle's `spiffe_sequence`: bumped with every key-ring change.
pub(crate) const BUNDLE_SEQUENCE: &str = "bundle_sequence";
/// Bumped with every node ban.
pub(crate) const BAN_SEQUENCE: &str = "ban_sequence";
/// Bumped with every change of a federated trust domain's bundle.
pub(crate) const FEDERATION_SEQUENCE: &str = "federation_sequence";

/// Bumps the counter `key` in `meta` inside `tx`: every replica polls the
/// counters to learn that the key ring changed or a node was banned.
pub(crate) async fn bump_sequence(tx: &mut Tx, key: &'static str) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO meta (key, value) VALUES ($1, '1') \
         ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(meta.value AS BIGINT) + 1 AS TEXT)",
    )
    .bind(key)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Appends `events` to the chain inside `tx`; returns the last sequence number.
pub(crate) async fn append_audit(tx: &mut Tx, events: &[AuditEvent]) -> Result<u64, StoreError> {
    let tail: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut **tx)
            .await?;
    let (mut seq, mut prev) = match tail {
        Some((s, h)) => (s as u64, hash32(h, "hash")?),
        None => (0, GENESIS),
    };
    for chunk in events.chunks(MAX_PARAMS / AUDIT_ROW_PARAMS) {
        let rows = chain_rows(seq, prev, chunk);
        if let Some(last) = rows.last() {
            (seq, prev) = (last.0, last.3);
        }
        let mut qb = QueryBuilder::<Db>::new("");
        push_audit_insert(&mut qb, &rows);
        qb.build().execute(&mut **tx).await?;
    }
    Ok(seq)
}
