//! The server's federation surfaces in process: the bundle endpoint's HTTP and TLS behaviour,
//! the FederationApi's refusals, and the Sync stream carrying exactly the federated bundles an
//! agent's entries need.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

mod support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{PrivateKeyDer, ServerName};
use tessera_proto::v1 as pb;
use tessera_proto::v1::federation_api_client::FederationApiClient;
use tessera_server::{RunningServer, ServerConfig};
use tessera_spiffe::{Bundle, TrustDomain};
use tessera_test_util::TestCa;
use tessera_test_util::rcgen::SanType;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_stream::StreamExt as _;
use tonic::Code;

fn config(dir: &Path) -> ServerConfig {
    ServerConfig {
        data_dir: dir.join("data"),
        admin_socket: dir.join("admin").join("admin.sock"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        health_bind_address: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    }
}

async fn federation(server: &RunningServer) -> FederationApiClient<tonic::transport::Channel> {
    FederationApiClient::new(
        tessera_server::client::unix_channel(&server.admin_socket)
            .await
            .unwrap(),
    )
}

/// One raw HTTP/1.1 exchange over TLS with `tls`; returns the negotiated version and the
/// response text.
async fn exchange(
    addr: std::net::SocketAddr,
    tls: rustls::ClientConfig,
    request: &str,
) -> (rustls::ProtocolVersion, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut s = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let version = s.get_ref().1.protocol_version().unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    (version, String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundle_endpoint_serves_json_over_tls_1_2_and_1_3_without_client_auth() {
    let dir = tempfile::tempdir().unwrap();
    let web_ca = TestCa::new("enterprise-ca.test");
    let leaf = web_ca.issue_with("", |p| {
        p.subject_alt_names = vec![SanType::DnsName("localhost".try_into().unwrap())];
    });
    let pem = |tag: &str, der: &[u8]| pem::encode(&pem::Pem::new(tag, der.to_vec()));
    std::fs::write(dir.path().join("c.pem"), pem("CERTIFICATE", &leaf.chain[0])).unwrap();
    std::fs::write(
        dir.path().join("k.pem"),
        pem("PRIVATE KEY", leaf.key.secret_pkcs8_der()),
    )
    .unwrap();
    let mut cfg = config(dir.path());
    cfg.bundle_endpoint.bind_address = Some("127.0.0.1:0".parse().unwrap());
    cfg.bundle_endpoint.profile = tessera_server::config::BundleEndpointProfile::HttpsWeb;
    cfg.bundle_endpoint.cert_path = Some(dir.path().join("c.pem"));
    cfg.bundle_endpoint.key_path = Some(dir.path().join("k.pem"));
    cfg.bundle_endpoint.refresh_hint = tessera_server::config::Secs(120);
    let server = tessera_server::start(cfg).await.unwrap();
    let addr = server.bundle_endpoint_addr.unwrap();

    let roots = [web_ca.root().clone()];
    let get = "GET /any/path HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    // Mozilla intermediate: TLS 1.3 and TLS 1.2 (ECDHE, AEAD) both work, no client certificate.
    let v13 = tessera_tls::web::web_client_config(Some(&roots)).unwrap();
    let mut v12 =
        rustls::ClientConfig::builder_with_provider(tessera_tls::web::web_crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates({
                let mut s = rustls::RootCertStore::empty();
                s.add(web_ca.root().clone()).unwrap();
                s
            })
            .with_no_client_auth();
    v12.alpn_protocols = vec![b"http/1.1".to_vec()];
    for (tls, want) in [
        (v13, rustls::ProtocolVersion::TLSv1_3),
        (v12, rustls::ProtocolVersion::TLSv1_2),
    ] {
        let (version, resp) = exchange(addr, tls, get).await;
        assert_eq!(version, want);
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert!(
            resp.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{resp}"
        );
        let body = resp.split("\r\n\r\n").nth(1).unwrap();
        let b = Bundle::parse(TrustDomain::new("example.org").unwrap(), body.as_bytes()).unwrap();
        assert_eq!(b.x509_authorities().len(), 1);
        assert_eq!(b.refresh_hint, Some(120));
    }
    let (_, resp) = exchange(
        addr,
        tessera_tls::web::web_client_config(Some(&roots)).unwrap(),
        "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
    server.shutdown().await;
}

#[tokio::test]
async fn https_web_bundle_endpoint_config_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.bundle_endpoint.bind_address = Some("127.0.0.1:0".parse().unwrap());
    cfg.bundle_endpoint.profile = tessera_server::config::BundleEndpointProfile::HttpsWeb;
    cfg.bundle_endpoint.cert_path = Some(dir.path().join("missing.pem"));
    cfg.bundle_endpoint.key_path = Some(dir.path().join("missing.key"));
    let err = tessera_server::start(cfg).await.unwrap_err().to_string();
    assert!(err.contains("bundle_endpoint.cert_path"), "{err}");
    assert!(err.contains("missing.pem"), "{err}");
}

#[tokio::test]
async fn bad_federation_requests_name_the_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = tessera_server::start(config(dir.path())).await.unwrap();
    let mut fed = federation(&server).await;
    let rel = |td: &str, url: &str, profile: &str| pb::FederationRelationship {
        trust_domain: td.into(),
        bundle_endpoint_url: url.into(),
        profile: profile.into(),
        ..Default::default()
    };
    for (r, want) in [
        (rel("Bad.TD", "https://x/", "https_web"), "trust_domain"),
        (
            rel("example.org", "https://x/", "https_web"),
            "own trust domain",
        ),
        (
            rel("b.test", "ftp://x/", "https_web"),
            "bundle_endpoint_url",
        ),
        (
            rel("b.test", "https://x/", "https_spiffe"),
            "endpoint_spiffe_id",
        ),
        (
            pb::FederationRelationship {
                ca_bundle_pem: "not pem".into(),
                ..rel("b.test", "https://x/", "https_web")
            },
            "ca_bundle_pem",
        ),
        (
            pb::FederationRelationship {
                bootstrap_bundle_json: b"{".to_vec(),
                ..rel("b.test", "https://x/", "https_web")
            },
            "bootstrap_bundle_json",
        ),
    ] {
        let err = fed.create_federation(r.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{r:?}: {err:?}");
        assert!(err.message().contains(want), "{r:?}: {}", err.message());
    }
    let none = fed
        .list_federations(pb::ListFederationsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(none.relationships.is_empty());
    let err = fed
        .update_federation(rel("b.test", "https://x/", "https_web"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    fed.create_federation(rel("b.test", "https://x/", "https_web"))
        .await
        .unwrap();
    let err = fed
        .create_federation(rel("b.test", "https://x/", "https_web"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    let err = fed
        .set_bundle(pb::SetBundleRequest {
            trust_domain: "example.org".into(),
            spiffe_bundle_json: TestCa::new("example.org").bundle().to_json().into_bytes(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("own trust domain"), "{err:?}");
    server.shutdown().await;
}

async fn next_msg(stream: &mut tonic::Streaming<pb::SyncResponse>) -> pb::sync_response::Msg {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("sync message within 10 s")
        .expect("stream open")
        .expect("no error")
        .msg
        .expect("message set")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_carries_exactly_the_federated_bundles_the_agents_entries_need() {
    let dir = tempfile::tempdir().unwrap();
    let server = tessera_server::start(config(dir.path())).await.unwrap();
    let mut admin = tessera_server::client::admin(&server.admin_socket)
        .await
        .unwrap();
    let mut fed = federation(&server).await;
    for td in ["c.test", "d.test"] {
        fed.set_bundle(pb::SetBundleRequest {
            trust_domain: td.into(),
            spiffe_bundle_json: TestCa::new(td).bundle().to_json().into_bytes(),
        })
        .await
        .unwrap();
    }

    // An attested agent with an mTLS client.
    let attested = support::attest(&server).await;
    let mut agent = attested.client(&server);

    let mut e = pb::Entry {
        spiffe_id: "spiffe://example.org/web".into(),
        parent_id: attested.id.clone(),
        selectors: vec!["unix:uid:1000".into()],
        federates_with: vec!["c.test".into()],
        ..Default::default()
    };
    let created = admin
        .create_entry(pb::CreateEntryRequest {
            entry: Some(e.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    e.id = created.id.clone();

    let mut sync = agent
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let pb::sync_response::Msg::Snapshot(snap) = next_msg(&mut sync).await else {
        panic!("snapshot first")
    };
    let mut tds: Vec<_> = snap
        .bundles
        .iter()
        .map(|b| b.trust_domain.as_str())
        .collect();
    tds.sort_unstable();
    assert_eq!(tds, ["c.test", "example.org"], "own and needed only");

    // The entry now federates with d.test instead: d.test arrives, c.test is removed.
    e.federates_with = vec!["d.test".into()];
    admin
        .update_entry(pb::UpdateEntryRequest {
            entry: Some(e.clone()),
        })
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        let pb::sync_response::Msg::Change(ch) = next_msg(&mut sync).await else {
            panic!("change")
        };
        got.push(match ch.change.unwrap() {
            pb::change::Change::EntryUpserted(_) => "entry".to_owned(),
            pb::change::Change::BundleUpdated(b) => format!("+{}", b.trust_domain),
            pb::change::Change::BundleDeleted(td) => format!("-{td}"),
            other => panic!("unexpected {other:?}"),
        });
    }
    assert_eq!(got, ["entry", "+d.test", "-c.test"]);

    // A change to a bundle nobody here needs is not sent; one to a needed bundle is.
    fed.set_bundle(pb::SetBundleRequest {
        trust_domain: "c.test".into(),
        spiffe_bundle_json: TestCa::new("c.test").bundle().to_json().into_bytes(),
    })
    .await
    .unwrap();
    let new_d = TestCa::new("d.test").bundle().to_json().into_bytes();
    fed.set_bundle(pb::SetBundleRequest {
        trust_domain: "d.test".into(),
        spiffe_bundle_json: new_d.clone(),
    })
    .await
    .unwrap();
    let pb::sync_response::Msg::Change(ch) = next_msg(&mut sync).await else {
        panic!("change")
    };
    match ch.change.unwrap() {
        pb::change::Change::BundleUpdated(b) => {
            assert_eq!(b.trust_domain, "d.test");
            assert_eq!(b.spiffe_bundle_json, new_d);
        }
        other => panic!("expected d.test's new bundle, got {other:?}"),
    }
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_spiffe_endpoints_must_prove_the_expected_id_under_the_stored_bundle() {
    // x.test serves its bundle with its server SVID; y.test federates with it.
    let dx = tempfile::tempdir().unwrap();
    let mut cx = config(dx.path());
    cx.trust_domain = TrustDomain::new("x.test").unwrap();
    cx.bundle_endpoint.bind_address = Some("127.0.0.1:0".parse().unwrap());
    let x = tessera_server::start(cx).await.unwrap();
    let url = format!("https://{}/", x.bundle_endpoint_addr.unwrap());
    let dy = tempfile::tempdir().unwrap();
    let mut cy = config(dy.path());
    cy.trust_domain = TrustDomain::new("y.test").unwrap();
    let y = tessera_server::start(cy).await.unwrap();
    let mut fed = federation(&y).await;
    let rel = |id: &str, bundle: Vec<u8>| pb::FederationRelationship {
        trust_domain: "x.test".into(),
        bundle_endpoint_url: url.clone(),
        profile: "https_spiffe".into(),
        endpoint_spiffe_id: id.into(),
        bootstrap_bundle_json: bundle,
        ..Default::default()
    };

    // A bootstrap bundle of the right name but another CA: the endpoint's SVID does not verify.
    let impostor = TestCa::new("x.test").bundle().to_json().into_bytes();
    fed.create_federation(rel("spiffe://x.test/tessera/server", impostor))
        .await
        .unwrap();
    let req = pb::FederationRequest {
        trust_domain: "x.test".into(),
    };
    let err = fed.refresh_federation(req.clone()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable);
    assert!(err.message().contains("TLS handshake failed"), "{err:?}");
    assert!(err.message().contains("unknown issuer"), "{err:?}");

    // The right bundle but another expected ID: refused, the SPIFFE ID is what is checked.
    fed.update_federation(rel(
        "spiffe://x.test/someone-else",
        x.bundle_json.clone().into_bytes(),
    ))
    .await
    .unwrap();
    let err = fed.refresh_federation(req.clone()).await.unwrap_err();
    assert!(
        err.message().contains(
            "server presented spiffe://x.test/tessera/server, expected spiffe://x.test/someone-else"
        ),
        "{err:?}"
    );
    let shown = fed.get_federation(req.clone()).await.unwrap().into_inner();
    let st = shown.status.unwrap();
    assert!(
        st.last_error
            .contains("expected spiffe://x.test/someone-else"),
        "{st:?}"
    );
    assert_eq!(st.last_success_at, 0);

    // The right ID and bundle: fetched, and the stored bundle is x's.
    fed.update_federation(rel("spiffe://x.test/tessera/server", Vec::new()))
        .await
        .unwrap();
    let ok = fed.refresh_federation(req).await.unwrap().into_inner();
    assert!(ok.status.unwrap().last_success_at > 0);
    let got = Bundle::parse(
        TrustDomain::new("x.test").unwrap(),
        &ok.bundle.unwrap().spiffe_bundle_json,
    )
    .unwrap();
    let want = Bundle::parse(
        TrustDomain::new("x.test").unwrap(),
        x.bundle_json.as_bytes(),
    )
    .unwrap();
    assert_eq!(got.x509_authorities(), want.x509_authorities());
    x.shutdown().await;
    y.shutdown().await;
}

/// An `https_web` relationship with `td` whose bundle endpoint is `addr`, verified by `web_ca`.
fn web_relationship(
    td: &str,
    addr: std::net::SocketAddr,
    web_ca: &TestCa,
) -> pb::FederationRelationship {
    pb::FederationRelationship {
        trust_domain: td.into(),
        bundle_endpoint_url: format!("https://localhost:{}/", addr.port()),
        profile: "https_web".into(),
        ca_bundle_pem: pem::encode(&pem::Pem::new("CERTIFICATE", web_ca.root().to_vec())),
        ..Default::default()
    }
}

/// A stand-in https_web bundle endpoint whose document the test can swap.
async fn serve_bundles(
    ca: &TestCa,
    served: Arc<std::sync::Mutex<Vec<u8>>>,
) -> std::net::SocketAddr {
    let leaf = ca.issue_with("", |p| {
        p.subject_alt_names = vec![SanType::DnsName("localhost".try_into().unwrap())];
    });
    let cert = tessera_tls::web::fixed_cert(
        leaf.chain.clone(),
        PrivateKeyDer::Pkcs8(leaf.key.clone_key()),
    )
    .unwrap();
    let tls = tessera_tls::web::bundle_endpoint_server_config(cert).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(mut s) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut buf = Vec::new();
            let mut chunk = [0u8; 1024];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = served.lock().unwrap().clone();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(&body).await;
            let _ = s.shutdown().await;
        }
    });
    addr
}

fn with_hint(ca: &TestCa, hint: u64) -> Vec<u8> {
    let mut b = ca.bundle();
    b.refresh_hint = Some(hint);
    b.to_json().into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_bundles_refresh_by_themselves_at_the_refresh_hint() {
    let web_ca = TestCa::new("enterprise-ca.test");
    let (w1, w2) = (TestCa::new("w.test"), TestCa::new("w.test"));
    let served = Arc::new(std::sync::Mutex::new(with_hint(&w1, 1)));
    let addr = serve_bundles(&web_ca, served.clone()).await;

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.federation.refresh_floor = tessera_server::config::Secs(1);
    let server = tessera_server::start(cfg).await.unwrap();
    let mut fed = federation(&server).await;
    fed.create_federation(web_relationship("w.test", addr, &web_ca))
        .await
        .unwrap();
    let req = pb::FederationRequest {
        trust_domain: "w.test".into(),
    };
    // No explicit refresh anywhere below: the server fetches on its own, at the hint.
    let held = |fed: FederationApiClient<tonic::transport::Channel>, want: Vec<u8>| {
        let req = req.clone();
        async move {
            let mut fed = fed;
            let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
            loop {
                let r = fed.get_federation(req.clone()).await.unwrap().into_inner();
                let now = r
                    .bundle
                    .as_ref()
                    .and_then(|b| {
                        Bundle::parse(TrustDomain::new("w.test").unwrap(), &b.spiffe_bundle_json)
                            .ok()
                    })
                    .map(|b| b.x509_authorities().to_vec());
                // The status is written just after the bundle: wait for both.
                let recorded = r.status.as_ref().is_some_and(|s| s.last_success_at > 0);
                if now.as_deref() == Some(&[want.clone()][..]) && recorded {
                    return r;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "bundle not refreshed"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let first = held(fed.clone(), w1.root().to_vec()).await;
    let st = first.status.unwrap();
    // The hint (1 s, at our floor) sets the next refresh.
    assert_eq!(st.next_refresh_at - st.last_attempt_at, 1, "{st:?}");
    *served.lock().unwrap() = with_hint(&w2, 1);
    held(fed.clone(), w2.root().to_vec()).await;
    server.shutdown().await;
}

/// From a black-box test's hostile bundle endpoint: a bundle with a huge value (a 900 KB `crv`)
/// and one whose only X.509 authority has expired. Neither replaces the last good bundle, and
/// the error (answered, stored as `last_error`, logged) stays short.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_bundle_never_replaces_the_last_good_one_and_its_error_stays_short() {
    let web_ca = TestCa::new("enterprise-ca.test");
    let good = TestCa::new("h.test").bundle().to_json().into_bytes();
    let served = Arc::new(std::sync::Mutex::new(good.clone()));
    let addr = serve_bundles(&web_ca, served.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let server = tessera_server::start(config(dir.path())).await.unwrap();
    let mut fed = federation(&server).await;
    fed.create_federation(web_relationship("h.test", addr, &web_ca))
        .await
        .unwrap();
    let req = pb::FederationRequest {
        trust_domain: "h.test".into(),
    };
    fed.refresh_federation(req.clone()).await.unwrap();

    let big_crv = format!(
        r#"{{"keys":[{{"kty":"EC","use":"jwt-svid","kid":"k","crv":"{}","x":"AA","y":"AA"}}]}}"#,
        "A".repeat(900_000)
    );
    let expired_ca = TestCa::new("h.test").intermediate_with(|p| p.not_after = p.not_before);
    let mut expired = Bundle::new(TrustDomain::new("h.test").unwrap());
    expired
        .add_x509_authority(expired_ca.cert.to_vec())
        .unwrap();
    for (body, want) in [
        (big_crv.into_bytes(), "keys[0]: unsupported EC curve \"AAAA"),
        (
            expired.to_json().into_bytes(),
            "every X.509 authority of the bundle of h.test has expired (the last one at ",
        ),
    ] {
        *served.lock().unwrap() = body;
        let err = fed.refresh_federation(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(err.message().contains(want), "{}", err.message());
        assert!(err.message().len() < 1200, "{} bytes", err.message().len());
        let got = fed.get_federation(req.clone()).await.unwrap().into_inner();
        let status = got.status.unwrap();
        assert!(status.last_error.contains(want), "{}", status.last_error);
        assert!(
            status.last_error.len() <= 1100,
            "{} bytes",
            status.last_error.len()
        );
        assert_eq!(
            got.bundle.unwrap().spiffe_bundle_json,
            good,
            "the good bundle is kept"
        );
    }
    server.shutdown().await;
}
