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
//! Out of memory: an instance the kernel killed for lack of memory is not
//! restarted by its agent; its placement is sized by what it used and the
//! replica starts again where that fits, or the placement is held, with
//! the numbers, until a node has the room.
//!
//! Node loss: a node silent past the move period is Lost; each floating
//! replica on it moves to a node that fits ([`crate::placement::relocate`])
//! with its generation bumped; pinned replicas wait.
//!
//! Copies: a replica of a placement with `copy_if_missing` may sit on a
//! node that lacks its file; it is not started there until the file has
//! been copied from a node that holds it ([`crate::copies`]); a failed
//! copy moves it elsewhere or is tried again after a back-off. Only the leader
//! reconciles, and every agent command carries its term.
//!
//! What a replica's generation becomes, what each node is asked to start
//! and when a split is whole or broken are [`crate::lifecycle`]'s; this
//! module decides when, and talks to the store and the agents.

use crate::copies::Copies;
use crate::desired::Desired;
use crate::events::Events;
use crate::leader::Leadership;
use crate::lifecycle;
use crate::observe::{Observed, agent_client, with_deadline};
use crate::placement::{Liveness, relocate, relocate_avoiding};
use crate::store::{PLACEMENTS, Store, StoreError, Watch};
use proto::domain::{Instance, InstanceState, NodeStatus, Placement, ReplicaKey, StartRequest};
use proto::units;
use proto::v1;
use proto::v1::agent_service_client::AgentServiceClient;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

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
    copies: Copies,
    requeue: Duration,
    usage: crate::ondemand::Usage,
}

type Inflight = Arc<Mutex<HashSet<String>>>;

/// What one pass reads: placement's view of the nodes, each node's
/// liveness, the placements as plain values and what agents report.
struct View {
    nodes: Vec<crate::placement::NodeState>,
    liveness: HashMap<String, Liveness>,
    plain: Vec<Placement>,
    observed: BTreeMap<String, crate::observe::NodeObs>,
}

impl View {
    /// Whether `node` is Lost.
    fn lost(&self, node: &str) -> bool {
        self.liveness.get(node) == Some(&Liveness::Lost)
    }
}

fn lock(i: &Inflight) -> std::sync::MutexGuard<'_, HashSet<String>> {
    i.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Reconciler {
    /// A reconciler that also runs every `requeue`, copying model files
    /// through `copies` (shared with the API).
    pub fn new(
        desired: Desired,
        observed: Observed,
        events: Events,
        copies: Copies,
        requeue: Duration,
    ) -> Self {
        Reconciler {
            desired,
            observed,
            events,
            copies,
            requeue,
            usage: crate::ondemand::Usage::new(units::now_unix_ms()),
        }
    }

    /// Shares what the gateways report using with the API, so idle
    /// on-demand placements are unloaded.
    pub fn with_usage(mut self, usage: crate::ondemand::Usage) -> Self {
        self.usage = usage;
        self
    }

    /// Reconciles until cancelled.
    pub async fn run(self, token: CancellationToken) {
        let inflight: Inflight = Arc::new(Mutex::new(HashSet::new()));
        let backoff: Arc<Mutex<HashMap<String, Backoff>>> = Arc::default();
        let changed = self.observed.changed();
        let mut term_rx = self.desired.leadership().subscribe();
        let mut watch: Option<Watch> = None;
        let mut statuses: BTreeMap<String, Liveness> = BTreeMap::new();
        let mut pressures: BTreeMap<String, String> = BTreeMap::new();
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
            self.report_pressure(&mut pressures);
            let Some(term) = self.desired.leadership().term() else {
                continue;
            };
            let started = Instant::now();
            if let Err(e) = self.pass(term, &inflight, &backoff).await {
                tracing::warn!("reconcile: {e}");
            }
            crate::counters::global().reconcile_pass(started.elapsed());
        }
    }

    /// Emits a node's memory pressure when it starts (with why and what
    /// grew) and when it ends.
    fn report_pressure(&self, seen: &mut BTreeMap<String, String>) {
        for (name, n) in self.observed.read().iter() {
            let now = n.memory.as_ref().and_then(|m| m.pressure.as_ref());
            match (seen.get(name), now) {
                (None, Some(p)) => {
                    let mut text = format!("under memory pressure: {}", p.reason);
                    if !p.grew.is_empty() {
                        text += &format!("; {}", p.grew);
                    }
                    text += "; nothing new is placed here until it ends";
                    self.events.emit("memory_pressure", name, text);
                    seen.insert(name.clone(), p.reason.clone());
                }
                (Some(_), None) => {
                    self.events
                        .emit("memory_pressure_over", name, "memory pressure ended");
                    seen.remove(name);
                }
                _ => {}
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
                self.events.emit(
                    &format!("node_{}", NodeStatus::from(l)),
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
        let nodes = self.observed.node_states(Instant::now());
        let observed = self.observed.read().clone();
        let view = View {
            liveness: nodes.iter().map(|n| (n.name.clone(), n.liveness)).collect(),
            plain: placements.iter().map(|v| v.value.clone()).collect(),
            nodes,
            observed,
        };
        // Each step that writes a placement ends the pass: the next one
        // acts on what was written.
        if self.replan_splits(&placements, &view, backoff).await
            || self.move_off_lost(&placements, &view).await
            || self.resize_after_oom(&placements, &view).await
            || self.resume_held(&placements, &view).await
            || self.unload_idle(&placements).await
            || self.copy_missing(&placements, &view, term).await
        {
            return Ok(());
        }
        self.converge(&placements, &view, term, inflight, backoff)
            .await;
        Ok(())
    }

    /// Splits: a lost node or a failed side fails the whole split, which is
    /// planned again (same settings, new generation: every side restarts
    /// with new request ids, the old ones are stopped). `true` when a new
    /// plan was written.
    async fn replan_splits(
        &self,
        placements: &[crate::desired::Versioned<Placement>],
        view: &View,
        backoff: &Arc<Mutex<HashMap<String, Backoff>>>,
    ) -> bool {
        for v in placements {
            let p = &v.value;
            if p.paused {
                continue;
            }
            let Some(why) = lifecycle::split_broken(p, |n| view.lost(n), &view.observed) else {
                continue;
            };
            if !due(backoff, &p.name) {
                continue;
            }
            failed(backoff, &p.name);
            match crate::split::replan(&view.nodes, &view.plain, p) {
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
                        return true;
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
        false
    }

    /// Node loss: moves floating replicas off lost nodes. `true` when a
    /// move was tried (written or not).
    async fn move_off_lost(
        &self,
        placements: &[crate::desired::Versioned<Placement>],
        view: &View,
    ) -> bool {
        for v in placements {
            let p = &v.value;
            if p.pinned_node.is_some() || p.split.is_some() || p.held.is_some() {
                continue;
            }
            let mut next = p.clone();
            let mut moved = Vec::new();
            for r in p.replicas.iter().filter(|r| view.lost(&r.node)) {
                let index = r.index;
                match relocate(&view.nodes, &view.plain, &next, index) {
                    Ok(to) => {
                        if let Some(from) = lifecycle::move_replica(&mut next, index, to.clone()) {
                            moved.push(format!("replica {index} {from} -> {to}"));
                        }
                    }
                    Err(why) => {
                        tracing::debug!(placement = %p.name, "cannot move replica {index}: {why}")
                    }
                }
            }
            if !moved.is_empty() {
                match self.desired.update_placement(&next, v.revision).await {
                    Ok(_) => {
                        crate::counters::global().replaced(moved.len());
                        self.events.emit("moved", &p.name, moved.join(", "));
                    }
                    Err(e) => tracing::info!(placement = %p.name, "move not written: {e}"),
                }
                return true;
            }
        }
        false
    }

    /// Copies: a replica of a `copy_if_missing` placement on a live node
    /// that lacks the file is not started (see [`wanted`]); the file is
    /// copied there from a node that holds it ([`Copies`]), and once the
    /// node lists it the replica starts. After a failed copy the replica
    /// moves to another node that fits (not one where a copy of the file
    /// failed), else the copy is tried again on the same node after its
    /// back-off. `true` when a placement was written (or tried).
    async fn copy_missing(
        &self,
        placements: &[crate::desired::Versioned<Placement>],
        view: &View,
        term: u64,
    ) -> bool {
        let holds = |node: &str, id: &str| {
            view.observed
                .get(node)
                .is_some_and(|n| n.models.iter().any(|m| m.id == id))
        };
        for v in placements {
            let p = &v.value;
            if !p.copy_if_missing || p.paused || p.held.is_some() || p.split.is_some() {
                continue;
            }
            for r in &p.replicas {
                if view.liveness.get(&r.node) != Some(&Liveness::Ready)
                    || holds(&r.node, &p.model_id)
                    || self.copies.running(&p.model_id, &r.node)
                {
                    continue;
                }
                if let Some(f) = self.copies.failure(&p.model_id, &r.node) {
                    if p.pinned_node.is_none() {
                        let avoid: Vec<(String, String)> = view
                            .nodes
                            .iter()
                            .filter_map(|n| {
                                let f = self.copies.failure(&p.model_id, &n.name)?;
                                Some((
                                    n.name.clone(),
                                    format!("a copy of the file here failed: {}", f.why),
                                ))
                            })
                            .collect();
                        if let Ok(to) =
                            relocate_avoiding(&view.nodes, &view.plain, p, r.index, &avoid)
                        {
                            let mut next = p.clone();
                            let from = lifecycle::move_replica(&mut next, r.index, to.clone());
                            let text = format!(
                                "replica {} {} -> {to}: the copy of `{}` to {} failed ({})",
                                r.index,
                                from.unwrap_or_else(|| r.node.clone()),
                                p.model_id,
                                r.node,
                                f.why
                            );
                            self.update(&next, v.revision, "moved", text).await;
                            return true;
                        }
                    }
                    if Instant::now() < f.retry_at {
                        continue;
                    }
                }
                match self.copies.route(&p.model, &p.model_id, &r.node, None) {
                    Ok(route) => {
                        // Asking the agent may take a while: not in the pass.
                        // A second start follows the first (one copy per
                        // file and node).
                        let copies = self.copies.clone();
                        tokio::spawn(async move {
                            if let Err(e) = copies.start(route, term).await {
                                tracing::info!("copy not started: {e}");
                            }
                        });
                    }
                    Err(e) => {
                        tracing::debug!(placement = %p.name, "no copy to {} now: {e}", r.node)
                    }
                }
            }
        }
        false
    }

    /// Out-of-memory kills: a replica the kernel killed for lack of memory
    /// (its agent does not restart it) makes its placement sized by at
    /// least what it used; the replica starts again, under a new
    /// generation, on the node with the most room for that plus margin
    /// other than the one it died on (avoided for
    /// [`crate::placement::OOM_COOLDOWN_MS`]: it may hold more than halo's
    /// books show), or, when no node can take it, the placement is held
    /// with the numbers instead of being killed again.
    /// `true` when a placement was written (or tried).
    async fn resize_after_oom(
        &self,
        placements: &[crate::desired::Versioned<Placement>],
        view: &View,
    ) -> bool {
        for v in placements {
            let p = &v.value;
            if p.paused || p.held.is_some() {
                continue;
            }
            let killed = lifecycle::oom_killed(p, &view.observed);
            let Some((index, node, kill)) = killed.into_iter().next() else {
                continue;
            };
            let mut next = p.clone();
            next.learned_bytes = next.learned_bytes.max(kill.used_bytes);
            next.record_oom(&node, kill.used_bytes, units::now_unix_ms());
            // The killed replica uses nothing now.
            let others = with_placement(&view.plain, &without_replica(&next, index));
            let what = format!(
                "replica {index} on {node}: {}",
                kill.describe("llama-server")
            );
            let (kind, text) = match relocate(&view.nodes, &others, &next, index) {
                Ok(to) => {
                    lifecycle::move_replica(&mut next, index, to.clone());
                    (
                        "oom_killed",
                        format!(
                            "{what}; sized at {} now (what it used), moved to {to}, \
                             where that fits",
                            units::bytes(next.learned_bytes)
                        ),
                    )
                }
                Err(why) => {
                    let size = next.sized_bytes();
                    let held = format!(
                        "killed for lack of memory on {node}: it used {}; needs {} with margin, \
                         no node can take it now ({why})",
                        units::bytes(kill.used_bytes),
                        units::bytes(size + crate::nodes::margin(size))
                    );
                    next.held = Some(held.clone());
                    ("held", format!("{what}; held, not started again: {held}"))
                }
            };
            self.update(&next, v.revision, kind, text).await;
            return true;
        }
        false
    }

    /// On-demand placements idle past their catalog entry's
    /// `idle_unload_secs`, with no request in flight at any gateway, are
    /// unplaced. `true` when one was (or was tried).
    async fn unload_idle(&self, placements: &[crate::desired::Versioned<Placement>]) -> bool {
        if !placements.iter().any(|v| v.value.on_demand) {
            return false;
        }
        let Ok(catalog) = self.desired.catalog().await else {
            return false;
        };
        let now = units::now_unix_ms();
        for v in placements {
            let p = &v.value;
            let Some(entry) = catalog.get(&p.model) else {
                continue;
            };
            let Some(idle) = crate::ondemand::idle_for(p, entry, &self.usage, now) else {
                continue;
            };
            let key = crate::desired::placement_key(&p.name);
            match self
                .desired
                .write(
                    vec![crate::store::Compare::at(&key, v.revision)],
                    vec![crate::store::Op::Delete { key }],
                )
                .await
            {
                Ok(_) => self.events.emit(
                    "unloaded",
                    &p.name,
                    format!(
                        "on demand, no request for {} s (idle_unload_secs {})",
                        idle / 1000,
                        entry.idle_unload_secs
                    ),
                ),
                Err(e) => tracing::info!(placement = %p.name, "unload not written: {e}"),
            }
            return true;
        }
        false
    }

    /// Held placements: once every replica fits a node again (memory was
    /// freed, a node came back), the hold is lifted and they start there.
    /// `true` when a placement was written (or tried).
    async fn resume_held(
        &self,
        placements: &[crate::desired::Versioned<Placement>],
        view: &View,
    ) -> bool {
        for v in placements {
            let p = &v.value;
            if p.held.is_none() || p.paused {
                continue;
            }
            let mut next = p.clone();
            next.held = None;
            let mut moves = Vec::new();
            let mut fits = true;
            for r in &p.replicas {
                // Replicas placed so far in this loop count; later ones not.
                let later: Vec<u32> = p
                    .replicas
                    .iter()
                    .filter(|o| o.index >= r.index)
                    .map(|o| o.index)
                    .collect();
                let mut partial = next.clone();
                partial.replicas.retain(|o| !later.contains(&o.index));
                let others = with_placement(&view.plain, &partial);
                match relocate(&view.nodes, &others, &next, r.index) {
                    Ok(to) => {
                        if to == r.node {
                            lifecycle::restart(&mut next, r.index);
                        } else {
                            lifecycle::move_replica(&mut next, r.index, to.clone());
                        }
                        moves.push(format!("replica {} on {to}", r.index));
                    }
                    Err(_) => {
                        fits = false;
                        break;
                    }
                }
            }
            if !fits {
                continue;
            }
            let text = format!(
                "room for {} per replica now: {}",
                units::bytes(next.sized_bytes()),
                moves.join(", ")
            );
            self.update(&next, v.revision, "resumed", text).await;
            return true;
        }
        false
    }

    /// Per live node: starts what is missing, restarts what was stopped
    /// behind the controller's back, stops what is extra.
    async fn converge(
        &self,
        placements: &[crate::desired::Versioned<Placement>],
        view: &View,
        term: u64,
        inflight: &Inflight,
        backoff: &Arc<Mutex<HashMap<String, Backoff>>>,
    ) {
        let wants = wanted(placements, &view.observed);
        self.observed
            .retain_start_refused(|rid| wants.values().any(|w| w.contains_key(rid)));
        for (name, n) in &view.observed {
            if view.liveness.get(name) != Some(&Liveness::Ready) {
                continue;
            }
            let empty = HashMap::new();
            let want = wants.get(name.as_str()).unwrap_or(&empty);
            let mut have: HashMap<String, &Instance> = HashMap::new();
            for (k, i) in n.managed() {
                let rid = k.request_id();
                if proto::domain::instance::replaces(have.get(&rid).copied()) {
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
        lifecycle::restart(&mut next, index);
        let text = format!("replica {index}: its instance was stopped outside halo");
        self.update(&next, v.revision, "restarted", text).await;
    }

    /// Writes `next` over `revision` and, when written, emits `kind` with
    /// `text` (a lost race is logged: the next pass acts on what won).
    async fn update(&self, next: &Placement, revision: u64, kind: &str, text: String) {
        match self.desired.update_placement(next, revision).await {
            Ok(_) => self.events.emit(kind, &next.name, text),
            Err(e) => tracing::info!(placement = %next.name, "{kind} not written: {e}"),
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
        if !due(backoff, &rid) {
            return;
        }
        if let Some(why) = &w.refused {
            failed(backoff, &rid);
            self.observed.record_start_refused(&rid, why);
            let name = &w.v.value.name;
            self.events
                .emit("start_failed", name, format!("{rid} on {node}: {why}"));
            return;
        }
        if !lock(inflight).insert(key.clone()) {
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
            let req = v1::StartInstanceRequest::from(req);
            let r = agent_call(&leadership, term, &address, |mut c| async move {
                c.start_instance(with_deadline(req)).await
            })
            .await;
            match r {
                Ok(i) => {
                    lock_b(&backoff).remove(&rid);
                    observed.clear_start_refused(&rid);
                    events.emit(
                        "started",
                        &name,
                        format!("{rid} on {node} as {} (port {})", i.id, i.port),
                    );
                    observed.record_instance(&node, i);
                }
                Err(e) => {
                    failed(&backoff, &rid);
                    if e.refused {
                        observed.record_start_refused(&rid, &e.reason);
                    }
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
            let r = agent_call(&leadership, term, &address, |mut c| async move {
                c.stop_instance(with_deadline(req)).await
            })
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

/// One StartInstance or StopInstance call to the agent at `address` under
/// `term`: refused once the term has ended; the agent's status, or an
/// answer that is no valid instance, becomes one line.
async fn agent_call<F, Fut>(
    leadership: &Leadership,
    term: u64,
    address: &str,
    call: F,
) -> Result<Instance, CallError>
where
    F: FnOnce(AgentServiceClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<v1::Instance>, tonic::Status>>,
{
    if leadership.term() != Some(term) {
        return Err(CallError::other("term ended"));
    }
    let c = agent_client(address).map_err(|e| CallError::other(e.to_string()))?;
    let i = call(c).await.map_err(|s| {
        use tonic::Code;
        CallError {
            // The agent understood and said no about this request: it will
            // refuse it again (unlike an unreachable or rate-limited agent,
            // or one that fenced off a stale leader).
            refused: match s.code() {
                Code::InvalidArgument | Code::NotFound => true,
                Code::FailedPrecondition => !s.message().contains("leader revision"),
                Code::ResourceExhausted => s.message().starts_with("no free port"),
                _ => false,
            },
            text: format!("{}: {}", s.code(), s.message()),
            reason: s.message().to_owned(),
        }
    })?;
    Instance::try_from(i.into_inner()).map_err(|e| CallError::other(e.to_string()))
}

/// Why a call to an agent failed.
#[derive(Debug)]
struct CallError {
    /// The agent refused the request itself (it will refuse it again).
    refused: bool,
    /// In words, one line, with the gRPC code.
    text: String,
    /// What the agent said, without the code.
    reason: String,
}

impl CallError {
    fn other(text: impl Into<String>) -> CallError {
        let text = text.into();
        CallError {
            refused: false,
            reason: text.clone(),
            text,
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// One instance a node should run: for the placement `v`, replica
/// `index`, the start request (its leader revision is filled in when sent).
#[derive(Debug)]
struct Want<'a> {
    v: &'a crate::desired::Versioned<Placement>,
    index: u32,
    request: StartRequest,
    /// Why the request cannot be sent as it is (a helper's endpoint that
    /// is not `IP:port`): reported as a failed start, with back-off.
    refused: Option<String>,
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
    let mut want = |node: &'a str, v, index, request: StartRequest, refused| {
        out.entry(node).or_default().insert(
            request.request_id.clone(),
            Want {
                v,
                index,
                request,
                refused,
            },
        );
    };
    for v in placements {
        let p = &v.value;
        if p.paused || p.held.is_some() {
            continue;
        }
        for r in &p.replicas {
            // Its file is being copied there first (reconcile's copies).
            let lacks = observed
                .get(&r.node)
                .is_some_and(|n| !n.models.iter().any(|m| m.id == p.model_id));
            if p.copy_if_missing && p.split.is_none() && lacks {
                continue;
            }
            let mut request = lifecycle::start_request(p, r);
            let mut refused = None;
            if let Some(plan) = &p.split {
                let key = p.key(r);
                let host_ip = observed
                    .get(&r.node)
                    .and_then(|n| agent_ip(&n.config.address));
                let mut servers = Vec::new();
                for (hk, share) in plan.helper_keys(&key) {
                    let Some(ip) = host_ip else { continue };
                    if let Some(i) = lifecycle::ready_helper(observed.get(&share.node), &hk) {
                        servers.push(i.endpoint.clone());
                    }
                    let rpc = lifecycle::helper_request(&hk, ip);
                    want(share.node.as_str(), v, r.index, rpc, None);
                }
                if servers.len() != plan.helpers().count() {
                    continue;
                }
                refused = lifecycle::split_host(&mut request.options, plan, &servers)
                    .err()
                    .map(|e| e.to_string());
            }
            want(r.node.as_str(), v, r.index, request, refused);
        }
    }
    out
}

/// `p` without replica `index` (what it uses once that replica is gone).
fn without_replica(p: &Placement, index: u32) -> Placement {
    let mut q = p.clone();
    q.replicas.retain(|r| r.index != index);
    q
}

/// `plain` with the placement named like `p` replaced by `p`.
fn with_placement(plain: &[Placement], p: &Placement) -> Vec<Placement> {
    plain
        .iter()
        .map(|o| {
            if o.name == p.name {
                p.clone()
            } else {
                o.clone()
            }
        })
        .collect()
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
    let delay = proto::backoff::Backoff::new(BACKOFF_MIN, BACKOFF_MAX).delay(e.failures);
    e.next = Instant::now() + delay;
}
