//! An issuer's signing keys: discovery, JWKS fetch, caching and refresh.
//!
//! Keys are fetched once, kept in memory, refreshed in the background on a
//! schedule, and refreshed at once when a token names an unknown `kid` — at
//! most once per `min_refresh_interval`, so a stream of garbage `kid`s cannot
//! turn Herald into a load generator against the issuer. Refreshes are
//! single-flight: concurrent callers wait for the one fetch in progress.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use jsonwebtoken::DecodingKey;
use serde_json::Value;

use super::OidcError;
use super::config::{Algorithm, IssuerConfig};

/// Largest discovery document or JWKS accepted, bytes.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
/// Most keys kept from one JWKS.
pub const MAX_KEYS: usize = 64;
/// Most keys a token without `kid` is tried against: each try is a
/// signature verification an unauthenticated caller makes Herald do.
pub const MAX_KEYS_WITHOUT_KID: usize = 4;

/// One usable verification key.
pub(crate) struct Key {
    pub kid: Option<String>,
    /// `RSA` or `EC`.
    pub kty: &'static str,
    /// The curve of an EC key.
    pub crv: Option<String>,
    /// The `alg` the JWK pins, if any.
    pub alg: Option<String>,
    pub key: DecodingKey,
}

impl Key {
    /// Whether this key may verify a token signed with `alg`.
    pub fn fits(&self, alg: Algorithm) -> bool {
        if self.kty != alg.key_type() {
            return false;
        }
        if let Some(pinned) = &self.alg
            && pinned != alg.as_jose()
        {
            return false;
        }
        match alg {
            Algorithm::ES256 => self.crv.as_deref() == Some("P-256"),
            Algorithm::ES384 => self.crv.as_deref() == Some("P-384"),
            _ => true,
        }
    }
}

/// The keys of one JWKS.
#[derive(Default)]
pub(crate) struct KeySet {
    pub keys: Vec<Key>,
}

impl KeySet {
    /// Parses a JWKS document, keeping the signature keys Herald can use and
    /// skipping the rest (symmetric keys are never used, whatever they claim).
    pub fn parse(doc: &Value) -> Result<Self, String> {
        let items = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("JWKS has no `keys` array")?;
        let mut keys = Vec::new();
        for item in items.iter().take(MAX_KEYS) {
            let s = |k: &str| item.get(k).and_then(Value::as_str);
            if let Some(u) = s("use")
                && u != "sig"
            {
                continue;
            }
            let (kty, key) = match s("kty") {
                Some("RSA") => match (s("n"), s("e")) {
                    (Some(n), Some(e)) => match DecodingKey::from_rsa_components(n, e) {
                        Ok(k) => ("RSA", k),
                        Err(_) => continue,
                    },
                    _ => continue,
                },
                Some("EC") => match (s("x"), s("y")) {
                    (Some(x), Some(y)) => match DecodingKey::from_ec_components(x, y) {
                        Ok(k) => ("EC", k),
                        Err(_) => continue,
                    },
                    _ => continue,
                },
                _ => continue,
            };
            keys.push(Key {
                kid: s("kid").map(str::to_string),
                kty,
                crv: s("crv").map(str::to_string),
                alg: s("alg").map(str::to_string),
                key,
            });
        }
        Ok(Self { keys })
    }

    /// Keys that may verify a token with this `kid` and `alg`. A token
    /// without `kid` may be verified by the first [`MAX_KEYS_WITHOUT_KID`]
    /// keys of the right type.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        let cap = if kid.is_none() {
            MAX_KEYS_WITHOUT_KID
        } else {
            usize::MAX
        };
        self.keys
            .iter()
            .filter(move |k| kid.is_none() || k.kid.as_deref() == kid)
            .filter(move |k| k.fits(alg))
            .take(cap)
    }

    /// Whether any key carries this `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// Counters an operator can watch (exported as metrics later).
#[derive(Debug, Default)]
pub struct FetchStats {
    /// Successful JWKS fetches.
    pub fetches: AtomicU64,
    /// Failed discovery or JWKS fetches.
    pub failures: AtomicU64,
}

/// One issuer's key cache.
pub(crate) struct IssuerKeys {
    pub cfg: IssuerConfig,
    client: Option<reqwest::Client>,
    keys: RwLock<Option<(Arc<KeySet>, Instant)>>,
    last_attempt: Mutex<Option<Instant>>,
    /// Why the last fetch failed, for callers refused while it may not be
    /// retried yet.
    last_error: Mutex<Option<String>>,
    refresh: tokio::sync::Mutex<()>,
    pub stats: FetchStats,
}

impl IssuerKeys {
    /// Builds the cache; reads a static JWKS now, so a broken file fails at start.
    pub fn new(cfg: IssuerConfig) -> Result<Self, OidcError> {
        let bad = |m: String| OidcError::Config(format!("issuer {}: {m}", cfg.issuer));
        let mut keys = None;
        let mut client = None;
        if let Some(path) = &cfg.static_jwks {
            let text = std::fs::read(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
            let doc: Value = serde_json::from_slice(&text)
                .map_err(|e| bad(format!("{}: {e}", path.display())))?;
            let set = KeySet::parse(&doc).map_err(bad)?;
            keys = Some((Arc::new(set), Instant::now()));
        } else {
            check_url(&cfg.issuer, &cfg).map_err(bad)?;
            let mut builder = reqwest::Client::builder()
                .timeout(cfg.http_timeout)
                .connect_timeout(cfg.http_timeout)
                .redirect(reqwest::redirect::Policy::none())
                .https_only(!cfg.allow_insecure_http);
            if let Some(path) = &cfg.extra_roots {
                let pem =
                    std::fs::read(path).map_err(|e| bad(format!("{}: {e}", path.display())))?;
                let roots = reqwest::Certificate::from_pem_bundle(&pem)
                    .map_err(|e| bad(format!("{}: {e}", path.display())))?;
                builder = builder.tls_certs_merge(roots);
            }
            client = Some(builder.build().map_err(|e| bad(e.to_string()))?);
        }
        Ok(Self {
            cfg,
            client,
            keys: RwLock::new(keys),
            last_attempt: Mutex::new(None),
            last_error: Mutex::new(None),
            refresh: tokio::sync::Mutex::new(()),
            stats: FetchStats::default(),
        })
    }

    /// The cached keys, if any, and whether they are due for a refresh.
    pub fn cached(&self) -> Option<(Arc<KeySet>, bool)> {
        let guard = match self.keys.read() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        guard.as_ref().map(|(k, at)| {
            let stale = self.client.is_some() && at.elapsed() >= self.cfg.refresh_interval;
            (k.clone(), stale)
        })
    }

    /// Whether a refresh on a caller's behalf (an unknown `kid`, or no
    /// keys yet) is allowed now: at most once per `min_refresh_interval`.
    pub fn may_refresh(&self) -> bool {
        if self.client.is_none() {
            return false;
        }
        let guard = match self.last_attempt.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        guard.is_none_or(|t| t.elapsed() >= self.cfg.min_refresh_interval)
    }

    /// Fetches discovery and the JWKS, single-flight. `since` is when the
    /// caller observed the cache: if another caller refreshed after that,
    /// its result is used instead of fetching again.
    pub async fn refresh(&self, since: Instant) -> Result<Arc<KeySet>, OidcError> {
        let Some(client) = &self.client else {
            return self
                .cached()
                .map(|(k, _)| k)
                .ok_or_else(|| OidcError::Config("static JWKS missing".into()));
        };
        let _flight = self.refresh.lock().await;
        // Compare with when the keys were stored, not when a fetch began:
        // a fetch that started before `since` (the start-up refresh racing
        // the first request) but finished after it is just as fresh.
        {
            let guard = match self.keys.read() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if let Some((keys, at)) = guard.as_ref()
                && *at > since
            {
                return Ok(keys.clone());
            }
        }
        match self.last_attempt.lock() {
            Ok(mut g) => *g = Some(Instant::now()),
            Err(p) => *p.into_inner() = Some(Instant::now()),
        }
        match self.fetch(client).await {
            Ok(set) => {
                let set = Arc::new(set);
                match self.keys.write() {
                    Ok(mut g) => *g = Some((set.clone(), Instant::now())),
                    Err(p) => *p.into_inner() = Some((set.clone(), Instant::now())),
                }
                self.stats.fetches.fetch_add(1, Ordering::Relaxed);
                Ok(set)
            }
            Err(e) => {
                self.stats.failures.fetch_add(1, Ordering::Relaxed);
                self.record_failure(&e);
                tracing::warn!(issuer = %self.cfg.issuer, error = %e, "JWKS refresh failed");
                Err(e)
            }
        }
    }

    /// The refusal while no keys are cached and a fetch may not be retried
    /// yet, naming why the last one failed.
    pub fn unavailable_since_last_failure(&self) -> OidcError {
        let last = match self.last_error.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        OidcError::IssuerUnavailable(format!(
            "no keys for {} yet; the last fetch failed ({}); retried at most every {}s",
            self.cfg.issuer,
            last.as_deref().unwrap_or("in progress"),
            self.cfg.min_refresh_interval.as_secs()
        ))
    }

    fn record_failure(&self, e: &OidcError) {
        let text = match e {
            OidcError::IssuerUnavailable(m) => m.clone(),
            other => other.to_string(),
        };
        match self.last_error.lock() {
            Ok(mut g) => *g = Some(text),
            Err(p) => *p.into_inner() = Some(text),
        }
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<KeySet, OidcError> {
        let unavailable = |m: String| OidcError::IssuerUnavailable(m);
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            self.cfg.issuer.trim_end_matches('/')
        );
        let discovery = get_json(client, &discovery_url).await?;
        let issuer = discovery.get("issuer").and_then(Value::as_str);
        if issuer != Some(self.cfg.issuer.as_str()) {
            return Err(unavailable(format!(
                "discovery document names issuer {issuer:?}, expected {:?}",
                self.cfg.issuer
            )));
        }
        let jwks_uri = discovery
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| unavailable("discovery document has no jwks_uri".into()))?;
        check_url(jwks_uri, &self.cfg).map_err(unavailable)?;
        let jwks = get_json(client, jwks_uri).await?;
        KeySet::parse(&jwks).map_err(unavailable)
    }
}

/// Issuer and JWKS URLs must be HTTPS, or HTTP on loopback when allowed.
fn check_url(url: &str, cfg: &IssuerConfig) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("{url}: {e}"))?;
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if cfg.allow_insecure_http => {
            let host = parsed.host_str().unwrap_or("");
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let loopback =
                host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(format!("{url}: plain HTTP is allowed only on loopback"))
            }
        }
        _ => Err(format!("{url}: must be an https URL")),
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, OidcError> {
    let unavailable = |m: String| OidcError::IssuerUnavailable(m);
    let body = crate::http_fetch::get_capped(client, url, "application/json", MAX_DOCUMENT_BYTES)
        .await
        .map_err(|e| match e {
            // Say which key fixes it: this is configuration, not an outage.
            crate::http_fetch::FetchError::Certificate(_) => unavailable(format!(
                "GET {url}: {e} (an issuer whose certificate comes from a private CA needs that CA in its `extra_roots`)"
            )),
            other => unavailable(format!("GET {url}: {other}")),
        })?;
    serde_json::from_slice(&body).map_err(|e| unavailable(format!("GET {url}: not JSON: {e}")))
}

/// Looks keys up by issuer.
pub(crate) type IssuerMap = HashMap<String, Arc<IssuerKeys>>;
