//! Federation with other trust domains (SPIFFE Federation; SPIFFE Trust Domain and Bundle §5).
//!
//! - [`endpoint`]: our bundle endpoint, serving the latest own bundle over HTTPS in the
//!   `https_web` or `https_spiffe` profile.
//! - [`rules`] (pure): which fetched bundles are accepted and when the next fetch is due.
//! - [`fetch`]: one HTTPS GET of a federated trust domain's bundle endpoint, authenticated as the
//!   relationship's profile says (all TLS configuration comes from `tessera_tls`).
//! - [`refresher`]: keeps every federated bundle fresh. Each accepted bundle is stored (one
//!   revision), which wakes the agents' sync streams, which push it to the workloads.
//! - [`api`]: the `FederationApi` admin service (relationships and static bundles).
//!
//! Data flow: relationship (store) → refresher fetches → `set_bundle` (revision feed) → agent
//! `Sync` → agent cache → Workload API streams. Nothing polls but the refresher, whose interval
//! is the federated trust domain's `spiffe_refresh_hint` within our floor and ceiling.

pub(crate) mod api;
pub(crate) mod endpoint;
pub(crate) mod fetch;
pub(crate) mod needs;
pub(crate) mod refresher;
pub(crate) mod rules;
