//! `herald.v1.SvidService`: gRPC translation of two flows — mint (a
//! bootstrap or break-glass join token, [`crate::flows::mint`]) and renew
//! (the caller's current SVID over mTLS, [`crate::flows::renew`]) — onto
//! the one decision path ([`crate::decision`]).

use std::sync::Arc;

use herald_core::{ErrorCode, EvidenceType};
use herald_proto::v1::svid_service_server::SvidService;
use herald_proto::v1::{MintX509SvidRequest, RenewX509SvidRequest, X509SvidResponse};
use tonic::{Request, Response, Status};

use crate::Shared;
use crate::decision::{RequestedCredential, Run};
use crate::issue::Issued;
use crate::status::Refusal;

/// The gRPC service.
pub struct SvidApi {
    shared: Arc<Shared>,
}

impl SvidApi {
    /// Serves from `shared` state.
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

/// The client certificate chain of an mTLS call.
pub(crate) fn peer_certs<T>(req: &Request<T>) -> Option<Vec<Vec<u8>>> {
    req.peer_certs()
        .map(|certs| certs.iter().map(|c| c.to_vec()).collect())
}

/// The gRPC form of an issued X.509 SVID.
pub(crate) fn x509_response(issued: Issued) -> Result<X509SvidResponse, Refusal> {
    match issued {
        Issued::X509 {
            issued,
            bundle,
            federated,
        } => {
            let mut cert_chain = vec![issued.cert_der];
            cert_chain.extend(issued.intermediates);
            Ok(X509SvidResponse {
                spiffe_id: issued.spiffe_id.to_string(),
                cert_chain,
                bundle,
                serial: issued.serial_hex,
                expires_at: issued.not_after,
                federated_bundles: federated,
            })
        }
        _ => Err(Refusal::new(ErrorCode::Internal, "unexpected credential")),
    }
}

#[tonic::async_trait]
impl SvidService for SvidApi {
    async fn mint_x509_svid(
        &self,
        request: Request<MintX509SvidRequest>,
    ) -> Result<Response<X509SvidResponse>, Status> {
        let shared = &*self.shared;
        let mut run = Run::start(
            shared,
            "x509_svid.mint",
            "grpc",
            request.remote_addr(),
            EvidenceType::JoinToken,
        );
        let req = request.into_inner();
        let span = run.span();
        let result = tracing::Instrument::instrument(
            async {
                let decided = crate::flows::mint(shared, &mut run, &req.join_token).await?;
                let wanted = RequestedCredential::X509Svid {
                    csr: req.csr,
                    ttl: None,
                };
                x509_response(run.issue(decided, &wanted).await?.issued)
            },
            span,
        )
        .await;
        run.finish(result)
            .await
            .map(Response::new)
            .map_err(|r| r.to_status())
    }

    async fn renew_x509_svid(
        &self,
        request: Request<RenewX509SvidRequest>,
    ) -> Result<Response<X509SvidResponse>, Status> {
        let shared = &*self.shared;
        let mut run = Run::start(
            shared,
            "x509_svid.renew",
            "grpc",
            request.remote_addr(),
            EvidenceType::X509Svid,
        );
        let chain = peer_certs(&request);
        let req = request.into_inner();
        let span = run.span();
        let result = tracing::Instrument::instrument(
            async {
                let decided = crate::flows::renew(shared, &mut run, chain.as_deref()).await?;
                let wanted = RequestedCredential::X509Svid {
                    csr: req.csr,
                    ttl: None,
                };
                x509_response(run.issue(decided, &wanted).await?.issued)
            },
            span,
        )
        .await;
        run.finish(result)
            .await
            .map(Response::new)
            .map_err(|r| r.to_status())
    }
}
