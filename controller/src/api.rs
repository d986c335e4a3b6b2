//! The `halo.v1.ControllerService` gRPC service for haloctl: reads come from
//! the store and the observed state on any controller; writes (place,
//! unplace, catalog) only on the leader. Wire types stop here.

use crate::copies::Copies;
use crate::desired::{Desired, catalog_key, json, placement_key};
use crate::error::Error;
use crate::events::Events;
use crate::observe::{Observed, instances_by_request};
use crate::ondemand::{Demanded, Usage};
use crate::placement::{self, Breakdown, PlaceRequest, estimate_options, used_by_node};
use crate::store::{Compare, Op, Store};
use crate::{ask_engine, projections};
use proto::domain::{CatalogEntry, EditorMode, InstanceState, ModelStatus, NodeStatus, Placement};
use proto::tls::{Access, Policy, Role};
use proto::units::now_unix_ms;
use proto::v1;
use std::pin::Pin;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Longest wait for another placement decision to finish.
const PLACE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The service.
#[derive(Debug, Clone)]
pub struct ControllerApi {
    desired: Desired,
    observed: Observed,
    events: Events,
    shutdown: CancellationToken,
    /// One decision at a time: two concurrent placements must not both
    /// count the same free memory (only the leader writes, so a process
    /// lock is enough; the store's compares catch anything else).
    place_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    access: Access,
    /// What the gateways report using (on-demand models).
    usage: Usage,
    /// Model copies: in flight, measured rates, failures.
    copies: Copies,
}

/// Who may call what when the controller serves mutual TLS: the one place
/// that lists the methods that change desired state. Admins change it;
/// admins and read-only clients look; gateways (and agents, which serve
/// gateways too) look in order to route (`Routes`, which carries secrets,
/// is refused to read-only); controllers do neither.
pub const POLICY: Policy = Policy {
    service: "ControllerService",
    mutating: &[
        "Place",
        "Unplace",
        "PutCatalogEntry",
        "CreateKey",
        "RevokeKey",
        "PutBenchResult",
        "CopyModel",
    ],
    writers: &[Role::Admin],
    readers: &[Role::Admin, Role::ReadOnly, Role::Gateway, Role::Agent],
    only: &[],
};

impl ControllerApi {
    /// A service over the shared state, driving model copies through
    /// `copies` (shared with reconcile); streams end on `shutdown`.
    pub fn new(
        desired: Desired,
        observed: Observed,
        events: Events,
        copies: Copies,
        shutdown: CancellationToken,
    ) -> Self {
        ControllerApi {
            desired,
            observed,
            events,
            shutdown,
            place_lock: std::sync::Arc::default(),
            access: Access::open(),
            usage: Usage::new(now_unix_ms()),
            copies,
        }
    }

    /// Shares `usage` with reconcile (which unloads idle on-demand models).
    pub fn with_usage(mut self, usage: Usage) -> Self {
        self.usage = usage;
        self
    }

    /// Checks callers' certificate roles against [`POLICY`] (mutual TLS).
    pub fn with_access(mut self, access: Access) -> Self {
        self.access = access;
        self
    }

    /// The nodes as placement sees them, after asking the nodes that hold
    /// catalog model `model` for llama.cpp's projection at its first
    /// setting (`context`, else the catalog's default, with the catalog's
    /// cache types) unless they were asked; with `wait`, a few seconds for
    /// the answers.
    async fn checked_nodes(
        &self,
        catalog: &std::collections::BTreeMap<String, CatalogEntry>,
        model: &str,
        context: Option<u32>,
        wait: bool,
    ) -> Vec<crate::nodes::NodeState> {
        let nodes = self.observed.node_states(Instant::now());
        let Some(e) = catalog.get(model) else {
            return nodes;
        };
        let ctx = context.unwrap_or(e.default_context).max(1);
        let opts = estimate_options(ctx, e.parallel.max(1), &e.cache_type_k, &e.cache_type_v);
        let asked = ask_engine::ensure(&self.observed, &self.events, &nodes, &e.model_id, &opts);
        if !wait || asked.is_empty() {
            return nodes;
        }
        self.observed
            .projections()
            .wait(&asked, projections::WAIT)
            .await;
        self.observed.node_states(Instant::now())
    }

    /// Asks for llama.cpp's projection at the setting a decision chose, in
    /// the background (the next decision at that setting uses it).
    fn check_chosen(
        &self,
        catalog: &std::collections::BTreeMap<String, CatalogEntry>,
        model: &str,
        nodes: &[crate::nodes::NodeState],
        d: &placement::Decision,
    ) {
        if let (Some(e), Some(b)) = (catalog.get(model), &d.estimate) {
            let opts = estimate_options(
                b.context_size,
                e.parallel.max(1),
                &b.cache_type_k,
                &b.cache_type_v,
            );
            ask_engine::ensure(&self.observed, &self.events, nodes, &e.model_id, &opts);
        }
    }

    /// Decides, and unless dry run records, a placement.
    pub async fn place(&self, r: v1::PlaceRequest) -> Result<v1::PlaceResponse, Error> {
        let mut req = place_request(&r)?;
        req.copy_rates = self.copies.rates();
        if !r.dry_run && self.desired.leadership().term().is_none() {
            return Err(Error::NotLeader);
        }
        let _serial = match tokio::time::timeout(PLACE_LOCK_WAIT, self.place_lock.lock()).await {
            Ok(g) => g,
            Err(_) => {
                return Err(Error::Conflict(
                    "another placement is being decided; retry".into(),
                ));
            }
        };
        let catalog = self.desired.catalog().await?;
        let (placed, _) = self.desired.placements().await?;
        if !r.dry_run
            && let Some(v) = placed
                .iter()
                .find(|v| v.value.on_demand && v.value.model == req.model)
        {
            return self.make_resident(v).await;
        }
        let plain: Vec<Placement> = placed.iter().map(|v| v.value.clone()).collect();
        let nodes = self
            .checked_nodes(&catalog, &req.model, req.context, true)
            .await;
        let mut d = placement::place(&nodes, &plain, &catalog, &req);
        self.check_chosen(&catalog, &req.model, &nodes, &d);
        if let Some(p) = d.placement.as_mut() {
            crate::lifecycle::continue_after(p, self.observed.max_generation(&p.name));
            p.placed_at_unix_ms = now_unix_ms();
        }
        let accepted = d.accepted;
        if !r.dry_run {
            crate::counters::global().decision(&d);
        }
        if accepted
            && !r.dry_run
            && let Some(p) = &d.placement
        {
            let key = placement_key(&p.name);
            let mut compares = vec![Compare::absent(&key)];
            let mut ops = vec![Op::Put {
                key,
                value: json(p),
            }];
            for name in &d.evicted {
                if let Some(v) = placed.iter().find(|v| &v.value.name == name) {
                    compares.push(Compare::at(&placement_key(name), v.revision));
                    ops.push(Op::Delete {
                        key: placement_key(name),
                    });
                }
            }
            self.desired.write(compares, ops).await?;
            for e in &d.evicted {
                self.events.emit("evicted", e, format!("for {}", p.name));
            }
            self.events
                .emit("placed", &p.name, d.explanation.join("; "));
        }
        if r.dry_run {
            // Nothing was placed: the decision's "placed `x` as `y`" reads
            // as what would be.
            for l in &mut d.explanation {
                if let Some(rest) = l.strip_prefix("placed `") {
                    *l = format!("would place `{rest}");
                }
            }
        }
        Ok(v1::PlaceResponse {
            accepted,
            placement: d.placement.map(Into::into),
            fits: d.fits.into_iter().map(Into::into).collect(),
            evicted: d.evicted,
            explanation: d.explanation,
            estimate: d.estimate.map(Into::into),
            dry_run: r.dry_run,
        })
    }
}

impl ControllerApi {
    /// `haloctl place` of a model loaded on demand: it stays, hand-placed,
    /// until unplaced.
    async fn make_resident(
        &self,
        v: &crate::desired::Versioned<Placement>,
    ) -> Result<v1::PlaceResponse, Error> {
        let mut p = v.value.clone();
        p.on_demand = false;
        self.desired.update_placement(&p, v.revision).await?;
        let why = format!(
            "`{}` was loaded on demand as `{}`; it is now resident (placed by hand) until \
             unplaced",
            p.model, p.name
        );
        self.events.emit("resident", &p.name, why.clone());
        Ok(v1::PlaceResponse {
            accepted: true,
            placement: Some(p.into()),
            fits: Vec::new(),
            evicted: Vec::new(),
            explanation: vec![why],
            estimate: None,
            dry_run: false,
        })
    }

    /// A gateway's demand for an on-demand catalog model.
    pub async fn demand(&self, r: v1::DemandRequest) -> Result<v1::DemandResponse, Error> {
        use v1::demand_response::Outcome;
        if self.desired.leadership().term().is_none() {
            return Err(Error::NotLeader);
        }
        let catalog = self.desired.catalog().await?;
        let Some(entry) = catalog.get(&r.model) else {
            return Err(Error::NotFound(format!(
                "no catalog model `{}`",
                r.model.escape_debug()
            )));
        };
        if !entry.on_demand {
            return Err(Error::FailedPrecondition(format!(
                "`{}` is not on demand (set on_demand = true in its catalog entry, or \
                 haloctl place ROLE {})",
                entry.name, entry.name
            )));
        }
        let now = now_unix_ms();
        self.usage.touch(&entry.name, now);
        let _serial = match tokio::time::timeout(PLACE_LOCK_WAIT, self.place_lock.lock()).await {
            Ok(g) => g,
            Err(_) => {
                return Ok(v1::DemandResponse {
                    outcome: Outcome::Wait as i32,
                    placement: String::new(),
                    explanation: vec!["another placement is being decided".into()],
                    retry_after_ms: 500,
                });
            }
        };
        let (placed, _) = self.desired.placements().await?;
        if let Some(v) = placed.iter().find(|v| v.value.model == entry.name) {
            return Ok(v1::DemandResponse {
                outcome: Outcome::Placed as i32,
                placement: v.value.name.clone(),
                explanation: Vec::new(),
                retry_after_ms: 0,
            });
        }
        let plain: Vec<Placement> = placed.iter().map(|v| v.value.clone()).collect();
        // A request waits for its model: llama.cpp's check is asked in the
        // background and used by the next decision.
        let nodes = self.checked_nodes(&catalog, &entry.name, None, false).await;
        let outcome = crate::ondemand::decide(&nodes, &plain, &catalog, entry, &self.usage, now);
        let (decision, evicted) = match outcome {
            Demanded::Wait {
                retry_after_ms,
                why,
            } => {
                return Ok(v1::DemandResponse {
                    outcome: Outcome::Wait as i32,
                    placement: String::new(),
                    explanation: why,
                    retry_after_ms,
                });
            }
            Demanded::Refused { why } => {
                return Ok(v1::DemandResponse {
                    outcome: Outcome::Refused as i32,
                    placement: String::new(),
                    explanation: why,
                    retry_after_ms: 0,
                });
            }
            Demanded::Place { decision, evicted } => (decision, evicted),
        };
        let Some(mut p) = decision.placement.clone() else {
            return Err(Error::FailedPrecondition(
                "accepted without a placement".into(),
            ));
        };
        let seen = self.observed.max_generation(&p.name);
        crate::lifecycle::continue_after(&mut p, seen);
        p.on_demand = true;
        p.placed_at_unix_ms = now;
        let key = placement_key(&p.name);
        let mut compares = vec![Compare::absent(&key)];
        let mut ops = vec![Op::Put {
            key,
            value: json(&p),
        }];
        for (name, _) in &evicted {
            if let Some(v) = placed.iter().find(|v| &v.value.name == name) {
                compares.push(Compare::at(&placement_key(name), v.revision));
                ops.push(Op::Delete {
                    key: placement_key(name),
                });
            }
        }
        self.desired.write(compares, ops).await?;
        for (name, why) in &evicted {
            self.events.emit(
                "evicted",
                name,
                format!("unloaded ({why}, on demand) to make room for `{}`", p.name),
            );
        }
        let whom = if r.key_name.is_empty() {
            format!("a request through gateway {}", r.gateway)
        } else {
            format!(
                "a request through gateway {} (key {})",
                r.gateway, r.key_name
            )
        };
        self.events.emit(
            "loaded",
            &p.name,
            format!("on demand for {whom}: {}", decision.explanation.join("; ")),
        );
        Ok(v1::DemandResponse {
            outcome: Outcome::Placed as i32,
            placement: p.name,
            explanation: decision.explanation,
            retry_after_ms: 0,
        })
    }
}

impl From<Breakdown> for v1::EstimateBreakdown {
    fn from(b: Breakdown) -> Self {
        v1::EstimateBreakdown {
            weights_bytes: b.weights_bytes,
            kv_bytes: b.kv_bytes,
            compute_bytes: b.compute_bytes,
            output_bytes: b.output_bytes,
            total_bytes: b.total_bytes,
            context_size: b.context_size,
            cache_type_k: b.cache_type_k,
            cache_type_v: b.cache_type_v,
        }
    }
}

/// `states` as node `node`'s plan rows see them: sized like a placement
/// (a real load anywhere in the cluster beats the formula), checked
/// against that node's own llama.cpp projection only.
fn plan_view(states: &[crate::nodes::NodeState], node: &str) -> Vec<crate::nodes::NodeState> {
    states
        .iter()
        .map(|s| {
            let mut s = s.clone();
            if s.name != node {
                s.engine.clear();
            }
            s
        })
        .collect()
}

impl From<crate::events::ClusterEvent> for v1::ClusterEvent {
    fn from(e: crate::events::ClusterEvent) -> Self {
        v1::ClusterEvent {
            at_unix_ms: e.at_unix_ms,
            kind: e.kind,
            subject: e.subject,
            message: e.message,
        }
    }
}

/// A wire place request as placement takes it, with the checks made before
/// anything is read or decided (name, `split_across`). Pure, so it can be
/// exercised without a running controller (the fuzz targets do).
pub fn place_request(r: &v1::PlaceRequest) -> Result<PlaceRequest, Error> {
    let req = PlaceRequest {
        role: r.role.clone(),
        model: r.model.clone(),
        context: r.context_size.filter(|&c| c > 0),
        node: (!r.node.is_empty()).then(|| r.node.clone()),
        replicas: r.replicas.clamp(1, 64),
        evict: r.evict,
        any_node: r.any_node,
        pack: r.pack,
        name: (!r.name.is_empty()).then(|| r.name.clone()),
        paused: r.paused,
        split: r.split,
        split_across: (r.split_across > 0).then_some(r.split_across),
        allow_context_over_trained: r.allow_context_over_trained,
        copy: r.copy,
        copy_rates: Default::default(),
    };
    // Catalog and node names obey `check_name`; anything else (a path, a
    // URL-encoded `..`, NUL…) can never match one and is refused as such
    // rather than reported as a model missing from the catalog.
    proto::domain::catalog::check_name("model", &req.model)?;
    if let Some(n) = &req.node {
        proto::domain::catalog::check_name("node", n)?;
    }
    if let Some(n) = &req.name {
        proto::domain::catalog::check_name("name", n)?;
    }
    if let Some(k) = req.split_across
        && !(2..=proto::domain::instance::MAX_TENSOR_SPLIT_LEN as u32).contains(&k)
    {
        return Err(Error::InvalidArgument(format!(
            "split_across {k}: a split takes 2 to {} nodes",
            proto::domain::instance::MAX_TENSOR_SPLIT_LEN
        )));
    }
    Ok(req)
}

/// "copy from halo1 failed: …; tried again in 20 s": a failed copy as a
/// replica waiting for it shows it.
fn copy_failed_note(f: &crate::copies::Failed) -> String {
    let left = f
        .retry_at
        .saturating_duration_since(Instant::now())
        .as_secs();
    let times = if f.count > 1 {
        format!(" ({} times in a row)", f.count)
    } else {
        String::new()
    };
    format!(
        "the copy of the file failed{times}: {}; tried again (here or on another node) in {left} s",
        f.why
    )
}

type EventStream = Pin<Box<dyn Stream<Item = Result<v1::ClusterEvent, Status>> + Send>>;
type LogStream = Pin<Box<dyn Stream<Item = Result<v1::LogLine, Status>> + Send>>;
type CopyStream = Pin<Box<dyn Stream<Item = Result<v1::CopyProgress, Status>> + Send>>;

impl ControllerApi {
    /// A copy of a catalog model's file(s) to `to_node` ([`Copies`]): the
    /// receiving agent pulls from the node named, else from a connected
    /// one that holds the file; its progress is relayed, and the copy goes
    /// on when the caller leaves.
    async fn copy_model(&self, r: v1::CopyModelRequest) -> Result<CopyStream, Error> {
        let Some(term) = self.desired.leadership().term() else {
            return Err(Error::NotLeader);
        };
        proto::domain::catalog::check_name("model", &r.model)?;
        let catalog = self.desired.catalog().await?;
        let entry = catalog
            .get(&r.model)
            .ok_or_else(|| Error::NotFound(format!("`{}` is not in the catalog", r.model)))?;
        let from = (!r.from_node.is_empty()).then_some(r.from_node.as_str());
        let route = self
            .copies
            .route(&entry.name, &entry.model_id, &r.to_node, from)?;
        let mut progress = self.copies.start(route, term).await?;
        let (tx, out) = mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            // The report there is now, then each new one, to the end.
            let mut first = true;
            loop {
                if !first {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tx.closed() => return,
                        c = progress.changed() => if c.is_err() { return },
                    }
                }
                first = false;
                let Some(latest) = progress.borrow_and_update().clone() else {
                    continue;
                };
                match latest {
                    Ok(p) => {
                        let end = p.state.is_final();
                        if end {
                            let _ = tx.send(Ok(p.into())).await;
                            return;
                        }
                        // Progress a slow caller misses is superseded by
                        // the next report.
                        let _ = tx.try_send(Ok(p.into()));
                    }
                    Err(s) => {
                        let _ = tx.send(Err(s)).await;
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(out)))
    }
}

#[tonic::async_trait]
impl v1::controller_service_server::ControllerService for ControllerApi {
    #[tracing::instrument(skip_all)]
    async fn list_nodes(
        &self,
        r: Request<v1::ListNodesRequest>,
    ) -> Result<Response<v1::ListNodesResponse>, Status> {
        self.access.check("ListNodes", &r)?;
        let (placed, _) = self.desired.placements().await?;
        let plain: Vec<Placement> = placed.into_iter().map(|v| v.value).collect();
        let now = Instant::now();
        let states = self.observed.node_states(now);
        let used = used_by_node(&states, &plain, &[]);
        let t = self.observed.timing();
        let nodes = self
            .observed
            .read()
            .values()
            .map(|n| {
                let mut identity = n.identity.clone().unwrap_or_default();
                identity.name = n.config.name.clone();
                identity.agent_address = n.config.address.clone();
                identity.roles = n.roles();
                v1::NodeView {
                    node: Some(identity.into()),
                    status: v1::NodeStatus::from(NodeStatus::from(n.liveness(now, &t))) as i32,
                    memory: n.memory.clone().map(Into::into),
                    reserve_bytes: n.reserve_bytes,
                    placed_bytes: used.get(&n.config.name).copied().unwrap_or(0),
                    instances: n.instances.values().cloned().map(Into::into).collect(),
                    silent_for_ms: u64::try_from(n.silent_for(now).as_millis()).unwrap_or(u64::MAX),
                }
            })
            .collect();
        Ok(Response::new(v1::ListNodesResponse { nodes }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_catalog(
        &self,
        r: Request<v1::ListCatalogRequest>,
    ) -> Result<Response<v1::ListCatalogResponse>, Status> {
        self.access.check("ListCatalog", &r)?;
        let catalog = self.desired.catalog().await?;
        let obs = self.observed.read();
        let copies: Vec<v1::CopyProgress> = self
            .copies
            .in_flight()
            .into_iter()
            .map(Into::into)
            .collect();
        let entries = catalog
            .into_values()
            .map(|e| {
                let id = e.model_id.clone();
                let mut w = v1::CatalogEntry::from(e);
                w.copies = copies
                    .iter()
                    .filter(|c| c.model_id == id)
                    .cloned()
                    .collect();
                for n in obs.values() {
                    if let Some(m) = n.models.iter().find(|m| m.id == id) {
                        w.nodes.push(n.config.name.clone());
                        if w.params.is_none()
                            && let ModelStatus::Ok(p) = &m.status
                        {
                            w.params = Some((**p).clone().into());
                            w.file_size_bytes = m.file_size_bytes;
                        }
                    }
                }
                w
            })
            .collect();
        Ok(Response::new(v1::ListCatalogResponse { entries }))
    }

    #[tracing::instrument(skip_all)]
    async fn put_catalog_entry(
        &self,
        r: Request<v1::PutCatalogEntryRequest>,
    ) -> Result<Response<v1::CatalogEntry>, Status> {
        self.access.check("PutCatalogEntry", &r)?;
        let e = r
            .into_inner()
            .entry
            .ok_or_else(|| Error::InvalidArgument("entry is required".into()))?;
        let e = CatalogEntry::try_from(e).map_err(Error::from)?;
        self.desired.put_catalog(&e).await?;
        self.events
            .emit("catalog", &e.name, format!("-> {}", e.model_id));
        Ok(Response::new(e.into()))
    }

    #[tracing::instrument(skip_all)]
    async fn list_placements(
        &self,
        r: Request<v1::ListPlacementsRequest>,
    ) -> Result<Response<v1::ListPlacementsResponse>, Status> {
        self.access.check("ListPlacements", &r)?;
        let (placed, _) = self.desired.placements().await?;
        let catalog = self.desired.catalog().await?;
        let by_rid = instances_by_request(&self.observed);
        let placements = placed
            .into_iter()
            .map(|v| {
                let p = v.value;
                // Each replica's helpers as their agents report them, in
                // device order.
                let helpers: Vec<Vec<v1::Instance>> = p
                    .replicas
                    .iter()
                    .map(|r| {
                        let key = p.key(r);
                        let Some(plan) = &p.split else {
                            return Vec::new();
                        };
                        plan.helper_keys(&key)
                            .filter_map(|(k, _)| by_rid.get(&k.request_id()))
                            .map(|(_, i)| i.clone().into())
                            .collect()
                    })
                    .collect();
                let last_used = self.usage.last_used(&p.model).unwrap_or(0);
                let unload_at = match catalog.get(&p.model) {
                    Some(e) if p.on_demand => self
                        .usage
                        .idle_since(&p)
                        .saturating_add(e.idle_unload_secs.saturating_mul(1000)),
                    _ => 0,
                };
                let mut w = v1::Placement::from(p);
                w.last_used_unix_ms = last_used;
                w.unload_at_unix_ms = unload_at;
                for (r, hs) in w.replicas.iter_mut().zip(helpers) {
                    r.instance = by_rid.get(&r.request_id).map(|(_, i)| i.clone().into());
                    if r.instance.is_none() {
                        r.start_refused = self
                            .observed
                            .start_refused(&r.request_id)
                            .unwrap_or_default();
                        r.copy = self.copies.progress(&w.model_id, &r.node).map(Into::into);
                        r.copy_failed = self
                            .copies
                            .failure(&w.model_id, &r.node)
                            .map(|f| copy_failed_note(&f))
                            .unwrap_or_default();
                    }
                    r.helpers = hs;
                }
                w
            })
            .collect();
        Ok(Response::new(v1::ListPlacementsResponse { placements }))
    }

    #[tracing::instrument(skip_all, fields(model = %r.get_ref().model.escape_debug()))]
    async fn plan(
        &self,
        r: Request<v1::PlanRequest>,
    ) -> Result<Response<v1::PlanResponse>, Status> {
        self.access.check("Plan", &r)?;
        let r = r.into_inner();
        let catalog = self.desired.catalog().await?;
        let e = catalog
            .get(&r.model)
            .ok_or_else(|| Error::NotFound(format!("`{}` is not in the catalog", r.model)))?;
        let contexts = if r.contexts.is_empty() {
            let mut v = vec![e.default_context];
            let mut c = e.default_context;
            while c / 2 >= e.min_context {
                c /= 2;
                v.push(c);
            }
            v
        } else {
            r.contexts
        };
        // The request's cache types, else the catalog's.
        let cache = |field: &'static str, raw: i32, catalog: &str| {
            proto::domain::CacheType::from_wire(field, raw)
                .map(|c| c.map_or_else(|| catalog.to_owned(), |c| c.name().to_owned()))
                .map_err(Error::from)
        };
        let ctk = cache("cache_type_k", r.cache_type_k, &e.cache_type_k)?;
        let ctv = cache("cache_type_v", r.cache_type_v, &e.cache_type_v)?;
        let (placed, _) = self.desired.placements().await?;
        let plain: Vec<Placement> = placed.into_iter().map(|v| v.value).collect();
        let states = self.observed.node_states(Instant::now());
        if !r.node.is_empty() && !states.iter().any(|n| n.name == r.node) {
            return Err(Error::NotFound(format!("no node named `{}`", r.node)).into());
        }
        // llama.cpp's own projection of each row, asked of its node's agent
        // the first time and waited for a few seconds.
        let shown: Vec<_> = states
            .iter()
            .filter(|n| r.node.is_empty() || n.name == r.node)
            .cloned()
            .collect();
        let mut asked = Vec::new();
        for &ctx in &contexts {
            let opts = estimate_options(ctx, e.parallel, &ctk, &ctv);
            asked.extend(ask_engine::ensure(
                &self.observed,
                &self.events,
                &shown,
                &e.model_id,
                &opts,
            ));
        }
        self.observed
            .projections()
            .wait(&asked, projections::WAIT)
            .await;
        let states = self.observed.node_states(Instant::now());
        let used = used_by_node(&states, &plain, &[]);
        let mut rows = Vec::new();
        for n in states
            .iter()
            .filter(|n| r.node.is_empty() || n.name == r.node)
        {
            let Some(p) = n.models.get(&e.model_id) else {
                continue;
            };
            let avail = n.free(&used);
            let view = plan_view(&states, &n.name);
            for &ctx in &contexts {
                // Sized like a placement: a real load at these settings
                // anywhere in the cluster beats the formula.
                let opts = estimate_options(ctx, e.parallel, &ctk, &ctv);
                let est =
                    placement::checked_breakdown(&view, &e.model_id, p, &opts, (ctx, &ctk, &ctv));
                let pending = est.engine.is_none()
                    && asked
                        .iter()
                        .any(|k| k.node == n.name && k.matches(&e.model_id, &opts));
                let mut notes = est.notes();
                if pending {
                    notes.push(format!(
                        "engine check on {} still running; using the formula (plan again to see it)",
                        n.name
                    ));
                }
                let need = est.total_bytes + placement::margin(est.total_bytes);
                // A node the controller does not hear from fits nothing now.
                let live = n.liveness == crate::nodes::Liveness::Ready;
                rows.push(v1::PlanRow {
                    node: n.name.clone(),
                    context_size: ctx,
                    weights_bytes: est.weights_bytes,
                    kv_bytes: est.kv_bytes,
                    compute_bytes: est.compute_bytes,
                    output_bytes: est.output_bytes,
                    total_bytes: est.total_bytes,
                    available_bytes: avail,
                    fits: live && need <= avail,
                    reason: if live {
                        format!(
                            "needs {} with margin, {} available (estimate: {})",
                            proto::units::bytes(need),
                            proto::units::bytes(avail),
                            est.source()
                        )
                    } else {
                        format!(
                            "node is {}: nothing is placed on it until it is back",
                            proto::domain::NodeStatus::from(n.liveness).as_str()
                        )
                    },
                    formula_total_bytes: est.formula_total_bytes,
                    engine_total_bytes: est.engine_total_bytes,
                    estimate_used: est.used().to_owned(),
                    estimate_notes: notes,
                });
            }
        }
        Ok(Response::new(v1::PlanResponse { rows }))
    }

    #[tracing::instrument(skip_all, fields(role = %r.get_ref().role.escape_debug(), model = %r.get_ref().model.escape_debug()))]
    async fn place(
        &self,
        r: Request<v1::PlaceRequest>,
    ) -> Result<Response<v1::PlaceResponse>, Status> {
        self.access.check("Place", &r)?;
        Ok(Response::new(
            ControllerApi::place(self, r.into_inner()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(name = %r.get_ref().name.escape_debug()))]
    async fn unplace(
        &self,
        r: Request<v1::UnplaceRequest>,
    ) -> Result<Response<v1::UnplaceResponse>, Status> {
        self.access.check("Unplace", &r)?;
        let name = r.into_inner().name;
        proto::domain::catalog::check_name("name", &name).map_err(Error::from)?;
        let key = placement_key(&name);
        let Some(kv) = self.desired.store().get(&key).await.map_err(Error::from)? else {
            return Err(Error::NotFound(format!("no placement `{name}`")).into());
        };
        self.desired
            .write(
                vec![Compare::at(&key, kv.mod_revision)],
                vec![Op::Delete { key }],
            )
            .await?;
        self.events.emit("unplaced", &name, "removed");
        Ok(Response::new(v1::UnplaceResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn endpoints(
        &self,
        r: Request<v1::EndpointsRequest>,
    ) -> Result<Response<v1::EndpointsResponse>, Status> {
        // A read-only certificate sees where the endpoints are, not the
        // keys that would let it use them.
        let secrets = self.access.check_secrets("Endpoints", &r)?;
        let catalog = self.desired.catalog().await?;
        let (placed, _) = self.desired.placements().await?;
        let by_rid = instances_by_request(&self.observed);
        let mut endpoints = Vec::new();
        for v in placed {
            let p = v.value;
            let modes: Vec<EditorMode> = catalog
                .get(&p.model)
                .map(|e| e.modes.clone())
                .unwrap_or_default();
            for r in &p.replicas {
                let Some((node, i)) = by_rid.get(&p.key(r).request_id()) else {
                    continue;
                };
                if i.state != InstanceState::Ready || node != &r.node {
                    continue;
                }
                // An entry with no modes still has a ready endpoint: listed
                // once, mode unspecified, rather than hidden.
                let wire: Vec<i32> = if modes.is_empty() {
                    vec![v1::EditorMode::Unspecified as i32]
                } else {
                    modes
                        .iter()
                        .map(|m| v1::EditorMode::from(*m) as i32)
                        .collect()
                };
                for m in wire {
                    endpoints.push(v1::Endpoint {
                        mode: m,
                        base_url: i.endpoint.clone(),
                        model: p.model.clone(),
                        placement: p.name.clone(),
                        node: node.clone(),
                        api_key: if secrets {
                            i.api_key.clone()
                        } else {
                            String::new()
                        },
                    });
                }
            }
        }
        Ok(Response::new(v1::EndpointsResponse { endpoints }))
    }

    #[tracing::instrument(skip_all)]
    #[tracing::instrument(skip_all, fields(model = %r.get_ref().model.escape_debug()))]
    async fn demand(
        &self,
        r: Request<v1::DemandRequest>,
    ) -> Result<Response<v1::DemandResponse>, Status> {
        // Loads models and evicts others: gateways, agents (which serve
        // gateways) and admins, not a read-only certificate.
        if !self.access.check_secrets("Demand", &r)? {
            return Err(Status::permission_denied(
                "ControllerService.Demand loads models: it needs role admin, gateway or agent; \
                 the client certificate's role is read-only",
            ));
        }
        Ok(Response::new(
            ControllerApi::demand(self, r.into_inner()).await?,
        ))
    }

    async fn report_use(
        &self,
        r: Request<v1::ReportUseRequest>,
    ) -> Result<Response<v1::ReportUseResponse>, Status> {
        if !self.access.check_secrets("ReportUse", &r)? {
            return Err(Status::permission_denied(
                "ControllerService.ReportUse keeps models loaded: it needs role admin, gateway \
                 or agent; the client certificate's role is read-only",
            ));
        }
        // Only the leader unloads: a follower's record would be lost.
        if self.desired.leadership().term().is_none() {
            return Err(Error::NotLeader.into());
        }
        let r = r.into_inner();
        let uses: Vec<(String, u64, u32)> = r
            .uses
            .into_iter()
            .take(4096)
            .map(|u| (u.model, u.requests, u.in_flight))
            .collect();
        self.usage.report(&r.gateway, &uses, now_unix_ms());
        Ok(Response::new(v1::ReportUseResponse {}))
    }

    async fn routes(
        &self,
        r: Request<v1::RoutesRequest>,
    ) -> Result<Response<v1::RoutesResponse>, Status> {
        // Instance API keys and key hashes: never for a read-only caller.
        if !self.access.check_secrets("Routes", &r)? {
            return Err(Status::permission_denied(
                "ControllerService.Routes carries instance API keys and user-key hashes: it \
                 needs role admin, gateway or agent; the client certificate's role is read-only",
            ));
        }
        let catalog = self.desired.catalog().await?;
        let (placed, _) = self.desired.placements().await?;
        let placements: Vec<Placement> = placed.into_iter().map(|v| v.value).collect();
        let keys = crate::keys::list(&self.desired).await?;
        let by_request = instances_by_request(&self.observed);
        let refused = placements
            .iter()
            .flat_map(|p| p.replicas.iter().map(|r| p.key(r).request_id()))
            .filter(|rid| self.observed.start_refused(rid).is_some())
            .collect();
        let nodes = self.observed.read().clone();
        let resp = crate::routes::build(&crate::routes::Snapshot {
            placements: &placements,
            catalog: &catalog,
            nodes: &nodes,
            by_request: &by_request,
            refused: &refused,
            keys: &keys,
            timing: self.observed.timing(),
            now: Instant::now(),
            now_unix_ms: proto::units::now_unix_ms(),
        });
        Ok(Response::new(resp))
    }

    #[tracing::instrument(skip_all, fields(name = %r.get_ref().name.escape_debug()))]
    async fn create_key(
        &self,
        r: Request<v1::CreateKeyRequest>,
    ) -> Result<Response<v1::CreateKeyResponse>, Status> {
        self.access.check("CreateKey", &r)?;
        let (rec, secret) = crate::keys::create(&self.desired, r.get_ref()).await?;
        let scope = |v: Vec<String>| {
            if v.is_empty() {
                "all".to_owned()
            } else {
                v.join(",")
            }
        };
        self.events.emit(
            "key_created",
            &rec.name,
            format!(
                "modes {}, models {}",
                scope(rec.modes.iter().map(ToString::to_string).collect()),
                scope(rec.models.clone())
            ),
        );
        Ok(Response::new(v1::CreateKeyResponse {
            key: Some(rec.to_wire(false)),
            secret,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_keys(
        &self,
        r: Request<v1::ListKeysRequest>,
    ) -> Result<Response<v1::ListKeysResponse>, Status> {
        self.access.check("ListKeys", &r)?;
        let keys = crate::keys::list(&self.desired)
            .await?
            .iter()
            .map(|k| k.to_wire(false))
            .collect();
        Ok(Response::new(v1::ListKeysResponse { keys }))
    }

    #[tracing::instrument(skip_all, fields(name = %r.get_ref().name.escape_debug()))]
    async fn revoke_key(
        &self,
        r: Request<v1::RevokeKeyRequest>,
    ) -> Result<Response<v1::RevokeKeyResponse>, Status> {
        self.access.check("RevokeKey", &r)?;
        let name = r.into_inner().name;
        crate::keys::revoke(&self.desired, &name).await?;
        self.events.emit("key_revoked", &name, "revoked");
        Ok(Response::new(v1::RevokeKeyResponse {}))
    }

    #[tracing::instrument(skip_all)]
    async fn put_bench_result(
        &self,
        r: Request<v1::PutBenchResultRequest>,
    ) -> Result<Response<v1::PutBenchResultResponse>, Status> {
        self.access.check("PutBenchResult", &r)?;
        let res = crate::bench::put_request(r.into_inner())?;
        crate::bench::put(&self.desired, &res).await?;
        self.events.emit(
            "bench",
            &res.setup.model,
            format!("on {}: {} point(s) kept", res.setup.node, res.points.len()),
        );
        Ok(Response::new(v1::PutBenchResultResponse {}))
    }

    #[tracing::instrument(skip_all, fields(model = %r.get_ref().model.escape_debug()))]
    async fn list_bench_results(
        &self,
        r: Request<v1::ListBenchResultsRequest>,
    ) -> Result<Response<v1::ListBenchResultsResponse>, Status> {
        self.access.check("ListBenchResults", &r)?;
        let results = crate::bench::list(&self.desired, &r.get_ref().model)
            .await?
            .into_iter()
            .map(Into::into)
            .collect();
        Ok(Response::new(v1::ListBenchResultsResponse { results }))
    }

    type WatchEventsStream = EventStream;
    type CopyModelStream = CopyStream;

    #[tracing::instrument(skip_all, fields(model = %r.get_ref().model.escape_debug(), to = %r.get_ref().to_node.escape_debug()))]
    async fn copy_model(
        &self,
        r: Request<v1::CopyModelRequest>,
    ) -> Result<Response<Self::CopyModelStream>, Status> {
        self.access.check("CopyModel", &r)?;
        Ok(Response::new(
            ControllerApi::copy_model(self, r.into_inner()).await?,
        ))
    }
    type PlacementLogsStream = LogStream;

    #[tracing::instrument(skip_all, fields(placement = %r.get_ref().placement.escape_debug()))]
    async fn placement_logs(
        &self,
        r: Request<v1::PlacementLogsRequest>,
    ) -> Result<Response<Self::PlacementLogsStream>, Status> {
        self.access.check("PlacementLogs", &r)?;
        let r = r.into_inner();
        let (placed, _) = self.desired.placements().await?;
        let p = placed
            .into_iter()
            .map(|v| v1::Placement::from(v.value))
            .find(|p| p.name == r.placement)
            .ok_or_else(|| Error::NotFound(format!("no placement `{}`", r.placement)))?;
        let replica = p.replicas.get(r.replica as usize).ok_or_else(|| {
            Error::NotFound(format!(
                "placement `{}` has {} replica(s); there is no replica {}",
                p.name,
                p.replicas.len(),
                r.replica
            ))
        })?;
        let (node, instance) = instances_by_request(&self.observed)
            .remove(&replica.request_id)
            .ok_or_else(|| {
                // A start its agent refused has no log: say why instead.
                let why = self
                    .observed
                    .start_refused(&replica.request_id)
                    .map_or_else(
                        || "has no instance yet".to_owned(),
                        |e| {
                            format!(
                                "has no instance: its start was refused on {}: {e}",
                                replica.node
                            )
                        },
                    );
                Error::FailedPrecondition(format!(
                    "placement `{}` replica {} {why}",
                    p.name, r.replica
                ))
            })?;
        let address = self
            .observed
            .read()
            .get(&node)
            .map(|n| n.config.address.clone())
            .ok_or_else(|| Error::NotFound(format!("node `{node}` is not configured")))?;
        // The agent being unreachable is a state of the cluster, not of this
        // controller: FailedPrecondition, naming the node.
        let agent_err =
            |why: String| Error::FailedPrecondition(format!("node `{node}` at {address}: {why}"));
        let mut agent =
            crate::observe::agent_client(&address).map_err(|e| agent_err(e.to_string()))?;
        let mut upstream = agent
            .tail_logs(v1::TailLogsRequest {
                instance_id: instance.id.clone(),
                lines: r.lines,
                follow: r.follow,
            })
            .await
            .map_err(|s| agent_err(s.message().to_owned()))?
            .into_inner();
        let (tx, out) = mpsc::channel(256);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            loop {
                let line = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    l = upstream.message() => l,
                };
                let item = match line {
                    Ok(Some(l)) => Ok(l),
                    Ok(None) => return,
                    Err(s) => Err(s),
                };
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }

    #[tracing::instrument(skip_all)]
    async fn watch_events(
        &self,
        r: Request<v1::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        self.access.check("WatchEvents", &r)?;
        let r = r.into_inner();
        let (recent, mut rx) = self
            .events
            .recent_and_subscribe(r.recent.map(|n| n as usize));
        let (tx, out) = mpsc::channel(64);
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            for e in recent {
                if tx.send(Ok(e.into())).await.is_err() {
                    return;
                }
            }
            if !r.follow {
                return;
            }
            loop {
                let e = tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tx.closed() => return,
                    e = rx.recv() => e,
                };
                let e = match e {
                    Ok(e) => e,
                    Err(broadcast::error::RecvError::Lagged(n)) => crate::events::ClusterEvent {
                        at_unix_ms: proto::units::now_unix_ms(),
                        kind: "lagged".into(),
                        subject: String::new(),
                        message: format!("{n} events skipped: this reader was too slow"),
                    },
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if tx.send(Ok(e.into())).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}

/// Writes catalog entries that differ from the store's (leader only).
pub async fn sync_catalog(desired: &Desired, entries: &[CatalogEntry]) -> Result<(), Error> {
    let current = desired.catalog().await?;
    for e in entries {
        if current.get(&e.name) != Some(e) {
            desired.put_catalog(e).await?;
            tracing::info!(model = %e.name, key = %catalog_key(&e.name), "catalog entry written");
        }
    }
    Ok(())
}
