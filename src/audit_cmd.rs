//! `herald audit export`: the audit log as JSON lines for a SIEM.

use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use herald_core::AuditEvent;

use crate::cli::CliError;

/// Records fetched per page.
const PAGE: u32 = 5_000;

/// Parses `--since`/`--until`: an RFC 3339 time, or a duration meaning
/// "that long ago" (`24h`, `7days`). Unix milliseconds.
pub fn parse_time(text: &str, now_ms: i64) -> Result<i64, CliError> {
    if let Ok(t) = humantime::parse_rfc3339_weak(text) {
        return t
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .map_err(|_| CliError::new("invalid_request", format!("{text}: before 1970")));
    }
    let ago = humantime::parse_duration(text).map_err(|_| {
        CliError::new(
            "invalid_request",
            format!("{text:?} is neither an RFC 3339 time nor a duration such as 24h"),
        )
    })?;
    Ok(now_ms - ago.as_millis() as i64)
}

/// Now, Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis() as i64
}

/// The credential kind an action concerns, from its name.
pub fn credential_type(action: &str) -> Option<&'static str> {
    if action.starts_with("x509_svid.") || action == "exchange.x509_svid" || action == "node.attest"
    {
        Some("x509_svid")
    } else if action == "exchange.jwt_svid" || action == "jwt_svid.workload" {
        Some("jwt_svid")
    } else if action == "exchange.cloud_credentials" || action == "cloud_credentials.workload" {
        Some("cloud_credentials")
    } else {
        None
    }
}

/// One record as a JSON object with the SIEM field set.
pub fn record_json(seq: u64, e: &AuditEvent, hash: &[u8; 32]) -> serde_json::Value {
    let time = humantime::format_rfc3339_millis(
        UNIX_EPOCH + Duration::from_millis(e.time_ms.max(0) as u64),
    );
    serde_json::json!({
        "seq": seq,
        "time": time.to_string(),
        "caller": e.caller,
        "action": e.action,
        "evidence_type": e.evidence_type.map(|t| t.as_str()),
        "factors": e.evidence_type.map(|t| t.factor_count()),
        "evidence_digest": e.evidence_digest,
        "policy": e.policy,
        "spiffe_id": e.spiffe_id,
        "credential_type": credential_type(&e.action),
        "serial": e.serial,
        "outcome": e.outcome.as_str(),
        "reason": e.reason.map(|r| r.as_str()),
        "detail": e.detail,
        "hash": hex::encode(hash),
    })
}

/// Writes every record in `[since, until)` as JSON lines to stdout.
pub async fn export(
    store: &herald_store::Store,
    since_ms: i64,
    until_ms: i64,
) -> Result<u64, CliError> {
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut after = 0;
    let mut n = 0;
    loop {
        let page = store
            .audit_records_between(since_ms, until_ms, after, PAGE)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in &page {
            writeln!(out, "{}", record_json(r.seq, &r.event, &r.hash))
                .map_err(|e| CliError::new("io", e.to_string()))?;
            n += 1;
        }
    }
    out.flush()
        .map_err(|e| CliError::new("io", e.to_string()))?;
    Ok(n)
}
