//! TPM 2.0 structures: TPMT_PUBLIC, TPMS_ATTEST (a quote) and
//! TPMT_SIGNATURE, each a run of TPM2B and fixed-size fields.

use std::sync::OnceLock;

use herald_attest::tpm::{
    PcrBank, PcrSelection, QuoteInput, TpmPublic, alg, attributes, check_attestation_key, curve,
    qualified_name_under_ek, verify_quote,
};
use herald_core::ErrorCode;

/// The software TPM's AK: a restricted P-256 signing key, as a TPM makes it.
pub(crate) fn ak_public_bytes() -> Vec<u8> {
    let point = crate::p256_point();
    let attrs = attributes::FIXED_TPM
        | attributes::FIXED_PARENT
        | attributes::SENSITIVE_DATA_ORIGIN
        | attributes::USER_WITH_AUTH
        | attributes::RESTRICTED
        | attributes::SIGN;
    let mut b = Vec::new();
    for v in [alg::ECC, alg::SHA256] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    b.extend_from_slice(&attrs.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes()); // empty authPolicy
    for v in [
        alg::NULL,
        alg::ECDSA,
        alg::SHA256,
        curve::NIST_P256,
        alg::NULL,
    ] {
        b.extend_from_slice(&v.to_be_bytes());
    }
    for c in [&point[1..33], &point[33..65]] {
        b.extend_from_slice(&32u16.to_be_bytes());
        b.extend_from_slice(c);
    }
    b
}

pub(crate) struct Fixture {
    pub ak: TpmPublic,
    pub selection: PcrSelection,
    pub pcrs: Vec<Vec<u8>>,
    pub extra_data: [u8; 32],
}

pub(crate) fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| Fixture {
        ak: TpmPublic::parse(&ak_public_bytes()).expect("the fixture AK parses"),
        selection: PcrSelection::new(PcrBank::Sha256, [0, 1, 2, 7]).expect("a selection"),
        pcrs: (0u8..4).map(|i| vec![i; 32]).collect(),
        extra_data: herald_attest::tpm::attestation_nonce_binding(&[9; 32], b"spki"),
    })
}

/// TPMT_SIGNATURE (ECDSA/SHA-256) over `attest` by the fixture AK.
pub(crate) fn signature(attest: &[u8]) -> Vec<u8> {
    let sig = crate::sign_with(crate::p256(), attest);
    let mut out = Vec::new();
    out.extend_from_slice(&alg::ECDSA.to_be_bytes());
    out.extend_from_slice(&alg::SHA256.to_be_bytes());
    for half in [&sig[..32], &sig[32..]] {
        out.extend_from_slice(&32u16.to_be_bytes());
        out.extend_from_slice(half);
    }
    out
}

fn quote(attest: &[u8], signature: &[u8]) -> Result<herald_attest::tpm::VerifiedQuote, ErrorCode> {
    let f = fixture();
    let signer = f.ak.name().expect("the AK has a name");
    verify_quote(&QuoteInput {
        ak: &f.ak,
        expected_signer: &signer,
        attest,
        signature,
        expected_extra_data: &f.extra_data,
        selection: &f.selection,
        pcr_values: &f.pcrs,
    })
    .map_err(|e| e.code())
}

const QUOTE_CODES: &[ErrorCode] = &[
    ErrorCode::TpmStructureMalformed,
    ErrorCode::TpmQuoteSignerMismatch,
    ErrorCode::TpmNonceMismatch,
    ErrorCode::TpmPcrSelectionMismatch,
    ErrorCode::TpmPcrDigestMismatch,
];

/// Mode 0: `rest` is a TPMT_PUBLIC. Mode 1: `rest` is a TPMS_ATTEST, signed
/// here by the software TPM's AK so that the strict parse behind the
/// signature check is reached. Mode 2: `rest` is a TPMT_SIGNATURE over a
/// fixed, valid quote.
pub fn tpm(data: &[u8]) {
    let Some((mode, rest)) = crate::mode(data, 3) else {
        return;
    };
    match mode {
        0 => public(rest),
        1 => {
            // The signature is the AK's own: whatever the attestation says,
            // it is never refused for its signature or its key.
            match quote(rest, &signature(rest)) {
                Ok(q) => {
                    crate::accept();
                    let f = fixture();
                    assert_eq!(q.pcrs.len(), f.pcrs.len());
                    assert!(q.pcrs.values().eq(f.pcrs.iter()));
                    assert!(
                        rest.windows(32).any(|w| w == f.extra_data),
                        "a verified quote carries the expected qualifying data"
                    );
                }
                Err(code) => assert!(QUOTE_CODES.contains(&code), "untyped refusal {code:?}"),
            }
        }
        _ => {
            let attest = crate::seeds::tpm_attest();
            match quote(&attest, rest) {
                Ok(_) => crate::accept(),
                Err(code) => assert!(
                    matches!(
                        code,
                        ErrorCode::TpmQuoteSignatureInvalid | ErrorCode::TpmStructureMalformed
                    ),
                    "a bad signature refused as {code:?}"
                ),
            }
        }
    }
}

fn public(bytes: &[u8]) {
    let Ok(p) = TpmPublic::parse(bytes) else {
        return;
    };
    crate::accept();
    // The parse keeps the exact bytes (the name is a hash over them) and is
    // deterministic.
    assert_eq!(p.as_bytes(), bytes);
    assert_eq!(TpmPublic::parse(p.as_bytes()).as_ref(), Ok(&p));
    if let Ok(name) = p.name() {
        assert_eq!(name.get(..2), Some(&p.name_alg.to_be_bytes()[..]));
        assert!(matches!(name.len() - 2, 20 | 32 | 48 | 64));
    }
    if let Err(e) = check_attestation_key(&p) {
        assert!(matches!(
            e.code(),
            ErrorCode::TpmAkRefused | ErrorCode::TpmStructureMalformed
        ));
    }
    if let Ok(qn) = qualified_name_under_ek(&p, &fixture().ak) {
        assert_eq!(qn.len(), 34);
    }
}
