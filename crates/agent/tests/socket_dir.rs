//! The Workload API socket's directory must belong to the agent: another user owning it could
//! swap the socket and serve workloads forged identities.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

#[tokio::test]
async fn a_socket_directory_owned_by_another_user_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI runs as root"
        );
        eprintln!("skipping: needs root to chown a directory to another user");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    nix::unistd::chown(&theirs, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
    let err = tessera_agent::workload_api::bind(&theirs.join("agent.sock"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("owned by uid 65534"), "{err}");
    assert!(!theirs.join("agent.sock").exists(), "nothing was created");
    // Our own directory (created on demand) is fine.
    let ours = dir.path().join("ours/agent.sock");
    tessera_agent::workload_api::bind(&ours).await.unwrap();
    assert!(ours.exists());
}
