//! Node mode's data path (issue 10): one process (`NodeProxy`) serves three workloads, each
//! through a proxy instance whose sockets all live inside the workload's network namespace, with
//! interception rules installed in that namespace from the namespace's thread. foo connects
//! directly to bar's address; foo's namespace redirects it to foo's instance, which tunnels with
//! foo's own key from foo's address; bar's instance admits foo by identity and reaches bar's
//! application on bar's loopback. baz, on the same node, is denied by bar's policy (pushed per
//! workload, as the agent's delegated stream does). Detaching bar ends its connections at once.
//! A file that is not a network namespace is refused. The server's destination map, pushed once
//! for the node, reaches every workload; one that clashes with the config file's is refused.
//!
//! Needs root (CI runs as root); skipped with a reason otherwise, failing instead under CI=true.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls_pki_types::PrivateKeyDer;
use tessera_proto::v1 as pb;
use tessera_proxy::config::{
    self, Destination, DestinationMap, InboundMode, InboundPort, Protocol, Unmapped,
};
use tessera_proxy::node::{NodeProxy, WorkloadEvent, WorkloadSvid};
use tessera_proxy::run::TransparentOptions;
use tessera_proxy::transparent::RuleParams;
use tessera_proxy::{ProxyOptions, Telemetry};
use tessera_spiffe::{BundleSet, SpiffeId};
use tessera_test_util::TestCa;
use tessera_test_util::netns::{Net, in_netns, usable};

const FOO_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const BAR_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const BAZ_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 3);

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Log {
    fn records(&self) -> Vec<serde_json::Value> {
        let text = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
        let complete = text.rfind('\n').map_or("", |end| &text[..end]).to_owned();
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn wait_for(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(r) = self.records().into_iter().find(&pred) {
                return r;
            }
            assert!(Instant::now() < deadline, "{what}: {:#?}", self.records());
            std::thread::sleep(Duration::from_millis(25));
        }
    }
}

fn svid(ca: &TestCa, id: &str) -> WorkloadSvid {
    let s = ca.issue(id);
    let mut bundles = BundleSet::new();
    bundles.upsert(ca.bundle());
    WorkloadSvid {
        chain: s.chain,
        key: PrivateKeyDer::Pkcs8(s.key),
        bundles,
    }
}

fn attach(ns: &str, id: &str, svid: WorkloadSvid) -> WorkloadEvent {
    WorkloadEvent::Attached {
        id: id.to_owned(),
        name: ns.to_owned(),
        netns: std::fs::File::open(format!("/run/netns/{ns}"))
            .unwrap()
            .into(),
        svid,
        policies: None,
    }
}

/// An echo application on `ns`'s loopback.
fn echo_app(ns: &str, port: u16) {
    let app = in_netns(ns, || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap()
    });
    std::thread::spawn(move || {
        for c in app.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 1024];
                while let Ok(n) = c.read(&mut b) {
                    if n == 0 || c.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// From inside `ns`, straight to `to` (intercepted there): the echo of `payload`, or nothing.
fn exchange(ns: &str, to: SocketAddr, payload: &[u8]) -> Option<Vec<u8>> {
    in_netns(ns, || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        s.write_all(payload).ok()?;
        let mut b = vec![0u8; payload.len()];
        s.read_exact(&mut b).ok()?;
        Some(b)
    })
}

/// A node proxy in transparent mode: inbound port 8080, bar at 198.18.0.2 and 2001:2::2 (STRICT
/// inbound).
fn node_proxy(log: &Log) -> NodeProxy {
    let mut reg = prometheus_client::registry::Registry::default();
    let telemetry = Arc::new(Telemetry::new(&mut reg, Box::new(log.clone())));
    let (outbound_addr, inbound_plaintext_addr) = tessera_proxy::run::default_transparent_addrs();
    let mut t = ProxyOptions::new("0.0.0.0:15008".parse().unwrap());
    t.inbound = vec![InboundPort {
        port: 8080,
        protocol: Protocol::Tcp,
    }];
    t.mark = Some(config::DEFAULT_MARK);
    t.transparent = Some(TransparentOptions {
        outbound_addr,
        inbound_plaintext_addr,
        destinations: DestinationMap::new(
            ["198.18.0.2/32", "2001:2::2/128"]
                .into_iter()
                .map(|cidr| Destination {
                    cidr: cidr.parse().unwrap(),
                    ports: vec![],
                    spiffe_id: SpiffeId::parse("spiffe://example.org/bar").unwrap(),
                    tunnel_port: config::TUNNEL_PORT,
                })
                .collect(),
        ),
        unmapped: Unmapped::Deny,
        inbound_mode: InboundMode::Strict,
        config: None,
    });
    let rules = RuleParams {
        tunnel_port: config::TUNNEL_PORT,
        outbound_port: outbound_addr.port(),
        inbound_plaintext_port: inbound_plaintext_addr.port(),
        mark: config::DEFAULT_MARK,
        uid: Some(tessera_proxy::transparent::own_uid()),
    };
    NodeProxy::new(t, Some(rules), telemetry)
}

fn bar_policy() -> WorkloadEvent {
    allow_foo("w2", "spiffe://example.org/bar")
}

/// Workload `id`'s policies, as the agent pushes them: foo may connect.
fn allow_foo(id: &str, spiffe_id: &str) -> WorkloadEvent {
    WorkloadEvent::Policies {
        id: id.into(),
        snapshot: pb::PolicySnapshot {
            spiffe_id: spiffe_id.into(),
            policies: vec![pb::StoredPolicy {
                name: "bar-from-foo".into(),
                document_json: r#"{"action":"ALLOW","rules":[{"from":{"principals":["spiffe://example.org/foo"]}}]}"#.into(),
            }],
            default_action: "deny".into(),
            revision: 1,
        },
    }
}

#[test]
fn one_node_proxy_serves_each_workload_inside_its_namespace() {
    if !usable("one_node_proxy_serves_each_workload_inside_its_namespace") {
        return;
    }
    let mut net = Net::new();
    let foo = net.node("foo", FOO_IP);
    let bar = net.node("bar", BAR_IP);
    let baz = net.node("baz", BAZ_IP);
    net.add_v6(&foo, "2001:2::1".parse().unwrap());
    net.add_v6(&bar, "2001:2::2".parse().unwrap());
    echo_app(&bar, 8080);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca = TestCa::new("example.org");
    let log = Log::default();
    let mut node = rt.block_on(async {
        let mut node = node_proxy(&log);
        // Not a network namespace: refused, nothing attached.
        let not_ns = WorkloadEvent::Attached {
            id: "w0".into(),
            name: "not-a-netns".into(),
            netns: std::fs::File::open("/proc/self/status").unwrap().into(),
            svid: svid(&ca, "spiffe://example.org/nobody"),
            policies: None,
        };
        let e = node.apply(not_ns).await.unwrap_err();
        assert!(e.contains("not-a-netns"), "{e}");
        assert!(node.is_empty());

        for (ns, id, spiffe) in [
            (&foo, "w1", "spiffe://example.org/foo"),
            (&bar, "w2", "spiffe://example.org/bar"),
            (&baz, "w3", "spiffe://example.org/baz"),
        ] {
            node.apply(attach(ns, id, svid(&ca, spiffe))).await.unwrap();
        }
        // A re-attach under a live workload ID is refused.
        let again = node
            .apply(attach(&bar, "w2", svid(&ca, "spiffe://example.org/bar")))
            .await
            .unwrap_err();
        assert!(again.contains("attached already"), "{again}");
        // bar's policies, as the agent pushes them for bar.
        node.apply(bar_policy()).await.unwrap();
        node
    });
    assert_eq!(node.len(), 3);
    // The listeners are the workloads' own: nothing listens in the process's namespace.
    assert!(TcpStream::connect(("127.0.0.1", 15008)).is_err());

    // foo → bar, intercepted in foo's namespace, admitted by identity.
    let bar_app = SocketAddr::from((BAR_IP, 8080));
    assert_eq!(
        exchange(&foo, bar_app, b"node-mode").as_deref(),
        Some(&b"node-mode"[..])
    );
    let rec = log.wait_for("bar's allow record", |r| {
        r["direction"] == "inbound" && r["decision"] == "allow"
    });
    assert_eq!(rec["src_spiffe_id"], "spiffe://example.org/foo");
    assert_eq!(rec["dst_spiffe_id"], "spiffe://example.org/bar");
    // The tunnel connection left from foo's own address.
    assert!(
        rec["src_addr"].as_str().unwrap().starts_with("198.18.0.1:"),
        "{rec}"
    );
    // The same over IPv6: intercepted in foo's namespace (ip6tables), tunnelled to bar's IPv6
    // address, where the node proxy's IPv6 listener in bar's namespace takes it.
    assert_eq!(
        exchange(&foo, "[2001:2::2]:8080".parse().unwrap(), b"node-mode-v6").as_deref(),
        Some(&b"node-mode-v6"[..])
    );
    let rec = log.wait_for("bar's IPv6 allow record", |r| {
        r["direction"] == "inbound"
            && r["decision"] == "allow"
            && r["src_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("[2001:2::1]:"))
    });
    assert_eq!(rec["src_spiffe_id"], "spiffe://example.org/foo");
    // baz, a workload of the same node proxy, proves baz and is denied.
    assert_eq!(exchange(&baz, bar_app, b"baz"), None);
    log.wait_for("bar's denial of baz", |r| {
        r["direction"] == "inbound"
            && r["decision"] == "deny"
            && r["src_spiffe_id"] == "spiffe://example.org/baz"
    });
    // Plaintext straight to bar's tunnel-less port is refused by STRICT inbound.
    assert_eq!(
        in_netns(&baz, || {
            let mut s = TcpStream::connect_timeout(
                &SocketAddr::from((BAR_IP, 9999)),
                Duration::from_secs(5),
            )
            .ok()?;
            s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let mut b = [0u8; 1];
            s.read(&mut b).ok().filter(|n| *n > 0)
        }),
        None
    );

    // The server's destination map, as the agent's node stream pushes it (once for the node):
    // baz's address is unmapped until it arrives, then reached by identity. A map that claims
    // bar's address (mapped by the config file) for another identity is refused, and the map
    // in force stays.
    echo_app(&baz, 8080);
    rt.block_on(node.apply(allow_foo("w3", "spiffe://example.org/baz")))
        .unwrap();
    let baz_app = SocketAddr::from((BAZ_IP, 8080));
    assert_eq!(exchange(&foo, baz_app, b"unmapped"), None);
    let pushed = |entries: &[(&str, &str)]| WorkloadEvent::Destinations {
        snapshot: pb::DestinationSnapshot {
            destinations: entries
                .iter()
                .map(|(name, doc)| pb::StoredDestination {
                    name: (*name).into(),
                    document_json: (*doc).into(),
                })
                .collect(),
            revision: 9,
        },
    };
    let baz_entry = (
        "baz",
        r#"{"cidr":"198.18.0.3/32","spiffe_id":"spiffe://example.org/baz"}"#,
    );
    rt.block_on(node.apply(pushed(&[baz_entry]))).unwrap();
    assert_eq!(
        exchange(&foo, baz_app, b"mapped-by-the-server").as_deref(),
        Some(&b"mapped-by-the-server"[..])
    );
    let e = rt
        .block_on(node.apply(pushed(&[
            baz_entry,
            (
                "evil",
                r#"{"cidr":"198.18.0.2/32","spiffe_id":"spiffe://example.org/evil"}"#,
            ),
        ])))
        .unwrap_err();
    assert!(
        e.contains("\"evil\"") && e.contains("the map in force stays"),
        "{e}"
    );
    assert_eq!(
        exchange(&foo, bar_app, b"still-bar").as_deref(),
        Some(&b"still-bar"[..])
    );
    assert_eq!(
        exchange(&foo, baz_app, b"still-baz").as_deref(),
        Some(&b"still-baz"[..])
    );

    // The IP-reuse attack in node mode: foo is detached and its namespace deleted; a new
    // workload takes foo's address and is attached with its own identity (baz). It is baz,
    // never foo: bar denies it, and logs baz from foo's old address.
    rt.block_on(node.apply(WorkloadEvent::Detached { id: "w1".into() }))
        .unwrap();
    net.remove_node(&foo);
    let reuse = net.node("reuse", FOO_IP);
    rt.block_on(node.apply(attach(&reuse, "w4", svid(&ca, "spiffe://example.org/baz"))))
        .unwrap();
    assert_eq!(exchange(&reuse, bar_app, b"i-am-foo"), None);
    let denied = log.wait_for("bar's denial of the address reuser", |r| {
        r["direction"] == "inbound"
            && r["decision"] == "deny"
            && r["src_addr"]
                .as_str()
                .is_some_and(|a| a.starts_with("198.18.0.1:"))
    });
    assert_eq!(denied["src_spiffe_id"], "spiffe://example.org/baz");
    let foo = reuse;

    // Detaching bar ends its live connections at once.
    // (A connection from a workload bar admits: baz is not one, so let bar admit baz first.)
    rt.block_on(node.apply(WorkloadEvent::Policies {
        id: "w2".into(),
        snapshot: pb::PolicySnapshot {
            spiffe_id: "spiffe://example.org/bar".into(),
            policies: vec![],
            default_action: "allow".into(),
            revision: 2,
        },
    }))
    .unwrap();
    let mut live = in_netns(&foo, || TcpStream::connect(bar_app).unwrap());
    live.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    live.write_all(b"live").unwrap();
    let mut b = [0u8; 4];
    live.read_exact(&mut b).unwrap();
    let t0 = Instant::now();
    rt.block_on(node.apply(WorkloadEvent::Detached { id: "w2".into() }))
        .unwrap();
    assert!(
        tessera_test_util::netns::closed_by_peer(&mut live),
        "the live connection outlived bar's detach"
    );
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert_eq!(node.len(), 2);
    // bar's interception rules stay: nothing reaches bar's application now (fails closed).
    assert_eq!(exchange(&foo, bar_app, b"after"), None);
    // Attached again with its policies in the event, as the agent sends them: they decide its
    // first connection (without them it is denied until a separate policies event comes).
    let mut again = attach(&bar, "w5", svid(&ca, "spiffe://example.org/bar"));
    if let WorkloadEvent::Attached { policies, .. } = &mut again {
        *policies = Some(pb::PolicySnapshot {
            spiffe_id: "spiffe://example.org/bar".into(),
            policies: vec![],
            default_action: "allow".into(),
            revision: 3,
        });
    }
    rt.block_on(node.apply(again)).unwrap();
    assert_eq!(
        exchange(&foo, bar_app, b"first-after-attach").as_deref(),
        Some(&b"first-after-attach"[..])
    );
    rt.block_on(node.apply(WorkloadEvent::Detached { id: "w5".into() }))
        .unwrap();

    // The agent's stream restarts and announces only w4 again (w3 was detached, or lost its
    // last entry, while it was down): w3 is drained once the agent says it has sent all.
    assert!(node.instance("w3").is_some() && node.instance("w4").is_some());
    // Readiness (the health endpoint's /ready): only once the agent said it had announced
    // every workload, however many were attached before.
    let ready = node.readiness();
    let is_ready = || ready.load(std::sync::atomic::Ordering::SeqCst);
    assert!(!is_ready(), "ready before the agent's stream synced");
    rt.block_on(node.apply(WorkloadEvent::Resync)).unwrap();
    rt.block_on(node.apply(WorkloadEvent::Svid {
        id: "w4".into(),
        svid: svid(&ca, "spiffe://example.org/baz"),
    }))
    .unwrap();
    assert!(
        node.instance("w3").is_some(),
        "nothing is drained before the end of the resync"
    );
    rt.block_on(node.apply(WorkloadEvent::Synced)).unwrap();
    assert!(
        node.instance("w3").is_none(),
        "w3 outlived a resync that did not announce it"
    );
    assert!(node.instance("w4").is_some());
    assert!(is_ready(), "not ready after the agent's stream synced");
    // Draining (an upgrade): not ready, and a later resync of the stream does not make it so.
    node.stop_accepting();
    assert!(!is_ready(), "ready while draining");
    rt.block_on(node.apply(WorkloadEvent::Resync)).unwrap();
    rt.block_on(node.apply(WorkloadEvent::Synced)).unwrap();
    assert!(!is_ready(), "a draining process became ready again");
    drop(node);
    drop(rt);
}

/// An upgrade: a second node proxy attaches the same workloads while the first still serves
/// (listeners with SO_REUSEPORT, the same interception rules left in place); the first stops
/// accepting and drains. A client connecting in a loop throughout sees no refused or reset
/// connection, and a connection open across the handover keeps working.
#[test]
fn an_upgrade_hands_over_without_refused_or_reset_connections() {
    if !usable("an_upgrade_hands_over_without_refused_or_reset_connections") {
        return;
    }
    let mut net = Net::new();
    let foo = net.node("foo", FOO_IP);
    let bar = net.node("bar", BAR_IP);
    echo_app(&bar, 8080);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca = TestCa::new("example.org");
    let start = |log: &Log| {
        let mut node = node_proxy(log);
        rt.block_on(async {
            node.apply(attach(&foo, "w1", svid(&ca, "spiffe://example.org/foo")))
                .await
                .unwrap();
            node.apply(attach(&bar, "w2", svid(&ca, "spiffe://example.org/bar")))
                .await
                .unwrap();
            node.apply(bar_policy()).await.unwrap();
        });
        node
    };
    let (old_log, new_log) = (Log::default(), Log::default());
    let mut old = start(&old_log);
    let bar_app = SocketAddr::from((BAR_IP, 8080));
    assert_eq!(
        exchange(&foo, bar_app, b"before").as_deref(),
        Some(&b"before"[..])
    );

    // A connection open across the handover.
    let mut long = in_netns(&foo, || TcpStream::connect(bar_app).unwrap());
    long.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // A client connecting in a loop.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, failed) = (
        Arc::new(Mutex::new(0usize)),
        Arc::new(Mutex::new(Vec::new())),
    );
    let client = {
        let (stop, ok, failed, foo) = (stop.clone(), ok.clone(), failed.clone(), foo.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match exchange(&foo, bar_app, b"loop") {
                    Some(b) if b == b"loop" => *ok.lock().unwrap() += 1,
                    other => failed.lock().unwrap().push(format!("{other:?}")),
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let new = start(&new_log);
    std::thread::sleep(Duration::from_millis(300));
    old.stop_accepting();
    std::thread::sleep(Duration::from_millis(500));
    // The long connection still works on the old process.
    long.write_all(b"still").unwrap();
    let mut b = [0u8; 5];
    long.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"still");
    drop(long);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    client.join().unwrap();
    let failed = failed.lock().unwrap().clone();
    assert!(
        failed.is_empty(),
        "failed connections during the upgrade: {failed:?}"
    );
    assert!(
        *ok.lock().unwrap() > 10,
        "too few connections to mean anything"
    );
    // The new process served connections after the handover.
    new_log.wait_for("the new process's allow record", |r| {
        r["direction"] == "inbound" && r["decision"] == "allow"
    });
    drop(old);
    assert_eq!(
        exchange(&foo, bar_app, b"after").as_deref(),
        Some(&b"after"[..])
    );
    drop(new);
    drop(rt);
}
