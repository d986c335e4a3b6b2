//! Models on demand: a gateway asks for an on-demand catalog model a
//! request names ([`decide`] → placed, wait, or refused with the
//! arithmetic), every gateway reports what its requests use
//! ([`Usage::report`]), and idle on-demand placements are unplaced
//! ([`idle_for`], by reconcile).
//!
//! Rules:
//! * only placements a request made (`on_demand`) are ever unloaded or
//!   evicted; hand-placed ones never are;
//! * to make room, [`decide`] evicts on-demand placements of lower or equal
//!   priority, least recently used first, never one with a request in
//!   flight at any gateway, and never one placed less than its
//!   `min_resident_secs` ago unless the one asked for has a higher
//!   priority; the fewest that make it fit;
//! * when only such a rule stands in the way, the answer is to wait and
//!   ask again (the request waits in the gateway's queue); when even
//!   unloading every evictable model would not make it fit, it is refused
//!   at once with the arithmetic;
//! * last use is the latest report from any gateway, kept by the leader in
//!   memory: after a controller restart a placement's idle time counts
//!   from the restart, never from before (late, not early, unloads).

use crate::nodes::NodeState;
use crate::placement::{self, Decision, PlaceRequest};
use proto::domain::{CatalogEntry, Placement};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// A gateway's in-flight count older than this is not believed (the
/// gateway may be gone).
pub const IN_FLIGHT_FRESH_MS: u64 = 15_000;

/// What the gateways report, shared by the API and reconcile.
#[derive(Debug, Clone)]
pub struct Usage {
    inner: Arc<Mutex<UsageMap>>,
    started_unix_ms: u64,
}

#[derive(Debug, Default)]
struct UsageMap {
    /// Catalog model → last request seen (Unix ms).
    last_used: HashMap<String, u64>,
    /// (catalog model, gateway) → (in flight, reported at Unix ms).
    in_flight: HashMap<(String, String), (u32, u64)>,
}

impl Usage {
    /// No use known; idle times count from `now_unix_ms` at the earliest.
    pub fn new(now_unix_ms: u64) -> Usage {
        Usage {
            inner: Arc::default(),
            started_unix_ms: now_unix_ms,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, UsageMap> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A request for `model` now.
    pub fn touch(&self, model: &str, now_unix_ms: u64) {
        let mut m = self.map();
        let t = m.last_used.entry(model.to_owned()).or_default();
        *t = (*t).max(now_unix_ms);
    }

    /// A gateway's report: `(model, requests since its last report, in
    /// flight now)`.
    pub fn report(&self, gateway: &str, uses: &[(String, u64, u32)], now_unix_ms: u64) {
        let mut m = self.map();
        for (model, requests, in_flight) in uses {
            if *requests > 0 || *in_flight > 0 {
                let t = m.last_used.entry(model.clone()).or_default();
                *t = (*t).max(now_unix_ms);
            }
            m.in_flight.insert(
                (model.clone(), gateway.to_owned()),
                (*in_flight, now_unix_ms),
            );
        }
    }

    /// When a request for `model` was last seen, if ever.
    pub fn last_used(&self, model: &str) -> Option<u64> {
        self.map().last_used.get(model).copied()
    }

    /// Requests for `model` in flight at every gateway with a fresh report.
    pub fn in_flight(&self, model: &str, now_unix_ms: u64) -> u32 {
        self.map()
            .in_flight
            .iter()
            .filter(|((m, _), (_, at))| {
                m == model && now_unix_ms.saturating_sub(*at) < IN_FLIGHT_FRESH_MS
            })
            .map(|(_, (n, _))| *n)
            .sum()
    }

    /// Since when `p` has been idle: its last use, its placement, or the
    /// controller's start, whichever is latest (Unix ms).
    pub fn idle_since(&self, p: &Placement) -> u64 {
        self.last_used(&p.model)
            .unwrap_or(0)
            .max(p.placed_at_unix_ms)
            .max(self.started_unix_ms)
    }
}

/// How long `p` (on demand) has been idle and whether it is past its
/// entry's `idle_unload_secs` with nothing in flight: `Some(idle ms)` when
/// it should be unloaded now.
pub fn idle_for(p: &Placement, entry: &CatalogEntry, usage: &Usage, now_ms: u64) -> Option<u64> {
    if !p.on_demand || usage.in_flight(&p.model, now_ms) > 0 {
        return None;
    }
    let idle = now_ms.saturating_sub(usage.idle_since(p));
    (idle >= entry.idle_unload_secs.saturating_mul(1000)).then_some(idle)
}

/// What a demand comes to.
#[derive(Debug)]
pub enum Demanded {
    /// A new placement to write, with the placements to evict for it.
    Place {
        /// The decision (its placement is set).
        decision: Box<Decision>,
        /// Names of the placements to unplace, with why each could go.
        evicted: Vec<(String, String)>,
    },
    /// No room now; there will be: ask again after this many ms.
    Wait {
        /// When to ask again.
        retry_after_ms: u64,
        /// What stands in the way.
        why: Vec<String>,
    },
    /// It fits nowhere, even with every evictable model unloaded.
    Refused {
        /// The arithmetic.
        why: Vec<String>,
    },
}

/// The place request an on-demand load makes: the entry's role (any node
/// when it names none), its defaults, one replica.
pub fn place_request(entry: &CatalogEntry) -> PlaceRequest {
    PlaceRequest {
        role: entry.role.clone(),
        model: entry.name.clone(),
        context: None,
        node: None,
        replicas: 1,
        evict: false,
        any_node: entry.role.is_empty(),
        pack: false,
        name: None,
        paused: false,
        split: false,
        split_across: None,
        allow_context_over_trained: false,
        copy: false,
        copy_rates: Default::default(),
    }
}

/// Decides a demand for `entry` (on demand, not placed): place it where it
/// fits; else evict the fewest idle on-demand placements (see the module's
/// rules) that make it fit; else wait or refuse.
pub fn decide(
    nodes: &[NodeState],
    placements: &[Placement],
    catalog: &BTreeMap<String, CatalogEntry>,
    entry: &CatalogEntry,
    usage: &Usage,
    now_ms: u64,
) -> Demanded {
    let req = place_request(entry);
    let first = placement::place(nodes, placements, catalog, &req);
    if first.accepted {
        return Demanded::Place {
            decision: Box::new(first),
            evicted: Vec::new(),
        };
    }
    // Lower or equal priority, on demand, least recently used first.
    let mut candidates: Vec<&Placement> = placements
        .iter()
        .filter(|p| p.on_demand && p.model != entry.name && p.priority <= entry.priority)
        .collect();
    candidates.sort_by_key(|p| usage.idle_since(p));
    let mut blocked = Vec::new();
    let mut retry_after_ms = u64::MAX;
    let mut evictable = Vec::new();
    for p in &candidates {
        let busy = usage.in_flight(&p.model, now_ms);
        let min_resident = catalog
            .get(&p.model)
            .map_or(0, |e| e.min_resident_secs.saturating_mul(1000));
        let resident_for = now_ms.saturating_sub(p.placed_at_unix_ms);
        if busy > 0 {
            blocked.push(format!("`{}` serves {busy} request(s) in flight", p.name));
            retry_after_ms = retry_after_ms.min(1000);
        } else if resident_for < min_resident && entry.priority <= p.priority {
            blocked.push(format!(
                "`{}` was loaded {} s ago and stays at least {} s (min_resident_secs)",
                p.name,
                resident_for / 1000,
                min_resident / 1000
            ));
            retry_after_ms = retry_after_ms.min(min_resident - resident_for);
        } else {
            let idle = now_ms.saturating_sub(usage.idle_since(p));
            evictable.push((p.name.clone(), format!("idle {} s", idle / 1000)));
        }
    }
    // The decision with the placements named `gone` unplaced.
    let without = |gone: &[&str]| {
        let rest: Vec<Placement> = placements
            .iter()
            .filter(|p| !gone.contains(&p.name.as_str()))
            .cloned()
            .collect();
        placement::place(nodes, &rest, catalog, &req)
    };
    for k in 1..=evictable.len() {
        let gone: Vec<&str> = evictable[..k].iter().map(|(n, _)| n.as_str()).collect();
        let d = without(&gone);
        if d.accepted {
            return Demanded::Place {
                decision: Box::new(d),
                evicted: evictable[..k].to_vec(),
            };
        }
    }
    // Would it fit once the blocked ones can go too?
    if !blocked.is_empty() {
        let names: Vec<&str> = candidates.iter().map(|p| p.name.as_str()).collect();
        if without(&names).accepted {
            return Demanded::Wait {
                retry_after_ms: retry_after_ms.clamp(100, 10_000),
                why: blocked,
            };
        }
    }
    let mut why = first.explanation;
    if !candidates.is_empty() {
        why.push(format!(
            "it does not fit even with every on-demand model of priority <= {} unloaded",
            entry.priority
        ));
    }
    Demanded::Refused { why }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn placed(model: &str, placed_at: u64) -> Placement {
        Placement {
            name: model.into(),
            role: String::new(),
            model: model.into(),
            model_id: format!("{model}.gguf"),
            pinned_node: None,
            options: proto::domain::PlacementOptions {
                context_size: 256,
                parallel: 1,
                cache_type_k: "f16".into(),
                cache_type_v: "f16".into(),
                extra_flags: Vec::new(),
                allow_context_over_trained: false,
            },
            estimate_bytes: 1 << 20,
            priority: 0,
            replicas: Vec::new(),
            paused: false,
            split: None,
            learned_bytes: 0,
            held: None,
            oom_kills: Vec::new(),
            on_demand: true,
            placed_at_unix_ms: placed_at,
            copy_if_missing: false,
        }
    }

    #[test]
    fn idle_time_counts_from_the_latest_of_use_placement_and_controller_start() {
        let usage = Usage::new(10_000);
        let mut e = CatalogEntry::new("a", "a.gguf");
        e.idle_unload_secs = 60;
        let p = placed("a", 5_000);
        // Idle since the controller started (10 s), not since placed (5 s).
        assert_eq!(idle_for(&p, &e, &usage, 69_999), None);
        assert_eq!(idle_for(&p, &e, &usage, 70_000), Some(60_000));
        usage.touch("a", 65_000);
        assert_eq!(idle_for(&p, &e, &usage, 70_000), None);
        assert_eq!(idle_for(&p, &e, &usage, 125_000), Some(60_000));
        // A request in flight at any gateway keeps it, however idle.
        usage.report("gw1", &[("a".into(), 0, 1)], 125_000);
        assert_eq!(idle_for(&p, &e, &usage, 130_000), None);
        // (A report of one in flight is a use too.) A stale report of one
        // in flight (the gateway is gone) keeps nothing.
        assert_eq!(idle_for(&p, &e, &usage, 184_999), None);
        assert_eq!(idle_for(&p, &e, &usage, 185_000), Some(60_000));
        // Hand-placed: never.
        let mut hand = p.clone();
        hand.on_demand = false;
        assert_eq!(idle_for(&hand, &e, &usage, u64::MAX / 2), None);
    }

    #[test]
    fn in_flight_adds_up_over_gateways_and_any_report_counts_as_use() {
        let usage = Usage::new(0);
        usage.report("gw1", &[("a".into(), 3, 2)], 1_000);
        usage.report("gw2", &[("a".into(), 0, 1), ("b".into(), 0, 0)], 2_000);
        assert_eq!(usage.in_flight("a", 2_000), 3);
        assert_eq!(usage.last_used("a"), Some(2_000));
        assert_eq!(usage.last_used("b"), None);
        usage.report("gw1", &[("a".into(), 0, 0)], 3_000);
        assert_eq!(usage.in_flight("a", 3_000), 1);
    }
}
