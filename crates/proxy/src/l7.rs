//! HTTP authorization for ports declared `--inbound PORT:http`: the CONNECT stream carries
//! HTTP/1.1 or HTTP/2 (detected by the preface), every request is decided under the current
//! policy set with its method, path and host, denied requests get 403 and a log line, and
//! allowed ones are forwarded to the application over one HTTP/1.1 connection.

use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tessera_policy::{HttpRequest, PolicySet};
use tessera_spiffe::SpiffeId;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

type Body = BoxBody<Bytes, hyper::Error>;

/// Who is asking, on which port.
#[derive(Debug, Clone)]
pub struct L7Context {
    pub authorizers: Arc<crate::authz::Authorizers>,
    /// This workload's ID and the addresses of the two ends (for external authorizers).
    pub own: Option<Arc<SpiffeId>>,
    pub peer: std::net::SocketAddr,
    pub local: std::net::SocketAddr,
    pub policy: Arc<ArcSwap<PolicySet>>,
    pub src: Arc<SpiffeId>,
    pub port: u16,
}

fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(msg)).map_err(|n| match n {}).boxed());
    *r.status_mut() = status;
    r
}

/// The host a request names: the URI authority (HTTP/2 `:authority`) or the `Host` header,
/// without a port.
fn host_of(req: &Request<Incoming>) -> String {
    let raw = req
        .uri()
        .authority()
        .map(|a| a.host().to_owned())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default();
    match raw.parse::<http::uri::Authority>() {
        Ok(a) => a.host().to_owned(),
        Err(_) => raw,
    }
}

/// Serves HTTP on `io` (the CONNECT stream) until it ends, forwarding allowed requests to `app`.
pub async fn serve<IO>(io: IO, app: TcpStream, ctx: L7Context) -> std::io::Result<()>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(app))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "application HTTP connection ended");
        }
    });
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let ctx = ctx.clone();
        let sender = sender.clone();
        async move { Ok::<_, std::convert::Infallible>(handle(req, &ctx, &sender).await) }
    });
    hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await
        .map_err(std::io::Error::other)
}

async fn handle(
    mut req: Request<Incoming>,
    ctx: &L7Context,
    sender: &tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Incoming>>,
) -> Response<Body> {
    let host = host_of(&req);
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().to_owned();
    let d = {
        // Header values that are not visible ASCII are left out: no condition can name them.
        let headers: Vec<(&str, &str)> = req
            .headers()
            .iter()
            .filter_map(|(n, v)| v.to_str().ok().map(|v| (n.as_str(), v)))
            .collect();
        let r = HttpRequest {
            method: &method,
            path: &path,
            host: &host,
            headers: &headers,
        };
        let addrs = tessera_policy::Addresses {
            source: Some(ctx.peer.ip()),
            destination: Some(ctx.local.ip()),
        };
        if ctx.authorizers.is_empty() {
            crate::live::decide(&ctx.policy.load(), &ctx.src, ctx.port, &addrs, Some(&r))
        } else {
            let input = crate::authz::CheckInput {
                src: &ctx.src,
                src_addr: Some(ctx.peer),
                dst: ctx.own.as_deref(),
                dst_addr: Some(ctx.local),
                http: Some(r),
            };
            crate::authz::authorize(&ctx.policy.load_full(), &ctx.authorizers, &input, ctx.port)
                .await
        }
    };
    crate::live::log_decision(&d, &ctx.src, ctx.port, "http request");
    if !d.allowed {
        tracing::info!(src = %ctx.src, port = ctx.port, %method, %path, %host, reason = %d.reason, "HTTP request denied: 403");
        return text(StatusCode::FORBIDDEN, format!("forbidden: {}\n", d.reason));
    }
    // To the application as HTTP/1.1 origin-form with a Host header.
    if !req.headers().contains_key(http::header::HOST)
        && let Ok(h) = http::HeaderValue::from_str(&host)
    {
        req.headers_mut().insert(http::header::HOST, h);
    }
    let pq = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    if let Ok(u) = pq.parse() {
        *req.uri_mut() = u;
    }
    *req.version_mut() = http::Version::HTTP_11;
    let fut = {
        let mut s = sender.lock().await;
        if let Err(e) = s.ready().await {
            return text(StatusCode::BAD_GATEWAY, format!("application: {e}\n"));
        }
        s.send_request(req)
    };
    match fut.await {
        Ok(resp) => resp.map(|b| b.boxed()),
        Err(e) => text(StatusCode::BAD_GATEWAY, format!("application: {e}\n")),
    }
}
