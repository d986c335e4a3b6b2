//! Observed state: one [`AgentLink`] per node keeps a Watch stream open to
//! its agent (snapshot, then changes and periodic memory samples that double
//! as heartbeats) and folds it into [`Observed`]. A stream that ends, errors
//! or stays silent longer than the grace period is dropped and redialled;
//! [`NodeObs::liveness`] turns "last heard" into Ready / Unreachable / Lost.

use crate::estimate::ObservedRecord;
use crate::nodes::{Liveness, NodeState, SplitCaps, instance_estimate_options};
use proto::domain::{
    AgentEvent, AgentEventKind, Instance, InstanceState, MemoryReport, ModelFile, ModelParams,
    ModelStatus, NodeIdentity, NodeStatus, ReplicaKey,
};
use proto::v1;
use proto::v1::agent_service_client::AgentServiceClient;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// Deadline of connecting to an agent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Deadline of one unary agent call (stops wait for the process to exit).
pub const CALL_TIMEOUT: Duration = proto::limits::AGENT_CALL_TIMEOUT;
/// Longest pause between redials.
const MAX_REDIAL: Duration = Duration::from_secs(2);
/// How often an open link asks the agent for its identity again (what can
/// change while it runs: its certificate's expiry, after a reload).
const IDENTITY_REFRESH: Duration = Duration::from_secs(60);

/// Timing of liveness.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Silence after which a node is Unreachable.
    pub grace: Duration,
    /// Silence after which a node is Lost and floating placements move.
    pub move_after: Duration,
    /// Memory sample period asked of agents (the heartbeat).
    pub heartbeat: Duration,
}

/// A node as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Name.
    pub name: String,
    /// Agent address, `host:port`.
    pub address: String,
    /// Roles (empty: take the agent's).
    pub roles: Vec<String>,
}

/// What the controller knows about one node.
#[derive(Debug, Clone)]
pub struct NodeObs {
    /// As configured.
    pub config: NodeConfig,
    /// As the agent describes itself.
    pub identity: Option<NodeIdentity>,
    /// Reserve the agent holds back.
    pub reserve_bytes: u64,
    /// Latest memory sample.
    pub memory: Option<MemoryReport>,
    /// Models on disk.
    pub models: Vec<ModelFile>,
    /// Instances by id.
    pub instances: BTreeMap<String, Instance>,
    /// When the agent was last heard from.
    pub last_heard: Option<Instant>,
    /// When the controller started watching.
    pub watching_since: Instant,
    /// Whether a stream is open.
    pub connected: bool,
    /// The extra llama-server flags the agent allows (from GetNode).
    pub allowed_flags: Option<Vec<String>>,
}

impl NodeObs {
    /// Roles: the configured ones, else the agent's.
    pub fn roles(&self) -> Vec<String> {
        if !self.config.roles.is_empty() {
            return self.config.roles.clone();
        }
        self.identity
            .as_ref()
            .map(|i| i.roles.clone())
            .unwrap_or_default()
    }

    /// Time since last heard (or since watching began).
    pub fn silent_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.last_heard.unwrap_or(self.watching_since))
    }

    /// Ready / Unreachable / Lost / Unknown at `now`.
    pub fn liveness(&self, now: Instant, t: &Timing) -> Liveness {
        let silent = self.silent_for(now);
        if silent > t.move_after {
            Liveness::Lost
        } else if silent > t.grace {
            Liveness::Unreachable
        } else if self.last_heard.is_none() {
            Liveness::Unknown
        } else {
            Liveness::Ready
        }
    }

    /// Live managed instances (not stopped) by request id.
    pub fn managed(&self) -> impl Iterator<Item = (ReplicaKey, &Instance)> {
        self.instances
            .values()
            .filter_map(|i| ReplicaKey::parse(&i.request_id).map(|k| (k, i)))
    }
}

impl From<Liveness> for NodeStatus {
    fn from(l: Liveness) -> Self {
        match l {
            Liveness::Ready => NodeStatus::Ready,
            Liveness::Unreachable => NodeStatus::Unreachable,
            Liveness::Lost => NodeStatus::Lost,
            Liveness::Unknown => NodeStatus::Unknown,
        }
    }
}

/// Every node's observed state, shared by links, reconcile and the API.
#[derive(Debug, Clone)]
pub struct Observed {
    nodes: Arc<RwLock<BTreeMap<String, NodeObs>>>,
    changed: Arc<Notify>,
    timing: Timing,
    /// Why the last start of a request id was refused (by its agent, or by
    /// this controller before sending it), while it has no instance.
    start_refusals: Arc<std::sync::Mutex<BTreeMap<String, String>>>,
    /// llama.cpp's projections asked of the agents.
    projections: crate::projections::Projections,
}

impl Observed {
    /// Observed state for `nodes`, none heard from yet.
    pub fn new(nodes: &[NodeConfig], timing: Timing) -> Observed {
        let now = Instant::now();
        let map = nodes
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    NodeObs {
                        config: n.clone(),
                        identity: None,
                        reserve_bytes: 0,
                        memory: None,
                        models: Vec::new(),
                        instances: BTreeMap::new(),
                        last_heard: None,
                        watching_since: now,
                        connected: false,
                        allowed_flags: None,
                    },
                )
            })
            .collect();
        Observed {
            nodes: Arc::new(RwLock::new(map)),
            changed: Arc::new(Notify::new()),
            timing,
            start_refusals: Arc::default(),
            projections: crate::projections::Projections::default(),
        }
    }

    /// llama.cpp's projections asked of the agents, and their answers.
    pub fn projections(&self) -> &crate::projections::Projections {
        &self.projections
    }

    /// The agent address of `node`.
    pub fn address(&self, node: &str) -> Option<String> {
        self.read().get(node).map(|n| n.config.address.clone())
    }

    /// What `node` reported of `model_id`'s header.
    pub fn model_params(&self, node: &str, model_id: &str) -> Option<ModelParams> {
        self.read()
            .get(node)?
            .models
            .iter()
            .find(|m| m.id == model_id)
            .and_then(|m| match &m.status {
                ModelStatus::Ok(p) => Some((**p).clone()),
                ModelStatus::Broken(_) => None,
            })
    }

    fn refusals(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.start_refusals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records that starting request `rid` was refused, and why (a refusal
    /// that will repeat: the start is retried with back-off, and people see
    /// the replica as failed with this reason).
    pub fn record_start_refused(&self, rid: &str, why: &str) {
        self.refusals().insert(rid.to_owned(), why.to_owned());
    }

    /// Forgets a refusal: the start went through, or it is no longer wanted.
    pub fn clear_start_refused(&self, rid: &str) {
        self.refusals().remove(rid);
    }

    /// Forgets the refusals of requests no placement wants any more
    /// (unplaced, moved, restarted under a new generation).
    pub fn retain_start_refused(&self, wanted: impl Fn(&str) -> bool) {
        self.refusals().retain(|rid, _| wanted(rid));
    }

    /// Why starting `rid` was last refused, if it was.
    pub fn start_refused(&self, rid: &str) -> Option<String> {
        self.refusals().get(rid).cloned()
    }

    /// The timing.
    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// A read view.
    pub fn read(&self) -> RwLockReadGuard<'_, BTreeMap<String, NodeObs>> {
        self.nodes
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, BTreeMap<String, NodeObs>> {
        self.nodes
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Wakes when anything changed.
    pub fn changed(&self) -> Arc<Notify> {
        self.changed.clone()
    }

    fn update(&self, node: &str, f: impl FnOnce(&mut NodeObs)) {
        if let Some(n) = self.write().get_mut(node) {
            f(n);
        }
        self.changed.notify_waiters();
    }

    /// Records a start or stop answer, unless the stream already reported
    /// a newer state of the instance.
    pub fn record_instance(&self, node: &str, i: Instance) {
        self.update(node, |n| {
            let newer = n
                .instances
                .get(&i.id)
                .is_none_or(|old| old.state_since_unix_ms < i.state_since_unix_ms);
            if newer {
                n.instances.insert(i.id.clone(), i);
            }
        });
    }

    /// The highest generation of any instance (live or stopped) an agent
    /// reports for placement `name`; 0 when none.
    pub fn max_generation(&self, name: &str) -> u64 {
        self.read()
            .values()
            .flat_map(|n| n.managed().map(|(k, _)| k))
            .filter(|k| k.placement == name)
            .map(|k| k.generation)
            .max()
            .unwrap_or(0)
    }

    /// Placement's view of every node at `now`.
    pub fn node_states(&self, now: Instant) -> Vec<NodeState> {
        let mut engine = self.projections.by_node();
        self.read()
            .values()
            .map(|n| {
                let models: BTreeMap<String, Arc<ModelParams>> = n
                    .models
                    .iter()
                    .filter_map(|m| match &m.status {
                        ModelStatus::Ok(p) => Some((m.id.clone(), Arc::new((**p).clone()))),
                        ModelStatus::Broken(_) => None,
                    })
                    .collect();
                NodeState {
                    name: n.config.name.clone(),
                    roles: n.roles(),
                    liveness: n.liveness(now, &self.timing),
                    usable_bytes: n.memory.as_ref().and_then(|m| m.usable_bytes),
                    reserve_bytes: n.reserve_bytes,
                    observed: n
                        .instances
                        .values()
                        .filter(|i| !matches!(i.state, InstanceState::Stopped))
                        .filter_map(|i| {
                            let b = instance_use(i, models.get(&i.model_id).map(|p| &**p))?;
                            Some((i.request_id.clone(), b))
                        })
                        .collect(),
                    loads: n.instances.values().filter_map(load_record).collect(),
                    engine: engine.remove(&n.config.name).unwrap_or_default(),
                    split: n
                        .identity
                        .as_ref()
                        .map(|id| SplitCaps {
                            llama_version: id.llama_version.clone(),
                            rpc_server: id.rpc_server_available,
                            gpu: !id.gpu_devices.is_empty(),
                        })
                        .unwrap_or_default(),
                    allowed_flags: n.allowed_flags.clone(),
                    pressure: n
                        .memory
                        .as_ref()
                        .and_then(|m| m.pressure.as_ref())
                        .map(|p| p.reason.clone()),
                    models,
                }
            })
            .collect()
    }
}

/// What a running instance holds by its load log, weights counted once:
/// with CPU repacking the logged weights hold the repacked tensors twice
/// (in the file mapping and in the repacked copy), and the header's weight
/// bytes (`params`) stand for them then, as in
/// [`crate::estimate::estimate_with_observed`].
pub fn instance_use(i: &Instance, params: Option<&ModelParams>) -> Option<u64> {
    i.observed
        .as_ref()?
        .resident_bytes(params.map(|p| p.weight_bytes))
}

/// The real load a ready managed instance reports: its model, the settings
/// it was started with and the buffers its log gave.
pub fn load_record(i: &Instance) -> Option<ObservedRecord> {
    let b = i.observed.filter(|b| !b.is_empty())?;
    (i.state == InstanceState::Ready && !i.model_id.is_empty())
        .then(|| ObservedRecord::new(&i.model_id, &instance_estimate_options(&i.options), b))
}

/// The TLS config of links to agents: `None` (plaintext, the default)
/// until the daemon sets it from its `tls_*` files.
static AGENT_TLS: std::sync::RwLock<Option<tonic::transport::ClientTlsConfig>> =
    std::sync::RwLock::new(None);

/// Makes every later [`agent_client`] speak mutual TLS with this config
/// (`https://`), or plaintext with `None`.
pub fn set_agent_tls(config: Option<tonic::transport::ClientTlsConfig>) {
    *AGENT_TLS.write().unwrap_or_else(|e| e.into_inner()) = config;
}

/// A gRPC client for the agent at `address`, dialled lazily.
pub fn agent_client(address: &str) -> Result<AgentServiceClient<Channel>, tonic::transport::Error> {
    let tls = AGENT_TLS.read().unwrap_or_else(|e| e.into_inner()).clone();
    let ep = match tls {
        None => Endpoint::from_shared(format!("http://{address}"))?,
        Some(c) => Endpoint::from_shared(format!("https://{address}"))?.tls_config(c)?,
    };
    let ep = ep
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true);
    // An agent's snapshot may be large (every model file), but not
    // unbounded: the agent's own encode limit.
    Ok(AgentServiceClient::new(ep.connect_lazy())
        .max_decoding_message_size(proto::limits::AGENT.max_response_bytes)
        .max_encoding_message_size(proto::limits::AGENT.max_request_bytes))
}

/// `msg` as a request carrying [`CALL_TIMEOUT`] as its gRPC deadline, so
/// the agent stops waiting when the controller does.
pub fn with_deadline<T>(msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.set_timeout(CALL_TIMEOUT);
    r
}

/// Keeps one node's Watch stream open and folds it into [`Observed`].
#[derive(Debug)]
pub struct AgentLink {
    node: NodeConfig,
    observed: Observed,
}

impl AgentLink {
    /// A link for `node`.
    pub fn new(node: NodeConfig, observed: Observed) -> AgentLink {
        AgentLink { node, observed }
    }

    /// Watches until cancelled, redialling with back-off.
    pub async fn run(self, token: CancellationToken) {
        let mut pause = Duration::from_millis(100);
        loop {
            let r = tokio::select! {
                () = token.cancelled() => return,
                r = self.session() => r,
            };
            self.observed
                .update(&self.node.name, |n| n.connected = false);
            match r {
                Ok(()) => pause = Duration::from_millis(100),
                Err(e) => {
                    tracing::debug!(node = %self.node.name, "agent link: {e}");
                    pause = (pause * 2).min(MAX_REDIAL);
                }
            }
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// GetNode on an open link; the identity it returns replaces the one
    /// held. A failure is left to the Watch stream to notice.
    async fn refresh_identity(&self, client: &mut AgentServiceClient<Channel>) {
        let call = client.get_node(v1::GetNodeRequest {});
        match tokio::time::timeout(CONNECT_TIMEOUT.max(self.observed.timing().grace), call).await {
            Ok(Ok(r)) => {
                if let Some(id) = r.into_inner().node.map(NodeIdentity::from) {
                    self.observed
                        .update(&self.node.name, |n| n.identity = Some(id));
                }
            }
            Ok(Err(e)) => tracing::debug!(node = %self.node.name, "GetNode: {}", e.message()),
            Err(_) => tracing::debug!(node = %self.node.name, "GetNode timed out"),
        }
    }

    /// One connection: GetNode, then the Watch stream until it ends or goes
    /// silent for the grace period.
    async fn session(&self) -> Result<(), String> {
        let t = self.observed.timing();
        let mut client = agent_client(&self.node.address).map_err(|e| e.to_string())?;
        let node = tokio::time::timeout(
            t.grace.max(CONNECT_TIMEOUT),
            client.get_node(v1::GetNodeRequest {}),
        )
        .await
        .map_err(|_| "GetNode timed out".to_owned())?
        .map_err(|e| e.message().to_owned())?
        .into_inner();
        let heartbeat_ms = u32::try_from(t.heartbeat.as_millis()).unwrap_or(u32::MAX);
        let mut stream = tokio::time::timeout(
            t.grace.max(CONNECT_TIMEOUT),
            client.watch(v1::WatchRequest {
                memory_period_ms: heartbeat_ms,
            }),
        )
        .await
        .map_err(|_| "Watch timed out".to_owned())?
        .map_err(|e| e.message().to_owned())?
        .into_inner();
        let identity = node.node.map(NodeIdentity::from);
        if let Some(id) = &identity
            && id.name != self.node.name
        {
            tracing::warn!(node = %self.node.name, agent = %id.name, "agent reports another node name");
        }
        let reserve = node.reserve_bytes;
        let allowed_flags = node.allowed_flags;
        // Heard from (Ready) only once the snapshot arrives: before it,
        // models and instances are unknown.
        self.observed.update(&self.node.name, |n| {
            n.identity = identity;
            n.reserve_bytes = reserve;
            n.allowed_flags = Some(allowed_flags);
        });
        let mut refresh =
            tokio::time::interval_at(Instant::now() + IDENTITY_REFRESH, IDENTITY_REFRESH);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut deadline = Instant::now() + t.grace;
        loop {
            let msg = tokio::select! {
                r = tokio::time::timeout_at(deadline, stream.message()) => r
                    .map_err(|_| format!("silent for {:?}", t.grace))?
                    .map_err(|e| e.message().to_owned())?,
                _ = refresh.tick() => {
                    self.refresh_identity(&mut client).await;
                    continue;
                }
            };
            deadline = Instant::now() + t.grace;
            let Some(ev) = msg else {
                return Err("stream ended".into());
            };
            let ev = match AgentEvent::try_from(ev) {
                Ok(ev) => ev,
                Err(e) => {
                    tracing::warn!(node = %self.node.name, "agent sent an invalid event: {e}");
                    continue;
                }
            };
            self.observed.update(&self.node.name, |n| {
                n.last_heard = Some(Instant::now());
                n.connected = true;
                match ev.kind {
                    AgentEventKind::Snapshot(s) => {
                        n.memory = Some(s.memory);
                        n.models = s.models;
                        n.instances = s.instances.into_iter().map(|i| (i.id.clone(), i)).collect();
                        if n.identity.is_none() {
                            n.identity = Some(s.node);
                        }
                    }
                    AgentEventKind::Instance(i) => {
                        n.instances.insert(i.id.clone(), *i);
                    }
                    AgentEventKind::Memory(m) => n.memory = Some(*m),
                    AgentEventKind::Models(m) => n.models = m,
                }
            });
        }
    }
}

/// Instances of every node by request id (for the API), a live one
/// preferred over a stopped one with the same id.
pub fn instances_by_request(observed: &Observed) -> HashMap<String, (String, Instance)> {
    let mut out: HashMap<String, (String, Instance)> = HashMap::new();
    for n in observed.read().values() {
        for i in n.instances.values().filter(|i| !i.request_id.is_empty()) {
            if proto::domain::instance::replaces(out.get(&i.request_id).map(|(_, old)| old)) {
                out.insert(i.request_id.clone(), (n.config.name.clone(), i.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::domain::{InstanceOptions, ObservedBuffers};

    const MIB: u64 = 1 << 20;

    fn instance(state: InstanceState, observed: ObservedBuffers) -> Instance {
        Instance {
            estimate_bytes: 0,
            oom_kill: None,
            kind: proto::domain::InstanceKind::LlamaServer,
            id: "i1".into(),
            model_id: "m.gguf".into(),
            state,
            options: InstanceOptions {
                context_size: 4096,
                parallel: 1,
                ..InstanceOptions::default()
            },
            pid: Some(1),
            port: 8080,
            endpoint: String::new(),
            restart_count: 0,
            last_error: String::new(),
            state_since_unix_ms: 1,
            observed: Some(observed),
            memory: None,
            generation: 1,
            api_key: String::new(),
            request_id: "p/0/1".into(),
            command_line: String::new(),
            model_file_changed: String::new(),
        }
    }

    fn observed_with(header_weights: u64, i: Instance) -> Vec<NodeState> {
        let t = Timing {
            grace: Duration::from_secs(5),
            move_after: Duration::from_secs(30),
            heartbeat: Duration::from_secs(1),
        };
        let obs = Observed::new(
            &[NodeConfig {
                name: "halo1".into(),
                address: "127.0.0.1:1".into(),
                roles: Vec::new(),
            }],
            t,
        );
        obs.update("halo1", |n| {
            n.models = vec![ModelFile {
                id: "m.gguf".into(),
                dir_index: 0,
                file_size_bytes: header_weights,
                parts: vec!["m.gguf".into()],
                status: ModelStatus::Ok(Box::new(ModelParams {
                    weight_bytes: header_weights,
                    ..ModelParams::default()
                })),
            }];
            n.instances.insert(i.id.clone(), i);
        });
        obs.node_states(Instant::now())
    }

    /// CPU repack: the file mapping (4685 MiB) holds every tensor, the
    /// repacked copy (3204 MiB) some again; the header says 4650 MiB.
    fn repacked() -> ObservedBuffers {
        ObservedBuffers {
            model_bytes: Some((4685 + 3204) * MIB),
            mapped_model_bytes: Some(4685 * MIB),
            kv_bytes: Some(512 * MIB),
            compute_bytes: Some(300 * MIB),
            output_bytes: Some(2 * MIB),
            ..ObservedBuffers::default()
        }
    }

    #[test]
    fn running_instances_count_mapped_and_repacked_weights_once() {
        let states = observed_with(4650 * MIB, instance(InstanceState::Ready, repacked()));
        let used = states[0].observed["p/0/1"];
        assert_eq!(used, (4650 + 512 + 300 + 2) * MIB, "header weights, once");
        assert!(used < repacked().total_bytes().unwrap_or(0));
        // Without repacking the logged weights stand.
        let plain = ObservedBuffers {
            model_bytes: Some(4685 * MIB),
            ..repacked()
        };
        let states = observed_with(4650 * MIB, instance(InstanceState::Ready, plain));
        assert_eq!(states[0].observed["p/0/1"], (4685 + 512 + 300 + 2) * MIB);
    }

    #[test]
    fn ready_instances_report_their_loads_with_their_settings() {
        let states = observed_with(4650 * MIB, instance(InstanceState::Ready, repacked()));
        let loads = &states[0].loads;
        assert_eq!(loads.len(), 1);
        assert_eq!(loads[0].model_id, "m.gguf");
        assert_eq!((loads[0].ctx, loads[0].parallel), (4096, 1));
        assert!(loads[0].flash_attn && !loads[0].kv_unified);
        assert_eq!(loads[0].buffers, repacked());
        // Loading: its figures count as used, but it is not a finished load.
        let states = observed_with(4650 * MIB, instance(InstanceState::Loading, repacked()));
        assert!(states[0].loads.is_empty());
        assert!(states[0].observed.contains_key("p/0/1"));
    }
}
