//! The destination map through the server: the `DestinationApi` on the admin socket stores each
//! destination (checked by the proxies' own code, refused when ambiguous, each change a
//! revision), and the agent `Sync` stream carries the map in the snapshot and pushes every
//! change. Runs on SQLite, and on PostgreSQL when `TESSERA_TEST_POSTGRES_URL` is set.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use tessera_proto::v1 as pb;
use tessera_proto::v1::destination_api_client::DestinationApiClient;
use tessera_server::ServerConfig;
use tokio_stream::StreamExt as _;

async fn next_msg(stream: &mut tonic::Streaming<pb::SyncResponse>) -> pb::sync_response::Msg {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("sync message within 10 s")
        .expect("stream open")
        .expect("no error")
        .msg
        .expect("message set")
}

async fn next_change(stream: &mut tonic::Streaming<pb::SyncResponse>) -> pb::change::Change {
    loop {
        if let pb::sync_response::Msg::Change(c) = next_msg(stream).await
            && let Some(ch) = c.change
            && matches!(
                ch,
                pb::change::Change::DestinationUpdated(_)
                    | pb::change::Change::DestinationDeleted(_)
            )
        {
            return ch;
        }
    }
}

fn apply(name: &str, json: &str, create_only: bool) -> pb::ApplyDestinationRequest {
    pb::ApplyDestinationRequest {
        destination: Some(pb::StoredDestination {
            name: name.into(),
            document_json: json.into(),
        }),
        create_only,
    }
}

#[tokio::test]
async fn destinations_are_managed_and_pushed_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    destinations_are_managed_and_pushed(support::config_with(dir.path(), String::new())).await;
}

#[tokio::test]
async fn destinations_are_managed_and_pushed_postgres() {
    support::on_postgres("destination_api", destinations_are_managed_and_pushed).await;
}

async fn destinations_are_managed_and_pushed(cfg: ServerConfig) {
    let server = tessera_server::start(cfg).await.unwrap();
    let ch = tessera_server::client::unix_channel(&server.admin_socket)
        .await
        .unwrap();
    let mut api = DestinationApiClient::new(ch);

    let db = r#"{"cidr":"198.18.0.7","ports":[5432],"spiffe_id":"spiffe://example.org/db","tunnel_port":15008}"#;
    let first = api
        .apply_destination(apply("db", db, true))
        .await
        .unwrap()
        .into_inner();
    assert!(first.revision > 0);
    // Stored in canonical form: the network spelled out, the default tunnel port left out.
    let canonical =
        r#"{"cidr":"198.18.0.7/32","ports":[5432],"spiffe_id":"spiffe://example.org/db"}"#;
    assert_eq!(first.destination.unwrap().document_json, canonical);

    // The snapshot carries the map.
    let mut sync = support::attest(&server)
        .await
        .client(&server)
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let pb::sync_response::Msg::Snapshot(snap) = next_msg(&mut sync).await else {
        panic!("snapshot first");
    };
    assert_eq!(
        snap.destinations,
        [pb::StoredDestination {
            name: "db".into(),
            document_json: canonical.into()
        }]
    );

    // A change is a new revision, pushed.
    let moved = r#"{"cidr":"198.18.0.8","ports":[5432],"spiffe_id":"spiffe://example.org/db"}"#;
    let second = api
        .apply_destination(apply("db", moved, false))
        .await
        .unwrap()
        .into_inner();
    assert!(second.revision > first.revision);
    let pb::change::Change::DestinationUpdated(d) = next_change(&mut sync).await else {
        panic!("destination update pushed");
    };
    assert_eq!(d.name, "db");
    assert!(d.document_json.contains("198.18.0.8/32"), "{d:?}");

    // Bad input names the field and changes nothing.
    for (name, json, code, says) in [
        (
            "db",
            r#"{"cidr":"198.18.0.8/40","spiffe_id":"spiffe://example.org/db"}"#,
            tonic::Code::InvalidArgument,
            "cidr",
        ),
        (
            "db",
            r#"{"cidr":"198.18.0.8","spiffe_id":"spiffe://example.org"}"#,
            tonic::Code::InvalidArgument,
            "spiffe_id",
        ),
        (
            "db",
            r#"{"cidr":"198.18.0.8","spiffe_id":"spiffe://example.org/db","port":1}"#,
            tonic::Code::InvalidArgument,
            "port",
        ),
        ("no spaces", canonical, tonic::Code::InvalidArgument, "name"),
        // Another name for db's address and port: which identity to expect would depend on
        // the order a proxy learns them.
        (
            "db-copy",
            r#"{"cidr":"198.18.0.8/32","ports":[5432,6432],"spiffe_id":"spiffe://example.org/x"}"#,
            tonic::Code::FailedPrecondition,
            "\"db\"",
        ),
        ("db", canonical, tonic::Code::AlreadyExists, "exists"),
    ] {
        let e = api
            .apply_destination(apply(name, json, name == "db" && json == canonical))
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{name} {json}: {e:?}");
        assert!(e.message().contains(says), "{e:?}");
    }
    // Another port of the same address, or a narrower network, is not ambiguous.
    api.apply_destination(apply(
        "db-admin",
        r#"{"cidr":"198.18.0.8","ports":[8443],"spiffe_id":"spiffe://example.org/db-admin"}"#,
        true,
    ))
    .await
    .unwrap();
    let list = api
        .list_destinations(pb::ListDestinationsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = list.destinations.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["db", "db-admin"]);
    let shown = api
        .get_destination(pb::DestinationName { name: "db".into() })
        .await
        .unwrap()
        .into_inner();
    assert!(
        shown
            .destination
            .unwrap()
            .document_json
            .contains("198.18.0.8/32")
    );

    api.delete_destination(pb::DestinationName { name: "db".into() })
        .await
        .unwrap();
    // db-admin's update, then db's deletion.
    assert!(matches!(
        next_change(&mut sync).await,
        pb::change::Change::DestinationUpdated(_)
    ));
    assert_eq!(
        next_change(&mut sync).await,
        pb::change::Change::DestinationDeleted("db".into())
    );
    assert_eq!(
        api.get_destination(pb::DestinationName { name: "db".into() })
            .await
            .unwrap_err()
            .code(),
        tonic::Code::NotFound
    );
    server.shutdown().await;
}
