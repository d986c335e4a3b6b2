//! Placement as a pure function: [`place`] takes the cluster as the
//! controller sees it ([`NodeState`]s), the placements already made, the
//! catalog and a [`PlaceRequest`], and returns a [`Decision`] that carries
//! its per-node arithmetic whether it is accepted or refused. No I/O, no
//! clock: unit-testable and benchmarkable.
//!
//! The rule, per node: `free = usable − reserve − used`, where `used` sums
//! what the node's placements use (the observed buffers of a running
//! instance when the agent reported them, else the placement's estimate);
//! a replica fits when `estimate + margin ≤ free`, with
//! `margin = max(MARGIN_MIN, estimate × MARGIN_PERCENT / 100)`.
//!
//! The estimate of a new replica prefers what a real load logged: when any
//! node reported an instance of the same model loaded with the same settings
//! ([`NodeState::loads`]), its figures replace the formula's, figure by
//! figure ([`estimate_with_observed`]), and the decision says for each
//! figure whether it was "observed on <node>" or came from the "formula".
//!
//! Context: the request's, else the catalog default; when nothing fits, the
//! context is halved down to the catalog floor, and at each size the KV
//! cache is tried at the catalog's types and then at `q8_0`. A model that
//! does not fit an empty candidate node even at the floor with `q8_0` is
//! refused as larger than any node, with the numbers and the real options.
//! Eviction of lower-priority placements is considered only after every
//! setting failed without it, and done only when the request allows it.

use crate::estimate::{
    CacheType, EstimateOptions, EstimateSource, FlashAttn, ObservedRecord, SourcedEstimate,
    estimate_with_observed, observed::Sources,
};
use proto::domain::{
    CatalogEntry, InstanceOptions, ModelParams, Placement, PlacementOptions, Replica,
};
use proto::units;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// Smallest safety margin on top of an estimate.
pub const MARGIN_MIN: u64 = 512 * 1024 * 1024;
/// Margin as a percentage of the estimate.
pub const MARGIN_PERCENT: u64 = 3;
/// The KV cache type tried after the catalog's.
pub const FALLBACK_CACHE: &str = "q8_0";

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
    /// What splitting a model across nodes needs to know of it.
    pub split: SplitCaps,
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

/// What the user asks for.
#[derive(Debug, Clone, Default)]
pub struct PlaceRequest {
    /// Role the node must have (ignored with `any_node`).
    pub role: String,
    /// Catalog name.
    pub model: String,
    /// Context; default the catalog's.
    pub context: Option<u32>,
    /// Pin to this node.
    pub node: Option<String>,
    /// Replicas (0 counts as 1).
    pub replicas: u32,
    /// Allow evicting lower-priority placements.
    pub evict: bool,
    /// Ignore the role.
    pub any_node: bool,
    /// Replicas on as few nodes as possible (default: spread).
    pub pack: bool,
    /// Placement name; default the model name made unique.
    pub name: Option<String>,
    /// Hold memory without starting.
    pub paused: bool,
    /// When no single node fits, split across nodes (llama.cpp RPC).
    pub split: bool,
    /// Split across exactly this many nodes (≥ 2) even when one fits.
    pub split_across: Option<u32>,
}

/// The arithmetic on one node: the domain type, shared with haloctl.
pub use proto::domain::NodeFit;

/// The estimate of one replica at the settings shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Breakdown {
    /// Weights.
    pub weights_bytes: u64,
    /// KV cache and recurrent state.
    pub kv_bytes: u64,
    /// Compute buffer.
    pub compute_bytes: u64,
    /// Logits buffer.
    pub output_bytes: u64,
    /// Sum.
    pub total_bytes: u64,
    /// Context.
    pub context_size: u32,
    /// `-ctk`
    pub cache_type_k: String,
    /// `-ctv`
    pub cache_type_v: String,
    /// Where each figure came from.
    pub sources: Sources,
    /// The node whose real load the observed figures come from.
    pub observed_on: Option<String>,
    /// What the formula alone gives, for comparison.
    pub formula_total_bytes: u64,
}

impl Breakdown {
    fn tag(&self, s: EstimateSource) -> String {
        match (s, &self.observed_on) {
            (EstimateSource::Observed, Some(n)) => format!("observed on {n}"),
            (EstimateSource::Observed, None) => "observed".to_owned(),
            (EstimateSource::Formula, _) => "formula".to_owned(),
        }
    }

    fn figures(&self) -> [(&'static str, u64, EstimateSource); 4] {
        [
            ("weights", self.weights_bytes, self.sources.weights),
            ("KV", self.kv_bytes, self.sources.kv),
            ("compute", self.compute_bytes, self.sources.compute),
            ("output", self.output_bytes, self.sources.output),
        ]
    }

    /// Whether any figure came from a real load.
    pub fn observed(&self) -> bool {
        self.figures()
            .iter()
            .any(|(_, _, s)| *s == EstimateSource::Observed)
    }

    /// The estimate's source in a few words: "formula", "observed on
    /// halo1", or "observed on halo1 (output: formula)" when mixed.
    pub fn source(&self) -> String {
        if !self.observed() {
            return "formula".to_owned();
        }
        let from_formula: Vec<&str> = self
            .figures()
            .iter()
            .filter(|(_, _, s)| *s == EstimateSource::Formula)
            .map(|(n, _, _)| *n)
            .collect();
        let on = self.tag(EstimateSource::Observed);
        if from_formula.is_empty() {
            on
        } else {
            format!("{on} ({}: formula)", from_formula.join(", "))
        }
    }

    /// "weights 1.00 GiB (observed on halo1) + KV … (formula) + …": each
    /// figure with its source.
    pub fn sourced_terms(&self) -> String {
        self.figures()
            .iter()
            .map(|(n, b, s)| format!("{n} {} ({})", units::bytes(*b), self.tag(*s)))
            .collect::<Vec<_>>()
            .join(" + ")
    }

    /// The figures of `s` at context `ctx` with `ctk`/`ctv` caches, the
    /// observed ones from a load on node `on`.
    pub fn from_sourced(
        s: &SourcedEstimate,
        on: Option<String>,
        ctx: u32,
        ctk: &str,
        ctv: &str,
    ) -> Self {
        Breakdown {
            weights_bytes: s.estimate.weights_bytes,
            kv_bytes: s.estimate.kv_bytes,
            compute_bytes: s.estimate.compute_bytes,
            output_bytes: s.estimate.output_bytes,
            total_bytes: s.estimate.total_bytes,
            context_size: ctx,
            cache_type_k: ctk.to_owned(),
            cache_type_v: ctv.to_owned(),
            sources: s.sources,
            observed_on: on,
            formula_total_bytes: s.formula.total_bytes,
        }
    }
}

/// What placement decided.
#[derive(Debug, Clone)]
pub struct Decision {
    /// Whether the request can be carried out.
    pub accepted: bool,
    /// The placement to record (when accepted).
    pub placement: Option<Placement>,
    /// Per-node arithmetic.
    pub fits: Vec<NodeFit>,
    /// Placements removed, or (refused) that would have to be.
    pub evicted: Vec<String>,
    /// The decision in words.
    pub explanation: Vec<String>,
    /// The estimate at the chosen (or smallest tried) settings.
    pub estimate: Option<Breakdown>,
}

impl Decision {
    fn refused(explanation: Vec<String>) -> Decision {
        Decision {
            accepted: false,
            placement: None,
            fits: Vec::new(),
            evicted: Vec::new(),
            explanation,
            estimate: None,
        }
    }
}

/// One setting tried: context and cache types.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Attempt {
    ctx: u32,
    ctk: String,
    ctv: String,
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

/// The estimate of `model_id` under `opts`, from the first node (in
/// order) with a real load of that model at the same settings, else the
/// formula's; with the name of that node.
pub fn sized_estimate(
    nodes: &[NodeState],
    model_id: &str,
    params: &ModelParams,
    opts: &EstimateOptions,
) -> (SourcedEstimate, Option<String>) {
    for n in nodes {
        if !n.loads.iter().any(|r| r.model_id == model_id) {
            continue;
        }
        let s = estimate_with_observed(model_id, params, opts, &n.loads);
        if s.source == EstimateSource::Observed {
            return (s, Some(n.name.clone()));
        }
    }
    (estimate_with_observed(model_id, params, opts, &[]), None)
}

/// The margin on top of an estimate.
pub fn margin(total: u64) -> u64 {
    MARGIN_MIN.max(total * MARGIN_PERCENT / 100)
}

/// Bytes a placement's replica uses on its node: observed when reported.
fn replica_use(p: &Placement, r: &Replica, node: Option<&NodeState>) -> u64 {
    match node {
        // The request id is built only when the node reported something.
        Some(n) if !n.observed.is_empty() => n
            .observed
            .get(&p.key(r).request_id())
            .copied()
            .unwrap_or(p.estimate_bytes),
        _ => p.estimate_bytes,
    }
}

/// What `p` uses on each of its nodes.
fn placement_use<'a>(p: &'a Placement, by_name: &HashMap<&str, &NodeState>) -> Vec<(&'a str, u64)> {
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
fn used_without(
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

/// A unique placement name for `base`.
fn unique_name(base: &str, placements: &[Placement]) -> String {
    if !placements.iter().any(|p| p.name == base) {
        return base.to_owned();
    }
    (2..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !placements.iter().any(|p| &p.name == n))
        .unwrap_or_else(|| base.to_owned())
}

/// Decides where `req` runs. Pure: same inputs, same decision.
pub fn place(
    nodes: &[NodeState],
    placements: &[Placement],
    catalog: &BTreeMap<String, CatalogEntry>,
    req: &PlaceRequest,
) -> Decision {
    let Some(entry) = catalog.get(&req.model) else {
        let names: Vec<&str> = catalog.keys().map(String::as_str).collect();
        return Decision::refused(vec![format!(
            "`{}` is not in the catalog (it has: {})",
            req.model,
            names.join(", ")
        )]);
    };
    let name = match &req.name {
        Some(n) if placements.iter().any(|p| &p.name == n) => {
            return Decision::refused(vec![format!("a placement named `{n}` exists")]);
        }
        Some(n) => n.clone(),
        None => unique_name(&entry.name, placements),
    };
    let replicas = req.replicas.max(1);
    let parallel = entry.parallel.max(1);

    // Candidates, and why the others are not.
    let mut fits: Vec<NodeFit> = Vec::with_capacity(nodes.len());
    let mut candidates: Vec<(usize, Arc<ModelParams>)> = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let reason = if req.node.as_ref().is_some_and(|p| p != &n.name) {
            Some("not the pinned node".to_owned())
        } else if n.liveness != Liveness::Ready {
            Some(format!("node is {:?}", n.liveness).to_lowercase())
        } else if !req.any_node && !n.roles.iter().any(|r| r == &req.role) {
            Some(format!(
                "no `{}` role (has: {})",
                req.role,
                n.roles.join(", ")
            ))
        } else if n.usable_bytes.is_none() {
            Some("usable memory unknown".to_owned())
        } else {
            None
        };
        let params = n.models.get(&entry.model_id);
        let reason = reason.or_else(|| {
            params
                .is_none()
                .then(|| format!("does not hold `{}`", entry.model_id))
        });
        match (reason, params) {
            (None, Some(p)) => candidates.push((i, p.clone())),
            (reason, _) => fits.push(NodeFit {
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
                reason: reason.unwrap_or_default(),
            }),
        }
    }
    if let Some(pin) = &req.node
        && !nodes.iter().any(|n| &n.name == pin)
    {
        return Decision::refused(vec![format!("no node named `{pin}`")]);
    }
    if candidates.is_empty() {
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
        return d;
    }

    // The settings ladder.
    let ctx0 = req.context.unwrap_or(entry.default_context).max(1);
    let floor = entry.min_context.min(ctx0).max(1);
    let mut ctxs = vec![ctx0];
    let mut c = ctx0;
    while c / 2 >= floor {
        c /= 2;
        ctxs.push(c);
    }
    if *ctxs.last().unwrap_or(&ctx0) != floor {
        ctxs.push(floor);
    }
    let mut attempts = Vec::new();
    for &ctx in &ctxs {
        attempts.push(Attempt {
            ctx,
            ctk: entry.cache_type_k.clone(),
            ctv: entry.cache_type_v.clone(),
        });
        if entry.cache_type_k != FALLBACK_CACHE || entry.cache_type_v != FALLBACK_CACHE {
            attempts.push(Attempt {
                ctx,
                ctk: FALLBACK_CACHE.to_owned(),
                ctv: FALLBACK_CACHE.to_owned(),
            });
        }
    }

    // Estimates per (attempt, params): nodes holding the same file share one.
    let mut memo: HashMap<(usize, *const ModelParams), Breakdown> = HashMap::new();
    let mut est = |a: usize, p: &Arc<ModelParams>| -> Breakdown {
        memo.entry((a, Arc::as_ptr(p)))
            .or_insert_with(|| {
                let at = &attempts[a];
                let opts = estimate_options(at.ctx, parallel, &at.ctk, &at.ctv);
                let (s, on) = sized_estimate(nodes, &entry.model_id, p, &opts);
                Breakdown::from_sourced(&s, on, at.ctx, &at.ctk, &at.ctv)
            })
            .clone()
    };

    let used = used_by_node(nodes, placements, &[]);
    let cap = |i: usize| nodes[i].capacity();
    let free = |i: usize, used: &HashMap<String, u64>| nodes[i].free(used);

    let split_ctx = SplitCtx {
        nodes,
        entry,
        req,
        name: &name,
        candidates: &candidates,
        attempts: attempts
            .iter()
            .map(|a| (a.ctx, a.ctk.clone(), a.ctv.clone()))
            .collect(),
        parallel,
        used: &used,
        others: fits.clone(),
    };

    if let Some(k) = req.split_across {
        let d = Decision::refused(vec![format!(
            "refused: `{}` does not fit split across {k} nodes",
            entry.name
        )]);
        return with_split(d, &split_ctx, &format!("{k} nodes were asked for"));
    }

    // Larger than any node: even the smallest setting on an empty node.
    let last = attempts.len() - 1;
    let biggest = candidates
        .iter()
        .map(|(i, p)| {
            let b = est(last, p);
            (cap(*i), b.total_bytes + margin(b.total_bytes), *i)
        })
        .max_by_key(|(c, _, _)| *c);
    if let Some((cap_max, need_min, _)) = biggest
        && candidates.iter().all(|(i, p)| {
            let b = est(last, p);
            b.total_bytes + margin(b.total_bytes) > cap(*i)
        })
    {
        let b = est(last, &candidates[0].1);
        let mut d = Decision::refused(vec![
            format!(
                "refused: `{}` needs {} ({}, plus margin {}) \
                 even at the floor context {} with {} KV cache",
                entry.name,
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
            "options: a smaller quantization of the model whose weights fit one node, \
             or splitting it across nodes (llama.cpp RPC: `--split`)"
                .to_owned(),
        ]);
        d.estimate = Some(b);
        for (i, p) in &candidates {
            let b = est(last, p);
            let m = margin(b.total_bytes);
            d.fits.push(fit_row(
                &nodes[*i],
                cap(*i),
                &used,
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
        d.fits.extend(fits);
        return with_split(d, &split_ctx, "the model is larger than any single node");
    }

    // Try each setting without eviction, then with.
    let order_spread = !req.pack;
    let assign = |a: usize,
                  est: &mut dyn FnMut(usize, &Arc<ModelParams>) -> Breakdown,
                  used: &HashMap<String, u64>|
     -> Option<Vec<usize>> {
        let mut free_now: Vec<(usize, u64, u64, u32)> = candidates
            .iter()
            .map(|(i, p)| {
                let b = est(a, p);
                (
                    *i,
                    free(*i, used),
                    b.total_bytes + margin(b.total_bytes),
                    0u32,
                )
            })
            .collect();
        let mut chosen = Vec::new();
        for _ in 0..replicas {
            let pick = free_now
                .iter_mut()
                .filter(|(_, f, need, _)| need <= f)
                .min_by(|x, y| {
                    if order_spread {
                        // Fewest replicas here, then most free.
                        x.3.cmp(&y.3).then(y.1.cmp(&x.1))
                    } else {
                        // Most replicas here, then least free (best fit).
                        y.3.cmp(&x.3).then(x.1.cmp(&y.1))
                    }
                })?;
            pick.1 -= pick.2;
            pick.3 += 1;
            chosen.push(pick.0);
        }
        Some(chosen)
    };

    let mut explanation = Vec::new();
    let mut chosen: Option<(usize, Vec<usize>, Vec<String>)> = None;
    for a in 0..attempts.len() {
        if let Some(c) = assign(a, &mut est, &used) {
            chosen = Some((a, c, Vec::new()));
            break;
        }
    }
    if chosen.is_none() {
        // Eviction: per candidate node, the lowest-priority placements on
        // it until the replica fits; the node needing the fewest wins.
        let by_name: HashMap<&str, &NodeState> =
            nodes.iter().map(|n| (n.name.as_str(), n)).collect();
        let mut on_node: HashMap<&str, Vec<(&Placement, u64)>> = HashMap::new();
        for p in placements.iter().filter(|p| p.priority < entry.priority) {
            for r in &p.replicas {
                let u = replica_use(p, r, by_name.get(r.node.as_str()).copied());
                on_node.entry(r.node.as_str()).or_default().push((p, u));
            }
        }
        for v in on_node.values_mut() {
            v.sort_by(|x, y| {
                x.0.priority
                    .cmp(&y.0.priority)
                    .then(x.0.name.cmp(&y.0.name))
            });
        }
        for a in 0..attempts.len() {
            let mut best: Option<(usize, u64, Vec<String>)> = None;
            for (i, p) in &candidates {
                let b = est(a, p);
                let need = b.total_bytes + margin(b.total_bytes);
                let mut avail = free(*i, &used);
                let mut victims = Vec::new();
                for (v, u) in on_node
                    .get(nodes[*i].name.as_str())
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
            if let Some((_, _, victims)) = best {
                let skip: Vec<&str> = victims.iter().map(String::as_str).collect();
                let used_after = used_without(&used, nodes, placements, &skip);
                if let Some(c) = assign(a, &mut est, &used_after) {
                    chosen = Some((a, c, victims));
                    break;
                }
            }
        }
    }

    let Some((a, chosen_nodes, evicted)) = chosen else {
        let b = est(last, &candidates[0].1);
        let mut d = Decision::refused(vec![format!(
            "refused: {} replica(s) of `{}` do not fit at any setting from context {} ({} KV) \
             down to {} ({} KV), and evicting lower-priority placements would not help",
            replicas, entry.name, ctx0, entry.cache_type_k, floor, attempts[last].ctk
        )]);
        for (i, p) in &candidates {
            let b = est(last, p);
            let m = margin(b.total_bytes);
            let f = free(*i, &used);
            d.fits.push(fit_row(
                &nodes[*i],
                cap(*i),
                &used,
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
        d.fits.extend(fits);
        d.estimate = Some(b);
        return with_split(d, &split_ctx, "no single node has room for it");
    };

    let at = &attempts[a];
    if a > 0 {
        explanation.push(format!(
            "context {} with {} KV did not fit; chose context {} with {}/{} KV (the largest setting that fits)",
            ctx0, entry.cache_type_k, at.ctx, at.ctk, at.ctv
        ));
    }
    let used_after = if evicted.is_empty() {
        used.clone()
    } else {
        let skip: Vec<&str> = evicted.iter().map(String::as_str).collect();
        used_without(&used, nodes, placements, &skip)
    };
    let mut per_node: HashMap<usize, u32> = HashMap::new();
    for &i in &chosen_nodes {
        *per_node.entry(i).or_default() += 1;
    }
    let mut d = Decision::refused(Vec::new());
    for (i, p) in &candidates {
        let b = est(a, p);
        let m = margin(b.total_bytes);
        let f = free(*i, &used_after);
        let k = per_node.get(i).copied().unwrap_or(0);
        let need = b.total_bytes + m;
        let reason = if k > 0 {
            format!(
                "{k} replica(s): {} usable − {} reserve − {} used = {} free ≥ {} × {} needed",
                units::bytes(cap(*i) + nodes[*i].reserve_bytes),
                units::bytes(nodes[*i].reserve_bytes),
                units::bytes(used_after.get(&nodes[*i].name).copied().unwrap_or(0)),
                units::bytes(f),
                k,
                units::bytes(need)
            )
        } else if need > f {
            format!("needs {} > {} free", units::bytes(need), units::bytes(f))
        } else {
            "fits, not chosen".to_owned()
        };
        d.fits.push(fit_row(
            &nodes[*i],
            cap(*i),
            &used_after,
            &b,
            m,
            k,
            need <= f,
            reason,
        ));
    }
    d.fits.extend(fits);
    let b = est(a, &candidates[0].1);
    d.estimate = Some(b.clone());
    let placement = Placement {
        name: name.clone(),
        role: req.role.clone(),
        model: entry.name.clone(),
        model_id: entry.model_id.clone(),
        pinned_node: req.node.clone(),
        options: PlacementOptions {
            context_size: at.ctx,
            parallel,
            cache_type_k: at.ctk.clone(),
            cache_type_v: at.ctv.clone(),
            extra_flags: entry.extra_flags.clone(),
        },
        estimate_bytes: b.total_bytes,
        priority: entry.priority,
        replicas: chosen_nodes
            .iter()
            .enumerate()
            .map(|(k, &i)| Replica {
                index: u32::try_from(k).unwrap_or(u32::MAX),
                node: nodes[i].name.clone(),
                generation: 1,
            })
            .collect(),
        paused: req.paused,
        split: None,
    };
    let where_: Vec<String> = placement.replicas.iter().map(|r| r.node.clone()).collect();
    explanation.insert(
        0,
        format!(
            "placed `{}` as `{name}` on {}: {} per replica ({}) at context {}, {}/{} KV",
            entry.name,
            where_.join(", "),
            units::bytes(b.total_bytes),
            b.sourced_terms(),
            at.ctx,
            at.ctk,
            at.ctv
        ),
    );
    if b.observed() {
        explanation.push(format!(
            "sized by a real load of `{}` at these settings, {}: {} per replica where the formula gives {}",
            entry.model_id,
            b.source(),
            units::bytes(b.total_bytes),
            units::bytes(b.formula_total_bytes)
        ));
    }
    if !evicted.is_empty() {
        if req.evict {
            explanation.push(format!(
                "evicts lower-priority placement(s): {} (priority below {})",
                evicted.join(", "),
                entry.priority
            ));
        } else {
            d.explanation = vec![
                format!(
                    "refused: `{}` fits only after evicting lower-priority placement(s) {}; \
                     allow eviction to proceed",
                    entry.name,
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

/// What [`with_split`] needs of a refused request.
struct SplitCtx<'a> {
    nodes: &'a [NodeState],
    entry: &'a CatalogEntry,
    req: &'a PlaceRequest,
    name: &'a str,
    candidates: &'a [(usize, Arc<ModelParams>)],
    attempts: Vec<(u32, String, String)>,
    parallel: u32,
    used: &'a HashMap<String, u64>,
    /// Rows of the nodes that were not candidates.
    others: Vec<NodeFit>,
}

/// A refusal `d` for lack of room, turned into a split across nodes when
/// the request or the catalog allows one and it fits; otherwise `d` with a
/// line saying whether a split would help.
fn with_split(mut d: Decision, s: &SplitCtx<'_>, why: &str) -> Decision {
    let allowed = s.req.split || s.entry.allow_split || s.req.split_across.is_some();
    if s.req.node.is_some() || s.req.replicas > 1 {
        if allowed {
            d.explanation
                .push("a split runs one replica and is never pinned to a node".to_owned());
        }
        return d;
    }
    let choice = crate::split::choose(
        s.nodes,
        s.used,
        s.candidates,
        &s.attempts,
        s.parallel,
        s.req.split_across.map(|k| k as usize),
    );
    let c = match (choice, allowed) {
        (Ok(c), true) => c,
        (Ok(c), false) => {
            d.explanation.push(format!(
                "it fits split across {} with llama.cpp RPC at context {}: place it with --split                  (or set allow_split in the catalog); --dry-run shows the per-node plan",
                c.nodes().join(" + "),
                c.ctx
            ));
            return d;
        }
        (Err(lines), true) => {
            d.explanation
                .push("a split across nodes does not fit either:".to_owned());
            d.explanation.extend(lines);
            return d;
        }
        (Err(_), false) => return d,
    };
    let Some((_, params)) = s
        .candidates
        .iter()
        .find(|(i, _)| s.nodes[*i].name == c.host())
    else {
        return d;
    };
    let plan = c.plan(params, why);
    let e = &c.estimate;
    let entry = s.entry;
    let mut fits: Vec<NodeFit> = plan
        .shares
        .iter()
        .filter_map(|sh| {
            let n = s.nodes.iter().find(|n| n.name == sh.node)?;
            Some(NodeFit {
                node: sh.node.clone(),
                candidate: true,
                fits: true,
                usable_bytes: n.usable_bytes.unwrap_or(0),
                reserve_bytes: n.reserve_bytes,
                used_bytes: s.used.get(&sh.node).copied().unwrap_or(0),
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
    for (i, _) in s.candidates {
        let n = &s.nodes[*i];
        if !plan.shares.iter().any(|sh| sh.node == n.name) {
            let f = n.free(s.used);
            fits.push(NodeFit {
                node: n.name.clone(),
                candidate: true,
                fits: false,
                usable_bytes: n.usable_bytes.unwrap_or(0),
                reserve_bytes: n.reserve_bytes,
                used_bytes: s.used.get(&n.name).copied().unwrap_or(0),
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
    fits.extend(s.others.iter().cloned());
    let host = c.host().to_owned();
    let mut explanation = vec![format!(
        "placed `{}` as `{}` split across {} (host {host}) with llama.cpp RPC at context {}, {}/{} KV: {} in all",
        entry.name,
        s.name,
        c.nodes().join(" + "),
        c.ctx,
        c.ctk,
        c.ctv,
        units::bytes(e.total_bytes)
    )];
    explanation.extend(plan.notes.iter().cloned());
    let placement = Placement {
        name: s.name.to_owned(),
        role: s.req.role.clone(),
        model: entry.name.clone(),
        model_id: entry.model_id.clone(),
        pinned_node: None,
        options: PlacementOptions {
            context_size: c.ctx,
            parallel: s.parallel,
            cache_type_k: c.ctk.clone(),
            cache_type_v: c.ctv.clone(),
            extra_flags: entry.extra_flags.clone(),
        },
        estimate_bytes: e.total_bytes,
        priority: entry.priority,
        replicas: vec![Replica {
            index: 0,
            node: host,
            generation: 1,
        }],
        paused: s.req.paused,
        split: Some(plan),
    };
    Decision {
        accepted: true,
        placement: Some(placement),
        fits,
        evicted: Vec::new(),
        explanation,
        estimate: Some(Breakdown {
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
        }),
    }
}

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

/// What one replica of `p` needs on a node: the total of a real load of
/// its model at its settings when any node reported one (including the
/// replica's own instance on a lost node), else its recorded estimate.
fn replica_estimate(nodes: &[NodeState], p: &Placement) -> u64 {
    if !nodes
        .iter()
        .any(|n| n.loads.iter().any(|r| r.model_id == p.model_id))
    {
        return p.estimate_bytes;
    }
    let Some(params) = nodes.iter().find_map(|n| n.models.get(&p.model_id)) else {
        return p.estimate_bytes;
    };
    let o = &p.options;
    let opts = estimate_options(o.context_size, o.parallel, &o.cache_type_k, &o.cache_type_v);
    match sized_estimate(nodes, &p.model_id, params, &opts) {
        (s, Some(_)) => s.estimate.total_bytes,
        (_, None) => p.estimate_bytes,
    }
}

/// Where a replica of an existing placement can move when its node is
/// lost: a live node with the placement's role that holds the file and has
/// room for the replica's estimate (observed when a real load at its
/// settings was seen, else the placement's) plus margin, most free first.
/// The placement's options are kept. `Err` says why no node qualifies.
pub fn relocate(
    nodes: &[NodeState],
    placements: &[Placement],
    p: &Placement,
    replica: u32,
) -> Result<String, String> {
    let used = used_by_node(nodes, placements, &[]);
    let estimate = replica_estimate(nodes, p);
    let need = estimate + margin(estimate);
    let hosting: Vec<&str> = p
        .replicas
        .iter()
        .filter(|r| r.index != replica)
        .map(|r| r.node.as_str())
        .collect();
    let mut why = Vec::new();
    let mut best: Option<(u64, &str)> = None;
    for n in nodes {
        let reason = if n.liveness != Liveness::Ready {
            Some("not ready")
        } else if !p.role.is_empty() && !n.roles.iter().any(|r| r == &p.role) {
            Some("no such role")
        } else if !n.models.contains_key(&p.model_id) {
            Some("does not hold the file")
        } else {
            None
        };
        if let Some(r) = reason {
            why.push(format!("{}: {r}", n.name));
            continue;
        }
        let free = n.free(&used);
        if need > free {
            why.push(format!(
                "{}: needs {} > {} free",
                n.name,
                units::bytes(need),
                units::bytes(free)
            ));
            continue;
        }
        // Prefer a node without another replica of this placement.
        let score = free / 2
            + if hosting.contains(&n.name.as_str()) {
                0
            } else {
                u64::MAX / 2
            };
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, &n.name));
        }
    }
    best.map(|(_, n)| n.to_owned())
        .ok_or_else(|| why.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::domain::{PlacementOptions, SplitPlan, SplitShare};

    fn node(name: &str, observed: &[(&str, u64)]) -> NodeState {
        NodeState {
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
            split: SplitCaps::default(),
        }
    }

    fn placement(name: &str, nodes: &[&str], bytes: u64) -> Placement {
        Placement {
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
