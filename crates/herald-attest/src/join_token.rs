//! Join tokens: one-time, short-lived evidence bound to one SPIFFE ID and
//! one purpose.
//!
//! A token reads `<id>.<secret>`: a 16-hex-character public identifier, for
//! listing and audit, and 256 random bits. Only its SHA-256 is stored; the
//! store looks the record up by that hash and [`verify`] decides whether
//! the token may be used, now, for what the caller uses it for. Whether the
//! identity it names is granted anything is policy's question, not this
//! module's.

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_core::{ErrorCode, JoinTokenPurpose, JoinTokenRecord, SpiffeId};

/// Longest string accepted as a join token before parsing.
pub const MAX_TOKEN_LEN: usize = 128;

/// Why a join token is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenError {
    /// Not in Herald's token format.
    #[error("not a Herald join token")]
    Malformed,
    /// Longer than any join token.
    #[error("the join token exceeds {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    /// No such token.
    #[error("no such join token")]
    Unknown,
    /// Already used.
    #[error("the join token was already used")]
    Used,
    /// Past its expiry.
    #[error("the join token has expired")]
    Expired,
    /// A break-glass token past its time box, whatever expiry its record
    /// carries.
    #[error(
        "the break-glass token's time box (join_token.break_glass_max_ttl, {max_secs}s from its creation) has passed"
    )]
    TimeBoxPassed {
        /// The time box, seconds.
        max_secs: u64,
    },
    /// Created for another purpose than the one it is presented for.
    #[error("the join token is a {purpose} token; it cannot be used {used_as}")]
    WrongPurpose {
        /// What it was created for.
        purpose: JoinTokenPurpose,
        /// How it was presented.
        used_as: &'static str,
    },
    /// The stored record is unusable.
    #[error("the stored join token is corrupt: {0}")]
    Corrupt(String),
}

impl JoinTokenError {
    /// The stable error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            JoinTokenError::Malformed => ErrorCode::JoinTokenMalformed,
            JoinTokenError::TooLarge => ErrorCode::RequestTooLarge,
            JoinTokenError::Unknown => ErrorCode::JoinTokenUnknown,
            JoinTokenError::Used => ErrorCode::JoinTokenUsed,
            JoinTokenError::Expired | JoinTokenError::TimeBoxPassed { .. } => {
                ErrorCode::JoinTokenExpired
            }
            JoinTokenError::WrongPurpose { .. } => ErrorCode::JoinTokenWrongPurpose,
            JoinTokenError::Corrupt(_) => ErrorCode::Internal,
        }
    }
}

/// How a token is being presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenUse {
    /// On its own, to mint an SVID: bootstrap and break-glass tokens.
    Mint,
    /// As the enrolment factor of a TPM node attestation.
    NodeEnrolment,
    /// As the second factor of an OIDC token exchange.
    SecondFactor,
}

impl TokenUse {
    fn accepts(self, purpose: JoinTokenPurpose) -> bool {
        matches!(
            (self, purpose),
            (
                TokenUse::Mint,
                JoinTokenPurpose::Bootstrap | JoinTokenPurpose::BreakGlass
            ) | (TokenUse::NodeEnrolment, JoinTokenPurpose::NodeEnrolment)
                | (TokenUse::SecondFactor, JoinTokenPurpose::SecondFactor)
        )
    }

    fn describe(self) -> &'static str {
        match self {
            TokenUse::Mint => "to mint an SVID",
            TokenUse::NodeEnrolment => "to enrol a node",
            TokenUse::SecondFactor => "as a second factor",
        }
    }
}

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

/// Checks the token's shape (and size cap) and returns its hash, the key
/// the store looks it up by.
pub fn parse(token: &str) -> Result<[u8; 32], JoinTokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(JoinTokenError::TooLarge);
    }
    let (id, secret) = token.split_once('.').ok_or(JoinTokenError::Malformed)?;
    let well_formed = id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        && secret.len() == 43
        && URL_SAFE_NO_PAD.decode(secret).is_ok();
    if well_formed {
        Ok(hash(token))
    } else {
        Err(JoinTokenError::Malformed)
    }
}

/// A join token that may be used now, for the use it was presented for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedJoinToken {
    /// Its hash: the store consumes the token by it, in the issuance's
    /// transaction.
    pub hash: [u8; 32],
    /// Its public identifier.
    pub token_id: String,
    /// The SPIFFE ID it is bound to.
    pub spiffe_id: SpiffeId,
    /// What it was created for.
    pub purpose: JoinTokenPurpose,
    /// The policies it may serve (second factor, node enrolment); empty
    /// means any, where the purpose allows that.
    pub policies: Vec<String>,
    /// Who created it.
    pub created_by: String,
}

impl VerifiedJoinToken {
    /// Whether it may serve as a factor of `policy`.
    pub fn serves(&self, policy: &str) -> bool {
        self.policies.is_empty() || self.policies.iter().any(|p| p == policy)
    }
}

/// Decides whether the stored token (looked up by the hash [`parse`]
/// returned) may be used at `now` as `used_as`; a break-glass token only
/// within `break_glass_max_ttl` of its creation, whatever its record's
/// expiry (the CLI caps it too, but the record is only data). The store
/// consumes it atomically with the issuance later; this check names the
/// reason for the caller first.
pub fn verify(
    hash: [u8; 32],
    record: Option<JoinTokenRecord>,
    used_as: TokenUse,
    break_glass_max_ttl: std::time::Duration,
    now: i64,
) -> Result<VerifiedJoinToken, JoinTokenError> {
    let record = record.ok_or(JoinTokenError::Unknown)?;
    if record.used_at.is_some() {
        return Err(JoinTokenError::Used);
    }
    if record.expires_at <= now {
        return Err(JoinTokenError::Expired);
    }
    let max_secs = break_glass_max_ttl.as_secs();
    if record.purpose == JoinTokenPurpose::BreakGlass
        && now.saturating_sub(record.created_at) >= i64::try_from(max_secs).unwrap_or(i64::MAX)
    {
        return Err(JoinTokenError::TimeBoxPassed { max_secs });
    }
    if !used_as.accepts(record.purpose) {
        return Err(JoinTokenError::WrongPurpose {
            purpose: record.purpose,
            used_as: used_as.describe(),
        });
    }
    if record.purpose == JoinTokenPurpose::BreakGlass
        && record.reason.as_deref().is_none_or(str::is_empty)
    {
        return Err(JoinTokenError::Corrupt(
            "a break-glass token without a reason".into(),
        ));
    }
    if record.purpose == JoinTokenPurpose::SecondFactor && record.policies.is_empty() {
        return Err(JoinTokenError::Corrupt(
            "a second-factor token that names no policy".into(),
        ));
    }
    let spiffe_id = SpiffeId::parse(&record.spiffe_id)
        .map_err(|e| JoinTokenError::Corrupt(format!("stored SPIFFE ID: {e}")))?;
    Ok(VerifiedJoinToken {
        hash,
        token_id: record.token_id,
        spiffe_id,
        purpose: record.purpose,
        policies: record.policies,
        created_by: record.created_by,
    })
}

fn hash(token: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, token.as_bytes()).as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

    fn record(purpose: JoinTokenPurpose) -> JoinTokenRecord {
        JoinTokenRecord {
            token_id: "0123456789abcdef".into(),
            spiffe_id: "spiffe://example.org/a".into(),
            created_at: 100,
            expires_at: 200,
            used_at: None,
            created_by: "operator:test".into(),
            purpose,
            policies: vec!["p".into()],
            reason: Some("incident 42".into()),
        }
    }

    #[test]
    fn generated_tokens_parse_to_their_hash() {
        let t = generate().unwrap();
        assert_eq!(parse(&t.token), Ok(t.hash));
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
            assert_eq!(parse(bad), Err(JoinTokenError::Malformed), "{bad}");
        }
        assert_eq!(
            parse(&"a".repeat(MAX_TOKEN_LEN + 1)),
            Err(JoinTokenError::TooLarge)
        );
    }

    #[test]
    fn each_purpose_serves_only_its_use() {
        use JoinTokenPurpose as P;
        let cases = [
            (P::Bootstrap, TokenUse::Mint, true),
            (P::BreakGlass, TokenUse::Mint, true),
            (P::SecondFactor, TokenUse::Mint, false),
            (P::NodeEnrolment, TokenUse::Mint, false),
            (P::Bootstrap, TokenUse::SecondFactor, false),
            (P::SecondFactor, TokenUse::SecondFactor, true),
            (P::NodeEnrolment, TokenUse::SecondFactor, false),
            (P::Bootstrap, TokenUse::NodeEnrolment, false),
            (P::NodeEnrolment, TokenUse::NodeEnrolment, true),
            (P::BreakGlass, TokenUse::NodeEnrolment, false),
        ];
        for (purpose, used_as, ok) in cases {
            let got = verify([0; 32], Some(record(purpose)), used_as, HOUR, 150);
            assert_eq!(got.is_ok(), ok, "{purpose} as {used_as:?}: {got:?}");
            if !ok {
                assert_eq!(got.unwrap_err().code(), ErrorCode::JoinTokenWrongPurpose);
            }
        }
    }

    #[test]
    fn used_expired_and_unknown_tokens_are_refused() {
        let mut used = record(JoinTokenPurpose::Bootstrap);
        used.used_at = Some(120);
        assert_eq!(
            verify([0; 32], Some(used), TokenUse::Mint, HOUR, 150),
            Err(JoinTokenError::Used)
        );
        assert_eq!(
            verify(
                [0; 32],
                Some(record(JoinTokenPurpose::Bootstrap)),
                TokenUse::Mint,
                HOUR,
                200
            ),
            Err(JoinTokenError::Expired)
        );
        assert_eq!(
            verify([0; 32], None, TokenUse::Mint, HOUR, 150),
            Err(JoinTokenError::Unknown)
        );
    }

    #[test]
    fn a_break_glass_token_needs_its_reason() {
        let mut r = record(JoinTokenPurpose::BreakGlass);
        r.reason = None;
        assert_eq!(
            verify([0; 32], Some(r), TokenUse::Mint, HOUR, 150)
                .unwrap_err()
                .code(),
            ErrorCode::Internal
        );
    }

    #[test]
    fn a_break_glass_token_lasts_its_time_box_whatever_its_record_says() {
        let mut r = record(JoinTokenPurpose::BreakGlass);
        r.expires_at = 100 + 7 * 24 * 3600;
        let max = std::time::Duration::from_secs(60);
        assert!(verify([0; 32], Some(r.clone()), TokenUse::Mint, max, 159).is_ok());
        let late = verify([0; 32], Some(r.clone()), TokenUse::Mint, max, 160).unwrap_err();
        assert_eq!(late, JoinTokenError::TimeBoxPassed { max_secs: 60 });
        assert_eq!(late.code(), ErrorCode::JoinTokenExpired);
        // Other purposes live to their expiry.
        r.purpose = JoinTokenPurpose::Bootstrap;
        assert!(verify([0; 32], Some(r), TokenUse::Mint, max, 3600).is_ok());
    }
}
