//! Processes for the network-namespace suites: a server and an agent as `tessera` processes in
//! the root namespace (the agent's socket is a file every namespace can reach), `tessera proxy`
//! inside namespaces, an echo application, and a packet capture.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tessera_test_util::netns::{Net, in_netns};

pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

pub(crate) fn wait_until(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn cli(admin: &Path, args: &[&str]) -> Output {
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

/// Server and agent in the root namespace.
pub(crate) struct ControlPlane {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) admin: PathBuf,
    pub(crate) socket: PathBuf,
    pub(crate) agent_id: String,
    pub(crate) server: Option<Proc>,
    agent: Option<Proc>,
    agent_args: AgentArgs,
    /// The agent's admin socket (node-mode enrollment).
    pub(crate) agent_admin: PathBuf,
    port: u16,
    config: Option<PathBuf>,
}

/// The node proxy's SPIFFE ID: the agent's authorized delegate.
pub(crate) const NODE_PROXY_ID: &str = "spiffe://example.org/node-proxy";

/// Another agent (node) of the control plane.
pub(crate) struct ExtraAgent {
    _proc: Proc,
    pub(crate) admin: PathBuf,
    pub(crate) agent_id: String,
}

/// How the agent is started (and restarted).
struct AgentArgs {
    port: u16,
    data_dir: PathBuf,
    socket: PathBuf,
    bundle: PathBuf,
    token: String,
    admin: PathBuf,
    log: PathBuf,
}

impl AgentArgs {
    fn spawn(&self) -> Proc {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        Proc(
            tessera()
                .args(["agent", "run", "--log-level", "info"])
                .args(["--server-address", &format!("127.0.0.1:{}", self.port)])
                .arg("--data-dir")
                .arg(&self.data_dir)
                .arg("--socket-path")
                .arg(&self.socket)
                .arg("--trust-bundle-path")
                .arg(&self.bundle)
                .args(["--join-token", &self.token])
                .arg("--agent-admin-socket")
                .arg(&self.admin)
                .args(["--authorized-delegate", NODE_PROXY_ID])
                .args(["--health-bind-address", "127.0.0.1:0"])
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap(),
        )
    }
}

impl ControlPlane {
    pub(crate) fn start() -> Self {
        Self::start_with_config(None)
    }

    /// As [`Self::start`], the server reading `config` (TOML) too.
    pub(crate) fn start_with_config(config: Option<&str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let admin = dir.path().join("admin/admin.sock");
        let socket = dir.path().join("agent/agent.sock");
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = config.map(|text| {
            let p = dir.path().join("server.toml");
            std::fs::write(&p, text).unwrap();
            p
        });
        let server = Self::spawn_server(dir.path(), &admin, port, config.as_deref());
        wait_until("the admin socket", 30, || admin.exists());
        let tok: serde_json::Value =
            serde_json::from_slice(&cli(&admin, &["token", "generate", "--output", "json"]).stdout)
                .unwrap();
        let bundle = dir.path().join("bundle.json");
        std::fs::write(
            &bundle,
            cli(&admin, &["bundle", "show", "--format", "spiffe"]).stdout,
        )
        .unwrap();
        let agent_admin = dir.path().join("agent-admin/admin.sock");
        let agent_args = AgentArgs {
            port,
            data_dir: dir.path().join("agent"),
            socket: socket.clone(),
            bundle,
            token: tok["token"].as_str().unwrap().to_owned(),
            admin: agent_admin.clone(),
            log: dir.path().join("agent.stderr"),
        };
        let agent = agent_args.spawn();
        wait_until("the agent socket", 30, || socket.exists());
        Self {
            admin,
            socket,
            agent_id: tok["agent_spiffe_id"].as_str().unwrap().to_owned(),
            server: Some(server),
            agent: Some(agent),
            agent_args,
            agent_admin,
            dir,
            port,
            config,
        }
    }

    /// A second agent of the trust domain (another "node"), attested with a new join token,
    /// with its own Workload API and admin sockets.
    pub(crate) fn add_agent(&self, name: &str) -> ExtraAgent {
        let tok: serde_json::Value = serde_json::from_slice(
            &cli(&self.admin, &["token", "generate", "--output", "json"]).stdout,
        )
        .unwrap();
        let args = AgentArgs {
            port: self.port,
            data_dir: self.dir.path().join(format!("agent-{name}")),
            socket: self.dir.path().join(format!("agent-{name}/agent.sock")),
            bundle: self.agent_args.bundle.clone(),
            token: tok["token"].as_str().unwrap().to_owned(),
            admin: self
                .dir
                .path()
                .join(format!("agent-{name}-admin/admin.sock")),
            log: self.dir.path().join(format!("agent-{name}.stderr")),
        };
        let proc = args.spawn();
        wait_until("the second agent's sockets", 30, || {
            args.socket.exists() && args.admin.exists()
        });
        ExtraAgent {
            _proc: proc,
            admin: args.admin,
            agent_id: tok["agent_spiffe_id"].as_str().unwrap().to_owned(),
        }
    }

    /// Stops the agent and starts it again on the same data directory (it resumes with its
    /// stored SVID); returns once its sockets are back.
    pub(crate) fn restart_agent(&mut self) {
        self.agent.take();
        let _ = std::fs::remove_file(&self.socket);
        let _ = std::fs::remove_file(&self.agent_admin);
        self.agent = Some(self.agent_args.spawn());
        wait_until("the restarted agent's sockets", 30, || {
            self.socket.exists() && self.agent_admin.exists()
        });
    }

    fn spawn_server(dir: &Path, admin: &Path, port: u16, config: Option<&Path>) -> Proc {
        let mut cmd = tessera();
        cmd.args(["server", "run", "--log-level", "warn"]);
        if let Some(c) = config {
            cmd.arg("--config").arg(c);
        }
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("server.stderr"))
            .unwrap();
        Proc(
            cmd.args(["--bind-address", &format!("127.0.0.1:{port}")])
                .args(["--health-bind-address", "127.0.0.1:0"])
                .arg("--data-dir")
                .arg(dir.join("server"))
                .arg("--admin-socket")
                .arg(admin)
                .stdout(Stdio::null())
                .stderr(stderr)
                .spawn()
                .unwrap(),
        )
    }

    /// Stops the server and starts it again on the same data directory and address; returns
    /// once its admin socket answers.
    pub(crate) fn restart_server(&mut self) {
        self.server.take();
        let _ = std::fs::remove_file(&self.admin);
        self.server = Some(Self::spawn_server(
            self.dir.path(),
            &self.admin,
            self.port,
            self.config.as_deref(),
        ));
        wait_until("the restarted server's admin socket", 30, || {
            tessera()
                .args(["policy", "list"])
                .env("TESSERA_ADMIN_SOCKET", &self.admin)
                .output()
                .is_ok_and(|o| o.status.success())
        });
    }

    pub(crate) fn entry(&self, name: &str, ns: &str, extra: &[&str]) {
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            &format!("spiffe://example.org/{name}"),
        ]
        .into_iter()
        .map(str::to_owned)
        .collect::<Vec<_>>();
        args.extend(["--parent-id".into(), self.agent_id.clone()]);
        args.extend(["--selector".into(), format!("netns:name:{ns}")]);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&self.admin, &refs);
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A `tessera proxy` inside a namespace; access log and stderr in files.
pub(crate) struct Proxy {
    proc: Option<Proc>,
    access: PathBuf,
    stderr: PathBuf,
}

impl Proxy {
    pub(crate) fn start(cp: &ControlPlane, ns: &str, name: &str, args: &[String]) -> Self {
        Self::start_with_path(cp, ns, name, args, None)
    }

    /// As [`Self::start`], with `path` first in the proxy's `PATH` (to stand in for a tool).
    pub(crate) fn start_with_path(
        cp: &ControlPlane,
        ns: &str,
        name: &str,
        args: &[String],
        path: Option<&Path>,
    ) -> Self {
        let access = cp.path(&format!("{name}.access.log"));
        let stderr = cp.path(&format!("{name}.stderr"));
        let mut cmd = Net::exec(ns, env!("CARGO_BIN_EXE_tessera"));
        if let Some(dir) = path {
            let rest = std::env::var("PATH").unwrap_or_default();
            cmd.env("PATH", format!("{}:{rest}", dir.display()));
        }
        let child = cmd
            .arg("proxy")
            .arg("--workload-socket")
            .arg(&cp.socket)
            .arg("--access-log")
            .arg(&access)
            .args(["--log-level", "info"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap();
        let p = Self {
            proc: Some(Proc(child)),
            access,
            stderr,
        };
        // The proxy binds its ports at start and serves once it has an identity, then logs
        // this line.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !p.stderr().contains("proxy serving") {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {name}'s proxy to bind every listener; its log:\n{}",
                p.stderr()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        p
    }

    /// The proxy's process ID (`ip netns exec` execs it in place).
    pub(crate) fn pid(&self) -> u32 {
        self.proc.as_ref().map_or(0, |p| p.0.id())
    }

    pub(crate) fn records(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.access).unwrap_or_default();
        // Only whole lines: the proxy may be writing the last one while we read.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        complete
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub(crate) fn wait_record(
        &self,
        what: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let records = self.records();
            if let Some(r) = records.iter().find(|r| pred(r)) {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; the records:\n{}",
                records
                    .iter()
                    .map(|r| r.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub(crate) fn stop(&mut self) {
        self.proc.take();
    }

    /// Sends `signal` (`TERM`, `INT`, …) to the proxy process (`ip netns exec` execs it, so
    /// the child is the proxy itself).
    pub(crate) fn signal(&self, signal: &str) {
        if let Some(p) = &self.proc {
            let _ = Command::new("kill")
                .args([format!("-{signal}"), p.0.id().to_string()])
                .status();
        }
    }

    /// `Some(success)` once the process has exited; `None` while it runs.
    pub(crate) fn exited(&mut self) -> Option<bool> {
        let p = self.proc.as_mut()?;
        p.0.try_wait().ok().flatten().map(|s| s.success())
    }
}

/// An echo application bound inside `ns`; counts connections and keeps what it received.
#[derive(Clone, Default)]
pub(crate) struct App {
    connections: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<u8>>>,
}

impl App {
    pub(crate) fn start(ns: &str, bind: impl Into<std::net::IpAddr>, port: u16) -> Self {
        let bind = bind.into();
        let l = in_netns(ns, || TcpListener::bind((bind, port)).unwrap());
        let app = Self::default();
        let a = app.clone();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { return };
                a.connections.fetch_add(1, Ordering::SeqCst);
                let a = a.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => {
                                a.received.lock().unwrap().extend_from_slice(&buf[..n]);
                                if s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        }
                    }
                    let _ = s.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        app
    }

    pub(crate) fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub(crate) fn saw(&self, needle: &[u8]) -> bool {
        let r = self.received.lock().unwrap();
        r.windows(needle.len()).any(|w| w == needle)
    }
}

/// An HTTP/1.1 application inside `ns`: answers every request with 200 and "app saw METHOD PATH",
/// one request per connection; remembers the request lines it saw.
pub(crate) fn http_app(ns: &str, port: u16) -> Arc<std::sync::Mutex<Vec<String>>> {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let l = in_netns(ns, || {
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap()
    });
    let s2 = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let seen = s2.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut b = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&b[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&buf);
                let line = text.lines().next().unwrap_or_default().to_owned();
                let body = format!("app saw {line}");
                seen.lock().unwrap().push(line);
                let _ = write!(
                    c,
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
            });
        }
    });
    seen
}

/// One HTTP/1.1 request from inside `ns` to `to`; the response's status line and body.
pub(crate) fn http(ns: &str, to: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    in_netns(ns, || {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(5)).ok()?;
        c.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
        write!(
            c,
            "{method} {path} HTTP/1.1\r\nhost: bar.example\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
        Some((status, body))
    })
}

/// Through `to`, an `:http` port whose policy allows `GET /public/*` and not `POST /admin`:
/// the GET reaches the application (`seen`, from [`http_app`]), the POST gets 403 and never
/// reaches it.
pub(crate) fn public_get_passes_admin_post_does_not(
    ns: &str,
    to: SocketAddr,
    seen: &Mutex<Vec<String>>,
) {
    let (status, body) = http(ns, to, "GET", "/public/index.html").unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, "app saw GET /public/index.html HTTP/1.1");
    let (status, body) = http(ns, to, "POST", "/admin").unwrap();
    assert_eq!(status, 403, "{body}");
    assert!(
        !seen.lock().unwrap().iter().any(|l| l.contains("/admin")),
        "the application saw the denied request"
    );
}

/// From inside `ns`: a connection to `to` that has echoed one message, kept open (with a 15 s
/// read timeout) to see whether something closes it.
pub(crate) fn live_echo(ns: &str, to: SocketAddr) -> TcpStream {
    let mut live = in_netns(ns, || TcpStream::connect(to).unwrap());
    live.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    live.write_all(b"live").unwrap();
    let mut b = [0u8; 4];
    live.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"live");
    live
}

/// From inside `ns`: connect, send `payload`, half-close, read the echo.
pub(crate) fn exchange(ns: &str, to: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    in_netns(ns, || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(payload)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        Ok(back)
    })
}

/// A packet capture on a root-namespace veth.
pub(crate) struct Capture {
    proc: Option<Proc>,
    file: PathBuf,
}

impl Capture {
    pub(crate) fn start(iface: &str, file: PathBuf) -> Self {
        let log = file.with_extension("log");
        let child = Command::new("tcpdump")
            .args([
                "-i",
                iface,
                "--immediate-mode",
                "-U",
                "-Z",
                "root",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("tcpdump (CI installs it)");
        wait_until("tcpdump to listen", 10, || {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("listening on")
        });
        Self {
            proc: Some(Proc(child)),
            file,
        }
    }

    pub(crate) fn stop(&mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(300));
        if let Some(p) = &self.proc {
            // SIGINT: tcpdump flushes and exits.
            let _ = Command::new("kill")
                .args(["-INT", &p.0.id().to_string()])
                .status();
        }
        if let Some(mut p) = self.proc.take() {
            let _ = p.0.wait();
        }
        std::fs::read(&self.file).unwrap()
    }
}

pub(crate) fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

pub(crate) fn write_policy(cp: &ControlPlane, name: &str, text: &str) -> String {
    let p = cp.path(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

pub(crate) fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_owned()).collect()
}
