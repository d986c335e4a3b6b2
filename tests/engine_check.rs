//! The formula checked against llama.cpp's own projection, with real
//! processes: two agents, a controller, haloctl, and each agent's
//! `llama-fit-params` (halo1's beside its llama-server; halo2's configured
//! at a path where there is none). halo1 holds the sparse Llama-3.1-8B (a
//! family halo has rules for), LFM2-1.2B and RWKV7-1.5B (two it has none
//! for: the generic rules happen to fit the first and miss the second's
//! per-slot recurrent state); halo2 holds GPT-OSS-20B.

use agent::gguf::fixtures::{self, SparseModel, VocabStyle};
use serde_json::Value;
use std::path::Path;
use std::process::Output;
use std::time::Duration;
use tests::cluster::{AgentNode, ControllerProc, catalog_controller};
use tests::front::haloctl;
use tests::{text, wait_for};

const CATALOG: &str = r#"
[[models]]
name = "llama-3.1-8b"
model_id = "llama-8b.gguf"
default_context = 8192
min_context = 4096

[[models]]
name = "lfm2-1.2b"
model_id = "lfm2.gguf"
default_context = 8192
min_context = 4096

[[models]]
name = "rwkv7-1.5b"
model_id = "rwkv7.gguf"
default_context = 8192
min_context = 4096
parallel = 8

[[models]]
name = "gpt-oss-20b"
model_id = "gpt-oss-20b.gguf"
default_context = 8192
min_context = 4096
"#;

/// Where halo2's agent is told its llama-fit-params is.
const MISSING: &str = "/nonexistent/llama-fit-params";

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

fn run(c: &ControllerProc, home: &Path, args: &[&str]) -> Output {
    haloctl(c, home).args(args).output().expect("run haloctl")
}

fn json(o: &Output) -> Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", show(o)))
}

fn notes(row: &Value) -> Vec<String> {
    row["estimate_notes"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// `haloctl plan MODEL --ctx 8192 -o json`'s row for `node`, once its
/// node's llama.cpp check has answered (plan waits a few seconds for it;
/// on a busy machine a later plan shows it).
fn checked_row(c: &ControllerProc, home: &Path, model: &str, node: &str) -> Value {
    let row = wait_for(Duration::from_secs(90), || {
        let o = run(c, home, &["plan", model, "--ctx", "8192", "-o", "json"]);
        let rows = json(&o);
        let row = rows.as_array()?.iter().find(|r| r["node"] == node)?.clone();
        (!notes(&row).iter().any(|n| n.contains("still running"))).then_some(row)
    });
    row.unwrap_or_else(|| panic!("no checked plan row of {model} on {node}\n{}", c.logs()))
}

fn events(c: &ControllerProc, home: &Path) -> Vec<Value> {
    let o = run(c, home, &["events", "-o", "json"]);
    assert!(o.status.success(), "{}", show(&o));
    text(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn within_two_percent(a: u64, b: u64) -> bool {
    a.abs_diff(b) as f64 <= b as f64 * 0.02
}

/// One cluster for the three checks (each a full set of processes costs a
/// minute of a two-core machine).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_checks_its_estimate_against_each_nodes_llama_fit_params() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path();
    let mut halo1 = AgentNode::new(home, "halo1", &["speed"], 2);
    let mut halo2 = AgentNode::new(home, "halo2", &["reasoning"], 2);
    halo2.extra_args = vec!["--fit-params-bin".into(), MISSING.into()];
    for (node, kind, file) in [
        (&halo1, SparseModel::Llama31_8B, "llama-8b.gguf"),
        (&halo1, SparseModel::Lfm2_1_2B, "lfm2.gguf"),
        (&halo1, SparseModel::Rwkv7_1_5B, "rwkv7.gguf"),
        (&halo2, SparseModel::GptOss20B, "gpt-oss-20b.gguf"),
    ] {
        fixtures::write_sparse_with(kind, &node.models.join(file), VocabStyle::SizeOnly)
            .expect("sparse fixture");
    }
    halo1.start();
    halo2.start();
    let nodes = [halo1, halo2];
    let mut c = catalog_controller(home, &nodes, CATALOG, &[]);
    let _client = c.start_and_wait(&["halo1", "halo2"]).await;

    // (c) A family halo has rules for: llama.cpp confirms the formula.
    let row = checked_row(&c, home, "llama-3.1-8b", "halo1");
    let n = notes(&row);
    assert!(
        n.iter()
            .any(|n| n.starts_with("formula confirmed by llama.cpp's projection on halo1")),
        "{row:#}"
    );
    assert!(!n.iter().any(|n| n.contains("generic rules")), "{row:#}");
    assert_eq!(row["estimate_used"], "formula", "{row:#}");
    let formula = row["formula_total_bytes"].as_u64().expect("formula");
    let engine = row["engine_total_bytes"].as_u64().expect("engine figure");
    assert!(within_two_percent(formula, engine), "{row:#}");
    assert_eq!(row["total_bytes"].as_u64(), Some(formula), "{row:#}");
    let table = run(&c, home, &["plan", "llama-3.1-8b", "--ctx", "8192"]);
    let out = text(&table.stdout);
    assert!(
        out.contains("LLAMA.CPP") && out.contains("halo1 at 8192: formula confirmed"),
        "{}",
        show(&table)
    );

    // (a) Architectures halo has no rules for: named, never silently
    // guessed, llama.cpp's figure shown beside the formula's. LFM2's
    // generic estimate agrees with llama.cpp: confirmed, no event.
    let row = checked_row(&c, home, "lfm2-1.2b", "halo1");
    let n = notes(&row);
    assert!(
        n.iter().any(|n| n == "estimate: generic rules for lfm2"),
        "{row:#}"
    );
    assert!(
        n.iter()
            .any(|n| n.starts_with("formula confirmed by llama.cpp's projection on halo1")),
        "{row:#}"
    );
    assert_eq!(row["estimate_used"], "formula", "{row:#}");
    assert!(row["engine_total_bytes"].as_u64().is_some(), "{row:#}");
    let table = run(&c, home, &["plan", "lfm2-1.2b", "--ctx", "8192"]);
    assert!(
        text(&table.stdout).contains("estimate: generic rules for lfm2"),
        "{}",
        show(&table)
    );
    let place = run(
        &c,
        home,
        &["place", "speed", "lfm2-1.2b", "--dry-run", "-o", "json"],
    );
    let d = json(&place);
    assert_eq!(d["accepted"], true, "{}", show(&place));
    let explanation = d["explanation"].to_string();
    assert!(
        explanation.contains("estimate: generic rules for lfm2")
            && explanation.contains("formula confirmed by llama.cpp's projection on halo1"),
        "{explanation}"
    );

    // RWKV7 holds a recurrent state per slot that the generic rules leave
    // out (8 slots): llama.cpp's figure is used, the KV bucket named, and
    // an event records the disagreement.
    let row = checked_row(&c, home, "rwkv7-1.5b", "halo1");
    let n = notes(&row);
    assert!(
        n.iter().any(|n| n == "estimate: generic rules for rwkv7"),
        "{row:#}"
    );
    let formula = row["formula_total_bytes"].as_u64().expect("formula");
    let engine = row["engine_total_bytes"].as_u64().expect("engine figure");
    assert!(
        engine > formula && !within_two_percent(formula, engine),
        "{row:#}"
    );
    assert_eq!(row["estimate_used"], "engine", "{row:#}");
    assert_eq!(row["total_bytes"].as_u64(), Some(engine), "{row:#}");
    let disagreement = n
        .iter()
        .find(|n| n.contains("disagree"))
        .unwrap_or_else(|| panic!("{row:#}"));
    assert!(
        disagreement.contains("on halo1")
            && disagreement.contains("KV cache: formula 0 B, llama.cpp")
            && disagreement.ends_with("using llama.cpp's figures"),
        "{disagreement}"
    );
    let rwkv_events: Vec<Value> = events(&c, home)
        .into_iter()
        .filter(|e| e["kind"] == "estimate_disagrees" && e["subject"] == "rwkv7.gguf")
        .collect();
    assert_eq!(rwkv_events.len(), 1, "{rwkv_events:#?}");
    let msg = rwkv_events[0]["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains("`rwkv7.gguf` (rwkv7) on halo1") && msg.contains("KV cache: formula"),
        "{msg}"
    );
    let table = run(&c, home, &["plan", "rwkv7-1.5b", "--ctx", "8192"]);
    let out = text(&table.stdout);
    assert!(
        out.contains("estimate: generic rules for rwkv7") && out.contains("  engine  "),
        "{}",
        show(&table)
    );
    let place = run(
        &c,
        home,
        &["place", "speed", "rwkv7-1.5b", "--dry-run", "-o", "json"],
    );
    let d = json(&place);
    assert_eq!(d["accepted"], true, "{}", show(&place));
    assert_eq!(
        d["estimate"]["total_bytes"].as_u64(),
        Some(engine),
        "{}",
        show(&place)
    );
    let explanation = d["explanation"].to_string();
    assert!(
        explanation.contains("estimate: generic rules for rwkv7")
            && explanation.contains("llama.cpp on halo1"),
        "{explanation}"
    );

    // (b) A node without llama-fit-params: placement works on the formula
    // and says why there is no check.
    let row = checked_row(&c, home, "gpt-oss-20b", "halo2");
    let unavailable = format!(
        "engine check unavailable on halo2: llama-fit-params not found at {MISSING}; using the formula"
    );
    assert!(notes(&row).contains(&unavailable), "{row:#}");
    assert_eq!(row["estimate_used"], "formula", "{row:#}");
    assert!(row["engine_total_bytes"].is_null(), "{row:#}");
    let place = run(
        &c,
        home,
        &[
            "place",
            "reasoning",
            "gpt-oss-20b",
            "--dry-run",
            "-o",
            "json",
        ],
    );
    let d = json(&place);
    assert_eq!(d["accepted"], true, "{}", show(&place));
    assert_eq!(d["nodes"], serde_json::json!(["halo2"]), "{}", show(&place));
    assert!(
        d["explanation"]
            .as_array()
            .is_some_and(|e| e.iter().any(|l| l == unavailable.as_str())),
        "{}",
        show(&place)
    );
    drop(nodes);
}

/// The agent's side alone: `ProjectMemory` runs llama.cpp's projection of
/// a model it lists, answers the same settings again from its cache, and
/// refuses a model it does not list; an agent without the tool says where
/// it looked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_projects_a_listed_model_and_answers_again_from_its_cache() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut with = AgentNode::new(dir.path(), "halo1", &["speed"], 1);
    let mut without = AgentNode::new(dir.path(), "halo2", &["speed"], 1);
    without.extra_args = vec!["--fit-params-bin".into(), MISSING.into()];
    for n in [&mut with, &mut without] {
        fixtures::write_sparse_with(
            SparseModel::Llama31_8B,
            &n.models.join("llama-8b.gguf"),
            VocabStyle::SizeOnly,
        )
        .expect("sparse fixture");
        n.start();
    }
    let ask = |ctx: u32, model: &str| proto::v1::ProjectMemoryRequest {
        model_id: model.into(),
        context_size: ctx,
        parallel: 1,
        ..proto::v1::ProjectMemoryRequest::default()
    };
    let mut a = tests::cluster::agent_client(&with).await;
    let first = a
        .project_memory(ask(8192, "llama-8b.gguf"))
        .await
        .expect("projection")
        .into_inner();
    assert!(first.unavailable.is_empty(), "{first:?}");
    assert!(!first.cached, "{first:?}");
    // One row per buffer type: the host's (KV cache 1 GiB at 8192) and the
    // CPU's repacked weights; the weights add up to the file's 4.6 GiB.
    let host = first.devices.iter().find(|d| d.name == "Host");
    assert!(
        host.is_some_and(|h| h.context_bytes == 1024 << 20),
        "{first:?}"
    );
    let weights: u64 = first.devices.iter().map(|d| d.weights_bytes).sum();
    assert!((4_500 << 20..4_800 << 20).contains(&weights), "{first:?}");
    let again = a
        .project_memory(ask(8192, "llama-8b.gguf"))
        .await
        .expect("projection")
        .into_inner();
    assert!(again.cached, "{again:?}");
    assert_eq!(again.devices, first.devices);
    let other = a
        .project_memory(ask(4096, "llama-8b.gguf"))
        .await
        .expect("projection")
        .into_inner();
    assert!(!other.cached, "{other:?}");
    assert!(
        other
            .devices
            .iter()
            .any(|d| d.name == "Host" && d.context_bytes == 512 << 20),
        "{other:?}"
    );
    let unknown = a
        .project_memory(ask(8192, "nothing-here.gguf"))
        .await
        .expect_err("unknown model");
    assert_eq!(unknown.code(), tonic::Code::NotFound, "{unknown:?}");

    let mut b = tests::cluster::agent_client(&without).await;
    let missing = b
        .project_memory(ask(8192, "llama-8b.gguf"))
        .await
        .expect("an answer")
        .into_inner();
    assert!(missing.devices.is_empty(), "{missing:?}");
    assert_eq!(
        missing.unavailable,
        format!("llama-fit-params not found at {MISSING}")
    );
}
