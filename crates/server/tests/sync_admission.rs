//! A sync stream re-checks its agent after every snapshot (`AgentApi::still_admitted`).
//!
//! The sync loop reads the event feed in batches. A node-alias change in a batch makes it send a
//! fresh snapshot and skip to the snapshot's revision, which may be past later events of the
//! same batch: a ban or an eviction among them is then never looked at as an event. Without the
//! re-read of the agent record after the snapshot, a banned agent keeps its stream, and every
//! update, for as long as it stays connected.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

mod support;

use std::time::Duration;

use tessera_proto::v1 as pb;
use tessera_proto::v1::agent_api_client::AgentApiClient;
use tessera_server::{RunningServer, ServerConfig};
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

/// The agent's HTTP/2 receive window for each stream: small, so that a Sync stream the test does
/// not read stops the server's sync loop (hyper stops pulling the response body, tonic's channel
/// of 16 fills, the loop waits in `tx.send`). With the default window (megabytes) the loop would
/// never wait, and would see each event in a batch of its own. Not smaller: every window's worth
/// costs a round trip of WINDOW_UPDATE to read back, and the test reads ~220 KiB.
const STREAM_WINDOW: u32 = 16 * 1024;

/// Entries created while the loop is held, each one change message of about 1.1 KiB (a 1 KiB
/// hint). At most ~90 of them are taken before the loop waits (one window, two chunks of up to
/// 32 KiB that tonic's encoder hands hyper, 16 in the channel, one in `tx.send`); the rest stay
/// in the feed, so the loop is certainly waiting when the alias and the ban commit behind them.
const HELD_ENTRIES: usize = 200;

/// An agent API client presenting `agent`'s SVID, whose streams have a receive window of
/// [`STREAM_WINDOW`] bytes (`client::agent_api` with that one setting changed).
fn small_window_agent(server: &RunningServer, agent: &support::Agent) -> AgentApiClient<Channel> {
    tessera_server::client::agent_api_on(
        // The connection window cannot be made smaller than HTTP/2's initial 64 KiB, and need
        // not be: the stream's own window is what holds the server back.
        tessera_server::client::endpoint().initial_stream_window_size(STREAM_WINDOW),
        server.agent_addr,
        tessera_server::client::ServerTrust::Bundles(agent.bundles.clone()),
        support::server_id(),
        Some(agent.resolver()),
    )
    .unwrap()
}

fn entry(spiffe_id: &str, parent: &str, selector: &str, hint: String) -> pb::CreateEntryRequest {
    pb::CreateEntryRequest {
        entry: Some(pb::Entry {
            spiffe_id: spiffe_id.into(),
            parent_id: parent.into(),
            selectors: vec![selector.into()],
            hint,
            ..Default::default()
        }),
    }
}

#[tokio::test]
async fn a_ban_behind_a_node_alias_change_in_one_batch_still_closes_the_sync_stream() {
    let dir = tempfile::tempdir().unwrap();
    let server = tessera_server::start(ServerConfig {
        datastore: tessera_server::config::DatastoreConfig { url: String::new() },
        data_dir: dir.path().join("data"),
        admin_socket: dir.path().join("admin").join("admin.sock"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        health_bind_address: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    })
    .await
    .unwrap();
    let mut admin = tessera_server::client::admin(&server.admin_socket)
        .await
        .unwrap();

    // An agent attested with a join token.
    let attested = support::attest(&server).await;
    let agent_id = attested.id.clone();

    // Its Sync stream, opened and then not read: the server's loop stalls once the window and
    // the buffers behind it are full.
    let mut agent = small_window_agent(&server, &attested);
    let mut sync = agent
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let hint = "h".repeat(1024);
    for i in 0..HELD_ENTRIES {
        admin
            .create_entry(entry(
                &format!("spiffe://example.org/held/{i}"),
                &agent_id,
                "unix:uid:1000",
                hint.clone(),
            ))
            .await
            .unwrap();
    }
    // Behind them in the feed: a node alias matching the agent, then its ban. The loop will
    // read both in one batch once it moves again.
    let token_sel = format!("agent:join_token:{}", agent_id.rsplit('/').next().unwrap());
    let alias = admin
        .create_entry(entry(
            "spiffe://example.org/nodes/held",
            support::server_id().as_str(),
            &token_sel,
            String::new(),
        ))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    let banned = admin
        .ban_agent(pb::GetAgentRequest {
            spiffe_id: agent_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(banned.banned);
    assert!(alias.created_revision < banned.updated_revision);

    // Now read: every held change, the snapshot the alias caused, and then the stream must end
    // with the ban.
    let mut changes = 0;
    let mut snapshot_revisions = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match sync.next().await {
                Some(Ok(m)) => match m.msg.expect("message set") {
                    pb::sync_response::Msg::Change(_) => changes += 1,
                    pb::sync_response::Msg::Snapshot(s) => snapshot_revisions.push(s.revision),
                },
                Some(Err(status)) => return Some(status),
                None => return None,
            }
        }
    })
    .await;
    // The alias's snapshot was read at a revision that includes the ban: the ban was never an
    // event of the loop, so only the re-check after the snapshot can have closed the stream. (If
    // this fails, the loop was not held and the test proves nothing.)
    let last_snapshot = *snapshot_revisions.last().expect("a snapshot");
    assert!(
        last_snapshot >= banned.updated_revision,
        "the alias's snapshot (revision {last_snapshot}) should include the ban (revision {}); \
         snapshots: {snapshot_revisions:?}, changes: {changes}",
        banned.updated_revision
    );
    let status = end
        .unwrap_or_else(|_| {
            panic!(
                "the banned agent's sync stream was still open 10 s after the ban \
                 (snapshots at {snapshot_revisions:?}, {changes} changes)"
            )
        })
        .expect("the stream ends with a status, not a clean end");
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(
        tokio::time::timeout(Duration::from_secs(1), sync.next())
            .await
            .expect("nothing after the status")
            .is_none(),
        "the stream ended"
    );
    assert_eq!(status.message(), format!("agent {agent_id} was banned"));
    assert_eq!(changes, HELD_ENTRIES, "every held change arrives first");
    assert_eq!(snapshot_revisions.len(), 2, "{snapshot_revisions:?}");
    server.shutdown().await;
}
