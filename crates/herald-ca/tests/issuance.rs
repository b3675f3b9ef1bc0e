//! X.509 SVID issuance against the X509-SVID standard, checked by parsing
//! the issued certificates with x509-parser and validating them with webpki.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::Duration;

use herald_attest::svid::{SvidError, parse_x509_svid, verify_x509_svid};
use herald_ca::authority::{CLOCK_SKEW, CaMaterial};
use herald_ca::csr::verify_csr;
use herald_ca::{CaError, CertificateAuthority, TrustBundle, X509Grant};
use herald_core::{SpiffeId, TrustDomain};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, PKCS_ECDSA_P256_SHA256};
use x509_parser::extensions::{GeneralName, ParsedExtension};

const NOW: i64 = 1_800_000_000;

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn root_ca() -> CertificateAuthority {
    let m = CaMaterial::generate_root(&td(), Duration::from_secs(86400), NOW).unwrap();
    CertificateAuthority::load(td(), &m.key_id, &m.cert_der, &m.chain_der, &m.key_pkcs8).unwrap()
}

fn csr_for(key: &KeyPair, params: CertificateParams) -> Vec<u8> {
    params.serialize_request(key).unwrap().der().to_vec()
}

fn plain_csr() -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let der = csr_for(&key, CertificateParams::new(vec![]).unwrap());
    (key, der)
}

fn grant(path: &str, ttl: u64) -> X509Grant {
    X509Grant {
        spiffe_id: td().spiffe_id(path).unwrap(),
        ttl: Duration::from_secs(ttl),
        dns_names: vec![],
    }
}

#[test]
fn leaf_obeys_every_x509_svid_rule() {
    let ca = root_ca();
    let (_, der) = plain_csr();
    let csr = verify_csr(&der).unwrap();
    let issued = ca
        .issue_x509_svid(&csr, &grant("/workload/a", 3600), NOW)
        .unwrap();
    let (_, cert) = x509_parser::parse_x509_certificate(&issued.cert_der).unwrap();

    // Exactly one URI SAN, the granted SPIFFE ID.
    let san = cert.subject_alternative_name().unwrap().unwrap();
    let uris: Vec<_> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, vec!["spiffe://example.org/workload/a"]);

    // basicConstraints present with cA=false.
    let bc = cert
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints present");
    assert!(!bc.value.ca);

    // keyUsage critical, digitalSignature only.
    let ku = cert.key_usage().unwrap().expect("keyUsage present");
    assert!(ku.critical, "keyUsage must be critical");
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign() && !ku.value.crl_sign());
    assert!(!ku.value.key_encipherment() && !ku.value.non_repudiation());

    // EKU serverAuth + clientAuth.
    let eku = cert.extended_key_usage().unwrap().expect("EKU present");
    assert!(eku.value.server_auth && eku.value.client_auth);

    // Random serial of at least 64 bits, positive.
    let serial = cert.raw_serial();
    assert!(serial.len() * 8 >= 64, "serial is {} bytes", serial.len());
    assert_eq!(serial[0] & 0x80, 0);
    assert_eq!(hex::encode(serial), issued.serial_hex);

    // Validity: starts in the past by the skew allowance, ends at now + ttl.
    assert_eq!(
        cert.validity().not_before.timestamp(),
        NOW - CLOCK_SKEW.as_secs() as i64
    );
    assert_eq!(cert.validity().not_after.timestamp(), NOW + 3600);

    // The key is the CSR's.
    assert_eq!(cert.public_key().raw, csr.spki_der.as_slice());

    // Authority key identifier present and matching the CA's subject key identifier.
    let (_, ca_cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
    let ski = ca_cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(k) => Some(k.0.to_vec()),
            _ => None,
        })
        .unwrap();
    let aki = cert
        .extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| k.0.to_vec())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(aki, ski);

    // Our own parser agrees, and the chain validates for client auth.
    let info = parse_x509_svid(&issued.cert_der).unwrap();
    assert_eq!(info.serial_hex, issued.serial_hex);
    let anchors = vec![ca.trust_anchor().to_vec()];
    let v = verify_x509_svid(
        std::slice::from_ref(&issued.cert_der),
        &anchors,
        &td(),
        NOW + 10,
    )
    .unwrap();
    assert_eq!(v.spiffe_id.as_str(), "spiffe://example.org/workload/a");
}

#[test]
fn signing_certificate_obeys_the_rules() {
    let ca = root_ca();
    let (_, cert) = x509_parser::parse_x509_certificate(ca.cert_der()).unwrap();
    let bc = cert.basic_constraints().unwrap().unwrap();
    assert!(bc.value.ca);
    let ku = cert.key_usage().unwrap().unwrap();
    assert!(ku.value.key_cert_sign());
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI("spiffe://example.org")],
        "a signing certificate's SPIFFE ID has no path"
    );
}

#[test]
fn serials_are_unique() {
    let ca = root_ca();
    let (_, der) = plain_csr();
    let csr = verify_csr(&der).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..200 {
        let s = ca
            .issue_x509_svid(&csr, &grant("/w", 60), NOW)
            .unwrap()
            .serial_hex;
        assert!(seen.insert(s));
    }
}

#[test]
fn validity_never_outlives_the_ca() {
    let ca = root_ca();
    let (_, der) = plain_csr();
    let csr = verify_csr(&der).unwrap();
    let issued = ca
        .issue_x509_svid(&csr, &grant("/w", 10 * 86400), NOW)
        .unwrap();
    assert_eq!(issued.not_after, ca.not_after());
    let late = ca.issue_x509_svid(&csr, &grant("/w", 60), ca.not_after() + 1);
    assert!(late.is_err(), "an expired CA issues nothing");
}

#[test]
fn spiffe_id_comes_from_the_grant_not_the_csr() {
    let ca = root_ca();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let der = csr_for(
        &key,
        CertificateParams::new(vec!["evil.example.com".to_string(), "10.0.0.1".to_string()])
            .unwrap(),
    );
    let csr = verify_csr(&der).unwrap();
    let issued = ca
        .issue_x509_svid(&csr, &grant("/granted", 60), NOW)
        .unwrap();
    let info = parse_x509_svid(&issued.cert_der).unwrap();
    assert_eq!(info.spiffe_id.as_str(), "spiffe://example.org/granted");
    assert!(
        info.dns_names.is_empty(),
        "SANs requested in the CSR are never honoured"
    );
}

#[test]
fn grant_outside_the_trust_domain_is_refused() {
    let ca = root_ca();
    let (_, der) = plain_csr();
    let csr = verify_csr(&der).unwrap();
    let g = X509Grant {
        spiffe_id: SpiffeId::parse("spiffe://other.org/w").unwrap(),
        ttl: Duration::from_secs(60),
        dns_names: vec![],
    };
    assert!(ca.issue_x509_svid(&csr, &g, NOW).is_err());
}

#[test]
fn bad_csrs_are_refused_with_their_codes() {
    use herald_core::ErrorCode;
    let (_, mut der) = plain_csr();
    assert!(matches!(
        verify_csr(b"not a csr"),
        Err(CaError::CsrMalformed(_))
    ));
    assert!(matches!(verify_csr(&[]), Err(CaError::CsrMalformed(_))));
    let mut trailing = der.clone();
    trailing.push(0);
    assert!(matches!(
        verify_csr(&trailing),
        Err(CaError::CsrMalformed(_))
    ));
    assert!(matches!(
        verify_csr(&vec![0x30; 9000]),
        Err(CaError::CsrMalformed(_))
    ));

    // Flip a bit in the signature (the last bytes of the DER).
    let n = der.len();
    der[n - 3] ^= 0x01;
    let err = verify_csr(&der).unwrap_err();
    assert!(matches!(err, CaError::CsrSignature(_)), "{err:?}");
    assert_eq!(err.code(), ErrorCode::CsrSignatureInvalid);

    // A CSR asking to be a CA.
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let err = verify_csr(&csr_for(&key, p)).unwrap_err();
    assert!(matches!(err, CaError::CsrRequestsCa), "{err:?}");
    assert_eq!(err.code(), ErrorCode::CsrRequestsCa);
}

#[test]
fn other_key_types_are_accepted_or_refused() {
    for alg in [&rcgen::PKCS_ECDSA_P384_SHA384, &rcgen::PKCS_ED25519] {
        let key = KeyPair::generate_for(alg).unwrap();
        let der = csr_for(&key, CertificateParams::new(vec![]).unwrap());
        verify_csr(&der).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
    }
}

#[test]
fn intermediate_under_an_upstream_ca_chains_to_it() {
    // An "existing" upstream root, as an operator would hold it.
    let upstream_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut up = CertificateParams::new(vec![]).unwrap();
    up.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    up.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    up.not_before = time::OffsetDateTime::from_unix_timestamp(NOW - 1000).unwrap();
    up.not_after = time::OffsetDateTime::from_unix_timestamp(NOW + 7200).unwrap();
    let upstream = up.self_signed(&upstream_key).unwrap();

    let m = CaMaterial::generate_intermediate(
        &td(),
        &upstream.pem(),
        &upstream_key.serialize_pem(),
        Duration::from_secs(86400),
        NOW,
    )
    .unwrap();
    assert_eq!(
        m.not_after,
        NOW + 7200,
        "intermediate clamped to the upstream's validity"
    );
    let ca = CertificateAuthority::load(td(), &m.key_id, &m.cert_der, &m.chain_der, &m.key_pkcs8)
        .unwrap();
    assert_eq!(ca.trust_anchor(), upstream.der().as_ref());

    let (_, der) = plain_csr();
    let issued = ca
        .issue_x509_svid(&verify_csr(&der).unwrap(), &grant("/w", 3600), NOW)
        .unwrap();
    assert_eq!(issued.intermediates, vec![m.cert_der.clone()]);
    let mut chain = vec![issued.cert_der.clone()];
    chain.extend(issued.intermediates.clone());
    verify_x509_svid(&chain, &[upstream.der().to_vec()], &td(), NOW + 5).unwrap();
    // Without the intermediate the leaf does not chain.
    assert!(matches!(
        verify_x509_svid(&chain[..1], &[upstream.der().to_vec()], &td(), NOW + 5),
        Err(SvidError::Untrusted(_))
    ));

    // A key that does not match the upstream certificate is refused.
    let wrong = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    assert!(
        CaMaterial::generate_intermediate(
            &td(),
            &upstream.pem(),
            &wrong.serialize_pem(),
            Duration::from_secs(60),
            NOW
        )
        .is_err()
    );
}

#[test]
fn verification_failures_have_their_reasons() {
    let ca = root_ca();
    let other = root_ca();
    let (_, der) = plain_csr();
    let csr = verify_csr(&der).unwrap();
    let issued = ca.issue_x509_svid(&csr, &grant("/w", 600), NOW).unwrap();
    let anchors = vec![ca.trust_anchor().to_vec()];
    let chain = vec![issued.cert_der.clone()];
    assert_eq!(
        verify_x509_svid(&chain, &anchors, &td(), NOW + 601),
        Err(SvidError::Expired)
    );
    assert!(matches!(
        verify_x509_svid(&chain, &[other.trust_anchor().to_vec()], &td(), NOW),
        Err(SvidError::Untrusted(_))
    ));
    let foreign = TrustDomain::new("other.org").unwrap();
    assert_eq!(
        verify_x509_svid(&chain, &anchors, &foreign, NOW),
        Err(SvidError::ForeignTrustDomain("example.org".into()))
    );
    // A CA certificate is not an SVID.
    assert!(matches!(
        parse_x509_svid(ca.cert_der()),
        Err(SvidError::NotAnSvid(_))
    ));
}

#[test]
fn bundle_jwks_follows_the_spiffe_bundle_format() {
    let ca = root_ca();
    let (jwt, _) = herald_ca::JwtSigner::generate().unwrap();
    let bundle = TrustBundle {
        trust_domain: td(),
        x509_authorities: vec![ca.trust_anchor().to_vec()],
        jwt_authorities: vec![(jwt.kid().to_string(), jwt.public_point().to_vec())],
        sequence: 7,
        refresh_hint_secs: 300,
    };
    let jwks = bundle.to_jwks().unwrap();
    assert_eq!(jwks["spiffe_sequence"], 7);
    assert_eq!(jwks["spiffe_refresh_hint"], 300);
    let key = &jwks["keys"][0];
    assert_eq!(key["use"], "x509-svid");
    assert_eq!(key["kty"], "EC");
    assert_eq!(key["crv"], "P-256");
    assert!(key.get("kid").is_none(), "x509-svid entries carry no kid");
    assert_eq!(key["x5c"].as_array().unwrap().len(), 1);
    assert_eq!(key["x"].as_str().unwrap().len(), 43);
    let jwt_key = &jwks["keys"][1];
    assert_eq!(jwt_key["use"], "jwt-svid");
    assert_eq!(jwt_key["kid"], jwt.kid());
    assert!(jwt_key.get("x5c").is_none());
    let oidc = bundle.to_oidc_jwks();
    assert_eq!(oidc["keys"].as_array().unwrap().len(), 1);
    assert_eq!(oidc["keys"][0]["use"], "sig");
    assert_eq!(oidc["keys"][0]["alg"], "ES256");
    let pem = bundle.to_pem();
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
}
