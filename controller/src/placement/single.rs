//! Replicas each on one node: whether the model is larger than any node,
//! which setting fits (first without eviction, then evicting the fewest
//! lower-priority placements), and the decision with its per-node rows and
//! explanation.

use super::ladder::{Attempt, Estimates, Ladder};
use super::{Breakdown, Decision, NodeFit, Request};
use crate::nodes::{NodeState, margin, replica_use, used_without};
use proto::domain::{Placement, PlacementOptions, Replica};
use proto::units;
use std::collections::HashMap;

/// The setting that fits: attempt index, a node per replica, the
/// placements to evict first.
pub(super) type Chosen = (usize, Vec<usize>, Vec<String>);

/// The refusal when the model does not fit any candidate even empty at the
/// smallest setting; `None` when some candidate could take it.
pub(super) fn larger_than_any(
    r: &Request<'_>,
    ladder: &Ladder,
    est: &mut Estimates<'_>,
) -> Option<Decision> {
    let last = ladder.last();
    let cap = |i: usize| r.nodes[i].capacity();
    let biggest = r
        .candidates
        .iter()
        .map(|(i, p)| (cap(*i), est.need(last, p), *i))
        .max_by_key(|(c, _, _)| *c);
    let (cap_max, need_min, _) = biggest?;
    if !r
        .candidates
        .iter()
        .all(|(i, p)| est.need(last, p) > cap(*i))
    {
        return None;
    }
    let b = est.get(last, &r.candidates[0].1);
    let mut d = Decision::refused(vec![
        format!(
            "refused: `{}` needs {} ({}, plus margin {}) \
             even at the floor context {} with {} KV cache",
            r.entry.name,
            units::bytes(need_min),
            b.sourced_terms(),
            units::bytes(margin(b.total_bytes)),
            b.context_size,
            b.cache_type_k
        ),
        format!(
            "the largest candidate node has {} usable after its reserve: the model is larger than any node",
            units::bytes(cap_max)
        ),
        split_option(r),
    ]);
    d.estimate = Some(b);
    for (i, p) in &r.candidates {
        let b = est.get(last, p);
        let m = margin(b.total_bytes);
        d.fits.push(fit_row(
            &r.nodes[*i],
            cap(*i),
            &r.used,
            &b,
            m,
            0,
            false,
            format!(
                "needs {} > {} usable after reserve, even empty",
                units::bytes(b.total_bytes + m),
                units::bytes(cap(*i))
            ),
        ));
    }
    d.fits.extend(r.others.iter().cloned());
    Some(d)
}

/// A node for each replica at attempt `a` with `used` in use, spread
/// (fewest replicas on a node, then most free) or packed (most replicas,
/// then best fit); `None` when some replica finds no room.
fn assign(
    r: &Request<'_>,
    est: &mut Estimates<'_>,
    a: usize,
    used: &HashMap<String, u64>,
) -> Option<Vec<usize>> {
    let order_spread = !r.req.pack;
    let mut free_now: Vec<(usize, u64, u64, u32)> = r
        .candidates
        .iter()
        .map(|(i, p)| (*i, r.nodes[*i].free(used), est.need(a, p), 0u32))
        .collect();
    // A node that lacks the file comes after those that hold it.
    let copies = |i: &usize| r.copy_from.contains_key(i);
    let mut chosen = Vec::new();
    for _ in 0..r.replicas {
        let pick = free_now
            .iter_mut()
            .filter(|(_, f, need, _)| need <= f)
            .min_by(|x, y| {
                if order_spread {
                    // Fewest replicas here, then holding the file, then
                    // most free.
                    x.3.cmp(&y.3)
                        .then(copies(&x.0).cmp(&copies(&y.0)))
                        .then(y.1.cmp(&x.1))
                } else {
                    // Holding the file, then most replicas here, then
                    // least free (best fit).
                    copies(&x.0)
                        .cmp(&copies(&y.0))
                        .then(y.3.cmp(&x.3))
                        .then(x.1.cmp(&y.1))
                }
            })?;
        pick.1 -= pick.2;
        pick.3 += 1;
        chosen.push(pick.0);
    }
    Some(chosen)
}

/// The largest setting that fits without eviction, else the largest that
/// fits after evicting lower-priority placements; `None` when none does.
pub(super) fn choose(r: &Request<'_>, ladder: &Ladder, est: &mut Estimates<'_>) -> Option<Chosen> {
    for a in 0..ladder.attempts.len() {
        if let Some(c) = assign(r, est, a, &r.used) {
            return Some((a, c, Vec::new()));
        }
    }
    // Eviction: per candidate node, the lowest-priority placements on
    // it until the replica fits; the node needing the fewest wins.
    let on_node = evictable(r);
    for a in 0..ladder.attempts.len() {
        if let Some(victims) = fewest_victims(r, est, a, &on_node) {
            let skip: Vec<&str> = victims.iter().map(String::as_str).collect();
            let used_after = used_without(&r.used, r.nodes, r.placements, &skip);
            if let Some(c) = assign(r, est, a, &used_after) {
                return Some((a, c, victims));
            }
        }
    }
    None
}

/// Each node's replicas of placements of lower priority than the request,
/// with what each uses, lowest priority (then name) first.
fn evictable<'a>(r: &Request<'a>) -> HashMap<&'a str, Vec<(&'a Placement, u64)>> {
    let nodes = r.nodes;
    let by_name: HashMap<&str, &NodeState> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut on_node: HashMap<&str, Vec<(&Placement, u64)>> = HashMap::new();
    for p in r
        .placements
        .iter()
        .filter(|p| p.priority < r.entry.priority)
    {
        for rep in &p.replicas {
            let u = replica_use(p, rep, by_name.get(rep.node.as_str()).copied());
            on_node.entry(rep.node.as_str()).or_default().push((p, u));
        }
    }
    for v in on_node.values_mut() {
        v.sort_by(|x, y| {
            x.0.priority
                .cmp(&y.0.priority)
                .then(x.0.name.cmp(&y.0.name))
        });
    }
    on_node
}

/// At attempt `a`, the placements to evict on the candidate that needs the
/// fewest for one replica to fit (then the one left with most free).
fn fewest_victims(
    r: &Request<'_>,
    est: &mut Estimates<'_>,
    a: usize,
    on_node: &HashMap<&str, Vec<(&Placement, u64)>>,
) -> Option<Vec<String>> {
    let mut best: Option<(usize, u64, Vec<String>)> = None;
    for (i, p) in &r.candidates {
        let need = est.need(a, p);
        let mut avail = r.nodes[*i].free(&r.used);
        let mut victims = Vec::new();
        for (v, u) in on_node
            .get(r.nodes[*i].name.as_str())
            .map_or(&[][..], Vec::as_slice)
        {
            if avail >= need {
                break;
            }
            avail += u;
            if !victims.contains(&v.name) {
                victims.push(v.name.clone());
            }
        }
        if avail >= need
            && best.as_ref().is_none_or(|(_, f, vs)| {
                victims.len() < vs.len() || (victims.len() == vs.len() && avail > *f)
            })
        {
            best = Some((*i, avail, victims));
        }
    }
    best.map(|(_, _, victims)| victims)
}

/// The refusal when no setting fits, even with eviction.
pub(super) fn no_room(r: &Request<'_>, ladder: &Ladder, est: &mut Estimates<'_>) -> Decision {
    let last = ladder.last();
    let b = est.get(last, &r.candidates[0].1);
    let mut d = Decision::refused(vec![format!(
        "refused: {} replica(s) of `{}` do not fit at any setting from context {} ({} KV) \
         down to {} ({} KV), and evicting lower-priority placements would not help",
        r.replicas,
        r.entry.name,
        ladder.ctx0,
        r.entry.cache_type_k,
        ladder.floor,
        ladder.attempts[last].ctk
    )]);
    for (i, p) in &r.candidates {
        let b = est.get(last, p);
        let m = margin(b.total_bytes);
        let f = r.nodes[*i].free(&r.used);
        d.fits.push(fit_row(
            &r.nodes[*i],
            r.nodes[*i].capacity(),
            &r.used,
            &b,
            m,
            0,
            false,
            format!(
                "needs {} > {} free",
                units::bytes(b.total_bytes + m),
                units::bytes(f)
            ),
        ));
    }
    d.fits.extend(r.others.iter().cloned());
    d.estimate = Some(b);
    d
}

/// The decision for the setting `chosen`: accepted, or refused when it
/// needs eviction the request does not allow.
pub(super) fn decide(
    r: &Request<'_>,
    ladder: &Ladder,
    est: &mut Estimates<'_>,
    chosen: Chosen,
) -> Decision {
    let (a, chosen_nodes, evicted) = chosen;
    let used_after = if evicted.is_empty() {
        r.used.clone()
    } else {
        let skip: Vec<&str> = evicted.iter().map(String::as_str).collect();
        used_without(&r.used, r.nodes, r.placements, &skip)
    };
    let mut d = Decision::refused(Vec::new());
    d.fits = chosen_rows(r, est, a, &chosen_nodes, &used_after);
    let b = est.get(a, &r.candidates[0].1);
    d.estimate = Some(b.clone());
    let placement = new_placement(r, &ladder.attempts[a], &b, &chosen_nodes);
    let mut explanation = explain(r, ladder, a, &b, &placement, &chosen_nodes);
    if !evicted.is_empty() {
        if r.req.evict {
            explanation.push(format!(
                "evicts lower-priority placement(s): {} (priority below {})",
                evicted.join(", "),
                r.entry.priority
            ));
        } else {
            d.explanation = vec![
                format!(
                    "refused: `{}` fits only after evicting lower-priority placement(s) {}; \
                     allow eviction to proceed",
                    r.entry.name,
                    evicted.join(", ")
                ),
                explanation.remove(0).replacen("placed", "would place", 1),
            ];
            d.explanation.extend(explanation);
            d.evicted = evicted;
            return d;
        }
    }
    d.accepted = true;
    d.placement = Some(placement);
    d.evicted = evicted;
    d.explanation = explanation;
    d
}

/// The placement of `r` at setting `at` with estimate `b`, a replica on
/// each of `chosen_nodes`.
fn new_placement(
    r: &Request<'_>,
    at: &Attempt,
    b: &Breakdown,
    chosen_nodes: &[usize],
) -> Placement {
    let entry = r.entry;
    Placement {
        on_demand: false,
        placed_at_unix_ms: 0,
        oom_kills: Vec::new(),
        held: None,
        learned_bytes: 0,
        name: r.name.clone(),
        role: r.req.role.clone(),
        model: entry.name.clone(),
        model_id: entry.model_id.clone(),
        pinned_node: r.req.node.clone(),
        options: PlacementOptions {
            context_size: at.ctx,
            parallel: r.parallel,
            cache_type_k: at.ctk.clone(),
            cache_type_v: at.ctv.clone(),
            extra_flags: entry.extra_flags.clone(),
            allow_context_over_trained: r.over_trained_allowed(),
        },
        estimate_bytes: b.total_bytes,
        priority: entry.priority,
        replicas: chosen_nodes
            .iter()
            .enumerate()
            .map(|(k, &i)| Replica {
                index: u32::try_from(k).unwrap_or(u32::MAX),
                node: r.nodes[i].name.clone(),
                generation: 1,
            })
            .collect(),
        paused: r.req.paused,
        split: None,
        copy_if_missing: r.req.copy || entry.copy_if_missing,
    }
}

/// Where `placement` goes and at what size; then, when they apply, that
/// the asked-for setting did not fit (attempt `a` > 0) and that a real load
/// sized it.
fn explain(
    r: &Request<'_>,
    ladder: &Ladder,
    a: usize,
    b: &Breakdown,
    placement: &Placement,
    chosen_nodes: &[usize],
) -> Vec<String> {
    let entry = r.entry;
    let at = &ladder.attempts[a];
    let where_: Vec<String> = placement.replicas.iter().map(|r| r.node.clone()).collect();
    let mut explanation = vec![format!(
        "placed `{}` as `{}` on {}: {} per replica ({}) at context {}, {}/{} KV",
        entry.name,
        r.name,
        where_.join(", "),
        units::bytes(b.total_bytes),
        b.sourced_terms(),
        at.ctx,
        at.ctk,
        at.ctv
    )];
    if a > 0 {
        explanation.push(format!(
            "context {} with {} KV did not fit; chose context {} with {}/{} KV (the largest setting that fits)",
            ladder.ctx0, entry.cache_type_k, at.ctx, at.ctk, at.ctv
        ));
    }
    let mut copied_to = chosen_nodes.to_vec();
    copied_to.sort_unstable();
    copied_to.dedup();
    for i in copied_to {
        if let Some(from) = r.copy_from.get(&i) {
            let to = &r.nodes[i].name;
            let bytes = r
                .candidates
                .iter()
                .find(|(c, _)| *c == i)
                .map_or(0, |(_, p)| p.weight_bytes);
            explanation.push(format!(
                "{to} lacks `{}`: copy {} from {from} first ({}); the replica starts when the \
                 copy is verified",
                entry.model_id,
                units::bytes(bytes),
                super::copy_time(&r.req.copy_rates, from, to, bytes)
            ));
        }
    }
    if b.observed() {
        explanation.push(format!(
            "sized by a real load of `{}` at these settings, {}: {} per replica where the formula gives {}",
            entry.model_id,
            b.source(),
            units::bytes(b.total_bytes),
            units::bytes(b.formula_total_bytes)
        ));
    }
    explanation
}

/// The rows of the candidates at attempt `a` with replicas on
/// `chosen_nodes` and `used_after` in use (after any eviction), then the
/// other nodes'.
fn chosen_rows(
    r: &Request<'_>,
    est: &mut Estimates<'_>,
    a: usize,
    chosen_nodes: &[usize],
    used_after: &HashMap<String, u64>,
) -> Vec<NodeFit> {
    let mut per_node: HashMap<usize, u32> = HashMap::new();
    for &i in chosen_nodes {
        *per_node.entry(i).or_default() += 1;
    }
    let mut fits = Vec::new();
    for (i, p) in &r.candidates {
        let n = &r.nodes[*i];
        let b = est.get(a, p);
        let m = margin(b.total_bytes);
        let f = n.free(used_after);
        let k = per_node.get(i).copied().unwrap_or(0);
        let need = b.total_bytes + m;
        let reason = if k > 0 {
            format!(
                "{k} replica(s): {} usable − {} reserve − {} used = {} free ≥ {} × {} needed",
                units::bytes(n.capacity() + n.reserve_bytes),
                units::bytes(n.reserve_bytes),
                units::bytes(used_after.get(&n.name).copied().unwrap_or(0)),
                units::bytes(f),
                k,
                units::bytes(need)
            )
        } else if need > f {
            format!("needs {} > {} free", units::bytes(need), units::bytes(f))
        } else {
            "fits, not chosen".to_owned()
        };
        let reason = match r.copy_from.get(i) {
            Some(from) => format!("{reason}; lacks the file: copied from {from} first"),
            None => reason,
        };
        fits.push(fit_row(
            n,
            n.capacity(),
            used_after,
            &b,
            m,
            k,
            need <= f,
            reason,
        ));
    }
    fits.extend(r.others.iter().cloned());
    fits
}

/// A candidate's row: its memory, what one replica needs and why.
#[allow(clippy::too_many_arguments)]
fn fit_row(
    n: &NodeState,
    cap: u64,
    used: &HashMap<String, u64>,
    b: &Breakdown,
    margin: u64,
    replicas: u32,
    fits: bool,
    reason: String,
) -> NodeFit {
    let u = used.get(&n.name).copied().unwrap_or(0);
    let source = b.source();
    let reason = format!("{reason} (estimate: {source})");
    NodeFit {
        node: n.name.clone(),
        candidate: true,
        fits,
        usable_bytes: n.usable_bytes.unwrap_or(0),
        reserve_bytes: n.reserve_bytes,
        used_bytes: u,
        free_bytes: cap.saturating_sub(u),
        needed_bytes: b.total_bytes + margin,
        margin_bytes: margin,
        context_size: b.context_size,
        cache_type: b.cache_type_k.clone(),
        replicas,
        source,
        reason,
    }
}

/// The options line of a model larger than any node: `--split` is offered
/// as it stands only when a second node could take part.
fn split_option(r: &Request<'_>) -> String {
    if r.candidates.len() >= 2 {
        "options: a smaller quantization of the model whose weights fit one node, \
         or splitting it across nodes (llama.cpp RPC: `--split`)"
            .to_owned()
    } else {
        format!(
            "options: a smaller quantization of the model whose weights fit one node, \
             or a second live node {}holding `{}`, to split it across nodes (llama.cpp RPC: \
             `--split`)",
            if r.req.any_node {
                String::new()
            } else {
                format!("of role `{}` ", r.req.role)
            },
            r.entry.model_id
        )
    }
}
