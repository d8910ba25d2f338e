//! A trust domain in this process: a server and an attested agent on temporary directories, and
//! helpers to read what a workload (this test process) gets from the Workload API.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)] // shared by several test files

use std::path::PathBuf;
use std::time::Duration;

use rustls_pki_types::{CertificateDer, UnixTime};
use tessera_proto::v1 as pb;
use tessera_server::ServerConfig;
use tessera_spiffe::{Bundle, TrustDomain};

pub(crate) struct Domain {
    pub(crate) td: TrustDomain,
    pub(crate) server: tessera_server::RunningServer,
    pub(crate) agent: tessera_agent::RunningAgent,
    pub(crate) socket: PathBuf,
    pub(crate) admin_socket: PathBuf,
    pub(crate) dir: tempfile::TempDir,
}

pub(crate) fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// Starts a server (with `edit` applied to its config) and an agent attested with a join token.
pub(crate) async fn start(td: &str, edit: impl FnOnce(&mut ServerConfig)) -> Domain {
    let td = TrustDomain::new(td).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let admin_socket = dir.path().join("admin/admin.sock");
    let mut cfg = ServerConfig {
        trust_domain: td.clone(),
        data_dir: dir.path().join("server"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        health_bind_address: "127.0.0.1:0".parse().unwrap(),
        admin_socket: admin_socket.clone(),
        ..ServerConfig::default()
    };
    edit(&mut cfg);
    let server = tessera_server::start(cfg).await.unwrap();
    let agent_dir = dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).unwrap();
    let bundle_path = agent_dir.join("bootstrap_bundle.json");
    std::fs::write(&bundle_path, &server.bundle_json).unwrap();
    let mut admin = tessera_server::client::admin(&server.admin_socket)
        .await
        .unwrap();
    let token = admin
        .generate_join_token(pb::GenerateJoinTokenRequest { ttl_secs: 30 })
        .await
        .unwrap()
        .into_inner()
        .token;
    let socket = dir.path().join("agent.sock");
    let agent = tessera_agent::start(tessera_agent::AgentConfig {
        trust_domain: td.clone(),
        server_address: server.agent_addr.to_string(),
        data_dir: agent_dir,
        socket_path: socket.clone(),
        trust_bundle_path: Some(bundle_path),
        join_token: Some(token),
        max_hash_bytes: 0,
        ..tessera_agent::AgentConfig::default()
    })
    .await
    .unwrap();
    server.set_default_parent(agent.spiffe_id.clone());
    Domain {
        td,
        server,
        agent,
        socket,
        admin_socket,
        dir,
    }
}

impl Domain {
    /// Creates an entry for this process's uid; returns its ID.
    pub(crate) async fn entry(&self, path: &str, x509_ttl_secs: u32) -> String {
        let mut admin = tessera_server::client::admin(&self.admin_socket)
            .await
            .unwrap();
        admin
            .create_entry(pb::CreateEntryRequest {
                entry: Some(pb::Entry {
                    spiffe_id: format!("spiffe://{}{path}", self.td),
                    selectors: vec![format!("unix:uid:{}", my_uid())],
                    x509_ttl_secs,
                    ..Default::default()
                }),
            })
            .await
            .unwrap()
            .into_inner()
            .entry
            .unwrap()
            .id
    }

    pub(crate) async fn workload_client(&self) -> spiffe::WorkloadApiClient {
        spiffe::WorkloadApiClient::connect_to(format!("unix://{}", self.socket.display()))
            .await
            .unwrap()
    }

    pub(crate) async fn shutdown(self) {
        self.agent.shutdown().await;
        self.server.shutdown().await;
    }
}

/// The authority key identifier of a certificate (hex): which CA signed it.
pub(crate) fn aki(der: &[u8]) -> String {
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.extensions()
        .iter()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| hex_of(k.0))
            }
            _ => None,
        })
        .unwrap()
}

pub(crate) fn not_after(der: &[u8]) -> u64 {
    use x509_parser::prelude::{FromDer as _, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).unwrap();
    cert.validity().not_after.timestamp() as u64
}

fn hex_of(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The X.509 bundle of `td` in a Workload API context, as a Tessera bundle.
pub(crate) fn bundle_of(ctx: &spiffe::X509Context, td: &TrustDomain) -> Bundle {
    let mut b = Bundle::new(td.clone());
    let theirs = spiffe::TrustDomain::new(td.as_str()).unwrap();
    if let Some(x) = ctx.bundle_set().get(&theirs) {
        for c in x.authorities() {
            b.add_x509_authority(c.as_ref().to_vec()).unwrap();
        }
    }
    b
}

/// Whether a chain verifies against `bundle` at Unix time `at`, by Tessera's verifier.
pub(crate) fn verifies_at(chain: &[Vec<u8>], bundle: &Bundle, at: u64) -> Result<(), String> {
    let chain: Vec<CertificateDer<'_>> = chain
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    tessera_tls::verify_svid(
        &chain,
        bundle,
        UnixTime::since_unix_epoch(Duration::from_secs(at)),
        tessera_tls::PeerRole::Client,
    )
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// The default SVID's chain of a context.
pub(crate) fn chain_of(ctx: &spiffe::X509Context) -> Vec<Vec<u8>> {
    ctx.default_svid()
        .map(|s| s.cert_chain().iter().map(|c| c.as_ref().to_vec()).collect())
        .unwrap_or_default()
}

pub(crate) fn now() -> u64 {
    tessera_test_util::unix_now()
}

pub(crate) type X509Stream = std::pin::Pin<
    Box<
        dyn tokio_stream::Stream<Item = Result<spiffe::X509Context, spiffe::WorkloadApiError>>
            + Send,
    >,
>;

/// Opens FetchX509SVID once this process has an identity (the agent signs it shortly after the
/// entry is created; until then the API says `no identity issued`), with its first message.
pub(crate) async fn x509_stream(
    client: &spiffe::WorkloadApiClient,
) -> (X509Stream, spiffe::X509Context) {
    use tokio_stream::StreamExt as _;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = client.stream_x509_contexts().await {
            let mut stream: X509Stream = Box::pin(s);
            if let Some(Ok(ctx)) = stream.next().await {
                return (stream, ctx);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no X509-SVID within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
pub(crate) mod netns;
