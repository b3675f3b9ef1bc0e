//! The local kubelet's pod list (`GET /pods` on its HTTPS port), cached
//! briefly and fetched single-flight.
//!
//! The request carries the agent's service-account token, read from its
//! file for every fetch (the kubelet rotates it) and never logged. The
//! kubelet's certificate is verified against the configured CA (only that
//! CA: no system roots) unless `skip_kubelet_verification` says otherwise.
//! The document is the kubelet's `PodList`; only the fields selectors need
//! are read.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use herald_core::Selector;
use serde::Deserialize;
use zeroize::Zeroizing;

/// Largest pod list accepted (a node's full pod specs, annotations
/// included, are a few MiB at most).
pub const MAX_POD_LIST_BYTES: usize = 64 << 20;

/// How the kubelet is reached.
#[derive(Debug, Clone)]
pub struct KubeletSettings {
    /// Base URL, e.g. `https://127.0.0.1:10250`.
    pub url: String,
    /// The name the kubelet's certificate must carry when it is not the
    /// URL's host (an IP address the serving certificate does not name):
    /// requests go to the URL's address under this name.
    pub server_name: Option<String>,
    /// The service-account token file.
    pub token_path: PathBuf,
    /// PEM CA the kubelet's serving certificate must chain to; `None`
    /// skips verification (explicitly configured).
    pub ca_pem: Option<Vec<u8>>,
    /// Connect and whole-request timeout.
    pub timeout: Duration,
    /// How long a fetched list answers lookups.
    pub cache_ttl: Duration,
    /// When set, pods the kubelet places on another node are ignored.
    pub node_name: Option<String>,
}

// --- The PodList document (only what selectors need) -----------------------

#[derive(Debug, Default, Deserialize)]
struct PodList {
    #[serde(default)]
    items: Option<Vec<Pod>>,
}

#[derive(Debug, Default, Deserialize)]
struct Pod {
    #[serde(default)]
    metadata: Option<Metadata>,
    #[serde(default)]
    spec: Option<PodSpec>,
    #[serde(default)]
    status: Option<PodStatus>,
}

#[derive(Debug, Default, Deserialize)]
struct Metadata {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    uid: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
struct PodSpec {
    #[serde(default, rename = "serviceAccountName")]
    service_account_name: Option<String>,
    #[serde(default, rename = "nodeName")]
    node_name: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct PodStatus {
    #[serde(default, rename = "containerStatuses")]
    container_statuses: Option<Vec<ContainerStatus>>,
    #[serde(default, rename = "initContainerStatuses")]
    init_container_statuses: Option<Vec<ContainerStatus>>,
    #[serde(default, rename = "ephemeralContainerStatuses")]
    ephemeral_container_statuses: Option<Vec<ContainerStatus>>,
}

#[derive(Debug, Default, Deserialize)]
struct ContainerStatus {
    #[serde(default)]
    name: Option<String>,
    /// `containerd://<id>`, `cri-o://<id>`, `docker://<id>`; absent until
    /// the container has started.
    #[serde(default, rename = "containerID")]
    container_id: Option<String>,
    #[serde(default)]
    image: Option<String>,
    /// The resolved image with its digest, `docker.io/library/nginx@sha256:…`.
    #[serde(default, rename = "imageID")]
    image_id: Option<String>,
}

// --- The index --------------------------------------------------------------

/// A listed container: its pod's UID and every selector it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The pod UID the kubelet lists it under.
    pub pod_uid: String,
    /// `k8s:*` selectors, sorted.
    pub selectors: Vec<Selector>,
}

/// A parsed pod list: containers by container ID.
#[derive(Debug, Default)]
pub struct PodIndex {
    containers: HashMap<String, Listed>,
    /// IDs listed under two pods: never served.
    conflicted: std::collections::HashSet<String>,
    /// Pods in the list.
    pub pods: usize,
}

/// What a lookup in one list found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The container, under the pod its cgroup names.
    Found(Vec<Selector>),
    /// Not (yet) listed.
    Missing,
    /// Listed, but not as the cgroup names it (another pod, or twice).
    Mismatch,
}

impl PodIndex {
    /// Parses a `/pods` document.
    pub fn parse(body: &[u8], node_name: Option<&str>) -> Result<PodIndex, String> {
        let list: PodList = serde_json::from_slice(body)
            .map_err(|e| format!("the pod list is not a PodList: {e}"))?;
        let mut index = PodIndex::default();
        for pod in list.items.unwrap_or_default() {
            index.pods += 1;
            let meta = pod.metadata.unwrap_or_default();
            let spec = pod.spec.unwrap_or_default();
            let status = pod.status.unwrap_or_default();
            let (Some(uid), Some(name), Some(namespace)) = (meta.uid, meta.name, meta.namespace)
            else {
                continue;
            };
            let node = spec.node_name.unwrap_or_default();
            if let Some(want) = node_name
                && node != want
            {
                continue;
            }
            let mut pod_selectors = vec![
                Selector::K8sNamespace(namespace),
                Selector::K8sPodName(name),
                Selector::K8sPodUid(uid.to_ascii_lowercase()),
            ];
            // The API server defaults it to `default`; an empty one is
            // omitted rather than matched as "".
            if let Some(sa) = spec.service_account_name.filter(|s| !s.is_empty()) {
                pod_selectors.push(Selector::K8sServiceAccount(sa));
            }
            if !node.is_empty() {
                pod_selectors.push(Selector::K8sNodeName(node));
            }
            for (k, v) in meta.labels.unwrap_or_default() {
                pod_selectors.push(Selector::K8sPodLabel(k, v));
            }
            let statuses = status
                .container_statuses
                .unwrap_or_default()
                .into_iter()
                .chain(status.init_container_statuses.unwrap_or_default())
                .chain(status.ephemeral_container_statuses.unwrap_or_default());
            for c in statuses {
                let Some(id) = c.container_id.as_deref().and_then(runtime_id) else {
                    continue;
                };
                let mut selectors = pod_selectors.clone();
                if let Some(n) = c.name.filter(|n| !n.is_empty()) {
                    selectors.push(Selector::K8sContainerName(n));
                }
                for image in [c.image, c.image_id].into_iter().flatten() {
                    if !image.is_empty() {
                        selectors.push(Selector::K8sContainerImage(image));
                    }
                }
                selectors.sort();
                selectors.dedup();
                let listed = Listed {
                    pod_uid: uid.to_ascii_lowercase(),
                    selectors,
                };
                if index.conflicted.contains(&id) {
                    continue;
                }
                match index.containers.get(&id) {
                    Some(prev) if *prev != listed => {
                        index.containers.remove(&id);
                        index.conflicted.insert(id);
                    }
                    Some(_) => {}
                    None => {
                        index.containers.insert(id, listed);
                    }
                }
            }
        }
        Ok(index)
    }

    /// The container `container_id` of pod `pod_uid`.
    pub fn lookup(&self, pod_uid: &str, container_id: &str) -> Lookup {
        if self.conflicted.contains(container_id) {
            return Lookup::Mismatch;
        }
        match self.containers.get(container_id) {
            Some(l) if l.pod_uid == pod_uid => Lookup::Found(l.selectors.clone()),
            Some(_) => Lookup::Mismatch,
            None => Lookup::Missing,
        }
    }

    /// Containers listed.
    pub fn len(&self) -> usize {
        self.containers.len()
    }

    /// Whether no container is listed.
    pub fn is_empty(&self) -> bool {
        self.containers.is_empty()
    }
}

/// The ID part of a status's `containerID` (`<runtime>://<64 hex>`).
fn runtime_id(text: &str) -> Option<String> {
    let (_, id) = text.split_once("://")?;
    (id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        .then(|| id.to_owned())
}

// --- The client and its cache -------------------------------------------------

/// A fetched list: its index, when it was fetched, and its generation
/// (each fetch one more).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The parsed list.
    pub index: Arc<PodIndex>,
    /// When it was fetched.
    pub at: Instant,
    /// Its fetch number.
    pub generation: u64,
}

/// Counters for status and benchmarks.
#[derive(Debug, Default)]
pub struct KubeletStats {
    /// Successful fetches.
    pub fetches: std::sync::atomic::AtomicU64,
    /// Failed fetches.
    pub failures: std::sync::atomic::AtomicU64,
}

/// The kubelet client with its cached pod list.
#[derive(Debug)]
pub struct Kubelet {
    settings: KubeletSettings,
    client: reqwest::Client,
    cached: Mutex<Option<Snapshot>>,
    flight: tokio::sync::Mutex<()>,
    /// Fetch counters.
    pub stats: KubeletStats,
}

impl Kubelet {
    /// A client for `settings` (the CA is parsed now: a bad file fails at start).
    pub fn new(settings: KubeletSettings) -> Result<Kubelet, String> {
        let mut settings = settings;
        let url = reqwest::Url::parse(&settings.url)
            .map_err(|e| format!("kubelet_url {:?}: {e}", settings.url))?;
        if url.scheme() != "https" {
            return Err(format!("kubelet_url {:?} must be https", settings.url));
        }
        let mut builder = reqwest::Client::builder();
        if let Some(name) = &settings.server_name {
            let host = url.host_str().unwrap_or_default();
            let ip: std::net::IpAddr = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse()
                .map_err(|_| {
                format!(
                    "kubelet_server_name needs kubelet_url to name an IP address, not {:?}",
                    settings.url
                )
            })?;
            let port = url.port_or_known_default().unwrap_or(10250);
            if name.is_empty() || name.parse::<std::net::IpAddr>().is_ok() {
                return Err(format!("kubelet_server_name {name:?} must be a DNS name"));
            }
            // Dial the URL's address, verify the certificate for `name`.
            builder = builder.resolve(name, std::net::SocketAddr::new(ip, port));
            settings.url = format!("https://{name}:{port}");
        }
        let mut builder = builder
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout)
            .redirect(reqwest::redirect::Policy::none())
            // The token goes to the node's own kubelet, never through an
            // HTTPS_PROXY set for the pod's other traffic.
            .no_proxy()
            .https_only(true);
        builder = match &settings.ca_pem {
            Some(pem) => {
                let roots = reqwest::Certificate::from_pem_bundle(pem)
                    .map_err(|e| format!("kubelet CA: {e}"))?;
                if roots.is_empty() {
                    return Err("kubelet CA: no certificate in the file".into());
                }
                builder.tls_certs_only(roots)
            }
            None => builder.tls_danger_accept_invalid_certs(true),
        };
        let client = builder
            .build()
            .map_err(|e| format!("kubelet client: {e}"))?;
        Ok(Kubelet {
            settings,
            client,
            cached: Mutex::new(None),
            flight: tokio::sync::Mutex::new(()),
            stats: KubeletStats::default(),
        })
    }

    /// The last list fetched, however old.
    pub fn current(&self) -> Option<Snapshot> {
        match self.cached.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether `snap` is younger than the cache TTL.
    pub fn is_fresh(&self, snap: &Snapshot) -> bool {
        snap.at.elapsed() < self.settings.cache_ttl
    }

    /// A list fetched after the one numbered `seen` (any list when
    /// `None`): joins a fetch in flight, or fetches.
    pub async fn newer_than(&self, seen: Option<u64>) -> Result<Snapshot, String> {
        let newer = |s: &Snapshot| seen.is_none_or(|g| s.generation > g);
        let _flight = self.flight.lock().await;
        if let Some(s) = self.current().filter(newer) {
            return Ok(s);
        }
        let generation = self.current().map_or(1, |s| s.generation + 1);
        match self.fetch().await {
            Ok(index) => {
                self.stats
                    .fetches
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let snap = Snapshot {
                    index: Arc::new(index),
                    at: Instant::now(),
                    generation,
                };
                match self.cached.lock() {
                    Ok(mut g) => *g = Some(snap.clone()),
                    Err(p) => *p.into_inner() = Some(snap.clone()),
                }
                Ok(snap)
            }
            Err(e) => {
                self.stats
                    .failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Err(e)
            }
        }
    }

    async fn fetch(&self) -> Result<PodIndex, String> {
        let url = format!("{}/pods", self.settings.url.trim_end_matches('/'));
        // Read for every fetch: the kubelet rotates projected tokens.
        let token = Zeroizing::new(
            tokio::fs::read_to_string(&self.settings.token_path)
                .await
                .map_err(|e| {
                    format!(
                        "service-account token {}: {e}",
                        self.settings.token_path.display()
                    )
                })?,
        );
        let token = token.trim();
        if token.is_empty() {
            return Err(format!(
                "service-account token {} is empty",
                self.settings.token_path.display()
            ));
        }
        let mut auth = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .map_err(|_| "the service-account token is not a valid header value".to_owned())?;
        auth.set_sensitive(true);
        let mut resp = self
            .client
            .get(&url)
            .header(reqwest::header::AUTHORIZATION, auth)
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("GET {url}: {}", describe(&e)))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(format!(
                "GET {url}: HTTP {status}: the kubelet refused the agent's service-account token (it needs `get` on `nodes/proxy`)"
            ));
        }
        if !status.is_success() {
            return Err(format!("GET {url}: HTTP {status}"));
        }
        if resp
            .content_length()
            .is_some_and(|n| n > MAX_POD_LIST_BYTES as u64)
        {
            return Err(format!(
                "GET {url}: the pod list is over {MAX_POD_LIST_BYTES} bytes"
            ));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("GET {url}: {}", describe(&e)))?
        {
            if body.len() + chunk.len() > MAX_POD_LIST_BYTES {
                return Err(format!(
                    "GET {url}: the pod list is over {MAX_POD_LIST_BYTES} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let node = self.settings.node_name.clone();
        tokio::task::spawn_blocking(move || PodIndex::parse(&body, node.as_deref()))
            .await
            .map_err(|_| "parsing the pod list failed".to_owned())?
    }
}

/// reqwest's innermost cause ("invalid peer certificate: UnknownIssuer",
/// "connection refused") rather than its outermost "error sending request".
fn describe(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = source {
        text = s.to_string();
        source = s.source();
    }
    if e.is_timeout() {
        "timed out".into()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const ID: &str = "3f9f2a7c1d5e4b8a9c0d1e2f3a4b5c6d7e8f9a0b1c2d3e4f5a6b7c8d9e0f1a2b";
    const UID: &str = "1b4c3d2e-5f6a-7b8c-9d0e-1f2a3b4c5d6e";

    /// The shape of a real kubelet's `/pods` (trimmed of fields not read).
    fn doc(extra_status: &str) -> String {
        format!(
            r#"{{"kind":"PodList","apiVersion":"v1","metadata":{{}},"items":[
  {{"metadata":{{"name":"web-7d4b9c-x2x9z","generateName":"web-7d4b9c-","namespace":"prod","uid":"{UID}",
     "labels":{{"app":"web","pod-template-hash":"7d4b9c"}},"annotations":{{"kubernetes.io/config.seen":"2026-12-04T10:00:00Z"}}}},
   "spec":{{"containers":[{{"name":"app","image":"docker.io/library/nginx:1.25"}}],"serviceAccountName":"web","serviceAccount":"web","nodeName":"node-1"}},
   "status":{{"phase":"Running","podIP":"10.0.0.7",
     "containerStatuses":[{{"name":"app","state":{{"running":{{"startedAt":"2026-12-04T10:00:01Z"}}}},"ready":true,"restartCount":0,
       "image":"docker.io/library/nginx:1.25","imageID":"docker.io/library/nginx@sha256:{d}","containerID":"containerd://{ID}","started":true}}]
     {extra_status}}}}},
  {{"metadata":{{"name":"pending","namespace":"prod","uid":"00000000-0000-0000-0000-000000000001"}},
   "spec":{{"containers":[{{"name":"c","image":"busybox"}}],"serviceAccountName":"default","nodeName":"node-1"}},
   "status":{{"phase":"Pending","containerStatuses":[{{"name":"c","state":{{"waiting":{{"reason":"ContainerCreating"}}}},"image":"busybox","imageID":""}}]}}}}
]}}"#,
            d = "ab".repeat(32)
        )
    }

    #[test]
    fn a_real_shaped_pod_list_gives_every_selector() {
        let index = PodIndex::parse(doc("").as_bytes(), None).unwrap();
        assert_eq!(index.pods, 2);
        assert_eq!(index.len(), 1, "the pending container has no ID yet");
        let Lookup::Found(s) = index.lookup(UID, ID) else {
            panic!("not found")
        };
        let text: Vec<String> = s.iter().map(ToString::to_string).collect();
        for want in [
            "k8s:ns:prod".to_owned(),
            "k8s:sa:web".into(),
            "k8s:pod-name:web-7d4b9c-x2x9z".into(),
            format!("k8s:pod-uid:{UID}"),
            "k8s:pod-label:app:web".into(),
            "k8s:pod-label:pod-template-hash:7d4b9c".into(),
            "k8s:container-name:app".into(),
            "k8s:container-image:docker.io/library/nginx:1.25".into(),
            format!(
                "k8s:container-image:docker.io/library/nginx@sha256:{}",
                "ab".repeat(32)
            ),
            "k8s:node-name:node-1".into(),
        ] {
            assert!(text.contains(&want), "{want} missing from {text:?}");
        }
        // The cgroup naming another pod for this container is a mismatch;
        // an unknown container is missing.
        assert_eq!(
            index.lookup("00000000-0000-0000-0000-000000000001", ID),
            Lookup::Mismatch
        );
        assert_eq!(index.lookup(UID, &"c".repeat(64)), Lookup::Missing);
        // Pods the kubelet places on another node are not this node's.
        let other = PodIndex::parse(doc("").as_bytes(), Some("node-2")).unwrap();
        assert_eq!(other.lookup(UID, ID), Lookup::Missing);
    }

    #[test]
    fn init_and_ephemeral_containers_are_listed_and_duplicates_refused() {
        let init = "b".repeat(64);
        let eph = "c".repeat(64);
        let extra = format!(
            r#","initContainerStatuses":[{{"name":"migrate","image":"migrate:1","imageID":"","containerID":"cri-o://{init}"}}],
               "ephemeralContainerStatuses":[{{"name":"debugger","image":"busybox","imageID":"docker.io/library/busybox@sha256:{d}","containerID":"docker://{eph}"}}]"#,
            d = "cd".repeat(32)
        );
        let index = PodIndex::parse(doc(&extra).as_bytes(), None).unwrap();
        for (id, name) in [(&init, "migrate"), (&eph, "debugger")] {
            let Lookup::Found(s) = index.lookup(UID, id) else {
                panic!("{name} not found")
            };
            assert!(s.contains(&Selector::K8sContainerName(name.into())));
        }
        // The same container ID under a second name: neither is served.
        let dup = format!(
            r#","initContainerStatuses":[{{"name":"other","image":"x","containerID":"containerd://{ID}"}}]"#
        );
        let index = PodIndex::parse(doc(&dup).as_bytes(), None).unwrap();
        assert_eq!(index.lookup(UID, ID), Lookup::Mismatch);
    }

    #[test]
    fn malformed_documents_are_errors_and_nulls_are_tolerated() {
        assert!(PodIndex::parse(b"not json", None).is_err());
        assert!(PodIndex::parse(br#"{"items": 5}"#, None).is_err());
        let index = PodIndex::parse(
            br#"{"items":[{"metadata":{"name":"a","namespace":"n","uid":"u","labels":null},"spec":null,"status":{"containerStatuses":null}}]}"#,
            None,
        )
        .unwrap();
        assert_eq!((index.pods, index.len()), (1, 0));
        assert_eq!(PodIndex::parse(b"{}", None).unwrap().pods, 0);
    }
}
