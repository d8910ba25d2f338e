//! `tessera workload attach|detach|list`: a thin client of the agent's admin socket (node mode).
//! `attach` opens the workload's network namespace and hands the descriptor to the agent with
//! SCM_RIGHTS; the agent validates it and attests the workload itself.

use std::os::fd::AsFd as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Subcommand;
use tessera_agent::enroll::{Request, WorkloadInfo};

use crate::cli::Output;

#[derive(Debug, Subcommand)]
pub(crate) enum WorkloadCommand {
    /// Enroll the workload whose network namespace is at PATH (`/run/netns/NAME`).
    Attach {
        #[arg(long, value_name = "PATH")]
        netns: PathBuf,
        /// An extra selector of type `attach:` (`attach:app:web`); repeat for more.
        #[arg(long = "selector", value_name = "attach:K:V")]
        selectors: Vec<String>,
    },
    /// Detach an enrolled workload: its keys are dropped and the node proxy drains it.
    Detach {
        #[arg(long)]
        workload: String,
    },
    /// The enrolled workloads, their selectors and SVIDs.
    List,
}

fn call(
    socket: &Path,
    req: &Request,
    fd: Option<std::fs::File>,
) -> anyhow::Result<serde_json::Value> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!(
            "cannot reach the agent's admin socket {} (is the agent running with --agent-admin-socket? are you root?)",
            socket.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    tessera_agent::enroll::write_frame_with_fd(
        &s,
        &serde_json::to_value(req)?,
        fd.as_ref().map(|f| f.as_fd()),
    )
    .context("sending the request")?;
    let v = tessera_agent::enroll::read_answer(&mut s).map_err(anyhow::Error::msg)?;
    if v["ok"] != true {
        anyhow::bail!("{}", v["error"].as_str().unwrap_or("the agent refused"));
    }
    Ok(v)
}

fn print_workload(w: &WorkloadInfo) {
    outln!("{}\tnetns {}\t{}", w.id, w.netns, w.selectors.join(","));
    for s in &w.svids {
        outln!(
            "  {}\tkey {}",
            s.spiffe_id,
            &s.key_sha256[..s.key_sha256.len().min(16)]
        );
    }
}

pub(crate) fn run(socket: &Path, output: Output, cmd: WorkloadCommand) -> anyhow::Result<ExitCode> {
    let (req, fd) = match cmd {
        WorkloadCommand::Attach { netns, selectors } => {
            let f = std::fs::File::open(&netns)
                .with_context(|| format!("open the network namespace {}", netns.display()))?;
            (Request::Attach { selectors }, Some(f))
        }
        WorkloadCommand::Detach { workload } => (Request::Detach { workload }, None),
        WorkloadCommand::List => (Request::List {}, None),
    };
    let listing = matches!(req, Request::List {});
    let v = call(socket, &req, fd)?;
    match output {
        Output::Json => outln!("{v:#}"),
        Output::Human if listing => {
            let ws: Vec<WorkloadInfo> = serde_json::from_value(v["workloads"].clone())?;
            for w in &ws {
                print_workload(w);
            }
        }
        Output::Human => {
            let w: WorkloadInfo = serde_json::from_value(v["workload"].clone())?;
            print_workload(&w);
        }
    }
    Ok(ExitCode::SUCCESS)
}
