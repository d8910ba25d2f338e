//! Sync benchmarks (a harness of its own: what is measured is a latency distribution across
//! processes' worth of work, not a tight loop):
//!
//! 1. `entry create` returning → the change arriving on an agent's open `Sync` stream
//!    (target p99 < 100 ms), with the time of a plain admin round trip (`GetBundle`) measured in
//!    the same run as the baseline;
//! 2. a snapshot for 10,000 entries: number of pages and the largest message (must stay far
//!    below gRPC's 4 MiB limit whatever the number of entries).
//!
//! Run: `cargo bench -p tessera-server --bench sync` (SQLite in a temp dir; set
//! `TESSERA_BENCH_POSTGRES_URL` to a fresh database to use PostgreSQL instead).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use prost::Message as _;
use tessera_proto::v1 as pb;
use tessera_server::ServerConfig;
use tokio_stream::StreamExt as _;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn report(name: &str, mut v: Vec<Duration>) {
    v.sort();
    println!(
        "{name:<44} n={:<5} p50={:>9.3?} p90={:>9.3?} p99={:>9.3?} max={:>9.3?}",
        v.len(),
        percentile(&v, 0.50),
        percentile(&v, 0.90),
        percentile(&v, 0.99),
        v[v.len() - 1]
    );
}

fn entry(spiffe_id: String, parent: &str) -> pb::CreateEntryRequest {
    pb::CreateEntryRequest {
        entry: Some(pb::Entry {
            spiffe_id,
            parent_id: parent.to_owned(),
            selectors: vec!["unix:uid:1000".into()],
            ..Default::default()
        }),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().join("data"),
        admin_socket: dir.path().join("admin/admin.sock"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        health_bind_address: "127.0.0.1:0".parse().unwrap(),
        datastore: tessera_server::config::DatastoreConfig {
            url: std::env::var("TESSERA_BENCH_POSTGRES_URL").unwrap_or_default(),
        },
        log_level: "warn".into(),
        ..ServerConfig::default()
    };
    let server = tessera_server::start(cfg).await.unwrap();
    let mut admin = tessera_server::client::admin(&server.admin_socket)
        .await
        .unwrap();
    let attested = support::attest(&server).await;
    let mut agent = attested.client(&server);
    let mut stream = agent
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let _snapshot = stream.next().await.unwrap().unwrap();

    // Baseline: an admin round trip that reads the datastore.
    let mut baseline = Vec::new();
    for _ in 0..300 {
        let t = Instant::now();
        admin.get_bundle(pb::GetBundleRequest {}).await.unwrap();
        baseline.push(t.elapsed());
    }

    let mut create = Vec::new();
    let mut propagation = Vec::new();
    for i in 0..300 {
        let t0 = Instant::now();
        admin
            .create_entry(entry(
                format!("spiffe://example.org/bench/{i}"),
                &attested.id,
            ))
            .await
            .unwrap();
        let t1 = Instant::now();
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), stream.next())
                .await
                .expect("change within 10 s")
                .unwrap()
                .unwrap();
            if matches!(msg.msg, Some(pb::sync_response::Msg::Change(_))) {
                break;
            }
        }
        create.push(t1 - t0);
        propagation.push(t1.elapsed());
    }
    println!(
        "datastore: {}",
        if std::env::var("TESSERA_BENCH_POSTGRES_URL").is_ok() {
            "postgres"
        } else {
            "sqlite"
        }
    );
    report("baseline: admin GetBundle round trip", baseline);
    report("entry create call", create);
    report("entry create returned -> change on stream", propagation);

    // Snapshot of 10,000 entries: pages and the largest message.
    for chunk in 0..97 {
        for i in 0..100 {
            admin
                .create_entry(entry(
                    format!("spiffe://example.org/bulk/{chunk}/{i}"),
                    &attested.id,
                ))
                .await
                .unwrap();
        }
    }
    let t = Instant::now();
    let mut fresh = agent
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let (mut pages, mut entries, mut largest) = (0usize, 0usize, 0usize);
    loop {
        let msg = fresh.next().await.unwrap().unwrap();
        largest = largest.max(msg.encoded_len());
        if let Some(pb::sync_response::Msg::Snapshot(page)) = msg.msg {
            pages += 1;
            entries += page.entries.len();
            if page.last {
                break;
            }
        }
    }
    println!(
        "snapshot: {entries} entries in {pages} pages, largest message {largest} bytes ({:.1} KiB), {:.1?} to receive",
        largest as f64 / 1024.0,
        t.elapsed()
    );
    server.shutdown().await;
}
