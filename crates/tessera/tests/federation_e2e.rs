//! Two trust domains federating end to end, with the real binary: two `tessera server`s and two
//! `tessera agent`s on loopback, each with its own data dir. `a.test` serves its bundle endpoint
//! in the https_spiffe profile, `b.test` in the https_web profile under a private CA. Workloads
//! of each validate the other's JWT-SVID (ValidateJWTSVID) and X509-SVID (against the federated
//! bundle they received); bad inputs give clear errors and keep the last good bundle; a bundle
//! change reaches an open Workload API stream without polling.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tessera_proto::workload::{
    JwtBundlesRequest, JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use tessera_spiffe::{Bundle, BundleSet, TrustDomain};
use tessera_test_util::TestCa;
use tessera_test_util::rcgen::SanType;
use tonic::transport::Channel;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn tessera() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").unwrap().uid()
}

fn run(admin: &Path, args: &[&str]) -> Output {
    tessera()
        .args(args)
        .env("TESSERA_ADMIN_SOCKET", admin)
        .output()
        .unwrap()
}

/// Runs a CLI command that must succeed.
fn ok(admin: &Path, args: &[&str]) -> Output {
    let o = run(admin, args);
    assert!(
        o.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Runs a CLI command that must fail; returns its error output.
fn fails(admin: &Path, args: &[&str]) -> String {
    let o = run(admin, args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "{args:?} should fail; stderr: {err}");
    err
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap()
}

async fn eventually<F, Fut, T>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One trust domain: a server and an agent, each a process.
struct Domain {
    td: String,
    admin: PathBuf,
    socket: PathBuf,
    agent_id: String,
    bundle_file: PathBuf,
    _server: Proc,
    _agent: Proc,
}

fn start_domain(dir: &Path, td: &str, bundle_endpoint: &str) -> Domain {
    let root = dir.join(td);
    std::fs::create_dir_all(&root).unwrap();
    let admin = root.join("admin/admin.sock");
    let socket = root.join("agent.sock");
    let port = free_port();
    let config = root.join("server.toml");
    std::fs::write(
        &config,
        format!(
            "trust_domain = \"{td}\"\nlog_level = \"warn\"\nbind_address = \"127.0.0.1:{port}\"\n\
             health_bind_address = \"127.0.0.1:0\"\n\
             [federation]\nrefresh_floor = \"1s\"\nfetch_timeout = \"5s\"\n{bundle_endpoint}"
        ),
    )
    .unwrap();
    let server = Proc(
        tessera()
            .args(["server", "run", "--config"])
            .arg(&config)
            .arg("--data-dir")
            .arg(root.join("server"))
            .arg("--admin-socket")
            .arg(&admin)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_for(&admin);
    let tok = json(&ok(&admin, &["token", "generate", "--output", "json"]));
    let bundle_file = root.join("bundle.json");
    std::fs::write(
        &bundle_file,
        ok(&admin, &["bundle", "show", "--format", "spiffe"]).stdout,
    )
    .unwrap();
    let agent = Proc(
        tessera()
            .args(["agent", "run", "--log-level", "warn"])
            .args(["--trust-domain", td])
            .args(["--server-address", &format!("127.0.0.1:{port}")])
            .arg("--data-dir")
            .arg(root.join("agent"))
            .arg("--socket-path")
            .arg(&socket)
            .arg("--trust-bundle-path")
            .arg(&bundle_file)
            .args(["--join-token", tok["token"].as_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_for(&socket);
    Domain {
        td: td.to_owned(),
        admin,
        socket,
        agent_id: tok["agent_spiffe_id"].as_str().unwrap().to_owned(),
        bundle_file,
        _server: server,
        _agent: agent,
    }
}

async fn workload(socket: &Path) -> SpiffeWorkloadApiClient<Channel> {
    SpiffeWorkloadApiClient::new(tessera_server::client::unix_channel(socket).await.unwrap())
}

/// The security header (SPIFFE Workload Endpoint §3).
fn req<T>(m: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(m);
    r.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    r
}

/// DER certificates concatenated (as the Workload API sends chains and bundles) split apart.
fn split_ders(mut der: &[u8]) -> Vec<Vec<u8>> {
    use x509_parser::prelude::FromDer as _;
    let mut out = Vec::new();
    while !der.is_empty() {
        let (rest, _) = x509_parser::certificate::X509Certificate::from_der(der).unwrap();
        out.push(der[..der.len() - rest.len()].to_vec());
        der = rest;
    }
    out
}

/// Verifies a peer's X509-SVID chain with tessera_tls against a federated bundle a workload
/// received (DER roots of trust domain `td`).
fn verify_with_federated(td: &str, bundle_der: &[u8], chain_der: &[u8]) -> Result<String, String> {
    let mut b = Bundle::new(TrustDomain::new(td).unwrap());
    for c in split_ders(bundle_der) {
        b.add_x509_authority(c).unwrap();
    }
    let mut set = BundleSet::new();
    set.upsert(b);
    let chain: Vec<rustls_pki_types::CertificateDer<'_>> = split_ders(chain_der)
        .into_iter()
        .map(rustls_pki_types::CertificateDer::from)
        .collect();
    tessera_tls::verify_svid(
        &chain,
        &set,
        tessera_tls::now(),
        tessera_tls::PeerRole::Server,
    )
    .map(|id| id.to_string())
    .map_err(|e| e.to_string())
}

async fn first_x509(
    c: &mut SpiffeWorkloadApiClient<Channel>,
) -> Option<tessera_proto::workload::X509svidResponse> {
    let mut s = c
        .fetch_x509svid(req(X509svidRequest {}))
        .await
        .ok()?
        .into_inner();
    s.message().await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_trust_domains_federate_over_both_profiles() {
    let dir = tempfile::tempdir().unwrap();

    // b.test's bundle endpoint is https_web with a certificate from a private "enterprise" CA.
    let web_ca = TestCa::new("enterprise-ca.test");
    let leaf = web_ca.issue_with("", |p| {
        p.subject_alt_names = vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ];
    });
    let pem = |tag: &str, der: &[u8]| pem::encode(&pem::Pem::new(tag, der.to_vec()));
    let web_cert = dir.path().join("web.pem");
    let web_key = dir.path().join("web.key");
    let web_ca_pem = dir.path().join("web-ca.pem");
    std::fs::write(&web_cert, pem("CERTIFICATE", &leaf.chain[0])).unwrap();
    std::fs::write(&web_key, pem("PRIVATE KEY", leaf.key.secret_pkcs8_der())).unwrap();
    std::fs::write(&web_ca_pem, pem("CERTIFICATE", web_ca.root())).unwrap();

    let a_port = free_port();
    let b_port = free_port();
    let a = start_domain(
        dir.path(),
        "a.test",
        &format!(
            "[bundle_endpoint]\nbind_address = \"127.0.0.1:{a_port}\"\nprofile = \"https_spiffe\"\n"
        ),
    );
    let b = start_domain(
        dir.path(),
        "b.test",
        &format!(
            "[bundle_endpoint]\nbind_address = \"127.0.0.1:{b_port}\"\nprofile = \"https_web\"\n\
             cert_path = \"{}\"\nkey_path = \"{}\"\n",
            web_cert.display(),
            web_key.display()
        ),
    );
    let a_url = format!("https://127.0.0.1:{a_port}/");
    let b_url = format!("https://localhost:{b_port}/bundle");

    // --- bad inputs first: each is refused with a clear error and creates nothing ---
    let ca = web_ca_pem.to_str().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    for (args, want) in [
        (
            // An empty file is not "no CA bundle": falling back to the public Web PKI roots
            // would trust far more than the operator asked for.
            vec![
                "--bundle-endpoint-url",
                &b_url,
                "--profile",
                "https_web",
                "--ca-bundle",
                empty.to_str().unwrap(),
            ],
            "is empty",
        ),
        (
            vec![
                "--bundle-endpoint-url",
                "http://localhost/",
                "--profile",
                "https_web",
            ],
            "scheme must be https",
        ),
        (
            vec![
                "--bundle-endpoint-url",
                "not a url",
                "--profile",
                "https_web",
            ],
            "is not a URL",
        ),
        (
            vec!["--bundle-endpoint-url", &b_url, "--profile", "ftp"],
            "must be https_web or https_spiffe",
        ),
        (
            vec!["--bundle-endpoint-url", &b_url, "--profile", "https_spiffe"],
            "needs the SPIFFE ID the endpoint presents",
        ),
        (
            vec![
                "--bundle-endpoint-url",
                &b_url,
                "--profile",
                "https_web",
                "--endpoint-spiffe-id",
                "spiffe://b.test/tessera/server",
            ],
            "only the https_spiffe profile takes an endpoint SPIFFE ID",
        ),
        (
            vec![
                "--bundle-endpoint-url",
                &b_url,
                "--profile",
                "https_spiffe",
                "--endpoint-spiffe-id",
                "spiffe://b.test/tessera/server",
                "--ca-bundle",
                ca,
            ],
            "only the https_web profile takes CA certificates",
        ),
        (
            // https_spiffe needs a bundle to authenticate the first fetch.
            vec![
                "--bundle-endpoint-url",
                &b_url,
                "--profile",
                "https_spiffe",
                "--endpoint-spiffe-id",
                "spiffe://b.test/tessera/server",
            ],
            "give the bootstrap bundle",
        ),
        (
            // A bootstrap bundle of another trust domain.
            vec![
                "--bundle-endpoint-url",
                &b_url,
                "--profile",
                "https_spiffe",
                "--endpoint-spiffe-id",
                "spiffe://b.test/tessera/server",
                "--bundle-file",
                a.bundle_file.to_str().unwrap(),
            ],
            "the bundle is of trust domain a.test, not b.test",
        ),
    ] {
        let mut full = vec!["federation", "create", "--trust-domain", "b.test"];
        full.extend(args);
        let err = fails(&a.admin, &full);
        assert!(err.contains(want), "{full:?}: {err}");
    }
    let err = fails(
        &a.admin,
        &[
            "federation",
            "create",
            "--trust-domain",
            "a.test",
            "--bundle-endpoint-url",
            &a_url,
            "--profile",
            "https_web",
        ],
    );
    assert!(err.contains("own trust domain"), "{err}");
    let list = json(&ok(&a.admin, &["federation", "list", "--output", "json"]));
    assert_eq!(list, serde_json::json!([]), "bad requests created nothing");

    // --- a.test federates with b.test over https_web (private CA) ---
    ok(
        &a.admin,
        &[
            "federation",
            "create",
            "--trust-domain",
            "b.test",
            "--bundle-endpoint-url",
            &b_url,
            "--profile",
            "https_web",
            "--ca-bundle",
            ca,
        ],
    );
    // --- b.test federates with a.test over https_spiffe, bootstrapped with a's bundle ---
    ok(
        &b.admin,
        &[
            "federation",
            "create",
            "--trust-domain",
            "a.test",
            "--bundle-endpoint-url",
            &a_url,
            "--profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            "spiffe://a.test/tessera/server",
            "--bundle-file",
            a.bundle_file.to_str().unwrap(),
        ],
    );
    // An explicit refresh fetches at once and reports success.
    for (d, other) in [(&a, "b.test"), (&b, "a.test")] {
        let r = json(&ok(
            &d.admin,
            &[
                "federation",
                "refresh",
                "--trust-domain",
                other,
                "--output",
                "json",
            ],
        ));
        assert!(r["status"]["last_success_at"].as_i64().unwrap() > 0, "{r}");
        assert!(r["bundle"].as_str().unwrap().contains("x509-svid"), "{r}");
    }
    let shown = json(&ok(
        &a.admin,
        &[
            "federation",
            "show",
            "--trust-domain",
            "b.test",
            "--output",
            "json",
        ],
    ));
    assert_eq!(shown["profile"], "https_web");
    assert_eq!(shown["ca_bundle"], true);

    // --- workloads: a.test/client federates with b.test, b.test/server with a.test ---
    let uid = format!("unix:uid:{}", my_uid());
    for (d, path, fed) in [(&a, "client", "b.test"), (&b, "server", "a.test")] {
        ok(
            &d.admin,
            &[
                "entry",
                "create",
                "--spiffe-id",
                &format!("spiffe://{}/{path}", d.td),
                "--parent-id",
                &d.agent_id,
                "--selector",
                &uid,
                "--federates-with",
                fed,
            ],
        );
    }
    let mut wa = workload(&a.socket).await;
    let wb = workload(&b.socket).await;
    let xa = eventually("a's SVID with b's federated bundle", || {
        let mut c = wa.clone();
        async move {
            let r = first_x509(&mut c).await?;
            r.federated_bundles
                .contains_key("spiffe://b.test")
                .then_some(r)
        }
    })
    .await;
    let xb = eventually("b's SVID with a's federated bundle", || {
        let mut c = wb.clone();
        async move {
            let r = first_x509(&mut c).await?;
            r.federated_bundles
                .contains_key("spiffe://a.test")
                .then_some(r)
        }
    })
    .await;
    assert_eq!(xa.svids[0].spiffe_id, "spiffe://a.test/client");
    assert_eq!(xb.svids[0].spiffe_id, "spiffe://b.test/server");

    // X.509: each workload verifies the other's SVID chain against the federated bundle it got,
    // and a chain is refused against the wrong trust domain's bundle.
    assert_eq!(
        verify_with_federated(
            "b.test",
            &xa.federated_bundles["spiffe://b.test"],
            &xb.svids[0].x509_svid
        )
        .unwrap(),
        "spiffe://b.test/server"
    );
    assert_eq!(
        verify_with_federated(
            "a.test",
            &xb.federated_bundles["spiffe://a.test"],
            &xa.svids[0].x509_svid
        )
        .unwrap(),
        "spiffe://a.test/client"
    );
    assert!(verify_with_federated("b.test", &xa.svids[0].bundle, &xb.svids[0].x509_svid).is_err());

    // JWT: b's workload gets a JWT-SVID, a's workload validates it (and the other way round).
    for (mut minter, mut validator, subject) in [
        (wb.clone(), wa.clone(), "spiffe://b.test/server"),
        (wa.clone(), wb.clone(), "spiffe://a.test/client"),
    ] {
        let token = minter
            .fetch_jwtsvid(req(JwtsvidRequest {
                audience: vec!["peer".into()],
                spiffe_id: String::new(),
            }))
            .await
            .unwrap()
            .into_inner()
            .svids[0]
            .svid
            .clone();
        let v = validator
            .validate_jwtsvid(req(ValidateJwtsvidRequest {
                audience: "peer".into(),
                svid: token,
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(v.spiffe_id, subject);
    }
    // FetchJWTBundles carries the federated trust domain's JWT authorities too.
    let jwt_bundles = wa
        .fetch_jwt_bundles(req(JwtBundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    let mut keys: Vec<&String> = jwt_bundles.bundles.keys().collect();
    keys.sort();
    assert_eq!(keys, ["spiffe://a.test", "spiffe://b.test"]);
    assert!(
        String::from_utf8_lossy(&jwt_bundles.bundles["spiffe://b.test"]).contains("\"kid\""),
        "b.test's JWT keys are there"
    );
    // A JWT-SVID of a trust domain nobody federates with is refused.
    let signer = tessera_test_util::JwtSigner::new("stranger");
    let stranger = tessera_spiffe::SpiffeId::parse("spiffe://c.test/x").unwrap();
    let now = tessera_test_util::unix_now();
    let foreign = tessera_spiffe::jwt::mint_es256(
        &signer.key,
        &signer.kid,
        &tessera_spiffe::jwt::Claims {
            subject: &stranger,
            audience: &["peer".to_owned()],
            issued_at: now,
            expiry: now + 60,
        },
    )
    .unwrap();
    let err = wa
        .validate_jwtsvid(req(ValidateJwtsvidRequest {
            audience: "peer".into(),
            svid: foreign,
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // --- bad endpoints: clear errors, the last good bundle is kept ---
    let good_bundle = shown["bundle"].as_str().unwrap().to_owned();
    // Unreachable endpoint.
    ok(
        &a.admin,
        &[
            "federation",
            "update",
            "--trust-domain",
            "b.test",
            "--bundle-endpoint-url",
            "https://127.0.0.1:1/",
            "--profile",
            "https_web",
            "--ca-bundle",
            ca,
        ],
    );
    let err = fails(
        &a.admin,
        &["federation", "refresh", "--trust-domain", "b.test"],
    );
    assert!(err.contains("cannot connect to 127.0.0.1:1"), "{err}");
    assert!(err.contains("the last good bundle is kept"), "{err}");
    // An endpoint serving another trust domain's bundle (a's own endpoint, for b.test).
    ok(
        &a.admin,
        &[
            "federation",
            "update",
            "--trust-domain",
            "b.test",
            "--bundle-endpoint-url",
            &a_url,
            "--profile",
            "https_spiffe",
            "--endpoint-spiffe-id",
            "spiffe://a.test/tessera/server",
        ],
    );
    let err = fails(
        &a.admin,
        &["federation", "refresh", "--trust-domain", "b.test"],
    );
    assert!(
        err.contains("the bundle is of trust domain a.test, not b.test"),
        "{err}"
    );
    // https_web without the private CA: the Mozilla roots do not know it.
    ok(
        &a.admin,
        &[
            "federation",
            "update",
            "--trust-domain",
            "b.test",
            "--bundle-endpoint-url",
            &b_url,
            "--profile",
            "https_web",
        ],
    );
    let err = fails(
        &a.admin,
        &["federation", "refresh", "--trust-domain", "b.test"],
    );
    assert!(err.contains("TLS handshake failed"), "{err}");
    let shown = json(&ok(
        &a.admin,
        &[
            "federation",
            "show",
            "--trust-domain",
            "b.test",
            "--output",
            "json",
        ],
    ));
    assert!(
        !shown["status"]["last_error"].as_str().unwrap().is_empty(),
        "{shown}"
    );
    assert_eq!(
        shown["bundle"].as_str().unwrap(),
        good_bundle,
        "the last good bundle is kept"
    );
    let again = first_x509(&mut wa).await.unwrap();
    assert_eq!(
        again.federated_bundles["spiffe://b.test"],
        xa.federated_bundles["spiffe://b.test"]
    );
    // A static bundle of the wrong trust domain is refused too.
    let err = fails(
        &a.admin,
        &[
            "bundle",
            "set",
            "--trust-domain",
            "b.test",
            "--file",
            a.bundle_file.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("the bundle is of trust domain a.test, not b.test"),
        "{err}"
    );
    // Back to the good relationship.
    ok(
        &a.admin,
        &[
            "federation",
            "update",
            "--trust-domain",
            "b.test",
            "--bundle-endpoint-url",
            &b_url,
            "--profile",
            "https_web",
            "--ca-bundle",
            ca,
        ],
    );
    ok(
        &a.admin,
        &["federation", "refresh", "--trust-domain", "b.test"],
    );

    // --- live propagation: a static bundle change reaches an open stream (pushed, no poll) ---
    let c1 = TestCa::new("c.test");
    let c2 = TestCa::new("c.test");
    let c_file = dir.path().join("c.pem");
    std::fs::write(&c_file, pem("CERTIFICATE", c1.root())).unwrap();
    ok(
        &a.admin,
        &[
            "bundle",
            "set",
            "--trust-domain",
            "c.test",
            "--file",
            c_file.to_str().unwrap(),
        ],
    );
    ok(
        &a.admin,
        &[
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://a.test/c-client",
            "--parent-id",
            &a.agent_id,
            "--selector",
            &uid,
            "--federates-with",
            "c.test",
        ],
    );
    let mut stream = wa
        .fetch_x509_bundles(req(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner();
    let c1_der = c1.root().to_vec();
    let c2_der = c2.root().to_vec();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .expect("c.test's bundle reaches the stream")
            .unwrap()
            .unwrap();
        if m.bundles.get("spiffe://c.test") == Some(&c1_der) {
            break;
        }
    }
    std::fs::write(&c_file, pem("CERTIFICATE", c2.root())).unwrap();
    let changed_at = Instant::now();
    ok(
        &a.admin,
        &[
            "bundle",
            "set",
            "--trust-domain",
            "c.test",
            "--file",
            c_file.to_str().unwrap(),
        ],
    );
    loop {
        let m = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .expect("the new c.test bundle is pushed")
            .unwrap()
            .unwrap();
        if m.bundles.get("spiffe://c.test") == Some(&c2_der) {
            break;
        }
    }
    eprintln!(
        "static bundle change reached the open stream in {:?}",
        changed_at.elapsed()
    );
    ok(&a.admin, &["bundle", "delete", "--trust-domain", "c.test"]);
    loop {
        let m = tokio::time::timeout_at(deadline.into(), stream.message())
            .await
            .expect("the deleted bundle leaves the stream")
            .unwrap()
            .unwrap();
        if !m.bundles.contains_key("spiffe://c.test") {
            assert!(m.bundles.contains_key("spiffe://b.test"));
            break;
        }
    }
    let listed = json(&ok(&a.admin, &["bundle", "list", "--output", "json"]));
    let tds: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["trust_domain"].as_str().unwrap())
        .collect();
    assert_eq!(tds, ["a.test", "b.test"]);
    let err = fails(&a.admin, &["bundle", "delete", "--trust-domain", "a.test"]);
    assert!(err.contains("own trust domain"), "{err}");
}
