//! The commands that ask the controller and print what it says: `nodes`,
//! `models`, `plan CATALOG-NAME`, `status`, `endpoints`, `events`,
//! `unplace`. Each has a JSON view (the `-o json` field names below are
//! stable) and a table built by a pure `render_*` function, so the tables
//! are snapshot-tested from fixed inputs.

use crate::Failure;
use crate::cli::{EndpointsArgs, EventsArgs, ListArgs, LogsArgs, PlanArgs, UnplaceArgs};
use crate::client::Target;
use crate::output::{Format, Table, bytes, cert_expiry, cert_warning, print, print_json};
use proto::domain::{
    EditorMode, InstanceState, NodeStatus, ObservedBuffers, ReplicaKey, SplitPlan,
};
use proto::v1;
use serde::Serialize;

/// `haloctl nodes -o json`: one object per node.
#[derive(Debug, Serialize, PartialEq)]
pub struct NodeJson {
    /// Node name.
    pub name: String,
    /// Roles placement matches on.
    pub roles: Vec<String>,
    /// `ready`, `unreachable`, `lost` or `unknown`.
    pub status: String,
    /// The agent's gRPC address.
    pub agent_address: String,
    /// Memory a model may use on the node (absent when unknown).
    pub usable_bytes: Option<u64>,
    /// Kept back from placement.
    pub reserve_bytes: u64,
    /// What halo's placements on the node are counted as using.
    pub halo_bytes: u64,
    /// usable − reserve − halo (absent when usable is unknown).
    pub free_bytes: Option<u64>,
    /// llama-server instances the agent reports.
    pub instances: usize,
    /// Milliseconds since the agent was last heard from.
    pub silent_for_ms: u64,
    /// When the certificate the agent serves expires, Unix seconds (absent
    /// for a plaintext agent or one not heard from).
    pub cert_not_after_unix: Option<i64>,
    /// The node's real free memory (`MemAvailable`), whoever uses the rest.
    pub available_bytes: Option<u64>,
    /// Memory PSI `some avg10`, percent.
    pub psi_some_avg10: Option<f64>,
    /// Why the node is under memory pressure (and what grew), when it is:
    /// nothing new is placed there.
    pub pressure: Option<String>,
}

/// `haloctl models -o json`: one object per catalog entry.
#[derive(Debug, Serialize, PartialEq)]
pub struct ModelJson {
    /// Catalog name (what `place` takes).
    pub name: String,
    /// File id on the agents (path relative to a model directory).
    pub model_id: String,
    /// Size of the file (all parts), 0 when no node reports it.
    pub file_size_bytes: u64,
    /// GGUF architecture, when a node reports the file.
    pub architecture: Option<String>,
    /// Quantization, when known.
    pub quantization: Option<String>,
    /// Parameters, when known.
    pub parameter_count: Option<u64>,
    /// Context placement asks for by default.
    pub default_context: u32,
    /// Smallest context placement falls back to.
    pub min_context: u32,
    /// Editor modes served.
    pub modes: Vec<String>,
    /// Nodes whose agents hold the file.
    pub nodes: Vec<String>,
    /// Measured speed per node (`haloctl bench`): the newest kept result
    /// of the setup that runs now, else the newest kept one, saying what
    /// differs.
    pub speed: Vec<SpeedJson>,
    /// Copies of the file in flight (`haloctl models copy`).
    pub copies: Vec<CopyJson>,
    /// Role of the nodes it belongs on (on-demand loads, `models copy
    /// --all-roles`); empty: any node.
    pub role: String,
    /// Placement may choose a node that lacks the file and copy it there
    /// first.
    pub copy_if_missing: bool,
}

/// A copy of a model's file in flight.
#[derive(Debug, Serialize, PartialEq)]
pub struct CopyJson {
    /// Sending node.
    pub from_node: String,
    /// Receiving node.
    pub to_node: String,
    /// Bytes in place on the receiver.
    pub bytes_done: u64,
    /// Bytes of the whole file.
    pub bytes_total: u64,
    /// Bytes per second so far, when known.
    pub bytes_per_sec: Option<f64>,
    /// Seconds left at that rate, when known.
    pub secs_left: Option<u64>,
    /// The line the table prints.
    #[serde(skip)]
    pub line: String,
}

/// A model's measured speed on one node, from one kept bench result.
#[derive(Debug, Serialize, PartialEq)]
pub struct SpeedJson {
    /// Node measured.
    pub node: String,
    /// Prompt processing tokens/s (median) at the point shown.
    pub pp_tokens_per_second: f64,
    /// Generation tokens/s (median) at the point shown.
    pub tg_tokens_per_second: f64,
    /// The point shown: the result's smallest depth, fewest streams.
    pub depth: u32,
    /// Streams at that point.
    pub concurrency: u32,
    /// When it was measured, Unix ms.
    pub at_unix_ms: u64,
    /// llama.cpp build it was measured with.
    pub llama_build: String,
    /// What differs from how the model runs on the node now (`build`,
    /// `context`, …); empty when it is the same; `not placed` when it does
    /// not run there now.
    pub differs: Vec<String>,
}

/// `haloctl status -o json`: one object per placement.
#[derive(Debug, Serialize, PartialEq)]
pub struct PlacementJson {
    /// Placement name (what `unplace` takes).
    pub name: String,
    /// Catalog name.
    pub model: String,
    /// Role asked for.
    pub role: String,
    /// Node it is pinned to, if any.
    pub pinned_node: Option<String>,
    /// Context of each instance, tokens.
    pub context: u32,
    /// Estimate of one replica.
    pub estimate_bytes: u64,
    /// Memory held, no instance started.
    pub paused: bool,
    /// What a replica was seen to use when the kernel killed it for lack
    /// of memory (0: never); the placement is sized by at least this.
    pub learned_bytes: u64,
    /// Why the controller holds it (no instance runs), when it does.
    pub held: Option<String>,
    /// Placed by a request for an on-demand model: unloaded when idle.
    pub on_demand: bool,
    /// When a gateway last reported a request for its model, Unix ms.
    pub last_used_unix_ms: Option<u64>,
    /// When it unloads unless a request comes (on demand only), Unix ms.
    pub unload_at_unix_ms: Option<u64>,
    /// One per replica.
    pub replicas: Vec<ReplicaJson>,
}

/// One replica in `haloctl status -o json`.
#[derive(Debug, Serialize, PartialEq)]
pub struct ReplicaJson {
    /// Replica index.
    pub index: u32,
    /// Node it is placed on.
    pub node: String,
    /// `pending` (no instance reported yet), `starting`, `loading`,
    /// `ready`, `unhealthy` (stopped answering; being restarted),
    /// `stopping`, `stopped`, `failed`.
    pub state: String,
    /// What llama-server reported allocating at load (absent before).
    pub real_bytes: Option<u64>,
    /// Base URL of the instance's HTTP API (empty until it has one).
    pub endpoint: String,
    /// Restarts after crashes.
    pub restarts: u32,
    /// Why it last failed, if it did.
    pub last_error: String,
    /// Set when the model file it loaded was deleted or replaced while it
    /// runs: what changed (a restart is refused until it is started anew).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub model_file_changed: String,
    /// For a model split across nodes (llama.cpp RPC): the helpers'
    /// ggml-rpc-servers, in device order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub helpers: Vec<HelperJson>,
    /// The copy of the model file to its node it waits for (`place
    /// --copy`, the catalog's `copy_if_missing`), while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyJson>,
    /// Why the last copy of the file to its node failed, and when it is
    /// tried again.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub copy_failed: String,
}

/// One helper of a split: a ggml-rpc-server holding a share of the layers.
#[derive(Debug, Serialize, PartialEq)]
pub struct HelperJson {
    /// Node.
    pub node: String,
    /// Layers it holds.
    pub layers: u32,
    /// Instance state (`pending` before its agent reports it).
    pub state: String,
    /// `host:port` the host's llama-server connects to.
    pub endpoint: String,
}

/// `haloctl endpoints -o json`: one object per editor mode and instance.
#[derive(Debug, Serialize, PartialEq)]
pub struct EndpointJson {
    /// `ask`, `code`, `autocomplete`, `architect` or `debug`.
    pub mode: String,
    /// OpenAI-compatible base URL (ends in `/v1`).
    pub base_url: String,
    /// Model name to send.
    pub model: String,
    /// Placement serving it.
    pub placement: String,
    /// Node serving it.
    pub node: String,
    /// API key, sent as `Authorization: Bearer KEY`.
    pub api_key: String,
    /// Base URLs (ending in `/v1`) of the gateways the nodes serve, which
    /// stay the same when halo moves the model: send `mode` as the model
    /// with a user key (`haloctl keys create`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
}

/// `haloctl plan CATALOG-NAME -o json`: one object per node and context.
#[derive(Debug, Serialize, PartialEq)]
pub struct PlanRowJson {
    /// Node.
    pub node: String,
    /// Context, tokens.
    pub ctx: u32,
    /// Weights.
    pub weights_bytes: u64,
    /// KV cache.
    pub kv_bytes: u64,
    /// Compute buffers plus the output buffer.
    pub compute_bytes: u64,
    /// Everything.
    pub total_bytes: u64,
    /// usable − reserve − used on the node now.
    pub available_bytes: u64,
    /// Estimate plus margin fits in available.
    pub fits: bool,
    /// The arithmetic in words.
    pub reason: String,
    /// What halo's formula gives (total).
    pub formula_total_bytes: u64,
    /// What llama.cpp's own projection on the node gives (total, with
    /// halo's output buffer), when its agent answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub engine_total_bytes: Option<u64>,
    /// The figure used: `formula`, `engine` or `observed`.
    pub estimate_used: String,
    /// About the estimate: generic rules, the check against llama.cpp.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub estimate_notes: Vec<String>,
}

/// `haloctl events -o json`: one object per line.
#[derive(Debug, Serialize, PartialEq)]
pub struct EventJson {
    /// When, milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    /// `placed`, `unplaced`, `started`, `node_unreachable`, …
    pub kind: String,
    /// What it is about (a node or placement).
    pub subject: String,
    /// Details.
    pub message: String,
}

/// A wire node status's name (`unknown` for anything unspecified).
pub fn node_status(s: i32) -> &'static str {
    NodeStatus::from_wire(s).as_str()
}

/// A wire instance state's name (`unknown` for anything unspecified).
pub fn instance_state(s: i32) -> &'static str {
    InstanceState::from_wire(s).map_or("unknown", InstanceState::as_str)
}

/// A wire editor mode's name (`unspecified` when it names none).
pub fn mode(m: i32) -> &'static str {
    EditorMode::from_wire(m).map_or("unspecified", EditorMode::as_str)
}

fn or_dash(v: Option<u64>) -> String {
    v.map_or_else(|| "-".into(), bytes)
}

fn join_or_dash(v: &[String]) -> String {
    if v.is_empty() {
        "-".into()
    } else {
        v.join(",")
    }
}

/// A 20-character bar: `#` used by halo, `=` reserve, `.` free.
pub fn bar(usable: u64, reserve: u64, halo: u64) -> String {
    const W: u64 = 20;
    if usable == 0 {
        return String::new();
    }
    let cells = |b: u64| (b.min(usable).saturating_mul(W) + usable / 2) / usable;
    let h = cells(halo);
    let r = cells(reserve).min(W - h);
    let mut s = String::from("[");
    s.push_str(&"#".repeat(h as usize));
    s.push_str(&"=".repeat(r as usize));
    s.push_str(&".".repeat((W - h - r) as usize));
    s.push(']');
    s
}

/// The JSON view of nodes.
pub fn nodes_json(nodes: &[v1::NodeView]) -> Vec<NodeJson> {
    nodes
        .iter()
        .map(|n| {
            let id = n.node.clone().unwrap_or_default();
            let usable = n.memory.as_ref().and_then(|m| m.usable_bytes);
            NodeJson {
                name: id.name,
                roles: id.roles,
                status: node_status(n.status).into(),
                agent_address: id.agent_address,
                usable_bytes: usable,
                reserve_bytes: n.reserve_bytes,
                halo_bytes: n.placed_bytes,
                free_bytes: usable.map(|u| {
                    u.saturating_sub(n.reserve_bytes)
                        .saturating_sub(n.placed_bytes)
                }),
                instances: n.instances.len(),
                silent_for_ms: n.silent_for_ms,
                cert_not_after_unix: id.tls_cert_not_after_unix,
                available_bytes: n.memory.as_ref().and_then(|m| m.mem_available_bytes),
                psi_some_avg10: n.memory.as_ref().and_then(|m| m.psi_some_avg10),
                pressure: n
                    .memory
                    .as_ref()
                    .and_then(|m| m.pressure.as_ref())
                    .map(|p| {
                        if p.grew.is_empty() {
                            p.reason.clone()
                        } else {
                            format!("{}; {}", p.reason, p.grew)
                        }
                    }),
            }
        })
        .collect()
}

/// The `haloctl nodes` table, expiries counted from now.
pub fn render_nodes(nodes: &[NodeJson]) -> String {
    render_nodes_at(nodes, proto::units::now_unix())
}

/// The `haloctl nodes` table at `now_unix`: a CERT column (`-` for
/// plaintext), and a warning line under it for each certificate expired or
/// expiring within 30 days.
pub fn render_nodes_at(nodes: &[NodeJson], now_unix: i64) -> String {
    let mut t = Table::new([
        "NODE", "ROLES", "STATUS", "USABLE", "RESERVE", "HALO", "FREE", "CERT", "MEMORY",
    ]);
    for n in nodes {
        t.row([
            n.name.clone(),
            join_or_dash(&n.roles),
            if n.pressure.is_some() {
                format!("{}, pressure", n.status)
            } else {
                n.status.clone()
            },
            or_dash(n.usable_bytes),
            bytes(n.reserve_bytes),
            bytes(n.halo_bytes),
            or_dash(n.free_bytes),
            n.cert_not_after_unix
                .map_or_else(|| "-".into(), |na| cert_expiry(na, now_unix)),
            n.usable_bytes
                .map(|u| bar(u, n.reserve_bytes, n.halo_bytes))
                .unwrap_or_default(),
        ]);
    }
    let mut s = t.render();
    if !nodes.is_empty() {
        s.push_str("MEMORY: # used by halo, = reserve, . free\n");
    }
    for n in nodes {
        if let Some(why) = &n.pressure {
            s.push_str(&format!(
                "node {} is under memory pressure ({why}; {} really free): nothing new is \
                 placed there\n",
                n.name,
                or_dash(n.available_bytes)
            ));
        }
        let what = format!("node {}'s certificate", n.name);
        if let Some(w) = n
            .cert_not_after_unix
            .and_then(|na| cert_warning(&what, na, now_unix))
        {
            s.push_str(&w);
            s.push('\n');
        }
    }
    s
}

/// A copy in flight as JSON shows it.
fn copy_json(c: &proto::domain::CopyProgress) -> CopyJson {
    CopyJson {
        from_node: c.from_node.clone(),
        to_node: c.to_node.clone(),
        bytes_done: c.bytes_done,
        bytes_total: c.bytes_total,
        bytes_per_sec: c.rate_bytes_per_sec(),
        secs_left: c.secs_left(),
        line: c.line(),
    }
}

/// The JSON view of the catalog.
pub fn models_json(entries: &[v1::CatalogEntry]) -> Vec<ModelJson> {
    entries
        .iter()
        .map(|e| ModelJson {
            name: e.name.clone(),
            model_id: e.model_id.clone(),
            file_size_bytes: e.file_size_bytes,
            architecture: e.params.as_ref().map(|p| p.architecture.clone()),
            quantization: e
                .params
                .as_ref()
                .map(|p| p.quantization.clone())
                .filter(|q| !q.is_empty()),
            parameter_count: e.params.as_ref().map(|p| p.parameter_count),
            default_context: e.default_context,
            min_context: e.min_context,
            modes: e.modes.iter().map(|&m| mode(m).to_owned()).collect(),
            nodes: e.nodes.clone(),
            speed: Vec::new(),
            copies: e
                .copies
                .iter()
                .filter_map(|c| proto::domain::CopyProgress::try_from(c.clone()).ok())
                .map(|c| copy_json(&c))
                .collect(),
            role: e.role.clone(),
            copy_if_missing: e.copy_if_missing,
        })
        .collect()
}

/// Fills each model's `speed` from the kept bench results: per node, the
/// newest result whose setup is the one running now (placement settings,
/// file, the node's llama.cpp build), else the newest one with what
/// differs. Results are never combined.
pub fn attach_speed(
    models: &mut [ModelJson],
    results: &[proto::domain::BenchResult],
    placements: &[v1::Placement],
    nodes: &[v1::NodeView],
) {
    let build = |node: &str| {
        nodes
            .iter()
            .filter_map(|n| n.node.as_ref())
            .find(|n| n.name == node)
            .map(|n| n.llama_version.clone())
            .unwrap_or_default()
    };
    for m in models.iter_mut() {
        // Per node: results measured straight to a replica (a figure
        // through a gateway is the placement's, over several nodes).
        let results: Vec<&proto::domain::BenchResult> = results
            .iter()
            .filter(|r| r.setup.gateway.is_empty())
            .collect();
        let mut on: Vec<&str> = results
            .iter()
            .filter(|r| r.setup.model == m.name)
            .map(|r| r.setup.node.as_str())
            .collect();
        on.sort_unstable();
        on.dedup();
        for node in on {
            let mine: Vec<&proto::domain::BenchResult> = results
                .iter()
                .copied()
                .filter(|r| r.setup.model == m.name && r.setup.node == node)
                .collect();
            // The setups of this model's placements on the node now.
            let running: Vec<proto::domain::BenchSetup> = placements
                .iter()
                .filter(|p| p.model == m.name && p.replicas.iter().any(|r| r.node == node))
                .map(|p| {
                    crate::bench::current_setup(p, node, &build(node), m.file_size_bytes, None)
                })
                .collect();
            let same = |r: &&&proto::domain::BenchResult| {
                running.iter().any(|s| {
                    // What is not known now (no node heard from yet) is
                    // not counted as a difference.
                    let mut s = s.clone();
                    if s.context_size == 0 {
                        s.context_size = r.setup.context_size;
                    }
                    if s.model_file_bytes == 0 {
                        s.model_file_bytes = r.setup.model_file_bytes;
                    }
                    if s.llama_build.is_empty() {
                        s.llama_build.clone_from(&r.setup.llama_build);
                    }
                    r.setup.differences(&s).is_empty()
                })
            };
            let (r, differs) = match mine.iter().rev().find(same) {
                Some(r) => (*r, Vec::new()),
                None => {
                    let Some(r) = mine.last() else { continue };
                    let differs = match running.first() {
                        None => vec!["not placed".to_owned()],
                        Some(s) => r
                            .setup
                            .differences(s)
                            .into_iter()
                            .map(str::to_owned)
                            .collect(),
                    };
                    (*r, differs)
                }
            };
            let Some(p) = r.points.iter().min_by_key(|p| (p.depth, p.concurrency)) else {
                continue;
            };
            m.speed.push(SpeedJson {
                node: node.to_owned(),
                pp_tokens_per_second: p.pp.median,
                tg_tokens_per_second: p.tg.median,
                depth: p.depth,
                concurrency: p.concurrency,
                at_unix_ms: r.at_unix_ms,
                llama_build: r.setup.llama_build.clone(),
                differs,
            });
        }
    }
}

fn speed_cell(v: &[SpeedJson]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    v.iter()
        .map(|s| {
            let mut c = format!(
                "{} {}/{}",
                s.node,
                crate::bench::rate(s.pp_tokens_per_second),
                crate::bench::rate(s.tg_tokens_per_second)
            );
            if !s.differs.is_empty() {
                let what = if s.differs.iter().any(|d| d == "not placed") {
                    "not placed now".to_owned()
                } else {
                    format!("other {}", s.differs.join("+"))
                };
                c.push_str(&format!(" ({what})"));
            }
            c
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The `haloctl models` table.
pub fn render_models(models: &[ModelJson]) -> String {
    let mut t = Table::new([
        "NAME",
        "FILE",
        "SIZE",
        "ARCH",
        "QUANT",
        "CONTEXT",
        "MODES",
        "NODES",
        "PP/TG T/S",
    ]);
    for m in models {
        t.row([
            m.name.clone(),
            m.model_id.clone(),
            if m.nodes.is_empty() {
                "-".into()
            } else {
                bytes(m.file_size_bytes)
            },
            m.architecture.clone().unwrap_or_else(|| "-".into()),
            m.quantization.clone().unwrap_or_else(|| "-".into()),
            m.default_context.to_string(),
            join_or_dash(&m.modes),
            match (m.nodes.is_empty(), m.copy_if_missing) {
                (true, _) => "(no node has the file)".into(),
                (false, false) => m.nodes.join(","),
                (false, true) => format!("{} (copied where placed)", m.nodes.join(",")),
            },
            speed_cell(&m.speed),
        ]);
    }
    let mut out = t.render();
    for c in models.iter().flat_map(|m| &m.copies) {
        out.push_str(&format!("copying {}\n", c.line));
    }
    out
}

/// What llama-server reported allocating: its memory breakdown table when
/// logged, else the sum of the buffer sizes it printed.
fn real_bytes(i: &v1::Instance) -> Option<u64> {
    let o = ObservedBuffers::from(i.observed?);
    match o.breakdown {
        Some(b) => Some(b.model_bytes + b.context_bytes + b.compute_bytes),
        None => o.total_bytes(),
    }
}

/// The helpers of a split replica, from the plan's shares and what their
/// agents report (by request id).
fn helpers(p: &v1::Placement, r: &v1::Replica) -> Vec<HelperJson> {
    let Some(plan) = &p.split else {
        return Vec::new();
    };
    let key = ReplicaKey::parse(&r.request_id);
    SplitPlan::from(plan.clone())
        .helpers()
        .map(|(k, s)| {
            let rid = key.as_ref().map(|key| key.helper(k).request_id());
            let i = r
                .helpers
                .iter()
                .find(|i| Some(&i.request_id) == rid.as_ref());
            HelperJson {
                node: s.node.clone(),
                layers: s.layers,
                state: i.map_or("pending", |i| instance_state(i.state)).into(),
                endpoint: i.map(|i| i.endpoint.clone()).unwrap_or_default(),
            }
        })
        .collect()
}

/// A replica's state with the copy it waits for: "copying 45% from halo1,
/// about 12 s left" while its file is copied to its node, "waiting for a
/// copy" after one failed, else [`replica_state`].
pub fn replica_state_text(r: &v1::Replica) -> String {
    if r.instance.is_none() {
        if let Some(c) = r
            .copy
            .clone()
            .and_then(|c| proto::domain::CopyProgress::try_from(c).ok())
        {
            return copy_state(&c);
        }
        if !r.copy_failed.is_empty() && r.start_refused.is_empty() {
            return "waiting for a copy (the last failed)".to_owned();
        }
    }
    replica_state(r).to_owned()
}

/// "copying 45% from halo1, about 12 s left".
fn copy_state(c: &proto::domain::CopyProgress) -> String {
    let pct = if c.bytes_total == 0 {
        0.0
    } else {
        c.bytes_done as f64 * 100.0 / c.bytes_total as f64
    };
    let from = if c.from_node.is_empty() {
        String::new()
    } else {
        format!(" from {}", c.from_node)
    };
    let left = c
        .secs_left()
        .map_or_else(String::new, |s| format!(", about {s} s left"));
    format!("copying {pct:.0}%{from}{left}")
}

/// A replica's state as people read it: its instance's, else `failed`
/// when its start was refused (retried with back-off), else `pending`.
pub fn replica_state(r: &v1::Replica) -> &'static str {
    match &r.instance {
        Some(i) => instance_state(i.state),
        None if !r.start_refused.is_empty() => InstanceState::Failed.as_str(),
        None => "pending",
    }
}

/// The JSON view of placements.
pub fn status_json(placements: &[v1::Placement]) -> Vec<PlacementJson> {
    placements
        .iter()
        .map(|p| PlacementJson {
            name: p.name.clone(),
            model: p.model.clone(),
            role: p.role.clone(),
            pinned_node: (!p.pinned_node.is_empty()).then(|| p.pinned_node.clone()),
            context: p.options.as_ref().map_or(0, |o| o.context_size),
            estimate_bytes: p.estimate_bytes,
            paused: p.paused,
            learned_bytes: p.learned_bytes,
            held: (!p.held.is_empty()).then(|| p.held.clone()),
            on_demand: p.on_demand,
            last_used_unix_ms: (p.last_used_unix_ms > 0).then_some(p.last_used_unix_ms),
            unload_at_unix_ms: (p.on_demand && p.unload_at_unix_ms > 0)
                .then_some(p.unload_at_unix_ms),
            replicas: p
                .replicas
                .iter()
                .map(|r| {
                    let i = r.instance.as_ref();
                    ReplicaJson {
                        index: r.index,
                        node: r.node.clone(),
                        state: replica_state_text(r),
                        copy: r
                            .copy
                            .clone()
                            .filter(|_| i.is_none())
                            .and_then(|c| proto::domain::CopyProgress::try_from(c).ok())
                            .map(|c| copy_json(&c)),
                        copy_failed: if i.is_none() {
                            r.copy_failed.clone()
                        } else {
                            String::new()
                        },
                        // Held: nothing runs; the stopped instance's figures
                        // would look live.
                        real_bytes: i.filter(|_| p.held.is_empty()).and_then(real_bytes),
                        endpoint: i
                            .filter(|_| p.held.is_empty())
                            .map(|i| i.endpoint.clone())
                            .unwrap_or_default(),
                        restarts: i.map_or(0, |i| i.restart_count),
                        last_error: i
                            .map_or_else(|| r.start_refused.clone(), |i| i.last_error.clone()),
                        model_file_changed: i
                            .map(|i| i.model_file_changed.clone())
                            .unwrap_or_default(),
                        helpers: helpers(p, r),
                    }
                })
                .collect(),
        })
        .collect()
}

/// The `haloctl status` table: one row per replica.
pub fn render_status(placements: &[PlacementJson]) -> String {
    if placements.is_empty() {
        return "No placements. Try `haloctl models`, then `haloctl place ROLE MODEL`.\n".into();
    }
    let mut t = Table::new([
        "NAME", "MODEL", "NODE", "STATE", "CONTEXT", "ESTIMATE", "REAL", "ENDPOINT",
    ]);
    for p in placements {
        let state = |r: &ReplicaJson| {
            let s = if p.paused {
                "paused".to_owned()
            } else if p.held.is_some() {
                "held".to_owned()
            } else if r.restarts > 0 {
                format!(
                    "{} ({} restart{})",
                    r.state,
                    r.restarts,
                    if r.restarts == 1 { "" } else { "s" }
                )
            } else {
                r.state.clone()
            };
            if r.model_file_changed.is_empty() {
                s
            } else {
                format!("{s}, model file changed")
            }
        };
        for r in &p.replicas {
            t.row([
                if p.replicas.len() > 1 {
                    format!("{}#{}", p.name, r.index)
                } else {
                    p.name.clone()
                },
                p.model.clone(),
                if r.helpers.is_empty() {
                    r.node.clone()
                } else {
                    let hs: Vec<String> = r
                        .helpers
                        .iter()
                        .map(|h| format!("+ rpc {}", h.node))
                        .collect();
                    format!("{} {}", r.node, hs.join(" "))
                },
                match r.helpers.iter().find(|h| h.state != "ready") {
                    Some(h) if r.state != "failed" => format!("rpc {} {}", h.node, h.state),
                    _ => state(r),
                },
                p.context.to_string(),
                estimate(p),
                or_dash(r.real_bytes),
                if r.endpoint.is_empty() {
                    "-".into()
                } else {
                    r.endpoint.clone()
                },
            ]);
        }
        if p.replicas.is_empty() {
            t.row([
                p.name.clone(),
                p.model.clone(),
                "-".into(),
                "unplaced".into(),
                p.context.to_string(),
                estimate(p),
                "-".into(),
                "-".into(),
            ]);
        }
    }
    let mut out = t.render();
    let now = proto::units::now_unix_ms();
    for p in placements {
        if let Some(why) = &p.held {
            out += &format!("{} is held: {why}\n", p.name);
        }
        for r in p.replicas.iter().filter(|r| !r.copy_failed.is_empty()) {
            out += &format!("{} on {}: {}\n", p.name, r.node, r.copy_failed);
        }
        if let Some(at) = p.unload_at_unix_ms {
            let last = p.last_used_unix_ms.map_or_else(
                || "no request yet".to_owned(),
                |u| format!("last request {} ago", secs(now.saturating_sub(u))),
            );
            out += &format!(
                "{} was loaded on demand: {last}; unloads in {} unless one comes \
                 (haloctl place keeps it)\n",
                p.name,
                secs(at.saturating_sub(now))
            );
        }
    }
    out
}

/// A duration in ms as people read it: `45 s`, `14 min 48 s`.
fn secs(ms: u64) -> String {
    let s = ms / 1000;
    if s < 60 {
        format!("{s} s")
    } else {
        format!("{} min {} s", s / 60, s % 60)
    }
}

/// A placement's ESTIMATE cell: the estimate, and what a replica was seen
/// to use when the kernel killed it for lack of memory, when larger.
fn estimate(p: &PlacementJson) -> String {
    if p.learned_bytes > p.estimate_bytes {
        format!(
            "{} (seen {})",
            bytes(p.estimate_bytes),
            bytes(p.learned_bytes)
        )
    } else {
        bytes(p.estimate_bytes)
    }
}

/// The JSON view of endpoints.
pub fn endpoints_json(endpoints: &[v1::Endpoint]) -> Vec<EndpointJson> {
    endpoints
        .iter()
        .map(|e| EndpointJson {
            mode: mode(e.mode).into(),
            base_url: format!("{}/v1", e.base_url.trim_end_matches('/')),
            model: e.model.clone(),
            placement: e.placement.clone(),
            node: e.node.clone(),
            api_key: e.api_key.clone(),
            gateways: Vec::new(),
        })
        .collect()
}

/// The gateways the nodes serve, `(node, base URL ending in /v1)`, ready
/// nodes only.
pub fn gateways(nodes: &[v1::NodeView]) -> Vec<(String, String)> {
    nodes
        .iter()
        .filter(|n| n.status() == v1::NodeStatus::Ready)
        .filter_map(|n| n.node.as_ref())
        .filter(|n| !n.gateway_url.is_empty())
        .map(|n| {
            (
                n.name.clone(),
                format!("{}/v1", n.gateway_url.trim_end_matches('/')),
            )
        })
        .collect()
}

/// The `haloctl endpoints` table when nodes serve gateways: one base URL
/// for every mode, the mode as the model name, what serves it now.
pub fn render_gateway_endpoints(
    gateways: &[(String, String)],
    endpoints: &[EndpointJson],
) -> String {
    let mut s = String::new();
    let first = gateways.first().map(|g| g.1.as_str()).unwrap_or_default();
    if endpoints.is_empty() {
        s.push_str("No ready models yet. `haloctl status` shows what is placed and loading.\n");
    } else {
        let mut t = Table::new(["MODE", "BASE URL", "MODEL", "SERVED BY"]);
        let mut seen = std::collections::BTreeMap::<&str, Vec<String>>::new();
        for e in endpoints {
            let name = if e.mode == "unspecified" {
                e.model.as_str()
            } else {
                e.mode.as_str()
            };
            let by = format!("{} ({})", e.model, e.node);
            let v = seen.entry(name).or_default();
            if !v.contains(&by) {
                v.push(by);
            }
        }
        for (name, by) in seen {
            let mode = if is_mode(name) { name } else { "-" };
            t.row([
                mode.to_owned(),
                first.to_owned(),
                name.to_owned(),
                by.join(", "),
            ]);
        }
        s.push_str(&t.render());
    }
    s.push_str("\nGateways (each routes every mode to any node): ");
    s.push_str(
        &gateways
            .iter()
            .map(|(n, u)| format!("{u} ({n})"))
            .collect::<Vec<_>>()
            .join(", "),
    );
    s.push_str(
        "\nIn an editor's OpenAI-compatible provider: the base URL above, model = the mode \
         (or a model name),\nAPI key from `haloctl keys create NAME`. The URL and key stay \
         the same when halo moves a model.\nA gateway on this machine survives any one node: \
         `haloctl gateway`. Each instance's own URL: --direct.\n",
    );
    s
}

/// Whether `name` is an editor mode.
pub fn is_mode(name: &str) -> bool {
    proto::domain::EditorMode::ALL
        .iter()
        .any(|m| m.as_str() == name)
}

/// The `haloctl endpoints` table with how to use it.
pub fn render_endpoints(endpoints: &[EndpointJson]) -> String {
    if endpoints.is_empty() {
        return "No ready endpoints. `haloctl status` shows what is placed and loading.\n".into();
    }
    // A placement named apart from its model (e.g. a second placement of
    // it): which is which.
    let by_placement = endpoints.iter().any(|e| e.placement != e.model);
    let mut header = vec!["MODE", "BASE URL", "MODEL"];
    if by_placement {
        header.push("PLACEMENT");
    }
    header.extend(["NODE", "API KEY"]);
    let mut t = Table::new(header);
    for e in endpoints {
        let mut row = vec![
            if e.mode == "unspecified" {
                "-".to_owned()
            } else {
                e.mode.clone()
            },
            e.base_url.clone(),
            e.model.clone(),
        ];
        if by_placement {
            row.push(e.placement.clone());
        }
        row.extend([
            e.node.clone(),
            if e.api_key.is_empty() {
                "(hidden)".into()
            } else {
                e.api_key.clone()
            },
        ]);
        t.row(row);
    }
    let mut s = t.render();
    let modeless: std::collections::BTreeSet<&str> = endpoints
        .iter()
        .filter(|e| e.mode == "unspecified")
        .map(|e| e.model.as_str())
        .collect();
    for m in modeless {
        s.push_str(&format!(
            "MODE -: `{m}` serves no editor mode; give its catalog entry `modes` (ask, code, \
             autocomplete, architect, debug)\n"
        ));
    }
    s.push_str(
        "\nIn an editor's OpenAI-compatible provider: base URL, model and API key as above.\n\
         With curl: -H \"Authorization: Bearer API_KEY\" BASE_URL/chat/completions\n",
    );
    if endpoints.iter().any(|e| e.api_key.is_empty()) {
        s.push_str(
            "(hidden): a read-only certificate sees no API keys; an admin certificate does.\n",
        );
    }
    s
}

/// The JSON view of remote plan rows.
pub fn plan_json(rows: &[v1::PlanRow]) -> Vec<PlanRowJson> {
    rows.iter()
        .map(|r| PlanRowJson {
            node: r.node.clone(),
            ctx: r.context_size,
            weights_bytes: r.weights_bytes,
            kv_bytes: r.kv_bytes,
            compute_bytes: r.compute_bytes + r.output_bytes,
            total_bytes: r.total_bytes,
            available_bytes: r.available_bytes,
            fits: r.fits,
            reason: r.reason.clone(),
            formula_total_bytes: r.formula_total_bytes,
            engine_total_bytes: r.engine_total_bytes,
            estimate_used: if r.estimate_used.is_empty() {
                "formula".to_owned()
            } else {
                r.estimate_used.clone()
            },
            estimate_notes: r.estimate_notes.clone(),
        })
        .collect()
}

/// The `haloctl plan CATALOG-NAME` table.
pub fn render_plan(model: &str, rows: &[PlanRowJson]) -> String {
    if rows.is_empty() {
        return format!(
            "No node reports the file of `{model}`: nothing to plan against \
             (`haloctl models` shows which nodes hold what).\n"
        );
    }
    let mut t = Table::new([
        "NODE",
        "CONTEXT",
        "WEIGHTS",
        "KV CACHE",
        "COMPUTE",
        "TOTAL",
        "FORMULA",
        "LLAMA.CPP",
        "USED",
        "AVAILABLE",
        "FITS?",
    ]);
    let mut notes: Vec<String> = Vec::new();
    for r in rows {
        t.row([
            r.node.clone(),
            r.ctx.to_string(),
            bytes(r.weights_bytes),
            bytes(r.kv_bytes),
            bytes(r.compute_bytes),
            bytes(r.total_bytes),
            bytes(r.formula_total_bytes),
            r.engine_total_bytes.map_or_else(|| "-".to_owned(), bytes),
            r.estimate_used.clone(),
            bytes(r.available_bytes),
            if r.fits { "yes" } else { "no" }.into(),
        ]);
        for n in &r.estimate_notes {
            // The architecture's note once; the others per row.
            let line = if n.starts_with("estimate: ") {
                n.clone()
            } else {
                format!("{} at {}: {n}", r.node, r.ctx)
            };
            if !notes.contains(&line) {
                notes.push(line);
            }
        }
    }
    let mut s = format!(
        "{model}: memory per node and context (fits = total + margin <= available; \
         TOTAL is the USED estimate: halo's FORMULA, LLAMA.CPP's own projection on the node, \
         or what a real load OBSERVED)\n\n"
    );
    s.push_str(&t.render());
    if !notes.is_empty() {
        s.push('\n');
        for n in notes {
            s.push_str(&n);
            s.push('\n');
        }
    }
    s
}

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
pub fn clock(unix_ms: u64) -> String {
    let s = (unix_ms / 1000) % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

/// `haloctl nodes`.
pub fn nodes(t: &Target, a: &ListArgs) -> Result<(), Failure> {
    let resp = client_call(t, |mut c| async move {
        c.list_nodes(v1::ListNodesRequest {}).await
    })?;
    let v = nodes_json(&resp.nodes);
    emit(a.output, &v, render_nodes)
}

/// `haloctl models`.
pub fn models(t: &Target, a: &ListArgs) -> Result<(), Failure> {
    let resp = client_call(t, |mut c| async move {
        c.list_catalog(v1::ListCatalogRequest {}).await
    })?;
    let mut v = models_json(&resp.entries);
    // Speed beside memory: kept bench results against what runs now. A
    // controller without bench results (older) leaves the column empty.
    let rt = crate::client::runtime()?;
    let extra = rt.block_on(async {
        let mut c = t.connect().await?;
        let results = match c
            .list_bench_results(v1::ListBenchResultsRequest::default())
            .await
        {
            Ok(r) => r.into_inner().results,
            Err(s) if s.code() == tonic::Code::Unimplemented => Vec::new(),
            Err(s) => return Err(t.status(s)),
        };
        let placements = c
            .list_placements(v1::ListPlacementsRequest {})
            .await
            .map_err(|s| t.status(s))?
            .into_inner()
            .placements;
        let nodes = c
            .list_nodes(v1::ListNodesRequest {})
            .await
            .map_err(|s| t.status(s))?
            .into_inner()
            .nodes;
        Ok::<_, Failure>((results, placements, nodes))
    })?;
    let (results, placements, nodes) = extra;
    let results: Vec<proto::domain::BenchResult> = results
        .into_iter()
        .filter_map(|r| proto::domain::BenchResult::try_from(r).ok())
        .collect();
    attach_speed(&mut v, &results, &placements, &nodes);
    emit(a.output, &v, render_models)
}

/// `haloctl status`.
pub fn status(t: &Target, a: &ListArgs) -> Result<(), Failure> {
    let resp = client_call(t, |mut c| async move {
        c.list_placements(v1::ListPlacementsRequest {}).await
    })?;
    let v = status_json(&resp.placements);
    emit(a.output, &v, render_status)
}

/// `haloctl endpoints`.
pub fn endpoints(t: &Target, a: &EndpointsArgs) -> Result<(), Failure> {
    let resp = client_call(t, |mut c| async move {
        c.endpoints(v1::EndpointsRequest {}).await
    })?;
    let nodes = client_call(t, |mut c| async move {
        c.list_nodes(v1::ListNodesRequest {}).await
    })?;
    let gws = gateways(&nodes.nodes);
    let mut v = endpoints_json(&resp.endpoints);
    for e in &mut v {
        e.gateways = gws.iter().map(|g| g.1.clone()).collect();
    }
    if a.direct || gws.is_empty() || a.output == Format::Json {
        emit(a.output, &v, render_endpoints)
    } else {
        crate::output::print(&render_gateway_endpoints(&gws, &v));
        Ok(())
    }
}

/// `haloctl plan CATALOG-NAME`: exit 1 when no row fits.
pub fn plan(t: &Target, a: &PlanArgs) -> Result<(), Failure> {
    let model = a.model.to_string_lossy().into_owned();
    if a.memory.is_some() || a.parallel != 1 {
        return Err(Failure::Usage(format!(
            "--memory and --parallel apply to a GGUF file; `{model}` is taken as a catalog \
             name (no such file), planned against the nodes' real memory"
        )));
    }
    let wire = |c: Option<proto::domain::CacheType>| {
        c.map_or(v1::CacheType::Unspecified, v1::CacheType::from) as i32
    };
    let req = v1::PlanRequest {
        model: model.clone(),
        contexts: a.ctx.clone(),
        node: a.node.clone().unwrap_or_default(),
        cache_type_k: wire(a.cache_type_k),
        cache_type_v: wire(a.cache_type_v),
    };
    let resp = client_call(t, |mut c| async move { c.plan(req).await })?;
    let v = plan_json(&resp.rows);
    emit(a.output, &v, |rows| render_plan(&model, rows))?;
    if v.iter().any(|r| r.fits) {
        Ok(())
    } else {
        Err(Failure::Refused(format!(
            "`{model}` fits no node at the contexts shown"
        )))
    }
}

/// `haloctl unplace NAME`.
pub fn unplace(t: &Target, a: &UnplaceArgs) -> Result<(), Failure> {
    let req = v1::UnplaceRequest {
        name: a.name.clone(),
    };
    client_call(t, |mut c| async move { c.unplace(req).await })?;
    print(&format!(
        "unplaced {}: its instances are being stopped\n",
        a.name
    ));
    Ok(())
}

/// `haloctl logs`: the last lines of a placement's instance log, then new
/// ones with `--follow` until the instance stops.
pub fn logs(t: &Target, a: &LogsArgs) -> Result<(), Failure> {
    let rt = crate::client::runtime()?;
    rt.block_on(async {
        let mut c = t.connect().await?;
        let mut stream = c
            .placement_logs(v1::PlacementLogsRequest {
                placement: a.name.clone(),
                replica: a.replica,
                lines: a.lines,
                follow: a.follow,
            })
            .await
            .map_err(|s| t.status(s))?
            .into_inner();
        while let Some(line) = stream.message().await.map_err(|s| t.status(s))? {
            print(&format!("{}\n", line.line));
        }
        Ok(())
    })
}

/// `haloctl events`: the recent events, then (with `--follow`) new ones
/// until interrupted or `--count` events.
pub fn events(t: &Target, a: &EventsArgs) -> Result<(), Failure> {
    use tokio_stream::StreamExt;
    let rt = crate::client::runtime()?;
    rt.block_on(async {
        let mut c = t.connect().await?;
        let mut stream = c
            .watch_events(v1::WatchEventsRequest {
                follow: a.follow,
                recent: a.recent,
            })
            .await
            .map_err(|s| t.status(s))?
            .into_inner();
        if a.follow && a.output == Format::Table {
            eprintln!("haloctl: streaming events from {} (Ctrl-C to stop)", t.url);
        }
        let mut n = 0u64;
        while a.count.is_none_or(|max| n < max) {
            let Some(e) = stream.next().await else {
                if a.follow {
                    return Err(t.unreachable("the event stream ended"));
                }
                if n == 0 && a.output == Format::Table {
                    if a.recent == Some(0) {
                        eprintln!(
                            "haloctl: -n 0 shows none of the recent events; -f -n 0 follows only new ones"
                        );
                    } else {
                        eprintln!("haloctl: no events yet");
                    }
                }
                return Ok(());
            };
            let e = e.map_err(|s| t.status(s))?;
            let j = EventJson {
                at_unix_ms: e.at_unix_ms,
                kind: e.kind,
                subject: e.subject,
                message: e.message,
            };
            match a.output {
                Format::Json => {
                    let line = serde_json::to_string(&j).map_err(anyhow::Error::from)?;
                    print(&format!("{line}\n"));
                }
                Format::Table => print(&format!(
                    "{}  {:<18} {:<20} {}\n",
                    clock(j.at_unix_ms),
                    j.kind,
                    j.subject,
                    j.message
                )),
            }
            n += 1;
        }
        Ok(())
    })
}

/// Connects and makes one call, mapping failures to exit codes.
pub fn client_call<T, F, Fut>(t: &Target, f: F) -> Result<T, Failure>
where
    F: FnOnce(crate::client::Client) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let rt = crate::client::runtime()?;
    rt.block_on(async {
        let c = t.connect().await?;
        f(c).await
            .map(tonic::Response::into_inner)
            .map_err(|s| t.status(s))
    })
}

fn emit<T: Serialize>(
    format: Format,
    v: &[T],
    table: impl FnOnce(&[T]) -> String,
) -> Result<(), Failure> {
    match format {
        Format::Json => print_json(&v)?,
        Format::Table => print(&table(v)),
    }
    Ok(())
}
