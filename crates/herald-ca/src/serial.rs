//! Credential serial numbers: 16 bytes that sort by issue time.
//!
//! Every credential Herald issues — X.509 SVID, JWT-SVID (as its `jti`),
//! session credentials, and the CA certificates themselves — is keyed by
//! its serial in the datastore. A random serial lands each new record on a
//! random leaf of every index keyed by it, so a transaction of 16
//! issuances rewrote about 16 leaves of the serial index (and, for
//! renewals, of the parent-serial index). Serials that begin with the issue
//! time land on the index's rightmost leaf instead; measured on the real
//! schema, WAL frames per issuance at 16 per transaction fall from 3.6 to
//! 2.4 for mints and from 4.0 to 2.4 for renewals (docs/performance.md).
//!
//! Layout, big-endian:
//!
//! | byte | content |
//! |---|---|
//! | 0 | `0x40`: positive, and its high nibble non-zero, so the DER INTEGER is always 16 bytes and its hex never loses a leading zero |
//! | 1–6 | Unix time in milliseconds (48 bits: until the year 10889) |
//! | 7–15 | 72 bits from the system CSPRNG |
//!
//! The CA/Browser Forum's baseline requirements ask for at least 64 bits of
//! CSPRNG output in a serial (7.1); the 72 random bits also keep serials
//! unique among replicas issuing in the same millisecond. The issue time a
//! serial reveals is in the credential already (`notBefore`, `iat`).

use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use rcgen::SerialNumber;

use crate::CaError;

/// Length of a serial in bytes.
pub const SERIAL_LEN: usize = 16;

/// Length of a serial's random tail in bytes.
pub const RANDOM_BYTES: usize = 9;

const PREFIX: u8 = 0x40;
const TIME_BYTES: usize = 6;

/// A credential serial number.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Serial([u8; SERIAL_LEN]);

impl Serial {
    /// A new serial for a credential issued now.
    pub fn generate() -> Result<Serial, CaError> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let mut random = [0u8; RANDOM_BYTES];
        SystemRandom::new()
            .fill(&mut random)
            .map_err(|_| CaError::Generate("system RNG failed".into()))?;
        Ok(Serial::at(now_ms as u64, random))
    }

    /// The serial for a credential issued at `unix_ms` with `random` as its
    /// tail (which must come from a CSPRNG).
    pub fn at(unix_ms: u64, random: [u8; RANDOM_BYTES]) -> Serial {
        let mut b = [0u8; SERIAL_LEN];
        b[0] = PREFIX;
        b[1..=TIME_BYTES].copy_from_slice(&unix_ms.to_be_bytes()[8 - TIME_BYTES..]);
        b[1 + TIME_BYTES..].copy_from_slice(&random);
        Serial(b)
    }

    /// The serial's bytes (the DER INTEGER's content).
    pub fn as_bytes(&self) -> &[u8; SERIAL_LEN] {
        &self.0
    }

    /// Lowercase hex, as the datastore and audit log record it.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub(crate) fn to_rcgen(self) -> SerialNumber {
        SerialNumber::from_slice(&self.0)
    }
}

impl std::fmt::Debug for Serial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Serial({})", self.to_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_sort_by_issue_time_as_bytes_and_as_hex() {
        let times = [
            0u64,
            1,
            999,
            1_000,
            1_764_900_000_000,
            1_764_900_000_001,
            (1 << 48) - 1,
        ];
        // The largest tail first: the time decides, whatever the tail.
        let tails = [[0xff; RANDOM_BYTES], [0; RANDOM_BYTES]];
        let serials: Vec<Serial> = times
            .iter()
            .enumerate()
            .map(|(i, t)| Serial::at(*t, tails[i % 2]))
            .collect();
        for w in serials.windows(2) {
            assert!(w[0] < w[1], "{:?} !< {:?}", w[0], w[1]);
            assert!(w[0].to_hex() < w[1].to_hex());
        }
    }

    #[test]
    fn a_serial_is_a_positive_sixteen_byte_integer_with_a_random_tail() {
        let a = Serial::generate().unwrap();
        let b = Serial::generate().unwrap();
        assert_eq!(a.as_bytes()[0], 0x40);
        assert_ne!(
            a, b,
            "the random tail tells apart serials of one millisecond"
        );
        assert_ne!(a.as_bytes()[7..], b.as_bytes()[7..]);
        assert_eq!(a.to_hex().len(), 32);
        let ms = |s: &Serial| {
            let t = &s.as_bytes()[1..7];
            u64::from_be_bytes([0, 0, t[0], t[1], t[2], t[3], t[4], t[5]])
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(ms(&a) <= ms(&b) && ms(&b) <= now && now - ms(&a) < 60_000);
        let s = Serial::at(1_764_900_000_000, [7; RANDOM_BYTES]);
        assert_eq!(ms(&s), 1_764_900_000_000);
        assert_eq!(s.to_hex(), "40019aec3cd100070707070707070707");
    }
}
