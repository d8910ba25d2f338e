//! The PostgreSQL revision listener: one session per server that LISTENs on the store's
//! channel and passes the newest announced revision on. Every commit that takes a revision
//! NOTIFYs it (see `Write::commit` in [`crate::sql`]), so followers on every server wake as a
//! change becomes visible, and an idle server issues no statement at all (no polling).
//!
//! A notification can be lost only with the session; after reconnecting, the listener reads the
//! current revision once, so followers catch up by revision and nothing is missed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::AnyPool;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;

/// Longest pause between reconnection attempts while the database is down.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

fn bump(tx: &watch::Sender<u64>, revision: u64) {
    tx.send_if_modified(|cur| {
        if revision > *cur {
            *cur = revision;
            true
        } else {
            false
        }
    });
}

/// Wakes the receivers only on a change (up ↔ down), not on every failed retry.
/// Also tells the store itself (`reachable`, see `SqlStore::begin_write`), which then refuses
/// writes at once instead of waiting out the pool's acquire timeout.
fn set(connected: &watch::Sender<bool>, reachable: &AtomicBool, up: bool) {
    reachable.store(up, Ordering::SeqCst);
    connected.send_if_modified(|cur| {
        let differs = *cur != up;
        *cur = up;
        differs
    });
}

async fn current_revision(pool: &AnyPool) -> Result<u64, sqlx::Error> {
    let v: i64 = sqlx::query_scalar("SELECT value FROM revision WHERE id = 1")
        .fetch_one(pool)
        .await?;
    Ok(u64::try_from(v).unwrap_or(0))
}

/// Listens until every receiver of `tx` is gone, reconnecting (with backoff) whenever the
/// session is lost.
pub(crate) async fn run(
    options: PgPool,
    channel: String,
    pool: AnyPool,
    tx: watch::Sender<u64>,
    connected: watch::Sender<bool>,
    reachable: Arc<AtomicBool>,
) {
    // When this task ends nobody watches any more: the store goes back to trying every write.
    struct Reset(Arc<AtomicBool>);
    impl Drop for Reset {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
    let _reset = Reset(reachable.clone());
    let mut backoff = Duration::from_millis(100);
    let mut was_down = false;
    loop {
        let session = async {
            let mut listener = PgListener::connect_with(&options).await?;
            // A lost session must come back here at once (Ok(None)), not be retried inside
            // try_recv: the server has to learn now that the database is gone.
            listener.eager_reconnect(false);
            listener.listen(&channel).await?;
            // Listening from here on; what committed before is read by revision.
            bump(&tx, current_revision(&pool).await?);
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = tx.closed() => return,
            r = session => match r {
                Ok(l) => l,
                Err(e) => {
                        set(&connected, &reachable, false);
                    if !was_down {
                        tracing::warn!(error = %e, "revision listener: database unreachable; retrying");
                        was_down = true;
                    }
                    tokio::select! {
                        () = tx.closed() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            },
        };
        set(&connected, &reachable, true);
        if was_down {
            tracing::info!("revision listener: listening again");
            was_down = false;
        }
        backoff = Duration::from_millis(100);
        loop {
            tokio::select! {
                () = tx.closed() => return,
                n = listener.try_recv() => match n {
                    Ok(Some(n)) => match n.payload().parse::<u64>() {
                        Ok(revision) => bump(&tx, revision),
                        Err(_) => tracing::warn!(payload = n.payload(), "revision listener: ignored a notification that is not a revision"),
                    },
                    // The session was lost (notifications in between with it): start over,
                    // which reads the current revision again.
                    Ok(None) => {
                        set(&connected, &reachable, false);
                        break;
                    }
                    Err(e) => {
                        set(&connected, &reachable, false);
                        tracing::warn!(error = %e, "revision listener: session lost; reconnecting");
                        break;
                    }
                }
            }
        }
    }
}
