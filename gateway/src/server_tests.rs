//! The server against small in-process upstreams on 127.0.0.1 (scripted
//! stand-ins for llama-server, one behaviour each) and raw client sockets.

use super::*;
use crate::table::{Replica, Route, key_hash};
use http_body_util::{Full, StreamBody};
use proto::domain::EditorMode;
use std::future::Future;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_stream::wrappers::ReceiverStream;

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;
type Handler = Arc<
    dyn Fn(String, Bytes) -> Pin<Box<dyn Future<Output = Response<Body>> + Send>> + Send + Sync,
>;

fn handler<F, Fut>(f: F) -> Handler
where
    F: Fn(String, Bytes) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    Arc::new(move |p, b| Box::pin(f(p, b)))
}

/// A bound guard against a hang: fails the test instead of stalling it.
async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    match tokio::time::timeout(Duration::from_secs(10), f).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no progress in 10 s"),
    }
}

fn full(status: u16, body: &str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(body.to_owned()))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

type Frames = mpsc::Sender<Result<Frame<Bytes>, BoxError>>;

/// An SSE response whose frames the returned sender feeds.
fn sse() -> (Response<Body>, Frames) {
    let (tx, rx) = mpsc::channel(4);
    let mut r = Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    (r, tx)
}

fn data(s: &str) -> Result<Frame<Bytes>, BoxError> {
    Ok(Frame::data(Bytes::from(s.to_owned())))
}

/// What an upstream saw: (authorization header, body) per request
/// (`GET /slots` is answered, two idle slots, and not recorded).
type Seen = Arc<Mutex<Vec<(String, Bytes)>>>;

/// An upstream on a free port answering with `h`; records every request.
async fn upstream(h: Handler) -> (String, Seen) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let s = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((c, _)) = l.accept().await else { return };
            let (h, s) = (h.clone(), s.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (h, s) = (h.clone(), s.clone());
                    async move {
                        let (parts, body) = req.into_parts();
                        if parts.uri.path() == "/slots" {
                            let slots = r#"[{"id":0,"is_processing":false},{"id":1,"is_processing":false}]"#;
                            return Ok::<_, Infallible>(full(200, slots));
                        }
                        let bytes = body
                            .collect()
                            .await
                            .map(|c| c.to_bytes())
                            .unwrap_or_default();
                        let auth = parts
                            .headers
                            .get(header::AUTHORIZATION)
                            .map(|v| v.to_str().unwrap_or("").to_owned())
                            .unwrap_or_default();
                        s.lock().unwrap().push((auth, bytes.clone()));
                        Ok::<_, Infallible>(h(parts.uri.path().to_owned(), bytes).await)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(c), svc)
                    .await;
            });
        }
    });
    (url, seen)
}

fn replica(base_url: &str, ready: bool) -> Replica {
    Replica {
        node: "n1".into(),
        agent_address: "127.0.0.1:1".into(),
        request_id: "r1".into(),
        instance_id: if ready { "i1".into() } else { String::new() },
        base_url: base_url.into(),
        api_key: "instance-key".into(),
        ready,
        state: if ready { "ready" } else { "loading" }.into(),
    }
}

fn key(name: &str, secret: &str, modes: &[EditorMode]) -> UserKey {
    UserKey {
        name: name.into(),
        sha256: key_hash(secret),
        modes: modes.to_vec(),
        models: vec![],
        expires_unix_ms: None,
    }
}

fn table(replicas: Vec<Replica>) -> Table {
    let state = if replicas.iter().any(|r| r.ready) {
        "ready"
    } else {
        "loading"
    };
    Table {
        routes: vec![
            Route {
                placement: "tiny".into(),
                model: "tiny-q4".into(),
                modes: vec![EditorMode::Ask, EditorMode::Code],
                state: state.into(),
                replicas,
                on_demand: false,
            },
            Route {
                placement: "big".into(),
                model: "deepseek".into(),
                modes: vec![EditorMode::Architect],
                state: "loading".into(),
                replicas: vec![],
                on_demand: false,
            },
        ],
        keys: vec![
            key("alice", "alice-secret", &[]),
            key("asker", "ask-secret", &[EditorMode::Ask]),
        ],
        controller_at_unix_ms: 1,
    }
}

struct Running {
    gw: Arc<Gateway>,
    addr: std::net::SocketAddr,
    feed: watch::Sender<Arc<Table>>,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn quick() -> GatewayConfig {
    GatewayConfig {
        queue_timeout: Duration::from_secs(5),
        ..GatewayConfig::default()
    }
}

async fn start(config: GatewayConfig, t: Table) -> Running {
    let (feed, rx) = watch::channel(Arc::new(t));
    let gw = Gateway::new(config, rx);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(gw.clone().serve(l, None, stop.clone()));
    Running {
        gw,
        addr,
        feed,
        stop,
    }
}

/// A response as a client sees it.
struct Got {
    status: u16,
    headers: HeaderMap,
    body: String,
}

async fn call(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: &str,
) -> Got {
    let client = Upstream::new().client;
    let mut req = Request::new(Full::new(Bytes::from(body.to_owned())));
    *req.method_mut() = method;
    *req.uri_mut() = format!("http://{addr}{path}").parse().unwrap();
    if let Some(k) = key {
        req.headers_mut().insert(
            header::AUTHORIZATION,
            format!("Bearer {k}").parse().unwrap(),
        );
    }
    let resp = within("request", client.request(req)).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = within("body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes();
    Got {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn post(addr: std::net::SocketAddr, key: Option<&str>, body: &str) -> Got {
    call(addr, Method::POST, "/v1/chat/completions", key, body).await
}

const CHAT: &str = r#"{ "model" : "code", "messages": [{"role":"user","content":"hi"}] }"#;

fn ok_chat() -> Handler {
    handler(|_, _| async {
        full(
            200,
            r#"{"choices":[{"message":{"content":"hello"}}],"usage":{"prompt_tokens":7,"completion_tokens":3}}"#,
        )
    })
}

#[tokio::test]
async fn a_chat_completion_goes_through_with_the_instance_key_and_the_body_unchanged() {
    let (url, seen) = upstream(ok_chat()).await;
    let gw = start(quick(), table(vec![replica(&url, true)])).await;
    let got = post(gw.addr, Some("alice-secret"), CHAT).await;
    assert_eq!(got.status, 200, "{}", got.body);
    assert!(got.body.contains("hello"));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1);
    assert_eq!(
        seen[0].0, "Bearer instance-key",
        "the replica's own key goes upstream"
    );
    assert_eq!(seen[0].1, CHAT.as_bytes(), "the body passes byte for byte");
    // Counted when the response ends, which the client may see first.
    within("metrics", async {
        loop {
            let m = call(gw.addr, Method::GET, "/metrics", None, "").await.body;
            if m.contains("halo_gateway_requests_total{model=\"tiny-q4\",mode=\"code\",key=\"alice\",status=\"200\"} 1")
                && m.contains("halo_gateway_prompt_tokens_total{model=\"tiny-q4\"} 7")
                && m.contains("halo_gateway_completion_tokens_total{model=\"tiny-q4\"} 3")
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn refused_requests_never_reach_a_replica() {
    let (url, seen) = upstream(ok_chat()).await;
    let gw = start(quick(), table(vec![replica(&url, true)])).await;
    let cases: Vec<(Option<&str>, String, u16, &str)> = vec![
        (None, CHAT.into(), 401, "no API key"),
        (Some("wrong"), CHAT.into(), 401, "invalid API key"),
        (
            Some("ask-secret"),
            CHAT.replace("code", "architect"),
            403,
            "may not use",
        ),
        (
            Some("alice-secret"),
            CHAT.replace("code", "nope"),
            404,
            "known: architect, ask, big, code",
        ),
        (
            Some("alice-secret"),
            CHAT.replace("code", "../../etc/passwd"),
            404,
            "does not exist",
        ),
        (
            Some("alice-secret"),
            CHAT.replace("code", &"x".repeat(10_000)),
            400,
            "not a name",
        ),
        (
            Some("alice-secret"),
            "{\"model\": \"code\", ".into(),
            400,
            "not a JSON object",
        ),
        (
            Some("alice-secret"),
            "[1,2]".into(),
            400,
            "not a JSON object",
        ),
        (Some("alice-secret"), "{}".into(), 400, "names no model"),
    ];
    for (k, body, status, says) in cases {
        let got = post(gw.addr, k, &body).await;
        assert_eq!(got.status, status, "{k:?}: {}", got.body);
        let v: serde_json::Value = serde_json::from_str(&got.body).unwrap();
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(msg.contains(says), "{msg:?} should say {says:?}");
        assert!(v["error"]["type"].is_string() && v["error"]["code"].is_string());
    }
    let nf = call(gw.addr, Method::GET, "/v1/nothing", None, "").await;
    assert_eq!(nf.status, 404);
    assert!(nf.body.contains("\"error\""));
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing reached the replica"
    );
}

#[tokio::test]
async fn a_body_over_the_limit_is_413() {
    let (url, seen) = upstream(ok_chat()).await;
    let cfg = GatewayConfig {
        max_body_bytes: 1024,
        ..quick()
    };
    let gw = start(cfg, table(vec![replica(&url, true)])).await;
    let big = format!(
        r#"{{"model":"code","messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(4096)
    );
    let got = post(gw.addr, Some("alice-secret"), &big).await;
    assert_eq!(got.status, 413, "{}", got.body);
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn streamed_events_pass_one_by_one_and_a_leaving_client_ends_the_upstream() {
    let (release, released) = mpsc::channel::<()>(1);
    let released = Arc::new(tokio::sync::Mutex::new(released));
    let (ended_tx, mut ended) = mpsc::channel::<()>(1);
    let h = handler(move |_, _| {
        let released = released.clone();
        let ended_tx = ended_tx.clone();
        async move {
            let (r, tx) = sse();
            tokio::spawn(async move {
                let _ = tx.send(data("data: {\"n\":1}\n\n")).await;
                // The next event only once the client has the first.
                let _ = released.lock().await.recv().await;
                let _ = tx.send(data("data: {\"n\":2}\n\n")).await;
                // Then events until nobody reads them.
                loop {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    if tx.send(data("data: {\"n\":3}\n\n")).await.is_err() {
                        let _ = ended_tx.send(()).await;
                        return;
                    }
                }
            });
            r
        }
    });
    let (url, _) = upstream(h).await;
    let gw = start(quick(), table(vec![replica(&url, true)])).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let body = CHAT.replace("\"messages\"", "\"stream\": true, \"messages\"");
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer alice-secret\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("\"n\":1") {
        let n = within("first event", s.read(&mut buf)).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));
    assert!(!String::from_utf8_lossy(&seen).contains("\"n\":2"));
    release.send(()).await.unwrap();
    while !String::from_utf8_lossy(&seen).contains("\"n\":2") {
        let n = within("second event", s.read(&mut buf)).await.unwrap();
        assert!(n > 0);
        seen.extend_from_slice(&buf[..n]);
    }
    drop(s);
    within("upstream sees the client leave", ended.recv()).await;
}

#[tokio::test]
async fn a_failed_replica_is_retried_elsewhere_before_the_first_byte() {
    let (bad, bad_seen) = upstream(handler(|_, _| async {
        full(503, r#"{"error":"loading"}"#)
    }))
    .await;
    let (good, good_seen) = upstream(ok_chat()).await;
    // A port nothing listens on: connection refused.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let gw = start(
        quick(),
        table(vec![
            replica(&bad, true),
            replica(&dead, true),
            replica(&good, true),
        ]),
    )
    .await;
    // Different conversations, so affinity does not keep them on one replica.
    for i in 0..6 {
        let got = post(
            gw.addr,
            Some("alice-secret"),
            &CHAT.replace("hi", &format!("hi {i}")),
        )
        .await;
        assert_eq!(got.status, 200, "{}", got.body);
    }
    assert_eq!(good_seen.lock().unwrap().len(), 6);
    assert!(
        !bad_seen.lock().unwrap().is_empty(),
        "the 503 replica was tried"
    );
    let m = gw.gw.metrics().render();
    assert!(m.contains("kind=\"status_503\""), "{m}");
    assert!(m.contains("kind=\"connect\""), "{m}");
    assert!(!m.contains("halo_gateway_retries_total 0"), "{m}");
}

#[tokio::test]
async fn a_request_waits_for_a_loading_model_then_is_served() {
    let (url, seen) = upstream(ok_chat()).await;
    let gw = start(quick(), table(vec![replica(&url, false)])).await;
    let addr = gw.addr;
    let waiting = tokio::spawn(async move { post(addr, Some("alice-secret"), CHAT).await });
    within("request queued", async {
        while !gw
            .gw
            .metrics()
            .render()
            .contains("halo_gateway_queue_depth{model=\"tiny-q4\"} 1")
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "nothing goes to a replica that is not ready"
    );
    gw.feed
        .send_replace(Arc::new(table(vec![replica(&url, true)])));
    let got = within("served", waiting).await.unwrap();
    assert_eq!(got.status, 200, "{}", got.body);
    assert!(
        gw.gw
            .metrics()
            .render()
            .contains("halo_gateway_queue_depth{model=\"tiny-q4\"} 0")
    );
}

#[tokio::test]
async fn a_stream_waiting_for_a_model_hears_why_then_gets_its_events() {
    let h = handler(|_, _| async {
        let (r, tx) = sse();
        tokio::spawn(async move {
            let _ = tx.send(data("data: {\"choices\":[],\"usage\":{\"prompt_tokens\":2,\"completion_tokens\":1}}\n\n")).await;
            let _ = tx.send(data("data: [DONE]\n\n")).await;
        });
        r
    });
    let (url, _) = upstream(h).await;
    let gw = start(quick(), table(vec![replica(&url, false)])).await;
    let client = Upstream::new().client;
    let body = CHAT.replace("\"messages\"", "\"stream\": true, \"messages\"");
    let mut req = Request::new(Full::new(Bytes::from(body)));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = format!("http://{}/v1/chat/completions", gw.addr)
        .parse()
        .unwrap();
    req.headers_mut().insert(
        header::AUTHORIZATION,
        HeaderValue::from_static("Bearer alice-secret"),
    );
    let resp = within("headers", client.request(req)).await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "text/event-stream");
    let mut body = resp.into_body();
    let first = within("note", body.frame())
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with(": waiting for code: tiny is loading"));
    gw.feed
        .send_replace(Arc::new(table(vec![replica(&url, true)])));
    let rest = within("events", body.collect()).await.unwrap().to_bytes();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.contains("[DONE]"), "{rest}");
    // The stream's usage is counted as it passes.
    within("metrics", async {
        while !gw
            .gw
            .metrics()
            .render()
            .contains("halo_gateway_prompt_tokens_total{model=\"tiny-q4\"} 2")
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn no_ready_replica_within_the_queue_timeout_is_503_with_the_state() {
    let cfg = GatewayConfig {
        queue_timeout: Duration::from_millis(200),
        ..quick()
    };
    let gw = start(cfg, table(vec![replica("http://127.0.0.1:9", false)])).await;
    let got = post(gw.addr, Some("alice-secret"), CHAT).await;
    assert_eq!(got.status, 503, "{}", got.body);
    assert!(got.headers.contains_key(header::RETRY_AFTER));
    assert!(got.body.contains("tiny is loading"), "{}", got.body);
}

#[tokio::test]
async fn a_held_model_is_503_at_once_with_why_not_after_the_queue_timeout() {
    // The queue would wait a minute: a held placement is answered at once.
    let cfg = GatewayConfig {
        queue_timeout: Duration::from_secs(60),
        ..quick()
    };
    let mut t = table(vec![replica("http://127.0.0.1:9", false)]);
    t.routes[0].state = "held: killed for lack of memory on halo1: it used 125.0 GiB".into();
    let gw = start(cfg, t).await;
    let got = post(gw.addr, Some("alice-secret"), CHAT).await;
    assert_eq!(got.status, 503, "{}", got.body);
    assert!(got.body.contains("model_held"), "{}", got.body);
    assert!(
        got.body
            .contains("tiny is held: killed for lack of memory on halo1: it used 125.0 GiB"),
        "{}",
        got.body
    );
}

#[tokio::test]
async fn a_key_over_its_in_flight_cap_gets_429() {
    let (release, released) = mpsc::channel::<()>(1);
    let released = Arc::new(tokio::sync::Mutex::new(released));
    let h = handler(move |_, _| {
        let released = released.clone();
        async move {
            let _ = released.lock().await.recv().await;
            full(200, "{}")
        }
    });
    let (url, seen) = upstream(h).await;
    let cfg = GatewayConfig {
        max_in_flight_per_key: 1,
        ..quick()
    };
    let gw = start(cfg, table(vec![replica(&url, true)])).await;
    let addr = gw.addr;
    let first = tokio::spawn(async move { post(addr, Some("alice-secret"), CHAT).await });
    within("first in flight", async {
        while seen.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    let second = post(gw.addr, Some("alice-secret"), CHAT).await;
    assert_eq!(second.status, 429, "{}", second.body);
    assert_eq!(second.headers[header::RETRY_AFTER], "1");
    // Another key is not held back.
    let other =
        tokio::spawn(
            async move { post(addr, Some("ask-secret"), &CHAT.replace("code", "ask")).await },
        );
    release.send(()).await.unwrap();
    release.send(()).await.unwrap();
    assert_eq!(within("first", first).await.unwrap().status, 200);
    assert_eq!(within("other", other).await.unwrap().status, 200);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn slow_headers_are_closed_but_an_idle_keep_alive_lives_longer() {
    let (url, _) = upstream(ok_chat()).await;
    let cfg = GatewayConfig {
        header_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(5),
        ..quick()
    };
    let gw = start(cfg, table(vec![replica(&url, true)])).await;
    // Half a request, then nothing: closed at the header deadline.
    let mut slow = TcpStream::connect(gw.addr).await.unwrap();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = within("slow headers closed", slow.read(&mut buf))
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "{}", String::from_utf8_lossy(&buf[..n]));
    // A connection that never sends anything: closed too.
    let mut silent = TcpStream::connect(gw.addr).await.unwrap();
    assert_eq!(
        within("silent closed", silent.read(&mut buf))
            .await
            .unwrap_or(0),
        0
    );
    // A keep-alive connection idle longer than the header deadline still
    // takes its next request.
    let mut ka = TcpStream::connect(gw.addr).await.unwrap();
    let req = "GET /health HTTP/1.1\r\nhost: x\r\n\r\n";
    ka.write_all(req.as_bytes()).await.unwrap();
    let n = within("first answer", ka.read(&mut buf)).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    ka.write_all(req.as_bytes()).await.unwrap();
    let n = within("second answer", ka.read(&mut buf)).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn idle_connections_at_the_cap_make_room_for_new_requests() {
    let (url, _) = upstream(ok_chat()).await;
    let cfg = GatewayConfig {
        max_connections: 8,
        ..quick()
    };
    let gw = start(cfg, table(vec![replica(&url, true)])).await;
    let mut idle = Vec::new();
    for _ in 0..50 {
        idle.push(TcpStream::connect(gw.addr).await.unwrap());
    }
    for _ in 0..3 {
        let got = post(gw.addr, Some("alice-secret"), CHAT).await;
        assert_eq!(got.status, 200, "{}", got.body);
    }
    assert!(gw.gw.conns.lock().unwrap().len() <= 8 + 1);
}

#[tokio::test]
async fn models_lists_what_the_key_may_use_with_state() {
    let gw = start(quick(), table(vec![replica("http://127.0.0.1:9", true)])).await;
    let all = call(gw.addr, Method::GET, "/v1/models", Some("alice-secret"), "").await;
    assert_eq!(all.status, 200);
    let v: serde_json::Value = serde_json::from_str(&all.body).unwrap();
    assert_eq!(v["object"], "list");
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        [
            "architect",
            "ask",
            "big",
            "code",
            "deepseek",
            "tiny",
            "tiny-q4"
        ]
    );
    let code = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "code")
        .unwrap();
    assert_eq!(code["halo"]["kind"], "mode");
    assert_eq!(code["halo"]["state"], "ready");
    let big = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == "big")
        .unwrap();
    assert_eq!(big["halo"]["state"], "big is loading");
    let ask = call(gw.addr, Method::GET, "/v1/models", Some("ask-secret"), "").await;
    let v: serde_json::Value = serde_json::from_str(&ask.body).unwrap();
    let ids: Vec<&str> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["ask", "tiny", "tiny-q4"]);
    assert_eq!(
        call(gw.addr, Method::GET, "/v1/models", None, "")
            .await
            .status,
        401
    );
    let health = call(gw.addr, Method::GET, "/health", None, "").await;
    assert_eq!(health.status, 200);
}

#[tokio::test]
async fn a_conversation_returns_to_its_replica_while_loads_are_even() {
    let (a, a_seen) = upstream(ok_chat()).await;
    let (b, b_seen) = upstream(ok_chat()).await;
    let gw = start(quick(), table(vec![replica(&a, true), replica(&b, true)])).await;
    for i in 0..8 {
        let conv = format!(
            r#"{{"model":"code","messages":[{{"role":"system","content":"s{i}"}},{{"role":"user","content":"u{i}"}}]}}"#
        );
        for turn in 0..3 {
            let body = conv.replace(
                "]}",
                &format!(",{{\"role\":\"assistant\",\"content\":\"t{turn}\"}}]}}"),
            );
            assert_eq!(post(gw.addr, Some("alice-secret"), &body).await.status, 200);
        }
    }
    let on = |seen: &Seen, i: usize| {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(_, b)| String::from_utf8_lossy(b).contains(&format!("\"s{i}\"")))
            .count()
    };
    for i in 0..8 {
        let (x, y) = (on(&a_seen, i), on(&b_seen, i));
        assert!(x == 3 || y == 3, "conversation {i} split {x}/{y}");
    }
    assert!(
        !a_seen.lock().unwrap().is_empty() && !b_seen.lock().unwrap().is_empty(),
        "both replicas serve"
    );
}

#[tokio::test]
async fn a_full_queue_is_refused_at_once_with_retry_after() {
    let cfg = GatewayConfig {
        queue_limit: 1,
        ..quick()
    };
    let gw = start(cfg, table(vec![replica("http://127.0.0.1:9", false)])).await;
    let addr = gw.addr;
    let waiting = tokio::spawn(async move { post(addr, Some("alice-secret"), CHAT).await });
    within("request queued", async {
        while !gw
            .gw
            .metrics()
            .render()
            .contains("halo_gateway_queue_depth{model=\"tiny-q4\"} 1")
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    for body in [
        CHAT.to_owned(),
        CHAT.replace("\"messages\"", "\"stream\": true, \"messages\""),
    ] {
        let got = post(gw.addr, Some("alice-secret"), &body).await;
        assert_eq!(got.status, 503, "{}", got.body);
        assert_eq!(got.headers[header::RETRY_AFTER], "1");
        assert!(got.body.contains("already wait"), "{}", got.body);
    }
    waiting.abort();
}

#[tokio::test]
async fn https_serves_with_a_pem_certificate_and_no_client_certificate() {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("gw.crt"), dir.path().join("gw.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let acceptor = tls_acceptor(&cert, &key).unwrap();
    let (_feed, rx) = watch::channel(Arc::new(table(vec![])));
    let gw = Gateway::new(quick(), rx);
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(gw.serve(l, Some(acceptor), stop.clone()));

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = within("handshake", connector.connect(name, tcp))
        .await
        .unwrap();
    tls.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = within("answer", tls.read_to_end(&mut out)).await;
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"status\":\"ok\""), "{out}");
    // Plain HTTP on the TLS port gets no answer.
    let mut plain = TcpStream::connect(addr).await.unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = within("plain refused", plain.read(&mut buf))
        .await
        .unwrap_or(0);
    assert!(!String::from_utf8_lossy(&buf[..n]).contains("200"));
    stop.cancel();
}

#[tokio::test]
async fn a_client_leaving_before_the_answer_ends_the_upstream_request() {
    struct Dropped(mpsc::Sender<()>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            let _ = self.0.try_send(());
        }
    }
    let (gone_tx, mut gone) = mpsc::channel::<()>(1);
    let h = handler(move |_, _| {
        let guard = Dropped(gone_tx.clone());
        async move {
            // A long generation: answers only when dropped.
            let _guard = guard;
            std::future::pending::<()>().await;
            full(200, "{}")
        }
    });
    let (url, seen) = upstream(h).await;
    let gw = start(quick(), table(vec![replica(&url, true)])).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer alice-secret\r\ncontent-length: {}\r\n\r\n{CHAT}",
        CHAT.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    within("request upstream", async {
        while seen.lock().unwrap().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    drop(s);
    within("upstream request dropped", gone.recv()).await;
}

/// Stands in for the controllers: answers every demand with `refuse`'s
/// refusal after a moment, counting the calls.
#[derive(Debug, Default)]
struct FakeController {
    demands: AtomicUsize,
}

impl crate::control::ControllerLink for FakeController {
    fn demand<'a>(
        &'a self,
        _model: &'a str,
        _key_name: &'a str,
    ) -> crate::control::Call<'a, Result<proto::v1::DemandResponse, String>> {
        Box::pin(async move {
            self.demands.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok(proto::v1::DemandResponse {
                outcome: proto::v1::demand_response::Outcome::Refused as i32,
                placement: String::new(),
                explanation: vec!["needs 90.0 GiB, the largest node has 60.0 GiB".into()],
                retry_after_ms: 0,
            })
        })
    }

    fn report_use(&self, _uses: Vec<proto::v1::ModelUse>) -> crate::control::Call<'_, ()> {
        Box::pin(async {})
    }

    fn hurry(&self) {}
}

#[tokio::test]
async fn an_on_demand_model_that_fits_nowhere_is_503_at_once_for_every_waiting_request() {
    let mut t = table(vec![]);
    t.routes.push(Route {
        placement: String::new(),
        model: "big-od".into(),
        modes: vec![EditorMode::Debug],
        state: "not loaded (on demand)".into(),
        replicas: vec![],
        on_demand: true,
    });
    let gw = start(quick(), t).await;
    let link = Arc::new(FakeController::default());
    gw.gw.set_controller(link.clone());
    let body = r#"{ "model" : "debug", "messages": [{"role":"user","content":"hi"}] }"#;
    let started = Instant::now();
    let addr = gw.addr;
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(async move { post(addr, Some("alice-secret"), body).await }))
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.push(t.await.expect("task"));
    }
    for got in &all {
        assert_eq!(got.status, 503, "{}", got.body);
        assert!(got.body.contains("model_does_not_fit"), "{}", got.body);
        assert!(got.body.contains("needs 90.0 GiB"), "{}", got.body);
    }
    // One call for the five, and no wait for the queue's 5 s.
    assert_eq!(link.demands.load(Ordering::SeqCst), 1);
    assert!(started.elapsed() < Duration::from_secs(4));
}
