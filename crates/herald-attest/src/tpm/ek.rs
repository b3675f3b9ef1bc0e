//! The EK certificate: it must chain to a configured TPM manufacturer root,
//! and the EK the TPM presents must be the certificate's key.
//!
//! Checked by hand (x509-parser + aws-lc-rs) rather than with a WebPKI
//! verifier: EK certificates have empty or odd subjects, a critical
//! directoryName SAN (TCG manufacturer/model/version) and no server or
//! client usage, which web PKI validators rightly refuse.

use std::path::Path;
use std::time::SystemTime;

use aws_lc_rs::signature::{self, UnparsedPublicKey, VerificationAlgorithm};
use x509_parser::oid_registry::Oid;
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;
use x509_parser::signature_algorithm::SignatureAlgorithm;

use super::TpmError;
use super::public::{KeyDetail, TpmPublic, sec1_point};

/// tcg-kp-EKCertificate (TCG EK Credential Profile).
const TCG_KP_EK_CERTIFICATE: &[u64] = &[2, 23, 133, 8, 1];
/// Most CA certificates walked above the EK certificate.
const MAX_DEPTH: usize = 6;
/// Extensions that may be critical: the ones understood here, plus the TCG
/// ones whose criticality does not change what a verifier must check.
const KNOWN_CRITICAL: &[&[u64]] = &[
    &[2, 5, 29, 9],  // subjectDirectoryAttributes (TPM specification)
    &[2, 5, 29, 14], // subjectKeyIdentifier
    &[2, 5, 29, 15], // keyUsage
    &[2, 5, 29, 17], // subjectAltName (TPM manufacturer/model/version)
    &[2, 5, 29, 19], // basicConstraints
    &[2, 5, 29, 32], // certificatePolicies (any policy accepted)
    &[2, 5, 29, 35], // authorityKeyIdentifier
    &[2, 5, 29, 37], // extKeyUsage
];

fn oid(arcs: &[u64]) -> Option<Oid<'static>> {
    Oid::from(arcs).ok()
}

/// Trusted TPM manufacturer roots and known intermediates, DER.
#[derive(Debug, Clone, Default)]
pub struct EkTrust {
    roots: Vec<Vec<u8>>,
    intermediates: Vec<Vec<u8>>,
}

impl EkTrust {
    /// From DER certificates; each must parse.
    pub fn from_der(roots: &[Vec<u8>], intermediates: &[Vec<u8>]) -> Result<EkTrust, TpmError> {
        for c in roots.iter().chain(intermediates) {
            match X509Certificate::from_der(c) {
                Ok(([], _)) => {}
                Ok(_) => {
                    return Err(invalid("a configured EK CA has trailing bytes"));
                }
                Err(e) => {
                    return Err(invalid(format!("a configured EK CA does not parse: {e}")));
                }
            }
        }
        Ok(EkTrust {
            roots: roots.to_vec(),
            intermediates: intermediates.to_vec(),
        })
    }

    /// From PEM text: every `CERTIFICATE` block of `roots` is a trust anchor,
    /// every one of `intermediates` a known intermediate. Other blocks are
    /// refused.
    pub fn from_pem(roots: &[u8], intermediates: &[u8]) -> Result<EkTrust, TpmError> {
        let roots = pem_certificates(roots)?;
        if roots.is_empty() {
            return Err(TpmError::TrustConfig(
                "no CERTIFICATE block among the EK roots".into(),
            ));
        }
        EkTrust::from_der(&roots, &pem_certificates(intermediates)?)
    }

    /// From PEM files (each may hold several certificates).
    pub fn from_pem_files(
        roots: &[impl AsRef<Path>],
        intermediates: &[impl AsRef<Path>],
    ) -> Result<EkTrust, TpmError> {
        EkTrust::from_pem(&read_all(roots)?, &read_all(intermediates)?)
    }

    /// The number of trust anchors.
    pub fn root_count(&self) -> usize {
        self.roots.len()
    }
}

fn read_all(paths: &[impl AsRef<Path>]) -> Result<Vec<u8>, TpmError> {
    let mut all = Vec::new();
    for p in paths {
        let p = p.as_ref();
        let text = std::fs::read(p)
            .map_err(|e| TpmError::TrustConfig(format!("cannot read {}: {e}", p.display())))?;
        all.extend_from_slice(&text);
        all.push(b'\n');
    }
    Ok(all)
}

fn pem_certificates(text: &[u8]) -> Result<Vec<Vec<u8>>, TpmError> {
    let blocks = ::pem::parse_many(text)
        .map_err(|e| TpmError::TrustConfig(format!("EK CA PEM does not parse: {e}")))?;
    blocks
        .into_iter()
        .map(|b| {
            if b.tag() == "CERTIFICATE" {
                Ok(b.into_contents())
            } else {
                Err(TpmError::TrustConfig(format!(
                    "a {} PEM block among the EK CAs",
                    b.tag()
                )))
            }
        })
        .collect()
}

/// An EK certificate that chains to a trusted root.
#[derive(Debug, Clone)]
pub struct VerifiedEk {
    spki_der: Vec<u8>,
    key: PublicKeyParts,
    subject: String,
    issuer: String,
    serial_hex: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PublicKeyParts {
    Rsa { modulus: Vec<u8>, exponent: u32 },
    Ec { point: Vec<u8> },
}

impl VerifiedEk {
    /// The certificate's SubjectPublicKeyInfo, DER.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }
    /// Subject DN (often `CN=unknown` or empty for EK certificates).
    pub fn subject(&self) -> &str {
        &self.subject
    }
    /// Issuer DN.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
    /// Serial number, lowercase hex.
    pub fn serial_hex(&self) -> &str {
        &self.serial_hex
    }
}

fn invalid(msg: impl Into<String>) -> TpmError {
    TpmError::EkCertificateInvalid(msg.into())
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    b.get(first..).unwrap_or_default()
}

fn key_parts(cert: &X509Certificate<'_>) -> Result<PublicKeyParts, TpmError> {
    match cert.public_key().parsed() {
        Ok(PublicKey::RSA(k)) => {
            let e = strip_zeros(k.exponent);
            if e.len() > 4 {
                return Err(invalid("RSA exponent too large"));
            }
            let exponent = e.iter().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
            Ok(PublicKeyParts::Rsa {
                modulus: strip_zeros(k.modulus).to_vec(),
                exponent,
            })
        }
        Ok(PublicKey::EC(p)) => Ok(PublicKeyParts::Ec {
            point: p.data().to_vec(),
        }),
        _ => Err(invalid("the EK certificate's key is neither RSA nor EC")),
    }
}

fn parse_all(ders: &[Vec<u8>]) -> Vec<X509Certificate<'_>> {
    ders.iter()
        .filter_map(|d| X509Certificate::from_der(d).ok().map(|(_, c)| c))
        .collect()
}

fn is_valid_at(cert: &X509Certificate<'_>, now: i64) -> bool {
    let v = cert.validity();
    v.not_before.timestamp() <= now && now <= v.not_after.timestamp()
}

/// Refuses critical extensions this verifier does not understand and
/// critical extensions that do not parse (RFC 5280 §4.2).
fn check_critical_extensions(cert: &X509Certificate<'_>) -> Result<(), String> {
    for ext in cert.extensions().iter().filter(|e| e.critical) {
        let known = KNOWN_CRITICAL
            .iter()
            .any(|arcs| oid(arcs).is_some_and(|o| o == ext.oid));
        if !known {
            return Err(format!("unknown critical extension {}", ext.oid));
        }
        if let ParsedExtension::ParseError { .. } = ext.parsed_extension() {
            return Err(format!("critical extension {} does not parse", ext.oid));
        }
    }
    Ok(())
}

/// The verification algorithm for `child`'s signature made with `issuer`'s key.
fn signature_alg(
    child: &X509Certificate<'_>,
    issuer: &X509Certificate<'_>,
) -> Option<&'static dyn VerificationAlgorithm> {
    // The signed and unsigned algorithm identifiers must agree.
    if child.tbs_certificate.signature != child.signature_algorithm {
        return None;
    }
    let key = issuer.public_key().parsed().ok()?;
    let sig_oid = child.signature_algorithm.algorithm.to_id_string();
    match (
        SignatureAlgorithm::try_from(&child.signature_algorithm).ok()?,
        key,
    ) {
        (SignatureAlgorithm::RSA, PublicKey::RSA(_)) => match sig_oid.as_str() {
            "1.2.840.113549.1.1.11" => Some(&signature::RSA_PKCS1_2048_8192_SHA256),
            "1.2.840.113549.1.1.12" => Some(&signature::RSA_PKCS1_2048_8192_SHA384),
            "1.2.840.113549.1.1.13" => Some(&signature::RSA_PKCS1_2048_8192_SHA512),
            _ => None, // SHA-1 and MD5 are refused
        },
        (SignatureAlgorithm::RSASSA_PSS(params), PublicKey::RSA(_)) => {
            let hash = params.hash_algorithm_oid().to_id_string();
            let mgf = params.mask_gen_algorithm().ok()?;
            let salt = params.salt_length();
            // aws-lc-rs verifies PSS with MGF1 over the same hash and a salt
            // of the hash's length, the only profile EK CAs use.
            if mgf.mgf.to_id_string() != "1.2.840.113549.1.1.8" || mgf.hash.to_id_string() != hash {
                return None;
            }
            match (hash.as_str(), salt) {
                ("2.16.840.1.101.3.4.2.1", 32) => Some(&signature::RSA_PSS_2048_8192_SHA256),
                ("2.16.840.1.101.3.4.2.2", 48) => Some(&signature::RSA_PSS_2048_8192_SHA384),
                ("2.16.840.1.101.3.4.2.3", 64) => Some(&signature::RSA_PSS_2048_8192_SHA512),
                _ => None,
            }
        }
        (SignatureAlgorithm::ECDSA, PublicKey::EC(p)) => match (sig_oid.as_str(), p.key_size()) {
            ("1.2.840.10045.4.3.2", 256) => Some(&signature::ECDSA_P256_SHA256_ASN1),
            ("1.2.840.10045.4.3.3", 256) => Some(&signature::ECDSA_P256_SHA384_ASN1),
            ("1.2.840.10045.4.3.2", 384) => Some(&signature::ECDSA_P384_SHA256_ASN1),
            ("1.2.840.10045.4.3.3", 384) => Some(&signature::ECDSA_P384_SHA384_ASN1),
            ("1.2.840.10045.4.3.4", 384) => Some(&signature::ECDSA_P384_SHA512_ASN1),
            ("1.2.840.10045.4.3.4", 521) => Some(&signature::ECDSA_P521_SHA512_ASN1),
            _ => None,
        },
        _ => None,
    }
}

/// Verifies `child`'s signature with `issuer`'s key.
fn signed_by(child: &X509Certificate<'_>, issuer: &X509Certificate<'_>) -> bool {
    let Some(alg) = signature_alg(child, issuer) else {
        return false;
    };
    let issuer_key = &issuer.public_key().subject_public_key.data;
    UnparsedPublicKey::new(alg, issuer_key.as_ref())
        .verify(child.tbs_certificate.as_ref(), &child.signature_value.data)
        .is_ok()
}

/// Whether `ca` may issue a certificate `below` CA certificates above the
/// EK certificate (0 for the EK certificate's own issuer): basicConstraints
/// cA, keyCertSign when keyUsage is present, pathLenConstraint respected,
/// no unknown critical extension.
fn may_issue(ca: &X509Certificate<'_>, below: usize) -> bool {
    let ca_ok = match ca.basic_constraints() {
        Ok(Some(bc)) => {
            bc.value.ca
                && bc
                    .value
                    .path_len_constraint
                    .is_none_or(|n| usize::try_from(n).is_ok_and(|n| below <= n))
        }
        _ => false,
    };
    let ku_ok = match ca.key_usage() {
        Ok(Some(ku)) => ku.value.key_cert_sign(),
        Ok(None) => true,
        Err(_) => false,
    };
    ca_ok && ku_ok && check_critical_extensions(ca).is_ok()
}

/// Verifies that `ek_cert_der` chains to a root in `trust` (through its
/// intermediates or `presented` ones the agent sent; unparseable presented
/// certificates are ignored): every signature verifies (RSA PKCS#1 v1.5 or
/// PSS with SHA-256/384/512, ECDSA P-256/P-384/P-521), every certificate on
/// the path is valid at `now`, every issuer is a CA allowed to sign
/// certificates, no certificate has an unknown critical extension (the EK
/// certificate's critical SAN is known), and the EK certificate is not a
/// CA and, if it has an extended key usage, names tcg-kp-EKCertificate
/// (2.23.133.8.1).
pub fn verify_ek_certificate(
    trust: &EkTrust,
    ek_cert_der: &[u8],
    presented: &[Vec<u8>],
    now: SystemTime,
) -> Result<VerifiedEk, TpmError> {
    let now = match now.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
    };
    let (rest, leaf) = X509Certificate::from_der(ek_cert_der)
        .map_err(|e| invalid(format!("the EK certificate does not parse: {e}")))?;
    if !rest.is_empty() {
        return Err(invalid("trailing bytes after the EK certificate"));
    }
    if !is_valid_at(&leaf, now) {
        return Err(invalid("the EK certificate is expired or not yet valid"));
    }
    check_critical_extensions(&leaf).map_err(invalid)?;
    match leaf.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {
            return Err(invalid("the EK certificate is a CA certificate"));
        }
        Ok(_) => {}
        Err(e) => return Err(invalid(format!("basicConstraints: {e}"))),
    }
    match leaf.extended_key_usage() {
        Ok(Some(eku)) => {
            let ek_oid = oid(TCG_KP_EK_CERTIFICATE).ok_or_else(|| invalid("OID"))?;
            if !eku.value.other.contains(&ek_oid) {
                return Err(invalid(
                    "the certificate's extended key usage lacks tcg-kp-EKCertificate (2.23.133.8.1)",
                ));
            }
        }
        Ok(None) => {}
        Err(e) => return Err(invalid(format!("extendedKeyUsage: {e}"))),
    }
    let key = key_parts(&leaf)?;

    let roots = parse_all(&trust.roots);
    let mut inters = parse_all(&trust.intermediates);
    inters.extend(parse_all(presented));
    let mut used = vec![false; inters.len()];

    let mut current = &leaf;
    for depth in 0..=MAX_DEPTH {
        let anchored = roots.iter().any(|r| {
            r.subject() == current.issuer()
                && is_valid_at(r, now)
                && may_issue(r, depth)
                && signed_by(current, r)
        });
        if anchored {
            return Ok(VerifiedEk {
                spki_der: leaf.public_key().raw.to_vec(),
                key,
                subject: leaf.subject().to_string(),
                issuer: leaf.issuer().to_string(),
                serial_hex: hex::encode(leaf.raw_serial()),
            });
        }
        let next = inters.iter().enumerate().find(|(i, c)| {
            !used.get(*i).copied().unwrap_or(true)
                && c.subject() == current.issuer()
                && is_valid_at(c, now)
                && may_issue(c, depth)
                && signed_by(current, c)
        });
        match next {
            Some((i, c)) => {
                if let Some(u) = used.get_mut(i) {
                    *u = true;
                }
                current = c;
            }
            None => break,
        }
    }
    Err(TpmError::EkCertificateUntrusted(format!(
        "the EK certificate (issuer {}) does not chain to a configured manufacturer root",
        leaf.issuer()
    )))
}

/// Checks that the EK public area the TPM presented is the certified key:
/// same RSA modulus and exponent, or same ECC point.
pub fn check_ek_public_matches(ek: &TpmPublic, cert: &VerifiedEk) -> Result<(), TpmError> {
    let same = match (&ek.detail, &cert.key) {
        (
            KeyDetail::Rsa {
                modulus, exponent, ..
            },
            PublicKeyParts::Rsa {
                modulus: m,
                exponent: e,
            },
        ) => strip_zeros(modulus) == m.as_slice() && exponent == e,
        (KeyDetail::Ecc { .. }, PublicKeyParts::Ec { point }) => {
            let mut buf = [0u8; 133];
            sec1_point(ek, &mut buf)
                .and_then(|n| buf.get(..n))
                .is_some_and(|p| p == point.as_slice())
        }
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(TpmError::EkPublicMismatch)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::tpm::public::{alg, curve};
    use herald_core::ErrorCode;
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, CustomExtension, DistinguishedName,
        DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, date_time_ymd,
    };

    type Ca = CertifiedIssuer<'static, KeyPair>;
    type Edit = Box<dyn Fn(&mut CertificateParams)>;

    fn der(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag, content.len() as u8];
        out.extend_from_slice(content);
        out
    }

    /// The TCG SAN: directoryName { tpmManufacturer = "id:00001014" }.
    fn tcg_san() -> CustomExtension {
        let mut atv = der(0x06, &[0x67, 0x81, 0x05, 0x02, 0x01]);
        atv.extend(der(0x0c, b"id:00001014"));
        let name = der(0x30, &der(0x31, &der(0x30, &atv)));
        let mut ext =
            CustomExtension::from_oid_content(&[2, 5, 29, 17], der(0x30, &der(0xa4, &name)));
        ext.set_criticality(true);
        ext
    }

    fn named(cn: &str) -> CertificateParams {
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, cn);
        p.not_before = date_time_ymd(2020, 1, 1);
        p.not_after = date_time_ymd(2099, 1, 1);
        p
    }

    fn ca_params(cn: &str, path_len: Option<u8>) -> CertificateParams {
        let mut p = named(cn);
        p.is_ca = IsCa::Ca(match path_len {
            Some(n) => BasicConstraints::Constrained(n),
            None => BasicConstraints::Unconstrained,
        });
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p
    }

    fn root(p: CertificateParams) -> Ca {
        CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
    }

    fn inter(p: CertificateParams, parent: &Ca) -> Ca {
        CertifiedIssuer::signed_by(p, KeyPair::generate().unwrap(), parent).unwrap()
    }

    /// An EK certificate as TPM vendors make them: empty subject, critical
    /// TCG SAN, EKU tcg-kp-EKCertificate, CA:FALSE.
    fn ek_params() -> CertificateParams {
        let mut p = named("x");
        p.distinguished_name = DistinguishedName::new();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::Other(vec![2, 23, 133, 8, 1])];
        p.custom_extensions = vec![tcg_san()];
        p
    }

    fn leaf(p: CertificateParams, key: &KeyPair, issuer: &Ca) -> Vec<u8> {
        p.signed_by(key, issuer).unwrap().der().to_vec()
    }

    fn now() -> SystemTime {
        SystemTime::now()
    }

    fn trust(roots: &[&Ca], inters: &[&Ca]) -> EkTrust {
        let d = |v: &[&Ca]| v.iter().map(|c| c.der().to_vec()).collect::<Vec<_>>();
        EkTrust::from_der(&d(roots), &d(inters)).unwrap()
    }

    fn err(t: &EkTrust, cert: &[u8], presented: &[Vec<u8>]) -> ErrorCode {
        verify_ek_certificate(t, cert, presented, now())
            .unwrap_err()
            .code()
    }

    /// The ECC TPMT_PUBLIC for an uncompressed P-256 point.
    fn ecc_public(point: &[u8]) -> TpmPublic {
        let mut b = Vec::new();
        for v in [alg::ECC, alg::SHA256] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        b.extend_from_slice(&0x0003_00b2u32.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        for v in [
            alg::AES,
            128,
            alg::CFB,
            alg::NULL,
            curve::NIST_P256,
            alg::NULL,
        ] {
            b.extend_from_slice(&v.to_be_bytes());
        }
        for c in [&point[1..33], &point[33..65]] {
            b.extend_from_slice(&32u16.to_be_bytes());
            b.extend_from_slice(c);
        }
        TpmPublic::parse(&b).unwrap()
    }

    #[test]
    fn a_vendor_shaped_chain_verifies_and_the_key_matches() {
        let r = root(ca_params("Vendor Root", None));
        let i = inter(ca_params("Vendor EK CA", Some(0)), &r);
        let key = KeyPair::generate().unwrap();
        let cert = leaf(ek_params(), &key, &i);
        let ek = verify_ek_certificate(&trust(&[&r], &[&i]), &cert, &[], now()).unwrap();
        assert_eq!(ek.subject(), "");
        assert_eq!(ek.issuer(), "CN=Vendor EK CA");
        check_ek_public_matches(&ecc_public(key.public_key_raw()), &ek).unwrap();
        let other = KeyPair::generate().unwrap();
        assert_eq!(
            check_ek_public_matches(&ecc_public(other.public_key_raw()), &ek).unwrap_err(),
            TpmError::EkPublicMismatch
        );
        // The agent may present the intermediate instead.
        verify_ek_certificate(&trust(&[&r], &[]), &cert, &[i.der().to_vec()], now()).unwrap();
        // Any configured certificate is an anchor, an intermediate too.
        verify_ek_certificate(&trust(&[&i], &[]), &cert, &[], now()).unwrap();
        // Without the intermediate, the root alone does not reach the EK.
        assert_eq!(
            err(&trust(&[&r], &[]), &cert, &[]),
            ErrorCode::TpmEkCertificateUntrusted
        );
        // PEM loading gives the same trust.
        let t = EkTrust::from_pem(r.pem().as_bytes(), i.pem().as_bytes()).unwrap();
        assert_eq!(t.root_count(), 1);
        verify_ek_certificate(&t, &cert, &[], now()).unwrap();
        assert_eq!(
            EkTrust::from_pem(key.serialize_pem().as_bytes(), b"")
                .unwrap_err()
                .code(),
            ErrorCode::Internal
        );
        assert!(EkTrust::from_pem(b"", b"").is_err());
    }

    #[test]
    fn leaf_problems_are_invalid() {
        let r = root(ca_params("Root", None));
        let t = trust(&[&r], &[]);
        let key = KeyPair::generate().unwrap();
        verify_ek_certificate(&t, &leaf(ek_params(), &key, &r), &[], now()).unwrap();
        // No EKU at all is accepted (older EK certificates have none).
        let mut p = ek_params();
        p.extended_key_usages.clear();
        verify_ek_certificate(&t, &leaf(p, &key, &r), &[], now()).unwrap();

        let cases: Vec<(&str, Edit)> = vec![
            (
                "server EKU",
                Box::new(|p| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth]),
            ),
            (
                "expired",
                Box::new(|p| {
                    p.not_before = date_time_ymd(2001, 1, 1);
                    p.not_after = date_time_ymd(2002, 1, 1);
                }),
            ),
            (
                "not yet valid",
                Box::new(|p| p.not_before = date_time_ymd(2098, 1, 1)),
            ),
            (
                "a CA",
                Box::new(|p| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
            ),
            (
                "unknown critical extension",
                Box::new(|p| {
                    let mut e = CustomExtension::from_oid_content(&[1, 2, 3, 4], vec![5, 0]);
                    e.set_criticality(true);
                    p.custom_extensions.push(e);
                }),
            ),
        ];
        for (what, edit) in cases {
            let mut p = ek_params();
            edit(&mut p);
            assert_eq!(
                err(&t, &leaf(p, &key, &r), &[]),
                ErrorCode::TpmEkCertificateInvalid,
                "{what}"
            );
        }
        let good = leaf(ek_params(), &key, &r);
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(err(&t, &trailing, &[]), ErrorCode::TpmEkCertificateInvalid);
        for n in 0..good.len() {
            assert!(verify_ek_certificate(&t, &good[..n], &[], now()).is_err());
        }
        let mut forged = good.clone();
        let at = forged.len() - 10;
        forged[at] ^= 1;
        assert_eq!(err(&t, &forged, &[]), ErrorCode::TpmEkCertificateUntrusted);
    }

    #[test]
    fn issuer_problems_are_untrusted() {
        let r = root(ca_params("Root", None));
        let key = KeyPair::generate().unwrap();
        let cases: Vec<(&str, Edit)> = vec![
            ("not a CA", Box::new(|p| p.is_ca = IsCa::ExplicitNoCa)),
            ("no basicConstraints", Box::new(|p| p.is_ca = IsCa::NoCa)),
            (
                "no keyCertSign",
                Box::new(|p| p.key_usages = vec![KeyUsagePurpose::DigitalSignature]),
            ),
            (
                "expired",
                Box::new(|p| {
                    p.not_before = date_time_ymd(2001, 1, 1);
                    p.not_after = date_time_ymd(2002, 1, 1);
                }),
            ),
        ];
        for (what, edit) in cases {
            let mut p = ca_params("EK CA", None);
            edit(&mut p);
            let i = inter(p, &r);
            let cert = leaf(ek_params(), &key, &i);
            assert_eq!(
                err(&trust(&[&r], &[&i]), &cert, &[]),
                ErrorCode::TpmEkCertificateUntrusted,
                "{what}"
            );
        }
        // pathLenConstraint 0 on the root forbids an intermediate.
        let strict = root(ca_params("Strict Root", Some(0)));
        let i = inter(ca_params("EK CA", None), &strict);
        let cert = leaf(ek_params(), &key, &i);
        assert_eq!(
            err(&trust(&[&strict], &[&i]), &cert, &[]),
            ErrorCode::TpmEkCertificateUntrusted
        );
        let direct = leaf(ek_params(), &key, &strict);
        verify_ek_certificate(&trust(&[&strict], &[]), &direct, &[], now()).unwrap();
        // Same issuer name, another key: the signature decides.
        let impostor = root(ca_params("Root", None));
        let cert = leaf(ek_params(), &key, &impostor);
        assert_eq!(
            err(&trust(&[&r], &[]), &cert, &[]),
            ErrorCode::TpmEkCertificateUntrusted
        );
        // An expired root is no anchor.
        let mut p = ca_params("Old Root", None);
        p.not_after = date_time_ymd(2002, 1, 1);
        let old = root(p);
        let cert = leaf(ek_params(), &key, &old);
        assert_eq!(
            err(&trust(&[&old], &[]), &cert, &[]),
            ErrorCode::TpmEkCertificateUntrusted
        );
    }

    #[test]
    fn long_and_looping_chains_end() {
        let r = root(ca_params("Root", None));
        let mut chain = vec![inter(ca_params("CA 0", None), &r)];
        for n in 1..10 {
            let next = inter(ca_params(&format!("CA {n}"), None), &chain[n - 1]);
            chain.push(next);
        }
        let key = KeyPair::generate().unwrap();
        let presented: Vec<Vec<u8>> = chain.iter().map(|c| c.der().to_vec()).collect();
        // Within the depth limit.
        let cert = leaf(ek_params(), &key, &chain[3]);
        verify_ek_certificate(&trust(&[&r], &[]), &cert, &presented, now()).unwrap();
        // Beyond it.
        let cert = leaf(ek_params(), &key, &chain[9]);
        assert_eq!(
            err(&trust(&[&r], &[]), &cert, &presented),
            ErrorCode::TpmEkCertificateUntrusted
        );
        // Two CAs that certify each other, with no root: terminates.
        let a_key = KeyPair::generate().unwrap();
        let b_key = KeyPair::generate().unwrap();
        let a_params = ca_params("A", None);
        let b_params = ca_params("B", None);
        let a_issuer = rcgen::Issuer::from_params(&a_params, &a_key);
        let b_issuer = rcgen::Issuer::from_params(&b_params, &b_key);
        let a_by_b = a_params.signed_by(&a_key, &b_issuer).unwrap();
        let b_by_a = b_params.signed_by(&b_key, &a_issuer).unwrap();
        let cert = ek_params().signed_by(&key, &a_issuer).unwrap();
        assert_eq!(
            err(
                &trust(&[&r], &[]),
                cert.der(),
                &[a_by_b.der().to_vec(), b_by_a.der().to_vec()]
            ),
            ErrorCode::TpmEkCertificateUntrusted
        );
        // Garbage among the presented certificates is ignored.
        let cert = leaf(ek_params(), &key, &chain[0]);
        verify_ek_certificate(
            &trust(&[&r], &[]),
            &cert,
            &[vec![0x30, 0x03, 1, 2, 3], presented[0].clone()],
            now(),
        )
        .unwrap();
    }
}
