//! Strict big-endian TPM 2.0 unmarshalling: every read is bounds-checked
//! and returns a typed error; callers finish with [`Reader::end`] so that
//! trailing bytes are refused. Nothing here can panic on any input.

use super::TpmError;

/// A cursor over a TPM structure.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8], what: &'static str) -> Self {
        Self { buf, pos: 0, what }
    }

    fn short(&self) -> TpmError {
        TpmError::Malformed(format!("{} is truncated at byte {}", self.what, self.pos))
    }

    /// The current offset.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    /// The bytes between `from` and the current offset.
    pub(crate) fn since(&self, from: usize) -> &'a [u8] {
        self.buf.get(from..self.pos).unwrap_or_default()
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], TpmError> {
        let end = self.pos.checked_add(n).ok_or_else(|| self.short())?;
        let out = self.buf.get(self.pos..end).ok_or_else(|| self.short())?;
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], TpmError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.bytes(N)?);
        Ok(a)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, TpmError> {
        Ok(u8::from_be_bytes(self.array()?))
    }

    pub(crate) fn u16(&mut self) -> Result<u16, TpmError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, TpmError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, TpmError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    /// A TPM2B: u16 size, then that many bytes.
    pub(crate) fn tpm2b(&mut self) -> Result<&'a [u8], TpmError> {
        let n = self.u16()?;
        self.bytes(usize::from(n))
    }

    /// A TPM2B of at most `max` bytes (the union's size in the TPM's
    /// definition; a larger size is a malformed structure).
    pub(crate) fn tpm2b_max(&mut self, max: usize, field: &str) -> Result<&'a [u8], TpmError> {
        let v = self.tpm2b()?;
        if v.len() > max {
            return Err(TpmError::Malformed(format!(
                "{}: {field} is {} bytes (at most {max})",
                self.what,
                v.len()
            )));
        }
        Ok(v)
    }

    /// Refuses trailing bytes.
    pub(crate) fn end(&self) -> Result<(), TpmError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(TpmError::Malformed(format!(
                "{} has {} trailing bytes",
                self.what,
                self.buf.len().saturating_sub(self.pos)
            )))
        }
    }
}

/// Appends a TPM2B (u16 size ‖ bytes).
pub(crate) fn put_tpm2b(out: &mut Vec<u8>, data: &[u8]) -> Result<(), TpmError> {
    let n = u16::try_from(data.len())
        .map_err(|_| TpmError::Malformed("a TPM2B field is too long".into()))?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(data);
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn reads_are_big_endian_bounds_checked_and_end_is_strict() {
        let buf = [0x01, 0x02, 0x00, 0x02, 0xaa, 0xbb, 0xcc];
        let mut r = Reader::new(&buf, "test");
        assert_eq!(r.u16().unwrap(), 0x0102);
        assert_eq!(r.tpm2b().unwrap(), &[0xaa, 0xbb]);
        assert!(r.end().is_err());
        assert!(r.u16().is_err());
        assert_eq!(r.u8().unwrap(), 0xcc);
        r.end().unwrap();
        assert!(r.u8().is_err());
        let mut r = Reader::new(&[0xff, 0xff, 0], "test");
        assert!(r.tpm2b().is_err());
        let mut r = Reader::new(&[0, 3, 1, 2, 3], "test");
        assert!(r.tpm2b_max(2, "x").is_err());
    }
}
