//! A real OIDC issuer over HTTPS, for tests and benchmarks.
//!
//! It serves `/.well-known/openid-configuration` and a JWKS with an RS256
//! and an ES256 key over TLS (a certificate from its own CA, whose PEM it
//! writes to a file for the verifier's `extra_roots`), and mints tokens the
//! way GitHub Actions, GitLab CI, Buildkite and Kubernetes do. Faults can be
//! injected: key rotation, a delay before every response, a broken
//! discovery document. Nothing here verifies anything: it is the other side.
//!
//! Test support only — `unwrap`/`expect` on its own setup is acceptable
//! here, since a failure means the test environment is broken.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _};
use axum::Router;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// The bearer secret the emulated GitHub Actions token service accepts.
pub const ACTIONS_REQUEST_TOKEN: &str = "actions-runtime-request-token";

/// Signing algorithm of a test token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    RS256,
    ES256,
}

/// One generation of signing keys.
struct Keys {
    generation: u64,
    rsa: aws_lc_rs::rsa::KeyPair,
    ec: EcdsaKeyPair,
}

impl Keys {
    fn generate(generation: u64) -> Self {
        let rsa = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        let ec =
            EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
                .unwrap();
        Self {
            generation,
            rsa,
            ec,
        }
    }

    fn kid(&self, alg: Alg) -> String {
        match alg {
            Alg::RS256 => format!("rsa-{}", self.generation),
            Alg::ES256 => format!("ec-{}", self.generation),
        }
    }

    fn jwks(&self) -> Vec<Value> {
        let comps = aws_lc_rs::rsa::PublicKeyComponents::<Vec<u8>>::from(self.rsa.public_key());
        let point = self.ec.public_key().as_ref();
        vec![
            json!({"kty": "RSA", "use": "sig", "alg": "RS256", "kid": self.kid(Alg::RS256),
                   "n": URL_SAFE_NO_PAD.encode(&comps.n), "e": URL_SAFE_NO_PAD.encode(&comps.e)}),
            herald_oidc_issuer::ec_p256_jwk(point, &self.kid(Alg::ES256)),
        ]
    }

    fn sign(&self, alg: Alg, input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match alg {
            Alg::RS256 => {
                let mut sig = vec![0; self.rsa.public_modulus_len()];
                self.rsa
                    .sign(&signature::RSA_PKCS1_SHA256, &rng, input, &mut sig)
                    .unwrap();
                sig
            }
            Alg::ES256 => self.ec.sign(&rng, input).unwrap().as_ref().to_vec(),
        }
    }

    /// The RSA public key as PEM, the "secret" of the HS256 key-confusion attack.
    fn rsa_public_pem(&self) -> String {
        let der = self.rsa.public_key().as_ref();
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN RSA PUBLIC KEY-----\n{b64}\n-----END RSA PUBLIC KEY-----\n")
    }
}

struct IssuerState {
    issuer: String,
    /// Keys published in the JWKS, newest last.
    published: Mutex<Vec<Arc<Keys>>>,
    /// Keys that sign but are never published (unknown kid).
    rogue: Keys,
    delay: Mutex<Duration>,
    discovery_issuer_override: Mutex<Option<String>>,
    not_json: Mutex<Option<Document>>,
    jwks_fetches: AtomicU64,
    discovery_fetches: AtomicU64,
    next_generation: AtomicU64,
}

/// One of the documents an issuer serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Document {
    /// `/.well-known/openid-configuration`.
    Discovery,
    /// The JWKS.
    Jwks,
}

/// A running test issuer.
pub struct TestIssuer {
    state: Arc<IssuerState>,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
    ca_path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TestIssuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Unix seconds now.
pub fn now() -> i64 {
    herald_oidc_issuer::now()
}

impl TestIssuer {
    /// Starts an issuer on a free loopback port, over HTTPS.
    pub async fn start() -> TestIssuer {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let issuer = format!("https://127.0.0.1:{}", addr.port());

        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, cert_der, key_der) = tls_material();
        let ca_path = dir.path().join("issuer-ca.pem");
        std::fs::write(&ca_path, ca_pem).unwrap();

        let state = Arc::new(IssuerState {
            issuer,
            published: Mutex::new(vec![Arc::new(Keys::generate(1))]),
            rogue: Keys::generate(999),
            delay: Mutex::new(Duration::ZERO),
            discovery_issuer_override: Mutex::new(None),
            not_json: Mutex::new(None),
            jwks_fetches: AtomicU64::new(0),
            discovery_fetches: AtomicU64::new(0),
            next_generation: AtomicU64::new(2),
        });
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert_der],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der)),
            )
            .unwrap();
        let tls = TlsListener {
            inner: listener,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        };
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/jwks", get(jwks))
            .route("/_actions/idtoken", get(actions_id_token))
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(tls, app).await;
        });
        TestIssuer {
            state,
            addr,
            _dir: dir,
            ca_path,
            task,
        }
    }

    /// The issuer URL (`iss`).
    pub fn issuer(&self) -> &str {
        &self.state.issuer
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `ACTIONS_ID_TOKEN_REQUEST_URL` of an emulated GitHub Actions runner:
    /// answers `{"value": <token>}` for `audience`, with GitHub-shaped claims
    /// of a push to acme/webapp's main branch in `production`.
    pub fn actions_token_request_url(&self) -> String {
        format!("{}/_actions/idtoken?api-version=2.0", self.issuer())
    }

    /// PEM file of the CA that signed the issuer's TLS certificate.
    pub fn ca_pem_path(&self) -> &Path {
        &self.ca_path
    }

    /// JWKS fetches served so far.
    pub fn jwks_fetches(&self) -> u64 {
        self.state.jwks_fetches.load(Ordering::SeqCst)
    }

    /// Discovery fetches served so far.
    pub fn discovery_fetches(&self) -> u64 {
        self.state.discovery_fetches.load(Ordering::SeqCst)
    }

    /// Delays every response (a slow or hanging issuer).
    pub fn set_delay(&self, d: Duration) {
        *self.state.delay.lock().unwrap() = d;
    }

    /// Makes discovery name another issuer (a misconfigured or hijacked issuer).
    pub fn set_discovery_issuer(&self, issuer: Option<String>) {
        *self.state.discovery_issuer_override.lock().unwrap() = issuer;
    }

    /// Serves `doc` as an HTML error page with status 200 (a broken proxy
    /// or a captive portal in front of the issuer); `None` serves JSON
    /// again.
    pub fn set_not_json(&self, doc: Option<Document>) {
        *self.state.not_json.lock().unwrap() = doc;
    }

    /// Publishes a new key generation; with `keep_old` the previous keys stay
    /// in the JWKS (a graceful rotation), without they disappear.
    pub fn rotate(&self, keep_old: bool) {
        let generation = self.state.next_generation.fetch_add(1, Ordering::SeqCst);
        let mut keys = self.state.published.lock().unwrap();
        if !keep_old {
            keys.clear();
        }
        keys.push(Arc::new(Keys::generate(generation)));
    }

    fn current(&self) -> Arc<Keys> {
        self.state.published.lock().unwrap().last().unwrap().clone()
    }

    /// A signed token with the current key for `alg`.
    pub fn sign(&self, alg: Alg, claims: &Value) -> String {
        let keys = self.current();
        let header = json!({"alg": alg_name(alg), "typ": "JWT", "kid": keys.kid(alg)});
        jws(&header, claims, |input| keys.sign(alg, input))
    }

    /// A token with an arbitrary header, signed by the current key for `alg`.
    pub fn sign_with_header(&self, alg: Alg, header: &Value, claims: &Value) -> String {
        let keys = self.current();
        jws(header, claims, |input| keys.sign(alg, input))
    }

    /// A token signed by a key that is never published, with its own kid.
    pub fn sign_with_unpublished_key(&self, alg: Alg, claims: &Value) -> String {
        let keys = &self.state.rogue;
        let header = json!({"alg": alg_name(alg), "typ": "JWT", "kid": keys.kid(alg)});
        jws(&header, claims, |input| keys.sign(alg, input))
    }

    /// A token signed by an unpublished key but claiming the current kid.
    pub fn sign_forged(&self, alg: Alg, claims: &Value) -> String {
        let header = json!({"alg": alg_name(alg), "typ": "JWT", "kid": self.current().kid(alg)});
        let rogue = &self.state.rogue;
        jws(&header, claims, |input| rogue.sign(alg, input))
    }

    /// `alg: none`, no signature.
    pub fn unsigned(&self, claims: &Value) -> String {
        let header = json!({"alg": "none", "typ": "JWT"});
        jws(&header, claims, |_| Vec::new())
    }

    /// The HS256 key-confusion attack: HMAC keyed with the issuer's RSA public key.
    pub fn hs256_with_public_key(&self, claims: &Value) -> String {
        let keys = self.current();
        let header = json!({"alg": "HS256", "typ": "JWT", "kid": keys.kid(Alg::RS256)});
        let secret = keys.rsa_public_pem();
        jws(&header, claims, |input| {
            let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret.as_bytes());
            aws_lc_rs::hmac::sign(&key, input).as_ref().to_vec()
        })
    }

    /// Claims shaped like a GitHub Actions ID token.
    pub fn github_claims(&self, aud: &str, repo: &str, git_ref: &str, env: &str) -> Value {
        github_claims(self.issuer(), aud, repo, git_ref, env)
    }

    /// Claims shaped like a GitLab CI ID token (booleans as strings, numeric ids as strings).
    pub fn gitlab_claims(&self, aud: &str, project: &str, git_ref: &str) -> Value {
        let now = now();
        let namespace = project.rsplit_once('/').map_or(project, |(n, _)| n);
        json!({
            "jti": random_id(),
            "sub": format!("project_path:{project}:ref_type:branch:ref:{git_ref}"),
            "aud": aud,
            "namespace_id": "72",
            "namespace_path": namespace,
            "project_id": "20",
            "project_path": project,
            "user_id": "1",
            "user_login": "ci-bot",
            "pipeline_id": "574",
            "pipeline_source": "push",
            "job_id": "302",
            "ref": git_ref,
            "ref_type": "branch",
            "ref_path": format!("refs/heads/{git_ref}"),
            "ref_protected": "true",
            "runner_id": 1,
            "runner_environment": "gitlab-hosted",
            "iss": self.issuer(),
            "nbf": now - 5,
            "iat": now - 5,
            "exp": now + 300,
        })
    }

    /// Claims shaped like a Kubernetes projected service-account token
    /// bound to a pod on `node` (a token the kubelet binds to no node when
    /// `node` is `None`), as the API server issues them.
    pub fn kubernetes_claims(
        &self,
        aud: &str,
        namespace: &str,
        service_account: &str,
        node: Option<&str>,
    ) -> Value {
        let now = now();
        let mut k8s = json!({
            "namespace": namespace,
            "serviceaccount": { "name": service_account, "uid": random_id() },
            "pod": { "name": format!("{service_account}-7f9c4"), "uid": random_id() },
        });
        if let Some(node) = node {
            k8s["node"] = json!({ "name": node, "uid": format!("uid-{node}") });
        }
        json!({
            "aud": [aud],
            "exp": now + 600,
            "iat": now - 5,
            "nbf": now - 5,
            "iss": self.issuer(),
            "jti": random_id(),
            "kubernetes.io": k8s,
            "sub": format!("system:serviceaccount:{namespace}:{service_account}"),
        })
    }

    /// Claims shaped like a GCP Compute Engine instance-identity token
    /// (`format=full`).
    pub fn gce_claims(&self, aud: &str, project: &str, zone: &str, instance: &str) -> Value {
        let now = now();
        json!({
            "aud": aud,
            "azp": "107517467455664443765",
            "email": "123456789-compute@developer.gserviceaccount.com",
            "email_verified": true,
            "exp": now + 600,
            "iat": now - 5,
            "iss": self.issuer(),
            "sub": "107517467455664443765",
            "google": {
                "compute_engine": {
                    "instance_creation_timestamp": now - 3600,
                    "instance_id": "5263047712957190511",
                    "instance_name": instance,
                    "project_id": project,
                    "project_number": 123456789,
                    "zone": zone,
                }
            }
        })
    }
}

/// Claims shaped like a GitHub Actions ID token from `issuer`.
pub fn github_claims(issuer: &str, aud: &str, repo: &str, git_ref: &str, env: &str) -> Value {
    herald_oidc_issuer::github_actions_claims(&herald_oidc_issuer::ActionsJob {
        issuer,
        audience: aud,
        repository: repo,
        git_ref,
        environment: env,
        ttl_secs: 300,
    })
    .unwrap()
}

fn alg_name(alg: Alg) -> &'static str {
    match alg {
        Alg::RS256 => "RS256",
        Alg::ES256 => "ES256",
    }
}

/// A random 128-bit identifier, hex.
pub fn random_id() -> String {
    herald_oidc_issuer::random_id().unwrap()
}

fn jws(header: &Value, claims: &Value, sign: impl FnOnce(&[u8]) -> Vec<u8>) -> String {
    let input = herald_oidc_issuer::signing_input(header, claims);
    let sig = sign(input.as_bytes());
    herald_oidc_issuer::compact(&input, &sig)
}

async fn pause(state: &IssuerState) {
    let d = *state.delay.lock().unwrap();
    if !d.is_zero() {
        tokio::time::sleep(d).await;
    }
}

/// The page served instead of `doc` when it is set to be not JSON.
fn not_json(state: &IssuerState, doc: Document) -> Option<Response> {
    (*state.not_json.lock().unwrap() == Some(doc)).then(|| {
        (
            [(axum::http::header::CONTENT_TYPE, "text/html")],
            "<html><body>502 Bad Gateway</body></html>",
        )
            .into_response()
    })
}

async fn discovery(State(state): State<Arc<IssuerState>>) -> Response {
    pause(&state).await;
    state.discovery_fetches.fetch_add(1, Ordering::SeqCst);
    if let Some(page) = not_json(&state, Document::Discovery) {
        return page;
    }
    let issuer = state
        .discovery_issuer_override
        .lock()
        .unwrap()
        .clone()
        .unwrap_or_else(|| state.issuer.clone());
    let jwks_uri = format!("{}/jwks", state.issuer);
    axum::Json(herald_oidc_issuer::discovery(
        &issuer,
        &jwks_uri,
        &["RS256", "ES256"],
    ))
    .into_response()
}

async fn jwks(State(state): State<Arc<IssuerState>>) -> Response {
    pause(&state).await;
    state.jwks_fetches.fetch_add(1, Ordering::SeqCst);
    if let Some(page) = not_json(&state, Document::Jwks) {
        return page;
    }
    let keys: Vec<Value> = state
        .published
        .lock()
        .unwrap()
        .iter()
        .flat_map(|k| k.jwks())
        .collect();
    axum::Json(json!({ "keys": keys })).into_response()
}

async fn actions_id_token(
    State(state): State<Arc<IssuerState>>,
    headers: axum::http::HeaderMap,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, String>>,
) -> Response {
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(&format!("bearer {ACTIONS_REQUEST_TOKEN}")));
    if !authorized {
        return (axum::http::StatusCode::UNAUTHORIZED, "bad runtime token").into_response();
    }
    let aud = q
        .get("audience")
        .cloned()
        .unwrap_or_else(|| "https://github.com/acme".into());
    let keys = state.published.lock().unwrap().last().unwrap().clone();
    let claims = github_claims(
        &state.issuer,
        &aud,
        "acme/webapp",
        "refs/heads/main",
        "production",
    );
    let header = json!({"alg": "RS256", "typ": "JWT", "kid": keys.kid(Alg::RS256)});
    let token = jws(&header, &claims, |input| keys.sign(Alg::RS256, input));
    axum::Json(json!({"value": token, "count": 1})).into_response()
}

/// CA PEM, leaf certificate DER, leaf PKCS#8 DER for 127.0.0.1 / localhost.
fn tls_material() -> (String, CertificateDer<'static>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Herald test OIDC issuer CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
    (ca_cert.pem(), leaf.der().clone(), leaf_key.serialize_der())
}

struct TlsListener {
    inner: TcpListener,
    acceptor: TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.inner.accept().await else {
                continue;
            };
            let handshake = self.acceptor.accept(tcp);
            if let Ok(Ok(tls)) = tokio::time::timeout(Duration::from_secs(5), handshake).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}
