//! The Workload API over a real Unix socket, called by the generated tonic client as the test
//! process itself: attestation reads this process's real peer credentials, so entries match on
//! its real `unix:uid`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed step should panic

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tessera_agent::workload_api::{WorkloadApi, WorkloadApiError, serve};
use tessera_agent::{Cache, Identity, JwtMinter};
use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tessera_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, WitBundlesRequest, WitsvidRequest,
    X509BundlesRequest, X509svidRequest,
};
use tessera_spiffe::jwt::{Claims, Validation, mint_es256};
use tessera_spiffe::{Bundle, BundleSet, Selector, SpiffeId, TrustDomain};
use tessera_test_util::{JwtSigner, TestCa, unix_now};
use tessera_workload_attest::Attestor;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Code, Request, Status, Streaming};
use zeroize::Zeroizing;

type Client = SpiffeWorkloadApiClient<Channel>;

/// A JWT minter standing in for the server: signs with a test key and counts its calls.
#[derive(Debug)]
struct FakeMinter {
    signer: JwtSigner,
    ids: Mutex<HashMap<String, SpiffeId>>,
    calls: AtomicUsize,
}

#[tonic::async_trait]
impl JwtMinter for FakeMinter {
    async fn mint(&self, entry_id: &str, audience: &[String]) -> Result<String, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let id = self
            .ids
            .lock()
            .unwrap()
            .get(entry_id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no entry {entry_id}")))?;
        let now = unix_now();
        mint_es256(
            &self.signer.key,
            &self.signer.kid,
            &Claims {
                subject: &id,
                audience,
                issued_at: now,
                expiry: now + 300,
            },
        )
        .map_err(|e| Status::internal(e.to_string()))
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    cache: Arc<Cache>,
    api: WorkloadApi,
    minter: Arc<FakeMinter>,
    ca: TestCa,
    fed_ca: TestCa,
    other_ca: TestCa,
    /// Signs JWT-SVIDs of the federated trust domain `fed.org`.
    fed_signer: JwtSigner,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<Result<(), WorkloadApiError>>>,
}

fn td(s: &str) -> TrustDomain {
    TrustDomain::new(s).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

/// The selector this test process has for sure: its effective uid, as the socket reports it.
fn my_uid_selector() -> Selector {
    Selector::parse(&format!("unix:uid:{}", nix::unistd::geteuid())).unwrap()
}

fn not_my_uid_selector() -> Selector {
    let other = nix::unistd::geteuid().as_raw().wrapping_add(4242);
    Selector::parse(&format!("unix:uid:{other}")).unwrap()
}

/// The security header (SPIFFE Workload Endpoint §3).
fn req<T>(message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

async fn connect(socket: &Path) -> Client {
    let path = socket.to_path_buf();
    let channel = Endpoint::from_static("http://[::1]:0")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await
        .unwrap();
    SpiffeWorkloadApiClient::new(channel)
}

impl Fixture {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // A directory that does not exist yet: serve creates it.
        let socket = dir.path().join("run/tessera/agent.sock");
        let cache = Arc::new(Cache::new());
        let minter = Arc::new(FakeMinter {
            signer: JwtSigner::new("agent-jwt-1"),
            ids: Mutex::new(HashMap::new()),
            calls: AtomicUsize::new(0),
        });
        // No executable hashing: the test binary is large and no entry here needs its hash.
        let attestor = Arc::new(Attestor::new(0));
        let api = WorkloadApi::new(cache.clone(), attestor, minter.clone());
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn({
            let socket = socket.clone();
            let api = api.clone();
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
            api,
            minter,
            ca: TestCa::new("example.org"),
            fed_ca: TestCa::new("fed.org"),
            other_ca: TestCa::new("other.org"),
            fed_signer: JwtSigner::new("fed-jwt-1"),
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    async fn client(&self) -> Client {
        connect(&self.socket).await
    }

    fn identity(
        &self,
        spiffe_id: &str,
        selector: Selector,
        hint: &str,
        federates_with: &[&str],
    ) -> Arc<Identity> {
        let issued = self.ca.issue(spiffe_id);
        let entry_id = format!("entry-{spiffe_id}");
        self.minter
            .ids
            .lock()
            .unwrap()
            .insert(entry_id.clone(), id(spiffe_id));
        Arc::new(Identity {
            entry_id,
            spiffe_id: id(spiffe_id),
            selectors: BTreeSet::from([selector]),
            hint: hint.to_owned(),
            federates_with: federates_with.iter().map(|f| td(f)).collect(),
            chain: issued.chain.iter().map(|c| c.to_vec()).collect(),
            key_pkcs8: Zeroizing::new(issued.key.secret_pkcs8_der().to_vec()),
            not_after: unix_now() + 3600,
        })
    }

    /// Own bundle (CA root + the minter's JWT key), `fed.org` (CA root + its JWT key) and
    /// `other.org`, which no entry federates with.
    fn bundles(&self) -> BundleSet {
        let mut own = self.ca.bundle();
        self.minter.signer.add_to(&mut own);
        let mut fed = self.fed_ca.bundle();
        self.fed_signer.add_to(&mut fed);
        let mut set = BundleSet::new();
        set.insert(own).unwrap();
        set.insert(fed).unwrap();
        set.insert(self.other_ca.bundle()).unwrap();
        set
    }

    fn publish(&self, identities: Vec<Arc<Identity>>) {
        self.publish_with(identities, self.bundles());
    }

    fn publish_with(&self, identities: Vec<Arc<Identity>>, bundles: BundleSet) {
        self.cache.publish(td("example.org"), identities, bundles);
    }

    async fn wait_for_streams(&self, n: usize) {
        for _ in 0..500 {
            if self.api.active_streams() == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "expected {n} open streams, have {}",
            self.api.active_streams()
        );
    }

    async fn stop(mut self) -> Result<(), WorkloadApiError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let server = self.server.take().unwrap();
        tokio::time::timeout(Duration::from_secs(20), server)
            .await
            .expect("serve returns after shutdown")
            .unwrap()
    }
}

/// The next stream message, failing the test if none comes in time.
async fn next<T>(stream: &mut Streaming<T>) -> Result<Option<T>, Status> {
    tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("a stream message in time")
}

/// Asserts that no message arrives for a while.
async fn assert_quiet<T: std::fmt::Debug>(stream: &mut Streaming<T>) {
    if let Ok(m) = tokio::time::timeout(Duration::from_millis(300), stream.message()).await {
        panic!("expected no message, got {m:?}");
    }
}

fn validate(token: &str, bundles: &BundleSet, audience: &str) -> SpiffeId {
    tessera_spiffe::jwt::validate(
        token,
        bundles,
        Validation {
            audience,
            now: unix_now(),
            leeway: 0,
        },
    )
    .unwrap()
    .spiffe_id
}

#[tokio::test]
async fn requests_without_the_security_header_are_invalid_argument() {
    let f = Fixture::start().await;
    f.publish(vec![f.identity(
        "spiffe://example.org/a",
        my_uid_selector(),
        "",
        &[],
    )]);
    let mut c = f.client().await;

    let e = c
        .fetch_x509svid(Request::new(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = c
        .fetch_x509_bundles(Request::new(X509BundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .fetch_jwt_bundles(Request::new(JwtBundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .fetch_jwtsvid(Request::new(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = c
        .validate_jwtsvid(Request::new(ValidateJwtsvidRequest {
            audience: "a".into(),
            svid: "x".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Workload Endpoint §3: the value is case sensitive.
    let mut wrong_case = Request::new(X509svidRequest {});
    wrong_case
        .metadata_mut()
        .insert("workload.spiffe.io", "True".parse().unwrap());
    let e = c.fetch_x509svid(wrong_case).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert_eq!(f.minter.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_caller_matching_no_entry_gets_permission_denied() {
    let f = Fixture::start().await;
    f.publish(vec![f.identity(
        "spiffe://example.org/someone-else",
        not_my_uid_selector(),
        "",
        &[],
    )]);
    let mut c = f.client().await;

    let e = c.fetch_x509svid(req(X509svidRequest {})).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "no identity issued");
    let e = c
        .fetch_jwtsvid(req(JwtsvidRequest {
            audience: vec!["a".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "no identity issued");
    let e = c
        .fetch_x509_bundles(req(X509BundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    let e = c
        .fetch_jwt_bundles(req(JwtBundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(f.minter.calls.load(Ordering::SeqCst), 0);
    assert_eq!(f.api.active_streams(), 0);
}

#[tokio::test]
async fn fetch_x509svid_streams_the_svid_then_every_change_then_permission_denied() {
    let f = Fixture::start().await;
    let a = f.identity(
        "spiffe://example.org/a",
        my_uid_selector(),
        "internal",
        &["fed.org"],
    );
    f.publish(vec![a.clone()]);
    let mut c = f.client().await;
    let mut stream = c
        .fetch_x509svid(req(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();

    let first = next(&mut stream).await.unwrap().unwrap();
    assert_eq!(first.svids.len(), 1);
    let svid = &first.svids[0];
    assert_eq!(svid.spiffe_id, "spiffe://example.org/a");
    assert_eq!(svid.x509_svid, a.chain.concat());
    assert_eq!(svid.x509_svid_key, a.key_pkcs8.to_vec());
    assert_eq!(svid.bundle, f.ca.root().to_vec());
    assert_eq!(svid.hint, "internal");
    assert!(first.crl.is_empty());
    // Only the trust domain the entry federates with; `other.org` is in the agent's bundles but
    // not this caller's.
    assert_eq!(
        first.federated_bundles,
        HashMap::from([("spiffe://fed.org".to_owned(), f.fed_ca.root().to_vec())])
    );

    // A new snapshot that changes nothing for this caller sends nothing.
    f.publish(vec![
        a.clone(),
        f.identity(
            "spiffe://example.org/not-mine",
            not_my_uid_selector(),
            "",
            &[],
        ),
    ]);
    assert_quiet(&mut stream).await;

    // Another identity for this caller: a full message with both.
    let b = f.identity("spiffe://example.org/b", my_uid_selector(), "", &[]);
    f.publish(vec![a.clone(), b.clone()]);
    let second = next(&mut stream).await.unwrap().unwrap();
    let ids: Vec<_> = second.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(ids, ["spiffe://example.org/a", "spiffe://example.org/b"]);
    assert_eq!(second.svids[1].x509_svid, b.chain.concat());

    // Every identity gone: PermissionDenied, and the stream ends.
    f.publish(vec![]);
    let e = next(&mut stream).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "no identity issued");
    f.wait_for_streams(0).await;
}

#[tokio::test]
async fn bundle_streams_carry_own_and_federated_bundles_and_follow_changes() {
    let f = Fixture::start().await;
    let a = f.identity(
        "spiffe://example.org/a",
        my_uid_selector(),
        "",
        &["fed.org"],
    );
    f.publish(vec![a.clone()]);
    let mut c = f.client().await;

    let mut x509 = c
        .fetch_x509_bundles(req(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let m = next(&mut x509).await.unwrap().unwrap();
    assert_eq!(
        m.bundles,
        HashMap::from([
            ("spiffe://example.org".to_owned(), f.ca.root().to_vec()),
            ("spiffe://fed.org".to_owned(), f.fed_ca.root().to_vec()),
        ])
    );

    let mut jwt = c
        .fetch_jwt_bundles(req(JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let m = next(&mut jwt).await.unwrap().unwrap();
    let mut keys: Vec<_> = m.bundles.keys().cloned().collect();
    keys.sort();
    assert_eq!(keys, ["spiffe://example.org", "spiffe://fed.org"]);
    let own = Bundle::parse(td("example.org"), &m.bundles["spiffe://example.org"]).unwrap();
    assert!(own.jwt_authority("agent-jwt-1").is_some());
    // JWT bundles carry JWT authorities only (Workload API §6.2.2).
    assert!(own.x509_authorities().is_empty());
    let fed = Bundle::parse(td("fed.org"), &m.bundles["spiffe://fed.org"]).unwrap();
    assert!(fed.jwt_authority("fed-jwt-1").is_some());

    // A new JWT authority in the own bundle: the JWT bundle stream resends, the X.509 one not.
    let mut bundles = f.bundles();
    let mut own = bundles.remove(&td("example.org")).unwrap();
    JwtSigner::new("agent-jwt-2").add_to(&mut own);
    bundles.insert(own).unwrap();
    f.publish_with(vec![a.clone()], bundles);
    let m = next(&mut jwt).await.unwrap().unwrap();
    let own = Bundle::parse(td("example.org"), &m.bundles["spiffe://example.org"]).unwrap();
    assert!(own.jwt_authority("agent-jwt-2").is_some());
    assert_quiet(&mut x509).await;

    // The entry stops federating with fed.org: both streams drop its bundle (§4.4: absence is
    // redaction).
    let a2 = f.identity("spiffe://example.org/a", my_uid_selector(), "", &[]);
    f.publish(vec![a2]);
    let m = next(&mut x509).await.unwrap().unwrap();
    assert_eq!(
        m.bundles.keys().collect::<Vec<_>>(),
        ["spiffe://example.org"]
    );
    let m = next(&mut jwt).await.unwrap().unwrap();
    assert_eq!(
        m.bundles.keys().collect::<Vec<_>>(),
        ["spiffe://example.org"]
    );
}

#[tokio::test]
async fn fetch_jwtsvid_mints_per_identity_and_audience_and_reuses_tokens() {
    let f = Fixture::start().await;
    let a = f.identity("spiffe://example.org/a", my_uid_selector(), "first", &[]);
    let b = f.identity("spiffe://example.org/b", my_uid_selector(), "", &[]);
    f.publish(vec![a, b]);
    let bundles = f.bundles();
    let mut c = f.client().await;

    let resp = c
        .fetch_jwtsvid(req(JwtsvidRequest {
            audience: vec!["aud1".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<_> = resp.svids.iter().map(|s| s.spiffe_id.as_str()).collect();
    assert_eq!(ids, ["spiffe://example.org/a", "spiffe://example.org/b"]);
    assert_eq!(resp.svids[0].hint, "first");
    for s in &resp.svids {
        assert_eq!(validate(&s.svid, &bundles, "aud1").as_str(), s.spiffe_id);
    }
    assert_eq!(f.minter.calls.load(Ordering::SeqCst), 2);

    // Cached: the same tokens, no new minting.
    let again = c
        .fetch_jwtsvid(req(JwtsvidRequest {
            audience: vec!["aud1".into()],
            spiffe_id: String::new(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.svids, resp.svids);
    assert_eq!(f.minter.calls.load(Ordering::SeqCst), 2);

    // Two audiences: one token valid for each.
    let two = c
        .fetch_jwtsvid(req(JwtsvidRequest {
            audience: vec!["aud1".into(), "aud2".into()],
            spiffe_id: "spiffe://example.org/b".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(two.svids.len(), 1);
    assert_eq!(two.svids[0].spiffe_id, "spiffe://example.org/b");
    for aud in ["aud1", "aud2"] {
        assert_eq!(
            validate(&two.svids[0].svid, &bundles, aud).as_str(),
            "spiffe://example.org/b"
        );
    }
    assert_eq!(f.minter.calls.load(Ordering::SeqCst), 3);
    // The audience set, not its order, names the cached token.
    let swapped = c
        .fetch_jwtsvid(req(JwtsvidRequest {
            audience: vec!["aud2".into(), "aud1".into()],
            spiffe_id: "spiffe://example.org/b".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(swapped.svids, two.svids);
    assert_eq!(f.minter.calls.load(Ordering::SeqCst), 3);

    // An identity the caller does not have.
    let e = c
        .fetch_jwtsvid(req(JwtsvidRequest {
            audience: vec!["aud1".into()],
            spiffe_id: "spiffe://example.org/not-mine".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert_eq!(e.message(), "no identity issued");

    // Mandatory and well-formed fields (Workload API §4.5, §6.2.1).
    for (audience, spiffe_id) in [
        (vec![], ""),
        (vec![String::new()], ""),
        (vec!["aud1".to_owned()], "not a spiffe id"),
    ] {
        let e = c
            .fetch_jwtsvid(req(JwtsvidRequest {
                audience,
                spiffe_id: spiffe_id.into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    }
    assert_eq!(f.minter.calls.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn validate_jwtsvid_accepts_trusted_tokens_and_rejects_the_rest() {
    let f = Fixture::start().await;
    f.publish(vec![f.identity(
        "spiffe://example.org/a",
        my_uid_selector(),
        "",
        &["fed.org"],
    )]);
    let mut c = f.client().await;
    let mint = |signer: &JwtSigner, sub: &str, aud: &str| {
        let now = unix_now();
        mint_es256(
            &signer.key,
            &signer.kid,
            &Claims {
                subject: &id(sub),
                audience: &[aud.to_owned()],
                issued_at: now,
                expiry: now + 300,
            },
        )
        .unwrap()
    };

    let token = mint(&f.minter.signer, "spiffe://example.org/caller", "me");
    let ok = c
        .validate_jwtsvid(req(ValidateJwtsvidRequest {
            audience: "me".into(),
            svid: token.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://example.org/caller");
    let claims = ok.claims.unwrap().fields;
    use prost_types::value::Kind;
    assert_eq!(
        claims["sub"].kind,
        Some(Kind::StringValue("spiffe://example.org/caller".into()))
    );
    assert_eq!(claims["aud"].kind, Some(Kind::StringValue("me".into())));
    assert!(matches!(claims["exp"].kind, Some(Kind::NumberValue(_))));

    // A federated trust domain the caller's entry federates with is trusted.
    let fed = mint(&f.fed_signer, "spiffe://fed.org/peer", "me");
    let ok = c
        .validate_jwtsvid(req(ValidateJwtsvidRequest {
            audience: "me".into(),
            svid: fed,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://fed.org/peer");

    let other_signer = JwtSigner::new("other-1");
    let rejected = [
        ("wrong audience", "someone-else".to_owned(), token.clone()),
        (
            "trust domain unknown to the agent",
            "me".to_owned(),
            mint(&other_signer, "spiffe://unknown.org/x", "me"),
        ),
        (
            // The agent holds other.org's bundle, but the caller does not federate with it.
            "trust domain not federated by the caller",
            "me".to_owned(),
            mint(&other_signer, "spiffe://other.org/x", "me"),
        ),
        (
            "key not in the bundle",
            "me".to_owned(),
            mint(&other_signer, "spiffe://example.org/x", "me"),
        ),
        ("garbage", "me".to_owned(), "not.a.jwt".to_owned()),
        ("empty svid", "me".to_owned(), String::new()),
        ("empty audience", String::new(), token.clone()),
    ];
    for (why, audience, svid) in rejected {
        let e = c
            .validate_jwtsvid(req(ValidateJwtsvidRequest { audience, svid }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{why}: {e:?}");
    }
}

#[tokio::test]
async fn validate_jwtsvid_needs_no_identity_of_the_caller() {
    let f = Fixture::start().await;
    f.publish(vec![f.identity(
        "spiffe://example.org/someone-else",
        not_my_uid_selector(),
        "",
        &["fed.org"],
    )]);
    let mut c = f.client().await;
    let now = unix_now();
    let me = ["me".to_owned()];
    let (own_id, fed_id) = (id("spiffe://example.org/x"), id("spiffe://fed.org/x"));
    let claims = |subject| Claims {
        subject,
        audience: &me,
        issued_at: now,
        expiry: now + 300,
    };
    let own = mint_es256(&f.minter.signer.key, &f.minter.signer.kid, &claims(&own_id)).unwrap();
    let ok = c
        .validate_jwtsvid(req(ValidateJwtsvidRequest {
            audience: "me".into(),
            svid: own,
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://example.org/x");
    // Without entries of its own, the caller trusts only the agent's trust domain.
    let fed = mint_es256(&f.fed_signer.key, &f.fed_signer.kid, &claims(&fed_id)).unwrap();
    let e = c
        .validate_jwtsvid(req(ValidateJwtsvidRequest {
            audience: "me".into(),
            svid: fed,
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn cancelled_streams_free_their_tasks() {
    let f = Fixture::start().await;
    f.publish(vec![f.identity(
        "spiffe://example.org/a",
        my_uid_selector(),
        "",
        &[],
    )]);
    let mut c = f.client().await;
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = c
            .fetch_x509svid(req(X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        next(&mut s).await.unwrap().unwrap();
        streams.push(s);
    }
    let mut bundles = c
        .fetch_jwt_bundles(req(JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    next(&mut bundles).await.unwrap().unwrap();
    f.wait_for_streams(4).await;

    // Dropping a client stream cancels the call; the server's task ends without a snapshot change.
    streams.pop();
    f.wait_for_streams(3).await;
    drop(streams);
    drop(bundles);
    f.wait_for_streams(0).await;

    // A client that vanishes entirely (its connection closes) releases its streams too.
    let mut c2 = f.client().await;
    let mut s = c2
        .fetch_x509svid(req(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    next(&mut s).await.unwrap().unwrap();
    f.wait_for_streams(1).await;
    drop(s);
    drop(c2);
    drop(c);
    f.wait_for_streams(0).await;
}

/// One connection holds at most MAX_STREAMS_PER_CONNECTION streams open: the next request
/// waits for one to end (before: 25,000 streams on one connection took every descriptor the
/// agent had).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_cannot_open_more_than_its_share_of_streams() {
    let f = Fixture::start().await;
    f.publish(vec![f.identity(
        "spiffe://example.org/a",
        my_uid_selector(),
        "",
        &[],
    )]);
    let c = f.client().await;
    let max = tessera_agent::workload_api::MAX_STREAMS_PER_CONNECTION as usize;
    let mut calls = Vec::new();
    for _ in 0..max + 10 {
        let mut c = c.clone();
        calls.push(tokio::spawn(async move {
            let mut s = c
                .fetch_x509svid(req(X509svidRequest {}))
                .await
                .unwrap()
                .into_inner();
            next(&mut s).await.unwrap().unwrap();
            // Held open until the test ends.
            std::future::pending::<()>().await;
        }));
    }
    f.wait_for_streams(max).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        f.api.active_streams(),
        max,
        "streams beyond the limit were opened"
    );
    // One ends: a waiting one takes its place.
    calls[0].abort();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(f.api.active_streams(), max);
    for c in calls {
        c.abort();
    }
    f.wait_for_streams(0).await;
}

#[tokio::test]
async fn wit_svid_rpcs_are_unimplemented() {
    let f = Fixture::start().await;
    let mut c = f.client().await;
    let e = c
        .fetch_witsvid(req(WitsvidRequest {
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
    let e = c
        .fetch_wit_bundles(req(WitBundlesRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unimplemented);
}

#[tokio::test]
async fn the_socket_is_world_connectable_and_shutdown_ends_streams_and_removes_it() {
    use std::os::unix::fs::PermissionsExt;
    let f = Fixture::start().await;
    let mode = std::fs::metadata(&f.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o777);
    f.publish(vec![f.identity(
        "spiffe://example.org/a",
        my_uid_selector(),
        "",
        &[],
    )]);
    let mut c = f.client().await;
    let mut s = c
        .fetch_x509svid(req(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    next(&mut s).await.unwrap().unwrap();

    let socket = f.socket.clone();
    let api = f.api.clone();
    f.stop().await.unwrap();
    // The open stream was ended (clients reconnect on Unavailable), not left hanging.
    match next(&mut s).await {
        Err(e) => assert_eq!(e.code(), Code::Unavailable, "{e:?}"),
        Ok(None) => {}
        Ok(Some(m)) => panic!("unexpected message after shutdown: {m:?}"),
    }
    assert_eq!(api.active_streams(), 0);
    assert!(!socket.exists(), "the socket file is removed on shutdown");
}

#[tokio::test]
async fn serve_replaces_a_stale_socket_but_not_a_live_one_or_another_file() {
    let dir = tempfile::tempdir().unwrap();
    let api = || {
        WorkloadApi::new(
            Arc::new(Cache::new()),
            Arc::new(Attestor::new(0)),
            Arc::new(FakeMinter {
                signer: JwtSigner::new("k"),
                ids: Mutex::new(HashMap::new()),
                calls: AtomicUsize::new(0),
            }),
        )
    };

    // Not a socket: left alone.
    let file = dir.path().join("file.sock");
    std::fs::write(&file, b"keep me").unwrap();
    let e = serve(&file, api(), async {}).await.unwrap_err();
    assert!(matches!(e, WorkloadApiError::SocketPath { .. }), "{e}");
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");

    // A stale socket (its listener is gone) is replaced.
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn({
        let stale = stale.clone();
        async move {
            serve(&stale, api(), async {
                let _ = rx.await;
            })
            .await
        }
    });
    let mut c = None;
    for _ in 0..200 {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if let Ok(s) = tokio::net::UnixStream::connect(&stale).await {
            drop(s);
            c = Some(connect(&stale).await);
            break;
        }
    }
    let mut c = c.expect("the server took over the stale socket");
    let e = c.fetch_x509svid(req(X509svidRequest {})).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    // A socket another server is live on is refused, and that server keeps it.
    let e = serve(&stale, api(), async {}).await.unwrap_err();
    assert!(matches!(e, WorkloadApiError::SocketPath { .. }), "{e}");
    let e = c.fetch_x509svid(req(X509svidRequest {})).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);

    let _ = tx.send(());
    server.await.unwrap().unwrap();
}

/// `WorkloadApi::into_service` mounted on tonic's own Unix listener (as a server that also serves
/// SDS on the socket might do) still learns its callers, from `UdsConnectInfo`.
#[tokio::test]
async fn the_service_also_attests_callers_on_tonics_unix_listener() {
    let f = Fixture::start().await;
    f.publish(vec![f.identity(
        "spiffe://example.org/a",
        my_uid_selector(),
        "",
        &[],
    )]);
    let socket = f.socket.with_file_name("plain.sock");
    let listener = tokio::net::UnixListener::bind(&socket).unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(f.api.clone().into_service())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::UnixListenerStream::new(listener),
                async {
                    let _ = rx.await;
                },
            ),
    );
    let mut c = connect(&socket).await;
    let mut s = c
        .fetch_x509svid(req(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let m = next(&mut s).await.unwrap().unwrap();
    assert_eq!(m.svids[0].spiffe_id, "spiffe://example.org/a");
    drop(s);
    f.wait_for_streams(0).await;
    let _ = tx.send(());
    server.await.unwrap().unwrap();
}
