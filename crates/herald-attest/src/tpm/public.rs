//! TPMT_PUBLIC: the public area of a TPM key, and its TPM name.

use aws_lc_rs::digest;

use super::TpmError;
use super::marshal::Reader;

/// TPM_ALG_ID values (TPM 2.0 Part 2 §6.3, TCG Algorithm Registry) this
/// module understands.
pub mod alg {
    /// TPM_ALG_RSA.
    pub const RSA: u16 = 0x0001;
    /// TPM_ALG_SHA1.
    pub const SHA1: u16 = 0x0004;
    /// TPM_ALG_HMAC.
    pub const HMAC: u16 = 0x0005;
    /// TPM_ALG_AES.
    pub const AES: u16 = 0x0006;
    /// TPM_ALG_MGF1.
    pub const MGF1: u16 = 0x0007;
    /// TPM_ALG_KEYEDHASH.
    pub const KEYEDHASH: u16 = 0x0008;
    /// TPM_ALG_XOR.
    pub const XOR: u16 = 0x000A;
    /// TPM_ALG_SHA256.
    pub const SHA256: u16 = 0x000B;
    /// TPM_ALG_SHA384.
    pub const SHA384: u16 = 0x000C;
    /// TPM_ALG_SHA512.
    pub const SHA512: u16 = 0x000D;
    /// TPM_ALG_NULL.
    pub const NULL: u16 = 0x0010;
    /// TPM_ALG_SM3_256.
    pub const SM3_256: u16 = 0x0012;
    /// TPM_ALG_RSASSA.
    pub const RSASSA: u16 = 0x0014;
    /// TPM_ALG_RSAES.
    pub const RSAES: u16 = 0x0015;
    /// TPM_ALG_RSAPSS.
    pub const RSAPSS: u16 = 0x0016;
    /// TPM_ALG_OAEP.
    pub const OAEP: u16 = 0x0017;
    /// TPM_ALG_ECDSA.
    pub const ECDSA: u16 = 0x0018;
    /// TPM_ALG_ECDH.
    pub const ECDH: u16 = 0x0019;
    /// TPM_ALG_ECDAA.
    pub const ECDAA: u16 = 0x001A;
    /// TPM_ALG_SM2.
    pub const SM2: u16 = 0x001B;
    /// TPM_ALG_ECSCHNORR.
    pub const ECSCHNORR: u16 = 0x001C;
    /// TPM_ALG_ECMQV.
    pub const ECMQV: u16 = 0x001D;
    /// TPM_ALG_KDF1_SP800_56A.
    pub const KDF1_SP800_56A: u16 = 0x0020;
    /// TPM_ALG_KDF2.
    pub const KDF2: u16 = 0x0021;
    /// TPM_ALG_KDF1_SP800_108.
    pub const KDF1_SP800_108: u16 = 0x0022;
    /// TPM_ALG_ECC.
    pub const ECC: u16 = 0x0023;
    /// TPM_ALG_SYMCIPHER.
    pub const SYMCIPHER: u16 = 0x0025;
    /// TPM_ALG_CFB.
    pub const CFB: u16 = 0x0043;
}

/// TPM_ECC_CURVE values.
pub mod curve {
    /// TPM_ECC_NIST_P256.
    pub const NIST_P256: u16 = 0x0003;
    /// TPM_ECC_NIST_P384.
    pub const NIST_P384: u16 = 0x0004;
    /// TPM_ECC_NIST_P521.
    pub const NIST_P521: u16 = 0x0005;
}

/// TPMA_OBJECT bits (TPM 2.0 Part 2 §8.3).
pub mod attributes {
    /// The key cannot be duplicated.
    pub const FIXED_TPM: u32 = 1 << 1;
    /// Loaded state is lost on TPM Reset/Restart.
    pub const ST_CLEAR: u32 = 1 << 2;
    /// The key's parent cannot change.
    pub const FIXED_PARENT: u32 = 1 << 4;
    /// The TPM generated the sensitive part.
    pub const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
    /// The user role may be authorized with the authValue.
    pub const USER_WITH_AUTH: u32 = 1 << 6;
    /// The admin role needs a policy session.
    pub const ADMIN_WITH_POLICY: u32 = 1 << 7;
    /// Not subject to dictionary-attack protection.
    pub const NO_DA: u32 = 1 << 10;
    /// Duplication needs an inner wrapper.
    pub const ENCRYPTED_DUPLICATION: u32 = 1 << 11;
    /// Signs only TPM-generated structures (quotes), never external digests
    /// that look like them; or decrypts only TPM-made structures.
    pub const RESTRICTED: u32 = 1 << 16;
    /// A decryption key.
    pub const DECRYPT: u32 = 1 << 17;
    /// A signing key.
    pub const SIGN: u32 = 1 << 18;
}

/// A symmetric definition (TPMT_SYM_DEF_OBJECT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymDef {
    /// TPM_ALG_ID of the cipher, or NULL.
    pub algorithm: u16,
    /// Key bits (0 when NULL).
    pub key_bits: u16,
    /// Mode (0 when NULL).
    pub mode: u16,
}

/// The type-specific part of a public area (TPMU_PUBLIC_PARMS and
/// TPMU_PUBLIC_ID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyDetail {
    /// An RSA key.
    Rsa {
        /// Symmetric protection of children.
        symmetric: SymDef,
        /// Signing/decryption scheme, or NULL.
        scheme: u16,
        /// The scheme's hash (NULL for NULL and RSAES).
        scheme_hash: u16,
        /// Modulus size.
        key_bits: u16,
        /// The effective public exponent: the structure's 0 (the default)
        /// is stored here as 65537.
        exponent: u32,
        /// The modulus, big-endian.
        modulus: Vec<u8>,
    },
    /// An ECC key.
    Ecc {
        /// Symmetric protection of children.
        symmetric: SymDef,
        /// Scheme, or NULL.
        scheme: u16,
        /// The scheme's hash, or NULL.
        scheme_hash: u16,
        /// TPM_ECC_CURVE (see [`curve`]).
        curve: u16,
        /// The KDF scheme, or NULL.
        kdf: u16,
        /// The KDF's hash, or NULL.
        kdf_hash: u16,
        /// X coordinate, big-endian.
        x: Vec<u8>,
        /// Y coordinate, big-endian.
        y: Vec<u8>,
    },
}

/// A parsed TPMT_PUBLIC, keeping the exact bytes it came from (the name is
/// a hash over them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TpmPublic {
    raw: Vec<u8>,
    /// The name algorithm.
    pub name_alg: u16,
    /// TPMA_OBJECT (see [`attributes`]).
    pub attributes: u32,
    /// The authorization policy digest.
    pub auth_policy: Vec<u8>,
    /// The key.
    pub detail: KeyDetail,
}

/// Largest digest (TPMU_HA) and ECC coordinate (TPM2B_ECC_PARAMETER for
/// P-521) and RSA modulus (TPM2B_PUBLIC_KEY_RSA, 4096 bits) accepted.
const MAX_DIGEST: usize = 64;
const MAX_ECC_COORDINATE: usize = 66;
const MAX_RSA_BYTES: usize = 512;

fn sym_def(r: &mut Reader<'_>) -> Result<SymDef, TpmError> {
    let algorithm = r.u16()?;
    if algorithm == alg::NULL {
        return Ok(SymDef {
            algorithm,
            key_bits: 0,
            mode: 0,
        });
    }
    if algorithm == alg::XOR {
        return Err(TpmError::Malformed(
            "XOR is not a TPMI_ALG_SYM_OBJECT".into(),
        ));
    }
    Ok(SymDef {
        algorithm,
        key_bits: r.u16()?,
        mode: r.u16()?,
    })
}

/// A TPMT_RSA_SCHEME / TPMT_ECC_SCHEME: the algorithm and, where the union
/// member has one, its hash (ECDAA also carries a count, skipped).
fn scheme(r: &mut Reader<'_>, allowed: &[u16]) -> Result<(u16, u16), TpmError> {
    let s = r.u16()?;
    if !allowed.contains(&s) {
        return Err(TpmError::Malformed(format!(
            "scheme {s:#06x} is not valid for this key type"
        )));
    }
    match s {
        alg::NULL | alg::RSAES => Ok((s, alg::NULL)),
        alg::ECDAA => {
            let hash = r.u16()?;
            r.u16()?; // count
            Ok((s, hash))
        }
        _ => Ok((s, r.u16()?)),
    }
}

/// TPMT_KDF_SCHEME.
fn kdf_scheme(r: &mut Reader<'_>) -> Result<(u16, u16), TpmError> {
    match r.u16()? {
        alg::NULL => Ok((alg::NULL, alg::NULL)),
        k @ (alg::MGF1 | alg::KDF1_SP800_56A | alg::KDF2 | alg::KDF1_SP800_108) => {
            Ok((k, r.u16()?))
        }
        other => Err(TpmError::Malformed(format!(
            "KDF scheme {other:#06x} is unknown"
        ))),
    }
}

/// The digest for a TPM hash algorithm this verifier computes.
pub(crate) fn digest_alg(hash: u16) -> Option<&'static digest::Algorithm> {
    match hash {
        alg::SHA256 => Some(&digest::SHA256),
        alg::SHA384 => Some(&digest::SHA384),
        _ => None,
    }
}

/// The digest size of a TPM hash algorithm, for those a name may use.
pub(crate) fn digest_len(hash: u16) -> Option<usize> {
    match hash {
        alg::SHA1 => Some(20),
        alg::SHA256 | alg::SM3_256 => Some(32),
        alg::SHA384 => Some(48),
        alg::SHA512 => Some(64),
        _ => None,
    }
}

impl TpmPublic {
    /// Parses a marshalled TPMT_PUBLIC (no TPM2B size prefix; what
    /// tss-esapi's `Public::marshall()` returns, or a tpm2-tools
    /// TPM2B_PUBLIC file without its first two bytes). Only RSA and ECC keys;
    /// trailing bytes are refused.
    pub fn parse(bytes: &[u8]) -> Result<TpmPublic, TpmError> {
        let mut r = Reader::new(bytes, "TPMT_PUBLIC");
        let kind = r.u16()?;
        let name_alg = r.u16()?;
        let attributes = r.u32()?;
        let auth_policy = r.tpm2b_max(MAX_DIGEST, "authPolicy")?.to_vec();
        let detail = match kind {
            alg::RSA => {
                let symmetric = sym_def(&mut r)?;
                let (scheme, scheme_hash) = scheme(
                    &mut r,
                    &[alg::NULL, alg::RSASSA, alg::RSAES, alg::RSAPSS, alg::OAEP],
                )?;
                let key_bits = r.u16()?;
                let exponent = match r.u32()? {
                    0 => 65537,
                    e => e,
                };
                let modulus = r.tpm2b_max(MAX_RSA_BYTES, "the RSA modulus")?.to_vec();
                if modulus.len() * 8 != usize::from(key_bits) {
                    return Err(TpmError::Malformed(
                        "RSA modulus length does not match keyBits".into(),
                    ));
                }
                KeyDetail::Rsa {
                    symmetric,
                    scheme,
                    scheme_hash,
                    key_bits,
                    exponent,
                    modulus,
                }
            }
            alg::ECC => {
                let symmetric = sym_def(&mut r)?;
                let (scheme, scheme_hash) = scheme(
                    &mut r,
                    &[
                        alg::NULL,
                        alg::ECDSA,
                        alg::ECDH,
                        alg::ECDAA,
                        alg::SM2,
                        alg::ECSCHNORR,
                        alg::ECMQV,
                    ],
                )?;
                let curve = r.u16()?;
                let (kdf, kdf_hash) = kdf_scheme(&mut r)?;
                let x = r.tpm2b_max(MAX_ECC_COORDINATE, "ECC x")?.to_vec();
                let y = r.tpm2b_max(MAX_ECC_COORDINATE, "ECC y")?.to_vec();
                KeyDetail::Ecc {
                    symmetric,
                    scheme,
                    scheme_hash,
                    curve,
                    kdf,
                    kdf_hash,
                    x,
                    y,
                }
            }
            other => {
                return Err(TpmError::Malformed(format!(
                    "public area of type {other:#06x} (only RSA and ECC keys)"
                )));
            }
        };
        r.end()?;
        Ok(TpmPublic {
            raw: bytes.to_vec(),
            name_alg,
            attributes,
            auth_policy,
            detail,
        })
    }

    /// The marshalled TPMT_PUBLIC, exactly as parsed.
    pub fn as_bytes(&self) -> &[u8] {
        &self.raw
    }

    /// The TPM name: nameAlg (u16 BE) ‖ H_nameAlg(TPMT_PUBLIC), SHA-256 or
    /// SHA-384. Computed here, never taken from the agent.
    pub fn name(&self) -> Result<Vec<u8>, TpmError> {
        let Some(algorithm) = digest_alg(self.name_alg) else {
            return Err(TpmError::Unsupported(format!(
                "name algorithm {:#06x} (SHA-256 or SHA-384)",
                self.name_alg
            )));
        };
        let mut name = Vec::with_capacity(2 + algorithm.output_len());
        name.extend_from_slice(&self.name_alg.to_be_bytes());
        name.extend_from_slice(digest::digest(algorithm, &self.raw).as_ref());
        Ok(name)
    }

    /// Whether every bit of `bits` (see [`attributes`]) is set.
    pub fn has_attributes(&self, bits: u32) -> bool {
        self.attributes & bits == bits
    }
}

/// Checks that `ak` can only be an attestation key: an ECC NIST P-256
/// ECDSA/SHA-256 key that never left the TPM (fixedTPM, fixedParent,
/// sensitiveDataOrigin) and signs only TPM-made structures (restricted,
/// sign, not decrypt), with a SHA-256 or SHA-384 name, whose use is
/// authorized by its authValue alone (empty authPolicy, no
/// adminWithPolicy).
pub fn check_attestation_key(ak: &TpmPublic) -> Result<(), TpmError> {
    use attributes::*;
    let required = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN;
    if !ak.has_attributes(required) || ak.attributes & DECRYPT != 0 {
        return Err(TpmError::AkRefused(format!(
            "attributes {:#010x} lack fixedTPM/fixedParent/sensitiveDataOrigin/restricted/sign or have decrypt",
            ak.attributes
        )));
    }
    // A policy is a second way to authorize the key: whoever can satisfy
    // it (a PolicySecret on another object, a PolicyAuthorize by an outside
    // signer, a PCR state) may make the AK sign quotes, or with
    // adminWithPolicy change its authValue or certify it — so the key no
    // longer answers only to the agent that holds its authValue.
    if !ak.auth_policy.is_empty() {
        return Err(TpmError::AkPolicyBearing(format!(
            "a {}-byte authPolicy; an AK must be usable with its authValue only",
            ak.auth_policy.len()
        )));
    }
    if ak.attributes & ADMIN_WITH_POLICY != 0 {
        return Err(TpmError::AkPolicyBearing(
            "adminWithPolicy is set; an AK's admin role must stay with its authValue".into(),
        ));
    }
    if digest_alg(ak.name_alg).is_none() {
        return Err(TpmError::AkRefused(format!(
            "name algorithm {:#06x} (SHA-256 or SHA-384)",
            ak.name_alg
        )));
    }
    match &ak.detail {
        KeyDetail::Ecc {
            scheme,
            scheme_hash,
            curve,
            x,
            y,
            ..
        } if *scheme == alg::ECDSA
            && *scheme_hash == alg::SHA256
            && *curve == curve::NIST_P256
            && x.len() <= 32
            && y.len() <= 32 =>
        {
            Ok(())
        }
        _ => Err(TpmError::AkRefused(
            "the AK must be an ECC NIST P-256 key with the ECDSA/SHA-256 scheme".into(),
        )),
    }
}

/// The coordinate size of a NIST curve.
pub(crate) fn coordinate_len(c: u16) -> Option<usize> {
    match c {
        curve::NIST_P256 => Some(32),
        curve::NIST_P384 => Some(48),
        curve::NIST_P521 => Some(66),
        _ => None,
    }
}

/// Writes the uncompressed SEC1 point 0x04 ‖ X ‖ Y of an ECC public area
/// into `out` (coordinates left-padded to the curve size) and returns its
/// length; `None` for RSA, unknown curves or oversized coordinates.
pub(crate) fn sec1_point(p: &TpmPublic, out: &mut [u8; 133]) -> Option<usize> {
    let KeyDetail::Ecc { curve, x, y, .. } = &p.detail else {
        return None;
    };
    let n = coordinate_len(*curve)?;
    if x.len() > n || y.len() > n {
        return None;
    }
    out.fill(0);
    out[0] = 0x04;
    out.get_mut(1 + n - x.len()..1 + n)?.copy_from_slice(x);
    out.get_mut(1 + 2 * n - y.len()..1 + 2 * n)?
        .copy_from_slice(y);
    Some(1 + 2 * n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// An ECC P-256 restricted signing key as tpm2_createak makes it.
    pub(crate) fn ak_bytes() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&alg::ECC.to_be_bytes());
        b.extend_from_slice(&alg::SHA256.to_be_bytes());
        b.extend_from_slice(&0x0005_0072u32.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes()); // authPolicy
        b.extend_from_slice(&alg::NULL.to_be_bytes()); // symmetric
        b.extend_from_slice(&alg::ECDSA.to_be_bytes());
        b.extend_from_slice(&alg::SHA256.to_be_bytes());
        b.extend_from_slice(&curve::NIST_P256.to_be_bytes());
        b.extend_from_slice(&alg::NULL.to_be_bytes()); // kdf
        for c in [0x11u8, 0x22] {
            b.extend_from_slice(&32u16.to_be_bytes());
            b.extend_from_slice(&[c; 32]);
        }
        b
    }

    #[test]
    fn parses_an_attestation_key_and_refuses_every_truncation_and_extension() {
        let bytes = ak_bytes();
        let ak = TpmPublic::parse(&bytes).unwrap();
        check_attestation_key(&ak).unwrap();
        assert_eq!(ak.name().unwrap().len(), 34);
        for n in 0..bytes.len() {
            assert_eq!(
                TpmPublic::parse(&bytes[..n]).unwrap_err().code(),
                herald_core::ErrorCode::TpmStructureMalformed
            );
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(TpmPublic::parse(&long).is_err());
        let mut p = [0u8; 133];
        assert_eq!(sec1_point(&ak, &mut p), Some(65));
        assert_eq!(&p[1..33], &[0x11; 32]);
    }

    /// `ak_bytes` with `policy` as authPolicy and `attributes` as TPMA_OBJECT.
    fn ak_with(attributes: u32, policy: &[u8]) -> Vec<u8> {
        let plain = ak_bytes();
        let mut b = plain[..4].to_vec();
        b.extend_from_slice(&attributes.to_be_bytes());
        b.extend_from_slice(&(policy.len() as u16).to_be_bytes());
        b.extend_from_slice(policy);
        b.extend_from_slice(&plain[10..]);
        b
    }

    #[test]
    fn an_ak_with_an_authorization_policy_is_refused_with_its_own_reason() {
        let plain = 0x0005_0072u32;
        assert_eq!(ak_with(plain, &[]), ak_bytes(), "the builder is faithful");
        check_attestation_key(&TpmPublic::parse(&ak_with(plain, &[])).unwrap()).unwrap();
        // A PolicySecret-style 32-byte digest, a 48-byte SHA-384 one, and
        // adminWithPolicy with or without a digest: parsed, then refused.
        for (attrs, policy) in [
            (plain, vec![0xA5; 32]),
            (plain, vec![0x5A; 48]),
            (plain | attributes::ADMIN_WITH_POLICY, vec![]),
            (plain | attributes::ADMIN_WITH_POLICY, vec![0x11; 32]),
        ] {
            let ak = TpmPublic::parse(&ak_with(attrs, &policy)).unwrap();
            assert_eq!(ak.auth_policy, policy);
            let err = check_attestation_key(&ak).unwrap_err();
            assert!(
                matches!(err, TpmError::AkPolicyBearing(_)),
                "{attrs:#x} {policy:?}: {err}"
            );
            assert_eq!(err.code(), herald_core::ErrorCode::TpmAkRefused);
            assert!(err.to_string().contains("authorization policy"), "{err}");
        }
        // A policy on an AK that is refused anyway keeps the older reason.
        let ak = TpmPublic::parse(&ak_with(plain & !attributes::RESTRICTED, &[1; 32])).unwrap();
        assert!(matches!(
            check_attestation_key(&ak),
            Err(TpmError::AkRefused(_))
        ));
    }

    #[test]
    fn rsaes_scheme_has_no_hash() {
        let mut b = Vec::new();
        b.extend_from_slice(&alg::RSA.to_be_bytes());
        b.extend_from_slice(&alg::SHA256.to_be_bytes());
        b.extend_from_slice(&0x0003_0072u32.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&alg::NULL.to_be_bytes());
        b.extend_from_slice(&alg::RSAES.to_be_bytes());
        b.extend_from_slice(&1024u16.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&128u16.to_be_bytes());
        b.extend_from_slice(&[0xC3; 128]);
        let k = TpmPublic::parse(&b).unwrap();
        assert!(matches!(
            k.detail,
            KeyDetail::Rsa {
                exponent: 65537,
                scheme: alg::RSAES,
                ..
            }
        ));
        assert_eq!(
            check_attestation_key(&k).unwrap_err().code(),
            herald_core::ErrorCode::TpmAkRefused
        );
    }
}
