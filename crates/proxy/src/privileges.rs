//! Running as the proxy's own user after set-up (`tessera proxy --user`).
//!
//! A sidecar in transparent mode starts as root to install its interception rules. It then has
//! no use for root: it parses what peers and workloads send it, so a flaw there should not hand
//! out the node's root. And the rules exempt the proxy's own connections by its mark *and* its
//! user (`transparent::rules`): while that user is root, a root workload that may set the mark
//! (CAP_NET_RAW since Linux 5.17, a container default) sends its traffic past the proxy. Under a
//! user of its own (Istio's sidecar runs as 1337), it takes that user as well.
//!
//! What is kept: CAP_NET_ADMIN, and only in transparent mode, to set `SO_MARK` on the proxy's
//! own connections (before Linux 5.17 only CAP_NET_ADMIN may; capabilities(7)); and
//! CAP_NET_BIND_SERVICE, only when a port it listens on is below the namespace's
//! `ip_unprivileged_port_start` (its listeners are bound after the change of user, on the
//! runtime). Everything else of root goes, for good: real, effective and saved IDs all change, so root
//! cannot be taken back, and no-new-privileges is set, so no program it runs gains any.

use nix::unistd::{Gid, Group, Uid, User};

/// The user and group to run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// `USER[:GROUP]`, each a name or a number; without a group, the user's primary group (a
    /// number that names no user: the group of the same number).
    pub fn parse(s: &str) -> Result<Self, String> {
        let (user, group) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let (uid, primary) = match user.parse::<u32>() {
            Ok(n) => (
                n,
                User::from_uid(Uid::from_raw(n))
                    .ok()
                    .flatten()
                    .map_or(n, |u| u.gid.as_raw()),
            ),
            Err(_) => match User::from_name(user) {
                Ok(Some(u)) => (u.uid.as_raw(), u.gid.as_raw()),
                Ok(None) => return Err(format!("{user:?}: no such user")),
                Err(e) => return Err(format!("{user:?}: {e}")),
            },
        };
        let gid = match group {
            None => primary,
            Some(g) => match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => match Group::from_name(g) {
                    Ok(Some(gr)) => gr.gid.as_raw(),
                    Ok(None) => return Err(format!("{g:?}: no such group")),
                    Err(e) => return Err(format!("{g:?}: {e}")),
                },
            },
        };
        // Root is what this is for leaving, its group included.
        if uid == 0 {
            return Err("the proxy's user must not be root (uid 0)".to_owned());
        }
        if gid == 0 {
            return Err("the proxy's group must not be root's (gid 0)".to_owned());
        }
        // (uid_t)-1 means "leave unchanged" to setresuid(2): it would change nothing.
        if uid == u32::MAX || gid == u32::MAX {
            return Err(format!("{s:?}: 4294967295 is not an ID (it is -1)"));
        }
        Ok(Self { uid, gid })
    }
}

/// Linux's capability numbers (linux/capability.h).
const CAP_NET_BIND_SERVICE: u32 = 10;
const CAP_NET_ADMIN: u32 = 12;

/// The capabilities kept after the change of user; none unless set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Keep {
    /// To mark the proxy's own connections (transparent mode).
    pub net_admin: bool,
    /// To listen on a privileged port ([`needs_bind_service`]).
    pub net_bind_service: bool,
}

impl Keep {
    fn bits(self) -> u32 {
        (u32::from(self.net_admin) << CAP_NET_ADMIN)
            | (u32::from(self.net_bind_service) << CAP_NET_BIND_SERVICE)
    }
}

/// Whether listening on `ports` needs CAP_NET_BIND_SERVICE in this network namespace: one is
/// below `net.ipv4.ip_unprivileged_port_start` (1024 unless lowered; read as 1024 when it
/// cannot be read). Port 0 (any free port) never does.
pub fn needs_bind_service(ports: impl IntoIterator<Item = u16>) -> bool {
    let start = unprivileged_port_start();
    ports.into_iter().any(|p| p != 0 && u32::from(p) < start)
}

/// This network namespace's `net.ipv4.ip_unprivileged_port_start`; 1024 when unreadable.
fn unprivileged_port_start() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .unwrap_or(1024)
}

/// Becomes `to` for the rest of the process, keeping the capabilities `keep` names and no
/// other. Must run before any other thread exists: capabilities are per thread, and threads
/// made later inherit these.
pub fn become_user(to: RunAs, keep: Keep) -> Result<(), String> {
    use nix::unistd::{setgroups, setresgid, setresuid};
    let fail = |what: &str, e: nix::Error| format!("--user {}:{}: {what}: {e}", to.uid, to.gid);
    // Keep the permitted set across the change of user (prctl(2) PR_SET_KEEPCAPS); the
    // effective set is cleared by it and set again below, to `keep` only.
    nix::sys::prctl::set_keepcaps(true).map_err(|e| fail("keep capabilities", e))?;
    let gid = Gid::from_raw(to.gid);
    // Supplementary groups first (root's would stay otherwise), then group, then user: after
    // the user changes, the groups can no longer be.
    setgroups(&[gid]).map_err(|e| fail("set groups", e))?;
    setresgid(gid, gid, gid).map_err(|e| fail("set group", e))?;
    let uid = Uid::from_raw(to.uid);
    setresuid(uid, uid, uid).map_err(|e| fail("set user", e))?;
    set_capabilities(keep.bits()).map_err(|e| fail("drop capabilities", e))?;
    nix::sys::prctl::set_keepcaps(false).map_err(|e| fail("keep capabilities", e))?;
    // Nor by executing something: a setuid-root or file-capability program run from here gains
    // nothing (prctl(2) PR_SET_NO_NEW_PRIVS; it cannot be unset).
    nix::sys::prctl::set_no_new_privs().map_err(|e| fail("no new privileges", e))?;
    // Checked, not assumed: a user we could change back from is not a change.
    if setresuid(Uid::from_raw(0), Uid::from_raw(0), Uid::from_raw(0)).is_ok() {
        return Err(format!("--user {}: root could be taken back", to.uid));
    }
    Ok(())
}

/// Sets this thread's permitted and effective capabilities to `set` (bits of the first 32
/// capabilities), none inheritable (capset(2), version 3).
#[allow(unsafe_code)]
fn set_capabilities(set: u32) -> Result<(), nix::Error> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let header = Header {
        version: VERSION_3,
        pid: 0,
    };
    let none = Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    };
    // Version 3 takes two of these: capabilities 0-31, then 32-63.
    let data = [
        Data {
            effective: set,
            permitted: set,
            inheritable: 0,
        },
        none,
    ];
    // SAFETY: capset reads one header and two data structs, laid out as linux/capability.h
    // declares them (repr(C), three u32s each), which live until it returns.
    let r = unsafe { libc::syscall(libc::SYS_capset, std::ptr::from_ref(&header), data.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(nix::Error::last())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn users_and_groups_are_read_by_name_or_number() {
        assert_eq!(
            RunAs::parse("1337:1338").unwrap(),
            RunAs {
                uid: 1337,
                gid: 1338
            }
        );
        // A number that names no user: its group is the same number.
        let lone = RunAs::parse("54321").unwrap();
        assert_eq!((lone.uid, lone.gid), (54321, 54321));
        // `nobody` is in every passwd this runs on; its group is its primary one.
        if let Ok(Some(nobody)) = User::from_name("nobody") {
            let r = RunAs::parse("nobody").unwrap();
            assert_eq!((r.uid, r.gid), (nobody.uid.as_raw(), nobody.gid.as_raw()));
        }
        for (bad, why) in [
            ("no-such-user-tessera", "no such user"),
            ("1337:no-such-group-tessera", "no such group"),
            ("0", "must not be root"),
            ("root", "must not be root"),
            ("1337:0", "must not be root's"),
            ("4294967295", "is not an ID"),
            ("1337:4294967295", "is not an ID"),
            ("", "no such user"),
            (":1337", "no such user"),
            ("99999999999", "no such user"),
        ] {
            let e = RunAs::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn kept_capabilities_are_the_named_bits() {
        assert_eq!(Keep::default().bits(), 0);
        let both = Keep {
            net_admin: true,
            net_bind_service: true,
        };
        // As /proc/PID/status shows them: CAP_NET_ADMIN 0x1000, CAP_NET_BIND_SERVICE 0x400.
        assert_eq!(both.bits(), 0x1400);
    }

    #[test]
    fn only_a_privileged_port_needs_the_bind_capability() {
        let start = u16::try_from(unprivileged_port_start()).unwrap();
        // Port 0 never does, nor does no port; the namespace's start and above never do, the
        // port below it does (whatever this machine's sysctl says).
        assert!(!needs_bind_service([0]));
        assert!(!needs_bind_service([]));
        assert!(!needs_bind_service([start.max(1), u16::MAX]));
        if start > 1 {
            assert!(needs_bind_service([u16::MAX, start - 1]));
        }
    }
}
