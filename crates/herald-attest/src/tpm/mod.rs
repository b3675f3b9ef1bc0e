//! TPM 2.0 evidence, verified in pure Rust (no libtss2 on the server).
//!
//! The checks, in the order the server applies them: the EK certificate
//! chains to a configured manufacturer root ([`verify_ek_certificate`]);
//! the EK public area is the certified key ([`check_ek_public_matches`]);
//! the AK is a restricted signing key that never left the TPM
//! ([`check_attestation_key`]); a software MakeCredential to the EK for
//! the AK's name ([`make_credential`]) comes back activated
//! ([`secret_matches`] / [`check_activated_secret`], constant time); the
//! quote verifies ([`verify_quote`]: signature first, then a strict parse,
//! the signer's qualified name ([`qualified_name_under_ek`]), the nonce
//! bound to the CSR key ([`attestation_nonce_binding`]), the exact PCR
//! selection, the PCR digest recomputed). PCR values against golden sets,
//! counters and bans are policy and registry matters, decided by the
//! server.
//!
//! Structures are the TPM's marshalled forms (big-endian, TPM 2.0 Part 2),
//! as tss-esapi's `marshall()` and tpm2-tools write them; every parser is
//! bounds-checked, refuses trailing bytes and never panics.

mod credential;
mod ek;
mod marshal;
mod public;
mod quote;

pub use credential::{Credential, check_activated_secret, make_credential, secret_matches};
pub use ek::{EkTrust, VerifiedEk, check_ek_public_matches, verify_ek_certificate};
pub use public::{KeyDetail, SymDef, TpmPublic, alg, attributes, check_attestation_key, curve};
pub use quote::{
    PcrBank, PcrSelection, QuoteInput, VerifiedQuote, attestation_nonce_binding,
    qualified_name_under_ek, verify_quote,
};

use herald_core::ErrorCode;

/// A node's TPM evidence after every check of this module passed: the EK
/// certificate chains to the roots of the policies in `trusted_by` (or,
/// for a vTPM without an EK certificate, those policies list the EK's hash
/// — [`ek_hash`]), the AK was activated under that EK, and the quote is
/// over this attestation's nonce and the requested PCRs. Policy decides on
/// it (golden values, firmware, pins); the registry on the counters.
#[derive(Debug, Clone)]
pub struct VerifiedTpm {
    /// Hex SHA-256 of the EK public area: the node's hardware identity.
    pub ek_hash: String,
    /// The AK's TPM name.
    pub ak_name: Vec<u8>,
    /// The EK certificate; `None` when the EK was accepted by its hash
    /// (a vTPM without an EK certificate).
    pub ek: Option<VerifiedEk>,
    /// The verified quote: PCR values, counters, firmware version.
    pub quote: VerifiedQuote,
    /// The TPM policies whose EK roots vouch for this EK: the only
    /// candidates for the decision.
    pub trusted_by: Vec<String>,
}

/// The node's hardware identity: hex SHA-256 of the EK public area as the
/// TPM marshals it (TPMT_PUBLIC). The registry's key, the `ek_hash` claim,
/// and what a policy's `evidence.tpm.ek_hashes` lists for vTPMs without an
/// EK certificate.
pub fn ek_hash(ek_public: &TpmPublic) -> String {
    crate::sha256_hex(ek_public.as_bytes())
}

/// Why TPM evidence was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TpmError {
    /// A structure does not parse strictly.
    #[error("malformed TPM structure: {0}")]
    Malformed(String),
    /// The EK certificate does not chain to a configured root.
    #[error("EK certificate untrusted: {0}")]
    EkCertificateUntrusted(String),
    /// The EK certificate is malformed, expired or not an EK certificate.
    #[error("EK certificate invalid: {0}")]
    EkCertificateInvalid(String),
    /// The EK public area is not the certificate's key.
    #[error("the EK public area does not match the EK certificate")]
    EkPublicMismatch,
    /// The AK is not an acceptable attestation key.
    #[error("attestation key refused: {0}")]
    AkRefused(String),
    /// The AK carries an authorization policy (a non-empty authPolicy, or
    /// adminWithPolicy): refused under the same code as any other AK
    /// refusal, with its own reason.
    #[error("attestation key refused: it carries an authorization policy ({0})")]
    AkPolicyBearing(String),
    /// The activated credential is not the secret that was sealed.
    #[error("the activated credential secret is wrong: the AK is not resident with this EK")]
    CredentialMismatch,
    /// The configured EK trust (roots, intermediates) cannot be loaded.
    #[error("EK trust configuration: {0}")]
    TrustConfig(String),
    /// The quote's signature does not verify.
    #[error("quote signature invalid: {0}")]
    QuoteSignatureInvalid(String),
    /// The quote names another signer.
    #[error("the quote's signer is not the enrolled AK under this EK")]
    QuoteSignerMismatch,
    /// The quote's qualifying data is not this attestation's.
    #[error("the quote is not over this attestation's nonce and key")]
    NonceMismatch,
    /// The quote covers other PCRs.
    #[error("the quote covers another PCR selection than requested")]
    PcrSelectionMismatch,
    /// The reported PCR values do not hash to the quoted digest.
    #[error("the PCR values do not match the quoted PCR digest")]
    PcrDigestMismatch,
    /// Something this verifier does not support (an ECC EK for
    /// MakeCredential, a PCR above 23, an unknown name algorithm).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A cryptographic primitive failed.
    #[error("crypto failure: {0}")]
    Crypto(&'static str),
}

impl TpmError {
    /// The stable code. Messages never carry secrets (seeds, credential
    /// secrets, nonces).
    pub fn code(&self) -> ErrorCode {
        match self {
            TpmError::Malformed(_) | TpmError::Unsupported(_) => ErrorCode::TpmStructureMalformed,
            TpmError::EkCertificateUntrusted(_) => ErrorCode::TpmEkCertificateUntrusted,
            TpmError::EkCertificateInvalid(_) => ErrorCode::TpmEkCertificateInvalid,
            TpmError::EkPublicMismatch => ErrorCode::TpmEkPublicMismatch,
            TpmError::AkRefused(_) | TpmError::AkPolicyBearing(_) => ErrorCode::TpmAkRefused,
            TpmError::CredentialMismatch => ErrorCode::TpmCredentialMismatch,
            TpmError::TrustConfig(_) => ErrorCode::Internal,
            TpmError::QuoteSignatureInvalid(_) => ErrorCode::TpmQuoteSignatureInvalid,
            TpmError::QuoteSignerMismatch => ErrorCode::TpmQuoteSignerMismatch,
            TpmError::NonceMismatch => ErrorCode::TpmNonceMismatch,
            TpmError::PcrSelectionMismatch => ErrorCode::TpmPcrSelectionMismatch,
            TpmError::PcrDigestMismatch => ErrorCode::TpmPcrDigestMismatch,
            TpmError::Crypto(_) => ErrorCode::Internal,
        }
    }
}
