//! `tessera authority x509|jwt|upstream show|prepare|activate|taint|revoke`: forced rotation of
//! the server's signing authorities, through the authority API on the admin socket.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::Subcommand;
use tessera_proto::v1 as pb;
use tessera_proto::v1::authority_api_client::AuthorityApiClient;

use crate::admin_cli::AdminConn;
use crate::cli::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum AuthorityCommand {
    /// The X.509 CAs that sign X509-SVIDs (authority ID: subject key identifier).
    #[command(subcommand)]
    X509(Step),
    /// The JWT keys that sign JWT-SVIDs (authority ID: kid).
    #[command(subcommand)]
    Jwt(Step),
    /// The upstream authority that signs the X.509 CAs (`[upstream_authority]`).
    #[command(subcommand)]
    Upstream(UpstreamStep),
}

/// The steps, in the order they run: prepare → activate → taint → revoke.
#[derive(Debug, Subcommand)]
pub(crate) enum Step {
    /// List the authorities: old, active, prepared, and which are tainted.
    Show,
    /// Make the next authority now: published in the bundle, signing nothing yet.
    Prepare,
    /// The prepared authority signs from now on; the active one becomes old (still published).
    Activate,
    /// Every agent replaces every SVID the (old) authority signed, at once.
    Taint {
        #[arg(long, value_parser = crate::cli::parse_key)]
        authority_id: String,
    },
    /// Remove the (tainted) authority from the bundle: nothing it signed verifies any more.
    Revoke {
        #[arg(long, value_parser = crate::cli::parse_key)]
        authority_id: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum UpstreamStep {
    /// Show the upstream certificates that sign the X.509 CAs.
    Show,
    /// Not done by Tessera (explains what to do instead).
    Taint {
        #[arg(long, value_parser = crate::cli::parse_key)]
        authority_id: String,
    },
    /// Not done by Tessera (explains what to do instead).
    Revoke {
        #[arg(long, value_parser = crate::cli::parse_key)]
        authority_id: String,
    },
}

/// What a step is about to do, said before it runs.
fn intent(step: &Step, kind: &str, cmd: &str) -> Option<String> {
    Some(match step {
        Step::Show => return None,
        Step::Prepare => format!(
            "prepare: a new {kind} authority is made and published in the trust bundle now; it \
             signs nothing until `tessera authority {cmd} activate`"
        ),
        Step::Activate => format!(
            "activate: the prepared {kind} authority signs every new SVID from now on; the active \
             one becomes old and stays in the bundle until it expires"
        ),
        Step::Taint { authority_id } => format!(
            "taint: every agent replaces every SVID signed by {kind} authority {authority_id} \
             now; it stays in the bundle until revoked"
        ),
        Step::Revoke { authority_id } => format!(
            "revoke: {kind} authority {authority_id} leaves the trust bundle; every SVID it \
             signed is refused from then on"
        ),
    })
}

fn print_state(output: Output, s: &pb::AuthorityState, message: Option<&str>) {
    let list: Vec<serde_json::Value> = s
        .authorities
        .iter()
        .map(|a| {
            serde_json::json!({
                "authority_id": a.authority_id,
                "status": a.status,
                "tainted": a.tainted,
                "created_at": a.created_at,
                "not_after": a.not_after,
                "upstream_signed": a.upstream_signed,
            })
        })
        .collect();
    match output {
        Output::Json => {
            let mut v = serde_json::json!({ "authorities": list, "upstream": s.upstream });
            if let Some(m) = message {
                v["message"] = m.into();
            }
            outln!("{v:#}");
        }
        Output::Human => {
            if let Some(m) = message {
                outln!("{m}");
                outln!("");
            }
            if !s.upstream.is_empty() {
                outln!("Upstream authority: {}", s.upstream);
            }
            if s.authorities.is_empty() {
                outln!("(none)");
            }
            for a in &s.authorities {
                let mut flags = Vec::new();
                if a.tainted {
                    flags.push("tainted");
                }
                if a.upstream_signed {
                    flags.push("upstream-signed");
                }
                outln!(
                    "{:<9} {}  not after {}{}",
                    a.status,
                    a.authority_id,
                    a.not_after,
                    if flags.is_empty() {
                        String::new()
                    } else {
                        format!("  [{}]", flags.join(", "))
                    }
                );
            }
        }
    }
}

pub(crate) async fn run(conn: &AdminConn, cmd: AuthorityCommand) -> anyhow::Result<ExitCode> {
    let channel = tessera_server::client::unix_channel(&conn.admin_socket)
        .await
        .with_context(|| {
            format!(
                "cannot reach the server's admin socket {} (is the server running? see \
                 --admin-socket)",
                conn.admin_socket.display()
            )
        })?;
    let mut client = AuthorityApiClient::new(channel);
    let (kind, step, name, cmd) = match cmd {
        AuthorityCommand::X509(s) => (pb::AuthorityKind::X509, s, "X.509", "x509"),
        AuthorityCommand::Jwt(s) => (pb::AuthorityKind::Jwt, s, "JWT", "jwt"),
        AuthorityCommand::Upstream(s) => {
            let kind = pb::AuthorityKind::X509Upstream as i32;
            let (req, taint) = match s {
                UpstreamStep::Show => {
                    let st = client
                        .get_authority_state(pb::AuthorityRequest {
                            kind,
                            authority_id: String::new(),
                        })
                        .await
                        .map_err(|e| anyhow::anyhow!("{}", e.message()))?
                        .into_inner();
                    if st.upstream.is_empty() && matches!(conn.output, Output::Human) {
                        outln!("no upstream authority: the X.509 CAs are self-signed");
                        return Ok(ExitCode::SUCCESS);
                    }
                    print_state(conn.output, &st, None);
                    return Ok(ExitCode::SUCCESS);
                }
                UpstreamStep::Taint { authority_id } => (authority_id, true),
                UpstreamStep::Revoke { authority_id } => (authority_id, false),
            };
            let req = pb::AuthorityRequest {
                kind,
                authority_id: req,
            };
            // The server explains why it does not do this, and what to do instead.
            let r = if taint {
                client.taint_authority(req).await
            } else {
                client.revoke_authority(req).await
            };
            return match r {
                Ok(resp) => {
                    let resp = resp.into_inner();
                    outln!("{}", resp.message);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Err(crate::cli::grpc_error(e)),
            };
        }
    };
    let req = |id: &str| pb::AuthorityRequest {
        kind: kind as i32,
        authority_id: id.to_owned(),
    };
    let err = crate::cli::grpc_error;
    let resp = match &step {
        Step::Show => {
            let st = client
                .get_authority_state(req(""))
                .await
                .map_err(err)?
                .into_inner();
            print_state(conn.output, &st, None);
            return Ok(ExitCode::SUCCESS);
        }
        Step::Prepare => client.prepare_authority(req("")).await,
        Step::Activate => client.activate_authority(req("")).await,
        Step::Taint { authority_id } => client.taint_authority(req(authority_id)).await,
        Step::Revoke { authority_id } => client.revoke_authority(req(authority_id)).await,
    }
    .map_err(err)?
    .into_inner();
    // What the step does, once the server has done it (before, it was said even when the
    // server then refused the step).
    if let (Some(text), Output::Human) = (intent(&step, name, cmd), conn.output) {
        errln!("{text}");
    }
    print_state(
        conn.output,
        &resp.state.unwrap_or_default(),
        Some(&resp.message),
    );
    Ok(ExitCode::SUCCESS)
}
