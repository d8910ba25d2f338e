//! The Tessera node agent: attests its node to the server, follows the server's pushed sync
//! stream, generates workload keys locally and has them signed, rotates SVIDs before they expire,
//! and serves the SPIFFE Workload API on a Unix socket to callers it attests by kernel facts.

pub mod cache;
pub mod config;
pub mod destination_watch;
pub mod enroll;
pub mod metrics;
mod node;
pub mod policy_watch;
mod run;
pub mod sds;
pub mod workload_api;

pub use cache::{Cache, Identity, Snapshot};
pub use config::AgentConfig;
pub use run::{RunningAgent, start};

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    #[error("config: {0}")]
    Config(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Crypto(String),
    #[error("server: {0}")]
    Server(String),
}

/// Mints JWT-SVIDs for an entry (the server signs them; the agent caches them).
#[tonic::async_trait]
pub trait JwtMinter: Send + Sync + std::fmt::Debug {
    async fn mint(&self, entry_id: &str, audience: &[String]) -> Result<String, tonic::Status>;
}
