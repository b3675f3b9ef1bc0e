//! `herald policy explain FILE`: what one policy accepts and grants, in
//! words. The file is loaded exactly as the server would load it (a policy
//! that would be refused is not explained), then described from what its
//! author wrote.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::model::{FactorName, PolicyFile, TestSpec};
use crate::{DEFAULT_LINEAGE_AGE, LoadError, LoadErrors, LoadOptions, MAX_FILE_BYTES};

/// Loads and checks the policy in `path` (embedded tests included) and
/// describes it: the evidence it accepts, the identity it gives, the
/// credentials it grants, the workloads it registers and its tests.
pub fn explain(path: &Path, opts: &LoadOptions) -> Result<String, LoadErrors> {
    let one = |reason: String| {
        LoadErrors(vec![LoadError {
            path: path.to_path_buf(),
            line: None,
            reason,
        }])
    };
    let meta = std::fs::metadata(path).map_err(|e| one(e.to_string()))?;
    if meta.len() > MAX_FILE_BYTES as u64 {
        return Err(one(format!("file exceeds {MAX_FILE_BYTES} bytes")));
    }
    let text = std::fs::read_to_string(path).map_err(|e| one(e.to_string()))?;
    let (_, outcomes) = crate::compile_sources(&[(path.to_path_buf(), text.clone())], opts)?;
    let file = crate::parse_file(path, &text).map_err(LoadErrors)?;
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    Ok(describe(path, &file, outcomes.len(), failed))
}

fn list(items: &[String]) -> String {
    match items {
        [] => "none".to_owned(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn describe(path: &Path, f: &PolicyFile, tests: usize, failed: usize) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "policy {} ({})", f.name, path.display());
    if let Some(d) = &f.description {
        let _ = writeln!(o, "  {d}");
    }

    let _ = writeln!(o, "\nAccepts");
    let ev = &f.evidence;
    if let Some(oidc) = &ev.oidc {
        let _ = writeln!(
            o,
            "  an OIDC ID token issued by {} for the audience {}",
            oidc.issuer,
            list(&oidc.audiences)
        );
    }
    if let Some(t) = &ev.tpm {
        let pcrs: Vec<String> = t.pcrs.iter().map(u8::to_string).collect();
        let _ = writeln!(
            o,
            "  a TPM 2.0 node: EK certificate chaining to {}{}, the AK bound to that EK by credential activation, and a quote over PCRs {} ({} bank)",
            t.ek_roots.join(", "),
            if t.ek_intermediates.is_empty() {
                String::new()
            } else {
                format!(" (intermediates {})", t.ek_intermediates.join(", "))
            },
            pcrs.join(", "),
            t.pcr_bank
        );
        let golden: Vec<String> = t
            .golden
            .iter()
            .map(|g| {
                let idx: Vec<String> = g.pcrs.keys().map(u8::to_string).collect();
                format!("{} (PCRs {})", g.name, idx.join(", "))
            })
            .collect();
        let _ = writeln!(
            o,
            "    whose PCR values match one golden set: {}",
            list(&golden)
        );
        if let Some(v) = t.min_firmware_version {
            let _ = writeln!(o, "    with firmware version at least {v}");
        }
    }
    if let Some(j) = &ev.join_token {
        let _ = writeln!(
            o,
            "  a join token created for {} (herald token create{}), presented on its own; the identity is the token's own SPIFFE ID",
            list(&j.purposes),
            if j.purposes.iter().any(|p| p == "break_glass") {
                " [--break-glass --reason ...]"
            } else {
                ""
            }
        );
    }
    if let (Some(p), None) = (&ev.platform_token, &ev.tpm) {
        let _ = writeln!(
            o,
            "  a node's platform token (Kubernetes projected service-account token or GCP instance identity) issued by {} for the audience {}, naming its node, used once",
            p.issuer,
            list(&p.audiences)
        );
    }
    if let Some(a) = &ev.aws_iid {
        let _ = writeln!(
            o,
            "  an AWS EC2 instance identity document signed with the key of {}{}; each instance enrols once, bound to its agent's key",
            a.certificates.join(", "),
            a.max_age
                .as_ref()
                .map(|m| format!(", its instance launched at most {m} ago"))
                .unwrap_or_default()
        );
    }
    let node = ev.tpm.is_some() || ev.platform_token.is_some() || ev.aws_iid.is_some();
    for factor in &ev.require {
        let _ = match factor {
            FactorName::PlatformToken => writeln!(
                o,
                "  and, at every attestation, a platform token issued by {} (machine MFA)",
                ev.platform_token
                    .as_ref()
                    .map_or("?", |p| p.issuer.as_str())
            ),
            FactorName::JoinToken if node => writeln!(
                o,
                "  and, at enrolment, a join token created with --purpose node"
            ),
            FactorName::JoinToken => writeln!(
                o,
                "  and a join token created as this policy's second factor (--purpose second-factor --policy {}), bound to the same SPIFFE ID",
                f.name
            ),
            FactorName::X509Svid => writeln!(
                o,
                "  and a current X.509 SVID of the same SPIFFE ID presented over mTLS"
            ),
        };
    }
    if !f.pins.is_empty() {
        let pins: Vec<String> = f
            .pins
            .iter()
            .map(|(k, v)| format!("{k} = {}", scalar(v)))
            .collect();
        let _ = writeln!(o, "  only if these claims are exactly: {}", pins.join(", "));
    }
    if let Some(c) = &f.condition {
        let _ = writeln!(o, "  only if this CEL condition holds: {}", c.trim());
    }

    let _ = writeln!(o, "\nIdentity");
    let sid = &f.spiffe_id;
    match (&sid.template, &sid.expression) {
        (Some(t), _) => {
            let _ = writeln!(o, "  {t}  (claims filled in, each one path segment)");
        }
        (None, Some(e)) => {
            let _ = writeln!(o, "  the value of the CEL expression {}", e.trim());
        }
        (None, None) => {
            let _ = writeln!(o, "  the SPIFFE ID the join token is bound to");
        }
    }
    let _ = writeln!(
        o,
        "  always under {} (anything else is refused)",
        sid.prefix
    );

    let _ = writeln!(o, "\nGrants");
    let g = &f.grants;
    let renews = ev.tpm.is_some() || ev.join_token.is_some();
    if let Some(x) = &g.x509_svid {
        let renewal = if renews {
            format!(
                "renewable over mTLS for {} after the fresh evidence, then new evidence is needed",
                x.max_lineage_age.clone().unwrap_or_else(|| format!(
                    "{} (the default)",
                    herald_core::duration::format_exact(DEFAULT_LINEAGE_AGE)
                ))
            )
        } else {
            "not renewable: each one needs fresh evidence".to_owned()
        };
        let _ = writeln!(
            o,
            "  X.509 SVIDs valid for at most {}, {renewal}",
            x.max_ttl
        );
        if !x.federates_with.is_empty() {
            let _ = writeln!(
                o,
                "    handed out with the bundles of the federated trust domains {}",
                list(&x.federates_with)
            );
        }
    }
    if let Some(j) = &g.jwt_svid {
        let _ = writeln!(
            o,
            "  JWT-SVIDs valid for at most {}, for the audience {}",
            j.max_ttl,
            list(&j.audiences)
        );
    }
    for c in &g.cloud {
        let _ = writeln!(
            o,
            "  session credentials for the role {}, for at most {}; the role allows: {}",
            c.role_arn,
            c.max_ttl,
            scope_words(&c.scope)
        );
    }
    if g.x509_svid.is_none() && g.jwt_svid.is_none() && g.cloud.is_empty() {
        let _ = writeln!(o, "  nothing");
    }

    if !f.workloads.is_empty() {
        let _ = writeln!(
            o,
            "\nWorkloads on the nodes it admits (the agent's Workload API)"
        );
        for w in &f.workloads {
            let mut extras = Vec::new();
            if let Some(t) = &w.ttl {
                extras.push(format!("X.509 SVID for {t}"));
            }
            if !w.dns_names.is_empty() {
                extras.push(format!("DNS names {}", w.dns_names.join(", ")));
            }
            if !w.jwt_audiences.is_empty() {
                extras.push(format!("JWT-SVIDs for {}", w.jwt_audiences.join(", ")));
            }
            if let Some(r) = &w.cloud_role {
                extras.push(format!("credentials for {r}"));
            }
            if !w.federates_with.is_empty() {
                extras.push(format!("the bundles of {}", w.federates_with.join(", ")));
            }
            if herald_core::IdTemplate::is_template(&w.spiffe_id) {
                extras.push(
                    "one identity per caller, its placeholders filled from the caller's own selectors"
                        .into(),
                );
            }
            let _ = writeln!(
                o,
                "  {} to callers matching all of: {}{}",
                w.spiffe_id,
                w.selectors.join(", "),
                if extras.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", extras.join("; "))
                }
            );
        }
    }

    let _ = writeln!(o, "\nTests");
    let _ = writeln!(o, "  {}", tests_words(&f.tests, tests, failed));
    let _ = writeln!(
        o,
        "\nAnything else is refused (deny by default); every decision is audited."
    );
    o
}

fn tests_words(specs: &[TestSpec], ran: usize, failed: usize) -> String {
    if ran == 0 {
        return "no embedded tests".to_owned();
    }
    let allowed = specs.iter().filter(|t| t.expect.allow).count();
    let status = if failed == 0 {
        "all pass".to_owned()
    } else {
        format!("{failed} FAIL")
    };
    format!(
        "{ran} embedded tests, {status}: {allowed} expect an allow, {} a refusal",
        ran - allowed
    )
}

/// An IAM-style policy document in a line: "Allow a, b on x, y; Deny ...".
fn scope_words(scope: &Value) -> String {
    let as_list = |v: Option<&Value>| -> Vec<String> {
        match v {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_str().map_or_else(|| x.to_string(), str::to_owned))
                .collect(),
            _ => Vec::new(),
        }
    };
    let statements = match scope.get("Statement") {
        Some(Value::Array(a)) => a.clone(),
        Some(one @ Value::Object(_)) => vec![one.clone()],
        _ => Vec::new(),
    };
    let parts: Vec<String> = statements
        .iter()
        .map(|s| {
            format!(
                "{} {} on {}",
                s.get("Effect").and_then(Value::as_str).unwrap_or("?"),
                as_list(s.get("Action")).join(", "),
                as_list(s.get("Resource")).join(", ")
            )
        })
        .collect();
    if parts.is_empty() {
        "nothing".to_owned()
    } else {
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn opts() -> LoadOptions {
        LoadOptions::new(herald_core::TrustDomain::new("dev.herald.test").unwrap())
    }

    fn examples() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../attestation-policies")
    }

    #[test]
    fn every_example_policy_is_explained() {
        let mut seen = 0;
        for entry in std::fs::read_dir(examples()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = explain(&path, &opts()).unwrap();
            for heading in ["\nAccepts\n", "\nIdentity\n", "\nGrants\n", "\nTests\n"] {
                assert!(text.contains(heading), "{}: {text}", path.display());
            }
            assert!(text.contains("all pass"), "{}: {text}", path.display());
            seen += 1;
        }
        assert!(seen >= 5, "only {seen} example policies");
    }

    #[test]
    fn the_words_follow_the_file() {
        let text = explain(&examples().join("github-actions-deploy.yaml"), &opts()).unwrap();
        for want in [
            "policy github-actions-deploy",
            "an OIDC ID token issued by https://token.actions.githubusercontent.com for the audience herald",
            "repository_owner_id = \"1342004\"",
            "claims.ref == \"refs/heads/main\"",
            "under spiffe://dev.herald.test/ci/github/",
            "X.509 SVIDs valid for at most 15m, not renewable",
            "JWT-SVIDs valid for at most 5m, for the audience deployer",
            "session credentials for the role arn:aws:iam::123456789012:role/webapp-deploy, for at most 1h",
            "Allow s3:GetObject, s3:PutObject, s3:ListBucket on arn:aws:s3:::acme-webapp-artifacts",
            "5 embedded tests, all pass: 1 expect an allow, 4 a refusal",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        let tpm = explain(&examples().join("tpm-node.yaml"), &opts()).unwrap();
        for want in [
            "a TPM 2.0 node: EK certificate chaining to tpm-roots/example-swtpm-root.pem",
            "pristine-software-tpm (PCRs 0, 2, 4, 7)",
            "renewable over mTLS for 24h (the default)",
            "spiffe://dev.herald.test/workload/web to callers matching all of: unix:uid:1000, unix:path:/usr/local/bin/web",
        ] {
            assert!(tpm.contains(want), "missing {want:?} in:\n{tpm}");
        }
    }

    #[test]
    fn a_policy_the_server_would_refuse_is_not_explained() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        // A prefix in another trust domain.
        std::fs::write(
            &path,
            "name: p\nevidence:\n  join_token: {}\nspiffe_id:\n  prefix: spiffe://other.test/x/\ngrants:\n  x509_svid: { max_ttl: 1h }\n",
        )
        .unwrap();
        let err = explain(&path, &opts()).unwrap_err();
        assert!(err.to_string().contains("p.yaml"), "{err}");
        assert!(explain(&dir.path().join("missing.yaml"), &opts()).is_err());
    }

    #[test]
    fn federation_is_named_and_a_policy_cannot_federate_with_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        let policy = |with: &str| {
            format!(
                "name: p\nevidence:\n  join_token: {{}}\nspiffe_id:\n  prefix: spiffe://dev.herald.test/x/\ngrants:\n  x509_svid: {{ max_ttl: 1h, federates_with: [{with}] }}\n"
            )
        };
        std::fs::write(&path, policy("spiffe://partner.test")).unwrap();
        let text = explain(&path, &opts()).unwrap();
        assert!(
            text.contains("bundles of the federated trust domains spiffe://partner.test"),
            "{text}"
        );
        std::fs::write(&path, policy("dev.herald.test")).unwrap();
        let err = explain(&path, &opts()).unwrap_err();
        assert!(err.to_string().contains("is this trust domain"), "{err}");
    }
}
