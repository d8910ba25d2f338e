//! Regenerates the gRPC code from proto/ with protox (no protoc) and fails if the committed code
//! in src/gen differs. Run with `TESSERA_REGENERATE=1` to write the new code instead.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step should panic

use std::path::{Path, PathBuf};

const PROTOS: &[&str] = &[
    "tessera/v1/types.proto",
    "tessera/v1/agent.proto",
    "tessera/v1/admin.proto",
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
