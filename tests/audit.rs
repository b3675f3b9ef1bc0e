//! The audit trail against a database writer: signed checkpoints of the
//! chain's head detect a truncated tail, a rewrite with every hash
//! recomputed, and a checkpoint forged with a key that does not open under
//! the KEK — each with its own code, through the real CLI.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;

use common::*;
use herald_core::AuditEvent;
use sqlx::{Connection, Row, SqliteConnection};

/// Mints `n` SVIDs (each one audit record, plus its token's creation).
fn activity(site: &Site, server: &Server, n: usize, tag: &str) {
    for i in 0..n {
        let out = tempfile::tempdir().unwrap();
        let token = site.token(&format!("spiffe://{TRUST_DOMAIN}/audit/{tag}{i}"));
        ok(site.mint(server, &token, out.path()));
    }
}

/// The CLI's outcome: (exit ok, stdout, stderr).
fn herald(site: &Site, args: &[&str]) -> (bool, String, String) {
    let out = site.herald(args);
    (out.status.success(), stdout(&out), stderr(&out))
}

async fn attacker(site: &Site) -> SqliteConnection {
    let mut c = SqliteConnection::connect(&site.db_url()).await.unwrap();
    for t in [
        "audit_log_no_update",
        "audit_log_no_delete",
        "audit_checkpoints_no_update",
        "audit_checkpoints_no_delete",
    ] {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP TRIGGER IF EXISTS {t}")))
            .execute(&mut c)
            .await
            .unwrap();
    }
    c
}

/// Edits record `seq`'s caller and recomputes every hash from there on, as
/// someone with write access to the database (and the source) would.
async fn rewrite_and_recompute(c: &mut SqliteConnection, seq: i64) {
    sqlx::query("UPDATE audit_log SET caller = 'peer:nobody' WHERE seq = ?")
        .bind(seq)
        .execute(&mut *c)
        .await
        .unwrap();
    let rows = sqlx::query(
        "SELECT seq, time_ms, caller, action, evidence_type, evidence_digest, policy, spiffe_id, \
         serial, outcome, reason, detail FROM audit_log WHERE seq >= ? ORDER BY seq",
    )
    .bind(seq)
    .fetch_all(&mut *c)
    .await
    .unwrap();
    let (prev,): (Vec<u8>,) = sqlx::query_as("SELECT hash FROM audit_log WHERE seq = ?")
        .bind(seq - 1)
        .fetch_one(&mut *c)
        .await
        .unwrap();
    let mut prev: [u8; 32] = prev.try_into().unwrap();
    for r in rows {
        let s: i64 = r.get(0);
        let mut e = AuditEvent::new(r.get::<String, _>(3), r.get::<String, _>(2));
        e.time_ms = r.get(1);
        e.evidence_type = r
            .get::<Option<String>, _>(4)
            .and_then(|t| herald_core::EvidenceType::from_code(&t));
        e.evidence_digest = r.get(5);
        e.policy = r.get(6);
        e.spiffe_id = r.get(7);
        e.serial = r.get(8);
        e.outcome = herald_core::Outcome::from_code(&r.get::<String, _>(9)).unwrap();
        e.reason = r
            .get::<Option<String>, _>(10)
            .and_then(|c| herald_core::ErrorCode::from_code(&c));
        e.detail = r.get(11);
        let hash = herald_store::audit_hash(s as u64, &prev, &e);
        sqlx::query("UPDATE audit_log SET prev_hash = ?, hash = ? WHERE seq = ?")
            .bind(prev.to_vec())
            .bind(hash.to_vec())
            .bind(s)
            .execute(&mut *c)
            .await
            .unwrap();
        prev = hash;
    }
}

fn checkpoint_seq(file: &Path) -> i64 {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    v["seq"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rewrite_with_recomputed_hashes_is_caught_by_a_checkpoint() {
    let site = Site::new();
    let server = site.start();
    activity(&site, &server, 3, "a");
    let dir = tempfile::tempdir().unwrap();
    let cp = dir.path().join("cp.json");
    let (done, _, err) = herald(
        &site,
        &["audit", "checkpoint", "--out", cp.to_str().unwrap()],
    );
    assert!(done, "{err}");
    activity(&site, &server, 2, "b");
    server.stop();
    let (done, out, err) = herald(
        &site,
        &["audit", "verify", "--checkpoint", cp.to_str().unwrap()],
    );
    assert!(done, "{out}{err}");
    assert!(out.contains("matches"), "{out}");

    // Rewrite a record before the checkpoint, recompute every hash after
    // it, and remove the stored checkpoints: the chain alone looks intact.
    let mut db = attacker(&site).await;
    rewrite_and_recompute(&mut db, checkpoint_seq(&cp) - 2).await;
    sqlx::query("DELETE FROM audit_checkpoints")
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    let (done, out, _) = herald(&site, &["audit", "verify"]);
    assert!(done, "the recomputed chain verifies on its own: {out}");
    // The checkpoint kept elsewhere does not.
    let (done, _, err) = herald(
        &site,
        &["audit", "verify", "--checkpoint", cp.to_str().unwrap()],
    );
    assert!(!done);
    assert!(err.contains("error[audit_rewritten]"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_checkpoints_catch_a_rewrite_too_and_a_truncated_tail_is_named() {
    let site = Site::new();
    let server = site.start();
    activity(&site, &server, 3, "a");
    let dir = tempfile::tempdir().unwrap();
    let cp = dir.path().join("cp.json");
    assert!(
        herald(
            &site,
            &["audit", "checkpoint", "--out", cp.to_str().unwrap()]
        )
        .0
    );
    server.stop();
    let seq = checkpoint_seq(&cp);

    // The stored checkpoint alone catches a rewrite that leaves it in place.
    let mut db = attacker(&site).await;
    rewrite_and_recompute(&mut db, seq - 1).await;
    db.close().await.unwrap();
    let (done, _, err) = herald(&site, &["audit", "verify"]);
    assert!(!done);
    assert!(err.contains("error[audit_rewritten]"), "{err}");

    // Cutting the tail back before the checkpoint's head: truncated.
    let site = Site::new();
    let server = site.start();
    activity(&site, &server, 3, "t");
    assert!(
        herald(
            &site,
            &["audit", "checkpoint", "--out", cp.to_str().unwrap()]
        )
        .0
    );
    server.stop();
    let seq = checkpoint_seq(&cp);
    let mut db = attacker(&site).await;
    sqlx::query("DELETE FROM audit_log WHERE seq >= ?")
        .bind(seq - 1)
        .execute(&mut db)
        .await
        .unwrap();
    sqlx::query("DELETE FROM audit_checkpoints")
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    assert!(
        herald(&site, &["audit", "verify"]).0,
        "a cut tail leaves a valid chain"
    );
    let (done, _, err) = herald(
        &site,
        &["audit", "verify", "--checkpoint", cp.to_str().unwrap()],
    );
    assert!(!done);
    assert!(err.contains("error[audit_truncated]"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_forged_without_the_kek_is_refused() {
    let site = Site::new();
    let server = site.start();
    activity(&site, &server, 2, "a");
    server.stop();
    let (head_seq, head_hash) = {
        let store = herald_store::Store::open(&site.db_url()).await.unwrap();
        let head = store.audit_head().await.unwrap().unwrap();
        store.close().await;
        head
    };
    // The attacker's own key, put in the key ring with a sealed key that
    // cannot open under the KEK, and a checkpoint signed with it.
    let (rogue, _) = herald_ca::JwtSigner::generate().unwrap();
    let forged = herald_ca::checkpoint::Checkpoint {
        trust_domain: TRUST_DOMAIN.into(),
        seq: head_seq,
        hash: head_hash,
        time_ms: 1,
    }
    .sign(&rogue)
    .unwrap();
    let mut db = attacker(&site).await;
    sqlx::query(
        "INSERT INTO ca_keys (key_id, kind, status, cert_der, chain_der, encrypted_key, not_before, \
         not_after, created_at, status_since) VALUES (?, 'audit', 'active', ?, x'', x'00', 0, 9999999999, 0, 0)",
    )
    .bind(rogue.kid())
    .bind(rogue.public_point().to_vec())
    .execute(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("forged.json");
    std::fs::write(
        &file,
        serde_json::json!({ "checkpoint": forged }).to_string(),
    )
    .unwrap();
    let (done, _, err) = herald(
        &site,
        &["audit", "verify", "--checkpoint", file.to_str().unwrap()],
    );
    assert!(!done);
    assert!(err.contains("error[audit_checkpoint_forged]"), "{err}");
    // A genuine checkpoint with its signature altered is refused the same way.
    let (done, _, err) = herald(&site, &["audit", "checkpoint"]);
    assert!(done, "{err}");
    let store = herald_store::Store::open(&site.db_url()).await.unwrap();
    let genuine = store.checkpoints().await.unwrap().pop().unwrap();
    store.close().await;
    let mut jws = genuine.jws.clone();
    let last = jws.pop().unwrap();
    jws.push(if last == 'A' { 'B' } else { 'A' });
    std::fs::write(&file, &jws).unwrap();
    let (done, _, err) = herald(
        &site,
        &["audit", "verify", "--checkpoint", file.to_str().unwrap()],
    );
    assert!(!done);
    assert!(err.contains("error[audit_checkpoint_forged]"), "{err}");
}

#[test]
fn the_server_writes_checkpoints_on_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let site = Site::with_extra(&format!(
        "[audit]\ncheckpoint_interval = \"200ms\"\ncheckpoint_dir = \"{}\"\n",
        dir.path().display()
    ));
    let server = site.start();
    activity(&site, &server, 1, "s");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let file = loop {
        let found = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "json"));
        if let Some(f) = found {
            break f;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no checkpoint file written"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    server.stop();
    let (done, out, err) = herald(
        &site,
        &["audit", "verify", "--checkpoint", file.to_str().unwrap()],
    );
    assert!(done, "{out}{err}");
    assert!(out.contains("stored checkpoint"), "{out}");
}

/// The audit keys of the ring, as `herald ca status --json` lists them:
/// (key id, status).
fn audit_keys(site: &Site) -> Vec<(String, String)> {
    let (done, out, err) = herald(site, &["ca", "status", "--json"]);
    assert!(done, "{err}");
    out.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|k| k["kind"] == "audit")
        .map(|k| {
            (
                k["key_id"].as_str().unwrap().to_owned(),
                k["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// The audit key rotates with the key ring: a checkpoint signed before
/// `herald ca rotate --kind audit` still verifies once its key is retired,
/// and one signed after verifies under the new key — both named by the key
/// that signed them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_verify_across_an_audit_key_rotation() {
    let site = Site::with_extra(
        "bundle_poll = \"200ms\"\n[ca.rotation]\npublish_ahead = \"1s\"\ncheck_interval = \"200ms\"\n",
    );
    let server = site.start();
    activity(&site, &server, 2, "a");
    let keys = audit_keys(&site);
    assert_eq!(keys.len(), 1, "{keys:?}");
    let (old_key, status) = keys[0].clone();
    assert_eq!(status, "active");
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (dir.path().join("old.json"), dir.path().join("new.json"));
    let (done, _, err) = herald(
        &site,
        &["audit", "checkpoint", "--out", old.to_str().unwrap()],
    );
    assert!(done, "{err}");

    let (done, out, err) = herald(&site, &["ca", "rotate", "--kind", "audit"]);
    assert!(done, "{err}");
    let new_key = out
        .strip_prefix("audit: prepared ")
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("{out}"))
        .to_owned();
    assert!(!out.contains("x509") && !out.contains("jwt"), "{out}");
    // The server activates the new key after publish_ahead and retires the
    // old one after its grace.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let keys = audit_keys(&site);
        let status = |id: &str| {
            keys.iter()
                .find(|(k, _)| k == id)
                .map(|(_, s)| s.clone())
                .unwrap_or_default()
        };
        if status(&new_key) == "active" && status(&old_key) == "retired" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the audit key did not rotate: {keys:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    activity(&site, &server, 1, "b");
    let (done, _, err) = herald(
        &site,
        &["audit", "checkpoint", "--out", new.to_str().unwrap()],
    );
    assert!(done, "{err}");
    server.stop();
    assert!(checkpoint_seq(&new) > checkpoint_seq(&old));

    let (done, out, err) = herald(
        &site,
        &[
            "audit",
            "verify",
            "--checkpoint",
            old.to_str().unwrap(),
            "--checkpoint",
            new.to_str().unwrap(),
        ],
    );
    assert!(done, "{out}{err}");
    for (file, key) in [(&old, &old_key), (&new, &new_key)] {
        let line = format!(
            "{}: record {} matches (signed by {key};",
            file.display(),
            checkpoint_seq(file)
        );
        assert!(out.contains(&line), "{line} not in {out}");
    }
    // A rewrite before the old checkpoint is caught through the retired key.
    let mut db = attacker(&site).await;
    rewrite_and_recompute(&mut db, checkpoint_seq(&old) - 1).await;
    sqlx::query("DELETE FROM audit_checkpoints")
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    let (done, _, err) = herald(
        &site,
        &["audit", "verify", "--checkpoint", old.to_str().unwrap()],
    );
    assert!(!done);
    assert!(err.contains("error[audit_rewritten]"), "{err}");
}
