//! Listeners: the agent API's TLS listener (with the peer's SPIFFE ID handed to handlers) and the
//! admin API's Unix socket (in a directory the server owns, mode 0600).

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tessera_spiffe::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tonic::transport::server::Connected;

use crate::ServerError;

/// What handlers learn about the agent API peer: the SPIFFE ID and serial of the client SVID it
/// proved in this TLS session (none for node attestation, which runs before the agent has one).
#[derive(Debug, Clone, Default)]
pub(crate) struct PeerSvid {
    pub(crate) id: Option<SpiffeId>,
    pub(crate) serial_hex: Option<String>,
    /// The client SVID's notAfter (Unix seconds): a connection outlives the certificate it was
    /// opened with, so every call checks it again (TLS checked it only at the handshake).
    pub(crate) not_after: Option<i64>,
}

/// A TLS connection that tells tonic who the peer is.
pub(crate) struct TlsConn {
    tls: TlsStream<TcpStream>,
    /// Set for a connection without a client certificate.
    anonymous: Option<Anonymous>,
}

/// What a connection without a client certificate holds: one of the [`MAX_ANONYMOUS`] places,
/// given back when it is dropped, and its end: it is only for attestation (at most 30 s a
/// stream), and one held open would keep its place for good, so that 256 idle connections
/// locked every new node out.
struct Anonymous {
    _place: tokio::sync::OwnedSemaphorePermit,
    ends: Pin<Box<tokio::time::Sleep>>,
}

/// How long a connection without a client certificate may last.
pub(crate) const ANONYMOUS_LIFETIME: std::time::Duration = std::time::Duration::from_secs(60);

/// Connections without a client certificate open at once. Only node attestation needs one, and
/// anyone who reaches the port can open them: bounded, so they cannot take the server's memory
/// or descriptors (each may also hold at most `MAX_STREAMS_PER_CONNECTION` streams, each at most
/// 30 s). An agent refused here retries.
pub const MAX_ANONYMOUS: usize = 256;

impl Connected for TlsConn {
    type ConnectInfo = PeerSvid;
    fn connect_info(&self) -> PeerSvid {
        let certs = self.tls.get_ref().1.peer_certificates();
        // The chain was verified by tessera_tls's client verifier during this handshake.
        let id = tessera_tls::peer_spiffe_id(certs);
        let leaf = certs.and_then(|c| c.first());
        let serial_hex = leaf.and_then(|leaf| tessera_tls::leaf_serial_hex(leaf));
        let not_after = leaf.and_then(tessera_tls::leaf_not_after);
        PeerSvid {
            id,
            serial_hex,
            not_after,
        }
    }
}

impl AsyncRead for TlsConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(a) = &mut this.anonymous
            && a.ends.as_mut().poll(cx).is_ready()
        {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "a connection without a certificate lasts at most 60 s",
            )));
        }
        Pin::new(&mut this.tls).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently (a slow or hostile client
/// cannot hold up others), yielding established connections for tonic.
pub(crate) fn tls_incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<TlsConn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = TlsAcceptor::from(config);
    let anonymous = Arc::new(tokio::sync::Semaphore::new(MAX_ANONYMOUS));
    tokio::spawn(async move {
        loop {
            let (tcp, addr) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                break;
            }
            // Agents' Sync streams carry many small HTTP/2 frames (window updates, single
            // changes). With Nagle on, each small write waits for the peer's delayed ACK (~40 ms),
            // so a stream whose window is small drains at one window per 40 ms. The agent side
            // already turns Nagle off (`client::agent_api`).
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(peer = %addr, error = %e, "TCP_NODELAY not set");
            }
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let anonymous = anonymous.clone();
            tokio::spawn(async move {
                let handshake =
                    tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp))
                        .await;
                match handshake {
                    Ok(Ok(tls)) => {
                        let anonymous = if tls.get_ref().1.peer_certificates().is_none() {
                            let Ok(place) = anonymous.try_acquire_owned() else {
                                tracing::warn!(peer = %addr, max = MAX_ANONYMOUS, "agent API: too many connections without a certificate; one closed");
                                return;
                            };
                            Some(Anonymous {
                                _place: place,
                                ends: Box::pin(tokio::time::sleep(ANONYMOUS_LIFETIME)),
                            })
                        } else {
                            None
                        };
                        let _ = tx.send(Ok(TlsConn { tls, anonymous })).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(peer = %addr, error = %e, "agent API TLS handshake failed")
                    }
                    Err(_) => tracing::info!(peer = %addr, "agent API TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Binds the admin socket. Its directory is created (mode 0700) if missing, and refused if it is
/// owned by another user: a directory someone else controls could let them replace the socket.
pub(crate) fn bind_admin_socket(path: &Path) -> Result<UnixListener, ServerError> {
    let io_err = |what: String| move |source| ServerError::Io { what, source };
    let dir = path.parent().ok_or_else(|| {
        ServerError::Invalid(format!("admin socket {} has no directory", path.display()))
    })?;
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(io_err(format!("create {}", dir.display())))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io_err(format!("chmod {}", dir.display())))?;
    }
    let meta = std::fs::metadata(dir).map_err(io_err(format!("stat {}", dir.display())))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me {
        return Err(ServerError::Invalid(format!(
            "admin socket directory {} is owned by uid {}, not by this server (uid {me}); refusing to use it",
            dir.display(),
            meta.uid()
        )));
    }
    // A stale socket from a previous run is replaced; a live one or any other kind of file is
    // refused (see `unix_socket`).
    crate::unix_socket::claim(path)
        .map_err(|e| ServerError::Invalid(format!("admin socket {}: {e}", path.display())))?;
    let listener = UnixListener::bind(path).map_err(io_err(format!("bind {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod {}", path.display())))?;
    Ok(listener)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test fixtures

    use super::*;
    use arc_swap::ArcSwap;
    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use tessera_tls::{ExpectedPeer, SpiffeClientVerifier, SpiffeServerVerifier, SvidResolver};
    use tokio_stream::StreamExt as _;

    /// Accepted agent-API connections have Nagle off (see `tls_incoming`), and one without a client
    /// certificate ends after ANONYMOUS_LIFETIME.
    #[tokio::test]
    async fn accepted_connections_have_nagle_off() {
        let ca = tessera_test_util::TestCa::new("example.org");
        let bundles: tessera_tls::SharedBundles =
            Arc::new(ArcSwap::from_pointee(tessera_test_util::bundle_set(&[&ca])));
        let svid = ca.issue("spiffe://example.org/tessera/server");
        let resolver = SvidResolver::new(
            tessera_tls::certified_key(svid.chain.clone(), PrivateKeyDer::Pkcs8(svid.key)).unwrap(),
        );
        let server = tessera_tls::server_config(
            resolver,
            Arc::new(SpiffeClientVerifier::new(bundles.clone(), false)),
            &[b"h2"],
        )
        .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = tls_incoming(listener, Arc::new(server));

        let client = tessera_tls::client_config(
            Arc::new(SpiffeServerVerifier::new(
                bundles,
                ExpectedPeer::Exact(
                    SpiffeId::parse("spiffe://example.org/tessera/server").unwrap(),
                ),
            )),
            None,
            &[b"h2"],
        )
        .unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        // The client's own setting must not be what the test reads.
        tcp.set_nodelay(false).unwrap();
        let _client = tokio_rustls::TlsConnector::from(Arc::new(client))
            .connect(ServerName::try_from("tessera-server").unwrap(), tcp)
            .await
            .unwrap();
        let mut conn = incoming.next().await.unwrap().unwrap();
        assert!(conn.tls.get_ref().0.nodelay().unwrap(), "Nagle is on");
        // Without a client certificate it lasts ANONYMOUS_LIFETIME, even if the client holds it
        // open and silent (time paused, so the wait is not real).
        tokio::time::pause();
        let start = tokio::time::Instant::now();
        let mut buf = [0u8; 1];
        let err = tokio::io::AsyncReadExt::read(&mut conn, &mut buf)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        assert!(start.elapsed() >= ANONYMOUS_LIFETIME);
    }
}
