//! JWT header and claims parsing: the OIDC verifier (exchange evidence),
//! Herald's own JWT check (introspection) and the agent's JWT-SVID
//! validation (Workload API `ValidateJWTSVID`).

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_attest::oidc::IssuerConfig;
use herald_attest::{OidcError, OidcVerifier};
use herald_core::ErrorCode;
use serde_json::{Map, Value};

/// The fixture issuer.
pub const ISSUER: &str = "https://issuer.example";
/// The audience it is configured with.
pub const AUDIENCE: &str = "herald";
/// The fixture key's `kid`.
pub const KID: &str = "fuzz-key";
/// The time every check runs at (Unix seconds): 2023-11-14.
pub const NOW: i64 = 1_700_000_000;
/// The trust domain of JWT-SVIDs.
pub const TRUST_DOMAIN: &str = "example.org";

/// The OIDC verifier for [`ISSUER`], with the fixture key as a static JWKS
/// (the air-gapped configuration: no HTTP).
fn verifier() -> &'static OidcVerifier {
    static V: OnceLock<(tempfile::TempDir, OidcVerifier)> = OnceLock::new();
    &V.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("jwks.json");
        let jwks = serde_json::json!({
            "keys": [herald_ca::jwt::jwk_from_point(KID, crate::p256_point(), "sig")]
        });
        std::fs::write(&path, jwks.to_string()).expect("the JWKS file");
        let mut cfg = IssuerConfig::new(ISSUER, vec![AUDIENCE.to_string()]);
        cfg.static_jwks = Some(path);
        let v = OidcVerifier::new(vec![cfg]).expect("the fixture verifier");
        (dir, v)
    })
    .1
}

/// The SPIFFE bundle JWKS the agent validates JWT-SVIDs against.
pub(crate) fn bundle_jwks() -> &'static str {
    static J: OnceLock<String> = OnceLock::new();
    J.get_or_init(|| {
        serde_json::json!({
            "keys": [herald_ca::jwt::jwk_from_point(KID, crate::p256_point(), "jwt-svid")]
        })
        .to_string()
    })
}

/// A compact JWS over the raw header and claims bytes, ES256 with the
/// fixture key (whatever the header says).
pub fn sign(header: &[u8], claims: &[u8]) -> String {
    let mut token = URL_SAFE_NO_PAD.encode(header);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(claims, &mut token);
    let sig = crate::sign_with(crate::p256(), token.as_bytes());
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(sig, &mut token);
    token
}

fn object(bytes: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    }
}

/// Mode 0: `rest` is a token as received (never signed by the fixture
/// key, so it must never verify anywhere). Mode 1: `rest` is header JSON
/// `0xff` claims JSON, signed here with the key the verifiers trust, so
/// that header and claims checks behind the signature are reached.
pub fn jwt(data: &[u8]) {
    let Some((mode, rest)) = crate::mode(data, 2) else {
        return;
    };
    if mode == 0 {
        let Ok(token) = std::str::from_utf8(rest) else {
            return;
        };
        match crate::block_on(verifier().verify(token, NOW)) {
            Ok(t) => panic!("a token not signed by the issuer verified: {:?}", t.subject),
            Err(e) => typed(&e),
        }
        assert!(herald_ca::jwt::verify_jwt(token, &authorities(), NOW).is_none());
        assert!(
            herald_agent::workload::jwt::validate(token, AUDIENCE, bundle_jwks(), TRUST_DOMAIN)
                .is_err()
        );
        return;
    }
    let parts = crate::split(rest, 2);
    let (header, claims) = (parts[0], parts.get(1).copied().unwrap_or_default());
    let token = sign(header, claims);
    let h = object(header);
    let c = object(claims);
    match crate::block_on(verifier().verify(&token, NOW)) {
        Ok(t) => {
            crate::accept();
            let c = c.expect("verified claims are a JSON object");
            assert_eq!(t.issuer, ISSUER);
            assert_eq!(c.get("iss").and_then(Value::as_str), Some(ISSUER));
            assert!(!t.subject.is_empty());
            assert!(!t.audiences.is_empty() && t.audiences.iter().all(|a| a == AUDIENCE));
            assert!(t.expires_at.saturating_add(60) >= NOW);
            assert!(t.replay_key.starts_with("jti:") || t.replay_key.starts_with("sha256:"));
            assert!(!h.expect("a verified header").contains_key("crit"));
            // Normalised claims are a fixed point of normalisation.
            let mut again = t.claims.clone();
            herald_attest::oidc::claims::normalise(&mut again);
            assert_eq!(again, t.claims);
        }
        Err(e) => {
            typed(&e);
            // The signature is the issuer key's: an ES256 token naming that
            // key (or none) is never refused for its signature.
            let ours = h.as_ref().is_some_and(|h| {
                h.get("alg") == Some(&Value::from("ES256"))
                    && h.get("kid").is_none_or(|k| k == KID)
                    && !h.contains_key("crit")
            }) && c
                .as_ref()
                .is_some_and(|c| c.get("iss") == Some(&Value::from(ISSUER)));
            if ours {
                assert!(
                    !matches!(e, OidcError::SignatureInvalid),
                    "a token signed by the issuer's key refused for its signature"
                );
            }
        }
    }
    if let Some(claims) = herald_ca::jwt::verify_jwt(&token, &authorities(), NOW) {
        crate::accept();
        assert!(
            claims
                .get("exp")
                .and_then(Value::as_i64)
                .is_some_and(|e| e > NOW)
        );
    }
    if let Ok((id, claims)) =
        herald_agent::workload::jwt::validate(&token, AUDIENCE, bundle_jwks(), TRUST_DOMAIN)
    {
        crate::accept();
        let id = herald_core::SpiffeId::parse(&id).expect("a validated sub is a SPIFFE ID");
        assert_eq!(id.trust_domain().as_str(), TRUST_DOMAIN);
        assert_eq!(claims.get("sub").and_then(Value::as_str), Some(id.as_str()));
    }
}

fn authorities() -> Vec<(String, Vec<u8>)> {
    vec![(KID.to_string(), crate::p256_point().to_vec())]
}

fn typed(e: &OidcError) {
    assert_ne!(e.code(), ErrorCode::Internal, "untyped OIDC refusal {e:?}");
}
