//! Authorization policy end to end between network namespaces, through `tessera server`,
//! `tessera agent` and two `tessera proxy` processes (foo → bar), with the server restarted
//! between the steps (the agent resumes its Sync stream; proxies keep their PolicyWatch stream):
//!
//! - the trust domain's default (deny) refuses foo; an ALLOW change admits a new connection;
//! - an HTTP route rule admits GET /public and refuses POST /admin with 403 (the application
//!   never sees it);
//! - a new DENY closes a live connection at bar's proxy, with a log line naming the policy;
//! - a CUSTOM policy: an external authorizer (implemented here, inside bar's namespace) decides,
//!   and its outage fails closed;
//! - a policy set synced from an HTTP source in the test (`[[policy.sync]]`): applied, updated
//!   (a synced DENY closes a live connection), a bad document refused whole and shown by
//!   `tessera policy sync status` while the last good set stays, manual changes refused, and
//!   a change at the source applied after two server restarts.
//!
//! Needs root (CI runs as root); skipped with a reason otherwise, failing instead under CI=true.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use support::netns::{
    App, ControlPlane, Proxy, cli, exchange, http, http_app, live_echo,
    public_get_passes_admin_post_does_not, s, wait_until,
};
use tessera_proto::xds::envoy::service::auth::v3 as auth;
use tessera_proto::xds::google::rpc::Status;
use tessera_test_util::netns::{Net, closed_by_peer, in_netns, usable};

const FOO_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const BAR_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const TCP_PORT: u16 = 8080;
const HTTP_PORT: u16 = 8081;
const AUTHZ_PORT: u16 = 9191;

/// An external authorizer (Envoy's `Authorization/Check`) whose answer a switch decides; it
/// records the principals it was shown.
#[derive(Clone, Default)]
struct SwitchAuthorizer {
    allow: Arc<AtomicBool>,
    calls: Arc<AtomicUsize>,
    last: Arc<std::sync::Mutex<(String, String)>>,
}

#[tonic::async_trait]
impl auth::authorization_server::Authorization for SwitchAuthorizer {
    async fn check(
        &self,
        req: tonic::Request<auth::CheckRequest>,
    ) -> Result<tonic::Response<auth::CheckResponse>, tonic::Status> {
        let a = req.into_inner().attributes.unwrap_or_default();
        *self.last.lock().unwrap() = (
            a.source.unwrap_or_default().principal,
            a.destination.unwrap_or_default().principal,
        );
        self.calls.fetch_add(1, Ordering::SeqCst);
        // google.rpc.Code: 0 OK, 7 PERMISSION_DENIED.
        let code = if self.allow.load(Ordering::SeqCst) {
            0
        } else {
            7
        };
        Ok(tonic::Response::new(auth::CheckResponse {
            status: Some(Status {
                code,
                ..Default::default()
            }),
        }))
    }
}

/// Serves `a` on 127.0.0.1:AUTHZ_PORT inside `ns` until the returned runtime is dropped.
fn start_authorizer(ns: &str, a: SwitchAuthorizer) -> tokio::runtime::Runtime {
    let l = in_netns(ns, || {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, AUTHZ_PORT)).unwrap();
        l.set_nonblocking(true).unwrap();
        l
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(l).unwrap();
        tonic::transport::Server::builder()
            .add_service(auth::authorization_server::AuthorizationServer::new(a))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await
    });
    rt
}

fn apply(cp: &ControlPlane, name: &str, yaml: &str) {
    let p = cp.path(name);
    std::fs::write(&p, yaml).unwrap();
    cli(&cp.admin, &["policy", "apply", "-f", p.to_str().unwrap()]);
}

/// Waits until a change made now reaches `proxy` through the agent: after a server restart the
/// agent reconnects its Sync stream with backoff (up to 10 s), and a step that times a policy
/// push must not time that wait. The marker is an AUDIT policy for a port nothing uses.
fn agent_back(cp: &ControlPlane, proxy: &Proxy, marker: &str) {
    let updates = || {
        proxy
            .stderr()
            .matches("authorization policy updated")
            .count()
    };
    let before = updates();
    apply(
        cp,
        &format!("{marker}.yaml"),
        &format!(
            "name: {marker}\naction: AUDIT\nrules:\n  - from: {{principals: [\"spiffe://example.org/nobody\"]}}\n    to: {{ports: [1]}}\n"
        ),
    );
    wait_until(
        &format!("the marker policy {marker} to reach the proxy"),
        30,
        || updates() > before,
    );
}

/// Whether foo gets its payload echoed by bar's TCP application (through both proxies).
fn foo_reaches_bar(foo_ns: &str) -> bool {
    exchange(foo_ns, "127.0.0.1:9000".parse().unwrap(), b"ping").is_ok_and(|b| b == b"ping")
}

#[test]
fn policy_changes_reach_live_connections_through_restarts() {
    if !usable("policy_changes_reach_live_connections_through_restarts") {
        return;
    }
    let mut cp = ControlPlane::start();
    let mut net = Net::new();
    let foo = net.node("foo", FOO_IP);
    let bar = net.node("bar", BAR_IP);
    cp.entry("foo", &foo, &[]);
    cp.entry("bar", &bar, &[]);
    let app = App::start(&bar, Ipv4Addr::LOCALHOST, TCP_PORT);
    let http_seen = http_app(&bar, HTTP_PORT);
    let bar_cfg = cp.path("bar-proxy.toml");
    std::fs::write(
        &bar_cfg,
        format!(
            "[[authz_provider]]\nname = \"ext\"\naddress = \"127.0.0.1:{AUTHZ_PORT}\"\ntimeout_ms = 5000\n"
        ),
    )
    .unwrap();
    // No `--policy`: bar takes its policies from the agent (PolicyWatch).
    let bar_proxy = Proxy::start(
        &cp,
        &bar,
        "bar",
        &s(&[
            "--config",
            bar_cfg.to_str().unwrap(),
            "--inbound",
            "8080",
            "--inbound",
            "8081:http",
        ]),
    );
    let _foo_proxy = Proxy::start(
        &cp,
        &foo,
        "foo",
        &s(&[
            "--outbound",
            "127.0.0.1:9000=198.18.0.2:8080,spiffe://example.org/bar",
            "--outbound",
            "127.0.0.1:9001=198.18.0.2:8081,spiffe://example.org/bar",
        ]),
    );

    // 1. The trust domain's default is deny: no policy, no connection.
    assert!(!foo_reaches_bar(&foo), "default deny let foo through");
    let before = app.connections();

    // 2. An ALLOW change admits a new connection; an HTTP route rule on the HTTP port.
    apply(
        &cp,
        "allow.yaml",
        r#"
- name: foo-to-bar
  action: ALLOW
  rules:
    - from: {principals: ["spiffe://example.org/foo"]}
      to: {ports: [8080]}
- name: http-public
  action: ALLOW
  rules:
    - from: {principals: ["spiffe://example.org/foo"]}
      to: {ports: [8081], methods: [GET], paths: ["/public*"]}
"#,
    );
    wait_until("the ALLOW to admit foo", 15, || foo_reaches_bar(&foo));
    assert!(app.connections() > before);

    let http_to = "127.0.0.1:9001".parse().unwrap();
    public_get_passes_admin_post_does_not(&foo, http_to, &http_seen);
    bar_proxy.wait_record("bar's 403 record", |r| {
        r["kind"] == "http_request"
            && r["path"] == "/admin"
            && r["decision"] == "deny"
            && r["src_spiffe_id"] == "spiffe://example.org/foo"
    });

    // 3. Through a server restart: a new DENY closes a live connection.
    cp.restart_server();
    agent_back(&cp, &bar_proxy, "after-restart-1");
    let mut live = live_echo(&foo, "127.0.0.1:9000".parse().unwrap());
    let t0 = Instant::now();
    apply(
        &cp,
        "deny.yaml",
        r#"
name: no-foo-tcp
action: DENY
rules:
  - from: {principals: ["spiffe://example.org/foo"]}
    to: {ports: [8080]}
"#,
    );
    let closed = closed_by_peer(&mut live);
    let closed_after = t0.elapsed();
    assert!(
        closed,
        "the live connection was answered or timed out, not closed"
    );
    eprintln!("policy apply (CLI process) -> live connection closed: {closed_after:?}");
    // Bound for a debug build on a busy CI machine, CLI process included; the benchmark
    // (BENCHMARKS.md) measures the p99 of this path in a release build.
    assert!(
        closed_after < Duration::from_secs(3),
        "closed after {closed_after:?}"
    );
    wait_until("bar's log line naming the closing policy", 10, || {
        let e = bar_proxy.stderr();
        e.contains("closing a live connection that policy now denies") && e.contains("no-foo-tcp")
    });
    // Its access record ends in the deny that closed it, naming what had admitted it.
    bar_proxy.wait_record("bar's record of the closed connection", |r| {
        r["decision"] == "deny"
            && r["reason"].as_str().is_some_and(|s| {
                s.starts_with("closed by re-authorization")
                    && s.contains("no-foo-tcp")
                    && s.contains("(admitted: allowed by policy foo-to-bar")
            })
    });
    assert!(!foo_reaches_bar(&foo), "a new connection passed the DENY");
    // The HTTP port is not covered by the DENY.
    assert_eq!(http(&foo, http_to, "GET", "/public").unwrap().0, 200);

    // 4. Through another restart: a CUSTOM policy's external authorizer decides.
    cp.restart_server();
    agent_back(&cp, &bar_proxy, "after-restart-2");
    cli(&cp.admin, &["policy", "delete", "no-foo-tcp"]);
    wait_until("the DENY's deletion to admit foo again", 15, || {
        foo_reaches_bar(&foo)
    });
    let authz = SwitchAuthorizer::default();
    let rt = start_authorizer(&bar, authz.clone());
    apply(
        &cp,
        "custom.yaml",
        r#"
name: ext-check
action: CUSTOM
provider: ext
rules:
  - to: {ports: [8080]}
"#,
    );
    // The authorizer says no (its switch starts off): once the policy arrives, foo is refused.
    wait_until("the CUSTOM policy to refuse foo", 15, || {
        !foo_reaches_bar(&foo)
    });
    assert!(authz.calls.load(Ordering::SeqCst) > 0);
    bar_proxy.wait_record("bar's CUSTOM denial", |r| {
        r["decision"] == "deny"
            && r["reason"]
                .as_str()
                .is_some_and(|s| s.contains("CUSTOM policy ext-check"))
    });
    authz.allow.store(true, Ordering::SeqCst);
    assert!(
        foo_reaches_bar(&foo),
        "the authorizer allowed; the proxy did not"
    );
    let (src, dst) = authz.last.lock().unwrap().clone();
    assert_eq!(src, "spiffe://example.org/foo");
    assert_eq!(dst, "spiffe://example.org/bar");
    // The authorizer goes away: fail closed (the provider is not `fail_open`).
    drop(rt);
    wait_until("the authorizer's port to close", 10, || {
        in_netns(&bar, || {
            TcpStream::connect((Ipv4Addr::LOCALHOST, AUTHZ_PORT)).is_err()
        })
    });
    assert!(
        !foo_reaches_bar(&foo),
        "the authorizer's outage let foo through"
    );
    // The HTTP port is outside the CUSTOM policy's ports and unaffected.
    assert_eq!(http(&foo, http_to, "GET", "/public").unwrap().0, 200);
}

/// A policy source on loopback (plain http is allowed there): serves `doc` with its ETag and
/// answers 304 to a matching `If-None-Match`.
fn policy_source(doc: Arc<std::sync::Mutex<(String, String)>>) -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let mut buf = Vec::new();
            let mut b = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match c.read(&mut b) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&b[..n]),
                }
            }
            let req = String::from_utf8_lossy(&buf).to_ascii_lowercase();
            let (etag, body) = doc.lock().unwrap().clone();
            let tag = format!("\"{etag}\"");
            let resp = if req.contains(&format!("if-none-match: {tag}")) {
                format!("HTTP/1.1 304 Not Modified\r\nETag: {tag}\r\nConnection: close\r\n\r\n")
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nETag: {tag}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            };
            let _ = c.write_all(resp.as_bytes());
        }
    });
    port
}

const SYNC_ALLOW: &str = "- name: foo-to-bar\n  action: ALLOW\n  rules: [{from: {principals: [\"spiffe://example.org/foo\"]}, to: {ports: [8080]}}]\n";

#[test]
fn a_synced_policy_set_governs_live_connections_through_restarts() {
    if !usable("a_synced_policy_set_governs_live_connections_through_restarts") {
        return;
    }
    let doc = Arc::new(std::sync::Mutex::new((
        "v1".to_owned(),
        SYNC_ALLOW.to_owned(),
    )));
    let port = policy_source(doc.clone());
    let mut cp = ControlPlane::start_with_config(Some(&format!(
        "[[policy.sync]]\nset = \"central\"\nurl = \"http://127.0.0.1:{port}/policies\"\ninterval = \"1s\"\n"
    )));
    let mut net = Net::new();
    let foo = net.node("foo", FOO_IP);
    let bar = net.node("bar", BAR_IP);
    cp.entry("foo", &foo, &[]);
    cp.entry("bar", &bar, &[]);
    let _app = App::start(&bar, Ipv4Addr::LOCALHOST, TCP_PORT);
    let bar_proxy = Proxy::start(&cp, &bar, "bar", &s(&["--inbound", "8080"]));
    let _foo_proxy = Proxy::start(
        &cp,
        &foo,
        "foo",
        &s(&[
            "--outbound",
            "127.0.0.1:9000=198.18.0.2:8080,spiffe://example.org/bar",
        ]),
    );
    let sync_status = |cp: &ControlPlane| {
        String::from_utf8_lossy(&cli(&cp.admin, &["policy", "sync", "status"]).stdout).into_owned()
    };

    // Applied: the synced ALLOW admits foo.
    wait_until("the synced ALLOW to admit foo", 20, || {
        foo_reaches_bar(&foo)
    });
    let list = String::from_utf8_lossy(&cli(&cp.admin, &["policy", "list"]).stdout).into_owned();
    assert!(list.contains("central/foo-to-bar"), "{list}");

    // Updated at the source: a DENY closes the live connection.
    let mut live = in_netns(&foo, || TcpStream::connect("127.0.0.1:9000").unwrap());
    live.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    live.write_all(b"live").unwrap();
    let mut b = [0u8; 4];
    live.read_exact(&mut b).unwrap();
    *doc.lock().unwrap() = (
        "v2".into(),
        format!(
            "{SYNC_ALLOW}- name: no-foo\n  action: DENY\n  rules: [{{from: {{principals: [\"spiffe://example.org/foo\"]}}}}]\n"
        ),
    );
    assert!(
        closed_by_peer(&mut live),
        "the live connection survived the synced DENY"
    );
    wait_until("bar's log line naming the synced DENY", 10, || {
        bar_proxy.stderr().contains("central/no-foo")
    });

    // Through a restart, a bad document: refused whole, shown in the status, the DENY stays.
    cp.restart_server();
    *doc.lock().unwrap() = (
        "v3".into(),
        "- name: foo-to-bar\n  action: ALLOW\n  rules: [{to: {ports: [0]}}]\n".into(),
    );
    wait_until("the bad document in the sync status", 20, || {
        sync_status(&cp).contains("rules[0].to.ports[0]")
    });
    assert!(!foo_reaches_bar(&foo), "the bad document lifted the DENY");
    let st = sync_status(&cp);
    assert!(st.contains("set central from http://127.0.0.1:"), "{st}");
    assert!(st.contains("the last good set stays in force"), "{st}");
    // A manual change to the synced set is refused.
    let o = support::netns::tessera()
        .args(["policy", "delete", "central/no-foo"])
        .env("TESSERA_ADMIN_SOCKET", &cp.admin)
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("owned by its sync source"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Through another restart, the source drops the DENY: foo is admitted again.
    cp.restart_server();
    *doc.lock().unwrap() = ("v4".into(), SYNC_ALLOW.into());
    wait_until("the DENY's removal at the source to admit foo", 20, || {
        foo_reaches_bar(&foo)
    });
    assert!(!sync_status(&cp).contains("last error"));
}
