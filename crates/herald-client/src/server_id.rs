//! Which server a client talks to: the server's certificate must chain to
//! the trust bundle and match the host name dialled, as usual, and must
//! also carry the server's SPIFFE ID. Without the last check any X.509
//! SVID from the same CA — a workload's, with a DNS name the workload can
//! claim — would pass for the server, and an agent would send it its node
//! SVID renewals and join tokens.

use std::sync::Arc;

use herald_core::{SpiffeId, TrustDomain};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, SignatureScheme};

use crate::ClientError;

/// The path of every Herald server's SPIFFE ID
/// (`spiffe://<trust domain>/herald/server`).
pub const SERVER_PATH: &str = "/herald/server";

/// The SPIFFE ID a server's certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ServerId {
    /// `spiffe://<td>/herald/server`, where `<td>` is the one trust domain
    /// the trust bundle's CA certificates name (Herald's signing CAs carry
    /// `spiffe://<td>`). A bundle that names none (an upstream root) or
    /// several is refused: name the trust domain or the ID instead.
    #[default]
    FromBundle,
    /// `spiffe://<td>/herald/server` for this trust domain.
    TrustDomain(TrustDomain),
    /// Exactly this SPIFFE ID.
    Exact(SpiffeId),
}

/// The server's certificate carries another SPIFFE ID than the one pinned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the server's certificate is {found}, not the pinned server identity {expected}")]
pub struct ServerIdMismatch {
    /// The pinned ID.
    pub expected: String,
    /// What the certificate carries (its URI SANs, or "no SPIFFE ID").
    pub found: String,
}

impl ServerId {
    /// Parses a configured value: a SPIFFE ID with a path pins exactly
    /// that ID; a bare trust domain (`example.org` or `spiffe://example.org`)
    /// pins that trust domain's `/herald/server`.
    pub fn parse(text: &str) -> Result<ServerId, ClientError> {
        let bad = |e: herald_core::SpiffeIdError| {
            ClientError::Input(format!("server SPIFFE ID {text:?}: {e}"))
        };
        if text.starts_with("spiffe://") {
            let id = SpiffeId::parse(text).map_err(bad)?;
            if id.path().is_empty() {
                return Ok(ServerId::TrustDomain(id.trust_domain().clone()));
            }
            return Ok(ServerId::Exact(id));
        }
        TrustDomain::new(text)
            .map(ServerId::TrustDomain)
            .map_err(bad)
    }

    /// The server of the trust domain an X.509 SVID (leaf, DER) belongs
    /// to: what a holder of Herald-issued credentials renews against, with
    /// no configuration even under an upstream root. `None` when the leaf
    /// carries no single SPIFFE ID.
    pub fn of_svid(leaf: &[u8]) -> Option<ServerId> {
        match uri_sans(leaf).ok()?.as_slice() {
            [one] => Some(ServerId::TrustDomain(
                SpiffeId::parse(one).ok()?.trust_domain().clone(),
            )),
            _ => None,
        }
    }

    /// The SPIFFE ID to require, given the trust bundle (DER anchors).
    pub fn resolve(&self, bundle: &[Vec<u8>]) -> Result<SpiffeId, ClientError> {
        let td = match self {
            ServerId::Exact(id) => return Ok(id.clone()),
            ServerId::TrustDomain(td) => td.clone(),
            ServerId::FromBundle => bundle_trust_domain(bundle)?,
        };
        td.spiffe_id(SERVER_PATH)
            .map_err(|e| ClientError::Input(format!("server SPIFFE ID under {td}: {e}")))
    }
}

/// The SPIFFE IDs among a certificate's URI SANs (unparseable ones as text).
fn uri_sans(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    let san = cert.subject_alternative_name().map_err(|e| e.to_string())?;
    Ok(san
        .map(|s| {
            s.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some((*u).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default())
}

/// The single trust domain named by the bundle's CA certificates.
fn bundle_trust_domain(bundle: &[Vec<u8>]) -> Result<TrustDomain, ClientError> {
    let mut domains: Vec<TrustDomain> = Vec::new();
    for der in bundle {
        let uris = uri_sans(der).map_err(|e| ClientError::Input(format!("trust bundle: {e}")))?;
        for u in uris {
            if let Ok(id) = SpiffeId::parse(&u)
                && id.path().is_empty()
                && !domains.contains(id.trust_domain())
            {
                domains.push(id.trust_domain().clone());
            }
        }
    }
    match domains.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(ClientError::Input(
            "the trust bundle names no SPIFFE trust domain (an upstream root?): \
             configure the server's SPIFFE ID or trust domain"
                .into(),
        )),
        many => Err(ClientError::Input(format!(
            "the trust bundle names {} trust domains: configure the server's SPIFFE ID",
            many.len()
        ))),
    }
}

/// Checks that `end_entity` carries exactly one URI SAN, `expected`.
pub fn check_server_certificate(
    end_entity: &[u8],
    expected: &SpiffeId,
) -> Result<(), ServerIdMismatch> {
    let mismatch = |found: String| ServerIdMismatch {
        expected: expected.to_string(),
        found,
    };
    match uri_sans(end_entity) {
        Ok(uris) if uris.len() == 1 && uris[0] == expected.as_str() => Ok(()),
        Ok(uris) if uris.is_empty() => Err(mismatch("without a SPIFFE ID".into())),
        Ok(uris) => Err(mismatch(uris.join(", "))),
        Err(e) => Err(mismatch(format!("unparseable ({e})"))),
    }
}

/// rustls' WebPKI verification (chain to the bundle, validity and, unless
/// told otherwise, host name) followed by the SPIFFE ID pin.
#[derive(Debug)]
pub struct PinnedServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<CryptoProvider>,
    expected: SpiffeId,
    check_host_name: bool,
}

impl PinnedServerVerifier {
    /// Chain to `roots`, the host name dialled, and exactly `expected`.
    pub fn new(
        roots: rustls::RootCertStore,
        provider: Arc<CryptoProvider>,
        expected: SpiffeId,
    ) -> Result<Self, ClientError> {
        let roots = Arc::new(roots);
        let inner = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| ClientError::Input(format!("trust bundle: {e}")))?;
        Ok(Self {
            inner,
            roots,
            provider,
            expected,
            check_host_name: true,
        })
    }

    /// Chain to `roots` and exactly `expected`, whatever host name was
    /// dialled: SPIFFE authentication proper, for peers whose SVIDs carry
    /// no DNS names (SPIFFE bundle endpoints under `https_spiffe`).
    pub fn spiffe_id_only(
        roots: rustls::RootCertStore,
        provider: Arc<CryptoProvider>,
        expected: SpiffeId,
    ) -> Result<Self, ClientError> {
        let mut v = Self::new(roots, provider, expected)?;
        v.check_host_name = false;
        Ok(v)
    }
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = if self.check_host_name {
            self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            )?
        } else {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                &self.roots,
                intermediates,
                now,
                self.provider.signature_verification_algorithms.all,
            )?;
            ServerCertVerified::assertion()
        };
        check_server_certificate(end_entity, &self.expected).map_err(|m| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(m))))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The pin mismatch somewhere in a connection error's chain, if that is
/// why the connection failed.
pub(crate) fn find_mismatch(e: &(dyn std::error::Error + 'static)) -> Option<ServerIdMismatch> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        // io::Error::source() skips the error it wraps, so look inside.
        let wrapped = err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static));
        for candidate in [Some(err), wrapped].into_iter().flatten() {
            if let Some(rustls::Error::InvalidCertificate(CertificateError::Other(other))) =
                candidate.downcast_ref::<rustls::Error>()
                && let Some(m) = other.0.downcast_ref::<ServerIdMismatch>()
            {
                return Some(m.clone());
            }
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn cert(uris: &[&str], ca: bool) -> Vec<u8> {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.subject_alt_names = uris
            .iter()
            .map(|u| rcgen::SanType::URI((*u).try_into().unwrap()))
            .collect();
        if ca {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let key = rcgen::KeyPair::generate().unwrap();
        p.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_expected_id_comes_from_the_bundle_a_trust_domain_or_configuration() {
        let herald_ca = cert(&["spiffe://example.org"], true);
        let upstream = cert(&[], true);
        let other = cert(&["spiffe://other.test"], true);
        assert_eq!(
            ServerId::FromBundle
                .resolve(std::slice::from_ref(&herald_ca))
                .unwrap()
                .as_str(),
            "spiffe://example.org/herald/server"
        );
        // Several CAs of one trust domain (a rotation) are one domain.
        assert!(
            ServerId::FromBundle
                .resolve(&[herald_ca.clone(), upstream.clone(), herald_ca.clone()])
                .is_ok()
        );
        assert!(matches!(
            ServerId::FromBundle.resolve(std::slice::from_ref(&upstream)),
            Err(ClientError::Input(_))
        ));
        assert!(matches!(
            ServerId::FromBundle.resolve(&[herald_ca.clone(), other]),
            Err(ClientError::Input(_))
        ));
        assert_eq!(
            ServerId::parse("example.org")
                .unwrap()
                .resolve(std::slice::from_ref(&upstream))
                .unwrap()
                .as_str(),
            "spiffe://example.org/herald/server"
        );
        assert_eq!(
            ServerId::parse("spiffe://example.org").unwrap(),
            ServerId::parse("example.org").unwrap()
        );
        assert_eq!(
            ServerId::parse("spiffe://example.org/sts/eu")
                .unwrap()
                .resolve(&[upstream])
                .unwrap()
                .as_str(),
            "spiffe://example.org/sts/eu"
        );
        for bad in [
            "",
            "Example.org",
            "spiffe://example.org/a/../b",
            "https://x",
        ] {
            assert!(ServerId::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_a_certificate_carrying_exactly_the_server_id_passes() {
        let expected = SpiffeId::parse("spiffe://example.org/herald/server").unwrap();
        check_server_certificate(
            &cert(&["spiffe://example.org/herald/server"], false),
            &expected,
        )
        .unwrap();
        for uris in [
            vec!["spiffe://example.org/workload/web"],
            vec!["spiffe://other.test/herald/server"],
            vec![],
            vec![
                "spiffe://example.org/herald/server",
                "spiffe://example.org/x",
            ],
        ] {
            let err = check_server_certificate(&cert(&uris, false), &expected).unwrap_err();
            assert_eq!(err.expected, expected.as_str());
        }
        assert!(check_server_certificate(b"junk", &expected).is_err());
        assert_eq!(
            ServerId::of_svid(&cert(&["spiffe://example.org/node/n1"], false)),
            Some(ServerId::TrustDomain(
                TrustDomain::new("example.org").unwrap()
            ))
        );
        assert_eq!(ServerId::of_svid(&cert(&[], false)), None);
    }

    #[test]
    fn a_mismatch_is_found_inside_the_io_error_that_carries_it() {
        let m = ServerIdMismatch {
            expected: "spiffe://a/herald/server".into(),
            found: "spiffe://a/w".into(),
        };
        let tls = rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(
            m.clone(),
        ))));
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        assert_eq!(find_mismatch(&io), Some(m));
        let plain = std::io::Error::other("refused");
        assert_eq!(find_mismatch(&plain), None);
    }
}
