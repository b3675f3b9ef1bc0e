//! The audit log's hash chain.
//!
//! `hash = SHA-256("herald-audit-v1" ‖ seq (u64 BE) ‖ prev_hash ‖ fields)`,
//! each field as a u32 big-endian length and its bytes (`0xFFFFFFFF` alone
//! for an absent field), in the order: time_ms (8-byte i64 BE), caller,
//! action, evidence_type, evidence_digest, policy, spiffe_id, serial,
//! outcome, reason, and — only when present, so records written before it
//! existed keep their hashes — detail. The first record's `prev_hash` is 32
//! zero bytes.

use aws_lc_rs::digest::{Context, SHA256};
use herald_core::AuditEvent;

/// `prev_hash` of the first record.
pub const GENESIS: [u8; 32] = [0; 32];

fn field(ctx: &mut Context, v: Option<&[u8]>) {
    match v {
        Some(b) => {
            ctx.update(&(b.len() as u32).to_be_bytes());
            ctx.update(b);
        }
        None => ctx.update(&u32::MAX.to_be_bytes()),
    }
}

/// The hash of record `seq` holding `event`, chained to `prev_hash`.
pub fn audit_hash(seq: u64, prev_hash: &[u8; 32], event: &AuditEvent) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(b"herald-audit-v1");
    ctx.update(&seq.to_be_bytes());
    ctx.update(prev_hash);
    field(&mut ctx, Some(&event.time_ms.to_be_bytes()));
    field(&mut ctx, Some(event.caller.as_bytes()));
    field(&mut ctx, Some(event.action.as_bytes()));
    field(&mut ctx, event.evidence_type.map(|e| e.as_str().as_bytes()));
    field(
        &mut ctx,
        event.evidence_digest.as_deref().map(str::as_bytes),
    );
    field(&mut ctx, event.policy.as_deref().map(str::as_bytes));
    field(&mut ctx, event.spiffe_id.as_deref().map(str::as_bytes));
    field(&mut ctx, event.serial.as_deref().map(str::as_bytes));
    field(&mut ctx, Some(event.outcome.as_str().as_bytes()));
    field(&mut ctx, event.reason.map(|r| r.as_str().as_bytes()));
    if let Some(detail) = &event.detail {
        field(&mut ctx, Some(detail.as_bytes()));
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_changes_the_hash_and_absent_differs_from_empty() {
        let base = AuditEvent::new("a", "c");
        let h = audit_hash(1, &GENESIS, &base);
        assert_ne!(h, audit_hash(2, &GENESIS, &base));
        assert_ne!(h, audit_hash(1, &[1; 32], &base));
        let mut e = base.clone();
        e.policy = Some(String::new());
        assert_ne!(h, audit_hash(1, &GENESIS, &e), "empty is not absent");
        let mut e = base.clone();
        e.caller = "ca".into();
        e.action = String::new();
        let mut f = base.clone();
        f.caller = "c".into();
        f.action = "a".into();
        assert_ne!(
            audit_hash(1, &GENESIS, &e),
            audit_hash(1, &GENESIS, &f),
            "fields cannot slide into each other"
        );
        let e = base.clone().deny(herald_core::ErrorCode::JoinTokenUsed);
        assert_ne!(h, audit_hash(1, &GENESIS, &e));
        let mut e = base.clone();
        e.detail = Some(String::new());
        assert_ne!(h, audit_hash(1, &GENESIS, &e), "a detail is hashed");
    }
}
