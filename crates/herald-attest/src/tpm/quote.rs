//! TPM2_Quote verification: the signature first, then a strict parse of
//! TPMS_ATTEST, the signer, the nonce, the PCR selection and the PCR digest.

use std::collections::{BTreeMap, BTreeSet};

use aws_lc_rs::digest;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};

use super::TpmError;
use super::marshal::Reader;
use super::public::{TpmPublic, alg, digest_alg, sec1_point};

/// TPM_GENERATED_VALUE: every TPMS_ATTEST the TPM makes starts with it.
const TPM_GENERATED: u32 = 0xff54_4347;
/// TPM_ST_ATTEST_QUOTE.
const ST_ATTEST_QUOTE: u16 = 0x8018;
/// TPM_RH_ENDORSEMENT, the root of an EK's qualified name.
const RH_ENDORSEMENT: u32 = 0x4000_000B;

/// A PCR bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PcrBank {
    /// SHA-1 (TPM_ALG_SHA1, 0x0004).
    Sha1,
    /// SHA-256 (TPM_ALG_SHA256, 0x000B).
    Sha256,
    /// SHA-384 (TPM_ALG_SHA384, 0x000C).
    Sha384,
}

impl PcrBank {
    /// The bank's TPM_ALG_ID.
    pub fn alg_id(self) -> u16 {
        match self {
            PcrBank::Sha1 => alg::SHA1,
            PcrBank::Sha256 => alg::SHA256,
            PcrBank::Sha384 => alg::SHA384,
        }
    }

    /// The bank for a TPM_ALG_ID.
    pub fn from_alg_id(id: u16) -> Option<PcrBank> {
        match id {
            alg::SHA1 => Some(PcrBank::Sha1),
            alg::SHA256 => Some(PcrBank::Sha256),
            alg::SHA384 => Some(PcrBank::Sha384),
            _ => None,
        }
    }

    /// The size of one PCR value in this bank.
    pub fn digest_len(self) -> usize {
        match self {
            PcrBank::Sha1 => 20,
            PcrBank::Sha256 => 32,
            PcrBank::Sha384 => 48,
        }
    }
}

/// PCRs 0 to 23: a three-byte select bitmap, as PC-client TPMs and
/// tpm2-tools / tss-esapi use.
const SIZE_OF_SELECT: u8 = 3;
/// count (u32) ‖ hash (u16) ‖ sizeofSelect (u8) ‖ 3 bitmap bytes.
const SELECTION_LEN: usize = 4 + 2 + 1 + SIZE_OF_SELECT as usize;

/// The PCRs a quote must cover: one bank, PCR indices 0 to 23.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PcrSelection {
    /// The bank.
    pub bank: PcrBank,
    /// PCR indices (0..=23).
    pub pcrs: BTreeSet<u8>,
}

impl PcrSelection {
    /// A selection; PCR indices above 23 are refused.
    pub fn new(bank: PcrBank, pcrs: impl IntoIterator<Item = u8>) -> Result<Self, TpmError> {
        let s = PcrSelection {
            bank,
            pcrs: pcrs.into_iter().collect(),
        };
        s.encode()?;
        Ok(s)
    }

    fn encode(&self) -> Result<[u8; SELECTION_LEN], TpmError> {
        let mut out = [0u8; SELECTION_LEN];
        out[..4].copy_from_slice(&1u32.to_be_bytes());
        out[4..6].copy_from_slice(&self.bank.alg_id().to_be_bytes());
        out[6] = SIZE_OF_SELECT;
        for p in &self.pcrs {
            let byte = out
                .get_mut(7 + usize::from(*p / 8))
                .ok_or_else(|| TpmError::Unsupported(format!("PCR {p} (only PCRs 0 to 23)")))?;
            *byte |= 1 << (p % 8);
        }
        Ok(out)
    }

    /// The marshalled TPML_PCR_SELECTION: count 1 (u32), then hash (u16),
    /// sizeofSelect 3 (u8) and the bitmap (PCR n is bit n % 8 of byte n / 8).
    pub fn marshal(&self) -> Result<Vec<u8>, TpmError> {
        Ok(self.encode()?.to_vec())
    }
}

/// What a quote is checked against.
#[derive(Debug, Clone, Copy)]
pub struct QuoteInput<'a> {
    /// The attestation key (checked again with
    /// [`check_attestation_key`](super::check_attestation_key)).
    pub ak: &'a TpmPublic,
    /// What TPMS_ATTEST.qualifiedSigner must be: the AK's *qualified*
    /// name, which is what a TPM reports (not `ak.name()`); for an AK made
    /// under the EK, [`qualified_name_under_ek`]`(ek, ak)`.
    pub expected_signer: &'a [u8],
    /// Marshalled TPMS_ATTEST.
    pub attest: &'a [u8],
    /// Marshalled TPMT_SIGNATURE.
    pub signature: &'a [u8],
    /// The qualifying data the quote must carry (the nonce binding).
    pub expected_extra_data: &'a [u8],
    /// The selection that was requested.
    pub selection: &'a PcrSelection,
    /// The PCR values reported, in ascending PCR order.
    pub pcr_values: &'a [Vec<u8>],
}

/// A quote that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedQuote {
    /// TPM clock, milliseconds.
    pub clock: u64,
    /// TPM resets (reboots) since manufacture.
    pub reset_count: u32,
    /// TPM restarts/resumes since the last reset.
    pub restart_count: u32,
    /// Whether the clock value is known not to have gone backwards.
    pub safe: bool,
    /// The TPM vendor's firmware version.
    pub firmware_version: u64,
    /// PCR index → value, as reported and proven by the digest.
    pub pcrs: BTreeMap<u8, Vec<u8>>,
}

/// The qualified name of `ak` when it is a child of the primary `ek` in
/// the endorsement hierarchy (Part 1 §16: QN(obj) = nameAlg ‖
/// H_nameAlg(QN(parent) ‖ Name(obj)), and a hierarchy's QN is its handle).
/// A quote names its signer this way — TPMS_ATTEST.qualifiedSigner is the
/// qualified name, not the name — so matching it also proves the AK sits
/// directly under this EK.
pub fn qualified_name_under_ek(ek: &TpmPublic, ak: &TpmPublic) -> Result<Vec<u8>, TpmError> {
    fn qualify(name_alg: u16, parent_qn: &[u8], name: &[u8]) -> Result<Vec<u8>, TpmError> {
        let Some(algorithm) = digest_alg(name_alg) else {
            return Err(TpmError::Unsupported(format!(
                "qualified names with name algorithm {name_alg:#06x}"
            )));
        };
        let mut ctx = digest::Context::new(algorithm);
        ctx.update(parent_qn);
        ctx.update(name);
        let mut qn = name_alg.to_be_bytes().to_vec();
        qn.extend_from_slice(ctx.finish().as_ref());
        Ok(qn)
    }
    let ek_qn = qualify(ek.name_alg, &RH_ENDORSEMENT.to_be_bytes(), &ek.name()?)?;
    qualify(ak.name_alg, &ek_qn, &ak.name()?)
}

/// Parses TPMT_SIGNATURE (ECDSA/SHA-256) into the fixed r ‖ s form,
/// left-padding each half (TPMs drop leading zeros; high-S is legal).
fn ecdsa_fixed(signature: &[u8]) -> Result<[u8; 64], TpmError> {
    let mut r = Reader::new(signature, "TPMT_SIGNATURE");
    let sig_alg = r.u16()?;
    let hash = r.u16()?;
    if sig_alg != alg::ECDSA || hash != alg::SHA256 {
        return Err(TpmError::QuoteSignatureInvalid(format!(
            "signature scheme {sig_alg:#06x}/{hash:#06x} (ECDSA/SHA-256 expected)"
        )));
    }
    let sr = r.tpm2b()?;
    let ss = r.tpm2b()?;
    r.end()?;
    let mut out = [0u8; 64];
    for (half, v) in [(0usize, sr), (32, ss)] {
        if v.is_empty() || v.len() > 32 {
            return Err(TpmError::Malformed("ECDSA r or s has a bad length".into()));
        }
        out[half + 32 - v.len()..half + 32].copy_from_slice(v);
    }
    Ok(out)
}

/// The fields of a TPMS_ATTEST of type quote, borrowed from its bytes.
#[derive(Debug)]
struct QuoteAttest<'a> {
    qualified_signer: &'a [u8],
    extra_data: &'a [u8],
    clock: u64,
    reset_count: u32,
    restart_count: u32,
    safe: bool,
    firmware_version: u64,
    /// The marshalled TPML_PCR_SELECTION, as signed.
    pcr_select: &'a [u8],
    pcr_digest: &'a [u8],
}

/// Most banks a TPML_PCR_SELECTION may list (HASH_COUNT in practice is ≤ 5).
const MAX_BANKS: u32 = 16;

/// Strict TPMS_ATTEST parse for a quote: magic, type, every field, no
/// trailing bytes.
fn parse_quote_attest(attest: &[u8]) -> Result<QuoteAttest<'_>, TpmError> {
    let mut r = Reader::new(attest, "TPMS_ATTEST");
    if r.u32()? != TPM_GENERATED {
        return Err(TpmError::Malformed(
            "TPMS_ATTEST magic is not TPM_GENERATED".into(),
        ));
    }
    if r.u16()? != ST_ATTEST_QUOTE {
        return Err(TpmError::Malformed("the attestation is not a quote".into()));
    }
    // TPM2B_NAME (at most alg ‖ SHA-512) and TPM2B_DATA (at most a digest).
    let qualified_signer = r.tpm2b_max(66, "qualifiedSigner")?;
    let extra_data = r.tpm2b_max(64, "extraData")?;
    let clock = r.u64()?;
    let reset_count = r.u32()?;
    let restart_count = r.u32()?;
    let safe = match r.u8()? {
        0 => false,
        1 => true,
        _ => {
            return Err(TpmError::Malformed(
                "clockInfo.safe is not a boolean".into(),
            ));
        }
    };
    let firmware_version = r.u64()?;
    let select_start = r.pos();
    let count = r.u32()?;
    if count > MAX_BANKS {
        return Err(TpmError::Malformed("too many PCR banks".into()));
    }
    for _ in 0..count {
        r.u16()?;
        let size = r.u8()?;
        r.bytes(usize::from(size))?;
    }
    let pcr_select = r.since(select_start);
    let pcr_digest = r.tpm2b_max(64, "pcrDigest")?;
    r.end()?;
    Ok(QuoteAttest {
        qualified_signer,
        extra_data,
        clock,
        reset_count,
        restart_count,
        safe,
        firmware_version,
        pcr_select,
        pcr_digest,
    })
}

/// Verifies a quote, in this order: the TPMT_SIGNATURE parses (ECDSA,
/// SHA-256, r and s of at most 32 bytes, left-padded) and verifies with
/// the AK's P-256 point over the attestation bytes (high-S accepted, as
/// TPMs make them) — nothing in TPMS_ATTEST is trusted before; then the
/// strict TPMS_ATTEST parse (magic 0xff544347, type quote 0x8018, no
/// trailing bytes); the qualified signer equals `expected_signer`;
/// extraData equals `expected_extra_data` (constant time); the
/// TPML_PCR_SELECTION is byte for byte the requested one; pcrDigest is
/// SHA-256 (the AK's scheme hash) of the reported values concatenated.
///
/// The AK is re-checked with
/// [`check_attestation_key`](super::check_attestation_key). The only
/// allocations are the returned PCR map's.
pub fn verify_quote(q: &QuoteInput<'_>) -> Result<VerifiedQuote, TpmError> {
    super::check_attestation_key(q.ak)?;
    // Signature first: nothing in TPMS_ATTEST is trusted before it.
    let sig = ecdsa_fixed(q.signature)?;
    let mut point = [0u8; 133];
    let point = sec1_point(q.ak, &mut point)
        .and_then(|n| point.get(..n))
        .ok_or_else(|| TpmError::AkRefused("not a P-256 key".into()))?;
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
        .verify(q.attest, &sig)
        .map_err(|_| {
            TpmError::QuoteSignatureInvalid(
                "the quote's signature does not verify with the AK".into(),
            )
        })?;

    let a = parse_quote_attest(q.attest)?;
    if a.qualified_signer != q.expected_signer {
        return Err(TpmError::QuoteSignerMismatch);
    }
    if aws_lc_rs::constant_time::verify_slices_are_equal(a.extra_data, q.expected_extra_data)
        .is_err()
    {
        return Err(TpmError::NonceMismatch);
    }
    if a.pcr_select != q.selection.encode()?.as_slice() {
        return Err(TpmError::PcrSelectionMismatch);
    }
    let len = q.selection.bank.digest_len();
    if q.pcr_values.len() != q.selection.pcrs.len() || q.pcr_values.iter().any(|v| v.len() != len) {
        return Err(TpmError::PcrDigestMismatch);
    }
    let mut ctx = digest::Context::new(&digest::SHA256);
    for v in q.pcr_values {
        ctx.update(v);
    }
    if ctx.finish().as_ref() != a.pcr_digest {
        return Err(TpmError::PcrDigestMismatch);
    }
    Ok(VerifiedQuote {
        clock: a.clock,
        reset_count: a.reset_count,
        restart_count: a.restart_count,
        safe: a.safe,
        firmware_version: a.firmware_version,
        pcrs: q
            .selection
            .pcrs
            .iter()
            .copied()
            .zip(q.pcr_values.iter().cloned())
            .collect(),
    })
}

/// SHA-256(nonce ‖ SubjectPublicKeyInfo DER): the qualifying data the
/// agent passes to TPM2_Quote and the server gives [`verify_quote`] as
/// `expected_extra_data`. `nonce` is the server's single-use random
/// challenge (fixed length, 32 bytes, so the concatenation is
/// unambiguous); `csr_spki_der` is the DER SubjectPublicKeyInfo of the key
/// in the agent's CSR. It binds the node SVID's key to this TPM and this
/// attestation: a quote cannot be replayed for another key, nor a key
/// presented with another attestation's quote.
pub fn attestation_nonce_binding(nonce: &[u8], csr_spki_der: &[u8]) -> [u8; 32] {
    let mut ctx = digest::Context::new(&digest::SHA256);
    ctx.update(nonce);
    ctx.update(csr_spki_der);
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
    use super::*;
    use crate::tpm::public::{attributes, curve};
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use herald_core::ErrorCode;
    use proptest::prelude::*;

    /// A software "TPM": a P-256 key, its AK public area, and quotes it signs.
    struct Fixture {
        key: EcdsaKeyPair,
        ak: TpmPublic,
        signer: Vec<u8>,
        nonce: [u8; 32],
        selection: PcrSelection,
        pcrs: Vec<Vec<u8>>,
    }

    fn ak_public(point: &[u8], attrs: u32) -> TpmPublic {
        let mut b = Vec::new();
        b.extend_from_slice(&alg::ECC.to_be_bytes());
        b.extend_from_slice(&alg::SHA256.to_be_bytes());
        b.extend_from_slice(&attrs.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&alg::NULL.to_be_bytes());
        b.extend_from_slice(&alg::ECDSA.to_be_bytes());
        b.extend_from_slice(&alg::SHA256.to_be_bytes());
        b.extend_from_slice(&curve::NIST_P256.to_be_bytes());
        b.extend_from_slice(&alg::NULL.to_be_bytes());
        for c in [&point[1..33], &point[33..65]] {
            b.extend_from_slice(&32u16.to_be_bytes());
            b.extend_from_slice(c);
        }
        TpmPublic::parse(&b).unwrap()
    }

    const AK_ATTRS: u32 = attributes::FIXED_TPM
        | attributes::FIXED_PARENT
        | attributes::SENSITIVE_DATA_ORIGIN
        | attributes::USER_WITH_AUTH
        | attributes::RESTRICTED
        | attributes::SIGN;

    fn tpm2b(out: &mut Vec<u8>, v: &[u8]) {
        out.extend_from_slice(&(v.len() as u16).to_be_bytes());
        out.extend_from_slice(v);
    }

    impl Fixture {
        fn new() -> Fixture {
            let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
            let ak = ak_public(key.public_key().as_ref(), AK_ATTRS);
            let signer = ak.name().unwrap();
            let pcrs: Vec<Vec<u8>> = (0u8..4).map(|i| vec![i; 32]).collect();
            Fixture {
                key,
                ak,
                signer,
                nonce: attestation_nonce_binding(&[9; 32], b"spki"),
                selection: PcrSelection::new(PcrBank::Sha256, [0, 1, 2, 7]).unwrap(),
                pcrs,
            }
        }

        fn attest(&self) -> Vec<u8> {
            let mut digest = digest::Context::new(&digest::SHA256);
            for v in &self.pcrs {
                digest.update(v);
            }
            let mut a = Vec::new();
            a.extend_from_slice(&TPM_GENERATED.to_be_bytes());
            a.extend_from_slice(&ST_ATTEST_QUOTE.to_be_bytes());
            tpm2b(&mut a, &self.signer);
            tpm2b(&mut a, &self.nonce);
            a.extend_from_slice(&1234u64.to_be_bytes());
            a.extend_from_slice(&5u32.to_be_bytes());
            a.extend_from_slice(&6u32.to_be_bytes());
            a.push(1);
            a.extend_from_slice(&0x2019_1023_0016_3100u64.to_be_bytes());
            a.extend_from_slice(&self.selection.marshal().unwrap());
            tpm2b(&mut a, digest.finish().as_ref());
            a
        }

        /// TPMT_SIGNATURE over `attest`, r and s without leading zeros.
        fn sign(&self, attest: &[u8]) -> Vec<u8> {
            let sig = self.key.sign(&SystemRandom::new(), attest).unwrap();
            let (r, s) = sig.as_ref().split_at(32);
            tpm_signature(r, s)
        }

        fn input<'a>(&'a self, attest: &'a [u8], sig: &'a [u8]) -> QuoteInput<'a> {
            QuoteInput {
                ak: &self.ak,
                expected_signer: &self.signer,
                attest,
                signature: sig,
                expected_extra_data: &self.nonce,
                selection: &self.selection,
                pcr_values: &self.pcrs,
            }
        }
    }

    fn trim(v: &[u8]) -> &[u8] {
        let first = v.iter().position(|b| *b != 0).unwrap_or(v.len() - 1);
        &v[first..]
    }

    fn tpm_signature(r: &[u8], s: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&alg::ECDSA.to_be_bytes());
        out.extend_from_slice(&alg::SHA256.to_be_bytes());
        tpm2b(&mut out, trim(r));
        tpm2b(&mut out, trim(s));
        out
    }

    fn code(r: Result<VerifiedQuote, TpmError>) -> ErrorCode {
        r.unwrap_err().code()
    }

    #[test]
    fn selection_marshalling_is_tpml_pcr_selection() {
        let s = PcrSelection::new(PcrBank::Sha256, [0, 1, 2, 7, 23]).unwrap();
        assert_eq!(
            s.marshal().unwrap(),
            [0, 0, 0, 1, 0, 0x0b, 3, 0x87, 0, 0x80]
        );
        let s = PcrSelection::new(PcrBank::Sha384, [8, 16]).unwrap();
        assert_eq!(s.marshal().unwrap(), [0, 0, 0, 1, 0, 0x0c, 3, 0, 1, 1]);
        let s = PcrSelection::new(PcrBank::Sha1, []).unwrap();
        assert_eq!(s.marshal().unwrap(), [0, 0, 0, 1, 0, 0x04, 3, 0, 0, 0]);
        assert_eq!(
            PcrSelection::new(PcrBank::Sha256, [24]).unwrap_err().code(),
            ErrorCode::TpmStructureMalformed
        );
        for b in [PcrBank::Sha1, PcrBank::Sha256, PcrBank::Sha384] {
            assert_eq!(PcrBank::from_alg_id(b.alg_id()), Some(b));
        }
    }

    #[test]
    fn a_well_formed_quote_verifies_and_reports_its_fields() {
        let f = Fixture::new();
        let attest = f.attest();
        let sig = f.sign(&attest);
        let q = verify_quote(&f.input(&attest, &sig)).unwrap();
        assert_eq!(
            (q.clock, q.reset_count, q.restart_count, q.safe),
            (1234, 5, 6, true)
        );
        assert_eq!(q.firmware_version, 0x2019_1023_0016_3100);
        assert_eq!(q.pcrs.keys().copied().collect::<Vec<_>>(), [0, 1, 2, 7]);
        assert_eq!(q.pcrs[&7], vec![3u8; 32]);
    }

    /// n − s for P-256, big-endian.
    fn negate(s: &[u8]) -> Vec<u8> {
        const N: [u8; 32] = [
            0xFF, 0xFF, 0xFF, 0xFF, 0x00, 0x00, 0x00, 0x00, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF,
            0xFF, 0xFF, 0xBC, 0xE6, 0xFA, 0xAD, 0xA7, 0x17, 0x9E, 0x84, 0xF3, 0xB9, 0xCA, 0xC2,
            0xFC, 0x63, 0x25, 0x51,
        ];
        let mut out = vec![0u8; 32];
        let mut borrow = 0i16;
        for i in (0..32).rev() {
            let mut d = i16::from(N[i]) - i16::from(s[i]) - borrow;
            borrow = i16::from(d < 0);
            if d < 0 {
                d += 256;
            }
            out[i] = d as u8;
        }
        out
    }

    #[test]
    fn high_s_and_short_r_s_are_accepted_long_ones_refused() {
        let f = Fixture::new();
        let attest = f.attest();
        // Both s and n − s verify: TPMs do not normalise to low S.
        let sig = f.key.sign(&SystemRandom::new(), &attest).unwrap();
        let (r, s) = sig.as_ref().split_at(32);
        verify_quote(&f.input(&attest, &tpm_signature(r, s))).unwrap();
        verify_quote(&f.input(&attest, &tpm_signature(r, &negate(s)))).unwrap();
        // Fixed-width (zero-padded) halves are fine too.
        let mut padded = Vec::new();
        padded.extend_from_slice(&alg::ECDSA.to_be_bytes());
        padded.extend_from_slice(&alg::SHA256.to_be_bytes());
        tpm2b(&mut padded, r);
        tpm2b(&mut padded, s);
        verify_quote(&f.input(&attest, &padded)).unwrap();
        // A leading zero r (1 in 256 signatures) is left-padded.
        let short = loop {
            let sig = f.key.sign(&SystemRandom::new(), &attest).unwrap();
            if sig.as_ref()[0] == 0 {
                break sig;
            }
        };
        let (r, s) = short.as_ref().split_at(32);
        let tpm_sig = tpm_signature(r, s);
        assert!(u16::from_be_bytes([tpm_sig[4], tpm_sig[5]]) < 32);
        verify_quote(&f.input(&attest, &tpm_sig)).unwrap();
        // 33-byte halves are malformed, whatever their value.
        let mut long = Vec::new();
        long.extend_from_slice(&alg::ECDSA.to_be_bytes());
        long.extend_from_slice(&alg::SHA256.to_be_bytes());
        tpm2b(&mut long, &[&[0u8][..], r].concat());
        tpm2b(&mut long, s);
        assert_eq!(
            code(verify_quote(&f.input(&attest, &long))),
            ErrorCode::TpmStructureMalformed
        );
        // Another scheme is refused.
        let mut rsa = tpm_sig.clone();
        rsa[..2].copy_from_slice(&alg::RSASSA.to_be_bytes());
        assert_eq!(
            code(verify_quote(&f.input(&attest, &rsa))),
            ErrorCode::TpmQuoteSignatureInvalid
        );
        let mut trailing = tpm_sig.clone();
        trailing.push(0);
        assert_eq!(
            code(verify_quote(&f.input(&attest, &trailing))),
            ErrorCode::TpmStructureMalformed
        );
    }

    #[test]
    fn every_field_is_checked_after_the_signature() {
        let f = Fixture::new();
        let good = f.attest();
        // A well-signed attestation with one field changed.
        let resigned = |edit: &dyn Fn(&mut Vec<u8>)| {
            let mut a = good.clone();
            edit(&mut a);
            let s = f.sign(&a);
            (a, s)
        };
        let check = |edit: &dyn Fn(&mut Vec<u8>)| {
            let (a, s) = resigned(edit);
            code(verify_quote(&f.input(&a, &s)))
        };
        let signer_at = 6 + 2;
        let extra_at = signer_at + 34 + 2;
        let safe_at = extra_at + 32 + 8 + 4 + 4;
        let select_at = safe_at + 1 + 8;
        assert_eq!(check(&|a| a[0] ^= 1), ErrorCode::TpmStructureMalformed);
        assert_eq!(check(&|a| a[5] = 0x17), ErrorCode::TpmStructureMalformed);
        assert_eq!(
            check(&|a| a[signer_at + 5] ^= 1),
            ErrorCode::TpmQuoteSignerMismatch
        );
        assert_eq!(check(&|a| a[extra_at] ^= 1), ErrorCode::TpmNonceMismatch);
        assert_eq!(check(&|a| a[safe_at] = 2), ErrorCode::TpmStructureMalformed);
        assert_eq!(
            check(&|a| a[select_at + 5] = 0x0c),
            ErrorCode::TpmPcrSelectionMismatch
        );
        assert_eq!(
            check(&|a| a[select_at + 7] ^= 0x08),
            ErrorCode::TpmPcrSelectionMismatch
        );
        assert_eq!(check(&|a| a.push(0)), ErrorCode::TpmStructureMalformed);
        let digest_at = good.len() - 32;
        assert_eq!(
            check(&|a| a[digest_at] ^= 1),
            ErrorCode::TpmPcrDigestMismatch
        );
        // sizeofSelect 4 with a zero fourth byte: the same PCRs, but not the
        // selection that was requested, byte for byte.
        let wide = |a: &mut Vec<u8>| {
            a[select_at + 6] = 4;
            a.insert(select_at + 10, 0);
        };
        assert_eq!(check(&wide), ErrorCode::TpmPcrSelectionMismatch);
        // Two banks.
        let two = |a: &mut Vec<u8>| {
            a[select_at + 3] = 2;
            let bank = a[select_at + 4..select_at + 10].to_vec();
            for (i, b) in bank.into_iter().enumerate() {
                a.insert(select_at + 10 + i, b);
            }
        };
        assert_eq!(check(&two), ErrorCode::TpmPcrSelectionMismatch);

        // Reported values: wrong count, wrong size, wrong value.
        let sig = f.sign(&good);
        let mut input = f.input(&good, &sig);
        let three = f.pcrs[..3].to_vec();
        input.pcr_values = &three;
        assert_eq!(code(verify_quote(&input)), ErrorCode::TpmPcrDigestMismatch);
        let mut short = f.pcrs.clone();
        short[0].pop();
        input.pcr_values = &short;
        assert_eq!(code(verify_quote(&input)), ErrorCode::TpmPcrDigestMismatch);
        let mut other = f.pcrs.clone();
        other[3][0] ^= 1;
        input.pcr_values = &other;
        assert_eq!(code(verify_quote(&input)), ErrorCode::TpmPcrDigestMismatch);

        // An unrestricted AK is refused before anything else.
        let point = f.key.public_key().as_ref().to_vec();
        let loose = ak_public(&point, AK_ATTRS & !attributes::RESTRICTED);
        let mut input = f.input(&good, &sig);
        input.ak = &loose;
        assert_eq!(code(verify_quote(&input)), ErrorCode::TpmAkRefused);
        // A tampered attestation fails on the signature, before parsing.
        let mut bad = good.clone();
        bad[0] ^= 1;
        assert_eq!(
            code(verify_quote(&f.input(&bad, &sig))),
            ErrorCode::TpmQuoteSignatureInvalid
        );
    }

    #[test]
    fn every_truncation_of_a_signed_attestation_is_malformed() {
        let f = Fixture::new();
        let good = f.attest();
        for n in 0..good.len() {
            let a = &good[..n];
            let s = f.sign(a);
            assert_eq!(
                code(verify_quote(&f.input(a, &s))),
                ErrorCode::TpmStructureMalformed,
                "truncated at {n}"
            );
        }
        let sig = f.sign(&good);
        for n in 0..sig.len() {
            assert!(verify_quote(&f.input(&good, &sig[..n])).is_err());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn parsers_never_panic_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = TpmPublic::parse(&bytes);
            let _ = parse_quote_attest(&bytes);
            let _ = ecdsa_fixed(&bytes);
        }

        #[test]
        fn mutated_signed_quotes_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let f = Fixture::new();
            let mut a = f.attest();
            for (i, v) in &edits {
                let i = i.index(a.len());
                a[i] = *v;
            }
            a.truncate(cut.index(a.len() + 1).max(1));
            let s = f.sign(&a);
            let _ = verify_quote(&f.input(&a, &s));
            let mut p = f.ak.as_bytes().to_vec();
            for (i, v) in &edits {
                let i = i.index(p.len());
                p[i] = *v;
            }
            let _ = TpmPublic::parse(&p);
        }
    }
}
