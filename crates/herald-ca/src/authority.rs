//! The trust domain's signing CA and X.509 SVID issuance.
//!
//! Issued leaves follow the X509-SVID standard: exactly one URI SAN (the
//! SPIFFE ID from the grant), `cA=false`, keyUsage digitalSignature only
//! (critical), EKU serverAuth + clientAuth, a serial that begins with the
//! issue time and ends with 72 random bits ([`crate::serial`]), and a
//! validity window that starts slightly in the past for clock skew and never
//! outlives any certificate above it.

use std::net::IpAddr;
use std::time::Duration;

use herald_core::{SpiffeId, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData, SanType,
};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::csr::VerifiedCsr;
use crate::serial::Serial;
use crate::{CaError, sha256_hex};

/// How far back `notBefore` is set, to tolerate clients whose clocks run behind.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// What policy granted: the identity and the lifetime cap of the credential.
#[derive(Debug, Clone)]
pub struct X509Grant {
    /// The SPIFFE ID to certify.
    pub spiffe_id: SpiffeId,
    /// Requested lifetime; clamped to the CA's own remaining validity.
    pub ttl: Duration,
    /// Extra DNS SANs the grant allows (workload registrations).
    pub dns_names: Vec<String>,
}

/// An issued X.509 SVID.
#[derive(Debug, Clone)]
pub struct IssuedX509 {
    /// The SPIFFE ID in the URI SAN.
    pub spiffe_id: SpiffeId,
    /// The leaf, DER.
    pub cert_der: Vec<u8>,
    /// Certificates between the leaf and the trust anchor, DER, nearest first.
    pub intermediates: Vec<Vec<u8>>,
    /// Serial number, lowercase hex.
    pub serial_hex: String,
    /// notBefore, Unix seconds.
    pub not_before: i64,
    /// notAfter, Unix seconds.
    pub not_after: i64,
    /// Identifier of the CA key that signed it.
    pub ca_key_id: String,
}

/// The server's own TLS identity, issued by this CA.
pub struct ServerIdentity {
    /// Leaf then intermediates, DER.
    pub cert_chain: Vec<Vec<u8>>,
    /// The leaf's private key, PKCS#8 DER.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// notAfter, Unix seconds.
    pub not_after: i64,
}

/// CA material as persisted: the signing certificate, the certificates above
/// it, and its private key (the caller seals `key_pkcs8` before storing it).
pub struct CaMaterial {
    /// Stable identifier of this key.
    pub key_id: String,
    /// The signing CA certificate, DER.
    pub cert_der: Vec<u8>,
    /// Certificates above the signing certificate, concatenated DER, ending
    /// with the trust anchor; empty when the signing certificate is the anchor.
    pub chain_der: Vec<u8>,
    /// The private key, PKCS#8 DER.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// notBefore of the signing certificate, Unix seconds.
    pub not_before: i64,
    /// notAfter of the signing certificate, Unix seconds.
    pub not_after: i64,
}

/// A loaded signing CA.
pub struct CertificateAuthority {
    trust_domain: TrustDomain,
    key_id: String,
    issuer: Issuer<'static, KeyPair>,
    cert_der: Vec<u8>,
    above: Vec<Vec<u8>>,
    not_before: i64,
    not_after: i64,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .field("key_id", &self.key_id)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

fn ca_params(
    td: &TrustDomain,
    not_before: i64,
    not_after: i64,
    path_len: u8,
) -> Result<CertificateParams, CaError> {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "Herald");
    dn.push(DnType::CommonName, format!("Herald CA {td}"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(path_len));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.subject_alt_names = vec![SanType::URI(td.id().as_str().try_into()?)];
    p.not_before = to_time(not_before)?;
    p.not_after = to_time(not_after)?;
    p.serial_number = Some(Serial::generate()?.to_rcgen());
    p.use_authority_key_identifier_extension = true;
    Ok(p)
}

fn to_time(unix: i64) -> Result<OffsetDateTime, CaError> {
    OffsetDateTime::from_unix_timestamp(unix).map_err(|e| CaError::Generate(e.to_string()))
}

fn generate_p256() -> Result<KeyPair, CaError> {
    Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?)
}

fn key_id_for(cert_der: &[u8]) -> String {
    sha256_hex(cert_der)[..32].to_owned()
}

/// Splits concatenated DER certificates.
pub fn split_der_certs(mut der: &[u8]) -> Result<Vec<Vec<u8>>, CaError> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| CaError::Material(format!("bad certificate in chain: {e}")))?;
        out.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    Ok(out)
}

/// Parses every certificate in a PEM bundle.
pub fn certs_from_pem(pem_text: &str) -> Result<Vec<Vec<u8>>, CaError> {
    let certs: Vec<Vec<u8>> = pem::parse_many(pem_text)
        .map_err(|e| CaError::Material(e.to_string()))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
        .collect();
    if certs.is_empty() {
        return Err(CaError::Material("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

fn validity_of(der: &[u8]) -> Result<(i64, i64), CaError> {
    let (_, c) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CaError::Material(e.to_string()))?;
    Ok((
        c.validity().not_before.timestamp(),
        c.validity().not_after.timestamp(),
    ))
}

impl CaMaterial {
    /// Generates a self-signed root CA for `td`, valid from `now` for `ttl`.
    pub fn generate_root(td: &TrustDomain, ttl: Duration, now: i64) -> Result<Self, CaError> {
        let key = generate_p256()?;
        let (nb, na) = (
            now - CLOCK_SKEW.as_secs() as i64,
            now + ttl.as_secs() as i64,
        );
        let cert = ca_params(td, nb, na, 0)?.self_signed(&key)?;
        let cert_der = cert.der().to_vec();
        Ok(Self {
            key_id: key_id_for(&cert_der),
            cert_der,
            chain_der: Vec::new(),
            key_pkcs8: Zeroizing::new(key.serialize_der()),
            not_before: nb,
            not_after: na,
        })
    }

    /// Generates an intermediate CA for `td` signed by an upstream CA.
    /// `upstream_chain_pem` holds the upstream CA certificate first, then any
    /// certificates above it up to and including its root.
    pub fn generate_intermediate(
        td: &TrustDomain,
        upstream_chain_pem: &str,
        upstream_key_pem: &str,
        ttl: Duration,
        now: i64,
    ) -> Result<Self, CaError> {
        let upstream = certs_from_pem(upstream_chain_pem)?;
        let upstream_key = KeyPair::from_pem(upstream_key_pem)
            .map_err(|e| CaError::Material(format!("upstream key: {e}")))?;
        let issuer =
            Issuer::from_ca_cert_der(&CertificateDer::from(upstream[0].as_slice()), &upstream_key)
                .map_err(|e| CaError::Material(format!("upstream certificate: {e}")))?;
        // Check the key really belongs to the upstream certificate.
        let (_, up) = x509_parser::parse_x509_certificate(&upstream[0])
            .map_err(|e| CaError::Material(e.to_string()))?;
        if up.public_key().raw != upstream_key.subject_public_key_info().as_slice() {
            return Err(CaError::Material(
                "upstream key does not match the upstream certificate".into(),
            ));
        }
        let mut ceiling = i64::MAX;
        for c in &upstream {
            ceiling = ceiling.min(validity_of(c)?.1);
        }
        let nb = now - CLOCK_SKEW.as_secs() as i64;
        let na = (now + ttl.as_secs() as i64).min(ceiling);
        if na <= now {
            return Err(CaError::Material("upstream CA has expired".into()));
        }
        let key = generate_p256()?;
        let cert = ca_params(td, nb, na, 0)?.signed_by(&key, &issuer)?;
        let cert_der = cert.der().to_vec();
        Ok(Self {
            key_id: key_id_for(&cert_der),
            cert_der,
            chain_der: upstream.concat(),
            key_pkcs8: Zeroizing::new(key.serialize_der()),
            not_before: nb,
            not_after: na,
        })
    }
}

impl CertificateAuthority {
    /// Loads a CA from its material.
    pub fn load(
        trust_domain: TrustDomain,
        key_id: &str,
        cert_der: &[u8],
        chain_der: &[u8],
        key_pkcs8: &[u8],
    ) -> Result<Self, CaError> {
        let key = KeyPair::try_from(&PrivatePkcs8KeyDer::from(key_pkcs8))
            .map_err(|e| CaError::Material(format!("CA key: {e}")))?;
        let (_, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| CaError::Material(e.to_string()))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CaError::Material(
                "CA key does not match its certificate".into(),
            ));
        }
        let above = split_der_certs(chain_der)?;
        let (not_before, mut not_after) = validity_of(cert_der)?;
        for c in &above {
            not_after = not_after.min(validity_of(c)?.1);
        }
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(cert_der), key)
            .map_err(|e| CaError::Material(e.to_string()))?;
        Ok(Self {
            trust_domain,
            key_id: key_id.to_owned(),
            issuer,
            cert_der: cert_der.to_vec(),
            above,
            not_before,
            not_after,
        })
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// This key's identifier.
    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// notBefore of the signing certificate, Unix seconds.
    pub fn not_before(&self) -> i64 {
        self.not_before
    }

    /// The latest notAfter any certificate this CA signs may have, Unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }

    /// The signing CA certificate, DER.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The trust anchor this CA chains to, DER.
    pub fn trust_anchor(&self) -> &[u8] {
        self.above.last().map_or(&self.cert_der, |c| c.as_slice())
    }

    /// Certificates to send after a leaf: everything between it and the anchor.
    pub fn intermediates(&self) -> Vec<Vec<u8>> {
        if self.above.is_empty() {
            return Vec::new();
        }
        let mut v = vec![self.cert_der.clone()];
        v.extend(self.above[..self.above.len() - 1].iter().cloned());
        v
    }

    fn validity(&self, ttl: Duration, now: i64) -> Result<(i64, i64), CaError> {
        let nb = (now - CLOCK_SKEW.as_secs() as i64).max(self.not_before);
        let na = now.saturating_add(ttl.as_secs() as i64).min(self.not_after);
        if na <= now || na <= nb {
            return Err(CaError::Material(
                "the CA is expired or not yet valid at this time".into(),
            ));
        }
        Ok((nb, na))
    }

    fn leaf_params(
        &self,
        spiffe_id: &SpiffeId,
        dns: &[String],
        ips: &[IpAddr],
        nb: i64,
        na: i64,
    ) -> Result<(CertificateParams, String), CaError> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Herald");
        p.distinguished_name = dn;
        let mut sans = vec![SanType::URI(spiffe_id.as_str().try_into()?)];
        for d in dns {
            sans.push(SanType::DnsName(d.as_str().try_into()?));
        }
        sans.extend(ips.iter().copied().map(SanType::IpAddress));
        p.subject_alt_names = sans;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = to_time(nb)?;
        p.not_after = to_time(na)?;
        let serial = Serial::generate()?;
        p.serial_number = Some(serial.to_rcgen());
        let serial_hex = serial.to_hex();
        p.use_authority_key_identifier_extension = true;
        Ok((p, serial_hex))
    }

    /// Issues an X.509 SVID for the CSR's key, with the identity from `grant`.
    pub fn issue_x509_svid(
        &self,
        csr: &VerifiedCsr,
        grant: &X509Grant,
        now: i64,
    ) -> Result<IssuedX509, CaError> {
        if grant.spiffe_id.trust_domain() != &self.trust_domain {
            return Err(CaError::Material(format!(
                "{} is outside trust domain {}",
                grant.spiffe_id, self.trust_domain
            )));
        }
        let (nb, na) = self.validity(grant.ttl, now)?;
        let (params, serial_hex) =
            self.leaf_params(&grant.spiffe_id, &grant.dns_names, &[], nb, na)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(IssuedX509 {
            spiffe_id: grant.spiffe_id.clone(),
            cert_der: cert.der().to_vec(),
            intermediates: self.intermediates(),
            serial_hex,
            not_before: nb,
            not_after: na,
            ca_key_id: self.key_id.clone(),
        })
    }

    /// Issues the server's own TLS certificate (SPIFFE ID `spiffe://<td>/herald/server`
    /// plus the DNS names and IP addresses clients dial) with a fresh key.
    pub fn issue_server_identity(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
        now: i64,
    ) -> Result<ServerIdentity, CaError> {
        let id = self
            .trust_domain
            .spiffe_id("/herald/server")
            .map_err(|e| CaError::Generate(e.to_string()))?;
        let key = generate_p256()?;
        let (nb, na) = self.validity(ttl, now)?;
        let (params, _) = self.leaf_params(&id, dns_names, ips, nb, na)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let mut cert_chain = vec![cert.der().to_vec()];
        cert_chain.extend(self.intermediates());
        Ok(ServerIdentity {
            cert_chain,
            key_pkcs8: Zeroizing::new(key.serialize_der()),
            not_after: na,
        })
    }
}
