//! Process plumbing both daemons share: logging to stderr and the root
//! shutdown token tied to SIGTERM/SIGINT. (It lives in the crate every
//! program links; see ARCHITECTURE.md.)

use tokio_util::sync::CancellationToken;

/// Cancels `token` on the first SIGTERM or SIGINT. SIGHUP never stops the
/// daemon: it means "re-read the TLS files" (`systemctl reload`), which
/// the TLS reloader acts on; without TLS it is only logged.
pub async fn cancel_on_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; stop with SIGKILL");
        return;
    };
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM"); break }
            _ = int.recv() => { tracing::info!("SIGINT"); break }
            _ = hup.recv() => tracing::info!("SIGHUP: TLS files are re-read (when TLS is on)"),
        }
    }
    token.cancel();
}

/// Logs to stderr, filtered by `HALO_LOG`, else `RUST_LOG`, else `info`;
/// `HALO_LOG_FORMAT=json` for machines, colours only on a terminal.
pub fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("HALO_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if std::env::var("HALO_LOG_FORMAT").is_ok_and(|f| f == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}
