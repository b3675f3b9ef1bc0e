//! `herald policy check|test [DIR]`: the server's load-time checks, offline.

use std::path::PathBuf;

use clap::{Args, Subcommand};
use herald_core::TrustDomain;
use herald_policy::{LoadOptions, PolicySet};

use crate::cli::CliError;

/// `herald policy …`.
#[derive(Subcommand, Debug)]
pub enum PolicyCommand {
    /// Load and validate every policy in DIR exactly as the server would
    /// (compile, variables, size caps, dangerous patterns, embedded tests).
    Check(Target),
    /// Run every policy's embedded tests and report each one.
    Test(Target),
    /// Say in words what one policy accepts and grants (after loading it
    /// exactly as the server would: a policy it would refuse is not explained).
    Explain {
        /// The policy file.
        file: PathBuf,
        /// A server configuration file, for its trust domain and DNS names.
        #[arg(long, env = "HERALD_CONFIG", conflicts_with = "trust_domain")]
        config: Option<PathBuf>,
        /// The trust domain SPIFFE IDs must belong to (without --config).
        #[arg(long)]
        trust_domain: Option<String>,
    },
}

/// Which policies, checked for which server.
#[derive(Args, Debug)]
pub struct Target {
    /// The policy directory (default: the configuration's `policy.dir`).
    #[arg(required_unless_present = "config")]
    dir: Option<PathBuf>,
    /// A server configuration file: its trust domain, its own DNS names
    /// (which no workload may register) and, without DIR, its policy.dir —
    /// so the check is the one that server would make.
    #[arg(long, env = "HERALD_CONFIG", conflicts_with = "trust_domain")]
    config: Option<PathBuf>,
    /// The trust domain SPIFFE IDs must belong to (without --config).
    #[arg(long)]
    trust_domain: Option<String>,
}

impl Target {
    /// The directory and the load options the server would use.
    fn resolve(self) -> Result<(PathBuf, LoadOptions), CliError> {
        let (opts, configured) = load_options(self.config, self.trust_domain)?;
        let dir = self.dir.or(configured).ok_or_else(|| {
            CliError::new(
                "invalid_request",
                "give a policy directory (the configuration has no policy.dir)",
            )
        })?;
        Ok((dir, opts))
    }
}

/// The load options of the server configured in `config` (and its
/// `policy.dir`), or of a server of `trust_domain` (default: the dev one).
fn load_options(
    config: Option<PathBuf>,
    trust_domain: Option<String>,
) -> Result<(LoadOptions, Option<PathBuf>), CliError> {
    let Some(file) = config else {
        let td = trust_domain
            .as_deref()
            .unwrap_or(herald_server::config::DEV_TRUST_DOMAIN);
        let td = TrustDomain::new(td)
            .map_err(|e| CliError::new("invalid_request", format!("--trust-domain: {e}")))?;
        return Ok((LoadOptions::new(td), None));
    };
    let cfg = herald_server::config::ServerConfig::from_file(&file)
        .map_err(|e| CliError::new("config_invalid", e.to_string()))?;
    let opts = LoadOptions {
        trust_domain: cfg.trust_domain,
        reserved_dns_names: cfg.tls.dns_names,
    };
    Ok((opts, cfg.policy.dir))
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
        PolicyCommand::Check(target) => {
            let (dir, opts) = target.resolve()?;
            let set = PolicySet::load_dir(&dir, &opts).map_err(load_failed)?;
            println!(
                "ok: {} policies in {} for trust domain {} ({})",
                set.len(),
                dir.display(),
                opts.trust_domain,
                set.names().join(", ")
            );
            Ok(())
        }
        PolicyCommand::Explain {
            file,
            config,
            trust_domain,
        } => {
            let (opts, _) = load_options(config, trust_domain)?;
            let text = herald_policy::explain(&file, &opts).map_err(load_failed)?;
            print!("{text}");
            Ok(())
        }
        PolicyCommand::Test(target) => {
            let (dir, opts) = target.resolve()?;
            let outcomes = herald_policy::test_dir(&dir, &opts).map_err(load_failed)?;
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
