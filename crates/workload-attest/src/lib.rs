//! Workload attestation: the one place that maps a Workload API caller to selectors.
//!
//! The agent serves the SPIFFE Workload API on a Unix socket. The Workload Endpoint standard (§5)
//! requires that callers are identified *without their participation*: a workload presents no
//! secret, the endpoint learns who it is from facts the kernel vouches for. Here those facts start
//! with the socket's peer credentials (`SO_PEERCRED`: pid, uid, gid) and continue with what
//! `/proc/<pid>` says about that process:
//!
//! | selector | from |
//! | --- | --- |
//! | `unix:uid:<uid>`, `unix:gid:<gid>` | the socket (effective ids at `connect`), re-checked in `/proc/<pid>/status` |
//! | `unix:user:<name>`, `unix:group:<name>` | the passwd / group database, when the id has an entry |
//! | `unix:supplementary_gid:<gid>` | each of the process's supplementary groups (`Groups:` in `status`) |
//! | `unix:path:<path>` | `/proc/<pid>/exe` as the kernel resolves it (a binary deleted since it started reads `<path> (deleted)`) |
//! | `unix:sha256:<hex>` | the content of the running executable, through `/proc/<pid>/exe`; none above the size cap |
//! | `netns:name:<name>` | `ip netns` names (bind mounts in `/run/netns`) of the process's network namespace; never its inode |
//! | `cgroup:path:<path>` | `/proc/<pid>/cgroup` (the v2 line, else `name=systemd`, else the first) |
//!
//! PID reuse must never grant an identity; [`PeerProcess`] pins the caller with a pidfd and the
//! process's start time, and every [`Attestation`] is re-checked after it is computed and can be
//! re-checked again ([`Attestation::recheck`]) after the caller's identity has been decided. See
//! the `process` module for the attack and the defence. A process keeps its pid across `execve`, so
//! a caller can exec another binary it may run after connecting: entries that name `unix:path` or
//! `unix:sha256` should also name the workload's `unix:uid` (or cgroup, or netns).
//!
//! Everything here blocks (it reads `/proc`, hashes files, and may ask NSS for user names, which can
//! mean LDAP): async callers run [`Attestor`] methods in `tokio::task::spawn_blocking`.
//! [`PeerProcess::from_socket`] is cheap and made on the accepting task.
//!
//! The agent must share the pid namespace of its callers (or be in an ancestor of it) and see a
//! `/proc` mounted for that namespace; paths (`unix:path`, `cgroup:path`) are as the agent sees
//! them, so an agent in a container sees its own mount and cgroup namespaces' view.

use std::collections::BTreeSet;

use nix::fcntl::AtFlags;
use nix::unistd::{Gid, Group, Uid, User};
use tessera_spiffe::Selector;

mod cgroup;
mod error;
mod exe;
mod netns;
pub use netns::{boot_id, netns_cookie, netns_selectors_of_fd};
mod process;

pub use error::AttestError;
pub use process::{PeerCreds, PeerProcess};

use process::Pinned;

/// Attests Workload API callers. One per agent; shared by all connections (its hash cache is
/// behind a mutex).
#[derive(Debug)]
pub struct Attestor {
    hasher: exe::ExeHasher,
}

impl Attestor {
    /// A reasonable cap for [`Attestor::new`]: larger than nearly every real executable.
    pub const DEFAULT_MAX_HASH_BYTES: u64 = 256 * 1024 * 1024;

    /// An attestor that hashes executables of at most `max_hash_bytes` bytes; larger ones get no
    /// `unix:sha256` selector (so entries that require one do not match them).
    pub fn new(max_hash_bytes: u64) -> Self {
        Self {
            hasher: exe::ExeHasher::new(max_hash_bytes),
        }
    }

    /// Pins the process the credentials name (with `pidfd_open`) and attests it; the process is
    /// re-checked after its selectors are read. Prefer [`PeerProcess::from_socket`] at accept time
    /// and [`Attestor::attest_peer`], which also close the window before this call.
    pub fn attest(&self, creds: PeerCreds) -> Result<BTreeSet<Selector>, AttestError> {
        Ok(self
            .attest_peer(&PeerProcess::open(creds)?)?
            .into_selectors())
    }

    /// Attests a pinned peer. The result holds the pin, so the caller can
    /// [`recheck`](Attestation::recheck) after it has decided the caller's identity.
    pub fn attest_peer(&self, peer: &PeerProcess) -> Result<Attestation, AttestError> {
        let pinned = peer.pin()?;
        let selectors = self.selectors_of(&pinned).map_err(|e| pinned.explain(e))?;
        // Every fact above was read through the pinned /proc directory; they describe the caller
        // only if the caller is still alive and unchanged after the last read.
        pinned.recheck()?;
        tracing::debug!(
            pid = peer.creds().pid,
            selectors = selectors.len(),
            "attested Workload API caller"
        );
        Ok(Attestation { pinned, selectors })
    }

    /// Attests, lets `decide` turn the selectors into an identity (match entries, pick SVIDs),
    /// then re-checks that the caller is still the same process before handing the decision
    /// back: the decision is returned only if it was made for a process that is still there.
    pub fn attest_with_recheck<T>(
        &self,
        creds: PeerCreds,
        decide: impl FnOnce(&BTreeSet<Selector>) -> T,
    ) -> Result<T, AttestError> {
        let attestation = self.attest_peer(&PeerProcess::open(creds)?)?;
        let decision = decide(attestation.selectors());
        attestation.recheck()?;
        Ok(decision)
    }

    /// How many executables have been hashed (cache misses) since this attestor was made.
    pub fn hashes_computed(&self) -> u64 {
        self.hasher.computed()
    }

    fn selectors_of(&self, pinned: &Pinned) -> Result<BTreeSet<Selector>, AttestError> {
        let pid = pinned.pid();
        let creds = pinned.peer().creds();
        let mut out = BTreeSet::new();
        let mut add = |what: &'static str, kind: &str, value: String| {
            Selector::new(kind, &value)
                .map(|s| {
                    out.insert(s);
                })
                .map_err(|source| AttestError::Selector { pid, what, source })
        };

        add("uid", "unix", format!("uid:{}", creds.uid))?;
        add("gid", "unix", format!("gid:{}", creds.gid))?;
        let name_err = |what, id, e: nix::Error| AttestError::NameLookup {
            pid,
            what,
            id,
            source: e.into(),
        };
        if let Some(user) =
            User::from_uid(Uid::from_raw(creds.uid)).map_err(|e| name_err("uid", creds.uid, e))?
        {
            add("user name", "unix", format!("user:{}", user.name))?;
        }
        if let Some(group) =
            Group::from_gid(Gid::from_raw(creds.gid)).map_err(|e| name_err("gid", creds.gid, e))?
        {
            add("group name", "unix", format!("group:{}", group.name))?;
        }
        for gid in pinned.read_status()?.groups {
            add(
                "supplementary group",
                "unix",
                format!("supplementary_gid:{gid}"),
            )?;
        }

        let path = nix::fcntl::readlinkat(pinned.dir(), "exe").map_err(|e| AttestError::Read {
            pid,
            what: "the executable's path (/proc/<pid>/exe)",
            source: e.into(),
        })?;
        let path = path.into_string().map_err(|p| AttestError::Parse {
            pid,
            what: "the executable's path",
            detail: format!("{p:?} is not UTF-8"),
        })?;
        add("executable path", "unix", format!("path:{path}"))?;
        if let Some(hash) = self.hasher.sha256(pid, pinned.dir())? {
            add("executable hash", "unix", format!("sha256:{hash}"))?;
        }

        let ns =
            nix::sys::stat::fstatat(pinned.dir(), "ns/net", AtFlags::empty()).map_err(|e| {
                AttestError::Read {
                    pid,
                    what: "the network namespace (/proc/<pid>/ns/net)",
                    source: e.into(),
                }
            })?;
        let names = netns::names_of(netns::NETNS_RUN_DIR.as_ref(), ns.st_dev, ns.st_ino).map_err(
            |source| AttestError::Read {
                pid,
                what: "the named network namespaces (/run/netns)",
                source,
            },
        )?;
        for name in names {
            add("network namespace name", "netns", format!("name:{name}"))?;
        }

        let cgroups = pinned.read_file("cgroup")?;
        let path = cgroup::path_of(&cgroups).ok_or_else(|| AttestError::Parse {
            pid,
            what: "cgroup",
            detail: "no `id:controllers:path` line".to_owned(),
        })?;
        add("cgroup", "cgroup", format!("path:{path}"))?;
        Ok(out)
    }
}

/// The selectors of one caller, with the pin that proves they are its own.
#[derive(Debug)]
pub struct Attestation {
    pinned: Pinned,
    selectors: BTreeSet<Selector>,
}

impl Attestation {
    /// The peer that was attested.
    pub fn peer(&self) -> &PeerProcess {
        self.pinned.peer()
    }

    pub fn selectors(&self) -> &BTreeSet<Selector> {
        &self.selectors
    }

    /// Verifies that the attested process is still alive and is still the same process (same
    /// start time, same effective uid and gid). The Workload API calls this after it has decided
    /// the caller's identity and before it sends anything, so that a caller replaced while the
    /// decision was made does not receive it. Cheap: a system call and two small `/proc` reads.
    pub fn recheck(&self) -> Result<(), AttestError> {
        self.pinned.recheck()
    }

    pub fn into_selectors(self) -> BTreeSet<Selector> {
        self.selectors
    }
}
