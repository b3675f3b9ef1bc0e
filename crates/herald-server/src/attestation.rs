//! `herald.v1.NodeAttestationService`: the decision path for TPM nodes.
//!
//! One stream, one attestation, one path — hello (EK certificate, EK and AK
//! public areas) → EK chain against each TPM policy's roots → EK public
//! matches its certificate → AK attributes → registry pre-check (banned?) →
//! challenge (software MakeCredential to the EK for the AK's name, a fresh
//! nonce, the PCR selection) → proof → activated secret (constant time) →
//! CSR → quote (signature first, signer, nonce bound to the CSR key, PCR
//! selection and digest) → policy (golden PCRs, firmware, pins, condition,
//! SPIFFE ID, enrolment factors) → the one decision path (issue, then one
//! transaction with the node registry's rules: bans, counters, one EK per
//! identity) → node SVID. Every refusal is audited with its stable code
//! before the stream ends.
//!
//! Nodes without a TPM send a hello with a platform token (Kubernetes,
//! GCP) or an AWS instance identity document and their CSR instead, and
//! hear the result at once: token verified (OIDC verifier; single use
//! recorded by the commit) or document signature verified against each
//! AWS policy's certificates → the node it names (registry key) → banned?
//! → policy → the same decision path. A TPM node whose policy requires a
//! platform token too (machine MFA) sends it in its hello beside the TPM
//! fields.
//!
//! A vTPM without an EK certificate is trusted by a policy that lists its
//! EK's hash (`evidence.tpm.ek_hashes`); the rest of the path is the same.
//!
//! Continuous attestation (`evidence.tpm.reattest`): the same stream with
//! `hello.renewal`, over mTLS with the current node SVID. The presented SVID
//! must be a live node lineage and the EK and AK the ones the registry holds
//! for its identity; credential activation is skipped (the AK's binding to
//! the EK was proven at enrolment and the AK name is compared), and the
//! quote is verified exactly as at enrolment. The node SVID it yields is a
//! new root: fresh evidence, so the lineage's age is the quote's. Every
//! outcome for a known node — success or refusal code — is recorded on its
//! registry row (`herald node list`).

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use herald_attest::join_token::MAX_TOKEN_LEN;
use herald_attest::tpm::{
    self as verify, EkTrust, PcrBank, PcrSelection, QuoteInput, TpmPublic, VerifiedTpm,
};
use herald_attest::{TokenUse, VerifiedNodeToken, aws_iid};
use herald_ca::csr::{MAX_CSR_LEN, verify_csr};
use herald_core::{ErrorCode, EvidenceType};
use herald_policy::{
    AwsIidEvidence, Evidence, Factor, PlatformTokenEvidence, PolicySet, TpmEvidence,
};
use herald_proto::v1::node_attestation_service_server::NodeAttestationService;
use herald_proto::v1::{
    AttestChallenge, AttestHello, AttestProof, AttestRequest, AttestResponse, attest_request,
    attest_response,
};
use herald_store::{AGENT_KEY_PREFIX, NodeAttestation, NodeRecord, NodeStatus, ReplayKey};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::decision::{Decided, RequestedCredential, Run};
use crate::status::Refusal;
use crate::{Shared, unix_now};

/// Largest EK certificate, intermediate, or TPM structure accepted.
const MAX_TPM_BLOB: usize = 8 * 1024;
/// Most intermediates an agent may send.
const MAX_INTERMEDIATES: usize = 4;
/// Largest platform token accepted on the stream (the verifier caps each
/// issuer's tokens again).
const MAX_PLATFORM_TOKEN: usize = 16 * 1024;

/// The gRPC service.
pub struct NodeAttestationApi {
    shared: Arc<Shared>,
}

impl NodeAttestationApi {
    /// Serves from `shared` state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

type ResponseStream = Pin<Box<dyn Stream<Item = Result<AttestResponse, Status>> + Send>>;

impl From<verify::TpmError> for Refusal {
    fn from(e: verify::TpmError) -> Self {
        Refusal::new(e.code(), e.to_string())
    }
}

/// Waits for the next message, within the configured step deadline.
async fn next_step(
    shared: &Shared,
    inbound: &mut Streaming<AttestRequest>,
) -> Result<attest_request::Step, Refusal> {
    let deadline = shared.config.attestation.step_timeout;
    match tokio::time::timeout(deadline, inbound.message()).await {
        Err(_) => Err(Refusal::new(
            ErrorCode::AttestationTimeout,
            format!("no message within {}s", deadline.as_secs()),
        )),
        Ok(Err(status)) => Err(Refusal::new(
            ErrorCode::AttestationProtocol,
            format!("the stream failed: {}", status.message()),
        )),
        Ok(Ok(None)) => Err(Refusal::new(
            ErrorCode::AttestationProtocol,
            "the agent closed the stream early",
        )),
        Ok(Ok(Some(AttestRequest { step: None }))) => Err(Refusal::new(
            ErrorCode::AttestationProtocol,
            "empty message",
        )),
        Ok(Ok(Some(AttestRequest { step: Some(s) }))) => Ok(s),
    }
}

fn too_large(what: &str) -> Refusal {
    Refusal::new(
        ErrorCode::RequestTooLarge,
        format!("{what} exceeds its size cap"),
    )
}

fn check_hello_sizes(h: &AttestHello) -> Result<(), Refusal> {
    if h.ek_certificate.len() > MAX_TPM_BLOB
        || h.ek_public.len() > MAX_TPM_BLOB
        || h.ak_public.len() > MAX_TPM_BLOB
        || h.ek_intermediates.len() > MAX_INTERMEDIATES
        || h.ek_intermediates.iter().any(|c| c.len() > MAX_TPM_BLOB)
        || h.join_token.len() > MAX_TOKEN_LEN
        || h.platform_token.len() > MAX_PLATFORM_TOKEN
        || h.csr.len() > MAX_CSR_LEN
        || h.aws_iid.as_ref().is_some_and(|a| {
            a.document.len() > aws_iid::MAX_DOCUMENT_BYTES
                || a.signature.len() > aws_iid::MAX_SIGNATURE_BYTES
        })
    {
        return Err(too_large("a hello field"));
    }
    let tpm = !(h.ek_certificate.is_empty() && h.ek_public.is_empty() && h.ak_public.is_empty());
    let token = !h.platform_token.is_empty();
    let iid = h.aws_iid.is_some();
    // No EK certificate is fine for a TPM: a vTPM is then trusted by its
    // EK's hash. A renewal with a fresh quote is a TPM's only.
    let shape_ok = match (tpm, token, iid) {
        (true, _, false) => !h.ek_public.is_empty() && !h.ak_public.is_empty() && h.csr.is_empty(),
        (false, true, false) | (false, false, true) => !h.csr.is_empty() && !h.renewal,
        _ => false,
    };
    if !shape_ok {
        return Err(Refusal::new(
            ErrorCode::InvalidRequest,
            "hello needs ek_public and ak_public (an EK certificate unless the EK is trusted by \
             hash; optionally a platform token), or else a platform token or an AWS instance \
             identity document with a CSR",
        ));
    }
    Ok(())
}

/// The hello's platform token, verified and resolved to the node it names.
/// Its single-use key is what the commit must record.
async fn platform_token(
    shared: &Shared,
    run: &mut Run<'_>,
    text: &str,
) -> Result<(VerifiedNodeToken, ReplayKey), Refusal> {
    let state = shared.policy_state()?;
    let token = state
        .oidc
        .verify(text, unix_now())
        .await
        .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
    run.audit.caller = format!(
        "{} oidc:{}#{}",
        run.audit.caller, token.issuer, token.subject
    );
    run.audit.evidence_digest = Some(match run.audit.evidence_digest.take() {
        Some(d) => format!("{d}+{}", token.digest),
        None => token.digest.clone(),
    });
    let replay = ReplayKey {
        key: token.replay_key.clone(),
        expires_at: token.replay_until(state.oidc.leeway_secs(&token.issuer)),
    };
    let node = herald_attest::node_token::node_token(token)
        .map_err(|e| Refusal::new(e.code(), e.to_string()))?;
    Ok((node, replay))
}

/// Policy's decision on a node's verified evidence, with the hello's join
/// token as its enrolment factor when the node is not enrolled yet; the
/// token's hash when the commit must consume it (it was a factor).
async fn decide(
    shared: &Shared,
    run: &mut Run<'_>,
    policies: &PolicySet,
    mut evidence: Evidence,
    join_token: &str,
    enrolled: bool,
) -> Result<(herald_policy::Decision, Option<[u8; 32]>), Refusal> {
    if !join_token.is_empty() && !enrolled {
        evidence.join_token =
            Some(crate::flows::join_token(shared, run, join_token, TokenUse::NodeEnrolment).await?);
    }
    let decision = run.decided(policies.evaluate(&evidence))?;
    // The token is consumed only when it was a factor of the decision.
    let consumed = if decision.factors.contains(&Factor::JoinToken) {
        evidence.join_token.map(|t| t.hash)
    } else {
        None
    };
    Ok((decision, consumed))
}

/// The registry's record of a node, refused here if it is banned.
async fn registered(
    shared: &Shared,
    run: &mut Run<'_>,
    node_key: &str,
) -> Result<Option<NodeRecord>, Refusal> {
    let known = shared.store.node_by_ek(node_key).await?;
    if let Some(node) = &known {
        run.audit.spiffe_id = Some(node.spiffe_id.clone());
        if node.status == NodeStatus::Banned {
            return Err(Refusal::new(ErrorCode::NodeBanned, "the node is banned"));
        }
    }
    Ok(known)
}

fn check_proof_sizes(p: &AttestProof) -> Result<(), Refusal> {
    if p.activated_secret.len() > 64
        || p.quote.len() > MAX_TPM_BLOB
        || p.quote_signature.len() > MAX_TPM_BLOB
        || p.pcr_values.len() > 24
        || p.pcr_values.iter().any(|v| v.len() > 64)
        || p.csr.len() > MAX_CSR_LEN
    {
        return Err(too_large("a proof field"));
    }
    Ok(())
}

fn random<const N: usize>() -> Result<[u8; N], Refusal> {
    let mut out = [0u8; N];
    aws_lc_rs::rand::fill(&mut out)
        .map_err(|_| Refusal::new(ErrorCode::Internal, "no randomness"))?;
    Ok(out)
}

/// What the TPM policies make of an EK: the ones that trust it (its
/// certificate chains to their manufacturer roots, or they list its hash —
/// a vTPM without one), the union of their PCR selections, and the
/// certificate that vouched, checked to be this EK's.
struct EkVouched {
    trusted_by: Vec<String>,
    selection: Vec<u8>,
    ek: Option<verify::VerifiedEk>,
}

fn ek_vouched_for(
    policies: &PolicySet,
    hello: &AttestHello,
    ek_public: &TpmPublic,
    ek_id: &str,
) -> Result<EkVouched, Refusal> {
    let now = std::time::SystemTime::now();
    let mut trusted_by = Vec::new();
    let mut selection: Vec<u8> = Vec::new();
    let mut chain_error = None;
    let mut verified_ek = None;
    let mut any_tpm_policy = false;
    for (name, rules) in policies.tpm_policies() {
        any_tpm_policy = true;
        let by_certificate = if hello.ek_certificate.is_empty() || rules.ek_roots.is_empty() {
            false
        } else {
            let trust = EkTrust::from_der(&rules.ek_roots, &rules.ek_intermediates)?;
            match verify::verify_ek_certificate(
                &trust,
                &hello.ek_certificate,
                &hello.ek_intermediates,
                now,
            ) {
                Ok(ek) => {
                    verified_ek = Some(ek);
                    true
                }
                Err(e) => {
                    chain_error = Some(e);
                    false
                }
            }
        };
        if by_certificate || rules.ek_hashes.iter().any(|h| h == ek_id) {
            trusted_by.push(name.to_owned());
            selection.extend(&rules.pcrs);
        }
    }
    if trusted_by.is_empty() {
        return Err(match chain_error {
            Some(e) => e.into(),
            None if any_tpm_policy => Refusal::new(
                ErrorCode::TpmEkCertificateUntrusted,
                "no policy's EK roots vouch for this EK and none lists its hash",
            ),
            None => Refusal::new(
                ErrorCode::PolicyDenied,
                "no attestation policy accepts TPM evidence",
            ),
        });
    }
    selection.sort_unstable();
    selection.dedup();
    // A certificate that vouches for some policy must be this EK's.
    if let Some(ek) = &verified_ek {
        verify::check_ek_public_matches(ek_public, ek)?;
    }
    Ok(EkVouched {
        trusted_by,
        selection,
        ek: verified_ek,
    })
}

/// The node's TPM keys as its hello presented them.
struct TpmKeys<'a> {
    ek: &'a TpmPublic,
    ak: &'a TpmPublic,
    ak_name: &'a [u8],
    ak_qualified_name: &'a [u8],
}

/// The challenge and its proof: a fresh nonce and the PCR selection, and at
/// enrolment a secret made to the EK for the AK's name (credential
/// activation; a renewal instead names the AK the registry holds, whose
/// binding was proven then, and whose key never leaves the TPM). Returns
/// the verified quote — over the nonce bound to the CSR's key — and the
/// CSR.
async fn challenge_and_proof(
    shared: &Shared,
    inbound: &mut Streaming<AttestRequest>,
    tx: &mpsc::Sender<Result<AttestResponse, Status>>,
    keys: TpmKeys<'_>,
    selection: &[u8],
    enrolment: bool,
) -> Result<(verify::VerifiedQuote, Vec<u8>), Refusal> {
    let nonce = random::<32>()?;
    let secret = if enrolment {
        Some(random::<32>()?)
    } else {
        None
    };
    let (credential_blob, encrypted_secret) = match &secret {
        Some(secret) => {
            let c = verify::make_credential(keys.ek, keys.ak_name, secret)?;
            (c.id_object, c.encrypted_secret)
        }
        None => (Vec::new(), Vec::new()),
    };
    let challenge = AttestChallenge {
        credential_blob,
        encrypted_secret,
        nonce: nonce.to_vec(),
        pcr_bank: u32::from(herald_policy::tpm::PCR_BANK_SHA256),
        pcrs: selection.iter().map(|p| u32::from(*p)).collect(),
    };
    tx.send(Ok(AttestResponse {
        step: Some(attest_response::Step::Challenge(challenge)),
    }))
    .await
    .map_err(|_| Refusal::new(ErrorCode::AttestationProtocol, "the agent went away"))?;

    let proof = match next_step(shared, inbound).await? {
        attest_request::Step::Proof(p) => p,
        attest_request::Step::Hello(_) => {
            return Err(Refusal::new(
                ErrorCode::AttestationProtocol,
                "expected the proof",
            ));
        }
    };
    check_proof_sizes(&proof)?;
    if let Some(secret) = &secret
        && !verify::secret_matches(secret, &proof.activated_secret)
    {
        return Err(Refusal::new(
            ErrorCode::TpmCredentialMismatch,
            "the activated secret is wrong: the AK is not resident with this EK",
        ));
    }
    let csr = verify_csr(&proof.csr)?;
    let expected = verify::attestation_nonce_binding(&nonce, &csr.spki_der);
    let pcr_selection = PcrSelection {
        bank: PcrBank::Sha256,
        pcrs: selection.iter().copied().collect(),
    };
    let quote = verify::verify_quote(&QuoteInput {
        ak: keys.ak,
        expected_signer: keys.ak_qualified_name,
        attest: &proof.quote,
        signature: &proof.quote_signature,
        expected_extra_data: &expected,
        selection: &pcr_selection,
        pcr_values: &proof.pcr_values,
    })?;
    Ok((quote, proof.csr))
}

impl NodeAttestationApi {
    /// The evidence half of an attestation: hello, challenge, proof, every
    /// TPM check, then policy. `tx` carries the challenge; `chain` is the
    /// mTLS client chain (a renewal's node SVID). Returns the decision
    /// (with the registry row the commit writes) and the CSR the node SVID
    /// is for. `known_ek` learns the EK hash of an enrolled node as soon as
    /// it is identified, so its quote's outcome can be recorded.
    async fn evidence(
        &self,
        mut inbound: Streaming<AttestRequest>,
        tx: &mpsc::Sender<Result<AttestResponse, Status>>,
        chain: Option<&[Vec<u8>]>,
        run: &mut Run<'_>,
        known_ek: &mut Option<String>,
    ) -> Result<(Decided, Vec<u8>), Refusal> {
        run.admit()?;
        let shared = &*self.shared;
        let policies = shared.policies()?;
        let hello = match next_step(shared, &mut inbound).await? {
            attest_request::Step::Hello(h) => h,
            attest_request::Step::Proof(_) => {
                return Err(Refusal::new(
                    ErrorCode::AttestationProtocol,
                    "the first message must be a hello",
                ));
            }
        };
        // A refused hello is audited under the evidence it carried.
        if hello.aws_iid.is_some() {
            run.audit.evidence_type = Some(EvidenceType::AwsIid);
        } else if hello.ek_public.is_empty() && !hello.platform_token.is_empty() {
            run.audit.evidence_type = Some(EvidenceType::PlatformToken);
        }
        check_hello_sizes(&hello)?;
        if hello.ek_public.is_empty() {
            return self.without_tpm(hello, run, &policies).await;
        }
        // A renewal is authenticated by the current node SVID first: a
        // live node lineage under a node policy still in effect.
        let renewing = if hello.renewal {
            run.audit.action = "node.reattest".into();
            Some(crate::flows::node(shared, run, chain).await?)
        } else {
            None
        };
        let ek_public = TpmPublic::parse(&hello.ek_public)?;
        let ak_public = TpmPublic::parse(&hello.ak_public)?;
        let ek_id = verify::ek_hash(&ek_public);
        run.audit.evidence_digest = Some(ek_id.clone());
        run.audit.caller = format!("{} ek:{}", run.audit.caller, &ek_id[..16]);

        let vouched = ek_vouched_for(&policies, &hello, &ek_public, &ek_id)?;
        verify::check_attestation_key(&ak_public)?;
        let ak_name = ak_public.name()?;
        let ak_qualified_name = verify::qualified_name_under_ek(&ek_public, &ak_public)?;

        // A banned node is refused before the TPM does any work.
        let known = shared.store.node_by_ek(&ek_id).await?;
        if let Some(node) = &known {
            *known_ek = Some(ek_id.clone());
            run.audit.spiffe_id = Some(node.spiffe_id.clone());
            if node.status == NodeStatus::Banned {
                return Err(Refusal::new(ErrorCode::NodeBanned, "the node is banned"));
            }
        }
        if let Some(current) = &renewing {
            check_renewal(known.as_ref(), current, &ak_name)?;
        }

        let (quote, csr) = challenge_and_proof(
            shared,
            &mut inbound,
            tx,
            TpmKeys {
                ek: &ek_public,
                ak: &ak_public,
                ak_name: &ak_name,
                ak_qualified_name: &ak_qualified_name,
            },
            &vouched.selection,
            renewing.is_none(),
        )
        .await?;
        let tpm = VerifiedTpm {
            ek_hash: ek_id.clone(),
            ak_name,
            ek: vouched.ek,
            quote,
            trusted_by: vouched.trusted_by,
        };

        // Policy.
        let enrolled = known
            .as_ref()
            .is_some_and(|n| n.status == NodeStatus::Active);
        let mut evidence = Evidence {
            tpm: Some(TpmEvidence::verified(&tpm, enrolled)),
            ..Evidence::default()
        };
        let mut replay = None;
        if !hello.platform_token.is_empty() {
            let (token, key) = platform_token(shared, run, &hello.platform_token).await?;
            evidence.platform_token = Some(PlatformTokenEvidence::verified(&token, enrolled));
            replay = Some(key);
        }
        let (decision, join_token) = decide(
            shared,
            run,
            &policies,
            evidence,
            &hello.join_token,
            enrolled,
        )
        .await?;
        if let Some(current) = &renewing
            && current.spiffe_id != decision.spiffe_id
        {
            return Err(Refusal::new(
                ErrorCode::PolicyDenied,
                format!(
                    "policy now names this node {}, not {}: a renewal keeps its identity; re-attest",
                    decision.spiffe_id, current.spiffe_id
                ),
            ));
        }
        if join_token.is_some() {
            run.audit.evidence_type = Some(EvidenceType::TpmAndJoinToken);
        }
        // Likewise the platform token: single use only as a factor.
        let replay = if decision.factors.contains(&Factor::PlatformToken) {
            run.audit.evidence_type = Some(EvidenceType::TpmAndPlatformToken);
            replay
        } else {
            None
        };
        let node = NodeAttestation {
            ek_hash: ek_id,
            spiffe_id: decision.spiffe_id.to_string(),
            ak_name: hex::encode(&tpm.ak_name),
            policy: decision.policy.clone(),
            reset_count: tpm.quote.reset_count,
            restart_count: tpm.quote.restart_count,
            clock: tpm.quote.clock,
            firmware_version: tpm.quote.firmware_version,
            golden_set: decision.golden_set.clone(),
            now_s: unix_now(),
        };
        let decided = Decided {
            join_token,
            replay,
            node: Some(node),
            ..Decided::new(decision)
        };
        Ok((decided, csr))
    }

    /// A node without a TPM: a platform token or an AWS instance identity
    /// document, and the CSR, all in the hello.
    async fn without_tpm(
        &self,
        hello: AttestHello,
        run: &mut Run<'_>,
        policies: &PolicySet,
    ) -> Result<(Decided, Vec<u8>), Refusal> {
        let shared = &*self.shared;
        let now = unix_now();
        let mut evidence = Evidence::default();
        let (node_key, enrolled, replay, ak_name) = if let Some(iid) = &hello.aws_iid {
            // Which AWS policies' certificates vouch for it?
            let mut trusted_by = Vec::new();
            let mut verified = None;
            let mut failure = None;
            for (name, rules) in policies.aws_iid_policies() {
                match aws_iid::verify(&rules.keys, &iid.document, &iid.signature) {
                    Ok(v) => {
                        trusted_by.push(name.to_owned());
                        verified = Some(v);
                    }
                    Err(e) => failure = Some(e),
                }
            }
            let Some(v) = verified else {
                return Err(match failure {
                    Some(e) => Refusal::new(e.code(), e.to_string()),
                    None => Refusal::new(
                        ErrorCode::PolicyDenied,
                        "no attestation policy accepts AWS instance identity documents",
                    ),
                });
            };
            run.audit.evidence_digest = Some(v.digest.clone());
            run.audit.caller = format!("{} aws:{}/{}", run.audit.caller, v.account, v.instance_id);
            let known = registered(shared, run, &v.node_key).await?;
            let enrolled = known
                .as_ref()
                .is_some_and(|n| n.status == NodeStatus::Active);
            // The document is the same for the instance's life: the agent's
            // key is what makes a later attestation this instance's agent.
            let csr = verify_csr(&hello.csr)?;
            let ak_name = format!("{AGENT_KEY_PREFIX}{}", herald_ca::sha256_hex(&csr.spki_der));
            if let Some(node) = known.as_ref().filter(|n| n.ak_name != ak_name) {
                return Err(Refusal::new(
                    ErrorCode::NodeAgentKeyChanged,
                    format!(
                        "instance {} is enrolled with another agent key; `herald node reset {}` lets it enrol again",
                        v.instance_id, node.spiffe_id
                    ),
                ));
            }
            evidence.aws_iid = Some(AwsIidEvidence::verified(&v, trusted_by, now, enrolled));
            (v.node_key, enrolled, None, ak_name)
        } else {
            let (token, replay) = platform_token(shared, run, &hello.platform_token).await?;
            let known = registered(shared, run, &token.node_key).await?;
            let enrolled = known
                .as_ref()
                .is_some_and(|n| n.status == NodeStatus::Active);
            verify_csr(&hello.csr)?;
            evidence.platform_token = Some(PlatformTokenEvidence::verified(&token, enrolled));
            (token.node_key, enrolled, Some(replay), String::new())
        };
        let (decision, join_token) =
            decide(shared, run, policies, evidence, &hello.join_token, enrolled).await?;
        let node = NodeAttestation {
            ek_hash: node_key,
            spiffe_id: decision.spiffe_id.to_string(),
            ak_name,
            policy: decision.policy.clone(),
            reset_count: 0,
            restart_count: 0,
            clock: 0,
            firmware_version: 0,
            golden_set: None,
            now_s: now,
        };
        let decided = Decided {
            join_token,
            replay,
            node: Some(node),
            ..Decided::new(decision)
        };
        Ok((decided, hello.csr))
    }
}

/// A renewal with a fresh quote must come from the TPM the registry holds
/// for the presented node SVID's identity, with the AK recorded for it.
fn check_renewal(
    known: Option<&herald_store::NodeRecord>,
    current: &herald_attest::VerifiedSvid,
    ak_name: &[u8],
) -> Result<(), Refusal> {
    let Some(node) = known.filter(|n| n.spiffe_id == current.spiffe_id.as_str()) else {
        return Err(Refusal::new(
            ErrorCode::NodeEkChanged,
            "this EK is not the one enrolled for the presented node SVID's identity",
        ));
    };
    if node.ak_name != hex::encode(ak_name) {
        return Err(Refusal::new(
            ErrorCode::TpmAkChanged,
            "the AK is not the one recorded for this node: re-attest in full",
        ));
    }
    Ok(())
}

#[tonic::async_trait]
impl NodeAttestationService for NodeAttestationApi {
    type AttestStream = ResponseStream;

    async fn attest(
        &self,
        request: Request<Streaming<AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        let peer = request.remote_addr();
        let chain = crate::svid_service::peer_certs(&request);
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(2);
        let api = NodeAttestationApi {
            shared: self.shared.clone(),
        };
        tokio::spawn(async move {
            let shared = api.shared.clone();
            let mut run = Run::start(&shared, "node.attest", "grpc", peer, EvidenceType::Tpm);
            let span = run.span();
            let mut known_ek = None;
            let result = tracing::Instrument::instrument(
                async {
                    let (decided, csr) = api
                        .evidence(inbound, &tx, chain.as_deref(), &mut run, &mut known_ek)
                        .await?;
                    let wanted = RequestedCredential::X509Svid { csr, ttl: None };
                    let svid = crate::svid_service::x509_response(
                        run.issue(decided, &wanted).await?.issued,
                    )?;
                    // The issuance is committed and audited: an agent that
                    // leaves now is not a refusal (nor its node's quote).
                    if tx
                        .send(Ok(AttestResponse {
                            step: Some(attest_response::Step::Result(svid)),
                        }))
                        .await
                        .is_err()
                    {
                        tracing::debug!("the agent left before hearing its result");
                    }
                    Ok(())
                },
                span,
            )
            .await;
            if let Err(r) = run.finish(result).await {
                // An enrolled node's refused quote shows on its registry
                // row (a success is recorded by the commit itself).
                if let Some(ek) = known_ek
                    && let Err(e) = shared
                        .store
                        .record_quote_refusal(&ek, unix_now(), r.code)
                        .await
                {
                    tracing::warn!(error = %e, "could not record the refused quote on the node");
                }
                if tx.send(Err(r.to_status())).await.is_err() {
                    tracing::debug!("the agent left before hearing the refusal");
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
