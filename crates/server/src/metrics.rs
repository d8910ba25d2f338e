//! The server's Prometheus metrics.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ErrorLabels {
    pub(crate) api: String,
}

#[derive(Debug, Clone)]
pub(crate) struct Metrics {
    pub(crate) svids_signed: Counter,
    pub(crate) sign_seconds: Histogram,
    pub(crate) entries: Gauge,
    pub(crate) agents: Gauge,
    pub(crate) sync_streams: Gauge,
    pub(crate) errors: Family<ErrorLabels, Counter>,
    pub(crate) datastore_up: Gauge,
}

impl Metrics {
    pub(crate) fn new() -> (Self, Arc<Mutex<Registry>>) {
        let m = Self {
            svids_signed: Counter::default(),
            sign_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 14)),
            entries: Gauge::default(),
            agents: Gauge::default(),
            sync_streams: Gauge::default(),
            errors: Family::default(),
            datastore_up: Gauge::default(),
        };
        let mut r = Registry::with_prefix("tessera_server");
        r.register("svids_signed", "X509-SVIDs signed", m.svids_signed.clone());
        r.register(
            "sign_seconds",
            "Time to sign one X509-SVID from a CSR",
            m.sign_seconds.clone(),
        );
        r.register("entries", "Registration entries", m.entries.clone());
        r.register("agents", "Attested agents", m.agents.clone());
        r.register(
            "sync_streams",
            "Open agent sync streams",
            m.sync_streams.clone(),
        );
        r.register("errors", "Failed API calls", m.errors.clone());
        r.register(
            "datastore_up",
            "1 when the datastore answers",
            m.datastore_up.clone(),
        );
        (m, Arc::new(Mutex::new(r)))
    }

    pub(crate) fn error(&self, api: &str) {
        self.errors
            .get_or_create(&ErrorLabels {
                api: api.to_owned(),
            })
            .inc();
    }
}
