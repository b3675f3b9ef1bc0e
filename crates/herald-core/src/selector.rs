//! Workload selectors: facts the agent observes about a caller on its
//! Workload API socket, and the conditions registrations state over them.
//!
//! Text form `kind:value`, e.g. `unix:uid:1000`, `unix:gid:33`,
//! `unix:path:/usr/bin/web`, `unix:sha256:<64 hex>`,
//! `cgroup:/system.slice/web.service`. A registration matches a caller
//! when every one of its selectors is among the caller's.

use std::fmt;

/// One selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Selector {
    /// The caller's user ID (from the socket's peer credentials).
    Uid(u32),
    /// One of the caller's group IDs (primary or supplementary).
    Gid(u32),
    /// The caller's executable, absolute path.
    Path(String),
    /// SHA-256 of the caller's executable, lowercase hex.
    Sha256(String),
    /// The caller's cgroup path (cgroup v2), e.g. a systemd unit or pod.
    Cgroup(String),
}

/// Why a selector is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector {text:?}: {reason}")]
pub struct SelectorError {
    text: String,
    reason: &'static str,
}

impl Selector {
    /// Parses the text form.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        let err = |reason| SelectorError {
            text: text.to_owned(),
            reason,
        };
        let id = |v: &str| v.parse::<u32>().map_err(|_| err("not a numeric ID"));
        if let Some(v) = text.strip_prefix("unix:uid:") {
            return Ok(Selector::Uid(id(v)?));
        }
        if let Some(v) = text.strip_prefix("unix:gid:") {
            return Ok(Selector::Gid(id(v)?));
        }
        if let Some(v) = text.strip_prefix("unix:path:") {
            if !v.starts_with('/') || v.contains('\0') || v.len() > 4096 {
                return Err(err("the path must be absolute"));
            }
            return Ok(Selector::Path(v.to_owned()));
        }
        if let Some(v) = text.strip_prefix("unix:sha256:") {
            if v.len() != 64
                || !v
                    .bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            {
                return Err(err("expected 64 lowercase hex digits"));
            }
            return Ok(Selector::Sha256(v.to_owned()));
        }
        if let Some(v) = text.strip_prefix("cgroup:") {
            if !v.starts_with('/') || v.len() > 4096 {
                return Err(err("the cgroup path must be absolute"));
            }
            return Ok(Selector::Cgroup(v.to_owned()));
        }
        Err(err(
            "unknown kind (unix:uid, unix:gid, unix:path, unix:sha256, cgroup)",
        ))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Uid(v) => write!(f, "unix:uid:{v}"),
            Selector::Gid(v) => write!(f, "unix:gid:{v}"),
            Selector::Path(v) => write!(f, "unix:path:{v}"),
            Selector::Sha256(v) => write!(f, "unix:sha256:{v}"),
            Selector::Cgroup(v) => write!(f, "cgroup:{v}"),
        }
    }
}

/// Whether a caller with `facts` satisfies every selector in `required`.
pub fn matches(required: &[Selector], facts: &[Selector]) -> bool {
    !required.is_empty() && required.iter().all(|r| facts.contains(r))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        for t in [
            "unix:uid:1000",
            "unix:gid:0",
            "unix:path:/usr/bin/web",
            "cgroup:/system.slice/web.service",
            &format!("unix:sha256:{}", "ab".repeat(32)),
        ] {
            assert_eq!(Selector::parse(t).map(|s| s.to_string()).as_deref(), Ok(t));
        }
        for bad in [
            "unix:uid:-1",
            "unix:uid:x",
            "unix:path:relative",
            "unix:sha256:ABCD",
            "k8s:ns:default",
            "",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
        let facts = [Selector::Uid(1), Selector::Gid(2)];
        assert!(matches(&[Selector::Uid(1)], &facts));
        assert!(!matches(&[Selector::Uid(1), Selector::Gid(3)], &facts));
        assert!(!matches(&[], &facts), "no selectors never matches");
    }
}
