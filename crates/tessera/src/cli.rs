//! Command-line surface: clap definitions and dispatch to the component that does the work.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::admin_cli::{
    self, AdminConn, AgentCommand, BundleCommand, EntryCommand, SvidMintArgs, TokenCommand,
};
use crate::{agent_cli, inspect, proxy_cli};

#[derive(Debug, Parser)]
#[command(
    name = "tessera",
    version,
    about = "Zero-trust workload identity (SPIFFE) and mutual TLS"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub(crate) enum Output {
    /// Human-readable text.
    #[default]
    Human,
    /// JSON, for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (the control plane of one trust domain).
    #[command(subcommand)]
    Server(ServerCommand),
    /// Registration entries (admin API).
    Entry {
        #[command(subcommand)]
        cmd: EntryCommand,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Join tokens for node attestation (admin API).
    Token {
        #[command(subcommand)]
        cmd: TokenCommand,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// The node agent (`run`, `api …`) and attested agents (admin API: list, show, ban, evict).
    Agent {
        #[command(subcommand)]
        cmd: AgentCmd,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// A whole trust domain in one process: server (SQLite) and an attested agent.
    Dev(agent_cli::DevArgs),
    /// The trust bundle (admin API).
    Bundle {
        #[command(subcommand)]
        cmd: BundleCommand,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Forced rotation of the signing authorities: prepare → activate → taint → revoke.
    Authority {
        #[command(subcommand)]
        cmd: crate::authority_cli::AuthorityCommand,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Federation with other trust domains (admin API).
    Federation {
        #[command(subcommand)]
        cmd: crate::federation_cli::FederationCommand,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Authorization policies (admin API): create|apply -f FILE, list, show, delete.
    Policy {
        #[command(subcommand)]
        cmd: crate::policy_cli::PolicyCommand,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// The destination map of transparent interception (admin API): which SPIFFE ID must
    /// answer at an address and port; create|apply NAME --cidr --port --spiffe-id (or -f
    /// FILE), list, show, delete.
    Destination {
        #[command(subcommand)]
        cmd: crate::destination_cli::DestinationCommand,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Node mode: attach workloads to this node's agent by network namespace (what a CNI
    /// plugin calls), detach them, list them.
    Workload {
        #[command(subcommand)]
        cmd: crate::workload_cli::WorkloadCommand,
        /// The agent's admin socket (`tessera agent run --agent-admin-socket`).
        #[arg(
            long,
            env = "TESSERA_AGENT_ADMIN_SOCKET",
            default_value = "/run/tessera/agent-admin.sock",
            global = true
        )]
        agent_admin_socket: PathBuf,
        #[arg(long, value_enum, default_value = "human", global = true)]
        output: Output,
    },
    /// SPIFFE ID tools.
    #[command(subcommand)]
    Id(IdCommand),
    /// X509-SVID tools.
    #[command(subcommand)]
    Svid(SvidCommand),
    /// The data-plane proxy: mutual TLS between workloads, authorized by SPIFFE ID
    /// (`uninstall-rules` removes the interception rules of `--transparent`).
    Proxy(proxy_cli::ProxyArgs),
    /// Exit 0 when a health endpoint (server, agent or proxy) says it is ready.
    Healthcheck {
        /// The process's --health-bind-address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        address: std::net::SocketAddr,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCmd {
    /// Run the node agent until Ctrl-C.
    ///
    /// The agent serves the SPIFFE Workload API and Envoy SDS v3
    /// (envoy.service.secret.v3.SecretDiscoveryService) on the same socket. SDS resource names:
    /// `default` (the caller's first X509-SVID), a SPIFFE ID (that SVID), `ROOTCA` (the agent's
    /// trust domain's bundle), `ALL` (every bundle the caller may use, in one SPIFFE validator),
    /// `spiffe://<trust domain>` (that bundle); no name: everything. The three names are set in the
    /// config's [sds] table (see --print-default-config).
    Run(Box<agent_cli::AgentRunArgs>),
    /// Workload API client verbs (like `spire-agent api`).
    #[command(subcommand)]
    Api(agent_cli::ApiCommand),
    #[command(flatten)]
    Admin(AgentCommand),
}

#[derive(Debug, Subcommand)]
enum ServerCommand {
    /// Run the server until Ctrl-C.
    Run(ServerRunArgs),
}

#[derive(Debug, Args)]
struct ServerRunArgs {
    /// TOML configuration file; flags below override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print a commented default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    #[arg(long)]
    trust_domain: Option<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    bind_address: Option<std::net::SocketAddr>,
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    #[arg(long)]
    health_bind_address: Option<std::net::SocketAddr>,
    /// `sqlite:///path` or `postgres://…`.
    #[arg(long)]
    datastore_url: Option<String>,
    #[arg(long)]
    log_level: Option<String>,
    /// Serve the trust domain's bundle here (bundle_endpoint.bind_address).
    #[arg(long)]
    bundle_endpoint_bind_address: Option<std::net::SocketAddr>,
    /// `https_spiffe` (the server's SVID) or `https_web` (with the cert and key below).
    #[arg(long, value_parser = ["https_spiffe", "https_web"])]
    bundle_endpoint_profile: Option<String>,
    #[arg(long)]
    bundle_endpoint_cert_path: Option<PathBuf>,
    #[arg(long)]
    bundle_endpoint_key_path: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum IdCommand {
    /// Check a SPIFFE ID against the SPIFFE-ID standard; exit 0 when valid.
    Check(IdCheckArgs),
}

#[derive(Debug, Args)]
struct IdCheckArgs {
    /// The SPIFFE ID, e.g. spiffe://example.org/ns/web.
    id: String,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum SvidCommand {
    /// Mint an X509-SVID for a tool (the key is made locally; the server signs a CSR).
    Mint {
        #[command(flatten)]
        args: SvidMintArgs,
        #[command(flatten)]
        conn: AdminConn,
    },
    /// Show an X509-SVID (PEM or DER chain) and every X509-SVID rule it breaks; exit 0 when it
    /// is a valid SVID (and, with --bundle, verifies against it).
    Inspect(SvidInspectArgs),
}

#[derive(Debug, Args)]
pub(crate) struct SvidInspectArgs {
    /// A certificate chain, leaf first: PEM (one or more CERTIFICATE blocks) or DER (one or more
    /// concatenated certificates).
    pub(crate) file: PathBuf,
    /// Also verify the chain against a trust bundle: SPIFFE bundle JSON, or PEM CA certificates
    /// taken as the bundle of the leaf's trust domain.
    #[arg(long)]
    pub(crate) bundle: Option<PathBuf>,
    /// Trust domain of a SPIFFE bundle JSON given with --bundle (default: the leaf's).
    #[arg(long, requires = "bundle")]
    pub(crate) trust_domain: Option<String>,
    #[arg(long, value_enum, default_value_t)]
    pub(crate) output: Output,
}

pub(crate) fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Id(IdCommand::Check(a)) => Ok(inspect::id_check(&a.id, a.output)),
        Command::Svid(SvidCommand::Inspect(a)) => inspect::svid_inspect(&a),
        Command::Svid(SvidCommand::Mint { args, conn }) => {
            block_on(admin_cli::svid_mint(&conn, args))
        }
        Command::Entry { cmd, conn } => block_on(admin_cli::entry(&conn, cmd)),
        Command::Token { cmd, conn } => block_on(admin_cli::token(&conn, cmd)),
        Command::Agent {
            cmd: AgentCmd::Admin(cmd),
            conn,
        } => block_on(admin_cli::agent(&conn, cmd)),
        Command::Agent {
            cmd: AgentCmd::Run(a),
            ..
        } => agent_cli::agent_run(*a),
        Command::Agent {
            cmd: AgentCmd::Api(a),
            ..
        } => block_on(agent_cli::api(a)),
        Command::Dev(a) => agent_cli::dev(a),
        Command::Bundle { cmd, conn } => block_on(admin_cli::bundle(&conn, cmd)),
        Command::Authority { cmd, conn } => block_on(crate::authority_cli::run(&conn, cmd)),
        Command::Federation { cmd, conn } => {
            block_on(crate::federation_cli::federation(&conn, cmd))
        }
        Command::Policy { cmd, conn } => block_on(crate::policy_cli::policy(&conn, cmd)),
        Command::Destination { cmd, conn } => {
            block_on(crate::destination_cli::destination(&conn, cmd))
        }
        Command::Healthcheck { address } => block_on(admin_cli::healthcheck(address)),
        Command::Server(ServerCommand::Run(a)) => server_run(a),
        Command::Proxy(a) => proxy_cli::proxy(a),
        Command::Workload {
            cmd,
            agent_admin_socket,
            output,
        } => crate::workload_cli::run(&agent_admin_socket, output, cmd),
    }
}

fn block_on<F: std::future::Future<Output = anyhow::Result<ExitCode>>>(
    f: F,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn server_run(a: ServerRunArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context as _;
    use tessera_server::ServerConfig;
    if a.print_default_config {
        out!("{}", ServerConfig::default_toml());
        return Ok(ExitCode::SUCCESS);
    }
    let mut cfg = match &a.config {
        Some(p) => ServerConfig::load(p)?,
        None => ServerConfig::default(),
    };
    if let Some(td) = &a.trust_domain {
        cfg.trust_domain = tessera_spiffe::TrustDomain::new(td)
            .with_context(|| format!("--trust-domain {td:?}"))?;
    }
    if let Some(v) = a.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = a.bind_address {
        cfg.bind_address = v;
    }
    if let Some(v) = a.admin_socket {
        cfg.admin_socket = v;
    }
    if let Some(v) = a.health_bind_address {
        cfg.health_bind_address = v;
    }
    if let Some(v) = a.datastore_url {
        cfg.datastore.url = v;
    }
    if let Some(v) = a.log_level {
        cfg.log_level = v;
    }
    if let Some(v) = a.bundle_endpoint_bind_address {
        cfg.bundle_endpoint.bind_address = Some(v);
    }
    if let Some(v) = a.bundle_endpoint_profile {
        use tessera_server::config::BundleEndpointProfile as P;
        cfg.bundle_endpoint.profile = if v == "https_web" {
            P::HttpsWeb
        } else {
            P::HttpsSpiffe
        };
    }
    if let Some(v) = a.bundle_endpoint_cert_path {
        cfg.bundle_endpoint.cert_path = Some(v);
    }
    if let Some(v) = a.bundle_endpoint_key_path {
        cfg.bundle_endpoint.key_path = Some(v);
    }
    cfg.validate()?;
    tessera_telemetry::init_logging(&cfg.log_level).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let server = tessera_server::start(cfg).await?;
        until_stopped().await?;
        tracing::info!("shutting down");
        server.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

/// Resolves on Ctrl-C or SIGTERM: how a person and how a supervisor (Kubernetes, systemd, a
/// container runtime) stop a process. Either way it shuts down cleanly (a SIGTERM left to its
/// default would end it at once: no drain, `dev`'s temporary directory left behind).
pub(crate) async fn until_stopped() -> anyhow::Result<()> {
    StopSignals::new()?.next().await;
    Ok(())
}

/// Ctrl-C and SIGTERM, listened for from creation on: a signal that arrives while nobody
/// awaits [`Self::next`] is kept for the next call (dropping the streams and making new ones
/// would lose it, and tokio's handler stays installed, so nothing else would act on it).
pub(crate) struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    pub(crate) fn new() -> anyhow::Result<Self> {
        use anyhow::Context as _;
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Self {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the Ctrl-C handler")?,
        })
    }

    /// The next Ctrl-C or SIGTERM.
    pub(crate) async fn next(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// A gRPC error from a Tessera server as the user should read it: its message, which names what
/// is wrong, or [`unhelpful`]'s account where the message says nothing useful.
pub(crate) fn grpc_error(e: tonic::Status) -> anyhow::Error {
    unhelpful(&e).unwrap_or_else(|| anyhow::anyhow!("{}", e.message()))
}

/// What happened, and what to check, for the errors whose message says nothing useful: a socket
/// of another kind answers `Unimplemented` with no message, or something that is not gRPC over
/// HTTP/2 at all; a socket whose process never answers times out.
pub(crate) fn unhelpful(e: &tonic::Status) -> Option<anyhow::Error> {
    let (code, msg) = (e.code(), e.message());
    if code == tonic::Code::Unimplemented {
        Some(anyhow::anyhow!(
            "the socket does not serve this API ({code:?}{}{msg}): is it the right socket?",
            if msg.is_empty() { "" } else { ": " },
        ))
    } else if code == tonic::Code::Cancelled && msg.contains("Timeout expired") {
        Some(anyhow::anyhow!(
            "no answer within {} s: is the process on the socket a Tessera server or agent?",
            tessera_server::client::CALL_TIMEOUT.as_secs()
        ))
    } else if code == tonic::Code::Unknown && msg.starts_with("h2 protocol error") {
        Some(anyhow::anyhow!(
            "the answer was not gRPC over HTTP/2 ({msg}): is it the right socket?"
        ))
    } else if msg.contains("operation was canceled") {
        Some(anyhow::anyhow!(
            "the connection ended before an answer ({msg}): is it the right socket, and is its process still running?"
        ))
    } else if msg.is_empty() {
        Some(anyhow::anyhow!(
            "{code:?} with no message: is it the right socket?"
        ))
    } else {
        None
    }
}

/// Writes `text` to `path` with `mode`, whole or not at all: into a temporary file beside it,
/// then renamed over it, so a reader never sees half a key or certificate. A leftover temporary
/// file is replaced, never reused: `mode` applies only to a file this call creates, and a key
/// must never land in a file readable by others (the same holds for the final file, which the
/// rename replaces with the new one and its mode). Nothing is left behind when a write fails.
pub(crate) fn write_file(path: &std::path::Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let name = path
        .file_name()
        .with_context(|| format!("{} names no file", path.display()))?;
    let tmp = path.with_file_name(format!(".{}.tmp", name.to_string_lossy()));
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("remove {}", tmp.display()));
        }
        _ => {}
    }
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("write {}", tmp.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// An ID or name that a command sends to look something up (an entry ID, an authority ID, a
/// policy or destination name). Every such key is short; a long one is refused here, naming the
/// length, because the server's "not found" answer repeats it and an answer over the HTTP/2
/// header limit (16 KiB) reaches the user only as "h2 protocol error".
pub(crate) fn parse_key(s: &str) -> Result<String, String> {
    const MAX: usize = 1024;
    if s.len() > MAX {
        return Err(format!(
            "{} bytes long: no ID or name is longer than {MAX}",
            s.len()
        ));
    }
    if s.chars().any(char::is_control) {
        return Err("contains a control character: no ID or name does".into());
    }
    Ok(s.to_owned())
}
