//! Herald's datastore.
//!
//! sqlx over SQLite (WAL, `synchronous=FULL`: every commit is durable before
//! its caller hears back). Holds join tokens (hashed), issued credentials,
//! revocations, the CA key ring and the append-only, hash-chained audit log.
//!
//! Writes on the hot path go through one writer task that **group-commits**:
//! it drains every queued [`Commit`] into a single transaction with
//! multi-row statements, then answers each caller with its own outcome.
//! The audit chain's tail is read inside each write transaction, so several
//! processes (server and admin CLI) can append to one chain.
#![forbid(unsafe_code)]

mod audit_chain;
mod nodes;
mod reader;
mod writer;

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use herald_core::{AuditEvent, ErrorCode, EvidenceType, Outcome};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, SqlSafeStr, Sqlite, Transaction};
use tokio::sync::{mpsc, oneshot};

pub use audit_chain::{GENESIS, audit_hash};
pub use nodes::{NodeAttestation, NodeCommitted, NodeRecord, NodeStatus, RevocationFilter};

/// Errors from the datastore.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed (unreachable, busy past the timeout, constraint).
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// Applying migrations failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The audit chain does not verify at `seq`.
    #[error("audit record {seq}: {reason}")]
    AuditChainBroken {
        /// The first bad record.
        seq: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// A stored row could not be decoded.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// The writer task has stopped.
    #[error("the datastore writer has stopped")]
    WriterGone,
}

/// A join token to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJoinToken {
    /// SHA-256 of the token.
    pub token_hash: [u8; 32],
    /// Public identifier.
    pub token_id: String,
    /// The SPIFFE ID the token mints.
    pub spiffe_id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// Who created it.
    pub created_by: String,
}

/// A stored join token (without its hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// Public identifier.
    pub token_id: String,
    /// The SPIFFE ID the token mints.
    pub spiffe_id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// When it was used, Unix seconds.
    pub used_at: Option<i64>,
    /// Who created it.
    pub created_by: String,
}

/// A credential to record as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCredential {
    /// Serial, lowercase hex.
    pub serial: String,
    /// `x509_svid`, ...
    pub kind: String,
    /// The SPIFFE ID.
    pub spiffe_id: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds.
    pub issued_at: i64,
    /// The evidence type's stable string.
    pub evidence_type: String,
    /// Hex digest of the evidence.
    pub evidence_digest: Option<String>,
    /// The policy that granted it.
    pub policy: Option<String>,
    /// The serial this one renews.
    pub parent_serial: Option<String>,
    /// Hex SHA-256 of the SubjectPublicKeyInfo.
    pub public_key_sha256: String,
    /// The signing CA key.
    pub ca_key_id: String,
}

/// What the store knows of an issued credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialStatus {
    /// The SPIFFE ID it was issued for.
    pub spiffe_id: String,
    /// Its notAfter, Unix seconds.
    pub not_after: i64,
    /// Whether it has been revoked.
    pub revoked: bool,
}

/// A CA key-ring entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaKeyRecord {
    /// Identifier.
    pub key_id: String,
    /// `x509`.
    pub kind: String,
    /// `active`, `prepared` or `retired`.
    pub status: String,
    /// The CA certificate, DER.
    pub cert_der: Vec<u8>,
    /// Certificates above it, concatenated DER.
    pub chain_der: Vec<u8>,
    /// PKCS#8 sealed with the key-encryption key.
    pub encrypted_key: Vec<u8>,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
    /// Unix seconds.
    pub created_at: i64,
}

/// One atomic write on the hot path.
#[derive(Debug, Clone)]
pub struct Commit {
    /// Consume this join token (must exist, be unused and unexpired at `now_s`).
    pub consume_join_token: Option<[u8; 32]>,
    /// Record this single-use evidence key (an OIDC token's jti); refused
    /// with `token_replayed` if it is already recorded and unexpired.
    pub consume_replay: Option<ReplayKey>,
    /// Now, Unix seconds.
    pub now_s: i64,
    /// Record this credential as issued.
    pub issued: Option<IssuedCredential>,
    /// The audit event.
    pub audit: AuditEvent,
}

/// A single-use evidence key and how long it must be remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayKey {
    /// The key, e.g. `jti:<issuer>#<jti>`.
    pub key: String,
    /// Until when (Unix seconds) a second use is a replay.
    pub expires_at: i64,
}

/// The outcome of a [`Commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Committed {
    /// Everything was written.
    Done {
        /// The audit record's sequence number.
        audit_seq: u64,
    },
    /// The token could not be consumed: only a refusal audit record was written.
    TokenRejected(ErrorCode),
}

/// A stored audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Sequence number.
    pub seq: u64,
    /// The event.
    pub event: AuditEvent,
    /// The previous record's hash.
    pub prev_hash: [u8; 32],
    /// This record's hash.
    pub hash: [u8; 32],
}

/// The result of verifying the audit chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditChainReport {
    /// First record checked (0 when none).
    pub first_seq: u64,
    /// Last record checked (0 when none).
    pub last_seq: u64,
    /// Records checked.
    pub records: u64,
}

/// The datastore handle; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: SqlitePool,
    stats: Arc<writer::WriterStats>,
    lookups: mpsc::Sender<reader::Lookup>,
    tx: Mutex<Option<mpsc::Sender<writer::Request>>>,
    writer: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

fn migrator() -> Migrator {
    let m = |version, name: &str, sql: &'static str| {
        Migration::new(
            version,
            name.to_string().into(),
            MigrationType::Simple,
            sql.into_sql_str(),
            false,
        )
    };
    Migrator::with_migrations(vec![
        m(
            1,
            "init",
            include_str!("../migrations/sqlite/0001_init.sql"),
        ),
        m(
            2,
            "replay_cache",
            include_str!("../migrations/sqlite/0002_replay_cache.sql"),
        ),
        m(
            3,
            "audit_time_index",
            include_str!("../migrations/sqlite/0003_audit_time_index.sql"),
        ),
        m(
            4,
            "report_indexes",
            include_str!("../migrations/sqlite/0004_report_indexes.sql"),
        ),
        m(
            5,
            "nodes",
            include_str!("../migrations/sqlite/0005_nodes.sql"),
        ),
    ])
}

fn hash32(v: Vec<u8>, what: &str) -> Result<[u8; 32], StoreError> {
    v.try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is not 32 bytes")))
}

impl Store {
    /// Opens (creating if missing) the database at `url` (`sqlite://path`,
    /// `sqlite:path` or a bare path), applies migrations and starts the
    /// writer task. Needs a tokio runtime.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let url = if url.starts_with("sqlite:") {
            url.to_owned()
        } else {
            format!("sqlite://{url}")
        };
        let opts = SqliteConnectOptions::from_str(&url)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(5));
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(opts.clone())
            .await?;
        migrator().run(&pool).await?;
        let (tx, rx) = mpsc::channel(4096);
        let stats = Arc::new(writer::WriterStats::default());
        let writer = tokio::spawn(writer::run(opts, rx, stats.clone()));
        let (lookups, lookup_rx) = mpsc::channel(4096);
        // The reader task ends when the last Store handle (and its sender) is dropped.
        tokio::spawn(reader::run(pool.clone(), lookup_rx));
        Ok(Store {
            inner: Arc::new(Inner {
                pool,
                stats,
                lookups,
                tx: Mutex::new(Some(tx)),
                writer: Mutex::new(Some(writer)),
            }),
        })
    }

    /// Group-commit counters since open: (write transactions, commits in them).
    pub fn write_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (
            self.inner.stats.transactions.load(Ordering::Relaxed),
            self.inner.stats.commits.load(Ordering::Relaxed),
        )
    }

    /// Readiness probe.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.inner.pool).await?;
        Ok(())
    }

    fn sender(&self) -> Result<mpsc::Sender<writer::Request>, StoreError> {
        self.inner
            .tx
            .lock()
            .map_err(|_| StoreError::WriterGone)?
            .clone()
            .ok_or(StoreError::WriterGone)
    }

    /// Stores a join token and its audit record in one transaction.
    pub async fn create_join_token(
        &self,
        token: NewJoinToken,
        audit: AuditEvent,
    ) -> Result<u64, StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO join_tokens (token_hash, token_id, spiffe_id, created_at, expires_at, used_at, created_by) \
             VALUES ($1, $2, $3, $4, $5, NULL, $6)",
        )
        .bind(token.token_hash.as_slice())
        .bind(&token.token_id)
        .bind(&token.spiffe_id)
        .bind(token.created_at)
        .bind(token.expires_at)
        .bind(&token.created_by)
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
        self.inner
            .lookups
            .send(reader::Lookup::JoinToken(*token_hash, reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Every join token, newest first.
    pub async fn list_join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT token_id, spiffe_id, created_at, expires_at, used_at, created_by FROM join_tokens ORDER BY created_at DESC",
        )
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter().map(join_token_from_row).collect()
    }

    /// Group-commits a token consumption, an issued credential and an audit
    /// record atomically. If the token cannot be consumed, only the audit
    /// event — rewritten as a refusal with the reason — is written.
    pub async fn commit(&self, c: Commit) -> Result<Committed, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.sender()?
            .send(writer::Request { commit: c, reply })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Appends one audit event through the group commit.
    pub async fn audit(&self, event: AuditEvent) -> Result<u64, StoreError> {
        let c = Commit {
            consume_join_token: None,
            consume_replay: None,
            now_s: 0,
            issued: None,
            audit: event,
        };
        match self.commit(c).await? {
            Committed::Done { audit_seq } => Ok(audit_seq),
            Committed::TokenRejected(_) => {
                Err(StoreError::Corrupt("audit-only commit rejected".into()))
            }
        }
    }

    /// An issued credential by serial.
    pub async fn issued(&self, serial: &str) -> Result<Option<IssuedCredential>, StoreError> {
        let row = sqlx::query(
            "SELECT serial, kind, spiffe_id, not_before, not_after, issued_at, evidence_type, evidence_digest, \
             policy, parent_serial, public_key_sha256, ca_key_id FROM issued_credentials WHERE serial = $1",
        )
        .bind(serial)
        .fetch_optional(&self.inner.pool)
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
        self.inner
            .lookups
            .send(reader::Lookup::CredentialStatus(serial.to_owned(), reply))
            .await
            .map_err(|_| StoreError::WriterGone)?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Whether `serial` is revoked.
    pub async fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query("SELECT 1 FROM revocations WHERE serial = $1")
            .bind(serial)
            .fetch_optional(&self.inner.pool)
            .await?
            .is_some())
    }

    /// Revokes an issued credential (revocation row and audit record in one
    /// transaction). `Ok(false)` when no such credential was issued; revoking
    /// twice keeps the first revocation.
    pub async fn revoke(
        &self,
        serial: &str,
        reason: &str,
        revoked_by: &str,
        audit: AuditEvent,
    ) -> Result<bool, StoreError> {
        let mut tx = self.begin_write().await?;
        let exists = sqlx::query("SELECT 1 FROM issued_credentials WHERE serial = $1")
            .bind(serial)
            .fetch_optional(&mut *tx)
            .await?
            .is_some();
        if !exists {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO revocations (serial, revoked_at, reason, revoked_by) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (serial) DO NOTHING",
        )
        .bind(serial)
        .bind(audit.time_ms / 1000)
        .bind(reason)
        .bind(revoked_by)
        .execute(&mut *tx)
        .await?;
        append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The CA key ring, oldest first.
    pub async fn ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT key_id, kind, status, cert_der, chain_der, encrypted_key, not_before, not_after, created_at \
             FROM ca_keys ORDER BY created_at, key_id",
        )
        .fetch_all(&self.inner.pool)
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
                })
            })
            .collect()
    }

    /// Adds a CA key and bumps the bundle sequence, with its audit record, in one transaction.
    pub async fn insert_ca_key(
        &self,
        key: CaKeyRecord,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        let mut tx = self.begin_write().await?;
        sqlx::query(
            "INSERT INTO ca_keys (key_id, kind, status, cert_der, chain_der, encrypted_key, not_before, not_after, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
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
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('bundle_sequence', '1') \
             ON CONFLICT (key) DO UPDATE SET value = CAST(CAST(meta.value AS INTEGER) + 1 AS TEXT)",
        )
        .execute(&mut *tx)
        .await?;
        append_audit(&mut tx, std::slice::from_ref(&audit)).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The bundle's `spiffe_sequence` (0 before any CA key).
    pub async fn bundle_sequence(&self) -> Result<u64, StoreError> {
        let v: Option<(String,)> =
            sqlx::query_as("SELECT value FROM meta WHERE key = 'bundle_sequence'")
                .fetch_optional(&self.inner.pool)
                .await?;
        match v {
            None => Ok(0),
            Some((s,)) => s
                .parse()
                .map_err(|_| StoreError::Corrupt("bundle_sequence is not a number".into())),
        }
    }

    /// Up to `limit` audit records after `after_seq`, in order.
    pub async fn audit_records(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, time_ms, caller, action, evidence_type, evidence_digest, policy, spiffe_id, serial, \
             outcome, reason, prev_hash, hash FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(after_seq as i64)
        .bind(i64::from(limit))
        .fetch_all(&self.inner.pool)
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
        .fetch_all(&self.inner.pool)
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
        .fetch_all(&self.inner.pool)
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
             outcome, reason, prev_hash, hash FROM audit_log \
             WHERE seq > $1 AND time_ms >= $2 AND time_ms < $3 ORDER BY seq LIMIT $4",
        )
        .bind(after_seq as i64)
        .bind(since_ms)
        .bind(until_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.inner.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// Recomputes the chain from `from` (≥ 1) to `to` (inclusive; `None` = the end).
    pub async fn verify_audit_chain(
        &self,
        from: u64,
        to: Option<u64>,
    ) -> Result<AuditChainReport, StoreError> {
        let from = from.max(1);
        let mut prev_hash = if from == 1 {
            GENESIS
        } else {
            let row: Option<(Vec<u8>,)> =
                sqlx::query_as("SELECT hash FROM audit_log WHERE seq = $1")
                    .bind((from - 1) as i64)
                    .fetch_optional(&self.inner.pool)
                    .await?;
            match row {
                Some((h,)) => hash32(h, "hash")?,
                None => {
                    return Err(StoreError::AuditChainBroken {
                        seq: from - 1,
                        reason: "record is missing".into(),
                    });
                }
            }
        };
        let mut report = AuditChainReport {
            first_seq: 0,
            last_seq: 0,
            records: 0,
        };
        let mut expected = from;
        loop {
            let page = self.audit_records(expected - 1, 1000).await?;
            let page_len = page.len();
            for rec in page {
                if to.is_some_and(|t| rec.seq > t) {
                    return Ok(report);
                }
                let broken = |reason: &str| StoreError::AuditChainBroken {
                    seq: rec.seq.min(expected),
                    reason: reason.to_owned(),
                };
                if rec.seq != expected {
                    return Err(broken("sequence gap: a record was removed"));
                }
                if rec.prev_hash != prev_hash {
                    return Err(broken("prev_hash does not match the previous record"));
                }
                if audit_hash(rec.seq, &prev_hash, &rec.event) != rec.hash {
                    return Err(broken("hash mismatch: the record was altered"));
                }
                if report.records == 0 {
                    report.first_seq = rec.seq;
                }
                report.last_seq = rec.seq;
                report.records += 1;
                prev_hash = rec.hash;
                expected += 1;
            }
            if page_len < 1000 {
                break;
            }
        }
        if let Some(t) = to
            && report.last_seq < t
            && t >= from
        {
            return Err(StoreError::AuditChainBroken {
                seq: expected,
                reason: "record is missing".into(),
            });
        }
        Ok(report)
    }

    /// Stops the writer after it drains, and closes the pool.
    pub async fn close(&self) {
        let tx = self.inner.tx.lock().ok().and_then(|mut g| g.take());
        drop(tx);
        let handle = self.inner.writer.lock().ok().and_then(|mut g| g.take());
        if let Some(h) = handle {
            let _ = h.await;
        }
        self.inner.pool.close().await;
    }

    pub(crate) async fn begin_write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.inner.pool.begin_with("BEGIN IMMEDIATE").await?)
    }
}

fn join_token_from_row(r: &SqliteRow) -> Result<JoinTokenRecord, StoreError> {
    Ok(JoinTokenRecord {
        token_id: r.try_get(0)?,
        spiffe_id: r.try_get(1)?,
        created_at: r.try_get(2)?,
        expires_at: r.try_get(3)?,
        used_at: r.try_get(4)?,
        created_by: r.try_get(5)?,
    })
}

fn audit_from_row(r: &SqliteRow) -> Result<AuditRecord, StoreError> {
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
        },
        prev_hash: hash32(r.try_get(11)?, "prev_hash")?,
        hash: hash32(r.try_get(12)?, "hash")?,
    })
}

/// An audit row ready to insert: (seq, event, prev_hash, hash).
pub(crate) type ChainRow<'a> = (u64, &'a AuditEvent, [u8; 32], [u8; 32]);

/// Chains `events` after the record (`tail_seq`, `tail_hash`).
pub(crate) fn chain_rows(
    tail_seq: u64,
    tail_hash: [u8; 32],
    events: &[AuditEvent],
) -> Vec<ChainRow<'_>> {
    let (mut seq, mut prev) = (tail_seq, tail_hash);
    events
        .iter()
        .map(|e| {
            seq += 1;
            let hash = audit_hash(seq, &prev, e);
            let row = (seq, e, prev, hash);
            prev = hash;
            row
        })
        .collect()
}

/// Appends a multi-row `INSERT INTO audit_log` statement to `qb`.
pub(crate) fn push_audit_insert(qb: &mut QueryBuilder<Sqlite>, rows: &[ChainRow<'_>]) {
    qb.push(
        "INSERT INTO audit_log (seq, time_ms, caller, action, evidence_type, evidence_digest, policy, \
         spiffe_id, serial, outcome, reason, prev_hash, hash) ",
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
            .push_bind(hash.to_vec());
    });
}

/// Appends `events` to the chain inside `tx`; returns the last sequence number.
pub(crate) async fn append_audit(
    tx: &mut Transaction<'static, Sqlite>,
    events: &[AuditEvent],
) -> Result<u64, StoreError> {
    let tail: Option<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1")
            .fetch_optional(&mut **tx)
            .await?;
    let (mut seq, mut prev) = match tail {
        Some((s, h)) => (s as u64, hash32(h, "hash")?),
        None => (0, GENESIS),
    };
    // SQLite allows 32766 bound parameters; 13 per row.
    for chunk in events.chunks(1000) {
        let rows = chain_rows(seq, prev, chunk);
        if let Some(last) = rows.last() {
            (seq, prev) = (last.0, last.3);
        }
        let mut qb = QueryBuilder::<Sqlite>::new("");
        push_audit_insert(&mut qb, &rows);
        qb.build().execute(&mut **tx).await?;
    }
    Ok(seq)
}
