//! The agent's side of the node attestation stream (see
//! `NodeAttestationService` in `proto/herald/v1/herald.proto`).

use herald_client::{ClientError, HeraldClient, keys};
use herald_proto::v1::node_attestation_service_client::NodeAttestationServiceClient;
use herald_proto::v1::{
    AttestHello, AttestProof, AttestRequest, AwsInstanceIdentity, X509SvidResponse, attest_request,
    attest_response,
};
use tokio_stream::wrappers::ReceiverStream;

use crate::tpm::{TpmError, TpmHandle};

/// Why an attestation did not produce a node SVID.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    /// The TPM failed.
    #[error("TPM: {0}")]
    Tpm(#[from] TpmError),
    /// The server refused, or could not be reached.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// The server broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

/// A node SVID and the key it certifies.
#[derive(Debug, Clone)]
pub struct NodeSvid {
    /// The server's response (chain, bundle, serial, expiry).
    pub response: X509SvidResponse,
    /// PKCS#8 DER of the key.
    pub key_pkcs8: Vec<u8>,
}

/// The SubjectPublicKeyInfo of a CSR, DER.
fn csr_spki(csr_der: &[u8]) -> Result<Vec<u8>, AttestError> {
    use x509_parser::prelude::FromDer;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
        .map_err(|e| AttestError::Protocol(format!("own CSR does not parse: {e}")))?;
    Ok(csr.certification_request_info.subject_pki.raw.to_vec())
}

/// SHA-256(nonce ‖ SPKI): the quote's qualifying data, binding the new
/// key to this TPM and this attestation.
pub fn nonce_binding(nonce: &[u8], spki_der: &[u8]) -> Vec<u8> {
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    ctx.update(nonce);
    ctx.update(spki_der);
    ctx.finish().as_ref().to_vec()
}

/// The server's last word: the node SVID for `key_pkcs8`.
async fn node_svid(
    responses: &mut tonic::Streaming<herald_proto::v1::AttestResponse>,
    key_pkcs8: Vec<u8>,
) -> Result<NodeSvid, AttestError> {
    match responses.message().await.map_err(ClientError::from)? {
        Some(herald_proto::v1::AttestResponse {
            step: Some(attest_response::Step::Result(response)),
        }) => Ok(NodeSvid {
            response,
            key_pkcs8,
        }),
        _ => Err(AttestError::Protocol("expected the node SVID".into())),
    }
}

/// Evidence for a node without a TPM.
#[derive(Debug, Clone)]
pub enum NodeEvidence {
    /// A platform OIDC token (Kubernetes, GCP).
    PlatformToken(String),
    /// The AWS instance identity document and its signature.
    AwsIid(crate::imds::InstanceIdentity),
}

/// Runs one attestation without a TPM: the evidence, the CSR of `key` and
/// any join token in the hello; the server answers with the node SVID.
pub async fn attest_without_tpm(
    client: &HeraldClient,
    evidence: NodeEvidence,
    key: keys::KeyAndCsr,
    join_token: Option<String>,
) -> Result<NodeSvid, AttestError> {
    let mut hello = AttestHello {
        join_token: join_token.unwrap_or_default(),
        csr: key.csr_der,
        ..AttestHello::default()
    };
    match evidence {
        NodeEvidence::PlatformToken(t) => hello.platform_token = t,
        NodeEvidence::AwsIid(iid) => {
            hello.aws_iid = Some(AwsInstanceIdentity {
                document: iid.document,
                signature: iid.signature,
            });
        }
    }
    let request = AttestRequest {
        step: Some(attest_request::Step::Hello(hello)),
    };
    let mut api = NodeAttestationServiceClient::new(client.channel());
    let mut responses = api
        .attest(tokio_stream::once(request))
        .await
        .map_err(ClientError::from)?
        .into_inner();
    node_svid(&mut responses, key.key_pkcs8).await
}

/// Runs one attestation against `client` with `tpm`.
pub async fn attest(
    client: &HeraldClient,
    tpm: &TpmHandle,
    join_token: Option<String>,
) -> Result<NodeSvid, AttestError> {
    run(client, tpm, join_token, None, false).await
}

/// [`attest`], with a platform token beside the quote when the node policy
/// requires both (machine MFA).
pub async fn attest_with_platform_token(
    client: &HeraldClient,
    tpm: &TpmHandle,
    join_token: Option<String>,
    platform_token: Option<String>,
) -> Result<NodeSvid, AttestError> {
    run(client, tpm, join_token, platform_token, false).await
}

/// Renews the node SVID with a fresh quote (continuous attestation):
/// `client` must be connected with the current node SVID as its client
/// certificate, and `tpm` hold the EK and AK the node enrolled with. No
/// credential activation: the server compares the AK with its record.
pub async fn reattest(client: &HeraldClient, tpm: &TpmHandle) -> Result<NodeSvid, AttestError> {
    run(client, tpm, None, None, true).await
}

/// [`reattest`], with the platform token beside the quote when the node
/// policy requires both (machine MFA holds at every attestation).
pub async fn reattest_with_platform_token(
    client: &HeraldClient,
    tpm: &TpmHandle,
    platform_token: Option<String>,
) -> Result<NodeSvid, AttestError> {
    run(client, tpm, None, platform_token, true).await
}

async fn run(
    client: &HeraldClient,
    tpm: &TpmHandle,
    join_token: Option<String>,
    platform_token: Option<String>,
    renewal: bool,
) -> Result<NodeSvid, AttestError> {
    let id = tpm.identity();
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let send = |step| {
        let tx = tx.clone();
        async move {
            tx.send(AttestRequest { step: Some(step) })
                .await
                .map_err(|_| AttestError::Protocol("the server closed the stream".into()))
        }
    };
    send(attest_request::Step::Hello(AttestHello {
        ek_certificate: id.ek_certificate.clone(),
        ek_intermediates: Vec::new(),
        ek_public: id.ek_public.clone(),
        ak_public: id.ak_public.clone(),
        join_token: join_token.unwrap_or_default(),
        platform_token: platform_token.unwrap_or_default(),
        renewal,
        ..AttestHello::default()
    }))
    .await?;
    let mut api = NodeAttestationServiceClient::new(client.channel());
    let mut responses = api
        .attest(ReceiverStream::new(rx))
        .await
        .map_err(ClientError::from)?
        .into_inner();
    let challenge = match responses.message().await.map_err(ClientError::from)? {
        Some(herald_proto::v1::AttestResponse {
            step: Some(attest_response::Step::Challenge(c)),
        }) => c,
        _ => return Err(AttestError::Protocol("expected a challenge".into())),
    };
    let key = keys::generate_key_and_csr()?;
    let qualifying = nonce_binding(&challenge.nonce, &csr_spki(&key.csr_der)?);
    let secret = if renewal {
        // Only an enrolment's challenge carries a credential to activate.
        if !challenge.credential_blob.is_empty() {
            return Err(AttestError::Protocol(
                "a renewal's challenge carried a credential".into(),
            ));
        }
        Vec::new()
    } else {
        tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
            .await?
    };
    let quote = tpm
        .quote(qualifying, challenge.pcr_bank, challenge.pcrs)
        .await?;
    send(attest_request::Step::Proof(AttestProof {
        activated_secret: secret,
        quote: quote.attest,
        quote_signature: quote.signature,
        pcr_values: quote.pcr_values,
        csr: key.csr_der,
    }))
    .await?;
    node_svid(&mut responses, key.key_pkcs8).await
}
