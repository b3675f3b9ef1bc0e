//! AWS instance identity test support: a signer standing in for AWS's
//! regional key (RSA-2048, a self-signed certificate for the policy) and an
//! IMDSv2 stand-in on loopback that serves its documents only after the
//! token dance (PUT /latest/api/token, then the token on every GET).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use aws_lc_rs::signature::{KeyPair, RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine;

/// Signs identity documents as AWS's regional key does.
pub struct TestSigner {
    key: RsaKeyPair,
    /// The certificate to list in the policy's `aws_iid.certificates`.
    pub cert_pem: String,
}

impl TestSigner {
    pub fn new() -> TestSigner {
        let rc =
            rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                .unwrap();
        let key = RsaKeyPair::from_pkcs8(&rc.serialize_der()).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test instance identity signer");
        let cert = params.self_signed(&rc).unwrap();
        TestSigner {
            key,
            cert_pem: cert.pem(),
        }
    }

    /// An IMDS-shaped document (the field set and order AWS serves).
    pub fn document(account: &str, region: &str, instance: &str, pending_unix: i64) -> Vec<u8> {
        let pending = humantime::format_rfc3339_seconds(
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(pending_unix as u64),
        );
        format!(
            "{{\n  \"accountId\" : \"{account}\",\n  \"architecture\" : \"x86_64\",\n  \"availabilityZone\" : \"{region}a\",\n  \"billingProducts\" : null,\n  \"devpayProductCodes\" : null,\n  \"marketplaceProductCodes\" : null,\n  \"imageId\" : \"ami-0abcdef1234567890\",\n  \"instanceId\" : \"{instance}\",\n  \"instanceType\" : \"m5.large\",\n  \"kernelId\" : null,\n  \"pendingTime\" : \"{pending}\",\n  \"privateIp\" : \"10.0.1.7\",\n  \"ramdiskId\" : null,\n  \"region\" : \"{region}\",\n  \"version\" : \"2017-09-30\"\n}}"
        )
        .into_bytes()
    }

    /// The base64 `signature` of `document`, wrapped over lines as IMDS does.
    pub fn sign(&self, document: &[u8]) -> String {
        let mut sig = vec![0; self.key.public_modulus_len()];
        self.key
            .sign(
                &RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                document,
                &mut sig,
            )
            .unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(sig);
        b64.as_bytes()
            .chunks(64)
            .map(|c| String::from_utf8(c.to_vec()).unwrap())
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The public key, as a policy would hold it.
    pub fn public_key(&self) -> Vec<u8> {
        self.key.public_key().as_ref().to_vec()
    }
}

/// What the IMDS stand-in serves and has seen.
#[derive(Default)]
pub struct ImdsState {
    pub document: Vec<u8>,
    pub signature: String,
    pub tokens_issued: u64,
    /// GETs refused for a missing or wrong session token.
    pub refused: u64,
    token: Option<String>,
}

/// An IMDSv2 stand-in on 127.0.0.1.
pub struct Imds {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<ImdsState>>,
}

impl Imds {
    pub async fn start(document: Vec<u8>, signature: String) -> Imds {
        use axum::http::{HeaderMap, StatusCode};
        use axum::routing::{get, put};
        let state = Arc::new(Mutex::new(ImdsState {
            document,
            signature,
            ..ImdsState::default()
        }));
        let token_state = state.clone();
        let issue = move |headers: HeaderMap| {
            let state = token_state.clone();
            async move {
                // IMDSv2 refuses a token request without a TTL.
                if headers
                    .get("x-aws-ec2-metadata-token-ttl-seconds")
                    .is_none()
                {
                    return (StatusCode::BAD_REQUEST, String::new());
                }
                let mut s = state.lock().unwrap();
                s.tokens_issued += 1;
                let token = format!("imds-token-{}", s.tokens_issued);
                s.token = Some(token.clone());
                (StatusCode::OK, token)
            }
        };
        let serve = |which: &'static str, state: Arc<Mutex<ImdsState>>| {
            move |headers: HeaderMap| {
                let state = state.clone();
                async move {
                    let mut s = state.lock().unwrap();
                    let presented = headers
                        .get("x-aws-ec2-metadata-token")
                        .and_then(|v| v.to_str().ok());
                    if presented.is_none() || presented != s.token.as_deref() {
                        s.refused += 1;
                        return (StatusCode::UNAUTHORIZED, Vec::new());
                    }
                    let body = match which {
                        "document" => s.document.clone(),
                        _ => s.signature.clone().into_bytes(),
                    };
                    (StatusCode::OK, body)
                }
            }
        };
        let app = axum::Router::new()
            .route("/latest/api/token", put(issue))
            .route(
                "/latest/dynamic/instance-identity/document",
                get(serve("document", state.clone())),
            )
            .route(
                "/latest/dynamic/instance-identity/signature",
                get(serve("signature", state.clone())),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Imds { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
