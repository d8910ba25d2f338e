//! Files the proxy reads again while it runs: the local policy file (`crate::live`) and the
//! config file's destination map (`crate::run`). One loop for both: the file's text is checked
//! every second and on SIGHUP (which forces a read), and each new text is handed to `apply`
//! once. What `apply` refuses leaves what is in force untouched; the error is logged once per
//! distinct bad text, naming the file.

use std::path::PathBuf;
use std::time::Duration;

/// A file as the proxy was started with it.
#[derive(Debug, Clone)]
pub struct WatchedFile {
    pub path: PathBuf,
    /// How logs name it.
    pub name: String,
    /// The text in force.
    pub loaded: String,
}

/// Calls `apply` with the file's text each time it changes (or on SIGHUP), forever. `apply`
/// returns `Err` to refuse a text; the text in force then stays.
pub async fn watch(file: WatchedFile, mut apply: impl FnMut(&str) -> Result<(), String>) {
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(|e| tracing::warn!(file = %file.name, error = %e, "no SIGHUP reload"))
        .ok();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    // The text last tried, good or bad (`None`: unreadable): an unchanged bad file is
    // reported once.
    let mut tried = Some(file.loaded.clone());
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async {
                match hup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let text = match std::fs::read_to_string(&file.path) {
            Ok(t) => t,
            Err(e) => {
                if forced || tried.is_some() {
                    tracing::error!(file = %file.name, error = %e, "not readable; what is in force stays");
                }
                tried = None;
                continue;
            }
        };
        if tried.as_ref() == Some(&text) && !forced {
            continue;
        }
        match apply(&text) {
            Ok(()) => tracing::info!(file = %file.name, "reloaded"),
            Err(e) => {
                tracing::error!(file = %file.name, error = %e, "not reloaded; what is in force stays");
            }
        }
        tried = Some(text);
    }
}
