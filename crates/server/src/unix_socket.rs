//! A Unix socket path that a process claims for its listener: a stale socket file left by an
//! earlier run is replaced, a socket another live process serves on is never taken over, and the
//! file is removed at exit only while it is still the one this process bound.
//!
//! Taking over a live socket would silently send another process's clients (workloads, admin
//! commands) to this one, and removing it at exit would cut them off for good.

use std::os::unix::fs::{FileTypeExt as _, MetadataExt as _};
use std::path::{Path, PathBuf};

/// Makes `path` free for `bind`: nothing there, or a stale socket (no process accepts on it),
/// which is removed. A socket some process accepts on, or a file that is not a socket, is
/// refused with the reason.
pub fn claim(path: &Path) -> Result<(), String> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err("the path exists and is not a socket".into());
    }
    // Connecting to a socket nobody listens on fails at once (ECONNREFUSED); a listening one
    // accepts into its backlog even while its process is busy.
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err("another process is serving on this socket; stop it first".into());
    }
    std::fs::remove_file(path).map_err(|e| format!("removing the stale socket: {e}"))
}

/// The socket file a process bound, to remove when it stops.
#[derive(Debug, Clone)]
pub struct Bound {
    path: PathBuf,
    dev_ino: Option<(u64, u64)>,
}

impl Bound {
    /// Records the file now at `path` (call right after `bind`).
    pub fn record(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            dev_ino: std::fs::symlink_metadata(path)
                .ok()
                .map(|m| (m.dev(), m.ino())),
        }
    }

    /// Removes the socket file if it is still the one recorded: another process may have
    /// replaced it since (after this one stopped serving), and its file is not ours to remove.
    pub fn remove(&self) {
        if let (Ok(meta), Some((dev, ino))) = (std::fs::symlink_metadata(&self.path), self.dev_ino)
            && meta.dev() == dev
            && meta.ino() == ino
            && let Err(e) = std::fs::remove_file(&self.path)
        {
            tracing::warn!(path = %self.path.display(), error = %e, "removing the socket failed");
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_live_socket_is_refused_a_stale_one_replaced_and_only_ours_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        assert_eq!(claim(&path), Ok(()), "nothing there");

        let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let e = claim(&path).unwrap_err();
        assert!(e.contains("another process is serving"), "{e}");
        assert!(path.exists(), "the live socket was left alone");

        // Its listener gone, the file is stale: replaced.
        drop(live);
        assert_eq!(claim(&path), Ok(()));
        assert!(!path.exists());

        // Ours, then replaced by another process's: removing ours leaves theirs.
        let ours = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let bound = Bound::record(&path);
        drop(ours);
        // Moved aside, not deleted, so its inode number cannot be handed to the new file.
        std::fs::rename(&path, dir.path().join("moved.sock")).unwrap();
        let _theirs = std::os::unix::net::UnixListener::bind(&path).unwrap();
        bound.remove();
        assert!(path.exists(), "another process's socket was removed");
        Bound::record(&path).remove();
        assert!(!path.exists());

        std::fs::write(&path, "").unwrap();
        assert_eq!(
            claim(&path).unwrap_err(),
            "the path exists and is not a socket"
        );
    }
}
