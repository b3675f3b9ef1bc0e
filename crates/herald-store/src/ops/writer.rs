//! The group-commit writer: one task with a connection of its own, one
//! transaction per batch of queued commits, one fsync shared by the batch.
//!
//! A batch that is still small waits briefly for the commits that
//! requests in flight have promised ([`crate::PendingCommit`]), so that at
//! low load they share a transaction too.
//!
//! A batch is two scripts: `BEGIN; <write lock>; SELECT <chain tail>;
//! UPDATE join_tokens … RETURNING; INSERT replay_cache … RETURNING` and then
//! `INSERT issued…; INSERT audit…; COMMIT` (plus one lookup, only when some
//! token was refused, to name the reason). SQLite runs each script as one
//! query — each round trip is a hand-off to sqlx's connection thread, which
//! dominates a lightly loaded request; PostgreSQL runs it statement by
//! statement on one connection.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use herald_core::{AuditEvent, ErrorCode};
use sqlx::{Connection, QueryBuilder, Row};
use tokio::sync::mpsc;

use super::lineage::STANDING_JOINS;
use super::store::push_audit_insert;
use super::{BEGIN_WRITE, Conn, Db, DbRow, MAX_PARAMS, MULTI_STATEMENT, Options};
use crate::{
    Commit, Committed, GENESIS, StoreError, WriteRequest, WriterStats, chain_rows, hash32,
    is_retryable,
};

/// The most commits folded into one transaction: at most 33 bound
/// parameters per commit (15 for the issued record, 14 for the audit
/// record, a token, a replay key and its expiry, a parent), and a script's
/// statements share SQLite's parameter limit.
const MAX_BATCH: usize = if MAX_PARAMS / 34 < 512 {
    MAX_PARAMS / 34
} else {
    512
};

/// Below this many commits a batch waits for promised ones; at and above
/// it, the transaction's shared pages are already spread thin (a
/// transaction writes about 8 pages whoever is in it, plus about 2.6 per
/// issuance: docs/performance.md).
const GATHER: usize = 8;

/// The longest a small batch waits for promised commits (tokio's timer
/// rounds it up to its millisecond tick).
const GATHER_WAIT: std::time::Duration = std::time::Duration::from_micros(500);

/// How many times a batch that failed on a serialization failure or
/// deadlock (PostgreSQL) is retried before its callers get the error.
const RETRIES: usize = 3;

/// How often expired replay keys are deleted.
const PURGE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(60);

/// Statements sent as one query where the backend allows it.
struct Script {
    /// Each query and whether its rows are wanted.
    parts: Vec<(QueryBuilder<Db>, bool)>,
    /// Statements in it (several per query on SQLite).
    statements: u64,
}

impl Script {
    fn new() -> Script {
        Script {
            parts: Vec::new(),
            statements: 0,
        }
    }

    /// Starts the next statement; binds pushed after it belong to it.
    fn stmt(&mut self, sql: &str) -> &mut QueryBuilder<Db> {
        self.push(sql, true)
    }

    /// Starts a statement whose rows are not wanted.
    fn silent(&mut self, sql: &str) -> &mut QueryBuilder<Db> {
        self.push(sql, false)
    }

    fn push(&mut self, sql: &str, rows: bool) -> &mut QueryBuilder<Db> {
        self.statements += 1;
        if MULTI_STATEMENT && let Some((last, wanted)) = self.parts.last_mut() {
            last.push("; ").push(sql);
            *wanted |= rows;
        } else {
            self.parts.push((QueryBuilder::new(sql), rows));
        }
        let n = self.parts.len() - 1;
        &mut self.parts[n].0
    }

    /// Runs the statements in order; returns the rows of those that want them.
    async fn run(mut self, conn: &mut Conn, stats: &WriterStats) -> Result<Vec<DbRow>, StoreError> {
        stats
            .statements
            .fetch_add(self.statements, Ordering::Relaxed);
        let mut rows = Vec::new();
        for (qb, wanted) in &mut self.parts {
            if *wanted {
                rows.extend(qb.build().fetch_all(&mut *conn).await?);
            } else {
                qb.build().execute(&mut *conn).await?;
            }
        }
        Ok(rows)
    }
}

pub(crate) async fn run(
    opts: Options,
    write_lock: Option<String>,
    mut rx: mpsc::Receiver<WriteRequest>,
    stats: Arc<WriterStats>,
) {
    let lock = write_lock.as_deref();
    let mut conn: Option<Conn> = None;
    let mut last_purge = std::time::Instant::now();
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        drain(&mut rx, &mut batch);
        // A small batch waits for the commits promised by requests in
        // flight (`PendingCommit`): at low load each request would
        // otherwise write — and fsync — the transaction's shared pages on
        // its own. A batch that is already large, or nothing promised,
        // goes at once; the wait is bounded by the timer's granularity.
        let deadline = tokio::time::Instant::now() + GATHER_WAIT;
        while batch.len() < GATHER && stats.promised.load(Ordering::Relaxed) > 0 {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => {
                    batch.push(r);
                    drain(&mut rx, &mut batch);
                }
                _ => break,
            }
        }
        let (commits, replies): (Vec<Commit>, Vec<_>) =
            batch.into_iter().map(|r| (r.commit, r.reply)).unzip();
        stats.transactions.fetch_add(1, Ordering::Relaxed);
        stats
            .commits
            .fetch_add(commits.len() as u64, Ordering::Relaxed);
        let c = match &mut conn {
            Some(c) => c,
            None => match Conn::connect_with(&opts).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    let msg = e.to_string();
                    for reply in replies {
                        let _ = reply.send(Err(StoreError::Corrupt(format!(
                            "datastore unavailable: {msg}"
                        ))));
                    }
                    continue;
                }
            },
        };
        // Expired replay keys are purged about once a minute, inside a
        // batch's transaction, so the table stays bounded.
        let purge_before = (last_purge.elapsed() >= PURGE_INTERVAL).then(|| {
            last_purge = std::time::Instant::now();
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64)
        });
        let began = std::time::Instant::now();
        let mut result = write_batch(c, lock, &commits, purge_before, &stats).await;
        for _ in 0..RETRIES {
            match &result {
                Err(StoreError::Database(e)) if is_retryable(e) => {
                    result = write_batch(c, lock, &commits, purge_before, &stats).await;
                }
                _ => break,
            }
        }
        if result.as_ref().is_err_and(crate::is_broken_connection) {
            // The connection is broken: open a fresh one for the next batch.
            conn = None;
        }
        let Some(c) = conn.as_mut() else {
            for reply in replies {
                let _ = reply.send(Err(StoreError::Corrupt("datastore connection lost".into())));
            }
            continue;
        };
        match result {
            Ok(results) => {
                for (reply, res) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(res));
                }
            }
            Err(e) if commits.len() > 1 => {
                // One bad item (say, a duplicate serial) must not fail the
                // others: retry each on its own so only it gets the error.
                tracing::warn!(error = %e, size = commits.len(), "batch commit failed; retrying items one by one");
                for (commit, reply) in commits.into_iter().zip(replies) {
                    let res = write_batch(c, lock, std::slice::from_ref(&commit), None, &stats)
                        .await
                        .and_then(|mut v| v.pop().ok_or(StoreError::WriterGone));
                    let _ = reply.send(res);
                }
            }
            Err(e) => {
                if let Some(reply) = replies.into_iter().next() {
                    let _ = reply.send(Err(e));
                }
            }
        }
        stats.record_write(began.elapsed());
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
}

/// Moves every queued request into `batch`, up to [`MAX_BATCH`].
fn drain(rx: &mut mpsc::Receiver<WriteRequest>, batch: &mut Vec<WriteRequest>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(r) => batch.push(r),
            Err(_) => break,
        }
    }
}

/// Writes `commits` in one transaction; on any error the transaction is
/// rolled back and nothing of the batch remains.
async fn write_batch(
    conn: &mut Conn,
    lock: Option<&str>,
    commits: &[Commit],
    purge_before: Option<i64>,
    stats: &WriterStats,
) -> Result<Vec<Committed>, StoreError> {
    let result = write_batch_inner(conn, lock, commits, purge_before, stats).await;
    if result.is_err() {
        // Ignore the outcome: there may be no transaction left to roll back.
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
    }
    result
}

async fn write_batch_inner(
    conn: &mut Conn,
    lock: Option<&str>,
    commits: &[Commit],
    purge_before: Option<i64>,
    stats: &WriterStats,
) -> Result<Vec<Committed>, StoreError> {
    // Round trip 1: open the transaction, read the chain tail, consume tokens.
    let mut first_use: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, c) in commits.iter().enumerate() {
        if let Some(h) = c.consume_join_token {
            first_use.entry(h).or_insert(i);
        }
    }
    let mut first_replay: HashMap<&str, (usize, i64)> = HashMap::new();
    for (i, c) in commits.iter().enumerate() {
        if let Some(r) = &c.consume_replay {
            first_replay
                .entry(r.key.as_str())
                .or_insert((i, r.expires_at));
        }
    }
    let now = commits
        .iter()
        .filter(|c| c.consume_join_token.is_some() || c.consume_replay.is_some())
        .map(|c| c.now_s)
        .max()
        .unwrap_or(0);
    let parents: HashSet<&str> = commits.iter().filter_map(|c| c.parent.as_deref()).collect();
    let mut script = Script::new();
    script.silent(BEGIN_WRITE);
    if let Some(lock) = lock {
        script.silent(lock);
    }
    script.stmt("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1");
    if !first_use.is_empty() {
        let qb = script.stmt("UPDATE join_tokens SET used_at = ");
        qb.push_bind(now)
            .push(" WHERE used_at IS NULL AND expires_at > ")
            .push_bind(now)
            .push(" AND token_hash IN (");
        let mut sep = qb.separated(", ");
        for h in first_use.keys() {
            sep.push_bind(h.to_vec());
        }
        qb.push(") RETURNING token_hash");
    }
    if !first_replay.is_empty() {
        // A key already present and unexpired is a replay: the upsert
        // returns only keys it inserted or revived from expiry.
        let qb = script.stmt("INSERT INTO replay_cache (key, expires_at) ");
        qb.push_values(&first_replay, |mut b, (key, (_, exp))| {
            b.push_bind(key.to_string()).push_bind(*exp);
        });
        qb.push(" ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at WHERE replay_cache.expires_at < ")
            .push_bind(now)
            .push(" RETURNING key, 0, 0");
    }
    if !parents.is_empty() {
        // Read under the write lock: a revocation or ban committed before
        // this transaction is seen, one after it cannot have been missed.
        let qb = script.stmt(
            "SELECT i.serial, r.serial AS revoked, rr.serial AS root_revoked, n.status FROM issued_credentials i",
        );
        qb.push(STANDING_JOINS).push("WHERE i.serial IN (");
        let mut sep = qb.separated(", ");
        for p in &parents {
            sep.push_bind(p.to_string());
        }
        qb.push(")");
    }
    if let Some(before) = purge_before {
        script
            .silent("DELETE FROM replay_cache WHERE expires_at < ")
            .push_bind(before);
    }
    let rows = script.run(conn, stats).await?;
    let (mut tail_seq, mut tail_hash) = (0u64, GENESIS);
    let mut consumed = HashSet::new();
    let mut recorded: HashSet<String> = HashSet::new();
    let mut standing: HashMap<String, Option<ErrorCode>> = HashMap::new();
    for row in rows {
        // Told apart by width: the chain tail has two columns, consumed
        // join tokens one, recorded replay keys three, parents four.
        match row.len() {
            2 => {
                let seq: i64 = row.try_get(0)?;
                tail_seq = seq as u64;
                tail_hash = hash32(row.try_get(1)?, "hash")?;
            }
            3 => {
                recorded.insert(row.try_get(0)?);
            }
            4 => {
                let revoked: Option<String> = row.try_get(1)?;
                let root_revoked: Option<String> = row.try_get(2)?;
                let node: Option<String> = row.try_get(3)?;
                let code = if revoked.is_some() || root_revoked.is_some() {
                    Some(ErrorCode::SvidRevoked)
                } else if node.as_deref() == Some(crate::NodeStatus::Banned.as_str()) {
                    Some(ErrorCode::NodeBanned)
                } else {
                    None
                };
                standing.insert(row.try_get(0)?, code);
            }
            _ => {
                consumed.insert(hash32(row.try_get(0)?, "token_hash")?);
            }
        }
    }

    // Only when a token was refused: find out why, for the audit record.
    let failed: Vec<[u8; 32]> = first_use
        .keys()
        .filter(|h| !consumed.contains(*h))
        .copied()
        .collect();
    let mut reasons: HashMap<[u8; 32], ErrorCode> = HashMap::new();
    if !failed.is_empty() {
        let mut qb = QueryBuilder::<Db>::new(
            "SELECT token_hash, used_at, expires_at FROM join_tokens WHERE token_hash IN (",
        );
        let mut sep = qb.separated(", ");
        for h in &failed {
            sep.push_bind(h.to_vec());
        }
        qb.push(")");
        stats.statements.fetch_add(1, Ordering::Relaxed);
        let rows: Vec<(Vec<u8>, Option<i64>, i64)> =
            qb.build_query_as().fetch_all(&mut *conn).await?;
        for (h, used_at, expires_at) in rows {
            let code = if used_at.is_none() && expires_at <= now {
                ErrorCode::JoinTokenExpired
            } else {
                ErrorCode::JoinTokenUsed
            };
            reasons.insert(hash32(h, "token_hash")?, code);
        }
    }
    let rejected: Vec<Option<ErrorCode>> = commits
        .iter()
        .enumerate()
        .map(|(i, c)| {
            if let Some(p) = &c.parent {
                match standing.get(p) {
                    Some(None) => {}
                    Some(Some(code)) => return Some(*code),
                    None => return Some(ErrorCode::SvidInvalid),
                }
            }
            if let Some(r) = &c.consume_replay {
                let first = first_replay.get(r.key.as_str()).map(|(f, _)| *f);
                if !recorded.contains(&r.key) || first != Some(i) {
                    return Some(ErrorCode::TokenReplayed);
                }
            }
            let h = c.consume_join_token?;
            if consumed.contains(&h) {
                (first_use.get(&h) != Some(&i)).then_some(ErrorCode::JoinTokenUsed)
            } else {
                Some(
                    reasons
                        .get(&h)
                        .copied()
                        .unwrap_or(ErrorCode::JoinTokenUnknown),
                )
            }
        })
        .collect();

    // Round trip 2: issued credentials, audit records, commit.
    let events: Vec<AuditEvent> = commits
        .iter()
        .zip(&rejected)
        .map(|(c, r)| match r {
            None => c.audit.clone(),
            Some(code) => {
                let mut e = c.audit.clone().deny(*code);
                e.serial = None;
                e
            }
        })
        .collect();
    let chain = chain_rows(tail_seq, tail_hash, &events);
    let issued: Vec<_> = commits
        .iter()
        .zip(&rejected)
        .filter(|(_, r)| r.is_none())
        .filter_map(|(c, _)| c.issued.as_ref())
        .collect();
    let mut script = Script::new();
    // A refused commit leaves nothing behind: a token it consumed, or a
    // replay key it recorded, before another of its checks refused it is
    // put back as it was.
    let mut unconsume = Vec::new();
    let mut unrecord = Vec::new();
    for (i, (c, r)) in commits.iter().zip(&rejected).enumerate() {
        if r.is_none() {
            continue;
        }
        if let Some(h) = c.consume_join_token
            && consumed.contains(&h)
            && first_use.get(&h) == Some(&i)
        {
            unconsume.push(h);
        }
        if let Some(k) = &c.consume_replay
            && recorded.contains(&k.key)
            && first_replay.get(k.key.as_str()).map(|(f, _)| *f) == Some(i)
        {
            unrecord.push(k.key.clone());
        }
    }
    if !unconsume.is_empty() {
        let qb = script.silent("UPDATE join_tokens SET used_at = NULL WHERE token_hash IN (");
        let mut sep = qb.separated(", ");
        for h in &unconsume {
            sep.push_bind(h.to_vec());
        }
        qb.push(")");
    }
    if !unrecord.is_empty() {
        let qb = script.silent("DELETE FROM replay_cache WHERE key IN (");
        let mut sep = qb.separated(", ");
        for k in &unrecord {
            sep.push_bind(k.clone());
        }
        qb.push(")");
    }
    if !issued.is_empty() {
        let qb = script.stmt(
            "INSERT INTO issued_credentials (serial, kind, spiffe_id, not_before, not_after, issued_at, evidence_type, \
             evidence_digest, policy, parent_serial, public_key_sha256, ca_key_id, origin, root_serial, root_at) ",
        );
        qb.push_values(&issued, |mut b, i| {
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
                .push_bind(i.root_at);
        });
    }
    push_audit_insert(script.stmt(""), &chain);
    script.silent("COMMIT");
    script.run(conn, stats).await?;

    Ok(rejected
        .into_iter()
        .zip(&chain)
        .map(|(r, row)| match r {
            None => Committed::Done { audit_seq: row.0 },
            Some(code) => Committed::Refused(code),
        })
        .collect())
}
