//! Herald's cloud-style session credentials.
//!
//! - [`session`]: minting `AccessKeyId` / `SecretAccessKey` / `SessionToken`
//!   triples whose session token is sealed (AES-256-GCM, rotating keyring)
//!   and bound to its access key id; opening and introspecting them.
//! - [`sigv4`]: verifying an AWS SigV4-signed request made with such
//!   credentials — signature, token integrity, expiry, clock skew, scope.
//!
//! The design, and what a keyring holder can do, is written down in
//! ARCHITECTURE.md ("Cloud session credentials").
#![forbid(unsafe_code)]

pub mod session;
pub mod sigv4;

pub use session::{MintRequest, SessionClaims, SessionCredentials, SessionKeyring, inactive_json};

/// Why credentials or a signed request were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredsError {
    /// The session token is not in Herald's format.
    #[error("session token malformed")]
    TokenMalformed,
    /// The session token exceeds its size cap.
    #[error("session token too large")]
    TokenTooLarge,
    /// The token was sealed with a key this keyring does not hold (retired or foreign).
    #[error("session token sealed with an unknown key")]
    UnknownKey,
    /// The token does not open for this access key id (tampered, or another key pair's).
    #[error("session token invalid for this access key id")]
    TokenInvalid,
    /// The credentials have expired.
    #[error("credentials expired")]
    Expired,
    /// The `Authorization` header or presigned query is malformed.
    #[error("authorization malformed: {0}")]
    AuthorizationMalformed(String),
    /// A required header or parameter is missing.
    #[error("missing {0}")]
    MissingHeader(String),
    /// A header that must be signed is not.
    #[error("{0} must be signed")]
    HeaderNotSigned(String),
    /// The request time is too far from now.
    #[error("request time outside the allowed clock skew")]
    ClockSkew,
    /// Credential scope (date, region, service) not acceptable.
    #[error("credential scope: {0}")]
    ScopeMismatch(String),
    /// The body does not match `x-amz-content-sha256`.
    #[error("payload hash mismatch")]
    PayloadHashMismatch,
    /// The signature does not match.
    #[error("signature mismatch")]
    SignatureMismatch,
    /// The action or resource is outside the credential's scope.
    #[error("outside the credential's scope")]
    ScopeDenied,
    /// A local failure (random source, bad key material).
    #[error("internal: {0}")]
    Internal(String),
}

impl CredsError {
    /// A stable code, for logs and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            CredsError::TokenMalformed => "session_token_malformed",
            CredsError::TokenTooLarge => "session_token_too_large",
            CredsError::UnknownKey => "session_token_unknown_key",
            CredsError::TokenInvalid => "session_token_invalid",
            CredsError::Expired => "credentials_expired",
            CredsError::AuthorizationMalformed(_) => "authorization_malformed",
            CredsError::MissingHeader(_) => "missing_header",
            CredsError::HeaderNotSigned(_) => "header_not_signed",
            CredsError::ClockSkew => "clock_skew",
            CredsError::ScopeMismatch(_) => "credential_scope_mismatch",
            CredsError::PayloadHashMismatch => "payload_hash_mismatch",
            CredsError::SignatureMismatch => "signature_mismatch",
            CredsError::ScopeDenied => "scope_denied",
            CredsError::Internal(_) => "internal",
        }
    }
}
