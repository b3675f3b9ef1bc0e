//! Workload attestation: who is calling on the Workload API socket.
//!
//! The kernel tells us the caller's uid, gid and pid at connect time
//! (SO_PEERCRED). When the agent accepts the connection it pins that
//! process ([`Peer::observe`]): it opens the process's `/proc/<pid>`
//! directory and notes the identity (device, inode) of the executable it
//! runs. Every later read is made relative to that directory, and the
//! kernel refuses each once the process has exited — the directory stands
//! for the process, not for its number, so a reused pid can never pass for
//! it. On every call the process must still run that executable
//! ([`Peer::unchanged`]) — otherwise a process could connect, hand the
//! socket to a child, and exec a registered binary so that the child is
//! served the binary's identity.
//!
//! Everything else comes from the same directory: supplementary groups,
//! the cgroup, the executable's path — offered only when that path names,
//! for the agent, the very file the process runs (a container's
//! `/usr/bin/app` is not the host's) — and its SHA-256, read through
//! `<pid>/exe` itself (whatever mount namespace it lives in), capped in
//! size and computed once per file version (hashing runs on a blocking
//! thread; the other reads are a few microseconds of kernel memory).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use rustix::fs::{AtFlags, Mode, OFlags, Stat};

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
    // `stat`'s field types differ between architectures; the conversions
    // are the identity on some.
    #[allow(clippy::useless_conversion)]
    fn of(st: &Stat) -> FileId {
        FileId {
            dev: u64::from(st.st_dev),
            ino: u64::from(st.st_ino),
        }
    }

    /// The file at `path`, following symbolic links (and `/proc` magic links).
    fn at(path: &Path) -> Option<FileId> {
        rustix::fs::stat(path).ok().map(|st| FileId::of(&st))
    }
}

/// A version of a file: its identity, its size, and what tells a rewrite
/// apart — (device, inode, size, mtime, ctime). The ctime cannot be set
/// from user space, so rewriting a file and restoring its mtime still
/// makes a new version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Version {
    id: FileId,
    size: u64,
    mtime: (i64, u64),
    ctime: (i64, u64),
}

impl Version {
    #[allow(clippy::useless_conversion)]
    fn of(st: &Stat) -> Version {
        Version {
            id: FileId::of(st),
            size: u64::try_from(st.st_size).unwrap_or(u64::MAX),
            mtime: (i64::from(st.st_mtime), u64::from(st.st_mtime_nsec)),
            ctime: (i64::from(st.st_ctime), u64::from(st.st_ctime_nsec)),
        }
    }

    /// The version of the file at `path`, following symbolic links.
    pub(crate) fn at(path: &Path) -> Option<Version> {
        rustix::fs::stat(path).ok().map(|st| Version::of(&st))
    }
}

/// A `/proc` file's text: open, read to the end, close. Not
/// `fs::read_to_string`: it asks the file's size first (a `statx` and an
/// `lseek`), and a `/proc` file reports 0, which makes it read in small
/// probing steps — `/proc/<pid>/status` took eight `read`s that way, one
/// here.
pub(crate) fn read_proc(path: &str) -> std::io::Result<String> {
    read_text(File::open(path)?)
}

/// The text of `name` under a process's `/proc` directory, as [`read_proc`].
fn read_proc_at(dir: impl AsFd, name: &str) -> std::io::Result<String> {
    read_text(File::from(rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )?))
}

fn read_text(file: File) -> std::io::Result<String> {
    let mut text = String::with_capacity(2048);
    file.take(u64::MAX).read_to_string(&mut text)?;
    Ok(text)
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
    /// Its `/proc/<pid>` directory. Reads under it fail once that process
    /// has exited, whoever holds the pid by then: it pins the process on
    /// every kernel (a pidfd would need 5.3), and each read is a lookup of
    /// one name rather than of a path from `/`.
    dir: OwnedFd,
    exe: FileId,
}

impl Peer {
    /// Pins the process behind a new connection with these peer credentials.
    ///
    /// The pid comes from the kernel at connect time; a process that
    /// exited and whose pid was reused before this runs is not told apart
    /// (as with every SO_PEERCRED reader before SO_PEERPIDFD), but its
    /// successor must then pass every check on its own facts.
    pub fn observe(uid: u32, gid: u32, pid: Option<i32>) -> Result<Peer, AttestError> {
        let pid = pid.filter(|p| *p > 0).ok_or(AttestError::NoCredentials)?;
        let dir = rustix::fs::open(
            format!("/proc/{pid}"),
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|_| AttestError::Gone)?;
        let exe = exe_version(&dir).ok_or(AttestError::Gone)?.id;
        Ok(Peer {
            uid,
            gid,
            pid,
            dir,
            exe,
        })
    }

    /// Checks that the process is the one that connected, running the
    /// executable it ran then: one `stat` of `<pid>/exe`, which fails once
    /// the process has exited (an unreaped zombie included).
    pub fn unchanged(&self) -> Result<(), AttestError> {
        match exe_version(&self.dir) {
            Some(v) if v.id == self.exe => Ok(()),
            Some(_) => Err(AttestError::ExecChanged),
            None => Err(AttestError::Gone),
        }
    }
}

/// The version of the file a process runs, through its `/proc` directory.
fn exe_version(dir: impl AsFd) -> Option<Version> {
    rustix::fs::statat(dir, "exe", AtFlags::empty())
        .ok()
        .map(|st| Version::of(&st))
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

type DigestCell = Arc<OnceLock<Result<String, AttestError>>>;

/// Most executable versions whose digests are kept.
const MAX_DIGESTS: usize = 1024;

/// Attests callers; holds the digests of executables already hashed.
#[derive(Debug)]
pub struct Attestor {
    max_executable_size: u64,
    digests: Mutex<HashMap<Version, DigestCell>>,
    /// Executables hashed so far: each version once, however many callers
    /// asked for it at the same time.
    hashed: std::sync::atomic::AtomicU64,
    /// Test builds only: where `<pid>/cgroup` is read instead of the
    /// caller's `/proc` directory.
    cgroup_root: Option<PathBuf>,
}

impl Attestor {
    /// An attestor hashing executables of at most `max_executable_size` bytes.
    pub fn new(max_executable_size: u64) -> Attestor {
        Attestor {
            max_executable_size,
            digests: Mutex::new(HashMap::new()),
            hashed: std::sync::atomic::AtomicU64::new(0),
            cgroup_root: None,
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
    pub fn with_test_proc_root(mut self, root: PathBuf) -> Attestor {
        self.cgroup_root = Some(root);
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
        // Every read is relative to the pinned `/proc` directory, so each
        // either describes the process that connected or fails. An exec
        // between two of them shows in the executable's identity, compared
        // with the pinned one after the status was read and before anything
        // is taken from the file (the cgroup does not change on exec).
        let (pid, dir) = (peer.pid, &peer.dir);
        let mut selectors = vec![Selector::Uid(peer.uid), Selector::Gid(peer.gid)];
        let status = read_proc_at(dir, "status").map_err(|_| AttestError::Gone)?;
        if effective_uid(&status) != Some(peer.uid) {
            return Err(AttestError::Gone);
        }
        if let Some(groups) = status_field(&status, "Groups:") {
            for g in groups.split_whitespace().filter_map(|g| g.parse().ok()) {
                selectors.push(Selector::Gid(g));
            }
        }
        let exe = exe_version(dir).ok_or(AttestError::Gone)?;
        if exe.id != peer.exe {
            return Err(AttestError::ExecChanged);
        }
        if let Ok(link) = rustix::fs::readlinkat(dir, "exe", Vec::new()) {
            let link = PathBuf::from(std::ffi::OsString::from_vec(link.into_bytes()));
            if let Some(s) = path_selector(&link, peer.exe, FileId::at) {
                selectors.push(s);
            }
        }
        let digest = match self.known_digest(&exe) {
            Some(d) => d?,
            None if may_hash => self.digest(peer)?,
            None => return Ok(None),
        };
        selectors.push(Selector::Sha256(digest));
        let cgroup = match &self.cgroup_root {
            None => read_proc_at(dir, "cgroup").ok(),
            Some(root) => root
                .join(format!("{pid}/cgroup"))
                .to_str()
                .and_then(|p| read_proc(p).ok()),
        }
        .unwrap_or_default();
        // cgroup v2: "0::/system.slice/web.service".
        for line in cgroup.lines() {
            if let Some(path) = line.strip_prefix("0::") {
                selectors.push(Selector::Cgroup(path.to_owned()));
            }
        }
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
    fn too_large(&self, version: &Version) -> Option<AttestError> {
        let cap = self.max_executable_size;
        (version.size > cap).then_some(AttestError::ExecutableTooLarge {
            size: version.size,
            cap,
        })
    }

    /// The digest of this version of the file, if already computed (or
    /// refused for its size, which needs no reading).
    fn known_digest(&self, version: &Version) -> Option<Result<String, AttestError>> {
        if let Some(e) = self.too_large(version) {
            return Some(Err(e));
        }
        let map = match self.digests.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        map.get(version)?.get().cloned()
    }

    /// The digest of the pinned process's executable: opened through its
    /// `/proc` directory, hashed only if it is still the pinned file.
    fn digest(&self, peer: &Peer) -> Result<String, AttestError> {
        let fd = rustix::fs::openat(
            &peer.dir,
            "exe",
            OFlags::RDONLY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|_| AttestError::Gone)?;
        let version = rustix::fs::fstat(&fd)
            .map(|st| Version::of(&st))
            .map_err(|_| AttestError::Gone)?;
        if version.id != peer.exe {
            return Err(AttestError::ExecChanged);
        }
        self.digest_of(&mut File::from(fd), version)
    }

    /// The SHA-256 of `file`, this `version` of it: refused above the cap
    /// without reading it; computed once per version, concurrent callers
    /// of one version waiting for the one computation.
    fn digest_of(&self, file: &mut File, version: Version) -> Result<String, AttestError> {
        if let Some(e) = self.too_large(&version) {
            return Err(e);
        }
        let cap = self.max_executable_size;
        let cell = {
            let mut map = match self.digests.lock() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            if !map.contains_key(&version) && map.len() >= MAX_DIGESTS {
                // Keep only computations still in flight; their waiters
                // hold the cells anyway.
                map.retain(|_, c| c.get().is_none());
            }
            map.entry(version).or_default().clone()
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
            map.remove(&version);
        }
        result
    }
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

    fn version(f: &File) -> Version {
        Version::of(&rustix::fs::fstat(f).unwrap())
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
                            let v = version(&f);
                            barrier.wait();
                            let start = std::time::Instant::now();
                            let digest = a.digest_of(&mut f, v).unwrap();
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
        let v = version(&f);
        assert_eq!(a.digest_of(&mut f, v).unwrap(), results[0].2);
        assert_eq!(a.hashes_computed(), 1);
        // Another version of the file (its mtime moves) is hashed anew.
        std::fs::write(&path, b"v2").unwrap();
        let mut f = File::open(&path).unwrap();
        let v = version(&f);
        assert_ne!(a.digest_of(&mut f, v).unwrap(), results[0].2);
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
        let a = Attestor::new(1 << 30);
        a.attest(&again).unwrap();
        child.kill().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap()
            .contains(") Z ")
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the child never became a zombie"
            );
            std::thread::yield_now();
        }
        assert_eq!(again.unchanged(), Err(AttestError::Gone));
        assert_eq!(a.attest(&again), Err(AttestError::Gone));
        // Reaped, its pid free for reuse: still gone, and its pinned
        // directory reads nothing more.
        child.wait().unwrap();
        assert_eq!(again.unchanged(), Err(AttestError::Gone));
        assert_eq!(a.attest(&again), Err(AttestError::Gone));
        assert!(read_proc_at(&again.dir, "status").is_err());
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
