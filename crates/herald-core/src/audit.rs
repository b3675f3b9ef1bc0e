//! The audit event: one per decision, success or refusal.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::{ErrorCode, EvidenceType};

/// Now, Unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The result of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The request was granted.
    Success,
    /// The request was refused (bad evidence, policy, input).
    Denied,
    /// Herald failed to serve a request it would have granted.
    Error,
}

impl Outcome {
    /// The stable string form stored in audit records.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Denied => "denied",
            Outcome::Error => "error",
        }
    }

    /// Parses the stable string form.
    pub fn from_code(s: &str) -> Option<Self> {
        match s {
            "success" => Some(Outcome::Success),
            "denied" => Some(Outcome::Denied),
            "error" => Some(Outcome::Error),
            _ => None,
        }
    }
}

/// What happened, who asked, with which evidence, under which policy, and
/// how it ended. Never holds a secret: evidence appears only as a digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// When the decision was made, Unix milliseconds.
    pub time_ms: i64,
    /// Who asked: a SPIFFE ID, a peer address, or `operator:<user>`.
    pub caller: String,
    /// What was asked, e.g. `x509_svid.mint`.
    pub action: String,
    /// The kind of evidence presented, if any.
    pub evidence_type: Option<EvidenceType>,
    /// Hex SHA-256 of the evidence (token hash, certificate), never the evidence itself.
    pub evidence_digest: Option<String>,
    /// The policy (or grant source) that decided.
    pub policy: Option<String>,
    /// The SPIFFE ID concerned.
    pub spiffe_id: Option<String>,
    /// The serial of the credential issued or concerned.
    pub serial: Option<String>,
    /// How it ended.
    pub outcome: Outcome,
    /// The stable error code of a refusal.
    pub reason: Option<ErrorCode>,
    /// More about the record where one field is not enough: an aggregated
    /// record's count and window (rate-limited floods), a checkpoint's
    /// head. Never a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl AuditEvent {
    /// A new event stamped now, with outcome `Success` until told otherwise.
    pub fn new(action: impl Into<String>, caller: impl Into<String>) -> Self {
        Self {
            time_ms: now_ms(),
            caller: caller.into(),
            action: action.into(),
            evidence_type: None,
            evidence_digest: None,
            policy: None,
            spiffe_id: None,
            serial: None,
            outcome: Outcome::Success,
            reason: None,
            detail: None,
        }
    }

    /// Marks the event as refused with `code`.
    pub fn deny(mut self, code: ErrorCode) -> Self {
        self.outcome = if code.class() == crate::error::ErrorClass::Internal
            || code.class() == crate::error::ErrorClass::Unavailable
        {
            Outcome::Error
        } else {
            Outcome::Denied
        };
        self.reason = Some(code);
        self
    }
}
