//! Requests signed by a real AWS SDK signer (botocore) with Herald session
//! credentials verify; tampered, expired, skewed, foreign or out-of-scope
//! ones do not.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use herald_cloud_creds::sigv4::{SignedRequest, VerifyOptions, verify_request};
use herald_cloud_creds::{CredsError, MintRequest, SessionCredentials, SessionKeyring};
use herald_core::ScopePolicy;
use serde_json::{Value, json};
use time::OffsetDateTime;

fn python() -> PathBuf {
    if let Ok(p) = std::env::var("HERALD_PYTHON") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../.venv/bin/python"
    ));
    assert!(
        p.exists(),
        "{} is missing: run `bash scripts/install-deps.sh` (it installs boto3/botocore)",
        p.display()
    );
    p
}

fn mint(ring: &SessionKeyring, now: OffsetDateTime) -> SessionCredentials {
    let scope = ScopePolicy::from_json(&json!({"Statement": [
        {"Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"], "Resource": "arn:aws:s3:::art/*"}
    ]}))
    .unwrap();
    ring.mint(&MintRequest {
        spiffe_id: "spiffe://td.test/ci/app".into(),
        role_arn: "arn:aws:iam::123456789012:role/deploy".into(),
        session_name: "run-1".into(),
        scope,
        policy: "deploy".into(),
        serial: "00ff".into(),
        issued_at: now,
        expires_at: now + time::Duration::hours(1),
    })
    .unwrap()
}

/// Signs with botocore and returns the request as a server would receive it.
fn sign(creds: &SessionCredentials, spec: Value) -> SignedRequest {
    let mut input = spec.clone();
    input["access_key_id"] = json!(creds.access_key_id);
    input["secret_access_key"] = json!(creds.secret_access_key.as_str());
    input["session_token"] = json!(creds.session_token);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sign_with_botocore.py");
    let mut child = Command::new(python())
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let url = v["url"].as_str().unwrap();
    let after_scheme = url.split_once("://").unwrap().1;
    let path_query = &after_scheme[after_scheme.find('/').unwrap_or(after_scheme.len())..];
    let (path, query) = path_query.split_once('?').unwrap_or((path_query, ""));
    let host = after_scheme.split('/').next().unwrap();
    let mut headers: Vec<(String, String)> = v["headers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_str().unwrap().into(), p[1].as_str().unwrap().into()))
        .collect();
    // The HTTP client adds Host on the wire; botocore signed it.
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        headers.push(("Host".into(), host.into()));
    }
    SignedRequest {
        method: v["method"].as_str().unwrap().into(),
        path: path.into(),
        query: query.into(),
        headers,
        body: v["body"].as_str().unwrap().as_bytes().to_vec(),
    }
}

fn opts(service: &str, s3: bool) -> VerifyOptions {
    VerifyOptions {
        region: Some("eu-west-1".into()),
        service: Some(service.into()),
        max_skew: Duration::from_secs(300),
        single_encode_path: s3,
    }
}

#[test]
fn botocore_signed_requests_verify_across_services_and_shapes() {
    let ring = SessionKeyring::generate().unwrap();
    let now = OffsetDateTime::now_utc();
    let creds = mint(&ring, now);
    let cases = [
        (
            json!({"method": "GET", "url": "https://art.s3.eu-west-1.amazonaws.com/builds/a%20b/%C3%A9t%C3%A9.tar?versionId=3&list-type=2", "service": "s3", "s3": true}),
            "s3",
            true,
        ),
        (
            json!({"method": "PUT", "url": "https://art.s3.eu-west-1.amazonaws.com/builds/1.tar", "body": "payload bytes", "service": "s3", "s3": true}),
            "s3",
            true,
        ),
        (
            json!({"method": "POST", "url": "https://sts.eu-west-1.amazonaws.com/", "body": "Action=GetCallerIdentity&Version=2011-06-15", "headers": {"Content-Type": "application/x-www-form-urlencoded"}, "service": "sts"}),
            "sts",
            false,
        ),
        (
            json!({"method": "GET", "url": "https://api.example.com/prod/items/a%20b/./c?z=1&a=%2F&a=0&empty=", "service": "execute-api"}),
            "execute-api",
            false,
        ),
        (
            json!({"method": "POST", "url": "https://api.example.com/prod/orders", "body": "{\"id\": 1}", "headers": {"Content-Type": "application/json", "X-Custom": "  spaced   value "}, "service": "execute-api"}),
            "execute-api",
            false,
        ),
    ];
    for (mut spec, service, s3) in cases {
        spec["region"] = json!("eu-west-1");
        let req = sign(&creds, spec.clone());
        let caller = verify_request(&ring, &req, &opts(service, s3), now)
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert_eq!(caller.claims.spiffe_id, "spiffe://td.test/ci/app");
        assert_eq!(caller.service, service);
    }
}

#[test]
fn tampering_in_any_part_is_caught() {
    let ring = SessionKeyring::generate().unwrap();
    let now = OffsetDateTime::now_utc();
    let creds = mint(&ring, now);
    let spec = json!({"method": "POST", "url": "https://api.example.com/prod/orders?x=1", "body": "{\"amount\": 100}", "headers": {"X-Order": "42"}, "region": "eu-west-1", "service": "execute-api"});
    let good = sign(&creds, spec);
    let o = opts("execute-api", false);
    verify_request(&ring, &good, &o, now).unwrap();

    let mut r = good.clone();
    r.body[12] ^= 1;
    assert_eq!(
        verify_request(&ring, &r, &o, now).unwrap_err(),
        CredsError::SignatureMismatch
    );
    let mut r = good.clone();
    for (k, v) in r.headers.iter_mut() {
        if k.eq_ignore_ascii_case("x-order") {
            *v = "43".into();
        }
    }
    assert_eq!(
        verify_request(&ring, &r, &o, now).unwrap_err(),
        CredsError::SignatureMismatch
    );
    let mut r = good.clone();
    r.query = "x=2".into();
    assert_eq!(
        verify_request(&ring, &r, &o, now).unwrap_err(),
        CredsError::SignatureMismatch
    );
    let mut r = good.clone();
    r.path = "/prod/refunds".into();
    assert_eq!(
        verify_request(&ring, &r, &o, now).unwrap_err(),
        CredsError::SignatureMismatch
    );
    let mut r = good.clone();
    for (k, v) in r.headers.iter_mut() {
        if k.eq_ignore_ascii_case("authorization") {
            let last = v.pop().unwrap();
            v.push(if last == '0' { '1' } else { '0' });
        }
    }
    assert_eq!(
        verify_request(&ring, &r, &o, now).unwrap_err(),
        CredsError::SignatureMismatch
    );
    // A flipped byte of the session token.
    let mut r = good.clone();
    for (k, v) in r.headers.iter_mut() {
        if k.eq_ignore_ascii_case("x-amz-security-token") {
            let mut b = v.clone().into_bytes();
            b[40] = if b[40] == b'A' { b'B' } else { b'A' };
            *v = String::from_utf8(b).unwrap();
        }
    }
    assert!(verify_request(&ring, &r, &o, now).is_err());
    // Wrong region or service.
    assert!(matches!(
        verify_request(&ring, &good, &opts("s3", false), now).unwrap_err(),
        CredsError::ScopeMismatch(_)
    ));
}

#[test]
fn expiry_skew_and_foreign_key_pairs_fail() {
    let ring = SessionKeyring::generate().unwrap();
    let now = OffsetDateTime::now_utc();
    let creds = mint(&ring, now);
    let spec = json!({"method": "GET", "url": "https://api.example.com/x", "region": "eu-west-1", "service": "execute-api"});
    let req = sign(&creds, spec.clone());
    let o = opts("execute-api", false);
    assert_eq!(
        verify_request(&ring, &req, &o, now + time::Duration::hours(2)).unwrap_err(),
        CredsError::Expired
    );
    assert_eq!(
        verify_request(&ring, &req, &o, now + time::Duration::minutes(10)).unwrap_err(),
        CredsError::ClockSkew
    );
    // Another key pair's session token spliced into this request.
    let other = mint(&ring, now);
    let mut spliced = req.clone();
    for (k, v) in spliced.headers.iter_mut() {
        if k.eq_ignore_ascii_case("x-amz-security-token") {
            *v = other.session_token.clone();
        }
    }
    assert_eq!(
        verify_request(&ring, &spliced, &o, now).unwrap_err(),
        CredsError::TokenInvalid
    );
    // The other key pair with its own token verifies.
    verify_request(&ring, &sign(&other, spec.clone()), &o, now).unwrap();
    // A token from another Herald (another keyring) does not open here.
    let foreign = SessionKeyring::generate().unwrap();
    let f = mint(&foreign, now);
    assert_eq!(
        verify_request(&ring, &sign(&f, spec.clone()), &o, now).unwrap_err(),
        CredsError::UnknownKey
    );
    // After rotation and retirement of the old key, old credentials stop working.
    let mut ring = ring;
    let old = ring.active_id().to_string();
    ring.rotate().unwrap();
    verify_request(&ring, &req, &o, now).unwrap();
    ring.retire(&old).unwrap();
    assert_eq!(
        verify_request(&ring, &req, &o, now).unwrap_err(),
        CredsError::UnknownKey
    );
}

#[test]
fn scope_is_enforced_after_verification() {
    let ring = SessionKeyring::generate().unwrap();
    let now = OffsetDateTime::now_utc();
    let creds = mint(&ring, now);
    let req = sign(
        &creds,
        json!({"method": "GET", "url": "https://art.s3.eu-west-1.amazonaws.com/k", "region": "eu-west-1", "service": "s3", "s3": true}),
    );
    let caller = verify_request(&ring, &req, &opts("s3", true), now).unwrap();
    caller
        .authorize("s3:GetObject", "arn:aws:s3:::art/k")
        .unwrap();
    assert_eq!(
        caller
            .authorize("s3:DeleteObject", "arn:aws:s3:::art/k")
            .unwrap_err(),
        CredsError::ScopeDenied
    );
    assert_eq!(
        caller
            .authorize("s3:GetObject", "arn:aws:s3:::secrets/k")
            .unwrap_err(),
        CredsError::ScopeDenied
    );
}

#[test]
fn presigned_urls_verify_until_they_expire() {
    let ring = SessionKeyring::generate().unwrap();
    let now = OffsetDateTime::now_utc();
    let creds = mint(&ring, now);
    let req = sign(
        &creds,
        json!({"method": "GET", "url": "https://art.s3.eu-west-1.amazonaws.com/builds/1.tar", "region": "eu-west-1", "service": "s3", "s3": true, "presign": 600}),
    );
    assert!(req.query.contains("X-Amz-Signature"), "{}", req.query);
    let o = opts("s3", true);
    verify_request(&ring, &req, &o, now).unwrap();
    assert_eq!(
        verify_request(&ring, &req, &o, now + time::Duration::minutes(11)).unwrap_err(),
        CredsError::ClockSkew
    );
    let mut r = req.clone();
    r.path = "/builds/2.tar".into();
    assert_eq!(
        verify_request(&ring, &r, &o, now).unwrap_err(),
        CredsError::SignatureMismatch
    );
}
