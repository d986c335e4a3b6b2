//! The instance supervisor: creates instances from checked start requests,
//! runs one task per instance that spawns (or re-adopts), watches and
//! restarts its process, stops them on request, and reports everything as
//! domain types and events.
//!
//! An instance runs llama-server, or ggml-rpc-server: a helper node's share
//! of a model split across nodes, used by one llama-server elsewhere. An
//! RPC server is started only with a current leader revision, a helper
//! request id (`halo.NAME.rIsK.gG`) and the one client IP allowed to use
//! it; it listens on loopback behind a proxy process of the agent's
//! ([`rpcproxy`]) in its process group, which forwards only that client's
//! connections. It is never restarted: a new one would hold none of the
//! host's tensors, so a failure is reported and the controller re-plans
//! the split.
//!
//! Invariants:
//! * A process is spawned only for a record already persisted, and its
//!   identity (pid + start time) is persisted before it is reported; an agent
//!   restart re-adopts exactly the processes it recorded, after checking pid,
//!   start time and the exact argv (which holds the instance's own API key
//!   path, unique in this state directory; a ggml-rpc-server's argv names
//!   nothing of the agent's, so its working directory, the instance
//!   directory, is checked too).
//! * A llama-server the agent did not start is reported as `Unmanaged` and
//!   never signalled.
//! * Agent shutdown leaves instances running (systemd `KillMode=process`);
//!   only an explicit stop terminates a process, and a stop waits for it.
//! * The table lock is a `std` mutex never held across an await.

mod argv;
mod cgroup;
mod health;
mod instance;
mod logs;
mod modelfile;
mod oom;
mod pressure;
pub(crate) mod rpcproxy;

pub use crate::state::FileIdentity;
pub use argv::LOG_VERBOSITY;
pub(crate) use argv::environment as instance_environment;
pub use logs::{LogRing, LogTail, RING_LINES};

use crate::config::{AllowedFlag, Config};
use crate::error::Error;
use crate::probe::Probe;
use crate::procfs::{self, ProcessId};
use crate::scan::{self, ScannedModel, Scanner};
use crate::state::{
    Desired, InstanceRecord, MAX_STOPPED_RECORDS, STATE_VERSION, StateFile, StateStore,
};
use proto::domain::{
    AgentEvent, AgentEventKind, Instance, InstanceKind, InstanceOptions, InstanceState, LogLine,
    MemoryReport, ModelFile, ModelStatus, NodeIdentity, ReplicaKey, Snapshot,
};
use proto::units::now_unix_ms;
use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Events buffered per watcher before it counts as lagging.
/// `oom_score_adj` given to every llama-server and ggml-rpc-server the
/// agent starts: when memory runs out, the kernel kills an instance (which
/// the agent restarts with back-off, or reports failed for an RPC server),
/// not the agent (the systemd unit runs it at -500).
pub const INSTANCE_OOM_SCORE_ADJ: i32 = 500;

const EVENT_BUFFER: usize = 1024;
/// Log lines buffered per follower before it counts as lagging.
const LOG_BUFFER: usize = 1024;
/// Bytes of an adopted instance's log read back into its ring.
const ADOPT_LOG_BYTES: u64 = 64 * 1024;
/// Longest start request id.
const MAX_REQUEST_ID_LEN: usize = 128;
/// Longest command line reported for an unmanaged server.
const MAX_COMMAND_LINE: usize = 1024;

/// A start request, checked at the wire boundary: the domain type the
/// controller builds, converted once in `service.rs`.
pub use proto::domain::StartRequest;

/// What a start decided before its record exists.
#[derive(Debug)]
struct Planned {
    id: String,
    dir: std::path::PathBuf,
    port: u16,
    internal_port: Option<u16>,
    argv: Vec<String>,
    api_key: String,
    model_file: Option<FileIdentity>,
}

/// The supervisor's handle; cheap to clone.
#[derive(Debug, Clone)]
pub struct Supervisor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: Arc<Config>,
    /// Changes only by [`Supervisor::set_tls_cert_not_after`].
    node: std::sync::RwLock<NodeIdentity>,
    probe: Probe,
    /// Memory pressure across readings.
    pressure: Mutex<pressure::PressureWatch>,
    store: Arc<StateStore>,
    scanner: Arc<Mutex<Scanner>>,
    table: Mutex<Table>,
    events: broadcast::Sender<AgentEvent>,
    /// Serializes start requests (idempotency check, port choice).
    start_lock: tokio::sync::Mutex<()>,
    /// Serializes state file writes; each write takes a fresh snapshot.
    persist_lock: tokio::sync::Mutex<()>,
    tracker: TaskTracker,
    shutdown: CancellationToken,
}

#[derive(Debug, Default)]
struct Table {
    instances: BTreeMap<String, Slot>,
    highest_leader_revision: u64,
}

/// One instance: its persisted record and its live status.
#[derive(Debug)]
struct Slot {
    record: InstanceRecord,
    state: InstanceState,
    state_since_unix_ms: u64,
    api_key: String,
    ring: LogRing,
    log_tx: broadcast::Sender<LogLine>,
    /// Cancelled when a stop is requested.
    stop: CancellationToken,
    /// Cancelled when the instance reached `Stopped` (or its task ended).
    finished: CancellationToken,
    /// What happened to the model file since the instance started (empty
    /// while it is the same file).
    model_file_changed: String,
}

impl Slot {
    fn new(record: InstanceRecord, state: InstanceState, api_key: String) -> Slot {
        Slot {
            record,
            state,
            state_since_unix_ms: now_unix_ms(),
            api_key,
            ring: LogRing::default(),
            log_tx: broadcast::channel(LOG_BUFFER).0,
            stop: CancellationToken::new(),
            finished: CancellationToken::new(),
            model_file_changed: String::new(),
        }
    }

    fn view(&self, config: &Config) -> Instance {
        let r = &self.record;
        let endpoint = match r.kind {
            InstanceKind::LlamaServer => format!("http://{}:{}", config.endpoint_host(), r.port),
            InstanceKind::RpcServer => format!("{}:{}", config.endpoint_host(), r.port),
        };
        Instance {
            kind: r.kind,
            id: r.id.clone(),
            model_id: r.model_id.clone(),
            state: self.state,
            options: r.options.clone(),
            pid: r.process.map(|p| p.pid),
            port: r.port,
            endpoint,
            restart_count: r.restart_count,
            last_error: r.last_error.clone(),
            state_since_unix_ms: self.state_since_unix_ms,
            observed: r.observed,
            memory: None,
            generation: r.generation,
            api_key: self.api_key.clone(),
            request_id: r.request_id.clone(),
            command_line: String::new(),
            model_file_changed: self.model_file_changed.clone(),
            oom_kill: r.oom_kill.clone(),
            estimate_bytes: r.estimate_bytes,
        }
    }
}

impl Supervisor {
    /// A supervisor over a locked state directory. Reads the state file;
    /// nothing is spawned or adopted until [`Supervisor::boot`].
    pub fn new(
        config: Arc<Config>,
        store: StateStore,
        node: NodeIdentity,
        shutdown: CancellationToken,
    ) -> Result<Supervisor, Error> {
        let state = store.load()?;
        let mut table = Table {
            highest_leader_revision: state.highest_leader_revision,
            ..Table::default()
        };
        for record in state.instances {
            let api_key = std::fs::read_to_string(store.instance_dir(&record.id).join("api-key"))
                .map(|k| k.trim().to_owned())
                .unwrap_or_default();
            let state = match record.desired {
                Desired::Running => InstanceState::Starting,
                Desired::Stopped => InstanceState::Stopped,
            };
            table
                .instances
                .insert(record.id.clone(), Slot::new(record, state, api_key));
        }
        Ok(Supervisor {
            inner: Arc::new(Inner {
                probe: Probe::new(config.probe_root.clone()),
                pressure: Mutex::default(),
                scanner: Arc::new(Mutex::new(Scanner::new(config.model_dirs.clone()))),
                config,
                node: std::sync::RwLock::new(node),
                store: Arc::new(store),
                table: Mutex::new(table),
                events: broadcast::channel(EVENT_BUFFER).0,
                start_lock: tokio::sync::Mutex::new(()),
                persist_lock: tokio::sync::Mutex::new(()),
                tracker: TaskTracker::new(),
                shutdown,
            }),
        })
    }

    /// Re-adopts the live processes the state file records, restarts
    /// instances whose process is gone, finishes stops an earlier run did
    /// not, and scans the model directories.
    pub async fn boot(&self) -> Result<(), Error> {
        let records: Vec<InstanceRecord> = self
            .inner
            .table()
            .instances
            .values()
            .map(|s| s.record.clone())
            .collect();
        for record in records {
            let found = self.inner.find_own_process(&record);
            match record.desired {
                Desired::Stopped => {
                    if let Some(p) = found {
                        tracing::warn!(instance = %record.id, pid = p.pid, "stopping a process an earlier run was stopping");
                        instance::terminate_adopted(p, self.inner.config.stop_timeout).await;
                    }
                    self.inner.update(&record.id, |s| {
                        s.record.process = None;
                        s.finished.cancel();
                    });
                }
                Desired::Running => {
                    let begin = match found {
                        Some(p) => {
                            tracing::info!(instance = %record.id, pid = p.pid, kind = record.kind.as_str(), "re-adopted");
                            let addr = self.inner.ready_addr(&record);
                            let ready =
                                instance::probe_ready(record.kind, addr, Duration::from_secs(1))
                                    .await;
                            let state = if ready {
                                InstanceState::Ready
                            } else {
                                InstanceState::Loading
                            };
                            self.inner.update(&record.id, |s| {
                                s.record.process = Some(p);
                                s.state = state;
                                s.state_since_unix_ms = now_unix_ms();
                            });
                            instance::Begin::Adopted(p, ready)
                        }
                        None if record.kind == InstanceKind::RpcServer => {
                            self.inner.boot_rpc_without_process(&record)
                        }
                        // Killed for lack of memory: it would be again.
                        None if record.oom_kill.is_some() => {
                            self.inner.update(&record.id, |s| {
                                s.state = InstanceState::Failed;
                                s.state_since_unix_ms = now_unix_ms();
                            });
                            instance::Begin::Failed
                        }
                        None => {
                            if let Some(p) = record.process {
                                let reason = format!(
                                    "llama-server (pid {}) was gone when the agent started",
                                    p.pid
                                );
                                tracing::warn!(instance = %record.id, "{reason}; restarting");
                                self.inner.update(&record.id, |s| {
                                    s.record.process = None;
                                    s.record.last_error = reason;
                                    s.record.restart_count += 1;
                                    s.record.observed = None;
                                });
                            }
                            instance::Begin::Spawn
                        }
                    };
                    self.inner.spawn_task(&record.id, begin);
                }
            }
        }
        self.inner.prune_stopped();
        self.inner.persist().await?;
        self.rescan().await;
        Ok(())
    }

    /// Stops taking work and waits (bounded) for instance tasks to let go
    /// of their processes, which keep running.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.tracker.close();
        if tokio::time::timeout(grace, self.inner.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("instance tasks did not finish within {grace:?}");
        }
        if let Err(e) = self.inner.persist().await {
            tracing::error!("final state write failed: {e}");
        }
    }

    /// The node's identity.
    pub fn node(&self) -> NodeIdentity {
        self.inner
            .node
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Records the not-after of the certificate the agent serves now (after
    /// a certificate reload), reported by GetNode and Watch snapshots.
    pub fn set_tls_cert_not_after(&self, unix: Option<i64>) {
        self.inner
            .node
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .tls_cert_not_after_unix = unix;
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// A receiver of instance, memory and model events.
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.inner.events.subscribe()
    }

    /// Re-reads the model directories (unchanged files from cache) and
    /// publishes the list.
    pub async fn rescan(&self) -> Vec<ModelFile> {
        let scanner = self.inner.scanner.clone();
        let models = tokio::task::spawn_blocking(move || {
            let mut s = scanner.lock().unwrap_or_else(|p| p.into_inner());
            s.scan().iter().map(|m| m.file.clone()).collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        self.inner.emit(AgentEventKind::Models(models.clone()));
        models
    }

    /// Canonical path of one part of a model the last scan lists (see
    /// [`crate::scan::Scanner::part_path`]).
    pub fn model_part_path(&self, id: &str, part: usize) -> Option<std::path::PathBuf> {
        self.inner.scanner().part_path(id, part)
    }

    /// Accepts a command carrying the leader's revision: refused when
    /// lower than the highest seen, a raise persisted.
    pub async fn accept_leader(&self, rev: u64) -> Result<(), Error> {
        if self.inner.fence(rev)? {
            self.inner.persist().await?;
        }
        Ok(())
    }

    /// Models of the last scan.
    pub fn models(&self) -> Vec<ModelFile> {
        self.inner
            .scanner()
            .models()
            .iter()
            .map(|m| m.file.clone())
            .collect()
    }

    /// Every instance, managed then unmanaged, with live memory use.
    pub async fn instances(&self) -> Vec<Instance> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.instances_blocking())
            .await
            .unwrap_or_default()
    }

    /// One memory reading with every llama-server's use.
    pub async fn memory(&self) -> MemoryReport {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut pids = inner.managed_pids();
            pids.extend(inner.unmanaged_pids(&pids));
            inner.reading(&pids)
        })
        .await
        .unwrap_or_default()
    }

    /// The controller's memory estimate of each instance that was started
    /// with one, by instance id.
    pub fn estimates(&self) -> std::collections::HashMap<String, u64> {
        self.inner
            .table()
            .instances
            .values()
            .filter(|s| s.record.estimate_bytes > 0)
            .map(|s| (s.record.id.clone(), s.record.estimate_bytes))
            .collect()
    }

    /// llama-server's own `/metrics` text from the instance on `port` (with
    /// its API key), or `None` when it does not answer within `deadline`.
    pub async fn instance_metrics(
        &self,
        port: u16,
        api_key: &str,
        deadline: Duration,
    ) -> Option<String> {
        health::metrics(self.inner.health_addr(port), api_key, deadline).await
    }

    /// Everything a new watcher starts from.
    pub async fn snapshot(&self) -> Snapshot {
        let inner = self.inner.clone();
        let (memory, instances) = tokio::task::spawn_blocking(move || {
            let instances = inner.instances_blocking();
            let pids: Vec<u32> = instances.iter().filter_map(|i| i.pid).collect();
            (inner.reading(&pids), instances)
        })
        .await
        .unwrap_or_default();
        Snapshot {
            node: self.node(),
            memory,
            models: self.models(),
            instances,
        }
    }

    /// Starts an instance, or returns the one an earlier request with the
    /// same request id started.
    pub async fn start(&self, req: StartRequest) -> Result<Instance, Error> {
        let inner = &self.inner;
        let _serial = inner.start_lock.lock().await;
        if inner.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        check_request_id(&req.request_id)?;
        check_kind(&req)?;
        if inner.fence(req.leader_revision)? {
            inner.persist().await?;
        }
        let existing = inner.table().instances.values().find_map(|s| {
            (s.record.request_id == req.request_id)
                .then(|| (s.record.clone(), s.view(&inner.config)))
        });
        if let Some((record, view)) = existing {
            if record.kind == req.kind
                && record.model_id == req.model_id
                && record.options == req.options
                && record.generation == req.generation
            {
                return Ok(view);
            }
            return Err(Error::RequestIdReused {
                request_id: req.request_id,
                instance: record.id,
            });
        }
        let planned = match req.kind {
            InstanceKind::LlamaServer => self.plan_llama_server(&req).await?,
            InstanceKind::RpcServer => inner.plan_rpc_server(&req)?,
        };
        let Planned {
            id,
            dir,
            port,
            internal_port,
            argv,
            api_key,
            model_file,
        } = planned;
        let record = InstanceRecord {
            id: id.clone(),
            request_id: req.request_id,
            kind: req.kind,
            model_id: req.model_id,
            options: req.options,
            generation: req.generation,
            port,
            internal_port,
            argv,
            created_at_unix_ms: now_unix_ms(),
            desired: Desired::Running,
            process: None,
            proxy: None,
            restart_count: 0,
            last_error: String::new(),
            observed: None,
            stopped_at_unix_ms: None,
            model_file,
            estimate_bytes: req.estimate_bytes,
            oom_kill: None,
        };
        tracing::info!(instance = %id, kind = req.kind.as_str(), model = %record.model_id, port, "starting instance");
        let view = {
            let slot = Slot::new(record, InstanceState::Starting, api_key);
            let view = slot.view(&inner.config);
            inner.table().instances.insert(id.clone(), slot);
            view
        };
        if let Err(e) = inner.persist().await {
            inner.table().instances.remove(&id);
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        inner.emit(AgentEventKind::Instance(Box::new(view.clone())));
        inner.spawn_task(&id, instance::Begin::Spawn);
        Ok(view)
    }

    /// Checks a llama-server start against the scan and the allow-list,
    /// picks its port and writes its directory and API key.
    async fn plan_llama_server(&self, req: &StartRequest) -> Result<Planned, Error> {
        let inner = &self.inner;
        scan::check_model_id(&req.model_id).map_err(|reason| Error::BadModelId {
            id: req.model_id.clone(),
            reason,
        })?;
        let model = match inner.lookup(&req.model_id) {
            Some(m) => m,
            None => {
                // Files may have appeared since the last scan.
                self.rescan().await;
                inner
                    .lookup(&req.model_id)
                    .ok_or_else(|| Error::UnknownModel {
                        id: req.model_id.clone(),
                    })?
            }
        };
        let params = match &model.file.status {
            ModelStatus::Ok(p) => p,
            ModelStatus::Broken(reason) => {
                return Err(Error::BrokenModel {
                    id: req.model_id.clone(),
                    reason: reason.clone(),
                });
            }
        };
        // The scan resolved the path; resolve again now, in case a symlink
        // was swapped since.
        let path = model
            .path
            .canonicalize()
            .ok()
            .filter(|p| scan::is_inside(&inner.config.model_dirs, p) && p.is_file())
            .ok_or_else(|| Error::ModelEscapes {
                id: req.model_id.clone(),
            })?;
        // What every restart must find again under this name.
        let model_file = FileIdentity::of(&path).ok();
        let o = &req.options;
        if params.context_length > 0
            && u64::from(o.context_size) > params.context_length
            && !o.allow_context_over_trained
        {
            return Err(Error::ContextOverTrained {
                id: req.model_id.clone(),
                requested: o.context_size,
                trained: params.context_length,
            });
        }
        let extra = inner.allowed_extra(&o.extra_flags)?;
        let port = inner.free_port(inner.config.port_range)?;
        let id = new_instance_id();
        let dir = inner.store.instance_dir(&id);
        let api_key = new_api_key();
        let key_file = dir.join("api-key");
        prepare_instance_dir(&dir, Some((key_file.as_path(), api_key.as_str())))?;
        let argv = argv::build(
            &inner.config,
            &argv::ArgvSpec {
                model: &path,
                port,
                options: o,
                api_key_file: &key_file,
                extra: &extra,
            },
        );
        Ok(Planned {
            id,
            dir,
            port,
            internal_port: None,
            argv,
            api_key,
            model_file,
        })
    }

    /// Stops an instance and waits (bounded) until its process is gone.
    /// Stopping a stopped instance succeeds.
    pub async fn stop(&self, id: &str, leader_revision: u64) -> Result<Instance, Error> {
        let inner = &self.inner;
        if id.starts_with(UNMANAGED_PREFIX) {
            return Err(Error::Unmanaged { id: id.to_owned() });
        }
        if inner.fence(leader_revision)? {
            inner.persist().await?;
        }
        let (stop, finished, changed) = {
            let mut t = inner.table();
            let slot = t
                .instances
                .get_mut(id)
                .ok_or_else(|| Error::UnknownInstance { id: id.to_owned() })?;
            let changed = slot.record.desired == Desired::Running;
            if changed {
                slot.record.desired = Desired::Stopped;
                slot.record.stopped_at_unix_ms = Some(now_unix_ms());
                slot.state = InstanceState::Stopping;
                slot.state_since_unix_ms = now_unix_ms();
            }
            (slot.stop.clone(), slot.finished.clone(), changed)
        };
        if changed {
            tracing::info!(instance = %id, "stopping instance");
            inner.persist().await?;
            inner.emit_instance(id);
            stop.cancel();
        }
        let bound = inner.config.stop_timeout + instance::DRAIN_MAX + Duration::from_secs(10);
        if tokio::time::timeout(bound, finished.cancelled())
            .await
            .is_err()
        {
            tracing::warn!(instance = %id, "stop did not finish within {bound:?}");
        }
        let view = inner
            .view(id)
            .ok_or_else(|| Error::UnknownInstance { id: id.to_owned() });
        if changed {
            inner.prune_stopped();
        }
        view
    }

    /// The last `lines` log lines of an instance and, when `follow`, a
    /// receiver of new ones with a token cancelled when the instance stops.
    pub fn tail(&self, id: &str, lines: usize, follow: bool) -> Result<LogTailHandle, Error> {
        let t = self.inner.table();
        let slot = t
            .instances
            .get(id)
            .ok_or_else(|| Error::UnknownInstance { id: id.to_owned() })?;
        // Subscribing under the lock that pushes lines: nothing is missed or
        // sent twice between the backlog and the live lines.
        let live = follow.then(|| (slot.log_tx.subscribe(), slot.finished.clone()));
        Ok(LogTailHandle {
            backlog: slot.ring.last(lines),
            live,
        })
    }
}

/// What [`Supervisor::tail`] returns.
#[derive(Debug)]
pub struct LogTailHandle {
    /// Lines already written, oldest first.
    pub backlog: Vec<LogLine>,
    /// New lines, and a token cancelled when the instance stops.
    pub live: Option<(broadcast::Receiver<LogLine>, CancellationToken)>,
}

/// Id prefix of unmanaged servers (`unmanaged-PID`).
pub const UNMANAGED_PREFIX: &str = "unmanaged-";

impl Inner {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn scanner(&self) -> MutexGuard<'_, Scanner> {
        self.scanner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lookup(&self, id: &str) -> Option<ScannedModel> {
        self.scanner().lookup(id).cloned()
    }

    /// Applies `f` to a slot; false when the instance is unknown.
    fn update(&self, id: &str, f: impl FnOnce(&mut Slot)) -> bool {
        match self.table().instances.get_mut(id) {
            Some(s) => {
                f(s);
                true
            }
            None => false,
        }
    }

    fn view(&self, id: &str) -> Option<Instance> {
        self.table().instances.get(id).map(|s| s.view(&self.config))
    }

    fn emit(&self, kind: AgentEventKind) {
        // No receivers is fine.
        let _ = self.events.send(AgentEvent {
            at_unix_ms: now_unix_ms(),
            kind,
        });
    }

    fn emit_instance(&self, id: &str) {
        if let Some(v) = self.view(id) {
            self.emit(AgentEventKind::Instance(Box::new(v)));
        }
    }

    /// Sets a state (and optionally the last error) and publishes it. A
    /// stopping instance only moves on to `Stopped`: the task may still
    /// report progress of a spawn the stop overtook.
    fn set_state(&self, id: &str, state: InstanceState, last_error: Option<String>) {
        let mut changed = false;
        self.update(id, |s| {
            if s.state == InstanceState::Stopping && state != InstanceState::Stopped {
                return;
            }
            changed = true;
            s.state = state;
            s.state_since_unix_ms = now_unix_ms();
            if let Some(e) = last_error {
                s.record.last_error = e;
            }
        });
        if changed {
            tracing::info!(instance = %id, %state, "instance state");
            self.emit_instance(id);
        }
    }

    /// Accepts `rev` when it is not below the highest seen; true when it
    /// raised the highest (the caller persists).
    fn fence(&self, rev: u64) -> Result<bool, Error> {
        let mut t = self.table();
        if rev < t.highest_leader_revision {
            return Err(Error::StaleLeader {
                got: rev,
                highest: t.highest_leader_revision,
            });
        }
        let raised = rev > t.highest_leader_revision;
        t.highest_leader_revision = rev;
        Ok(raised)
    }

    fn allowed_extra(&self, names: &[String]) -> Result<Vec<AllowedFlag>, Error> {
        names
            .iter()
            .map(|n| {
                self.config
                    .allowed_flags
                    .iter()
                    .find(|f| f.entry == n.trim())
                    .cloned()
                    .ok_or_else(|| Error::FlagNotAllowed {
                        flag: n.clone(),
                        allowed: self
                            .config
                            .allowed_flags
                            .iter()
                            .map(|f| f.entry.clone())
                            .collect(),
                    })
            })
            .collect()
    }

    /// A port of `range` that no running instance holds and that can be
    /// bound right now.
    fn free_port(&self, range: crate::config::PortRange) -> Result<u16, Error> {
        let taken: HashSet<u16> = self
            .table()
            .instances
            .values()
            .filter(|s| s.record.desired == Desired::Running)
            .map(|s| s.record.port)
            .collect();
        range
            .iter()
            .filter(|p| !taken.contains(p))
            .find(|&p| std::net::TcpListener::bind((self.config.instance_host, p)).is_ok())
            .ok_or(Error::PortsExhausted {
                range: range.to_string(),
                count: range.len(),
            })
    }

    /// Where `/health` of an instance on `port` answers.
    fn health_addr(&self, port: u16) -> SocketAddr {
        let ip = match self.config.instance_host {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        SocketAddr::new(ip, port)
    }

    /// The recorded process of `record` if it is still the one this agent
    /// started: same pid, same start time, same argv. Failing that, a
    /// process running exactly the recorded argv (the agent may have died
    /// between spawning it and recording its pid); the argv names this
    /// instance's own key file, so no other process matches it.
    fn find_own_process(&self, record: &InstanceRecord) -> Option<ProcessId> {
        let same_argv = |pid| procfs::cmdline(pid).as_deref() == Some(record.argv.as_slice());
        if let Some(p) = record.process {
            if procfs::is_alive(p) && same_argv(p.pid) {
                return Some(p);
            }
            if procfs::start_ticks(p.pid).is_some() {
                tracing::warn!(instance = %record.id, pid = p.pid, "pid now names another process; not adopting it");
            }
        }
        // A ggml-rpc-server's argv names no file of this agent; its working
        // directory, the instance directory, does.
        let dir = self.store.instance_dir(&record.id);
        procfs::find_by_cmdline(&record.argv)
            .into_iter()
            .filter(|&pid| {
                record.kind == InstanceKind::LlamaServer
                    || std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|d| d == dir)
            })
            .filter_map(procfs::identify)
            .find(|p| procfs::is_alive(*p))
    }

    /// Where an instance answers its readiness probe: llama-server's HTTP
    /// port, or the loopback port of an RPC server behind the proxy.
    fn ready_addr(&self, record: &InstanceRecord) -> SocketAddr {
        match record.internal_port {
            Some(p) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), p),
            None => self.health_addr(record.port),
        }
    }

    /// Checks an RPC server start against this node, picks its ports and
    /// makes its directory (no API key: the proxy admits one client IP).
    fn plan_rpc_server(&self, req: &StartRequest) -> Result<Planned, Error> {
        if !crate::config::is_executable(&self.config.rpc_server) {
            return Err(Error::RpcServerUnavailable {
                path: self.config.rpc_server.clone(),
            });
        }
        let port = self.free_port(self.config.rpc_port_range)?;
        let internal = loopback_port()?;
        let id = new_instance_id();
        let dir = self.store.instance_dir(&id);
        prepare_instance_dir(&dir, None)?;
        let argv = argv::build_rpc(
            &self.config,
            &argv::RpcArgvSpec {
                host: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: internal,
                options: &req.options,
            },
        );
        Ok(Planned {
            id,
            dir,
            port,
            internal_port: Some(internal),
            argv,
            api_key: String::new(),
            model_file: None,
        })
    }

    /// Boot of an RPC server whose process is not running: one that never
    /// spawned (the agent died first) is started; one that ran and is gone,
    /// or had failed, stays `Failed` and is not restarted.
    fn boot_rpc_without_process(&self, record: &InstanceRecord) -> instance::Begin {
        let reason = match record.process {
            Some(p) => format!(
                "ggml-rpc-server (pid {}) was gone when the agent started; not restarted \
                 (a new one would hold none of the host's tensors)",
                p.pid
            ),
            None if record.last_error.is_empty() => return instance::Begin::Spawn,
            None => record.last_error.clone(),
        };
        tracing::warn!(instance = %record.id, "{}", reason.lines().next().unwrap_or_default());
        self.update(&record.id, |s| {
            s.record.process = None;
            s.record.last_error = reason;
            s.state = InstanceState::Failed;
            s.state_since_unix_ms = now_unix_ms();
        });
        instance::Begin::Failed
    }

    fn spawn_task(self: &Arc<Self>, id: &str, begin: instance::Begin) {
        let task = {
            let t = self.table();
            let Some(slot) = t.instances.get(id) else {
                return;
            };
            instance::InstanceTask::new(
                self.clone(),
                id.to_owned(),
                slot.record.kind,
                slot.stop.clone(),
                slot.finished.clone(),
                self.store
                    .instance_dir(id)
                    .join(log_file_name(slot.record.kind)),
                begin,
            )
        };
        self.tracker.spawn(task.run(self.shutdown.clone()));
    }

    /// Drops the oldest stopped records beyond [`MAX_STOPPED_RECORDS`].
    fn prune_stopped(&self) {
        let mut t = self.table();
        let mut stopped: Vec<(u64, String)> = t
            .instances
            .values()
            .filter(|s| s.record.desired == Desired::Stopped)
            .map(|s| {
                (
                    s.record.stopped_at_unix_ms.unwrap_or(0),
                    s.record.id.clone(),
                )
            })
            .collect();
        if stopped.len() <= MAX_STOPPED_RECORDS {
            return;
        }
        stopped.sort();
        let excess = stopped.len() - MAX_STOPPED_RECORDS;
        for (_, id) in stopped.into_iter().take(excess) {
            t.instances.remove(&id);
            let _ = std::fs::remove_dir_all(self.store.instance_dir(&id));
        }
    }

    /// Writes the state file from the table as it is now.
    async fn persist(&self) -> Result<(), Error> {
        let _serial = self.persist_lock.lock().await;
        let file = {
            let t = self.table();
            StateFile {
                version: STATE_VERSION,
                highest_leader_revision: t.highest_leader_revision,
                instances: t.instances.values().map(|s| s.record.clone()).collect(),
            }
        };
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.save(&file))
            .await
            .map_err(|e| Error::Io {
                context: "state write".into(),
                source: std::io::Error::other(e),
            })?
            .map_err(Error::from)
    }

    /// One memory reading with `pids`' use (the llama-servers), and the
    /// node's memory pressure.
    fn reading(&self, pids: &[u32]) -> MemoryReport {
        let mut report = self.probe.report(pids);
        let t = pressure::Thresholds {
            psi_some: self.config.pressure_psi_some,
            min_available: self.config.pressure_min_available_bytes,
        };
        self.pressure
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .assess(&self.probe, t, &mut report, &self.managed_pids());
        report
    }

    fn managed_pids(&self) -> Vec<u32> {
        self.table()
            .instances
            .values()
            .filter_map(|s| s.record.process.map(|p| p.pid))
            .collect()
    }

    /// llama-servers running on this machine that are not ours. Servers
    /// whose command line names this agent's state directory are ours
    /// (being spawned right now) and are left out.
    fn unmanaged_pids(&self, ours: &[u32]) -> Vec<u32> {
        let mine = format!("{}/instances/", self.store.dir().display());
        self.probe
            .find_llama_servers()
            .into_iter()
            .filter(|pid| !ours.contains(pid))
            .filter(|&pid| {
                !procfs::cmdline(pid).is_some_and(|argv| argv.iter().any(|a| a.starts_with(&mine)))
            })
            .collect()
    }

    fn instances_blocking(&self) -> Vec<Instance> {
        let mut list: Vec<Instance> = self
            .table()
            .instances
            .values()
            .map(|s| s.view(&self.config))
            .collect();
        for i in &mut list {
            i.memory = i.pid.and_then(|pid| self.probe.process(pid));
        }
        let ours: Vec<u32> = list.iter().filter_map(|i| i.pid).collect();
        for pid in self.unmanaged_pids(&ours) {
            list.push(unmanaged_view(pid, self.probe.process(pid)));
        }
        list
    }
}

fn unmanaged_view(pid: u32, memory: Option<proto::domain::ProcessMemory>) -> Instance {
    let argv = procfs::cmdline(pid).unwrap_or_default();
    let port = argv
        .windows(2)
        .find(|w| w[0] == "--port")
        .and_then(|w| w[1].parse().ok())
        .unwrap_or(0);
    let mut command_line = argv.join(" ");
    if command_line.len() > MAX_COMMAND_LINE {
        let mut cut = MAX_COMMAND_LINE;
        while !command_line.is_char_boundary(cut) {
            cut -= 1;
        }
        command_line.truncate(cut);
        command_line.push('…');
    }
    Instance {
        estimate_bytes: 0,
        oom_kill: None,
        kind: proto::domain::InstanceKind::LlamaServer,
        id: format!("{UNMANAGED_PREFIX}{pid}"),
        model_id: String::new(),
        state: InstanceState::Unmanaged,
        options: InstanceOptions::default(),
        pid: Some(pid),
        port,
        endpoint: String::new(),
        restart_count: 0,
        last_error: String::new(),
        state_since_unix_ms: 0,
        observed: None,
        memory,
        generation: 0,
        api_key: String::new(),
        request_id: String::new(),
        command_line,
        model_file_changed: String::new(),
    }
}

/// Checks a start's request id: 1-128 printable ASCII characters. Pure, so
/// it can be exercised without a running agent (the fuzz targets do).
pub fn check_request_id(id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > MAX_REQUEST_ID_LEN || !id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::InvalidArgument {
            field: "request_id",
            reason: format!("needs 1-{MAX_REQUEST_ID_LEN} printable ASCII characters"),
        });
    }
    Ok(())
}

/// Checks what depends on the kind. An RPC server needs a helper request
/// id, no model, its one client and a leader revision; it takes no
/// llama-server list options. A llama-server takes no `rpc_client`.
/// Pure, like [`check_request_id`].
pub fn check_kind(req: &StartRequest) -> Result<(), Error> {
    let o = &req.options;
    if req.kind == InstanceKind::LlamaServer {
        if o.rpc_client.is_some() {
            return Err(Error::InvalidArgument {
                field: "options.rpc_client",
                reason: "only for kind INSTANCE_KIND_RPC_SERVER".into(),
            });
        }
        return Ok(());
    }
    if ReplicaKey::parse(&req.request_id).is_none_or(|k| k.share == 0) {
        return Err(Error::InvalidArgument {
            field: "request_id",
            reason: format!(
                "`{}` is not a split helper's id (halo.NAME.rINDEXsSHARE.gGEN, SHARE >= 1): \
                 RPC servers are started only for the controller's split placements",
                req.request_id.escape_debug()
            ),
        });
    }
    if !req.model_id.is_empty() {
        return Err(Error::InvalidArgument {
            field: "model_id",
            reason: "must be empty for an RPC server (the host's llama-server reads the model)"
                .into(),
        });
    }
    if o.rpc_client.is_none() {
        return Err(Error::InvalidArgument {
            field: "options.rpc_client",
            reason: "an RPC server needs the IP address of the one host allowed to use it".into(),
        });
    }
    for (field, set) in [
        ("options.rpc_servers", !o.rpc_servers.is_empty()),
        ("options.tensor_split", !o.tensor_split.is_empty()),
        ("options.extra_flags", !o.extra_flags.is_empty()),
    ] {
        if set {
            return Err(Error::InvalidArgument {
                field,
                reason: "a llama-server option; an RPC server takes only threads and rpc_client"
                    .into(),
            });
        }
    }
    if req.leader_revision == 0 {
        return Err(Error::LeaderRevisionRequired);
    }
    Ok(())
}

/// A loopback port free right now, from the kernel's ephemeral range: where
/// an RPC server listens behind the proxy (it takes none of the range).
fn loopback_port() -> Result<u16, Error> {
    std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|source| Error::Io {
            context: "pick a loopback port for ggml-rpc-server".into(),
            source,
        })
}

/// The log file of an instance, in its directory.
fn log_file_name(kind: InstanceKind) -> &'static str {
    match kind {
        InstanceKind::LlamaServer => "llama-server.log",
        InstanceKind::RpcServer => "rpc-server.log",
    }
}

fn new_instance_id() -> String {
    format!("i-{:012x}", rand::random::<u64>() >> 16)
}

fn new_api_key() -> String {
    let bytes: [u8; 32] = rand::random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates the instance directory (0700) and its API key file (0600), if
/// it has one.
fn prepare_instance_dir(
    dir: &std::path::Path,
    key: Option<(&std::path::Path, &str)>,
) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |context: String| move |source| Error::Io { context, source };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(format!("create {}", dir.display())))?;
    let Some((key_file, key)) = key else {
        return Ok(());
    };
    crate::state::write_atomic(key_file, format!("{key}\n").as_bytes(), 0o600)
        .map_err(io(format!("write {}", key_file.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpc(request_id: &str) -> StartRequest {
        StartRequest {
            estimate_bytes: 0,
            request_id: request_id.into(),
            model_id: String::new(),
            options: InstanceOptions {
                rpc_client: Some("10.0.0.1".parse().expect("ip")),
                ..InstanceOptions::default()
            },
            generation: 1,
            leader_revision: 7,
            kind: InstanceKind::RpcServer,
        }
    }

    #[test]
    fn rpc_server_starts_need_a_helper_id_no_model_a_client_and_a_leader() {
        assert!(check_kind(&rpc("halo.big.r0s1.g3")).is_ok());
        let field = |r: StartRequest| match check_kind(&r) {
            Err(Error::InvalidArgument { field, .. }) => field,
            other => panic!("{other:?}"),
        };
        assert_eq!(field(rpc("halo.big.r0.g3")), "request_id");
        assert_eq!(field(rpc("halo.big.r0s0.g3")), "request_id");
        assert_eq!(field(rpc("i-made-this-up")), "request_id");
        let mut r = rpc("halo.big.r0s1.g3");
        r.model_id = "big.gguf".into();
        assert_eq!(field(r), "model_id");
        let mut r = rpc("halo.big.r0s1.g3");
        r.options.rpc_client = None;
        assert_eq!(field(r), "options.rpc_client");
        let mut r = rpc("halo.big.r0s1.g3");
        r.options.tensor_split = vec![1, 1];
        assert_eq!(field(r), "options.tensor_split");
        let mut r = rpc("halo.big.r0s1.g3");
        r.options.extra_flags = vec!["--jinja".into()];
        assert_eq!(field(r), "options.extra_flags");
        let mut r = rpc("halo.big.r0s1.g3");
        r.leader_revision = 0;
        assert!(matches!(check_kind(&r), Err(Error::LeaderRevisionRequired)));

        // A llama-server takes any request id and no RPC client.
        let mut r = rpc("req-1");
        r.kind = InstanceKind::LlamaServer;
        r.model_id = "tiny.gguf".into();
        assert_eq!(field(r.clone()), "options.rpc_client");
        r.options.rpc_client = None;
        r.leader_revision = 0;
        assert!(check_kind(&r).is_ok());
    }
}
