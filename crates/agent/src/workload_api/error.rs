//! The one error type of the Workload API, and the one function that turns it into a gRPC status.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use tessera_spiffe::JwtError;
use tessera_workload_attest::AttestError;
use tonic::{Code, Status};

/// Why a Workload API request (or the server itself) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkloadApiError {
    /// SPIFFE Workload Endpoint §3: every request carries `workload.spiffe.io: true`; §6: a
    /// request without it is answered `InvalidArgument`.
    #[error(
        "the request lacks the security header `workload.spiffe.io: true` (SPIFFE Workload Endpoint §3)"
    )]
    MissingSecurityHeader,

    /// A mandatory request field is empty or malformed (SPIFFE Workload API §4.5).
    #[error("{0}")]
    InvalidRequest(String),

    /// The caller matches no registration entry (SPIFFE Workload API §5.2.1, §6.2.1; Workload
    /// Endpoint §6: `PermissionDenied`). The message is the one SPIRE sends, which clients and
    /// operators recognise.
    #[error("no identity issued")]
    NoIdentity,

    /// The caller could not be attested.
    #[error("attesting the caller: {0}")]
    Attest(#[from] AttestError),

    /// The caller could not be pinned when its connection was accepted; every request on that
    /// connection is refused for the same reason.
    #[error("attesting the caller: {0}")]
    AttestAtAccept(Arc<AttestError>),

    /// The request did not come through [`super::serve`]'s listener, so there is no peer to attest.
    #[error("the caller's connection carries no Unix socket peer credentials")]
    NoPeerCredentials,

    /// ValidateJWTSVID: the token is not a valid JWT-SVID for the audience.
    #[error("invalid JWT-SVID: {0}")]
    InvalidToken(JwtError),

    /// The agent holds an identity of a trust domain whose bundle it does not have (yet).
    #[error("the agent has no trust bundle for trust domain `{0}` yet")]
    MissingBundle(String),

    /// The JWT-SVID minter (the server) refused or could not be reached; its status is kept.
    #[error("minting a JWT-SVID: {}", .0.message())]
    Mint(Status),

    /// The minter returned a token that is not a JWT-SVID for the identity asked for.
    #[error("the server returned an unusable JWT-SVID: {0}")]
    BadMintedToken(String),

    /// The agent is stopping; streams end so that clients reconnect to the next instance.
    #[error("the agent is shutting down")]
    ShuttingDown,

    /// SPIFFE Workload API §7: the WIT-SVID profile is optional, and a server without it answers
    /// `Unimplemented`.
    #[error("the WIT-SVID profile is not supported by this agent")]
    WitUnsupported,

    /// A blocking attestation task failed to complete (panicked or was cancelled).
    #[error("attestation task failed: {0}")]
    Task(String),

    /// Setting up the socket failed.
    #[error("Workload API socket {path}: {what}: {source}")]
    Socket {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },

    /// The socket path is unusable (not a socket, or served by another live process).
    #[error("Workload API socket {path}: {reason}")]
    SocketPath { path: PathBuf, reason: String },

    /// The gRPC server failed.
    #[error("Workload API server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// The single mapping from errors to gRPC status codes for the Workload API.
pub(crate) fn to_status(e: WorkloadApiError) -> Status {
    let code = match &e {
        // Workload Endpoint §6 and Appendix A.
        WorkloadApiError::MissingSecurityHeader => Code::InvalidArgument,
        // Workload API §4.5: mandatory fields with default values.
        WorkloadApiError::InvalidRequest(_) => Code::InvalidArgument,
        // Workload API §6.2.3 (SPIRE answers InvalidArgument for every validation failure).
        WorkloadApiError::InvalidToken(_) => Code::InvalidArgument,
        // Workload Endpoint §6: no identity defined for the caller.
        WorkloadApiError::NoIdentity => Code::PermissionDenied,
        WorkloadApiError::Attest(a) => attest_code(a),
        WorkloadApiError::AttestAtAccept(a) => attest_code(a),
        WorkloadApiError::NoPeerCredentials => Code::Internal,
        WorkloadApiError::MissingBundle(_) => Code::Unavailable,
        WorkloadApiError::Mint(s) => s.code(),
        WorkloadApiError::BadMintedToken(_) => Code::Internal,
        // Workload Endpoint §6: "running but unavailable" — clients retry with backoff.
        WorkloadApiError::ShuttingDown => Code::Unavailable,
        WorkloadApiError::WitUnsupported => Code::Unimplemented,
        WorkloadApiError::Task(_) => Code::Internal,
        WorkloadApiError::Socket { .. }
        | WorkloadApiError::SocketPath { .. }
        | WorkloadApiError::Transport(_) => Code::Internal,
    };
    Status::new(code, e.to_string())
}

fn attest_code(e: &AttestError) -> Code {
    match e {
        // A caller whose process vanished or was replaced is not the caller that connected.
        e if e.is_process_gone() => Code::Unauthenticated,
        // Transient reads of /proc, NSS, or an executable being replaced: retry with backoff.
        AttestError::Read { .. }
        | AttestError::NameLookup { .. }
        | AttestError::ExecutableChanged { .. }
        | AttestError::PeerCreds { .. } => Code::Unavailable,
        _ => Code::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_identity_is_permission_denied_with_the_spire_message() {
        let s = to_status(WorkloadApiError::NoIdentity);
        assert_eq!(s.code(), Code::PermissionDenied);
        assert_eq!(s.message(), "no identity issued");
    }

    #[test]
    fn a_vanished_caller_is_unauthenticated() {
        let s = to_status(WorkloadApiError::Attest(AttestError::ProcessGone {
            pid: 42,
            reason: "test",
        }));
        assert_eq!(s.code(), Code::Unauthenticated);
    }

    #[test]
    fn missing_header_is_invalid_argument() {
        assert_eq!(
            to_status(WorkloadApiError::MissingSecurityHeader).code(),
            Code::InvalidArgument
        );
    }

    #[test]
    fn mint_failures_keep_the_minters_code() {
        let s = to_status(WorkloadApiError::Mint(Status::unavailable("server down")));
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("server down"));
    }
}
