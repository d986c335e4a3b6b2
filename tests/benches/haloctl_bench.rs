//! `haloctl bench` against `llama-bench` on the tiny model, on this
//! machine, with the thread count llama-server chose (printed, not
//! asserted: these numbers are recorded, not targets): prompt processing
//! and generation tokens/s at depths 0 and 64, one stream, from halo's
//! table (medians and best runs) and from llama-bench (mean and best of
//! its repetitions), with the ratios halo / llama-bench.
//!
//!     cargo bench -p tests --bench haloctl_bench
//!
//! `HALO_BENCH_SMOKE=1`: one run each, 16 prompt and 8 generated tokens.

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use tests::cluster::{tiny_controller, tiny_speed_pair};
use tests::{bin, llama_bin, text, wait_for};

fn haloctl(env: &[(&'static str, String)], home: &Path, args: &[&str]) -> String {
    let o = Command::new(bin("haloctl-shim"))
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .envs(env.iter().cloned())
        .args(args)
        .output()
        .expect("run haloctl");
    assert!(
        o.status.success(),
        "haloctl {args:?}: {}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    text(&o.stdout)
}

fn main() {
    let smoke = tests::smoke();
    let (prompt, gen_tokens, runs) = if smoke { (16, 8, 1) } else { (128, 64, 10) };
    let dir = tempfile::tempdir().expect("tempdir");
    let home = tempfile::tempdir().expect("home");
    let nodes = tiny_speed_pair(dir.path(), 2);
    let mut ctl = tiny_controller(dir.path(), &nodes, &["--requeue-ms", "300"]);
    ctl.start();
    let env = ctl.haloctl_env();
    let ready = wait_for(Duration::from_secs(20), || {
        let v: serde_json::Value =
            serde_json::from_str(&haloctl(&env, home.path(), &["nodes", "-o", "json"])).ok()?;
        (v[0]["status"] == "ready").then_some(())
    });
    assert!(ready.is_some(), "nodes not ready:\n{}", ctl.logs());
    haloctl(
        &env,
        home.path(),
        &["place", "speed", "tiny", "--timeout", "120"],
    );
    let log = haloctl(&env, home.path(), &["logs", "tiny", "-n", "400"]);
    let threads: u32 = log
        .split("n_threads = ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .expect("n_threads in llama-server's log");

    let (p, g, r) = (prompt.to_string(), gen_tokens.to_string(), runs.to_string());
    let out = haloctl(
        &env,
        home.path(),
        &[
            "bench",
            "tiny",
            "--depth",
            "0,64",
            "--prompt-tokens",
            &p,
            "--gen-tokens",
            &g,
            "--runs",
            &r,
            "--no-store",
            "-o",
            "json",
            "--yes",
        ],
    );
    let halo: serde_json::Value = serde_json::from_str(&out).expect("bench JSON");
    let model = nodes[0].models.join("tiny.gguf");
    let lb = Command::new(llama_bin("llama-bench"))
        .arg("-m")
        .arg(&model)
        .args(["-t", &threads.to_string(), "-p", &p, "-n", &g, "-d", "0,64"])
        .args(["-r", &r, "-o", "json"])
        .output()
        .expect("run llama-bench");
    assert!(lb.status.success(), "llama-bench: {}", text(&lb.stderr));
    let lb: serde_json::Value = serde_json::from_slice(&lb.stdout).expect("llama-bench JSON");

    println!(
        "tiny model, {threads} threads, {prompt} prompt / {gen_tokens} generated tokens, {runs} runs"
    );
    println!(
        "{:<6} {:<3} {:>12} {:>12} {:>12} {:>12} {:>8} {:>8}",
        "DEPTH", "", "HALO MEDIAN", "HALO BEST", "LB MEAN", "LB BEST", "MEDIAN", "BEST"
    );
    for point in halo[0]["points"].as_array().expect("points") {
        let depth = point["depth"].as_u64().expect("depth");
        for (what, field, is_pp) in [
            ("pp", "pp_tokens_per_second", true),
            ("tg", "tg_tokens_per_second", false),
        ] {
            let test = lb
                .as_array()
                .and_then(|a| {
                    a.iter().find(|t| {
                        t["n_depth"].as_u64() == Some(depth)
                            && (t["n_gen"] == 0) == is_pp
                            && (t["n_prompt"] == 0) != is_pp
                    })
                })
                .expect("the llama-bench test");
            let mean = test["avg_ts"].as_f64().expect("avg_ts");
            let best = test["samples_ts"]
                .as_array()
                .map(|s| {
                    s.iter()
                        .filter_map(serde_json::Value::as_f64)
                        .fold(0.0, f64::max)
                })
                .expect("samples_ts");
            let hm = point[field]["median"].as_f64().expect("median");
            let hb = point[field]["max"].as_f64().expect("max");
            println!(
                "{depth:<6} {what:<3} {hm:>12.0} {hb:>12.0} {mean:>12.0} {best:>12.0} {:>8.2} {:>8.2}",
                hm / mean,
                hb / best
            );
        }
    }
}
