//! The key-encryption key (KEK) that seals CA private keys at rest.
//!
//! Sealed blobs are `"HKE1" || nonce(12) || AES-256-GCM(ciphertext || tag)`,
//! with the key's identifier as associated data so a blob cannot be swapped
//! onto another key record.

use std::fs;
use std::io::Write;
use std::path::Path;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use base64::Engine;
use zeroize::Zeroizing;

use crate::CaError;

const MAGIC: &[u8; 4] = b"HKE1";
/// The environment variable that may hold the KEK (64 hex characters or base64 of 32 bytes).
pub const KEK_ENV: &str = "HERALD_KEK";

/// A 256-bit key-encryption key.
pub struct KeyEncryptionKey {
    key: LessSafeKey,
}

impl std::fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyEncryptionKey(..)")
    }
}

impl KeyEncryptionKey {
    /// Builds a KEK from 32 raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CaError> {
        let unbound = UnboundKey::new(&AES_256_GCM, bytes)
            .map_err(|_| CaError::Kek("a KEK must be exactly 32 bytes".into()))?;
        Ok(Self {
            key: LessSafeKey::new(unbound),
        })
    }

    /// Parses the textual form: 64 hex characters or base64 of 32 bytes
    /// (surrounding whitespace ignored).
    pub fn from_text(text: &str) -> Result<Self, CaError> {
        let t = text.trim();
        let bytes = Zeroizing::new(
            if t.len() == 64 && t.chars().all(|c| c.is_ascii_hexdigit()) {
                hex::decode(t).map_err(|e| CaError::Kek(e.to_string()))?
            } else {
                base64::engine::general_purpose::STANDARD
                    .decode(t)
                    .map_err(|_| {
                        CaError::Kek("KEK must be 64 hex characters or base64 of 32 bytes".into())
                    })?
            },
        );
        Self::from_bytes(&bytes)
    }

    /// Reads the KEK from a file (textual form). Refuses files readable by group or others.
    pub fn from_file(path: &Path) -> Result<Self, CaError> {
        let file_err = |reason: String| CaError::File {
            path: path.display().to_string(),
            reason,
        };
        check_private_mode(path).map_err(file_err)?;
        let text = Zeroizing::new(fs::read_to_string(path).map_err(|e| file_err(e.to_string()))?);
        Self::from_text(&text)
    }

    /// Generates a fresh random KEK and writes it to `path` (mode 0600, must not exist).
    pub fn generate_file(path: &Path) -> Result<Self, CaError> {
        let mut raw = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(raw.as_mut())
            .map_err(|_| CaError::Kek("system RNG failed".into()))?;
        let text = Zeroizing::new(hex::encode(raw.as_ref()));
        write_private_file(path, text.as_bytes()).map_err(|e| CaError::File {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Self::from_bytes(raw.as_ref())
    }

    /// Encrypts `plaintext`, binding it to `label`.
    pub fn seal(&self, label: &str, plaintext: &[u8]) -> Result<Vec<u8>, CaError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| CaError::Kek("system RNG failed".into()))?;
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(label.as_bytes()),
                &mut buf,
            )
            .map_err(|_| CaError::Kek("seal failed".into()))?;
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + buf.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        buf.fill(0);
        Ok(out)
    }

    /// Decrypts a blob made by [`seal`](Self::seal) with the same `label`.
    pub fn open(&self, label: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, CaError> {
        let rest = sealed
            .strip_prefix(MAGIC.as_slice())
            .ok_or_else(|| CaError::Kek("not a sealed key blob".into()))?;
        if rest.len() < NONCE_LEN {
            return Err(CaError::Kek("sealed blob truncated".into()));
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce)
            .map_err(|_| CaError::Kek("bad nonce".into()))?;
        let mut buf = Zeroizing::new(ct.to_vec());
        let plain_len = self
            .key
            .open_in_place(nonce, Aad::from(label.as_bytes()), buf.as_mut_slice())
            .map_err(|_| {
                CaError::Kek(
                    "cannot decrypt CA key: wrong key-encryption key or corrupted record".into(),
                )
            })?
            .len();
        buf.truncate(plain_len);
        Ok(buf)
    }
}

/// Writes `data` to a new file created with mode 0600 (never briefly wider).
pub fn write_private_file(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

/// Refuses a key file readable or writable by anyone but its owner.
pub fn check_private_mode(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = fs::metadata(path)
        .map_err(|e| e.to_string())?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "permissions {:o} are too open; a key file must be readable by its owner only (chmod 600)",
            mode & 0o777
        ));
    }
    Ok(())
}

/// Reads a file that holds a private key, refusing group/other-readable ones.
pub fn read_private_file(path: &Path) -> Result<Zeroizing<Vec<u8>>, CaError> {
    let file_err = |reason: String| CaError::File {
        path: path.display().to_string(),
        reason,
    };
    check_private_mode(path).map_err(file_err)?;
    fs::read(path)
        .map(Zeroizing::new)
        .map_err(|e| file_err(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_binding() {
        let kek = KeyEncryptionKey::from_text(&"11".repeat(32)).unwrap();
        let blob = kek.seal("key-a", b"secret key bytes").unwrap();
        assert!(!blob.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            kek.open("key-a", &blob).unwrap().as_slice(),
            b"secret key bytes"
        );
        assert!(kek.open("key-b", &blob).is_err(), "label binds the blob");
        let other = KeyEncryptionKey::from_text(&"22".repeat(32)).unwrap();
        assert!(
            other.open("key-a", &blob).is_err(),
            "another KEK cannot open it"
        );
        let mut tampered = blob.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(kek.open("key-a", &tampered).is_err());
        assert!(kek.open("key-a", b"HKE1short").is_err());
    }

    #[test]
    fn parses_text_forms() {
        assert!(KeyEncryptionKey::from_text(&"ab".repeat(32)).is_ok());
        assert!(
            KeyEncryptionKey::from_text("  AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n").is_ok()
        );
        assert!(KeyEncryptionKey::from_text("short").is_err());
        assert!(KeyEncryptionKey::from_text(&"ab".repeat(16)).is_err());
    }

    #[test]
    fn generated_file_is_0600_and_loads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kek");
        let a = KeyEncryptionKey::generate_file(&p).unwrap();
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let b = KeyEncryptionKey::from_file(&p).unwrap();
        let blob = a.seal("x", b"data").unwrap();
        assert_eq!(b.open("x", &blob).unwrap().as_slice(), b"data");
        assert!(
            KeyEncryptionKey::generate_file(&p).is_err(),
            "never overwrites"
        );
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let err = KeyEncryptionKey::from_file(&p).unwrap_err().to_string();
        assert!(err.contains("too open"), "{err}");
    }
}
