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

mod candidates;
mod fallback;
mod ladder;
mod single;

pub use crate::nodes::{
    Liveness, MARGIN_MIN, MARGIN_PERCENT, NodeState, SplitCaps, estimate_options,
    instance_estimate_options, margin, used_by_node,
};

use crate::estimate::engine::{self, EngineCheck};
use crate::estimate::{
    EstimateOptions, EstimateSource, SourcedEstimate, estimate_with_observed, observed::Sources,
    rules,
};
use candidates::Candidates;
use fallback::with_split;
use ladder::{Estimates, Ladder};
use proto::domain::{CatalogEntry, ModelParams, Placement};
use proto::units::{self, now_unix_ms};
use std::collections::{BTreeMap, HashMap};

/// The KV cache type tried after the catalog's.
pub const FALLBACK_CACHE: &str = "q8_0";

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
    /// Allow a context above the model's trained context (also the
    /// catalog entry's `allow_context_over_trained`).
    pub allow_context_over_trained: bool,
    /// Nodes of the role that lack the file may be chosen, after those
    /// that hold it, when a live node holds it: the file is copied there
    /// first (also the catalog entry's `copy_if_missing`).
    pub copy: bool,
    /// The last measured copy rate between nodes, to say how long a copy
    /// takes.
    pub copy_rates: CopyRates,
}

/// Bytes per second of the last finished copy from one node (first) to
/// another (second).
pub type CopyRates = BTreeMap<(String, String), f64>;

/// The copy rate a decision assumes between two nodes no copy was
/// measured between: 100 MiB/s (a gigabit link is about 110 MiB/s).
pub const ASSUMED_COPY_RATE: f64 = 100.0 * 1024.0 * 1024.0;

/// "about 2 min at the measured 95.0 MiB/s": how long copying `bytes`
/// from `from` to `to` takes at the last measured rate between them, else
/// at [`ASSUMED_COPY_RATE`], saying which.
pub fn copy_time(rates: &CopyRates, from: &str, to: &str, bytes: u64) -> String {
    let (rate, how) = match rates.get(&(from.to_owned(), to.to_owned())) {
        Some(&r) if r > 0.0 => (r, "the measured"),
        _ => (ASSUMED_COPY_RATE, "an assumed"),
    };
    let secs = (bytes as f64 / rate).ceil() as u64;
    let took = if secs < 120 {
        format!("{} s", secs.max(1))
    } else {
        format!("{} min", secs.div_ceil(60))
    };
    format!("about {took} at {how} {}/s", units::bytes(rate as u64))
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
    /// The formula checked against llama.cpp's own projection on a node,
    /// when an agent answered.
    pub engine: Option<EngineCheck>,
    /// The total with llama.cpp's figures, when it answered.
    pub engine_total_bytes: Option<u64>,
    /// "estimate: generic rules for ARCH" for an architecture halo has no
    /// rules of its own for.
    pub generic_rules: Option<String>,
}

impl Breakdown {
    fn tag(&self, s: EstimateSource) -> String {
        match (s, &self.observed_on) {
            (EstimateSource::Observed, Some(n)) => format!("observed on {n}"),
            (EstimateSource::Observed, None) => "observed".to_owned(),
            (EstimateSource::Formula, _) => "formula".to_owned(),
            (EstimateSource::Engine, _) => match &self.engine {
                Some(c) => format!("llama.cpp on {}", c.node()),
                None => "llama.cpp".to_owned(),
            },
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

    /// Which estimate is used, in one word: `observed` when any figure
    /// came from a real load, else `engine` when any came from llama.cpp's
    /// projection, else `formula`.
    pub fn used(&self) -> &'static str {
        let any = |want: EstimateSource| self.figures().iter().any(|(_, _, s)| *s == want);
        if any(EstimateSource::Observed) {
            "observed"
        } else if any(EstimateSource::Engine) {
            "engine"
        } else {
            "formula"
        }
    }

    /// The estimate's source in a few words: "formula", "observed on
    /// halo1", "llama.cpp on halo1", or "observed on halo1 (output:
    /// formula)" when mixed.
    pub fn source(&self) -> String {
        let main = match self.used() {
            "observed" => EstimateSource::Observed,
            "engine" => EstimateSource::Engine,
            _ => return "formula".to_owned(),
        };
        let mut others: Vec<(String, Vec<&str>)> = Vec::new();
        for (n, _, s) in self.figures() {
            if s == main {
                continue;
            }
            let tag = self.tag(s);
            match others.iter_mut().find(|(t, _)| *t == tag) {
                Some((_, names)) => names.push(n),
                None => others.push((tag, vec![n])),
            }
        }
        let on = self.tag(main);
        if others.is_empty() {
            on
        } else {
            let rest: Vec<String> = others
                .iter()
                .map(|(t, names)| format!("{}: {t}", names.join(", ")))
                .collect();
            format!("{on} ({})", rest.join("; "))
        }
    }

    /// What the decision and the plan say about the estimate: the generic
    /// rules note and the check against llama.cpp.
    pub fn notes(&self) -> Vec<String> {
        let observed = self.used() == "observed";
        self.generic_rules
            .iter()
            .cloned()
            .chain(self.engine.iter().map(|c| c.note_when(observed)))
            .collect()
    }

    /// `self` with the check against llama.cpp (`check`, of the estimate
    /// `s`) and the note for an architecture without rules of its own.
    pub fn checked(mut self, s: &SourcedEstimate, check: Option<EngineCheck>, arch: &str) -> Self {
        self.engine_total_bytes = match &check {
            Some(EngineCheck::Compared(c)) => Some(engine::engine_total(s, c)),
            _ => None,
        };
        self.engine = check;
        self.generic_rules = rules::generic_rules_note(arch);
        self
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
            engine: None,
            engine_total_bytes: None,
            generic_rules: None,
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

/// The estimate of `model_id` under `opts` as [`sized_estimate`] gives
/// it, checked against llama.cpp's projection when a node's agent
/// answered for these settings (the first node with a projection, else
/// the first that said why it has none): llama.cpp's figures replace the
/// formula's when they disagree by more than 2 %.
pub fn sized_estimate_checked(
    nodes: &[NodeState],
    model_id: &str,
    params: &ModelParams,
    opts: &EstimateOptions,
) -> (SourcedEstimate, Option<String>, Option<EngineCheck>) {
    let (s, on) = sized_estimate(nodes, model_id, params, opts);
    let answers = || {
        nodes.iter().flat_map(|n| {
            n.engine
                .iter()
                .filter(|r| r.matches(model_id, opts))
                .map(move |r| (n.name.as_str(), r))
        })
    };
    let record = answers()
        .find(|(_, r)| r.answer.is_ok())
        .or_else(|| answers().next());
    let check = record.map(|(node, r)| EngineCheck::new(node, params, opts, &r.answer));
    let s = match &check {
        Some(c) => engine::apply(s, c),
        None => s,
    };
    (s, on, check)
}

/// The breakdown of [`sized_estimate_checked`] at context `ctx` with
/// `ctk`/`ctv` caches.
pub fn checked_breakdown(
    nodes: &[NodeState],
    model_id: &str,
    params: &ModelParams,
    opts: &EstimateOptions,
    (ctx, ctk, ctv): (u32, &str, &str),
) -> Breakdown {
    let (s, on, check) = sized_estimate_checked(nodes, model_id, params, opts);
    Breakdown::from_sourced(&s, on, ctx, ctk, ctv).checked(&s, check, &params.architecture)
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

/// What every step of a placement needs: the inputs, the catalog entry,
/// the candidates and what placements use now.
struct Request<'a> {
    nodes: &'a [NodeState],
    placements: &'a [Placement],
    entry: &'a CatalogEntry,
    req: &'a PlaceRequest,
    /// The placement's name.
    name: String,
    /// Replicas asked for (at least 1).
    replicas: u32,
    /// Slots per instance (at least 1).
    parallel: u32,
    candidates: Candidates,
    /// Rows of the nodes that are not candidates.
    others: Vec<NodeFit>,
    /// Candidates that lack the file, by node index: the node it would be
    /// copied from.
    copy_from: HashMap<usize, String>,
    /// What placements use per node now.
    used: HashMap<String, u64>,
}

impl Request<'_> {
    /// Whether the placement may run above the model's trained context.
    fn over_trained_allowed(&self) -> bool {
        self.req.allow_context_over_trained || self.entry.allow_context_over_trained
    }
}

/// The catalog entry `req` names and the placement's name; `Err` the
/// refusal when either is wrong.
fn entry_and_name<'a>(
    catalog: &'a BTreeMap<String, CatalogEntry>,
    placements: &[Placement],
    req: &PlaceRequest,
) -> Result<(&'a CatalogEntry, String), Box<Decision>> {
    let Some(entry) = catalog.get(&req.model) else {
        let names: Vec<&str> = catalog.keys().map(String::as_str).collect();
        return Err(Box::new(Decision::refused(vec![format!(
            "`{}` is not in the catalog (it has: {})",
            req.model,
            names.join(", ")
        )])));
    };
    let name = match &req.name {
        Some(n) if placements.iter().any(|p| &p.name == n) => {
            return Err(Box::new(Decision::refused(vec![format!(
                "a placement named `{n}` exists"
            )])));
        }
        Some(n) => n.clone(),
        None => unique_name(&entry.name, placements),
    };
    Ok((entry, name))
}

/// Decides where `req` runs. Pure: same inputs, same decision.
///
/// The steps: the catalog entry and name, the candidate nodes
/// ([`candidates`]), the settings ladder ([`ladder`]), then one node per
/// replica ([`single`]: without eviction, then with it) and, when that is
/// refused for lack of room, a split across nodes ([`fallback`]).
pub fn place(
    nodes: &[NodeState],
    placements: &[Placement],
    catalog: &BTreeMap<String, CatalogEntry>,
    req: &PlaceRequest,
) -> Decision {
    let (entry, name) = match entry_and_name(catalog, placements, req) {
        Ok(v) => v,
        Err(d) => return *d,
    };
    let (candidates, others, copy_from) = match candidates::candidates(nodes, entry, req) {
        Ok(v) => v,
        Err(d) => return *d,
    };
    if let Err(d) = candidates::context_bounds(entry, req, &candidates) {
        return *d;
    }
    let ladder = Ladder::new(entry, req);
    let r = Request {
        nodes,
        placements,
        entry,
        req,
        name,
        replicas: req.replicas.max(1),
        parallel: entry.parallel.max(1),
        candidates,
        others,
        copy_from,
        used: used_by_node(nodes, placements, &[]),
    };
    let mut est = Estimates::new(nodes, &entry.model_id, r.parallel, &ladder.attempts);
    let mut d = decide(&r, &ladder, &mut est);
    if let Some(b) = &d.estimate {
        d.explanation.extend(b.notes());
    }
    d
}

/// [`place`]'s steps after the ladder.
fn decide(r: &Request<'_>, ladder: &Ladder, est: &mut Estimates<'_>) -> Decision {
    let (entry, req) = (r.entry, r.req);

    if let Some(k) = req.split_across {
        let d = Decision::refused(vec![if r.candidates.len() < 2 {
            format!(
                "refused: `{}` cannot be split across {k} nodes: {} live node(s) of the role hold `{}`",
                entry.name,
                r.candidates.len(),
                entry.model_id
            )
        } else {
            format!(
                "refused: `{}` does not fit split across {k} nodes",
                entry.name
            )
        }]);
        return with_split(d, r, ladder, &format!("{k} nodes were asked for"));
    }
    if let Some(d) = single::larger_than_any(r, ladder, est) {
        return with_split(d, r, ladder, "the model is larger than any single node");
    }
    match single::choose(r, ladder, est) {
        Some(chosen) => single::decide(r, ladder, est, chosen),
        None => {
            let d = single::no_room(r, ladder, est);
            with_split(d, r, ladder, "no single node has room for it")
        }
    }
}

/// What one replica of `p` needs on a node: the total of a real load of
/// its model at its settings when any node reported one (including the
/// replica's own instance on a lost node), else its recorded estimate;
/// never less than what a replica was seen to use when the kernel killed
/// it for lack of memory.
fn replica_estimate(nodes: &[NodeState], p: &Placement) -> u64 {
    replica_formula(nodes, p).max(p.learned_bytes)
}

fn replica_formula(nodes: &[NodeState], p: &Placement) -> u64 {
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

/// How long no replica of a placement is started again on a node where
/// one was killed for lack of memory (whatever the arithmetic says: the
/// node may hold more than halo's books show).
pub const OOM_COOLDOWN_MS: u64 = 5 * 60 * 1000;

/// Why `node` is avoided for `p`: a replica was killed there for lack of
/// memory within [`OOM_COOLDOWN_MS`].
fn recent_oom(p: &Placement, node: &str, now_ms: u64) -> Option<String> {
    let k = p
        .oom_kills
        .iter()
        .find(|k| k.node == node && now_ms.saturating_sub(k.at_unix_ms) < OOM_COOLDOWN_MS)?;
    Some(format!(
        "a replica was killed for lack of memory here {} s ago at {} (not retried here for {} min)",
        now_ms.saturating_sub(k.at_unix_ms) / 1000,
        units::bytes(k.used_bytes),
        OOM_COOLDOWN_MS / 60_000
    ))
}

/// Where a replica of an existing placement can move when its node is
/// lost: a live node with the placement's role that holds the file and has
/// room for the replica's estimate (observed when a real load at its
/// settings was seen, else the placement's) plus margin, most free first.
/// The placement's options are kept; a pinned placement stays on its
/// node; a node where one of its replicas was killed for lack of memory
/// recently is avoided. `Err` says why no node qualifies.
pub fn relocate(
    nodes: &[NodeState],
    placements: &[Placement],
    p: &Placement,
    replica: u32,
) -> Result<String, String> {
    relocate_avoiding(nodes, placements, p, replica, &[])
}

/// [`relocate`], never onto a node in `avoid` (each with why). A placement
/// with `copy_if_missing` may go to a node that lacks the file when another
/// live node holds it (nodes that hold it come first).
pub fn relocate_avoiding(
    nodes: &[NodeState],
    placements: &[Placement],
    p: &Placement,
    replica: u32,
    avoid: &[(String, String)],
) -> Result<String, String> {
    let held_by = |name: &str| {
        nodes.iter().any(|o| {
            o.name != name && o.liveness == Liveness::Ready && o.models.contains_key(&p.model_id)
        })
    };
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
            Some("not ready".to_owned())
        } else if p.pinned_node.as_ref().is_some_and(|pin| pin != &n.name) {
            Some("not the node it is pinned to".to_owned())
        } else if n.pressure.is_some() {
            Some("under memory pressure".to_owned())
        } else if !p.role.is_empty() && !n.roles.iter().any(|r| r == &p.role) {
            Some("no such role".to_owned())
        } else if let Some((_, why)) = avoid.iter().find(|(a, _)| a == &n.name) {
            Some(why.clone())
        } else if !n.models.contains_key(&p.model_id) && !p.copy_if_missing {
            Some("does not hold the file".to_owned())
        } else if !n.models.contains_key(&p.model_id) && !held_by(&n.name) {
            Some("does not hold the file, and no other live node does to copy it".to_owned())
        } else {
            recent_oom(p, &n.name, now_unix_ms())
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
        // Prefer a node without another replica of this placement, then
        // one that holds the file (no copy first), then the most free.
        let score = free / 4
            + if hosting.contains(&n.name.as_str()) {
                0
            } else {
                u64::MAX / 2
            }
            + if n.models.contains_key(&p.model_id) {
                u64::MAX / 4
            } else {
                0
            };
        if best.is_none_or(|(s, _)| score > s) {
            best = Some((score, &n.name));
        }
    }
    best.map(|(_, n)| n.to_owned())
        .ok_or_else(|| why.join("; "))
}
