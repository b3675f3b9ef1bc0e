//! Refusals and their gRPC form.

use herald_core::ErrorCode;
use herald_core::error::ErrorClass;
use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

/// The gRPC metadata key that carries the stable error code.
pub const ERROR_CODE_METADATA: &str = "herald-error-code";

/// A refused request: the stable code, a message safe to show the caller,
/// and whether the store already wrote its audit record.
#[derive(Debug)]
pub struct Refusal {
    /// The stable code.
    pub code: ErrorCode,
    /// Human-readable detail; never contains secrets.
    pub message: String,
    /// True when the audit record was written as part of a failed commit.
    pub audited: bool,
}

impl Refusal {
    /// A refusal not yet audited.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            audited: false,
        }
    }

    /// The gRPC status for this refusal.
    pub fn to_status(&self) -> Status {
        let code = match self.code.class() {
            ErrorClass::InvalidArgument => Code::InvalidArgument,
            ErrorClass::Unauthenticated => Code::Unauthenticated,
            ErrorClass::PermissionDenied => Code::PermissionDenied,
            ErrorClass::ResourceExhausted => Code::ResourceExhausted,
            ErrorClass::Internal => Code::Internal,
            ErrorClass::Unavailable => Code::Unavailable,
        };
        let mut status = Status::new(code, format!("{}: {}", self.code, self.message));
        status.metadata_mut().insert(
            ERROR_CODE_METADATA,
            MetadataValue::from_static(self.code.as_str()),
        );
        status
    }
}

impl From<herald_store::StoreError> for Refusal {
    fn from(e: herald_store::StoreError) -> Self {
        tracing::error!(error = %e, "datastore error");
        Refusal::new(
            ErrorCode::StoreUnavailable,
            "the datastore is unavailable; retry",
        )
    }
}

impl From<herald_ca::CaError> for Refusal {
    fn from(e: herald_ca::CaError) -> Self {
        let code = e.code();
        if code == ErrorCode::Internal {
            tracing::error!(error = %e, "CA error");
            return Refusal::new(code, "certificate issuance failed");
        }
        Refusal::new(code, e.to_string())
    }
}
