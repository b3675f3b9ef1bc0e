//! `herald replicas`: the server replicas sharing this database, from
//! their heartbeats — when each was last seen, which trust-bundle sequence
//! and policy set it serves — and whether the live ones agree with each
//! other and with the database.

use clap::Args;
use herald_server::replica::STALE_AFTER;
use herald_store::ReplicaRecord;

use crate::cli::{CliError, ConfigArgs, load_config, open_store};

/// Replicas not seen for this long are not listed.
const LISTED_FOR_MS: i64 = 3600 * 1000;

/// `herald replicas` arguments.
#[derive(Args, Debug)]
pub struct ReplicasArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Print JSON lines (one per replica, then one summary line).
    #[arg(long)]
    json: bool,
    /// Exit with `replicas_diverged` unless every live replica serves the
    /// database's bundle sequence and the same policy set.
    #[arg(long)]
    check: bool,
}

/// Whether the live replicas agree: on the database's bundle sequence and
/// on one policy set. `None` when they do, else why not.
fn divergence(live: &[&ReplicaRecord], bundle_sequence: u64) -> Option<String> {
    if live.is_empty() {
        return Some("no live replica".into());
    }
    let behind: Vec<&str> = live
        .iter()
        .filter(|r| r.bundle_sequence != bundle_sequence)
        .map(|r| r.replica_id.as_str())
        .collect();
    if !behind.is_empty() {
        return Some(format!(
            "not serving bundle sequence {bundle_sequence}: {}",
            behind.join(", ")
        ));
    }
    let first = &live[0].policy_digest;
    if live.iter().any(|r| &r.policy_digest != first) {
        let sets: Vec<String> = live
            .iter()
            .map(|r| format!("{}={}", r.replica_id, short(&r.policy_digest)))
            .collect();
        return Some(format!("different policy sets: {}", sets.join(", ")));
    }
    None
}

fn short(digest: &str) -> &str {
    if digest.is_empty() {
        "-"
    } else {
        &digest[..digest.len().min(12)]
    }
}

/// Runs `herald replicas`.
pub async fn replicas(args: ReplicasArgs) -> Result<(), CliError> {
    let cfg = load_config(&args.config)?;
    let store = open_store(&cfg).await?;
    let now_ms = time::OffsetDateTime::now_utc().unix_timestamp() * 1000;
    let listed = store.replicas(now_ms - LISTED_FOR_MS).await;
    let sequences = store.sequences().await;
    store.close().await;
    let (listed, bundle_sequence) = (listed?, sequences?.bundle);
    let stale_ms = STALE_AFTER.as_millis() as i64;
    let is_live = |r: &ReplicaRecord| now_ms - r.last_seen_ms <= stale_ms;
    let live: Vec<&ReplicaRecord> = listed.iter().filter(|r| is_live(r)).collect();
    let verdict = divergence(&live, bundle_sequence);
    if args.json {
        for r in &listed {
            println!(
                "{}",
                serde_json::json!({
                    "replica_id": r.replica_id,
                    "address": r.address,
                    "version": r.version,
                    "live": is_live(r),
                    "last_seen_ms_ago": now_ms - r.last_seen_ms,
                    "started_at": r.started_at,
                    "bundle_sequence": r.bundle_sequence,
                    "policy_digest": r.policy_digest,
                    "policy_generation": r.policy_generation,
                })
            );
        }
        println!(
            "{}",
            serde_json::json!({
                "bundle_sequence": bundle_sequence,
                "live": live.len(),
                "stale": listed.len() - live.len(),
                "in_sync": verdict.is_none(),
                "divergence": verdict,
            })
        );
    } else {
        println!(
            "{:<36} {:<22} {:<6} {:>9} {:>8} {:<12} VERSION",
            "REPLICA", "ADDRESS", "STATE", "SEEN", "BUNDLE", "POLICIES"
        );
        for r in &listed {
            println!(
                "{:<36} {:<22} {:<6} {:>8}s {:>8} {:<12} {}",
                r.replica_id,
                r.address,
                if is_live(r) { "live" } else { "stale" },
                (now_ms - r.last_seen_ms) / 1000,
                r.bundle_sequence,
                short(&r.policy_digest),
                r.version
            );
        }
        match &verdict {
            None => println!(
                "in sync: {} live replica(s) serve bundle sequence {bundle_sequence} and one policy set",
                live.len()
            ),
            Some(why) => println!("NOT in sync: {why}"),
        }
    }
    match verdict {
        Some(why) if args.check => Err(CliError::new("replicas_diverged", why)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn replica(id: &str, seq: u64, digest: &str) -> ReplicaRecord {
        ReplicaRecord {
            replica_id: id.into(),
            address: "127.0.0.1:8443".into(),
            version: "0".into(),
            started_at: 0,
            last_seen_ms: 0,
            bundle_sequence: seq,
            policy_digest: digest.into(),
            policy_generation: 1,
        }
    }

    #[test]
    fn replicas_agree_only_on_the_databases_sequence_and_one_policy_set() {
        let (a, b) = (replica("a", 3, "d1"), replica("b", 3, "d1"));
        assert_eq!(divergence(&[&a, &b], 3), None);
        let behind = replica("b", 2, "d1");
        assert!(divergence(&[&a, &behind], 3).unwrap().contains("b"));
        let other = replica("b", 3, "d2");
        assert!(
            divergence(&[&a, &other], 3)
                .unwrap()
                .contains("different policy sets")
        );
        assert!(divergence(&[], 3).is_some());
    }
}
