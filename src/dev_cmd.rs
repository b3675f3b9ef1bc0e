//! `herald dev token`: a CI-shaped token from the DEV-ONLY issuer of
//! `herald server --dev`, signed with its key file in the dev data
//! directory (see `herald_server::dev_issuer` for why a file).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::Value;

use crate::cli::CliError;

/// `herald dev …`: development helpers (only meaningful with `herald server --dev`).
#[derive(Subcommand, Debug)]
pub enum DevCommand {
    /// Print a token shaped like a GitHub Actions job's ID token (repository
    /// dev/demo, refs/heads/main, environment demo, audience herald-dev),
    /// signed by the dev server's local issuer: exchange it with `herald
    /// exchange`, the STS API or RFC 8693. DEV ONLY.
    Token(TokenArgs),
}

/// `herald dev token`.
#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Set or override a claim (repeatable): `--claim ref=refs/heads/x`.
    /// The value is taken as JSON when it parses as JSON (numbers, true,
    /// objects), else as a string.
    #[arg(long = "claim", value_name = "K=V")]
    claims: Vec<String>,
    /// Token lifetime.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    ttl: Duration,
    /// The dev server's data directory.
    #[arg(long, env = "HERALD_DATA_DIR", default_value = herald_server::config::DEV_DATA_DIR)]
    data_dir: PathBuf,
}

/// Runs a `herald dev` command.
pub fn run(cmd: DevCommand) -> Result<(), CliError> {
    let DevCommand::Token(args) = cmd;
    let mut claims = Vec::new();
    for kv in &args.claims {
        let (k, v) = kv.split_once('=').ok_or_else(|| {
            CliError::new(
                "invalid_request",
                format!("--claim {kv:?}: write it as NAME=VALUE"),
            )
        })?;
        if k.is_empty() {
            return Err(CliError::new(
                "invalid_request",
                format!("--claim {kv:?}: the claim name is empty"),
            ));
        }
        let value = serde_json::from_str::<Value>(v).unwrap_or_else(|_| Value::from(v));
        claims.push((k.to_owned(), value));
    }
    let ttl = i64::try_from(args.ttl.as_secs())
        .ok()
        .filter(|s| (1..=86_400).contains(s))
        .ok_or_else(|| CliError::new("invalid_request", "--ttl must be between 1s and 24h"))?;
    let token = herald_server::dev_issuer::mint_token(&args.data_dir, &claims, ttl)
        .map_err(|e| CliError::new("dev_issuer_unavailable", e.to_string()))?;
    println!("{token}");
    Ok(())
}
