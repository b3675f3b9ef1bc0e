//! `ValidateJWTSVID`: a JWT-SVID checked against the trust bundle's JWT
//! authorities, exactly as the JWT-SVID standard allows — header only
//! `alg`, `kid`, `typ` (JWT or JOSE); `alg` among the RS/ES/PS 256-512
//! family; a known `kid`; valid signature; `sub` a SPIFFE ID of this trust
//! domain; `aud` containing the audience; `exp` in the future.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_core::SpiffeId;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

/// Why a JWT-SVID is not valid.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    /// The token is not a well-formed JWS compact JWT.
    #[error("malformed JWT-SVID: {0}")]
    Malformed(String),
    /// A header field other than alg, kid, typ, or a refused algorithm.
    #[error("JWT-SVID header refused: {0}")]
    Header(String),
    /// No bundle key has this kid.
    #[error("no JWT authority in the trust bundle has key ID {0:?}")]
    UnknownKey(String),
    /// Signature, audience, expiry or subject check failed.
    #[error("JWT-SVID invalid: {0}")]
    Invalid(String),
}

const ALLOWED: &[(&str, Algorithm)] = &[
    ("RS256", Algorithm::RS256),
    ("RS384", Algorithm::RS384),
    ("RS512", Algorithm::RS512),
    ("ES256", Algorithm::ES256),
    ("ES384", Algorithm::ES384),
    ("PS256", Algorithm::PS256),
    ("PS384", Algorithm::PS384),
    ("PS512", Algorithm::PS512),
];

/// Largest token accepted.
pub const MAX_TOKEN: usize = 16 * 1024;

/// Validates `token` for `audience` against the bundle JWKS (`jwks_json`,
/// SPIFFE bundle format) of `trust_domain`; returns the SPIFFE ID and claims.
pub fn validate(
    token: &str,
    audience: &str,
    jwks_json: &str,
    trust_domain: &str,
) -> Result<(String, Map<String, Value>), JwtError> {
    if token.len() > MAX_TOKEN {
        return Err(JwtError::Malformed("token exceeds 16 KiB".into()));
    }
    let header_b64 = token
        .split('.')
        .next()
        .filter(|_| token.split('.').count() == 3)
        .ok_or_else(|| JwtError::Malformed("not three dot-separated parts".into()))?;
    let header: Map<String, Value> = URL_SAFE_NO_PAD
        .decode(header_b64)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| JwtError::Malformed("the header is not base64url JSON".into()))?;
    if let Some(k) = header
        .keys()
        .find(|k| !["alg", "kid", "typ"].contains(&k.as_str()))
    {
        return Err(JwtError::Header(format!("field {k:?} is not allowed")));
    }
    if let Some(t) = header.get("typ")
        && t != "JWT"
        && t != "JOSE"
    {
        return Err(JwtError::Header("typ must be JWT or JOSE".into()));
    }
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let alg = ALLOWED
        .iter()
        .find(|(n, _)| *n == alg_name)
        .map(|(_, a)| *a)
        .ok_or_else(|| JwtError::Header(format!("alg {alg_name:?} is not accepted")))?;
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::Header("kid is required".into()))?;
    let jwks: Value = serde_json::from_str(jwks_json)
        .map_err(|e| JwtError::Invalid(format!("the trust bundle is not JSON: {e}")))?;
    let jwk = jwks["keys"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|k| k["use"] == "jwt-svid" && k["kid"] == kid)
        .ok_or_else(|| JwtError::UnknownKey(kid.to_owned()))?;
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone())
        .map_err(|e| JwtError::Invalid(format!("bundle key {kid}: {e}")))?;
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| JwtError::Invalid(e.to_string()))?;
    let mut v = Validation::new(alg);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "aud", "sub"]);
    v.leeway = 30;
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, &key, &v)
        .map_err(|e| JwtError::Invalid(e.to_string()))?;
    let sub = data
        .claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::Invalid("sub is not a string".into()))?;
    let id = SpiffeId::parse(sub).map_err(|e| JwtError::Invalid(format!("sub: {e}")))?;
    if id.trust_domain().as_str() != trust_domain {
        return Err(JwtError::Invalid(format!(
            "sub {sub} is not in the trust domain {trust_domain}"
        )));
    }
    Ok((sub.to_owned(), data.claims))
}

/// The trust domain a token's (unverified) `sub` names: which bundle to
/// verify it with. Nothing else is read from the unverified payload.
pub fn claimed_trust_domain(token: &str) -> Result<String, JwtError> {
    if token.len() > MAX_TOKEN {
        return Err(JwtError::Malformed("token exceeds 16 KiB".into()));
    }
    let payload = token
        .split('.')
        .nth(1)
        .filter(|_| token.split('.').count() == 3)
        .ok_or_else(|| JwtError::Malformed("not three dot-separated parts".into()))?;
    let claims: Map<String, Value> = URL_SAFE_NO_PAD
        .decode(payload)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or_else(|| JwtError::Malformed("the payload is not base64url JSON".into()))?;
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .ok_or_else(|| JwtError::Invalid("sub is not a string".into()))?;
    let id = SpiffeId::parse(sub).map_err(|e| JwtError::Invalid(format!("sub: {e}")))?;
    Ok(id.trust_domain().as_str().to_owned())
}

/// JSON → protobuf `Struct` for the response's claims.
pub fn to_struct(map: Map<String, Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map.into_iter().map(|(k, v)| (k, to_value(v))).collect(),
    }
}

fn to_value(v: Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        Value::Null => Kind::NullValue(0),
        Value::Bool(b) => Kind::BoolValue(b),
        Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        Value::String(s) => Kind::StringValue(s),
        Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(to_value).collect(),
        }),
        Value::Object(o) => Kind::StructValue(to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    fn key() -> (EcdsaKeyPair, String) {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let kp =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref()).unwrap();
        let p = kp.public_key().as_ref().to_vec();
        let jwks = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": "k1",
             "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])}
        ]});
        (kp, jwks.to_string())
    }

    fn sign(kp: &EcdsaKeyPair, header: Value, claims: Value) -> String {
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let sig = kp.sign(&rng, input.as_bytes()).unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }

    #[test]
    fn only_well_formed_current_tokens_for_the_audience_validate() {
        let (kp, jwks) = key();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let h = serde_json::json!({"alg": "ES256", "kid": "k1", "typ": "JWT"});
        let claims = |exp: i64, sub: &str| serde_json::json!({"sub": sub, "aud": ["api"], "exp": exp, "iat": now});
        let good = sign(&kp, h.clone(), claims(now + 300, "spiffe://td/w"));
        let (id, c) = validate(&good, "api", &jwks, "td").unwrap();
        assert_eq!(id, "spiffe://td/w");
        assert_eq!(c["aud"], serde_json::json!(["api"]));

        let expired = sign(&kp, h.clone(), claims(now - 3600, "spiffe://td/w"));
        assert!(matches!(
            validate(&expired, "api", &jwks, "td"),
            Err(JwtError::Invalid(_))
        ));
        assert!(matches!(
            validate(&good, "other", &jwks, "td"),
            Err(JwtError::Invalid(_))
        ));
        let foreign = sign(&kp, h.clone(), claims(now + 300, "spiffe://other/w"));
        assert!(matches!(
            validate(&foreign, "api", &jwks, "td"),
            Err(JwtError::Invalid(_))
        ));
        let extra = sign(
            &kp,
            serde_json::json!({"alg": "ES256", "kid": "k1", "jku": "https://evil"}),
            claims(now + 300, "spiffe://td/w"),
        );
        assert!(matches!(
            validate(&extra, "api", &jwks, "td"),
            Err(JwtError::Header(_))
        ));
        let unknown = sign(
            &kp,
            serde_json::json!({"alg": "ES256", "kid": "k2"}),
            claims(now + 300, "spiffe://td/w"),
        );
        assert!(matches!(
            validate(&unknown, "api", &jwks, "td"),
            Err(JwtError::UnknownKey(_))
        ));
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"none","kid":"k1"}"#),
            URL_SAFE_NO_PAD.encode(claims(now + 300, "spiffe://td/w").to_string())
        );
        assert!(matches!(
            validate(&none, "api", &jwks, "td"),
            Err(JwtError::Header(_))
        ));
        let (other_kp, _) = key();
        let forged = sign(&other_kp, h, claims(now + 300, "spiffe://td/w"));
        assert!(matches!(
            validate(&forged, "api", &jwks, "td"),
            Err(JwtError::Invalid(_))
        ));
        assert!(validate("a.b", "api", &jwks, "td").is_err());
        assert!(validate(&"x".repeat(MAX_TOKEN + 1), "api", &jwks, "td").is_err());
    }
}
