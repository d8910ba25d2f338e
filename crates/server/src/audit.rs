//! The audit log: one JSON line per change made through the admin API — who (the caller's uid and
//! pid from the Unix socket's peer credentials), what, when, and the result.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;

#[derive(Debug)]
pub(crate) struct AuditLog {
    path: PathBuf,
    lock: Mutex<()>,
}

/// Who made a request on the admin socket.
#[derive(Debug, Clone, Default)]
pub(crate) struct Caller {
    pub(crate) uid: Option<u32>,
    pub(crate) pid: Option<i32>,
    /// Over mTLS: the caller's SPIFFE ID.
    pub(crate) spiffe_id: Option<String>,
}

impl AuditLog {
    pub(crate) fn new(path: PathBuf) -> Self {
        Self {
            path,
            lock: Mutex::new(()),
        }
    }

    /// Appends one record. A failure to write is logged, and the change it describes is already
    /// made; the error log then is the record of the missing line.
    pub(crate) fn record(
        &self,
        who: &Caller,
        what: &str,
        detail: serde_json::Value,
        result: &Result<(), String>,
    ) {
        let line = serde_json::json!({
            "time": crate::ca::unix_now(),
            "uid": who.uid,
            "pid": who.pid,
            "spiffe_id": who.spiffe_id,
            "action": what,
            "detail": detail,
            "result": match result { Ok(()) => "ok".to_owned(), Err(e) => format!("error: {e}") },
        });
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&self.path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            tracing::error!(path = %self.path.display(), error = %e, audit = %line, "cannot write the audit log");
        }
        tracing::info!(target: "audit", action = what, uid = ?who.uid, spiffe_id = ?who.spiffe_id, ok = result.is_ok(), "admin change");
    }
}
