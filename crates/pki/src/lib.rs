//! The certificate authority of one trust domain: it signs workloads' CSRs into X509-SVIDs
//! ([`X509Authority`]), mints JWT-SVIDs ([`JwtAuthority`]), and rotates both keys through a
//! two-slot journal ([`Journal`]) whose every key is published in the bundle before it signs and
//! stays there until the last SVID it signed has expired (or an operator revokes it). The X.509
//! CA may be signed by an upstream authority ([`UpstreamAuthority`], [`DiskUpstream`]).
//!
//! Pure and synchronous: no I/O, no clocks (every function that needs the time takes `now`, Unix
//! seconds), no async. Storing the journal, choosing when to tick it and distributing the bundle
//! are the caller's job. The SPIFFE rules themselves live in `tessera-spiffe`; this crate only
//! issues what those rules accept. Nothing here may panic on input: every failure is a
//! [`PkiError`] that names what was wrong.

mod csr;
mod journal;
mod jwt;
mod upstream;
mod x509;

pub use journal::{Authority, Journal, JournalEvent, Kind, MintX509, Rotation, Slot, Status};
pub use jwt::JwtAuthority;
pub use upstream::{CaRequest, DiskUpstream, UpstreamAuthority, UpstreamCa};
pub use x509::{SignedSvid, SvidTemplate, X509Authority};

/// Checks a PKCS#10 CSR as signing would (parse, signature, key type and size) without signing,
/// so a caller can refuse a bad one before it spends anything (a single-use join token).
pub fn check_csr(csr_der: &[u8]) -> Result<(), PkiError> {
    csr::verified_public_key(csr_der).map(|_| ())
}

use tessera_spiffe::{BundleError, JwtError};

/// Clock skew allowance: certificates are valid from this many seconds before they were issued,
/// so a peer whose clock is slightly behind does not refuse a fresh SVID or CA.
pub const BACKDATE_SECS: u64 = 10;

/// Everything that can go wrong in the CA, in the words of the operator who has to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("{what} TTL is 0 seconds; it must be positive")]
    ZeroTtl { what: &'static str },
    #[error("{what} {value} (Unix seconds) cannot be written in a certificate")]
    TimeOutOfRange { what: &'static str, value: u64 },
    #[error("cannot generate a key: {0}")]
    KeyGeneration(String),
    #[error("cannot sign the certificate: {0}")]
    Sign(String),
    #[error("CA certificate: {0}")]
    CaCertificate(String),
    #[error("CA private key: {0}")]
    CaKey(String),
    #[error("the CA expired at {not_after} (now {now}); it cannot sign anything")]
    CaExpired { not_after: u64, now: u64 },
    #[error("the CA is not valid before {not_before} (now {now}); has the clock gone backwards?")]
    CaNotYetValid { not_before: u64, now: u64 },
    #[error("CSR: not a DER PKCS#10 certification request: {0}")]
    CsrParse(String),
    #[error(
        "CSR: its signature does not verify with its own public key, so the requester has not proven it holds the private key (RFC 2986 §3)"
    )]
    CsrSignature,
    #[error(
        "CSR: public key type {algorithm} is not supported; use EC P-256 or P-384, RSA 2048-4096 or Ed25519"
    )]
    UnsupportedKey { algorithm: String },
    #[error("CSR: RSA key of {bits} bits; 2048 to 4096 bits are supported")]
    RsaKeySize { bits: usize },
    #[error("CSR: signature algorithm {algorithm} is not supported for a {key} key")]
    UnsupportedCsrSignature {
        algorithm: String,
        key: &'static str,
    },
    #[error(
        "SPIFFE ID {id} has no path; an X509-SVID's ID MUST NOT be the trust domain itself (X509-SVID §3.1)"
    )]
    RootId { id: String },
    #[error("SPIFFE ID {id} is not in trust domain {trust_domain}, the only one this CA signs for")]
    ForeignId { id: String, trust_domain: String },
    #[error("DNS name {name:?}: {reason}")]
    DnsName { name: String, reason: &'static str },
    #[error("JWT-SVID audience is empty; at least one is required (JWT-SVID §3.2)")]
    EmptyAudience,
    #[error(
        "JWT-SVID audience has {count} values, the longest of {longest} bytes; at most {max_count} values of at most {max_len} bytes each are signed"
    )]
    AudienceTooLarge {
        count: usize,
        longest: usize,
        max_count: usize,
        max_len: usize,
    },
    #[error("JWT key ID {kid:?}: {reason}")]
    Kid { kid: String, reason: &'static str },
    #[error("JWT signing key: {0}")]
    JwtKey(String),
    #[error("JWT-SVID: {0}")]
    Jwt(#[from] JwtError),
    #[error("journal: {0}")]
    Journal(String),
    #[error("{0}")]
    Rotation(String),
    #[error("upstream authority: {0}")]
    Upstream(String),
    #[error("bundle: {0}")]
    Bundle(#[from] BundleError),
}

/// Hex of a positive big-endian integer without leading zero bytes (how serials are shown).
fn int_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    match &bytes[start..] {
        [] => "00".to_owned(),
        rest => hex::encode(rest),
    }
}
