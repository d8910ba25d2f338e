//! Transparent interception inside the workload's network namespace: iptables `nat` rules
//! redirect the workload's outbound TCP to the proxy's capture port and every inbound TCP except
//! the tunnel port to the proxy's plaintext port; the proxy's own connections carry a socket mark
//! the rules exempt. The rules are a pure list ([`rules`]) applied with the `iptables` binary.
//! They stay after the proxy exits or crashes, so traffic fails closed (redirected to a port
//! nobody listens on) until `tessera proxy uninstall-rules`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsFd;
use std::process::Command;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};

/// Our chains in the `nat` table.
pub const CHAIN_OUTPUT: &str = "TESSERA_OUTPUT";
pub const CHAIN_INBOUND: &str = "TESSERA_INBOUND";
/// Our chains in the IPv6 `filter` table: the proxy handles IPv4 only, so IPv6 TCP (other than
/// loopback) is rejected rather than left as a way around the proxy.
pub const CHAIN_V6_OUTPUT: &str = "TESSERA_V6_OUTPUT";
pub const CHAIN_V6_INPUT: &str = "TESSERA_V6_INPUT";

/// What the rules redirect where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleParams {
    pub tunnel_port: u16,
    pub outbound_port: u16,
    pub inbound_plaintext_port: u16,
    pub mark: u32,
}

/// The `iptables -t nat` argument lists that install interception, in order (after our chains
/// were created or flushed).
pub fn rules(p: &RuleParams) -> Vec<Vec<String>> {
    let mark = format!("{:#x}", p.mark);
    let v = |args: &[&str]| args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    vec![
        // Outbound: the proxy's own connections (marked) leave untouched, or they would loop.
        v(&[
            "-A",
            CHAIN_OUTPUT,
            "-m",
            "mark",
            "--mark",
            &mark,
            "-j",
            "RETURN",
        ]),
        // Loopback stays local: the proxy reaching the application at 127.0.0.1, and the
        // workload reaching an explicit listener.
        v(&["-A", CHAIN_OUTPUT, "-o", "lo", "-j", "RETURN"]),
        v(&[
            "-A",
            CHAIN_OUTPUT,
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &p.outbound_port.to_string(),
        ]),
        // Inbound: the tunnel port is the way in; everything else meets the plaintext port,
        // which refuses in STRICT mode.
        v(&[
            "-A",
            CHAIN_INBOUND,
            "-p",
            "tcp",
            "--dport",
            &p.tunnel_port.to_string(),
            "-j",
            "RETURN",
        ]),
        v(&["-A", CHAIN_INBOUND, "-i", "lo", "-j", "RETURN"]),
        v(&[
            "-A",
            CHAIN_INBOUND,
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &p.inbound_plaintext_port.to_string(),
        ]),
        v(&["-A", "OUTPUT", "-p", "tcp", "-j", CHAIN_OUTPUT]),
        v(&["-A", "PREROUTING", "-p", "tcp", "-j", CHAIN_INBOUND]),
    ]
}

/// The `ip6tables -t filter` argument lists that close IPv6 TCP except on loopback.
pub fn rules_v6() -> Vec<Vec<String>> {
    let v = |args: &[&str]| args.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    vec![
        v(&["-A", CHAIN_V6_OUTPUT, "-o", "lo", "-j", "RETURN"]),
        v(&[
            "-A",
            CHAIN_V6_OUTPUT,
            "-p",
            "tcp",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]),
        v(&["-A", CHAIN_V6_INPUT, "-i", "lo", "-j", "RETURN"]),
        v(&[
            "-A",
            CHAIN_V6_INPUT,
            "-p",
            "tcp",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]),
        v(&["-A", "OUTPUT", "-p", "tcp", "-j", CHAIN_V6_OUTPUT]),
        v(&["-A", "INPUT", "-p", "tcp", "-j", CHAIN_V6_INPUT]),
    ]
}

#[derive(Clone, Copy)]
enum Table {
    Nat4,
    Filter6,
}

impl Table {
    fn cmd(self) -> (&'static str, &'static str) {
        match self {
            Self::Nat4 => ("iptables", "nat"),
            Self::Filter6 => ("ip6tables", "filter"),
        }
    }
}

fn iptables_in(t: Table, args: &[String]) -> Result<std::process::Output, String> {
    let (bin, table) = t.cmd();
    Command::new(bin)
        .arg("-w")
        .args(["-t", table])
        .args(args)
        .output()
        .map_err(|e| format!("cannot run {bin}: {e} (is the iptables package installed?)"))
}

fn iptables(args: &[String]) -> Result<std::process::Output, String> {
    iptables_in(Table::Nat4, args)
}

fn must_in(t: Table, args: &[String]) -> Result<(), String> {
    let o = iptables_in(t, args)?;
    if o.status.success() {
        Ok(())
    } else {
        let (bin, table) = t.cmd();
        Err(format!(
            "{bin} -t {table} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

fn must(args: &[String]) -> Result<(), String> {
    must_in(Table::Nat4, args)
}

/// Whether this kernel has IPv6 at all (without it there is no IPv6 path to close).
fn ipv6_enabled() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// Whether exactly these rules are in place already (each one present, checked with `-C`).
fn installed(p: &RuleParams) -> Result<bool, String> {
    let check = |t: Table, r: &[String]| -> Result<bool, String> {
        let mut c = r.to_vec();
        if let Some(first) = c.first_mut() {
            *first = "-C".to_owned();
        }
        Ok(iptables_in(t, &c)?.status.success())
    };
    for r in rules(p) {
        if !check(Table::Nat4, &r)? {
            return Ok(false);
        }
    }
    if ipv6_enabled() {
        for r in rules_v6() {
            if !check(Table::Filter6, &r)? {
                return Ok(false);
            }
        }
    }
    Ok(true)
}

/// Installs the rules in the current network namespace, replacing ours if present. When the
/// same rules are in place already (a restarted or upgraded proxy), they are left untouched:
/// removing and re-adding them would open a window in which the workload's traffic is not
/// intercepted.
pub fn install(p: &RuleParams) -> Result<(), String> {
    if installed(p)? {
        return Ok(());
    }
    uninstall()?;
    for chain in [CHAIN_OUTPUT, CHAIN_INBOUND] {
        must(&["-N".to_owned(), chain.to_owned()])?;
    }
    for r in rules(p) {
        must(&r)?;
    }
    if ipv6_enabled() {
        for chain in [CHAIN_V6_OUTPUT, CHAIN_V6_INPUT] {
            must_in(Table::Filter6, &["-N".to_owned(), chain.to_owned()])?;
        }
        for r in rules_v6() {
            must_in(Table::Filter6, &r)?;
        }
    }
    Ok(())
}

/// Removes our jumps and chains from the current network namespace (nothing to do when absent).
pub fn uninstall() -> Result<(), String> {
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<String>>();
    // Delete every jump into our chains (there may be several after a failed install).
    for (builtin, chain) in [("OUTPUT", CHAIN_OUTPUT), ("PREROUTING", CHAIN_INBOUND)] {
        while iptables(&s(&["-D", builtin, "-p", "tcp", "-j", chain]))?
            .status
            .success()
        {}
    }
    for chain in [CHAIN_OUTPUT, CHAIN_INBOUND] {
        if iptables(&s(&["-n", "-L", chain]))?.status.success() {
            must(&s(&["-F", chain]))?;
            must(&s(&["-X", chain]))?;
        }
    }
    if ipv6_enabled() {
        let t = Table::Filter6;
        for (builtin, chain) in [("OUTPUT", CHAIN_V6_OUTPUT), ("INPUT", CHAIN_V6_INPUT)] {
            while iptables_in(t, &s(&["-D", builtin, "-p", "tcp", "-j", chain]))?
                .status
                .success()
            {}
        }
        for chain in [CHAIN_V6_OUTPUT, CHAIN_V6_INPUT] {
            if iptables_in(t, &s(&["-n", "-L", chain]))?.status.success() {
                must_in(t, &s(&["-F", chain]))?;
                must_in(t, &s(&["-X", chain]))?;
            }
        }
    }
    Ok(())
}

/// The destination a redirected connection was originally addressed to (`SO_ORIGINAL_DST`).
pub fn original_dst(sock: &impl AsFd) -> std::io::Result<SocketAddr> {
    let sin = getsockopt(sock, sockopt::OriginalDst).map_err(std::io::Error::from)?;
    // sockaddr_in fields are in network byte order.
    let ip = Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
    let port = u16::from_be(sin.sin_port);
    Ok(SocketAddr::V4(SocketAddrV4::new(ip, port)))
}

/// Marks a socket so the interception rules let its traffic pass (`SO_MARK`, needs
/// CAP_NET_ADMIN).
pub fn set_mark(sock: &impl AsFd, mark: u32) -> std::io::Result<()> {
    setsockopt(sock, sockopt::Mark, &mark).map_err(std::io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_exempt_the_mark_and_the_tunnel_port_before_redirecting() {
        let r = rules(&RuleParams {
            tunnel_port: 15008,
            outbound_port: 15001,
            inbound_plaintext_port: 15006,
            mark: 0x5e55,
        });
        let text: Vec<String> = r.iter().map(|a| a.join(" ")).collect();
        let pos = |needle: &str| {
            text.iter()
                .position(|l| l.contains(needle))
                .unwrap_or(usize::MAX)
        };
        assert!(pos("--mark 0x5e55 -j RETURN") < pos("--to-ports 15001"));
        assert!(pos("--dport 15008 -j RETURN") < pos("--to-ports 15006"));
        assert!(text.contains(&"-A OUTPUT -p tcp -j TESSERA_OUTPUT".to_owned()));
        assert!(text.contains(&"-A PREROUTING -p tcp -j TESSERA_INBOUND".to_owned()));
        // The jumps come last, so no packet meets a half-built chain.
        assert!(text.last().is_some_and(|l| l.starts_with("-A PREROUTING")));
        let v6: Vec<String> = rules_v6().iter().map(|a| a.join(" ")).collect();
        assert!(
            v6.iter()
                .any(|l| l.contains("TESSERA_V6_OUTPUT -p tcp -j REJECT"))
        );
        assert!(v6.last().is_some_and(|l| l.starts_with("-A INPUT")));
    }
}
