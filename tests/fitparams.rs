//! Every sparse fixture is a model llama.cpp accepts: `llama-fit-params`
//! loads its header (never the hole where the weights would be), prints its
//! memory projection, and reads the same hyper-parameters halo's own GGUF
//! reader reports.

use agent::gguf::{self, fixtures};
use proto::domain::ModelParams;
use std::collections::HashMap;
use std::process::Command;
use tests::llama_bin;

/// `print_info: key = value` lines of llama.cpp's verbose load log.
fn print_info(log: &str) -> HashMap<String, String> {
    log.lines()
        .filter_map(|l| l.split_once("print_info: ")?.1.split_once(" = "))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// A scalar, or a per-layer `[a, b, …]` list, as numbers.
fn numbers(v: &str) -> Vec<u64> {
    v.trim_matches(|c| c == '[' || c == ']')
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// Per-layer values as llama.cpp prints them: one number when all are equal.
fn per_layer(v: &[u32]) -> Vec<u64> {
    let first = v.first().copied().unwrap_or(0);
    if v.iter().all(|x| *x == first) {
        vec![u64::from(first)]
    } else {
        v.iter().map(|x| u64::from(*x)).collect()
    }
}

fn check_against_llama(name: &str, p: &ModelParams, info: &HashMap<String, String>) {
    let get = |k: &str| -> Vec<u64> {
        numbers(
            info.get(k)
                .unwrap_or_else(|| panic!("{name}: llama.cpp printed no `{k}`")),
        )
    };
    assert_eq!(
        info.get("arch").map(String::as_str),
        Some(p.architecture.as_str()),
        "{name}"
    );
    assert_eq!(
        get("n_ctx_train"),
        [p.context_length],
        "{name}: n_ctx_train"
    );
    assert_eq!(get("n_embd"), [p.embedding_length], "{name}: n_embd");
    // n_layer is the trunk (hparams.n_layer() = n_layer_all - n_layer_nextn);
    // the NextN blocks are counted in n_layer_all.
    assert_eq!(
        get("n_layer"),
        [u64::from(p.block_count - p.nextn_predict_layers)],
        "{name}: n_layer"
    );
    assert_eq!(
        get("n_layer_all"),
        [u64::from(p.block_count)],
        "{name}: n_layer_all"
    );
    assert_eq!(get("n_head"), per_layer(&p.head_count), "{name}: n_head");
    assert_eq!(
        get("n_head_kv"),
        per_layer(&p.head_count_kv),
        "{name}: n_head_kv"
    );
    assert_eq!(
        get("n_embd_head_k"),
        [u64::from(p.key_length)],
        "{name}: head k"
    );
    assert_eq!(
        get("n_embd_head_v"),
        [u64::from(p.value_length)],
        "{name}: head v"
    );
    assert_eq!(get("n_vocab"), [p.vocab_size], "{name}: n_vocab");
    if p.expert_count > 0 {
        assert_eq!(
            get("n_expert"),
            [u64::from(p.expert_count)],
            "{name}: n_expert"
        );
        assert_eq!(
            get("n_expert_used"),
            [u64::from(p.expert_used_count)],
            "{name}"
        );
    }
    if p.sliding_window > 0 {
        assert_eq!(get("n_swa"), [u64::from(p.sliding_window)], "{name}: n_swa");
    }
    if p.kv_lora_rank > 0 {
        assert_eq!(
            get("n_lora_kv"),
            [u64::from(p.kv_lora_rank)],
            "{name}: n_lora_kv"
        );
    }
    if p.ssm_state_size > 0 {
        assert_eq!(get("ssm_d_state"), [u64::from(p.ssm_state_size)], "{name}");
        assert_eq!(get("ssm_d_inner"), [u64::from(p.ssm_inner_size)], "{name}");
        assert_eq!(get("ssm_n_group"), [u64::from(p.ssm_group_count)], "{name}");
    }
    // "model params = 671.03 B": two decimals of billions.
    let printed: f64 = info
        .get("model params")
        .and_then(|v| v.trim_end_matches(" B").trim_end_matches(" M").parse().ok())
        .unwrap_or(-1.0);
    let ours = p.parameter_count as f64 / 1e9;
    assert!(
        (printed - ours).abs() < 0.006,
        "{name}: params {printed} B vs {ours} B"
    );
}

#[test]
fn llama_fit_params_accepts_every_sparse_fixture_and_reads_the_same_hyper_parameters() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = llama_bin("llama-fit-params");
    for kind in fixtures::SparseModel::ALL {
        let spec = kind.spec();
        let path = dir.path().join(spec.file_name);
        fixtures::write_sparse_with(kind, &path, fixtures::VocabStyle::SizeOnly)
            .expect("write fixture");
        let model = gguf::read_model(&path).expect("halo reads its own fixture");
        let params = gguf::model_params(&model).expect("params");

        let out = Command::new(&bin)
            .arg("-m")
            .arg(&path)
            .args(["-c", "4096", "--fit-print", "on", "-v"])
            .output()
            .expect("run llama-fit-params");
        let log = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}: llama-fit-params failed:\n{log}",
            spec.name
        );
        let host = String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| l.strip_prefix("Host ").map(str::to_owned))
            .unwrap_or_else(|| panic!("{}: no `Host` projection line:\n{log}", spec.name));
        assert_eq!(host.split_whitespace().count(), 3, "{}: {host}", spec.name);
        check_against_llama(spec.name, &params, &print_info(&log));
    }
}
