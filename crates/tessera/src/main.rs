//! `tessera`: one binary for every Tessera component. Parses flags and hands off; no logic here.

use std::process::ExitCode;

use clap::Parser;

mod admin_cli;
mod agent_cli;
mod authority_cli;
mod cli;
mod destination_cli;
mod federation_cli;
mod inspect;
mod policy_cli;
mod proxy_cli;
mod workload_cli;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
