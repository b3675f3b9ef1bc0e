//! The HTTP faces of token exchange, each exactly as its clients expect:
//!
//! - `POST /v1/token` — RFC 8693 token exchange, OAuth error JSON;
//! - `POST /` — AWS STS `AssumeRoleWithWebIdentity` (query API, unsigned,
//!   XML), so the AWS CLI, boto3 and every SDK's web-identity provider work
//!   with `--endpoint-url` / `AWS_ENDPOINT_URL_STS`;
//! - `GET /.well-known/openid-configuration` and `/.well-known/jwks.json` —
//!   Herald as an OIDC issuer, so anyone can verify its JWTs;
//! - `POST /v1/introspect` — RFC 7662 introspection of Herald's JWTs and
//!   session credentials (active, expiry, scope, revocation).
//!
//! All decisions happen in [`crate::exchange`]; this module only translates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{ConnectInfo, RawQuery, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::ErrorCode;
use herald_core::error::ErrorClass;
use serde_json::{Value, json};

use crate::Shared;
use crate::decision::RequestedCredential;
use crate::decision::Run;
use crate::exchange::{ExchangeEvidence, ExchangeRequest, exchange, start};
use crate::exchange_service::iso8601;
use crate::issue::Issued;
use crate::status::{ERROR_CODE_METADATA, Refusal};

/// RFC 8693 grant type.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 token type of a JWT.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// RFC 8693 token type of an OIDC ID token.
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
/// Herald's token type for a join token presented as `actor_token` (second factor).
pub const TOKEN_TYPE_JOIN_TOKEN: &str = "urn:herald:params:oauth:token-type:join-token";
/// STS XML namespace.
const STS_NS: &str = "https://sts.amazonaws.com/doc/2011-06-15/";
/// Largest inline session policy STS accepts, characters.
const STS_MAX_POLICY: usize = 2048;

type Form = HashMap<String, String>;

/// A protocol-level refusal: the stable code for the audit record and the
/// error name the endpoint's clients parse (an OAuth `error`, an STS `Code`).
struct Protocol {
    code: ErrorCode,
    wire: &'static str,
    status: StatusCode,
    message: String,
}

impl Protocol {
    fn new(code: ErrorCode, wire: &'static str, message: impl Into<String>) -> Self {
        let status = match code.class() {
            ErrorClass::ResourceExhausted if code == ErrorCode::RequestTooLarge => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ErrorClass::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
            _ => StatusCode::BAD_REQUEST,
        };
        Self {
            code,
            wire,
            status,
            message: message.into(),
        }
    }

    fn method(allowed: &str, wire: &'static str) -> Self {
        Self {
            status: StatusCode::METHOD_NOT_ALLOWED,
            ..Self::new(
                ErrorCode::InvalidRequest,
                wire,
                format!("use {allowed} on this endpoint"),
            )
        }
    }
}

/// The request body, read up to [`crate::http::MAX_BODY_BYTES`] within
/// `listen.body_read_timeout`: larger is `request_too_large`, unreadable (a
/// bad chunk, a cut connection) is `invalid_request`, slower is
/// `request_timeout` (408; hyper closes the connection, whose body was not
/// read to its end) — each answered in the endpoint's own shape.
async fn read_body(
    shared: &Shared,
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
    too_large: &'static str,
    invalid: &'static str,
    timeout: &'static str,
) -> Result<axum::body::Bytes, Protocol> {
    use http_body_util::BodyExt;
    let limit = crate::http::MAX_BODY_BYTES;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let too_big = || {
        Protocol::new(
            ErrorCode::RequestTooLarge,
            too_large,
            format!("the request body exceeds {limit} bytes"),
        )
    };
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_big());
    }
    let deadline = shared.config.listen.body_read_timeout;
    let collected = tokio::time::timeout(
        deadline,
        http_body_util::Limited::new(body, limit).collect(),
    )
    .await;
    let Ok(collected) = collected else {
        crate::listener::CONNECTIONS_TIMED_OUT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return Err(Protocol {
            status: StatusCode::REQUEST_TIMEOUT,
            ..Protocol::new(
                ErrorCode::RequestTimeout,
                timeout,
                format!("the request body did not arrive within {deadline:?}"),
            )
        });
    };
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_big()),
        Err(e) => Err(Protocol::new(
            ErrorCode::InvalidRequest,
            invalid,
            format!("the request body could not be read: {e}"),
        )),
    }
}

/// A form body (or query string): every pair, in order. Refused when it is
/// not `application/x-www-form-urlencoded`.
fn form_pairs(body: &[u8], wire: &'static str) -> Result<Vec<(String, String)>, Protocol> {
    let malformed = || {
        Protocol::new(
            ErrorCode::InvalidRequest,
            wire,
            "the body is not application/x-www-form-urlencoded",
        )
    };
    // The form decoder is lenient (a bad escape passes through, invalid
    // UTF-8 becomes U+FFFD); a security boundary refuses instead, so that
    // what is audited is exactly what was sent.
    if !strictly_form_encoded(body) {
        return Err(malformed());
    }
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).map_err(|_| malformed())
}

/// Every `%` starts a two-hex-digit escape and the decoded bytes are UTF-8.
fn strictly_form_encoded(body: &[u8]) -> bool {
    let mut decoded = Vec::with_capacity(body.len());
    let mut i = 0;
    while i < body.len() {
        if body[i] == b'%' {
            let hex = body
                .get(i + 1..i + 3)
                .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            match hex {
                Some(byte) => decoded.push(byte),
                None => return false,
            }
            i += 3;
        } else {
            decoded.push(body[i]);
            i += 1;
        }
    }
    std::str::from_utf8(&decoded).is_ok()
}

/// The form's parameters; a repeated one is refused rather than silently
/// collapsed — except RFC 8693's `audience`/`resource`, which repeat.
fn form(pairs: &[(String, String)], wire: &'static str) -> Result<Form, Protocol> {
    let mut out = Form::new();
    for (k, v) in pairs {
        if k == "audience" || k == "resource" {
            continue;
        }
        if out.insert(k.clone(), v.clone()).is_some() {
            return Err(Protocol::new(
                ErrorCode::InvalidRequest,
                wire,
                format!("parameter {k} given twice"),
            ));
        }
    }
    Ok(out)
}

/// Why an exchange form was refused before any evidence was looked at:
/// the stable code (for the audit record) and the error name the
/// endpoint's clients parse (an OAuth `error`, an STS `Code`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormRefusal {
    /// The stable code.
    pub code: ErrorCode,
    /// The wire error name.
    pub wire: &'static str,
    /// The HTTP status the endpoint answers with.
    pub status: StatusCode,
    /// What is wrong.
    pub message: String,
}

impl From<Protocol> for FormRefusal {
    fn from(p: Protocol) -> Self {
        Self {
            code: p.code,
            wire: p.wire,
            status: p.status,
            message: p.message,
        }
    }
}

/// A `POST /v1/token` body, parsed and checked exactly as the endpoint
/// does before the exchange: the request and the requested `scope`.
fn rfc8693_form(body: &[u8]) -> Result<(ExchangeRequest, String), Protocol> {
    let pairs = form_pairs(body, "invalid_request")?;
    let f = form(&pairs, "invalid_request")?;
    rfc8693_request(&f, &pairs)
}

/// An STS form (a `POST` body or a `GET` query string), parsed and checked
/// exactly as the endpoint does before the exchange.
fn sts_form(form_bytes: &[u8]) -> Result<ExchangeRequest, Protocol> {
    let pairs = form_pairs(form_bytes, "MalformedInput")?;
    let f = form(&pairs, "InvalidParameterCombination")?;
    sts_request(&f)
}

/// The RFC 8693 form parser of `POST /v1/token` (what the fuzz targets and
/// tests drive; the handler runs the same code).
pub fn parse_rfc8693_form(body: &[u8]) -> Result<(ExchangeRequest, String), FormRefusal> {
    rfc8693_form(body).map_err(FormRefusal::from)
}

/// The STS `AssumeRoleWithWebIdentity` form parser (what the fuzz targets
/// and tests drive; the handler runs the same code).
pub fn parse_sts_form(form_bytes: &[u8]) -> Result<ExchangeRequest, FormRefusal> {
    sts_form(form_bytes).map_err(FormRefusal::from)
}

/// A refusal of a request whose head does not parse, in the shape the
/// path's clients parse: (status, content type, body). `path` is `None`
/// when not even the request line parsed.
pub(crate) fn malformed_head(
    path: Option<&str>,
    code: ErrorCode,
    message: &str,
) -> (StatusCode, &'static str, String) {
    let status = match code {
        ErrorCode::RequestTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        _ => StatusCode::BAD_REQUEST,
    };
    let text = format!("{code}: {message}");
    match path.map(|p| p.split('?').next().unwrap_or(p)) {
        Some("/") => (
            status,
            "text/xml",
            format!(
                "<ErrorResponse xmlns=\"{STS_NS}\">\n  <Error>\n    <Type>Sender</Type>\n    <Code>MalformedInput</Code>\n    <Message>{}</Message>\n  </Error>\n  <RequestId>{}</RequestId>\n</ErrorResponse>\n",
                xml_escape(&text),
                request_id()
            ),
        ),
        Some("/v1/token" | "/v1/introspect") => (
            status,
            "application/json",
            json!({"error": "invalid_request", "error_description": text}).to_string(),
        ),
        _ => (status, "text/plain; charset=utf-8", format!("{text}\n")),
    }
}

/// The audit action of a request to `path`, for refusals made before it
/// reached its handler.
pub(crate) fn action_of(path: Option<&str>) -> &'static str {
    match path.map(|p| p.split('?').next().unwrap_or(p)) {
        Some("/") => "exchange.cloud_credentials",
        Some("/v1/token") => "exchange.jwt_svid",
        Some("/v1/introspect") => "introspect",
        _ => "http.request",
    }
}

// ---------------------------------------------------------------- RFC 8693

/// The OAuth error for a refusal, with its HTTP status.
fn oauth_error(code: ErrorCode) -> (StatusCode, &'static str) {
    match code {
        ErrorCode::AudienceNotGranted
        | ErrorCode::CredentialNotGranted
        | ErrorCode::RoleNotGranted => (StatusCode::BAD_REQUEST, "invalid_target"),
        ErrorCode::InvalidRequest
        | ErrorCode::TtlTooLong
        | ErrorCode::CsrMalformed
        | ErrorCode::CsrSignatureInvalid
        | ErrorCode::CsrUnsupportedKey
        | ErrorCode::SessionPolicyMalformed => (StatusCode::BAD_REQUEST, "invalid_request"),
        ErrorCode::RequestTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "invalid_request"),
        ErrorCode::PolicyDenied | ErrorCode::FactorMissing | ErrorCode::SpiffeIdEscapesPrefix => {
            (StatusCode::BAD_REQUEST, "unauthorized_client")
        }
        c => match c.class() {
            ErrorClass::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "temporarily_unavailable"),
            ErrorClass::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
            ErrorClass::ResourceExhausted => (StatusCode::TOO_MANY_REQUESTS, "invalid_request"),
            _ => (StatusCode::BAD_REQUEST, "invalid_grant"),
        },
    }
}

/// An OAuth error body with Herald's code beside it.
fn oauth_response(status: StatusCode, error: &str, code: ErrorCode, message: &str) -> Response {
    let mut resp = (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        json!({"error": error, "error_description": format!("{code}: {message}")}).to_string(),
    )
        .into_response();
    resp.headers_mut()
        .insert(ERROR_CODE_METADATA, HeaderValue::from_static(code.as_str()));
    resp
}

fn oauth_refusal(r: &Refusal) -> Response {
    let (status, error) = oauth_error(r.code);
    oauth_response(status, error, r.code, &r.message)
}

/// Audits a protocol refusal on `run` and answers it the OAuth way.
async fn oauth_protocol(run: Run<'_>, p: Protocol) -> Response {
    let r = run.refuse(Refusal::new(p.code, p.message)).await;
    if r.code == ErrorCode::RateLimited {
        return oauth_refusal(&r);
    }
    closing_if_unread(oauth_response(p.status, p.wire, r.code, &r.message))
}

/// A refusal of a body that did not arrive in time closes the connection
/// (hyper would too, the body being unread: said, not left implied).
fn closing_if_unread(mut resp: Response) -> Response {
    if resp.status() == StatusCode::REQUEST_TIMEOUT {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// What a token-exchange form asks for, checked.
fn rfc8693_request(
    f: &Form,
    pairs: &[(String, String)],
) -> Result<(ExchangeRequest, String), Protocol> {
    let invalid = |m: &str| Protocol::new(ErrorCode::InvalidRequest, "invalid_request", m);
    if f.get("grant_type").map(String::as_str) != Some(TOKEN_EXCHANGE_GRANT) {
        return Err(Protocol::new(
            ErrorCode::InvalidRequest,
            "unsupported_grant_type",
            "grant_type must be urn:ietf:params:oauth:grant-type:token-exchange",
        ));
    }
    let Some(subject_token) = f.get("subject_token").filter(|t| !t.is_empty()) else {
        return Err(invalid("subject_token is required"));
    };
    match f.get("subject_token_type").map(String::as_str) {
        Some(TOKEN_TYPE_JWT | TOKEN_TYPE_ID_TOKEN) => {}
        _ => {
            return Err(invalid(
                "subject_token_type must be urn:ietf:params:oauth:token-type:jwt or :id_token",
            ));
        }
    }
    match f.get("requested_token_type").map(String::as_str) {
        None | Some(TOKEN_TYPE_JWT) => {}
        Some(_) => {
            return Err(invalid(
                "requested_token_type: only urn:ietf:params:oauth:token-type:jwt (a JWT-SVID) is issued here; \
                 use the STS endpoint for session credentials",
            ));
        }
    }
    let join_token = match (
        f.get("actor_token"),
        f.get("actor_token_type").map(String::as_str),
    ) {
        (None, None) => None,
        (Some(t), Some(TOKEN_TYPE_JOIN_TOKEN)) => Some(t.clone()),
        _ => {
            return Err(invalid(
                "actor_token must come with actor_token_type urn:herald:params:oauth:token-type:join-token",
            ));
        }
    };
    let audiences: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "audience" || k == "resource")
        .map(|(_, v)| v.clone())
        .collect();
    if audiences.is_empty() {
        return Err(Protocol::new(
            ErrorCode::InvalidRequest,
            "invalid_target",
            "name the audience of the JWT-SVID",
        ));
    }
    Ok((
        ExchangeRequest {
            evidence: ExchangeEvidence {
                subject_token: subject_token.clone(),
                join_token,
                peer_certs: None,
            },
            credential: RequestedCredential::JwtSvid {
                audiences,
                ttl: None,
            },
        },
        f.get("scope").cloned().unwrap_or_default(),
    ))
}

/// `POST /v1/token` — RFC 8693. Every refusal, protocol errors included,
/// is audited and answered as OAuth error JSON.
pub async fn token_exchange(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    method: Method,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Response {
    let mut run = start(&shared, "exchange.jwt_svid", "rfc8693", Some(addr));
    let parsed = async {
        run.admit()
            .map_err(|r| Protocol::new(r.code, "invalid_request", r.message))?;
        if method != Method::POST {
            return Err(Protocol::method("POST", "invalid_request"));
        }
        let body = read_body(
            &shared,
            &headers,
            body,
            "invalid_request",
            "invalid_request",
            "invalid_request",
        )
        .await?;
        rfc8693_form(&body)
    }
    .await;
    let (req, scope) = match parsed {
        Ok(v) => v,
        Err(p) => return oauth_protocol(run, p).await,
    };
    match exchange(&shared, run, req).await {
        Ok(done) => {
            let Issued::Jwt { token } = done.issued else {
                return oauth_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    ErrorCode::Internal,
                    "unexpected credential",
                );
            };
            let expires_in = (done.expires_at - crate::unix_now()).max(0);
            (
                StatusCode::OK,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (header::CACHE_CONTROL, "no-store"),
                ],
                json!({
                    "access_token": token,
                    "issued_token_type": TOKEN_TYPE_JWT,
                    "token_type": "Bearer",
                    "expires_in": expires_in,
                    "scope": scope,
                })
                .to_string(),
            )
                .into_response()
        }
        Err(r) => oauth_refusal(&r),
    }
}

// ---------------------------------------------------------------- AWS STS

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

fn request_id() -> String {
    let mut b = [0u8; 16];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        // A request id is correlation, not security: a fixed one will do.
        b = [0; 16];
    }
    let h = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

fn sts_error(status: StatusCode, code: &str, message: &str, herald_code: ErrorCode) -> Response {
    let kind = if status.is_server_error() {
        "Receiver"
    } else {
        "Sender"
    };
    let body = format!(
        "<ErrorResponse xmlns=\"{STS_NS}\">\n  <Error>\n    <Type>{kind}</Type>\n    <Code>{}</Code>\n    <Message>{}</Message>\n  </Error>\n  <RequestId>{}</RequestId>\n</ErrorResponse>\n",
        xml_escape(code),
        xml_escape(message),
        request_id()
    );
    let mut resp = (status, [(header::CONTENT_TYPE, "text/xml")], body).into_response();
    resp.headers_mut().insert(
        ERROR_CODE_METADATA,
        HeaderValue::from_static(herald_code.as_str()),
    );
    resp
}

/// The STS error for a refusal.
fn sts_refusal(r: &Refusal) -> Response {
    let (status, code) = match r.code {
        ErrorCode::TokenExpired => (StatusCode::BAD_REQUEST, "ExpiredTokenException"),
        ErrorCode::IssuerUnavailable => (StatusCode::BAD_REQUEST, "IDPCommunicationError"),
        ErrorCode::PolicyDenied | ErrorCode::FactorMissing | ErrorCode::SpiffeIdEscapesPrefix => {
            (StatusCode::FORBIDDEN, "IDPRejectedClaim")
        }
        ErrorCode::RoleNotGranted | ErrorCode::CredentialNotGranted => {
            (StatusCode::FORBIDDEN, "AccessDenied")
        }
        ErrorCode::SessionPolicyMalformed | ErrorCode::SessionPolicyTooBroad => {
            (StatusCode::BAD_REQUEST, "MalformedPolicyDocument")
        }
        ErrorCode::TtlTooLong | ErrorCode::InvalidRequest => {
            (StatusCode::BAD_REQUEST, "InvalidParameterValue")
        }
        ErrorCode::RequestTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "RequestEntityTooLarge"),
        c => match c.class() {
            ErrorClass::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "InternalFailure"),
            ErrorClass::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
            ErrorClass::ResourceExhausted if c == ErrorCode::RateLimited => {
                (StatusCode::BAD_REQUEST, "Throttling")
            }
            _ => (StatusCode::BAD_REQUEST, "InvalidIdentityToken"),
        },
    };
    sts_error(status, code, &format!("{}: {}", r.code, r.message), r.code)
}

/// Audits a protocol refusal on `run` and answers it the STS way.
async fn sts_protocol(run: Run<'_>, p: Protocol) -> Response {
    let r = run.refuse(Refusal::new(p.code, p.message)).await;
    if r.code == ErrorCode::RateLimited {
        return sts_refusal(&r);
    }
    closing_if_unread(sts_error(
        p.status,
        p.wire,
        &format!("{}: {}", r.code, r.message),
        r.code,
    ))
}

/// What an `AssumeRoleWithWebIdentity` call asks for, checked as AWS
/// checks it.
fn sts_request(f: &Form) -> Result<ExchangeRequest, Protocol> {
    let p = |wire, m: &str| Protocol::new(ErrorCode::InvalidRequest, wire, m);
    match f.get("Action").map(String::as_str) {
        Some("AssumeRoleWithWebIdentity") => {}
        Some(other) => {
            return Err(p(
                "InvalidAction",
                &format!("Could not find operation {other} for version 2011-06-15"),
            ));
        }
        None => return Err(p("MissingAction", "Action is required")),
    }
    if f.get("Version").map(String::as_str) != Some("2011-06-15") {
        return Err(p("InvalidParameterValue", "Version must be 2011-06-15"));
    }
    let required = |k: &str| f.get(k).filter(|v| !v.is_empty());
    let (Some(role_arn), Some(session_name), Some(token)) = (
        required("RoleArn"),
        required("RoleSessionName"),
        required("WebIdentityToken"),
    ) else {
        return Err(p(
            "MissingParameter",
            "RoleArn, RoleSessionName and WebIdentityToken are required",
        ));
    };
    let invalid = |m: &str| p("InvalidParameterValue", m);
    if role_arn.len() < 20 || role_arn.len() > 2048 || !role_arn.starts_with("arn:") {
        return Err(invalid("RoleArn must be an ARN of 20 to 2048 characters"));
    }
    if !crate::issue::valid_session_name(session_name) {
        return Err(invalid(
            "RoleSessionName must be 2 to 64 characters of [\\w+=,.@-]",
        ));
    }
    if token.len() < 4 || token.len() > 20_000 {
        return Err(invalid("WebIdentityToken must be 4 to 20000 characters"));
    }
    let ttl = match f.get("DurationSeconds") {
        None => None,
        Some(d) => match d.parse::<u64>() {
            Ok(s) if (900..=43_200).contains(&s) => Some(Duration::from_secs(s)),
            _ => {
                return Err(invalid(
                    "DurationSeconds must be an integer from 900 to 43200",
                ));
            }
        },
    };
    let policy = f.get("Policy").cloned();
    if policy.as_ref().is_some_and(|p| p.len() > STS_MAX_POLICY) {
        // 400, as AWS answers it: a field over its cap, not a body.
        return Err(Protocol {
            status: StatusCode::BAD_REQUEST,
            ..Protocol::new(
                ErrorCode::RequestTooLarge,
                "PackedPolicyTooLarge",
                "the session policy exceeds 2048 characters",
            )
        });
    }
    Ok(ExchangeRequest {
        evidence: ExchangeEvidence {
            subject_token: token.clone(),
            join_token: None,
            peer_certs: None,
        },
        credential: RequestedCredential::Cloud {
            role_arn: role_arn.clone(),
            session_name: session_name.clone(),
            session_policy: policy,
            ttl,
        },
    })
}

/// `/` — the AWS STS query API: `POST` with a form body, or `GET` with a
/// query string, as AWS accepts both. Every refusal is audited and
/// answered as STS error XML.
pub async fn sts(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Response {
    let mut run = start(&shared, "exchange.cloud_credentials", "sts", Some(addr));
    let parsed = async {
        run.admit()
            .map_err(|r| Protocol::new(r.code, "Throttling", r.message))?;
        match method {
            Method::POST => {
                let body = read_body(
                    &shared,
                    &headers,
                    body,
                    "RequestEntityTooLarge",
                    "MalformedInput",
                    "RequestTimeout",
                )
                .await?;
                sts_form(&body)
            }
            Method::GET => sts_form(query.unwrap_or_default().as_bytes()),
            _ => Err(Protocol::method("GET or POST", "InvalidAction")),
        }
    }
    .await;
    let req = match parsed {
        Ok(r) => r,
        Err(p) => return sts_protocol(run, p).await,
    };
    let done = match exchange(&shared, run, req).await {
        Ok(d) => d,
        Err(r) => return sts_refusal(&r),
    };
    let Issued::Cloud {
        creds,
        role_arn,
        session_name,
    } = done.issued
    else {
        return sts_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalFailure",
            "unexpected credential",
            ErrorCode::Internal,
        );
    };
    let (assumed_arn, assumed_id) = assumed_role(&role_arn, &session_name);
    let provider = done
        .issuer
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .to_string();
    let body = format!(
        "<AssumeRoleWithWebIdentityResponse xmlns=\"{STS_NS}\">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>{sub}</SubjectFromWebIdentityToken>
    <Audience>{aud}</Audience>
    <AssumedRoleUser>
      <Arn>{arn}</Arn>
      <AssumedRoleId>{rid}</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <AccessKeyId>{akid}</AccessKeyId>
      <SecretAccessKey>{secret}</SecretAccessKey>
      <SessionToken>{token}</SessionToken>
      <Expiration>{exp}</Expiration>
    </Credentials>
    <SourceIdentity>{spiffe}</SourceIdentity>
    <Provider>{provider}</Provider>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata>
    <RequestId>{reqid}</RequestId>
  </ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>
",
        sub = xml_escape(&done.subject),
        aud = xml_escape(&done.audience),
        arn = xml_escape(&assumed_arn),
        rid = xml_escape(&assumed_id),
        akid = xml_escape(&creds.access_key_id),
        secret = xml_escape(&creds.secret_access_key),
        token = xml_escape(&creds.session_token),
        exp = iso8601(creds.expiration),
        spiffe = xml_escape(done.spiffe_id.as_str()),
        provider = xml_escape(&provider),
        reqid = request_id(),
    );
    (StatusCode::OK, [(header::CONTENT_TYPE, "text/xml")], body).into_response()
}

/// `arn:aws:iam::ACCT:role/path/NAME` → (`arn:aws:sts::ACCT:assumed-role/NAME/SESSION`,
/// `AROA…:SESSION`), as STS reports the assumed role.
fn assumed_role(role_arn: &str, session: &str) -> (String, String) {
    let parts: Vec<&str> = role_arn.splitn(6, ':').collect();
    let (partition, account, resource) = match parts[..] {
        [_, p, _, _, a, r] => (p, a, r),
        _ => ("aws", "", role_arn),
    };
    let name = resource.rsplit('/').next().unwrap_or(resource);
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, role_arn.as_bytes());
    const B32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let id: String = digest.as_ref()[..17]
        .iter()
        .map(|b| B32[(*b & 31) as usize] as char)
        .collect();
    (
        format!("arn:{partition}:sts::{account}:assumed-role/{name}/{session}"),
        format!("AROA{id}:{session}"),
    )
}

// ------------------------------------------------------- OIDC + introspection

/// `GET /.well-known/openid-configuration`.
pub async fn openid_configuration(State(shared): State<Arc<Shared>>) -> Response {
    let iss = shared.config.jwt_issuer();
    let base = iss.trim_end_matches('/');
    (
        [(header::CONTENT_TYPE, "application/json")],
        json!({
            "issuer": iss,
            "jwks_uri": format!("{base}/.well-known/jwks.json"),
            "token_endpoint": format!("{base}/v1/token"),
            "introspection_endpoint": format!("{base}/v1/introspect"),
            "grant_types_supported": [TOKEN_EXCHANGE_GRANT],
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
            "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti"],
        })
        .to_string(),
    )
        .into_response()
}

/// `GET /.well-known/jwks.json`.
pub async fn jwks(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        shared.ca().bundle.to_oidc_jwks().to_string(),
    )
        .into_response()
}

/// Authenticates an introspection caller: a bearer JWT-SVID from this
/// server, unexpired, unrevoked, for the configured audience. Returns the
/// caller's SPIFFE ID.
async fn introspection_caller(
    shared: &Shared,
    headers: &axum::http::HeaderMap,
) -> Result<String, &'static str> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or("present a JWT-SVID as a bearer token")?;
    let ca = shared.ca();
    let claims =
        herald_ca::jwt::verify_jwt(bearer.trim(), &ca.bundle.jwt_authorities, crate::unix_now())
            .ok_or("the bearer token is not a valid JWT-SVID from this server")?;
    let want = shared.config.introspection.audience.as_str();
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == want,
        Some(Value::Array(items)) => items.iter().any(|a| a.as_str() == Some(want)),
        _ => false,
    };
    if !aud_ok {
        return Err("the bearer JWT-SVID is not for the introspection audience");
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .unwrap_or_default();
    match shared.store.is_revoked(jti).await {
        Ok(false) => {}
        Ok(true) => return Err("the bearer JWT-SVID has been revoked"),
        Err(_) => return Err("the datastore is unavailable"),
    }
    claims
        .get("sub")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or("the bearer JWT-SVID has no subject")
}

/// The status of an X.509 SVID for introspection (an OCSP-like answer):
/// `token` is its PEM certificate or its serial in hex. Active means issued
/// here, unexpired and not revoked; a certificate must also be the one
/// recorded under its serial (same public key).
/// Errors are (OAuth error code, description).
async fn x509_status(
    shared: &Shared,
    token: &str,
    now: i64,
) -> Result<Value, (&'static str, &'static str)> {
    let bad = |why| ("invalid_request", why);
    let down = |_| ("server_error", "datastore unavailable");
    if token.trim_start().starts_with("-----BEGIN") {
        let der = herald_ca::authority::certs_from_pem(token)
            .ok()
            .and_then(|c| c.into_iter().next())
            .ok_or(bad("token is not a PEM certificate"))?;
        // The same check renewal makes: issued here, equal to its record,
        // signed by the CA key the record names, its lineage live. A
        // certificate from any other CA carrying a known serial is not ours.
        return match crate::flows::presented_svid(shared, Some(&[der])).await {
            Ok(svid) => Ok(json!({
                "active": true,
                "token_type": "x509-svid",
                "sub": svid.spiffe_id.to_string(),
                "serial": svid.serial,
                "nbf": svid.not_before,
                "exp": svid.not_after,
                "policy": svid.policy,
            })),
            Err(r)
                if matches!(
                    r.code.class(),
                    ErrorClass::Unavailable | ErrorClass::Internal
                ) =>
            {
                Err(("server_error", "datastore unavailable"))
            }
            Err(r) => Ok(json!({"active": false, "revoked": r.code == ErrorCode::SvidRevoked})),
        };
    }
    let serial = token.trim().replace(':', "").to_ascii_lowercase();
    if serial.is_empty() || serial.len() > 64 || !serial.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("token is not a certificate serial in hex"));
    }
    let serial = serial.trim_start_matches('0').to_owned();
    let issued = shared.store.issued(&serial).await.map_err(down)?;
    let Some(issued) = issued.filter(|i| i.kind == "x509_svid") else {
        return Ok(json!({"active": false}));
    };
    let revoked = shared.store.is_revoked(&serial).await.map_err(down)?;
    if revoked || issued.not_after <= now {
        return Ok(json!({"active": false, "revoked": revoked}));
    }
    Ok(json!({
        "active": true,
        "token_type": "x509-svid",
        "sub": issued.spiffe_id,
        "serial": serial,
        "iat": issued.issued_at,
        "nbf": issued.not_before,
        "exp": issued.not_after,
        "policy": issued.policy,
    }))
}

/// `POST /v1/introspect` — RFC 7662. `token` is a Herald JWT; a session
/// token together with its `access_key_id` (the token is sealed to that key
/// id and cannot be opened without it); or, with `token_type_hint=x509_svid`,
/// an X.509 SVID (PEM) or its serial — revocation status for verifiers.
/// Refusals (a caller that does not authenticate, a malformed request) are
/// audited; answers are reads, and are not.
pub async fn introspect(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    method: Method,
    headers: axum::http::HeaderMap,
    body: axum::body::Body,
) -> Response {
    let mut run = Run::start(
        &shared,
        "introspect",
        "http",
        Some(addr),
        herald_core::EvidenceType::JwtSvid,
    );
    let (token, f) = match introspection_request(&shared, &mut run, &method, &headers, body).await {
        Ok(v) => v,
        Err(p) => {
            let unauthorized = p.status == StatusCode::UNAUTHORIZED;
            let mut resp = oauth_protocol(run, p).await;
            if unauthorized {
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"herald\""),
                );
            }
            return resp;
        }
    };
    let answer = match token_status(&shared, &token, &f, crate::unix_now()).await {
        Ok(answer) => answer,
        Err(StatusError::Unavailable) => {
            return oauth_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                ErrorCode::StoreUnavailable,
                "datastore unavailable",
            );
        }
        Err(StatusError::Invalid(why)) => {
            let p = Protocol::new(ErrorCode::InvalidRequest, "invalid_request", why);
            return oauth_protocol(run, p).await;
        }
    };
    (
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        answer.to_string(),
    )
        .into_response()
}

/// The introspection request: admitted, a POST, from an authenticated
/// caller (when required), a form naming the token.
async fn introspection_request(
    shared: &Shared,
    run: &mut Run<'_>,
    method: &Method,
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<(String, Form), Protocol> {
    run.admit()
        .map_err(|r| Protocol::new(r.code, "invalid_request", r.message))?;
    if method != Method::POST {
        return Err(Protocol::method("POST", "invalid_request"));
    }
    if shared.config.introspection.require_client_auth {
        match introspection_caller(shared, headers).await {
            Ok(caller) => run.audit.caller = caller,
            Err(why) => {
                return Err(Protocol {
                    status: StatusCode::UNAUTHORIZED,
                    ..Protocol::new(ErrorCode::ClientUnauthenticated, "invalid_client", why)
                });
            }
        }
    }
    let body = read_body(
        shared,
        headers,
        body,
        "invalid_request",
        "invalid_request",
        "invalid_request",
    )
    .await?;
    let pairs = form_pairs(&body, "invalid_request")?;
    let f = form(&pairs, "invalid_request")?;
    match f.get("token").filter(|t| !t.is_empty()) {
        Some(token) => Ok((token.clone(), f)),
        None => Err(Protocol::new(
            ErrorCode::InvalidRequest,
            "invalid_request",
            "token is required",
        )),
    }
}

/// Why a token's status could not be told.
enum StatusError {
    /// The datastore did not answer.
    Unavailable,
    /// The token is not of the kind its hint names.
    Invalid(&'static str),
}

/// RFC 7662's answer for `token`: an X.509 SVID (by the hint), a session
/// token (with its access key id), or a Herald JWT.
async fn token_status(
    shared: &Shared,
    token: &str,
    f: &Form,
    now: i64,
) -> Result<Value, StatusError> {
    if f.get("token_type_hint").map(String::as_str) == Some("x509_svid") {
        return match x509_status(shared, token, now).await {
            Ok(v) => Ok(v),
            Err(("server_error", _)) => Err(StatusError::Unavailable),
            Err((_, why)) => Err(StatusError::Invalid(why)),
        };
    }
    let ca = shared.ca();
    // The token's claims, its serial, and what a revoked one answers.
    let (claims, serial, inactive) = if let Some(akid) = f.get("access_key_id") {
        let at = time::OffsetDateTime::from_unix_timestamp(now)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        match ca.sessions().open(akid, token, at) {
            Ok(claims) => {
                let serial = claims.serial.clone();
                let inactive = herald_cloud_creds::inactive_json();
                (claims.introspection_json(), serial, inactive)
            }
            Err(_) => return Ok(herald_cloud_creds::inactive_json()),
        }
    } else {
        match herald_ca::jwt::verify_jwt(token, &ca.bundle.jwt_authorities, now) {
            Some(claims) => {
                let serial = claims
                    .get("jti")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_owned();
                let mut v = Value::Object(claims);
                v["active"] = Value::Bool(true);
                v["token_type"] = Value::String("jwt-svid".into());
                (v, serial, json!({"active": false}))
            }
            None => return Ok(json!({"active": false})),
        }
    };
    match shared.store.is_revoked(&serial).await {
        Ok(false) => Ok(claims),
        Ok(true) => Ok(inactive),
        Err(_) => Err(StatusError::Unavailable),
    }
}

#[cfg(test)]
mod tests {
    use super::strictly_form_encoded;

    #[test]
    fn form_encoding_is_checked_strictly() {
        assert!(strictly_form_encoded(b"Action=AssumeRole&Name=a%20b+c"));
        assert!(strictly_form_encoded("x=%C3%A9".as_bytes()));
        assert!(!strictly_form_encoded(b"Action=%ZZ"));
        assert!(!strictly_form_encoded(b"Action=%+F"));
        assert!(!strictly_form_encoded(b"Action=%F"));
        assert!(!strictly_form_encoded(b"Action=%FF%FE"));
        assert!(!strictly_form_encoded(b"Action=\xff"));
    }
}
