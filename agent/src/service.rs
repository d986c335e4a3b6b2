//! The `halo.v1.AgentService` gRPC service: converts wire messages to domain
//! types at the boundary (range checks live in `proto`'s `TryFrom`), calls
//! the [`Supervisor`], and converts back. Streams (Watch, TailLogs) run as
//! one task each that ends when the client goes away or the agent shuts down.
//! StartInstance and StopInstance share a token bucket ([`TokenBucket`]):
//! a call beyond it is refused before anything starts or stops.

use crate::error::Error;
use crate::supervisor::{StartRequest, Supervisor};
use proto::domain::{AgentEvent, AgentEventKind, LogLine, ProjectionRequest, projection};
use proto::tls::{Access, Policy, Role};
use proto::v1;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio::sync::{broadcast, mpsc};
use tokio::time::MissedTickBehavior;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

/// Messages buffered per stream before the sender waits.
const STREAM_BUFFER: usize = 64;
/// Bounds of a watcher's memory sample period.
const MIN_MEMORY_PERIOD: Duration = Duration::from_millis(100);
const MAX_MEMORY_PERIOD: Duration = Duration::from_secs(3600);

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Start and stop calls the agent takes at once before it refuses more.
pub const MUTATION_BURST: u32 = 20;
/// Start and stop calls per second the agent takes after a burst.
///
/// The controller sends one start per replica it wants running and one
/// stop per instance it no longer wants, each at most once at a time and
/// backed off after a failure; a cluster of a few models needs a handful
/// per reconcile pass, and even re-placing 20 models at once fits in the
/// burst. A client that loops (a bug, or something hostile) is held to five
/// a second, which the agent (a process spawn and a state-file write each)
/// takes without slowing its Watch streams.
pub const MUTATION_RATE_PER_SEC: u32 = 5;

/// A token bucket: `capacity` calls at once, refilled at `rate` per second.
#[derive(Debug)]
pub struct TokenBucket {
    capacity: f64,
    rate: f64,
    state: std::sync::Mutex<(f64, Instant)>,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(capacity: u32, rate_per_sec: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            capacity: f64::from(capacity),
            rate: f64::from(rate_per_sec.max(1)),
            state: std::sync::Mutex::new((f64::from(capacity), now)),
        }
    }

    /// Takes one token at `now`, or says how long until one is there.
    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let (tokens, last) = *st;
        let elapsed = now.saturating_duration_since(last).as_secs_f64();
        let tokens = (tokens + elapsed * self.rate).min(self.capacity);
        if tokens >= 1.0 {
            *st = (tokens - 1.0, now.max(last));
            Ok(())
        } else {
            *st = (tokens, now.max(last));
            Err(Duration::from_secs_f64((1.0 - tokens) / self.rate))
        }
    }
}

/// Who may call what when the agent serves mutual TLS: the one place that
/// lists the methods that change something. Only the controller starts and
/// stops instances and has a model pulled here; the controller, people
/// (admin, read-only), gateways (`gateway`, or another node's agent
/// serving one) and agents may look; only another agent, pulling a model,
/// may read a model file's bytes (FetchModel).
pub const POLICY: Policy = Policy {
    service: "AgentService",
    mutating: &["StartInstance", "StopInstance", "PullModel"],
    writers: &[Role::Controller],
    readers: &[
        Role::Controller,
        Role::Admin,
        Role::ReadOnly,
        Role::Gateway,
        Role::Agent,
    ],
    only: &[("FetchModel", &[Role::Agent])],
};

/// The gRPC service over a supervisor.
#[derive(Debug, Clone)]
pub struct AgentApi {
    supervisor: Supervisor,
    shutdown: CancellationToken,
    access: Access,
    /// Shared by StartInstance and StopInstance.
    mutations: std::sync::Arc<TokenBucket>,
    /// Model copies into this node.
    copies: crate::copy::Copies,
    /// llama.cpp's memory projection (ProjectMemory).
    engine: std::sync::Arc<crate::engine::Engine>,
}

impl AgentApi {
    /// A service whose streams end when `shutdown` is cancelled; open to
    /// every caller (plaintext) until [`AgentApi::with_access`].
    pub fn new(supervisor: Supervisor, shutdown: CancellationToken) -> AgentApi {
        let (bin, timeout) = supervisor_fit_params(&supervisor);
        AgentApi {
            shutdown,
            access: Access::open(),
            mutations: std::sync::Arc::new(TokenBucket::new(
                MUTATION_BURST,
                MUTATION_RATE_PER_SEC,
                Instant::now(),
            )),
            copies: crate::copy::Copies::default(),
            engine: std::sync::Arc::new(crate::engine::Engine::new(bin, timeout)),
            supervisor,
        }
    }

    /// Takes a start/stop token, or refuses the call with
    /// `RESOURCE_EXHAUSTED` saying when to retry; a refused call changes
    /// nothing.
    fn admit(&self, method: &'static str) -> Result<(), Error> {
        self.mutations.take(Instant::now()).map_err(|wait| {
            let ms = wait.as_micros().div_ceil(1000).max(1);
            tracing::warn!(method, "rate limited; retry in {ms} ms");
            Error::RateLimited {
                method,
                burst: MUTATION_BURST,
                rate: MUTATION_RATE_PER_SEC,
                retry_after_ms: ms,
            }
        })
    }

    /// Checks callers' certificate roles against [`POLICY`] (mutual TLS).
    pub fn with_access(mut self, access: Access) -> AgentApi {
        self.access = access;
        self
    }
}

/// The configured llama-fit-params and its deadline.
fn supervisor_fit_params(s: &Supervisor) -> (std::path::PathBuf, Duration) {
    let c = s.config();
    (c.fit_params_bin.clone(), c.fit_params_timeout)
}

/// Sends one message, waiting for a slow client only until shutdown; false
/// when the stream should end.
async fn send<T>(
    tx: &mpsc::Sender<Result<T, Status>>,
    item: T,
    shutdown: &CancellationToken,
) -> bool {
    tokio::select! {
        r = tx.send(Ok(item)) => r.is_ok(),
        () = shutdown.cancelled() => false,
    }
}

/// Clears instances' API keys from `e` unless the watcher may see them.
fn hide_keys(mut e: v1::AgentEvent, secrets: bool) -> v1::AgentEvent {
    use v1::agent_event::Event;
    if !secrets {
        match &mut e.event {
            Some(Event::Instance(i)) => i.api_key.clear(),
            Some(Event::Snapshot(s)) => s.instances.iter_mut().for_each(|i| i.api_key.clear()),
            Some(Event::Memory(_) | Event::Models(_)) | None => {}
        }
    }
    e
}

fn event(kind: AgentEventKind) -> v1::AgentEvent {
    AgentEvent {
        at_unix_ms: proto::units::now_unix_ms(),
        kind,
    }
    .into()
}

#[tonic::async_trait]
impl v1::agent_service_server::AgentService for AgentApi {
    #[tracing::instrument(skip_all)]
    async fn get_node(
        &self,
        req: Request<v1::GetNodeRequest>,
    ) -> Result<Response<v1::GetNodeResponse>, Status> {
        self.access.check("GetNode", &req)?;
        let c = self.supervisor.config();
        Ok(Response::new(v1::GetNodeResponse {
            node: Some(self.supervisor.node().into()),
            memory: Some(self.supervisor.memory().await.into()),
            reserve_bytes: c.reserve_bytes,
            allowed_flags: c.allowed_flags.iter().map(|f| f.entry.clone()).collect(),
            port_range_first: u32::from(c.port_range.first),
            port_range_last: u32::from(c.port_range.last),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_memory(
        &self,
        req: Request<v1::GetMemoryRequest>,
    ) -> Result<Response<v1::MemoryReport>, Status> {
        self.access.check("GetMemory", &req)?;
        Ok(Response::new(self.supervisor.memory().await.into()))
    }

    #[tracing::instrument(skip_all, fields(rescan = req.get_ref().rescan))]
    async fn list_models(
        &self,
        req: Request<v1::ListModelsRequest>,
    ) -> Result<Response<v1::ListModelsResponse>, Status> {
        self.access.check("ListModels", &req)?;
        let models = if req.into_inner().rescan {
            self.supervisor.rescan().await
        } else {
            self.supervisor.models()
        };
        Ok(Response::new(v1::ListModelsResponse {
            models: models.into_iter().map(Into::into).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_instances(
        &self,
        req: Request<v1::ListInstancesRequest>,
    ) -> Result<Response<v1::ListInstancesResponse>, Status> {
        let secrets = self.access.check_secrets("ListInstances", &req)?;
        let mut instances: Vec<v1::Instance> = self
            .supervisor
            .instances()
            .await
            .into_iter()
            .map(Into::into)
            .collect();
        if !secrets {
            instances.iter_mut().for_each(|i| i.api_key.clear());
        }
        Ok(Response::new(v1::ListInstancesResponse { instances }))
    }

    #[tracing::instrument(skip_all, fields(request_id = %req.get_ref().request_id.escape_debug(), model = %req.get_ref().model_id.escape_debug(), kind = req.get_ref().kind))]
    async fn start_instance(
        &self,
        req: Request<v1::StartInstanceRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        self.access.check("StartInstance", &req)?;
        self.admit("StartInstance")?;
        let start = StartRequest::try_from(req.into_inner()).map_err(Error::from)?;
        // In its own task: a caller that goes away (a controller killed
        // mid-call) must not cancel a start halfway, leaving a recorded
        // instance that never runs while retries of the same request id
        // return it.
        let sup = self.supervisor.clone();
        let instance = tokio::spawn(async move { sup.start(start).await })
            .await
            .map_err(|e| Status::internal(format!("start task failed: {e}")))?
            .inspect_err(|e| tracing::info!("start refused: {e}"))?;
        Ok(Response::new(instance.into()))
    }

    #[tracing::instrument(skip_all, fields(instance = %req.get_ref().instance_id.escape_debug()))]
    async fn stop_instance(
        &self,
        req: Request<v1::StopInstanceRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        self.access.check("StopInstance", &req)?;
        self.admit("StopInstance")?;
        let r = req.into_inner();
        // In its own task, like a start: a stop is finished once begun.
        let sup = self.supervisor.clone();
        let instance =
            tokio::spawn(async move { sup.stop(&r.instance_id, r.leader_revision).await })
                .await
                .map_err(|e| Status::internal(format!("stop task failed: {e}")))??;
        Ok(Response::new(instance.into()))
    }

    type WatchStream = ResponseStream<v1::AgentEvent>;

    #[tracing::instrument(skip_all)]
    async fn watch(
        &self,
        req: Request<v1::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let secrets = self.access.check_secrets("Watch", &req)?;
        let period = match req.into_inner().memory_period_ms {
            0 => self.supervisor.config().memory_sample_period,
            ms => Duration::from_millis(u64::from(ms)).clamp(MIN_MEMORY_PERIOD, MAX_MEMORY_PERIOD),
        };
        // Subscribe before the snapshot: a change between the two is sent
        // (again) rather than lost.
        let mut events = self.supervisor.subscribe();
        let sup = self.supervisor.clone();
        let shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            let snapshot = AgentEventKind::Snapshot(Box::new(sup.snapshot().await));
            if !send(&tx, hide_keys(event(snapshot), secrets), &shutdown).await {
                return;
            }
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tx.closed() => break,
                    e = events.recv() => match e {
                        Ok(e) => e.into(),
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::debug!("watcher lagged {n} events; sending a new snapshot");
                            event(AgentEventKind::Snapshot(Box::new(sup.snapshot().await)))
                        }
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = tick.tick() => event(AgentEventKind::Memory(Box::new(sup.memory().await))),
                };
                if !send(&tx, hide_keys(next, secrets), &shutdown).await {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type FetchModelStream = ResponseStream<v1::ModelChunk>;

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model_id.escape_debug(), part = req.get_ref().part, offset = req.get_ref().offset))]
    async fn fetch_model(
        &self,
        req: Request<v1::FetchModelRequest>,
    ) -> Result<Response<Self::FetchModelStream>, Status> {
        self.fetch(req).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model_id.escape_debug(), ctx = req.get_ref().context_size))]
    async fn project_memory(
        &self,
        req: Request<v1::ProjectMemoryRequest>,
    ) -> Result<Response<v1::ProjectMemoryResponse>, Status> {
        self.access.check("ProjectMemory", &req)?;
        let r = ProjectionRequest::try_from(req.into_inner()).map_err(Error::from)?;
        let path = self
            .supervisor
            .model_part_path(&r.model_id, 0)
            .ok_or_else(|| Error::UnknownModel {
                id: r.model_id.clone(),
            })?;
        // In its own task: a caller that leaves does not cut a run short
        // (its answer is cached for the next one).
        let engine = self.engine.clone();
        let (answer, cached) =
            tokio::spawn(async move { engine.project(&path, &r.settings).await })
                .await
                .map_err(|e| Status::internal(format!("projection task failed: {e}")))?;
        Ok(Response::new(projection::answer_to_wire(&answer, cached)))
    }

    type PullModelStream = ResponseStream<v1::CopyProgress>;

    #[tracing::instrument(skip_all, fields(model = %req.get_ref().model_id.escape_debug(), from = %req.get_ref().source_node.escape_debug()))]
    async fn pull_model(
        &self,
        req: Request<v1::PullModelRequest>,
    ) -> Result<Response<Self::PullModelStream>, Status> {
        self.pull(req).await.map(Response::new)
    }

    type TailLogsStream = ResponseStream<v1::LogLine>;

    #[tracing::instrument(skip_all, fields(instance = %req.get_ref().instance_id.escape_debug()))]
    async fn tail_logs(
        &self,
        req: Request<v1::TailLogsRequest>,
    ) -> Result<Response<Self::TailLogsStream>, Status> {
        self.access.check("TailLogs", &req)?;
        let r = req.into_inner();
        let handle = self
            .supervisor
            .tail(&r.instance_id, r.lines as usize, r.follow)?;
        let shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(async move {
            for line in handle.backlog {
                if !send(&tx, line.into(), &shutdown).await {
                    return;
                }
            }
            let Some((mut lines, finished)) = handle.live else {
                return;
            };
            loop {
                let next: LogLine = tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tx.closed() => break,
                    () = finished.cancelled() => {
                        // The last lines of a stopped instance, then the end.
                        while let Ok(l) = lines.try_recv() {
                            if !send(&tx, l.into(), &shutdown).await {
                                break;
                            }
                        }
                        break;
                    }
                    l = lines.recv() => match l {
                        Ok(l) => l,
                        Err(broadcast::error::RecvError::Lagged(n)) => LogLine {
                            at_unix_ms: proto::units::now_unix_ms(),
                            line: format!("[halo-agent: {n} lines skipped: this reader was too slow]"),
                        },
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                };
                if !send(&tx, next.into(), &shutdown).await {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// FetchModel's and PullModel's streams.
impl AgentApi {
    async fn fetch(
        &self,
        req: Request<v1::FetchModelRequest>,
    ) -> Result<ResponseStream<v1::ModelChunk>, Status> {
        self.access.check("FetchModel", &req)?;
        let r = req.into_inner();
        crate::scan::check_model_id(&r.model_id).map_err(|reason| Error::BadModelId {
            id: r.model_id.clone(),
            reason,
        })?;
        // Only what this agent's own scan lists, resolved here.
        let path = self
            .supervisor
            .model_part_path(&r.model_id, r.part as usize)
            .ok_or(Error::UnknownModel {
                id: r.model_id.clone(),
            })?;
        let (tx, rx) = mpsc::channel::<Result<v1::ModelChunk, Status>>(4);
        let offset = r.offset;
        tokio::task::spawn_blocking(move || {
            if let Err(e) = crate::copy::send_part(&path, offset, &tx) {
                tracing::warn!(model = %r.model_id.escape_debug(), "fetch failed: {e}");
                let _ = tx.blocking_send(Err(e.into()));
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }

    async fn pull(
        &self,
        req: Request<v1::PullModelRequest>,
    ) -> Result<ResponseStream<v1::CopyProgress>, Status> {
        self.access.check("PullModel", &req)?;
        let r = req.into_inner();
        crate::scan::check_model_id(&r.model_id).map_err(|reason| Error::BadModelId {
            id: r.model_id.clone(),
            reason,
        })?;
        if r.source_address.is_empty() || r.source_address.len() > 300 {
            return Err(Error::InvalidArgument {
                field: "source_address",
                reason: "must be host:port".into(),
            }
            .into());
        }
        self.supervisor.accept_leader(r.leader_revision).await?;
        let pull = crate::copy::Pull {
            model_id: r.model_id,
            source_address: r.source_address,
            source_node: r.source_node,
        };
        let mut progress = self
            .copies
            .pull(&self.supervisor, pull, self.shutdown.child_token());
        let shutdown = self.shutdown.clone();
        let (tx, rx) = mpsc::channel::<Result<v1::CopyProgress, Status>>(STREAM_BUFFER);
        tokio::spawn(async move {
            loop {
                let p = progress.borrow_and_update().clone();
                let end = p.state.is_final();
                if !send(&tx, v1::CopyProgress::from(p), &shutdown).await || end {
                    return;
                }
                tokio::select! {
                    () = tx.closed() => return,
                    r = progress.changed() => if r.is_err() {
                        // The copy's task ended: its last report is final.
                        let p = progress.borrow().clone();
                        let _ = send(&tx, v1::CopyProgress::from(p), &shutdown).await;
                        return;
                    },
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate_and_says_when_to_retry() {
        let t0 = Instant::now();
        let b = TokenBucket::new(20, 5, t0);
        for i in 0..20 {
            assert_eq!(b.take(t0), Ok(()), "call {i} of the burst");
        }
        let wait = b.take(t0).expect_err("21st call at once");
        assert!(
            wait > Duration::from_millis(150) && wait <= Duration::from_millis(200),
            "{wait:?}"
        );
        // A refused call takes nothing: after the wait, exactly one passes.
        let t1 = t0 + Duration::from_millis(200);
        assert_eq!(b.take(t1), Ok(()));
        assert!(b.take(t1).is_err());
        // Idle time refills up to the burst, never beyond.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..20 {
            assert_eq!(b.take(t2), Ok(()));
        }
        assert!(b.take(t2).is_err());
    }

    #[test]
    fn a_steady_five_per_second_is_never_refused() {
        let t0 = Instant::now();
        let b = TokenBucket::new(MUTATION_BURST, MUTATION_RATE_PER_SEC, t0);
        for i in 0..1_000u32 {
            let at = t0 + Duration::from_millis(200) * i;
            assert_eq!(b.take(at), Ok(()), "call {i}");
        }
    }
}
