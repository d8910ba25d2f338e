//! Two servers of one trust domain on one PostgreSQL (the test database `.ci/postgres.sh`
//! starts, a schema of this test's own): an authority tainted through server A reaches an agent
//! synced with server B, and both servers' CAs are in the bundle B's agents get.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

mod support;

use std::path::Path;
use std::time::Duration;

use tessera_proto::v1 as pb;
use tessera_proto::v1::authority_api_client::AuthorityApiClient;
use tessera_server::{RunningServer, ServerConfig};
use tessera_spiffe::{Bundle, TrustDomain};
use tokio_stream::StreamExt as _;

fn config(dir: &Path, name: &str, url: &str) -> ServerConfig {
    ServerConfig {
        datastore: tessera_server::config::DatastoreConfig { url: url.into() },
        data_dir: dir.join(name),
        admin_socket: dir.join(format!("{name}-admin/admin.sock")),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        health_bind_address: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    }
}

/// Attests at `server` with a join token from it and opens a Sync stream there.
async fn agent_stream(server: &RunningServer) -> tonic::Streaming<pb::SyncResponse> {
    support::attest(server)
        .await
        .client(server)
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taint_through_one_server_reaches_the_agents_of_another() {
    let Some(schema) = tessera_test_util::pg::fresh_schema("ha_taint").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let a = tessera_server::start(config(dir.path(), "a", &schema.url))
        .await
        .unwrap();
    let b = tessera_server::start(config(dir.path(), "b", &schema.url))
        .await
        .unwrap();
    let mut sync = agent_stream(&b).await;
    let first = tokio::time::timeout(Duration::from_secs(10), sync.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(pb::sync_response::Msg::Snapshot(snap)) = first.msg else {
        panic!("snapshot first");
    };
    let own = &snap.bundles[0];
    let bundle = Bundle::parse(
        TrustDomain::new("example.org").unwrap(),
        &own.spiffe_bundle_json,
    )
    .unwrap();
    assert_eq!(bundle.x509_authorities().len(), 2, "A's CA and B's");

    // Rotate A's X.509 CA by hand and taint the old one, all through A.
    let mut authority = AuthorityApiClient::new(
        tessera_server::client::unix_channel(&a.admin_socket)
            .await
            .unwrap(),
    );
    let x509 = |id: &str| pb::AuthorityRequest {
        kind: pb::AuthorityKind::X509.into(),
        authority_id: id.into(),
    };
    let state = authority
        .get_authority_state(x509(""))
        .await
        .unwrap()
        .into_inner();
    let old = state
        .authorities
        .iter()
        .find(|x| x.status == "active")
        .unwrap()
        .authority_id
        .clone();
    authority.prepare_authority(x509("")).await.unwrap();
    authority.activate_authority(x509("")).await.unwrap();
    authority.taint_authority(x509(&old)).await.unwrap();

    // The agent synced with B hears of it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, sync.next())
            .await
            .expect("the taint reaches B's agent within 10 s")
            .unwrap()
            .unwrap();
        if let Some(pb::sync_response::Msg::Change(pb::Change {
            change: Some(pb::change::Change::AuthoritiesTainted(t)),
            ..
        })) = msg.msg
            && t.x509_authority_ids.contains(&old)
        {
            break;
        }
    }
    a.shutdown().await;
    b.shutdown().await;
    schema.drop().await;
}
