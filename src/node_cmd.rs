//! `herald node list|ban` (operators, against the datastore) and
//! `herald agent [status]` (the node agent).

use std::path::PathBuf;

use clap::{Args, Subcommand};
use herald_agent::{AgentConfig, AgentStatus};
use herald_store::NodeStatus;

use crate::cli::{CliError, ConfigArgs, load_config, open_store, operator, operator_event};

/// Node registry administration.
#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List attested nodes: SPIFFE ID, EK hash, status, counters, last
    /// attestation, and the last quote's time and result (`ok` or the
    /// refusal's code — continuous attestation).
    List {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Ban a node (by SPIFFE ID or EK hash): its re-attestations and
    /// renewals are refused from now on and its unexpired credentials revoked.
    Ban {
        #[command(flatten)]
        config: ConfigArgs,
        /// The node's SPIFFE ID or EK hash.
        id: String,
        /// Why, for the audit log.
        #[arg(long, default_value = "unspecified")]
        reason: String,
    },
    /// Forget an active node (by SPIFFE ID or EK hash / node key) so that
    /// it may enrol afresh — an AWS instance with a new agent key. Its
    /// credentials stay valid (ban it to revoke them); a banned node stays banned.
    Reset {
        #[command(flatten)]
        config: ConfigArgs,
        /// The node's SPIFFE ID or EK hash / node key.
        id: String,
    },
}

/// `herald agent`.
#[derive(Args, Debug)]
pub struct AgentArgs {
    /// The agent's TOML configuration (see deploy/agent.example.toml).
    #[arg(long, env = "HERALD_AGENT_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<AgentCommand>,
}

#[derive(Subcommand, Debug)]
enum AgentCommand {
    /// Show the node identity, its expiry, the next rotation and the last error.
    Status {
        /// Print the status JSON as is.
        #[arg(long)]
        json: bool,
    },
    /// Check an agent configuration file offline.
    Check,
}

fn rfc3339(t: Option<i64>) -> String {
    t.and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
}

/// Runs `herald node ...`.
pub async fn node(cmd: NodeCommand) -> Result<(), CliError> {
    match cmd {
        NodeCommand::List { config, json } => {
            let cfg = load_config(&config)?;
            let store = open_store(&cfg).await?;
            let nodes = store.list_nodes().await;
            store.close().await;
            let nodes = nodes?;
            if json {
                for n in &nodes {
                    let line = serde_json::json!({
                        "spiffe_id": n.spiffe_id,
                        "ek_hash": n.ek_hash,
                        "ak_name": n.ak_name,
                        "status": match n.status { NodeStatus::Active => "active", NodeStatus::Banned => "banned" },
                        "policy": n.policy,
                        "golden_set": n.golden_set,
                        "reset_count": n.reset_count,
                        "restart_count": n.restart_count,
                        "firmware_version": n.firmware_version,
                        "attestations": n.attestations,
                        "enrolled_at": rfc3339(Some(n.enrolled_at)),
                        "last_attested_at": rfc3339(Some(n.last_attested_at)),
                        "banned_at": rfc3339(n.banned_at),
                        "ban_reason": n.ban_reason,
                        "last_quote_at": rfc3339(n.last_quote_at),
                        "last_quote_result": n.last_quote_result,
                    });
                    println!("{line}");
                }
                return Ok(());
            }
            println!(
                "{:<56} {:<8} {:<16} {:>6} {:>8} {:<20} {:<20} LAST QUOTE RESULT",
                "SPIFFE ID",
                "STATUS",
                "EK HASH",
                "RESETS",
                "ATTESTS",
                "LAST ATTESTED",
                "LAST QUOTE"
            );
            for n in &nodes {
                println!(
                    "{:<56} {:<8} {:<16} {:>6} {:>8} {:<20} {:<20} {}",
                    n.spiffe_id,
                    match n.status {
                        NodeStatus::Active => "active",
                        NodeStatus::Banned => "banned",
                    },
                    &n.ek_hash[..16.min(n.ek_hash.len())],
                    n.reset_count,
                    n.attestations,
                    rfc3339(Some(n.last_attested_at)),
                    rfc3339(n.last_quote_at),
                    n.last_quote_result.as_deref().unwrap_or("-"),
                );
            }
            Ok(())
        }
        NodeCommand::Ban { config, id, reason } => {
            let cfg = load_config(&config)?;
            let store = open_store(&cfg).await?;
            let mut audit = operator_event("node.ban");
            audit.evidence_digest = Some(id.clone());
            let result = store.ban_node(&id, &operator(), &reason, audit).await;
            store.close().await;
            match result? {
                Some((node, revoked)) => {
                    println!(
                        "banned {} (ek {}); revoked {revoked} credential(s)",
                        node.spiffe_id, node.ek_hash
                    );
                    Ok(())
                }
                None => Err(CliError::new("not_found", format!("no node {id}"))),
            }
        }
        NodeCommand::Reset { config, id } => {
            let cfg = load_config(&config)?;
            let store = open_store(&cfg).await?;
            let mut audit = operator_event("node.reset");
            audit.evidence_digest = Some(id.clone());
            let result = store.reset_node(&id, audit).await;
            store.close().await;
            match result? {
                Some(node) => {
                    println!(
                        "reset {} (node key {}): it may enrol again",
                        node.spiffe_id, node.ek_hash
                    );
                    Ok(())
                }
                None => Err(CliError::new(
                    "not_found",
                    format!("no active node {id} (a banned node stays banned)"),
                )),
            }
        }
    }
}

/// Runs `herald agent ...`.
pub async fn agent(args: AgentArgs) -> Result<(), CliError> {
    let path = args.config.ok_or_else(|| {
        CliError::new(
            "config",
            "--config FILE (or HERALD_AGENT_CONFIG) is required",
        )
    })?;
    let cfg = AgentConfig::load(&path).map_err(|e| CliError::new("config", e.to_string()))?;
    match args.command {
        Some(AgentCommand::Check) => {
            println!("{}: ok", path.display());
            Ok(())
        }
        Some(AgentCommand::Status { json }) => {
            let status = AgentStatus::read(&cfg.status_path())
                .map_err(|e| CliError::new("not_found", format!("no agent status: {e}")))?;
            if json {
                let text = serde_json::to_string_pretty(&status)
                    .map_err(|e| CliError::new("internal", e.to_string()))?;
                println!("{text}");
                return Ok(());
            }
            println!("state:          {}", status.state);
            println!(
                "spiffe id:      {}",
                status.spiffe_id.as_deref().unwrap_or("-")
            );
            println!(
                "serial:         {}",
                status.serial.as_deref().unwrap_or("-")
            );
            println!("expires:        {}", rfc3339(status.expires_at));
            println!("next rotation:  {}", rfc3339(status.next_rotation));
            println!(
                "server:         {}",
                status.server.as_deref().unwrap_or("-")
            );
            println!(
                "attestations:   {}  renewals: {}  failures: {}",
                status.attestations, status.renewals, status.failures
            );
            println!(
                "last error:     {}",
                status.last_error.as_deref().unwrap_or("-")
            );
            println!(
                "renewals with a fresh quote: {}  workloads: {}",
                if status.quote_renewals { "yes" } else { "no" },
                if status.workloads_suspended {
                    "SUSPENDED (the node's quote was refused; re-attesting)"
                } else {
                    "served"
                }
            );
            Ok(())
        }
        None => herald_agent::run::run(cfg, crate::cli::wait_for_signal())
            .await
            .map_err(|e| CliError::new(e.code(), e.to_string())),
    }
}
