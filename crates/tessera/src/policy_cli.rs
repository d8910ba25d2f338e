//! `tessera policy create|apply|list|show|delete`: a thin client of the server's `PolicyApi` on
//! the admin socket. Files are YAML or JSON: one policy (`name` plus the document fields) or a
//! list of them. The policy crate checks each document here for a quick, local error; the
//! server checks again and is the authority.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use tessera_proto::v1 as pb;
use tessera_proto::v1::policy_api_client::PolicyApiClient;
use tonic::transport::Channel;

use crate::admin_cli::AdminConn;
use crate::cli::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum PolicyCommand {
    /// Create the policies of a file (refused if one of the names exists).
    Create {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// Create or replace the policies of a file.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
    },
    /// List every policy and the trust domain's default.
    List,
    /// Show one policy's document.
    Show {
        #[arg(value_parser = crate::cli::parse_key)]
        name: String,
    },
    /// Delete a policy.
    Delete {
        #[arg(value_parser = crate::cli::parse_key)]
        name: String,
    },
    /// Policy sets owned by external access-control systems (`[[policy.sync]]`).
    #[command(subcommand)]
    Sync(SyncCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum SyncCommand {
    /// Each source's last poll, last success, version applied, policies and last error (as
    /// seen by the server this command reaches).
    Status,
}

fn unix_time(t: i64) -> String {
    if t == 0 {
        "never".to_owned()
    } else {
        let ago = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        )
        .unwrap_or(i64::MAX)
        .saturating_sub(t);
        format!("{ago}s ago")
    }
}

async fn connect(socket: &Path) -> anyhow::Result<PolicyApiClient<Channel>> {
    let ch = tessera_server::client::unix_channel(socket)
        .await
        .with_context(|| {
            format!(
                "cannot reach the server's admin socket {} (is the server running? see --admin-socket)",
                socket.display()
            )
        })?;
    Ok(PolicyApiClient::new(ch))
}

/// The policies of a YAML or JSON file, each as (name, JSON document), checked locally.
pub(crate) fn read_policy_file(path: &Path) -> anyhow::Result<Vec<pb::StoredPolicy>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse_policies(&text).with_context(|| path.display().to_string())
}

fn parse_policies(text: &str) -> anyhow::Result<Vec<pb::StoredPolicy>> {
    let policies = tessera_policy::parse_documents(text)?;
    if policies.is_empty() {
        anyhow::bail!("no policy in the file");
    }
    Ok(policies
        .into_iter()
        .map(|p| pb::StoredPolicy {
            document_json: p.to_json(),
            name: p.name,
        })
        .collect())
}

fn policy_json(p: &pb::StoredPolicy) -> serde_json::Value {
    let mut doc: serde_json::Value =
        serde_json::from_str(&p.document_json).unwrap_or(serde_json::Value::Null);
    if let serde_json::Value::Object(m) = &mut doc {
        m.insert("name".into(), serde_json::Value::String(p.name.clone()));
    }
    doc
}

fn summary(p: &pb::StoredPolicy) -> String {
    let doc: serde_json::Value =
        serde_json::from_str(&p.document_json).unwrap_or(serde_json::Value::Null);
    let action = doc.get("action").and_then(|a| a.as_str()).unwrap_or("?");
    let rules = doc
        .get("rules")
        .and_then(|r| r.as_array())
        .map_or(0, |r| r.len());
    let dry = if doc.get("dry_run").and_then(|d| d.as_bool()) == Some(true) {
        " (dry run)"
    } else {
        ""
    };
    format!("{}\t{action}\t{rules} rule(s){dry}", p.name)
}

pub(crate) async fn policy(conn: &AdminConn, cmd: PolicyCommand) -> anyhow::Result<ExitCode> {
    // Read and check files before connecting: a bad file changes nothing.
    let (policies, create_only) = match &cmd {
        PolicyCommand::Create { file } => (read_policy_file(file)?, true),
        PolicyCommand::Apply { file } => (read_policy_file(file)?, false),
        _ => (Vec::new(), false),
    };
    let mut client = connect(&conn.admin_socket).await?;
    match cmd {
        PolicyCommand::Create { .. } | PolicyCommand::Apply { .. } => {
            let mut done = Vec::new();
            for p in policies {
                let name = p.name.clone();
                let r = client
                    .apply_policy(pb::ApplyPolicyRequest {
                        policy: Some(p),
                        create_only,
                    })
                    .await
                    .map_err(crate::cli::grpc_error)
                    .with_context(|| format!("policy {name:?}"))?
                    .into_inner();
                done.push(serde_json::json!({"name": name, "revision": r.revision}));
                if matches!(conn.output, Output::Human) {
                    outln!("Applied policy {name} (revision {})", r.revision);
                }
            }
            if matches!(conn.output, Output::Json) {
                outln!("{:#}", serde_json::Value::Array(done));
            }
        }
        PolicyCommand::List => {
            let r = client
                .list_policies(pb::ListPoliciesRequest {})
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            match conn.output {
                Output::Json => outln!(
                    "{:#}",
                    serde_json::json!({
                        "default": r.default_action,
                        "policies": r.policies.iter().map(policy_json).collect::<Vec<_>>(),
                    })
                ),
                Output::Human => {
                    outln!("default: {}", r.default_action);
                    for p in &r.policies {
                        outln!("{}", summary(p));
                    }
                }
            }
        }
        PolicyCommand::Show { name } => {
            let r = client
                .get_policy(pb::PolicyName { name })
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            if let Some(p) = r.policy {
                outln!("{:#}", policy_json(&p));
            }
        }
        PolicyCommand::Delete { name } => {
            let r = client
                .delete_policy(pb::PolicyName { name: name.clone() })
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            match conn.output {
                Output::Json => {
                    outln!(
                        "{:#}",
                        serde_json::json!({"name": name, "revision": r.revision})
                    )
                }
                Output::Human => outln!("Deleted policy {name} (revision {})", r.revision),
            }
        }
        PolicyCommand::Sync(SyncCommand::Status) => {
            let r = client
                .get_policy_sync_status(pb::PolicySyncStatusRequest {})
                .await
                .map_err(crate::cli::grpc_error)?
                .into_inner();
            match conn.output {
                Output::Json => {
                    let rows: Vec<serde_json::Value> = r
                        .sources
                        .iter()
                        .map(|s| {
                            serde_json::json!({
                                "set": s.set,
                                "source": s.source,
                                "interval_secs": s.interval_secs,
                                "last_attempt_unix": s.last_attempt_unix,
                                "last_success_unix": s.last_success_unix,
                                "etag": s.etag,
                                "policies": s.policies,
                                "revision": s.revision,
                                "last_error": s.last_error,
                                "last_error_unix": s.last_error_unix,
                            })
                        })
                        .collect();
                    outln!("{:#}", serde_json::Value::Array(rows));
                }
                Output::Human => {
                    if r.sources.is_empty() {
                        outln!("no [[policy.sync]] source is configured on this server");
                    }
                    for s in &r.sources {
                        outln!(
                            "set {} from {} (every {}s)",
                            s.set,
                            s.source,
                            s.interval_secs
                        );
                        outln!(
                            "  last poll {}, last success {}, {} policies, version {:?}, revision {}",
                            unix_time(s.last_attempt_unix),
                            unix_time(s.last_success_unix),
                            s.policies,
                            s.etag,
                            s.revision
                        );
                        if !s.last_error.is_empty() {
                            outln!(
                                "  last error ({}): {} — the last good set stays in force",
                                unix_time(s.last_error_unix),
                                s.last_error
                            );
                        }
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn yaml_and_json_files_parse_and_bad_ones_name_the_field() {
        let yaml = "- name: web\n  action: ALLOW\n  rules:\n    - from: {principals: [\"spiffe://example.org/a\"]}\n      to: {methods: [GET]}\n- name: audit\n  action: AUDIT\n";
        let p = parse_policies(yaml).unwrap();
        assert_eq!(p.len(), 2);
        assert_eq!(p[0].name, "web");
        assert!(p[0].document_json.contains("\"methods\":[\"GET\"]"));
        let json = r#"{"name":"x","action":"DENY"}"#;
        assert_eq!(parse_policies(json).unwrap()[0].name, "x");
        let e = parse_policies("name: bad\naction: ALLOW\nrules:\n  - to: {methods: [get]}\n")
            .unwrap_err();
        assert!(format!("{e:#}").contains("rules[0].to.methods[0]"), "{e:#}");
        assert!(parse_policies("action: ALLOW\n").is_err());
        assert!(parse_policies("[]").is_err());
        assert!(parse_policies("name: a b\naction: ALLOW\n").is_err());
    }
}
