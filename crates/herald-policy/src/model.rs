//! The policy file format, as written by operators (see the crate docs).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One policy file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFile {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub evidence: EvidenceSpec,
    #[serde(default)]
    pub pins: BTreeMap<String, Value>,
    #[serde(default)]
    pub condition: Option<String>,
    pub spiffe_id: SpiffeIdSpec,
    pub grants: GrantsSpec,
    #[serde(default)]
    pub workloads: Vec<WorkloadSpec>,
    #[serde(default)]
    pub tests: Vec<TestSpec>,
}

/// A workload registration: callers on a node's Workload API socket that
/// match every selector get this SPIFFE ID.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WorkloadSpec {
    pub spiffe_id: String,
    pub selectors: Vec<String>,
    #[serde(default)]
    pub ttl: Option<String>,
    #[serde(default)]
    pub dns_names: Vec<String>,
    #[serde(default)]
    pub jwt_audiences: Vec<String>,
    #[serde(default)]
    pub hint: Option<String>,
    #[serde(default)]
    pub cloud_role: Option<String>,
    #[serde(default)]
    pub federates_with: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EvidenceSpec {
    #[serde(default)]
    pub oidc: Option<OidcSpec>,
    #[serde(default)]
    pub tpm: Option<TpmSpec>,
    #[serde(default)]
    pub join_token: Option<JoinTokenSpec>,
    #[serde(default)]
    pub platform_token: Option<PlatformTokenSpec>,
    #[serde(default)]
    pub aws_iid: Option<AwsIidSpec>,
    #[serde(default)]
    pub require: Vec<FactorName>,
}

/// A platform OIDC token as node evidence on the attestation stream (a
/// Kubernetes projected service-account token, a GCP instance-identity
/// token) — on its own, or as a TPM policy's second factor.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PlatformTokenSpec {
    pub issuer: String,
    pub audiences: Vec<String>,
    /// A name for the cluster (or project) this issuer is, offered to pins,
    /// templates and conditions as the claim `cluster`.
    #[serde(default)]
    pub cluster: Option<String>,
}

/// An AWS EC2 instance identity document as node evidence.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AwsIidSpec {
    /// PEM files (relative to the policy file) with AWS's regional
    /// certificates for the base64 `signature`.
    pub certificates: Vec<String>,
    /// Documents whose `pendingTime` is older than this are refused.
    #[serde(default)]
    pub max_age: Option<String>,
}

/// Join tokens as the evidence itself: `herald svid mint` with a token
/// created for one of `purposes`. The SPIFFE ID is the token's own, which
/// must lie under the policy's prefix.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JoinTokenSpec {
    /// `bootstrap` and/or `break_glass`; default `[bootstrap]`.
    #[serde(default = "default_token_purposes")]
    pub purposes: Vec<String>,
}

fn default_token_purposes() -> Vec<String> {
    vec!["bootstrap".into()]
}

/// TPM 2.0 node evidence: whose EKs are trusted, which PCRs are quoted,
/// which values are good.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TpmSpec {
    /// PEM files (relative to the policy file) with manufacturer roots.
    #[serde(default)]
    pub ek_roots: Vec<String>,
    /// Accepted EKs by hash (hex SHA-256 of the EK's TPMT_PUBLIC), for
    /// vTPMs that carry no EK certificate.
    #[serde(default)]
    pub ek_hashes: Vec<String>,
    /// PEM files with intermediate CAs, if the TPMs do not carry them.
    #[serde(default)]
    pub ek_intermediates: Vec<String>,
    #[serde(default = "default_bank")]
    pub pcr_bank: String,
    pub pcrs: Vec<u8>,
    pub golden: Vec<GoldenSpec>,
    #[serde(default)]
    pub min_firmware_version: Option<u64>,
    /// Continuous attestation: `every_renewal`, or a duration after which
    /// a renewal needs a fresh quote.
    #[serde(default)]
    pub reattest: Option<String>,
}

fn default_bank() -> String {
    "sha256".into()
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GoldenSpec {
    pub name: String,
    pub pcrs: BTreeMap<u8, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OidcSpec {
    pub issuer: String,
    pub audiences: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FactorName {
    JoinToken,
    X509Svid,
    PlatformToken,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpiffeIdSpec {
    pub prefix: String,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub expression: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantsSpec {
    #[serde(default)]
    pub x509_svid: Option<X509Spec>,
    #[serde(default)]
    pub jwt_svid: Option<JwtSpec>,
    #[serde(default)]
    pub cloud: Vec<CloudSpec>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct X509Spec {
    pub max_ttl: String,
    /// How long after its fresh evidence a lineage may keep renewing (node
    /// and join-token policies only).
    #[serde(default)]
    pub max_lineage_age: Option<String>,
    #[serde(default)]
    pub federates_with: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JwtSpec {
    pub max_ttl: String,
    pub audiences: Vec<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CloudSpec {
    pub role_arn: String,
    pub max_ttl: String,
    pub scope: Value,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub evidence: TestEvidence,
    pub expect: Expect,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestEvidence {
    #[serde(default)]
    pub oidc: Option<TestOidc>,
    #[serde(default)]
    pub tpm: Option<TestTpm>,
    #[serde(default)]
    pub join_token: Option<TestJoinToken>,
    #[serde(default)]
    pub x509_svid: Option<TestFactor>,
    #[serde(default)]
    pub platform_token: Option<TestOidc>,
    #[serde(default)]
    pub aws_iid: Option<TestAwsIid>,
}

/// A verified AWS instance identity document in a test: its claims and how
/// long ago the instance was launched.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestAwsIid {
    pub claims: serde_json::Map<String, Value>,
    #[serde(default)]
    pub age: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestTpm {
    pub ek_hash: String,
    #[serde(default)]
    pub pcrs: BTreeMap<u8, String>,
    #[serde(default)]
    pub firmware_version: u64,
    #[serde(default)]
    pub enrolled: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestOidc {
    /// Defaults to the policy's issuer.
    #[serde(default)]
    pub issuer: Option<String>,
    /// Defaults to the policy's first audience.
    #[serde(default)]
    pub audiences: Option<Vec<String>>,
    pub claims: serde_json::Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestFactor {
    pub spiffe_id: String,
}

/// A join token in a test: by default one created for the role it plays
/// (bootstrap on its own, node enrolment beside TPM evidence, a second
/// factor naming the policy under test beside OIDC evidence).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestJoinToken {
    pub spiffe_id: String,
    #[serde(default)]
    pub purpose: Option<String>,
    #[serde(default)]
    pub policies: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Expect {
    pub allow: bool,
    #[serde(default)]
    pub spiffe_id: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const REFERENCE: &str = include_str!("../../../docs/policy-reference.md");

    fn s(v: &str) -> String {
        v.to_owned()
    }

    /// A policy with every key of the schema set, written as struct
    /// literals without `..`: a new field breaks this until it is added
    /// here, and then the reference test below until it is documented.
    fn every_key() -> PolicyFile {
        PolicyFile {
            name: s("n"),
            description: Some(s("d")),
            evidence: EvidenceSpec {
                oidc: Some(OidcSpec {
                    issuer: s("https://i"),
                    audiences: vec![s("a")],
                }),
                tpm: Some(TpmSpec {
                    ek_roots: vec![s("r.pem")],
                    ek_hashes: vec![s("h")],
                    ek_intermediates: vec![s("i.pem")],
                    pcr_bank: s("sha256"),
                    pcrs: vec![0],
                    golden: vec![GoldenSpec {
                        name: s("g"),
                        pcrs: BTreeMap::new(),
                    }],
                    min_firmware_version: Some(1),
                    reattest: Some(s("every_renewal")),
                }),
                join_token: Some(JoinTokenSpec {
                    purposes: vec![s("bootstrap")],
                }),
                platform_token: Some(PlatformTokenSpec {
                    issuer: s("https://k"),
                    audiences: vec![s("a")],
                    cluster: Some(s("c")),
                }),
                aws_iid: Some(AwsIidSpec {
                    certificates: vec![s("aws.pem")],
                    max_age: Some(s("1h")),
                }),
                require: vec![FactorName::JoinToken],
            },
            pins: BTreeMap::new(),
            condition: Some(s("true")),
            spiffe_id: SpiffeIdSpec {
                prefix: s("spiffe://t/"),
                template: Some(s("spiffe://t/x")),
                expression: Some(s("\"spiffe://t/x\"")),
            },
            grants: GrantsSpec {
                x509_svid: Some(X509Spec {
                    max_ttl: s("1h"),
                    max_lineage_age: Some(s("1h")),
                    federates_with: vec![s("spiffe://partner")],
                }),
                jwt_svid: Some(JwtSpec {
                    max_ttl: s("5m"),
                    audiences: vec![s("a")],
                }),
                cloud: vec![CloudSpec {
                    role_arn: s("arn"),
                    max_ttl: s("1h"),
                    scope: Value::Object(serde_json::Map::new()),
                }],
            },
            workloads: vec![WorkloadSpec {
                spiffe_id: s("spiffe://t/w"),
                selectors: vec![s("unix:uid:0")],
                ttl: Some(s("1h")),
                dns_names: vec![s("w")],
                jwt_audiences: vec![s("a")],
                hint: Some(s("h")),
                cloud_role: Some(s("arn")),
                federates_with: vec![s("spiffe://partner")],
            }],
            tests: vec![TestSpec {
                name: Some(s("t")),
                evidence: TestEvidence {
                    oidc: Some(TestOidc {
                        issuer: Some(s("https://i")),
                        audiences: Some(vec![s("a")]),
                        claims: serde_json::Map::new(),
                    }),
                    tpm: Some(TestTpm {
                        ek_hash: s("e"),
                        pcrs: BTreeMap::new(),
                        firmware_version: 1,
                        enrolled: true,
                    }),
                    join_token: Some(TestJoinToken {
                        spiffe_id: s("spiffe://t/x"),
                        purpose: Some(s("bootstrap")),
                        policies: Some(vec![s("n")]),
                    }),
                    x509_svid: Some(TestFactor {
                        spiffe_id: s("spiffe://t/x"),
                    }),
                    platform_token: Some(TestOidc {
                        issuer: Some(s("https://k")),
                        audiences: Some(vec![s("a")]),
                        claims: serde_json::Map::new(),
                    }),
                    aws_iid: Some(TestAwsIid {
                        claims: serde_json::Map::new(),
                        age: Some(s("1m")),
                    }),
                },
                expect: Expect {
                    allow: true,
                    spiffe_id: Some(s("spiffe://t/x")),
                    code: Some(s("policy_denied")),
                },
            }],
        }
    }

    /// Every key path: maps and lists of maps are walked (a list item's
    /// keys as `list[].key`); empty maps (free-form: pins, claims, scope,
    /// PCR values) and lists of scalars are leaves.
    fn paths(prefix: &str, v: &Value, out: &mut Vec<String>) {
        let walk = |key: &str, child: &Value, out: &mut Vec<String>| {
            let path = if prefix.is_empty() {
                key.to_owned()
            } else {
                format!("{prefix}.{key}")
            };
            out.push(path.clone());
            match child {
                Value::Array(items) => {
                    if let Some(first @ Value::Object(_)) = items.first() {
                        paths(&format!("{path}[]"), first, out);
                    }
                }
                Value::Object(_) => paths(&path, child, out),
                _ => {}
            }
        };
        if let Value::Object(map) = v {
            for (k, child) in map {
                walk(k, child, out);
            }
        }
    }

    #[test]
    fn the_reference_documents_every_key_and_no_other() {
        let mut schema = Vec::new();
        paths("", &serde_json::to_value(every_key()).unwrap(), &mut schema);
        // The reference's keys: the first cell of each table row.
        let documented: Vec<String> = REFERENCE
            .lines()
            .filter_map(|l| l.strip_prefix("| `"))
            .filter_map(|l| l.split_once("` |").map(|(k, _)| k.to_owned()))
            .collect();
        let mut problems = Vec::new();
        for p in &schema {
            if !documented.contains(p) {
                problems.push(format!(
                    "{p}: in the schema, not in docs/policy-reference.md"
                ));
            }
        }
        for d in &documented {
            if !schema.contains(d) {
                problems.push(format!(
                    "{d}: in docs/policy-reference.md, not in the schema"
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for d in &documented {
            if !seen.insert(d) {
                problems.push(format!("{d}: documented twice"));
            }
        }
        assert!(schema.len() > 60, "{schema:?}");
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn the_reference_example_loads_and_its_tests_pass() {
        let yaml = REFERENCE
            .split("```yaml\n")
            .nth(1)
            .and_then(|rest| rest.split("```").next())
            .unwrap();
        let opts = crate::LoadOptions::new(herald_core::TrustDomain::new("example.org").unwrap());
        let set = crate::PolicySet::from_sources(
            &[(std::path::PathBuf::from("reference.yaml"), yaml.to_owned())],
            &opts,
        )
        .unwrap();
        assert_eq!(set.names(), ["github-actions-deploy"]);
    }
}
