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

/// The most bytes of an error about something remote (a bundle endpoint, a policy source) that
/// is logged, stored and shown ([`bounded_error`]).
pub(crate) const MAX_ERROR_BYTES: usize = 1024;

/// `e` cut to [`MAX_ERROR_BYTES`] at a character boundary, marked as cut. Such an error can
/// carry whatever the remote side sent: a bundle endpoint's 1 MB `crv`, or a policy source's
/// 3 MB principal, made an error that size, logged at every retry, stored in the datastore or
/// the sync status and printed by the CLI. The parsers shorten what they repeat; this bound
/// holds whatever any future message repeats.
pub(crate) fn bounded_error(e: &str) -> std::borrow::Cow<'_, str> {
    tessera_spiffe::abbreviate(e, MAX_ERROR_BYTES)
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_remote_error_is_cut_to_1_kib_at_a_char_boundary() {
        assert_eq!(bounded_error("GET x: 404"), "GET x: 404");
        let exact = "e".repeat(MAX_ERROR_BYTES);
        assert_eq!(bounded_error(&exact), exact);
        // 1 MB of two-byte characters, offset by one byte so 1024 falls inside one.
        let huge = format!("x{}", "é".repeat(1 << 19));
        let cut = bounded_error(&huge);
        let (kept, marker) = cut.split_once('…').unwrap();
        assert_eq!(kept.len(), MAX_ERROR_BYTES - 1);
        assert!(marker.ends_with("bytes cut)"), "{marker}");
        assert!(huge.starts_with(kept));
    }
}
