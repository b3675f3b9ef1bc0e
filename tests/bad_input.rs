//! Every kind of bad input gets a typed gRPC status with a stable code, an
//! audit record with that code, and leaves nothing half-written; the server
//! keeps serving.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use common::*;
use herald_ca::authority::CaMaterial;
use herald_ca::{CertificateAuthority, KeyEncryptionKey, X509Grant};
use herald_client::keys::generate_key_and_csr;
use herald_client::{ClientError, ClientIdentity, HeraldClient};
use herald_core::{ErrorCode, TrustDomain};
use herald_store::{NewJoinToken, Store};

fn now() -> i64 {
    herald_server::unix_now()
}

fn td() -> TrustDomain {
    TrustDomain::new(TRUST_DOMAIN).unwrap()
}

async fn issued_count(store_url: &str) -> i64 {
    use sqlx::Connection;
    let mut c = sqlx::SqliteConnection::connect(store_url).await.unwrap();
    let (n,): (i64,) = sqlx::query_as("SELECT COUNT(*) FROM issued_credentials")
        .fetch_one(&mut c)
        .await
        .unwrap();
    n
}

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
    CertificateAuthority::load(td(), &key.key_id, &key.cert_der, &key.chain_der, &pkcs8).unwrap()
}

fn grant(path: &str, ttl: u64) -> X509Grant {
    X509Grant {
        spiffe_id: td().spiffe_id(path).unwrap(),
        ttl: Duration::from_secs(ttl),
        dns_names: vec![],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mint_refusals() {
    let site = Site::new();
    let server = site.start();
    let store = Store::open(&site.db_url()).await.unwrap();
    let anchors = herald_client::files::from_pem(
        "CERTIFICATE",
        &std::fs::read_to_string(site.bundle_pem()).unwrap(),
    )
    .unwrap();
    let client = HeraldClient::connect(&server.url(), &anchors, None)
        .await
        .unwrap();
    let csr = || generate_key_and_csr().unwrap().csr_der;
    let act = "x509_svid.mint";

    assert_refused(
        &store,
        client.mint_x509_svid("not-a-token", csr()).await,
        ErrorCode::JoinTokenMalformed,
        act,
    )
    .await;
    let unknown = herald_attest::join_token::generate().unwrap();
    assert_refused(
        &store,
        client.mint_x509_svid(&unknown.token, csr()).await,
        ErrorCode::JoinTokenUnknown,
        act,
    )
    .await;

    let expired = herald_attest::join_token::generate().unwrap();
    store
        .create_join_token(
            NewJoinToken {
                token_hash: expired.hash,
                token_id: expired.token_id.clone(),
                spiffe_id: format!("spiffe://{TRUST_DOMAIN}/old"),
                created_at: now() - 3600,
                expires_at: now() - 60,
                created_by: "test".into(),
                purpose: herald_core::JoinTokenPurpose::Bootstrap,
                policies: Vec::new(),
                reason: None,
            },
            herald_core::AuditEvent::new("join_token.create", "test"),
        )
        .await
        .unwrap();
    assert_refused(
        &store,
        client.mint_x509_svid(&expired.token, csr()).await,
        ErrorCode::JoinTokenExpired,
        act,
    )
    .await;

    // A valid token with bad CSRs: refused, and the token is NOT consumed.
    let token = site.token(&format!("spiffe://{TRUST_DOMAIN}/good"));
    let issued_before = issued_count(&site.db_url()).await;
    assert_refused(
        &store,
        client.mint_x509_svid(&token, b"garbage".to_vec()).await,
        ErrorCode::CsrMalformed,
        act,
    )
    .await;
    let mut bad_sig = csr();
    let n = bad_sig.len();
    bad_sig[n - 3] ^= 1;
    assert_refused(
        &store,
        client.mint_x509_svid(&token, bad_sig).await,
        ErrorCode::CsrSignatureInvalid,
        act,
    )
    .await;
    let ca_csr = {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::new(vec![]).unwrap();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.serialize_request(&key).unwrap().der().to_vec()
    };
    assert_refused(
        &store,
        client.mint_x509_svid(&token, ca_csr).await,
        ErrorCode::CsrRequestsCa,
        act,
    )
    .await;
    assert_refused(
        &store,
        client.mint_x509_svid(&token, vec![0x30; 9 * 1024]).await,
        ErrorCode::RequestTooLarge,
        act,
    )
    .await;
    assert_refused(
        &store,
        client.mint_x509_svid(&"a".repeat(4096), csr()).await,
        ErrorCode::RequestTooLarge,
        act,
    )
    .await;
    // A message over the transport cap is refused before decoding; the server lives on.
    let huge = client
        .mint_x509_svid(&token, vec![0u8; 200 * 1024])
        .await
        .unwrap_err();
    assert!(matches!(huge, ClientError::Refused { .. }), "{huge}");
    assert_eq!(
        issued_count(&site.db_url()).await,
        issued_before,
        "nothing issued by refusals"
    );

    // The token still works once, and only once.
    let ok = client.mint_x509_svid(&token, csr()).await.unwrap();
    assert_eq!(ok.spiffe_id, format!("spiffe://{TRUST_DOMAIN}/good"));
    assert_refused(
        &store,
        client.mint_x509_svid(&token, csr()).await,
        ErrorCode::JoinTokenUsed,
        act,
    )
    .await;
    assert_eq!(issued_count(&site.db_url()).await, issued_before + 1);

    assert_eq!(
        server.http_get("/healthz").0,
        200,
        "the server survived every bad input"
    );
    store.verify_audit_chain(1, None).await.unwrap();
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_refusals() {
    let site = Site::new();
    let server = site.start();
    let store = Store::open(&site.db_url()).await.unwrap();
    let anchors = herald_client::files::from_pem(
        "CERTIFICATE",
        &std::fs::read_to_string(site.bundle_pem()).unwrap(),
    )
    .unwrap();
    let act = "x509_svid.renew";
    let csr = || generate_key_and_csr().unwrap().csr_der;

    // No client certificate at all.
    let anon = HeraldClient::connect(&server.url(), &anchors, None)
        .await
        .unwrap();
    assert_refused(
        &store,
        anon.renew_x509_svid(csr()).await,
        ErrorCode::MtlsRequired,
        act,
    )
    .await;

    // A properly minted SVID, to renew and then revoke.
    let token = site.token(&format!("spiffe://{TRUST_DOMAIN}/svc"));
    let kc = generate_key_and_csr().unwrap();
    let minted = anon
        .mint_x509_svid(&token, kc.csr_der.clone())
        .await
        .unwrap();
    let holder = |chain: Vec<Vec<u8>>, key: Vec<u8>| ClientIdentity {
        cert_chain: chain,
        key_pkcs8: key,
    };
    let c = HeraldClient::connect(
        &server.url(),
        &anchors,
        Some(holder(minted.cert_chain.clone(), kc.key_pkcs8.clone())),
    )
    .await
    .unwrap();

    // Renewing with the same key is refused.
    assert_refused(
        &store,
        c.renew_x509_svid(kc.csr_der.clone()).await,
        ErrorCode::RenewSameKey,
        act,
    )
    .await;

    // An expired SVID signed by the server's own CA.
    let ca = server_ca(&store).await;
    let expired_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let expired_csr = herald_ca::csr::verify_csr(
        rcgen::CertificateParams::new(vec![])
            .unwrap()
            .serialize_request(&expired_key)
            .unwrap()
            .der(),
    )
    .unwrap();
    // Issued 20 s ago for 1 s: expired now (the CA itself started before that).
    let expired = ca
        .issue_x509_svid(&expired_csr, &grant("/svc", 1), now() - 20)
        .unwrap();
    let c_exp = HeraldClient::connect(
        &server.url(),
        &anchors,
        Some(holder(
            vec![expired.cert_der.clone()],
            expired_key.serialize_der(),
        )),
    )
    .await
    .unwrap();
    assert_refused(
        &store,
        c_exp.renew_x509_svid(csr()).await,
        ErrorCode::SvidExpired,
        act,
    )
    .await;

    // A valid-looking SVID signed with the CA key but never issued (a forgery from a leaked key).
    let forged = ca
        .issue_x509_svid(&expired_csr, &grant("/svc", 600), now())
        .unwrap();
    let c_forged = HeraldClient::connect(
        &server.url(),
        &anchors,
        Some(holder(
            vec![forged.cert_der.clone()],
            expired_key.serialize_der(),
        )),
    )
    .await
    .unwrap();
    assert_refused(
        &store,
        c_forged.renew_x509_svid(csr()).await,
        ErrorCode::SvidInvalid,
        act,
    )
    .await;

    // An SVID from another trust domain, and one from an untrusted CA of ours.
    for (domain, code) in [
        ("other.org", ErrorCode::ForeignTrustDomain),
        (TRUST_DOMAIN, ErrorCode::SvidInvalid),
    ] {
        let other_td = TrustDomain::new(domain).unwrap();
        let m = CaMaterial::generate_root(&other_td, Duration::from_secs(3600), now()).unwrap();
        let other = CertificateAuthority::load(
            other_td.clone(),
            &m.key_id,
            &m.cert_der,
            &m.chain_der,
            &m.key_pkcs8,
        )
        .unwrap();
        let g = X509Grant {
            spiffe_id: other_td.spiffe_id("/svc").unwrap(),
            ttl: Duration::from_secs(600),
            dns_names: vec![],
        };
        let leaf = other.issue_x509_svid(&expired_csr, &g, now()).unwrap();
        let cl = HeraldClient::connect(
            &server.url(),
            &anchors,
            Some(holder(vec![leaf.cert_der], expired_key.serialize_der())),
        )
        .await
        .unwrap();
        assert_refused(&store, cl.renew_x509_svid(csr()).await, code, act).await;
    }

    // Revoked: renewals stop.
    let renewed = c.renew_x509_svid(csr()).await.unwrap();
    assert_ne!(renewed.serial, minted.serial);
    let out = site.herald(&[
        "revoke",
        "--serial",
        &minted.serial,
        "--reason",
        "key compromise",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_refused(
        &store,
        c.renew_x509_svid(csr()).await,
        ErrorCode::SvidRevoked,
        act,
    )
    .await;

    assert_eq!(server.http_get("/healthz").0, 200);
    store.verify_audit_chain(1, None).await.unwrap();
    store.close().await;
}
