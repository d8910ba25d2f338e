//! SHA-256 of a process's executable, cached by the file's identity and change times.
//!
//! The file is opened through `/proc/<pid>/exe`, which names the inode the process is running,
//! not whatever is at that path on disk now: replacing `/usr/bin/app` after the process started
//! must not change the hash the process is attested with.
//!
//! The cache key is (device, inode, size, mtime, ctime) of that inode. Any write to a file updates
//! its mtime and ctime, and ctime cannot be set from userspace, so changed content never hits a
//! stale entry (short of resetting the system clock, which needs root). A file larger than the
//! configured cap gets no hash at all: hashing a multi-gigabyte file per caller would let a
//! workload make the agent do unbounded work.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use aws_lc_rs::digest;
use nix::fcntl::{OFlag, openat};
use nix::sys::stat::Mode;

use crate::AttestError;

/// Entries kept before the cache is emptied and refilled (a node runs far fewer distinct binaries).
const MAX_ENTRIES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl Key {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

#[derive(Debug)]
pub(crate) struct ExeHasher {
    max_bytes: u64,
    cache: Mutex<HashMap<Key, [u8; 32]>>,
    computed: AtomicU64,
}

impl ExeHasher {
    pub(crate) fn new(max_bytes: u64) -> Self {
        Self {
            max_bytes,
            cache: Mutex::new(HashMap::new()),
            computed: AtomicU64::new(0),
        }
    }

    pub(crate) fn computed(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    /// Hex SHA-256 of the executable of the process whose `/proc` directory is `proc_dir`, or
    /// `None` when it is larger than the cap.
    pub(crate) fn sha256(
        &self,
        pid: i32,
        proc_dir: BorrowedFd<'_>,
    ) -> Result<Option<String>, AttestError> {
        let read_err = |source: io::Error| AttestError::Read {
            pid,
            what: "the executable (/proc/<pid>/exe)",
            source,
        };
        let fd: OwnedFd = openat(
            proc_dir,
            "exe",
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY | OFlag::O_NONBLOCK,
            Mode::empty(),
        )
        .map_err(|e| read_err(e.into()))?;
        let mut file = File::from(fd);
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(AttestError::Parse {
                pid,
                what: "/proc/<pid>/exe",
                detail: "not a regular file".to_owned(),
            });
        }
        if meta.size() > self.max_bytes {
            tracing::debug!(
                pid,
                size = meta.size(),
                max = self.max_bytes,
                "executable larger than the hashing cap: no unix:sha256 selector"
            );
            return Ok(None);
        }
        let key = Key::of(&meta);
        if let Some(hash) = self.lock().get(&key) {
            return Ok(Some(hex::encode(hash)));
        }

        let mut ctx = digest::Context::new(&digest::SHA256);
        let mut buf = vec![0_u8; 64 * 1024];
        let mut total: u64 = 0;
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_err(e)),
            };
            total += n as u64;
            if total > key.size {
                // Grew while we read: the key no longer describes what we hashed.
                return Err(AttestError::ExecutableChanged { pid });
            }
            ctx.update(buf.get(..n).unwrap_or_default());
        }
        let after = Key::of(&file.metadata().map_err(read_err)?);
        if total != key.size || after != key {
            return Err(AttestError::ExecutableChanged { pid });
        }
        let hash: [u8; 32] = ctx
            .finish()
            .as_ref()
            .try_into()
            .map_err(|_| read_err(io::Error::other("SHA-256 digest is not 32 bytes")))?;
        self.computed.fetch_add(1, Ordering::Relaxed);

        let mut cache = self.lock();
        if cache.len() >= MAX_ENTRIES {
            cache.clear();
        }
        cache.insert(key, hash);
        Ok(Some(hex::encode(hash)))
    }

    /// A panic elsewhere while holding the lock cannot leave the map half-updated (insert and
    /// clear are single calls), so a poisoned lock is still usable.
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, [u8; 32]>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
