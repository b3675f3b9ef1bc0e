//! Batched hot-path lookups: concurrent requests for join tokens and
//! credential status (issued? revoked? a banned node's?) are folded into
//! one `IN (...)` query per kind, so a burst costs one round trip to the
//! database instead of one per request. The batcher has a connection of
//! its own (reopened when it breaks), beside the writer's.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sqlx::QueryBuilder;
use tokio::sync::{mpsc, oneshot};

use sqlx::Connection;

use super::lineage::STANDING_JOINS;
use super::store::join_token_record;
use super::{Conn, Db, Options};
use crate::{CredentialStatus, JoinTokenRecord, Lookup, StoreError, WriterStats};

const MAX_BATCH: usize = 500;

/// Where a lookup's answer goes.
type Reply<T> = oneshot::Sender<Result<Option<T>, StoreError>>;
/// Lookups waiting for one batched query: (key, reply).
type Waiters<K, T> = Vec<(K, Reply<T>)>;
/// A `join_tokens` row as selected here.
type TokenRow = (
    Vec<u8>,
    String,
    String,
    i64,
    i64,
    Option<i64>,
    String,
    String,
    String,
    Option<String>,
);

pub(crate) async fn run(opts: Options, mut rx: mpsc::Receiver<Lookup>, stats: Arc<WriterStats>) {
    let mut conn: Option<Conn> = None;
    while let Some(first) = rx.recv().await {
        let mut tokens = Vec::new();
        let mut statuses = Vec::new();
        let mut push = |l: Lookup| match l {
            Lookup::JoinToken(h, r) => tokens.push((h, r)),
            Lookup::CredentialStatus(s, r) => statuses.push((s, r)),
        };
        push(first);
        for _ in 1..MAX_BATCH {
            match rx.try_recv() {
                Ok(l) => push(l),
                Err(_) => break,
            }
        }
        let c = match &mut conn {
            Some(c) => c,
            None => match Conn::connect_with(&opts).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    let msg = format!("datastore unavailable: {e}");
                    reply_all(tokens, Err(StoreError::Corrupt(msg.clone())));
                    reply_all(statuses, Err(StoreError::Corrupt(msg)));
                    continue;
                }
            },
        };
        let queries = u64::from(!tokens.is_empty()) + u64::from(!statuses.is_empty());
        stats.reads.fetch_add(queries, Ordering::Relaxed);
        let broken = join_tokens(c, tokens).await | statuses_of(c, statuses).await;
        if broken {
            conn = None;
        }
    }
    if let Some(c) = conn {
        let _ = c.close().await;
    }
}

fn reply_all<K, T: Clone>(waiters: Waiters<K, T>, found: Result<HashMap<K, T>, StoreError>)
where
    K: std::hash::Hash + Eq,
{
    match found {
        Ok(map) => {
            for (k, reply) in waiters {
                let _ = reply.send(Ok(map.get(&k).cloned()));
            }
        }
        Err(e) => {
            let msg = e.to_string();
            for (_, reply) in waiters {
                let _ = reply.send(Err(StoreError::Corrupt(format!(
                    "batched lookup failed: {msg}"
                ))));
            }
        }
    }
}

/// Answers `waiters`; true if the connection broke.
async fn join_tokens(conn: &mut Conn, waiters: Waiters<[u8; 32], JoinTokenRecord>) -> bool {
    if waiters.is_empty() {
        return false;
    }
    let found = async {
        let mut qb = QueryBuilder::<Db>::new(
            "SELECT token_hash, token_id, spiffe_id, created_at, expires_at, used_at, created_by, purpose, policies, reason \
             FROM join_tokens WHERE token_hash IN (",
        );
        let mut sep = qb.separated(", ");
        for (h, _) in &waiters {
            sep.push_bind(h.to_vec());
        }
        qb.push(")");
        let rows: Vec<TokenRow> = qb.build_query_as().fetch_all(&mut *conn).await?;
        let mut map = HashMap::with_capacity(rows.len());
        for (hash, token_id, spiffe_id, created_at, expires_at, used_at, created_by, p, ps, r) in
            rows
        {
            map.insert(
                crate::hash32(hash, "token_hash")?,
                join_token_record(
                    token_id,
                    spiffe_id,
                    created_at,
                    expires_at,
                    used_at,
                    created_by,
                    (p, ps, r),
                )?,
            );
        }
        Ok::<_, StoreError>(map)
    }
    .await;
    let broken = found.as_ref().is_err_and(crate::is_broken_connection);
    reply_all(waiters, found);
    broken
}

/// Answers `waiters`; true if the connection broke.
async fn statuses_of(conn: &mut Conn, waiters: Waiters<String, CredentialStatus>) -> bool {
    if waiters.is_empty() {
        return false;
    }
    let found = async {
        let mut qb = QueryBuilder::<Db>::new(
            "SELECT i.serial, i.spiffe_id, i.kind, i.origin, i.policy, i.not_after, i.public_key_sha256, \
             i.ca_key_id, i.root_serial, i.root_at, r.serial, rr.serial, n.status, i.cert_sha256 FROM issued_credentials i",
        );
        qb.push(STANDING_JOINS).push("WHERE i.serial IN (");
        let mut sep = qb.separated(", ");
        for (s, _) in &waiters {
            sep.push_bind(s.clone());
        }
        qb.push(")");
        let rows = qb.build().fetch_all(&mut *conn).await?;
        let mut map = HashMap::with_capacity(rows.len());
        for row in rows {
            use sqlx::Row;
            let origin: String = row.try_get(3)?;
            let revoked: Option<String> = row.try_get(10)?;
            let root_revoked: Option<String> = row.try_get(11)?;
            let node: Option<String> = row.try_get(12)?;
            let serial: String = row.try_get(0)?;
            map.insert(
                serial.clone(),
                CredentialStatus {
                    serial,
                    spiffe_id: row.try_get(1)?,
                    kind: row.try_get(2)?,
                    origin: herald_core::Origin::from_code(&origin),
                    policy: row.try_get(4)?,
                    not_after: row.try_get(5)?,
                    public_key_sha256: row.try_get(6)?,
                    ca_key_id: row.try_get(7)?,
                    cert_sha256: row.try_get(13)?,
                    root_serial: row.try_get(8)?,
                    root_at: row.try_get(9)?,
                    revoked: revoked.is_some() || root_revoked.is_some(),
                    node_banned: node.as_deref() == Some(crate::NodeStatus::Banned.as_str()),
                },
            );
        }
        Ok::<_, StoreError>(map)
    }
    .await;
    let broken = found.as_ref().is_err_and(crate::is_broken_connection);
    reply_all(waiters, found);
    broken
}
