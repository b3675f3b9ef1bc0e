//! Herald's certificate authority.
//!
//! - [`kek`]: the key-encryption key that seals every CA private key at rest.
//! - [`csr`]: PKCS#10 parsing and self-signature verification.
//! - [`authority`]: the trust domain's signing CA (self-generated root, or an
//!   intermediate under an upstream CA) and X.509 SVID issuance per the
//!   X509-SVID standard.
//! - [`jwt`]: JWT-SVIDs and Herald's other ES256 JWTs.
//! - [`bundle`]: the trust bundle as SPIFFE JWKS and PEM.
//! - [`checkpoint`]: signed checkpoints of the audit chain's head.
//! - [`serial`]: credential serial numbers, ordered by issue time.
#![forbid(unsafe_code)]

pub mod authority;
pub mod bundle;
pub mod checkpoint;
pub mod csr;
pub mod jwt;
pub mod kek;
pub mod serial;

pub use authority::{CertificateAuthority, IssuedX509, ServerIdentity, X509Grant};
pub use bundle::TrustBundle;
pub use csr::VerifiedCsr;
pub use jwt::{JwtSigner, JwtSvidClaims};
pub use kek::KeyEncryptionKey;
pub use serial::Serial;

use herald_core::ErrorCode;

/// Errors from the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CSR could not be parsed.
    #[error("malformed CSR: {0}")]
    CsrMalformed(String),
    /// The CSR's self-signature does not verify, or uses a weak algorithm.
    #[error("CSR signature does not verify: {0}")]
    CsrSignature(String),
    /// The CSR asks to be a CA.
    #[error("CSR requests a CA certificate")]
    CsrRequestsCa,
    /// The CSR's key type is not accepted.
    #[error("unsupported CSR key: {0}")]
    CsrUnsupportedKey(String),
    /// Sealing or unsealing a private key failed (wrong KEK, corrupted blob).
    #[error("key encryption: {0}")]
    Kek(String),
    /// Reading a key or certificate file failed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// Certificate generation failed.
    #[error("certificate generation: {0}")]
    Generate(String),
    /// The CA material is unusable (expired, wrong shape).
    #[error("CA material: {0}")]
    Material(String),
}

impl CaError {
    /// The stable error code a caller sees for this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            CaError::CsrMalformed(_) => ErrorCode::CsrMalformed,
            CaError::CsrSignature(_) => ErrorCode::CsrSignatureInvalid,
            CaError::CsrRequestsCa => ErrorCode::CsrRequestsCa,
            CaError::CsrUnsupportedKey(_) => ErrorCode::CsrUnsupportedKey,
            _ => ErrorCode::Internal,
        }
    }
}

impl From<rcgen::Error> for CaError {
    fn from(e: rcgen::Error) -> Self {
        CaError::Generate(e.to_string())
    }
}

/// Hex SHA-256 of `data`.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}
