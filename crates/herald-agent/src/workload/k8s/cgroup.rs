//! Which pod and container a process runs in, from `/proc/<pid>/cgroup`.
//!
//! The kubelet places every container of a pod under the pod's cgroup,
//! named after the pod UID, and the runtime names the container's cgroup
//! after the container ID. The layouts differ by cgroup version, cgroup
//! driver and runtime:
//!
//! | driver | pod segment | container segment |
//! |---|---|---|
//! | systemd | `kubepods-burstable-pod1b4c3d2e_5f6a_….slice` (`-` of the UID as `_`) | `cri-containerd-<id>.scope`, `crio-<id>.scope`, `docker-<id>.scope` |
//! | cgroupfs | `pod1b4c3d2e-5f6a-…` | `<id>`, `crio-<id>`, `docker-<id>` |
//!
//! under `/kubepods.slice/…` or `/kubepods/…`, possibly below a prefix (a
//! kind node's `/system.slice/docker-<node>.scope/kubelet.slice/…`). In
//! cgroup v1 each controller has its line (`4:memory:/kubepods/…`); in v2
//! there is one (`0::/kubepods.slice/…`). Every line that names a pod must
//! name the same pod and container, or the process is refused.

/// A container as its cgroup names it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ContainerRef {
    /// The pod UID, lowercase with dashes (`1b4c3d2e-5f6a-7b8c-9d0e-1f2a3b4c5d6e`).
    pub pod_uid: String,
    /// The container ID, 64 lowercase hex digits, without the runtime prefix.
    pub container_id: String,
}

/// Why a cgroup file cannot be trusted to name one container.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CgroupError {
    /// Two lines name different pods or containers.
    #[error("the process's cgroups name different containers ({first} and {second})")]
    Conflict {
        /// One of them, `pod/container`.
        first: String,
        /// The other.
        second: String,
    },
}

/// The container named by a cgroup file's text: `Ok(None)` when no line
/// names a pod's container (a host process, a pod-level cgroup, a
/// runtime's `crio-conmon-…` monitor); an error when lines disagree.
pub fn parse(text: &str) -> Result<Option<ContainerRef>, CgroupError> {
    let mut found: Option<ContainerRef> = None;
    for line in text.lines() {
        // "hierarchy-ID:controllers:path"; the path may itself hold ':'.
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(_), Some(path)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let Some(c) = parse_path(path) else {
            continue;
        };
        match &found {
            None => found = Some(c),
            Some(f) if *f == c => {}
            Some(f) => {
                return Err(CgroupError::Conflict {
                    first: format!("{}/{}", f.pod_uid, f.container_id),
                    second: format!("{}/{}", c.pod_uid, c.container_id),
                });
            }
        }
    }
    Ok(found)
}

/// The container named by one cgroup path: the segment after the pod's.
pub fn parse_path(path: &str) -> Option<ContainerRef> {
    let segments: Vec<&str> = path.split('/').collect();
    let (i, pod_uid) = segments
        .iter()
        .enumerate()
        .find_map(|(i, s)| pod_uid(s).map(|u| (i, u)))?;
    let container_id = container_id(segments.get(i + 1)?)?;
    Some(ContainerRef {
        pod_uid,
        container_id,
    })
}

/// `pod<uid>` at the end of a segment (after its `.slice`), at the start
/// or after a `-`: the kubelet's pod cgroup.
fn pod_uid(segment: &str) -> Option<String> {
    let s = segment.strip_suffix(".slice").unwrap_or(segment);
    const UID_LEN: usize = 36;
    if s.len() < UID_LEN + 3 {
        return None;
    }
    let (head, uid) = s.split_at(s.len() - UID_LEN);
    let before = head.strip_suffix("pod")?;
    if !(before.is_empty() || before.ends_with('-')) {
        return None;
    }
    let mut out = String::with_capacity(UID_LEN);
    for (i, c) in uid.chars().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            // systemd escapes the UID's dashes as underscores.
            if c != '-' && c != '_' {
                return None;
            }
            out.push('-');
        } else if c.is_ascii_hexdigit() {
            out.push(c.to_ascii_lowercase());
        } else {
            return None;
        }
    }
    Some(out)
}

/// Runtime prefixes of container cgroups (`crio-conmon-` is CRI-O's
/// monitor process, not the container: its ID part fails the hex check
/// because `conmon-` is left in front).
const RUNTIME_PREFIXES: [&str; 4] = ["cri-containerd-", "crio-", "docker-", "containerd-"];

fn container_id(segment: &str) -> Option<String> {
    let s = segment.strip_suffix(".scope").unwrap_or(segment);
    let id = RUNTIME_PREFIXES
        .iter()
        .find_map(|p| s.strip_prefix(p))
        .unwrap_or(s);
    (id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| id.to_owned())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const UID: &str = "1b4c3d2e-5f6a-7b8c-9d0e-1f2a3b4c5d6e";
    const UID_: &str = "1b4c3d2e_5f6a_7b8c_9d0e_1f2a3b4c5d6e";
    const ID: &str = "3f9f2a7c1d5e4b8a9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b";

    fn expect() -> Option<ContainerRef> {
        Some(ContainerRef {
            pod_uid: UID.into(),
            container_id: ID.into(),
        })
    }

    #[test]
    fn cgroup_v2_systemd_driver_every_runtime_and_qos_class() {
        for (qos, runtime) in [
            (
                "kubepods-burstable.slice/kubepods-burstable-",
                "cri-containerd-",
            ),
            ("kubepods-besteffort.slice/kubepods-besteffort-", "crio-"),
            ("kubepods-", "docker-"),
        ] {
            let text = format!("0::/kubepods.slice/{qos}pod{UID_}.slice/{runtime}{ID}.scope\n");
            assert_eq!(parse(&text), Ok(expect()), "{text}");
        }
    }

    #[test]
    fn cgroup_v1_cgroupfs_driver_lines_per_controller() {
        // A containerd node with the cgroupfs driver (cgroup v1), as
        // /proc/<pid>/cgroup lists it.
        let text = format!(
            "12:pids:/kubepods/burstable/pod{UID}/{ID}\n\
             11:memory:/kubepods/burstable/pod{UID}/{ID}\n\
             10:cpu,cpuacct:/kubepods/burstable/pod{UID}/{ID}\n\
             4:devices:/kubepods/burstable/pod{UID}/{ID}\n\
             1:name=systemd:/kubepods/burstable/pod{UID}/{ID}\n\
             0::/\n"
        );
        assert_eq!(parse(&text), Ok(expect()));
        // Guaranteed pods sit directly under /kubepods; CRI-O and Docker
        // prefix the ID.
        for c in [ID.to_string(), format!("crio-{ID}"), format!("docker-{ID}")] {
            let text = format!("3:memory:/kubepods/pod{UID}/{c}\n");
            assert_eq!(parse(&text), Ok(expect()), "{text}");
        }
    }

    #[test]
    fn cgroup_v1_systemd_driver() {
        let text = format!(
            "11:memory:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope\n\
             1:name=systemd:/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{ID}.scope\n"
        );
        assert_eq!(parse(&text), Ok(expect()));
    }

    #[test]
    fn nested_nodes_and_child_cgroups() {
        // kind: the node is itself a container; the kubelet's slices sit
        // below it.
        let text = format!(
            "0::/system.slice/docker-{}.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{ID}.scope\n",
            "a".repeat(64)
        );
        assert_eq!(parse(&text), Ok(expect()));
        // A process in a child cgroup of its container is still in it.
        let text = format!("0::/kubepods/pod{UID}/{ID}/init.scope\n");
        assert_eq!(parse(&text), Ok(expect()));
    }

    #[test]
    fn no_container_is_none_and_disagreeing_lines_are_refused() {
        for text in [
            "0::/system.slice/sshd.service\n".to_owned(),
            "0::/\n".to_owned(),
            "0::/user.slice/user-1000.slice/session-3.scope\n".to_owned(),
            // The pod's own cgroup (no container), CRI-O's monitor.
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice\n"),
            format!("0::/kubepods.slice/kubepods-pod{UID_}.slice/crio-conmon-{ID}.scope\n"),
            // Not a UID, not an ID, not a pod segment.
            format!("0::/kubepods/podnot-a-uid/{ID}\n"),
            format!("0::/kubepods/pod{UID}/{}\n", &ID[..63]),
            format!("0::/kubepods/pod{UID}/{}\n", ID.to_uppercase()),
            format!("0::/kubepods/xpod{UID}/{ID}\n"),
            format!("0::/system.slice/podman-{ID}.scope\n"),
            String::new(),
            "garbage\n".to_owned(),
        ] {
            assert_eq!(parse(&text), Ok(None), "{text}");
        }
        let other = "b".repeat(64);
        let text =
            format!("11:memory:/kubepods/pod{UID}/{ID}\n4:pids:/kubepods/pod{UID}/{other}\n");
        assert!(matches!(parse(&text), Err(CgroupError::Conflict { .. })));
    }
}
