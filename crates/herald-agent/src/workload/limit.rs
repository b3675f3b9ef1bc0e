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
//! The buckets are `herald_core::rate_limit`'s, as the server's.

use crate::config::RateLimitConfig;

/// Most callers tracked at once (a node has far fewer uids in use).
pub const MAX_CALLERS: usize = 4096;

/// Token buckets keyed by uid.
pub type RateLimiter = herald_core::rate_limit::RateLimiter<u32>;

/// The limiter `cfg` describes (`per_second == 0`: every call is allowed).
pub fn limiter(cfg: RateLimitConfig) -> RateLimiter {
    RateLimiter::new(cfg.per_second, f64::from(cfg.burst), MAX_CALLERS)
}
