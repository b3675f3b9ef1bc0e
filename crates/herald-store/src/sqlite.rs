//! The SQLite backend: one database file, WAL, `synchronous=FULL`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::Transaction;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};

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

pub(crate) type Db = sqlx::Sqlite;
pub(crate) type DbRow = SqliteRow;
pub(crate) type Pool = SqlitePool;
pub(crate) type Conn = SqliteConnection;
pub(crate) type Options = SqliteConnectOptions;
pub(crate) type Tx = Transaction<'static, Db>;

/// Opens a write transaction; `IMMEDIATE` takes the database's write lock
/// at once, so the audit tail read next cannot go stale.
pub(crate) const BEGIN_WRITE: &str = "BEGIN IMMEDIATE";
/// SQLite runs several `;`-separated statements as one query: a write
/// batch costs two hand-offs to sqlx's connection thread, not ten.
pub(crate) const MULTI_STATEMENT: bool = true;
/// Bound parameters allowed in one query.
pub(crate) const MAX_PARAMS: usize = 32766;
/// Set up on the writer's connection: inserting a `holds` other than true (1) into
/// `commit_guard` aborts the statement, and with it the script of a
/// batch written on assumptions (`ops/writer.rs`). SQLite has `RAISE`
/// only in triggers, hence a view and a trigger; both are `TEMP`, so they
/// live in the connection and never in the database file.
pub(crate) const COMMIT_GUARD: Option<&str> = Some(
    "CREATE TEMP VIEW IF NOT EXISTS commit_guard (holds) AS SELECT 1; \
     CREATE TEMP TRIGGER IF NOT EXISTS commit_guard_aborts INSTEAD OF INSERT ON commit_guard \
     WHEN NEW.holds IS NOT 1 BEGIN SELECT RAISE(ABORT, 'herald: a guarded batch assumed wrong'); END",
);

const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "init",
        include_str!("../migrations/sqlite/0001_init.sql"),
    ),
    (
        2,
        "replay_cache",
        include_str!("../migrations/sqlite/0002_replay_cache.sql"),
    ),
    (
        3,
        "audit_time_index",
        include_str!("../migrations/sqlite/0003_audit_time_index.sql"),
    ),
    (
        4,
        "report_indexes",
        include_str!("../migrations/sqlite/0004_report_indexes.sql"),
    ),
    (
        5,
        "nodes",
        include_str!("../migrations/sqlite/0005_nodes.sql"),
    ),
    (
        6,
        "key_rotation",
        include_str!("../migrations/sqlite/0006_key_rotation.sql"),
    ),
    (
        7,
        "replicas",
        include_str!("../migrations/sqlite/0007_replicas.sql"),
    ),
    (
        8,
        "lineage",
        include_str!("../migrations/sqlite/0008_lineage.sql"),
    ),
    (
        9,
        "audit_anchors",
        include_str!("../migrations/sqlite/0009_audit_anchors.sql"),
    ),
    (
        11,
        "federation",
        include_str!("../migrations/sqlite/0011_federation.sql"),
    ),
    (
        12,
        "node_quotes",
        include_str!("../migrations/sqlite/0012_node_quotes.sql"),
    ),
    (
        13,
        "partial_parent_index",
        include_str!("../migrations/sqlite/0013_partial_parent_index.sql"),
    ),
    (
        14,
        "issued_cert_digest",
        include_str!("../migrations/sqlite/0014_issued_cert_digest.sql"),
    ),
];

/// Opens (creating if missing) the database file and migrates it.
pub(crate) async fn open(url: &str) -> Result<store::Backend, StoreError> {
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
        // Statement journals (a multi-row statement inside a transaction)
        // stay in memory instead of a temporary file opened, unlinked and
        // closed around a batch's statements.
        .pragma("temp_store", "memory")
        .busy_timeout(Duration::from_secs(5));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .min_connections(1)
        .connect_with(opts.clone())
        .await?;
    crate::migrator(MIGRATIONS).run(&pool).await?;
    store::Backend::start(pool, opts, None)
}
