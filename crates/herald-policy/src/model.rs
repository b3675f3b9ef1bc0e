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
    pub tests: Vec<TestSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EvidenceSpec {
    pub oidc: OidcSpec,
    #[serde(default)]
    pub require: Vec<FactorName>,
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
    pub x509_svid: Option<TtlSpec>,
    #[serde(default)]
    pub jwt_svid: Option<JwtSpec>,
    #[serde(default)]
    pub cloud: Vec<CloudSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TtlSpec {
    pub max_ttl: String,
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
    pub join_token: Option<TestFactor>,
    #[serde(default)]
    pub x509_svid: Option<TestFactor>,
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Expect {
    pub allow: bool,
    #[serde(default)]
    pub spiffe_id: Option<String>,
    #[serde(default)]
    pub code: Option<String>,
}
