//! The outbound side: workload connections (from an explicit listener or intercepted) become
//! streams of an HTTP/2 CONNECT tunnel over mutual TLS to the destination's proxy. Tunnel
//! connections are pooled per (source identity, destination identity, tunnel address), and
//! streams multiplexed on them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::ServerName;
use tessera_spiffe::SpiffeId;
use tokio::net::{TcpListener, TcpStream};

use crate::config::{DestinationMap, OutboundListener, Unmapped};
use crate::identity::Identity;
use crate::readahead::ReadAhead;
use crate::telemetry::{AccessRecord, Direction, Telemetry};
use crate::tls::{ClientConfigs, TunnelProtocol};

use crate::sockets::CONNECT_TIMEOUT;

/// Why a tunnel stream could not be opened; the text goes to the access log.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("the proxy has no identity yet")]
    NoIdentity,
    #[error("connect to tunnel {0}: {1}")]
    Connect(SocketAddr, String),
    #[error("TLS handshake with {0}: {1}")]
    Tls(SocketAddr, String),
    #[error("HTTP/2 with {0}: {1}")]
    H2(SocketAddr, String),
    #[error("peer refused CONNECT {target}: HTTP {status}")]
    Refused { target: SocketAddr, status: u16 },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    src: Arc<SpiffeId>,
    dst: SpiffeId,
    tunnel: SocketAddr,
}

/// The most streams this side opens on one pooled tunnel connection; the next stream goes over
/// another connection. Below the peer's advertised limit (`inbound::MAX_STREAMS`), so a stream is
/// never queued behind the peer's limit waiting for another to end, which for long-lived
/// connections could be forever. The same default as ztunnel's pool (100): enough to spread the
/// handshake's cost, few enough that one TCP connection's congestion window and one connection's
/// loss do not hold up every connection between two workloads.
pub const STREAMS_PER_CONNECTION: usize = 100;

/// A pooled tunnel connection, and what decides when it is too old to carry new streams.
#[derive(Debug)]
struct Pooled {
    sender: SendRequest<Empty<Bytes>>,
    /// [`Identity::generation`] when it was dialed: after this proxy's SVID rotated it still
    /// presents the old one, and after a bundle change its peer was verified against the old
    /// bundle. New streams then go over a new connection; open ones finish on this one.
    generation: u64,
    /// The peer's leaf notAfter (Unix seconds): past it, the peer's identity is no longer proven.
    peer_not_after: Option<i64>,
    /// Streams open on it (each held by a [`Slot`]).
    open: Arc<AtomicUsize>,
}

impl Pooled {
    fn usable(&self, generation: u64) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        !self.sender.is_closed()
            && self.generation == generation
            && self.peer_not_after.is_some_and(|t| now < t)
    }

    /// A stream's place on this connection, if it has room for one more.
    fn take_slot(&self) -> Option<Slot> {
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < STREAMS_PER_CONNECTION).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(Some(self.open.clone())))
    }
}

/// One stream's place on a pooled connection, given back when the stream ends (dropped).
#[derive(Debug, Default)]
struct Slot(Option<Arc<AtomicUsize>>);

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(open) = &self.0 {
            open.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// The tunnel connections of one key: those with room are used first; idle ones beyond the
/// first are dropped (their connection closes once its last stream ends).
fn pick(conns: &mut Vec<Pooled>, generation: u64) -> Option<(SendRequest<Empty<Bytes>>, Slot)> {
    conns.retain(|c| c.usable(generation));
    let mut idle_kept = false;
    conns.retain(|c| {
        let idle = c.open.load(Ordering::Acquire) == 0;
        let keep = !idle || !idle_kept;
        idle_kept |= idle;
        keep
    });
    conns
        .iter()
        .find_map(|c| c.take_slot().map(|slot| (c.sender.clone(), slot)))
}

/// An open HTTP/2 CONNECT stream. Its connection counts it as open until it is dropped.
#[derive(Debug)]
pub struct H2Stream {
    io: Upgraded,
    _slot: Slot,
}

impl hyper::rt::Read for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// Opens tunnel streams.
#[derive(Debug)]
pub struct Outbound {
    identity: Arc<Identity>,
    configs: ClientConfigs,
    pool: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    /// Per key, the turn to dial a new pooled connection (see `open`).
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    pooling: bool,
    protocol: TunnelProtocol,
    /// Where connections are made (this namespace or a workload's) and their mark.
    sockets: crate::sockets::Sockets,
    telemetry: Arc<Telemetry>,
}

/// An open tunnel stream of either protocol.
#[derive(Debug)]
pub enum TunnelStream {
    H2(TokioIo<H2Stream>),
    /// Admitted, its keys out of rustls: carried with [`crate::sealed::bidirectional`].
    Stream(Box<crate::sealed::Sealed>),
}

impl Outbound {
    pub fn new(
        identity: Arc<Identity>,
        telemetry: Arc<Telemetry>,
        pooling: bool,
        sockets: crate::sockets::Sockets,
    ) -> Self {
        Self {
            identity,
            configs: ClientConfigs::default(),
            pool: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            pooling,
            protocol: TunnelProtocol::H2,
            sockets,
            telemetry,
        }
    }

    /// Carries connections with `protocol` (HTTP/2 CONNECT unless set).
    pub fn with_protocol(mut self, protocol: TunnelProtocol) -> Self {
        self.protocol = protocol;
        self.configs = ClientConfigs::new(protocol);
        self
    }

    /// A tunnel stream of the configured protocol to `target` through the proxy at `tunnel`,
    /// which must prove `dst_id` in the TLS handshake. `client`: the workload's connection, whose
    /// bytes already there the stream tunnel sends with its handshake's last flight.
    pub async fn open_stream(
        &self,
        dst_id: &SpiffeId,
        tunnel: SocketAddr,
        target: SocketAddr,
        client: Option<&TcpStream>,
    ) -> Result<TunnelStream, TunnelError> {
        match self.protocol {
            TunnelProtocol::H2 => Ok(TunnelStream::H2(TokioIo::new(
                self.open(dst_id, tunnel, target).await?,
            ))),
            TunnelProtocol::Stream => Ok(TunnelStream::Stream(Box::new(
                self.open_sealed(dst_id, tunnel, target, client).await?,
            ))),
        }
    }

    /// The stream tunnel: a new mutual-TLS connection for this one connection, the target (and
    /// the workload's first bytes) with the client's Finished, and the peer's admission result.
    async fn open_sealed(
        &self,
        dst_id: &SpiffeId,
        tunnel: SocketAddr,
        target: SocketAddr,
        client: Option<&TcpStream>,
    ) -> Result<crate::sealed::Sealed, TunnelError> {
        // The request is queued in rustls, sent only once the handshake is complete (see
        // `stream::request`); the last flight is held for the workload's first bytes.
        let tls = self
            .handshake(dst_id, tunnel, Some(crate::stream::request(target)))
            .await?;
        let proto = |e: std::io::Error| TunnelError::H2(tunnel, format!("stream tunnel: {e}"));
        let mut sealed = crate::sealed::Sealed::from_client(tls).map_err(proto)?;
        if let Some(client) = client {
            sealed.send_early(client).await.map_err(proto)?;
        }
        let (status, reason) = tokio::time::timeout(CONNECT_TIMEOUT, sealed.read_admission())
            .await
            .map_err(|_| TunnelError::H2(tunnel, "stream tunnel: no response".into()))?
            .map_err(proto)?;
        if status != 200 {
            tracing::debug!(%target, status, %reason, "peer refused the stream tunnel");
            return Err(TunnelError::Refused { target, status });
        }
        Ok(sealed)
    }

    /// A verified mutual-TLS connection to the proxy at `tunnel`, which must prove `dst_id` and
    /// select this side's ALPN; `first` is sent as soon as the handshake is complete.
    async fn handshake(
        &self,
        dst_id: &SpiffeId,
        tunnel: SocketAddr,
        first: Option<Vec<u8>>,
    ) -> Result<tokio_rustls::client::TlsStream<ReadAhead<TcpStream>>, TunnelError> {
        let cfg = self
            .configs
            .get(&self.identity, dst_id)
            .ok_or(TunnelError::NoIdentity)?;
        let tcp = self
            .sockets
            .connect_speaking_first(tunnel, true)
            .await
            .map_err(|e| TunnelError::Connect(tunnel, e.to_string()))?;
        // The server name is not what is verified (the SPIFFE ID is); an IP address sends no SNI.
        let name = ServerName::IpAddress(tunnel.ip().into());
        let (cfg, io) = if self.protocol == TunnelProtocol::Stream {
            // Its own copy of the config, whose key log keeps this connection's traffic secrets
            // for the record layer of the data phase (`crate::sealed`).
            let log = Arc::default();
            (
                crate::tls::client_config_for(&cfg, &log),
                ReadAhead::new(tcp).with_secrets(log).hold_last_flight(),
            )
        } else {
            (cfg, ReadAhead::new(tcp))
        };
        let tls = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio_rustls::TlsConnector::from(cfg)
                .connect_with(name, io, |c| {
                    if let Some(first) = first {
                        // Buffered by rustls until the handshake is complete.
                        let _ = std::io::Write::write_all(&mut c.writer(), &first);
                    }
                })
                .into_fallible(),
        )
        .await
        .map_err(|_| TunnelError::Tls(tunnel, "timed out".into()))
        .and_then(|r| {
            r.map_err(|(e, mut io)| {
                // A held alert (the server failed verification after its first protected
                // record) still tells the peer why, best effort: the connection ends anyway.
                let alert = io.take_held();
                if !alert.is_empty() {
                    let _ = io.get_ref().try_write(&alert);
                }
                TunnelError::Tls(tunnel, e.to_string())
            })
        });
        self.telemetry.handshake(false, tls.is_ok());
        let mut tls = tls?;
        let want = self.protocol.alpn();
        if tls.get_ref().1.alpn_protocol() != Some(want) {
            return Err(TunnelError::Tls(
                tunnel,
                format!("peer did not select ALPN {}", String::from_utf8_lossy(want)),
            ));
        }
        if self.protocol == TunnelProtocol::H2 {
            // HTTP/2 keeps its keys in rustls: large reads, not record-aligned ones.
            tls.get_mut().0.unaligned();
        }
        Ok(tls)
    }

    /// A bidirectional HTTP/2 CONNECT stream to `target` through the proxy at `tunnel`, which
    /// must prove `dst_id` in the TLS handshake.
    pub async fn open(
        &self,
        dst_id: &SpiffeId,
        tunnel: SocketAddr,
        target: SocketAddr,
    ) -> Result<H2Stream, TunnelError> {
        let src = self.identity.spiffe_id().ok_or(TunnelError::NoIdentity)?;
        let key = PoolKey {
            src,
            dst: dst_id.clone(),
            tunnel,
        };
        let (sender, slot) = if self.pooling {
            match self.pooled(&key) {
                Some(s) => s,
                None => {
                    // One dial at a time per key: streams opened together while no connection
                    // has room wait for that one and share it, instead of each dialing a
                    // connection of its own that would then stay pooled, idle.
                    let gate = self
                        .dialing
                        .lock()
                        .ok()
                        .map(|mut g| g.entry(key.clone()).or_default().clone());
                    let _turn = match &gate {
                        Some(g) => Some(g.lock().await),
                        None => None,
                    };
                    match self.pooled(&key) {
                        Some(s) => s,
                        None => self.dial(&key).await?,
                    }
                }
            }
        } else {
            self.dial(&key).await?
        };
        match self.connect(sender, target, tunnel).await {
            Err(TunnelError::H2(..)) if self.pooling => {
                // The pooled connection died under us: it is not picked again (closed), and
                // this stream is dialed once more.
                drop(slot);
                let (sender, slot) = self.dial(&key).await?;
                let io = self.connect(sender, target, tunnel).await?;
                Ok(H2Stream { io, _slot: slot })
            }
            other => other.map(|io| H2Stream { io, _slot: slot }),
        }
    }

    /// A stream's place on a pooled connection of `key` with room, if there is one.
    fn pooled(&self, key: &PoolKey) -> Option<(SendRequest<Empty<Bytes>>, Slot)> {
        let generation = self.identity.generation();
        let mut p = self.pool.lock().ok()?;
        let conns = p.get_mut(key)?;
        let found = pick(conns, generation);
        if conns.is_empty() {
            p.remove(key);
        }
        found
    }

    /// Tunnel connections held in the pool (all keys).
    pub fn pooled_connections(&self) -> usize {
        self.pool
            .lock()
            .map_or(0, |p| p.values().map(Vec::len).sum())
    }

    async fn connect(
        &self,
        mut sender: SendRequest<Empty<Bytes>>,
        target: SocketAddr,
        tunnel: SocketAddr,
    ) -> Result<Upgraded, TunnelError> {
        let h2 = |e: hyper::Error| TunnelError::H2(tunnel, e.to_string());
        sender.ready().await.map_err(h2)?;
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(target.to_string())
            .body(Empty::<Bytes>::new())
            .map_err(|e| TunnelError::H2(tunnel, e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(h2)?;
        if resp.status() != http::StatusCode::OK {
            return Err(TunnelError::Refused {
                target,
                status: resp.status().as_u16(),
            });
        }
        hyper::upgrade::on(resp).await.map_err(h2)
    }

    async fn dial(&self, key: &PoolKey) -> Result<(SendRequest<Empty<Bytes>>, Slot), TunnelError> {
        let tunnel = key.tunnel;
        // Read before the handshake: a change during it makes the connection stale at once.
        let generation = self.identity.generation();
        let tls = self.handshake(&key.dst, tunnel, None).await?;
        let peer_not_after = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(tessera_tls::leaf_not_after);
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .max_frame_size(256 << 10)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| TunnelError::H2(tunnel, e.to_string()))?;
        let pooled = self.telemetry.pooled.clone();
        pooled.inc();
        self.sockets.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, %tunnel, "tunnel connection ended");
            }
            pooled.dec();
        });
        if !self.pooling {
            return Ok((sender, Slot::default()));
        }
        let pooled = Pooled {
            sender: sender.clone(),
            generation,
            peer_not_after,
            open: Arc::default(),
        };
        // Never fails: a new connection has room.
        let slot = pooled.take_slot().unwrap_or_default();
        if let Ok(mut p) = self.pool.lock() {
            p.entry(key.clone()).or_default().push(pooled);
        }
        Ok((sender, slot))
    }

    /// Proxies one workload connection to `target` through the tunnel and writes its access record.
    pub async fn proxy(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        dst_id: &SpiffeId,
        tunnel: SocketAddr,
        target: SocketAddr,
    ) {
        let start = Instant::now();
        let mut rec = AccessRecord::new(Direction::Outbound);
        rec.src_spiffe_id = self.identity.spiffe_id().map(|i| i.to_string());
        rec.dst_spiffe_id = Some(dst_id.to_string());
        rec.src_addr = Some(peer);
        rec.dst_addr = Some(target);
        // Boxed: the connect and handshake state lives on the heap only while it runs, not in
        // this connection's task for its whole life (memory per idle connection).
        match Box::pin(self.open_stream(dst_id, tunnel, target, Some(&client))).await {
            Err(e) => {
                rec.reason = e.to_string();
            }
            Ok(stream) => {
                let active = self.telemetry.active_guard();
                let r = match stream {
                    TunnelStream::H2(mut up) => {
                        crate::copy::bidirectional(&mut client, &mut up).await
                    }
                    // The data phase on the handshake's keys, records sealed in place.
                    TunnelStream::Stream(mut tunnel) => {
                        crate::sealed::bidirectional(&mut client, &mut tunnel).await
                    }
                };
                drop(active);
                rec.decision = "allow";
                match r {
                    Ok((sent, received)) => {
                        rec.bytes_sent = sent;
                        rec.bytes_received = received;
                        rec.reason = "closed".into();
                    }
                    Err(e) => rec.reason = format!("copy: {e}"),
                }
            }
        }
        self.telemetry.record(rec, start.elapsed());
    }

    /// Serves an explicit listener (`--outbound`).
    pub async fn serve_explicit(self: Arc<Self>, listener: TcpListener, spec: OutboundListener) {
        let spec = Arc::new(spec);
        loop {
            let (client, peer) = self.sockets.accept(&listener).await;
            let this = self.clone();
            let spec = spec.clone();
            self.sockets.spawn(async move {
                let target = match tokio::net::lookup_host(spec.destination.as_str()).await {
                    Ok(mut addrs) => addrs.next(),
                    Err(_) => None,
                };
                let Some(target) = target else {
                    let mut rec = AccessRecord::new(Direction::Outbound);
                    rec.dst_spiffe_id = Some(spec.spiffe_id.to_string());
                    rec.src_addr = Some(peer);
                    rec.reason = format!("cannot resolve {}", spec.destination);
                    this.telemetry.record(rec, Duration::ZERO);
                    return;
                };
                let tunnel = SocketAddr::new(target.ip(), crate::config::TUNNEL_PORT);
                this.proxy(client, peer, &spec.spiffe_id, tunnel, target)
                    .await;
            });
        }
    }

    /// Serves the transparent capture port: the original destination comes from
    /// `SO_ORIGINAL_DST`, the identity to expect from the destination map (as it is when the
    /// connection arrives: the config file may replace it, `crate::reload`).
    pub async fn serve_transparent(
        self: Arc<Self>,
        listener: TcpListener,
        map: Arc<arc_swap::ArcSwap<DestinationMap>>,
        unmapped: Unmapped,
    ) {
        loop {
            let (client, peer) = self.sockets.accept(&listener).await;
            let this = self.clone();
            let map = map.clone();
            self.sockets.spawn(async move {
                let target = match crate::transparent::original_dst(&client) {
                    Ok(t) => t,
                    Err(e) => {
                        let mut rec = AccessRecord::new(Direction::Outbound);
                        rec.src_addr = Some(peer);
                        rec.reason = format!("no original destination (SO_ORIGINAL_DST): {e}");
                        this.telemetry.record(rec, Duration::ZERO);
                        return;
                    }
                };
                // Loopback is never intercepted (the rules exempt it), so a loopback original
                // destination means a process connected to this capture port directly: there
                // is no destination to reach, and passing it through would connect the proxy
                // to itself, again and again.
                if target.ip().is_loopback() {
                    let mut rec = AccessRecord::new(Direction::Outbound);
                    rec.src_addr = Some(peer);
                    rec.dst_addr = Some(target);
                    rec.reason = format!(
                        "connected to the capture port directly (original destination {target} is loopback, which is never intercepted)"
                    );
                    this.telemetry.record(rec, Duration::ZERO);
                    return;
                }
                let expected = map
                    .load()
                    .lookup(target)
                    .map(|d| (d.spiffe_id.clone(), d.tunnel_port));
                match expected {
                    Some((spiffe_id, tunnel_port)) => {
                        let tunnel = SocketAddr::new(target.ip(), tunnel_port);
                        this.proxy(client, peer, &spiffe_id, tunnel, target).await;
                    }
                    None => this.unmapped(client, peer, target, unmapped).await,
                }
            });
        }
    }

    async fn unmapped(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        target: SocketAddr,
        mode: Unmapped,
    ) {
        let start = Instant::now();
        let mut rec = AccessRecord::new(Direction::Passthrough);
        rec.src_spiffe_id = self.identity.spiffe_id().map(|i| i.to_string());
        rec.src_addr = Some(peer);
        rec.dst_addr = Some(target);
        match mode {
            Unmapped::Deny => {
                rec.reason = "destination not in the destination map (--unmapped deny)".into();
            }
            Unmapped::Passthrough => {
                tracing::warn!(%target, "unmapped destination passed through in PLAINTEXT");
                match self.sockets.connect(target, true).await {
                    Ok(mut upstream) => {
                        let r = crate::copy::bidirectional(&mut client, &mut upstream).await;
                        rec.decision = "allow";
                        rec.reason = "unmapped destination: plaintext passthrough".into();
                        if let Ok((s, r)) = r {
                            rec.bytes_sent = s;
                            rec.bytes_received = r;
                        }
                    }
                    Err(e) => rec.reason = format!("passthrough connect: {e}"),
                }
            }
        }
        self.telemetry.record(rec, start.elapsed());
    }
}
