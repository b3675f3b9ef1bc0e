//! A SPIFFE Workload API client over the agent's Unix socket, for software
//! that wants its X.509 SVIDs as files (see `herald workload fetch`).
//! Every call carries the `workload.spiffe.io: true` metadata the API
//! requires.

use std::path::{Path, PathBuf};

use herald_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use herald_proto::workload::{X509svidRequest, X509svidResponse};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::ClientError;

/// The metadata every Workload API call must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// A connection to a Workload API socket.
#[derive(Clone, Debug)]
pub struct WorkloadApiClient {
    channel: Channel,
}

/// The socket path from `SPIFFE_ENDPOINT_SOCKET` (`unix:///path` or `unix:/path`).
pub fn socket_from_env() -> Option<PathBuf> {
    let v = std::env::var("SPIFFE_ENDPOINT_SOCKET").ok()?;
    let p = v
        .strip_prefix("unix://")
        .or_else(|| v.strip_prefix("unix:"))?;
    Some(PathBuf::from(p))
}

fn with_header<T>(msg: T) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert(
        SECURITY_HEADER,
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

impl WorkloadApiClient {
    /// Connects to the Unix socket at `socket`.
    pub async fn connect(socket: &Path) -> Result<Self, ClientError> {
        let path = socket.to_path_buf();
        // The URI is a placeholder: the connector dials the socket.
        let channel = Endpoint::from_static("http://workload.api")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(s))
                }
            }))
            .await
            .map_err(|e| ClientError::Transport(format!("{}: {e}", socket.display())))?;
        Ok(Self { channel })
    }

    /// The stream of X.509 SVID updates: the current state first, then a
    /// full new state on every rotation.
    pub async fn watch_x509(&self) -> Result<tonic::Streaming<X509svidResponse>, ClientError> {
        Ok(SpiffeWorkloadApiClient::new(self.channel.clone())
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await?
            .into_inner())
    }

    /// The current X.509 SVIDs.
    pub async fn fetch_x509(&self) -> Result<X509svidResponse, ClientError> {
        self.watch_x509()
            .await?
            .message()
            .await?
            .ok_or_else(|| ClientError::Transport("the Workload API closed the stream".into()))
    }
}

/// Splits concatenated DER certificates.
pub fn split_der_certs(mut der: &[u8]) -> Result<Vec<Vec<u8>>, ClientError> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let len =
            der_len(der).ok_or_else(|| ClientError::Input("malformed DER certificates".into()))?;
        out.push(der[..len].to_vec());
        der = &der[len..];
    }
    Ok(out)
}

/// Total length of the DER element at the start of `b` (SEQUENCE, definite length).
fn der_len(b: &[u8]) -> Option<usize> {
    if b.len() < 2 || b[0] != 0x30 {
        return None;
    }
    let (len, head) = match b[1] {
        n if n < 0x80 => (usize::from(n), 2),
        0x81 => (usize::from(*b.get(2)?), 3),
        0x82 => ((usize::from(*b.get(2)?) << 8) | usize::from(*b.get(3)?), 4),
        0x83 => (
            (usize::from(*b.get(2)?) << 16)
                | (usize::from(*b.get(3)?) << 8)
                | usize::from(*b.get(4)?),
            5,
        ),
        _ => return None,
    };
    let total = head + len;
    (total <= b.len()).then_some(total)
}
