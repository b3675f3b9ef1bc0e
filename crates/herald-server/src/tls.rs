//! TLS for the gRPC listener.
//!
//! Client certificates are optional (minting uses a join token, renewal uses
//! the current SVID). The TLS layer checks only that a client proves
//! possession of the key in the certificate it presents; whether that
//! certificate is a valid, unrevoked SVID of this trust domain is decided
//! by the handler, so every refusal gets a typed status and an audit record
//! instead of a bare handshake failure.

use std::sync::{Arc, RwLock};

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::ServerError;

/// Accepts any client certificate whose key signs the handshake; see the module docs.
#[derive(Debug)]
pub struct DeferredClientCertVerifier {
    algs: WebPkiSupportedAlgorithms,
}

impl DeferredClientCertVerifier {
    /// Uses the provider's signature algorithms.
    pub fn new(provider: &CryptoProvider) -> Self {
        Self {
            algs: provider.signature_verification_algorithms,
        }
    }
}

impl ClientCertVerifier for DeferredClientCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// The server certificate, swapped in place when it is re-issued.
#[derive(Debug)]
pub struct RotatingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl RotatingCert {
    /// Starts with `chain` and `key`.
    pub fn new(chain: &[Vec<u8>], key_pkcs8: &[u8]) -> Result<Self, ServerError> {
        Ok(Self {
            current: RwLock::new(Arc::new(certified_key(chain, key_pkcs8)?)),
        })
    }

    /// Replaces the certificate for new handshakes.
    pub fn replace(&self, chain: &[Vec<u8>], key_pkcs8: &[u8]) -> Result<(), ServerError> {
        let ck = Arc::new(certified_key(chain, key_pkcs8)?);
        if let Ok(mut g) = self.current.write() {
            *g = ck;
        }
        Ok(())
    }
}

impl ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|g| g.clone())
    }
}

/// A rustls certified key from a DER chain (leaf first) and PKCS#8 key.
pub(crate) fn certified_key(
    chain: &[Vec<u8>],
    key_pkcs8: &[u8],
) -> Result<CertifiedKey, ServerError> {
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_pkcs8.to_vec()));
    let signing = rustls::crypto::aws_lc_rs::sign::any_supported_type(&key)
        .map_err(|e| ServerError::Tls(e.to_string()))?;
    let certs = chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    Ok(CertifiedKey::new(certs, signing))
}

/// The rustls server configuration for the gRPC listener.
pub fn server_config(cert: Arc<RotatingCert>) -> Result<rustls::ServerConfig, ServerError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = Arc::new(DeferredClientCertVerifier::new(&provider));
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// The rustls server configuration for the HTTPS listener: the same
/// rotating certificate, no client certificates, HTTP/1.1 (what the AWS
/// SDKs and OAuth clients speak).
pub fn https_config(cert: Arc<RotatingCert>) -> Result<rustls::ServerConfig, ServerError> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServerError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(cfg)
}
