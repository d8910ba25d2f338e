//! Two proxies in one process on loopback, with SVIDs from a test CA: the tunnel carries data
//! both ways with half-close, the destination authorizes on the identity proven in the TLS
//! session, a stale identity mapping and a client without a certificate fail the handshake, an
//! SVID rotated during a transfer does not break it, and a bundle without the peer's CA makes new
//! handshakes fail.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::PrivateKeyDer;
use tessera_proxy::config::InboundPort;
use tessera_proxy::outbound::{H2Stream, STREAMS_PER_CONNECTION, TunnelError, TunnelStream};
use tessera_proxy::tls::TunnelProtocol;
use tessera_proxy::{Identity, ProxyOptions, RunningProxy, Telemetry};
use tessera_spiffe::SpiffeId;
use tessera_test_util::access_log::AccessLog as Log;
use tessera_test_util::{TestCa, bundle_set};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

fn identity(ca: &TestCa, id: &str, trust: &[&TestCa]) -> Arc<Identity> {
    let svid = ca.issue(id);
    Identity::with_svid(
        svid.chain,
        PrivateKeyDer::Pkcs8(svid.key),
        bundle_set(trust),
    )
    .unwrap()
}

struct Node {
    proxy: RunningProxy,
    identity: Arc<Identity>,
    log: Log,
}

async fn node(identity: Arc<Identity>, inbound: &[u16], policy: Option<&str>) -> Node {
    node_with(identity, inbound, policy, TunnelProtocol::H2).await
}

async fn node_with(
    identity: Arc<Identity>,
    inbound: &[u16],
    policy: Option<&str>,
    protocol: TunnelProtocol,
) -> Node {
    node_configured(identity, inbound, policy, |o| o.protocol = protocol).await
}

/// A proxy with `configure` applied to its options last.
async fn node_configured(
    identity: Arc<Identity>,
    inbound: &[u16],
    policy: Option<&str>,
    configure: impl FnOnce(&mut ProxyOptions),
) -> Node {
    let log = Log::default();
    let mut reg = prometheus_client::registry::Registry::default();
    let telemetry = Arc::new(Telemetry::new(&mut reg, Box::new(log.clone())));
    let mut opts = ProxyOptions::new("127.0.0.1:0".parse().unwrap());
    opts.inbound = inbound
        .iter()
        .map(|p| InboundPort {
            port: *p,
            protocol: tessera_proxy::config::Protocol::Tcp,
        })
        .collect();
    opts.policy = policy.map(|p| ("test.toml".to_owned(), p.to_owned()));
    configure(&mut opts);
    let proxy = tessera_proxy::start(opts, identity.clone(), telemetry)
        .await
        .unwrap();
    Node {
        proxy,
        identity,
        log,
    }
}

/// A raw TLS client (ALPN h2) to `bar`'s tunnel port, verifying bar's SVID with the bundles of
/// `trust` and presenting `svid` (none: no client certificate).
async fn tls_to_tunnel(
    bar: &Node,
    trust: &Identity,
    svid: Option<Arc<tessera_tls::SvidResolver>>,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let verifier = Arc::new(tessera_tls::SpiffeServerVerifier::new(
        trust.bundles(),
        tessera_tls::ExpectedPeer::Exact(id("spiffe://example.org/bar")),
    ));
    let cfg = tessera_tls::client_config(verifier, svid, &[b"h2"]).unwrap();
    let tcp = tokio::net::TcpStream::connect(bar.proxy.tunnel_addr).await?;
    let name =
        rustls_pki_types::ServerName::IpAddress(std::net::IpAddr::from([127, 0, 0, 1]).into());
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
}

/// An echo application on loopback; counts accepted connections.
/// Both ends of a loopback TCP connection: (the workload's end, the proxy's end).
async fn loopback_pair() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (plain, _) = l.accept().await.unwrap();
    (app, plain)
}

async fn echo_app() -> (u16, Arc<Mutex<usize>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let count = Arc::new(Mutex::new(0usize));
    let c = count.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            *c.lock().unwrap() += 1;
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (port, count)
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

const ALLOW_FOO: &str = r#"
[[policy]]
name = "bar-from-foo"
action = "ALLOW"
[[policy.rules]]
from = { principals = ["spiffe://example.org/foo"] }
"#;

/// bar (serving an echo app, allowing foo) and foo (with `foo_identity`), both of `ca`.
struct Pair {
    bar: Node,
    foo: Node,
    /// bar's application, as foo's CONNECT names it.
    target: SocketAddr,
    bar_id: SpiffeId,
    /// Connections bar's application accepted.
    count: Arc<Mutex<usize>>,
}

async fn pair(ca: &TestCa, foo_identity: Arc<Identity>) -> Pair {
    pair_over(ca, foo_identity, TunnelProtocol::H2).await
}

/// [`pair`], foo opening tunnels of `protocol`.
async fn pair_over(ca: &TestCa, foo_identity: Arc<Identity>, protocol: TunnelProtocol) -> Pair {
    let (app_port, count) = echo_app().await;
    let bar = node(
        identity(ca, "spiffe://example.org/bar", &[ca]),
        &[app_port],
        Some(ALLOW_FOO),
    )
    .await;
    let client = node_with(foo_identity, &[], None, protocol).await;
    Pair {
        bar,
        foo: client,
        target: format!("127.0.0.1:{app_port}").parse().unwrap(),
        bar_id: id("spiffe://example.org/bar"),
        count,
    }
}

async fn roundtrip(up: H2Stream, payload: &[u8]) -> Vec<u8> {
    let mut io = hyper_util::rt::TokioIo::new(up);
    io.write_all(payload).await.unwrap();
    // Half-close: the application sees EOF, echoes everything, then closes its side.
    io.shutdown().await.unwrap();
    let mut back = Vec::new();
    io.read_to_end(&mut back).await.unwrap();
    back
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_source_reaches_the_app_with_half_close_and_is_logged() {
    let ca = TestCa::new("example.org");
    let Pair {
        bar,
        foo,
        target,
        bar_id,
        count,
    } = pair(&ca, identity(&ca, "spiffe://example.org/foo", &[&ca])).await;
    let payload = vec![7u8; 300_000];
    // Two streams on the pooled connection.
    for _ in 0..2 {
        let up = foo
            .proxy
            .outbound
            .open(&bar_id, bar.proxy.tunnel_addr, target)
            .await
            .unwrap();
        assert_eq!(roundtrip(up, &payload).await, payload);
    }
    assert_eq!(*count.lock().unwrap(), 2);
    let rec = bar
        .log
        .wait_for(|r| r["decision"] == "allow" && r["bytes_sent"] == 300_000)
        .await;
    assert_eq!(rec["direction"], "inbound");
    assert_eq!(rec["src_spiffe_id"], "spiffe://example.org/foo");
    assert_eq!(rec["dst_spiffe_id"], "spiffe://example.org/bar");
    assert_eq!(rec["bytes_received"], 300_000);
    assert_eq!(rec["reason"], "allowed by policy bar-from-foo rule 0");
    // Each stream's record is written when its relay ends, which may be just after the client
    // read its echo: wait for the second.
    let allowed = || {
        bar.log
            .records()
            .iter()
            .filter(|r| r["decision"] == "allow")
            .count()
    };
    for _ in 0..200 {
        if allowed() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(allowed(), 2);
}

/// A pooled tunnel connection carries at most STREAMS_PER_CONNECTION streams: the next one goes
/// over a second connection (it neither waits for a slot nor exceeds the peer's limit), and once
/// the streams end only one idle connection stays pooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pooled_connection_sends_the_next_stream_over_another() {
    let ca = TestCa::new("example.org");
    let Pair {
        bar,
        foo,
        target,
        bar_id,
        count,
    } = pair(&ca, identity(&ca, "spiffe://example.org/foo", &[&ca])).await;
    let out = &foo.proxy.outbound;
    let mut open = Vec::new();
    for i in 0..=STREAMS_PER_CONNECTION {
        let up = tokio::time::timeout(
            Duration::from_secs(10),
            out.open(&bar_id, bar.proxy.tunnel_addr, target),
        )
        .await
        .unwrap_or_else(|_| panic!("stream {i} waited for a slot"))
        .unwrap();
        let mut io = hyper_util::rt::TokioIo::new(up);
        io.write_all(&[7]).await.unwrap();
        let mut b = [0u8; 1];
        io.read_exact(&mut b).await.unwrap();
        open.push(io);
        let want = if i < STREAMS_PER_CONNECTION { 1 } else { 2 };
        assert_eq!(out.pooled_connections(), want, "after stream {i}");
    }
    assert_eq!(*count.lock().unwrap(), STREAMS_PER_CONNECTION + 1);
    drop(open);
    let up = out
        .open(&bar_id, bar.proxy.tunnel_addr, target)
        .await
        .unwrap();
    assert_eq!(roundtrip(up, b"again").await, b"again");
    assert_eq!(out.pooled_connections(), 1, "one idle connection is kept");
}

/// Streams opened together on an empty pool share one new connection (one dial per key at a
/// time), rather than each dialing one that would then stay pooled, idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_opened_together_share_one_new_connection() {
    let ca = TestCa::new("example.org");
    let Pair {
        bar,
        foo,
        target,
        bar_id,
        ..
    } = pair(&ca, identity(&ca, "spiffe://example.org/foo", &[&ca])).await;
    let out = foo.proxy.outbound.clone();
    let tunnel = bar.proxy.tunnel_addr;
    let opens: Vec<_> = (0..20)
        .map(|_| {
            let out = out.clone();
            let bar_id = bar_id.clone();
            tokio::spawn(async move { out.open(&bar_id, tunnel, target).await.unwrap() })
        })
        .collect();
    let mut held = Vec::new();
    for o in opens {
        held.push(o.await.unwrap());
    }
    assert_eq!(out.pooled_connections(), 1);
    drop(held);
}

/// The tunnel port tells every HTTP/2 client how many streams one connection may hold (RFC 9113
/// §6.5.2 SETTINGS_MAX_CONCURRENT_STREAMS), a bound on the application connections one peer
/// connection can hold, and above what our pooling client opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tunnel_port_advertises_its_stream_limit() {
    let ca = TestCa::new("example.org");
    let Pair {
        bar, foo, target, ..
    } = pair(&ca, identity(&ca, "spiffe://example.org/foo", &[&ca])).await;
    let tls = tls_to_tunnel(&bar, &foo.identity, foo.identity.resolver())
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(target.to_string())
        .body(())
        .unwrap();
    let (resp, _stream) = send.send_request(req, false).unwrap();
    // The answer comes after the server's SETTINGS, which the client has then applied.
    assert_eq!(resp.await.unwrap().status(), 200);
    let limit = send.current_max_send_streams();
    assert_eq!(limit, tessera_proxy::inbound::MAX_STREAMS as usize);
    assert!(limit > STREAMS_PER_CONNECTION, "{limit}");
}

/// The stream tunnel (one mTLS connection per connection) carries bytes with half-close, and
/// admits exactly as the HTTP/2 path does: on the proven identity, a declared port, this
/// workload's address, and the expected peer identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_tunnel_carries_and_refuses_like_h2() {
    let ca = TestCa::new("example.org");
    let (app_port, count) = echo_app().await;
    let bar = node(
        identity(&ca, "spiffe://example.org/bar", &[&ca]),
        &[app_port],
        Some(ALLOW_FOO),
    )
    .await;
    let target: SocketAddr = format!("127.0.0.1:{app_port}").parse().unwrap();
    let bar_id = id("spiffe://example.org/bar");
    let foo = node_with(
        identity(&ca, "spiffe://example.org/foo", &[&ca]),
        &[],
        None,
        TunnelProtocol::Stream,
    )
    .await;
    let payload: Vec<u8> = (0..700_000u32).map(|i| (i % 253) as u8).collect();
    // The workload speaks first: its first bytes are there before the tunnel opens, and
    // leave with the handshake's last flight.
    let (mut app, plain) = loopback_pair().await;
    app.write_all(&payload[..1000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let stream = foo
        .proxy
        .outbound
        .open_stream(&bar_id, bar.proxy.tunnel_addr, target, Some(&plain))
        .await
        .unwrap();
    let TunnelStream::Stream(mut sealed) = stream else {
        panic!("the stream protocol was configured");
    };
    let carried = tokio::spawn(async move {
        let mut plain = plain;
        tessera_proxy::sealed::bidirectional(&mut plain, &mut sealed).await
    });
    let (mut app_r, mut app_w) = app.into_split();
    let rest = payload[1000..].to_vec();
    let writer = tokio::spawn(async move {
        app_w.write_all(&rest).await.unwrap();
        app_w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    app_r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    assert!(back == payload, "every byte echoed after the half-close");
    assert_eq!(
        carried.await.unwrap().unwrap(),
        (700_000, 700_000),
        "the early bytes are counted"
    );
    let rec = bar
        .log
        .wait_for(|r| r["decision"] == "allow" && r["bytes_sent"] == 700_000)
        .await;
    assert_eq!(rec["src_spiffe_id"], "spiffe://example.org/foo");
    assert_eq!(rec["bytes_received"], 700_000);
    assert_eq!(rec["reason"], "allowed by policy bar-from-foo rule 0");

    let baz = node_with(
        identity(&ca, "spiffe://example.org/baz", &[&ca]),
        &[],
        None,
        TunnelProtocol::Stream,
    )
    .await;
    let cases: [(&Node, SocketAddr, &str); 3] = [
        (&baz, target, "no ALLOW policy matched"),
        (
            &foo,
            "127.0.0.1:1".parse().unwrap(),
            "port 1 is not declared with --inbound",
        ),
        (
            &foo,
            format!("127.0.0.2:{app_port}").parse().unwrap(),
            "is not this workload's address",
        ),
    ];
    for (client, to, reason) in cases {
        // Early bytes of a refused connection never open a connection to the app.
        let (mut app, plain) = loopback_pair().await;
        app.write_all(b"refused early bytes").await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let err = client
            .proxy
            .outbound
            .open_stream(&bar_id, bar.proxy.tunnel_addr, to, Some(&plain))
            .await
            .unwrap_err();
        assert!(
            matches!(err, TunnelError::Refused { status: 403, .. }),
            "{reason}: {err}"
        );
        bar.log
            .wait_for(|r| {
                r["decision"] == "deny" && r["reason"].as_str().is_some_and(|s| s.contains(reason))
            })
            .await;
    }
    // A stale mapping: the destination does not prove the expected identity.
    let err = foo
        .proxy
        .outbound
        .open_stream(
            &id("spiffe://example.org/not-bar"),
            bar.proxy.tunnel_addr,
            target,
            None,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, TunnelError::Tls(..)), "{err}");
    assert_eq!(
        *count.lock().unwrap(),
        1,
        "only the admitted connection reached the app"
    );
}

/// Through both proxies' own paths (the outbound side's `proxy`, the inbound side's relay), the
/// stream tunnel's data phase on the handshake's keys: every byte both ways, a server that
/// speaks first, half-close, and both access records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_tunnel_carries_every_byte_through_both_proxies() {
    let ca = TestCa::new("example.org");
    // A server that speaks first, then echoes.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        s.write_all(b"hello from bar\n").await.unwrap();
        let (mut r, mut w) = s.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let bar = node(
        identity(&ca, "spiffe://example.org/bar", &[&ca]),
        &[app_port],
        Some(ALLOW_FOO),
    )
    .await;
    let foo = node_with(
        identity(&ca, "spiffe://example.org/foo", &[&ca]),
        &[],
        None,
        TunnelProtocol::Stream,
    )
    .await;
    let target: SocketAddr = format!("127.0.0.1:{app_port}").parse().unwrap();
    let bar_id = id("spiffe://example.org/bar");
    // The workload's connection to foo's proxy.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (accepted, peer) = l.accept().await.unwrap();
    let payload: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
    let workload = async {
        let mut hello = [0u8; 15];
        client.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"hello from bar\n");
        let (mut r, mut w) = client.split();
        let send = async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut back = Vec::new();
        let recv = r.read_to_end(&mut back);
        let (_, n) = tokio::join!(send, recv);
        n.unwrap();
        assert!(
            back == payload,
            "echo of {} bytes, got {}",
            payload.len(),
            back.len()
        );
    };
    tokio::join!(
        foo.proxy
            .outbound
            .proxy(accepted, peer, &bar_id, bar.proxy.tunnel_addr, target),
        workload
    );
    let out = foo.log.wait_for(|r| r["direction"] == "outbound").await;
    assert_eq!(out["reason"], "closed", "{out}");
    assert_eq!(out["bytes_sent"], 1_000_003);
    assert_eq!(out["bytes_received"], 1_000_003 + 15);
    let inb = bar
        .log
        .wait_for(|r| r["decision"] == "allow" && r["bytes_sent"] == 1_000_003)
        .await;
    assert_eq!(inb["bytes_received"], 1_000_003 + 15, "{inb}");
    assert_eq!(inb["src_spiffe_id"], "spiffe://example.org/foo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_decides_on_the_proven_identity() {
    let ca = TestCa::new("example.org");
    let (app_port, count) = echo_app().await;
    let bar = node(
        identity(&ca, "spiffe://example.org/bar", &[&ca]),
        &[app_port],
        Some(ALLOW_FOO),
    )
    .await;
    let baz = node(identity(&ca, "spiffe://example.org/baz", &[&ca]), &[], None).await;
    let target: SocketAddr = format!("127.0.0.1:{app_port}").parse().unwrap();
    let err = baz
        .proxy
        .outbound
        .open(
            &id("spiffe://example.org/bar"),
            bar.proxy.tunnel_addr,
            target,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, TunnelError::Refused { status: 403, .. }),
        "{err}"
    );
    let rec = bar.log.wait_for(|r| r["decision"] == "deny").await;
    assert_eq!(rec["src_spiffe_id"], "spiffe://example.org/baz");
    assert_eq!(rec["reason"], "no ALLOW policy matched");
    assert_eq!(*count.lock().unwrap(), 0, "nothing reached the application");

    // No open relay: a port that was not declared, and an address that is not this workload's.
    let undeclared: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let foo = node(identity(&ca, "spiffe://example.org/foo", &[&ca]), &[], None).await;
    let err = foo
        .proxy
        .outbound
        .open(
            &id("spiffe://example.org/bar"),
            bar.proxy.tunnel_addr,
            undeclared,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, TunnelError::Refused { status: 403, .. }),
        "{err}"
    );
    bar.log
        .wait_for(|r| r["reason"] == "port 1 is not declared with --inbound")
        .await;
    let elsewhere: SocketAddr = format!("127.0.0.2:{app_port}").parse().unwrap();
    let err = foo
        .proxy
        .outbound
        .open(
            &id("spiffe://example.org/bar"),
            bar.proxy.tunnel_addr,
            elsewhere,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, TunnelError::Refused { status: 403, .. }),
        "{err}"
    );
    bar.log
        .wait_for_reason(|s| s.contains("is not this workload's address"))
        .await;
    assert_eq!(*count.lock().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_mapping_no_client_cert_and_plaintext_fail() {
    let ca = TestCa::new("example.org");
    let (app_port, count) = echo_app().await;
    let bar = node(
        identity(&ca, "spiffe://example.org/bar", &[&ca]),
        &[app_port],
        Some("default = \"allow\"\n"),
    )
    .await;
    let foo = node(identity(&ca, "spiffe://example.org/foo", &[&ca]), &[], None).await;
    let target: SocketAddr = format!("127.0.0.1:{app_port}").parse().unwrap();

    // foo believes the address belongs to `qux`: bar's certificate fails the handshake.
    let err = foo
        .proxy
        .outbound
        .open(
            &id("spiffe://example.org/qux"),
            bar.proxy.tunnel_addr,
            target,
        )
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, TunnelError::Tls(..)), "{msg}");
    assert!(msg.contains("expected spiffe://example.org/qux"), "{msg}");

    // A TLS client without a certificate.
    // TLS 1.3: the client finishes first; the server's refusal arrives on the first read.
    if let Ok(mut s) = tls_to_tunnel(&bar, &bar.identity, None).await {
        let mut buf = [0u8; 16];
        let _ = s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
        assert!(matches!(s.read(&mut buf).await, Err(_) | Ok(0)));
    }
    // (The stale mapping above left a "received fatal alert" record; this one names the
    // missing certificate.)
    let rec = bar
        .log
        .wait_for(|r| {
            r["reason"].as_str().is_some_and(|s| {
                s.starts_with("TLS handshake failed") && s.contains("no certificates")
            })
        })
        .await;
    assert_eq!(rec["src_spiffe_id"], serde_json::Value::Null);

    // Plaintext to the tunnel port.
    let mut plain = tokio::net::TcpStream::connect(bar.proxy.tunnel_addr)
        .await
        .unwrap();
    plain
        .write_all(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = plain.read_to_end(&mut buf).await;
    assert!(!String::from_utf8_lossy(&buf).contains("200"));
    assert_eq!(*count.lock().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_during_a_transfer_and_a_bundle_without_the_peer_ca() {
    let ca = TestCa::new("example.org");
    let Pair {
        bar,
        foo,
        target,
        bar_id,
        count,
    } = pair(&ca, identity(&ca, "spiffe://example.org/foo", &[&ca])).await;
    let up = foo
        .proxy
        .outbound
        .open(&bar_id, bar.proxy.tunnel_addr, target)
        .await
        .unwrap();
    let mut io = hyper_util::rt::TokioIo::new(up);
    let chunk = vec![1u8; 64 * 1024];
    let mut echoed = vec![0u8; chunk.len()];
    for i in 0..40 {
        if i == 20 {
            // Both sides rotate mid-transfer.
            for (n, name) in [(&foo, "foo"), (&bar, "bar")] {
                let s = ca.issue(&format!("spiffe://example.org/{name}"));
                n.identity
                    .update(s.chain, PrivateKeyDer::Pkcs8(s.key), bundle_set(&[&ca]))
                    .unwrap();
                assert_eq!(n.identity.rotations(), 1);
            }
        }
        io.write_all(&chunk).await.unwrap();
        io.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, chunk);
    }
    io.shutdown().await.unwrap();
    let mut rest = Vec::new();
    io.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());

    // bar's bundle is rewritten without foo's CA (foo now has an SVID from another CA of the
    // same trust domain): new handshakes fail, with pooling or without.
    let other = TestCa::new("example.org");
    let s = other.issue("spiffe://example.org/foo");
    foo.identity
        .update(s.chain, PrivateKeyDer::Pkcs8(s.key), bundle_set(&[&ca]))
        .unwrap();
    let fresh = node(foo.identity.clone(), &[], None).await;
    let err = fresh
        .proxy
        .outbound
        .open(&bar_id, bar.proxy.tunnel_addr, target)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TunnelError::Tls(..) | TunnelError::H2(..)),
        "{err}"
    );
    bar.log
        .wait_for_reason(|s| s.starts_with("TLS handshake failed"))
        .await;
    // And foo, whose bundle no longer holds bar's CA, refuses bar.
    foo.identity.set_bundles(bundle_set(&[&other]));
    let fresh2 = node(foo.identity.clone(), &[], None).await;
    let err = fresh2
        .proxy
        .outbound
        .open(&bar_id, bar.proxy.tunnel_addr, target)
        .await
        .unwrap_err();
    assert!(matches!(err, TunnelError::Tls(..)), "{err}");
    assert_eq!(
        *count.lock().unwrap(),
        1,
        "only the first transfer reached the app"
    );
}

/// A pooled HTTP/2 tunnel outlives the bundle its handshake was verified against: once the
/// source's CA leaves the destination's bundle, the next CONNECT on that same TLS connection is
/// refused before the application is connected, as a new handshake would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_tunnel_admits_nothing_once_the_source_ca_left_the_bundle() {
    let ca = TestCa::new("example.org");
    let Pair {
        bar,
        foo,
        target,
        bar_id,
        count,
    } = pair(&ca, identity(&ca, "spiffe://example.org/foo", &[&ca])).await;
    let up = foo
        .proxy
        .outbound
        .open(&bar_id, bar.proxy.tunnel_addr, target)
        .await
        .unwrap();
    assert_eq!(roundtrip(up, b"first").await, b"first");
    assert_eq!(*count.lock().unwrap(), 1);
    // The same bundle again, as a new snapshot: still admitted (verified again, and it holds).
    bar.identity.set_bundles(bundle_set(&[&ca]));
    let up = foo
        .proxy
        .outbound
        .open(&bar_id, bar.proxy.tunnel_addr, target)
        .await
        .unwrap();
    assert_eq!(roundtrip(up, b"second").await, b"second");
    assert_eq!(*count.lock().unwrap(), 2);
    // foo's CA leaves bar's bundle; foo's pooled connection is still open.
    let other = TestCa::new("example.org");
    bar.identity.set_bundles(bundle_set(&[&other]));
    let err = foo
        .proxy
        .outbound
        .open(&bar_id, bar.proxy.tunnel_addr, target)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TunnelError::Refused { status: 403, .. }),
        "{err}"
    );
    let rec = bar
        .log
        .wait_for_reason(|s| s.contains("no longer verifies against the current bundle"))
        .await;
    assert_eq!(rec["src_spiffe_id"], "spiffe://example.org/foo");
    assert_eq!(*count.lock().unwrap(), 2, "nothing more reached the app");
}

/// A pooled tunnel connection is not used for new streams once this proxy's SVID rotated: it
/// still presents the old SVID, which may expire (and be refused by the destination) while the
/// pool holds it. New streams go over a new connection with the current SVID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_rotation_new_streams_use_a_connection_with_the_new_svid() {
    let ca = TestCa::new("example.org");
    // foo's first SVID expires in six seconds (whole seconds: the certificate drops the
    // fraction), time for two proxies to start and a first handshake on a busy CI machine.
    let short = ca.issue_expiring("spiffe://example.org/foo", 6);
    let expired = tokio::time::Instant::now() + Duration::from_millis(7100);
    let foo_identity = Identity::with_svid(
        short.chain,
        PrivateKeyDer::Pkcs8(short.key),
        bundle_set(&[&ca]),
    )
    .unwrap();
    let Pair {
        bar,
        foo,
        target,
        bar_id,
        count,
    } = pair(&ca, foo_identity).await;
    let up = foo
        .proxy
        .outbound
        .open(&bar_id, bar.proxy.tunnel_addr, target)
        .await
        .unwrap();
    assert_eq!(roundtrip(up, b"before").await, b"before");
    // Rotated well before expiry, as the agent does; the old SVID then expires.
    let long = ca.issue("spiffe://example.org/foo");
    foo.identity
        .update(
            long.chain,
            PrivateKeyDer::Pkcs8(long.key),
            bundle_set(&[&ca]),
        )
        .unwrap();
    tokio::time::sleep_until(expired).await;
    let up = foo
        .proxy
        .outbound
        .open(&bar_id, bar.proxy.tunnel_addr, target)
        .await
        .unwrap();
    assert_eq!(roundtrip(up, b"after").await, b"after");
    assert_eq!(*count.lock().unwrap(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_policy_file_is_read_again_when_it_changes() {
    let ca = TestCa::new("example.org");
    let (app_port, _) = echo_app().await;
    let target: SocketAddr = format!("127.0.0.1:{app_port}").parse().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.toml");
    std::fs::write(&file, ALLOW_FOO).unwrap();
    let path = file.clone();
    let bar = node_configured(
        identity(&ca, "spiffe://example.org/bar", &[&ca]),
        &[app_port],
        Some(ALLOW_FOO),
        |o| o.policy_path = Some(path),
    )
    .await;
    let foo = node(identity(&ca, "spiffe://example.org/foo", &[&ca]), &[], None).await;
    let bar_id = id("spiffe://example.org/bar");
    let open = || {
        foo.proxy
            .outbound
            .open(&bar_id, bar.proxy.tunnel_addr, target)
    };
    let echoes = async |up: H2Stream| {
        let mut io = hyper_util::rt::TokioIo::new(up);
        io.write_all(b"hi").await.is_ok() && {
            let mut b = [0u8; 2];
            matches!(
                tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut b)).await,
                Ok(Ok(_))
            ) && &b == b"hi"
        }
    };
    let mut live = hyper_util::rt::TokioIo::new(open().await.unwrap());
    live.write_all(b"hi").await.unwrap();
    let mut b = [0u8; 2];
    live.read_exact(&mut b).await.unwrap();

    // An edit that allows nothing closes the live connection, as a pushed change would.
    std::fs::write(
        &file,
        "[[policy]]\nname = \"allow-nothing\"\naction = \"ALLOW\"\n",
    )
    .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), live.read(&mut b)).await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "the live connection was not closed: {closed:?}"
    );
    // Back to allowing foo: new connections pass again.
    std::fs::write(&file, ALLOW_FOO).unwrap();
    let mut passed = false;
    for _ in 0..50 {
        if let Ok(up) = open().await
            && echoes(up).await
        {
            passed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(passed, "the restored policy file was not read");
    // A bad edit is refused whole and the policy in force stays (foo still passes); without
    // that, the file's empty set would fall back to the default, deny.
    std::fs::write(&file, "[[policy]]\nname = \"x\"\naction = \"MAYBE\"\n").unwrap();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        echoes(open().await.unwrap()).await,
        "a bad edit replaced the policy"
    );
}

/// A connection that live re-authorization closes is recorded with the bytes it carried, over
/// either tunnel: the close drops the copy, whose own counts would go with it (they did: such
/// a connection was recorded with 0 bytes each way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_closed_by_re_authorization_is_recorded_with_its_bytes() {
    for protocol in [TunnelProtocol::H2, TunnelProtocol::Stream] {
        let ca = TestCa::new("example.org");
        let Pair {
            bar,
            foo,
            target,
            bar_id,
            ..
        } = pair_over(
            &ca,
            identity(&ca, "spiffe://example.org/foo", &[&ca]),
            protocol,
        )
        .await;
        let (mut app, plain) = loopback_pair().await;
        let stream = foo
            .proxy
            .outbound
            .open_stream(&bar_id, bar.proxy.tunnel_addr, target, Some(&plain))
            .await
            .unwrap();
        tokio::spawn(async move {
            let mut plain = plain;
            match stream {
                TunnelStream::H2(mut up) => {
                    tessera_proxy::copy::bidirectional(&mut plain, &mut up).await
                }
                TunnelStream::Stream(mut sealed) => {
                    tessera_proxy::sealed::bidirectional(&mut plain, &mut sealed).await
                }
            }
        });
        // 12 bytes there, echoed back; the connection stays open.
        app.write_all(b"twelve bytes").await.unwrap();
        let mut b = [0u8; 12];
        app.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"twelve bytes");

        // bar's policy now allows nothing: the live connection is closed.
        let own = SpiffeId::parse("spiffe://example.org/bar").unwrap();
        let set = tessera_policy::PolicySet::from_toml_for_workload(
            &own,
            "[[policy]]\nname = \"allow-nothing\"\naction = \"ALLOW\"\n",
            tessera_policy::DefaultAction::Deny,
        )
        .unwrap();
        tessera_proxy::live::install(&bar.proxy.policy, &bar.proxy.connections, set);
        let closed = tokio::time::timeout(Duration::from_secs(5), app.read(&mut b)).await;
        assert!(
            matches!(closed, Ok(Ok(0) | Err(_))),
            "{protocol:?}: the live connection was not closed: {closed:?}"
        );
        let rec = bar
            .log
            .wait_for_reason(|s| s.starts_with("closed by re-authorization"))
            .await;
        assert_eq!(rec["decision"], "deny", "{protocol:?}: {rec}");
        assert_eq!(
            (rec["bytes_sent"].as_u64(), rec["bytes_received"].as_u64()),
            (Some(12), Some(12)),
            "{protocol:?}: {rec}"
        );
    }
}
