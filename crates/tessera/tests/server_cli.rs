//! `tessera server run` and the admin verbs as an operator uses them: real processes, the real
//! admin socket, exit codes and messages.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start(dir: &Path, health: u16) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["server", "run", "--bind-address", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .arg("--admin-socket")
        .arg(dir.join("admin/admin.sock"))
        .arg("--health-bind-address")
        .arg(format!("127.0.0.1:{health}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server { child };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.join("admin/admin.sock").exists() {
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    server
}

fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("TESSERA_ADMIN_SOCKET", dir.join("admin/admin.sock"))
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn operator_workflow_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let health = free_port();
    let server = start(dir.path(), health);

    // The health endpoint is bound after the admin socket the start waited for.
    let healthcheck = || {
        cli(
            dir.path(),
            &["healthcheck", "--address", &format!("127.0.0.1:{health}")],
        )
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut o = healthcheck();
    while !o.status.success() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
        o = healthcheck();
    }
    assert!(o.status.success(), "{}", err(&o));

    // A join token names the agent ID it will give.
    let o = cli(
        dir.path(),
        &["token", "generate", "--ttl", "10m", "--output", "json"],
    );
    assert!(o.status.success(), "{}", err(&o));
    let tok: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let agent_id = tok["agent_spiffe_id"].as_str().unwrap().to_owned();
    assert!(
        agent_id.starts_with("spiffe://example.org/tessera/agent/join_token/"),
        "{agent_id}"
    );

    let create = [
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/web",
        "--parent-id",
        &agent_id,
        "--selector",
        "unix:uid:1000",
        "--selector",
        "unix:gid:1000",
        "--x509-ttl",
        "30m",
        "--dns-name",
        "web.example.org",
    ];
    let o = cli(dir.path(), &create);
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("X509-SVID TTL : 30m"), "{}", out(&o));
    // Idempotent.
    let o = cli(dir.path(), &create);
    assert!(
        out(&o).contains("an identical entry already exists"),
        "{}",
        out(&o)
    );
    // A zero lifetime is refused (on the wire 0 means the default: it became 1h silently).
    let mut zero = create.to_vec();
    zero[11] = "0s";
    let o = cli(dir.path(), &zero);
    assert!(!o.status.success());
    assert!(
        err(&o).contains("is zero; leave the flag out"),
        "{}",
        err(&o)
    );
    // The same entry asked with other settings is refused, naming them, and changes nothing
    // (before: "an identical entry already exists", exit 0, the new TTL dropped).
    let mut other = create.to_vec();
    other.extend(["--jwt-ttl", "10m", "--federates-with", "partner.org"]);
    other[11] = "2h";
    let o = cli(dir.path(), &other);
    assert!(!o.status.success(), "{}", out(&o));
    assert!(
        err(&o).contains(
            "with other settings (x509_ttl 30m (asked 2h), jwt_ttl 5m (asked 10m), federates_with [] (asked [partner.org]))"
        ) && err(&o).contains("tessera entry update --id"),
        "{}",
        err(&o)
    );

    let o = cli(dir.path(), &["entry", "list", "--output", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let id = list[0]["id"].as_str().unwrap().to_owned();

    let o = cli(
        dir.path(),
        &["entry", "update", "--id", &id, "--hint", "frontend"],
    );
    assert!(o.status.success(), "{}", err(&o));
    assert!(out(&o).contains("Hint          : frontend"));
    // The same update again changes nothing, so it writes nothing: the revision stays (before:
    // a new revision, and every agent re-synced the entry).
    let revision = |o: &Output| {
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["updated_revision"].as_u64().unwrap()
    };
    let update = [
        "entry", "update", "--id", &id, "--hint", "frontend", "--output", "json",
    ];
    let first = revision(&cli(dir.path(), &update));
    assert_eq!(revision(&cli(dir.path(), &update)), first);
    let o = cli(dir.path(), &["entry", "show", "--id", &id]);
    assert!(
        out(&o).contains("Selector      : unix:gid:1000")
            && out(&o).contains("DNS name      : web.example.org"),
        "{}",
        out(&o)
    );

    // Bad input: a clear message, exit code != 0, nothing changed.
    let long_id = "a".repeat(17_000);
    for (args, want) in [
        // Refused before it is sent (before: the server's answer repeated it and went over the
        // HTTP/2 header limit: "h2 protocol error").
        (
            vec!["entry", "show", "--id", &long_id],
            "17000 bytes long: no ID or name is longer than 1024",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/a/",
                "--parent-id",
                &agent_id,
                "--selector",
                "unix:uid:1",
            ],
            "trailing `/`",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/a",
                "--parent-id",
                &agent_id,
            ],
            "at least one --selector",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/a",
                "--parent-id",
                &agent_id,
                "--selector",
                "uid1000",
            ],
            "expected `type:value`",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://example.org/a",
                "--parent-id",
                &agent_id,
                "--selector",
                "unix:uid:1",
                "--x509-ttl",
                "soon",
            ],
            "duration \"soon\"",
        ),
        (
            vec![
                "entry",
                "create",
                "--spiffe-id",
                "spiffe://other.org/a",
                "--parent-id",
                "spiffe://other.org/p",
                "--selector",
                "unix:uid:1",
            ],
            "not in trust domain example.org",
        ),
        (vec!["entry", "show", "--id", "nope"], "not found"),
        (
            vec![
                "agent",
                "ban",
                "--spiffe-id",
                "spiffe://example.org/tessera/agent/x/y",
            ],
            "not found",
        ),
        (vec!["token", "generate", "--ttl", "0s"], ""),
    ] {
        let o = cli(dir.path(), &args);
        if want.is_empty() {
            continue;
        }
        assert!(!o.status.success(), "{args:?} must fail");
        assert!(err(&o).contains(want), "{args:?}: {}", err(&o));
    }
    let o = cli(dir.path(), &["entry", "list", "--output", "json"]);
    let list: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        1,
        "nothing was created by the bad calls"
    );

    // The bundle in both formats, and an SVID minted for a tool that verifies against it.
    let o = cli(dir.path(), &["bundle", "show"]);
    assert!(out(&o).starts_with("-----BEGIN CERTIFICATE-----"));
    let o = cli(dir.path(), &["bundle", "show", "--format", "spiffe"]);
    let b: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(b["spiffe_sequence"], 1);
    let svid_dir = dir.path().join("svid");
    // A key file already there, readable by everyone: replaced with a 0600 one (before: opened
    // with its mode kept, 0644).
    std::fs::create_dir_all(&svid_dir).unwrap();
    std::fs::write(svid_dir.join("svid_key.pem"), "old").unwrap();
    std::fs::set_permissions(
        svid_dir.join("svid_key.pem"),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let o = cli(
        dir.path(),
        &[
            "svid",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/tool",
            "--ttl",
            "5m",
            "--write",
            svid_dir.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", err(&o));
    let o = cli(
        dir.path(),
        &[
            "svid",
            "inspect",
            svid_dir.join("svid.pem").to_str().unwrap(),
            "--bundle",
            svid_dir.join("bundle.pem").to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}{}", out(&o), err(&o));
    assert!(out(&o).contains("SPIFFE ID: spiffe://example.org/tool"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(svid_dir.join("svid_key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    let o = cli(dir.path(), &["entry", "delete", "--id", &id]);
    assert!(o.status.success());
    let o = cli(dir.path(), &["agent", "list"]);
    assert!(out(&o).contains("Found 0 agents"), "{}", out(&o));

    // Every change is in the audit log.
    let audit = std::fs::read_to_string(dir.path().join("data/audit.log")).unwrap();
    for action in [
        "token.generate",
        "entry.create",
        "entry.update",
        "entry.delete",
        "svid.mint",
    ] {
        assert!(
            audit.contains(&format!("\"action\":\"{action}\"")),
            "{action} missing from {audit}"
        );
    }
    drop(server);

    // Without a server: a clear message.
    let o = cli(dir.path(), &["entry", "list"]);
    assert!(!o.status.success());
    assert!(
        err(&o).contains("cannot reach the server's admin socket"),
        "{}",
        err(&o)
    );
}

#[test]
fn server_run_refuses_bad_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("server.toml");
    std::fs::write(
        &cfg,
        "trust_domain = \"example.org\"\n[ca]\nttl = \"2h\"\n[svid]\nagent_ttl = \"3h\"\n",
    )
    .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["server", "run", "--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        err(&o).contains("svid.agent_ttl 3h: must be shorter than ca.ttl 2h"),
        "{}",
        err(&o)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["server", "run", "--print-default-config"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let printed = out(&o);
    assert!(printed.contains("trust_domain = \"example.org\""));
    // The printed default is itself a valid config.
    std::fs::write(&cfg, &printed).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "server",
            "run",
            "--config",
            cfg.to_str().unwrap(),
            "--trust-domain",
            "Bad.Domain",
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(err(&o).contains("--trust-domain"), "{}", err(&o));
    // An empty data_dir and an unknown log level are named (before: "chmod : No such file or
    // directory"; and a server that logged nothing at all).
    let data = dir.path().join("data");
    for (text, says) in [
        (
            "trust_domain = \"example.org\"\ndata_dir = \"\"\n".to_owned(),
            "data_dir is empty",
        ),
        (
            format!(
                "trust_domain = \"example.org\"\ndata_dir = {:?}\nlog_level = \"bogus\"\n",
                data.display().to_string()
            ),
            "log level \"bogus\"",
        ),
    ] {
        std::fs::write(&cfg, &text).unwrap();
        let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["server", "run", "--config", cfg.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!o.status.success(), "{text}");
        assert!(err(&o).contains(says), "{text}: {}", err(&o));
    }
}

/// A pipe whose reading end is already closed: every write to it fails with EPIPE.
fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    writer
}

#[test]
fn a_closed_pipe_ends_a_command_quietly_and_never_ends_a_server() {
    // A command whose reader went away (`tessera id check … | head -0`): status 141, as for a
    // process that SIGPIPE ended, and no panic (before: "failed printing to stdout", 101).
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["id", "check", "spiffe://example.org/a"])
        .stdout(closed_pipe())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(141), "{}", err(&o));
    assert!(!err(&o).contains("panicked"), "{}", err(&o));

    // A server whose log collector died (stderr a closed pipe) keeps serving: a lost log line
    // never ends it (before: tracing-subscriber reported the failed write with `eprintln!`,
    // which panicked on the same closed stderr, and the server exited 101).
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["server", "run", "--bind-address", "127.0.0.1:0"])
        .args(["--health-bind-address", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--admin-socket")
        .arg(dir.path().join("admin/admin.sock"))
        .stdout(closed_pipe())
        .stderr(closed_pipe())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !dir.path().join("admin/admin.sock").exists() {
        assert!(child.try_wait().unwrap().is_none(), "the server exited");
        assert!(Instant::now() < deadline, "server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Requests make it log more; it answers them and is still running.
    for _ in 0..3 {
        let o = cli(dir.path(), &["token", "generate"]);
        assert!(o.status.success(), "{}", err(&o));
    }
    std::thread::sleep(Duration::from_millis(300));
    let still = child.try_wait().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(still.is_none(), "the server exited: {still:?}");
}

/// A listener on loopback that answers each connection with `answer` (after reading the
/// request), then keeps writing `then` forever when it is not empty.
fn fake_endpoint(answer: &'static [u8], then: &'static [u8]) -> std::net::SocketAddr {
    use std::io::{Read as _, Write as _};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                let mut req = [0u8; 1024];
                let _ = c.read(&mut req);
                let _ = c.write_all(answer);
                while !then.is_empty() && c.write_all(then).is_ok() {}
            });
        }
    });
    addr
}

#[test]
fn healthcheck_tells_ready_not_ready_and_what_is_not_a_health_endpoint() {
    let check = |addr: String| {
        let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["healthcheck", "--address", &addr])
            .output()
            .unwrap();
        (o.status.code(), out(&o), err(&o))
    };
    let ready = fake_endpoint(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nready\n", b"");
    let (code, stdout, _) = check(ready.to_string());
    assert_eq!((code, stdout.trim()), (Some(0), "ready"));

    let draining = fake_endpoint(b"HTTP/1.1 503 Service Unavailable\r\n\r\ndraining\n", b"");
    let (code, _, stderr) = check(draining.to_string());
    assert_eq!(code, Some(1));
    assert_eq!(stderr.trim(), "not ready: draining");

    for (addr, says) in [
        (
            fake_endpoint(b"HTTP/1.0 404 File not found\r\n\r\n<html>...</html>", b"").to_string(),
            "GET /ready answered 404",
        ),
        (
            fake_endpoint(b"\x15\x03\x03\x00\x02\x02\x28", b"").to_string(),
            "the answer is not HTTP",
        ),
        // An endless answer is cut at 64 KiB (before: read whole into memory, gigabytes).
        (
            fake_endpoint(b"HTTP/1.1 200 OK\r\n\r\n", b"yes yes yes yes ").to_string(),
            "the answer is longer than 65536 bytes",
        ),
        ("127.0.0.1:0".to_owned(), "port 0"),
    ] {
        let (code, _, stderr) = check(addr.clone());
        assert_eq!(code, Some(1), "{addr}: {stderr}");
        assert!(stderr.contains(says), "{addr}: {stderr}");
        assert!(
            addr.ends_with(":0") || stderr.contains(&format!("health endpoint {addr}")),
            "the address is named: {stderr}"
        );
    }
}

#[test]
fn a_socket_that_is_not_the_api_is_named_as_such_and_never_hangs_a_command() {
    use std::io::Write as _;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), free_port());
    let admin = dir.path().join("admin/admin.sock");

    // A gRPC socket of another API (the admin socket asked for the Workload API).
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["agent", "api", "fetch", "x509", "--socket"])
        .arg(format!("unix://{}", admin.display()))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        err(&o).contains("the socket does not serve this API (Unimplemented"),
        "{}",
        err(&o)
    );

    // Something that answers, but not in HTTP/2.
    let garbage = dir.path().join("garbage.sock");
    let l = std::os::unix::net::UnixListener::bind(&garbage).unwrap();
    std::thread::spawn(move || {
        let mut open = Vec::new();
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\n\r\nhello");
            open.push(c);
        }
    });
    let o = cli(
        dir.path(),
        &["entry", "list", "--admin-socket", garbage.to_str().unwrap()],
    );
    assert!(!o.status.success());
    assert!(err(&o).contains("is it the right socket"), "{}", err(&o));

    // A process that accepts connections and never answers: the command gives up (before: it
    // waited forever).
    let silent = dir.path().join("silent.sock");
    let _held = std::os::unix::net::UnixListener::bind(&silent).unwrap();
    let started = Instant::now();
    let o = cli(
        dir.path(),
        &["entry", "list", "--admin-socket", silent.to_str().unwrap()],
    );
    assert!(!o.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    assert!(err(&o).contains("no answer within 30 s"), "{}", err(&o));
    drop(server);
}

#[test]
fn agent_run_names_a_trust_bundle_file_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("bundle.pem");
    std::fs::write(&garbage, [0u8, 159, 146, 150, 1, 2, 3]).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["agent", "run", "--server-address", "127.0.0.1:1"])
        .args(["--join-token", "not-used"])
        .arg("--trust-bundle-path")
        .arg(&garbage)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--socket-path")
        .arg(dir.path().join("agent.sock"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    // Named as the file's problem, before any server is contacted (before: "server: node
    // attestation failed: ... has no X.509 authorities").
    assert!(
        err(&o).contains(&format!(
            "trust_bundle_path {}: no X.509 authority in it",
            garbage.display()
        )),
        "{}",
        err(&o)
    );
    assert!(!dir.path().join("agent.sock").exists());
}
