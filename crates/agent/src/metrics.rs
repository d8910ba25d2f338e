//! The agent's Prometheus metrics, served on `/metrics` of the health endpoint.

use std::sync::{Arc, Mutex};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone)]
pub struct AgentMetrics {
    /// Open Workload API streams.
    pub streams: Gauge,
    /// X509-SVIDs held for workloads.
    pub svids_cached: Gauge,
    /// X509-SVIDs replaced before expiry (half-life, entry change, CA rotation).
    pub rotations: Counter,
    /// Workload API callers that could not be attested (process gone or replaced, /proc unreadable).
    pub attestation_failures: Counter,
    /// Workload API calls: time to the first response, in seconds.
    pub api_latency: Histogram,
    /// Open Envoy SDS streams (StreamSecrets).
    pub sds_streams: Gauge,
    /// SDS responses sent (stream pushes and FetchSecrets answers).
    pub sds_responses: Counter,
    /// SDS responses Envoy rejected (NACKs).
    pub sds_nacks: Counter,
    /// Moves to another server of the trust domain after losing the one in use.
    pub failovers: Counter,
}

impl AgentMetrics {
    pub fn new() -> (Arc<Self>, Arc<Mutex<Registry>>) {
        let m = Self {
            streams: Gauge::default(),
            svids_cached: Gauge::default(),
            rotations: Counter::default(),
            attestation_failures: Counter::default(),
            api_latency: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            sds_streams: Gauge::default(),
            sds_responses: Counter::default(),
            sds_nacks: Counter::default(),
            failovers: Counter::default(),
        };
        let mut r = Registry::with_prefix("tessera_agent");
        r.register(
            "workload_api_streams",
            "Open Workload API streams",
            m.streams.clone(),
        );
        r.register(
            "svids_cached",
            "X509-SVIDs held for workloads",
            m.svids_cached.clone(),
        );
        r.register(
            "svid_rotations",
            "X509-SVIDs replaced before expiry",
            m.rotations.clone(),
        );
        r.register(
            "workload_attestation_failures",
            "Workload API callers that could not be attested",
            m.attestation_failures.clone(),
        );
        r.register(
            "workload_api_first_response_seconds",
            "Time from a Workload API call to its first response",
            m.api_latency.clone(),
        );
        r.register(
            "sds_streams",
            "Open Envoy SDS (StreamSecrets) streams",
            m.sds_streams.clone(),
        );
        r.register(
            "sds_responses",
            "Envoy SDS responses sent",
            m.sds_responses.clone(),
        );
        r.register(
            "sds_nacks",
            "Envoy SDS responses rejected by Envoy (NACK)",
            m.sds_nacks.clone(),
        );
        r.register(
            "server_failovers",
            "Moves to another server after losing the one in use",
            m.failovers.clone(),
        );
        (Arc::new(m), Arc::new(Mutex::new(r)))
    }
}
