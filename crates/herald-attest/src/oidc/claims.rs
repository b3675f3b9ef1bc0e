//! Claim normalisation, so policies compare like with like whichever CI
//! platform minted the token.
//!
//! - Claims that are booleans in meaning but strings on the wire (GitLab's
//!   and GitHub's `ref_protected: "true"`) become JSON booleans. Only the
//!   claims listed in [`BOOLEAN_CLAIMS`] are touched: converting every
//!   `"true"` would turn a branch named `true` into a boolean.
//! - Identifier claims (`*_id`, `id`) that arrive as integers (Buildkite,
//!   some GitLab versions) become decimal strings, the form GitHub and
//!   GitLab.com send, so a pin `project_id: "42"` matches either.
//! - Nested objects (Kubernetes' `kubernetes.io`) are kept as they are.

use serde_json::{Map, Value};

/// Claims normalised from `"true"`/`"false"` strings to booleans.
pub const BOOLEAN_CLAIMS: &[&str] = &[
    "ref_protected",
    "environment_protected",
    "build_branch_protected",
    "is_protected",
];

/// Normalises a verified token's claims in place (see the module docs).
pub fn normalise(claims: &mut Map<String, Value>) {
    for (name, value) in claims.iter_mut() {
        if BOOLEAN_CLAIMS.contains(&name.as_str()) {
            if let Value::String(s) = value {
                match s.as_str() {
                    "true" => *value = Value::Bool(true),
                    "false" => *value = Value::Bool(false),
                    _ => {}
                }
            }
        } else if (name == "id" || name.ends_with("_id"))
            && let Value::Number(n) = value
            && (n.is_u64() || n.is_i64())
        {
            *value = Value::String(n.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn normalises_gitlab_and_ids_only() {
        let mut c = json!({
            "ref_protected": "true",
            "environment_protected": "false",
            "ref": "true",
            "project_id": 42,
            "namespace_id": "7",
            "exp": 1700000000,
            "kubernetes.io": {"namespace": "prod"}
        })
        .as_object()
        .cloned()
        .unwrap();
        normalise(&mut c);
        assert_eq!(c["ref_protected"], json!(true));
        assert_eq!(c["environment_protected"], json!(false));
        assert_eq!(
            c["ref"],
            json!("true"),
            "a branch named true stays a string"
        );
        assert_eq!(c["project_id"], json!("42"));
        assert_eq!(c["namespace_id"], json!("7"));
        assert_eq!(c["exp"], json!(1700000000));
        assert_eq!(c["kubernetes.io"]["namespace"], json!("prod"));
    }
}
