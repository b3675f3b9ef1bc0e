//! The SPIFFE Workload API on the agent, end to end: real swtpm, real
//! server and agent binaries, and the Rust `spiffe` crate's client (written
//! by nobody here) as the workload. Covers X.509 SVIDs, bundles, JWT-SVIDs
//! and their validation, rotation pushed on an open stream, an mTLS
//! handshake between two workloads, per-uid identities, the file output,
//! and the refusals.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::node::{NodeSite, raw_client, start_agent, wait_status, with_header, x509_ids};
use common::{TRUST_DOMAIN, extend_section, herald_bin, ok, require_tool, stdout, verifies};
use futures::StreamExt;
use herald_test_tpm::SoftTpm;
use spiffe::WorkloadApiClient;

const NOBODY: u32 = 65534;

const ROLE: &str = "arn:aws:iam::123456789012:role/reports";

fn workloads(test_exe: &Path) -> String {
    format!(
        r#"  cloud:
    - role_arn: {ROLE}
      max_ttl: 1h
      scope: {{ Version: "2012-10-17", Statement: [{{ Effect: Allow, Action: ["s3:GetObject"], Resource: ["arn:aws:s3:::reports/*"] }}] }}
workloads:
  - spiffe_id: spiffe://{TRUST_DOMAIN}/workload/web
    selectors: ["unix:uid:0", "unix:path:{}"]
    ttl: 8s
    dns_names: [web.internal]
    jwt_audiences: [api.internal]
    hint: web
  - spiffe_id: spiffe://{TRUST_DOMAIN}/workload/db
    selectors: ["unix:gid:0"]
    ttl: 1h
    hint: db
  - spiffe_id: spiffe://{TRUST_DOMAIN}/workload/nobody
    selectors: ["unix:uid:{NOBODY}"]
    ttl: 1h
  - spiffe_id: spiffe://{TRUST_DOMAIN}/workload/reports
    selectors: ["unix:uid:0"]
    ttl: 1h
    hint: reports
    cloud_role: {ROLE}
  - spiffe_id: spiffe://{TRUST_DOMAIN}/workload/cli
    selectors: ["unix:uid:0", "unix:path:{}"]
    ttl: 6s
    hint: cli
"#,
        test_exe.display(),
        std::fs::canonicalize(herald_bin()).unwrap().display()
    )
}

/// The credentials endpoint's authorization token in every rig.
const TOKEN: &str = "s3cr3t-token-0123456789";

struct Rig {
    _tpm: SoftTpm,
    site: NodeSite,
    _server: common::Server,
    _agent: common::node::Agent,
    agent_dir: tempfile::TempDir,
    socket: std::path::PathBuf,
    credentials_port: u16,
}

fn rig() -> Rig {
    rig_with("", "")
}

/// A rig whose server has `ca` added to its `[ca]` section and `extra`
/// appended to its configuration.
fn rig_with(ca: &str, extra: &str) -> Rig {
    rig_opts(Opts {
        ca,
        server_extra: extra,
        ..Opts::default()
    })
}

/// What a rig may add to the defaults.
#[derive(Default)]
struct Opts<'a> {
    /// Added to the server's `[ca]` section.
    ca: &'a str,
    /// Appended to the server's configuration.
    server_extra: &'a str,
    /// Registrations appended to the node policy's `workloads:`.
    workloads: &'a str,
    /// Added to the agent's `[workload_api]` table.
    workload_api: &'a str,
    /// Added to the agent's `[credentials_endpoint]` table.
    credentials_endpoint: &'a str,
}

fn rig_opts(o: Opts<'_>) -> Rig {
    require_tool("swtpm");
    let (ca, extra) = (o.ca, o.server_extra);
    let tpm = SoftTpm::start().unwrap();
    let exe = std::env::current_exe().unwrap();
    let site = NodeSite::with_workloads(
        &[&tpm],
        "1h",
        &format!("spiffe://{TRUST_DOMAIN}/node/tpm/{{ek_hash}}"),
        &format!("reload_interval = \"1s\"\n{extra}"),
        &format!("{}{}", workloads(&exe), o.workloads),
    );
    extend_section(&site.config(), "ca", ca);
    let server = site.start();
    let agent_dir = tempfile::tempdir().unwrap();
    {
        // Other uids must reach the socket: the directory is traversable.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(agent_dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let config = site.agent_config(&tpm, agent_dir.path());
    let socket = agent_dir.path().join("api/agent.sock");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[workload_api]\nsocket = \"{}\"\n{}\n",
        socket.display(),
        o.workload_api
    ));
    let credentials_port = common::node::free_port();
    let token_file = agent_dir.path().join("ecs-token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    text.push_str(&format!(
        "[credentials_endpoint]\nlisten = \"127.0.0.1:{credentials_port}\"\nauthorization_token_file = \"{}\"\n{}\n",
        token_file.display(),
        o.credentials_endpoint
    ));
    std::fs::write(&config, text).unwrap();
    let agent = start_agent(&config);
    wait_status(agent_dir.path(), 60, "attested", |s| s.state == "ready");
    Rig {
        _tpm: tpm,
        site,
        _server: server,
        _agent: agent,
        agent_dir,
        socket,
        credentials_port,
    }
}

async fn client(socket: &Path) -> WorkloadApiClient {
    WorkloadApiClient::connect_to(format!("unix:{}", socket.display()))
        .await
        .unwrap()
}

/// Client-side TCP sockets on this host to `port`, in every state but
/// listening: a client that connects for each call leaves one behind in
/// TIME_WAIT each time.
fn client_connections_to(port: u16) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    let remote = f.get(2).and_then(|r| r.rsplit(':').next());
                    remote.and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
                        && f.get(3) != Some(&"0A")
                })
                .count()
        })
        .sum()
}

/// A copy of the executable at `path` that other uids can run: the build
/// tree may sit in a directory only its owner can enter (`mktemp -d`).
fn executable_by_other_users(path: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let copy = dir.path().join("herald");
    std::fs::copy(path, &copy).unwrap();
    std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    (dir, copy)
}

fn id(s: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/workload/{s}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_get_svids_bundles_and_jwts_through_the_spiffe_crate() {
    let rig = rig();
    let c = client(&rig.socket).await;

    // X.509: this process (uid 0, gid 0, this executable) matches web and db.
    let svids = c.fetch_all_x509_svids().await.unwrap();
    let mut ids: Vec<String> = svids.iter().map(|s| s.spiffe_id().to_string()).collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![id("db"), id("reports"), id("web")],
        "the cli registration is the herald binary's, not this test's"
    );
    let web = svids.iter().find(|s| s.hint() == Some("web")).unwrap();
    assert_eq!(web.spiffe_id().to_string(), id("web"));
    // The leaf names the workload and its DNS name, and chains to the bundle.
    let bundles = c.fetch_x509_bundles().await.unwrap();
    let td = spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap();
    let bundle = bundles.get(&td).unwrap();
    assert!(!bundle.authorities().is_empty());
    let dir = tempfile::tempdir().unwrap();
    let leaf = dir.path().join("leaf.der");
    std::fs::write(&leaf, web.leaf().as_bytes()).unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(
        &ca,
        herald_client::files::to_pem(
            "CERTIFICATE",
            &bundle
                .authorities()
                .iter()
                .map(|a| a.as_bytes().to_vec())
                .collect::<Vec<_>>(),
        ),
    )
    .unwrap();
    let out = Command::new("openssl")
        .args([
            "x509",
            "-inform",
            "der",
            "-noout",
            "-ext",
            "subjectAltName",
            "-in",
        ])
        .arg(&leaf)
        .output()
        .unwrap();
    let san = String::from_utf8_lossy(&out.stdout);
    assert!(
        san.contains(&format!("URI:{}", id("web"))) && san.contains("DNS:web.internal"),
        "{san}"
    );
    let pem = dir.path().join("leaf.pem");
    std::fs::write(
        &pem,
        herald_client::files::to_pem("CERTIFICATE", &[web.leaf().as_bytes().to_vec()]),
    )
    .unwrap();
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(&ca)
        .arg(&pem)
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // JWT-SVIDs: for an allowed audience, validated by the agent; an
    // audience the registration does not allow is refused.
    let web_id = spiffe::SpiffeId::new(id("web")).unwrap();
    let jwt = c
        .fetch_jwt_svid(["api.internal"], Some(&web_id))
        .await
        .unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), id("web"));
    assert_eq!(jwt.audience(), ["api.internal".to_string()]);
    let again = c
        .fetch_jwt_svid(["api.internal"], Some(&web_id))
        .await
        .unwrap();
    assert_eq!(
        again.token(),
        jwt.token(),
        "JWT-SVIDs are cached until near expiry"
    );
    let checked = c
        .validate_jwt_token("api.internal", jwt.token())
        .await
        .unwrap();
    assert_eq!(checked.spiffe_id().to_string(), id("web"));
    assert!(
        c.validate_jwt_token("other-audience", jwt.token())
            .await
            .is_err()
    );
    assert!(
        c.fetch_jwt_svid(["not-allowed"], Some(&web_id))
            .await
            .is_err()
    );
    // Extra header fields, a forged signature, an unknown key: all refused.
    let parts: Vec<&str> = jwt.token().split('.').collect();
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut header: serde_json::Value =
        serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    header["x5u"] = serde_json::json!("https://evil.example/keys");
    let extra = format!(
        "{}.{}.{}",
        b64.encode(header.to_string()),
        parts[1],
        parts[2]
    );
    assert!(c.validate_jwt_token("api.internal", &extra).await.is_err());
    let mut sig = b64.decode(parts[2]).unwrap();
    sig[10] ^= 1;
    let forged = format!("{}.{}.{}", parts[0], parts[1], b64.encode(sig));
    assert!(c.validate_jwt_token("api.internal", &forged).await.is_err());
    let mut header: serde_json::Value =
        serde_json::from_slice(&b64.decode(parts[0]).unwrap()).unwrap();
    header["kid"] = serde_json::json!("no-such-key");
    let unknown = format!(
        "{}.{}.{}",
        b64.encode(header.to_string()),
        parts[1],
        parts[2]
    );
    assert!(
        c.validate_jwt_token("api.internal", &unknown)
            .await
            .is_err()
    );
    let jwt_bundles = c.fetch_jwt_bundles().await.unwrap();
    assert!(jwt_bundles.get(&td).is_some());

    // Rotation: the 8 s web SVID is replaced on the open stream — over
    // the agent's one connection to the server, not one per renewal (the
    // 6 s cli SVID renews meanwhile too).
    let connections = client_connections_to(rig.site.grpc_port);
    let mut stream = c.stream_x509_svids().await.unwrap();
    let first = stream.next().await.unwrap().unwrap();
    let serial_of = |s: &spiffe::X509Svid| s.leaf().as_bytes().to_vec();
    let before = serial_of(&first);
    let rotated = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let next = stream.next().await.unwrap().unwrap();
            if next.spiffe_id().to_string() == id("web") && serial_of(&next) != before {
                return next;
            }
        }
    })
    .await
    .expect("no rotation pushed within 30 s");
    assert_eq!(rotated.spiffe_id().to_string(), id("web"));
    assert!(
        client_connections_to(rig.site.grpc_port) <= connections,
        "renewals opened connections of their own: {connections} before, {} after",
        client_connections_to(rig.site.grpc_port)
    );

    // A registration added to the policy reaches the open stream within
    // seconds (policy reload → registration stream → agent → workload).
    let policy = rig.site.dir.path().join("policies/nodes.yaml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(&format!(
        "  - spiffe_id: {}\n    selectors: [\"unix:uid:0\"]\n    ttl: 1h\n",
        id("late")
    ));
    std::fs::write(&policy, text).unwrap();
    let mut contexts = c.stream_x509_contexts().await.unwrap();
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let ctx = contexts.next().await.unwrap().unwrap();
            if ctx
                .svids()
                .iter()
                .any(|s| s.spiffe_id().to_string() == id("late"))
            {
                return;
            }
        }
    })
    .await
    .expect("the new registration did not arrive within 20 s");
    drop(rig);
}

/// Issue 6: workloads receive a new CA in their bundle before any SVID it
/// signed, and keep the old CA while SVIDs it signed are still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workloads_get_the_new_ca_before_any_svid_it_signed() {
    let rig = rig_with(
        "bundle_poll = \"200ms\"\n",
        "[ca.rotation]\npublish_ahead = \"3s\"\ncheck_interval = \"200ms\"\n",
    );
    let c = client(&rig.socket).await;
    let td = spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap();
    let authorities = |ctx: &spiffe::X509Context| -> Vec<Vec<u8>> {
        ctx.bundle_set()
            .get(&td)
            .expect("a bundle for the trust domain")
            .authorities()
            .iter()
            .map(|a| a.as_bytes().to_vec())
            .collect()
    };
    let chain_of = |s: &spiffe::X509Svid| -> Vec<Vec<u8>> {
        s.cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect()
    };
    let mut contexts = c.stream_x509_contexts().await.unwrap();
    let first = contexts.next().await.unwrap().unwrap();
    let old = authorities(&first);
    assert_eq!(old.len(), 1, "one CA before the rotation");

    let out = ok(rig.site.herald(&["ca", "rotate", "--kind", "x509"]));
    assert!(stdout(&out).contains("x509: prepared"), "{}", stdout(&out));

    // Every update: each SVID verifies against the bundle it came with.
    // Note the first update publishing the new CA and the first carrying
    // an SVID it signed (the 8 s web SVID is renewed every few seconds).
    let (mut published, mut signed) = (None, None);
    let mut update = 0usize;
    tokio::time::timeout(Duration::from_secs(60), async {
        while signed.is_none() {
            let ctx = contexts.next().await.unwrap().unwrap();
            update += 1;
            let anchors = authorities(&ctx);
            assert!(
                old.iter().all(|a| anchors.contains(a)),
                "update {update}: the old CA left the bundle while its SVIDs are served"
            );
            let new: Vec<Vec<u8>> = anchors
                .iter()
                .filter(|a| !old.contains(a))
                .cloned()
                .collect();
            if !new.is_empty() && published.is_none() {
                published = Some(update);
            }
            for svid in ctx.svids() {
                let chain = chain_of(svid);
                if let Err(e) = verifies(&chain, &anchors) {
                    panic!(
                        "update {update}: {} does not verify against its bundle: {e}",
                        svid.spiffe_id()
                    );
                }
                if !new.is_empty() && verifies(&chain, &new).is_ok() {
                    signed = Some(update);
                }
            }
        }
    })
    .await
    .expect("no SVID signed by the new CA within 60 s");
    let (published, signed) = (published.unwrap(), signed.unwrap());
    assert!(
        published < signed,
        "the new CA was published in update {published}, first used in update {signed}"
    );
    drop(rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workloads_complete_an_mtls_handshake_with_their_svids() {
    let rig = rig();
    let c = client(&rig.socket).await;
    let svids = c.fetch_all_x509_svids().await.unwrap();
    let web = svids
        .iter()
        .find(|s| s.hint() == Some("web"))
        .unwrap()
        .clone();
    let db = svids
        .iter()
        .find(|s| s.hint() == Some("db"))
        .unwrap()
        .clone();
    let td = spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap();
    let bundle = c.fetch_x509_bundles().await.unwrap().get(&td).unwrap();
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for a in bundle.authorities() {
        roots
            .add(CertificateDer::from(a.as_bytes().to_vec()))
            .unwrap();
    }
    let roots = Arc::new(roots);
    let chain = |s: &spiffe::X509Svid| {
        s.cert_chain()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect::<Vec<_>>()
    };
    let key = |s: &spiffe::X509Svid| {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            s.private_key().as_bytes().to_vec(),
        ))
    };
    // The server is web (its SVID carries web.internal), the client db:
    // each verifies the other against the bundle and sees its SPIFFE ID.
    let _ = (&roots, &provider);
    let client_verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new({
            let mut r = rustls::RootCertStore::empty();
            for a in bundle.authorities() {
                r.add(CertificateDer::from(a.as_bytes().to_vec())).unwrap();
            }
            r
        }),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .build()
    .unwrap();
    let server_cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_client_cert_verifier(client_verifier)
    .with_single_cert(chain(&web), key(&web))
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for a in bundle.authorities() {
        roots
            .add(CertificateDer::from(a.as_bytes().to_vec()))
            .unwrap();
    }
    let client_cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(chain(&db), key(&db))
    .unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_cfg));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_cfg));
    let server = tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tls = acceptor.accept(b).await.unwrap();
        let peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.unwrap();
        tls.write_all(b"world").await.unwrap();
        tls.flush().await.unwrap();
        (
            spiffe::cert::spiffe_id_from_der(&peer).unwrap().to_string(),
            buf,
        )
    });
    let mut tls = connector
        .connect(ServerName::try_from("web.internal").unwrap(), a)
        .await
        .unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    tls.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"world");
    let server_peer = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    assert_eq!(
        spiffe::cert::spiffe_id_from_der(&server_peer)
            .unwrap()
            .to_string(),
        id("web")
    );
    let (client_seen, got) = server.await.unwrap();
    assert_eq!(client_seen, id("db"));
    assert_eq!(&got, b"hello");
    drop(rig);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_follow_the_caller_and_refusals_are_typed() {
    require_tool("openssl");
    let rig = rig();
    let herald = herald_bin();
    let socket = rig.socket.to_str().unwrap().to_owned();

    // Another uid gets its own identity only (the `herald workload fetch`
    // client, run as nobody).
    use std::os::unix::process::CommandExt;
    let (_bin_dir, herald_for_others) = executable_by_other_users(herald);
    let out = Command::new(&herald_for_others)
        .args(["workload", "fetch", "--socket", &socket])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.starts_with(&id("nobody")), "{text}");
    // Root running the herald binary (not the test executable): db and
    // reports (uid/gid 0) and cli (the herald executable), not web.
    let text = stdout(&ok(Command::new(herald)
        .args(["workload", "fetch", "--socket", &socket])
        .output()
        .unwrap()));
    assert_eq!(
        text.trim(),
        format!(
            "{}\tdb\n{}\treports\n{}\tcli",
            id("db"),
            id("reports"),
            id("cli")
        )
    );
    // A uid with no registration: PermissionDenied.
    let out = Command::new(&herald_for_others)
        .args(["workload", "fetch", "--socket", &socket])
        .uid(4242)
        .gid(4242)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no identity issued"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Missing security header: InvalidArgument (a raw client without it).
    let channel = tonic::transport::Endpoint::from_static("http://x")
        .connect_with_connector(tower::service_fn({
            let socket = rig.socket.clone();
            move |_| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }
        }))
        .await
        .unwrap();
    let mut raw =
        herald_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel);
    let err = raw
        .fetch_x509svid(herald_proto::workload::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Malformed: a JWT request without an audience.
    let mut req = tonic::Request::new(herald_proto::workload::JwtsvidRequest::default());
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    assert_eq!(
        raw.fetch_jwtsvid(req).await.unwrap_err().code(),
        tonic::Code::InvalidArgument
    );

    // The file output: svid.pem / svid.key (0600) / bundle.pem that
    // openssl verifies, rewritten on rotation (the cli SVID lives 6 s) with
    // the reload command run each time.
    let files = tempfile::tempdir().unwrap();
    let marker = files.path().join("reloads");
    let mut watch = Command::new(herald)
        .args([
            "workload", "fetch", "--socket", &socket, "--select", "cli", "--watch", "--out",
        ])
        .arg(files.path().join("cli"))
        .arg("--reload")
        .arg(format!("echo reloaded >> {}", marker.display()))
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let reloads = || {
        std::fs::read_to_string(&marker)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let mut first_serial = None;
    while reloads() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "no rotation reload within 30 s"
        );
        if first_serial.is_none() && reloads() == 1 {
            first_serial = std::fs::read(files.path().join("cli/svid.pem")).ok();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rotated = std::fs::read(files.path().join("cli/svid.pem")).unwrap();
    assert_ne!(
        Some(rotated),
        first_serial,
        "the files were rewritten with the new SVID"
    );
    let _ = watch.kill();
    let _ = watch.wait();
    use std::os::unix::fs::PermissionsExt;
    let key = files.path().join("cli/svid.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let v = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(files.path().join("cli/bundle.pem"))
        .arg(files.path().join("cli/svid.pem"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));

    // The server side: a node asking for an ID not registered to it.
    let node =
        herald_client::files::read_svid_dir(&rig.agent_dir.path().join("state/node")).unwrap();
    let bundle = herald_client::files::read_svid_dir(&rig.agent_dir.path().join("state/node"))
        .unwrap()
        .bundle;
    let hc = herald_client::HeraldClient::connect(
        &format!("https://127.0.0.1:{}", rig.site.grpc_port),
        &bundle,
        Some(herald_client::ClientIdentity {
            cert_chain: node.cert_chain.clone(),
            key_pkcs8: node.key_pkcs8.clone(),
        }),
    )
    .await
    .unwrap();
    let mut ws =
        herald_proto::v1::workload_service_client::WorkloadServiceClient::new(hc.channel());
    let k = herald_client::keys::generate_key_and_csr().unwrap();
    let resp = ws
        .batch_new_x509_svids(herald_proto::v1::BatchNewX509SvidsRequest {
            requests: vec![
                herald_proto::v1::WorkloadSvidRequest {
                    spiffe_id: format!("spiffe://{TRUST_DOMAIN}/workload/not-mine"),
                    csr: k.csr_der.clone(),
                },
                herald_proto::v1::WorkloadSvidRequest {
                    spiffe_id: id("db"),
                    csr: k.csr_der,
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.results[0].error_code, "workload_not_registered");
    assert!(resp.results[1].svid.is_some());
    // A workload's own SVID is no node: it cannot ask for others.
    let svids = client(&rig.socket)
        .await
        .fetch_all_x509_svids()
        .await
        .unwrap();
    let db = svids.iter().find(|s| s.hint() == Some("db")).unwrap();
    let as_workload = herald_client::HeraldClient::connect(
        &format!("https://127.0.0.1:{}", rig.site.grpc_port),
        &bundle,
        Some(herald_client::ClientIdentity {
            cert_chain: db
                .cert_chain()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect(),
            key_pkcs8: db.private_key().as_bytes().to_vec(),
        }),
    )
    .await
    .unwrap();
    let err = herald_proto::v1::workload_service_client::WorkloadServiceClient::new(
        as_workload.channel(),
    )
    .batch_new_x509_svids(herald_proto::v1::BatchNewX509SvidsRequest { requests: vec![] })
    .await
    .unwrap_err();
    assert_eq!(
        herald_client::ClientError::from(err).code(),
        Some(herald_core::ErrorCode::NodeUnknown)
    );

    // A banned node's agent: the server refuses it, the refusal is audited.
    let node_id = wait_status(rig.agent_dir.path(), 5, "ready", |s| s.spiffe_id.is_some())
        .spiffe_id
        .unwrap();
    // Its open registration stream ends with node_banned soon after the
    // ban (every replica polls the ban sequence each `ca.bundle_poll`, 1 s).
    let mut sync = ws
        .sync_registrations(herald_proto::v1::SyncRegistrationsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(sync.message().await.unwrap().is_some(), "the first set");
    ok(rig.site.herald(&["node", "ban", &node_id]));
    let ended = tokio::time::timeout(Duration::from_secs(5), sync.message())
        .await
        .expect("the banned node's registration stream is still open after 5 s")
        .unwrap_err();
    assert_eq!(
        herald_client::ClientError::from(ended).code(),
        Some(herald_core::ErrorCode::NodeBanned)
    );
    let err = ws
        .batch_new_x509_svids(herald_proto::v1::BatchNewX509SvidsRequest { requests: vec![] })
        .await
        .unwrap_err();
    let code = herald_client::ClientError::from(err).code();
    assert!(
        matches!(
            code,
            Some(herald_core::ErrorCode::SvidRevoked | herald_core::ErrorCode::NodeBanned)
        ),
        "{code:?}"
    );
    let audit = stdout(&ok(rig.site.herald(&["audit", "export", "--since", "1h"])));
    assert!(
        audit.contains("workload_not_registered") && audit.contains("node_unknown"),
        "{audit}"
    );
}

#[test]
fn an_aws_sdk_reads_scoped_credentials_from_the_container_endpoint() {
    require_tool("curl");
    let rig = rig();
    let python = venv_python();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/container_credentials.py"
    );
    let run = |path: &str, token: &str| {
        let mut c = Command::new(&python);
        c.arg(script)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", "/nonexistent")
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env(
                "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                format!("http://127.0.0.1:{}{path}", rig.credentials_port),
            )
            .env("AWS_CONTAINER_AUTHORIZATION_TOKEN", token);
        c.output().unwrap()
    };
    let out = run("/v1/credentials", TOKEN);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["method"], "container-role");
    assert!(v["access_key"].as_str().unwrap().starts_with("ASIA"), "{v}");
    assert_eq!(v["has_secret"], true);
    assert!(v["token_len"].as_u64().unwrap() > 100);
    // By hint too; and a second read is served from the agent's cache.
    let again = run("/v1/credentials/reports", TOKEN);
    let w: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(w["access_key"], v["access_key"]);
    // A wrong token, or a uid with no cloud role: no credentials.
    assert!(!run("/v1/credentials", "wrong").status.success());
    // (curl as nobody: root's Python is not readable by other users.)
    let status_as = |uid: u32| {
        use std::os::unix::process::CommandExt;
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("Authorization: {TOKEN}"))
            .arg(format!(
                "http://127.0.0.1:{}/v1/credentials",
                rig.credentials_port
            ))
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(status_as(NOBODY), "403");
    assert_eq!(status_as(0), "200");
    // The issuance is audited as the workload's, under the node's policy.
    let audit = stdout(&ok(rig.site.herald(&["audit", "export", "--since", "1h"])));
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"cloud_credentials.workload\"")
                && l.contains(&id("reports"))
                && l.contains("\"success\"")),
        "{audit}"
    );
}

/// The repository's venv Python (scripts/install-deps.sh makes it).
fn venv_python() -> std::path::PathBuf {
    let python = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.venv/bin/python"));
    assert!(
        python.exists(),
        "run scripts/install-deps.sh first (the Python venv is missing)"
    );
    python
}

#[test]
fn grpcio_clients_get_svids_bundles_jwts_reflection_and_sds() {
    let python = venv_python();
    // The interpreter the venv runs, as /proc/<pid>/exe names it.
    let interpreter = std::fs::canonicalize(&python).unwrap();
    let workloads = format!(
        "  - spiffe_id: spiffe://{TRUST_DOMAIN}/workload/python\n    selectors: [\"unix:uid:0\", \"unix:path:{}\"]\n    ttl: 1h\n    jwt_audiences: [api.internal]\n    hint: python\n",
        interpreter.display()
    );
    let rig = rig_opts(Opts {
        workloads: &workloads,
        ..Opts::default()
    });
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/python/spiffe_workload.py"
    );
    // Both forms SPIFFE_ENDPOINT_SOCKET takes; grpcio sends the path,
    // percent-encoded, as the HTTP/2 :authority.
    for form in [
        format!("unix://{}", rig.socket.display()),
        format!("unix:{}", rig.socket.display()),
    ] {
        let out = Command::new(&python)
            .arg(script)
            .env("SPIFFE_ENDPOINT_SOCKET", &form)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{form}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let ids: Vec<&str> = v["x509_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_str().unwrap())
            .collect();
        assert!(ids.contains(&id("python").as_str()), "{form}: {v}");
        assert!(!ids.contains(&id("web").as_str()), "{form}: {v}");
        assert_eq!(v["x509_bundle_domains"], serde_json::json!([TRUST_DOMAIN]));
        assert!(v["x509_authorities"].as_u64().unwrap() >= 1, "{v}");
        assert_eq!(v["jwt_id"], id("python"));
        assert_eq!(v["jwt_audience"], serde_json::json!(["api.internal"]));
        assert_eq!(v["jwt_bundle_domains"], serde_json::json!([TRUST_DOMAIN]));
        assert_eq!(v["validated_id"], id("python"));
    }
    // Reflection, v1alpha and v1, through grpcio.
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/reflection_clients.py"
        ))
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix:{}", rig.socket.display()),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for key in ["v1alpha_services", "v1_services"] {
        assert!(
            v[key]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s == "SpiffeWorkloadAPI"),
            "{key}: {v}"
        );
    }
    assert!(
        v["v1alpha_methods"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "FetchX509SVID"),
        "{v}"
    );
    // Envoy's SDS through Envoy's own API types over grpcio.
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/python/envoy_sds.py"
        ))
        .arg(&rig.socket)
        .arg(id("python"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let first = &v["first"];
    assert_eq!(first["version"], "1", "{v}");
    assert_eq!(first["secrets"][id("python")]["certificates"], 1, "{v}");
    assert_eq!(first["secrets"][id("python")]["private_key"], true, "{v}");
    assert_eq!(
        first["secrets"]["ROOTCA"],
        serde_json::json!({ "validator": "envoy.tls.cert_validator.spiffe", "trust_domains": [TRUST_DOMAIN] }),
        "{v}"
    );
    let second = &v["second"];
    assert_eq!(second["version"], "2", "{v}");
    assert_ne!(second["nonce"], first["nonce"], "{v}");
    assert!(
        second["secrets"]["default"]["certificates"]
            .as_u64()
            .unwrap()
            >= 1,
        "{v}"
    );
    assert_eq!(
        second["secrets"]["ALL"]["trust_domains"],
        serde_json::json!([TRUST_DOMAIN]),
        "{v}"
    );
    assert!(
        v["fetch"]["secrets"]["ROOTCA"]["trusted_ca"]
            .as_u64()
            .unwrap()
            >= 1,
        "{v}"
    );
    assert_eq!(v["foreign"], "INVALID_ARGUMENT", "{v}");
    // And a raw HTTP/2 client naming the socket path as its authority.
    let bundles = raw_h2_fetch_jwt_bundles(&rig.socket);
    assert!(
        bundles
            .windows(TRUST_DOMAIN.len())
            .any(|w| w == TRUST_DOMAIN.as_bytes()),
        "FetchJWTBundles answered {} bytes without the trust domain",
        bundles.len()
    );
}

/// FetchJWTBundles over a hand-written HTTP/2 connection whose
/// `:authority` is the socket path, percent-encoded, as grpc-core,
/// grpc-java and grpc-swift send it. Returns the first response message's
/// bytes; panics on a stream reset.
fn raw_h2_fetch_jwt_bundles(socket: &Path) -> Vec<u8> {
    use std::io::{Read, Write};
    fn literal(out: &mut Vec<u8>, name: &str, value: &str) {
        // Literal without indexing, new name, no Huffman; lengths < 127.
        assert!(name.len() < 127 && value.len() < 127);
        out.push(0);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        out.push(kind);
        out.push(flags);
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
    }
    let authority = socket.display().to_string().replace('/', "%2F");
    let mut block = Vec::new();
    literal(&mut block, ":method", "POST");
    literal(&mut block, ":scheme", "http");
    literal(&mut block, ":path", "/SpiffeWorkloadAPI/FetchJWTBundles");
    literal(&mut block, ":authority", &authority);
    literal(&mut block, "content-type", "application/grpc");
    literal(&mut block, "te", "trailers");
    literal(&mut block, "workload.spiffe.io", "true");
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut out, 0x4, 0, 0, &[]); // SETTINGS
    frame(&mut out, 0x1, 0x4, 1, &block); // HEADERS, END_HEADERS
    frame(&mut out, 0x0, 0x1, 1, &[0, 0, 0, 0, 0]); // DATA: an empty message, END_STREAM
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(&out).unwrap();
    loop {
        let mut head = [0u8; 9];
        s.read_exact(&mut head).unwrap();
        let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        s.read_exact(&mut payload).unwrap();
        match (kind, stream) {
            (0x4, 0) if flags & 1 == 0 => {
                let mut ack = Vec::new();
                frame(&mut ack, 0x4, 0x1, 0, &[]);
                s.write_all(&ack).unwrap();
            }
            (0x3, 1) => panic!("the stream was reset: {payload:?}"),
            (0x7, _) => panic!("GOAWAY: {payload:?}"),
            (0x0, 1) if len > 5 => return payload,
            _ => {}
        }
    }
}

fn on_path(tool: &str) -> std::path::PathBuf {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .unwrap();
    std::fs::canonicalize(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

fn wait_until(secs: u64, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what} within {secs} s"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Issue 16 §4.1: a process connects, hands the connection to a child, then
/// execs a registered binary; the child asks over that connection. The
/// agent pinned the process when it accepted the connection, and refuses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_that_execs_a_registered_binary_after_connecting_is_refused() {
    require_tool("python3");
    let sleep = on_path("sleep");
    let rig = rig_opts(Opts {
        workloads: &format!(
            "  - spiffe_id: {}\n    selectors: [\"unix:uid:0\", \"unix:path:{}\"]\n    ttl: 1h\n",
            id("exec-target"),
            sleep.display()
        ),
        ..Opts::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let attacker =
        |relay: &Path, target: &str| common::node::exec_after_connect(&rig.socket, relay, target);

    // Control: the connecting process stays itself (Python, uid 0); the
    // child relaying its connection is served the uid-0 identities.
    let relay = dir.path().join("stay.sock");
    let (mut stay, _) = attacker(&relay, "--stay");
    let ids = x509_ids(&relay).await.unwrap();
    assert!(ids.contains(&id("db")), "{ids:?}");
    assert!(!ids.contains(&id("exec-target")), "{ids:?}");
    let _ = stay.kill();
    let _ = stay.wait();

    // Attack: the connecting process now runs the registered binary.
    let relay = dir.path().join("exec.sock");
    let (mut execd, pid) = attacker(&relay, sleep.to_str().unwrap());
    wait_until(10, "the helper execs the registered binary", || {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .as_deref()
            == Some(sleep.as_path())
    });
    let mut raw = raw_client(&relay).await;
    let refused = raw
        .fetch_x509svid(with_header(herald_proto::workload::X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("executed another program since it connected"),
        "{refused:?}"
    );
    // Every call on that connection is refused the same way.
    let jwt = raw
        .fetch_jwtsvid(with_header(herald_proto::workload::JwtsvidRequest {
            audience: vec!["api.internal".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(jwt.code(), tonic::Code::PermissionDenied, "{jwt:?}");
    let _ = execd.kill();
    let _ = execd.wait();

    // A stream opened before the exec ends at its next update (the 8 s
    // web SVID rotates every few seconds) with PermissionDenied.
    let relay = dir.path().join("later.sock");
    let (mut later, pid) = attacker(&relay, &format!("later:{}", sleep.display()));
    let mut stream = raw_client(&relay)
        .await
        .fetch_x509svid(with_header(herald_proto::workload::X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(first.svids.iter().any(|s| s.spiffe_id == id("db")));
    {
        use std::io::Write;
        later
            .stdin
            .take()
            .unwrap()
            .write_all(
                b"go
",
            )
            .unwrap();
    }
    wait_until(10, "the helper execs after its stream opened", || {
        std::fs::read_link(format!("/proc/{pid}/exe"))
            .ok()
            .as_deref()
            == Some(sleep.as_path())
    });
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the stream ended without a refusal"),
                Err(status) => return status,
            }
        }
    })
    .await
    .expect("the stream was still open 30 s after the exec");
    assert_eq!(ended.code(), tonic::Code::PermissionDenied, "{ended:?}");
    let _ = later.kill();
    let _ = later.wait();
}

/// A directory other users can enter, holding copies of the herald binary.
fn herald_copies(names: &[&str]) -> (tempfile::TempDir, Vec<std::path::PathBuf>) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let paths = names
        .iter()
        .map(|n| {
            let p = dir.path().join(n);
            std::fs::copy(herald_bin(), &p).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        })
        .collect();
    (dir, paths)
}

/// Issue 16 §4.2: `/proc/<pid>/exe` reads a path in the caller's own mount
/// namespace. A process that bind-mounts another binary over a registered
/// path in a namespace of its own, and runs it from there, shows the
/// registered path — and is not given the registered identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_path_in_another_mount_namespace_is_not_the_registered_binary() {
    require_tool("unshare");
    require_tool("mount");
    let (_dir, copies) = herald_copies(&["registered", "impostor"]);
    let (registered, impostor) = (&copies[0], &copies[1]);
    let rig = rig_opts(Opts {
        workloads: &format!(
            "  - spiffe_id: {}\n    selectors: [\"unix:uid:0\", \"unix:path:{}\"]\n    ttl: 1h\n",
            id("by-path"),
            registered.display()
        ),
        ..Opts::default()
    });
    let socket = rig.socket.to_str().unwrap();
    // The registered binary, run as itself: served its identity.
    let text = stdout(&ok(Command::new(registered)
        .args(["workload", "fetch", "--socket", socket])
        .output()
        .unwrap()));
    assert!(text.contains(&id("by-path")), "{text}");
    // The impostor at the registered path, in a private mount namespace:
    // same path in /proc/<pid>/exe, another file.
    let out = ok(Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$1\" \"$2\" && exec \"$2\" workload fetch --socket \"$3\"")
        .arg("sh")
        .arg(impostor)
        .arg(registered)
        .arg(socket)
        .output()
        .unwrap());
    let text = stdout(&out);
    assert!(
        text.contains(&id("db")),
        "the impostor is still a uid-0 caller: {text}"
    );
    assert!(!text.contains(&id("by-path")), "{text}");
    // The bind mount never reached the agent's namespace.
    assert_eq!(
        std::fs::read(registered).unwrap().len(),
        std::fs::metadata(impostor).unwrap().len() as usize
    );
}

/// Issue 16 §4.3: a 1 TiB sparse "executable" (the herald binary, extended)
/// is refused at once, without being read, and meanwhile another caller
/// is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_sparse_executable_is_refused_quickly_while_others_are_served() {
    let (_dir, copies) = herald_copies(&["huge"]);
    let huge = &copies[0];
    std::fs::OpenOptions::new()
        .write(true)
        .open(huge)
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let rig = rig();
    let started = std::time::Instant::now();
    let mut caller = Command::new(huge)
        .args([
            "workload",
            "fetch",
            "--socket",
            rig.socket.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Another caller, at the same time.
    let served_in = {
        let t = std::time::Instant::now();
        let svids = client(&rig.socket)
            .await
            .fetch_all_x509_svids()
            .await
            .unwrap();
        assert!(!svids.is_empty());
        t.elapsed()
    };
    let deadline = started + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = caller.try_wait().unwrap() {
            break s;
        }
        if std::time::Instant::now() > deadline {
            let _ = caller.kill();
            panic!("the 1 TiB caller was not answered within 20 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let refused_in = started.elapsed();
    let out = caller.wait_with_output().unwrap();
    assert!(!status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("max_executable_size"), "{err}");
    assert!(
        refused_in < Duration::from_secs(5),
        "refused after {refused_in:?}"
    );
    assert!(
        served_in < Duration::from_secs(5),
        "the other caller waited {served_in:?}"
    );
    eprintln!(
        "1 TiB sparse executable refused in {refused_in:?}; the concurrent caller was served in {served_in:?}"
    );
}

fn credentials_request(port: u16, host: Option<&str>, token: &str) -> (u16, String) {
    let host = host.map(|h| format!("Host: {h}\r\n")).unwrap_or_default();
    common::raw_http(
        ([127, 0, 0, 1], port).into(),
        &format!(
            "GET /v1/credentials HTTP/1.1\r\n{host}Authorization: {token}\r\nConnection: close\r\n\r\n"
        ),
    )
}

/// Issue 16 §4.4: a DNS-rebinding page reaches the loopback endpoint under
/// its own host name: refused even with the right token; the endpoint
/// never runs without a token.
#[test]
fn the_credentials_endpoint_answers_only_loopback_hosts_with_the_token() {
    let rig = rig();
    let port = rig.credentials_port;
    for host in [
        "evil.example",
        &format!("evil.example:{port}"),
        "127.0.0.1.nip.io",
    ] {
        let (status, body) = credentials_request(port, Some(host), TOKEN);
        assert_eq!(status, 403, "{host}: {body}");
        assert!(body.contains("host_not_loopback"), "{body}");
    }
    let (status, body) = common::raw_http(
        ([127, 0, 0, 1], port).into(),
        &format!("GET /v1/credentials HTTP/1.0\r\nAuthorization: {TOKEN}\r\n\r\n"),
    );
    assert_eq!(status, 403, "no Host at all: {body}");
    for host in [format!("127.0.0.1:{port}"), format!("localhost:{port}")] {
        let (status, body) = credentials_request(port, Some(&host), TOKEN);
        assert_eq!(status, 200, "{host}: {body}");
        assert!(body.contains("AccessKeyId"), "{body}");
    }
    let (status, body) = credentials_request(port, Some("localhost"), "s3cr3t-token");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("unauthorized"), "{body}");
}

#[test]
fn the_agent_will_not_start_a_credentials_endpoint_without_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let base = format!(
        "servers = [\"https://127.0.0.1:1\"]\ntrust_bundle = \"{0}/bundle.pem\"\ndata_dir = \"{0}/state\"\n[workload_api]\nsocket = \"{0}/agent.sock\"\n[credentials_endpoint]\nlisten = \"127.0.0.1:{1}\"\n",
        dir.path().display(),
        common::node::free_port()
    );
    let config = dir.path().join("agent.toml");
    std::fs::write(&config, &base).unwrap();
    let check = Command::new(herald_bin())
        .args(["agent", "--config"])
        .arg(&config)
        .arg("check")
        .output()
        .unwrap();
    assert!(!check.status.success());
    assert!(
        common::stderr(&check).contains("authorization_token_file"),
        "{}",
        common::stderr(&check)
    );
    // A token too short to resist guessing: the agent exits at start.
    let token = dir.path().join("token");
    std::fs::write(&token, "guessable\n").unwrap();
    std::fs::write(
        &config,
        format!("{base}authorization_token_file = \"{}\"\n", token.display()),
    )
    .unwrap();
    let run = Command::new(herald_bin())
        .args(["agent", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(
        common::stderr(&run).contains("at least 16 characters"),
        "{}",
        common::stderr(&run)
    );
}

/// Issue 16 §4.5: a flood from one uid is refused (typed: gRPC
/// ResourceExhausted with `rate_limited`, HTTP 429) while another uid is
/// served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_from_one_uid_is_limited_while_another_uid_is_served() {
    require_tool("curl");
    let limit = "rate_limit = { per_second = 2, burst = 10 }";
    let rig = rig_opts(Opts {
        workload_api: limit,
        credentials_endpoint: limit,
        workloads: &format!(
            "  - spiffe_id: {}\n    selectors: [\"unix:uid:{NOBODY}\"]\n    ttl: 1h\n    cloud_role: {ROLE}\n",
            id("nobody-cloud")
        ),
        ..Opts::default()
    });
    // Workload API: 60 calls from this process (uid 0).
    let mut raw = raw_client(&rig.socket).await;
    let validate = || {
        with_header(herald_proto::workload::ValidateJwtsvidRequest {
            audience: "api.internal".into(),
            svid: "not.a.token".into(),
        })
    };
    let started = std::time::Instant::now();
    let (mut limited, mut answered) = (0, 0);
    for _ in 0..60 {
        let e = raw.validate_jwtsvid(validate()).await.unwrap_err();
        match e.code() {
            tonic::Code::ResourceExhausted => {
                assert_eq!(
                    herald_client::ClientError::from(e).code(),
                    Some(herald_core::ErrorCode::RateLimited)
                );
                limited += 1;
            }
            tonic::Code::InvalidArgument => answered += 1,
            other => panic!("{other:?}: {e:?}"),
        }
    }
    let flood = started.elapsed();
    assert!(
        (10..=20).contains(&answered),
        "{answered} answered in {flood:?}"
    );
    assert!(limited >= 40, "{limited} limited");
    assert_eq!(
        raw.validate_jwtsvid(validate()).await.unwrap_err().code(),
        tonic::Code::ResourceExhausted,
        "uid 0 is still over its limit"
    );
    // Another uid meanwhile: served.
    use std::os::unix::process::CommandExt;
    let (_bin_dir, herald_for_others) = executable_by_other_users(herald_bin());
    let out = ok(Command::new(&herald_for_others)
        .args([
            "workload",
            "fetch",
            "--socket",
            rig.socket.to_str().unwrap(),
        ])
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap());
    assert!(stdout(&out).contains(&id("nobody")), "{}", stdout(&out));

    // The credentials endpoint: 60 requests from uid 0, then one from nobody.
    let port = rig.credentials_port;
    let host = format!("127.0.0.1:{port}");
    let started = std::time::Instant::now();
    let mut statuses = std::collections::BTreeMap::new();
    for _ in 0..60 {
        let (status, body) = credentials_request(port, Some(&host), TOKEN);
        if status == 429 {
            assert!(body.contains("rate_limited"), "{body}");
        }
        *statuses.entry(status).or_insert(0) += 1;
    }
    let http_flood = started.elapsed();
    assert!(
        statuses.get(&429).copied().unwrap_or(0) >= 40,
        "{statuses:?}"
    );
    assert!(
        (10..=20).contains(&statuses.get(&200).copied().unwrap_or(0)),
        "{statuses:?}"
    );
    let curl = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
        .arg(format!("Authorization: {TOKEN}"))
        .arg(format!("http://{host}/v1/credentials"))
        .uid(NOBODY)
        .gid(NOBODY)
        .output()
        .unwrap();
    assert_eq!(stdout(&curl), "200", "nobody is served meanwhile");
    eprintln!(
        "Workload API: {answered} answered, {limited} limited of 60 in {flood:?}; \
         credentials endpoint: {statuses:?} of 60 in {http_flood:?}"
    );
}
