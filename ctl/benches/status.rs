//! Wall time of `haloctl status` (process start, connect, ListPlacements,
//! render) against a local controller holding 10 placements, and of
//! `haloctl nodes` and `status -o json` beside it.
//!
//!     cargo bench -p ctl --bench status
//!
//! The controller (embedded store) and one agent run in this process on
//! loopback; the placements are paused (memory held, no llama-server
//! started), so the bench needs no llama.cpp build. Both serve plaintext
//! on loopback (`--insecure-loopback-only`): the time measured is
//! haloctl's, not a TLS handshake's. Target: `haloctl status` under
//! 50 ms. Prints numbers; asserts nothing about time.
//! `HALO_BENCH_SMOKE=1`: 2 placements, one run of each command.

use proto::v1;
use proto::v1::controller_service_client::ControllerServiceClient;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

type Error = Box<dyn std::error::Error>;

fn free_port() -> Result<u16, Error> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Starts an agent and a controller in this process; returns the
/// controller's URL once both nodes are ready and `placements` exist.
async fn cluster(
    dir: &std::path::Path,
    stop: &CancellationToken,
    placements: usize,
) -> Result<String, Error> {
    use clap::Parser;
    let models = dir.join("models");
    std::fs::create_dir_all(&models)?;
    agent::gguf::fixtures::write_tiny_llama(&models.join("tiny.gguf"), 7)?;
    let args = agent::config::Args::try_parse_from([
        "halo-agent",
        "--node-name",
        "halo1",
        "--role",
        "speed",
        "--listen",
        "127.0.0.1:0",
        "--model-dir",
        &models.display().to_string(),
        "--state-dir",
        &dir.join("agent").display().to_string(),
        // Paused placements never start it; any executable will do.
        "--llama-server",
        "/bin/true",
        "--insecure-loopback-only",
    ])?;
    let agent =
        agent::daemon::Daemon::bind(agent::config::Config::resolve(args)?, stop.clone()).await?;
    let agent_addr = agent.local_addr()?;
    tokio::spawn(agent.run());

    std::fs::write(
        dir.join("catalog.toml"),
        "[[models]]\nname = \"tiny\"\nmodel_id = \"tiny.gguf\"\ndefault_context = 256\n\
         min_context = 256\nmodes = [\"code\"]\n",
    )?;
    let port = free_port()?;
    let args = controller::config::Args::try_parse_from([
        "halo-controller",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--store-path",
        &dir.join("state.json").display().to_string(),
        "--node",
        &format!("halo1={agent_addr}"),
        "--catalog",
        &dir.join("catalog.toml").display().to_string(),
        "--insecure-loopback-only",
    ])?;
    let config = controller::config::Config::resolve(args)?;
    tokio::spawn(controller::daemon::run(config, stop.clone()));
    let url = format!("http://127.0.0.1:{port}");

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut placed = 0;
    while placed < placements {
        if Instant::now() > deadline {
            return Err(format!("only {placed} placements after 30 s").into());
        }
        let Ok(mut c) = ControllerServiceClient::connect(url.clone()).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let r = c
            .place(v1::PlaceRequest {
                role: "speed".into(),
                model: "tiny".into(),
                name: format!("tiny-{placed}"),
                paused: true,
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) if r.get_ref().accepted => placed += 1,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    Ok(url)
}

fn time(haloctl: &str, url: &str, args: &[&str], runs: usize) -> Result<Vec<Duration>, Error> {
    let mut times = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let status = Command::new(haloctl)
            .arg("--controller")
            .arg(url)
            .args(args)
            .stdout(Stdio::null())
            .status()?;
        times.push(t.elapsed());
        if !status.success() {
            return Err(format!("haloctl {args:?} failed: {status}").into());
        }
    }
    times.sort();
    Ok(times)
}

/// Whether `HALO_BENCH_SMOKE=1` (tests/bench-smoke.sh): one short pass
/// that only shows the bench still runs.
fn smoke() -> bool {
    std::env::var_os("HALO_BENCH_SMOKE").is_some_and(|v| v == "1")
}

fn main() -> Result<(), Error> {
    let haloctl = env!("CARGO_BIN_EXE_haloctl");
    let dir = tempfile::tempdir()?;
    let rt = tokio::runtime::Runtime::new()?;
    let stop = CancellationToken::new();
    let (placements, runs) = if smoke() { (2, 1) } else { (10, 31) };
    let url = rt.block_on(cluster(dir.path(), &stop, placements))?;
    println!("haloctl against {url}: {placements} placements, 1 node, {runs} runs each");
    println!(
        "{:<22} {:>10} {:>10} {:>10}",
        "command", "min", "median", "p90"
    );
    for args in [&["status"][..], &["status", "-o", "json"], &["nodes"]] {
        let t = time(haloctl, &url, args, runs)?;
        let ms = |d: Duration| format!("{:.1} ms", d.as_secs_f64() * 1e3);
        println!(
            "{:<22} {:>10} {:>10} {:>10}",
            args.join(" "),
            ms(t[0]),
            ms(t[t.len() / 2]),
            ms(t[t.len() * 9 / 10])
        );
    }
    stop.cancel();
    rt.shutdown_timeout(Duration::from_secs(5));
    Ok(())
}
