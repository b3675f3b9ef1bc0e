//! Kubernetes workload attestation: a second source of selectors beside
//! the Unix one.
//!
//! The caller's pinned process → its `/proc/<pid>/cgroup` (read by the
//! attestor while the process is pinned) → the pod UID and container ID
//! ([`cgroup`]) → the kubelet's pod list ([`kubelet`]) → `k8s:*`
//! selectors. A container the list does not hold yet (the kubelet reports
//! a new container's ID a moment after the runtime starts it) is looked
//! for again in fresh lists, at most `max_attempts` times
//! `retry_interval` apart; a container still missing, listed under
//! another pod, or named inconsistently by the cgroup file gets no
//! identity at all ([`K8sError`]), never the Unix selectors alone.

pub mod cgroup;
pub mod kubelet;

use std::time::Duration;

use herald_core::{ErrorCode, Selector};

use self::cgroup::ContainerRef;
use self::kubelet::{Kubelet, KubeletSettings, Lookup};
use crate::config::KubernetesConfig;

/// Why a caller in a pod gets no identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum K8sError {
    /// The cgroup file names several containers.
    #[error("kubernetes_workload_not_found: {0}")]
    Cgroup(#[from] cgroup::CgroupError),
    /// The container is not in the pod list, after every attempt.
    #[error(
        "kubernetes_workload_not_found: container {container_id} of pod {pod_uid} is not in the kubelet's pod list (looked {attempts} times)"
    )]
    NotListed {
        /// Pod UID from the cgroup.
        pod_uid: String,
        /// Container ID from the cgroup.
        container_id: String,
        /// Lists looked in.
        attempts: u32,
    },
    /// The container is listed under another pod than its cgroup names,
    /// or twice.
    #[error(
        "kubernetes_workload_not_found: container {container_id} is not listed as a container of pod {pod_uid}"
    )]
    Mismatch {
        /// Pod UID from the cgroup.
        pod_uid: String,
        /// Container ID from the cgroup.
        container_id: String,
    },
    /// The pod list could not be read.
    #[error("kubelet_unavailable: {0}")]
    Kubelet(String),
}

impl K8sError {
    /// The stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            K8sError::Kubelet(_) => ErrorCode::KubeletUnavailable,
            _ => ErrorCode::KubernetesWorkloadNotFound,
        }
    }
}

/// Looks callers up in the kubelet's pod list.
#[derive(Debug)]
pub struct K8sAttestor {
    kubelet: Kubelet,
    retry_interval: Duration,
    max_attempts: u32,
}

impl K8sAttestor {
    /// An attestor for `[workload_api.kubernetes]`: reads the CA file now.
    pub fn new(cfg: &KubernetesConfig) -> Result<K8sAttestor, String> {
        let ca_pem = if cfg.skip_kubelet_verification {
            None
        } else {
            Some(std::fs::read(&cfg.kubelet_ca_path).map_err(|e| {
                format!(
                    "workload_api.kubernetes.kubelet_ca_path {}: {e} (or set skip_kubelet_verification = true)",
                    cfg.kubelet_ca_path.display()
                )
            })?)
        };
        let node_name = cfg
            .node_name
            .clone()
            .or_else(|| std::env::var("HERALD_NODE_NAME").ok())
            .filter(|n| !n.is_empty());
        let server_name = cfg
            .kubelet_server_name
            .as_deref()
            .map(|n| match (n, &node_name) {
                ("{node_name}", Some(node)) => Ok(node.clone()),
                ("{node_name}", None) => Err(
                    "kubelet_server_name = \"{node_name}\" needs node_name or HERALD_NODE_NAME"
                        .to_owned(),
                ),
                (n, _) => Ok(n.to_owned()),
            })
            .transpose()?;
        let kubelet = Kubelet::new(KubeletSettings {
            url: cfg.kubelet_url.clone(),
            server_name,
            token_path: cfg.token_path.clone(),
            ca_pem,
            timeout: cfg.timeout,
            cache_ttl: cfg.cache_ttl,
            node_name,
        })?;
        Ok(K8sAttestor {
            kubelet,
            retry_interval: cfg.retry_interval,
            max_attempts: cfg.max_attempts.max(1),
        })
    }

    /// The kubelet client (its counters).
    pub fn kubelet(&self) -> &Kubelet {
        &self.kubelet
    }

    /// The `k8s:*` selectors of a process whose cgroup file reads
    /// `cgroup_text`: none for a process in no pod's container.
    pub async fn selectors(&self, cgroup_text: &str) -> Result<Vec<Selector>, K8sError> {
        match cgroup::parse(cgroup_text)? {
            None => Ok(Vec::new()),
            Some(c) => self.lookup(&c).await,
        }
    }

    /// Finds `c` in the pod list: the cached list while it is fresh, then
    /// newer lists, up to `max_attempts` fetches `retry_interval` apart.
    pub async fn lookup(&self, c: &ContainerRef) -> Result<Vec<Selector>, K8sError> {
        let cached = self.kubelet.current();
        // Past the TTL a cached list answers nothing: the next must be newer.
        let mut seen = cached.as_ref().map(|s| s.generation);
        if let Some(snap) = cached.filter(|s| self.kubelet.is_fresh(s))
            && let Some(s) = self.check(&snap.index, c)?
        {
            return Ok(s);
        }
        let mut last_error = None;
        for attempt in 1..=self.max_attempts {
            match self.kubelet.newer_than(seen).await {
                Ok(snap) => {
                    last_error = None;
                    if let Some(s) = self.check(&snap.index, c)? {
                        return Ok(s);
                    }
                    seen = Some(snap.generation);
                }
                Err(e) => {
                    tracing::warn!(error = %e, attempt, "reading the kubelet's pod list failed");
                    last_error = Some(e);
                }
            }
            if attempt < self.max_attempts {
                tokio::time::sleep(self.retry_interval).await;
            }
        }
        match last_error {
            Some(e) => Err(K8sError::Kubelet(e)),
            None => Err(K8sError::NotListed {
                pod_uid: c.pod_uid.clone(),
                container_id: c.container_id.clone(),
                attempts: self.max_attempts,
            }),
        }
    }

    fn check(
        &self,
        index: &kubelet::PodIndex,
        c: &ContainerRef,
    ) -> Result<Option<Vec<Selector>>, K8sError> {
        match index.lookup(&c.pod_uid, &c.container_id) {
            Lookup::Found(s) => Ok(Some(s)),
            Lookup::Missing => Ok(None),
            Lookup::Mismatch => Err(K8sError::Mismatch {
                pod_uid: c.pod_uid.clone(),
                container_id: c.container_id.clone(),
            }),
        }
    }
}
