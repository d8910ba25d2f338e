//! Network-namespace topologies for end-to-end tests: "nodes" are `ip netns` namespaces joined by
//! veth pairs to a bridge in the root namespace, addressed from 198.18.0.0/15 (RFC 2544
//! benchmarking space), with no uplink and no default route. Everything created is removed on
//! drop (namespaces, links, and with them any iptables rules inside), also when a test fails.
//!
//! Names are unique per test process and call, so tests can run in parallel.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// True when the test may use namespaces (running as root). Otherwise prints why it is skipped,
/// and panics instead when `CI=true`, so CI never skips silently.
pub fn usable(test: &str) -> bool {
    let root = nix::unistd::geteuid().is_root();
    let ip = Command::new("ip").arg("-V").output().is_ok();
    if root && ip {
        return true;
    }
    let why = if root {
        "the `ip` command (iproute2) is missing"
    } else {
        "it needs root (network namespaces, veth, iptables)"
    };
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: cannot run in CI: {why}"
    );
    eprintln!("skipping {test}: {why}");
    false
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(program: &str, args: &[&str]) -> Output {
    let o = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        o.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// One bridge and the nodes attached to it.
#[derive(Debug)]
pub struct Net {
    tag: String,
    bridge: String,
    /// (namespace, host-side veth)
    nodes: Vec<(String, String)>,
}

impl Net {
    /// A new bridge (no address, no uplink).
    pub fn new() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let tag = format!("{:x}{n}", std::process::id() & 0xfffff);
        let bridge = format!("tb{tag}");
        run("ip", &["link", "add", &bridge, "type", "bridge"]);
        run("ip", &["link", "set", &bridge, "up"]);
        Self {
            tag,
            bridge,
            nodes: Vec::new(),
        }
    }

    /// The namespace name a node `name` gets (for `netns:name:` selectors).
    pub fn ns_name(&self, name: &str) -> String {
        format!("{name}-{}", self.tag)
    }

    /// Creates namespace `name-<tag>` with `eth0` at `ip/15` on the bridge and `lo` up; returns
    /// the namespace name.
    pub fn node(&mut self, name: &str, ip: Ipv4Addr) -> String {
        let ns = self.ns_name(name);
        let idx = NEXT.fetch_add(1, Ordering::Relaxed);
        let host = format!("tv{}{idx}", self.tag);
        let peer = format!("tp{}{idx}", self.tag);
        assert!(host.len() <= 15, "interface name {host} too long");
        run("ip", &["netns", "add", &ns]);
        self.nodes.push((ns.clone(), host.clone()));
        run(
            "ip",
            &["link", "add", &host, "type", "veth", "peer", "name", &peer],
        );
        run("ip", &["link", "set", &peer, "netns", &ns]);
        run("ip", &["link", "set", &host, "master", &self.bridge]);
        run("ip", &["link", "set", &host, "up"]);
        let cidr = format!("{ip}/15");
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "set", &peer, "name", "eth0"],
            vec!["addr", "add", &cidr, "dev", "eth0"],
            vec!["link", "set", "eth0", "up"],
        ] {
            let mut full = vec!["netns", "exec", &ns, "ip"];
            full.extend(args);
            run("ip", &full);
        }
        ns
    }

    /// Adds `ip/64` to a node's `eth0` (from 2001:2::/48, RFC 5180's benchmarking range, the
    /// IPv6 counterpart of 198.18.0.0/15), usable at once (`nodad`: no duplicate address
    /// detection delay); no route beyond the link.
    pub fn add_v6(&self, ns: &str, ip: Ipv6Addr) {
        let cidr = format!("{ip}/64");
        run(
            "ip",
            &[
                "netns", "exec", ns, "ip", "-6", "addr", "add", &cidr, "dev", "eth0", "nodad",
            ],
        );
    }

    /// The root-namespace side of a node's veth (for a capture).
    pub fn host_veth(&self, ns: &str) -> Option<&str> {
        self.nodes
            .iter()
            .find(|(n, _)| n == ns)
            .map(|(_, h)| h.as_str())
    }

    /// Deletes a node: its namespace and its link.
    pub fn remove_node(&mut self, ns: &str) {
        if let Some(i) = self.nodes.iter().position(|(n, _)| n == ns) {
            let (ns, host) = self.nodes.remove(i);
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            let _ = Command::new("ip").args(["link", "del", &host]).output();
        }
    }

    /// `ip netns exec <ns> <program>`.
    pub fn exec(ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }
}

impl Default for Net {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for (ns, host) in self.nodes.drain(..) {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            let _ = Command::new("ip").args(["link", "del", &host]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`: sockets it creates belong to
/// that namespace for their whole life, wherever they are used afterwards.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let fd = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .unwrap_or_else(|e| panic!("setns {path}: {e}"));
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Whether the peer closed `live` (end of stream or a reset) on the next read. A read that
/// times out, or data, is not a close: a test that treated a timeout as a close would pass
/// when nothing was closed at all.
pub fn closed_by_peer(live: &mut std::net::TcpStream) -> bool {
    use std::io::{ErrorKind, Read as _};
    let mut b = [0u8; 64];
    match live.read(&mut b) {
        Ok(n) => n == 0,
        Err(e) => matches!(
            e.kind(),
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
        ),
    }
}
