//! The cluster as placement sees it, shared by single-node placement
//! ([`crate::placement`]) and splits across nodes ([`crate::split`]): each
//! node's state ([`NodeState`]), what the recorded placements use on it
//! ([`used_by_node`]), the safety margin ([`margin`]) and the estimate
//! options of a placement's settings ([`estimate_options`]).
//!
//! `free = usable − reserve − used`, where `used` sums what the node's
//! placements use: the observed buffers of a running instance when the
//! agent reported them, else the placement's estimate; a split's shares
//! count on each of their nodes.

use crate::estimate::engine::EngineRecord;
use crate::estimate::{CacheType, EstimateOptions, FlashAttn, ObservedRecord};
use proto::domain::{InstanceOptions, ModelParams, Placement, Replica};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Smallest safety margin on top of an estimate.
pub const MARGIN_MIN: u64 = proto::domain::memory::MARGIN_MIN_BYTES;
/// Margin as a percentage of the estimate.
pub const MARGIN_PERCENT: u64 = proto::domain::memory::MARGIN_PERCENT;

/// Whether the controller hears from a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The agent's stream is live.
    Ready,
    /// Silent for longer than the grace period.
    Unreachable,
    /// Silent for longer than the move period.
    Lost,
    /// Never heard from.
    Unknown,
}

/// One node as placement sees it.
#[derive(Debug, Clone)]
pub struct NodeState {
    /// Name.
    pub name: String,
    /// Roles.
    pub roles: Vec<String>,
    /// Whether it is live.
    pub liveness: Liveness,
    /// Usable memory the agent reported (`None` = unknown: never placed on).
    pub usable_bytes: Option<u64>,
    /// Held back for the OS and the agent.
    pub reserve_bytes: u64,
    /// Models on its disks, by id.
    pub models: BTreeMap<String, Arc<ModelParams>>,
    /// Observed bytes of running instances, by request id.
    pub observed: HashMap<String, u64>,
    /// Real loads on this node: what its ready instances logged, with the
    /// model and settings of each. New requests for the same model and
    /// settings are sized by them instead of the formula.
    pub loads: Vec<ObservedRecord>,
    /// llama.cpp's own projections its agent answered (`ProjectMemory`):
    /// the formula is checked against them.
    pub engine: Vec<EngineRecord>,
    /// What splitting a model across nodes needs to know of it.
    pub split: SplitCaps,
    /// The extra llama-server flags its agent allows (`allowed_flags`);
    /// `None` until the agent said.
    pub allowed_flags: Option<Vec<String>>,
    /// Why the node is under memory pressure, when it is: nothing new is
    /// placed there.
    pub pressure: Option<String>,
}

impl NodeState {
    /// Usable memory after the reserve (0 when usable is unknown).
    pub fn capacity(&self) -> u64 {
        self.usable_bytes
            .unwrap_or(0)
            .saturating_sub(self.reserve_bytes)
    }

    /// `usable − reserve − used`, with `used` per node as
    /// [`used_by_node`] gives it.
    pub fn free(&self, used: &HashMap<String, u64>) -> u64 {
        self.capacity()
            .saturating_sub(used.get(&self.name).copied().unwrap_or(0))
    }
}

/// What splitting a model across nodes (llama.cpp RPC) needs to know of a
/// node, from its agent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitCaps {
    /// `llama-server --version`; every node of a split must match.
    pub llama_version: String,
    /// The agent can start ggml-rpc-server.
    pub rpc_server: bool,
    /// llama-server offloads to a GPU here (else CPU only).
    pub gpu: bool,
}

fn cache(name: &str) -> CacheType {
    name.parse().unwrap_or_default()
}

/// The estimate options of a llama-server started with these settings:
/// `-c ctx -np parallel` without `-kvu` (the agent's argv), given cache types.
pub fn estimate_options(ctx: u32, parallel: u32, ctk: &str, ctv: &str) -> EstimateOptions {
    let mut o = EstimateOptions::llama_server_slots(ctx, parallel, false);
    o.cache_type_k = cache(ctk);
    o.cache_type_v = cache(ctv);
    o
}

/// The margin on top of an estimate.
pub fn margin(total: u64) -> u64 {
    proto::domain::memory::margin(total)
}

/// Bytes a placement's replica uses on its node: observed when reported.
pub(crate) fn replica_use(p: &Placement, r: &Replica, node: Option<&NodeState>) -> u64 {
    match node {
        // The request id is built only when the node reported something.
        Some(n) if !n.observed.is_empty() => n
            .observed
            .get(&p.key(r).request_id())
            .copied()
            .unwrap_or(p.sized_bytes()),
        _ => p.sized_bytes(),
    }
}

/// What `p` uses on each of its nodes.
fn placement_use<'a>(p: &'a Placement, by_name: &HashMap<&str, &NodeState>) -> Vec<(&'a str, u64)> {
    if p.held.is_some() {
        // Held: nothing runs anywhere.
        return Vec::new();
    }
    match &p.split {
        Some(s) => s
            .shares
            .iter()
            .map(|sh| (sh.node.as_str(), sh.total_bytes))
            .collect(),
        None => p
            .replicas
            .iter()
            .map(|r| {
                let u = replica_use(p, r, by_name.get(r.node.as_str()).copied());
                (r.node.as_str(), u)
            })
            .collect(),
    }
}

/// Bytes each node's placements use, excluding `skip`.
pub fn used_by_node(
    nodes: &[NodeState],
    placements: &[Placement],
    skip: &[&str],
) -> HashMap<String, u64> {
    let by_name: HashMap<&str, &NodeState> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut used: HashMap<String, u64> = HashMap::new();
    for p in placements
        .iter()
        .filter(|p| !skip.contains(&p.name.as_str()))
    {
        for (node, u) in placement_use(p, &by_name) {
            match used.get_mut(node) {
                Some(v) => *v += u,
                None => {
                    used.insert(node.to_owned(), u);
                }
            }
        }
    }
    used
}

/// `used` (from [`used_by_node`] with no skip) less what the placements
/// named in `skip` use: the same as `used_by_node(nodes, placements,
/// skip)` without adding up every other placement again.
pub(crate) fn used_without(
    used: &HashMap<String, u64>,
    nodes: &[NodeState],
    placements: &[Placement],
    skip: &[&str],
) -> HashMap<String, u64> {
    let by_name: HashMap<&str, &NodeState> = nodes.iter().map(|n| (n.name.as_str(), n)).collect();
    let mut after = used.clone();
    for p in placements
        .iter()
        .filter(|p| skip.contains(&p.name.as_str()))
    {
        for (node, u) in placement_use(p, &by_name) {
            if let Some(v) = after.get_mut(node) {
                *v -= u.min(*v);
                if *v == 0 {
                    after.remove(node);
                }
            }
        }
    }
    after
}

/// The estimate options of an instance started with `o` (as the agent
/// reported them): llama-server with `-np` slots, `-kvu` only when an extra
/// flag asks for it, unspecified cache types f16, unspecified flash
/// attention `auto`.
pub fn instance_estimate_options(o: &InstanceOptions) -> EstimateOptions {
    let kvu = o
        .extra_flags
        .iter()
        .any(|f| matches!(f.split_whitespace().next(), Some("-kvu" | "--kv-unified")));
    let mut e = EstimateOptions::llama_server_slots(o.context_size, o.parallel, kvu);
    e.cache_type_k = o.cache_type_k.unwrap_or_default();
    e.cache_type_v = o.cache_type_v.unwrap_or_default();
    e.flash_attn = match o.flash_attention {
        Some(true) => FlashAttn::On,
        Some(false) => FlashAttn::Off,
        None => FlashAttn::Auto,
    };
    e
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::domain::{PlacementOptions, SplitPlan, SplitShare};

    fn node(name: &str, observed: &[(&str, u64)]) -> NodeState {
        NodeState {
            pressure: None,
            name: name.to_owned(),
            roles: vec!["speed".into()],
            liveness: Liveness::Ready,
            usable_bytes: Some(100),
            reserve_bytes: 0,
            models: BTreeMap::new(),
            observed: observed
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            loads: Vec::new(),
            engine: Vec::new(),
            split: SplitCaps::default(),
            allowed_flags: None,
        }
    }

    fn placement(name: &str, nodes: &[&str], bytes: u64) -> Placement {
        Placement {
            on_demand: false,
            placed_at_unix_ms: 0,
            copy_if_missing: false,
            oom_kills: Vec::new(),
            held: None,
            learned_bytes: 0,
            name: name.to_owned(),
            role: "speed".into(),
            model: "m".into(),
            model_id: "m.gguf".into(),
            pinned_node: None,
            options: PlacementOptions {
                context_size: 512,
                parallel: 1,
                cache_type_k: "f16".into(),
                cache_type_v: "f16".into(),
                extra_flags: Vec::new(),
                allow_context_over_trained: false,
            },
            estimate_bytes: bytes,
            priority: 0,
            replicas: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| Replica {
                    index: u32::try_from(i).unwrap_or(0),
                    node: (*n).to_owned(),
                    generation: 1,
                })
                .collect(),
            paused: false,
            split: None,
        }
    }

    fn nonzero(m: HashMap<String, u64>) -> BTreeMap<String, u64> {
        m.into_iter().filter(|(_, v)| *v > 0).collect()
    }

    #[test]
    fn taking_evicted_placements_off_matches_adding_up_the_rest() {
        let a = placement("a", &["n1", "n2"], 10);
        let observed_a0 = a.key(&a.replicas[0]).request_id();
        let nodes = [node("n1", &[(observed_a0.as_str(), 7)]), node("n2", &[])];
        let mut split = placement("s", &[], 0);
        split.split = Some(SplitPlan {
            shares: vec![
                SplitShare {
                    node: "n1".into(),
                    total_bytes: 30,
                    ..SplitShare::default()
                },
                SplitShare {
                    node: "n2".into(),
                    total_bytes: 20,
                    host: true,
                    ..SplitShare::default()
                },
            ],
            traffic_bytes_per_token: 0,
            notes: Vec::new(),
        });
        let placements = vec![a, placement("b", &["n2"], 5), split];
        let used = used_by_node(&nodes, &placements, &[]);
        assert_eq!(
            used.get("n1"),
            Some(&37),
            "observed 7 for a's replica, 30 split"
        );
        for skip in [
            &[][..],
            &["a"],
            &["b"],
            &["s"],
            &["a", "s"],
            &["a", "b", "s"],
        ] {
            assert_eq!(
                nonzero(used_without(&used, &nodes, &placements, skip)),
                nonzero(used_by_node(&nodes, &placements, skip)),
                "skip {skip:?}"
            );
        }
    }
}
