//! End to end through server, agent and proxy (in this process, on loopback): a policy created
//! with `tessera policy` reaches a running proxy over the agent's PolicyWatch stream, admits a
//! new connection (ALLOW), and a later DENY closes a live connection at the destination proxy.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use tessera_proxy::config::{InboundPort, Protocol};
use tessera_proxy::{Identity, ProxyOptions, Telemetry};
use tessera_spiffe::SpiffeId;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

fn policy_cli(admin: &std::path::Path, args: &[&str]) -> String {
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["policy", "--admin-socket", admin.to_str().unwrap()])
        .args(args)
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(
        o.status.success(),
        "{args:?}: {}{out}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

async fn echo_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_created_with_the_cli_reaches_the_proxy_and_closes_a_live_connection() {
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
    let proxy = tokio::time::timeout(
        Duration::from_secs(20),
        tessera_proxy::start(opts, identity.clone(), telemetry),
    )
    .await
    .expect("the proxy gets its SVID")
    .unwrap();
    let target: SocketAddr = format!("127.0.0.1:{app_port}").parse().unwrap();
    let open = || proxy.outbound.open(&own, proxy.tunnel_addr, target);

    // The server's default is deny: nothing gets through.
    assert!(open().await.is_err(), "default deny");

    let dir = tempfile::tempdir().unwrap();
    let allow = dir.path().join("allow.yaml");
    std::fs::write(
        &allow,
        "name: db-from-db\naction: ALLOW\nrules:\n  - from: {principals: [\"spiffe://example.org/db\"]}\n",
    )
    .unwrap();
    policy_cli(&d.admin_socket, &["apply", "-f", allow.to_str().unwrap()]);
    // The ALLOW reaches the proxy: a new connection is admitted.
    let deadline = Instant::now() + Duration::from_secs(10);
    let up = loop {
        if let Ok(up) = open().await {
            break up;
        }
        assert!(
            Instant::now() < deadline,
            "the ALLOW never reached the proxy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut up = TokioIo::new(up);
    up.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    up.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
    assert_eq!(proxy.connections.len(), 1);

    // Selector targets, matched by the agent against the proxy's attested selectors: the
    // policy for this process's uid reaches the proxy, the one for another uid does not.
    let uid = support::my_uid();
    let sel = dir.path().join("selectors.json");
    std::fs::write(
        &sel,
        format!(
            r#"[{{"name":"for-others","action":"DENY","rules":[{{}}],"selectors":["unix:uid:{}"]}},
                {{"name":"for-me","action":"AUDIT","rules":[{{}}],"selectors":["unix:uid:{uid}"]}}]"#,
            uid + 1
        ),
    )
    .unwrap();
    policy_cli(&d.admin_socket, &["apply", "-f", sel.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while proxy.policy.load().len() != 2 {
        assert!(
            Instant::now() < deadline,
            "the selector-targeted policy never reached the proxy ({} policies)",
            proxy.policy.load().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(proxy.policy.load().len(), 2, "for-others reached the proxy");
    assert!(open().await.is_ok(), "a DENY for another uid applied here");
    policy_cli(&d.admin_socket, &["delete", "for-others"]);
    policy_cli(&d.admin_socket, &["delete", "for-me"]);

    let deny = dir.path().join("deny.json");
    std::fs::write(
        &deny,
        r#"[{"name":"no-db","action":"DENY","rules":[{"from":{"principals":["spiffe://example.org/db"]}}]}]"#,
    )
    .unwrap();
    let t0 = Instant::now();
    policy_cli(&d.admin_socket, &["create", "-f", deny.to_str().unwrap()]);
    // The live connection is closed by the destination proxy.
    let n = tokio::time::timeout(Duration::from_secs(10), up.read(&mut buf))
        .await
        .expect("the live connection is closed")
        .unwrap_or(0);
    let closed_after = t0.elapsed();
    assert_eq!(n, 0, "closed, not answered");
    eprintln!("policy create -> live connection closed: {closed_after:?} (incl. CLI process)");
    assert!(open().await.is_err(), "new connections are denied too");

    let list = policy_cli(&d.admin_socket, &["list"]);
    assert!(
        list.contains("default: deny") && list.contains("no-db"),
        "{list}"
    );
    let shown = policy_cli(&d.admin_socket, &["show", "no-db"]);
    assert!(shown.contains("\"DENY\""), "{shown}");
    // Deleting the DENY admits new connections again.
    policy_cli(&d.admin_socket, &["delete", "no-db"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while open().await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the delete never reached the proxy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    proxy.shutdown();
    d.shutdown().await;
}
