//! The datastore's suite, run against a real SQLite file and a real
//! PostgreSQL (each test in a schema of its own; `HERALD_TEST_PG_URL`,
//! default `postgres://postgres@127.0.0.1:5432/test`). PostgreSQL being
//! unreachable fails the PostgreSQL half loudly: it is part of the suite.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicU32, Ordering};

use herald_core::{AuditEvent, ErrorCode, JoinTokenPurpose, Origin, Outcome};
use herald_store::{
    CaKeyRecord, Commit, Committed, IssuedCredential, NewJoinToken, ReplayKey, Store, StoreError,
};
use sqlx::Connection;

const NOW: i64 = 1_800_000_000;

/// One test's own database: a SQLite file in a temporary directory, or a
/// fresh PostgreSQL schema (dropped when the test passes; a failed test's
/// schema is left for inspection).
enum Fixture {
    Sqlite(tempfile::TempDir),
    Postgres {
        base: String,
        schema: String,
        url: String,
    },
}

fn pg_base_url() -> String {
    std::env::var("HERALD_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

impl Fixture {
    async fn sqlite() -> Fixture {
        Fixture::Sqlite(tempfile::tempdir().unwrap())
    }

    async fn postgres(test: &str) -> Fixture {
        static N: AtomicU32 = AtomicU32::new(0);
        let base = pg_base_url();
        let schema = format!(
            "herald_test_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            &test[..test.len().min(20)]
        );
        let url = Store::create_postgres_schema(&base, &schema)
            .await
            .unwrap_or_else(|e| panic!("PostgreSQL at {base} (HERALD_TEST_PG_URL): {e}"));
        Fixture::Postgres { base, schema, url }
    }

    fn url(&self) -> String {
        match self {
            Fixture::Sqlite(dir) => format!("sqlite://{}", dir.path().join("h.db").display()),
            Fixture::Postgres { url, .. } => url.clone(),
        }
    }

    async fn open(&self) -> Store {
        let s = Store::open(&self.url()).await.unwrap();
        let want = match self {
            Fixture::Sqlite(_) => "sqlite",
            Fixture::Postgres { .. } => "postgres",
        };
        assert_eq!(s.backend(), want);
        s
    }

    /// Runs `sql` on a connection of its own, outside the store.
    async fn raw(&self, sql: &'static str) -> Result<u64, sqlx::Error> {
        let url = self.url();
        Ok(match self {
            Fixture::Sqlite(_) => {
                let mut c = sqlx::SqliteConnection::connect(&url).await?;
                sqlx::query(sql).execute(&mut c).await?.rows_affected()
            }
            Fixture::Postgres { .. } => {
                let mut c = sqlx::PgConnection::connect(&url).await?;
                sqlx::query(sql).execute(&mut c).await?.rows_affected()
            }
        })
    }

    /// Drops one of the audit log's guard triggers, as an attacker with
    /// DDL rights could.
    async fn drop_trigger(&self, name: &str) {
        let sql = match self {
            Fixture::Sqlite(_) => format!("DROP TRIGGER {name}"),
            Fixture::Postgres { .. } => format!("DROP TRIGGER {name} ON audit_log"),
        };
        let sql: &'static str = Box::leak(sql.into_boxed_str());
        self.raw(sql).await.unwrap();
    }

    async fn finish(self) {
        if let Fixture::Postgres { base, schema, .. } = self {
            Store::drop_postgres_schema(&base, &schema).await.unwrap();
        }
    }
}

/// Generates `sqlite::<test>` and `postgres::<test>` for each suite test.
macro_rules! backend_suite {
    ($($test:ident,)+) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let db = super::Fixture::sqlite().await;
                    super::$test(&db).await;
                    db.finish().await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    let db = super::Fixture::postgres(stringify!($test)).await;
                    super::$test(&db).await;
                    db.finish().await;
                }
            )+
        }
    };
}

fn token(n: u8, expires_at: i64) -> NewJoinToken {
    NewJoinToken {
        token_hash: [n; 32],
        token_id: format!("tok{n}"),
        spiffe_id: format!("spiffe://td/t{n}"),
        created_at: NOW - 10,
        expires_at,
        created_by: "test".into(),
        purpose: JoinTokenPurpose::SecondFactor,
        policies: vec!["p1".into(), "p2".into()],
        reason: None,
    }
}

fn issued(serial: &str) -> IssuedCredential {
    IssuedCredential {
        serial: serial.into(),
        kind: "x509_svid".into(),
        spiffe_id: "spiffe://td/w".into(),
        not_before: NOW,
        not_after: NOW + 3600,
        issued_at: NOW,
        evidence_type: "join_token".into(),
        evidence_digest: Some("ab".into()),
        policy: None,
        parent_serial: None,
        public_key_sha256: "cd".into(),
        ca_key_id: "k1".into(),
        origin: Some(Origin::Bootstrap),
        root_serial: serial.into(),
        root_at: NOW,
        cert_sha256: Some(format!("ce{serial}")),
    }
}

/// A credential issued on `parent`'s lineage (root `root`).
fn child(serial: &str, parent: &str, root: &str) -> Commit {
    let mut c = mint(None, serial);
    c.parent = Some(parent.into());
    if let Some(i) = c.issued.as_mut() {
        i.parent_serial = Some(parent.into());
        i.root_serial = root.into();
        i.origin = Some(Origin::Workload);
    }
    c
}

fn mint(hash: Option<[u8; 32]>, serial: &str) -> Commit {
    let mut audit = AuditEvent::new("x509_svid.mint", "peer:test");
    audit.serial = Some(serial.into());
    Commit {
        consume_join_token: hash,
        consume_replay: None,
        parent: None,
        now_s: NOW,
        issued: Some(issued(serial)),
        audit,
    }
}

async fn migrations_apply_and_reopen_is_idempotent(db: &Fixture) {
    let s = db.open().await;
    s.ping().await.unwrap();
    s.audit(AuditEvent::new("a", "c")).await.unwrap();
    s.close().await;
    let s = db.open().await;
    assert_eq!(s.audit_records(0, 10).await.unwrap().len(), 1);
    s.close().await;
}

async fn a_join_token_is_consumed_exactly_once_under_a_race(db: &Fixture) {
    let s = db.open().await;
    s.create_join_token(
        token(1, NOW + 600),
        AuditEvent::new("join_token.create", "t"),
    )
    .await
    .unwrap();
    let tasks: Vec<_> = (0..50)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.commit(mint(Some([1; 32]), &format!("{i:032x}")))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut done = 0;
    let mut used = 0;
    for t in tasks {
        match t.await.unwrap() {
            Committed::Done { .. } => done += 1,
            Committed::Refused(ErrorCode::JoinTokenUsed) => used += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((done, used), (1, 49));
    let records = s.audit_records(0, 1000).await.unwrap();
    assert_eq!(records.len(), 51, "one creation + 50 decisions");
    let denied: Vec<_> = records
        .iter()
        .filter(|r| r.event.outcome == Outcome::Denied)
        .collect();
    assert_eq!(denied.len(), 49);
    assert!(
        denied
            .iter()
            .all(|r| r.event.reason == Some(ErrorCode::JoinTokenUsed) && r.event.serial.is_none())
    );
    assert!(
        s.join_token(&[1; 32])
            .await
            .unwrap()
            .unwrap()
            .used_at
            .is_some()
    );
    s.verify_audit_chain(1, None).await.unwrap();
    s.close().await;
}

async fn unknown_and_expired_tokens_get_their_codes_and_write_nothing_else(db: &Fixture) {
    let s = db.open().await;
    s.create_join_token(token(2, NOW - 1), AuditEvent::new("join_token.create", "t"))
        .await
        .unwrap();
    assert_eq!(
        s.commit(mint(Some([9; 32]), "aa")).await.unwrap(),
        Committed::Refused(ErrorCode::JoinTokenUnknown)
    );
    assert_eq!(
        s.commit(mint(Some([2; 32]), "bb")).await.unwrap(),
        Committed::Refused(ErrorCode::JoinTokenExpired)
    );
    assert!(s.issued("aa").await.unwrap().is_none());
    assert!(s.issued("bb").await.unwrap().is_none());
    assert!(
        s.join_token(&[2; 32])
            .await
            .unwrap()
            .unwrap()
            .used_at
            .is_none()
    );
}

async fn an_issuance_and_its_audit_record_land_together(db: &Fixture) {
    let s = db.open().await;
    let Committed::Done { audit_seq } = s.commit(mint(None, "c0ffee")).await.unwrap() else {
        panic!()
    };
    assert_eq!(s.issued("c0ffee").await.unwrap().unwrap(), issued("c0ffee"));
    let rec = s.audit_records(audit_seq - 1, 1).await.unwrap().remove(0);
    assert_eq!(rec.seq, audit_seq);
    assert_eq!(rec.event.serial.as_deref(), Some("c0ffee"));
    // A duplicate serial fails only its own commit; a concurrent good one lands.
    let (a, b) = tokio::join!(s.commit(mint(None, "c0ffee")), s.commit(mint(None, "beef")));
    assert!(a.is_err());
    assert!(matches!(b.unwrap(), Committed::Done { .. }));
    s.verify_audit_chain(1, None).await.unwrap();
}

async fn a_promised_commit_is_waited_for_only_briefly(db: &Fixture) {
    let s = db.open().await;
    assert_eq!(s.pending_commits(), 0);
    let promised = s.expect_commit();
    let other = s.expect_commit();
    assert_eq!(s.pending_commits(), 2);
    drop(other);
    assert_eq!(s.pending_commits(), 1);
    // A promise that is never kept (its request hung) holds a small batch
    // back only for the writer's short wait, not until it is dropped: the
    // guard below fails the test on a hang, it does not time the wait.
    let before = s.query_stats();
    let committed = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        s.commit(mint(None, "feed01")),
    )
    .await
    .expect("a commit waited for a promise that never came");
    assert!(matches!(committed.unwrap(), Committed::Done { .. }));
    let after = s.query_stats();
    assert_eq!(after.commits - before.commits, 1);
    assert_eq!(after.transactions - before.transactions, 1);
    assert!(s.issued("feed01").await.unwrap().is_some());
    drop(promised);
    assert_eq!(s.pending_commits(), 0);
    s.verify_audit_chain(1, None).await.unwrap();
}

async fn revocation_and_the_ca_key_ring(db: &Fixture) {
    let s = db.open().await;
    s.commit(mint(None, "01")).await.unwrap();
    assert!(!s.is_revoked("01").await.unwrap());
    assert_eq!(
        s.revoke(
            "01",
            "compromise",
            "op",
            AuditEvent::new("credential.revoke", "op")
        )
        .await
        .unwrap(),
        Some(1)
    );
    assert_eq!(
        s.revoke(
            "01",
            "again",
            "op",
            AuditEvent::new("credential.revoke", "op")
        )
        .await
        .unwrap(),
        Some(0),
        "the first revocation stays"
    );
    assert!(s.is_revoked("01").await.unwrap());
    assert_eq!(
        s.revoke(
            "02",
            "none",
            "op",
            AuditEvent::new("credential.revoke", "op")
        )
        .await
        .unwrap(),
        None
    );

    assert_eq!(s.bundle_sequence().await.unwrap(), 0);
    let key = |id: &str, created_at| CaKeyRecord {
        key_id: id.into(),
        kind: "x509".into(),
        status: "active".into(),
        cert_der: vec![1, 2],
        chain_der: vec![],
        encrypted_key: vec![3],
        not_before: NOW,
        not_after: NOW + 10,
        created_at,
        status_since: created_at,
    };
    s.insert_ca_key(key("k1", 1), AuditEvent::new("ca.create", "server"))
        .await
        .unwrap();
    s.insert_ca_key(key("k2", 2), AuditEvent::new("ca.create", "server"))
        .await
        .unwrap();
    assert_eq!(s.bundle_sequence().await.unwrap(), 2);
    let ids: Vec<_> = s
        .ca_keys()
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.key_id)
        .collect();
    assert_eq!(ids, vec!["k1", "k2"]);
    assert!(
        s.insert_ca_key(key("k1", 3), AuditEvent::new("ca.create", "server"))
            .await
            .is_err()
    );
    assert_eq!(
        s.bundle_sequence().await.unwrap(),
        2,
        "a failed insert changes nothing"
    );
    s.verify_audit_chain(1, None).await.unwrap();
}

async fn two_processes_appending_keep_one_chain(db: &Fixture) {
    let server = db.open().await;
    let cli = db.open().await;
    let mut tasks = Vec::new();
    for i in 0..40u8 {
        let (server, cli) = (server.clone(), cli.clone());
        tasks.push(tokio::spawn(async move {
            server
                .commit(mint(None, &format!("{i:02x}")))
                .await
                .unwrap();
            cli.create_join_token(
                token(i, NOW + 60),
                AuditEvent::new("join_token.create", "cli"),
            )
            .await
            .unwrap();
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let report = cli.verify_audit_chain(1, None).await.unwrap();
    assert_eq!(report.records, 80);
    assert_eq!((report.first_seq, report.last_seq), (1, 80));
    assert_eq!(
        server
            .verify_audit_chain(41, Some(60))
            .await
            .unwrap()
            .records,
        20
    );
}

async fn the_audit_log_is_append_only_and_tampering_is_located(db: &Fixture) {
    let s = db.open().await;
    for i in 0..10 {
        s.audit(AuditEvent::new(format!("a{i}"), "c"))
            .await
            .unwrap();
    }
    assert!(
        db.raw("UPDATE audit_log SET caller = 'x' WHERE seq = 4")
            .await
            .is_err(),
        "trigger refuses UPDATE"
    );
    assert!(
        db.raw("DELETE FROM audit_log WHERE seq = 4").await.is_err(),
        "trigger refuses DELETE"
    );
    s.verify_audit_chain(1, None).await.unwrap();

    db.drop_trigger("audit_log_no_update").await;
    db.drop_trigger("audit_log_no_delete").await;
    assert_eq!(
        db.raw("UPDATE audit_log SET caller = 'x' WHERE seq = 4")
            .await
            .unwrap(),
        1
    );
    match s.verify_audit_chain(1, None).await {
        Err(StoreError::AuditChainBroken { seq, .. }) => assert_eq!(seq, 4),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        s.verify_audit_chain(1, Some(3)).await.unwrap().records,
        3,
        "the part before is intact"
    );
    assert_eq!(
        s.verify_audit_chain(5, None).await.unwrap().records,
        6,
        "the chain after links on"
    );

    assert_eq!(
        db.raw("DELETE FROM audit_log WHERE seq = 7").await.unwrap(),
        1
    );
    match s.verify_audit_chain(5, None).await {
        Err(StoreError::AuditChainBroken { seq, reason }) => {
            assert_eq!(seq, 7);
            assert!(reason.contains("gap"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // Truncating the tail is caught when the expected end is given.
    assert!(matches!(
        s.verify_audit_chain(8, Some(12)).await,
        Err(StoreError::AuditChainBroken { .. })
    ));
}

async fn credential_status_answers_issued_and_revoked_in_one_query(db: &Fixture) {
    let s = db.open().await;
    assert_eq!(s.credential_status("0a").await.unwrap(), None);
    s.commit(mint(None, "0a")).await.unwrap();
    let st = s.credential_status("0a").await.unwrap().unwrap();
    assert!(!st.revoked && !st.node_banned);
    assert_eq!(st.spiffe_id, "spiffe://td/w");
    // The issued certificate's digest, which spares a presented copy its
    // signature check, is kept by the batched write and read back.
    assert_eq!(st.cert_sha256.as_deref(), Some("ce0a"));
    let record = s.issued("0a").await.unwrap().unwrap();
    assert_eq!(record.cert_sha256.as_deref(), Some("ce0a"));
    s.revoke("0a", "r", "op", AuditEvent::new("credential.revoke", "op"))
        .await
        .unwrap();
    assert!(s.credential_status("0a").await.unwrap().unwrap().revoked);
}

async fn revoking_a_credential_revokes_its_descendants_and_nothing_else(db: &Fixture) {
    let s = db.open().await;
    // root → a → a1, a2; root → b. Revoking a revokes a, a1 and a2.
    s.commit(mint(None, "70")).await.unwrap();
    for (serial, parent) in [("7a", "70"), ("7b", "70"), ("a1", "7a"), ("a2", "7a")] {
        let c = s.commit(child(serial, parent, "70")).await.unwrap();
        assert!(matches!(c, Committed::Done { .. }), "{serial}: {c:?}");
    }
    let st = s.credential_status("a1").await.unwrap().unwrap();
    assert_eq!(
        (st.origin, st.root_serial.as_str(), st.root_at),
        (Some(Origin::Workload), "70", NOW)
    );
    let n = s
        .revoke(
            "7a",
            "compromise",
            "op",
            AuditEvent::new("credential.revoke", "op"),
        )
        .await
        .unwrap();
    assert_eq!(n, Some(3));
    for (serial, revoked) in [
        ("70", false),
        ("7a", true),
        ("7b", false),
        ("a1", true),
        ("a2", true),
    ] {
        assert_eq!(s.is_revoked(serial).await.unwrap(), revoked, "{serial}");
    }
    // Revoking the root reaches everything, and credential_status reports
    // a descendant's root revocation even for one issued later.
    s.revoke("70", "r", "op", AuditEvent::new("credential.revoke", "op"))
        .await
        .unwrap();
    assert!(s.is_revoked("7b").await.unwrap());
    let late = IssuedCredential {
        root_serial: "70".into(),
        ..issued("7c")
    };
    s.commit(Commit {
        issued: Some(late),
        ..mint(None, "7c")
    })
    .await
    .unwrap();
    assert!(s.credential_status("7c").await.unwrap().unwrap().revoked);
    s.verify_audit_chain(1, None).await.unwrap();
}

async fn a_refused_commit_leaves_nothing_behind(db: &Fixture) {
    let s = db.open().await;
    // A child of a revoked parent is refused inside the transaction: only
    // the refusal is audited, nothing is recorded as issued.
    s.commit(mint(None, "80")).await.unwrap();
    s.revoke("80", "r", "op", AuditEvent::new("credential.revoke", "op"))
        .await
        .unwrap();
    assert_eq!(
        s.commit(child("81", "80", "80")).await.unwrap(),
        Committed::Refused(ErrorCode::SvidRevoked)
    );
    assert!(s.issued("81").await.unwrap().is_none());
    // A commit refused for one reason gives back what its other checks
    // took: the join token stays usable, the replay key unrecorded.
    s.create_join_token(
        token(8, NOW + 600),
        AuditEvent::new("join_token.create", "op"),
    )
    .await
    .unwrap();
    let mut both = child("82", "80", "80");
    both.consume_join_token = Some([8; 32]);
    both.consume_replay = Some(ReplayKey {
        key: "jti:x#8".into(),
        expires_at: NOW + 600,
    });
    assert_eq!(
        s.commit(both).await.unwrap(),
        Committed::Refused(ErrorCode::SvidRevoked)
    );
    let t = s.join_token(&[8; 32]).await.unwrap().unwrap();
    assert_eq!(t.used_at, None, "the token was given back");
    assert_eq!(t.purpose, JoinTokenPurpose::SecondFactor);
    assert_eq!(t.policies, ["p1", "p2"]);
    let again = exchange("jti:x#8", NOW + 600, "83");
    let again = Commit {
        consume_join_token: Some([8; 32]),
        ..again
    };
    assert!(
        matches!(s.commit(again).await.unwrap(), Committed::Done { .. }),
        "the replay key and the token were both still unused"
    );
    assert_eq!(denied(&s).await, 2);
}

/// How many of the first 100 audit records are refusals.
async fn denied(s: &Store) -> usize {
    s.audit_records(0, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.event.outcome == Outcome::Denied)
        .count()
}

fn exchange(key: &str, expires_at: i64, serial: &str) -> Commit {
    let mut c = mint(None, serial);
    c.consume_replay = Some(ReplayKey {
        key: key.into(),
        expires_at,
    });
    c
}

async fn a_token_jti_is_used_exactly_once_under_a_race_and_across_restarts(db: &Fixture) {
    let s = db.open().await;
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.commit(exchange("jti:iss#one", NOW + 300, &format!("r{i}")))
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut done = 0;
    for t in tasks {
        match t.await.unwrap() {
            Committed::Done { .. } => done += 1,
            Committed::Refused(code) => assert_eq!(code, ErrorCode::TokenReplayed),
        }
    }
    assert_eq!(done, 1, "exactly one use of a jti succeeds");
    // Only the winner's credential exists; every loser is audited as a replay.
    let records = s.audit_records(0, 100).await.unwrap();
    assert_eq!(records.len(), 40);
    let replays = records
        .iter()
        .filter(|r| r.event.reason == Some(ErrorCode::TokenReplayed))
        .count();
    assert_eq!(replays, 39);
    assert!(
        records
            .iter()
            .filter(|r| r.event.outcome == Outcome::Denied)
            .all(|r| r.event.serial.is_none())
    );
    s.close().await;

    // Restarted: still a replay; another key is fine.
    let s = db.open().await;
    assert_eq!(
        s.commit(exchange("jti:iss#one", NOW + 300, "again"))
            .await
            .unwrap(),
        Committed::Refused(ErrorCode::TokenReplayed)
    );
    assert!(matches!(
        s.commit(exchange("jti:iss#two", NOW + 300, "two"))
            .await
            .unwrap(),
        Committed::Done { .. }
    ));
    assert!(s.issued("again").await.unwrap().is_none());
    assert!(s.issued("two").await.unwrap().is_some());
    // A key whose memory has expired may be recorded again (the verifier
    // refuses the expired token itself before it gets here).
    assert!(matches!(
        s.commit(exchange("jti:old", NOW - 10, "old1"))
            .await
            .unwrap(),
        Committed::Done { .. }
    ));
    assert!(matches!(
        s.commit(exchange("jti:old", NOW + 300, "old2"))
            .await
            .unwrap(),
        Committed::Done { .. }
    ));
    assert!(s.verify_audit_chain(0, None).await.is_ok());
    s.close().await;
}

fn attestation(ek: &str, id: &str, reset: u32, restart: u32) -> herald_store::NodeAttestation {
    herald_store::NodeAttestation {
        ek_hash: ek.into(),
        spiffe_id: id.into(),
        ak_name: "000b".into(),
        policy: "nodes".into(),
        reset_count: reset,
        restart_count: restart,
        clock: 1000,
        firmware_version: 7,
        golden_set: Some("g".into()),
        now_s: NOW,
    }
}

fn node_svid(serial: &str, id: &str) -> IssuedCredential {
    IssuedCredential {
        spiffe_id: id.into(),
        evidence_type: "tpm".into(),
        ..issued(serial)
    }
}

async fn the_node_registry_enforces_counters_one_ek_per_identity_and_bans(db: &Fixture) {
    use herald_store::{NodeCommitted, NodeStatus};
    let s = db.open().await;
    let id = "spiffe://td/node/a";
    let attest = |serial: &str| {
        let mut a = AuditEvent::new("node.attest", "peer:test");
        a.serial = Some(serial.into());
        a
    };
    // Enrolment, then a later quote (reset 3 → 4).
    let r = s
        .commit_node_attestation(
            attestation("ek-a", id, 3, 1),
            node_svid("01", id),
            None,
            None,
            attest("01"),
        )
        .await
        .unwrap();
    assert_eq!(
        s.credential_status("01")
            .await
            .unwrap()
            .unwrap()
            .cert_sha256
            .as_deref(),
        Some("ce01")
    );
    let NodeCommitted::Done(node) = r else {
        panic!("{r:?}")
    };
    assert_eq!(
        (node.status, node.attestations, node.reset_count),
        (NodeStatus::Active, 1, 3)
    );
    let r = s
        .commit_node_attestation(
            attestation("ek-a", id, 4, 0),
            node_svid("02", id),
            None,
            None,
            attest("02"),
        )
        .await
        .unwrap();
    assert!(matches!(r, NodeCommitted::Done(ref n) if n.attestations == 2 && n.reset_count == 4));

    // Backwards (an old TPM state replayed): refused, nothing issued.
    for (reset, restart) in [(3, 9), (4, 0 /* equal is fine */), (2, 0)] {
        let r = s
            .commit_node_attestation(
                attestation("ek-a", id, reset, restart),
                node_svid(&format!("b{reset}{restart}"), id),
                None,
                None,
                attest("x"),
            )
            .await
            .unwrap();
        if (reset, restart) == (4, 0) {
            assert!(matches!(r, NodeCommitted::Done(_)), "{r:?}");
        } else {
            assert_eq!(r, NodeCommitted::Refused(ErrorCode::TpmCounterRollback));
            assert!(
                s.issued(&format!("b{reset}{restart}"))
                    .await
                    .unwrap()
                    .is_none()
            );
        }
    }
    // The last quote's outcome is on the row: the refused (2, 0) above, the
    // clock that of the last accepted one.
    let node = s.node_by_ek("ek-a").await.unwrap().unwrap();
    assert_eq!(
        (node.quote_clock, node.last_quote_result.as_deref()),
        (1000, Some("tpm_counter_rollback"))
    );
    // Within one reset the TPM clock only moves forward: an earlier clock
    // is a replayed state.
    let mut back = attestation("ek-a", id, 4, 0);
    back.clock = 999;
    let r = s
        .commit_node_attestation(back, node_svid("c1", id), None, None, attest("c1"))
        .await
        .unwrap();
    assert_eq!(r, NodeCommitted::Refused(ErrorCode::TpmCounterRollback));
    assert!(s.issued("c1").await.unwrap().is_none());
    let mut later = attestation("ek-a", id, 4, 0);
    later.clock = 1001;
    assert!(matches!(
        s.commit_node_attestation(later, node_svid("c2", id), None, None, attest("c2"))
            .await
            .unwrap(),
        NodeCommitted::Done(ref n) if n.quote_clock == 1001 && n.last_quote_result.as_deref() == Some("ok")
    ));
    s.record_quote_refusal("ek-a", NOW + 5, ErrorCode::TpmPcrOffPolicy)
        .await
        .unwrap();
    let node = s.node_by_ek("ek-a").await.unwrap().unwrap();
    assert_eq!(
        (node.last_quote_at, node.last_quote_result.as_deref()),
        (Some(NOW + 5), Some("tpm_pcr_off_policy"))
    );

    // Another EK for the same identity.
    let r = s
        .commit_node_attestation(
            attestation("ek-b", id, 0, 0),
            node_svid("03", id),
            None,
            None,
            attest("03"),
        )
        .await
        .unwrap();
    assert_eq!(r, NodeCommitted::Refused(ErrorCode::NodeEkChanged));
    assert!(s.issued("03").await.unwrap().is_none());

    // A workload SVID issued under the node's SVID descends from it.
    let workload = child("0c", "02", "02");
    assert!(matches!(
        s.commit(workload).await.unwrap(),
        Committed::Done { .. }
    ));

    // A ban revokes the node's unexpired credentials and their descendants
    // and refuses the node after; it moves the ban sequence replicas poll,
    // not the bundle's.
    let before = s.sequences().await.unwrap();
    let (banned, revoked) = s
        .ban_node(
            id,
            "operator:test",
            "stolen",
            AuditEvent::new("node.ban", "operator:test"),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(banned.status, NodeStatus::Banned);
    assert_eq!(banned.ban_reason.as_deref(), Some("stolen"));
    assert_eq!(revoked, 5);
    assert!(
        s.is_revoked("0c").await.unwrap(),
        "the workload's SVID went with its node"
    );
    let after = s.sequences().await.unwrap();
    assert_eq!(
        (after.bans, after.bundle),
        (before.bans + 1, before.bundle),
        "{before:?} → {after:?}"
    );
    assert!(s.is_revoked("01").await.unwrap() && s.is_revoked("02").await.unwrap());
    let st = s.credential_status("02").await.unwrap().unwrap();
    assert!(st.revoked && st.node_banned);
    // One issued after the sweep is not revoked, but is a banned node's.
    s.commit(Commit {
        issued: Some(node_svid("a5", id)),
        ..mint(None, "a5")
    })
    .await
    .unwrap();
    let st = s.credential_status("a5").await.unwrap().unwrap();
    assert!(!st.revoked && st.node_banned, "{st:?}");
    let r = s
        .commit_node_attestation(
            attestation("ek-a", id, 5, 0),
            node_svid("04", id),
            None,
            None,
            attest("04"),
        )
        .await
        .unwrap();
    assert_eq!(r, NodeCommitted::Refused(ErrorCode::NodeBanned));
    // By EK hash too; an unknown node is None.
    assert!(
        s.ban_node("ek-a", "o", "again", AuditEvent::new("node.ban", "o"))
            .await
            .unwrap()
            .is_some()
    );
    assert!(
        s.ban_node("nope", "o", "r", AuditEvent::new("node.ban", "o"))
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(s.list_nodes().await.unwrap().len(), 1);
    assert_eq!(s.node_by_ek("ek-a").await.unwrap().unwrap().spiffe_id, id);

    // An enrolment's join token is consumed with it, once.
    s.create_join_token(
        token(9, NOW + 60),
        AuditEvent::new("join_token.create", "t"),
    )
    .await
    .unwrap();
    let id2 = "spiffe://td/node/b";
    let r = s
        .commit_node_attestation(
            attestation("ek-c", id2, 0, 0),
            node_svid("05", id2),
            Some([9; 32]),
            None,
            attest("05"),
        )
        .await
        .unwrap();
    assert!(matches!(r, NodeCommitted::Done(_)));
    let r = s
        .commit_node_attestation(
            attestation("ek-d", "spiffe://td/node/c", 0, 0),
            node_svid("06", id2),
            Some([9; 32]),
            None,
            attest("06"),
        )
        .await
        .unwrap();
    assert_eq!(r, NodeCommitted::Refused(ErrorCode::JoinTokenUsed));
    // Every decision above is in the chain, which verifies.
    let report = s.verify_audit_chain(1, None).await.unwrap();
    assert!(report.records >= 11, "{report:?}");
    let refused: Vec<_> = s
        .audit_records(0, 100)
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.event.outcome != Outcome::Success)
        .map(|r| r.event.reason)
        .collect();
    assert!(refused.contains(&Some(ErrorCode::TpmCounterRollback)));
    assert!(refused.contains(&Some(ErrorCode::NodeEkChanged)));
    assert!(refused.contains(&Some(ErrorCode::NodeBanned)));
}

async fn key_rotation_is_decided_once_through_the_database(db: &Fixture) {
    let a = db.open().await;
    let b = db.open().await;
    let key = |id: &str, status: &str| CaKeyRecord {
        key_id: id.into(),
        kind: "jwt".into(),
        status: status.into(),
        cert_der: vec![1],
        chain_der: vec![],
        encrypted_key: vec![2],
        not_before: NOW,
        not_after: NOW + 100,
        created_at: NOW,
        status_since: NOW,
    };
    // Two replicas creating the first key at once: one key.
    let (x, y) = tokio::join!(
        a.insert_ca_key_unless(
            key("j1", "active"),
            &["active", "prepared"],
            AuditEvent::new("jwt_key.create", "a")
        ),
        b.insert_ca_key_unless(
            key("j2", "active"),
            &["active", "prepared"],
            AuditEvent::new("jwt_key.create", "b")
        ),
    );
    assert!(x.unwrap() ^ y.unwrap(), "exactly one insert wins");
    let active = a.ca_keys().await.unwrap();
    assert_eq!(active.len(), 1);
    let first = active[0].key_id.clone();
    let seq = a.bundle_sequence().await.unwrap();

    assert!(
        a.insert_ca_key_unless(
            key("j3", "prepared"),
            &["prepared"],
            AuditEvent::new("jwt_key.prepare", "a")
        )
        .await
        .unwrap()
    );
    assert!(
        !b.insert_ca_key_unless(
            key("j4", "prepared"),
            &["prepared"],
            AuditEvent::new("jwt_key.prepare", "b")
        )
        .await
        .unwrap()
    );
    assert_eq!(a.bundle_sequence().await.unwrap(), seq + 1);

    // Activation swaps both keys or neither.
    let swap = [
        ("j3", "prepared", "active"),
        (first.as_str(), "active", "retiring"),
    ];
    let (x, y) = tokio::join!(
        a.transition_ca_keys(&swap, NOW + 5, AuditEvent::new("jwt_key.activate", "a")),
        b.transition_ca_keys(&swap, NOW + 5, AuditEvent::new("jwt_key.activate", "b")),
    );
    assert!(x.unwrap() ^ y.unwrap(), "exactly one activation wins");
    let bogus = [("j3", "active", "retiring"), ("nope", "active", "retired")];
    assert!(
        !a.transition_ca_keys(&bogus, NOW + 6, AuditEvent::new("x", "a"))
            .await
            .unwrap()
    );
    let ring = a.ca_keys().await.unwrap();
    let status = |id: &str| {
        ring.iter()
            .find(|k| k.key_id == id)
            .map(|k| (k.status.clone(), k.status_since))
    };
    assert_eq!(
        status("j3"),
        Some(("active".into(), NOW + 5)),
        "the failed transition changed nothing"
    );
    assert_eq!(status(&first), Some(("retiring".into(), NOW + 5)));
    assert_eq!(a.bundle_sequence().await.unwrap(), seq + 2);

    // The retirement clock: when the last credential a key signed expires.
    assert_eq!(a.last_expiry_signed_by(&first).await.unwrap(), None);
    let mut c = issued("aa");
    c.ca_key_id = first.clone();
    a.commit(Commit {
        issued: Some(c),
        ..mint(None, "aa")
    })
    .await
    .unwrap();
    let mut c = issued("bb");
    c.ca_key_id = first.clone();
    c.not_after = NOW + 7200;
    a.commit(Commit {
        issued: Some(c),
        ..mint(None, "bb")
    })
    .await
    .unwrap();
    assert_eq!(
        a.last_expiry_signed_by(&first).await.unwrap(),
        Some(NOW + 7200)
    );

    // The lease: one holder at a time, renewable by its holder, free once expired.
    let ms = NOW * 1000;
    assert!(a.try_lease("rotation", "a", ms, 1000).await.unwrap());
    assert!(!b.try_lease("rotation", "b", ms + 10, 1000).await.unwrap());
    assert!(a.try_lease("rotation", "a", ms + 500, 1000).await.unwrap());
    assert!(!b.try_lease("rotation", "b", ms + 1400, 1000).await.unwrap());
    assert!(b.try_lease("rotation", "b", ms + 1500, 1000).await.unwrap());
    assert!(!a.try_lease("rotation", "a", ms + 1600, 1000).await.unwrap());
    a.verify_audit_chain(1, None).await.unwrap();
}

async fn replica_heartbeats_are_upserted_listed_and_forgotten(db: &Fixture) {
    use herald_store::ReplicaRecord;
    let s = db.open().await;
    let beat = |id: &str, seen: i64, seq: u64| ReplicaRecord {
        replica_id: id.into(),
        address: format!("10.0.0.{}:8443", id.len()),
        version: "0.1.0".into(),
        started_at: NOW,
        last_seen_ms: seen,
        bundle_sequence: seq,
        policy_digest: "ab".repeat(32),
        policy_generation: 1,
    };
    s.record_replica(&beat("a", 1_000, 1)).await.unwrap();
    s.record_replica(&beat("bb", 2_000, 1)).await.unwrap();
    // A later heartbeat replaces the row, it does not add one.
    s.record_replica(&beat("a", 3_000, 2)).await.unwrap();
    let all = s.replicas(0).await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], beat("a", 3_000, 2), "most recently seen first");
    assert_eq!(all[1].replica_id, "bb");
    let recent = s.replicas(2_500).await.unwrap();
    assert_eq!(recent.len(), 1);
    assert_eq!(s.forget_replicas(2_500).await.unwrap(), 1);
    assert_eq!(s.replicas(0).await.unwrap().len(), 1);
}

async fn federated_bundles_move_forward_only_and_keep_the_last_good_one(db: &Fixture) {
    use herald_store::{BundleUpdate, NewFederatedBundle};
    let s = db.open().await;
    let doc = |td: &str, jwks: &str, seq: Option<u64>, now: i64| NewFederatedBundle {
        trust_domain: td.into(),
        jwks: jwks.into(),
        sequence: seq,
        refresh_hint_secs: Some(300),
        source: "endpoint".into(),
        now_ms: now,
    };
    let event = || AuditEvent::new("federation.bundle_update", "server");
    let before = s.sequences().await.unwrap().federation;
    assert_eq!(
        s.put_federated_bundle(&doc("partner", "{\"a\":1}", Some(2), 1_000), event())
            .await
            .unwrap(),
        BundleUpdate::Stored
    );
    // The same document again only moves the check time, writes no audit.
    let audited = s.audit_records(0, 1000).await.unwrap().len();
    assert_eq!(
        s.put_federated_bundle(&doc("partner", "{\"a\":1}", Some(2), 2_000), event())
            .await
            .unwrap(),
        BundleUpdate::Unchanged
    );
    assert_eq!(s.audit_records(0, 1000).await.unwrap().len(), audited);
    // Older, equal or missing sequences cannot change the content.
    for seq in [Some(1), Some(2), None] {
        assert_eq!(
            s.put_federated_bundle(&doc("partner", "{\"b\":1}", seq, 3_000), event())
                .await
                .unwrap(),
            BundleUpdate::NotNewer {
                stored: 2,
                offered: seq
            }
        );
    }
    s.record_federation_failure("partner", "connection refused", 4_000, Some(event()))
        .await
        .unwrap();
    // Again, unaudited (the refresher audits once per cause): only the
    // error's time moves.
    let audited = s.audit_records(0, 1000).await.unwrap().len();
    s.record_federation_failure("partner", "connection refused", 4_000, None)
        .await
        .unwrap();
    assert_eq!(s.audit_records(0, 1000).await.unwrap().len(), audited);
    let one = s.federated_bundle("partner").await.unwrap().unwrap();
    assert_eq!(one.last_error.as_deref(), Some("connection refused"));
    assert!(s.federated_bundle("nobody").await.unwrap().is_none());
    let all = s.federated_bundles().await.unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].jwks, "{\"a\":1}", "the last good bundle stays");
    assert_eq!(all[0].checked_at_ms, 2_000);
    assert_eq!(all[0].last_error.as_deref(), Some("connection refused"));
    assert_eq!(all[0].last_error_at_ms, Some(4_000));
    // A newer one replaces it and clears the error; trust domains are apart.
    assert_eq!(
        s.put_federated_bundle(&doc("partner", "{\"b\":1}", Some(3), 5_000), event())
            .await
            .unwrap(),
        BundleUpdate::Stored
    );
    s.put_federated_bundle(&doc("other", "{\"c\":1}", None, 5_000), event())
        .await
        .unwrap();
    let all = s.federated_bundles().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(
        (all[1].trust_domain.as_str(), all[1].jwks.as_str()),
        ("partner", "{\"b\":1}")
    );
    assert_eq!(all[1].sequence, Some(3));
    assert_eq!(all[1].last_error, None);
    assert_eq!(
        s.federation_checked_at().await.unwrap(),
        vec![("other".to_owned(), 5_000), ("partner".to_owned(), 5_000)]
    );
    assert_eq!(s.sequences().await.unwrap().federation, before + 3);
    assert!(s.delete_federated_bundle("other", event()).await.unwrap());
    assert!(!s.delete_federated_bundle("other", event()).await.unwrap());
    assert_eq!(s.federated_bundles().await.unwrap().len(), 1);
    s.verify_audit_chain(1, None).await.unwrap();
}

async fn nodes_without_a_tpm_use_tokens_once_keep_their_agent_key_and_reset(db: &Fixture) {
    use herald_store::{AGENT_KEY_PREFIX, NodeCommitted};
    let s = db.open().await;
    let event = |serial: &str| {
        let mut a = AuditEvent::new("node.attest", "peer:test");
        a.serial = Some(serial.into());
        a
    };
    // A platform token's key is consumed with the node's attestation.
    let k8s = "spiffe://td/k8s/c1/node/n1";
    let once = ReplayKey {
        key: "jti:https://k8s#1".into(),
        expires_at: NOW + 600,
    };
    let r = s
        .commit_node_attestation(
            attestation("k8s-node", k8s, 0, 0),
            node_svid("p1", k8s),
            None,
            Some(once.clone()),
            event("p1"),
        )
        .await
        .unwrap();
    assert!(matches!(r, NodeCommitted::Done(_)), "{r:?}");
    let r = s
        .commit_node_attestation(
            attestation("k8s-node", k8s, 0, 0),
            node_svid("p2", k8s),
            None,
            Some(once),
            event("p2"),
        )
        .await
        .unwrap();
    assert_eq!(r, NodeCommitted::Refused(ErrorCode::TokenReplayed));
    assert!(s.issued("p2").await.unwrap().is_none());

    // An AWS instance is bound to its first agent key.
    let aws = "spiffe://td/aws/1/i-1";
    let keyed = |key: &str, serial: &str| {
        let mut a = attestation("aws-i-1", aws, 0, 0);
        a.ak_name = format!("{AGENT_KEY_PREFIX}{key}");
        (a, node_svid(serial, aws))
    };
    for (key, serial, want) in [
        ("k1", "a1", None),
        ("k1", "a2", None),
        ("k2", "a3", Some(ErrorCode::NodeAgentKeyChanged)),
    ] {
        let (att, svid) = keyed(key, serial);
        let r = s
            .commit_node_attestation(att, svid, None, None, event(serial))
            .await
            .unwrap();
        match want {
            None => assert!(matches!(r, NodeCommitted::Done(_)), "{r:?}"),
            Some(code) => assert_eq!(r, NodeCommitted::Refused(code)),
        }
    }
    // An operator's reset forgets it; the next key enrols it.
    let forgotten = s
        .reset_node(aws, AuditEvent::new("node.reset", "operator:test"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(forgotten.ak_name, format!("{AGENT_KEY_PREFIX}k1"));
    assert!(s.node_by_spiffe_id(aws).await.unwrap().is_none());
    let (att, svid) = keyed("k2", "a4");
    let r = s
        .commit_node_attestation(att, svid, None, None, event("a4"))
        .await
        .unwrap();
    assert!(matches!(r, NodeCommitted::Done(_)), "{r:?}");
    // A banned node is not reset; an unknown one is not found.
    s.ban_node(
        aws,
        "operator:test",
        "test",
        AuditEvent::new("node.ban", "operator:test"),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(
        s.reset_node(aws, AuditEvent::new("node.reset", "operator:test"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        s.reset_node(
            "spiffe://td/none",
            AuditEvent::new("node.reset", "operator:test")
        )
        .await
        .unwrap()
        .is_none()
    );
    s.verify_audit_chain(1, None).await.unwrap();
}

/// On SQLite a batch is first written in one round trip, on the guess that
/// nothing in it is refused and that no one else appended to the audit log
/// since this writer's last batch. Each wrong guess is rolled back and the
/// batch written again, checked: with the outcome the checked path alone
/// gives, nothing of the guess left behind, and the chain unbroken.
async fn a_wrong_guess_is_rolled_back_and_written_checked(db: &Fixture) {
    let s = db.open().await;
    let guesses = matches!(db, Fixture::Sqlite(_));
    let rewritten = |s: &Store| s.query_stats().rewritten_transactions;
    let expect = |n: u64| if guesses { n } else { 0 };
    // The first batch learns the chain's tail; the next one guesses right.
    s.commit(mint(None, "a0")).await.unwrap();
    assert_eq!(
        s.commit(mint(None, "a1")).await.unwrap(),
        Committed::Done { audit_seq: 2 }
    );
    assert_eq!(rewritten(&s), 0);

    // Appended outside the group commit: the writer's tail is stale, the
    // guessed record collides with it and the batch is written checked.
    s.create_join_token(
        token(9, NOW + 600),
        AuditEvent::new("join_token.create", "op"),
    )
    .await
    .unwrap();
    assert_eq!(
        s.commit(mint(Some([9; 32]), "a2")).await.unwrap(),
        Committed::Done { audit_seq: 4 }
    );
    assert_eq!(rewritten(&s), expect(1));
    let used_at = s.join_token(&[9; 32]).await.unwrap().unwrap().used_at;
    assert_eq!(used_at, Some(NOW), "consumed once, by the checked write");

    // A refusal is a wrong guess too, and ends as the checked path decides.
    assert_eq!(
        s.commit(mint(Some([9; 32]), "a3")).await.unwrap(),
        Committed::Refused(ErrorCode::JoinTokenUsed)
    );
    assert_eq!(rewritten(&s), expect(2));
    assert!(s.issued("a3").await.unwrap().is_none());
    assert!(matches!(
        s.commit(exchange("jti:g#1", NOW + 600, "a4"))
            .await
            .unwrap(),
        Committed::Done { .. }
    ));
    assert_eq!(
        rewritten(&s),
        expect(2),
        "a fresh replay key is guessed right"
    );
    assert_eq!(
        s.commit(exchange("jti:g#1", NOW + 600, "a5"))
            .await
            .unwrap(),
        Committed::Refused(ErrorCode::TokenReplayed)
    );
    assert_eq!(rewritten(&s), expect(3));
    assert_eq!(
        s.commit(child("a6", "a1", "a1")).await.unwrap(),
        Committed::Done { audit_seq: 8 },
        "a parent in good standing is guessed right"
    );
    assert_eq!(
        s.commit(child("a7", "ff", "ff")).await.unwrap(),
        Committed::Refused(ErrorCode::SvidInvalid)
    );
    assert_eq!(rewritten(&s), expect(4));
    s.revoke("a1", "r", "op", AuditEvent::new("credential.revoke", "op"))
        .await
        .unwrap();
    assert_eq!(
        s.commit(child("a8", "a6", "a1")).await.unwrap(),
        Committed::Refused(ErrorCode::SvidRevoked)
    );
    assert_eq!(rewritten(&s), expect(5));
    for serial in ["a5", "a7", "a8"] {
        assert!(s.issued(serial).await.unwrap().is_none(), "{serial}");
    }
    let report = s.verify_audit_chain(1, None).await.unwrap();
    assert_eq!((report.records, report.last_seq), (11, 11));
    assert_eq!(denied(&s).await, 4);
}

backend_suite!(
    federated_bundles_move_forward_only_and_keep_the_last_good_one,
    replica_heartbeats_are_upserted_listed_and_forgotten,
    key_rotation_is_decided_once_through_the_database,
    migrations_apply_and_reopen_is_idempotent,
    a_join_token_is_consumed_exactly_once_under_a_race,
    unknown_and_expired_tokens_get_their_codes_and_write_nothing_else,
    an_issuance_and_its_audit_record_land_together,
    a_promised_commit_is_waited_for_only_briefly,
    revocation_and_the_ca_key_ring,
    two_processes_appending_keep_one_chain,
    the_audit_log_is_append_only_and_tampering_is_located,
    credential_status_answers_issued_and_revoked_in_one_query,
    a_token_jti_is_used_exactly_once_under_a_race_and_across_restarts,
    the_node_registry_enforces_counters_one_ek_per_identity_and_bans,
    revoking_a_credential_revokes_its_descendants_and_nothing_else,
    a_refused_commit_leaves_nothing_behind,
    nodes_without_a_tpm_use_tokens_once_keep_their_agent_key_and_reset,
    a_wrong_guess_is_rolled_back_and_written_checked,
);
