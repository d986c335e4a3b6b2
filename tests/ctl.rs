//! `haloctl` as a user runs it: a process, its stdout, stderr and exit code.

use agent::gguf::fixtures::{self, SparseModel, VocabStyle};
use std::path::Path;
use std::process::{Command, Output};
use tests::text;

fn haloctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_haloctl-shim"))
        .args(args)
        .env_remove("HALO_PROBE_ROOT")
        .output()
        .expect("run haloctl")
}

fn sparse(dir: &Path, kind: SparseModel) -> String {
    let path = dir.join(kind.spec().file_name);
    fixtures::write_sparse_with(kind, &path, VocabStyle::SizeOnly).expect("fixture");
    path.display().to_string()
}

#[test]
fn plan_says_deepseek_v3_1_1bit_fits_no_128_gib_node_at_any_context() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ds = sparse(dir.path(), SparseModel::DeepSeekV31);
    let out = haloctl(&["plan", &ds, "--memory", "128"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("deepseek2"), "{stdout}");
    assert!(stdout.contains("fits in 128.0 GiB?"), "{stdout}");
    assert!(!stdout.contains("yes,"), "{stdout}");
    assert!(
        stdout.contains("Does not fit at any context: the weights alone (158.4 GiB) exceed 128.0 GiB by 30.4 GiB"),
        "{stdout}"
    );

    let json = haloctl(&[
        "plan", &ds, "--memory", "128", "--ctx", "16384", "-o", "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    let row = &v["rows"][0];
    assert_eq!(row["ctx"], 16384);
    assert_eq!(row["fits"], false);
    let sum = ["weights_bytes", "kv_bytes", "compute_bytes"]
        .iter()
        .map(|k| row[k].as_u64().expect(k))
        .sum::<u64>();
    assert_eq!(row["total_bytes"].as_u64(), Some(sum));
    assert_eq!(v["budget_bytes"].as_u64(), Some(128 << 30));
}

#[test]
fn plan_finds_the_largest_context_and_what_a_quantized_cache_buys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let qc = sparse(dir.path(), SparseModel::Qwen3Coder30B);
    let out = haloctl(&["plan", &qc, "--memory", "40"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("Largest context that fits with f16/f16 KV cache"),
        "{stdout}"
    );
    assert!(
        stdout.contains("--cache-type-k q8_0 --cache-type-v q8_0"),
        "{stdout}"
    );

    // With q8_0 already chosen, q8_0 is not offered again.
    let out = haloctl(&[
        "plan",
        &qc,
        "--memory",
        "40",
        "--cache-type-k",
        "q8_0",
        "--cache-type-v",
        "q8_0",
    ]);
    assert!(!text(&out.stdout).contains("--cache-type-k q8_0"));
}

/// Qwen3-Next holds KV only in its 12 full-attention layers; the 36 gated
/// delta-net layers keep a fixed state. `plan` at 128K agrees with what
/// llama.cpp projects for the same file (3,147 MiB), not the 12,288 MiB that
/// every layer as attention would be.
#[test]
fn plan_of_qwen3_next_counts_kv_only_for_its_attention_layers() {
    let dir = tempfile::tempdir().expect("tempdir");
    let qn = sparse(dir.path(), SparseModel::Qwen3Next80B);
    let out = haloctl(&[
        "plan", &qn, "--memory", "128", "--ctx", "131072", "-o", "json",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let row = &v["rows"][0];
    assert_eq!(row["ctx"], 131_072);
    assert_eq!(row["fits"], true);
    let kv_mib = row["kv_bytes"].as_u64().expect("kv_bytes") as f64 / (1u64 << 20) as f64;

    let theirs = tests::parity::run_fit_params(
        &tests::llama_bin("llama-fit-params"),
        Path::new(&qn),
        &controller::estimate::EstimateOptions::with_ctx(131_072),
    )
    .expect("llama-fit-params")
    .context_mib() as f64;
    assert!(
        (3100.0..3200.0).contains(&theirs),
        "llama.cpp's own figure moved: {theirs} MiB"
    );
    assert!(
        (kv_mib - theirs).abs() <= 0.02 * theirs,
        "haloctl plan says {kv_mib:.0} MiB of KV at 128K, llama.cpp {theirs} MiB"
    );
}

#[test]
fn plan_rejects_bad_input_with_a_clear_message_and_exit_code() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bad = dir.path().join("bad.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00\xff").expect("write");
    let out = haloctl(&["plan", &bad.display().to_string(), "--memory", "128"]);
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("bad.gguf: at byte 8"), "{err}");

    let out = haloctl(&["plan", "/no/such/model.gguf", "--memory", "128"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("/no/such/model.gguf"));

    let out = haloctl(&["plan", "x.gguf", "--cache-type-k", "q9"]);
    assert_eq!(out.status.code(), Some(2), "usage errors exit 2");
    assert!(
        text(&out.stderr).contains("q8_0"),
        "lists the valid choices"
    );
}

#[test]
fn memory_reads_the_strix_halo_fixture_as_one_unified_pool() {
    let root = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/probe/strix-halo-128g"
    );
    let out = haloctl(&["memory", "--root", root, "-o", "json"]);
    assert_eq!(out.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["unified_memory"], true);
    assert_eq!(v["usable_bytes"].as_u64(), Some(129_385_889_792));
}

#[test]
fn memory_with_a_root_that_is_no_machine_exits_1_saying_so() {
    let out = haloctl(&["memory", "--root", "/nonexistent"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("/nonexistent has no proc/meminfo"), "{err}");
    assert!(text(&out.stdout).is_empty(), "no table of unknowns");
}

#[test]
fn fixture_write_says_how_little_disk_a_sparse_model_uses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("ds.gguf");
    let p = path.display().to_string();
    let out = haloctl(&["fixture", "write", "deepseek-v3.1-1bit", &p]);
    assert!(out.status.success(), "{out:?}");
    let said = text(&out.stdout);
    assert!(
        said.contains("158.4 GiB") && said.contains("on disk: a sparse file"),
        "{said}"
    );
}
