//! Herald's cloud-style session credentials.
//!
//! - [`session`]: minting `AccessKeyId` / `SecretAccessKey` / `SessionToken`
//!   triples whose session token is sealed (AES-256-GCM, rotating keyring)
//!   and bound to its access key id; opening and introspecting them.
//! - [`sigv4`]: verifying an AWS SigV4-signed request (Authorization header
//!   or presigned URL) made with such credentials — signature, token
//!   integrity, expiry, clock skew, credential scope — and then the action
//!   and resource against the scope sealed in the token.
//!
//! The design, and what a keyring holder can do, is written down in this
//! crate's README.md (copied into ARCHITECTURE.md, "Cloud session
//! credentials").
#![forbid(unsafe_code)]

pub mod session;
pub mod sigv4;

pub use session::{MintRequest, SessionClaims, SessionCredentials, SessionKeyring, inactive_json};

/// Why credentials, a keyring operation or a signed request were refused.
///
/// Each variant is one failure reason with its own stable [`code`](Self::code).
/// No variant ever carries a secret, a session token or a signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredsError {
    /// The session token is not in Herald's format (not base64, wrong
    /// version, truncated).
    #[error("session token malformed")]
    TokenMalformed,
    /// The session token exceeds [`session::MAX_TOKEN_CHARS`].
    #[error("session token too large")]
    TokenTooLarge,
    /// The token was sealed with a key this keyring does not hold (retired,
    /// or another Herald's).
    #[error("session token sealed with an unknown key")]
    UnknownKey,
    /// The token does not open for this access key id: tampered, or minted
    /// for another key pair.
    #[error("session token invalid for this access key id")]
    TokenInvalid,
    /// The credentials have expired.
    #[error("credentials expired")]
    Expired,
    /// Neither an `Authorization` header nor presigned query parameters.
    #[error("request is not signed")]
    AuthorizationMissing,
    /// The `Authorization` header or the presigned query parameters are
    /// malformed, or use another algorithm.
    #[error("authorization malformed: {0}")]
    AuthorizationMalformed(String),
    /// The request itself cannot be canonicalized unambiguously.
    #[error("request malformed: {0}")]
    RequestMalformed(String),
    /// A header (or presigned parameter) that must be present is missing.
    #[error("missing {0}")]
    MissingHeader(String),
    /// No `x-amz-security-token` (or `X-Amz-Security-Token` parameter).
    #[error("missing session token")]
    SecurityTokenMissing,
    /// A header that must be signed is not in `SignedHeaders`.
    #[error("{0} must be signed")]
    HeaderNotSigned(String),
    /// The request time is too far from now.
    #[error("request time outside the allowed clock skew")]
    ClockSkew,
    /// A presigned URL used after `X-Amz-Date + X-Amz-Expires`.
    #[error("presigned URL expired")]
    PresignedUrlExpired,
    /// The credential scope's date is not the date of `x-amz-date`.
    #[error("credential scope date differs from the request date")]
    CredentialDateMismatch,
    /// The credential scope's region is not the one this service accepts.
    #[error("region {0} not accepted")]
    RegionNotAllowed(String),
    /// The credential scope's service is not the one this service accepts.
    #[error("service {0} not accepted")]
    ServiceNotAllowed(String),
    /// The body does not match `x-amz-content-sha256`.
    #[error("payload hash mismatch")]
    PayloadHashMismatch,
    /// The signature does not match.
    #[error("signature mismatch")]
    SignatureMismatch,
    /// The action or resource is outside the credential's scope.
    #[error("outside the credential's scope")]
    ScopeDenied,
    /// Keys given to or removed from a keyring are unusable (bad or
    /// duplicate id, active key missing, retiring the active key).
    #[error("invalid keyring: {0}")]
    InvalidKeyring(String),
    /// A mint request that cannot be honoured (expiry not after issuance,
    /// token over its size cap).
    #[error("invalid mint request: {0}")]
    InvalidMintRequest(String),
    /// A local failure (random source, AEAD).
    #[error("internal: {0}")]
    Internal(String),
}

impl CredsError {
    /// A stable code, for logs, metrics and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            CredsError::TokenMalformed => "session_token_malformed",
            CredsError::TokenTooLarge => "session_token_too_large",
            CredsError::UnknownKey => "session_token_unknown_key",
            CredsError::TokenInvalid => "session_token_invalid",
            CredsError::Expired => "credentials_expired",
            CredsError::AuthorizationMissing => "authorization_missing",
            CredsError::AuthorizationMalformed(_) => "authorization_malformed",
            CredsError::RequestMalformed(_) => "request_malformed",
            CredsError::MissingHeader(_) => "missing_header",
            CredsError::SecurityTokenMissing => "security_token_missing",
            CredsError::HeaderNotSigned(_) => "header_not_signed",
            CredsError::ClockSkew => "clock_skew",
            CredsError::PresignedUrlExpired => "presigned_url_expired",
            CredsError::CredentialDateMismatch => "credential_date_mismatch",
            CredsError::RegionNotAllowed(_) => "region_not_allowed",
            CredsError::ServiceNotAllowed(_) => "service_not_allowed",
            CredsError::PayloadHashMismatch => "payload_hash_mismatch",
            CredsError::SignatureMismatch => "signature_mismatch",
            CredsError::ScopeDenied => "scope_denied",
            CredsError::InvalidKeyring(_) => "invalid_keyring",
            CredsError::InvalidMintRequest(_) => "invalid_mint_request",
            CredsError::Internal(_) => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct() {
        let all = [
            CredsError::TokenMalformed,
            CredsError::TokenTooLarge,
            CredsError::UnknownKey,
            CredsError::TokenInvalid,
            CredsError::Expired,
            CredsError::AuthorizationMissing,
            CredsError::AuthorizationMalformed(String::new()),
            CredsError::RequestMalformed(String::new()),
            CredsError::MissingHeader(String::new()),
            CredsError::SecurityTokenMissing,
            CredsError::HeaderNotSigned(String::new()),
            CredsError::ClockSkew,
            CredsError::PresignedUrlExpired,
            CredsError::CredentialDateMismatch,
            CredsError::RegionNotAllowed(String::new()),
            CredsError::ServiceNotAllowed(String::new()),
            CredsError::PayloadHashMismatch,
            CredsError::SignatureMismatch,
            CredsError::ScopeDenied,
            CredsError::InvalidKeyring(String::new()),
            CredsError::InvalidMintRequest(String::new()),
            CredsError::Internal(String::new()),
        ];
        let mut codes: Vec<&str> = all.iter().map(CredsError::code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }
}
