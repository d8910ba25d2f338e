//! HTTP authorization for ports declared `--inbound PORT:http`: the CONNECT stream carries
//! HTTP/1.1 or HTTP/2 (detected by the preface), every request is decided under the current
//! policy set with its method, path and host, denied requests get 403 (gRPC requests a gRPC
//! PERMISSION_DENIED) and a log line, and allowed ones are forwarded to the application in the
//! client's own protocol: HTTP/1.1 requests over one HTTP/1.1 connection, HTTP/2 requests (gRPC
//! among them) multiplexed over one HTTP/2 connection. That connection is opened on the first
//! allowed request (and again if the application closed it), so a source whose every request
//! is denied never costs the application a connection. An HTTP/1.1 upgrade (WebSocket) the
//! application accepts turns the stream into bytes both ways. Every request in flight, and
//! every upgraded stream, is decided again on a policy change (`crate::live`).
//!
//! What policy decides on is what the application gets: the normalized path
//! ([`tessera_policy::normalize_path`]), one authority (`authority_of`), and the caller's
//! proven identity as `x-forwarded-client-cert` ([`xfcc`]), never one the client claimed. Each
//! request writes an access-log line and is counted in the metrics.

use std::future::Future;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::UnsyncBoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tessera_policy::{HttpRequest, PolicySet};
use tessera_spiffe::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Who is asking, on which port.
#[derive(Debug, Clone)]
pub struct L7Context {
    pub authorizers: Arc<crate::authz::Authorizers>,
    /// This workload's ID and the addresses of the two ends (for external authorizers).
    pub own: Option<Arc<SpiffeId>>,
    pub peer: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    pub policy: Arc<ArcSwap<PolicySet>>,
    /// The peer's proven identity; `None` for plaintext that PERMISSIVE mode admits to policy.
    pub src: Option<Arc<SpiffeId>>,
    /// The `x-forwarded-client-cert` value every request carries to the application
    /// ([`xfcc`]); `None` (no identity): the header is only removed.
    pub xfcc: Option<http::HeaderValue>,
    pub port: u16,
    /// The application (127.0.0.1:port) and the sockets to reach it with.
    pub app: std::net::SocketAddr,
    pub sockets: crate::sockets::Sockets,
    /// This connection's requests in flight, decided again on every policy change.
    pub requests: Arc<crate::live::HttpRequests>,
    /// The bytes through the tunnel stream, readable however the connection ends.
    pub bytes: Arc<crate::copy::Progress>,
    /// Per-request metrics.
    pub telemetry: Arc<crate::Telemetry>,
}

/// Envoy's header for the client certificate a request's connection proved.
const XFCC: &str = "x-forwarded-client-cert";

/// The `x-forwarded-client-cert` value for a caller that proved `src` with `leaf` to this
/// workload (`own`), in Envoy's format: `By` (this workload's URI SAN), `Hash` (SHA-256 of the
/// client's leaf, hex) and `URI` (the client's SPIFFE ID). SPIFFE IDs hold no `,`, `;`, `=` or
/// `"` (SPIFFE ID §2), so no value needs quoting.
pub fn xfcc(own: Option<&SpiffeId>, src: &SpiffeId, leaf: &[u8]) -> Option<http::HeaderValue> {
    let by = own.map(|o| format!("By={o};")).unwrap_or_default();
    let hash = tessera_tls::cert_sha256_hex(leaf);
    http::HeaderValue::from_str(&format!("{by}Hash={hash};URI={src}")).ok()
}

/// Envoy's `SANITIZE_SET` for [`XFCC`]: every value the client sent is dropped, and `proven`
/// set when the caller proved an identity.
fn sanitize_set_xfcc(headers: &mut http::HeaderMap, proven: Option<&http::HeaderValue>) {
    headers.remove(XFCC);
    if let Some(v) = proven {
        headers.insert(XFCC, v.clone());
    }
}

/// What became of a request, carried on its response to the request's access record and
/// metrics: `allow` (forwarded; the application answered, or could not be reached), `deny`
/// (policy) or `invalid` (refused as malformed), and why.
#[derive(Debug, Clone)]
struct Outcome {
    decision: &'static str,
    reason: String,
}

/// The application's connection for one tunnel stream, in the protocol of the stream's client.
/// The outbound side tunnels TCP as it is, so the client speaks what the application speaks:
/// keeping that protocol is what lets HTTP/2 requests (gRPC) reach an HTTP/2-only application,
/// multiplexed, with their trailers.
enum AppSender {
    Http1(hyper::client::conn::http1::SendRequest<Incoming>),
    Http2(hyper::client::conn::http2::SendRequest<Incoming>),
}

impl AppSender {
    fn is_closed(&self) -> bool {
        match self {
            Self::Http1(s) => s.is_closed(),
            Self::Http2(s) => s.is_closed(),
        }
    }

    fn speaks(&self, version: http::Version) -> bool {
        matches!(
            (self, version == http::Version::HTTP_2),
            (Self::Http1(_), false) | (Self::Http2(_), true)
        )
    }
}

/// Whether a request is gRPC (gRPC over HTTP/2 §Requests: `application/grpc` with an optional
/// `+format` or parameters; `application/grpc-web` is a different protocol and is not).
fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.strip_prefix("application/grpc")
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['+', ';']))
        })
}

/// A reply made by the proxy itself. To a gRPC client it is a gRPC status in a trailers-only
/// response (HTTP 200, `grpc-status`, `grpc-message`), which is how a gRPC client learns why:
/// an HTTP 403 would reach the application's caller only as a generic transport error. The
/// codes follow gRPC's HTTP-to-gRPC status mapping (doc/http-grpc-status-mapping.md): 403 →
/// PERMISSION_DENIED (7), 502 → UNAVAILABLE (14), 501 → UNIMPLEMENTED (12), 400 → INTERNAL (13).
fn reply(grpc: bool, status: StatusCode, msg: String) -> Response<Body> {
    let decision = match status {
        StatusCode::FORBIDDEN => "deny",
        StatusCode::BAD_REQUEST | StatusCode::NOT_IMPLEMENTED => "invalid",
        _ => "allow",
    };
    let reason = msg.trim_end().to_owned();
    let mut r = reply_body(grpc, status, msg);
    r.extensions_mut().insert(Outcome { decision, reason });
    r
}

fn reply_body(grpc: bool, status: StatusCode, msg: String) -> Response<Body> {
    if !grpc {
        let mut r = Response::new(
            Full::new(Bytes::from(msg))
                .map_err(|n| match n {})
                .boxed_unsync(),
        );
        *r.status_mut() = status;
        return r;
    }
    let code = match status {
        StatusCode::FORBIDDEN => 7,
        StatusCode::BAD_GATEWAY => 14,
        StatusCode::NOT_IMPLEMENTED => 12,
        _ => 13,
    };
    let mut r = Response::new(
        Full::new(Bytes::new())
            .map_err(|n| match n {})
            .boxed_unsync(),
    );
    *r.headers_mut() = grpc_status(code, &msg);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    r
}

/// `grpc-status` and `grpc-message` headers (or trailers).
fn grpc_status(code: u16, msg: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("grpc-status", http::HeaderValue::from(code));
    if let Ok(m) = http::HeaderValue::from_str(&grpc_message(msg.trim_end())) {
        h.insert("grpc-message", m);
    }
    h
}

/// The application's response body, ended as soon as policy denies its request (a
/// re-authorization while it streams): a gRPC response ends with PERMISSION_DENIED trailers,
/// which its caller reads as the call's status; any other ends in an error, which resets the
/// HTTP/2 stream or closes the HTTP/1.1 connection, so the client cannot take it for complete.
struct Guarded {
    inner: Incoming,
    denied: std::pin::Pin<Box<dyn Future<Output = String> + Send>>,
    grpc: bool,
    ended: bool,
    /// Tracks the request while its response streams.
    _guard: crate::live::RequestGuard,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(why) = this.denied.as_mut().poll(cx) {
            this.ended = true;
            return Poll::Ready(Some(if this.grpc {
                Ok(hyper::body::Frame::trailers(grpc_status(7, &why)))
            } else {
                Err(why.into())
            }));
        }
        std::pin::Pin::new(&mut this.inner)
            .poll_frame(cx)
            .map_err(Into::into)
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Whether a request asks for exactly a WebSocket upgrade (`Upgrade: websocket`, any case).
fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    let mut values = req.headers().get_all(http::header::UPGRADE).iter();
    match (values.next(), values.next()) {
        (Some(v), None) => v.as_bytes().eq_ignore_ascii_case(b"websocket"),
        _ => false,
    }
}

/// `grpc-message` is percent-encoded: every byte outside visible ASCII and space, and `%`
/// itself (gRPC over HTTP/2, §Responses, "Status-Message").
fn grpc_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The authority a request names, `host[:port]`: the request target's (HTTP/2 `:authority`,
/// or an HTTP/1.1 absolute-form target, which overrides `Host`: RFC 9112 §3.2.2), else the
/// `Host` header. Policy decides on this host, and it is the one authority the application
/// receives, so a request cannot be decided on one host and served as another. More than one
/// `Host` header, or one that is not an authority, is refused (RFC 9112 §3.2: 400).
fn authority_of<B>(req: &Request<B>) -> Result<String, String> {
    if let Some(a) = req.uri().authority() {
        return Ok(canonical_authority(a));
    }
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err("the request has more than one Host header (RFC 9112 §3.2)".into());
    }
    match first.map(http::HeaderValue::as_bytes) {
        None | Some(b"") => Ok(String::new()),
        Some(raw) => http::uri::Authority::try_from(raw)
            .map(|a| canonical_authority(&a))
            .map_err(|e| format!("the Host header is not a host[:port] (RFC 9112 §3.2): {e}")),
    }
}

/// `host[:port]`: without userinfo (RFC 9110 §4.2.4: not to be sent), and without a trailing
/// dot on the host, which names the same host (RFC 1034 §3.1; Envoy's
/// `strip_trailing_host_dot`) and would otherwise pass a rule on the host's usual spelling.
fn canonical_authority(a: &http::uri::Authority) -> String {
    let host = a.host();
    let host = host.strip_suffix('.').unwrap_or(host);
    match a.port() {
        Some(p) => format!("{host}:{p}"),
        None => host.to_owned(),
    }
}

/// The host of an authority, without a port, as policy matches it.
fn host_of(authority: &str) -> String {
    match authority.parse::<http::uri::Authority>() {
        Ok(a) => a.host().to_owned(),
        Err(_) => authority.to_owned(),
    }
}

/// Serves HTTP on `io` (the CONNECT stream) until it ends, forwarding allowed requests to the
/// application. Returns the bytes read from the stream and written to it (the access log's
/// bytes each way; `ctx.bytes` has them too if this ends in an error or is cancelled).
pub async fn serve<IO>(io: IO, ctx: L7Context) -> std::io::Result<(u64, u64)>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let counts = ctx.bytes.clone();
    let io = Counted {
        io,
        counts: counts.clone(),
    };
    let stream = Arc::new(StreamState::default());
    let svc = hyper::service::service_fn({
        let stream = stream.clone();
        move |req: Request<Incoming>| {
            let ctx = ctx.clone();
            let stream = stream.clone();
            async move {
                let start = std::time::Instant::now();
                // Read once: the record and the decision see the same authority.
                let authority = authority_of(&req);
                // As the client sent them: the record shows `/%61dmin`, not what it became.
                let mut rec = crate::telemetry::HttpRecord {
                    src_spiffe_id: ctx.src.as_deref().map(ToString::to_string),
                    dst_spiffe_id: ctx.own.as_deref().map(ToString::to_string),
                    src_addr: ctx.peer,
                    dst_addr: ctx.local,
                    method: req.method().as_str().to_owned(),
                    path: req.uri().path().to_owned(),
                    host: authority.clone().unwrap_or_default(),
                    ..Default::default()
                };
                let resp = handle(req, authority, &ctx, &stream).await;
                if let Some(o) = resp.extensions().get::<Outcome>() {
                    rec.decision = o.decision;
                    rec.reason.clone_from(&o.reason);
                }
                rec.response_code = resp.status().as_u16();
                ctx.telemetry.http_request(rec, start.elapsed());
                Ok::<_, std::convert::Infallible>(resp)
            }
        }
    });
    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection_with_upgrades(TokioIo::new(io), svc)
        .await
        .map_err(std::io::Error::other)?;
    // An upgraded request (WebSocket) goes on as bytes, in this task: live re-authorization
    // and the drain switch, which end this future, end it too.
    let upgrade = stream
        .upgrade
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .take();
    if let Some(u) = upgrade {
        let denied = u.guard.denied();
        let copy = async {
            let down = u.down.await.map_err(std::io::Error::other)?;
            let up = u.up.await.map_err(std::io::Error::other)?;
            crate::copy::bidirectional(&mut TokioIo::new(down), &mut TokioIo::new(up)).await
        };
        tokio::select! {
            r = copy => { r?; }
            why = denied => return Err(std::io::Error::other(why)),
        }
    }
    Ok(counts.get())
}

/// What the requests of one tunnel stream share.
#[derive(Default)]
struct StreamState {
    /// The application's connection.
    sender: tokio::sync::Mutex<Option<AppSender>>,
    /// A request the application switched to another protocol (101), once the HTTP server
    /// hands the stream over.
    upgrade: std::sync::Mutex<Option<Upgrade>>,
}

/// Both halves of an upgraded request, and its tracking for re-authorization.
struct Upgrade {
    down: hyper::upgrade::OnUpgrade,
    up: hyper::upgrade::OnUpgrade,
    guard: crate::live::RequestGuard,
}

/// The tunnel stream, counting the bytes through it.
struct Counted<IO> {
    io: IO,
    /// (read from the stream, written to it): from the source, and back to it.
    counts: Arc<crate::copy::Progress>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = std::pin::Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        self.counts.add_there(n as u64);
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.counts.add_back(n as u64);
        }
        r
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let std::task::Poll::Ready(Ok(n)) = r {
            self.counts.add_back(n as u64);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A sender to the application in the request's protocol: the stream's connection, or a new
/// one if there is none yet or the application closed the last one.
async fn app_sender<'a>(
    ctx: &L7Context,
    slot: &'a mut Option<AppSender>,
    version: http::Version,
) -> Result<&'a mut AppSender, String> {
    if let Some(s) = slot.take().filter(|s| !s.is_closed() && s.speaks(version)) {
        return Ok(slot.insert(s));
    }
    let tcp = ctx
        .sockets
        .connect(ctx.app, false)
        .await
        .map_err(|e| format!("the application at {} refused: {e}", ctx.app))?;
    let failed = |e: hyper::Error| format!("the application at {}: {e}", ctx.app);
    let sender = if version == http::Version::HTTP_2 {
        let (s, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .map_err(failed)?;
        tokio::spawn(log_end(conn));
        AppSender::Http2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
            .await
            .map_err(failed)?;
        tokio::spawn(log_end(conn.with_upgrades()));
        AppSender::Http1(s)
    };
    Ok(slot.insert(sender))
}

async fn log_end(conn: impl std::future::Future<Output = hyper::Result<()>>) {
    if let Err(e) = conn.await {
        tracing::debug!(error = %e, "application HTTP connection ended");
    }
}

/// Decides one request (`authority`: [`authority_of`] it) and forwards it if allowed.
async fn handle(
    mut req: Request<Incoming>,
    authority: Result<String, String>,
    ctx: &L7Context,
    stream: &StreamState,
) -> Response<Body> {
    let grpc = is_grpc(&req);
    let method = req.method().as_str().to_owned();
    // CONNECT asks the application to open a tunnel elsewhere (RFC 9110 §9.3.6): the bytes it
    // would carry are no request that policy decides, to a destination this port was never
    // declared for. Refused whatever policy says (501: not a method this port serves, §15.6.2);
    // a port that must carry it is declared without `:http` and decided per connection.
    if req.method() == http::Method::CONNECT {
        tracing::info!(
            src = crate::live::caller(ctx.src.as_deref()),
            port = ctx.port,
            "HTTP CONNECT refused: 501"
        );
        return reply(
            grpc,
            StatusCode::NOT_IMPLEMENTED,
            "CONNECT is not carried on a port declared :http (declare it without :http to carry its connections as TCP)\n".into(),
        );
    }
    // Methods are case-sensitive (RFC 9110 §9.1), and policy's are upper case; but Django and
    // werkzeug upper-case `REQUEST_METHOD`, so `delete` passed a DENY on DELETE and ran the
    // DELETE handler. Istio refuses a method that is not upper case with 400; so does this.
    if method.bytes().any(|b| b.is_ascii_lowercase()) {
        tracing::info!(src = crate::live::caller(ctx.src.as_deref()), port = ctx.port, %method, "HTTP request refused: 400");
        return reply(
            grpc,
            StatusCode::BAD_REQUEST,
            format!(
                "bad request: the method {method:?} is not in upper case (RFC 9110 §9.1: methods are case-sensitive)\n"
            ),
        );
    }
    let authority = match authority {
        Ok(a) => a,
        Err(e) => {
            tracing::info!(src = crate::live::caller(ctx.src.as_deref()), port = ctx.port, %method, error = %e, "HTTP request refused: 400");
            return reply(grpc, StatusCode::BAD_REQUEST, format!("bad request: {e}\n"));
        }
    };
    let host = host_of(&authority);
    let path = match tessera_policy::normalize_path(req.uri().path()) {
        Ok(p) => p,
        Err(e) => {
            tracing::info!(src = crate::live::caller(ctx.src.as_deref()), port = ctx.port, %method, path = req.uri().path(), error = %e, "HTTP request refused: 400");
            return reply(grpc, StatusCode::BAD_REQUEST, format!("bad request: {e}\n"));
        }
    };
    // The caller's proven identity for the application, as Envoy's `x-forwarded-client-cert`
    // with `SANITIZE_SET` (what Istio's sidecars send): whatever the client sent under that
    // name is removed — it is the client's claim, and an application trusting it could be
    // told any identity — and the proxy's own value is set when the caller proved one (none
    // for PERMISSIVE plaintext). Before the decision, so policy sees what the application gets.
    sanitize_set_xfcc(req.headers_mut(), ctx.xfcc.as_ref());
    let (d, guard) = {
        // Every header is seen by policy, as text: bytes that are not UTF-8 (obs-text, RFC 9110
        // §5.5) become U+FFFD. Leaving such a value out would let it past a DENY on the
        // header's presence or on a prefix of it, while the application still receives it.
        // `host` is the authority policy decides on and the application receives (see
        // `authority_of`), not the raw header: an absolute-form target or HTTP/2's `:authority`
        // overrides it, and a rule on `request.headers[host]` must see the same host as `hosts`.
        let mut values: Vec<(&str, std::borrow::Cow<'_, str>)> = req
            .headers()
            .iter()
            .filter(|(n, _)| *n != http::header::HOST)
            .map(|(n, v)| (n.as_str(), String::from_utf8_lossy(v.as_bytes())))
            .collect();
        if !authority.is_empty() {
            values.push(("host", std::borrow::Cow::Borrowed(authority.as_str())));
        }
        let headers: Vec<(&str, &str)> = values.iter().map(|(n, v)| (*n, v.as_ref())).collect();
        let r = HttpRequest {
            method: &method,
            path: &path,
            host: &host,
            headers: &headers,
        };
        let addrs = tessera_policy::Addresses::between(ctx.peer, ctx.local);
        // Tracked before it is decided: a policy installed after this point re-decides it,
        // one installed before is the one read below, so no change slips between the two.
        let guard = ctx.requests.track(&r);
        let (d, asked) = if ctx.authorizers.is_empty() {
            let d = crate::live::decide(
                &ctx.policy.load(),
                ctx.src.as_deref(),
                ctx.port,
                &addrs,
                Some(&r),
            );
            (d, Vec::new())
        } else {
            let input = crate::authz::CheckInput {
                src: ctx.src.as_deref(),
                src_addr: Some(ctx.peer),
                dst: ctx.own.as_deref(),
                dst_addr: Some(ctx.local),
                http: Some(r),
            };
            crate::authz::authorize(&ctx.policy.load_full(), &ctx.authorizers, &input, ctx.port)
                .await
        };
        guard.set_asked(asked);
        (d, guard)
    };
    crate::live::log_decision(&d, ctx.src.as_deref(), ctx.port, "http request");
    if !d.allowed {
        tracing::info!(src = crate::live::caller(ctx.src.as_deref()), port = ctx.port, %method, %path, %host, reason = %d.reason, "HTTP request denied: 403");
        return reply(
            grpc,
            StatusCode::FORBIDDEN,
            format!("forbidden: {}\n", d.reason),
        );
    }
    // The path that was authorized is the path the application gets.
    let pq = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    let version = req.version();
    // HTTP/1.1 `Upgrade` (RFC 9110 §7.8): a WebSocket handshake (RFC 6455 §4) is decided like
    // any other request; if the application switches protocols, the stream is handed over to
    // it as bytes. Only WebSocket: after a switch no request is decided any more, so an upgrade
    // to HTTP/2 (`h2c`) would carry requests past policy ("h2c smuggling"). Any other upgrade
    // is taken out of the request, which the application then answers in HTTP/1.1 (a server
    // may always ignore `Upgrade`, RFC 9110 §7.8).
    let upgrade = if version == http::Version::HTTP_11 && is_websocket_upgrade(&req) {
        Some(hyper::upgrade::on(&mut req))
    } else {
        let h = req.headers_mut();
        h.remove(http::header::UPGRADE);
        h.remove("http2-settings");
        None
    };
    let uri = if version == http::Version::HTTP_2 {
        // HTTP/2 carries `:scheme` and `:authority` (RFC 9113 §8.3.1): the absolute form, with
        // the authority policy saw and no `Host` header beside it.
        req.headers_mut().remove(http::header::HOST);
        let scheme = req.uri().scheme_str().unwrap_or("http").to_owned();
        format!("{scheme}://{authority}{pq}").parse()
    } else {
        // HTTP/1.1: origin-form, with the authority policy saw as the only Host header.
        match http::HeaderValue::from_str(&authority) {
            Ok(h) => {
                req.headers_mut().insert(http::header::HOST, h);
            }
            Err(_) => {
                req.headers_mut().remove(http::header::HOST);
            }
        }
        pq.parse()
    };
    match uri {
        Ok(u) => *req.uri_mut() = u,
        Err(e) => {
            tracing::info!(src = crate::live::caller(ctx.src.as_deref()), port = ctx.port, %method, %path, error = %e, "HTTP request refused: 400");
            return reply(grpc, StatusCode::BAD_REQUEST, format!("bad request: {e}\n"));
        }
    }
    let send = async {
        let mut slot = stream.sender.lock().await;
        let s = match app_sender(ctx, &mut slot, version).await {
            Ok(s) => s,
            Err(e) => {
                tracing::info!(src = crate::live::caller(ctx.src.as_deref()), port = ctx.port, %method, %path, error = %e, "HTTP request allowed, application unreachable: 502");
                return Err(format!("application: {e}\n"));
            }
        };
        let sent = match s {
            // One request at a time on HTTP/1.1: the stream's lock is held until the
            // connection can take this one (the client's HTTP/1.1 sends one at a time too).
            AppSender::Http1(s) => match s.ready().await {
                Ok(()) => {
                    let fut = s.send_request(req);
                    drop(slot);
                    fut.await
                }
                Err(e) => Err(e),
            },
            // HTTP/2 multiplexes: each request takes its own handle and the lock is let go.
            AppSender::Http2(s) => {
                let mut s = s.clone();
                drop(slot);
                match s.ready().await {
                    Ok(()) => s.send_request(req).await,
                    Err(e) => Err(e),
                }
            }
        };
        sent.map_err(|e| format!("application: {e}\n"))
    };
    // A policy change while the application has not answered yet ends the request here.
    let denied = guard.denied();
    let sent = tokio::select! {
        sent = send => sent,
        why = denied => {
            tracing::info!(src = crate::live::caller(ctx.src.as_deref()), port = ctx.port, %method, %path, reason = %why, "HTTP request denied while in flight: 403");
            return reply(grpc, StatusCode::FORBIDDEN, format!("forbidden: {why}\n"));
        }
    };
    match sent {
        Ok(mut resp) => {
            resp.extensions_mut().insert(Outcome {
                decision: "allow",
                reason: d.reason.to_string(),
            });
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let Some(down) = upgrade else {
                    // Passed on, a switch the proxy does not carry would leave the client
                    // speaking a protocol nobody reads.
                    return reply(
                        grpc,
                        StatusCode::BAD_GATEWAY,
                        "application: switched protocols without a WebSocket upgrade\n".into(),
                    );
                };
                // The request was allowed as an upgrade and the application took it: the
                // stream becomes bytes both ways, still tracked by its request.
                let up = hyper::upgrade::on(&mut resp);
                *stream.upgrade.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Upgrade { down, up, guard });
                return resp.map(|b| b.map_err(Into::into).boxed_unsync());
            }
            let denied = Box::pin(guard.denied());
            resp.map(|inner| {
                Guarded {
                    inner,
                    denied,
                    grpc,
                    ended: false,
                    _guard: guard,
                }
                .boxed_unsync()
            })
        }
        Err(e) => reply(grpc, StatusCode::BAD_GATEWAY, e),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::{XFCC, grpc_message, is_grpc, sanitize_set_xfcc};

    #[test]
    fn a_claimed_client_certificate_never_reaches_the_application() {
        let claimed = |h: &mut http::HeaderMap| {
            h.append(XFCC, "URI=spiffe://example.org/admin".parse().unwrap());
            h.append(XFCC, "URI=spiffe://example.org/root".parse().unwrap());
        };
        // No identity (PERMISSIVE plaintext): removed, nothing in its place.
        let mut h = http::HeaderMap::new();
        claimed(&mut h);
        sanitize_set_xfcc(&mut h, None);
        assert!(h.get_all(XFCC).iter().next().is_none());
        // A proven identity: exactly the proxy's value.
        let proven: http::HeaderValue = "Hash=00;URI=spiffe://example.org/foo".parse().unwrap();
        let mut h = http::HeaderMap::new();
        claimed(&mut h);
        sanitize_set_xfcc(&mut h, Some(&proven));
        assert_eq!(h.get_all(XFCC).iter().collect::<Vec<_>>(), [&proven]);
    }

    #[test]
    fn grpc_is_told_by_its_content_type_and_grpc_web_is_not() {
        let with = |ct: &str| {
            http::Request::builder()
                .header("content-type", ct)
                .body(())
                .unwrap()
        };
        for ct in [
            "application/grpc",
            "application/grpc+proto",
            "application/grpc;charset=utf-8",
        ] {
            assert!(is_grpc(&with(ct)), "{ct}");
        }
        for ct in [
            "application/grpc-web",
            "application/json",
            "application/grpcx",
        ] {
            assert!(!is_grpc(&with(ct)), "{ct}");
        }
        assert!(!is_grpc(&http::Request::new(())));
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(
            grpc_message("forbidden: 100% «no»\n"),
            "forbidden: 100%25 %C2%ABno%C2%BB%0A"
        );
    }
}
