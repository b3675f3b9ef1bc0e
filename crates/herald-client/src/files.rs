//! Credentials on disk: `svid.pem` (leaf then intermediates), `svid.key`
//! (PKCS#8, mode 0600) and `bundle.pem`, each replaced atomically so a
//! reader never sees a half-written or mismatched pair.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::ClientError;

/// File names inside an SVID directory.
pub const SVID_FILE: &str = "svid.pem";
/// The private key file.
pub const KEY_FILE: &str = "svid.key";
/// The trust bundle file.
pub const BUNDLE_FILE: &str = "bundle.pem";

/// An SVID with its key and bundle.
pub struct SvidFiles {
    /// Leaf first, DER.
    pub cert_chain: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub key_pkcs8: Vec<u8>,
    /// Trust anchors, DER.
    pub bundle: Vec<Vec<u8>>,
}

fn io_err(path: &Path, e: impl std::fmt::Display) -> ClientError {
    ClientError::Io(format!("{}: {e}", path.display()))
}

/// PEM-encodes DER blocks with `tag`.
pub fn to_pem(tag: &str, ders: &[Vec<u8>]) -> String {
    ders.iter()
        .map(|d| pem::encode(&pem::Pem::new(tag, d.clone())))
        .collect()
}

/// Parses every PEM block with `tag`.
pub fn from_pem(tag: &str, text: &str) -> Result<Vec<Vec<u8>>, String> {
    Ok(pem::parse_many(text)
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|p| p.tag() == tag)
        .map(|p| p.into_contents())
        .collect())
}

/// Writes `data` to `path` atomically: a temporary file created with `mode`
/// in the same directory, synced, then renamed over the target.
pub fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), ClientError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| ClientError::Io(format!("{}: not a file path", path.display())))?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io_err(&tmp, e))?;
    f.write_all(data).map_err(|e| io_err(&tmp, e))?;
    f.sync_all().map_err(|e| io_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| io_err(path, e))
}

/// The subdirectory of an SVID directory holding federated bundles.
pub const FEDERATED_DIR: &str = "federated";

/// Writes each foreign trust domain's bundle as `federated/<td>.pem` in
/// `dir` and removes the files of trust domains no longer given.
pub fn write_federated_bundles(
    dir: &Path,
    bundles: &[(String, Vec<Vec<u8>>)],
) -> Result<(), ClientError> {
    let fed = dir.join(FEDERATED_DIR);
    if !fed.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&fed)
            .map_err(|e| io_err(&fed, e))?;
    }
    let mut keep = Vec::new();
    for (td, certs) in bundles {
        // A trust domain name has no path separators (it was validated by
        // the server), but a hostile one must not escape the directory.
        let td = td.strip_prefix("spiffe://").unwrap_or(td);
        if td.is_empty() || td.contains('/') || td.starts_with('.') {
            return Err(ClientError::Io(format!(
                "unusable trust domain name {td:?}"
            )));
        }
        let name = format!("{td}.pem");
        write_atomic(
            &fed.join(&name),
            to_pem("CERTIFICATE", certs).as_bytes(),
            0o644,
        )?;
        keep.push(name);
    }
    for entry in fs::read_dir(&fed).map_err(|e| io_err(&fed, e))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".pem") && !keep.contains(&name) {
            fs::remove_file(entry.path()).map_err(|e| io_err(&entry.path(), e))?;
        }
    }
    Ok(())
}

/// Writes an SVID directory (created 0700 if missing). The key is written
/// first so `svid.pem` never names a key that is not yet on disk.
pub fn write_svid_dir(dir: &Path, svid: &SvidFiles) -> Result<(), ClientError> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| io_err(dir, e))?;
    }
    write_atomic(
        &dir.join(KEY_FILE),
        to_pem("PRIVATE KEY", std::slice::from_ref(&svid.key_pkcs8)).as_bytes(),
        0o600,
    )?;
    write_atomic(
        &dir.join(SVID_FILE),
        to_pem("CERTIFICATE", &svid.cert_chain).as_bytes(),
        0o644,
    )?;
    write_atomic(
        &dir.join(BUNDLE_FILE),
        to_pem("CERTIFICATE", &svid.bundle).as_bytes(),
        0o644,
    )?;
    Ok(())
}

/// Reads an SVID directory written by [`write_svid_dir`].
pub fn read_svid_dir(dir: &Path) -> Result<SvidFiles, ClientError> {
    let read = |name: &str| {
        let p = dir.join(name);
        fs::read_to_string(&p).map_err(|e| io_err(&p, e))
    };
    let cert_chain =
        from_pem("CERTIFICATE", &read(SVID_FILE)?).map_err(|e| io_err(&dir.join(SVID_FILE), e))?;
    let mut keys =
        from_pem("PRIVATE KEY", &read(KEY_FILE)?).map_err(|e| io_err(&dir.join(KEY_FILE), e))?;
    let bundle = from_pem("CERTIFICATE", &read(BUNDLE_FILE)?)
        .map_err(|e| io_err(&dir.join(BUNDLE_FILE), e))?;
    if cert_chain.is_empty() || keys.len() != 1 || bundle.is_empty() {
        return Err(ClientError::Io(format!(
            "{}: expected a certificate chain, one PKCS#8 key and a bundle",
            dir.display()
        )));
    }
    Ok(SvidFiles {
        cert_chain,
        key_pkcs8: keys.remove(0),
        bundle,
    })
}
