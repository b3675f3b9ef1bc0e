//! OIDC ID-token verification against explicitly configured issuers.
//!
//! The order of checks is deliberate: size cap, structure, header (`alg`
//! from a closed per-issuer list, no `crit`), issuer configured, signature
//! with a key from the issuer's JWKS — and only then the claims (`exp`,
//! `nbf`, `iat`, `aud`, `sub`), so nothing about an unsigned token's claims
//! is ever reported back. Header fields that point elsewhere for keys
//! (`jku`, `x5u`, `jwk`, `x5c`) are never followed.
//!
//! Single use (`jti`) is enforced by the datastore when the credential is
//! issued, not here: the verifier exposes the replay key and its expiry.

pub mod claims;
pub mod config;
mod jwks;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use herald_core::ErrorCode;
use serde_json::{Map, Value};

pub use config::{Algorithm, IssuerConfig};
pub use jwks::{MAX_DOCUMENT_BYTES, MAX_KEYS};

use jwks::{IssuerKeys, IssuerMap, KeySet};

/// Why a token was refused or could not be checked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    /// The token exceeds the size cap.
    #[error("token exceeds {0} bytes")]
    TooLarge(usize),
    /// Not a JWS compact JWT with JSON header and claims.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The `alg` is not allowed for the issuer (or is `none`/HMAC).
    #[error("algorithm {0:?} is not allowed for this issuer")]
    AlgorithmRefused(String),
    /// The header carries a critical extension Herald does not implement.
    #[error("unsupported critical header parameters")]
    CriticalHeader,
    /// `iss` is not a configured issuer.
    #[error("issuer {0:?} is not configured")]
    IssuerUnknown(String),
    /// No key matches `kid` even after a refresh.
    #[error("no key for kid {0:?} in the issuer's JWKS")]
    KeyUnknown(String),
    /// The signature does not verify.
    #[error("signature does not verify")]
    SignatureInvalid,
    /// `exp` is in the past (beyond leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `iat` is in the future (beyond leeway).
    #[error("token issued in the future")]
    IssuedInFuture,
    /// `aud` missing or naming no accepted audience.
    #[error("audience not accepted")]
    AudienceInvalid,
    /// A required claim is missing or mistyped.
    #[error("invalid claims: {0}")]
    ClaimsInvalid(String),
    /// Discovery or JWKS could not be fetched.
    #[error("issuer unavailable: {0}")]
    IssuerUnavailable(String),
    /// The configuration is unusable (reported at start-up).
    #[error("configuration: {0}")]
    Config(String),
}

impl OidcError {
    /// The stable code for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            OidcError::TooLarge(_) => ErrorCode::RequestTooLarge,
            OidcError::Malformed(_) | OidcError::CriticalHeader => ErrorCode::TokenMalformed,
            OidcError::AlgorithmRefused(_) => ErrorCode::TokenAlgorithmRefused,
            OidcError::IssuerUnknown(_) => ErrorCode::TokenIssuerUnknown,
            OidcError::KeyUnknown(_) => ErrorCode::TokenKeyUnknown,
            OidcError::SignatureInvalid => ErrorCode::TokenSignatureInvalid,
            OidcError::Expired => ErrorCode::TokenExpired,
            OidcError::NotYetValid => ErrorCode::TokenNotYetValid,
            OidcError::IssuedInFuture => ErrorCode::TokenIssuedInFuture,
            OidcError::AudienceInvalid => ErrorCode::TokenAudienceInvalid,
            OidcError::ClaimsInvalid(_) => ErrorCode::TokenClaimsInvalid,
            OidcError::IssuerUnavailable(_) => ErrorCode::IssuerUnavailable,
            OidcError::Config(_) => ErrorCode::Internal,
        }
    }
}

/// A token whose signature and claims have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedToken {
    /// The issuer, as configured.
    pub issuer: String,
    /// `sub`.
    pub subject: String,
    /// The token's audiences that Herald accepts.
    pub audiences: Vec<String>,
    /// Every claim, normalised (see [`claims`]).
    pub claims: Map<String, Value>,
    /// The single-use key: `jti:<issuer>#<jti>`, or `sha256:<digest>` when the token has none.
    pub replay_key: String,
    /// `exp`, Unix seconds.
    pub expires_at: i64,
    /// Hex SHA-256 of the whole token, for the audit record.
    pub digest: String,
}

impl VerifiedToken {
    /// Until when the replay key must be remembered: `exp` plus leeway.
    pub fn replay_until(&self, leeway_s: i64) -> i64 {
        self.expires_at.saturating_add(leeway_s)
    }
}

/// Verifies tokens from the configured issuers.
pub struct OidcVerifier {
    issuers: IssuerMap,
    max_token_bytes: usize,
}

impl std::fmt::Debug for OidcVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcVerifier")
            .field("issuers", &self.issuers.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Fetch counters of one issuer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerStats {
    /// The issuer.
    pub issuer: String,
    /// Successful JWKS fetches.
    pub fetches: u64,
    /// Failed fetches.
    pub failures: u64,
}

impl OidcVerifier {
    /// Builds a verifier; fails on an unusable issuer configuration.
    pub fn new(configs: Vec<IssuerConfig>) -> Result<Self, OidcError> {
        let mut issuers = HashMap::new();
        let mut max_token_bytes = 0;
        for cfg in configs {
            if cfg.audiences.is_empty() {
                return Err(OidcError::Config(format!(
                    "issuer {}: at least one audience is required",
                    cfg.issuer
                )));
            }
            if cfg.algorithms.is_empty() {
                return Err(OidcError::Config(format!(
                    "issuer {}: at least one algorithm is required",
                    cfg.issuer
                )));
            }
            max_token_bytes = max_token_bytes.max(cfg.max_token_bytes);
            let name = cfg.issuer.clone();
            if issuers
                .insert(name.clone(), Arc::new(IssuerKeys::new(cfg)?))
                .is_some()
            {
                return Err(OidcError::Config(format!("issuer {name} configured twice")));
            }
        }
        // With no issuer the cap is the default one, so a token is refused
        // for what it is (malformed, issuer unknown), not as "exceeds 0 bytes".
        if issuers.is_empty() {
            max_token_bytes = config::default_max_token_bytes();
        }
        Ok(Self {
            issuers,
            max_token_bytes,
        })
    }

    /// Whether no issuer is configured.
    pub fn is_empty(&self) -> bool {
        self.issuers.is_empty()
    }

    /// The configured issuers.
    pub fn issuers(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.issuers.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The leeway configured for `issuer`, seconds.
    pub fn leeway_secs(&self, issuer: &str) -> i64 {
        self.issuers
            .get(issuer)
            .map_or(0, |i| i.cfg.leeway.as_secs() as i64)
    }

    /// Fetch counters per issuer.
    pub fn stats(&self) -> Vec<IssuerStats> {
        let mut v: Vec<IssuerStats> = self
            .issuers
            .values()
            .map(|i| IssuerStats {
                issuer: i.cfg.issuer.clone(),
                fetches: i.stats.fetches.load(Ordering::Relaxed),
                failures: i.stats.failures.load(Ordering::Relaxed),
            })
            .collect();
        v.sort_by(|a, b| a.issuer.cmp(&b.issuer));
        v
    }

    /// Refreshes every issuer whose keys are missing or due. Failures are
    /// logged and leave the previous keys in place. Run on a schedule.
    pub async fn refresh_due(&self) {
        for keys in self.issuers.values() {
            let due = keys.cached().is_none_or(|(_, stale)| stale);
            if due {
                let _ = keys.refresh(Instant::now()).await;
            }
        }
    }

    /// Verifies `token` as of `now_s` (Unix seconds).
    pub async fn verify(&self, token: &str, now_s: i64) -> Result<VerifiedToken, OidcError> {
        if token.len() > self.max_token_bytes {
            return Err(OidcError::TooLarge(self.max_token_bytes));
        }
        let parts: Vec<&str> = token.split('.').collect();
        let [h64, p64, s64] = parts[..] else {
            return Err(OidcError::Malformed(
                "expected three dot-separated parts".into(),
            ));
        };
        let header = decode_json(h64, "header")?;
        let mut claims = decode_json(p64, "claims")?;
        if header.contains_key("crit") {
            return Err(OidcError::CriticalHeader);
        }
        let alg_name = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or_else(|| OidcError::Malformed("header has no alg".into()))?;
        let iss = claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| OidcError::ClaimsInvalid("iss is required".into()))?;
        let issuer = self
            .issuers
            .get(iss)
            .ok_or_else(|| OidcError::IssuerUnknown(iss.to_string()))?;
        let cfg = &issuer.cfg;
        if token.len() > cfg.max_token_bytes {
            return Err(OidcError::TooLarge(cfg.max_token_bytes));
        }
        let alg = Algorithm::from_jose(alg_name)
            .filter(|a| cfg.algorithms.contains(a))
            .ok_or_else(|| OidcError::AlgorithmRefused(alg_name.to_string()))?;
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.as_str()),
            Some(_) => return Err(OidcError::Malformed("kid must be a string".into())),
        };

        let message_len = h64.len() + 1 + p64.len();
        let message = &token.as_bytes()[..message_len];
        self.check_signature(issuer, kid, alg, message, s64).await?;

        let leeway = cfg.leeway.as_secs() as i64;
        let exp = int_claim(&claims, "exp")?
            .ok_or_else(|| OidcError::ClaimsInvalid("exp is required".into()))?;
        if now_s > exp.saturating_add(leeway) {
            return Err(OidcError::Expired);
        }
        if let Some(nbf) = int_claim(&claims, "nbf")?
            && now_s.saturating_add(leeway) < nbf
        {
            return Err(OidcError::NotYetValid);
        }
        if let Some(iat) = int_claim(&claims, "iat")?
            && iat > now_s.saturating_add(leeway)
        {
            return Err(OidcError::IssuedInFuture);
        }
        let audiences = match claims.get("aud") {
            Some(Value::String(a)) => vec![a.clone()],
            Some(Value::Array(items)) => items
                .iter()
                .filter_map(Value::as_str)
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        let accepted: Vec<String> = audiences
            .into_iter()
            .filter(|a| cfg.audiences.contains(a))
            .collect();
        if accepted.is_empty() {
            return Err(OidcError::AudienceInvalid);
        }
        let subject = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(OidcError::ClaimsInvalid("sub is required".into())),
        };
        let digest = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            token.as_bytes(),
        ));
        // Without a jti, the token is single-use by what the issuer signed
        // (header and claims), never by the signature's encoding: an ECDSA
        // signature (r, s) verifies as (r, n−s) too, so a digest of the
        // whole token would let a replay through with the other form.
        let signed_digest = hex::encode(aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            message,
        ));
        let replay_key = match claims.get("jti") {
            Some(Value::String(j)) if !j.is_empty() && j.len() <= 256 => {
                format!("jti:{}#{j}", cfg.issuer)
            }
            Some(_) => {
                return Err(OidcError::ClaimsInvalid(
                    "jti must be a short string".into(),
                ));
            }
            None if cfg.require_jti => {
                return Err(OidcError::ClaimsInvalid("jti is required".into()));
            }
            None => format!("sha256:{signed_digest}"),
        };
        claims::normalise(&mut claims);
        Ok(VerifiedToken {
            issuer: cfg.issuer.clone(),
            subject,
            audiences: accepted,
            claims,
            replay_key,
            expires_at: exp,
            digest,
        })
    }

    async fn check_signature(
        &self,
        issuer: &IssuerKeys,
        kid: Option<&str>,
        alg: Algorithm,
        message: &[u8],
        signature: &str,
    ) -> Result<(), OidcError> {
        let observed = Instant::now();
        let keys = match issuer.cached() {
            Some((keys, stale)) => {
                if stale {
                    // Due for a scheduled refresh: keep serving from the
                    // cache; the scheduled task (refresh_due) fetches.
                    tracing::debug!(issuer = %issuer.cfg.issuer, "JWKS due for refresh");
                }
                keys
            }
            // No keys yet (the issuer was down at start): fetch, but no
            // more often than `min_refresh_interval` — unsigned tokens
            // naming the issuer must not turn into a fetch each.
            None => {
                if !issuer.may_refresh() {
                    return Err(issuer.unavailable_since_last_failure());
                }
                issuer.refresh(observed).await?
            }
        };
        let keys = match kid {
            Some(k) if !keys.has_kid(k) => {
                if !issuer.may_refresh() {
                    return Err(OidcError::KeyUnknown(k.to_string()));
                }
                let fresh = issuer.refresh(observed).await?;
                if !fresh.has_kid(k) {
                    return Err(OidcError::KeyUnknown(k.to_string()));
                }
                fresh
            }
            _ => keys,
        };
        verify_with(&keys, kid, alg, message, signature)
    }
}

fn verify_with(
    keys: &KeySet,
    kid: Option<&str>,
    alg: Algorithm,
    message: &[u8],
    signature: &str,
) -> Result<(), OidcError> {
    // A kid whose key cannot serve this alg (an RSA key for ES256) leaves
    // no candidate: a signature that cannot verify.
    let verified = keys.candidates(kid, alg).any(|key| {
        matches!(
            jsonwebtoken::crypto::verify(signature, message, &key.key, alg.to_jwt()),
            Ok(true)
        )
    });
    if verified {
        Ok(())
    } else {
        Err(OidcError::SignatureInvalid)
    }
}

fn decode_json(part: &str, what: &str) -> Result<Map<String, Value>, OidcError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| OidcError::Malformed(format!("{what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(OidcError::Malformed(format!("{what} is not a JSON object"))),
    }
}

fn int_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<i64>, OidcError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => n
            .as_i64()
            .or_else(|| n.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
            .map(Some)
            .ok_or_else(|| OidcError::ClaimsInvalid(format!("{name} must be a number"))),
        Some(_) => Err(OidcError::ClaimsInvalid(format!("{name} must be a number"))),
    }
}
