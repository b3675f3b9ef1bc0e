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

/// The largest SPIFFE bundle document accepted from another trust domain.
pub const MAX_FOREIGN_BUNDLE_BYTES: usize = 512 * 1024;
/// The most keys a foreign bundle may hold.
pub const MAX_FOREIGN_BUNDLE_KEYS: usize = 256;

/// Why a foreign bundle document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// Larger than [`MAX_FOREIGN_BUNDLE_BYTES`] or more than
    /// [`MAX_FOREIGN_BUNDLE_KEYS`] keys.
    #[error("the bundle document is too large: {0}")]
    TooLarge(String),
    /// Not a SPIFFE bundle JWKS.
    #[error("not a SPIFFE bundle: {0}")]
    Malformed(String),
    /// An X.509 authority names another trust domain.
    #[error("an X.509 authority belongs to {found}, not {expected}")]
    ForeignAuthority {
        /// The trust domain the document was fetched for.
        expected: String,
        /// The one the authority names.
        found: String,
    },
    /// No X.509 or JWT authority at all: taking it would erase trust.
    #[error("the bundle holds no authorities")]
    Empty,
}

/// A SPIFFE bundle of another trust domain, validated: what Herald stores,
/// serves to its workloads and trusts for that domain only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignBundle {
    /// The trust domain it was obtained for (never taken from the document).
    pub trust_domain: TrustDomain,
    /// X.509 authorities (`use: x509-svid`), DER.
    pub x509_authorities: Vec<Vec<u8>>,
    /// JWT authorities (`use: jwt-svid`), each a JWK as received.
    pub jwt_authorities: Vec<Value>,
    /// `spiffe_sequence`, when the document has one.
    pub sequence: Option<u64>,
    /// `spiffe_refresh_hint` in seconds, when the document has one.
    pub refresh_hint_secs: Option<u64>,
}

impl ForeignBundle {
    /// Parses and validates a SPIFFE bundle document (SPIFFE Trust Domain
    /// and Bundle, §4) fetched or provided for `trust_domain`. Keys with a
    /// `use` other than `x509-svid` and `jwt-svid` are ignored, as the
    /// specification asks; anything else malformed refuses the whole
    /// document. An X.509 authority carrying a SPIFFE ID must carry one of
    /// `trust_domain`: an endpoint cannot hand in another domain's CA.
    pub fn parse(trust_domain: &TrustDomain, doc: &[u8]) -> Result<ForeignBundle, BundleError> {
        if doc.len() > MAX_FOREIGN_BUNDLE_BYTES {
            return Err(BundleError::TooLarge(format!(
                "{} bytes (at most {MAX_FOREIGN_BUNDLE_BYTES})",
                doc.len()
            )));
        }
        let malformed = |m: &str| BundleError::Malformed(m.to_owned());
        let v: Value =
            serde_json::from_slice(doc).map_err(|e| BundleError::Malformed(e.to_string()))?;
        let obj = v
            .as_object()
            .ok_or_else(|| malformed("not a JSON object"))?;
        let keys = obj
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| malformed("no keys array"))?;
        if keys.len() > MAX_FOREIGN_BUNDLE_KEYS {
            return Err(BundleError::TooLarge(format!(
                "{} keys (at most {MAX_FOREIGN_BUNDLE_KEYS})",
                keys.len()
            )));
        }
        let uint = |name: &str| -> Result<Option<u64>, BundleError> {
            match obj.get(name) {
                None | Some(Value::Null) => Ok(None),
                Some(n) => n
                    .as_u64()
                    .map(Some)
                    .ok_or_else(|| BundleError::Malformed(format!("{name} is not a whole number"))),
            }
        };
        let sequence = uint("spiffe_sequence")?;
        let refresh_hint_secs = uint("spiffe_refresh_hint")?;
        let mut x509_authorities = Vec::new();
        let mut jwt_authorities = Vec::new();
        let mut kids = std::collections::HashSet::new();
        for key in keys {
            let k = key
                .as_object()
                .ok_or_else(|| malformed("a key is not an object"))?;
            match k.get("use").and_then(Value::as_str) {
                Some("x509-svid") => {
                    x509_authorities.push(foreign_x509_authority(trust_domain, k)?);
                }
                Some("jwt-svid") => {
                    let kid = k
                        .get("kid")
                        .and_then(Value::as_str)
                        .filter(|kid| !kid.is_empty())
                        .ok_or_else(|| malformed("a JWT authority has no kid"))?;
                    if !kids.insert(kid.to_owned()) {
                        return Err(BundleError::Malformed(format!("kid {kid:?} appears twice")));
                    }
                    check_jwt_key(k)?;
                    jwt_authorities.push(key.clone());
                }
                Some(_) => {}
                None => return Err(malformed("a key has no use")),
            }
        }
        if x509_authorities.is_empty() && jwt_authorities.is_empty() {
            return Err(BundleError::Empty);
        }
        Ok(ForeignBundle {
            trust_domain: trust_domain.clone(),
            x509_authorities,
            jwt_authorities,
            sequence,
            refresh_hint_secs,
        })
    }

    /// The bundle as a SPIFFE bundle document (what is stored and served).
    pub fn to_jwks(&self) -> Value {
        let mut keys: Vec<Value> = self
            .x509_authorities
            .iter()
            .map(|der| json!({ "use": "x509-svid", "x5c": [STANDARD.encode(der)] }))
            .collect();
        // The x509 JWKs are rebuilt with their key parameters where Herald
        // can describe the key; the bare form above is the fallback.
        for (k, der) in keys.iter_mut().zip(&self.x509_authorities) {
            if let Ok(full) = x509_authority_jwk(der) {
                *k = full;
            }
        }
        keys.extend(self.jwt_authorities.iter().cloned());
        let mut doc = json!({ "keys": keys });
        if let Some(s) = self.sequence {
            doc["spiffe_sequence"] = json!(s);
        }
        if let Some(h) = self.refresh_hint_secs {
            doc["spiffe_refresh_hint"] = json!(h);
        }
        doc
    }

    /// The X.509 authorities as concatenated PEM.
    pub fn to_pem(&self) -> String {
        self.x509_authorities
            .iter()
            .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
            .collect()
    }
}

/// One `x509-svid` key: exactly one certificate in `x5c`, a CA certificate,
/// whose SPIFFE ID (if any) is `trust_domain`'s.
fn foreign_x509_authority(
    trust_domain: &TrustDomain,
    k: &serde_json::Map<String, Value>,
) -> Result<Vec<u8>, BundleError> {
    let malformed = |m: String| BundleError::Malformed(m);
    let x5c = k
        .get("x5c")
        .and_then(Value::as_array)
        .filter(|a| a.len() == 1)
        .ok_or_else(|| malformed("an X.509 authority needs exactly one x5c certificate".into()))?;
    let der = x5c[0]
        .as_str()
        .and_then(|s| STANDARD.decode(s).ok())
        .ok_or_else(|| malformed("x5c is not base64".into()))?;
    let (rest, cert) = x509_parser::parse_x509_certificate(&der)
        .map_err(|e| malformed(format!("x5c certificate: {e}")))?;
    if !rest.is_empty() {
        return Err(malformed("x5c certificate has trailing bytes".into()));
    }
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    if !is_ca {
        return Err(malformed(
            "an X.509 authority is not a CA certificate".into(),
        ));
    }
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(uri) = name
                && let Some(rest) = uri.strip_prefix("spiffe://")
            {
                let td = rest.split('/').next().unwrap_or_default();
                if td != trust_domain.as_str() {
                    return Err(BundleError::ForeignAuthority {
                        expected: trust_domain.to_string(),
                        found: td.to_owned(),
                    });
                }
            }
        }
    }
    Ok(der)
}

/// A `jwt-svid` key has the public parameters its `kty` needs.
fn check_jwt_key(k: &serde_json::Map<String, Value>) -> Result<(), BundleError> {
    let b64 = |name: &str| {
        k.get(name)
            .and_then(Value::as_str)
            .and_then(|s| URL_SAFE_NO_PAD.decode(s).ok())
            .filter(|b| !b.is_empty())
            .ok_or_else(|| BundleError::Malformed(format!("a JWT authority lacks {name}")))
    };
    match k.get("kty").and_then(Value::as_str) {
        Some("EC") => {
            match k.get("crv").and_then(Value::as_str) {
                Some("P-256" | "P-384" | "P-521") => {}
                _ => return Err(BundleError::Malformed("unsupported EC curve".into())),
            }
            b64("x")?;
            b64("y")?;
        }
        Some("RSA") => {
            b64("n")?;
            b64("e")?;
        }
        Some("OKP") => {
            b64("x")?;
        }
        _ => return Err(BundleError::Malformed("unsupported JWT key type".into())),
    }
    if k.contains_key("d") {
        return Err(BundleError::Malformed(
            "a JWT authority carries a private key".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::authority::CaMaterial;
    use std::time::Duration;

    const NOW: i64 = 1_800_000_000;

    fn td(name: &str) -> TrustDomain {
        TrustDomain::new(name).unwrap()
    }

    fn own_bundle(name: &str) -> TrustBundle {
        let m = CaMaterial::generate_root(&td(name), Duration::from_secs(3600), NOW).unwrap();
        TrustBundle {
            trust_domain: td(name),
            x509_authorities: vec![m.cert_der],
            jwt_authorities: vec![("k1".into(), {
                let mut p = vec![4u8];
                p.extend([7u8; 64]);
                p
            })],
            sequence: 9,
            refresh_hint_secs: 300,
        }
    }

    fn doc(v: &Value) -> Vec<u8> {
        serde_json::to_vec(v).unwrap()
    }

    #[test]
    fn a_herald_bundle_parses_as_its_own_trust_domain_only() {
        let b = own_bundle("partner.test");
        let jwks = b.to_jwks().unwrap();
        let f = ForeignBundle::parse(&td("partner.test"), &doc(&jwks)).unwrap();
        assert_eq!(f.x509_authorities, b.x509_authorities);
        assert_eq!(f.jwt_authorities.len(), 1);
        assert_eq!((f.sequence, f.refresh_hint_secs), (Some(9), Some(300)));
        // Round trip through what is stored.
        let again = ForeignBundle::parse(&td("partner.test"), &doc(&f.to_jwks())).unwrap();
        assert_eq!(again, f);
        // The same document fetched for another domain names a foreign CA.
        assert_eq!(
            ForeignBundle::parse(&td("prod.test"), &doc(&jwks)).unwrap_err(),
            BundleError::ForeignAuthority {
                expected: "prod.test".into(),
                found: "partner.test".into()
            }
        );
    }

    #[test]
    fn malformed_and_hostile_documents_are_refused() {
        let t = td("partner.test");
        let b = own_bundle("partner.test");
        let good = b.to_jwks().unwrap();
        let x509 = good["keys"][0].clone();
        let jwt = good["keys"][1].clone();
        let leaf = rcgen::generate_simple_self_signed(vec!["leaf.test".into()])
            .unwrap()
            .cert
            .der()
            .to_vec();
        let with_keys = |keys: Vec<Value>| json!({ "keys": keys, "spiffe_sequence": 1 });
        let mut no_kid = jwt.clone();
        no_kid.as_object_mut().unwrap().remove("kid");
        let mut private = jwt.clone();
        private["d"] = json!("AAAA");
        let mut two_certs = x509.clone();
        two_certs["x5c"] = json!([x509["x5c"][0], x509["x5c"][0]]);
        type Expect = fn(&BundleError) -> bool;
        let cases: Vec<(&str, Vec<u8>, Expect)> = vec![
            ("not JSON", b"{nope".to_vec(), |e| {
                matches!(e, BundleError::Malformed(_))
            }),
            ("no keys", doc(&json!({"spiffe_sequence": 1})), |e| {
                matches!(e, BundleError::Malformed(_))
            }),
            (
                "negative sequence",
                doc(&json!({"keys": [x509.clone()], "spiffe_sequence": -1})),
                |e| matches!(e, BundleError::Malformed(_)),
            ),
            ("two certificates", doc(&with_keys(vec![two_certs])), |e| {
                matches!(e, BundleError::Malformed(_))
            }),
            (
                "a leaf as authority",
                doc(&with_keys(vec![
                    json!({"use": "x509-svid", "x5c": [STANDARD.encode(&leaf)]}),
                ])),
                |e| matches!(e, BundleError::Malformed(_)),
            ),
            ("JWT key without kid", doc(&with_keys(vec![no_kid])), |e| {
                matches!(e, BundleError::Malformed(_))
            }),
            (
                "duplicate kid",
                doc(&with_keys(vec![jwt.clone(), jwt.clone()])),
                |e| matches!(e, BundleError::Malformed(_)),
            ),
            ("a private key", doc(&with_keys(vec![private])), |e| {
                matches!(e, BundleError::Malformed(_))
            }),
            (
                "nothing usable",
                doc(&with_keys(vec![json!({"use": "other", "kty": "EC"})])),
                |e| *e == BundleError::Empty,
            ),
            ("oversized", vec![b' '; MAX_FOREIGN_BUNDLE_BYTES + 1], |e| {
                matches!(e, BundleError::TooLarge(_))
            }),
            (
                "too many keys",
                doc(&with_keys(vec![x509.clone(); MAX_FOREIGN_BUNDLE_KEYS + 1])),
                |e| matches!(e, BundleError::TooLarge(_)),
            ),
        ];
        for (what, bytes, expected) in cases {
            let e = ForeignBundle::parse(&t, &bytes).unwrap_err();
            assert!(expected(&e), "{what}: {e:?}");
        }
        // Keys of unknown use are skipped, the rest kept.
        let f = ForeignBundle::parse(&t, &doc(&with_keys(vec![json!({"use": "future"}), x509])))
            .unwrap();
        assert_eq!(f.x509_authorities.len(), 1);
    }
}
