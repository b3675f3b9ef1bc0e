//! The policy file format, as written by operators (see the crate docs).

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

/// One policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PolicyFile {
    pub name: String,
    #[serde(default)]
    #[allow(dead_code)]
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
#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EvidenceSpec {
    #[serde(default)]
    pub oidc: Option<OidcSpec>,
    #[serde(default)]
    pub tpm: Option<TpmSpec>,
    #[serde(default)]
    pub join_token: Option<JoinTokenSpec>,
    #[serde(default)]
    pub require: Vec<FactorName>,
}

/// Join tokens as the evidence itself: `herald svid mint` with a token
/// created for one of `purposes`. The SPIFFE ID is the token's own, which
/// must lie under the policy's prefix.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TpmSpec {
    /// PEM files (relative to the policy file) with manufacturer roots.
    pub ek_roots: Vec<String>,
    /// PEM files with intermediate CAs, if the TPMs do not carry them.
    #[serde(default)]
    pub ek_intermediates: Vec<String>,
    #[serde(default = "default_bank")]
    pub pcr_bank: String,
    pub pcrs: Vec<u8>,
    pub golden: Vec<GoldenSpec>,
    #[serde(default)]
    pub min_firmware_version: Option<u64>,
}

fn default_bank() -> String {
    "sha256".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GoldenSpec {
    pub name: String,
    pub pcrs: BTreeMap<u8, String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OidcSpec {
    pub issuer: String,
    pub audiences: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FactorName {
    JoinToken,
    X509Svid,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct SpiffeIdSpec {
    pub prefix: String,
    #[serde(default)]
    pub template: Option<String>,
    #[serde(default)]
    pub expression: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantsSpec {
    #[serde(default)]
    pub x509_svid: Option<X509Spec>,
    #[serde(default)]
    pub jwt_svid: Option<JwtSpec>,
    #[serde(default)]
    pub cloud: Vec<CloudSpec>,
}

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct JwtSpec {
    pub max_ttl: String,
    pub audiences: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CloudSpec {
    pub role_arn: String,
    pub max_ttl: String,
    pub scope: Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestSpec {
    #[serde(default)]
    pub name: Option<String>,
    pub evidence: TestEvidence,
    pub expect: Expect,
}

#[derive(Debug, Clone, Deserialize)]
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
}

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestFactor {
    pub spiffe_id: String,
}

/// A join token in a test: by default one created for the role it plays
/// (bootstrap on its own, node enrolment beside TPM evidence, a second
/// factor naming the policy under test beside OIDC evidence).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TestJoinToken {
    pub spiffe_id: String,
    #[serde(default)]
    pub purpose: Option<String>,
    #[serde(default)]
    pub policies: Option<Vec<String>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Expect {
    pub allow: bool,
    #[serde(default)]
    pub spiffe_id: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
}
