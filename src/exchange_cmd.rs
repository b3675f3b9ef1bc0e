//! `herald exchange`: a CI job's or function's OIDC token in, credentials out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use herald_client::files::{self, SvidFiles};
use herald_client::{ClientIdentity, HeraldClient, ServerId, keys};
use herald_proto::v1::exchange_token_request::Credential as Wanted;
use herald_proto::v1::exchange_token_response::Credential as Given;
use herald_proto::v1::{
    CloudCredentialsParams, ExchangeTokenRequest, JwtSvidParams, X509SvidParams,
};
use serde_json::json;

use crate::cli::{CliError, read_bundle, rfc3339, server_pin};

/// How the credentials are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// JSON on stdout (for cloud credentials: the AWS `credential_process` shape).
    Json,
    /// `export NAME=value` lines on stdout, for `eval` in a shell step.
    Env,
    /// An AWS shared-credentials file (`--out FILE`, mode 0600).
    AwsCredentials,
    /// Files in `--out DIR`: svid.pem/svid.key/bundle.pem, jwt_svid.token or credentials.
    Files,
}

/// Arguments of `herald exchange`.
#[derive(Args, Debug)]
pub struct ExchangeArgs {
    /// Server address.
    #[arg(long, env = "HERALD_SERVER", default_value = "https://127.0.0.1:8443")]
    server: String,
    /// Trust bundle (PEM) to verify the server with.
    #[arg(long)]
    bundle: PathBuf,
    /// The SPIFFE ID (or trust domain) the server's certificate must carry;
    /// default: spiffe://<the bundle's trust domain>/herald/server.
    #[arg(long, env = "HERALD_SERVER_SPIFFE_ID")]
    server_spiffe_id: Option<String>,
    /// Read the OIDC token from this file (e.g. a Kubernetes projected token).
    #[arg(long, group = "source")]
    token_file: Option<PathBuf>,
    /// Read the OIDC token from this environment variable (e.g. CI_JOB_JWT_V2, BUILDKITE_OIDC_TOKEN).
    #[arg(long, group = "source")]
    token_env: Option<String>,
    /// Request the token from GitHub Actions (ACTIONS_ID_TOKEN_REQUEST_URL/_TOKEN), for this audience.
    #[arg(long, group = "source", value_name = "AUDIENCE")]
    github_actions: Option<String>,
    /// Ask for an X.509 SVID (key generated here); written as files to --out.
    #[arg(long, group = "wanted")]
    x509: bool,
    /// Ask for a JWT-SVID for this audience (repeatable).
    #[arg(long, group = "wanted")]
    jwt_audience: Vec<String>,
    /// Ask for cloud session credentials for this role.
    #[arg(long, group = "wanted")]
    role_arn: Option<String>,
    /// Session name for cloud credentials.
    #[arg(long, default_value = "herald")]
    session_name: String,
    /// Session policy (JSON file) narrowing the role's scope.
    #[arg(long)]
    session_policy: Option<PathBuf>,
    /// Second factor: a join token bound to the same SPIFFE ID (or HERALD_JOIN_TOKEN).
    #[arg(long, env = "HERALD_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Second factor: the SVID directory (svid.pem, svid.key) presented over mTLS.
    #[arg(long)]
    svid_dir: Option<PathBuf>,
    /// Requested lifetime (e.g. 15m); above the policy's cap is refused.
    #[arg(long, value_parser = humantime::parse_duration)]
    ttl: Option<Duration>,
    /// Output format.
    #[arg(long, value_enum, default_value = "json")]
    format: Format,
    /// Output directory (files) or file (aws-credentials).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Profile name in an aws-credentials file.
    #[arg(long, default_value = "default")]
    profile: String,
}

async fn read_token(args: &ExchangeArgs) -> Result<String, CliError> {
    let token = if let Some(path) = &args.token_file {
        std::fs::read_to_string(path)
            .map_err(|e| CliError::new("invalid_request", format!("{}: {e}", path.display())))?
    } else if let Some(var) = &args.token_env {
        std::env::var(var).map_err(|_| {
            CliError::new("invalid_request", format!("${var} is not set")).with_fix(format!(
                "export {var} holding the platform's ID token (in dev: export {var}=$(herald dev token)), or give it with --token-file FILE"
            ))
        })?
    } else if let Some(aud) = &args.github_actions {
        github_actions_token(aud).await?
    } else {
        return Err(CliError::new(
            "invalid_request",
            "give the token with --token-file, --token-env or --github-actions",
        ));
    };
    Ok(token.trim().to_string())
}

/// The GitHub Actions ID-token request: GET $ACTIONS_ID_TOKEN_REQUEST_URL
/// with `audience`, bearer $ACTIONS_ID_TOKEN_REQUEST_TOKEN, answer `{"value": …}`.
async fn github_actions_token(audience: &str) -> Result<String, CliError> {
    let missing = || {
        CliError::new(
            "invalid_request",
            "ACTIONS_ID_TOKEN_REQUEST_URL/_TOKEN are not set: the job needs `permissions: id-token: write`",
        )
    };
    let url = std::env::var("ACTIONS_ID_TOKEN_REQUEST_URL").map_err(|_| missing())?;
    let bearer = std::env::var("ACTIONS_ID_TOKEN_REQUEST_TOKEN").map_err(|_| missing())?;
    let mut url = reqwest::Url::parse(&url).map_err(|e| {
        CliError::new(
            "invalid_request",
            format!("ACTIONS_ID_TOKEN_REQUEST_URL: {e}"),
        )
    })?;
    url.query_pairs_mut().append_pair("audience", audience);
    let unavailable = |e: String| CliError::new("issuer_unavailable", e);
    let resp = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| unavailable(e.to_string()))?
        .get(url)
        .bearer_auth(bearer)
        .send()
        .await
        .map_err(|e| unavailable(format!("GitHub ID-token request: {e}")))?;
    if !resp.status().is_success() {
        return Err(unavailable(format!(
            "GitHub ID-token request: HTTP {}",
            resp.status()
        )));
    }
    let body: serde_json::Value = resp
        .json()
        .await
        .map_err(|e| unavailable(format!("GitHub ID-token response: {e}")))?;
    body.get("value")
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .ok_or_else(|| unavailable("GitHub ID-token response has no value".into()))
}

/// Runs `herald exchange`.
pub async fn exchange(args: ExchangeArgs) -> Result<(), CliError> {
    let token = read_token(&args).await?;
    let anchors = read_bundle(&args.bundle)?;
    let identity = match &args.svid_dir {
        Some(dir) => {
            let current = files::read_svid_dir(dir)?;
            Some(ClientIdentity {
                cert_chain: current.cert_chain,
                key_pkcs8: current.key_pkcs8,
            })
        }
        None => None,
    };
    let mut x509_key = None;
    let credential = if args.x509 {
        let kc = keys::generate_key_and_csr()?;
        x509_key = Some(kc.key_pkcs8);
        Wanted::X509Svid(X509SvidParams { csr: kc.csr_der })
    } else if !args.jwt_audience.is_empty() {
        Wanted::JwtSvid(JwtSvidParams {
            audiences: args.jwt_audience.clone(),
        })
    } else if let Some(role) = &args.role_arn {
        let session_policy = match &args.session_policy {
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| CliError::new("invalid_request", format!("{}: {e}", p.display())))?,
            None => String::new(),
        };
        Wanted::Cloud(CloudCredentialsParams {
            role_arn: role.clone(),
            session_name: args.session_name.clone(),
            session_policy,
        })
    } else {
        return Err(CliError::new(
            "invalid_request",
            "say what you want: --x509, --jwt-audience or --role-arn",
        ));
    };
    let pin = server_pin(args.server_spiffe_id.as_deref(), ServerId::FromBundle)?;
    let client = HeraldClient::connect_to(&args.server, &anchors, identity, &pin).await?;
    let resp = client
        .exchange_token(ExchangeTokenRequest {
            subject_token: token,
            join_token: args.join_token.clone().unwrap_or_default(),
            ttl_seconds: args
                .ttl
                .map_or(0, |t| t.as_secs().min(u32::MAX.into()) as u32),
            credential: Some(credential),
        })
        .await?;
    eprintln!(
        "granted {} by policy {} until {}",
        resp.spiffe_id,
        resp.policy,
        rfc3339(resp.expires_at)
    );
    match resp.credential {
        Some(Given::X509Svid(svid)) => {
            let out = out_path(&args)?;
            files::write_svid_dir(
                out,
                &SvidFiles {
                    cert_chain: svid.cert_chain,
                    key_pkcs8: x509_key.unwrap_or_default(),
                    bundle: svid.bundle,
                },
            )?;
            let federated: Vec<(String, Vec<Vec<u8>>)> = svid
                .federated_bundles
                .into_iter()
                .map(|b| (b.trust_domain, b.x509_authorities))
                .collect();
            files::write_federated_bundles(out, &federated)?;
            println!("{}", out.join(files::SVID_FILE).display());
            Ok(())
        }
        Some(Given::JwtSvid(jwt)) => match args.format {
            Format::Json => {
                println!(
                    "{}",
                    json!({"spiffe_id": resp.spiffe_id, "expires_at": resp.expires_at, "token": jwt.token})
                );
                Ok(())
            }
            Format::Env => {
                println!("export HERALD_JWT_SVID={}", jwt.token);
                Ok(())
            }
            Format::Files => {
                let path = out_path(&args)?.join("jwt_svid.token");
                files::write_atomic(&path, jwt.token.as_bytes(), 0o600)?;
                println!("{}", path.display());
                Ok(())
            }
            Format::AwsCredentials => Err(CliError::new(
                "invalid_request",
                "aws-credentials output is for --role-arn",
            )),
        },
        Some(Given::Cloud(c)) => match args.format {
            Format::Json => {
                println!(
                    "{}",
                    json!({
                        "Version": 1,
                        "AccessKeyId": c.access_key_id,
                        "SecretAccessKey": c.secret_access_key,
                        "SessionToken": c.session_token,
                        "Expiration": c.expiration,
                    })
                );
                Ok(())
            }
            Format::Env => {
                println!("export AWS_ACCESS_KEY_ID={}", c.access_key_id);
                println!("export AWS_SECRET_ACCESS_KEY={}", c.secret_access_key);
                println!("export AWS_SESSION_TOKEN={}", c.session_token);
                Ok(())
            }
            Format::AwsCredentials | Format::Files => {
                let path = match args.format {
                    Format::Files => out_path(&args)?.join("credentials"),
                    _ => out_path(&args)?.to_path_buf(),
                };
                let ini = format!(
                    "[{}]\naws_access_key_id = {}\naws_secret_access_key = {}\naws_session_token = {}\n# expires {}\n",
                    args.profile,
                    c.access_key_id,
                    c.secret_access_key,
                    c.session_token,
                    c.expiration
                );
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent).map_err(|e| {
                        CliError::new("invalid_request", format!("{}: {e}", parent.display()))
                    })?;
                }
                files::write_atomic(&path, ini.as_bytes(), 0o600)?;
                println!("{}", path.display());
                Ok(())
            }
        },
        None => Err(CliError::new(
            "internal",
            "the server returned no credential",
        )),
    }
}

fn out_path(args: &ExchangeArgs) -> Result<&Path, CliError> {
    args.out
        .as_deref()
        .ok_or_else(|| CliError::new("invalid_request", "--out is required for this output"))
}
