//! Several `herald server` processes on loopback sharing one PostgreSQL
//! schema: single-use evidence is single-use across replicas, a replica
//! killed under load loses no credential a client received, and a CA
//! rotation under load keeps every SVID verifiable against the bundle
//! published when it was requested.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;
use herald_client::{ClientIdentity, HeraldClient, keys};
use herald_core::{ErrorCode, Outcome};
use herald_proto::v1::exchange_token_request::Credential as Wanted;
use herald_proto::v1::exchange_token_response::Credential as Given;
use herald_proto::v1::{ExchangeTokenRequest, JwtSvidParams};
use herald_store::Store;
use herald_test_oidc::{Alg, TestIssuer};
use serde_json::Value;

const AUD: &str = "herald";

/// `n` replicas of one site on one PostgreSQL schema, each with its own
/// listeners and data directory (the datastore is all they share).
struct Cluster {
    site: Site,
    pg: PgSchema,
    servers: Vec<Option<Server>>,
}

impl Cluster {
    /// Starts the replicas at the same moment: on a fresh schema they race
    /// to migrate and to create the CA, JWT and session keys.
    fn start(n: usize, tag: &str, extra: &str) -> Cluster {
        let site = Site::with_extra(extra);
        let pg = PgSchema::new(tag);
        set_database_url(&site.config(), &pg.url);
        let text = std::fs::read_to_string(site.config()).unwrap();
        let configs: Vec<PathBuf> = (0..n)
            .map(|i| {
                let path = site.dir.path().join(format!("herald-{i}.toml"));
                let data = site.dir.path().join(format!("data-{i}"));
                let own = text.replace(
                    &format!("data_dir = \"{}\"", site.data_dir().display()),
                    &format!("data_dir = \"{}\"", data.display()),
                );
                assert_ne!(own, text, "data_dir replaced");
                std::fs::write(&path, own).unwrap();
                path
            })
            .collect();
        let servers = std::thread::scope(|s| {
            let handles: Vec<_> = configs
                .iter()
                .map(|c| s.spawn(move || Server::start(c)))
                .collect();
            handles
                .into_iter()
                .map(|h| Some(h.join().unwrap()))
                .collect()
        });
        Cluster { site, pg, servers }
    }

    fn server(&self, i: usize) -> &Server {
        self.servers[i].as_ref().unwrap()
    }

    fn urls(&self) -> Vec<String> {
        self.servers.iter().flatten().map(Server::url).collect()
    }

    /// Replica 0's bundle file (every replica writes the same bundle).
    fn anchors(&self) -> Vec<Vec<u8>> {
        let text = std::fs::read_to_string(self.site.dir.path().join("data-0/bundle.pem")).unwrap();
        herald_client::files::from_pem("CERTIFICATE", &text).unwrap()
    }

    async fn client(&self, i: usize, identity: Option<ClientIdentity>) -> HeraldClient {
        HeraldClient::connect(&self.server(i).url(), &self.anchors(), identity)
            .await
            .unwrap()
    }

    async fn store(&self) -> Store {
        Store::open(&self.pg.url).await.unwrap()
    }

    /// `herald ca status --json`: the key lines.
    fn key_ring(&self) -> Vec<Value> {
        let out = ok(self.site.herald(&["ca", "status", "--json"]));
        stdout(&out)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|v| v.get("key_id").is_some())
            .collect()
    }
}

fn mtls_identity(resp: &herald_proto::v1::X509SvidResponse, key_pkcs8: Vec<u8>) -> ClientIdentity {
    ClientIdentity {
        cert_chain: resp.cert_chain.clone(),
        key_pkcs8,
    }
}

/// A second handle on an identity (the client type holds key material and
/// is deliberately not `Clone`).
fn copy(id: &ClientIdentity) -> ClientIdentity {
    ClientIdentity {
        cert_chain: id.cert_chain.clone(),
        key_pkcs8: id.key_pkcs8.clone(),
    }
}

/// Mints an SVID with a fresh join token at replica `i`; returns an
/// identity to renew with.
async fn minted(c: &Cluster, i: usize, name: &str) -> ClientIdentity {
    let token = c.site.token(&format!("spiffe://{TRUST_DOMAIN}/w/{name}"));
    let kc = keys::generate_key_and_csr().unwrap();
    let resp = c
        .client(i, None)
        .await
        .mint_x509_svid(&token, kc.csr_der)
        .await
        .unwrap();
    mtls_identity(&resp, kc.key_pkcs8)
}

fn oidc_policy(issuer: &TestIssuer, dir: &std::path::Path) -> String {
    write_bootstrap_policy(dir);
    std::fs::write(
        dir.join("deploy.yaml"),
        format!(
            r#"name: replicas-deploy
evidence:
  oidc:
    issuer: {}
    audiences: [{AUD}]
pins:
  repository: acme/webapp
spiffe_id:
  prefix: spiffe://{TRUST_DOMAIN}/ci/
  template: "spiffe://{TRUST_DOMAIN}/ci/{{environment}}"
grants:
  jwt_svid: {{ max_ttl: 5m, audiences: [deployer, herald-introspection] }}
"#,
            issuer.issuer()
        ),
    )
    .unwrap();
    format!(
        "[policy]\ndir = \"{}\"\n[[oidc.issuers]]\nissuer = \"{}\"\naudiences = [\"{AUD}\"]\nextra_roots = \"{}\"\n",
        dir.display(),
        issuer.issuer(),
        issuer.ca_pem_path().display()
    )
}

fn jwt_request(token: &str) -> ExchangeTokenRequest {
    jwt_request_for(token, "deployer")
}

fn jwt_request_for(token: &str, audience: &str) -> ExchangeTokenRequest {
    ExchangeTokenRequest {
        subject_token: token.to_owned(),
        join_token: String::new(),
        ttl_seconds: 0,
        credential: Some(Wanted::JwtSvid(JwtSvidParams {
            audiences: vec![audience.into()],
        })),
    }
}

/// `POST /v1/introspect` of an X.509 SVID's serial at `server`.
fn introspect_x509(server: &Server, bearer: &str, serial: &str) -> Value {
    let (status, body) = server.http_post_form(
        "/v1/introspect",
        Some(bearer),
        &format!("token={serial}&token_type_hint=x509_svid"),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_use_evidence_and_revocation_hold_across_replicas() {
    let issuer = TestIssuer::start().await;
    let policies = tempfile::tempdir().unwrap();
    let c = Cluster::start(2, "single_use", &oidc_policy(&issuer, policies.path()));

    // Replicas started together on an empty schema created one key of each kind.
    let ring = c.key_ring();
    for kind in ["x509", "jwt", "session"] {
        let active = ring
            .iter()
            .filter(|k| k["kind"] == kind && k["status"] == "active")
            .count();
        assert_eq!(active, 1, "one active {kind} key: {ring:?}");
    }

    let (a, b) = (c.client(0, None).await, c.client(1, None).await);
    for round in 0..5 {
        // A join token presented to both replicas at once mints once.
        let token = c
            .site
            .token(&format!("spiffe://{TRUST_DOMAIN}/w/race{round}"));
        let (ka, kb) = (
            keys::generate_key_and_csr().unwrap(),
            keys::generate_key_and_csr().unwrap(),
        );
        let (ra, rb) = tokio::join!(
            a.mint_x509_svid(&token, ka.csr_der),
            b.mint_x509_svid(&token, kb.csr_der)
        );
        let codes: Vec<_> = [&ra, &rb]
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.code()))
            .collect();
        assert_eq!(
            codes,
            vec![Some(ErrorCode::JoinTokenUsed)],
            "round {round}: {ra:?} {rb:?}"
        );

        // The same OIDC token at both replicas at once: one JWT-SVID.
        let oidc = issuer.sign(
            Alg::RS256,
            &issuer.github_claims(AUD, "acme/webapp", "refs/heads/main", "prod"),
        );
        let (ra, rb) = tokio::join!(
            a.exchange_token(jwt_request(&oidc)),
            b.exchange_token(jwt_request(&oidc))
        );
        let codes: Vec<_> = [&ra, &rb]
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.code()))
            .collect();
        assert_eq!(codes, vec![Some(ErrorCode::TokenReplayed)], "round {round}");
        let won = if ra.is_ok() { ra } else { rb }.unwrap();
        assert!(matches!(won.credential, Some(Given::JwtSvid(_))));
    }

    // Minted at one replica, renewed at the other; revoked through the
    // shared store, refused by both.
    let token = c.site.token(&format!("spiffe://{TRUST_DOMAIN}/w/renewer"));
    let kc = keys::generate_key_and_csr().unwrap();
    let first = a.mint_x509_svid(&token, kc.csr_der).await.unwrap();
    let first_serial = first.serial.clone();
    let id = mtls_identity(&first, kc.key_pkcs8);
    let at_b = c.client(1, Some(copy(&id))).await;
    let renewed = at_b
        .renew_x509_svid(keys::generate_key_and_csr().unwrap().csr_der)
        .await
        .unwrap();
    let renewed_serial = renewed.serial.clone();
    // An unrelated identity, minted at b, stays live through the revocation.
    let other = c
        .site
        .token(&format!("spiffe://{TRUST_DOMAIN}/w/bystander"));
    let serial = at_b
        .mint_x509_svid(&other, keys::generate_key_and_csr().unwrap().csr_der)
        .await
        .unwrap()
        .serial;
    ok(c.site
        .herald(&["revoke", "--serial", &first_serial, "--reason", "test"]));
    for i in 0..2 {
        let err = c
            .client(i, Some(copy(&id)))
            .await
            .renew_x509_svid(keys::generate_key_and_csr().unwrap().csr_der)
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::SvidRevoked), "replica {i}");
    }
    // Downstream verifiers see the status at either replica (RFC 7662).
    let oidc = issuer.sign(
        Alg::RS256,
        &issuer.github_claims(AUD, "acme/webapp", "refs/heads/main", "prod"),
    );
    let bearer = match a
        .exchange_token(jwt_request_for(&oidc, "herald-introspection"))
        .await
        .unwrap()
        .credential
    {
        Some(Given::JwtSvid(j)) => j.token,
        other => panic!("{other:?}"),
    };
    for i in 0..2 {
        // The revoked SVID and its renewal (a descendant) are both revoked.
        for revoked_serial in [&first_serial, &renewed_serial] {
            let revoked = introspect_x509(c.server(i), &bearer, revoked_serial);
            assert_eq!(revoked["active"], false, "{revoked}");
            assert_eq!(revoked["revoked"], true, "{revoked}");
        }
        let live = introspect_x509(c.server(i), &bearer, &serial);
        assert_eq!(live["active"], true, "{live}");
        assert_eq!(live["sub"], format!("spiffe://{TRUST_DOMAIN}/w/bystander"));
        let unknown = introspect_x509(c.server(i), &bearer, "abcdef0123");
        assert_eq!(unknown["active"], false);
    }
    let (status, body) = c.server(0).http_post_form(
        "/v1/introspect",
        Some(&bearer),
        "token=zz&token_type_hint=x509_svid",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_request"), "{body}");

    let store = c.store().await;
    assert!(store.issued(&serial).await.unwrap().is_some());
    assert!(store.is_revoked(&first_serial).await.unwrap());
    store.verify_audit_chain(1, None).await.unwrap();
    store.close().await;
}

/// One renewal loop: renews over a connection to one replica, moving to
/// the next replica when that one stops answering.
async fn renew_until(
    urls: Arc<Vec<String>>,
    anchors: Arc<Vec<Vec<u8>>>,
    id: ClientIdentity,
    start_at: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> (Vec<String>, usize) {
    let mut received = Vec::new();
    let mut failures = 0;
    let mut at = start_at;
    let mut client = None;
    while !stop.load(Ordering::Relaxed) {
        if client.is_none() {
            match HeraldClient::connect(&urls[at % urls.len()], &anchors, Some(copy(&id))).await {
                Ok(cl) => client = Some(cl),
                Err(_) => {
                    failures += 1;
                    at += 1;
                    continue;
                }
            }
        }
        let csr = keys::generate_key_and_csr().unwrap().csr_der;
        match client.as_ref().unwrap().renew_x509_svid(csr).await {
            Ok(r) => {
                received.push(r.serial);
                done.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                // Only the dead replica's transport errors are expected.
                assert!(e.code().is_none(), "a refusal under load: {e}");
                failures += 1;
                client = None;
                at += 1;
            }
        }
    }
    (received, failures)
}

async fn wait_for(counter: &AtomicUsize, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while counter.load(Ordering::Relaxed) < n {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_under_load_loses_no_received_credential() {
    let mut c = Cluster::start(3, "kill", "");
    let urls = Arc::new(c.urls());
    let anchors = Arc::new(c.anchors());
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..6 {
        let id = minted(&c, w % 3, &format!("load{w}")).await;
        workers.push(tokio::spawn(renew_until(
            urls.clone(),
            anchors.clone(),
            id,
            w,
            stop.clone(),
            done.clone(),
        )));
    }
    wait_for(&done, 150, "load before the kill").await;
    // SIGKILL: no shutdown, whatever it had in flight is cut off.
    let mut victim = c.servers[0].take().unwrap();
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    let at_kill = done.load(Ordering::Relaxed);
    wait_for(&done, at_kill + 150, "load on the survivors").await;
    stop.store(true, Ordering::Relaxed);
    let mut received = Vec::new();
    let mut failures = 0;
    for w in workers {
        let (r, f) = w.await.unwrap();
        assert!(!r.is_empty(), "every client got credentials");
        received.extend(r);
        failures += f;
    }
    println!(
        "{} renewals received, {failures} transport failures",
        received.len()
    );

    // Every credential a client received is recorded and audited.
    let store = c.store().await;
    let report = store.verify_audit_chain(1, None).await.unwrap();
    let mut audited = HashSet::new();
    let mut after = 0;
    loop {
        let page = store.audit_records(after, 1000).await.unwrap();
        let Some(last) = page.last() else { break };
        after = last.seq;
        for r in page {
            if r.event.outcome == Outcome::Success
                && let Some(s) = r.event.serial
            {
                audited.insert(s);
            }
        }
    }
    assert_eq!(after, report.last_seq);
    for serial in &received {
        assert!(
            audited.contains(serial),
            "{serial} received but not audited"
        );
        assert!(store.issued(serial).await.unwrap().is_some());
    }
    store.close().await;
    ok(c.site.herald(&["audit", "verify"]));
    // The survivors still serve.
    minted(&c, 1, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_under_load_keeps_every_svid_verifiable() {
    let c = Cluster::start(
        2,
        "rotation",
        "bundle_poll = \"200ms\"\n[ca.rotation]\npublish_ahead = \"3s\"\ncheck_interval = \"200ms\"\n",
    );
    let before = c.key_ring();
    let old_ca = before
        .iter()
        .find(|k| k["kind"] == "x509" && k["status"] == "active")
        .unwrap()["key_id"]
        .clone();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let id = minted(&c, w % 2, &format!("rot{w}")).await;
        // Bundles come from one replica, SVIDs from the other.
        let bundle_from = c.client(w % 2, None).await;
        let renew_at = c.client((w + 1) % 2, Some(id)).await;
        let (stop, done) = (stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut serials = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let bundle = bundle_from.trust_bundle().await.unwrap();
                let csr = keys::generate_key_and_csr().unwrap().csr_der;
                let svid = renew_at.renew_x509_svid(csr).await.unwrap();
                if let Err(e) = verifies(&svid.cert_chain, &bundle.x509_authorities) {
                    panic!(
                        "SVID {} does not verify against bundle {} fetched just before: {e}",
                        svid.serial, bundle.sequence
                    );
                }
                serials.push(svid.serial);
                done.fetch_add(1, Ordering::Relaxed);
            }
            serials
        }));
    }
    wait_for(&done, 40, "load before the rotation").await;
    let out = ok(c.site.herald(&["ca", "rotate"]));
    assert!(stdout(&out).contains("x509: prepared"), "{}", stdout(&out));
    assert!(stdout(&out).contains("jwt: prepared"), "{}", stdout(&out));
    // A second rotation while one is under way changes nothing.
    let again = ok(c.site.herald(&["ca", "rotate"]));
    assert!(
        stdout(&again).contains("already prepared"),
        "{}",
        stdout(&again)
    );

    // Wait for the new CA to sign, then some more load.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ring = c.key_ring();
        let active = ring
            .iter()
            .find(|k| k["kind"] == "x509" && k["status"] == "active")
            .unwrap();
        if active["key_id"] != old_ca {
            let old = ring.iter().find(|k| k["key_id"] == old_ca).unwrap();
            assert_eq!(old["status"], "retiring", "the old CA stays published");
            assert_eq!(old["in_bundle"], true);
            break;
        }
        assert!(Instant::now() < deadline, "the prepared CA never activated");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let now = done.load(Ordering::Relaxed);
    wait_for(&done, now + 60, "load after the activation").await;
    stop.store(true, Ordering::Relaxed);
    // Which key signed each SVID, as the store recorded it.
    let store = c.store().await;
    let mut signers = HashMap::<String, usize>::new();
    for w in workers {
        for serial in w.await.unwrap() {
            let rec = store.issued(&serial).await.unwrap().unwrap();
            *signers.entry(rec.ca_key_id).or_default() += 1;
        }
    }
    store.close().await;
    assert_eq!(
        signers.len(),
        2,
        "SVIDs from the old and the new CA: {signers:?}"
    );
    assert!(signers.contains_key(old_ca.as_str().unwrap()));

    let ring = c.key_ring();
    let jwt: Vec<_> = ring.iter().filter(|k| k["kind"] == "jwt").collect();
    // The old JWT key signed nothing: it leaves the bundle after the grace
    // for replicas that had not yet reloaded.
    assert_eq!(jwt.len(), 2);
    assert!(
        jwt.iter().any(|k| k["status"] == "active")
            && jwt
                .iter()
                .any(|k| k["status"] == "retiring" || k["status"] == "retired"),
        "the JWT key rotated too: {jwt:?}"
    );
    // The rotation is audited: who prepared it, and the activations.
    let out = ok(c.site.herald(&["audit", "export"]));
    let text = stdout(&out);
    for action in [
        "ca.prepare",
        "ca.activate",
        "jwt_key.prepare",
        "jwt_key.activate",
    ] {
        assert!(text.contains(action), "audit has {action}");
    }
    ok(c.site.herald(&["audit", "verify"]));
}

/// `herald replicas --json`: the replica lines and the summary line.
fn replicas_view(c: &Cluster) -> (Vec<Value>, Value) {
    let out = ok(c.site.herald(&["replicas", "--json"]));
    let mut lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect();
    let summary = lines.pop().unwrap();
    (lines, summary)
}

/// Waits until `herald replicas` says both replicas are live, serve bundle
/// sequence `seq` and one policy set other than `not_digest`; returns it.
async fn wait_in_sync(c: &Cluster, seq: u64, not_digest: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (lines, summary) = replicas_view(c);
        let live: Vec<&Value> = lines.iter().filter(|l| l["live"] == true).collect();
        if summary["in_sync"] == true
            && summary["bundle_sequence"] == seq
            && live.len() == 2
            && live[0]["policy_digest"] != not_digest
        {
            assert!(live.iter().all(|l| l["bundle_sequence"] == seq));
            return live[0]["policy_digest"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "replicas not in sync on sequence {seq} after 15 s: {lines:?} {summary}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_report_what_they_serve_and_catch_up_within_seconds() {
    let issuer = TestIssuer::start().await;
    let policies = tempfile::tempdir().unwrap();
    let extra = format!(
        "bundle_poll = \"200ms\"\n{}",
        oidc_policy(&issuer, policies.path()).replacen(
            "[policy]\n",
            "[policy]\nreload_interval = \"200ms\"\n",
            1
        )
    );
    let c = Cluster::start(2, "heartbeat", &extra);

    // Both replicas recorded themselves, serving the database's bundle and
    // one (non-empty) policy set; `--check` agrees.
    let (lines, summary) = replicas_view(&c);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let seq = summary["bundle_sequence"].as_u64().unwrap();
    let digest = wait_in_sync(&c, seq, "").await;
    assert_eq!(digest.len(), 64);
    let table = stdout(&ok(c.site.herald(&["replicas", "--check"])));
    assert!(
        table.contains(&format!(
            "in sync: 2 live replica(s) serve bundle sequence {seq}"
        )),
        "{table}"
    );
    let ids: HashSet<&str> = lines
        .iter()
        .map(|l| l["replica_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);

    // A rotation made by the CLI (not by either replica): both pick up the
    // new bundle within seconds, and say so.
    ok(c.site.herald(&["ca", "rotate", "--kind", "x509"]));
    let digest = wait_in_sync(&c, seq + 1, "").await;

    // A policy change: both reload it and report the same new set.
    let file = policies.path().join("deploy.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, format!("# reviewed\n{text}")).unwrap();
    let changed = wait_in_sync(&c, seq + 1, &digest).await;
    assert_ne!(changed, digest);
}
