//! `tessera destination create|apply|list|show|delete`: a thin client of the server's
//! `DestinationApi` on the admin socket. The destination map says which SPIFFE ID must answer
//! at an address and port that a workload in transparent mode connects to; the server pushes it
//! to every agent, and proxies merge it with their config file's `[[destination]]` entries. The
//! flags are checked here for a quick, local error; the server checks again and is the
//! authority.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use tessera_policy::destination::DestinationDoc;
use tessera_proto::v1 as pb;
use tessera_proto::v1::destination_api_client::DestinationApiClient;

use crate::admin_cli::AdminConn;
use crate::cli::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum DestinationCommand {
    /// Create a destination (refused if the name exists).
    Create(DestinationArgs),
    /// Create or replace a destination.
    Apply(DestinationArgs),
    /// List every destination.
    List,
    /// Show one destination's document.
    Show {
        #[arg(value_parser = crate::cli::parse_key)]
        name: String,
    },
    /// Delete a destination.
    Delete {
        #[arg(value_parser = crate::cli::parse_key)]
        name: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct DestinationArgs {
    /// A YAML or JSON file of destinations instead of the flags: one mapping (`name`, `cidr`,
    /// `ports`, `spiffe_id`, `tunnel_port`) or a list of them, applied in order.
    #[arg(
        short = 'f',
        long = "file",
        conflicts_with_all = ["name", "cidr", "ports", "spiffe_id", "tunnel_port"]
    )]
    file: Option<PathBuf>,
    /// The destination's name (letters, digits, `.`, `_`, `-`, `/`).
    #[arg(required_unless_present = "file")]
    name: Option<String>,
    /// The network or address the workload connects to (198.18.0.0/24, 2001:db8::7).
    #[arg(long, required_unless_present = "file")]
    cidr: Option<String>,
    /// A destination port (repeat for several; none: every port).
    #[arg(long = "port")]
    ports: Vec<u16>,
    /// The SPIFFE ID that must answer there.
    #[arg(long, required_unless_present = "file")]
    spiffe_id: Option<String>,
    /// The peer proxy's tunnel port (default 15008).
    #[arg(long)]
    tunnel_port: Option<u16>,
}

impl DestinationArgs {
    /// The destinations to apply, checked here: a bad file or flag changes nothing.
    fn stored(&self) -> anyhow::Result<Vec<pb::StoredDestination>> {
        if let Some(path) = &self.file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            let ds = tessera_policy::destination::parse_documents(&text)
                .with_context(|| path.display().to_string())?;
            if ds.is_empty() {
                anyhow::bail!("{}: no destination in the file", path.display());
            }
            return Ok(ds
                .into_iter()
                .map(|(name, d)| pb::StoredDestination {
                    name,
                    document_json: d.to_json(),
                })
                .collect());
        }
        let (Some(name), Some(cidr), Some(spiffe_id)) = (&self.name, &self.cidr, &self.spiffe_id)
        else {
            anyhow::bail!("NAME, --cidr and --spiffe-id are required without --file");
        };
        tessera_policy::destination::validate_name(name)
            .map_err(|e| anyhow::anyhow!("destination {name:?}: {e}"))?;
        let doc = DestinationDoc {
            cidr: cidr.clone(),
            ports: self.ports.clone(),
            spiffe_id: spiffe_id.clone(),
            tunnel_port: self.tunnel_port,
        };
        let d = doc.check().map_err(|e| {
            let flag = match e.field.as_str() {
                "ports" => "port".to_owned(),
                f => f.replace('_', "-"),
            };
            anyhow::anyhow!("--{flag}: {}", e.message)
        })?;
        Ok(vec![pb::StoredDestination {
            name: name.clone(),
            document_json: d.to_json(),
        }])
    }
}

/// Prints what a change did: `{"name", "revision"}`, or a sentence.
fn changed(output: Output, done: &str, name: &str, revision: u64) {
    match output {
        Output::Json => outln!(
            "{:#}",
            serde_json::json!({"name": name, "revision": revision})
        ),
        Output::Human => outln!("{done} destination {name} (revision {revision})"),
    }
}

fn destination_json(d: &pb::StoredDestination) -> serde_json::Value {
    let mut doc: serde_json::Value =
        serde_json::from_str(&d.document_json).unwrap_or(serde_json::Value::Null);
    if let serde_json::Value::Object(m) = &mut doc {
        m.insert("name".into(), serde_json::Value::String(d.name.clone()));
    }
    doc
}

fn summary(d: &pb::StoredDestination) -> String {
    match DestinationDoc::from_json(&d.document_json) {
        Ok(p) => {
            let ports = if p.ports.is_empty() {
                "every port".to_owned()
            } else {
                p.ports
                    .iter()
                    .map(u16::to_string)
                    .collect::<Vec<_>>()
                    .join(",")
            };
            format!(
                "{}\t{}\t{ports}\t{}\ttunnel {}",
                d.name, p.cidr, p.spiffe_id, p.tunnel_port
            )
        }
        Err(e) => format!("{}\t(invalid: {e})", d.name),
    }
}

pub(crate) async fn destination(
    conn: &AdminConn,
    cmd: DestinationCommand,
) -> anyhow::Result<ExitCode> {
    // Check the flags or the file before connecting: a bad destination changes nothing.
    let apply = match &cmd {
        DestinationCommand::Create(a) => Some((a.stored()?, true, a.file.is_some())),
        DestinationCommand::Apply(a) => Some((a.stored()?, false, a.file.is_some())),
        _ => None,
    };
    let ch = tessera_server::client::unix_channel(&conn.admin_socket)
        .await
        .with_context(|| {
            format!(
                "cannot reach the server's admin socket {} (is the server running? see --admin-socket)",
                conn.admin_socket.display()
            )
        })?;
    let mut client = DestinationApiClient::new(ch);
    match cmd {
        DestinationCommand::Create(_) | DestinationCommand::Apply(_) => {
            let Some((ds, create_only, from_file)) = apply else {
                return Ok(ExitCode::FAILURE);
            };
            // In order; the server refuses an entry that clashes with one stored (or, for
            // create, a name that exists), which stops the rest: the error names it.
            let json_list = from_file && matches!(conn.output, Output::Json);
            let mut done = Vec::new();
            let mut refused = None;
            for d in ds {
                let name = d.name.clone();
                match client
                    .apply_destination(pb::ApplyDestinationRequest {
                        destination: Some(d),
                        create_only,
                    })
                    .await
                {
                    Ok(r) if json_list => done
                        .push(serde_json::json!({"name": name, "revision": r.get_ref().revision})),
                    Ok(r) => changed(conn.output, "Applied", &name, r.get_ref().revision),
                    Err(e) => {
                        refused = Some(
                            crate::cli::grpc_error(e).context(format!("destination {name:?}")),
                        );
                        break;
                    }
                }
            }
            // What was applied before a refusal is said too: a script must know it is stored.
            if json_list {
                outln!("{:#}", serde_json::Value::Array(done));
            }
            if let Some(e) = refused {
                return Err(e);
            }
        }
        DestinationCommand::List => {
            let r = client
                .list_destinations(pb::ListDestinationsRequest {})
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            match conn.output {
                Output::Json => outln!(
                    "{:#}",
                    serde_json::Value::Array(r.destinations.iter().map(destination_json).collect())
                ),
                Output::Human => {
                    for d in &r.destinations {
                        outln!("{}", summary(d));
                    }
                }
            }
        }
        DestinationCommand::Show { name } => {
            let r = client
                .get_destination(pb::DestinationName { name })
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            if let Some(d) = r.destination {
                outln!("{:#}", destination_json(&d));
            }
        }
        DestinationCommand::Delete { name } => {
            let r = client
                .delete_destination(pb::DestinationName { name: name.clone() })
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            changed(conn.output, "Deleted", &name, r.revision);
        }
    }
    Ok(ExitCode::SUCCESS)
}
