//! Workload attestation: who is calling on the Workload API socket.
//!
//! The kernel tells us the caller's uid, gid and pid at connect time
//! (SO_PEERCRED). When the agent accepts the connection it pins that
//! process ([`Peer::observe`]): a pidfd (so a reused pid can never pass for
//! it), its start time, and the identity (device, inode) of the executable
//! it runs. On every call the process must still be that one, running that
//! executable ([`Peer::unchanged`]) — otherwise a process could connect,
//! hand the socket to a child, and exec a registered binary so that the
//! child is served the binary's identity.
//!
//! Everything else comes from `/proc/<pid>`, read on a blocking thread:
//! supplementary groups, the cgroup, the executable's path — offered only
//! when that path names, for the agent, the very file the process runs (a
//! container's `/usr/bin/app` is not the host's) — and its SHA-256, read
//! through `/proc/<pid>/exe` itself (whatever mount namespace it lives in),
//! capped in size and computed once per file version.

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use herald_core::Selector;

/// Why a caller could not be attested.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    /// No peer credentials on the connection.
    #[error("the caller's credentials are not available on this socket")]
    NoCredentials,
    /// The process went away or changed during attestation.
    #[error("the calling process exited or changed during attestation")]
    Gone,
    /// The process runs another executable than when it connected.
    #[error("the calling process has executed another program since it connected")]
    ExecChanged,
    /// The executable is over the hashing cap.
    #[error(
        "the caller's executable is {size} bytes, over the {cap}-byte cap for hashing (workload_api.max_executable_size)"
    )]
    ExecutableTooLarge {
        /// Its size.
        size: u64,
        /// The cap.
        cap: u64,
    },
    /// The executable could not be read.
    #[error("the caller's executable could not be read: {0}")]
    Unreadable(String),
}

/// What was observed about a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Facts {
    /// The caller's process ID (for logs only; never an identity).
    pub pid: i32,
    /// The selectors that hold for the caller.
    pub selectors: Vec<Selector>,
    /// The caller's `/proc/<pid>/cgroup`, read while it was pinned (empty
    /// when unreadable): where Kubernetes attestation finds its container.
    pub cgroup: String,
}

/// A file's identity: the same (device, inode) is the same file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FileId {
    /// Device.
    pub dev: u64,
    /// Inode.
    pub ino: u64,
}

impl FileId {
    fn of(meta: &std::fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// The file at `path`, following symbolic links (and `/proc` magic links).
    fn at(path: &Path) -> Option<FileId> {
        std::fs::metadata(path).ok().map(|m| FileId::of(&m))
    }
}

/// A `/proc` file's text: open, read to the end, close. Not
/// `fs::read_to_string`: it asks the file's size first (a `statx` and an
/// `lseek`), and a `/proc` file reports 0, which makes it read in small
/// probing steps — `/proc/<pid>/status` took eight `read`s that way, one
/// here.
pub(crate) fn read_proc(path: &str) -> std::io::Result<String> {
    let mut text = String::with_capacity(2048);
    File::open(path)?.take(u64::MAX).read_to_string(&mut text)?;
    Ok(text)
}

fn start_time(pid: i32) -> Option<u64> {
    let stat = read_proc(&format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // after it are counted from the last ')'.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    rest.split(' ').nth(19)?.parse().ok()
}

fn status_field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// The effective uid in a `/proc/<pid>/status` text (`Uid:` lists the
/// real, effective, saved and file-system uids): what SO_PEERCRED reported
/// at connect time, and what `unix:uid` selects on (as SPIRE's unix
/// attestor does). A process whose real uid differs — a setuid program —
/// is its effective uid throughout.
fn effective_uid(status: &str) -> Option<u32> {
    status_field(status, "Uid:")?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The caller as it was when the agent accepted its connection.
#[derive(Debug)]
pub struct Peer {
    /// Effective uid when it connected (SO_PEERCRED reports the
    /// effective ids).
    pub uid: u32,
    /// Effective gid when it connected (SO_PEERCRED).
    pub gid: u32,
    /// The process that connected.
    pub pid: i32,
    /// A handle on that very process (`None` on kernels without pidfds,
    /// before 5.3: then the start time alone tells a reused pid apart).
    pidfd: Option<OwnedFd>,
    start_time: u64,
    exe: FileId,
}

impl Peer {
    /// Pins the process behind a new connection with these peer credentials.
    pub fn observe(uid: u32, gid: u32, pid: Option<i32>) -> Result<Peer, AttestError> {
        let pid = pid.filter(|p| *p > 0).ok_or(AttestError::NoCredentials)?;
        let raw = rustix::process::Pid::from_raw(pid).ok_or(AttestError::NoCredentials)?;
        let pidfd = match rustix::process::pidfd_open(raw, rustix::process::PidfdFlags::empty()) {
            Ok(fd) => Some(fd),
            Err(rustix::io::Errno::NOSYS) => None,
            Err(_) => return Err(AttestError::Gone),
        };
        let start_time = start_time(pid).ok_or(AttestError::Gone)?;
        let exe = FileId::at(Path::new(&format!("/proc/{pid}/exe"))).ok_or(AttestError::Gone)?;
        let peer = Peer {
            uid,
            gid,
            pid,
            pidfd,
            start_time,
            exe,
        };
        // The reads above were of the process the pidfd holds only if it
        // is still running after them.
        peer.alive()?;
        Ok(peer)
    }

    /// Whether the pinned process still runs (a pidfd turns readable when
    /// its process exits).
    fn alive(&self) -> Result<(), AttestError> {
        let Some(fd) = &self.pidfd else {
            return Ok(());
        };
        use rustix::event::{PollFd, PollFlags, Timespec, poll};
        let mut fds = [PollFd::new(fd, PollFlags::IN)];
        match poll(&mut fds, Some(&Timespec::default())) {
            Ok(0) => Ok(()),
            _ => Err(AttestError::Gone),
        }
    }

    /// Checks that the process is the one that connected, running the
    /// executable it ran then.
    pub fn unchanged(&self) -> Result<(), AttestError> {
        // With a pidfd, the process still running after the reads (checked
        // below) is the one pinned: a pid is not reused while its process
        // lives. Without one, its start time tells (a read of
        // `/proc/<pid>/stat`, the dearest of a fetch's `/proc` reads).
        if self.pidfd.is_none() && start_time(self.pid) != Some(self.start_time) {
            return Err(AttestError::Gone);
        }
        let exe = FileId::at(Path::new(&format!("/proc/{}/exe", self.pid)));
        self.alive()?;
        match exe {
            Some(e) if e == self.exe => Ok(()),
            Some(_) => Err(AttestError::ExecChanged),
            None => Err(AttestError::Gone),
        }
    }
}

/// The `unix:path` selector for a process whose `/proc/<pid>/exe` link
/// reads `link` and which runs the file `running`: offered only when the
/// path, resolved by the agent (`resolve`), is that same file. A path is
/// read in the process's mount namespace and root, so a container's
/// `/usr/bin/app`, a chroot's, a bind mount over the path in another
/// namespace, or a replaced or deleted binary all fail this, and match no
/// registration by path.
pub fn path_selector(
    link: &Path,
    running: FileId,
    resolve: impl Fn(&Path) -> Option<FileId>,
) -> Option<Selector> {
    let text = link.to_str()?;
    if text.ends_with(" (deleted)") || !link.is_absolute() {
        return None;
    }
    (resolve(link)? == running).then(|| Selector::Path(text.to_owned()))
}

/// (device, inode, size, mtime, ctime): a version of a file. The ctime
/// cannot be set from user space, so rewriting a file and restoring its
/// mtime still makes a new version.
type DigestKey = (u64, u64, u64, i64, i64, i64, i64);

type DigestCell = Arc<OnceLock<Result<String, AttestError>>>;

/// Most executable versions whose digests are kept.
const MAX_DIGESTS: usize = 1024;

/// Attests callers; holds the digests of executables already hashed.
#[derive(Debug)]
pub struct Attestor {
    max_executable_size: u64,
    digests: Mutex<HashMap<DigestKey, DigestCell>>,
    /// Executables hashed so far: each version once, however many callers
    /// asked for it at the same time.
    hashed: std::sync::atomic::AtomicU64,
    /// Where `<pid>/cgroup` is read: `/proc`, or a test's stand-in.
    cgroup_root: std::path::PathBuf,
}

impl Attestor {
    /// An attestor hashing executables of at most `max_executable_size` bytes.
    pub fn new(max_executable_size: u64) -> Attestor {
        Attestor {
            max_executable_size,
            digests: Mutex::new(HashMap::new()),
            hashed: std::sync::atomic::AtomicU64::new(0),
            cgroup_root: "/proc".into(),
        }
    }

    /// How many executable versions were hashed (read in full) so far.
    pub fn hashes_computed(&self) -> u64 {
        self.hashed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Test builds only: read cgroup files from `<root>/<pid>/cgroup`, so
    /// that a test process can stand in for a container. Every other fact
    /// (the pin included) still comes from `/proc`.
    #[cfg(feature = "test-hooks")]
    pub fn with_test_proc_root(mut self, root: std::path::PathBuf) -> Attestor {
        self.cgroup_root = root;
        self
    }

    /// Attests `peer` as it is now. Blocking (reads `/proc`, may hash an
    /// executable): run it off the async workers.
    pub fn attest(&self, peer: &Peer) -> Result<Facts, AttestError> {
        // Hashing allowed: a digest is always had, so `None` cannot come.
        self.facts(peer, true)?
            .ok_or_else(|| AttestError::Unreadable("no digest".into()))
    }

    /// Attests `peer` if its executable's digest is already known — reads
    /// of the pinned process's `/proc` entries only, a few microseconds of
    /// kernel memory reads, fit to run on an async worker (the hop to a
    /// blocking thread and back cost more than the reads). `None` when the
    /// executable must be hashed first: then [`Attestor::attest`], off the
    /// workers.
    pub fn attest_known(&self, peer: &Peer) -> Option<Result<Facts, AttestError>> {
        self.facts(peer, false).transpose()
    }

    /// The caller's facts; `Ok(None)` when `may_hash` is false and the
    /// executable's digest is not known yet.
    fn facts(&self, peer: &Peer, may_hash: bool) -> Result<Option<Facts>, AttestError> {
        // No pin check before the reads: the one after them decides. The
        // process still running then (pidfd) or still starting at the same
        // time (without one) means every read below was of the process that
        // connected, and the executable opened below is compared with the
        // pinned one before anything is taken from it.
        let pid = peer.pid;
        let mut selectors = vec![Selector::Uid(peer.uid), Selector::Gid(peer.gid)];
        let status = read_proc(&format!("/proc/{pid}/status")).map_err(|_| AttestError::Gone)?;
        if effective_uid(&status) != Some(peer.uid) {
            return Err(AttestError::Gone);
        }
        if let Some(groups) = status_field(&status, "Groups:") {
            for g in groups.split_whitespace().filter_map(|g| g.parse().ok()) {
                selectors.push(Selector::Gid(g));
            }
        }
        let exe = format!("/proc/{pid}/exe");
        let mut file = File::open(&exe).map_err(|_| AttestError::Gone)?;
        let meta = file.metadata().map_err(|_| AttestError::Gone)?;
        if FileId::of(&meta) != peer.exe {
            return Err(AttestError::ExecChanged);
        }
        if let Ok(link) = std::fs::read_link(&exe)
            && let Some(s) = path_selector(&link, peer.exe, FileId::at)
        {
            selectors.push(s);
        }
        let digest = if may_hash {
            self.digest(&mut file, &meta)?
        } else {
            match self.known_digest(&meta) {
                Some(d) => d?,
                None => return Ok(None),
            }
        };
        selectors.push(Selector::Sha256(digest));
        let cgroup = self
            .cgroup_root
            .join(format!("{pid}/cgroup"))
            .to_str()
            .and_then(|p| read_proc(p).ok())
            .unwrap_or_default();
        // cgroup v2: "0::/system.slice/web.service".
        for line in cgroup.lines() {
            if let Some(path) = line.strip_prefix("0::") {
                selectors.push(Selector::Cgroup(path.to_owned()));
            }
        }
        // Everything above described the process that connected.
        peer.unchanged()?;
        selectors.sort();
        selectors.dedup();
        Ok(Some(Facts {
            pid,
            selectors,
            cgroup,
        }))
    }

    /// The refusal of an executable over the hashing cap, known without
    /// reading it.
    fn too_large(&self, meta: &std::fs::Metadata) -> Option<AttestError> {
        let cap = self.max_executable_size;
        (meta.size() > cap).then(|| AttestError::ExecutableTooLarge {
            size: meta.size(),
            cap,
        })
    }

    /// The digest of this version of the file, if already computed (or
    /// refused for its size, which needs no reading).
    fn known_digest(&self, meta: &std::fs::Metadata) -> Option<Result<String, AttestError>> {
        if let Some(e) = self.too_large(meta) {
            return Some(Err(e));
        }
        let map = match self.digests.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.get(&digest_key(meta))?.get().cloned()
    }

    /// The SHA-256 of `file`: refused above the cap without reading it;
    /// computed once per version, concurrent callers of one version waiting
    /// for the one computation.
    fn digest(&self, file: &mut File, meta: &std::fs::Metadata) -> Result<String, AttestError> {
        if let Some(e) = self.too_large(meta) {
            return Err(e);
        }
        let cap = self.max_executable_size;
        let key = digest_key(meta);
        let cell = {
            let mut map = match self.digests.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if !map.contains_key(&key) && map.len() >= MAX_DIGESTS {
                // Keep only computations still in flight; their waiters
                // hold the cells anyway.
                map.retain(|_, c| c.get().is_none());
            }
            map.entry(key).or_default().clone()
        };
        let result = cell
            .get_or_init(|| {
                self.hashed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                hash_capped(file, cap)
            })
            .clone();
        if matches!(result, Err(AttestError::Unreadable(_)))
            && let Ok(mut map) = self.digests.lock()
        {
            // A read error may pass; a digest or a size does not change.
            map.remove(&key);
        }
        result
    }
}

fn digest_key(meta: &std::fs::Metadata) -> DigestKey {
    (
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
    )
}

/// SHA-256 of `file`, refusing it once more than `cap` bytes were read (it
/// may grow after its size was checked).
fn hash_capped(file: &mut File, cap: u64) -> Result<String, AttestError> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| AttestError::Unreadable(e.kind().to_string()))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        if total > cap {
            return Err(AttestError::ExecutableTooLarge { size: total, cap });
        }
        ctx.update(buf.get(..n).unwrap_or_default());
    }
    Ok(hex::encode(ctx.finish().as_ref()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn own_uid() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status_field(&status, "Uid:")
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap()
    }

    #[test]
    fn this_process_attests_with_its_own_facts() {
        let a = Attestor::new(2 << 30);
        let pid = std::process::id() as i32;
        let uid = own_uid();
        let peer = Peer::observe(uid, 0, Some(pid)).unwrap();
        // Before its executable is hashed, the worker-side path declines.
        assert_eq!(a.attest_known(&peer), None);
        let facts = a.attest(&peer).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(a.attest_known(&peer), Some(Ok(facts.clone())));
        assert!(facts.selectors.contains(&Selector::Uid(uid)));
        let exe = std::env::current_exe().unwrap_or_default();
        assert!(
            facts
                .selectors
                .contains(&Selector::Path(exe.to_string_lossy().into_owned()))
        );
        let digest = facts
            .selectors
            .iter()
            .find_map(|s| match s {
                Selector::Sha256(d) => Some(d.clone()),
                _ => None,
            })
            .unwrap();
        let expected =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &std::fs::read(&exe).unwrap());
        assert_eq!(digest, hex::encode(expected.as_ref()));
        // A second attestation reuses the digest.
        assert_eq!(a.attest(&peer).unwrap(), facts);
        assert_eq!(a.digests.lock().unwrap().len(), 1);
        // A uid that is not the process's: refused as a changed process.
        let other = Peer::observe(uid.wrapping_add(1), 0, Some(pid)).unwrap();
        assert_eq!(a.attest(&other), Err(AttestError::Gone));
        assert_eq!(
            Peer::observe(uid, 0, None).unwrap_err(),
            AttestError::NoCredentials
        );
        assert!(Peer::observe(uid, 0, Some(i32::MAX - 1)).is_err());
    }

    #[test]
    fn the_uid_checked_is_the_effective_one_peer_credentials_report() {
        // A setuid program run by uid 1000: real 1000, effective 0.
        let status = "Name:\tsu\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t1000\t1000\t1000\t1000\n";
        assert_eq!(effective_uid(status), Some(0));
        assert_eq!(effective_uid("Uid:\t1000\n"), None);
        assert_eq!(effective_uid("Gid:\t1\t2\t3\t4\n"), None);
        // This process: its effective uid is the one attested.
        let own = read_proc("/proc/self/status").unwrap();
        assert_eq!(
            effective_uid(&own),
            Some(rustix::process::geteuid().as_raw())
        );
    }

    #[test]
    fn an_executable_over_the_cap_is_refused_without_being_read() {
        let a = Attestor::new(4096);
        let peer = Peer::observe(own_uid(), 0, Some(std::process::id() as i32)).unwrap();
        match a.attest(&peer) {
            Err(AttestError::ExecutableTooLarge { size, cap: 4096 }) => assert!(size > 4096),
            other => panic!("{other:?}"),
        }
        assert!(a.digests.lock().unwrap().is_empty(), "nothing was hashed");
        // A file that grows past the cap while it is read is refused too.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 10_000]).unwrap();
        let mut f = File::open(&path).unwrap();
        assert!(matches!(
            hash_capped(&mut f, 4096),
            Err(AttestError::ExecutableTooLarge { cap: 4096, .. })
        ));
    }

    /// Callers attesting the same executable version at the same time wait
    /// for one computation of its digest: it is read once, not once each.
    #[test]
    fn concurrent_callers_of_one_executable_version_hash_it_once() {
        const CALLERS: usize = 8;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("exe");
        // Large (and sparse, so cheap to make) enough that every caller
        // arrives while the first is still reading it.
        let size = 256u64 << 20;
        File::create(&path).unwrap().set_len(size).unwrap();
        let a = Attestor::new(2 << 30);
        let barrier = std::sync::Barrier::new(CALLERS);
        let results: Vec<(std::time::Instant, std::time::Instant, String)> =
            std::thread::scope(|s| {
                let callers: Vec<_> = (0..CALLERS)
                    .map(|_| {
                        s.spawn(|| {
                            let mut f = File::open(&path).unwrap();
                            let meta = f.metadata().unwrap();
                            barrier.wait();
                            let start = std::time::Instant::now();
                            let digest = a.digest(&mut f, &meta).unwrap();
                            (start, std::time::Instant::now(), digest)
                        })
                    })
                    .collect();
                callers.into_iter().map(|c| c.join().unwrap()).collect()
            });
        let first_done = results.iter().map(|r| r.1).min().unwrap();
        let last_start = results.iter().map(|r| r.0).max().unwrap();
        let took = first_done - results.iter().map(|r| r.0).min().unwrap();
        println!(
            "digest single-flight: {CALLERS} concurrent callers, {} hash(es) of a {} MiB file, {took:?}",
            a.hashes_computed(),
            size >> 20
        );
        assert!(
            last_start < first_done,
            "every caller must have asked while the digest was being computed"
        );
        assert_eq!(a.hashes_computed(), 1, "one computation for all callers");
        assert!(results.iter().all(|r| r.2 == results[0].2));
        // A later caller of that version reuses it.
        let mut f = File::open(&path).unwrap();
        let meta = f.metadata().unwrap();
        assert_eq!(a.digest(&mut f, &meta).unwrap(), results[0].2);
        assert_eq!(a.hashes_computed(), 1);
        // Another version of the file (its mtime moves) is hashed anew.
        std::fs::write(&path, b"v2").unwrap();
        let mut f = File::open(&path).unwrap();
        let meta = f.metadata().unwrap();
        assert_ne!(a.digest(&mut f, &meta).unwrap(), results[0].2);
        assert_eq!(a.hashes_computed(), 2);
    }

    #[test]
    fn a_child_that_exits_or_execs_is_no_longer_its_connect_time_self() {
        let uid = own_uid();
        // `sh` pinned while it runs, then it execs `sleep` (same pid).
        let dir = tempfile::tempdir().unwrap();
        let go = dir.path().join("go");
        let mut child = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "while [ ! -e {} ]; do sleep 0.01; done; exec sleep 30",
                go.display()
            ))
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let peer = Peer::observe(uid, 0, Some(pid)).unwrap();
        peer.unchanged().unwrap();
        let sh = FileId::at(Path::new(&format!("/proc/{pid}/exe"))).unwrap();
        std::fs::write(&go, b"").unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while FileId::at(Path::new(&format!("/proc/{pid}/exe"))) == Some(sh) {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never exec'd"
            );
            std::thread::yield_now();
        }
        assert_eq!(peer.unchanged(), Err(AttestError::ExecChanged));
        assert_eq!(
            Attestor::new(1 << 30).attest(&peer),
            Err(AttestError::ExecChanged)
        );
        // Pinned again after the exec, then the process exits: gone, even
        // while it is an unreaped zombie that still holds its pid.
        let again = Peer::observe(uid, 0, Some(pid)).unwrap();
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while again.alive().is_ok() {
            assert!(
                std::time::Instant::now() < deadline,
                "the pidfd never fired"
            );
            std::thread::yield_now();
        }
        assert_eq!(again.unchanged(), Err(AttestError::Gone));
        // Reaped, its pid free for reuse: still gone (the pidfd, not the
        // start time, tells).
        child.wait().unwrap();
        assert_eq!(again.unchanged(), Err(AttestError::Gone));
    }

    #[test]
    fn a_path_is_offered_only_when_it_names_the_running_file_for_the_agent() {
        let running = FileId { dev: 8, ino: 42 };
        let other = FileId { dev: 8, ino: 43 };
        let app = Path::new("/usr/bin/app");
        // The agent sees the same file there.
        assert_eq!(
            path_selector(app, running, |_| Some(running)),
            Some(Selector::Path("/usr/bin/app".into()))
        );
        // A container's (or chroot's, or another mount namespace's)
        // /usr/bin/app: the agent's /usr/bin/app is another file, or none.
        assert_eq!(path_selector(app, running, |_| Some(other)), None);
        assert_eq!(path_selector(app, running, |_| None), None);
        // A deleted or replaced binary; a link that is not a path.
        assert_eq!(
            path_selector(Path::new("/usr/bin/app (deleted)"), running, |_| Some(
                running
            )),
            None
        );
        assert_eq!(
            path_selector(Path::new("memfd:x"), running, |_| Some(running)),
            None
        );
        // Against the real file system: this test's executable is itself;
        // a copy of it at another path is not.
        let exe = std::env::current_exe().unwrap();
        let id = FileId::at(&exe).unwrap();
        assert!(path_selector(&exe, id, FileId::at).is_some());
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("copy");
        std::fs::copy(&exe, &copy).unwrap();
        assert_eq!(path_selector(&copy, id, FileId::at), None);
    }
}
