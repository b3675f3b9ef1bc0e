//! Herald's TPM verifier against a real TPM (swtpm) driven by tpm2-tools
//! (nobody here wrote either): names, EK chains, quotes made by
//! `tpm2_quote`, and software MakeCredential blobs activated by
//! `tpm2_activatecredential`. Each test provisions its own TPM; a missing
//! swtpm or tpm2-tools fails the test, it is never skipped.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::time::SystemTime;

use herald_attest::tpm::*;
use herald_core::ErrorCode;
use herald_test_tpm::{SoftTpm, require_tpm2_tools};

fn soft_tpm() -> SoftTpm {
    require_tpm2_tools().unwrap();
    SoftTpm::start().unwrap()
}

/// Runs a tpm2-tools command against `tpm` in `dir`, then flushes
/// transient objects (swtpm has three slots).
fn tool(tpm: &SoftTpm, dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = tpm.tool(dir, args).unwrap_or_else(|e| panic!("{e:#}"));
    tpm.flush_transient(dir).unwrap();
    out
}

/// A TPM2B_PUBLIC file (as tpm2-tools writes) → marshalled TPMT_PUBLIC.
/// The TPM's ECC P-256 EK public area, made by tpm2_createek.
fn ecc_ek(tpm: &SoftTpm, dir: &Path) -> TpmPublic {
    tool(
        tpm,
        dir,
        &[
            "tpm2_createek",
            "-c",
            "ekecc.ctx",
            "-G",
            "ecc",
            "-u",
            "ekecc.pub",
        ],
    );
    TpmPublic::parse(&tpmt(&dir.join("ekecc.pub"))).unwrap()
}

fn tpmt(path: &Path) -> Vec<u8> {
    let b = std::fs::read(path).unwrap();
    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
    assert_eq!(n + 2, b.len());
    b[2..].to_vec()
}

/// The RSA EK and an ECC P-256 AK under it, made by tpm2-tools; the
/// contexts stay in `dir` as ek.ctx and ak.ctx.
fn keys(tpm: &SoftTpm, dir: &Path) -> (TpmPublic, TpmPublic) {
    tool(
        tpm,
        dir,
        &["tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
    );
    make_ak(tpm, dir, "ak");
    let ek = TpmPublic::parse(&tpmt(&dir.join("ek.pub"))).unwrap();
    let ak = TpmPublic::parse(&tpmt(&dir.join("ak.pub"))).unwrap();
    (ek, ak)
}

/// `tpm2_createak` under ek.ctx: `<stem>.ctx`, `<stem>.pub`, `<stem>.name`.
fn make_ak(tpm: &SoftTpm, dir: &Path, stem: &str) {
    let (ctx, public, name) = (
        format!("{stem}.ctx"),
        format!("{stem}.pub"),
        format!("{stem}.name"),
    );
    tool(
        tpm,
        dir,
        &[
            "tpm2_createak",
            "-C",
            "ek.ctx",
            "-c",
            &ctx,
            "-G",
            "ecc",
            "-g",
            "sha256",
            "-s",
            "ecdsa",
            "-u",
            &public,
            "-n",
            &name,
        ],
    );
}

fn trust(tpm: &SoftTpm) -> EkTrust {
    EkTrust::from_pem_files(&[tpm.ek_root_pem_path()], &[tpm.ek_intermediate_pem_path()]).unwrap()
}

fn roots_only(tpm: &SoftTpm) -> EkTrust {
    EkTrust::from_pem_files(&[tpm.ek_root_pem_path()], &[] as &[&Path]).unwrap()
}

fn pem_ders(path: &Path) -> Vec<Vec<u8>> {
    pem::parse_many(std::fs::read(path).unwrap())
        .unwrap()
        .into_iter()
        .map(|p| p.into_contents())
        .collect()
}

/// `tpm2_quote` over sha256:0,1,2,7 with `extra` as qualifying data, and
/// `tpm2_pcrread` of the same PCRs: (attest, signature, PCR values).
fn quote(
    tpm: &SoftTpm,
    dir: &Path,
    ak_ctx: &str,
    extra: &[u8],
) -> (Vec<u8>, Vec<u8>, Vec<Vec<u8>>) {
    tool(
        tpm,
        dir,
        &[
            "tpm2_quote",
            "-c",
            ak_ctx,
            "-l",
            "sha256:0,1,2,7",
            "-q",
            &hex::encode(extra),
            "-m",
            "quote.msg",
            "-s",
            "quote.sig",
            "-o",
            "quote.pcrs",
            "-g",
            "sha256",
        ],
    );
    tool(
        tpm,
        dir,
        &["tpm2_pcrread", "sha256:0,1,2,7", "-o", "pcrs.bin"],
    );
    let attest = std::fs::read(dir.join("quote.msg")).unwrap();
    let sig = std::fs::read(dir.join("quote.sig")).unwrap();
    let pcrs = std::fs::read(dir.join("pcrs.bin"))
        .unwrap()
        .chunks(32)
        .map(<[u8]>::to_vec)
        .collect::<Vec<_>>();
    assert_eq!(pcrs.len(), 4);
    (attest, sig, pcrs)
}

fn selection() -> PcrSelection {
    PcrSelection::new(PcrBank::Sha256, [0, 1, 2, 7]).unwrap()
}

#[test]
fn names_ek_chain_and_attestation_key_checks_agree_with_the_tpm() {
    let (tpm, other) = (soft_tpm(), soft_tpm());
    let dir = tempfile::tempdir().unwrap();
    let (ek, ak) = keys(&tpm, dir.path());
    // Herald computes the same name as the TPM.
    assert_eq!(
        ak.name().unwrap(),
        std::fs::read(dir.path().join("ak.name")).unwrap()
    );
    check_attestation_key(&ak).unwrap();
    // The EK is a restricted decryption key, not a signing key: refused as an AK.
    assert!(ek.has_attributes(attributes::RESTRICTED | attributes::DECRYPT));
    assert_eq!(
        check_attestation_key(&ek).unwrap_err().code(),
        ErrorCode::TpmAkRefused
    );
    let mut bytes = ak.as_bytes().to_vec();
    bytes[5] &= !0x01; // TPMA_OBJECT bit 16: `restricted`
    let unrestricted = TpmPublic::parse(&bytes).unwrap();
    assert!(!unrestricted.has_attributes(attributes::RESTRICTED));
    assert_eq!(
        check_attestation_key(&unrestricted).unwrap_err().code(),
        ErrorCode::TpmAkRefused
    );
    let mut bytes = ak.as_bytes().to_vec();
    bytes[5] |= 0x02; // bit 17: `decrypt`
    assert_eq!(
        check_attestation_key(&TpmPublic::parse(&bytes).unwrap())
            .unwrap_err()
            .code(),
        ErrorCode::TpmAkRefused
    );

    // The EK certificate from NV index 0x01c00002 chains to the local CA
    // and certifies this EK.
    tool(
        &tpm,
        dir.path(),
        &["tpm2_nvread", "0x1c00002", "-o", "ek.crt"],
    );
    let cert = std::fs::read(dir.path().join("ek.crt")).unwrap();
    assert_eq!(cert, tpm.ek_cert_der().unwrap());
    let verified = verify_ek_certificate(&trust(&tpm), &cert, &[], SystemTime::now()).unwrap();
    assert_eq!(verified.subject(), "CN=unknown");
    assert_eq!(verified.issuer(), "CN=swtpm-localca");
    check_ek_public_matches(&ek, &verified).unwrap();
    // The intermediate may also come from the agent instead of the policy.
    assert_eq!(
        verify_ek_certificate(&roots_only(&tpm), &cert, &[], SystemTime::now())
            .unwrap_err()
            .code(),
        ErrorCode::TpmEkCertificateUntrusted
    );
    verify_ek_certificate(
        &roots_only(&tpm),
        &cert,
        &pem_ders(&tpm.ek_intermediate_pem_path()),
        SystemTime::now(),
    )
    .unwrap();
    // Another manufacturer's root does not vouch for it, even with this
    // TPM's intermediate presented.
    assert_eq!(
        verify_ek_certificate(&trust(&other), &cert, &[], SystemTime::now())
            .unwrap_err()
            .code(),
        ErrorCode::TpmEkCertificateUntrusted
    );
    assert_eq!(
        verify_ek_certificate(
            &roots_only(&other),
            &cert,
            &pem_ders(&tpm.ek_intermediate_pem_path()),
            SystemTime::now()
        )
        .unwrap_err()
        .code(),
        ErrorCode::TpmEkCertificateUntrusted
    );
    // Not valid before it was issued.
    assert_eq!(
        verify_ek_certificate(&trust(&tpm), &cert, &[], SystemTime::UNIX_EPOCH)
            .unwrap_err()
            .code(),
        ErrorCode::TpmEkCertificateInvalid
    );
    // Another TPM's EK is not the certified key.
    let other_dir = tempfile::tempdir().unwrap();
    let (other_ek, _) = keys(&other, other_dir.path());
    assert_eq!(
        check_ek_public_matches(&other_ek, &verified).unwrap_err(),
        TpmError::EkPublicMismatch
    );
    assert_eq!(
        check_ek_public_matches(&other_ek, &verified)
            .unwrap_err()
            .code(),
        ErrorCode::TpmEkPublicMismatch
    );
    // An ECC EK is not the RSA certificate's key either.
    let ecc_ek = ecc_ek(&tpm, dir.path());
    assert_eq!(
        check_ek_public_matches(&ecc_ek, &verified).unwrap_err(),
        TpmError::EkPublicMismatch
    );

    // Truncations and garbage: errors, never panics.
    for public in [&ak, &ek, &ecc_ek] {
        let b = public.as_bytes();
        for n in 0..b.len() {
            assert_eq!(
                TpmPublic::parse(&b[..n]).unwrap_err().code(),
                ErrorCode::TpmStructureMalformed
            );
        }
        let mut long = b.to_vec();
        long.push(0);
        assert!(TpmPublic::parse(&long).is_err());
    }
    for n in 0..cert.len() {
        assert!(verify_ek_certificate(&trust(&tpm), &cert[..n], &[], SystemTime::now()).is_err());
    }
    assert!(TpmPublic::parse(b"\xff\xff garbage").is_err());
}

#[test]
fn quotes_from_tpm2_quote_verify_and_every_tampering_is_caught() {
    let tpm = soft_tpm();
    let dir = tempfile::tempdir().unwrap();
    let (ek, ak) = keys(&tpm, dir.path());
    // Measure something, so the values are not all zero.
    tool(
        &tpm,
        dir.path(),
        &["tpm2_pcrextend", &format!("7:sha256={}", "ab".repeat(32))],
    );
    let nonce = attestation_nonce_binding(&[0x42; 32], b"the CSR's SPKI");
    let (attest, sig, pcrs) = quote(&tpm, dir.path(), "ak.ctx", &nonce);
    let selection = selection();
    // The TPM reports the AK's qualified name (under the EK), not its name.
    let signer = qualified_name_under_ek(&ek, &ak).unwrap();
    let input = QuoteInput {
        ak: &ak,
        expected_signer: &signer,
        attest: &attest,
        signature: &sig,
        expected_extra_data: &nonce,
        selection: &selection,
        pcr_values: &pcrs,
    };
    let q = verify_quote(&input).unwrap();
    assert_eq!(q.pcrs.len(), 4);
    assert_eq!(q.pcrs[&7], pcrs[3]);
    assert_ne!(q.pcrs[&7], vec![0u8; 32]);
    assert!(q.reset_count < 1000);
    // The selection Herald marshals is the one in the signed attestation.
    let marshalled = selection.marshal().unwrap();
    assert!(attest.windows(marshalled.len()).any(|w| w == marshalled));

    let code = |i: QuoteInput<'_>| verify_quote(&i).unwrap_err().code();
    // A flipped byte anywhere in the attestation breaks the signature.
    for at in [0, 10, 40, attest.len() - 1] {
        let mut flipped = attest.clone();
        flipped[at] ^= 1;
        assert_eq!(
            code(QuoteInput {
                attest: &flipped,
                ..input
            }),
            ErrorCode::TpmQuoteSignatureInvalid
        );
    }
    let other_nonce = attestation_nonce_binding(&[0x42; 32], b"another key");
    assert_eq!(
        code(QuoteInput {
            expected_extra_data: &other_nonce,
            ..input
        }),
        ErrorCode::TpmNonceMismatch
    );
    for other in [
        PcrSelection::new(PcrBank::Sha256, [0, 1, 2]).unwrap(),
        PcrSelection::new(PcrBank::Sha256, [0, 1, 2, 7, 8]).unwrap(),
        PcrSelection::new(PcrBank::Sha1, [0, 1, 2, 7]).unwrap(),
    ] {
        assert_eq!(
            code(QuoteInput {
                selection: &other,
                ..input
            }),
            ErrorCode::TpmPcrSelectionMismatch
        );
    }
    let mut wrong = pcrs.clone();
    wrong[0][0] ^= 1;
    assert_eq!(
        code(QuoteInput {
            pcr_values: &wrong,
            ..input
        }),
        ErrorCode::TpmPcrDigestMismatch
    );
    let reordered = vec![
        pcrs[3].clone(),
        pcrs[0].clone(),
        pcrs[1].clone(),
        pcrs[2].clone(),
    ];
    assert_eq!(
        code(QuoteInput {
            pcr_values: &reordered,
            ..input
        }),
        ErrorCode::TpmPcrDigestMismatch
    );
    assert_eq!(
        code(QuoteInput {
            pcr_values: &pcrs[..3],
            ..input
        }),
        ErrorCode::TpmPcrDigestMismatch
    );
    // The plain name is not what the TPM signs as the signer.
    assert_eq!(
        code(QuoteInput {
            expected_signer: &ak.name().unwrap(),
            ..input
        }),
        ErrorCode::TpmQuoteSignerMismatch
    );
    // A second AK under the same EK: its key does not verify the first
    // AK's quote, and its own quote does not verify as the first AK's.
    make_ak(&tpm, dir.path(), "ak2");
    let ak2 = TpmPublic::parse(&tpmt(&dir.path().join("ak2.pub"))).unwrap();
    assert_eq!(
        code(QuoteInput { ak: &ak2, ..input }),
        ErrorCode::TpmQuoteSignatureInvalid
    );
    let (attest2, sig2, pcrs2) = quote(&tpm, dir.path(), "ak2.ctx", &nonce);
    assert_eq!(
        code(QuoteInput {
            attest: &attest2,
            signature: &sig2,
            pcr_values: &pcrs2,
            ..input
        }),
        ErrorCode::TpmQuoteSignatureInvalid
    );
    let signer2 = qualified_name_under_ek(&ek, &ak2).unwrap();
    verify_quote(&QuoteInput {
        ak: &ak2,
        expected_signer: &signer2,
        attest: &attest2,
        signature: &sig2,
        pcr_values: &pcrs2,
        ..input
    })
    .unwrap();
    // An AK whose public area says `restricted` is cleared is refused.
    let mut bytes = ak.as_bytes().to_vec();
    bytes[5] &= !0x01;
    let unrestricted = TpmPublic::parse(&bytes).unwrap();
    assert_eq!(
        code(QuoteInput {
            ak: &unrestricted,
            ..input
        }),
        ErrorCode::TpmAkRefused
    );
    // Truncations and garbage: errors, never panics.
    for n in 0..attest.len() {
        assert!(
            verify_quote(&QuoteInput {
                attest: &attest[..n],
                ..input
            })
            .is_err()
        );
    }
    for n in 0..sig.len() {
        assert!(
            verify_quote(&QuoteInput {
                signature: &sig[..n],
                ..input
            })
            .is_err()
        );
    }
    let mut long = sig.clone();
    long.push(0);
    assert_eq!(
        code(QuoteInput {
            signature: &long,
            ..input
        }),
        ErrorCode::TpmStructureMalformed
    );
    assert!(
        verify_quote(&QuoteInput {
            attest: b"garbage",
            signature: b"\x00\x18\x00\x0b\x00\x01\x01\x00\x01\x01",
            ..input
        })
        .is_err()
    );
}

#[test]
fn a_reboot_resets_pcrs_and_advances_the_reset_count() {
    let mut tpm = soft_tpm();
    let dir = tempfile::tempdir().unwrap();
    let (ek, ak) = keys(&tpm, dir.path());
    tool(
        &tpm,
        dir.path(),
        &["tpm2_pcrextend", &format!("7:sha256={}", "cd".repeat(32))],
    );
    let nonce = [1u8; 32];
    let selection = selection();
    let (attest, sig, pcrs) = quote(&tpm, dir.path(), "ak.ctx", &nonce);
    let signer = qualified_name_under_ek(&ek, &ak).unwrap();
    let before = verify_quote(&QuoteInput {
        ak: &ak,
        expected_signer: &signer,
        attest: &attest,
        signature: &sig,
        expected_extra_data: &nonce,
        selection: &selection,
        pcr_values: &pcrs,
    })
    .unwrap();
    assert_ne!(before.pcrs[&7], vec![0u8; 32]);

    tpm.restart().unwrap();
    // Transient contexts do not survive a reset; the EK is re-derived from
    // the same seed (the same key), the AK is new.
    let (ek_again, ak_again) = keys(&tpm, dir.path());
    assert_eq!(ek_again, ek);
    assert_ne!(ak_again, ak);
    let (attest, sig, pcrs) = quote(&tpm, dir.path(), "ak.ctx", &nonce);
    let signer = qualified_name_under_ek(&ek, &ak_again).unwrap();
    let after = verify_quote(&QuoteInput {
        ak: &ak_again,
        expected_signer: &signer,
        attest: &attest,
        signature: &sig,
        expected_extra_data: &nonce,
        selection: &selection,
        pcr_values: &pcrs,
    })
    .unwrap();
    assert!(after.reset_count > before.reset_count);
    assert_eq!(after.restart_count, 0);
    assert_eq!(after.pcrs[&7], vec![0u8; 32]);
    assert_eq!(after.firmware_version, before.firmware_version);
}

#[test]
fn software_make_credential_is_activated_by_the_tpm_only_for_its_ak() {
    let tpm = soft_tpm();
    let dir = tempfile::tempdir().unwrap();
    let (ek, ak) = keys(&tpm, dir.path());
    let secret = b"0123456789abcdef0123456789abcdef";
    // PolicySecret(TPM_RH_ENDORSEMENT) authorizes the EK, as its template's
    // authPolicy requires.
    let activate = |file: &[u8]| -> Result<Vec<u8>, String> {
        std::fs::write(dir.path().join("cred.blob"), file).unwrap();
        let _ = std::fs::remove_file(dir.path().join("secret.out"));
        let run = |args: &[&str]| tpm.tool(dir.path(), args).map_err(|e| format!("{e:#}"));
        run(&[
            "tpm2_startauthsession",
            "--policy-session",
            "-S",
            "session.ctx",
        ])?;
        let result = run(&["tpm2_policysecret", "-S", "session.ctx", "-c", "e"]).and_then(|_| {
            run(&[
                "tpm2_activatecredential",
                "-c",
                "ak.ctx",
                "-C",
                "ek.ctx",
                "-i",
                "cred.blob",
                "-o",
                "secret.out",
                "-P",
                "session:session.ctx",
            ])
        });
        let _ = run(&["tpm2_flushcontext", "session.ctx"]);
        tpm.flush_transient(dir.path()).unwrap();
        result.map(|_| std::fs::read(dir.path().join("secret.out")).unwrap())
    };
    let cred = make_credential(&ek, &ak.name().unwrap(), secret).unwrap();
    let recovered = activate(&cred.to_tpm2_tools_file().unwrap()).unwrap();
    assert_eq!(recovered, secret);
    assert!(secret_matches(secret, &recovered));
    check_activated_secret(secret, &recovered).unwrap();
    assert!(!secret_matches(secret, b"0123456789abcdef0123456789abcdeF"));
    assert!(!secret_matches(secret, &secret[..31]));
    assert_eq!(
        check_activated_secret(secret, b"wrong").unwrap_err().code(),
        ErrorCode::TpmCredentialMismatch
    );

    // The same layout as tpm2_makecredential's (offline, -T none).
    std::fs::write(dir.path().join("secret.bin"), secret).unwrap();
    let name_hex = hex::encode(ak.name().unwrap());
    tpm.tool(
        dir.path(),
        &[
            "tpm2_makecredential",
            "-T",
            "none",
            "-e",
            "ek.pub",
            "-s",
            "secret.bin",
            "-n",
            &name_hex,
            "-o",
            "theirs.blob",
        ],
    )
    .unwrap();
    let theirs = std::fs::read(dir.path().join("theirs.blob")).unwrap();
    let ours = cred.to_tpm2_tools_file().unwrap();
    assert_eq!(theirs.len(), ours.len());
    assert_eq!(theirs[..12], ours[..12]); // magic, version, sizes of ID object and HMAC
    assert_eq!(activate(&theirs).unwrap(), secret);

    // Shorter secrets come back as they were.
    let cred = make_credential(&ek, &ak.name().unwrap(), b"sixteen byte key").unwrap();
    assert_eq!(
        activate(&cred.to_tpm2_tools_file().unwrap()).unwrap(),
        b"sixteen byte key"
    );
    // Sealed for another key's name, the TPM refuses to release it.
    let mut other_name = ak.name().unwrap();
    other_name[5] ^= 1;
    let cred = make_credential(&ek, &other_name, secret).unwrap();
    assert!(activate(&cred.to_tpm2_tools_file().unwrap()).is_err());
    // A tampered ID object fails the TPM's integrity check.
    let mut cred = make_credential(&ek, &ak.name().unwrap(), secret).unwrap();
    let last = cred.id_object.len() - 1;
    cred.id_object[last] ^= 1;
    assert!(activate(&cred.to_tpm2_tools_file().unwrap()).is_err());
    // Each credential uses a fresh seed.
    let a = make_credential(&ek, &ak.name().unwrap(), secret).unwrap();
    let b = make_credential(&ek, &ak.name().unwrap(), secret).unwrap();
    assert_ne!(a.encrypted_secret, b.encrypted_secret);
    assert_ne!(a.id_object, b.id_object);
    assert_eq!(a.encrypted_secret.len(), 256);
    assert_eq!(a.id_object.len(), 2 + 32 + 2 + 32);

    // Refusals: an ECC EK (unsupported), a secret over 32 bytes, a name
    // that is not alg ‖ digest.
    let ecc_ek = ecc_ek(&tpm, dir.path());
    let e = make_credential(&ecc_ek, &ak.name().unwrap(), secret).unwrap_err();
    assert!(matches!(e, TpmError::Unsupported(_)), "{e}");
    assert!(make_credential(&ek, &ak.name().unwrap(), &[0u8; 33]).is_err());
    assert!(make_credential(&ek, &ak.name().unwrap(), b"").is_err());
    assert_eq!(
        make_credential(&ek, &ak.name().unwrap()[..33], secret)
            .unwrap_err()
            .code(),
        ErrorCode::TpmStructureMalformed
    );
}
