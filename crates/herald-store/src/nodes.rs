//! The node registry: which TPM (by EK) holds which node identity, the
//! counters of its last quote, and whether it is banned.
//!
//! Every rule that must hold across concurrent attestations and replicas —
//! one identity per EK and one EK per identity, counters that never go
//! backwards, bans — is decided inside one write transaction that also
//! records the issued node SVID and the audit record, so an attestation
//! either lands whole or leaves only its refusal in the audit log.

/// `NodeRecord::last_quote_result` of an accepted quote (anything else is
/// the refusal's code).
pub const QUOTE_OK: &str = "ok";

use herald_core::ErrorCode;

/// A node's standing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeStatus {
    /// May attest and renew.
    Active,
    /// Refused from the ban on.
    Banned,
}

impl NodeStatus {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            NodeStatus::Active => "active",
            NodeStatus::Banned => "banned",
        }
    }
}

/// A registered node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    /// Hex SHA-256 of the EK public area.
    pub ek_hash: String,
    /// The node's SPIFFE ID.
    pub spiffe_id: String,
    /// Hex TPM name of the attestation key last used.
    pub ak_name: String,
    /// The policy that admitted it last.
    pub policy: String,
    /// Active or banned.
    pub status: NodeStatus,
    /// TPM reset counter at the last attestation.
    pub reset_count: u32,
    /// TPM restart counter at the last attestation.
    pub restart_count: u32,
    /// TPM firmware version at the last attestation.
    pub firmware_version: u64,
    /// The golden PCR set the last quote matched.
    pub golden_set: Option<String>,
    /// First attestation, Unix seconds.
    pub enrolled_at: i64,
    /// Last successful attestation, Unix seconds.
    pub last_attested_at: i64,
    /// Successful attestations so far.
    pub attestations: i64,
    /// When it was banned, Unix seconds.
    pub banned_at: Option<i64>,
    /// Who banned it.
    pub banned_by: Option<String>,
    /// Why.
    pub ban_reason: Option<String>,
    /// TPM clock (ms) of the last accepted quote.
    pub quote_clock: u64,
    /// When its last quote was checked, Unix seconds (accepted or not).
    pub last_quote_at: Option<i64>,
    /// How that ended: `ok` or the refusal's stable code.
    pub last_quote_result: Option<String>,
}

/// A verified attestation to record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAttestation {
    /// Hex SHA-256 of the EK public area.
    pub ek_hash: String,
    /// The SPIFFE ID policy built for it.
    pub spiffe_id: String,
    /// Hex TPM name of the AK.
    pub ak_name: String,
    /// The admitting policy.
    pub policy: String,
    /// From the quote.
    pub reset_count: u32,
    /// From the quote.
    pub restart_count: u32,
    /// From the quote: the TPM clock, milliseconds.
    pub clock: u64,
    /// From the quote.
    pub firmware_version: u64,
    /// The golden set matched.
    pub golden_set: Option<String>,
    /// Now, Unix seconds.
    pub now_s: i64,
}

/// The outcome of [`Store::commit_node_attestation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeCommitted {
    /// The node record, the issued SVID and the audit record were written.
    Done(Box<NodeRecord>),
    /// Refused with this code; only the refusal's audit record was written.
    Refused(ErrorCode),
}

/// Which unexpired credentials to revoke (all given conditions hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationFilter {
    /// Issued to this SPIFFE ID.
    pub spiffe_id: Option<String>,
    /// Granted by this policy.
    pub policy: Option<String>,
    /// Issued at or after (Unix seconds).
    pub issued_after: Option<i64>,
    /// Issued before (Unix seconds).
    pub issued_before: Option<i64>,
}

/// The `ak_name` prefix of a node whose identity is bound to its agent's
/// key (an AWS instance: its identity document is no one-time credential,
/// so the first agent key to enrol it is the only one that may again,
/// until an operator resets the node).
pub const AGENT_KEY_PREFIX: &str = "agent-key:";

/// Why a known node's new attestation is refused, if it is.
pub(crate) fn check_existing(old: &NodeRecord, att: &NodeAttestation) -> Option<ErrorCode> {
    if old.status == NodeStatus::Banned {
        return Some(ErrorCode::NodeBanned);
    }
    if old.ak_name.starts_with(AGENT_KEY_PREFIX) && old.ak_name != att.ak_name {
        return Some(ErrorCode::NodeAgentKeyChanged);
    }
    // resetCount grows with every TPM Reset (reboot) and restartCount with
    // every Restart/Resume in between, so the pair only moves forward.
    if (att.reset_count, att.restart_count) < (old.reset_count, old.restart_count) {
        return Some(ErrorCode::TpmCounterRollback);
    }
    // Clock only goes back across a TPM Reset (a power loss restores it
    // from NV, and resetCount moves then): within one reset it is monotonic.
    if att.reset_count == old.reset_count && att.clock < old.quote_clock {
        return Some(ErrorCode::TpmCounterRollback);
    }
    None
}
