//! Per-caller rate limiting: a token bucket per source address, checked
//! before any evidence is verified, so a flood from one caller can neither
//! burn the server's CPU on signature checks nor make Herald hammer an
//! issuer's JWKS endpoint; and the aggregation of the refusals into one
//! audit record per caller per interval.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use herald_core::ErrorCode;

/// Most callers tracked at once.
pub const MAX_CALLERS: usize = 65_536;

/// Token buckets keyed by caller address.
pub type RateLimiter = herald_core::rate_limit::RateLimiter<IpAddr>;

/// Writes each caller's counted refusals as one audit record per
/// `rate_limit.report_interval` (and a last time at shutdown).
pub async fn report(
    shared: std::sync::Arc<crate::Shared>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let interval = shared.config.rate_limit.report_interval;
    loop {
        let stop = tokio::select! {
            () = tokio::time::sleep(interval) => false,
            () = crate::wait_shutdown(shutdown.clone()) => true,
        };
        for s in shared.floods.drain() {
            let caller = s
                .caller
                .map_or_else(|| "peer:many".to_owned(), |ip| format!("peer:{ip}"));
            let action = match s.code {
                ErrorCode::RateLimited => "rate_limited",
                _ => "refusals_aggregated",
            };
            let mut event = herald_core::AuditEvent::new(action, caller);
            event.detail = Some(s.detail());
            let event = event.deny(s.code);
            if let Err(e) = shared.store.audit(event).await {
                shared.metrics.record_audit_failure();
                tracing::error!(error = %e, "could not write a refusal summary");
            }
            tracing::warn!(caller = ?s.caller, refusals = s.count, code = %s.code, "refusals audited in aggregate");
        }
        if stop {
            return;
        }
    }
}

/// Most callers whose refusals are aggregated per interval; beyond, the
/// rest are counted under one "many callers" entry.
pub const MAX_FLOODERS: usize = 4_096;

/// Refusals of one caller in the current interval.
#[derive(Debug, Default, Clone)]
struct Flood {
    count: u64,
    first_ms: i64,
    last_ms: i64,
    actions: std::collections::BTreeMap<String, u64>,
}

/// Refusals counted rather than written one by one: those past the
/// caller's rate limit, and those past the server-wide refusal audit
/// budget. Each caller gets one audit record per interval for each of the
/// two: a flood, from one address or many, never becomes a durable write
/// per request.
#[derive(Debug, Default)]
pub struct FloodLog {
    callers: Mutex<HashMap<(Option<IpAddr>, ErrorCode), Flood>>,
}

/// One caller's aggregated refusals, ready to audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FloodSummary {
    /// The caller (`None`: callers beyond [`MAX_FLOODERS`], together).
    pub caller: Option<IpAddr>,
    /// `rate_limited`, or `refusals_aggregated` (refused for their own
    /// reasons, which `actions` names).
    pub code: ErrorCode,
    /// Refusals.
    pub count: u64,
    /// First and last refusal, Unix milliseconds.
    pub window_ms: (i64, i64),
    /// What was asked (and, when aggregated, why it was refused: `action/code`), and how often.
    pub actions: Vec<(String, u64)>,
}

impl FloodSummary {
    /// The audit record's `detail`.
    pub fn detail(&self) -> String {
        let actions: Vec<String> = self
            .actions
            .iter()
            .map(|(a, n)| format!("{a} x{n}"))
            .collect();
        format!(
            "{} refusals between {} and {} (Unix ms): {}",
            self.count,
            self.window_ms.0,
            self.window_ms.1,
            actions.join(", ")
        )
    }
}

impl FloodLog {
    /// Counts one refusal with `code` of `caller` asking for `action` at
    /// `now_ms`: a `rate_limited` one under its action, any other under
    /// `action/code` in the caller's `refusals_aggregated` record.
    pub fn count(
        &self,
        caller: Option<IpAddr>,
        action: &'static str,
        code: ErrorCode,
        now_ms: i64,
    ) {
        let (kind, label) = match code {
            ErrorCode::RateLimited => (ErrorCode::RateLimited, action.to_owned()),
            other => (ErrorCode::RefusalsAggregated, format!("{action}/{other}")),
        };
        let mut map = match self.callers.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        let key = if map.contains_key(&(caller, kind)) || map.len() < MAX_FLOODERS {
            (caller, kind)
        } else {
            (None, kind)
        };
        let f = map.entry(key).or_default();
        if f.count == 0 {
            f.first_ms = now_ms;
        }
        f.count += 1;
        f.last_ms = now_ms;
        *f.actions.entry(label).or_default() += 1;
    }

    /// Takes every caller's refusals counted since the last call.
    pub fn drain(&self) -> Vec<FloodSummary> {
        let map = {
            let mut g = match self.callers.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            std::mem::take(&mut *g)
        };
        let mut out: Vec<FloodSummary> = map
            .into_iter()
            .map(|((caller, code), f)| FloodSummary {
                caller,
                code,
                count: f.count,
                window_ms: (f.first_ms, f.last_ms),
                actions: f.actions.into_iter().collect(),
            })
            .collect();
        out.sort_by_key(|s| (s.caller, s.code.as_str()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floods_are_aggregated_per_caller_and_bounded() {
        let log = FloodLog::default();
        let a: IpAddr = [10, 0, 0, 1].into();
        for i in 0..1000 {
            log.count(
                Some(a),
                if i % 2 == 0 {
                    "x509_svid.mint"
                } else {
                    "exchange.jwt_svid"
                },
                ErrorCode::RateLimited,
                i,
            );
        }
        log.count(
            Some([10, 0, 0, 2].into()),
            "node.attest",
            ErrorCode::RateLimited,
            5,
        );
        // Refused for their own reason, past the server-wide budget: the
        // same caller's other record, by action and code.
        log.count(Some(a), "exchange.jwt_svid", ErrorCode::TokenExpired, 7);
        log.count(Some(a), "exchange.jwt_svid", ErrorCode::TokenExpired, 8);
        let out = log.drain();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].code, ErrorCode::RateLimited);
        assert_eq!(out[0].count, 1000);
        assert_eq!(out[0].window_ms, (0, 999));
        assert_eq!(
            out[0].actions,
            vec![
                ("exchange.jwt_svid".to_owned(), 500),
                ("x509_svid.mint".to_owned(), 500)
            ]
        );
        assert_eq!(out[1].code, ErrorCode::RefusalsAggregated);
        assert_eq!(
            out[1].actions,
            vec![("exchange.jwt_svid/token_expired".to_owned(), 2)]
        );
        assert!(out[0].detail().starts_with("1000 refusals"));
        assert!(log.drain().is_empty(), "drained");
        for i in 0..(MAX_FLOODERS as u32 + 10) {
            log.count(
                Some(IpAddr::from(i.to_be_bytes())),
                "x",
                ErrorCode::RateLimited,
                0,
            );
        }
        let out = log.drain();
        assert_eq!(out.len(), MAX_FLOODERS + 1, "the rest share one entry");
        assert_eq!(out.iter().find(|s| s.caller.is_none()).unwrap().count, 10);
    }
}
