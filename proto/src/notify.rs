//! systemd's service notification protocol (`sd_notify(3)`), hand-rolled:
//! `READY=1` once the daemon serves, `STOPPING=1` when it begins to shut
//! down, and `WATCHDOG=1` every half `WATCHDOG_USEC` while a health check
//! passes, so a wedged daemon is restarted by systemd (`WatchdogSec=`).
//!
//! Everything is a no-op when `NOTIFY_SOCKET` is unset (not under systemd,
//! or `Type=simple`). Path and abstract-namespace (`@name`) sockets are
//! supported. Nothing here depends on the rest of the agent, so the
//! controller can use the same file.
//!
//! The process environment is read once, in [`Notifier::from_env`]; it is
//! never modified (the agent starts llama-server with a cleared
//! environment, so children never see `NOTIFY_SOCKET`).

use std::future::Future;
use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Where notifications go: the datagram socket systemd named in
/// `NOTIFY_SOCKET`.
#[derive(Debug, Clone)]
pub struct NotifySocket {
    addr: SocketAddr,
    display: String,
}

impl NotifySocket {
    /// Parses a `NOTIFY_SOCKET` value: an absolute path, or `@name` for a
    /// Linux abstract-namespace socket. Anything else (empty, relative,
    /// `vsock:` addresses) is refused.
    pub fn parse(value: &str) -> io::Result<NotifySocket> {
        let addr = if let Some(name) = value.strip_prefix('@') {
            abstract_addr(name.as_bytes())?
        } else if value.starts_with('/') {
            SocketAddr::from_pathname(value)?
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("unsupported NOTIFY_SOCKET {value:?} (want /path or @name)"),
            ));
        };
        Ok(NotifySocket {
            addr,
            display: value.to_owned(),
        })
    }

    /// Sends one notification (newline-separated `KEY=VALUE` lines) as a
    /// single datagram from a fresh unbound socket, as `sd_notify` does.
    pub fn send(&self, message: &str) -> io::Result<()> {
        let socket = UnixDatagram::unbound()?;
        let sent = socket.send_to_addr(message.as_bytes(), &self.addr)?;
        if sent != message.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!(
                    "short write to {}: {sent} of {}",
                    self.display,
                    message.len()
                ),
            ));
        }
        Ok(())
    }
}

impl std::fmt::Display for NotifySocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.display)
    }
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn abstract_addr(name: &[u8]) -> io::Result<SocketAddr> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name)
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn abstract_addr(_name: &[u8]) -> io::Result<SocketAddr> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "abstract sockets are Linux-only",
    ))
}

/// The keep-alive period from `WATCHDOG_USEC` and `WATCHDOG_PID`: half the
/// watchdog timeout, as `sd_watchdog_enabled(3)` advises. `None` when the
/// watchdog is off, the value is not a positive number, or `WATCHDOG_PID`
/// names another process (the variables leaked from a parent).
pub fn watchdog_period(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        let pid: u32 = pid.trim().parse().ok()?;
        if pid != own_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2).max(Duration::from_millis(1)))
}

/// A daemon's link to systemd: readiness, stopping, status and watchdog.
/// Cheap to clone; every method is a no-op without `NOTIFY_SOCKET`.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<NotifySocket>,
    watchdog: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. A malformed
    /// `NOTIFY_SOCKET` is logged and ignored rather than fatal.
    pub fn from_env() -> Notifier {
        let socket = std::env::var("NOTIFY_SOCKET")
            .ok()
            .filter(|v| !v.is_empty())
            .and_then(|v| match NotifySocket::parse(&v) {
                Ok(s) => Some(s),
                Err(e) => {
                    tracing::warn!("ignoring NOTIFY_SOCKET: {e}");
                    None
                }
            });
        let watchdog = socket.as_ref().and_then(|_| {
            watchdog_period(
                std::env::var("WATCHDOG_USEC").ok().as_deref(),
                std::env::var("WATCHDOG_PID").ok().as_deref(),
                std::process::id(),
            )
        });
        Notifier { socket, watchdog }
    }

    /// A notifier for an explicit socket and watchdog period (tests, or a
    /// caller that read the environment itself).
    pub fn new(socket: Option<NotifySocket>, watchdog: Option<Duration>) -> Notifier {
        Notifier { socket, watchdog }
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// The keep-alive period, when systemd asked for a watchdog.
    pub fn watchdog_period(&self) -> Option<Duration> {
        self.watchdog
    }

    /// Sends a raw message; failures are logged at debug level and
    /// otherwise ignored (systemd may be restarting; the daemon carries on).
    pub fn notify(&self, message: &str) {
        if let Some(socket) = &self.socket
            && let Err(e) = socket.send(message)
        {
            tracing::debug!(socket = %socket, "sd_notify {message:?}: {e}");
        }
    }

    /// `READY=1` with a status line: call once the listener serves.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `STOPPING=1` with a status line: call when shutdown begins.
    pub fn stopping(&self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    /// A free-form `STATUS=` line (`systemctl status` shows it).
    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={}", one_line(status)));
    }

    /// Sends `WATCHDOG=1` every period while `healthy()` resolves to `true`
    /// within one period, until `token` is cancelled. A failed or slow check
    /// skips the ping, so systemd kills and restarts a wedged daemon after
    /// `WatchdogSec=`. Returns at once when there is no watchdog.
    pub async fn run_watchdog<F, Fut>(self, token: CancellationToken, healthy: F)
    where
        F: Fn() -> Fut,
        Fut: Future<Output = bool>,
    {
        let Some(period) = self.watchdog.filter(|_| self.socket.is_some()) else {
            return;
        };
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = token.cancelled() => return,
                _ = tick.tick() => {}
            }
            let ok = tokio::select! {
                () = token.cancelled() => return,
                r = tokio::time::timeout(period, healthy()) => r.unwrap_or(false),
            };
            if ok {
                self.notify("WATCHDOG=1");
            } else {
                tracing::warn!(
                    "health check failed or took over {period:?}; not feeding the watchdog"
                );
            }
        }
    }
}

/// A status value must not break the line-based protocol.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn listener(dir: &tempfile::TempDir) -> (UnixDatagram, String) {
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        (socket, path.to_str().expect("utf-8 path").to_owned())
    }

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn ready_and_stopping_reach_a_path_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, path) = listener(&dir);
        let n = Notifier::new(Some(NotifySocket::parse(&path).expect("parse")), None);
        assert!(n.is_enabled());
        n.ready("serving on 127.0.0.1:7301\nsecond line");
        assert_eq!(
            recv(&socket),
            "READY=1\nSTATUS=serving on 127.0.0.1:7301 second line"
        );
        n.stopping("draining");
        assert_eq!(recv(&socket), "STOPPING=1\nSTATUS=draining");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn abstract_namespace_sockets_are_supported() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("halo-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind abstract");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let target = NotifySocket::parse(&format!("@{name}")).expect("parse");
        target.send("READY=1").expect("send");
        assert_eq!(recv(&socket), "READY=1");
    }

    #[test]
    fn bad_socket_values_are_refused_and_a_missing_socket_is_a_no_op() {
        assert!(NotifySocket::parse("").is_err());
        assert!(NotifySocket::parse("relative/path").is_err());
        assert!(NotifySocket::parse("vsock:2:1234").is_err());
        let off = Notifier::default();
        assert!(!off.is_enabled());
        off.ready("nobody listens"); // must not panic or block
        let dir = tempfile::tempdir().expect("tempdir");
        let gone = dir.path().join("gone.sock");
        let gone = NotifySocket::parse(gone.to_str().expect("utf-8")).expect("parse");
        assert!(gone.send("READY=1").is_err());
        Notifier::new(Some(gone), None).ready("logged, not fatal");
    }

    #[test]
    fn watchdog_period_is_half_the_timeout_for_this_pid_only() {
        let me = 4242;
        assert_eq!(
            watchdog_period(Some("30000000"), Some("4242"), me),
            Some(Duration::from_secs(15))
        );
        assert_eq!(
            watchdog_period(Some("30000000"), None, me),
            Some(Duration::from_secs(15))
        );
        assert_eq!(watchdog_period(Some("30000000"), Some("1"), me), None);
        assert_eq!(watchdog_period(Some("30000000"), Some("x"), me), None);
        assert_eq!(watchdog_period(Some("0"), None, me), None);
        assert_eq!(watchdog_period(Some("-5"), None, me), None);
        assert_eq!(watchdog_period(None, Some("4242"), me), None);
    }

    #[tokio::test]
    async fn watchdog_pings_only_while_healthy_and_stops_on_cancel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, path) = listener(&dir);
        socket.set_nonblocking(true).expect("nonblocking");
        let n = Notifier::new(
            Some(NotifySocket::parse(&path).expect("parse")),
            Some(Duration::from_millis(20)),
        );
        let healthy = Arc::new(AtomicBool::new(true));
        let token = CancellationToken::new();
        let check = healthy.clone();
        let task = tokio::spawn(n.run_watchdog(token.clone(), move || {
            let ok = check.load(Ordering::SeqCst);
            async move { ok }
        }));
        let drain = |socket: &UnixDatagram| {
            let mut pings = 0;
            let mut buf = [0u8; 64];
            while let Ok(len) = socket.recv(&mut buf) {
                assert_eq!(&buf[..len], b"WATCHDOG=1");
                pings += 1;
            }
            pings
        };
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(drain(&socket) >= 3, "pings while healthy");

        healthy.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(40)).await; // a ping may be in flight
        drain(&socket);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(drain(&socket), 0, "no pings while unhealthy");

        healthy.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(drain(&socket) >= 3, "pings again once healthy");

        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the watchdog task ends on cancel")
            .expect("no panic");
        drain(&socket);
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(drain(&socket), 0, "no pings after cancel");
    }

    #[tokio::test]
    async fn a_slow_health_check_counts_as_unhealthy() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (socket, path) = listener(&dir);
        socket.set_nonblocking(true).expect("nonblocking");
        let n = Notifier::new(
            Some(NotifySocket::parse(&path).expect("parse")),
            Some(Duration::from_millis(20)),
        );
        let token = CancellationToken::new();
        let task = tokio::spawn(n.run_watchdog(token.clone(), || async {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            true
        }));
        tokio::time::sleep(Duration::from_millis(120)).await;
        let mut buf = [0u8; 64];
        assert!(socket.recv(&mut buf).is_err(), "no ping from a stuck check");
        token.cancel();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("ends on cancel")
            .expect("no panic");
    }

    #[tokio::test]
    async fn no_watchdog_means_the_task_returns_at_once() {
        let n = Notifier::default();
        tokio::time::timeout(
            Duration::from_secs(1),
            n.run_watchdog(CancellationToken::new(), || async { true }),
        )
        .await
        .expect("returns immediately");
    }
}
