//! A real software TPM per test.
//!
//! [`SoftTpm::start`] provisions a fresh `swtpm` state with `swtpm_setup`
//! (EK, EK certificate from a local CA that lives in the test's own temp
//! directory, SHA-256 PCR bank), starts `swtpm socket` on two free loopback
//! ports and waits until it accepts connections. Dropping it stops the TPM.
//! swtpm serves one client connection at a time, so each test uses its own.
//!
//! The EK certificate chain: `ekcerts/ek-rsa2048.crt` (DER, RSA-2048 EK,
//! subject `CN=unknown`, critical directoryName SAN, EKU 2.23.133.8.1) is
//! issued by [`SoftTpm::ek_intermediate_pem_path`] ("swtpm-localca"), which
//! is issued by the root [`SoftTpm::ek_root_pem_path`].
//!
//! Nothing here is skipped when the tools are missing: every entry point
//! fails loudly with the package to install.
#![forbid(unsafe_code)]

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// How long swtpm may take to listen after it was spawned.
const LISTEN_DEADLINE: Duration = Duration::from_secs(10);

/// A provisioned, running software TPM.
pub struct SoftTpm {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl std::fmt::Debug for SoftTpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftTpm")
            .field("dir", &self.dir.path())
            .field("port", &self.port)
            .field("running", &self.child.is_some())
            .finish()
    }
}

fn find_on_path(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join(tool))
            .find(|f| f.is_file())
    })
}

fn require(tool: &str, install: &str) -> anyhow::Result<PathBuf> {
    find_on_path(tool).with_context(|| {
        format!(
            "`{tool}` is not on PATH: install it (apt-get install -y {install}); \
             the TPM tests need a real software TPM and are never skipped"
        )
    })
}

/// Fails with a clear message unless tpm2-tools (the `tpm2_*` commands the
/// cross-check tests drive) are installed.
pub fn require_tpm2_tools() -> anyhow::Result<()> {
    for tool in [
        "tpm2_createek",
        "tpm2_createak",
        "tpm2_quote",
        "tpm2_pcrread",
        "tpm2_activatecredential",
        "tpm2_flushcontext",
        "tpm2_create",
        "tpm2_startauthsession",
        "tpm2_policysecret",
    ] {
        require(tool, "tpm2-tools")?;
    }
    Ok(())
}

/// Two consecutive free loopback ports (server, control). Only candidates:
/// another process may take them before swtpm binds, so callers retry.
fn free_port_pair() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let first = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        let port = first.local_addr()?.port();
        let Some(next) = port.checked_add(1) else {
            continue;
        };
        if TcpListener::bind((Ipv4Addr::LOCALHOST, next)).is_ok() {
            return Ok(port);
        }
    }
    bail!("found no two consecutive free loopback ports")
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let start = text.len().saturating_sub(2000);
    text.get(start..).unwrap_or_default().trim().to_owned()
}

impl SoftTpm {
    /// Provisions and starts a software TPM (about a second).
    pub fn start() -> anyhow::Result<SoftTpm> {
        require("swtpm", "swtpm swtpm-tools")?;
        require("swtpm_setup", "swtpm swtpm-tools")?;
        let localca = require("swtpm_localca", "swtpm swtpm-tools")?;
        let dir = tempfile::Builder::new().prefix("herald-swtpm-").tempdir()?;
        let d = dir.path();
        for sub in ["ca", "state", "ekcerts"] {
            std::fs::create_dir_all(d.join(sub))?;
        }
        std::fs::write(
            d.join("swtpm_setup.conf"),
            format!(
                "create_certs_tool= {}\n\
                 create_certs_tool_config = {}\n\
                 create_certs_tool_options = /etc/swtpm-localca.options\n\
                 active_pcr_banks = sha256\n",
                localca.display(),
                d.join("localca.conf").display()
            ),
        )?;
        std::fs::write(
            d.join("localca.conf"),
            format!(
                "statedir = {ca}\nsigningkey = {ca}/signkey.pem\n\
                 issuercert = {ca}/issuercert.pem\ncertserial = {ca}/certserial\n",
                ca = d.join("ca").display()
            ),
        )?;
        let out = Command::new("swtpm_setup")
            .args(["--tpm2", "--create-ek-cert", "--create-platform-cert"])
            .args(["--pcr-banks", "sha256", "--overwrite"])
            .arg("--tpmstate")
            .arg(d.join("state"))
            .arg("--config")
            .arg(d.join("swtpm_setup.conf"))
            .arg("--write-ek-cert-files")
            .arg(d.join("ekcerts"))
            .stdin(Stdio::null())
            .output()
            .context("running swtpm_setup (apt-get install -y swtpm swtpm-tools)")?;
        if !out.status.success() {
            bail!(
                "swtpm_setup failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for file in ["ekcerts/ek-rsa2048.crt", "ca/issuercert.pem"] {
            if !d.join(file).is_file() {
                bail!("swtpm_setup did not write {file} under {}", d.display());
            }
        }
        let mut tpm = SoftTpm {
            dir,
            port: 0,
            child: None,
        };
        let mut last = None;
        for _ in 0..8 {
            tpm.port = free_port_pair()?;
            match tpm.spawn() {
                Ok(()) => return Ok(tpm),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("swtpm did not start")))
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("swtpm.log")
    }

    /// Starts `swtpm socket` on `self.port` and waits (bounded) until the
    /// command port accepts a connection.
    fn spawn(&mut self) -> anyhow::Result<()> {
        let state = self.dir.path().join("state");
        let log = File::create(self.log_path())?;
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={},bindaddr=127.0.0.1", self.port))
            .arg("--ctrl")
            .arg(format!(
                "type=tcp,port={},bindaddr=127.0.0.1",
                u32::from(self.port) + 1
            ))
            .args(["--flags", "not-need-init,startup-clear"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting swtpm (apt-get install -y swtpm)")?;
        self.child = Some(child);
        let deadline = Instant::now() + LISTEN_DEADLINE;
        let mut pause = Duration::from_millis(2);
        loop {
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                self.child = None;
                bail!(
                    "swtpm exited at start ({status}) on ports {}/{}: {}",
                    self.port,
                    u32::from(self.port) + 1,
                    tail(&self.log_path())
                );
            }
            // The probe occupies swtpm's single client slot only until it
            // is dropped here.
            if TcpStream::connect_timeout(
                &(Ipv4Addr::LOCALHOST, self.port).into(),
                Duration::from_millis(200),
            )
            .is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                bail!(
                    "swtpm did not listen on port {} within {:?}: {}",
                    self.port,
                    LISTEN_DEADLINE,
                    tail(&self.log_path())
                );
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Power-cycles the TPM: kills swtpm and starts it again on the same
    /// state and ports (TPM2_Startup(CLEAR): PCRs reset, resetCount grows;
    /// persistent state such as NV and the EK seed survives).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        let deadline = Instant::now() + LISTEN_DEADLINE;
        loop {
            match self.spawn() {
                Ok(()) => return Ok(()),
                // The old listener may linger for a moment.
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// The TCTI string for tss-esapi / tpm2-tss: `swtpm:host=127.0.0.1,port=P`.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    /// The TPM command port (the control port is the next one).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The local CA's root certificate (PEM): the "manufacturer root".
    pub fn ek_root_pem_path(&self) -> PathBuf {
        self.dir.path().join("ca/swtpm-localca-rootca-cert.pem")
    }

    /// The local CA's issuing certificate (PEM), which signed the EK certificate.
    pub fn ek_intermediate_pem_path(&self) -> PathBuf {
        self.dir.path().join("ca/issuercert.pem")
    }

    /// The RSA-2048 EK certificate, DER (the same bytes as NV index 0x01c00002).
    pub fn ek_cert_der(&self) -> anyhow::Result<Vec<u8>> {
        let path = self.dir.path().join("ekcerts/ek-rsa2048.crt");
        std::fs::read(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// The temp directory holding state, CA and certificates (deleted on drop).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Environment for tpm2-tools commands against this TPM
    /// (`TPM2TOOLS_TCTI`).
    pub fn env_for_tools(&self) -> Vec<(String, String)> {
        vec![("TPM2TOOLS_TCTI".into(), self.tcti())]
    }

    /// Runs one tpm2-tools command (`args[0]` is the tool) against this
    /// TPM in `cwd` and returns its stdout; a failure carries the tool's
    /// stderr. Transient objects are not flushed: see [`Self::flush_transient`].
    pub fn tool(&self, cwd: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
        let Some((program, rest)) = args.split_first() else {
            bail!("no command");
        };
        let out = Command::new(program)
            .args(rest)
            .current_dir(cwd)
            .envs(self.env_for_tools())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {program} (apt-get install -y tpm2-tools)"))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }

    /// Flushes every transient object (`tpm2_flushcontext -t`): swtpm has
    /// three object slots and tpm2-tools leaves loaded contexts behind.
    pub fn flush_transient(&self, cwd: &Path) -> anyhow::Result<()> {
        self.tool(cwd, &["tpm2_flushcontext", "-t"]).map(drop)
    }
}

impl Drop for SoftTpm {
    fn drop(&mut self) {
        self.stop();
    }
}
