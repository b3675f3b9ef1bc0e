//! This replica's heartbeat in the shared database: what it serves — the
//! trust bundle's sequence and the policy set in effect — recorded every
//! [`HEARTBEAT`] and at once whenever either changes, so `herald replicas`
//! shows whether every replica has caught up after a rotation or a policy
//! change. A replica serves from its own memory; this is how an operator
//! sees that those memories agree.

use std::sync::Arc;
use std::time::Duration;

use herald_store::ReplicaRecord;
use tokio::sync::watch;

use crate::{Shared, unix_now, wait_shutdown};

/// How often a replica records itself when nothing changes.
pub const HEARTBEAT: Duration = Duration::from_secs(10);
/// A replica not seen for this long is listed as stale.
pub const STALE_AFTER: Duration = Duration::from_secs(30);
/// Rows of replicas not seen for this long are deleted (by any replica).
const FORGET_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);

/// A name for this process: host, pid and a random part (a restarted
/// replica is a new one).
pub fn new_id() -> String {
    format!(
        "{}:{}:{:08x}",
        std::env::var("HOSTNAME").unwrap_or_else(|_| "herald".into()),
        std::process::id(),
        rand::random::<u32>()
    )
}

/// What this replica serves now.
fn record(shared: &Shared, address: &str, started_at: i64) -> ReplicaRecord {
    let (policy_digest, policy_generation) = shared.policy_digest();
    ReplicaRecord {
        replica_id: shared.replica_id.clone(),
        address: address.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at,
        last_seen_ms: unix_now().saturating_mul(1000),
        bundle_sequence: shared.ca().bundle.sequence,
        policy_digest,
        policy_generation,
    }
}

/// Records this replica every [`HEARTBEAT`] and whenever its key ring or
/// policy set changes, until shutdown.
pub async fn run(shared: Arc<Shared>, address: String, shutdown: watch::Receiver<bool>) {
    let started_at = unix_now();
    let mut ring = shared.ring_generation.subscribe();
    let mut policies = shared.policy_generation.subscribe();
    let mut beats = 0u64;
    loop {
        if let Err(e) = shared
            .store
            .record_replica(&record(&shared, &address, started_at))
            .await
        {
            tracing::warn!(error = %e, "replica heartbeat failed");
        }
        // Now and then, clear out replicas long gone.
        if beats.is_multiple_of(360) {
            let before = unix_now()
                .saturating_sub(FORGET_AFTER.as_secs() as i64)
                .saturating_mul(1000);
            if let Err(e) = shared.store.forget_replicas(before).await {
                tracing::warn!(error = %e, "forgetting old replicas failed");
            }
        }
        beats += 1;
        tokio::select! {
            () = tokio::time::sleep(HEARTBEAT) => {}
            r = ring.changed() => if r.is_err() { return },
            r = policies.changed() => if r.is_err() { return },
            () = wait_shutdown(shutdown.clone()) => return,
        }
    }
}
