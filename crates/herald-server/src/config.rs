//! Server configuration: one TOML file, environment overrides, and the
//! embedded `--dev` defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_core::TrustDomain;
use serde::{Deserialize, Serialize};

use crate::ServerError;

/// The trust domain `herald server --dev` uses.
pub const DEV_TRUST_DOMAIN: &str = "dev.herald.test";
/// The data directory `herald server --dev` uses, relative to the working directory.
pub const DEV_DATA_DIR: &str = ".herald-dev";

/// Keys without a default: every configuration file sets them.
pub const REQUIRED_KEYS: &[&str] = &["trust_domain", "data_dir"];

/// Keys that are unset (the listener or feature off, or derived) unless a
/// file gives them; `herald config defaults` lists them by name and
/// `deploy/herald.example.toml` shows each commented out.
pub const UNSET_BY_DEFAULT: &[&str] = &[
    "database_url",
    "listen.https",
    "ca.key_encryption_key_file",
    "ca.upstream_cert",
    "ca.upstream_key",
    "policy.dir",
    "jwt.issuer",
    "audit.checkpoint_dir",
];

/// Everything `herald server` needs. Every key is documented in
/// `deploy/herald.example.toml`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// The trust domain this server is the authority for.
    pub trust_domain: TrustDomain,
    /// Directory for the SQLite database, the dev KEK and `bundle.pem`.
    pub data_dir: PathBuf,
    /// Database URL: `sqlite://<path>` (one server) or `postgres://…`
    /// (several replicas sharing it); defaults to `sqlite://<data_dir>/herald.db`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Listener addresses.
    #[serde(default)]
    pub listen: ListenConfig,
    /// CA settings.
    #[serde(default)]
    pub ca: CaConfig,
    /// X.509 SVID settings.
    #[serde(default)]
    pub svid: SvidConfig,
    /// Join token settings.
    #[serde(default)]
    pub join_token: JoinTokenConfig,
    /// The server's own TLS certificate.
    #[serde(default)]
    pub tls: TlsConfig,
    /// Trusted OIDC issuers (CI platforms, function runtimes, clusters).
    #[serde(default)]
    pub oidc: OidcConfig,
    /// Attestation policies.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// JWT-SVIDs and Herald's own JWTs.
    #[serde(default)]
    pub jwt: JwtConfig,
    /// Cloud-style session credentials.
    #[serde(default)]
    pub cloud: CloudConfig,
    /// Per-caller rate limits.
    #[serde(default)]
    pub rate_limit: RateLimitConfig,
    /// RFC 7662 introspection endpoint.
    #[serde(default)]
    pub introspection: IntrospectionConfig,
    /// TPM node attestation.
    #[serde(default)]
    pub attestation: AttestationConfig,
    /// Signed checkpoints of the audit chain.
    #[serde(default)]
    pub audit: AuditConfig,
    /// SPIFFE federation: the trust domains whose bundles this one consumes.
    #[serde(default)]
    pub federation: FederationConfig,
    /// `true` only for `--dev`: generates a KEK file in the data directory when none is configured.
    #[serde(skip)]
    pub dev: bool,
    /// `true` only for `--dev`: serve the DEV-ONLY local OIDC issuer and its
    /// policy (`dev_issuer`). No file or environment variable can set it.
    #[serde(skip)]
    pub dev_issuer: bool,
}

/// Listener addresses.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenConfig {
    /// gRPC over TLS.
    pub grpc: SocketAddr,
    /// Plain HTTP: bundle, health, readiness, token exchange.
    pub http: SocketAddr,
    /// Optional HTTPS twin of the HTTP listener, with the server's own
    /// certificate: the STS and RFC 8693 endpoints return secrets, so
    /// deployments not behind a TLS-terminating proxy should use this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub https: Option<SocketAddr>,
    /// Most open connections per listener; past it, new ones are closed at
    /// once (and counted).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Time a client has to send a request's head (HTTP); on gRPC, the
    /// time from the TLS handshake to its first request's complete
    /// headers, and to finish any frame it has begun. However steadily it
    /// dribbles, a client slower than this is cut off.
    #[serde(
        default = "default_header_read_timeout",
        with = "humantime_serde_compat"
    )]
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's body once its head is in
    /// (HTTP): a slow POST is answered `request_timeout` (408) and its
    /// connection closed.
    #[serde(default = "default_body_read_timeout", with = "humantime_serde_compat")]
    pub body_read_timeout: Duration,
    /// A gRPC connection with nothing read for this long is closed (live
    /// clients answer the server's keep-alive pings well within it).
    #[serde(default = "default_idle_timeout", with = "humantime_serde_compat")]
    pub idle_timeout: Duration,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            grpc: SocketAddr::from(([127, 0, 0, 1], 8443)),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            https: None,
            max_connections: default_max_connections(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            idle_timeout: default_idle_timeout(),
        }
    }
}

fn default_max_connections() -> usize {
    4096
}

fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_body_read_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(300)
}

/// CA settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CaConfig {
    /// File holding the key-encryption key (64 hex characters or base64 of
    /// 32 bytes, mode 0600). `HERALD_KEK` in the environment takes precedence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_encryption_key_file: Option<PathBuf>,
    /// Lifetime of a CA generated by Herald.
    #[serde(default = "default_ca_ttl", with = "humantime_serde_compat")]
    pub ttl: Duration,
    /// Upstream CA certificate chain (PEM, the upstream CA first, up to its root).
    /// With `upstream_key`, Herald runs as an intermediate under it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_cert: Option<PathBuf>,
    /// Upstream CA private key (PEM, PKCS#8; mode 0600). Read once to sign Herald's intermediate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_key: Option<PathBuf>,
    /// How often each replica checks the datastore's bundle sequence and
    /// reloads the key ring when another replica (or `herald ca rotate`)
    /// changed it.
    #[serde(default = "default_bundle_poll", with = "humantime_serde_compat")]
    pub bundle_poll: Duration,
    /// Key rotation (X.509 CA and JWT signing keys).
    #[serde(default)]
    pub rotation: RotationConfig,
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            key_encryption_key_file: None,
            ttl: default_ca_ttl(),
            upstream_cert: None,
            upstream_key: None,
            bundle_poll: default_bundle_poll(),
            rotation: RotationConfig::default(),
        }
    }
}

fn default_bundle_poll() -> Duration {
    Duration::from_secs(1)
}

/// When CA and JWT keys rotate. A key's life: `prepared` (published in the
/// bundle, not yet signing) → `active` → `retiring` (still published, no
/// longer signing) → `retired` once everything it signed has expired.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RotationConfig {
    /// Prepare the next key on schedule (`false`: only `herald ca rotate`
    /// starts a rotation; activation and retirement still follow).
    #[serde(default = "default_true")]
    pub automatic: bool,
    /// Share of the active key's lifetime after which the next key is prepared.
    #[serde(default = "default_rotate_at")]
    pub rotate_at: f64,
    /// How long a prepared key is published before it signs anything: long
    /// enough for every agent, Workload API client and bundle consumer to
    /// have fetched it (the bundle endpoint's refresh hint is 5 minutes).
    #[serde(default = "default_publish_ahead", with = "humantime_serde_compat")]
    pub publish_ahead: Duration,
    /// How often the replica holding the rotation lease checks the key ring.
    #[serde(default = "default_rotation_check", with = "humantime_serde_compat")]
    pub check_interval: Duration,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            automatic: true,
            rotate_at: default_rotate_at(),
            publish_ahead: default_publish_ahead(),
            check_interval: default_rotation_check(),
        }
    }
}

fn default_rotate_at() -> f64 {
    0.5
}

fn default_publish_ahead() -> Duration {
    Duration::from_secs(3600)
}

fn default_rotation_check() -> Duration {
    Duration::from_secs(30)
}

fn default_ca_ttl() -> Duration {
    Duration::from_secs(365 * 24 * 3600)
}

/// TPM node attestation.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AttestationConfig {
    /// How long the server waits for each message of an attestation
    /// stream before refusing it with `attestation_timeout`.
    #[serde(default = "default_step_timeout", with = "humantime_serde_compat")]
    pub step_timeout: Duration,
}

impl Default for AttestationConfig {
    fn default() -> Self {
        Self {
            step_timeout: default_step_timeout(),
        }
    }
}

fn default_step_timeout() -> Duration {
    Duration::from_secs(20)
}

/// Signed checkpoints of the audit chain (see `herald audit checkpoint`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// How often a checkpoint of the chain's head is signed (when it moved).
    #[serde(
        default = "default_checkpoint_interval",
        with = "humantime_serde_compat"
    )]
    pub checkpoint_interval: Duration,
    /// A directory each checkpoint is also written to (ship it off the
    /// machine); unset: the database and the OTLP span only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_dir: Option<PathBuf>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval: default_checkpoint_interval(),
            checkpoint_dir: None,
        }
    }
}

fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(300)
}

/// X.509 SVID lifetimes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SvidConfig {
    /// Lifetime of an issued X.509 SVID.
    #[serde(default = "default_x509_ttl", with = "humantime_serde_compat")]
    pub x509_ttl: Duration,
}

impl Default for SvidConfig {
    fn default() -> Self {
        Self {
            x509_ttl: default_x509_ttl(),
        }
    }
}

fn default_x509_ttl() -> Duration {
    Duration::from_secs(3600)
}

/// Join token lifetimes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenConfig {
    /// Lifetime when `herald token create` gets no `--ttl`.
    #[serde(default = "default_token_ttl", with = "humantime_serde_compat")]
    pub default_ttl: Duration,
    /// Longest lifetime `--ttl` may ask for.
    #[serde(default = "default_token_max_ttl", with = "humantime_serde_compat")]
    pub max_ttl: Duration,
    /// Longest lifetime of a break-glass token: an emergency is time-boxed.
    #[serde(
        default = "default_break_glass_max_ttl",
        with = "humantime_serde_compat"
    )]
    pub break_glass_max_ttl: Duration,
}

impl Default for JoinTokenConfig {
    fn default() -> Self {
        Self {
            default_ttl: default_token_ttl(),
            max_ttl: default_token_max_ttl(),
            break_glass_max_ttl: default_break_glass_max_ttl(),
        }
    }
}

fn default_break_glass_max_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_token_ttl() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_token_max_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// The server's own TLS certificate.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// DNS names clients use to reach the server (IP addresses of the
    /// listeners are added automatically).
    #[serde(default = "default_dns_names")]
    pub dns_names: Vec<String>,
    /// Lifetime of the server certificate; it is re-issued at half-life.
    #[serde(default = "default_tls_ttl", with = "humantime_serde_compat")]
    pub ttl: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            dns_names: default_dns_names(),
            ttl: default_tls_ttl(),
        }
    }
}

fn default_dns_names() -> Vec<String> {
    vec!["localhost".to_owned()]
}

fn default_tls_ttl() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// Trusted OIDC issuers.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// One entry per issuer (`[[oidc.issuers]]`).
    #[serde(default)]
    pub issuers: Vec<herald_attest::oidc::IssuerConfig>,
}

/// Where attestation policies come from.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of `*.yaml` policies. Unset: token exchange is refused
    /// (deny by default). `--dev` uses `./attestation-policies` if present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
    /// How often the directory is checked for changes (hot reload; a
    /// broken set is refused and the last good one stays active).
    #[serde(default = "default_policy_reload", with = "humantime_serde_compat")]
    pub reload_interval: Duration,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: None,
            reload_interval: default_policy_reload(),
        }
    }
}

fn default_policy_reload() -> Duration {
    Duration::from_secs(5)
}

/// JWT settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The `iss` of Herald's JWTs and the base of its
    /// `/.well-known/openid-configuration`. Defaults to `http://<listen.http>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// JWT-SVID lifetime when the caller asks for none (policy caps still apply).
    #[serde(default = "default_jwt_ttl", with = "humantime_serde_compat")]
    pub default_ttl: Duration,
}

impl Default for JwtConfig {
    fn default() -> Self {
        Self {
            issuer: None,
            default_ttl: default_jwt_ttl(),
        }
    }
}

fn default_jwt_ttl() -> Duration {
    Duration::from_secs(300)
}

/// Who may call `POST /v1/introspect`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionConfig {
    /// RFC 7662 requires callers to authenticate: when true, a caller
    /// presents `Authorization: Bearer <JWT-SVID>` issued by this server
    /// for `audience` (a resource server's own identity).
    #[serde(default = "default_true")]
    pub require_client_auth: bool,
    /// The audience such a JWT-SVID must carry.
    #[serde(default = "default_introspection_audience")]
    pub audience: String,
}

impl Default for IntrospectionConfig {
    fn default() -> Self {
        Self {
            require_client_auth: true,
            audience: default_introspection_audience(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_introspection_audience() -> String {
    "herald-introspection".to_owned()
}

/// Per-caller rate limits (token bucket per source address) on every
/// issuing call (mint, renew, node attestation, token exchange),
/// checked before any evidence is parsed or verified.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second per caller; 0 disables limiting.
    #[serde(default = "default_rate")]
    pub per_caller_rate: f64,
    /// Requests a caller may make at once.
    #[serde(default = "default_burst")]
    pub per_caller_burst: f64,
    /// How often each caller's rate-limited refusals are written as one
    /// aggregated audit record.
    #[serde(default = "default_report_interval", with = "humantime_serde_compat")]
    pub report_interval: Duration,
    /// Refusals per second, server-wide, audited one record each; past it
    /// (many addresses each under their own limit) refusals are counted
    /// into one `refusals_aggregated` record per caller per interval. 0:
    /// every refusal gets its own record.
    #[serde(default = "default_refusal_audit_rate")]
    pub refusal_audit_rate: f64,
    /// Refusals audited one by one at once before the rate applies.
    #[serde(default = "default_refusal_audit_burst")]
    pub refusal_audit_burst: f64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_caller_rate: default_rate(),
            per_caller_burst: default_burst(),
            report_interval: default_report_interval(),
            refusal_audit_rate: default_refusal_audit_rate(),
            refusal_audit_burst: default_refusal_audit_burst(),
        }
    }
}

fn default_refusal_audit_rate() -> f64 {
    100.0
}

fn default_refusal_audit_burst() -> f64 {
    1000.0
}

fn default_report_interval() -> Duration {
    Duration::from_secs(10)
}

// Generous enough for a CI fleet behind one NAT address; tight enough that
// one caller cannot monopolise the server's signature checks.
fn default_rate() -> f64 {
    200.0
}

fn default_burst() -> f64 {
    400.0
}

/// Cloud-style session credential settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CloudConfig {
    /// Lifetime when the caller asks for none (AWS's default is 1 h; the
    /// role's cap still applies).
    #[serde(default = "default_cloud_ttl", with = "humantime_serde_compat")]
    pub default_ttl: Duration,
    /// `Provider` in STS responses, and the prefix of `AssumedRoleUser` ARNs.
    #[serde(default = "default_provider")]
    pub provider: String,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            default_ttl: default_cloud_ttl(),
            provider: default_provider(),
        }
    }
}

fn default_cloud_ttl() -> Duration {
    Duration::from_secs(3600)
}

fn default_provider() -> String {
    "herald".to_owned()
}

mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        herald_core::duration::serialize(d, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

impl ServerConfig {
    /// Every key at its default, for the two required ones given.
    pub fn new(trust_domain: TrustDomain, data_dir: PathBuf) -> Self {
        Self {
            trust_domain,
            data_dir,
            database_url: None,
            listen: ListenConfig::default(),
            ca: CaConfig::default(),
            svid: SvidConfig::default(),
            join_token: JoinTokenConfig::default(),
            tls: TlsConfig::default(),
            oidc: OidcConfig::default(),
            policy: PolicyConfig::default(),
            jwt: JwtConfig::default(),
            cloud: CloudConfig::default(),
            rate_limit: RateLimitConfig::default(),
            introspection: IntrospectionConfig::default(),
            attestation: AttestationConfig::default(),
            audit: AuditConfig::default(),
            federation: FederationConfig::default(),
            dev: false,
            dev_issuer: false,
        }
    }

    /// The embedded defaults of `herald server --dev`, rooted at `data_dir`.
    pub fn dev(data_dir: &Path) -> Result<Self, ServerError> {
        let trust_domain =
            TrustDomain::new(DEV_TRUST_DOMAIN).map_err(|e| ServerError::Config(e.to_string()))?;
        let mut cfg = Self::new(trust_domain, data_dir.to_path_buf());
        cfg.policy.dir = Path::new("attestation-policies")
            .is_dir()
            .then(|| PathBuf::from("attestation-policies"));
        cfg.dev = true;
        cfg.dev_issuer = true;
        Ok(cfg)
    }

    /// Every key with its real default, as TOML — what `herald config
    /// defaults` prints. Serialised from [`ServerConfig::new`], so it cannot
    /// drift from what the server does; the required keys and the keys that
    /// are off unless set are listed in comments, as is one
    /// `[[oidc.issuers]]` entry with its defaults.
    pub fn defaults_toml() -> Result<String, ServerError> {
        let bad = |e: toml::ser::Error| ServerError::Config(format!("serialising defaults: {e}"));
        let td = TrustDomain::new("example.org").map_err(|e| ServerError::Config(e.to_string()))?;
        let body =
            toml::to_string(&Self::new(td, PathBuf::from("/var/lib/herald"))).map_err(bad)?;
        let issuer = herald_attest::oidc::IssuerConfig::new(
            "https://issuer.example.org",
            vec!["herald".to_owned()],
        );
        let issuer = toml::to_string(&issuer).map_err(bad)?;
        let mut out = String::from(
            "# Herald server configuration: every key with its default\n\
             # (`herald config defaults`; deploy/herald.example.toml explains each).\n\
             #\n\
             # Required, no default:\n\
             #   trust_domain = \"example.org\"\n\
             #   data_dir = \"/var/lib/herald\"\n\
             # Off (unset) unless given: ",
        );
        out.push_str(&UNSET_BY_DEFAULT.join(", "));
        out.push('\n');
        for line in body.lines() {
            // The required keys were placeholders: they are listed above.
            if REQUIRED_KEYS
                .iter()
                .any(|k| line.starts_with(&format!("{k} = ")))
            {
                continue;
            }
            out.push_str(line);
            out.push('\n');
        }
        out.push_str(
            "\n# One table per trusted issuer; `issuer` and `audiences` are required,\n\
             # the rest default as shown:\n# [[oidc.issuers]]\n",
        );
        for line in issuer.lines() {
            out.push_str("# ");
            out.push_str(line);
            out.push('\n');
        }
        Ok(out)
    }

    /// Parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ServerError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text).map_err(|e| ServerError::Config(format!("{}: {e}", path.display())))
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ServerError> {
        toml::from_str(text).map_err(|e| ServerError::Config(e.to_string()))
    }

    /// Applies `HERALD_*` environment overrides: `HERALD_TRUST_DOMAIN`,
    /// `HERALD_DATA_DIR`, `HERALD_DATABASE_URL`, `HERALD_LISTEN_GRPC`,
    /// `HERALD_LISTEN_HTTP`, `HERALD_LISTEN_HTTPS`, `HERALD_POLICY_DIR`, `HERALD_JWT_ISSUER`,
    /// `HERALD_KEK_FILE` (`HERALD_KEK` is read when the
    /// CA is opened).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ServerError> {
        let bad = |k: &str, e: String| ServerError::Config(format!("{k}: {e}"));
        if let Some(v) = get("HERALD_TRUST_DOMAIN") {
            self.trust_domain =
                TrustDomain::new(&v).map_err(|e| bad("HERALD_TRUST_DOMAIN", e.to_string()))?;
        }
        if let Some(v) = get("HERALD_DATA_DIR") {
            self.data_dir = PathBuf::from(v);
        }
        if let Some(v) = get("HERALD_DATABASE_URL") {
            self.database_url = Some(v);
        }
        if let Some(v) = get("HERALD_LISTEN_GRPC") {
            self.listen.grpc = v
                .parse()
                .map_err(|e| bad("HERALD_LISTEN_GRPC", format!("{e}")))?;
        }
        if let Some(v) = get("HERALD_LISTEN_HTTP") {
            self.listen.http = v
                .parse()
                .map_err(|e| bad("HERALD_LISTEN_HTTP", format!("{e}")))?;
        }
        if let Some(v) = get("HERALD_LISTEN_HTTPS") {
            self.listen.https = Some(
                v.parse()
                    .map_err(|e| bad("HERALD_LISTEN_HTTPS", format!("{e}")))?,
            );
        }
        if let Some(v) = get("HERALD_POLICY_DIR") {
            self.policy.dir = Some(PathBuf::from(v));
        }
        if let Some(v) = get("HERALD_JWT_ISSUER") {
            self.jwt.issuer = Some(v);
        }
        if let Some(v) = get("HERALD_KEK_FILE") {
            self.ca.key_encryption_key_file = Some(PathBuf::from(v));
        }
        Ok(())
    }

    /// The `iss` of Herald's JWTs.
    pub fn jwt_issuer(&self) -> String {
        self.jwt
            .issuer
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.listen.http))
    }

    /// The database URL in effect.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.data_dir.join("herald.db").display()))
    }

    /// The `[federation]` part of [`ServerConfig::validate`].
    fn validate_federation(&self) -> Result<(), ServerError> {
        let bad = |m: String| Err(ServerError::Config(m));
        let f = &self.federation;
        if f.min_refresh < Duration::from_secs(1) || f.max_refresh < f.min_refresh {
            return bad(
                "federation.min_refresh must be at least 1s and at most max_refresh".into(),
            );
        }
        if f.retry.is_zero() || f.timeout.is_zero() {
            return bad("federation.retry and federation.timeout must be more than 0".into());
        }
        if let Some(ep) = &f.bundle_endpoint
            && ep.cert_file.is_some() != ep.key_file.is_some()
        {
            return bad("federation.bundle_endpoint: cert_file and key_file go together".into());
        }
        let mut seen = std::collections::HashSet::new();
        for t in &f.trust_domains {
            let td = &t.trust_domain;
            let at = |m: &str| format!("federation.trust_domains {td}: {m}");
            if td == &self.trust_domain {
                return bad(at("is this server's own trust domain"));
            }
            if !seen.insert(td.clone()) {
                return bad(at("is listed twice"));
            }
            if let Some(url) = &t.url
                && !url.starts_with("https://")
            {
                return bad(at("url must be https:// (SPIFFE Federation)"));
            }
            match t.profile {
                BundleEndpointProfile::HttpsSpiffe => {
                    match &t.endpoint_spiffe_id {
                        Some(id) if id.trust_domain() == td => {}
                        Some(id) => {
                            return bad(at(&format!(
                                "endpoint_spiffe_id {id} is not in the federated trust domain"
                            )));
                        }
                        None => return bad(at("https_spiffe needs endpoint_spiffe_id")),
                    }
                    if t.ca_file.is_some() {
                        return bad(at("ca_file is for https_web; https_spiffe uses the bundle"));
                    }
                }
                BundleEndpointProfile::HttpsWeb => {
                    if t.endpoint_spiffe_id.is_some() || t.bootstrap_bundle.is_some() {
                        return bad(at(
                            "endpoint_spiffe_id and bootstrap_bundle are for https_spiffe",
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Checks the values for consistency.
    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |s: &str| Err(ServerError::Config(s.to_owned()));
        if self.svid.x509_ttl < Duration::from_secs(60) {
            return bad("svid.x509_ttl must be at least 1m");
        }
        if self.listen.max_connections == 0 {
            return bad("listen.max_connections must be at least 1");
        }
        if self.listen.header_read_timeout.is_zero()
            || self.listen.body_read_timeout.is_zero()
            || self.listen.idle_timeout.is_zero()
        {
            return bad(
                "listen.header_read_timeout, listen.body_read_timeout and listen.idle_timeout must be positive",
            );
        }
        if self.audit.checkpoint_interval < Duration::from_millis(100) {
            return bad("audit.checkpoint_interval must be at least 100ms");
        }
        if self.join_token.default_ttl > self.join_token.max_ttl {
            return bad("join_token.default_ttl exceeds join_token.max_ttl");
        }
        if self.join_token.break_glass_max_ttl.is_zero()
            || self.join_token.break_glass_max_ttl > self.join_token.max_ttl
        {
            return bad(
                "join_token.break_glass_max_ttl must be positive and at most join_token.max_ttl",
            );
        }
        if self.ca.upstream_cert.is_some() != self.ca.upstream_key.is_some() {
            return bad("ca.upstream_cert and ca.upstream_key go together");
        }
        if self.tls.ttl < Duration::from_secs(300) {
            return bad("tls.ttl must be at least 5m");
        }
        if self.jwt.default_ttl < Duration::from_secs(30) {
            return bad("jwt.default_ttl must be at least 30s");
        }
        if !(self.rate_limit.per_caller_rate >= 0.0
            && self.rate_limit.per_caller_burst >= 0.0
            && self.rate_limit.refusal_audit_rate >= 0.0
            && self.rate_limit.refusal_audit_burst >= 0.0)
        {
            return bad("rate_limit values must be non-negative numbers");
        }
        let rot = &self.ca.rotation;
        if !(rot.rotate_at > 0.0 && rot.rotate_at < 1.0) {
            return bad("ca.rotation.rotate_at must lie between 0 and 1");
        }
        if self.ca.bundle_poll < Duration::from_millis(100) {
            return bad("ca.bundle_poll must be at least 100ms");
        }
        // Every replica must have reloaded (and pushed to its agents) the
        // prepared key well before any replica signs with it.
        if rot.publish_ahead < self.ca.bundle_poll * 5 {
            return bad("ca.rotation.publish_ahead must be at least 5 × ca.bundle_poll");
        }
        if rot.check_interval < Duration::from_millis(100) {
            return bad("ca.rotation.check_interval must be at least 100ms");
        }
        self.validate_federation()?;
        if self.cloud.default_ttl < Duration::from_secs(900) {
            return bad("cloud.default_ttl must be at least 15m (the STS minimum)");
        }
        Ok(())
    }
}

/// SPIFFE federation (SPIFFE Federation spec): the foreign trust domains
/// whose bundles are fetched from their bundle endpoints, kept in the
/// datastore and handed to agents whose registrations federate with them.
/// This server's own bundle endpoint is `/v1/bundle` on the HTTPS listener
/// (`https_spiffe`, endpoint ID `spiffe://<td>/herald/server`) or behind a
/// Web PKI TLS terminator (`https_web`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FederationConfig {
    /// One entry per foreign trust domain (`[[federation.trust_domains]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<FederatedTrustDomain>,
    /// A foreign `spiffe_refresh_hint` below this is raised to it.
    #[serde(default = "default_min_refresh", with = "humantime_serde_compat")]
    pub min_refresh: Duration,
    /// A foreign `spiffe_refresh_hint` above this (or none) is lowered to it.
    #[serde(default = "default_max_refresh", with = "humantime_serde_compat")]
    pub max_refresh: Duration,
    /// After a failed fetch, the next try comes this soon; each further
    /// failure in a row doubles the wait, up to `max_refresh`.
    #[serde(default = "default_federation_retry", with = "humantime_serde_compat")]
    pub retry: Duration,
    /// Connect + response deadline of one fetch.
    #[serde(
        default = "default_federation_timeout",
        with = "humantime_serde_compat"
    )]
    pub timeout: Duration,
    /// This trust domain's bundle endpoint on a listener of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle_endpoint: Option<BundleEndpointConfig>,
}

/// A listener serving only this trust domain's bundle document.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct BundleEndpointConfig {
    /// Where to listen (HTTPS).
    pub listen: SocketAddr,
    /// `https_web`: the Web PKI certificate chain (PEM), re-read when it
    /// changes. Unset: the server's SVID is presented (`https_spiffe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// Its PKCS#8 key (PEM, mode 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl Default for FederationConfig {
    fn default() -> Self {
        Self {
            trust_domains: Vec::new(),
            min_refresh: default_min_refresh(),
            max_refresh: default_max_refresh(),
            retry: default_federation_retry(),
            timeout: default_federation_timeout(),
            bundle_endpoint: None,
        }
    }
}

fn default_min_refresh() -> Duration {
    Duration::from_secs(30)
}

fn default_max_refresh() -> Duration {
    Duration::from_secs(3600)
}

fn default_federation_retry() -> Duration {
    Duration::from_secs(30)
}

fn default_federation_timeout() -> Duration {
    Duration::from_secs(10)
}

/// How a bundle endpoint authenticates itself (SPIFFE Federation §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BundleEndpointProfile {
    /// A Web PKI certificate for the URL's host name (system roots, or
    /// `ca_file` only when set).
    HttpsWeb,
    /// An X.509 SVID with `endpoint_spiffe_id`, verified against the
    /// trust domain's own bundle (the stored one, or the bootstrap bundle
    /// before the first fetch); the host name is not checked.
    HttpsSpiffe,
}

impl BundleEndpointProfile {
    /// The configuration spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            BundleEndpointProfile::HttpsWeb => "https_web",
            BundleEndpointProfile::HttpsSpiffe => "https_spiffe",
        }
    }
}

/// One foreign trust domain this one federates with.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FederatedTrustDomain {
    /// The foreign trust domain (`partner.example` or `spiffe://partner.example`).
    pub trust_domain: TrustDomain,
    /// Its bundle endpoint (`https://…`). Unset: the bundle is only ever
    /// set by hand (`herald federation set`), for air-gapped partners.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// How the endpoint authenticates itself.
    #[serde(default = "default_profile")]
    pub profile: BundleEndpointProfile,
    /// `https_spiffe`: the SPIFFE ID the endpoint's SVID must carry (in
    /// the federated trust domain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint_spiffe_id: Option<herald_core::SpiffeId>,
    /// `https_spiffe`: the trust domain's bundle (SPIFFE bundle JSON or
    /// PEM) to authenticate the endpoint before anything was fetched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bootstrap_bundle: Option<PathBuf>,
    /// `https_web`: PEM roots to use instead of the system's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn default_profile() -> BundleEndpointProfile {
    BundleEndpointProfile::HttpsWeb
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_file_and_rejects_unknown_keys() {
        let c = ServerConfig::from_toml(
            r#"
            trust_domain = "example.org"
            data_dir = "/var/lib/herald"
            [listen]
            grpc = "0.0.0.0:8443"
            http = "0.0.0.0:8080"
            [ca]
            key_encryption_key_file = "/etc/herald/kek"
            ttl = "30days"
            [svid]
            x509_ttl = "30m"
            [join_token]
            default_ttl = "10m"
            max_ttl = "1h"
            [tls]
            dns_names = ["herald.example.org"]
            ttl = "12h"
            "#,
        )
        .unwrap();
        assert_eq!(c.svid.x509_ttl, Duration::from_secs(1800));
        assert_eq!(c.database_url(), "sqlite:///var/lib/herald/herald.db");
        c.validate().unwrap();
        assert!(
            ServerConfig::from_toml("trust_domain = \"a\"\ndata_dir = \"/x\"\nbogus = 1").is_err()
        );
        assert!(
            ServerConfig::from_toml("trust_domain = \"Upper.org\"\ndata_dir = \"/x\"").is_err()
        );
    }

    #[test]
    fn printed_defaults_parse_back_to_the_defaults() {
        let text = ServerConfig::defaults_toml().unwrap();
        assert!(!text.contains("\ntrust_domain"), "{text}");
        let with_required =
            format!("trust_domain = \"example.org\"\ndata_dir = \"/var/lib/herald\"\n{text}");
        let back = ServerConfig::from_toml(&with_required).unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        assert_eq!(
            toml::Table::try_from(&back).unwrap(),
            toml::Table::try_from(ServerConfig::new(td, "/var/lib/herald".into())).unwrap()
        );
        // Values as the code has them, spelled as people write them.
        assert!(text.contains("ttl = \"365days\""), "{text}");
        assert!(
            text.contains("# algorithms = [\"RS256\", \"ES256\"]"),
            "{text}"
        );
        assert!(text.contains("# require_jti = false"), "{text}");
        for key in UNSET_BY_DEFAULT {
            assert!(text.contains(key), "{key} not listed");
        }
    }

    #[test]
    fn env_overrides_apply() {
        let mut c = ServerConfig::dev(Path::new("/tmp/x")).unwrap();
        c.apply_env(|k| match k {
            "HERALD_DATABASE_URL" => Some("sqlite:///tmp/other.db".into()),
            "HERALD_LISTEN_GRPC" => Some("127.0.0.1:9999".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.database_url(), "sqlite:///tmp/other.db");
        assert_eq!(c.listen.grpc.port(), 9999);
        assert!(
            c.apply_env(|k| (k == "HERALD_LISTEN_HTTP").then(|| "nope".into()))
                .is_err()
        );
    }
}
