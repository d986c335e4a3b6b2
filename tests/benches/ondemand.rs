//! Time to first token of a request for an on-demand model that is not
//! loaded: through halo (the gateway asks the controller, which places it;
//! the agent starts llama-server; the request waits and is answered) next
//! to the same load by hand (llama-server started the moment the request
//! comes, polled every 2 ms until it answers `/health`, then the same
//! request straight to it). Both sides alternate in one run on the tiny
//! model; halo's own time is the difference. Printed, not asserted.
//!
//!     cargo bench -p tests --bench ondemand
//!
//! `HALO_BENCH_SMOKE=1`: one round.

use proto::v1;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::cluster::{AgentNode, ControllerProc, catalog_controller, connect, eventually};
use tests::front::{create_key, haloctl, workstation_gateway};
use tests::{free_port, text};

const CATALOG: &str = r#"
[[models]]
name = "tiny"
model_id = "tiny.gguf"
default_context = 256
min_context = 256
modes = ["code"]
on_demand = true
role = "speed"
idle_unload_secs = 3600
min_resident_secs = 1
"#;

const BODY: &str = r#"{"model":"code","stream":true,"max_tokens":4,"messages":[{"role":"user","content":"Hello"}]}"#;

/// Sends a streaming chat on a new connection; the time to the first
/// `data:` line, or why not.
fn first_token(addr: &str, key: Option<&str>) -> Result<Duration, String> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(120))).ok();
    let auth = key
        .map(|k| format!("Authorization: Bearer {k}\r\n"))
        .unwrap_or_default();
    let req = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!(
                "closed before a token: {}",
                String::from_utf8_lossy(&seen)
            ));
        }
        seen.extend_from_slice(&buf[..n]);
        let got = String::from_utf8_lossy(&seen);
        // The first event with content (not the gateway's `: waiting` notes).
        if got.contains("data: {") {
            return Ok(t.elapsed());
        }
        if got.starts_with("HTTP/1.1 4") || got.starts_with("HTTP/1.1 5") {
            return Err(got.into_owned());
        }
    }
}

/// The same load by hand: start llama-server now, poll `/health` every
/// 2 ms, send the request: (load time, time to first token from start).
fn by_hand(model: &Path) -> (Duration, Duration) {
    let port = free_port();
    let bin = tests::llama_bin("llama-server");
    let t = Instant::now();
    let mut child = Command::new(&bin)
        .args(["-m", &model.display().to_string(), "-c", "256", "-np", "1"])
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .env("LD_LIBRARY_PATH", bin.parent().expect("dir"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("llama-server");
    let addr = format!("127.0.0.1:{port}");
    loop {
        if tests::http_status(&format!("http://{addr}/health")) == Some(200) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "llama-server never became ready"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    let loaded = t.elapsed();
    first_token(&addr, None).expect("direct first token");
    let total = t.elapsed();
    let _ = child.kill();
    let _ = child.wait();
    (loaded, total)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn unloaded(c: &ControllerProc, home: &Path) {
    let mut client = connect(&c.url()).await;
    let placed = client
        .list_placements(v1::ListPlacementsRequest {})
        .await
        .expect("placements")
        .into_inner()
        .placements;
    if placed.iter().any(|p| p.name == "tiny") {
        let o = haloctl(c, home)
            .args(["unplace", "tiny"])
            .output()
            .expect("unplace");
        assert!(o.status.success(), "{}", text(&o.stderr));
    }
    // Gone: no live instance, and the gateway's table without it.
    eventually(Duration::from_secs(30), || {
        let mut client = client.clone();
        async move {
            let live = tests::cluster::live_instances(&mut client).await;
            live.is_empty().then_some(())
        }
    })
    .await
    .expect("the instance never stopped");
    tokio::time::sleep(Duration::from_millis(1200)).await;
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds = if tests::smoke() { 1 } else { 10 };
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path();
    let mut node = AgentNode::new(home, "halo1", &["speed"], 2);
    let model = node.models.join("tiny.gguf");
    agent::gguf::fixtures::write_tiny_llama(&model, 7).expect("tiny");
    node.start();
    let mut ctl = catalog_controller(home, std::slice::from_ref(&node), CATALOG, &[]);
    ctl.start_and_wait(&["halo1"]).await;
    let key = create_key(&ctl, home, "bench", &[]);
    let gw = workstation_gateway(home, &ctl, &[]);
    let gw_addr = gw.url.trim_start_matches("http://").to_owned();
    // The gateway has its table (and the key) before the first round.
    eventually(Duration::from_secs(20), || {
        let ok = tests::http_status(&format!("{}/health", gw.url)) == Some(200);
        async move { ok.then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    let (mut halo, mut loads, mut hand) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        unloaded(&ctl, home).await;
        let (a, k) = (gw_addr.clone(), key.clone());
        let through = tokio::task::spawn_blocking(move || first_token(&a, Some(&k)))
            .await
            .expect("thread")
            .expect("a first token through the gateway");
        let m = model.clone();
        let (load, total) = tokio::task::spawn_blocking(move || by_hand(&m))
            .await
            .expect("thread");
        println!(
            "round {round}: through halo {:.0} ms; by hand: load {:.0} ms, first token {:.0} ms",
            ms(through),
            ms(load),
            ms(total)
        );
        halo.push(ms(through));
        loads.push(ms(load));
        hand.push(ms(total));
    }
    let (h, l, d) = (median(halo), median(loads), median(hand));
    println!();
    println!(
        "time to first token of a request for an unloaded on-demand model (median of {rounds}):"
    );
    println!("  llama-server load by hand (spawn to /health 200): {l:.0} ms");
    println!("  by hand, spawn to first token:                    {d:.0} ms");
    println!("  through halo (gateway, controller, agent):        {h:.0} ms");
    println!(
        "  halo's own time: {:.0} ms (target: at most 200 ms); ratio {:.2}",
        h - d,
        h / d
    );
    drop(gw);
    drop(node);
}
