//! `herald ca status`: the key ring as the datastore holds it — X.509 CA
//! keys, JWT signing keys and session-token keys — with what the published
//! bundle carries, so an operator can plan a rotation before a key expires.

use clap::Subcommand;

use crate::cli::{CliError, ConfigArgs, load_config, open_store};

/// Key-ring inspection.
#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// List every CA, JWT and session key: status, validity, whether the
    /// trust bundle publishes it and whether its rotation is due.
    Status {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print JSON lines (one per key, then one summary line) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// A key is due for rotation once less than this share of its lifetime is
/// left: a third leaves time to publish the next key in the bundle ahead of
/// use and to keep the old one until everything it signed has expired.
const ROTATE_WHEN_REMAINING: f64 = 1.0 / 3.0;

fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "-".into())
}

/// Whether a key of this kind and status is in the trust bundle: X.509 and
/// JWT keys are published until retired; session keys are never published.
fn published(kind: &str, status: &str) -> bool {
    kind != "session" && status != "retired"
}

/// Whether the key's rotation is due at `now` (keys without a lifetime,
/// such as session keys, never are).
fn rotation_due(status: &str, not_before: i64, not_after: i64, now: i64) -> bool {
    if status != "active" || not_after <= not_before {
        return false;
    }
    let left = (not_after - now) as f64 / (not_after - not_before) as f64;
    left < ROTATE_WHEN_REMAINING
}

/// Runs `herald ca ...`.
pub async fn ca(cmd: CaCommand) -> Result<(), CliError> {
    let CaCommand::Status { config, json } = cmd;
    let cfg = load_config(&config)?;
    let store = open_store(&cfg).await?;
    let keys = store.ca_keys().await;
    let sequence = store.bundle_sequence().await;
    store.close().await;
    let (keys, sequence) = (keys?, sequence?);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if json {
        for k in &keys {
            let lifetime = k.not_after > k.not_before;
            let line = serde_json::json!({
                "kind": k.kind,
                "key_id": k.key_id,
                "status": k.status,
                "not_before": lifetime.then(|| rfc3339(k.not_before)),
                "not_after": lifetime.then(|| rfc3339(k.not_after)),
                "expires_in_secs": lifetime.then(|| k.not_after - now),
                "in_bundle": published(&k.kind, &k.status),
                "rotation_due": rotation_due(&k.status, k.not_before, k.not_after, now),
                "created_at": rfc3339(k.created_at),
            });
            println!("{line}");
        }
        println!(
            "{}",
            serde_json::json!({
                "trust_domain": cfg.trust_domain.to_string(),
                "bundle_sequence": sequence,
                "keys": keys.len(),
            })
        );
        return Ok(());
    }
    println!(
        "trust domain {}  bundle sequence {sequence}",
        cfg.trust_domain
    );
    println!(
        "{:<8} {:<26} {:<9} {:<6} {:<21} {:<21} ROTATE",
        "KIND", "KEY ID", "STATUS", "BUNDLE", "NOT BEFORE", "NOT AFTER"
    );
    for k in &keys {
        let lifetime = k.not_after > k.not_before;
        let (nb, na) = if lifetime {
            (rfc3339(k.not_before), rfc3339(k.not_after))
        } else {
            ("-".into(), "-".into())
        };
        println!(
            "{:<8} {:<26} {:<9} {:<6} {:<21} {:<21} {}",
            k.kind,
            k.key_id,
            k.status,
            if published(&k.kind, &k.status) {
                "yes"
            } else {
                "no"
            },
            nb,
            na,
            if rotation_due(&k.status, k.not_before, k.not_after, now) {
                "due"
            } else {
                "-"
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_due_in_the_last_third_of_an_active_key() {
        assert!(!rotation_due("active", 0, 300, 199));
        assert!(rotation_due("active", 0, 300, 201));
        assert!(!rotation_due("retired", 0, 300, 299));
        assert!(!rotation_due("active", 10, 10, 500), "no lifetime");
    }

    #[test]
    fn session_and_retired_keys_are_not_published() {
        assert!(published("x509", "active"));
        assert!(published("jwt", "prepared"));
        assert!(!published("jwt", "retired"));
        assert!(!published("session", "active"));
    }
}
