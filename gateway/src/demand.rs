//! The gateway's side of models on demand: a request for an on-demand
//! catalog model with no placement asks the controller to load it
//! ([`OnDemand::ask`]: one call at a time per model, however many requests
//! wait; a refusal reaches every waiting request), and what requests use
//! is reported every [`REPORT_EVERY`], and at once when a model's first
//! request starts or its last one ends (`report_loop`), so the controller
//! unloads idle models and never evicts a busy one.

use crate::control::ControllerLink;
use proto::v1;
use proto::v1::demand_response::Outcome;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

/// How often use is reported.
pub const REPORT_EVERY: Duration = Duration::from_secs(5);
/// Shortest time between two reports made at once.
const REPORT_AT_MOST: Duration = Duration::from_millis(100);
/// Shortest time between two demands for one model.
const DEMAND_EVERY: Duration = Duration::from_millis(1000);
/// How long a refusal answers requests without asking again.
const REFUSAL_KEPT: Duration = Duration::from_millis(500);

/// One model's demand state.
#[derive(Debug, Default)]
struct DemandState {
    /// No new call before this (`None`: one may be made now).
    next_at: Option<Instant>,
    /// The controller's refusal, and when it came.
    refused: Option<(Instant, String)>,
}

/// Demands and use reports.
#[derive(Debug, Default)]
pub struct OnDemand {
    link: OnceLock<Arc<dyn ControllerLink>>,
    /// Catalog model → (requests since the last report, in flight now).
    usage: Mutex<HashMap<String, (u64, u32)>>,
    demands: Mutex<HashMap<String, DemandState>>,
    /// A model's first request in flight, or its last one ended: report
    /// now, not in 5 s (an eviction decided meanwhile would not know it
    /// is busy; one waiting for it would wait longer than needed).
    report_now: Arc<tokio::sync::Notify>,
}

/// A request counted as using its model until dropped.
#[derive(Debug)]
pub struct UseSlot {
    owner: Arc<OnDemand>,
    model: String,
}

impl Drop for UseSlot {
    fn drop(&mut self) {
        let mut m = self.owner.usage();
        if let Some((_, n)) = m.get_mut(&self.model) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                // Idle now: a model waiting for its room need not wait
                // for the next report.
                self.owner.report_now.notify_one();
            }
        }
    }
}

impl OnDemand {
    fn usage(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, u32)>> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Links the controllers (once) and starts reporting use to them until
    /// `owner` is dropped.
    pub fn set_link(self: &Arc<Self>, link: Arc<dyn ControllerLink>) {
        if self.link.set(link).is_ok() {
            tokio::spawn(report_loop(Arc::downgrade(self)));
        }
    }

    /// Counts a request for `model` (a catalog name) until the guard drops.
    pub fn use_slot(self: &Arc<Self>, model: &str) -> UseSlot {
        let mut m = self.usage();
        let e = m.entry(model.to_owned()).or_default();
        e.0 += 1;
        e.1 += 1;
        if e.1 == 1 {
            self.report_now.notify_one();
        }
        UseSlot {
            owner: self.clone(),
            model: model.to_owned(),
        }
    }

    /// Asks the controller for `model` unless a call for it is under way
    /// or was just made; `Some(why)` when the controller refused it (now,
    /// or within [`REFUSAL_KEPT`]). Without a link, nothing is asked.
    pub async fn ask(&self, model: &str, key_name: &str) -> Option<String> {
        let link = self.link.get()?.clone();
        let now = Instant::now();
        {
            let mut d = self.demands.lock().unwrap_or_else(|p| p.into_inner());
            let s = d.entry(model.to_owned()).or_default();
            if let Some((at, why)) = &s.refused
                && now.duration_since(*at) < REFUSAL_KEPT
            {
                return Some(why.clone());
            }
            if s.next_at.is_some_and(|t| now < t) {
                return None;
            }
            // Nobody else asks while this call is out.
            s.next_at = Some(now + Duration::from_secs(30));
        }
        let answer = link.demand(model, key_name).await;
        let mut d = self.demands.lock().unwrap_or_else(|p| p.into_inner());
        let s = d.entry(model.to_owned()).or_default();
        let now = Instant::now();
        s.next_at = Some(now + DEMAND_EVERY);
        match answer {
            Ok(r) => match Outcome::try_from(r.outcome) {
                Ok(Outcome::Placed) => {
                    tracing::info!(model, placement = %r.placement, "on-demand model placed; waiting for it");
                    s.refused = None;
                    link.hurry();
                    None
                }
                Ok(Outcome::Wait) => {
                    tracing::info!(
                        model,
                        "on-demand model must wait: {}",
                        r.explanation.join("; ")
                    );
                    s.next_at =
                        Some(now + Duration::from_millis(r.retry_after_ms.clamp(100, 10_000)));
                    None
                }
                _ => {
                    let why = r.explanation.join("; ");
                    s.next_at = Some(now + REFUSAL_KEPT);
                    s.refused = Some((now, why.clone()));
                    Some(why)
                }
            },
            Err(e) => {
                tracing::warn!(
                    model,
                    "asking the controller for an on-demand model failed: {e}"
                );
                None
            }
        }
    }

    /// Asks the feed to read the routes soon.
    pub fn hurry(&self) {
        if let Some(l) = self.link.get() {
            l.hurry();
        }
    }

    /// What to report now: every model with use, its counter reset; models
    /// idle since the last report are reported once more (in flight 0),
    /// then forgotten.
    fn take_report(&self) -> Vec<v1::ModelUse> {
        let mut m = self.usage();
        let out = m
            .iter()
            .map(|(model, (requests, in_flight))| v1::ModelUse {
                model: model.clone(),
                requests: *requests,
                in_flight: *in_flight,
            })
            .collect();
        m.retain(|_, (requests, in_flight)| *requests > 0 || *in_flight > 0);
        for (requests, _) in m.values_mut() {
            *requests = 0;
        }
        out
    }
}

/// Reports use every [`REPORT_EVERY`], and at once (at most every
/// [`REPORT_AT_MOST`]) when a model gets its first request in flight or
/// its last one ends, while the gateway lives.
async fn report_loop(owner: Weak<OnDemand>) {
    loop {
        let Some(now) = owner.upgrade().map(|o| o.report_now.clone()) else {
            return;
        };
        tokio::select! {
            () = tokio::time::sleep(REPORT_EVERY) => {}
            () = now.notified() => {
                tokio::time::sleep(REPORT_AT_MOST).await;
            }
        }
        let Some(o) = owner.upgrade() else { return };
        let uses = o.take_report();
        let Some(link) = o.link.get().cloned() else {
            continue;
        };
        drop(o);
        if !uses.is_empty() {
            link.report_use(uses).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn use_is_counted_until_the_slot_drops_and_reported_once_idle() {
        let od = Arc::new(OnDemand::default());
        let a = od.use_slot("tiny");
        let b = od.use_slot("tiny");
        drop(a);
        let r = od.take_report();
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].requests, r[0].in_flight), (2, 1));
        drop(b);
        // Idle now: reported once with 0 in flight, then forgotten.
        let r = od.take_report();
        assert_eq!((r[0].requests, r[0].in_flight), (0, 0));
        assert!(od.take_report().is_empty());
    }
}
