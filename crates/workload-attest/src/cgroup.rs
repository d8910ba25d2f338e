//! `cgroup:path:<path>` from `/proc/<pid>/cgroup`.
//!
//! Each line is `hierarchy-id:controllers:path` (`cgroups(7)`). Which line is the process's
//! cgroup:
//! - the cgroup v2 line `0::/path` when there is one (pure v2, and the unified hierarchy of a
//!   hybrid v1/v2 system, which is where systemd tracks units);
//! - else, on a pure v1 system, the `name=systemd` hierarchy;
//! - else the first line of the file.
//!
//! The path is as the agent sees it: relative to the agent's cgroup namespace. An agent in its own
//! cgroup namespace sees paths of other cgroups as `/../…`; run it in the host's cgroup namespace
//! for paths that match what systemd or a container runtime reports.

/// The process's cgroup path by the rule above, or `None` when no line has the expected shape.
pub(crate) fn path_of(text: &str) -> Option<&str> {
    let mut systemd = None;
    let mut first = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if path.is_empty() {
            continue;
        }
        if id == "0" && controllers.is_empty() {
            return Some(path);
        }
        if systemd.is_none() && controllers.split(',').any(|c| c == "name=systemd") {
            systemd = Some(path);
        }
        first.get_or_insert(path);
    }
    systemd.or(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_path_prefers_v2_then_systemd_then_the_first_line() {
        // Pure cgroup v2.
        assert_eq!(
            path_of("0::/system.slice/app.service\n"),
            Some("/system.slice/app.service")
        );
        // Hybrid: the unified line wins over the v1 ones.
        let hybrid = "9:name=systemd:/a\n4:memory:/b\n0::/c\n";
        assert_eq!(path_of(hybrid), Some("/c"));
        // Pure v1: name=systemd, wherever it is listed.
        assert_eq!(
            path_of("5:cpu,cpuacct:/x\n1:name=systemd:/user.slice\n"),
            Some("/user.slice")
        );
        // v1 without systemd: the first line.
        assert_eq!(path_of("5:cpu:/x\n4:memory:/y\n"), Some("/x"));
        // Paths may contain `:`.
        assert_eq!(path_of("0::/a:b\n"), Some("/a:b"));
        assert_eq!(path_of(""), None);
        assert_eq!(path_of("garbage\n"), None);
    }
}
