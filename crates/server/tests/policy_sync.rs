//! Policy sets owned by an external access-control system (`[[policy.sync]]`), against a real
//! HTTPS server in the test (its certificate from a test CA given as `ca_file`) that honours
//! `If-None-Match`, and a directory: the set is applied, updated (create, update, delete), a 304
//! changes nothing, a bad document is refused whole with the reason in the status and the last
//! good set stays, a wrong CA fails the poll, manual changes to a synced policy are refused, and
//! all of it survives a server restart.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::pki_types::PrivateKeyDer;
use tessera_proto::v1 as pb;
use tessera_proto::v1::policy_api_client::PolicyApiClient;
use tessera_server::ServerConfig;
use tessera_server::config::{PolicySyncConfig, Secs};
use tessera_test_util::TestCa;
use tessera_test_util::rcgen::SanType;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// What the test endpoint serves: a document and its ETag; it counts 304s.
#[derive(Default)]
struct Served {
    body: String,
    etag: String,
    not_modified: usize,
}

async fn serve(ca: &TestCa, served: Arc<Mutex<Served>>) -> u16 {
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
    let port = listener.local_addr().unwrap().port();
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
            let req = String::from_utf8_lossy(&buf).to_ascii_lowercase();
            let resp = {
                let mut sv = served.lock().unwrap();
                let tag = format!("\"{}\"", sv.etag);
                if req.contains(&format!("if-none-match: {}", tag.to_ascii_lowercase())) {
                    sv.not_modified += 1;
                    format!("HTTP/1.1 304 Not Modified\r\nETag: {tag}\r\nConnection: close\r\n\r\n")
                } else {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/yaml\r\nETag: {tag}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                        sv.body.len(),
                        sv.body
                    )
                }
            };
            let _ = s.write_all(resp.as_bytes()).await;
            let _ = s.shutdown().await;
        }
    });
    port
}

fn set_served(s: &Mutex<Served>, etag: &str, body: &str) {
    let mut sv = s.lock().unwrap();
    sv.etag = etag.to_owned();
    sv.body = body.to_owned();
}

fn config(dir: &Path, sources: Vec<PolicySyncConfig>) -> ServerConfig {
    let mut cfg = ServerConfig {
        data_dir: dir.join("data"),
        admin_socket: dir.join("admin").join("admin.sock"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        health_bind_address: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    };
    cfg.policy.sync = sources;
    cfg
}

async fn api(server: &tessera_server::RunningServer) -> PolicyApiClient<tonic::transport::Channel> {
    PolicyApiClient::new(
        tessera_server::client::unix_channel(&server.admin_socket)
            .await
            .unwrap(),
    )
}

/// Stored policies by name, with their actions.
async fn stored(api: &mut PolicyApiClient<tonic::transport::Channel>) -> BTreeMap<String, String> {
    api.list_policies(pb::ListPoliciesRequest {})
        .await
        .unwrap()
        .into_inner()
        .policies
        .into_iter()
        .map(|p| {
            let doc: serde_json::Value = serde_json::from_str(&p.document_json).unwrap();
            (
                p.name,
                doc["action"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

async fn status(
    api: &mut PolicyApiClient<tonic::transport::Channel>,
    set: &str,
) -> pb::PolicySyncStatus {
    api.get_policy_sync_status(pb::PolicySyncStatusRequest {})
        .await
        .unwrap()
        .into_inner()
        .sources
        .into_iter()
        .find(|s| s.set == set)
        .unwrap()
}

async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the stored policies (name → action) are `want`.
async fn wait_stored(
    api: &PolicyApiClient<tonic::transport::Channel>,
    what: &str,
    want: &BTreeMap<String, String>,
) {
    wait_for(what, || {
        let mut api = api.clone();
        async move { &stored(&mut api).await == want }
    })
    .await;
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const V1: &str = "- name: a\n  action: ALLOW\n  rules: [{from: {principals: [\"*\"]}}]\n- name: b\n  action: DENY\n  rules: [{}]\n";
const V2: &str = "- name: a\n  action: AUDIT\n  rules: [{}]\n- name: c\n  action: ALLOW\n  rules: [{to: {ports: [8080]}}]\n";
const BAD: &str =
    "- name: a\n  action: ALLOW\n- name: d\n  action: DENY\n  rules: [{to: {ports: [0]}}]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_synced_set_is_applied_updated_kept_through_bad_documents_and_restarts() {
    let web_ca = TestCa::new("pap-ca.test");
    let other_ca = TestCa::new("other-ca.test");
    let served = Arc::new(Mutex::new(Served::default()));
    set_served(&served, "v1", V1);
    let port = serve(&web_ca, served.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_pem = |ca: &TestCa, name: &str| {
        let p = dir.path().join(name);
        std::fs::write(
            &p,
            pem::encode(&pem::Pem::new("CERTIFICATE", ca.root().to_vec())),
        )
        .unwrap();
        p
    };
    let policies_d = dir.path().join("policies.d");
    std::fs::create_dir_all(&policies_d).unwrap();
    std::fs::write(
        policies_d.join("10-base.yaml"),
        "- name: base\n  action: DENY\n  rules: [{}]\n",
    )
    .unwrap();
    let url = format!("https://localhost:{port}/policies");
    let sources = vec![
        PolicySyncConfig {
            set: "central".into(),
            url: Some(url.clone()),
            directory: None,
            interval: Secs(1),
            ca_file: Some(ca_pem(&web_ca, "pap-ca.pem")),
            spiffe_id: None,
        },
        PolicySyncConfig {
            set: "wrongca".into(),
            url: Some(url.clone()),
            directory: None,
            interval: Secs(1),
            ca_file: Some(ca_pem(&other_ca, "other-ca.pem")),
            spiffe_id: None,
        },
        PolicySyncConfig {
            set: "local".into(),
            url: None,
            directory: Some(policies_d.clone()),
            interval: Secs(1),
            ca_file: None,
            spiffe_id: None,
        },
    ];
    let server = tessera_server::start(config(dir.path(), sources.clone()))
        .await
        .unwrap();
    let mut api = api(&server).await;
    // A manual policy outside the sets is never touched by the sync.
    api.apply_policy(pb::ApplyPolicyRequest {
        policy: Some(pb::StoredPolicy {
            name: "manual".into(),
            document_json: r#"{"action":"DENY","rules":[{}]}"#.into(),
        }),
        create_only: true,
    })
    .await
    .unwrap();

    // Applied.
    let want1 = map(&[
        ("central/a", "ALLOW"),
        ("central/b", "DENY"),
        ("local/base", "DENY"),
        ("manual", "DENY"),
    ]);
    wait_stored(&api, "v1 applied", &want1).await;
    let st = status(&mut api, "central").await;
    assert_eq!((st.etag.as_str(), st.policies), ("\"v1\"", 2), "{st:?}");
    assert!(
        st.last_error.is_empty() && st.last_success_unix > 0 && st.revision > 0,
        "{st:?}"
    );
    let rev1 = st.revision;
    // Unchanged: the next polls get 304 and write nothing.
    wait_for("a 304", || {
        let n = served.lock().unwrap().not_modified;
        async move { n >= 2 }
    })
    .await;
    assert_eq!(status(&mut api, "central").await.revision, rev1);
    // The wrong CA fails the TLS handshake: nothing stored for that set, the reason shown.
    let wrong = status(&mut api, "wrongca").await;
    assert!(
        wrong.last_error.contains("TLS handshake failed"),
        "{wrong:?}"
    );
    assert_eq!(wrong.last_success_unix, 0);

    // Manual changes to a synced policy are refused.
    let e = api
        .apply_policy(pb::ApplyPolicyRequest {
            policy: Some(pb::StoredPolicy {
                name: "central/a".into(),
                document_json: r#"{"action":"DENY","rules":[{}]}"#.into(),
            }),
            create_only: false,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("policy set \"central\""),
        "{}",
        e.message()
    );
    let e = api
        .delete_policy(pb::PolicyName {
            name: "local/base".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);

    // Updated: a changed, b deleted, c created; the directory gains a file.
    set_served(&served, "v2", V2);
    std::fs::write(
        policies_d.join("20-more.json"),
        r#"[{"name":"more","action":"AUDIT","rules":[{}]}]"#,
    )
    .unwrap();
    let want2 = map(&[
        ("central/a", "AUDIT"),
        ("central/c", "ALLOW"),
        ("local/base", "DENY"),
        ("local/more", "AUDIT"),
        ("manual", "DENY"),
    ]);
    wait_stored(&api, "v2 applied", &want2).await;
    let st = status(&mut api, "central").await;
    assert!(st.revision > rev1, "{st:?}");

    // A bad document is refused whole: the reason is shown and v2 stays.
    set_served(&served, "v3", BAD);
    std::fs::write(
        policies_d.join("30-bad.yaml"),
        "- name: x\n  action: MAYBE\n",
    )
    .unwrap();
    wait_for("the bad document reported", || {
        let mut api = api.clone();
        async move {
            let c = status(&mut api, "central").await;
            let l = status(&mut api, "local").await;
            c.last_error.contains("rules[0].to.ports[0]") && l.last_error.contains("30-bad.yaml")
        }
    })
    .await;
    assert_eq!(
        stored(&mut api).await,
        want2,
        "a bad document changed the stored set"
    );
    assert_eq!(status(&mut api, "central").await.etag, "\"v2\"");

    // Through a restart: the stored set stands, and polling resumes.
    server.shutdown().await;
    let server = tessera_server::start(config(dir.path(), sources))
        .await
        .unwrap();
    let mut api = self::api(&server).await;
    assert_eq!(stored(&mut api).await, want2);
    set_served(
        &served,
        "v4",
        "- name: only\n  action: DENY\n  rules: [{}]\n",
    );
    std::fs::remove_file(policies_d.join("30-bad.yaml")).unwrap();
    std::fs::remove_file(policies_d.join("10-base.yaml")).unwrap();
    let want4 = map(&[
        ("central/only", "DENY"),
        ("local/more", "AUDIT"),
        ("manual", "DENY"),
    ]);
    wait_stored(&api, "v4 applied after the restart", &want4).await;
    let st = status(&mut api, "central").await;
    assert!(st.last_error.is_empty(), "{st:?}");
    assert_eq!(st.policies, 1);
    server.shutdown().await;
}

/// Until `status(set).last_error` contains `why`; returns that status.
async fn error_shown(
    api: &PolicyApiClient<tonic::transport::Channel>,
    set: &str,
    why: &str,
) -> pb::PolicySyncStatus {
    wait_for(&format!("{set}: an error with {why:?}"), || {
        let mut api = api.clone();
        async move { status(&mut api, set).await.last_error.contains(why) }
    })
    .await;
    status(&mut api.clone(), set).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_with_no_value_is_refused_and_only_an_empty_list_empties_the_set() {
    let web_ca = TestCa::new("pap-ca.test");
    let served = Arc::new(Mutex::new(Served::default()));
    set_served(&served, "v1", V1);
    let port = serve(&web_ca, served.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("pap-ca.pem");
    std::fs::write(
        &ca_file,
        pem::encode(&pem::Pem::new("CERTIFICATE", web_ca.root().to_vec())),
    )
    .unwrap();
    let policies_d = dir.path().join("policies.d");
    std::fs::create_dir_all(&policies_d).unwrap();
    let base = policies_d.join("10-base.yaml");
    std::fs::write(&base, "- name: base\n  action: DENY\n  rules: [{}]\n").unwrap();
    let url = format!("https://localhost:{port}/policies");
    let sources = vec![
        PolicySyncConfig {
            set: "central".into(),
            url: Some(url.clone()),
            directory: None,
            interval: Secs(1),
            ca_file: Some(ca_file),
            spiffe_id: None,
        },
        PolicySyncConfig {
            set: "local".into(),
            url: None,
            directory: Some(policies_d.clone()),
            interval: Secs(1),
            ca_file: None,
            spiffe_id: None,
        },
    ];
    let server = tessera_server::start(config(dir.path(), sources))
        .await
        .unwrap();
    let api = api(&server).await;
    let want1 = map(&[
        ("central/a", "ALLOW"),
        ("central/b", "DENY"),
        ("local/base", "DENY"),
    ]);
    wait_stored(&api, "v1 applied", &want1).await;

    // An empty body, a duplicate key, a YAML null, a huge value: each refused with the reason
    // (naming the source, bounded), and the DENY policy b stays.
    let huge = format!(
        r#"[{{"name":"a","action":"ALLOW","rules":[{{"from":{{"principals":["spiffe://example.org/{}"]}}}}]}}]"#,
        "x".repeat(1 << 20)
    );
    for (etag, body, why) in [
        ("e1", "", "empty"),
        (
            "e2",
            "- name: b\n  action: DENY\n  action: ALLOW\n",
            "twice",
        ),
        ("e3", "null\n", "empty"),
        ("e4", huge.as_str(), "bytes cut"),
    ] {
        set_served(&served, etag, body);
        let st = error_shown(&api, "central", why).await;
        assert!(st.last_error.starts_with(&url), "{st:?}");
        assert!(st.last_error.len() < 2048, "{} bytes", st.last_error.len());
        assert_eq!(st.etag, "\"v1\"", "{etag}");
        assert_eq!(
            stored(&mut api.clone()).await,
            want1,
            "{etag} changed the set"
        );
    }

    // A directory: an empty file, then no file at all, are refused; the set stays.
    std::fs::write(&base, "").unwrap();
    let st = error_shown(&api, "local", "empty").await;
    assert!(st.last_error.contains("10-base.yaml"), "{st:?}");
    std::fs::remove_file(&base).unwrap();
    error_shown(&api, "local", "no *.yaml").await;
    assert_eq!(stored(&mut api.clone()).await, want1);

    // An empty list empties each set.
    set_served(&served, "v2", "[]");
    std::fs::write(policies_d.join("00-none.json"), "[]").unwrap();
    wait_stored(&api, "both sets emptied", &BTreeMap::new()).await;
    for set in ["central", "local"] {
        let st = status(&mut api.clone(), set).await;
        assert!(st.last_error.is_empty() && st.policies == 0, "{st:?}");
    }
    server.shutdown().await;
}
