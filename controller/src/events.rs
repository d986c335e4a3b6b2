//! Cluster events (node status changes, placements, moves, starts and
//! stops) broadcast to `WatchEvents` streams and logged.

use tokio::sync::broadcast;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEvent {
    /// Unix ms.
    pub at_unix_ms: u64,
    /// `node_unreachable`, `moved`, `started`…
    pub kind: String,
    /// The node or placement concerned.
    pub subject: String,
    /// In words.
    pub message: String,
}

/// The broadcaster.
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<ClusterEvent>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(1024).0,
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Events {
    /// Logs and broadcasts.
    pub fn emit(&self, kind: &str, subject: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(kind, subject, "{message}");
        let _ = self.tx.send(ClusterEvent {
            at_unix_ms: now_unix_ms(),
            kind: kind.to_owned(),
            subject: subject.to_owned(),
            message,
        });
    }

    /// A receiver of events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.tx.subscribe()
    }
}
