//! Files the proxy reads again while it runs: the local policy file (`crate::live`) and the
//! config file's destination map (`crate::run`). One loop for both: the file's text is checked
//! every second and on SIGHUP (which forces a read), and each new text is handed to `apply`
//! once. What `apply` refuses leaves what is in force untouched; the error is logged once per
//! distinct bad text, naming the file.

use std::path::PathBuf;
use std::time::Duration;

/// How long a changed text must stay the same before it is applied.
const SETTLE: Duration = Duration::from_millis(250);

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
        // A file rewritten in place (truncated, then written) can be read half-written, and a
        // half-written policy list or destination map may still parse, as a shorter one: a
        // dropped DENY, or a destination that turns unmapped. A text is applied only once it
        // reads the same after a pause; one still changing is seen again at the next check.
        tokio::time::sleep(SETTLE).await;
        if std::fs::read_to_string(&file.path).ok().as_ref() != Some(&text) {
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

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A file written slowly in place (each state lasting less than the settle time) is never
    /// applied half-written; its final text is, once.
    #[tokio::test(start_paused = true)]
    async fn a_file_still_being_written_is_not_applied_until_it_settles() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.yaml");
        std::fs::write(&path, "first").unwrap();
        let applied = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = applied.clone();
        let file = WatchedFile {
            path: path.clone(),
            name: "test file".into(),
            loaded: "first".into(),
        };
        let task = tokio::spawn(watch(file, move |text| {
            seen.lock().unwrap().push(text.to_owned());
            Ok(())
        }));
        // Three seconds of a growing file, a new state every 100 ms: every check reads it
        // mid-write.
        let mut text = String::new();
        for i in 0..30 {
            text.push_str(&format!("part {i}\n"));
            std::fs::write(&path, &text).unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            applied.lock().unwrap().is_empty(),
            "applied mid-write: {:?}",
            applied.lock().unwrap()
        );
        std::fs::write(&path, "final").unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(*applied.lock().unwrap(), vec!["final".to_owned()]);
        task.abort();
    }
}
