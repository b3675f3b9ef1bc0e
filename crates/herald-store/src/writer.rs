//! The group-commit writer: one task, one transaction per batch of queued
//! commits, multi-row statements, one fsync shared by the whole batch.

use std::collections::{HashMap, HashSet};

use herald_core::{AuditEvent, ErrorCode};
use sqlx::sqlite::SqlitePool;
use sqlx::{QueryBuilder, Sqlite};
use tokio::sync::{mpsc, oneshot};

use crate::{Commit, Committed, StoreError, append_audit, hash32};

/// The most commits folded into one transaction.
const MAX_BATCH: usize = 512;

pub(crate) struct Request {
    pub commit: Commit,
    pub reply: oneshot::Sender<Result<Committed, StoreError>>,
}

pub(crate) async fn run(pool: SqlitePool, mut rx: mpsc::Receiver<Request>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let (commits, replies): (Vec<Commit>, Vec<_>) =
            batch.into_iter().map(|r| (r.commit, r.reply)).unzip();
        match write_batch(&pool, &commits).await {
            Ok(results) => {
                for (reply, res) in replies.into_iter().zip(results) {
                    let _ = reply.send(Ok(res));
                }
            }
            Err(e) if commits.len() > 1 => {
                // One bad item (say, a duplicate serial) must not fail the
                // others: retry each on its own so only it gets the error.
                tracing::warn!(error = %e, size = commits.len(), "batch commit failed; retrying items one by one");
                for (c, reply) in commits.into_iter().zip(replies) {
                    let res = write_batch(&pool, std::slice::from_ref(&c))
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
    }
}

/// Writes `commits` in one transaction; returns each one's outcome, in order.
async fn write_batch(pool: &SqlitePool, commits: &[Commit]) -> Result<Vec<Committed>, StoreError> {
    let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
    let rejected = consume_tokens(&mut tx, commits).await?;

    let ok_issued: Vec<_> = commits
        .iter()
        .zip(&rejected)
        .filter(|(_, r)| r.is_none())
        .filter_map(|(c, _)| c.issued.as_ref())
        .collect();
    for chunk in ok_issued.chunks(1000) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "INSERT INTO issued_credentials (serial, kind, spiffe_id, not_before, not_after, issued_at, evidence_type, \
             evidence_digest, policy, parent_serial, public_key_sha256, ca_key_id) ",
        );
        qb.push_values(chunk, |mut b, i| {
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
                .push_bind(i.ca_key_id.clone());
        });
        qb.build().execute(&mut *tx).await?;
    }

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
    let last = append_audit(&mut tx, &events).await?;
    tx.commit().await?;
    let first = last + 1 - events.len() as u64;
    Ok(rejected
        .into_iter()
        .enumerate()
        .map(|(i, r)| match r {
            None => Committed::Done {
                audit_seq: first + i as u64,
            },
            Some(code) => Committed::TokenRejected(code),
        })
        .collect())
}

/// Consumes the batch's join tokens with one UPDATE; returns, per commit,
/// `None` (consumed or nothing to consume) or why its token was refused.
async fn consume_tokens(
    tx: &mut sqlx::Transaction<'static, Sqlite>,
    commits: &[Commit],
) -> Result<Vec<Option<ErrorCode>>, StoreError> {
    let mut out = vec![None; commits.len()];
    let mut first_use: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, c) in commits.iter().enumerate() {
        if let Some(h) = c.consume_join_token {
            first_use.entry(h).or_insert(i);
        }
    }
    if first_use.is_empty() {
        return Ok(out);
    }
    let now = commits
        .iter()
        .filter(|c| c.consume_join_token.is_some())
        .map(|c| c.now_s)
        .max()
        .unwrap_or(0);
    let hashes: Vec<[u8; 32]> = first_use.keys().copied().collect();
    let mut consumed = HashSet::new();
    for chunk in hashes.chunks(1000) {
        let mut qb = QueryBuilder::<Sqlite>::new("UPDATE join_tokens SET used_at = ");
        qb.push_bind(now)
            .push(" WHERE used_at IS NULL AND expires_at > ")
            .push_bind(now)
            .push(" AND token_hash IN (");
        let mut sep = qb.separated(", ");
        for h in chunk {
            sep.push_bind(h.to_vec());
        }
        qb.push(") RETURNING token_hash");
        let rows: Vec<(Vec<u8>,)> = qb.build_query_as().fetch_all(&mut **tx).await?;
        for (h,) in rows {
            consumed.insert(hash32(h, "token_hash")?);
        }
    }
    let failed: Vec<[u8; 32]> = hashes
        .iter()
        .filter(|h| !consumed.contains(*h))
        .copied()
        .collect();
    let mut reasons: HashMap<[u8; 32], ErrorCode> = HashMap::new();
    for chunk in failed.chunks(1000) {
        let mut qb = QueryBuilder::<Sqlite>::new(
            "SELECT token_hash, used_at, expires_at FROM join_tokens WHERE token_hash IN (",
        );
        let mut sep = qb.separated(", ");
        for h in chunk {
            sep.push_bind(h.to_vec());
        }
        qb.push(")");
        let rows: Vec<(Vec<u8>, Option<i64>, i64)> =
            qb.build_query_as().fetch_all(&mut **tx).await?;
        for (h, used_at, expires_at) in rows {
            let code = if used_at.is_some() {
                ErrorCode::JoinTokenUsed
            } else if expires_at <= now {
                ErrorCode::JoinTokenExpired
            } else {
                ErrorCode::JoinTokenUsed
            };
            reasons.insert(hash32(h, "token_hash")?, code);
        }
    }
    for (i, c) in commits.iter().enumerate() {
        let Some(h) = c.consume_join_token else {
            continue;
        };
        let is_first = first_use.get(&h) == Some(&i);
        out[i] = if consumed.contains(&h) {
            (!is_first).then_some(ErrorCode::JoinTokenUsed)
        } else {
            Some(
                reasons
                    .get(&h)
                    .copied()
                    .unwrap_or(ErrorCode::JoinTokenUnknown),
            )
        };
    }
    Ok(out)
}
