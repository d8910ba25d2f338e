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

/// `nsfs`'s filesystem magic (linux/magic.h): namespace files live there.
const NSFS_MAGIC: i64 = 0x6e73_6673;

/// The `netns:name:<name>` selectors of a network namespace handed over as a file descriptor
/// (node-mode enrollment: a CNI plugin passes the workload's namespace with SCM_RIGHTS).
///
/// The descriptor must be a *network* namespace: an nsfs file (`fstatfs`) that `setns` accepts
/// as `CLONE_NEWNET` — a mount or user namespace, or any other file, is refused, since the caller would otherwise have the agent vouch for something else. The
/// names are found by device and inode under `/run/netns` (see the module's note on why only
/// names are emitted); a namespace without a name there is refused, as no `netns:name:`
/// selector could describe it. The descriptor stays open with the caller of this function,
/// which pins the namespace: its inode cannot be reused while it is held.
pub fn netns_selectors_of_fd(
    fd: std::os::fd::BorrowedFd<'_>,
) -> Result<(Vec<tessera_spiffe::Selector>, u64, u64), String> {
    let fs = nix::sys::statfs::fstatfs(fd).map_err(|e| format!("fstatfs: {e}"))?;
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let magic = fs.filesystem_type().0 as i64;
    if magic != NSFS_MAGIC {
        return Err(
            "not a namespace file (expected a descriptor of /run/netns/NAME or /proc/PID/ns/net)"
                .into(),
        );
    }
    // The namespace's type: `setns(fd, CLONE_NEWNET)` fails with EINVAL for any other kind of
    // namespace (setns(2)). It is done on a short-lived thread of its own, so no thread that
    // does anything else ever changes namespace (NS_GET_NSTYPE would need an unsafe ioctl).
    std::thread::scope(|s| {
        s.spawn(|| nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET))
            .join()
            .map_err(|_| "checking the namespace type failed".to_owned())?
            .map_err(|e| match e {
                nix::errno::Errno::EINVAL => {
                    "not a network namespace (another kind of namespace)".to_owned()
                }
                e => format!("checking the namespace type: {e}"),
            })
    })?;
    let st = nix::sys::stat::fstat(fd).map_err(|e| format!("fstat: {e}"))?;
    #[allow(clippy::unnecessary_cast, clippy::useless_conversion)]
    let (dev, ino) = (st.st_dev as u64, st.st_ino as u64);
    let names = names_of(NETNS_RUN_DIR.as_ref(), dev, ino)
        .map_err(|e| format!("listing {NETNS_RUN_DIR}: {e}"))?;
    if names.is_empty() {
        return Err(format!(
            "the network namespace has no name under {NETNS_RUN_DIR} (`ip netns add NAME`, or a CNI's bind mount), so no netns:name selector can describe it"
        ));
    }
    let selectors = names
        .iter()
        .map(|n| tessera_spiffe::Selector::new("netns", &format!("name:{n}")))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("namespace name: {e}"))?;
    Ok((selectors, dev, ino))
}

/// The network namespace's cookie (`SO_NETNS_COOKIE`, Linux 5.14): a 64-bit number the kernel
/// gives each network namespace from a counter, never given to another while the system runs
/// (unlike its inode number, which is reused once the namespace is gone). Read from a socket
/// made inside the namespace, on a short-lived thread of its own (see
/// [`netns_selectors_of_fd`]).
///
/// Why: device and inode alone cannot tell an enrolled namespace from a later one. While the
/// agent is down nothing pins the namespace; deleted and created again under the same name, the
/// new one may get the freed inode number, and would be restored as the old workload (its
/// selectors and keys). Unlike a mount ID, the cookie is the namespace's own, the same seen from
/// any mount namespace (an agent in a container sees new mounts after each restart).
pub fn netns_cookie(fd: std::os::fd::BorrowedFd<'_>) -> Result<u64, String> {
    std::thread::scope(|s| {
        s.spawn(|| -> Result<u64, String> {
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("entering the namespace: {e}"))?;
            let sock = nix::sys::socket::socket(
                nix::sys::socket::AddressFamily::Unix,
                nix::sys::socket::SockType::Datagram,
                nix::sys::socket::SockFlag::SOCK_CLOEXEC,
                None,
            )
            .map_err(|e| format!("a socket in the namespace: {e}"))?;
            netns_cookie_of(std::os::fd::AsFd::as_fd(&sock))
                .map_err(|e| format!("SO_NETNS_COOKIE (Linux 5.14+): {e}"))
        })
        .join()
        .map_err(|_| "reading the namespace cookie failed".to_owned())?
    })
}

/// `getsockopt(SOL_SOCKET, SO_NETNS_COOKIE)`: not wrapped by nix 0.30 nor rustix 1.
#[allow(unsafe_code)]
fn netns_cookie_of(sock: std::os::fd::BorrowedFd<'_>) -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<u64>())
        .map_err(|_| io::Error::other("socklen"))?;
    // SAFETY: the socket is borrowed, so it stays open for the call; `cookie` is a live u64 and
    // `len` says exactly its size, so the kernel writes at most 8 bytes into it and the new
    // length into `len`.
    let ret = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast::<libc::c_void>(),
            &raw mut len,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// This boot's ID (`/proc/sys/kernel/random/boot_id`): namespace cookies count from 1 again
/// after a reboot, and no namespace survives one.
pub fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}
