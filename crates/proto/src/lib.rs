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

/// Envoy's xDS types for the Secret Discovery Service (SDS v3), from a trimmed subset of the Envoy
/// API in `proto/envoy/` (upstream package names, messages and field numbers; see its README).
/// The module tree mirrors the proto packages so that generated cross-references resolve.
#[allow(
    missing_docs,
    unreachable_pub,
    clippy::all,
    clippy::pedantic,
    rust_2018_idioms,
    missing_debug_implementations
)]
pub mod xds {
    pub mod envoy {
        pub mod config {
            pub mod core {
                pub mod v3 {
                    include!("gen/envoy.config.core.v3.rs");
                }
            }
        }
        pub mod r#type {
            pub mod v3 {
                include!("gen/envoy.r#type.v3.rs");
            }
        }
        pub mod service {
            pub mod discovery {
                pub mod v3 {
                    include!("gen/envoy.service.discovery.v3.rs");
                }
            }
            pub mod secret {
                pub mod v3 {
                    include!("gen/envoy.service.secret.v3.rs");
                }
            }
            pub mod auth {
                pub mod v3 {
                    include!("gen/envoy.service.auth.v3.rs");
                }
            }
        }
        pub mod extensions {
            pub mod transport_sockets {
                pub mod tls {
                    pub mod v3 {
                        include!("gen/envoy.extensions.transport_sockets.tls.v3.rs");
                    }
                }
            }
        }
    }
    pub mod google {
        pub mod rpc {
            include!("gen/google.rpc.rs");
        }
    }
}
