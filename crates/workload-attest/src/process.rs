//! Pinning the caller's process, so that nothing read about a pid can come from another process.
//!
//! # Why (the PID-reuse attack)
//!
//! `SO_PEERCRED` gives a pid, and a pid is only a number: if the caller exits after connecting
//! (or hands its socket to a child and exits), the kernel may give the number to another
//! process, and reading `/proc/<pid>` would describe that process. A caller that can make a
//! privileged binary land on its old pid would be issued that binary's identity. Attestation must
//! therefore prove that every fact it read came from the process that is on the other end of the
//! socket, and it must do that without the workload's help (SPIFFE Workload Endpoint §5: the
//! endpoint identifies callers out of band, the workload does not participate).
//!
//! # How
//!
//! 1. A pidfd is taken first: from the socket itself with `SO_PEERPIDFD` (Linux 6.5+; it names
//!    the very process that connected, so no window at all), else with `pidfd_open(pid)` (5.3+).
//!    A pidfd names one process for its whole life, and a pid number is not recycled while the
//!    process it names is alive (numbers are freed when a process is reaped).
//! 2. `/proc/<pid>` is opened as a directory, then the pidfd is checked to be alive: so the
//!    directory belongs to the pidfd's process, and every later read goes through it (a `/proc`
//!    directory fd keeps naming its process; after that process is gone, reads fail with ESRCH
//!    instead of describing a newcomer).
//! 3. The start time (field 22 of `stat`) and the effective uid/gid (`status`) are recorded; the
//!    uid/gid must equal what the socket reported.
//! 4. After the facts are read, and again after the caller's identity has been computed
//!    ([`crate::Attestation::recheck`]), the pidfd must still be alive and the start time, uid and
//!    gid unchanged. Any difference is [`AttestError::ProcessGone`].
//!
//! Without pidfds (`ENOSYS`, kernels before 5.3) only the start-time and credential re-checks
//! remain, as in SPIRE: they catch a replacement during attestation but not one that happened
//! before `/proc/<pid>` was opened. With `pidfd_open` the remaining window is between `connect`
//! and `pidfd_open`; reusing a pid inside it means cycling through `pid_max` pids (4 194 304 by
//! default on 64-bit) and landing a process with the caller's own uid and gid on it.
//!
//! # What this cannot see: `execve`
//!
//! A process keeps its pid, pidfd and start time across `execve`. A caller can connect, pass the
//! socket to a helper (fork, or `SCM_RIGHTS`), then exec another binary it is allowed to run; the
//! agent then attests that binary's path and hash, and the helper reads the answer. Such a caller
//! keeps its own uid and gid (a set-uid binary changes the effective uid, which the re-check
//! refuses), so registration entries that name `unix:path` or `unix:sha256` should also name the
//! workload's `unix:uid` (or its cgroup or netns), which the caller cannot borrow.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{getsockopt, sockopt};
use nix::sys::stat::Mode;

use crate::AttestError;

/// The credentials the kernel recorded for a Unix socket's peer when it connected (`SO_PEERCRED`):
/// the process id (in the agent's pid namespace) and its effective uid and gid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerCreds {
    pub pid: i32,
    pub uid: u32,
    pub gid: u32,
}

impl PeerCreds {
    /// Reads `SO_PEERCRED` from a connected Unix socket.
    pub fn from_socket(sock: &impl AsFd) -> Result<Self, AttestError> {
        let cred = getsockopt(sock, sockopt::PeerCredentials)
            .map_err(|e| AttestError::PeerCreds { source: e.into() })?;
        Ok(Self {
            pid: cred.pid(),
            uid: cred.uid(),
            gid: cred.gid(),
        })
    }
}

/// From what tokio's `UnixStream::peer_cred()` (and tonic's `UdsConnectInfo`) report.
impl TryFrom<tokio::net::unix::UCred> for PeerCreds {
    type Error = AttestError;
    fn try_from(c: tokio::net::unix::UCred) -> Result<Self, AttestError> {
        let pid = c.pid().unwrap_or(0);
        if pid <= 0 {
            return Err(AttestError::NoPid { pid });
        }
        Ok(Self {
            pid,
            uid: c.uid(),
            gid: c.gid(),
        })
    }
}

/// A socket peer pinned by a pidfd where the kernel has them: cheap to make (one or two system
/// calls, no `/proc` reads), so the Workload API makes one when it accepts a connection and
/// attests it per request. Clones share the pidfd.
#[derive(Debug, Clone)]
pub struct PeerProcess {
    creds: PeerCreds,
    pidfd: Option<Arc<OwnedFd>>,
}

impl PeerProcess {
    /// Pins the peer of a connected Unix socket: `SO_PEERCRED`, then `SO_PEERPIDFD`, which names
    /// the process that connected even if its pid has since been reused. Falls back to
    /// [`PeerProcess::open`] on kernels without `SO_PEERPIDFD`.
    ///
    /// Call it when the connection is accepted: a pidfd taken later cannot tell whether the
    /// connecting process has already been replaced.
    pub fn from_socket(sock: &impl AsFd) -> Result<Self, AttestError> {
        let creds = PeerCreds::from_socket(sock)?;
        if creds.pid <= 0 {
            return Err(AttestError::NoPid { pid: creds.pid });
        }
        match getsockopt(sock, sockopt::PeerPidfd) {
            Ok(pidfd) => {
                // The socket's pidfd names the connecting process; make sure it is the pid the
                // credentials name (a reaped process has `Pid: -1`).
                match pidfd_pid(pidfd.as_fd()) {
                    Ok(Some(pid)) if pid == creds.pid => Ok(Self {
                        creds,
                        pidfd: Some(Arc::new(pidfd)),
                    }),
                    Ok(_) => Err(gone(creds.pid, "the connecting process has exited")),
                    Err(source) => Err(AttestError::Read {
                        pid: creds.pid,
                        what: "the fdinfo of the socket's pidfd",
                        source,
                    }),
                }
            }
            // Depending on the version, a kernel that cannot make a pidfd for an already reaped
            // process answers EINVAL or ESRCH (newer ones return a pidfd whose `Pid:` is -1, see
            // above). Never fall back to pidfd_open here: the pid may already be someone else's.
            Err(Errno::ESRCH | Errno::EINVAL) => {
                Err(gone(creds.pid, "the connecting process has been reaped"))
            }
            // Only kernels before 6.5, which do not know SO_PEERPIDFD, get the pid-based pin.
            Err(Errno::ENOPROTOOPT) => Self::open(creds),
            Err(e) => Err(AttestError::PeerCreds { source: e.into() }),
        }
    }

    /// Pins the process that `creds.pid` names now, with `pidfd_open` (or, where the kernel has
    /// no pidfds, only by the start-time re-check).
    pub fn open(creds: PeerCreds) -> Result<Self, AttestError> {
        if creds.pid <= 0 {
            return Err(AttestError::NoPid { pid: creds.pid });
        }
        let pidfd = match pidfd_open(creds.pid) {
            Ok(fd) => Some(Arc::new(fd)),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {
                return Err(gone(creds.pid, "no process has this pid"));
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                warn_no_pidfd();
                None
            }
            Err(source) => {
                return Err(AttestError::Read {
                    pid: creds.pid,
                    what: "a pidfd (pidfd_open)",
                    source,
                });
            }
        };
        Ok(Self { creds, pidfd })
    }

    /// For tests of the fallback: a peer pinned only by the start-time re-check.
    #[cfg(test)]
    pub(crate) fn without_pidfd(creds: PeerCreds) -> Self {
        Self { creds, pidfd: None }
    }

    /// The credentials the socket reported.
    pub fn creds(&self) -> PeerCreds {
        self.creds
    }

    /// Whether a pidfd pins the process (false only on kernels without pidfds).
    pub fn has_pidfd(&self) -> bool {
        self.pidfd.is_some()
    }

    /// Is the pidfd's process still running? `Ok(true)` without a pidfd (the caller then relies
    /// on the start-time re-check alone).
    fn alive(&self) -> Result<bool, AttestError> {
        let Some(pidfd) = &self.pidfd else {
            return Ok(true);
        };
        pidfd_alive(pidfd.as_fd()).map_err(|source| AttestError::Read {
            pid: self.creds.pid,
            what: "the state of the process's pidfd",
            source,
        })
    }

    /// Opens `/proc/<pid>` and records what later checks compare against. See the module docs
    /// for the order of steps and why.
    pub(crate) fn pin(&self) -> Result<Pinned, AttestError> {
        let pid = self.creds.pid;
        let dir = match openat(
            nix::fcntl::AT_FDCWD,
            format!("/proc/{pid}").as_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(dir) => dir,
            Err(Errno::ENOENT | Errno::ESRCH) => {
                return Err(gone(pid, "no /proc entry for this pid"));
            }
            Err(e) => {
                return Err(AttestError::Read {
                    pid,
                    what: "/proc/<pid>",
                    source: e.into(),
                });
            }
        };
        // The directory was opened by number; only if the pidfd's process is alive now can the
        // number (and so the directory) still be that process's.
        if !self.alive()? {
            return Err(gone(pid, "the process exited before /proc was read"));
        }
        let mut pinned = Pinned {
            peer: self.clone(),
            dir,
            start_time: 0,
        };
        let stat = pinned.read_stat()?;
        pinned.check_state(&stat)?;
        pinned.start_time = stat.start_time;
        pinned.check_status(&pinned.read_status()?)?;
        Ok(pinned)
    }
}

/// A peer whose `/proc` directory is open and whose start time is recorded.
#[derive(Debug)]
pub(crate) struct Pinned {
    peer: PeerProcess,
    dir: OwnedFd,
    start_time: u64,
}

impl Pinned {
    pub(crate) fn pid(&self) -> i32 {
        self.peer.creds.pid
    }

    pub(crate) fn peer(&self) -> &PeerProcess {
        &self.peer
    }

    pub(crate) fn dir(&self) -> BorrowedFd<'_> {
        self.dir.as_fd()
    }

    /// The start time recorded when the process was pinned (clock ticks after boot).
    #[cfg(test)]
    pub(crate) fn start_time(&self) -> u64 {
        self.start_time
    }

    /// Verifies that the pinned process is still the one that was attested.
    pub(crate) fn recheck(&self) -> Result<(), AttestError> {
        self.verify(self.start_time)
    }

    /// The re-check, against an explicit start time so that tests can present a wrong one.
    pub(crate) fn verify(&self, expected_start_time: u64) -> Result<(), AttestError> {
        let pid = self.pid();
        if !self.peer.alive()? {
            return Err(gone(pid, "the process has exited"));
        }
        let stat = self.read_stat()?;
        if stat.start_time != expected_start_time {
            return Err(gone(
                pid,
                "the pid now belongs to a process with another start time",
            ));
        }
        self.check_state(&stat)?;
        self.check_status(&self.read_status()?)?;
        // Checked last as well: the reads above are of a live process only if it was still alive
        // after them (with a pidfd this is the check that matters).
        if !self.peer.alive()? {
            return Err(gone(pid, "the process has exited"));
        }
        Ok(())
    }

    /// Turns a failed read into `ProcessGone` when the reason is that the process went away, so
    /// the caller sees the security-relevant outcome rather than a confusing I/O error.
    pub(crate) fn explain(&self, err: AttestError) -> AttestError {
        if matches!(err, AttestError::ProcessGone { .. }) {
            return err;
        }
        match self.recheck() {
            Err(gone @ AttestError::ProcessGone { .. }) => gone,
            _ => err,
        }
    }

    fn check_state(&self, stat: &Stat) -> Result<(), AttestError> {
        // Z (zombie) and X (dead): the process has exited; its pid is about to be freed.
        if matches!(stat.state, 'Z' | 'X' | 'x') {
            return Err(gone(self.pid(), "the process has exited (zombie)"));
        }
        Ok(())
    }

    fn check_status(&self, status: &Status) -> Result<(), AttestError> {
        // SO_PEERCRED records the effective uid and gid at connect time.
        if status.euid != self.peer.creds.uid || status.egid != self.peer.creds.gid {
            return Err(gone(
                self.pid(),
                "its effective uid/gid differ from the socket's credentials",
            ));
        }
        Ok(())
    }

    /// Reads a small `/proc/<pid>/<name>` file through the pinned directory.
    pub(crate) fn read_file(&self, name: &'static str) -> Result<String, AttestError> {
        /// Far above any real `stat`, `status` or `cgroup` file; bounds what we hold in memory.
        const LIMIT: u64 = 256 * 1024;
        let pid = self.pid();
        let read_err = |source: io::Error| AttestError::Read {
            pid,
            what: name,
            source,
        };
        let fd = openat(
            self.dir.as_fd(),
            name,
            OFlag::O_RDONLY | OFlag::O_CLOEXEC | OFlag::O_NOCTTY,
            Mode::empty(),
        )
        .map_err(|e| read_err(e.into()))?;
        let mut text = String::new();
        File::from(fd)
            .take(LIMIT)
            .read_to_string(&mut text)
            .map_err(read_err)?;
        if text.len() as u64 >= LIMIT {
            return Err(AttestError::Parse {
                pid,
                what: name,
                detail: format!("longer than {LIMIT} bytes"),
            });
        }
        Ok(text)
    }

    fn read_stat(&self) -> Result<Stat, AttestError> {
        let text = self
            .read_file("stat")
            .map_err(|e| self.gone_if_unreadable(e))?;
        parse_stat(&text).map_err(|detail| AttestError::Parse {
            pid: self.pid(),
            what: "stat",
            detail,
        })
    }

    pub(crate) fn read_status(&self) -> Result<Status, AttestError> {
        let text = self
            .read_file("status")
            .map_err(|e| self.gone_if_unreadable(e))?;
        parse_status(&text).map_err(|detail| AttestError::Parse {
            pid: self.pid(),
            what: "status",
            detail,
        })
    }

    /// `stat` and `status` exist for every process, zombies included: failing to read them
    /// through the pinned directory (ESRCH, ENOENT) means the process is gone.
    fn gone_if_unreadable(&self, err: AttestError) -> AttestError {
        match &err {
            AttestError::Read { source, .. }
                if matches!(source.raw_os_error(), Some(libc::ESRCH | libc::ENOENT)) =>
            {
                gone(self.pid(), "its /proc entry has disappeared")
            }
            _ => err,
        }
    }
}

pub(crate) fn gone(pid: i32, reason: &'static str) -> AttestError {
    AttestError::ProcessGone { pid, reason }
}

/// The fields of `/proc/<pid>/stat` that attestation uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    pub(crate) state: char,
    /// Field 22: the time the process started, in clock ticks after boot.
    pub(crate) start_time: u64,
}

/// `proc(5)`: `pid (comm) state ppid …`; comm may contain spaces and `)`, so the fields are
/// counted after the last `)`.
pub(crate) fn parse_stat(text: &str) -> Result<Stat, String> {
    let Some(close) = text.rfind(')') else {
        return Err("no `)` after the command name".to_owned());
    };
    let mut fields = text[close + 1..].split_ascii_whitespace();
    // The first field after `)` is field 3 (state); field 22 (starttime) is 19 further on.
    let state = fields
        .next()
        .and_then(|s| s.chars().next())
        .ok_or("no state field")?;
    let start_time = fields
        .nth(18)
        .ok_or("fewer than 22 fields")?
        .parse()
        .map_err(|e| format!("field 22 (starttime): {e}"))?;
    Ok(Stat { state, start_time })
}

/// The fields of `/proc/<pid>/status` that attestation uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Status {
    pub(crate) euid: u32,
    pub(crate) egid: u32,
    /// `Groups:`, the supplementary groups of the process.
    pub(crate) groups: Vec<u32>,
}

pub(crate) fn parse_status(text: &str) -> Result<Status, String> {
    // `Uid:` and `Gid:` list real, effective, saved and filesystem ids.
    fn effective(line: Option<&str>, name: &str) -> Result<u32, String> {
        let line = line.ok_or_else(|| format!("no {name} line"))?;
        line.split_ascii_whitespace()
            .nth(1)
            .ok_or_else(|| format!("{name} has no effective id"))?
            .parse()
            .map_err(|e| format!("{name} effective id: {e}"))
    }
    let (mut uid, mut gid, mut groups) = (None, None, None);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("Uid:") {
            uid = Some(rest);
        } else if let Some(rest) = line.strip_prefix("Gid:") {
            gid = Some(rest);
        } else if let Some(rest) = line.strip_prefix("Groups:") {
            groups = Some(rest);
        }
    }
    let groups = groups
        .ok_or("no Groups line")?
        .split_ascii_whitespace()
        .map(|g| g.parse().map_err(|e| format!("Groups entry {g:?}: {e}")))
        .collect::<Result<_, _>>()?;
    Ok(Status {
        euid: effective(uid, "Uid")?,
        egid: effective(gid, "Gid")?,
        groups,
    })
}

fn warn_no_pidfd() {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            "the kernel has no pidfd_open (Linux < 5.3): workload attestation relies on the process start-time re-check alone"
        );
    });
}

/// `pidfd_open(2)` with no flags.
#[allow(unsafe_code)]
fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and a flags word, both plain integers, and touches no memory
    // of ours; it returns a new file descriptor or -1 with errno set.
    let ret = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0 as libc::c_uint) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(ret).map_err(|_| io::Error::other("pidfd_open returned a bad fd"))?;
    // SAFETY: the kernel has just created this descriptor for us; nothing else owns it, so the
    // OwnedFd is its only owner and closes it exactly once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `pidfd_send_signal(pidfd, 0, NULL, 0)`: signal 0 checks existence and delivers nothing.
#[allow(unsafe_code)]
fn pidfd_send_signal0(pidfd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: the descriptor is borrowed, so it stays open for the call; signal 0 sends nothing;
    // a null siginfo pointer is documented as allowed (the kernel then fills one in itself) and
    // no other memory is passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            0 as libc::c_int,
            std::ptr::null::<libc::siginfo_t>(),
            0 as libc::c_uint,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A pidfd's process is alive when it has not exited: the pidfd is not readable (it becomes
/// readable when the process exits, `pidfd_open(2)`) and signal 0 still finds it.
fn pidfd_alive(pidfd: BorrowedFd<'_>) -> io::Result<bool> {
    match pidfd_send_signal0(pidfd) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(false),
        // Not allowed to signal it (another uid, agent not root): it exists.
        Err(e) if e.raw_os_error() == Some(libc::EPERM) => {}
        Err(e) => return Err(e),
    }
    loop {
        let mut fds = [PollFd::new(pidfd, PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(0) => return Ok(true),
            Ok(_) => return Ok(false),
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The pid a pidfd names, from `/proc/self/fdinfo/<fd>` (`Pid:` is -1 once the process has been
/// reaped, 0 when it is outside our pid namespace): `Ok(None)` unless positive.
fn pidfd_pid(pidfd: BorrowedFd<'_>) -> io::Result<Option<i32>> {
    let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", pidfd.as_raw_fd()))?;
    let pid = text
        .lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .ok_or_else(|| io::Error::other("no Pid: line"))?
        .trim()
        .parse::<i32>()
        .map_err(io::Error::other)?;
    Ok((pid > 0).then_some(pid))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    struct Reaped(Child);
    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn sleeper() -> (Reaped, PeerCreds) {
        let child = Command::new("sleep").arg("5").spawn().unwrap();
        let creds = PeerCreds {
            pid: i32::try_from(child.id()).unwrap(),
            uid: nix::unistd::geteuid().as_raw(),
            gid: nix::unistd::getegid().as_raw(),
        };
        (Reaped(child), creds)
    }

    #[test]
    fn stat_fields_are_counted_after_the_last_paren() {
        let line = "42 (a) b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 123456 1000 100";
        assert_eq!(
            parse_stat(line),
            Ok(Stat {
                state: 'S',
                start_time: 123_456
            })
        );
        assert!(parse_stat("42 (x) S 1 2").is_err());
        assert!(parse_stat("no paren").is_err());
    }

    #[test]
    fn status_gives_effective_ids_and_supplementary_groups() {
        let text =
            "Name:\tx\nUid:\t1000\t1001\t1000\t1001\nGid:\t100\t101\t100\t101\nGroups:\t4 27 \n";
        assert_eq!(
            parse_status(text),
            Ok(Status {
                euid: 1001,
                egid: 101,
                groups: vec![4, 27]
            })
        );
        let none = "Uid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\nGroups:\t\n";
        assert_eq!(parse_status(none).unwrap().groups, Vec::<u32>::new());
        assert!(parse_status("Uid:\t0\t0\t0\t0\nGroups:\n").is_err());
    }

    #[test]
    fn recheck_refuses_a_process_with_another_start_time() {
        let (_child, creds) = sleeper();
        let pinned = PeerProcess::open(creds).unwrap().pin().unwrap();
        pinned.verify(pinned.start_time()).unwrap();
        // What the recheck sees when the pid has been taken by a process that started later.
        let err = pinned.verify(pinned.start_time() + 1).unwrap_err();
        assert!(matches!(err, AttestError::ProcessGone { .. }), "{err}");
    }

    #[test]
    fn without_a_pidfd_the_start_time_recheck_still_catches_an_exit() {
        let (mut child, creds) = sleeper();
        let pinned = PeerProcess::without_pidfd(creds).pin().unwrap();
        pinned.recheck().unwrap();
        child.0.kill().unwrap();
        child.0.wait().unwrap();
        let err = pinned.recheck().unwrap_err();
        assert!(matches!(err, AttestError::ProcessGone { .. }), "{err}");
    }

    #[test]
    fn a_zombie_is_gone() {
        let (mut child, creds) = sleeper();
        let peer = PeerProcess::open(creds).unwrap();
        let pinned = peer.pin().unwrap();
        child.0.kill().unwrap();
        // Not reaped: the pid stays taken by a zombie until wait().
        let start = std::time::Instant::now();
        loop {
            let stat =
                parse_stat(&std::fs::read_to_string(format!("/proc/{}/stat", creds.pid)).unwrap())
                    .unwrap();
            if stat.state == 'Z' || start.elapsed().as_secs() > 5 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let err = pinned.recheck().unwrap_err();
        assert!(matches!(err, AttestError::ProcessGone { .. }), "{err}");
        let err = PeerProcess::without_pidfd(creds).pin().unwrap_err();
        assert!(matches!(err, AttestError::ProcessGone { .. }), "{err}");
    }

    #[test]
    fn the_socket_pidfd_names_the_connecting_process() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let peer = PeerProcess::from_socket(&a).unwrap();
        assert_eq!(peer.creds().pid, i32::try_from(std::process::id()).unwrap());
        assert!(peer.has_pidfd());
        peer.pin().unwrap().recheck().unwrap();
    }
}
