//! The gateway against llama-server itself, side by side in one run, with
//! real processes on loopback: one agent, a controller, llama-server with
//! the tiny model (64 slots, so concurrency 64 never waits for a slot) and
//! `haloctl gateway` (the workstation form: plain HTTP on loopback, its
//! default limits and logging). Printed, not asserted; the issue's targets
//! are printed beside the figures.
//!
//! * Added latency of a non-streaming chat completion (p50/p99 of 300
//!   sequential requests each side, the two sides interleaved).
//! * Added time to first token of a streaming one (to the first SSE
//!   `data:` line), likewise.
//! * Requests per second at concurrency 1, 8 and 64: eight rounds of a
//!   1.5 s run of each side, the order swapped every round, so a burst of
//!   load from elsewhere on the machine hits both sides alike; with the
//!   CPU time per request of the client, the gateway and llama-server.
//! * The gateway's memory (VmRSS): idle after startup, after the load, and
//!   with 5,000 idle TCP connections opened to it, while new requests must
//!   still be served.
//! * What explains outliers: connections the client had to make again,
//!   and the gateway's own count of upstream failures and retries.
//!
//! Both sides use one client: a minimal HTTP/1.1 keep-alive client over a
//! `TcpStream`, written here so that it costs little and the same on both.
//!
//!     cargo bench -p tests --bench gateway
//!
//! `HALO_BENCH_SMOKE=1`: a few requests per measure, 50 idle connections.

use proto::v1;
use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::Barrier;
use std::time::{Duration, Instant};
use tests::cluster::{AgentNode, ControllerProc, endpoint, tiny_controller};
use tests::{Proc, bin, free_port, text, wait_for};

/// The tiny model with 64 slots of 128 tokens (above its trained 2,048
/// tokens in total, which llama-server allows with RoPE scaling; the
/// prompts here are a few tokens).
const CATALOG: &str = r#"
[[models]]
name = "tiny"
model_id = "tiny.gguf"
default_context = 8192
min_context = 256
parallel = 64
allow_context_over_trained = true
modes = ["code", "ask"]
"#;

/// Concurrency levels of the throughput measure.
const LEVELS: [usize; 3] = [1, 8, 64];

/// How much to run.
#[derive(Clone, Copy)]
struct Size {
    /// Sequential requests per side for each latency measure.
    latency: usize,
    /// Rounds per concurrency: one run of each side in each.
    rounds: usize,
    /// Seconds of one run.
    run_secs: f64,
    /// Idle connections opened to the gateway.
    idle_conns: usize,
}

fn size() -> Size {
    if tests::smoke() {
        Size {
            latency: 5,
            rounds: 2,
            run_secs: 0.3,
            idle_conns: 50,
        }
    } else {
        Size {
            latency: 300,
            rounds: 8,
            run_secs: 1.5,
            idle_conns: 5000,
        }
    }
}

/// One answer as the client saw it.
#[derive(Debug)]
struct Reply {
    status: u16,
    body: Vec<u8>,
    /// From sending the request to the first SSE `data:` line.
    first_data: Option<Duration>,
    /// From sending the request to the end of the answer.
    elapsed: Duration,
}

impl Reply {
    /// A complete chat completion (streamed or not).
    fn complete(&self) -> bool {
        self.status == 200 && contains(&self.body, b"\"choices\"")
    }

    fn shown(&self) -> String {
        format!(
            "{} {}",
            self.status,
            text(&self.body).chars().take(300).collect::<String>()
        )
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Why an exchange failed: before any byte of the answer (a kept
/// connection the server had closed: sent again on a new one), or after.
enum Broke {
    Unanswered(io::Error),
    Midway(io::Error),
}

/// A minimal HTTP/1.1 client on one keep-alive connection: a request is
/// one write; the answer is read by `Content-Length` or chunk by chunk.
/// A connection the server closed is replaced (and the request sent
/// again when nothing of its answer had come).
struct Http {
    addr: SocketAddr,
    /// `Host` and `Authorization` header lines.
    head: String,
    conn: Option<BufReader<TcpStream>>,
    /// Connections made.
    connects: usize,
    /// Requests sent again because a kept connection turned out closed.
    resent: usize,
}

impl Http {
    /// A client of `base_url` (`http://IP:PORT`) sending `key` as bearer.
    fn new(base_url: &str, key: &str) -> Http {
        let hostport = base_url
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("not a plain http URL: {base_url}"))
            .trim_end_matches('/');
        let addr: SocketAddr = hostport
            .parse()
            .unwrap_or_else(|e| panic!("{hostport}: {e}"));
        Http {
            addr,
            head: format!("Host: {hostport}\r\nAuthorization: Bearer {key}\r\n"),
            conn: None,
            connects: 0,
            resent: 0,
        }
    }

    /// `POST path` with a JSON body.
    fn post(&mut self, path: &str, body: &[u8]) -> io::Result<Reply> {
        self.send("POST", path, body)
    }

    /// `METHOD path` with a JSON body (none when empty).
    fn send(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<Reply> {
        let length = if body.is_empty() {
            String::new()
        } else {
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )
        };
        let mut msg = format!("{method} {path} HTTP/1.1\r\n{}{length}\r\n", self.head).into_bytes();
        msg.extend_from_slice(body);
        let t0 = Instant::now();
        loop {
            let fresh = self.conn.is_none();
            let conn = match &mut self.conn {
                Some(c) => c,
                None => {
                    let s = TcpStream::connect(self.addr)?;
                    s.set_nodelay(true)?;
                    s.set_read_timeout(Some(Duration::from_secs(120)))?;
                    self.connects += 1;
                    self.conn.insert(BufReader::with_capacity(64 << 10, s))
                }
            };
            match exchange(conn, &msg, t0) {
                Ok((reply, keep)) => {
                    if !keep {
                        self.conn = None;
                    }
                    return Ok(reply);
                }
                Err(Broke::Unanswered(_)) if !fresh => {
                    self.resent += 1;
                    self.conn = None;
                }
                Err(Broke::Unanswered(e) | Broke::Midway(e)) => {
                    self.conn = None;
                    return Err(e);
                }
            }
        }
    }
}

/// Sends `msg` and reads one answer; whether the connection stays open.
fn exchange(
    conn: &mut BufReader<TcpStream>,
    msg: &[u8],
    t0: Instant,
) -> Result<(Reply, bool), Broke> {
    conn.get_mut().write_all(msg).map_err(Broke::Unanswered)?;
    let mut line = String::new();
    match conn.read_line(&mut line) {
        Ok(0) => {
            return Err(Broke::Unanswered(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before an answer",
            )));
        }
        Ok(_) => {}
        Err(e) => return Err(Broke::Unanswered(e)),
    }
    let midway = |e: io::Error| Broke::Midway(e);
    let bad = |what: String| Broke::Midway(io::Error::new(io::ErrorKind::InvalidData, what));
    let mut words = line.split_whitespace();
    let version = words.next().unwrap_or_default().to_owned();
    let status: u16 = words
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
    let (mut length, mut chunked, mut keep) = (None, false, version == "HTTP/1.1");
    loop {
        line.clear();
        if conn.read_line(&mut line).map_err(midway)? == 0 {
            return Err(bad("closed in the headers".into()));
        }
        let h = line.trim_end();
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            return Err(bad(format!("bad header {h:?}")));
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => {
                length = Some(
                    value
                        .parse::<usize>()
                        .map_err(|_| bad(format!("bad length {value:?}")))?,
                );
            }
            "transfer-encoding" => chunked = value.to_ascii_lowercase().contains("chunked"),
            "connection" => keep = !value.eq_ignore_ascii_case("close"),
            _ => {}
        }
    }
    let mut body = Vec::new();
    let mut first_data = None;
    // The first `data:` at the start of a line, in what came since `from`.
    let mut note = |body: &[u8], from: usize| {
        if first_data.is_none() {
            let from = from.saturating_sub(1);
            if body.starts_with(b"data:") || contains(&body[from..], b"\ndata:") {
                first_data = Some(t0.elapsed());
            }
        }
    };
    if chunked {
        loop {
            line.clear();
            if conn.read_line(&mut line).map_err(midway)? == 0 {
                return Err(bad("closed in a chunked body".into()));
            }
            let hex = line.trim().split(';').next().unwrap_or_default();
            let n = usize::from_str_radix(hex, 16)
                .map_err(|_| bad(format!("bad chunk size {line:?}")))?;
            if n == 0 {
                // Trailers, up to the empty line.
                loop {
                    line.clear();
                    if conn.read_line(&mut line).map_err(midway)? == 0 || line.trim_end().is_empty()
                    {
                        break;
                    }
                }
                break;
            }
            let from = body.len();
            body.resize(from + n, 0);
            conn.read_exact(&mut body[from..]).map_err(midway)?;
            note(&body, from);
            let mut crlf = [0u8; 2];
            conn.read_exact(&mut crlf).map_err(midway)?;
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        conn.read_exact(&mut body).map_err(midway)?;
        note(&body, 0);
    } else {
        conn.read_to_end(&mut body).map_err(midway)?;
        note(&body, 0);
        keep = false;
    }
    Ok((
        Reply {
            status,
            body,
            first_data,
            elapsed: t0.elapsed(),
        },
        keep,
    ))
}

/// The request both sides get: the same bytes.
fn chat_body(stream: bool, max_tokens: u32) -> Vec<u8> {
    serde_json::json!({
        "model": "tiny",
        "stream": stream,
        "max_tokens": max_tokens,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Hello"}],
    })
    .to_string()
    .into_bytes()
}

const CHAT: &str = "/v1/chat/completions";

/// `q` (0..=1) of sorted `v`, nearest rank.
fn pct(v: &[f64], q: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = (q * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// `n` requests on each side, one at a time, alternating which side goes
/// first; the milliseconds `measure` reads of each reply.
fn latencies(
    direct: &mut Http,
    gateway: &mut Http,
    body: &[u8],
    n: usize,
    measure: fn(&Reply) -> Option<Duration>,
) -> (Vec<f64>, Vec<f64>) {
    let (mut d, mut g) = (Vec::with_capacity(n), Vec::with_capacity(n));
    let one = |c: &mut Http, side: &str, out: &mut Vec<f64>| {
        let r = c.post(CHAT, body).unwrap_or_else(|e| panic!("{side}: {e}"));
        assert!(r.complete(), "{side}: {}", r.shown());
        let t = measure(&r).unwrap_or_else(|| panic!("{side}: nothing measured in {}", r.shown()));
        out.push(t.as_secs_f64() * 1000.0);
    };
    for i in 0..n {
        if i % 2 == 0 {
            one(direct, "direct", &mut d);
            one(gateway, "gateway", &mut g);
        } else {
            one(gateway, "gateway", &mut g);
            one(direct, "direct", &mut d);
        }
    }
    (d, g)
}

/// One side at one concurrency for a while.
#[derive(Default)]
struct Run {
    ok: usize,
    /// Failed answers by status (0: no answer).
    failed: BTreeMap<u16, usize>,
    first_failure: Option<String>,
    secs: f64,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.secs
    }

    fn add(&mut self, r: Run) {
        self.ok += r.ok;
        self.secs += r.secs;
        for (k, n) in r.failed {
            *self.failed.entry(k).or_default() += n;
        }
        if self.first_failure.is_none() {
            self.first_failure = r.first_failure;
        }
    }
}

/// `conc` clients, each on its own connection, sending `body` for `secs`
/// (each client's connection is made, and one request answered, before
/// the clock starts).
fn run(base_url: &str, key: &str, body: &[u8], conc: usize, secs: f64) -> Run {
    let barrier = Barrier::new(conc + 1);
    let per_client: Vec<Run> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..conc)
            .map(|_| {
                let barrier = &barrier;
                s.spawn(move || {
                    let mut c = Http::new(base_url, key);
                    let warm = c.post(CHAT, body);
                    barrier.wait();
                    let mut r = Run::default();
                    if let Err(e) = warm {
                        r.first_failure = Some(format!("warm-up: {e}"));
                    }
                    let end = Instant::now() + Duration::from_secs_f64(secs);
                    while Instant::now() < end {
                        match c.post(CHAT, body) {
                            Ok(a) if a.complete() => r.ok += 1,
                            Ok(a) => {
                                *r.failed.entry(a.status).or_default() += 1;
                                r.first_failure.get_or_insert_with(|| a.shown());
                            }
                            Err(e) => {
                                *r.failed.entry(0).or_default() += 1;
                                r.first_failure.get_or_insert_with(|| e.to_string());
                            }
                        }
                    }
                    r
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        let mut v: Vec<Run> = hs
            .into_iter()
            .map(|h| h.join().expect("client thread"))
            .collect();
        let secs = t0.elapsed().as_secs_f64();
        for r in &mut v {
            r.secs = secs;
        }
        v
    });
    let mut total = Run::default();
    for r in per_client {
        total.ok += r.ok;
        total.secs = r.secs;
        for (k, n) in r.failed {
            *total.failed.entry(k).or_default() += n;
        }
        if total.first_failure.is_none() {
            total.first_failure = r.first_failure;
        }
    }
    total
}

/// Both sides at one concurrency.
#[derive(Default)]
struct Level {
    direct: Run,
    gateway: Run,
    /// Each round's gateway/direct ratio of requests per second.
    ratios: Vec<f64>,
    direct_cpu: Cpu,
    gateway_cpu: Cpu,
}

/// The processes whose CPU time is counted.
#[derive(Clone, Copy)]
struct Procs {
    gateway: u32,
    server: u32,
}

impl Procs {
    fn cpu(&self) -> Cpu {
        Cpu {
            client: cpu_secs(std::process::id()),
            gateway: cpu_secs(self.gateway),
            server: cpu_secs(self.server),
        }
    }
}

/// CPU seconds of the client (this process), the gateway and llama-server.
#[derive(Clone, Copy, Default)]
struct Cpu {
    client: f64,
    gateway: f64,
    server: f64,
}

impl Cpu {
    fn minus(self, o: Cpu) -> Cpu {
        Cpu {
            client: self.client - o.client,
            gateway: self.gateway - o.gateway,
            server: self.server - o.server,
        }
    }

    fn plus(self, o: Cpu) -> Cpu {
        Cpu {
            client: self.client + o.client,
            gateway: self.gateway + o.gateway,
            server: self.server + o.server,
        }
    }

    /// Milliseconds per request of `n`: client, gateway, llama-server, total.
    fn per_request(self, n: usize) -> [f64; 4] {
        let per = |s: f64| s * 1000.0 / n.max(1) as f64;
        [
            per(self.client),
            per(self.gateway),
            per(self.server),
            per(self.client + self.gateway + self.server),
        ]
    }
}

/// A memory figure of `/proc/PID/status` (`VmRSS`, `VmHWM`) in MiB.
fn vm(pid: u32, field: &str) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    kb / 1024.0
}

/// CPU seconds (user + system) `pid` has used.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/stat: {e}"));
    // Fields after the command name (which may hold spaces): state is
    // field 3, utime 14 and stime 15.
    let rest = s.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Linux reports these in USER_HZ, 100 a second on every architecture
    // it supports.
    (ticks(14) + ticks(15)) / 100.0
}

/// Raises this process's open-file limit (inherited by what it starts) to
/// at least `n` when the hard limit allows; the soft limit afterwards.
fn raise_nofile(n: u64) -> u64 {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut l = getrlimit(Resource::Nofile);
    if l.current.is_some_and(|c| c < n) {
        l.current = match l.maximum {
            Some(max) => Some(n.min(max)),
            None => Some(n),
        };
        if let Err(e) = setrlimit(Resource::Nofile, l) {
            eprintln!("could not raise the open-file limit: {e}");
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// How many files `pid` has open (its accepted connections among them).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Whether the other end of `s` still holds it open.
fn still_open(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    let mut r = s;
    match r.read(&mut b) {
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
        Ok(n) => n > 0,
    }
}

/// haloctl against `c`.
fn haloctl(c: &ControllerProc, home: &Path) -> Command {
    let mut cmd = Command::new(bin("haloctl-shim"));
    cmd.env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .envs(c.haloctl_env());
    cmd
}

/// `haloctl gateway` on a free loopback port with a gateway certificate
/// for the controller, its own defaults otherwise (logging included).
fn start_gateway(dir: &Path, c: &ControllerProc) -> (Proc, String) {
    let port = free_port();
    let mut cmd = haloctl(c, dir);
    for (k, v) in tests::pki::pki().env("gateway", "workstation") {
        cmd.env(k, v);
    }
    cmd.args(["gateway", "--listen", &format!("127.0.0.1:{port}")])
        .env_remove("HALO_LOG")
        .env_remove("RUST_LOG");
    let mut proc = Proc::spawn("gateway", cmd, dir);
    let up = wait_for(Duration::from_secs(20), || {
        proc.assert_running();
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    assert!(up.is_some(), "gateway did not listen:\n{}", proc.log());
    (proc, format!("http://127.0.0.1:{port}"))
}

/// `haloctl keys create NAME`: the key.
fn create_key(c: &ControllerProc, home: &Path, name: &str) -> String {
    let o = haloctl(c, home)
        .args(["keys", "create", name])
        .output()
        .expect("haloctl keys create");
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    text(&o.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("halo-"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no key in {}", text(&o.stdout)))
}

/// The pid of the node's llama-server and its `-c` and `-np`.
fn server(node: &AgentNode) -> (u32, String) {
    let (pid, args) = node
        .servers()
        .into_iter()
        .find_map(|pid| {
            let a = agent::procfs::cmdline(pid)?;
            a.first()?.ends_with("llama-server").then_some((pid, a))
        })
        .expect("the node's llama-server");
    let flag = |f: &str| {
        args.iter()
            .position(|a| a == f)
            .and_then(|i| args.get(i + 1))
            .map_or("?", String::as_str)
            .to_owned()
    };
    (pid, format!("-c {} -np {}", flag("-c"), flag("-np")))
}

fn target(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let size = size();
    let dir = tempfile::tempdir().expect("tempdir");
    let nofile = raise_nofile(size.idle_conns as u64 + 2048);
    let mut node = AgentNode::new(dir.path(), "halo1", &["speed"], 2);
    agent::gguf::fixtures::write_tiny_llama(&node.models.join("tiny.gguf"), 7).expect("tiny");
    node.start();
    let mut ctl = tiny_controller(dir.path(), std::slice::from_ref(&node), &[]);
    tests::cluster::write_catalog(&dir.path().join("catalog.toml"), CATALOG);
    let mut c = ctl.start_and_wait(&["halo1"]).await;
    let r = c
        .place(v1::PlaceRequest {
            role: "speed".into(),
            model: "tiny".into(),
            ..v1::PlaceRequest::default()
        })
        .await
        .expect("place")
        .into_inner();
    assert!(r.accepted, "{:?}", r.explanation);
    let ep = endpoint(&c, "tiny", Duration::from_secs(120))
        .await
        .expect("an endpoint for tiny");
    let (gw, gw_url) = start_gateway(dir.path(), &ctl);
    let key = create_key(&ctl, dir.path(), "bench");
    let pid = gw.pid();
    let gw_addr: SocketAddr = gw_url
        .trim_start_matches("http://")
        .parse()
        .expect("gateway address");
    let (server_pid, flags) = server(&node);
    let procs = Procs {
        gateway: pid,
        server: server_pid,
    };
    let direct_url = ep.base_url.clone();
    let direct_key = ep.api_key.clone();

    tokio::task::spawn_blocking(move || {
        let mut direct = Http::new(&direct_url, &direct_key);
        let mut through = Http::new(&gw_url, &key);
        let nonstream = chat_body(false, 2);
        let stream = chat_body(true, 4);

        // Up: the gateway answers once it has read the routing table.
        let ready = wait_for(Duration::from_secs(30), || {
            through
                .post(CHAT, &nonstream)
                .ok()
                .filter(Reply::complete)
        });
        assert!(ready.is_some(), "the gateway never answered:\n{}", gw.log());
        let rss_start = vm(pid, "VmRSS");
        // What the gateway spends doing nothing (reading routes and keys).
        let idle_secs = if tests::smoke() { 0.5 } else { 3.0 };
        let c0 = cpu_secs(pid);
        std::thread::sleep(Duration::from_secs_f64(idle_secs));
        let idle_cpu = (cpu_secs(pid) - c0) / idle_secs;
        let load_start = loadavg();

        // Warm both sides (prompt cache, connections).
        let _ = latencies(&mut direct, &mut through, &nonstream, 5, |r| Some(r.elapsed));
        let cpu0 = cpu_secs(pid);
        // Connections made and requests sent again on a new one, by phase.
        let conns = |d: &Http, g: &Http| [d.connects, d.resent, g.connects, g.resent];
        let c0 = conns(&direct, &through);
        let (d_lat, g_lat) = latencies(
            &mut direct,
            &mut through,
            &nonstream,
            size.latency,
            |r| Some(r.elapsed),
        );
        let c1 = conns(&direct, &through);
        let (d_ttft, g_ttft) = latencies(
            &mut direct,
            &mut through,
            &stream,
            size.latency,
            |r| r.first_data,
        );
        let c2 = conns(&direct, &through);
        let cpu_seq = (cpu_secs(pid) - cpu0) / (2 * size.latency) as f64;
        let churn = |a: [usize; 4], b: [usize; 4]| {
            format!(
                "direct {} connections, {} resent; gateway {} connections, {} resent",
                b[0] - a[0],
                b[1] - a[1],
                b[2] - a[2],
                b[3] - a[3]
            )
        };
        let (churn_lat, churn_ttft) = (churn(c0, c1), churn(c1, c2));
        drop((direct, through));

        // Throughput: short runs of each side in turn, the order swapped
        // every round, so a burst of load from elsewhere on the machine
        // hits both sides alike.
        let mut levels = Vec::new();
        for conc in LEVELS {
            let mut lv = Level::default();
            for round in 0..size.rounds {
                let side = |through: bool| {
                    let (url, k) = if through {
                        (gw_url.as_str(), key.as_str())
                    } else {
                        (direct_url.as_str(), direct_key.as_str())
                    };
                    let c0 = procs.cpu();
                    let r = run(url, k, &nonstream, conc, size.run_secs);
                    (r, procs.cpu().minus(c0))
                };
                let ((dr, dc), (gr, gc)) = if round % 2 == 0 {
                    let d = side(false);
                    (d, side(true))
                } else {
                    let g = side(true);
                    (side(false), g)
                };
                lv.ratios.push(gr.rate() / dr.rate());
                lv.direct_cpu = lv.direct_cpu.plus(dc);
                lv.gateway_cpu = lv.gateway_cpu.plus(gc);
                lv.direct.add(dr);
                lv.gateway.add(gr);
            }
            eprintln!(
                "concurrency {conc}: gateway/direct by round {:?}",
                lv.ratios
                    .iter()
                    .map(|r| format!("{r:.2}"))
                    .collect::<Vec<_>>()
            );
            levels.push((conc, lv));
        }
        std::thread::sleep(Duration::from_secs(1));
        let rss_after = vm(pid, "VmRSS");

        // A request on a new connection each, alternating sides, after
        // a pause: before idle connections are opened and while held.
        let fresh_requests = || {
            let fresh = |url: &str, k: &str| Http::new(url, k).post(CHAT, &nonstream);
            [
                ("direct", fresh(&direct_url, &direct_key)),
                ("gateway", fresh(&gw_url, &key)),
                ("direct", fresh(&direct_url, &direct_key)),
                ("gateway", fresh(&gw_url, &key)),
            ]
        };
        let before = fresh_requests();

        // Idle connections: opened, held, a new request served meanwhile.
        let gw_default = gateway::config::GatewayConfig::default();
        let t = Instant::now();
        let mut idle = Vec::with_capacity(size.idle_conns);
        let mut refused = None;
        let mut slowest = Duration::ZERO;
        let fds0 = open_fds(pid);
        for i in 0..size.idle_conns {
            // In batches, each given a moment to be accepted: a full accept
            // queue drops connection attempts, which the kernel retries a
            // second later (the gateway's header timeout meanwhile runs).
            if i % 256 == 255 {
                let want = fds0 + i.min(gw_default.max_connections) - 64;
                wait_for(Duration::from_millis(500), || {
                    (open_fds(pid) >= want).then_some(())
                });
            }
            let t = Instant::now();
            match TcpStream::connect(gw_addr) {
                Ok(s) => {
                    slowest = slowest.max(t.elapsed());
                    idle.push(s);
                }
                Err(e) => {
                    refused = Some(e.to_string());
                    break;
                }
            }
        }
        let opened_in = t.elapsed();
        std::thread::sleep(Duration::from_millis(500));
        let rss_idle_conns = vm(pid, "VmRSS");
        let served = fresh_requests();
        let still = idle.iter().filter(|s| still_open(s)).count();
        let opened = idle.len();
        drop(idle);
        std::thread::sleep(Duration::from_secs(1));
        let rss_end = vm(pid, "VmRSS");
        let hwm = vm(pid, "VmHWM");

        let load_end = loadavg();
        // The gateway's own count of upstream failures and retries.
        let metrics = Http::new(&gw_url, &key)
            .send("GET", "/metrics", b"")
            .map(|r| text(&r.body))
            .unwrap_or_else(|e| format!("/metrics: {e}"));
        let upstream: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                l.starts_with("halo_gateway_upstream_errors_total")
                    || l.starts_with("halo_gateway_retries_total")
                    || (l.starts_with("halo_gateway_requests_total") && !l.contains("\"200\""))
            })
            .collect();

        // The report.
        println!();
        println!(
            "gateway vs direct: tiny model, one llama-server ({flags}), haloctl gateway (2 worker threads, plain HTTP, access log on), loopback, {} CPUs shared by client, gateway and llama-server",
            std::thread::available_parallelism().map_or(0, usize::from)
        );
        println!(
            "client: one HTTP/1.1 keep-alive connection per client thread, the same for both sides; body: chat completion, \"Hello\", temperature 0"
        );
        println!("load average (1/5/15 min) at the start: {load_start}; at the end: {load_end}");
        println!();
        println!(
            "{:<44} {:>10} {:>10} {:>10} {:>8}  target",
            "", "direct", "gateway", "added", "ratio"
        );
        let row = |what: &str, d: f64, g: f64, goal: Option<f64>| {
            let t = goal.map_or(String::new(), |goal| {
                format!("added <= {goal} ms: {}", target(g - d <= goal))
            });
            println!(
                "{what:<44} {d:>10.3} {g:>10.3} {:>+10.3} {:>8.3}  {t}",
                g - d,
                g / d
            );
        };
        let n = size.latency;
        row(
            &format!("non-streaming, max_tokens 2, n={n}: p50 ms"),
            pct(&d_lat, 0.5),
            pct(&g_lat, 0.5),
            Some(1.0),
        );
        row("  p99 ms", pct(&d_lat, 0.99), pct(&g_lat, 0.99), Some(5.0));
        row("  mean ms", mean(&d_lat), mean(&g_lat), None);
        row(
            &format!("streaming, first data: line, n={n}: p50 ms"),
            pct(&d_ttft, 0.5),
            pct(&g_ttft, 0.5),
            Some(1.0),
        );
        row("  p99 ms", pct(&d_ttft, 0.99), pct(&g_ttft, 0.99), Some(5.0));
        row("  mean ms", mean(&d_ttft), mean(&g_ttft), None);
        println!(
            "client connections, non-streaming: {churn_lat}; streaming: {churn_ttft} (resent: the server had closed a kept connection)"
        );
        println!(
            "gateway CPU per sequential request: {:.3} ms (while idle it uses {:.1} ms a second)",
            cpu_seq * 1000.0,
            idle_cpu * 1000.0
        );
        println!();
        println!(
            "{:<44} {:>10} {:>10} {:>8} {:>8}  target",
            format!(
                "requests/s, non-streaming, {} x {}s a side",
                size.rounds, size.run_secs
            ),
            "direct",
            "gateway",
            "ratio",
            "median"
        );
        for (conc, lv) in &levels {
            let (d, g) = (&lv.direct, &lv.gateway);
            let ratio = g.rate() / d.rate();
            println!(
                "{:<44} {:>10.1} {:>10.1} {ratio:>8.3} {:>8.3}  gateway >= 0.95 x direct: {}",
                format!("concurrency {conc}"),
                d.rate(),
                g.rate(),
                pct(&lv.ratios, 0.5),
                target(ratio >= 0.95)
            );
            let [dc, _, ds, dt] = lv.direct_cpu.per_request(d.ok);
            let [gc, gg, gs, gt] = lv.gateway_cpu.per_request(g.ok);
            println!(
                "  CPU ms per request (client + gateway + llama-server = total): direct {dc:.3} + 0 + {ds:.3} = {dt:.3}; through the gateway {gc:.3} + {gg:.3} + {gs:.3} = {gt:.3} (CPU-bound ratio {:.3})",
                dt / gt
            );
            for (side, r) in [("direct", d), ("gateway", g)] {
                if !r.failed.is_empty() {
                    println!(
                        "  {side}: failed answers by status (0: none) {:?}, the first: {}",
                        r.failed,
                        r.first_failure.as_deref().unwrap_or("")
                    );
                }
            }
        }
        println!(
            "(ratio: of the totals; median: of the rounds' ratios; CPU-bound ratio: direct/gateway total CPU per request, what the ratio tends to when the CPUs are the limit)"
        );
        println!();
        println!(
            "gateway VmRSS: {rss_start:.1} MiB idle after startup ({}), {rss_after:.1} MiB idle after the load ({}), peak (VmHWM) {hwm:.1} MiB",
            if rss_start < 20.0 { "target < 20 MiB: met" } else { "target < 20 MiB: MISSED" },
            if rss_after < 20.0 { "met" } else { "MISSED" },
        );
        println!(
            "idle connections: {opened} of {} opened in {:.2}s (slowest connect {:.0} ms){}",
            size.idle_conns,
            opened_in.as_secs_f64(),
            slowest.as_secs_f64() * 1000.0,
            refused.map_or(String::new(), |e| format!(", then refused: {e}")),
        );
        println!(
            "  held: VmRSS {rss_idle_conns:.1} MiB; {still} still open at the gateway (it closes a connection with no request after {:?}, and the longest idle beyond {} connections; open-file limit {nofile})",
            gw_default.header_timeout,
            gw_default.max_connections,
        );
        let shown = |v: &[(&str, io::Result<Reply>)]| {
            v.iter()
                .map(|(side, r)| match r {
                    Ok(r) if r.complete() => {
                        format!("{side} {:.1} ms", r.elapsed.as_secs_f64() * 1000.0)
                    }
                    Ok(r) => format!("{side} NOT served: {}", r.shown()),
                    Err(e) => format!("{side} NOT served: {e}"),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  a request on a new connection each, 1 s after the load: {}",
            shown(&before)
        );
        println!(
            "  the same while the idle connections are held: {}",
            shown(&served)
        );
        println!("  after closing them: VmRSS {rss_end:.1} MiB");
        println!();
        println!(
            "the gateway's /metrics on upstream failures, retries and answers other than 200 (over the whole run):"
        );
        if upstream.is_empty() {
            println!("  none");
        }
        for l in &upstream {
            println!("  {l}");
        }
        let all_served = served
            .iter()
            .all(|(_, r)| matches!(r, Ok(r) if r.complete()));
        assert!(
            all_served,
            "with idle connections held, a new request was not served:\n{}",
            gw.log().lines().rev().take(40).collect::<Vec<_>>().join("\n")
        );
        drop(gw);
    })
    .await
    .expect("bench");
    drop(ctl);
    drop(node);
}

/// The machine's load averages, as `/proc/loadavg` gives them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}
