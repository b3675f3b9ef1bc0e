//! AWS Signature Version 4 verification of requests signed with Herald
//! session credentials, for downstream services.
//!
//! [`verify_request`] checks, in order: the `Authorization` header (or the
//! presigned query parameters) parses, and only one of the two is present;
//! `host` and `x-amz-date` are signed; a session token is present; the
//! session token opens for the access key id (so Herald minted it, for
//! exactly this key pair); the credential has not expired; the request time
//! is within the clock-skew bound (a presigned URL: within `X-Amz-Expires`);
//! the credential scope's date, region and service match; the body matches
//! `x-amz-content-sha256` when present; and the signature, recomputed from
//! the canonical request with the secret sealed in the token, matches in
//! constant time. Then [`VerifiedCaller::authorize`] checks an action and
//! resource against the scope sealed in the token.
//!
//! Canonicalization follows the SigV4 specification (and botocore, the
//! reference signer the tests run against): the path is normalized (dot
//! segments and repeated slashes removed) and URI-encoded once more, except
//! for S3 ([`VerifyOptions::single_encode_path`]), which signs the path as
//! sent; query parameters are decoded, re-encoded with AWS's unreserved set
//! and sorted by name then value; headers are lower-cased, trimmed, with
//! runs of spaces collapsed, repeated headers joined with `,`.

use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::hmac;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::CredsError;
use crate::session::{SessionClaims, SessionCredentials, SessionKeyring};

/// The only algorithm.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Payload marker for unsigned bodies (S3, presigned URLs).
pub const UNSIGNED_PAYLOAD: &str = "UNSIGNED-PAYLOAD";
/// Longest presigned URL lifetime AWS allows (7 days), in seconds.
pub const MAX_PRESIGNED_EXPIRES: u64 = 7 * 24 * 3600;
/// Longest access key id accepted in a credential scope.
const MAX_ACCESS_KEY_ID: usize = 128;

/// A request as received.
#[derive(Clone)]
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

/// Headers and query parameters whose values are not shown by `Debug`.
const REDACTED: [&str; 4] = [
    "authorization",
    "x-amz-security-token",
    "x-amz-signature",
    "x-amz-credential",
];

fn redacted(name: &str) -> bool {
    REDACTED.iter().any(|r| name.eq_ignore_ascii_case(r))
}

impl std::fmt::Debug for SignedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str(),
                    if redacted(k) {
                        "<redacted>"
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        let query: Vec<String> = self
            .query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, _)) if redacted(k) => format!("{k}=<redacted>"),
                _ => p.to_string(),
            })
            .collect();
        f.debug_struct("SignedRequest")
            .field("method", &self.method)
            .field("path", &self.path)
            .field("query", &query.join("&"))
            .field("headers", &headers)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl SignedRequest {
    /// The request as an `http` server (hyper, axum) received it. The path
    /// and query are taken raw from the URI; an HTTP/2 request's authority
    /// becomes the `host` header when there is none. Header values that are
    /// not visible ASCII are refused ([`CredsError::RequestMalformed`]).
    pub fn from_http<B: AsRef<[u8]>>(req: &http::Request<B>) -> Result<Self, CredsError> {
        let mut headers = Vec::with_capacity(req.headers().len() + 1);
        for (name, value) in req.headers() {
            let value = value.to_str().map_err(|_| {
                CredsError::RequestMalformed(format!("header {name} is not visible ASCII"))
            })?;
            headers.push((name.as_str().to_string(), value.to_string()));
        }
        if !req.headers().contains_key(http::header::HOST)
            && let Some(authority) = req.uri().authority()
        {
            headers.push(("host".to_string(), authority.as_str().to_string()));
        }
        Ok(Self {
            method: req.method().as_str().to_string(),
            path: req.uri().path().to_string(),
            query: req.uri().query().unwrap_or("").to_string(),
            headers,
            body: req.body().as_ref().to_vec(),
        })
    }
}

/// What the verifier accepts.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    /// Required region, if any.
    pub region: Option<String>,
    /// Required service, if any.
    pub service: Option<String>,
    /// Largest difference between the request time and now (default 5 min).
    pub max_skew: Duration,
    /// S3 signs the path as sent; every other service normalizes it and
    /// encodes it once more.
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
    /// Whether `action` on `resource` is inside the credential's scope
    /// ([`CredsError::ScopeDenied`] if not).
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

fn malformed(m: &str) -> CredsError {
    CredsError::AuthorizationMalformed(m.into())
}

/// The value of a header that may appear at most once.
fn single_header<'a>(req: &'a SignedRequest, name: &str) -> Result<Option<&'a str>, CredsError> {
    let mut found = req
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str());
    let first = found.next();
    if found.next().is_some() {
        return Err(CredsError::RequestMalformed(format!(
            "{name} appears more than once"
        )));
    }
    Ok(first)
}

fn parse_credential(cred: &str) -> Result<(String, String, String, String), CredsError> {
    let parts: Vec<&str> = cred.split('/').collect();
    let ok = |s: &str| {
        !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    match parts[..] {
        [akid, date, region, service, "aws4_request"]
            if !akid.is_empty()
                && akid.len() <= MAX_ACCESS_KEY_ID
                && akid.bytes().all(|b| b.is_ascii_alphanumeric())
                && date.len() == 8
                && date.bytes().all(|b| b.is_ascii_digit())
                && ok(region)
                && ok(service) =>
        {
            Ok((akid.into(), date.into(), region.into(), service.into()))
        }
        _ => Err(malformed("bad Credential scope")),
    }
}

fn parse_signed_headers(list: &str) -> Result<Vec<String>, CredsError> {
    let names: Vec<String> = list.split(';').map(str::to_string).collect();
    let valid_name = |n: &String| {
        !n.is_empty()
            && n.bytes()
                .all(|b| b.is_ascii_graphic() && !b.is_ascii_uppercase() && b != b':')
    };
    if !names.iter().all(valid_name) {
        return Err(malformed("SignedHeaders must be lower-case names"));
    }
    if !names.windows(2).all(|w| w[0] < w[1]) {
        return Err(malformed("SignedHeaders must be sorted and unique"));
    }
    Ok(names)
}

fn parse_signature(sig: &str) -> Result<String, CredsError> {
    if sig.len() != 64 || !sig.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(malformed("Signature is not 64 hex digits"));
    }
    Ok(sig.to_ascii_lowercase())
}

fn parse_header_auth(value: &str) -> Result<Auth, CredsError> {
    let rest = value
        .strip_prefix(ALGORITHM)
        .filter(|r| r.starts_with(' '))
        .ok_or_else(|| malformed("not AWS4-HMAC-SHA256"))?
        .trim_start();
    let (mut cred, mut signed, mut sig) = (None, None, None);
    for part in rest.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or_else(|| malformed("malformed component"))?;
        let slot = match k {
            "Credential" => &mut cred,
            "SignedHeaders" => &mut signed,
            "Signature" => &mut sig,
            _ => return Err(malformed("unknown component")),
        };
        if slot.replace(v).is_some() {
            return Err(malformed("repeated component"));
        }
    }
    let (akid, date, region, service) =
        parse_credential(cred.ok_or_else(|| malformed("no Credential"))?)?;
    Ok(Auth {
        access_key_id: akid,
        date,
        region,
        service,
        signed_headers: parse_signed_headers(signed.ok_or_else(|| malformed("no SignedHeaders"))?)?,
        signature: parse_signature(sig.ok_or_else(|| malformed("no Signature"))?)?,
        presigned: false,
        expires: None,
    })
}

/// Percent-decodes (no `+` → space: SigV4 encodes spaces as `%20`).
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
                .ok_or_else(|| CredsError::RequestMalformed("bad percent-encoding".into()))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Ok(out)
}

/// AWS URI encoding: everything but `A-Za-z0-9-_.~` (and `/` when asked),
/// upper-case hex.
fn encode(bytes: &[u8], keep_slash: bool) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(bytes.len() * 3);
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push('%');
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 15)] as char);
        }
    }
    out
}

/// The query's parameters, decoded. A raw `+` is refused: decoders disagree
/// on it (literal plus for SigV4, space for HTML forms), so a signature
/// over `%2B` must not also cover a `+` a form decoder reads as a space.
fn query_pairs(query: &str) -> Result<Vec<(String, String)>, CredsError> {
    if query.contains('+') {
        return Err(CredsError::RequestMalformed(
            "raw '+' in the query is ambiguous: send %2B (or %20 for a space)".into(),
        ));
    }
    let utf8 = |b: Vec<u8>| {
        String::from_utf8(b).map_err(|_| CredsError::RequestMalformed("query is not UTF-8".into()))
    };
    let mut pairs = Vec::new();
    for part in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        pairs.push((utf8(decode(k)?)?, utf8(decode(v)?)?));
    }
    Ok(pairs)
}

fn parse_query_auth(pairs: &[(String, String)]) -> Result<Option<Auth>, CredsError> {
    let get = |k: &str| -> Result<Option<&str>, CredsError> {
        let mut found = pairs
            .iter()
            .filter(|(n, _)| n == k)
            .map(|(_, v)| v.as_str());
        let first = found.next();
        if found.next().is_some() {
            return Err(malformed("repeated X-Amz parameter"));
        }
        Ok(first)
    };
    let Some(alg) = get("X-Amz-Algorithm")? else {
        return Ok(None);
    };
    if alg != ALGORITHM {
        return Err(malformed("not AWS4-HMAC-SHA256"));
    }
    // Read later by the verifier: each must appear at most once.
    get("X-Amz-Date")?;
    get("X-Amz-Security-Token")?;
    let (akid, date, region, service) = parse_credential(
        get("X-Amz-Credential")?.ok_or_else(|| malformed("no X-Amz-Credential"))?,
    )?;
    let expires = get("X-Amz-Expires")?
        .ok_or_else(|| malformed("no X-Amz-Expires"))?
        .parse::<u64>()
        .map_err(|_| malformed("X-Amz-Expires is not a number"))?;
    if expires == 0 || expires > MAX_PRESIGNED_EXPIRES {
        return Err(malformed("X-Amz-Expires out of range"));
    }
    Ok(Some(Auth {
        access_key_id: akid,
        date,
        region,
        service,
        signed_headers: parse_signed_headers(
            get("X-Amz-SignedHeaders")?.ok_or_else(|| malformed("no X-Amz-SignedHeaders"))?,
        )?,
        signature: parse_signature(
            get("X-Amz-Signature")?.ok_or_else(|| malformed("no X-Amz-Signature"))?,
        )?,
        presigned: true,
        expires: Some(expires),
    }))
}

/// Dot-segment removal as AWS signers do it (botocore's
/// `remove_dot_segments`): `.` and empty segments dropped, `..` pops, a
/// trailing slash kept when the path had one and anything remains.
fn normalize_path(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut joined = String::with_capacity(path.len() + 1);
    joined.push('/');
    joined.push_str(&out.join("/"));
    if path.ends_with('/') && !out.is_empty() {
        joined.push('/');
    }
    joined
}

/// The canonical URI of a raw request path.
pub fn canonical_uri(path: &str, single_encode_path: bool) -> String {
    if path.is_empty() {
        "/".to_string()
    } else if single_encode_path {
        // S3: the path as sent, already encoded once by the signer.
        path.to_string()
    } else {
        // Every other service: normalized, then encoded once more.
        encode(normalize_path(path).as_bytes(), true)
    }
}

/// The canonical query string: parameters decoded, AWS-encoded, sorted by
/// name then value; `exclude` (presigned `X-Amz-Signature`) left out.
pub fn canonical_query(query: &str, exclude: Option<&str>) -> Result<String, CredsError> {
    let mut pairs: Vec<(String, String)> = query_pairs(query)?
        .into_iter()
        .filter(|(k, _)| Some(k.as_str()) != exclude)
        .map(|(k, v)| (encode(k.as_bytes(), false), encode(v.as_bytes(), false)))
        .collect();
    pairs.sort();
    Ok(pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&"))
}

/// The canonical request (exposed for tests against published vectors).
/// `signed_headers` must be lower-case and sorted; each must be present.
pub fn canonical_request(
    req: &SignedRequest,
    signed_headers: &[String],
    single_encode_path: bool,
    payload_hash: &str,
    exclude_query: Option<&str>,
) -> Result<String, CredsError> {
    let canonical_uri = canonical_uri(&req.path, single_encode_path);
    let canonical_query = canonical_query(&req.query, exclude_query)?;
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

/// The string to sign for a canonical request.
pub fn string_to_sign(amz_date: &str, scope: &str, canonical: &str) -> String {
    format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex::encode(digest(&SHA256, canonical.as_bytes()))
    )
}

/// The signature over `string_to_sign`: HMAC-SHA256 with the signing key
/// derived as kDate → kRegion → kService → kSigning (exposed for tests
/// against published vectors). Intermediate keys are zeroized.
pub fn signature(
    secret: &str,
    date: &str,
    region: &str,
    service: &str,
    string_to_sign: &str,
) -> String {
    let mac = |key: &[u8], data: &[u8]| {
        Zeroizing::new(
            hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data)
                .as_ref()
                .to_vec(),
        )
    };
    let k_secret = Zeroizing::new(format!("AWS4{secret}"));
    let k_date = mac(k_secret.as_bytes(), date.as_bytes());
    let k_region = mac(&k_date, region.as_bytes());
    let k_service = mac(&k_region, service.as_bytes());
    let k_signing = mac(&k_service, b"aws4_request");
    hex::encode(mac(&k_signing, string_to_sign.as_bytes()).as_slice())
}

/// `YYYYMMDDTHHMMSSZ` of `at`.
pub fn amz_date(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    )
}

fn parse_amz_date(s: &str) -> Result<OffsetDateTime, CredsError> {
    let bad = || malformed("x-amz-date is not YYYYMMDDTHHMMSSZ");
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return Err(bad());
    }
    let digits = |r: std::ops::Range<usize>| -> Result<u32, CredsError> {
        let part = b.get(r).ok_or_else(bad)?;
        if !part.iter().all(u8::is_ascii_digit) {
            return Err(bad());
        }
        Ok(part.iter().fold(0u32, |n, d| n * 10 + u32::from(d - b'0')))
    };
    let year = i32::try_from(digits(0..4)?).map_err(|_| bad())?;
    let small = |r| digits(r).and_then(|n| u8::try_from(n).map_err(|_| bad()));
    let month = time::Month::try_from(small(4..6)?).map_err(|_| bad())?;
    let date = time::Date::from_calendar_date(year, month, small(6..8)?).map_err(|_| bad())?;
    let t =
        time::Time::from_hms(small(9..11)?, small(11..13)?, small(13..15)?).map_err(|_| bad())?;
    Ok(date.with_time(t).assume_utc())
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(digest(&SHA256, data))
}

/// Verifies a request signed with Herald session credentials.
///
/// The session token may be signed or not: it is bound to the access key id
/// as AEAD associated data and carries the secret that must have made the
/// signature, so no other token can be swapped in. Botocore and the other
/// AWS SDKs sign it, and a signed one is covered by the signature check.
pub fn verify_request(
    keyring: &SessionKeyring,
    req: &SignedRequest,
    opts: &VerifyOptions,
    now: OffsetDateTime,
) -> Result<VerifiedCaller, CredsError> {
    let query = query_pairs(&req.query)?;
    let header_auth = single_header(req, "authorization")?;
    let query_auth = parse_query_auth(&query)?;
    let auth = match (header_auth, query_auth) {
        (Some(h), None) => parse_header_auth(h)?,
        (None, Some(q)) => q,
        (Some(_), Some(_)) => {
            return Err(malformed(
                "both an Authorization header and presigned parameters",
            ));
        }
        (None, None) => return Err(CredsError::AuthorizationMissing),
    };
    let signed = |name: &str| auth.signed_headers.iter().any(|h| h == name);
    if !signed("host") {
        return Err(CredsError::HeaderNotSigned("host".into()));
    }
    let qget = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let (amz_date, token) = if auth.presigned {
        (
            qget("X-Amz-Date").ok_or_else(|| CredsError::MissingHeader("X-Amz-Date".into()))?,
            qget("X-Amz-Security-Token"),
        )
    } else {
        if !signed("x-amz-date") {
            return Err(CredsError::HeaderNotSigned("x-amz-date".into()));
        }
        (
            single_header(req, "x-amz-date")?
                .ok_or_else(|| CredsError::MissingHeader("x-amz-date".into()))?,
            single_header(req, "x-amz-security-token")?,
        )
    };
    let token = token.ok_or(CredsError::SecurityTokenMissing)?;

    let claims = keyring.open(&auth.access_key_id, token, now)?;

    let at = parse_amz_date(amz_date)?;
    if amz_date.get(..8) != Some(auth.date.as_str()) {
        return Err(CredsError::CredentialDateMismatch);
    }
    let skew = time::Duration::try_from(opts.max_skew).unwrap_or(time::Duration::minutes(5));
    if now < at - skew {
        return Err(CredsError::ClockSkew);
    }
    match auth.expires {
        Some(expires) => {
            let lifetime = time::Duration::seconds(i64::try_from(expires).unwrap_or(i64::MAX));
            if now > at + lifetime {
                return Err(CredsError::PresignedUrlExpired);
            }
        }
        None => {
            if now > at + skew {
                return Err(CredsError::ClockSkew);
            }
        }
    }
    if opts.region.as_ref().is_some_and(|r| *r != auth.region) {
        return Err(CredsError::RegionNotAllowed(auth.region));
    }
    if opts.service.as_ref().is_some_and(|s| *s != auth.service) {
        return Err(CredsError::ServiceNotAllowed(auth.service));
    }

    let payload_hash = match single_header(req, "x-amz-content-sha256")? {
        Some(UNSIGNED_PAYLOAD) => UNSIGNED_PAYLOAD.to_string(),
        Some(h) => {
            if !h.eq_ignore_ascii_case(&sha256_hex(&req.body)) {
                return Err(CredsError::PayloadHashMismatch);
            }
            h.to_string()
        }
        // S3 presigned URLs sign no payload; other services' presigned URLs
        // (botocore's SigV4QueryAuth: STS, RDS, ...) sign the body's hash.
        None if auth.presigned && (opts.single_encode_path || auth.service == "s3") => {
            UNSIGNED_PAYLOAD.to_string()
        }
        None => sha256_hex(&req.body),
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
    let sts = string_to_sign(amz_date, &scope, &canonical);
    let expected = signature(
        claims.secret_access_key(),
        &auth.date,
        &auth.region,
        &auth.service,
        &sts,
    );
    aws_lc_rs::constant_time::verify_slices_are_equal(
        expected.as_bytes(),
        auth.signature.as_bytes(),
    )
    .map_err(|_| CredsError::SignatureMismatch)?;
    Ok(VerifiedCaller {
        claims,
        region: auth.region,
        service: auth.service,
    })
}

/// Signs `req` in place with `creds` (`Authorization` header), as an AWS
/// SDK would: adds `x-amz-date`, `x-amz-security-token` and
/// `x-amz-content-sha256` (the body's hash), and signs every header present.
/// A convenience for tests and Rust clients; verification is tested against
/// botocore, not against this.
pub fn sign_request(
    creds: &SessionCredentials,
    req: &mut SignedRequest,
    region: &str,
    service: &str,
    single_encode_path: bool,
    at: OffsetDateTime,
) -> Result<(), CredsError> {
    const SET: [&str; 4] = [
        "authorization",
        "x-amz-date",
        "x-amz-security-token",
        "x-amz-content-sha256",
    ];
    req.headers
        .retain(|(k, _)| !SET.iter().any(|s| k.eq_ignore_ascii_case(s)));
    if !req
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("host"))
    {
        return Err(CredsError::MissingHeader("host".into()));
    }
    let date = amz_date(at);
    let payload_hash = sha256_hex(&req.body);
    req.headers.push(("X-Amz-Date".into(), date.clone()));
    req.headers
        .push(("X-Amz-Security-Token".into(), creds.session_token.clone()));
    req.headers
        .push(("X-Amz-Content-SHA256".into(), payload_hash.clone()));
    let mut names: Vec<String> = req
        .headers
        .iter()
        .map(|(k, _)| k.to_ascii_lowercase())
        .collect();
    names.sort();
    names.dedup();
    let canonical = canonical_request(req, &names, single_encode_path, &payload_hash, None)?;
    let day = &date[..8];
    let scope = format!("{day}/{region}/{service}/aws4_request");
    let sig = signature(
        &creds.secret_access_key,
        day,
        region,
        service,
        &string_to_sign(&date, &scope, &canonical),
    );
    req.headers.push((
        "Authorization".into(),
        format!(
            "{ALGORITHM} Credential={}/{scope}, SignedHeaders={}, Signature={sig}",
            creds.access_key_id,
            names.join(";")
        ),
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MintRequest;
    use herald_core::ScopePolicy;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const DATE: &str = "20150830T123600Z";
    const SCOPE: &str = "20150830/us-east-1/service/aws4_request";

    fn vector_request(
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> SignedRequest {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let mut h = vec![
            ("Host".to_string(), "example.amazonaws.com".to_string()),
            ("X-Amz-Date".to_string(), DATE.to_string()),
        ];
        h.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        SignedRequest {
            method: method.into(),
            path: path.into(),
            query: query.into(),
            headers: h,
            body: body.as_bytes().to_vec(),
        }
    }

    fn vector_signature(req: &SignedRequest, signed_headers: &str) -> String {
        let signed = parse_signed_headers(signed_headers).unwrap();
        let canonical =
            canonical_request(req, &signed, false, &sha256_hex(&req.body), None).unwrap();
        signature(
            SECRET,
            "20150830",
            "us-east-1",
            "service",
            &string_to_sign(DATE, SCOPE, &canonical),
        )
    }

    /// AWS's published SigV4 test suite (aws-sig-v4-test-suite): request,
    /// signed headers, published signature. Credentials AKIDEXAMPLE, date
    /// 20150830T123600Z, region us-east-1, service `service`.
    #[test]
    fn matches_the_published_test_suite_signatures() {
        // (name, method, target, extra headers, body, signed headers, signature)
        type Vector<'a> = (
            &'a str,
            &'a str,
            &'a str,
            &'a [(&'a str, &'a str)],
            &'a str,
            &'a str,
            &'a str,
        );
        let cases: &[Vector] = &[
            (
                "get-vanilla",
                "GET",
                "/",
                &[],
                "",
                "host;x-amz-date",
                "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
            ),
            (
                "get-unreserved",
                "GET",
                "/-._~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                &[],
                "",
                "host;x-amz-date",
                "07ef7494c76fa4850883e2b006601f940f8a34d404d0cfa977f52a65bbf5f24f",
            ),
            (
                "normalize-path/get-slashes",
                "GET",
                "//example//",
                &[],
                "",
                "host;x-amz-date",
                "9a624bd73a37c9a373b5312afbebe7a714a789de108f0bdfe846570885f57e84",
            ),
            (
                "get-vanilla-query-order-key-case",
                "GET",
                "/?Param2=value2&Param1=value1",
                &[],
                "",
                "host;x-amz-date",
                "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
            ),
            (
                "get-vanilla-query-order-value",
                "GET",
                "/?Param1=value2&Param1=value1",
                &[],
                "",
                "host;x-amz-date",
                "5772eed61e12b33fae39ee5e7012498b51d56abc0abb7c60486157bd471c4694",
            ),
            (
                "get-vanilla-utf8-query",
                "GET",
                "/?\u{1234}=bar",
                &[],
                "",
                "host;x-amz-date",
                "2cdec8eed098649ff3a119c94853b13c643bcf08f8b0a1d91e12c9027818dd04",
            ),
            (
                "get-header-value-order",
                "GET",
                "/",
                &[
                    ("My-Header1", "value4"),
                    ("My-Header1", "value1"),
                    ("My-Header1", "value3"),
                    ("My-Header1", "value2"),
                ],
                "",
                "host;my-header1;x-amz-date",
                "08c7e5a9acfcfeb3ab6b2185e75ce8b1deb5e634ec47601a50643f830c755c01",
            ),
            (
                "get-header-key-duplicate",
                "GET",
                "/",
                &[
                    ("My-Header1", "value2"),
                    ("My-Header1", "value2"),
                    ("My-Header1", "value1"),
                ],
                "",
                "host;my-header1;x-amz-date",
                "c9d5ea9f3f72853aea855b47ea873832890dbdd183b4468f858259531a5138ea",
            ),
            (
                "get-header-value-trim",
                "GET",
                "/",
                &[("My-Header1", " value1"), ("My-Header2", "\"a   b   c\"")],
                "",
                "host;my-header1;my-header2;x-amz-date",
                "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
            ),
            (
                "post-x-www-form-urlencoded",
                "POST",
                "/",
                &[("Content-Type", "application/x-www-form-urlencoded")],
                "Param1=value1",
                "content-type;host;x-amz-date",
                "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
            ),
        ];
        for (name, method, target, headers, body, signed, expected) in cases {
            let req = vector_request(method, target, headers, body);
            assert_eq!(&vector_signature(&req, signed), expected, "{name}");
            // The same vector through the Authorization-header parser.
            let auth = parse_header_auth(&format!(
                "{ALGORITHM} Credential=AKIDEXAMPLE/{SCOPE}, SignedHeaders={signed}, Signature={expected}"
            ))
            .unwrap();
            assert_eq!(auth.signed_headers.join(";"), *signed);
            assert_eq!(auth.signature, *expected);
        }
    }

    #[test]
    fn get_vanilla_canonical_request_is_byte_exact() {
        let req = vector_request("GET", "/", &[], "");
        let signed = parse_signed_headers("host;x-amz-date").unwrap();
        let canonical = canonical_request(&req, &signed, false, &sha256_hex(b""), None).unwrap();
        assert_eq!(
            canonical,
            "GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:20150830T123600Z\n\nhost;x-amz-date\ne3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            string_to_sign(DATE, SCOPE, &canonical),
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63"
        );
    }

    /// Canonical URIs of the published normalize-path and raw-path vectors,
    /// and the double encoding every service but S3 applies.
    #[test]
    fn canonical_uris() {
        for (path, expected) in [
            ("/example space/", "/example%20space/"),
            ("/\u{1234}", "/%E1%88%B4"),
            ("//example//", "/example/"),
            ("//", "/"),
            ("/example/..", "/"),
            ("/example1/example2/../..", "/"),
            ("/./", "/"),
            ("/./example", "/example"),
            ("", "/"),
            ("/a/./b/../c", "/a/c"),
            ("/a%20b/%2F", "/a%2520b/%252F"),
            ("/a/..b/.c", "/a/..b/.c"),
        ] {
            assert_eq!(canonical_uri(path, false), expected, "{path}");
        }
        assert_eq!(canonical_uri("/a%20b//c/./d", true), "/a%20b//c/./d");
        assert_eq!(canonical_uri("", true), "/");
    }

    #[test]
    fn canonical_queries() {
        for (query, expected) in [
            ("Param2=value2&Param1=value1", "Param1=value1&Param2=value2"),
            ("a=10&a=9", "a=10&a=9"),
            ("x=a.b&x=a%2Fb", "x=a%2Fb&x=a.b"),
            ("b&a=1", "a=1&b="),
            ("a=1=2", "a=1%3D2"),
            ("q=a%20b&e=", "e=&q=a%20b"),
            ("k=%7e%41", "k=~A"),
            ("", ""),
        ] {
            assert_eq!(canonical_query(query, None).unwrap(), expected, "{query}");
        }
        assert_eq!(
            canonical_query("X-Amz-Signature=ab&a=1", Some("X-Amz-Signature")).unwrap(),
            "a=1"
        );
        assert_eq!(
            canonical_query("q=a+b", None).unwrap_err().code(),
            "request_malformed"
        );
        assert_eq!(
            canonical_query("q=%zz", None).unwrap_err().code(),
            "request_malformed"
        );
    }

    #[test]
    fn malformed_authorization_is_refused_without_panicking() {
        let ok_sig = "0".repeat(64);
        for value in [
            "AWS4-HMAC-SHA1 Credential=A/20150830/r/s/aws4_request, SignedHeaders=host, Signature=00".to_string(),
            format!("AWS4-HMAC-SHA256Credential=A/20150830/r/s/aws4_request, SignedHeaders=host, Signature={ok_sig}"),
            format!("AWS4-HMAC-SHA256 Credential=A/2015083/r/s/aws4_request, SignedHeaders=host, Signature={ok_sig}"),
            format!("AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws5_request, SignedHeaders=host, Signature={ok_sig}"),
            format!("AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws4_request, SignedHeaders=Host, Signature={ok_sig}"),
            format!("AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws4_request, SignedHeaders=x-amz-date;host, Signature={ok_sig}"),
            format!("AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws4_request, SignedHeaders=host;;x, Signature={ok_sig}"),
            "AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws4_request, SignedHeaders=host, Signature=zz".to_string(),
            format!("AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws4_request, Credential=B/20150830/r/s/aws4_request, SignedHeaders=host, Signature={ok_sig}"),
            format!("AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws4_request, SignedHeaders=host, Signature={ok_sig}, Extra=1"),
            format!("AWS4-HMAC-SHA256 Credential=A/20150830/r/s/aws4_request, Signature={ok_sig}"),
            format!("AWS4-HMAC-SHA256 Credential=A/20150830/\u{e9}/s/aws4_request, SignedHeaders=host, Signature={ok_sig}"),
        ] {
            assert_eq!(
                parse_header_auth(&value).err().map(|e| e.code()),
                Some("authorization_malformed"),
                "{value}"
            );
        }
        for date in [
            "20150830T123600",
            "2015083\u{e9}123600Z",
            "20151330T123600Z",
            "20150830T126600Z",
            "2015-8-30T12360Z",
            "+0150830T123600Z",
        ] {
            assert!(parse_amz_date(date).is_err(), "{date}");
        }
        assert_eq!(
            parse_amz_date(DATE).unwrap(),
            time::macros::datetime!(2015-08-30 12:36:00 UTC)
        );
        assert_eq!(
            amz_date(time::macros::datetime!(2015-08-30 12:36:00 UTC)),
            DATE
        );
    }

    fn ring_and_creds() -> (SessionKeyring, SessionCredentials, OffsetDateTime) {
        let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
        let ring = SessionKeyring::generate().unwrap();
        let creds = ring
            .mint(&MintRequest {
                spiffe_id: "spiffe://td/x".into(),
                role_arn: "arn:aws:iam::1:role/r".into(),
                session_name: "s".into(),
                scope: ScopePolicy::from_json(&serde_json::json!({"Statement": [
                    {"Effect": "Allow", "Action": "execute-api:Invoke", "Resource": "*"}
                ]}))
                .unwrap(),
                policy: "p".into(),
                serial: "01".into(),
                issued_at: now,
                expires_at: now + time::Duration::hours(1),
            })
            .unwrap();
        (ring, creds, now)
    }

    fn request() -> SignedRequest {
        SignedRequest {
            method: "POST".into(),
            path: "/prod/a b".into(),
            query: "x=1&y=%20".into(),
            headers: vec![
                ("Host".into(), "api.example.com".into()),
                ("Content-Type".into(), "application/json".into()),
            ],
            body: b"{}".to_vec(),
        }
    }

    #[test]
    fn rust_signer_round_trip_and_header_rules() {
        let (ring, creds, now) = ring_and_creds();
        let opts = VerifyOptions::default();
        let mut req = request();
        sign_request(&creds, &mut req, "eu-west-1", "execute-api", false, now).unwrap();
        let caller = verify_request(&ring, &req, &opts, now).unwrap();
        assert_eq!(
            (caller.region.as_str(), caller.service.as_str()),
            ("eu-west-1", "execute-api")
        );
        caller.authorize("execute-api:Invoke", "arn:x").unwrap();
        assert_eq!(
            caller.authorize("s3:GetObject", "arn:x").unwrap_err(),
            CredsError::ScopeDenied
        );

        // Debug shows neither the token, the signature nor the credential.
        let shown = format!("{req:?}");
        assert!(!shown.contains(&creds.session_token) && !shown.contains("Signature="));

        // Unsigned request.
        let mut r = req.clone();
        r.headers.retain(|(k, _)| k != "Authorization");
        assert_eq!(
            verify_request(&ring, &r, &opts, now).unwrap_err(),
            CredsError::AuthorizationMissing
        );
        // Repeated security token or date headers are ambiguous.
        for dup in ["X-Amz-Security-Token", "X-Amz-Date", "Authorization"] {
            let mut r = req.clone();
            let v = r.headers.iter().find(|(k, _)| k == dup).unwrap().1.clone();
            r.headers.push((dup.to_ascii_lowercase(), v));
            assert_eq!(
                verify_request(&ring, &r, &opts, now).unwrap_err().code(),
                "request_malformed",
                "{dup}"
            );
        }
        // Header auth and presigned parameters at once.
        let mut r = req.clone();
        r.query.push_str("&X-Amz-Algorithm=AWS4-HMAC-SHA256");
        assert_eq!(
            verify_request(&ring, &r, &opts, now).unwrap_err().code(),
            "authorization_malformed"
        );
        // Without the security token header.
        let mut r = req.clone();
        r.headers.retain(|(k, _)| k != "X-Amz-Security-Token");
        assert_eq!(
            verify_request(&ring, &r, &opts, now).unwrap_err(),
            CredsError::SecurityTokenMissing
        );
        // A signed header that is absent.
        let mut r = req.clone();
        r.headers.retain(|(k, _)| k != "Content-Type");
        assert_eq!(
            verify_request(&ring, &r, &opts, now).unwrap_err(),
            CredsError::MissingHeader("content-type".into())
        );
        // Credential date and x-amz-date disagree.
        let mut r = req.clone();
        for (k, v) in r.headers.iter_mut() {
            if k == "Authorization" {
                let day = amz_date(now)[..8].to_string();
                let other = amz_date(now - time::Duration::days(1))[..8].to_string();
                *v = v.replace(&format!("/{day}/"), &format!("/{other}/"));
            }
        }
        assert_eq!(
            verify_request(&ring, &r, &opts, now).unwrap_err(),
            CredsError::CredentialDateMismatch
        );

        // A token the signer left out of SignedHeaders still verifies
        // (it is bound to the access key id), and still must open.
        let mut r = request();
        r.headers.push(("X-Amz-Date".into(), amz_date(now)));
        let hash = sha256_hex(&r.body);
        let names: Vec<String> = ["content-type", "host", "x-amz-date"]
            .map(String::from)
            .to_vec();
        let canonical = canonical_request(&r, &names, false, &hash, None).unwrap();
        let day = &amz_date(now)[..8];
        let scope = format!("{day}/eu-west-1/execute-api/aws4_request");
        let sig = signature(
            &creds.secret_access_key,
            day,
            "eu-west-1",
            "execute-api",
            &string_to_sign(&amz_date(now), &scope, &canonical),
        );
        r.headers.push((
            "Authorization".into(),
            format!(
                "{ALGORITHM} Credential={}/{scope}, SignedHeaders={}, Signature={sig}",
                creds.access_key_id,
                names.join(";")
            ),
        ));
        r.headers
            .push(("X-Amz-Security-Token".into(), creds.session_token.clone()));
        verify_request(&ring, &r, &opts, now).unwrap();
        // ... but host and x-amz-date must be signed.
        for (drop, name) in [("host;", "host"), (";x-amz-date", "x-amz-date")] {
            let mut bad = r.clone();
            for (k, v) in bad.headers.iter_mut() {
                if k == "Authorization" {
                    *v = v.replace(
                        &format!("SignedHeaders={}", names.join(";")),
                        &format!("SignedHeaders={}", names.join(";").replace(drop, "")),
                    );
                }
            }
            assert_eq!(
                verify_request(&ring, &bad, &opts, now).unwrap_err(),
                CredsError::HeaderNotSigned(name.into())
            );
        }
    }

    #[test]
    fn from_http_takes_the_raw_target_and_the_authority() {
        let req = http::Request::builder()
            .method("PUT")
            .uri("https://bucket.s3.amazonaws.com/a%20b/c?x=%2F&y")
            .header("x-amz-date", DATE)
            .body(b"data".to_vec())
            .unwrap();
        let r = SignedRequest::from_http(&req).unwrap();
        assert_eq!(r.method, "PUT");
        assert_eq!(r.path, "/a%20b/c");
        assert_eq!(r.query, "x=%2F&y");
        assert!(
            r.headers
                .contains(&("host".into(), "bucket.s3.amazonaws.com".into()))
        );
        assert_eq!(r.body, b"data");
        let bad = http::Request::builder()
            .uri("/")
            .header("x-odd", http::HeaderValue::from_bytes(b"caf\xe9").unwrap())
            .body(Vec::<u8>::new())
            .unwrap();
        assert_eq!(
            SignedRequest::from_http(&bad).unwrap_err().code(),
            "request_malformed"
        );
    }
}
