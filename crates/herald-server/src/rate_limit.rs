//! Per-caller rate limiting: a token bucket per source address, checked
//! before any evidence is verified, so a flood from one caller can neither
//! burn the server's CPU on signature checks nor make Herald hammer an
//! issuer's JWKS endpoint.
//!
//! The table is bounded: when it is full, buckets that have refilled
//! completely (callers idle long enough to be indistinguishable from new
//! ones) are dropped; if none has, the new caller is refused rather than
//! the table growing without limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

/// Most callers tracked at once.
pub const MAX_CALLERS: usize = 65_536;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets keyed by caller address.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl RateLimiter {
    /// `rate` requests per second sustained, `burst` at once; `rate == 0`
    /// disables limiting.
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst: burst.max(1.0),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether limiting is on.
    pub fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// Takes one token for `caller` at `now`; `false` means refuse.
    pub fn allow(&self, caller: IpAddr, now: Instant) -> bool {
        if !self.enabled() {
            return true;
        }
        let mut buckets = match self.buckets.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if !buckets.contains_key(&caller) && buckets.len() >= MAX_CALLERS {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
            });
            if buckets.len() >= MAX_CALLERS {
                return false;
            }
        }
        let b = buckets.entry(caller).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bursts_then_refills_per_caller() {
        let l = RateLimiter::new(10.0, 3.0);
        let a: IpAddr = [10, 0, 0, 1].into();
        let b: IpAddr = [10, 0, 0, 2].into();
        let t0 = Instant::now();
        assert!(l.allow(a, t0) && l.allow(a, t0) && l.allow(a, t0));
        assert!(!l.allow(a, t0), "burst exhausted");
        assert!(l.allow(b, t0), "another caller is not affected");
        assert!(!l.allow(a, t0 + Duration::from_millis(50)));
        assert!(
            l.allow(a, t0 + Duration::from_millis(120)),
            "refilled at 10/s"
        );
        let off = RateLimiter::new(0.0, 0.0);
        assert!((0..1000).all(|_| off.allow(a, t0)));
    }
}
