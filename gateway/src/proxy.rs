//! The upstream side: one pooled keep-alive HTTP client for every
//! llama-server, the request a replica receives (its own bearer, the
//! user's body unchanged), and the response body the client receives:
//! upstream frames passed on as they arrive, with the bookkeeping
//! (first byte, token usage, logs, metrics, in-flight counts) done as they
//! pass and when the body ends or is dropped.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri};
use http_body::{Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::metrics::Metrics;

/// Errors a response body may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Any response body.
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Longest non-streaming answer kept aside to read its `usage`.
const USAGE_JSON_MAX: usize = 4 << 20;
/// Longest SSE line kept across chunks to read its `usage`.
const USAGE_LINE_MAX: usize = 1 << 20;

/// How long an idle kept connection stays open: below llama-server's 5 s
/// keep-alive, so the gateway closes first (a connection the server closed
/// would fail the next request on it), and an idle connection does not
/// hold one of its HTTP threads for long.
const POOL_IDLE: Duration = Duration::from_secs(2);

/// The pooled client every upstream request goes through.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The hyper client (keep-alive pool, `TCP_NODELAY`, connect deadline).
    pub client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream::new()
    }
}

/// Why an attempt on a replica failed before anything reached the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No connection could be made.
    Connect,
    /// The connection broke before the response headers.
    Io,
    /// The replica answered 502.
    Status502,
    /// The replica answered 503 (llama-server while loading).
    Status503,
    /// The replica's URL is not a URL.
    BadUrl,
}

impl Failure {
    /// The `kind` label of `halo_gateway_upstream_errors_total`.
    pub fn kind(self) -> &'static str {
        match self {
            Failure::Connect => "connect",
            Failure::Io => "io",
            Failure::Status502 => "status_502",
            Failure::Status503 => "status_503",
            Failure::BadUrl => "bad_url",
        }
    }
}

/// Headers that describe one hop, not the message.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// The client's headers a replica may see: not hop-by-hop ones, not the
/// user's key, not the client's host or length.
pub fn upstream_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        if hop_by_hop(name)
            || name == header::AUTHORIZATION
            || name == header::HOST
            || name == header::CONTENT_LENGTH
            || name == header::EXPECT
        {
            continue;
        }
        out.append(name.clone(), value.clone());
    }
    out
}

impl Upstream {
    /// A client with pooled keep-alive connections and `TCP_NODELAY`.
    pub fn new() -> Upstream {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        http.set_keepalive(Some(Duration::from_secs(30)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(256)
            .build(http);
        Upstream { client }
    }

    /// Sends a request to a replica at `base_url` with its `api_key` as
    /// the bearer. A 502 or 503 answer is a [`Failure`]: nothing of it
    /// reached the client, so the request may go elsewhere.
    pub async fn send(
        &self,
        base_url: &str,
        api_key: &str,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &Bytes,
    ) -> Result<Response<Incoming>, Failure> {
        let uri: Uri = format!("{}{path_and_query}", base_url.trim_end_matches('/'))
            .parse()
            .map_err(|_| Failure::BadUrl)?;
        let mut req = Request::new(Full::new(body.clone()));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers.clone();
        if !api_key.is_empty() {
            let v =
                HeaderValue::try_from(format!("Bearer {api_key}")).map_err(|_| Failure::BadUrl)?;
            req.headers_mut().insert(header::AUTHORIZATION, v);
        }
        let resp = self.client.request(req).await.map_err(|e| {
            if e.is_connect() {
                Failure::Connect
            } else {
                Failure::Io
            }
        })?;
        match resp.status().as_u16() {
            502 => Err(Failure::Status502),
            503 => Err(Failure::Status503),
            _ => Ok(resp),
        }
    }
}

/// The response headers a client may see (hop-by-hop ones dropped).
pub fn client_headers(from: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(from.len());
    for (name, value) in from {
        if !hop_by_hop(name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// What is logged and counted when a response ends (or the client leaves).
#[derive(Debug)]
pub struct Finish {
    /// Where the numbers go.
    pub metrics: Arc<Metrics>,
    /// When the request arrived.
    pub start: Instant,
    /// Request method (for the log).
    pub method: Method,
    /// Request path, shortened (for the log).
    pub path: String,
    /// Catalog name served (metrics label; empty when none).
    pub model: String,
    /// Mode asked for (metrics label; empty when none).
    pub mode: &'static str,
    /// Key name (metrics label; empty before authentication).
    pub key: String,
    /// Status sent.
    pub status: u16,
    /// A status decided after the headers left (an SSE error event).
    pub late_status: Option<Arc<AtomicU16>>,
    /// Whether an upstream answer is passed on (time to first byte counts).
    pub upstream: bool,
    /// Held until the end: anything else counted per request (key,
    /// connection).
    pub guards: Vec<Box<dyn Send + std::fmt::Debug>>,
    tokens: Option<(u64, u64)>,
    first_byte: bool,
    completed: bool,
}

impl Finish {
    /// The bookkeeping of a request that arrived at `start`.
    pub fn new(metrics: Arc<Metrics>, start: Instant, method: Method, path: &str) -> Finish {
        let mut path = path.to_owned();
        if path.len() > 128 {
            let mut cut = 128;
            while !path.is_char_boundary(cut) {
                cut -= 1;
            }
            path.truncate(cut);
            path.push('…');
        }
        Finish {
            metrics,
            start,
            method,
            path,
            model: String::new(),
            mode: "",
            key: String::new(),
            status: 0,
            late_status: None,
            upstream: false,
            guards: Vec::new(),
            tokens: None,
            first_byte: false,
            completed: false,
        }
    }
}

impl Drop for Finish {
    fn drop(&mut self) {
        let status = self
            .late_status
            .as_ref()
            .map_or(self.status, |s| s.load(Ordering::Relaxed));
        let elapsed = self.start.elapsed();
        let m = &self.metrics;
        m.request(&self.model, self.mode, &self.key, status);
        if !self.model.is_empty() {
            m.duration(&self.model, elapsed);
            if let Some((p, c)) = self.tokens {
                m.tokens(&self.model, p, c);
            }
        }
        tracing::info!(
            target: "halo_gateway::access",
            method = %self.method,
            path = %self.path,
            model = %self.model,
            mode = self.mode,
            key = %self.key,
            status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            completed = self.completed,
            "request"
        );
    }
}

/// How a body's `usage` is found.
#[derive(Debug)]
enum Scan {
    /// Not looked for.
    Off,
    /// A JSON answer: kept aside (bounded) and read at its end.
    Json { chunks: Vec<Bytes>, len: usize },
    /// Server-sent events: `data:` lines that mention usage are read as
    /// they pass; `carry` holds an unfinished line.
    Sse { carry: Vec<u8> },
}

/// A response body on its way to the client.
#[derive(Debug)]
pub struct Tracked {
    inner: Body,
    fin: Finish,
    scan: Scan,
}

/// What reading usage looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageFrom {
    /// Nothing (errors, lists).
    Nothing,
    /// A JSON answer.
    Json,
    /// An SSE stream.
    Sse,
}

impl Tracked {
    /// Wraps `inner`, reading usage as `usage` says.
    pub fn new(inner: Body, fin: Finish, usage: UsageFrom) -> Tracked {
        let scan = match usage {
            UsageFrom::Nothing => Scan::Off,
            UsageFrom::Json => Scan::Json {
                chunks: Vec::new(),
                len: 0,
            },
            UsageFrom::Sse => Scan::Sse { carry: Vec::new() },
        };
        Tracked { inner, fin, scan }
    }

    /// A complete body.
    pub fn full(bytes: impl Into<Bytes>, fin: Finish) -> Tracked {
        let body = Full::new(bytes.into())
            .map_err(|e| match e {})
            .boxed_unsync();
        Tracked::new(body, fin, UsageFrom::Nothing)
    }

    fn saw(&mut self, data: &Bytes) {
        if !self.fin.first_byte && !data.is_empty() && !data.starts_with(b":") {
            self.fin.first_byte = true;
            if self.fin.upstream && !self.fin.model.is_empty() {
                self.fin
                    .metrics
                    .first_byte(&self.fin.model, self.fin.start.elapsed());
            }
        }
        match &mut self.scan {
            Scan::Off => {}
            Scan::Json { chunks, len } => {
                *len += data.len();
                if *len > USAGE_JSON_MAX {
                    self.scan = Scan::Off;
                } else {
                    chunks.push(data.clone());
                }
            }
            Scan::Sse { carry } => {
                if carry.is_empty() && data.ends_with(b"\n") {
                    if mentions_usage(data) {
                        for line in data.split(|b| *b == b'\n') {
                            if let Some(t) = sse_usage(line) {
                                self.fin.tokens = Some(t);
                            }
                        }
                    }
                    return;
                }
                carry.extend_from_slice(data);
                let end = carry.iter().rposition(|b| *b == b'\n');
                if let Some(end) = end {
                    if mentions_usage(&carry[..end]) {
                        for line in carry[..end].split(|b| *b == b'\n') {
                            if let Some(t) = sse_usage(line) {
                                self.fin.tokens = Some(t);
                            }
                        }
                    }
                    carry.drain(..=end);
                }
                if carry.len() > USAGE_LINE_MAX {
                    carry.clear();
                }
            }
        }
    }

    fn ended(&mut self) {
        if self.fin.completed {
            return;
        }
        self.fin.completed = true;
        if let Scan::Json { chunks, .. } = &mut self.scan {
            let t = if chunks.len() == 1 {
                json_usage(&chunks[0])
            } else {
                json_usage(&chunks.concat())
            };
            if t.is_some() {
                self.fin.tokens = t;
            }
        }
        self.scan = Scan::Off;
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.saw(d);
                }
                // hyper stops polling a body that says it has ended.
                if this.inner.is_end_stream() {
                    this.ended();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.ended();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                if !this.fin.model.is_empty() {
                    this.fin.metrics.upstream_error(&this.fin.model, "io");
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn mentions_usage(data: &[u8]) -> bool {
    find(data, b"\"usage\"") || find(data, b"\"tokens_predicted\"")
}

/// (prompt, completion) tokens from one SSE line, when it carries them.
fn sse_usage(line: &[u8]) -> Option<(u64, u64)> {
    let data = line.strip_prefix(b"data:")?;
    if !mentions_usage(data) {
        return None;
    }
    json_usage(data)
}

/// (prompt, completion) tokens from an answer: OpenAI's `usage`, or
/// llama-server's own `tokens_evaluated` / `tokens_predicted`.
pub fn json_usage(body: &[u8]) -> Option<(u64, u64)> {
    #[derive(serde::Deserialize)]
    struct Usage {
        #[serde(default)]
        prompt_tokens: u64,
        #[serde(default)]
        completion_tokens: u64,
    }
    #[derive(serde::Deserialize)]
    struct Answer {
        usage: Option<Usage>,
        tokens_evaluated: Option<u64>,
        tokens_predicted: Option<u64>,
    }
    let a: Answer = serde_json::from_slice(body).ok()?;
    match (a.usage, a.tokens_evaluated, a.tokens_predicted) {
        (Some(u), _, _) => Some((u.prompt_tokens, u.completion_tokens)),
        (None, None, None) => None,
        (None, p, c) => Some((p.unwrap_or(0), c.unwrap_or(0))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap what they built themselves.
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_from_openai_and_llama_answers() {
        let chat = br#"{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}"#;
        assert_eq!(json_usage(chat), Some((7, 3)));
        let native = br#"{"content":"x","tokens_evaluated":5,"tokens_predicted":2,"stop":true}"#;
        assert_eq!(json_usage(native), Some((5, 2)));
        assert_eq!(json_usage(br#"{"content":"x"}"#), None);
        assert_eq!(json_usage(b"not json"), None);
        assert_eq!(
            sse_usage(br#"data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":9}}"#),
            Some((4, 9))
        );
        assert_eq!(
            sse_usage(br#"data: {"choices":[{"delta":{"content":"usage"}}]}"#),
            None
        );
    }

    #[test]
    fn upstream_headers_drop_the_users_key_and_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer user-secret"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert(header::HOST, HeaderValue::from_static("gateway:8080"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let out = upstream_headers(&h);
        assert!(out.get(header::AUTHORIZATION).is_none());
        assert!(out.get(header::CONNECTION).is_none());
        assert!(out.get(header::HOST).is_none());
        assert_eq!(out[header::CONTENT_TYPE], "application/json");
    }
}
