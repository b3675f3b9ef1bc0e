//! `herald policy check|test DIR`: the server's load-time checks, offline.

use std::path::PathBuf;

use clap::Subcommand;
use herald_core::TrustDomain;
use herald_policy::{LoadOptions, PolicySet};

use crate::cli::CliError;

/// `herald policy …`.
#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Load and validate every policy in DIR exactly as the server would
    /// (compile, variables, size caps, dangerous patterns, embedded tests).
    Check {
        /// The policy directory.
        dir: PathBuf,
        /// The trust domain SPIFFE IDs must belong to.
        #[arg(long, default_value = herald_server::config::DEV_TRUST_DOMAIN)]
        trust_domain: String,
    },
    /// Run every policy's embedded tests and report each one.
    Test {
        /// The policy directory.
        dir: PathBuf,
        /// The trust domain SPIFFE IDs must belong to.
        #[arg(long, default_value = herald_server::config::DEV_TRUST_DOMAIN)]
        trust_domain: String,
    },
}

fn options(trust_domain: &str) -> Result<LoadOptions, CliError> {
    let trust_domain = TrustDomain::new(trust_domain)
        .map_err(|e| CliError::new("invalid_request", format!("--trust-domain: {e}")))?;
    Ok(LoadOptions::new(trust_domain))
}

fn load_failed(e: herald_policy::LoadErrors) -> CliError {
    for err in &e.0 {
        eprintln!("{err}");
    }
    CliError::new(
        "policy_invalid",
        format!("{} problem(s); the set would be refused", e.0.len()),
    )
}

/// Runs a `herald policy` command.
pub fn run(cmd: PolicyCommand) -> Result<(), CliError> {
    match cmd {
        PolicyCommand::Check { dir, trust_domain } => {
            let set = PolicySet::load_dir(&dir, &options(&trust_domain)?).map_err(load_failed)?;
            println!(
                "ok: {} policies in {} ({})",
                set.len(),
                dir.display(),
                set.names().join(", ")
            );
            Ok(())
        }
        PolicyCommand::Test { dir, trust_domain } => {
            let outcomes =
                herald_policy::test_dir(&dir, &options(&trust_domain)?).map_err(load_failed)?;
            let mut failed = 0;
            for o in &outcomes {
                let name = o
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("test {}", o.index));
                if o.passed {
                    println!("pass  {} / {}: {name}", o.path.display(), o.policy);
                } else {
                    failed += 1;
                    println!(
                        "FAIL  {} / {}: {name}: {}",
                        o.path.display(),
                        o.policy,
                        o.detail
                    );
                }
            }
            println!("{} tests, {} failed", outcomes.len(), failed);
            if failed > 0 {
                return Err(CliError::new(
                    "policy_test_failed",
                    format!("{failed} test(s) failed"),
                ));
            }
            Ok(())
        }
    }
}
