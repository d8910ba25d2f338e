//! Generated gRPC code for Tessera's own APIs (server ↔ agent, admin).
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
