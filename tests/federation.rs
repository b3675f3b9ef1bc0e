//! SPIFFE federation end to end: two real Herald deployments (servers,
//! agents on swtpm) in two trust domains federating both ways through
//! each other's `https_spiffe` bundle endpoint, their workloads (the Rust
//! `spiffe` crate as the client) completing mTLS across the domains and
//! across a CA rotation; and a hostile bundle endpoint whose documents are
//! refused and audited while the last good bundle stays.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use common::node::{NodeSite, free_port, start_agent, wait_status};
use common::{Site, TRUST_DOMAIN, ok, require_tool, stderr, stdout};
use herald_test_tpm::SoftTpm;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The foreign trust domain the hostile-endpoint test federates with.
const PARTNER: &str = "partner.herald.test";

/// A CA certificate for `td` (URI SAN `spiffe://td`), as SPIFFE CAs are.
fn spiffe_ca(td: &str) -> (Vec<u8>, Issuer<'static, KeyPair>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
    let cert = p.self_signed(&key).unwrap();
    (cert.der().to_vec(), Issuer::new(p, key))
}

/// A leaf signed by `issuer`: URI and DNS SANs as given, server auth.
fn leaf(issuer: &Issuer<'static, KeyPair>, uri: Option<&str>, dns: &[&str]) -> (Vec<u8>, Vec<u8>) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(dns.iter().map(|d| d.to_string()).collect::<Vec<_>>()).unwrap();
    if let Some(u) = uri {
        p.subject_alt_names
            .push(SanType::URI(u.try_into().unwrap()));
    }
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p.signed_by(&key, issuer).unwrap();
    (cert.der().to_vec(), key.serialize_der())
}

/// A SPIFFE bundle document holding `cas` as X.509 authorities.
fn bundle_doc(cas: &[&[u8]], sequence: u64) -> Vec<u8> {
    let keys: Vec<serde_json::Value> = cas
        .iter()
        .map(|der| {
            serde_json::json!({
                "use": "x509-svid",
                "x5c": [base64::engine::general_purpose::STANDARD.encode(der)],
            })
        })
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": 60,
    }))
    .unwrap()
}

/// A bundle endpoint stand-in on loopback HTTPS: serves whatever body the
/// test puts in `body`, with the certificate chain it was started with.
struct Endpoint {
    port: u16,
    body: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoint {
    async fn start(chain: Vec<Vec<u8>>, key: Vec<u8>) -> Endpoint {
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            chain.into_iter().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = Arc::new(Mutex::new(Vec::new()));
        let served = body.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                let body = served.lock().unwrap().clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                        body.len()
                    );
                    let _ = tls.write_all(reply.as_bytes()).await;
                    let _ = tls.write_all(&body).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        Endpoint { port, body, task }
    }

    fn serve(&self, body: Vec<u8>) {
        *self.body.lock().unwrap() = body;
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/bundle", self.port)
    }
}

/// `herald federation <args>` against `config`.
fn federation(config: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(common::herald_bin())
        .arg("federation")
        .args(args)
        .env("HERALD_CONFIG", config)
        .env_remove("HERALD_KEK")
        .output()
        .unwrap()
}

fn held_sequence(config: &Path) -> Option<u64> {
    let out = federation(config, &["list", "--json"]);
    stdout(&out)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["trust_domain"] == PARTNER)
        .and_then(|v| v["sequence"].as_u64())
}

/// A copy of `site`'s configuration with `federation` appended.
fn config_with(site: &Site, name: &str, federation: &str) -> PathBuf {
    let text = std::fs::read_to_string(site.config()).unwrap();
    let path = site.dir.path().join(name);
    std::fs::write(&path, format!("{text}\n{federation}")).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_bundle_endpoint_is_refused_and_audited_and_the_last_good_bundle_stays() {
    let site = Site::new();
    // The first start creates the database and key ring.
    site.start().stop();
    // A Web PKI stand-in: its own root, a certificate for 127.0.0.1.
    let (web_root, web_issuer) = spiffe_ca("web-root.invalid");
    let (web_leaf, web_key) = leaf(&web_issuer, None, &["127.0.0.1"]);
    let web = Endpoint::start(vec![web_leaf], web_key).await;
    let roots = site.dir.path().join("web-roots.pem");
    std::fs::write(
        &roots,
        pem::encode(&pem::Pem::new("CERTIFICATE", web_root.clone())),
    )
    .unwrap();
    let cfg = config_with(
        &site,
        "web.toml",
        &format!(
            "[[federation.trust_domains]]\ntrust_domain = \"{PARTNER}\"\nurl = \"{}\"\nprofile = \"https_web\"\nca_file = \"{}\"\n",
            web.url(),
            roots.display()
        ),
    );
    let (partner_ca, partner_issuer) = spiffe_ca(PARTNER);
    let (other_ca, _) = spiffe_ca("other.herald.test");

    // A good bundle is taken.
    web.serve(bundle_doc(&[&partner_ca], 5));
    let out = ok(federation(&cfg, &["refresh"]));
    assert!(
        stdout(&out).contains("updated (spiffe_sequence 5)"),
        "{}",
        stdout(&out)
    );
    assert_eq!(held_sequence(&cfg), Some(5));
    // The same again changes nothing.
    assert!(stdout(&ok(federation(&cfg, &["refresh"]))).contains("unchanged"));

    // Hostile documents: each refused with its code; the bundle stays.
    let huge = {
        let mut d = bundle_doc(&[&partner_ca], 9);
        d.truncate(d.len() - 1);
        d.extend(format!(",\"pad\":\"{}\"}}", "x".repeat(600 * 1024)).into_bytes());
        d
    };
    let hostile: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "another trust domain's CA",
            bundle_doc(&[&other_ca], 6),
            "belongs to other.herald.test",
        ),
        (
            "an older sequence",
            bundle_doc(&[&partner_ca], 4),
            "does not move past the stored 5",
        ),
        (
            "malformed JWKS",
            b"{\"keys\": [{\"use\": \"x509-svid\", \"x5c\": [\"!!\"]}], \"spiffe_sequence\": 7}"
                .to_vec(),
            "not a SPIFFE bundle",
        ),
        (
            "not JSON",
            b"<html>hello</html>".to_vec(),
            "not a SPIFFE bundle",
        ),
        ("an oversized document", huge, "too large"),
    ];
    for (what, body, why) in &hostile {
        web.serve(body.clone());
        let out = federation(&cfg, &["refresh"]);
        assert!(!out.status.success(), "{what} was accepted");
        assert!(
            stderr(&out).contains("error[federation_bundle_refused]") && stderr(&out).contains(why),
            "{what}: {}",
            stderr(&out)
        );
        assert_eq!(held_sequence(&cfg), Some(5), "{what} replaced the bundle");
    }
    // An unreachable endpoint keeps it too, and the status says so.
    web.task.abort();
    let _ = web.task.await;
    let out = federation(&cfg, &["refresh"]);
    assert!(
        stderr(&out).contains("error[federation_endpoint_unreachable]"),
        "{}",
        stderr(&out)
    );
    assert_eq!(held_sequence(&cfg), Some(5));
    let status = federation(&cfg, &["status"]);
    assert!(status.status.success(), "{}", stderr(&status));
    assert!(
        stdout(&status).contains("last error: GET"),
        "{}",
        stdout(&status)
    );
    let status = federation(&cfg, &["status", "--max-age", "0s"]);
    assert!(
        stderr(&status).contains("error[federation_stale]"),
        "{} {}",
        stdout(&status),
        stderr(&status)
    );

    // https_spiffe: the endpoint's SVID is checked against the partner's
    // bundle (now the stored one) and must carry the configured ID.
    let endpoint_id = format!("spiffe://{PARTNER}/bundle-endpoint");
    let (svid, svid_key) = leaf(&partner_issuer, Some(&endpoint_id), &[]);
    let spiffe_ep = Endpoint::start(vec![svid], svid_key).await;
    spiffe_ep.serve(bundle_doc(&[&partner_ca], 8));
    let spiffe_cfg = |name: &str, id: &str| {
        config_with(
            &site,
            name,
            &format!(
                "[[federation.trust_domains]]\ntrust_domain = \"{PARTNER}\"\nurl = \"{}\"\nprofile = \"https_spiffe\"\nendpoint_spiffe_id = \"{id}\"\n",
                spiffe_ep.url()
            ),
        )
    };
    // Not the partner's endpoint: refused (audited as such), not merely
    // unreachable.
    let wrong = spiffe_cfg("wrong-id.toml", &format!("spiffe://{PARTNER}/someone-else"));
    let out = federation(&wrong, &["refresh"]);
    assert!(
        stderr(&out).contains("error[federation_endpoint_unauthenticated]")
            && stderr(&out).contains("someone-else"),
        "{}",
        stderr(&out)
    );
    assert_eq!(held_sequence(&wrong), Some(5));
    let right = spiffe_cfg("right-id.toml", &endpoint_id);
    let out = ok(federation(&right, &["refresh"]));
    assert!(
        stdout(&out).contains("updated (spiffe_sequence 8)"),
        "{}",
        stdout(&out)
    );
    // By hand, for air-gapped partners: PEM or bundle JSON; older refused.
    let file = site.dir.path().join("partner.json");
    std::fs::write(&file, bundle_doc(&[&partner_ca], 7)).unwrap();
    let out = federation(&right, &["set", PARTNER, file.to_str().unwrap()]);
    assert!(
        stderr(&out).contains("error[federation_bundle_refused]"),
        "{}",
        stderr(&out)
    );
    // A malformed file is refused and audited like a hostile document.
    std::fs::write(&file, b"{\"keys\": 3}").unwrap();
    let out = federation(&right, &["set", PARTNER, file.to_str().unwrap()]);
    assert!(
        stderr(&out).contains("error[federation_bundle_refused]")
            && stderr(&out).contains("set by hand from"),
        "{}",
        stderr(&out)
    );
    std::fs::write(&file, bundle_doc(&[&partner_ca], 9)).unwrap();
    ok(federation(
        &right,
        &["set", PARTNER, file.to_str().unwrap()],
    ));
    // An unusable bootstrap bundle is a refusal on record, not a log line.
    let garbage = site.dir.path().join("garbage-bootstrap.pem");
    std::fs::write(&garbage, b"not a bundle").unwrap();
    let boot = config_with(
        &site,
        "bad-bootstrap.toml",
        &format!(
            "[[federation.trust_domains]]\ntrust_domain = \"boot.herald.test\"\nurl = \"{}\"\nprofile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://boot.herald.test/endpoint\"\nbootstrap_bundle = \"{}\"\n",
            spiffe_ep.url(),
            garbage.display()
        ),
    );
    let out = federation(&boot, &["refresh"]);
    assert!(
        stderr(&out).contains("error[federation_bundle_refused]")
            && stderr(&out).contains("bootstrap_bundle"),
        "{}",
        stderr(&out)
    );
    let shown = stdout(&ok(federation(&right, &["show", PARTNER, "--pem"])));
    assert_eq!(
        pem::parse_many(shown.as_bytes()).unwrap()[0].contents(),
        partner_ca.as_slice()
    );
    // Every change and refusal is in the audit log, with its code.
    let audit = stdout(&ok(site.herald(&["audit", "export", "--since", "1h"])));
    let count = |action: &str, reason: Option<&str>| {
        audit
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["action"] == action && reason.is_none_or(|r| v["reason"] == r))
            .count()
    };
    assert_eq!(count("federation.bundle_update", None), 3, "{audit}");
    // The hostile documents, the older `set`, the malformed file and the
    // unusable bootstrap bundle.
    assert_eq!(
        count(
            "federation.bundle_refused",
            Some("federation_bundle_refused")
        ),
        hostile.len() + 3,
        "{audit}"
    );
    assert_eq!(
        count(
            "federation.bundle_refused",
            Some("federation_endpoint_unauthenticated")
        ),
        1,
        "{audit}"
    );
    assert_eq!(
        count(
            "federation.fetch_failed",
            Some("federation_endpoint_unreachable")
        ),
        1,
        "{audit}"
    );
    ok(site.herald(&["audit", "verify"]));

    // Air-gapped partners (no url, set by hand) are never late for a
    // refresh: `status` says when each was set, and counts one as stale
    // only when every CA certificate in it has expired.
    let airgap = config_with(
        &site,
        "airgap.toml",
        "[[federation.trust_domains]]\ntrust_domain = \"airgap.herald.test\"\n",
    );
    let (airgap_ca, _) = spiffe_ca("airgap.herald.test");
    let airgap_file = site.dir.path().join("airgap.pem");
    std::fs::write(
        &airgap_file,
        pem::encode(&pem::Pem::new("CERTIFICATE", airgap_ca)),
    )
    .unwrap();
    ok(federation(
        &airgap,
        &["set", "airgap.herald.test", airgap_file.to_str().unwrap()],
    ));
    let status = federation(&airgap, &["status", "--max-age", "0s"]);
    assert!(
        status.status.success()
            && stdout(&status).contains("airgap.herald.test: manual (set ")
            && !stdout(&status).contains("STALE"),
        "{} {}",
        stdout(&status),
        stderr(&status)
    );
    let expired_ca = {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(vec![]).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        p.subject_alt_names = vec![SanType::URI(
            "spiffe://airgap.herald.test".try_into().unwrap(),
        )];
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        p.self_signed(&key).unwrap().der().to_vec()
    };
    std::fs::write(
        &airgap_file,
        pem::encode(&pem::Pem::new("CERTIFICATE", expired_ca)),
    )
    .unwrap();
    ok(federation(
        &airgap,
        &["set", "airgap.herald.test", airgap_file.to_str().unwrap()],
    ));
    let status = federation(&airgap, &["status"]);
    assert!(
        stderr(&status).contains("error[federation_stale]")
            && stdout(&status).contains("EXPIRED: every CA certificate expired"),
        "{} {}",
        stdout(&status),
        stderr(&status)
    );
    // The server's refresher against the dead endpoint: it retries with
    // back-off and counts every attempt, but audits the failure once (its
    // cause does not change, and the bundle is not stale for 3 minutes).
    let fetch_failed = || {
        stdout(&ok(site.herald(&["audit", "export", "--since", "1h"])))
            .lines()
            .filter(|l| l.contains("\"federation.fetch_failed\""))
            .count()
    };
    let failed_before = fetch_failed();
    let dead = config_with(
        &site,
        "dead.toml",
        &format!(
            "[federation]\nmin_refresh = \"1s\"\nmax_refresh = \"1m\"\nretry = \"1s\"\n[[federation.trust_domains]]\ntrust_domain = \"{PARTNER}\"\nurl = \"https://127.0.0.1:{}/bundle\"\nprofile = \"https_web\"\nca_file = \"{}\"\n",
            web.port,
            roots.display()
        ),
    );
    let server = common::Server::start(&dead);
    let deadline = Instant::now() + Duration::from_secs(30);
    let attempts = loop {
        let (_, metrics) = server.http_get("/metrics");
        let n = metrics
            .lines()
            .find(|l| {
                l.starts_with("herald_federation_fetches_total{")
                    && l.contains(&format!("trust_domain=\"{PARTNER}\""))
                    && l.contains("outcome=\"unreachable\"")
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or_default();
        if n >= 3 {
            break n;
        }
        assert!(Instant::now() < deadline, "{n} fetch attempts only");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop(server);
    assert_eq!(
        fetch_failed(),
        failed_before + 1,
        "{attempts} failed attempts, audited once"
    );
    assert_eq!(held_sequence(&cfg), Some(9));
    // Configuration mistakes are refused before anything is fetched.
    let own = config_with(
        &site,
        "own.toml",
        &format!(
            "[[federation.trust_domains]]\ntrust_domain = \"{TRUST_DOMAIN}\"\nurl = \"https://x\"\n"
        ),
    );
    assert!(stderr(&federation(&own, &["list"])).contains("own trust domain"));
}

/// `federation.max_refresh` of the two-domain test's servers: the longest
/// a partner's bundle change waits for the next fetch (each serves a
/// `spiffe_refresh_hint` of 300 s, which this bound overrides).
const MAX_REFRESH_SECS: u64 = 2;
/// `ca.bundle_poll` (default): how soon a replica serves a key ring change
/// made by `herald ca rotate`.
const BUNDLE_POLL_SECS: u64 = 1;

/// Herald's gauge `herald_<name>` for `td` in an OpenMetrics text.
fn gauge(metrics: &str, name: &str, td: &str) -> Option<i64> {
    metrics
        .lines()
        .find(|l| {
            l.starts_with(&format!("herald_{name}{{"))
                && l.contains(&format!("trust_domain=\"{td}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A JWT authority of a made-up issuer: its JWK (`use: jwt-svid`) and a
/// signer of ES256 tokens under it.
fn jwt_authority(kid: &str) -> (serde_json::Value, impl Fn(&serde_json::Value) -> String) {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let key = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let point = key.public_key().as_ref().to_vec();
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": kid,
        "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..65]),
    });
    let header = serde_json::json!({"alg": "ES256", "typ": "JWT", "kid": kid});
    let sign = move |claims: &serde_json::Value| {
        let input = format!(
            "{}.{}",
            b64.encode(header.to_string()),
            b64.encode(claims.to_string())
        );
        let sig = key
            .sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", b64.encode(sig.as_ref()))
    };
    (jwk, sign)
}

/// Seconds until `svid`'s certificate expires.
fn seconds_left(svid: &spiffe::X509Svid) -> i64 {
    let (_, cert) = x509_parser::parse_x509_certificate(svid.leaf().as_bytes()).unwrap();
    cert.validity().not_after.timestamp() - time::OffsetDateTime::now_utc().unix_timestamp()
}

/// py-spiffe (grpcio) against `socket`: its own SVIDs, bundles and
/// JWT-SVID for `audience`, and the partner's `foreign_jwt` validated for
/// `foreign_audience`.
fn py_spiffe(
    socket: &Path,
    audience: &str,
    foreign_jwt: &str,
    foreign_audience: &str,
) -> serde_json::Value {
    let python = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"));
    assert!(
        python.exists(),
        "run scripts/install-deps.sh first (the Python venv is missing)"
    );
    let out = ok(std::process::Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/spiffe_workload.py"
        ))
        .arg(audience)
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .env("FOREIGN_JWT", foreign_jwt)
        .env("FOREIGN_AUDIENCE", foreign_audience)
        .output()
        .unwrap());
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One Herald deployment for the two-domain test: a server whose HTTPS
/// listener is its bundle endpoint, and an agent on its own swtpm.
struct Deployment {
    td: String,
    https_port: u16,
    site: NodeSite,
    _tpm: SoftTpm,
    _server: common::Server,
    _agent: common::node::Agent,
    agent_dir: tempfile::TempDir,
}

impl Deployment {
    fn socket(&self) -> PathBuf {
        self.agent_dir.path().join("api/agent.sock")
    }

    async fn client(&self) -> spiffe::WorkloadApiClient {
        spiffe::WorkloadApiClient::connect_to(format!("unix:{}", self.socket().display()))
            .await
            .unwrap()
    }

    fn bundle_pem(&self) -> PathBuf {
        self.site.dir.path().join("data/bundle.pem")
    }
}

/// A site for `td` that federates with `partner` (whose HTTPS listener is
/// on `partner_port` and whose bundle file will be at `partner_bundle`),
/// its one workload `name` federating with it.
fn federated_site(
    tpm: &SoftTpm,
    td: &str,
    https_port: u16,
    partner: &str,
    partner_port: u16,
    partner_bundle: &Path,
    workload: &str,
) -> NodeSite {
    let federation = format!(
        "reload_interval = \"1s\"\n[ca.rotation]\npublish_ahead = \"5s\"\ncheck_interval = \"1s\"\n[federation]\nmin_refresh = \"1s\"\nmax_refresh = \"{MAX_REFRESH_SECS}s\"\nretry = \"1s\"\n[[federation.trust_domains]]\ntrust_domain = \"{partner}\"\nurl = \"https://127.0.0.1:{partner_port}/v1/bundle\"\nprofile = \"https_spiffe\"\nendpoint_spiffe_id = \"spiffe://{partner}/herald/server\"\nbootstrap_bundle = \"{}\"\n",
        partner_bundle.display()
    );
    let site = NodeSite::with_workloads(
        &[tpm],
        "1h",
        &format!("spiffe://{TRUST_DOMAIN}/node/tpm/{{ek_hash}}"),
        &federation,
        &format!("workloads:\n{workload}"),
    );
    for file in [site.config(), site.dir.path().join("policies/nodes.yaml")] {
        let text = std::fs::read_to_string(&file)
            .unwrap()
            .replace(TRUST_DOMAIN, td)
            .replacen(
                "[listen]\n",
                &format!("[listen]\nhttps = \"127.0.0.1:{https_port}\"\n"),
                1,
            );
        std::fs::write(&file, text).unwrap();
    }
    site
}

fn start_agent_for(site: &NodeSite, tpm: &SoftTpm) -> (common::node::Agent, tempfile::TempDir) {
    let agent_dir = tempfile::tempdir().unwrap();
    let config = site.agent_config(tpm, agent_dir.path());
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[workload_api]\nsocket = \"{}\"\n",
        agent_dir.path().join("api/agent.sock").display()
    ));
    std::fs::write(&config, text).unwrap();
    let agent = start_agent(&config);
    wait_status(agent_dir.path(), 60, "attested", |s| s.state == "ready");
    (agent, agent_dir)
}

/// Polls `what` until it yields, failing after `secs`.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    secs: u64,
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The X.509 authorities `client`'s Workload API gives for `td`.
async fn authorities(client: &spiffe::WorkloadApiClient, td: &str) -> Option<Vec<Vec<u8>>> {
    let set = client.fetch_x509_bundles().await.ok()?;
    let b = set.get(&spiffe::TrustDomain::new(td).unwrap())?;
    Some(
        b.authorities()
            .iter()
            .map(|a| a.as_bytes().to_vec())
            .collect(),
    )
}

/// An mTLS handshake and one exchange: `server` (chain, PKCS#8 key)
/// trusting client certificates under `server_roots`, `client` trusting
/// `client_roots` and dialling `name`. Returns the SPIFFE IDs each side
/// saw, or the handshake's error.
async fn mtls(
    server: (Vec<Vec<u8>>, Vec<u8>),
    server_roots: &[Vec<u8>],
    client: (Vec<Vec<u8>>, Vec<u8>),
    client_roots: &[Vec<u8>],
    name: &str,
) -> Result<(String, String), String> {
    let provider = || Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let store = |roots: &[Vec<u8>]| {
        let mut s = rustls::RootCertStore::empty();
        for r in roots {
            s.add(CertificateDer::from(r.clone())).unwrap();
        }
        Arc::new(s)
    };
    let certs = |c: &[Vec<u8>]| {
        c.iter()
            .cloned()
            .map(CertificateDer::from)
            .collect::<Vec<_>>()
    };
    let key = |k: &[u8]| PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(k.to_vec()));
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        store(server_roots),
        provider(),
    )
    .build()
    .unwrap();
    let server_cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&server.0), key(&server.1))
        .unwrap();
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store(client_roots))
        .with_client_auth_cert(certs(&client.0), key(&client.1))
        .unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let served = tokio::spawn(async move {
        let mut tls = acceptor.accept(b).await.map_err(|e| e.to_string())?;
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(b"world").await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(spiffe::cert::spiffe_id_from_der(&peer).unwrap().to_string())
    });
    let dialled = async {
        let mut tls = connector
            .connect(ServerName::try_from(name.to_owned()).unwrap(), a)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        assert_eq!(&buf, b"world");
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        Ok::<_, String>(spiffe::cert::spiffe_id_from_der(&peer).unwrap().to_string())
    };
    let client_saw = dialled.await;
    let server_saw = served.await.unwrap();
    Ok((client_saw?, server_saw?))
}

fn svid_parts(s: &spiffe::X509Svid) -> (Vec<Vec<u8>>, Vec<u8>) {
    (
        s.cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect(),
        s.private_key().as_bytes().to_vec(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trust_domains_federate_both_ways_and_their_workloads_complete_mtls() {
    require_tool("swtpm");
    let (ta, tb) = (SoftTpm::start().unwrap(), SoftTpm::start().unwrap());
    let (td_a, td_b) = ("a.herald.test", "b.herald.test");
    let (port_a, port_b) = (free_port(), free_port());
    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    // Each side's bootstrap bundle is the other's bundle file, copied in
    // once the other has started (as an operator would hand it over).
    let (boot_a, boot_b) = (
        dir_b.path().join("a-bundle.pem"),
        dir_a.path().join("b-bundle.pem"),
    );
    let site_a = federated_site(
        &ta,
        td_a,
        port_a,
        td_b,
        port_b,
        &boot_b,
        &format!(
            "  - spiffe_id: spiffe://{td_a}/workload/web\n    selectors: [\"unix:uid:0\"]\n    ttl: 1h\n    dns_names: [web.a.internal]\n    jwt_audiences: [api.internal]\n    federates_with: [{td_b}]\n"
        ),
    );
    let site_b = federated_site(
        &tb,
        td_b,
        port_b,
        td_a,
        port_a,
        &boot_a,
        &format!(
            "  - spiffe_id: spiffe://{td_b}/workload/api\n    selectors: [\"unix:uid:0\"]\n    ttl: 8s\n    jwt_audiences: [web.a.internal]\n    federates_with: [\"spiffe://{td_a}\"]\n"
        ),
    );
    let server_a = site_a.start();
    let server_b = site_b.start();
    std::fs::copy(site_a.dir.path().join("data/bundle.pem"), &boot_a).unwrap();
    std::fs::copy(site_b.dir.path().join("data/bundle.pem"), &boot_b).unwrap();
    let (agent_a, agent_dir_a) = start_agent_for(&site_a, &ta);
    let (agent_b, agent_dir_b) = start_agent_for(&site_b, &tb);
    let a = Deployment {
        td: td_a.into(),
        https_port: port_a,
        site: site_a,
        _tpm: ta,
        _server: server_a,
        _agent: agent_a,
        agent_dir: agent_dir_a,
    };
    let b = Deployment {
        td: td_b.into(),
        https_port: port_b,
        site: site_b,
        _tpm: tb,
        _server: server_b,
        _agent: agent_b,
        agent_dir: agent_dir_b,
    };
    let (ca, cb) = (a.client().await, b.client().await);
    // Each workload gets its own SVID and, through its agent, the other
    // domain's bundle fetched from the other's endpoint.
    let b_at_a = eventually(60, "B's bundle at A's workload", || authorities(&ca, &b.td)).await;
    let a_at_b = eventually(60, "A's bundle at B's workload", || authorities(&cb, &a.td)).await;
    assert_eq!(b_at_a, common::pem_file_certs(&b.bundle_pem()));
    assert_eq!(a_at_b, common::pem_file_certs(&a.bundle_pem()));
    let ctx = ca.fetch_x509_context().await.unwrap();
    assert!(
        ctx.bundle_set()
            .get(&spiffe::TrustDomain::new(td_b).unwrap())
            .is_some()
    );
    let web = ca.fetch_x509_svid().await.unwrap();
    let api = cb.fetch_x509_svid().await.unwrap();
    assert_eq!(
        web.spiffe_id().to_string(),
        format!("spiffe://{td_a}/workload/web")
    );
    assert_eq!(
        api.spiffe_id().to_string(),
        format!("spiffe://{td_b}/workload/api")
    );
    // A JWT-SVID bundle per trust domain too.
    let jwt = ca.fetch_jwt_bundles().await.unwrap();
    assert!(jwt.get(&spiffe::TrustDomain::new(td_b).unwrap()).is_some());

    // B's JWT-SVID is validated by A's workload with B's JWT keys.
    let api_id = spiffe::SpiffeId::new(format!("spiffe://{td_b}/workload/api")).unwrap();
    let token = cb
        .fetch_jwt_svid(["web.a.internal"], Some(&api_id))
        .await
        .unwrap();
    let validated = ca
        .validate_jwt_token("web.a.internal", token.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id(), &api_id);
    assert!(
        ca.validate_jwt_token("elsewhere", token.token())
            .await
            .is_err()
    );
    // py-spiffe (grpcio) on each side: the federated bundles, and the
    // partner's JWT-SVID validated by the agent with the partner's keys.
    let web_id = spiffe::SpiffeId::new(format!("spiffe://{td_a}/workload/web")).unwrap();
    for (side, socket, own_audience, partner, partner_jwt, audience) in [
        (
            &a,
            a.socket(),
            "api.internal",
            &api_id,
            cb.fetch_jwt_svid(["web.a.internal"], Some(&api_id))
                .await
                .unwrap(),
            "web.a.internal",
        ),
        (
            &b,
            b.socket(),
            "web.a.internal",
            &web_id,
            ca.fetch_jwt_svid(["api.internal"], Some(&web_id))
                .await
                .unwrap(),
            "api.internal",
        ),
    ] {
        let v = py_spiffe(&socket, own_audience, partner_jwt.token(), audience);
        assert_eq!(
            v["x509_bundle_domains"],
            serde_json::json!([td_a, td_b]),
            "{}: {v}",
            side.td
        );
        assert_eq!(
            v["jwt_bundle_domains"],
            serde_json::json!([td_a, td_b]),
            "{}: {v}",
            side.td
        );
        assert_eq!(
            v["foreign_validated_id"],
            partner.to_string(),
            "{}: {v}",
            side.td
        );
    }

    // File output: the partner's bundle beside the SVID.
    let files = tempfile::tempdir().unwrap();
    let out = ok(std::process::Command::new(common::herald_bin())
        .args(["workload", "fetch", "--out"])
        .arg(files.path().join("web"))
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", a.socket().display()),
        )
        .output()
        .unwrap());
    assert!(stdout(&out).contains("workload/web"), "{}", stdout(&out));
    assert_eq!(
        common::pem_file_certs(&files.path().join(format!("web/federated/{td_b}.pem"))),
        b_at_a
    );

    // mTLS across the domains: web serves, api dials.
    let own_a = authorities(&ca, &a.td).await.unwrap();
    let (client_saw, server_saw) = mtls(
        svid_parts(&web),
        &b_at_a,
        svid_parts(&api),
        &a_at_b,
        "web.a.internal",
    )
    .await
    .unwrap();
    assert_eq!(client_saw, format!("spiffe://{td_a}/workload/web"));
    assert_eq!(server_saw, format!("spiffe://{td_b}/workload/api"));

    // While B's bundle stays the same, each unchanged fetch confirms it:
    // A's staleness gauge drops back instead of growing.
    let scrape = || a._server.http_get("/metrics").1;
    let (stale_then, sequence_then) = eventually(20, "a staleness of 1 s or more", || async {
        let m = scrape();
        let age = gauge(&m, "federation_bundle_staleness_seconds", td_b)?;
        (age >= 1).then(|| (age, gauge(&m, "federation_bundle_sequence", td_b)))
    })
    .await;
    let stale_now = eventually(20, "the staleness gauge to drop", || async {
        let m = scrape();
        let age = gauge(&m, "federation_bundle_staleness_seconds", td_b)?;
        (age < stale_then).then(|| (age, gauge(&m, "federation_bundle_sequence", td_b)))
    })
    .await;
    assert_eq!(stale_now.1, sequence_then, "B's bundle changed meanwhile");
    assert!(
        scrape()
            .lines()
            .any(|l| l.starts_with("herald_federation_fetches_total{")
                && l.contains(&format!("trust_domain=\"{td_b}\""))
                && l.contains("outcome=\"unchanged\"")),
        "no unchanged fetch counted"
    );
    eprintln!(
        "federation: staleness of B's bundle at A: {stale_then} s, then {} s after an unchanged fetch",
        stale_now.0
    );

    // A third trust domain nobody federates with: A's server holds its
    // bundle (set by hand, with a JWT authority the test signs with), but
    // web's registration does not name it, so A's agent neither hands it
    // out nor accepts its SVIDs.
    let third = Site::new();
    let third_server = third.start();
    let out_dir = third.dir.path().join("svid");
    ok(third.mint(
        &third_server,
        &third.token(&format!("spiffe://{TRUST_DOMAIN}/intruder")),
        &out_dir,
    ));
    let intruder = (
        common::pem_file_certs(&out_dir.join("svid.pem")),
        pem::parse(std::fs::read(out_dir.join("svid.key")).unwrap())
            .unwrap()
            .into_contents(),
    );
    let (third_jwk, third_sign) = jwt_authority("third-1");
    let mut third_doc: serde_json::Value = serde_json::from_slice(&bundle_doc(
        &common::pem_file_certs(&third.bundle_pem())
            .iter()
            .map(Vec::as_slice)
            .collect::<Vec<_>>(),
        1,
    ))
    .unwrap();
    third_doc["keys"].as_array_mut().unwrap().push(third_jwk);
    let third_file = dir_a.path().join("third.json");
    std::fs::write(&third_file, third_doc.to_string()).unwrap();
    ok(a.site.herald(&[
        "federation",
        "set",
        TRUST_DOMAIN,
        third_file.to_str().unwrap(),
    ]));
    eventually(
        20,
        "A's server to load the third domain's bundle",
        || async {
            (gauge(&scrape(), "federation_bundle_sequence", TRUST_DOMAIN) == Some(1)).then_some(())
        },
    )
    .await;
    let third_td = spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap();
    assert!(authorities(&ca, TRUST_DOMAIN).await.is_none());
    let ctx = ca.fetch_x509_context().await.unwrap();
    assert!(ctx.bundle_set().get(&third_td).is_none());
    assert!(
        ca.fetch_jwt_bundles()
            .await
            .unwrap()
            .get(&third_td)
            .is_none()
    );
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let third_jwt = third_sign(&serde_json::json!({
        "sub": format!("spiffe://{TRUST_DOMAIN}/intruder"),
        "aud": ["web.a.internal"],
        "iat": now,
        "exp": now + 300,
    }));
    let refused = ca
        .validate_jwt_token("web.a.internal", &third_jwt)
        .await
        .expect_err("A's agent validated a JWT-SVID of an unfederated trust domain");
    assert!(
        format!("{refused:?}").contains("does not federate with it"),
        "{refused:?}"
    );
    // web trusts exactly what its Workload API gave it.
    let web_trusts: Vec<Vec<u8>> = ca
        .fetch_x509_bundles()
        .await
        .unwrap()
        .iter()
        .flat_map(|(_, b)| {
            b.authorities()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(web_trusts.len(), own_a.len() + b_at_a.len());
    let refused = mtls(
        svid_parts(&web),
        &web_trusts,
        intruder,
        &own_a,
        "web.a.internal",
    )
    .await;
    assert!(
        refused.is_err(),
        "an unfederated domain's SVID was accepted"
    );
    drop(third_server);

    // A CA rotation in B, timed from the end of `herald ca rotate` to each
    // place the new CA must reach, bounded by the configured refresh
    // bounds (not B's 300 s hint). An SVID of api's from the old CA, with
    // most of its 8 s left, must still verify at A during the overlap.
    let before = b_at_a.len();
    let api_old = eventually(30, "a fresh SVID of api's", || async {
        let s = cb.fetch_x509_svid().await.ok()?;
        (seconds_left(&s) >= 7).then_some(s)
    })
    .await;
    let sequence_before = gauge(&scrape(), "federation_bundle_sequence", td_b).unwrap();
    let endpoint_authorities = |body: &str| {
        serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| {
                v["keys"]
                    .as_array()
                    .map(|k| k.iter().filter(|k| k["use"] == "x509-svid").count())
            })
            .unwrap_or_default()
    };
    let bytes_before = b._server.http_get("/v1/bundle").1.len();
    ok(b.site.herald(&["ca", "rotate", "--kind", "x509"]));
    let rotated = Instant::now();
    let (mut at_endpoint, mut at_server, mut at_workload) = (None, None, None);
    let mut document_bytes = (bytes_before, 0);
    let b_at_a = loop {
        if at_endpoint.is_none() {
            let (status, body) = b._server.http_get("/v1/bundle");
            if status == 200 && endpoint_authorities(&body) > before {
                at_endpoint = Some(rotated.elapsed());
                document_bytes.1 = body.len();
            }
        }
        if at_server.is_none()
            && gauge(&scrape(), "federation_bundle_sequence", td_b)
                .is_some_and(|s| s > sequence_before)
        {
            at_server = Some(rotated.elapsed());
        }
        if at_workload.is_none()
            && let Some(v) = authorities(&ca, &b.td).await.filter(|v| v.len() > before)
        {
            at_workload = Some((rotated.elapsed(), v));
        }
        if let (Some(_), Some(_), Some((_, v))) = (at_endpoint, at_server, &at_workload) {
            break v.clone();
        }
        assert!(
            rotated.elapsed() < Duration::from_secs(60),
            "B's new CA did not reach A: endpoint {at_endpoint:?}, server {at_server:?}, workload {:?}",
            at_workload.as_ref().map(|(t, _)| t)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (at_endpoint, at_server, at_workload) = (
        at_endpoint.unwrap(),
        at_server.unwrap(),
        at_workload.unwrap().0,
    );
    eprintln!(
        "federation: B's bundle document: {} bytes before the rotation, {} after",
        document_bytes.0, document_bytes.1
    );
    eprintln!("federation: +0.0s `herald ca rotate --kind x509` done in B");
    eprintln!(
        "federation: +{:.1}s new CA served at B's bundle endpoint",
        at_endpoint.as_secs_f64()
    );
    eprintln!(
        "federation: +{:.1}s new CA held by A's server (fetched and reloaded)",
        at_server.as_secs_f64()
    );
    eprintln!(
        "federation: +{:.1}s new CA at A's workload (FetchX509Bundles)",
        at_workload.as_secs_f64()
    );
    // The bound: B serves it within its bundle poll; A fetches within
    // max_refresh of that and pushes at once. The slack covers a fetch,
    // a reload, the registration stream and this test's 100 ms polling on
    // a shared machine.
    let max_refresh = Duration::from_secs(MAX_REFRESH_SECS);
    let slack = Duration::from_millis(1500);
    assert!(
        at_server.saturating_sub(at_endpoint) <= max_refresh + slack,
        "A fetched B's new bundle {:?} after B served it (max_refresh {max_refresh:?})",
        at_server.saturating_sub(at_endpoint)
    );
    assert!(
        at_workload <= Duration::from_secs(BUNDLE_POLL_SECS) + max_refresh + 2 * slack,
        "B's new CA reached A's workload only after {at_workload:?}"
    );
    let new_ca: Vec<Vec<u8>> = b_at_a
        .iter()
        .filter(|c| !a_at_b.contains(c) && !common::pem_file_certs(&boot_b).contains(c))
        .cloned()
        .collect();
    assert_eq!(new_ca.len(), 1, "one new authority");
    // The overlap: api's old-CA SVID still verifies at A, and completes
    // mTLS with web trusting A's post-rotation bundle of B.
    let old_chain = svid_parts(&api_old).0;
    assert!(common::verifies(&old_chain, &new_ca).is_err());
    common::verifies(&old_chain, &b_at_a).unwrap();
    mtls(
        svid_parts(&web),
        &b_at_a,
        svid_parts(&api_old),
        &authorities(&cb, &a.td).await.unwrap(),
        "web.a.internal",
    )
    .await
    .unwrap();
    eprintln!(
        "federation: +{:.1}s api's old-CA SVID verified at A and completed mTLS (overlap)",
        rotated.elapsed().as_secs_f64()
    );
    let api = eventually(60, "api's SVID from B's new CA", || async {
        let s = cb.fetch_x509_svid().await.ok()?;
        let chain = svid_parts(&s).0;
        common::verifies(&chain, &new_ca).is_ok().then_some(s)
    })
    .await;
    eprintln!(
        "federation: +{:.1}s B's workload (api) holds an SVID from the new CA",
        rotated.elapsed().as_secs_f64()
    );
    let (client_saw, server_saw) = mtls(
        svid_parts(&web),
        &b_at_a,
        svid_parts(&api),
        &authorities(&cb, &a.td).await.unwrap(),
        "web.a.internal",
    )
    .await
    .unwrap();
    assert_eq!(
        (client_saw.as_str(), server_saw.as_str()),
        (
            format!("spiffe://{td_a}/workload/web").as_str(),
            format!("spiffe://{td_b}/workload/api").as_str()
        )
    );
    eprintln!(
        "federation: +{:.1}s mTLS across the domains ok with api on the new CA",
        rotated.elapsed().as_secs_f64()
    );
    // The fetches are audited on each side.
    let audit = stdout(&ok(a.site.herald(&["audit", "export", "--since", "1h"])));
    assert!(
        audit
            .lines()
            .filter(|l| l.contains("\"federation.bundle_update\""))
            .count()
            >= 2,
        "{audit}"
    );
    let (status, metrics) = a._server.http_get("/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("federation_bundle_staleness_seconds")
                && l.contains(&format!("trust_domain=\"{td_b}\""))),
        "{metrics}"
    );
    let list = stdout(&ok(a.site.herald(&["federation", "list", "--json"])));
    assert!(list.contains(td_b), "{list}");
    let _ = (a.https_port, b.https_port);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_endpoint_with_a_web_pki_certificate_serves_the_bundle_document() {
    use std::os::unix::fs::PermissionsExt;
    // The operator's Web PKI certificate for the endpoint (here: a test
    // root and a leaf for 127.0.0.1), its key 0600.
    let (web_root, web_issuer) = spiffe_ca("web-root.invalid");
    let (web_leaf, web_key) = leaf(&web_issuer, None, &["127.0.0.1"]);
    let files = tempfile::tempdir().unwrap();
    let (cert_file, key_file, roots) = (
        files.path().join("endpoint.pem"),
        files.path().join("endpoint.key"),
        files.path().join("roots.pem"),
    );
    std::fs::write(
        &cert_file,
        pem::encode(&pem::Pem::new("CERTIFICATE", web_leaf)),
    )
    .unwrap();
    std::fs::write(
        &key_file,
        pem::encode(&pem::Pem::new("PRIVATE KEY", web_key)),
    )
    .unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&roots, pem::encode(&pem::Pem::new("CERTIFICATE", web_root))).unwrap();
    let port = free_port();
    let site = Site::with_extra(&format!(
        "[federation.bundle_endpoint]\nlisten = \"127.0.0.1:{port}\"\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert_file.display(),
        key_file.display()
    ));
    let server = site.start();
    // A partner trust domain consumes it as https_web, trusting only the
    // operator's root.
    let partner = Site::new();
    let text = std::fs::read_to_string(partner.config()).unwrap().replacen(
        &format!("trust_domain = \"{TRUST_DOMAIN}\""),
        "trust_domain = \"partner.herald.test\"",
        1,
    );
    std::fs::write(
        partner.config(),
        format!(
            "{text}\n[[federation.trust_domains]]\ntrust_domain = \"{TRUST_DOMAIN}\"\nurl = \"https://127.0.0.1:{port}/\"\nprofile = \"https_web\"\nca_file = \"{}\"\n",
            roots.display()
        ),
    )
    .unwrap();
    std::fs::create_dir_all(partner.data_dir()).unwrap();
    let out = ok(federation(&partner.config(), &["refresh"]));
    assert!(
        stdout(&out).contains("updated (spiffe_sequence"),
        "{}",
        stdout(&out)
    );
    let shown = stdout(&ok(federation(
        &partner.config(),
        &["show", TRUST_DOMAIN, "--pem"],
    )));
    assert_eq!(
        herald_client::files::from_pem("CERTIFICATE", &shown).unwrap(),
        common::pem_file_certs(&site.bundle_pem())
    );
    drop(server);
}
