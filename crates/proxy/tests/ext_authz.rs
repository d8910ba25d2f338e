//! CUSTOM policies through an external authorizer implemented here, over Envoy's
//! `envoy.service.auth.v3.Authorization/Check`: it decides (and sees the SPIFFE IDs and the HTTP
//! attributes), and its outage fails closed unless the provider is `fail_open`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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

/// Allows every source except `spiffe://example.org/baz`; records the principals it saw.
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
        let src = a.source.unwrap_or_default().principal;
        let dst = a.destination.unwrap_or_default().principal;
        self.seen.lock().unwrap().push((src.clone(), dst));
        // google.rpc.Code: 0 OK, 7 PERMISSION_DENIED.
        let code = if src == "spiffe://example.org/baz" {
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
    let provider = |address, fail_open| ProviderConfig {
        name: "opa".into(),
        address,
        timeout_ms: Some(500),
        fail_open,
    };
    let bar = proxy(
        identity(&ca, "spiffe://example.org/bar"),
        Some(app_port),
        vec![provider(addr, false)],
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
        vec![provider(down, false)],
    )
    .await;
    assert!(!works(&foo, &closed, target).await, "fails closed");
    let open = proxy(
        identity(&ca, "spiffe://example.org/bar"),
        Some(app_port),
        vec![provider(down, true)],
    )
    .await;
    assert!(works(&foo, &open, target).await, "fail_open admits");
}
