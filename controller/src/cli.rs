//! The `halo-controller` command line: parses and validates the whole config (one line and
//! exit 64 on any problem, before a socket is bound), sets up logging
//! (`HALO_LOG`, then `RUST_LOG`; `HALO_LOG_FORMAT=json`) and runs the daemon
//! until SIGTERM or SIGINT.

use crate::config::{Args, Config};
use clap::Parser;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Entry point of the `halo-controller` binary.
pub fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let text = e.to_string();
            let line = text
                .lines()
                .find(|l| !l.trim().is_empty())
                .unwrap_or("invalid arguments")
                .trim_start_matches("error: ");
            eprintln!("halo-controller: {line} (see --help)");
            return ExitCode::from(64);
        }
    };
    let config = match Config::resolve(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("halo-controller: config: {e}");
            return ExitCode::from(64);
        }
    };
    proto::runtime::init_tracing();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("halo-controller: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        tokio::spawn(proto::runtime::cancel_on_signal(shutdown.clone()));
        match crate::daemon::run(config, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("halo-controller: {e}");
                ExitCode::from(e.exit_code())
            }
        }
    })
}
