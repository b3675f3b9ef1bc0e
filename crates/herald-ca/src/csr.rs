//! PKCS#10 certificate signing requests.
//!
//! Only the CSR's public key is ever used. Its subject and requested
//! extensions are ignored — the SPIFFE ID comes from the grant — except that
//! a request to be a CA is refused outright so a confused or hostile client
//! learns it will never get one.

use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::der_parser::oid;
use x509_parser::extensions::ParsedExtension;
use x509_parser::oid_registry::Oid;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use crate::CaError;

/// Largest CSR accepted, in bytes. A P-256 CSR is ~250 bytes, an RSA-4096 one ~1.6 KiB.
pub const MAX_CSR_LEN: usize = 8 * 1024;

/// A CSR whose self-signature verified, reduced to what issuance needs.
#[derive(Debug, Clone)]
pub struct VerifiedCsr {
    /// The requested key, in the form rcgen signs over.
    pub public_key: rcgen::SubjectPublicKeyInfo,
    /// The DER SubjectPublicKeyInfo.
    pub spki_der: Vec<u8>,
    /// Hex SHA-256 of the DER SubjectPublicKeyInfo.
    pub spki_sha256: String,
}

// Signature algorithms accepted on a CSR: no SHA-1, no MD5.
const ACCEPTED_SIG_ALGS: &[Oid<'static>] = &[
    oid!(1.2.840.10045.4.3.2),   // ecdsa-with-SHA256
    oid!(1.2.840.10045.4.3.3),   // ecdsa-with-SHA384
    oid!(1.3.101.112),           // Ed25519
    oid!(1.2.840.113549.1.1.11), // sha256WithRSAEncryption
    oid!(1.2.840.113549.1.1.12), // sha384WithRSAEncryption
    oid!(1.2.840.113549.1.1.13), // sha512WithRSAEncryption
    oid!(1.2.840.113549.1.1.10), // RSASSA-PSS
];

/// Parses a DER CSR, verifies its self-signature and checks its key.
pub fn verify_csr(der: &[u8]) -> Result<VerifiedCsr, CaError> {
    if der.len() > MAX_CSR_LEN {
        return Err(CaError::CsrMalformed(format!(
            "{} bytes exceeds the {MAX_CSR_LEN}-byte cap",
            der.len()
        )));
    }
    let (rest, csr) = X509CertificationRequest::from_der(der)
        .map_err(|e| CaError::CsrMalformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CaError::CsrMalformed("trailing bytes after the CSR".into()));
    }
    if !ACCEPTED_SIG_ALGS.contains(&csr.signature_algorithm.algorithm) {
        return Err(CaError::CsrSignature(format!(
            "signature algorithm {} is not accepted",
            csr.signature_algorithm.algorithm
        )));
    }
    csr.verify_signature()
        .map_err(|e| CaError::CsrSignature(e.to_string()))?;

    let spki = &csr.certification_request_info.subject_pki;
    match spki.parsed() {
        Ok(PublicKey::EC(point)) if matches!(point.key_size(), 256 | 384) => {}
        Ok(PublicKey::RSA(rsa)) if (2048..=8192).contains(&rsa.key_size()) => {}
        Ok(PublicKey::Unknown(_)) if spki.algorithm.algorithm == oid!(1.3.101.112) => {}
        Ok(other) => {
            return Err(CaError::CsrUnsupportedKey(format!(
                "{} keys of this size are not accepted (P-256, P-384, Ed25519, RSA 2048-8192)",
                key_kind(&other)
            )));
        }
        Err(e) => return Err(CaError::CsrUnsupportedKey(e.to_string())),
    }

    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::BasicConstraints(bc) = ext
                && bc.ca
            {
                return Err(CaError::CsrRequestsCa);
            }
        }
    }

    let spki_der = spki.raw.to_vec();
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(&spki_der)
        .map_err(|e| CaError::CsrUnsupportedKey(e.to_string()))?;
    Ok(VerifiedCsr {
        spki_sha256: crate::sha256_hex(&spki_der),
        public_key,
        spki_der,
    })
}

fn key_kind(k: &PublicKey<'_>) -> &'static str {
    match k {
        PublicKey::RSA(_) => "RSA",
        PublicKey::EC(_) => "EC",
        PublicKey::DSA(_) => "DSA",
        PublicKey::GostR3410(_) | PublicKey::GostR3410_2012(_) => "GOST",
        PublicKey::Unknown(_) => "unknown",
    }
}
