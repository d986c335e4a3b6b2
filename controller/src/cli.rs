//! The `halo-controller` command line: parses and validates the whole config (one line and
//! exit 64 on any problem, before a socket is bound), sets up logging
//! (`HALO_LOG`, then `RUST_LOG`; `HALO_LOG_FORMAT=json`) and runs the daemon
//! until SIGTERM or SIGINT. The steps up to the runtime are the ones both
//! daemons share ([`proto::config::start`]).

use crate::config::Config;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Entry point of the `halo-controller` binary.
pub fn main() -> ExitCode {
    let (config, runtime) = match proto::config::start("halo-controller", Config::resolve) {
        Ok(v) => v,
        Err(code) => return code,
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
