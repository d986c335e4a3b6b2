//! halo's memory estimate agrees with llama.cpp: with its own projection
//! (for every sparse fixture architecture, at contexts 4096 … 131072 where
//! the model allows, with f16 and q8_0 caches, each of model / context /
//! compute is within 2 % or 16 MiB of what `llama-fit-params` prints;
//! `cargo bench -p tests --bench estimate_parity` prints the table), and
//! with real `llama-server` loads: captured logs (`agent/src/testdata/`),
//! read by the agent's parser as the agent reports them, against the formula.

use agent::gguf::{self, fixtures};
use agent::loadlog::parse_load_log;
use controller::estimate::{
    CacheType, Estimate, EstimateOptions, EstimateSource, FlashAttn, MIB, ObservedRecord, estimate,
    estimate_with_observed,
};
use proto::domain::{ModelParams, ObservedBuffers};
use tests::llama_bin;
use tests::parity::{ParityRow, Tolerance, run_fit_params};

#[test]
fn estimate_matches_llama_fit_params_for_every_fixture_context_and_cache_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = llama_bin("llama-fit-params");
    let mut rows = Vec::new();
    for kind in fixtures::SparseModel::ALL {
        let spec = kind.spec();
        let path = dir.path().join(spec.file_name);
        fixtures::write_sparse_with(kind, &path, fixtures::VocabStyle::SizeOnly)
            .expect("write fixture");
        let params = gguf::model_params(&gguf::read_model(&path).expect("read")).expect("params");
        let mut ctxs = vec![4096, 16_384, 32_768, 65_536];
        if params.context_length >= 131_072 {
            ctxs.push(131_072);
        } else if let Ok(trained) = u32::try_from(params.context_length)
            && trained > 0
            && !ctxs.contains(&trained)
        {
            // The trained context (Qwen3-32B: 40960).
            ctxs.push(trained);
        }
        for ctx in ctxs {
            for cache in [CacheType::F16, CacheType::Q8_0] {
                let opts = EstimateOptions::with_ctx(ctx).cache(cache);
                let theirs = run_fit_params(&bin, &path, &opts)
                    .unwrap_or_else(|e| panic!("{} ctx {ctx}: {e}", spec.name));
                let ours = estimate(&params, &opts);
                rows.push(ParityRow::new(
                    spec.name,
                    &opts,
                    &ours,
                    &theirs,
                    Tolerance::default(),
                ));
            }
        }
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.passes())
        .map(ToString::to_string)
        .collect();
    assert!(rows.len() >= 50, "only {} rows compared", rows.len());
    assert!(
        failed.is_empty(),
        "{} of {} rows off by more than 2 % or 16 MiB:\n{}\n{}",
        failed.len(),
        rows.len(),
        ParityRow::header(),
        failed.join("\n")
    );
}

/// Tied embeddings: llama.cpp's projection counts `token_embd` a second
/// time when the CPU repacks the output copy (Q4_K), once when it cannot
/// (the Gemma 3 fixture's Q6_K); the estimate agrees with both.
#[test]
fn a_tied_embedding_counts_twice_only_when_the_cpu_repacks_it() {
    use agent::gguf::write::{GgufWriter, TensorData};
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = llama_bin("llama-fit-params");
    let opts = EstimateOptions::with_ctx(4096);
    let q6 = fixtures::SparseModel::Gemma3_27B.writer(fixtures::VocabStyle::SizeOnly);
    let mut q4 = GgufWriter::new();
    for (k, v) in q6.metadata() {
        q4.meta(k, v.clone());
    }
    for t in q6.tensors() {
        let ty = if t.name == "token_embd.weight" {
            gguf::GgmlType::Q4_K
        } else {
            t.ty
        };
        q4.tensor(&t.name, ty, &t.dims, TensorData::Hole);
    }
    for (name, w, repacked) in [("q6_k", q6, false), ("q4_k", q4, true)] {
        let path = dir.path().join(format!("gemma3-tied-{name}.gguf"));
        w.write_to(&path).expect("write");
        let params = gguf::model_params(&gguf::read_model(&path).expect("read")).expect("params");
        assert!(params.tied_output_bytes > 0, "{name}");
        assert_eq!(params.tied_output_repacked, repacked, "{name}");
        let theirs = run_fit_params(&bin, &path, &opts).expect("llama-fit-params");
        let ours = estimate(&params, &opts);
        let row = ParityRow::new(name, &opts, &ours, &theirs, Tolerance::default());
        assert!(row.passes(), "{}\n{row}", ParityRow::header());
        // llama.cpp rounds each buffer row (Host, CPU_REPACK) down.
        let file_mib = params.weight_bytes / MIB;
        let copy_mib = params.tied_output_bytes / MIB;
        if repacked {
            assert!(theirs.model_mib() + 2 >= file_mib + copy_mib, "{row}");
        } else {
            assert!(theirs.model_mib() <= file_mib + 1, "{row}");
        }
    }
}

/// A captured `llama-server` log from the agent's test data.
macro_rules! agent_log {
    ($name:literal) => {
        include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../agent/src/testdata/",
            $name
        ))
    };
}

/// What the agent reports for a captured log.
fn observed(log: &str) -> ObservedBuffers {
    parse_load_log(log).buffers().expect("buffer lines")
}

fn mib_f(bytes: u64) -> f64 {
    bytes as f64 / MIB as f64
}

/// The formula's context within 1/64 MiB of what the load logged (KV and
/// recurrent state), its compute buffer within `compute_within`.
fn assert_close_to_the_load(e: &Estimate, obs: &ObservedBuffers, compute_within: u64) {
    let kv = obs.context_bytes().expect("kv");
    assert!(
        e.kv_bytes.abs_diff(kv) < MIB / 64,
        "{} vs {}",
        e.kv_bytes,
        kv
    );
    let compute = obs.compute_bytes.expect("compute");
    assert!(
        e.compute_bytes.abs_diff(compute) < compute_within,
        "{}",
        mib_f(e.compute_bytes)
    );
}

/// The sparse Llama-3.1-8B fixture's header, the model the log was
/// captured with.
fn llama8b() -> ModelParams {
    let dir = tempfile::tempdir().expect("tempdir");
    let kind = fixtures::SparseModel::Llama31_8B;
    let path = dir.path().join(kind.spec().file_name);
    fixtures::write_sparse_with(kind, &path, fixtures::VocabStyle::SizeOnly).expect("write");
    gguf::model_params(&gguf::read_model(&path).expect("read")).expect("params")
}

/// The real llama-server load of the sparse Llama-3.1-8B fixture
/// (`-c 8192`, 4 unified slots): the formula already agrees with it.
#[test]
fn a_real_server_log_agrees_with_the_formula_and_replaces_it() {
    let obs = observed(agent_log!("server-llama8b-q4km-lv4.log"));
    let params = llama8b();
    let opts = EstimateOptions::llama_server(8192);
    let formula = estimate(&params, &opts);
    assert_eq!(Some(formula.kv_bytes), obs.context_bytes());
    let compute = obs.compute_bytes.expect("compute line");
    assert!(
        formula.compute_bytes.abs_diff(compute) < MIB / 8,
        "{}",
        mib_f(formula.compute_bytes)
    );
    let output = obs.output_bytes.expect("output line");
    assert!(formula.output_bytes.abs_diff(output) < MIB / 64);

    let rec = ObservedRecord::new("llama/8b.gguf", &opts, obs);
    let s = estimate_with_observed("llama/8b.gguf", &params, &opts, &[rec]);
    assert_eq!(s.source, EstimateSource::Observed);
    assert_eq!(s.sources.compute, EstimateSource::Observed);
    assert_eq!(s.estimate.compute_bytes, compute);
    // CPU_Mapped (whole file) + CPU_REPACK double-counts: keep the header.
    assert_eq!(s.sources.weights, EstimateSource::Formula);
    assert_eq!(s.estimate.weights_bytes, params.weight_bytes);
    assert!(s.estimate.notes.iter().any(|n| n.contains("repacked")));
}

/// A 4-layer gpt-oss written for the test data: two KV caches (full and
/// sliding window), q8_0, two per-slot streams, MoE compute.
#[test]
fn a_sliding_window_moe_load_matches_the_formula() {
    let p = ModelParams {
        architecture: "gpt-oss".into(),
        block_count: 4,
        embedding_length: 1024,
        vocab_size: 32_000,
        head_count: vec![16; 4],
        head_count_kv: vec![4; 4],
        key_length: 64,
        value_length: 64,
        sliding_window: 128,
        swa_layers: vec![true, false, true, false],
        recurrent_layers: vec![false; 4],
        expert_count: 8,
        expert_used_count: 2,
        context_length: 131_072,
        ..ModelParams::default()
    };
    let obs = observed(agent_log!("server-gptoss-small-iswa-q8-lv4.log"));
    let opts = EstimateOptions::llama_server_slots(8192, 2, false).cache(CacheType::Q8_0);
    let p = ModelParams {
        expert_feed_forward_length: 1024,
        ..p
    };
    let e = estimate(&p, &opts);
    assert_eq!((e.context.kv_size, e.context.swa_size), (4096, 768));
    assert_close_to_the_load(&e, &obs, MIB);
    assert_eq!(e.compute.dominant, "MoE experts");
}

/// A 4-layer Nemotron-H ("M-M*") written for the test data: KV plus
/// recurrent state, flash attention off.
#[test]
fn a_hybrid_load_matches_the_formula() {
    let p = ModelParams {
        architecture: "nemotron_h".into(),
        block_count: 4,
        embedding_length: 1024,
        vocab_size: 32_000,
        head_count: vec![8; 4],
        head_count_kv: vec![0, 0, 0, 2],
        key_length: 128,
        value_length: 128,
        swa_layers: vec![false; 4],
        ssm_conv_kernel: 4,
        ssm_inner_size: 2048,
        ssm_state_size: 64,
        ssm_group_count: 2,
        ssm_time_step_rank: 32,
        recurrent_layers: vec![true, false, true, false],
        context_length: 131_072,
        ..ModelParams::default()
    };
    let obs = observed(agent_log!("server-nemotronh-small-hybrid-lv4.log"));
    let opts = EstimateOptions {
        flash_attn: FlashAttn::Off,
        ..EstimateOptions::llama_server(4096)
    };
    let e = estimate(&p, &opts);
    assert_close_to_the_load(&e, &obs, 4 * MIB);
    assert_eq!(e.compute.dominant, "attention (no flash)");
}

/// The registry of architectures with rules of their own is exactly the
/// set the parity fixtures check: every checked family is known (so its
/// plan does not claim generic rules) and the fixtures kept for unknown
/// architectures are not.
#[test]
fn every_architecture_the_parity_fixtures_check_is_known_and_the_generic_fixtures_are_not() {
    use controller::estimate::rules::is_known;
    for kind in fixtures::SparseModel::ALL {
        let arch = kind.spec().arch;
        assert!(is_known(arch), "{kind:?} ({arch}) is checked but not known");
    }
    for kind in fixtures::SparseModel::GENERIC {
        let arch = kind.spec().arch;
        assert!(!is_known(arch), "{kind:?} ({arch}) has no rules of its own");
    }
}
