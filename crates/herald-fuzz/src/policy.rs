//! Attestation policies: the YAML model and the CEL expressions compiled at
//! load, then a decision over fixed OIDC evidence.

use std::path::PathBuf;

use herald_core::{ErrorCode, TrustDomain};
use herald_policy::{Evidence, LoadOptions, OidcEvidence, PolicySet};
use serde_json::{Value, json};

/// The trust domain of the repository's example policies.
pub const TRUST_DOMAIN: &str = "dev.herald.test";
/// The prefix of the spliced policies' SPIFFE IDs.
const PREFIX: &str = "spiffe://dev.herald.test/ci/";

/// Where a fuzzed policy file "is": beside the repository's examples, so
/// that the TPM example's relative root files resolve.
fn policy_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../attestation-policies/fuzz.yaml")
}

/// A policy for [`crate::jwt::ISSUER`] with `condition` and
/// `spiffe_id` (YAML flow values) spliced in.
pub fn spliced(condition: &str, spiffe_id: &str) -> String {
    format!(
        "name: fuzz\nevidence:\n  oidc:\n    issuer: {}\n    audiences: [{}]\n\
         condition: {condition}\nspiffe_id: {spiffe_id}\n\
         grants:\n  x509_svid: {{ max_ttl: 15m }}\n",
        crate::jwt::ISSUER,
        crate::jwt::AUDIENCE
    )
}

fn evidence() -> Evidence {
    let claims = json!({
        "iss": crate::jwt::ISSUER,
        "sub": "repo:acme/webapp:ref:refs/heads/main",
        "aud": crate::jwt::AUDIENCE,
        "repository": "webapp",
        "repository_owner": "acme",
        "ref": "refs/heads/main",
        "run_number": 42,
        "protected": true,
        "labels": ["a", "b", "c"],
        "kubernetes.io": { "namespace": "payments", "pod": { "name": "api-1" } },
    });
    let Value::Object(claims) = claims else {
        unreachable!("a JSON object literal")
    };
    Evidence {
        oidc: Some(OidcEvidence {
            issuer: crate::jwt::ISSUER.to_string(),
            audiences: vec![crate::jwt::AUDIENCE.to_string()],
            claims,
        }),
        ..Evidence::default()
    }
}

fn load(text: &str) -> Option<PolicySet> {
    let opts = LoadOptions::new(TrustDomain::new(TRUST_DOMAIN).expect("a trust domain"));
    let path = policy_path();
    match PolicySet::from_sources(&[(path.clone(), text.to_string())], &opts) {
        Ok(set) => {
            crate::accept();
            Some(set)
        }
        Err(errors) => {
            // Every problem is reported, against the file it is in.
            assert!(!errors.0.is_empty());
            assert!(errors.0.iter().all(|e| e.path == path));
            None
        }
    }
}

/// Mode 0: `rest` is a policy file. Mode 1: `rest` is a CEL `condition`,
/// spliced into a valid policy. Mode 2: `rest` is a CEL
/// `spiffe_id.expression`, spliced likewise. A set that loads is then
/// asked for a decision over fixed OIDC evidence.
pub fn policy(data: &[u8]) {
    let Some((mode, rest)) = crate::mode(data, 3) else {
        return;
    };
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    // A JSON string is a YAML flow scalar: the expression arrives intact.
    let quoted = || Value::from(text).to_string();
    let source = match mode {
        0 => text.to_string(),
        1 => spliced(
            &quoted(),
            &format!("{{ prefix: \"{PREFIX}\", template: \"{PREFIX}{{repository}}\" }}"),
        ),
        _ => spliced(
            "claims.ref == \"refs/heads/main\"",
            &format!("{{ prefix: \"{PREFIX}\", expression: {} }}", quoted()),
        ),
    };
    let Some(set) = load(&source) else {
        return;
    };
    match set.evaluate(&evidence()) {
        Ok(d) => {
            assert_eq!(d.spiffe_id.trust_domain().as_str(), TRUST_DOMAIN);
            if mode != 0 {
                assert!(
                    d.spiffe_id.as_str().starts_with(PREFIX),
                    "{} escapes its prefix",
                    d.spiffe_id.as_str()
                );
            }
        }
        Err(denial) => assert_ne!(denial.code, ErrorCode::Internal, "{denial:?}"),
    }
}
