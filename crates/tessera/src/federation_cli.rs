//! `tessera federation …` and `tessera bundle set|list|delete`: thin clients of the server's
//! `FederationApi` on the admin socket. The server checks everything that matters (profiles,
//! URLs, trust domains); files are read here.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use tessera_proto::v1 as pb;
use tessera_proto::v1::federation_api_client::FederationApiClient;
use tessera_spiffe::{Bundle, TrustDomain};
use tonic::transport::Channel;

use crate::admin_cli::AdminConn;
use crate::cli::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum FederationCommand {
    /// Federate with a trust domain: fetch its bundle from its bundle endpoint from now on.
    Create(RelationshipArgs),
    /// Change a relationship (all its settings are replaced by the flags given).
    Update(RelationshipArgs),
    /// List relationships with their fetch status.
    List,
    /// Show one relationship, its fetch status and the bundle held for it.
    Show(TrustDomainArg),
    /// Stop federating (the last fetched bundle stays until `tessera bundle delete`).
    Delete(TrustDomainArg),
    /// Fetch the federated bundle now and show the outcome.
    Refresh(TrustDomainArg),
}

#[derive(Debug, Args)]
pub(crate) struct TrustDomainArg {
    #[arg(long)]
    trust_domain: String,
}

#[derive(Debug, Args)]
pub(crate) struct RelationshipArgs {
    /// The federated trust domain, e.g. partner.example.
    #[arg(long)]
    trust_domain: String,
    /// https:// URL of its bundle endpoint.
    #[arg(long)]
    bundle_endpoint_url: String,
    /// `https_web` (Web PKI certificate) or `https_spiffe` (the endpoint presents an SVID).
    #[arg(long)]
    profile: String,
    /// https_spiffe: the SPIFFE ID the endpoint presents.
    #[arg(long)]
    endpoint_spiffe_id: Option<String>,
    /// The trust domain's bundle to start with (SPIFFE bundle JSON, or PEM CA certificates).
    /// Needed for https_spiffe, whose first fetch is authenticated with it.
    #[arg(long)]
    bundle_file: Option<PathBuf>,
    /// https_web under a private CA: PEM CA certificates that authenticate the endpoint
    /// (default: the Mozilla root store).
    #[arg(long)]
    ca_bundle: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum StaticBundleCommand {
    /// Set the bundle of another trust domain by hand (SPIFFE bundle JSON or PEM CA
    /// certificates).
    Set {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        file: PathBuf,
    },
    /// List every stored bundle: ours and the federated ones.
    List,
    /// Delete the bundle of another trust domain.
    Delete {
        #[arg(long)]
        trust_domain: String,
    },
}

async fn connect(socket: &Path) -> anyhow::Result<FederationApiClient<Channel>> {
    let ch = tessera_server::client::unix_channel(socket)
        .await
        .with_context(|| {
            format!(
                "cannot reach the server's admin socket {} (is the server running? see --admin-socket)",
                socket.display()
            )
        })?;
    Ok(FederationApiClient::new(ch))
}

/// Reads a bundle file for `td`: SPIFFE bundle JSON as is, or PEM CA certificates made into
/// one. Returns SPIFFE bundle JSON.
pub(crate) fn read_bundle_file(td: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
    let td = TrustDomain::new(td).with_context(|| format!("--trust-domain {td:?}"))?;
    let bytes = std::fs::read(path).with_context(|| format!("read {}", path.display()))?;
    if bytes.trim_ascii_start().starts_with(b"{") {
        Bundle::parse(td, &bytes)
            .with_context(|| format!("{}: not a SPIFFE bundle", path.display()))?;
        return Ok(bytes);
    }
    let mut bundle = Bundle::new(td);
    let mut n = 0;
    for p in pem::parse_many(&bytes).with_context(|| format!("{}: not PEM", path.display()))? {
        if p.tag() == "CERTIFICATE" {
            bundle
                .add_x509_authority(p.into_contents())
                .with_context(|| format!("{}: certificate {n}", path.display()))?;
            n += 1;
        }
    }
    if n == 0 {
        anyhow::bail!(
            "{}: neither SPIFFE bundle JSON nor PEM with a CERTIFICATE",
            path.display()
        );
    }
    Ok(bundle.to_json().into_bytes())
}

fn time(t: i64) -> String {
    if t == 0 {
        "never".into()
    } else {
        format!("{t} (unix)")
    }
}

fn rel_json(r: &pb::FederationRelationship) -> serde_json::Value {
    let st = r.status.clone().unwrap_or_default();
    serde_json::json!({
        "trust_domain": r.trust_domain,
        "bundle_endpoint_url": r.bundle_endpoint_url,
        "profile": r.profile,
        "endpoint_spiffe_id": r.endpoint_spiffe_id,
        "ca_bundle": !r.ca_bundle_pem.is_empty(),
        "status": {
            "last_attempt_at": st.last_attempt_at,
            "last_success_at": st.last_success_at,
            "last_error": st.last_error,
            "last_error_at": st.last_error_at,
            "next_refresh_at": st.next_refresh_at,
        },
        "bundle_sequence": r.bundle.as_ref().map(|b| b.sequence),
        "bundle": r.bundle.as_ref().map(|b| String::from_utf8_lossy(&b.spiffe_bundle_json).into_owned()),
    })
}

fn print_rel(r: &pb::FederationRelationship) {
    let st = r.status.clone().unwrap_or_default();
    outln!("Trust domain        : {}", r.trust_domain);
    outln!("Bundle endpoint URL : {}", r.bundle_endpoint_url);
    outln!("Profile             : {}", r.profile);
    if !r.endpoint_spiffe_id.is_empty() {
        outln!("Endpoint SPIFFE ID  : {}", r.endpoint_spiffe_id);
    }
    if !r.ca_bundle_pem.is_empty() {
        outln!("CA bundle           : private CA (given with --ca-bundle)");
    }
    outln!("Last fetch          : {}", time(st.last_attempt_at));
    outln!("Last success        : {}", time(st.last_success_at));
    if !st.last_error.is_empty() {
        outln!(
            "Last error          : {} at {}",
            st.last_error,
            time(st.last_error_at)
        );
    }
    outln!("Next refresh        : {}", time(st.next_refresh_at));
    match &r.bundle {
        Some(b) => outln!("Bundle              : held, sequence {}", b.sequence),
        None => outln!("Bundle              : none yet"),
    }
}

fn emit(output: Output, json: serde_json::Value, human: impl FnOnce()) {
    match output {
        Output::Json => outln!("{json:#}"),
        Output::Human => human(),
    }
}

fn request(a: RelationshipArgs) -> anyhow::Result<pb::FederationRelationship> {
    let bootstrap_bundle_json = match &a.bundle_file {
        Some(p) => read_bundle_file(&a.trust_domain, p)?,
        None => Vec::new(),
    };
    let ca_bundle_pem = match &a.ca_bundle {
        Some(p) => {
            let pem = std::fs::read_to_string(p)
                .with_context(|| format!("--ca-bundle {}", p.display()))?;
            // The request says "no CA bundle" with an empty text, which means the public Web PKI
            // roots: an empty file must not ask for that in the operator's name.
            if pem.trim().is_empty() {
                anyhow::bail!(
                    "--ca-bundle {} is empty: give the PEM CA certificates of the endpoint (without --ca-bundle the endpoint is checked against the public Web PKI roots)",
                    p.display()
                );
            }
            pem
        }
        None => String::new(),
    };
    Ok(pb::FederationRelationship {
        trust_domain: a.trust_domain,
        bundle_endpoint_url: a.bundle_endpoint_url,
        profile: a.profile,
        endpoint_spiffe_id: a.endpoint_spiffe_id.unwrap_or_default(),
        ca_bundle_pem,
        bootstrap_bundle_json,
        status: None,
        bundle: None,
    })
}

pub(crate) async fn federation(
    conn: &AdminConn,
    cmd: FederationCommand,
) -> anyhow::Result<ExitCode> {
    let req = match &cmd {
        FederationCommand::Create(_) | FederationCommand::Update(_) => None,
        FederationCommand::List => None,
        FederationCommand::Show(t)
        | FederationCommand::Delete(t)
        | FederationCommand::Refresh(t) => Some(pb::FederationRequest {
            trust_domain: t.trust_domain.clone(),
        }),
    };
    let mut client = connect(&conn.admin_socket).await?;
    let (rel, verb) = match cmd {
        FederationCommand::Create(a) => (
            client.create_federation(request(a)?).await,
            "Created federation with",
        ),
        FederationCommand::Update(a) => (
            client.update_federation(request(a)?).await,
            "Updated federation with",
        ),
        FederationCommand::List => {
            let list = client
                .list_federations(pb::ListFederationsRequest {})
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner()
                .relationships;
            emit(
                conn.output,
                serde_json::Value::Array(list.iter().map(rel_json).collect()),
                || {
                    if list.is_empty() {
                        outln!("No federation relationships.");
                    }
                    for (i, r) in list.iter().enumerate() {
                        if i > 0 {
                            outln!("");
                        }
                        print_rel(r);
                    }
                },
            );
            return Ok(ExitCode::SUCCESS);
        }
        FederationCommand::Show(_) => (client.get_federation(req.unwrap_or_default()).await, ""),
        FederationCommand::Delete(_) => (
            client.delete_federation(req.unwrap_or_default()).await,
            "Deleted federation with",
        ),
        FederationCommand::Refresh(_) => (
            client.refresh_federation(req.unwrap_or_default()).await,
            "Refreshed the bundle of",
        ),
    };
    let r = rel.map_err(crate::cli::grpc_error)?.into_inner();
    emit(conn.output, rel_json(&r), || {
        if !verb.is_empty() {
            outln!("{verb} {}", r.trust_domain);
        }
        print_rel(&r);
    });
    Ok(ExitCode::SUCCESS)
}

pub(crate) async fn static_bundle(
    conn: &AdminConn,
    cmd: StaticBundleCommand,
) -> anyhow::Result<ExitCode> {
    let mut client = connect(&conn.admin_socket).await?;
    match cmd {
        StaticBundleCommand::Set { trust_domain, file } => {
            let json = read_bundle_file(&trust_domain, &file)?;
            let b = client
                .set_bundle(pb::SetBundleRequest {
                    trust_domain,
                    spiffe_bundle_json: json,
                })
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            emit(
                conn.output,
                serde_json::json!({"trust_domain": b.trust_domain, "sequence": b.sequence}),
                || outln!("Set the bundle of {}", b.trust_domain),
            );
        }
        StaticBundleCommand::List => {
            let list = client
                .list_bundles(pb::ListBundlesRequest {})
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner()
                .bundles;
            emit(
                conn.output,
                serde_json::Value::Array(
                    list.iter()
                        .map(|b| {
                            serde_json::json!({
                                "trust_domain": b.trust_domain,
                                "sequence": b.sequence,
                                "bundle": String::from_utf8_lossy(&b.spiffe_bundle_json),
                            })
                        })
                        .collect(),
                ),
                || {
                    for b in &list {
                        outln!("{}  (sequence {})", b.trust_domain, b.sequence);
                    }
                },
            );
        }
        StaticBundleCommand::Delete { trust_domain } => {
            let b = client
                .delete_bundle(pb::DeleteBundleRequest { trust_domain })
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            emit(
                conn.output,
                serde_json::json!({"trust_domain": b.trust_domain}),
                || outln!("Deleted the bundle of {}", b.trust_domain),
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
