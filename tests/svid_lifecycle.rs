//! End to end through the real binary: mint with a join token, verify with
//! openssl, renew over mTLS, restart, audit.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

fn openssl_verify(
    bundle: &std::path::Path,
    svid: &std::path::Path,
    purpose: &str,
) -> (bool, String) {
    let out = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(bundle)
        .args(["-purpose", purpose])
        .arg(svid)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!("{}{}", stdout(&out), stderr(&out)),
    )
}

#[test]
fn mint_verify_with_openssl_renew_and_show() {
    require_tool("openssl");
    let site = Site::new();
    let server = site.start();
    assert!(
        server.startup_line.contains("ready"),
        "{}",
        server.startup_line
    );
    let id = format!("spiffe://{TRUST_DOMAIN}/ci/deployer");
    let token = site.token(&id);
    let out_dir = site.dir.path().join("svid");

    let minted = ok(site.mint(&server, &token, &out_dir));
    assert!(stdout(&minted).contains(&id), "{}", stdout(&minted));

    let svid = out_dir.join("svid.pem");
    let key_mode = std::fs::metadata(out_dir.join("svid.key"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600, "svid.key must be 0600");
    let (ok_client, msg) = openssl_verify(&out_dir.join("bundle.pem"), &svid, "sslclient");
    assert!(
        ok_client,
        "openssl rejected the SVID for client auth: {msg}"
    );
    let (ok_server, msg) = openssl_verify(&out_dir.join("bundle.pem"), &svid, "sslserver");
    assert!(
        ok_server,
        "openssl rejected the SVID for server auth: {msg}"
    );

    let shown = ok(site.herald(&["svid", "show", svid.to_str().unwrap()]));
    let text = stdout(&shown);
    assert!(text.contains(&id) && text.contains("(valid)"), "{text}");
    let serial_before = text
        .lines()
        .find_map(|l| l.strip_prefix("serial      "))
        .unwrap()
        .to_owned();

    let renewed = ok(site.herald(&[
        "svid",
        "renew",
        "--server",
        &server.url(),
        "--out",
        out_dir.to_str().unwrap(),
    ]));
    assert!(stdout(&renewed).contains(&id));
    let text = stdout(&ok(site.herald(&["svid", "show", svid.to_str().unwrap()])));
    let serial_after = text
        .lines()
        .find_map(|l| l.strip_prefix("serial      "))
        .unwrap()
        .to_owned();
    assert_ne!(
        serial_before, serial_after,
        "renewal issues a new certificate"
    );
    let (ok_client, msg) = openssl_verify(&out_dir.join("bundle.pem"), &svid, "sslclient");
    assert!(ok_client, "renewed SVID rejected: {msg}");

    // The same token cannot mint twice.
    let again = site.mint(&server, &token, &site.dir.path().join("x"));
    assert!(!again.status.success());
    assert!(
        stderr(&again).contains("error[join_token_used]"),
        "{}",
        stderr(&again)
    );

    // HTTP endpoints.
    assert_eq!(server.http_get("/healthz").0, 200);
    assert_eq!(server.http_get("/readyz").0, 200);
    let (status, jwks) = server.http_get("/v1/bundle");
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    assert_eq!(v["keys"][0]["use"], "x509-svid");
    let (status, pem) = server.http_get("/v1/bundle.pem");
    assert_eq!(status, 200);
    assert_eq!(
        pem,
        std::fs::read_to_string(out_dir.join("bundle.pem")).unwrap()
    );

    let audit = ok(site.herald(&["audit", "verify"]));
    assert!(
        stdout(&audit).contains("audit chain intact"),
        "{}",
        stdout(&audit)
    );
    server.stop();
}

#[test]
fn restarted_server_keeps_its_ca_tokens_and_audit_chain() {
    let site = Site::new();
    let server = site.start();
    let id_a = format!("spiffe://{TRUST_DOMAIN}/node/a");
    let id_b = format!("spiffe://{TRUST_DOMAIN}/node/b");
    let token_a = site.token(&id_a);
    let token_b = site.token(&id_b);
    let dir_a = site.dir.path().join("a");
    ok(site.mint(&server, &token_a, &dir_a));
    let bundle_before = std::fs::read_to_string(site.bundle_pem()).unwrap();
    let records_before = stdout(&ok(site.herald(&["audit", "verify"])));
    server.stop();

    let server = site.start();
    assert_eq!(
        std::fs::read_to_string(site.bundle_pem()).unwrap(),
        bundle_before,
        "the CA survives a restart"
    );
    // Token B, created before the restart, still works; token A stays used.
    let dir_b = site.dir.path().join("b");
    ok(site.mint(&server, &token_b, &dir_b));
    let reuse = site.mint(&server, &token_a, &site.dir.path().join("c"));
    assert!(
        stderr(&reuse).contains("error[join_token_used]"),
        "{}",
        stderr(&reuse)
    );
    // The SVID minted before the restart renews after it.
    ok(site.herald(&[
        "svid",
        "renew",
        "--server",
        &server.url(),
        "--out",
        dir_a.to_str().unwrap(),
    ]));

    let records_after = stdout(&ok(site.herald(&["audit", "verify"])));
    let count = |s: &str| -> u64 {
        s.split(": ")
            .nth(1)
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert!(
        count(&records_after) >= count(&records_before) + 3,
        "{records_before} -> {records_after}"
    );
    server.stop();
}

#[test]
fn tampering_with_one_audit_row_is_detected() {
    let site = Site::new();
    let server = site.start();
    let token = site.token(&format!("spiffe://{TRUST_DOMAIN}/w"));
    ok(site.mint(&server, &token, &site.dir.path().join("s")));
    server.stop();
    ok(site.herald(&["audit", "verify"]));

    // An attacker with write access to the database file: the triggers stop
    // casual edits, so drop them first, then rewrite history.
    let db = site.data_dir().join("herald.db");
    let sql = "DROP TRIGGER IF EXISTS audit_log_no_update; DROP TRIGGER IF EXISTS audit_log_no_delete; \
               UPDATE audit_log SET caller = 'someone-else' WHERE seq = 2;";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
            .await
            .unwrap();
        // Triggers may have other names: drop every trigger on audit_log.
        let names: Vec<(String,)> = sqlx::query_as(
            "SELECT name FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'audit_log'",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap();
        for (name,) in names {
            sqlx::query(sqlx::AssertSqlSafe(format!("DROP TRIGGER \"{name}\"")))
                .execute(&mut conn)
                .await
                .unwrap();
        }
        let r = sqlx::query(sqlx::AssertSqlSafe(
            sql.rsplit(';').nth(1).unwrap().trim().to_owned(),
        ))
        .execute(&mut conn)
        .await
        .unwrap();
        assert_eq!(r.rows_affected(), 1);
    });
    let out = site.herald(&["audit", "verify"]);
    assert!(
        !out.status.success(),
        "tampering went unnoticed: {}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("error[audit_chain_broken]: audit record 2"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn cli_errors_are_a_line_with_a_stable_code_and_a_line_with_the_fix() {
    let site = Site::new();
    let server = site.start();
    let out = site.herald(&["token", "create", "--spiffe-id", "spiffe://other.org/x"]);
    assert!(!out.status.success());
    let text = stderr(&out);
    let lines: Vec<&str> = text.trim().lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].starts_with("herald: error[invalid_request]: "),
        "{text}"
    );
    assert!(lines[1].starts_with("  fix: "), "{text}");
    let out = site.herald(&[
        "token",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TRUST_DOMAIN}/x"),
        "--ttl",
        "100d",
    ]);
    assert!(
        stderr(&out).contains("error[ttl_too_long]"),
        "{}",
        stderr(&out)
    );
    let out = site.herald(&[
        "token",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TRUST_DOMAIN}/../x"),
    ]);
    assert!(
        stderr(&out).contains("error[invalid_request]"),
        "{}",
        stderr(&out)
    );
    let out = site.mint(&server, "garbage", &site.dir.path().join("z"));
    assert!(
        stderr(&out).contains("error[join_token_malformed]"),
        "{}",
        stderr(&out)
    );
    assert!(
        !site.dir.path().join("z").exists(),
        "nothing is written on failure"
    );
    let out = site.herald(&["revoke", "--serial", "abcdef"]);
    assert!(
        stderr(&out).contains("error[not_found]"),
        "{}",
        stderr(&out)
    );
    let listed = stdout(&ok(site.herald(&["token", "list"])));
    assert!(listed.contains("TOKEN ID"));
    server.stop();
}

#[test]
fn bulk_revocation_by_identity_and_window_stops_renewals() {
    let site = Site::new();
    let server = site.start();
    let (a, b) = (
        format!("spiffe://{TRUST_DOMAIN}/incident/a"),
        format!("spiffe://{TRUST_DOMAIN}/incident/b"),
    );
    let (dir_a, dir_b) = (site.dir.path().join("a"), site.dir.path().join("b"));
    ok(site.mint(&server, &site.token(&a), &dir_a));
    ok(site.mint(&server, &site.token(&b), &dir_b));
    let renew = |dir: &std::path::Path| {
        site.herald(&[
            "svid",
            "renew",
            "--server",
            &server.url(),
            "--out",
            dir.to_str().unwrap(),
        ])
    };
    // Nothing without a condition.
    let out = site.herald(&["revoke"]);
    assert!(
        stderr(&out).contains("error[invalid_request]"),
        "{}",
        stderr(&out)
    );
    // Everything issued to a, in the last hour: its renewal is refused, b's is not.
    let out = ok(site.herald(&[
        "revoke",
        "--spiffe-id",
        &a,
        "--since",
        "1h",
        "--reason",
        "incident 42",
    ]));
    assert_eq!(stdout(&out).trim(), "revoked 1 credential(s)");
    let refused = renew(&dir_a);
    assert!(
        stderr(&refused).contains("error[svid_revoked]"),
        "{}",
        stderr(&refused)
    );
    ok(renew(&dir_b));
    // A window that ended before anything was issued matches nothing.
    let out = ok(site.herald(&["revoke", "--spiffe-id", &b, "--until", "2h"]));
    assert_eq!(stdout(&out).trim(), "revoked 0 credential(s)");
    // The bulk revocation is audited with its conditions.
    let audit = stdout(&ok(site.herald(&["audit", "export", "--since", "1h"])));
    assert!(
        audit
            .lines()
            .any(|l| l.contains("credential.revoke_bulk") && l.contains(&a)),
        "{audit}"
    );
    server.stop();
}

#[test]
fn ca_status_lists_the_key_ring_the_bundle_publishes() {
    let site = Site::new();
    let server = site.start();
    let out = ok(site.herald(&["ca", "status", "--json"]));
    let lines: Vec<serde_json::Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (summary, keys) = lines.split_last().unwrap();
    assert_eq!(summary["trust_domain"], TRUST_DOMAIN);
    assert_eq!(summary["keys"], keys.len());
    // Every key added bumps the bundle sequence: the CA, JWT and session keys.
    assert_eq!(summary["bundle_sequence"], keys.len());
    let of = |kind: &str| -> Vec<&serde_json::Value> {
        keys.iter().filter(|k| k["kind"] == kind).collect()
    };
    for kind in ["x509", "jwt", "session"] {
        let ks = of(kind);
        assert_eq!(ks.len(), 1, "{kind}: {ks:?}");
        assert_eq!(ks[0]["status"], "active");
        assert_eq!(ks[0]["rotation_due"], false, "a fresh key is not due");
        assert_eq!(ks[0]["in_bundle"], kind != "session");
    }
    assert!(of("x509")[0]["expires_in_secs"].as_i64().unwrap() > 86_400);
    // The JWT key it lists is the one the server publishes in its JWKS.
    let (status, jwks) = server.http_get("/.well-known/jwks.json");
    assert_eq!(status, 200);
    let jwks: serde_json::Value = serde_json::from_str(&jwks).unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["kid"].as_str())
        .collect();
    assert_eq!(kids, vec![of("jwt")[0]["key_id"].as_str().unwrap()]);
    // The table names the same keys.
    let table = stdout(&ok(site.herald(&["ca", "status"])));
    for k in keys {
        assert!(table.contains(k["key_id"].as_str().unwrap()), "{table}");
    }
}
