//! Workload identities on the node: the registrations the server syncs to
//! the agent, the X.509 SVIDs the agent keeps for them (keys generated
//! here, in memory only), JWT-SVIDs per audience, and the SPIFFE Workload
//! API that serves them.
//!
//! One [`WorkloadCache`] holds the state; every change bumps its
//! generation, which wakes every open Workload API stream to push the full
//! new state. A registration may be a template
//! (`spiffe://td/ns/{k8s:ns}/sa/{k8s:sa}`): the cache builds an instance of
//! it for each distinct caller identity when that caller first asks
//! ([`WorkloadCache::matching`]), the rotation issues and renews instances
//! like any registration, and drops one no caller has asked for since its
//! SVID was issued. [`run_sync`] keeps the registrations and bundle current from
//! the server's stream; [`run_rotation`] issues and renews SVIDs in
//! batches at about half their lifetime, each SVID with its own jitter so
//! the renewals of a thousand workloads spread out.

pub mod api;
pub mod attestor;
pub mod credentials;
pub mod h2_authority;
pub mod jwt;
pub mod k8s;
pub mod limit;
pub mod sds;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use herald_client::files;
use herald_client::{ClientError, ClientIdentity, HeraldClient, ServerId, keys};
use herald_core::{IdTemplate, Selector, TrustDomain};
use herald_proto::v1::workload_service_client::WorkloadServiceClient;
use herald_proto::v1::{
    BatchNewX509SvidsRequest, CloudCredentials, NewCloudCredentialsRequest, NewJwtSvidRequest,
    RegistrationSet, SyncRegistrationsRequest, WorkloadSvidRequest,
};
use rand::Rng;
use tokio::sync::watch;
use zeroize::Zeroizing;

/// Most SVIDs asked for in one call (the server's cap).
pub const BATCH: usize = 100;
/// Most template instances held at once: each is an SVID and its key in
/// memory, and callers (pods) can come and go faster than instances idle
/// out, so the count is capped rather than left to the callers.
pub const MAX_INSTANCES: usize = 10_000;
/// How long an SVID the server refused is left before it is asked again.
const REFUSED_RETRY_S: i64 = 30;

/// A registration as the agent holds it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The workload's SPIFFE ID.
    pub spiffe_id: String,
    /// All must match the caller.
    pub selectors: Vec<Selector>,
    /// Allowed JWT-SVID audiences.
    pub jwt_audiences: Vec<String>,
    /// The hint (unique per node).
    pub hint: String,
    /// The cloud role the credentials endpoint may serve (empty: none).
    pub cloud_role: String,
    /// Foreign trust domains (names) whose bundles the workload is given.
    pub federates_with: Vec<String>,
    /// The current SVID, once issued.
    pub svid: Option<Arc<CachedSvid>>,
    /// Set on a template registration (its `spiffe_id` is the template):
    /// callers get instances built from it, never the template itself.
    pub template: Option<IdTemplate>,
    /// On an instance of a template: when a caller last asked for it, Unix
    /// seconds (shared by every clone).
    last_used: Option<Arc<AtomicI64>>,
}

impl Entry {
    /// An instance of this template registration for `spiffe_id`.
    fn instance(&self, spiffe_id: String, now: i64) -> Entry {
        Entry {
            spiffe_id,
            template: None,
            svid: None,
            last_used: Some(Arc::new(AtomicI64::new(now))),
            ..self.clone()
        }
    }

    /// Whether this is an instance no caller has asked for since its SVID
    /// was issued, now that the SVID falls due: it is dropped, not renewed.
    fn idle(&self, now: i64) -> bool {
        match (&self.last_used, &self.svid) {
            (Some(used), Some(svid)) => {
                svid.renew_at <= now && used.load(Ordering::Relaxed) < svid.issued_at
            }
            _ => false,
        }
    }
}

/// An X.509 SVID and its key, in memory only.
#[derive(Debug)]
pub struct CachedSvid {
    /// Leaf first, DER.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 DER.
    pub key_pkcs8: Zeroizing<Vec<u8>>,
    /// Serial, hex.
    pub serial: String,
    /// notAfter, Unix seconds.
    pub expires_at: i64,
    /// When the agent received it, Unix seconds.
    pub issued_at: i64,
    /// When to renew it, Unix seconds (half-life ± jitter).
    pub renew_at: i64,
}

/// The node's workload state.
#[derive(Debug, Default)]
pub struct State {
    /// The trust domain.
    pub trust_domain: String,
    /// Registrations, in the server's order (replaced only by
    /// [`WorkloadCache::apply`], which indexes them). Shared, so that a
    /// caller's matches are handed out without copying them.
    pub entries: Vec<Arc<Entry>>,
    /// Positions in `entries` by one selector of each registration — the
    /// greatest, usually the most specific (a cgroup or a pod's before a
    /// uid): every selector of a registration must hold for a caller, so
    /// its candidates are found from its facts, not by matching every
    /// registration on the node (a fetch with 1,000 registrations did).
    by_selector: HashMap<Selector, Vec<usize>>,
    /// Instances of template registrations, built per caller identity.
    pub instances: Vec<Arc<Entry>>,
    /// X.509 authorities, DER.
    pub bundle_x509: Vec<Vec<u8>>,
    /// The SPIFFE bundle as JWKS JSON (X.509 and JWT authorities).
    pub bundle_jwks: String,
    /// Bundles of foreign trust domains the registrations federate with.
    pub federated: Vec<FederatedBundle>,
    /// Whether a registration set has arrived yet.
    pub synced: bool,
    /// The server's revision of the set.
    pub revision: u64,
    /// The node's identity was refused (a renewal's fresh quote failed):
    /// no workload is served anything until the node attests again.
    pub suspended: bool,
}

/// A foreign trust domain's bundle (SPIFFE federation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FederatedBundle {
    /// The trust domain's name.
    pub trust_domain: String,
    /// X.509 authorities, DER.
    pub x509: Vec<Vec<u8>>,
    /// The SPIFFE bundle JWKS JSON.
    pub jwks: String,
}

impl State {
    /// Sets the registrations and indexes them.
    fn set_entries(&mut self, entries: Vec<Arc<Entry>>) {
        let mut by_selector: HashMap<Selector, Vec<usize>> = HashMap::new();
        for (at, e) in entries.iter().enumerate() {
            // No selector (or one this agent could not parse): matches nobody.
            if let Some(key) = e.selectors.iter().max() {
                by_selector.entry(key.clone()).or_default().push(at);
            }
        }
        self.entries = entries;
        self.by_selector = by_selector;
    }

    /// The registrations whose every selector holds for a caller with
    /// `facts`, in registration order.
    fn registered_for<'a>(&'a self, facts: &'a [Selector]) -> impl Iterator<Item = &'a Arc<Entry>> {
        let mut at: Vec<usize> = facts
            .iter()
            .filter_map(|f| self.by_selector.get(f))
            .flatten()
            .copied()
            .collect();
        at.sort_unstable();
        at.dedup();
        at.into_iter()
            .filter_map(|i| self.entries.get(i))
            .filter(|e| herald_core::selector::matches(&e.selectors, facts))
    }

    /// The foreign bundles a caller with `facts` is given: those of the
    /// trust domains its registrations federate with.
    pub fn federated_for(&self, facts: &[Selector]) -> Vec<&FederatedBundle> {
        let mine: Vec<&Arc<Entry>> = self.registered_for(facts).collect();
        self.federated
            .iter()
            .filter(|b| {
                mine.iter()
                    .any(|e| e.federates_with.contains(&b.trust_domain))
            })
            .collect()
    }

    /// The instance of template registration `e` for `id`, if built.
    fn instance_of(&self, e: &Entry, id: &str) -> Option<&Arc<Entry>> {
        self.instances
            .iter()
            .find(|i| i.spiffe_id == id && i.selectors == e.selectors)
    }

    /// The template instances a caller with `facts` needs that are not built yet.
    fn missing_instances(&self, facts: &[Selector]) -> Vec<(Arc<Entry>, String)> {
        self.registered_for(facts)
            .filter_map(|e| {
                let id = e.template.as_ref()?.expand(facts)?;
                self.instance_of(e, id.as_str())
                    .is_none()
                    .then(|| (e.clone(), id.to_string()))
            })
            .collect()
    }

    /// What a caller with `facts` is entitled to, in registration order:
    /// fixed registrations as they are, templates as the caller's instance
    /// (marked as used now). A template the caller holds no value for
    /// gives nothing.
    fn entitled(&self, facts: &[Selector], now: i64) -> Vec<Arc<Entry>> {
        self.registered_for(facts)
            .filter_map(|e| match &e.template {
                None => Some(e.clone()),
                Some(t) => {
                    let id = t.expand(facts)?;
                    let i = self.instance_of(e, id.as_str())?;
                    if let Some(used) = &i.last_used {
                        used.fetch_max(now, Ordering::Relaxed);
                    }
                    Some(i.clone())
                }
            })
            .collect()
    }

    /// Every entry the rotation keeps an SVID for.
    fn issued(&self) -> impl Iterator<Item = &Arc<Entry>> {
        self.entries
            .iter()
            .filter(|e| e.template.is_none())
            .chain(&self.instances)
    }
}

/// JWT-SVIDs by (SPIFFE ID, sorted audiences): (token, received, expiry).
type JwtCache = HashMap<(String, Vec<String>), (String, i64, i64)>;

/// Shared workload state and its change notifications.
#[derive(Debug)]
pub struct WorkloadCache {
    state: RwLock<State>,
    changed: watch::Sender<u64>,
    jwts: Mutex<JwtCache>,
    clouds: Mutex<HashMap<String, (CloudCredentials, i64, i64)>>,
    /// SPIFFE IDs the server refused, and when to ask again (Unix seconds).
    refused: Mutex<HashMap<String, i64>>,
    renew_fraction: f64,
    jitter_fraction: f64,
}

fn now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl WorkloadCache {
    /// An empty cache; SVIDs are renewed at `renew_fraction` ± `jitter_fraction` of their lifetime.
    pub fn new(renew_fraction: f64, jitter_fraction: f64) -> Arc<WorkloadCache> {
        Arc::new(WorkloadCache {
            state: RwLock::new(State::default()),
            changed: watch::Sender::new(0),
            jwts: Mutex::new(HashMap::new()),
            clouds: Mutex::new(HashMap::new()),
            refused: Mutex::new(HashMap::new()),
            renew_fraction,
            jitter_fraction,
        })
    }

    /// Subscribes to changes (the value is a generation counter).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|g| *g += 1);
    }

    /// Waits, at most `max`, until the first registration set has arrived
    /// (the agent may have just started).
    pub async fn synced(&self, max: Duration) {
        let mut rx = self.subscribe();
        let wait = async {
            while !self.read(|s| s.synced) {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(max, wait).await;
    }

    /// Runs `f` on the current state.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        match self.state.read() {
            Ok(s) => f(&s),
            Err(p) => f(&p.into_inner()),
        }
    }

    fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = match self.state.write() {
            Ok(mut s) => f(&mut s),
            Err(p) => f(&mut p.into_inner()),
        };
        self.bump();
        out
    }

    /// Replaces the registrations and bundle with the server's set,
    /// keeping the SVIDs of registrations that did not change, and the
    /// instances of templates that did not change.
    pub fn apply(&self, set: RegistrationSet) {
        self.write(|s| {
            let mut old: HashMap<(String, Vec<Selector>), Arc<CachedSvid>> = s
                .entries
                .drain(..)
                .map(Arc::unwrap_or_clone)
                .filter_map(|e| Some(((e.spiffe_id, e.selectors), e.svid?)))
                .collect();
            if let Some(b) = &set.bundle {
                s.trust_domain = b.trust_domain.clone();
            }
            let td = TrustDomain::new(&s.trust_domain).ok();
            let entries = set
                .registrations
                .into_iter()
                .map(|r| {
                    let mut selectors: Vec<Selector> = r
                        .selectors
                        .iter()
                        .filter_map(|t| Selector::parse(t).ok())
                        .collect();
                    selectors.sort();
                    let template = IdTemplate::is_template(&r.spiffe_id)
                        .then(|| {
                            td.as_ref()
                                .and_then(|td| IdTemplate::parse(&r.spiffe_id, td).ok())
                        })
                        .flatten();
                    // A selector (or a template) this agent cannot parse
                    // makes the registration unmatchable rather than broader.
                    if selectors.len() != r.selectors.len()
                        || (template.is_none() && IdTemplate::is_template(&r.spiffe_id))
                    {
                        selectors.clear();
                    }
                    let svid = old.remove(&(r.spiffe_id.clone(), selectors.clone()));
                    Arc::new(Entry {
                        spiffe_id: r.spiffe_id,
                        selectors,
                        jwt_audiences: r.jwt_audiences,
                        hint: r.hint,
                        cloud_role: r.cloud_role,
                        federates_with: r.federates_with,
                        svid: svid.filter(|_| template.is_none()),
                        template,
                        last_used: None,
                    })
                })
                .collect();
            s.set_entries(entries);
            // An instance lives on, with its template's new settings, while
            // its template (same text, same selectors) is still registered.
            let instances = std::mem::take(&mut s.instances);
            s.instances = instances
                .into_iter()
                .filter_map(|i| {
                    let t = s.entries.iter().find(|e| {
                        e.selectors == i.selectors
                            && e.template.as_ref().is_some_and(|t| {
                                herald_core::SpiffeId::parse(&i.spiffe_id)
                                    .is_ok_and(|id| t.admits(&id, &e.selectors))
                            })
                    })?;
                    let i = Arc::unwrap_or_clone(i);
                    Some(Arc::new(Entry {
                        svid: i.svid,
                        last_used: i.last_used,
                        ..t.instance(i.spiffe_id, 0)
                    }))
                })
                .collect();
            if let Some(b) = set.bundle {
                s.bundle_x509 = b.x509_authorities;
                s.bundle_jwks = b.jwks;
            }
            s.federated = set
                .federated_bundles
                .into_iter()
                .map(|b| FederatedBundle {
                    trust_domain: b.trust_domain,
                    x509: b.x509_authorities,
                    jwks: b.jwks,
                })
                .collect();
            s.revision = set.revision;
            s.synced = true;
        });
    }

    /// Stops serving workloads: the node's fresh quote was refused, so
    /// nothing it holds for its workloads may be handed out — every SVID,
    /// JWT-SVID and session credential is dropped, callers match nothing
    /// (the Workload API answers `PermissionDenied`) and nothing is
    /// renewed, until [`WorkloadCache::resume`] after a successful
    /// attestation. Registrations stay, so serving resumes at once.
    pub fn suspend(&self) {
        if let Ok(mut m) = self.jwts.lock() {
            m.clear();
        }
        if let Ok(mut m) = self.clouds.lock() {
            m.clear();
        }
        self.write(|s| {
            s.suspended = true;
            for e in s.entries.iter_mut().chain(s.instances.iter_mut()) {
                Arc::make_mut(e).svid = None;
            }
        });
    }

    /// Serves workloads again (the node attested successfully); their
    /// SVIDs are issued anew under the new node SVID.
    pub fn resume(&self) {
        if self.read(|s| s.suspended) {
            self.write(|s| s.suspended = false);
        }
    }

    /// The entries a caller with `facts` is entitled to (none while
    /// suspended). A template
    /// registration the caller matches gives it its own instance, built
    /// (without an SVID yet: the rotation issues it and every stream is
    /// woken) the first time that identity is asked for.
    pub fn matching(&self, facts: &[Selector]) -> Vec<Arc<Entry>> {
        if self.read(|s| s.suspended) {
            return Vec::new();
        }
        let now = now_s();
        if !self.read(|s| s.missing_instances(facts)).is_empty() {
            self.write(|s| {
                // Built again under the write lock: another caller may have
                // built some meanwhile.
                for (template, id) in s.missing_instances(facts) {
                    if s.instances.len() >= MAX_INSTANCES {
                        tracing::warn!(
                            spiffe_id = %id,
                            max = MAX_INSTANCES,
                            "template instance not built: the agent holds its maximum"
                        );
                        break;
                    }
                    s.instances.push(Arc::new(template.instance(id, now)));
                }
            });
        }
        self.read(|s| {
            if s.suspended {
                Vec::new()
            } else {
                s.entitled(facts, now)
            }
        })
    }

    /// Registrations whose SVID is missing or due, oldest first, and not
    /// refused by the server a moment ago. Instances no caller asked for
    /// since their SVID was issued are dropped here instead.
    fn due(&self, now: i64) -> Vec<String> {
        if self.read(|s| s.instances.iter().any(|i| i.idle(now))) {
            self.write(|s| s.instances.retain(|i| !i.idle(now)));
        }
        let refused = self.refused.lock().map(|m| m.clone()).unwrap_or_default();
        self.read(|s| {
            if s.suspended {
                return Vec::new();
            }
            let mut v: Vec<(i64, String)> = s
                .issued()
                .filter(|e| !e.selectors.is_empty())
                .filter(|e| refused.get(&e.spiffe_id).is_none_or(|t| *t <= now))
                .filter_map(|e| match &e.svid {
                    None => Some((0, e.spiffe_id.clone())),
                    Some(c) if c.renew_at <= now => Some((c.renew_at, e.spiffe_id.clone())),
                    Some(_) => None,
                })
                .collect();
            v.sort();
            v.dedup_by(|a, b| a.1 == b.1);
            v.into_iter().map(|(_, id)| id).collect()
        })
    }

    /// Marks `spiffe_id` refused by the server: not asked again for a while.
    fn refuse(&self, spiffe_id: &str, now: i64) {
        if let Ok(mut m) = self.refused.lock() {
            m.retain(|_, t| *t > now);
            m.insert(spiffe_id.to_owned(), now + REFUSED_RETRY_S);
        }
    }

    /// When the next SVID falls due (Unix seconds), if any is held.
    fn next_due(&self) -> Option<i64> {
        let retry = self
            .refused
            .lock()
            .ok()
            .and_then(|m| m.values().min().copied());
        self.read(|s| {
            s.issued()
                .filter_map(|e| e.svid.as_ref().map(|c| c.renew_at))
                .chain(retry)
                .min()
        })
    }

    fn store_svid(&self, spiffe_id: &str, svid: CachedSvid) {
        let svid = Arc::new(svid);
        self.write(|s| {
            // A rotation in flight when the node was refused.
            if s.suspended {
                return;
            }
            for e in s
                .entries
                .iter_mut()
                .chain(s.instances.iter_mut())
                .filter(|e| e.template.is_none() && e.spiffe_id == spiffe_id)
            {
                Arc::make_mut(e).svid = Some(svid.clone());
            }
        });
    }

    fn renew_at(&self, issued: i64, expires_at: i64) -> i64 {
        let life = (expires_at - issued).max(1) as f64;
        let j = self.jitter_fraction;
        let jitter = if j > 0.0 {
            rand::rng().random_range(-j..=j)
        } else {
            0.0
        };
        issued + (life * (self.renew_fraction + jitter)).round() as i64
    }

    /// A cached JWT-SVID in the first half of its life (a caller never
    /// gets one about to expire).
    fn cached_jwt(&self, spiffe_id: &str, audiences: &[String]) -> Option<String> {
        let key = (spiffe_id.to_owned(), audiences.to_vec());
        let map = self.jwts.lock().ok()?;
        let (token, got, exp) = map.get(&key)?;
        (now_s() < got + (exp - got) / 2).then(|| token.clone())
    }

    fn put_jwt(&self, spiffe_id: &str, audiences: &[String], token: String, exp: i64) {
        if let Ok(mut map) = self.jwts.lock() {
            let now = now_s();
            if map.len() > 10_000 {
                map.retain(|_, (_, _, e)| *e > now);
            }
            map.insert(
                (spiffe_id.to_owned(), audiences.to_vec()),
                (token, now, exp),
            );
        }
    }
}

/// How the workload tasks reach the server: the servers, the trust bundle
/// file and the node SVID directory the node identity loop keeps fresh —
/// and the one connection they share.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// Server addresses, tried in order.
    pub servers: Vec<String>,
    /// PEM trust anchors for the servers.
    pub trust_bundle: PathBuf,
    /// The node SVID directory.
    pub node_svid_dir: PathBuf,
    /// The configured server identity pin; when `None`, the node SVID's
    /// trust domain's `/herald/server`.
    pub server_id: Option<ServerId>,
    shared: SharedConnection,
}

/// The connection to the server the workload tasks share (rotation,
/// registration sync, JWT-SVID and cloud credential misses), with the
/// versions of the node SVID, its key and the trust bundle it was made
/// with.
#[derive(Clone, Default)]
struct SharedConnection(Arc<Mutex<Option<(MadeFrom, HeraldClient)>>>);

/// The versions of the node SVID, its key and the trust bundle (`None`:
/// unreadable).
type MadeFrom = [Option<attestor::Version>; 3];

impl std::fmt::Debug for SharedConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let open = self.0.lock().map(|c| c.is_some()).unwrap_or(false);
        f.debug_struct("SharedConnection")
            .field("open", &open)
            .finish()
    }
}

impl Upstream {
    /// Reaches `servers` (tried in order) with the node SVID in
    /// `node_svid_dir`, trusting the anchors in `trust_bundle`.
    pub fn new(
        servers: Vec<String>,
        trust_bundle: PathBuf,
        node_svid_dir: PathBuf,
        server_id: Option<ServerId>,
    ) -> Upstream {
        Upstream {
            servers,
            trust_bundle,
            node_svid_dir,
            server_id,
            shared: SharedConnection::default(),
        }
    }

    /// A client authenticated with the current node SVID, to the first
    /// server that answers. The connection is made once and shared: a
    /// workload SVID's renewal or a JWT-SVID miss is one call on it, not a
    /// TLS handshake of its own. It is made again when the node SVID, its
    /// key or the trust bundle on disk is another version than it was made
    /// with (the node identity loop renewed it), or after a call on it
    /// failed for want of a server ([`Upstream::failed`]).
    pub async fn connect(&self) -> Result<HeraldClient, ClientError> {
        let made_from = [
            attestor::Version::at(&self.node_svid_dir.join(files::SVID_FILE)),
            attestor::Version::at(&self.node_svid_dir.join(files::KEY_FILE)),
            attestor::Version::at(&self.trust_bundle),
        ];
        if let Ok(shared) = self.shared.0.lock()
            && let Some((stamp, client)) = shared.as_ref()
            && *stamp == made_from
        {
            return Ok(client.clone());
        }
        let client = self.dial().await?;
        if let Ok(mut shared) = self.shared.0.lock() {
            *shared = Some((made_from, client.clone()));
        }
        Ok(client)
    }

    /// The error of a call made on a client from [`Upstream::connect`].
    /// One that is not the server's decision (no Herald error code: the
    /// connection broke, or the server is gone) drops the shared
    /// connection, so that the next call dials again — the first server
    /// that answers.
    pub fn failed(&self, status: tonic::Status) -> ClientError {
        let e = ClientError::from(status);
        if matches!(
            e,
            ClientError::Transport(_) | ClientError::Refused { code: None, .. }
        ) && let Ok(mut shared) = self.shared.0.lock()
        {
            *shared = None;
        }
        e
    }

    async fn dial(&self) -> Result<HeraldClient, ClientError> {
        let node = files::read_svid_dir(&self.node_svid_dir)?;
        let text = std::fs::read_to_string(&self.trust_bundle)
            .map_err(|e| ClientError::Io(format!("{}: {e}", self.trust_bundle.display())))?;
        let bundle = files::from_pem("CERTIFICATE", &text).map_err(ClientError::Io)?;
        let pin = self
            .server_id
            .clone()
            .or_else(|| node.cert_chain.first().and_then(|l| ServerId::of_svid(l)))
            .unwrap_or_default();
        let mut last = ClientError::Transport("no server configured".into());
        for s in &self.servers {
            let identity = ClientIdentity {
                cert_chain: node.cert_chain.clone(),
                key_pkcs8: node.key_pkcs8.clone(),
            };
            match HeraldClient::connect_to(s, &bundle, Some(identity), &pin).await {
                Ok(c) => return Ok(c),
                Err(e) => last = e,
            }
        }
        Err(last)
    }
}

async fn pause(shutdown: &mut watch::Receiver<bool>, d: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => false,
        _ = shutdown.changed() => true,
    }
}

/// Follows the server's registration stream until `shutdown`, reconnecting
/// with backoff.
pub async fn run_sync(
    cache: Arc<WorkloadCache>,
    upstream: Upstream,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(200);
    loop {
        if *shutdown.borrow() {
            return;
        }
        // Nothing to authenticate with until the node has attested.
        if !upstream.node_svid_dir.join(files::SVID_FILE).exists() {
            if pause(&mut shutdown, Duration::from_millis(200)).await {
                return;
            }
            continue;
        }
        let result = async {
            let client = upstream.connect().await?;
            let mut api = WorkloadServiceClient::new(client.channel());
            let mut stream = api
                .sync_registrations(SyncRegistrationsRequest {})
                .await
                .map_err(|s| upstream.failed(s))?
                .into_inner();
            loop {
                match stream.message().await.map_err(|s| upstream.failed(s))? {
                    Some(set) => {
                        tracing::info!(
                            registrations = set.registrations.len(),
                            revision = set.revision,
                            "workload registrations synced"
                        );
                        cache.apply(set);
                        backoff = Duration::from_millis(200);
                    }
                    None => return Ok::<(), ClientError>(()),
                }
            }
        };
        tokio::select! {
            r = result => if let Err(e) = r {
                tracing::warn!(error = %e, "registration sync failed; retrying");
            },
            _ = shutdown.changed() => return,
        }
        let jittered = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
        if pause(&mut shutdown, jittered).await {
            return;
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// Issues and renews workload SVIDs until `shutdown`: wakes when
/// registrations change or the next SVID falls due, asks for every due
/// SVID in batches, and keeps serving the cached ones if the server is
/// unreachable.
pub async fn run_rotation(
    cache: Arc<WorkloadCache>,
    upstream: Upstream,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut changes = cache.subscribe();
    let mut backoff = Duration::from_millis(200);
    loop {
        let due = cache.due(now_s());
        if !due.is_empty() {
            match rotate(&cache, &upstream, &due).await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(error = %e, due = due.len(), "workload SVID rotation failed; retrying");
                    let d = backoff.mul_f64(rand::rng().random_range(0.5..=1.0));
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    if pause(&mut shutdown, d).await {
                        return;
                    }
                    continue;
                }
            }
            continue;
        }
        let wait = cache
            .next_due()
            .map_or(Duration::from_secs(3600), |t| {
                Duration::from_secs((t - now_s()).max(0) as u64)
            })
            .max(Duration::from_millis(50));
        changes.borrow_and_update();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

async fn rotate(
    cache: &WorkloadCache,
    upstream: &Upstream,
    due: &[String],
) -> Result<(), ClientError> {
    let client = upstream.connect().await?;
    let mut api = WorkloadServiceClient::new(client.channel());
    for chunk in due.chunks(BATCH) {
        let mut keys_by_id = HashMap::new();
        let mut requests = Vec::with_capacity(chunk.len());
        // A batch's keys and CSRs (a P-256 key and a signature each, a few
        // milliseconds for a hundred) are made on a blocking thread: the
        // agent's one worker keeps answering Workload API calls meanwhile.
        let ids = chunk.to_vec();
        let made = tokio::task::spawn_blocking(move || {
            ids.into_iter()
                .map(|id| keys::generate_key_and_csr().map(|k| (id, k)))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| ClientError::Input(format!("workload key generation failed: {e}")))??;
        for (id, k) in made {
            requests.push(WorkloadSvidRequest {
                spiffe_id: id.clone(),
                csr: k.csr_der,
            });
            keys_by_id.insert(id, Zeroizing::new(k.key_pkcs8));
        }
        let resp = api
            .batch_new_x509_svids(BatchNewX509SvidsRequest { requests })
            .await
            .map_err(|s| upstream.failed(s))?
            .into_inner();
        let now = now_s();
        for r in resp.results {
            match (r.svid, keys_by_id.remove(&r.spiffe_id)) {
                (Some(svid), Some(key)) => {
                    let renew_at = cache.renew_at(now, svid.expires_at);
                    cache.store_svid(
                        &r.spiffe_id,
                        CachedSvid {
                            chain: svid.cert_chain,
                            key_pkcs8: key,
                            serial: svid.serial,
                            expires_at: svid.expires_at,
                            issued_at: now,
                            renew_at,
                        },
                    );
                }
                _ => {
                    tracing::warn!(
                        spiffe_id = %r.spiffe_id,
                        code = %r.error_code,
                        message = %r.error_message,
                        "the server refused a workload SVID"
                    );
                    cache.refuse(&r.spiffe_id, now);
                }
            }
        }
    }
    Ok(())
}

/// A JWT-SVID for `spiffe_id` and `audiences`, from the cache or the server.
pub async fn jwt_svid(
    cache: &WorkloadCache,
    upstream: &Upstream,
    spiffe_id: &str,
    audiences: &[String],
) -> Result<String, ClientError> {
    let mut auds = audiences.to_vec();
    auds.sort();
    auds.dedup();
    if let Some(t) = cache.cached_jwt(spiffe_id, &auds) {
        return Ok(t);
    }
    let client = upstream.connect().await?;
    let resp = WorkloadServiceClient::new(client.channel())
        .new_jwt_svid(NewJwtSvidRequest {
            spiffe_id: spiffe_id.to_owned(),
            audiences: auds.clone(),
        })
        .await
        .map_err(|s| upstream.failed(s))?
        .into_inner();
    cache.put_jwt(spiffe_id, &auds, resp.token.clone(), resp.expires_at);
    Ok(resp.token)
}

/// Session credentials for `spiffe_id`'s cloud role, from the cache (first
/// half of their life) or the server.
pub async fn cloud_credentials(
    cache: &WorkloadCache,
    upstream: &Upstream,
    spiffe_id: &str,
    session_name: &str,
) -> Result<CloudCredentials, ClientError> {
    let now = now_s();
    if let Ok(map) = cache.clouds.lock()
        && let Some((c, got, exp)) = map.get(spiffe_id)
        && now < got + (exp - got) / 2
    {
        return Ok(c.clone());
    }
    let client = upstream.connect().await?;
    let creds = WorkloadServiceClient::new(client.channel())
        .new_cloud_credentials(NewCloudCredentialsRequest {
            spiffe_id: spiffe_id.to_owned(),
            session_name: session_name.to_owned(),
        })
        .await
        .map_err(|s| upstream.failed(s))?
        .into_inner();
    let exp = time::OffsetDateTime::parse(
        &creds.expiration,
        &time::format_description::well_known::Rfc3339,
    )
    .map_or(now + 60, |t| t.unix_timestamp());
    if let Ok(mut map) = cache.clouds.lock() {
        map.insert(spiffe_id.to_owned(), (creds.clone(), now, exp));
    }
    Ok(creds)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use herald_proto::v1::{Registration, TrustBundle};

    const TEMPLATE: &str = "spiffe://td/ns/{k8s:ns}/sa/{k8s:sa}";

    fn set(registrations: Vec<Registration>) -> RegistrationSet {
        RegistrationSet {
            registrations,
            bundle: Some(TrustBundle {
                trust_domain: "td".into(),
                ..Default::default()
            }),
            revision: 1,
            ..Default::default()
        }
    }

    fn reg(spiffe_id: &str, selectors: &[&str]) -> Registration {
        Registration {
            spiffe_id: spiffe_id.into(),
            selectors: selectors.iter().map(|s| s.to_string()).collect(),
            ttl_seconds: 3600,
            ..Default::default()
        }
    }

    fn pod(ns: &str, sa: &str) -> Vec<Selector> {
        let mut v = vec![
            Selector::K8sNamespace(ns.into()),
            Selector::K8sServiceAccount(sa.into()),
        ];
        v.sort();
        v
    }

    fn svid(issued_at: i64, renew_at: i64) -> CachedSvid {
        CachedSvid {
            chain: vec![b"leaf".to_vec()],
            key_pkcs8: Zeroizing::new(b"key".to_vec()),
            serial: "01".into(),
            expires_at: renew_at * 2,
            issued_at,
            renew_at,
        }
    }

    fn ids(entries: &[Arc<Entry>]) -> Vec<String> {
        entries.iter().map(|e| e.spiffe_id.clone()).collect()
    }

    /// The index finds exactly what matching every registration finds, in
    /// registration order, for every combination of a caller's facts.
    #[test]
    fn the_selector_index_finds_what_a_scan_of_every_registration_finds() {
        let pool = [
            "unix:uid:0",
            "unix:uid:1000",
            "unix:gid:10",
            "unix:path:/usr/bin/web",
            "cgroup:/system.slice/web.service",
            "k8s:ns:apps",
            "k8s:sa:web",
        ];
        // Every registration of one to three selectors from the pool, twice
        // (a second registration with the same selectors), and one whose
        // selector does not parse.
        let mut registrations = Vec::new();
        for a in 0..pool.len() {
            for b in a..pool.len() {
                for c in b..pool.len() {
                    let mut sel = vec![pool[a], pool[b], pool[c]];
                    sel.dedup();
                    for copy in 0..2 {
                        registrations.push(reg(
                            &format!("spiffe://td/r{}", registrations.len() + copy),
                            &sel,
                        ));
                    }
                }
            }
        }
        registrations.push(reg("spiffe://td/unparsable", &["unix:uid:zero"]));
        let cache = WorkloadCache::new(0.5, 0.0);
        cache.apply(set(registrations));
        let parsed: Vec<Selector> = pool.iter().map(|t| Selector::parse(t).unwrap()).collect();
        let mut compared = 0;
        for mask in 0u32..(1 << pool.len()) {
            let mut facts: Vec<Selector> = (0..pool.len())
                .filter(|i| mask & (1 << i) != 0)
                .map(|i| parsed[i].clone())
                .collect();
            facts.sort();
            cache.read(|s| {
                let scan: Vec<&str> = s
                    .entries
                    .iter()
                    .filter(|e| herald_core::selector::matches(&e.selectors, &facts))
                    .map(|e| e.spiffe_id.as_str())
                    .collect();
                let found: Vec<&str> = s
                    .registered_for(&facts)
                    .map(|e| e.spiffe_id.as_str())
                    .collect();
                assert_eq!(found, scan, "facts {facts:?}");
                compared += scan.len();
            });
        }
        assert!(compared > 1000, "the combinations matched registrations");
        assert!(ids(&cache.matching(&parsed)).len() > 100);
    }

    #[test]
    fn a_template_gives_each_caller_its_own_instance_on_first_use() {
        let cache = WorkloadCache::new(0.5, 0.0);
        cache.apply(set(vec![
            reg("spiffe://td/fixed", &["k8s:ns:apps"]),
            reg(TEMPLATE, &["k8s:ns:apps"]),
        ]));
        // Nothing is issued ahead of time for a template.
        assert_eq!(cache.due(now_s()), vec!["spiffe://td/fixed".to_string()]);
        let billing = cache.matching(&pod("apps", "billing"));
        assert_eq!(
            ids(&billing),
            ["spiffe://td/fixed", "spiffe://td/ns/apps/sa/billing"]
        );
        assert!(billing[1].svid.is_none() && billing[1].template.is_none());
        assert_eq!(
            ids(&cache.matching(&pod("apps", "web"))),
            ["spiffe://td/fixed", "spiffe://td/ns/apps/sa/web"]
        );
        // Asking again builds nothing new; another namespace matches nothing.
        cache.matching(&pod("apps", "billing"));
        assert_eq!(cache.read(|s| s.instances.len()), 2);
        assert!(cache.matching(&pod("prod", "billing")).is_empty());
        // A caller holding no value for a placeholder gets only the fixed one.
        assert_eq!(
            ids(&cache.matching(&[Selector::K8sNamespace("apps".into())])),
            ["spiffe://td/fixed"]
        );
        let mut due = cache.due(now_s());
        due.sort();
        assert_eq!(
            due,
            [
                "spiffe://td/fixed",
                "spiffe://td/ns/apps/sa/billing",
                "spiffe://td/ns/apps/sa/web"
            ]
        );
        let now = now_s();
        cache.store_svid("spiffe://td/ns/apps/sa/billing", svid(now, now + 1800));
        let billing = cache.matching(&pod("apps", "billing"));
        assert_eq!(billing[1].svid.as_ref().unwrap().serial, "01");
        assert!(
            cache.read(|s| s.entries[1].svid.is_none()),
            "never the template"
        );
    }

    #[test]
    fn idle_instances_are_dropped_and_follow_their_template() {
        let cache = WorkloadCache::new(0.5, 0.0);
        cache.apply(set(vec![reg(TEMPLATE, &["k8s:ns:apps"])]));
        cache.matching(&pod("apps", "a"));
        cache.matching(&pod("apps", "b"));
        let now = now_s();
        // Both issued in the future of their last use; `a` is asked for
        // again after that, `b` never is.
        cache.store_svid("spiffe://td/ns/apps/sa/a", svid(now + 1, now + 10));
        cache.store_svid("spiffe://td/ns/apps/sa/b", svid(now + 1, now + 10));
        cache.read(|s| {
            s.instances[0]
                .last_used
                .as_ref()
                .unwrap()
                .store(now + 5, Ordering::Relaxed)
        });
        assert_eq!(
            cache.due(now + 10),
            vec!["spiffe://td/ns/apps/sa/a".to_string()]
        );
        assert_eq!(
            ids(&cache.read(|s| s.instances.clone())),
            ["spiffe://td/ns/apps/sa/a"]
        );
        // A new set keeping the template keeps the instance and its SVID;
        // one without it drops it.
        cache.apply(set(vec![reg(TEMPLATE, &["k8s:ns:apps"])]));
        assert!(cache.read(|s| s.instances[0].svid.is_some()));
        cache.apply(set(vec![reg(TEMPLATE, &["k8s:ns:other"])]));
        assert!(cache.read(|s| s.instances.is_empty()));
    }

    #[test]
    fn a_refused_svid_is_not_asked_for_again_at_once() {
        let cache = WorkloadCache::new(0.5, 0.0);
        cache.apply(set(vec![reg("spiffe://td/a", &["unix:uid:1"])]));
        let now = now_s();
        assert_eq!(cache.due(now).len(), 1);
        cache.refuse("spiffe://td/a", now);
        assert!(cache.due(now).is_empty());
        assert_eq!(cache.next_due(), Some(now + REFUSED_RETRY_S));
        assert_eq!(cache.due(now + REFUSED_RETRY_S).len(), 1);
    }

    #[test]
    fn an_unparsable_template_matches_nobody() {
        let cache = WorkloadCache::new(0.5, 0.0);
        cache.apply(set(vec![reg("spiffe://td/{k8s:nope}", &["k8s:ns:apps"])]));
        assert!(cache.matching(&pod("apps", "a")).is_empty());
        assert!(cache.due(now_s()).is_empty());
    }

    #[test]
    fn a_suspended_cache_serves_and_renews_nothing_until_resumed() {
        let cache = WorkloadCache::new(0.5, 0.0);
        cache.apply(set(vec![
            reg("spiffe://td/app", &["unix:uid:7"]),
            reg(TEMPLATE, &["k8s:ns:apps"]),
        ]));
        let app = [Selector::Uid(7)];
        let pod = pod("apps", "web");
        assert_eq!(cache.matching(&pod).len(), 1, "an instance is built");
        cache.store_svid("spiffe://td/app", svid(now_s(), i64::MAX / 4));
        cache.store_svid("spiffe://td/ns/apps/sa/web", svid(now_s(), i64::MAX / 4));
        cache.put_jwt(
            "spiffe://td/app",
            &["aud".to_owned()],
            "jwt".into(),
            i64::MAX,
        );
        assert!(cache.matching(&app)[0].svid.is_some());
        assert!(cache.due(now_s()).is_empty());

        cache.suspend();
        assert!(cache.matching(&app).is_empty(), "callers get nothing");
        assert!(cache.matching(&pod).is_empty());
        assert!(cache.due(now_s()).is_empty(), "nothing is renewed");
        assert!(
            cache
                .cached_jwt("spiffe://td/app", &["aud".to_owned()])
                .is_none()
        );
        // A rotation finishing after the suspension is dropped.
        cache.store_svid("spiffe://td/app", svid(now_s(), i64::MAX / 4));
        assert!(cache.read(|s| {
            s.entries
                .iter()
                .chain(&s.instances)
                .all(|e| e.svid.is_none())
        }));

        // Resumed: served again once the SVIDs are re-issued, due at once.
        cache.resume();
        assert_eq!(cache.due(now_s()).len(), 2);
        assert!(cache.matching(&app)[0].svid.is_none());
    }
}
