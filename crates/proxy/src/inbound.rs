//! The inbound side: mutual TLS on the tunnel port, then HTTP/2 CONNECT streams. The source
//! identity is taken only from the client certificate verified in this TLS session; the CONNECT
//! target must be this workload's address and a declared port, the policy must allow the source
//! on that port, and only then does the proxy connect to `127.0.0.1:PORT`. Nothing else is
//! relayed anywhere.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Empty;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tessera_policy::PolicySet;
use tessera_spiffe::SpiffeId;
use tokio::net::{TcpListener, TcpStream};

use crate::config::{InboundMode, InboundPort, Protocol};
use crate::identity::Identity;
use crate::telemetry::{AccessRecord, Direction, Telemetry};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Concurrent CONNECT streams on one tunnel connection (advertised in SETTINGS, RFC 9113
/// §6.5.2). Each stream holds a connection to the application, so one peer connection may hold
/// only this many descriptors; pooling clients open another tunnel connection for more (ours at
/// `outbound::STREAMS_PER_CONNECTION`, kept below this so no stream waits for a slot).
pub const MAX_STREAMS: u32 = 128;

/// The inbound side's state.
#[derive(Debug)]
pub struct Inbound {
    identity: Arc<Identity>,
    policy: Arc<ArcSwap<PolicySet>>,
    ports: HashMap<u16, Protocol>,
    /// Extra addresses a CONNECT may name as this workload's (besides the address the tunnel
    /// connection arrived on).
    addresses: Vec<IpAddr>,
    telemetry: Arc<Telemetry>,
    /// Built once the proxy has an identity; its resolver and bundles are swapped in place, so
    /// one config serves for the life of the proxy.
    server_cfg: std::sync::OnceLock<Arc<rustls::ServerConfig>>,
    /// Open connections, re-authorized on policy changes (`crate::live`).
    registry: Arc<crate::live::Registry>,
    max_age: crate::live::MaxConnectionAge,
    authorizers: Arc<crate::authz::Authorizers>,
    /// Where connections to the application are made (this namespace or the workload's).
    sockets: crate::sockets::Sockets,
    /// Peer chains verified again at admission, when the bundles changed since their handshake.
    reverified: tessera_tls::memo::VerifiedChains,
}

impl Inbound {
    pub fn new(
        identity: Arc<Identity>,
        policy: Arc<ArcSwap<PolicySet>>,
        ports: &[InboundPort],
        addresses: Vec<IpAddr>,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        Self {
            identity,
            policy,
            ports: ports.iter().map(|p| (p.port, p.protocol)).collect(),
            addresses,
            telemetry,
            server_cfg: std::sync::OnceLock::new(),
            registry: Arc::default(),
            max_age: crate::live::MaxConnectionAge::Svid,
            authorizers: Arc::default(),
            sockets: crate::sockets::Sockets::default(),
            reverified: tessera_tls::memo::VerifiedChains::default(),
        }
    }

    /// Makes connections to the application with `sockets` (a node proxy: inside the
    /// workload's network namespace).
    pub fn with_sockets(mut self, sockets: crate::sockets::Sockets) -> Self {
        self.sockets = sockets;
        self
    }

    /// External authorizers for CUSTOM policies.
    pub fn with_authorizers(mut self, authorizers: Arc<crate::authz::Authorizers>) -> Self {
        self.authorizers = authorizers;
        self
    }

    /// How long authorized connections may live (default: the peer certificate's lifetime).
    pub fn with_max_connection_age(mut self, max_age: crate::live::MaxConnectionAge) -> Self {
        self.max_age = max_age;
        self
    }

    /// Registers connections in `registry` (shared with the policy watcher).
    pub fn with_registry(mut self, registry: Arc<crate::live::Registry>) -> Self {
        self.registry = registry;
        self
    }

    /// Serves the tunnel port until the task is dropped.
    pub async fn serve_tunnel(self: Arc<Self>, listener: TcpListener) {
        // Our flights carry the ACK of the client's (see `delay_acks`). Set on the listener:
        // an accepted connection starts from its state, so even the ClientHello, which comes
        // before `accept` returns, is not acknowledged on its own.
        crate::sockets::delay_acks(&listener);
        loop {
            let (tcp, peer) = self.sockets.accept(&listener).await;
            let this = self.clone();
            self.sockets
                .spawn(async move { this.connection(tcp, peer).await });
        }
    }

    async fn connection(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr) {
        let start = Instant::now();
        let local = tcp.local_addr().ok();
        let deny = |reason: String| {
            let mut rec = AccessRecord::new(Direction::Inbound);
            rec.src_addr = Some(peer);
            rec.dst_addr = local;
            rec.dst_spiffe_id = self.identity.spiffe_id().map(|i| i.to_string());
            rec.reason = reason;
            self.telemetry.record(rec, start.elapsed());
        };
        let cfg = match self.server_cfg.get() {
            Some(c) => Some(c.clone()),
            None => crate::tls::server_config(&self.identity)
                .map(|c| self.server_cfg.get_or_init(|| c).clone()),
        };
        let Some(cfg) = cfg else {
            deny("the proxy has no identity yet".into());
            return;
        };
        // The bundles as they are before the handshake: if they are the same at an admission,
        // the handshake's verifier checked the chain against exactly them (see `admit`).
        let verified_with = self.identity.bundles().load_full();
        // Boxed: the handshake's state lives on the heap only while it runs, instead of
        // enlarging this connection's task for its whole life (memory per idle connection).
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            Box::pin(
                // Its own copy of the config, whose key log keeps this connection's traffic
                // secrets for the stream tunnel's record layer (`crate::sealed`).
                {
                    let log = Arc::default();
                    tokio_rustls::TlsAcceptor::from(crate::tls::server_config_for(&cfg, &log))
                        .accept(crate::readahead::ReadAhead::new(tcp).with_secrets(log))
                },
            ),
        )
        .await;
        let tls = match tls {
            Err(_) => Err("timed out".to_owned()),
            Ok(r) => r.map_err(|e| e.to_string()),
        };
        self.telemetry.handshake(true, tls.is_ok());
        // On the heap: the TLS connection is the largest part of a connection's state, and the
        // task's own layout would otherwise keep room for it in every state.
        let tls = match tls {
            Ok(t) => Box::new(t),
            Err(e) => return deny(format!("TLS handshake failed: {e}")),
        };
        // The verifier of this very handshake accepted the chain (client certificates are
        // mandatory); the identity is read from that verified leaf and nowhere else.
        let Some(src) = tessera_tls::peer_spiffe_id(tls.get_ref().1.peer_certificates()) else {
            return deny("client presented no X509-SVID".into());
        };
        let src = Arc::new(src);
        let not_after = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(tessera_tls::leaf_not_after);
        let expires_at = match self.max_age {
            crate::live::MaxConnectionAge::Svid => not_after,
            crate::live::MaxConnectionAge::Unlimited => None,
        };
        // Kept for re-verification when the bundles change (`crate::live`).
        let chain: Arc<Vec<rustls::pki_types::CertificateDer<'static>>> = Arc::new(
            tls.get_ref()
                .1
                .peer_certificates()
                .map(|c| c.iter().map(|d| d.clone().into_owned()).collect())
                .unwrap_or_default(),
        );
        let peer_cert = PeerCert {
            expires_at,
            not_after,
            chain,
            verified_with: ArcSwap::new(verified_with),
        };
        let Some(local) = local else {
            return deny("no local address".into());
        };
        let mut tls = tls;
        if tls.get_ref().1.alpn_protocol() == Some(crate::stream::ALPN_STREAM) {
            // Boxed: the HTTP/2 branch's state is not carried by a stream-tunnel connection.
            return Box::pin(self.stream_tunnel(tls, &src, &peer_cert, peer, local)).await;
        }
        // HTTP/2 keeps its keys in rustls: large reads, not record-aligned ones.
        tls.get_mut().0.unaligned();
        let this = self.clone();
        let peer_cert = Arc::new(peer_cert);
        let svc = hyper::service::service_fn(move |req| {
            let this = this.clone();
            let src = src.clone();
            let peer_cert = peer_cert.clone();
            async move { Ok::<_, Infallible>(this.stream(req, &src, &peer_cert, peer, local).await) }
        });
        // Boxed, so a stream-tunnel connection's task does not carry the room for it.
        let mut conn = Box::pin(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .max_concurrent_streams(MAX_STREAMS)
                .initial_stream_window_size(4 << 20)
                .initial_connection_window_size(16 << 20)
                .max_frame_size(256 << 10)
                .serve_connection(TokioIo::new(tls), svc),
        );
        let r = tokio::select! {
            r = conn.as_mut() => r,
            () = self.sockets.stopping() => {
                // A graceful drain (an upgrade): GOAWAY, then serve the open streams to their end.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = r {
            tracing::debug!(error = %e, %peer, "tunnel connection ended");
        }
    }

    /// Whether the peer's chain still verifies now. One HTTP/2 tunnel carries requests for as
    /// long as it stays open, long after its handshake: a CA removed from the bundle since then,
    /// or a leaf that has expired, must refuse the next request as it would refuse a new
    /// handshake (X509-SVID §5: validate against the bundle as it is). Open streams are closed
    /// by `crate::live`; this covers the ones that come after. The common case costs nothing:
    /// the same bundle snapshot as at the handshake and a leaf within its validity means the
    /// handshake's own verification still holds.
    fn still_verifies(&self, peer_cert: &PeerCert) -> Result<(), String> {
        let now = tessera_tls::now();
        let bundles = self.identity.bundles().load_full();
        let expired = peer_cert
            .not_after
            .is_none_or(|t| i64::try_from(now.as_secs()).is_ok_and(|n| n > t));
        if expired || !Arc::ptr_eq(&bundles, &peer_cert.verified_with.load()) {
            self.reverified
                .verify(
                    &peer_cert.chain,
                    &bundles,
                    now,
                    tessera_tls::PeerRole::Client,
                )
                .map_err(|e| {
                    format!(
                        "the peer's X509-SVID no longer verifies against the current bundle: {e}"
                    )
                })?;
            // The next admission on this connection under the same bundles costs nothing.
            peer_cert.verified_with.store(bundles);
        }
        Ok(())
    }

    /// The admission of one tunnel request, the same for HTTP/2 CONNECT and the stream tunnel:
    /// the target must be this workload's address and a declared port, the policy (and any
    /// external authorizer) must allow `src` (proven in this TLS session) on that port, and only
    /// then is the application connected.
    async fn admit(
        &self,
        src: &Arc<SpiffeId>,
        peer_cert: &PeerCert,
        target_text: &str,
        peer: SocketAddr,
        local: SocketAddr,
        rec: &mut AccessRecord,
    ) -> Result<Admitted, (StatusCode, String)> {
        let Ok(target) = target_text.parse::<SocketAddr>() else {
            return Err((
                StatusCode::BAD_REQUEST,
                format!("CONNECT target {target_text:?} is not IP:PORT"),
            ));
        };
        rec.dst_addr = Some(target);
        // No open relay: the target must be this workload (the address the peer reached us
        // on, or one configured), never a third host.
        if target.ip() != local.ip() && !self.addresses.contains(&target.ip()) {
            return Err((
                StatusCode::FORBIDDEN,
                format!("CONNECT target {target} is not this workload's address"),
            ));
        }
        self.authorize(Some((src, peer_cert)), target, peer).await
    }

    /// The policy half of an admission, shared by the tunnel and PERMISSIVE plaintext: the
    /// port must be declared, and the policy (and any external authorizer) must allow the
    /// caller — `Some`: the identity proven in the TLS session and its certificate; `None`: a
    /// plaintext caller without identity, which only rules naming `unauthenticated` admit.
    /// The connection is registered for live re-authorization *before* it is decided, so a
    /// policy swapped in between cannot be missed.
    async fn authorize(
        &self,
        caller: Option<(&Arc<SpiffeId>, &PeerCert)>,
        target: SocketAddr,
        peer: SocketAddr,
    ) -> Result<Admitted, (StatusCode, String)> {
        if !self.ports.contains_key(&target.port()) {
            return Err((
                StatusCode::FORBIDDEN,
                format!("port {} is not declared with --inbound", target.port()),
            ));
        }
        let src = caller.map(|(s, _)| s);
        let http = self.ports.get(&target.port()) == Some(&Protocol::Http);
        let own = self.identity.spiffe_id();
        let ends = crate::live::Ends {
            peer,
            target,
            own: own.clone(),
        };
        let addrs = ends.addresses();
        let live = self.registry.register(
            src.cloned(),
            target.port(),
            caller.and_then(|(_, c)| c.expires_at),
            caller.map_or_else(Arc::default, |(_, c)| c.chain.clone()),
            // Also what a policy change shows an external authorizer not asked here.
            Some(ends),
        );
        if let Some((_, peer_cert)) = caller {
            // After registering, so a bundle change in between is caught by one or the other.
            self.still_verifies(peer_cert)
                .map_err(|e| (StatusCode::FORBIDDEN, e))?;
        }
        let src_id = src.map(|s| &**s);
        let requests = http.then(|| live.set_http());
        let (decision, asked) = if http {
            // Declared HTTP: every request is decided under the current policy (`crate::l7`);
            // a connection-level decision would apply TCP semantics to HTTP rules.
            (tessera_policy::Decision::http_per_request(), Vec::new())
        } else if self.authorizers.is_empty() {
            (
                crate::live::decide(&self.policy.load(), src_id, target.port(), &addrs, None),
                Vec::new(),
            )
        } else {
            let input = crate::authz::CheckInput {
                src: src_id,
                src_addr: Some(peer),
                dst: own.as_deref(),
                dst_addr: Some(target),
                http: None,
            };
            crate::authz::authorize(
                &self.policy.load_full(),
                &self.authorizers,
                &input,
                target.port(),
            )
            .await
        };
        crate::live::log_decision(&decision, src_id, target.port(), "connection");
        if !decision.allowed {
            return Err((StatusCode::FORBIDDEN, decision.reason.to_string()));
        }
        live.set_asked(asked);
        let app_addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), target.port());
        let app = if let Some(requests) = requests {
            // Declared HTTP: the application is connected on the first request policy allows
            // (`crate::l7`), never for a source no request of which may pass — a denied peer
            // must not be able to hold the application's connections open.
            App::Http(crate::l7::L7Context {
                authorizers: self.authorizers.clone(),
                own: own.clone(),
                peer,
                local: target,
                policy: self.policy.clone(),
                src: src.cloned(),
                xfcc: caller
                    .and_then(|(s, c)| crate::l7::xfcc(own.as_deref(), s, c.chain.first()?)),
                port: target.port(),
                app: app_addr,
                sockets: self.sockets.clone(),
                requests,
                bytes: Arc::default(),
                telemetry: self.telemetry.clone(),
            })
        } else {
            match self.sockets.connect(app_addr, false).await {
                Ok(app) => App::Tcp(app),
                Err(e) => {
                    return Err((
                        StatusCode::BAD_GATEWAY,
                        format!(
                            "{} allowed, but the application at {app_addr} refused: {e}",
                            decision.reason
                        ),
                    ));
                }
            }
        };
        Ok(Admitted {
            app,
            reason: decision.reason.to_string(),
            live,
        })
    }

    /// One CONNECT stream.
    async fn stream(
        &self,
        req: Request<hyper::body::Incoming>,
        src: &Arc<SpiffeId>,
        peer_cert: &PeerCert,
        peer: SocketAddr,
        local: SocketAddr,
    ) -> Response<Empty<Bytes>> {
        let start = Instant::now();
        let mut rec = self.record(src, peer);
        if req.method() != http::Method::CONNECT {
            rec.reason = format!("{} is not CONNECT", req.method());
            self.telemetry.record(rec, start.elapsed());
            return status_only(StatusCode::METHOD_NOT_ALLOWED);
        }
        let target = req
            .uri()
            .authority()
            .map(|a| a.as_str().to_owned())
            .unwrap_or_else(|| req.uri().to_string());
        let admitted = match self
            .admit(src, peer_cert, &target, peer, local, &mut rec)
            .await
        {
            Ok(a) => a,
            Err((status, reason)) => {
                rec.reason = reason;
                self.telemetry.record(rec, start.elapsed());
                return status_only(status);
            }
        };
        let telemetry = self.telemetry.clone();
        self.sockets.spawn(async move {
            match hyper::upgrade::on(req).await {
                Ok(upgraded) => {
                    relay(&telemetry, &mut rec, TokioIo::new(upgraded), admitted).await;
                }
                Err(e) => rec.reason = format!("CONNECT upgrade failed: {e}"),
            }
            telemetry.record(rec, start.elapsed());
        });
        status_only(StatusCode::OK)
    }

    /// One stream-tunnel connection: the target, the same admission, the status, then bytes.
    async fn stream_tunnel<S>(
        &self,
        mut tls: S,
        src: &Arc<SpiffeId>,
        peer_cert: &PeerCert,
        peer: SocketAddr,
        local: SocketAddr,
    ) where
        S: Tunnel,
    {
        let start = Instant::now();
        let mut rec = self.record(src, peer);
        let target =
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, crate::stream::read_request(&mut tls))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    rec.reason = format!("stream tunnel request: {e}");
                    return self.telemetry.record(rec, start.elapsed());
                }
                Err(_) => {
                    rec.reason = "stream tunnel request: timed out".into();
                    return self.telemetry.record(rec, start.elapsed());
                }
            };
        // Boxed: admission (with an external authorizer's gRPC call) is transient state.
        match Box::pin(self.admit(src, peer_cert, &target, peer, local, &mut rec)).await {
            Err((status, reason)) => {
                let _ = crate::stream::write_response(&mut tls, status.as_u16(), &reason).await;
                rec.reason = reason;
            }
            Ok(admitted) => {
                if let Err(e) = crate::stream::write_response(&mut tls, 200, "").await {
                    rec.reason = format!("stream tunnel response: {e}");
                } else {
                    relay(&self.telemetry, &mut rec, tls, admitted).await;
                }
            }
        }
        self.telemetry.record(rec, start.elapsed());
    }

    /// An inbound record with what is known before the target.
    fn record(&self, src: &SpiffeId, peer: SocketAddr) -> AccessRecord {
        let mut rec = AccessRecord::new(Direction::Inbound);
        rec.src_spiffe_id = Some(src.to_string());
        rec.dst_spiffe_id = self.identity.spiffe_id().map(|i| i.to_string());
        rec.src_addr = Some(peer);
        rec
    }

    /// Serves the transparent inbound plaintext port: STRICT refuses every connection (and logs
    /// it); PERMISSIVE hands plaintext to a declared port to policy as a caller without
    /// identity — only rules naming `unauthenticated` admit it, every DENY of the port covers
    /// it, a port declared `:http` decides each request, and a policy change decides the
    /// connection again — logged at warn when admitted.
    pub async fn serve_plaintext(self: Arc<Self>, listener: TcpListener, mode: InboundMode) {
        loop {
            let (tcp, peer) = self.sockets.accept(&listener).await;
            let this = self.clone();
            self.sockets.spawn(async move {
                let start = Instant::now();
                let mut rec = AccessRecord::new(Direction::InboundPlaintext);
                rec.src_addr = Some(peer);
                rec.dst_spiffe_id = this.identity.spiffe_id().map(|i| i.to_string());
                let target = crate::transparent::original_dst(&tcp).ok();
                rec.dst_addr = target;
                match (mode, target) {
                    (InboundMode::Strict, _) => {
                        rec.reason =
                            "plaintext refused: inbound mode is STRICT (mutual TLS only)".into();
                    }
                    (InboundMode::Permissive, None) => {
                        rec.reason = "no original destination".into();
                    }
                    (InboundMode::Permissive, Some(t)) => {
                        match Box::pin(this.authorize(None, t, peer)).await {
                            Err((_, reason)) => rec.reason = reason,
                            Ok(mut admitted) => {
                                tracing::warn!(%peer, port = t.port(), reason = %admitted.reason, "PERMISSIVE: plaintext connection without identity admitted");
                                admitted.reason =
                                    format!("PERMISSIVE plaintext, no identity: {}", admitted.reason);
                                relay(&this.telemetry, &mut rec, tcp, admitted).await;
                            }
                        }
                    }
                }
                this.telemetry.record(rec, start.elapsed());
            });
        }
    }
}

/// The peer certificate a tunnel connection was authorized with: when it expires (for
/// `max_connection_age = "svid"`) and its chain (re-verified when the bundles change).
#[derive(Debug)]
struct PeerCert {
    /// When live re-authorization closes the connection (`max_connection_age`).
    expires_at: Option<i64>,
    /// The leaf's notAfter, whatever `max_connection_age` says.
    not_after: Option<i64>,
    chain: Arc<Vec<rustls::pki_types::CertificateDer<'static>>>,
    /// The bundle snapshot the chain was last verified against: the handshake's (taken just
    /// before it), then the one of the latest re-verification at an admission.
    verified_with: ArcSwap<tessera_spiffe::BundleSet>,
}

/// What [`Inbound::admit`] hands to the relay.
struct Admitted {
    app: App,
    /// The deciding reason (policy and rule), for the access log.
    reason: String,
    /// Fires when current policy, bundles or the peer certificate's expiry end the connection.
    live: crate::live::Registration,
}

/// Where an admitted stream goes.
enum App {
    /// A TCP port: the application, connected at admission.
    Tcp(TcpStream),
    /// A port declared HTTP: each request is decided, and the application connected on the
    /// first allowed one (`crate::l7`).
    Http(crate::l7::L7Context),
}

/// A tunnel stream as [`relay`] carries it.
trait Tunnel: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + Sized + 'static {
    /// A stream-tunnel connection whose data phase leaves rustls (`crate::sealed`); `Err(self)`
    /// for a stream that stays as it is.
    fn into_sealed(self) -> Result<std::io::Result<crate::sealed::Sealed>, Self> {
        Err(self)
    }
}

impl Tunnel for TokioIo<hyper::upgrade::Upgraded> {}

/// PERMISSIVE plaintext: the connection itself, no tunnel.
impl Tunnel for TcpStream {}

impl Tunnel for Box<tokio_rustls::server::TlsStream<crate::readahead::ReadAhead<TcpStream>>> {
    fn into_sealed(self) -> Result<std::io::Result<crate::sealed::Sealed>, Self> {
        Ok(crate::sealed::Sealed::from_server(*self))
    }
}

/// Carries an admitted tunnel stream to the application (bytes, or HTTP requests decided one by
/// one) until either side ends or live re-authorization closes it; fills in the record.
async fn relay<T: Tunnel>(
    telemetry: &Telemetry,
    rec: &mut AccessRecord,
    tunnel: T,
    admitted: Admitted,
) {
    let Admitted {
        app,
        reason,
        mut live,
    } = admitted;
    let active = telemetry.active_guard();
    // The byte counts outlive the copy (or an HTTP port's server), for a connection that ends
    // in an error or that re-authorization closes: the record says what went through, read
    // from the counts however the connection ended.
    let http_bytes = match &app {
        App::Http(ctx) => Some(ctx.bytes.clone()),
        App::Tcp(_) => None,
    };
    let tcp_bytes = crate::copy::Progress::default();
    let r = tokio::select! {
        r = async {
            match app {
                // Boxed: an HTTP server's state only where the port is declared `:http`.
                App::Http(ctx) => Box::pin(crate::l7::serve(tunnel, ctx)).await,
                App::Tcp(mut app) => match tunnel.into_sealed() {
                    // The stream tunnel's data phase on its handshake's keys.
                    Ok(Ok(mut sealed)) => {
                        crate::sealed::counted(&mut app, &mut sealed, &tcp_bytes).await
                    }
                    Ok(Err(e)) => Err(e),
                    Err(mut tunnel) => {
                        crate::copy::counted(&mut app, &mut tunnel, &tcp_bytes).await
                    }
                },
            }
        } => r.map(Ok),
        // Live re-authorization (`crate::live`): policy now denies it, or its peer
        // certificate expired.
        why = live.wait() => Ok(Err(why)),
    };
    drop(active);
    rec.decision = "allow";
    (rec.bytes_sent, rec.bytes_received) = carried(http_bytes.as_deref(), &tcp_bytes);
    match r {
        Ok(Ok(_)) => rec.reason = reason,
        Ok(Err(closed)) => {
            rec.reason = match closed {
                // The last word on this connection was a deny: an audit that looks for what
                // policy refused finds it, with the decision that had admitted it.
                crate::live::Closed::Denied(why) => {
                    rec.decision = "deny";
                    format!("closed by {why} (admitted: {reason})")
                }
                // An end of life, not a refusal: allowed, with why it ended.
                expired @ crate::live::Closed::Expired => format!("{reason}; closed: {expired}"),
            };
        }
        Err(e) => {
            rec.reason = format!("{reason}; copy: {e}");
        }
    }
}

/// (to the application, back to the source): the HTTP server's counts, or the copy's
/// (`counted` keeps them as plaintext → tunnel, tunnel → plaintext).
fn carried(http: Option<&crate::copy::Progress>, tcp: &crate::copy::Progress) -> (u64, u64) {
    match http {
        Some(b) => b.get(),
        None => {
            let (to_tunnel, to_app) = tcp.get();
            (to_app, to_tunnel)
        }
    }
}

fn status_only(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut r = Response::new(Empty::new());
    *r.status_mut() = status;
    r
}
