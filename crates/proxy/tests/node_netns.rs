//! Node mode's data path (issue 10): one process serves two workloads, each proxy instance making
//! every socket inside its workload's network namespace (`ProxyOptions::netns`) from a dedicated
//! thread. foo's outbound listener is foo's own 127.0.0.1:9000, its tunnel connection leaves
//! from foo's address, bar's tunnel port is bar's 15008 and bar's application is reached on
//! bar's loopback; the same data path and policy as sidecar mode. A file that is not a network
//! namespace is refused.
//!
//! Needs root (CI runs as root); skipped with a reason otherwise, failing instead under CI=true.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::PrivateKeyDer;
use tessera_proxy::config::{InboundPort, OutboundListener};
use tessera_proxy::sockets::Netns;
use tessera_proxy::{Identity, ProxyOptions, RunningProxy, Telemetry};
use tessera_spiffe::{BundleSet, SpiffeId};
use tessera_test_util::TestCa;
use tessera_test_util::netns::{Net, in_netns, usable};

const FOO_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const BAR_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);

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
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

fn identity(ca: &TestCa, id: &str) -> Arc<Identity> {
    let i = Identity::new();
    let svid = ca.issue(id);
    let mut b = BundleSet::new();
    b.upsert(ca.bundle());
    i.update(svid.chain, PrivateKeyDer::Pkcs8(svid.key), b)
        .unwrap();
    i
}

fn netns(ns: &str) -> Arc<Netns> {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).unwrap();
    Netns::enter(f.into(), ns).unwrap()
}

async fn instance(
    identity: Arc<Identity>,
    ns: Arc<Netns>,
    edit: impl FnOnce(&mut ProxyOptions),
) -> (RunningProxy, Log) {
    let log = Log::default();
    let mut reg = prometheus_client::registry::Registry::default();
    let telemetry = Arc::new(Telemetry::new(&mut reg, Box::new(log.clone())));
    let mut opts = ProxyOptions::new("0.0.0.0:15008".parse().unwrap());
    opts.netns = Some(ns);
    opts.default_action = tessera_policy::DefaultAction::Deny;
    edit(&mut opts);
    (
        tessera_proxy::start(opts, identity, telemetry)
            .await
            .unwrap(),
        log,
    )
}

#[test]
fn one_process_serves_two_workloads_inside_their_namespaces() {
    if !usable("one_process_serves_two_workloads_inside_their_namespaces") {
        return;
    }
    let mut net = Net::new();
    let foo = net.node("foo", FOO_IP);
    let bar = net.node("bar", BAR_IP);
    // bar's application, on bar's loopback only.
    let app = in_netns(&bar, || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 8080)).unwrap()
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

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca = TestCa::new("example.org");
    let (foo_ns, bar_ns) = (netns(&foo), netns(&bar));
    let (bar_proxy, bar_log, _foo_proxy) = rt.block_on(async {
        let policy = concat!(
            "[[policy]]\nname = \"bar-from-foo\"\naction = \"ALLOW\"\n[[policy.rules]]\n",
            "from = { principals = [\"spiffe://example.org/foo\"] }\n",
        );
        let (bar_proxy, bar_log) =
            instance(identity(&ca, "spiffe://example.org/bar"), bar_ns, |o| {
                o.inbound = vec![InboundPort {
                    port: 8080,
                    protocol: tessera_proxy::config::Protocol::Tcp,
                }];
                o.policy = Some(("bar.toml".into(), policy.into()));
            })
            .await;
        let (foo_proxy, _) = instance(identity(&ca, "spiffe://example.org/foo"), foo_ns, |o| {
            o.outbound = vec![OutboundListener {
                listen: "127.0.0.1:9000".parse().unwrap(),
                destination: SocketAddr::from((BAR_IP, 8080)).to_string(),
                spiffe_id: SpiffeId::parse("spiffe://example.org/bar").unwrap(),
            }];
        })
        .await;
        (bar_proxy, bar_log, foo_proxy)
    });
    // The listeners are the workloads' own: nothing listens on 9000 or 15008 in the root
    // namespace, where the process runs.
    assert!(TcpStream::connect(("127.0.0.1", 9000)).is_err());
    assert!(TcpStream::connect(("127.0.0.1", 15008)).is_err());

    let echoed = in_netns(&foo, || {
        let mut s = TcpStream::connect(("127.0.0.1", 9000)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"node-mode").unwrap();
        let mut b = [0u8; 9];
        s.read_exact(&mut b).unwrap();
        b
    });
    assert_eq!(&echoed, b"node-mode");
    // bar saw foo's identity, from foo's address: foo's tunnel connection left from foo's
    // namespace.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = bar_log.text();
        if log.contains("\"src_spiffe_id\":\"spiffe://example.org/foo\"")
            && log.contains("\"src_addr\":\"198.18.0.1:")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "bar's access log: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Detaching bar (its instance stopped) ends its listeners and live connections at once.
    let mut live = in_netns(&foo, || TcpStream::connect(("127.0.0.1", 9000)).unwrap());
    live.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    live.write_all(b"live").unwrap();
    let mut b = [0u8; 4];
    live.read_exact(&mut b).unwrap();
    let t0 = std::time::Instant::now();
    {
        let _guard = rt.enter();
        bar_proxy.shutdown();
    }
    let n = live.read(&mut b).unwrap_or(0);
    assert_eq!(n, 0, "the live connection outlived bar's detach");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    let refused = in_netns(&bar, || TcpStream::connect((BAR_IP, 15008)).is_err());
    assert!(refused, "bar's tunnel port still accepts after detach");
    drop(rt);
}
