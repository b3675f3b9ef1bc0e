//! JWT-SVIDs and Herald's other signed JWTs (ES256).
//!
//! The header is exactly `{"alg":"ES256","kid":…,"typ":"JWT"}` as the
//! JWT-SVID standard requires. The key pair is parsed once and kept, so a
//! signature costs one ECDSA sign (~20 µs with aws-lc-rs), not a PKCS#8
//! parse plus a sign.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_core::SpiffeId;
use serde_json::{Value, json};
use zeroize::Zeroizing;

use crate::CaError;

/// An ES256 signing key with its `kid`.
pub struct JwtSigner {
    kid: String,
    key: EcdsaKeyPair,
    header_b64: String,
    rng: SystemRandom,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner").field("kid", &self.kid).finish()
    }
}

/// The claims of a JWT-SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvidClaims {
    /// `sub`: the SPIFFE ID.
    pub spiffe_id: SpiffeId,
    /// `aud`: at least one audience.
    pub audiences: Vec<String>,
    /// `iat`, Unix seconds.
    pub issued_at: i64,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// `jti`: unique per token (Herald uses the credential serial).
    pub jti: String,
    /// `iss`: Herald's issuer URL, when configured.
    pub issuer: Option<String>,
}

impl JwtSigner {
    /// A fresh key; returns the signer and its PKCS#8 DER for sealing at rest.
    pub fn generate() -> Result<(Self, Zeroizing<Vec<u8>>), CaError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| CaError::Generate("JWT key generation failed".into()))?;
        let pkcs8 = Zeroizing::new(pkcs8.as_ref().to_vec());
        let mut id = [0u8; 8];
        aws_lc_rs::rand::fill(&mut id)
            .map_err(|_| CaError::Generate("random source failed".into()))?;
        let signer = Self::from_pkcs8(&hex::encode(id), &pkcs8)?;
        Ok((signer, pkcs8))
    }

    /// Loads a key from PKCS#8 DER.
    pub fn from_pkcs8(kid: &str, pkcs8: &[u8]) -> Result<Self, CaError> {
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8)
            .map_err(|e| CaError::Material(format!("JWT key {kid}: {e}")))?;
        let header = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
        Ok(Self {
            kid: kid.to_string(),
            key,
            header_b64: URL_SAFE_NO_PAD.encode(header.to_string()),
            rng: SystemRandom::new(),
        })
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public key as the uncompressed SEC1 point (65 bytes).
    pub fn public_point(&self) -> &[u8] {
        self.key.public_key().as_ref()
    }

    /// The public key as a JWK with `use` (`jwt-svid` in a SPIFFE bundle,
    /// `sig` in an OIDC JWKS).
    pub fn public_jwk(&self, use_: &str) -> Value {
        jwk_from_point(&self.kid, self.public_point(), use_)
    }

    /// Signs a JWT-SVID.
    pub fn sign_jwt_svid(&self, c: &JwtSvidClaims) -> Result<String, CaError> {
        if c.audiences.is_empty() {
            return Err(CaError::Material("a JWT-SVID needs an audience".into()));
        }
        let aud = if c.audiences.len() == 1 {
            Value::String(c.audiences[0].clone())
        } else {
            json!(c.audiences)
        };
        let mut claims = json!({
            "sub": c.spiffe_id.as_str(),
            "aud": aud,
            "exp": c.expires_at,
            "iat": c.issued_at,
            "jti": c.jti,
        });
        if let Some(iss) = &c.issuer {
            claims["iss"] = Value::String(iss.clone());
        }
        self.sign_claims(&claims)
    }

    /// Signs arbitrary claims with the JWT-SVID header.
    pub fn sign_claims(&self, claims: &Value) -> Result<String, CaError> {
        self.sign_with_header(&self.header_b64, claims)
    }

    /// Signs claims under a header whose `typ` is `typ`: a signed object
    /// that must never pass for a JWT-SVID (or the other way round).
    pub fn sign_typed(&self, typ: &str, claims: &Value) -> Result<String, CaError> {
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": typ});
        self.sign_with_header(&URL_SAFE_NO_PAD.encode(header.to_string()), claims)
    }

    fn sign_with_header(&self, header_b64: &str, claims: &Value) -> Result<String, CaError> {
        let mut out = String::with_capacity(512);
        out.push_str(header_b64);
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(claims.to_string(), &mut out);
        let sig = self
            .key
            .sign(&self.rng, out.as_bytes())
            .map_err(|_| CaError::Generate("ES256 signing failed".into()))?;
        out.push('.');
        URL_SAFE_NO_PAD.encode_string(sig.as_ref(), &mut out);
        Ok(out)
    }
}

/// Verifies one of Herald's own ES256 JWTs against its JWT authorities
/// (`kid`, uncompressed point) and checks `exp`. Returns the claims, or
/// `None` for anything that is not a valid, unexpired Herald JWT — the
/// introspection answer is "inactive" whatever the reason.
pub fn verify_jwt(
    token: &str,
    authorities: &[(String, Vec<u8>)],
    now: i64,
) -> Option<serde_json::Map<String, Value>> {
    if token.len() > 16 * 1024 {
        return None;
    }
    let mut parts = token.splitn(3, '.');
    let (h, c, s) = (parts.next()?, parts.next()?, parts.next()?);
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).ok()?).ok()?;
    if header.get("alg")?.as_str()? != "ES256" {
        return None;
    }
    let kid = header.get("kid")?.as_str()?;
    let (_, point) = authorities.iter().find(|(k, _)| k == kid)?;
    let sig = URL_SAFE_NO_PAD.decode(s).ok()?;
    let key = aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
        point,
    );
    let signed = &token.as_bytes()[..h.len() + 1 + c.len()];
    key.verify(signed, &sig).ok()?;
    let claims: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).ok()?).ok()?;
    let claims = claims.as_object()?.clone();
    if claims.get("exp")?.as_i64()? <= now {
        return None;
    }
    Some(claims)
}

/// A P-256 public JWK from an uncompressed point.
pub fn jwk_from_point(kid: &str, point: &[u8], use_: &str) -> Value {
    let (x, y) = if point.len() == 65 {
        (&point[1..33], &point[33..65])
    } else {
        (&[][..], &[][..])
    };
    let mut jwk = json!({
        "kty": "EC",
        "crv": "P-256",
        "x": URL_SAFE_NO_PAD.encode(x),
        "y": URL_SAFE_NO_PAD.encode(y),
        "kid": kid,
        "use": use_,
    });
    if use_ == "sig" {
        jwk["alg"] = Value::String("ES256".into());
    }
    jwk
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwt_svid_has_exactly_the_standard_header_and_claims() {
        let (signer, pkcs8) = JwtSigner::generate().unwrap();
        let again = JwtSigner::from_pkcs8(signer.kid(), &pkcs8).unwrap();
        assert_eq!(again.public_point(), signer.public_point());
        let token = signer
            .sign_jwt_svid(&JwtSvidClaims {
                spiffe_id: SpiffeId::parse("spiffe://td.test/ci/app").unwrap(),
                audiences: vec!["deployer".into()],
                issued_at: 100,
                expires_at: 400,
                jti: "abc".into(),
                issuer: None,
            })
            .unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(
            header,
            json!({"alg": "ES256", "kid": signer.kid(), "typ": "JWT"})
        );
        let claims: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(claims["sub"], "spiffe://td.test/ci/app");
        assert_eq!(claims["aud"], "deployer");
        assert_eq!(claims["exp"], 400);
        // The signature verifies with the published key (fixed r||s, 64 bytes).
        let sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        assert_eq!(sig.len(), 64);
        let public = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            signer.public_point(),
        );
        let input = format!("{}.{}", parts[0], parts[1]);
        public.verify(input.as_bytes(), &sig).unwrap();
        let jwk = signer.public_jwk("jwt-svid");
        assert_eq!(jwk["use"], "jwt-svid");
        assert_eq!(jwk["kid"], signer.kid());
        assert!(
            signer
                .sign_jwt_svid(&JwtSvidClaims {
                    spiffe_id: SpiffeId::parse("spiffe://td.test/a").unwrap(),
                    audiences: vec![],
                    issued_at: 0,
                    expires_at: 1,
                    jti: "x".into(),
                    issuer: None,
                })
                .is_err()
        );
    }
}
