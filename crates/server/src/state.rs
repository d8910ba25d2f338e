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

/// The changes this server's follower has applied to memory (see `follow.rs`), for sync
/// streams: they read the recent events and entries from here, so a change costs one read of
/// the feed per server, not one per connected agent.
#[derive(Debug)]
pub(crate) struct Applied {
    /// The revision up to which memory is current.
    tx: watch::Sender<u64>,
    /// The most recent events, contiguous, oldest first.
    recent: std::sync::Mutex<std::collections::VecDeque<tessera_store::Event>>,
}

/// Recent events kept for sync streams; a stream further behind reads the datastore.
const RECENT_EVENTS: usize = 10_000;

impl Applied {
    pub(crate) fn new(revision: u64) -> Self {
        Self {
            tx: watch::Sender::new(revision),
            recent: std::sync::Mutex::new(std::collections::VecDeque::new()),
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    pub(crate) fn revision(&self) -> u64 {
        *self.tx.borrow()
    }

    /// Records events applied to memory (in revision order) and wakes the streams.
    pub(crate) fn push(&self, events: &[tessera_store::Event]) {
        let Some(last) = events.last().map(|e| e.revision) else {
            return;
        };
        {
            let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
            for ev in events {
                // Keep the ring contiguous: a gap (never expected) starts it over.
                if recent.back().is_some_and(|b| b.revision + 1 != ev.revision) {
                    recent.clear();
                }
                recent.push_back(ev.clone());
            }
            while recent.len() > RECENT_EVENTS {
                recent.pop_front();
            }
        }
        self.tx.send_if_modified(|cur| {
            let newer = last > *cur;
            if newer {
                *cur = last;
            }
            newer
        });
    }

    /// Forgets the recent events (after reloading everything) and moves to `revision`.
    pub(crate) fn reset(&self, revision: u64) {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.tx.send_if_modified(|cur| {
            let newer = revision > *cur;
            if newer {
                *cur = revision;
            }
            newer
        });
    }

    /// Up to `limit` events after `revision` from memory, or `None` when memory does not reach
    /// back that far (the caller reads the datastore instead).
    pub(crate) fn events_after(
        &self,
        revision: u64,
        limit: usize,
    ) -> Option<Vec<tessera_store::Event>> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let applied = *self.tx.borrow();
        if revision >= applied {
            return Some(Vec::new());
        }
        let first = recent.front()?.revision;
        if first > revision + 1 {
            return None;
        }
        let skip = usize::try_from(revision + 1 - first).ok()?;
        Some(recent.iter().skip(skip).take(limit).cloned().collect())
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
    pub(crate) applied: Applied,
    /// False while the datastore is known to be unreachable (PostgreSQL: the revision listener
    /// lost its session): the agent API then answers from memory without waiting on it.
    pub(crate) datastore_up: std::sync::atomic::AtomicBool,
    /// The policies last read from the datastore, for Sync snapshots while it is unreachable
    /// (writes are refused then, so no newer policy can have been accepted by this server).
    /// `None` until the first read: never-read is not the same as no policies.
    pub(crate) policies_seen: arc_swap::ArcSwapOption<Vec<tessera_proto::v1::StoredPolicy>>,
    /// The destination map last read, for the same reason.
    pub(crate) destinations_seen:
        arc_swap::ArcSwapOption<Vec<tessera_proto::v1::StoredDestination>>,
    /// The state of every `[[policy.sync]]` source (this server's polls).
    pub(crate) policy_sync: crate::policy_sync::SyncStatuses,
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

/// What a Sync snapshot carries of a list read from the datastore (policies, destinations):
/// the list just read, remembered in `seen`; or, while the datastore is known to be
/// unreachable, the list last read (issue 8: sync streams are served from memory then; writes
/// are refused, so no newer item can have been accepted by this server). `None` in `seen`:
/// never read, which is not the same as empty.
pub(crate) fn read_or_seen<T: Clone>(
    state: &State,
    read: Result<Vec<T>, tessera_store::StoreError>,
    seen: &arc_swap::ArcSwapOption<Vec<T>>,
) -> Result<Vec<T>, tonic::Status> {
    match read {
        Ok(list) => {
            seen.store(Some(std::sync::Arc::new(list.clone())));
            Ok(list)
        }
        Err(e) => match seen.load_full() {
            Some(last) if !state.datastore_up() => Ok(last.as_ref().clone()),
            _ => Err(crate::convert::store_status(e)),
        },
    }
}
