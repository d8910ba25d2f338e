//! Where the proxy's sockets are made. A sidecar makes them in its own network namespace; a node
//! proxy serving several workloads makes each workload's sockets inside that workload's network
//! namespace (issue 10), so its listeners are the workload's own ports and its connections leave
//! from the workload's address.
//!
//! A socket belongs to the network namespace of the thread that created it, for its whole life.
//! Entering a namespace (`setns`) changes the calling thread, so it is never done on an async
//! worker (every task on that worker would silently move with it): each namespace gets one
//! dedicated OS thread that enters it once and then only creates sockets (and runs setup
//! commands such as `iptables`) on request. The sockets are then driven by the async runtime
//! like any other.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

type Job = Box<dyn FnOnce() + Send>;

/// A thread inside one network namespace, making sockets there. The namespace stays alive (the
/// file descriptor pins it) until this is dropped.
#[derive(Debug)]
pub struct Netns {
    name: String,
    jobs: Mutex<mpsc::Sender<Job>>,
}

impl Netns {
    /// Starts the thread and enters the network namespace `fd` refers to (`name` is for logs
    /// and errors). Fails when `fd` is not a network namespace: `setns` with `CLONE_NEWNET`
    /// checks the namespace type (setns(2)).
    pub fn enter(fd: OwnedFd, name: &str) -> std::io::Result<Arc<Self>> {
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<std::io::Result<()>>();
        let thread_name = format!("netns-{name}");
        std::thread::Builder::new()
            .name(thread_name.chars().take(15).collect())
            .spawn(move || {
                let entered = nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(std::io::Error::from);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if !ok {
                    return;
                }
                // Runs until the last sender (the `Netns`) is dropped; `fd` is held until then.
                while let Ok(job) = rx.recv() {
                    job();
                }
                drop(fd);
            })?;
        ready_rx
            .recv()
            .map_err(|_| std::io::Error::other("the namespace thread ended"))?
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("{name}: cannot enter the network namespace: {e}"),
                )
            })?;
        Ok(Arc::new(Self {
            name: name.to_owned(),
            jobs: Mutex::new(jobs),
        }))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` on the namespace's thread and waits for its result without blocking the
    /// runtime.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.await.map_err(|_| {
            std::io::Error::other(format!("{}: the namespace thread ended", self.name))
        })
    }

    /// Runs `f` on the namespace's thread, blocking the caller (set-up code off the runtime).
    pub fn run_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::io::Result<T> {
        let (tx, rx) = mpsc::channel();
        self.submit(Box::new(move || {
            let _ = tx.send(f());
        }))?;
        rx.recv().map_err(|_| {
            std::io::Error::other(format!("{}: the namespace thread ended", self.name))
        })
    }

    fn submit(&self, job: Job) -> std::io::Result<()> {
        self.jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(job)
            .map_err(|_| {
                std::io::Error::other(format!("{}: the namespace thread ended", self.name))
            })
    }
}

/// The proxy's socket factory: the namespace sockets are made in, and the mark its own
/// connections carry (so interception rules let them pass).
/// Also the proxy's drain switch: every connection task is spawned through [`Sockets::spawn`], so
/// [`Sockets::drain`] ends them all at once (a node proxy detaching a workload).
#[derive(Debug, Clone, Default)]
pub struct Sockets {
    netns: Option<Arc<Netns>>,
    mark: Option<u32>,
    drain: tokio_util::sync::CancellationToken,
    /// A graceful drain began: serve what is open, invite peers elsewhere (HTTP/2 GOAWAY).
    stopping: tokio_util::sync::CancellationToken,
    /// A drain that keeps the listeners: new connections are accepted and closed at once.
    refusing: Arc<std::sync::atomic::AtomicBool>,
}

impl Sockets {
    /// Sockets in the proxy's own namespace.
    pub fn here(mark: Option<u32>) -> Self {
        Self {
            mark,
            ..Self::default()
        }
    }

    /// Sockets in a workload's namespace.
    pub fn in_netns(netns: Arc<Netns>, mark: Option<u32>) -> Self {
        Self {
            netns: Some(netns),
            mark,
            ..Self::default()
        }
    }

    /// Spawns a connection task that [`Self::drain`] ends.
    pub fn spawn<F>(&self, task: F) -> tokio::task::JoinHandle<()>
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let drain = self.drain.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = drain.cancelled() => {}
                () = task => {}
            }
        })
    }

    /// Begins a graceful drain: tunnel connections send GOAWAY, so peers open their next
    /// streams on new connections (to another process's listener), while open streams finish.
    pub fn stop_accepting(&self) {
        self.stopping.cancel();
    }

    /// Begins a graceful drain that keeps the ports: as [`Self::stop_accepting`], but the
    /// listeners stay open and [`Self::accept`] closes each new connection at once. For a
    /// proxy with no successor taking its ports (a sidecar): a port let go while the workload
    /// still runs could be bound by the workload, and in transparent mode it would then
    /// receive redirected traffic.
    pub fn refuse_new(&self) {
        self.refusing
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.stopping.cancel();
    }

    /// The next connection on `listener` to serve: none once [`Self::refuse_new`] was called
    /// (those are closed as they arrive).
    pub async fn accept(&self, listener: &TcpListener) -> (TcpStream, SocketAddr) {
        loop {
            let (conn, peer) = accept(listener).await;
            if !self.refusing.load(std::sync::atomic::Ordering::SeqCst) {
                return (conn, peer);
            }
            tracing::debug!(%peer, "draining: new connection closed");
        }
    }

    /// Resolves once [`Self::stop_accepting`] was called.
    pub async fn stopping(&self) {
        self.stopping.cancelled().await;
    }

    /// Ends every task spawned through [`Self::spawn`] (their sockets close) and refuses new
    /// ones from then on.
    pub fn drain(&self) {
        self.drain.cancel();
    }

    pub fn netns(&self) -> Option<&Arc<Netns>> {
        self.netns.as_ref()
    }

    async fn socket(&self, v4: bool) -> std::io::Result<TcpSocket> {
        let make = move || {
            if v4 {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
        };
        match &self.netns {
            None => make(),
            Some(ns) => ns.run(make).await?,
        }
    }

    /// A TCP connection; `marked`: it carries the proxy's mark (connections the interception
    /// rules must not redirect back into the proxy).
    pub async fn connect(&self, addr: SocketAddr, marked: bool) -> std::io::Result<TcpStream> {
        self.connect_inner(addr, marked, false).await
    }

    /// A TCP connection to a tunnel port, on which this side speaks first at once (the TLS
    /// ClientHello), with ACKs held back for the data this side sends next (see
    /// [`delay_acks`]): the handshake's last ACK leaves with the ClientHello, so the peer's
    /// kernel completes the connection and has the ClientHello in the same segment, and the
    /// peer proxy is woken once for both. Only for a side that speaks first: a server that
    /// speaks first (a greeting) would wait for the delayed ACK to see the connection at all.
    pub async fn connect_speaking_first(
        &self,
        addr: SocketAddr,
        marked: bool,
    ) -> std::io::Result<TcpStream> {
        let tcp = self.connect_inner(addr, marked, true).await?;
        // Completing the handshake with a delayed ACK puts the socket back in quick-ACK mode
        // (Linux `tcp_rcv_synsent_state_process`); leave it again for the TLS handshake.
        delay_acks(&tcp);
        Ok(tcp)
    }

    async fn connect_inner(
        &self,
        addr: SocketAddr,
        marked: bool,
        speaks_first: bool,
    ) -> std::io::Result<TcpStream> {
        let sock = self.socket(addr.is_ipv4()).await?;
        if let (true, Some(m)) = (marked, self.mark) {
            crate::transparent::set_mark(&sock, m)?;
        }
        sock.set_nodelay(true)?;
        if speaks_first {
            delay_acks(&sock);
        }
        tokio::time::timeout(CONNECT_TIMEOUT, sock.connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))?
    }

    /// A listener on `addr`. In a workload's namespace it is bound with `SO_REUSEPORT`, so a
    /// new node proxy process can bind the same ports while the old one drains (an upgrade),
    /// and the namespace's `tcp_migrate_req` (set at attach) hands the old listener's pending
    /// connections to the new one when it closes.
    /// Every connection it accepts has Nagle off (see `nodelay_for_accepted`): the proxy relays
    /// what it reads as soon as it reads it, and Nagle would hold a small write back until the
    /// previous one is acknowledged.
    pub async fn listen(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        let l = match &self.netns {
            None => TcpListener::bind(addr).await?,
            Some(ns) => {
                TcpListener::from_std(ns.run(move || raw_listener(addr, true, false)).await??)?
            }
        };
        nodelay_for_accepted(&l);
        Ok(l)
    }

    /// As [`Self::listen`], for an IPv6 address that must not also take IPv4 connections
    /// (`IPV6_V6ONLY`): the IPv6 twin of an IPv4 listener on the same port.
    pub async fn listen_v6_only(&self, addr: SocketAddr) -> std::io::Result<TcpListener> {
        let l = match &self.netns {
            None => raw_listener(addr, false, true)?,
            Some(ns) => ns.run(move || raw_listener(addr, true, true)).await??,
        };
        let l = TcpListener::from_std(l)?;
        nodelay_for_accepted(&l);
        Ok(l)
    }
}

/// Holds ACKs back for the data this side sends next (`TCP_QUICKACK` off: Linux's "ping-pong"
/// mode, which the kernel enters by itself once it sees replies follow requests). A TLS
/// handshake is request and reply from its first byte, so each flight carries the ACK of the
/// one before instead of a bare ACK segment that costs both kernels a packet and may wake the
/// peer. Bulk data is still ACKed at once (more than one full segment received), and a delayed
/// ACK that finds nothing to ride on turns the mode off again. A best-effort optimization: an
/// error leaves the socket as it was.
pub fn delay_acks(sock: &impl std::os::fd::AsFd) {
    let _ = rustix::net::sockopt::set_tcp_quickack(sock, false);
}

/// Turns Nagle off for every connection `listener` accepts, with one system call for the
/// listener instead of one per connection: Linux builds an accepted socket from a copy of the
/// listener's (`sk_clone_lock`), `TCP_NODELAY` included. Best effort, as setting it per
/// connection was: an error leaves Nagle on, which costs latency, never correctness.
fn nodelay_for_accepted(listener: &TcpListener) {
    let _ = rustix::net::sockopt::set_tcp_nodelay(listener, true);
}

/// The next connection on `listener`. Accept errors (out of file descriptors, out of memory, a
/// connection reset before it was accepted) are retried after a pause that grows to one second,
/// with one log line per run of failures, instead of spinning on the error.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    let mut pause = Duration::from_millis(5);
    let mut failures = 0u64;
    loop {
        match listener.accept().await {
            Ok(c) => {
                if failures > 0 {
                    tracing::info!(failures, "accepting connections again");
                }
                return c;
            }
            Err(e) => {
                if failures == 0 {
                    let addr = listener.local_addr().ok();
                    tracing::warn!(error = %e, ?addr, "cannot accept a connection; retrying with backoff");
                }
                failures += 1;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// A non-blocking listener with `SO_REUSEADDR`, with `reuseport` also `SO_REUSEPORT` (in a
/// workload's namespace, see [`Sockets::listen`]), and with `v6_only` an IPv6 socket that takes
/// no IPv4 connections. The kernel lets only sockets of the same effective user join a
/// reuseport group, so another user cannot steal connections.
fn raw_listener(
    addr: SocketAddr,
    reuseport: bool,
    v6_only: bool,
) -> std::io::Result<std::net::TcpListener> {
    use nix::sys::socket::{
        AddressFamily, Backlog, SockFlag, SockType, SockaddrIn, SockaddrIn6, bind, listen,
        setsockopt, socket, sockopt,
    };
    use std::os::fd::AsRawFd as _;
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
        None,
    )?;
    setsockopt(&fd, sockopt::ReuseAddr, &true)?;
    if reuseport {
        setsockopt(&fd, sockopt::ReusePort, &true)?;
    }
    if v6_only && addr.is_ipv6() {
        setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    }
    match addr {
        SocketAddr::V4(a) => bind(fd.as_raw_fd(), &SockaddrIn::from(a))?,
        SocketAddr::V6(a) => bind(fd.as_raw_fd(), &SockaddrIn6::from(a))?,
    }
    listen(&fd, Backlog::new(1024)?)?;
    Ok(std::net::TcpListener::from(fd))
}

/// Sets the namespace's `net.ipv4.tcp_migrate_req` (from its thread: `/proc/sys/net` shows the
/// opening thread's namespace), so connections waiting in a closing reuseport listener's queue
/// move to another listener of the group instead of being reset.
pub fn enable_request_migration() -> std::io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_file_that_is_not_a_network_namespace_is_refused() {
        let f = std::fs::File::open("/proc/self/status").unwrap();
        let e = Netns::enter(f.into(), "not-a-netns").unwrap_err();
        assert!(e.to_string().contains("not-a-netns"), "{e}");
        // Another namespace type: the mount namespace.
        if let Ok(f) = std::fs::File::open("/proc/self/ns/mnt") {
            assert!(Netns::enter(f.into(), "mnt").is_err());
        }
    }

    #[tokio::test]
    async fn drain_ends_connection_tasks() {
        let s = Sockets::here(None);
        let l = s.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut c = s.connect(addr, false).await.unwrap();
        let (mut held, _) = l.accept().await.unwrap();
        // A task that would hold the accepted socket forever.
        let t = s.spawn(async move {
            let mut b = [0u8; 1];
            let _ = tokio::io::AsyncReadExt::read(&mut held, &mut b).await;
            std::future::pending::<()>().await;
        });
        s.drain();
        t.await.unwrap();
        // The socket was dropped with the task: the peer sees EOF.
        let mut b = [0u8; 1];
        let n = tokio::io::AsyncReadExt::read(&mut c, &mut b).await.unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn sockets_here_listen_and_connect() {
        let s = Sockets::here(None);
        let l = s.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let c = s.connect(addr, true).await.unwrap();
        assert_eq!(c.peer_addr().unwrap(), addr);
    }

    #[tokio::test]
    async fn only_a_side_that_speaks_first_holds_its_acks_back() {
        use rustix::net::sockopt::tcp_quickack;
        let s = Sockets::here(None);
        let l = s.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let tunnel_port = s.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        delay_acks(&tunnel_port);
        // A plain connection (to a workload that may greet first) keeps quick ACKs.
        let plain = s.connect(addr, false).await.unwrap();
        assert!(tcp_quickack(&plain).unwrap());
        // A tunnel connection leaves quick-ACK mode, and is still out of it once connected
        // (completing the handshake had put it back).
        let tunnel = s.connect_speaking_first(addr, false).await.unwrap();
        assert!(!tcp_quickack(&tunnel).unwrap());
        let (accepted, _) = accept(&l).await;
        assert!(tcp_quickack(&accepted).unwrap());
        // Connections accepted on a listener set so inherit it.
        let _c = s
            .connect(tunnel_port.local_addr().unwrap(), false)
            .await
            .unwrap();
        let (accepted, _) = accept(&tunnel_port).await;
        assert!(!tcp_quickack(&accepted).unwrap());
    }

    #[tokio::test]
    async fn connections_accepted_on_a_proxy_listener_have_nagle_off() {
        // A listener bound without `Sockets::listen` keeps the kernel's default, Nagle on, for
        // what it accepts (so the check below can fail)...
        let plain = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _a = TcpStream::connect(plain.local_addr().unwrap())
            .await
            .unwrap();
        let (accepted, _) = accept(&plain).await;
        assert!(!accepted.nodelay().unwrap());
        // ...every listener of the proxy has it off from the start, no call per connection.
        let s = Sockets::here(None);
        let l = s.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let _b = s.connect(l.local_addr().unwrap(), false).await.unwrap();
        let (accepted, _) = accept(&l).await;
        assert!(accepted.nodelay().unwrap());
    }
}
