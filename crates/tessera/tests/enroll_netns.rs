//! Node-mode enrollment on the agent's admin socket, with `tessera server`, `tessera agent` and
//! `tessera workload` as processes and real network namespaces: a workload is attached by its
//! namespace (SCM_RIGHTS) and gets the SVIDs of the entries its `netns:name:` (and `attach:`)
//! selectors match, with keys of its own; a caller cannot claim attested selectors; a file that
//! is not a network namespace is refused; the socket is 0600; detach removes the workload; an
//! agent restart keeps the workloads whose namespace still exists and drops the others.
//!
//! Needs root (CI runs as root); skipped with a reason otherwise, failing instead under CI=true.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Output;

use support::netns::{ControlPlane, tessera, wait_until};
use tessera_test_util::netns::{Net, usable};

fn workload(cp: &ControlPlane, args: &[&str]) -> Output {
    workload_at(&cp.agent_admin, args)
}

fn workload_at(socket: &std::path::Path, args: &[&str]) -> Output {
    tessera()
        .arg("workload")
        .args(args)
        .args(["--output", "json"])
        .env("TESSERA_AGENT_ADMIN_SOCKET", socket)
        .output()
        .unwrap()
}

fn node_proxy_entry(cp: &ControlPlane, parent: &str) {
    support::netns::cli(
        &cp.admin,
        &[
            "entry",
            "create",
            "--spiffe-id",
            support::netns::NODE_PROXY_ID,
            "--parent-id",
            parent,
            "--selector",
            &format!("unix:path:{}", env!("CARGO_BIN_EXE_tessera")),
        ],
    );
}

/// `tessera proxy --node --transparent --inbound 8080` following the agent at `admin`, its
/// access log at `log`; bar's address is in its config file's destination map when
/// `bar_in_file`. Also returns its health endpoint's address.
fn node_proxy(
    cp: &ControlPlane,
    name: &str,
    admin: &std::path::Path,
    log: &std::path::Path,
    bar_in_file: bool,
) -> (support::netns::Proc, std::net::SocketAddr) {
    let health = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = cp.path(&format!("{name}.toml"));
    let map = if bar_in_file {
        "[[destination]]\ncidr = \"198.18.0.2/32\"\nspiffe_id = \"spiffe://example.org/bar\"\n"
    } else {
        ""
    };
    std::fs::write(&cfg, map).unwrap();
    let proc = support::netns::Proc(
        tessera()
            .args([
                "proxy",
                "--node",
                "--transparent",
                "--inbound",
                "8080",
                "--log-level",
                "info",
            ])
            .arg("--agent-admin-socket")
            .arg(admin)
            .arg("--config")
            .arg(&cfg)
            .arg("--access-log")
            .arg(log)
            .args(["--health-bind-address", &health.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(cp.path(&format!("{name}.stderr"))).unwrap())
            .spawn()
            .unwrap(),
    );
    (proc, health)
}

/// `tessera healthcheck --address health`: whether the process says it is ready.
fn ready(health: std::net::SocketAddr) -> bool {
    tessera()
        .args(["healthcheck", "--address", &health.to_string()])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `tessera policy apply`: bar admits foo on port 8080.
fn allow_foo_to_bar(cp: &ControlPlane) {
    let policy = cp.path("bar-policy.yaml");
    std::fs::write(
        &policy,
        "name: bar-from-foo\naction: ALLOW\ntargets: [\"spiffe://example.org/bar\"]\nrules: [{from: {principals: [\"spiffe://example.org/foo\"]}, to: {ports: [8080]}}]\n",
    )
    .unwrap();
    support::netns::cli(
        &cp.admin,
        &["policy", "apply", "-f", policy.to_str().unwrap()],
    );
}

fn ok(o: Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

fn refused(o: Output) -> String {
    assert!(
        !o.status.success(),
        "accepted: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn listed(cp: &ControlPlane) -> Vec<serde_json::Value> {
    ok(workload(cp, &["list"]))["workloads"]
        .as_array()
        .unwrap()
        .clone()
}

fn svids_of(cp: &ControlPlane, id: &str) -> Vec<(String, String)> {
    listed(cp)
        .iter()
        .find(|w| w["id"] == id)
        .map(|w| {
            w["svids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| {
                    (
                        s["spiffe_id"].as_str().unwrap().to_owned(),
                        s["key_sha256"].as_str().unwrap().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn workloads_are_attached_by_namespace_with_keys_of_their_own() {
    if !usable("workloads_are_attached_by_namespace_with_keys_of_their_own") {
        return;
    }
    let mut cp = ControlPlane::start();
    let mut net = Net::new();
    let w1 = net.node("w1", Ipv4Addr::new(198, 18, 0, 1));
    let w2 = net.node("w2", Ipv4Addr::new(198, 18, 0, 2));
    let gone = net.node("gone", Ipv4Addr::new(198, 18, 0, 3));
    // web: any workload in w1 or w2's namespaces... one entry per namespace, plus one that
    // needs an attach: selector too.
    cp.entry("web", &w1, &[]);
    cp.entry("web", &w2, &[]);
    cp.entry("api", &w2, &["--selector", "attach:app:api"]);
    cp.entry("gone", &gone, &[]);

    // The socket is root's alone.
    let mode = std::fs::metadata(&cp.agent_admin)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);

    let a1 = ok(workload(
        &cp,
        &["attach", "--netns", &format!("/run/netns/{w1}")],
    ));
    let id1 = a1["workload"]["id"].as_str().unwrap().to_owned();
    assert_eq!(a1["workload"]["netns"], w1.as_str());
    let a2 = ok(workload(
        &cp,
        &[
            "attach",
            "--netns",
            &format!("/run/netns/{w2}"),
            "--selector",
            "attach:app:api",
        ],
    ));
    let id2 = a2["workload"]["id"].as_str().unwrap().to_owned();
    assert_ne!(id1, id2);
    let a3 = ok(workload(
        &cp,
        &["attach", "--netns", &format!("/run/netns/{gone}")],
    ));
    let id3 = a3["workload"]["id"].as_str().unwrap().to_owned();

    // SVIDs for the matching entries, each workload with keys of its own.
    wait_until("the enrolled workloads' SVIDs", 20, || {
        svids_of(&cp, &id1).len() == 1 && svids_of(&cp, &id2).len() == 2
    });
    let s1 = svids_of(&cp, &id1);
    let s2 = svids_of(&cp, &id2);
    assert_eq!(s1[0].0, "spiffe://example.org/web");
    let mut ids2: Vec<&str> = s2.iter().map(|s| s.0.as_str()).collect();
    ids2.sort_unstable();
    assert_eq!(
        ids2,
        ["spiffe://example.org/api", "spiffe://example.org/web"]
    );
    let web2 = s2.iter().find(|s| s.0.ends_with("/web")).unwrap();
    assert_ne!(s1[0].1, web2.1, "two workloads of one identity share a key");
    assert_ne!(s2[0].1, s2[1].1);

    // A caller cannot claim what the agent attests; a non-network-namespace is refused.
    let e = refused(workload(
        &cp,
        &[
            "attach",
            "--netns",
            &format!("/run/netns/{w1}"),
            "--selector",
            "unix:uid:0",
        ],
    ));
    assert!(e.contains("only attach: selectors"), "{e}");
    let e = refused(workload(&cp, &["attach", "--netns", "/proc/self/ns/mnt"]));
    assert!(e.contains("not a network namespace"), "{e}");
    let e = refused(workload(&cp, &["attach", "--netns", "/proc/self/status"]));
    assert!(e.contains("not a namespace"), "{e}");
    let e = refused(workload(&cp, &["detach", "--workload", "w-nope"]));
    assert!(e.contains("no enrolled workload"), "{e}");
    assert_eq!(listed(&cp).len(), 3);

    // The delegated identity stream (it carries keys) is refused to a caller that is not an
    // authorized delegate: this test process is attested, and it is not the node proxy.
    {
        use std::io::{Read as _, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(&cp.agent_admin).unwrap();
        let body = br#"{"op":"watch"}"#;
        s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
        s.write_all(body).unwrap();
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut answer = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut answer).unwrap();
        let answer: serde_json::Value = serde_json::from_slice(&answer).unwrap();
        assert_eq!(answer["ok"], false);
        assert!(
            answer["error"]
                .as_str()
                .unwrap()
                .contains("not an authorized delegate"),
            "{answer}"
        );
    }
    // From inside w1's namespace, the Workload API gives w1's identity only (never w2's api).
    let o = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &w1,
            env!("CARGO_BIN_EXE_tessera"),
            "agent",
            "api",
            "fetch",
            "x509",
        ])
        .arg("--socket")
        .arg(format!("unix://{}", cp.socket.display()))
        .output()
        .unwrap();
    let fetched =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(fetched.contains("spiffe://example.org/web"), "{fetched}");
    assert!(!fetched.contains("spiffe://example.org/api"), "{fetched}");

    // Detach.
    ok(workload(&cp, &["detach", "--workload", &id1]));
    assert!(listed(&cp).iter().all(|w| w["id"] != id1.as_str()));

    // An agent restart: w2 is restored (same ID), the deleted namespace is dropped.
    net.remove_node(&gone);
    cp.restart_agent();
    let after = listed(&cp);
    let ids: Vec<&str> = after.iter().map(|w| w["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id2.as_str()], "after the restart: {after:?}");
    assert!(!ids.contains(&id3.as_str()));
    wait_until("the restored workload's SVIDs", 20, || {
        svids_of(&cp, &id2).len() == 2
    });
}

/// Node mode end to end with two nodes: agent A enrolls foo and baz, agent B enrolls bar
/// (`tessera workload attach`); one `tessera proxy --node --transparent` per node (its agent's
/// authorized delegate) serves that node's workloads inside their namespaces from the
/// delegated identity stream. foo reaches bar straight at
/// bar's address (intercepted in foo's namespace, mutual TLS with foo's key), baz is denied by
/// the policy created with `tessera policy`, detaching bar closes a live connection, and the
/// IP-reuse attack fails: with foo detached and deleted, a new workload at foo's address and
/// the server stopped, it is baz, never foo.
#[test]
fn a_node_proxy_serves_enrolled_workloads_by_identity() {
    use std::io::{Read as _, Write as _};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;
    if !usable("a_node_proxy_serves_enrolled_workloads_by_identity") {
        return;
    }
    let mut cp = ControlPlane::start();
    let mut net = Net::new();
    let foo = net.node("foo", Ipv4Addr::new(198, 18, 0, 1));
    let bar = net.node("bar", Ipv4Addr::new(198, 18, 0, 2));
    let baz = net.node("baz", Ipv4Addr::new(198, 18, 0, 3));
    let reuse = net.ns_name("reuse");
    // Node A (the control plane's agent): foo, baz. Node B (a second agent): bar.
    let node_b = cp.add_agent("b");
    cp.entry("foo", &foo, &[]);
    cp.entry("baz", &baz, &[]);
    cp.entry("baz", &reuse, &[]);
    let create_bar = || {
        let o = support::netns::cli(
            &cp.admin,
            &[
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/bar",
                "--parent-id",
                &node_b.agent_id,
                "--selector",
                &format!("netns:name:{bar}"),
            ],
        );
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        text.lines()
            .find_map(|l| l.strip_prefix("Entry ID      : "))
            .unwrap()
            .trim()
            .to_owned()
    };
    let bar_entry = create_bar();
    node_proxy_entry(&cp, &cp.agent_id);
    node_proxy_entry(&cp, &node_b.agent_id);
    allow_foo_to_bar(&cp);
    let app = support::netns::App::start(&bar, Ipv4Addr::LOCALHOST, 8080);
    let log = cp.path("node-a.access.log");
    let log_b = cp.path("node-b.access.log");
    // Node A maps bar's address through the server's destination map only (pushed by the
    // agent's node stream), node B through its config file.
    let (_node_a, _) = node_proxy(&cp, "node-a", &cp.agent_admin, &log, false);
    let (_node_b, _) = node_proxy(&cp, "node-b", &node_b.admin, &log_b, true);
    let mut ids = std::collections::BTreeMap::new();
    for (ns, admin) in [
        (&foo, &cp.agent_admin),
        (&bar, &node_b.admin),
        (&baz, &cp.agent_admin),
    ] {
        let a = ok(workload_at(
            admin,
            &["attach", "--netns", &format!("/run/netns/{ns}")],
        ));
        ids.insert(ns.clone(), a["workload"]["id"].as_str().unwrap().to_owned());
    }
    let bar_app = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 2), 8080));
    let exchange = |ns: &str, payload: &[u8]| -> Option<Vec<u8>> {
        tessera_test_util::netns::in_netns(ns, || {
            let mut s = TcpStream::connect_timeout(&bar_app, Duration::from_secs(5)).ok()?;
            s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
            s.write_all(payload).ok()?;
            let mut b = vec![0u8; payload.len()];
            s.read_exact(&mut b).ok()?;
            Some(b)
        })
    };
    // Inbound records of bar are node B's.
    let records = || -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&log_b).unwrap_or_default();
        let complete = text.rfind('\n').map_or("", |e| &text[..e]).to_owned();
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    // Unmapped at node A until the server's map names bar's address (a change the agent
    // pushes to the node proxy after its workloads are attached).
    wait_until("node A's refusal of an unmapped destination", 30, || {
        exchange(&foo, b"unmapped").is_none()
            && std::fs::read_to_string(&log).is_ok_and(|t| {
                t.contains("\"direction\":\"passthrough\"") && t.contains("198.18.0.2:8080")
            })
    });
    assert!(!app.saw(b"unmapped"));
    support::netns::cli(
        &cp.admin,
        &[
            "destination",
            "create",
            "bar",
            "--cidr",
            "198.18.0.2/32",
            "--spiffe-id",
            "spiffe://example.org/bar",
        ],
    );
    wait_until("foo to reach bar through the node proxy", 30, || {
        exchange(&foo, b"hello").as_deref() == Some(&b"hello"[..])
    });
    let mut rec = serde_json::Value::Null;
    wait_until("bar's allow record", 10, || {
        rec = records()
            .into_iter()
            .find(|r| r["direction"] == "inbound" && r["decision"] == "allow")
            .unwrap_or(serde_json::Value::Null);
        !rec.is_null()
    });
    assert_eq!(rec["src_spiffe_id"], "spiffe://example.org/foo");
    assert_eq!(rec["dst_spiffe_id"], "spiffe://example.org/bar");
    assert!(
        rec["src_addr"].as_str().unwrap().starts_with("198.18.0.1:"),
        "{rec}"
    );
    // baz, a workload of node A like foo, is denied by identity.
    assert_eq!(exchange(&baz, b"baz"), None);
    wait_until("bar's denial of baz", 10, || {
        records().iter().any(|r| {
            r["direction"] == "inbound"
                && r["decision"] == "deny"
                && r["src_spiffe_id"] == "spiffe://example.org/baz"
        })
    });

    // Detaching bar closes a live connection at once.
    let mut live =
        tessera_test_util::netns::in_netns(&foo, || TcpStream::connect(bar_app).unwrap());
    live.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    live.write_all(b"live").unwrap();
    let mut b = [0u8; 4];
    live.read_exact(&mut b).unwrap();
    ok(workload_at(
        &node_b.admin,
        &["detach", "--workload", &ids[&bar]],
    ));
    assert!(
        tessera_test_util::netns::closed_by_peer(&mut live),
        "the live connection outlived bar's detach"
    );
    let before = app.connections();
    ok(workload_at(
        &node_b.admin,
        &["attach", "--netns", &format!("/run/netns/{bar}")],
    ));
    wait_until("bar re-attached as a new workload", 30, || {
        exchange(&foo, b"again").as_deref() == Some(&b"again"[..])
    });
    assert!(app.connections() > before);

    // Deleting bar's only entry takes its identity away on its node at once: the node proxy
    // stops serving it (live connections close, nothing more is admitted), as on a detach.
    // Recreating the entry serves it again, with no new attach.
    let mut live =
        tessera_test_util::netns::in_netns(&foo, || TcpStream::connect(bar_app).unwrap());
    live.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    live.write_all(b"live").unwrap();
    live.read_exact(&mut b).unwrap();
    support::netns::cli(&cp.admin, &["entry", "delete", "--id", &bar_entry]);
    assert!(
        tessera_test_util::netns::closed_by_peer(&mut live),
        "a live connection outlived the deletion of bar's entry"
    );
    assert_eq!(exchange(&foo, b"gone"), None);
    create_bar();
    wait_until("bar served again once its entry is back", 30, || {
        exchange(&foo, b"back").as_deref() == Some(&b"back"[..])
    });

    // The IP-reuse attack: foo detached and gone, a new workload at foo's address, the
    // server stopped. It is baz (its own entry), never foo.
    ok(workload(&cp, &["detach", "--workload", &ids[&foo]]));
    net.remove_node(&foo);
    assert_eq!(net.node("reuse", Ipv4Addr::new(198, 18, 0, 1)), reuse);
    ok(workload(
        &cp,
        &["attach", "--netns", &format!("/run/netns/{reuse}")],
    ));
    // Its SVID (baz's) is signed while the server is up; then the control plane goes away.
    // (A workload attached while the server is down gets no SVID at all: its keys are its
    // own, signed at attach.)
    let reuser = listed(&cp)
        .into_iter()
        .find(|w| w["netns"] == reuse.as_str())
        .unwrap();
    let reuser_id = reuser["id"].as_str().unwrap().to_owned();
    wait_until("the reuser's SVID", 20, || {
        svids_of(&cp, &reuser_id).len() == 1
    });
    assert_eq!(svids_of(&cp, &reuser_id)[0].0, "spiffe://example.org/baz");
    cp.server.take();
    let n_before = app.connections();
    wait_until(
        "the reuser's denial, as baz, from foo's address",
        30,
        || {
            let _ = exchange(&reuse, b"i-am-foo");
            records().iter().any(|r| {
                r["direction"] == "inbound"
                    && r["decision"] == "deny"
                    && r["src_spiffe_id"] == "spiffe://example.org/baz"
                    && r["src_addr"]
                        .as_str()
                        .is_some_and(|a| a.starts_with("198.18.0.1:"))
            })
        },
    );
    assert_eq!(
        app.connections(),
        n_before,
        "the reuser reached bar's application"
    );
    assert!(!app.saw(b"i-am-foo"));
}

/// An upgrade of the node proxy, as processes: a second `tessera proxy --node` starts and binds
/// the same listeners in every workload's namespace (SO_REUSEPORT), the old one gets SIGTERM
/// and drains. A client that opens connections in a loop all the while sees no refused, reset
/// or failed connection; a connection opened before the upgrade keeps working until it is
/// closed; then the old process exits and the new one carries the traffic. A crash of the node
/// proxy then leaves the interception rules in place: traffic fails closed.
#[test]
fn a_node_proxy_upgrade_refuses_and_resets_nothing() {
    use std::io::{Read as _, Write as _};
    use std::net::{SocketAddr, TcpStream};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::{Duration, Instant};
    if !usable("a_node_proxy_upgrade_refuses_and_resets_nothing") {
        return;
    }
    let cp = ControlPlane::start();
    let mut net = Net::new();
    let foo = net.node("foo", Ipv4Addr::new(198, 18, 0, 1));
    let bar = net.node("bar", Ipv4Addr::new(198, 18, 0, 2));
    // One node: foo and bar both enrolled with the control plane's agent.
    cp.entry("foo", &foo, &[]);
    cp.entry("bar", &bar, &[]);
    node_proxy_entry(&cp, &cp.agent_id);
    allow_foo_to_bar(&cp);
    let app = support::netns::App::start(&bar, Ipv4Addr::LOCALHOST, 8080);
    let old_log = cp.path("old.access.log");
    let new_log = cp.path("new.access.log");
    let (mut old, old_health) = node_proxy(&cp, "old", &cp.agent_admin, &old_log, true);
    for ns in [&foo, &bar] {
        ok(workload(
            &cp,
            &["attach", "--netns", &format!("/run/netns/{ns}")],
        ));
    }
    wait_until("the old process to be ready", 30, || ready(old_health));
    let bar_app = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 2), 8080));
    wait_until("foo to reach bar through the old node proxy", 30, || {
        echoed(&foo, bar_app, b"hello").is_ok()
    });
    let mut live =
        tessera_test_util::netns::in_netns(&foo, || TcpStream::connect(bar_app).unwrap());
    live.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let roundtrip = |s: &mut TcpStream, msg: &[u8]| {
        s.write_all(msg).unwrap();
        let mut b = vec![0u8; msg.len()];
        s.read_exact(&mut b).unwrap();
        assert_eq!(b, msg);
    };
    roundtrip(&mut live, b"before the upgrade");

    // The client: one connection after another from foo, every failure recorded.
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let client = {
        let (stop, done, failures, foo) =
            (stop.clone(), done.clone(), failures.clone(), foo.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                match echoed(&foo, bar_app, format!("upgrade-{i}").as_bytes()) {
                    Ok(()) => {
                        done.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => failures
                        .lock()
                        .unwrap()
                        .push(format!("connection {i}: {e}")),
                }
            }
        })
    };
    wait_until("connections before the upgrade", 20, || {
        done.load(Ordering::SeqCst) >= 20
    });
    let (mut new, new_health) = node_proxy(&cp, "new", &cp.agent_admin, &new_log, true);
    let carried = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"decision\":\"allow\""))
            .count()
    };
    // The new process is ready once it has bound every workload's listeners (SO_REUSEPORT
    // spreads new connections over both processes from then on); only then is the old one
    // stopped, as a DaemonSet's readiness gate would. Before, a workload's ports may be the old
    // process's alone (a failure of an earlier run of this test: bar's were, when foo's alone
    // carried a connection of the new process).
    wait_until("the new process to be ready", 30, || ready(new_health));
    wait_until("the new process to carry connections", 30, || {
        carried(&new_log) > 0
    });
    let term = std::process::Command::new("kill")
        .args(["-TERM", &old.0.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    wait_until(
        "the old process to say it is not ready (draining)",
        10,
        || !ready(old_health),
    );
    let at_term = done.load(Ordering::SeqCst);
    // The connection from before the upgrade is the old process's to finish.
    std::thread::sleep(Duration::from_millis(500));
    roundtrip(&mut live, b"while the old process drains");
    wait_until(
        "connections after the old process stopped accepting",
        30,
        || done.load(Ordering::SeqCst) >= at_term + 200,
    );
    assert!(
        old.0.try_wait().unwrap().is_none(),
        "the old process exited with a connection open"
    );
    drop(live);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = old.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the old process did not exit after its last connection closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the old process exited with {status}");
    let new_before = carried(&new_log);
    let after_exit = done.load(Ordering::SeqCst);
    wait_until("connections after the old process exited", 30, || {
        done.load(Ordering::SeqCst) >= after_exit + 100
    });
    stop.store(true, Ordering::SeqCst);
    client.join().unwrap();
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} connections failed across the upgrade, first: {:?}",
        failures.len(),
        done.load(Ordering::SeqCst) + failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(carried(&new_log) >= new_before + 100);
    assert!(app.saw(b"while the old process drains"));
    // The node proxy's metrics count what it carried.
    let (_, metrics) = tessera_test_util::http::get(new_health, "/metrics").unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("tessera_proxy_connections_total{")
                && l.contains("decision=\"allow\"")
                && l.rsplit(' ')
                    .next()
                    .and_then(|n| n.parse::<f64>().ok())
                    .is_some_and(|n| n >= 100.0)),
        "{metrics}"
    );

    // A crash of the (new) node proxy leaves the interception rules in both namespaces, so
    // traffic fails closed instead of leaving in plaintext: `exposed` listens on bar's own
    // address, where a connection from foo would arrive if either namespace's rules were gone.
    new.0.kill().unwrap();
    new.0.wait().unwrap();
    let exposed = support::netns::App::start(&bar, Ipv4Addr::new(198, 18, 0, 2), 8081);
    let exposed_addr = SocketAddr::from((Ipv4Addr::new(198, 18, 0, 2), 8081));
    let before = app.connections();
    assert!(
        echoed(&foo, bar_app, b"after-the-crash").is_err(),
        "foo reached bar with no proxy"
    );
    assert!(
        echoed(&foo, exposed_addr, b"after-the-crash").is_err(),
        "foo reached bar's address in plaintext"
    );
    assert_eq!(
        app.connections(),
        before,
        "a connection reached bar's application"
    );
    assert_eq!(
        exposed.connections(),
        0,
        "a plaintext connection reached bar"
    );
    eprintln!(
        "upgrade: {} connections, none failed; old process carried {}, new {}",
        done.load(Ordering::SeqCst),
        carried(&old_log),
        carried(&new_log)
    );
}

/// One connection from inside `ns` to `to` (`support::netns::exchange`): Ok only when the whole
/// payload came back.
fn echoed(ns: &str, to: std::net::SocketAddr, payload: &[u8]) -> Result<(), String> {
    match support::netns::exchange(ns, to, payload) {
        Ok(back) if back == payload => Ok(()),
        Ok(back) => Err(format!(
            "{} bytes came back instead of the echo",
            back.len()
        )),
        Err(e) => Err(e.to_string()),
    }
}
