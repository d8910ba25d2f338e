//! `tessera destination create|apply|list|show|delete`: a thin client of the server's
//! `DestinationApi` on the admin socket. The destination map says which SPIFFE ID must answer
//! at an address and port that a workload in transparent mode connects to; the server pushes it
//! to every agent, and proxies merge it with their config file's `[[destination]]` entries. The
//! flags are checked here for a quick, local error; the server checks again and is the
//! authority.

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
    Show { name: String },
    /// Delete a destination.
    Delete { name: String },
}

#[derive(Debug, Args)]
pub(crate) struct DestinationArgs {
    /// The destination's name (letters, digits, `.`, `_`, `-`, `/`).
    name: String,
    /// The network or address the workload connects to (198.18.0.0/24, 2001:db8::7).
    #[arg(long)]
    cidr: String,
    /// A destination port (repeat for several; none: every port).
    #[arg(long = "port")]
    ports: Vec<u16>,
    /// The SPIFFE ID that must answer there.
    #[arg(long)]
    spiffe_id: String,
    /// The peer proxy's tunnel port (default 15008).
    #[arg(long)]
    tunnel_port: Option<u16>,
}

impl DestinationArgs {
    fn stored(&self) -> anyhow::Result<pb::StoredDestination> {
        tessera_policy::destination::validate_name(&self.name)
            .map_err(|e| anyhow::anyhow!("destination {:?}: {e}", self.name))?;
        let doc = DestinationDoc {
            cidr: self.cidr.clone(),
            ports: self.ports.clone(),
            spiffe_id: self.spiffe_id.clone(),
            tunnel_port: self.tunnel_port,
        };
        let d = doc.check().map_err(|e| {
            let flag = match e.field.as_str() {
                "ports" => "port".to_owned(),
                f => f.replace('_', "-"),
            };
            anyhow::anyhow!("--{flag}: {}", e.message)
        })?;
        Ok(pb::StoredDestination {
            name: self.name.clone(),
            document_json: d.to_json(),
        })
    }
}

/// Prints what a change did: `{"name", "revision"}`, or a sentence.
fn changed(output: Output, done: &str, name: &str, revision: u64) {
    match output {
        Output::Json => println!(
            "{:#}",
            serde_json::json!({"name": name, "revision": revision})
        ),
        Output::Human => println!("{done} destination {name} (revision {revision})"),
    }
}

fn status(e: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}", e.message())
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
    // Check the flags before connecting: a bad destination changes nothing.
    let apply = match &cmd {
        DestinationCommand::Create(a) => Some((a.stored()?, true)),
        DestinationCommand::Apply(a) => Some((a.stored()?, false)),
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
            let Some((d, create_only)) = apply else {
                return Ok(ExitCode::FAILURE);
            };
            let name = d.name.clone();
            let r = client
                .apply_destination(pb::ApplyDestinationRequest {
                    destination: Some(d),
                    create_only,
                })
                .await
                .map_err(status)?
                .into_inner();
            changed(conn.output, "Applied", &name, r.revision);
        }
        DestinationCommand::List => {
            let r = client
                .list_destinations(pb::ListDestinationsRequest {})
                .await
                .map_err(status)?
                .into_inner();
            match conn.output {
                Output::Json => println!(
                    "{:#}",
                    serde_json::Value::Array(r.destinations.iter().map(destination_json).collect())
                ),
                Output::Human => {
                    for d in &r.destinations {
                        println!("{}", summary(d));
                    }
                }
            }
        }
        DestinationCommand::Show { name } => {
            let r = client
                .get_destination(pb::DestinationName { name })
                .await
                .map_err(status)?
                .into_inner();
            if let Some(d) = r.destination {
                println!("{:#}", destination_json(&d));
            }
        }
        DestinationCommand::Delete { name } => {
            let r = client
                .delete_destination(pb::DestinationName { name: name.clone() })
                .await
                .map_err(status)?
                .into_inner();
            changed(conn.output, "Deleted", &name, r.revision);
        }
    }
    Ok(ExitCode::SUCCESS)
}
