//! Token buckets per caller, shared by the server (keyed by source
//! address) and the agent (keyed by uid): taken before any work is done for
//! the caller, so one flooding caller neither burns CPU nor crowds out the
//! others.
//!
//! The table is bounded: when it is full, buckets that have refilled
//! completely (callers idle long enough to be indistinguishable from new
//! ones) are dropped; if none has, the new caller is refused rather than
//! the table growing without limit.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Instant;

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
    max_callers: usize,
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: Hash + Eq + Copy> RateLimiter<K> {
    /// `rate` calls per second sustained, `burst` at once (at least 1), at
    /// most `max_callers` tracked; `rate == 0` disables limiting.
    pub fn new(rate: f64, burst: f64, max_callers: usize) -> Self {
        Self {
            rate,
            burst: burst.max(1.0),
            max_callers,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Whether limiting is on.
    pub fn enabled(&self) -> bool {
        self.rate > 0.0
    }

    /// Takes one token for `caller` at `now`; `false` means refuse.
    pub fn allow(&self, caller: K, now: Instant) -> bool {
        if !self.enabled() {
            return true;
        }
        // A panic elsewhere while holding the lock leaves the table
        // consistent (every update is one assignment): keep using it.
        let mut buckets = match self.buckets.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if !buckets.contains_key(&caller) && buckets.len() >= self.max_callers {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
            });
            if buckets.len() >= self.max_callers {
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
        let l = RateLimiter::new(10.0, 3.0, 16);
        let t0 = Instant::now();
        assert!((0..3).all(|_| l.allow(1u32, t0)));
        assert!(!l.allow(1, t0), "burst exhausted");
        assert!(l.allow(2, t0), "another caller is not affected");
        assert!(!l.allow(1, t0 + Duration::from_millis(50)));
        assert!(
            l.allow(1, t0 + Duration::from_millis(120)),
            "refilled at 10/s"
        );
        let off = RateLimiter::new(0.0, 0.0, 16);
        assert!(!off.enabled());
        assert!((0..1000).all(|_| off.allow(1u32, t0)));
    }

    #[test]
    fn the_table_stays_bounded() {
        let max = 64;
        let l = RateLimiter::new(1.0, 2.0, max);
        let t0 = Instant::now();
        for caller in 0..max as u32 {
            assert!(l.allow(caller, t0));
        }
        // Every bucket is still draining: a new caller is refused.
        assert!(!l.allow(u32::MAX, t0));
        // Once they have refilled, they make room.
        assert!(l.allow(u32::MAX, t0 + Duration::from_secs(5)));
    }
}
