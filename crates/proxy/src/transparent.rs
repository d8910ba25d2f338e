//! Transparent interception inside the workload's network namespace: `nat` rules redirect the
//! workload's outbound TCP to the proxy's capture port and every inbound TCP except the tunnel
//! port to the proxy's plaintext port; the proxy's own connections carry a socket mark the rules
//! exempt. The rules are a pure list ([`rules`]), the same for both families, applied with
//! `iptables` and `ip6tables`. Where the kernel has no IPv6 `nat` table, IPv6 TCP other than
//! loopback is rejected instead ([`rules_v6_reject`]): closed, never a way around the proxy.
//! The rules stay after the proxy exits or crashes, so traffic fails closed (redirected to a
//! port nobody listens on) until `tessera proxy uninstall-rules`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{AsFd, AsRawFd as _};
use std::process::Command;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};

/// Our chains in the `nat` table (of each family).
pub const CHAIN_OUTPUT: &str = "TESSERA_OUTPUT";
pub const CHAIN_INBOUND: &str = "TESSERA_INBOUND";
/// Our chains in the IPv6 `filter` table, used only where IPv6 cannot be intercepted (no IPv6
/// `nat` table): IPv6 TCP (other than loopback) is rejected rather than left as a way around
/// the proxy.
pub const CHAIN_V6_OUTPUT: &str = "TESSERA_V6_OUTPUT";
pub const CHAIN_V6_INPUT: &str = "TESSERA_V6_INPUT";

/// What the rules redirect where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleParams {
    pub tunnel_port: u16,
    pub outbound_port: u16,
    pub inbound_plaintext_port: u16,
    pub mark: u32,
    /// The proxy's user ID: its own connections carry the mark *and* belong to it. `None`
    /// (or a namespace where the owner match cannot be used, see [`install`]): the mark alone.
    pub uid: Option<u32>,
}

/// The `iptables -t nat` (and `ip6tables -t nat`) argument lists that install interception, in
/// order (after our chains were created or flushed). Nothing in them names an address, so one
/// list serves both families: IPv6 REDIRECT sends outbound connections to `::1` and inbound ones
/// to the receiving interface's address, where the proxy's IPv6 listeners are.
pub fn rules(p: &RuleParams) -> Vec<Vec<String>> {
    let mark = format!("{:#x}", p.mark);
    let mut exempt = args(&["-A", CHAIN_OUTPUT, "-m", "mark", "--mark", &mark]);
    if let Some(uid) = p.uid {
        exempt.extend(args(&["-m", "owner", "--uid-owner", &uid.to_string()]));
    }
    exempt.extend(args(&["-j", "RETURN"]));
    vec![
        // Outbound: the proxy's own connections leave untouched, or they would loop. They are
        // told by the mark *and* the socket's owner: since Linux 5.17 `SO_MARK` needs only
        // CAP_NET_RAW, which container runtimes grant by default, so a mark alone could be
        // set by the workload to send its traffic past the proxy. With the owner too, that
        // takes the proxy's uid as well (Istio's sidecar rules exempt by uid for this reason).
        exempt,
        // Loopback stays local: the proxy reaching the application at 127.0.0.1, and the
        // workload reaching an explicit listener.
        args(&["-A", CHAIN_OUTPUT, "-o", "lo", "-j", "RETURN"]),
        args(&[
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
        args(&[
            "-A",
            CHAIN_INBOUND,
            "-p",
            "tcp",
            "--dport",
            &p.tunnel_port.to_string(),
            "-j",
            "RETURN",
        ]),
        args(&["-A", CHAIN_INBOUND, "-i", "lo", "-j", "RETURN"]),
        args(&[
            "-A",
            CHAIN_INBOUND,
            "-p",
            "tcp",
            "-j",
            "REDIRECT",
            "--to-ports",
            &p.inbound_plaintext_port.to_string(),
        ]),
        // First in the built-in chains (`-I … 1`): a rule already there that accepts (a
        // `nat` ACCEPT means "no NAT") would otherwise let traffic past the proxy.
        args(&["-I", "OUTPUT", "1", "-p", "tcp", "-j", CHAIN_OUTPUT]),
        args(&["-I", "PREROUTING", "1", "-p", "tcp", "-j", CHAIN_INBOUND]),
    ]
}

/// This process's effective user ID, the owner of the proxy's sockets ([`RuleParams::uid`]).
pub fn own_uid() -> u32 {
    nix::unistd::geteuid().as_raw()
}

/// What the rules assume of the proxy's own listeners, checked before anything is installed.
/// - The tunnel port is let through to *whoever* listens on it (the rules name no address), so
///   the tunnel must hold that port on every address: `0.0.0.0`, which the proxy binds with
///   its `::` twin. Bound to one address only, another socket on the same port (IPv6, or
///   another local address) could be bound by the workload and would receive peers' plaintext
///   past STRICT mode; `[::]` alone leaves `0.0.0.0` free where `net.ipv6.bindv6only = 1`.
/// - No port declared `--inbound` may be one of the proxy's own: the proxy would connect to
///   itself (the plaintext port admitting its own connection again, without end).
pub fn check_own_ports(
    p: &RuleParams,
    tunnel: SocketAddr,
    inbound: impl IntoIterator<Item = u16>,
) -> Result<(), String> {
    if tunnel.ip() != std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED) {
        return Err(format!(
            "--tunnel-address {tunnel}: with --transparent the tunnel listens on every address (0.0.0.0:PORT, which also takes [::]:PORT); the rules let port {} through to whatever listens on it",
            tunnel.port()
        ));
    }
    let own = [
        (p.tunnel_port, "the tunnel port"),
        (p.outbound_port, "the outbound capture port"),
        (p.inbound_plaintext_port, "the inbound plaintext port"),
    ];
    for port in inbound {
        if let Some((_, what)) = own.iter().find(|(o, _)| *o == port) {
            return Err(format!(
                "--inbound {port}: port {port} is {what} of the proxy in transparent mode, not a port of the workload"
            ));
        }
    }
    Ok(())
}

/// How IPv6 TCP is closed where it cannot be intercepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// `REJECT --reject-with tcp-reset`: the workload sees a reset at once.
    Reject,
    /// `DROP`, where the `REJECT` extension is missing: the workload times out.
    Drop,
}

/// The `ip6tables -t filter` argument lists that close IPv6 TCP except on loopback, where IPv6
/// cannot be intercepted.
pub fn rules_v6_reject(how: Close) -> Vec<Vec<String>> {
    let closed = |chain: &str| match how {
        Close::Reject => args(&[
            "-A",
            chain,
            "-p",
            "tcp",
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]),
        Close::Drop => args(&["-A", chain, "-p", "tcp", "-j", "DROP"]),
    };
    vec![
        args(&["-A", CHAIN_V6_OUTPUT, "-o", "lo", "-j", "RETURN"]),
        closed(CHAIN_V6_OUTPUT),
        args(&["-A", CHAIN_V6_INPUT, "-i", "lo", "-j", "RETURN"]),
        closed(CHAIN_V6_INPUT),
        args(&["-I", "OUTPUT", "1", "-p", "tcp", "-j", CHAIN_V6_OUTPUT]),
        args(&["-I", "INPUT", "1", "-p", "tcp", "-j", CHAIN_V6_INPUT]),
    ]
}

#[derive(Clone, Copy)]
enum Table {
    Nat4,
    Nat6,
    Filter6,
}

impl Table {
    fn cmd(self) -> (&'static str, &'static str) {
        match self {
            Self::Nat4 => ("iptables", "nat"),
            Self::Nat6 => ("ip6tables", "nat"),
            Self::Filter6 => ("ip6tables", "filter"),
        }
    }
}

/// An argument list as `iptables_in` takes it.
fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| (*s).to_owned()).collect()
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

/// Whether this kernel has IPv6 at all (without it there is no IPv6 path to close).
fn ipv6_enabled() -> bool {
    std::path::Path::new("/proc/net/if_inet6").exists()
}

/// How IPv6 TCP is handled in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V6 {
    /// The kernel has no IPv6: nothing to intercept or close.
    Absent,
    /// Intercepted like IPv4 (`ip6tables -t nat`).
    Intercepted,
    /// Rejected (no IPv6 `nat` table here): closed, not proxied.
    Rejected,
}

/// Whether every rule of `rules` is in place in `t` (checked with `-C`; a jump `-I BUILTIN 1
/// REST…` only if `-A BUILTIN REST…` is the chain's first rule: `-S` lists the policy, then the
/// rules in order).
fn all_present(t: Table, rules: &[Vec<String>]) -> Result<bool, String> {
    for r in rules {
        let present = match r.as_slice() {
            [op, builtin, _, rest @ ..] if op == "-I" => {
                let want = format!("-A {builtin} {}", rest.join(" "));
                listed_rules(t, builtin)?.first() == Some(&want)
            }
            [_, rest @ ..] => {
                let mut c = vec!["-C".to_owned()];
                c.extend_from_slice(rest);
                iptables_in(t, &c)?.status.success()
            }
            [] => true,
        };
        if !present {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether IPv6 TCP is closed by our `filter` rules (the fallback where it cannot be
/// redirected), with `REJECT` or `DROP`.
fn v6_closed() -> Result<bool, String> {
    Ok(
        all_present(Table::Filter6, &rules_v6_reject(Close::Reject))?
            || all_present(Table::Filter6, &rules_v6_reject(Close::Drop))?,
    )
}

/// Whether no closing chain of the IPv6 fallback is there.
fn v6_closing_chains_absent() -> Result<bool, String> {
    for (_, chain) in V6_CLOSED_JUMPS {
        if chain_exists(Table::Filter6, chain)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether exactly these rules are in place already (each one present, and each jump still the
/// first rule of its built-in chain); `Some` with how IPv6 is handled when they are.
fn installed(p: &RuleParams) -> Result<Option<V6>, String> {
    let v4 = rules(p);
    if !all_present(Table::Nat4, &v4)? {
        return Ok(None);
    }
    if !ipv6_enabled() {
        return Ok(Some(V6::Absent));
    }
    if all_present(Table::Nat6, &v4)? {
        // Closing chains beside working IPv6 NAT (an earlier fallback's, left behind) would
        // reject the proxy's own IPv6 connections: not the rules this start wants.
        return Ok(v6_closing_chains_absent()?.then_some(V6::Intercepted));
    }
    // Rejecting is the fallback only where IPv6 cannot be redirected: rules an older release
    // left (IPv6 rejected) are replaced where IPv6 can now be intercepted.
    if nat6_redirects()? {
        return Ok(None);
    }
    Ok(v6_closed()?.then_some(V6::Rejected))
}

/// Whether this namespace has an IPv6 `nat` table (`ip6table_nat`, or nftables' equivalent).
fn nat6_available() -> Result<bool, String> {
    Ok(iptables_in(Table::Nat6, &args(&["-n", "-L"]))?
        .status
        .success())
}

/// Whether IPv6 connections can be redirected here, tried with a scratch chain that is removed
/// again. That the IPv6 `nat` table can be listed is not enough: where it lists but cannot
/// `REDIRECT`, the fallback (IPv6 rejected) is what [`install`] leaves, and taking it for
/// stale would make every start remove and re-add the rules — a window without interception.
fn nat6_redirects() -> Result<bool, String> {
    let redirect = ["-p", "tcp", "-j", "REDIRECT", "--to-ports", "1"];
    Ok(probe(Table::Nat6, &redirect)?.is_ok())
}

/// Whether `rule` can be added in `t` here, tried in a scratch chain that is removed again;
/// `Err(why)` from iptables when it cannot. The chain is named after this process, so two
/// proxies probing one namespace at once do not meet in it.
fn probe(t: Table, rule: &[&str]) -> Result<Result<(), String>, String> {
    let chain = format!("TESSERA_PROBE_{}", std::process::id());
    let why = |o: std::process::Output| String::from_utf8_lossy(&o.stderr).trim().to_owned();
    remove_chain(t, &chain)?;
    let o = iptables_in(t, &args(&["-N", &chain]))?;
    if !o.status.success() {
        return Ok(Err(why(o)));
    }
    let mut add = args(&["-A", &chain]);
    add.extend(args(rule));
    let o = iptables_in(t, &add)?;
    remove_chain(t, &chain)?;
    Ok(if o.status.success() {
        Ok(())
    } else {
        Err(why(o))
    })
}

/// `p`, without the owner match where this namespace cannot have it: the kernel refuses
/// `--uid-owner` to a writer outside the user namespace that owns the network namespace (a
/// user-namespaced pod attached by a node proxy). The rules then exempt by mark alone, as
/// before the owner match existed, and say so: refusing would leave the namespace without
/// interception at all.
fn owner_where_possible(p: &RuleParams) -> Result<RuleParams, String> {
    let Some(uid) = p.uid else {
        return Ok(*p);
    };
    let uid_text = uid.to_string();
    let owner = ["-m", "owner", "--uid-owner", &uid_text, "-j", "RETURN"];
    let Err(why) = probe(Table::Nat4, &owner)? else {
        return Ok(*p);
    };
    tracing::warn!(
        uid,
        error = %why,
        "the owner match cannot be used here (a network namespace of another user namespace, or no xt_owner): the proxy's connections are exempted by mark alone, which a workload with CAP_NET_RAW can set"
    );
    Ok(RuleParams { uid: None, ..*p })
}

/// Installs the rules in the current network namespace, replacing ours if present, and says how
/// IPv6 is handled. When the same rules are in place already (a restarted or upgraded proxy),
/// they are left untouched: removing and re-adding them would open a window in which the
/// workload's traffic is not intercepted.
pub fn install(p: &RuleParams) -> Result<V6, String> {
    let p = &owner_where_possible(p)?;
    if let Some(v6) = installed(p)? {
        return Ok(v6);
    }
    if let Some(v6) = replace(p)? {
        return Ok(v6);
    }
    uninstall()?;
    let nat = rules(p);
    create(Table::Nat4, NAT_JUMPS, &nat)?;
    if !ipv6_enabled() {
        return Ok(V6::Absent);
    }
    if let Err(e) = create(Table::Nat6, NAT_JUMPS, &nat) {
        // No IPv6 NAT here (an old kernel, or a module that cannot load in a container): close
        // IPv6 TCP instead of leaving it as a way around the proxy.
        tracing::warn!(error = %e, "IPv6 cannot be intercepted here: IPv6 TCP is rejected instead");
        remove_chains(Table::Nat6, NAT_JUMPS)?;
        // REJECT needs its extension; DROP needs none, so IPv6 is closed either way.
        if let Err(e) = create(
            Table::Filter6,
            V6_CLOSED_JUMPS,
            &rules_v6_reject(Close::Reject),
        ) {
            tracing::warn!(error = %e, "IPv6 TCP cannot be rejected here: it is dropped instead");
            remove_chains(Table::Filter6, V6_CLOSED_JUMPS)?;
            create(
                Table::Filter6,
                V6_CLOSED_JUMPS,
                &rules_v6_reject(Close::Drop),
            )?;
        }
        return Ok(V6::Rejected);
    }
    Ok(V6::Intercepted)
}

/// Replaces our `nat` rules where they are in place but differ (an older release, another port
/// or mark, a jump no longer first), in one `iptables-restore --noflush` transaction per
/// family: our chains are flushed and refilled and the jumps moved to the front at once, so no
/// connection meets the namespace without interception, as one would between removing and
/// re-adding them. Where IPv6 is closed instead (no IPv6 NAT), the IPv4 rules are replaced and
/// the closing `filter` rules stay. `None` where this does not apply (ours are not all there)
/// or nothing could be changed (logged): the caller rebuilds. `Err` once a transaction went
/// through and a later step failed: rebuilding then would open the window this avoids, and
/// what is in place intercepts (the old rules or the new), so the caller stops with the error.
fn replace(p: &RuleParams) -> Result<Option<V6>, String> {
    let has_ours = |t: Table| -> Result<bool, String> {
        for (_, chain) in NAT_JUMPS {
            if !chain_exists(t, chain)? {
                return Ok(false);
            }
        }
        Ok(true)
    };
    let mut tables = vec![Table::Nat4];
    let v6 = if !ipv6_enabled() {
        V6::Absent
    } else if nat6_redirects()? {
        if !has_ours(Table::Nat6)? {
            return Ok(None);
        }
        tables.push(Table::Nat6);
        V6::Intercepted
    } else if v6_closed()? {
        V6::Rejected
    } else {
        return Ok(None);
    };
    if !has_ours(Table::Nat4)? {
        return Ok(None);
    }
    let nat = rules(p);
    for (i, t) in tables.into_iter().enumerate() {
        let mut jumps = Vec::new();
        for (builtin, chain) in NAT_JUMPS {
            let ours = format!("-A {builtin} -p tcp -j {chain}");
            let n = listed_rules(t, builtin)?
                .iter()
                .filter(|l| **l == ours)
                .count();
            jumps.push((*builtin, *chain, n));
        }
        if let Err(e) = restore(t, &restore_text(&nat, &jumps)) {
            if i == 0 {
                tracing::warn!(error = %e, "interception rules cannot be replaced in one transaction; rebuilding them");
                return Ok(None);
            }
            return Err(e);
        }
    }
    if v6 == V6::Intercepted && !v6_closing_chains_absent()? {
        // IPv6 is intercepted now: an earlier fallback's closing chains only reject the proxy's
        // own IPv6 connections. Removed after the NAT rules are in place, so IPv6 is never
        // left open in between (and only when there: a replacement touches nothing else).
        remove_chains(Table::Filter6, V6_CLOSED_JUMPS)?;
    }
    if installed(p)? != Some(v6) {
        return Err(
            "interception rules: after the replacing transaction they are not the expected ones"
                .into(),
        );
    }
    tracing::info!("interception rules replaced in one transaction");
    Ok(Some(v6))
}

/// The `iptables-restore --noflush` input that makes our `nat` chains hold `rules` and puts
/// each jump first, deleting the `existing` copies of it (`(builtin, chain, count)`).
fn restore_text(rules: &[Vec<String>], existing: &[(&str, &str, usize)]) -> String {
    let mut out = String::from("*nat\n");
    for (_, chain) in NAT_JUMPS {
        // Declaring an existing chain under --noflush flushes it.
        out.push_str(&format!(":{chain} - [0:0]\n"));
    }
    for r in rules {
        if r.first().is_some_and(|op| op == "-I") {
            continue;
        }
        out.push_str(&r.join(" "));
        out.push('\n');
    }
    for (builtin, chain, n) in existing {
        for _ in 0..*n {
            out.push_str(&format!("-D {builtin} -p tcp -j {chain}\n"));
        }
    }
    for r in rules
        .iter()
        .filter(|r| r.first().is_some_and(|op| op == "-I"))
    {
        out.push_str(&r.join(" "));
        out.push('\n');
    }
    out.push_str("COMMIT\n");
    out
}

fn restore(t: Table, text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let bin = match t {
        Table::Nat4 => "iptables-restore",
        Table::Nat6 | Table::Filter6 => "ip6tables-restore",
    };
    let mut child = Command::new(bin)
        .args(["-w", "--noflush"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {bin}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(text.as_bytes())
            .map_err(|e| format!("{bin}: {e}"))?;
    }
    let o = child
        .wait_with_output()
        .map_err(|e| format!("{bin}: {e}"))?;
    if o.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{bin} --noflush: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))
    }
}

/// The built-in chain each of our `nat` chains is jumped to from.
const NAT_JUMPS: &[(&str, &str)] = &[("OUTPUT", CHAIN_OUTPUT), ("PREROUTING", CHAIN_INBOUND)];
/// The same for the `filter` chains that close IPv6.
const V6_CLOSED_JUMPS: &[(&str, &str)] = &[("OUTPUT", CHAIN_V6_OUTPUT), ("INPUT", CHAIN_V6_INPUT)];

/// Creates our chains of `jumps` in `t`, then appends `rules` (which end with the jumps).
fn create(t: Table, jumps: &[(&str, &str)], rules: &[Vec<String>]) -> Result<(), String> {
    for (_, chain) in jumps {
        must_in(t, &["-N".to_owned(), (*chain).to_owned()])?;
    }
    for r in rules {
        must_in(t, r)?;
    }
    Ok(())
}

/// Deletes every jump from `(builtin, chain)` (there may be several after a failed install),
/// then the chains themselves.
fn remove_chains(t: Table, jumps: &[(&str, &str)]) -> Result<(), String> {
    for (builtin, chain) in jumps {
        while iptables_in(t, &args(&["-D", builtin, "-p", "tcp", "-j", chain]))?
            .status
            .success()
        {}
    }
    for (_, chain) in jumps {
        remove_chain(t, chain)?;
    }
    Ok(())
}

/// Whether `chain` exists in `t`.
fn chain_exists(t: Table, chain: &str) -> Result<bool, String> {
    Ok(iptables_in(t, &args(&["-n", "-L", chain]))?
        .status
        .success())
}

/// Flushes and deletes `chain` in `t`, if it exists (nothing may jump to it).
fn remove_chain(t: Table, chain: &str) -> Result<(), String> {
    if chain_exists(t, chain)? {
        must_in(t, &args(&["-F", chain]))?;
        must_in(t, &args(&["-X", chain]))?;
    }
    Ok(())
}

/// The rules of the built-in chain `builtin` in `t`, in order, as `-S` lists them
/// (`-A BUILTIN …`).
fn listed_rules(t: Table, builtin: &str) -> Result<Vec<String>, String> {
    let o = iptables_in(t, &args(&["-S", builtin]))?;
    Ok(if o.status.success() {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter(|l| l.starts_with("-A "))
            .map(|l| l.trim().to_owned())
            .collect()
    } else {
        Vec::new()
    })
}

/// Removes our jumps and chains from the current network namespace, both families (nothing to
/// do when absent).
pub fn uninstall() -> Result<(), String> {
    remove_chains(Table::Nat4, NAT_JUMPS)?;
    if ipv6_enabled() {
        // A kernel without IPv6 NAT cannot list that table: nothing of ours can be in it.
        if nat6_available()? {
            remove_chains(Table::Nat6, NAT_JUMPS)?;
        }
        remove_chains(Table::Filter6, V6_CLOSED_JUMPS)?;
    }
    Ok(())
}

/// The destination a redirected connection was originally addressed to (`SO_ORIGINAL_DST`, or
/// `IP6T_SO_ORIGINAL_DST` on an IPv6 socket).
pub fn original_dst(sock: &impl AsFd) -> std::io::Result<SocketAddr> {
    let local: nix::sys::socket::SockaddrStorage =
        nix::sys::socket::getsockname(sock.as_fd().as_raw_fd()).map_err(std::io::Error::from)?;
    // An IPv4 connection on a dual-stack IPv6 socket (an operator's `[::]` listener) was
    // redirected by the IPv4 rules: its original destination is the IPv4 one.
    let v6 = local
        .as_sockaddr_in6()
        .is_some_and(|a| a.ip().to_ipv4_mapped().is_none());
    if v6 {
        let sin6 = getsockopt(sock, sockopt::Ip6tOriginalDst).map_err(std::io::Error::from)?;
        // sockaddr_in6: the port in network byte order, the address as bytes.
        let ip = Ipv6Addr::from(sin6.sin6_addr.s6_addr);
        let port = u16::from_be(sin6.sin6_port);
        return Ok(SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0)));
    }
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    const PARAMS: RuleParams = RuleParams {
        tunnel_port: 15008,
        outbound_port: 15001,
        inbound_plaintext_port: 15006,
        mark: 0x5e55,
        uid: Some(1337),
    };

    #[test]
    fn the_tunnel_holds_its_port_on_every_address_and_no_inbound_port_is_the_proxys() {
        let p = PARAMS;
        let any: SocketAddr = "0.0.0.0:15008".parse().unwrap();
        assert_eq!(check_own_ports(&p, any, [8080, 9090]), Ok(()));
        for named in ["198.18.0.2:15008", "[::]:15008", "127.0.0.1:15008"] {
            let e = check_own_ports(&p, named.parse().unwrap(), [8080]).unwrap_err();
            assert!(e.contains(&format!("--tunnel-address {named}")), "{e}");
        }
        for (port, what) in [
            (15006, "inbound plaintext"),
            (15001, "outbound capture"),
            (15008, "tunnel"),
        ] {
            let e = check_own_ports(&p, any, [8080, port]).unwrap_err();
            assert!(
                e.contains(&format!("--inbound {port}")) && e.contains(what),
                "{e}"
            );
        }
    }

    #[test]
    fn a_replacement_refills_our_chains_and_moves_each_jump_first_in_one_transaction() {
        let r = rules(&PARAMS);
        let text = restore_text(
            &r,
            &[
                ("OUTPUT", CHAIN_OUTPUT, 2),
                ("PREROUTING", CHAIN_INBOUND, 0),
            ],
        );
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.first(), Some(&"*nat"));
        assert_eq!(lines.last(), Some(&"COMMIT"));
        let at = |l: &str| lines.iter().position(|x| *x == l).unwrap();
        // Flushed by being declared, then refilled.
        assert!(at(":TESSERA_OUTPUT - [0:0]") < at("-A TESSERA_OUTPUT -o lo -j RETURN"));
        assert!(lines.contains(&":TESSERA_INBOUND - [0:0]"));
        // Both old copies of a jump go, and each jump is inserted first, after the chains
        // are full.
        assert_eq!(
            lines
                .iter()
                .filter(|l| **l == "-D OUTPUT -p tcp -j TESSERA_OUTPUT")
                .count(),
            2
        );
        assert!(!lines.iter().any(|l| l.starts_with("-D PREROUTING")));
        assert!(
            at("-A TESSERA_INBOUND -i lo -j RETURN") < at("-I OUTPUT 1 -p tcp -j TESSERA_OUTPUT")
        );
        assert!(
            at("-D OUTPUT -p tcp -j TESSERA_OUTPUT") < at("-I OUTPUT 1 -p tcp -j TESSERA_OUTPUT")
        );
        assert!(lines.contains(&"-I PREROUTING 1 -p tcp -j TESSERA_INBOUND"));
    }

    #[test]
    fn rules_exempt_the_mark_and_the_tunnel_port_before_redirecting() {
        let r = rules(&PARAMS);
        let text: Vec<String> = r.iter().map(|a| a.join(" ")).collect();
        let pos = |needle: &str| {
            text.iter()
                .position(|l| l.contains(needle))
                .unwrap_or(usize::MAX)
        };
        // The exemption needs the mark and the proxy's uid: the mark alone can be set with
        // CAP_NET_RAW.
        assert!(pos("--mark 0x5e55 -m owner --uid-owner 1337 -j RETURN") < pos("--to-ports 15001"));
        assert!(!text.iter().any(|l| l.ends_with("--mark 0x5e55 -j RETURN")));
        assert!(pos("--dport 15008 -j RETURN") < pos("--to-ports 15006"));
        // First in the built-in chains, so an earlier ACCEPT cannot let traffic past.
        assert!(text.contains(&"-I OUTPUT 1 -p tcp -j TESSERA_OUTPUT".to_owned()));
        assert!(text.contains(&"-I PREROUTING 1 -p tcp -j TESSERA_INBOUND".to_owned()));
        // The jumps come last, so no packet meets a half-built chain.
        assert!(
            text.last()
                .is_some_and(|l| l.starts_with("-I PREROUTING 1"))
        );
        for (how, target) in [(Close::Reject, "-j REJECT"), (Close::Drop, "-j DROP")] {
            let v6: Vec<String> = rules_v6_reject(how).iter().map(|a| a.join(" ")).collect();
            assert!(
                v6.iter()
                    .any(|l| l.contains(&format!("TESSERA_V6_OUTPUT -p tcp {target}")))
            );
            assert!(v6.last().is_some_and(|l| l.starts_with("-I INPUT 1")));
        }
    }
}
