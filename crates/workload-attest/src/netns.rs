//! `netns:name:<name>`: the `ip netns` name of the caller's network namespace.
//!
//! `ip netns add NAME` bind-mounts a network namespace on `/run/netns/NAME`. A process is in that
//! namespace when `/proc/<pid>/ns/net` and `/run/netns/NAME` are the same nsfs inode (same device
//! and inode number). Only the name is emitted, never the inode: the kernel reuses namespace inode
//! numbers once a namespace is destroyed, so an entry naming an inode could later match a new,
//! unrelated namespace. A name is safe to compare at the moment of attestation because the bind
//! mount holds the named namespace alive, so its inode cannot have been reused while it is
//! mounted there.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Where `ip netns` keeps its names (iproute2's `NETNS_RUN_DIR`).
pub(crate) const NETNS_RUN_DIR: &str = "/run/netns";

/// Names in `dir` that are the namespace with this device and inode, sorted. A missing `dir`
/// means no named namespaces; an entry that cannot be examined (for instance deleted while we
/// list the directory) is skipped, since it names nothing we could match.
pub(crate) fn names_of(dir: &Path, dev: u64, ino: u64) -> io::Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry?;
        let Ok(meta) = std::fs::metadata(entry.path()) else {
            continue;
        };
        if meta.dev() == dev
            && meta.ino() == ino
            && let Some(name) = entry.file_name().to_str()
        {
            names.push(name.to_owned());
        }
    }
    names.sort();
    Ok(names)
}
