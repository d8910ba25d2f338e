//! The one error type of workload attestation.

use std::io;

use tessera_spiffe::SelectorError;

/// Why a Workload API caller could not be attested. The Workload API answers every one of these
/// without an identity; [`AttestError::ProcessGone`] maps to `Unauthenticated`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AttestError {
    /// The kernel reported pid 0 (or less) for the socket's peer: the caller lives in a pid
    /// namespace that the agent cannot see into, so there is no process to inspect.
    #[error(
        "the caller's pid is {pid} as seen by the agent: the agent must run in the callers' pid namespace (or an ancestor of it) to attest them"
    )]
    NoPid { pid: i32 },

    /// The process exited, or its pid now names another process, or its credentials no longer
    /// match what the socket reported. Nothing read about that pid may be trusted.
    #[error(
        "process {pid} exited or was replaced during attestation ({reason}); a recycled pid gets no identity"
    )]
    ProcessGone { pid: i32, reason: &'static str },

    /// `SO_PEERCRED` (or `SO_PEERPIDFD`) failed on the Workload API socket.
    #[error("reading the peer credentials of the Workload API socket: {source}")]
    PeerCreds {
        #[source]
        source: io::Error,
    },

    /// A `/proc` file or a system call about the process failed while the process was alive.
    #[error("process {pid}: reading {what}: {source}")]
    Read {
        pid: i32,
        what: &'static str,
        #[source]
        source: io::Error,
    },

    /// A `/proc` file did not have the shape the kernel documents (`proc(5)`).
    #[error("process {pid}: {what} has unexpected content: {detail}")]
    Parse {
        pid: i32,
        what: &'static str,
        detail: String,
    },

    /// The user or group database (NSS) failed to answer; "no such user" is not an error.
    #[error("process {pid}: looking up the name of {what} {id}: {source}")]
    NameLookup {
        pid: i32,
        what: &'static str,
        id: u32,
        #[source]
        source: io::Error,
    },

    /// The executable's size or timestamps changed while it was being hashed, so the hash might
    /// describe neither the old nor the new content.
    #[error("process {pid}: its executable changed on disk while it was being hashed")]
    ExecutableChanged { pid: i32 },

    /// A fact about the process cannot be written as a selector (a path with control characters,
    /// or longer than a selector may be). The caller gets no identity rather than a wrong one.
    #[error("process {pid}: its {what} cannot be expressed as a selector: {source}")]
    Selector {
        pid: i32,
        what: &'static str,
        #[source]
        source: SelectorError,
    },
}

impl AttestError {
    /// True when the caller's process is gone or replaced ([`AttestError::ProcessGone`]), which
    /// the Workload API answers with `Unauthenticated`.
    pub fn is_process_gone(&self) -> bool {
        matches!(self, Self::ProcessGone { .. })
    }
}
