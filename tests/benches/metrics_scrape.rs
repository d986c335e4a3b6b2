//! What `/metrics` costs, as numbers (nothing is asserted): CPU and RSS
//! of `halo-agent` (the node running the tiny model, so every scrape also
//! reads llama-server's own `/metrics`) and of `halo-controller`, each
//! idle and then scraped every 5 s over `HALO_BENCH_SECS` (default 30),
//! next to Debian's `prometheus-node-exporter` measured the same way in
//! the same run when it is installed (`apt-get install
//! prometheus-node-exporter`). Targets: the agent under 10 MiB RSS and
//! below node_exporter's CPU when scraped.
//!
//!     cargo bench -p tests --bench metrics_scrape
//!
//! `HALO_BENCH_SMOKE=1` (tests/bench-smoke.sh): one second per
//! measurement, scraped every 200 ms, no exporter.

use proto::v1;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::cluster::{AgentNode, endpoint, tiny_controller};
use tests::free_port;

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(close) = text.rfind(')') else {
        return 0;
    };
    let f: Vec<&str> = text[close + 1..].split_whitespace().collect();
    let field = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    field(11) + field(12)
}

/// `VmRSS` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// A `/metrics` scrape: the body's length, or 0 when it failed.
fn scrape(url: &str) -> usize {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    agent
        .get(url)
        .call()
        .ok()
        .and_then(|mut r| r.body_mut().read_to_string().ok())
        .map_or(0, |s| s.len())
}

/// CPU (% of one core) and RSS (MiB) of `pid` over `secs`, scraping `url`
/// every `period` when given: (cpu, rss, bytes of the last scrape).
fn measure(pid: u32, secs: u64, scraped: Option<(&str, Duration)>) -> (f64, f64, usize) {
    let t0 = cpu_ticks(pid);
    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut size = 0;
    while Instant::now() < end {
        match scraped {
            Some((url, period)) => {
                size = scrape(url);
                std::thread::sleep(period.min(end.saturating_duration_since(Instant::now())));
            }
            None => std::thread::sleep(end.saturating_duration_since(Instant::now())),
        }
    }
    let ticks = cpu_ticks(pid).saturating_sub(t0);
    // CLK_TCK is 100 on Linux x86-64.
    let cpu = ticks as f64 / 100.0 / start.elapsed().as_secs_f64() * 100.0;
    (cpu, rss_kib(pid) as f64 / 1024.0, size)
}

fn report(name: &str, secs: u64, (cpu, rss, size): (f64, f64, usize)) -> f64 {
    let body = if size > 0 {
        format!("   /metrics {size} bytes")
    } else {
        String::new()
    };
    println!("{name:<46} cpu {cpu:>6.3} % of a core over {secs} s   rss {rss:>6.2} MiB{body}");
    cpu
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let smoke = tests::smoke();
    let secs: u64 = std::env::var("HALO_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if smoke { 1 } else { 30 });
    let period = if smoke {
        Duration::from_millis(200)
    } else {
        Duration::from_secs(5)
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = [
        AgentNode::new(dir.path(), "halo1", &["speed"], 2),
        AgentNode::new(dir.path(), "halo2", &["speed"], 2),
    ];
    let mut agent_url = String::new();
    for n in &mut nodes {
        agent::gguf::fixtures::write_tiny_llama(&n.models.join("tiny.gguf"), 7)
            .expect("tiny model");
        let port = free_port();
        n.extra_args = vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")];
        if agent_url.is_empty() {
            agent_url = format!("http://127.0.0.1:{port}/metrics");
        }
        n.start();
    }
    let ctl_port = free_port();
    let ctl_listen = format!("127.0.0.1:{ctl_port}");
    let mut ctl = tiny_controller(dir.path(), &nodes, &["--metrics-listen", &ctl_listen]);
    let mut c = ctl.start_and_wait(&["halo1", "halo2"]).await;
    let r = c
        .place(v1::PlaceRequest {
            role: "speed".into(),
            model: "tiny".into(),
            node: "halo1".into(),
            replicas: 1,
            ..v1::PlaceRequest::default()
        })
        .await
        .expect("place")
        .into_inner();
    assert!(r.accepted, "{:?}", r.explanation);
    let ep = endpoint(&c, "tiny", Duration::from_secs(90))
        .await
        .expect("tiny never ready");
    tests::cluster::chat(&ep.base_url, &ep.api_key, "tiny").expect("chat");
    tokio::time::sleep(Duration::from_secs(if smoke { 0 } else { 3 })).await;

    let agent_pid = nodes[0].proc.as_ref().expect("agent").pid();
    let ctl_pid = ctl.pid();
    let ctl_url = format!("http://{ctl_listen}/metrics");
    let every = format!("scraped every {} ms", period.as_millis());
    tokio::task::block_in_place(|| {
        report(
            "halo-agent (1 instance), idle",
            secs,
            measure(agent_pid, secs, None),
        );
        let agent_cpu = report(
            &format!("halo-agent (1 instance), {every}"),
            secs,
            measure(agent_pid, secs, Some((&agent_url, period))),
        );
        report("halo-controller, idle", secs, measure(ctl_pid, secs, None));
        report(
            &format!("halo-controller, {every}"),
            secs,
            measure(ctl_pid, secs, Some((&ctl_url, period))),
        );
        let exporter = Path::new("/usr/bin/prometheus-node-exporter");
        if smoke {
            println!("smoke run: prometheus-node-exporter not measured");
        } else if exporter.is_file() {
            let port = free_port();
            let mut child = Command::new(exporter)
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("node exporter");
            std::thread::sleep(Duration::from_secs(3));
            let url = format!("http://127.0.0.1:{port}/metrics");
            report(
                "prometheus-node-exporter, idle",
                secs,
                measure(child.id(), secs, None),
            );
            let ne_cpu = report(
                &format!("prometheus-node-exporter, {every}"),
                secs,
                measure(child.id(), secs, Some((&url, period))),
            );
            if ne_cpu > 0.0 {
                println!(
                    "agent CPU when scraped / node_exporter's: {:.2}",
                    agent_cpu / ne_cpu
                );
            }
            let _ = child.kill();
            let _ = child.wait();
        } else {
            println!(
                "prometheus-node-exporter not installed (apt-get install prometheus-node-exporter)"
            );
        }
    });
    drop(ctl);
}
