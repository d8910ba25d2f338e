//! High availability on PostgreSQL, end to end: two servers of one trust domain on one database
//! (a throwaway cluster of this test's own, so it can stop and restart it), an agent that knows
//! both, and a workload (this process) on its Workload API.
//!
//! - each server has its own CA key and both are in the shared bundle;
//! - a join token is consumed once, whichever servers it is presented to at the same time;
//! - an entry created on server A reaches the agent synced with server B (LISTEN/NOTIFY);
//! - killing B moves the agent to A: the workload's X509-SVID stream is never reset and never
//!   without a valid SVID, and a new entry created on A reaches it;
//! - a PostgreSQL stop: the agent keeps serving, A stays live, says it is not ready and refuses
//!   writes with a clear error; after the restart writes and propagation resume, no restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

mod support;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_proto::v1 as pb;
use tessera_server::{RunningServer, ServerConfig};
use tessera_spiffe::{Bundle, BundleSet, TrustDomain};
use tessera_test_util::pg_cluster::Cluster;
use tokio_stream::StreamExt as _;

fn server_config(dir: &Path, name: &str, url: &str, td: &TrustDomain) -> ServerConfig {
    ServerConfig {
        trust_domain: td.clone(),
        datastore: tessera_server::config::DatastoreConfig { url: url.into() },
        data_dir: dir.join(name),
        admin_socket: dir.join(format!("{name}-admin/admin.sock")),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        health_bind_address: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    }
}

async fn admin(
    s: &RunningServer,
) -> tessera_proto::v1::admin_api_client::AdminApiClient<tonic::transport::Channel> {
    tessera_server::client::admin(&s.admin_socket)
        .await
        .unwrap()
}

async fn join_token(s: &RunningServer) -> String {
    admin(s)
        .await
        .generate_join_token(pb::GenerateJoinTokenRequest { ttl_secs: 60 })
        .await
        .unwrap()
        .into_inner()
        .token
}

fn entry(td: &TrustDomain, path: &str, parent: &str) -> pb::CreateEntryRequest {
    pb::CreateEntryRequest {
        entry: Some(pb::Entry {
            spiffe_id: format!("spiffe://{td}{path}"),
            parent_id: parent.into(),
            selectors: vec![format!("unix:uid:{}", support::my_uid())],
            // Short-lived, so the agent renews them (every ~5 s) while PostgreSQL is down.
            x509_ttl_secs: 10,
            ..Default::default()
        }),
    }
}

/// Attests with `token` at `server` (as a new agent would); true if the server accepted it.
async fn attest(
    addr: std::net::SocketAddr,
    bundle_json: String,
    td: TrustDomain,
    token: String,
) -> bool {
    let mut set = BundleSet::new();
    set.insert(Bundle::parse(td.clone(), bundle_json.as_bytes()).unwrap())
        .unwrap();
    let mut client = tessera_server::client::agent_api(
        addr,
        tessera_server::client::ServerTrust::Bundles(Arc::new(arc_swap::ArcSwap::from_pointee(
            set,
        ))),
        tessera_server::server_id(&td),
        None,
    )
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    tessera_server::client::attest_join_token(&mut client, &token, csr.der().to_vec())
        .await
        .is_ok()
}

/// The status code of `GET path` on a health endpoint.
async fn http_status(addr: std::net::SocketAddr, path: &str) -> u16 {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// What the workload saw on its one X509-SVID stream: for each context, when, its SPIFFE IDs,
/// whether every SVID was valid then, and the latest expiry among its SVIDs.
#[derive(Default)]
struct Seen {
    contexts: Vec<(Instant, Vec<String>, bool, u64)>,
    ended: Option<String>,
}

fn ids_of(ctx: &spiffe::X509Context) -> Vec<String> {
    let mut ids: Vec<String> = ctx
        .svids()
        .iter()
        .map(|s| s.spiffe_id().to_string())
        .collect();
    ids.sort();
    ids
}

/// Waits until the workload's stream delivered a context with `id`; returns when.
async fn wait_for_id(seen: &Mutex<Seen>, id: &str, within: Duration) -> Instant {
    let deadline = Instant::now() + within;
    loop {
        if let Some((at, _, _, _)) = seen
            .lock()
            .unwrap()
            .contexts
            .iter()
            .find(|(_, ids, _, _)| ids.iter().any(|i| i == id))
        {
            return *at;
        }
        assert!(
            Instant::now() < deadline,
            "{id} did not reach the workload within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_servers_on_one_postgres_survive_a_server_and_a_database_restart() {
    tessera_telemetry::init_logging("warn").unwrap();
    let Some(pg) = tokio::task::spawn_blocking(Cluster::start).await.unwrap() else {
        return;
    };
    let td = TrustDomain::new("ha.example").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let a = tessera_server::start(server_config(dir.path(), "a", &pg.url, &td))
        .await
        .unwrap();
    let b = tessera_server::start(server_config(dir.path(), "b", &pg.url, &td))
        .await
        .unwrap();

    // Each server its own CA, both published before either signs for agents: B started after
    // A, so B's bundle at start already has both.
    let shared = Bundle::parse(td.clone(), b.bundle_json.as_bytes()).unwrap();
    let own_a = Bundle::parse(td.clone(), a.bundle_json.as_bytes()).unwrap();
    assert_eq!(own_a.x509_authorities().len(), 1, "A started alone");
    assert_eq!(
        shared.x509_authorities().len(),
        2,
        "B's bundle has A's CA and its own"
    );
    assert!(
        shared
            .x509_authorities()
            .contains(&own_a.x509_authorities()[0])
    );

    // One join token, presented to both servers at once, five times each: one success.
    let token = join_token(&a).await;
    let mut tries = tokio::task::JoinSet::new();
    for i in 0..10 {
        let server = if i % 2 == 0 { &a } else { &b };
        tries.spawn(attest(
            server.agent_addr,
            server.bundle_json.clone(),
            td.clone(),
            token.clone(),
        ));
    }
    let mut accepted = 0;
    while let Some(ok) = tries.join_next().await {
        accepted += usize::from(ok.unwrap());
    }
    assert_eq!(
        accepted, 1,
        "a join token is consumed exactly once across servers"
    );

    // The agent: B first, A as the fallback; its join token from A.
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let bundle_path = agent_dir.join("bootstrap_bundle.json");
    std::fs::write(&bundle_path, &b.bundle_json).unwrap();
    let socket = dir.path().join("agent.sock");
    let agent = tessera_agent::start(tessera_agent::AgentConfig {
        trust_domain: td.clone(),
        server_address: b.agent_addr.to_string(),
        server_addresses: vec![a.agent_addr.to_string()],
        data_dir: agent_dir,
        socket_path: socket.clone(),
        trust_bundle_path: Some(bundle_path),
        join_token: Some(join_token(&a).await),
        max_hash_bytes: 0,
        ..tessera_agent::AgentConfig::default()
    })
    .await
    .unwrap();
    let parent = agent.spiffe_id.to_string();

    // An entry created on A reaches the agent synced with B.
    let created = Instant::now();
    admin(&a)
        .await
        .create_entry(entry(&td, "/web-1", &parent))
        .await
        .unwrap();
    let client = spiffe::WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap();
    let (mut stream, first) = support::x509_stream(&client).await;
    let web1 = format!("spiffe://{td}/web-1");
    assert_eq!(ids_of(&first), vec![web1.clone()]);
    eprintln!(
        "entry on A -> SVID at the workload via B: {:?}",
        created.elapsed()
    );

    // From here on, every context of the one stream is recorded, with whether its SVIDs were
    // all within their validity when it arrived.
    let seen = Arc::new(Mutex::new(Seen::default()));
    seen.lock()
        .unwrap()
        .contexts
        .push((Instant::now(), ids_of(&first), true, 0));
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                match stream.next().await {
                    Some(Ok(ctx)) => {
                        let now = support::now();
                        let expiries: Vec<u64> = ctx
                            .svids()
                            .iter()
                            .map(|s| support::not_after(s.cert_chain()[0].as_ref()))
                            .collect();
                        let valid = expiries.iter().all(|t| *t > now);
                        let latest = expiries.into_iter().max().unwrap_or(0);
                        seen.lock().unwrap().contexts.push((
                            Instant::now(),
                            ids_of(&ctx),
                            valid,
                            latest,
                        ));
                    }
                    Some(Err(e)) => {
                        seen.lock().unwrap().ended = Some(e.to_string());
                        return;
                    }
                    None => {
                        seen.lock().unwrap().ended = Some("stream ended".into());
                        return;
                    }
                }
            }
        })
    };

    // Kill B: the agent moves to A and resumes there; a new entry on A proves the stream.
    let killed = Instant::now();
    b.shutdown().await;
    admin(&a)
        .await
        .create_entry(entry(&td, "/web-2", &parent))
        .await
        .unwrap();
    let web2 = format!("spiffe://{td}/web-2");
    let at = wait_for_id(&seen, &web2, Duration::from_secs(10)).await;
    eprintln!(
        "B killed -> new entry on A at the workload: {:?}",
        at - killed
    );

    // The database goes away.
    let pg = Arc::new(pg);
    let stopped_at = Instant::now();
    tokio::task::spawn_blocking({
        let pg = pg.clone();
        move || pg.stop()
    })
    .await
    .unwrap();
    // The agent keeps serving: a fresh Workload API call is answered from its cache.
    let ctx = client.fetch_x509_context().await.unwrap();
    assert_eq!(ids_of(&ctx), vec![web1.clone(), web2.clone()]);
    // A stays live, says it is not ready, and refuses writes with a clear error.
    assert_eq!(http_status(a.health_addr, "/live").await, 200);
    assert_eq!(http_status(a.health_addr, "/ready").await, 503);
    let write_started = Instant::now();
    let refused = admin(&a)
        .await
        .create_entry(entry(&td, "/web-3", &parent))
        .await
        .expect_err("no writes without the database");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        write_started.elapsed() < Duration::from_secs(3),
        "refused at once, not after the pool's timeout: {:?}",
        write_started.elapsed()
    );
    eprintln!("write while PostgreSQL is down: {}", refused.message());

    // A keeps signing from memory: the agent renews the short-lived SVIDs (10 s, renewed at
    // about half) during the outage; wait for one.
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline
        && !seen
            .lock()
            .unwrap()
            .contexts
            .iter()
            .any(|(at, _, _, _)| *at > stopped_at)
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let renewed = seen
        .lock()
        .unwrap()
        .contexts
        .iter()
        .filter(|(at, _, _, _)| *at > stopped_at)
        .count();
    if renewed == 0 {
        for (at, ids, valid, latest) in &seen.lock().unwrap().contexts {
            eprintln!(
                "context at {:?} after the stop: {ids:?} valid={valid} latest expiry {latest} (now {})",
                at.checked_duration_since(stopped_at),
                support::now()
            );
        }
    }
    assert!(renewed > 0, "no SVID renewed while PostgreSQL was down");
    eprintln!("SVID renewals delivered while PostgreSQL was down: {renewed}");

    // Back again: writes and propagation resume without restarting anything.
    tokio::task::spawn_blocking({
        let pg = pg.clone();
        move || pg.start_again()
    })
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let restarted = Instant::now();
    loop {
        match admin(&a)
            .await
            .create_entry(entry(&td, "/web-3", &parent))
            .await
        {
            Ok(_) => break,
            Err(e) => {
                assert!(Instant::now() < deadline, "writes did not resume: {e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    let web3 = format!("spiffe://{td}/web-3");
    let at = wait_for_id(&seen, &web3, Duration::from_secs(15)).await;
    eprintln!(
        "PostgreSQL back -> new entry at the workload: {:?}",
        at - restarted
    );
    // Ready again (the follower takes the listener's news in its own time).
    let deadline = Instant::now() + Duration::from_secs(10);
    while http_status(a.health_addr, "/ready").await != 200 {
        assert!(Instant::now() < deadline, "/ready did not come back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Never a gap: the one stream never ended, and every context it delivered held web-1's
    // SVID, valid at the time.
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.ended, None, "the workload's stream was reset");
        for (_, ids, valid, _) in &seen.contexts {
            assert!(
                ids.contains(&web1),
                "a context without web-1's SVID: {ids:?}"
            );
            assert!(valid, "a context with an expired SVID");
        }
    }
    recorder.abort();
    agent.shutdown().await;
    a.shutdown().await;
}
