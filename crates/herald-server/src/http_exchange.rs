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

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use herald_core::ErrorCode;
use herald_core::error::ErrorClass;
use serde_json::{Value, json};

use crate::Shared;
use crate::decision::RequestedCredential;
use crate::exchange::{ExchangeEvidence, ExchangeRequest, exchange};
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

fn form(body: &[u8]) -> Result<Form, String> {
    // Repeated keys are refused rather than silently collapsed, except
    // RFC 8693's `audience`/`resource`, which are collected separately.
    let mut out = Form::new();
    for (k, v) in form_urlencoded_pairs(body) {
        if k == "audience" || k == "resource" {
            continue;
        }
        if out.insert(k.clone(), v).is_some() {
            return Err(format!("parameter {k} given twice"));
        }
    }
    Ok(out)
}

fn form_urlencoded_pairs(body: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(body).unwrap_or_default()
}

fn caller(addr: SocketAddr, transport: &str) -> String {
    format!("peer:{addr}/{transport}")
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
        | ErrorCode::RequestTooLarge
        | ErrorCode::CsrMalformed
        | ErrorCode::CsrSignatureInvalid
        | ErrorCode::CsrUnsupportedKey
        | ErrorCode::SessionPolicyMalformed => (StatusCode::BAD_REQUEST, "invalid_request"),
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

fn oauth_refusal(code: ErrorCode, message: &str) -> Response {
    let (status, error) = oauth_error(code);
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

/// `POST /v1/token`.
pub async fn token_exchange(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    body: axum::body::Bytes,
) -> Response {
    let pairs = form_urlencoded_pairs(&body);
    let f = match form(&body) {
        Ok(f) => f,
        Err(e) => return oauth_plain_error("invalid_request", &e),
    };
    if f.get("grant_type").map(String::as_str) != Some(TOKEN_EXCHANGE_GRANT) {
        return oauth_plain_error(
            "unsupported_grant_type",
            "grant_type must be urn:ietf:params:oauth:grant-type:token-exchange",
        );
    }
    let Some(subject_token) = f.get("subject_token").filter(|t| !t.is_empty()) else {
        return oauth_plain_error("invalid_request", "subject_token is required");
    };
    match f.get("subject_token_type").map(String::as_str) {
        Some(TOKEN_TYPE_JWT | TOKEN_TYPE_ID_TOKEN) => {}
        _ => {
            return oauth_plain_error(
                "invalid_request",
                "subject_token_type must be urn:ietf:params:oauth:token-type:jwt or :id_token",
            );
        }
    }
    match f.get("requested_token_type").map(String::as_str) {
        None | Some(TOKEN_TYPE_JWT) => {}
        Some(_) => {
            return oauth_plain_error(
                "invalid_request",
                "requested_token_type: only urn:ietf:params:oauth:token-type:jwt (a JWT-SVID) is issued here; \
                 use the STS endpoint for session credentials",
            );
        }
    }
    let join_token = match (
        f.get("actor_token"),
        f.get("actor_token_type").map(String::as_str),
    ) {
        (None, None) => None,
        (Some(t), Some(TOKEN_TYPE_JOIN_TOKEN)) => Some(t.clone()),
        _ => {
            return oauth_plain_error(
                "invalid_request",
                "actor_token must come with actor_token_type urn:herald:params:oauth:token-type:join-token",
            );
        }
    };
    let audiences: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "audience" || k == "resource")
        .map(|(_, v)| v.clone())
        .collect();
    if audiences.is_empty() {
        return oauth_plain_error("invalid_target", "name the audience of the JWT-SVID");
    }
    let req = ExchangeRequest {
        evidence: ExchangeEvidence {
            subject_token: subject_token.clone(),
            join_token,
            peer_certs: None,
            peer_ip: Some(addr.ip()),
        },
        credential: RequestedCredential::JwtSvid {
            audiences,
            ttl: None,
        },
        caller: caller(addr, "rfc8693"),
        transport: "rfc8693",
    };
    match exchange(&shared, req).await {
        Ok(done) => {
            let Issued::Jwt { token } = done.issued else {
                return oauth_plain_error("server_error", "unexpected credential");
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
                    "scope": f.get("scope").cloned().unwrap_or_default(),
                })
                .to_string(),
            )
                .into_response()
        }
        Err(r) => oauth_refusal(r.code, &r.message),
    }
}

/// An OAuth error for a request refused before it reached the decision
/// path: malformed at the protocol level, nothing to audit beyond the log.
fn oauth_plain_error(error: &str, description: &str) -> Response {
    let status = match error {
        "server_error" => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    (
        status,
        [
            (header::CONTENT_TYPE, "application/json"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        json!({"error": error, "error_description": description}).to_string(),
    )
        .into_response()
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
    let _ = aws_lc_rs::rand::fill(&mut b);
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

fn sts_error(
    status: StatusCode,
    code: &str,
    message: &str,
    herald_code: Option<ErrorCode>,
) -> Response {
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
    if let Some(c) = herald_code {
        resp.headers_mut()
            .insert(ERROR_CODE_METADATA, HeaderValue::from_static(c.as_str()));
    }
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
        c => match c.class() {
            ErrorClass::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "InternalFailure"),
            ErrorClass::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "ServiceUnavailable"),
            ErrorClass::ResourceExhausted if c == ErrorCode::RateLimited => {
                (StatusCode::BAD_REQUEST, "Throttling")
            }
            _ => (StatusCode::BAD_REQUEST, "InvalidIdentityToken"),
        },
    };
    sts_error(
        status,
        code,
        &format!("{}: {}", r.code, r.message),
        Some(r.code),
    )
}

/// `POST /` — AWS STS query API.
pub async fn sts(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(addr): ConnectInfo<SocketAddr>,
    body: axum::body::Bytes,
) -> Response {
    let f = match form(&body) {
        Ok(f) => f,
        Err(e) => {
            return sts_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameterCombination",
                &e,
                None,
            );
        }
    };
    match f.get("Action").map(String::as_str) {
        Some("AssumeRoleWithWebIdentity") => {}
        Some(other) => {
            return sts_error(
                StatusCode::BAD_REQUEST,
                "InvalidAction",
                &format!("Could not find operation {other} for version 2011-06-15"),
                None,
            );
        }
        None => {
            return sts_error(
                StatusCode::BAD_REQUEST,
                "MissingAction",
                "Action is required",
                None,
            );
        }
    }
    if f.get("Version").map(String::as_str) != Some("2011-06-15") {
        return sts_error(
            StatusCode::BAD_REQUEST,
            "InvalidParameterValue",
            "Version must be 2011-06-15",
            None,
        );
    }
    let required = |k: &str| f.get(k).filter(|v| !v.is_empty());
    let (Some(role_arn), Some(session_name), Some(token)) = (
        required("RoleArn"),
        required("RoleSessionName"),
        required("WebIdentityToken"),
    ) else {
        return sts_error(
            StatusCode::BAD_REQUEST,
            "MissingParameter",
            "RoleArn, RoleSessionName and WebIdentityToken are required",
            None,
        );
    };
    let invalid = |m: &str| sts_error(StatusCode::BAD_REQUEST, "InvalidParameterValue", m, None);
    if role_arn.len() < 20 || role_arn.len() > 2048 || !role_arn.starts_with("arn:") {
        return invalid("RoleArn must be an ARN of 20 to 2048 characters");
    }
    if !crate::issue::valid_session_name(session_name) {
        return invalid("RoleSessionName must be 2 to 64 characters of [\\w+=,.@-]");
    }
    if token.len() < 4 || token.len() > 20_000 {
        return invalid("WebIdentityToken must be 4 to 20000 characters");
    }
    let ttl = match f.get("DurationSeconds") {
        None => None,
        Some(d) => match d.parse::<u64>() {
            Ok(s) if (900..=43_200).contains(&s) => Some(Duration::from_secs(s)),
            _ => return invalid("DurationSeconds must be an integer from 900 to 43200"),
        },
    };
    let policy = f.get("Policy").cloned();
    if policy.as_ref().is_some_and(|p| p.len() > STS_MAX_POLICY) {
        return sts_error(
            StatusCode::BAD_REQUEST,
            "PackedPolicyTooLarge",
            "the session policy exceeds 2048 characters",
            None,
        );
    }
    let req = ExchangeRequest {
        evidence: ExchangeEvidence {
            subject_token: token.clone(),
            join_token: None,
            peer_certs: None,
            peer_ip: Some(addr.ip()),
        },
        credential: RequestedCredential::Cloud {
            role_arn: role_arn.clone(),
            session_name: session_name.clone(),
            session_policy: policy,
            ttl,
        },
        caller: caller(addr, "sts"),
        transport: "sts",
    };
    let done = match exchange(&shared, req).await {
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
            None,
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
    let (serial, spki) = if token.trim_start().starts_with("-----BEGIN") {
        let der = herald_ca::authority::certs_from_pem(token)
            .ok()
            .and_then(|c| c.into_iter().next())
            .ok_or(bad("token is not a PEM certificate"))?;
        let info = herald_attest::svid::parse_x509_svid(&der)
            .map_err(|_| bad("token is not an X.509 SVID"))?;
        (info.serial_hex, Some(info.spki_sha256))
    } else {
        let serial = token.trim().replace(':', "").to_ascii_lowercase();
        if serial.is_empty() || serial.len() > 64 || !serial.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(bad("token is not a certificate serial in hex"));
        }
        (serial.trim_start_matches('0').to_owned(), None)
    };
    let issued = shared.store.issued(&serial).await.map_err(down)?;
    let Some(issued) = issued.filter(|i| i.kind == "x509_svid") else {
        return Ok(json!({"active": false}));
    };
    if spki.is_some_and(|k| k != issued.public_key_sha256) {
        return Ok(json!({"active": false}));
    }
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
pub async fn introspect(
    State(shared): State<Arc<Shared>>,
    headers: axum::http::HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    if shared.config.introspection.require_client_auth
        && let Err(why) = introspection_caller(&shared, &headers).await
    {
        let mut resp = (
            StatusCode::UNAUTHORIZED,
            [(header::CONTENT_TYPE, "application/json")],
            json!({"error": "invalid_client", "error_description": why}).to_string(),
        )
            .into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"herald\""),
        );
        return resp;
    }
    let f = match form(&body) {
        Ok(f) => f,
        Err(e) => return oauth_plain_error("invalid_request", &e),
    };
    let Some(token) = f.get("token").filter(|t| !t.is_empty()) else {
        return oauth_plain_error("invalid_request", "token is required");
    };
    let now = crate::unix_now();
    let ca = shared.ca();
    let answer = if f.get("token_type_hint").map(String::as_str) == Some("x509_svid") {
        match x509_status(&shared, token, now).await {
            Ok(v) => v,
            Err((code, why)) => return oauth_plain_error(code, why),
        }
    } else if let Some(akid) = f.get("access_key_id") {
        let at = time::OffsetDateTime::from_unix_timestamp(now)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        match ca.sessions().open(akid, token, at) {
            Ok(claims) => match shared.store.is_revoked(&claims.serial).await {
                Ok(false) => claims.introspection_json(),
                Ok(true) => herald_cloud_creds::inactive_json(),
                Err(_) => return oauth_plain_error("server_error", "datastore unavailable"),
            },
            Err(_) => herald_cloud_creds::inactive_json(),
        }
    } else {
        match herald_ca::jwt::verify_jwt(token, &ca.bundle.jwt_authorities, now) {
            Some(claims) => {
                let serial = claims
                    .get("jti")
                    .and_then(Value::as_str)
                    .unwrap_or_default();
                match shared.store.is_revoked(serial).await {
                    Ok(false) => {
                        let mut v = Value::Object(claims);
                        v["active"] = Value::Bool(true);
                        v["token_type"] = Value::String("jwt-svid".into());
                        v
                    }
                    Ok(true) => json!({"active": false}),
                    Err(_) => return oauth_plain_error("server_error", "datastore unavailable"),
                }
            }
            None => json!({"active": false}),
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
