//! Session credentials and their sealed session tokens.
//!
//! A session token is `base64(version ‖ key-id length ‖ key id ‖ nonce ‖
//! AES-256-GCM(claims))`, with associated data `"herald-session" ‖ version ‖
//! key id ‖ access key id`. The claims carry the access key id, the secret
//! access key, the SPIFFE ID, the role, the session name, the effective
//! scope, the policy, the serial and the validity. Because the access key
//! id is bound as associated data, a token opens only together with the
//! access key id it was minted for: it cannot be re-bound to another key
//! pair, and no byte of it can be changed without the tag failing.
//!
//! The secret access key travels inside the sealed token: the token alone
//! is useless only because it is encrypted. Whoever holds the keyring can
//! open every token and read every secret, so the keyring is as sensitive
//! as a signing key (see the crate's README.md).

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use herald_core::ScopePolicy;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use time::OffsetDateTime;
use zeroize::{Zeroize, Zeroizing};

use crate::CredsError;

/// Token format version.
const VERSION: u8 = 1;
/// Domain separation for the associated data.
const AAD_LABEL: &[u8] = b"herald-session";
/// Largest session token accepted, characters (AWS allows far larger
/// tokens; ours are ~600–1,500).
pub const MAX_TOKEN_CHARS: usize = 4096;
/// Access key ids look like AWS temporary ones: `ASIA` + 16 characters.
pub const ACCESS_KEY_PREFIX: &str = "ASIA";

const BASE32: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
const SECRET_ALPHABET: &[u8; 64] =
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

struct RingKey {
    id: String,
    raw: Zeroizing<[u8; 32]>,
    aead: LessSafeKey,
}

/// The AEAD keys that seal session tokens: one active for sealing, older
/// ones kept to open tokens sealed before a rotation. As sensitive as a CA
/// key: whoever holds it can open every token and read its secret.
pub struct SessionKeyring {
    keys: Vec<RingKey>,
    active: usize,
}

impl std::fmt::Debug for SessionKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKeyring")
            .field(
                "key_ids",
                &self.keys.iter().map(|k| &k.id).collect::<Vec<_>>(),
            )
            .field("active", &self.keys[self.active].id)
            .finish()
    }
}

fn random<const N: usize>() -> Result<[u8; N], CredsError> {
    let mut b = [0u8; N];
    aws_lc_rs::rand::fill(&mut b)
        .map_err(|_| CredsError::Internal("random source failed".into()))?;
    Ok(b)
}

fn ring_key(id: String, raw: &[u8; 32]) -> Result<RingKey, CredsError> {
    let unbound = UnboundKey::new(&AES_256_GCM, raw)
        .map_err(|_| CredsError::Internal("AEAD key setup failed".into()))?;
    Ok(RingKey {
        id,
        raw: Zeroizing::new(*raw),
        aead: LessSafeKey::new(unbound),
    })
}

fn fresh_key_id() -> Result<String, CredsError> {
    Ok(hex::encode(random::<4>()?))
}

fn valid_key_id(id: &str) -> bool {
    (1..=32).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

impl SessionKeyring {
    /// A keyring with one fresh random key (id: 8 hex characters), active.
    pub fn generate() -> Result<Self, CredsError> {
        let raw = Zeroizing::new(random::<32>()?);
        let key = ring_key(fresh_key_id()?, &raw)?;
        Ok(Self {
            keys: vec![key],
            active: 0,
        })
    }

    /// A keyring from stored keys; `active_id` seals new tokens. Key ids are
    /// 1–32 characters of `[A-Za-z0-9-]`, unique. The raw keys in `keys` are
    /// zeroized once copied into the keyring.
    pub fn from_keys(
        mut keys: Vec<(String, [u8; 32])>,
        active_id: &str,
    ) -> Result<Self, CredsError> {
        let mut ring: Vec<RingKey> = Vec::with_capacity(keys.len());
        let mut failure = None;
        for (id, raw) in keys.iter_mut() {
            if failure.is_none() {
                if !valid_key_id(id) {
                    failure = Some(format!("invalid key id {id:?}"));
                } else if ring.iter().any(|k| k.id == *id) {
                    failure = Some(format!("key id {id} given twice"));
                } else {
                    match ring_key(id.clone(), raw) {
                        Ok(k) => ring.push(k),
                        Err(e) => failure = Some(e.to_string()),
                    }
                }
            }
            raw.zeroize();
        }
        if let Some(why) = failure {
            return Err(CredsError::InvalidKeyring(why));
        }
        let active = ring.iter().position(|k| k.id == active_id).ok_or_else(|| {
            CredsError::InvalidKeyring(format!("active key {active_id} is not in the ring"))
        })?;
        Ok(Self { keys: ring, active })
    }

    /// The id of the key that seals new tokens.
    pub fn active_id(&self) -> &str {
        &self.keys[self.active].id
    }

    /// The ids of every key held (the active one and those kept to open
    /// tokens sealed before a rotation).
    pub fn key_ids(&self) -> Vec<&str> {
        self.keys.iter().map(|k| k.id.as_str()).collect()
    }

    /// Every key with its id, for the caller to seal at rest (with the CA's
    /// key-encryption key). Handle like a CA private key.
    pub fn export(&self) -> Vec<(String, Zeroizing<[u8; 32]>)> {
        self.keys
            .iter()
            .map(|k| (k.id.clone(), k.raw.clone()))
            .collect()
    }

    /// Adds a fresh key and makes it active; older keys keep opening their
    /// tokens until [`retire`](Self::retire)d. Returns the new key's id.
    pub fn rotate(&mut self) -> Result<String, CredsError> {
        let mut id = fresh_key_id()?;
        while self.keys.iter().any(|k| k.id == id) {
            id = fresh_key_id()?;
        }
        let raw = Zeroizing::new(random::<32>()?);
        self.keys.push(ring_key(id.clone(), &raw)?);
        self.active = self.keys.len() - 1;
        Ok(id)
    }

    /// Drops a key: tokens sealed with it no longer open
    /// ([`CredsError::UnknownKey`]). The active key cannot be retired.
    pub fn retire(&mut self, id: &str) -> Result<(), CredsError> {
        let pos = self
            .keys
            .iter()
            .position(|k| k.id == id)
            .ok_or(CredsError::UnknownKey)?;
        if pos == self.active {
            return Err(CredsError::InvalidKeyring(
                "the active key cannot be retired".into(),
            ));
        }
        self.keys.remove(pos);
        if pos < self.active {
            self.active -= 1;
        }
        Ok(())
    }

    /// Mints credentials for `req`, sealing them with the active key.
    pub fn mint(&self, req: &MintRequest) -> Result<SessionCredentials, CredsError> {
        if req.expires_at <= req.issued_at {
            return Err(CredsError::InvalidMintRequest(
                "expiry must follow issuance".into(),
            ));
        }
        // A scope `open` could not read back would seal credentials that
        // never verify: refuse it here rather than hand them out.
        if req.scope.statements().is_empty() {
            return Err(CredsError::InvalidMintRequest(
                "the scope has no statement".into(),
            ));
        }
        // 16 base32 characters = 80 random bits (256 is a multiple of 32:
        // masking keeps the distribution uniform).
        let mut access_key_id = String::with_capacity(20);
        access_key_id.push_str(ACCESS_KEY_PREFIX);
        for b in random::<16>()? {
            access_key_id.push(BASE32[usize::from(b & 31)] as char);
        }
        let secret_rand = Zeroizing::new(random::<40>()?);
        let secret = Zeroizing::new(
            secret_rand
                .iter()
                .map(|b| SECRET_ALPHABET[usize::from(*b & 63)] as char)
                .collect::<String>(),
        );
        let claims = SealedClaims {
            a: access_key_id.clone(),
            s: secret.to_string(),
            id: req.spiffe_id.clone(),
            r: req.role_arn.clone(),
            n: req.session_name.clone(),
            sc: req.scope.to_json(),
            p: req.policy.clone(),
            sn: req.serial.clone(),
            iat: req.issued_at.unix_timestamp(),
            exp: req.expires_at.unix_timestamp(),
        };
        let mut plain = Zeroizing::new(
            serde_json::to_vec(&claims).map_err(|e| CredsError::Internal(e.to_string()))?,
        );
        drop(claims);
        let key = &self.keys[self.active];
        let nonce_bytes = random::<NONCE_LEN>()?;
        let aad = aad(&key.id, &access_key_id);
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(aad.as_slice()),
                &mut *plain,
            )
            .map_err(|_| CredsError::Internal("sealing failed".into()))?;
        let mut blob = Vec::with_capacity(2 + key.id.len() + NONCE_LEN + plain.len());
        blob.push(VERSION);
        blob.push(key.id.len() as u8);
        blob.extend_from_slice(key.id.as_bytes());
        blob.extend_from_slice(&nonce_bytes);
        blob.extend_from_slice(&plain);
        let session_token = STANDARD.encode(&blob);
        if session_token.len() > MAX_TOKEN_CHARS {
            return Err(CredsError::InvalidMintRequest(
                "session token would exceed its size cap (scope too large)".into(),
            ));
        }
        Ok(SessionCredentials {
            access_key_id,
            secret_access_key: secret,
            session_token,
            expiration: req.expires_at,
            serial: req.serial.clone(),
        })
    }

    /// Opens `session_token` for `access_key_id` and checks it is valid at
    /// `now`. Fails with [`CredsError::TokenTooLarge`] before decoding
    /// anything over the cap, [`CredsError::TokenMalformed`],
    /// [`CredsError::UnknownKey`] (retired or foreign key),
    /// [`CredsError::TokenInvalid`] (tampered, or another key pair's token:
    /// the access key id is associated data) or [`CredsError::Expired`].
    pub fn open(
        &self,
        access_key_id: &str,
        session_token: &str,
        now: OffsetDateTime,
    ) -> Result<SessionClaims, CredsError> {
        let claims = self.open_any_time(access_key_id, session_token)?;
        if now >= claims.expires_at {
            return Err(CredsError::Expired);
        }
        Ok(claims)
    }

    /// Opens a token without judging its validity period (for audit and
    /// revocation look-ups of expired credentials; never to authorize).
    pub fn open_any_time(
        &self,
        access_key_id: &str,
        session_token: &str,
    ) -> Result<SessionClaims, CredsError> {
        if session_token.len() > MAX_TOKEN_CHARS {
            return Err(CredsError::TokenTooLarge);
        }
        let blob = STANDARD
            .decode(session_token)
            .map_err(|_| CredsError::TokenMalformed)?;
        let (&version, rest) = blob.split_first().ok_or(CredsError::TokenMalformed)?;
        if version != VERSION {
            return Err(CredsError::TokenMalformed);
        }
        let (&id_len, rest) = rest.split_first().ok_or(CredsError::TokenMalformed)?;
        let id_len = id_len as usize;
        if rest.len() < id_len + NONCE_LEN + AES_256_GCM.tag_len() {
            return Err(CredsError::TokenMalformed);
        }
        let (id, rest) = rest.split_at(id_len);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        let id = std::str::from_utf8(id).map_err(|_| CredsError::TokenMalformed)?;
        let key = self
            .keys
            .iter()
            .find(|k| k.id == id)
            .ok_or(CredsError::UnknownKey)?;
        let nonce =
            Nonce::try_assume_unique_for_key(nonce).map_err(|_| CredsError::TokenMalformed)?;
        let aad = aad(&key.id, access_key_id);
        let mut buf = Zeroizing::new(sealed.to_vec());
        let plain = key
            .aead
            .open_in_place(nonce, Aad::from(aad.as_slice()), &mut buf)
            .map_err(|_| CredsError::TokenInvalid)?;
        let c: SealedClaims =
            serde_json::from_slice(plain).map_err(|_| CredsError::TokenInvalid)?;
        if c.a != access_key_id {
            return Err(CredsError::TokenInvalid);
        }
        let at =
            |t: i64| OffsetDateTime::from_unix_timestamp(t).map_err(|_| CredsError::TokenInvalid);
        let scope = ScopePolicy::from_json(&c.sc).map_err(|_| CredsError::TokenInvalid)?;
        Ok(SessionClaims {
            access_key_id: c.a.clone(),
            spiffe_id: c.id.clone(),
            role_arn: c.r.clone(),
            session_name: c.n.clone(),
            scope,
            policy: c.p.clone(),
            serial: c.sn.clone(),
            issued_at: at(c.iat)?,
            expires_at: at(c.exp)?,
            secret: Zeroizing::new(c.s.clone()),
        })
    }
}

fn aad(key_id: &str, access_key_id: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(AAD_LABEL.len() + 3 + key_id.len() + access_key_id.len());
    v.extend_from_slice(AAD_LABEL);
    v.push(VERSION);
    v.push(key_id.len() as u8);
    v.extend_from_slice(key_id.as_bytes());
    v.push(access_key_id.len() as u8);
    v.extend_from_slice(access_key_id.as_bytes());
    v
}

#[derive(Serialize, Deserialize)]
struct SealedClaims {
    a: String,
    s: String,
    id: String,
    r: String,
    n: String,
    sc: Value,
    p: String,
    sn: String,
    iat: i64,
    exp: i64,
}

impl Drop for SealedClaims {
    fn drop(&mut self) {
        self.s.zeroize();
    }
}

/// What to mint.
#[derive(Debug, Clone)]
pub struct MintRequest {
    /// The caller's SPIFFE ID.
    pub spiffe_id: String,
    /// The role assumed.
    pub role_arn: String,
    /// The session name.
    pub session_name: String,
    /// The effective scope (the role's, or a narrower session policy).
    pub scope: ScopePolicy,
    /// The attestation policy that granted it.
    pub policy: String,
    /// The credential's serial (audit and revocation).
    pub serial: String,
    /// Issued at.
    pub issued_at: OffsetDateTime,
    /// Expires at.
    pub expires_at: OffsetDateTime,
}

/// Minted credentials, in the AWS shape.
pub struct SessionCredentials {
    /// `ASIA…`.
    pub access_key_id: String,
    /// The signing secret.
    pub secret_access_key: Zeroizing<String>,
    /// The sealed session token.
    pub session_token: String,
    /// Expiry.
    pub expiration: OffsetDateTime,
    /// The serial.
    pub serial: String,
}

impl std::fmt::Debug for SessionCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"<redacted>")
            .field("session_token", &"<redacted>")
            .field("expiration", &self.expiration)
            .field("serial", &self.serial)
            .finish()
    }
}

/// The verified content of a session token.
#[derive(Clone)]
pub struct SessionClaims {
    /// The access key id it is bound to.
    pub access_key_id: String,
    /// The caller's SPIFFE ID.
    pub spiffe_id: String,
    /// The role.
    pub role_arn: String,
    /// The session name.
    pub session_name: String,
    /// The effective scope.
    pub scope: ScopePolicy,
    /// The attestation policy that granted it.
    pub policy: String,
    /// The serial.
    pub serial: String,
    /// Issued at.
    pub issued_at: OffsetDateTime,
    /// Expires at.
    pub expires_at: OffsetDateTime,
    secret: Zeroizing<String>,
}

impl std::fmt::Debug for SessionClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionClaims")
            .field("access_key_id", &self.access_key_id)
            .field("spiffe_id", &self.spiffe_id)
            .field("role_arn", &self.role_arn)
            .field("serial", &self.serial)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl SessionClaims {
    /// The secret access key (to verify a signature with).
    pub fn secret_access_key(&self) -> &str {
        &self.secret
    }

    /// RFC 7662 introspection response for an active token. `scope` is the
    /// space-separated list of the action patterns the scope allows (the
    /// full document is under `herald.scope_policy`); no secret is included.
    pub fn introspection_json(&self) -> Value {
        let mut actions: Vec<&str> = self
            .scope
            .statements()
            .iter()
            .flat_map(|s| s.actions.iter().map(String::as_str))
            .collect();
        actions.sort_unstable();
        actions.dedup();
        json!({
            "active": true,
            "token_type": "aws_session_credentials",
            "sub": self.spiffe_id,
            "iat": self.issued_at.unix_timestamp(),
            "exp": self.expires_at.unix_timestamp(),
            "jti": self.serial,
            "scope": actions.join(" "),
            "herald": {
                "access_key_id": self.access_key_id,
                "role_arn": self.role_arn,
                "session_name": self.session_name,
                "policy": self.policy,
                "scope_policy": self.scope.to_json(),
            }
        })
    }
}

/// RFC 7662's answer for anything not active.
pub fn inactive_json() -> Value {
    json!({"active": false})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> ScopePolicy {
        ScopePolicy::from_json(
            &json!({"Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": "*"}]}),
        )
        .unwrap()
    }

    fn req(now: OffsetDateTime) -> MintRequest {
        MintRequest {
            spiffe_id: "spiffe://td/ci/app".into(),
            role_arn: "arn:aws:iam::1:role/r".into(),
            session_name: "s1".into(),
            scope: scope(),
            policy: "p".into(),
            serial: "abcd".into(),
            issued_at: now,
            expires_at: now + time::Duration::hours(1),
        }
    }

    #[test]
    fn a_scope_that_could_never_open_is_not_minted() {
        let now = OffsetDateTime::now_utc();
        let ring = SessionKeyring::generate().unwrap();
        let mut r = req(now);
        r.scope = ScopePolicy::new(Vec::new());
        assert!(matches!(
            ring.mint(&r),
            Err(CredsError::InvalidMintRequest(_))
        ));
    }

    #[test]
    fn mint_open_rebind_tamper_rotate() {
        let now = OffsetDateTime::now_utc();
        let mut ring = SessionKeyring::generate().unwrap();
        let c = ring.mint(&req(now)).unwrap();
        assert!(c.access_key_id.starts_with("ASIA") && c.access_key_id.len() == 20);
        assert_eq!(c.secret_access_key.len(), 40);
        assert!(!format!("{c:?}").contains(c.secret_access_key.as_str()));
        let claims = ring.open(&c.access_key_id, &c.session_token, now).unwrap();
        assert_eq!(claims.secret_access_key(), c.secret_access_key.as_str());
        assert_eq!(claims.spiffe_id, "spiffe://td/ci/app");
        assert_eq!(claims.introspection_json()["active"], true);
        // Another key pair's token does not open for this access key id.
        let other = ring.mint(&req(now)).unwrap();
        assert_eq!(
            ring.open(&c.access_key_id, &other.session_token, now)
                .unwrap_err(),
            CredsError::TokenInvalid
        );
        // Any flipped byte fails.
        let mut blob = STANDARD.decode(&c.session_token).unwrap();
        for i in [0, 3, 20, blob.len() - 1] {
            blob[i] ^= 1;
            assert!(
                ring.open(&c.access_key_id, &STANDARD.encode(&blob), now)
                    .is_err(),
                "byte {i}"
            );
            blob[i] ^= 1;
        }
        assert_eq!(
            ring.open(
                &c.access_key_id,
                &c.session_token,
                now + time::Duration::hours(2)
            )
            .unwrap_err(),
            CredsError::Expired
        );
        assert_eq!(
            ring.open(&c.access_key_id, "!!!", now).unwrap_err(),
            CredsError::TokenMalformed
        );
        assert_eq!(
            ring.open(&c.access_key_id, &"A".repeat(MAX_TOKEN_CHARS + 1), now)
                .unwrap_err(),
            CredsError::TokenTooLarge
        );
        // Rotation: old tokens open until their key is retired.
        let old = ring.active_id().to_string();
        ring.rotate().unwrap();
        assert_ne!(ring.active_id(), old);
        ring.open(&c.access_key_id, &c.session_token, now).unwrap();
        let fresh = ring.mint(&req(now)).unwrap();
        ring.retire(&old).unwrap();
        assert_eq!(
            ring.open(&c.access_key_id, &c.session_token, now)
                .unwrap_err(),
            CredsError::UnknownKey
        );
        ring.open(&fresh.access_key_id, &fresh.session_token, now)
            .unwrap();
        assert_eq!(ring.key_ids(), vec![ring.active_id()]);
        // Export and reload.
        let exported: Vec<(String, [u8; 32])> =
            ring.export().into_iter().map(|(i, k)| (i, *k)).collect();
        let again = SessionKeyring::from_keys(exported, ring.active_id()).unwrap();
        again
            .open(&fresh.access_key_id, &fresh.session_token, now)
            .unwrap();
    }

    #[test]
    fn keyring_and_mint_refusals_and_redaction() {
        let now = OffsetDateTime::now_utc();
        let mut ring = SessionKeyring::generate().unwrap();
        assert_eq!(ring.active_id().len(), 8);
        let active = ring.active_id().to_owned();
        assert_eq!(ring.retire(&active).unwrap_err().code(), "invalid_keyring");
        assert_eq!(ring.retire("nope").unwrap_err(), CredsError::UnknownKey);
        let first = ring.active_id().to_string();
        let second = ring.rotate().unwrap();
        assert_eq!(ring.key_ids(), vec![first.as_str(), second.as_str()]);
        for (keys, active) in [
            (vec![("a b".to_string(), [1u8; 32])], "a b"),
            (vec![("k1".into(), [1; 32]), ("k1".into(), [2; 32])], "k1"),
            (vec![("k1".into(), [1; 32])], "k2"),
        ] {
            assert_eq!(
                SessionKeyring::from_keys(keys, active).unwrap_err().code(),
                "invalid_keyring"
            );
        }
        let mut bad = req(now);
        bad.expires_at = now;
        assert_eq!(ring.mint(&bad).unwrap_err().code(), "invalid_mint_request");
        // A scope too large for the token cap is refused at mint time.
        let mut huge = req(now);
        let resources: Vec<String> = (0..200).map(|i| format!("arn:aws:s3:::b/{i}")).collect();
        huge.scope = ScopePolicy::from_json(
            &json!({"Statement": [{"Effect": "Allow", "Action": "s3:GetObject", "Resource": resources}]}),
        )
        .unwrap();
        assert_eq!(ring.mint(&huge).unwrap_err().code(), "invalid_mint_request");

        let c = ring.mint(&req(now)).unwrap();
        // Unique, AWS-shaped identifiers.
        let d = ring.mint(&req(now)).unwrap();
        assert_ne!(c.access_key_id, d.access_key_id);
        assert!(c.access_key_id[4..].bytes().all(|b| BASE32.contains(&b)));
        assert!(
            c.secret_access_key
                .bytes()
                .all(|b| SECRET_ALPHABET.contains(&b))
        );
        assert!(STANDARD.decode(&c.session_token).is_ok());
        let claims = ring.open(&c.access_key_id, &c.session_token, now).unwrap();
        let shown = format!("{c:?} {claims:?} {ring:?}");
        assert!(!shown.contains(c.secret_access_key.as_str()));
        assert!(!shown.contains(&c.session_token));
        let intro = claims.introspection_json();
        assert_eq!(intro["scope"], "s3:GetObject");
        assert_eq!(intro["token_type"], "aws_session_credentials");
        assert_eq!(intro["herald"]["access_key_id"], c.access_key_id.as_str());
        assert!(!intro.to_string().contains(c.secret_access_key.as_str()));
        assert_eq!(inactive_json(), json!({"active": false}));
        // Opening ignores expiry only on request.
        let later = now + time::Duration::hours(3);
        assert!(
            ring.open(&c.access_key_id, &c.session_token, later)
                .is_err()
        );
        ring.open_any_time(&c.access_key_id, &c.session_token)
            .unwrap();
    }
}
