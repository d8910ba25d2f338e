//! Issue 7's latency target: a policy created at the server → a live connection that it denies
//! is closed at the destination proxy, end to end through server (store, change feed, Sync),
//! agent (PolicyWatch) and proxy (re-authorization), all in this process over real sockets and
//! real mutual TLS.
//!
//!   cargo bench -p tessera --bench policy_close            # 200 rounds
//!   ROUNDS=1000 cargo bench -p tessera --bench policy_close
//!
//! Each round: open a connection through the proxies (admitted by an ALLOW), then `ApplyPolicy`
//! a DENY for it over the admin socket and time until the connection reads EOF; delete the DENY
//! and wait until a new connection is admitted again. Prints p50/p99/max of the close latency
//! and, as the baseline measured in the same run, of the `ApplyPolicy` round trip alone (the
//! store write and revision, before anything travels).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed fixture should panic

#[path = "../tests/support/mod.rs"]
mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tessera_proto::v1 as pb;
use tessera_proto::v1::policy_api_client::PolicyApiClient;
use tessera_proxy::config::{InboundPort, Protocol};
use tessera_proxy::{Identity, ProxyOptions, Telemetry};
use tessera_spiffe::SpiffeId;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

async fn echo_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn report(what: &str, mut v: Vec<Duration>) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "{what:<44} n={:<5} p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms",
        v.len(),
        ms(percentile(&v, 0.5)),
        ms(percentile(&v, 0.99)),
        ms(*v.last().unwrap()),
    );
}

fn policy(name: &str, json: &str) -> pb::ApplyPolicyRequest {
    pb::ApplyPolicyRequest {
        policy: Some(pb::StoredPolicy {
            name: name.to_owned(),
            document_json: json.to_owned(),
        }),
        create_only: false,
    }
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(rounds));
}

async fn run(rounds: usize) {
    let d = support::start("example.org", |_| {}).await;
    d.entry("/db", 3600).await;
    let own = SpiffeId::parse("spiffe://example.org/db").unwrap();
    let identity = Identity::new();
    tokio::spawn(tessera_proxy::identity::watch_workload_api(
        d.socket.clone(),
        identity.clone(),
    ));
    let app_port = echo_app().await;
    let mut reg = prometheus_client::registry::Registry::default();
    let telemetry = Arc::new(Telemetry::new(&mut reg, Box::new(std::io::sink())));
    let mut opts = ProxyOptions::new("127.0.0.1:0".parse().unwrap());
    opts.inbound = vec![InboundPort {
        port: app_port,
        protocol: Protocol::Tcp,
    }];
    opts.policy_socket = Some(d.socket.clone());
    let proxy = tessera_proxy::start(opts, identity.clone(), telemetry)
        .await
        .unwrap();
    let target: SocketAddr = format!("127.0.0.1:{app_port}").parse().unwrap();
    let ch = tessera_server::client::unix_channel(&d.admin_socket)
        .await
        .unwrap();
    let mut api = PolicyApiClient::new(ch);
    api.apply_policy(policy(
        "db-from-db",
        r#"{"action":"ALLOW","rules":[{"from":{"principals":["spiffe://example.org/db"]}}]}"#,
    ))
    .await
    .unwrap();
    let deny = r#"{"action":"DENY","rules":[{"from":{"principals":["spiffe://example.org/db"]}}]}"#;

    let mut close = Vec::with_capacity(rounds);
    let mut rpc = Vec::with_capacity(rounds);
    for round in 0..rounds {
        // A connection admitted under the current policies (wait out the previous delete).
        let deadline = Instant::now() + Duration::from_secs(10);
        let up = loop {
            if let Ok(up) = proxy.outbound.open(&own, proxy.tunnel_addr, target).await {
                let mut up = TokioIo::new(up);
                let mut b = [0u8; 1];
                if up.write_all(b"x").await.is_ok() && up.read_exact(&mut b).await.is_ok() {
                    break up;
                }
            }
            assert!(Instant::now() < deadline, "round {round}: never admitted");
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let mut up = up;
        let t0 = Instant::now();
        api.apply_policy(policy("no-db", deny)).await.unwrap();
        rpc.push(t0.elapsed());
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(10), up.read(&mut b))
            .await
            .expect("the live connection is closed")
            .unwrap_or(0);
        assert_eq!(
            n, 0,
            "round {round}: the connection was answered, not closed"
        );
        close.push(t0.elapsed());
        api.delete_policy(pb::PolicyName {
            name: "no-db".into(),
        })
        .await
        .unwrap();
    }
    println!("policy create -> live connection closed, {rounds} rounds, in-process:");
    report("ApplyPolicy round trip (baseline)", rpc.clone());
    report(
        "ApplyPolicy -> connection closed at the proxy",
        close.clone(),
    );
    let p99 = |mut v: Vec<Duration>| {
        v.sort();
        percentile(&v, 0.99).as_secs_f64()
    };
    println!(
        "ratio p99 close / p99 ApplyPolicy: {:.2}",
        p99(close) / p99(rpc)
    );
    proxy.shutdown();
    d.shutdown().await;
}
