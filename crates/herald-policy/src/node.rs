//! Node evidence other than a TPM: platform tokens and AWS instance
//! identity documents.
//!
//! ```yaml
//! evidence:
//!   platform_token:                    # a Kubernetes PSAT or a GCP instance-identity JWT
//!     issuer: https://oidc.eks.eu-west-1.amazonaws.com/id/EXAMPLE
//!     audiences: [herald]
//!     cluster: prod-eu                 # offered as the claim `cluster`
//! spiffe_id:
//!   prefix: spiffe://example.org/k8s/
//!   template: "spiffe://example.org/k8s/{cluster}/node/{node}"
//! ```
//!
//! ```yaml
//! evidence:
//!   aws_iid:
//!     certificates: [aws/eu-west-1.pem]  # relative to the policy file
//!     max_age: 1h                        # pendingTime no older than this
//! pins: { account: "123456789012", region: eu-west-1 }
//! ```
//!
//! A platform token's claims are the token's own (normalised) plus the
//! flat ones the verifier derives (`herald_attest::node_token`:
//! `platform`, `namespace`, `serviceaccount`, `pod`, `node`, `node_uid`;
//! `project_id`, `zone`, `instance_id`, `instance_name`) and `cluster`.
//! An identity document's are `account`, `region`, `instance_id`,
//! `instance_type`, `image_id`, `availability_zone`, `pending_time`,
//! `architecture`, `private_ip`.
//!
//! A TPM policy may also name `platform_token` and `require:
//! [platform_token]`: machine MFA — a quote and a fresh platform token at
//! every attestation, the token's claims offered as `platform_token.*`.

use std::path::Path;
use std::time::Duration;

use crate::model::{AwsIidSpec, PlatformTokenSpec};
use crate::tpm::read_pem_certs;

/// Longest `max_age` a policy may set.
pub const MAX_IID_AGE: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far in the future a `pendingTime` may lie (clock skew).
pub const IID_FUTURE_LEEWAY_SECS: i64 = 300;

/// Which platform tokens a policy accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformTokenRules {
    /// The issuer, exactly.
    pub issuer: String,
    /// Accepted audiences (one must be the token's).
    pub audiences: Vec<String>,
    /// The claim `cluster`, when set.
    pub cluster: Option<String>,
}

impl PlatformTokenRules {
    /// Whether a token from `issuer` for `audiences` is one this policy reads.
    pub fn accepts(&self, issuer: &str, audiences: &[String]) -> bool {
        self.issuer == issuer && audiences.iter().any(|a| self.audiences.contains(a))
    }
}

/// A policy's AWS instance identity rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsIidRules {
    /// The RSA public keys (PKCS#1) of the configured AWS certificates.
    pub keys: Vec<Vec<u8>>,
    /// Oldest `pendingTime` accepted, as an age.
    pub max_age: Option<Duration>,
}

pub(crate) fn compile_platform_token(
    spec: &PlatformTokenSpec,
) -> Result<PlatformTokenRules, Vec<String>> {
    let mut errors = Vec::new();
    if !spec.issuer.starts_with("https://") && !spec.issuer.starts_with("http://") {
        errors.push("evidence.platform_token.issuer must be a URL".into());
    }
    if spec.audiences.is_empty() || spec.audiences.iter().any(String::is_empty) {
        errors.push("evidence.platform_token.audiences must name at least one audience".into());
    }
    if let Some(c) = &spec.cluster
        && (c.is_empty()
            || c.len() > 64
            || !c
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.'))
    {
        errors.push(
            "evidence.platform_token.cluster must be 1-64 characters of [A-Za-z0-9._-]".into(),
        );
    }
    if errors.is_empty() {
        Ok(PlatformTokenRules {
            issuer: spec.issuer.clone(),
            audiences: spec.audiences.clone(),
            cluster: spec.cluster.clone(),
        })
    } else {
        Err(errors)
    }
}

pub(crate) fn compile_aws_iid(
    spec: &AwsIidSpec,
    policy_path: &Path,
) -> Result<AwsIidRules, Vec<String>> {
    let base = policy_path.parent().unwrap_or(Path::new("."));
    let mut errors = Vec::new();
    let mut keys = Vec::new();
    if spec.certificates.is_empty() {
        errors.push("evidence.aws_iid.certificates must name at least one certificate file".into());
    }
    for f in &spec.certificates {
        match read_pem_certs(base, f) {
            Ok(certs) => {
                for c in certs {
                    match herald_attest::aws_iid::certificate_key(&c) {
                        Ok(k) => keys.push(k),
                        Err(e) => errors.push(format!("evidence.aws_iid: {f}: {e}")),
                    }
                }
            }
            Err(e) => errors.push(format!("evidence.aws_iid: {e}")),
        }
    }
    let max_age = match &spec.max_age {
        None => None,
        Some(text) => match humantime::parse_duration(text) {
            Ok(d) if !d.is_zero() && d <= MAX_IID_AGE => Some(d),
            _ => {
                errors.push(format!(
                    "evidence.aws_iid.max_age {text:?} must be more than 0 and at most 365 days"
                ));
                None
            }
        },
    };
    if errors.is_empty() {
        Ok(AwsIidRules { keys, max_age })
    } else {
        Err(errors)
    }
}
