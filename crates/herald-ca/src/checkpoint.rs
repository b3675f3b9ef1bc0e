//! Signed checkpoints of the audit chain's head.
//!
//! The audit log is hash-chained, but a chain alone cannot stop whoever can
//! write the database: they can truncate the tail, or edit a record and
//! recompute every hash after it. A checkpoint — the head's sequence number
//! and hash, signed by an `audit` key of the key ring (sealed with the KEK,
//! so a database writer cannot sign) — pins the chain as it was. Kept off
//! the machine, it detects both.
//!
//! A checkpoint is a compact JWS (ES256) with `typ`
//! `herald-audit-checkpoint+jwt` and the claims `iss` (the trust domain),
//! `seq`, `hash` (hex) and `time_ms`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::{CaError, JwtSigner};

/// The `typ` of a checkpoint's JWS header.
pub const CHECKPOINT_TYP: &str = "herald-audit-checkpoint+jwt";

/// Why a checkpoint does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    /// Not a checkpoint JWS.
    #[error("not a Herald audit checkpoint: {0}")]
    Malformed(String),
    /// Signed by a key that is not one of the key ring's audit keys.
    #[error("signed by key {0:?}, which is not one of this deployment's audit keys")]
    UnknownKey(String),
    /// The signature does not verify.
    #[error("the checkpoint's signature does not verify")]
    BadSignature,
}

/// The head of the audit chain at some moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// The trust domain whose audit log it is.
    pub trust_domain: String,
    /// The last record it covers.
    pub seq: u64,
    /// That record's hash.
    pub hash: [u8; 32],
    /// When it was signed, Unix milliseconds.
    pub time_ms: i64,
}

impl Checkpoint {
    /// Signs the checkpoint with an audit key.
    pub fn sign(&self, key: &JwtSigner) -> Result<String, CaError> {
        key.sign_typed(
            CHECKPOINT_TYP,
            &json!({
                "iss": self.trust_domain,
                "seq": self.seq,
                "hash": hex::encode(self.hash),
                "time_ms": self.time_ms,
            }),
        )
    }

    /// Verifies a checkpoint JWS: its `typ`, its signature by the audit key
    /// `point_of(kid)` returns (the uncompressed P-256 point), its claims.
    /// Returns the checkpoint and the key id that signed it.
    pub fn verify(
        jws: &str,
        point_of: impl FnOnce(&str) -> Option<Vec<u8>>,
    ) -> Result<(Checkpoint, String), CheckpointError> {
        let bad = |m: &str| CheckpointError::Malformed(m.to_owned());
        if jws.len() > 4096 {
            return Err(bad("too large"));
        }
        let mut parts = jws.splitn(3, '.');
        let (h, c, s) = match (parts.next(), parts.next(), parts.next()) {
            (Some(h), Some(c), Some(s)) => (h, c, s),
            _ => return Err(bad("not a compact JWS")),
        };
        let decode = |part: &str| -> Result<Value, CheckpointError> {
            let bytes = URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| bad("not base64url"))?;
            serde_json::from_slice(&bytes).map_err(|_| bad("not JSON"))
        };
        let header = decode(h)?;
        if header.get("alg").and_then(Value::as_str) != Some("ES256")
            || header.get("typ").and_then(Value::as_str) != Some(CHECKPOINT_TYP)
        {
            return Err(bad(
                "the header is not a checkpoint's (ES256, herald-audit-checkpoint+jwt)",
            ));
        }
        let kid = header
            .get("kid")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no kid"))?
            .to_owned();
        let point = point_of(&kid).ok_or_else(|| CheckpointError::UnknownKey(kid.clone()))?;
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| bad("signature is not base64url"))?;
        let key = aws_lc_rs::signature::UnparsedPublicKey::new(
            &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED,
            &point,
        );
        key.verify(&jws.as_bytes()[..h.len() + 1 + c.len()], &sig)
            .map_err(|_| CheckpointError::BadSignature)?;
        let claims = decode(c)?;
        let hash_hex = claims
            .get("hash")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no hash"))?;
        let mut hash = [0u8; 32];
        hex::decode_to_slice(hash_hex, &mut hash).map_err(|_| bad("hash is not 32 hex bytes"))?;
        Ok((
            Checkpoint {
                trust_domain: claims
                    .get("iss")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("no iss"))?
                    .to_owned(),
                seq: claims
                    .get("seq")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| bad("no seq"))?,
                hash,
                time_ms: claims
                    .get("time_ms")
                    .and_then(Value::as_i64)
                    .ok_or_else(|| bad("no time_ms"))?,
            },
            kid,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_verifies_only_with_its_key_and_typ() {
        let (key, _) = JwtSigner::generate().unwrap();
        let (other, _) = JwtSigner::generate().unwrap();
        let cp = Checkpoint {
            trust_domain: "example.org".into(),
            seq: 42,
            hash: [7; 32],
            time_ms: 1_800_000_000_000,
        };
        let jws = cp.sign(&key).unwrap();
        let point = key.public_point().to_vec();
        let (got, kid) =
            Checkpoint::verify(&jws, |k| (k == key.kid()).then(|| point.clone())).unwrap();
        assert_eq!((got, kid.as_str()), (cp.clone(), key.kid()));
        // Another key under the same kid, an unknown kid, a tampered claim.
        let other_point = other.public_point().to_vec();
        assert_eq!(
            Checkpoint::verify(&jws, |_| Some(other_point.clone())).unwrap_err(),
            CheckpointError::BadSignature
        );
        assert!(matches!(
            Checkpoint::verify(&jws, |_| None).unwrap_err(),
            CheckpointError::UnknownKey(_)
        ));
        let (h, rest) = jws.split_once('.').unwrap();
        let (_, s) = rest.split_once('.').unwrap();
        let forged_claims = URL_SAFE_NO_PAD.encode(
            json!({"iss": "example.org", "seq": 43, "hash": hex::encode([7; 32]), "time_ms": 1})
                .to_string(),
        );
        assert_eq!(
            Checkpoint::verify(&format!("{h}.{forged_claims}.{s}"), |_| Some(point.clone()))
                .unwrap_err(),
            CheckpointError::BadSignature
        );
        // A JWT-SVID signed by the same key is no checkpoint.
        let svid = key
            .sign_claims(&json!({"sub": "spiffe://example.org/x", "seq": 1}))
            .unwrap();
        assert!(matches!(
            Checkpoint::verify(&svid, |_| Some(point.clone())).unwrap_err(),
            CheckpointError::Malformed(_)
        ));
    }
}
