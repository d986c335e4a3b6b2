//! What the controller counts as it runs, in one process-wide
//! [`Metrics`] ([`global`]): placement decisions by outcome and reason,
//! reconcile pass durations, replicas moved off lost nodes, store operation
//! latency. Counted where they happen; written into `/metrics` by
//! [`crate::metrics`]. It depends on nothing of the controller's state, so
//! the store can time itself here.

use crate::placement::Decision;
use proto::metrics::{Histogram, Kind, LATENCY_BUCKETS, Text};
use std::collections::BTreeMap;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

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

    pub(crate) fn write_counted(&self, t: &mut Text) {
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
