//! Admin verbs (`entry`, `token`, `agent`, `bundle`, `svid mint`, `healthcheck`): thin clients of
//! the server's admin API on its Unix socket. All validation that matters happens in the server;
//! flags are parsed here only so that a typo fails before anything is sent.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use tessera_proto::v1 as pb;
use tessera_proto::v1::admin_api_client::AdminApiClient;
use tessera_spiffe::{Selector, SpiffeId, TrustDomain};
use tonic::transport::Channel;

use crate::cli::Output;

#[derive(Debug, Args, Clone)]
pub(crate) struct AdminConn {
    /// The server's admin socket.
    #[arg(
        long,
        env = "TESSERA_ADMIN_SOCKET",
        default_value = "/tmp/tessera/admin.sock",
        global = true
    )]
    pub(crate) admin_socket: PathBuf,
    #[arg(long, value_enum, default_value_t, global = true)]
    pub(crate) output: Output,
}

/// A duration flag: `90s`, `5m`, `1h`, `1h30m`.
/// A lifetime flag (`--x509-ttl`, `--jwt-ttl`, `--ttl`). Zero is refused: on the wire it means
/// "the server's default", so `0s` would silently become an hour, not nothing.
pub(crate) fn parse_secs(s: &str) -> Result<u32, String> {
    let v: tessera_server::config::Secs = s.parse()?;
    if v.0 == 0 {
        return Err(format!(
            "duration {s:?} is zero; leave the flag out for the server's default"
        ));
    }
    u32::try_from(v.0).map_err(|_| format!("duration {s:?} is too long"))
}

fn parse_selector(s: &str) -> Result<Selector, String> {
    Selector::parse(s).map_err(|e| e.to_string())
}

fn parse_id(s: &str) -> Result<SpiffeId, String> {
    SpiffeId::parse(s).map_err(|e| e.to_string())
}

fn parse_td(s: &str) -> Result<TrustDomain, String> {
    TrustDomain::new(s).map_err(|e| e.to_string())
}

#[derive(Debug, Subcommand)]
pub(crate) enum EntryCommand {
    /// Create a registration entry (idempotent: an identical entry is returned, not duplicated).
    Create(EntryFields),
    /// Show one entry.
    Show {
        #[arg(long, value_parser = crate::cli::parse_key)]
        id: String,
    },
    /// List entries, optionally filtered.
    List {
        #[arg(long, value_parser = parse_id)]
        parent_id: Option<SpiffeId>,
        #[arg(long, value_parser = parse_id)]
        spiffe_id: Option<SpiffeId>,
        /// Entries having all of these selectors (repeatable).
        #[arg(long = "selector", value_parser = parse_selector)]
        selectors: Vec<Selector>,
    },
    /// Change an entry: given flags replace those fields, the rest stays.
    Update {
        #[arg(long, value_parser = crate::cli::parse_key)]
        id: String,
        #[command(flatten)]
        fields: EntryFields,
    },
    /// Delete an entry.
    Delete {
        #[arg(long, value_parser = crate::cli::parse_key)]
        id: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct EntryFields {
    #[arg(long, value_parser = parse_id)]
    spiffe_id: Option<SpiffeId>,
    /// The agent (or node alias) whose workloads get this identity.
    #[arg(long, value_parser = parse_id)]
    parent_id: Option<SpiffeId>,
    /// `type:value`, all must match the workload (repeatable), e.g. unix:uid:1000.
    #[arg(long = "selector", value_parser = parse_selector)]
    selectors: Vec<Selector>,
    /// X.509-SVID lifetime (e.g. 1h); default: the server's.
    #[arg(long, value_parser = parse_secs)]
    x509_ttl: Option<u32>,
    /// JWT-SVID lifetime (e.g. 5m); default: the server's.
    #[arg(long, value_parser = parse_secs)]
    jwt_ttl: Option<u32>,
    /// DNS SAN to add to the X.509-SVID (repeatable).
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    #[arg(long)]
    hint: Option<String>,
    #[arg(long)]
    admin: Option<bool>,
    #[arg(long)]
    downstream: Option<bool>,
    /// Trust domain whose bundle this workload also gets (repeatable).
    #[arg(long = "federates-with", value_parser = parse_td)]
    federates_with: Vec<TrustDomain>,
}

impl EntryFields {
    fn apply(self, e: &mut pb::Entry) {
        if let Some(v) = self.spiffe_id {
            e.spiffe_id = v.to_string();
        }
        if let Some(v) = self.parent_id {
            e.parent_id = v.to_string();
        }
        if !self.selectors.is_empty() {
            e.selectors = self.selectors.iter().map(ToString::to_string).collect();
        }
        if let Some(v) = self.x509_ttl {
            e.x509_ttl_secs = v;
        }
        if let Some(v) = self.jwt_ttl {
            e.jwt_ttl_secs = v;
        }
        if !self.dns_names.is_empty() {
            e.dns_names = self.dns_names;
        }
        if let Some(v) = self.hint {
            e.hint = v;
        }
        if let Some(v) = self.admin {
            e.admin = v;
        }
        if let Some(v) = self.downstream {
            e.downstream = v;
        }
        if !self.federates_with.is_empty() {
            e.federates_with = self
                .federates_with
                .iter()
                .map(ToString::to_string)
                .collect();
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCommand {
    /// Generate a single-use join token for an agent.
    Generate {
        /// How long the token stays usable (e.g. 10m); default: the server's.
        #[arg(long, value_parser = parse_secs)]
        ttl: Option<u32>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum AgentCommand {
    /// List attested agents.
    List,
    /// Show one agent.
    Show {
        #[arg(long, value_parser = parse_id)]
        spiffe_id: SpiffeId,
    },
    /// Ban an agent: it can no longer renew, sync or get SVIDs signed.
    Ban {
        #[arg(long, value_parser = parse_id)]
        spiffe_id: SpiffeId,
    },
    /// Evict an agent: it must attest again.
    Evict {
        #[arg(long, value_parser = parse_id)]
        spiffe_id: SpiffeId,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(crate) enum BundleFormat {
    /// PEM CA certificates.
    Pem,
    /// SPIFFE bundle JSON (JWK Set).
    Spiffe,
}

#[derive(Debug, Subcommand)]
pub(crate) enum BundleCommand {
    /// Show the trust domain's bundle.
    Show {
        /// Default: pem, or spiffe with `--output json` (the SPIFFE bundle is the JSON form).
        #[arg(long, value_enum)]
        format: Option<BundleFormat>,
    },
    /// Bundles of other trust domains: set, list, delete.
    #[command(flatten)]
    Foreign(crate::federation_cli::StaticBundleCommand),
}

#[derive(Debug, Args)]
pub(crate) struct SvidMintArgs {
    #[arg(long, value_parser = parse_id)]
    spiffe_id: SpiffeId,
    #[arg(long, value_parser = parse_secs)]
    ttl: Option<u32>,
    #[arg(long = "dns-name")]
    dns_names: Vec<String>,
    /// Write svid.pem, svid_key.pem and bundle.pem into this directory instead of printing.
    #[arg(long)]
    write: Option<PathBuf>,
}

async fn connect(socket: &Path) -> anyhow::Result<AdminApiClient<Channel>> {
    tessera_server::client::admin(socket).await.with_context(|| {
        format!(
            "cannot reach the server's admin socket {} (is the server running? see --admin-socket)",
            socket.display()
        )
    })
}

fn ttl(secs: u32) -> String {
    tessera_server::config::Secs(u64::from(secs)).to_string()
}

fn print_entry(e: &pb::Entry) {
    outln!("Entry ID      : {}", e.id);
    outln!("SPIFFE ID     : {}", e.spiffe_id);
    outln!("Parent ID     : {}", e.parent_id);
    for s in &e.selectors {
        outln!("Selector      : {s}");
    }
    outln!("X509-SVID TTL : {}", ttl(e.x509_ttl_secs));
    outln!("JWT-SVID TTL  : {}", ttl(e.jwt_ttl_secs));
    for d in &e.dns_names {
        outln!("DNS name      : {d}");
    }
    for f in &e.federates_with {
        outln!("FederatesWith : {f}");
    }
    if !e.hint.is_empty() {
        outln!("Hint          : {}", e.hint);
    }
    if e.admin {
        outln!("Admin         : true");
    }
    if e.downstream {
        outln!("Downstream    : true");
    }
    outln!(
        "Revision      : {} (created at {})",
        e.updated_revision,
        e.created_revision
    );
}

fn entry_json(e: &pb::Entry) -> serde_json::Value {
    serde_json::json!({
        "id": e.id, "spiffe_id": e.spiffe_id, "parent_id": e.parent_id, "selectors": e.selectors,
        "x509_ttl_secs": e.x509_ttl_secs, "jwt_ttl_secs": e.jwt_ttl_secs, "dns_names": e.dns_names,
        "hint": e.hint, "admin": e.admin, "downstream": e.downstream, "federates_with": e.federates_with,
        "created_revision": e.created_revision, "updated_revision": e.updated_revision,
    })
}

fn agent_json(a: &pb::Agent) -> serde_json::Value {
    serde_json::json!({
        "spiffe_id": a.spiffe_id, "attestation_type": a.attestation_type, "selectors": a.selectors,
        "serial": a.serial, "expires_at": a.expires_at, "banned": a.banned,
        "created_revision": a.created_revision, "updated_revision": a.updated_revision,
    })
}

fn print_agent(a: &pb::Agent) {
    outln!("Agent ID         : {}", a.spiffe_id);
    outln!("Attestation type : {}", a.attestation_type);
    for s in &a.selectors {
        outln!("Selector         : {s}");
    }
    outln!("SVID serial      : {}", a.serial);
    outln!("SVID expires at  : {}", a.expires_at);
    outln!("Banned           : {}", a.banned);
}

fn emit(output: Output, json: serde_json::Value, human: impl FnOnce()) {
    match output {
        Output::Json => outln!("{json:#}"),
        Output::Human => human(),
    }
}

pub(crate) async fn entry(conn: &AdminConn, cmd: EntryCommand) -> anyhow::Result<ExitCode> {
    let mut client = connect(&conn.admin_socket).await?;
    match cmd {
        EntryCommand::Create(fields) => {
            if fields.spiffe_id.is_none() {
                bail!("--spiffe-id is required");
            }
            if fields.selectors.is_empty() {
                bail!(
                    "at least one --selector is required (an entry without selectors would match every workload)"
                );
            }
            let mut e = pb::Entry::default();
            fields.apply(&mut e);
            let r = client
                .create_entry(pb::CreateEntryRequest { entry: Some(e) })
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            let e = r.entry.unwrap_or_default();
            emit(
                conn.output,
                serde_json::json!({"created": r.created, "entry": entry_json(&e)}),
                || {
                    if !r.created {
                        outln!("(an identical entry already exists)");
                    }
                    print_entry(&e);
                },
            );
        }
        EntryCommand::Show { id } => {
            let e = client
                .get_entry(pb::GetEntryRequest { id })
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            emit(conn.output, entry_json(&e), || print_entry(&e));
        }
        EntryCommand::List {
            parent_id,
            spiffe_id,
            selectors,
        } => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let r = client
                    .list_entries(pb::ListEntriesRequest {
                        parent_id: parent_id
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                        spiffe_id: spiffe_id
                            .as_ref()
                            .map(ToString::to_string)
                            .unwrap_or_default(),
                        selectors: selectors.iter().map(ToString::to_string).collect(),
                        page_token,
                        page_size: 0,
                    })
                    .await
                    .map_err(crate::cli::grpc_error)?
                    .into_inner();
                all.extend(r.entries);
                if r.next_page_token.is_empty() {
                    break;
                }
                page_token = r.next_page_token;
            }
            emit(
                conn.output,
                serde_json::Value::Array(all.iter().map(entry_json).collect()),
                || {
                    outln!(
                        "Found {} entr{}",
                        all.len(),
                        if all.len() == 1 { "y" } else { "ies" }
                    );
                    for e in &all {
                        outln!("");
                        print_entry(e);
                    }
                },
            );
        }
        EntryCommand::Update { id, fields } => {
            let mut e = client
                .get_entry(pb::GetEntryRequest { id })
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            fields.apply(&mut e);
            let e = client
                .update_entry(pb::UpdateEntryRequest { entry: Some(e) })
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            emit(conn.output, entry_json(&e), || print_entry(&e));
        }
        EntryCommand::Delete { id } => {
            let e = client
                .delete_entry(pb::DeleteEntryRequest { id })
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            emit(conn.output, entry_json(&e), || {
                outln!("Deleted entry {} ({})", e.id, e.spiffe_id)
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn token(conn: &AdminConn, cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    let mut client = connect(&conn.admin_socket).await?;
    let TokenCommand::Generate { ttl } = cmd;
    let r = client
        .generate_join_token(pb::GenerateJoinTokenRequest {
            ttl_secs: ttl.unwrap_or(0),
        })
        .await
        .map_err(crate::cli::grpc_error)?
        .into_inner();
    emit(
        conn.output,
        serde_json::json!({"token": r.token, "expires_at": r.expires_at, "agent_spiffe_id": r.agent_spiffe_id}),
        || {
            outln!("Token    : {}", r.token);
            outln!("Agent ID : {}", r.agent_spiffe_id);
            outln!("Expires  : {} (Unix time)", r.expires_at);
        },
    );
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn agent(conn: &AdminConn, cmd: AgentCommand) -> anyhow::Result<ExitCode> {
    let mut client = connect(&conn.admin_socket).await?;
    let req = |id: &SpiffeId| pb::GetAgentRequest {
        spiffe_id: id.to_string(),
    };
    let (a, verb) = match cmd {
        AgentCommand::List => {
            let r = client
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            emit(
                conn.output,
                serde_json::Value::Array(r.agents.iter().map(agent_json).collect()),
                || {
                    outln!(
                        "Found {} agent{}",
                        r.agents.len(),
                        if r.agents.len() == 1 { "" } else { "s" }
                    );
                    for a in &r.agents {
                        outln!("");
                        print_agent(a);
                    }
                },
            );
            return Ok(ExitCode::SUCCESS);
        }
        AgentCommand::Show { spiffe_id } => (client.get_agent(req(&spiffe_id)).await, None),
        AgentCommand::Ban { spiffe_id } => {
            (client.ban_agent(req(&spiffe_id)).await, Some("Banned"))
        }
        AgentCommand::Evict { spiffe_id } => {
            (client.evict_agent(req(&spiffe_id)).await, Some("Evicted"))
        }
    };
    let a = a.map_err(crate::cli::grpc_error)?.into_inner();
    emit(conn.output, agent_json(&a), || match verb {
        Some(v) => outln!("{v} agent {}", a.spiffe_id),
        None => print_agent(&a),
    });
    Ok(ExitCode::SUCCESS)
}

fn bundle_pem(b: &pb::Bundle) -> anyhow::Result<String> {
    let td = TrustDomain::new(&b.trust_domain)?;
    let bundle = tessera_spiffe::Bundle::parse(td, &b.spiffe_bundle_json)?;
    Ok(bundle
        .x509_authorities()
        .iter()
        .map(|der| pem::encode(&pem::Pem::new("CERTIFICATE", der.clone())))
        .collect())
}

pub(crate) async fn bundle(conn: &AdminConn, cmd: BundleCommand) -> anyhow::Result<ExitCode> {
    let format = match cmd {
        BundleCommand::Show { format } => format.unwrap_or(match conn.output {
            Output::Json => BundleFormat::Spiffe,
            Output::Human => BundleFormat::Pem,
        }),
        BundleCommand::Foreign(cmd) => {
            return crate::federation_cli::static_bundle(conn, cmd).await;
        }
    };
    let mut client = connect(&conn.admin_socket).await?;
    let b = client
        .get_bundle(pb::GetBundleRequest {})
        .await
        .map_err(crate::cli::grpc_error)?
        .into_inner();
    match format {
        BundleFormat::Spiffe => outln!("{}", String::from_utf8_lossy(&b.spiffe_bundle_json)),
        BundleFormat::Pem => out!("{}", bundle_pem(&b)?),
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn svid_mint(conn: &AdminConn, a: SvidMintArgs) -> anyhow::Result<ExitCode> {
    // The key is made here and never leaves this process: the server signs a CSR.
    let key = rcgen::KeyPair::generate()?;
    let csr = rcgen::CertificateParams::default().serialize_request(&key)?;
    let mut client = connect(&conn.admin_socket).await?;
    let r = client
        .mint_x509_svid(pb::MintX509SvidRequest {
            spiffe_id: a.spiffe_id.to_string(),
            csr: csr.der().to_vec(),
            ttl_secs: a.ttl.unwrap_or(0),
            dns_names: a.dns_names,
        })
        .await
        .map_err(crate::cli::grpc_error)?
        .into_inner();
    let svid: String = r
        .svid_chain
        .iter()
        .map(|c| pem::encode(&pem::Pem::new("CERTIFICATE", c.clone())))
        .collect();
    let key_pem = key.serialize_pem();
    let bundle = r
        .bundle
        .as_ref()
        .map(bundle_pem)
        .transpose()?
        .unwrap_or_default();
    match (a.write, conn.output) {
        (Some(dir), output) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
            let files = [
                ("svid.pem", &svid, 0o644),
                ("svid_key.pem", &key_pem, 0o600),
                ("bundle.pem", &bundle, 0o644),
            ];
            for (name, text, mode) in files {
                crate::cli::write_file(&dir.join(name), text, mode)?;
            }
            emit(
                output,
                serde_json::json!({
                    "spiffe_id": a.spiffe_id.to_string(),
                    "directory": dir.display().to_string(),
                    "files": files.map(|(name, _, _)| name),
                }),
                || {
                    outln!(
                        "Wrote svid.pem, svid_key.pem and bundle.pem to {}",
                        dir.display()
                    )
                },
            );
        }
        // The key in JSON too: the caller asked for it on stdout either way.
        (None, Output::Json) => outln!(
            "{:#}",
            serde_json::json!({
                "spiffe_id": a.spiffe_id.to_string(),
                "svid_pem": svid,
                "key_pem": key_pem,
                "bundle_pem": bundle,
            })
        ),
        (None, Output::Human) => out!("{svid}{key_pem}"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `tessera healthcheck`: GET /ready on the health endpoint; exit 0 only when ready (200), 1
/// when not ready (503, with the reason the endpoint gives). Anything else is an error naming
/// the address: no answer in 5 s, an answer that is not HTTP, another status, or more than
/// 64 KiB (a health answer is a line; reading without a bound would let any listener fill
/// memory).
pub(crate) async fn healthcheck(addr: std::net::SocketAddr) -> anyhow::Result<ExitCode> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const LIMIT: u64 = 64 * 1024;
    if addr.port() == 0 {
        anyhow::bail!("--address {addr}: port 0 is not an address a health endpoint listens on");
    }
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr)
            .await
            .context("cannot connect")?;
        s.write_all(
            format!("GET /ready HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .context("sending the request")?;
        let mut buf = Vec::new();
        (&mut s)
            .take(LIMIT + 1)
            .read_to_end(&mut buf)
            .await
            .context("reading the answer")?;
        anyhow::ensure!(
            buf.len() as u64 <= LIMIT,
            "the answer is longer than {LIMIT} bytes: not a health endpoint"
        );
        Ok::<_, anyhow::Error>(buf)
    };
    let buf = tokio::time::timeout(std::time::Duration::from_secs(5), exchange)
        .await
        .map_err(|_| anyhow::anyhow!("health endpoint {addr}: no answer within 5 s"))?
        .with_context(|| format!("health endpoint {addr}"))?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .strip_prefix("HTTP/1.")
        .and_then(|t| t.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| {
            anyhow::anyhow!("health endpoint {addr}: the answer is not HTTP: not a health endpoint")
        })?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    match status {
        200 => {
            outln!("{body}");
            Ok(ExitCode::SUCCESS)
        }
        503 => {
            errln!(
                "not ready: {}",
                if body.is_empty() {
                    "no reason given"
                } else {
                    body
                }
            );
            Ok(ExitCode::FAILURE)
        }
        other => anyhow::bail!(
            "health endpoint {addr}: GET /ready answered {other}, where a health endpoint answers 200 (ready) or 503 (not ready)"
        ),
    }
}
