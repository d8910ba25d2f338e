//! Attestation of real processes: this test process over a real socket pair, child processes,
//! processes that exit, and (as root) a process in a named network namespace. Expected values are
//! computed independently (`id`, `sha256sum`, argv[0], getgroups) rather than by the code under test.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step should panic

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tessera_spiffe::Selector;
use tessera_workload_attest::{AttestError, Attestor, PeerCreds, PeerProcess};

/// Kills and reaps a child however the test ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Reaped {
    fn kill_and_reap(&mut self) {
        self.0.kill().unwrap();
        self.0.wait().unwrap();
    }
}

fn output(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?} failed: {out:?}");
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

fn sha256sum(path: &std::path::Path) -> String {
    let out = output("sha256sum", &[path.to_str().unwrap()]);
    out.split_whitespace().next().unwrap().to_owned()
}

fn sleep_binary() -> PathBuf {
    std::fs::canonicalize(output("sh", &["-c", "command -v sleep"])).unwrap()
}

fn creds_of(child: &Child) -> PeerCreds {
    PeerCreds {
        pid: i32::try_from(child.id()).unwrap(),
        uid: output("id", &["-u"]).parse().unwrap(),
        gid: output("id", &["-g"]).parse().unwrap(),
    }
}

fn spawn_sleep() -> (Reaped, PeerCreds) {
    let child = Command::new(sleep_binary()).arg("5").spawn().unwrap();
    let creds = creds_of(&child);
    (Reaped(child), creds)
}

fn sel(s: &str) -> Selector {
    Selector::parse(s).unwrap()
}

fn with_kind(set: &BTreeSet<Selector>, prefix: &str) -> Vec<String> {
    set.iter()
        .map(ToString::to_string)
        .filter(|s| s.starts_with(prefix))
        .collect()
}

/// The cgroup rule, written again from the documentation: v2 line, else name=systemd, else first.
fn expected_cgroup(pid: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let lines: Vec<(&str, &str, &str)> = text
        .lines()
        .map(|l| {
            let mut p = l.splitn(3, ':');
            (p.next().unwrap(), p.next().unwrap(), p.next().unwrap())
        })
        .collect();
    let line = lines
        .iter()
        .find(|(id, c, _)| *id == "0" && c.is_empty())
        .or_else(|| lines.iter().find(|(_, c, _)| c.contains("name=systemd")))
        .or(lines.first())
        .unwrap();
    format!("cgroup:path:{}", line.2)
}

#[test]
fn the_current_process_over_a_socket_gets_exactly_its_own_selectors() {
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let creds = PeerCreds::from_socket(&a).unwrap();
    assert_eq!(creds.pid, i32::try_from(std::process::id()).unwrap());

    let attestor = Attestor::new(Attestor::DEFAULT_MAX_HASH_BYTES);
    let by_creds = attestor.attest(creds).unwrap();
    let by_socket = attestor
        .attest_peer(&PeerProcess::from_socket(&a).unwrap())
        .unwrap();
    assert_eq!(&by_creds, by_socket.selectors());

    let exe = std::fs::canonicalize(std::env::args().next().unwrap()).unwrap();
    let mut want: BTreeSet<Selector> = [
        format!("unix:uid:{}", output("id", &["-u"])),
        format!("unix:gid:{}", output("id", &["-g"])),
        format!("unix:user:{}", output("id", &["-un"])),
        format!("unix:group:{}", output("id", &["-gn"])),
        format!("unix:path:{}", exe.display()),
        format!("unix:sha256:{}", sha256sum(&exe)),
        expected_cgroup("self"),
    ]
    .iter()
    .map(|s| sel(s))
    .collect();
    for gid in nix::unistd::getgroups().unwrap() {
        want.insert(sel(&format!("unix:supplementary_gid:{gid}")));
    }
    // The test may itself run in a named network namespace; everything else must be exact.
    let got: BTreeSet<Selector> = by_creds
        .into_iter()
        .filter(|s| s.kind() != "netns")
        .collect();
    assert_eq!(got, want);
}

#[test]
fn tokio_peer_credentials_convert_to_the_same_creds() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let from_tokio = PeerCreds::try_from(a.peer_cred().unwrap()).unwrap();
        assert_eq!(from_tokio, PeerCreds::from_socket(&a).unwrap());
    });
}

#[test]
fn a_child_is_attested_by_pid_with_its_own_executable() {
    let (_child, creds) = spawn_sleep();
    let selectors = Attestor::new(Attestor::DEFAULT_MAX_HASH_BYTES)
        .attest(creds)
        .unwrap();
    let sleep = sleep_binary();
    assert!(selectors.contains(&sel(&format!("unix:path:{}", sleep.display()))));
    assert!(selectors.contains(&sel(&format!("unix:sha256:{}", sha256sum(&sleep)))));
    assert_eq!(
        with_kind(&selectors, "unix:path:"),
        vec![format!("unix:path:{}", sleep.display())]
    );
    assert!(selectors.contains(&sel(&format!("unix:uid:{}", creds.uid))));
    assert!(selectors.contains(&sel(&expected_cgroup(&creds.pid.to_string()))));
}

#[test]
fn executables_above_the_size_cap_get_no_hash_selector() {
    let attestor = Attestor::new(1);
    let (_child, creds) = spawn_sleep();
    let selectors = attestor.attest(creds).unwrap();
    assert_eq!(with_kind(&selectors, "unix:sha256:"), Vec::<String>::new());
    assert_eq!(with_kind(&selectors, "unix:path:").len(), 1);
    assert_eq!(attestor.hashes_computed(), 0);
}

#[test]
fn executables_are_hashed_once_per_file_identity() {
    let attestor = Attestor::new(Attestor::DEFAULT_MAX_HASH_BYTES);
    let me = PeerCreds {
        pid: i32::try_from(std::process::id()).unwrap(),
        ..creds_of_self()
    };
    let first = attestor.attest(me).unwrap();
    assert_eq!(attestor.hashes_computed(), 1);
    let second = attestor.attest(me).unwrap();
    assert_eq!(attestor.hashes_computed(), 1, "second call rehashed");
    assert_eq!(first, second);

    let (_a, a) = spawn_sleep();
    attestor.attest(a).unwrap();
    assert_eq!(attestor.hashes_computed(), 2);
    // Another process running the same file: the cache is keyed by the file, not the pid.
    let (_b, b) = spawn_sleep();
    attestor.attest(b).unwrap();
    assert_eq!(attestor.hashes_computed(), 2);
}

fn creds_of_self() -> PeerCreds {
    PeerCreds {
        pid: i32::try_from(std::process::id()).unwrap(),
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
    }
}

fn assert_gone<T: std::fmt::Debug>(result: Result<T, AttestError>) {
    match result {
        Err(e @ AttestError::ProcessGone { .. }) => {
            eprintln!("as expected: {e}");
            assert!(e.is_process_gone());
        }
        other => panic!("expected ProcessGone, got {other:?}"),
    }
}

#[test]
fn a_caller_that_exited_before_attestation_gets_no_identity() {
    let (mut child, creds) = spawn_sleep();
    child.kill_and_reap();
    assert_gone(Attestor::new(Attestor::DEFAULT_MAX_HASH_BYTES).attest(creds));
    assert_gone(PeerProcess::open(creds));
}

/// Set to a socket path, [`helper_connects_then_exits`] connects to it; the test binary runs itself
/// as that helper so the connecting process is a real, separate process that we can let exit.
const HELPER_SOCKET: &str = "TESSERA_ATTEST_TEST_CONNECT_TO";

#[test]
fn helper_connects_then_exits() {
    if let Some(path) = std::env::var_os(HELPER_SOCKET) {
        let _conn = std::os::unix::net::UnixStream::connect(path).unwrap();
    }
}

#[test]
fn a_connection_whose_connecting_process_has_exited_gets_no_identity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("workload.sock");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "helper_connects_then_exits", "--quiet"])
        .env(HELPER_SOCKET, &path)
        .status()
        .unwrap();
    assert!(status.success());
    // The helper has connected, exited and been reaped; its connection waits in the backlog, and
    // its pid is free for anyone. The socket's own pidfd still names the dead helper.
    let (conn, _) = listener.accept().unwrap();
    let creds = PeerCreds::from_socket(&conn).unwrap();
    assert_ne!(creds.pid, i32::try_from(std::process::id()).unwrap());
    assert_gone(PeerProcess::from_socket(&conn));
}

#[test]
fn a_caller_that_exits_after_attestation_fails_the_recheck() {
    let attestor = Attestor::new(Attestor::DEFAULT_MAX_HASH_BYTES);
    let (mut child, creds) = spawn_sleep();
    let peer = PeerProcess::open(creds).unwrap();
    let attestation = attestor.attest_peer(&peer).unwrap();
    attestation.recheck().unwrap();
    child.kill_and_reap();
    assert_gone(attestation.recheck());
    // The pidfd still names the dead process, so attesting the same peer again fails too, even
    // if the pid number has meanwhile been given to another process.
    assert_gone(attestor.attest_peer(&peer));
}

#[test]
fn a_decision_made_while_the_caller_exits_is_not_returned() {
    let attestor = Attestor::new(Attestor::DEFAULT_MAX_HASH_BYTES);
    let (mut child, creds) = spawn_sleep();
    let decided = attestor.attest_with_recheck(creds, |selectors| {
        assert!(!selectors.is_empty());
        child.kill_and_reap();
        "spiffe://example.org/payments"
    });
    assert_gone(decided);

    let (_alive, creds) = spawn_sleep();
    let decided = attestor.attest_with_recheck(creds, |selectors| selectors.len());
    assert!(decided.unwrap() > 0);
}

#[test]
fn credentials_that_differ_from_the_process_get_no_identity() {
    let me = creds_of_self();
    let attestor = Attestor::new(Attestor::DEFAULT_MAX_HASH_BYTES);
    for wrong in [
        PeerCreds {
            uid: me.uid.wrapping_add(1),
            ..me
        },
        PeerCreds {
            gid: me.gid.wrapping_add(1),
            ..me
        },
    ] {
        assert_gone(attestor.attest(wrong));
    }
}

#[test]
fn a_caller_outside_our_pid_namespace_is_refused() {
    let attestor = Attestor::new(Attestor::DEFAULT_MAX_HASH_BYTES);
    for pid in [0, -1] {
        let err = attestor
            .attest(PeerCreds {
                pid,
                ..creds_of_self()
            })
            .unwrap_err();
        assert!(matches!(err, AttestError::NoPid { .. }), "{err}");
    }
}

/// Deletes the network namespace however the test ends.
struct NetnsGuard(String);

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

#[test]
fn a_process_in_a_named_network_namespace_gets_its_name() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipping netns test: needs root");
        return;
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let name = format!("tessera-test-{}-{nanos}", std::process::id());
    let added = Command::new("ip")
        .args(["netns", "add", &name])
        .status()
        .unwrap();
    let _guard = NetnsGuard(name.clone());
    assert!(added.success(), "ip netns add {name} failed");

    let sleep = sleep_binary();
    let child = Command::new("ip")
        .args(["netns", "exec", &name])
        .arg(&sleep)
        .arg("5")
        .spawn()
        .unwrap();
    let creds = creds_of(&child);
    let _child = Reaped(child);
    // `ip netns exec` enters the namespace, then execs sleep in the same process.
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::read_link(format!("/proc/{}/exe", creds.pid)).ok() != Some(sleep.clone()) {
        assert!(Instant::now() < deadline, "ip netns exec never ran sleep");
        std::thread::sleep(Duration::from_millis(10));
    }

    let attestor = Attestor::new(Attestor::DEFAULT_MAX_HASH_BYTES);
    let selectors = attestor.attest(creds).unwrap();
    assert_eq!(
        with_kind(&selectors, "netns:"),
        vec![format!("netns:name:{name}")]
    );
    // Never the inode: only `name:` values.
    let mine = attestor.attest(creds_of_self()).unwrap();
    assert!(!mine.contains(&sel(&format!("netns:name:{name}"))));
}
