//! Regenerates the gRPC code from proto/ with protox (no protoc) and fails if the committed code
//! in src/gen differs. Run with `TESSERA_REGENERATE=1` to write the new code instead.
//!
//! `proto/workloadapi.proto` is the SPIFFE Workload API exactly as upstream publishes it
//! (`standards/workloadapi.proto`). It declares no `package`, so prost writes it to `_.rs` and the
//! gRPC paths are `/SpiffeWorkloadAPI/<Method>`: the paths every SPIFFE client library dials.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step should panic

use std::path::{Path, PathBuf};

const PROTOS: &[&str] = &[
    "tessera/v1/types.proto",
    "tessera/v1/policy.proto",
    "tessera/v1/destination.proto",
    "tessera/v1/agent.proto",
    "tessera/v1/admin.proto",
    "tessera/v1/authority.proto",
    "tessera/v1/federation.proto",
    // Upstream SPIFFE Workload API, byte for byte; imports google/protobuf/struct.proto, which
    // protox ships.
    "workloadapi.proto",
    // Envoy's Secret Discovery Service (SDS v3): a trimmed subset of the Envoy API with upstream
    // package names, messages and field numbers (proto/envoy/README.md).
    "envoy/service/secret/v3/sds.proto",
    // Envoy's external authorization API (ext_authz v3), trimmed the same way.
    "envoy/service/auth/v3/external_auth.proto",
    "envoy/extensions/transport_sockets/tls/v3/secret.proto",
    "envoy/extensions/transport_sockets/tls/v3/tls_spiffe_validator_config.proto",
];

fn generate(out: &Path) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let fds = protox::compile(PROTOS, [&root]).expect("protos compile");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .out_dir(out)
        .compile_fds(fds)
        .expect("code generation");
}

#[test]
fn generated_code_is_current() {
    let committed = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src/gen");
    let tmp = tempfile::tempdir().unwrap();
    generate(tmp.path());
    let mut names: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    names.sort();
    if std::env::var_os("TESSERA_REGENERATE").is_some() {
        for name in &names {
            std::fs::copy(tmp.path().join(name), committed.join(name)).unwrap();
        }
        return;
    }
    for name in &names {
        let fresh = std::fs::read_to_string(tmp.path().join(name)).unwrap();
        let old = std::fs::read_to_string(committed.join(name)).unwrap_or_default();
        assert!(
            fresh == old,
            "crates/proto/src/gen/{} is stale: run `TESSERA_REGENERATE=1 cargo test -p tessera-proto` and commit",
            name.to_string_lossy()
        );
    }
}

/// Real Workload API clients (go-spiffe, py-spiffe, the Rust `spiffe` crate) call these exact
/// paths; a `package` added to the proto, or a renamed service, would break every one of them.
#[test]
fn workload_api_keeps_the_upstream_service_name_and_paths() {
    use tessera_proto::workload::spiffe_workload_api_server::SERVICE_NAME;
    assert_eq!(SERVICE_NAME, "SpiffeWorkloadAPI");
    let code = include_str!("../src/gen/_.rs");
    for method in [
        "FetchX509SVID",
        "FetchX509Bundles",
        "FetchJWTSVID",
        "FetchJWTBundles",
        "ValidateJWTSVID",
        "FetchWITSVID",
        "FetchWITBundles",
    ] {
        // The server routes on this string; the client sends it.
        let route = format!("\"/SpiffeWorkloadAPI/{method}\" =>");
        assert!(code.contains(&route), "server does not route {route}");
        let call = format!("\"/SpiffeWorkloadAPI/{method}\",");
        assert!(code.contains(&call), "client does not call {call}");
    }
}

/// Envoy dials `/envoy.service.secret.v3.SecretDiscoveryService/<Method>`: the trimmed protos must
/// keep the upstream package and service name.
#[test]
fn sds_keeps_the_upstream_service_name_and_paths() {
    use tessera_proto::xds::envoy::service::secret::v3::secret_discovery_service_server::SERVICE_NAME;
    assert_eq!(
        SERVICE_NAME,
        "envoy.service.secret.v3.SecretDiscoveryService"
    );
    let code = include_str!("../src/gen/envoy.service.secret.v3.rs");
    for method in ["StreamSecrets", "FetchSecrets", "DeltaSecrets"] {
        let route = format!("\"/envoy.service.secret.v3.SecretDiscoveryService/{method}\" =>");
        assert!(code.contains(&route), "server does not route {route}");
    }
}
