//! Herald's attestation policies.
//!
//! A policy is a YAML file that says which verified evidence earns which
//! credential. Deny by default: a request is granted only if a policy's
//! evidence section, exact claim pins, CEL `condition` and required extra
//! factors all hold, and the SPIFFE ID it builds from the claims is valid
//! and under the policy's declared prefix.
//!
//! ```yaml
//! name: github-deploy-production          # unique in the set
//! description: Deploys of acme/webapp from main into production
//! evidence:
//!   oidc:
//!     issuer: https://token.actions.githubusercontent.com
//!     audiences: [herald]
//!   require: [join_token]                  # optional extra factors: join_token, x509_svid
//! pins:                                    # exact matches, outside CEL; dotted paths reach nested claims
//!   repository_owner_id: "1342004"
//!   repository: acme/webapp
//! condition: claims.ref == "refs/heads/main" && claims.environment == "production"
//! spiffe_id:
//!   prefix: spiffe://example.org/ci/github/
//!   template: "spiffe://example.org/ci/github/{repository_owner}/{environment}"
//!   # or: expression: '"spiffe://example.org/ci/github/" + segment(claims.repository_owner)'
//!   # (every claim reaching the ID goes through segment(): one safe path segment or an error)
//! grants:
//!   x509_svid: { max_ttl: 15m }
//!   jwt_svid: { max_ttl: 5m, audiences: [deployer] }
//!   cloud:
//!     - role_arn: arn:aws:iam::123456789012:role/deploy
//!       max_ttl: 1h
//!       scope: { Version: "2012-10-17", Statement: [{ Effect: Allow, Action: [s3:PutObject], Resource: ["arn:aws:s3:::artifacts/*"] }] }
//! tests:
//!   - name: main in production is allowed
//!     evidence: { oidc: { claims: { ... } } }
//!     expect: { allow: true, spiffe_id: spiffe://example.org/ci/github/acme/production }
//!   - name: a feature branch is refused
//!     evidence: { oidc: { claims: { ... } } }
//!     expect: { allow: false, code: policy_denied }
//! ```
//!
//! At load every file is parsed strictly (unknown keys refused), every
//! expression compiled and checked to reference only `claims` and
//! `factors` (`matches()` patterns must be literals, compiled then; size
//! and comprehension nesting are capped), templates parsed, the prefix checked against the trust domain,
//! TTLs and sizes capped, cloud scopes parsed, dangerous shapes refused (see
//! [`danger`]), and the embedded tests run. One broken file rejects the
//! whole set, with every problem's path, line and reason; [`PolicyStore`]
//! then keeps the previous good set.
//!
//! TPM node policies use `evidence.tpm` instead of `evidence.oidc` (see
//! [`tpm`]): trusted EK roots, the PCRs to quote, golden value sets and a
//! firmware floor; their claims are the EK hash, AK name, firmware version,
//! TPM counters and EK certificate fields. Nodes without a TPM attest with
//! `evidence.platform_token` (a Kubernetes or GCP platform token) or
//! `evidence.aws_iid` (an EC2 instance identity document), see [`node`];
//! a TPM policy can require a platform token too (machine MFA).
//!
//! Join-token policies use `evidence.join_token: { purposes: [bootstrap,
//! break_glass] }` (default `[bootstrap]`): a token created for one of
//! those purposes, presented on its own, earns the SPIFFE ID it is bound
//! to if that lies under `spiffe_id.prefix` (no template: the token names
//! the identity). Their claims are `spiffe_id`, `token_id`, `created_by`
//! and `purpose`; they grant X.509 SVIDs only. Tokens created as a second
//! factor or a node's enrolment factor are never such evidence.
//!
//! Node and join-token policies' X.509 grants renew: `x509_svid: { max_ttl:
//! 1h, max_lineage_age: 24h }` (the default age) lets a lineage renew over
//! mTLS for that long after its fresh evidence, under the policy as it
//! stands at each renewal ([`PolicySet::renew`]); an exchange's SVIDs never
//! renew. A node policy's `workloads` are what [`PolicySet::workload`]
//! grants its agent, and only a node attestation's lineage is a node.
//!
//! A decision grants kinds of credentials; [`Decision::authorize`] checks
//! the one asked for (audiences, role, lifetime cap, session scope).
//!
//! Evaluation: candidates are the policies whose issuer equals the token's
//! and whose audiences meet the token's (for TPM evidence: whose EK roots
//! the EK certificate chains to), in file-name order; the first whose
//! pins, condition, SPIFFE ID and factors all hold wins. Otherwise the most
//! specific refusal is reported: a missing factor, then a SPIFFE ID that
//! escapes its prefix, then a false pin or condition, then "no policy".
#![forbid(unsafe_code)]

mod claims;
pub mod danger;
mod explain;
mod expr;
mod grant;
mod lineage;
mod model;
pub mod node;
pub mod tpm;

pub use explain::explain;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use herald_attest::tpm::VerifiedTpm;
use herald_attest::{
    VerifiedIid, VerifiedJoinToken, VerifiedNodeToken, VerifiedSvid, VerifiedToken,
};
use herald_core::{ErrorCode, JoinTokenPurpose, Origin, ScopePolicy, SpiffeId, TrustDomain};
use serde_json::{Map, Value};

use crate::claims::{Template, pin_matches, resolve};
use crate::expr::Compiled;
pub use crate::grant::{
    CloudRoleGrant, CredentialRequest, Defaults, Grant, Grants, JwtGrant, MAX_AUDIENCES, X509Grant,
};
use crate::model::{FactorName, PolicyFile};
pub use crate::node::{AwsIidRules, PlatformTokenRules};
pub use crate::tpm::{GoldenSet, Reattest, Registration, TpmRules};
use std::collections::BTreeMap;

pub use expr::{MAX_EXPRESSION_BYTES, VARIABLES};

/// Largest policy file, bytes.
pub const MAX_FILE_BYTES: usize = 512 * 1024;
/// Most embedded tests per file.
pub const MAX_TESTS: usize = 100;
/// Most pins per policy.
pub const MAX_PINS: usize = 50;
/// Longest lifetime a grant may allow.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest `max_lineage_age` a policy may set.
pub const MAX_LINEAGE_AGE: Duration = Duration::from_secs(90 * 24 * 3600);
/// How long a lineage renews when its node or join-token policy names no
/// `max_lineage_age`: after a day, fresh evidence (a new quote, a new token).
pub const DEFAULT_LINEAGE_AGE: Duration = Duration::from_secs(24 * 3600);

/// What the policies are loaded against.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Every granted SPIFFE ID must be in this trust domain.
    pub trust_domain: TrustDomain,
    /// The server's own DNS names (`tls.dns_names`): no workload may be
    /// registered under one, or its SVID would pass as the server's.
    pub reserved_dns_names: Vec<String>,
}

impl LoadOptions {
    /// Options for `trust_domain` with no reserved DNS names.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            reserved_dns_names: Vec::new(),
        }
    }
}

/// A DNS name as compared: case-insensitive, without the root's dot.
pub fn dns_name_key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// One problem found while loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The file.
    pub path: PathBuf,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub reason: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.path.display(), self.reason),
            None => write!(f, "{}: {}", self.path.display(), self.reason),
        }
    }
}

/// Every problem found while loading a set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct LoadErrors(pub Vec<LoadError>);

impl std::fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let parts: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&parts.join("; "))
    }
}

/// Verified OIDC evidence.
#[derive(Debug, Clone)]
pub struct OidcEvidence {
    /// The issuer, exactly as configured.
    pub issuer: String,
    /// The token's audiences that Herald accepted.
    pub audiences: Vec<String>,
    /// Verified, normalised claims.
    pub claims: Map<String, Value>,
}

impl From<&VerifiedToken> for OidcEvidence {
    fn from(t: &VerifiedToken) -> Self {
        OidcEvidence {
            issuer: t.issuer.clone(),
            audiences: t.audiences.clone(),
            claims: t.claims.clone(),
        }
    }
}

/// A verified TPM quote from a node (EK chain, credential activation, quote
/// signature, nonce and PCR digest all checked by the verifier).
#[derive(Debug, Clone)]
pub struct TpmEvidence {
    /// The TPM policies whose EK roots the EK certificate chains to; only
    /// they are candidates.
    pub trusted_by: Vec<String>,
    /// The claims (see [`tpm`]).
    pub claims: Map<String, Value>,
    /// The quoted PCR values, index → digest.
    pub pcrs: BTreeMap<u8, Vec<u8>>,
    /// The TPM's firmware version from the quote.
    pub firmware_version: u64,
    /// Whether this EK is already enrolled (active) — required extra
    /// factors are checked at enrolment only.
    pub enrolled: bool,
}

impl TpmEvidence {
    /// The policy's view of a verified quote: its claims (see [`tpm`]),
    /// PCR values and firmware version.
    pub fn verified(t: &VerifiedTpm, enrolled: bool) -> TpmEvidence {
        let mut claims = Map::new();
        claims.insert("ek_hash".into(), Value::String(t.ek_hash.clone()));
        claims.insert("ak_name".into(), Value::String(hex::encode(&t.ak_name)));
        claims.insert(
            "firmware_version".into(),
            Value::from(t.quote.firmware_version),
        );
        claims.insert("reset_count".into(), Value::from(t.quote.reset_count));
        claims.insert("restart_count".into(), Value::from(t.quote.restart_count));
        // An EK accepted by its hash has no certificate: the claim is
        // absent, so a condition on it fails closed.
        if let Some(ek) = &t.ek {
            claims.insert(
                "ek_certificate".into(),
                serde_json::json!({
                    "subject": ek.subject(),
                    "issuer": ek.issuer(),
                    "serial": ek.serial_hex(),
                }),
            );
        }
        TpmEvidence {
            trusted_by: t.trusted_by.clone(),
            claims,
            pcrs: t.quote.pcrs.clone(),
            firmware_version: t.quote.firmware_version,
            enrolled,
        }
    }
}

/// A verified platform token presented as node evidence (or as a TPM
/// node's second factor).
#[derive(Debug, Clone)]
pub struct PlatformTokenEvidence {
    /// The issuer, exactly as configured.
    pub issuer: String,
    /// The token's audiences that Herald accepted.
    pub audiences: Vec<String>,
    /// The token's claims with the node claims the verifier derived.
    pub claims: Map<String, Value>,
    /// Whether the node it names is already enrolled (active): required
    /// join tokens are checked at enrolment only.
    pub enrolled: bool,
}

impl PlatformTokenEvidence {
    /// The policy's view of a verified node token.
    pub fn verified(t: &VerifiedNodeToken, enrolled: bool) -> Self {
        PlatformTokenEvidence {
            issuer: t.token.issuer.clone(),
            audiences: t.token.audiences.clone(),
            claims: t.claims.clone(),
            enrolled,
        }
    }
}

/// A verified AWS instance identity document.
#[derive(Debug, Clone)]
pub struct AwsIidEvidence {
    /// The AWS policies one of whose certificates verified the signature;
    /// only they are candidates.
    pub trusted_by: Vec<String>,
    /// The document's claims (see [`node`]).
    pub claims: Map<String, Value>,
    /// Seconds since the document's `pendingTime` (negative: in the future).
    pub age_secs: i64,
    /// Whether the instance is already enrolled (active).
    pub enrolled: bool,
}

impl AwsIidEvidence {
    /// The policy's view of a verified document at `now_s`.
    pub fn verified(v: &VerifiedIid, trusted_by: Vec<String>, now_s: i64, enrolled: bool) -> Self {
        AwsIidEvidence {
            trusted_by,
            claims: v.claims.clone(),
            age_secs: now_s - v.pending_time,
            enrolled,
        }
    }
}

/// Everything verified about one request: the verifiers' output, nothing
/// else.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// The OIDC token.
    pub oidc: Option<OidcEvidence>,
    /// A TPM quote.
    pub tpm: Option<TpmEvidence>,
    /// A join token: the evidence itself (bootstrap, break-glass) or, beside
    /// OIDC or TPM evidence, an extra factor.
    pub join_token: Option<VerifiedJoinToken>,
    /// The caller's current SVID, as an extra factor.
    pub x509_svid: Option<VerifiedSvid>,
    /// A platform token as node evidence, or a TPM node's second factor.
    pub platform_token: Option<PlatformTokenEvidence>,
    /// An AWS instance identity document.
    pub aws_iid: Option<AwsIidEvidence>,
}

/// What a join token offers pins, conditions and tests as claims.
fn join_token_claims(t: &VerifiedJoinToken) -> Map<String, Value> {
    let mut claims = Map::new();
    claims.insert("spiffe_id".into(), Value::String(t.spiffe_id.to_string()));
    claims.insert("token_id".into(), Value::String(t.token_id.clone()));
    claims.insert("created_by".into(), Value::String(t.created_by.clone()));
    claims.insert("purpose".into(), Value::String(t.purpose.to_string()));
    claims
}

/// A factor that contributed to a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Factor {
    /// The OIDC token.
    Oidc,
    /// A TPM quote.
    Tpm,
    /// A join token.
    JoinToken,
    /// The caller's SVID.
    X509Svid,
    /// A platform token (Kubernetes, GCP) on the attestation stream.
    PlatformToken,
    /// An AWS instance identity document.
    AwsIid,
}

/// A granted decision.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The policy's name.
    pub policy: String,
    /// The SPIFFE ID built from the claims.
    pub spiffe_id: SpiffeId,
    /// What may be issued.
    pub grants: Grants,
    /// The factors that were verified and required.
    pub factors: Vec<Factor>,
    /// For TPM evidence: the golden PCR set that matched.
    pub golden_set: Option<String>,
    /// The lineage the credential belongs to: what it may be used for and
    /// whether it renews.
    pub origin: Origin,
}

/// A refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// The stable code.
    pub code: ErrorCode,
    /// The policy that came closest, if any.
    pub policy: Option<String>,
    /// Why, naming claims but never their values.
    pub reason: String,
}

impl Denial {
    fn rank(&self) -> u8 {
        match self.code {
            ErrorCode::FactorMissing => 4,
            ErrorCode::TpmPcrOffPolicy | ErrorCode::TpmFirmwareRefused | ErrorCode::AwsIidStale => {
                3
            }
            ErrorCode::SpiffeIdEscapesPrefix => 2,
            ErrorCode::PolicyDenied if self.policy.is_some() => 1,
            _ => 0,
        }
    }
}

/// How a policy builds the SPIFFE ID.
#[derive(Debug)]
enum IdRule {
    Template(Template),
    Expression(Compiled),
    /// The identity the join token is bound to.
    Bound,
}

/// The evidence a policy is about.
#[derive(Debug)]
enum Primary {
    Oidc {
        issuer: String,
        audiences: Vec<String>,
    },
    Tpm(TpmRules),
    JoinToken {
        purposes: Vec<JoinTokenPurpose>,
    },
    PlatformToken(PlatformTokenRules),
    AwsIid(AwsIidRules),
}

impl Primary {
    fn name(&self) -> &'static str {
        match self {
            Primary::Oidc { .. } => "oidc",
            Primary::Tpm(_) => "tpm",
            Primary::JoinToken { .. } => "join_token",
            Primary::PlatformToken(_) => "platform_token",
            Primary::AwsIid(_) => "aws_iid",
        }
    }

    /// Whether the evidence is a node's: its lineage is a node, it may
    /// register workloads, and its SVIDs renew.
    fn is_node(&self) -> bool {
        matches!(
            self,
            Primary::Tpm(_) | Primary::PlatformToken(_) | Primary::AwsIid(_)
        )
    }
}

/// One loaded, validated policy.
#[derive(Debug)]
pub struct Policy {
    name: String,
    path: PathBuf,
    primary: Primary,
    /// A TPM policy's platform-token factor (`require: [platform_token]`).
    platform_factor: Option<PlatformTokenRules>,
    require: Vec<FactorName>,
    pins: Vec<(String, Value)>,
    condition: Option<Compiled>,
    prefix: String,
    trust_domain: TrustDomain,
    id_rule: IdRule,
    grants: Grants,
    registrations: Vec<Registration>,
}

impl Policy {
    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The TPM rules, for a TPM policy.
    pub fn tpm_rules(&self) -> Option<&TpmRules> {
        match &self.primary {
            Primary::Tpm(t) => Some(t),
            _ => None,
        }
    }

    /// The AWS instance identity rules, for an `aws_iid` policy.
    pub fn aws_iid_rules(&self) -> Option<&AwsIidRules> {
        match &self.primary {
            Primary::AwsIid(a) => Some(a),
            _ => None,
        }
    }

    /// Whether this is a node policy (TPM, platform token or AWS instance
    /// identity evidence).
    pub fn is_node_policy(&self) -> bool {
        self.primary.is_node()
    }

    /// The purpose a join token must have been made for to be this
    /// policy's extra factor: a TPM policy's enrolment factor, an OIDC
    /// policy's second factor.
    fn factor_purpose(&self) -> JoinTokenPurpose {
        if self.primary.is_node() {
            JoinTokenPurpose::NodeEnrolment
        } else {
            JoinTokenPurpose::SecondFactor
        }
    }

    /// Whether `j` is a factor of this policy for `id`.
    fn join_factor_holds(&self, j: &VerifiedJoinToken, id: &SpiffeId) -> bool {
        j.spiffe_id == *id && j.purpose == self.factor_purpose() && j.serves(&self.name)
    }

    /// The evidence this policy is about: `oidc`, `tpm`, `join_token`,
    /// `platform_token` or `aws_iid`.
    pub fn evidence_kind(&self) -> &'static str {
        self.primary.name()
    }

    /// What the policy grants.
    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// Workload registrations for the nodes this (TPM) policy admits.
    pub fn registrations(&self) -> &[Registration] {
        &self.registrations
    }

    /// The claims this policy reads from `evidence`, if it is a candidate.
    fn candidate_claims<'e>(&self, evidence: &'e Evidence) -> Option<Cow<'e, Map<String, Value>>> {
        match (&self.primary, &evidence.oidc, &evidence.tpm) {
            (Primary::Oidc { issuer, audiences }, Some(o), _)
                if &o.issuer == issuer && o.audiences.iter().any(|a| audiences.contains(a)) =>
            {
                Some(Cow::Borrowed(&o.claims))
            }
            (Primary::Tpm(_), _, Some(t)) if t.trusted_by.contains(&self.name) => {
                // Machine MFA: the second factor's claims beside the quote's.
                match (&self.platform_factor, &evidence.platform_token) {
                    (Some(rules), Some(p)) if rules.accepts(&p.issuer, &p.audiences) => {
                        let mut claims = t.claims.clone();
                        let mut token = p.claims.clone();
                        if let Some(c) = &rules.cluster {
                            token.insert("cluster".into(), Value::String(c.clone()));
                        }
                        claims.insert("platform_token".into(), Value::Object(token));
                        Some(Cow::Owned(claims))
                    }
                    _ => Some(Cow::Borrowed(&t.claims)),
                }
            }
            (Primary::PlatformToken(rules), _, _) => {
                let p = evidence
                    .platform_token
                    .as_ref()
                    .filter(|p| rules.accepts(&p.issuer, &p.audiences))?;
                match &rules.cluster {
                    Some(c) => {
                        let mut claims = p.claims.clone();
                        claims.insert("cluster".into(), Value::String(c.clone()));
                        Some(Cow::Owned(claims))
                    }
                    None => Some(Cow::Borrowed(&p.claims)),
                }
            }
            (Primary::AwsIid(_), _, _) => evidence
                .aws_iid
                .as_ref()
                .filter(|a| a.trusted_by.contains(&self.name))
                .map(|a| Cow::Borrowed(&a.claims)),
            // A join token is the evidence only when it stands alone.
            (Primary::JoinToken { purposes }, None, None)
                if evidence.platform_token.is_none() && evidence.aws_iid.is_none() =>
            {
                let t = evidence.join_token.as_ref()?;
                purposes
                    .contains(&t.purpose)
                    .then(|| Cow::Owned(join_token_claims(t)))
            }
            _ => None,
        }
    }

    /// Decides for this policy alone.
    pub fn decide(&self, evidence: &Evidence) -> Result<Decision, Denial> {
        self.decide_with(evidence, &std::cell::OnceCell::new())
    }

    /// Decides, reusing the claims' CEL conversion across candidates.
    fn decide_with(
        &self,
        evidence: &Evidence,
        cel_claims: &std::cell::OnceCell<Result<cel::Value, String>>,
    ) -> Result<Decision, Denial> {
        let deny = |code, reason: String| Denial {
            code,
            policy: Some(self.name.clone()),
            reason,
        };
        let Some(claims) = self.candidate_claims(evidence) else {
            return Err(Denial {
                code: ErrorCode::PolicyDenied,
                policy: None,
                reason: format!("policy {} does not accept this evidence", self.name),
            });
        };
        // Claims made for this policy alone (a cluster name, a second
        // factor's) are converted for it alone.
        let own_claims = std::cell::OnceCell::new();
        let cel_claims = match &claims {
            Cow::Owned(_) => &own_claims,
            Cow::Borrowed(_) => cel_claims,
        };
        let mut golden_set = None;
        let mut enrolled = false;
        if let Some(p) = &evidence.platform_token
            && matches!(self.primary, Primary::PlatformToken(_))
        {
            enrolled = p.enrolled;
        }
        if let (Primary::AwsIid(rules), Some(a)) = (&self.primary, &evidence.aws_iid) {
            enrolled = a.enrolled;
            if let Some(max) = rules.max_age
                && (a.age_secs > max.as_secs() as i64
                    || a.age_secs < -crate::node::IID_FUTURE_LEEWAY_SECS)
            {
                return Err(deny(
                    ErrorCode::AwsIidStale,
                    format!(
                        "policy {}: the instance identity document's pendingTime is {}s old; the policy accepts {}s",
                        self.name,
                        a.age_secs,
                        max.as_secs()
                    ),
                ));
            }
        }
        if let (Primary::Tpm(rules), Some(t)) = (&self.primary, &evidence.tpm) {
            enrolled = t.enrolled;
            if let Some(min) = rules.min_firmware_version
                && t.firmware_version < min
            {
                return Err(deny(
                    ErrorCode::TpmFirmwareRefused,
                    format!(
                        "policy {}: TPM firmware {:#x} is older than {min:#x}",
                        self.name, t.firmware_version
                    ),
                ));
            }
            match rules.matching_golden(&t.pcrs) {
                Some(g) => golden_set = Some(g.name.clone()),
                None => {
                    return Err(deny(
                        ErrorCode::TpmPcrOffPolicy,
                        format!(
                            "policy {}: the PCR values match none of its {} golden sets",
                            self.name,
                            rules.golden.len()
                        ),
                    ));
                }
            }
        }
        let claims: &Map<String, Value> = &claims;
        for (path, expected) in &self.pins {
            match resolve(claims, path) {
                Some(actual) if pin_matches(actual, expected) => {}
                Some(_) => {
                    return Err(deny(
                        ErrorCode::PolicyDenied,
                        format!(
                            "policy {}: claim `{path}` does not match its pin",
                            self.name
                        ),
                    ));
                }
                None => {
                    return Err(deny(
                        ErrorCode::PolicyDenied,
                        format!("policy {}: claim `{path}` is missing", self.name),
                    ));
                }
            }
        }
        let converted = || {
            cel_claims
                .get_or_init(|| expr::claims_value(claims))
                .as_ref()
                .map_err(Clone::clone)
        };
        // The identity first: the extra factors a condition may test are
        // only those bound to it.
        let escape = |e: String| {
            deny(
                ErrorCode::SpiffeIdEscapesPrefix,
                format!("policy {}: {e}", self.name),
            )
        };
        let primary_only = [self.primary.name()];
        let text = match &self.id_rule {
            IdRule::Template(t) => t.render(claims).map_err(escape)?,
            IdRule::Expression(c) => converted()
                .and_then(|v| c.eval_string(v, &primary_only))
                .map_err(escape)?,
            IdRule::Bound => evidence
                .join_token
                .as_ref()
                .map(|t| t.spiffe_id.to_string())
                .ok_or_else(|| escape("no join token to take the identity from".into()))?,
        };
        let spiffe_id = SpiffeId::parse(&text)
            .map_err(|e| escape(format!("built SPIFFE ID is invalid: {e}")))?;
        self.check_under_prefix(&spiffe_id)?;
        // `"x509_svid" in factors` is never weaker than `require:
        // [x509_svid]`: a factor is listed only when it is bound to this
        // identity (and a join token only when made for this policy).
        let mut present: Vec<&str> = vec![self.primary.name()];
        if !matches!(self.primary, Primary::JoinToken { .. })
            && evidence
                .join_token
                .as_ref()
                .is_some_and(|j| self.join_factor_holds(j, &spiffe_id))
        {
            present.push("join_token");
        }
        if evidence
            .x509_svid
            .as_ref()
            .is_some_and(|s| s.spiffe_id == spiffe_id)
        {
            present.push("x509_svid");
        }
        if let (Some(rules), Some(p)) = (&self.platform_factor, &evidence.platform_token)
            && rules.accepts(&p.issuer, &p.audiences)
        {
            present.push("platform_token");
        }
        if let Some(cond) = &self.condition {
            let result = converted().and_then(|c| cond.eval_bool(c, &present));
            match result {
                Ok(true) => {}
                Ok(false) => {
                    return Err(deny(
                        ErrorCode::PolicyDenied,
                        format!("policy {}: condition is false", self.name),
                    ));
                }
                Err(e) => {
                    return Err(deny(
                        ErrorCode::PolicyDenied,
                        format!("policy {}: condition not satisfied ({e})", self.name),
                    ));
                }
            }
        }

        let (mut factors, origin) = match &self.primary {
            Primary::Oidc { .. } => (vec![Factor::Oidc], Origin::Exchange),
            Primary::Tpm(_) => (vec![Factor::Tpm], Origin::Node),
            Primary::PlatformToken(_) => (vec![Factor::PlatformToken], Origin::Node),
            Primary::AwsIid(_) => (vec![Factor::AwsIid], Origin::Node),
            Primary::JoinToken { .. } => (
                vec![Factor::JoinToken],
                match evidence.join_token.as_ref().map(|t| t.purpose) {
                    Some(JoinTokenPurpose::BreakGlass) => Origin::BreakGlass,
                    _ => Origin::Bootstrap,
                },
            ),
        };
        let factor_purpose = self.factor_purpose();
        // A node proves a join token when it enrols; afterwards its EK (or
        // instance, or node) is its identity. A platform token is fresh
        // evidence and is required at every attestation.
        let required = self
            .require
            .iter()
            .filter(|f| !enrolled || **f == FactorName::PlatformToken);
        for required in required {
            match required {
                FactorName::JoinToken => match &evidence.join_token {
                    Some(j) if j.spiffe_id != spiffe_id => {
                        return Err(deny(
                            ErrorCode::FactorMissing,
                            format!(
                                "policy {}: the join token is bound to another SPIFFE ID",
                                self.name
                            ),
                        ));
                    }
                    Some(j) if j.purpose != factor_purpose || !j.serves(&self.name) => {
                        return Err(deny(
                            ErrorCode::FactorMissing,
                            format!(
                                "policy {}: the join token was not created as a {} token for this policy",
                                self.name, factor_purpose
                            ),
                        ));
                    }
                    Some(_) => factors.push(Factor::JoinToken),
                    None => {
                        return Err(deny(
                            ErrorCode::FactorMissing,
                            format!(
                                "policy {} requires a join token as second factor",
                                self.name
                            ),
                        ));
                    }
                },
                FactorName::PlatformToken => {
                    match (&self.platform_factor, &evidence.platform_token) {
                        (Some(rules), Some(p)) if rules.accepts(&p.issuer, &p.audiences) => {
                            factors.push(Factor::PlatformToken);
                        }
                        _ => {
                            return Err(deny(
                                ErrorCode::FactorMissing,
                                format!(
                                    "policy {} requires a platform token from its issuer as second factor",
                                    self.name
                                ),
                            ));
                        }
                    }
                }
                FactorName::X509Svid => match &evidence.x509_svid {
                    Some(s) if s.spiffe_id == spiffe_id => factors.push(Factor::X509Svid),
                    Some(_) => {
                        return Err(deny(
                            ErrorCode::FactorMissing,
                            format!(
                                "policy {}: the presented SVID is for another SPIFFE ID",
                                self.name
                            ),
                        ));
                    }
                    None => {
                        return Err(deny(
                            ErrorCode::FactorMissing,
                            format!(
                                "policy {} requires the caller's SVID (mTLS) as second factor",
                                self.name
                            ),
                        ));
                    }
                },
            }
        }
        Ok(Decision {
            policy: self.name.clone(),
            spiffe_id,
            grants: self.grants.clone(),
            factors,
            golden_set,
            origin,
        })
    }
}

/// A validated set of policies. Immutable; share it in an `Arc`.
#[derive(Debug, Default)]
pub struct PolicySet {
    policies: Vec<Policy>,
}

/// The result of one embedded test.
#[derive(Debug, Clone)]
pub struct TestOutcome {
    /// The file.
    pub path: PathBuf,
    /// The policy.
    pub policy: String,
    /// Zero-based index in the file's `tests`.
    pub index: usize,
    /// The test's name.
    pub name: Option<String>,
    /// Whether it passed.
    pub passed: bool,
    /// What happened.
    pub detail: String,
}

impl PolicySet {
    /// Loads every `*.yaml`/`*.yml` in `dir` (not recursive), in file-name order.
    pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<PolicySet, LoadErrors> {
        Self::load_dir_with(dir, &[], opts)
    }

    /// Loads `dir` as [`PolicySet::load_dir`] does, then `extra` (path,
    /// text) sources after its files — policies that live in no file, such
    /// as the dev policy of `herald server --dev`.
    pub fn load_dir_with(
        dir: &Path,
        extra: &[(PathBuf, String)],
        opts: &LoadOptions,
    ) -> Result<PolicySet, LoadErrors> {
        let mut sources = read_dir_sources(dir)?;
        sources.extend_from_slice(extra);
        let (set, outcomes) = compile_sources(&sources, opts)?;
        let failed: Vec<LoadError> = outcomes
            .into_iter()
            .filter(|o| !o.passed)
            .map(|o| LoadError {
                path: o.path,
                line: None,
                reason: format!(
                    "embedded test {} ({}) failed: {}",
                    o.index,
                    o.name.unwrap_or_default(),
                    o.detail
                ),
            })
            .collect();
        if failed.is_empty() {
            Ok(set)
        } else {
            Err(LoadErrors(failed))
        }
    }

    /// Loads policies from (path, text) pairs, in the order given.
    pub fn from_sources(
        sources: &[(PathBuf, String)],
        opts: &LoadOptions,
    ) -> Result<PolicySet, LoadErrors> {
        let (set, outcomes) = compile_sources(sources, opts)?;
        let failed: Vec<LoadError> = outcomes
            .into_iter()
            .filter(|o| !o.passed)
            .map(|o| LoadError {
                path: o.path,
                line: None,
                reason: format!("embedded test {} failed: {}", o.index, o.detail),
            })
            .collect();
        if failed.is_empty() {
            Ok(set)
        } else {
            Err(LoadErrors(failed))
        }
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// How many policies.
    pub fn len(&self) -> usize {
        self.policies.len()
    }

    /// The policy names, in evaluation order.
    pub fn names(&self) -> Vec<&str> {
        self.policies.iter().map(|p| p.name.as_str()).collect()
    }

    /// The OIDC issuers the policies accept.
    pub fn oidc_issuers(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self
            .policies
            .iter()
            .flat_map(|p| {
                let primary = match &p.primary {
                    Primary::Oidc { issuer, .. } => Some(issuer.as_str()),
                    Primary::PlatformToken(r) => Some(r.issuer.as_str()),
                    _ => None,
                };
                primary
                    .into_iter()
                    .chain(p.platform_factor.as_ref().map(|r| r.issuer.as_str()))
            })
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The TPM policies and their rules, in evaluation order.
    pub fn tpm_policies(&self) -> impl Iterator<Item = (&str, &TpmRules)> {
        self.policies
            .iter()
            .filter_map(|p| p.tpm_rules().map(|t| (p.name.as_str(), t)))
    }

    /// The AWS instance identity policies and their rules, in evaluation order.
    pub fn aws_iid_policies(&self) -> impl Iterator<Item = (&str, &AwsIidRules)> {
        self.policies
            .iter()
            .filter_map(|p| p.aws_iid_rules().map(|a| (p.name.as_str(), a)))
    }

    /// The policy named `name`.
    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies.iter().find(|p| p.name == name)
    }

    /// Decides (see the crate docs).
    pub fn evaluate(&self, evidence: &Evidence) -> Result<Decision, Denial> {
        let mut best = Denial {
            code: ErrorCode::PolicyDenied,
            policy: None,
            reason: "no attestation policy accepts this evidence".into(),
        };
        let cel_claims = std::cell::OnceCell::new();
        for p in &self.policies {
            match p.decide_with(evidence, &cel_claims) {
                Ok(d) => return Ok(d),
                Err(d) if d.rank() > best.rank() => best = d,
                Err(_) => {}
            }
        }
        Err(best)
    }
}

fn read_dir_sources(dir: &Path) -> Result<Vec<(PathBuf, String)>, LoadErrors> {
    let one = |path: &Path, reason: String| {
        LoadErrors(vec![LoadError {
            path: path.to_path_buf(),
            line: None,
            reason,
        }])
    };
    let entries = std::fs::read_dir(dir).map_err(|e| one(dir, e.to_string()))?;
    let mut paths: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    paths.sort();
    let mut sources = Vec::new();
    let mut errors = Vec::new();
    for p in paths {
        match std::fs::metadata(&p) {
            Ok(m) if m.len() > MAX_FILE_BYTES as u64 => errors.push(LoadError {
                path: p.clone(),
                line: None,
                reason: format!("file exceeds {MAX_FILE_BYTES} bytes"),
            }),
            _ => match std::fs::read_to_string(&p) {
                Ok(t) => sources.push((p, t)),
                Err(e) => errors.push(LoadError {
                    path: p,
                    line: None,
                    reason: e.to_string(),
                }),
            },
        }
    }
    if errors.is_empty() {
        Ok(sources)
    } else {
        Err(LoadErrors(errors))
    }
}

fn load_with_outcomes(
    dir: &Path,
    opts: &LoadOptions,
) -> Result<(PolicySet, Vec<TestOutcome>), LoadErrors> {
    let sources = read_dir_sources(dir)?;
    compile_sources(&sources, opts)
}

/// Runs every embedded test of the policies in `dir` and reports each.
/// Load errors other than failing tests are returned as errors.
pub fn test_dir(dir: &Path, opts: &LoadOptions) -> Result<Vec<TestOutcome>, LoadErrors> {
    load_with_outcomes(dir, opts).map(|(_, o)| o)
}

/// The 1-based line of the first line starting (after indentation) with `key`.
fn line_of(source: &str, key: &str) -> Option<usize> {
    source
        .lines()
        .position(|l| l.trim_start().starts_with(key))
        .map(|i| i + 1)
}

fn parse_ttl(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e}"))?;
    if d.is_zero() || d > MAX_TTL {
        return Err(format!("{text:?} must be more than 0 and at most 24h"));
    }
    Ok(d)
}

fn compile_sources(
    sources: &[(PathBuf, String)],
    opts: &LoadOptions,
) -> Result<(PolicySet, Vec<TestOutcome>), LoadErrors> {
    let mut errors = Vec::new();
    let mut policies: Vec<(Policy, Vec<model::TestSpec>)> = Vec::new();
    for (path, text) in sources {
        match compile_one(path, text, opts) {
            Ok(p) => {
                if policies.iter().any(|(q, _)| q.name == p.0.name) {
                    errors.push(LoadError {
                        path: path.clone(),
                        line: line_of(text, "name:"),
                        reason: format!("policy name {:?} is used twice", p.0.name),
                    });
                } else {
                    policies.push(p);
                }
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if !errors.is_empty() {
        return Err(LoadErrors(errors));
    }
    let mut outcomes = Vec::new();
    for (policy, tests) in &policies {
        for (index, t) in tests.iter().enumerate() {
            outcomes.push(run_test(policy, index, t));
        }
    }
    let set = PolicySet {
        policies: policies.into_iter().map(|(p, _)| p).collect(),
    };
    Ok((set, outcomes))
}

/// The file as written, parsed into the schema.
fn parse_file(path: &Path, text: &str) -> Result<PolicyFile, Vec<LoadError>> {
    let yaml_err = |e: serde_yaml_ng::Error| {
        vec![LoadError {
            path: path.to_path_buf(),
            line: e.location().map(|l| l.line()),
            reason: format!("YAML: {e}"),
        }]
    };
    // Parsed twice: straight into the schema first, so errors carry their
    // line; then through a value with YAML merge keys (`<<: *anchor`)
    // applied, which tests use to vary one claim of a shared example.
    serde_yaml_ng::from_str::<PolicyFile>(text).map_err(yaml_err)?;
    let mut value: serde_yaml_ng::Value = serde_yaml_ng::from_str(text).map_err(yaml_err)?;
    value.apply_merge().map_err(yaml_err)?;
    serde_yaml_ng::from_value(value).map_err(yaml_err)
}

fn compile_one(
    path: &Path,
    text: &str,
    opts: &LoadOptions,
) -> Result<(Policy, Vec<model::TestSpec>), Vec<LoadError>> {
    let err = |line: Option<usize>, reason: String| LoadError {
        path: path.to_path_buf(),
        line,
        reason,
    };
    if text.len() > MAX_FILE_BYTES {
        return Err(vec![err(
            None,
            format!("file exceeds {MAX_FILE_BYTES} bytes"),
        )]);
    }
    let file = parse_file(path, text)?;
    let mut errors = Vec::new();
    let at = |key: &str| line_of(text, key);

    if file.name.is_empty()
        || file.name.len() > 128
        || !file
            .name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        errors.push(err(
            at("name:"),
            "name must be 1-128 characters of [A-Za-z0-9._-]".into(),
        ));
    }
    let ev = &file.evidence;
    let node_only = ev.platform_token.is_none() && ev.aws_iid.is_none();
    let requires_token = ev.require.contains(&FactorName::PlatformToken);
    let primary = match (&ev.oidc, &ev.tpm, &ev.join_token) {
        (Some(oidc), None, None) if node_only => {
            if requires_token {
                errors.push(err(
                    at("require:"),
                    "platform_token is a TPM node policy's factor, not an OIDC policy's".into(),
                ));
            }
            if !oidc.issuer.starts_with("https://") && !oidc.issuer.starts_with("http://") {
                errors.push(err(
                    at("issuer:"),
                    "evidence.oidc.issuer must be a URL".into(),
                ));
            }
            if oidc.audiences.is_empty() {
                errors.push(err(
                    at("audiences:"),
                    "evidence.oidc.audiences must not be empty".into(),
                ));
            }
            Some(Primary::Oidc {
                issuer: oidc.issuer.clone(),
                audiences: oidc.audiences.clone(),
            })
        }
        (None, Some(t), None) if ev.aws_iid.is_none() => {
            if ev.platform_token.is_some() != requires_token {
                errors.push(err(
                    at("platform_token:"),
                    "a TPM policy names evidence.platform_token exactly when it has require: [platform_token] (machine MFA)".into(),
                ));
            }
            if file.evidence.require.contains(&FactorName::X509Svid) {
                errors.push(err(
                    at("require:"),
                    "a TPM policy may require a join_token at enrolment, not an x509_svid".into(),
                ));
            }
            match tpm::compile(t, path) {
                Ok(rules) => Some(Primary::Tpm(rules)),
                Err(es) => {
                    for e in es {
                        errors.push(err(at("tpm:"), e));
                    }
                    None
                }
            }
        }
        (None, None, Some(j)) if node_only => {
            if !file.evidence.require.is_empty() {
                errors.push(err(
                    at("require:"),
                    "a join-token policy takes no extra factors".into(),
                ));
            }
            let mut purposes = Vec::new();
            for p in &j.purposes {
                match JoinTokenPurpose::from_code(p) {
                    Some(
                        purpose @ (JoinTokenPurpose::Bootstrap | JoinTokenPurpose::BreakGlass),
                    ) if !purposes.contains(&purpose) => purposes.push(purpose),
                    _ => errors.push(err(
                        at("purposes:"),
                        format!(
                            "evidence.join_token.purposes: {p:?} is not one of bootstrap, break_glass (once each)"
                        ),
                    )),
                }
            }
            if purposes.is_empty() {
                errors.push(err(
                    at("join_token:"),
                    "evidence.join_token.purposes must name bootstrap and/or break_glass".into(),
                ));
            }
            Some(Primary::JoinToken { purposes })
        }
        (None, None, None) if ev.platform_token.is_some() != ev.aws_iid.is_some() => {
            if ev.require.iter().any(|f| *f != FactorName::JoinToken) {
                errors.push(err(
                    at("require:"),
                    "a platform_token or aws_iid node policy may require a join_token at enrolment, nothing else".into(),
                ));
            }
            let compiled = match (&ev.platform_token, &ev.aws_iid) {
                (Some(p), _) => node::compile_platform_token(p).map(Primary::PlatformToken),
                (_, Some(a)) => node::compile_aws_iid(a, path).map(Primary::AwsIid),
                _ => Err(Vec::new()),
            };
            match compiled {
                Ok(p) => Some(p),
                Err(es) => {
                    let key = if ev.aws_iid.is_some() {
                        "aws_iid:"
                    } else {
                        "platform_token:"
                    };
                    for e in es {
                        errors.push(err(at(key), e));
                    }
                    None
                }
            }
        }
        _ => {
            errors.push(err(
                at("evidence:"),
                "evidence needs exactly one of oidc, tpm, join_token, platform_token or aws_iid (a tpm policy may add platform_token as its required second factor)".into(),
            ));
            None
        }
    };
    let platform_factor = match (&primary, &ev.platform_token) {
        (Some(Primary::Tpm(_)), Some(p)) => match node::compile_platform_token(p) {
            Ok(r) => Some(r),
            Err(es) => {
                for e in es {
                    errors.push(err(at("platform_token:"), e));
                }
                None
            }
        },
        _ => None,
    };
    let bound_identity = matches!(primary, Some(Primary::JoinToken { .. }));
    if file.pins.len() > MAX_PINS {
        errors.push(err(at("pins:"), format!("at most {MAX_PINS} pins")));
    }
    for (k, v) in &file.pins {
        if claims::scalar_text(v).is_none() {
            errors.push(err(
                at(&format!("{k}:")),
                format!("pin `{k}` must be a string, integer or boolean"),
            ));
        }
    }
    let condition = match &file.condition {
        Some(c) => match Compiled::compile(c, expr::Role::Condition) {
            Ok(c) => Some(c),
            Err(e) => {
                errors.push(err(at("condition:"), format!("condition: {e}")));
                None
            }
        },
        None => None,
    };
    if let Err(e) = danger::check(&file, condition.as_ref()) {
        errors.push(err(at("pins:").or(at("condition:")), e));
    }

    // SPIFFE ID rule.
    let prefix = &file.spiffe_id.prefix;
    let prefix_ok = match SpiffeId::parse(prefix.trim_end_matches('/')) {
        Ok(id) if id.trust_domain() == &opts.trust_domain && prefix.ends_with('/') => true,
        Ok(_) => {
            errors.push(err(
                at("prefix:"),
                format!(
                    "spiffe_id.prefix must end with '/' and be in the trust domain {}",
                    opts.trust_domain
                ),
            ));
            false
        }
        Err(e) => {
            errors.push(err(at("prefix:"), format!("spiffe_id.prefix: {e}")));
            false
        }
    };
    let id_rule = match (&file.spiffe_id.template, &file.spiffe_id.expression) {
        // A join token names its identity; the policy only bounds it.
        (None, None) if bound_identity => Some(IdRule::Bound),
        _ if bound_identity => {
            errors.push(err(
                at("spiffe_id:"),
                "a join-token policy takes the token's own SPIFFE ID: give only spiffe_id.prefix"
                    .into(),
            ));
            None
        }
        (Some(t), None) => match Template::parse(t) {
            Ok(tpl) => {
                // The rendered ID is checked against the prefix on every
                // request; this catches a template that never could match.
                let lead = t.split('{').next().unwrap_or_default();
                if prefix_ok && !t.starts_with(prefix.as_str()) && !prefix.starts_with(lead) {
                    errors.push(err(
                        at("template:"),
                        "spiffe_id.template can never build an ID under the prefix".into(),
                    ));
                }
                if tpl.claims().next().is_none() && !t.starts_with(prefix.as_str()) {
                    errors.push(err(at("template:"), "template builds no identity".into()));
                }
                Some(IdRule::Template(tpl))
            }
            Err(e) => {
                errors.push(err(at("template:"), format!("spiffe_id.template: {e}")));
                None
            }
        },
        (None, Some(x)) => match Compiled::compile(x, expr::Role::SpiffeId) {
            Ok(c) => Some(IdRule::Expression(c)),
            Err(e) => {
                errors.push(err(at("expression:"), format!("spiffe_id.expression: {e}")));
                None
            }
        },
        _ => {
            errors.push(err(
                at("spiffe_id:"),
                "spiffe_id needs exactly one of template or expression".into(),
            ));
            None
        }
    };

    // Grants.
    let mut grants = Grants::default();
    if let Some(x) = &file.grants.x509_svid {
        // Node and join-token lineages renew, up to a lineage age; an
        // exchange's SVIDs never do (the job presents fresh evidence).
        let renews = primary
            .as_ref()
            .is_some_and(|p| p.is_node() || matches!(p, Primary::JoinToken { .. }));
        let max_lineage_age = match (&x.max_lineage_age, renews) {
            (None, true) => Some(DEFAULT_LINEAGE_AGE),
            (None, false) => None,
            (Some(_), false) => {
                errors.push(err(
                    at("max_lineage_age:"),
                    "max_lineage_age applies to node (tpm) and join_token policies only: an exchange's SVIDs are not renewed"
                        .into(),
                ));
                None
            }
            (Some(text), true) => match humantime::parse_duration(text) {
                Ok(d) if !d.is_zero() && d <= MAX_LINEAGE_AGE => Some(d),
                _ => {
                    errors.push(err(
                        at("max_lineage_age:"),
                        format!(
                            "grants.x509_svid.max_lineage_age {text:?} must be more than 0 and at most 90 days"
                        ),
                    ));
                    None
                }
            },
        };
        let mut federates_with = Vec::new();
        for f in &x.federates_with {
            match herald_core::TrustDomain::new(f) {
                Ok(td) if td == opts.trust_domain => errors.push(err(
                    at("federates_with:"),
                    format!("grants.x509_svid.federates_with {f:?} is this trust domain"),
                )),
                Ok(td) if !federates_with.contains(&td) => federates_with.push(td),
                Ok(_) => {}
                Err(e) => errors.push(err(
                    at("federates_with:"),
                    format!("grants.x509_svid.federates_with {f:?}: {e}"),
                )),
            }
        }
        match parse_ttl(&x.max_ttl) {
            Ok(max_ttl) => {
                grants.x509_svid = Some(X509Grant {
                    max_ttl,
                    // A node SVID lives as long as its policy allows.
                    ttl: primary
                        .as_ref()
                        .is_some_and(Primary::is_node)
                        .then_some(max_ttl),
                    dns_names: Vec::new(),
                    max_lineage_age,
                    federates_with,
                })
            }
            Err(e) => errors.push(err(
                at("x509_svid:"),
                format!("grants.x509_svid.max_ttl {e}"),
            )),
        }
    }
    if bound_identity && (file.grants.jwt_svid.is_some() || !file.grants.cloud.is_empty()) {
        errors.push(err(
            at("grants:"),
            "a join-token policy grants X.509 SVIDs only (herald svid mint)".into(),
        ));
    }
    if let Some(j) = &file.grants.jwt_svid {
        if j.audiences.is_empty() || j.audiences.iter().any(String::is_empty) {
            errors.push(err(
                at("jwt_svid:"),
                "grants.jwt_svid.audiences must name at least one audience".into(),
            ));
        }
        match parse_ttl(&j.max_ttl) {
            Ok(max_ttl) => {
                grants.jwt_svid = Some(JwtGrant {
                    max_ttl,
                    audiences: j.audiences.clone(),
                })
            }
            Err(e) => errors.push(err(at("jwt_svid:"), format!("grants.jwt_svid.max_ttl {e}"))),
        }
    }
    for c in &file.grants.cloud {
        let line = at(&format!("- role_arn: {}", c.role_arn)).or(at("cloud:"));
        if !c.role_arn.starts_with("arn:") || c.role_arn.len() < 20 || c.role_arn.len() > 2048 {
            errors.push(err(
                line,
                format!("role_arn {:?} is not an ARN", c.role_arn),
            ));
        }
        if grants.cloud_role(&c.role_arn).is_some() {
            errors.push(err(line, format!("role {} granted twice", c.role_arn)));
        }
        let ttl = parse_ttl(&c.max_ttl);
        if let Ok(t) = &ttl
            && *t < Duration::from_secs(900)
        {
            errors.push(err(
                line,
                "a cloud role's max_ttl must be at least 15m (the STS minimum)".into(),
            ));
        }
        let scope = ScopePolicy::from_json(&c.scope);
        match (ttl, scope) {
            (Ok(max_ttl), Ok(scope)) => grants.cloud_roles.push(CloudRoleGrant {
                role_arn: c.role_arn.clone(),
                scope,
                max_ttl,
            }),
            (Err(e), _) => errors.push(err(line, format!("max_ttl {e}"))),
            (_, Err(e)) => errors.push(err(line, format!("scope: {e}"))),
        }
    }
    if grants.is_empty() {
        errors.push(err(
            at("grants:"),
            "a policy must grant something (deny is the default)".into(),
        ));
    }
    if file.tests.len() > MAX_TESTS {
        errors.push(err(at("tests:"), format!("at most {MAX_TESTS} tests")));
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let registrations = match (&primary, file.workloads.is_empty()) {
        (_, true) => Vec::new(),
        (Some(p), false) if p.is_node() => {
            match tpm::compile_workloads(&file.workloads, opts, prefix) {
                Ok(r) => r,
                Err(es) => {
                    for e in es {
                        errors.push(err(at("workloads:"), e));
                    }
                    Vec::new()
                }
            }
        }
        (_, false) => {
            errors.push(err(
                at("workloads:"),
                "workloads are registered on node policies only (tpm, platform_token, aws_iid)"
                    .into(),
            ));
            Vec::new()
        }
    };
    for r in &registrations {
        if let Some(role) = &r.cloud_role
            && grants.cloud_role(role).is_none()
        {
            errors.push(err(
                at("cloud_role:"),
                format!(
                    "workload {}: cloud_role {role} is not one of this policy's grants.cloud roles",
                    r.spiffe_id
                ),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let (Some(id_rule), Some(primary)) = (id_rule, primary) else {
        return Err(vec![err(at("spiffe_id:"), "spiffe_id rule missing".into())]);
    };
    let policy = Policy {
        name: file.name.clone(),
        path: path.to_path_buf(),
        primary,
        platform_factor,
        require: file.evidence.require.clone(),
        pins: file.pins.clone().into_iter().collect(),
        condition,
        prefix: prefix.clone(),
        trust_domain: opts.trust_domain.clone(),
        id_rule,
        grants,
        registrations,
    };
    Ok((policy, file.tests))
}

fn run_test(policy: &Policy, index: usize, t: &model::TestSpec) -> TestOutcome {
    let outcome = |passed: bool, detail: String| TestOutcome {
        path: policy.path.clone(),
        policy: policy.name.clone(),
        index,
        name: t.name.clone(),
        passed,
        detail,
    };
    // Evidence a verifier refuses before policy is asked.
    let expect_refusal = |code: ErrorCode, reason: String| match (&t.expect.code, t.expect.allow) {
        (_, true) => outcome(false, format!("refused ({code}): {reason}")),
        (Some(want), false) if want != code.as_str() => outcome(
            false,
            format!("refused with {code}, expected {want}: {reason}"),
        ),
        _ => outcome(true, format!("refused ({code})")),
    };
    let mut evidence = Evidence::default();
    if let (Some(o), Primary::Oidc { issuer, audiences }) = (&t.evidence.oidc, &policy.primary) {
        evidence.oidc = Some(OidcEvidence {
            issuer: o.issuer.clone().unwrap_or_else(|| issuer.clone()),
            audiences: o
                .audiences
                .clone()
                .unwrap_or_else(|| audiences.iter().take(1).cloned().collect()),
            claims: o.claims.clone(),
        });
    }
    if let Some(pt) = &t.evidence.platform_token {
        let rules = match (&policy.primary, &policy.platform_factor) {
            (Primary::PlatformToken(r), _) | (_, Some(r)) => Some(r),
            _ => None,
        };
        let token = VerifiedToken {
            issuer: pt
                .issuer
                .clone()
                .or_else(|| rules.map(|r| r.issuer.clone()))
                .unwrap_or_default(),
            subject: String::new(),
            audiences: pt.audiences.clone().unwrap_or_else(|| {
                rules
                    .map(|r| r.audiences.iter().take(1).cloned().collect())
                    .unwrap_or_default()
            }),
            claims: pt.claims.clone(),
            replay_key: String::new(),
            expires_at: 0,
            digest: String::new(),
        };
        // The verifier's own derivation: a test sees the node claims (and
        // the refusal of a token naming no node) exactly as a request does.
        match herald_attest::node_token::node_token(token) {
            Ok(n) => evidence.platform_token = Some(PlatformTokenEvidence::verified(&n, false)),
            Err(e) => return expect_refusal(e.code(), e.to_string()),
        }
    }
    if let Some(a) = &t.evidence.aws_iid {
        let age = match a.age.as_deref().map(humantime::parse_duration).transpose() {
            Ok(d) => d.map_or(0, |d| d.as_secs() as i64),
            Err(e) => return outcome(false, format!("test evidence aws_iid.age: {e}")),
        };
        evidence.aws_iid = Some(AwsIidEvidence {
            trusted_by: vec![policy.name.clone()],
            claims: a.claims.clone(),
            age_secs: age,
            enrolled: false,
        });
    }
    if let Some(tp) = &t.evidence.tpm {
        let mut pcrs = BTreeMap::new();
        for (i, v) in &tp.pcrs {
            match hex::decode(v) {
                Ok(d) => {
                    pcrs.insert(*i, d);
                }
                Err(_) => return outcome(false, format!("test evidence PCR {i} is not hex")),
            }
        }
        let mut claims = Map::new();
        claims.insert("ek_hash".into(), Value::String(tp.ek_hash.clone()));
        claims.insert("firmware_version".into(), Value::from(tp.firmware_version));
        evidence.tpm = Some(TpmEvidence {
            trusted_by: vec![policy.name.clone()],
            claims,
            pcrs,
            firmware_version: tp.firmware_version,
            enrolled: tp.enrolled,
        });
    }
    match (
        t.evidence
            .join_token
            .as_ref()
            .map(|j| test_join_token(policy, j))
            .transpose(),
        t.evidence
            .x509_svid
            .as_ref()
            .map(|f| test_svid(&f.spiffe_id))
            .transpose(),
    ) {
        (Ok(j), Ok(s)) => {
            evidence.join_token = j;
            evidence.x509_svid = s;
        }
        (Err(e), _) | (_, Err(e)) => return outcome(false, e),
    }
    match (policy.decide(&evidence), t.expect.allow) {
        (Ok(d), true) => match &t.expect.spiffe_id {
            Some(want) if want != d.spiffe_id.as_str() => outcome(
                false,
                format!("allowed as {}, expected {want}", d.spiffe_id),
            ),
            _ => outcome(true, format!("allowed as {}", d.spiffe_id)),
        },
        (Ok(d), false) => outcome(
            false,
            format!("allowed as {}, expected a refusal", d.spiffe_id),
        ),
        (Err(d), true) => outcome(false, format!("refused ({}): {}", d.code, d.reason)),
        (Err(d), false) => match &t.expect.code {
            Some(want) if want != d.code.as_str() => outcome(
                false,
                format!("refused with {}, expected {want}: {}", d.code, d.reason),
            ),
            _ => outcome(true, format!("refused ({})", d.code)),
        },
    }
}

/// A test's join token: unless the test says otherwise, one created for the
/// role it plays under `policy` (see [`model::TestJoinToken`]).
fn test_join_token(policy: &Policy, j: &model::TestJoinToken) -> Result<VerifiedJoinToken, String> {
    let spiffe_id =
        SpiffeId::parse(&j.spiffe_id).map_err(|e| format!("test evidence SPIFFE ID: {e}"))?;
    let purpose = match &j.purpose {
        Some(p) => JoinTokenPurpose::from_code(p)
            .ok_or_else(|| format!("test evidence: unknown join token purpose {p:?}"))?,
        None => match policy.primary {
            Primary::JoinToken { .. } => JoinTokenPurpose::Bootstrap,
            Primary::Oidc { .. } => JoinTokenPurpose::SecondFactor,
            _ => JoinTokenPurpose::NodeEnrolment,
        },
    };
    let policies = match &j.policies {
        Some(p) => p.clone(),
        None if purpose == JoinTokenPurpose::SecondFactor => vec![policy.name.clone()],
        None => Vec::new(),
    };
    Ok(VerifiedJoinToken {
        hash: [0; 32],
        token_id: "0000000000000000".into(),
        spiffe_id,
        purpose,
        policies,
        created_by: "operator:policy-test".into(),
    })
}

/// A test's presented SVID: a current node-lineage SVID for `spiffe_id`.
fn test_svid(spiffe_id: &str) -> Result<VerifiedSvid, String> {
    Ok(VerifiedSvid {
        spiffe_id: SpiffeId::parse(spiffe_id)
            .map_err(|e| format!("test evidence SPIFFE ID: {e}"))?,
        serial: "00".into(),
        not_before: 0,
        not_after: i64::MAX,
        spki_sha256: String::new(),
        dns_names: Vec::new(),
        cert_sha256: String::new(),
        origin: Origin::Bootstrap,
        policy: None,
        root_serial: "00".into(),
        root_at: 0,
    })
}

/// The policy set in effect, reloaded on demand; a broken set never
/// replaces a good one.
#[derive(Debug)]
pub struct PolicyStore {
    dir: PathBuf,
    extra: Vec<(PathBuf, String)>,
    opts: LoadOptions,
    current: RwLock<Arc<PolicySet>>,
}

impl PolicyStore {
    /// Loads `dir`; fails if the set is broken (a server must not start on one).
    pub fn new(dir: PathBuf, opts: LoadOptions) -> Result<Self, LoadErrors> {
        Self::with_extra(dir, Vec::new(), opts)
    }

    /// Loads `dir` plus `extra` sources, which stay part of every reload.
    pub fn with_extra(
        dir: PathBuf,
        extra: Vec<(PathBuf, String)>,
        opts: LoadOptions,
    ) -> Result<Self, LoadErrors> {
        let set = PolicySet::load_dir_with(&dir, &extra, &opts)?;
        Ok(Self {
            dir,
            extra,
            opts,
            current: RwLock::new(Arc::new(set)),
        })
    }

    /// The set in effect.
    pub fn current(&self) -> Arc<PolicySet> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Loads the directory again; swaps only if the new set is valid.
    /// Returns the number of policies now in effect.
    pub fn reload(&self) -> Result<usize, LoadErrors> {
        let set = PolicySet::load_dir_with(&self.dir, &self.extra, &self.opts)?;
        let n = set.len();
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(set),
            Err(p) => *p.into_inner() = Arc::new(set),
        }
        Ok(n)
    }
}
