//! `tessera proxy` and `tessera proxy uninstall-rules`: flags → `tessera_proxy` options.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use tessera_policy::DefaultAction;
use tessera_proxy::config::{self, InboundMode, InboundPort, OutboundListener, Unmapped};
use tessera_proxy::transparent::{self, RuleParams};
use tessera_proxy::{Identity, ProxyOptions, Telemetry, TransparentOptions};

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct ProxyArgs {
    #[command(subcommand)]
    cmd: Option<ProxyCommand>,
    #[command(flatten)]
    run: ProxyRunArgs,
}

#[derive(Debug, Subcommand)]
enum ProxyCommand {
    /// Remove the interception rules of `--transparent` from this network namespace.
    UninstallRules,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum DefaultArg {
    Deny,
    Allow,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum MaxAgeArg {
    /// Close a connection when the peer certificate it was authorized with expires.
    Svid,
    /// No limit (logged at start).
    Unlimited,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum UnmappedArg {
    /// Refuse connections to destinations without a `[[destination]]` entry.
    Deny,
    /// Pass them through in plaintext (logged).
    Passthrough,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum InboundModeArg {
    /// Mutual TLS only.
    Strict,
    /// Also plaintext to declared ports, without identity, where policy allows unauthenticated
    /// callers (`from.unauthenticated`); logged loudly.
    Permissive,
}

#[derive(Debug, Args)]
struct ProxyRunArgs {
    /// The Workload API socket (`unix:///path` or a path).
    #[arg(long, env = "SPIFFE_ENDPOINT_SOCKET")]
    workload_socket: Option<String>,
    /// Proxy config file (TOML): `[[destination]]` cidr/ports/spiffe_id, `unmapped`,
    /// `inbound_mode`, `policy_file`, `[[authz_provider]]`. A sidecar reads its destination map
    /// again when the file changes or on SIGHUP, and merges it with the server's
    /// (`tessera destination`, pushed by the agent); the other settings take effect at restart.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Local authorization policy file (TOML), read again when it changes or on SIGHUP (live
    /// connections are then decided again; a bad edit is logged and the policy in force
    /// stays). Without one (and without `--default-policy`),
    /// the policies come from the agent (`tessera.v1.PolicyWatch` on the Workload API socket),
    /// pushed as they change, with the trust domain's default.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Decision when no ALLOW policy exists (default: deny). Given without `--policy`, this
    /// alone decides and no policy is taken from the agent.
    #[arg(long, value_enum)]
    default_policy: Option<DefaultArg>,
    /// How long an authorized inbound connection may live.
    #[arg(long, value_enum, default_value = "svid")]
    max_connection_age: MaxAgeArg,
    /// A port of this workload reachable through the tunnel: `PORT` or `PORT:http`. Repeatable.
    #[arg(long = "inbound", value_name = "PORT[:http]")]
    inbound: Vec<InboundPort>,
    /// An explicit outbound listener: `LISTEN=HOST:PORT,SPIFFE_ID`. Repeatable.
    #[arg(long = "outbound", value_name = "LISTEN=HOST:PORT,SPIFFE_ID")]
    outbound: Vec<OutboundListener>,
    /// Where the mTLS tunnel listens (`0.0.0.0` also listens on `::`, same port, where the
    /// namespace has IPv6).
    #[arg(long, default_value = "0.0.0.0:15008")]
    tunnel_address: SocketAddr,
    /// Extra addresses a CONNECT may name as this workload (besides the one it arrived on).
    #[arg(long = "address")]
    addresses: Vec<IpAddr>,
    /// Intercept this network namespace's TCP with iptables (needs CAP_NET_ADMIN).
    #[arg(long)]
    transparent: bool,
    /// Transparent mode: what to do with destinations missing from the destination map.
    #[arg(long, value_enum)]
    unmapped: Option<UnmappedArg>,
    /// Transparent mode: STRICT (default) or PERMISSIVE inbound.
    #[arg(long, value_enum)]
    inbound_mode: Option<InboundModeArg>,
    /// Open a new tunnel connection (full handshake) for every proxied connection.
    #[arg(long)]
    no_pool: bool,
    /// How outbound connections travel to peer proxies: `h2` (HTTP/2 CONNECT, pooled, HBONE) or
    /// `stream` (one mutual-TLS connection per connection: the fast path for throughput and
    /// latency). The inbound side always serves both.
    #[arg(long, default_value = "h2", value_name = "h2|stream")]
    tunnel_protocol: tessera_proxy::tls::TunnelProtocol,
    /// Socket mark of the proxy's own connections in transparent mode (default 0x5e55).
    #[arg(long, requires = "transparent")]
    mark: Option<u32>,
    /// Run as this user (USER[:GROUP], names or numbers) once set up: after the interception
    /// rules are installed (they then exempt this user's marked connections, not root's) and
    /// the access log is open, keeping only CAP_NET_ADMIN (for the mark; none outside
    /// transparent mode), and CAP_NET_BIND_SERVICE when it listens on a port below 1024. The
    /// Workload API socket and the --config and --policy files must be reachable by it.
    #[arg(long, value_name = "USER[:GROUP]", conflicts_with = "node")]
    user: Option<String>,
    /// Worker threads of the proxy (default: half the cores, at most 2).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    threads: Option<u16>,
    /// Serve /live, /ready and /metrics here. Ready: the proxy has its X509-SVID; in node mode,
    /// it serves every workload the agent announced (an upgrade stops the old process only
    /// then). Not ready while draining.
    #[arg(long)]
    health_bind_address: Option<SocketAddr>,
    /// Append the access log (JSON lines) to this file instead of stdout.
    #[arg(long)]
    access_log: Option<PathBuf>,
    /// Node mode: serve every workload enrolled with this node's agent (`tessera workload
    /// attach`), each inside its own network namespace with its own SVID, from the agent's
    /// delegated identity stream (this proxy's identity must be in the agent's
    /// `authorized_delegates`). `--inbound`, `--transparent` and the rest apply to every workload.
    #[arg(long, requires = "agent_admin_socket")]
    node: bool,
    /// Node mode: the agent's admin socket.
    #[arg(long, value_name = "PATH", requires = "node")]
    agent_admin_socket: Option<PathBuf>,
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// Worker threads when `--threads` is not given: a sidecar shares its node with the workload it
/// serves, so it takes half the cores, at most two. On a two-core machine one worker proxies
/// faster than two: every wake-up of a second worker is a cross-CPU hand-off (measured in
/// BENCHMARKS.md).
fn default_threads() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (cores / 2).clamp(1, 2)
}

pub(crate) fn proxy(a: ProxyArgs) -> anyhow::Result<ExitCode> {
    match a.cmd {
        Some(ProxyCommand::UninstallRules) => {
            transparent::uninstall().map_err(anyhow::Error::msg)?;
            outln!("interception rules removed");
            Ok(ExitCode::SUCCESS)
        }
        None => run(a.run),
    }
}

fn read(path: &PathBuf, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("{what} {}", path.display()))
}

/// Each `--inbound` port once (one port cannot be carried both as bytes and as HTTP requests
/// decided one by one), and never the tunnel's own port: a CONNECT to it would make the proxy
/// tunnel into itself.
fn inbound_ports_are_distinct(inbound: &[config::InboundPort], tunnel: u16) -> anyhow::Result<()> {
    let mut seen = std::collections::BTreeSet::new();
    for p in inbound {
        if p.port == tunnel {
            bail!(
                "--inbound {}: that is the tunnel's port (--tunnel-address); the application must listen on another",
                p.port
            );
        }
        if !seen.insert(p.port) {
            bail!(
                "--inbound {} is given more than once: give each port once, as PORT (TCP) or PORT:http",
                p.port
            );
        }
    }
    Ok(())
}

fn run(a: ProxyRunArgs) -> anyhow::Result<ExitCode> {
    let socket = match (&a.workload_socket, a.node) {
        (Some(s), _) => tessera_proxy::identity::socket_path(s)
            .map_err(|e| anyhow::anyhow!("--workload-socket / SPIFFE_ENDPOINT_SOCKET: {e}"))?,
        // Node mode: identities come from the agent's delegated stream.
        (None, true) => PathBuf::new(),
        (None, false) => {
            bail!("no Workload API socket: set --workload-socket or SPIFFE_ENDPOINT_SOCKET")
        }
    };
    if a.node && (a.policy.is_some() || a.default_policy.is_some()) {
        bail!(
            "--node: each workload's policies come from the agent; --policy and --default-policy do not apply"
        );
    }
    let config_text = match &a.config {
        Some(p) => Some(read(p, "--config")?),
        None => None,
    };
    let file = match (&a.config, &config_text) {
        (Some(p), Some(text)) => config::parse_file(&p.display().to_string(), text)?,
        _ => config::FileConfig::default(),
    };
    let policy_path = a.policy.clone().or(file.policy_file.clone());
    let default_action = match a.default_policy {
        None | Some(DefaultArg::Deny) => DefaultAction::Deny,
        Some(DefaultArg::Allow) => DefaultAction::Allow,
    };
    let policy = match &policy_path {
        Some(p) => {
            // Named as the user gave it: the flag, or the config file's key.
            let what = if a.policy.is_some() {
                "--policy"
            } else {
                "policy_file (--config)"
            };
            Some((p.display().to_string(), read(p, what)?))
        }
        None => None,
    };
    // Check the policy now, so a bad file fails before anything is installed. The trust domain
    // only gives `*` its meaning; the real one is used once the proxy has its SVID.
    let probe = tessera_spiffe::TrustDomain::new("policy-check.invalid")?;
    tessera_proxy::run::compile_policy(probe, policy.as_ref(), default_action)
        .map_err(anyhow::Error::msg)?;
    if a.inbound.is_empty() && a.outbound.is_empty() && !a.transparent {
        bail!("nothing to do: give --inbound, --outbound or --transparent");
    }
    inbound_ports_are_distinct(&a.inbound, a.tunnel_address.port())?;
    let unmapped = match a.unmapped {
        Some(UnmappedArg::Deny) => Unmapped::Deny,
        Some(UnmappedArg::Passthrough) => Unmapped::Passthrough,
        None => file.unmapped.unwrap_or_default(),
    };
    let inbound_mode = match a.inbound_mode {
        Some(InboundModeArg::Strict) => InboundMode::Strict,
        Some(InboundModeArg::Permissive) => InboundMode::Permissive,
        None => file.inbound_mode.unwrap_or_default(),
    };
    if !a.transparent && (a.unmapped.is_some() || a.inbound_mode.is_some()) {
        bail!("--unmapped and --inbound-mode apply only with --transparent");
    }

    let run_as = a
        .user
        .as_deref()
        .map(tessera_proxy::privileges::RunAs::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--user: {e}"))?;

    tessera_telemetry::init_logging(&a.log_level).map_err(anyhow::Error::msg)?;
    let mut opts = ProxyOptions::new(a.tunnel_address);
    opts.inbound = a.inbound;
    opts.outbound = a.outbound;
    opts.addresses = a.addresses;
    if policy.is_none() && a.default_policy.is_none() {
        opts.policy_socket = Some(socket.clone());
    }
    opts.authz_providers = file.authz_providers.clone();
    // Read again when it changes (or on SIGHUP); a bad edit keeps the policy in force.
    opts.policy_path = policy.as_ref().and(policy_path);
    opts.policy = policy;
    opts.default_action = default_action;
    opts.max_connection_age = match a.max_connection_age {
        MaxAgeArg::Svid => tessera_proxy::live::MaxConnectionAge::Svid,
        MaxAgeArg::Unlimited => tessera_proxy::live::MaxConnectionAge::Unlimited,
    };
    opts.pooling = !a.no_pool;
    opts.protocol = a.tunnel_protocol;
    let mut node_rules = None;
    if a.transparent {
        let (outbound_addr, inbound_plaintext_addr) =
            tessera_proxy::run::default_transparent_addrs();
        let params = RuleParams {
            tunnel_port: a.tunnel_address.port(),
            outbound_port: outbound_addr.port(),
            inbound_plaintext_port: inbound_plaintext_addr.port(),
            mark: a.mark.unwrap_or(config::DEFAULT_MARK),
            // The user the proxy runs as once set up: its connections, and no one else's.
            uid: Some(run_as.map_or_else(transparent::own_uid, |r| r.uid)),
        };
        transparent::check_own_ports(
            &params,
            a.tunnel_address,
            opts.inbound.iter().map(|i| i.port),
        )
        .map_err(anyhow::Error::msg)?;
        if a.node {
            // Installed in each workload's namespace when it is attached.
            node_rules = Some(params);
        } else {
            // Rules first: until the proxy has an identity, intercepted traffic is accepted and
            // closed at once (fails closed) instead of leaving in plaintext.
            let v6 = transparent::install(&params).map_err(anyhow::Error::msg)?;
            tracing::info!(
                ipv6 = ?v6,
                "interception rules installed (they stay after exit; `tessera proxy uninstall-rules` removes them)"
            );
        }
        opts.mark = Some(a.mark.unwrap_or(config::DEFAULT_MARK));
        if !a.node {
            // The server's destination map, merged with the config file's.
            opts.destination_socket = Some(socket.clone());
        }
        opts.transparent =
            Some(TransparentOptions {
                outbound_addr,
                inbound_plaintext_addr,
                destinations: file.destinations,
                unmapped,
                inbound_mode,
                // Sidecar mode reads the destination map again when the file changes; a node
                // proxy reads it once (each workload's proxy would watch the same file).
                config: a.config.clone().zip(config_text).filter(|_| !a.node).map(
                    |(path, loaded)| tessera_proxy::reload::WatchedFile {
                        name: path.display().to_string(),
                        path,
                        loaded,
                    },
                ),
            });
        if unmapped == Unmapped::Passthrough {
            tracing::warn!(
                "--unmapped passthrough: destinations without an identity leave in PLAINTEXT"
            );
        }
    }
    let sink: Box<dyn std::io::Write + Send> = match &a.access_log {
        Some(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("--access-log {}", p.display()))?,
        ),
        None => Box::new(std::io::stdout()),
    };
    // Before the runtime: no other thread may exist yet (capabilities are per thread).
    if let Some(to) = run_as {
        use tessera_proxy::privileges::{Keep, become_user, needs_bind_service};
        let keep = Keep {
            // Only where the proxy marks its connections (transparent mode).
            net_admin: opts.mark.is_some(),
            // Only where a listener, bound later on the runtime, needs it.
            net_bind_service: needs_bind_service(
                opts.listen_ports()
                    .chain(a.health_bind_address.map(|h| h.port())),
            ),
        };
        become_user(to, keep).map_err(anyhow::Error::msg)?;
        tracing::info!(
            uid = to.uid,
            gid = to.gid,
            capabilities = match (keep.net_admin, keep.net_bind_service) {
                (true, true) => "CAP_NET_ADMIN, CAP_NET_BIND_SERVICE",
                (true, false) => "CAP_NET_ADMIN",
                (false, true) => "CAP_NET_BIND_SERVICE",
                (false, false) => "none",
            },
            "running as the proxy's user"
        );
    }
    let threads = a.threads.map_or_else(default_threads, usize::from);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    if let (true, Some(admin)) = (a.node, a.agent_admin_socket.clone()) {
        return rt.block_on(node(opts, node_rules, sink, admin, a.health_bind_address));
    }
    rt.block_on(async move {
        let mut registry = prometheus_client::registry::Registry::default();
        let telemetry = Arc::new(Telemetry::new(&mut registry, sink));
        let identity = Identity::new();
        tokio::spawn(tessera_proxy::identity::watch_workload_api(
            socket,
            identity.clone(),
        ));
        // Not ready while draining either (as Envoy's /ready): it takes no new connection.
        let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (id, stopping) = (identity.clone(), draining.clone());
        serve_health(a.health_bind_address, registry, move || {
            if stopping.load(std::sync::atomic::Ordering::SeqCst) {
                Err("draining: no new connections")
            } else if id.is_ready() {
                Ok(())
            } else {
                Err("no X509-SVID from the Workload API yet")
            }
        })
        .await?;
        let running = tessera_proxy::start(opts, identity, telemetry.clone())
            .await
            .map_err(anyhow::Error::msg)?;
        // Like Ctrl-C, SIGTERM drains instead of cutting the workload's connections.
        // From here on a signal is never lost: the first starts the drain, a second ends it.
        let mut signals = crate::cli::StopSignals::new()?;
        signals.next().await;
        draining.store(true, std::sync::atomic::Ordering::SeqCst);
        // Live re-authorization, rotation and policy updates go on for what is still open.
        let mut drain = Drain::start(signals);
        // The ports stay held (nothing succeeds a sidecar on them while it drains): let go,
        // they could be bound by the workload, which the rules would then deliver to.
        running.refuse_new();
        while drain.pending(&telemetry) {
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                () = drain.stopped_again() => break,
            }
        }
        drain.done(&telemetry);
        running.shutdown();
        Ok(ExitCode::SUCCESS)
    })
}

/// A stopping proxy's drain: it takes no new connection (a sidecar holds its ports and closes
/// what arrives; a node proxy closes its listeners, and its successor's take the connections;
/// in transparent mode the rules stay, so nothing leaves uninspected) and the open connections
/// may finish, for at most [`Drain::LIMIT`]; a second Ctrl-C or SIGTERM ends it at once.
struct Drain {
    deadline: tokio::time::Instant,
    /// The signals that started the drain, still listened to.
    signals: crate::cli::StopSignals,
}

impl Drain {
    /// Kubernetes' default termination grace period.
    const LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

    /// `signals`: the ones that started the drain, still listening, so a second signal that
    /// came meanwhile counts.
    fn start(signals: crate::cli::StopSignals) -> Self {
        tracing::info!("draining: no new connections, open ones finish (at most 30 s)");
        Self {
            deadline: tokio::time::Instant::now() + Self::LIMIT,
            signals,
        }
    }

    /// Whether connections are still open and the limit is not reached.
    fn pending(&self, telemetry: &Telemetry) -> bool {
        telemetry.active_connections() > 0 && tokio::time::Instant::now() < self.deadline
    }

    /// Resolves on a second Ctrl-C or SIGTERM, which ends the drain at once (cancel-safe: a
    /// signal that comes while this is not awaited is kept).
    async fn stopped_again(&mut self) {
        self.signals.next().await;
        tracing::info!("stopped again: the open connections are not waited for");
    }

    fn done(self, telemetry: &Telemetry) {
        tracing::info!(open = telemetry.active_connections(), "drained: exiting");
    }
}

/// Node mode: one instance per enrolled workload, driven by the agent's delegated stream. On
/// Ctrl-C or SIGTERM (an upgrade: the new process has bound the same ports with SO_REUSEPORT)
/// the listeners close and open connections finish, for at most 30 s.
async fn node(
    template: ProxyOptions,
    rules: Option<RuleParams>,
    sink: Box<dyn std::io::Write + Send>,
    admin: PathBuf,
    health: Option<SocketAddr>,
) -> anyhow::Result<ExitCode> {
    use tessera_proxy::node::{NodeProxy, WorkloadEvent};
    let mut registry = prometheus_client::registry::Registry::default();
    let telemetry = Arc::new(Telemetry::new(&mut registry, sink));
    let mut node = NodeProxy::new(template, rules, telemetry.clone());
    // Ready once the agent's stream has announced every workload and each is served: an
    // upgrade stops the old process only then (a DaemonSet's readiness gate, or a script
    // polling `/ready`), so no workload's ports are left to the old process alone.
    let ready = node.readiness();
    serve_health(health, registry, move || {
        if ready.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err("not serving every workload of the agent's delegated stream yet (or draining)")
        }
    })
    .await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    std::thread::Builder::new()
        .name("delegated-stream".into())
        .spawn(move || tessera_proxy::node::follow_agent(admin, tx))?;
    let mut signals = crate::cli::StopSignals::new()?;
    loop {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                let ev = as_update(&node, ev);
                if let Err(e) = node.apply(ev).await {
                    tracing::error!(error = %e, "node proxy");
                }
            }
            () = signals.next() => break,
        }
    }
    let mut drain = Drain::start(signals);
    node.stop_accepting();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(100));
    while drain.pending(&telemetry) {
        tokio::select! {
            // A draining process still obeys the agent for the connections it holds: a
            // detach closes them, a policy change re-authorizes them, a rotated SVID is
            // installed. It serves no new workload (the new process does).
            Some(ev) = rx.recv() => {
                let ev = as_update(&node, ev);
                if matches!(ev, WorkloadEvent::Attached { .. }) {
                    continue;
                }
                if let Err(e) = node.apply(ev).await {
                    tracing::error!(error = %e, "node proxy (draining)");
                }
            }
            _ = tick.tick() => {}
            () = drain.stopped_again() => break,
        }
    }
    drain.done(&telemetry);
    Ok(ExitCode::SUCCESS)
}

/// Serves /live, /ready (`ready` says why not) and /metrics of `registry` at `addr`, when set.
async fn serve_health(
    addr: Option<SocketAddr>,
    registry: prometheus_client::registry::Registry,
    ready: impl Fn() -> Result<(), &'static str> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let Some(addr) = addr else {
        return Ok(());
    };
    let router = tessera_telemetry::router(
        Arc::new(Mutex::new(registry)),
        tessera_telemetry::ready_when(ready),
    );
    let (bound, _) = tessera_telemetry::serve(addr, router, std::future::pending())
        .await
        .with_context(|| format!("--health-bind-address {addr}"))?;
    tracing::info!(address = %bound, "health endpoint: /live, /ready, /metrics");
    Ok(())
}

/// After a reconnect the agent sends every workload again as `attached`: for a workload served
/// here that is an SVID update, which also counts it as announced for the resync (a draining
/// process must not let the end of a resync close what it still serves).
fn as_update(
    node: &tessera_proxy::node::NodeProxy,
    ev: tessera_proxy::node::WorkloadEvent,
) -> tessera_proxy::node::WorkloadEvent {
    use tessera_proxy::node::WorkloadEvent;
    match ev {
        WorkloadEvent::Attached { id, svid, .. } if node.instance(&id).is_some() => {
            WorkloadEvent::Svid { id, svid }
        }
        ev => ev,
    }
}
