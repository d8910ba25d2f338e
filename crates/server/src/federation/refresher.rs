//! Keeps every federated bundle fresh: one task per relationship fetches at once, then at the
//! bundle's refresh hint (within the configured floor and ceiling), and after a failure again
//! with backoff, keeping the last good bundle. A manager follows the revision feed and starts,
//! restarts (on update) or stops (on delete) those tasks, so a relationship created on any server
//! sharing the datastore is picked up without polling.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tessera_spiffe::{Bundle, BundleSet, TrustDomain};
use tessera_store::model::{EventKind, FederationStatus};
use tessera_store::{FederationRelationship, StoreError};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::fetch;
use super::rules::{Schedule, accept_bundle};
use crate::state::State;

pub(crate) fn schedule(state: &State) -> Schedule {
    let f = &state.cfg.federation;
    Schedule {
        floor: f.refresh_floor.0,
        ceiling: f.refresh_ceiling.0,
        default: f.default_refresh.0,
    }
}

fn now_i64() -> i64 {
    i64::try_from(crate::ca::unix_now()).unwrap_or(i64::MAX)
}

/// Every stored bundle, parsed: what an https_spiffe endpoint is authenticated against.
async fn stored_bundles(state: &State) -> Result<BundleSet, String> {
    let mut set = BundleSet::new();
    for b in state
        .store
        .list_bundles()
        .await
        .map_err(|e| format!("datastore: {e}"))?
    {
        if let Ok(parsed) = Bundle::parse(b.trust_domain.clone(), &b.bundle_json) {
            set.upsert(parsed);
        }
    }
    Ok(set)
}

/// Fetches, checks and stores the bundle of `rel`: returns it, or why not.
async fn fetch_and_store(state: &State, rel: &FederationRelationship) -> Result<Bundle, String> {
    let tls = fetch::client_config(rel, stored_bundles(state).await?)?;
    let timeout = Duration::from_secs(state.cfg.federation.fetch_timeout.0);
    let body = fetch::get(&rel.bundle_endpoint_url, tls, timeout).await?;
    let bundle = accept_bundle(&rel.trust_domain, &body, crate::ca::unix_now())?;
    let td = &rel.trust_domain;
    let stored = state
        .store
        .get_bundle(td)
        .await
        .map_err(|e| format!("datastore: {e}"))?
        .and_then(|b| Bundle::parse(td.clone(), &b.bundle_json).ok());
    // Stored only when it changed: an unchanged bundle makes no revision and wakes nobody.
    if stored.as_ref() != Some(&bundle) {
        let rev = state
            .store
            .set_bundle(td, &body)
            .await
            .map_err(|e| format!("storing the bundle: {e}"))?;
        state.feed.notify(rev);
        tracing::info!(trust_domain = %td, sequence = ?bundle.sequence, "federated bundle updated");
    }
    Ok(bundle)
}

/// One refresh of the relationship with `td`, recorded in its fetch status. Returns the new
/// status and whether the fetch succeeded, with the bundle's refresh hint.
pub(crate) async fn refresh_one(
    state: &State,
    td: &TrustDomain,
    failures: u32,
) -> Result<(FederationStatus, Result<Option<u64>, String>), StoreError> {
    let Some(rel) = state.store.get_federation_relationship(td).await? else {
        return Err(StoreError::NotFound {
            what: format!("federation relationship with {td}"),
        });
    };
    let mut status = state
        .store
        .get_federation_status(td)
        .await?
        .unwrap_or_default();
    let now = now_i64();
    status.last_attempt_at = Some(now);
    let sched = schedule(state);
    let outcome = fetch_and_store(state, &rel)
        .await
        .map_err(|e| crate::bounded_error(&e).into_owned());
    let wait = match &outcome {
        Ok(b) => {
            status.last_success_at = Some(now);
            sched.after_success(b.refresh_hint)
        }
        Err(e) => {
            tracing::warn!(trust_domain = %td, error = %e, "cannot refresh the federated bundle; keeping the last good one");
            status.last_error = Some(e.clone());
            status.last_error_at = Some(now);
            sched.after_failure(failures.saturating_add(1))
        }
    };
    status.next_refresh_at = Some(now.saturating_add(i64::try_from(wait).unwrap_or(i64::MAX)));
    match state.store.set_federation_status(td, &status).await {
        // Deleted while we fetched: nothing to record.
        Ok(()) | Err(StoreError::NotFound { .. }) => {}
        Err(e) => return Err(e),
    }
    Ok((status, outcome.map(|b| b.refresh_hint)))
}

/// The task of one relationship: fetch now, then as scheduled, until stopped.
async fn run_one(state: Arc<State>, td: TrustDomain, mut stop: watch::Receiver<bool>) {
    let sched = schedule(&state);
    let mut failures = 0u32;
    loop {
        let wait = match refresh_one(&state, &td, failures).await {
            Ok((_, Ok(hint))) => {
                failures = 0;
                sched.after_success(hint)
            }
            Ok((_, Err(_))) => {
                failures = failures.saturating_add(1);
                sched.after_failure(failures)
            }
            Err(StoreError::NotFound { .. }) => return,
            Err(e) => {
                tracing::error!(trust_domain = %td, error = %e, "federation refresh: datastore error");
                failures = failures.saturating_add(1);
                sched.after_failure(failures)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(wait)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Starts the manager: one refresh task per relationship, kept in step with the revision feed.
pub(crate) fn spawn(state: Arc<State>, stop: watch::Receiver<bool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tasks: HashMap<TrustDomain, (FederationRelationship, JoinHandle<()>)> =
            HashMap::new();
        let mut wake = state.feed.subscribe();
        let mut stopping = stop.clone();
        let mut last = 0u64;
        let mut resync = true;
        loop {
            let mut more = false;
            if !resync {
                // Only federation events matter; anything else is skipped cheaply.
                match state.store.events_after(last, 1000).await {
                    Ok(events) => {
                        if let Some(ev) = events.last() {
                            last = ev.revision;
                        }
                        more = events.len() == 1000;
                        resync = events.iter().any(|e| {
                            matches!(
                                e.kind,
                                EventKind::FederationUpdated | EventKind::FederationDeleted
                            )
                        });
                    }
                    Err(_) => resync = true,
                }
            }
            if resync {
                match reconcile(&state, &mut tasks, &stop).await {
                    Ok(rev) => {
                        last = last.max(rev);
                        resync = false;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "federation: cannot list relationships; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                }
            }
            if more {
                continue;
            }
            tokio::select! {
                r = wake.changed() => if r.is_err() { break },
                _ = stopping.wait_for(|s| *s) => break,
            }
        }
        for (_, (_, t)) in tasks.drain() {
            t.abort();
        }
    })
}

/// Makes the running tasks match the stored relationships; returns the revision read at.
async fn reconcile(
    state: &Arc<State>,
    tasks: &mut HashMap<TrustDomain, (FederationRelationship, JoinHandle<()>)>,
    stop: &watch::Receiver<bool>,
) -> Result<u64, StoreError> {
    let rev = state.store.current_revision().await?;
    let rels = state.store.list_federation_relationships().await?;
    tasks.retain(|td, (_, t)| {
        let keep = rels.iter().any(|r| &r.trust_domain == td);
        if !keep {
            t.abort();
        }
        keep
    });
    for rel in rels {
        let same = tasks.get(&rel.trust_domain).is_some_and(|(r, _)| r == &rel);
        if same {
            continue;
        }
        if let Some((_, old)) = tasks.remove(&rel.trust_domain) {
            old.abort();
        }
        let t = tokio::spawn(run_one(
            state.clone(),
            rel.trust_domain.clone(),
            stop.clone(),
        ));
        tasks.insert(rel.trust_domain.clone(), (rel, t));
    }
    Ok(rev)
}
