//! The `halo.v1.AgentService` gRPC service: converts wire messages to domain
//! types at the boundary (range checks live in `proto`'s `TryFrom`), calls
//! the [`Supervisor`], and converts back. Streams (Watch, TailLogs) run as
//! one task each that ends when the client goes away or the agent shuts down.

use crate::error::Error;
use crate::supervisor::{StartRequest, Supervisor};
use proto::domain::{AgentEvent, AgentEventKind, InstanceKind, InstanceOptions, LogLine};
use proto::tls::{Access, Policy, Role};
use proto::v1;
use std::pin::Pin;
use std::time::Duration;
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

/// Who may call what when the agent serves mutual TLS: the one place that
/// lists the methods that change something. Only the controller starts and
/// stops instances; the controller and people (admin, read-only) may look;
/// another agent may do nothing.
pub const POLICY: Policy = Policy {
    service: "AgentService",
    mutating: &["StartInstance", "StopInstance"],
    writers: &[Role::Controller],
    readers: &[Role::Controller, Role::Admin, Role::ReadOnly],
};

/// The gRPC service over a supervisor.
#[derive(Debug, Clone)]
pub struct AgentApi {
    supervisor: Supervisor,
    shutdown: CancellationToken,
    access: Access,
}

impl AgentApi {
    /// A service whose streams end when `shutdown` is cancelled; open to
    /// every caller (plaintext) until [`AgentApi::with_access`].
    pub fn new(supervisor: Supervisor, shutdown: CancellationToken) -> AgentApi {
        AgentApi {
            supervisor,
            shutdown,
            access: Access::open(),
        }
    }

    /// Checks callers' certificate roles against [`POLICY`] (mutual TLS).
    pub fn with_access(mut self, access: Access) -> AgentApi {
        self.access = access;
        self
    }
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

fn event(kind: AgentEventKind) -> v1::AgentEvent {
    AgentEvent {
        at_unix_ms: crate::supervisor::now_unix_ms(),
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
        self.access.check("ListInstances", &req)?;
        let instances = self.supervisor.instances().await;
        Ok(Response::new(v1::ListInstancesResponse {
            instances: instances.into_iter().map(Into::into).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(request_id = %req.get_ref().request_id.escape_debug(), model = %req.get_ref().model_id.escape_debug(), kind = req.get_ref().kind))]
    async fn start_instance(
        &self,
        req: Request<v1::StartInstanceRequest>,
    ) -> Result<Response<v1::Instance>, Status> {
        self.access.check("StartInstance", &req)?;
        let r = req.into_inner();
        let options =
            InstanceOptions::try_from(r.options.unwrap_or_default()).map_err(Error::from)?;
        let kind = InstanceKind::from_wire(r.kind).map_err(Error::from)?;
        // In its own task: a caller that goes away (a controller killed
        // mid-call) must not cancel a start halfway, leaving a recorded
        // instance that never runs while retries of the same request id
        // return it.
        let sup = self.supervisor.clone();
        let instance = tokio::spawn(async move {
            sup.start(StartRequest {
                request_id: r.request_id,
                model_id: r.model_id,
                options,
                generation: r.generation,
                leader_revision: r.leader_revision,
                kind,
            })
            .await
        })
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
        self.access.check("Watch", &req)?;
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
            if !send(&tx, event(snapshot), &shutdown).await {
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
                if !send(&tx, next, &shutdown).await {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
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
                            at_unix_ms: crate::supervisor::now_unix_ms(),
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
