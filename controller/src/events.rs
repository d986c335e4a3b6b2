//! Cluster events (node status changes, placements, moves, starts and
//! stops): logged, kept in a bounded history, and broadcast to
//! `WatchEvents` streams.

use proto::units::now_unix_ms;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use tokio::sync::broadcast;

/// Events kept for readers that ask what happened recently.
pub const HISTORY: usize = 256;

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

/// The broadcaster and its history.
#[derive(Debug, Clone)]
pub struct Events {
    tx: broadcast::Sender<ClusterEvent>,
    recent: Arc<Mutex<VecDeque<ClusterEvent>>>,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(1024).0,
            recent: Arc::new(Mutex::new(VecDeque::with_capacity(HISTORY))),
        }
    }
}

impl Events {
    /// Logs and broadcasts.
    pub fn emit(&self, kind: &str, subject: &str, message: impl Into<String>) {
        let message = message.into();
        tracing::info!(kind, subject, "{message}");
        let e = ClusterEvent {
            at_unix_ms: now_unix_ms(),
            kind: kind.to_owned(),
            subject: subject.to_owned(),
            message,
        };
        // Recorded and sent under one lock, so a reader that takes the
        // history and subscribes (also under it) misses and repeats nothing.
        let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        if recent.len() == HISTORY {
            recent.pop_front();
        }
        recent.push_back(e.clone());
        let _ = self.tx.send(e);
    }

    /// A receiver of events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ClusterEvent> {
        self.tx.subscribe()
    }

    /// The last `n` events (all kept when `None`), oldest first, and a
    /// receiver of every event after them.
    pub fn recent_and_subscribe(
        &self,
        n: Option<usize>,
    ) -> (Vec<ClusterEvent>, broadcast::Receiver<ClusterEvent>) {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let skip = n.map_or(0, |n| recent.len().saturating_sub(n));
        (
            recent.iter().skip(skip).cloned().collect(),
            self.tx.subscribe(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_last_events_and_a_subscriber_sees_only_later_ones() {
        let ev = Events::default();
        for i in 0..HISTORY + 10 {
            ev.emit("placed", &format!("p{i}"), "placed");
        }
        let (all, mut rx) = ev.recent_and_subscribe(None);
        assert_eq!(all.len(), HISTORY);
        assert_eq!(all[0].subject, "p10");
        let (last, _) = ev.recent_and_subscribe(Some(3));
        let subjects: Vec<_> = last.iter().map(|e| e.subject.as_str()).collect();
        assert_eq!(
            subjects,
            [
                format!("p{}", HISTORY + 7),
                format!("p{}", HISTORY + 8),
                format!("p{}", HISTORY + 9)
            ]
        );
        assert!(rx.try_recv().is_err(), "nothing after the snapshot yet");
        assert!(ev.recent_and_subscribe(Some(0)).0.is_empty());
        ev.emit("moved", "x", "moved");
        assert_eq!(rx.try_recv().map(|e| e.subject).ok().as_deref(), Some("x"));
    }
}
