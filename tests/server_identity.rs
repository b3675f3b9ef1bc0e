//! Clients pin the server's SPIFFE ID: a TLS server whose certificate
//! chains to the trust bundle and matches the host name dialled, but is a
//! workload's SVID from the same CA, is refused by `herald-client` (what
//! the agent and the CLI use) — the certificate must be
//! `spiffe://<td>/herald/server`.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::{KEK_HEX, Site, TRUST_DOMAIN, stderr};
use herald_ca::{CertificateAuthority, KeyEncryptionKey, X509Grant};
use herald_client::{ClientError, HeraldClient, ServerId};
use herald_core::{SpiffeId, TrustDomain};
use herald_proto::v1::bundle_service_server::{BundleService, BundleServiceServer};
use herald_proto::v1::{GetTrustBundleRequest, TrustBundle};
use herald_store::Store;

/// The server's CA, unsealed with the test KEK, as an insider could.
async fn server_ca(store: &Store) -> CertificateAuthority {
    let kek = KeyEncryptionKey::from_text(KEK_HEX).unwrap();
    let key = store
        .ca_keys()
        .await
        .unwrap()
        .into_iter()
        .find(|k| k.status == "active" && k.kind == "x509")
        .unwrap();
    let pkcs8 = kek.open(&key.key_id, &key.encrypted_key).unwrap();
    let td = TrustDomain::new(TRUST_DOMAIN).unwrap();
    CertificateAuthority::load(td, &key.key_id, &key.cert_der, &key.chain_der, &pkcs8).unwrap()
}

/// Answers GetTrustBundle with a bundle of its own choosing.
struct Impostor;

#[tonic::async_trait]
impl BundleService for Impostor {
    async fn get_trust_bundle(
        &self,
        _: tonic::Request<GetTrustBundleRequest>,
    ) -> Result<tonic::Response<TrustBundle>, tonic::Status> {
        Ok(tonic::Response::new(TrustBundle {
            trust_domain: "attacker.example".into(),
            ..TrustBundle::default()
        }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_presenting_a_workload_svid_of_the_same_ca_is_refused() {
    let site = Site::new();
    let server = site.start();
    let store = Store::open(&site.db_url()).await.unwrap();
    let ca = server_ca(&store).await;
    let anchors = herald_client::files::from_pem(
        "CERTIFICATE",
        &std::fs::read_to_string(site.bundle_pem()).unwrap(),
    )
    .unwrap();

    // A workload SVID with the DNS name the client will dial: chain and
    // host name checks alone would accept it.
    let key = herald_client::keys::generate_key_and_csr().unwrap();
    let workload = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}/workload/web")).unwrap();
    let svid = ca
        .issue_x509_svid(
            &herald_ca::csr::verify_csr(&key.csr_der).unwrap(),
            &X509Grant {
                spiffe_id: workload.clone(),
                ttl: Duration::from_secs(600),
                dns_names: vec!["localhost".into()],
            },
            herald_server::unix_now(),
        )
        .unwrap();
    let mut chain_pem =
        herald_client::files::to_pem("CERTIFICATE", std::slice::from_ref(&svid.cert_der));
    chain_pem.push_str(&herald_client::files::to_pem(
        "CERTIFICATE",
        &svid.intermediates,
    ));
    let key_pem = herald_client::files::to_pem("PRIVATE KEY", std::slice::from_ref(&key.key_pkcs8));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(chain_pem, key_pem));
    tokio::spawn(
        tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(BundleServiceServer::new(Impostor))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let impostor = format!("https://localhost:{port}");

    // The default pin, spiffe://<the bundle's trust domain>/herald/server,
    // refuses it with a typed error naming both IDs.
    match HeraldClient::connect(&impostor, &anchors, None).await {
        Err(ClientError::ServerIdentity { server, mismatch }) => {
            assert_eq!(server, impostor);
            assert_eq!(
                mismatch.expected,
                format!("spiffe://{TRUST_DOMAIN}/herald/server")
            );
            assert_eq!(mismatch.found, workload.as_str());
        }
        other => panic!("the impostor was not refused: {:?}", other.map(|_| ())),
    }
    // So does a pin on the trust domain, or on the exact server ID.
    for pin in [
        ServerId::parse(TRUST_DOMAIN).unwrap(),
        ServerId::parse(&format!("spiffe://{TRUST_DOMAIN}/herald/server")).unwrap(),
    ] {
        assert!(matches!(
            HeraldClient::connect_to(&impostor, &anchors, None, &pin).await,
            Err(ClientError::ServerIdentity { .. })
        ));
    }
    // The pin is what refused it: a client told to expect the workload's
    // ID connects, and believes what the impostor says.
    let fooled = HeraldClient::connect_to(&impostor, &anchors, None, &ServerId::Exact(workload))
        .await
        .unwrap();
    assert_eq!(
        fooled.trust_bundle().await.unwrap().trust_domain,
        "attacker.example"
    );
    // The genuine server passes the default pin.
    let genuine = HeraldClient::connect(&server.url(), &anchors, None)
        .await
        .unwrap();
    assert_eq!(
        genuine.trust_bundle().await.unwrap().trust_domain,
        TRUST_DOMAIN
    );

    // The CLI refuses it too, with its own code, before sending the token.
    let out = site.herald(&[
        "svid",
        "mint",
        "--join-token",
        "not-sent",
        "--server",
        &impostor,
        "--bundle",
        site.bundle_pem().to_str().unwrap(),
        "--out",
        site.dir.path().join("out").to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("server_identity_mismatch"),
        "{}",
        stderr(&out)
    );
    // An operator pin that does not parse is a clear input error.
    let out = site.herald(&[
        "svid",
        "mint",
        "--join-token",
        "not-sent",
        "--server",
        &server.url(),
        "--bundle",
        site.bundle_pem().to_str().unwrap(),
        "--out",
        site.dir.path().join("out").to_str().unwrap(),
        "--server-spiffe-id",
        "Not A Domain",
    ]);
    assert!(stderr(&out).contains("invalid_input"), "{}", stderr(&out));
}
