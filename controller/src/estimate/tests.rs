//! Hand-computed cases for the estimate; no binaries needed.

use super::*;
use proto::domain::ModelParams;

const MIB_F: f64 = MIB as f64;

fn mib_f(bytes: u64) -> f64 {
    bytes as f64 / MIB_F
}

/// Llama-3.1-8B: 32 layers, 32 heads, 8 KV heads of 128, vocab 128256.
fn llama8b() -> ModelParams {
    ModelParams {
        architecture: "llama".into(),
        weight_bytes: 4_653_375_488,
        context_length: 131_072,
        block_count: 32,
        embedding_length: 4096,
        vocab_size: 128_256,
        head_count: vec![32; 32],
        head_count_kv: vec![8; 32],
        key_length: 128,
        value_length: 128,
        swa_layers: vec![false; 32],
        rope_dimension_count: 128,
        recurrent_layers: vec![false; 32],
        feed_forward_length: 14_336,
        tensor_count: 291,
        split_count: 1,
        ..ModelParams::default()
    }
}

/// GPT-OSS-20B: 24 layers alternating sliding window (128) and full.
fn gpt_oss_20b() -> ModelParams {
    ModelParams {
        architecture: "gpt-oss".into(),
        context_length: 131_072,
        block_count: 24,
        embedding_length: 2880,
        vocab_size: 201_088,
        head_count: vec![64; 24],
        head_count_kv: vec![8; 24],
        key_length: 64,
        value_length: 64,
        sliding_window: 128,
        swa_layers: (0..24).map(|i| i % 2 == 0).collect(),
        rope_dimension_count: 64,
        recurrent_layers: vec![false; 24],
        expert_count: 32,
        expert_used_count: 4,
        feed_forward_length: 2880,
        ..ModelParams::default()
    }
}

/// DeepSeek-V3.1 with MLA: 61 layers, K = 512 latent + 64 rope, one KV head.
fn deepseek_v31() -> ModelParams {
    ModelParams {
        architecture: "deepseek2".into(),
        context_length: 163_840,
        block_count: 61,
        embedding_length: 7168,
        vocab_size: 129_280,
        head_count: vec![128; 61],
        head_count_kv: vec![1; 61],
        key_length: 576,
        value_length: 512,
        kv_lora_rank: 512,
        rope_dimension_count: 64,
        key_length_mla: 192,
        value_length_mla: 128,
        swa_layers: vec![false; 61],
        recurrent_layers: vec![false; 61],
        expert_count: 256,
        expert_used_count: 8,
        expert_shared_count: 1,
        feed_forward_length: 18_432,
        leading_dense_block_count: 3,
        ..ModelParams::default()
    }
}

/// A Nemotron-H style hybrid: "M-M*" repeated; Mamba2 with d_inner 8192,
/// d_state 128, 8 groups, conv 4; attention 32 heads / 8 KV heads of 128.
fn nemotron_h() -> ModelParams {
    let pattern: Vec<char> = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
        .chars()
        .collect();
    let n = pattern.len();
    ModelParams {
        architecture: "nemotron_h".into(),
        context_length: 8192,
        block_count: n as u32,
        embedding_length: 4096,
        vocab_size: 131_072,
        head_count: vec![32; n],
        head_count_kv: pattern
            .iter()
            .map(|&c| if c == '*' { 8 } else { 0 })
            .collect(),
        key_length: 128,
        value_length: 128,
        swa_layers: vec![false; n],
        rope_dimension_count: 128,
        ssm_conv_kernel: 4,
        ssm_inner_size: 8192,
        ssm_state_size: 128,
        ssm_group_count: 8,
        ssm_time_step_rank: 128,
        recurrent_layers: pattern.iter().map(|&c| c == 'M').collect(),
        feed_forward_length: 0,
        ..ModelParams::default()
    }
}

fn at(ctx: u32) -> EstimateOptions {
    EstimateOptions::with_ctx(ctx)
}

#[test]
fn llama_8b_f16_kv_at_4096_is_512_mib() {
    // 32 layers x 2 (K and V) x 1024 (8 heads x 128) x 2 bytes x 4096 cells
    let e = estimate(&llama8b(), &at(4096));
    assert_eq!(e.kv_bytes, 32 * 2 * 1024 * 2 * 4096);
    assert_eq!(e.kv_bytes, 512 * MIB);
    assert_eq!(e.context.groups.len(), 1);
    assert_eq!(e.context.groups[0].kind, "full attention");
}

#[test]
fn q8_0_cache_is_34_32nds_of_a_byte_per_value() {
    let f16 = estimate(&llama8b(), &at(4096));
    let q8 = estimate(&llama8b(), &at(4096).cache(CacheType::Q8_0));
    let q4 = estimate(&llama8b(), &at(4096).cache(CacheType::Q4_0));
    // 1024 values: f16 2048 bytes, q8_0 32 blocks x 34 = 1088, q4_0 32 x 18 = 576
    assert_eq!(q8.kv_bytes, f16.kv_bytes / 2048 * 1088);
    assert_eq!(q8.kv_bytes, 272 * MIB);
    assert_eq!(q4.kv_bytes, 144 * MIB);
    let mixed = EstimateOptions {
        cache_type_v: CacheType::Q4_0,
        ..at(4096).cache(CacheType::Q8_0)
    };
    assert_eq!(estimate(&llama8b(), &mixed).kv_bytes, (136 + 72) * MIB);
}

#[test]
fn kv_grows_linearly_with_context_and_context_is_padded_to_256() {
    let a = estimate(&llama8b(), &at(16_384));
    let b = estimate(&llama8b(), &at(32_768));
    assert_eq!(b.kv_bytes, 2 * a.kv_bytes);
    // 4000 is padded to 4096 (GGML_PAD(n_ctx, 256)).
    assert_eq!(estimate(&llama8b(), &at(4000)).kv_bytes, 512 * MIB);
    // ctx 0 = the trained context.
    assert_eq!(estimate(&llama8b(), &at(0)).resolved.n_ctx, 131_072);
}

#[test]
fn sliding_window_layers_hold_only_the_window() {
    // 12 full layers x 2 x 512 x 2 B x 4096 = 96 MiB; 12 SWA layers hold
    // GGML_PAD(min(4096, 128 + 512), 256) = 768 cells: 18 MiB.
    let e = estimate(&gpt_oss_20b(), &at(4096));
    assert_eq!(e.context.swa_size, 768);
    assert_eq!(e.context.kv_full_bytes, 96 * MIB);
    assert_eq!(e.context.kv_swa_bytes, 18 * MIB);
    // The window does not grow with the context.
    let long = estimate(&gpt_oss_20b(), &at(131_072));
    assert_eq!(long.context.kv_swa_bytes, 18 * MIB);
    assert_eq!(long.context.kv_full_bytes, 32 * 96 * MIB);
    // --swa-full gives the window layers the whole context.
    let full = estimate(
        &gpt_oss_20b(),
        &EstimateOptions {
            swa_full: true,
            ..at(4096)
        },
    );
    assert_eq!(full.kv_bytes, 192 * MIB);
}

#[test]
fn sliding_window_is_capped_by_the_context() {
    // At 512 cells the window cache is min(512, 640) = 512, padded to 512.
    let e = estimate(&gpt_oss_20b(), &at(512));
    assert_eq!(e.context.swa_size, 512);
    assert_eq!(e.context.kv_swa_bytes, e.context.kv_full_bytes);
}

#[test]
fn unified_parallel_sequences_widen_the_window_per_sequence() {
    // unified: one stream of n_swa * n_seq + n_ubatch = 128*4 + 512 = 1024.
    let e = estimate(&gpt_oss_20b(), &EstimateOptions::llama_server(16_384));
    assert_eq!(e.resolved.n_stream, 1);
    assert_eq!(e.context.swa_size, 1024);
    // per-sequence streams: each holds 128 + 512 -> 768 cells, 4 streams.
    let split = estimate(
        &gpt_oss_20b(),
        &EstimateOptions {
            parallel: 4,
            ..at(16_384)
        },
    );
    assert_eq!(split.context.swa_size, 768);
    assert_eq!(split.resolved.n_stream, 4);
    assert_eq!(split.context.kv_swa_bytes, 4 * 18 * MIB);
}

#[test]
fn mla_caches_the_latent_and_rope_once_without_v() {
    // 61 layers x (512 + 64) x 2 bytes x 4096 cells, no V.
    let e = estimate(&deepseek_v31(), &at(4096));
    assert_eq!(e.kv_bytes, 61 * 576 * 2 * 4096);
    assert!((mib_f(e.kv_bytes) - 274.5).abs() < 0.01);
    assert_eq!(e.context.groups[0].v_bytes_per_layer, 0);
    // The same model without the MLA keys is plain MHA: 128 heads of 576/512.
    let mha = ModelParams {
        key_length_mla: 0,
        value_length_mla: 0,
        head_count_kv: vec![128; 61],
        key_length: 192,
        value_length: 128,
        ..deepseek_v31()
    };
    assert_eq!(
        estimate(&mha, &at(4096)).kv_bytes,
        61 * 128 * (192 + 128) * 2 * 4096
    );
}

#[test]
fn recurrent_state_is_per_sequence_not_per_token() {
    let p = nemotron_h();
    let short = estimate(&p, &at(4096));
    let long = estimate(&p, &at(65_536));
    // 24 Mamba2 layers x (3 x (8192 + 2x8x128) + 128 x 8192) x 4 B.
    let per_layer = (3 * (8192 + 2 * 8 * 128) + 128 * 8192) * 4;
    assert_eq!(short.context.recurrent_bytes, 24 * per_layer);
    assert_eq!(long.context.recurrent_bytes, short.context.recurrent_bytes);
    // 4 attention layers still grow: 4 x 2 x 1024 x 2 B x cells.
    assert_eq!(short.context.kv_full_bytes, 4 * 2 * 1024 * 2 * 4096);
    assert_eq!(long.context.kv_full_bytes, 16 * short.context.kv_full_bytes);
    // One state row per sequence.
    let par = estimate(
        &p,
        &EstimateOptions {
            parallel: 4,
            ..at(4096)
        },
    );
    assert_eq!(
        par.context.recurrent_bytes,
        4 * short.context.recurrent_bytes
    );
}

#[test]
fn parallel_sequences_split_the_context_into_streams() {
    let e = estimate(
        &llama8b(),
        &EstimateOptions {
            parallel: 4,
            ..at(4096)
        },
    );
    assert_eq!((e.resolved.n_ctx_seq, e.resolved.n_stream), (1024, 4));
    assert_eq!(e.kv_bytes, 512 * MIB);
    // 5000 -> 5120 / 4 = 1280 per stream (a multiple of 256).
    let odd = estimate(
        &llama8b(),
        &EstimateOptions {
            parallel: 4,
            ..at(5000)
        },
    );
    assert_eq!((odd.resolved.n_ctx_seq, odd.resolved.n_ctx), (1280, 5120));
    // 4096 / 3 = 1365 -> 1536 per stream: n_ctx becomes 4608.
    let three = Resolved::new(
        &llama8b(),
        &EstimateOptions {
            parallel: 3,
            ..at(4096)
        },
    );
    assert_eq!(
        (three.n_ctx_seq, three.n_ctx, three.n_tokens),
        (1536, 4608, 513)
    );
}

#[test]
fn compute_for_llama_8b_matches_llama_cpp_within_half_an_activation() {
    // llama-fit-params printed compute buffers of 294.52 MiB (fa auto) and
    // 316.02 MiB (-fa off) at 4096 for this geometry; the output phase
    // counts half an activation (4 MiB) for ggml-alloc's placement hole.
    let on = estimate(&llama8b(), &at(4096));
    assert_eq!(on.compute.dominant, "output", "{:#?}", on.notes);
    assert!(
        (mib_f(on.compute_bytes) - 294.52).abs() <= 4.01,
        "{}",
        mib_f(on.compute_bytes)
    );
    let off = estimate(
        &llama8b(),
        &EstimateOptions {
            flash_attn: FlashAttn::Off,
            ..at(4096)
        },
    );
    assert_eq!(off.compute.dominant, "attention (no flash)");
    assert!(
        (mib_f(off.compute_bytes) - 316.02).abs() < 1.0,
        "{}",
        mib_f(off.compute_bytes)
    );
}

#[test]
fn compute_without_flash_attention_grows_with_the_scores() {
    let off = |ctx| {
        estimate(
            &llama8b(),
            &EstimateOptions {
                flash_attn: FlashAttn::Off,
                ..at(ctx)
            },
        )
        .compute_bytes
    };
    // scores 32768 x 512 x 32 heads x 4 B = 2 GiB, plus the f32 mask.
    assert!(off(32_768) > 2048 * MIB);
    assert!(off(32_768) - off(16_384) >= 1024 * MIB);
}

#[test]
fn mla_compute_is_set_by_the_absorbed_queries() {
    // llama-fit-params: 410.02 MiB at 4096 with flash attention.
    let e = estimate(&deepseek_v31(), &at(4096));
    assert_eq!(e.compute.dominant, "MLA attention");
    assert!(
        (mib_f(e.compute_bytes) - 410.02).abs() < 1.0,
        "{}",
        mib_f(e.compute_bytes)
    );
}

#[test]
fn output_buffer_is_one_logit_row_per_sequence_and_in_the_total() {
    let e = estimate(&llama8b(), &at(4096));
    assert_eq!(e.output_bytes, 128_256 * 4);
    assert_eq!(
        e.total_bytes,
        e.weights_bytes + e.kv_bytes + e.compute_bytes + e.output_bytes
    );
    assert_eq!(e.projected_bytes(), e.total_bytes - e.output_bytes);
}

#[test]
fn notes_explain_each_layer_kind() {
    let e = estimate(&nemotron_h(), &at(4096));
    let text = e.notes.join("\n");
    assert!(text.contains("KV full attention: 4 layer(s)"), "{text}");
    assert!(text.contains("recurrent: 24 layer(s)"), "{text}");
    assert!(text.contains("high-water mark"), "{text}");
    let q = estimate(
        &llama8b(),
        &EstimateOptions {
            flash_attn: FlashAttn::Off,
            ..at(4096).cache(CacheType::Q8_0)
        },
    );
    assert!(q.notes.iter().any(|n| n.contains("refuses a quantized V")));
}

#[test]
fn flash_attention_modes_parse_like_llama_cpp_flags() {
    assert_eq!("auto".parse::<FlashAttn>(), Ok(FlashAttn::Auto));
    assert!(FlashAttn::Auto.resolve());
    assert!(!FlashAttn::Off.resolve());
}

#[test]
fn defaults_are_llama_fit_params_defaults() {
    let d = EstimateOptions::default();
    assert_eq!((d.parallel, d.n_batch, d.n_ubatch), (1, 2048, 512));
    assert_eq!(
        (d.cache_type_k, d.flash_attn, d.kv_unified),
        (CacheType::F16, FlashAttn::Auto, false)
    );
    let s = EstimateOptions::llama_server(0);
    assert_eq!((s.parallel, s.kv_unified), (4, true));
}

/// Qwen3-Next-80B-A3B: 48 layers, every 4th full attention (2 KV heads of
/// 256), the other 36 gated delta-net (conv kernel 4, 16 key heads and 32
/// value heads of 128).
fn qwen3_next() -> ModelParams {
    ModelParams {
        architecture: "qwen3next".into(),
        context_length: 262_144,
        block_count: 48,
        embedding_length: 2048,
        vocab_size: 151_936,
        head_count: vec![16; 48],
        head_count_kv: vec![2; 48],
        key_length: 256,
        value_length: 256,
        rope_dimension_count: 64,
        swa_layers: vec![false; 48],
        recurrent_layers: (0..48).map(|i| (i + 1) % 4 != 0).collect(),
        ssm_conv_kernel: 4,
        ssm_inner_size: 4096,
        ssm_state_size: 128,
        ssm_group_count: 16,
        ssm_time_step_rank: 32,
        expert_count: 512,
        expert_used_count: 10,
        expert_feed_forward_length: 512,
        feed_forward_length: 5120,
        ..ModelParams::default()
    }
}

/// Gemma-3-27B: 62 layers, five of every six on a 1024-token window,
/// 16 KV heads of 128, tied 262144-token embedding.
fn gemma3_27b() -> ModelParams {
    ModelParams {
        architecture: "gemma3".into(),
        weight_bytes: 16_000 * MIB,
        tied_output_bytes: 1_100 * MIB,
        context_length: 131_072,
        block_count: 62,
        embedding_length: 5376,
        vocab_size: 262_144,
        head_count: vec![32; 62],
        head_count_kv: vec![16; 62],
        key_length: 128,
        value_length: 128,
        sliding_window: 1024,
        swa_layers: (0..62).map(|i| i % 6 != 5).collect(),
        recurrent_layers: vec![false; 62],
        feed_forward_length: 21_504,
        attention_extra_ops: true,
        ..ModelParams::default()
    }
}

#[test]
fn qwen3_next_holds_kv_for_its_12_attention_layers_and_a_fixed_delta_net_state() {
    let e = estimate(&qwen3_next(), &at(131_072));
    // 12 layers x (K + V) 2 x 256 x 2 B x 131072 cells = 3072 MiB.
    assert_eq!(e.context.kv_full_bytes, 3072 * MIB);
    // 36 layers x (conv 3 x 8192 + state 128 x 4096) x 4 B, one sequence.
    assert_eq!(e.context.recurrent_bytes, 36 * (3 * 8192 + 128 * 4096) * 4);
    // llama.cpp: 3,147 MiB of context at 128K; every layer as attention
    // would be 12,288 MiB.
    assert_eq!(e.kv_bytes / MIB, 3147);
    assert_eq!(
        estimate(&qwen3_next(), &at(4096)).context.recurrent_bytes,
        e.context.recurrent_bytes
    );
    assert!(e.compute.phases.iter().any(|p| p.name == "gated delta-net"));
    assert!(e.compute.phases.iter().all(|p| p.name != "Mamba2"));
}

#[test]
fn nextn_blocks_are_neither_loaded_nor_cached() {
    let mut p = llama8b();
    p.block_count = 33;
    p.nextn_predict_layers = 1;
    p.head_count = vec![32; 33];
    p.head_count_kv = vec![8; 33];
    p.swa_layers = vec![false; 33];
    p.recurrent_layers = vec![false; 33];
    p.block_weight_bytes = vec![100 * MIB; 33];
    p.weight_bytes = 33 * 100 * MIB + 700 * MIB;
    let e = estimate(&p, &at(4096));
    // The last block's 100 MiB are skipped at load; 32 layers hold KV.
    assert_eq!(e.weights_bytes, 32 * 100 * MIB + 700 * MIB);
    assert_eq!(e.kv_bytes, 512 * MIB);
    assert_eq!(e.context.per_layer[32], 0);
    assert!(e.notes.iter().any(|n| n.contains("NextN")), "{:?}", e.notes);
    // Without the key every block counts.
    p.nextn_predict_layers = 0;
    let e = estimate(&p, &at(4096));
    assert_eq!((e.weights_bytes, e.kv_bytes), (p.weight_bytes, 528 * MIB));
}

#[test]
fn gemma3_caches_ten_global_layers_in_full_and_fifty_two_on_the_window() {
    let e = estimate(&gemma3_27b(), &at(32_768));
    // Per layer and cell: K + V = 2 x 16 x 128 x 2 bytes = 8 KiB.
    let full = 10 * 8 * 1024 * 32_768;
    // SWA cells: pad(1024 + 512, 256) = 1536.
    let swa = 52 * 8 * 1024 * 1536;
    assert_eq!((e.context.kv_size, e.context.swa_size), (32_768, 1536));
    assert_eq!(
        (e.context.kv_full_bytes, e.context.kv_swa_bytes),
        (full, swa)
    );
    // Tied Q6_K embeddings: the CPU output head uses the embedding itself.
    assert_eq!(e.weights_bytes, 16_000 * MIB);
    assert!(e.notes.iter().any(|n| n.contains("shares token_embd")));
    // A Q4_K embedding is repacked for the output matmul: a second copy.
    let q4 = ModelParams {
        tied_output_repacked: true,
        ..gemma3_27b()
    };
    assert_eq!(estimate(&q4, &at(4096)).weights_bytes, 17_100 * MIB);
}

#[test]
fn sliding_window_layers_use_their_own_head_sizes() {
    let mut p = gemma3_27b();
    p.key_length = 512;
    p.value_length = 512;
    p.key_length_swa = 256;
    p.value_length_swa = 256;
    let e = estimate(&p, &at(32_768));
    let full = 10 * (2 * 16 * 512 * 2) * 32_768;
    let swa = 52 * (2 * 16 * 256 * 2) * 1536;
    assert_eq!(
        (e.context.kv_full_bytes, e.context.kv_swa_bytes),
        (full, swa)
    );
    // Without flash attention V rows are padded to the widest layer
    // ([TAG_V_CACHE_VARIABLE]); K rows keep their own size.
    let off = EstimateOptions {
        flash_attn: FlashAttn::Off,
        ..at(32_768)
    };
    let e = estimate(&p, &off);
    let swa_off = 52 * (16 * 256 * 2 + 16 * 512 * 2) * 1536;
    assert_eq!(e.context.kv_swa_bytes, swa_off);
}

#[test]
fn layers_that_share_an_earlier_kv_cache_hold_none() {
    let mut p = gemma3_27b();
    // n_layer_kv_from_start = 20: layers 20.. reuse (3 global, 17 SWA keep one).
    p.kv_layer_count = 20;
    let e = estimate(&p, &at(32_768));
    assert_eq!(e.context.kv_full_bytes, 3 * 8 * 1024 * 32_768);
    assert_eq!(e.context.kv_swa_bytes, 17 * 8 * 1024 * 1536);
    assert!(e.context.per_layer[20..].iter().all(|&b| b == 0));
}

#[test]
fn an_ungated_ffn_holds_fewer_intermediates_than_a_gated_one() {
    let mut p = llama8b();
    let gated = estimate(&p, &at(4096));
    p.ffn_ungated = true;
    let ungated = estimate(&p, &at(4096));
    let ff = 14_336 * 512 * 4;
    let gated_ffn = gated.compute.phases.iter().find(|x| x.name == "dense FFN");
    let ungated_ffn = ungated
        .compute
        .phases
        .iter()
        .find(|x| x.name == "dense FFN (ungated)");
    let (Some(g), Some(u)) = (gated_ffn, ungated_ffn) else {
        panic!("no FFN phase");
    };
    assert_eq!(g.bytes - u.bytes, (3 - compute::UNGATED_FF_TENSORS) * ff);
}

/// Observed figures against the formula; the tests that feed real captured
/// logs through the agent's parser are in `tests/estimate.rs`.
mod observed_records {
    use super::*;
    use proto::domain::{MemoryBreakdown, ObservedBuffers};

    fn record(ctx: u32, buffers: ObservedBuffers) -> ObservedRecord {
        ObservedRecord::new("llama/8b.gguf", &at(ctx), buffers)
    }

    #[test]
    fn observed_figures_win_and_say_so() {
        let obs = ObservedBuffers {
            model_bytes: Some(4000 * MIB),
            compute_bytes: Some(300 * MIB),
            ..ObservedBuffers::default()
        };
        let s =
            estimate_with_observed("llama/8b.gguf", &llama8b(), &at(4096), &[record(4096, obs)]);
        assert_eq!(s.source, EstimateSource::Observed);
        assert_eq!(s.sources.weights, EstimateSource::Observed);
        assert_eq!(s.sources.compute, EstimateSource::Observed);
        assert_eq!(s.sources.kv, EstimateSource::Formula);
        assert_eq!(s.estimate.weights_bytes, 4000 * MIB);
        assert_eq!(s.estimate.kv_bytes, 512 * MIB);
        assert_eq!(
            s.estimate.total_bytes,
            4000 * MIB + 512 * MIB + 300 * MIB + s.estimate.output_bytes
        );
        assert_eq!(s.formula.weights_bytes, llama8b().weight_bytes);
    }

    #[test]
    fn the_breakdown_table_fills_missing_buffer_lines() {
        let obs = ObservedBuffers {
            breakdown: Some(MemoryBreakdown {
                model_bytes: 4437 * MIB,
                context_bytes: 512 * MIB,
                compute_bytes: 294 * MIB,
            }),
            ..ObservedBuffers::default()
        };
        let s =
            estimate_with_observed("llama/8b.gguf", &llama8b(), &at(4096), &[record(4096, obs)]);
        assert_eq!(s.estimate.compute_bytes, 294 * MIB);
        assert_eq!(s.sources.output, EstimateSource::Formula);
    }

    #[test]
    fn other_settings_fall_back_to_the_formula() {
        let obs = ObservedBuffers {
            kv_bytes: Some(1),
            ..ObservedBuffers::default()
        };
        let recs = [record(8192, obs)];
        let s = estimate_with_observed("llama/8b.gguf", &llama8b(), &at(4096), &recs);
        assert_eq!(s.source, EstimateSource::Formula);
        let s = estimate_with_observed("other.gguf", &llama8b(), &at(8192), &recs);
        assert_eq!(s.source, EstimateSource::Formula);
        let q8 = at(8192).cache(CacheType::Q8_0);
        assert_eq!(
            estimate_with_observed("llama/8b.gguf", &llama8b(), &q8, &recs).source,
            EstimateSource::Formula
        );
        // 8000 pads to the same 8192 cells: the record applies.
        let s = estimate_with_observed("llama/8b.gguf", &llama8b(), &at(8000), &recs);
        assert_eq!(s.source, EstimateSource::Observed);
        assert_eq!(s.estimate.kv_bytes, 1);
    }
}
