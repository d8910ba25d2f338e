//! Authorization policies through the server: the `PolicyApi` on the admin socket stores them
//! (validated, each change a revision), and the agent `Sync` stream carries them in the snapshot
//! and pushes every change. Runs on SQLite, and on PostgreSQL when `TESSERA_TEST_POSTGRES_URL`
//! is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::time::Duration;

use tessera_proto::v1 as pb;
use tessera_proto::v1::policy_api_client::PolicyApiClient;
use tessera_server::{RunningServer, ServerConfig};
use tokio_stream::StreamExt as _;

fn config_with(dir: &Path, datastore_url: String) -> ServerConfig {
    let mut cfg = support::config_with(dir, datastore_url);
    cfg.policy.default = tessera_policy::DefaultAction::Allow;
    cfg
}

async fn sync_stream(server: &RunningServer) -> tonic::Streaming<pb::SyncResponse> {
    support::attest(server)
        .await
        .client(server)
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner()
}

async fn next_change(stream: &mut tonic::Streaming<pb::SyncResponse>) -> pb::change::Change {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .expect("sync message within 10 s")
            .expect("stream open")
            .expect("no error")
            .msg
            .expect("message set");
        if let pb::sync_response::Msg::Change(c) = msg
            && let Some(ch) = c.change
            && matches!(
                ch,
                pb::change::Change::PolicyUpdated(_) | pb::change::Change::PolicyDeleted(_)
            )
        {
            return ch;
        }
    }
}

fn policy(name: &str, json: &str) -> pb::ApplyPolicyRequest {
    pb::ApplyPolicyRequest {
        policy: Some(pb::StoredPolicy {
            name: name.into(),
            document_json: json.into(),
        }),
        create_only: false,
    }
}

#[tokio::test]
async fn policies_are_managed_and_pushed_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    policies_are_managed_and_pushed(config_with(dir.path(), String::new())).await;
}

#[tokio::test]
async fn policies_are_managed_and_pushed_postgres() {
    support::on_postgres("policy_api", |mut cfg| {
        cfg.policy.default = tessera_policy::DefaultAction::Allow;
        policies_are_managed_and_pushed(cfg)
    })
    .await;
}

async fn policies_are_managed_and_pushed(cfg: ServerConfig) {
    let server = tessera_server::start(cfg).await.unwrap();
    let ch = tessera_server::client::unix_channel(&server.admin_socket)
        .await
        .unwrap();
    let mut api = PolicyApiClient::new(ch);

    let first = api
        .apply_policy(policy(
            "web",
            r#"{"action":"ALLOW","rules":[{"from":{"principals":["spiffe://example.org/a"]}}]}"#,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(first.revision > 0);

    // The snapshot carries the policy and the configured default.
    let mut sync = sync_stream(&server).await;
    let msg = tokio::time::timeout(Duration::from_secs(10), sync.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(pb::sync_response::Msg::Snapshot(snap)) = msg.msg else {
        panic!("snapshot first");
    };
    assert_eq!(snap.policy_default, "allow");
    assert_eq!(snap.policies.len(), 1);
    assert_eq!(snap.policies[0].name, "web");

    // A change is a new revision, pushed.
    let second = api
        .apply_policy(policy("web", r#"{"action":"DENY"}"#))
        .await
        .unwrap()
        .into_inner();
    assert!(second.revision > first.revision);
    let pb::change::Change::PolicyUpdated(p) = next_change(&mut sync).await else {
        panic!("policy update pushed");
    };
    assert_eq!(
        (p.name.as_str(), p.document_json.as_str()),
        ("web", r#"{"action":"DENY","rules":[]}"#)
    );

    // Bad input names the policy and the field and changes nothing.
    let bad = api
        .apply_policy(policy(
            "web",
            r#"{"action":"ALLOW","rules":[{"to":{"methods":["get"]}}]}"#,
        ))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert!(bad.message().contains("rules[0].to.methods[0]"), "{bad:?}");
    let bad = api
        .apply_policy(policy("no spaces", r#"{"action":"DENY"}"#))
        .await
        .unwrap_err();
    assert!(bad.message().starts_with("name:"), "{bad:?}");
    let mut dup = policy("web", r#"{"action":"DENY"}"#);
    dup.create_only = true;
    assert_eq!(
        api.apply_policy(dup).await.unwrap_err().code(),
        tonic::Code::AlreadyExists
    );
    let shown = api
        .get_policy(pb::PolicyName { name: "web".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        shown.policy.unwrap().document_json,
        r#"{"action":"DENY","rules":[]}"#
    );

    let list = api
        .list_policies(pb::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (list.policies.len(), list.default_action.as_str()),
        (1, "allow")
    );

    api.delete_policy(pb::PolicyName { name: "web".into() })
        .await
        .unwrap();
    assert_eq!(
        next_change(&mut sync).await,
        pb::change::Change::PolicyDeleted("web".into())
    );
    assert_eq!(
        api.get_policy(pb::PolicyName { name: "web".into() })
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    server.shutdown().await;
}
