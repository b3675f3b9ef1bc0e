//! PKCS#10 CSRs, as every SVID request carries one.

use herald_core::ErrorCode;

/// DER TLV.
pub(crate) fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    let n = content.len();
    if n < 0x80 {
        out.push(n as u8);
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect();
        out.push(0x80 | bytes.len() as u8);
        out.extend_from_slice(&bytes);
    }
    out.extend_from_slice(content);
    out
}

/// AlgorithmIdentifier ecdsa-with-SHA256.
const ECDSA_SHA256: &[u8] = &[
    0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02,
];

/// A CSR around `info` (a CertificationRequestInfo), self-signed by the
/// fixture key.
pub(crate) fn signed_csr(info: &[u8]) -> Vec<u8> {
    let sig = crate::sign_with(crate::p256_asn1(), info);
    let mut bits = vec![0u8];
    bits.extend_from_slice(&sig);
    let mut body = info.to_vec();
    body.extend_from_slice(ECDSA_SHA256);
    body.extend_from_slice(&der(0x03, &bits));
    der(0x30, &body)
}

/// Mode 0: `rest` is a DER CSR. Mode 1: `rest` is a CertificationRequestInfo,
/// self-signed here by the fixture key so that what lies behind the
/// signature check (key checks, requested extensions) is reached.
pub fn csr(data: &[u8]) {
    let Some((mode, rest)) = crate::mode(data, 2) else {
        return;
    };
    let der = if mode == 0 {
        rest.to_vec()
    } else {
        signed_csr(rest)
    };
    match herald_ca::csr::verify_csr(&der) {
        Ok(v) => {
            crate::accept();
            // The key is the one in the request, hashed as the audit says.
            assert!(der.windows(v.spki_der.len()).any(|w| w == v.spki_der));
            assert_eq!(
                v.spki_sha256,
                herald_ca::sha256_hex(&v.spki_der),
                "spki_sha256 is the hex SHA-256 of the SPKI"
            );
        }
        Err(e) => assert!(
            matches!(
                e.code(),
                ErrorCode::CsrMalformed
                    | ErrorCode::CsrSignatureInvalid
                    | ErrorCode::CsrRequestsCa
                    | ErrorCode::CsrUnsupportedKey
            ),
            "untyped CSR refusal {e:?}"
        ),
    }
}
