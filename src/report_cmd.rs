//! `herald report`: the coverage measures security teams are asked for,
//! computed from the audit log and the issued-credential records.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use herald_core::{AuditEvent, ErrorCode, EvidenceType, Outcome};
use herald_server::metrics::{credential_type, is_evidence_failure};
use serde::Serialize;

use crate::cli::CliError;

/// Audit records read per page.
const PAGE: u32 = 5_000;

/// Requests that tried to get more than the evidence entitles (as opposed
/// to evidence that failed to verify).
fn is_bypass_attempt(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::PolicyDenied
            | ErrorCode::FactorMissing
            | ErrorCode::SpiffeIdEscapesPrefix
            | ErrorCode::CredentialNotGranted
            | ErrorCode::RoleNotGranted
            | ErrorCode::AudienceNotGranted
            | ErrorCode::SessionPolicyTooBroad
            | ErrorCode::CsrRequestsCa
            | ErrorCode::ForeignTrustDomain
            | ErrorCode::SvidRevoked
            | ErrorCode::TtlTooLong
            | ErrorCode::NodeBanned
            | ErrorCode::TpmPcrOffPolicy
            | ErrorCode::TpmFirmwareRefused
            | ErrorCode::JoinTokenWrongPurpose
            | ErrorCode::CredentialNotRenewable
            | ErrorCode::LineageTooOld
            | ErrorCode::ReattestationRequired
            | ErrorCode::SvidRecordMismatch
            | ErrorCode::NodeUnknown
            | ErrorCode::WorkloadNotRegistered
    )
}

/// Per evidence method.
#[derive(Debug, Default, Serialize)]
pub struct MethodStats {
    /// Requests presenting this evidence.
    pub attempts: u64,
    /// Of which the evidence verified.
    pub verified: u64,
    /// verified / attempts.
    pub success_rate: f64,
}

/// Lifetimes of one credential kind, seconds.
#[derive(Debug, Default, Serialize)]
pub struct TtlStats {
    /// Credentials issued.
    pub count: usize,
    /// Shortest.
    pub min_s: i64,
    /// Median.
    pub p50_s: i64,
    /// 90th percentile.
    pub p90_s: i64,
    /// Longest.
    pub max_s: i64,
}

/// One break-glass use.
#[derive(Debug, Serialize)]
pub struct BreakGlass {
    /// When.
    pub time: String,
    /// Who asked.
    pub caller: String,
    /// The identity issued.
    pub spiffe_id: Option<String>,
    /// The credential.
    pub serial: Option<String>,
    /// The reason recorded when the token was created.
    pub reason: Option<String>,
    /// Who created the token.
    pub token_created_by: Option<String>,
    /// The token's hash (hex), to find its record.
    #[serde(skip)]
    token_hash: Option<String>,
}

/// The report.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Window start.
    pub since: String,
    /// Window end.
    pub until: String,
    /// Credential requests decided in the window.
    pub requests: u64,
    /// Of which granted.
    pub issued: u64,
    /// Of which refused.
    pub refused: u64,
    /// Of which failed on Herald's side.
    pub errors: u64,
    /// errors / requests.
    pub issuance_error_rate: f64,
    /// Requests whose evidence verified / requests.
    pub authentication_success_rate: f64,
    /// Issuances backed by hardware attestation or by several independent
    /// factors / issuances (machine-MFA enforcement).
    pub mfa_enforcement_rate: f64,
    /// Issuances backed by hardware attestation (TPM) / issuances.
    pub hardware_backed_rate: f64,
    /// Evidence verification by method.
    pub attestation_by_method: BTreeMap<String, MethodStats>,
    /// Lifetimes of credentials issued in the window, by kind.
    pub ttl_distribution: BTreeMap<String, TtlStats>,
    /// X.509 SVIDs whose validity ended in the window.
    pub rotation_due: u64,
    /// Of which renewed before they expired.
    pub rotated_in_time: u64,
    /// rotated_in_time / rotation_due.
    pub rotation_compliance: f64,
    /// Replayed single-use evidence (OIDC jti, join tokens).
    pub replay_attempts: u64,
    /// Requests for more than the evidence allows (policy, prefix escape,
    /// ungranted role/audience/kind, CA requests, revoked or foreign SVIDs).
    pub bypass_attempts: u64,
    /// Credentials issued on a join token alone.
    pub break_glass: Vec<BreakGlass>,
}

fn rate(n: u64, d: u64) -> f64 {
    if d == 0 { 0.0 } else { n as f64 / d as f64 }
}

fn rfc3339_ms(ms: i64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64))
        .to_string()
}

/// Computes the report from audit events and credential records.
pub fn compute(
    since_ms: i64,
    until_ms: i64,
    events: &[AuditEvent],
    lifetimes: &[(String, i64, i64)],
    rotations: &[(String, String, i64, Option<i64>)],
) -> Report {
    let mut r = Report {
        since: rfc3339_ms(since_ms),
        until: rfc3339_ms(until_ms),
        requests: 0,
        issued: 0,
        refused: 0,
        errors: 0,
        issuance_error_rate: 0.0,
        authentication_success_rate: 0.0,
        mfa_enforcement_rate: 0.0,
        hardware_backed_rate: 0.0,
        attestation_by_method: BTreeMap::new(),
        ttl_distribution: BTreeMap::new(),
        rotation_due: 0,
        rotated_in_time: 0,
        rotation_compliance: 0.0,
        replay_attempts: 0,
        bypass_attempts: 0,
        break_glass: Vec::new(),
    };
    let (mut authenticated, mut multi_factor, mut hardware) = (0, 0, 0);
    for e in events {
        if credential_type(&e.action) == "other" {
            continue;
        }
        r.requests += 1;
        let evidence_failed = e.reason.is_some_and(is_evidence_failure);
        if !evidence_failed {
            authenticated += 1;
        }
        match e.outcome {
            Outcome::Success => r.issued += 1,
            Outcome::Denied => r.refused += 1,
            Outcome::Error => r.errors += 1,
        }
        let method = e.evidence_type.map_or("none", EvidenceType::as_str);
        let m = r
            .attestation_by_method
            .entry(method.to_string())
            .or_default();
        m.attempts += 1;
        if !evidence_failed && e.outcome != Outcome::Error {
            m.verified += 1;
        }
        if let Some(code) = e.reason {
            if matches!(
                code,
                ErrorCode::TokenReplayed | ErrorCode::JoinTokenUsed | ErrorCode::TpmNonceReplayed
            ) {
                r.replay_attempts += 1;
            }
            if is_bypass_attempt(code) {
                r.bypass_attempts += 1;
            }
        }
        if e.outcome == Outcome::Success {
            if e.evidence_type
                .is_some_and(|t| t.factor_count() > 1 || t.is_hardware_backed())
            {
                multi_factor += 1;
            }
            if e.evidence_type.is_some_and(|t| t.is_hardware_backed()) {
                hardware += 1;
            }
            if e.evidence_type == Some(EvidenceType::BreakGlass) {
                r.break_glass.push(BreakGlass {
                    time: rfc3339_ms(e.time_ms),
                    caller: e.caller.clone(),
                    spiffe_id: e.spiffe_id.clone(),
                    serial: e.serial.clone(),
                    reason: None,
                    token_created_by: None,
                    token_hash: e.evidence_digest.clone(),
                });
            }
        }
    }
    for m in r.attestation_by_method.values_mut() {
        m.success_rate = rate(m.verified, m.attempts);
    }
    r.issuance_error_rate = rate(r.errors, r.requests);
    r.authentication_success_rate = rate(authenticated, r.requests);
    r.hardware_backed_rate = rate(hardware, r.issued);
    r.mfa_enforcement_rate = rate(multi_factor, r.issued);

    let mut by_kind: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for (kind, nb, na) in lifetimes {
        by_kind.entry(kind.clone()).or_default().push(na - nb);
    }
    for (kind, mut ttls) in by_kind {
        ttls.sort_unstable();
        let at = |p: f64| ttls[((ttls.len() - 1) as f64 * p).round() as usize];
        r.ttl_distribution.insert(
            kind,
            TtlStats {
                count: ttls.len(),
                min_s: ttls[0],
                p50_s: at(0.5),
                p90_s: at(0.9),
                max_s: ttls[ttls.len() - 1],
            },
        );
    }
    r.rotation_due = rotations.len() as u64;
    r.rotated_in_time = rotations
        .iter()
        .filter(|(_, _, not_after, renewed)| renewed.is_some_and(|t| t < *not_after))
        .count() as u64;
    r.rotation_compliance = rate(r.rotated_in_time, r.rotation_due);
    r
}

/// Reads the window from the store and computes the report.
pub async fn build(
    store: &herald_store::Store,
    since_ms: i64,
    until_ms: i64,
) -> Result<Report, CliError> {
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let page = store
            .audit_records_between(since_ms, until_ms, after, PAGE)
            .await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        events.extend(page.into_iter().map(|r| r.event));
    }
    let (since_s, until_s) = (since_ms.div_euclid(1000), until_ms.div_euclid(1000));
    let lifetimes = store.issued_lifetimes(since_s, until_s).await?;
    let rotations = store.rotation_outcomes(since_s, until_s).await?;
    let mut report = compute(since_ms, until_ms, &events, &lifetimes, &rotations);
    // Who opened the glass, and why: the token's record, not the request.
    for use_ in &mut report.break_glass {
        let Some(hash) = use_
            .token_hash
            .as_deref()
            .and_then(|h| <[u8; 32]>::try_from(hex::decode(h).ok()?).ok())
        else {
            continue;
        };
        if let Some(token) = store.join_token(&hash).await? {
            use_.reason = token.reason;
            use_.token_created_by = Some(token.created_by);
        }
    }
    Ok(report)
}

fn pct(x: f64) -> String {
    format!("{:.1} %", x * 100.0)
}

/// `rate` as a percentage of `of` cases, or "n/a" when there were none: a
/// measure with nothing to measure is not 0 %.
fn measured(rate: f64, of: u64) -> String {
    if of == 0 { "n/a".to_owned() } else { pct(rate) }
}

/// The report as a text table.
pub fn to_text(r: &Report) -> String {
    let mut s = format!("Herald coverage report, {} .. {}\n\n", r.since, r.until);
    let rows = [
        ("credential requests", r.requests.to_string()),
        ("  issued", r.issued.to_string()),
        ("  refused", r.refused.to_string()),
        ("  errors", r.errors.to_string()),
        (
            "machine-MFA enforcement (issued with >1 factor or hardware)",
            measured(r.mfa_enforcement_rate, r.issued),
        ),
        (
            "hardware-backed issuance",
            measured(r.hardware_backed_rate, r.issued),
        ),
        (
            "authentication success rate",
            measured(r.authentication_success_rate, r.requests),
        ),
        (
            "issuance error rate",
            measured(r.issuance_error_rate, r.requests),
        ),
        (
            "rotation compliance (renewed before expiry)",
            format!(
                "{} ({} of {})",
                measured(r.rotation_compliance, r.rotation_due),
                r.rotated_in_time,
                r.rotation_due
            ),
        ),
        ("replay attempts", r.replay_attempts.to_string()),
        ("bypass attempts", r.bypass_attempts.to_string()),
        ("break-glass uses", r.break_glass.len().to_string()),
    ];
    for (k, v) in rows {
        s.push_str(&format!("{k:<62} {v:>16}\n"));
    }
    s.push_str("\nattestation by method                                          attempts  verified   rate\n");
    for (m, st) in &r.attestation_by_method {
        s.push_str(&format!(
            "  {m:<60} {:>8} {:>9} {:>7}\n",
            st.attempts,
            st.verified,
            measured(st.success_rate, st.attempts)
        ));
    }
    s.push_str("\ncredential lifetimes (s)                                          count    min    p50    p90    max\n");
    for (k, t) in &r.ttl_distribution {
        s.push_str(&format!(
            "  {k:<60} {:>8} {:>6} {:>6} {:>6} {:>6}\n",
            t.count, t.min_s, t.p50_s, t.p90_s, t.max_s
        ));
    }
    if !r.break_glass.is_empty() {
        s.push_str("\nbreak-glass uses\n");
        for b in &r.break_glass {
            s.push_str(&format!(
                "  {}  {}  {}  serial {}  token by {}: {}\n",
                b.time,
                b.caller,
                b.spiffe_id.as_deref().unwrap_or("-"),
                b.serial.as_deref().unwrap_or("-"),
                b.token_created_by.as_deref().unwrap_or("-"),
                b.reason.as_deref().unwrap_or("-")
            ));
        }
    }
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One horizontal bar (inline SVG) for a rate in 0..=1.
fn bar(label: &str, rate: f64, of: u64, detail: &str) -> String {
    let shown = measured(rate, of);
    let rate = if of == 0 { 0.0 } else { rate };
    let w = (rate.clamp(0.0, 1.0) * 300.0).round();
    let colour = if rate >= 0.95 {
        "#2e7d32"
    } else if rate >= 0.8 {
        "#f9a825"
    } else {
        "#c62828"
    };
    format!(
        "<tr><th>{}</th><td><svg width=\"300\" height=\"14\" role=\"img\" aria-label=\"{}\"><rect width=\"300\" height=\"14\" fill=\"#eee\"/><rect width=\"{w}\" height=\"14\" fill=\"{colour}\"/></svg></td><td>{}</td><td>{}</td></tr>\n",
        escape(label),
        shown,
        shown,
        escape(detail)
    )
}

/// The report as one self-contained HTML page (inline SVG charts, no
/// scripts, no external resources): something to attach to an audit.
pub fn to_html(r: &Report) -> String {
    let mut s = String::from(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Herald coverage report</title>\n<style>body{font:14px system-ui,sans-serif;margin:2em;max-width:60em}table{border-collapse:collapse;margin:1em 0}th,td{padding:.3em .8em;text-align:left;border-bottom:1px solid #ddd}th{font-weight:600}td.n{text-align:right}</style></head><body>\n",
    );
    s.push_str(&format!(
        "<h1>Herald coverage report</h1>\n<p>{} .. {}</p>\n",
        escape(&r.since),
        escape(&r.until)
    ));
    s.push_str("<h2>Measures</h2>\n<table>\n");
    s.push_str(&bar(
        "machine-MFA enforcement",
        r.mfa_enforcement_rate,
        r.issued,
        "issued with more than one factor or hardware evidence",
    ));
    s.push_str(&bar(
        "hardware-backed issuance",
        r.hardware_backed_rate,
        r.issued,
        "TPM-attested",
    ));
    s.push_str(&bar(
        "authentication success",
        r.authentication_success_rate,
        r.requests,
        "evidence verified",
    ));
    s.push_str(&bar(
        "rotation compliance",
        r.rotation_compliance,
        r.rotation_due,
        &format!(
            "{} of {} renewed before expiry",
            r.rotated_in_time, r.rotation_due
        ),
    ));
    s.push_str(&bar(
        "issuance without error",
        1.0 - r.issuance_error_rate,
        r.requests,
        &format!("{} errors", r.errors),
    ));
    s.push_str("</table>\n<h2>Counts</h2>\n<table>\n");
    for (k, v) in [
        ("credential requests", r.requests),
        ("issued", r.issued),
        ("refused", r.refused),
        ("errors", r.errors),
        ("replay attempts", r.replay_attempts),
        ("bypass attempts", r.bypass_attempts),
        ("break-glass uses", r.break_glass.len() as u64),
    ] {
        s.push_str(&format!("<tr><th>{k}</th><td class=\"n\">{v}</td></tr>\n"));
    }
    s.push_str("</table>\n<h2>Attestation by method</h2>\n<table>\n");
    for (m, st) in &r.attestation_by_method {
        s.push_str(&bar(
            m,
            st.success_rate,
            st.attempts,
            &format!("{} of {} verified", st.verified, st.attempts),
        ));
    }
    s.push_str("</table>\n<h2>Credential lifetimes (seconds)</h2>\n<table><tr><th>kind</th><th>count</th><th>min</th><th>p50</th><th>p90</th><th>max</th></tr>\n");
    for (k, t) in &r.ttl_distribution {
        s.push_str(&format!(
            "<tr><th>{}</th><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td></tr>\n",
            escape(k),
            t.count,
            t.min_s,
            t.p50_s,
            t.p90_s,
            t.max_s
        ));
    }
    s.push_str("</table>\n");
    if !r.break_glass.is_empty() {
        s.push_str("<h2>Break-glass uses</h2>\n<table><tr><th>time</th><th>caller</th><th>SPIFFE ID</th><th>serial</th><th>token created by</th><th>reason</th></tr>\n");
        for b in &r.break_glass {
            s.push_str(&format!(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>\n",
                escape(&b.time),
                escape(&b.caller),
                escape(b.spiffe_id.as_deref().unwrap_or("-")),
                escape(b.serial.as_deref().unwrap_or("-")),
                escape(b.token_created_by.as_deref().unwrap_or("-")),
                escape(b.reason.as_deref().unwrap_or("-"))
            ));
        }
        s.push_str("</table>\n");
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_measure_with_nothing_to_measure_is_not_zero_percent() {
        let empty = compute(0, 1000, &[], &[], &[]);
        let text = to_text(&empty);
        let line = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(name))
                .unwrap_or_default()
                .to_owned()
        };
        assert!(
            line("rotation compliance").contains("n/a (0 of 0)"),
            "{text}"
        );
        assert!(line("machine-MFA enforcement").ends_with("n/a"), "{text}");
        assert!(!text.contains("0.0 %"), "{text}");
        assert!(!to_html(&empty).contains("0.0 %"));
        // With something to measure, the figure is shown.
        let rotated = compute(
            0,
            1000,
            &[],
            &[],
            &[("a".into(), "x509_svid".into(), 10, Some(5))],
        );
        assert!(to_text(&rotated).contains("100.0 % (1 of 1)"));
    }
}
