//! The controller's `/metrics` (on `metrics_listen`). Events are counted
//! where they happen, in one process-wide [`Metrics`]: placement decisions
//! by outcome and reason, reconcile pass durations, replicas moved off
//! lost nodes, store operation latency. What is a state rather than an
//! event (placements by state, node liveness, leadership) is read at
//! scrape time from the store and the observed nodes, with the same
//! words `Routes` and `haloctl status` use.

use crate::desired::Desired;
use crate::observe::{Observed, instances_by_request};
use crate::placement::Decision;
use proto::domain::{NodeStatus, Placement};
use proto::metrics::{Histogram, Kind, LATENCY_BUCKETS, Text};
use std::collections::{BTreeMap, HashSet};
use std::sync::{LazyLock, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// What the controller counts as it runs.
#[derive(Debug, Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    decisions: BTreeMap<(&'static str, &'static str), u64>,
    reconcile: Option<Histogram>,
    replacements: u64,
    store: BTreeMap<&'static str, Histogram>,
    store_errors: BTreeMap<&'static str, u64>,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::default);

/// The process's metrics.
pub fn global() -> &'static Metrics {
    &METRICS
}

/// Why a decision came out as it did, in a few fixed words (a label, so
/// bounded): accepted `fits`, `split` or `evicted`; refused `no_memory`
/// (candidates, none with room), `no_candidate` (no node may take it:
/// role, pin, files, flags, liveness) or `invalid` (refused before any
/// node was weighed: unknown model, context bounds…).
pub fn decision_reason(d: &Decision) -> (&'static str, &'static str) {
    if d.accepted {
        let reason = if !d.evicted.is_empty() {
            "evicted"
        } else if d.placement.as_ref().is_some_and(|p| p.split.is_some()) {
            "split"
        } else {
            "fits"
        };
        return ("accepted", reason);
    }
    let reason = if d.fits.is_empty() {
        "invalid"
    } else if d.fits.iter().any(|f| f.candidate) {
        "no_memory"
    } else {
        "no_candidate"
    };
    ("refused", reason)
}

impl Metrics {
    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Counts one placement decision (not dry runs).
    pub fn decision(&self, d: &Decision) {
        let key = decision_reason(d);
        self.with(|m| *m.decisions.entry(key).or_default() += 1);
    }

    /// One reconcile pass took `d`.
    pub fn reconcile_pass(&self, d: Duration) {
        self.with(|m| {
            m.reconcile
                .get_or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
                .observe(d.as_secs_f64());
        });
    }

    /// `n` replicas were moved off lost nodes.
    pub fn replaced(&self, n: usize) {
        self.with(|m| m.replacements += n as u64);
    }

    /// One store operation (`get`, `list`, `txn`, `watch`, `compact`)
    /// took `d`; `ok` false when it failed.
    pub fn store_op(&self, op: &'static str, d: Duration, ok: bool) {
        self.with(|m| {
            m.store
                .entry(op)
                .or_insert_with(|| Histogram::new(LATENCY_BUCKETS))
                .observe(d.as_secs_f64());
            if !ok {
                *m.store_errors.entry(op).or_default() += 1;
            }
        });
    }

    fn write_counted(&self, t: &mut Text) {
        self.with(|m| {
            let n = "halo_placement_decisions_total";
            t.family(
                n,
                Kind::Counter,
                "Placement decisions by outcome (accepted, refused) and reason (fits, split, evicted; no_memory, no_candidate, invalid); dry runs not counted.",
            );
            for ((outcome, reason), v) in &m.decisions {
                t.int(n, &[("outcome", outcome), ("reason", reason)], *v);
            }
            let n = "halo_reconcile_pass_duration_seconds";
            t.family(n, Kind::Histogram, "Time one reconcile pass took (leader only).");
            let empty = Histogram::new(LATENCY_BUCKETS);
            t.histogram(n, &[], m.reconcile.as_ref().unwrap_or(&empty));
            let n = "halo_replacements_total";
            t.family(n, Kind::Counter, "Replicas moved to another node after their node was lost.")
                .int(n, &[], m.replacements);
            let n = "halo_store_operation_duration_seconds";
            t.family(n, Kind::Histogram, "Latency of store operations (etcd or the embedded file), by operation.");
            for (op, h) in &m.store {
                t.histogram(n, &[("op", op)], h);
            }
            let n = "halo_store_operation_errors_total";
            t.family(n, Kind::Counter, "Store operations that failed, by operation.");
            for (op, v) in &m.store_errors {
                t.int(n, &[("op", op)], *v);
            }
        });
    }
}

/// The whole `/metrics` answer: counted events, then the state read now.
pub async fn render(desired: &Desired, observed: &Observed) -> String {
    let mut t = Text::new();
    let leadership = desired.leadership();
    let term = leadership.term();
    let n = "halo_controller_leader";
    t.family(
        n,
        Kind::Gauge,
        "1 while this controller leads (reconciles and writes), else 0.",
    )
    .int(n, &[("id", leadership.id())], u64::from(term.is_some()));
    let n = "halo_controller_term";
    t.family(
        n,
        Kind::Gauge,
        "The leader term (store revision of the leader key) this controller holds.",
    );
    if let Some(term) = term {
        t.int(n, &[("id", leadership.id())], term);
    }
    write_nodes(&mut t, observed);
    write_placements(&mut t, desired, observed).await;
    global().write_counted(&mut t);
    t.finish()
}

fn write_nodes(t: &mut Text, observed: &Observed) {
    let now = Instant::now();
    let timing = observed.timing();
    let nodes = observed.read().clone();
    let n = "halo_node_status";
    t.family(
        n,
        Kind::Gauge,
        "1 for the liveness each node is in (ready, unreachable, lost, unknown), as this controller hears its agent.",
    );
    for (name, o) in &nodes {
        let status = NodeStatus::from(o.liveness(now, &timing));
        t.int(n, &[("node", name), ("status", status.as_str())], 1);
    }
    let n = "halo_node_up";
    t.family(
        n,
        Kind::Gauge,
        "1 when the node's agent stream is live (ready), else 0.",
    );
    for (name, o) in &nodes {
        let up = NodeStatus::from(o.liveness(now, &timing)) == NodeStatus::Ready;
        t.int(n, &[("node", name)], u64::from(up));
    }
    let n = "halo_node_silent_seconds";
    t.family(
        n,
        Kind::Gauge,
        "Time since the node's agent was last heard from.",
    );
    for (name, o) in &nodes {
        t.sample(n, &[("node", name)], o.silent_for(now).as_secs_f64());
    }
}

async fn write_placements(t: &mut Text, desired: &Desired, observed: &Observed) {
    let n = "halo_placement_state";
    t.family(
        n,
        Kind::Gauge,
        "1 for the state each placement is in (its most advanced replica's: ready, loading, starting, moving, pending, unreachable, failed, paused, …).",
    );
    let (placements, catalog) = match tokio::try_join!(desired.placements(), desired.catalog()) {
        Ok(((p, _), c)) => (
            p.into_iter().map(|v| v.value).collect::<Vec<Placement>>(),
            c,
        ),
        Err(e) => {
            tracing::debug!("metrics: store not read: {e}");
            return;
        }
    };
    let by_request = instances_by_request(observed);
    let refused: HashSet<String> = placements
        .iter()
        .flat_map(|p| p.replicas.iter().map(|r| p.key(r).request_id()))
        .filter(|rid| observed.start_refused(rid).is_some())
        .collect();
    let nodes = observed.read().clone();
    let routes = crate::routes::build(&crate::routes::Snapshot {
        placements: &placements,
        catalog: &catalog,
        nodes: &nodes,
        by_request: &by_request,
        refused: &refused,
        keys: &[],
        timing: observed.timing(),
        now: Instant::now(),
        now_unix_ms: proto::units::now_unix_ms(),
    });
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for r in routes.routes.iter().filter(|r| !r.placement.is_empty()) {
        t.int(
            n,
            &[
                ("placement", &r.placement),
                ("model", &r.model),
                ("state", &r.state),
            ],
            1,
        );
        *by_state.entry(r.state.clone()).or_default() += 1;
    }
    let n = "halo_placements";
    t.family(n, Kind::Gauge, "Placements by state.");
    for (state, v) in &by_state {
        t.int(n, &[("state", state)], *v);
    }
    let n = "halo_placement_replicas";
    t.family(n, Kind::Gauge, "Replicas each placement asks for, by node.");
    for p in &placements {
        let mut per_node: BTreeMap<&str, u64> = BTreeMap::new();
        for r in &p.replicas {
            *per_node.entry(r.node.as_str()).or_default() += 1;
        }
        for (node, v) in per_node {
            t.int(
                n,
                &[("placement", &p.name), ("model", &p.model), ("node", node)],
                v,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_events_are_written_with_bounded_labels() {
        let m = Metrics::default();
        let refused = Decision {
            accepted: false,
            placement: None,
            fits: Vec::new(),
            evicted: Vec::new(),
            explanation: Vec::new(),
            estimate: None,
        };
        m.decision(&refused);
        m.reconcile_pass(Duration::from_millis(3));
        m.replaced(2);
        m.store_op("get", Duration::from_millis(1), true);
        m.store_op("txn", Duration::from_millis(1), false);
        let mut t = Text::new();
        m.write_counted(&mut t);
        let s = t.finish();
        for line in [
            "halo_placement_decisions_total{outcome=\"refused\",reason=\"invalid\"} 1",
            "halo_reconcile_pass_duration_seconds_count 1",
            "halo_replacements_total 2",
            "halo_store_operation_duration_seconds_count{op=\"get\"} 1",
            "halo_store_operation_errors_total{op=\"txn\"} 1",
        ] {
            assert!(s.lines().any(|l| l == line), "{line} not in\n{s}");
        }
    }
}
