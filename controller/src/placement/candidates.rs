//! Which nodes can take a request at all: live, of the role (unless
//! `any_node`), the pinned one when pinned, with known usable memory, not
//! under memory pressure, and holding the model file, or, when the request
//! or the catalog entry allows a copy, lacking it while another live node
//! holds it (the file is copied from there first). Every other node gets a
//! row saying why not.

use super::{Decision, NodeFit, PlaceRequest};
use crate::nodes::{Liveness, NodeState};
use proto::domain::{CatalogEntry, ModelParams};
use std::collections::HashMap;
use std::sync::Arc;

/// The nodes that can take the model: indexes into the node list, with
/// the model's parameters as that node holds them.
pub(super) type Candidates = Vec<(usize, Arc<ModelParams>)>;

/// Candidates that lack the file, by node index: the node each would copy
/// it from.
pub(super) type CopyFrom = HashMap<usize, String>;

/// The candidates for `entry`, a row for each other node saying why it
/// is not one, and the candidates that lack the file with the node each
/// would copy it from. `Err` is the refusal when the pin names no node or
/// no node qualifies.
pub(super) fn candidates(
    nodes: &[NodeState],
    entry: &CatalogEntry,
    req: &PlaceRequest,
) -> Result<(Candidates, Vec<NodeFit>, CopyFrom), Box<Decision>> {
    let mut fits: Vec<NodeFit> = Vec::with_capacity(nodes.len());
    let mut candidates: Candidates = Vec::new();
    let mut copy_from = HashMap::new();
    let copy = req.copy || entry.copy_if_missing;
    for (i, n) in nodes.iter().enumerate() {
        let mut params = n.models.get(&entry.model_id);
        let mut source = None;
        if params.is_none() && copy {
            source = copy_source(nodes, n, &entry.model_id, &req.copy_rates);
            params = source.map(|s| &nodes[s].models[&entry.model_id]);
        }
        let reason = why_not(n, req)
            .or_else(|| {
                params.is_none().then(|| {
                    if copy {
                        format!(
                            "does not hold `{}`, and no other live node does to copy it from",
                            entry.model_id
                        )
                    } else {
                        format!("does not hold `{}`", entry.model_id)
                    }
                })
            })
            .or_else(|| flags_refused(n, entry));
        match (reason, params) {
            (None, Some(p)) => {
                if let Some(s) = source {
                    copy_from.insert(i, nodes[s].name.clone());
                }
                candidates.push((i, p.clone()));
            }
            (reason, _) => fits.push(not_a_candidate(n, reason.unwrap_or_default())),
        }
    }
    if let Some(pin) = &req.node
        && !nodes.iter().any(|n| &n.name == pin)
    {
        return Err(Box::new(Decision::refused(vec![format!(
            "no node named `{pin}`"
        )])));
    }
    if candidates.is_empty() {
        // Pinned: the one node that counts says why, not "no node holds it".
        if let Some(pinned) = req
            .node
            .as_ref()
            .and_then(|pin| fits.iter().find(|f| &f.node == pin))
        {
            let mut d = Decision::refused(vec![format!(
                "the pinned node `{}` cannot take `{}`: {}",
                pinned.node, entry.name, pinned.reason
            )]);
            d.fits = fits;
            return Err(Box::new(d));
        }
        let mut d = Decision::refused(vec![format!(
            "no live node {}holds `{}`",
            if req.any_node {
                String::new()
            } else {
                format!("with role `{}` ", req.role)
            },
            entry.model_id
        )]);
        d.fits = fits;
        return Err(Box::new(d));
    }
    Ok((candidates, fits, copy_from))
}

/// The node `to` would copy `model_id` from: a live node that holds it,
/// the one with the fastest measured copy to `to` first.
fn copy_source(
    nodes: &[NodeState],
    to: &NodeState,
    model_id: &str,
    rates: &super::CopyRates,
) -> Option<usize> {
    nodes
        .iter()
        .enumerate()
        .filter(|(_, o)| {
            o.name != to.name && o.liveness == Liveness::Ready && o.models.contains_key(model_id)
        })
        .max_by(|(_, a), (_, b)| {
            let rate = |o: &NodeState| {
                rates
                    .get(&(o.name.clone(), to.name.clone()))
                    .copied()
                    .unwrap_or(0.0)
            };
            // Equal rates: the first node in order.
            rate(a).total_cmp(&rate(b)).then(b.name.cmp(&a.name))
        })
        .map(|(i, _)| i)
}

/// Refuses a context the agents would refuse, or that the catalog does not
/// allow: below the entry's `min_context`, or above the model's trained
/// context (`context_length` in its GGUF header) unless the request or the
/// entry allows that. Checked at decision time so that a person is told at
/// once, not by a start that fails on every retry.
pub(super) fn context_bounds(
    entry: &CatalogEntry,
    req: &PlaceRequest,
    candidates: &Candidates,
) -> Result<(), Box<Decision>> {
    let (ctx, whose) = match req.context {
        Some(c) => (c, "asked for".to_owned()),
        None => (
            entry.default_context,
            format!("`{}`'s default_context", entry.name),
        ),
    };
    if req.context.is_some() && ctx < entry.min_context {
        return Err(Box::new(Decision::refused(vec![format!(
            "context {ctx} is below `{}`'s min_context {}: ask for {} tokens or more \
             (min_context in the catalog sets the floor)",
            entry.name, entry.min_context, entry.min_context
        )])));
    }
    let trained = candidates
        .iter()
        .map(|(_, p)| p.context_length)
        .filter(|&t| t > 0)
        .min();
    let allowed = req.allow_context_over_trained || entry.allow_context_over_trained;
    if let Some(trained) = trained
        && u64::from(ctx) > trained
        && !allowed
    {
        return Err(Box::new(Decision::refused(vec![
            format!(
                "context {ctx} ({whose}) is above `{}`'s trained context {trained}: \
                 the agent would refuse to start it",
                entry.model_id
            ),
            format!(
                "options: --ctx {trained} or less; or --allow-context-over-trained \
                 (allow_context_over_trained = true in the catalog) to run it anyway, \
                 which llama.cpp does with RoPE scaling, often at a cost in quality"
            ),
        ])));
    }
    Ok(())
}

/// Why `n` cannot take `req` whatever the model: pin, liveness, role,
/// unknown memory.
fn why_not(n: &NodeState, req: &PlaceRequest) -> Option<String> {
    if req.node.as_ref().is_some_and(|p| p != &n.name) {
        Some("not the pinned node".to_owned())
    } else if n.liveness != Liveness::Ready {
        Some(format!(
            "node is {}",
            proto::domain::NodeStatus::from(n.liveness).as_str()
        ))
    } else if !req.any_node && !n.roles.iter().any(|r| r == &req.role) {
        Some(format!(
            "no `{}` role (has: {})",
            req.role,
            n.roles.join(", ")
        ))
    } else if n.usable_bytes.is_none() {
        Some("usable memory unknown".to_owned())
    } else {
        n.pressure
            .as_ref()
            .map(|why| format!("under memory pressure ({why})"))
    }
}

/// Why `n`'s agent would refuse `entry`'s extra flags: one it does not
/// allow (`allowed_flags` in its config).
fn flags_refused(n: &NodeState, entry: &CatalogEntry) -> Option<String> {
    let allowed = n.allowed_flags.as_ref()?;
    let missing: Vec<&str> = entry
        .extra_flags
        .iter()
        .map(|f| f.trim())
        .filter(|f| !allowed.iter().any(|a| a == f))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "its agent does not allow `{}` (allowed_flags: {})",
            missing.join("`, `"),
            if allowed.is_empty() {
                "none".to_owned()
            } else {
                allowed.join(", ")
            }
        )
    })
}

/// The row of a node that is not a candidate.
fn not_a_candidate(n: &NodeState, reason: String) -> NodeFit {
    NodeFit {
        node: n.name.clone(),
        candidate: false,
        fits: false,
        usable_bytes: n.usable_bytes.unwrap_or(0),
        reserve_bytes: n.reserve_bytes,
        used_bytes: 0,
        free_bytes: 0,
        needed_bytes: 0,
        margin_bytes: 0,
        context_size: 0,
        cache_type: String::new(),
        replicas: 0,
        source: String::new(),
        reason,
    }
}
