//! Token exchange, transport-neutral: what gRPC `ExchangeToken`, RFC 8693
//! `POST /v1/token` and AWS STS `AssumeRoleWithWebIdentity` translate into.
//! The decision itself is the one every flow takes ([`crate::decision`]):
//! the OIDC token (and any second factor) is verified in
//! [`crate::flows::exchange`], policy decides and authorizes, the issuer
//! signs, the store commits the replay key with the credential.

use herald_core::{EvidenceType, SpiffeId};

use crate::Shared;
use crate::decision::{RequestedCredential, Run};
pub use crate::flows::ExchangeEvidence;
use crate::issue::Issued;
use crate::status::Refusal;

/// One exchange request, transport-neutral.
#[derive(Debug, Clone)]
pub struct ExchangeRequest {
    /// The OIDC token and any second factor.
    pub evidence: ExchangeEvidence,
    /// The credential wanted.
    pub credential: RequestedCredential,
}

/// A granted exchange.
#[derive(Debug)]
pub struct Exchanged {
    /// The policy that granted it.
    pub policy: String,
    /// The SPIFFE ID granted.
    pub spiffe_id: SpiffeId,
    /// The token's issuer.
    pub issuer: String,
    /// The token's subject.
    pub subject: String,
    /// The token's audience that Herald accepted.
    pub audience: String,
    /// Expiry, Unix seconds.
    pub expires_at: i64,
    /// The credential.
    pub issued: Issued,
}

/// The audit action for the credential wanted.
pub fn action(c: &RequestedCredential) -> &'static str {
    match c {
        RequestedCredential::X509Svid { .. } => "exchange.x509_svid",
        RequestedCredential::JwtSvid { .. } => "exchange.jwt_svid",
        RequestedCredential::Cloud { .. } => "exchange.cloud_credentials",
    }
}

/// Starts the decision of an exchange asked through `transport`.
pub fn start<'s>(
    shared: &'s Shared,
    action: &'static str,
    transport: &'static str,
    peer: Option<std::net::SocketAddr>,
) -> Run<'s> {
    Run::start(shared, action, transport, peer, EvidenceType::Oidc)
}

/// Runs one exchange on `run` (started by the transport, which may have
/// refused malformed requests on it already). Refusals come back audited.
pub async fn exchange(
    shared: &Shared,
    mut run: Run<'_>,
    req: ExchangeRequest,
) -> Result<Exchanged, Refusal> {
    let span = run.span();
    let result = tracing::Instrument::instrument(
        async {
            let (decided, token) = crate::flows::exchange(shared, &mut run, &req.evidence).await?;
            let granted = run.issue(decided, &req.credential).await?;
            Ok(Exchanged {
                policy: granted.policy,
                spiffe_id: granted.spiffe_id,
                issuer: token.issuer,
                subject: token.subject,
                audience: token.audiences.into_iter().next().unwrap_or_default(),
                expires_at: granted.expires_at,
                issued: granted.issued,
            })
        },
        span,
    )
    .await;
    run.finish(result).await
}
