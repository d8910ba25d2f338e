//! The Workload API's Unix socket: binding it, and handing each connection's caller (pinned by a
//! pidfd at accept time) to the request handlers.
//!
//! The caller is pinned when the connection is accepted (`SO_PEERPIDFD`, else `pidfd_open`), not
//! when a request arrives: a pidfd taken later could not tell whether the process that connected
//! has since exited and its pid been reused.

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use tessera_workload_attest::{AttestError, PeerCreds, PeerProcess};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::server::{Connected, UdsConnectInfo};

use super::WorkloadApiError;

/// The caller on the other end of a Workload API connection, as pinned at accept time (or why it
/// could not be pinned; every request on that connection is then refused with that reason).
#[derive(Debug, Clone)]
pub struct Caller(Result<PeerProcess, Arc<AttestError>>);

/// An accepted Workload API connection that tells tonic who its caller is.
#[derive(Debug)]
pub struct CallerConn {
    stream: UnixStream,
    caller: Caller,
}

impl CallerConn {
    /// Pins the peer of `stream`. Cheap (a few system calls, no `/proc` reads), so it runs on the
    /// accepting task.
    pub fn new(stream: UnixStream) -> Self {
        let caller = Caller(PeerProcess::from_socket(&stream).map_err(Arc::new));
        Self { stream, caller }
    }
}

impl Connected for CallerConn {
    type ConnectInfo = Caller;
    fn connect_info(&self) -> Caller {
        self.caller.clone()
    }
}

impl AsyncRead for CallerConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for CallerConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
}

/// The caller of a request: the one pinned by [`CallerConn`], or, for a server built on tonic's
/// plain Unix listener, the credentials in `UdsConnectInfo` pinned now.
pub(crate) fn caller_of<T>(req: &tonic::Request<T>) -> Result<PeerProcess, WorkloadApiError> {
    if let Some(Caller(caller)) = req.extensions().get::<Caller>() {
        return caller
            .clone()
            .map_err(|e| WorkloadApiError::AttestAtAccept(e.clone()));
    }
    let cred = req
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .ok_or(WorkloadApiError::NoPeerCredentials)?;
    Ok(PeerProcess::open(PeerCreds::try_from(cred)?)?)
}

/// Accepted connections, each with its caller pinned. An accept error (out of file descriptors,
/// say) is logged and retried after a pause instead of ending the server or spinning.
/// The error is logged once per run of failures, not once per retry (20 lines a second).
pub fn incoming(listener: UnixListener) -> impl Stream<Item = Result<CallerConn, Infallible>> {
    futures::stream::unfold(listener, |listener| async move {
        let mut failing = false;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    if failing {
                        tracing::info!("Workload API: accepting connections again");
                    }
                    return Some((Ok(CallerConn::new(stream)), listener));
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %e, "Workload API: accepting a connection failed; retrying every 50 ms");
                    }
                    failing = true;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    })
}

/// Binds the Workload API socket at `path`.
///
/// The directory is created (mode 0755) if missing. A stale socket left by a previous run is
/// replaced, but a socket another live process is serving on, or any other kind of file, is
/// refused. The socket is made mode 0777, as SPIRE's is: any local process may connect, and
/// attestation decides what it receives (SPIFFE Workload Endpoint §5: callers are identified
/// without their participation, not by who may open the socket).
pub async fn bind(path: &Path) -> Result<UnixListener, WorkloadApiError> {
    let socket_err = |what| {
        let path = path.to_path_buf();
        move |source| WorkloadApiError::Socket { path, what, source }
    };
    let path_err = |reason: &str| WorkloadApiError::SocketPath {
        path: path.to_path_buf(),
        reason: reason.to_owned(),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).map_err(socket_err("creating its directory"))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .map_err(socket_err("setting its directory's mode"))?;
    }
    // A directory another user owns could let that user swap the socket for one of their own
    // and hand workloads forged identities and bundles: refuse it.
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        use std::os::unix::fs::MetadataExt as _;
        let owner = std::fs::metadata(dir)
            .map_err(socket_err("reading its directory"))?
            .uid();
        let me = nix::unistd::geteuid().as_raw();
        if owner != me {
            return Err(path_err(&format!(
                "its directory is owned by uid {owner}, not by this agent (uid {me})"
            )));
        }
    }
    // A live socket belongs to a running agent: taking its path would silently cut its
    // workloads off (see `tessera_server::unix_socket`).
    tessera_server::unix_socket::claim(path).map_err(|e| path_err(&e))?;
    let listener = UnixListener::bind(path).map_err(socket_err("binding"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))
        .map_err(socket_err("setting its mode"))?;
    Ok(listener)
}
