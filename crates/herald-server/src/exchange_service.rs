//! `herald.v1.TokenExchangeService`: gRPC translation of [`crate::exchange`].

use std::sync::Arc;
use std::time::Duration;

use herald_proto::v1::exchange_token_request::Credential as Wanted;
use herald_proto::v1::exchange_token_response::Credential as Given;
use herald_proto::v1::token_exchange_service_server::TokenExchangeService;
use herald_proto::v1::{CloudCredentials, ExchangeTokenRequest, ExchangeTokenResponse, JwtSvid};
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::decision::RequestedCredential;
use crate::exchange::{ExchangeEvidence, ExchangeRequest, action, exchange, start};
use crate::issue::Issued;
use crate::status::Refusal;

/// The gRPC service.
pub struct ExchangeApi {
    shared: Arc<Shared>,
}

impl ExchangeApi {
    /// Serves from `shared` state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// RFC 3339 UTC with seconds, as AWS writes `Expiration`.
pub fn iso8601(t: time::OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

#[tonic::async_trait]
impl TokenExchangeService for ExchangeApi {
    async fn exchange_token(
        &self,
        request: Request<ExchangeTokenRequest>,
    ) -> Result<Response<ExchangeTokenResponse>, Status> {
        let peer = request.remote_addr();
        let peer_certs = crate::svid_service::peer_certs(&request);
        let req = request.into_inner();
        let ttl = (req.ttl_seconds > 0).then(|| Duration::from_secs(req.ttl_seconds.into()));
        let credential = match req.credential {
            Some(Wanted::X509Svid(p)) => RequestedCredential::X509Svid { csr: p.csr, ttl },
            Some(Wanted::JwtSvid(p)) => RequestedCredential::JwtSvid {
                audiences: p.audiences,
                ttl,
            },
            Some(Wanted::Cloud(p)) => RequestedCredential::Cloud {
                role_arn: p.role_arn,
                session_name: p.session_name,
                session_policy: (!p.session_policy.is_empty()).then_some(p.session_policy),
                ttl,
            },
            None => {
                // Audited like any other refusal: it is still a request
                // that carried a token.
                let mut run = start(&self.shared, "exchange", "grpc", peer);
                let refused = match run.admit() {
                    Err(r) => r,
                    Ok(()) => Refusal::new(
                        herald_core::ErrorCode::InvalidRequest,
                        "name the credential wanted (x509_svid, jwt_svid or cloud)",
                    ),
                };
                return Err(run.refuse(refused).await.to_status());
            }
        };
        let run = start(&self.shared, action(&credential), "grpc", peer);
        let outcome = exchange(
            &self.shared,
            run,
            ExchangeRequest {
                evidence: ExchangeEvidence {
                    subject_token: req.subject_token,
                    join_token: (!req.join_token.is_empty()).then_some(req.join_token),
                    peer_certs,
                },
                credential,
            },
        )
        .await
        .map_err(|r| r.to_status())?;
        let credential = match outcome.issued {
            issued @ Issued::X509 { .. } => Given::X509Svid(
                crate::svid_service::x509_response(issued).map_err(|r| r.to_status())?,
            ),
            Issued::Jwt { token } => Given::JwtSvid(JwtSvid { token }),
            Issued::Cloud {
                creds, role_arn, ..
            } => Given::Cloud(CloudCredentials {
                access_key_id: creds.access_key_id.clone(),
                secret_access_key: creds.secret_access_key.to_string(),
                session_token: creds.session_token.clone(),
                expiration: iso8601(creds.expiration),
                role_arn,
            }),
        };
        Ok(Response::new(ExchangeTokenResponse {
            spiffe_id: outcome.spiffe_id.to_string(),
            policy: outcome.policy,
            expires_at: outcome.expires_at,
            credential: Some(credential),
        }))
    }
}
