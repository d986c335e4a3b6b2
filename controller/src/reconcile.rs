//! Drives observed state toward desired state. Each pass (on a store
//! change, an agent event, or every requeue period) reads placements fresh
//! and, per node:
//!
//! * a replica on a live node with no instance carrying its request id is
//!   started. The request id is derived from (placement, replica,
//!   generation) and agents deduplicate by it, so a start retried by this
//!   controller or by a restarted one (even after kill -9 mid-start) is the
//!   same start, never a duplicate;
//! * a managed instance (request id made by the controller) that no
//!   replica on its node wants is stopped: the placement was removed,
//!   paused or moved, or it is the stale copy on a node that came back;
//! * a wanted instance the agent reports Stopped (stopped behind the
//!   controller's back) is restarted by bumping the replica's generation.
//!   Crashes are the agent's: it restarts a Failed instance with back-off;
//! * failed StartInstance calls are retried with exponential back-off.
//!
//! Node loss: a node silent past the move period is Lost; each floating
//! replica on it moves to a node that fits ([`crate::placement::relocate`])
//! with its generation bumped; pinned replicas wait. Only the leader
//! reconciles, and every agent command carries its term.

use crate::desired::Desired;
use crate::events::Events;
use crate::observe::{Observed, agent_client};
use crate::placement::{Liveness, relocate};
use crate::store::{PLACEMENTS, Store, StoreError, Watch};
use proto::domain::{Instance, InstanceState, Placement, ReplicaKey};
use proto::v1;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// First retry delay after a failed start.
const BACKOFF_MIN: Duration = Duration::from_millis(500);
/// Longest retry delay.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy)]
struct Backoff {
    failures: u32,
    next: Instant,
}

/// The reconcile service.
#[derive(Debug)]
pub struct Reconciler {
    desired: Desired,
    observed: Observed,
    events: Events,
    requeue: Duration,
}

type Inflight = Arc<Mutex<HashSet<String>>>;

fn lock(i: &Inflight) -> std::sync::MutexGuard<'_, HashSet<String>> {
    i.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Reconciler {
    /// A reconciler that also runs every `requeue`.
    pub fn new(desired: Desired, observed: Observed, events: Events, requeue: Duration) -> Self {
        Reconciler {
            desired,
            observed,
            events,
            requeue,
        }
    }

    /// Reconciles until cancelled.
    pub async fn run(self, token: CancellationToken) {
        let inflight: Inflight = Arc::new(Mutex::new(HashSet::new()));
        let backoff: Arc<Mutex<HashMap<String, Backoff>>> = Arc::default();
        let changed = self.observed.changed();
        let mut term_rx = self.desired.leadership().subscribe();
        let mut watch: Option<Watch> = None;
        let mut statuses: BTreeMap<String, Liveness> = BTreeMap::new();
        let mut tick = tokio::time::interval(self.requeue);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if watch.is_none() {
                // Watch from now: each pass lists afresh, so nothing is missed.
                watch = self.desired.store().watch(PLACEMENTS, 0).await.ok();
            }
            tokio::select! {
                () = token.cancelled() => return,
                _ = tick.tick() => {}
                () = changed.notified() => {}
                _ = term_rx.changed() => {}
                ev = async {
                    match watch.as_mut() {
                        Some(w) => w.next().await,
                        None => std::future::pending().await,
                    }
                } => {
                    if !matches!(ev, Some(Ok(_))) {
                        if let Some(Err(StoreError::Compacted { .. })) = ev {
                            tracing::debug!("placement watch compacted; re-listing");
                        }
                        watch = None;
                    }
                }
            }
            self.report_status(&mut statuses);
            let Some(term) = self.desired.leadership().term() else {
                continue;
            };
            if let Err(e) = self.pass(term, &inflight, &backoff).await {
                tracing::warn!("reconcile: {e}");
            }
        }
    }

    /// Emits node status changes.
    fn report_status(&self, statuses: &mut BTreeMap<String, Liveness>) {
        let now = Instant::now();
        let t = self.observed.timing();
        for (name, n) in self.observed.read().iter() {
            let l = n.liveness(now, &t);
            let before = statuses.insert(name.clone(), l);
            if before != Some(l) && !(before.is_none() && l == Liveness::Unknown) {
                let kind = match l {
                    Liveness::Ready => "node_ready",
                    Liveness::Unreachable => "node_unreachable",
                    Liveness::Lost => "node_lost",
                    Liveness::Unknown => "node_unknown",
                };
                self.events.emit(
                    kind,
                    name,
                    format!("silent for {} ms", n.silent_for(now).as_millis()),
                );
            }
        }
    }

    async fn pass(
        &self,
        term: u64,
        inflight: &Inflight,
        backoff: &Arc<Mutex<HashMap<String, Backoff>>>,
    ) -> Result<(), crate::error::Error> {
        let (placements, _) = self.desired.placements().await?;
        let now = Instant::now();
        let nodes = self.observed.node_states(now);
        let liveness: HashMap<&str, Liveness> = nodes
            .iter()
            .map(|n| (n.name.as_str(), n.liveness))
            .collect();
        let plain: Vec<Placement> = placements.iter().map(|v| v.value.clone()).collect();

        let observed = self.observed.read().clone();

        // Splits: a lost node or a failed side fails the whole split, which
        // is planned again (same settings, new generation: every side
        // restarts with new request ids, the old ones are stopped).
        for v in &placements {
            let p = &v.value;
            let Some(plan) = &p.split else { continue };
            if p.paused {
                continue;
            }
            let lost: Vec<&str> = plan
                .shares
                .iter()
                .filter(|s| liveness.get(s.node.as_str()) == Some(&Liveness::Lost))
                .map(|s| s.node.as_str())
                .collect();
            let broken = split_failure(p, &observed);
            let why = if !lost.is_empty() {
                format!("node(s) {} lost", lost.join(", "))
            } else if let Some(f) = broken {
                f
            } else {
                continue;
            };
            if !due(backoff, &p.name) {
                continue;
            }
            failed(backoff, &p.name);
            match crate::split::replan(&nodes, &plain, p) {
                Ok(next) => match self.desired.update_placement(&next, v.revision).await {
                    Ok(_) => {
                        let on: Vec<&str> = next
                            .split
                            .iter()
                            .flat_map(|s| s.shares.iter().map(|s| s.node.as_str()))
                            .collect();
                        self.events.emit(
                            "split_replanned",
                            &p.name,
                            format!("{why}: the split is planned again on {}", on.join(" + ")),
                        );
                        return Ok(());
                    }
                    Err(e) => tracing::info!(placement = %p.name, "re-plan not written: {e}"),
                },
                Err(e) => self.events.emit(
                    "split_failed",
                    &p.name,
                    format!("{why}; no split fits now: {e}"),
                ),
            }
        }

        // Node loss: move floating replicas off lost nodes.
        for v in &placements {
            let p = &v.value;
            if p.pinned_node.is_some() || p.split.is_some() {
                continue;
            }
            let lost: Vec<u32> = p
                .replicas
                .iter()
                .filter(|r| liveness.get(r.node.as_str()) == Some(&Liveness::Lost))
                .map(|r| r.index)
                .collect();
            let mut next = p.clone();
            let mut moved = Vec::new();
            for index in lost {
                match relocate(&nodes, &plain, &next, index) {
                    Ok(to) => {
                        if let Some(r) = next.replicas.iter_mut().find(|r| r.index == index) {
                            moved.push(format!("replica {index} {} -> {to}", r.node));
                            r.node = to;
                            r.generation += 1;
                        }
                    }
                    Err(why) => {
                        tracing::debug!(placement = %p.name, "cannot move replica {index}: {why}")
                    }
                }
            }
            if !moved.is_empty() {
                match self.desired.update_placement(&next, v.revision).await {
                    Ok(_) => self.events.emit("moved", &p.name, moved.join(", ")),
                    Err(e) => tracing::info!(placement = %p.name, "move not written: {e}"),
                }
                // The next pass acts on what was written.
                return Ok(());
            }
        }

        // Per live node: start what is missing, stop what is extra.
        let wants = wanted(&placements, &observed);
        for (name, n) in &observed {
            if liveness.get(name.as_str()) != Some(&Liveness::Ready) {
                continue;
            }
            let empty = HashMap::new();
            let want = wants.get(name.as_str()).unwrap_or(&empty);
            let mut have: HashMap<String, &Instance> = HashMap::new();
            for (k, i) in n.managed() {
                let rid = k.request_id();
                // Prefer a live instance over a stopped one with the same id.
                if have
                    .get(&rid)
                    .is_none_or(|old| old.state == InstanceState::Stopped)
                {
                    have.insert(rid, i);
                }
            }
            for (rid, w) in want {
                match have.get(rid) {
                    None => self.start(name, &n.config.address, term, w, inflight, backoff),
                    Some(i) if i.state == InstanceState::Stopped && w.v.value.split.is_none() => {
                        self.restart(w.v, w.index, rid, backoff).await;
                    }
                    Some(_) => {}
                }
            }
            for (k, i) in n.managed() {
                let rid = k.request_id();
                let extra = !want.contains_key(&rid)
                    && !matches!(i.state, InstanceState::Stopped | InstanceState::Stopping);
                if extra {
                    self.stop(name, &n.config.address, term, i, &k, inflight);
                }
            }
        }
        Ok(())
    }

    /// Restarts a replica stopped behind the controller's back by bumping
    /// its generation (a new request id), with back-off.
    async fn restart(
        &self,
        v: &crate::desired::Versioned<Placement>,
        index: u32,
        rid: &str,
        backoff: &Arc<Mutex<HashMap<String, Backoff>>>,
    ) {
        if !due(backoff, rid) {
            return;
        }
        failed(backoff, rid);
        let mut next = v.value.clone();
        if let Some(r) = next.replicas.iter_mut().find(|r| r.index == index) {
            r.generation += 1;
        }
        match self.desired.update_placement(&next, v.revision).await {
            Ok(_) => self.events.emit(
                "restarted",
                &next.name,
                format!("replica {index}: its instance was stopped outside halo"),
            ),
            Err(e) => tracing::info!(placement = %next.name, "restart not written: {e}"),
        }
    }

    fn start(
        &self,
        node: &str,
        address: &str,
        term: u64,
        w: &Want<'_>,
        inflight: &Inflight,
        backoff: &Arc<Mutex<HashMap<String, Backoff>>>,
    ) {
        let rid = w.request.request_id.clone();
        let key = format!("{node}/{rid}");
        if !due(backoff, &rid) || !lock(inflight).insert(key.clone()) {
            return;
        }
        let mut req = w.request.clone();
        req.leader_revision = term;
        let (node, address, name) = (node.to_owned(), address.to_owned(), w.v.value.name.clone());
        let (observed, events, inflight, backoff) = (
            self.observed.clone(),
            self.events.clone(),
            inflight.clone(),
            backoff.clone(),
        );
        let leadership = self.desired.leadership().clone();
        tokio::spawn(async move {
            let r = async {
                if leadership.term() != Some(term) {
                    return Err("term ended".to_owned());
                }
                let mut c = agent_client(&address).map_err(|e| e.to_string())?;
                let i = c
                    .start_instance(crate::observe::with_deadline(req))
                    .await
                    .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
                Instance::try_from(i.into_inner()).map_err(|e| e.to_string())
            }
            .await;
            match r {
                Ok(i) => {
                    lock_b(&backoff).remove(&rid);
                    events.emit(
                        "started",
                        &name,
                        format!("{rid} on {node} as {} (port {})", i.id, i.port),
                    );
                    observed.record_instance(&node, i);
                }
                Err(e) => {
                    failed(&backoff, &rid);
                    events.emit("start_failed", &name, format!("{rid} on {node}: {e}"));
                }
            }
            lock(&inflight).remove(&key);
        });
    }

    fn stop(
        &self,
        node: &str,
        address: &str,
        term: u64,
        i: &Instance,
        k: &ReplicaKey,
        inflight: &Inflight,
    ) {
        let key = format!("{node}/{}", i.id);
        if !lock(inflight).insert(key.clone()) {
            return;
        }
        let req = v1::StopInstanceRequest {
            instance_id: i.id.clone(),
            leader_revision: term,
        };
        let (node, address, rid) = (node.to_owned(), address.to_owned(), k.request_id());
        let placement = k.placement.clone();
        let (observed, events, inflight) =
            (self.observed.clone(), self.events.clone(), inflight.clone());
        let leadership = self.desired.leadership().clone();
        tokio::spawn(async move {
            let r = async {
                if leadership.term() != Some(term) {
                    return Err("term ended".to_owned());
                }
                let mut c = agent_client(&address).map_err(|e| e.to_string())?;
                let i = c
                    .stop_instance(crate::observe::with_deadline(req))
                    .await
                    .map_err(|s| format!("{}: {}", s.code(), s.message()))?;
                Instance::try_from(i.into_inner()).map_err(|e| e.to_string())
            }
            .await;
            match r {
                Ok(i) => {
                    events.emit("stopped", &placement, format!("{rid} on {node} ({})", i.id));
                    observed.record_instance(&node, i);
                }
                Err(e) => events.emit("stop_failed", &placement, format!("{rid} on {node}: {e}")),
            }
            lock(&inflight).remove(&key);
        });
    }
}

/// One instance a node should run: for the placement `v`, replica
/// `index`, the start request (its leader revision is filled in when sent).
#[derive(Debug)]
struct Want<'a> {
    v: &'a crate::desired::Versioned<Placement>,
    index: u32,
    request: v1::StartInstanceRequest,
}

/// What every node should run, by node and request id. A split's helpers
/// (ggml-rpc-server) come first; its host's llama-server is wanted only
/// once every helper is Ready (it needs their addresses), and stops being
/// wanted when one is not: no half-alive split.
fn wanted<'a>(
    placements: &'a [crate::desired::Versioned<Placement>],
    observed: &BTreeMap<String, crate::observe::NodeObs>,
) -> HashMap<&'a str, HashMap<String, Want<'a>>> {
    let mut out: HashMap<&str, HashMap<String, Want<'_>>> = HashMap::new();
    for v in placements {
        let p = &v.value;
        if p.paused {
            continue;
        }
        for r in &p.replicas {
            let key = p.key(r);
            let mut request = v1::StartInstanceRequest {
                request_id: key.request_id(),
                model_id: p.model_id.clone(),
                options: Some(p.instance_options().into()),
                generation: r.generation,
                leader_revision: 0,
                kind: v1::InstanceKind::LlamaServer as i32,
            };
            if let Some(plan) = &p.split {
                let host_ip = observed
                    .get(&r.node)
                    .and_then(|n| agent_ip(&n.config.address));
                let mut servers = Vec::new();
                for (k, share) in plan.helpers() {
                    let hk = key.helper(k);
                    let Some(ip) = host_ip else { continue };
                    let rpc = v1::StartInstanceRequest {
                        request_id: hk.request_id(),
                        model_id: String::new(),
                        options: Some(v1::InstanceOptions {
                            rpc_client: ip.to_string(),
                            ..v1::InstanceOptions::default()
                        }),
                        generation: r.generation,
                        leader_revision: 0,
                        kind: v1::InstanceKind::RpcServer as i32,
                    };
                    let ready = observed.get(&share.node).and_then(|n| {
                        n.instances.values().find(|i| {
                            i.request_id == rpc.request_id && i.state == InstanceState::Ready
                        })
                    });
                    if let Some(i) = ready {
                        servers.push(i.endpoint.clone());
                    }
                    out.entry(share.node.as_str()).or_default().insert(
                        rpc.request_id.clone(),
                        Want {
                            v,
                            index: r.index,
                            request: rpc,
                        },
                    );
                }
                if servers.len() != plan.helpers().count() {
                    continue;
                }
                if let Some(o) = request.options.as_mut() {
                    let host_gpu = plan.host().is_some_and(|h| h.tensor_split > 0);
                    let layers = |host: bool| -> u32 {
                        plan.shares
                            .iter()
                            .filter(|s| host || !s.host)
                            .map(|s| s.layers)
                            .sum()
                    };
                    o.rpc_servers = servers;
                    if host_gpu {
                        o.gpu_layers = Some(layers(true) + 1);
                        o.tensor_split = plan.shares.iter().map(|s| s.tensor_split).collect();
                    } else {
                        o.gpu_layers = Some(layers(false) + 1);
                        o.tensor_split = plan
                            .shares
                            .iter()
                            .filter(|s| !s.host)
                            .map(|s| s.tensor_split)
                            .collect();
                    }
                }
            }
            out.entry(r.node.as_str()).or_default().insert(
                request.request_id.clone(),
                Want {
                    v,
                    index: r.index,
                    request,
                },
            );
        }
    }
    out
}

/// The IP address in an agent's `host:port` address (what a split's
/// helpers let connect), when it is one.
fn agent_ip(address: &str) -> Option<std::net::IpAddr> {
    let a = address
        .strip_prefix("http://")
        .or_else(|| address.strip_prefix("https://"))
        .unwrap_or(address);
    a.parse::<std::net::SocketAddr>().ok().map(|s| s.ip())
}

/// Why a split is broken, if a side of its current generation failed or
/// was stopped behind the controller's back.
fn split_failure(
    p: &Placement,
    observed: &BTreeMap<String, crate::observe::NodeObs>,
) -> Option<String> {
    let plan = p.split.as_ref()?;
    let r = p.replicas.first()?;
    let key = p.key(r);
    let mut sides: Vec<(String, &str)> = vec![(key.request_id(), r.node.as_str())];
    sides.extend(
        plan.helpers()
            .map(|(k, s)| (key.helper(k).request_id(), s.node.as_str())),
    );
    for (rid, node) in sides {
        let Some(i) = observed
            .get(node)
            .and_then(|n| n.instances.values().find(|i| i.request_id == rid))
        else {
            continue;
        };
        if matches!(i.state, InstanceState::Failed | InstanceState::Stopped) {
            let what = if i.kind == proto::domain::InstanceKind::RpcServer {
                "ggml-rpc-server"
            } else {
                "llama-server"
            };
            let reason = i.last_error.lines().next().unwrap_or("stopped").to_owned();
            return Some(format!("{what} on {node} {}: {reason}", i.state));
        }
    }
    None
}

fn lock_b(
    b: &Arc<Mutex<HashMap<String, Backoff>>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Backoff>> {
    b.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn due(b: &Arc<Mutex<HashMap<String, Backoff>>>, rid: &str) -> bool {
    lock_b(b).get(rid).is_none_or(|x| Instant::now() >= x.next)
}

fn failed(b: &Arc<Mutex<HashMap<String, Backoff>>>, rid: &str) {
    let mut m = lock_b(b);
    let e = m.entry(rid.to_owned()).or_insert(Backoff {
        failures: 0,
        next: Instant::now(),
    });
    e.failures = e.failures.saturating_add(1);
    let delay = BACKOFF_MIN
        .saturating_mul(1 << e.failures.min(8).saturating_sub(1))
        .min(BACKOFF_MAX);
    e.next = Instant::now() + delay;
}
