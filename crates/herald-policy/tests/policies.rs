//! Loading, validating, testing and evaluating policy sets from files.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};

use herald_attest::VerifiedJoinToken;
use herald_core::{ErrorCode, JoinTokenPurpose, SpiffeId, TrustDomain};
use herald_policy::{
    Evidence, Factor, LoadOptions, OidcEvidence, PolicySet, PolicyStore, test_dir,
};
use serde_json::{Value, json};

fn opts() -> LoadOptions {
    LoadOptions::new(TrustDomain::new("dev.herald.test").unwrap())
}

/// A verified join token for `id`, created for `purpose` (and `policies`).
fn token(id: &str, purpose: JoinTokenPurpose, policies: &[&str]) -> VerifiedJoinToken {
    VerifiedJoinToken {
        hash: [7; 32],
        token_id: "0123456789abcdef".into(),
        spiffe_id: SpiffeId::parse(id).unwrap(),
        purpose,
        policies: policies.iter().map(|p| p.to_string()).collect(),
        created_by: "operator:test".into(),
    }
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../attestation-policies")
}

fn oidc(issuer: &str, claims: Value) -> Evidence {
    Evidence {
        oidc: Some(OidcEvidence {
            issuer: issuer.into(),
            audiences: vec!["herald".into()],
            claims: claims.as_object().cloned().unwrap(),
        }),
        ..Evidence::default()
    }
}

const BASE: &str = r#"name: p
evidence:
  oidc:
    issuer: https://issuer.example.com
    audiences: [herald]
pins:
  team: core
condition: claims.env == "prod"
spiffe_id:
  prefix: spiffe://dev.herald.test/svc/
  template: "spiffe://dev.herald.test/svc/{service}"
grants:
  jwt_svid: { max_ttl: 5m, audiences: [api] }
"#;

fn load(text: &str) -> Result<PolicySet, herald_policy::LoadErrors> {
    PolicySet::from_sources(&[(PathBuf::from("p.yaml"), text.to_string())], &opts())
}

#[test]
fn the_shipped_examples_load_and_every_embedded_test_passes() {
    let set = PolicySet::load_dir(&examples(), &opts()).unwrap();
    assert_eq!(set.len(), 11, "{:?}", set.names());
    let outcomes = test_dir(&examples(), &opts()).unwrap();
    assert!(outcomes.len() >= 18, "{}", outcomes.len());
    for o in &outcomes {
        assert!(
            o.passed,
            "{} {} #{}: {}",
            o.path.display(),
            o.policy,
            o.index,
            o.detail
        );
    }
    // Every example has passing and failing cases.
    for name in set.names() {
        let mine: Vec<_> = outcomes.iter().filter(|o| o.policy == name).collect();
        assert!(
            mine.iter().any(|o| o.detail.starts_with("allowed")),
            "{name}"
        );
        assert!(
            mine.iter().any(|o| o.detail.starts_with("refused")),
            "{name}"
        );
    }
}

#[test]
fn evaluation_picks_the_matching_policy_and_builds_the_id() {
    let set = load(BASE).unwrap();
    let d = set
        .evaluate(&oidc(
            "https://issuer.example.com",
            json!({"sub": "x", "team": "core", "env": "prod", "service": "billing"}),
        ))
        .unwrap();
    assert_eq!(d.policy, "p");
    assert_eq!(d.spiffe_id.as_str(), "spiffe://dev.herald.test/svc/billing");
    assert_eq!(d.factors, vec![Factor::Oidc]);
    assert_eq!(
        d.grants.jwt_svid.unwrap().audiences,
        vec!["api".to_string()]
    );
    // Deny by default, with the most specific reason.
    let cases = [
        (
            json!({"team": "other", "env": "prod", "service": "a"}),
            ErrorCode::PolicyDenied,
        ),
        (
            json!({"team": "core", "env": "dev", "service": "a"}),
            ErrorCode::PolicyDenied,
        ),
        (
            json!({"team": "core", "service": "a"}),
            ErrorCode::PolicyDenied,
        ),
        (
            json!({"team": "core", "env": "prod", "service": "../x"}),
            ErrorCode::SpiffeIdEscapesPrefix,
        ),
        (
            json!({"team": "core", "env": "prod", "service": "a/b"}),
            ErrorCode::SpiffeIdEscapesPrefix,
        ),
        (
            json!({"team": "core", "env": "prod", "service": "a%2fb"}),
            ErrorCode::SpiffeIdEscapesPrefix,
        ),
        (
            json!({"team": "core", "env": "prod"}),
            ErrorCode::SpiffeIdEscapesPrefix,
        ),
    ];
    for (claims, code) in cases {
        let d = set
            .evaluate(&oidc("https://issuer.example.com", claims.clone()))
            .unwrap_err();
        assert_eq!(d.code, code, "{claims}: {}", d.reason);
        assert!(
            !d.reason.contains("other") && !d.reason.contains("../x"),
            "no claim values in reasons: {}",
            d.reason
        );
    }
    let d = set
        .evaluate(&oidc(
            "https://elsewhere.example.com",
            json!({"team": "core"}),
        ))
        .unwrap_err();
    assert_eq!((d.code, d.policy), (ErrorCode::PolicyDenied, None));
}

#[test]
fn expression_ids_are_revalidated_and_kept_under_the_prefix() {
    // A raw claim in an expression ID is refused at load: a branch named
    // `release/admin` would land in another namespace.
    let raw = BASE.replace(
        "  template: \"spiffe://dev.herald.test/svc/{service}\"",
        "  expression: '\"spiffe://dev.herald.test/svc/\" + claims.service'",
    );
    let e = load(&raw).unwrap_err().to_string();
    assert!(e.contains("segment()"), "{e}");
    let text = BASE.replace(
        "  template: \"spiffe://dev.herald.test/svc/{service}\"",
        "  expression: '\"spiffe://dev.herald.test/svc/\" + segment(claims.service)'",
    );
    let set = load(&text).unwrap();
    let ok = |svc: &str| {
        set.evaluate(&oidc(
            "https://issuer.example.com",
            json!({"team": "core", "env": "prod", "service": svc}),
        ))
    };
    assert_eq!(
        ok("api").unwrap().spiffe_id.as_str(),
        "spiffe://dev.herald.test/svc/api"
    );
    for bad in ["../../admin", "%2e%2e", "x/..", ""] {
        assert_eq!(
            ok(bad).unwrap_err().code,
            ErrorCode::SpiffeIdEscapesPrefix,
            "{bad}"
        );
    }
    let other_td = BASE.replace(
        "  template: \"spiffe://dev.herald.test/svc/{service}\"",
        "  expression: '\"spiffe://evil.test/svc/\" + segment(claims.service)'",
    );
    let set = load(&other_td).unwrap();
    let d = set
        .evaluate(&oidc(
            "https://issuer.example.com",
            json!({"team": "core", "env": "prod", "service": "a"}),
        ))
        .unwrap_err();
    assert_eq!(d.code, ErrorCode::SpiffeIdEscapesPrefix);
}

#[test]
fn broken_files_are_refused_with_path_line_and_reason() {
    let cases: Vec<(String, &str)> = vec![
        ("name: [unclosed\n".into(), "YAML"),
        (BASE.replace("pins:", "pinz:"), "unknown field"),
        (
            BASE.replace("claims.env == \"prod\"", "claims.env == "),
            "CEL",
        ),
        (
            BASE.replace("claims.env == \"prod\"", "request.env == \"prod\""),
            "unknown variable",
        ),
        (
            BASE.replace(
                "spiffe://dev.herald.test/svc/\n",
                "spiffe://other.test/svc/\n",
            ),
            "trust domain",
        ),
        (BASE.replace("max_ttl: 5m", "max_ttl: 48h"), "at most 24h"),
        (BASE.replace("max_ttl: 5m", "max_ttl: soon"), "max_ttl"),
        (
            BASE.replace(
                "  jwt_svid: { max_ttl: 5m, audiences: [api] }\n",
                "  x509_svid: null\n",
            ),
            "grant something",
        ),
        (BASE.replace("{service}", "{serv ice}"), "claim path"),
        (
            format!(
                "{BASE}  cloud:\n    - role_arn: arn:aws:iam::1:role/x-long-enough\n      max_ttl: 1h\n      scope: {{Statement: [{{Effect: Deny, Action: '*', Resource: '*'}}]}}\n"
            ),
            "scope",
        ),
        (
            format!(
                "{BASE}tests:\n  - evidence: {{ oidc: {{ claims: {{team: core, env: dev, service: a}} }} }}\n    expect: {{ allow: true }}\n"
            ),
            "embedded test",
        ),
        (
            format!(
                "{BASE}{}",
                "# padding\n".repeat(herald_policy::MAX_FILE_BYTES / 10 + 1)
            ),
            "exceeds",
        ),
    ];
    for (text, needle) in cases {
        let errs = load(&text).unwrap_err();
        let msg = errs.to_string();
        assert!(msg.contains(needle), "expected {needle:?} in {msg}");
        assert!(msg.starts_with("p.yaml"), "{msg}");
    }
    // A YAML syntax error names its line.
    let errs = load("name: p\nevidence:\n  oidc: [\n").unwrap_err();
    assert!(errs.0[0].line.is_some(), "{errs}");
    // Two files with one name.
    let dup = PolicySet::from_sources(
        &[
            (PathBuf::from("a.yaml"), BASE.into()),
            (PathBuf::from("b.yaml"), BASE.into()),
        ],
        &opts(),
    )
    .unwrap_err();
    assert!(dup.to_string().contains("used twice"), "{dup}");
}

#[test]
fn dangerous_policies_are_refused() {
    let gh = BASE.replace(
        "https://issuer.example.com",
        "https://token.actions.githubusercontent.com",
    );
    // A shared issuer pinned only on a non-owner claim.
    let e = load(&gh).unwrap_err().to_string();
    assert!(e.contains("shared"), "{e}");
    // With an owner pin it loads.
    load(&gh.replace(
        "  team: core",
        "  team: core\n  repository_owner_id: \"1342004\"",
    ))
    .unwrap();
    // Globs in pins, unbounded sub matches.
    let e = load(&BASE.replace("team: core", "team: \"*\""))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unbounded"), "{e}");
    let e = load(&BASE.replace("claims.env == \"prod\"", "claims.sub.matches(\".*\")"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("unbounded"), "{e}");
    let owner_pinned = gh.replace(
        "  team: core",
        "  team: core\n  repository_owner_id: \"1342004\"",
    );
    let e =
        load(&owner_pinned.replace("claims.env == \"prod\"", "claims.sub.startsWith(\"repo:\")"))
            .unwrap_err()
            .to_string();
    assert!(e.contains("unbounded"), "{e}");
    load(&owner_pinned.replace(
        "claims.env == \"prod\"",
        "claims.sub.startsWith(\"repo:acme/\")",
    ))
    .unwrap();
}

#[test]
fn required_factors_must_be_present_and_bound_to_the_same_identity() {
    let text = BASE.replace(
        "    audiences: [herald]\n",
        "    audiences: [herald]\n  require: [join_token]\n",
    );
    let set = load(&text).unwrap();
    let claims = json!({"team": "core", "env": "prod", "service": "db"});
    let mut ev = oidc("https://issuer.example.com", claims);
    assert_eq!(
        set.evaluate(&ev).unwrap_err().code,
        ErrorCode::FactorMissing
    );
    let second = JoinTokenPurpose::SecondFactor;
    ev.join_token = Some(token("spiffe://dev.herald.test/svc/other", second, &["p"]));
    assert_eq!(
        set.evaluate(&ev).unwrap_err().code,
        ErrorCode::FactorMissing
    );
    // The right identity, but not created as this policy's second factor.
    for wrong in [
        token(
            "spiffe://dev.herald.test/svc/db",
            second,
            &["another-policy"],
        ),
        token(
            "spiffe://dev.herald.test/svc/db",
            JoinTokenPurpose::Bootstrap,
            &[],
        ),
        token(
            "spiffe://dev.herald.test/svc/db",
            JoinTokenPurpose::NodeEnrolment,
            &[],
        ),
    ] {
        ev.join_token = Some(wrong);
        let d = set.evaluate(&ev).unwrap_err();
        assert_eq!(d.code, ErrorCode::FactorMissing, "{}", d.reason);
    }
    ev.join_token = Some(token("spiffe://dev.herald.test/svc/db", second, &["p"]));
    let d = set.evaluate(&ev).unwrap();
    assert_eq!(d.factors, vec![Factor::Oidc, Factor::JoinToken]);
    // The condition sees the factors too.
    let text = BASE.replace(
        "claims.env == \"prod\"",
        "claims.env == \"prod\" && \"join_token\" in factors",
    );
    let set = load(&text).unwrap();
    assert_eq!(
        set.evaluate(&ev).unwrap().spiffe_id.as_str(),
        "spiffe://dev.herald.test/svc/db"
    );
    ev.join_token = None;
    assert_eq!(set.evaluate(&ev).unwrap_err().code, ErrorCode::PolicyDenied);
}

#[test]
fn hot_reload_keeps_the_last_good_set() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.yaml"), BASE).unwrap();
    let store = PolicyStore::new(dir.path().to_path_buf(), opts()).unwrap();
    let before = store.current();
    std::fs::write(dir.path().join("p.yaml"), "name: [broken\n").unwrap();
    let e = store.reload().unwrap_err();
    assert!(e.to_string().contains("p.yaml"), "{e}");
    assert!(
        std::sync::Arc::ptr_eq(&before, &store.current()),
        "the good set stays"
    );
    std::fs::write(
        dir.path().join("p.yaml"),
        BASE.replace("service}", "service}-v2"),
    )
    .unwrap();
    assert_eq!(store.reload().unwrap(), 1);
    let d = store
        .current()
        .evaluate(&oidc(
            "https://issuer.example.com",
            json!({"team": "core", "env": "prod", "service": "a"}),
        ))
        .unwrap();
    assert_eq!(d.spiffe_id.as_str(), "spiffe://dev.herald.test/svc/a-v2");
    // A server refuses to start on a broken directory.
    std::fs::write(dir.path().join("q.yaml"), "nope: 1\n").unwrap();
    assert!(PolicyStore::new(dir.path().to_path_buf(), opts()).is_err());
}

const Z: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A TPM policy in `dir`, with the example root copied next to it.
fn tpm_policy(dir: &std::path::Path, extra: &str) -> Result<PolicySet, herald_policy::LoadErrors> {
    std::fs::create_dir_all(dir.join("roots")).unwrap();
    std::fs::copy(
        examples().join("tpm-roots/example-swtpm-root.pem"),
        dir.join("roots/root.pem"),
    )
    .unwrap();
    let text = format!(
        r#"name: nodes
evidence:
  tpm:
    ek_roots: [roots/root.pem]
    pcrs: [0, 7]
    golden:
      - {{ name: old-image, pcrs: {{ 0: "{Z}", 7: "{Z}" }} }}
      - {{ name: new-image, pcrs: {{ 0: "{Z}", 7: "{one}" }} }}
    min_firmware_version: 2
{extra}spiffe_id:
  prefix: spiffe://dev.herald.test/node/
  template: "spiffe://dev.herald.test/node/{{ek_hash}}"
grants:
  x509_svid: {{ max_ttl: 10m }}
"#,
        one = "11".repeat(32)
    );
    PolicySet::from_sources(&[(dir.join("nodes.yaml"), text)], &opts())
}

fn tpm_evidence(pcr7: &str, firmware: u64, enrolled: bool) -> Evidence {
    let mut claims = serde_json::Map::new();
    claims.insert("ek_hash".into(), json!("ab".repeat(32)));
    Evidence {
        tpm: Some(herald_policy::TpmEvidence {
            trusted_by: vec!["nodes".into()],
            claims,
            pcrs: (0u8..7)
                .map(|i| (i, hex::decode(Z).unwrap()))
                .chain([(7u8, hex::decode(pcr7).unwrap())])
                .collect(),
            firmware_version: firmware,
            enrolled,
        }),
        ..Evidence::default()
    }
}

#[test]
fn tpm_policies_check_golden_sets_firmware_and_trusting_roots() {
    let dir = tempfile::tempdir().unwrap();
    let set = tpm_policy(dir.path(), "").unwrap();
    let (name, rules) = set.tpm_policies().next().unwrap();
    assert_eq!(name, "nodes");
    assert_eq!(rules.pcrs, vec![0, 7]);
    assert_eq!(rules.ek_roots.len(), 1);

    // Either golden set admits the node (an OS update rolling out).
    let d = set.evaluate(&tpm_evidence(Z, 2, false)).unwrap();
    assert_eq!(d.golden_set.as_deref(), Some("old-image"));
    assert_eq!(
        d.spiffe_id.as_str(),
        format!("spiffe://dev.herald.test/node/{}", "ab".repeat(32))
    );
    assert_eq!(d.factors, vec![Factor::Tpm]);
    let d = set
        .evaluate(&tpm_evidence(&"11".repeat(32), 3, false))
        .unwrap();
    assert_eq!(d.golden_set.as_deref(), Some("new-image"));

    let off = set
        .evaluate(&tpm_evidence(&"22".repeat(32), 2, false))
        .unwrap_err();
    assert_eq!(off.code, ErrorCode::TpmPcrOffPolicy);
    let old = set.evaluate(&tpm_evidence(Z, 1, false)).unwrap_err();
    assert_eq!(old.code, ErrorCode::TpmFirmwareRefused);

    // Only policies whose roots the EK chains to are candidates.
    let mut untrusted = tpm_evidence(Z, 2, false);
    if let Some(t) = untrusted.tpm.as_mut() {
        t.trusted_by.clear();
    }
    assert_eq!(
        set.evaluate(&untrusted).unwrap_err().code,
        ErrorCode::PolicyDenied
    );
    // TPM evidence never satisfies an OIDC policy, nor OIDC a TPM one.
    assert!(set.oidc_issuers().is_empty());
}

#[test]
fn tpm_enrolment_factor_is_required_only_before_enrolment() {
    let dir = tempfile::tempdir().unwrap();
    let set = tpm_policy(dir.path(), "").unwrap();
    assert!(set.evaluate(&tpm_evidence(Z, 2, false)).is_ok());
    // The shipped node policy with `require: [join_token]`.
    let src = std::fs::read_to_string(examples().join("tpm-node.yaml")).unwrap();
    let src = src.replacen(
        "evidence:\n  tpm:\n",
        "evidence:\n  require: [join_token]\n  tpm:\n",
        1,
    );
    let err = PolicySet::from_sources(&[(examples().join("tpm-node.yaml"), src.clone())], &opts())
        .unwrap_err();
    // The shipped tests now fail: the first attestation lacks the join token.
    assert!(err.to_string().contains("factor_missing"), "{err}");
    let no_tests = src.split("\ntests:").next().unwrap().to_string();
    let set =
        PolicySet::from_sources(&[(examples().join("tpm-node.yaml"), no_tests)], &opts()).unwrap();
    let mut ev = tpm_evidence(Z, 0, false);
    if let Some(t) = ev.tpm.as_mut() {
        t.trusted_by = vec!["tpm-nodes".into()];
    }
    assert_eq!(
        set.evaluate(&ev).unwrap_err().code,
        ErrorCode::FactorMissing
    );
    let id = format!("spiffe://dev.herald.test/node/tpm/{}", "ab".repeat(32));
    // A second-factor token is no enrolment factor; an enrolment token
    // naming other policies is none for this one.
    for wrong in [
        token(&id, JoinTokenPurpose::SecondFactor, &["tpm-nodes"]),
        token(&id, JoinTokenPurpose::NodeEnrolment, &["other-nodes"]),
    ] {
        ev.join_token = Some(wrong);
        assert_eq!(
            set.evaluate(&ev).unwrap_err().code,
            ErrorCode::FactorMissing
        );
    }
    ev.join_token = Some(token(&id, JoinTokenPurpose::NodeEnrolment, &[]));
    let d = set.evaluate(&ev).unwrap();
    assert_eq!(d.factors, vec![Factor::Tpm, Factor::JoinToken]);
    // An enrolled node re-attests with its TPM alone.
    ev.join_token = None;
    if let Some(t) = ev.tpm.as_mut() {
        t.enrolled = true;
    }
    assert!(set.evaluate(&ev).is_ok());
}

#[test]
fn broken_tpm_policies_are_refused_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    tpm_policy(dir.path(), "").unwrap();
    let load = |text: String| {
        PolicySet::from_sources(&[(dir.path().join("x.yaml"), text)], &opts())
            .unwrap_err()
            .to_string()
    };
    let base = |tpm: &str| {
        format!(
            "name: n\nevidence:\n  tpm:\n{tpm}spiffe_id:\n  prefix: spiffe://dev.herald.test/node/\n  template: \"spiffe://dev.herald.test/node/{{ek_hash}}\"\ngrants:\n  x509_svid: {{ max_ttl: 10m }}\n"
        )
    };
    let e = load(base(&format!(
        "    ek_roots: [roots/missing.pem]\n    pcrs: [0]\n    golden: [{{ name: g, pcrs: {{ 0: \"{Z}\" }} }}]\n"
    )));
    assert!(e.contains("missing.pem"), "{e}");
    let e = load(base(&format!(
        "    ek_roots: [roots/root.pem]\n    pcrs: [0]\n    golden: [{{ name: g, pcrs: {{ 7: \"{Z}\" }} }}]\n"
    )));
    assert!(e.contains("not in evidence.tpm.pcrs"), "{e}");
    let e = load(base(
        "    ek_roots: [roots/root.pem]\n    pcrs: [0]\n    golden: [{ name: g, pcrs: { 0: \"zz\" } }]\n",
    ));
    assert!(e.contains("64 hex digits"), "{e}");
    let e = load(base(
        "    ek_roots: [roots/root.pem]\n    pcrs: [0]\n    golden: []\n",
    ));
    assert!(e.contains("deny by default"), "{e}");
    let e = load(base(&format!(
        "    ek_roots: [roots/root.pem]\n    pcr_bank: sha1\n    pcrs: [0, 0, 30]\n    golden: [{{ name: g, pcrs: {{ 0: \"{Z}\" }} }}]\n"
    )));
    assert!(e.contains("sha1") && e.contains("distinct indices"), "{e}");
}

#[test]
fn node_policies_register_workloads_and_refuse_broken_registrations() {
    let set = PolicySet::load_dir(&examples(), &opts()).unwrap();
    let regs = set.policy("tpm-nodes").unwrap().registrations();
    assert_eq!(regs.len(), 4);
    assert!(matches!(
        &regs[3].spiffe_id,
        herald_core::RegisteredId::Template(t)
            if t.as_str() == "spiffe://dev.herald.test/ns/{k8s:ns}/sa/{k8s:sa}"
    ));
    assert_eq!(
        regs[2].selectors,
        vec![
            herald_core::Selector::K8sNamespace("payments".into()),
            herald_core::Selector::K8sServiceAccount("api".into()),
        ]
    );
    assert_eq!(
        regs[0].spiffe_id.as_str(),
        "spiffe://dev.herald.test/workload/web"
    );
    assert_eq!(regs[0].ttl, std::time::Duration::from_secs(1800));
    assert_eq!(regs[0].jwt_audiences, vec!["api.internal".to_string()]);
    assert_eq!(
        regs[0].selectors,
        vec![
            herald_core::Selector::Uid(1000),
            herald_core::Selector::Path("/usr/local/bin/web".into())
        ]
    );
    // OIDC policies cannot register workloads.
    let with = format!(
        "{BASE}workloads:\n  - {{ spiffe_id: spiffe://dev.herald.test/w, selectors: [\"unix:uid:1\"] }}\n"
    );
    let e = load(&with).unwrap_err().to_string();
    assert!(e.contains("node policies only"), "{e}");
    // Broken registrations on a node policy.
    let src = std::fs::read_to_string(examples().join("tpm-node.yaml")).unwrap();
    let no_tests = src.split("\ntests:").next().unwrap().to_string();
    for (bad, reason) in [
        ("unix:uid:1000", "not in"), // foreign trust domain (below)
        ("k8s:namespace:default", "unknown k8s kind"),
        ("k8s:pod-label:app", "k8s:pod-label:<key>:<value>"),
        ("unix:path:relative", "absolute"),
    ] {
        let text = if reason == "not in" {
            no_tests.replace(
                "spiffe_id: spiffe://dev.herald.test/workload/web",
                "spiffe_id: spiffe://other.test/workload/web",
            )
        } else {
            no_tests.replace("\"unix:uid:1000\"", &format!("\"{bad}\""))
        };
        let e = PolicySet::from_sources(&[(examples().join("tpm-node.yaml"), text)], &opts())
            .unwrap_err()
            .to_string();
        assert!(e.contains(reason), "{bad}: {e}");
    }
    let under_nodes = no_tests.replace(
        "spiffe_id: spiffe://dev.herald.test/workload/web",
        "spiffe_id: spiffe://dev.herald.test/node/evil",
    );
    let e = PolicySet::from_sources(&[(examples().join("tpm-node.yaml"), under_nodes)], &opts())
        .unwrap_err()
        .to_string();
    assert!(e.contains("node identities' prefix"), "{e}");
    // Templates: checked whole at load — a placeholder is a whole segment
    // naming a single-valued selector kind, and no expansion may reach the
    // node identities or Herald's own.
    for (template, reason) in [
        ("spiffe://dev.herald.test/ns-{k8s:ns}", "whole path segment"),
        (
            "spiffe://dev.herald.test/{k8s:pod-label}",
            "unknown placeholder",
        ),
        ("spiffe://other.test/{k8s:ns}", "not in trust domain"),
        (
            "spiffe://dev.herald.test/{k8s:ns}/x",
            "node identities' prefix",
        ),
        (
            "spiffe://dev.herald.test/{k8s:sa}",
            "reserved for Herald's own",
        ),
        (
            "spiffe://dev.herald.test/herald/x",
            "reserved for Herald's own",
        ),
    ] {
        let text = no_tests.replace(
            "spiffe_id: spiffe://dev.herald.test/workload/web",
            &format!("spiffe_id: \"{template}\""),
        );
        let e = PolicySet::from_sources(&[(examples().join("tpm-node.yaml"), text)], &opts())
            .unwrap_err()
            .to_string();
        assert!(e.contains(reason), "{template}: {e}");
    }
}

#[test]
fn a_template_registration_admits_only_what_it_could_build() {
    use herald_attest::VerifiedSvid;
    use herald_core::Origin;
    let set = PolicySet::load_dir(&examples(), &opts()).unwrap();
    let node = VerifiedSvid {
        spiffe_id: SpiffeId::parse("spiffe://dev.herald.test/node/tpm/abc").unwrap(),
        serial: "01".into(),
        not_before: 0,
        not_after: i64::MAX,
        spki_sha256: String::new(),
        dns_names: Vec::new(),
        cert_sha256: String::new(),
        origin: Origin::Node,
        policy: Some("tpm-nodes".into()),
        root_serial: "01".into(),
        root_at: 0,
    };
    // `spiffe://…/ns/{k8s:ns}/sa/{k8s:sa}` registered for `k8s:ns:apps`.
    let d = set
        .workload(&node, "spiffe://dev.herald.test/ns/apps/sa/billing")
        .unwrap();
    assert_eq!(
        d.spiffe_id.as_str(),
        "spiffe://dev.herald.test/ns/apps/sa/billing"
    );
    assert_eq!(d.policy, "tpm-nodes");
    let x509 = d.grants.x509_svid.unwrap();
    assert_eq!(x509.max_ttl, std::time::Duration::from_secs(1800));
    // The fixed registration of the same shape keeps its own grants.
    assert!(
        set.workload(&node, "spiffe://dev.herald.test/ns/payments/sa/api")
            .is_ok()
    );
    for refused in [
        // The namespace the registration fixes, and nothing else.
        "spiffe://dev.herald.test/ns/payments/sa/billing",
        // Not the template's shape.
        "spiffe://dev.herald.test/ns/apps/sa/billing/extra",
        "spiffe://dev.herald.test/ns/apps/sb/billing",
        "spiffe://dev.herald.test/ns/apps/sa/%2e%2e",
    ] {
        let e = set.workload(&node, refused).unwrap_err();
        assert_eq!(
            e.code,
            herald_core::ErrorCode::WorkloadNotRegistered,
            "{refused}"
        );
    }
}

#[test]
fn a_workload_may_not_claim_the_servers_dns_names() {
    let src = std::fs::read_to_string(examples().join("tpm-node.yaml")).unwrap();
    let path = examples().join("tpm-node.yaml");
    let mut reserved = opts();
    reserved.reserved_dns_names = vec!["herald.example.org".into(), "Localhost".into()];
    PolicySet::from_sources(&[(path.clone(), src.clone())], &reserved).unwrap();
    for claim in ["herald.example.org", "HERALD.example.org.", "localhost"] {
        let text = src.replace(
            "dns_names: [web.internal]",
            &format!("dns_names: [web.internal, {claim}]"),
        );
        assert_ne!(text, src, "the example still registers web.internal");
        let e = PolicySet::from_sources(&[(path.clone(), text.clone())], &reserved)
            .unwrap_err()
            .to_string();
        assert!(e.contains("one of the server's own names"), "{claim}: {e}");
        // Without the server's names (`herald policy check`) it loads.
        PolicySet::from_sources(&[(path.clone(), text)], &opts()).unwrap();
    }
}

#[test]
fn more_shared_issuers_need_a_tenant_pin() {
    for (issuer, pin) in [
        (
            "https://accounts.google.com",
            "email: deployer@acme.iam.gserviceaccount.com",
        ),
        (
            "https://app.terraform.io",
            "terraform_organization_name: acme",
        ),
    ] {
        let text = BASE.replace("https://issuer.example.com", issuer);
        let e = load(&text).unwrap_err().to_string();
        assert!(e.contains("shared by every tenant"), "{issuer}: {e}");
        load(&text.replace("  team: core", &format!("  team: core\n  {pin}"))).unwrap();
    }
}

#[test]
fn a_factor_in_a_condition_is_as_bound_as_a_required_one() {
    use herald_attest::VerifiedSvid;
    use herald_core::Origin;
    // No `require:`, only the condition asks for the caller's SVID.
    let text = BASE.replace(
        "condition: claims.env == \"prod\"",
        "condition: claims.env == \"prod\" && \"x509_svid\" in factors",
    );
    let set = load(&text).unwrap();
    let svid = |id: &str| VerifiedSvid {
        spiffe_id: SpiffeId::parse(id).unwrap(),
        serial: "0a".into(),
        not_before: 0,
        not_after: i64::MAX,
        spki_sha256: String::new(),
        dns_names: Vec::new(),
        cert_sha256: String::new(),
        origin: Origin::Bootstrap,
        policy: None,
        root_serial: "0a".into(),
        root_at: 0,
    };
    let mut ev = oidc(
        "https://issuer.example.com",
        json!({"team": "core", "env": "prod", "service": "db"}),
    );
    // Any SVID at all used to satisfy `in factors`: one for another
    // identity does not.
    ev.x509_svid = Some(svid("spiffe://dev.herald.test/svc/other"));
    assert_eq!(set.evaluate(&ev).unwrap_err().code, ErrorCode::PolicyDenied);
    ev.x509_svid = Some(svid("spiffe://dev.herald.test/svc/db"));
    assert!(set.evaluate(&ev).is_ok());
    // Likewise a join token: only one bound to the identity and made as
    // this policy's second factor counts.
    let text = BASE.replace(
        "condition: claims.env == \"prod\"",
        "condition: claims.env == \"prod\" && \"join_token\" in factors",
    );
    let set = load(&text).unwrap();
    ev.x509_svid = None;
    ev.join_token = Some(token(
        "spiffe://dev.herald.test/svc/db",
        JoinTokenPurpose::Bootstrap,
        &[],
    ));
    assert!(set.evaluate(&ev).is_err());
    ev.join_token = Some(token(
        "spiffe://dev.herald.test/svc/db",
        JoinTokenPurpose::SecondFactor,
        &["p"],
    ));
    assert!(set.evaluate(&ev).is_ok());
}

fn platform_token(claims: Value) -> herald_policy::PlatformTokenEvidence {
    herald_policy::PlatformTokenEvidence {
        issuer: "https://k8s.test".into(),
        audiences: vec!["herald".into()],
        claims: claims.as_object().unwrap().clone(),
        enrolled: false,
    }
}

#[test]
fn a_tpm_policy_can_require_a_platform_token_at_every_attestation() {
    let dir = tempfile::tempdir().unwrap();
    let mfa = "  platform_token: { issuer: https://k8s.test, audiences: [herald], cluster: c1 }\n  require: [platform_token]\ncondition: '\"platform_token\" in factors && claims.platform_token.cluster == \"c1\" && claims.platform_token.node == \"n1\"'\n";
    let set = tpm_policy(dir.path(), mfa).unwrap();
    let node = json!({"kubernetes.io": {"node": {"name": "n1"}}, "node": "n1"});
    // The quote and the token: granted, both factors recorded.
    let mut both = tpm_evidence(Z, 2, false);
    both.platform_token = Some(platform_token(node.clone()));
    let d = set.evaluate(&both).unwrap();
    assert_eq!(d.factors, vec![Factor::Tpm, Factor::PlatformToken]);
    // The quote alone, even once enrolled: refused (unlike a join token,
    // the platform token is fresh evidence required every time).
    for enrolled in [false, true] {
        let d = set.evaluate(&tpm_evidence(Z, 2, enrolled)).unwrap_err();
        assert_eq!(d.code, ErrorCode::PolicyDenied, "{}", d.reason);
    }
    // A token from another issuer is no factor.
    let mut other = tpm_evidence(Z, 2, false);
    let mut t = platform_token(node);
    t.issuer = "https://other.test".into();
    other.platform_token = Some(t);
    assert!(set.evaluate(&other).is_err());
    // Without a condition naming it, the missing factor is what is reported.
    let dir = tempfile::tempdir().unwrap();
    let bare = "  platform_token: { issuer: https://k8s.test, audiences: [herald] }\n  require: [platform_token]\n";
    let set = tpm_policy(dir.path(), bare).unwrap();
    let d = set.evaluate(&tpm_evidence(Z, 2, true)).unwrap_err();
    assert_eq!(d.code, ErrorCode::FactorMissing);
}

#[test]
fn node_evidence_shapes_are_checked_at_load() {
    let dir = tempfile::tempdir().unwrap();
    // A TPM policy naming a platform token it does not require, or the reverse.
    let e = tpm_policy(
        dir.path(),
        "  platform_token: { issuer: https://k8s.test, audiences: [herald] }\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("exactly when"), "{e}");
    let e = tpm_policy(dir.path(), "  require: [platform_token]\n")
        .unwrap_err()
        .to_string();
    assert!(e.contains("exactly when"), "{e}");
    let base = "spiffe_id:\n  prefix: spiffe://dev.herald.test/node/\n  template: \"spiffe://dev.herald.test/node/{node}\"\ngrants:\n  x509_svid: { max_ttl: 10m }\n";
    for (evidence, reason) in [
        // Two primaries.
        (
            "  platform_token: { issuer: https://k8s.test, audiences: [herald] }\n  aws_iid: { certificates: [a.pem] }\n",
            "exactly one of",
        ),
        // An OIDC policy cannot take a platform token factor.
        (
            "  oidc: { issuer: https://i.test, audiences: [a] }\n  require: [platform_token]\n",
            "not an OIDC policy's",
        ),
        (
            "  platform_token: { issuer: https://k8s.test, audiences: [], cluster: \"a/b\" }\n",
            "cluster must be",
        ),
        (
            "  platform_token: { issuer: https://k8s.test, audiences: [herald] }\n  require: [x509_svid]\n",
            "join_token at enrolment, nothing else",
        ),
        (
            "  aws_iid: { certificates: [missing.pem] }\n",
            "cannot read",
        ),
        // Google signs instance tokens for every project.
        (
            "  platform_token: { issuer: https://accounts.google.com, audiences: [herald] }\n",
            "pin one of project_id",
        ),
    ] {
        let text = format!("name: n\nevidence:\n{evidence}{base}");
        let e = PolicySet::from_sources(&[(dir.path().join("n.yaml"), text)], &opts())
            .unwrap_err()
            .to_string();
        assert!(e.contains(reason), "{reason}: {e}");
    }
}

#[test]
fn node_lineages_of_platform_and_aws_policies_renew_and_register_workloads() {
    let set = PolicySet::load_dir(&examples(), &opts()).unwrap();
    for name in ["kubernetes-nodes-prod-eu", "aws-instances"] {
        let p = set.policy(name).unwrap();
        assert!(p.is_node_policy());
        assert_eq!(p.registrations().len(), 1);
        let x = p.grants().x509_svid.as_ref().unwrap();
        assert!(x.max_lineage_age.is_some() && x.ttl.is_some());
    }
    assert_eq!(set.aws_iid_policies().count(), 1);
    assert!(
        set.oidc_issuers().contains(
            &"https://oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLED539D4633E53DE1B71EXAMPLE"
        )
    );
}
