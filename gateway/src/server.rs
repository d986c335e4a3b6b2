//! The gateway's HTTP server. A request's way through it reads top to
//! bottom in [`Gateway::infer`]: authenticate → per-key cap → bounded body
//! → parse what routing needs → resolve the name (scope) → pick a ready
//! replica ([`crate::balance`]) → send ([`crate::proxy`]), retrying what
//! never reached the client → or wait in the model's queue for the table
//! to change. Connections are counted and timed here too: a header
//! deadline from the first byte of each request (from the accept for a new
//! connection), an idle deadline between requests, and a cap that closes
//! the longest-idle connection to make room.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::value::RawValue;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::listen::{check_plain_listen, tls_acceptor};

use crate::balance::{Balancer, InFlight, conversation_hash};
use crate::config::GatewayConfig;
use crate::metrics::Metrics;
use crate::proxy::{
    BoxError, Failure, Finish, Tracked, Upstream, UsageFrom, client_headers, upstream_headers,
};
use crate::table::{KeyError, RouteError, Table, Target, UserKey};

/// Paths that go to a replica.
const INFERENCE: [&str; 5] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/infill",
    "/completion",
];
/// How long a request for a catalog model with no placement waits (for an
/// unplace-then-place to finish) before a 503.
const UNPLACED_WAIT: Duration = Duration::from_secs(15);
/// Longest wait for a fresh table when a key is not (yet) known.
const KEY_REFRESH_WAIT: Duration = Duration::from_secs(2);
/// How often a request waiting for an on-demand model looks again (asks
/// the controller again when due, hurries the routes).
const ON_DEMAND_POLL: Duration = Duration::from_millis(100);
/// How often a request waiting for a full replica looks again, besides
/// being woken when a request ends.
const FULL_POLL: Duration = Duration::from_millis(250);
/// How often a waiting stream hears that it is still waiting.
const KEEPALIVE_EVERY: Duration = Duration::from_secs(5);
/// After every ready replica failed for a request, how long before they
/// are tried again (unless the table changes first).
const RETRY_PAUSE: Duration = Duration::from_secs(1);
/// How much of a completion prompt makes its conversation's prefix.
const PREFIX_BYTES: usize = 2048;
/// How long in-flight requests get to finish at shutdown.
const DRAIN: Duration = Duration::from_secs(10);

/// The gateway: routes OpenAI-style requests to ready replicas.
pub struct Gateway {
    config: GatewayConfig,
    table: watch::Receiver<Arc<Table>>,
    upstream: Upstream,
    balancer: Arc<Balancer>,
    metrics: Arc<Metrics>,
    keys_in_flight: Arc<Mutex<HashMap<String, usize>>>,
    queues: Arc<Mutex<HashMap<String, usize>>>,
    conns: Mutex<BTreeMap<u64, Arc<ConnState>>>,
    next_conn: AtomicU64,
    conn_gone: Notify,
    epoch: Instant,
    /// On-demand models: demands and use reports.
    ondemand: Arc<crate::demand::OnDemand>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("config", &self.config)
            .field("routes", &self.table.borrow().routes.len())
            .finish_non_exhaustive()
    }
}

/// One connection's timing state, shared by its reads, its requests and
/// its watchdog.
#[derive(Debug)]
struct ConnState {
    id: u64,
    epoch: Instant,
    /// Requests started and not yet answered to the end.
    requests: AtomicUsize,
    /// When `requests` last fell to zero (or the accept), ms since epoch.
    idle_since: AtomicU64,
    /// When the first byte of the next request's head came; `u64::MAX`:
    /// none yet.
    head_since: AtomicU64,
    /// No request yet: the header deadline runs from the accept.
    fresh: AtomicBool,
    /// Closed to make room.
    evicted: AtomicBool,
    wake: Notify,
}

impl ConnState {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// When the connection is to be closed unless something changes
    /// (ms since epoch); `None` while a request runs.
    fn deadline(&self, c: &GatewayConfig) -> Option<u64> {
        if self.requests.load(Ordering::Acquire) > 0 {
            return None;
        }
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        let head = self.head_since.load(Ordering::Acquire);
        Some(if head != u64::MAX {
            head.saturating_add(ms(c.header_timeout))
        } else if self.fresh.load(Ordering::Acquire) {
            self.idle_since
                .load(Ordering::Acquire)
                .saturating_add(ms(c.header_timeout))
        } else {
            self.idle_since
                .load(Ordering::Acquire)
                .saturating_add(ms(c.idle_timeout))
        })
    }
}

/// A request counted on its connection until its response ends.
#[derive(Debug)]
struct ConnRequest(Arc<ConnState>);

impl ConnRequest {
    fn new(st: &Arc<ConnState>) -> ConnRequest {
        st.requests.fetch_add(1, Ordering::AcqRel);
        st.fresh.store(false, Ordering::Release);
        st.head_since.store(u64::MAX, Ordering::Release);
        ConnRequest(st.clone())
    }
}

impl Drop for ConnRequest {
    fn drop(&mut self) {
        self.0.idle_since.store(self.0.now(), Ordering::Release);
        self.0.requests.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A request counted against its key's in-flight cap.
#[derive(Debug)]
struct KeySlot {
    map: Arc<Mutex<HashMap<String, usize>>>,
    key: String,
}

impl Drop for KeySlot {
    fn drop(&mut self) {
        let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.key);
            }
        }
    }
}

/// A request counted in its model's queue.
#[derive(Debug)]
struct QueueSlot {
    map: Arc<Mutex<HashMap<String, usize>>>,
    metrics: Arc<Metrics>,
    model: String,
    since: Instant,
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        {
            let mut m = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(&self.model) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&self.model);
                }
            }
        }
        self.metrics.queue_depth(&self.model, -1);
        self.metrics.queue_wait(&self.model, self.since.elapsed());
    }
}

/// An answer in OpenAI's error shape.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    code: &'static str,
    message: String,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, code: &'static str, message: String) -> Self {
        ApiError {
            status,
            kind,
            code,
            message,
            retry_after: None,
        }
    }

    fn retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    fn json(&self) -> String {
        serde_json::json!({
            "error": {"message": self.message, "type": self.kind, "code": self.code}
        })
        .to_string()
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        let code = match e {
            KeyError::Missing => "missing_api_key",
            KeyError::Invalid => "invalid_api_key",
            KeyError::Expired(_) => "expired_api_key",
        };
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            code,
            e.to_string(),
        )
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let (status, kind, code) = match e {
            RouteError::Unknown { .. } => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
            ),
            RouteError::BadName(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_model",
            ),
            RouteError::Forbidden { .. } => (
                StatusCode::FORBIDDEN,
                "permission_error",
                "model_not_allowed",
            ),
        };
        ApiError::new(status, kind, code, e.to_string())
    }
}

/// Why a dispatch ended without a replica's answer.
#[derive(Debug)]
enum Stop {
    /// Waiting is needed and the caller asked not to wait.
    MustWait,
    /// The client went away.
    Gone,
    /// An answer to send instead.
    Error(ApiError),
}

/// How a dispatch waits when no replica is ready.
#[derive(Clone, Copy)]
enum Wait<'a> {
    /// Return [`Stop::MustWait`].
    No,
    /// Wait quietly.
    Quiet,
    /// Wait, telling an SSE stream every few seconds.
    Sse(&'a mpsc::Sender<Result<Frame<Bytes>, BoxError>>),
}

/// What a request asks, as far as routing cares. Everything else in the
/// body passes through untouched.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    model: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(borrow, default)]
    messages: Option<Vec<Message<'a>>>,
    #[serde(borrow, default)]
    prompt: Option<&'a RawValue>,
    #[serde(borrow, default)]
    input_prefix: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Message<'a> {
    #[serde(borrow, default)]
    role: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    content: Option<&'a RawValue>,
}

impl Fields<'_> {
    /// A hash of the conversation's stable prefix: the first system and
    /// first user message of a chat, or the start of a prompt.
    fn conversation(&self) -> Option<u64> {
        if let Some(msgs) = &self.messages {
            let first = |role: &str| {
                msgs.iter()
                    .find(|m| m.role.as_deref() == Some(role))
                    .and_then(|m| m.content)
                    .map_or(&b""[..], |c| c.get().as_bytes())
            };
            let (sys, user) = (first("system"), first("user"));
            if sys.is_empty() && user.is_empty() {
                return None;
            }
            return Some(conversation_hash(&[b"chat", sys, user]));
        }
        let p = self.input_prefix.or(self.prompt)?.get().as_bytes();
        let p = &p[..p.len().min(PREFIX_BYTES)];
        Some(conversation_hash(&[b"prompt", p]))
    }
}

/// One request on its way to a replica.
struct Job {
    method: Method,
    path_and_query: String,
    headers: HeaderMap,
    body: Bytes,
    asked: String,
    key: UserKey,
    model: String,
    conv: Option<u64>,
}

impl Gateway {
    /// A gateway routing by `table` (swapped whole by whoever feeds it).
    pub fn new(config: GatewayConfig, table: watch::Receiver<Arc<Table>>) -> Arc<Gateway> {
        let upstream = Upstream::new();
        let balancer = Balancer::new(upstream.clone(), table.clone());
        Arc::new(Gateway {
            config,
            table,
            upstream,
            balancer,
            metrics: Arc::new(Metrics::default()),
            keys_in_flight: Arc::default(),
            queues: Arc::default(),
            conns: Mutex::new(BTreeMap::new()),
            next_conn: AtomicU64::new(0),
            conn_gone: Notify::new(),
            epoch: Instant::now(),
            ondemand: Arc::default(),
        })
    }

    /// Links the controllers: on-demand models are asked for, and what
    /// requests use is reported (every few seconds) so idle ones unload.
    /// Without a link, a request for an unplaced model only waits.
    pub fn set_controller(&self, link: Arc<dyn crate::control::ControllerLink>) {
        self.ondemand.set_link(link);
    }

    /// The gateway's metrics (also served at `/metrics`).
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Serves until `shutdown`; HTTPS when `tls` is given.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        shutdown: CancellationToken,
    ) {
        let tracker = TaskTracker::new();
        loop {
            if !self.make_room() {
                tokio::select! {
                    _ = self.conn_gone.notified() => continue,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    _ = shutdown.cancelled() => break,
                }
            }
            let accepted = tokio::select! {
                r = listener.accept() => r,
                _ = shutdown.cancelled() => break,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors and the like: wait, do not spin.
                    tracing::warn!("gateway accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let st = self.register();
            let me = self.clone();
            let tls = tls.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                match tls {
                    None => me.connection(stream, st.clone(), shutdown).await,
                    Some(acceptor) => {
                        let hs =
                            tokio::time::timeout(me.config.header_timeout, acceptor.accept(stream))
                                .await;
                        match hs {
                            Ok(Ok(s)) => me.connection(s, st.clone(), shutdown).await,
                            Ok(Err(e)) => tracing::debug!("gateway TLS handshake: {e}"),
                            Err(_) => tracing::debug!("gateway TLS handshake timed out"),
                        }
                    }
                }
                me.unregister(&st);
            });
        }
        tracker.close();
        let _ = tokio::time::timeout(DRAIN, tracker.wait()).await;
    }

    fn register(&self) -> Arc<ConnState> {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let st = Arc::new(ConnState {
            id,
            epoch: self.epoch,
            requests: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(u64::MAX),
            fresh: AtomicBool::new(true),
            evicted: AtomicBool::new(false),
            wake: Notify::new(),
        });
        st.idle_since.store(st.now(), Ordering::Release);
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, st.clone());
        st
    }

    fn unregister(&self, st: &ConnState) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&st.id);
        self.conn_gone.notify_one();
    }

    /// Whether another connection may be accepted; at the cap, closes the
    /// oldest connection with no request running (idle keep-alives and
    /// sockets that never sent a request go first).
    fn make_room(&self) -> bool {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let live = conns
            .values()
            .filter(|c| !c.evicted.load(Ordering::Acquire))
            .count();
        if live < self.config.max_connections {
            return true;
        }
        let idle = conns.values().find(|c| {
            !c.evicted.load(Ordering::Acquire) && c.requests.load(Ordering::Acquire) == 0
        });
        match idle {
            Some(c) => {
                c.evicted.store(true, Ordering::Release);
                c.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// Serves one connection until it ends, times out or is evicted.
    async fn connection<IO>(
        self: &Arc<Self>,
        io: IO,
        st: Arc<ConnState>,
        shutdown: CancellationToken,
    ) where
        IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let me = self.clone();
        let st2 = st.clone();
        let svc = service_fn(move |req| {
            let me = me.clone();
            let guard = ConnRequest::new(&st2);
            async move { Ok::<_, Infallible>(me.handle(req, guard).await) }
        });
        let io = Watched {
            inner: io,
            st: st.clone(),
        };
        let conn = http1::Builder::new()
            .keep_alive(true)
            .half_close(false)
            .serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let mut draining = false;
        loop {
            if st.evicted.load(Ordering::Acquire) {
                break;
            }
            let now = st.now();
            let sleep_ms = match st.deadline(&self.config) {
                Some(d) if d <= now => break,
                Some(d) => d - now,
                None => u64::try_from(self.config.idle_timeout.as_millis()).unwrap_or(u64::MAX),
            };
            tokio::select! {
                r = conn.as_mut() => {
                    if let Err(e) = r {
                        tracing::debug!("gateway connection: {e}");
                    }
                    return;
                }
                _ = st.wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(sleep_ms)) => {}
                _ = shutdown.cancelled(), if !draining => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }

    /// Answers one request.
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        conn: ConnRequest,
    ) -> Response<Tracked> {
        let mut fin = Finish::new(
            self.metrics.clone(),
            Instant::now(),
            req.method().clone(),
            req.uri().path(),
        );
        fin.guards.push(Box::new(conn));
        let path = req.uri().path();
        let method = req.method();
        if INFERENCE.contains(&path) {
            if method != Method::POST {
                return self.error(fin, method_not_allowed("POST"));
            }
            return self.infer(req, fin).await;
        }
        match (path, method) {
            ("/health", &Method::GET) => {
                let t = self.table.borrow().clone();
                let ready = t.routes.iter().filter(|r| r.replicas.iter().any(|x| x.ready)).count();
                let body = serde_json::json!({"status": "ok", "routes": t.routes.len(), "ready_routes": ready});
                json(fin, StatusCode::OK, body.to_string())
            }
            ("/metrics", &Method::GET) => {
                fin.status = 200;
                let mut r = Response::new(Tracked::full(self.metrics.render(), fin));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                r
            }
            ("/v1/models", &Method::GET) => self.models(&req, fin).await,
            ("/health" | "/metrics" | "/v1/models", _) => self.error(fin, method_not_allowed("GET")),
            _ => self.error(
                fin,
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    "not_found",
                    format!(
                        "no route {path}; the gateway serves POST {} and GET /v1/models, /health, /metrics",
                        INFERENCE.join(", ")
                    ),
                ),
            ),
        }
    }

    fn error(&self, mut fin: Finish, e: ApiError) -> Response<Tracked> {
        fin.status = e.status.as_u16();
        let mut r = Response::new(Tracked::full(e.json(), fin));
        *r.status_mut() = e.status;
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(s) = e.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }

    /// The caller's key, from the current table; a key the table does not
    /// know yet is looked up once more in the next table read after the
    /// request arrived (a key made a moment ago works at once), waiting at
    /// most [`KEY_REFRESH_WAIT`].
    async fn authenticate_fresh(
        &self,
        headers: &HeaderMap,
    ) -> (Arc<Table>, Result<UserKey, ApiError>) {
        let table = self.table.borrow().clone();
        let first = self.authenticate(&table, headers);
        // A key made a moment ago (or any key, while the first table is
        // still on its way) may be in the controller's next answer.
        let unknown = matches!(&first, Err(e) if e.code == "invalid_api_key");
        if !unknown {
            return (table, first);
        }
        let asked_at = proto::units::now_unix_ms();
        let mut rx = self.table.clone();
        let fresh = tokio::time::timeout(KEY_REFRESH_WAIT, async {
            loop {
                if rx.changed().await.is_err() {
                    return None;
                }
                let t = rx.borrow_and_update().clone();
                if t.controller_at_unix_ms >= asked_at {
                    return Some(t);
                }
            }
        })
        .await
        .ok()
        .flatten();
        match fresh {
            Some(t) => {
                let r = self.authenticate(&t, headers);
                (t, r)
            }
            None => (table, first),
        }
    }

    fn authenticate(&self, table: &Table, headers: &HeaderMap) -> Result<UserKey, ApiError> {
        let secret = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        Ok(table
            .authenticate(secret, proto::units::now_unix_ms())?
            .clone())
    }

    /// `GET /v1/models`: placements, catalog names and modes the key may
    /// use, with their state.
    async fn models(&self, req: &Request<Incoming>, mut fin: Finish) -> Response<Tracked> {
        let (table, key) = self.authenticate_fresh(req.headers()).await;
        let key = match key {
            Ok(k) => k,
            Err(e) => return self.error(fin, e),
        };
        fin.key = key.name.clone();
        let data: Vec<serde_json::Value> = table
            .names()
            .into_iter()
            .filter_map(|name| {
                let t = table.resolve(&name, Some(&key)).ok()?;
                let kind = if t.mode.is_some() {
                    "mode"
                } else if t.routes.iter().any(|r| r.placement == name) {
                    "placement"
                } else {
                    "model"
                };
                let ready = t.ready().count();
                let state = if ready > 0 { "ready".to_owned() } else { t.states() };
                Some(serde_json::json!({
                    "id": name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "halo",
                    "halo": {
                        "kind": kind,
                        "state": state,
                        "ready_replicas": ready,
                        "placements": t.routes.iter().map(|r| r.placement.as_str()).filter(|p| !p.is_empty()).collect::<Vec<_>>(),
                    }
                }))
            })
            .collect();
        json(
            fin,
            StatusCode::OK,
            serde_json::json!({"object": "list", "data": data}).to_string(),
        )
    }

    /// An inference request: see the module's header for the steps.
    async fn infer(self: Arc<Self>, req: Request<Incoming>, mut fin: Finish) -> Response<Tracked> {
        let (table, key) = self.authenticate_fresh(req.headers()).await;
        let key = match key {
            Ok(k) => k,
            Err(e) => return self.error(fin, e),
        };
        fin.key = key.name.clone();
        match self.key_slot(&key.name) {
            Some(slot) => fin.guards.push(Box::new(slot)),
            None => {
                let e = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limit_error",
                    "too_many_requests",
                    format!(
                        "key {:?} has {} requests in flight, the most it may have",
                        key.name, self.config.max_in_flight_per_key
                    ),
                )
                .retry_after(1);
                return self.error(fin, e);
            }
        }
        let (parts, body) = req.into_parts();
        let body = match self.read_body(&parts.headers, body).await {
            Ok(b) => b,
            Err(e) => return self.error(fin, e),
        };
        let fields: Fields<'_> = match serde_json::from_slice(&body) {
            Ok(f) => f,
            Err(e) => {
                let e = ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    "invalid_json",
                    format!("the request body is not a JSON object as the API expects: {e}"),
                );
                return self.error(fin, e);
            }
        };
        let asked = fields.model.as_deref().unwrap_or("").to_owned();
        let target: Target<'_> = match table.resolve(&asked, Some(&key)) {
            Ok(t) => t,
            Err(e) => return self.error(fin, e.into()),
        };
        fin.model = target
            .routes
            .first()
            .map_or_else(String::new, |r| r.model.clone());
        if !fin.model.is_empty() {
            fin.guards
                .push(Box::new(self.ondemand.use_slot(&fin.model)));
        }
        fin.mode = target.mode.map_or("", |m| m.as_str());
        let stream = fields.stream.unwrap_or(false);
        let conv = fields.conversation();
        if self.config.log_prompts {
            let shown = &body[..body.len().min(4096)];
            tracing::info!(target: "halo_gateway::prompt", key = %key.name, model = %asked, body = %String::from_utf8_lossy(shown));
        }
        drop(fields);
        let mut headers = upstream_headers(&parts.headers);
        if stream {
            // llama-server closes the connection after a stream without
            // saying so; a pooled one would then fail the next request.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        let job = Job {
            method: parts.method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
            headers,
            body,
            asked,
            key,
            model: fin.model.clone(),
            conv,
        };
        let deadline = Instant::now() + self.config.queue_timeout;
        let mut excluded = Vec::new();
        let first = self
            .dispatch(
                &job,
                deadline,
                &mut excluded,
                if stream { Wait::No } else { Wait::Quiet },
            )
            .await;
        match first {
            Ok((resp, inflight)) => self.pass(resp, inflight, fin, stream),
            Err(Stop::MustWait) => {
                // A full queue is refused before the stream starts, while
                // a status can still say so.
                let waiting = self
                    .queues
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&job.model)
                    .copied()
                    .unwrap_or(0);
                if waiting >= self.config.queue_limit {
                    let e = ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "queue_full",
                        format!(
                            "{waiting} requests already wait for {:?}; try again shortly",
                            job.asked
                        ),
                    )
                    .retry_after(1);
                    return self.error(fin, e);
                }
                self.wait_streaming(job, deadline, excluded, fin)
            }
            Err(Stop::Gone) => self.error(fin, client_closed()),
            Err(Stop::Error(e)) => self.error(fin, e),
        }
    }

    fn key_slot(&self, key: &str) -> Option<KeySlot> {
        let mut m = self
            .keys_in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.to_owned()).or_insert(0);
        if *n >= self.config.max_in_flight_per_key {
            return None;
        }
        *n += 1;
        Some(KeySlot {
            map: self.keys_in_flight.clone(),
            key: key.to_owned(),
        })
    }

    /// The request body, bounded in size and time.
    async fn read_body(&self, headers: &HeaderMap, body: Incoming) -> Result<Bytes, ApiError> {
        let max = self.config.max_body_bytes;
        let too_big = || {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
                format!("the request body is larger than {max} bytes"),
            )
        };
        let declared = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(too_big());
        }
        let read = Limited::new(body, max).collect();
        match tokio::time::timeout(self.config.idle_timeout, read).await {
            Err(_) => Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                "body_timeout",
                format!(
                    "the request body did not arrive within {:?}",
                    self.config.idle_timeout
                ),
            )),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(too_big()),
            Ok(Err(e)) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "body_unreadable",
                format!("the request body could not be read: {e}"),
            )),
            Ok(Ok(c)) => Ok(c.to_bytes()),
        }
    }

    /// Sends `job` to a ready replica, retrying others on failures that
    /// reached no client, waiting (as `wait` says) while none is ready.
    async fn dispatch(
        &self,
        job: &Job,
        deadline: Instant,
        excluded: &mut Vec<String>,
        wait: Wait<'_>,
    ) -> Result<(Response<Incoming>, InFlight), Stop> {
        let mut rx = self.table.clone();
        let mut queued: Option<QueueSlot> = None;
        let mut next_note = Instant::now();
        let mut retry_at: Option<Instant> = None;
        // Replicas whose pooled connection broke once for this request:
        // the next try there is on a fresh connection, at once.
        let mut fresh: Vec<String> = Vec::new();
        loop {
            let table = rx.borrow_and_update().clone();
            let now_ms = proto::units::now_unix_ms();
            // A key revoked or narrowed while waiting stops here.
            let key_now = table
                .authenticate_hash(&job.key, now_ms)
                .map_err(|e| Stop::Error(e.into()))?;
            let target = table
                .resolve(&job.asked, Some(key_now))
                .map_err(|e| Stop::Error(e.into()))?;
            if retry_at.is_some_and(|t| Instant::now() >= t) {
                excluded.clear();
                retry_at = None;
            }
            let candidates: Vec<&crate::table::Replica> = target
                .ready()
                .filter(|r| !excluded.contains(&r.base_url))
                .collect();
            let chosen = self.balancer.choose(&candidates, job.conv);
            // Ready replicas, each already sent all it takes: wait here for
            // one to finish a request.
            let full = chosen.is_none() && !candidates.is_empty();
            if let Some((i, inflight)) = chosen {
                let r = candidates[i];
                let send = self.upstream.send(
                    &r.base_url,
                    &r.api_key,
                    &job.method,
                    &job.path_and_query,
                    &job.headers,
                    &job.body,
                );
                let sent = match wait {
                    Wait::Sse(tx) => tokio::select! {
                        s = send => s,
                        _ = tx.closed() => return Err(Stop::Gone),
                    },
                    _ => send.await,
                };
                match sent {
                    Ok(mut resp) => {
                        // Which node answered, for people and tests
                        // (never the instance's address or key).
                        if let Ok(v) = http::HeaderValue::from_str(&r.node) {
                            resp.headers_mut().insert("x-halo-node", v);
                        }
                        return Ok((resp, inflight));
                    }
                    Err(Failure::Io) if !fresh.contains(&r.base_url) => {
                        // A kept connection the replica had closed (llama-server
                        // closes one now and then without saying so): the pool
                        // drops it; try the same replica again at once.
                        tracing::debug!(replica = %r.base_url, "kept connection closed; retrying on a new one");
                        self.metrics.upstream_error(&job.model, Failure::Io.kind());
                        self.metrics.retry();
                        fresh.push(r.base_url.clone());
                        continue;
                    }
                    Err(f) => {
                        tracing::warn!(
                            replica = %r.base_url, node = %r.node, model = %job.model,
                            "upstream {}; trying elsewhere", f.kind()
                        );
                        self.metrics.upstream_error(&job.model, f.kind());
                        if f == Failure::Connect {
                            self.balancer.failed(&r.base_url);
                        }
                        self.metrics.retry();
                        excluded.push(r.base_url.clone());
                        continue;
                    }
                }
            }
            if !full && target.ready().next().is_some() && retry_at.is_none() {
                // Every ready replica failed this request: give them a
                // moment, or a table change, before trying them again.
                retry_at = Some(Instant::now() + RETRY_PAUSE);
            }
            if target.held() && target.ready().next().is_none() {
                return Err(Stop::Error(
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "model_held",
                        format!("{:?} cannot run now: {}", job.asked, target.states()),
                    )
                    .retry_after(60),
                ));
            }
            // An on-demand model with no placement: ask for it (one call
            // per model at a time); a refusal is answered at once.
            if let Some(model) = target.to_demand()
                && let Some(why) = self.ondemand.ask(model, &job.key.name).await
            {
                return Err(Stop::Error(
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "model_does_not_fit",
                        format!(
                            "{:?} is loaded on demand, but it fits nowhere now: {why}",
                            job.asked
                        ),
                    )
                    .retry_after(60),
                ));
            }
            let loading_on_demand = target.on_demand();
            if loading_on_demand {
                // Its readiness should reach this request at once.
                self.ondemand.hurry();
            }
            let now = Instant::now();
            // A model with no placement at all waits only as long as a
            // re-placement takes, not a load (an on-demand one: a load).
            let deadline = if target.unplaced() && !loading_on_demand {
                let began = deadline
                    .checked_sub(self.config.queue_timeout)
                    .unwrap_or(now);
                deadline.min(began + UNPLACED_WAIT.min(self.config.queue_timeout))
            } else {
                deadline
            };
            if now >= deadline {
                if target.unplaced() {
                    return Err(Stop::Error(
                        ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "server_error",
                            "model_not_placed",
                            format!(
                                "{:?} is in the catalog but not placed: {} (haloctl place ROLE MODEL)",
                                job.asked,
                                target.states()
                            ),
                        )
                        .retry_after(10),
                    ));
                }
                return Err(Stop::Error(
                    ApiError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "server_error",
                        "model_not_ready",
                        format!(
                            "{:?} has no ready replica after waiting {}s: {}",
                            job.asked,
                            self.config.queue_timeout.as_secs(),
                            target.states()
                        ),
                    )
                    .retry_after(10),
                ));
            }
            if matches!(wait, Wait::No) {
                return Err(Stop::MustWait);
            }
            if queued.is_none() {
                queued = Some(self.enqueue(&job.model, &target)?);
            }
            let mut until = deadline;
            if let Some(t) = retry_at {
                until = until.min(t);
            }
            if loading_on_demand {
                until = until.min(now + ON_DEMAND_POLL);
            }
            if full {
                // A request that ended before this wait began woke nobody.
                until = until.min(now + FULL_POLL);
            }
            if let Wait::Sse(tx) = wait {
                if now >= next_note {
                    let note = format!(": waiting for {}: {}\n\n", job.asked, target.states());
                    if tx.send(Ok(Frame::data(Bytes::from(note)))).await.is_err() {
                        return Err(Stop::Gone);
                    }
                    next_note = now + KEEPALIVE_EVERY;
                }
                until = until.min(next_note);
            }
            drop(target);
            drop(table);
            let closed = async {
                match wait {
                    Wait::Sse(tx) => tx.closed().await,
                    _ => std::future::pending().await,
                }
            };
            tokio::select! {
                r = rx.changed() => {
                    if r.is_err() {
                        // The feed is gone: nothing will change; wait out the deadline.
                        tokio::time::sleep_until(until.into()).await;
                    }
                }
                _ = tokio::time::sleep_until(until.into()) => {}
                () = self.balancer.freed(), if full => {}
                _ = closed => return Err(Stop::Gone),
            }
        }
    }

    /// A place in `model`'s queue, or a 503 when it is full.
    fn enqueue(&self, model: &str, target: &Target<'_>) -> Result<QueueSlot, Stop> {
        let mut m = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(model.to_owned()).or_insert(0);
        if *n >= self.config.queue_limit {
            return Err(Stop::Error(
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    "queue_full",
                    format!(
                        "{} requests already wait for {model:?} ({}); try again shortly",
                        *n,
                        target.states()
                    ),
                )
                .retry_after(1),
            ));
        }
        *n += 1;
        drop(m);
        self.metrics.queue_depth(model, 1);
        Ok(QueueSlot {
            map: self.queues.clone(),
            metrics: self.metrics.clone(),
            model: model.to_owned(),
            since: Instant::now(),
        })
    }

    /// Passes a replica's answer on, frame by frame.
    fn pass(
        &self,
        resp: Response<Incoming>,
        inflight: InFlight,
        mut fin: Finish,
        stream: bool,
    ) -> Response<Tracked> {
        let (parts, body) = resp.into_parts();
        fin.status = parts.status.as_u16();
        fin.upstream = true;
        // Held until the answer ends: the replica's in-flight count.
        fin.guards.push(Box::new(inflight));
        let usage = if !parts.status.is_success() {
            UsageFrom::Nothing
        } else if stream || is_sse(&parts.headers) {
            UsageFrom::Sse
        } else {
            UsageFrom::Json
        };
        let body = body.map_err(BoxError::from).boxed_unsync();
        let mut r = Response::new(Tracked::new(body, fin, usage));
        *r.status_mut() = parts.status;
        *r.headers_mut() = client_headers(&parts.headers);
        r
    }

    /// A streaming request that must wait: answer 200 now, tell the client
    /// every few seconds that it waits, then pass the replica's events on
    /// (or end with an SSE `error` event).
    fn wait_streaming(
        self: &Arc<Self>,
        job: Job,
        deadline: Instant,
        mut excluded: Vec<String>,
        mut fin: Finish,
    ) -> Response<Tracked> {
        let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(16);
        let status = Arc::new(AtomicU16::new(200));
        fin.status = 200;
        fin.upstream = true;
        fin.late_status = Some(status.clone());
        let me = self.clone();
        tokio::spawn(async move {
            let got = me
                .dispatch(&job, deadline, &mut excluded, Wait::Sse(&tx))
                .await;
            match got {
                Ok((resp, inflight)) => {
                    let ok = resp.status().is_success();
                    status.store(resp.status().as_u16(), Ordering::Relaxed);
                    let mut body = resp.into_body();
                    if !ok {
                        let text = Limited::new(body, 64 << 10)
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let msg = String::from_utf8_lossy(&text).into_owned();
                        let e = ApiError::new(
                            StatusCode::BAD_GATEWAY,
                            "server_error",
                            "upstream_error",
                            msg,
                        );
                        let _ = tx.send(Ok(Frame::data(sse_error(&e)))).await;
                        return;
                    }
                    loop {
                        let frame = tokio::select! {
                            f = body.frame() => f,
                            _ = tx.closed() => break,
                        };
                        match frame {
                            Some(Ok(f)) => {
                                if tx.send(Ok(f)).await.is_err() {
                                    break;
                                }
                            }
                            Some(Err(e)) => {
                                let _ = tx.send(Err(e.into())).await;
                                break;
                            }
                            None => break,
                        }
                    }
                    drop(inflight);
                }
                Err(Stop::Error(e)) => {
                    status.store(e.status.as_u16(), Ordering::Relaxed);
                    let _ = tx.send(Ok(Frame::data(sse_error(&e)))).await;
                }
                Err(Stop::Gone) | Err(Stop::MustWait) => {
                    status.store(499, Ordering::Relaxed);
                }
            }
        });
        let body = ChannelBody { rx }.boxed_unsync();
        let mut r = Response::new(Tracked::new(body, fin, UsageFrom::Sse));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        r
    }
}

/// An SSE `error` event carrying an OpenAI-shaped error.
fn sse_error(e: &ApiError) -> Bytes {
    Bytes::from(format!("event: error\ndata: {}\n\n", e.json()))
}

fn is_sse(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// What is counted for a client that left before its answer (nginx's
/// 499; nobody reads it).
fn client_closed() -> ApiError {
    ApiError::new(
        StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        "invalid_request_error",
        "client_closed",
        "the client closed the request".into(),
    )
}

fn method_not_allowed(allowed: &str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("this path takes {allowed}"),
    )
}

fn json(mut fin: Finish, status: StatusCode, body: String) -> Response<Tracked> {
    fin.status = status.as_u16();
    let mut r = Response::new(Tracked::full(body, fin));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// A body fed by a task through a channel.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Frame<Bytes>, BoxError>>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.rx.poll_recv(cx)
    }
}

/// A connection's byte stream, noting when a request's head begins.
struct Watched<IO> {
    inner: IO,
    st: Arc<ConnState>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Watched<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before
            && self.st.requests.load(Ordering::Acquire) == 0
            && self.st.head_since.load(Ordering::Acquire) == u64::MAX
        {
            self.st.head_since.store(self.st.now(), Ordering::Release);
            self.st.wake.notify_one();
        }
        r
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Watched<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap what they built themselves.
#[path = "server_tests.rs"]
mod tests;
