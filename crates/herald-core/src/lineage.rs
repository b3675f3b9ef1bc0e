//! Lineage: where every credential comes from.
//!
//! Each issued credential records its parent (the credential presented to
//! get it, if any) and the root of its lineage — the credential issued on
//! fresh evidence (a node attestation, a token exchange, a join-token use)
//! that everything after it descends from. Renewal re-checks the lineage;
//! revoking or banning anything revokes its descendants.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How a lineage began: the fresh evidence at its root, which decides what
/// its credentials may be used for and whether they renew.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// A node attestation (TPM quote): the node's SVID. Renewable within
    /// its policy's `max_lineage_age`; the only lineage the workload
    /// service accepts as a node.
    Node,
    /// A bootstrap join token: renewable within its policy's
    /// `max_lineage_age`.
    Bootstrap,
    /// A break-glass join token: never renewed — an emergency identity
    /// lasts one SVID lifetime, and another needs another time-boxed
    /// token with its reason. Reported as break-glass use.
    BreakGlass,
    /// A token exchange (OIDC evidence): never renewed — the job presents
    /// fresh evidence.
    Exchange,
    /// Issued to a node agent for one of its workloads: never renewed by
    /// the workload's key — the agent has it re-issued against the current
    /// registrations.
    Workload,
}

impl Origin {
    /// The stable string form stored with each credential.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Node => "node",
            Origin::Bootstrap => "bootstrap",
            Origin::BreakGlass => "break_glass",
            Origin::Exchange => "exchange",
            Origin::Workload => "workload",
        }
    }

    /// Parses the stable string form.
    pub fn from_code(s: &str) -> Option<Self> {
        match s {
            "node" => Some(Origin::Node),
            "bootstrap" => Some(Origin::Bootstrap),
            "break_glass" => Some(Origin::BreakGlass),
            "exchange" => Some(Origin::Exchange),
            "workload" => Some(Origin::Workload),
            _ => None,
        }
    }

    /// Whether credentials of this lineage may be renewed by presenting
    /// them (still subject to their policy and its lineage age).
    pub fn is_renewable(self) -> bool {
        matches!(self, Origin::Node | Origin::Bootstrap)
    }
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a join token was created for. A token is refused for any other use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JoinTokenPurpose {
    /// Mint an SVID on its own (`MintX509Svid`), if a policy accepting
    /// join-token evidence grants one.
    Bootstrap,
    /// The enrolment factor of a TPM node policy (`require: [join_token]`).
    NodeEnrolment,
    /// The second factor of the named OIDC policies (`require: [join_token]`).
    SecondFactor,
    /// An emergency mint, time-boxed and with a recorded reason; only
    /// policies that list `break_glass` accept it.
    BreakGlass,
}

impl JoinTokenPurpose {
    /// Every purpose.
    pub const ALL: [JoinTokenPurpose; 4] = [
        JoinTokenPurpose::Bootstrap,
        JoinTokenPurpose::NodeEnrolment,
        JoinTokenPurpose::SecondFactor,
        JoinTokenPurpose::BreakGlass,
    ];

    /// The stable string form.
    pub fn as_str(self) -> &'static str {
        match self {
            JoinTokenPurpose::Bootstrap => "bootstrap",
            JoinTokenPurpose::NodeEnrolment => "node",
            JoinTokenPurpose::SecondFactor => "second_factor",
            JoinTokenPurpose::BreakGlass => "break_glass",
        }
    }

    /// Parses the stable string form.
    pub fn from_code(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }
}

impl fmt::Display for JoinTokenPurpose {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored join token (without its hash), as the verifier reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// Public identifier.
    pub token_id: String,
    /// The SPIFFE ID the token is bound to.
    pub spiffe_id: String,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// When it was used, Unix seconds.
    pub used_at: Option<i64>,
    /// Who created it.
    pub created_by: String,
    /// What it may be used for.
    pub purpose: JoinTokenPurpose,
    /// For a second factor (optionally for node enrolment): the policies it
    /// may serve.
    pub policies: Vec<String>,
    /// Why it was created (required for break-glass).
    pub reason: Option<String>,
}

/// What the store knows of an issued credential and its lineage's
/// standing: one batched lookup on every presented SVID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialStatus {
    /// Serial, lowercase hex.
    pub serial: String,
    /// The SPIFFE ID it was issued for.
    pub spiffe_id: String,
    /// `x509_svid`, `jwt_svid` or `cloud_session`.
    pub kind: String,
    /// How its lineage began; `None` for a record this version cannot read.
    pub origin: Option<Origin>,
    /// The policy that granted its lineage.
    pub policy: Option<String>,
    /// Its notAfter, Unix seconds.
    pub not_after: i64,
    /// Hex SHA-256 of its SubjectPublicKeyInfo.
    pub public_key_sha256: String,
    /// The CA key that signed it.
    pub ca_key_id: String,
    /// Hex SHA-256 of the certificate as issued; `None` where not kept.
    pub cert_sha256: Option<String>,
    /// The root of its lineage (itself for a root).
    pub root_serial: String,
    /// When the root's fresh evidence was presented, Unix seconds.
    pub root_at: i64,
    /// Whether it, or any credential it descends from, has been revoked.
    pub revoked: bool,
    /// Whether its lineage belongs to a banned node.
    pub node_banned: bool,
}
