//! The tiny model split across two agents with llama.cpp RPC, against the
//! same model on one node, on loopback, with real processes (printed, not
//! asserted: these numbers are recorded, not targets). Five rounds each:
//! time from `place` to an answering endpoint, and generation speed
//! (llama-server's own `predicted_per_second` over 64 tokens, median of
//! five requests).
//!
//!     cargo bench -p tests --bench split
//!
//! `HALO_BENCH_SMOKE=1`: one round each, one 8-token request.

use proto::v1;
use std::time::{Duration, Instant};
use tests::cluster::{Client, endpoint, eventually, tiny_controller, tiny_speed_pair};

/// How much to run: rounds per layout, completions per round and tokens
/// per completion.
#[derive(Clone, Copy)]
struct Size {
    rounds: usize,
    requests: usize,
    tokens: u32,
}

fn size() -> Size {
    if tests::smoke() {
        Size {
            rounds: 1,
            requests: 1,
            tokens: 8,
        }
    } else {
        Size {
            rounds: 5,
            requests: 5,
            tokens: 64,
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Tokens per second of one `tokens`-token completion, as llama-server
/// times it.
fn tokens_per_second(ep: &v1::Endpoint, tokens: u32) -> f64 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let body = serde_json::json!({
        "prompt": "The quick brown fox",
        "n_predict": tokens,
        "ignore_eos": true,
        "cache_prompt": false,
    });
    let mut resp = agent
        .post(&format!("{}/completion", ep.base_url))
        .header("Authorization", &format!("Bearer {}", ep.api_key))
        .send_json(&body)
        .expect("completion");
    let v: serde_json::Value = resp.body_mut().read_json().expect("json");
    v["timings"]["predicted_per_second"]
        .as_f64()
        .expect("timings.predicted_per_second")
}

async fn round(c: &mut Client, split: bool, size: Size) -> (f64, f64) {
    let t0 = Instant::now();
    let r = c
        .place(v1::PlaceRequest {
            role: "speed".into(),
            model: "tiny".into(),
            split_across: if split { 2 } else { 0 },
            ..v1::PlaceRequest::default()
        })
        .await
        .expect("place")
        .into_inner();
    assert!(r.accepted, "{:?}", r.explanation);
    let ep = endpoint(c, "tiny", Duration::from_secs(120))
        .await
        .expect("an endpoint for tiny");
    let ready_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let tps = tokio::task::spawn_blocking(move || {
        median(
            (0..size.requests)
                .map(|_| tokens_per_second(&ep, size.tokens))
                .collect(),
        )
    })
    .await
    .expect("join");
    c.unplace(v1::UnplaceRequest {
        name: "tiny".into(),
    })
    .await
    .expect("unplace");
    // Wait until the endpoint is gone before the next round.
    eventually(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move {
            let eps = c
                .endpoints(v1::EndpointsRequest {})
                .await
                .ok()?
                .into_inner();
            eps.endpoints
                .iter()
                .all(|e| e.placement != "tiny")
                .then_some(())
        }
    })
    .await
    .expect("unplaced");
    tokio::time::sleep(Duration::from_millis(500)).await;
    (ready_ms, tps)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let size = size();
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = tiny_speed_pair(dir.path(), 6);
    let mut ctl = tiny_controller(dir.path(), &nodes, &["--requeue-ms", "300"]);
    let mut c = ctl.start_and_wait(&["halo1", "halo2"]).await;
    let mut rows = Vec::new();
    for split in [false, true] {
        let mut ready = Vec::new();
        let mut tps = Vec::new();
        for _ in 0..size.rounds {
            let (r, t) = round(&mut c, split, size).await;
            eprintln!("split={split}: ready after {r:.0} ms, {t:.1} tokens/s");
            ready.push(r);
            tps.push(t);
        }
        rows.push((split, median(ready), median(tps)));
    }
    println!(
        "tiny model on loopback, {} rounds each (medians)",
        size.rounds
    );
    println!("{:<28} {:>16} {:>14}", "", "place->ready ms", "tokens/s");
    for (split, ready, tps) in &rows {
        let what = if *split {
            "split over 2 agents (RPC)"
        } else {
            "one node"
        };
        println!("{what:<28} {ready:>16.0} {tps:>14.1}");
    }
    if let [(_, r1, t1), (_, r2, t2)] = rows.as_slice() {
        println!(
            "split / one node: place->ready x{:.2}, tokens/s x{:.2}",
            r2 / r1,
            t2 / t1
        );
    }
    drop(nodes);
}
