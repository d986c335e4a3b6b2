//! Fills the routing table: the controller's `Routes` (placements, modes,
//! replicas, keys), read about once a second from whichever controller
//! answers, overlaid with what every agent's own watch stream says about
//! its instances. The last table is kept when every controller (and etcd)
//! is gone, and the agents' streams keep it current: running models keep
//! answering, and a replica whose node dies stops being picked at once.

use crate::table::{self, Table};
use proto::v1;
use proto::v1::agent_service_client::AgentServiceClient;
use proto::v1::controller_service_client::ControllerServiceClient;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// How long one controller may take to answer before the next is tried.
const CONTROLLER_TIMEOUT: Duration = Duration::from_secs(2);
/// Connect timeout for agents' watch streams.
const AGENT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait between attempts to reach a silent agent.
const AGENT_RETRY_MAX: Duration = Duration::from_secs(2);

/// Where the table comes from.
#[derive(Debug, Clone)]
pub struct FeedConfig {
    /// Controller URLs (`http://host:port` or `https://…`), tried in turn.
    pub controllers: Vec<String>,
    /// Mutual TLS to controllers and agents (a `gateway`, `agent` or
    /// `admin` certificate); `None` = plaintext (loopback clusters).
    pub tls: Option<ClientTlsConfig>,
    /// How often the controller is asked (the bound on how late a revoked
    /// key or a new placement reaches the gateway).
    pub poll: Duration,
    /// Who this gateway is, in the controller's events (a node's name, or
    /// the workstation's).
    pub name: String,
}

impl FeedConfig {
    /// Reads the controllers twice a second.
    pub fn new(controllers: Vec<String>, tls: Option<ClientTlsConfig>) -> FeedConfig {
        FeedConfig {
            controllers,
            tls,
            poll: Duration::from_millis(500),
            name: "gateway".to_owned(),
        }
    }
}

/// What one agent's stream last said about its instances.
#[derive(Debug, Default)]
struct AgentView {
    /// The stream is live now.
    connected: bool,
    /// The stream was live at some point: its silence now means the node
    /// (or its agent) is gone, not that the gateway cannot reach agents.
    ever_connected: bool,
    /// Instances by StartInstance request id.
    instances: HashMap<String, v1::Instance>,
}

#[derive(Debug, Default)]
struct State {
    routes: Option<v1::RoutesResponse>,
    agents: HashMap<String, AgentView>,
    /// The controller last answered (Unix ms).
    controller_at_unix_ms: u64,
}

/// The live feed: a table receiver, plus the state behind it.
#[derive(Debug)]
pub struct Feed {
    state: Mutex<State>,
    changed: Notify,
    table: watch::Sender<Arc<Table>>,
    config: FeedConfig,
    /// Read the routes again soon (at most every [`HURRY_EVERY`]).
    hurry: Arc<Notify>,
}

/// Shortest time between two route reads when hurried.
const HURRY_EVERY: Duration = Duration::from_millis(50);

/// Starts reading the controllers and watching agents until `shutdown`;
/// the receiver sees every new table (empty until something answers).
pub fn spawn(config: FeedConfig, shutdown: CancellationToken) -> watch::Receiver<Arc<Table>> {
    spawn_linked(config, shutdown).0
}

/// [`spawn`], with the controllers' link for on-demand models and usage
/// reports ([`crate::control`]).
pub fn spawn_linked(
    config: FeedConfig,
    shutdown: CancellationToken,
) -> (
    watch::Receiver<Arc<Table>>,
    Arc<crate::control::Controllers>,
) {
    let (tx, rx) = watch::channel(Arc::new(Table::default()));
    let hurry = Arc::new(Notify::new());
    let link = Arc::new(crate::control::Controllers::new(
        config.controllers.clone(),
        config.tls.clone(),
        config.name.clone(),
        hurry.clone(),
    ));
    let feed = Arc::new(Feed {
        state: Mutex::new(State::default()),
        changed: Notify::new(),
        table: tx,
        config,
        hurry,
    });
    tokio::spawn(feed.clone().poll_controllers(shutdown.clone()));
    tokio::spawn(feed.publish_loop(shutdown));
    (rx, link)
}

impl Feed {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn poll_controllers(self: Arc<Self>, shutdown: CancellationToken) {
        let mut clients: Vec<Option<ControllerServiceClient<Channel>>> =
            vec![None; self.config.controllers.len()];
        // Start with the one that last answered.
        let mut first = 0usize;
        let mut watching: HashMap<String, CancellationToken> = HashMap::new();
        let mut warned = false;
        loop {
            let n = self.config.controllers.len();
            let mut answered = false;
            for k in 0..n {
                let i = (first + k) % n;
                let Some(client) = self.controller_client(i, &mut clients[i]) else {
                    continue;
                };
                let mut req = tonic::Request::new(v1::RoutesRequest {});
                req.set_timeout(CONTROLLER_TIMEOUT);
                match tokio::time::timeout(CONTROLLER_TIMEOUT, client.routes(req)).await {
                    Ok(Ok(r)) => {
                        let r = r.into_inner();
                        self.follow_agents(&r, &mut watching, &shutdown);
                        {
                            let mut s = self.state();
                            s.controller_at_unix_ms = proto::units::now_unix_ms();
                            s.routes = Some(r);
                        }
                        self.changed.notify_one();
                        first = i;
                        answered = true;
                        if warned {
                            tracing::info!(controller = %self.config.controllers[i], "controller answers again");
                            warned = false;
                        }
                        break;
                    }
                    Ok(Err(s)) => {
                        if s.code() == tonic::Code::PermissionDenied
                            || s.code() == tonic::Code::Unimplemented
                        {
                            tracing::error!(controller = %self.config.controllers[i], "Routes refused: {}", s.message());
                        }
                        clients[i] = None;
                    }
                    Err(_) => clients[i] = None,
                }
            }
            if !answered && !warned && n > 0 {
                tracing::warn!(
                    controllers = ?self.config.controllers,
                    "no controller answers; routing by the last table and the agents' streams"
                );
                warned = true;
            }
            let read_at = tokio::time::Instant::now();
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(self.config.poll) => {}
                () = self.hurry.notified() => {
                    tokio::time::sleep_until(read_at + HURRY_EVERY).await;
                }
            }
        }
    }

    /// The client for controller `i`, dialled lazily (a dead controller
    /// fails the call, not this).
    fn controller_client<'a>(
        &self,
        i: usize,
        slot: &'a mut Option<ControllerServiceClient<Channel>>,
    ) -> Option<&'a mut ControllerServiceClient<Channel>> {
        if slot.is_none() {
            let url = &self.config.controllers[i];
            match crate::control::dial(url, self.config.tls.as_ref(), CONTROLLER_TIMEOUT) {
                Ok(c) => *slot = Some(c),
                Err(e) => {
                    tracing::error!(controller = %url, "bad controller address: {e}");
                    return None;
                }
            }
        }
        slot.as_mut()
    }

    /// Starts a watch on every agent the controller names, and ends those
    /// of agents it no longer names.
    fn follow_agents(
        self: &Arc<Self>,
        r: &v1::RoutesResponse,
        watching: &mut HashMap<String, CancellationToken>,
        shutdown: &CancellationToken,
    ) {
        let mut wanted: Vec<&str> = r
            .nodes
            .iter()
            .map(|n| n.agent_address.as_str())
            .chain(
                r.routes
                    .iter()
                    .flat_map(|p| p.replicas.iter().map(|x| x.agent_address.as_str())),
            )
            .filter(|a| !a.is_empty())
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        watching.retain(|addr, token| {
            let keep = wanted.contains(&addr.as_str());
            if !keep {
                token.cancel();
                self.state().agents.remove(addr);
            }
            keep
        });
        for addr in wanted {
            if !watching.contains_key(addr) {
                let token = shutdown.child_token();
                watching.insert(addr.to_owned(), token.clone());
                tokio::spawn(self.clone().watch_agent(addr.to_owned(), token));
            }
        }
    }

    async fn watch_agent(self: Arc<Self>, addr: String, token: CancellationToken) {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.agent_stream(&addr).await {
                Ok(mut stream) => {
                    delay = Duration::from_millis(100);
                    loop {
                        let next = tokio::select! {
                            () = token.cancelled() => return,
                            m = stream.message() => m,
                        };
                        match next {
                            Ok(Some(ev)) => self.on_agent_event(&addr, ev),
                            Ok(None) | Err(_) => break,
                        }
                    }
                    if let Some(v) = self.state().agents.get_mut(&addr) {
                        v.connected = false;
                    }
                    tracing::warn!(agent = %addr, "agent's watch stream ended; its replicas are not routed to until it returns");
                    self.changed.notify_one();
                }
                Err(e) => tracing::debug!(agent = %addr, "cannot watch agent: {e}"),
            }
            tokio::select! {
                () = token.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(AGENT_RETRY_MAX);
        }
    }

    async fn agent_stream(&self, addr: &str) -> Result<tonic::Streaming<v1::AgentEvent>, String> {
        let ep = match &self.config.tls {
            None => Endpoint::from_shared(format!("http://{addr}")),
            Some(c) => Endpoint::from_shared(format!("https://{addr}"))
                .and_then(|e| e.tls_config(c.clone())),
        }
        .map_err(|e| proto::error_chain(&e))?
        .connect_timeout(AGENT_CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(5));
        let ch = tokio::time::timeout(AGENT_CONNECT_TIMEOUT, ep.connect())
            .await
            .map_err(|_| "timed out connecting".to_owned())?
            .map_err(|e| proto::error_chain(&e))?;
        let mut client = AgentServiceClient::new(ch)
            .max_decoding_message_size(proto::limits::AGENT.max_response_bytes);
        // Memory samples are not needed: ask for them rarely.
        let s = client
            .watch(v1::WatchRequest {
                memory_period_ms: 3_600_000,
            })
            .await
            .map_err(|s| s.message().to_owned())?;
        Ok(s.into_inner())
    }

    fn on_agent_event(&self, addr: &str, ev: v1::AgentEvent) {
        let mut changed = false;
        {
            let mut s = self.state();
            let view = s.agents.entry(addr.to_owned()).or_default();
            if !view.connected {
                view.connected = true;
                view.ever_connected = true;
                changed = true;
            }
            match ev.event {
                Some(v1::agent_event::Event::Snapshot(snap)) => {
                    view.instances = snap
                        .instances
                        .into_iter()
                        .filter(|i| !i.request_id.is_empty())
                        .map(|i| (i.request_id.clone(), i))
                        .collect();
                    changed = true;
                }
                Some(v1::agent_event::Event::Instance(i)) if !i.request_id.is_empty() => {
                    view.instances.insert(i.request_id.clone(), i);
                    changed = true;
                }
                _ => {}
            }
        }
        if changed {
            self.changed.notify_one();
        }
    }

    async fn publish_loop(self: Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = self.changed.notified() => {}
            }
            let t = Arc::new(self.compose());
            self.table.send_if_modified(|cur| {
                if **cur == *t {
                    false
                } else {
                    *cur = t;
                    true
                }
            });
        }
    }

    /// The controller's table with each replica's readiness, address and
    /// key taken from its agent's stream where that stream has spoken.
    fn compose(&self) -> Table {
        let s = self.state();
        let Some(r) = &s.routes else {
            return Table::default();
        };
        let mut t = table::from_routes(r);
        t.controller_at_unix_ms = s.controller_at_unix_ms;
        for route in &mut t.routes {
            for x in &mut route.replicas {
                let Some(view) = s.agents.get(&x.agent_address) else {
                    continue;
                };
                overlay(x, view);
            }
        }
        t
    }
}

/// Where the agent's stream knows better than the controller's last read.
fn overlay(x: &mut table::Replica, view: &AgentView) {
    if !view.connected {
        if view.ever_connected {
            x.ready = false;
            x.state = "unreachable".into();
        }
        return;
    }
    match view.instances.get(&x.request_id) {
        Some(i) => {
            x.instance_id.clone_from(&i.id);
            x.base_url.clone_from(&i.endpoint);
            x.api_key.clone_from(&i.api_key);
            x.ready = i.state() == v1::InstanceState::Ready;
            x.state = table::state_word(i.state()).to_owned();
        }
        None if !x.request_id.is_empty() => {
            // The agent runs nothing for this replica (yet, or any more).
            x.ready = false;
            x.state = "not started".into();
        }
        None => {}
    }
}
