//! Herald's datastore.
//!
//! sqlx over SQLite (one file; WAL, `synchronous=FULL`: every commit is
//! durable before its caller hears back) or PostgreSQL (several server
//! replicas sharing one database), chosen by the URL. Holds join tokens
//! (hashed), issued credentials, revocations, the node registry, the CA key
//! ring and the append-only, hash-chained audit log.
//!
//! The SQL is written once (`src/ops/`) and compiled for each backend
//! (`sqlite`, `postgres`: types, dialect constants, connecting); [`Store`]
//! dispatches to the one the URL chose.
//!
//! Writes on the hot path go through one writer task that **group-commits**:
//! it drains every queued [`Commit`] into a single transaction with
//! multi-row statements, then answers each caller with its own outcome.
//! Every write transaction first takes the store-wide write lock (SQLite's
//! `BEGIN IMMEDIATE`; a PostgreSQL transaction-scoped advisory lock) and
//! reads the audit chain's tail inside it, so several processes — server
//! replicas and the admin CLI — append to one chain.
#![forbid(unsafe_code)]

mod audit_chain;
mod nodes;
mod postgres;
mod sqlite;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use herald_core::{AuditEvent, ErrorCode, JoinTokenPurpose, Origin};
pub use herald_core::{CredentialStatus, JoinTokenRecord};
use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use tokio::sync::oneshot;

pub use audit_chain::{GENESIS, audit_hash};
pub use nodes::{
    AGENT_KEY_PREFIX, NodeAttestation, NodeCommitted, NodeRecord, NodeStatus, QUOTE_OK,
    RevocationFilter,
};

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
    /// The writer's thread could not be started.
    #[error("starting the datastore writer: {0}")]
    WriterStart(std::io::Error),
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
    /// What it may be used for.
    pub purpose: JoinTokenPurpose,
    /// The policies it may serve (second factor, node enrolment).
    pub policies: Vec<String>,
    /// Why it was created (required for break-glass).
    pub reason: Option<String>,
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
    /// The credential presented to get this one (renewed SVID, node SVID).
    pub parent_serial: Option<String>,
    /// Hex SHA-256 of the SubjectPublicKeyInfo (X.509) or of the access
    /// key id (cloud); empty for JWTs.
    pub public_key_sha256: String,
    /// The signing CA key (or JWT key, or session keyring key).
    pub ca_key_id: String,
    /// How its lineage began; `None` only for records this version cannot read.
    pub origin: Option<Origin>,
    /// The root of its lineage: itself when issued on fresh evidence.
    pub root_serial: String,
    /// When the root's fresh evidence was presented, Unix seconds.
    pub root_at: i64,
    /// Hex SHA-256 of the certificate's DER (X.509 SVIDs; `None` for other
    /// kinds and for records written before it was kept): a presented
    /// leaf with exactly these bytes needs no signature check.
    pub cert_sha256: Option<String>,
}

/// A server replica's heartbeat: what it serves, as of when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaRecord {
    /// Chosen by the replica at start: host, pid and a random part.
    pub replica_id: String,
    /// Its gRPC listening address.
    pub address: String,
    /// Herald's version.
    pub version: String,
    /// When it started, Unix seconds.
    pub started_at: i64,
    /// When it last recorded itself, Unix milliseconds.
    pub last_seen_ms: i64,
    /// The trust bundle's sequence it serves.
    pub bundle_sequence: u64,
    /// Hex SHA-256 of the policy set in effect; empty without policies.
    pub policy_digest: String,
    /// Its policy reload generation (local to the replica).
    pub policy_generation: u64,
}

/// The database's change counters, polled by every replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sequences {
    /// The trust bundle's `spiffe_sequence`: moves with every key-ring change.
    pub bundle: u64,
    /// Moves with every node ban.
    pub bans: u64,
    /// Moves with every change of a federated trust domain's bundle.
    pub federation: u64,
}

/// A CA key-ring entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaKeyRecord {
    /// Identifier.
    pub key_id: String,
    /// `x509`.
    pub kind: String,
    /// `prepared` (published in the bundle, not yet signing), `active`
    /// (signing), `retiring` (published until what it signed has expired)
    /// or `retired`.
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
    /// When it entered `status`, Unix seconds.
    pub status_since: i64,
}

/// One atomic write on the hot path.
#[derive(Debug, Clone)]
pub struct Commit {
    /// Consume this join token (must exist, be unused and unexpired at `now_s`).
    pub consume_join_token: Option<[u8; 32]>,
    /// Record this single-use evidence key (an OIDC token's jti); refused
    /// with `token_replayed` if it is already recorded and unexpired.
    pub consume_replay: Option<ReplayKey>,
    /// The credential presented to get this one: the commit is refused
    /// (`svid_revoked` or `node_banned`) if, by the time its transaction
    /// runs, it or its lineage's root is revoked or its node banned — so a
    /// revocation racing a renewal always wins.
    pub parent: Option<String>,
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
    /// Refused inside the transaction (the token could not be consumed, the
    /// replay key was taken, the parent's lineage was revoked): only the
    /// refusal's audit record was written, with this code.
    Refused(ErrorCode),
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
    /// Its hash ([`GENESIS`] when none).
    pub last_hash: [u8; 32],
    /// Records checked.
    pub records: u64,
}

/// A signed checkpoint of the audit chain's head, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRecord {
    /// The last record it covers.
    pub seq: u64,
    /// That record's hash.
    pub hash: [u8; 32],
    /// When it was signed, Unix milliseconds.
    pub time_ms: i64,
    /// The audit key that signed it.
    pub key_id: String,
    /// The signed checkpoint (JWS compact).
    pub jws: String,
}

/// A federated trust domain's bundle, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedBundleRecord {
    /// The trust domain (its name, without `spiffe://`).
    pub trust_domain: String,
    /// The validated SPIFFE bundle document, as served to workloads.
    pub jwks: String,
    /// Its `spiffe_sequence`.
    pub sequence: Option<u64>,
    /// Its `spiffe_refresh_hint`, seconds.
    pub refresh_hint_secs: Option<u64>,
    /// `endpoint` (fetched) or `manual` (`herald federation set`).
    pub source: String,
    /// When the content last changed, Unix milliseconds.
    pub updated_at_ms: i64,
    /// The last successful fetch (changed or not), Unix milliseconds.
    pub checked_at_ms: i64,
    /// The last failure since then.
    pub last_error: Option<String>,
    /// When it happened, Unix milliseconds.
    pub last_error_at_ms: Option<i64>,
}

/// A validated bundle document to store for a trust domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewFederatedBundle {
    /// The trust domain it was obtained for.
    pub trust_domain: String,
    /// The document (normalised).
    pub jwks: String,
    /// Its `spiffe_sequence`.
    pub sequence: Option<u64>,
    /// Its `spiffe_refresh_hint`, seconds.
    pub refresh_hint_secs: Option<u64>,
    /// `endpoint` or `manual`.
    pub source: String,
    /// Unix milliseconds.
    pub now_ms: i64,
}

/// What storing a federated bundle did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleUpdate {
    /// The new document replaced the old (or was the first).
    Stored,
    /// The same document again: only its check time moved.
    Unchanged,
    /// Refused: it does not move `spiffe_sequence` past the stored one.
    NotNewer {
        /// The stored sequence.
        stored: u64,
        /// The offered one.
        offered: Option<u64>,
    },
}

/// The datastore handle; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    inner: Arc<Backend>,
}

/// The backend the URL chose.
#[derive(Debug)]
enum Backend {
    Sqlite(sqlite::store::Backend),
    Postgres(postgres::store::Backend),
}

/// Runs `$call` on whichever backend the store holds.
macro_rules! on_backend {
    ($self:ident . $($call:tt)+) => {
        match &*$self.inner {
            Backend::Sqlite(b) => b.$($call)+,
            Backend::Postgres(b) => b.$($call)+,
        }
    };
}

/// A queued [`Commit`] and where its outcome goes.
pub(crate) struct WriteRequest {
    pub commit: Commit,
    pub reply: oneshot::Sender<Result<Committed, StoreError>>,
}

/// Counters of the writer's work, for metrics and benchmarks.
#[derive(Debug, Default)]
pub(crate) struct WriterStats {
    pub transactions: AtomicU64,
    pub commits: AtomicU64,
    /// Statements the writer ran (each write transaction's BEGIN, lock,
    /// reads, inserts and COMMIT).
    pub statements: AtomicU64,
    /// Batched hot-path lookup queries.
    pub reads: AtomicU64,
    /// Outstanding [`PendingCommit`]s: requests whose commit is on its way.
    pub promised: AtomicUsize,
    /// Batches that took [`SLOW_WRITE`] or longer to write.
    pub slow: AtomicU64,
    /// The longest a batch took to write, in microseconds.
    pub longest_micros: AtomicU64,
    /// Guarded batches that aborted and were written again, checked.
    pub rewritten: AtomicU64,
}

/// A batch that takes this long to write holds up every request in it and
/// behind it: counted apart ([`QueryStats::slow_transactions`]), so that a
/// burst of slow requests can be told to be the store's or not.
pub const SLOW_WRITE: std::time::Duration = std::time::Duration::from_millis(10);

impl WriterStats {
    /// Records how long writing one batch took, retries included.
    pub(crate) fn record_write(&self, took: std::time::Duration) {
        if took >= SLOW_WRITE {
            self.slow.fetch_add(1, Ordering::Relaxed);
        }
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.longest_micros.fetch_max(micros, Ordering::Relaxed);
    }
}

/// A request's word that a [`Commit`] of its will reach the writer soon:
/// it is past admission and will be granted or refused, either way with an
/// audit record. While such promises are outstanding the writer, holding a
/// small batch, waits briefly for them, so that requests in flight share
/// one transaction and its fsync instead of each paying for its own —
/// which is what made CPU per request grow as load fell. Drop it once the
/// commit is sent, or when the request ends without one.
#[derive(Debug)]
#[must_use = "the writer waits for the promised commit while this lives"]
pub struct PendingCommit {
    stats: Arc<WriterStats>,
}

impl Drop for PendingCommit {
    fn drop(&mut self) {
        self.stats.promised.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Hot-path datastore work since open: what one issuance costs the database.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryStats {
    /// Write transactions (each carries a group-committed batch).
    pub transactions: u64,
    /// Commits (issuances, refusals, audit events) in them.
    pub commits: u64,
    /// Statements the writer ran.
    pub write_statements: u64,
    /// Batched lookup queries (join tokens, credential status).
    pub reads: u64,
    /// Write transactions that took [`SLOW_WRITE`] or longer, retries
    /// included.
    pub slow_transactions: u64,
    /// The longest a write transaction took since start.
    pub longest_transaction: std::time::Duration,
    /// Write transactions first tried in one round trip on the guess that
    /// nothing in them is refused and no one else appended to the audit
    /// log, which guessed wrong and were rolled back and written again,
    /// checked (SQLite only). Each refusal on the hot path (a used join
    /// token, a replayed token, a revoked parent) and each audit record
    /// written outside the group commit costs one.
    pub rewritten_transactions: u64,
}

/// A hot-path lookup for the batcher.
pub(crate) enum Lookup {
    JoinToken(
        [u8; 32],
        oneshot::Sender<Result<Option<JoinTokenRecord>, StoreError>>,
    ),
    CredentialStatus(
        String,
        oneshot::Sender<Result<Option<CredentialStatus>, StoreError>>,
    ),
}

/// Whether `e` means the connection itself is broken (and must be
/// replaced), rather than that the statement failed.
pub(crate) fn is_broken_connection(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Database(sqlx::Error::Io(_) | sqlx::Error::Protocol(_))
    )
}

/// Whether a failed write is worth retrying as a whole: PostgreSQL's
/// serialization failure and deadlock (the transaction was rolled back and
/// may succeed when run again).
pub(crate) fn is_retryable(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|c| c == "40001" || c == "40P01")
}

impl Store {
    /// Opens the database at `url` and applies migrations: `postgres://…`
    /// (or `postgresql://…`) for PostgreSQL, otherwise SQLite (`sqlite://path`,
    /// `sqlite:path` or a bare path; created if missing). Starts the writer
    /// task; needs a tokio runtime.
    ///
    /// PostgreSQL URLs take the usual parameters (`sslmode`, `options` such
    /// as `-c search_path=herald`); a 30 s `statement_timeout` applies
    /// unless the URL sets one.
    pub async fn open(url: &str) -> Result<Store, StoreError> {
        let backend = if postgres::is_url(url) {
            Backend::Postgres(postgres::open(url).await?)
        } else {
            Backend::Sqlite(sqlite::open(url).await?)
        };
        Ok(Store {
            inner: Arc::new(backend),
        })
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        match &*self.inner {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Creates `schema` in the PostgreSQL database at `base_url` if it is
    /// missing and returns a URL whose connections use it — to keep
    /// deployments (or test runs) apart inside one database. `schema` is
    /// lowercase ASCII letters, digits and `_`.
    pub async fn create_postgres_schema(
        base_url: &str,
        schema: &str,
    ) -> Result<String, StoreError> {
        postgres::create_schema(base_url, schema).await
    }

    /// Drops a schema made by [`Store::create_postgres_schema`] and everything in it.
    pub async fn drop_postgres_schema(base_url: &str, schema: &str) -> Result<(), StoreError> {
        postgres::drop_schema(base_url, schema).await
    }

    /// The writer's counters, whichever backend holds them.
    fn stats(&self) -> &Arc<WriterStats> {
        match &*self.inner {
            Backend::Sqlite(b) => &b.stats,
            Backend::Postgres(b) => &b.stats,
        }
    }

    /// Promises a commit on its way (see [`PendingCommit`]).
    pub fn expect_commit(&self) -> PendingCommit {
        let stats = self.stats().clone();
        stats.promised.fetch_add(1, Ordering::Relaxed);
        PendingCommit { stats }
    }

    /// Commits promised ([`Store::expect_commit`]) and not yet sent.
    pub fn pending_commits(&self) -> usize {
        self.stats().promised.load(Ordering::Relaxed)
    }

    /// Hot-path query counters since open (writer and batched lookups; the
    /// admin and key-ring queries are not counted).
    pub fn query_stats(&self) -> QueryStats {
        let s = self.stats();
        QueryStats {
            transactions: s.transactions.load(Ordering::Relaxed),
            commits: s.commits.load(Ordering::Relaxed),
            write_statements: s.statements.load(Ordering::Relaxed),
            reads: s.reads.load(Ordering::Relaxed),
            slow_transactions: s.slow.load(Ordering::Relaxed),
            longest_transaction: std::time::Duration::from_micros(
                s.longest_micros.load(Ordering::Relaxed),
            ),
            rewritten_transactions: s.rewritten.load(Ordering::Relaxed),
        }
    }

    /// Readiness probe.
    pub async fn ping(&self) -> Result<(), StoreError> {
        on_backend!(self.ping().await)
    }

    /// Stores a join token and its audit record in one transaction.
    pub async fn create_join_token(
        &self,
        token: NewJoinToken,
        audit: AuditEvent,
    ) -> Result<u64, StoreError> {
        on_backend!(self.create_join_token(token, audit).await)
    }

    /// Looks a join token up by hash (batched with concurrent lookups).
    pub async fn join_token(
        &self,
        token_hash: &[u8; 32],
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        on_backend!(self.join_token(token_hash).await)
    }

    /// Every join token, newest first.
    pub async fn list_join_tokens(&self) -> Result<Vec<JoinTokenRecord>, StoreError> {
        on_backend!(self.list_join_tokens().await)
    }

    /// Group-commits a token consumption, an issued credential and an audit
    /// record atomically. If the token cannot be consumed, only the audit
    /// event — rewritten as a refusal with the reason — is written.
    pub async fn commit(&self, c: Commit) -> Result<Committed, StoreError> {
        on_backend!(self.commit(c).await)
    }

    /// Appends one audit event through the group commit.
    pub async fn audit(&self, event: AuditEvent) -> Result<u64, StoreError> {
        let c = Commit {
            consume_join_token: None,
            consume_replay: None,
            parent: None,
            now_s: 0,
            issued: None,
            audit: event,
        };
        match self.commit(c).await? {
            Committed::Done { audit_seq } => Ok(audit_seq),
            Committed::Refused(_) => Err(StoreError::Corrupt("audit-only commit rejected".into())),
        }
    }

    /// An issued credential by serial.
    pub async fn issued(&self, serial: &str) -> Result<Option<IssuedCredential>, StoreError> {
        on_backend!(self.issued(serial).await)
    }

    /// What the store knows of `serial` and its lineage's standing (its or
    /// its root's revocation, its node's ban) — the presented-SVID check,
    /// in one batched query.
    pub async fn credential_status(
        &self,
        serial: &str,
    ) -> Result<Option<CredentialStatus>, StoreError> {
        on_backend!(self.credential_status(serial).await)
    }

    /// Whether `serial` is revoked.
    pub async fn is_revoked(&self, serial: &str) -> Result<bool, StoreError> {
        on_backend!(self.is_revoked(serial).await)
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
        on_backend!(self.revoke(serial, reason, revoked_by, audit).await)
    }

    /// Revokes every unexpired credential matching `filter` (at least one
    /// condition is required) or descending from one, with one audit
    /// record, in one transaction;
    /// returns how many were revoked. The incident-response path: "revoke
    /// everything policy P issued in the last hour".
    pub async fn revoke_matching(
        &self,
        filter: &RevocationFilter,
        reason: &str,
        revoked_by: &str,
        audit: AuditEvent,
    ) -> Result<u64, StoreError> {
        on_backend!(
            self.revoke_matching(filter, reason, revoked_by, audit)
                .await
        )
    }

    /// The CA key ring, oldest first.
    pub async fn ca_keys(&self) -> Result<Vec<CaKeyRecord>, StoreError> {
        on_backend!(self.ca_keys().await)
    }

    /// Adds a CA key and bumps the bundle sequence, with its audit record, in one transaction.
    pub async fn insert_ca_key(
        &self,
        key: CaKeyRecord,
        audit: AuditEvent,
    ) -> Result<(), StoreError> {
        self.insert_ca_key_unless(key, &[], audit).await.map(|_| ())
    }

    /// Adds `key` unless the ring already holds a key of its kind in one of
    /// `unless_status` (then `Ok(false)` and nothing is written); bumps the
    /// bundle sequence, with its audit record, in one transaction. Decided
    /// under the store's write lock: replicas starting or rotating together
    /// add one key between them.
    pub async fn insert_ca_key_unless(
        &self,
        key: CaKeyRecord,
        unless_status: &[&str],
        audit: AuditEvent,
    ) -> Result<bool, StoreError> {
        on_backend!(self.insert_ca_key_unless(key, unless_status, audit).await)
    }

    /// Moves CA keys between statuses atomically (`(key_id, from, to)`
    /// each), bumping the bundle sequence, with the audit record. `Ok(false)`
    /// and no change when any key is no longer in its `from` status.
    pub async fn transition_ca_keys(
        &self,
        changes: &[(&str, &str, &str)],
        now_s: i64,
        audit: AuditEvent,
    ) -> Result<bool, StoreError> {
        on_backend!(self.transition_ca_keys(changes, now_s, audit).await)
    }

    /// When the last credential signed by `key_id` expires (Unix seconds).
    pub async fn last_expiry_signed_by(&self, key_id: &str) -> Result<Option<i64>, StoreError> {
        on_backend!(self.last_expiry_signed_by(key_id).await)
    }

    /// Takes or renews the lease `name` for `holder` for `ttl_ms`; `Ok(false)`
    /// while another holder's lease is unexpired. One replica at a time
    /// drives scheduled work (key rotation) with it.
    pub async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> Result<bool, StoreError> {
        on_backend!(self.try_lease(name, holder, now_ms, ttl_ms).await)
    }

    /// The bundle's `spiffe_sequence` (0 before any CA key).
    pub async fn bundle_sequence(&self) -> Result<u64, StoreError> {
        on_backend!(self.bundle_sequence().await)
    }

    /// The bundle and ban sequences in one query: what a replica polls to
    /// learn of rotations and bans made elsewhere.
    pub async fn sequences(&self) -> Result<Sequences, StoreError> {
        on_backend!(self.sequences().await)
    }

    /// Records (or refreshes) a replica's heartbeat.
    pub async fn record_replica(&self, replica: &ReplicaRecord) -> Result<(), StoreError> {
        on_backend!(self.record_replica(replica).await)
    }

    /// Replicas seen since `since_ms` (Unix milliseconds), most recently
    /// seen first.
    pub async fn replicas(&self, since_ms: i64) -> Result<Vec<ReplicaRecord>, StoreError> {
        on_backend!(self.replicas(since_ms).await)
    }

    /// Forgets replicas not seen since `before_ms`; returns how many.
    pub async fn forget_replicas(&self, before_ms: i64) -> Result<u64, StoreError> {
        on_backend!(self.forget_replicas(before_ms).await)
    }

    /// Up to `limit` audit records after `after_seq`, in order.
    pub async fn audit_records(
        &self,
        after_seq: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        on_backend!(self.audit_records(after_seq, limit).await)
    }

    /// Lifetimes of the credentials issued in `[since_s, until_s)`:
    /// (kind, not_before, not_after), for TTL distributions.
    pub async fn issued_lifetimes(
        &self,
        since_s: i64,
        until_s: i64,
    ) -> Result<Vec<(String, i64, i64)>, StoreError> {
        on_backend!(self.issued_lifetimes(since_s, until_s).await)
    }

    /// X.509 SVIDs whose validity ended in `[since_s, until_s)`, each with
    /// when its first renewal was issued (if ever): (serial, SPIFFE ID,
    /// not_after, first renewal's issued_at).
    pub async fn rotation_outcomes(
        &self,
        since_s: i64,
        until_s: i64,
    ) -> Result<Vec<(String, String, i64, Option<i64>)>, StoreError> {
        on_backend!(self.rotation_outcomes(since_s, until_s).await)
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
        on_backend!(
            self.audit_records_between(since_ms, until_ms, after_seq, limit)
                .await
        )
    }

    /// The node with this EK hash.
    pub async fn node_by_ek(&self, ek_hash: &str) -> Result<Option<NodeRecord>, StoreError> {
        on_backend!(self.node_by_ek(ek_hash).await)
    }

    /// The node holding this SPIFFE ID.
    pub async fn node_by_spiffe_id(
        &self,
        spiffe_id: &str,
    ) -> Result<Option<NodeRecord>, StoreError> {
        on_backend!(self.node_by_spiffe_id(spiffe_id).await)
    }

    /// Every node, by SPIFFE ID.
    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        on_backend!(self.list_nodes().await)
    }

    /// Records a verified attestation, its node SVID, the consumed join
    /// token (enrolment factor), a platform token's single-use key (one
    /// already recorded and unexpired refuses it: `token_replayed`) and its
    /// audit record in one transaction — or, when the registry refuses it
    /// (banned node, counters going backwards, another EK claiming the
    /// identity), only the refusal's audit record.
    pub async fn commit_node_attestation(
        &self,
        att: NodeAttestation,
        issued: IssuedCredential,
        consume_join_token: Option<[u8; 32]>,
        consume_replay: Option<ReplayKey>,
        audit: AuditEvent,
    ) -> Result<NodeCommitted, StoreError> {
        on_backend!(
            self.commit_node_attestation(att, issued, consume_join_token, consume_replay, audit)
                .await
        )
    }

    /// Forgets an active node so its hardware or instance may enrol afresh
    /// (`herald node reset`); a banned or unknown node gives `Ok(None)`.
    pub async fn reset_node(
        &self,
        id_or_ek: &str,
        audit: AuditEvent,
    ) -> Result<Option<NodeRecord>, StoreError> {
        on_backend!(self.reset_node(id_or_ek, audit).await)
    }

    /// Records on an enrolled node's row that its latest quote was refused
    /// with `code` at `now_s` (`herald node list` shows it).
    pub async fn record_quote_refusal(
        &self,
        ek_hash: &str,
        now_s: i64,
        code: ErrorCode,
    ) -> Result<(), StoreError> {
        on_backend!(self.record_quote_refusal(ek_hash, now_s, code).await)
    }

    /// Bans the node with this SPIFFE ID or EK hash: its attestations and
    /// renewals are refused from now on, and every unexpired credential
    /// issued to its SPIFFE ID or descending from one (its workloads') is
    /// revoked — all with the audit record, in one transaction. `Ok(None)`
    /// if there is no such node.
    pub async fn ban_node(
        &self,
        id_or_ek: &str,
        banned_by: &str,
        reason: &str,
        audit: AuditEvent,
    ) -> Result<Option<(NodeRecord, u64)>, StoreError> {
        on_backend!(self.ban_node(id_or_ek, banned_by, reason, audit).await)
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
            match self.audit_records(from - 2, 1).await?.pop() {
                Some(r) if r.seq == from - 1 => r.hash,
                _ => {
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
            last_hash: GENESIS,
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
                report.last_hash = rec.hash;
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

    /// The audit chain's head: the last record's sequence number and hash.
    pub async fn audit_head(&self) -> Result<Option<(u64, [u8; 32])>, StoreError> {
        on_backend!(self.audit_head().await)
    }

    /// Stores a signed checkpoint with its audit record, in one transaction;
    /// `Ok(false)` if one for that sequence number exists already.
    pub async fn record_checkpoint(
        &self,
        checkpoint: &CheckpointRecord,
        audit: AuditEvent,
    ) -> Result<bool, StoreError> {
        on_backend!(self.record_checkpoint(checkpoint, audit).await)
    }

    /// Every stored checkpoint, oldest first.
    pub async fn checkpoints(&self) -> Result<Vec<CheckpointRecord>, StoreError> {
        on_backend!(self.checkpoints().await)
    }

    /// Every federated trust domain's bundle.
    pub async fn federated_bundles(&self) -> Result<Vec<FederatedBundleRecord>, StoreError> {
        on_backend!(self.federated_bundles().await)
    }

    /// One federated trust domain's bundle, if stored.
    pub async fn federated_bundle(
        &self,
        trust_domain: &str,
    ) -> Result<Option<FederatedBundleRecord>, StoreError> {
        on_backend!(self.federated_bundle(trust_domain).await)
    }

    /// `(trust domain, checked_at_ms)` of every stored federated bundle,
    /// without the documents.
    pub async fn federation_checked_at(&self) -> Result<Vec<(String, i64)>, StoreError> {
        on_backend!(self.federation_checked_at().await)
    }

    /// Stores a federated trust domain's bundle with `audit`, in one
    /// transaction, unless it is older: a changed document must carry a
    /// higher `spiffe_sequence` than the stored one. The same document
    /// again only marks the bundle as checked (no audit record).
    pub async fn put_federated_bundle(
        &self,
        new: &NewFederatedBundle,
        audit: AuditEvent,
    ) -> Result<BundleUpdate, StoreError> {
        on_backend!(self.put_federated_bundle(new, audit).await)
    }

    /// Records a failed fetch or refused document for `trust_domain`, with
    /// `audit` if given (the refresher audits a failure once per cause, not
    /// every attempt); the stored bundle stays.
    pub async fn record_federation_failure(
        &self,
        trust_domain: &str,
        error: &str,
        now_ms: i64,
        audit: Option<AuditEvent>,
    ) -> Result<(), StoreError> {
        on_backend!(
            self.record_federation_failure(trust_domain, error, now_ms, audit)
                .await
        )
    }

    /// Forgets `trust_domain`'s bundle (with `audit`); `Ok(false)` if none.
    pub async fn delete_federated_bundle(
        &self,
        trust_domain: &str,
        audit: AuditEvent,
    ) -> Result<bool, StoreError> {
        on_backend!(self.delete_federated_bundle(trust_domain, audit).await)
    }

    /// Stops the writer after it drains, and closes the pool.
    pub async fn close(&self) {
        on_backend!(self.close().await)
    }
}

/// A migrator over one backend's migrations: (version, name, SQL).
fn migrator(migrations: &[(i64, &str, &'static str)]) -> Migrator {
    Migrator::with_migrations(
        migrations
            .iter()
            .map(|&(version, name, sql)| {
                Migration::new(
                    version,
                    name.to_string().into(),
                    MigrationType::Simple,
                    sql.into_sql_str(),
                    false,
                )
            })
            .collect(),
    )
}

fn hash32(v: Vec<u8>, what: &str) -> Result<[u8; 32], StoreError> {
    v.try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is not 32 bytes")))
}

/// An audit row ready to insert: (seq, event, prev_hash, hash).
pub(crate) type ChainRow<'a> = (u64, &'a AuditEvent, [u8; 32], [u8; 32]);

/// Chains `events` after the record (`tail_seq`, `tail_hash`).
pub(crate) fn chain_rows<'a>(
    tail_seq: u64,
    tail_hash: [u8; 32],
    events: impl IntoIterator<Item = &'a AuditEvent>,
) -> Vec<ChainRow<'a>> {
    let (mut seq, mut prev) = (tail_seq, tail_hash);
    events
        .into_iter()
        .map(|e| {
            seq += 1;
            let hash = audit_hash(seq, &prev, e);
            let row = (seq, e, prev, hash);
            prev = hash;
            row
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends `n` copies of one event to `store`'s chain in one
    /// transaction, as the node and join-token paths do with theirs.
    async fn append_in_one_transaction(store: &Store, n: usize) -> Result<u64, StoreError> {
        let events = vec![AuditEvent::new("audit.bulk", "test"); n];
        match &*store.inner {
            Backend::Sqlite(b) => {
                let mut tx = b.begin_write().await?;
                let seq = sqlite::store::append_audit(&mut tx, &events).await?;
                tx.commit().await?;
                Ok(seq)
            }
            Backend::Postgres(b) => {
                let mut tx = b.begin_write().await?;
                let seq = postgres::store::append_audit(&mut tx, &events).await?;
                tx.commit().await?;
                Ok(seq)
            }
        }
    }

    /// `n` events, one more than a statement can bind, are split into two
    /// statements, each under the backend's parameter limit, and the chain
    /// they form verifies end to end.
    async fn a_long_append_stays_under_the_parameter_limit(store: &Store, n: usize) {
        let last = append_in_one_transaction(store, n)
            .await
            .unwrap_or_else(|e| panic!("{} events on {}: {e}", n, store.backend()));
        assert_eq!(last, n as u64);
        let report = store.verify_audit_chain(1, None).await.unwrap();
        assert_eq!((report.records, report.last_seq), (n as u64, n as u64));
    }

    #[tokio::test]
    async fn a_long_audit_append_is_split_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&format!("sqlite://{}", dir.path().join("h.db").display()))
            .await
            .unwrap();
        let n = sqlite::MAX_PARAMS / sqlite::store::AUDIT_ROW_PARAMS + 1;
        a_long_append_stays_under_the_parameter_limit(&store, n).await;
        store.close().await;
    }

    #[tokio::test]
    async fn a_long_audit_append_is_split_on_postgres() {
        let base = std::env::var("HERALD_TEST_PG_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
        let schema = format!("herald_unit_audit_{}", std::process::id());
        let url = Store::create_postgres_schema(&base, &schema)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {base} (HERALD_TEST_PG_URL): {e}"));
        let store = Store::open(&url).await.unwrap();
        let n = postgres::MAX_PARAMS / postgres::store::AUDIT_ROW_PARAMS + 1;
        a_long_append_stays_under_the_parameter_limit(&store, n).await;
        store.close().await;
        Store::drop_postgres_schema(&base, &schema).await.unwrap();
    }

    /// A write counts as slow from [`SLOW_WRITE`] on; the longest is kept.
    #[test]
    fn slow_writes_are_counted_and_the_longest_kept() {
        let stats = WriterStats::default();
        stats.record_write(std::time::Duration::from_micros(900));
        stats.record_write(SLOW_WRITE);
        stats.record_write(std::time::Duration::from_millis(40));
        stats.record_write(std::time::Duration::from_millis(3));
        assert_eq!(stats.slow.load(Ordering::Relaxed), 2);
        assert_eq!(stats.longest_micros.load(Ordering::Relaxed), 40_000);
    }
}
