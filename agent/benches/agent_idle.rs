//! The agent's footprint and reaction time, as numbers (nothing is asserted):
//!
//! * idle RSS and CPU of `halo-agent` over `HALO_BENCH_SECS` (default 30)
//!   with two tiny-model instances running: once with no client, once with
//!   one Watch stream sampling memory every 5 s; next to Debian's
//!   `prometheus-node-exporter` measured the same way (idle, then scraped
//!   every 5 s) when it is installed;
//! * latency from an instance's `/health` first answering 200 (polled by
//!   this bench every millisecond) to its Ready event arriving on a Watch
//!   stream, over 10 starts.
//!
//!     cargo bench -p agent --bench agent_idle
//!
//! Needs llama.cpp's `llama-server` (`HALO_LLAMA_BIN`, else the build
//! script's cache). Targets: RSS < 10 MiB, idle CPU < 0.2 % of a core,
//! Ready latency median < 100 ms.
//!
//! The agent serves plaintext gRPC on loopback (`--insecure-loopback-only`):
//! what is measured is its idle footprint and its reaction to a health
//! check, over one long-lived connection, not TLS handshakes. Every wait
//! has a deadline; a failure exits non-zero with the agent's log.
//! `HALO_BENCH_SMOKE=1` (tests/bench-smoke.sh): one instance, one second
//! per measurement, one start, no exporter.

use agent::gguf::fixtures::write_tiny_llama;
use proto::v1::{self, agent_service_client::AgentServiceClient};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const AGENT: &str = env!("CARGO_BIN_EXE_halo-agent");

type Error = Box<dyn std::error::Error + Send + Sync>;

/// Whether `HALO_BENCH_SMOKE=1`: one short pass that only shows the bench
/// still runs.
fn smoke() -> bool {
    std::env::var_os("HALO_BENCH_SMOKE").is_some_and(|v| v == "1")
}

/// Longest wait for the agent to serve, and for an instance to be Ready.
const AGENT_UP: Duration = Duration::from_secs(20);
const READY: Duration = Duration::from_secs(90);
/// Deadline of each unary call.
const CALL: Duration = Duration::from_secs(30);

fn llama_server() -> PathBuf {
    let dir = std::env::var_os("HALO_LLAMA_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME")
                .map(PathBuf::from)
                .unwrap_or_default();
            home.join(".cache/halo/llama.cpp-11434.0.0/bin")
        });
    dir.join("llama-server")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// Kills the child on drop.
struct Guard(Child);

impl Guard {
    /// An error carrying `what` and the agent's log so far (`log`).
    fn fail(&mut self, log: &Path, what: impl std::fmt::Display) -> Error {
        let status = match self.0.try_wait() {
            Ok(Some(s)) => format!("exited with {s}"),
            _ => "still running".to_owned(),
        };
        let text = std::fs::read_to_string(log).unwrap_or_default();
        format!("{what} (halo-agent {status}); its log:\n{text}").into()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// utime + stime of a process (dead threads included), in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 (utime, stime) are 11 and 12 after the state (field 3).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// `VmRSS` and `VmHWM` in KiB.
fn rss_kib(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let get = |key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (get("VmRSS:"), get("VmHWM:"))
}

/// CPU % of one core and RSS over `secs`, while `during` runs.
async fn measure<F: std::future::Future<Output = ()>>(
    pid: u32,
    secs: u64,
    during: F,
) -> (f64, u64, u64) {
    let t0 = cpu_ticks(pid).unwrap_or(0);
    let start = Instant::now();
    tokio::select! {
        () = tokio::time::sleep(Duration::from_secs(secs)) => {}
        () = during => {}
    }
    let ticks = cpu_ticks(pid).unwrap_or(0).saturating_sub(t0);
    let elapsed = start.elapsed().as_secs_f64();
    // CLK_TCK is 100 on Linux x86-64.
    let pct = ticks as f64 / 100.0 / elapsed * 100.0;
    let (rss, hwm) = rss_kib(pid);
    (pct, rss, hwm)
}

fn report(name: &str, secs: u64, (pct, rss, hwm): (f64, u64, u64)) {
    println!(
        "{name:<44} cpu {pct:>6.3} % of a core over {secs} s (10 ms ticks)   rss {:>6.2} MiB (peak {:.2} MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
}

async fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf).await.ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// Status of `GET /health` with blocking I/O.
fn blocking_status(port: u16) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut buf = [0u8; 32];
    let n = s.read(&mut buf).ok()?;
    std::str::from_utf8(&buf[..n])
        .ok()?
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

/// Median, p90 and max.
fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    (
        s[s.len() / 2],
        s[(s.len() * 9 / 10).min(s.len() - 1)],
        s[s.len() - 1],
    )
}

async fn scrape_every(port: u16, path: &'static str, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let _ = http_status(port, path).await;
    }
}

fn start_request(id: &str) -> v1::StartInstanceRequest {
    v1::StartInstanceRequest {
        request_id: id.into(),
        model_id: "tiny.gguf".into(),
        options: Some(v1::InstanceOptions {
            context_size: 256,
            parallel: 1,
            threads: Some(1),
            ..Default::default()
        }),
        generation: 1,
        leader_revision: 0,
        kind: 0,
        estimate_bytes: None,
    }
}

/// Reads `events` until `id` is Ready, at most [`READY`].
async fn wait_ready(
    events: &mut tonic::Streaming<v1::AgentEvent>,
    id: &str,
) -> Result<(v1::Instance, Instant), Error> {
    let deadline = tokio::time::Instant::now() + READY;
    loop {
        let e = tokio::time::timeout_at(deadline, events.message())
            .await
            .map_err(|_| format!("{id} not Ready within {READY:?}"))??
            .ok_or("watch ended")?;
        if let Some(v1::agent_event::Event::Instance(i)) = e.event
            && i.id == id
            && i.state() == v1::InstanceState::Ready
        {
            return Ok((i, Instant::now()));
        }
    }
}

/// Connects to the agent on `listen`, waiting at most [`AGENT_UP`] and
/// failing at once if it exits.
async fn connect(
    agent: &mut Guard,
    listen: u16,
) -> Result<AgentServiceClient<tonic::transport::Channel>, Error> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{listen}"))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(CALL);
    let deadline = Instant::now() + AGENT_UP;
    loop {
        if let Ok(Some(_)) = agent.0.try_wait() {
            return Err("halo-agent did not start".into());
        }
        match endpoint.connect().await {
            Ok(ch) => return Ok(AgentServiceClient::new(ch)),
            Err(e) if Instant::now() >= deadline => {
                return Err(format!("no connection within {AGENT_UP:?}: {e}").into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn start_agent(dir: &Path, models: &Path, listen: u16, ports: u16) -> Result<Guard, Error> {
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let child = Command::new(AGENT)
        .args(["--node-name", "bench", "--listen"])
        .arg(format!("127.0.0.1:{listen}"))
        .arg("--model-dir")
        .arg(models)
        .arg("--llama-server")
        .arg(llama_server())
        .arg("--port-range")
        .arg(format!("{ports}-{}", ports + 20))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--insecure-loopback-only")
        .env("HALO_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    Ok(Guard(child))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    match bench().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("agent_idle: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn bench() -> Result<(), Error> {
    let tmp = tempfile::tempdir()?;
    let models = tmp.path().join("models");
    std::fs::create_dir(&models)?;
    write_tiny_llama(&models.join("tiny.gguf"), 7)?;
    let listen = free_port();
    // A range well away from ephemeral ports of this run.
    let ports = 40_000 + (std::process::id() % 20_000) as u16;
    let log = tmp.path().join("agent.log");
    let mut agent = start_agent(tmp.path(), &models, listen, ports)?;
    // A failed call may be the agent's doing: show its log with the error.
    run(&mut agent, listen)
        .await
        .map_err(|e| agent.fail(&log, e))
}

async fn run(agent: &mut Guard, listen: u16) -> Result<(), Error> {
    let smoke = smoke();
    let secs: u64 = match std::env::var("HALO_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => s,
        None if smoke => 1,
        None => 30,
    };
    let (instances, starts, settle) = if smoke {
        (1, 1, Duration::from_millis(200))
    } else {
        (2, 10, Duration::from_secs(3))
    };
    let pid = agent.0.id();
    let mut client = connect(agent, listen).await?;
    println!("halo-agent {AGENT}");

    // The instances, then let everything settle.
    let mut events = client
        .watch(v1::WatchRequest {
            memory_period_ms: 0,
        })
        .await?
        .into_inner();
    for n in 0..instances {
        let i = client
            .start_instance(start_request(&format!("idle-{n}")))
            .await?
            .into_inner();
        wait_ready(&mut events, &i.id).await?;
    }
    drop(events);
    tokio::time::sleep(settle).await;
    report(
        &format!("halo-agent, {instances} instances, no client"),
        secs,
        measure(pid, secs, std::future::pending()).await,
    );
    let mut watch = client
        .watch(v1::WatchRequest {
            memory_period_ms: 5000,
        })
        .await?
        .into_inner();
    let drain = async move { while let Ok(Some(_)) = watch.message().await {} };
    report(
        &format!("halo-agent, {instances} instances, Watch every 5 s"),
        secs,
        measure(pid, secs, drain).await,
    );

    let exporter = Path::new("/usr/bin/prometheus-node-exporter");
    if smoke {
        println!("smoke run: prometheus-node-exporter not measured");
    } else if exporter.is_file() {
        let port = free_port();
        let child = Command::new(exporter)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let guard = Guard(child);
        let epid = guard.0.id();
        tokio::time::sleep(Duration::from_secs(3)).await;
        report(
            "prometheus-node-exporter, no client",
            secs,
            measure(epid, secs, std::future::pending()).await,
        );
        report(
            "prometheus-node-exporter, scraped every 5 s",
            secs,
            measure(
                epid,
                secs,
                scrape_every(port, "/metrics", Duration::from_secs(5)),
            )
            .await,
        );
    } else {
        println!(
            "prometheus-node-exporter not installed (apt-get install prometheus-node-exporter)"
        );
    }

    // /health 200 → Ready event.
    let mut lat = Vec::new();
    let mut start_to_ready = Vec::new();
    for n in 0..starts {
        let mut events = client
            .watch(v1::WatchRequest {
                memory_period_ms: 0,
            })
            .await?
            .into_inner();
        let t_start = Instant::now();
        let i = client
            .start_instance(start_request(&format!("lat-{n}")))
            .await?
            .into_inner();
        let port = i.port as u16;
        // A dedicated thread polls with blocking I/O every 200 µs, so its
        // first 200 is not delayed behind this runtime's other work.
        let poll = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if blocking_status(port) == Some(200) {
                    return Some(Instant::now());
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            None
        });
        let (_, ready_at) = wait_ready(&mut events, &i.id).await?;
        let healthy_at = tokio::task::spawn_blocking(move || poll.join())
            .await?
            .map_err(|_| "poller panicked")?
            .ok_or("/health never answered 200")?;
        start_to_ready.push(ready_at.duration_since(t_start).as_secs_f64() * 1000.0);
        let ms = ready_at.saturating_duration_since(healthy_at).as_secs_f64() * 1000.0
            - healthy_at.saturating_duration_since(ready_at).as_secs_f64() * 1000.0;
        lat.push(ms);
        client
            .stop_instance(v1::StopInstanceRequest {
                instance_id: i.id,
                leader_revision: 0,
            })
            .await?;
    }
    let (m, p90, max) = stats(&lat);
    println!(
        "/health 200 -> Ready event: median {m:.1} ms, p90 {p90:.1} ms, max {max:.1} ms over {} starts \
         (negative: the agent saw 200 first) {:?}",
        lat.len(),
        lat.iter().map(|v| format!("{v:.1}")).collect::<Vec<_>>()
    );
    let (m, p90, max) = stats(&start_to_ready);
    println!(
        "StartInstance call -> Ready event (tiny model): median {m:.1} ms, p90 {p90:.1} ms, max {max:.1} ms"
    );

    // Leave no instance behind.
    for i in client
        .list_instances(v1::ListInstancesRequest {})
        .await?
        .into_inner()
        .instances
    {
        if i.state() != v1::InstanceState::Unmanaged {
            let _ = client
                .stop_instance(v1::StopInstanceRequest {
                    instance_id: i.id,
                    leader_revision: 0,
                })
                .await;
        }
    }
    Ok(())
}
