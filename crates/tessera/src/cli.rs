//! Command-line surface: clap definitions and dispatch to the component that does the work.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::inspect;

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
    /// SPIFFE ID tools.
    #[command(subcommand)]
    Id(IdCommand),
    /// X509-SVID tools.
    #[command(subcommand)]
    Svid(SvidCommand),
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
    }
}
