//! Workload selectors: facts the agent observes about a caller on its
//! Workload API socket, and the conditions registrations state over them.
//!
//! Text form `kind:value`, e.g. `unix:uid:1000`, `unix:gid:33`,
//! `unix:path:/usr/bin/web`, `unix:sha256:<64 hex>`,
//! `cgroup:/system.slice/web.service`, and for callers in Kubernetes pods
//! `k8s:ns:prod`, `k8s:sa:web`, `k8s:pod-name:web-7d4b9`,
//! `k8s:pod-uid:<uid>`, `k8s:pod-label:app:web`, `k8s:container-name:app`,
//! `k8s:container-image:docker.io/library/nginx@sha256:<64 hex>`,
//! `k8s:node-name:node-1`. A registration matches a caller when every one
//! of its selectors is among the caller's.

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
    /// The namespace of the caller's pod (`k8s:ns`).
    K8sNamespace(String),
    /// The service account of the caller's pod (`k8s:sa`).
    K8sServiceAccount(String),
    /// The name of the caller's pod (`k8s:pod-name`).
    K8sPodName(String),
    /// The UID of the caller's pod (`k8s:pod-uid`).
    K8sPodUid(String),
    /// One label of the caller's pod, key and value (`k8s:pod-label:K:V`).
    K8sPodLabel(String, String),
    /// The name of the caller's container in its pod (`k8s:container-name`).
    K8sContainerName(String),
    /// The caller's container image as the kubelet reports it: the image
    /// reference, and separately the resolved image ID with its digest
    /// (`k8s:container-image`; a caller holds both).
    K8sContainerImage(String),
    /// The node the caller's pod runs on (`k8s:node-name`).
    K8sNodeName(String),
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
        if let Some(rest) = text.strip_prefix("k8s:") {
            return parse_k8s(rest).map_err(err);
        }
        Err(err(
            "unknown kind (unix:uid, unix:gid, unix:path, unix:sha256, cgroup, k8s:ns, k8s:sa, k8s:pod-name, k8s:pod-uid, k8s:pod-label, k8s:container-name, k8s:container-image, k8s:node-name)",
        ))
    }
}

/// Longest Kubernetes selector value (a label value is at most 63
/// characters, an image reference with its digest a few hundred).
const MAX_K8S_VALUE: usize = 1024;

fn parse_k8s(rest: &str) -> Result<Selector, &'static str> {
    let (kind, value) = rest.split_once(':').ok_or("expected k8s:<kind>:<value>")?;
    if value.is_empty() || value.len() > MAX_K8S_VALUE || value.chars().any(char::is_control) {
        return Err(
            "a k8s selector needs a value (at most 1024 characters, no control characters)",
        );
    }
    let v = value.to_owned();
    Ok(match kind {
        "ns" => Selector::K8sNamespace(v),
        "sa" => Selector::K8sServiceAccount(v),
        "pod-name" => Selector::K8sPodName(v),
        "pod-uid" => Selector::K8sPodUid(v),
        "pod-label" => {
            // Label keys (`[prefix/]name`) hold no ':'; the value may be empty.
            let (k, v) = value
                .split_once(':')
                .ok_or("expected k8s:pod-label:<key>:<value>")?;
            if k.is_empty() {
                return Err("a pod label selector needs a key");
            }
            Selector::K8sPodLabel(k.to_owned(), v.to_owned())
        }
        "container-name" => Selector::K8sContainerName(v),
        "container-image" => Selector::K8sContainerImage(v),
        "node-name" => Selector::K8sNodeName(v),
        _ => {
            return Err(
                "unknown k8s kind (ns, sa, pod-name, pod-uid, pod-label, container-name, container-image, node-name)",
            );
        }
    })
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Selector::Uid(v) => write!(f, "unix:uid:{v}"),
            Selector::Gid(v) => write!(f, "unix:gid:{v}"),
            Selector::Path(v) => write!(f, "unix:path:{v}"),
            Selector::Sha256(v) => write!(f, "unix:sha256:{v}"),
            Selector::Cgroup(v) => write!(f, "cgroup:{v}"),
            Selector::K8sNamespace(v) => write!(f, "k8s:ns:{v}"),
            Selector::K8sServiceAccount(v) => write!(f, "k8s:sa:{v}"),
            Selector::K8sPodName(v) => write!(f, "k8s:pod-name:{v}"),
            Selector::K8sPodUid(v) => write!(f, "k8s:pod-uid:{v}"),
            Selector::K8sPodLabel(k, v) => write!(f, "k8s:pod-label:{k}:{v}"),
            Selector::K8sContainerName(v) => write!(f, "k8s:container-name:{v}"),
            Selector::K8sContainerImage(v) => write!(f, "k8s:container-image:{v}"),
            Selector::K8sNodeName(v) => write!(f, "k8s:node-name:{v}"),
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
            "k8s:ns:default",
            "k8s:sa:web",
            "k8s:pod-name:web-7d4b9c-x2x9z",
            "k8s:pod-uid:1b4c3d2e-5f6a-7b8c-9d0e-1f2a3b4c5d6e",
            "k8s:pod-label:app.kubernetes.io/name:web",
            "k8s:pod-label:tier:",
            "k8s:container-name:app",
            "k8s:container-image:docker.io/library/nginx:1.25",
            &format!(
                "k8s:container-image:docker.io/library/nginx@sha256:{}",
                "ab".repeat(32)
            ),
            "k8s:node-name:node-1",
        ] {
            assert_eq!(Selector::parse(t).map(|s| s.to_string()).as_deref(), Ok(t));
        }
        for bad in [
            "unix:uid:-1",
            "unix:uid:x",
            "unix:path:relative",
            "unix:sha256:ABCD",
            "k8s:namespace:default",
            "k8s:ns:",
            "k8s:ns",
            "k8s:pod-label:app",
            "k8s:pod-label::web",
            "k8s:sa:a\nb",
            "",
        ] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
        let facts = [Selector::Uid(1), Selector::Gid(2)];
        assert!(matches(&[Selector::Uid(1)], &facts));
        assert!(!matches(&[Selector::Uid(1), Selector::Gid(3)], &facts));
        assert!(!matches(&[], &facts), "no selectors never matches");
        assert_eq!(
            Selector::parse("k8s:pod-label:app:web:v2"),
            Ok(Selector::K8sPodLabel("app".into(), "web:v2".into())),
            "the value may hold ':'; the key may not"
        );
    }
}
