//! Join tokens: one-time, short-lived bootstrap (and break-glass) evidence
//! bound to one SPIFFE ID.
//!
//! A token reads `<id>.<secret>`: a 16-hex-character public identifier, for
//! listing and audit, and 256 random bits. Only its SHA-256 is stored.

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_core::{ErrorCode, SpiffeId};
use herald_store::{JoinTokenRecord, Store};

use crate::status::Refusal;

/// Longest string accepted as a join token before parsing.
pub const MAX_TOKEN_LEN: usize = 128;

/// A freshly generated token.
pub struct GeneratedToken {
    /// The full token, shown once to the operator.
    pub token: String,
    /// The public identifier.
    pub token_id: String,
    /// What the store keeps.
    pub hash: [u8; 32],
}

/// Generates a new token.
pub fn generate() -> Result<GeneratedToken, aws_lc_rs::error::Unspecified> {
    let rng = SystemRandom::new();
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    rng.fill(&mut id)?;
    rng.fill(&mut secret)?;
    let token_id = hex::encode(id);
    let token = format!("{token_id}.{}", URL_SAFE_NO_PAD.encode(secret));
    let hash = hash(&token);
    Ok(GeneratedToken {
        token,
        token_id,
        hash,
    })
}

/// Checks the token's shape and returns its hash; `None` when it cannot be a Herald token.
pub fn parse(token: &str) -> Option<[u8; 32]> {
    let (id, secret) = token.split_once('.')?;
    let well_formed = id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        && secret.len() == 43
        && URL_SAFE_NO_PAD.decode(secret).is_ok();
    well_formed.then(|| hash(token))
}

/// The stored token with this hash; `join_token_unknown` if there is none.
pub async fn lookup(store: &Store, hash: &[u8; 32]) -> Result<JoinTokenRecord, Refusal> {
    store
        .join_token(hash)
        .await?
        .ok_or_else(|| Refusal::new(ErrorCode::JoinTokenUnknown, "no such join token"))
}

/// The SPIFFE ID a stored token mints, if the token is still usable at
/// `now` (unused and unexpired). The store consumes it atomically with the
/// issuance later; this early check names the reason for the caller.
pub fn usable(record: &JoinTokenRecord, now: i64) -> Result<SpiffeId, Refusal> {
    if record.used_at.is_some() {
        return Err(Refusal::new(
            ErrorCode::JoinTokenUsed,
            "the join token was already used",
        ));
    }
    if record.expires_at <= now {
        return Err(Refusal::new(
            ErrorCode::JoinTokenExpired,
            "the join token has expired",
        ));
    }
    SpiffeId::parse(&record.spiffe_id)
        .map_err(|e| Refusal::new(ErrorCode::Internal, format!("stored SPIFFE ID: {e}")))
}

fn hash(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_tokens_parse_to_their_hash() {
        let t = generate().unwrap();
        assert_eq!(parse(&t.token), Some(t.hash));
        assert!(t.token.starts_with(&t.token_id));
        assert_ne!(generate().unwrap().token, t.token);
    }

    #[test]
    fn malformed_tokens_are_rejected() {
        let t = generate().unwrap().token;
        for bad in [
            "",
            "abc",
            "nodot",
            &t[..t.len() - 1],
            &format!("{t}x"),
            &t.to_uppercase(),
            &t.replacen('.', "-", 1),
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
