//! Join-token policies, renewal of a lineage, workload identities for a
//! node, and the authorization of a requested credential against a grant.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use herald_attest::{VerifiedJoinToken, VerifiedSvid};
use herald_core::{ErrorCode, JoinTokenPurpose, Origin, SpiffeId, TrustDomain};
use herald_policy::{
    CredentialRequest, Defaults, Evidence, Grant, LoadOptions, OidcEvidence, PolicySet,
};
use serde_json::json;

const HOUR: i64 = 3600;
const NOW: i64 = 1_800_000_000;

fn opts() -> LoadOptions {
    LoadOptions::new(TrustDomain::new("dev.herald.test").unwrap())
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../attestation-policies")
}

fn load(files: &[(&str, String)]) -> Result<PolicySet, herald_policy::LoadErrors> {
    let dir = examples();
    let sources: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(name, text)| (dir.join(name), text.clone()))
        .collect();
    PolicySet::from_sources(&sources, &opts())
}

const BOOTSTRAP: &str = "name: boot
evidence:
  join_token: { purposes: [bootstrap] }
spiffe_id:
  prefix: spiffe://dev.herald.test/svc/
grants:
  x509_svid: { max_ttl: 2h, max_lineage_age: 12h }
";

fn nodes() -> String {
    "name: nodes
evidence:
  tpm:
    ek_roots: [tpm-roots/example-swtpm-root.pem]
    pcrs: [0]
    golden: [{ name: g, pcrs: { 0: \"0000000000000000000000000000000000000000000000000000000000000000\" } }]
spiffe_id:
  prefix: spiffe://dev.herald.test/node/
  template: \"spiffe://dev.herald.test/node/{ek_hash}\"
grants:
  x509_svid: { max_ttl: 1h }
  cloud:
    - role_arn: arn:aws:iam::123456789012:role/backup
      max_ttl: 1h
      scope: { Version: \"2012-10-17\", Statement: [{ Effect: Allow, Action: [\"s3:PutObject\"], Resource: [\"arn:aws:s3:::b/*\"] }] }
workloads:
  - spiffe_id: spiffe://dev.herald.test/workload/web
    selectors: [\"unix:uid:1000\"]
    ttl: 20m
    dns_names: [web.internal]
    jwt_audiences: [api]
  - spiffe_id: spiffe://dev.herald.test/workload/backup
    selectors: [\"unix:uid:34\"]
    cloud_role: arn:aws:iam::123456789012:role/backup
"
    .to_string()
}

fn token(id: &str, purpose: JoinTokenPurpose) -> Evidence {
    Evidence {
        join_token: Some(VerifiedJoinToken {
            hash: [1; 32],
            token_id: "0123456789abcdef".into(),
            spiffe_id: SpiffeId::parse(id).unwrap(),
            purpose,
            policies: Vec::new(),
            created_by: "operator:alice".into(),
        }),
        ..Evidence::default()
    }
}

fn svid(id: &str, origin: Origin, policy: &str, root_at: i64) -> VerifiedSvid {
    VerifiedSvid {
        spiffe_id: SpiffeId::parse(id).unwrap(),
        serial: "0a".into(),
        not_before: root_at,
        not_after: root_at + HOUR,
        spki_sha256: "ab".into(),
        dns_names: vec!["old.internal".into()],
        cert_sha256: "cd".into(),
        origin,
        policy: Some(policy.into()),
        root_serial: "01".into(),
        root_at,
    }
}

const DEFAULTS: Defaults = Defaults {
    x509_ttl: Duration::from_secs(3600),
    jwt_ttl: Duration::from_secs(300),
    cloud_ttl: Duration::from_secs(900),
};

#[test]
fn a_bootstrap_token_mints_only_what_a_join_token_policy_grants() {
    let set = load(&[("boot.yaml", BOOTSTRAP.into())]).unwrap();
    let d = set
        .evaluate(&token(
            "spiffe://dev.herald.test/svc/api",
            JoinTokenPurpose::Bootstrap,
        ))
        .unwrap();
    assert_eq!(d.spiffe_id.as_str(), "spiffe://dev.herald.test/svc/api");
    assert_eq!(d.origin, Origin::Bootstrap);
    let g = d.grants.x509_svid.as_ref().unwrap();
    assert_eq!(g.max_lineage_age, Some(Duration::from_secs(12 * 3600)));
    // Outside the prefix (a node's identity, say): refused.
    let out = set
        .evaluate(&token(
            "spiffe://dev.herald.test/node/abc",
            JoinTokenPurpose::Bootstrap,
        ))
        .unwrap_err();
    assert_eq!(out.code, ErrorCode::SpiffeIdEscapesPrefix);
    // Tokens made for other purposes are not this policy's evidence.
    for p in [
        JoinTokenPurpose::SecondFactor,
        JoinTokenPurpose::NodeEnrolment,
        JoinTokenPurpose::BreakGlass,
    ] {
        let e = set
            .evaluate(&token("spiffe://dev.herald.test/svc/api", p))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied, "{p}");
    }
    // Beside an OIDC token a join token is a factor, never the evidence.
    let mut both = token(
        "spiffe://dev.herald.test/svc/api",
        JoinTokenPurpose::Bootstrap,
    );
    both.oidc = Some(OidcEvidence {
        issuer: "https://issuer.example.com".into(),
        audiences: vec!["herald".into()],
        claims: json!({"sub": "x"}).as_object().cloned().unwrap(),
    });
    assert_eq!(
        set.evaluate(&both).unwrap_err().code,
        ErrorCode::PolicyDenied
    );
}

#[test]
fn break_glass_needs_a_policy_that_lists_it_and_is_its_own_origin() {
    let text = BOOTSTRAP.replace("[bootstrap]", "[break_glass]");
    let set = load(&[("boot.yaml", text)]).unwrap();
    let d = set
        .evaluate(&token(
            "spiffe://dev.herald.test/svc/api",
            JoinTokenPurpose::BreakGlass,
        ))
        .unwrap();
    assert_eq!(d.origin, Origin::BreakGlass);
    assert!(
        set.evaluate(&token(
            "spiffe://dev.herald.test/svc/api",
            JoinTokenPurpose::Bootstrap
        ))
        .is_err()
    );
}

#[test]
fn join_token_policies_are_checked_at_load() {
    for (bad, why) in [
        (
            BOOTSTRAP.replace(
                "  prefix: spiffe://dev.herald.test/svc/\n",
                "  prefix: spiffe://dev.herald.test/svc/\n  template: \"spiffe://dev.herald.test/svc/x\"\n",
            ),
            "only spiffe_id.prefix",
        ),
        (
            BOOTSTRAP.replace("[bootstrap]", "[second_factor]"),
            "not one of bootstrap, break_glass",
        ),
        (
            BOOTSTRAP.replace(
                "  x509_svid:",
                "  jwt_svid: { max_ttl: 5m, audiences: [a] }\n  x509_svid:",
            ),
            "X.509 SVIDs only",
        ),
        (
            BOOTSTRAP.replace("max_lineage_age: 12h", "max_lineage_age: 100d"),
            "at most 90 days",
        ),
    ] {
        let e = load(&[("boot.yaml", bad)]).unwrap_err().to_string();
        assert!(e.contains(why), "{why}: {e}");
    }
    // An exchange's SVIDs never renew: no lineage age on an OIDC policy.
    let oidc = "name: ci
evidence:
  oidc: { issuer: https://issuer.example.com, audiences: [herald] }
spiffe_id:
  prefix: spiffe://dev.herald.test/ci/
  template: \"spiffe://dev.herald.test/ci/{repo}\"
grants:
  x509_svid: { max_ttl: 15m, max_lineage_age: 1h }
";
    let e = load(&[("ci.yaml", oidc.into())]).unwrap_err().to_string();
    assert!(e.contains("max_lineage_age applies to node"), "{e}");
}

#[test]
fn renewal_follows_the_lineage_policy_and_its_age() {
    let set = load(&[("boot.yaml", BOOTSTRAP.into()), ("nodes.yaml", nodes())]).unwrap();
    let id = "spiffe://dev.herald.test/svc/api";
    // Within the lineage age: the same identity and SANs, the policy's cap.
    let d = set
        .renew(&svid(id, Origin::Bootstrap, "boot", NOW - 11 * HOUR), NOW)
        .unwrap();
    assert_eq!(d.spiffe_id.as_str(), id);
    assert_eq!(d.origin, Origin::Bootstrap);
    let g = d
        .authorize(&CredentialRequest::X509Svid { ttl: None }, &DEFAULTS)
        .unwrap();
    assert_eq!(
        g,
        Grant::X509Svid {
            ttl: Duration::from_secs(3600),
            dns_names: vec!["old.internal".into()]
        }
    );
    // Past it: fresh evidence is needed.
    let old = set
        .renew(&svid(id, Origin::Bootstrap, "boot", NOW - 13 * HOUR), NOW)
        .unwrap_err();
    assert_eq!(old.code, ErrorCode::LineageTooOld);
    // A node lineage renews under its node policy (default age: a day).
    let node = "spiffe://dev.herald.test/node/ab";
    assert!(
        set.renew(&svid(node, Origin::Node, "nodes", NOW - 23 * HOUR), NOW)
            .is_ok()
    );
    assert_eq!(
        set.renew(&svid(node, Origin::Node, "nodes", NOW - 25 * HOUR), NOW)
            .unwrap_err()
            .code,
        ErrorCode::LineageTooOld
    );
    // Exchange-issued and workload SVIDs never renew.
    for origin in [Origin::Exchange, Origin::Workload] {
        let e = set.renew(&svid(id, origin, "boot", NOW), NOW).unwrap_err();
        assert_eq!(e.code, ErrorCode::CredentialNotRenewable, "{origin}");
    }
    // The lineage's policy gone, or of another kind: refused.
    assert_eq!(
        set.renew(&svid(id, Origin::Bootstrap, "gone", NOW), NOW)
            .unwrap_err()
            .code,
        ErrorCode::PolicyDenied
    );
    assert_eq!(
        set.renew(&svid(node, Origin::Bootstrap, "nodes", NOW), NOW)
            .unwrap_err()
            .code,
        ErrorCode::PolicyDenied
    );
    // A break-glass lineage never renews: its time box ends with it.
    assert_eq!(
        set.renew(&svid(id, Origin::BreakGlass, "boot", NOW), NOW)
            .unwrap_err()
            .code,
        ErrorCode::CredentialNotRenewable
    );
    // A narrowed prefix stops renewals of identities now outside it.
    let narrowed = BOOTSTRAP.replace("/svc/", "/svc/web/");
    let set = load(&[("boot.yaml", narrowed)]).unwrap();
    assert_eq!(
        set.renew(&svid(id, Origin::Bootstrap, "boot", NOW), NOW)
            .unwrap_err()
            .code,
        ErrorCode::SpiffeIdEscapesPrefix
    );
}

#[test]
fn only_a_node_lineage_gets_its_registered_workload_identities() {
    let set = load(&[("boot.yaml", BOOTSTRAP.into()), ("nodes.yaml", nodes())]).unwrap();
    let node = svid(
        "spiffe://dev.herald.test/node/ab",
        Origin::Node,
        "nodes",
        NOW,
    );
    let web = set
        .workload(&node, "spiffe://dev.herald.test/workload/web")
        .unwrap();
    assert_eq!(web.origin, Origin::Workload);
    assert_eq!(
        web.authorize(&CredentialRequest::X509Svid { ttl: None }, &DEFAULTS)
            .unwrap(),
        Grant::X509Svid {
            ttl: Duration::from_secs(20 * 60),
            dns_names: vec!["web.internal".into()]
        }
    );
    let api = ["api".to_string()];
    let jwt = web
        .authorize(
            &CredentialRequest::JwtSvid {
                audiences: &api,
                ttl: None,
            },
            &DEFAULTS,
        )
        .unwrap();
    assert_eq!(
        jwt,
        Grant::JwtSvid {
            ttl: Duration::from_secs(300),
            audiences: api.to_vec()
        }
    );
    let other = ["billing".to_string()];
    assert_eq!(
        web.authorize(
            &CredentialRequest::JwtSvid {
                audiences: &other,
                ttl: None
            },
            &DEFAULTS
        )
        .unwrap_err()
        .code,
        ErrorCode::AudienceNotGranted
    );
    // web has no cloud role; backup has its registration's.
    assert_eq!(
        web.grants.cloud_roles.len() + web.grants.jwt_svid.iter().count(),
        1
    );
    let backup = set
        .workload(&node, "spiffe://dev.herald.test/workload/backup")
        .unwrap();
    assert_eq!(
        backup.grants.cloud_roles[0].role_arn,
        "arn:aws:iam::123456789012:role/backup"
    );
    assert!(backup.grants.jwt_svid.is_none());
    // Unregistered identities, and callers whose lineage is not a node's
    // (a bootstrap SVID carrying the node's SPIFFE ID, say), are refused.
    assert_eq!(
        set.workload(&node, "spiffe://dev.herald.test/workload/db")
            .unwrap_err()
            .code,
        ErrorCode::WorkloadNotRegistered
    );
    let minted = svid(
        "spiffe://dev.herald.test/node/ab",
        Origin::Bootstrap,
        "boot",
        NOW,
    );
    assert_eq!(
        set.workload(&minted, "spiffe://dev.herald.test/workload/web")
            .unwrap_err()
            .code,
        ErrorCode::NodeUnknown
    );
    let mislabelled = svid("spiffe://dev.herald.test/svc/x", Origin::Node, "boot", NOW);
    assert_eq!(
        set.node_policy(&mislabelled).unwrap_err().code,
        ErrorCode::NodeUnknown
    );
}

#[test]
fn authorization_caps_lifetimes_and_narrows_sessions() {
    let set = load(&[("nodes.yaml", nodes())]).unwrap();
    let node = svid(
        "spiffe://dev.herald.test/node/ab",
        Origin::Node,
        "nodes",
        NOW,
    );
    let backup = set
        .workload(&node, "spiffe://dev.herald.test/workload/backup")
        .unwrap();
    let role = "arn:aws:iam::123456789012:role/backup";
    let ask = |session_policy, ttl| CredentialRequest::Cloud {
        role_arn: role,
        session_policy,
        ttl,
    };
    let Grant::Cloud { ttl, .. } = backup.authorize(&ask(None, None), &DEFAULTS).unwrap() else {
        panic!("not a cloud grant");
    };
    assert_eq!(ttl, Duration::from_secs(900));
    let code = |r| backup.authorize(&r, &DEFAULTS).unwrap_err().code;
    assert_eq!(
        code(ask(None, Some(Duration::from_secs(2 * 3600)))),
        ErrorCode::TtlTooLong
    );
    assert_eq!(
        code(ask(None, Some(Duration::ZERO))),
        ErrorCode::InvalidRequest
    );
    assert_eq!(
        code(ask(Some("{not json"), None)),
        ErrorCode::SessionPolicyMalformed
    );
    let wider = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:*"],"Resource":["*"]}]}"#;
    assert_eq!(
        code(ask(Some(wider), None)),
        ErrorCode::SessionPolicyTooBroad
    );
    let narrower = r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":["s3:PutObject"],"Resource":["arn:aws:s3:::b/x/*"]}]}"#;
    let Grant::Cloud { scope, .. } = backup
        .authorize(&ask(Some(narrower), None), &DEFAULTS)
        .unwrap()
    else {
        panic!("not a cloud grant");
    };
    assert!(scope.to_json().to_string().contains("b/x/*"));
    assert_eq!(
        backup
            .authorize(
                &CredentialRequest::Cloud {
                    role_arn: "arn:aws:iam::123456789012:role/other",
                    session_policy: None,
                    ttl: None
                },
                &DEFAULTS
            )
            .unwrap_err()
            .code,
        ErrorCode::RoleNotGranted
    );
    assert_eq!(
        backup
            .authorize(
                &CredentialRequest::JwtSvid {
                    audiences: &["a".to_string()],
                    ttl: None
                },
                &DEFAULTS
            )
            .unwrap_err()
            .code,
        ErrorCode::CredentialNotGranted
    );
}

/// The node policy with `evidence.tpm` lines swapped: `ek_roots` for
/// `trust`, and `extra` added (e.g. `reattest`).
fn nodes_with(trust: &str, extra: &str) -> String {
    nodes().replace(
        "    ek_roots: [tpm-roots/example-swtpm-root.pem]\n",
        &format!("{trust}{extra}"),
    )
}

#[test]
fn continuous_attestation_refuses_a_plain_renewal_when_a_fresh_quote_is_due() {
    let roots = "    ek_roots: [tpm-roots/example-swtpm-root.pem]\n";
    let id = "spiffe://dev.herald.test/node/abc";
    // Every renewal: refused at once, whatever the lineage's age.
    let set = load(&[(
        "nodes.yaml",
        nodes_with(roots, "    reattest: every_renewal\n"),
    )])
    .unwrap();
    let refused = set
        .renew(&svid(id, Origin::Node, "nodes", NOW - 1), NOW)
        .unwrap_err();
    assert_eq!(refused.code, ErrorCode::ReattestationRequired);
    assert_eq!(refused.policy.as_deref(), Some("nodes"));
    // An interval: plain renewals until the last quote (the lineage's
    // root) is that old.
    let set = load(&[("nodes.yaml", nodes_with(roots, "    reattest: 2h\n"))]).unwrap();
    assert!(
        set.renew(&svid(id, Origin::Node, "nodes", NOW - HOUR), NOW)
            .is_ok()
    );
    assert_eq!(
        set.renew(&svid(id, Origin::Node, "nodes", NOW - 2 * HOUR), NOW)
            .unwrap_err()
            .code,
        ErrorCode::ReattestationRequired
    );
    // Without `reattest`, the same renewal is fine.
    let set = load(&[("nodes.yaml", nodes_with(roots, ""))]).unwrap();
    assert!(
        set.renew(&svid(id, Origin::Node, "nodes", NOW - 2 * HOUR), NOW)
            .is_ok()
    );
}

#[test]
fn a_node_policy_may_trust_eks_by_hash_instead_of_roots() {
    let hash = "ab".repeat(32);
    let set = load(&[(
        "nodes.yaml",
        nodes_with(
            &format!("    ek_hashes: [\"{}\"]\n", hash.to_uppercase()),
            "",
        ),
    )])
    .unwrap();
    let (_, rules) = set.tpm_policies().next().unwrap();
    assert!(rules.ek_roots.is_empty());
    assert_eq!(rules.ek_hashes, vec![hash], "stored lowercase");
    // Neither roots nor hashes, a malformed hash, a bad reattest: refused
    // at load with the reason.
    for (trust, extra, want) in [
        ("", "", "needs ek_roots"),
        ("    ek_hashes: [\"abc\"]\n", "", "64 hex digits"),
        (
            "    ek_hashes: [\"aa\"]\n",
            "    reattest: sometimes\n",
            "every_renewal or a duration",
        ),
    ] {
        let errors = load(&[("nodes.yaml", nodes_with(trust, extra))])
            .unwrap_err()
            .to_string();
        assert!(errors.contains(want), "{want}: {errors}");
    }
}
