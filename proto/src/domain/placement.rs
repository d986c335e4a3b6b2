//! Desired state of one placement: a catalog model, the options its
//! instances run with, and where each replica goes. Stored as JSON under
//! `/halo/v1/placements/`. A replica's StartInstance request id is derived
//! from (placement name, replica index, generation), so a retried start is
//! the same start and the agent deduplicates it.

use super::catalog::check_name;
use super::instance::cache_name_from_wire;
use super::{InstanceOptions, InstanceState};
use crate::ConversionError;
use crate::v1;
use serde::{Deserialize, Serialize};

/// Prefix of every request id the controller sends; instances whose request
/// id lacks it are not the controller's and are never touched.
pub const REQUEST_ID_PREFIX: &str = "halo.";

/// The llama-server options of a placement's instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementOptions {
    /// `-c`
    pub context_size: u32,
    /// `-np`
    pub parallel: u32,
    /// `-ctk` (llama.cpp name).
    pub cache_type_k: String,
    /// `-ctv` (llama.cpp name).
    pub cache_type_v: String,
    /// Names from the agents' allow-list.
    pub extra_flags: Vec<String>,
    /// A context above the model's trained one was allowed.
    #[serde(default)]
    pub allow_context_over_trained: bool,
}

/// One instance of a placement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// 0-based index within the placement.
    pub index: u32,
    /// Node it runs on.
    pub node: String,
    /// Bumped on every move or restart; part of the request id.
    pub generation: u64,
}

/// A placement: desired state only; what agents report is observed state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// Unique name (`a-z 0-9 . _ -`).
    pub name: String,
    /// Role asked for.
    pub role: String,
    /// Catalog name.
    pub model: String,
    /// File id agents report.
    pub model_id: String,
    /// Node the user pinned it to; pinned placements never move.
    pub pinned_node: Option<String>,
    /// Instance options.
    pub options: PlacementOptions,
    /// Estimated bytes of one replica.
    pub estimate_bytes: u64,
    /// Catalog priority when placed.
    pub priority: i32,
    /// Replicas.
    pub replicas: Vec<Replica>,
    /// Memory is held but no instance is started.
    pub paused: bool,
    /// Set when the model runs split across nodes with llama.cpp RPC; the
    /// placement then has one replica, on the host share's node.
    #[serde(default)]
    pub split: Option<SplitPlan>,
    /// What a replica was seen to use when the kernel killed it for lack
    /// of memory (0: never): the placement is sized by at least this.
    #[serde(default)]
    pub learned_bytes: u64,
    /// Set while the controller holds the placement (no instance runs)
    /// because no node has room for what it was seen to need: why.
    #[serde(default)]
    pub held: Option<String>,
    /// The latest out-of-memory kill of a replica on each node where one
    /// happened: no replica is started again there for a while.
    #[serde(default)]
    pub oom_kills: Vec<OomRecord>,
    /// Placed by a request for an on-demand catalog model: unplaced after
    /// its catalog entry's idle time without one. Hand-placed ones never
    /// are.
    #[serde(default)]
    pub on_demand: bool,
    /// When it was placed (Unix ms; 0 for placements written before this
    /// was kept).
    #[serde(default)]
    pub placed_at_unix_ms: u64,
    /// A replica may go (or move) to a node that lacks the model file: the
    /// controller copies it there from a node that holds it first.
    #[serde(default)]
    pub copy_if_missing: bool,
}

/// An out-of-memory kill of one of a placement's replicas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OomRecord {
    /// Where it was killed.
    pub node: String,
    /// What it used.
    pub used_bytes: u64,
    /// When the agent saw it (Unix ms).
    pub at_unix_ms: u64,
}

impl Placement {
    /// What one replica is sized by: its estimate, or what a replica was
    /// seen to use when the kernel killed it for lack of memory, whichever
    /// is larger.
    pub fn sized_bytes(&self) -> u64 {
        self.estimate_bytes.max(self.learned_bytes)
    }

    /// Records an OOM kill on `node`, keeping the latest per node.
    pub fn record_oom(&mut self, node: &str, used_bytes: u64, at_unix_ms: u64) {
        self.oom_kills.retain(|k| k.node != node);
        self.oom_kills.push(OomRecord {
            node: node.to_owned(),
            used_bytes,
            at_unix_ms,
        });
    }
}

/// One node's part of a split model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitShare {
    /// Node.
    pub node: String,
    /// Runs llama-server; the other shares run ggml-rpc-server.
    pub host: bool,
    /// Repeating layers (blocks) on this node.
    pub layers: u32,
    /// Weights on this node.
    pub weights_bytes: u64,
    /// KV cache on this node (it follows the layers).
    pub kv_bytes: u64,
    /// Compute buffers on this node.
    pub compute_bytes: u64,
    /// Logits buffer (host only).
    pub output_bytes: u64,
    /// Sum of the four.
    pub total_bytes: u64,
    /// Margin kept on top of `total_bytes`.
    pub margin_bytes: u64,
    /// Free memory on the node before this placement.
    pub free_bytes: u64,
    /// The node's `--tensor-split` proportion.
    pub tensor_split: u32,
}

/// How a split model runs: shares in llama.cpp's device order (RPC
/// helpers first, the host last) and what splitting costs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitPlan {
    /// Shares, helpers first, host last.
    pub shares: Vec<SplitShare>,
    /// Activation bytes crossing the network per generated token.
    pub traffic_bytes_per_token: u64,
    /// Why it is split and what it costs, in words.
    pub notes: Vec<String>,
}

impl SplitShare {
    /// Whether `total + margin ≤ free` (saturating: a share read back with
    /// absurd sizes does not fit, and does not overflow).
    pub fn fits(&self) -> bool {
        self.total_bytes.saturating_add(self.margin_bytes) <= self.free_bytes
    }
}

impl SplitPlan {
    /// The host share (runs llama-server).
    pub fn host(&self) -> Option<&SplitShare> {
        self.shares.iter().find(|s| s.host)
    }

    /// The helper shares with their 1-based share numbers (as in request
    /// ids), in device order.
    pub fn helpers(&self) -> impl Iterator<Item = (u32, &SplitShare)> {
        self.shares
            .iter()
            .filter(|s| !s.host)
            .enumerate()
            .map(|(k, s)| (u32::try_from(k + 1).unwrap_or(u32::MAX), s))
    }

    /// The helper shares with the keys of their ggml-rpc-servers for the
    /// replica `key` (`halo.NAME.rIsK.gG`), in device order.
    pub fn helper_keys<'a>(
        &'a self,
        key: &ReplicaKey,
    ) -> impl Iterator<Item = (ReplicaKey, &'a SplitShare)> + use<'a> {
        let key = key.clone();
        self.helpers().map(move |(k, s)| (key.helper(k), s))
    }

    /// Bytes the plan puts on `node` (total plus margin), saturating.
    pub fn bytes_on(&self, node: &str) -> u64 {
        self.shares
            .iter()
            .filter(|s| s.node == node)
            .fold(0, |sum: u64, s| {
                sum.saturating_add(s.total_bytes.saturating_add(s.margin_bytes))
            })
    }
}

impl From<SplitShare> for v1::SplitShare {
    fn from(s: SplitShare) -> Self {
        v1::SplitShare {
            node: s.node,
            host: s.host,
            layers: s.layers,
            weights_bytes: s.weights_bytes,
            kv_bytes: s.kv_bytes,
            compute_bytes: s.compute_bytes,
            output_bytes: s.output_bytes,
            total_bytes: s.total_bytes,
            margin_bytes: s.margin_bytes,
            free_bytes: s.free_bytes,
            tensor_split: s.tensor_split,
        }
    }
}

impl From<v1::SplitShare> for SplitShare {
    fn from(s: v1::SplitShare) -> Self {
        SplitShare {
            node: s.node,
            host: s.host,
            layers: s.layers,
            weights_bytes: s.weights_bytes,
            kv_bytes: s.kv_bytes,
            compute_bytes: s.compute_bytes,
            output_bytes: s.output_bytes,
            total_bytes: s.total_bytes,
            margin_bytes: s.margin_bytes,
            free_bytes: s.free_bytes,
            tensor_split: s.tensor_split,
        }
    }
}

impl From<SplitPlan> for v1::SplitPlan {
    fn from(p: SplitPlan) -> Self {
        v1::SplitPlan {
            shares: p.shares.into_iter().map(Into::into).collect(),
            traffic_bytes_per_token: p.traffic_bytes_per_token,
            notes: p.notes,
        }
    }
}

impl From<v1::SplitPlan> for SplitPlan {
    fn from(p: v1::SplitPlan) -> Self {
        SplitPlan {
            shares: p.shares.into_iter().map(Into::into).collect(),
            traffic_bytes_per_token: p.traffic_bytes_per_token,
            notes: p.notes,
        }
    }
}

/// The arithmetic on one node behind a placement decision: free = usable −
/// reserve − used; fits when needed (estimate + margin) ≤ free.
///
/// `haloctl place -o json` prints it as it serializes, so its JSON field
/// names are a script interface: `context_size` is `ctx`, and the margin,
/// cache type, replica count and source are left out.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct NodeFit {
    /// Node.
    pub node: String,
    /// Whether the node could take the model at all (status, role, file).
    pub candidate: bool,
    /// Whether the replica(s) fit.
    pub fits: bool,
    /// Usable memory.
    pub usable_bytes: u64,
    /// Reserve.
    pub reserve_bytes: u64,
    /// What placements use.
    pub used_bytes: u64,
    /// `usable − reserve − used`.
    pub free_bytes: u64,
    /// Estimate plus margin, per replica.
    pub needed_bytes: u64,
    /// The margin in `needed_bytes`.
    #[serde(skip)]
    pub margin_bytes: u64,
    /// Context of the settings shown.
    #[serde(rename = "ctx")]
    pub context_size: u32,
    /// KV cache type of the settings shown.
    #[serde(skip)]
    pub cache_type: String,
    /// Replicas this decision puts here.
    #[serde(skip)]
    pub replicas: u32,
    /// Where the estimate in `needed_bytes` came from: "formula", or
    /// "observed on <node>" (naming any figure still from the formula).
    /// Not on the wire (the decision's explanation says it); empty when
    /// read from there.
    #[serde(skip)]
    pub source: String,
    /// Why, in words.
    pub reason: String,
}

impl From<NodeFit> for v1::NodeFit {
    fn from(f: NodeFit) -> Self {
        v1::NodeFit {
            node: f.node,
            candidate: f.candidate,
            fits: f.fits,
            usable_bytes: f.usable_bytes,
            reserve_bytes: f.reserve_bytes,
            used_bytes: f.used_bytes,
            free_bytes: f.free_bytes,
            needed_bytes: f.needed_bytes,
            margin_bytes: f.margin_bytes,
            context_size: f.context_size,
            cache_type: f.cache_type,
            reason: f.reason,
            replicas: f.replicas,
        }
    }
}

impl From<v1::NodeFit> for NodeFit {
    fn from(f: v1::NodeFit) -> Self {
        NodeFit {
            node: f.node,
            candidate: f.candidate,
            fits: f.fits,
            usable_bytes: f.usable_bytes,
            reserve_bytes: f.reserve_bytes,
            used_bytes: f.used_bytes,
            free_bytes: f.free_bytes,
            needed_bytes: f.needed_bytes,
            margin_bytes: f.margin_bytes,
            context_size: f.context_size,
            cache_type: f.cache_type,
            replicas: f.replicas,
            source: String::new(),
            reason: f.reason,
        }
    }
}

/// How far a replica's split helpers (ggml-rpc-servers) have come: a split
/// is as ready as its least ready side. A replica that is not split has
/// no helpers and counts as Ready here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HelpersState {
    /// Every planned helper is Ready.
    Ready,
    /// A helper is missing or not Ready yet.
    Starting,
    /// A helper failed.
    Failed,
}

impl HelpersState {
    /// Of `planned` helpers, those whose states are reported in `states`
    /// (`None`: a state outside the enum).
    pub fn of(planned: usize, states: &[Option<InstanceState>]) -> HelpersState {
        if states.contains(&Some(InstanceState::Failed)) {
            HelpersState::Failed
        } else if states.len() < planned || states.iter().any(|s| *s != Some(InstanceState::Ready))
        {
            HelpersState::Starting
        } else {
            HelpersState::Ready
        }
    }
}

/// A request id split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaKey {
    /// Placement name.
    pub placement: String,
    /// Replica index.
    pub index: u32,
    /// Generation.
    pub generation: u64,
    /// 0 for the replica's llama-server; k ≥ 1 for the k-th helper
    /// ggml-rpc-server of a split.
    pub share: u32,
}

impl ReplicaKey {
    /// The deterministic StartInstance request id:
    /// `halo.NAME.rINDEX.gGEN`, or `halo.NAME.rINDEXsSHARE.gGEN` for a
    /// split's helper.
    pub fn request_id(&self) -> String {
        let share = if self.share == 0 {
            String::new()
        } else {
            format!("s{}", self.share)
        };
        format!(
            "{REQUEST_ID_PREFIX}{}.r{}{share}.g{}",
            self.placement, self.index, self.generation
        )
    }

    /// The key of helper `share` of the same replica and generation.
    pub fn helper(&self, share: u32) -> ReplicaKey {
        ReplicaKey {
            share,
            ..self.clone()
        }
    }

    /// Parses a request id made by [`ReplicaKey::request_id`]; `None` for
    /// ids the controller did not make.
    pub fn parse(id: &str) -> Option<ReplicaKey> {
        let rest = id.strip_prefix(REQUEST_ID_PREFIX)?;
        let (rest, generation) = rest.rsplit_once(".g")?;
        let (placement, index) = rest.rsplit_once(".r")?;
        check_name("placement", placement).ok()?;
        let (index, share) = match index.split_once('s') {
            Some((i, s)) => (i, s.parse().ok().filter(|&s| s > 0)?),
            None => (index, 0),
        };
        let key = ReplicaKey {
            placement: placement.to_owned(),
            index: index.parse().ok()?,
            generation: generation.parse().ok()?,
            share,
        };
        // Only the canonical spelling (no leading zeros or signs).
        (key.request_id() == id).then_some(key)
    }
}

impl Placement {
    /// The key of one replica.
    pub fn key(&self, r: &Replica) -> ReplicaKey {
        ReplicaKey {
            placement: self.name.clone(),
            index: r.index,
            generation: r.generation,
            share: 0,
        }
    }

    /// The options its llama-server instances start with (a split's host
    /// adds `--rpc`, `-ngl` and `-ts` to them).
    pub fn instance_options(&self) -> InstanceOptions {
        InstanceOptions {
            context_size: self.options.context_size,
            parallel: self.options.parallel,
            cache_type_k: self.options.cache_type_k.parse().ok(),
            cache_type_v: self.options.cache_type_v.parse().ok(),
            alias: self.model.clone(),
            extra_flags: self.options.extra_flags.clone(),
            allow_context_over_trained: self.options.allow_context_over_trained,
            ..InstanceOptions::default()
        }
    }
}

impl From<Placement> for v1::Placement {
    fn from(p: Placement) -> Self {
        let options = Some(p.instance_options().into());
        v1::Placement {
            replicas: p
                .replicas
                .iter()
                .map(|r| v1::Replica {
                    index: r.index,
                    node: r.node.clone(),
                    generation: r.generation,
                    request_id: p.key(r).request_id(),
                    instance: None,
                    helpers: Vec::new(),
                    start_refused: String::new(),
                    copy: None,
                    copy_failed: String::new(),
                })
                .collect(),
            name: p.name,
            role: p.role,
            model: p.model,
            model_id: p.model_id,
            pinned_node: p.pinned_node.unwrap_or_default(),
            options,
            estimate_bytes: p.estimate_bytes,
            priority: p.priority,
            paused: p.paused,
            split: p.split.map(Into::into),
            learned_bytes: p.learned_bytes,
            held: p.held.unwrap_or_default(),
            on_demand: p.on_demand,
            last_used_unix_ms: 0,
            unload_at_unix_ms: 0,
            copy_if_missing: p.copy_if_missing,
        }
    }
}

impl TryFrom<v1::Placement> for Placement {
    type Error = ConversionError;

    fn try_from(p: v1::Placement) -> Result<Self, Self::Error> {
        check_name("name", &p.name)?;
        let o = p.options.ok_or(ConversionError::Missing("options"))?;
        // An unknown wire value reads as llama.cpp's default, like unspecified.
        let cache = |v: i32| {
            cache_name_from_wire("cache_type", v)
                .unwrap_or_else(|_| super::CacheType::default().name().to_owned())
        };
        Ok(Placement {
            name: p.name,
            role: p.role,
            model: p.model,
            model_id: p.model_id,
            pinned_node: (!p.pinned_node.is_empty()).then_some(p.pinned_node),
            options: PlacementOptions {
                context_size: o.context_size,
                parallel: o.parallel.max(1),
                cache_type_k: cache(o.cache_type_k),
                cache_type_v: cache(o.cache_type_v),
                extra_flags: o.extra_flags,
                allow_context_over_trained: o.allow_context_over_trained,
            },
            estimate_bytes: p.estimate_bytes,
            priority: p.priority,
            replicas: p
                .replicas
                .into_iter()
                .map(|r| Replica {
                    index: r.index,
                    node: r.node,
                    generation: r.generation,
                })
                .collect(),
            paused: p.paused,
            split: p.split.map(Into::into),
            learned_bytes: p.learned_bytes,
            held: (!p.held.is_empty()).then_some(p.held),
            oom_kills: Vec::new(),
            on_demand: p.on_demand,
            placed_at_unix_ms: 0,
            copy_if_missing: p.copy_if_missing,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_round_trip_and_foreign_ids_are_not_ours() {
        let k = ReplicaKey {
            placement: "qwen3-coder-30b.2".into(),
            index: 3,
            generation: 17,
            share: 0,
        };
        assert_eq!(k.request_id(), "halo.qwen3-coder-30b.2.r3.g17");
        assert_eq!(ReplicaKey::parse(&k.request_id()), Some(k.clone()));
        let h = k.helper(2);
        assert_eq!(h.request_id(), "halo.qwen3-coder-30b.2.r3s2.g17");
        assert_eq!(ReplicaKey::parse(&h.request_id()), Some(h));
        assert_eq!(ReplicaKey::parse("halo.x.r1s0.g1"), None);
        assert_eq!(ReplicaKey::parse("halo.x.r1sx.g1"), None);
        assert_eq!(ReplicaKey::parse("halo.x.r01.g1"), None);
        assert_eq!(ReplicaKey::parse("halo.x.r+1.g1"), None);
        assert_eq!(ReplicaKey::parse("test-1"), None);
        assert_eq!(ReplicaKey::parse("halo.x.r1.gz"), None);
    }

    #[test]
    fn helper_keys_number_the_helpers_in_device_order_skipping_the_host() {
        let share = |node: &str, host: bool| SplitShare {
            node: node.into(),
            host,
            ..SplitShare::default()
        };
        let plan = SplitPlan {
            shares: vec![share("a", false), share("b", false), share("h", true)],
            traffic_bytes_per_token: 0,
            notes: Vec::new(),
        };
        let key = ReplicaKey::parse("halo.m.r0.g4").expect("ours");
        let ids: Vec<(String, &str)> = plan
            .helper_keys(&key)
            .map(|(k, s)| (k.request_id(), s.node.as_str()))
            .collect();
        assert_eq!(
            ids,
            [
                ("halo.m.r0s1.g4".to_owned(), "a"),
                ("halo.m.r0s2.g4".to_owned(), "b")
            ]
        );
    }

    #[test]
    fn a_split_is_as_ready_as_its_least_ready_helper() {
        use InstanceState::{Failed, Loading, Ready};
        assert_eq!(HelpersState::of(0, &[]), HelpersState::Ready);
        assert_eq!(
            HelpersState::of(2, &[Some(Ready), Some(Ready)]),
            HelpersState::Ready
        );
        assert_eq!(HelpersState::of(2, &[Some(Ready)]), HelpersState::Starting);
        assert_eq!(
            HelpersState::of(1, &[Some(Loading)]),
            HelpersState::Starting
        );
        assert_eq!(HelpersState::of(1, &[None]), HelpersState::Starting);
        assert_eq!(HelpersState::of(3, &[Some(Failed)]), HelpersState::Failed);
    }

    #[test]
    fn node_fits_survive_the_wire_but_their_source() {
        let f = NodeFit {
            node: "halo1".into(),
            candidate: true,
            fits: true,
            usable_bytes: 120,
            reserve_bytes: 4,
            used_bytes: 14,
            free_bytes: 102,
            needed_bytes: 38,
            margin_bytes: 1,
            context_size: 16384,
            cache_type: "q8_0".into(),
            replicas: 2,
            source: "formula".into(),
            reason: "fits".into(),
        };
        let back = NodeFit::from(v1::NodeFit::from(f.clone()));
        assert_eq!(
            back,
            NodeFit {
                source: String::new(),
                ..f
            }
        );
    }

    #[test]
    fn split_sizes_near_u64_max_saturate_instead_of_overflowing() {
        // Found with the controller_request fuzz target: a placement read
        // back with such a share panicked (debug) or wrapped into "fits".
        let share = SplitShare {
            node: "n".into(),
            total_bytes: u64::MAX,
            margin_bytes: 5,
            free_bytes: 10,
            ..SplitShare::default()
        };
        assert!(!share.fits());
        let plan = SplitPlan {
            shares: vec![share.clone(), share],
            traffic_bytes_per_token: 0,
            notes: Vec::new(),
        };
        assert_eq!(plan.bytes_on("n"), u64::MAX);
    }
}
