//! Envoy's Secret Discovery Service (SDS v3) on the agent's socket, so a
//! service mesh takes its certificates from Herald unchanged.
//!
//! Callers are attested exactly as Workload API callers are (peer
//! credentials, the pinned process, registrations), and resources are
//! named as SPIRE's agent names them, so existing Envoy and Istio
//! configurations work as they are:
//!
//! | resource name        | secret                                           |
//! |----------------------|--------------------------------------------------|
//! | a SPIFFE ID          | `TlsCertificate`: that identity's chain and key  |
//! | `default`            | `TlsCertificate`: the caller's first identity    |
//! | `spiffe://<td>`      | `ValidationContext` for that trust domain        |
//! | `ROOTCA`             | `ValidationContext`: the local trust domain      |
//! | `ALL`                | `ValidationContext`: local and federated domains |
//!
//! Validation contexts carry Envoy's SPIFFE certificate validator
//! (`envoy.tls.cert_validator.spiffe`, one trust domain entry each), or a
//! plain `trusted_ca` when the Envoy node's metadata says
//! `disable_spiffe_cert_validation: true`. A name the caller is not
//! entitled to is refused with `InvalidArgument`.
//!
//! The stream follows xDS's state-of-the-world rules: every response has a
//! higher `version_info` and a fresh nonce; a request answering an older
//! nonce is stale and ignored; a NACK (`error_detail`) is logged and
//! counted and nothing is resent for it; a request naming other resources
//! is answered; and every rotation or bundle change that alters what the
//! caller asked for is pushed. `DeltaSecrets` answers `Unimplemented`.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, Node, TypedExtensionConfig, data_source::Specifier,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, TlsCertificate, secret,
    spiffe_cert_validator_config,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
};
use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_server::{
    SecretDiscoveryService, SecretDiscoveryServiceServer,
};
use envoy_types::pb::google::protobuf::{Any, value::Kind};
use futures::Stream;
use herald_client::files::to_pem;
use prost::{Message, Name};
use tonic::{Request, Response, Status, Streaming};
use zeroize::Zeroizing;

use super::api::WorkloadApi;
use super::{Entry, State};

/// The type URL of every SDS resource.
pub const SECRET_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";
/// The name of the caller's first X.509 SVID.
pub const DEFAULT_SVID: &str = "default";
/// The name of the local trust domain's validation context.
pub const ROOT_CA: &str = "ROOTCA";
/// The name of the validation context of every trust domain known here.
pub const ALL_BUNDLES: &str = "ALL";
/// Envoy's SPIFFE certificate validator extension.
pub const SPIFFE_VALIDATOR: &str = "envoy.tls.cert_validator.spiffe";
/// The node metadata key that asks for `trusted_ca` instead.
pub const DISABLE_SPIFFE_VALIDATION: &str = "disable_spiffe_cert_validation";

/// Counters of the SDS streams (for logs and tests).
#[derive(Debug, Default)]
pub struct SdsCounters {
    /// Responses sent.
    pub responses: AtomicU64,
    /// NACKs received.
    pub nacks: AtomicU64,
}

/// The SDS service over the Workload API's cache and attestation.
#[derive(Debug, Clone)]
pub struct Sds {
    api: WorkloadApi,
    counters: Arc<SdsCounters>,
}

impl Sds {
    /// SDS for the callers `api` attests.
    pub fn new(api: WorkloadApi) -> Self {
        Self {
            api,
            counters: Arc::new(SdsCounters::default()),
        }
    }

    /// The tonic service.
    pub fn into_service(self) -> SecretDiscoveryServiceServer<Sds> {
        SecretDiscoveryServiceServer::new(self)
    }

    /// The counters, shared with every stream.
    pub fn counters(&self) -> Arc<SdsCounters> {
        self.counters.clone()
    }
}

/// How validation contexts are expressed for one Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Validation {
    /// Envoy's SPIFFE validator (SAN and trust domain checks).
    Spiffe,
    /// A plain CA list (`trusted_ca`).
    RootCa,
}

impl Validation {
    fn of(node: Option<&Node>) -> Validation {
        let disabled = node
            .and_then(|n| n.metadata.as_ref())
            .and_then(|m| m.fields.get(DISABLE_SPIFFE_VALIDATION))
            .is_some_and(|v| matches!(v.kind, Some(Kind::BoolValue(true))));
        if disabled {
            Validation::RootCa
        } else {
            Validation::Spiffe
        }
    }
}

/// The trust domains whose bundles a caller entitled to `entries` gets:
/// (name, DER authorities), the local one first, then the foreign ones its
/// registrations federate with.
fn bundles(state: &State, entries: &[Arc<Entry>]) -> Vec<(String, Vec<Vec<u8>>)> {
    if state.bundle_x509.is_empty() {
        return Vec::new();
    }
    let mut out = vec![(state.trust_domain.clone(), state.bundle_x509.clone())];
    out.extend(
        state
            .federated
            .iter()
            .filter(|b| {
                !b.x509.is_empty()
                    && entries
                        .iter()
                        .any(|e| e.federates_with.contains(&b.trust_domain))
            })
            .map(|b| (b.trust_domain.clone(), b.x509.clone())),
    );
    out
}

fn inline(bytes: Vec<u8>) -> Option<DataSource> {
    Some(DataSource {
        specifier: Some(Specifier::InlineBytes(bytes)),
        ..DataSource::default()
    })
}

fn any<M: Message + Name>(m: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: m.encode_to_vec(),
    }
}

fn tls_secret(name: &str, entry: &Entry) -> Option<Secret> {
    let svid = entry.svid.as_ref()?;
    let key = Zeroizing::new(to_pem("PRIVATE KEY", &[svid.key_pkcs8.to_vec()]));
    Some(Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
            certificate_chain: inline(to_pem("CERTIFICATE", &svid.chain).into_bytes()),
            private_key: inline(key.as_bytes().to_vec()),
            ..TlsCertificate::default()
        })),
    })
}

fn validation_secret(
    name: &str,
    domains: &[&(String, Vec<Vec<u8>>)],
    validation: Validation,
) -> Secret {
    let context = match validation {
        Validation::Spiffe => {
            let config = SpiffeCertValidatorConfig {
                trust_domains: domains
                    .iter()
                    .map(|(td, ders)| spiffe_cert_validator_config::TrustDomain {
                        name: td.clone(),
                        trust_bundle: inline(to_pem("CERTIFICATE", ders).into_bytes()),
                        ..spiffe_cert_validator_config::TrustDomain::default()
                    })
                    .collect(),
                ..SpiffeCertValidatorConfig::default()
            };
            CertificateValidationContext {
                custom_validator_config: Some(TypedExtensionConfig {
                    name: SPIFFE_VALIDATOR.to_owned(),
                    typed_config: Some(any(&config)),
                }),
                ..CertificateValidationContext::default()
            }
        }
        Validation::RootCa => {
            let all: Vec<Vec<u8>> = domains.iter().flat_map(|(_, d)| d.clone()).collect();
            CertificateValidationContext {
                trusted_ca: inline(to_pem("CERTIFICATE", &all).into_bytes()),
                ..CertificateValidationContext::default()
            }
        }
    };
    Secret {
        name: name.to_owned(),
        r#type: Some(secret::Type::ValidationContext(context)),
    }
}

/// The secrets `names` ask for, for a caller entitled to `entries`.
/// An empty list asks for everything the caller may have: its SVIDs (by
/// SPIFFE ID) and every trust domain's bundle. A SVID not issued yet is
/// left out (it is pushed when it is); a name the caller may not have is
/// `InvalidArgument`.
fn resources(
    state: &State,
    entries: &[Arc<Entry>],
    names: &[String],
    validation: Validation,
) -> Result<Vec<Secret>, Status> {
    let domains = bundles(state, entries);
    let mut out = Vec::new();
    if names.is_empty() {
        let mut seen = std::collections::HashSet::new();
        for e in entries {
            if seen.insert(e.spiffe_id.as_str())
                && let Some(s) = tls_secret(&e.spiffe_id, e)
            {
                out.push(s);
            }
        }
        for d in &domains {
            out.push(validation_secret(
                &format!("spiffe://{}", d.0),
                &[d],
                validation,
            ));
        }
        return Ok(out);
    }
    for name in names {
        let secret = match name.as_str() {
            DEFAULT_SVID => entries
                .iter()
                .find(|e| e.svid.is_some())
                .and_then(|e| tls_secret(DEFAULT_SVID, e)),
            ROOT_CA => domains
                .first()
                .map(|d| validation_secret(ROOT_CA, &[d], validation)),
            ALL_BUNDLES => {
                let all: Vec<&(String, Vec<Vec<u8>>)> = domains.iter().collect();
                (!all.is_empty()).then(|| validation_secret(ALL_BUNDLES, &all, validation))
            }
            other => match other.strip_prefix("spiffe://") {
                Some(rest) if !rest.contains('/') => {
                    let d = domains.iter().find(|d| d.0 == rest).ok_or_else(|| {
                        Status::invalid_argument(format!("no bundle for trust domain {rest}"))
                    })?;
                    Some(validation_secret(other, &[d], validation))
                }
                Some(_) => {
                    let entry = entries
                        .iter()
                        .find(|e| e.spiffe_id == other)
                        .ok_or_else(|| {
                            Status::invalid_argument(format!(
                                "this workload is not entitled to {other}"
                            ))
                        })?;
                    tls_secret(other, entry)
                }
                None => {
                    return Err(Status::invalid_argument(format!(
                        "unknown SDS resource name {other:?}"
                    )));
                }
            },
        };
        out.extend(secret);
    }
    Ok(out)
}

fn nonce() -> String {
    let mut b = [0u8; 16];
    rand::fill(&mut b);
    hex::encode(b)
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Whether a response goes out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Push {
    /// A request to answer.
    Always,
    /// A state change: only if the resources differ from the last sent.
    IfChanged,
}

/// One SDS stream's xDS bookkeeping.
struct XdsState {
    /// What the client asked for (None until its first request).
    names: Option<Vec<String>>,
    validation: Validation,
    version: u64,
    nonce: String,
    /// The resources of the last response, to push only on change.
    sent: Option<Vec<Any>>,
    node_id: String,
}

impl XdsState {
    fn response(&mut self, resources: Vec<Any>) -> DiscoveryResponse {
        self.version += 1;
        self.nonce = nonce();
        self.sent = Some(resources.clone());
        DiscoveryResponse {
            version_info: self.version.to_string(),
            resources,
            type_url: SECRET_TYPE_URL.to_owned(),
            nonce: self.nonce.clone(),
            ..DiscoveryResponse::default()
        }
    }
}

impl Sds {
    fn current(&self, entries: &[Arc<Entry>], x: &XdsState) -> Result<Vec<Any>, Status> {
        let names = x.names.as_deref().unwrap_or_default();
        let secrets = self
            .api
            .cache()
            .read(|s| resources(s, entries, names, x.validation))?;
        Ok(secrets.iter().map(any).collect())
    }
}

#[tonic::async_trait]
impl SecretDiscoveryService for Sds {
    type DeltaSecretsStream = BoxStream<DeltaDiscoveryResponse>;
    type StreamSecretsStream = BoxStream<DiscoveryResponse>;

    async fn delta_secrets(
        &self,
        _request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaSecretsStream>, Status> {
        Err(Status::unimplemented(
            "DeltaSecrets is not served; use StreamSecrets",
        ))
    }

    async fn stream_secrets(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamSecretsStream>, Status> {
        let (peer, facts) = self.api.attest(&request).await?;
        self.api.synced().await;
        self.api.entries_for(&facts)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let sds = self.clone();
        tokio::spawn(async move {
            let mut changes = sds.api.cache().subscribe();
            let mut x = XdsState {
                names: None,
                validation: Validation::Spiffe,
                version: 0,
                nonce: String::new(),
                sent: None,
                node_id: String::new(),
            };
            loop {
                // Which happened: a request (Some) or a state change (None)?
                let request = tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(r)) => Some(r),
                        Ok(None) => return,
                        Err(e) => {
                            tracing::debug!(error = %e, "SDS stream ended by the client");
                            return;
                        }
                    },
                    r = changes.changed() => match r {
                        Ok(()) => None,
                        Err(_) => return,
                    },
                    () = tx.closed() => return,
                };
                let respond = match request {
                    Some(r) => {
                        if let Some(node) = &r.node {
                            x.validation = Validation::of(Some(node));
                            x.node_id.clone_from(&node.id);
                        }
                        if !r.type_url.is_empty() && r.type_url != SECRET_TYPE_URL {
                            let _ = tx
                                .send(Err(Status::invalid_argument(format!(
                                    "SDS serves {SECRET_TYPE_URL}, not {}",
                                    r.type_url
                                ))))
                                .await;
                            return;
                        }
                        if !r.response_nonce.is_empty() && r.response_nonce != x.nonce {
                            // Answers a response since superseded: stale.
                            continue;
                        }
                        if let Some(err) = &r.error_detail {
                            let total = sds.counters.nacks.fetch_add(1, Ordering::Relaxed) + 1;
                            tracing::warn!(
                                node = %x.node_id,
                                version = %r.version_info,
                                rejected = %x.version,
                                code = err.code,
                                message = %err.message,
                                nacks_total = total,
                                "Envoy rejected an SDS response"
                            );
                        }
                        // Answered in the client's order; compared as sets.
                        let mut names = r.resource_names;
                        let mut seen = std::collections::HashSet::new();
                        names.retain(|n| seen.insert(n.clone()));
                        let as_set = |v: &[String]| {
                            v.iter().cloned().collect::<std::collections::BTreeSet<_>>()
                        };
                        let changed = x.names.as_deref().map(as_set) != Some(as_set(&names));
                        x.names = Some(names);
                        // An ACK or NACK of the current response naming the
                        // same resources needs no answer.
                        if !(changed || r.response_nonce.is_empty()) {
                            continue;
                        }
                        Push::Always
                    }
                    None => {
                        changes.borrow_and_update();
                        if x.names.is_none() {
                            continue;
                        }
                        if let Err(e) = peer.unchanged() {
                            tracing::warn!(pid = peer.pid, error = %e, "SDS stream ended");
                            let _ = tx.send(Err(Status::permission_denied(e.to_string()))).await;
                            return;
                        }
                        Push::IfChanged
                    }
                };
                let entries = sds.api.cache().matching(&facts.selectors);
                if entries.is_empty() {
                    let _ = tx
                        .send(Err(Status::permission_denied("no identity issued")))
                        .await;
                    return;
                }
                let resources = match sds.current(&entries, &x) {
                    Ok(r) => r,
                    Err(status) => {
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                };
                // A change elsewhere in the cache that leaves these
                // resources as they were is not pushed; a new request is
                // always answered.
                if respond == Push::IfChanged && x.sent.as_ref() == Some(&resources) {
                    continue;
                }
                let response = x.response(resources);
                sds.counters.responses.fetch_add(1, Ordering::Relaxed);
                if tx.send(Ok(response)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn fetch_secrets(
        &self,
        request: Request<DiscoveryRequest>,
    ) -> Result<Response<DiscoveryResponse>, Status> {
        let (_, facts) = self.api.attest(&request).await?;
        self.api.synced().await;
        let entries = self.api.entries_for(&facts)?;
        let r = request.into_inner();
        if !r.type_url.is_empty() && r.type_url != SECRET_TYPE_URL {
            return Err(Status::invalid_argument(format!(
                "SDS serves {SECRET_TYPE_URL}, not {}",
                r.type_url
            )));
        }
        let mut x = XdsState {
            names: Some(r.resource_names),
            validation: Validation::of(r.node.as_ref()),
            version: 0,
            nonce: String::new(),
            sent: None,
            node_id: String::new(),
        };
        let resources = self.current(&entries, &x)?;
        self.counters.responses.fetch_add(1, Ordering::Relaxed);
        Ok(Response::new(x.response(resources)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{RateLimitConfig, WorkloadApiConfig};
    use crate::workload::{CachedSvid, Upstream, WorkloadCache};
    use envoy_types::pb::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
    use envoy_types::pb::google::protobuf::{Struct, Value};
    use envoy_types::pb::google::rpc::Status as RpcStatus;
    use herald_proto::v1::{Registration, RegistrationSet, TrustBundle};

    const TD: &str = "sds.herald.test";

    fn id(name: &str) -> String {
        format!("spiffe://{TD}/w/{name}")
    }

    fn own_uid() -> u32 {
        rustix::process::getuid().as_raw()
    }

    /// A cache holding registrations for this process (`web`, `api`) and
    /// for another uid (`other`), and SVIDs for `web` and `other`.
    fn cache() -> Arc<WorkloadCache> {
        let cache = WorkloadCache::new(0.5, 0.0);
        let reg = |name: &str, uid: u32| Registration {
            spiffe_id: id(name),
            selectors: vec![format!("unix:uid:{uid}")],
            ttl_seconds: 3600,
            ..Registration::default()
        };
        cache.apply(RegistrationSet {
            registrations: vec![
                reg("web", own_uid()),
                reg("api", own_uid()),
                reg("other", own_uid().wrapping_add(1)),
            ],
            revision: 1,
            bundle: Some(TrustBundle {
                trust_domain: TD.into(),
                x509_authorities: vec![b"root-one".to_vec()],
                jwks: "{\"keys\":[]}".into(),
                sequence: 1,
            }),
            federated_bundles: Vec::new(),
        });
        svid(&cache, "web", "leaf-1");
        svid(&cache, "other", "leaf-x");
        cache
    }

    fn svid(cache: &WorkloadCache, name: &str, leaf: &str) {
        cache.store_svid(
            &id(name),
            CachedSvid {
                chain: vec![leaf.as_bytes().to_vec()],
                key_pkcs8: Zeroizing::new(format!("key-of-{leaf}").into_bytes()),
                serial: leaf.into(),
                expires_at: i64::MAX,
                issued_at: 0,
                renew_at: i64::MAX,
            },
        );
    }

    fn api(cache: Arc<WorkloadCache>) -> WorkloadApi {
        let cfg = WorkloadApiConfig {
            socket: "/unused".into(),
            max_executable_size: 1 << 30,
            rate_limit: RateLimitConfig {
                per_second: 0.0,
                burst: 1,
            },
            kubernetes: None,
        };
        let upstream = Upstream::new(Vec::new(), "/unused".into(), "/unused".into(), None);
        WorkloadApi::new(cache, upstream, &cfg)
    }

    fn state_entries(cache: &WorkloadCache) -> (Vec<Arc<Entry>>, Vec<Arc<Entry>>) {
        let mine = cache.matching(&[herald_core::Selector::Uid(own_uid())]);
        let theirs = cache.matching(&[herald_core::Selector::Uid(own_uid().wrapping_add(1))]);
        (mine, theirs)
    }

    fn names(secrets: &[Secret]) -> Vec<&str> {
        secrets.iter().map(|s| s.name.as_str()).collect()
    }

    fn pem_of(text: &str) -> String {
        to_pem("CERTIFICATE", &[text.as_bytes().to_vec()])
    }

    fn chain_of(s: &Secret) -> Vec<u8> {
        match &s.r#type {
            Some(secret::Type::TlsCertificate(t)) => match &t.certificate_chain {
                Some(DataSource {
                    specifier: Some(Specifier::InlineBytes(b)),
                    ..
                }) => b.clone(),
                other => panic!("chain {other:?}"),
            },
            other => panic!("not a certificate: {other:?}"),
        }
    }

    /// (validator name, [(trust domain, bundle PEM)]) or ("trusted_ca", [("", PEM)]).
    fn validation_of(s: &Secret) -> (String, Vec<(String, String)>) {
        let Some(secret::Type::ValidationContext(c)) = &s.r#type else {
            panic!("not a validation context: {s:?}");
        };
        let text = |d: &Option<DataSource>| match d {
            Some(DataSource {
                specifier: Some(Specifier::InlineBytes(b)),
                ..
            }) => String::from_utf8(b.clone()).unwrap(),
            other => panic!("{other:?}"),
        };
        if let Some(cfg) = &c.custom_validator_config {
            let any = cfg.typed_config.as_ref().unwrap();
            assert_eq!(any.type_url, SpiffeCertValidatorConfig::type_url());
            let v = SpiffeCertValidatorConfig::decode(&any.value[..]).unwrap();
            let domains = v
                .trust_domains
                .iter()
                .map(|t| (t.name.clone(), text(&t.trust_bundle)))
                .collect();
            return (cfg.name.clone(), domains);
        }
        (
            "trusted_ca".into(),
            vec![(String::new(), text(&c.trusted_ca))],
        )
    }

    #[test]
    fn federated_bundles_reach_only_the_workloads_that_federate() {
        let cache = WorkloadCache::new(0.5, 0.0);
        let reg = |name: &str, uid: u32, with: &[&str]| Registration {
            spiffe_id: id(name),
            selectors: vec![format!("unix:uid:{uid}")],
            ttl_seconds: 3600,
            federates_with: with.iter().map(|s| s.to_string()).collect(),
            ..Registration::default()
        };
        let foreign = |td: &str| TrustBundle {
            trust_domain: td.into(),
            x509_authorities: vec![format!("root-of-{td}").into_bytes()],
            jwks: "{\"keys\":[]}".into(),
            sequence: 7,
        };
        cache.apply(RegistrationSet {
            registrations: vec![
                reg("web", own_uid(), &["partner.test"]),
                reg("other", own_uid().wrapping_add(1), &["third.test"]),
            ],
            revision: 1,
            bundle: Some(TrustBundle {
                trust_domain: TD.into(),
                x509_authorities: vec![b"root-one".to_vec()],
                jwks: "{\"keys\":[]}".into(),
                sequence: 1,
            }),
            federated_bundles: vec![foreign("partner.test"), foreign("third.test")],
        });
        let (mine, theirs) = state_entries(&cache);
        let get = |entries: &[Arc<Entry>], names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            cache.read(|s| resources(s, entries, &names, Validation::Spiffe))
        };
        let all = get(&mine, &[ALL_BUNDLES]).unwrap();
        assert_eq!(
            validation_of(&all[0]).1,
            vec![
                (TD.to_owned(), pem_of("root-one")),
                ("partner.test".to_owned(), pem_of("root-of-partner.test")),
            ]
        );
        let partner = get(&mine, &["spiffe://partner.test"]).unwrap();
        assert_eq!(
            validation_of(&partner[0]).1,
            vec![("partner.test".to_owned(), pem_of("root-of-partner.test"))]
        );
        // A trust domain another workload federates with is not this one's.
        let refused = get(&mine, &["spiffe://third.test"]).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(get(&theirs, &["spiffe://third.test"]).is_ok());
        // ROOTCA stays the local trust domain.
        let root = get(&mine, &[ROOT_CA]).unwrap();
        assert_eq!(
            validation_of(&root[0]).1,
            vec![(TD.to_owned(), pem_of("root-one"))]
        );
    }

    #[test]
    fn resources_are_named_as_spire_names_them() {
        let cache = cache();
        let (mine, _) = state_entries(&cache);
        let get = |names: &[&str], v: Validation| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            cache.read(|s| resources(s, &mine, &names, v))
        };
        // A SPIFFE ID, default, the trust domain, ROOTCA, ALL.
        let r = get(
            &[
                &id("web"),
                DEFAULT_SVID,
                &format!("spiffe://{TD}"),
                ROOT_CA,
                ALL_BUNDLES,
            ],
            Validation::Spiffe,
        )
        .unwrap();
        assert_eq!(
            names(&r),
            vec![
                id("web").as_str(),
                "default",
                &format!("spiffe://{TD}"),
                "ROOTCA",
                "ALL"
            ]
        );
        assert_eq!(chain_of(&r[0]), pem_of("leaf-1").into_bytes());
        assert_eq!(chain_of(&r[1]), pem_of("leaf-1").into_bytes());
        match &r[0].r#type {
            Some(secret::Type::TlsCertificate(t)) => assert_eq!(
                t.private_key,
                inline(to_pem("PRIVATE KEY", &[b"key-of-leaf-1".to_vec()]).into_bytes())
            ),
            other => panic!("{other:?}"),
        }
        for s in &r[2..] {
            assert_eq!(
                validation_of(s),
                (
                    SPIFFE_VALIDATOR.to_owned(),
                    vec![(TD.to_owned(), pem_of("root-one"))]
                )
            );
        }
        // trusted_ca when the node asks for it.
        let r = get(&[ROOT_CA], Validation::RootCa).unwrap();
        assert_eq!(
            validation_of(&r[0]),
            (
                "trusted_ca".to_owned(),
                vec![(String::new(), pem_of("root-one"))]
            )
        );
        // Everything, when nothing is named: SVIDs issued so far and bundles.
        let r = get(&[], Validation::Spiffe).unwrap();
        assert_eq!(
            names(&r),
            vec![id("web").as_str(), &format!("spiffe://{TD}")]
        );
        // Entitled but not issued yet: left out until it is.
        assert!(get(&[&id("api")], Validation::Spiffe).unwrap().is_empty());
        // Not entitled, unknown: refused.
        for bad in [
            id("other"),
            "spiffe://elsewhere.test".into(),
            "bogus".into(),
        ] {
            let e = get(&[&bad], Validation::Spiffe).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad}");
        }
    }

    #[test]
    fn node_metadata_chooses_the_validator() {
        let node = |v: Option<bool>| Node {
            metadata: v.map(|b| Struct {
                fields: [(
                    DISABLE_SPIFFE_VALIDATION.to_owned(),
                    Value {
                        kind: Some(Kind::BoolValue(b)),
                    },
                )]
                .into(),
            }),
            ..Node::default()
        };
        assert_eq!(Validation::of(None), Validation::Spiffe);
        assert_eq!(Validation::of(Some(&node(None))), Validation::Spiffe);
        assert_eq!(Validation::of(Some(&node(Some(false)))), Validation::Spiffe);
        assert_eq!(Validation::of(Some(&node(Some(true)))), Validation::RootCa);
    }

    type Client = SecretDiscoveryServiceClient<tonic::transport::Channel>;

    /// The agent's socket server on a temporary socket, for `cache`.
    async fn serve(cache: Arc<WorkloadCache>) -> (tempfile::TempDir, Client, Arc<SdsCounters>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = crate::workload::api::bind(&path).unwrap();
        let api = api(cache);
        let sds = Sds::new(api.clone());
        let counters = sds.counters();
        let (tx, rx) = tokio::sync::watch::channel(false);
        let socket = path.clone();
        tokio::spawn(async move {
            let _keep_open = tx;
            let _ = crate::workload::api::serve(api, sds, listener, socket, rx).await;
        });
        let channel = tonic::transport::Endpoint::from_static("http://sds.test")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
            .unwrap();
        (dir, SecretDiscoveryServiceClient::new(channel), counters)
    }

    fn request(names: &[&str], version: &str, nonce: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: SECRET_TYPE_URL.into(),
            response_nonce: nonce.into(),
            ..DiscoveryRequest::default()
        }
    }

    fn secrets(r: &DiscoveryResponse) -> Vec<Secret> {
        assert_eq!(r.type_url, SECRET_TYPE_URL);
        r.resources
            .iter()
            .map(|a| {
                assert_eq!(a.type_url, SECRET_TYPE_URL);
                Secret::decode(&a.value[..]).unwrap()
            })
            .collect()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stream_follows_the_xds_rules() {
        let cache = cache();
        let (_dir, mut client, counters) = serve(cache.clone()).await;
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let mut first = request(&[&id("web"), ROOT_CA], "", "");
        first.node = Some(Node {
            id: "envoy-1".into(),
            ..Node::default()
        });
        tx.send(first).await.unwrap();
        let mut responses = client
            .stream_secrets(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let r1 = responses.message().await.unwrap().unwrap();
        assert_eq!(r1.version_info, "1");
        assert_eq!(r1.nonce.len(), 32);
        let s1 = secrets(&r1);
        assert_eq!(names(&s1), vec![id("web").as_str(), ROOT_CA]);
        assert_eq!(chain_of(&s1[0]), pem_of("leaf-1").into_bytes());

        // An ACK: nothing. A stale nonce naming ALL: ignored. A NACK of the
        // current response: counted, nothing resent.
        tx.send(request(&[&id("web"), ROOT_CA], "1", &r1.nonce))
            .await
            .unwrap();
        tx.send(request(&[ALL_BUNDLES], "1", "not-the-nonce"))
            .await
            .unwrap();
        let mut nack = request(&[&id("web"), ROOT_CA], "0", &r1.nonce);
        nack.error_detail = Some(RpcStatus {
            code: 3,
            message: "bad certificate".into(),
            details: Vec::new(),
        });
        tx.send(nack).await.unwrap();
        // New names: answered, and the next message on the stream is this
        // answer (none of the above produced one).
        tx.send(request(&[DEFAULT_SVID], "1", &r1.nonce))
            .await
            .unwrap();
        let r2 = responses.message().await.unwrap().unwrap();
        assert_eq!(r2.version_info, "2");
        assert_ne!(r2.nonce, r1.nonce);
        assert_eq!(names(&secrets(&r2)), vec![DEFAULT_SVID]);
        assert_eq!(counters.nacks.load(Ordering::Relaxed), 1);

        // A change that does not touch the named resources: no push; a
        // rotation of the caller's SVID: pushed, with the new chain.
        svid(&cache, "other", "leaf-y");
        svid(&cache, "web", "leaf-2");
        let r3 = responses.message().await.unwrap().unwrap();
        assert_eq!(r3.version_info, "3");
        assert_eq!(chain_of(&secrets(&r3)[0]), pem_of("leaf-2").into_bytes());
        assert_eq!(counters.responses.load(Ordering::Relaxed), 3);

        // A name the caller is not entitled to ends the stream.
        tx.send(request(&[&id("other")], "3", &r3.nonce))
            .await
            .unwrap();
        let e = responses.message().await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fetch_answers_once_and_delta_is_unimplemented() {
        let (_dir, mut client, _) = serve(cache()).await;
        let mut req = request(&[&id("web"), ALL_BUNDLES], "", "");
        req.node = Some(Node {
            metadata: Some(Struct {
                fields: [(
                    DISABLE_SPIFFE_VALIDATION.to_owned(),
                    Value {
                        kind: Some(Kind::BoolValue(true)),
                    },
                )]
                .into(),
            }),
            ..Node::default()
        });
        let r = client.fetch_secrets(req).await.unwrap().into_inner();
        let s = secrets(&r);
        assert_eq!(names(&s), vec![id("web").as_str(), ALL_BUNDLES]);
        assert_eq!(validation_of(&s[1]).0, "trusted_ca");
        let e = client
            .fetch_secrets(request(&[&id("other")], "", ""))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = client
            .delta_secrets(tokio_stream::iter(Vec::<DeltaDiscoveryRequest>::new()))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unimplemented);
    }
}
