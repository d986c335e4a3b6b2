//! Model copies the controller drives, for `haloctl models copy`
//! (`CopyModel`) and for reconcile (a replica placed on a node that lacks
//! its file): the one place that picks the sending node, asks the
//! receiving agent to pull (`PullModel`), follows its progress to the end,
//! emits the `copy` events, and keeps what the rest of the controller
//! reads: the copies in flight, the last measured rate between two nodes
//! (placement's "about 2 min at the measured …") and the last failure per
//! model and node with its back-off.
//!
//! One copy per model file and receiving node at a time: a second request
//! for the same follows the running one. When the receiving agent's stream
//! breaks (the agent stopped or its link did) the copy is not given up:
//! once the agent is connected again, the pull is asked for again and the
//! agent resumes from its partial file.

use crate::error::Error;
use crate::events::Events;
use crate::leader::Leadership;
use crate::observe::{NodeObs, Observed, agent_client};
use crate::placement::CopyRates;
use proto::domain::{CopyProgress, CopyState};
use proto::v1;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// First wait before a failed copy to a node is tried again.
const RETRY_MIN: Duration = Duration::from_secs(5);
/// Longest wait between tries.
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How long a broken copy waits for its receiving agent to come back
/// before it counts as failed.
const RESUME_WAIT: Duration = Duration::from_secs(120);

/// Where a copy goes: the catalog model, its file, and both ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Catalog name (the events' subject is `MODEL:TO`).
    pub model: String,
    /// File id on both nodes.
    pub model_id: String,
    /// Sending node.
    pub from: String,
    /// Its agent's address.
    pub from_address: String,
    /// Receiving node.
    pub to: String,
}

/// A copy's reports as they come: `None` before the first.
pub type Progress = watch::Receiver<Option<Result<CopyProgress, tonic::Status>>>;

/// The last failed copy of a file to a node.
#[derive(Debug, Clone)]
pub struct Failed {
    /// Why, in words.
    pub why: String,
    /// Failures in a row.
    pub count: u32,
    /// Not tried again (by reconcile) before this.
    pub retry_at: Instant,
}

#[derive(Debug, Default)]
struct State {
    /// Copies in flight by (model id, receiving node).
    running: BTreeMap<(String, String), Progress>,
    /// Bytes per second of the last finished copy between two nodes.
    rates: CopyRates,
    /// The last failure by (model id, receiving node), until one succeeds.
    failed: BTreeMap<(String, String), Failed>,
}

/// The copies: cheap to clone, shared by the API and reconcile.
#[derive(Debug, Clone)]
pub struct Copies {
    state: Arc<Mutex<State>>,
    observed: Observed,
    events: Events,
    leadership: Leadership,
    shutdown: CancellationToken,
}

impl Copies {
    /// No copies yet; a broken copy is resumed only while `leadership`
    /// holds the term it began under; relays end on `shutdown`.
    pub fn new(
        observed: Observed,
        events: Events,
        leadership: Leadership,
        shutdown: CancellationToken,
    ) -> Self {
        Copies {
            state: Arc::default(),
            observed,
            events,
            leadership,
            shutdown,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The route of a copy of `model_id` (catalog name `model`) to `to`:
    /// from `from` when named (it must hold the file), else from the
    /// connected node holding it with the fastest measured copy to `to`
    /// (the first in name order when none was measured).
    pub fn route(
        &self,
        model: &str,
        model_id: &str,
        to: &str,
        from: Option<&str>,
    ) -> Result<Route, Error> {
        let obs = self.observed.read();
        let target = obs
            .get(to)
            .ok_or_else(|| Error::NotFound(format!("node `{to}` is not configured")))?;
        if !target.connected {
            return Err(Error::FailedPrecondition(format!(
                "node `{to}` is not connected"
            )));
        }
        let holds = |n: &NodeObs| n.models.iter().any(|m| m.id == model_id);
        let source = match from {
            Some(f) => {
                let n = obs
                    .get(f)
                    .ok_or_else(|| Error::NotFound(format!("node `{f}` is not configured")))?;
                if !holds(n) {
                    return Err(Error::FailedPrecondition(format!(
                        "node `{f}` does not hold `{model_id}`"
                    )));
                }
                if f == to {
                    return Err(Error::InvalidArgument(
                        "--from and --to name the same node".into(),
                    ));
                }
                n
            }
            None => {
                let rates = self.rates();
                let rate = |n: &NodeObs| {
                    rates
                        .get(&(n.config.name.clone(), to.to_owned()))
                        .copied()
                        .unwrap_or(0.0)
                };
                obs.values()
                    .filter(|n| n.config.name != to && n.connected && holds(n))
                    .fold(None::<&NodeObs>, |best, n| match best {
                        Some(b) if rate(b) >= rate(n) => Some(b),
                        _ => Some(n),
                    })
                    .ok_or_else(|| {
                        Error::FailedPrecondition(format!(
                            "no connected node other than `{to}` holds `{model_id}`"
                        ))
                    })?
            }
        };
        Ok(Route {
            model: model.to_owned(),
            model_id: model_id.to_owned(),
            from: source.config.name.clone(),
            from_address: source.config.address.clone(),
            to: to.to_owned(),
        })
    }

    /// Starts the copy `route` under leader term `term`, or follows the
    /// one of the same file to the same node already running. The copy
    /// runs to its end whoever follows it. `Err` when the receiving agent
    /// cannot be asked (recorded as a failure too).
    pub async fn start(&self, route: Route, term: u64) -> Result<Progress, Error> {
        let key = (route.model_id.clone(), route.to.clone());
        let (tx, rx) = {
            let mut s = self.lock();
            if let Some(rx) = s.running.get(&key) {
                return Ok(rx.clone());
            }
            let (tx, rx) = watch::channel(None);
            s.running.insert(key.clone(), rx.clone());
            (tx, rx)
        };
        let subject = format!("{}:{}", route.model, route.to);
        let upstream = match self.pull(&route, term).await {
            Ok(u) => u,
            Err(s) => {
                let why = s.message().to_owned();
                self.lock().running.remove(&key);
                self.events.emit(
                    "copy",
                    &subject,
                    format!(
                        "{} from {} to {}: failed: {why}",
                        route.model_id, route.from, route.to
                    ),
                );
                self.record_failure(&key, &why);
                return Err(Error::FailedPrecondition(format!(
                    "node `{}`: {why}",
                    route.to
                )));
            }
        };
        self.events.emit(
            "copy",
            &subject,
            format!(
                "{} from {} to {}: started",
                route.model_id, route.from, route.to
            ),
        );
        let this = self.clone();
        tokio::spawn(async move {
            let end = this.relay(&route, term, upstream, &tx).await;
            let mut s = this.lock();
            s.running.remove(&key);
            match end {
                Some(End::Done(p)) => {
                    s.failed.remove(&key);
                    if p.state == CopyState::Done
                        && let Some(r) = p.rate_bytes_per_sec().filter(|r| *r > 0.0)
                    {
                        s.rates.insert((route.from.clone(), route.to.clone()), r);
                    }
                }
                Some(End::Failed(why)) => {
                    drop(s);
                    this.record_failure(&key, &why);
                }
                None => {}
            }
        });
        Ok(rx)
    }

    /// Asks the receiving agent to pull `route`; its progress stream.
    async fn pull(
        &self,
        route: &Route,
        term: u64,
    ) -> Result<tonic::Streaming<v1::CopyProgress>, tonic::Status> {
        let address = self
            .observed
            .read()
            .get(&route.to)
            .map(|n| n.config.address.clone())
            .ok_or_else(|| {
                tonic::Status::not_found(format!("node `{}` is not configured", route.to))
            })?;
        let mut agent = agent_client(&address)
            .map_err(|e| tonic::Status::unavailable(format!("at {address}: {e}")))?;
        agent
            .pull_model(v1::PullModelRequest {
                model_id: route.model_id.clone(),
                source_address: route.from_address.clone(),
                source_node: route.from.clone(),
                leader_revision: term,
            })
            .await
            .map(tonic::Response::into_inner)
    }

    /// Follows `upstream` to the copy's end, publishing each report on
    /// `tx` and emitting the end as a `copy` event; a broken stream is
    /// asked for again once the receiving agent is back (it resumes from
    /// its partial file). `None` when the controller shut down.
    async fn relay(
        &self,
        route: &Route,
        term: u64,
        mut upstream: tonic::Streaming<v1::CopyProgress>,
        tx: &watch::Sender<Option<Result<CopyProgress, tonic::Status>>>,
    ) -> Option<End> {
        let subject = format!("{}:{}", route.model, route.to);
        loop {
            let next = tokio::select! {
                () = self.shutdown.cancelled() => return None,
                m = upstream.message() => m,
            };
            let broke = match next {
                Err(s) if !transient(&s) => {
                    let why = s.message().to_owned();
                    self.events.emit("copy", &subject, format!("failed: {why}"));
                    tx.send_replace(Some(Err(s)));
                    return Some(End::Failed(why));
                }
                Ok(Some(p)) => {
                    let p = match CopyProgress::try_from(p) {
                        Ok(p) => p,
                        Err(e) => {
                            let why = format!("a bad progress report: {e}");
                            self.events.emit("copy", &subject, format!("failed: {why}"));
                            tx.send_replace(Some(Err(tonic::Status::internal(why.clone()))));
                            return Some(End::Failed(why));
                        }
                    };
                    let end = match p.state {
                        CopyState::Done => Some(format!(
                            "done: {} in {} ms",
                            proto::units::bytes(p.bytes_total),
                            p.elapsed_ms
                        )),
                        CopyState::AlreadyPresent => {
                            Some("an identical file is already there".to_owned())
                        }
                        CopyState::Failed => Some(format!("failed: {}", p.message)),
                        CopyState::Copying => None,
                    };
                    let failed = (p.state == CopyState::Failed).then(|| p.message.clone());
                    tx.send_replace(Some(Ok(p.clone())));
                    let Some(msg) = end else { continue };
                    self.events.emit("copy", &subject, msg);
                    return Some(match failed {
                        Some(why) => End::Failed(why),
                        None => End::Done(p),
                    });
                }
                Ok(None) => "the receiving agent's stream ended".to_owned(),
                Err(s) => s.message().to_owned(),
            };
            match self.resume(route, term, &broke).await {
                Some(u) => upstream = u,
                None => {
                    self.events
                        .emit("copy", &subject, format!("failed: {broke}"));
                    tx.send_replace(Some(Err(tonic::Status::unavailable(broke.clone()))));
                    return Some(End::Failed(broke));
                }
            }
        }
    }

    /// After the receiving agent's stream broke (`why`): until
    /// [`RESUME_WAIT`] passes, asks the agent to pull again each second it
    /// is connected (it resumes from its partial file, or the running copy
    /// is followed). `None` when it does not come back, the term ended, or
    /// it refuses.
    async fn resume(
        &self,
        route: &Route,
        term: u64,
        why: &str,
    ) -> Option<tonic::Streaming<v1::CopyProgress>> {
        let subject = format!("{}:{}", route.model, route.to);
        self.events.emit(
            "copy",
            &subject,
            format!("interrupted ({why}); resumed when {} is back", route.to),
        );
        let deadline = Instant::now() + RESUME_WAIT;
        while Instant::now() < deadline {
            tokio::select! {
                () = self.shutdown.cancelled() => return None,
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            if self.leadership.term() != Some(term) {
                return None;
            }
            let connected = self
                .observed
                .read()
                .get(&route.to)
                .is_some_and(|n| n.connected);
            if !connected {
                continue;
            }
            match self.pull(route, term).await {
                Ok(up) => {
                    self.events.emit(
                        "copy",
                        &subject,
                        format!(
                            "{} from {} to {}: resumed",
                            route.model_id, route.from, route.to
                        ),
                    );
                    return Some(up);
                }
                Err(s) if transient(&s) => {}
                Err(_) => return None,
            }
        }
        None
    }

    fn record_failure(&self, key: &(String, String), why: &str) {
        let mut s = self.lock();
        let count = s.failed.get(key).map_or(0, |f| f.count).saturating_add(1);
        let delay = proto::backoff::Backoff::new(RETRY_MIN, RETRY_MAX).delay(count);
        s.failed.insert(
            key.clone(),
            Failed {
                why: why.to_owned(),
                count,
                retry_at: Instant::now() + delay,
            },
        );
    }

    /// The copies in flight, their latest reports.
    pub fn in_flight(&self) -> Vec<CopyProgress> {
        self.lock()
            .running
            .values()
            .filter_map(|rx| rx.borrow().as_ref().and_then(|r| r.as_ref().ok()).cloned())
            .filter(|p| p.state == CopyState::Copying)
            .collect()
    }

    /// The copy of `model_id` to `to` in flight: its latest report, or a
    /// report with nothing done yet when none came.
    pub fn progress(&self, model_id: &str, to: &str) -> Option<CopyProgress> {
        let s = self.lock();
        let rx = s.running.get(&(model_id.to_owned(), to.to_owned()))?;
        let latest = rx.borrow().as_ref().and_then(|r| r.as_ref().ok()).cloned();
        Some(latest.unwrap_or_else(|| CopyProgress {
            model_id: model_id.to_owned(),
            from_node: String::new(),
            to_node: to.to_owned(),
            bytes_total: 0,
            bytes_done: 0,
            resumed_from_bytes: 0,
            elapsed_ms: 0,
            state: CopyState::Copying,
            sha256: Vec::new(),
            message: String::new(),
        }))
    }

    /// Whether a copy of `model_id` to `to` is in flight.
    pub fn running(&self, model_id: &str, to: &str) -> bool {
        self.lock()
            .running
            .contains_key(&(model_id.to_owned(), to.to_owned()))
    }

    /// The last failed copy of `model_id` to `to`, until one succeeds.
    pub fn failure(&self, model_id: &str, to: &str) -> Option<Failed> {
        self.lock()
            .failed
            .get(&(model_id.to_owned(), to.to_owned()))
            .cloned()
    }

    /// The last measured rate of each pair of nodes a copy went between.
    pub fn rates(&self) -> CopyRates {
        self.lock().rates.clone()
    }
}

/// Whether a failed call to an agent may succeed when tried again (the
/// agent was away), unlike a refusal.
fn transient(s: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

/// How a relayed copy ended.
enum End {
    /// Done or already present: the last report.
    Done(CopyProgress),
    /// Failed: why.
    Failed(String),
}
