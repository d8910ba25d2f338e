//! Wiring: bind the listeners, wait for an identity (refusing connections until then), compile
//! the policy, serve.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use tessera_policy::{DefaultAction, PolicySet};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{DestinationMap, InboundMode, InboundPort, OutboundListener, Unmapped};
use crate::identity::Identity;
use crate::inbound::Inbound;
use crate::outbound::Outbound;
use crate::telemetry::Telemetry;

/// Transparent mode (the interception rules are installed by the caller, before the proxy has
/// an identity, so nothing leaks in plaintext while it waits).
#[derive(Debug, Clone)]
pub struct TransparentOptions {
    pub outbound_addr: SocketAddr,
    pub inbound_plaintext_addr: SocketAddr,
    pub destinations: DestinationMap,
    pub unmapped: Unmapped,
    pub inbound_mode: InboundMode,
    /// The config file `destinations` came from: its `[[destination]]` entries are read again
    /// when it changes or on SIGHUP (`crate::reload`); other settings take effect at restart.
    pub config: Option<crate::reload::WatchedFile>,
}

/// Everything `start` needs besides the identity.
#[derive(Debug, Clone)]
pub struct ProxyOptions {
    pub tunnel_addr: SocketAddr,
    pub inbound: Vec<InboundPort>,
    /// Extra addresses CONNECT may name as this workload.
    pub addresses: Vec<IpAddr>,
    pub outbound: Vec<OutboundListener>,
    pub transparent: Option<TransparentOptions>,
    /// A policy file's (name, TOML text); `None`: the policies come from the agent at
    /// `policy_socket`, or, without one, `default_action` decides.
    pub policy: Option<(String, String)>,
    /// Where `policy` was read from: read again when it changes, or on SIGHUP
    /// (`crate::live::watch_policy_file`).
    pub policy_path: Option<std::path::PathBuf>,
    /// The agent socket serving `tessera.v1.PolicyWatch` (used when `policy` is `None`).
    pub policy_socket: Option<std::path::PathBuf>,
    /// Transparent mode: the agent socket serving `tessera.v1.DestinationWatch`; the server's
    /// destination map is merged with the config file's (`crate::destinations`).
    pub destination_socket: Option<std::path::PathBuf>,
    /// Transparent mode: the server's destination map as already known (a node proxy's, for a
    /// workload it attaches), merged before the first connection is served.
    pub pushed_destinations: Option<DestinationMap>,
    /// The agent's policy snapshot as already known (a node proxy's, for a workload it
    /// attaches): in force before the first connection is served, instead of a deny until the
    /// snapshot arrives.
    pub pushed_policy: Option<tessera_proto::v1::PolicySnapshot>,
    /// External authorizers for CUSTOM policies (`[[authz_provider]]`).
    pub authz_providers: Vec<crate::authz::ProviderConfig>,
    /// How long authorized inbound connections may live.
    pub max_connection_age: crate::live::MaxConnectionAge,
    pub default_action: DefaultAction,
    pub pooling: bool,
    /// How outbound connections travel to peer proxies (the inbound side serves both).
    pub protocol: crate::tls::TunnelProtocol,
    /// Socket mark of the proxy's outbound connections (transparent mode).
    pub mark: Option<u32>,
    /// Node mode: every listener and connection is made inside this workload's network
    /// namespace (`None`: the proxy's own).
    pub netns: Option<Arc<crate::sockets::Netns>>,
}

impl ProxyOptions {
    pub fn new(tunnel_addr: SocketAddr) -> Self {
        Self {
            tunnel_addr,
            inbound: Vec::new(),
            addresses: Vec::new(),
            outbound: Vec::new(),
            transparent: None,
            policy: None,
            policy_path: None,
            policy_socket: None,
            destination_socket: None,
            pushed_destinations: None,
            pushed_policy: None,
            authz_providers: Vec::new(),
            max_connection_age: crate::live::MaxConnectionAge::Svid,
            default_action: DefaultAction::Deny,
            pooling: true,
            protocol: crate::tls::TunnelProtocol::H2,
            mark: None,
            netns: None,
        }
    }

    /// Every port this proxy listens on (the tunnel, `--outbound` listeners, the transparent
    /// capture ports): what the user it runs as must be allowed to bind.
    pub fn listen_ports(&self) -> impl Iterator<Item = u16> + '_ {
        std::iter::once(self.tunnel_addr.port())
            .chain(self.outbound.iter().map(|o| o.listen.port()))
            .chain(
                self.transparent
                    .iter()
                    .flat_map(|t| [t.outbound_addr.port(), t.inbound_plaintext_addr.port()]),
            )
    }
}

/// A started proxy.
#[derive(Debug)]
pub struct RunningProxy {
    pub tunnel_addr: SocketAddr,
    pub outbound_addrs: Vec<SocketAddr>,
    pub policy: Arc<ArcSwap<PolicySet>>,
    /// Open inbound connections (re-authorized on every policy change).
    pub connections: Arc<crate::live::Registry>,
    pub outbound: Arc<Outbound>,
    /// Transparent mode: the sources of the destination map in force.
    pub destinations: Option<Arc<crate::destinations::Sources>>,
    /// Policy and identity watchers.
    tasks: Vec<JoinHandle<()>>,
    /// Accept loops (their listeners close when they end).
    listeners: Vec<JoinHandle<()>>,
    /// Where this proxy's sockets live; its drain switch ends every connection.
    sockets: crate::sockets::Sockets,
}

impl RunningProxy {
    /// Stops listening and closes every connection at once.
    pub fn shutdown(self) {
        drop(self);
    }

    /// Closes the listeners and keeps serving the open connections (a graceful drain: with
    /// `SO_REUSEPORT`, another process's listeners take the new connections).
    pub fn stop_accepting(&mut self) {
        for t in self.listeners.drain(..) {
            t.abort();
        }
        self.sockets.stop_accepting();
    }

    /// A graceful drain that keeps the ports (no successor takes them: a sidecar): new
    /// connections are accepted and closed at once, open ones are served.
    pub fn refuse_new(&self) {
        self.sockets.refuse_new();
    }
}

impl Drop for RunningProxy {
    fn drop(&mut self) {
        for t in self.tasks.iter().chain(&self.listeners) {
            t.abort();
        }
        self.sockets.drain();
    }
}

/// Compiles a policy file (or none) for the local trust domain; the file's `default` wins over
/// `default`.
pub fn compile_policy(
    local: tessera_spiffe::TrustDomain,
    policy: Option<&(String, String)>,
    default: DefaultAction,
) -> Result<PolicySet, String> {
    match policy {
        None => Ok(PolicySet::empty(local, default)),
        Some((name, text)) => PolicySet::from_toml_or(local, text, default)
            .map_err(|e| format!("policy file {name}: {e}")),
    }
}

/// Compiles a policy file (or none) for this workload: policies whose `targets` do not cover
/// `own` are left out.
pub fn compile_policy_for(
    own: &tessera_spiffe::SpiffeId,
    policy: Option<&(String, String)>,
    default: DefaultAction,
) -> Result<PolicySet, String> {
    match policy {
        None => Ok(PolicySet::empty(own.trust_domain(), default)),
        Some((name, text)) => PolicySet::from_toml_for_workload(own, text, default)
            .map_err(|e| format!("policy file {name}: {e}")),
    }
}

async fn bind(
    sockets: &crate::sockets::Sockets,
    addr: SocketAddr,
    what: &str,
) -> Result<TcpListener, String> {
    let ns = sockets
        .netns()
        .map(|n| format!(" in network namespace {}", n.name()))
        .unwrap_or_default();
    sockets
        .listen(addr)
        .await
        .map_err(|e| format!("{what}: cannot listen on {addr}{ns}: {e}"))
}

/// The IPv6 address that goes with an IPv4 listener's: `::` with `0.0.0.0`, `::1` with
/// `127.0.0.1`. Others have none: an operator who names an address gets that address.
fn v6_twin(addr: SocketAddr) -> Option<SocketAddr> {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            Some(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), addr.port()))
        }
        IpAddr::V4(ip) if ip == Ipv4Addr::LOCALHOST => {
            Some(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port()))
        }
        _ => None,
    }
}

/// Binds `addr` and, for the IPv4 unspecified or loopback address, the same port on its IPv6
/// twin ([`v6_twin`], `IPV6_V6ONLY`), so the tunnel port and transparent interception serve
/// both families (IPv6 REDIRECT delivers to `::1` or the interface's IPv6 address). Where
/// this namespace has no IPv6 (`EAFNOSUPPORT`, `EADDRNOTAVAIL`), the IPv4 listener serves
/// alone: IPv6 traffic the rules redirect then meets a closed port, so it fails closed. Any
/// other failure on a fixed port is fatal, as it is for IPv4: a port taken by another process
/// (`EADDRINUSE`) would receive the IPv6 traffic the rules redirect there, past STRICT mode
/// and policy. An ephemeral port (`:0`, tests) only gets a twin where the same number is free.
async fn bind_with_v6(
    sockets: &crate::sockets::Sockets,
    addr: SocketAddr,
    what: &str,
) -> Result<Vec<TcpListener>, String> {
    let first = bind(sockets, addr, what).await?;
    let twin = first.local_addr().ok().and_then(v6_twin);
    let mut out = vec![first];
    if let Some(twin) = twin {
        match sockets.listen_v6_only(twin).await {
            Ok(l) => out.push(l),
            Err(e)
                if addr.port() == 0
                    || matches!(
                        e.raw_os_error(),
                        Some(nix::libc::EAFNOSUPPORT | nix::libc::EADDRNOTAVAIL)
                    ) =>
            {
                tracing::info!(%twin, error = %e, "{what}: no IPv6 listener (IPv4 only)");
            }
            Err(e) => return Err(format!("{what}: cannot listen on {twin}: {e}")),
        }
    }
    Ok(out)
}

/// Binds every listener, then waits for the first SVID, then serves. Until the proxy has an
/// identity it refuses to serve: each connection is accepted and closed at once. The ports
/// are held from the start because in transparent mode the rules are already in place: a port
/// left free while the proxy waits could be bound by the workload, which would then receive
/// redirected traffic (peers' plaintext on the plaintext or tunnel port) past STRICT mode.
pub async fn start(
    mut opts: ProxyOptions,
    identity: Arc<Identity>,
    telemetry: Arc<Telemetry>,
) -> Result<RunningProxy, String> {
    let sockets = match &opts.netns {
        Some(ns) => crate::sockets::Sockets::in_netns(ns.clone(), opts.mark),
        None => crate::sockets::Sockets::here(opts.mark),
    };
    let mut bound: Vec<(Bound, TcpListener)> = Vec::new();
    for l in bind_with_v6(&sockets, opts.tunnel_addr, "tunnel").await? {
        bound.push((Bound::Tunnel, l));
    }
    for spec in &opts.outbound {
        bound.push((
            Bound::Outbound(spec.clone()),
            bind(&sockets, spec.listen, "--outbound").await?,
        ));
    }
    // The destination map the capture port reads: the config file's, merged with the
    // server's once the agent sends it; either may change while running.
    let destinations = opts
        .transparent
        .as_mut()
        .map(|t| crate::destinations::Sources::new(std::mem::take(&mut t.destinations)));
    if let (Some(sources), Some(pushed)) = (&destinations, opts.pushed_destinations.take())
        && let Err(e) = sources.set_pushed(pushed)
    {
        tracing::error!(error = %e, "the server's destination map clashes with the config file's; the file's alone applies until it changes");
    }
    if let (Some(t), Some(sources)) = (&opts.transparent, &destinations) {
        for l in bind_with_v6(&sockets, t.outbound_addr, "transparent outbound").await? {
            bound.push((Bound::TransparentOutbound(sources.map(), t.unmapped), l));
        }
        for l in bind_with_v6(&sockets, t.inbound_plaintext_addr, "transparent inbound").await? {
            bound.push((Bound::TransparentInbound(t.inbound_mode), l));
        }
    }
    refuse_until_ready(&bound, &identity).await;
    let own = identity
        .spiffe_id()
        .ok_or_else(|| "the proxy has no identity".to_owned())?;
    let from_agent = opts.policy.is_none() && opts.policy_socket.is_some();
    let policy = if let (None, Some(snap)) = (&opts.policy, &opts.pushed_policy) {
        crate::live::compile_snapshot(&own, snap).unwrap_or_else(|e| {
            // As a refused snapshot later would be: logged, and nothing admitted by it.
            tracing::error!(error = %e, revision = snap.revision, "refusing the agent's policy snapshot; denying until a good one");
            PolicySet::empty(own.trust_domain(), DefaultAction::Deny)
        })
    } else if from_agent {
        // Until the agent's first snapshot: deny (fail closed).
        PolicySet::empty(own.trust_domain(), DefaultAction::Deny)
    } else {
        compile_policy_for(&own, opts.policy.as_ref(), opts.default_action)?
    };
    let policy = Arc::new(ArcSwap::from_pointee(policy));
    let authorizers = Arc::new(crate::authz::Authorizers::new(&opts.authz_providers)?);
    let connections = Arc::new(crate::live::Registry::default());
    connections.set_authorizers(authorizers.clone());
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(crate::live::watch_identity(
        identity.clone(),
        policy.clone(),
        connections.clone(),
    )));
    if let (Some(path), Some((name, text))) = (opts.policy_path.clone(), opts.policy.as_ref()) {
        tasks.push(tokio::spawn(crate::live::watch_policy_file(
            crate::reload::WatchedFile {
                path,
                name: name.clone(),
                loaded: text.clone(),
            },
            opts.default_action,
            identity.clone(),
            policy.clone(),
            connections.clone(),
        )));
    }
    if let (true, Some(socket)) = (from_agent, opts.policy_socket.clone()) {
        tracing::info!(socket = %socket.display(), "authorization policy from the agent (PolicyWatch)");
        tasks.push(tokio::spawn(crate::live::watch_policies(
            socket,
            identity.clone(),
            policy.clone(),
            connections.clone(),
        )));
    }

    let inbound = Arc::new(
        Inbound::new(
            identity.clone(),
            policy.clone(),
            &opts.inbound,
            opts.addresses.clone(),
            telemetry.clone(),
        )
        .with_registry(connections.clone())
        .with_authorizers(authorizers)
        .with_max_connection_age(opts.max_connection_age)
        .with_sockets(sockets.clone()),
    );
    if opts.max_connection_age == crate::live::MaxConnectionAge::Unlimited {
        tracing::warn!(
            "max_connection_age = \"unlimited\": connections may outlive the peer certificate they were authorized with"
        );
    }
    let tunnel_addr = bound
        .iter()
        .find(|(b, _)| matches!(b, Bound::Tunnel))
        .and_then(|(_, l)| l.local_addr().ok())
        .ok_or_else(|| "tunnel: no listener".to_owned())?;

    let outbound = Arc::new(
        Outbound::new(
            identity.clone(),
            telemetry.clone(),
            opts.pooling,
            sockets.clone(),
        )
        .with_protocol(opts.protocol),
    );
    let mut outbound_addrs = Vec::new();
    let mut listeners: Vec<JoinHandle<()>> = Vec::new();
    let sources_in_force = destinations.clone();
    if let (Some(t), Some(sources)) = (opts.transparent, destinations) {
        if let Some(socket) = opts.destination_socket.clone() {
            tracing::info!(socket = %socket.display(), "destination map from the server (DestinationWatch), merged with the config file's");
            tasks.push(tokio::spawn(crate::destinations::watch(
                socket,
                sources.clone(),
            )));
        }
        if let Some(file) = t.config {
            tasks.push(tokio::spawn(crate::reload::watch(file.clone(), move |text| {
                // Only the destination map changes while running; a file that does not parse,
                // or whose entries clash with the server's, leaves the map in force (a dropped
                // entry would turn a mapped destination into an unmapped one).
                let f = crate::config::parse_file(&file.name, text).map_err(|e| e.to_string())?;
                let entries = sources.set_local(f.destinations)?;
                tracing::info!(
                    entries,
                    "destination map replaced (the file's other settings take effect at restart)"
                );
                Ok(())
            })));
        }
        if t.inbound_mode == InboundMode::Permissive {
            tracing::warn!(
                "inbound mode PERMISSIVE: plaintext connections WITHOUT identity reach declared ports where policy allows them (rules with `from.unauthenticated`)"
            );
        }
    }
    for (what, l) in bound {
        listeners.push(match what {
            Bound::Tunnel => tokio::spawn(inbound.clone().serve_tunnel(l)),
            Bound::Outbound(spec) => {
                outbound_addrs.push(l.local_addr().map_err(|e| e.to_string())?);
                tokio::spawn(outbound.clone().serve_explicit(l, spec))
            }
            Bound::TransparentOutbound(map, unmapped) => {
                tokio::spawn(outbound.clone().serve_transparent(l, map, unmapped))
            }
            Bound::TransparentInbound(mode) => {
                tokio::spawn(inbound.clone().serve_plaintext(l, mode))
            }
        });
    }
    tracing::info!(spiffe_id = %own, %tunnel_addr, "proxy serving");
    Ok(RunningProxy {
        tunnel_addr,
        outbound_addrs,
        policy,
        connections,
        outbound,
        destinations: sources_in_force,
        tasks,
        listeners,
        sockets,
    })
}

/// What a listener bound at start is for, with what its serve loop needs.
enum Bound {
    Tunnel,
    Outbound(OutboundListener),
    TransparentOutbound(Arc<ArcSwap<DestinationMap>>, Unmapped),
    TransparentInbound(InboundMode),
}

/// Until `identity` is ready, accepts on every listener and closes what arrives: the proxy
/// refuses to serve without an identity, but holds its ports.
async fn refuse_until_ready(bound: &[(Bound, TcpListener)], identity: &Identity) {
    if identity.is_ready() {
        return;
    }
    let mut refusers: Vec<_> = bound
        .iter()
        .map(|(_, l)| {
            Box::pin(async move {
                loop {
                    let (conn, peer) = crate::sockets::accept(l).await;
                    tracing::debug!(%peer, "no identity yet: connection closed");
                    drop(conn);
                }
            })
        })
        .collect();
    // Every refuser is polled on each wake-up: a handful of listeners, none of them busy.
    let refuse = std::future::poll_fn(|cx| {
        for r in &mut refusers {
            let _ = r.as_mut().poll(cx);
        }
        std::task::Poll::<()>::Pending
    });
    tokio::select! {
        () = identity.wait_ready() => {}
        () = refuse => {}
    }
}

/// The default transparent listeners: capture on loopback, plaintext on every address.
pub fn default_transparent_addrs() -> (SocketAddr, SocketAddr) {
    (
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::LOCALHOST),
            crate::config::OUTBOUND_CAPTURE_PORT,
        ),
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            crate::config::INBOUND_PLAINTEXT_PORT,
        ),
    )
}
