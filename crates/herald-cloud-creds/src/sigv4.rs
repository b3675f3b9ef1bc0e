//! AWS Signature Version 4 verification of requests signed with Herald
//! session credentials, for downstream services.
//!
//! Checks, in order: the `Authorization` header (or presigned query)
//! parses; `host` and `x-amz-date` are signed; the session token opens for
//! the access key id (so it was minted by Herald, for exactly this key
//! pair); the credential has not expired; the request time is within the
//! clock-skew bound; the credential scope's date, region and service match;
//! the body matches `x-amz-content-sha256` when present; and the signature,
//! recomputed from the canonical request, matches in constant time. Then
//! [`VerifiedCaller::authorize`] checks an action and resource against the
//! scope sealed in the token.

use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::hmac;
use time::OffsetDateTime;

use crate::CredsError;
use crate::session::{SessionClaims, SessionKeyring};

/// The only algorithm.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Payload marker for unsigned bodies (S3, presigned URLs).
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";

/// A request as received.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    /// HTTP method.
    pub method: String,
    /// The path exactly as sent (still percent-encoded).
    pub path: String,
    /// The raw query string, without `?`.
    pub query: String,
    /// Headers as received (any case, repeated names allowed).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

/// What the verifier accepts.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Required region, if any.
    pub region: Option<String>,
    /// Required service, if any.
    pub service: Option<String>,
    /// Largest difference between the request time and now.
    pub max_skew: Duration,
    /// S3 signs the path as sent; every other service encodes it once more.
    pub single_encode_path: bool,
}

impl Default for VerifyOptions {
    fn default() -> Self {
        Self {
            region: None,
            service: None,
            max_skew: Duration::from_secs(300),
            single_encode_path: false,
        }
    }
}

/// A caller whose request verified.
#[derive(Debug, Clone)]
pub struct VerifiedCaller {
    /// What the session token says.
    pub claims: SessionClaims,
    /// The region signed for.
    pub region: String,
    /// The service signed for.
    pub service: String,
}

impl VerifiedCaller {
    /// Whether `action` on `resource` is inside the credential's scope.
    pub fn authorize(&self, action: &str, resource: &str) -> Result<(), CredsError> {
        if self.claims.scope.allows(action, resource) {
            Ok(())
        } else {
            Err(CredsError::ScopeDenied)
        }
    }
}

struct Auth {
    access_key_id: String,
    date: String,
    region: String,
    service: String,
    signed_headers: Vec<String>,
    signature: String,
    presigned: bool,
    expires: Option<u64>,
}

fn header<'a>(req: &'a SignedRequest, name: &str) -> Option<&'a str> {
    req.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

fn parse_credential(cred: &str) -> Result<(String, String, String, String), CredsError> {
    let parts: Vec<&str> = cred.split('/').collect();
    match parts[..] {
        [akid, date, region, service, "aws4_request"]
            if !akid.is_empty() && date.len() == 8 && !region.is_empty() && !service.is_empty() =>
        {
            Ok((akid.into(), date.into(), region.into(), service.into()))
        }
        _ => Err(CredsError::AuthorizationMalformed(
            "bad Credential scope".into(),
        )),
    }
}

fn parse_header_auth(value: &str) -> Result<Auth, CredsError> {
    let bad = |m: &str| CredsError::AuthorizationMalformed(m.into());
    let rest = value
        .strip_prefix(ALGORITHM)
        .ok_or_else(|| bad("not AWS4-HMAC-SHA256"))?
        .trim_start();
    let (mut cred, mut signed, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| bad("malformed component"))?;
        match k {
            "Credential" => cred = Some(v),
            "SignedHeaders" => signed = Some(v),
            "Signature" => sig = Some(v),
            _ => return Err(bad("unknown component")),
        }
    }
    let (akid, date, region, service) =
        parse_credential(cred.ok_or_else(|| bad("no Credential"))?)?;
    Ok(Auth {
        access_key_id: akid,
        date,
        region,
        service,
        signed_headers: signed
            .ok_or_else(|| bad("no SignedHeaders"))?
            .split(';')
            .map(str::to_string)
            .collect(),
        signature: sig.ok_or_else(|| bad("no Signature"))?.to_string(),
        presigned: false,
        expires: None,
    })
}

/// Percent-decodes (no `+` → space: SigV4 query strings encode spaces as `%20`).
fn decode(s: &str) -> Result<Vec<u8>, CredsError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| CredsError::AuthorizationMalformed("bad percent-encoding".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// AWS URI encoding: everything but `A-Za-z0-9-_.~` (and `/` when asked).
fn encode(bytes: &[u8], keep_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn query_pairs(query: &str) -> Result<Vec<(String, String)>, CredsError> {
    let mut pairs = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let k = String::from_utf8(decode(k)?)
            .map_err(|_| CredsError::AuthorizationMalformed("query is not UTF-8".into()))?;
        let v = String::from_utf8(decode(v)?)
            .map_err(|_| CredsError::AuthorizationMalformed("query is not UTF-8".into()))?;
        pairs.push((k, v));
    }
    Ok(pairs)
}

fn parse_query_auth(req: &SignedRequest) -> Result<Option<Auth>, CredsError> {
    let pairs = query_pairs(&req.query)?;
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(alg) = get("X-Amz-Algorithm") else {
        return Ok(None);
    };
    let bad = |m: &str| CredsError::AuthorizationMalformed(m.into());
    if alg != ALGORITHM {
        return Err(bad("not AWS4-HMAC-SHA256"));
    }
    let (akid, date, region, service) =
        parse_credential(&get("X-Amz-Credential").ok_or_else(|| bad("no X-Amz-Credential"))?)?;
    let expires = get("X-Amz-Expires")
        .ok_or_else(|| bad("no X-Amz-Expires"))?
        .parse::<u64>()
        .map_err(|_| bad("X-Amz-Expires is not a number"))?;
    if expires == 0 || expires > 7 * 24 * 3600 {
        return Err(bad("X-Amz-Expires out of range"));
    }
    Ok(Some(Auth {
        access_key_id: akid,
        date,
        region,
        service,
        signed_headers: get("X-Amz-SignedHeaders")
            .ok_or_else(|| bad("no X-Amz-SignedHeaders"))?
            .split(';')
            .map(str::to_string)
            .collect(),
        signature: get("X-Amz-Signature").ok_or_else(|| bad("no X-Amz-Signature"))?,
        presigned: true,
        expires: Some(expires),
    }))
}

/// RFC 3986 remove_dot_segments over an encoded path.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut joined = out.join("/");
    if !joined.starts_with('/') {
        joined.insert(0, '/');
    }
    if (path.ends_with("/.") || path.ends_with("/..")) && !joined.ends_with('/') {
        joined.push('/');
    }
    joined
}

/// The canonical request (exposed for tests against published vectors).
pub fn canonical_request(
    req: &SignedRequest,
    signed_headers: &[String],
    single_encode_path: bool,
    payload_hash: &str,
    exclude_query: Option<&str>,
) -> Result<String, CredsError> {
    let path = if req.path.is_empty() {
        "/"
    } else {
        req.path.as_str()
    };
    let canonical_uri = if single_encode_path {
        path.to_string()
    } else {
        // Encoded once more, after dot-segment removal, as every AWS
        // service but S3 expects (and botocore does).
        encode(remove_dot_segments(path).as_bytes(), true)
    };
    let mut pairs: Vec<(String, String)> = query_pairs(&req.query)?
        .into_iter()
        .filter(|(k, _)| Some(k.as_str()) != exclude_query)
        .map(|(k, v)| (encode(k.as_bytes(), false), encode(v.as_bytes(), false)))
        .collect();
    pairs.sort();
    let canonical_query = pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&");
    let mut canonical_headers = String::new();
    for name in signed_headers {
        let values: Vec<String> = req
            .headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect();
        if values.is_empty() {
            return Err(CredsError::MissingHeader(name.clone()));
        }
        canonical_headers.push_str(name);
        canonical_headers.push(':');
        canonical_headers.push_str(&values.join(","));
        canonical_headers.push('\n');
    }
    Ok(format!(
        "{}\n{canonical_uri}\n{canonical_query}\n{canonical_headers}\n{}\n{payload_hash}",
        req.method.to_ascii_uppercase(),
        signed_headers.join(";")
    ))
}

/// The signature over `string_to_sign` (exposed for tests against published vectors).
pub fn signature(
    secret: &str,
    date: &str,
    region: &str,
    service: &str,
    string_to_sign: &str,
) -> String {
    let mac = |key: &[u8], data: &[u8]| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
            .as_ref()
            .to_vec()
    };
    let k_date = mac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = mac(&k_date, region.as_bytes());
    let k_service = mac(&k_region, service.as_bytes());
    let k_signing = mac(&k_service, b"aws4_request");
    hex::encode(mac(&k_signing, string_to_sign.as_bytes()))
}

/// The string to sign for a canonical request.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex::encode(digest(&SHA256, canonical.as_bytes()))
    )
}

fn parse_amz_date(s: &str) -> Result<OffsetDateTime, CredsError> {
    let bad = || CredsError::AuthorizationMalformed("x-amz-date is not YYYYMMDDTHHMMSSZ".into());
    if s.len() != 16 || &s[8..9] != "T" || !s.ends_with('Z') {
        return Err(bad());
    }
    let n =
        |r: std::ops::Range<usize>| s.get(r).and_then(|v| v.parse::<u32>().ok()).ok_or_else(bad);
    let month = time::Month::try_from(n(4..6)? as u8).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(n(0..4)? as i32, month, n(6..8)? as u8)
        .map_err(|_| bad())?;
    let t = time::Time::from_hms(n(9..11)? as u8, n(11..13)? as u8, n(13..15)? as u8)
        .map_err(|_| bad())?;
    Ok(date.with_time(t).assume_utc())
}

/// Verifies a request signed with Herald session credentials.
pub fn verify_request(
    keyring: &SessionKeyring,
    req: &SignedRequest,
    opts: &VerifyOptions,
    now: OffsetDateTime,
) -> Result<VerifiedCaller, CredsError> {
    let auth = match header(req, "authorization") {
        Some(h) => parse_header_auth(h)?,
        None => parse_query_auth(req)?.ok_or(CredsError::MissingHeader("authorization".into()))?,
    };
    for required in ["host"] {
        if !auth.signed_headers.iter().any(|h| h == required) {
            return Err(CredsError::HeaderNotSigned(required.into()));
        }
    }
    let query = if auth.presigned {
        query_pairs(&req.query)?
    } else {
        Vec::new()
    };
    let qget = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let amz_date = if auth.presigned {
        qget("X-Amz-Date").ok_or(CredsError::MissingHeader("X-Amz-Date".into()))?
    } else {
        if !auth.signed_headers.iter().any(|h| h == "x-amz-date") {
            return Err(CredsError::HeaderNotSigned("x-amz-date".into()));
        }
        header(req, "x-amz-date")
            .ok_or(CredsError::MissingHeader("x-amz-date".into()))?
            .to_string()
    };
    let token = if auth.presigned {
        qget("X-Amz-Security-Token")
    } else {
        if header(req, "x-amz-security-token").is_some()
            && !auth
                .signed_headers
                .iter()
                .any(|h| h == "x-amz-security-token")
        {
            // Signed or not, the token is what binds the key pair; but an
            // unsigned one could be swapped in transit, so insist.
            return Err(CredsError::HeaderNotSigned("x-amz-security-token".into()));
        }
        header(req, "x-amz-security-token").map(str::to_string)
    }
    .ok_or(CredsError::MissingHeader("x-amz-security-token".into()))?;

    let claims = keyring.open(&auth.access_key_id, &token, now)?;

    let at = parse_amz_date(&amz_date)?;
    if amz_date[..8] != auth.date {
        return Err(CredsError::ScopeMismatch(
            "credential date differs from x-amz-date".into(),
        ));
    }
    let skew = time::Duration::try_from(opts.max_skew).unwrap_or(time::Duration::minutes(5));
    match auth.expires {
        Some(expires) => {
            if now < at - skew || now > at + time::Duration::seconds(expires as i64) {
                return Err(CredsError::ClockSkew);
            }
        }
        None => {
            if (now - at).abs() > skew {
                return Err(CredsError::ClockSkew);
            }
        }
    }
    if opts.region.as_ref().is_some_and(|r| *r != auth.region) {
        return Err(CredsError::ScopeMismatch(format!(
            "region {} not accepted",
            auth.region
        )));
    }
    if opts.service.as_ref().is_some_and(|s| *s != auth.service) {
        return Err(CredsError::ScopeMismatch(format!(
            "service {} not accepted",
            auth.service
        )));
    }

    let body_hash = hex::encode(digest(&SHA256, &req.body));
    let payload_hash = if auth.presigned {
        UNSIGNED_PAYLOAD.to_string()
    } else {
        match header(req, "x-amz-content-sha256") {
            Some(UNSIGNED_PAYLOAD) => UNSIGNED_PAYLOAD.to_string(),
            Some(h) => {
                if !h.eq_ignore_ascii_case(&body_hash) {
                    return Err(CredsError::PayloadHashMismatch);
                }
                h.to_string()
            }
            None => body_hash,
        }
    };
    let canonical = canonical_request(
        req,
        &auth.signed_headers,
        opts.single_encode_path,
        &payload_hash,
        auth.presigned.then_some("X-Amz-Signature"),
    )?;
    let scope = format!(
        "{}/{}/{}/aws4_request",
        auth.date, auth.region, auth.service
    );
    let sts = string_to_sign(&amz_date, &scope, &canonical);
    let expected = signature(
        claims.secret_access_key(),
        &auth.date,
        &auth.region,
        &auth.service,
        &sts,
    );
    aws_lc_rs::constant_time::verify_slices_are_equal(
        expected.as_bytes(),
        auth.signature.to_ascii_lowercase().as_bytes(),
    )
    .map_err(|_| CredsError::SignatureMismatch)?;
    Ok(VerifiedCaller {
        claims,
        region: auth.region,
        service: auth.service,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's published SigV4 test suite, `get-vanilla`.
    #[test]
    fn matches_the_published_get_vanilla_vector() {
        let req = SignedRequest {
            method: "GET".into(),
            path: "/".into(),
            query: String::new(),
            headers: vec![
                ("Host".into(), "example.amazonaws.com".into()),
                ("X-Amz-Date".into(), "20150830T123600Z".into()),
            ],
            body: Vec::new(),
        };
        let signed = vec!["host".to_string(), "x-amz-date".to_string()];
        let empty = hex::encode(digest(&SHA256, b""));
        let canonical = canonical_request(&req, &signed, false, &empty, None).unwrap();
        assert_eq!(
            canonical,
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let sts = string_to_sign(
            "20150830T123600Z",
            "20150830/us-east-1/service/aws4_request",
            &canonical,
        );
        let sig = signature(
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "20150830",
            "us-east-1",
            "service",
            &sts,
        );
        assert_eq!(
            sig,
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    /// `get-vanilla-query-order-key-case`: parameters sorted by encoded name.
    #[test]
    fn matches_the_published_query_order_vector() {
        let req = SignedRequest {
            method: "GET".into(),
            path: "/".into(),
            query: "Param2=value2&Param1=value1".into(),
            headers: vec![
                ("Host".into(), "example.amazonaws.com".into()),
                ("X-Amz-Date".into(), "20150830T123600Z".into()),
            ],
            body: Vec::new(),
        };
        let signed = vec!["host".to_string(), "x-amz-date".to_string()];
        let empty = hex::encode(digest(&SHA256, b""));
        let canonical = canonical_request(&req, &signed, false, &empty, None).unwrap();
        let sts = string_to_sign(
            "20150830T123600Z",
            "20150830/us-east-1/service/aws4_request",
            &canonical,
        );
        let sig = signature(
            "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
            "20150830",
            "us-east-1",
            "service",
            &sts,
        );
        assert_eq!(
            sig,
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500"
        );
    }

    #[test]
    fn dot_segments_and_encoding() {
        assert_eq!(remove_dot_segments("/a/./b/../c"), "/a/c");
        assert_eq!(remove_dot_segments("/"), "/");
        assert_eq!(encode(b"/a b/%2F", true), "/a%20b/%252F");
        assert_eq!(encode("é".as_bytes(), false), "%C3%A9");
    }
}
