//! Workload attestation: who is calling on the Workload API socket.
//!
//! The kernel tells us the caller's uid, gid and pid at connect time
//! (SO_PEERCRED, read by tonic from the socket). Everything else comes
//! from `/proc/<pid>`: the executable (path and SHA-256), supplementary
//! groups and the cgroup. A pid can be reused once its process exits, so
//! the process start time is read before and after the lookups and must
//! not change, and `/proc/<pid>`'s real uid must still be the socket
//! peer's — otherwise another process could inherit the caller's identity.

use std::collections::HashMap;
use std::io::Read;
use std::sync::Mutex;

use herald_core::Selector;

/// Why a caller could not be attested.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// No peer credentials on the connection.
    #[error("the caller's credentials are not available on this socket")]
    NoCredentials,
    /// The process went away or changed during attestation.
    #[error("the calling process exited or changed during attestation")]
    Gone,
}

/// What was observed about a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The caller's process ID (for logs only; never an identity).
    pub pid: i32,
    /// The selectors that hold for the caller.
    pub selectors: Vec<Selector>,
}

/// Digests of executables by (device, inode, size, mtime), so a busy
/// workload is hashed once, not on every call.
#[derive(Debug, Default)]
pub struct Attestor {
    digests: Mutex<HashMap<(u64, u64, u64, i64), String>>,
}

fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // after it are counted from the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(19)?.parse().ok()
}

fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

impl Attestor {
    /// Attests the caller with these peer credentials.
    pub fn attest(&self, uid: u32, gid: u32, pid: Option<i32>) -> Result<Facts, AttestError> {
        let pid = pid.filter(|p| *p > 0).ok_or(AttestError::NoCredentials)?;
        let before = start_time(pid).ok_or(AttestError::Gone)?;
        let mut selectors = vec![Selector::Uid(uid), Selector::Gid(gid)];
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .map_err(|_| AttestError::Gone)?;
        let real_uid: Option<u32> =
            status_field(&status, "Uid:").and_then(|v| v.split_whitespace().next()?.parse().ok());
        if real_uid != Some(uid) {
            return Err(AttestError::Gone);
        }
        if let Some(groups) = status_field(&status, "Groups:") {
            for g in groups.split_whitespace().filter_map(|g| g.parse().ok()) {
                selectors.push(Selector::Gid(g));
            }
        }
        let exe = format!("/proc/{pid}/exe");
        if let Ok(path) = std::fs::read_link(&exe) {
            let text = path.to_string_lossy();
            // A replaced binary shows as "path (deleted)": its path no
            // longer names what runs, so it is not offered as a selector.
            if !text.ends_with(" (deleted)") {
                selectors.push(Selector::Path(text.into_owned()));
            }
        }
        if let Some(d) = self.digest(&exe) {
            selectors.push(Selector::Sha256(d));
        }
        if let Ok(cg) = std::fs::read_to_string(format!("/proc/{pid}/cgroup")) {
            // cgroup v2: "0::/system.slice/web.service".
            for line in cg.lines() {
                if let Some(path) = line.strip_prefix("0::") {
                    selectors.push(Selector::Cgroup(path.to_owned()));
                }
            }
        }
        if start_time(pid) != Some(before) {
            return Err(AttestError::Gone);
        }
        selectors.sort();
        selectors.dedup();
        Ok(Facts { pid, selectors })
    }

    fn digest(&self, exe: &str) -> Option<String> {
        use std::os::unix::fs::MetadataExt;
        let mut file = std::fs::File::open(exe).ok()?;
        let meta = file.metadata().ok()?;
        let key = (meta.dev(), meta.ino(), meta.size(), meta.mtime());
        if let Some(d) = self.digests.lock().ok()?.get(&key) {
            return Some(d.clone());
        }
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf).ok()?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        let d = hex::encode(ctx.finish().as_ref());
        let mut map = self.digests.lock().ok()?;
        if map.len() > 1024 {
            map.clear();
        }
        map.insert(key, d.clone());
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_attests_with_its_own_facts() {
        let a = Attestor::default();
        let pid = std::process::id() as i32;
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let uid: u32 = status_field(&status, "Uid:")
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(u32::MAX);
        let facts = a
            .attest(uid, 0, Some(pid))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(facts.selectors.contains(&Selector::Uid(uid)));
        let exe = std::env::current_exe().unwrap_or_default();
        assert!(
            facts
                .selectors
                .contains(&Selector::Path(exe.to_string_lossy().into_owned()))
        );
        assert!(
            facts
                .selectors
                .iter()
                .any(|s| matches!(s, Selector::Sha256(_)))
        );
        // A uid that is not the process's: refused as a changed process.
        assert!(a.attest(uid.wrapping_add(1), 0, Some(pid)).is_err());
        assert!(a.attest(uid, 0, None).is_err());
        assert!(a.attest(uid, 0, Some(i32::MAX - 1)).is_err());
    }
}
