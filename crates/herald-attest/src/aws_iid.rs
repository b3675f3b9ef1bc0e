//! AWS EC2 instance identity documents as a node's evidence.
//!
//! The agent reads, over IMDSv2, `/latest/dynamic/instance-identity/document`
//! and `/latest/dynamic/instance-identity/signature`: the base64 RSA
//! PKCS#1 v1.5 SHA-256 signature over the document's exact bytes, made
//! with the key of the region's AWS "RSA" public certificate. That one is
//! verified here rather than the `rsa2048` PKCS#7 envelope: the document
//! and signature are checked with one RSA verification against a pinned
//! key, with no CMS/PKCS#7 parser on the server (a smaller surface for
//! untrusted input, and no new dependency); both are SHA-256.
//!
//! The certificates are operator-supplied PEM files (AWS publishes one per
//! region) used as pinned public keys: AWS's certificates are self-signed
//! and long-lived, so there is no chain to walk. RSA keys from 1024 to
//! 8192 bits are accepted because that is what AWS's regional "RSA"
//! certificates carry.
//!
//! An identity document is not a one-time credential — IMDS returns the
//! same document for the instance's life — so single use is the node
//! registry's job: an instance enrols once, bound to its agent's key.

use aws_lc_rs::signature::{RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, UnparsedPublicKey};
use base64::Engine;
use herald_core::ErrorCode;
use serde::Deserialize;
use serde_json::{Map, Value};

/// Largest document accepted, bytes (real ones are under 1 KiB).
pub const MAX_DOCUMENT_BYTES: usize = 4 * 1024;
/// Largest base64 signature accepted, bytes.
pub const MAX_SIGNATURE_BYTES: usize = 2 * 1024;

/// Why an identity document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AwsIidError {
    /// The document, its signature or a certificate does not parse.
    #[error("malformed instance identity document: {0}")]
    Malformed(String),
    /// No trusted certificate's key verifies the signature.
    #[error("the signature verifies with none of the trusted AWS certificates")]
    SignatureInvalid,
    /// A configured certificate is unusable.
    #[error("AWS certificate: {0}")]
    Certificate(String),
}

impl AwsIidError {
    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            AwsIidError::Malformed(_) => ErrorCode::AwsIidMalformed,
            AwsIidError::SignatureInvalid => ErrorCode::AwsIidSignatureInvalid,
            AwsIidError::Certificate(_) => ErrorCode::Internal,
        }
    }
}

/// The fields of an instance identity document Herald reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    account_id: String,
    region: String,
    instance_id: String,
    instance_type: String,
    image_id: String,
    availability_zone: String,
    pending_time: String,
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    private_ip: Option<String>,
}

/// A document whose signature verified.
#[derive(Debug, Clone)]
pub struct VerifiedIid {
    /// `accountId`.
    pub account: String,
    /// `region`.
    pub region: String,
    /// `instanceId`.
    pub instance_id: String,
    /// `pendingTime`, Unix seconds: when the instance was launched.
    pub pending_time: i64,
    /// The claims policies see: `account`, `region`, `instance_id`,
    /// `instance_type`, `image_id`, `availability_zone`, `pending_time`
    /// (RFC 3339 as sent), and `architecture`/`private_ip` when present.
    pub claims: Map<String, Value>,
    /// The node's registry key: hex SHA-256 over the account and instance.
    pub node_key: String,
    /// Hex SHA-256 of the document, for the audit record.
    pub digest: String,
}

/// The RSA public key (PKCS#1 `RSAPublicKey`) of a PEM or DER certificate.
pub fn certificate_key(der: &[u8]) -> Result<Vec<u8>, AwsIidError> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| AwsIidError::Certificate(format!("does not parse: {e}")))?;
    let spki = &cert.tbs_certificate.subject_pki;
    if spki.algorithm.algorithm != x509_parser::oid_registry::OID_PKCS1_RSAENCRYPTION {
        return Err(AwsIidError::Certificate("not an RSA certificate".into()));
    }
    Ok(spki.subject_public_key.data.to_vec())
}

/// Parses the document's fields (no signature check): for the agent's own
/// view and for tests.
fn parse(document: &[u8]) -> Result<(Document, i64), AwsIidError> {
    if document.len() > MAX_DOCUMENT_BYTES {
        return Err(AwsIidError::Malformed(format!(
            "document exceeds {MAX_DOCUMENT_BYTES} bytes"
        )));
    }
    let doc: Document = serde_json::from_slice(document)
        .map_err(|e| AwsIidError::Malformed(format!("document: {e}")))?;
    let pending = humantime::parse_rfc3339_weak(&doc.pending_time)
        .map_err(|e| AwsIidError::Malformed(format!("pendingTime: {e}")))?;
    let pending = pending
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| AwsIidError::Malformed("pendingTime before 1970".into()))?
        .as_secs() as i64;
    for (name, v) in [
        ("accountId", &doc.account_id),
        ("region", &doc.region),
        ("instanceId", &doc.instance_id),
    ] {
        if v.is_empty() || v.len() > 64 {
            return Err(AwsIidError::Malformed(format!(
                "{name} is empty or too long"
            )));
        }
    }
    Ok((doc, pending))
}

/// Verifies `signature_b64` over `document` with the RSA keys `keys`
/// ([`certificate_key`]) and returns the document's claims.
pub fn verify(
    keys: &[Vec<u8>],
    document: &[u8],
    signature_b64: &str,
) -> Result<VerifiedIid, AwsIidError> {
    if signature_b64.len() > MAX_SIGNATURE_BYTES {
        return Err(AwsIidError::Malformed("signature too long".into()));
    }
    // IMDS wraps the base64 over lines.
    let compact: String = signature_b64
        .chars()
        .filter(|c| !c.is_ascii_whitespace())
        .collect();
    let signature = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| AwsIidError::Malformed(format!("signature: {e}")))?;
    // The signature first: nothing about an unsigned document is read.
    let signed = keys.iter().any(|k| {
        UnparsedPublicKey::new(&RSA_PKCS1_1024_8192_SHA256_FOR_LEGACY_USE_ONLY, k)
            .verify(document, &signature)
            .is_ok()
    });
    if !signed {
        return Err(AwsIidError::SignatureInvalid);
    }
    let (doc, pending_time) = parse(document)?;
    let mut claims = Map::new();
    for (k, v) in [
        ("account", Some(&doc.account_id)),
        ("region", Some(&doc.region)),
        ("instance_id", Some(&doc.instance_id)),
        ("instance_type", Some(&doc.instance_type)),
        ("image_id", Some(&doc.image_id)),
        ("availability_zone", Some(&doc.availability_zone)),
        ("pending_time", Some(&doc.pending_time)),
        ("architecture", doc.architecture.as_ref()),
        ("private_ip", doc.private_ip.as_ref()),
    ] {
        if let Some(v) = v {
            claims.insert(k.into(), Value::String(v.clone()));
        }
    }
    Ok(VerifiedIid {
        node_key: crate::sha256_hex(
            format!("aws\0{}\0{}", doc.account_id, doc.instance_id).as_bytes(),
        ),
        account: doc.account_id,
        region: doc.region,
        instance_id: doc.instance_id,
        pending_time,
        claims,
        digest: crate::sha256_hex(document),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::{KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};

    const DOC: &str = r#"{"accountId":"123456789012","architecture":"x86_64","availabilityZone":"eu-west-1a","imageId":"ami-0abc","instanceId":"i-0123456789abcdef0","instanceType":"m5.large","pendingTime":"2026-12-01T10:00:00Z","privateIp":"10.0.0.5","region":"eu-west-1","version":"2017-09-30"}"#;

    fn sign(key: &RsaKeyPair, doc: &[u8]) -> String {
        let mut sig = vec![0; key.public_modulus_len()];
        key.sign(
            &RSA_PKCS1_SHA256,
            &aws_lc_rs::rand::SystemRandom::new(),
            doc,
            &mut sig,
        )
        .unwrap();
        base64::engine::general_purpose::STANDARD.encode(sig)
    }

    #[test]
    fn a_signed_document_verifies_and_a_tampered_one_does_not() {
        let key = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let other = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let keys = vec![key.public_key().as_ref().to_vec()];
        let sig = sign(&key, DOC.as_bytes());
        let v = verify(&keys, DOC.as_bytes(), &sig).unwrap();
        assert_eq!(v.account, "123456789012");
        assert_eq!(v.claims["availability_zone"], "eu-west-1a");
        assert_eq!(v.pending_time, 1_796_119_200);
        let tampered = DOC.replace("123456789012", "210987654321");
        assert_eq!(
            verify(&keys, tampered.as_bytes(), &sig).unwrap_err().code(),
            ErrorCode::AwsIidSignatureInvalid
        );
        let foreign = sign(&other, DOC.as_bytes());
        assert_eq!(
            verify(&keys, DOC.as_bytes(), &foreign).unwrap_err().code(),
            ErrorCode::AwsIidSignatureInvalid
        );
        assert_eq!(
            verify(&keys, DOC.as_bytes(), "not base64!")
                .unwrap_err()
                .code(),
            ErrorCode::AwsIidMalformed
        );
        // Signed but not a document.
        let junk = b"{}";
        assert_eq!(
            verify(&keys, junk, &sign(&key, junk)).unwrap_err().code(),
            ErrorCode::AwsIidMalformed
        );
    }
}
