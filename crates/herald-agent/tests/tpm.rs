//! The agent's TPM layer against a real swtpm, cross-checked with
//! tpm2-tools: its quotes verify with `tpm2_checkquote`, its AK is created
//! under the EK and kept across restarts, and Herald's MakeCredential
//! comes back activated.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

use herald_agent::tpm::{NodeTpm, PCR_BANK_SHA256};
use herald_attest::tpm::{
    PcrBank, PcrSelection, QuoteInput, TpmPublic, check_attestation_key, make_credential,
    qualified_name_under_ek, verify_quote,
};
use herald_test_tpm::SoftTpm;

#[test]
fn agent_quotes_verify_with_tpm2_checkquote_and_herald() {
    let tpm = SoftTpm::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let mut node = NodeTpm::open(&tpm.tcti(), state.path()).unwrap();
    let id = node.identity().clone();
    let ak = TpmPublic::parse(&id.ak_public).unwrap();
    let ek = TpmPublic::parse(&id.ek_public).unwrap();
    check_attestation_key(&ak).unwrap();
    assert_eq!(id.ek_certificate, tpm.ek_cert_der().unwrap());

    let nonce = [0x5au8; 32];
    let quote = node.quote(&nonce, PCR_BANK_SHA256, &[7, 0, 2]).unwrap();
    assert_eq!(quote.pcr_values.len(), 3);

    // Herald's verifier accepts it (ascending PCR order).
    let selection = PcrSelection {
        bank: PcrBank::Sha256,
        pcrs: [0, 2, 7].into_iter().collect(),
    };
    let signer = qualified_name_under_ek(&ek, &ak).unwrap();
    verify_quote(&QuoteInput {
        ak: &ak,
        expected_signer: &signer,
        attest: &quote.attest,
        signature: &quote.signature,
        expected_extra_data: &nonce,
        selection: &selection,
        pcr_values: &quote.pcr_values,
    })
    .unwrap();

    // So does tpm2-tools, which shares no code with Herald.
    let dir = tempfile::tempdir().unwrap();
    let mut tpm2b = (id.ak_public.len() as u16).to_be_bytes().to_vec();
    tpm2b.extend_from_slice(&id.ak_public);
    std::fs::write(dir.path().join("ak.pub"), tpm2b).unwrap();
    std::fs::write(dir.path().join("quote.msg"), &quote.attest).unwrap();
    std::fs::write(dir.path().join("quote.sig"), &quote.signature).unwrap();
    let check = |nonce_hex: &str| {
        Command::new("tpm2_checkquote")
            .current_dir(dir.path())
            .args([
                "-u",
                "ak.pub",
                "-m",
                "quote.msg",
                "-s",
                "quote.sig",
                "-g",
                "sha256",
                "-q",
            ])
            .arg(nonce_hex)
            .output()
            .expect("tpm2_checkquote is not installed (apt-get install tpm2-tools)")
    };
    let ok = check(&hex::encode(nonce));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let wrong = check(&hex::encode([0x5bu8; 32]));
    assert!(
        !wrong.status.success(),
        "tpm2_checkquote accepted another nonce"
    );
}

#[test]
fn the_ak_is_kept_across_restarts_and_activates_heralds_credentials() {
    let mut tpm = SoftTpm::start().unwrap();
    let state = tempfile::tempdir().unwrap();
    let first = {
        let node = NodeTpm::open(&tpm.tcti(), state.path()).unwrap();
        node.identity().clone()
    };
    use std::os::unix::fs::PermissionsExt;
    for f in ["ak.pub", "ak.priv"] {
        let mode = std::fs::metadata(state.path().join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    // A reboot of the TPM: same EK, same AK (loaded from its wrapped blob).
    tpm.restart().unwrap();
    let mut node = NodeTpm::open(&tpm.tcti(), state.path()).unwrap();
    assert_eq!(node.identity().ak_public, first.ak_public);
    assert_eq!(node.identity().ek_public, first.ek_public);

    let ek = TpmPublic::parse(&first.ek_public).unwrap();
    let ak = TpmPublic::parse(&first.ak_public).unwrap();
    let secret = [0x42u8; 32];
    let cred = make_credential(&ek, &ak.name().unwrap(), &secret).unwrap();
    let got = node
        .activate_credential(&cred.id_object, &cred.encrypted_secret)
        .unwrap();
    assert_eq!(got, secret);
    // A credential for another name is refused by the TPM.
    let mut name = ak.name().unwrap();
    name[3] ^= 1;
    let cred = make_credential(&ek, &name, &secret).unwrap();
    assert!(
        node.activate_credential(&cred.id_object, &cred.encrypted_secret)
            .is_err()
    );
    // Another state directory on the same TPM is another AK.
    let other = tempfile::tempdir().unwrap();
    drop(node);
    let node2 = NodeTpm::open(&tpm.tcti(), other.path()).unwrap();
    assert_ne!(node2.identity().ak_public, first.ak_public);
}
