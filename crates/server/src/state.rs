//! What every server endpoint shares.

use std::sync::Arc;

use tessera_spiffe::{SpiffeId, TrustDomain};
use tessera_store::Datastore;
use tokio::sync::watch;

use crate::ServerConfig;
use crate::audit::AuditLog;
use crate::ca::CaManager;
use crate::metrics::Metrics;

/// Wakes sync streams when a change with a newer revision has committed. Writers call `notify`
/// after their transaction; streams then read the feed after their last revision, so a lost or
/// coalesced wake-up never loses a change.
#[derive(Debug)]
pub(crate) struct Feed {
    tx: watch::Sender<u64>,
}

impl Feed {
    pub(crate) fn new(revision: u64) -> Self {
        Self {
            tx: watch::Sender::new(revision),
        }
    }

    pub(crate) fn notify(&self, revision: u64) {
        self.tx.send_if_modified(|cur| {
            if revision > *cur {
                *cur = revision;
                true
            } else {
                false
            }
        });
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) cfg: ServerConfig,
    pub(crate) td: TrustDomain,
    pub(crate) server_id: SpiffeId,
    pub(crate) store: Arc<dyn Datastore>,
    pub(crate) ca: CaManager,
    pub(crate) feed: Feed,
    /// What the agent API last read, for signing while the datastore is unreachable.
    pub(crate) memory: crate::memory::Memory,
    /// False while the datastore is known to be unreachable (PostgreSQL: the revision listener
    /// lost its session): the agent API then answers from memory without waiting on it.
    pub(crate) datastore_up: std::sync::atomic::AtomicBool,
    pub(crate) metrics: Metrics,
    pub(crate) audit: AuditLog,
    /// CA certificates that node certificates must chain to (x509pop); empty: x509pop off.
    pub(crate) x509pop_roots: Vec<Vec<u8>>,
    /// The parent given to entries created without one (`tessera dev` sets its embedded agent).
    pub(crate) default_parent: arc_swap::ArcSwapOption<SpiffeId>,
    /// SPIFFE IDs of entries marked admin: who may use the admin API over mTLS.
    pub(crate) admin_ids: arc_swap::ArcSwap<std::collections::HashSet<SpiffeId>>,
    /// Becomes true when the server shuts down; long-lived streams end on it.
    pub(crate) stopping: watch::Receiver<bool>,
    /// Wakes the rotation task after a forced CA step (`tessera authority ...`).
    pub(crate) rotation_wake: tokio::sync::Notify,
}

impl State {
    /// Records the outcome of an admin change in the audit log (and failures in the error
    /// metric), and passes it through: the one path every admin service audits through.
    pub(crate) fn audited<T>(
        &self,
        who: &crate::audit::Caller,
        what: &str,
        detail: serde_json::Value,
        result: Result<T, tonic::Status>,
    ) -> Result<T, tonic::Status> {
        let summary = result
            .as_ref()
            .map(|_| ())
            .map_err(|s| s.message().to_owned());
        self.audit.record(who, what, detail, &summary);
        if result.is_err() {
            self.metrics.error(what);
        }
        result
    }

    pub(crate) fn datastore_up(&self) -> bool {
        self.datastore_up.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub(crate) fn set_datastore_up(&self, up: bool) {
        self.datastore_up
            .store(up, std::sync::atomic::Ordering::SeqCst);
        self.metrics.datastore_up.set(i64::from(up));
    }

    /// Reloads the admin IDs after a change to entries.
    pub(crate) async fn refresh_admin_ids(&self) -> Result<(), tessera_store::StoreError> {
        let entries = self
            .store
            .list_entries(&tessera_store::EntryQuery::default())
            .await?;
        let ids = entries
            .into_iter()
            .filter(|e| e.admin)
            .map(|e| e.spiffe_id)
            .collect();
        self.admin_ids.store(Arc::new(ids));
        Ok(())
    }

    pub(crate) fn default_x509_ttl(&self) -> u32 {
        u32::try_from(self.cfg.svid.default_x509_ttl.0).unwrap_or(u32::MAX)
    }
    pub(crate) fn default_jwt_ttl(&self) -> u32 {
        u32::try_from(self.cfg.svid.default_jwt_ttl.0).unwrap_or(u32::MAX)
    }
}
