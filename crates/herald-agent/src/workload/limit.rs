//! Per-caller rate limiting for the agent's local endpoints: a token bucket
//! per uid, taken before any attestation work (reading `/proc`, hashing an
//! executable) or any call to the server, so one local process flooding
//! the Workload API or the credentials endpoint neither burns the agent's
//! CPU nor crowds out other callers.
//!
//! Callers are keyed by uid, the principal the kernel vouches for: a pid is
//! free to multiply (fork), a uid is not. Workloads sharing a uid share a
//! budget, so the defaults leave room for many processes.
//!
//! The table is bounded: when full, buckets that have refilled completely
//! (idle callers, indistinguishable from new ones) are dropped; if none
//! has, the new caller is refused rather than the table growing.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

use crate::config::RateLimitConfig;

/// Most callers tracked at once (a node has far fewer uids in use).
pub const MAX_CALLERS: usize = 4096;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets keyed by caller.
#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Copy> RateLimiter<K> {
    /// A limiter for `cfg` (`per_second == 0`: every call is allowed).
    pub fn new(cfg: RateLimitConfig) -> Self {
        Self {
            rate: cfg.per_second,
            burst: f64::from(cfg.burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token for `caller` at `now`; `false` means refuse.
    pub fn allow(&self, caller: K, now: Instant) -> bool {
        if self.rate <= 0.0 {
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
    fn a_caller_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        let l = RateLimiter::new(RateLimitConfig {
            per_second: 10.0,
            burst: 3,
        });
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.allow(0u32, t0)));
        assert!(!l.allow(0, t0), "burst exhausted");
        assert!(l.allow(65534, t0), "another uid is not affected");
        assert!(!l.allow(0, t0 + Duration::from_millis(50)));
        assert!(
            l.allow(0, t0 + Duration::from_millis(120)),
            "refilled at 10/s"
        );
        let off = RateLimiter::new(RateLimitConfig {
            per_second: 0.0,
            burst: 1,
        });
        assert!((0..1000).all(|_| off.allow(0u32, t0)));
    }

    #[test]
    fn the_table_stays_bounded() {
        let l = RateLimiter::new(RateLimitConfig {
            per_second: 1.0,
            burst: 2,
        });
        let t0 = Instant::now();
        for uid in 0..MAX_CALLERS as u32 {
            assert!(l.allow(uid, t0));
        }
        // Every bucket is still draining: a new caller is refused.
        assert!(!l.allow(u32::MAX, t0));
        // Once they have refilled, they make room.
        assert!(l.allow(u32::MAX, t0 + Duration::from_secs(5)));
    }
}
