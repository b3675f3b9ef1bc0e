//! Stable error codes.
//!
//! Every refusal Herald makes carries one of these codes: in the gRPC status
//! (metadata `herald-error-code`), in the HTTP error body, in the audit record
//! and in the CLI's one-line error. The string forms are an API: never rename
//! one, only add.

use std::fmt;

/// The broad class of a failure, which decides the transport status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The request itself is malformed.
    InvalidArgument,
    /// The evidence did not authenticate the caller.
    Unauthenticated,
    /// The caller is known but not allowed this.
    PermissionDenied,
    /// The request exceeds a size or rate cap.
    ResourceExhausted,
    /// Something on Herald's side failed.
    Internal,
    /// A dependency (database, issuer) is unavailable; retry later.
    Unavailable,
}

macro_rules! error_codes {
    ($($variant:ident => $code:literal, $class:ident, $doc:literal;)*) => {
        /// A stable, machine-readable reason for a refusal or failure.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum ErrorCode {
            $(#[doc = $doc] $variant,)*
        }

        impl ErrorCode {
            /// Every code, for documentation and exhaustive tests.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant,)*];

            /// The stable string form, e.g. `join_token_used`.
            pub fn as_str(self) -> &'static str {
                match self { $(ErrorCode::$variant => $code,)* }
            }

            /// The class, which decides the gRPC / HTTP status.
            pub fn class(self) -> ErrorClass {
                match self { $(ErrorCode::$variant => ErrorClass::$class,)* }
            }

            /// Parses the stable string form.
            pub fn from_code(s: &str) -> Option<Self> {
                match s { $($code => Some(ErrorCode::$variant),)* _ => None }
            }
        }
    };
}

error_codes! {
    InvalidRequest => "invalid_request", InvalidArgument, "A required field is missing or malformed.";
    RequestTooLarge => "request_too_large", ResourceExhausted, "A field or message exceeds its size cap.";
    JoinTokenMalformed => "join_token_malformed", Unauthenticated, "The join token is not in Herald's token format.";
    JoinTokenUnknown => "join_token_unknown", Unauthenticated, "No such join token.";
    JoinTokenExpired => "join_token_expired", Unauthenticated, "The join token has expired.";
    JoinTokenUsed => "join_token_used", Unauthenticated, "The join token was already used (tokens are single-use).";
    CsrMalformed => "csr_malformed", InvalidArgument, "The CSR is not a parseable PKCS#10 request.";
    CsrSignatureInvalid => "csr_signature_invalid", InvalidArgument, "The CSR's self-signature does not verify.";
    CsrRequestsCa => "csr_requests_ca", PermissionDenied, "The CSR asks for a CA certificate; SVIDs are never CAs.";
    CsrUnsupportedKey => "csr_unsupported_key", InvalidArgument, "The CSR's key type or size is not accepted.";
    MtlsRequired => "mtls_required", Unauthenticated, "The call needs a client certificate (the caller's current SVID).";
    SvidInvalid => "svid_invalid", Unauthenticated, "The presented SVID does not validate against the trust bundle.";
    SvidExpired => "svid_expired", Unauthenticated, "The presented SVID has expired or is not yet valid.";
    SvidRevoked => "svid_revoked", PermissionDenied, "The presented SVID has been revoked.";
    ForeignTrustDomain => "foreign_trust_domain", PermissionDenied, "The presented SVID belongs to another trust domain.";
    RenewSameKey => "renew_same_key", InvalidArgument, "A renewal must use a new key pair.";
    TtlTooLong => "ttl_too_long", InvalidArgument, "The requested lifetime exceeds the cap.";
    NotFound => "not_found", InvalidArgument, "The named object does not exist.";
    StoreUnavailable => "store_unavailable", Unavailable, "The datastore could not be reached or was busy.";
    Internal => "internal", Internal, "An internal error; details are in the server log.";
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ErrorCode::from_code(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown error code {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_roundtrip() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            assert!(seen.insert(code.as_str()), "duplicate {code}");
            assert_eq!(ErrorCode::from_code(code.as_str()), Some(*code));
            assert!(
                code.as_str()
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_')
            );
        }
        assert_eq!(ErrorCode::from_code("nope"), None);
    }
}
