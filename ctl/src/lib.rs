//! haloctl as a library: argument parsing ([`cli`]) and one module per
//! command. `main.rs` only calls [`run`].
//!
//! Exit codes: 0 ok, 1 refused or failed, 2 usage, 3 cannot reach the
//! controller.

pub mod cli;
pub mod fixture;
pub mod inspect;
pub mod memory;
pub mod output;
pub mod plan;

use std::process::ExitCode;

/// A command's outcome that is not a plain success.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The request was understood and answered "no" (e.g. does not fit);
    /// the answer has already been printed.
    #[error("{0}")]
    Refused(String),
    /// Anything else that went wrong.
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Runs haloctl with these arguments (the first is the program name).
pub fn run<I, T>(args: I) -> ExitCode
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::Parser;
    let cli = match cli::Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let result = match cli.command {
        cli::Command::Plan(a) => plan::run(&a),
        cli::Command::Inspect(a) => inspect::run(&a),
        cli::Command::Memory(a) => memory::run(&a),
        cli::Command::Fixture(a) => fixture::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(msg)) => {
            if !msg.is_empty() {
                eprintln!("haloctl: {msg}");
            }
            ExitCode::from(1)
        }
        Err(Failure::Other(e)) => {
            eprintln!("haloctl: {e:#}");
            ExitCode::from(1)
        }
    }
}
