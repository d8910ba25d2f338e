//! Envoy SDS v3 over the real Workload API socket, called by the generated tonic SDS client as the
//! test process itself: attestation reads this process's real peer credentials, so entries match
//! on its real `unix:uid`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step should panic

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use prost::Message as _;
use tessera_agent::metrics::AgentMetrics;
use tessera_agent::workload_api::{WorkloadApi, serve};
use tessera_agent::{Cache, Identity, JwtMinter};
use tessera_proto::xds::envoy::config::core::v3::{
    BuildVersion, DataSource, Node, data_source, node,
};
use tessera_proto::xds::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, Secret, SpiffeCertValidatorConfig, secret,
};
use tessera_proto::xds::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse,
};
use tessera_proto::xds::envoy::service::secret::v3::secret_discovery_service_client::SecretDiscoveryServiceClient;
use tessera_proto::xds::envoy::r#type::v3::SemanticVersion;
use tessera_proto::xds::google::rpc;
use tessera_spiffe::{BundleSet, Selector, SpiffeId, TrustDomain};
use tessera_test_util::{TestCa, pem_block, unix_now};
use tessera_workload_attest::Attestor;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Status, Streaming};
use zeroize::Zeroizing;

const SECRET: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

type Client = SecretDiscoveryServiceClient<Channel>;

#[derive(Debug)]
struct NoJwt;

#[tonic::async_trait]
impl JwtMinter for NoJwt {
    async fn mint(&self, _: &str, _: &[String]) -> Result<String, Status> {
        Err(Status::unimplemented("no JWT in SDS tests"))
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    cache: Arc<Cache>,
    metrics: Arc<AgentMetrics>,
    registry: Arc<std::sync::Mutex<prometheus_client::registry::Registry>>,
    ca: TestCa,
    fed_ca: TestCa,
    other_ca: TestCa,
    _shutdown: oneshot::Sender<()>,
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn mine() -> Selector {
    Selector::parse(&format!("unix:uid:{}", nix::unistd::geteuid())).unwrap()
}

fn not_mine() -> Selector {
    let other = nix::unistd::geteuid().as_raw().wrapping_add(4242);
    Selector::parse(&format!("unix:uid:{other}")).unwrap()
}

impl Fixture {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let cache = Arc::new(Cache::new());
        let (metrics, registry) = AgentMetrics::new();
        let api = WorkloadApi::new(cache.clone(), Arc::new(Attestor::new(0)), Arc::new(NoJwt))
            .with_metrics(metrics.clone());
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn({
            let socket = socket.clone();
            async move {
                serve(&socket, api, async {
                    let _ = rx.await;
                })
                .await
            }
        });
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(socket.exists(), "the server did not bind its socket");
        Self {
            _dir: dir,
            socket,
            cache,
            metrics,
            registry,
            ca: TestCa::new("example.org"),
            fed_ca: TestCa::new("fed.org"),
            other_ca: TestCa::new("other.org"),
            _shutdown: tx,
        }
    }

    async fn client(&self) -> Client {
        let path = self.socket.clone();
        let channel = Endpoint::from_static("http://[::1]:0")
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(path).await?,
                    ))
                }
            }))
            .await
            .unwrap();
        SecretDiscoveryServiceClient::new(channel)
    }

    fn identity(&self, spiffe_id: &str, selector: Selector, fed: &[&str]) -> Arc<Identity> {
        let issued = self.ca.issue(spiffe_id);
        Arc::new(Identity {
            entry_id: format!("entry-{spiffe_id}"),
            spiffe_id: id(spiffe_id),
            selectors: BTreeSet::from([selector]),
            hint: String::new(),
            federates_with: fed.iter().map(|f| TrustDomain::new(f).unwrap()).collect(),
            chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            key_pkcs8: Zeroizing::new(issued.key.secret_pkcs8_der().to_vec()),
            not_after: unix_now() + 3600,
        })
    }

    /// Own bundle, `fed.org` (federated with by entry a) and `other.org` (by no entry).
    fn publish(&self, identities: Vec<Arc<Identity>>) {
        let mut set = BundleSet::new();
        set.insert(self.ca.bundle()).unwrap();
        set.insert(self.fed_ca.bundle()).unwrap();
        set.insert(self.other_ca.bundle()).unwrap();
        self.cache
            .publish(TrustDomain::new("example.org").unwrap(), identities, set);
    }

    /// a and b are this process's; c is not.
    fn publish_abc(&self) -> [Arc<Identity>; 3] {
        let ids = [
            self.identity("spiffe://example.org/a", mine(), &["fed.org"]),
            self.identity("spiffe://example.org/b", mine(), &[]),
            self.identity("spiffe://example.org/c", not_mine(), &[]),
        ];
        self.publish(ids.to_vec());
        ids
    }
}

fn envoy_node(major: u32, minor: u32) -> Node {
    Node {
        id: "test-envoy".into(),
        cluster: "test".into(),
        user_agent_name: "envoy".into(),
        user_agent_version_type: Some(node::UserAgentVersionType::UserAgentBuildVersion(
            BuildVersion {
                version: Some(SemanticVersion {
                    major_number: major,
                    minor_number: minor,
                    patch: 0,
                }),
                metadata: None,
            },
        )),
        ..Default::default()
    }
}

fn request(names: &[&str], node: Option<Node>) -> DiscoveryRequest {
    DiscoveryRequest {
        node,
        resource_names: names.iter().map(|s| s.to_string()).collect(),
        type_url: SECRET.into(),
        ..Default::default()
    }
}

fn secrets(resp: &DiscoveryResponse) -> Vec<Secret> {
    resp.resources
        .iter()
        .map(|a| {
            assert_eq!(a.type_url, SECRET);
            Secret::decode(a.value.as_slice()).unwrap()
        })
        .collect()
}

fn names(resp: &DiscoveryResponse) -> Vec<String> {
    secrets(resp).into_iter().map(|s| s.name).collect()
}

fn inline(ds: &Option<DataSource>) -> String {
    match ds.as_ref().and_then(|d| d.specifier.as_ref()) {
        Some(data_source::Specifier::InlineBytes(b)) => String::from_utf8(b.clone()).unwrap(),
        other => panic!("expected inline bytes, got {other:?}"),
    }
}

/// The leaf certificate PEM of a TLS certificate secret.
fn cert_pem(s: &Secret) -> String {
    match &s.r#type {
        Some(secret::Type::TlsCertificate(t)) => {
            assert!(inline(&t.private_key).starts_with("-----BEGIN PRIVATE KEY-----\n"));
            inline(&t.certificate_chain)
        }
        other => panic!("{}: expected a TLS certificate, got {other:?}", s.name),
    }
}

fn validation(s: &Secret) -> &CertificateValidationContext {
    match &s.r#type {
        Some(secret::Type::ValidationContext(v)) => v,
        other => panic!("{}: expected a validation context, got {other:?}", s.name),
    }
}

/// The trust domains (and their bundle PEM) of a SPIFFE-validator validation context.
fn spiffe_trust_domains(s: &Secret) -> Vec<(String, String)> {
    let v = validation(s);
    assert!(
        v.trusted_ca.is_none(),
        "{}: SPIFFE validator and trusted_ca",
        s.name
    );
    let custom = v
        .custom_validator_config
        .as_ref()
        .expect("custom validator");
    assert_eq!(custom.name, "envoy.tls.cert_validator.spiffe");
    let any = custom.typed_config.as_ref().unwrap();
    assert_eq!(
        any.type_url,
        "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig"
    );
    SpiffeCertValidatorConfig::decode(any.value.as_slice())
        .unwrap()
        .trust_domains
        .into_iter()
        .map(|td| (td.name, inline(&td.trust_bundle)))
        .collect()
}

fn chain_pem(identity: &Identity) -> String {
    identity
        .chain
        .iter()
        .map(|c| pem_block("CERTIFICATE", c))
        .collect()
}

async fn next(stream: &mut Streaming<DiscoveryResponse>) -> Result<DiscoveryResponse, Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a stream message in time")
        .map(|m| m.expect("the stream stays open"))
}

async fn assert_quiet(stream: &mut Streaming<DiscoveryResponse>) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(400), stream.message()).await {
        panic!("expected no message, got {m:?}");
    }
}

/// A StreamSecrets call fed from a channel.
async fn open_stream(
    c: &mut Client,
) -> (mpsc::Sender<DiscoveryRequest>, Streaming<DiscoveryResponse>) {
    let (tx, rx) = mpsc::channel(8);
    let stream = c
        .stream_secrets(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, stream)
}

#[tokio::test]
async fn fetch_resolves_every_kind_of_name() {
    let f = Fixture::start().await;
    let [a, b, _c] = f.publish_abc();
    let mut c = f.client().await;
    // No `workload.spiffe.io` header: Envoy does not send it.
    let resp = c
        .fetch_secrets(request(
            &[
                "default",
                "spiffe://example.org/b",
                "ROOTCA",
                "ALL",
                "spiffe://fed.org",
                "",
            ],
            Some(envoy_node(1, 40)),
        ))
        .await
        .unwrap()
        .into_inner();
    // FetchSecrets: no version, no nonce.
    assert_eq!(resp.version_info, "");
    assert_eq!(resp.nonce, "");
    assert_eq!(resp.type_url, SECRET);
    let s = secrets(&resp);
    assert_eq!(
        names(&resp),
        [
            "default",
            "spiffe://example.org/b",
            "ROOTCA",
            "ALL",
            "spiffe://fed.org"
        ]
    );
    // `default` is the first identity in the Workload API's order.
    assert_eq!(cert_pem(&s[0]), chain_pem(&a));
    assert_eq!(cert_pem(&s[1]), chain_pem(&b));
    let own = pem_block("CERTIFICATE", f.ca.root());
    let fed = pem_block("CERTIFICATE", f.fed_ca.root());
    assert_eq!(
        spiffe_trust_domains(&s[2]),
        [("example.org".to_string(), own.clone())]
    );
    // ALL: own and federated (entry a federates with fed.org), never other.org.
    assert_eq!(
        spiffe_trust_domains(&s[3]),
        [
            ("example.org".to_string(), own),
            ("fed.org".to_string(), fed.clone())
        ]
    );
    assert_eq!(spiffe_trust_domains(&s[4]), [("fed.org".to_string(), fed)]);
    assert!(f.metrics.sds_responses.get() >= 1);
}

#[tokio::test]
async fn no_names_means_everything_the_caller_may_have() {
    let f = Fixture::start().await;
    f.publish_abc();
    let mut c = f.client().await;
    let resp = c
        .fetch_secrets(request(&[], Some(envoy_node(1, 40))))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        names(&resp),
        [
            "spiffe://example.org/a",
            "spiffe://example.org/b",
            "spiffe://example.org",
            "spiffe://fed.org"
        ]
    );
}

#[tokio::test]
async fn old_envoys_and_the_node_switch_get_plain_trusted_ca() {
    let f = Fixture::start().await;
    f.publish_abc();
    let mut c = f.client().await;
    let own = pem_block("CERTIFICATE", f.ca.root());
    let mut forced = envoy_node(1, 40);
    forced.metadata = Some(prost_types::Struct {
        fields: [(
            "disable_spiffe_cert_validation".to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::BoolValue(true)),
            },
        )]
        .into(),
    });
    for node in [Some(envoy_node(1, 17)), None, Some(forced)] {
        let resp = c
            .fetch_secrets(request(&["ROOTCA"], node.clone()))
            .await
            .unwrap()
            .into_inner();
        let s = secrets(&resp);
        let v = validation(&s[0]);
        assert!(v.custom_validator_config.is_none(), "{node:?}");
        assert_eq!(inline(&v.trusted_ca), own);
        // ALL cannot be one trusted_ca safely: refused, with the reason.
        let e = c.fetch_secrets(request(&["ALL"], node)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().contains("\"ALL\""), "{}", e.message());
    }
}

#[tokio::test]
async fn unknown_and_unauthorized_names_are_invalid_argument_naming_them() {
    let f = Fixture::start().await;
    f.publish_abc();
    let mut c = f.client().await;
    for name in [
        // Another workload's identity.
        "spiffe://example.org/c",
        // A bundle no entry of the caller federates with.
        "spiffe://other.org",
        "bogus",
    ] {
        let e = c
            .fetch_secrets(request(&["default", name], Some(envoy_node(1, 40))))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{name}: {e:?}");
        assert!(
            e.message().contains(&format!("{name:?}")),
            "{}",
            e.message()
        );
        assert!(!e.message().contains("\"default\""), "{}", e.message());
    }
    // On a stream, the same refusal ends the stream.
    let (tx, mut stream) = open_stream(&mut c).await;
    tx.send(request(
        &["spiffe://example.org/c"],
        Some(envoy_node(1, 40)),
    ))
    .await
    .unwrap();
    let e = next(&mut stream).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("spiffe://example.org/c"));
    // A wrong resource type, too.
    let mut wrong = request(&["default"], None);
    wrong.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    let e = c.fetch_secrets(wrong).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn a_caller_without_identities_gets_nothing() {
    let f = Fixture::start().await;
    f.publish(vec![f.identity("spiffe://example.org/c", not_mine(), &[])]);
    let mut c = f.client().await;
    let e = c
        .fetch_secrets(request(&["ROOTCA"], Some(envoy_node(1, 40))))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn delta_secrets_is_unimplemented() {
    let f = Fixture::start().await;
    f.publish_abc();
    let mut c = f.client().await;
    let (_tx, rx) = mpsc::channel::<DeltaDiscoveryRequest>(1);
    let e = c.delta_secrets(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
}

#[tokio::test]
async fn stream_discipline_ack_nack_stale_and_rotation_push() {
    let f = Fixture::start().await;
    let [a, b, c_] = f.publish_abc();
    let mut c = f.client().await;
    let (tx, mut stream) = open_stream(&mut c).await;
    assert_eq!(f.metrics.sds_streams.get(), 1);
    // The agent's /metrics shows it.
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &f.registry.lock().unwrap()).unwrap();
    assert!(text.contains("tessera_agent_sds_streams 1"), "{text}");
    assert!(text.contains("tessera_agent_sds_nacks_total"), "{text}");

    tx.send(request(&["default"], Some(envoy_node(1, 40))))
        .await
        .unwrap();
    let r1 = next(&mut stream).await.unwrap();
    assert_eq!(r1.version_info, "1");
    assert!(!r1.nonce.is_empty());
    assert_eq!(cert_pem(&secrets(&r1)[0]), chain_pem(&a));

    // ACK: not answered. (Envoy sends the node only once.)
    let ack = |version: &str, nonce: &str, names: &[&str]| DiscoveryRequest {
        version_info: version.into(),
        response_nonce: nonce.into(),
        ..request(names, None)
    };
    tx.send(ack("1", &r1.nonce, &["default"])).await.unwrap();
    assert_quiet(&mut stream).await;

    // A change that does not touch this stream's secrets (another workload's SVID): no push.
    let c2 = f.identity("spiffe://example.org/c", not_mine(), &[]);
    f.publish(vec![a.clone(), b.clone(), c2]);
    assert_quiet(&mut stream).await;

    // Rotation of the default SVID: pushed with a new version and nonce.
    let a2 = f.identity("spiffe://example.org/a", mine(), &["fed.org"]);
    f.publish(vec![a2.clone(), b.clone(), c_.clone()]);
    let r2 = next(&mut stream).await.unwrap();
    assert_eq!(r2.version_info, "2");
    assert_ne!(r2.nonce, r1.nonce);
    assert_eq!(cert_pem(&secrets(&r2)[0]), chain_pem(&a2));
    assert_ne!(chain_pem(&a2), chain_pem(&a));

    // A stale request (the nonce of response 1) asking for other names: ignored.
    tx.send(ack("1", &r1.nonce, &["default", "ROOTCA"]))
        .await
        .unwrap();
    assert_quiet(&mut stream).await;

    // NACK of response 2: logged and counted, not answered.
    let nacks = f.metrics.sds_nacks.get();
    let mut nack = ack("1", &r2.nonce, &["default"]);
    nack.error_detail = Some(rpc::Status {
        code: 3,
        message: "test: bad certificate".into(),
        details: vec![],
    });
    tx.send(nack).await.unwrap();
    assert_quiet(&mut stream).await;
    assert_eq!(f.metrics.sds_nacks.get(), nacks + 1);

    // New names with the current nonce: answered at once, version 3.
    tx.send(ack("2", &r2.nonce, &["default", "ROOTCA"]))
        .await
        .unwrap();
    let r3 = next(&mut stream).await.unwrap();
    assert_eq!(r3.version_info, "3");
    assert_eq!(names(&r3), ["default", "ROOTCA"]);

    // Losing every identity ends the stream as the Workload API does.
    f.publish(vec![c_.clone()]);
    let e = next(&mut stream).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    drop(tx);
    for _ in 0..200 {
        if f.metrics.sds_streams.get() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(f.metrics.sds_streams.get(), 0);
}

#[tokio::test]
async fn bundle_change_is_pushed() {
    let f = Fixture::start().await;
    let ids = f.publish_abc();
    let mut c = f.client().await;
    let (tx, mut stream) = open_stream(&mut c).await;
    tx.send(request(&["ALL"], Some(envoy_node(1, 40))))
        .await
        .unwrap();
    let r1 = next(&mut stream).await.unwrap();
    assert_eq!(spiffe_trust_domains(&secrets(&r1)[0]).len(), 2);
    // A new CA in the own bundle (CA rotation prepared by the server).
    let next_ca = TestCa::new("example.org");
    let mut own = f.ca.bundle();
    own.add_x509_authority(next_ca.root().to_vec()).unwrap();
    let mut set = BundleSet::new();
    set.insert(own).unwrap();
    set.insert(f.fed_ca.bundle()).unwrap();
    f.cache
        .publish(TrustDomain::new("example.org").unwrap(), ids.to_vec(), set);
    let r2 = next(&mut stream).await.unwrap();
    assert_eq!(r2.version_info, "2");
    let tds = spiffe_trust_domains(&secrets(&r2)[0]);
    assert!(tds[0].1.contains(&pem_block("CERTIFICATE", next_ca.root())));
}
