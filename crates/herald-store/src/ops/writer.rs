//! The group-commit writer: one task with a connection of its own, one
//! transaction per batch of queued commits, one fsync shared by the batch.
//!
//! A batch that is still small waits briefly for the commits that
//! requests in flight have promised ([`crate::PendingCommit`]), so that at
//! low load they share a transaction too.
//!
//! A batch is written one of two ways:
//!
//! - **Checked** (`write_checked`): two scripts, `BEGIN; <write lock>;
//!   SELECT <chain tail>; UPDATE join_tokens … RETURNING; INSERT
//!   replay_cache … RETURNING; SELECT <parents' standing>` and then
//!   `INSERT issued…; INSERT audit…; COMMIT` (plus one lookup, only when
//!   some token was refused, to name the reason). Each refusal is decided
//!   between the two from what the first returned.
//! - **Guarded** (`guarded_script`, SQLite only): one script, written on
//!   the assumptions that nothing in the batch is refused and that the
//!   audit chain still ends where this writer's last batch left it. The
//!   script checks each assumption itself and aborts if one is wrong; the
//!   batch is then rolled back and written checked.
//!
//! SQLite runs each script as one query, and each round trip is a hand-off
//! to sqlx's connection thread and back, which dominates a lightly loaded
//! request and stretches a transaction whenever either thread waits for a
//! core: so the common batch, with nothing refused, makes one. PostgreSQL
//! runs a script statement by statement on one connection.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use herald_core::{AuditEvent, ErrorCode};
use sqlx::{Connection, QueryBuilder, Row};
use tokio::sync::mpsc;

use super::lineage::STANDING_JOINS;
use super::store::{AUDIT_ROW_PARAMS, ISSUED_ROW_PARAMS, push_audit_insert, push_issued_insert};
use super::{BEGIN_WRITE, COMMIT_GUARD, Conn, Db, DbRow, MAX_PARAMS, MULTI_STATEMENT, Options};
use crate::{
    ChainRow, Commit, Committed, GENESIS, StoreError, WriteRequest, WriterStats, chain_rows,
    hash32, is_retryable,
};

/// The audit chain's last record as this writer committed it: sequence
/// number and hash.
type Tail = (u64, [u8; 32]);

/// Bound parameters one commit may add to a batch's script: its issued
/// record, its audit record, a token, a replay key and its expiry, a
/// parent.
const COMMIT_PARAMS: usize = ISSUED_ROW_PARAMS + AUDIT_ROW_PARAMS + 4;

/// The most commits folded into one transaction: a script's statements
/// share the backend's parameter limit.
const MAX_BATCH: usize = if MAX_PARAMS / COMMIT_PARAMS < 512 {
    MAX_PARAMS / COMMIT_PARAMS
} else {
    512
};

/// Below this many commits a batch waits for promised ones; at and above
/// it, the transaction's shared pages are already spread thin (a
/// transaction writes about 8 pages whoever is in it, plus about 2.6 per
/// issuance: docs/performance.md). 16 rather than 8, and a wait of 2 ms
/// rather than 0.5: server CPU per request the same or lower at every
/// load, the latency unchanged (docs/performance.md, "A longer gather").
const GATHER: usize = 16;

/// The longest a small batch waits for promised commits (tokio's timer
/// rounds it up to its millisecond tick). Only requests already in
/// flight are waited for: a lone request is written at once.
const GATHER_WAIT: std::time::Duration = std::time::Duration::from_millis(2);

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
    // Known only after a batch of this writer committed; forgotten as soon
    // as one fails, so a guess is never built on a write that did not land.
    let mut tail: Option<Tail> = None;
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
            None => match connect(&opts).await {
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
        let mut result = write_batch(c, lock, &commits, purge_before, &stats, &mut tail).await;
        for _ in 0..RETRIES {
            match &result {
                Err(StoreError::Database(e)) if is_retryable(e) => {
                    result = write_batch(c, lock, &commits, purge_before, &stats, &mut tail).await;
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
                    let res = write_batch(
                        c,
                        lock,
                        std::slice::from_ref(&commit),
                        None,
                        &stats,
                        &mut tail,
                    )
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

/// Opens the writer's connection, with what its guarded batches need.
async fn connect(opts: &Options) -> Result<Conn, sqlx::Error> {
    let mut conn = Conn::connect_with(opts).await?;
    if let Some(setup) = COMMIT_GUARD {
        sqlx::raw_sql(setup).execute(&mut conn).await?;
    }
    Ok(conn)
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

/// Writes `commits` in one transaction, guarded when `tail` is known and
/// checked otherwise or if the guarded attempt fails; on any error the
/// transaction is rolled back and nothing of the batch remains. `tail`
/// follows the chain through each batch that lands.
async fn write_batch(
    conn: &mut Conn,
    lock: Option<&str>,
    commits: &[Commit],
    purge_before: Option<i64>,
    stats: &WriterStats,
    tail: &mut Option<Tail>,
) -> Result<Vec<Committed>, StoreError> {
    if let Some(after) = tail.take()
        && let Some((script, chain)) = guarded_script(after, lock, commits, purge_before)
    {
        match script.run(conn, stats).await {
            Ok(_) => {
                *tail = chain.last().map(|row| (row.0, row.3));
                return Ok(chain
                    .iter()
                    .map(|row| Committed::Done { audit_seq: row.0 })
                    .collect());
            }
            Err(e) => {
                rollback(conn).await;
                stats.rewritten.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, size = commits.len(), "guarded batch aborted; writing it checked");
            }
        }
    }
    match write_checked(conn, lock, commits, purge_before, stats).await {
        Ok((committed, end)) => {
            *tail = Some(end);
            Ok(committed)
        }
        Err(e) => {
            rollback(conn).await;
            Err(e)
        }
    }
}

async fn rollback(conn: &mut Conn) {
    // Ignore the outcome: there may be no transaction left to roll back.
    let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
}

/// The one-round-trip script of a batch in which nothing is refused,
/// appended to the chain after `tail`; `None` where the backend has no
/// [`COMMIT_GUARD`], where writers order themselves by a `lock` statement
/// (the script does not take it), or where the batch refuses one of its
/// own commits (a join token or replay key used twice in it). Every assumption is checked
/// under the write lock, and a wrong one aborts the script before COMMIT:
/// - each join token is consumed, and each replay key recorded, here
///   (counted by `changes()`);
/// - each parent is issued and in good standing, as `write_checked`
///   judges it;
/// - nothing was appended after `tail`: the chain's next sequence number
///   is `audit_log`'s primary key, so another writer's record there makes
///   the insert fail.
fn guarded_script<'c>(
    tail: Tail,
    lock: Option<&str>,
    commits: &'c [Commit],
    purge_before: Option<i64>,
) -> Option<(Script, Vec<ChainRow<'c>>)> {
    if COMMIT_GUARD.is_none() || lock.is_some() {
        return None;
    }
    let tokens: HashSet<[u8; 32]> = commits
        .iter()
        .filter_map(|c| c.consume_join_token)
        .collect();
    let replays: HashMap<&str, i64> = commits
        .iter()
        .filter_map(|c| c.consume_replay.as_ref())
        .map(|r| (r.key.as_str(), r.expires_at))
        .collect();
    let claims = |f: fn(&Commit) -> bool| commits.iter().filter(|c| f(c)).count();
    if tokens.len() != claims(|c| c.consume_join_token.is_some())
        || replays.len() != claims(|c| c.consume_replay.is_some())
    {
        return None;
    }
    let now = claims_now(commits);
    let parents: HashSet<&str> = commits.iter().filter_map(|c| c.parent.as_deref()).collect();
    let mut script = Script::new();
    script.silent(BEGIN_WRITE);
    if !tokens.is_empty() {
        push_token_use(script.silent(""), now, &tokens);
        guard(&mut script, "changes() = ").push_bind(tokens.len() as i64);
    }
    if !replays.is_empty() {
        push_replay_record(script.silent(""), now, &replays);
        guard(&mut script, "changes() = ").push_bind(replays.len() as i64);
    }
    if !parents.is_empty() {
        let qb = guard(&mut script, "count(*) = ");
        qb.push_bind(parents.len() as i64)
            .push(" FROM issued_credentials i")
            .push(STANDING_JOINS)
            .push("WHERE r.serial IS NULL AND rr.serial IS NULL AND (n.status IS NULL OR n.status <> ")
            .push_bind(crate::NodeStatus::Banned.as_str())
            .push(") AND ");
        push_parents(qb, &parents);
    }
    if let Some(before) = purge_before {
        push_replay_purge(&mut script, before);
    }
    push_issued(
        &mut script,
        commits.iter().filter_map(|c| c.issued.as_ref()),
    );
    let chain = chain_rows(tail.0, tail.1, commits.iter().map(|c| &c.audit));
    push_audit_insert(script.silent(""), &chain);
    script.silent("COMMIT");
    Some((script, chain))
}

/// Starts a statement that aborts the script unless the condition pushed
/// after `head` holds (see [`COMMIT_GUARD`]).
fn guard<'s>(script: &'s mut Script, head: &str) -> &'s mut QueryBuilder<Db> {
    script
        .silent("INSERT INTO commit_guard (holds) SELECT ")
        .push(head)
}

/// Pushes the condition that picks the batch's `parents` out of
/// `issued_credentials i`.
fn push_parents(qb: &mut QueryBuilder<Db>, parents: &HashSet<&str>) {
    qb.push("i.serial IN (");
    let mut sep = qb.separated(", ");
    for p in parents {
        sep.push_bind(p.to_string());
    }
    qb.push(")");
}

/// The `now` a batch's token and replay checks use: the latest of its
/// commits that make one.
fn claims_now(commits: &[Commit]) -> i64 {
    commits
        .iter()
        .filter(|c| c.consume_join_token.is_some() || c.consume_replay.is_some())
        .map(|c| c.now_s)
        .max()
        .unwrap_or(0)
}

/// Pushes the statement that consumes `tokens` (those unused and unexpired
/// at `now`).
fn push_token_use<'a>(
    qb: &mut QueryBuilder<Db>,
    now: i64,
    tokens: impl IntoIterator<Item = &'a [u8; 32]>,
) {
    qb.push("UPDATE join_tokens SET used_at = ")
        .push_bind(now)
        .push(" WHERE used_at IS NULL AND expires_at > ")
        .push_bind(now)
        .push(" AND token_hash IN (");
    let mut sep = qb.separated(", ");
    for h in tokens {
        sep.push_bind(h.to_vec());
    }
    qb.push(")");
}

/// Pushes the statement that records replay keys with their expiry. A key
/// already present and unexpired at `now` is a replay: the upsert changes
/// only keys it inserts or revives from expiry.
fn push_replay_record<'a>(
    qb: &mut QueryBuilder<Db>,
    now: i64,
    keys: impl IntoIterator<Item = (&'a &'a str, &'a i64)>,
) {
    qb.push("INSERT INTO replay_cache (key, expires_at) ");
    qb.push_values(keys, |mut b, (key, exp)| {
        b.push_bind(key.to_string()).push_bind(*exp);
    });
    qb.push(" ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at WHERE replay_cache.expires_at < ")
        .push_bind(now);
}

fn push_replay_purge(script: &mut Script, before: i64) {
    script
        .silent("DELETE FROM replay_cache WHERE expires_at < ")
        .push_bind(before);
}

/// Pushes the insert of `issued`, if there is any.
fn push_issued<'a>(
    script: &mut Script,
    issued: impl IntoIterator<Item = &'a crate::IssuedCredential>,
) {
    let mut issued = issued.into_iter().peekable();
    if issued.peek().is_some() {
        push_issued_insert(script.silent(""), issued);
    }
}

/// Writes `commits` deciding each refusal from what the database holds:
/// the first round trip opens the transaction, reads the chain tail,
/// consumes tokens and records replay keys; the second writes the rest.
/// Returns each commit's outcome and the chain's new tail.
async fn write_checked(
    conn: &mut Conn,
    lock: Option<&str>,
    commits: &[Commit],
    purge_before: Option<i64>,
    stats: &WriterStats,
) -> Result<(Vec<Committed>, Tail), StoreError> {
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
    let now = claims_now(commits);
    let parents: HashSet<&str> = commits.iter().filter_map(|c| c.parent.as_deref()).collect();
    let mut script = Script::new();
    script.silent(BEGIN_WRITE);
    if let Some(lock) = lock {
        script.silent(lock);
    }
    script.stmt("SELECT seq, hash FROM audit_log ORDER BY seq DESC LIMIT 1");
    if !first_use.is_empty() {
        let qb = script.stmt("");
        push_token_use(qb, now, first_use.keys());
        qb.push(" RETURNING token_hash");
    }
    if !first_replay.is_empty() {
        let qb = script.stmt("");
        push_replay_record(qb, now, first_replay.iter().map(|(k, (_, exp))| (k, exp)));
        qb.push(" RETURNING key, 0, 0");
    }
    if !parents.is_empty() {
        // Read under the write lock: a revocation or ban committed before
        // this transaction is seen, one after it cannot have been missed.
        let qb = script.stmt(
            "SELECT i.serial, r.serial AS revoked, rr.serial AS root_revoked, n.status FROM issued_credentials i",
        );
        qb.push(STANDING_JOINS).push("WHERE ");
        push_parents(qb, &parents);
    }
    if let Some(before) = purge_before {
        push_replay_purge(&mut script, before);
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
    let issued = commits
        .iter()
        .zip(&rejected)
        .filter(|(_, r)| r.is_none())
        .filter_map(|(c, _)| c.issued.as_ref());
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
    push_issued(&mut script, issued);
    push_audit_insert(script.stmt(""), &chain);
    script.silent("COMMIT");
    script.run(conn, stats).await?;

    let end = chain
        .last()
        .map_or((tail_seq, tail_hash), |row| (row.0, row.3));
    let committed = rejected
        .into_iter()
        .zip(&chain)
        .map(|(r, row)| match r {
            None => Committed::Done { audit_seq: row.0 },
            Some(code) => Committed::Refused(code),
        })
        .collect();
    Ok((committed, end))
}
