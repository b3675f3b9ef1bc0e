//! Command-line interface. Every failure prints one line,
//! `error[<stable code>]: <what happened>`, and exits non-zero.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use herald_attest::svid::parse_x509_svid;
use herald_client::files::{self, SvidFiles};
use herald_client::{ClientError, ClientIdentity, HeraldClient, ServerId, keys};
use herald_core::{AuditEvent, EvidenceType, JoinTokenPurpose, SpiffeId};
use herald_proto::v1::X509SvidResponse;
use herald_server::config::{DEV_DATA_DIR, ServerConfig};
use herald_store::{NewJoinToken, Store};

/// Herald: attested machine identity, short-lived credentials.
#[derive(Parser, Debug)]
#[command(name = "herald", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the server.
    Server(ConfigArgs),
    /// Manage join tokens (one-time bootstrap and break-glass evidence).
    #[command(subcommand)]
    Token(TokenCommand),
    /// Mint, renew and inspect X.509 SVIDs.
    #[command(subcommand)]
    Svid(SvidCommand),
    /// Inspect the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Exchange a platform OIDC token (CI job, function, cluster) for credentials.
    Exchange(Box<crate::exchange_cmd::ExchangeArgs>),
    /// Coverage report from the audit log: MFA enforcement, authentication
    /// and issuance rates, attestation by method, TTLs, rotation
    /// compliance, replay and bypass attempts, break-glass use.
    Report {
        #[command(flatten)]
        config: ConfigArgs,
        /// From this time: RFC 3339, or a duration ago (e.g. 7days).
        #[arg(long, default_value = "24h")]
        since: String,
        /// Until this time (exclusive): RFC 3339, or a duration ago. Default: now.
        #[arg(long)]
        until: Option<String>,
        /// Output format: a text table, JSON, or a static HTML page with charts.
        #[arg(long, default_value = "text", value_parser = ["text", "json", "html"])]
        format: String,
    },
    /// Check configuration files offline.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Check and test attestation policies offline.
    #[command(subcommand)]
    Policy(crate::policy_cmd::PolicyCommand),
    /// Node registry administration (TPM-attested nodes).
    #[command(subcommand)]
    Node(crate::node_cmd::NodeCommand),
    /// The CA, JWT and session key ring: status, validity, rotation due.
    #[command(subcommand)]
    Ca(crate::ca_cmd::CaCommand),
    /// SPIFFE federation: foreign trust domains' bundles (list, status,
    /// show, refresh now, set by hand, delete).
    #[command(subcommand)]
    Federation(crate::federation_cmd::FederationCommand),
    /// The server replicas sharing this database: last seen, bundle
    /// sequence and policy set each serves, and whether they agree.
    Replicas(crate::replicas_cmd::ReplicasArgs),
    /// Run the node agent (TPM attestation, node SVID rotation), or show its status.
    Agent(crate::node_cmd::AgentArgs),
    /// A workload's SVIDs from the local agent's Workload API.
    #[command(subcommand)]
    Workload(WorkloadCommand),
    /// Development helpers for `herald server --dev` (DEV ONLY).
    #[command(subcommand)]
    Dev(crate::dev_cmd::DevCommand),
    /// Revoke an issued credential so it can no longer be renewed.
    /// By serial, or in bulk by SPIFFE ID, policy and issuance window (the
    /// incident-response path, e.g. `--policy P --since 1h`); nodes are
    /// banned with `herald node ban`.
    Revoke {
        #[command(flatten)]
        config: ConfigArgs,
        /// Serial number (hex) of one credential.
        #[arg(long, conflicts_with_all = ["spiffe_id", "policy", "since", "until"])]
        serial: Option<String>,
        /// Every unexpired credential issued to this SPIFFE ID.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Every unexpired credential this policy granted.
        #[arg(long)]
        policy: Option<String>,
        /// Issued at or after: RFC 3339, or a duration ago (1h).
        #[arg(long)]
        since: Option<String>,
        /// Issued before: RFC 3339, or a duration ago.
        #[arg(long)]
        until: Option<String>,
        /// Why, for the audit log.
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
}

/// Where the server's configuration comes from.
#[derive(Args, Debug, Clone)]
pub(crate) struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, env = "HERALD_CONFIG", conflicts_with = "dev")]
    config: Option<PathBuf>,
    /// Use the embedded development defaults (data in ./.herald-dev).
    #[arg(long)]
    dev: bool,
}

#[derive(Subcommand, Debug)]
enum WorkloadCommand {
    /// Fetch X.509 SVIDs (print, write files, or keep them fresh with --watch).
    Fetch(crate::workload_cmd::FetchArgs),
}

#[derive(Subcommand, Debug)]
enum TokenCommand {
    /// Create a join token bound to one SPIFFE ID and one purpose; prints
    /// the token on stdout. A token is refused for any other purpose, and
    /// grants only what a policy accepting it grants.
    Create {
        #[command(flatten)]
        config: ConfigArgs,
        /// The SPIFFE ID the token is bound to.
        #[arg(long)]
        spiffe_id: String,
        /// Token lifetime (e.g. 10m, 1h); defaults to join_token.default_ttl.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
        /// What the token is for: `bootstrap` (herald svid mint, under a
        /// join_token policy), `node` (the enrolment factor of a TPM
        /// policy), `second-factor` (beside a CI token, for --policy).
        #[arg(
            long,
            value_enum,
            default_value = "bootstrap",
            conflicts_with = "break_glass"
        )]
        purpose: PurposeArg,
        /// The policies the token may serve (second-factor: required; node:
        /// optional, any TPM policy when absent). Repeat for several.
        #[arg(long = "policy")]
        policies: Vec<String>,
        /// An emergency mint: time-boxed (join_token.break_glass_max_ttl),
        /// needs --reason, accepted only by policies listing break_glass,
        /// and reported as break-glass use.
        #[arg(long, requires = "reason")]
        break_glass: bool,
        /// Why the token is created (required with --break-glass; recorded).
        #[arg(long)]
        reason: Option<String>,
    },
    /// List join tokens (never their secrets).
    List {
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Subcommand, Debug)]
enum SvidCommand {
    /// Mint an X.509 SVID with a join token: the key is generated here and never leaves this machine.
    Mint {
        /// The join token (or set HERALD_JOIN_TOKEN, which keeps it out of the process list).
        #[arg(long, env = "HERALD_JOIN_TOKEN", hide_env_values = true)]
        join_token: String,
        /// Server address.
        #[arg(long, env = "HERALD_SERVER", default_value = "https://127.0.0.1:8443")]
        server: String,
        /// Trust bundle (PEM) to verify the server with, e.g. the server's <data_dir>/bundle.pem.
        #[arg(long)]
        bundle: PathBuf,
        /// Directory for svid.pem, svid.key (0600) and bundle.pem.
        #[arg(long)]
        out: PathBuf,
        /// The SPIFFE ID (or trust domain) the server's certificate must carry;
        /// default: spiffe://<the bundle's trust domain>/herald/server.
        #[arg(long, env = "HERALD_SERVER_SPIFFE_ID")]
        server_spiffe_id: Option<String>,
    },
    /// Renew the SVID in a directory over mTLS, with a new key.
    Renew {
        /// Server address.
        #[arg(long, env = "HERALD_SERVER", default_value = "https://127.0.0.1:8443")]
        server: String,
        /// Directory holding svid.pem, svid.key and bundle.pem; replaced atomically.
        #[arg(long)]
        out: PathBuf,
        /// The SPIFFE ID (or trust domain) the server's certificate must carry;
        /// default: spiffe://<the SVID's trust domain>/herald/server.
        #[arg(long, env = "HERALD_SERVER_SPIFFE_ID")]
        server_spiffe_id: Option<String>,
    },
    /// Show an X.509 SVID (PEM or DER file).
    Show {
        /// The certificate file.
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigCommand {
    /// Print every server configuration key with its real default, as
    /// TOML (serialised from the code's defaults, so it cannot drift).
    Defaults {
        /// The agent's keys (agent.toml) instead of the server's.
        #[arg(long)]
        agent: bool,
    },
    /// Parse and validate a server configuration file exactly as `herald
    /// server` would (keys, values, OIDC issuers, the policy directory),
    /// without opening the database or binding listeners.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Recompute the audit log's hash chain and report the first broken
    /// record; check it against the signed checkpoints stored with it and
    /// against checkpoint files kept elsewhere (`--checkpoint`), which
    /// detect truncation and rewrites with recomputed hashes.
    Verify {
        #[command(flatten)]
        config: ConfigArgs,
        /// First sequence number to check.
        #[arg(long, default_value_t = 1)]
        from: u64,
        /// Last sequence number to check (default: the end).
        #[arg(long)]
        to: Option<u64>,
        /// A checkpoint file (from `herald audit checkpoint` or
        /// `audit.checkpoint_dir`) the log must still match. Repeatable.
        #[arg(long = "checkpoint")]
        checkpoints: Vec<PathBuf>,
    },
    /// Sign a checkpoint of the audit chain's head now, store it, and write
    /// it (JSON: the JWS and the signing key's public JWK) to stdout or
    /// `--out`. Keep the file off this machine.
    Checkpoint {
        #[command(flatten)]
        config: ConfigArgs,
        /// Where to write the checkpoint file (default: stdout).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Export audit records as JSON lines (one object per decision) for a SIEM.
    Export {
        #[command(flatten)]
        config: ConfigArgs,
        /// From this time: RFC 3339, or a duration ago (e.g. 24h). Default: the beginning.
        #[arg(long)]
        since: Option<String>,
        /// Until this time (exclusive): RFC 3339, or a duration ago. Default: now.
        #[arg(long)]
        until: Option<String>,
        /// Output format.
        #[arg(long, default_value = "jsonl", value_parser = ["jsonl"])]
        format: String,
    },
}

/// A CLI error: a stable code and one line on what went wrong (its
/// `Display`, which scripts may match), and what to do about it ([`CliError::fix`]).
#[derive(Debug)]
pub struct CliError {
    code: String,
    message: String,
    /// A fix for this specific cause, over the code's general remedy.
    fix: Option<String>,
}

impl CliError {
    pub(crate) fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_owned(),
            message: message.into(),
            fix: None,
        }
    }

    /// Names the fix for this specific cause (the code's general remedy
    /// otherwise, from [`crate::remedy`]).
    pub(crate) fn with_fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }

    /// What to do: the call site's fix, else the remedy for the code and message.
    pub fn fix(&self) -> Option<&str> {
        self.fix
            .as_deref()
            .or_else(|| crate::remedy::remedy(&self.code, &self.message))
    }
}

impl fmt::Display for CliError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error[{}]: {}", self.code, self.message)
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        // ClientError's Display is already "error[code]: message".
        let text = e.to_string();
        match text
            .strip_prefix("error[")
            .and_then(|r| r.split_once("]: "))
        {
            Some((code, msg)) => CliError::new(code, msg),
            None => CliError::new("internal", text),
        }
    }
}

impl From<herald_store::StoreError> for CliError {
    fn from(e: herald_store::StoreError) -> Self {
        match e {
            herald_store::StoreError::AuditChainBroken { seq, reason } => CliError::new(
                "audit_chain_broken",
                format!("audit record {seq}: {reason}"),
            ),
            other => CliError::new("store_unavailable", other.to_string()),
        }
    }
}

impl From<herald_server::ServerError> for CliError {
    fn from(e: herald_server::ServerError) -> Self {
        let code = match e {
            herald_server::ServerError::Config(_) => "config",
            herald_server::ServerError::Store(_) => "store_unavailable",
            _ => "startup",
        };
        CliError::new(code, e.to_string())
    }
}

pub(crate) fn load_config(args: &ConfigArgs) -> Result<ServerConfig, CliError> {
    let mut cfg = match (&args.config, args.dev) {
        (Some(path), _) => ServerConfig::from_file(path)?,
        (None, true) => ServerConfig::dev(Path::new(DEV_DATA_DIR))?,
        (None, false) => {
            return Err(CliError::new(
                "config",
                "give --config FILE (or HERALD_CONFIG), or --dev for the development defaults",
            ));
        }
    };
    cfg.apply_env(|k| std::env::var(k).ok())?;
    cfg.validate()?;
    Ok(cfg)
}

pub(crate) async fn open_store(cfg: &ServerConfig) -> Result<Store, CliError> {
    if cfg.database_url().starts_with("sqlite") && !cfg.data_dir.exists() {
        return Err(CliError::new(
            "config",
            format!(
                "data directory {} does not exist; start the server first",
                cfg.data_dir.display()
            ),
        ));
    }
    Ok(Store::open(&cfg.database_url()).await?)
}

/// Who is at the keyboard, for audit records.
pub(crate) fn operator() -> String {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next().map(str::to_owned))
        });
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    format!("operator:{user}(uid={})", uid.unwrap_or_else(|| "?".into()))
}

pub(crate) fn operator_event(action: &str) -> AuditEvent {
    let mut e = AuditEvent::new(action, operator());
    e.evidence_type = Some(EvidenceType::Operator);
    e.policy = Some("cli".into());
    e
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Server(args) => server(args).await,
        Command::Token(TokenCommand::Create {
            config,
            spiffe_id,
            ttl,
            purpose,
            policies,
            break_glass,
            reason,
        }) => {
            let purpose = if break_glass {
                JoinTokenPurpose::BreakGlass
            } else {
                purpose.into()
            };
            token_create(
                config,
                spiffe_id,
                ttl,
                TokenUse {
                    purpose,
                    policies,
                    reason,
                },
            )
            .await
        }
        Command::Token(TokenCommand::List { config }) => token_list(config).await,
        Command::Svid(SvidCommand::Mint {
            join_token,
            server,
            bundle,
            out,
            server_spiffe_id,
        }) => svid_mint(join_token, server, bundle, out, server_spiffe_id).await,
        Command::Svid(SvidCommand::Renew {
            server,
            out,
            server_spiffe_id,
        }) => svid_renew(server, out, server_spiffe_id).await,
        Command::Svid(SvidCommand::Show { file }) => svid_show(&file),
        Command::Audit(AuditCommand::Verify {
            config,
            from,
            to,
            checkpoints,
        }) => audit_verify(config, from, to, checkpoints).await,
        Command::Audit(AuditCommand::Checkpoint { config, out }) => {
            audit_checkpoint(config, out).await
        }
        Command::Audit(AuditCommand::Export {
            config,
            since,
            until,
            format: _,
        }) => audit_export(config, since, until).await,
        Command::Dev(cmd) => crate::dev_cmd::run(cmd),
        Command::Exchange(args) => crate::exchange_cmd::exchange(*args).await,
        Command::Policy(cmd) => crate::policy_cmd::run(cmd),
        Command::Node(cmd) => crate::node_cmd::node(cmd).await,
        Command::Ca(cmd) => crate::ca_cmd::ca(cmd).await,
        Command::Federation(cmd) => crate::federation_cmd::federation(cmd).await,
        Command::Replicas(args) => crate::replicas_cmd::replicas(args).await,
        Command::Agent(args) => crate::node_cmd::agent(args).await,
        Command::Workload(WorkloadCommand::Fetch(args)) => crate::workload_cmd::fetch(args).await,
        Command::Config(ConfigCommand::Check { file }) => config_check(&file),
        Command::Config(ConfigCommand::Defaults { agent: false }) => {
            print!("{}", ServerConfig::defaults_toml()?);
            Ok(())
        }
        Command::Config(ConfigCommand::Defaults { agent: true }) => {
            let text = herald_agent::AgentConfig::defaults_toml()
                .map_err(|e| CliError::new("internal", e))?;
            print!("{text}");
            Ok(())
        }
        Command::Report {
            config,
            since,
            until,
            format,
        } => report(config, since, until, &format).await,
        Command::Revoke {
            config,
            serial: Some(serial),
            reason,
            ..
        } => revoke(config, serial, reason).await,
        Command::Revoke {
            config,
            serial: None,
            spiffe_id,
            policy,
            since,
            until,
            reason,
        } => revoke_bulk(config, spiffe_id, policy, since, until, reason).await,
    }
}

async fn server(args: ConfigArgs) -> Result<(), CliError> {
    let cfg = load_config(&args)?;
    let td = cfg.trust_domain.clone();
    let data_dir = cfg.data_dir.clone();
    let dev = args.dev;
    let started = std::time::Instant::now();
    let stop = shutdown_signal();
    let running = herald_server::start(cfg).await?;
    let grpc = format!("https://{}", running.grpc_addr);
    println!(
        "herald server ready in {} ms",
        started.elapsed().as_millis()
    );
    println!("  trust domain  {td}");
    println!("  gRPC (TLS)    {grpc}  (mint, renew, exchange, bundle, node attestation)");
    println!(
        "  HTTP          http://{}  (/v1/bundle, /v1/bundle.pem, /v1/token, STS POST /, /metrics, /healthz, /readyz)",
        running.http_addr
    );
    match running.https_addr {
        Some(https) => println!("  HTTPS         https://{https}  (the HTTP routes over TLS)"),
        None => println!("  HTTPS         off (listen.https)"),
    }
    if let Some(addr) = running.bundle_endpoint_addr {
        println!(
            "  BUNDLE        https://{addr}/  (SPIFFE bundle endpoint, [federation.bundle_endpoint])"
        );
    }
    if let Some(url) = &running.dev_issuer {
        println!(
            "  DEV OIDC      {url}  (DEV ONLY, loopback: tokens from `herald dev token`, policy dev-ci)"
        );
    }
    println!("  data dir      {}", data_dir.display());
    let cfg_flag = if dev {
        "--dev".to_owned()
    } else {
        format!(
            "--config {}",
            args.config
                .as_deref()
                .unwrap_or(Path::new("herald.toml"))
                .display()
        )
    };
    println!("next, in another shell:");
    println!("  T=$(herald token create {cfg_flag} --spiffe-id spiffe://{td}/bootstrap/demo)");
    println!(
        "  herald svid mint --join-token \"$T\" --server {grpc} --bundle {} --out ./svid",
        data_dir.join("bundle.pem").display()
    );
    if running.dev_issuer.is_some() {
        println!(
            "  export T=$(herald dev token); herald exchange --token-env T --bundle {} --server {grpc} --jwt-audience demo-service",
            data_dir.join("bundle.pem").display()
        );
    }
    match running.https_addr {
        Some(https) => println!(
            "listening grpc={} http={} https={https}",
            running.grpc_addr, running.http_addr
        ),
        None => println!(
            "listening grpc={} http={}",
            running.grpc_addr, running.http_addr
        ),
    }
    stop.await;
    tracing::info!("shutting down");
    running.shutdown().await;
    Ok(())
}

pub(crate) async fn wait_for_signal() {
    shutdown_signal().await;
}

/// SIGTERM or Ctrl-C (installed when called, not when first awaited).
pub(crate) use herald_agent::run::shutdown_signal;

/// `--purpose` of `herald token create`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum PurposeArg {
    Bootstrap,
    Node,
    SecondFactor,
}

impl From<PurposeArg> for JoinTokenPurpose {
    fn from(p: PurposeArg) -> Self {
        match p {
            PurposeArg::Bootstrap => JoinTokenPurpose::Bootstrap,
            PurposeArg::Node => JoinTokenPurpose::NodeEnrolment,
            PurposeArg::SecondFactor => JoinTokenPurpose::SecondFactor,
        }
    }
}

/// What a new token is for.
struct TokenUse {
    purpose: JoinTokenPurpose,
    policies: Vec<String>,
    reason: Option<String>,
}

impl TokenUse {
    fn check(&self) -> Result<(), CliError> {
        let bad = |m: &str| Err(CliError::new("invalid_request", m));
        for p in &self.policies {
            if p.is_empty()
                || p.len() > 128
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            {
                return bad("--policy must name a policy (1-128 characters of [A-Za-z0-9._-])");
            }
        }
        match self.purpose {
            JoinTokenPurpose::SecondFactor if self.policies.is_empty() => {
                bad("a second-factor token names the policies it serves: --policy NAME")
            }
            JoinTokenPurpose::Bootstrap | JoinTokenPurpose::BreakGlass
                if !self.policies.is_empty() =>
            {
                bad("--policy applies to second-factor and node tokens")
            }
            JoinTokenPurpose::BreakGlass
                if self.reason.as_deref().is_none_or(|r| r.trim().is_empty()) =>
            {
                bad("a break-glass token needs --reason")
            }
            _ if self.reason.as_ref().is_some_and(|r| r.len() > 1024) => {
                bad("--reason is at most 1024 characters")
            }
            _ => Ok(()),
        }
    }
}

async fn token_create(
    config: ConfigArgs,
    spiffe_id: String,
    ttl: Option<Duration>,
    token_use: TokenUse,
) -> Result<(), CliError> {
    token_use.check()?;
    let cfg = load_config(&config)?;
    let id = SpiffeId::parse(&spiffe_id)
        .map_err(|e| CliError::new("invalid_request", format!("--spiffe-id: {e}")))?;
    if id.trust_domain() != &cfg.trust_domain {
        return Err(CliError::new(
            "invalid_request",
            format!("{id} is not in trust domain {}", cfg.trust_domain),
        ));
    }
    if id.path().is_empty() {
        return Err(CliError::new(
            "invalid_request",
            "a join token's SPIFFE ID needs a path",
        ));
    }
    if id.is_reserved() {
        return Err(CliError::new(
            "spiffe_id_reserved",
            format!("{id} is reserved for Herald's own services"),
        ));
    }
    let (max_ttl, max_name) = if token_use.purpose == JoinTokenPurpose::BreakGlass {
        (cfg.join_token.break_glass_max_ttl, "break_glass_max_ttl")
    } else {
        (cfg.join_token.max_ttl, "max_ttl")
    };
    let ttl = ttl.unwrap_or(cfg.join_token.default_ttl.min(max_ttl));
    if ttl > max_ttl {
        return Err(CliError::new(
            "ttl_too_long",
            format!(
                "--ttl {} exceeds join_token.{max_name} {}",
                humantime::format_duration(ttl),
                humantime::format_duration(max_ttl)
            ),
        ));
    }
    if ttl.is_zero() {
        return Err(CliError::new("invalid_request", "--ttl must be positive"));
    }
    let store = open_store(&cfg).await?;
    let token = herald_attest::join_token::generate()
        .map_err(|_| CliError::new("internal", "system RNG failed"))?;
    let now = herald_server::unix_now();
    let mut audit = operator_event("join_token.create");
    audit.spiffe_id = Some(id.to_string());
    audit.evidence_digest = Some(hex::encode(token.hash));
    audit.serial = Some(token.token_id.clone());
    // The purpose (and the policies it serves) in the record's policy field.
    audit.policy = Some(if token_use.policies.is_empty() {
        token_use.purpose.to_string()
    } else {
        format!("{}:{}", token_use.purpose, token_use.policies.join(","))
    });
    store
        .create_join_token(
            NewJoinToken {
                token_hash: token.hash,
                token_id: token.token_id.clone(),
                spiffe_id: id.to_string(),
                created_at: now,
                expires_at: now + ttl.as_secs() as i64,
                created_by: operator(),
                purpose: token_use.purpose,
                policies: token_use.policies,
                reason: token_use.reason,
            },
            audit,
        )
        .await?;
    store.close().await;
    eprintln!(
        "{} join token {} for {id}, single use, expires in {}",
        token_use.purpose,
        token.token_id,
        humantime::format_duration(ttl)
    );
    println!("{}", token.token);
    Ok(())
}

async fn token_list(config: ConfigArgs) -> Result<(), CliError> {
    let cfg = load_config(&config)?;
    let store = open_store(&cfg).await?;
    let now = herald_server::unix_now();
    println!(
        "{:<18} {:<8} {:<22} {:<14} SPIFFE ID",
        "TOKEN ID", "STATE", "EXPIRES", "PURPOSE"
    );
    for t in store.list_join_tokens().await? {
        let state = if t.used_at.is_some() {
            "used"
        } else if t.expires_at <= now {
            "expired"
        } else {
            "unused"
        };
        println!(
            "{:<18} {:<8} {:<22} {:<14} {}",
            t.token_id,
            state,
            rfc3339(t.expires_at),
            t.purpose.as_str(),
            t.spiffe_id
        );
    }
    store.close().await;
    Ok(())
}

pub(crate) fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| unix.to_string())
}

pub(crate) fn read_bundle(path: &Path) -> Result<Vec<Vec<u8>>, CliError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| CliError::new("io", format!("{}: {e}", path.display())))?;
    let certs = files::from_pem("CERTIFICATE", &text)
        .map_err(|e| CliError::new("io", format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(CliError::new(
            "io",
            format!("{}: no certificates", path.display()),
        ));
    }
    Ok(certs)
}

/// Writes the SVID, its key and the bundle to `out` and says so.
fn save_svid(
    verb: &str,
    resp: X509SvidResponse,
    key_pkcs8: Vec<u8>,
    out: &Path,
) -> Result<(), CliError> {
    let line = format!(
        "{verb} {} serial {} expires {} -> {}",
        resp.spiffe_id,
        resp.serial,
        rfc3339(resp.expires_at),
        out.join(files::SVID_FILE).display()
    );
    files::write_svid_dir(
        out,
        &SvidFiles {
            cert_chain: resp.cert_chain,
            key_pkcs8,
            bundle: resp.bundle,
        },
    )?;
    println!("{line}");
    Ok(())
}

/// The server identity to pin: `--server-spiffe-id` when given, else
/// `fallback`.
pub fn server_pin(given: Option<&str>, fallback: ServerId) -> Result<ServerId, CliError> {
    match given {
        Some(text) => Ok(ServerId::parse(text)?),
        None => Ok(fallback),
    }
}

async fn svid_mint(
    join_token: String,
    server: String,
    bundle: PathBuf,
    out: PathBuf,
    server_spiffe_id: Option<String>,
) -> Result<(), CliError> {
    let anchors = read_bundle(&bundle)?;
    let pin = server_pin(server_spiffe_id.as_deref(), ServerId::FromBundle)?;
    let kc = keys::generate_key_and_csr()?;
    let client = HeraldClient::connect_to(&server, &anchors, None, &pin).await?;
    let resp = client.mint_x509_svid(join_token.trim(), kc.csr_der).await?;
    save_svid("minted", resp, kc.key_pkcs8, &out)
}

async fn svid_renew(
    server: String,
    out: PathBuf,
    server_spiffe_id: Option<String>,
) -> Result<(), CliError> {
    let current = files::read_svid_dir(&out)?;
    // The SVID's own trust domain names its server, even under an upstream root.
    let own = current
        .cert_chain
        .first()
        .and_then(|leaf| ServerId::of_svid(leaf))
        .unwrap_or_default();
    let pin = server_pin(server_spiffe_id.as_deref(), own)?;
    let client = HeraldClient::connect_to(
        &server,
        &current.bundle,
        Some(ClientIdentity {
            cert_chain: current.cert_chain.clone(),
            key_pkcs8: current.key_pkcs8.clone(),
        }),
        &pin,
    )
    .await?;
    let kc = keys::generate_key_and_csr()?;
    let resp = client.renew_x509_svid(kc.csr_der).await?;
    save_svid("renewed", resp, kc.key_pkcs8, &out)
}

fn svid_show(file: &Path) -> Result<(), CliError> {
    let bytes =
        std::fs::read(file).map_err(|e| CliError::new("io", format!("{}: {e}", file.display())))?;
    let ders = match std::str::from_utf8(&bytes) {
        Ok(text) if text.contains("-----BEGIN") => {
            files::from_pem("CERTIFICATE", text).map_err(|e| CliError::new("io", e))?
        }
        _ => vec![bytes],
    };
    let leaf = ders
        .first()
        .ok_or_else(|| CliError::new("invalid_request", "no certificate in the file"))?;
    let info = parse_x509_svid(leaf).map_err(|e| CliError::new("svid_invalid", e.to_string()))?;
    let now = herald_server::unix_now();
    let state = if now < info.not_before {
        "not yet valid"
    } else if now >= info.not_after {
        "EXPIRED"
    } else {
        "valid"
    };
    println!("SPIFFE ID   {}", info.spiffe_id);
    println!("serial      {}", info.serial_hex);
    println!("not before  {}", rfc3339(info.not_before));
    println!("not after   {} ({state})", rfc3339(info.not_after));
    println!("issuer      {}", info.issuer);
    println!("key sha256  {}", info.spki_sha256);
    if !info.dns_names.is_empty() {
        println!("DNS names   {}", info.dns_names.join(", "));
    }
    println!("chain       {} certificate(s)", ders.len());
    Ok(())
}

async fn audit_verify(
    config: ConfigArgs,
    from: u64,
    to: Option<u64>,
    files: Vec<PathBuf>,
) -> Result<(), CliError> {
    use herald_server::checkpoint;
    let cfg = load_config(&config)?;
    let store = open_store(&cfg).await?;
    let result = async {
        let report = store.verify_audit_chain(from, to).await?;
        println!(
            "audit chain intact: {} records (seq {}..={})",
            report.records, report.first_seq, report.last_seq
        );
        // Checkpoints are trusted through the KEK: only a key that opens
        // under it can have signed one.
        let kek = match herald_server::authority::load_kek(&cfg) {
            Ok(k) => k,
            Err(e) if files.is_empty() => {
                println!("stored checkpoints not checked: {e}");
                return Ok(());
            }
            Err(e) => return Err(CliError::from(e)),
        };
        let keys = checkpoint::trusted_keys(&store, &kek).await?;
        let td = cfg.trust_domain.to_string();
        let check = |what: String, jws: String| {
            let (store, keys, td) = (&store, &keys, &td);
            async move {
                let v = checkpoint::verify(store, keys, td, &jws)
                    .await
                    .map_err(|e| CliError::new(e.code(), format!("{what}: {e}")))?;
                println!(
                    "{what}: record {} matches (signed by {}; {} records since)",
                    v.checkpoint.seq, v.key_id, v.records_after
                );
                Ok::<_, CliError>(())
            }
        };
        let stored = store.checkpoints().await?;
        for c in &stored {
            check(format!("stored checkpoint {}", c.seq), c.jws.clone()).await?;
        }
        for path in &files {
            let jws =
                checkpoint::read_file(path).map_err(|e| CliError::new(e.code(), e.to_string()))?;
            check(path.display().to_string(), jws).await?;
        }
        if stored.is_empty() && files.is_empty() {
            println!("no checkpoints yet: `herald audit checkpoint` signs one");
        }
        Ok(())
    }
    .await;
    store.close().await;
    result
}

async fn audit_checkpoint(config: ConfigArgs, out: Option<PathBuf>) -> Result<(), CliError> {
    let cfg = load_config(&config)?;
    let kek = herald_server::authority::load_kek(&cfg)?;
    let store = open_store(&cfg).await?;
    let result = async {
        let ca =
            herald_server::authority::load(&store, &cfg, &kek, herald_server::unix_now()).await?;
        let td = cfg.trust_domain.to_string();
        let record =
            match herald_server::checkpoint::create(&store, &ca.audit, &td, &operator()).await? {
                Some(r) => r,
                None => {
                    return Err(CliError::new(
                        "not_found",
                        "nothing to checkpoint: the audit log is empty or its head already has one",
                    ));
                }
            };
        let body = herald_server::checkpoint::file_json(&record, &td, &ca.audit);
        match &out {
            Some(path) => {
                herald_client::files::write_atomic(path, format!("{body}\n").as_bytes(), 0o644)?;
                eprintln!(
                    "checkpoint of record {} written to {}",
                    record.seq,
                    path.display()
                );
            }
            None => println!("{body}"),
        }
        Ok(())
    }
    .await;
    store.close().await;
    result
}

fn config_check(file: &Path) -> Result<(), CliError> {
    let invalid = |m: String| CliError::new("config_invalid", m);
    let cfg = ServerConfig::from_file(file).map_err(|e| invalid(e.to_string()))?;
    cfg.validate()
        .map_err(|e| invalid(format!("{}: {e}", file.display())))?;
    let verifier = herald_attest::OidcVerifier::new(cfg.oidc.issuers.clone())
        .map_err(|e| invalid(format!("{}: {e}", file.display())))?;
    let mut policies = String::from("no policy directory (token exchange refused)");
    if let Some(dir) = &cfg.policy.dir {
        if dir.is_dir() {
            let opts = herald_policy::LoadOptions {
                trust_domain: cfg.trust_domain.clone(),
                reserved_dns_names: cfg.tls.dns_names.clone(),
            };
            let set = herald_policy::PolicySet::load_dir(dir, &opts).map_err(|e| {
                for err in &e.0 {
                    eprintln!("{err}");
                }
                invalid(format!("policies in {} would be refused", dir.display()))
            })?;
            policies = format!("{} policies in {}", set.len(), dir.display());
        } else {
            policies = format!(
                "policy directory {} not present here (checked at start)",
                dir.display()
            );
        }
    }
    println!(
        "ok: {} — trust domain {}, {} OIDC issuer(s), {policies}",
        file.display(),
        cfg.trust_domain,
        verifier.issuers().len()
    );
    Ok(())
}

async fn report(
    config: ConfigArgs,
    since: String,
    until: Option<String>,
    format: &str,
) -> Result<(), CliError> {
    let now = crate::audit_cmd::now_ms();
    let since = crate::audit_cmd::parse_time(&since, now)?;
    let until = match until {
        Some(t) => crate::audit_cmd::parse_time(&t, now)?,
        None => now + 1,
    };
    let cfg = load_config(&config)?;
    let store = open_store(&cfg).await?;
    let result = crate::report_cmd::build(&store, since, until).await;
    store.close().await;
    let report = result?;
    if format == "json" {
        let text = serde_json::to_string_pretty(&report)
            .map_err(|e| CliError::new("internal", e.to_string()))?;
        println!("{text}");
    } else if format == "html" {
        print!("{}", crate::report_cmd::to_html(&report));
    } else {
        print!("{}", crate::report_cmd::to_text(&report));
    }
    Ok(())
}

async fn audit_export(
    config: ConfigArgs,
    since: Option<String>,
    until: Option<String>,
) -> Result<(), CliError> {
    let now = crate::audit_cmd::now_ms();
    let since = match since {
        Some(t) => crate::audit_cmd::parse_time(&t, now)?,
        None => i64::MIN,
    };
    let until = match until {
        Some(t) => crate::audit_cmd::parse_time(&t, now)?,
        None => i64::MAX,
    };
    let cfg = load_config(&config)?;
    let store = open_store(&cfg).await?;
    let result = crate::audit_cmd::export(&store, since, until).await;
    store.close().await;
    let n = result?;
    eprintln!("exported {n} audit records");
    Ok(())
}

async fn revoke_bulk(
    config: ConfigArgs,
    spiffe_id: Option<String>,
    policy: Option<String>,
    since: Option<String>,
    until: Option<String>,
    reason: String,
) -> Result<(), CliError> {
    let now = crate::audit_cmd::now_ms();
    let at = |t: Option<String>| -> Result<Option<i64>, CliError> {
        t.map(|t| crate::audit_cmd::parse_time(&t, now).map(|ms| ms.div_euclid(1000)))
            .transpose()
    };
    let filter = herald_store::RevocationFilter {
        spiffe_id,
        policy,
        issued_after: at(since)?,
        issued_before: at(until)?,
    };
    if filter == herald_store::RevocationFilter::default() {
        return Err(CliError::new(
            "invalid_request",
            "name --serial, or at least one of --spiffe-id, --policy, --since, --until",
        ));
    }
    let cfg = load_config(&config)?;
    let store = open_store(&cfg).await?;
    let mut audit = operator_event("credential.revoke_bulk");
    audit.spiffe_id = filter.spiffe_id.clone();
    audit.evidence_digest = Some(format!(
        "policy={} since={} until={}",
        filter.policy.as_deref().unwrap_or("*"),
        filter.issued_after.map_or("*".into(), |t| t.to_string()),
        filter.issued_before.map_or("*".into(), |t| t.to_string())
    ));
    let result = store
        .revoke_matching(&filter, &reason, &operator(), audit)
        .await;
    store.close().await;
    println!("revoked {} credential(s)", result?);
    Ok(())
}

async fn revoke(config: ConfigArgs, serial: String, reason: String) -> Result<(), CliError> {
    let cfg = load_config(&config)?;
    let serial = serial.trim().to_ascii_lowercase();
    if serial.is_empty() || !serial.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(CliError::new("invalid_request", "--serial must be hex"));
    }
    let store = open_store(&cfg).await?;
    let mut audit = operator_event("credential.revoke");
    audit.serial = Some(serial.clone());
    let found = store.revoke(&serial, &reason, &operator(), audit).await;
    store.close().await;
    let Some(n) = found? else {
        return Err(CliError::new(
            "not_found",
            format!("no credential with serial {serial}"),
        ));
    };
    println!("revoked {serial} ({n} unexpired credentials with its descendants)");
    Ok(())
}
