//! The daemon: locks the state directory, binds the gRPC listener (after the
//! config was validated in full), re-adopts instances, and serves
//! `AgentService`, `grpc.health.v1.Health` and server reflection until the
//! root token is cancelled; then drains within a bounded grace period.
//! Instances keep running across an agent shutdown. Under systemd it reports
//! readiness, stopping and watchdog keep-alives ([`proto::notify`]).

use crate::config::Config;
use crate::service::AgentApi;
use crate::state::{StateError, StateStore};
use crate::supervisor::Supervisor;
use proto::config::{EXIT_CONFIG, EXIT_UNAVAILABLE};
use proto::domain::NodeIdentity;
use proto::tls_reload::ReloadingTls;
use proto::v1::agent_service_server::AgentServiceServer;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

/// How long in-flight RPCs and instance tasks get after shutdown begins.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the daemon could not start. Each displays as one line.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The state directory is locked, unreadable or corrupt.
    #[error(transparent)]
    State(#[from] StateError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The configured address.
        addr: SocketAddr,
        /// Why (address in use, not local…).
        source: std::io::Error,
    },
    /// The instance supervisor could not start.
    #[error(transparent)]
    Supervisor(#[from] crate::error::Error),
    /// The reflection service could not be built.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Serve(String),
    /// The TLS files could not be used.
    #[error("tls: {0}")]
    Tls(String),
}

impl StartupError {
    /// The process exit code: 64 (EX_USAGE) for a state directory another
    /// agent holds (a config clash), 69 (EX_UNAVAILABLE) when the listen
    /// address cannot be bound, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartupError::State(StateError::Locked { .. }) => EXIT_CONFIG,
            StartupError::Listen { .. } => EXIT_UNAVAILABLE,
            _ => 1,
        }
    }
}

/// A daemon with its state locked and its listener bound.
#[derive(Debug)]
pub struct Daemon {
    listener: TcpListener,
    supervisor: Supervisor,
    shutdown: CancellationToken,
    tls: Option<ReloadingTls>,
    gateway: Option<GatewayRun>,
    metrics: Option<proto::metrics::MetricsListener>,
}

/// The gateway an agent serves: bound before anything else starts, so a
/// port in use fails the start.
struct GatewayRun {
    listener: TcpListener,
    https: Option<tokio_rustls::TlsAcceptor>,
    controllers: Vec<String>,
    /// Mutual TLS to controllers and agents (the agent's own certificate).
    client_tls: Option<tonic::transport::ClientTlsConfig>,
}

impl std::fmt::Debug for GatewayRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayRun")
            .field("listener", &self.listener)
            .field("https", &self.https.is_some())
            .field("controllers", &self.controllers)
            .finish_non_exhaustive()
    }
}

impl Daemon {
    /// Locks the state directory, reads it, and binds the listen address.
    pub async fn bind(config: Config, shutdown: CancellationToken) -> Result<Daemon, StartupError> {
        let store = StateStore::open(&config.state_dir)?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| StartupError::Listen {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener
            .local_addr()
            .map_err(|source| StartupError::Listen {
                addr: config.listen,
                source,
            })?;
        // Which llama.cpp build runs here (a split needs the same on every
        // node); a failure leaves the fields empty, with a warning.
        let build = crate::llamabuild::probe(&config).await;
        // Mutual TLS: the files are read (and checked) before serving, and
        // reloaded while serving (SIGHUP, or a change of their contents).
        let tls = config
            .tls
            .clone()
            .map(ReloadingTls::load)
            .transpose()
            .map_err(|e| StartupError::Tls(e.to_string()))?;
        tracing::info!(
            llama_version = %build.version,
            gpu_devices = ?build.gpu_devices,
            rpc_server_available = build.rpc_server_available,
            "llama.cpp build"
        );
        // `/metrics`: HTTPS with the agent's own certificate when it has
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
        let node = NodeIdentity {
            name: config.node_name.clone(),
            roles: config.roles.clone(),
            labels: config.labels.clone(),
            agent_address: addr.to_string(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            llama_version: build.version,
            rpc_server_available: build.rpc_server_available,
            gpu_devices: build.gpu_devices,
            tls_cert_not_after_unix: tls.as_ref().map(|t| t.current().not_after_unix),
            gateway_url: config
                .gateway
                .as_ref()
                .map(crate::config::GatewayConfig::url)
                .unwrap_or_default(),
            metrics_url: metrics
                .as_ref()
                .map(|m| m.url(&config.node_name))
                .unwrap_or_default(),
        };
        let gateway = match &config.gateway {
            Some(g) => Some(bind_gateway(g, config.tls.as_ref()).await?),
            None => None,
        };
        let supervisor = Supervisor::new(Arc::new(config), store, node, shutdown.clone())?;
        Ok(Daemon {
            listener,
            supervisor,
            shutdown,
            tls,
            gateway,
            metrics,
        })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Re-adopts instances, then serves until the token is cancelled.
    pub async fn run(self) -> Result<(), StartupError> {
        let Daemon {
            listener,
            supervisor,
            shutdown,
            tls,
            gateway,
            metrics,
        } = self;
        supervisor.boot().await?;
        if let Some(m) = metrics {
            let url = m.url(&supervisor.node().name);
            let s = supervisor.clone();
            tokio::spawn(proto::metrics::serve(
                m,
                move || {
                    let s = s.clone();
                    async move { crate::metrics::render(&s).await }
                },
                shutdown.child_token(),
            ));
            tracing::info!(%url, "metrics serving");
        }
        if let Some(g) = gateway {
            let mut feed = gateway::feed::FeedConfig::new(g.controllers, g.client_tls);
            feed.name = supervisor.node().name;
            let (table, link) = gateway::feed::spawn_linked(feed, shutdown.child_token());
            let addr = g.listener.local_addr().ok();
            let gw =
                gateway::server::Gateway::new(gateway::config::GatewayConfig::default(), table);
            gw.set_controller(link);
            tokio::spawn(gw.serve(g.listener, g.https, shutdown.child_token()));
            tracing::info!(addr = ?addr, "gateway serving");
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<AgentServiceServer<AgentApi>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| StartupError::Reflection(e.to_string()))?;
        let mut api = AgentApi::new(supervisor.clone(), shutdown.clone());
        let addr = listener
            .local_addr()
            .map_or_else(|e| e.to_string(), |a| a.to_string());
        // Deadline, per-connection concurrency and keep-alive shared with
        // the controller; message sizes per service below.
        let limits = proto::limits::AGENT;
        let mut builder = proto::limits::server(&limits);
        if let Some(tls) = &tls {
            api = with_tls(api, tls, &supervisor, &shutdown);
        }
        let router = builder
            .add_service(
                health_service
                    .max_decoding_message_size(limits.max_request_bytes)
                    .max_encoding_message_size(limits.max_response_bytes),
            )
            .add_service(
                reflection
                    .max_decoding_message_size(limits.max_request_bytes)
                    .max_encoding_message_size(limits.max_response_bytes),
            )
            .add_service(
                AgentServiceServer::new(api)
                    .max_decoding_message_size(limits.max_request_bytes)
                    .max_encoding_message_size(limits.max_response_bytes),
            );
        let stop = shutdown.clone().cancelled_owned();
        let mut server = match &tls {
            // The TLS handshake happens before tonic sees the connection,
            // against the config current at that moment (tonic still gets
            // the client's certificates for the role checks).
            Some(tls) => tokio::spawn(
                router.serve_with_incoming_shutdown(tls.incoming(listener, false), stop),
            ),
            None => tokio::spawn(
                router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop),
            ),
        };
        tracing::info!(%addr, "halo-agent serving");
        let notify = proto::notify::Notifier::from_env();
        notify.ready(&format!("serving on {addr}"));
        let watchdog = feed_watchdog(&notify, &supervisor, &shutdown);
        let result = tokio::select! {
            r = &mut server => {
                // The server ended on its own (or first, on shutdown): take
                // everything down.
                notify.stopping("shutting down; instances keep running");
                shutdown.cancel();
                match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(StartupError::Serve(e.to_string())),
                    Err(e) => Err(StartupError::Serve(e.to_string())),
                }
            }
            () = shutdown.cancelled() => {
                tracing::info!("shutting down");
                notify.stopping("shutting down; instances keep running");
                health.set_not_serving::<AgentServiceServer<AgentApi>>().await;
                if tokio::time::timeout(SHUTDOWN_GRACE, &mut server).await.is_err() {
                    tracing::warn!("RPCs still open after {SHUTDOWN_GRACE:?}; closing them");
                    server.abort();
                }
                Ok(())
            }
        };
        watchdog.cancel();
        supervisor.shutdown(SHUTDOWN_GRACE).await;
        tracing::info!("stopped; instances keep running");
        result
    }
}

/// Mutual TLS on `api`: every caller shows a certificate from the CA (the
/// handshake in `incoming`), and AgentService checks its role per method.
/// The files are reloaded while serving, and GetNode reports the
/// certificate's expiry as it is now.
fn with_tls(
    api: AgentApi,
    tls: &ReloadingTls,
    supervisor: &Supervisor,
    shutdown: &CancellationToken,
) -> AgentApi {
    let api = api.with_access(proto::tls::Access::enforce(crate::service::POLICY));
    tokio::spawn(tls.clone().run(shutdown.child_token()));
    let node = supervisor.clone();
    tokio::spawn(tls.on_reload(shutdown.child_token(), move |l| {
        node.set_tls_cert_not_after(Some(l.not_after_unix));
    }));
    tracing::info!("mutual TLS on: client certificates required");
    api
}

/// Feeds systemd's watchdog while the supervisor answers within the period
/// (state lock, blocking pool and runtime all alive), until the returned
/// token (a child of `shutdown`) is cancelled.
fn feed_watchdog(
    notify: &proto::notify::Notifier,
    supervisor: &Supervisor,
    shutdown: &CancellationToken,
) -> CancellationToken {
    let watchdog = shutdown.child_token();
    let probe = supervisor.clone();
    tokio::spawn(notify.clone().run_watchdog(watchdog.clone(), move || {
        let probe = probe.clone();
        async move {
            let _ = probe.instances().await;
            true
        }
    }));
    watchdog
}

/// Binds the gateway's address and reads its HTTPS certificate.
async fn bind_gateway(
    g: &crate::config::GatewayConfig,
    tls: Option<&proto::tls::TlsFiles>,
) -> Result<GatewayRun, StartupError> {
    let listener = TcpListener::bind(g.listen)
        .await
        .map_err(|source| StartupError::Listen {
            addr: g.listen,
            source,
        })?;
    let https = match &g.https {
        Some((cert, key)) => Some(
            gateway::server::tls_acceptor(cert, key)
                .map_err(|e| StartupError::Tls(format!("gateway: {e}")))?,
        ),
        None => None,
    };
    let client_tls = tls
        .map(proto::tls::TlsFiles::client_config)
        .transpose()
        .map_err(|e| StartupError::Tls(e.to_string()))?;
    Ok(GatewayRun {
        listener,
        https,
        controllers: g.controllers.clone(),
        client_tls,
    })
}
