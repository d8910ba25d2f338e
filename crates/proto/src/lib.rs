//! Generated gRPC code for Tessera's own APIs (server ↔ agent, admin) and for the SPIFFE
//! Workload API ([`workload`], from the upstream `workloadapi.proto`, service `SpiffeWorkloadAPI`).
//!
//! The code in `src/gen` is generated from `proto/` by the `generated_code_is_current` test with
//! protox and tonic-prost-build and committed, so building Tessera never needs protoc.

#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms,
    missing_debug_implementations
)]
pub mod v1 {
    include!("gen/tessera.v1.rs");
}

/// The SPIFFE Workload API, generated from the upstream `standards/workloadapi.proto` (copied byte
/// for byte to `proto/workloadapi.proto`). It has no proto package, so the service is
/// `SpiffeWorkloadAPI` and its paths are `/SpiffeWorkloadAPI/FetchX509SVID` and so on.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms,
    missing_debug_implementations
)]
pub mod workload {
    include!("gen/_.rs");
}
