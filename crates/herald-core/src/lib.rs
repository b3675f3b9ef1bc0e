//! Herald's shared vocabulary.
//!
//! Everything here is pure data and validation: SPIFFE IDs and trust domains
//! exactly as the SPIFFE standard defines them, the evidence kinds Herald
//! accepts, the audit event every decision produces, and the stable error
//! codes callers and operators see. No I/O, no crypto.
#![forbid(unsafe_code)]

pub mod audit;
pub mod duration;
pub mod error;
pub mod evidence;
pub mod id_template;
pub mod lineage;
pub mod rate_limit;
pub mod scope;
pub mod selector;
pub mod spiffe_id;

pub use audit::{AuditEvent, Outcome};
pub use error::ErrorCode;
pub use evidence::EvidenceType;
pub use id_template::{IdTemplate, RegisteredId};
pub use lineage::{CredentialStatus, JoinTokenPurpose, JoinTokenRecord, Origin};
pub use scope::{ScopeError, ScopePolicy};
pub use selector::{Selector, SelectorError};
pub use spiffe_id::{SpiffeId, SpiffeIdError, TrustDomain};
