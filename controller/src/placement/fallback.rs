//! A refusal for lack of room turned into a split across nodes (llama.cpp
//! RPC) when the request or the catalog allows one and it fits
//! ([`crate::split::choose`]); otherwise the refusal with a line saying
//! whether a split would help.

use super::ladder::Ladder;
use super::{Breakdown, Decision, NodeFit, Request};
use crate::estimate::{Estimate, EstimateSource, observed::Sources};
use crate::split::Choice;
use proto::domain::{Placement, PlacementOptions, Replica, SplitPlan};
use proto::units;

/// A refusal `d` for lack of room (`why`, in words), turned into a split
/// across nodes when the request or the catalog allows one and it fits;
/// otherwise `d` with a line saying whether a split would help.
pub(super) fn with_split(mut d: Decision, r: &Request<'_>, ladder: &Ladder, why: &str) -> Decision {
    let allowed = r.req.split || r.entry.allow_split || r.req.split_across.is_some();
    if r.req.node.is_some() || r.req.replicas > 1 {
        if allowed {
            d.explanation
                .push("a split runs one replica and is never pinned to a node".to_owned());
        }
        return d;
    }
    // A split's host reads the file: only nodes that hold it take part.
    let holders: Vec<_> = r
        .candidates
        .iter()
        .filter(|(i, _)| !r.copy_from.contains_key(i))
        .cloned()
        .collect();
    let choice = crate::split::choose(
        r.nodes,
        &r.used,
        &holders,
        &ladder.tuples(),
        r.parallel,
        r.req.split_across.map(|k| k as usize),
    );
    let c = match (choice, allowed) {
        (Ok(c), true) => c,
        (Ok(c), false) => {
            d.explanation.push(format!(
                "it fits split across {} with llama.cpp RPC at context {}: place it with --split \
                 (or set allow_split in the catalog); --dry-run shows the per-node plan",
                c.nodes().join(" + "),
                c.ctx
            ));
            return d;
        }
        (Err(lines), true) => {
            d.explanation.push(if r.candidates.len() < 2 {
                "and it cannot be split across nodes:".to_owned()
            } else {
                "a split across nodes does not fit either:".to_owned()
            });
            d.explanation.extend(lines);
            return d;
        }
        (Err(_), false) => return d,
    };
    let Some((_, params)) = r
        .candidates
        .iter()
        .find(|(i, _)| r.nodes[*i].name == c.host())
    else {
        return d;
    };
    let plan = c.plan(params, why);
    split_decision(r, &c, plan)
}

/// The accepted decision for the split `c` with its `plan`.
fn split_decision(r: &Request<'_>, c: &Choice, plan: SplitPlan) -> Decision {
    let e = &c.estimate;
    let entry = r.entry;
    let fits = split_rows(r, c, &plan);
    let host = c.host().to_owned();
    let mut explanation = vec![format!(
        "placed `{}` as `{}` split across {} (host {host}) with llama.cpp RPC at context {}, {}/{} KV: {} in all",
        entry.name,
        r.name,
        c.nodes().join(" + "),
        c.ctx,
        c.ctk,
        c.ctv,
        units::bytes(e.total_bytes)
    )];
    explanation.extend(plan.notes.iter().cloned());
    let placement = Placement {
        on_demand: false,
        placed_at_unix_ms: 0,
        copy_if_missing: false,
        oom_kills: Vec::new(),
        held: None,
        learned_bytes: 0,
        name: r.name.clone(),
        role: r.req.role.clone(),
        model: entry.name.clone(),
        model_id: entry.model_id.clone(),
        pinned_node: None,
        options: PlacementOptions {
            context_size: c.ctx,
            parallel: r.parallel,
            cache_type_k: c.ctk.clone(),
            cache_type_v: c.ctv.clone(),
            extra_flags: entry.extra_flags.clone(),
            allow_context_over_trained: r.over_trained_allowed(),
        },
        estimate_bytes: e.total_bytes,
        priority: entry.priority,
        replicas: vec![Replica {
            index: 0,
            node: host,
            generation: 1,
        }],
        paused: r.req.paused,
        split: Some(plan),
    };
    Decision {
        accepted: true,
        placement: Some(placement),
        fits,
        evicted: Vec::new(),
        explanation,
        estimate: Some(formula_breakdown(e, c)),
    }
}

/// The rows of a split: each share's node, then the candidates it does not
/// need, then the nodes that were not candidates.
fn split_rows(r: &Request<'_>, c: &Choice, plan: &SplitPlan) -> Vec<NodeFit> {
    let mut fits: Vec<NodeFit> = plan
        .shares
        .iter()
        .filter_map(|sh| {
            let n = r.nodes.iter().find(|n| n.name == sh.node)?;
            Some(NodeFit {
                node: sh.node.clone(),
                candidate: true,
                fits: true,
                usable_bytes: n.usable_bytes.unwrap_or(0),
                reserve_bytes: n.reserve_bytes,
                used_bytes: r.used.get(&sh.node).copied().unwrap_or(0),
                free_bytes: sh.free_bytes,
                needed_bytes: sh.total_bytes + sh.margin_bytes,
                margin_bytes: sh.margin_bytes,
                context_size: c.ctx,
                cache_type: c.ctk.clone(),
                replicas: u32::from(sh.host),
                source: "formula".to_owned(),
                reason: format!(
                    "split share ({}): {} layer(s), {} + margin {} ≤ {} free",
                    if sh.host { "host" } else { "helper" },
                    sh.layers,
                    units::bytes(sh.total_bytes),
                    units::bytes(sh.margin_bytes),
                    units::bytes(sh.free_bytes)
                ),
            })
        })
        .collect();
    for (i, _) in &r.candidates {
        let n = &r.nodes[*i];
        if !plan.shares.iter().any(|sh| sh.node == n.name) {
            let f = n.free(&r.used);
            fits.push(NodeFit {
                node: n.name.clone(),
                candidate: true,
                fits: false,
                usable_bytes: n.usable_bytes.unwrap_or(0),
                reserve_bytes: n.reserve_bytes,
                used_bytes: r.used.get(&n.name).copied().unwrap_or(0),
                free_bytes: f,
                needed_bytes: 0,
                margin_bytes: 0,
                context_size: c.ctx,
                cache_type: c.ctk.clone(),
                replicas: 0,
                source: "formula".to_owned(),
                reason: "not needed by the split".to_owned(),
            });
        }
    }
    fits.extend(r.others.iter().cloned());
    fits
}

/// The whole model's estimate `e` at the split's settings, every figure
/// from the formula.
fn formula_breakdown(e: &Estimate, c: &Choice) -> Breakdown {
    Breakdown {
        weights_bytes: e.weights_bytes,
        kv_bytes: e.kv_bytes,
        compute_bytes: e.compute_bytes,
        output_bytes: e.output_bytes,
        total_bytes: e.total_bytes,
        context_size: c.ctx,
        cache_type_k: c.ctk.clone(),
        cache_type_v: c.ctv.clone(),
        sources: Sources {
            weights: EstimateSource::Formula,
            kv: EstimateSource::Formula,
            compute: EstimateSource::Formula,
            output: EstimateSource::Formula,
        },
        observed_on: None,
        formula_total_bytes: e.total_bytes,
        engine: None,
        engine_total_bytes: None,
        generic_rules: None,
    }
}
