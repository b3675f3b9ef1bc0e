//! The SPIFFE bundle endpoint of this trust domain on a listener of its
//! own (`[federation.bundle_endpoint]`): `GET /` (and `/v1/bundle`) is the
//! bundle document, nothing else is served. With `cert_file`/`key_file`
//! it presents that Web PKI certificate (`https_web`); without, the
//! server's SVID, `spiffe://<td>/herald/server` (`https_spiffe`). The
//! HTTPS listener's `/v1/bundle` is the same document.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::routing::get;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{ServerError, Shared};

/// How often the Web PKI certificate files are checked for a renewal.
const RELOAD_CHECK: Duration = Duration::from_secs(10);

/// The routes: the bundle document at `/` and `/v1/bundle`.
pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(crate::http::bundle_jwks))
        .route("/v1/bundle", get(crate::http::bundle_jwks))
        .with_state(shared)
}

/// A Web PKI certificate read from files, re-read when they change (a
/// renewal by certbot or cert-manager needs no restart); a renewal that
/// cannot be loaded keeps the previous certificate and is logged.
#[derive(Debug)]
pub struct FileCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>)>,
    checked: Mutex<Instant>,
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn load(cert_file: &Path, key_file: &Path) -> Result<Arc<CertifiedKey>, ServerError> {
    let bad = |p: &Path, e: String| ServerError::Config(format!("{}: {e}", p.display()));
    let chain_pem =
        std::fs::read_to_string(cert_file).map_err(|e| bad(cert_file, e.to_string()))?;
    let chain: Vec<Vec<u8>> = pem::parse_many(&chain_pem)
        .map_err(|e| bad(cert_file, e.to_string()))?
        .into_iter()
        .filter(|p| p.tag() == "CERTIFICATE")
        .map(pem::Pem::into_contents)
        .collect();
    if chain.is_empty() {
        return Err(bad(cert_file, "no CERTIFICATE block".into()));
    }
    // Key files must be private (0600), like every key Herald reads.
    let key_pem = herald_ca::kek::read_private_file(key_file)
        .map_err(|e| ServerError::Config(e.to_string()))?;
    let key = pem::parse(&*key_pem).map_err(|e| bad(key_file, e.to_string()))?;
    if key.tag() != "PRIVATE KEY" {
        return Err(bad(
            key_file,
            format!("a PKCS#8 PRIVATE KEY is needed, not {}", key.tag()),
        ));
    }
    Ok(Arc::new(crate::tls::certified_key(&chain, key.contents())?))
}

impl FileCert {
    /// Loads the certificate chain (PEM) and PKCS#8 key (PEM, mode 0600).
    pub fn new(cert_file: &Path, key_file: &Path) -> Result<Self, ServerError> {
        let ck = load(cert_file, key_file)?;
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            current: RwLock::new((ck, modified(cert_file).max(modified(key_file)))),
            checked: Mutex::new(Instant::now()),
        })
    }

    fn reload_if_changed(&self) {
        let due = match self.checked.lock() {
            Ok(mut at) if at.elapsed() >= RELOAD_CHECK => {
                *at = Instant::now();
                true
            }
            _ => false,
        };
        if !due {
            return;
        }
        let stamp = modified(&self.cert_file).max(modified(&self.key_file));
        let seen = self.current.read().map(|g| g.1).unwrap_or_default();
        if stamp == seen {
            return;
        }
        match load(&self.cert_file, &self.key_file) {
            Ok(ck) => {
                if let Ok(mut g) = self.current.write() {
                    *g = (ck, stamp);
                }
                tracing::info!(cert = %self.cert_file.display(), "bundle endpoint certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "bundle endpoint certificate not reloaded; the previous one stays")
            }
        }
    }
}

impl ResolvesServerCert for FileCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.reload_if_changed();
        self.current.read().ok().map(|g| g.0.clone())
    }
}

/// Serves the bundle endpoint on `listener` with `resolver`'s certificate
/// until shutdown, within the listener limits.
pub async fn serve(
    shared: Arc<Shared>,
    listener: TcpListener,
    resolver: Arc<dyn ResolvesServerCert>,
    shutdown: watch::Receiver<bool>,
) {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let cfg = match rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
    {
        Ok(b) => {
            let mut cfg = b.with_no_client_auth().with_cert_resolver(resolver);
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            cfg
        }
        Err(e) => {
            tracing::error!(error = %e, "bundle endpoint TLS");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let limits = crate::listener::Limits::new(&shared.config.listen);
    let routes = router(shared.clone());
    crate::listener::serve_http(shared, routes, listener, Some(acceptor), limits, shutdown).await;
}
