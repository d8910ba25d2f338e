//! The Workload API against real, unmodified SPIFFE clients: the Rust `spiffe` crate in-process
//! and the Python `spiffe` package (py-spiffe) as a subprocess, with `tessera dev` and with a
//! separate server and agent (the agent keeps serving while the server is down).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use spiffe::{WorkloadApiClient, X509Source};
use tessera_test_util::http;
use tokio_stream::StreamExt as _;

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

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").unwrap().uid()
}

fn cli(admin: &Path, args: &[&str]) -> Output {
    let o = tessera()
        .args(args)
        .env("TESSERA_ADMIN_SOCKET", admin)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

fn entry_id(o: &Output) -> String {
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    v["entry"]["id"].as_str().unwrap().to_owned()
}

struct Dev {
    _proc: Proc,
    admin: PathBuf,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Dev {
    /// An entry `id` for this test process's uid.
    fn entry_for_me(&self, id: &str) {
        let uid = format!("unix:uid:{}", my_uid());
        cli(
            &self.admin,
            &["entry", "create", "--spiffe-id", id, "--selector", &uid],
        );
    }
}

fn start_dev() -> Dev {
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin/admin.sock");
    let socket = dir.path().join("agent/agent.sock");
    let child = tessera()
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
        .unwrap();
    let p = Proc(child);
    wait_for(&admin);
    wait_for(&socket);
    Dev {
        _proc: p,
        admin,
        socket,
        _dir: dir,
    }
}

async fn eventually<F, Fut, T>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rust_spiffe_crate_works_unchanged() {
    let dev = start_dev();
    let endpoint = format!("unix://{}", dev.socket.display());
    let client = WorkloadApiClient::connect_to(&endpoint).await.unwrap();

    // No entry for this process yet: PermissionDenied "no identity issued".
    let err = client.fetch_x509_svid().await.unwrap_err();
    assert!(
        format!("{err:?} {err}").contains("no identity issued"),
        "{err:?}"
    );

    // The security header is required: a raw call without it is InvalidArgument.
    let raw = tonic::transport::Endpoint::from_static("http://[::1]:0")
        .connect_with_connector(tower::service_fn({
            let p = dev.socket.clone();
            move |_| {
                let p = p.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(p).await?,
                    ))
                }
            }
        }))
        .await
        .unwrap();
    let mut bare =
        tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(raw);
    let status = bare
        .fetch_jwt_bundles(tessera_proto::workload::JwtBundlesRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);

    let uid = format!("unix:uid:{}", my_uid());
    let o = cli(
        &dev.admin,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/rust",
            "--selector",
            &uid,
            "--x509-ttl",
            "10s",
            "--output",
            "json",
        ],
    );
    let _first = entry_id(&o);
    let svid = eventually("the first SVID", || async {
        client.fetch_x509_svid().await.ok()
    })
    .await;
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/rust");

    // An entry created while streaming reaches the stream; a deleted one disappears from it.
    let mut stream = client.stream_x509_contexts().await.unwrap();
    let ctx = stream.next().await.unwrap().unwrap();
    assert_eq!(ctx.svids().len(), 1);
    let o = cli(
        &dev.admin,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/rust-two",
            "--selector",
            &uid,
            "--output",
            "json",
        ],
    );
    let second = entry_id(&o);
    let grew = tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(ctx) = stream.next().await {
            let ids: Vec<String> = ctx
                .unwrap()
                .svids()
                .iter()
                .map(|s| s.spiffe_id().to_string())
                .collect();
            if ids.contains(&"spiffe://example.org/rust-two".to_owned()) {
                return ids.len();
            }
        }
        0
    })
    .await
    .expect("the new entry reaches the open stream");
    assert_eq!(grew, 2);
    cli(&dev.admin, &["entry", "delete", "--id", &second]);
    tokio::time::timeout(Duration::from_secs(15), async {
        while let Some(ctx) = stream.next().await {
            if ctx.unwrap().svids().len() == 1 {
                return;
            }
        }
    })
    .await
    .expect("the deleted entry leaves the open stream");

    // JWT-SVIDs for two audiences, validated by the agent.
    let jwt = client.fetch_jwt_svid(["db", "cache"], None).await.unwrap();
    assert_eq!(jwt.spiffe_id().to_string(), "spiffe://example.org/rust");
    let validated = client.validate_jwt_token("db", jwt.token()).await.unwrap();
    assert_eq!(
        validated.spiffe_id().to_string(),
        "spiffe://example.org/rust"
    );
    assert!(
        client
            .validate_jwt_token("other", jwt.token())
            .await
            .is_err()
    );
    let jwt_bundles = client.fetch_jwt_bundles().await.unwrap();
    assert!(format!("{jwt_bundles:?}").contains("example.org"));
    let x509_bundles = client.fetch_x509_bundles().await.unwrap();
    assert!(format!("{x509_bundles:?}").contains("example.org"));

    // An X509Source sees the 10 s SVID rotate (at half-life).
    let source = X509Source::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .unwrap();
    let before = source.svid().unwrap().cert_chain()[0].as_ref().to_vec();
    let mut updates = source.updated();
    let rotated = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            updates.changed().await.unwrap();
            let now = source.svid().unwrap().cert_chain()[0].as_ref().to_vec();
            if now != before {
                return;
            }
        }
    })
    .await;
    assert!(
        rotated.is_ok(),
        "the X509Source saw no rotation within 20 s"
    );
}

/// Runs the py-spiffe script; `None` (with the reason printed) when the package is missing
/// outside CI. CI installs it, so there a missing package fails the test.
fn python_spiffe_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import spiffe"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI=true but the Python `spiffe` package is not installed (.ci/run installs it)"
        );
        eprintln!("skipping py-spiffe conformance: `pip install spiffe` to run it");
    }
    ok
}

#[test]
fn python_spiffe_package_works_unchanged() {
    if !python_spiffe_available() {
        return;
    }
    let dev = start_dev();
    dev.entry_for_me("spiffe://example.org/python");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance/py_spiffe.py");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let o = Command::new("python3")
            .arg(&script)
            .arg("spiffe://example.org/python")
            .env(
                "SPIFFE_ENDPOINT_SOCKET",
                format!("unix://{}", dev.socket.display()),
            )
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        if o.status.success() {
            assert!(
                out.contains("py-spiffe conformance: all checks passed"),
                "{out}"
            );
            return;
        }
        // The entry may not have reached the agent yet; anything else is a failure.
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(
            Instant::now() < deadline && err.contains("no identity issued"),
            "py-spiffe failed:\n{out}\n{err}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_keeps_serving_while_the_server_is_down_and_resyncs_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let admin = dir.path().join("admin/admin.sock");
    let socket = dir.path().join("agent.sock");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server_args = |d: &Path| {
        let mut c = tessera();
        c.args([
            "server",
            "run",
            "--log-level",
            "warn",
            "--bind-address",
            &format!("127.0.0.1:{port}"),
            "--health-bind-address",
            "127.0.0.1:0",
        ])
        .arg("--data-dir")
        .arg(d.join("server"))
        .arg("--admin-socket")
        .arg(&admin)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        c
    };
    let server = Proc(server_args(dir.path()).spawn().unwrap());
    wait_for(&admin);
    let tok: serde_json::Value =
        serde_json::from_slice(&cli(&admin, &["token", "generate", "--output", "json"]).stdout)
            .unwrap();
    let bundle = dir.path().join("bundle.json");
    std::fs::write(
        &bundle,
        cli(&admin, &["bundle", "show", "--format", "spiffe"]).stdout,
    )
    .unwrap();
    let agent_id = tok["agent_spiffe_id"].as_str().unwrap().to_owned();
    let health = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let agent_args = || {
        let mut c = tessera();
        c.args([
            "agent",
            "run",
            "--log-level",
            "warn",
            "--server-address",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .arg("--socket-path")
        .arg(&socket)
        .arg("--trust-bundle-path")
        .arg(&bundle)
        .args(["--join-token", tok["token"].as_str().unwrap()])
        .args(["--health-bind-address", &health.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        c
    };
    let agent = Proc(agent_args().spawn().unwrap());
    wait_for(&socket);
    let (status, body) = eventually("the agent's first sync", || async {
        http::get(health, "/ready").filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(status, 200, "{body}");
    let uid = format!("unix:uid:{}", my_uid());
    cli(
        &admin,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/steady",
            "--parent-id",
            &agent_id,
            "--selector",
            &uid,
        ],
    );
    let client = WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap();
    let svid = eventually("the SVID", || async { client.fetch_x509_svid().await.ok() }).await;
    assert_eq!(svid.spiffe_id().to_string(), "spiffe://example.org/steady");

    // The agent's metrics count what it holds.
    let metrics = eventually("agent metrics", || async {
        let (_, body) = http::get(health, "/metrics")?;
        body.contains("tessera_agent_svids_cached 1")
            .then_some(body)
    })
    .await;
    assert!(
        metrics.contains("tessera_agent_workload_api_first_response_seconds"),
        "{metrics}"
    );

    // The server goes away: the agent keeps serving the cached SVID.
    drop(server);
    for _ in 0..5 {
        let again = client.fetch_x509_svid().await.unwrap();
        assert_eq!(again.spiffe_id().to_string(), "spiffe://example.org/steady");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Still ready: the agent has synced once and serves what it holds, as SPIRE's agent does.
    assert_eq!(http::get(health, "/ready").map(|(s, _)| s), Some(200));

    // The agent restarts while the server is still down. It comes back on its stored agent SVID
    // (the join token was spent) and serves its health endpoint: live, but not ready, because
    // nothing has synced since the restart, so it holds no workload SVID to serve.
    drop(agent);
    let agent = Proc(agent_args().spawn().unwrap());
    let (status, body) = eventually("the restarted agent's health endpoint", || async {
        http::get(health, "/live")
    })
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = http::get(health, "/ready").unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("no sync with the server yet"), "{body}");

    // The server comes back (same data dir, same port): the agent resumes sync, and a new entry
    // reaches it without an agent restart.
    let _server = Proc(server_args(dir.path()).spawn().unwrap());
    wait_for(&admin);
    eventually("the admin socket to answer", || async {
        let o = tessera()
            .args(["entry", "list"])
            .env("TESSERA_ADMIN_SOCKET", &admin)
            .output()
            .unwrap();
        o.status.success().then_some(())
    })
    .await;
    cli(
        &admin,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/after",
            "--parent-id",
            &agent_id,
            "--selector",
            &uid,
        ],
    );
    let (status, body) = eventually("the restarted agent's first sync", || async {
        http::get(health, "/ready").filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(status, 200, "{body}");
    let client = WorkloadApiClient::connect_to(format!("unix://{}", socket.display()))
        .await
        .unwrap();
    let ids = eventually("the new entry at the agent", || async {
        let ctx = client.fetch_x509_context().await.ok()?;
        let ids: Vec<String> = ctx
            .svids()
            .iter()
            .map(|s| s.spiffe_id().to_string())
            .collect();
        ids.contains(&"spiffe://example.org/after".to_owned())
            .then_some(ids)
    })
    .await;
    assert_eq!(ids.len(), 2);
    drop(agent);
}

/// Runs `cmd` to its end, which must come within 60 s; stdout is discarded.
fn exits_on_its_own(mut cmd: Command) -> (std::process::ExitStatus, String) {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} still running after 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status, err)
}

#[test]
fn a_second_instance_never_takes_over_a_live_socket() {
    let dev = start_dev();
    let other = tempfile::tempdir().unwrap();
    let second = |admin: &Path, socket: &Path| {
        let mut c = tessera();
        c.args(["dev", "--log-level", "warn"])
            .arg("--data-dir")
            .arg(other.path().join("data"))
            .arg("--admin-socket")
            .arg(admin)
            .arg("--workload-socket")
            .arg(socket);
        c
    };
    // The Workload API socket of a running agent: the second one fails to start, naming it
    // (before: it logged an error, kept running without a Workload API, and removed the first
    // agent's socket when it exited).
    let (status, err) =
        exits_on_its_own(second(&other.path().join("admin/admin.sock"), &dev.socket));
    assert!(!status.success());
    assert!(
        err.contains(&format!("Workload API socket {}", dev.socket.display()))
            && err.contains("another process is serving on this socket"),
        "{err}"
    );
    // The admin socket of a running server: refused too (before: taken over silently, so admin
    // commands went to the wrong server, and removed at its exit).
    let (status, err) = exits_on_its_own(second(&dev.admin, &other.path().join("agent.sock")));
    assert!(!status.success());
    assert!(
        err.contains(&format!("admin socket {}", dev.admin.display()))
            && err.contains("another process is serving on this socket"),
        "{err}"
    );
    // The first instance still owns both and answers on both (the socket given as a bare
    // path, which `agent api` takes as the proxy does).
    cli(&dev.admin, &["entry", "list"]);
    let o = tessera()
        .args(["agent", "api", "fetch", "bundles", "--socket"])
        .arg(&dev.socket)
        .output()
        .unwrap();
    // This process has no entry: the agent answers that it issued it nothing.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no identity issued"), "{err}");

    // Socket paths dev cannot use are refused before its server starts (before: the server
    // started, made a join token, and then the agent refused the path).
    let same = other.path().join("same.sock");
    let _ = std::fs::remove_dir_all(other.path().join("data"));
    for (socket, admin, says) in [
        (
            Path::new("relative.sock"),
            other.path().join("a.sock"),
            "--workload-socket relative.sock: must be an absolute path",
        ),
        (
            same.as_path(),
            same.clone(),
            "the same path as --workload-socket",
        ),
    ] {
        let (status, err) = exits_on_its_own(second(&admin, socket));
        assert!(!status.success());
        assert!(err.contains(says), "{err}");
        assert!(!other.path().join("data").exists(), "the server started");
    }
}

#[test]
fn agent_api_fetch_write_keeps_pem_files_with_a_private_key_and_leaves_nothing_on_failure() {
    use std::os::unix::fs::PermissionsExt as _;
    let dev = start_dev();
    dev.entry_for_me("spiffe://example.org/files");
    let uid = format!("unix:uid:{}", my_uid());
    // In dev mode an entry without --parent-id gets the embedded agent as its parent; an ID of
    // another trust domain is blamed on itself, not on that parent (a field never given).
    let o = tessera()
        .args(["entry", "create", "--spiffe-id", "spiffe://other.org/x"])
        .args(["--selector", &uid])
        .env("TESSERA_ADMIN_SOCKET", &dev.admin)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("spiffe_id: spiffe://other.org/x is not in trust domain example.org"),
        "{err}"
    );
    let out = tempfile::tempdir().unwrap();
    let fetch = |dir: &Path| {
        tessera()
            .args(["agent", "api", "fetch", "x509", "--write"])
            .arg(dir)
            .env(
                "SPIFFE_ENDPOINT_SOCKET",
                format!("unix://{}", dev.socket.display()),
            )
            .output()
            .unwrap()
    };
    // A temporary file an earlier run left, readable by everyone: replaced, not reused, so the
    // key never lands in a file others can read.
    std::fs::write(out.path().join(".svid.0.key.tmp"), "old").unwrap();
    std::fs::set_permissions(
        out.path().join(".svid.0.key.tmp"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let o = loop {
        let o = fetch(out.path());
        if o.status.success() || Instant::now() > deadline {
            break o;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let key = out.path().join("svid.0.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key's mode");
    assert!(
        std::fs::read_to_string(&key)
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );
    assert!(
        std::fs::read_to_string(out.path().join("svid.0.pem"))
            .unwrap()
            .contains("BEGIN CERTIFICATE")
    );
    assert!(out.path().join("bundle.0.pem").exists());
    let names = |d: &Path| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        names(out.path()),
        ["bundle.0.pem", "svid.0.key", "svid.0.pem"]
    );

    // `--output json` is JSON for the commands that print certificates too.
    let json = |args: &[&str]| -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["--output", "json"]);
        serde_json::from_slice(&cli(&dev.admin, &all).stdout).unwrap()
    };
    let socket = dev.socket.to_str().unwrap();
    let b = json(&["agent", "api", "fetch", "bundles", "--socket", socket]);
    let ours = &b["spiffe://example.org"];
    assert!(
        ours["x509_pem"]
            .as_str()
            .is_some_and(|p| p.starts_with("-----BEGIN CERTIFICATE-----")),
        "{b}"
    );
    assert!(ours["jwt_jwks"]["keys"].is_array(), "{b}");
    assert!(json(&["bundle", "show"])["keys"].is_array());
    let minted = json(&["svid", "mint", "--spiffe-id", "spiffe://example.org/minted"]);
    assert_eq!(minted["spiffe_id"], "spiffe://example.org/minted");
    assert!(
        minted["key_pem"]
            .as_str()
            .unwrap()
            .starts_with("-----BEGIN PRIVATE KEY-----")
    );

    // A write that fails (a directory where the certificate goes): an error, nothing left over.
    let blocked = tempfile::tempdir().unwrap();
    std::fs::create_dir(blocked.path().join("svid.0.pem")).unwrap();
    let o = fetch(blocked.path());
    assert!(!o.status.success());
    assert_eq!(names(blocked.path()), ["svid.0.pem"]);
}
