//! Datastore figures: `cargo bench -p tessera-store`.
//!
//! On SQLite (a temp dir) and, when `TESSERA_TEST_POSTGRES_URL` is set, on PostgreSQL (a fresh
//! schema, dropped after):
//! - creating 100,000 entries in batches of 1,000 (one transaction per batch), in entries/s;
//! - creating entries one transaction each, sequentially and from 8 tasks, in entries/s;
//! - listing one agent's entries (1,000 agents, each parent of 100 entries): latency;
//! - reading the whole revision feed in pages of 1,000, in events/s.
//!
//! A plain harness printing figures: these are throughput runs over a large fixture, not the
//! micro-measurements criterion is for.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)] // bench code

use std::sync::Arc;
use std::time::{Duration, Instant};

use tessera_spiffe::{Selector, SpiffeId};
use tessera_store::{Datastore, NewEntry};

const AGENTS: usize = 1_000;
const PER_AGENT: usize = 100;
const BATCH: usize = 1_000;
const SINGLE: usize = 1_000;
const LOOKUPS: usize = 1_000;

fn agent(n: usize) -> SpiffeId {
    SpiffeId::parse(&format!(
        "spiffe://example.org/tessera/agent/x509pop/node-{n:04}"
    ))
    .unwrap()
}

fn entry(agent_n: usize, i: usize, tag: &str) -> NewEntry {
    let id = SpiffeId::parse(&format!("spiffe://example.org/{tag}/ns-{agent_n}/svc-{i}")).unwrap();
    NewEntry::new(
        id,
        agent(agent_n),
        [
            Selector::parse(&format!("unix:uid:{}", 1000 + i)).unwrap(),
            Selector::parse("unix:gid:1000").unwrap(),
        ],
    )
}

fn rate(n: usize, d: Duration) -> String {
    format!("{:>9.0}/s", n as f64 / d.as_secs_f64())
}

async fn run(name: &str, s: Arc<dyn Datastore>) {
    println!("== {name}");

    // 100,000 entries: 1,000 agents x 100, in batches of 1,000.
    let all: Vec<NewEntry> = (0..AGENTS)
        .flat_map(|a| (0..PER_AGENT).map(move |i| entry(a, i, "bulk")))
        .collect();
    let t = Instant::now();
    for chunk in all.chunks(BATCH) {
        let out = s.create_entries(chunk.to_vec()).await.unwrap();
        assert!(out.iter().all(|(_, created)| *created));
    }
    let d = t.elapsed();
    println!(
        "create {} entries, batches of {BATCH}:     {} ({:.1} s)",
        all.len(),
        rate(all.len(), d),
        d.as_secs_f64()
    );

    // One transaction per entry (each commit durable), sequentially.
    let t = Instant::now();
    for i in 0..SINGLE {
        s.create_entry(entry(i % AGENTS, i, "single"))
            .await
            .unwrap();
    }
    let d = t.elapsed();
    println!(
        "create {SINGLE} entries, one per transaction:  {}",
        rate(SINGLE, d)
    );

    // The same from 8 concurrent tasks (writers serialize on the revision lock).
    let t = Instant::now();
    let tasks: Vec<_> = (0..8)
        .map(|w| {
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                for i in 0..SINGLE / 8 {
                    s.create_entry(entry(w, i, "concurrent")).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let d = t.elapsed();
    println!(
        "create {SINGLE} entries, 8 concurrent writers: {}",
        rate(SINGLE, d)
    );

    // An agent's entries among 1,000 agents (what authorizes its SVID requests and sync).
    let mut lat = Vec::with_capacity(LOOKUPS);
    for k in 0..LOOKUPS {
        let a = agent((k * 7919) % AGENTS);
        let t = Instant::now();
        let got = s.list_entries_by_parents(&[a]).await.unwrap();
        lat.push(t.elapsed());
        assert!(got.len() >= PER_AGENT);
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    println!(
        "list one agent's entries (~{PER_AGENT} of {}): p50 {:.2} ms, p99 {:.2} ms, mean {:.2} ms",
        all.len() + 2 * SINGLE,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        lat.iter().sum::<Duration>().as_secs_f64() * 1e3 / lat.len() as f64,
    );

    // The whole feed, as a reader catching up does it.
    let t = Instant::now();
    let mut last = 0;
    let mut n = 0;
    loop {
        let page = s.events_after(last, 1_000).await.unwrap();
        let Some(e) = page.last() else { break };
        last = e.revision;
        n += page.len();
    }
    let d = t.elapsed();
    println!(
        "read the feed ({n} events), pages of 1,000:   {}",
        rate(n, d)
    );
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let s = tessera_store::open_sqlite(dir.path().join("store.db"))
            .await
            .unwrap();
        run("sqlite (WAL, synchronous=FULL)", s).await;

        match std::env::var("TESSERA_TEST_POSTGRES_URL") {
            Ok(url) if !url.is_empty() => {
                use sqlx::{Connection, Executor};
                let schema = format!("bench_{}", std::process::id());
                let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
                admin
                    .execute(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .await
                    .unwrap();
                let sep = if url.contains('?') { '&' } else { '?' };
                let s = tessera_store::open_postgres(&format!(
                    "{url}{sep}options[search_path]={schema}"
                ))
                .await
                .unwrap();
                run("postgres", s).await;
                admin
                    .execute(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                    .await
                    .unwrap();
            }
            _ => println!("== postgres: skipped (TESSERA_TEST_POSTGRES_URL not set)"),
        }
    });
}
