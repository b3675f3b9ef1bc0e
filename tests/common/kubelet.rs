//! A kubelet stand-in on loopback HTTPS: `GET /pods` answers a `PodList`
//! in the real kubelet's JSON shape, to requests bearing the expected
//! service-account token (401 otherwise), over TLS from a CA made here.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A pod as the stand-in lists it.
#[derive(Debug, Clone)]
pub struct TestPod {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub service_account: String,
    pub labels: Vec<(String, String)>,
    /// (name, container ID without the runtime prefix, image, image ID).
    pub containers: Vec<(String, String, String, String)>,
}

impl TestPod {
    /// The pod's `items[]` entry, shaped as the kubelet's.
    fn to_json(&self, node: &str) -> Value {
        let labels: serde_json::Map<String, Value> = self
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let specs: Vec<Value> = self
            .containers
            .iter()
            .map(|(name, _, image, _)| json!({"name": name, "image": image, "resources": {}}))
            .collect();
        let statuses: Vec<Value> = self
            .containers
            .iter()
            .map(|(name, id, image, image_id)| {
                json!({
                    "name": name,
                    "state": {"running": {"startedAt": "2026-12-04T10:00:01Z"}},
                    "lastState": {},
                    "ready": true,
                    "restartCount": 0,
                    "image": image,
                    "imageID": image_id,
                    "containerID": format!("containerd://{id}"),
                    "started": true
                })
            })
            .collect();
        json!({
            "metadata": {
                "name": self.name,
                "generateName": format!("{}-", self.name),
                "namespace": self.namespace,
                "uid": self.uid,
                "resourceVersion": "4242",
                "creationTimestamp": "2026-12-04T10:00:00Z",
                "labels": labels,
                "annotations": {"kubernetes.io/config.source": "api"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "rs", "uid": "11111111-2222-3333-4444-555555555555", "controller": true}]
            },
            "spec": {
                "volumes": [{"name": "kube-api-access", "projected": {"sources": []}}],
                "containers": specs,
                "restartPolicy": "Always",
                "serviceAccountName": self.service_account,
                "serviceAccount": self.service_account,
                "nodeName": node,
                "securityContext": {}
            },
            "status": {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}],
                "hostIP": "10.0.0.1",
                "podIP": "10.244.0.7",
                "startTime": "2026-12-04T10:00:00Z",
                "containerStatuses": statuses,
                "qosClass": "Burstable"
            }
        })
    }
}

struct State {
    pods: Mutex<Vec<TestPod>>,
    token: Mutex<String>,
    node: String,
    requests: AtomicU64,
    refused: AtomicU64,
}

/// The running stand-in.
pub struct Kubelet {
    state: Arc<State>,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Kubelet {
    /// Starts on a free loopback port, listing no pods, expecting `token`.
    pub async fn start(node: &str, token: &str) -> Kubelet {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, cert, key) = tls_material(node);
        std::fs::write(dir.path().join("kubelet-ca.pem"), ca_pem).unwrap();
        std::fs::write(dir.path().join("token"), format!("{token}\n")).unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let state = Arc::new(State {
            pods: Mutex::new(Vec::new()),
            token: Mutex::new(token.to_owned()),
            node: node.to_owned(),
            requests: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        let st = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, st) = (acceptor.clone(), st.clone());
                tokio::spawn(async move {
                    if let Ok(Ok(tls)) =
                        tokio::time::timeout(Duration::from_secs(5), acceptor.accept(tcp)).await
                    {
                        let _ = serve(tls, &st).await;
                    }
                });
            }
        });
        Kubelet {
            state,
            addr,
            dir,
            task,
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// The CA that signed its serving certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("kubelet-ca.pem")
    }

    /// A token file holding the expected token (the agent's to read).
    pub fn token_path(&self) -> PathBuf {
        self.dir.path().join("token")
    }

    /// Replaces the pods listed.
    pub fn set_pods(&self, pods: Vec<TestPod>) {
        *self.state.pods.lock().unwrap() = pods;
    }

    /// Adds one pod.
    pub fn add_pod(&self, pod: TestPod) {
        self.state.pods.lock().unwrap().push(pod);
    }

    /// The `/pods` document as it would be served now.
    pub fn body(&self) -> String {
        pod_list(&self.state)
    }

    /// `/pods` requests answered with the list so far.
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Requests refused for a missing or wrong token so far.
    pub fn refused(&self) -> u64 {
        self.state.refused.load(Ordering::SeqCst)
    }
}

/// One connection: request heads until the client closes.
async fn serve<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut io: S,
    st: &State,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    loop {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = io.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let mut lines = head.lines();
        let request_line = lines.next().unwrap_or_default().to_owned();
        let auth = lines
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            .map(|(_, v)| v.trim().to_owned());
        let expected = format!("Bearer {}", st.token.lock().unwrap());
        let (status, body) = if auth.as_deref() != Some(expected.as_str()) {
            st.refused.fetch_add(1, Ordering::SeqCst);
            ("401 Unauthorized", "Unauthorized".to_owned())
        } else if request_line.starts_with("GET /pods ") {
            st.requests.fetch_add(1, Ordering::SeqCst);
            ("200 OK", pod_list(st))
        } else {
            ("404 Not Found", "404 page not found".to_owned())
        };
        let resp = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        io.write_all(resp.as_bytes()).await?;
        io.flush().await?;
    }
}

/// The `PodList` document of the pods listed now.
fn pod_list(st: &State) -> String {
    let items: Vec<Value> = st
        .pods
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.to_json(&st.node))
        .collect();
    json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}).to_string()
}

/// CA PEM, serving certificate DER (for the node's name) and its PKCS#8 key.
fn tls_material(node: &str) -> (String, CertificateDer<'static>, Vec<u8>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test kubelet CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    // As a kubelet's serverTLSBootstrap certificate: the node's name (and
    // here no loopback address — the agent dials 127.0.0.1 and verifies
    // the name, `kubelet_server_name`).
    let params = CertificateParams::new(vec![node.to_string()]).unwrap();
    let leaf = params.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), leaf.der().clone(), key.serialize_der())
}

/// Writes `<root>/<pid>/cgroup`: the agent's test hook reads the caller's
/// cgroup there.
pub fn set_cgroup(root: &Path, pid: u32, text: &str) {
    let dir = root.join(pid.to_string());
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = dir.join("cgroup.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join("cgroup")).unwrap();
}

/// A containerd container's cgroup (v2, systemd driver, burstable pod).
pub fn containerd_cgroup(pod_uid: &str, container_id: &str) -> String {
    format!(
        "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{}.slice/cri-containerd-{container_id}.scope\n",
        pod_uid.replace('-', "_")
    )
}
