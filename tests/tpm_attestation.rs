//! Every way a TPM attestation can be wrong, against the real server and
//! real software TPMs: each is refused with its stable code and audited.
//! The stream is driven here, step by step, with the agent's own TPM layer,
//! so each test can tamper with exactly one thing.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{KEK_HEX, Server, TRUST_DOMAIN, herald_bin, ok, stdout};
use herald_agent::attest::nonce_binding;
use herald_agent::tpm::TpmHandle;
use herald_client::{ClientError, HeraldClient, keys};
use herald_core::ErrorCode;
use herald_proto::v1::node_attestation_service_client::NodeAttestationServiceClient;
use herald_proto::v1::{
    AttestChallenge, AttestHello, AttestProof, AttestRequest, AttestResponse, X509SvidResponse,
    attest_request, attest_response,
};
use herald_test_tpm::SoftTpm;
use tokio_stream::wrappers::ReceiverStream;

const ZERO: &str = "0000000000000000000000000000000000000000000000000000000000000000";

struct Site {
    dir: tempfile::TempDir,
}

impl Site {
    /// A server whose node policy trusts the EK roots of `trusted`; the
    /// SPIFFE ID comes from the firmware version, so two TPMs of one model
    /// claim the same identity (to test that a second EK cannot take it).
    fn new(trusted: &[&SoftTpm]) -> Site {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let kek = dir.path().join("kek");
        std::fs::write(&kek, KEK_HEX).unwrap();
        std::fs::set_permissions(&kek, std::fs::Permissions::from_mode(0o600)).unwrap();
        let policies = dir.path().join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        let mut roots = Vec::new();
        for (i, t) in trusted.iter().enumerate() {
            std::fs::copy(t.ek_root_pem_path(), policies.join(format!("r{i}.pem"))).unwrap();
            std::fs::copy(
                t.ek_intermediate_pem_path(),
                policies.join(format!("i{i}.pem")),
            )
            .unwrap();
            roots.push((format!("r{i}.pem"), format!("i{i}.pem")));
        }
        let policy = format!(
            "name: rack\nevidence:\n  tpm:\n    ek_roots: [{}]\n    ek_intermediates: [{}]\n    pcrs: [0, 7]\n    golden:\n      - {{ name: pristine, pcrs: {{ 0: \"{ZERO}\", 7: \"{ZERO}\" }} }}\nspiffe_id:\n  prefix: spiffe://{TRUST_DOMAIN}/node/\n  template: \"spiffe://{TRUST_DOMAIN}/node/rack/fw-{{firmware_version}}\"\ngrants:\n  x509_svid: {{ max_ttl: 10m }}\n",
            roots
                .iter()
                .map(|r| r.0.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            roots
                .iter()
                .map(|r| r.1.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        );
        std::fs::write(policies.join("rack.yaml"), policy).unwrap();
        // The step timeout is short so that the stalled-stream case ends
        // quickly, yet long enough for swtpm's activate + quote when the
        // whole suite loads both cores (1 s was not).
        let cfg = format!(
            "trust_domain = \"{TRUST_DOMAIN}\"\ndata_dir = \"{}\"\n[listen]\ngrpc = \"127.0.0.1:0\"\nhttp = \"127.0.0.1:0\"\n[ca]\nkey_encryption_key_file = \"{}\"\n[policy]\ndir = \"{}\"\n[attestation]\nstep_timeout = \"5s\"\n",
            dir.path().join("data").display(),
            kek.display(),
            policies.display(),
        );
        std::fs::write(dir.path().join("herald.toml"), cfg).unwrap();
        Site { dir }
    }

    fn herald(&self, args: &[&str]) -> std::process::Output {
        Command::new(herald_bin())
            .args(args)
            .env("HERALD_CONFIG", self.dir.path().join("herald.toml"))
            .output()
            .unwrap()
    }

    fn bundle(&self) -> Vec<Vec<u8>> {
        let text = std::fs::read_to_string(self.dir.path().join("data/bundle.pem")).unwrap();
        herald_client::files::from_pem("CERTIFICATE", &text).unwrap()
    }
}

type Edit<T> = Option<Box<dyn FnOnce(&mut T) + Send>>;

/// What to tamper with in one attempt.
#[derive(Default)]
struct Tamper {
    hello: Edit<AttestHello>,
    qualifying: Option<Vec<u8>>,
    pcrs: Option<Vec<u32>>,
    proof: Edit<AttestProof>,
    /// Replace the whole proof (except the activated secret).
    replay: Option<AttestProof>,
    /// Send no proof: the server's deadline must end the stream.
    stall: bool,
}

struct Attempt {
    result: Result<X509SvidResponse, ClientError>,
    proof: Option<AttestProof>,
}

/// One attestation: `tpm` provides the hello and activation, `quoter` the
/// quote (normally the same TPM).
async fn attempt(
    server: &Server,
    bundle: &[Vec<u8>],
    tpm: &TpmHandle,
    quoter: Option<&TpmHandle>,
    t: Tamper,
) -> Attempt {
    let client = HeraldClient::connect(&server.url(), bundle, None)
        .await
        .unwrap();
    let id = tpm.identity();
    let mut hello = AttestHello {
        ek_certificate: id.ek_certificate.clone(),
        ek_intermediates: Vec::new(),
        ek_public: id.ek_public.clone(),
        ak_public: id.ak_public.clone(),
        join_token: String::new(),
        ..AttestHello::default()
    };
    if let Some(f) = t.hello {
        f(&mut hello);
    }
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    tx.send(AttestRequest {
        step: Some(attest_request::Step::Hello(hello)),
    })
    .await
    .unwrap();
    let mut api = NodeAttestationServiceClient::new(client.channel());
    let fail = |e: tonic::Status| Attempt {
        result: Err(ClientError::from(e)),
        proof: None,
    };
    let mut responses = match api.attest(ReceiverStream::new(rx)).await {
        Ok(r) => r.into_inner(),
        Err(e) => return fail(e),
    };
    let challenge: AttestChallenge = match responses.message().await {
        Ok(Some(AttestResponse {
            step: Some(attest_response::Step::Challenge(c)),
        })) => c,
        Ok(other) => panic!("expected a challenge, got {other:?}"),
        Err(e) => return fail(e),
    };
    if t.stall {
        let started = std::time::Instant::now();
        let r = responses.message().await;
        assert!(started.elapsed() < Duration::from_secs(10));
        drop(tx);
        return match r {
            Err(e) => fail(e),
            Ok(m) => panic!("a stalled stream got {m:?}"),
        };
    }
    let key = keys::generate_key_and_csr().unwrap();
    let spki = {
        use x509_parser::prelude::FromDer;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&key.csr_der)
                .unwrap();
        csr.certification_request_info.subject_pki.raw.to_vec()
    };
    let secret = tpm
        .activate_credential(
            challenge.credential_blob.clone(),
            challenge.encrypted_secret.clone(),
        )
        .await
        .unwrap();
    let qualifying = t
        .qualifying
        .unwrap_or_else(|| nonce_binding(&challenge.nonce, &spki));
    let pcrs = t.pcrs.unwrap_or(challenge.pcrs.clone());
    let quote = quoter
        .unwrap_or(tpm)
        .quote(qualifying, challenge.pcr_bank, pcrs)
        .await
        .unwrap();
    let mut proof = AttestProof {
        activated_secret: secret.clone(),
        quote: quote.attest,
        quote_signature: quote.signature,
        pcr_values: quote.pcr_values,
        csr: key.csr_der,
    };
    if let Some(mut old) = t.replay {
        old.activated_secret = secret;
        proof = old;
    }
    if let Some(f) = t.proof {
        f(&mut proof);
    }
    tx.send(AttestRequest {
        step: Some(attest_request::Step::Proof(proof.clone())),
    })
    .await
    .unwrap();
    let result = match responses.message().await {
        Ok(Some(AttestResponse {
            step: Some(attest_response::Step::Result(r)),
        })) => Ok(r),
        Ok(other) => panic!("expected the result, got {other:?}"),
        Err(e) => Err(ClientError::from(e)),
    };
    Attempt {
        result,
        proof: Some(proof),
    }
}

fn code(a: &Attempt) -> Option<ErrorCode> {
    match &a.result {
        Ok(_) => None,
        Err(e) => Some(
            e.code()
                .unwrap_or_else(|| panic!("refusal without a code: {e}")),
        ),
    }
}

async fn open(tpm: &SoftTpm, state: &Path) -> TpmHandle {
    std::fs::create_dir_all(state).unwrap();
    TpmHandle::open(&tpm.tcti(), state).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_attestation_is_refused_with_its_code_and_audited() {
    common::require_tool("swtpm");
    let (mut a, b, c) = (
        SoftTpm::start().unwrap(),
        SoftTpm::start().unwrap(),
        SoftTpm::start().unwrap(),
    );
    // A and B come from trusted manufacturers; C's CA is unknown.
    let site = Site::new(&[&a, &b]);
    let server = Server::start(&site.dir.path().join("herald.toml"));
    let bundle = site.bundle();
    let state = tempfile::tempdir().unwrap();
    let ta = open(&a, &state.path().join("a")).await;
    let tb = open(&b, &state.path().join("b")).await;
    let tc = open(&c, &state.path().join("c")).await;

    // The honest attestation works and enrols A.
    let good = attempt(&server, &bundle, &ta, None, Tamper::default()).await;
    let svid = good.result.as_ref().unwrap();
    assert!(
        svid.spiffe_id
            .starts_with(&format!("spiffe://{TRUST_DOMAIN}/node/rack/fw-"))
    );
    let good_proof = good.proof.unwrap();

    let mut expect: Vec<(&str, ErrorCode, Attempt)> = Vec::new();
    let run = |t: Tamper| attempt(&server, &bundle, &ta, None, t);

    expect.push((
        "an EK certificate from an untrusted CA",
        ErrorCode::TpmEkCertificateUntrusted,
        attempt(&server, &bundle, &tc, None, Tamper::default()).await,
    ));
    let b_ek = tb.identity().ek_public.clone();
    expect.push((
        "an EK public that is not the certificate's key",
        ErrorCode::TpmEkPublicMismatch,
        run(Tamper {
            hello: Some(Box::new(move |h| h.ek_public = b_ek)),
            ..Tamper::default()
        })
        .await,
    ));
    expect.push((
        "an AK without `restricted`",
        ErrorCode::TpmAkRefused,
        run(Tamper {
            // objectAttributes is the u32 after type and nameAlg; restricted is bit 16.
            hello: Some(Box::new(|h| h.ak_public[5] &= !0x01)),
            ..Tamper::default()
        })
        .await,
    ));
    expect.push((
        "a wrong activated secret",
        ErrorCode::TpmCredentialMismatch,
        run(Tamper {
            proof: Some(Box::new(|p| p.activated_secret[0] ^= 1)),
            ..Tamper::default()
        })
        .await,
    ));
    expect.push((
        "a quote over another nonce",
        ErrorCode::TpmNonceMismatch,
        run(Tamper {
            qualifying: Some(vec![9; 32]),
            ..Tamper::default()
        })
        .await,
    ));
    expect.push((
        "a replayed proof from an earlier attestation",
        ErrorCode::TpmNonceMismatch,
        run(Tamper {
            replay: Some(good_proof),
            ..Tamper::default()
        })
        .await,
    ));
    expect.push((
        "a quote signed by another AK",
        ErrorCode::TpmQuoteSignatureInvalid,
        attempt(&server, &bundle, &ta, Some(&tb), Tamper::default()).await,
    ));
    expect.push((
        "a tampered TPMS_ATTEST",
        ErrorCode::TpmQuoteSignatureInvalid,
        run(Tamper {
            proof: Some(Box::new(|p| {
                let n = p.quote.len();
                p.quote[n - 1] ^= 0x01;
            })),
            ..Tamper::default()
        })
        .await,
    ));
    expect.push((
        "a PCR selection other than requested",
        ErrorCode::TpmPcrSelectionMismatch,
        run(Tamper {
            pcrs: Some(vec![0, 1, 7]),
            proof: Some(Box::new(|p| p.pcr_values.truncate(2))),
            ..Tamper::default()
        })
        .await,
    ));
    expect.push((
        "PCR values that do not match the quoted digest",
        ErrorCode::TpmPcrDigestMismatch,
        run(Tamper {
            proof: Some(Box::new(|p| p.pcr_values[0][0] ^= 1)),
            ..Tamper::default()
        })
        .await,
    ));
    expect.push((
        "a second TPM claiming the enrolled node's identity",
        ErrorCode::NodeEkChanged,
        attempt(&server, &bundle, &tb, None, Tamper::default()).await,
    ));
    expect.push((
        "a stream that stalls after the challenge",
        ErrorCode::AttestationTimeout,
        run(Tamper {
            stall: true,
            ..Tamper::default()
        })
        .await,
    ));
    expect.push((
        "garbage instead of an AK public area",
        ErrorCode::TpmStructureMalformed,
        run(Tamper {
            hello: Some(Box::new(|h| h.ak_public.truncate(10))),
            ..Tamper::default()
        })
        .await,
    ));

    // PCR values off policy: measure something into PCR 7 on A.
    let ext = Command::new("tpm2_pcrextend")
        .envs(a.env_for_tools())
        .arg(format!("7:sha256={}", "ab".repeat(32)))
        .output()
        .unwrap();
    assert!(
        ext.status.success(),
        "{}",
        String::from_utf8_lossy(&ext.stderr)
    );
    expect.push((
        "PCR values off policy",
        ErrorCode::TpmPcrOffPolicy,
        run(Tamper::default()).await,
    ));

    for (what, want, got) in &expect {
        assert_eq!(
            code(got),
            Some(*want),
            "{what}: {:?}",
            got.result.as_ref().err()
        );
    }

    // Counters that go backwards: the registry remembers a later TPM reset
    // than this TPM reports (a rolled-back or cloned TPM state).
    drop(ta);
    a.restart().unwrap(); // PCR 7 is clean again after the reset
    let ta = open(&a, &state.path().join("a")).await;
    common::node::advance_registry_reset_counts(&site.dir.path().join("data/herald.db")).await;
    let back = attempt(&server, &bundle, &ta, None, Tamper::default()).await;
    assert_eq!(code(&back), Some(ErrorCode::TpmCounterRollback));

    // Every refusal is in the audit log with its reason, and the chain holds.
    let audit = stdout(&ok(site.herald(&["audit", "export", "--since", "1h"])));
    for (what, want, _) in &expect {
        assert!(
            audit
                .lines()
                .any(|l| l.contains("\"node.attest\"") && l.contains(want.as_str())),
            "{what} ({want}) not audited"
        );
    }
    assert!(audit.contains("tpm_counter_rollback"));
    ok(site.herald(&["audit", "verify"]));
    // Exactly one node is registered, and it is A.
    let nodes = stdout(&ok(site.herald(&["node", "list", "--json"])));
    assert_eq!(nodes.lines().count(), 1, "{nodes}");
    drop(server);
}

/// An AK made under this TPM's EK (so it would pass credential activation)
/// whose use or administration a policy can authorize: with `policy` as
/// authPolicy, and adminWithPolicy when `admin_with_policy`. Returns its
/// TPMT_PUBLIC.
fn policy_bearing_ak(tpm: &SoftTpm, dir: &Path, policy: &[u8], admin_with_policy: bool) -> Vec<u8> {
    std::fs::write(dir.join("policy.dat"), policy).unwrap();
    tpm.tool(
        dir,
        &["tpm2_createek", "-c", "ek.ctx", "-G", "rsa", "-u", "ek.pub"],
    )
    .unwrap();
    // The EK's authPolicy is PolicySecret(endorsement): creating a child
    // under it needs that policy satisfied.
    tpm.tool(
        dir,
        &["tpm2_startauthsession", "--policy-session", "-S", "s.ctx"],
    )
    .unwrap();
    tpm.tool(dir, &["tpm2_policysecret", "-S", "s.ctx", "-c", "e"])
        .unwrap();
    let attrs = format!(
        "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|restricted|sign{}",
        if admin_with_policy {
            "|adminwithpolicy"
        } else {
            ""
        }
    );
    let mut args = vec![
        "tpm2_create",
        "-C",
        "ek.ctx",
        "-P",
        "session:s.ctx",
        "-G",
        "ecc256:ecdsa-sha256:null",
        "-g",
        "sha256",
        "-a",
        &attrs,
        "-u",
        "ak.pub",
        "-r",
        "ak.priv",
    ];
    if !policy.is_empty() {
        args.extend(["-L", "policy.dat"]);
    }
    tpm.tool(dir, &args).unwrap();
    tpm.tool(dir, &["tpm2_flushcontext", "s.ctx"]).unwrap();
    tpm.flush_transient(dir).unwrap();
    // ak.pub is a TPM2B_PUBLIC: drop the size prefix.
    std::fs::read(dir.join("ak.pub")).unwrap()[2..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ak_carrying_an_authorization_policy_is_refused() {
    common::require_tool("swtpm");
    herald_test_tpm::require_tpm2_tools().unwrap();
    let tpm = SoftTpm::start().unwrap();
    let site = Site::new(&[&tpm]);
    let server = Server::start(&site.dir.path().join("herald.toml"));
    let bundle = site.bundle();
    let work = tempfile::tempdir().unwrap();
    // PolicySecret(TPM_RH_ENDORSEMENT)'s digest: whoever holds the
    // endorsement authorization could use this AK.
    let secret_policy =
        hex::decode("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa").unwrap();
    let with_policy = policy_bearing_ak(&tpm, work.path(), &secret_policy, false);
    let admin_by_policy = policy_bearing_ak(&tpm, work.path(), &[], true);
    // The TPM made them, and Herald parses them as ECC restricted signing keys.
    let parsed = herald_attest::tpm::TpmPublic::parse(&with_policy).unwrap();
    assert_eq!(parsed.auth_policy, secret_policy);
    let handle = open(&tpm, &work.path().join("agent")).await;

    for (what, ak) in [
        ("a non-empty authPolicy", with_policy),
        ("adminWithPolicy", admin_by_policy),
    ] {
        let refused = attempt(
            &server,
            &bundle,
            &handle,
            None,
            Tamper {
                hello: Some(Box::new(move |h| h.ak_public = ak)),
                ..Tamper::default()
            },
        )
        .await;
        assert_eq!(code(&refused), Some(ErrorCode::TpmAkRefused), "{what}");
        let message = refused.result.unwrap_err().to_string();
        assert!(
            message.contains("authorization policy"),
            "{what}: {message}"
        );
    }
    // The same TPM with the agent's own AK is admitted: the policy was the
    // only thing wrong.
    let good = attempt(&server, &bundle, &handle, None, Tamper::default()).await;
    assert!(good.result.is_ok(), "{:?}", good.result.err());
    let audit = stdout(&ok(site.herald(&["audit", "export", "--since", "1h"])));
    assert_eq!(
        audit
            .lines()
            .filter(|l| l.contains("\"node.attest\"") && l.contains("tpm_ak_refused"))
            .count(),
        2,
        "{audit}"
    );
    drop(server);
}
