//! A presented X.509 SVID against Herald's record of its serial: every
//! field that must match, the CA key that must have signed it, and the
//! lineage's standing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use herald_attest::{PresentedSvid, SvidError};
use herald_core::{CredentialStatus, ErrorCode, Origin, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, SerialNumber,
};

const NOW: i64 = 1_800_000_000;
const ID: &str = "spiffe://example.org/svc/api";

fn ca(name: &str) -> (Vec<u8>, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
    p.not_before = time::OffsetDateTime::from_unix_timestamp(NOW - 3600).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(NOW + 3600).unwrap();
    let cert = p.self_signed(&key).unwrap();
    (cert.der().to_vec(), Issuer::new(p, key))
}

fn leaf(issuer: &Issuer<'_, KeyPair>, key: &KeyPair, id: &str, serial: &[u8]) -> Vec<u8> {
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    p.serial_number = Some(SerialNumber::from_slice(serial));
    p.not_before = time::OffsetDateTime::from_unix_timestamp(NOW - 60).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(NOW + 600).unwrap();
    p.signed_by(key, issuer).unwrap().der().to_vec()
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn record(presented: &PresentedSvid) -> CredentialStatus {
    CredentialStatus {
        serial: presented.serial().into(),
        spiffe_id: ID.into(),
        kind: "x509_svid".into(),
        origin: Some(Origin::Node),
        policy: Some("nodes".into()),
        not_after: NOW + 600,
        public_key_sha256: presented.info().spki_sha256.clone(),
        ca_key_id: "k1".into(),
        cert_sha256: None,
        root_serial: "01".into(),
        root_at: NOW - 100,
        revoked: false,
        node_banned: false,
    }
}

/// Both ways a record authenticates a leaf: by the digest of the issued
/// certificate it keeps, or (a record written before digests were kept) by
/// the leaf's signature under the CA key it names.
#[test]
fn only_the_recorded_certificate_from_the_recorded_ca_key_verifies() {
    let (ca1, issuer1) = ca("Herald CA");
    let (_, rogue) = ca("Rogue CA");
    let key = KeyPair::generate().unwrap();
    let serial = [0x4a, 1, 2, 3, 4, 5, 6, 7, 8];
    let genuine = leaf(&issuer1, &key, ID, &serial);
    let p = PresentedSvid::parse(std::slice::from_ref(&genuine), &td(), NOW).unwrap();
    let by_signature = record(&p);
    let by_digest = CredentialStatus {
        cert_sha256: Some(p.info().cert_sha256.clone()),
        ..record(&p)
    };
    let by_key = |id: &str| (id == "k1").then_some(ca1.as_slice());
    let verify = |chain: Vec<u8>, rec: &CredentialStatus| {
        PresentedSvid::parse(&[chain], &td(), NOW)
            .unwrap()
            .verify(Some(rec), by_key, NOW)
    };
    let code = |chain: Vec<u8>, rec: &CredentialStatus| verify(chain, rec).unwrap_err().code();

    // Signed again by the genuine CA key under the same serial (ECDSA
    // signatures differ, so other bytes): its signature verifies, but it is
    // not the certificate whose digest the record keeps.
    let resigned = leaf(&issuer1, &key, ID, &serial);
    assert_ne!(resigned, genuine);
    assert!(verify(resigned.clone(), &by_signature).is_ok());
    assert_eq!(code(resigned, &by_digest), ErrorCode::SvidRecordMismatch);

    let forged = leaf(&rogue, &key, ID, &serial);
    for rec in [by_signature, by_digest] {
        let ok = p.clone().verify(Some(&rec), by_key, NOW).unwrap();
        assert_eq!(
            (ok.origin, ok.root_serial.as_str(), ok.policy.as_deref()),
            (Origin::Node, "01", Some("nodes"))
        );
        // The same serial, key and SPIFFE ID, from another CA: refused.
        assert_eq!(code(forged.clone(), &rec), ErrorCode::SvidRecordMismatch);
        // Another key, or another SPIFFE ID, under the genuine CA: refused.
        let other_key = KeyPair::generate().unwrap();
        assert_eq!(
            code(leaf(&issuer1, &other_key, ID, &serial), &rec),
            ErrorCode::SvidRecordMismatch
        );
        assert_eq!(
            code(
                leaf(&issuer1, &key, "spiffe://example.org/svc/other", &serial),
                &rec
            ),
            ErrorCode::SvidRecordMismatch
        );
        // The record names a CA key no longer in the bundle, or another
        // kind: refused even with the right bytes.
        let retired = CredentialStatus {
            ca_key_id: "k0".into(),
            ..rec.clone()
        };
        assert_eq!(
            code(genuine.clone(), &retired),
            ErrorCode::SvidRecordMismatch
        );
        let jwt = CredentialStatus {
            kind: "jwt_svid".into(),
            ..rec.clone()
        };
        assert_eq!(code(genuine.clone(), &jwt), ErrorCode::SvidRecordMismatch);
        // Revoked lineage; banned node.
        let revoked = CredentialStatus {
            revoked: true,
            ..rec.clone()
        };
        assert_eq!(code(genuine.clone(), &revoked), ErrorCode::SvidRevoked);
        let banned = CredentialStatus {
            node_banned: true,
            ..rec.clone()
        };
        assert_eq!(code(genuine.clone(), &banned), ErrorCode::NodeBanned);
    }
    // Not issued here.
    assert_eq!(
        p.verify(None, by_key, NOW).unwrap_err(),
        SvidError::NotIssuedHere
    );
    // Outside its validity window or trust domain: refused before any lookup.
    assert_eq!(
        PresentedSvid::parse(std::slice::from_ref(&genuine), &td(), NOW + 601).unwrap_err(),
        SvidError::Expired
    );
    assert_eq!(
        PresentedSvid::parse(&[genuine], &TrustDomain::new("other.org").unwrap(), NOW)
            .unwrap_err()
            .code(),
        ErrorCode::ForeignTrustDomain
    );
}
