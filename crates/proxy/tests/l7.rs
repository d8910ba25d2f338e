//! `--inbound PORT:http`: each request through the tunnel is decided with its method, path and
//! host (HTTP/1.1 and HTTP/2); denied requests get 403 (gRPC ones PERMISSION_DENIED), allowed
//! ones reach the application in the client's protocol (gRPC included).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, Full};
use hyper::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::PrivateKeyDer;
use tessera_proto::xds::envoy::service::auth::v3 as auth;
use tessera_proxy::config::{InboundPort, Protocol};
use tessera_proxy::{Identity, ProxyOptions, RunningProxy, Telemetry};
use tessera_spiffe::SpiffeId;
use tessera_test_util::access_log::AccessLog;
use tessera_test_util::{TestCa, bundle_set};
use tokio::net::TcpListener;

fn identity(ca: &TestCa, id: &str) -> Arc<Identity> {
    let svid = ca.issue(id);
    Identity::with_svid(
        svid.chain,
        PrivateKeyDer::Pkcs8(svid.key),
        bundle_set(&[ca]),
    )
    .unwrap()
}

async fn proxy(identity: Arc<Identity>, inbound: Option<u16>, policy: &str) -> RunningProxy {
    proxy_logged(identity, inbound, policy).await.0
}

/// [`proxy`], with its access log.
async fn proxy_logged(
    identity: Arc<Identity>,
    inbound: Option<u16>,
    policy: &str,
) -> (RunningProxy, AccessLog) {
    let (proxy, log, _) = proxy_observed(identity, inbound, policy).await;
    (proxy, log)
}

/// [`proxy`], with its access log and metrics.
async fn proxy_observed(
    identity: Arc<Identity>,
    inbound: Option<u16>,
    policy: &str,
) -> (
    RunningProxy,
    AccessLog,
    prometheus_client::registry::Registry,
) {
    let log = AccessLog::default();
    let mut reg = prometheus_client::registry::Registry::default();
    let telemetry = Arc::new(Telemetry::new(&mut reg, Box::new(log.clone())));
    let mut opts = ProxyOptions::new("127.0.0.1:0".parse().unwrap());
    opts.inbound = inbound
        .map(|port| InboundPort {
            port,
            protocol: Protocol::Http,
        })
        .into_iter()
        .collect();
    opts.policy = Some(("test.toml".into(), policy.into()));
    let proxy = tessera_proxy::start(opts, identity, telemetry)
        .await
        .unwrap();
    (proxy, log, reg)
}

/// bar (with its access log and metrics) serving the app on `app_port` as `:http` under
/// `policy`, and foo's proxy.
async fn observed_bar_and_foo(
    ca: &TestCa,
    app_port: u16,
    policy: &str,
) -> (
    RunningProxy,
    RunningProxy,
    AccessLog,
    prometheus_client::registry::Registry,
) {
    let (bar, log, metrics) = proxy_observed(
        identity(ca, "spiffe://example.org/bar"),
        Some(app_port),
        policy,
    )
    .await;
    (bar, client(ca, "foo").await, log, metrics)
}

/// The metrics of `registry` in Prometheus' text format.
fn metrics_text(registry: &prometheus_client::registry::Registry) -> String {
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
    text
}

/// bar, serving the app on `app_port` as `:http` under `policy`.
async fn bar(ca: &TestCa, app_port: u16, policy: &str) -> RunningProxy {
    proxy(
        identity(ca, "spiffe://example.org/bar"),
        Some(app_port),
        policy,
    )
    .await
}

/// A compiled policy set for example.org, to install on a running proxy.
fn policy_set(toml: &str) -> tessera_policy::PolicySet {
    let td = tessera_spiffe::TrustDomain::new("example.org").unwrap();
    tessera_policy::PolicySet::from_toml(td, toml).unwrap()
}

/// A client proxy for `spiffe://example.org/<name>`.
async fn client(ca: &TestCa, name: &str) -> RunningProxy {
    let id = format!("spiffe://example.org/{name}");
    proxy(identity(ca, &id), None, "").await
}

/// [`bar`], and foo's client proxy.
async fn bar_and_foo(ca: &TestCa, app_port: u16, policy: &str) -> (RunningProxy, RunningProxy) {
    (bar(ca, app_port, policy).await, client(ca, "foo").await)
}

/// An HTTP/1.1 and HTTP/2 application answering "ok <METHOD> <PATH>", with the protocol it was
/// asked in as `x-app-version`, its Host headers as `x-app-host`, the target's authority as
/// `x-app-authority` and its `x-forwarded-client-cert` headers as `x-app-xfcc`.
async fn app() -> u16 {
    counted_app().await.0
}

/// [`app`], with the number of connections it has accepted.
async fn counted_app() -> (u16, Arc<AtomicUsize>) {
    serve_app(hyper::service::service_fn(
        |req: Request<hyper::body::Incoming>| async move {
            let body = format!("ok {} {}", req.method(), req.uri().path());
            let mut resp = hyper::Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                "x-app-version",
                format!("{:?}", req.version()).parse().unwrap(),
            );
            // Every Host header it got, and the request target's authority.
            let hosts: Vec<_> = req
                .headers()
                .get_all("host")
                .iter()
                .map(|h| h.to_str().unwrap().to_owned())
                .collect();
            resp.headers_mut()
                .insert("x-app-host", hosts.join(",").parse().unwrap());
            if let Some(a) = req.uri().authority() {
                resp.headers_mut()
                    .insert("x-app-authority", a.as_str().parse().unwrap());
            }
            // Every client-certificate header it got, as one value.
            let xfcc: Vec<_> = req
                .headers()
                .get_all("x-forwarded-client-cert")
                .iter()
                .map(|h| h.to_str().unwrap().to_owned())
                .collect();
            resp.headers_mut()
                .insert("x-app-xfcc", xfcc.join(" | ").parse().unwrap());
            Ok::<_, std::convert::Infallible>(resp)
        },
    ))
    .await
}

/// Serves `svc` in HTTP/1.1 and HTTP/2 on a new loopback port: the port, and the number of
/// connections accepted.
async fn serve_app<S, B>(svc: S) -> (u16, Arc<AtomicUsize>)
where
    S: hyper::service::Service<
            Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
            Error = std::convert::Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            let svc = svc.clone();
            tokio::spawn(async move {
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    (port, accepted)
}

const POLICY: &str = r#"
[[policy]]
name = "public-reads"
action = "ALLOW"
[[policy.rules]]
from = { principals = ["spiffe://example.org/foo"] }
to = { methods = ["GET"], paths = ["/public*"] }

[[policy]]
name = "no-admin-writes"
action = "DENY"
[[policy.rules]]
to = { methods = ["POST"], paths = ["/admin*"] }

[[policy]]
name = "no-beta-clients"
action = "DENY"
[[policy.rules]]
when = [
  { key = "request.headers[X-Client]", values = ["beta*"] },
  { key = "source.ip", values = ["127.0.0.0/8"] },
]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_allow_get_public_and_deny_post_admin_over_h1_and_h2() {
    let ca = TestCa::new("example.org");
    let app_port = app().await;
    let (bar, foo) = bar_and_foo(&ca, app_port, POLICY).await;

    // HTTP/1.1 through the tunnel.
    let mut h1 = h1_to_bar(&foo, &bar, app_port).await;
    let mut call_with =
        async |method: &str, path: &str, client: &str| send(&mut h1, method, path, client).await;
    let mut call = async |method: &str, path: &str| call_with(method, path, "stable").await;
    assert_eq!(
        call("GET", "/public/x").await,
        (200, "ok GET /public/x".into())
    );
    let (status, body) = call("POST", "/admin/users").await;
    assert_eq!(status, 403);
    assert!(body.contains("no-admin-writes"), "{body}");
    let (status, body) = call("GET", "/private").await;
    assert_eq!(status, 403);
    assert!(body.contains("no ALLOW policy matched"), "{body}");
    // The connection survives denied requests.
    assert_eq!(call("GET", "/public").await.0, 200);
    // Other spellings of a path are decided, and forwarded, as the path they name: an app that
    // decodes or normalizes must not see a resource the policy refused under its plain name.
    for admin in [
        "/%61dmin/users",
        "/public/../admin/users",
        "/public/%2e%2e/admin/users",
        // Servlet containers drop `;params` from segments: these are their `/admin/users`.
        "/admin;x/users",
        "/public/..;/admin/users",
    ] {
        let (status, body) = call("POST", admin).await;
        assert_eq!(status, 403, "{admin}: {body}");
        assert!(body.contains("no-admin-writes"), "{admin}: {body}");
    }
    let (status, body) = call("GET", "/public/../private").await;
    assert_eq!(status, 403);
    assert!(body.contains("no ALLOW policy matched"), "{body}");
    assert_eq!(
        call("GET", "/%70ublic//a/./b").await,
        (200, "ok GET /public/a/b".into())
    );
    let (status, body) = call("GET", "/public/%zz").await;
    assert_eq!(status, 400);
    assert!(body.contains("malformed percent-encoding"), "{body}");
    // A `when` condition on a header (and the source address) denies one client's requests.
    let (status, body) = call_with("GET", "/public", "beta-7").await;
    assert_eq!(status, 403);
    assert!(body.contains("no-beta-clients"), "{body}");
    // Also with bytes that are not text after the prefix (obs-text): the value still names a
    // beta client to the application.
    let req = Request::builder()
        .uri("/public")
        .header("host", "bar.example")
        .header(
            "x-client",
            hyper::header::HeaderValue::from_bytes(b"beta-\xff").unwrap(),
        )
        .body(Empty::<Bytes>::new())
        .unwrap();
    h1.ready().await.unwrap();
    let resp = h1.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 403);

    // HTTP/2 through the tunnel.
    let mut h2 = h2_to_bar(&foo, &bar, app_port).await;
    let get = Request::builder()
        .uri("http://bar.example/public/h2")
        .body(Empty::<Bytes>::new())
        .unwrap();
    h2.ready().await.unwrap();
    let resp = h2.send_request(get).await.unwrap();
    assert_eq!(resp.status(), 200);
    // The client's protocol is kept to the application.
    assert_eq!(resp.headers()["x-app-version"], "HTTP/2.0");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"ok GET /public/h2");
    let post = Request::builder()
        .method("POST")
        .uri("http://bar.example/admin")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(h2.send_request(post).await.unwrap().status(), 403);
}

/// A tunnel stream from `from` to bar (`to`) for the app on `port`.
async fn stream_to_bar(
    from: &RunningProxy,
    to: &RunningProxy,
    port: u16,
) -> tessera_proxy::outbound::H2Stream {
    let bar_id = SpiffeId::parse("spiffe://example.org/bar").unwrap();
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    from.outbound
        .open(&bar_id, to.tunnel_addr, target)
        .await
        .unwrap()
}

/// An HTTP/1.1 client on a tunnel stream from `from` to bar (`to`) for the app on `app_port`.
async fn h1_to_bar(
    from: &RunningProxy,
    to: &RunningProxy,
    app_port: u16,
) -> hyper::client::conn::http1::SendRequest<Empty<Bytes>> {
    let up = stream_to_bar(from, to, app_port).await;
    let (h1, conn) = hyper::client::conn::http1::handshake(up).await.unwrap();
    tokio::spawn(conn);
    h1
}

/// An HTTP/2 (prior knowledge) client on a tunnel stream from `from` to bar (`to`).
async fn h2_to_bar(
    from: &RunningProxy,
    to: &RunningProxy,
    app_port: u16,
) -> hyper::client::conn::http2::SendRequest<Empty<Bytes>> {
    let up = stream_to_bar(from, to, app_port).await;
    let (h2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), up)
        .await
        .unwrap();
    tokio::spawn(conn);
    h2
}

/// Sends `method path` (with an `X-Client` header) on an HTTP/1.1 connection through the
/// tunnel; the status and body.
async fn send(
    h1: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    method: &str,
    path: &str,
    client: &str,
) -> (u16, String) {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "bar.example")
        .header("x-client", client)
        .body(Empty::<Bytes>::new())
        .unwrap();
    h1.ready().await.unwrap();
    let resp = h1.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    if status == 200 {
        // The client's protocol is kept to the application.
        assert_eq!(resp.headers()["x-app-version"], "HTTP/1.1");
    }
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn get(
    h1: &mut hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    path: &str,
) -> (u16, String) {
    send(h1, "GET", path, "stable").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_is_connected_only_for_an_allowed_request() {
    let ca = TestCa::new("example.org");
    let (app_port, accepted) = counted_app().await;
    let bar = bar(&ca, app_port, POLICY).await;
    // baz may send no request at all: its tunnels, however many, hold no application
    // connection open.
    let baz = client(&ca, "baz").await;
    let mut denied = Vec::new();
    for _ in 0..5 {
        let mut h1 = h1_to_bar(&baz, &bar, app_port).await;
        let (status, body) = get(&mut h1, "/public/x").await;
        assert_eq!(status, 403, "{body}");
        denied.push(h1);
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "a denied source reached the app"
    );

    // foo's first allowed request opens one connection; later ones on the stream reuse it.
    let foo = client(&ca, "foo").await;
    let mut h1 = h1_to_bar(&foo, &bar, app_port).await;
    assert_eq!(get(&mut h1, "/private").await.0, 403);
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
    assert_eq!(
        get(&mut h1, "/public/a").await,
        (200, "ok GET /public/a".into())
    );
    assert_eq!(
        get(&mut h1, "/public/b").await,
        (200, "ok GET /public/b".into())
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    drop(denied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_request_to_an_application_that_is_down_gets_502() {
    let ca = TestCa::new("example.org");
    // A port with nothing listening: bound, then closed.
    let down = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = down.local_addr().unwrap().port();
    drop(down);
    let bar = bar(&ca, port, POLICY).await;
    let foo = client(&ca, "foo").await;
    let mut h1 = h1_to_bar(&foo, &bar, port).await;
    // Denied before the application is tried; allowed, then refused by the kernel.
    assert_eq!(get(&mut h1, "/private").await.0, 403);
    let (status, body) = get(&mut h1, "/public/x").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("refused"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_that_switches_protocols_unasked_gets_502() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let ca = TestCa::new("example.org");
    // Answers every request with a switch to HTTP/2, asked for or not.
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&b[..n]),
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n")
                    .await;
                let _ = s.read(&mut b).await;
            });
        }
    });
    let (bar, foo) = bar_and_foo(&ca, app_port, POLICY).await;
    let mut h1 = h1_to_bar(&foo, &bar, app_port).await;
    let (status, body) = get(&mut h1, "/public/x").await;
    assert_eq!(status, 502, "{body}");
}

/// A gRPC application (Envoy's `Authorization/Check`, from this crate's protos) that answers
/// only once two calls are in it at the same time: it proves both that gRPC (HTTP/2 with
/// trailers) reaches the application and that one stream's calls reach it multiplexed.
#[derive(Clone)]
struct PairedCheck {
    both_in: Arc<tokio::sync::Barrier>,
    calls: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl auth::authorization_server::Authorization for PairedCheck {
    async fn check(
        &self,
        req: tonic::Request<auth::CheckRequest>,
    ) -> Result<tonic::Response<auth::CheckResponse>, tonic::Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.both_in.wait().await;
        let principal = req
            .into_inner()
            .attributes
            .and_then(|a| a.source)
            .map(|s| s.principal)
            .unwrap_or_default();
        Ok(tonic::Response::new(auth::CheckResponse {
            status: Some(tessera_proto::xds::google::rpc::Status {
                code: 0,
                message: format!("checked {principal}"),
                ..Default::default()
            }),
        }))
    }
}

/// A gRPC client whose one connection is a tunnel stream from `from` to bar's port `port`.
async fn grpc_to_bar(
    from: &RunningProxy,
    to: &RunningProxy,
    port: u16,
) -> auth::authorization_client::AuthorizationClient<tonic::transport::Channel> {
    let bar_id = SpiffeId::parse("spiffe://example.org/bar").unwrap();
    let target: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (outbound, tunnel) = (from.outbound.clone(), to.tunnel_addr);
    let channel = tonic::transport::Endpoint::from_static("http://bar.example")
        .connect_with_connector(tower::service_fn(move |_: hyper::Uri| {
            let (outbound, bar_id) = (outbound.clone(), bar_id.clone());
            async move { outbound.open(&bar_id, tunnel, target).await }
        }))
        .await
        .unwrap();
    auth::authorization_client::AuthorizationClient::new(channel)
}

fn check_request(principal: &str) -> auth::CheckRequest {
    auth::CheckRequest {
        attributes: Some(auth::AttributeContext {
            source: Some(auth::attribute_context::Peer {
                principal: principal.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_reaches_the_application_multiplexed_and_a_denied_call_is_permission_denied() {
    let ca = TestCa::new("example.org");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = l.local_addr().unwrap().port();
    let app = PairedCheck {
        both_in: Arc::new(tokio::sync::Barrier::new(2)),
        calls: Arc::new(AtomicUsize::new(0)),
    };
    let calls = app.calls.clone();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(auth::authorization_server::AuthorizationServer::new(app))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l)),
    );
    let policy = r#"
[[policy]]
name = "checks-from-foo"
action = "ALLOW"
[[policy.rules]]
from = { principals = ["spiffe://example.org/foo"] }
to = { methods = ["POST"], paths = ["/envoy.service.auth.v3.Authorization/*"] }
"#;
    let bar = bar(&ca, app_port, policy).await;

    // Two calls on one tunnel stream, in flight together: the application answers neither
    // until both are in it, so calls forwarded one at a time would never finish.
    let foo = client(&ca, "foo").await;
    let grpc = grpc_to_bar(&foo, &bar, app_port).await;
    let (mut a, mut b) = (grpc.clone(), grpc);
    let both = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        tokio::join!(
            a.check(check_request("spiffe://example.org/a")),
            b.check(check_request("spiffe://example.org/b")),
        )
    })
    .await
    .expect("two calls on one stream did not reach the application together");
    for (r, who) in [(both.0, "a"), (both.1, "b")] {
        let r = r.unwrap().into_inner();
        assert_eq!(
            r.status.unwrap().message,
            format!("checked spiffe://example.org/{who}")
        );
    }

    // baz is allowed no call: a gRPC status its client can read, and the application never
    // sees the call.
    let baz = client(&ca, "baz").await;
    let mut denied = grpc_to_bar(&baz, &bar, app_port).await;
    let e = denied
        .check(check_request("spiffe://example.org/c"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("no ALLOW policy matched"), "{e:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// An HTTP/1.1 and HTTP/2 application whose responses never end: `…/hang` never answers (the
/// count says how many arrived), anything else answers 200 with one chunk ("first") and then
/// holds the body open.
async fn streaming_app() -> (u16, Arc<AtomicUsize>) {
    let hangs = Arc::new(AtomicUsize::new(0));
    let seen = hangs.clone();
    let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
        let seen = seen.clone();
        async move {
            if req.uri().path().ends_with("/hang") {
                seen.fetch_add(1, Ordering::SeqCst);
                std::future::pending::<()>().await;
            }
            let first = tokio_stream::iter([Ok::<_, std::convert::Infallible>(
                hyper::body::Frame::data(Bytes::from_static(b"first")),
            )]);
            let body = http_body_util::StreamBody::new(tokio_stream::StreamExt::chain(
                first,
                tokio_stream::pending(),
            ));
            Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
        }
    });
    (serve_app(svc).await.0, hangs)
}

/// The next frame of `body`, or `None` if none comes within `wait`.
async fn next_frame(
    body: &mut hyper::body::Incoming,
    wait: std::time::Duration,
) -> Option<Result<hyper::body::Frame<Bytes>, hyper::Error>> {
    tokio::time::timeout(wait, body.frame())
        .await
        .ok()
        .flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_are_decided_again_when_policy_changes() {
    let ca = TestCa::new("example.org");
    let (app_port, hangs) = streaming_app().await;
    let (bar, foo) = bar_and_foo(&ca, app_port, POLICY).await;
    let quick = std::time::Duration::from_millis(300);
    let long = std::time::Duration::from_secs(10);

    // On one HTTP/2 stream: a gRPC response streaming, a plain one streaming, one the
    // application has not answered yet, and one that the new policy still allows.
    let h2 = h2_to_bar(&foo, &bar, app_port).await;
    let start = |path: &str, grpc: bool| {
        let mut h2 = h2.clone();
        let mut req = Request::builder().uri(format!("http://bar.example{path}"));
        if grpc {
            req = req.header("content-type", "application/grpc");
        }
        let req = req.body(Empty::<Bytes>::new()).unwrap();
        async move {
            h2.ready().await.unwrap();
            h2.send_request(req).await.unwrap()
        }
    };
    let mut grpc = start("/public/grpc", true).await.into_body();
    let mut plain = start("/public/plain", false).await.into_body();
    let mut kept = start("/public/keep/stream", false).await.into_body();
    let hanging = tokio::spawn(start("/public/hang", false));
    // And one over HTTP/1.1, on its own stream.
    let mut h1 = h1_to_bar(&foo, &bar, app_port).await;
    let h1_req = Request::builder()
        .uri("/public/h1")
        .header("host", "bar.example")
        .body(Empty::<Bytes>::new())
        .unwrap();
    h1.ready().await.unwrap();
    let mut h1_body = h1.send_request(h1_req).await.unwrap().into_body();
    for body in [&mut grpc, &mut plain, &mut kept, &mut h1_body] {
        let f = next_frame(body, long).await.unwrap().unwrap();
        assert_eq!(f.into_data().unwrap(), "first");
        assert!(
            next_frame(body, quick).await.is_none(),
            "the app ended early"
        );
    }

    // foo may now read only under /public/keep.
    let narrower = r#"
[[policy]]
name = "keep-only"
action = "ALLOW"
[[policy.rules]]
from = { principals = ["spiffe://example.org/foo"] }
to = { methods = ["GET"], paths = ["/public/keep*"] }
"#;
    let set = policy_set(narrower);
    // The unanswered request is in flight once the application holds it.
    let deadline = tokio::time::Instant::now() + long;
    while hangs.load(Ordering::SeqCst) == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the /hang request never arrived"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(bar.connections.reevaluate(&set), 4, "four requests end");
    bar.policy.store(Arc::new(set));

    // gRPC: the call ends with PERMISSION_DENIED trailers naming why.
    let t = next_frame(&mut grpc, long).await.unwrap().unwrap();
    let t = t.into_trailers().unwrap();
    assert_eq!(t["grpc-status"], "7");
    let msg = t["grpc-message"].to_str().unwrap();
    assert!(msg.contains("re-authorization"), "{msg}");
    // Plain HTTP/2 and HTTP/1.1: the body fails, so it cannot be taken for complete.
    assert!(next_frame(&mut plain, long).await.unwrap().is_err());
    assert!(next_frame(&mut h1_body, long).await.unwrap().is_err());
    // Not answered yet: 403 naming the policy change.
    let r = tokio::time::timeout(long, hanging).await.unwrap().unwrap();
    assert_eq!(r.status(), 403);
    let b = r.into_body().collect().await.unwrap().to_bytes();
    assert!(String::from_utf8_lossy(&b).contains("re-authorization"));
    // Still allowed: still streaming.
    assert!(next_frame(&mut kept, quick).await.is_none());
    // A new request is decided under the new set.
    let r = start("/public/plain", false).await;
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_connection_is_logged_with_its_bytes_and_each_request_logged_and_counted() {
    let ca = TestCa::new("example.org");
    let app_port = app().await;
    let (bar, foo, log, metrics) = observed_bar_and_foo(&ca, app_port, POLICY).await;
    let mut h1 = h1_to_bar(&foo, &bar, app_port).await;
    let body = "ok GET /public/counted";
    assert_eq!(get(&mut h1, "/public/counted").await, (200, body.into()));
    assert_eq!(get(&mut h1, "/private").await.0, 403);
    assert_eq!(get(&mut h1, "/public/%zz").await.0, 400);
    assert_eq!(get(&mut h1, "/public/again").await.0, 200);
    drop(h1);
    let text = metrics_text(&metrics);
    for line in [
        r#"tessera_proxy_http_requests_total{decision="allow",response_code="200"} 2"#,
        r#"tessera_proxy_http_requests_total{decision="deny",response_code="403"} 1"#,
        r#"tessera_proxy_http_requests_total{decision="invalid",response_code="400"} 1"#,
        r#"tessera_proxy_http_request_duration_seconds_count{decision="allow",response_code="200"} 2"#,
    ] {
        assert!(text.contains(line), "{line} not in\n{text}");
    }
    // One record per request, with what the client sent and what became of it.
    let requests: Vec<_> = log
        .records()
        .into_iter()
        .filter(|r| r["kind"] == "http_request")
        .collect();
    let seen: Vec<_> = requests
        .iter()
        .map(|r| {
            (
                r["path"].as_str().unwrap(),
                r["decision"].as_str().unwrap(),
                r["response_code"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("/public/counted", "allow", 200),
            ("/private", "deny", 403),
            ("/public/%zz", "invalid", 400),
            ("/public/again", "allow", 200),
        ]
    );
    for r in &requests {
        assert_eq!(r["src_spiffe_id"], "spiffe://example.org/foo", "{r}");
        assert_eq!(r["dst_spiffe_id"], "spiffe://example.org/bar", "{r}");
        assert_eq!(
            (&r["method"], &r["host"]),
            (&"GET".into(), &"bar.example".into())
        );
    }
    assert!(
        requests[0]["reason"]
            .as_str()
            .unwrap()
            .contains("public-reads"),
        "{}",
        requests[0]
    );
    assert!(
        requests[1]["reason"]
            .as_str()
            .unwrap()
            .contains("no ALLOW policy matched")
    );
    assert!(
        requests[2]["reason"]
            .as_str()
            .unwrap()
            .contains("malformed percent-encoding")
    );

    let r = log
        .wait_for(|r| r["kind"] == "connection" && r["decision"] == "allow")
        .await;
    assert_eq!(r["direction"], "inbound");
    // The request line alone, and the response body alone, are lower bounds.
    let sent = r["bytes_sent"].as_u64().unwrap();
    let received = r["bytes_received"].as_u64().unwrap();
    assert!(
        sent > "GET /public/counted HTTP/1.1\r\n".len() as u64,
        "{r}"
    );
    assert!(received > body.len() as u64, "{r}");
}

/// An HTTP/1.1 application that switches any request with an `Upgrade` header to an echo of
/// bytes (as a WebSocket server switches to frames, or an h2c server to HTTP/2), and answers
/// the others 200.
async fn upgrading_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |mut req: Request<hyper::body::Incoming>| async move {
                        let mut resp = hyper::Response::new(Empty::<Bytes>::new());
                        if let Some(proto) = req.headers().get("upgrade").cloned() {
                            let on = hyper::upgrade::on(&mut req);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(on.await.unwrap());
                                let (mut r, mut w) = tokio::io::split(&mut io);
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                            });
                            *resp.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
                            resp.headers_mut()
                                .insert("connection", "upgrade".parse().unwrap());
                            resp.headers_mut().insert("upgrade", proto);
                        }
                        Ok::<_, std::convert::Infallible>(resp)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .with_upgrades()
                    .await;
            });
        }
    });
    port
}

/// Asks `to`'s application on `port` to switch `path` to protocol `proto`, through `from`:
/// the response status, and the upgraded stream if it switched.
async fn upgrade_through(
    from: &RunningProxy,
    to: &RunningProxy,
    port: u16,
    path: &str,
    proto: &str,
) -> (u16, Option<TokioIo<hyper::upgrade::Upgraded>>) {
    let up = stream_to_bar(from, to, port).await;
    let (mut h1, conn) = hyper::client::conn::http1::handshake(up).await.unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = Request::builder()
        .uri(path)
        .header("host", "bar.example")
        .header("connection", "upgrade")
        .header("upgrade", proto)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let mut resp = h1.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    if status != 101 {
        return (status, None);
    }
    let io = hyper::upgrade::on(&mut resp).await.unwrap();
    (status, Some(TokioIo::new(io)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_upgrade_carries_bytes_until_policy_denies_it() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let ca = TestCa::new("example.org");
    let app_port = upgrading_app().await;
    let (bar, log) = proxy_logged(
        identity(&ca, "spiffe://example.org/bar"),
        Some(app_port),
        POLICY,
    )
    .await;
    let foo = client(&ca, "foo").await;
    let baz = client(&ca, "baz").await;

    // baz may not: 403, and no switch.
    let (status, io) = upgrade_through(&baz, &bar, app_port, "/public/ws", "websocket").await;
    assert_eq!(status, 403);
    assert!(io.is_none());

    // An upgrade to anything but WebSocket is taken out of the request: after a switch to
    // HTTP/2 (h2c), requests would reach the application undecided. The application answers
    // the request as HTTP/1.1.
    let (status, io) = upgrade_through(&foo, &bar, app_port, "/public/h2c", "h2c").await;
    assert_eq!(status, 200);
    assert!(io.is_none());

    // foo may: the stream becomes the application's echo.
    let (status, io) = upgrade_through(&foo, &bar, app_port, "/public/ws", "WebSocket").await;
    assert_eq!(status, 101);
    let mut io = io.unwrap();
    let mut buf = [0u8; 5];
    for word in [b"hello", b"again"] {
        io.write_all(word).await.unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), io.read_exact(&mut buf))
            .await
            .expect("no echo through the upgraded stream")
            .unwrap();
        assert_eq!(&buf, word);
    }

    // A policy that no longer allows the upgrade's request ends the upgraded stream.
    let set = policy_set("");
    assert_eq!(bar.connections.reevaluate(&set), 1);
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), io.read(&mut buf))
        .await
        .expect("the upgraded stream stayed open after policy denied it");
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let r = log
        .wait_for(|r| {
            r["src_spiffe_id"] == "spiffe://example.org/foo"
                && r["reason"]
                    .as_str()
                    .unwrap_or("")
                    .contains("re-authorization")
        })
        .await;
    // Both words went each way through the upgraded stream, besides the HTTP exchange.
    assert!(r["bytes_sent"].as_u64().unwrap() > 10, "{r}");
    assert!(r["bytes_received"].as_u64().unwrap() > 10, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_policy_decides_on_is_the_only_host_the_application_gets() {
    let ca = TestCa::new("example.org");
    let app_port = app().await;
    let policy = r#"
[[policy]]
name = "reads"
action = "ALLOW"
[[policy.rules]]
from = { principals = ["spiffe://example.org/foo"] }

[[policy]]
name = "no-admin-host"
action = "DENY"
[[policy.rules]]
to = { hosts = ["admin.example"] }
"#;
    let (bar, foo) = bar_and_foo(&ca, app_port, policy).await;
    let mut h1 = h1_to_bar(&foo, &bar, app_port).await;
    let mut send = async |uri: &str, hosts: &[&str]| {
        let mut req = Request::builder().uri(uri);
        for h in hosts {
            req = req.header("host", *h);
        }
        h1.ready().await.unwrap();
        let resp = h1
            .send_request(req.body(Empty::<Bytes>::new()).unwrap())
            .await
            .unwrap();
        let seen = resp
            .headers()
            .get("x-app-host")
            .map(|h| h.to_str().unwrap().to_owned());
        (resp.status().as_u16(), seen)
    };
    // An absolute-form target names the host (RFC 9112 §3.2.2), whatever Host says: decided
    // on it, and the application gets it as its one Host.
    assert_eq!(
        send("http://admin.example/x", &["bar.example"]).await,
        (403, None)
    );
    assert_eq!(
        send("http://bar.example:8080/x", &["admin.example"]).await,
        (200, Some("bar.example:8080".into()))
    );
    assert_eq!(
        send("/x", &["admin.example"]).await.0,
        403,
        "Host decides for an origin-form target"
    );
    // A trailing dot names the same host.
    assert_eq!(send("/x", &["admin.example."]).await, (403, None));
    assert_eq!(
        send("http://bar.example./x", &[]).await,
        (200, Some("bar.example".into()))
    );
    // A Host that is not host[:port] is refused rather than matched as text.
    assert_eq!(send("/x", &["admin.example/x"]).await, (400, None));
    // Two Host headers: which one the application reads is unknown, so neither is guessed.
    assert_eq!(
        send("/x", &["bar.example", "admin.example"]).await,
        (400, None)
    );

    // HTTP/2: `:authority` decides, and a Host header beside it does not reach the application.
    let mut h2 = h2_to_bar(&foo, &bar, app_port).await;
    let req = Request::builder()
        .uri("http://bar.example/x")
        .header("host", "admin.example")
        .body(Empty::<Bytes>::new())
        .unwrap();
    h2.ready().await.unwrap();
    let resp = h2.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-app-authority"], "bar.example");
    assert_eq!(resp.headers()["x-app-host"], "");
}

/// Counts a hanging handler's end.
struct OnDrop(Arc<AtomicUsize>);

impl Drop for OnDrop {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// HTTP/2 requests run in tasks of their own; when their connection is closed (here by a
/// bundle change), their calls to the application must end too, not wait on it for an answer
/// that can go nowhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_still_running_ends_with_its_connection() {
    let ca = TestCa::new("example.org");
    // An HTTP/2 application that never answers; it counts the calls it got and those that
    // ended (the proxy gave up on them).
    let (entered, ended) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (e, d) = (entered.clone(), ended.clone());
    let svc = hyper::service::service_fn(move |_: Request<hyper::body::Incoming>| {
        let (e, d) = (e.clone(), d.clone());
        async move {
            e.fetch_add(1, Ordering::SeqCst);
            let _ended = OnDrop(d);
            std::future::pending::<()>().await;
            Ok::<_, std::convert::Infallible>(hyper::Response::new(Empty::<Bytes>::new()))
        }
    });
    let (app_port, _) = serve_app(svc).await;
    let (bar, foo) = bar_and_foo(&ca, app_port, POLICY).await;
    let mut h2 = h2_to_bar(&foo, &bar, app_port).await;
    let req = Request::builder()
        .uri("http://bar.example/public/hang")
        .body(Empty::<Bytes>::new())
        .unwrap();
    h2.ready().await.unwrap();
    let call = tokio::spawn(h2.send_request(req));
    let wait = |n: &Arc<AtomicUsize>, what: &str| {
        let (n, what) = (n.clone(), what.to_owned());
        async move {
            for _ in 0..200 {
                if n.load(Ordering::SeqCst) == 1 {
                    return;
                }
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            panic!("{what}");
        }
    };
    wait(&entered, "the call did not reach the application").await;
    // The bundle loses the CA foo's certificate chains to: bar closes the connection.
    let other = TestCa::new("example.org");
    assert_eq!(bar.connections.reverify(&bundle_set(&[&other])), 1);
    wait(
        &ended,
        "the call to the application outlived its connection",
    )
    .await;
    assert!(call.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_application_learns_the_proven_caller_and_never_a_claimed_one() {
    let ca = TestCa::new("example.org");
    let app_port = app().await;
    let bar = bar(&ca, app_port, POLICY).await;
    // foo's SVID is kept here, to know the hash of the certificate foo proves.
    let svid = ca.issue("spiffe://example.org/foo");
    let hash = tessera_tls::cert_sha256_hex(&svid.chain[0]);
    let foo = proxy(
        Identity::with_svid(
            svid.chain,
            PrivateKeyDer::Pkcs8(svid.key),
            bundle_set(&[&ca]),
        )
        .unwrap(),
        None,
        "",
    )
    .await;
    let want = format!("By=spiffe://example.org/bar;Hash={hash};URI=spiffe://example.org/foo");
    let forged = "By=spiffe://example.org/bar;URI=spiffe://example.org/admin";
    let request = |version| {
        Request::builder()
            .version(version)
            .uri("http://bar.example/public/x")
            .header("x-forwarded-client-cert", forged)
            .header("x-forwarded-client-cert", "URI=spiffe://example.org/root")
            .body(Empty::<Bytes>::new())
            .unwrap()
    };
    // HTTP/1.1: the claimed identities are gone, the proven one is set.
    let mut h1 = h1_to_bar(&foo, &bar, app_port).await;
    h1.ready().await.unwrap();
    let resp = h1
        .send_request(request(http::Version::HTTP_11))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-app-xfcc"], want.as_str());
    // HTTP/2 the same.
    let mut h2 = h2_to_bar(&foo, &bar, app_port).await;
    h2.ready().await.unwrap();
    let resp = h2
        .send_request(request(http::Version::HTTP_2))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-app-version"], "HTTP/2.0");
    assert_eq!(resp.headers()["x-app-xfcc"], want.as_str());
}

/// CONNECT on a port declared `:http` asks the application to open a tunnel elsewhere (RFC 9110
/// §9.3.6), whose bytes no request policy would decide: refused (501) whatever policy says,
/// before the application is connected, over HTTP/1.1 and HTTP/2; the connection goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_request_is_refused_and_never_reaches_the_application() {
    const ANYTHING_FROM_FOO: &str = r#"
[[policy]]
name = "foo-anything"
action = "ALLOW"
[[policy.rules]]
from = { principals = ["spiffe://example.org/foo"] }
"#;
    let ca = TestCa::new("example.org");
    let (app_port, accepted) = counted_app().await;
    let (bar, foo, log, metrics) = observed_bar_and_foo(&ca, app_port, ANYTHING_FROM_FOO).await;

    let mut h1 = h1_to_bar(&foo, &bar, app_port).await;
    let (status, body) = send(&mut h1, "CONNECT", "elsewhere.example:443", "stable").await;
    assert_eq!(status, 501, "{body}");
    assert!(body.contains("CONNECT"), "{body}");
    assert_eq!(accepted.load(Ordering::SeqCst), 0, "the application saw it");
    // The connection still carries requests, which policy decides.
    assert_eq!(get(&mut h1, "/x").await, (200, "ok GET /x".into()));

    let mut h2 = h2_to_bar(&foo, &bar, app_port).await;
    let connect = Request::builder()
        .method("CONNECT")
        .uri("elsewhere.example:443")
        .body(Empty::<Bytes>::new())
        .unwrap();
    h2.ready().await.unwrap();
    let resp = h2.send_request(connect).await.unwrap();
    assert_eq!(resp.status(), 501);
    let get = Request::builder()
        .uri("http://bar.example/y")
        .body(Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(h2.send_request(get).await.unwrap().status(), 200);
    // One application connection per client stream, for their GETs alone.
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    // Recorded and counted as requests refused, not as allowed ones.
    let text = metrics_text(&metrics);
    let line = r#"tessera_proxy_http_requests_total{decision="invalid",response_code="501"} 2"#;
    assert!(text.contains(line), "{line} not in\n{text}");
    let refused = log
        .records()
        .into_iter()
        .filter(|r| r["kind"] == "http_request" && r["method"] == "CONNECT")
        .collect::<Vec<_>>();
    assert_eq!(refused.len(), 2, "{refused:?}");
    for r in refused {
        assert_eq!(r["decision"], "invalid", "{r}");
        assert!(r["reason"].as_str().unwrap().contains("CONNECT"), "{r}");
    }
}

/// One raw HTTP/1.1 request (`Connection: close` added) through a tunnel stream from foo to
/// bar's application: the response's status line and body, as the client reads them.
async fn raw_h1(from: &RunningProxy, to: &RunningProxy, app_port: u16, head: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut io = TokioIo::new(stream_to_bar(from, to, app_port).await);
    let req = format!("{head}\r\nConnection: close\r\n\r\n");
    io.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    let _ = io.read_to_end(&mut resp).await;
    let resp = String::from_utf8_lossy(&resp).into_owned();
    let status = resp.lines().next().unwrap_or("").to_owned();
    let body = resp.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    format!("{status} | {body}")
}

/// What a rule matches is what the application reads (Istio's normalization reference): a
/// method not in upper case is refused (applications upper-case it), `\` is a `/`, `%00` is
/// refused, copies of a header are one joined value, and `request.headers[host]` is the host
/// the application receives, not a Host header an absolute-form target overrides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_sees_the_request_as_the_application_reads_it() {
    let ca = TestCa::new("example.org");
    let app_port = app().await;
    let policy = r#"
[[policy]]
name = "all"
action = "ALLOW"
[[policy.rules]]
from = { principals = ["spiffe://example.org/foo"] }

[[policy]]
name = "no-delete"
action = "DENY"
[[policy.rules]]
to = { methods = ["DELETE"], paths = ["/data/*"] }

[[policy]]
name = "no-admin"
action = "DENY"
[[policy.rules]]
to = { paths = ["/admin", "/admin/*"] }

[[policy]]
name = "no-admin-host"
action = "DENY"
[[policy.rules]]
when = [{ key = "request.headers[host]", values = ["admin.example"] }]

[[policy]]
name = "verdict"
action = "DENY"
[[policy.rules]]
to = { paths = ["/nv"] }
when = [{ key = "request.headers[x-verdict]", not_values = ["ok"] }]
"#;
    let (bar, foo) = bar_and_foo(&ca, app_port, policy).await;
    let req = async |head: &str| raw_h1(&foo, &bar, app_port, head).await;
    let status = |r: &str| r.split(' ').nth(1).unwrap_or("").to_owned();

    assert_eq!(
        req("GET /data/x HTTP/1.1\r\nHost: bar.example").await,
        "HTTP/1.1 200 OK | ok GET /data/x"
    );
    assert_eq!(
        status(&req("DELETE /data/x HTTP/1.1\r\nHost: bar.example").await),
        "403"
    );
    for m in ["delete", "Delete", "gEt"] {
        let r = req(&format!("{m} /data/x HTTP/1.1\r\nHost: bar.example")).await;
        assert_eq!(status(&r), "400", "{m}: {r}");
        assert!(r.contains("not in upper case"), "{r}");
    }

    for path in ["/x\\..\\admin", "/public/..\\admin\\"] {
        let r = req(&format!("GET {path} HTTP/1.1\r\nHost: bar.example")).await;
        assert_eq!(status(&r), "403", "{path}: {r}");
    }
    // The application gets the path policy decided on.
    assert_eq!(
        req("GET /a\\b/..\\c HTTP/1.1\r\nHost: bar.example").await,
        "HTTP/1.1 200 OK | ok GET /a/c"
    );
    let r = req("GET /admin%00 HTTP/1.1\r\nHost: bar.example").await;
    assert_eq!(status(&r), "400", "{r}");
    assert!(r.contains("%00"), "{r}");

    let r = req("GET /nv HTTP/1.1\r\nHost: bar.example\r\nx-verdict: ok").await;
    assert_eq!(status(&r), "200", "{r}");
    let r =
        req("GET /nv HTTP/1.1\r\nHost: bar.example\r\nx-verdict: ok\r\nX-Verdict: denied").await;
    assert_eq!(status(&r), "403", "a second copy joins the first: {r}");

    assert_eq!(
        status(&req("GET /h HTTP/1.1\r\nHost: admin.example").await),
        "403"
    );
    let r = req("GET http://admin.example/h HTTP/1.1\r\nHost: other.example").await;
    assert_eq!(status(&r), "403", "the target's host is the host: {r}");
    let r = req("GET http://other.example/h HTTP/1.1\r\nHost: admin.example").await;
    assert_eq!(r, "HTTP/1.1 200 OK | ok GET /h");

    // HTTP/2: `:authority` is the host a header condition sees, and `:method` is refused the
    // same way.
    let mut h2 = h2_to_bar(&foo, &bar, app_port).await;
    let mut h2_status = async |method: &str, uri: &str| {
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(Empty::<Bytes>::new())
            .unwrap();
        h2.ready().await.unwrap();
        h2.send_request(req).await.unwrap().status().as_u16()
    };
    assert_eq!(h2_status("GET", "http://admin.example/h").await, 403);
    assert_eq!(h2_status("GET", "http://bar.example/h").await, 200);
    assert_eq!(h2_status("delete", "http://bar.example/data/x").await, 400);
}
