//! Node mode (issue 10): memory per enrolled workload and time from attach to the first
//! proxied connection. Needs root (network namespaces).
//!
//!   cargo bench -p tessera-proxy --bench node                 # 100 workloads, 20 timed attaches
//!   WORKLOADS=500 ATTACHES=50 cargo bench -p tessera-proxy --bench node
//!
//! Memory: the process's RSS before and after attaching WORKLOADS workloads (each its own
//! `ip netns` namespace, its own SVID and key, tunnel and explicit outbound listeners inside its
//! namespace, its namespace thread), divided by WORKLOADS; no traffic. The baseline measured in
//! the same run is one whole-process sidecar equivalent: the RSS added by the first workload.
//!
//! Attach → first proxied connection: for ATTACHES more workloads, the time from handing the
//! attach event to the controller to a payload echoed through the workload's outbound listener,
//! the mutual-TLS tunnel (to itself) and its application. Baseline in the same run: a direct TCP
//! connect + echo to the same application from inside the namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark: a failed fixture should panic

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls_pki_types::PrivateKeyDer;
use tessera_proto::v1 as pb;
use tessera_proxy::config::{InboundPort, OutboundListener, Protocol};
use tessera_proxy::node::{NodeProxy, WorkloadEvent, WorkloadSvid};
use tessera_proxy::{ProxyOptions, Telemetry};
use tessera_spiffe::{BundleSet, SpiffeId};
use tessera_test_util::TestCa;
use tessera_test_util::netns::in_netns;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Namespaces removed on drop.
struct Namespaces(Vec<String>);

impl Drop for Namespaces {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn add_ns(all: &mut Namespaces, name: String) -> String {
    let ok = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap()
        .success();
    assert!(ok, "ip netns add {name}");
    all.0.push(name.clone());
    let ok = Command::new("ip")
        .args(["-n", &name, "link", "set", "lo", "up"])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    name
}

fn echo_app(ns: &str) {
    let app = in_netns(ns, || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, 8080)).unwrap()
    });
    std::thread::spawn(move || {
        for c in app.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut b = [0u8; 64];
                while let Ok(n) = c.read(&mut b) {
                    if n == 0 || c.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn echo_via(ns: &str, port: u16) -> bool {
    in_netns(ns, || {
        let Ok(mut s) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
        let mut b = [0u8; 4];
        s.write_all(b"ping").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"ping"
    })
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping the node benchmark: it needs root (network namespaces)");
        return;
    }
    let workloads = env("WORKLOADS", 100);
    let attaches = env("ATTACHES", 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ca = TestCa::new("example.org");
    let tag = std::process::id();
    let mut all = Namespaces(Vec::new());
    let mut reg = prometheus_client::registry::Registry::default();
    let telemetry = Arc::new(Telemetry::new(&mut reg, Box::new(std::io::sink())));
    let mut t = ProxyOptions::new("127.0.0.1:15008".parse().unwrap());
    t.inbound = vec![InboundPort {
        port: 8080,
        protocol: Protocol::Tcp,
    }];
    let mut node = NodeProxy::new(t, None, telemetry);
    let mut n = 0usize;
    let mut attach = |node: &mut NodeProxy, ns: &str| {
        n += 1;
        let id = format!("spiffe://example.org/w/{n}");
        let s = ca.issue(&id);
        let mut bundles = BundleSet::new();
        bundles.upsert(ca.bundle());
        let wid = format!("w{n}");
        rt.block_on(async {
            node.apply(WorkloadEvent::Attached {
                id: wid.clone(),
                name: ns.to_owned(),
                netns: std::fs::File::open(format!("/run/netns/{ns}"))
                    .unwrap()
                    .into(),
                svid: WorkloadSvid {
                    chain: s.chain,
                    key: PrivateKeyDer::Pkcs8(s.key),
                    bundles,
                },
                policies: None,
            })
            .await
            .unwrap();
            node.apply(WorkloadEvent::Policies {
                id: wid,
                snapshot: pb::PolicySnapshot {
                    spiffe_id: id.clone(),
                    policies: vec![pb::StoredPolicy {
                        name: "self".into(),
                        document_json: format!(
                            r#"{{"action":"ALLOW","rules":[{{"from":{{"principals":["{id}"]}}}}]}}"#
                        ),
                    }],
                    default_action: "deny".into(),
                    revision: 1,
                },
            })
            .await
            .unwrap();
        });
        id
    };

    // Memory: the first workload alone (the baseline), then the rest.
    let names: Vec<String> = (0..workloads)
        .map(|i| add_ns(&mut all, format!("tb{tag:x}m{i}")))
        .collect();
    let r0 = rss_kib();
    attach(&mut node, &names[0]);
    let r1 = rss_kib();
    for ns in &names[1..] {
        attach(&mut node, ns);
    }
    let r2 = rss_kib();
    let per = (r2.saturating_sub(r1)) as f64 / (workloads.saturating_sub(1)).max(1) as f64;
    println!("node mode, {workloads} enrolled workloads (no traffic):");
    println!(
        "  first workload (baseline, incl. one-time setup): {} KiB",
        r1.saturating_sub(r0)
    );
    println!("  per further workload: {per:.1} KiB (target < 256 KiB)");

    // Attach → first proxied connection, with an explicit outbound listener to itself.
    let mut direct = Vec::new();
    let mut first = Vec::new();
    for i in 0..attaches {
        let ns = add_ns(&mut all, format!("tb{tag:x}a{i}"));
        echo_app(&ns);
        let t0 = Instant::now();
        assert!(echo_via(&ns, 8080), "direct echo");
        direct.push(t0.elapsed());
        // This workload's controller template gains an outbound listener to its own tunnel.
        let id = format!("spiffe://example.org/w/{}", workloads + i + 1);
        let mut reg = prometheus_client::registry::Registry::default();
        let telemetry = Arc::new(Telemetry::new(&mut reg, Box::new(std::io::sink())));
        let mut t = ProxyOptions::new("127.0.0.1:15008".parse().unwrap());
        t.inbound = vec![InboundPort {
            port: 8080,
            protocol: Protocol::Tcp,
        }];
        t.outbound = vec![OutboundListener {
            listen: "127.0.0.1:9000".parse().unwrap(),
            destination: "127.0.0.1:8080".into(),
            spiffe_id: SpiffeId::parse(&id).unwrap(),
        }];
        let mut one = NodeProxy::new(t, None, telemetry);
        let t0 = Instant::now();
        let got = attach(&mut one, &ns);
        assert_eq!(got, id);
        while !echo_via(&ns, 9000) {
            assert!(t0.elapsed() < Duration::from_secs(10), "never proxied");
        }
        first.push(t0.elapsed());
        drop(one);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let (d50, f50) = (percentile(&mut direct, 0.5), percentile(&mut first, 0.5));
    let fmax = *first.iter().max().unwrap();
    println!("attach -> first proxied connection, {attaches} attaches:");
    println!(
        "  direct connect + echo in the namespace (baseline): p50 {:.3} ms",
        ms(d50)
    );
    println!(
        "  attach -> first echo through the workload's proxy:  p50 {:.3} ms  max {:.3} ms (target < 50 ms)",
        ms(f50),
        ms(fmax)
    );
    drop(node);
    drop(rt);
}
