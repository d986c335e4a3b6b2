//! Command line of `halo-agent`: parse and validate the whole config (one
//! line and exit 64 on any problem, before a socket is bound), set up
//! logging (`HALO_LOG`, then `RUST_LOG`; `HALO_LOG_FORMAT=json`), and run the
//! daemon until SIGTERM or SIGINT.

use crate::config::{Args, Config};
use crate::daemon::Daemon;
use clap::Parser;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Exit code for a bad command line or config (`EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// Entry point of the `halo-agent` binary.
pub fn main() -> ExitCode {
    // The agent's own helper for RPC servers (not for people: no --help).
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if argv.get(1).map(String::as_str) == Some(crate::supervisor::rpcproxy::PROXY_ARG) {
        return crate::supervisor::rpcproxy::main(argv.get(2..).unwrap_or_default());
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) if !e.use_stderr() => {
            // --help, --version
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
            eprintln!("halo-agent: {line} (see --help)");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let config = match Config::resolve(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("halo-agent: config: {e}");
            return ExitCode::from(EXIT_CONFIG);
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
            eprintln!("halo-agent: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let daemon = match Daemon::bind(config, shutdown.clone()).await {
            Ok(d) => d,
            Err(e) => {
                eprintln!("halo-agent: {e}");
                return ExitCode::from(e.exit_code());
            }
        };
        tokio::spawn(proto::runtime::cancel_on_signal(shutdown));
        match daemon.run().await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("{e}");
                eprintln!("halo-agent: {e}");
                ExitCode::from(e.exit_code())
            }
        }
    })
}
