//! The trust bundle: SPIFFE bundle JWKS and PEM forms.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use herald_core::TrustDomain;
use serde_json::{Value, json};
use x509_parser::der_parser::oid;
use x509_parser::public_key::PublicKey;

use crate::CaError;

/// A trust domain's bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrustBundle {
    /// The trust domain.
    pub trust_domain: TrustDomain,
    /// X.509 authorities, DER.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT authorities: `kid` and the P-256 public key as an uncompressed point.
    pub jwt_authorities: Vec<(String, Vec<u8>)>,
    /// `spiffe_sequence`: increases whenever the bundle changes.
    pub sequence: u64,
    /// `spiffe_refresh_hint`, seconds.
    pub refresh_hint_secs: u64,
}

impl TrustBundle {
    /// The bundle in the SPIFFE bundle JWKS format: X.509 authorities with
    /// `use: x509-svid`, the key's public parameters and a one-certificate
    /// `x5c`, no `kid`.
    pub fn to_jwks(&self) -> Result<Value, CaError> {
        let mut keys = self
            .x509_authorities
            .iter()
            .map(|der| x509_authority_jwk(der))
            .collect::<Result<Vec<_>, _>>()?;
        keys.extend(
            self.jwt_authorities
                .iter()
                .map(|(kid, point)| crate::jwt::jwk_from_point(kid, point, "jwt-svid")),
        );
        Ok(json!({
            "keys": keys,
            "spiffe_sequence": self.sequence,
            "spiffe_refresh_hint": self.refresh_hint_secs,
        }))
    }

    /// The JWT authorities as a plain OIDC JWKS (`use: sig`, `alg: ES256`),
    /// for verifiers that speak OIDC rather than SPIFFE.
    pub fn to_oidc_jwks(&self) -> Value {
        let keys: Vec<Value> = self
            .jwt_authorities
            .iter()
            .map(|(kid, point)| crate::jwt::jwk_from_point(kid, point, "sig"))
            .collect();
        json!({ "keys": keys })
    }

    /// The X.509 authorities as concatenated PEM.
    pub fn to_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
            .collect()
    }
}

fn x509_authority_jwk(der: &[u8]) -> Result<Value, CaError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| CaError::Material(e.to_string()))?;
    let spki = cert.public_key();
    let mut jwk = match spki
        .parsed()
        .map_err(|e| CaError::Material(e.to_string()))?
    {
        PublicKey::EC(point) => {
            let curve_oid = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            let (crv, len) = match curve_oid {
                Some(o) if o == oid!(1.2.840.10045.3.1.7) => ("P-256", 32),
                Some(o) if o == oid!(1.3.132.0.34) => ("P-384", 48),
                _ => return Err(CaError::Material("unsupported EC curve in bundle".into())),
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 4 {
                return Err(CaError::Material("EC point is not uncompressed".into()));
            }
            json!({
                "kty": "EC",
                "crv": crv,
                "x": URL_SAFE_NO_PAD.encode(&data[1..1 + len]),
                "y": URL_SAFE_NO_PAD.encode(&data[1 + len..]),
            })
        }
        PublicKey::RSA(rsa) => {
            let strip = |b: &[u8]| -> Vec<u8> {
                let i = b
                    .iter()
                    .position(|x| *x != 0)
                    .unwrap_or(b.len().saturating_sub(1));
                b[i..].to_vec()
            };
            json!({
                "kty": "RSA",
                "n": URL_SAFE_NO_PAD.encode(strip(rsa.modulus)),
                "e": URL_SAFE_NO_PAD.encode(strip(rsa.exponent)),
            })
        }
        _ => return Err(CaError::Material("unsupported key type in bundle".into())),
    };
    jwk["use"] = json!("x509-svid");
    jwk["x5c"] = json!([STANDARD.encode(der)]);
    Ok(jwk)
}
