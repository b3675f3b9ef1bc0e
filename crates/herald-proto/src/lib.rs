//! Generated gRPC types and stubs for Herald's API, package `herald.v1`.
//!
//! The source of truth is `proto/herald/v1/herald.proto` at the workspace root.
#![forbid(unsafe_code)]
#![allow(missing_docs, clippy::all)]

/// `herald.v1`: X.509 SVID issuance and trust bundle distribution.
pub mod v1 {
    tonic::include_proto!("herald.v1");
}

/// The SPIFFE Workload API (`proto/spiffe/workload.proto`, no package:
/// `/SpiffeWorkloadAPI/FetchX509SVID` and so on on the wire).
pub mod workload {
    include!(concat!(env!("OUT_DIR"), "/_.rs"));

    /// Encoded `FileDescriptorSet` of the Workload API, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/workload_descriptor.bin"));
}
