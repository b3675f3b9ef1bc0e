//! CA and JWT key rotation, coordinated through the datastore, and the
//! key-ring refresh that keeps every replica on the ring the store holds.
//!
//! A key's life: `prepared` (published in the trust bundle, not signing)
//! → `active` (signing) → `retiring` (still published, no longer signing)
//! → `retired` (gone from the bundle) once every credential it signed has
//! expired. Each move bumps the bundle sequence in the same transaction.
//!
//! One replica at a time — the holder of the `ca-rotation` lease — decides
//! and makes the moves ([`plan`] then [`apply`]); every replica polls the
//! bundle sequence ([`refresh`]) and reloads the ring when it changed, then
//! wakes its agents' registration streams so they receive the new bundle.
//! Because a prepared key is published for `publish_ahead` (≥ 5 polls)
//! before it is activated, every replica serves, and every connected agent
//! holds, a bundle with the new key before any SVID signed by it exists.

use std::sync::Arc;

use herald_ca::KeyEncryptionKey;
use herald_core::{AuditEvent, EvidenceType};
use herald_store::{CaKeyRecord, Store};
use tokio::sync::watch;

use crate::config::{RotationConfig, ServerConfig};
use crate::{ServerError, Shared, authority, unix_now, wait_shutdown};

/// The lease that lets one replica drive rotation.
pub const LEASE: &str = "ca-rotation";

/// The kinds of key that rotate. (Session-token keys are not published and
/// are not rotated by this schedule.)
pub const KINDS: [&str; 3] = ["x509", "jwt", "audit"];

/// One move of the key ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Generate the next key of `kind` and publish it as `prepared`.
    Prepare {
        /// `x509`, `jwt` or `audit`.
        kind: &'static str,
    },
    /// Make `next` the signing key; the current one (if any) starts retiring.
    Activate {
        /// `x509`, `jwt` or `audit`.
        kind: &'static str,
        /// The prepared key.
        next: String,
        /// The key it replaces.
        current: Option<String>,
    },
    /// Take `key_id` out of the bundle: everything it signed has expired.
    Retire {
        /// `x509`, `jwt` or `audit`.
        kind: &'static str,
        /// The retiring key.
        key_id: String,
    },
}

/// What rotation needs to know beyond the ring itself.
#[derive(Debug, Clone)]
pub struct Schedule {
    /// Prepare on schedule (otherwise only on request).
    pub automatic: bool,
    /// Share of the active key's lifetime after which the next is prepared.
    pub rotate_at: f64,
    /// How long a prepared key is published before it signs.
    pub publish_ahead_s: i64,
    /// How long after a key stops signing a straggling replica might still
    /// sign with it (it reloads within one poll): retirement waits this too.
    pub grace_s: i64,
}

impl Schedule {
    /// The schedule `cfg` sets.
    pub fn from_config(cfg: &ServerConfig) -> Schedule {
        let RotationConfig {
            automatic,
            rotate_at,
            publish_ahead,
            ..
        } = cfg.ca.rotation;
        Schedule {
            automatic,
            rotate_at,
            publish_ahead_s: publish_ahead.as_secs_f64().ceil() as i64,
            grace_s: (cfg.ca.bundle_poll * 5).as_secs_f64().ceil() as i64,
        }
    }
}

/// Decides the moves due at `now`. `last_expiry(key_id)` is when the last
/// credential that key signed expires (`None`: it signed none). Pure, so
/// the schedule is tested without a clock.
pub fn plan(
    keys: &[CaKeyRecord],
    last_expiry: &dyn Fn(&str) -> Option<i64>,
    now: i64,
    schedule: &Schedule,
) -> Vec<Step> {
    let mut steps = Vec::new();
    for kind in KINDS {
        let of_kind = |status: &'static str| {
            keys.iter()
                .filter(move |k| k.kind == kind && k.status == status)
        };
        let active = of_kind("active").next_back();
        let prepared = of_kind("prepared").next_back();
        match (active, prepared) {
            (_, Some(p)) if now >= p.status_since + schedule.publish_ahead_s => {
                steps.push(Step::Activate {
                    kind,
                    next: p.key_id.clone(),
                    current: active.map(|a| a.key_id.clone()),
                });
            }
            (Some(a), None) if schedule.automatic && a.not_after > a.not_before => {
                let due = a.not_before
                    + ((a.not_after - a.not_before) as f64 * schedule.rotate_at) as i64;
                if now >= due {
                    steps.push(Step::Prepare { kind });
                }
            }
            _ => {}
        }
        for r in of_kind("retiring") {
            let until = last_expiry(&r.key_id)
                .unwrap_or(0)
                .max(r.status_since + schedule.grace_s);
            if now >= until {
                steps.push(Step::Retire {
                    kind,
                    key_id: r.key_id.clone(),
                });
            }
        }
    }
    steps
}

fn audit(action: &str, caller: &str, key_id: &str) -> AuditEvent {
    let mut a = AuditEvent::new(action, caller);
    a.evidence_type = Some(EvidenceType::Operator);
    a.serial = Some(key_id.to_owned());
    a
}

fn action(kind: &str, verb: &str) -> String {
    let noun = match kind {
        "x509" => "ca",
        "audit" => "audit_key",
        _ => "jwt_key",
    };
    format!("{noun}.{verb}")
}

/// Prepares the next key of `kind` now (what `herald ca rotate` does);
/// `Ok(None)` when one is already prepared. Returns the new key's id.
pub async fn prepare(
    store: &Store,
    cfg: &ServerConfig,
    kek: &KeyEncryptionKey,
    kind: &str,
    caller: &str,
) -> Result<Option<String>, ServerError> {
    let now = unix_now();
    let (record, mut event) = match kind {
        "x509" => authority::new_x509_key(cfg, kek, now, "prepared")?,
        "jwt" => authority::new_jwt_key(cfg, kek, now, "prepared")?,
        "audit" => authority::new_audit_key(cfg, kek, now, "prepared")?,
        other => {
            return Err(ServerError::Config(format!(
                "unknown key kind {other:?}: x509, jwt or audit"
            )));
        }
    };
    event.caller = caller.to_owned();
    let key_id = record.key_id.clone();
    Ok(store
        .insert_ca_key_unless(record, &["prepared"], event)
        .await?
        .then_some(key_id))
}

/// Makes the moves; returns how many took effect (a move another replica
/// made first is skipped).
pub async fn apply(
    store: &Store,
    cfg: &ServerConfig,
    kek: &KeyEncryptionKey,
    steps: &[Step],
    caller: &str,
) -> Result<usize, ServerError> {
    let now = unix_now();
    let mut done = 0;
    for step in steps {
        let took = match step {
            Step::Prepare { kind } => prepare(store, cfg, kek, kind, caller).await?.is_some(),
            Step::Activate {
                kind,
                next,
                current,
            } => {
                let mut changes = vec![(next.as_str(), "prepared", "active")];
                if let Some(c) = current {
                    changes.push((c.as_str(), "active", "retiring"));
                }
                let event = audit(&action(kind, "activate"), caller, next);
                store.transition_ca_keys(&changes, now, event).await?
            }
            Step::Retire { kind, key_id } => {
                let event = audit(&action(kind, "retire"), caller, key_id);
                store
                    .transition_ca_keys(&[(key_id.as_str(), "retiring", "retired")], now, event)
                    .await?
            }
        };
        if took {
            tracing::info!(?step, "key ring changed");
            done += 1;
        }
    }
    Ok(done)
}

/// One check by the lease holder: plan against the stored ring and apply.
pub async fn check(
    store: &Store,
    cfg: &ServerConfig,
    kek: &KeyEncryptionKey,
    caller: &str,
) -> Result<usize, ServerError> {
    let keys = store.ca_keys().await?;
    let mut expiries = Vec::new();
    for k in keys.iter().filter(|k| k.status == "retiring") {
        expiries.push((
            k.key_id.clone(),
            store.last_expiry_signed_by(&k.key_id).await?,
        ));
    }
    let last_expiry = |id: &str| expiries.iter().find(|(k, _)| k == id).and_then(|(_, e)| *e);
    let steps = plan(&keys, &last_expiry, unix_now(), &Schedule::from_config(cfg));
    if steps.is_empty() {
        return Ok(0);
    }
    apply(store, cfg, kek, &steps, caller).await
}

/// Polls the store's change counters (one query): publishes a moved ban
/// sequence to the registration streams, and reloads the key ring if the
/// bundle sequence moved past the one in effect; returns whether it did.
pub async fn refresh(shared: &Shared, kek: &KeyEncryptionKey) -> Result<bool, ServerError> {
    let seq = shared.store.sequences().await?;
    shared.ban_generation.send_if_modified(|bans| {
        let moved = *bans != seq.bans;
        *bans = seq.bans;
        moved
    });
    if let Err(e) = crate::federation::reload_if_moved(shared, seq.federation).await {
        tracing::warn!(error = %e, "federated bundles reload failed");
    }
    if seq.bundle == shared.ca().bundle.sequence {
        return Ok(false);
    }
    let state = authority::load(&shared.store, &shared.config, kek, unix_now()).await?;
    crate::write_bundle_file(&shared.config, &state)?;
    tracing::info!(
        sequence = state.bundle.sequence,
        ca_key = state.ca.key_id(),
        "key ring reloaded"
    );
    shared.set_ca(state);
    Ok(true)
}

/// The replica's background loop: refresh every `ca.bundle_poll`; every
/// `ca.rotation.check_interval`, take (or keep) the lease and rotate.
pub async fn run(shared: Arc<Shared>, kek: Arc<KeyEncryptionKey>, shutdown: watch::Receiver<bool>) {
    let holder = shared.replica_id.clone();
    let caller = format!("server:{holder}");
    let poll = shared.config.ca.bundle_poll;
    let every = shared.config.ca.rotation.check_interval;
    // The lease outlives a few missed checks, not a dead holder for long.
    let lease_ms = (every * 3).as_millis() as i64;
    let mut next_check = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_check {
            next_check += every;
            let now_ms = unix_now().saturating_mul(1000);
            match shared
                .store
                .try_lease(LEASE, &holder, now_ms, lease_ms)
                .await
            {
                Ok(true) => {
                    if let Err(e) = check(&shared.store, &shared.config, &kek, &caller).await {
                        tracing::error!(error = %e, "key rotation check failed");
                    }
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "rotation lease unavailable"),
            }
        }
        if let Err(e) = refresh(&shared, &kek).await {
            tracing::warn!(error = %e, "key ring refresh failed");
        }
        tokio::select! {
            () = tokio::time::sleep(poll.min(every)) => {}
            () = wait_shutdown(shutdown.clone()) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, kind: &str, status: &str, since: i64, nb: i64, na: i64) -> CaKeyRecord {
        CaKeyRecord {
            key_id: id.into(),
            kind: kind.into(),
            status: status.into(),
            cert_der: vec![],
            chain_der: vec![],
            encrypted_key: vec![],
            not_before: nb,
            not_after: na,
            created_at: since,
            status_since: since,
        }
    }

    const SCHEDULE: Schedule = Schedule {
        automatic: true,
        rotate_at: 0.5,
        publish_ahead_s: 100,
        grace_s: 5,
    };

    #[test]
    fn the_next_key_is_prepared_at_the_set_share_of_the_active_keys_life() {
        let ring = [key("a", "x509", "active", 0, 0, 1000)];
        assert!(plan(&ring, &|_| None, 499, &SCHEDULE).is_empty());
        assert_eq!(
            plan(&ring, &|_| None, 500, &SCHEDULE),
            vec![Step::Prepare { kind: "x509" }]
        );
        let manual = Schedule {
            automatic: false,
            ..SCHEDULE
        };
        assert!(plan(&ring, &|_| None, 900, &manual).is_empty());
    }

    #[test]
    fn a_prepared_key_signs_only_after_it_was_published_long_enough() {
        let ring = [
            key("a", "jwt", "active", 0, 0, 1000),
            key("b", "jwt", "prepared", 600, 600, 1600),
        ];
        assert!(
            plan(&ring, &|_| None, 699, &SCHEDULE).is_empty(),
            "no second prepare either"
        );
        assert_eq!(
            plan(&ring, &|_| None, 700, &SCHEDULE),
            vec![Step::Activate {
                kind: "jwt",
                next: "b".into(),
                current: Some("a".into())
            }]
        );
    }

    #[test]
    fn a_retiring_key_stays_published_until_what_it_signed_expired() {
        let ring = [
            key("b", "x509", "active", 700, 600, 1600),
            key("a", "x509", "retiring", 700, 0, 1000),
        ];
        let signed = |id: &str| (id == "a").then_some(760);
        assert!(plan(&ring, &signed, 759, &SCHEDULE).is_empty());
        assert_eq!(
            plan(&ring, &signed, 760, &SCHEDULE),
            vec![Step::Retire {
                kind: "x509",
                key_id: "a".into()
            }]
        );
        // Nothing signed: still the grace for replicas that had not reloaded.
        assert!(plan(&ring, &|_| None, 704, &SCHEDULE).is_empty());
        assert_eq!(plan(&ring, &|_| None, 705, &SCHEDULE).len(), 1);
    }
}
