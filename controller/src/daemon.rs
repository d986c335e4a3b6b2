//! The daemon: opens the store, binds the gRPC listener, and runs the
//! services (one agent link per node, the reconciler, leader election on
//! etcd, catalog sync, the API) until the root token is cancelled; then
//! drains within a bounded grace period.

use crate::api::{ControllerApi, sync_catalog};
use crate::config::{Config, StoreConfig};
use crate::desired::Desired;
use crate::events::Events;
use crate::leader::{Election, Leadership, Term};
use crate::observe::{AgentLink, NodeConfig, Observed};
use crate::reconcile::Reconciler;
use crate::store::etcd::EtcdStore;
use crate::store::file::FileStore;
use crate::store::{AnyStore, StoreError};
use proto::config::{EXIT_CONFIG, EXIT_UNAVAILABLE};
use proto::domain::CatalogEntry;
use proto::tls_reload::ReloadingTls;
use proto::v1::controller_service_server::ControllerServiceServer;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long services get after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the daemon could not run.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The store could not be opened or reached.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(String),
    /// The TLS files could not be used.
    #[error("tls: {0}")]
    Tls(String),
}

impl StartupError {
    /// Exit code: 69 (EX_UNAVAILABLE) for an unreachable store or a busy
    /// address, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartupError::Store(StoreError::Unavailable(_)) | StartupError::Listen { .. } => {
                EXIT_UNAVAILABLE
            }
            StartupError::Store(StoreError::Corrupt { .. }) => EXIT_CONFIG,
            _ => 1,
        }
    }
}

/// Runs the controller until `shutdown` is cancelled.
///
/// The steps: TLS files, the store, the listener, leadership (claimed on
/// the file store, elected on etcd), the nodes to watch, one link per
/// node, catalog and node sync on leadership, the reconciler, then the API
/// until shutdown, and a bounded drain.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), StartupError> {
    let tls = load_tls(&config)?;
    let leadership = Leadership::new(&config.id);
    let store = open_store(&config.store).await?;
    let listener =
        TcpListener::bind(config.listen)
            .await
            .map_err(|source| StartupError::Listen {
                addr: config.listen,
                source,
            })?;
    // `/metrics`: HTTPS with the controller's own certificate when it has
    // one (client certificates from the CA required), else loopback.
    let metrics = match config.metrics_listen {
        Some(addr) => Some(
            proto::metrics::MetricsListener::bind(addr, tls.clone())
                .await
                .map_err(|proto::metrics::ServeError::Listen { addr, source }| {
                    StartupError::Listen { addr, source }
                })?,
        ),
        None => None,
    };
    let tracker = TaskTracker::new();
    match &store {
        AnyStore::File(f) => {
            let term = leadership.claim(f).await?;
            tracing::info!(term, "leader (embedded store)");
        }
        AnyStore::Etcd(e) => {
            let election = Election::new((**e).clone(), leadership.clone(), config.lease);
            tracker.spawn(election.run(shutdown.clone()));
        }
    }
    let desired = Desired::new(store, leadership.clone());
    let nodes = watched_nodes(&config, &desired).await;
    let observed = Observed::new(&nodes, config.timing);
    let events = Events::default();
    for n in &nodes {
        tracker.spawn(AgentLink::new(n.clone(), observed.clone()).run(shutdown.clone()));
    }
    // Catalog file and nodes -> store whenever this controller becomes leader.
    tracker.spawn(sync_when_leader(
        desired.clone(),
        config.catalog.clone(),
        config.nodes.clone(),
        leadership.subscribe(),
        shutdown.clone(),
    ));
    // What the gateways report using: the API records it, reconcile
    // unloads idle on-demand models by it.
    let usage = crate::ondemand::Usage::new(proto::units::now_unix_ms());
    // Model copies: asked for through the API, or by reconcile for a
    // replica placed where its file is not yet.
    let copies = crate::copies::Copies::new(
        observed.clone(),
        events.clone(),
        desired.leadership().clone(),
        shutdown.clone(),
    );
    tracker.spawn(
        Reconciler::new(
            desired.clone(),
            observed.clone(),
            events.clone(),
            copies.clone(),
            config.requeue,
        )
        .with_usage(usage.clone())
        .run(shutdown.clone()),
    );
    if let Some(m) = metrics {
        tracing::info!(url = %m.url(&config.id), "metrics serving");
        let (desired, observed) = (desired.clone(), observed.clone());
        tracker.spawn(proto::metrics::serve(
            m,
            move || {
                let (desired, observed) = (desired.clone(), observed.clone());
                async move { crate::metrics::render(&desired, &observed).await }
            },
            shutdown.clone(),
        ));
    }
    let api = ControllerApi::new(desired, observed.clone(), events, copies, shutdown.clone())
        .with_usage(usage);
    let result = serve(
        api,
        listener,
        tls.as_ref(),
        &config.id,
        &observed,
        &tracker,
        &shutdown,
    )
    .await;
    shutdown.cancel();
    tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("services still running after {SHUTDOWN_GRACE:?}; exiting");
    }
    result
}

/// Mutual TLS: the files are read before anything starts (and reloaded
/// while serving: SIGHUP, or a change of their contents); links to agents
/// use the same certificate (https), from their next connect on.
fn load_tls(config: &Config) -> Result<Option<ReloadingTls>, StartupError> {
    let Some(files) = &config.tls else {
        return Ok(None);
    };
    let tls = ReloadingTls::load(files.clone()).map_err(|e| StartupError::Tls(e.to_string()))?;
    crate::observe::set_agent_tls(Some(tls.current().client.clone()));
    Ok(Some(tls))
}

/// The store the config names: the embedded file, or etcd (one key read,
/// so an unreachable or refusing etcd fails here).
async fn open_store(store: &StoreConfig) -> Result<AnyStore, StartupError> {
    Ok(match store {
        StoreConfig::File(p) => AnyStore::File(FileStore::open(p)?),
        StoreConfig::Etcd { endpoints, tls } => AnyStore::Etcd(Box::new(
            EtcdStore::connect_with(endpoints, tls.as_ref()).await?,
        )),
    })
}

/// Nodes: the configured ones, plus any another controller registered
/// (read within 5 s; without TLS only those on loopback).
async fn watched_nodes(config: &Config, desired: &Desired) -> Vec<NodeConfig> {
    let mut nodes = config.nodes.clone();
    match tokio::time::timeout(Duration::from_secs(5), desired.nodes()).await {
        Ok(Ok(stored)) => {
            for r in stored {
                if nodes.iter().any(|n| n.name == r.name) {
                    continue;
                }
                // Without TLS (loopback only), a node another controller
                // registered is dialed only if it is on loopback too.
                if config.tls.is_none()
                    && let Err(e) = proto::transport::check(
                        false,
                        true,
                        config.listen,
                        &[(r.name.as_str(), r.address.as_str())],
                    )
                {
                    tracing::warn!("registered node not dialed: {e}");
                    continue;
                }
                nodes.push(r.into());
            }
        }
        Ok(Err(e)) => tracing::warn!("registered nodes not read: {e}"),
        Err(_) => tracing::warn!("registered nodes not read: the store did not answer in 5 s"),
    }
    nodes
}

/// Writes the catalog file's `entries` and the configured `nodes` to the
/// store each time this controller becomes leader (watching `term`),
/// retrying with back-off while it stays leader, until `token` is
/// cancelled.
async fn sync_when_leader(
    desired: Desired,
    entries: Vec<CatalogEntry>,
    nodes: Vec<NodeConfig>,
    mut term: tokio::sync::watch::Receiver<Option<Term>>,
    token: CancellationToken,
) {
    loop {
        if desired.leadership().term().is_some() {
            let mut delay = Duration::from_millis(100);
            while let Err(e) = async {
                sync_catalog(&desired, &entries).await?;
                desired.register_nodes(&nodes).await
            }
            .await
            {
                tracing::warn!("catalog and node sync: {e}");
                if desired.leadership().term().is_none() {
                    break;
                }
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
        tokio::select! {
            () = token.cancelled() => return,
            r = term.changed() => if r.is_err() { return },
        }
    }
}

/// Serves `api` on `listener` (over `tls` when set) until `shutdown` or a
/// server failure, telling systemd it is ready and feeding its watchdog
/// while `observed` answers.
async fn serve(
    mut api: ControllerApi,
    listener: TcpListener,
    tls: Option<&ReloadingTls>,
    id: &str,
    observed: &Observed,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
) -> Result<(), StartupError> {
    // Deadline, per-connection concurrency and keep-alive shared with the
    // agent; message sizes on the service below.
    let limits = proto::limits::CONTROLLER;
    let mut builder = proto::limits::server(&limits);
    if let Some(tls) = tls {
        api = api.with_access(proto::tls::Access::enforce(crate::api::POLICY));
        tracker.spawn(tls.clone().run(shutdown.clone()));
        tracker.spawn(tls.on_reload(shutdown.clone(), |l| {
            crate::observe::set_agent_tls(Some(l.client.clone()));
        }));
        tracing::info!("mutual TLS on: client certificates required");
    }
    let addr = listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    tracing::info!(%addr, id = %id, "halo-controller serving");
    let router = builder.add_service(
        ControllerServiceServer::new(api)
            .max_decoding_message_size(limits.max_request_bytes)
            .max_encoding_message_size(limits.max_response_bytes),
    );
    // Without TCP_NODELAY a small response waits for the client's delayed
    // ACK: ~40 ms per `haloctl` call instead of ~3 ms.
    let stop = shutdown.clone().cancelled_owned();
    let mut server = match tls {
        // The TLS handshake happens before tonic sees the connection,
        // against the config current at that moment.
        Some(tls) => {
            tokio::spawn(router.serve_with_incoming_shutdown(tls.incoming(listener, true), stop))
        }
        None => tokio::spawn(router.serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            stop,
        )),
    };
    // systemd (Type=notify): ready once serving; the watchdog is fed while
    // the observed state still answers within the period.
    let notify = proto::notify::Notifier::from_env();
    notify.ready(&format!("serving on {addr}"));
    let watchdog = shutdown.child_token();
    let probe = observed.clone();
    tokio::spawn(notify.clone().run_watchdog(watchdog.clone(), move || {
        let probe = probe.clone();
        async move {
            let _ = probe.read().len();
            true
        }
    }));
    let result = match (&mut server).await {
        Ok(r) => r.map_err(|e| StartupError::Serve(e.to_string())),
        Err(e) => Err(StartupError::Serve(e.to_string())),
    };
    notify.stopping("shutting down");
    watchdog.cancel();
    result
}
