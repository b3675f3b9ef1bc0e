//! Software TPM2_MakeCredential (TPM 2.0 Part 1 §24 "Credential
//! Protection"; Part 2 TPM2B_ID_OBJECT): a secret only the TPM holding the
//! EK can recover, and only for a key with the given name. tss-esapi has no
//! software implementation; the server does it here, in pure Rust.

use aws_lc_rs::cipher::{AES_128, EncryptingKey, EncryptionContext, UnboundCipherKey};
use aws_lc_rs::hmac;
use aws_lc_rs::iv::FixedLength;
use aws_lc_rs::rsa::{OAEP_SHA256_MGF1SHA256, OaepPublicEncryptingKey, PublicEncryptingKey};

use super::TpmError;
use super::marshal::put_tpm2b;
use super::public::{KeyDetail, TpmPublic, alg, digest_len};
use zeroize::Zeroizing;

/// The encrypted credential for TPM2_ActivateCredential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// Contents of TPM2B_ID_OBJECT: TPM2B_DIGEST(outer HMAC) ‖ encIdentity.
    pub id_object: Vec<u8>,
    /// Contents of TPM2B_ENCRYPTED_SECRET: the seed, RSA-OAEP-encrypted to the EK.
    pub encrypted_secret: Vec<u8>,
}

impl Credential {
    /// The file `tpm2_makecredential` writes (magic 0xBADCC0DE, version 1,
    /// TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET), for `tpm2_activatecredential`.
    pub fn to_tpm2_tools_file(&self) -> Result<Vec<u8>, TpmError> {
        let mut out = 0xBADC_C0DEu32.to_be_bytes().to_vec();
        out.extend_from_slice(&1u32.to_be_bytes());
        put_tpm2b(&mut out, &self.id_object)?;
        put_tpm2b(&mut out, &self.encrypted_secret)?;
        Ok(out)
    }
}

/// KDFa (Part 1 §11.4.10.2) with HMAC-SHA-256 in counter mode.
fn kdfa_sha256(
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Zeroizing<Vec<u8>> {
    let k = hmac::Key::new(hmac::HMAC_SHA256, key);
    let bytes = usize::try_from(bits.div_ceil(8)).unwrap_or(0);
    let mut out = Zeroizing::new(Vec::with_capacity(bytes + 32));
    let mut counter: u32 = 1;
    while out.len() < bytes {
        let mut ctx = hmac::Context::with_key(&k);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter = counter.wrapping_add(1);
    }
    out.truncate(bytes);
    out
}

fn der_len(out: &mut Vec<u8>, n: usize) {
    if n < 0x80 {
        out.push(n as u8);
    } else if n < 0x100 {
        out.extend_from_slice(&[0x81, n as u8]);
    } else {
        out.extend_from_slice(&[0x82, (n >> 8) as u8, n as u8]);
    }
}

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    der_len(&mut out, content.len());
    out.extend_from_slice(content);
    out
}

fn der_uint(bytes: &[u8]) -> Vec<u8> {
    let first = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let mut v = bytes[first..].to_vec();
    if v.first().is_none_or(|b| b & 0x80 != 0) {
        v.insert(0, 0);
    }
    der(0x02, &v)
}

/// SubjectPublicKeyInfo DER for an RSA modulus and exponent.
fn rsa_spki(modulus: &[u8], exponent: u32) -> Vec<u8> {
    let mut rsa_key = der_uint(modulus);
    rsa_key.extend(der_uint(&exponent.to_be_bytes()));
    let rsa_key = der(0x30, &rsa_key);
    let mut bit_string = vec![0u8];
    bit_string.extend(rsa_key);
    // AlgorithmIdentifier { rsaEncryption, NULL }
    let mut spki = vec![
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    spki.extend(der(0x03, &bit_string));
    der(0x30, &spki)
}

/// Checks that `name` is a TPM name: nameAlg (u16) ‖ a digest of that
/// algorithm's size.
fn check_name(name: &[u8]) -> Result<(), TpmError> {
    let ok = match name {
        [a, b, digest @ ..] => {
            digest_len(u16::from_be_bytes([*a, *b])).is_some_and(|n| n == digest.len())
        }
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(TpmError::Malformed(
            "the AK name is not nameAlg ‖ digest".into(),
        ))
    }
}

/// TPM2_MakeCredential in software (TPM 2.0 Part 1 §24, Part 3 §12.6) for
/// an RSA EK with the TCG default template (nameAlg SHA-256, symmetric
/// AES-128-CFB): `secret` (1 to 32 bytes) is readable only by
/// TPM2_ActivateCredential on that EK's TPM with the key named `ak_name`
/// loaded.
///
/// seed = 32 random bytes; encrypted_secret = RSA-OAEP(SHA-256, label
/// "IDENTITY\0") of the seed to the EK; symKey = KDFa(SHA-256, seed,
/// "STORAGE", ak_name, ∅, 128); encIdentity = AES-128-CFB(symKey, IV 0,
/// TPM2B_DIGEST(secret)); hmacKey = KDFa(SHA-256, seed, "INTEGRITY", ∅, ∅,
/// 256); id_object = TPM2B_DIGEST(HMAC(hmacKey, encIdentity ‖ ak_name)) ‖
/// encIdentity. An ECC EK is [`TpmError::Unsupported`].
pub fn make_credential(
    ek: &TpmPublic,
    ak_name: &[u8],
    secret: &[u8],
) -> Result<Credential, TpmError> {
    let KeyDetail::Rsa {
        symmetric,
        modulus,
        exponent,
        ..
    } = &ek.detail
    else {
        return Err(TpmError::Unsupported(
            "credential activation with an ECC EK (use the RSA-2048 EK)".into(),
        ));
    };
    if ek.name_alg != alg::SHA256
        || symmetric.algorithm != alg::AES
        || symmetric.key_bits != 128
        || symmetric.mode != alg::CFB
    {
        return Err(TpmError::Unsupported(
            "an EK template other than nameAlg SHA-256 with AES-128-CFB".into(),
        ));
    }
    // The TPM refuses a credential larger than its EK's name digest.
    if secret.is_empty() || secret.len() > 32 {
        return Err(TpmError::Unsupported(
            "a credential secret must be 1 to 32 bytes".into(),
        ));
    }
    check_name(ak_name)?;
    let mut seed = Zeroizing::new([0u8; 32]);
    aws_lc_rs::rand::fill(seed.as_mut()).map_err(|_| TpmError::Crypto("no randomness"))?;

    let key = PublicEncryptingKey::from_der(&rsa_spki(modulus, *exponent))
        .map_err(|_| TpmError::Unsupported("the EK's RSA key is not usable".into()))?;
    let oaep = OaepPublicEncryptingKey::new(key).map_err(|_| TpmError::Crypto("RSA-OAEP"))?;
    let mut encrypted_secret = vec![0u8; oaep.ciphertext_size()];
    let len = oaep
        .encrypt(
            &OAEP_SHA256_MGF1SHA256,
            seed.as_ref(),
            &mut encrypted_secret,
            Some(b"IDENTITY\0"),
        )
        .map_err(|_| TpmError::Crypto("RSA-OAEP encryption"))?
        .len();
    encrypted_secret.truncate(len);

    let sym_key = kdfa_sha256(seed.as_ref(), "STORAGE", ak_name, &[], 128);
    let mut enc_identity = Vec::with_capacity(secret.len() + 2);
    put_tpm2b(&mut enc_identity, secret)?;
    let cipher = EncryptingKey::cfb128(
        UnboundCipherKey::new(&AES_128, &sym_key).map_err(|_| TpmError::Crypto("AES key"))?,
    )
    .map_err(|_| TpmError::Crypto("AES-CFB"))?;
    cipher
        .less_safe_encrypt(
            &mut enc_identity,
            EncryptionContext::Iv128(FixedLength::from([0u8; 16])),
        )
        .map_err(|_| TpmError::Crypto("AES-CFB encryption"))?;

    let hmac_key = kdfa_sha256(seed.as_ref(), "INTEGRITY", &[], &[], 256);
    let mut mac = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &hmac_key));
    mac.update(&enc_identity);
    mac.update(ak_name);
    let outer = mac.sign();
    let mut id_object = Vec::with_capacity(34 + enc_identity.len());
    put_tpm2b(&mut id_object, outer.as_ref())?;
    id_object.extend_from_slice(&enc_identity);
    Ok(Credential {
        id_object,
        encrypted_secret,
    })
}

/// Whether the secret the agent returned is the one sealed, in constant time.
pub fn secret_matches(expected: &[u8], returned: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(expected, returned).is_ok()
}

/// [`secret_matches`] as a result: [`TpmError::CredentialMismatch`] when
/// the activated secret is not the one sealed.
pub fn check_activated_secret(expected: &[u8], returned: &[u8]) -> Result<(), TpmError> {
    if secret_matches(expected, returned) {
        Ok(())
    } else {
        Err(TpmError::CredentialMismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kdfa_matches_the_counter_mode_definition() {
        // Two blocks, truncated: the second block's counter is 2.
        let out = kdfa_sha256(b"key", "STORAGE", b"u", b"v", 384);
        assert_eq!(out.len(), 48);
        let k = hmac::Key::new(hmac::HMAC_SHA256, b"key");
        let mut first = 1u32.to_be_bytes().to_vec();
        first.extend_from_slice(b"STORAGE\0uv");
        first.extend_from_slice(&384u32.to_be_bytes());
        assert_eq!(&out[..32], hmac::sign(&k, &first).as_ref());
    }

    #[test]
    fn rsa_spki_is_parseable() {
        let mut modulus = vec![0xC1u8; 256];
        modulus[255] = 0x01;
        let spki = rsa_spki(&modulus, 65537);
        assert!(PublicEncryptingKey::from_der(&spki).is_ok());
    }
}
