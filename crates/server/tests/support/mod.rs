//! What the server's integration tests share: an agent attested with a join token, and its
//! agent-API client.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)] // test fixtures; not every test uses all

use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tessera_proto::v1 as pb;
use tessera_proto::v1::agent_api_client::AgentApiClient;
use tessera_server::RunningServer;
use tessera_server::client::ServerTrust;
use tessera_spiffe::{Bundle, BundleSet, SpiffeId, TrustDomain};
use tessera_tls::{SharedBundles, SvidResolver};
use tonic::transport::Channel;

/// An agent of trust domain `example.org`, attested with a fresh join token.
pub(crate) struct Agent {
    /// Its SPIFFE ID, as the join token named it.
    pub(crate) id: String,
    pub(crate) svid_chain: Vec<Vec<u8>>,
    pub(crate) key: rcgen::KeyPair,
    /// The server's own bundle, which the agent trusts the server by.
    pub(crate) bundles: SharedBundles,
}

/// The server's SPIFFE ID in `example.org`.
pub(crate) fn server_id() -> SpiffeId {
    tessera_server::server_id(&TrustDomain::new("example.org").unwrap())
}

/// Generates a join token on the admin socket and attests an agent with it.
pub(crate) async fn attest(server: &RunningServer) -> Agent {
    let mut admin = tessera_server::client::admin(&server.admin_socket)
        .await
        .unwrap();
    let t = admin
        .generate_join_token(pb::GenerateJoinTokenRequest { ttl_secs: 0 })
        .await
        .unwrap()
        .into_inner();
    let td = TrustDomain::new("example.org").unwrap();
    let mut set = BundleSet::new();
    set.insert(Bundle::parse(td, server.bundle_json.as_bytes()).unwrap())
        .unwrap();
    let bundles: SharedBundles = Arc::new(ArcSwap::from_pointee(set));
    let key = rcgen::KeyPair::generate().unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap();
    let mut anon = tessera_server::client::agent_api(
        server.agent_addr,
        ServerTrust::Bundles(bundles.clone()),
        server_id(),
        None,
    )
    .unwrap();
    let res = tessera_server::client::attest_join_token(&mut anon, &t.token, csr.der().to_vec())
        .await
        .unwrap();
    Agent {
        id: t.agent_spiffe_id,
        svid_chain: res.svid_chain,
        key,
        bundles,
    }
}

impl Agent {
    /// Presents the agent's SVID.
    pub(crate) fn resolver(&self) -> Arc<SvidResolver> {
        let chain = self
            .svid_chain
            .iter()
            .map(|c| CertificateDer::from(c.clone()))
            .collect();
        SvidResolver::new(
            tessera_tls::certified_key(
                chain,
                PrivateKeyDer::Pkcs8(self.key.serialize_der().into()),
            )
            .unwrap(),
        )
    }

    /// An agent-API client authenticated with the agent's SVID (`client::agent_api`).
    pub(crate) fn client(&self, server: &RunningServer) -> AgentApiClient<Channel> {
        tessera_server::client::agent_api(
            server.agent_addr,
            ServerTrust::Bundles(self.bundles.clone()),
            server_id(),
            Some(self.resolver()),
        )
        .unwrap()
    }
}

/// A server config for tests: the datastore at `datastore_url` (empty: SQLite in `dir`), every
/// port chosen by the system, the admin socket in `dir`.
pub(crate) fn config_with(
    dir: &std::path::Path,
    datastore_url: String,
) -> tessera_server::ServerConfig {
    tessera_server::ServerConfig {
        datastore: tessera_server::config::DatastoreConfig { url: datastore_url },
        data_dir: dir.join("data"),
        admin_socket: dir.join("admin").join("admin.sock"),
        bind_address: "127.0.0.1:0".parse().unwrap(),
        health_bind_address: "127.0.0.1:0".parse().unwrap(),
        ..tessera_server::ServerConfig::default()
    }
}

/// Runs `case` on a server config whose datastore is a fresh PostgreSQL schema named after
/// `name` (skipped when no PostgreSQL is configured); the schema is dropped even when the case
/// fails.
pub(crate) async fn on_postgres<F, Fut>(name: &str, case: F)
where
    F: FnOnce(tessera_server::ServerConfig) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let Some(schema) = tessera_test_util::pg::fresh_schema(name).await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let outcome = tokio::spawn(case(config_with(dir.path(), schema.url.clone()))).await;
    schema.drop().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
