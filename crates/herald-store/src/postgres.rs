//! The PostgreSQL backend: several server replicas share one database.
//!
//! Writes are serialized across replicas by a transaction-scoped advisory
//! lock taken first in every write transaction (row locks alone cannot
//! order appends to the audit chain under READ COMMITTED); everything
//! single-use — join tokens, token `jti`s, node counters — is decided by
//! conditional `UPDATE … RETURNING` and `ON CONFLICT` inside it.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Transaction};

use crate::StoreError;

// The SQL in `ops/` is compiled once per backend on purpose: each copy
// binds its parent's `Db`, so one text serves both dialects.
#[allow(clippy::duplicate_mod)]
#[path = "ops/federation.rs"]
mod federation;
#[allow(clippy::duplicate_mod)]
#[path = "ops/lineage.rs"]
mod lineage;
#[allow(clippy::duplicate_mod)]
#[path = "ops/nodes.rs"]
mod nodes;
#[allow(clippy::duplicate_mod)]
#[path = "ops/reader.rs"]
mod reader;
#[allow(clippy::duplicate_mod)]
#[path = "ops/store.rs"]
pub(crate) mod store;
#[allow(clippy::duplicate_mod)]
#[path = "ops/writer.rs"]
mod writer;

pub(crate) type Db = sqlx::Postgres;
pub(crate) type DbRow = PgRow;
pub(crate) type Pool = PgPool;
pub(crate) type Conn = PgConnection;
pub(crate) type Options = PgConnectOptions;
pub(crate) type Tx = Transaction<'static, Db>;

/// Opens a write transaction (READ COMMITTED; the advisory lock orders writers).
pub(crate) const BEGIN_WRITE: &str = "BEGIN";
/// The extended protocol (bound parameters) carries one statement per query.
pub(crate) const MULTI_STATEMENT: bool = false;
/// Bound parameters allowed in one statement.
pub(crate) const MAX_PARAMS: usize = 65535;
/// No guarded batches: one statement per query gains nothing from them.
pub(crate) const COMMIT_GUARD: Option<&str> = None;

/// Connections per replica: the writer's own plus this pool.
const POOL_SIZE: u32 = 8;
/// Applied unless the URL sets its own `statement_timeout`.
const STATEMENT_TIMEOUT: &str = "30s";

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../migrations/postgres/0001_init.sql"),
    ),
    (
        2,
        "replay_cache",
        include_str!("../migrations/postgres/0002_replay_cache.sql"),
    ),
    (
        3,
        "audit_time_index",
        include_str!("../migrations/postgres/0003_audit_time_index.sql"),
    ),
    (
        4,
        "report_indexes",
        include_str!("../migrations/postgres/0004_report_indexes.sql"),
    ),
    (
        5,
        "nodes",
        include_str!("../migrations/postgres/0005_nodes.sql"),
    ),
    (
        6,
        "key_rotation",
        include_str!("../migrations/postgres/0006_key_rotation.sql"),
    ),
    (
        7,
        "replicas",
        include_str!("../migrations/postgres/0007_replicas.sql"),
    ),
    (
        8,
        "lineage",
        include_str!("../migrations/postgres/0008_lineage.sql"),
    ),
    (
        9,
        "audit_anchors",
        include_str!("../migrations/postgres/0009_audit_anchors.sql"),
    ),
    (
        11,
        "federation",
        include_str!("../migrations/postgres/0011_federation.sql"),
    ),
    (
        12,
        "node_quotes",
        include_str!("../migrations/postgres/0012_node_quotes.sql"),
    ),
    (
        13,
        "partial_parent_index",
        include_str!("../migrations/postgres/0013_partial_parent_index.sql"),
    ),
    (
        14,
        "issued_cert_digest",
        include_str!("../migrations/postgres/0014_issued_cert_digest.sql"),
    ),
];

/// Whether `url` names a PostgreSQL database.
pub(crate) fn is_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// Connects, migrates (sqlx's migrator holds its own advisory lock, so
/// replicas starting together migrate once) and starts the writer.
pub(crate) async fn open(url: &str) -> Result<store::Backend, StoreError> {
    let mut opts = PgConnectOptions::from_str(url)?.application_name("herald");
    if !url.contains("statement_timeout") {
        opts = opts.options([("statement_timeout", STATEMENT_TIMEOUT)]);
    }
    let pool = PgPoolOptions::new()
        .max_connections(POOL_SIZE)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts.clone())
        .await?;
    crate::migrator(MIGRATIONS).run(&pool).await?;
    // One lock per schema, so deployments sharing a database do not
    // serialize each other.
    let (key,): (i64,) =
        sqlx::query_as("SELECT hashtextextended('herald-write:' || current_schema(), 0)")
            .fetch_one(&pool)
            .await?;
    let lock = format!("SELECT pg_advisory_xact_lock({key})");
    store::Backend::start(pool, opts, Some(lock))
}

fn check_schema_name(schema: &str) -> Result<(), StoreError> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(StoreError::Corrupt(format!(
            "schema name {schema:?}: use lowercase letters, digits and _"
        )))
    }
}

/// See [`crate::Store::create_postgres_schema`].
pub(crate) async fn create_schema(base_url: &str, schema: &str) -> Result<String, StoreError> {
    check_schema_name(schema)?;
    let mut conn = PgConnection::connect(base_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE SCHEMA IF NOT EXISTS {schema}"
    )))
    .execute(&mut conn)
    .await?;
    conn.close().await?;
    let sep = if base_url.contains('?') { '&' } else { '?' };
    Ok(format!(
        "{base_url}{sep}options=-c%20search_path%3D{schema}"
    ))
}

/// See [`crate::Store::drop_postgres_schema`].
pub(crate) async fn drop_schema(base_url: &str, schema: &str) -> Result<(), StoreError> {
    check_schema_name(schema)?;
    let mut conn = PgConnection::connect(base_url).await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(&mut conn)
    .await?;
    conn.close().await?;
    Ok(())
}
