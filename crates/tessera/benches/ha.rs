//! Load generator for several servers on one PostgreSQL (issue 8): N simulated agents, each
//! with M entries, against real servers over loopback with real mTLS. A simulated agent is what
//! the agent is to the server: an attested identity with its own SVID, one Sync stream, and
//! SignX509Svids calls. Runs a PostgreSQL cluster of its own (test-util's `pg_cluster`: root or
//! a user with PostgreSQL installed).
//!
//!   cargo bench -p tessera --bench ha                      # defaults: scaled for a small VM
//!   HA_SERVERS=3 HA_AGENTS=1000 HA_ENTRIES=100000 cargo bench -p tessera --bench ha
//!
//! Prints: initial sync time, propagation latency p50/p99 (entry created on one server → change
//! on the stream of an agent synced with another), sign throughput, process RSS (servers and
//! simulated agents share this process), statements per second at the database while idle, and
//! failover time (server killed → its agents' streams open on another server).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed fixture should panic

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tessera_proto::v1 as pb;
use tessera_server::{RunningServer, ServerConfig};
use tessera_spiffe::{Bundle, BundleSet, SpiffeId, TrustDomain};
use tessera_test_util::pg_cluster::Cluster;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn trust(td: &TrustDomain, bundle_json: &str) -> tessera_server::client::ServerTrust {
    let mut set = BundleSet::new();
    set.insert(Bundle::parse(td.clone(), bundle_json.as_bytes()).unwrap())
        .unwrap();
    tessera_server::client::ServerTrust::Bundles(Arc::new(arc_swap::ArcSwap::from_pointee(set)))
}

struct SimAgent {
    id: SpiffeId,
    resolver: Arc<tessera_tls::SvidResolver>,
}

async fn attest(server: &RunningServer, td: &TrustDomain, bundle: &str) -> SimAgent {
    let token = tessera_server::client::admin(&server.admin_socket)
        .await
        .unwrap()
        .generate_join_token(pb::GenerateJoinTokenRequest { ttl_secs: 600 })
        .await
        .unwrap()
        .into_inner()
        .token;
    let mut client = tessera_server::client::agent_api(
        server.agent_addr,
        trust(td, bundle),
        tessera_server::server_id(td),
        None,
    )
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let res = tessera_server::client::attest_join_token(&mut client, &token, csr.der().to_vec())
        .await
        .unwrap();
    let chain = res
        .svid_chain
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    let ck = tessera_tls::certified_key(chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .unwrap();
    SimAgent {
        id: SpiffeId::parse(&res.spiffe_id).unwrap(),
        resolver: tessera_tls::SvidResolver::new(ck),
    }
}

enum Report {
    /// Agent i has its whole snapshot.
    Synced(usize),
    /// Agent i got a change for entry `spiffe_id`.
    Change(usize, String, Instant),
    /// Agent i opened a stream (again) after losing one.
    Resumed(usize, Instant),
}

/// One simulated agent's sync loop: follows the stream, moves to the next server on loss.
fn run_agent(
    i: usize,
    agent: Arc<SimAgent>,
    servers: Vec<std::net::SocketAddr>,
    start: usize,
    td: TrustDomain,
    bundle: String,
    tx: mpsc::UnboundedSender<Report>,
) {
    tokio::spawn(async move {
        let mut revision = 0;
        let mut at = start;
        let mut lost = false;
        loop {
            let mut client = tessera_server::client::agent_api(
                servers[at % servers.len()],
                trust(&td, &bundle),
                tessera_server::server_id(&td),
                Some(agent.resolver.clone()),
            )
            .unwrap();
            let Ok(resp) = client
                .sync(pb::SyncRequest {
                    after_revision: revision,
                })
                .await
            else {
                at += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            if lost {
                let _ = tx.send(Report::Resumed(i, Instant::now()));
            }
            let mut stream = resp.into_inner();
            while let Some(Ok(msg)) = stream.next().await {
                match msg.msg {
                    Some(pb::sync_response::Msg::Snapshot(page)) if page.last => {
                        revision = page.revision;
                        let _ = tx.send(Report::Synced(i));
                    }
                    Some(pb::sync_response::Msg::Change(c)) => {
                        revision = revision.max(c.revision);
                        if let Some(pb::change::Change::EntryUpserted(e)) = c.change {
                            let _ = tx.send(Report::Change(i, e.spiffe_id, Instant::now()));
                        }
                    }
                    Some(pb::sync_response::Msg::Snapshot(_)) | None => {}
                }
            }
            lost = true;
            at += 1;
        }
    });
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench());
}

async fn bench() {
    let n_servers = env("HA_SERVERS", 3).max(2);
    let n_agents = env("HA_AGENTS", 100).max(n_servers);
    let n_entries = env("HA_ENTRIES", 10_000).max(n_agents);
    let samples = env("HA_SAMPLES", 200);
    println!(
        "ha bench: {n_servers} servers, {n_agents} simulated agents, {n_entries} entries, {samples} propagation samples"
    );
    let Some(pg) = tokio::task::spawn_blocking(|| Cluster::start_with(true))
        .await
        .unwrap()
    else {
        println!("skipped: no PostgreSQL to start");
        return;
    };
    let td = TrustDomain::new("bench.example").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut servers = Vec::new();
    for s in 0..n_servers {
        let cfg = ServerConfig {
            trust_domain: td.clone(),
            datastore: tessera_server::config::DatastoreConfig {
                url: pg.url.clone(),
            },
            data_dir: dir.path().join(format!("s{s}")),
            admin_socket: dir.path().join(format!("s{s}-admin/admin.sock")),
            bind_address: "127.0.0.1:0".parse().unwrap(),
            health_bind_address: "127.0.0.1:0".parse().unwrap(),
            ..ServerConfig::default()
        };
        servers.push(tessera_server::start(cfg).await.unwrap());
    }
    // The last one started has every server's CA in its bundle.
    let bundle = servers.last().unwrap().bundle_json.clone();
    let addrs: Vec<_> = servers.iter().map(|s| s.agent_addr).collect();

    // Agents attest round-robin; entries are seeded straight into the store in batches.
    let mut agents = Vec::new();
    for i in 0..n_agents {
        agents.push(Arc::new(
            attest(&servers[i % n_servers], &td, &bundle).await,
        ));
    }
    let store = tessera_store::open(&pg.url).await.unwrap();
    let seed_started = Instant::now();
    let uid = tessera_spiffe::Selector::new("unix", "uid:1000").unwrap();
    let mut batch = Vec::new();
    for e in 0..n_entries {
        let parent = agents[e % n_agents].id.clone();
        batch.push(tessera_store::NewEntry::new(
            td.id_with_path(&format!("/w/{e}")).unwrap(),
            parent,
            [uid.clone()],
        ));
        if batch.len() == 1000 || e + 1 == n_entries {
            store
                .create_entries(std::mem::take(&mut batch))
                .await
                .unwrap();
        }
    }
    println!(
        "seeded {n_entries} entries in {:.1} s",
        seed_started.elapsed().as_secs_f64()
    );
    // Let every server's follower take the seeded entries into memory (one reload each).
    let settle = (n_entries / 10_000).max(2) as u64;
    tokio::time::sleep(Duration::from_secs(settle)).await;

    // Initial sync: every agent's snapshot.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    for (i, a) in agents.iter().enumerate() {
        run_agent(
            i,
            a.clone(),
            addrs.clone(),
            i % n_servers,
            td.clone(),
            bundle.clone(),
            tx.clone(),
        );
    }
    let mut synced = BTreeSet::new();
    while synced.len() < n_agents {
        if let Some(Report::Synced(i)) = rx.recv().await {
            synced.insert(i);
        }
    }
    println!(
        "initial sync of {n_agents} agents ({} entries each): {:.2} s",
        n_entries / n_agents,
        started.elapsed().as_secs_f64()
    );

    // Propagation: create on server (k+1) an entry for an agent synced with server k.
    let mut admins = Vec::new();
    for s in &servers {
        admins.push(
            tessera_server::client::admin(&s.admin_socket)
                .await
                .unwrap(),
        );
    }
    let mut latencies = Vec::new();
    for k in 0..samples {
        let agent = (k * 7) % n_agents;
        let writer = (agent % n_servers + 1) % n_servers;
        let id = format!("spiffe://{td}/p/{k}");
        let t0 = Instant::now();
        admins[writer]
            .create_entry(pb::CreateEntryRequest {
                entry: Some(pb::Entry {
                    spiffe_id: id.clone(),
                    parent_id: agents[agent].id.to_string(),
                    selectors: vec!["unix:uid:1000".into()],
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                Ok(Some(Report::Change(i, got, at))) if i == agent && got == id => {
                    latencies.push(at - t0);
                    break;
                }
                Ok(Some(_)) => {}
                _ => panic!("entry {id} did not reach agent {agent} within 10 s"),
            }
        }
    }
    latencies.sort();
    println!(
        "propagation (create on one server -> change at an agent on another), {} samples: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        latencies.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );

    // Sign throughput: agent 0 asks its server for 100 SVIDs per call, 4 callers, 5 s.
    let entry_ids: Vec<String> = store
        .list_entries_by_parents(&[agents[0].id.clone()])
        .await
        .unwrap()
        .into_iter()
        .take(100)
        .map(|e| e.id)
        .collect();
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut callers = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut client = tessera_server::client::agent_api(
            addrs[0],
            trust(&td, &bundle),
            tessera_server::server_id(&td),
            Some(agents[0].resolver.clone()),
        )
        .unwrap();
        let requests: Vec<pb::SvidRequest> = entry_ids
            .iter()
            .map(|id| pb::SvidRequest {
                entry_id: id.clone(),
                csr: csr.clone(),
            })
            .collect();
        callers.spawn(async move {
            let mut n = 0usize;
            while Instant::now() < deadline {
                let r = client
                    .sign_x509_svids(pb::SignX509SvidsRequest {
                        requests: requests.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                n += r.results.iter().filter(|r| r.error.is_empty()).count();
            }
            n
        });
    }
    let mut signed = 0;
    while let Some(n) = callers.join_next().await {
        signed += n.unwrap();
    }
    println!(
        "sign throughput (one server, 4 callers x 100 per call): {:.0} SVIDs/s",
        signed as f64 / 5.0
    );
    println!(
        "process RSS ({n_servers} servers + {n_agents} simulated agents + load generator): {:.0} MiB",
        rss_mib()
    );

    // Idle: every statement the database received over 10 s with nothing happening, from its
    // statement log (the cluster logs them all), between two markers of our own.
    let marker = |tag: &'static str| {
        let url = pg.url.clone();
        async move {
            let mut c = <sqlx::PgConnection as sqlx::Connection>::connect(&url)
                .await
                .unwrap();
            let q = format!("SELECT 'ha-bench-{tag}'");
            sqlx::raw_sql(sqlx::AssertSqlSafe(q))
                .execute(&mut c)
                .await
                .unwrap();
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    marker("idle-start").await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    marker("idle-end").await;
    let log = pg.log();
    let window: Vec<&str> = log
        .lines()
        .skip_while(|l| !l.contains("ha-bench-idle-start"))
        .skip(1)
        .take_while(|l| !l.contains("ha-bench-idle-end"))
        .filter(|l| l.contains("statement:") || l.contains("execute "))
        .collect();
    println!(
        "statements at the database while idle: {} in 10 s ({:.1}/s)",
        window.len(),
        window.len() as f64 / 10.0
    );
    for l in window.iter().take(10) {
        println!("  {l}");
    }

    // Failover: kill server 0; its agents open streams on the next one.
    let on_first: BTreeSet<usize> = (0..n_agents).filter(|i| i % n_servers == 0).collect();
    while rx.try_recv().is_ok() {}
    let first = servers.remove(0);
    let killed = Instant::now();
    first.shutdown().await;
    let mut resumed = Vec::new();
    while resumed.len() < on_first.len() {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(Report::Resumed(i, at))) if on_first.contains(&i) => resumed.push(at - killed),
            Ok(Some(_)) => {}
            _ => panic!("agents did not resume within 30 s"),
        }
    }
    resumed.sort();
    println!(
        "failover ({} agents of the killed server): all resumed on another within {:.0} ms (p50 {:.0} ms)",
        resumed.len(),
        resumed.last().unwrap().as_secs_f64() * 1e3,
        percentile(&resumed, 0.5).as_secs_f64() * 1e3
    );
    for s in servers {
        s.shutdown().await;
    }
}
