//! Two SVID holders complete a real mutual-TLS handshake with rustls, each
//! validating the other's SVID against the trust bundle.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::sync::Arc;

use common::*;
use herald_client::HeraldClient;
use herald_client::keys::generate_key_and_csr;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Authorizes the server by SPIFFE ID (SVIDs carry no DNS names), after
/// RFC 5280 path validation for serverAuth.
#[derive(Debug)]
struct SpiffeServerVerifier {
    anchors: Vec<CertificateDer<'static>>,
    expected: String,
    algs: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let anchors: Vec<_> = self
            .anchors
            .iter()
            .map(|a| webpki::anchor_from_trusted_cert(a).unwrap().to_owned())
            .collect();
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("{e:?}")))?;
        let info = herald_attest::svid::parse_x509_svid(end_entity)
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        if info.spiffe_id.as_str() != self.expected {
            return Err(rustls::Error::General(format!(
                "unexpected peer {}",
                info.spiffe_id
            )));
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.algs)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

async fn mint(
    site: &Site,
    client: &HeraldClient,
    path: &str,
) -> (
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    Vec<CertificateDer<'static>>,
) {
    let token = site.token(&format!("spiffe://{TRUST_DOMAIN}{path}"));
    let kc = generate_key_and_csr().unwrap();
    let r = client.mint_x509_svid(&token, kc.csr_der).await.unwrap();
    (
        r.cert_chain.into_iter().map(CertificateDer::from).collect(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(kc.key_pkcs8)),
        r.bundle.into_iter().map(CertificateDer::from).collect(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_svid_holders_complete_mutual_tls() {
    let site = Site::new();
    let server = site.start();
    let anchors = herald_client::files::from_pem(
        "CERTIFICATE",
        &std::fs::read_to_string(site.bundle_pem()).unwrap(),
    )
    .unwrap();
    let herald = HeraldClient::connect(&server.url(), &anchors, None)
        .await
        .unwrap();
    let (api_chain, api_key, bundle) = mint(&site, &herald, "/svc/api").await;
    let (web_chain, web_key, _) = mint(&site, &herald, "/svc/web").await;

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for a in &bundle {
        roots.add(a.clone()).unwrap();
    }
    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(api_chain, api_key)
        .unwrap();
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
            anchors: bundle.clone(),
            expected: format!("spiffe://{TRUST_DOMAIN}/svc/api"),
            algs: provider.signature_verification_algorithms,
        }))
        .with_client_auth_cert(web_chain, web_key)
        .unwrap();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let srv = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.unwrap();
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        let id = herald_attest::svid::parse_x509_svid(&peer)
            .unwrap()
            .spiffe_id
            .to_string();
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(b"pong").await.unwrap();
        tls.shutdown().await.ok();
        (id, buf)
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
        .connect(ServerName::try_from("api.internal").unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    let (client_id, got) = srv.await.unwrap();
    assert_eq!(&got, b"ping");
    assert_eq!(
        client_id,
        format!("spiffe://{TRUST_DOMAIN}/svc/web"),
        "the server authenticated the client's SPIFFE ID"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_expecting_another_identity_refuses_the_handshake() {
    let site = Site::new();
    let server = site.start();
    let anchors = herald_client::files::from_pem(
        "CERTIFICATE",
        &std::fs::read_to_string(site.bundle_pem()).unwrap(),
    )
    .unwrap();
    let herald = HeraldClient::connect(&server.url(), &anchors, None)
        .await
        .unwrap();
    let (api_chain, api_key, bundle) = mint(&site, &herald, "/svc/api").await;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(api_chain, api_key)
        .unwrap();
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
            anchors: bundle,
            expected: format!("spiffe://{TRUST_DOMAIN}/svc/db"),
            algs: provider.signature_verification_algorithms,
        }))
        .with_no_client_auth();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = acceptor.accept(tcp).await;
    });
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let err = tokio_rustls::TlsConnector::from(Arc::new(client_cfg))
        .connect(ServerName::try_from("db.internal").unwrap(), tcp)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unexpected peer"), "{err}");
}
