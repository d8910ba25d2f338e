//! The server end to end, as an agent and an operator see it: a real server on loopback with
//! SQLite in a temp dir, the agent API over real mTLS, the admin API on its Unix socket.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failed fixture should panic

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tessera_proto::v1 as pb;
use tessera_proto::v1::admin_api_client::AdminApiClient;
use tessera_proto::v1::agent_api_client::AgentApiClient;
use tessera_server::{RunningServer, ServerConfig};
use tessera_spiffe::{Bundle, BundleSet, SpiffeId, TrustDomain};
use tessera_tls::SvidResolver;
use tokio_stream::StreamExt as _;
use tonic::transport::Channel;

fn config(dir: &Path) -> ServerConfig {
    config_with(dir, String::new())
}

fn config_with(dir: &Path, datastore_url: String) -> ServerConfig {
    ServerConfig {
        datastore: tessera_server::config::DatastoreConfig { url: datastore_url },
        data_dir: dir.join("data"),
        admin_socket: dir.join("admin").join("admin.sock"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        health_bind_address: "127.0.0.1:0".parse().unwrap(),
        ..ServerConfig::default()
    }
}

async fn admin(server: &RunningServer) -> AdminApiClient<Channel> {
    tessera_server::client::admin(&server.admin_socket)
        .await
        .unwrap()
}

/// An agent-side key and its CSR.
fn key_and_csr() -> (rcgen::KeyPair, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    (key, csr.der().to_vec())
}

/// An agent API client over mTLS (or TLS only, for attestation) that verifies the server SVID.
async fn agent_client(
    server: &RunningServer,
    identity: Option<(&[Vec<u8>], &rcgen::KeyPair)>,
) -> AgentApiClient<Channel> {
    let td = TrustDomain::new("example.org").unwrap();
    let mut set = BundleSet::new();
    set.insert(Bundle::parse(td.clone(), server.bundle_json.as_bytes()).unwrap())
        .unwrap();
    let resolver = identity.map(|(chain, key)| {
        let chain = chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        SvidResolver::new(
            tessera_tls::certified_key(chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()))
                .unwrap(),
        )
    });
    tessera_server::client::agent_api(
        server.agent_addr,
        tessera_server::client::ServerTrust::Bundles(Arc::new(ArcSwap::from_pointee(set))),
        tessera_server::server_id(&td),
        resolver,
    )
    .unwrap()
}

async fn attest_join_token(
    server: &RunningServer,
    token: &str,
) -> Result<(pb::AttestResult, rcgen::KeyPair), tonic::Status> {
    let (key, csr) = key_and_csr();
    let mut client = agent_client(server, None).await;
    tessera_server::client::attest_join_token(&mut client, token, csr)
        .await
        .map(|r| (r, key))
}

/// A server started with `cfg`, its admin client, and one agent attested with a join token: the
/// token, the attestation result and the agent's key.
async fn attested(
    cfg: ServerConfig,
) -> (
    RunningServer,
    AdminApiClient<Channel>,
    pb::GenerateJoinTokenResponse,
    pb::AttestResult,
    rcgen::KeyPair,
) {
    let server = tessera_server::start(cfg).await.unwrap();
    let mut admin = admin(&server).await;
    let t = token(&mut admin).await;
    let (res, key) = attest_join_token(&server, &t.token).await.unwrap();
    (server, admin, t, res, key)
}

async fn token(admin: &mut AdminApiClient<Channel>) -> pb::GenerateJoinTokenResponse {
    admin
        .generate_join_token(pb::GenerateJoinTokenRequest { ttl_secs: 0 })
        .await
        .unwrap()
        .into_inner()
}

fn entry(spiffe_id: &str, parent: &str, selector: &str) -> pb::CreateEntryRequest {
    pb::CreateEntryRequest {
        entry: Some(pb::Entry {
            spiffe_id: spiffe_id.into(),
            parent_id: parent.into(),
            selectors: vec![selector.into()],
            ..Default::default()
        }),
    }
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

#[tokio::test]
async fn agent_attests_syncs_and_gets_only_its_svids_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    agent_attests_syncs_and_gets_only_its_svids(config(dir.path())).await;
}

#[tokio::test]
async fn agent_attests_syncs_and_gets_only_its_svids_postgres() {
    let Some(schema) = tessera_test_util::pg::fresh_schema("server_e2e").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let outcome = tokio::spawn(agent_attests_syncs_and_gets_only_its_svids(config_with(
        dir.path(),
        schema.url.clone(),
    )))
    .await;
    schema.drop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn agent_attests_syncs_and_gets_only_its_svids(cfg: ServerConfig) {
    let server = tessera_server::start(cfg).await.unwrap();
    let mut admin = admin(&server).await;

    let t = token(&mut admin).await;
    let (res, key) = attest_join_token(&server, &t.token).await.unwrap();
    assert_eq!(res.spiffe_id, t.agent_spiffe_id);
    // The agent SVID is a valid X509-SVID of the trust domain.
    let bundle = Bundle::parse(
        TrustDomain::new("example.org").unwrap(),
        &res.bundle.as_ref().unwrap().spiffe_bundle_json,
    )
    .unwrap();
    let chain: Vec<CertificateDer<'_>> = res
        .svid_chain
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let id = tessera_tls::verify_svid(
        &chain,
        &bundle,
        rustls::pki_types::UnixTime::now(),
        tessera_tls::PeerRole::Client,
    )
    .unwrap();
    assert_eq!(id.as_str(), t.agent_spiffe_id);

    // The token is single use.
    let again = attest_join_token(&server, &t.token).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::PermissionDenied, "{again:?}");

    let mine = admin
        .create_entry(entry(
            "spiffe://example.org/web",
            &t.agent_spiffe_id,
            "unix:uid:1000",
        ))
        .await
        .unwrap()
        .into_inner();
    let theirs = admin
        .create_entry(entry(
            "spiffe://example.org/db",
            "spiffe://example.org/tessera/agent/join_token/someoneelse",
            "unix:uid:1001",
        ))
        .await
        .unwrap()
        .into_inner();

    let mut agent = agent_client(&server, Some((&res.svid_chain, &key))).await;
    let mut sync = agent
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let pb::sync_response::Msg::Snapshot(snap) = next_msg(&mut sync).await else {
        panic!("snapshot first")
    };
    assert!(snap.last);
    let ids: Vec<_> = snap.entries.iter().map(|e| e.spiffe_id.as_str()).collect();
    assert_eq!(
        ids,
        ["spiffe://example.org/web"],
        "only the agent's own entries"
    );
    assert_eq!(snap.bundles.len(), 1);

    // A new entry for this agent arrives on the open stream; one for another agent does not.
    admin
        .create_entry(entry(
            "spiffe://example.org/other",
            "spiffe://example.org/tessera/agent/x/y",
            "unix:uid:5",
        ))
        .await
        .unwrap();
    let created = admin
        .create_entry(entry(
            "spiffe://example.org/api",
            &t.agent_spiffe_id,
            "unix:uid:1002",
        ))
        .await
        .unwrap()
        .into_inner();
    let created_id = created.entry.unwrap().id;
    let pb::sync_response::Msg::Change(ch) = next_msg(&mut sync).await else {
        panic!("change")
    };
    match ch.change.unwrap() {
        pb::change::Change::EntryUpserted(e) => assert_eq!(e.id, created_id),
        other => panic!("expected the new entry, got {other:?}"),
    }
    admin
        .delete_entry(pb::DeleteEntryRequest {
            id: created_id.clone(),
        })
        .await
        .unwrap();
    let pb::sync_response::Msg::Change(ch) = next_msg(&mut sync).await else {
        panic!("change")
    };
    assert_eq!(
        ch.change.unwrap(),
        pb::change::Change::EntryDeleted(created_id)
    );

    // Signing: the agent's entry is signed; another agent's entry is refused.
    let (_wk, wcsr) = key_and_csr();
    let out = agent
        .sign_x509_svids(pb::SignX509SvidsRequest {
            requests: vec![
                pb::SvidRequest {
                    entry_id: mine.entry.as_ref().unwrap().id.clone(),
                    csr: wcsr.clone(),
                },
                pb::SvidRequest {
                    entry_id: theirs.entry.as_ref().unwrap().id.clone(),
                    csr: wcsr.clone(),
                },
                pb::SvidRequest {
                    entry_id: "nope".into(),
                    csr: wcsr,
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        out.results[0].error.is_empty(),
        "{:?}",
        out.results[0].error
    );
    let chain: Vec<CertificateDer<'_>> = out.results[0]
        .svid_chain
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let wid = tessera_tls::verify_svid(
        &chain,
        &bundle,
        rustls::pki_types::UnixTime::now(),
        tessera_tls::PeerRole::Client,
    )
    .unwrap();
    assert_eq!(wid, SpiffeId::parse("spiffe://example.org/web").unwrap());
    assert!(
        out.results[1].error.contains("not authorized"),
        "{:?}",
        out.results[1]
    );
    assert!(out.results[1].svid_chain.is_empty());
    assert!(out.results[2].error.contains("not found"));

    // Without a client certificate nothing but attestation works.
    let mut anon = agent_client(&server, None).await;
    let err = anon
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);

    // Banned: the open stream closes and every call is refused.
    admin
        .ban_agent(pb::GetAgentRequest {
            spiffe_id: t.agent_spiffe_id.clone(),
        })
        .await
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(10), sync.next())
        .await
        .unwrap();
    assert_eq!(
        end.unwrap().unwrap_err().code(),
        tonic::Code::PermissionDenied
    );
    let err = agent
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let (_k, c) = key_and_csr();
    assert_eq!(
        agent
            .renew_agent(pb::RenewAgentRequest { csr: c })
            .await
            .unwrap_err()
            .code(),
        tonic::Code::PermissionDenied
    );

    // Evicted: the agent is unknown and must attest again.
    admin
        .evict_agent(pb::GetAgentRequest {
            spiffe_id: t.agent_spiffe_id.clone(),
        })
        .await
        .unwrap();
    let err = agent
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn renewal_replaces_the_agent_svid_and_the_old_one_stops_working() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _admin, _t, res, key) = attested(config(dir.path())).await;
    let mut agent = agent_client(&server, Some((&res.svid_chain, &key))).await;
    let (new_key, csr) = key_and_csr();
    let renewed = agent
        .renew_agent(pb::RenewAgentRequest { csr })
        .await
        .unwrap()
        .into_inner();
    let mut fresh = agent_client(&server, Some((&renewed.svid_chain, &new_key))).await;
    fresh
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap();
    let mut stale = agent_client(&server, Some((&res.svid_chain, &key))).await;
    let err = stale
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn join_token_cannot_be_used_twice_concurrently() {
    let dir = tempfile::tempdir().unwrap();
    let server = Arc::new(tessera_server::start(config(dir.path())).await.unwrap());
    let mut admin = admin(&server).await;
    let t = token(&mut admin).await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let s = server.clone();
        let tok = t.token.clone();
        tasks.push(tokio::spawn(async move {
            attest_join_token(&s, &tok).await.is_ok()
        }));
    }
    let mut wins = 0;
    for task in tasks {
        wins += usize::from(task.await.unwrap());
    }
    assert_eq!(wins, 1, "exactly one attestation may use the token");
}

/// A node alias `nodes/blue` parented to the server, matching the selector of the agent that
/// attests with `t`, and a workload entry `blue-web` under it; returns the alias.
async fn blue_alias(
    admin: &mut AdminApiClient<Channel>,
    t: &pb::GenerateJoinTokenResponse,
) -> pb::Entry {
    let token_sel = format!(
        "agent:join_token:{}",
        t.agent_spiffe_id.rsplit('/').next().unwrap()
    );
    let alias = admin
        .create_entry(entry(
            "spiffe://example.org/nodes/blue",
            "spiffe://example.org/tessera/server",
            &token_sel,
        ))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    admin
        .create_entry(entry(
            "spiffe://example.org/blue-web",
            "spiffe://example.org/nodes/blue",
            "unix:uid:1000",
        ))
        .await
        .unwrap();
    alias
}

#[tokio::test]
async fn node_alias_entries_reach_every_matching_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut admin, t, res, key) = attested(config(dir.path())).await;
    blue_alias(&mut admin, &t).await;
    admin
        .create_entry(entry(
            "spiffe://example.org/nodes/red",
            "spiffe://example.org/tessera/server",
            "agent:join_token:nomatch",
        ))
        .await
        .unwrap();
    admin
        .create_entry(entry(
            "spiffe://example.org/red-web",
            "spiffe://example.org/nodes/red",
            "unix:uid:1000",
        ))
        .await
        .unwrap();
    let mut agent = agent_client(&server, Some((&res.svid_chain, &key))).await;
    let mut sync = agent
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let pb::sync_response::Msg::Snapshot(snap) = next_msg(&mut sync).await else {
        panic!("snapshot")
    };
    let ids: Vec<_> = snap.entries.iter().map(|e| e.spiffe_id.as_str()).collect();
    assert_eq!(ids, ["spiffe://example.org/blue-web"]);
    server.shutdown().await;
}

#[tokio::test]
async fn a_restarted_server_keeps_its_trust_domain_entries_and_agents_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    a_restarted_server_keeps_its_trust_domain_entries_and_agents(dir.path(), String::new()).await;
}

#[tokio::test]
async fn a_restarted_server_keeps_its_trust_domain_entries_and_agents_postgres() {
    let Some(schema) = tessera_test_util::pg::fresh_schema("server_restart").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().to_path_buf();
    let url = schema.url.clone();
    let outcome = tokio::spawn(async move {
        a_restarted_server_keeps_its_trust_domain_entries_and_agents(&path, url).await
    })
    .await;
    schema.drop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

async fn a_restarted_server_keeps_its_trust_domain_entries_and_agents(dir: &Path, url: String) {
    let server = tessera_server::start(config_with(dir, url.clone()))
        .await
        .unwrap();
    let mut adm = admin(&server).await;
    let t = token(&mut adm).await;
    attest_join_token(&server, &t.token).await.unwrap();
    adm.create_entry(entry(
        "spiffe://example.org/web",
        &t.agent_spiffe_id,
        "unix:uid:1000",
    ))
    .await
    .unwrap();
    let before = adm
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    server.shutdown().await;

    let server = tessera_server::start(config_with(dir, url)).await.unwrap();
    let mut adm = admin(&server).await;
    let after = adm
        .get_bundle(pb::GetBundleRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        after.spiffe_bundle_json, before.spiffe_bundle_json,
        "same CA after restart"
    );
    let entries = adm
        .list_entries(pb::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert_eq!(entries.len(), 1);
    let agents = adm
        .list_agents(pb::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert_eq!(agents.len(), 1);
    assert_eq!(agents[0].spiffe_id, t.agent_spiffe_id);
    // The CA key file is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.join("data/ca_journal.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let sock = std::fs::metadata(&server.admin_socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(sock & 0o777, 0o600);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_admin_requests_name_the_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let server = tessera_server::start(config(dir.path())).await.unwrap();
    let mut adm = admin(&server).await;
    let cases = [
        (
            entry("spiffe://example.org/web", "spiffe://example.org/a", ""),
            "selectors",
        ),
        (
            entry(
                "spiffe://example.org",
                "spiffe://example.org/a",
                "unix:uid:1",
            ),
            "spiffe_id",
        ),
        (
            entry("spiffe://example.org/web", "not an id", "unix:uid:1"),
            "parent_id",
        ),
        (
            entry(
                "spiffe://example.org/web",
                "spiffe://example.org/a",
                "UNIX:uid:1",
            ),
            "selectors",
        ),
        (
            entry(
                "spiffe://other.org/web",
                "spiffe://other.org/a",
                "unix:uid:1",
            ),
            "spiffe_id",
        ),
        // The server's own ID, and a node alias named like an agent: reserved names.
        (
            entry(
                "spiffe://example.org/tessera/server",
                "spiffe://example.org/tessera/agent/x/y",
                "unix:uid:0",
            ),
            "reserved",
        ),
        (
            entry(
                "spiffe://example.org/tessera/agent/x509pop/victim",
                "spiffe://example.org/tessera/server",
                "agent:join_token:n1",
            ),
            "reserved",
        ),
    ];
    for (req, field) in cases {
        let err = adm.create_entry(req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let entries = adm
        .list_entries(pb::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .entries;
    assert!(entries.is_empty(), "nothing was created");
    let err = adm
        .mint_x509_svid(pb::MintX509SvidRequest {
            spiffe_id: "spiffe://example.org/tool".into(),
            csr: vec![1, 2, 3],
            ttl_secs: 60,
            dns_names: vec![],
        })
        .await
        .unwrap_err();
    assert!(err.message().starts_with("csr:"), "{}", err.message());
    for spiffe_id in [
        "spiffe://example.org/tessera/server",
        "spiffe://example.org/tessera",
    ] {
        let err = adm
            .mint_x509_svid(pb::MintX509SvidRequest {
                spiffe_id: spiffe_id.into(),
                csr: vec![1, 2, 3],
                ttl_secs: 60,
                dns_names: vec![],
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("reserved"), "{}", err.message());
    }
    // An answer that repeats a huge value is cut, so the client still gets its status (before:
    // a header past the HTTP/2 limit, and only a broken connection).
    let err = adm
        .get_entry(pb::GetEntryRequest {
            id: "a".repeat(300_000),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(
        err.message().len() < 2100 && err.message().ends_with("... (cut to 2 KiB)"),
        "{} bytes",
        err.message().len()
    );
    server.shutdown().await;
}

/// A node CA outside SPIFFE and a node certificate (with its key) under it.
fn node_pki() -> (String, Vec<u8>, rcgen::KeyPair) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "node CA");
    let ca_cert = p.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(p, ca_key);
    let node_key = rcgen::KeyPair::generate().unwrap();
    let mut np = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    np.distinguished_name
        .push(rcgen::DnType::CommonName, "node-7");
    let node = np.signed_by(&node_key, &issuer).unwrap();
    (ca_cert.pem(), node.der().to_vec(), node_key)
}

#[tokio::test]
async fn x509pop_attestation_proves_possession_of_the_node_key() {
    use rcgen::SigningKey as _;
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, node_der, node_key) = node_pki();
    let ca_path = dir.path().join("node-ca.pem");
    std::fs::write(&ca_path, &ca_pem).unwrap();
    let mut cfg = config(dir.path());
    cfg.node_attestation.x509pop.ca_bundle_path = Some(ca_path);
    let server = tessera_server::start(cfg).await.unwrap();

    // With the node key: attested, with an ID derived from the certificate and its selectors.
    let mut client = agent_client(&server, None).await;
    let (_k, csr) = key_and_csr();
    let res =
        tessera_server::client::attest_x509pop(&mut client, vec![node_der.clone()], csr, |m| {
            node_key.sign(m).map_err(|e| e.to_string())
        })
        .await
        .unwrap();
    let fp = tessera_tls::x509pop::sha256_hex(&node_der);
    assert_eq!(
        res.spiffe_id,
        format!("spiffe://example.org/tessera/agent/x509pop/{fp}")
    );
    let mut adm = admin(&server).await;
    let agent = adm
        .get_agent(pb::GetAgentRequest {
            spiffe_id: res.spiffe_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(agent.attestation_type, "x509pop");
    assert!(
        agent
            .selectors
            .contains(&"agent:x509pop:subject_cn:node-7".to_owned()),
        "{:?}",
        agent.selectors
    );
    assert!(
        agent
            .selectors
            .iter()
            .any(|s| s.starts_with("agent:x509pop:ca_fingerprint:"))
    );

    // Re-attestation with the same node certificate is allowed (same agent ID).
    let mut client = agent_client(&server, None).await;
    let (_k, csr) = key_and_csr();
    let again =
        tessera_server::client::attest_x509pop(&mut client, vec![node_der.clone()], csr, |m| {
            node_key.sign(m).map_err(|e| e.to_string())
        })
        .await
        .unwrap();
    assert_eq!(again.spiffe_id, res.spiffe_id);

    // Someone with the certificate but not the key is refused.
    let thief = rcgen::KeyPair::generate().unwrap();
    let mut client = agent_client(&server, None).await;
    let (_k, csr) = key_and_csr();
    let err =
        tessera_server::client::attest_x509pop(&mut client, vec![node_der.clone()], csr, |m| {
            thief.sign(m).map_err(|e| e.to_string())
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // A node certificate from another CA is refused before any challenge.
    let (_other_ca, stranger, stranger_key) = node_pki();
    let mut client = agent_client(&server, None).await;
    let (_k, csr) = key_and_csr();
    let err = tessera_server::client::attest_x509pop(&mut client, vec![stranger], csr, |m| {
        stranger_key.sign(m).map_err(|e| e.to_string())
    })
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn admin_api_over_mtls_admits_only_admin_svids() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.admin_bind_address = Some("127.0.0.1:0".parse().unwrap());
    let server = tessera_server::start(cfg).await.unwrap();
    let addr = server.admin_addr.unwrap();
    let mut uds = admin(&server).await;
    let mut ops = entry(
        "spiffe://example.org/ops",
        "spiffe://example.org/tessera/agent/x/y",
        "unix:uid:0",
    );
    ops.entry.as_mut().unwrap().admin = true;
    uds.create_entry(ops).await.unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let mut set = BundleSet::new();
    set.insert(Bundle::parse(td.clone(), server.bundle_json.as_bytes()).unwrap())
        .unwrap();
    let trust = tessera_server::client::ServerTrust::Bundles(Arc::new(ArcSwap::from_pointee(set)));
    // An SVID for an identity, minted through the socket (key made here).
    let svid_for = |id: &'static str| {
        let mut uds = uds.clone();
        async move {
            let (key, csr) = key_and_csr();
            let r = uds
                .mint_x509_svid(pb::MintX509SvidRequest {
                    spiffe_id: id.into(),
                    csr,
                    ttl_secs: 300,
                    dns_names: vec![],
                })
                .await
                .unwrap()
                .into_inner();
            let chain = r
                .svid_chain
                .iter()
                .map(|c| CertificateDer::from(c.clone()))
                .collect();
            SvidResolver::new(
                tessera_tls::certified_key(chain, PrivateKeyDer::Pkcs8(key.serialize_der().into()))
                    .unwrap(),
            )
        }
    };
    let admin_svid = svid_for("spiffe://example.org/ops").await;
    let mut tls = tessera_server::client::admin_tls(
        addr,
        trust.clone(),
        tessera_server::server_id(&td),
        admin_svid,
    )
    .unwrap();
    let listed = tls
        .list_entries(pb::ListEntriesRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.entries.len(), 1);
    tls.generate_join_token(pb::GenerateJoinTokenRequest { ttl_secs: 60 })
        .await
        .unwrap();
    let audit = std::fs::read_to_string(dir.path().join("data/audit.log")).unwrap();
    assert!(
        audit.contains("\"spiffe_id\":\"spiffe://example.org/ops\""),
        "{audit}"
    );

    let other = svid_for("spiffe://example.org/web").await;
    let mut tls =
        tessera_server::client::admin_tls(addr, trust, tessera_server::server_id(&td), other)
            .unwrap();
    let err = tls
        .list_entries(pb::ListEntriesRequest::default())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    server.shutdown().await;
}

#[tokio::test]
async fn a_resumed_sync_learns_that_an_entry_moved_to_another_agent() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut adm, t, res, key) = attested(config(dir.path())).await;
    let created = adm
        .create_entry(entry(
            "spiffe://example.org/web",
            &t.agent_spiffe_id,
            "unix:uid:1000",
        ))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    let mut agent = agent_client(&server, Some((&res.svid_chain, &key))).await;
    let mut sync = agent
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let pb::sync_response::Msg::Snapshot(snap) = next_msg(&mut sync).await else {
        panic!("snapshot")
    };
    assert_eq!(snap.entries.len(), 1);
    drop(sync);

    // While the agent is away, its entry is given to another agent.
    let mut moved = created.clone();
    moved.parent_id = "spiffe://example.org/tessera/agent/join_token/someoneelse".into();
    adm.update_entry(pb::UpdateEntryRequest { entry: Some(moved) })
        .await
        .unwrap();

    // Resuming after the snapshot's revision (no new snapshot), the agent is told to drop it.
    let mut sync = agent
        .sync(pb::SyncRequest {
            after_revision: snap.revision,
        })
        .await
        .unwrap()
        .into_inner();
    let pb::sync_response::Msg::Change(ch) = next_msg(&mut sync).await else {
        panic!("a change, not a snapshot")
    };
    assert_eq!(
        ch.change.unwrap(),
        pb::change::Change::EntryDeleted(created.id)
    );
    server.shutdown().await;
}

/// The first status a sync stream ends with, skipping messages (at most 10 s).
async fn sync_end(stream: &mut tonic::Streaming<pb::SyncResponse>) -> Option<tonic::Status> {
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                Some(Err(s)) => return Some(s),
                None => return None,
            }
        }
    })
    .await
    .expect("the stream ends within 10 s")
}

/// A compromised node's reach, as SPIRE bounds it: a sync stream belongs to the SVID it was
/// opened with, so it ends when the agent renews (a stolen, superseded SVID fed the node's
/// entries and selectors for good); and a node alias deleted under an open stream takes its
/// entries with it (the stream kept receiving entries created under the alias's ID).
#[tokio::test]
async fn a_sync_stream_follows_its_svid_and_its_node_aliases() {
    let dir = tempfile::tempdir().unwrap();
    let (server, mut admin, t, res, key) = attested(config(dir.path())).await;
    let alias = blue_alias(&mut admin, &t).await;
    let mut agent = agent_client(&server, Some((&res.svid_chain, &key))).await;
    let mut sync = agent
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let pb::sync_response::Msg::Snapshot(snap) = next_msg(&mut sync).await else {
        panic!("snapshot")
    };
    assert_eq!(snap.entries.len(), 1);

    // The alias is deleted: a new snapshot without its entries, and nothing created under its
    // ID afterwards reaches the stream (the marker, under the agent itself, does).
    admin
        .delete_entry(pb::DeleteEntryRequest { id: alias.id })
        .await
        .unwrap();
    admin
        .create_entry(entry(
            "spiffe://example.org/secret",
            "spiffe://example.org/nodes/blue",
            "unix:uid:31337",
        ))
        .await
        .unwrap();
    admin
        .create_entry(entry(
            "spiffe://example.org/marker",
            &t.agent_spiffe_id,
            "unix:uid:1",
        ))
        .await
        .unwrap();
    let mut resnapshot = false;
    loop {
        match next_msg(&mut sync).await {
            pb::sync_response::Msg::Snapshot(s) => {
                let ids: Vec<_> = s.entries.iter().map(|e| e.spiffe_id.as_str()).collect();
                assert!(!ids.contains(&"spiffe://example.org/blue-web"), "{ids:?}");
                assert!(!ids.contains(&"spiffe://example.org/secret"), "{ids:?}");
                resnapshot = true;
                if ids.contains(&"spiffe://example.org/marker") {
                    break;
                }
            }
            pb::sync_response::Msg::Change(c) => {
                if let Some(pb::change::Change::EntryUpserted(e)) = c.change {
                    assert_ne!(e.spiffe_id, "spiffe://example.org/secret");
                    if e.spiffe_id == "spiffe://example.org/marker" {
                        break;
                    }
                }
            }
        }
    }
    assert!(
        resnapshot,
        "the alias's deletion sends a snapshot without its entries"
    );

    // Renewal: the stream opened with the old SVID ends shortly after, and says why, with a
    // code the agent takes for "reconnect here with the current SVID" (not a lost server, not
    // a refused agent).
    let (_new_key, csr) = key_and_csr();
    agent
        .renew_agent(pb::RenewAgentRequest { csr })
        .await
        .unwrap();
    let end = sync_end(&mut sync).await.expect("an error status");
    assert_eq!(end.code(), tonic::Code::FailedPrecondition, "{end:?}");
    assert!(end.message().contains("SVID changed"), "{end:?}");
    server.shutdown().await;
}

/// An agent SVID that expired while its connection stayed open is refused on that connection
/// (TLS checked it only at the handshake), and its sync stream ends when it expires.
#[tokio::test]
async fn an_expired_agent_svid_is_refused_on_a_connection_opened_before() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.svid.agent_ttl = tessera_server::config::Secs(2);
    let server = tessera_server::start(cfg).await.unwrap();
    let mut admin = admin(&server).await;
    let t = token(&mut admin).await;
    let (res, key) = attest_join_token(&server, &t.token).await.unwrap();
    let mut agent = agent_client(&server, Some((&res.svid_chain, &key))).await;
    let mut sync = agent
        .sync(pb::SyncRequest { after_revision: 0 })
        .await
        .unwrap()
        .into_inner();
    let end = sync_end(&mut sync).await.expect("an error status");
    assert_eq!(end.code(), tonic::Code::Unauthenticated, "{end:?}");
    assert!(end.message().contains("expired"), "{end:?}");
    let (_k, csr) = key_and_csr();
    let err = agent
        .renew_agent(pb::RenewAgentRequest { csr })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("expired"), "{err:?}");
    server.shutdown().await;
}

/// A CSR the server cannot sign is refused before the join token is spent: the same token then
/// attests with a good CSR.
#[tokio::test]
async fn a_bad_csr_does_not_spend_the_join_token() {
    let dir = tempfile::tempdir().unwrap();
    let server = tessera_server::start(config(dir.path())).await.unwrap();
    let mut admin = admin(&server).await;
    let t = token(&mut admin).await;
    let mut client = agent_client(&server, None).await;
    let err = tessera_server::client::attest_join_token(&mut client, &t.token, b"junk".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("csr"), "{err:?}");
    attest_join_token(&server, &t.token).await.unwrap();
    server.shutdown().await;
}

/// Anyone who reaches the agent API can open connections without a certificate (attestation
/// needs them): at most MAX_ANONYMOUS at once, and each may hold at most 128 streams (HTTP/2
/// SETTINGS). One such connection used to hold 20,000 streams.
#[tokio::test]
async fn connections_without_a_certificate_are_bounded_in_number_and_streams() {
    use tokio::io::AsyncReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let server = tessera_server::start(config(dir.path())).await.unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let mut set = BundleSet::new();
    set.insert(Bundle::parse(td.clone(), server.bundle_json.as_bytes()).unwrap())
        .unwrap();
    let verifier = Arc::new(tessera_tls::SpiffeServerVerifier::new(
        Arc::new(ArcSwap::from_pointee(set)),
        tessera_tls::ExpectedPeer::Exact(tessera_server::server_id(&td)),
    ));
    let cfg = Arc::new(tessera_tls::client_config(verifier, None, &[b"h2"]).unwrap());
    let connect = async || {
        let tcp = tokio::net::TcpStream::connect(server.agent_addr)
            .await
            .unwrap();
        tokio_rustls::TlsConnector::from(cfg.clone())
            .connect(
                rustls::pki_types::ServerName::try_from("tessera-server").unwrap(),
                tcp,
            )
            .await
            .unwrap()
    };
    // One connection's advertised stream limit.
    let (send, conn) = h2::client::handshake(connect().await).await.unwrap();
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let req = http::Request::post("https://tessera-server/tessera.v1.AgentApi/AttestAgent")
        .header("content-type", "application/grpc")
        .body(())
        .unwrap();
    let (resp, _body) = send.send_request(req, false).unwrap();
    resp.await.unwrap();
    assert_eq!(send.current_max_send_streams(), 128);
    // Up to the limit (this one included), connections are kept; the next is closed at once.
    let mut held = Vec::new();
    for _ in 1..tessera_server::MAX_ANONYMOUS_CONNECTIONS {
        held.push(connect().await);
    }
    // (A served connection gets the server's HTTP/2 SETTINGS and then waits; a refused one
    // gets nothing and its end.)
    let mut extra = connect().await;
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(5), extra.read_to_end(&mut buf))
        .await
        .expect("the extra connection is closed, not left open");
    assert!(buf.is_empty(), "{r:?}: {buf:?}");
    let mut buf = Vec::new();
    let still =
        tokio::time::timeout(Duration::from_millis(300), held[0].read_to_end(&mut buf)).await;
    assert!(
        still.is_err(),
        "a connection within the limit stays open: {still:?}"
    );
    assert!(!buf.is_empty(), "it got the server's SETTINGS");
    server.shutdown().await;
}

/// Each agent's costly calls are rate-limited (as SPIRE limits them per caller): renewal, a
/// datastore write each, is allowed twenty times in a row, then refused with RESOURCE_EXHAUSTED
/// saying when to retry.
#[tokio::test]
async fn an_agent_renewing_in_a_loop_is_held_back() {
    let dir = tempfile::tempdir().unwrap();
    let (server, _admin, _t, res, key) = attested(config(dir.path())).await;
    let (mut chain, mut key) = (res.svid_chain, key);
    for i in 0..20 {
        let mut agent = agent_client(&server, Some((&chain, &key))).await;
        let (new_key, csr) = key_and_csr();
        chain = agent
            .renew_agent(pb::RenewAgentRequest { csr })
            .await
            .unwrap_or_else(|e| panic!("renewal {i}: {e:?}"))
            .into_inner()
            .svid_chain;
        key = new_key;
    }
    let mut agent = agent_client(&server, Some((&chain, &key))).await;
    let (_k, csr) = key_and_csr();
    let err = agent
        .renew_agent(pb::RenewAgentRequest { csr })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("retry in"), "{err:?}");
    // Its other calls are limited apart: signing still works.
    let r = agent
        .sign_x509_svids(pb::SignX509SvidsRequest { requests: vec![] })
        .await;
    assert!(r.is_ok(), "{r:?}");
    server.shutdown().await;
}

/// Admin access goes by the caller's SPIFFE ID, so every entry of one SPIFFE ID must agree on
/// `admin`: a non-admin entry with an admin's ID (under another node) is refused, naming the
/// field and the other entry, and so is making one admin while another is not.
#[tokio::test]
async fn entries_of_one_spiffe_id_agree_on_admin() {
    let dir = tempfile::tempdir().unwrap();
    let server = tessera_server::start(config(dir.path())).await.unwrap();
    let mut admin = admin(&server).await;
    let with_admin = |parent: &str, sel: &str, is_admin: bool| {
        let mut e = entry("spiffe://example.org/ops", parent, sel);
        e.entry.as_mut().unwrap().admin = is_admin;
        e
    };
    let ops = admin
        .create_entry(with_admin(
            "spiffe://example.org/node-a",
            "unix:uid:0",
            true,
        ))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    let err = admin
        .create_entry(with_admin(
            "spiffe://example.org/node-b",
            "unix:uid:0",
            false,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(
        err.message().contains("admin") && err.message().contains(&ops.id),
        "{err:?}"
    );
    // Both admin: fine; then clearing one of them is refused.
    let second = admin
        .create_entry(with_admin(
            "spiffe://example.org/node-b",
            "unix:uid:0",
            true,
        ))
        .await
        .unwrap()
        .into_inner()
        .entry
        .unwrap();
    let mut cleared = second.clone();
    cleared.admin = false;
    let err = admin
        .update_entry(pb::UpdateEntryRequest {
            entry: Some(cleared),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    server.shutdown().await;
}
