//! `tessera proxy` flags and readiness, without namespaces: bad input is refused with an error
//! naming it, and the proxy is not ready (and serves nothing) until the Workload API gives it an
//! identity; then /ready answers 200 and /metrics carries the proxy's metrics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tessera_test_util::http::get;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

fn fails_with(args: &[&str], needle: &str) {
    let o = tessera().args(args).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{args:?} succeeded");
    assert!(err.contains(needle), "{args:?}: {err}");
}

#[test]
fn bad_flags_and_files_are_refused_with_their_name() {
    let dir = tempfile::tempdir().unwrap();
    let sock = ["proxy", "--workload-socket", "/nonexistent/agent.sock"];
    let with = |extra: &[&str]| -> Vec<String> {
        sock.iter().chain(extra).map(|s| (*s).to_owned()).collect()
    };
    let run = |extra: &[&str], needle: &str| {
        let v = with(extra);
        let refs: Vec<&str> = v.iter().map(String::as_str).collect();
        fails_with(&refs, needle);
    };
    run(&["--inbound", "80:udp"], "--inbound \"80:udp\"");
    run(&["--outbound", "127.0.0.1:9000=bar:80"], "--outbound");
    run(
        &["--outbound", "127.0.0.1:9000=bar:80,https://example.org/x"],
        "SPIFFE ID",
    );
    run(&[], "nothing to do");
    run(
        &["--inbound", "80", "--user", "no-such-user-tessera"],
        "--user: \"no-such-user-tessera\": no such user",
    );
    run(&["--inbound", "80", "--user", "0"], "must not be root");
    run(
        &["--inbound", "80", "--user", "1337:no-such-group-tessera"],
        "no such group",
    );
    run(&["--inbound", "80", "--user", "1337", "--node"], "--node");
    run(
        &["--inbound", "8080", "--inbound", "8080:http"],
        "--inbound 8080 is given more than once",
    );
    run(
        &["--inbound", "25008", "--tunnel-address", "127.0.0.1:25008"],
        "--inbound 25008: that is the tunnel's port",
    );
    // Flags that only mean something with another are refused without it.
    run(&["--inbound", "80", "--mark", "7"], "--transparent");
    run(
        &["--inbound", "80", "--agent-admin-socket", "/tmp/x.sock"],
        "--node",
    );
    // A bare word would be a tracing target and log nothing at all: refused instead.
    run(
        &["--inbound", "80", "--log-level", "bogus"],
        "log level \"bogus\": \"bogus\" is not a level",
    );
    run(
        &["--inbound", "80", "--unmapped", "passthrough"],
        "only with --transparent",
    );
    let policy = dir.path().join("p.toml");
    std::fs::write(
        &policy,
        "[[policy]]\nname = \"bad\"\naction = \"ALLOW\"\n[[policy.rules]]\nfrom = { principals = [\"spiffe://example.org/a*\"] }\n",
    )
    .unwrap();
    run(
        &["--inbound", "80", "--policy", policy.to_str().unwrap()],
        "policy \"bad\": rules[0].from.principals[0]",
    );
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[[destination]]\ncidr = \"10.0.0.1/8\"\nspiffe_id = \"spiffe://example.org/x\"\n",
    )
    .unwrap();
    run(
        &["--transparent", "--config", config.to_str().unwrap()],
        "destination[0].cidr",
    );
    fails_with(
        &[
            "proxy",
            "--inbound",
            "80",
            "--workload-socket",
            "tcp://127.0.0.1:1",
        ],
        "Unix socket",
    );
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").unwrap().uid()
}

#[test]
fn not_ready_and_not_serving_until_it_has_an_identity() {
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin/admin.sock");
    let socket = dir.path().join("agent/agent.sock");
    let _dev = Proc(
        tessera()
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
            .unwrap(),
    );
    wait_for("the agent socket", || socket.exists() && admin.exists());
    let health = free_addr();
    let tunnel = free_addr();
    let _proxy = Proc(
        tessera()
            .args(["proxy", "--inbound", "8080", "--log-level", "warn"])
            .args(["--tunnel-address", &tunnel.to_string()])
            .args(["--health-bind-address", &health.to_string()])
            .env(
                "SPIFFE_ENDPOINT_SOCKET",
                format!("unix://{}", socket.display()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for("the health endpoint", || get(health, "/live").is_some());
    let (status, body) = get(health, "/ready").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no X509-SVID"), "{body}");
    // It holds its ports (in transparent mode a free port could be bound by the workload and
    // receive redirected traffic) but serves nothing: a connection is closed at once.
    wait_for("the tunnel port to be held", || {
        TcpStream::connect(tunnel).is_ok()
    });
    assert!(
        TcpListener::bind(tunnel).is_err(),
        "another process could take the tunnel port"
    );
    let mut c = TcpStream::connect(tunnel).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert!(
        tessera_test_util::netns::closed_by_peer(&mut c),
        "serving without an identity"
    );

    create_entry(&admin);
    wait_for("/ready", || {
        get(health, "/ready").is_some_and(|(s, _)| s == 200)
    });
    // Now it serves: a connection stays open, waiting for a TLS ClientHello, instead of being
    // closed at once.
    wait_for("the tunnel to serve", || {
        TcpStream::connect(tunnel).is_ok_and(|mut c| {
            c.set_read_timeout(Some(Duration::from_millis(500))).is_ok()
                && matches!(
                    c.read(&mut [0u8; 1]),
                    Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
                )
        })
    });
    let (_, metrics) = get(health, "/metrics").unwrap();
    assert!(
        metrics.contains("tessera_proxy_active_connections"),
        "{metrics}"
    );
}

fn create_entry(admin: &Path) {
    let o = tessera()
        .args([
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/proxy-cli",
            "--selector",
            &format!("unix:uid:{}", my_uid()),
        ])
        .env("TESSERA_ADMIN_SOCKET", admin)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}
