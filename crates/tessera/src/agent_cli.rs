//! `tessera agent run`, the Workload API client verbs (`tessera agent api …`) and `tessera dev`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use tessera_proto::workload as wl;
use tessera_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::cli::Output;

#[derive(Debug, Args)]
pub(crate) struct AgentRunArgs {
    /// TOML configuration file; flags below override its keys.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Print a commented default configuration and exit.
    #[arg(long)]
    print_default_config: bool,
    #[arg(long)]
    trust_domain: Option<String>,
    #[arg(long)]
    server_address: Option<String>,
    /// Another server of the trust domain (IP:port), tried in order when the one in use is
    /// lost; repeat for more. Replaces `server_addresses` of the config file.
    #[arg(long = "also-server", value_name = "IP:PORT")]
    server_addresses: Vec<String>,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The Workload API socket to serve.
    #[arg(long, visible_alias = "workload-socket")]
    socket_path: Option<PathBuf>,
    #[arg(long)]
    trust_bundle_path: Option<PathBuf>,
    #[arg(long)]
    join_token: Option<String>,
    /// x509pop: the node certificate chain (PEM); needs --x509pop-key-path.
    #[arg(long, requires = "x509pop_key_path")]
    x509pop_cert_path: Option<PathBuf>,
    #[arg(long, requires = "x509pop_cert_path")]
    x509pop_key_path: Option<PathBuf>,
    #[arg(long)]
    insecure_bootstrap: bool,
    /// Serve /live, /ready and /metrics here.
    #[arg(long)]
    health_bind_address: Option<std::net::SocketAddr>,
    /// Node mode: the admin socket (mode 0600) for `tessera workload attach|detach|list`.
    #[arg(long, value_name = "PATH")]
    agent_admin_socket: Option<PathBuf>,
    /// Node mode: a SPIFFE ID that may open the delegated identity stream (the node proxy's);
    /// repeat for more. Replaces `authorized_delegates` of the config file.
    #[arg(long = "authorized-delegate", value_name = "SPIFFE_ID")]
    authorized_delegates: Vec<String>,
    #[arg(long)]
    log_level: Option<String>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ApiCommand {
    /// Fetch once and print (or write) what the Workload API gives this process.
    Fetch {
        #[command(subcommand)]
        what: FetchWhat,
    },
    /// Stream X509-SVID updates; with --write, rewrite the PEM files on every rotation.
    Watch {
        #[arg(long)]
        write: Option<PathBuf>,
        #[command(flatten)]
        ep: Endpoint_,
    },
    /// Validate a JWT-SVID with the Workload API.
    Validate {
        #[arg(long)]
        audience: String,
        #[arg(long)]
        token: String,
        #[command(flatten)]
        ep: Endpoint_,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum FetchWhat {
    /// X509-SVIDs, their keys and bundles.
    X509 {
        /// Write svid.N.pem, svid.N.key and bundle.N.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
        #[command(flatten)]
        ep: Endpoint_,
    },
    /// JWT-SVIDs for an audience.
    Jwt {
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        #[arg(long)]
        spiffe_id: Option<String>,
        #[command(flatten)]
        ep: Endpoint_,
    },
    /// X.509 and JWT bundles.
    Bundles {
        #[command(flatten)]
        ep: Endpoint_,
    },
}

/// Where the Workload API is.
#[derive(Debug, Args, Clone)]
pub(crate) struct Endpoint_ {
    /// `unix:///path` (default: $SPIFFE_ENDPOINT_SOCKET, else unix:///tmp/tessera/agent.sock).
    #[arg(
        long,
        env = "SPIFFE_ENDPOINT_SOCKET",
        default_value = "unix:///tmp/tessera/agent.sock"
    )]
    socket: String,
    #[arg(long, value_enum, default_value_t)]
    output: Output,
}

type Client = SpiffeWorkloadApiClient<
    InterceptedService<
        Channel,
        fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    >,
>;

/// SPIFFE Workload Endpoint §3: every request carries `workload.spiffe.io: true`.
fn security_header(mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    Ok(req)
}

async fn connect(ep: &Endpoint_) -> anyhow::Result<Client> {
    // `unix:///path` (SPIFFE Workload Endpoint §4) or a bare absolute path, as the proxy takes.
    let path = tessera_proxy::identity::socket_path(&ep.socket)
        .map_err(|e| anyhow::anyhow!("--socket / SPIFFE_ENDPOINT_SOCKET: {e}"))?;
    let channel = tessera_server::client::unix_channel(&path)
        .await
        .with_context(|| {
            format!(
                "cannot reach the Workload API at {} (is the agent running?)",
                path.display()
            )
        })?;
    Ok(SpiffeWorkloadApiClient::with_interceptor(
        channel,
        security_header as fn(tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status>,
    ))
}

fn pem_chain(der_concat: &[u8]) -> String {
    let mut out = String::new();
    let mut rest = der_concat;
    while !rest.is_empty() {
        use x509_parser::prelude::FromDer as _;
        match x509_parser::certificate::X509Certificate::from_der(rest) {
            Ok((after, _)) => {
                let len = rest.len() - after.len();
                out.push_str(&pem::encode(&pem::Pem::new(
                    "CERTIFICATE",
                    rest[..len].to_vec(),
                )));
                rest = after;
            }
            Err(_) => break,
        }
    }
    out
}

fn write_pem_files(dir: &Path, resp: &wl::X509svidResponse) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    for (i, svid) in resp.svids.iter().enumerate() {
        let files = [
            (format!("svid.{i}.pem"), pem_chain(&svid.x509_svid), 0o644),
            (
                format!("svid.{i}.key"),
                pem::encode(&pem::Pem::new("PRIVATE KEY", svid.x509_svid_key.clone())),
                0o600,
            ),
            (format!("bundle.{i}.pem"), pem_chain(&svid.bundle), 0o644),
        ];
        for (name, text, mode) in files {
            crate::cli::write_file(&dir.join(&name), &text, mode)?;
        }
    }
    Ok(())
}

/// Writes a summary of an X509-SVID response to stdout. A closed stdout (`… | head`) is an error
/// for the caller to end on, not a panic.
fn print_x509(resp: &wl::X509svidResponse, output: Output) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    match output {
        Output::Json => {
            let v: Vec<_> = resp
                .svids
                .iter()
                .map(|s| serde_json::json!({"spiffe_id": s.spiffe_id, "hint": s.hint}))
                .collect();
            let keys: Vec<_> = resp.federated_bundles.keys().collect();
            writeln!(
                out,
                "{}",
                serde_json::json!({"svids": v, "federated_bundles": keys})
            )?;
        }
        Output::Human => {
            writeln!(out, "Received {} SVID(s)", resp.svids.len())?;
            for s in &resp.svids {
                let hint = if s.hint.is_empty() {
                    String::new()
                } else {
                    format!(" (hint {})", s.hint)
                };
                writeln!(out, "  SPIFFE ID: {}{hint}", s.spiffe_id)?;
            }
        }
    }
    out.flush()
}

pub(crate) async fn api(cmd: ApiCommand) -> anyhow::Result<ExitCode> {
    use tokio_stream::StreamExt as _;
    match cmd {
        ApiCommand::Fetch {
            what: FetchWhat::X509 { write, ep },
        } => {
            let mut c = connect(&ep).await?;
            let mut s = c
                .fetch_x509svid(wl::X509svidRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let resp = s
                .next()
                .await
                .context("the Workload API closed the stream")?
                .map_err(status)?;
            print_x509(&resp, ep.output).context("writing to stdout")?;
            if let Some(dir) = write {
                write_pem_files(&dir, &resp)?;
                errln!("wrote PEM files to {}", dir.display());
            }
        }
        ApiCommand::Fetch {
            what:
                FetchWhat::Jwt {
                    audience,
                    spiffe_id,
                    ep,
                },
        } => {
            let mut c = connect(&ep).await?;
            let resp = c
                .fetch_jwtsvid(wl::JwtsvidRequest {
                    audience,
                    spiffe_id: spiffe_id.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            for s in &resp.svids {
                match ep.output {
                    Output::Json => outln!(
                        "{}",
                        serde_json::json!({"spiffe_id": s.spiffe_id, "token": s.svid})
                    ),
                    Output::Human => outln!("{}\n{}", s.spiffe_id, s.svid),
                }
            }
        }
        ApiCommand::Fetch {
            what: FetchWhat::Bundles { ep },
        } => {
            let mut c = connect(&ep).await?;
            let mut x = c
                .fetch_x509_bundles(wl::X509BundlesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let xr = x.next().await.context("stream closed")?.map_err(status)?;
            let mut j = c
                .fetch_jwt_bundles(wl::JwtBundlesRequest {})
                .await
                .map_err(status)?
                .into_inner();
            let jr = j.next().await.context("stream closed")?.map_err(status)?;
            match ep.output {
                // Per trust domain: the X.509 authorities as PEM, the JWT ones as their JWKS.
                Output::Json => {
                    let mut tds = serde_json::Map::new();
                    for (td, der) in &xr.bundles {
                        tds.insert(td.clone(), serde_json::json!({"x509_pem": pem_chain(der)}));
                    }
                    for (td, jwks) in &jr.bundles {
                        let jwks: serde_json::Value = serde_json::from_slice(jwks)
                            .unwrap_or_else(|_| String::from_utf8_lossy(jwks).into());
                        match tds.get_mut(td) {
                            Some(serde_json::Value::Object(m)) => {
                                m.insert("jwt_jwks".into(), jwks);
                            }
                            _ => {
                                tds.insert(td.clone(), serde_json::json!({"jwt_jwks": jwks}));
                            }
                        }
                    }
                    outln!("{:#}", serde_json::Value::Object(tds));
                }
                Output::Human => {
                    for (td, der) in &xr.bundles {
                        outln!("X.509 bundle of {td}:\n{}", pem_chain(der));
                    }
                    for (td, jwks) in &jr.bundles {
                        outln!("JWT bundle of {td}:\n{}", String::from_utf8_lossy(jwks));
                    }
                }
            }
        }
        ApiCommand::Watch { write, ep } => {
            let mut c = connect(&ep).await?;
            let mut s = c
                .fetch_x509svid(wl::X509svidRequest {})
                .await
                .map_err(status)?
                .into_inner();
            while let Some(msg) = s.next().await {
                let resp = msg.map_err(status)?;
                if let Some(dir) = &write {
                    write_pem_files(dir, &resp)?;
                }
                if print_x509(&resp, ep.output).is_err() {
                    // Whoever read our output went away: stop watching.
                    break;
                }
            }
        }
        ApiCommand::Validate {
            audience,
            token,
            ep,
        } => {
            let mut c = connect(&ep).await?;
            let r = c
                .validate_jwtsvid(wl::ValidateJwtsvidRequest {
                    audience,
                    svid: token,
                })
                .await
                .map_err(status)?
                .into_inner();
            match ep.output {
                Output::Json => outln!(
                    "{}",
                    serde_json::json!({"valid": true, "spiffe_id": r.spiffe_id})
                ),
                Output::Human => outln!("valid JWT-SVID of {}", r.spiffe_id),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The Workload API's refusals are read by their code too (`PermissionDenied: no identity
/// issued`); see [`crate::cli::grpc_error`] for the rest.
fn status(e: tonic::Status) -> anyhow::Error {
    crate::cli::unhelpful(&e).unwrap_or_else(|| anyhow::anyhow!("{:?}: {}", e.code(), e.message()))
}

pub(crate) fn agent_run(a: AgentRunArgs) -> anyhow::Result<ExitCode> {
    use tessera_agent::AgentConfig;
    if a.print_default_config {
        out!("{}", AgentConfig::default_toml());
        return Ok(ExitCode::SUCCESS);
    }
    let mut cfg = match &a.config {
        Some(p) => AgentConfig::load(p).map_err(anyhow::Error::msg)?,
        None => AgentConfig::default(),
    };
    if let Some(td) = &a.trust_domain {
        cfg.trust_domain = tessera_spiffe::TrustDomain::new(td)
            .with_context(|| format!("--trust-domain {td:?}"))?;
    }
    if let Some(v) = a.server_address {
        cfg.server_address = v;
    }
    if !a.server_addresses.is_empty() {
        cfg.server_addresses = a.server_addresses;
    }
    if let Some(v) = a.data_dir {
        cfg.data_dir = v;
    }
    if let Some(v) = a.socket_path {
        cfg.socket_path = v;
    }
    if let Some(v) = a.trust_bundle_path {
        cfg.trust_bundle_path = Some(v);
    }
    if let Some(v) = a.join_token {
        cfg.join_token = Some(v);
    }
    if let Some(v) = a.x509pop_cert_path {
        cfg.x509pop_cert_path = Some(v);
    }
    if let Some(v) = a.x509pop_key_path {
        cfg.x509pop_key_path = Some(v);
    }
    if a.insecure_bootstrap {
        cfg.insecure_bootstrap = true;
    }
    if let Some(v) = a.agent_admin_socket {
        cfg.admin_socket_path = Some(v);
    }
    if !a.authorized_delegates.is_empty() {
        cfg.authorized_delegates = a.authorized_delegates;
    }
    if let Some(v) = a.health_bind_address {
        cfg.health_bind_address = Some(v);
    }
    if let Some(v) = a.log_level {
        cfg.log_level = v;
    }
    cfg.validate().map_err(anyhow::Error::msg)?;
    tessera_telemetry::init_logging(&cfg.log_level).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let agent = tessera_agent::start(cfg).await?;
        crate::cli::until_stopped().await?;
        agent.shutdown().await;
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Debug, Args)]
pub(crate) struct DevArgs {
    /// Keep state here (default: a new directory under /tmp, removed at exit).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long, default_value = "example.org")]
    trust_domain: String,
    #[arg(long, default_value = "/tmp/tessera/agent.sock")]
    workload_socket: PathBuf,
    #[arg(
        long,
        env = "TESSERA_ADMIN_SOCKET",
        default_value = "/tmp/tessera/admin.sock"
    )]
    admin_socket: PathBuf,
    /// Node mode: the agent's admin socket (mode 0600) for `tessera workload attach|detach|list`
    /// and the node proxy's delegated identity stream.
    #[arg(long, value_name = "PATH")]
    agent_admin_socket: Option<PathBuf>,
    /// Node mode: a SPIFFE ID that may open the delegated identity stream (the node proxy's);
    /// repeat for more.
    #[arg(long = "authorized-delegate", value_name = "SPIFFE_ID")]
    authorized_delegates: Vec<String>,
    #[arg(long, default_value = "info")]
    log_level: String,
}

/// `tessera dev`: a server (SQLite) and an agent in one process, the agent attested at once.
pub(crate) fn dev(a: DevArgs) -> anyhow::Result<ExitCode> {
    let td = tessera_spiffe::TrustDomain::new(&a.trust_domain)
        .with_context(|| format!("--trust-domain {:?}", a.trust_domain))?;
    let (data_dir, temporary) = match a.data_dir {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("tessera-dev-{}", std::process::id())),
            true,
        ),
    };
    // The sockets are checked before the server starts, so a bad one leaves nothing behind.
    let sockets = [
        ("--workload-socket", Some(&a.workload_socket)),
        ("--admin-socket", Some(&a.admin_socket)),
        ("--agent-admin-socket", a.agent_admin_socket.as_ref()),
    ];
    for (i, (flag, path)) in sockets.iter().enumerate() {
        let Some(path) = path else { continue };
        if !path.is_absolute() {
            anyhow::bail!("{flag} {}: must be an absolute path", path.display());
        }
        if let Some((other, _)) = sockets[..i].iter().find(|(_, p)| *p == Some(*path)) {
            anyhow::bail!(
                "{flag} {}: the same path as {other}; each socket needs its own",
                path.display()
            );
        }
    }
    tessera_telemetry::init_logging(&a.log_level).map_err(anyhow::Error::msg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let server_cfg = tessera_server::ServerConfig {
            trust_domain: td.clone(),
            data_dir: data_dir.join("server"),
            bind_address: "127.0.0.1:0".parse()?,
            health_bind_address: "127.0.0.1:0".parse()?,
            admin_socket: a.admin_socket.clone(),
            log_level: a.log_level.clone(),
            ..tessera_server::ServerConfig::default()
        };
        let policy_default = match server_cfg.policy.default {
            tessera_policy::DefaultAction::Deny => "deny",
            tessera_policy::DefaultAction::Allow => "allow",
        };
        let server = tessera_server::start(server_cfg).await?;
        let agent_dir = data_dir.join("agent");
        std::fs::create_dir_all(&agent_dir)?;
        let bundle_path = agent_dir.join("bootstrap_bundle.json");
        std::fs::write(&bundle_path, &server.bundle_json)?;
        // A stored agent SVID (a reused --data-dir) needs no token; otherwise make one.
        let join_token = if agent_dir.join("agent_svid.json").exists() {
            None
        } else {
            let mut admin = tessera_server::client::admin(&server.admin_socket).await?;
            let t = admin
                .generate_join_token(tessera_proto::v1::GenerateJoinTokenRequest { ttl_secs: 60 })
                .await
                .map_err(|s| anyhow::anyhow!(s.message().to_owned()))?;
            Some(t.into_inner().token)
        };
        let agent_cfg = tessera_agent::AgentConfig {
            trust_domain: td.clone(),
            server_address: server.agent_addr.to_string(),
            data_dir: agent_dir,
            socket_path: a.workload_socket.clone(),
            trust_bundle_path: Some(bundle_path.clone()),
            join_token,
            log_level: a.log_level.clone(),
            admin_socket_path: a.agent_admin_socket.clone(),
            authorized_delegates: a.authorized_delegates.clone(),
            ..tessera_agent::AgentConfig::default()
        };
        let agent = tessera_agent::start(agent_cfg).await?;
        server.set_default_parent(agent.spiffe_id.clone());
        let uid = nix_uid();
        outln!("Tessera dev: trust domain {td}, everything in one process (Ctrl-C to stop)");
        outln!("  Workload API:  unix://{}", a.workload_socket.display());
        outln!("  Admin socket:  {}", a.admin_socket.display());
        outln!("  Agent:         {}", agent.spiffe_id);
        outln!(
            "  Server:        {} (more agents: `tessera agent run --server-address` it, `--trust-bundle-path {}`, a join token from `tessera token generate`)",
            server.agent_addr,
            bundle_path.display()
        );
        if let Some(p) = &a.agent_admin_socket {
            outln!("  Node mode:     agent admin socket {}", p.display());
        }
        outln!(
            "  Policy:        default {policy_default} (no ALLOW policy for a workload → {policy_default}; `tessera policy list`)"
        );
        outln!(
            "  Data dir:      {}{}",
            data_dir.display(),
            if temporary { " (removed at exit)" } else { "" }
        );
        outln!("Try, from another shell:");
        outln!("  tessera entry create --spiffe-id spiffe://{td}/me --selector unix:uid:{uid}");
        outln!(
            "  SPIFFE_ENDPOINT_SOCKET=unix://{} tessera agent api fetch x509",
            a.workload_socket.display()
        );
        use std::io::Write as _;
        let _ = std::io::stdout().flush();
        crate::cli::until_stopped().await?;
        tracing::info!("shutting down");
        agent.shutdown().await;
        server.shutdown().await;
        anyhow::Ok(ExitCode::SUCCESS)
    });
    if temporary {
        let _ = std::fs::remove_dir_all(&data_dir);
    }
    result
}

fn nix_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    // The uid of this process, read without unsafe code: /proc/self is owned by it.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(0)
}
