//! What a server learns from the revision feed about changes other servers made: several
//! servers of one trust domain share one datastore, so a bundle published or an admin entry
//! created through one must reach the others' in-memory state (their mTLS trust, the tainted
//! set pushed to agents, the admin IDs). On PostgreSQL the store's LISTEN task wakes this
//! follower (and every sync stream, through the [`Feed`](crate::state::Feed)) as each change
//! commits; the follower then reads the changes by revision, so a lost notification costs
//! nothing but time. An idle server reads nothing.

use std::sync::Arc;

use tessera_store::{EventKind, StoreError};
use tessera_tls::SharedBundles;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::state::State;

/// More changed entries and agents than this in one read of the feed: reload them all.
const BULK_RELOAD: usize = 200;

/// After a failed reload: wait for the next wake-up (or a second) before trying again.
async fn continue_after_error(wake: &mut watch::Receiver<u64>) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), wake.changed()).await;
}

/// Most events one read of the feed gathers (pages of 1,000): far behind (a bulk import), the
/// follower reloads memory once for all of them instead of once per page.
const MAX_GATHER: usize = 100_000;

/// Every event after `revision`, up to [`MAX_GATHER`].
async fn read_pending(
    state: &State,
    revision: u64,
) -> Result<Vec<tessera_store::Event>, StoreError> {
    let mut events = state.store.events_after(revision, 1000).await?;
    while events.len() % 1000 == 0 && !events.is_empty() && events.len() < MAX_GATHER {
        let after = events.last().map_or(revision, |e| e.revision);
        let more = state.store.events_after(after, 1000).await?;
        if more.is_empty() {
            break;
        }
        events.extend(more);
    }
    Ok(events)
}

/// Reloads what depends on our trust domain's bundle: the CA's view of the other servers and
/// the trust the mTLS endpoints verify clients with.
async fn reload_trust(state: &State, bundles: &SharedBundles) {
    match state.ca.refresh(&state.store).await {
        Ok(()) => match crate::run::own_bundles(state) {
            Ok(set) => bundles.store(Arc::new(set)),
            Err(e) => tracing::error!(error = %e, "cannot build the trust bundle"),
        },
        Err(e) => tracing::warn!(error = %e, "cannot re-read the servers' authorities"),
    }
}

/// Starts the follower. `listener`: the store's revision notifications (PostgreSQL).
pub(crate) fn spawn(
    state: Arc<State>,
    bundles: SharedBundles,
    mut stop: watch::Receiver<bool>,
    listener: Option<tessera_store::RevisionListener>,
) -> JoinHandle<()> {
    let (mut listener, mut connected) = match listener {
        Some(l) => (Some(l.revisions), Some(l.connected)),
        None => (None, None),
    };
    tokio::spawn(async move {
        let mut wake = state.feed.subscribe();
        let mut last = *wake.borrow_and_update();
        loop {
            match read_pending(&state, last).await {
                Ok(events) if !events.is_empty() => {
                    let mut trust = false;
                    let mut entries = false;
                    // A burst (a batch import, say) is cheaper reloaded whole, a page of
                    // thousands at a time, than re-read one object per event.
                    let changed_objects = events
                        .iter()
                        .filter(|e| {
                            e.kind.as_str().starts_with("entry")
                                || e.kind.as_str().starts_with("agent")
                        })
                        .count();
                    let bulk = changed_objects > BULK_RELOAD;
                    if bulk && let Err(e) = crate::run::load_memory(&state).await {
                        tracing::warn!(error = %e, "cannot reload entries and agents");
                        // Nothing applied: read the same events again on the next wake.
                        continue_after_error(&mut wake).await;
                        continue;
                    }
                    // A re-read that fails (the database went away mid-batch) leaves memory
                    // behind: the batch is read again rather than skipped.
                    let from = last;
                    let mut failed = false;
                    for ev in &events {
                        last = ev.revision;
                        match ev.kind {
                            EventKind::BundleUpdated | EventKind::BundleDeleted
                                if ev.key == state.td.as_str() =>
                            {
                                trust = true;
                            }
                            EventKind::EntryCreated
                            | EventKind::EntryUpdated
                            | EventKind::EntryDeleted
                                if bulk =>
                            {
                                entries = true
                            }
                            EventKind::EntryCreated
                            | EventKind::EntryUpdated
                            | EventKind::EntryDeleted => {
                                match state.store.get_entry(&ev.key).await {
                                    Ok(found) => {
                                        entries |= state.memory.set_entry(&ev.key, found);
                                    }
                                    Err(e) => {
                                        tracing::warn!(error = %e, entry = ev.key, "cannot re-read a changed entry");
                                        failed = true;
                                    }
                                }
                            }
                            EventKind::AgentCreated
                            | EventKind::AgentUpdated
                            | EventKind::AgentBanned
                            | EventKind::AgentUnbanned
                            | EventKind::AgentDeleted
                                if !bulk =>
                            {
                                match tessera_spiffe::SpiffeId::parse(&ev.key) {
                                    Ok(id) => match state.store.get_agent(&id).await {
                                        Ok(found) => state.memory.set_agent(&ev.key, found),
                                        Err(e) => {
                                            tracing::warn!(error = %e, agent = ev.key, "cannot re-read a changed agent");
                                            failed = true;
                                        }
                                    },
                                    Err(_) => state.memory.set_agent(&ev.key, None),
                                }
                            }
                            _ => {}
                        }
                    }
                    if failed {
                        last = from;
                        continue_after_error(&mut wake).await;
                        continue;
                    }
                    if trust {
                        reload_trust(&state, &bundles).await;
                    }
                    // Memory is current up to `last`: the sync streams may read it now.
                    state.applied.push(&events);
                    // An admin entry changed: the admin IDs, from memory.
                    if entries {
                        state
                            .admin_ids
                            .store(std::sync::Arc::new(state.memory.admin_ids()));
                    }
                    continue;
                }
                Ok(_) => {}
                Err(StoreError::Compacted { .. } | StoreError::FutureRevision { .. }) => {
                    // Too far behind (or a restored database): reload everything instead.
                    if let Ok(current) = state.store.current_revision().await {
                        if let Err(e) = crate::run::load_memory(&state).await {
                            tracing::warn!(error = %e, "cannot reload entries and agents");
                        }
                        reload_trust(&state, &bundles).await;
                        if let Err(e) = state.refresh_admin_ids().await {
                            tracing::warn!(error = %e, "cannot reload the admin IDs");
                        }
                        last = current;
                        state.applied.reset(current);
                        continue;
                    }
                }
                // The database is unreachable: wait for the next wake-up (the listener wakes
                // everyone once it is back) and read from the same revision again.
                Err(e) => tracing::warn!(error = %e, "cannot read the revision feed"),
            }
            let listen = async {
                match &mut listener {
                    Some(rx) => rx.changed().await.map(|()| *rx.borrow_and_update()),
                    None => std::future::pending().await,
                }
            };
            let up = async {
                match &mut connected {
                    Some(rx) => rx.changed().await.map(|()| *rx.borrow_and_update()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                changed = wake.changed() => if changed.is_err() { return },
                up = up => match up {
                    Ok(up) => {
                        if up {
                            tracing::info!("datastore reachable again: resuming");
                        } else {
                            tracing::warn!("datastore unreachable: serving agents from memory, refusing changes");
                        }
                        state.set_datastore_up(up);
                    }
                    Err(_) => connected = None,
                },
                revision = listen => match revision {
                    Ok(rev) => {
                        // Wakes every sync stream of this server; this loop reads now.
                        state.feed.notify(rev);
                        wake.borrow_and_update();
                    }
                    Err(_) => listener = None,
                },
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    })
}
