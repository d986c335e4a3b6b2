//! Placing one model across several nodes with llama.cpp RPC, when no
//! single node fits it: the host node runs llama-server with `--rpc`, each
//! helper node runs ggml-rpc-server holding a share of the layers.
//!
//! Who can take part: live nodes of the role (or any, with `any_node`) that
//! hold the model file; helpers must be able to start ggml-rpc-server; every
//! node must run the same llama.cpp build as the host (the RPC protocol has
//! to match). The host is the candidate with the most free memory, helpers
//! follow by free memory, and the fewest nodes that fit win; the context
//! ladder is the same as for one node (catalog context and cache types,
//! `q8_0`, halvings down to the floor). The per-node arithmetic is
//! [`crate::estimate::split`]'s; the estimate is the formula's (real loads
//! of a split are not used to size the next one).

use crate::estimate::split::{self, Layout, SplitNode};
use crate::estimate::{Estimate, estimate};
use crate::nodes::{Liveness, NodeState, estimate_options, margin, used_by_node};
use proto::domain::instance::MAX_TENSOR_SPLIT_LEN;
use proto::domain::{ModelParams, Placement, Replica, SplitPlan};
use proto::units;
use std::collections::HashMap;
use std::sync::Arc;

/// Most helpers of one split: llama.cpp takes at most
/// [`MAX_TENSOR_SPLIT_LEN`] devices, the host's GPU among them.
const MAX_HELPERS: usize = MAX_TENSOR_SPLIT_LEN - 1;

/// A split that fits, with the settings it fits at.
#[derive(Debug, Clone)]
pub struct Choice {
    /// The per-node layout.
    pub layout: Layout,
    /// Context.
    pub ctx: u32,
    /// `-ctk`.
    pub ctk: String,
    /// `-ctv`.
    pub ctv: String,
    /// The whole model's estimate at these settings.
    pub estimate: Estimate,
}

impl Choice {
    /// The host's node name.
    pub fn host(&self) -> &str {
        self.layout
            .shares
            .last()
            .map(|s| s.node.as_str())
            .unwrap_or_default()
    }

    /// The nodes, helpers first.
    pub fn nodes(&self) -> Vec<&str> {
        self.layout.shares.iter().map(|s| s.node.as_str()).collect()
    }

    /// The plan to record in the placement, with its notes.
    pub fn plan(&self, params: &ModelParams, why: &str) -> SplitPlan {
        let l = &self.layout;
        let mut notes = vec![format!(
            "split across {} nodes with llama.cpp RPC: {why}",
            l.shares.len()
        )];
        notes.extend(split::describe(l));
        notes.push(format!(
            "llama-server on {} with -ngl {} --tensor-split {} (devices: {} RPC server(s) first{})",
            self.host(),
            l.gpu_layers,
            l.tensor_split
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            l.shares.len() - 1,
            if l.tensor_split.len() == l.shares.len() {
                ", then the host's GPU"
            } else {
                "; the host's own layers stay on its CPU"
            }
        ));
        let hops = l.traffic_bytes_per_token / (params.embedding_length * 4).max(1);
        notes.push(format!(
            "cost: {} of hidden state cross the network per generated token ({hops} hop(s), one \
             network round trip each), and {} per hop for each {}-token prompt batch; generation \
             runs the layers one node after the other, so expect about one node's speed minus \
             those round trips: slower than a model that fits one node",
            units::bytes(l.traffic_bytes_per_token),
            units::bytes(params.embedding_length * 4 * self.estimate.resolved.n_ubatch),
            self.estimate.resolved.n_ubatch
        ));
        SplitPlan {
            shares: l.shares.clone(),
            traffic_bytes_per_token: l.traffic_bytes_per_token,
            notes,
        }
    }
}

/// Finds the smallest split that fits (or one over exactly `across` nodes),
/// trying `attempts` (context, `-ctk`, `-ctv`) in order. `candidates` are indexes into `nodes` with the model's
/// parameters on that node; `used` what placements use per node. `Err`
/// says, one line each, why nothing fits.
pub fn choose(
    nodes: &[NodeState],
    used: &HashMap<String, u64>,
    candidates: &[(usize, Arc<ModelParams>)],
    attempts: &[(u32, String, String)],
    parallel: u32,
    across: Option<usize>,
) -> Result<Choice, Vec<String>> {
    let free = |i: usize| nodes[i].free(used);
    let mut order: Vec<&(usize, Arc<ModelParams>)> = candidates.iter().collect();
    order.sort_by(|a, b| {
        free(b.0)
            .cmp(&free(a.0))
            .then(nodes[a.0].name.cmp(&nodes[b.0].name))
    });
    let mut why = Vec::new();
    let Some(&&(host_i, ref params)) = order
        .iter()
        .find(|(i, _)| !nodes[*i].split.llama_version.is_empty())
    else {
        return Err(vec![
            "no candidate node reported its llama.cpp build (`llama-server --version`), which a split needs"
                .to_owned(),
        ]);
    };
    let host = &nodes[host_i];
    let mut helpers: Vec<usize> = Vec::new();
    for &&(i, _) in &order {
        if i == host_i {
            continue;
        }
        let n = &nodes[i];
        if !n.split.rpc_server {
            why.push(format!("{}: cannot start ggml-rpc-server", n.name));
        } else if n.split.llama_version != host.split.llama_version {
            why.push(format!(
                "{}: runs llama.cpp `{}`, the host {} runs `{}`; the RPC protocol must match, install the same build",
                n.name, n.split.llama_version, host.name, host.split.llama_version
            ));
        } else {
            helpers.push(i);
        }
    }
    if helpers.is_empty() {
        why.insert(
            0,
            format!(
                "no node can help {}: a split needs a second live node of the role holding the file",
                host.name
            ),
        );
        return Err(why);
    }
    let node = |i: usize| SplitNode {
        name: nodes[i].name.clone(),
        free_bytes: free(i),
    };
    let ks = match across {
        Some(n) if n < 2 => {
            return Err(vec![format!("a split takes at least 2 nodes, not {n}")]);
        }
        Some(n) if n - 1 > helpers.len() => {
            why.insert(
                0,
                format!("{n} nodes asked for, {} can take part", helpers.len() + 1),
            );
            return Err(why);
        }
        Some(n) => n - 1..=n - 1,
        // llama.cpp takes at most MAX_TENSOR_SPLIT_LEN devices.
        None => 1..=helpers.len().min(MAX_HELPERS),
    };
    let mut last: Option<(Layout, u32)> = None;
    for (ctx, ctk, ctv) in attempts {
        let est = estimate(params, &estimate_options(*ctx, parallel, ctk, ctv));
        for k in ks.clone() {
            // Not worth planning while the nodes together lack the room.
            let room: u64 = helpers[..k].iter().map(|&i| free(i)).sum::<u64>() + free(host_i);
            if room < est.total_bytes && k < *ks.end() {
                continue;
            }
            let hs: Vec<SplitNode> = helpers[..k].iter().map(|&i| node(i)).collect();
            let l = split::plan(params, &est, &hs, &node(host_i), host.split.gpu, margin);
            if l.fits() {
                return Ok(Choice {
                    layout: l,
                    ctx: *ctx,
                    ctk: ctk.clone(),
                    ctv: ctv.clone(),
                    estimate: est,
                });
            }
            last = Some((l, *ctx));
        }
    }
    if let Some((l, ctx)) = last {
        why.push(format!(
            "even split across all {} usable nodes at context {ctx} a share does not fit:",
            l.shares.len()
        ));
        why.extend(split::describe(&l));
        let need: u64 = l
            .shares
            .iter()
            .map(|s| s.total_bytes + s.margin_bytes)
            .sum();
        let have: u64 = l.shares.iter().map(|s| s.free_bytes).sum();
        why.push(format!(
            "together they need {} and have {} free",
            units::bytes(need),
            units::bytes(have)
        ));
    }
    Err(why)
}

/// Plans the split of `p` again on the nodes as they are now, at its
/// settings (context, cache types, slots): the result has a new plan, the
/// new host as its replica, and the next generation, so every side starts
/// afresh. `Err` says why no split fits now.
pub fn replan(
    nodes: &[NodeState],
    placements: &[Placement],
    p: &Placement,
) -> Result<Placement, String> {
    let used = used_by_node(nodes, placements, &[&p.name]);
    let candidates: Vec<(usize, Arc<ModelParams>)> = nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| {
            n.liveness == Liveness::Ready
                && n.usable_bytes.is_some()
                && (p.role.is_empty() || n.roles.iter().any(|r| r == &p.role))
        })
        .filter_map(|(i, n)| n.models.get(&p.model_id).map(|m| (i, m.clone())))
        .collect();
    let o = &p.options;
    let attempt = [(
        o.context_size,
        o.cache_type_k.clone(),
        o.cache_type_v.clone(),
    )];
    let across = p.split.as_ref().map_or(0, |s| s.shares.len());
    let c = choose(
        nodes,
        &used,
        &candidates,
        &attempt,
        o.parallel.max(1),
        (across >= 2).then_some(across),
    )
    .map_err(|w| w.join("; "))?;
    let params = candidates
        .iter()
        .find(|(i, _)| nodes[*i].name == c.host())
        .map(|(_, m)| m.clone())
        .ok_or_else(|| "the chosen host holds no model".to_owned())?;
    let mut next = p.clone();
    next.split = Some(c.plan(&params, "planned again after a failure"));
    next.estimate_bytes = c.estimate.total_bytes;
    next.replicas = vec![Replica {
        index: 0,
        node: c.host().to_owned(),
        generation: crate::lifecycle::next_generation(p),
    }];
    Ok(next)
}
