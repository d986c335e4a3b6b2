//! haloctl as a library: argument parsing ([`cli`]) and one module per
//! command. `main.rs` only calls [`run`].
//!
//! Exit codes: 0 ok, 1 refused or failed, 2 usage, 3 cannot reach the
//! controller.

pub mod bench;
pub mod certs;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod copy;
pub mod fixture;
pub mod gateway;
pub mod inspect;
pub mod keys;
pub mod llamahttp;
pub mod memory;
pub mod output;
pub mod place;
pub mod plan;
#[cfg(test)]
mod snapshots;
pub mod top;

use std::process::ExitCode;

/// A command's outcome that is not a plain success.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The request was understood and answered "no" (e.g. does not fit);
    /// the answer has already been printed.
    #[error("{0}")]
    Refused(String),
    /// The controller could not be reached (exit 3); the message names the
    /// address tried and where it came from.
    #[error("{0}")]
    Unreachable(String),
    /// The command line or haloctl's config was wrong (exit 2).
    #[error("{0}")]
    Usage(String),
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
    let cli = match cli::parse(args) {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let tls = client::TlsArgs {
        cert: cli.tls_cert.clone(),
        key: cli.tls_key.clone(),
        ca: cli.tls_ca.clone(),
    };
    let target = || client::Target::resolve(cli.controller.as_deref())?.with_tls(&tls);
    let result = match cli.command {
        cli::Command::Plan(a) if plan::is_file(&a.model) => plan::run(&a),
        cli::Command::Plan(a) => target().and_then(|t| cluster::plan(&t, &a)),
        cli::Command::Nodes(a) => target().and_then(|t| cluster::nodes(&t, &a)),
        cli::Command::Models(cli::ModelsArgs {
            command: Some(cli::ModelsCommand::Copy(a)),
            ..
        }) => target().and_then(|t| copy::run(&t, &a)),
        cli::Command::Models(a) => target().and_then(|t| cluster::models(&t, &a.list)),
        cli::Command::Status(a) => target().and_then(|t| cluster::status(&t, &a)),
        cli::Command::Top(a) => target().and_then(|t| top::run(&t, &a)),
        cli::Command::Endpoints(a) => target().and_then(|t| cluster::endpoints(&t, &a)),
        cli::Command::Gateway(a) => target().and_then(|t| gateway::run(&t, &a)),
        cli::Command::Events(a) => target().and_then(|t| cluster::events(&t, &a)),
        cli::Command::Logs(a) => target().and_then(|t| cluster::logs(&t, &a)),
        cli::Command::Unplace(a) => target().and_then(|t| cluster::unplace(&t, &a)),
        cli::Command::Place(a) => target().and_then(|t| place::run(&t, &a)),
        cli::Command::Bench(a) => target().and_then(|t| bench::run(&t, &a)),
        cli::Command::Keys(a) => target().and_then(|t| keys::run(&t, &a)),
        cli::Command::Completions(a) => {
            let mut out = Vec::new();
            clap_complete::generate(a.shell, &mut cli::command(), "haloctl", &mut out);
            output::print(&String::from_utf8_lossy(&out));
            Ok(())
        }
        cli::Command::Inspect(a) => inspect::run(&a),
        cli::Command::Memory(a) => memory::run(&a),
        cli::Command::Fixture(a) => fixture::run(&a),
        cli::Command::Certs(a) => certs::run(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Refused(msg)) => {
            if !msg.is_empty() {
                eprintln!("haloctl: {msg}");
            }
            ExitCode::from(1)
        }
        Err(Failure::Unreachable(msg)) => {
            eprintln!("haloctl: {msg}");
            ExitCode::from(3)
        }
        Err(Failure::Usage(msg)) => {
            eprintln!("haloctl: {msg}");
            ExitCode::from(2)
        }
        Err(Failure::Other(e)) => {
            eprintln!("haloctl: {e:#}");
            ExitCode::from(1)
        }
    }
}
