//! CUSTOM policies through an external authorizer implemented here, over Envoy's
//! `envoy.service.auth.v3.Authorization/Check`: it decides (and sees the SPIFFE IDs and the HTTP
//! attributes), its outage fails closed unless the provider is `fail_open`, and a policy change
//! that puts live connections under a CUSTOM policy asks its authorizer about them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::BodyExt as _;
use rustls_pki_types::PrivateKeyDer;
use tessera_proto::xds::envoy::service::auth::v3 as auth;
use tessera_proto::xds::google::rpc::Status;
use tessera_proxy::authz::ProviderConfig;
use tessera_proxy::config::{InboundPort, Protocol};
use tessera_proxy::{Identity, ProxyOptions, RunningProxy, Telemetry};
use tessera_spiffe::SpiffeId;
use tessera_test_util::{TestCa, bundle_set};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// Allows every source except `spiffe://example.org/baz`, and every HTTP path except those
/// under `/admin/`; records the principals it saw.
#[derive(Debug, Clone, Default)]
struct TestAuthorizer {
    seen: Arc<Mutex<Vec<(String, String)>>>,
}

#[tonic::async_trait]
impl auth::authorization_server::Authorization for TestAuthorizer {
    async fn check(
        &self,
        req: tonic::Request<auth::CheckRequest>,
    ) -> Result<tonic::Response<auth::CheckResponse>, tonic::Status> {
        let a = req.into_inner().attributes.unwrap_or_default();
        let path = a
            .request
            .and_then(|r| r.http)
            .map(|h| h.path)
            .unwrap_or_default();
        let src = a.source.unwrap_or_default().principal;
        let dst = a.destination.unwrap_or_default().principal;
        self.seen.lock().unwrap().push((src.clone(), dst));
        // google.rpc.Code: 0 OK, 7 PERMISSION_DENIED.
        let code = if src == "spiffe://example.org/baz" || path.starts_with("/admin/") {
            7
        } else {
            0
        };
        Ok(tonic::Response::new(auth::CheckResponse {
            status: Some(Status {
                code,
                ..Default::default()
            }),
        }))
    }
}

fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

async fn start_authorizer(a: TestAuthorizer) -> SocketAddr {
    let addr = free_addr();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(auth::authorization_server::AuthorizationServer::new(a))
            .serve(addr),
    );
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    addr
}

/// The `opa` provider at `address`.
fn opa(address: SocketAddr, fail_open: bool) -> ProviderConfig {
    ProviderConfig {
        name: "opa".into(),
        address,
        // Generous: a first Check also sets up the channel, on a busy CI machine.
        timeout_ms: Some(5000),
        fail_open,
    }
}

fn identity(ca: &TestCa, id: &str) -> Arc<Identity> {
    let svid = ca.issue(id);
    Identity::with_svid(
        svid.chain,
        PrivateKeyDer::Pkcs8(svid.key),
        bundle_set(&[ca]),
    )
    .unwrap()
}

async fn proxy(
    identity: Arc<Identity>,
    inbound: Option<u16>,
    providers: Vec<ProviderConfig>,
) -> RunningProxy {
    let mut reg = prometheus_client::registry::Registry::default();
    let telemetry = Arc::new(Telemetry::new(&mut reg, Box::new(std::io::sink())));
    let mut opts = ProxyOptions::new("127.0.0.1:0".parse().unwrap());
    opts.inbound = inbound
        .map(|port| InboundPort {
            port,
            protocol: Protocol::Tcp,
        })
        .into_iter()
        .collect();
    opts.policy = Some((
        "test.toml".into(),
        "default = \"allow\"\n[[policy]]\nname = \"ext\"\naction = \"CUSTOM\"\nprovider = \"opa\"\n[[policy.rules]]\n".into(),
    ));
    opts.authz_providers = providers;
    tessera_proxy::start(opts, identity, telemetry)
        .await
        .unwrap()
}

async fn echo_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    port
}

async fn works(from: &RunningProxy, to: &RunningProxy, target: SocketAddr) -> bool {
    let bar = SpiffeId::parse("spiffe://example.org/bar").unwrap();
    let Ok(up) = from.outbound.open(&bar, to.tunnel_addr, target).await else {
        return false;
    };
    let mut up = hyper_util::rt::TokioIo::new(up);
    up.write_all(b"hi").await.unwrap();
    let mut b = [0u8; 2];
    up.read_exact(&mut b).await.is_ok() && &b == b"hi"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_external_authorizer_decides_and_its_outage_fails_closed() {
    let ca = TestCa::new("example.org");
    let app_port = echo_app().await;
    let target: SocketAddr = format!("127.0.0.1:{app_port}").parse().unwrap();
    let authorizer = TestAuthorizer::default();
    let addr = start_authorizer(authorizer.clone()).await;
    let bar = proxy(
        identity(&ca, "spiffe://example.org/bar"),
        Some(app_port),
        vec![opa(addr, false)],
    )
    .await;
    let foo = proxy(identity(&ca, "spiffe://example.org/foo"), None, vec![]).await;
    let baz = proxy(identity(&ca, "spiffe://example.org/baz"), None, vec![]).await;
    assert!(works(&foo, &bar, target).await, "the authorizer allows foo");
    assert!(
        !works(&baz, &bar, target).await,
        "the authorizer denies baz"
    );
    let seen = authorizer.seen.lock().unwrap().clone();
    assert!(seen.contains(&(
        "spiffe://example.org/foo".into(),
        "spiffe://example.org/bar".into()
    )));

    // Outage: nothing listens at the provider's address.
    let down = free_addr();
    let closed = proxy(
        identity(&ca, "spiffe://example.org/bar"),
        Some(app_port),
        vec![opa(down, false)],
    )
    .await;
    assert!(!works(&foo, &closed, target).await, "fails closed");
    let open = proxy(
        identity(&ca, "spiffe://example.org/bar"),
        Some(app_port),
        vec![opa(down, true)],
    )
    .await;
    assert!(works(&foo, &open, target).await, "fail_open admits");
}

async fn proxy_with(
    identity: Arc<Identity>,
    inbound: InboundPort,
    providers: Vec<ProviderConfig>,
    policy: &str,
) -> RunningProxy {
    let mut reg = prometheus_client::registry::Registry::default();
    let telemetry = Arc::new(Telemetry::new(&mut reg, Box::new(std::io::sink())));
    let mut opts = ProxyOptions::new("127.0.0.1:0".parse().unwrap());
    opts.inbound = vec![inbound];
    opts.policy = Some(("test.toml".into(), policy.into()));
    opts.authz_providers = providers;
    tessera_proxy::start(opts, identity, telemetry)
        .await
        .unwrap()
}

/// bar with the `opa` authorizer configured but no CUSTOM policy yet (default allow), serving
/// the application on `app_port` as `protocol`; foo's and baz's client proxies.
struct Custom {
    authorizer: TestAuthorizer,
    bar: RunningProxy,
    foo: RunningProxy,
    baz: RunningProxy,
    target: SocketAddr,
}

async fn custom(ca: &TestCa, app_port: u16, protocol: Protocol) -> Custom {
    let authorizer = TestAuthorizer::default();
    let addr = start_authorizer(authorizer.clone()).await;
    let bar = proxy_with(
        identity(ca, "spiffe://example.org/bar"),
        InboundPort {
            port: app_port,
            protocol,
        },
        vec![opa(addr, false)],
        "default = \"allow\"\n",
    )
    .await;
    Custom {
        authorizer,
        bar,
        foo: proxy(identity(ca, "spiffe://example.org/foo"), None, vec![]).await,
        baz: proxy(identity(ca, "spiffe://example.org/baz"), None, vec![]).await,
        target: format!("127.0.0.1:{app_port}").parse().unwrap(),
    }
}

/// Every connection and request goes to the `opa` authorizer first.
const CUSTOM_EVERYTHING: &str = "default = \"allow\"\n[[policy]]\nname = \"ext\"\naction = \"CUSTOM\"\nprovider = \"opa\"\n[[policy.rules]]\n";

/// Installs a policy file's set on bar's running proxy, as a pushed change would.
fn install(bar: &RunningProxy, toml: &str) {
    let own = SpiffeId::parse("spiffe://example.org/bar").unwrap();
    let set = tessera_policy::PolicySet::from_toml_for_workload(
        &own,
        toml,
        tessera_policy::DefaultAction::Deny,
    )
    .unwrap();
    tessera_proxy::live::install(&bar.policy, &bar.connections, set);
}

/// Waits (up to `secs` s) until the authorizer has answered `n` Checks; how many it answered.
async fn checks_reach(authorizer: &TestAuthorizer, n: usize, secs: u64) -> usize {
    for _ in 0..secs * 10 {
        if authorizer.seen.lock().unwrap().len() >= n {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    authorizer.seen.lock().unwrap().len()
}

/// A connection through `from` to `to`'s application that has echoed once, kept open.
async fn open_echo(
    from: &RunningProxy,
    to: &RunningProxy,
    target: SocketAddr,
) -> impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin {
    let bar = SpiffeId::parse("spiffe://example.org/bar").unwrap();
    let up = from
        .outbound
        .open(&bar, to.tunnel_addr, target)
        .await
        .unwrap();
    let mut up = hyper_util::rt::TokioIo::new(up);
    up.write_all(b"hi").await.unwrap();
    let mut b = [0u8; 2];
    up.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"hi");
    up
}

/// Whether the other side closes `conn` within 5 s (nothing is sent on it meanwhile).
async fn closes(conn: &mut (impl tokio::io::AsyncRead + Unpin)) -> bool {
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(5), conn.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Whether `conn` still echoes (false: closed by the other side within 5 s).
async fn still_echoes(
    conn: &mut (impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin),
) -> bool {
    if conn.write_all(b"ok").await.is_err() {
        return false;
    }
    let mut b = [0u8; 2];
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(5), conn.read_exact(&mut b)).await,
        Ok(Ok(_)) if &b == b"ok"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_asks_an_authorizer_not_asked_yet_and_closes_what_it_denies() {
    let ca = TestCa::new("example.org");
    // No CUSTOM policy yet: the authorizer is configured but not asked.
    let Custom {
        authorizer,
        bar,
        foo,
        baz,
        target,
    } = custom(&ca, echo_app().await, Protocol::Tcp).await;
    let mut from_foo = open_echo(&foo, &bar, target).await;
    let mut from_baz = open_echo(&baz, &bar, target).await;
    assert!(authorizer.seen.lock().unwrap().is_empty());

    // A CUSTOM policy now covers both live connections: its authorizer is asked about each,
    // and the one it denies (baz) is closed; foo's goes on.
    install(&bar, CUSTOM_EVERYTHING);
    assert!(closes(&mut from_baz).await, "baz's connection stayed open");
    let asked = checks_reach(&authorizer, 2, 5).await;
    assert_eq!(asked, 2, "one Check per live connection");
    assert!(
        still_echoes(&mut from_foo).await,
        "foo's connection was closed"
    );

    // An unrelated change: the authorizer already admitted foo's connection, so it is not
    // asked again, and the connection goes on.
    install(
        &bar,
        &format!(
            "{CUSTOM_EVERYTHING}[[policy]]\nname = \"no-qux\"\naction = \"DENY\"\n[[policy.rules]]\nfrom = {{ principals = [\"spiffe://example.org/qux\"] }}\n"
        ),
    );
    assert!(still_echoes(&mut from_foo).await);
    assert_eq!(
        checks_reach(&authorizer, asked + 1, 1).await,
        asked,
        "foo was asked again"
    );

    // A connection made while the CUSTOM policy is in force is asked at admission, and that
    // answer is kept too: the next unrelated change does not ask about it again.
    let mut later = open_echo(&foo, &bar, target).await;
    assert_eq!(checks_reach(&authorizer, asked + 1, 5).await, asked + 1);
    install(&bar, CUSTOM_EVERYTHING);
    assert!(still_echoes(&mut later).await);
    assert_eq!(
        checks_reach(&authorizer, asked + 2, 1).await,
        asked + 1,
        "a connection asked at admission was asked again"
    );
}

/// An HTTP application whose every response sends "first" and then holds the body open.
async fn streaming_app() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let svc = hyper::service::service_fn(|_req: hyper::Request<hyper::body::Incoming>| async {
        let first = tokio_stream::iter([Ok::<_, std::convert::Infallible>(
            hyper::body::Frame::data(bytes::Bytes::from_static(b"first")),
        )]);
        let body = http_body_util::StreamBody::new(tokio_stream::StreamExt::chain(
            first,
            tokio_stream::pending(),
        ));
        Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
    });
    tokio::spawn(async move {
        loop {
            let (s, _) = l.accept().await.unwrap();
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc),
            );
        }
    });
    port
}

/// A GET of `path` through `from` to bar's HTTP port, on a connection of its own.
async fn get(
    from: &RunningProxy,
    to: &RunningProxy,
    target: SocketAddr,
    path: &str,
) -> hyper::Response<hyper::body::Incoming> {
    let bar = SpiffeId::parse("spiffe://example.org/bar").unwrap();
    let up = from
        .outbound
        .open(&bar, to.tunnel_addr, target)
        .await
        .unwrap();
    let (mut h1, conn) = hyper::client::conn::http1::handshake(up).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(path)
        .header("host", "bar.example")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    h1.send_request(req).await.unwrap()
}

/// A GET through `from` to bar's HTTP port whose response has begun (its first chunk read).
async fn streaming_get(
    from: &RunningProxy,
    to: &RunningProxy,
    target: SocketAddr,
) -> hyper::body::Incoming {
    let mut body = get(from, to, target, "/stream").await.into_body();
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), "first");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_asks_about_http_requests_in_flight_too() {
    let ca = TestCa::new("example.org");
    let Custom {
        authorizer,
        bar,
        foo,
        baz,
        target,
    } = custom(&ca, streaming_app().await, Protocol::Http).await;
    let mut from_foo = streaming_get(&foo, &bar, target).await;
    let mut from_baz = streaming_get(&baz, &bar, target).await;
    assert!(authorizer.seen.lock().unwrap().is_empty());

    install(&bar, CUSTOM_EVERYTHING);
    // baz's response ends with an error (it cannot be taken for complete); foo's goes on.
    let wait = std::time::Duration::from_secs(5);
    let ended = tokio::time::timeout(wait, from_baz.frame()).await;
    assert!(
        matches!(ended, Ok(Some(Err(_)) | None)),
        "baz's request was not ended: {ended:?}"
    );
    assert_eq!(
        checks_reach(&authorizer, 2, 5).await,
        2,
        "one Check per request"
    );
    let quiet = tokio::time::timeout(std::time::Duration::from_millis(300), from_foo.frame()).await;
    assert!(quiet.is_err(), "foo's response ended: {quiet:?}");

    // The authorizer denies `/admin/*`; a servlet container routes `/admin;x/users` there, so
    // it is asked about that reading too, and its deny holds.
    for (path, status) in [
        ("/admin;x/users", 403),
        ("/public;v=1", 200),
        ("/admin/users", 403),
    ] {
        let resp = get(&foo, &bar, target, path).await;
        assert_eq!(resp.status(), status, "{path}");
    }
}
