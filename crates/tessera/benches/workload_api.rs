//! Workload API benchmarks against a real `tessera dev` process (server + agent), measured from a
//! client process over the Unix socket:
//!
//! 1. FetchX509SVID time to first message for a cached identity (target p99 < 1 ms), with a plain
//!    FetchJWTBundles first message on the same connection as the baseline;
//! 2. `entry create` called → the new SVID arrives on an already open FetchX509SVID stream
//!    (target p99 < 100 ms);
//! 3. N concurrent FetchX509SVID streams (default 10,000; `TESSERA_BENCH_STREAMS`): the agent
//!    process's RSS with all of them open (target < 200 MB), and the time from an entry update
//!    until every stream has received the rotated SVID (target < 1 s).
//!
//! Run: `cargo bench -p tessera --bench workload_api`
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tessera_proto::workload as wl;
use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

type Client = SpiffeWorkloadApiClient<
    tonic::service::interceptor::InterceptedService<
        Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

fn header(mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    r.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(r)
}

async fn client(socket: &Path) -> Client {
    let ch = tessera_server::client::unix_channel(socket).await.unwrap();
    SpiffeWorkloadApiClient::with_interceptor(ch, header as fn(_) -> _)
}

fn report(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let p = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    println!(
        "{name:<52} n={:<5} p50={:>9.3?} p90={:>9.3?} p99={:>9.3?} max={:>9.3?}",
        v.len(),
        p(0.5),
        p(0.9),
        p(0.99),
        v[v.len() - 1]
    );
}

struct Dev(Child);
impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tessera(admin: &Path, args: &[&str]) -> std::process::Output {
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("TESSERA_ADMIN_SOCKET", admin)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").unwrap().uid()
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    let admin: PathBuf = dir.path().join("admin.sock");
    let socket: PathBuf = dir.path().join("agent.sock");
    // TESSERA_BENCH_DEV_WRAPPER (e.g. "heaptrack -o /tmp/dev") runs the agent under a profiler.
    let mut cmd = match std::env::var("TESSERA_BENCH_DEV_WRAPPER") {
        Ok(w) if !w.is_empty() => {
            let mut parts = w.split_whitespace();
            let mut c = Command::new(parts.next().unwrap());
            c.args(parts).arg(env!("CARGO_BIN_EXE_tessera"));
            c
        }
        _ => Command::new(env!("CARGO_BIN_EXE_tessera")),
    };
    let child = cmd
        .args(["dev", "--log-level", "warn"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--admin-socket")
        .arg(&admin)
        .arg("--workload-socket")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let dev = Dev(child);
    while !socket.exists() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let sel = format!("unix:uid:{}", uid());
    tessera(
        &admin,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/bench",
            "--selector",
            &sel,
        ],
    );
    let mut c = client(&socket).await;
    // Wait for the identity to be cached.
    loop {
        if let Ok(r) = c.fetch_x509svid(wl::X509svidRequest {}).await
            && let Some(Ok(_)) = r.into_inner().next().await
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // 1. First-message latency.
    let mut baseline = Vec::new();
    let mut first = Vec::new();
    for _ in 0..2000 {
        let t = Instant::now();
        let mut s = c
            .fetch_jwt_bundles(wl::JwtBundlesRequest {})
            .await
            .unwrap()
            .into_inner();
        s.next().await.unwrap().unwrap();
        baseline.push(t.elapsed());
        let t = Instant::now();
        let mut s = c
            .fetch_x509svid(wl::X509svidRequest {})
            .await
            .unwrap()
            .into_inner();
        s.next().await.unwrap().unwrap();
        first.push(t.elapsed());
    }
    report("baseline: FetchJWTBundles first message", baseline);
    report("FetchX509SVID first message (cached identity)", first);

    // 2. entry create -> SVID on an open stream.
    let mut stream = c
        .fetch_x509svid(wl::X509svidRequest {})
        .await
        .unwrap()
        .into_inner();
    stream.next().await.unwrap().unwrap();
    let mut prop = Vec::new();
    for i in 0..100 {
        let id = format!("spiffe://example.org/bench/new-{i}");
        let t = Instant::now();
        tessera(
            &admin,
            &["entry", "create", "--spiffe-id", &id, "--selector", &sel],
        );
        loop {
            let m = stream.next().await.unwrap().unwrap();
            if m.svids.iter().any(|s| s.spiffe_id == id) {
                break;
            }
        }
        prop.push(t.elapsed());
    }
    report("entry create (CLI process) -> SVID on open stream", prop);
    // Back to one identity per caller, as a real workload has, before the many-streams part.
    let list: serde_json::Value =
        serde_json::from_slice(&tessera(&admin, &["entry", "list", "--output", "json"]).stdout)
            .unwrap();
    for e in list.as_array().unwrap() {
        if e["spiffe_id"]
            .as_str()
            .unwrap()
            .starts_with("spiffe://example.org/bench/new-")
        {
            tessera(
                &admin,
                &["entry", "delete", "--id", e["id"].as_str().unwrap()],
            );
        }
    }
    drop(stream);

    // 3. Many concurrent streams: RSS and rotation fan-out.
    let n: usize = std::env::var("TESSERA_BENCH_STREAMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let per_conn = 100;
    let rss_before = rss_kib(dev.0.id());
    let received = Arc::new(AtomicUsize::new(0));
    let opened = Arc::new(AtomicUsize::new(0));
    let (go_tx, _) = tokio::sync::broadcast::channel::<()>(1);
    let mut tasks = Vec::new();
    for _ in 0..n.div_ceil(per_conn) {
        let c = client(&socket).await;
        for _ in 0..per_conn {
            let mut c = c.clone();
            let received = received.clone();
            let opened = opened.clone();
            let mut go = go_tx.subscribe();
            tasks.push(tokio::spawn(async move {
                let mut s = c
                    .fetch_x509svid(wl::X509svidRequest {})
                    .await
                    .unwrap()
                    .into_inner();
                s.next().await.unwrap().unwrap();
                opened.fetch_add(1, Ordering::SeqCst);
                let _ = go.recv().await;
                s.next().await.unwrap().unwrap();
                received.fetch_add(1, Ordering::SeqCst);
            }));
        }
    }
    while opened.load(Ordering::SeqCst) < tasks.len() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss_open = rss_kib(dev.0.id());
    if std::env::var_os("TESSERA_BENCH_DEBUG").is_some() {
        let st = std::fs::read_to_string(format!("/proc/{}/status", dev.0.id())).unwrap();
        println!(
            "{}",
            st.lines()
                .filter(|l| l.starts_with("Threads") || l.starts_with("Vm"))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let maps = std::fs::read_to_string(format!("/proc/{}/smaps", dev.0.id())).unwrap();
        let mut regions: Vec<(u64, String)> = Vec::new();
        let mut cur = String::new();
        for l in maps.lines() {
            if l.contains('-') && !l.starts_with(|c: char| c.is_ascii_uppercase()) {
                cur = l.to_owned();
            }
            if let Some(r) = l.strip_prefix("Rss:") {
                let kb: u64 = r.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                regions.push((kb, cur.clone()));
            }
        }
        regions.sort();
        for (kb, r) in regions.iter().rev().take(8) {
            println!("{kb:>8} kB {r}");
        }
        println!("{} mappings", regions.len());
    }
    let _ = go_tx.send(());
    // Rotate: changing the entry makes the agent re-sign it and push it to every stream.
    let list: serde_json::Value = serde_json::from_slice(
        &tessera(
            &admin,
            &[
                "entry",
                "list",
                "--spiffe-id",
                "spiffe://example.org/bench",
                "--output",
                "json",
            ],
        )
        .stdout,
    )
    .unwrap();
    let id = list[0]["id"].as_str().unwrap().to_owned();
    let t = Instant::now();
    tessera(
        &admin,
        &["entry", "update", "--id", &id, "--hint", "rotated"],
    );
    while received.load(Ordering::SeqCst) < tasks.len() {
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "rotation did not reach every stream"
        );
    }
    let fanout = t.elapsed();
    println!(
        "{} concurrent FetchX509SVID streams ({} connections): tessera dev RSS {:.1} MiB idle -> {:.1} MiB with all open; rotation reached all in {:.3?}",
        tasks.len(),
        tasks.len().div_ceil(per_conn),
        rss_before as f64 / 1024.0,
        rss_open as f64 / 1024.0,
        fanout
    );
}
