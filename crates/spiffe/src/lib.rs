//! The SPIFFE standards in code: SPIFFE IDs and trust domains, X509-SVID and JWT-SVID rules, trust
//! bundles (JWKS) and bundle maps, and Workload API endpoint addresses.
//!
//! Pure: no I/O, no clocks (callers pass `now`), no async. Every parser here takes untrusted input
//! and returns an error naming the rule broken and the standard section; none may panic.
//! Certificate *chain* verification (signatures, validity, path building) is not here: it lives in
//! `tessera-tls`, the one place that verifies certificates for the whole project, which calls
//! [`x509::validate_svid_chain`] for the SPIFFE rules.

pub mod bundle;
pub mod endpoint;
pub mod id;
mod json;
pub mod jwt;
pub mod selector;
mod text;
pub mod x509;

pub use bundle::{Bundle, BundleError, BundleSet, BundleSource, JwtKey};
pub use endpoint::{EndpointAddr, EndpointError};
pub use id::{IdError, SpiffeId, TrustDomain};
pub use jwt::{JwtError, JwtSvid};
pub use selector::{Selector, SelectorError};
pub use text::abbreviate;
pub use x509::{X509SvidError, validate_svid_chain};
