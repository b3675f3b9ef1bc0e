//! `herald ca status`: the key ring as the datastore holds it — X.509 CA
//! keys, JWT signing keys and session-token keys — with what the published
//! bundle carries and when each key moves next. `herald ca rotate`: start a
//! rotation now (audited); the servers finish it on their schedule.

use clap::{Subcommand, ValueEnum};
use herald_server::rotation;

use crate::cli::{CliError, ConfigArgs, load_config, open_store, operator};

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
    /// Prepare the next CA, JWT signing and/or audit key now. It is published in
    /// the trust bundle at once and signs only after `ca.rotation.publish_ahead`;
    /// the key it replaces stays published until everything it signed has
    /// expired. The running servers make those moves.
    Rotate {
        #[command(flatten)]
        config: ConfigArgs,
        /// Which keys.
        #[arg(long, value_enum, default_value_t = RotateKind::All)]
        kind: RotateKind,
    },
}

/// The keys `herald ca rotate` rotates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RotateKind {
    /// The X.509 CA key.
    X509,
    /// The JWT-SVID signing key.
    Jwt,
    /// The audit key (signs checkpoints of the audit chain).
    Audit,
    /// All three.
    All,
}

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
/// JWT keys are published until retired; session and audit keys never are.
fn published(kind: &str, status: &str) -> bool {
    kind != "session" && kind != "audit" && status != "retired"
}

/// Whether the key's rotation is due at `now`: it is active and past
/// `rotate_at` of its lifetime (keys without a lifetime, such as session
/// keys, never are).
fn rotation_due(status: &str, not_before: i64, not_after: i64, now: i64, rotate_at: f64) -> bool {
    if status != "active" || not_after <= not_before {
        return false;
    }
    let used = (now - not_before) as f64 / (not_after - not_before) as f64;
    used >= rotate_at
}

/// Runs `herald ca ...`.
pub async fn ca(cmd: CaCommand) -> Result<(), CliError> {
    match cmd {
        CaCommand::Status { config, json } => status(config, json).await,
        CaCommand::Rotate { config, kind } => rotate(config, kind).await,
    }
}

async fn rotate(config: ConfigArgs, kind: RotateKind) -> Result<(), CliError> {
    let cfg = load_config(&config)?;
    let kek = herald_server::authority::load_kek(&cfg)?;
    let store = open_store(&cfg).await?;
    let kinds: &[&str] = match kind {
        RotateKind::X509 => &["x509"],
        RotateKind::Jwt => &["jwt"],
        RotateKind::Audit => &["audit"],
        RotateKind::All => &rotation::KINDS,
    };
    let mut result = Ok(());
    for k in kinds {
        match rotation::prepare(&store, &cfg, &kek, k, &operator()).await {
            Ok(Some(id)) => println!(
                "{k}: prepared {id}; it signs after {} (ca.rotation.publish_ahead)",
                humantime::format_duration(cfg.ca.rotation.publish_ahead)
            ),
            Ok(None) => println!("{k}: a key is already prepared; see `herald ca status`"),
            Err(e) => {
                result = Err(e.into());
                break;
            }
        }
    }
    store.close().await;
    result
}

async fn status(config: ConfigArgs, json: bool) -> Result<(), CliError> {
    let cfg = load_config(&config)?;
    let store = open_store(&cfg).await?;
    let keys = store.ca_keys().await;
    let sequence = store.bundle_sequence().await;
    store.close().await;
    let (keys, sequence) = (keys?, sequence?);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let rotate_at = cfg.ca.rotation.rotate_at;
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
                "rotation_due": rotation_due(&k.status, k.not_before, k.not_after, now, rotate_at),
                "created_at": rfc3339(k.created_at),
                "status_since": rfc3339(k.status_since),
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
            if rotation_due(&k.status, k.not_before, k.not_after, now, rotate_at) {
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
    fn rotation_is_due_past_rotate_at_of_an_active_keys_life() {
        assert!(!rotation_due("active", 0, 300, 199, 2.0 / 3.0));
        assert!(rotation_due("active", 0, 300, 201, 2.0 / 3.0));
        assert!(rotation_due("active", 0, 300, 150, 0.5));
        assert!(!rotation_due("retired", 0, 300, 299, 0.5));
        assert!(!rotation_due("active", 10, 10, 500, 0.5), "no lifetime");
    }

    #[test]
    fn session_and_retired_keys_are_not_published() {
        assert!(published("x509", "active"));
        assert!(published("jwt", "prepared"));
        assert!(!published("jwt", "retired"));
        assert!(!published("session", "active"));
    }
}
