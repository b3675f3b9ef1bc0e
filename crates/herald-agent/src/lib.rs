//! Herald's node agent.
//!
//! `herald agent` proves its machine with the TPM 2.0 ([`tpm`], the only
//! code in Herald that links libtss2), runs the attestation stream against
//! a server ([`attest`]) and keeps the node SVID fresh ([`agent`]): renewal
//! over mTLS at about half the lifetime with jitter, re-attestation when a
//! renewal is refused, backoff with jitter while servers are unreachable.
//! Nodes without a TPM attest with a platform token file or the AWS
//! instance identity document ([`imds`]) instead. [`run`] wires the whole
//! agent; the `herald-agent` binary (a smaller executable than `herald`,
//! for nodes) and `herald agent` both start it.
#![forbid(unsafe_code)]

pub mod agent;
pub mod attest;
pub mod config;
pub mod imds;
pub mod run;
pub mod tpm;
pub mod workload;

pub use agent::{Agent, AgentError, AgentStatus};
pub use config::AgentConfig;
