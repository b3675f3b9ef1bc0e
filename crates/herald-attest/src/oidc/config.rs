//! How one OIDC issuer is trusted.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// A JWS algorithm Herald accepts from an issuer. Deliberately closed:
/// `none` and the HMAC family cannot be expressed, so no configuration can
/// let a token signed with a public key as an HMAC secret through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    RS384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    RS512,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// RSASSA-PSS with SHA-384.
    PS384,
    /// RSASSA-PSS with SHA-512.
    PS512,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
}

impl Algorithm {
    /// Parses the JOSE `alg` value; `None` for anything not in the closed set.
    pub fn from_jose(alg: &str) -> Option<Self> {
        Some(match alg {
            "RS256" => Self::RS256,
            "RS384" => Self::RS384,
            "RS512" => Self::RS512,
            "PS256" => Self::PS256,
            "PS384" => Self::PS384,
            "PS512" => Self::PS512,
            "ES256" => Self::ES256,
            "ES384" => Self::ES384,
            _ => return None,
        })
    }

    /// The JOSE `alg` value.
    pub fn as_jose(self) -> &'static str {
        match self {
            Self::RS256 => "RS256",
            Self::RS384 => "RS384",
            Self::RS512 => "RS512",
            Self::PS256 => "PS256",
            Self::PS384 => "PS384",
            Self::PS512 => "PS512",
            Self::ES256 => "ES256",
            Self::ES384 => "ES384",
        }
    }

    pub(crate) fn to_jwt(self) -> jsonwebtoken::Algorithm {
        use jsonwebtoken::Algorithm as A;
        match self {
            Self::RS256 => A::RS256,
            Self::RS384 => A::RS384,
            Self::RS512 => A::RS512,
            Self::PS256 => A::PS256,
            Self::PS384 => A::PS384,
            Self::PS512 => A::PS512,
            Self::ES256 => A::ES256,
            Self::ES384 => A::ES384,
        }
    }

    /// The JWK `kty` a key must have to be used with this algorithm.
    pub(crate) fn key_type(self) -> &'static str {
        match self {
            Self::ES256 | Self::ES384 => "EC",
            _ => "RSA",
        }
    }
}

/// One trusted issuer. Issuers are configured explicitly: a token whose
/// `iss` is not listed is refused before anything is fetched.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The issuer URL, compared byte for byte with the token's `iss` and the
    /// discovery document's `issuer`.
    pub issuer: String,
    /// Audiences Herald accepts; a token must name at least one of them.
    pub audiences: Vec<String>,
    /// Algorithms accepted from this issuer (default: RS256 and ES256).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<Algorithm>,
    /// A JWKS file used instead of discovery (air-gapped issuers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_jwks: Option<PathBuf>,
    /// Extra PEM trust roots for the issuer's HTTPS certificate, added to the
    /// system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extra_roots: Option<PathBuf>,
    /// Permits an `http://` issuer. Only for local testing; refused unless
    /// the issuer host is loopback.
    #[serde(default)]
    pub allow_insecure_http: bool,
    /// Clock-skew leeway for `exp`, `nbf` and `iat`.
    #[serde(
        default = "default_leeway",
        deserialize_with = "duration",
        serialize_with = "herald_core::duration::serialize"
    )]
    pub leeway: Duration,
    /// Largest token accepted, bytes.
    #[serde(default = "default_max_token_bytes")]
    pub max_token_bytes: usize,
    /// How often the JWKS is refreshed in the background.
    #[serde(
        default = "default_refresh",
        deserialize_with = "duration",
        serialize_with = "herald_core::duration::serialize"
    )]
    pub refresh_interval: Duration,
    /// Least time between two refreshes caused by an unknown `kid`.
    #[serde(
        default = "default_min_refresh",
        deserialize_with = "duration",
        serialize_with = "herald_core::duration::serialize"
    )]
    pub min_refresh_interval: Duration,
    /// Timeout of each HTTPS call to the issuer (connect + response).
    #[serde(
        default = "default_timeout",
        deserialize_with = "duration",
        serialize_with = "herald_core::duration::serialize"
    )]
    pub http_timeout: Duration,
    /// Tokens without `jti` are refused when true; when false their digest
    /// stands in as the single-use key.
    #[serde(default)]
    pub require_jti: bool,
}

impl IssuerConfig {
    /// A configuration with every default, for `issuer` and `audiences`.
    pub fn new(issuer: impl Into<String>, audiences: Vec<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audiences,
            algorithms: default_algorithms(),
            static_jwks: None,
            extra_roots: None,
            allow_insecure_http: false,
            leeway: default_leeway(),
            max_token_bytes: default_max_token_bytes(),
            refresh_interval: default_refresh(),
            min_refresh_interval: default_min_refresh(),
            http_timeout: default_timeout(),
            require_jti: false,
        }
    }
}

fn default_algorithms() -> Vec<Algorithm> {
    vec![Algorithm::RS256, Algorithm::ES256]
}
fn default_leeway() -> Duration {
    Duration::from_secs(60)
}
pub(crate) fn default_max_token_bytes() -> usize {
    16 * 1024
}
fn default_refresh() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_min_refresh() -> Duration {
    Duration::from_secs(30)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(serde::de::Error::custom)
}
