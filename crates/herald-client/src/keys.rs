//! Local key generation and CSRs. Private keys never leave this process
//! except to the files the caller asks for.

use rcgen::{CertificateParams, DistinguishedName, KeyPair, PKCS_ECDSA_P256_SHA256};

use crate::ClientError;

/// A new P-256 key and a CSR for it.
pub struct KeyAndCsr {
    /// PKCS#8 DER of the private key.
    pub key_pkcs8: Vec<u8>,
    /// DER CSR (empty subject; the server assigns the SPIFFE ID).
    pub csr_der: Vec<u8>,
}

/// Generates a P-256 key and its CSR.
pub fn generate_key_and_csr() -> Result<KeyAndCsr, ClientError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ClientError::Input(e.to_string()))?;
    csr_for(key)
}

/// A new CSR for an existing P-256 key (PKCS#8 DER): a key that must stay
/// the same across attestations, such as an AWS node agent's enrolment key.
pub fn csr_for_key(key_pkcs8: &[u8]) -> Result<KeyAndCsr, ClientError> {
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from(key_pkcs8);
    let key = KeyPair::from_pkcs8_der_and_sign_algo(&der, &PKCS_ECDSA_P256_SHA256)
        .map_err(|e| ClientError::Input(e.to_string()))?;
    csr_for(key)
}

fn csr_for(key: KeyPair) -> Result<KeyAndCsr, ClientError> {
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| ClientError::Input(e.to_string()))?;
    params.distinguished_name = DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| ClientError::Input(e.to_string()))?;
    Ok(KeyAndCsr {
        key_pkcs8: key.serialize_der(),
        csr_der: csr.der().to_vec(),
    })
}
