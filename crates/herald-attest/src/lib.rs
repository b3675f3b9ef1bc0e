//! Herald's evidence verifiers.
//!
//! Each verifier turns raw evidence into a verified type or a typed refusal
//! with a stable [`herald_core::ErrorCode`]:
//!
//! - [`oidc`]: OIDC ID tokens from explicitly configured issuers →
//!   [`VerifiedToken`];
//! - [`tpm`]: TPM 2.0 EK certificates, credential activation and quotes;
//! - [`join_token`]: one-time join tokens, by purpose → [`VerifiedJoinToken`];
//! - [`node_token`]: a verified platform OIDC token (Kubernetes projected
//!   service-account token, GCP instance identity) → the node it names,
//!   [`VerifiedNodeToken`];
//! - [`aws_iid`]: AWS EC2 instance identity documents against pinned
//!   regional certificates → [`VerifiedIid`];
//! - [`svid`]: X.509 SVIDs presented by their holders, against Herald's
//!   record of them and their lineage → [`VerifiedSvid`].
//!
//! Herald's policies decide on these types only. Pure Rust: the server
//! never links a TPM stack; I/O is limited to fetching an OIDC issuer's
//! public discovery document and JWKS over HTTPS (records are looked up by
//! the caller and handed in).
#![forbid(unsafe_code)]

pub mod aws_iid;
pub mod http_fetch;
pub mod join_token;
pub mod node_token;
pub mod oidc;
pub mod svid;
pub mod tpm;

pub use aws_iid::{AwsIidError, VerifiedIid};
pub use join_token::{JoinTokenError, TokenUse, VerifiedJoinToken};
pub use node_token::{NodeTokenError, Platform, VerifiedNodeToken};
pub use oidc::{OidcError, OidcVerifier, VerifiedToken};
pub use svid::{PresentedSvid, SvidError, SvidInfo, VerifiedSvid};

/// Lowercase hex SHA-256.
pub(crate) fn sha256_hex(data: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data))
}
