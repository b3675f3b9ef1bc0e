//! Requests signed by a real AWS SDK signer (botocore) with Herald session
//! credentials verify; tampered, expired, skewed, foreign or out-of-scope
//! ones do not.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use herald_cloud_creds::session::MAX_TOKEN_CHARS;
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
    to_signed_request(&botocore(creds, spec))
}

/// Runs botocore's signer; its output `{method, url, headers, body}`.
fn botocore(creds: &SessionCredentials, spec: Value) -> Value {
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
    serde_json::from_slice(&out.stdout).unwrap()
}

fn to_signed_request(v: &Value) -> SignedRequest {
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

fn set_header(req: &mut SignedRequest, name: &str, f: impl Fn(&mut String)) {
    let mut found = false;
    for (k, v) in req.headers.iter_mut() {
        if k.eq_ignore_ascii_case(name) {
            f(v);
            found = true;
        }
    }
    assert!(found, "no {name} header");
}

fn flip_char(s: &mut String, at: usize) {
    let mut b = std::mem::take(s).into_bytes();
    b[at] = if b[at] == b'A' { b'B' } else { b'A' };
    *s = String::from_utf8(b).unwrap();
}

#[test]
fn botocore_signed_requests_verify_across_services_and_shapes() {
    let ring = SessionKeyring::generate().unwrap();
    let now = OffsetDateTime::now_utc();
    let creds = mint(&ring, now);
    let cases = [
        // S3 (single-encoded path): spaces and unicode in path and query;
        // over https botocore sends UNSIGNED-PAYLOAD.
        json!({"method": "GET", "url": "https://art.s3.eu-west-1.amazonaws.com/builds/a%20b/%C3%A9t%C3%A9.tar?versionId=3&list-type=2&prefix=caf%C3%A9%20x", "service": "s3", "s3": true}),
        json!({"method": "PUT", "url": "https://art.s3.eu-west-1.amazonaws.com/builds/1.tar", "body": "payload bytes", "service": "s3", "s3": true}),
        // Over plain http botocore signs the payload hash.
        json!({"method": "PUT", "url": "http://art.s3.eu-west-1.amazonaws.com/builds/na%C3%AFve%20file.tar", "body": "payload bytes", "service": "s3", "s3": true}),
        // STS: a form POST and a query GET.
        json!({"method": "POST", "url": "https://sts.eu-west-1.amazonaws.com/", "body": "Action=GetCallerIdentity&Version=2011-06-15", "headers": {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}, "service": "sts"}),
        json!({"method": "GET", "url": "https://sts.eu-west-1.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15", "service": "sts"}),
        // API Gateway: double-encoded path with spaces, unicode, dot
        // segments and repeated slashes; repeated and empty parameters.
        json!({"method": "GET", "url": "https://api.example.com/prod/items/a%20b/./caf%C3%A9//%E2%82%AC?z=1&a=%2F&a=0&empty=&u=%C3%BC", "service": "execute-api"}),
        json!({"method": "POST", "url": "https://api.example.com/prod/orders/%C3%A9l%C3%A8ve%20x", "body": "{\"id\": 1, \"name\": \"\u{e9}\"}", "headers": {"Content-Type": "application/json", "X-Custom": "  spaced   value "}, "service": "execute-api"}),
    ];
    for mut spec in cases {
        spec["region"] = json!("eu-west-1");
        let service = spec["service"].as_str().unwrap().to_string();
        let s3 = spec["s3"].as_bool().unwrap_or(false);
        let signed = botocore(&creds, spec.clone());
        let req = to_signed_request(&signed);
        let caller = verify_request(&ring, &req, &opts(&service, s3), now)
            .unwrap_or_else(|e| panic!("{spec}: {e}"));
        assert_eq!(caller.claims.spiffe_id, "spiffe://td.test/ci/app");
        assert_eq!(caller.claims.access_key_id, creds.access_key_id);
        assert_eq!(caller.service, service);
        assert_eq!(caller.region, "eu-west-1");

        // The same request as an `http` server would hand it over.
        let mut b = http::Request::builder()
            .method(signed["method"].as_str().unwrap())
            .uri(signed["url"].as_str().unwrap());
        for p in signed["headers"].as_array().unwrap() {
            b = b.header(p[0].as_str().unwrap(), p[1].as_str().unwrap());
        }
        let http_req = b
            .body(signed["body"].as_str().unwrap().as_bytes().to_vec())
            .unwrap();
        let from_http = SignedRequest::from_http(&http_req).unwrap();
        verify_request(&ring, &from_http, &opts(&service, s3), now)
            .unwrap_or_else(|e| panic!("from_http {spec}: {e}"));
    }
}

#[test]
fn tampering_in_any_part_is_caught_with_its_reason() {
    let ring = SessionKeyring::generate().unwrap();
    let now = OffsetDateTime::now_utc();
    let creds = mint(&ring, now);
    let spec = json!({"method": "POST", "url": "https://api.example.com/prod/orders?x=1", "body": "{\"amount\": 100}", "headers": {"X-Order": "42"}, "region": "eu-west-1", "service": "execute-api"});
    let good = sign(&creds, spec);
    let o = opts("execute-api", false);
    verify_request(&ring, &good, &o, now).unwrap();
    let err = |r: &SignedRequest| verify_request(&ring, r, &o, now).unwrap_err();

    // One byte of the body (no x-amz-content-sha256: the hash is signed).
    let mut r = good.clone();
    r.body[12] ^= 1;
    assert_eq!(err(&r), CredsError::SignatureMismatch);
    // One byte of a signed header.
    let mut r = good.clone();
    set_header(&mut r, "x-order", |v| *v = "43".into());
    assert_eq!(err(&r), CredsError::SignatureMismatch);
    // Query and path.
    let mut r = good.clone();
    r.query = "x=2".into();
    assert_eq!(err(&r), CredsError::SignatureMismatch);
    let mut r = good.clone();
    r.path = "/prod/refunds".into();
    assert_eq!(err(&r), CredsError::SignatureMismatch);
    let mut r = good.clone();
    r.method = "PUT".into();
    assert_eq!(err(&r), CredsError::SignatureMismatch);
    // One hex digit of the signature.
    let mut r = good.clone();
    set_header(&mut r, "authorization", |v| {
        let last = v.pop().unwrap();
        v.push(if last == '0' { '1' } else { '0' });
    });
    assert_eq!(err(&r), CredsError::SignatureMismatch);
    // One byte of the session token: the AEAD tag fails.
    let mut r = good.clone();
    set_header(&mut r, "x-amz-security-token", |v| flip_char(v, 40));
    assert_eq!(err(&r), CredsError::TokenInvalid);
    // A token past the size cap is refused before decoding.
    let mut r = good.clone();
    set_header(&mut r, "x-amz-security-token", |v| {
        *v = "A".repeat(MAX_TOKEN_CHARS + 4)
    });
    assert_eq!(err(&r), CredsError::TokenTooLarge);
    // The signed date moved by a second.
    let mut r = good.clone();
    set_header(&mut r, "x-amz-date", |v| {
        let z = v.pop().unwrap();
        let s = v.pop().unwrap();
        v.push(if s == '0' { '1' } else { '0' });
        v.push(z);
    });
    assert_eq!(err(&r), CredsError::SignatureMismatch);
    // Wrong region or service for this verifier.
    let mut other_region = o.clone();
    other_region.region = Some("us-east-1".into());
    assert_eq!(
        verify_request(&ring, &good, &other_region, now).unwrap_err(),
        CredsError::RegionNotAllowed("eu-west-1".into())
    );
    assert_eq!(
        verify_request(&ring, &good, &opts("s3", false), now).unwrap_err(),
        CredsError::ServiceNotAllowed("execute-api".into())
    );

    // S3 over http signs the payload hash as a header: a changed body is
    // caught by the hash before the signature.
    let s3 = sign(
        &creds,
        json!({"method": "PUT", "url": "http://art.s3.eu-west-1.amazonaws.com/k", "body": "payload", "region": "eu-west-1", "service": "s3", "s3": true}),
    );
    let s3o = opts("s3", true);
    verify_request(&ring, &s3, &s3o, now).unwrap();
    let mut r = s3.clone();
    r.body[0] ^= 1;
    assert_eq!(
        verify_request(&ring, &r, &s3o, now).unwrap_err(),
        CredsError::PayloadHashMismatch
    );
    // The payload-hash header is itself signed.
    let mut r = s3.clone();
    set_header(&mut r, "x-amz-content-sha256", |v| {
        *v = "UNSIGNED-PAYLOAD".into()
    });
    assert_eq!(
        verify_request(&ring, &r, &s3o, now).unwrap_err(),
        CredsError::SignatureMismatch
    );
}

#[test]
fn expiry_skew_foreign_key_pairs_and_retired_keys_fail() {
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
    // Clock skew beyond 5 minutes, both ways; within it, accepted.
    for minutes in [-10, 10] {
        assert_eq!(
            verify_request(&ring, &req, &o, now + time::Duration::minutes(minutes)).unwrap_err(),
            CredsError::ClockSkew,
            "{minutes} min"
        );
    }
    verify_request(&ring, &req, &o, now + time::Duration::minutes(4)).unwrap();
    let mut tight = o.clone();
    tight.max_skew = Duration::from_secs(60);
    assert_eq!(
        verify_request(&ring, &req, &tight, now + time::Duration::minutes(2)).unwrap_err(),
        CredsError::ClockSkew
    );

    // Another key pair's session token spliced into this request: the AAD
    // (access key id) does not match.
    let other = mint(&ring, now);
    let mut spliced = req.clone();
    set_header(&mut spliced, "x-amz-security-token", |v| {
        *v = other.session_token.clone()
    });
    assert_eq!(
        verify_request(&ring, &spliced, &o, now).unwrap_err(),
        CredsError::TokenInvalid
    );
    // This key pair's token with the other access key id in the credential.
    let mut rebound = req.clone();
    set_header(&mut rebound, "authorization", |v| {
        *v = v.replace(&creds.access_key_id, &other.access_key_id)
    });
    assert_eq!(
        verify_request(&ring, &rebound, &o, now).unwrap_err(),
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
    // After a rotation old credentials keep working; after the old key is
    // retired they stop.
    let mut ring = ring;
    let old = ring.active_id().to_string();
    ring.rotate().unwrap();
    verify_request(&ring, &req, &o, now).unwrap();
    let fresh = mint(&ring, now);
    ring.retire(&old).unwrap();
    assert_eq!(
        verify_request(&ring, &req, &o, now).unwrap_err(),
        CredsError::UnknownKey
    );
    verify_request(&ring, &sign(&fresh, spec), &o, now).unwrap();
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
    caller
        .authorize("S3:putobject", "arn:aws:s3:::art/deep/k")
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
    assert_eq!(
        caller
            .authorize("s3:GetObject", "arn:aws:s3:::art")
            .unwrap_err(),
        CredsError::ScopeDenied
    );
}

#[test]
fn presigned_urls_verify_until_they_expire() {
    let ring = SessionKeyring::generate().unwrap();
    let now = OffsetDateTime::now_utc();
    let creds = mint(&ring, now);
    let cases = [
        (
            json!({"method": "GET", "url": "https://art.s3.eu-west-1.amazonaws.com/builds/a%20b/%C3%A9.tar?versionId=2", "region": "eu-west-1", "service": "s3", "s3": true, "presign": 600}),
            opts("s3", true),
        ),
        // Non-S3 presigned URLs (SigV4QueryAuth) sign the body hash and the
        // double-encoded path: the STS GetCallerIdentity URL used for
        // identity proofs.
        (
            json!({"method": "GET", "url": "https://sts.eu-west-1.amazonaws.com/?Action=GetCallerIdentity&Version=2011-06-15", "region": "eu-west-1", "service": "sts", "presign": 600}),
            opts("sts", false),
        ),
    ];
    for (spec, o) in cases {
        let req = sign(&creds, spec.clone());
        assert!(req.query.contains("X-Amz-Signature"), "{}", req.query);
        assert!(
            !req.headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        );
        verify_request(&ring, &req, &o, now).unwrap_or_else(|e| panic!("{spec}: {e}"));
        verify_request(&ring, &req, &o, now + time::Duration::minutes(9)).unwrap();
        assert_eq!(
            verify_request(&ring, &req, &o, now + time::Duration::minutes(11)).unwrap_err(),
            CredsError::PresignedUrlExpired
        );
        assert_eq!(
            verify_request(&ring, &req, &o, now - time::Duration::minutes(10)).unwrap_err(),
            CredsError::ClockSkew
        );
        let mut r = req.clone();
        r.path = "/builds/2.tar".into();
        assert_eq!(
            verify_request(&ring, &r, &o, now).unwrap_err(),
            CredsError::SignatureMismatch
        );
        // Stretching the lifetime breaks the signature.
        let mut r = req.clone();
        r.query = r.query.replace("X-Amz-Expires=600", "X-Amz-Expires=6000");
        assert_eq!(
            verify_request(&ring, &r, &o, now).unwrap_err(),
            CredsError::SignatureMismatch
        );
        // Another key pair's token in the URL.
        let other = mint(&ring, now);
        let enc = |t: &str| {
            t.replace('+', "%2B")
                .replace('/', "%2F")
                .replace('=', "%3D")
        };
        let mut r = req.clone();
        r.query = r
            .query
            .replace(&enc(&creds.session_token), &enc(&other.session_token));
        assert_ne!(r.query, req.query);
        assert_eq!(
            verify_request(&ring, &r, &o, now).unwrap_err(),
            CredsError::TokenInvalid
        );
        // No token at all.
        let mut r = req.clone();
        r.query = r
            .query
            .split('&')
            .filter(|p| !p.starts_with("X-Amz-Security-Token="))
            .collect::<Vec<_>>()
            .join("&");
        assert_eq!(
            verify_request(&ring, &r, &o, now).unwrap_err(),
            CredsError::SecurityTokenMissing
        );
    }
}
