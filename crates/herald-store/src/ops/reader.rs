//! Batched hot-path lookups: concurrent requests for join tokens and
//! credential status are folded into one `IN (...)` query per kind, so a
//! burst costs one round trip to the database instead of one per request.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use sqlx::QueryBuilder;
use tokio::sync::{mpsc, oneshot};

use super::{Db, Pool};
use crate::{CredentialStatus, JoinTokenRecord, Lookup, StoreError, WriterStats};

const MAX_BATCH: usize = 500;

/// Where a lookup's answer goes.
type Reply<T> = oneshot::Sender<Result<Option<T>, StoreError>>;
/// Lookups waiting for one batched query: (key, reply).
type Waiters<K, T> = Vec<(K, Reply<T>)>;
/// A `join_tokens` row as selected here.
type TokenRow = (Vec<u8>, String, String, i64, i64, Option<i64>, String);

pub(crate) async fn run(pool: Pool, mut rx: mpsc::Receiver<Lookup>, stats: Arc<WriterStats>) {
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
        let queries = u64::from(!tokens.is_empty()) + u64::from(!statuses.is_empty());
        stats.reads.fetch_add(queries, Ordering::Relaxed);
        // Both kinds run concurrently on separate pool connections.
        tokio::join!(join_tokens(&pool, tokens), statuses_of(&pool, statuses));
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

async fn join_tokens(pool: &Pool, waiters: Waiters<[u8; 32], JoinTokenRecord>) {
    if waiters.is_empty() {
        return;
    }
    let found = async {
        let mut qb = QueryBuilder::<Db>::new(
            "SELECT token_hash, token_id, spiffe_id, created_at, expires_at, used_at, created_by FROM join_tokens WHERE token_hash IN (",
        );
        let mut sep = qb.separated(", ");
        for (h, _) in &waiters {
            sep.push_bind(h.to_vec());
        }
        qb.push(")");
        let rows: Vec<TokenRow> = qb.build_query_as().fetch_all(pool).await?;
        let mut map = HashMap::with_capacity(rows.len());
        for (hash, token_id, spiffe_id, created_at, expires_at, used_at, created_by) in rows {
            map.insert(
                crate::hash32(hash, "token_hash")?,
                JoinTokenRecord {
                    token_id,
                    spiffe_id,
                    created_at,
                    expires_at,
                    used_at,
                    created_by,
                },
            );
        }
        Ok::<_, StoreError>(map)
    }
    .await;
    reply_all(waiters, found);
}

async fn statuses_of(pool: &Pool, waiters: Waiters<String, CredentialStatus>) {
    if waiters.is_empty() {
        return;
    }
    let found = async {
        let mut qb = QueryBuilder::<Db>::new(
            "SELECT i.serial, i.spiffe_id, i.not_after, r.serial FROM issued_credentials i \
             LEFT JOIN revocations r ON r.serial = i.serial WHERE i.serial IN (",
        );
        let mut sep = qb.separated(", ");
        for (s, _) in &waiters {
            sep.push_bind(s.clone());
        }
        qb.push(")");
        let rows: Vec<(String, String, i64, Option<String>)> =
            qb.build_query_as().fetch_all(pool).await?;
        Ok::<_, StoreError>(
            rows.into_iter()
                .map(|(serial, spiffe_id, not_after, revoked)| {
                    (
                        serial,
                        CredentialStatus {
                            spiffe_id,
                            not_after,
                            revoked: revoked.is_some(),
                        },
                    )
                })
                .collect(),
        )
    }
    .await;
    reply_all(waiters, found);
}
