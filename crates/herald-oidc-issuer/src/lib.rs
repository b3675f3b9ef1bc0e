//! The issuing side of OIDC, shared by the dev issuer of `herald server
//! --dev` and the test issuer of Herald's test suite (`herald-test-oidc`):
//! an ES256 signing key with its JWK, JWS compact serialisation, the
//! discovery document, and claims shaped like a GitHub Actions job's.
//!
//! Nothing here verifies tokens — Herald's verifier (`herald-attest`) is
//! the other side, and stays independent of this code.
#![forbid(unsafe_code)]

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

/// What can go wrong while issuing.
#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    /// Key generation, parsing or signing failed in the crypto library.
    #[error("signing key: {0}")]
    Key(String),
    /// The system random source failed.
    #[error("random source failed")]
    Random,
}

/// An ECDSA P-256 signing key with its key ID.
pub struct Es256Key {
    kid: String,
    pair: EcdsaKeyPair,
    pkcs8: Vec<u8>,
}

impl std::fmt::Debug for Es256Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("Es256Key").field("kid", &self.kid).finish()
    }
}

impl Es256Key {
    /// A fresh key.
    pub fn generate(kid: impl Into<String>) -> Result<Self, IssuerError> {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| IssuerError::Key(e.to_string()))?;
        Self::from_pkcs8(kid, pkcs8.as_ref())
    }

    /// A key from its PKCS#8 DER.
    pub fn from_pkcs8(kid: impl Into<String>, der: &[u8]) -> Result<Self, IssuerError> {
        let pair = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|e| IssuerError::Key(e.to_string()))?;
        Ok(Self {
            kid: kid.into(),
            pair,
            pkcs8: der.to_vec(),
        })
    }

    /// The key ID (`kid`).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The private key as PKCS#8 DER (to keep it in a 0600 file).
    pub fn pkcs8(&self) -> &[u8] {
        &self.pkcs8
    }

    /// The public key as a JWK (`use: sig`, `alg: ES256`).
    pub fn jwk(&self) -> Value {
        ec_p256_jwk(self.pair.public_key().as_ref(), &self.kid)
    }

    /// A JWS-signed JWT over `claims`, header `{alg: ES256, typ: JWT, kid}`.
    pub fn sign_jwt(&self, claims: &Value) -> Result<String, IssuerError> {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let input = signing_input(&header, claims);
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .map_err(|e| IssuerError::Key(e.to_string()))?;
        Ok(compact(&input, sig.as_ref()))
    }
}

/// The JWK of an uncompressed P-256 public point (`04 ‖ x ‖ y`).
pub fn ec_p256_jwk(point: &[u8], kid: &str) -> Value {
    let (x, y) = match point {
        [4, rest @ ..] if rest.len() == 64 => rest.split_at(32),
        _ => (&[][..], &[][..]),
    };
    json!({"kty": "EC", "use": "sig", "alg": "ES256", "crv": "P-256", "kid": kid,
           "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)})
}

/// `base64url(header).base64url(claims)`: what a JWS signs.
pub fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// The compact serialisation: the signing input and the signature.
pub fn compact(signing_input: &str, signature: &[u8]) -> String {
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// An OIDC discovery document for an issuer that only issues ID tokens.
pub fn discovery(issuer: &str, jwks_uri: &str, algorithms: &[&str]) -> Value {
    json!({
        "issuer": issuer,
        "jwks_uri": jwks_uri,
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public", "pairwise"],
        "id_token_signing_alg_values_supported": algorithms,
        "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "nbf"],
    })
}

/// Unix seconds now (0 if the clock is before 1970).
pub fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A random 128-bit identifier, hex (a `jti`).
pub fn random_id() -> Result<String, IssuerError> {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).map_err(|_| IssuerError::Random)?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// What a GitHub Actions job's ID token says about it.
#[derive(Debug, Clone)]
pub struct ActionsJob<'a> {
    /// `iss`.
    pub issuer: &'a str,
    /// `aud`.
    pub audience: &'a str,
    /// `owner/name`.
    pub repository: &'a str,
    /// `refs/heads/…`.
    pub git_ref: &'a str,
    /// The deployment environment.
    pub environment: &'a str,
    /// Seconds from now until `exp`.
    pub ttl_secs: i64,
}

/// Claims shaped like a GitHub Actions ID token (a push to `git_ref` of
/// `repository`, deploying into `environment`), with GitHub's string-typed
/// numbers and booleans, a fresh `jti`, and `nbf`/`iat` 5 s in the past.
pub fn github_actions_claims(job: &ActionsJob<'_>) -> Result<Value, IssuerError> {
    let now = now();
    let repo = job.repository;
    let owner = repo.split('/').next().unwrap_or(repo);
    let git_ref = job.git_ref;
    Ok(json!({
        "jti": random_id()?,
        "sub": format!("repo:{repo}:environment:{}", job.environment),
        "aud": job.audience,
        "ref": git_ref,
        "ref_type": "branch",
        "ref_protected": "true",
        "sha": "d1a3c8e0b5e1f9a4c3b2a1f0e9d8c7b6a5f4e3d2",
        "repository": repo,
        "repository_id": "690373517",
        "repository_owner": owner,
        "repository_owner_id": "1342004",
        "repository_visibility": "private",
        "run_id": "11890000001",
        "run_number": "42",
        "run_attempt": "1",
        "runner_environment": "github-hosted",
        "actor": "octocat",
        "actor_id": "583231",
        "workflow": "deploy",
        "workflow_ref": format!("{repo}/.github/workflows/deploy.yml@{git_ref}"),
        "job_workflow_ref": format!("{repo}/.github/workflows/deploy.yml@{git_ref}"),
        "event_name": "push",
        "environment": job.environment,
        "iss": job.issuer,
        "nbf": now - 5,
        "iat": now - 5,
        "exp": now + job.ttl_secs,
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_signed_token_verifies_with_its_jwk() {
        let key = Es256Key::generate("k1").unwrap();
        let claims = json!({"sub": "x"});
        let token = key.sign_jwt(&claims).unwrap();
        let (input, sig) = token.rsplit_once('.').unwrap();
        let jwk = key.jwk();
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
        let point = [&[4u8][..], &x, &y].concat();
        let public = signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point);
        let sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
        public.verify(input.as_bytes(), &sig).unwrap();
        // A changed payload does not verify.
        let other = signing_input(&json!({"alg": "ES256"}), &json!({"sub": "y"}));
        assert!(public.verify(other.as_bytes(), &sig).is_err());
        // The key survives a round trip through PKCS#8.
        let again = Es256Key::from_pkcs8("k1", key.pkcs8()).unwrap();
        assert_eq!(again.jwk(), jwk);
        assert!(!format!("{key:?}").contains("pkcs8"));
    }

    #[test]
    fn actions_claims_have_the_job_and_fresh_ids() {
        let job = ActionsJob {
            issuer: "http://127.0.0.1:1",
            audience: "a",
            repository: "acme/web",
            git_ref: "refs/heads/main",
            environment: "prod",
            ttl_secs: 300,
        };
        let a = github_actions_claims(&job).unwrap();
        let b = github_actions_claims(&job).unwrap();
        assert_eq!(a["repository_owner"], "acme");
        assert_eq!(a["sub"], "repo:acme/web:environment:prod");
        assert_ne!(a["jti"], b["jti"]);
        assert_eq!(a["exp"].as_i64().unwrap() - a["iat"].as_i64().unwrap(), 305);
    }
}
