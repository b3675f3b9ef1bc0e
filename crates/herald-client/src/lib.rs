//! A Rust client for Herald.
//!
//! [`HeraldClient`] speaks Herald's gRPC API over TLS, verifying the server
//! against the trust bundle, the host name dialled and the server's SPIFFE
//! ID ([`ServerId`]), and optionally presenting an SVID (mTLS).
//! [`keys`] makes keys and CSRs locally — private keys never leave the
//! caller — and [`files`] writes credentials to disk atomically with safe
//! permissions.
#![forbid(unsafe_code)]

pub mod files;
pub mod keys;
pub mod server_id;
pub mod workload_api;

pub use server_id::{ServerId, ServerIdMismatch};

use std::sync::Arc;

use herald_core::ErrorCode;
use herald_proto::v1::bundle_service_client::BundleServiceClient;
use herald_proto::v1::svid_service_client::SvidServiceClient;
use herald_proto::v1::token_exchange_service_client::TokenExchangeServiceClient;
use herald_proto::v1::{ExchangeTokenRequest, ExchangeTokenResponse};
use herald_proto::v1::{
    GetTrustBundleRequest, MintX509SvidRequest, RenewX509SvidRequest, TrustBundle, X509SvidResponse,
};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint, Uri};

/// The gRPC metadata key carrying Herald's stable error code.
pub const ERROR_CODE_METADATA: &str = "herald-error-code";

/// Errors a client call can end with.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server refused the request.
    #[error("error[{}]: {message}", code.map_or("unknown", |c| c.as_str()))]
    Refused {
        /// The stable code, when the server sent one.
        code: Option<ErrorCode>,
        /// The server's message.
        message: String,
        /// The gRPC status code.
        grpc: tonic::Code,
    },
    /// The server could not be reached or the connection failed.
    #[error("error[unavailable]: {0}")]
    Transport(String),
    /// The server's certificate chains to the bundle but is not the pinned
    /// server identity (another SVID of the same CA, or another server).
    #[error("error[server_identity_mismatch]: {server}: {mismatch}")]
    ServerIdentity {
        /// The address dialled.
        server: String,
        /// What was expected and found.
        mismatch: ServerIdMismatch,
    },
    /// Bad local input (address, bundle, key).
    #[error("error[invalid_input]: {0}")]
    Input(String),
    /// Reading or writing credential files failed.
    #[error("error[io]: {0}")]
    Io(String),
}

impl ClientError {
    /// The stable code of a refusal, if any.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => *code,
            _ => None,
        }
    }
}

impl From<tonic::Status> for ClientError {
    fn from(s: tonic::Status) -> Self {
        let code = s
            .metadata()
            .get(ERROR_CODE_METADATA)
            .and_then(|v| v.to_str().ok())
            .and_then(ErrorCode::from_code);
        if code.is_none() && s.code() == tonic::Code::Unavailable {
            return ClientError::Transport(s.message().to_owned());
        }
        let message = match code {
            // The server prefixes its message with the code; show it once.
            Some(c) => s
                .message()
                .strip_prefix(&format!("{}: ", c.as_str()))
                .unwrap_or(s.message())
                .to_owned(),
            None => s.message().to_owned(),
        };
        ClientError::Refused {
            code,
            message,
            grpc: s.code(),
        }
    }
}

/// An X.509 identity to present for mTLS: certificate chain (leaf first, DER) and PKCS#8 key.
pub struct ClientIdentity {
    /// Leaf first, DER.
    pub cert_chain: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub key_pkcs8: Vec<u8>,
}

/// A connection to a Herald server.
#[derive(Clone)]
pub struct HeraldClient {
    channel: Channel,
}

fn split_host_port(server: &str) -> Result<(String, u16, String), ClientError> {
    let uri: Uri = server
        .parse()
        .map_err(|e| ClientError::Input(format!("server address {server:?}: {e}")))?;
    let host = uri
        .host()
        .ok_or_else(|| ClientError::Input(format!("server address {server:?} has no host")))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(443);
    let authority = uri
        .authority()
        .map_or_else(|| host.clone(), |a| a.to_string());
    Ok((host, port, authority))
}

impl HeraldClient {
    /// Connects to `server` (`https://host:port`), trusting `bundle` (DER
    /// trust anchors) for the server certificate and presenting `identity`
    /// if given. The server must present `spiffe://<td>/herald/server`, the
    /// trust domain taken from the bundle ([`ServerId::FromBundle`]).
    pub async fn connect(
        server: &str,
        bundle: &[Vec<u8>],
        identity: Option<ClientIdentity>,
    ) -> Result<Self, ClientError> {
        Self::connect_to(server, bundle, identity, &ServerId::FromBundle).await
    }

    /// As [`HeraldClient::connect`], requiring the server's certificate to
    /// carry the SPIFFE ID `server_id` names.
    pub async fn connect_to(
        server: &str,
        bundle: &[Vec<u8>],
        identity: Option<ClientIdentity>,
        server_id: &ServerId,
    ) -> Result<Self, ClientError> {
        let (host, port, authority) = split_host_port(server)?;
        let mut roots = rustls::RootCertStore::empty();
        for der in bundle {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| ClientError::Input(format!("trust bundle: {e}")))?;
        }
        if roots.is_empty() {
            return Err(ClientError::Input("the trust bundle is empty".into()));
        }
        let expected = server_id.resolve(bundle)?;
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier = server_id::PinnedServerVerifier::new(roots, provider.clone(), expected)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Input(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier));
        let mut config = match identity {
            Some(id) => builder
                .with_client_auth_cert(
                    id.cert_chain
                        .into_iter()
                        .map(CertificateDer::from)
                        .collect(),
                    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(id.key_pkcs8)),
                )
                .map_err(|e| ClientError::Input(format!("client identity: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = TlsConnector::from(Arc::new(config));
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| ClientError::Input(format!("server name {host:?}: {e}")))?;
        // TLS is done by our connector (tonic would insist on its own for
        // https URIs), so the endpoint URI is only a placeholder.
        let endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .map_err(|e| ClientError::Input(e.to_string()))?
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(30));
        let channel = endpoint
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let connector = connector.clone();
                let server_name = server_name.clone();
                let host = host.clone();
                async move {
                    let tcp = TcpStream::connect((host.as_str(), port)).await?;
                    tcp.set_nodelay(true)?;
                    let tls = connector.connect(server_name, tcp).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(tls))
                }
            }))
            .await
            .map_err(|e| match server_id::find_mismatch(&e) {
                Some(mismatch) => ClientError::ServerIdentity {
                    server: server.to_owned(),
                    mismatch,
                },
                None => ClientError::Transport(format!("{server}: {}", error_chain(&e))),
            })?;
        Ok(Self { channel })
    }

    /// The underlying gRPC channel, for services this client has no
    /// method for (node attestation streams).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    /// Mints an X.509 SVID with a join token.
    pub async fn mint_x509_svid(
        &self,
        join_token: &str,
        csr_der: Vec<u8>,
    ) -> Result<X509SvidResponse, ClientError> {
        let req = MintX509SvidRequest {
            join_token: join_token.to_owned(),
            csr: csr_der,
        };
        Ok(SvidServiceClient::new(self.channel.clone())
            .max_decoding_message_size(4 << 20)
            .mint_x509_svid(req)
            .await?
            .into_inner())
    }

    /// Renews the SVID this connection presents, for the CSR's new key.
    pub async fn renew_x509_svid(&self, csr_der: Vec<u8>) -> Result<X509SvidResponse, ClientError> {
        Ok(SvidServiceClient::new(self.channel.clone())
            .max_decoding_message_size(4 << 20)
            .renew_x509_svid(RenewX509SvidRequest { csr: csr_der })
            .await?
            .into_inner())
    }

    /// Exchanges a platform OIDC token for a credential (see
    /// `herald.v1.TokenExchangeService`). A second factor is either the
    /// request's join token or this connection's client identity.
    pub async fn exchange_token(
        &self,
        req: ExchangeTokenRequest,
    ) -> Result<ExchangeTokenResponse, ClientError> {
        Ok(TokenExchangeServiceClient::new(self.channel.clone())
            .max_decoding_message_size(4 << 20)
            .exchange_token(req)
            .await?
            .into_inner())
    }

    /// Fetches the trust bundle.
    pub async fn trust_bundle(&self) -> Result<TrustBundle, ClientError> {
        Ok(BundleServiceClient::new(self.channel.clone())
            .get_trust_bundle(GetTrustBundleRequest {})
            .await?
            .into_inner())
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        cur = inner.source();
    }
    s
}
