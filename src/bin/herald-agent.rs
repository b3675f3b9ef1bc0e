//! `herald-agent`: the node agent alone, a much smaller executable than
//! `herald` (no server, database, policy engine or exporters linked in),
//! for nodes. Same configuration and behaviour as `herald agent`; status
//! and administration stay with `herald agent status` and `herald node`.
#![forbid(unsafe_code)]

use std::io::IsTerminal as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use herald_agent::AgentConfig;

/// Herald's node agent: attests this machine, keeps its node SVID fresh
/// and serves local workloads their identities.
#[derive(Parser, Debug)]
#[command(name = "herald-agent", version)]
struct Args {
    /// The agent's TOML configuration (see deploy/agent.example.toml).
    #[arg(long, env = "HERALD_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check the configuration file offline.
    Check,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("HERALD_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var("HERALD_LOG_FORMAT").is_ok_and(|v| v == "json") {
        fmt.json().init();
    } else {
        fmt.init();
    }
    // As `herald` does: the code, what went wrong, and what to do.
    let fail = |code: &str, msg: String| {
        eprintln!("herald-agent: error[{code}]: {msg}");
        let fix = match code {
            "config" => {
                "fix the agent configuration (every key, with its default: deploy/agent.example.toml; `herald config defaults --agent`), then `herald-agent --config FILE check`"
            }
            "agent" => {
                "`herald agent --config FILE status` shows the node identity and the last error; a refused attestation is in the server's audit log with its code"
            }
            _ => "retry; if it persists, report it with the log above",
        };
        eprintln!("  fix: {fix}");
        ExitCode::FAILURE
    };
    let Some(path) = args.config else {
        return fail(
            "config",
            "--config FILE (or HERALD_AGENT_CONFIG) is required".into(),
        );
    };
    let cfg = match AgentConfig::load(&path) {
        Ok(c) => c,
        Err(e) => return fail("config", e.to_string()),
    };
    if let Some(Command::Check) = args.command {
        println!("{}: ok", path.display());
        return ExitCode::SUCCESS;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cfg.worker_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return fail("internal", format!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(async {
        let stop = herald_agent::run::shutdown_signal();
        herald_agent::run::run(cfg, stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e.code(), e.to_string()),
    }
}
