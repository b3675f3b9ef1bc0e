//! Generated gRPC types and stubs for Herald's API, package `herald.v1`.
//!
//! The source of truth is `proto/herald/v1/herald.proto` at the workspace root.
#![forbid(unsafe_code)]
#![allow(missing_docs, clippy::all)]

/// `herald.v1`: X.509 SVID issuance and trust bundle distribution.
pub mod v1 {
    tonic::include_proto!("herald.v1");
}
