//! AWS SigV4 canonicalisation and verification of requests signed with
//! Herald session credentials.

use std::sync::OnceLock;

use herald_cloud_creds::sigv4::{
    SignedRequest, VerifyOptions, canonical_query, canonical_request, sign_request, verify_request,
};
use herald_cloud_creds::{CredsError, MintRequest, SessionCredentials, SessionKeyring};
use herald_core::ScopePolicy;
use time::OffsetDateTime;

fn now() -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(crate::jwt::NOW).expect("a valid time")
}

fn keyring() -> &'static (SessionKeyring, SessionCredentials) {
    static K: OnceLock<(SessionKeyring, SessionCredentials)> = OnceLock::new();
    K.get_or_init(|| {
        let ring = SessionKeyring::generate().expect("a keyring");
        let creds = ring
            .mint(&MintRequest {
                spiffe_id: "spiffe://example.org/ci/fuzz".into(),
                role_arn: "arn:aws:iam::123456789012:role/fuzz".into(),
                session_name: "fuzz".into(),
                // A sealed scope must reopen: an empty one does not.
                scope: ScopePolicy::from_json_str(
                    r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:GetObject"],"Resource":["*"]}]}"#,
                )
                .expect("a scope"),
                policy: "fuzz".into(),
                serial: "00".into(),
                issued_at: now(),
                expires_at: now() + time::Duration::hours(1),
            })
            .expect("session credentials");
        (ring, creds)
    })
}

/// The request an HTTP server would hand a downstream service, from the
/// text form `METHOD target\nname: value\n...\n\nbody` (through the `http`
/// crate, as hyper and axum deliver it).
pub fn request(data: &[u8]) -> Option<SignedRequest> {
    let text_end = data
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or(data.len());
    let head = std::str::from_utf8(&data[..text_end]).ok()?;
    let body = data.get(text_end + 2..).unwrap_or_default().to_vec();
    let mut lines = head.split('\n');
    let (method, target) = lines.next()?.split_once(' ')?;
    let mut b = http::Request::builder().method(method).uri(target);
    for line in lines {
        let (k, v) = line.split_once(':')?;
        b = b.header(k.trim(), v.trim_start());
    }
    SignedRequest::from_http(&b.body(body).ok()?).ok()
}

/// `rest` is a request in [`request`]'s text form; the mode byte picks
/// the service (S3's single path encoding, or STS's normalised one).
/// Invariants: an unsigned or forged request never verifies, and every
/// refusal has a stable code; the canonical query string is a fixed point
/// of canonicalisation; a request signed with the credentials (as an SDK
/// signs it) verifies.
pub fn sigv4(data: &[u8]) {
    let Some((mode, rest)) = crate::mode(data, 2) else {
        return;
    };
    let Some(mut req) = request(rest) else {
        return;
    };
    let s3 = mode == 0;
    let (ring, creds) = keyring();
    let opts = VerifyOptions {
        single_encode_path: s3,
        ..VerifyOptions::default()
    };
    match verify_request(ring, &req, &opts, now()) {
        Ok(_) => panic!("a request not signed with the session secret verified"),
        Err(e) => assert_ne!(e.code(), "internal", "{e}"),
    }
    if let Ok(q) = canonical_query(&req.query, None) {
        assert_eq!(canonical_query(&q, None).as_deref(), Ok(q.as_str()));
    }
    let mut names: Vec<String> = req
        .headers
        .iter()
        .map(|(k, _)| k.to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    if let Ok(c) = canonical_request(&req, &names, s3, "UNSIGNED-PAYLOAD", None) {
        // S3 signs the path as sent, so only an origin-form target (not
        // `*`) starts its canonical URI with `/` there.
        let slash = if s3 && !req.path.is_empty() && !req.path.starts_with('/') {
            ""
        } else {
            "/"
        };
        assert!(c.starts_with(&format!("{}\n{slash}", req.method.to_ascii_uppercase())));
        assert!(c.ends_with("\nUNSIGNED-PAYLOAD"));
    }

    // Signed as an SDK signs it, it verifies — unless its query already
    // carries presigned parameters (then it holds two signatures).
    if !req
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("host"))
    {
        req.headers
            .push(("host".into(), "example.amazonaws.com".into()));
    }
    let service = if s3 { "s3" } else { "sts" };
    if sign_request(creds, &mut req, "us-east-1", service, s3, now()).is_ok() {
        // Presigned parameters may hide behind escapes (`X%2DAmz-...`).
        let presigned = req.query.to_ascii_lowercase().contains("amz") || req.query.contains('%');
        match verify_request(ring, &req, &opts, now()) {
            Ok(caller) => {
                crate::accept();
                assert_eq!(caller.service, service);
                assert_eq!(caller.region, "us-east-1");
            }
            Err(CredsError::AuthorizationMalformed(_)) if presigned => {}
            Err(e) => panic!("a request signed with the credentials was refused: {e} ({req:?})"),
        }
    }
}
