//! Herald's evidence verifiers.
//!
//! Each verifier turns raw evidence into verified facts or a typed refusal
//! with a stable [`herald_core::ErrorCode`]. Pure Rust: the server never
//! links a TPM stack; I/O is limited to fetching an OIDC issuer's public
//! discovery document and JWKS over HTTPS.
#![forbid(unsafe_code)]

pub mod oidc;
pub mod tpm;

pub use oidc::{OidcError, OidcVerifier, VerifiedToken};
