//! The Tessera server: the control plane of one trust domain.
//!
//! It owns the CA (`ca`), the registration entries, attested agents and join tokens (in the
//! datastore), and serves three endpoints: the agent API (gRPC over mTLS: node attestation, SVID
//! signing and the pushed `Sync` stream), the admin API (gRPC on a 0600 Unix socket) and the
//! health/metrics endpoint. Every change goes through the datastore, which gives it a revision;
//! the writer then wakes the sync streams (`state::Feed`), which read the change feed from the
//! last revision they sent. Nothing polls.

mod admin;
mod agent_api;
mod audit;
mod authority;
mod ca;
pub mod client;
pub(crate) mod cluster;
pub mod config;
mod convert;
mod destination_api;
mod federation;
mod follow;
pub mod grpc_status;
mod memory;
mod metrics;
mod policy_api;
mod policy_sync;
mod rate;
mod run;
mod state;
mod transport;
pub mod unix_socket;

pub use config::ServerConfig;
pub use run::{RunningServer, start};
pub use transport::MAX_ANONYMOUS as MAX_ANONYMOUS_CONNECTIONS;

/// Where server-side failures come from, in words an operator can act on.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    #[error("CA: {0}")]
    Ca(String),
    #[error("datastore: {0}")]
    Store(#[from] tessera_store::StoreError),
    #[error("{0}")]
    Invalid(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    /// A step asked for out of order (a forced CA rotation step, say); the message names the
    /// step that must come first.
    #[error("{0}")]
    Precondition(String),
}

/// The SPIFFE ID of a server of `td`, the identity agents verify it by.
pub fn server_id(td: &tessera_spiffe::TrustDomain) -> tessera_spiffe::SpiffeId {
    td.id_with_path("/tessera/server")
        .unwrap_or_else(|_| td.id())
}

/// The SPIFFE ID an agent gets for a node attested with `method` and node key `id`.
pub fn agent_id(
    td: &tessera_spiffe::TrustDomain,
    method: &str,
    id: &str,
) -> Result<tessera_spiffe::SpiffeId, tessera_spiffe::IdError> {
    td.id_with_path(&format!("/tessera/agent/{method}/{id}"))
}

/// Writes a file that holds private keys: mode 0600 from creation, written to a temp file,
/// fsynced and renamed over `path`, so a crash leaves either the old or the new content and never
/// a readable half. Used for the CA journal and the agent's stored SVID.
pub fn write_private_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    // An existing temp file keeps its old mode on open: set it explicitly.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
