//! `tessera`: one binary for every Tessera component. Parses flags and hands off; no logic here.

use std::io::Write as _;
use std::process::ExitCode;

use clap::Parser;

/// `println!` for a command's output. `println!` panics when stdout is gone (`tessera policy
/// list | head`); this ends the process quietly instead (see [`write_out`]).
macro_rules! outln {
    ($($t:tt)*) => { $crate::write_out(format_args!($($t)*), true) };
}

/// `print!` for a command's output, as [`outln!`].
macro_rules! out {
    ($($t:tt)*) => { $crate::write_out(format_args!($($t)*), false) };
}

/// `eprintln!` for messages to the user: a closed stderr loses the message, never panics.
macro_rules! errln {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($t)*);
    }};
}

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
            errln!("error: {}", error_text(&e));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, as `{:#}` writes them (`outer: cause: root`), without a cause that
/// the text already ends with: an error type whose message includes its source (`read X:
/// {source}`) would otherwise print the root cause twice.
fn error_text(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !text.ends_with(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
    }
    text
}

/// Writes a command's output to stdout. A reader that went away (EPIPE: the other end of a pipe
/// closed) ends the process with status 141, what a shell reports for a process that SIGPIPE
/// ended, as `ls | head` does; the output nobody reads is dropped. Any other failure (a full
/// disk) is an error to report, then exit 1. The process never panics over its output.
pub(crate) fn write_out(args: std::fmt::Arguments<'_>, newline: bool) {
    let mut o = std::io::stdout().lock();
    let written = o
        .write_fmt(args)
        .and_then(|()| if newline { o.write_all(b"\n") } else { Ok(()) })
        .and_then(|()| o.flush());
    match written {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(141),
        Err(e) => {
            errln!("error: writing the output: {e}");
            std::process::exit(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_cause_the_message_already_ends_with_is_not_repeated() {
        #[derive(Debug)]
        struct Read {
            source: std::io::Error,
        }
        impl std::fmt::Display for Read {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "read /x: {}", self.source)
            }
        }
        impl std::error::Error for Read {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.source)
            }
        }
        let e = anyhow::Error::new(Read {
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })
        .context("--config /x");
        assert_eq!(
            super::error_text(&e),
            "--config /x: read /x: entity not found"
        );
        let plain = anyhow::anyhow!("root").context("middle").context("top");
        assert_eq!(super::error_text(&plain), "top: middle: root");
    }
}
