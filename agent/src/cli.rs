//! Command line of `halo-agent`: parse and validate the whole config (one
//! line and exit 64 on any problem, before a socket is bound), set up
//! logging (`HALO_LOG`, then `RUST_LOG`; `HALO_LOG_FORMAT=json`), and run the
//! daemon until SIGTERM or SIGINT. The steps up to the runtime are the ones
//! both daemons share ([`proto::config::start`]).

use crate::config::Config;
use crate::daemon::Daemon;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Exit code for a bad command line or config (`EX_USAGE`).
pub use proto::config::EXIT_CONFIG;

/// Entry point of the `halo-agent` binary.
pub fn main() -> ExitCode {
    // The agent's own helper for RPC servers (not for people: no --help).
    let argv: Vec<String> = std::env::args_os()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    if argv.get(1).map(String::as_str) == Some(crate::supervisor::rpcproxy::PROXY_ARG) {
        return crate::supervisor::rpcproxy::main(argv.get(2..).unwrap_or_default());
    }
    let (config, runtime) = match proto::config::start("halo-agent", Config::resolve) {
        Ok(v) => v,
        Err(code) => return code,
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
