//! The kinds of evidence a caller can present.

use std::fmt;

use serde::{Deserialize, Serialize};

/// What proved the caller's identity for a decision. Recorded in every audit
/// record so coverage (hardware-backed, multi-factor, break-glass) can be
/// computed from the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum EvidenceType {
    /// A one-time join token used to bootstrap an identity.
    JoinToken,
    /// A one-time, time-boxed break-glass join token, created with a reason:
    /// counted apart so every use stands out in reports and metrics.
    BreakGlass,
    /// The caller's current X.509 SVID, presented over mTLS.
    X509Svid,
    /// A JWT-SVID presented as a bearer token (introspection callers).
    JwtSvid,
    /// An operator at the command line.
    Operator,
    /// A verified OIDC ID token from a configured issuer.
    Oidc,
    /// Machine MFA: an OIDC token and a join token, both verified.
    #[serde(rename = "oidc+join_token")]
    OidcAndJoinToken,
    /// Machine MFA: an OIDC token and the caller's current X.509 SVID.
    #[serde(rename = "oidc+x509_svid")]
    OidcAndX509Svid,
    /// A TPM 2.0 quote with an EK certificate chain and credential
    /// activation: hardware-backed.
    Tpm,
    /// Machine MFA at node enrolment: a TPM quote and a join token.
    #[serde(rename = "tpm+join_token")]
    TpmAndJoinToken,
    /// A platform OIDC token as node evidence: a Kubernetes projected
    /// service-account token or a GCP instance-identity token.
    PlatformToken,
    /// Machine MFA for a node: a TPM quote and a platform token.
    #[serde(rename = "tpm+platform_token")]
    TpmAndPlatformToken,
    /// An AWS EC2 instance identity document with its signature.
    AwsIid,
}

impl EvidenceType {
    /// The stable string form stored in audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            EvidenceType::JoinToken => "join_token",
            EvidenceType::BreakGlass => "break_glass",
            EvidenceType::X509Svid => "x509_svid",
            EvidenceType::JwtSvid => "jwt_svid",
            EvidenceType::Operator => "operator",
            EvidenceType::Oidc => "oidc",
            EvidenceType::OidcAndJoinToken => "oidc+join_token",
            EvidenceType::OidcAndX509Svid => "oidc+x509_svid",
            EvidenceType::Tpm => "tpm",
            EvidenceType::TpmAndJoinToken => "tpm+join_token",
            EvidenceType::PlatformToken => "platform_token",
            EvidenceType::TpmAndPlatformToken => "tpm+platform_token",
            EvidenceType::AwsIid => "aws_iid",
        }
    }

    /// Parses the stable string form.
    pub fn from_code(s: &str) -> Option<Self> {
        match s {
            "join_token" => Some(EvidenceType::JoinToken),
            "break_glass" => Some(EvidenceType::BreakGlass),
            "x509_svid" => Some(EvidenceType::X509Svid),
            "jwt_svid" => Some(EvidenceType::JwtSvid),
            "operator" => Some(EvidenceType::Operator),
            "oidc" => Some(EvidenceType::Oidc),
            "oidc+join_token" => Some(EvidenceType::OidcAndJoinToken),
            "oidc+x509_svid" => Some(EvidenceType::OidcAndX509Svid),
            "tpm" => Some(EvidenceType::Tpm),
            "tpm+join_token" => Some(EvidenceType::TpmAndJoinToken),
            "platform_token" => Some(EvidenceType::PlatformToken),
            "tpm+platform_token" => Some(EvidenceType::TpmAndPlatformToken),
            "aws_iid" => Some(EvidenceType::AwsIid),
            _ => None,
        }
    }
}

impl EvidenceType {
    /// How many independent factors this evidence combines (machine MFA when > 1).
    pub fn factor_count(self) -> usize {
        match self {
            EvidenceType::OidcAndJoinToken
            | EvidenceType::OidcAndX509Svid
            | EvidenceType::TpmAndJoinToken
            | EvidenceType::TpmAndPlatformToken => 2,
            _ => 1,
        }
    }

    /// Whether the evidence includes a hardware root of trust (a TPM).
    pub fn is_hardware_backed(self) -> bool {
        matches!(
            self,
            EvidenceType::Tpm | EvidenceType::TpmAndJoinToken | EvidenceType::TpmAndPlatformToken
        )
    }
}

impl fmt::Display for EvidenceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
