//! Presented X.509 SVIDs: the evidence of a caller that already holds one.
//!
//! [`parse_x509_svid`] applies the X509-SVID rules to a leaf on its own;
//! [`verify_x509_svid`] adds the trust-domain check and RFC 5280 path
//! validation (rustls-webpki) against a set of trust anchors.
//!
//! A credential Herald issued is verified by [`PresentedSvid`]: the leaf is
//! parsed and checked against the rules, the trust domain and its validity
//! window first (no crypto), then against Herald's record of its serial —
//! the same SPIFFE ID, key and issuing CA key — and is either the very
//! certificate the record's digest names or one whose signature verifies
//! against that CA key alone (never only an upstream root, which other CAs
//! may share), and finally the lineage's standing (revoked, banned node).
//! What comes out, [`VerifiedSvid`], is what policy decides on.

use herald_core::{CredentialStatus, ErrorCode, Origin, SpiffeId, TrustDomain};
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::sha256_hex;

/// Why a presented certificate is not an acceptable X.509 SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    /// Not parseable as X.509.
    #[error("not an X.509 certificate: {0}")]
    Malformed(String),
    /// Parseable but breaks an X509-SVID rule.
    #[error("not an X509-SVID: {0}")]
    NotAnSvid(String),
    /// Outside its validity window.
    #[error("the SVID has expired or is not yet valid")]
    Expired,
    /// Issued for another trust domain.
    #[error("the SVID belongs to trust domain {0}")]
    ForeignTrustDomain(String),
    /// Does not chain to the trust bundle.
    #[error("the SVID does not chain to the trust bundle: {0}")]
    Untrusted(String),
    /// Herald has no record of the serial: not issued here.
    #[error("the presented SVID was not issued by this server")]
    NotIssuedHere,
    /// The certificate differs from Herald's record of its serial.
    #[error("the presented SVID does not match its issuance record: {0}")]
    RecordMismatch(&'static str),
    /// It, or a credential it descends from, has been revoked.
    #[error("the presented SVID has been revoked")]
    Revoked,
    /// Its lineage belongs to a banned node.
    #[error("the node is banned")]
    NodeBanned,
}

impl SvidError {
    /// The stable error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            SvidError::Expired => ErrorCode::SvidExpired,
            SvidError::ForeignTrustDomain(_) => ErrorCode::ForeignTrustDomain,
            SvidError::RecordMismatch(_) => ErrorCode::SvidRecordMismatch,
            SvidError::Revoked => ErrorCode::SvidRevoked,
            SvidError::NodeBanned => ErrorCode::NodeBanned,
            _ => ErrorCode::SvidInvalid,
        }
    }
}

/// What Herald reads from an X.509 SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidInfo {
    /// The SPIFFE ID from the single URI SAN.
    pub spiffe_id: SpiffeId,
    /// Serial number, lowercase hex (minimal big-endian, no sign byte).
    pub serial_hex: String,
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// Hex SHA-256 of the SubjectPublicKeyInfo.
    pub spki_sha256: String,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// Hex SHA-256 of the whole certificate.
    pub cert_sha256: String,
}

/// Serial number bytes as lowercase hex without a DER sign byte.
fn serial_hex(cert: &X509Certificate<'_>) -> String {
    let raw = cert.raw_serial();
    let trimmed = match raw {
        [0, rest @ ..] if !rest.is_empty() => rest,
        _ => raw,
    };
    hex::encode(trimmed)
}

/// Parses a leaf and checks the X509-SVID leaf rules (no chain, no time).
pub fn parse_x509_svid(der: &[u8]) -> Result<SvidInfo, SvidError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SvidError::Malformed("trailing bytes".into()));
    }
    let not_svid = |s: &str| SvidError::NotAnSvid(s.to_owned());
    let san = cert
        .subject_alternative_name()
        .map_err(|e| SvidError::Malformed(e.to_string()))?
        .ok_or_else(|| not_svid("no subjectAltName"))?;
    let mut uris = Vec::new();
    let mut dns_names = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(u) => uris.push(*u),
            GeneralName::DNSName(d) => dns_names.push((*d).to_owned()),
            _ => {}
        }
    }
    let [uri] = uris.as_slice() else {
        return Err(not_svid("an X509-SVID has exactly one URI SAN"));
    };
    let spiffe_id =
        SpiffeId::parse(uri).map_err(|e| SvidError::NotAnSvid(format!("URI SAN: {e}")))?;
    if spiffe_id.path().is_empty() {
        return Err(not_svid("a leaf SVID's SPIFFE ID must have a path"));
    }
    let bc = cert
        .basic_constraints()
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(not_svid("a leaf SVID must have cA=false"));
    }
    let ku = cert
        .key_usage()
        .map_err(|e| SvidError::Malformed(e.to_string()))?
        .ok_or_else(|| not_svid("keyUsage is required"))?;
    if !ku.value.digital_signature() {
        return Err(not_svid("keyUsage must include digitalSignature"));
    }
    if ku.value.key_cert_sign() || ku.value.crl_sign() {
        return Err(not_svid("a leaf SVID must not have keyCertSign or cRLSign"));
    }
    Ok(SvidInfo {
        spiffe_id,
        serial_hex: serial_hex(&cert),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        spki_sha256: sha256_hex(cert.public_key().raw),
        issuer: cert.issuer().to_string(),
        dns_names,
        cert_sha256: sha256_hex(der),
    })
}

/// Verifies a presented chain (leaf first) as an X.509 SVID of `trust_domain`
/// for client authentication, against `anchors` (DER), at Unix time `now`.
pub fn verify_x509_svid(
    chain: &[Vec<u8>],
    anchors: &[Vec<u8>],
    trust_domain: &TrustDomain,
    now: i64,
) -> Result<SvidInfo, SvidError> {
    let (leaf, info) = parse_leaf(chain, trust_domain)?;
    verify_path(leaf, &chain[1..], anchors, now)?;
    Ok(info)
}

/// The chain's leaf and what it says, if it is an X509-SVID of `trust_domain`.
fn parse_leaf<'c>(
    chain: &'c [Vec<u8>],
    trust_domain: &TrustDomain,
) -> Result<(&'c Vec<u8>, SvidInfo), SvidError> {
    let leaf = chain
        .first()
        .ok_or_else(|| SvidError::Malformed("empty certificate chain".into()))?;
    let info = parse_x509_svid(leaf)?;
    if info.spiffe_id.trust_domain() != trust_domain {
        return Err(SvidError::ForeignTrustDomain(
            info.spiffe_id.trust_domain().to_string(),
        ));
    }
    Ok((leaf, info))
}

/// RFC 5280 path validation of `leaf` for client authentication.
fn verify_path(
    leaf: &[u8],
    intermediates: &[Vec<u8>],
    anchors: &[Vec<u8>],
    now: i64,
) -> Result<(), SvidError> {
    let anchor_ders: Vec<CertificateDer<'_>> = anchors
        .iter()
        .map(|a| CertificateDer::from(a.as_slice()))
        .collect();
    let trust_anchors = anchor_ders
        .iter()
        .map(|a| webpki::anchor_from_trusted_cert(a).map(|t| t.to_owned()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| SvidError::Untrusted(format!("bad trust anchor: {e}")))?;
    let intermediates: Vec<CertificateDer<'_>> = intermediates
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let leaf_der = CertificateDer::from(leaf);
    let ee = webpki::EndEntityCert::try_from(&leaf_der)
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now.max(0) as u64));
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &trust_anchors,
        &intermediates,
        time,
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map_err(|e| match e {
        webpki::Error::CertExpired { .. } | webpki::Error::CertNotValidYet { .. } => {
            SvidError::Expired
        }
        other => SvidError::Untrusted(format!("{other:?}")),
    })?;
    Ok(())
}

/// A presented chain whose leaf follows the X509-SVID rules, belongs to the
/// trust domain and is within its validity window — not yet authenticated.
#[derive(Debug, Clone)]
pub struct PresentedSvid {
    leaf: Vec<u8>,
    info: SvidInfo,
}

impl PresentedSvid {
    /// Checks what needs no key and no record: the leaf's SVID rules, its
    /// trust domain, its validity at `now`.
    pub fn parse(
        chain: &[Vec<u8>],
        trust_domain: &TrustDomain,
        now: i64,
    ) -> Result<PresentedSvid, SvidError> {
        let (leaf, info) = parse_leaf(chain, trust_domain)?;
        if now < info.not_before || now > info.not_after {
            return Err(SvidError::Expired);
        }
        Ok(PresentedSvid {
            leaf: leaf.clone(),
            info,
        })
    }

    /// The serial the leaf claims (hex), to look its record up by.
    pub fn serial(&self) -> &str {
        &self.info.serial_hex
    }

    /// What the leaf says, unauthenticated.
    pub fn info(&self) -> &SvidInfo {
        &self.info
    }

    /// Authenticates the leaf against Herald's record of its serial:
    /// issued here as an X.509 SVID, the same SPIFFE ID and key, the CA
    /// key the record names still in the bundle (`ca_cert` finds that
    /// key's certificate), the very certificate the record's digest names
    /// or else one signed by that CA key, and a lineage neither revoked
    /// nor a banned node's.
    pub fn verify<'a>(
        self,
        record: Option<&CredentialStatus>,
        ca_cert: impl FnOnce(&str) -> Option<&'a [u8]>,
        now: i64,
    ) -> Result<VerifiedSvid, SvidError> {
        let record = record.ok_or(SvidError::NotIssuedHere)?;
        if record.kind != "x509_svid" {
            return Err(SvidError::RecordMismatch(
                "the serial is not an X.509 SVID's",
            ));
        }
        if record.spiffe_id != self.info.spiffe_id.as_str() {
            return Err(SvidError::RecordMismatch("another SPIFFE ID"));
        }
        if record.public_key_sha256 != self.info.spki_sha256 {
            return Err(SvidError::RecordMismatch("another public key"));
        }
        let origin = record
            .origin
            .ok_or(SvidError::RecordMismatch("the record has no lineage"))?;
        let ca = ca_cert(&record.ca_key_id)
            .ok_or(SvidError::RecordMismatch("its CA key is not in the bundle"))?;
        // Where the record keeps the issued certificate's digest, only
        // those very bytes are that credential: they were signed when they
        // were made, so one comparison replaces the signature check. A
        // record without it (written before the digest was kept) is
        // checked against the CA key itself, the only anchor: a leaf
        // signed by any other CA — even one under the same upstream root —
        // does not verify.
        match record.cert_sha256.as_deref() {
            Some(issued) if issued == self.info.cert_sha256 => {}
            Some(_) => {
                return Err(SvidError::RecordMismatch(
                    "not the certificate issued under the serial",
                ));
            }
            None => verify_path(&self.leaf, &[], &[ca.to_vec()], now).map_err(|e| match e {
                SvidError::Expired => SvidError::Expired,
                _ => SvidError::RecordMismatch("not signed by the CA key that issued the serial"),
            })?,
        }
        if record.revoked {
            return Err(SvidError::Revoked);
        }
        if record.node_banned {
            return Err(SvidError::NodeBanned);
        }
        Ok(VerifiedSvid {
            spiffe_id: self.info.spiffe_id,
            serial: self.info.serial_hex,
            not_before: self.info.not_before,
            not_after: self.info.not_after,
            spki_sha256: self.info.spki_sha256,
            dns_names: self.info.dns_names,
            cert_sha256: self.info.cert_sha256,
            origin,
            policy: record.policy.clone(),
            root_serial: record.root_serial.clone(),
            root_at: record.root_at,
        })
    }
}

/// An X.509 SVID Herald issued, presented by its holder, authenticated
/// against its record and standing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedSvid {
    /// Its SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// Its serial, lowercase hex.
    pub serial: String,
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// Hex SHA-256 of its SubjectPublicKeyInfo.
    pub spki_sha256: String,
    /// Its DNS SANs.
    pub dns_names: Vec<String>,
    /// Hex SHA-256 of the certificate, for the audit record.
    pub cert_sha256: String,
    /// How its lineage began.
    pub origin: Origin,
    /// The policy that granted its lineage.
    pub policy: Option<String>,
    /// The root of its lineage.
    pub root_serial: String,
    /// When the root's fresh evidence was presented, Unix seconds.
    pub root_at: i64,
}
