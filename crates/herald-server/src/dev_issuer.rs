//! DEV ONLY: the local OIDC issuer of `herald server --dev`.
//!
//! So that a newcomer can try the token-exchange flows on a laptop, `--dev`
//! serves a tiny OIDC issuer — discovery and JWKS over plain HTTP, bound to
//! 127.0.0.1 on a port of its own (never any other address) — with an
//! ES256 key generated at every start. The server trusts it (an
//! `[[oidc.issuers]]` entry added in memory, `allow_insecure_http` being
//! loopback-only anyway) and one dev policy, [`POLICY_NAME`], accepts its
//! tokens.
//!
//! `herald dev token` signs CI-shaped tokens with the key, which is written
//! to `<data_dir>/dev-oidc/signing-key.der` with mode 0600. A key file,
//! rather than a minting endpoint, because the loopback interface is shared
//! by every user of the machine while the file is readable by the server's
//! own user only (like the dev KEK beside it): nothing on the network mints
//! tokens.
//!
//! Nothing can turn it on outside `--dev`: the switch is
//! [`ServerConfig::dev_issuer`], a field no configuration file or
//! environment variable can set, which only `ServerConfig::dev` sets, and
//! [`start`] refuses unless the configuration is the dev one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;
use herald_attest::oidc::IssuerConfig;
use herald_oidc_issuer::{ActionsJob, Es256Key};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::ServerError;
use crate::config::ServerConfig;

/// Subdirectory of the dev data directory holding the issuer's files.
pub const DIR: &str = "dev-oidc";
/// The signing key, PKCS#8 DER, mode 0600.
pub const KEY_FILE: &str = "signing-key.der";
/// Where the issuer is and what it signs for ([`IssuerInfo`]).
pub const INFO_FILE: &str = "issuer.json";
/// The audience dev tokens carry and the dev policy accepts.
pub const AUDIENCE: &str = "herald-dev";
/// The name of the dev policy.
pub const POLICY_NAME: &str = "dev-ci";
/// The role the dev policy grants session credentials for.
pub const ROLE_ARN: &str = "arn:aws:iam::000000000000:role/dev-deploy";

/// `<data_dir>/dev-oidc/issuer.json`: what `herald dev token` needs besides the key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IssuerInfo {
    /// The issuer URL (`iss`), `http://127.0.0.1:<port>`.
    pub issuer: String,
    /// The signing key's `kid`.
    pub kid: String,
    /// The audience the server accepts.
    pub audience: String,
    /// The trust domain of the dev server.
    pub trust_domain: String,
}

/// The dev issuer, bound and keyed, not yet serving.
pub struct DevIssuer {
    listener: TcpListener,
    info: IssuerInfo,
    key: Arc<Es256Key>,
}

/// Binds the dev issuer on loopback, generates its key and writes its files.
pub async fn start(cfg: &ServerConfig) -> Result<DevIssuer, ServerError> {
    if !(cfg.dev && cfg.dev_issuer) {
        return Err(ServerError::Config(
            "the dev OIDC issuer exists only under `herald server --dev`".into(),
        ));
    }
    // Loopback, whatever the other listeners are configured to.
    let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
    let addr = listener.local_addr()?;
    let bad = |e: String| ServerError::Config(format!("dev OIDC issuer: {e}"));
    let kid = format!(
        "dev-{}",
        &herald_oidc_issuer::random_id().map_err(|e| bad(e.to_string()))?[..8]
    );
    let key = Es256Key::generate(kid).map_err(|e| bad(e.to_string()))?;
    let info = IssuerInfo {
        issuer: format!("http://{addr}"),
        kid: key.kid().to_owned(),
        audience: AUDIENCE.to_owned(),
        trust_domain: cfg.trust_domain.to_string(),
    };
    write_files(&cfg.data_dir.join(DIR), &key, &info).map_err(bad)?;
    Ok(DevIssuer {
        listener,
        info,
        key: Arc::new(key),
    })
}

fn write_files(dir: &Path, key: &Es256Key, info: &IssuerInfo) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |p: &Path, e: std::io::Error| format!("{}: {e}", p.display());
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| err(dir, e))?;
    // A new key every start: the old file goes, the new one is created
    // 0600 from the first byte.
    let key_path = dir.join(KEY_FILE);
    match std::fs::remove_file(&key_path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(&key_path, e)),
    }
    herald_ca::kek::write_private_file(&key_path, key.pkcs8()).map_err(|e| err(&key_path, e))?;
    let info_path = dir.join(INFO_FILE);
    let text = serde_json::to_string_pretty(info).map_err(|e| e.to_string())?;
    std::fs::write(&info_path, text).map_err(|e| err(&info_path, e))
}

impl DevIssuer {
    /// The issuer URL.
    pub fn url(&self) -> &str {
        &self.info.issuer
    }

    /// How the server trusts it: discovery over HTTP on loopback.
    pub fn issuer_config(&self) -> IssuerConfig {
        let mut c = IssuerConfig::new(self.info.issuer.clone(), vec![AUDIENCE.to_owned()]);
        c.allow_insecure_http = true;
        c.algorithms = vec![herald_attest::oidc::Algorithm::ES256];
        c
    }

    /// The dev policy accepting its tokens, as a (pseudo path, YAML) source.
    pub fn policy_source(&self) -> (PathBuf, String) {
        let td = &self.info.trust_domain;
        let text = DEV_POLICY
            .replace("{issuer}", &self.info.issuer)
            .replace("{audience}", AUDIENCE)
            .replace("{role}", ROLE_ARN)
            .replace("{td}", td);
        (
            PathBuf::from(format!("<herald server --dev>/{POLICY_NAME}.yaml")),
            text,
        )
    }

    /// Serves discovery and JWKS until shutdown.
    pub fn serve(self, mut shutdown: watch::Receiver<bool>) -> JoinHandle<()> {
        let state = Arc::new((self.info, self.key));
        let app = Router::new()
            .route("/", get(about))
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .with_state(state);
        let listener = self.listener;
        tokio::spawn(async move {
            let stop = async move {
                while !*shutdown.borrow() {
                    if shutdown.changed().await.is_err() {
                        break;
                    }
                }
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::warn!(error = %e, "dev OIDC issuer stopped");
            }
        })
    }
}

type IssuerState = Arc<(IssuerInfo, Arc<Es256Key>)>;

async fn about() -> &'static str {
    "Herald DEV-ONLY OIDC issuer (herald server --dev): tokens from `herald dev token`. Never trust it outside development.\n"
}

async fn discovery(State(s): State<IssuerState>) -> axum::Json<Value> {
    let issuer = &s.0.issuer;
    axum::Json(herald_oidc_issuer::discovery(
        issuer,
        &format!("{issuer}/jwks"),
        &["ES256"],
    ))
}

async fn jwks(State(s): State<IssuerState>) -> axum::Json<Value> {
    axum::Json(serde_json::json!({ "keys": [s.1.jwk()] }))
}

/// The dev policy: CI-shaped tokens from the dev issuer, for the `dev`
/// owner's main branch, get an X.509 SVID, a JWT-SVID for `demo-service`
/// and session credentials for the dev role.
const DEV_POLICY: &str = r#"# DEV ONLY (herald server --dev): accepts tokens of the local dev issuer.
name: dev-ci
description: DEV ONLY - CI-shaped tokens from the dev issuer (herald dev token)
evidence:
  oidc:
    issuer: {issuer}
    audiences: [{audience}]
pins:
  repository_owner: dev
condition: claims.ref == "refs/heads/main"
spiffe_id:
  prefix: spiffe://{td}/ci/dev/
  template: "spiffe://{td}/ci/dev/{repository_owner}/{environment}"
grants:
  x509_svid: { max_ttl: 15m }
  jwt_svid: { max_ttl: 5m, audiences: [demo-service] }
  cloud:
    - role_arn: {role}
      max_ttl: 1h
      scope:
        Version: "2012-10-17"
        Statement:
          - Effect: Allow
            Action: ["s3:GetObject"]
            Resource: ["arn:aws:s3:::dev-artifacts/*"]
tests:
  - name: main of the dev owner is allowed
    evidence:
      oidc:
        claims: &main { repository_owner: dev, ref: refs/heads/main, environment: demo }
    expect: { allow: true, spiffe_id: spiffe://{td}/ci/dev/dev/demo }
  - name: another branch is refused
    evidence:
      oidc:
        claims: { <<: *main, ref: refs/heads/feature }
    expect: { allow: false, code: policy_denied }
"#;

/// Signs a CI-shaped (GitHub Actions-like) token with the dev issuer's key
/// in `data_dir` — what `herald dev token` prints. `claims` override or
/// add claims; the key file must be readable by its owner only.
pub fn mint_token(
    data_dir: &Path,
    claims: &[(String, Value)],
    ttl_secs: i64,
) -> Result<String, ServerError> {
    let dir = data_dir.join(DIR);
    let missing = |p: &Path, e: String| {
        ServerError::Config(format!(
            "{}: {e} — is `herald server --dev` running with this data directory?",
            p.display()
        ))
    };
    let info_path = dir.join(INFO_FILE);
    let info: IssuerInfo = std::fs::read_to_string(&info_path)
        .map_err(|e| missing(&info_path, e.to_string()))
        .and_then(|t| serde_json::from_str(&t).map_err(|e| missing(&info_path, e.to_string())))?;
    let key_path = dir.join(KEY_FILE);
    herald_ca::kek::check_private_mode(&key_path).map_err(|e| missing(&key_path, e))?;
    let der = std::fs::read(&key_path).map_err(|e| missing(&key_path, e.to_string()))?;
    let key = Es256Key::from_pkcs8(info.kid.clone(), &der)
        .map_err(|e| missing(&key_path, e.to_string()))?;
    let mut body = herald_oidc_issuer::github_actions_claims(&ActionsJob {
        issuer: &info.issuer,
        audience: &info.audience,
        repository: "dev/demo",
        git_ref: "refs/heads/main",
        environment: "demo",
        ttl_secs,
    })
    .map_err(|e| ServerError::Config(e.to_string()))?;
    if let Some(map) = body.as_object_mut() {
        for (k, v) in claims {
            map.insert(k.clone(), v.clone());
        }
    }
    key.sign_jwt(&body)
        .map_err(|e| ServerError::Config(e.to_string()))
}
