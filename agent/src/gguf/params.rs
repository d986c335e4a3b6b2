//! Hyper-parameters from a GGUF header: fills [`ModelParams`], what the
//! controller's memory estimate needs, from the `general.*` and `{arch}.*`
//! metadata keys and the tensor infos.
//!
//! The rules follow llama.cpp: `llama_model_base::load_hparams` in
//! `src/llama-model.cpp` for the generic keys, each architecture's
//! `load_arch_hparams` in `src/models/*.cpp`, `src/llama-hparams.cpp` for
//! the per-layer SWA and recurrent patterns, key names from
//! `src/llama-arch.cpp` (`LLM_KV_NAMES`), and `src/llama-model-loader.cpp`
//! for the file-type name. Integer keys are accepted in any integer type
//! that holds the value (llama.cpp insists on the exact type); a present key
//! with a wrong type or an out-of-range value is an error, a missing
//! optional key takes llama.cpp's default. Architectures without specific
//! rules here get the generic fields.

use super::read::{GgufFile, GgufModel, TensorInfo};
use super::types::{GgmlType, Value};
use proto::domain::ModelParams;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// `LLAMA_MAX_LAYERS` in `src/llama-hparams.h`.
pub const MAX_LAYERS: u64 = 512;
/// `LLAMA_MAX_EXPERTS` in `src/llama-hparams.h`.
pub const MAX_EXPERTS: u64 = 1024;
/// `LLAMA_FTYPE_GUESSED` in `include/llama.h`.
const FTYPE_GUESSED: u32 = 1024;

/// Why hyper-parameters could not be taken from a header.
#[derive(Debug, thiserror::Error)]
pub enum ParamsError {
    /// A key llama.cpp requires is absent.
    #[error("{}: `{key}`: missing, and llama.cpp requires it for architecture `{arch}`", path.display())]
    MissingKey {
        /// The file (part 1).
        path: PathBuf,
        /// The key.
        key: String,
        /// `general.architecture` (empty when that is the missing key).
        arch: String,
    },
    /// A key has a type that cannot mean what llama.cpp reads it as.
    #[error("{}: at byte {offset}: `{key}`: expected {expected}, found {found}", path.display())]
    WrongType {
        /// The file.
        path: PathBuf,
        /// Where the value is stored.
        offset: u64,
        /// The key.
        key: String,
        /// What llama.cpp reads.
        expected: &'static str,
        /// What the file holds.
        found: String,
    },
    /// A value is outside the range llama.cpp accepts.
    #[error("{}: at byte {offset}: `{key}`: {value} {reason}", path.display())]
    OutOfRange {
        /// The file.
        path: PathBuf,
        /// Where the value is stored.
        offset: u64,
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// Why it is refused.
        reason: String,
    },
    /// A per-layer array does not have one entry per layer
    /// (`get_key_or_arr`: "wrong array length").
    #[error("{}: at byte {offset}: `{key}`: {len} entries, expected one per layer ({expected})", path.display())]
    ArrayLength {
        /// The file.
        path: PathBuf,
        /// Where the array is stored.
        offset: u64,
        /// The key.
        key: String,
        /// Entries found.
        len: usize,
        /// `block_count`.
        expected: usize,
    },
}

/// Fills [`ModelParams`] from a model's headers (metadata of part 1, tensors
/// of every part).
///
/// The steps follow `load_hparams`: the architecture and what every file
/// has; then (not for CLIP files) the blocks, the experts, the attention
/// heads, the optional keys, the keys the architecture requires, the
/// sliding window and the recurrent layers.
pub fn model_params(model: &GgufModel) -> Result<ModelParams, ParamsError> {
    let file = model.first();
    let path = file.path.as_path();
    let m = Meta {
        file,
        path,
        arch: String::new(),
    };
    let arch = match m.str_opt("general.architecture")? {
        Some(a) => a.to_owned(),
        None => {
            return Err(ParamsError::MissingKey {
                path: path.to_owned(),
                key: "general.architecture".into(),
                arch: String::new(),
            });
        }
    };
    let m = Meta { arch, ..m };
    let arch = m.arch.as_str();
    let name = m.str_opt("general.name")?.unwrap_or_default().to_owned();

    let mut p = ModelParams {
        architecture: arch.to_owned(),
        name,
        quantization: quantization(file, model),
        parameter_count: model.parameter_count(),
        weight_bytes: model.weight_bytes(),
        vocab_size: vocab_size(&m, model)?,
        tensor_count: model.tensor_count(),
        split_count: model.split_count(),
        ..ModelParams::default()
    };

    // load_hparams returns before the model keys for CLIP (mmproj) files.
    if arch == "clip" {
        return Ok(p);
    }

    let (n_layer, n_layer_main) = blocks(&m, model, &mut p)?;
    experts(&m, &mut p, n_layer)?;
    let n_ff = attention(&m, &mut p, n_layer)?;
    optional_keys(&m, &mut p)?;
    arch_required_keys(&m, &mut p)?;
    swa_head_sizes(&m, &mut p)?;
    p.kv_layer_count = kv_layer_count(&m, n_layer)?;
    let shapes = tensor_shapes(model);
    p.tied_output_bytes = shapes.tied_output_bytes;
    p.tied_output_repacked = shapes.tied_output_repacked;
    p.ffn_ungated = shapes.ffn_ungated;
    p.attention_extra_ops = shapes.attention_extra_ops;

    // Sliding-window attention.
    let (window, swa_layers) = sliding_window(&m, n_layer, n_layer_main)?;
    p.sliding_window = window;
    p.swa_layers = swa_layers;

    p.recurrent_layers = match linear_attention_layers(&m, n_layer, n_layer_main)? {
        Some(flags) => flags,
        None => recurrent_layers(arch, n_layer, n_layer_main, &p.head_count_kv, &n_ff),
    };
    Ok(p)
}

/// Generic keys, `load_hparams` in src/llama-model.cpp: context and
/// embedding length, the block count and the per-block weights, and the
/// trailing multi-token-prediction blocks. Returns the number of blocks
/// with and without those.
fn blocks(m: &Meta, model: &GgufModel, p: &mut ModelParams) -> Result<(usize, usize), ParamsError> {
    p.context_length = m.u32_req("context_length")?.into();
    p.embedding_length = m.u32_req("embedding_length")?.into();
    let block_count = m.u32_req("block_count")?;
    // GGML_ASSERT(hparams.n_layer_all > 0 && hparams.n_layer_all <= LLAMA_MAX_LAYERS)
    if block_count == 0 || u64::from(block_count) > MAX_LAYERS {
        return Err(m.range(
            "block_count",
            block_count,
            format!("is not in 1..={MAX_LAYERS}"),
        ));
    }
    p.block_count = block_count;
    let n_layer = block_count as usize;
    let layout = weight_layout(model, n_layer);
    p.block_weight_bytes = layout.blocks;
    p.input_weight_bytes = layout.input;
    p.output_weight_bytes = layout.output;
    // LLM_KV_NEXTN_PREDICT_LAYERS: trailing multi-token-prediction blocks;
    // hparams.n_layer() = n_layer_all - n_layer_nextn.
    let nextn = m.u32_opt("nextn_predict_layers")?.unwrap_or(0);
    if nextn > block_count {
        return Err(m.range(
            "nextn_predict_layers",
            nextn,
            format!("exceeds block_count {block_count}"),
        ));
    }
    p.nextn_predict_layers = nextn;
    Ok((n_layer, (block_count - nextn) as usize))
}

/// The expert count (at most `LLAMA_MAX_EXPERTS`) and the experts used per
/// token (per layer; llama.cpp validates the maximum).
fn experts(m: &Meta, p: &mut ModelParams, n_layer: usize) -> Result<(), ParamsError> {
    p.expert_count = m.u32_opt("expert_count")?.unwrap_or(0);
    if u64::from(p.expert_count) > MAX_EXPERTS {
        return Err(m.range(
            "expert_count",
            p.expert_count,
            format!("exceeds LLAMA_MAX_EXPERTS {MAX_EXPERTS}"),
        ));
    }
    let used = m
        .per_layer("expert_used_count", n_layer)?
        .unwrap_or_default();
    p.expert_used_count = used.iter().copied().max().unwrap_or(0);
    if p.expert_used_count > p.expert_count {
        return Err(m.range(
            "expert_used_count",
            p.expert_used_count,
            format!("exceeds expert_count {}", p.expert_count),
        ));
    }
    Ok(())
}

/// The feed-forward length and attention heads per layer, and the head
/// sizes. Returns the per-layer feed-forward lengths.
fn attention(m: &Meta, p: &mut ModelParams, n_layer: usize) -> Result<Vec<u32>, ParamsError> {
    let n_ff = m
        .per_layer("feed_forward_length", n_layer)?
        .unwrap_or_else(|| vec![0; n_layer]);
    p.feed_forward_length = n_ff.first().copied().unwrap_or(0).into();
    p.head_count = m
        .per_layer("attention.head_count", n_layer)?
        .unwrap_or_else(|| vec![0; n_layer]);
    // n_head_kv is optional, default to n_head.
    p.head_count_kv = m
        .per_layer("attention.head_count_kv", n_layer)?
        .unwrap_or_else(|| p.head_count.clone());

    // Head sizes: defaults n_embd / n_head(0), only read when there are
    // attention heads; n_rot defaults to the key head size.
    let n_head0 = p.head_count.first().copied().unwrap_or(0);
    if n_head0 > 0 {
        let default = u32::try_from(p.embedding_length / u64::from(n_head0)).unwrap_or(u32::MAX);
        p.key_length = m.u32_opt("attention.key_length")?.unwrap_or(default);
        p.value_length = m.u32_opt("attention.value_length")?.unwrap_or(default);
        p.rope_dimension_count = m.u32_opt("rope.dimension_count")?.unwrap_or(p.key_length);
        if matches!(m.arch.as_str(), "llama" | "deci" | "falcon" | "llama-embed")
            && p.rope_dimension_count != p.key_length
        {
            return Err(m.range(
                "rope.dimension_count",
                p.rope_dimension_count,
                format!(
                    "is invalid: llama.cpp expects n_rot = key_length = {}",
                    p.key_length
                ),
            ));
        }
    }
    Ok(n_ff)
}

/// Keys some architectures have, 0 when absent: shared experts, expert
/// width, leading dense blocks, MLA ranks, SSM sizes.
fn optional_keys(m: &Meta, p: &mut ModelParams) -> Result<(), ParamsError> {
    p.expert_shared_count = m.u32_opt("expert_shared_count")?.unwrap_or(0);
    p.expert_feed_forward_length = m
        .u32_opt("expert_feed_forward_length")?
        .map_or(0, u64::from);
    p.leading_dense_block_count = m.u32_opt("leading_dense_block_count")?.unwrap_or(0);
    p.kv_lora_rank = m.u32_opt("attention.kv_lora_rank")?.unwrap_or(0);
    p.key_length_mla = m.u32_opt("attention.key_length_mla")?.unwrap_or(0);
    p.value_length_mla = m.u32_opt("attention.value_length_mla")?.unwrap_or(0);
    p.ssm_conv_kernel = m.u32_opt("ssm.conv_kernel")?.unwrap_or(0);
    p.ssm_inner_size = m.u32_opt("ssm.inner_size")?.unwrap_or(0);
    p.ssm_state_size = m.u32_opt("ssm.state_size")?.unwrap_or(0);
    p.ssm_time_step_rank = m.u32_opt("ssm.time_step_rank")?.unwrap_or(0);
    p.ssm_group_count = m.u32_opt("ssm.group_count")?.unwrap_or(0);
    Ok(())
}

/// Keys each architecture's `load_arch_hparams` requires.
fn arch_required_keys(m: &Meta, p: &mut ModelParams) -> Result<(), ParamsError> {
    match m.arch.as_str() {
        // src/models/deepseek2.cpp
        "deepseek2" => {
            p.kv_lora_rank = m.u32_req("attention.kv_lora_rank")?;
            p.expert_shared_count = m.u32_req("expert_shared_count")?;
        }
        // src/models/nemotron-h.cpp (nemotron_h_moe reuses it)
        "nemotron_h" | "nemotron_h_moe" => {
            p.ssm_conv_kernel = m.u32_req("ssm.conv_kernel")?;
            p.ssm_inner_size = m.u32_req("ssm.inner_size")?;
            p.ssm_state_size = m.u32_req("ssm.state_size")?;
            p.ssm_time_step_rank = m.u32_req("ssm.time_step_rank")?;
            p.ssm_group_count = m.u32_req("ssm.group_count")?;
        }
        // src/models/glm4-moe.cpp: expert width and shared experts required.
        "glm4moe" => {
            p.expert_feed_forward_length = m.u32_req("expert_feed_forward_length")?.into();
            p.expert_shared_count = m.u32_req("expert_shared_count")?;
        }
        // src/models/minimax-m2.cpp: expert width required.
        "minimax-m2" => {
            p.expert_feed_forward_length = m.u32_req("expert_feed_forward_length")?.into();
        }
        // src/models/qwen3next.cpp, qwen35.cpp, qwen35moe.cpp: the gated
        // delta-net (linear attention) sizes.
        arch if is_gated_delta_net(arch) => {
            p.ssm_conv_kernel = m.u32_req("ssm.conv_kernel")?;
            p.ssm_inner_size = m.u32_req("ssm.inner_size")?;
            p.ssm_state_size = m.u32_req("ssm.state_size")?;
            p.ssm_time_step_rank = m.u32_req("ssm.time_step_rank")?;
            p.ssm_group_count = m.u32_req("ssm.group_count")?;
        }
        _ => {}
    }
    Ok(())
}

/// Architectures whose recurrent layers are gated delta-net linear
/// attention laid out by `attention.recurrent_layers` or
/// `full_attention_interval` (`load_arch_hparams` of
/// `src/models/qwen3next.cpp`, `qwen35.cpp`, `qwen35moe.cpp`).
fn is_gated_delta_net(arch: &str) -> bool {
    matches!(arch, "qwen3next" | "qwen35" | "qwen35moe")
}

/// Linear-attention layers of the Qwen3-Next family, as its
/// `load_arch_hparams` marks `is_recr_impl`: the per-layer
/// `attention.recurrent_layers` flags when the file has them (one per
/// block), else every layer but each `full_attention_interval`-th (default
/// 4; layer `i` is full attention when `(i + 1) % interval == 0`), and the
/// trailing MTP blocks are never recurrent. `None` for other architectures.
fn linear_attention_layers(
    m: &Meta,
    n_layer: usize,
    n_layer_main: usize,
) -> Result<Option<Vec<bool>>, ParamsError> {
    if !is_gated_delta_net(&m.arch) {
        return Ok(None);
    }
    if let Some(flags) = m.per_layer("attention.recurrent_layers", n_layer)? {
        return Ok(Some(flags.into_iter().map(|f| f != 0).collect()));
    }
    let interval = m.u32_opt("full_attention_interval")?.unwrap_or(4);
    if interval == 0 {
        return Err(m.range(
            "full_attention_interval",
            interval,
            "must be at least 1 (every interval-th layer is full attention)".to_owned(),
        ));
    }
    Ok(Some(
        (0..n_layer)
            .map(|i| i < n_layer_main && !((i as u32) + 1).is_multiple_of(interval))
            .collect(),
    ))
}

/// Head sizes of sliding-window layers, `load_hparams`: `n_embd_head_k_swa`
/// and `n_embd_head_v_swa` default to the full layers' sizes and are read
/// from `attention.key_length_swa` / `value_length_swa` when present
/// (Gemma 4). Kept 0 when equal to the full sizes.
fn swa_head_sizes(m: &Meta, p: &mut ModelParams) -> Result<(), ParamsError> {
    let k = m
        .u32_opt("attention.key_length_swa")?
        .unwrap_or(p.key_length);
    let v = m
        .u32_opt("attention.value_length_swa")?
        .unwrap_or(p.value_length);
    p.key_length_swa = if k == p.key_length { 0 } else { k };
    p.value_length_swa = if v == p.value_length { 0 } else { v };
    Ok(())
}

/// `hparams.n_layer_kv_from_start` (layers from there on reuse an earlier
/// layer's KV cache, the `reuse` callback of `llama_model::create_memory`):
/// `load_arch_hparams` of src/models/gemma3n.cpp sets 20; of
/// src/models/gemma4.cpp `n_layer_all - attention.shared_kv_layers`. 0 =
/// every layer has its own cache.
fn kv_layer_count(m: &Meta, n_layer: usize) -> Result<u32, ParamsError> {
    let n_layer = u32::try_from(n_layer).unwrap_or(u32::MAX);
    let from_start = match m.arch.as_str() {
        "gemma3n" => 20.min(n_layer),
        "gemma4" => {
            let shared = m.u32_opt("attention.shared_kv_layers")?.unwrap_or(0);
            if shared >= n_layer {
                return Err(m.range(
                    "attention.shared_kv_layers",
                    shared,
                    format!("leaves no layer with a KV cache of its own ({n_layer} blocks)"),
                ));
            }
            n_layer - shared
        }
        _ => return Ok(0),
    };
    Ok(if from_start >= n_layer { 0 } else { from_start })
}

/// What the tensor list says about the graph's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct TensorShapes {
    /// `token_embd.weight` bytes when there is no `output.weight`.
    tied_output_bytes: u64,
    /// The tied output head is a second, repacked copy on the CPU.
    tied_output_repacked: bool,
    /// Block 0 has `ffn_up` but no `ffn_gate`.
    ffn_ungated: bool,
    /// Block 0 has per-head Q/K norms or Q/K/V biases.
    attention_extra_ops: bool,
}

/// Reads [`TensorShapes`] from the tensor infos.
///
/// * Tied embeddings: every `load_arch_tensors` that finds no `output`
///   creates it from `token_embd` with `TENSOR_DUPLICATED`, and
///   `llama_model_loader::create_tensor` makes a second tensor in the
///   output's buffer type context unless that context already holds the
///   embedding. On the CPU backend the output (a matmul weight) goes to
///   `CPU_REPACK` when its type has a repacked layout
///   (`ggml_repack_get_optimal_repack_type` in
///   `ggml/src/ggml-cpu/repack.cpp`; with AVX2: Q4_0, Q4_K, IQ4_NL, MXFP4,
///   rows a multiple of 8), while the embedding (read by `get_rows`) stays
///   in `CPU`: two copies. Any other type shares the embedding's tensor.
/// * Ungated FFN: `build_ffn` without a gate (`LLM_FFN_SEQ`).
/// * Q/K norms (`build_norm` on Qcur/Kcur) and Q/K/V biases (`build_qkv`).
fn tensor_shapes(model: &GgufModel) -> TensorShapes {
    let has = |name: &str| model.tensor(name).is_some();
    let tied = model
        .tensor("token_embd.weight")
        .filter(|_| !has("output.weight"));
    let tied_output_repacked = tied.is_some_and(|t| {
        matches!(
            t.ty,
            GgmlType::Q4_0 | GgmlType::Q4_K | GgmlType::IQ4_NL | GgmlType::MXFP4
        ) && t.dims.get(1).is_some_and(|rows| rows % 8 == 0)
    });
    TensorShapes {
        tied_output_bytes: tied.map_or(0, |t| t.bytes),
        tied_output_repacked,
        ffn_ungated: has("blk.0.ffn_up.weight") && !has("blk.0.ffn_gate.weight"),
        attention_extra_ops: [
            "blk.0.attn_q_norm.weight",
            "blk.0.attn_k_norm.weight",
            "blk.0.attn_q.bias",
            "blk.0.attn_k.bias",
            "blk.0.attn_qkv.bias",
        ]
        .iter()
        .any(|n| has(n)),
    }
}

/// Recurrent layers. llm_arch_is_recurrent (src/llama-arch.cpp): every
/// layer; Nemotron-H (src/models/nemotron-h.cpp load_arch_hparams): "A
/// layer is recurrent IFF the n_head_kv value is set to 0 and the n_ff
/// value is set to 0. Appended MTP blocks are dense".
fn recurrent_layers(
    arch: &str,
    n_layer: usize,
    n_layer_main: usize,
    head_count_kv: &[u32],
    n_ff: &[u32],
) -> Vec<bool> {
    match arch {
        "mamba" | "mamba2" | "rwkv6" | "rwkv6qwen2" | "rwkv7" | "arwkv7" => vec![true; n_layer],
        "nemotron_h" | "nemotron_h_moe" => (0..n_layer)
            .map(|i| i < n_layer_main && head_count_kv[i] == 0 && n_ff[i] == 0)
            .collect(),
        _ => vec![false; n_layer],
    }
}

/// How an architecture lays out sliding-window layers
/// (`load_swa_pattern(ml, n_pattern, dense_first)` in its
/// `load_arch_hparams`).
struct SwaRule {
    /// Every `pattern`-th layer is dense.
    pattern: u32,
    /// The pattern starts with a dense layer.
    dense_first: bool,
    /// Where the window size comes from.
    window: Window,
}

enum Window {
    /// `sliding_window` is required.
    Required,
    /// `sliding_window` is optional with this default.
    Default(u32),
    /// SWA is on only when `sliding_window` is present and non-zero.
    IfPresent,
}

fn swa_rule(arch: &str) -> Option<SwaRule> {
    let rule = |pattern, window| SwaRule {
        pattern,
        dense_first: false,
        window,
    };
    Some(match arch {
        // src/models/openai-moe.cpp: ml.get_key(SLIDING_WINDOW, n_swa);
        // load_swa_pattern(ml, 2): even layers SWA, odd layers dense.
        "gpt-oss" => rule(2, Window::Required),
        // src/models/gemma2.cpp: n_swa = 4096 default; load_swa_pattern(ml, 2).
        "gemma2" => rule(2, Window::Default(4096)),
        // src/models/gemma3.cpp: if sliding_window found and > 0,
        // load_swa_pattern(ml, 6).
        "gemma3" => rule(6, Window::IfPresent),
        // src/models/gemma3n.cpp: load_swa_pattern(ml, 5); window required.
        "gemma3n" => rule(5, Window::Required),
        // src/models/cohere2.cpp: load_swa_pattern(ml, 4); window required.
        "cohere2" => rule(4, Window::Required),
        // src/models/olmo2.cpp: if sliding_window found and > 0,
        // load_swa_pattern(ml, 4).
        "olmo2" => rule(4, Window::IfPresent),
        _ => return None,
    })
}

/// The window size and per-layer SWA flags.
fn sliding_window(
    m: &Meta,
    n_layer: usize,
    n_layer_main: usize,
) -> Result<(u32, Vec<bool>), ParamsError> {
    let Some(rule) = swa_rule(&m.arch) else {
        // No rule for this architecture: report the window if the file has
        // one, and which layers use it only when the file lists them; else
        // every layer counts as full attention (an over-estimate).
        let window = m.u32_opt("attention.sliding_window")?.unwrap_or(0);
        let flags = match m.swa_pattern_array(n_layer)? {
            Some(flags) if window > 0 => flags,
            _ => vec![false; n_layer],
        };
        return Ok((window, flags));
    };
    let window = match rule.window {
        Window::Required => m.u32_req("attention.sliding_window")?,
        Window::Default(d) => m.u32_opt("attention.sliding_window")?.unwrap_or(d),
        Window::IfPresent => m.u32_opt("attention.sliding_window")?.unwrap_or(0),
    };
    if matches!(rule.window, Window::IfPresent) && window == 0 {
        return Ok((0, vec![false; n_layer]));
    }
    // llama_model_base::load_swa_pattern: a per-layer array wins, else a
    // scalar period, else the architecture's default period.
    if let Some(flags) = m.swa_pattern_array(n_layer)? {
        return Ok((window, flags));
    }
    let n_pattern = m
        .u32_opt("attention.sliding_window_pattern")?
        .unwrap_or(rule.pattern);
    Ok((
        window,
        swa_pattern(n_pattern, rule.dense_first, n_layer, n_layer_main),
    ))
}

/// `llama_hparams::set_swa_pattern` (src/llama-hparams.cpp): with period
/// `n`, every n-th layer is dense; 0 = all SWA, 1 = all dense; trailing MTP
/// layers are dense.
fn swa_pattern(n: u32, dense_first: bool, n_layer: usize, n_layer_main: usize) -> Vec<bool> {
    (0..n_layer)
        .map(|il| {
            let il32 = il as u32;
            il < n_layer_main
                && (n == 0
                    || if dense_first {
                        !il32.is_multiple_of(n)
                    } else {
                        il32 % n < n - 1
                    })
        })
        .collect()
}

/// Rows of `token_embd.weight`, else `{arch}.vocab_size`, else the number of
/// `tokenizer.ggml.tokens`.
fn vocab_size(m: &Meta, model: &GgufModel) -> Result<u64, ParamsError> {
    if let Some(rows) = model
        .tensor("token_embd.weight")
        .and_then(|t| t.dims.get(1))
    {
        return Ok(*rows);
    }
    if let Some(n) = m.u32_opt("vocab_size")? {
        return Ok(n.into());
    }
    Ok(m.file.array_len("tokenizer.ggml.tokens").unwrap_or(0) as u64)
}

/// `llama_ftype_name` (src/llama-model-loader.cpp) by `LLAMA_FTYPE_*` id
/// (`include/llama.h`).
fn ftype_name(ftype: u32) -> Option<&'static str> {
    Some(match ftype {
        0 => "all F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K - Medium",
        11 => "Q3_K - Small",
        12 => "Q3_K - Medium",
        13 => "Q3_K - Large",
        14 => "Q4_K - Small",
        15 => "Q4_K - Medium",
        16 => "Q5_K - Small",
        17 => "Q5_K - Medium",
        18 => "Q6_K",
        19 => "IQ2_XXS - 2.0625 bpw",
        20 => "IQ2_XS - 2.3125 bpw",
        21 => "Q2_K - Small",
        22 => "IQ3_XS - 3.3 bpw",
        23 => "IQ3_XXS - 3.0625 bpw",
        24 => "IQ1_S - 1.5625 bpw",
        25 => "IQ4_NL - 4.5 bpw",
        26 => "IQ3_S - 3.4375 bpw",
        27 => "IQ3_S mix - 3.66 bpw",
        28 => "IQ2_S - 2.5 bpw",
        29 => "IQ2_M - 2.7 bpw",
        30 => "IQ4_XS - 4.25 bpw",
        31 => "IQ1_M - 1.75 bpw",
        32 => "BF16",
        36 => "TQ1_0 - 1.69 bpw ternary",
        37 => "TQ2_0 - 2.06 bpw ternary",
        38 => "MXFP4 MoE",
        39 => "NVFP4",
        40 => "Q1_0",
        41 => "Q2_0",
        _ => return None,
    })
}

/// The `LLAMA_FTYPE_*` llama_model_loader guesses from the most common
/// tensor type (the `switch (type_max)`); `ALL_F32` for types it does not
/// map.
fn ftype_of_type(ty: GgmlType) -> u32 {
    match ty.id {
        0 => 0,   // F32 -> ALL_F32
        1 => 1,   // F16
        30 => 32, // BF16
        2 => 2,   // Q4_0
        3 => 3,   // Q4_1
        6 => 8,   // Q5_0
        7 => 9,   // Q5_1
        8 => 7,   // Q8_0
        10 => 10, // Q2_K
        11 => 12, // Q3_K -> Q3_K_M
        12 => 15, // Q4_K -> Q4_K_M
        13 => 17, // Q5_K -> Q5_K_M
        14 => 18, // Q6_K
        34 => 36, // TQ1_0
        35 => 37, // TQ2_0
        16 => 19, // IQ2_XXS
        17 => 20, // IQ2_XS
        22 => 28, // IQ2_S
        18 => 23, // IQ3_XXS
        19 => 24, // IQ1_S
        29 => 31, // IQ1_M
        20 => 25, // IQ4_NL
        23 => 30, // IQ4_XS
        21 => 26, // IQ3_S
        40 => 39, // NVFP4
        41 => 40, // Q1_0
        42 => 41, // Q2_0
        _ => 0,
    }
}

/// llama.cpp's file-type name, as `llama-server` prints it as `file type`:
/// from `general.file_type`, else guessed from the most common tensor type
/// and prefixed `(guessed) `.
fn quantization(file: &GgufFile, model: &GgufModel) -> String {
    let (ftype, guessed) = match file.get_u64("general.file_type") {
        Some(ft) => (u32::try_from(ft).unwrap_or(u32::MAX), false),
        None => match dominant_type(model) {
            Some(ty) => (ftype_of_type(ty), true),
            None => return String::new(),
        },
    };
    let name = ftype_name(ftype & !FTYPE_GUESSED).unwrap_or("unknown, may not work");
    if guessed || ftype & FTYPE_GUESSED != 0 {
        format!("(guessed) {name}")
    } else {
        name.to_owned()
    }
}

/// The most common tensor type, ties going to the type that reached the
/// count first in llama_model_loader's `weights_map` order
/// (`weight_name_comparer`: by `blk.N.` layer, then by name).
fn dominant_type(model: &GgufModel) -> Option<GgmlType> {
    let mut tensors: Vec<&TensorInfo> = model.tensors().collect();
    tensors.sort_by(|a, b| {
        (layer_of(&a.name), a.name.as_str()).cmp(&(layer_of(&b.name), b.name.as_str()))
    });
    let mut counts: HashMap<u32, u32> = HashMap::new();
    let mut best: Option<(GgmlType, u32)> = None;
    for t in tensors {
        let n = counts.entry(t.ty.id).or_insert(0);
        *n += 1;
        if best.is_none_or(|(_, max)| max < *n) {
            best = Some((t.ty, *n));
        }
    }
    best.map(|(ty, _)| ty)
}

/// Where a model's tensor bytes sit, over every part of a split set: what
/// a layer split (llama.cpp RPC, `--tensor-split`) moves between nodes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct WeightLayout {
    /// Bytes of `blk.N.*` for each block N < `block_count`.
    blocks: Vec<u64>,
    /// Bytes of the input embedding (`token_embd*`) and of every other
    /// tensor outside the blocks and the output head (e.g. `rope_freqs`,
    /// or a `blk.N` beyond `block_count`): llama.cpp keeps them with the
    /// input layer.
    input: u64,
    /// Bytes of the output head: `output*` (`output.weight`,
    /// `output_norm.*`).
    output: u64,
}

/// Sums tensor bytes per block, input and output; the three add up to
/// [`GgufModel::weight_bytes`].
fn weight_layout(model: &GgufModel, n_layer: usize) -> WeightLayout {
    let mut l = WeightLayout {
        blocks: vec![0; n_layer],
        input: 0,
        output: 0,
    };
    for t in model.tensors() {
        let slot = match usize::try_from(layer_of(&t.name)) {
            Ok(i) if i < n_layer => &mut l.blocks[i],
            _ if t.name.starts_with("output") => &mut l.output,
            _ => &mut l.input,
        };
        *slot = slot.saturating_add(t.bytes);
    }
    l
}

/// `sscanf(name, "blk.%d.", &layer)`, -1 when it does not match.
fn layer_of(name: &str) -> i64 {
    let Some(rest) = name.strip_prefix("blk.") else {
        return -1;
    };
    let end = rest
        .char_indices()
        .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && (c == '-' || c == '+'))))
        .map_or(rest.len(), |(i, _)| i);
    rest[..end].parse().unwrap_or(-1)
}

/// Typed access to one file's metadata, with errors that name the key.
struct Meta<'a> {
    file: &'a GgufFile,
    path: &'a Path,
    arch: String,
}

impl Meta<'_> {
    /// `{arch}.{suffix}`, or the key itself when it has no `{arch}.` part.
    fn key(&self, suffix: &str) -> String {
        if suffix.starts_with("general.") || suffix.starts_with("tokenizer.") {
            suffix.to_owned()
        } else {
            format!("{}.{suffix}", self.arch)
        }
    }

    fn offset(&self, key: &str) -> u64 {
        self.file.value_offset(key).unwrap_or(0)
    }

    fn wrong_type(&self, key: &str, expected: &'static str, v: &Value) -> ParamsError {
        ParamsError::WrongType {
            path: self.path.to_owned(),
            offset: self.offset(key),
            key: key.to_owned(),
            expected,
            found: describe(v),
        }
    }

    fn range(&self, suffix: &str, value: impl ToString, reason: String) -> ParamsError {
        let key = self.key(suffix);
        ParamsError::OutOfRange {
            path: self.path.to_owned(),
            offset: self.offset(&key),
            key,
            value: value.to_string(),
            reason,
        }
    }

    fn missing(&self, key: String) -> ParamsError {
        ParamsError::MissingKey {
            path: self.path.to_owned(),
            key,
            arch: self.arch.clone(),
        }
    }

    fn str_opt(&self, key: &str) -> Result<Option<&str>, ParamsError> {
        match self.file.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.wrong_type(key, "a string", v)),
        }
    }

    /// A scalar integer that fits `u32`.
    fn u32_opt(&self, suffix: &str) -> Result<Option<u32>, ParamsError> {
        let key = self.key(suffix);
        match self.file.get(&key) {
            None => Ok(None),
            Some(v) => self.to_u32(&key, v).map(Some),
        }
    }

    fn u32_req(&self, suffix: &str) -> Result<u32, ParamsError> {
        self.u32_opt(suffix)?
            .ok_or_else(|| self.missing(self.key(suffix)))
    }

    fn to_u32(&self, key: &str, v: &Value) -> Result<u32, ParamsError> {
        if !is_integer(v) {
            return Err(self.wrong_type(key, "an unsigned integer", v));
        }
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| ParamsError::OutOfRange {
                path: self.path.to_owned(),
                offset: self.offset(key),
                key: key.to_owned(),
                value: describe(v),
                reason: "does not fit an unsigned 32-bit integer".into(),
            })
    }

    /// `get_key_or_arr`: a scalar repeated for every layer, or an array with
    /// exactly one entry per layer.
    fn per_layer(&self, suffix: &str, n_layer: usize) -> Result<Option<Vec<u32>>, ParamsError> {
        let key = self.key(suffix);
        match self.file.get(&key) {
            None => Ok(None),
            Some(Value::Array(_, items)) => {
                if items.len() != n_layer {
                    return Err(ParamsError::ArrayLength {
                        path: self.path.to_owned(),
                        offset: self.offset(&key),
                        key,
                        len: items.len(),
                        expected: n_layer,
                    });
                }
                items
                    .iter()
                    .map(|v| self.to_u32(&key, v))
                    .collect::<Result<_, _>>()
                    .map(Some)
            }
            Some(v) => self.to_u32(&key, v).map(|n| Some(vec![n; n_layer])),
        }
    }

    /// `{arch}.attention.sliding_window_pattern` when it is an array of
    /// per-layer flags (`get_arr` into `is_swa_impl`: entries past the array
    /// stay dense; at most `LLAMA_MAX_LAYERS` entries).
    fn swa_pattern_array(&self, n_layer: usize) -> Result<Option<Vec<bool>>, ParamsError> {
        let key = self.key("attention.sliding_window_pattern");
        let Some(Value::Array(_, items)) = self.file.get(&key) else {
            return Ok(None);
        };
        if items.len() as u64 > MAX_LAYERS {
            return Err(ParamsError::ArrayLength {
                path: self.path.to_owned(),
                offset: self.offset(&key),
                key,
                len: items.len(),
                expected: n_layer,
            });
        }
        let mut flags = vec![false; n_layer];
        for (flag, v) in flags.iter_mut().zip(items) {
            *flag = self.to_u32(&key, v)? != 0;
        }
        Ok(Some(flags))
    }
}

fn is_integer(v: &Value) -> bool {
    matches!(
        v,
        Value::U8(_)
            | Value::I8(_)
            | Value::U16(_)
            | Value::I16(_)
            | Value::U32(_)
            | Value::I32(_)
            | Value::U64(_)
            | Value::I64(_)
            | Value::Bool(_)
    )
}

/// A short description of a value for error messages.
fn describe(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().count() > 40 => {
            format!("string {:?}...", s.chars().take(40).collect::<String>())
        }
        Value::String(s) => format!("string {s:?}"),
        Value::Array(ty, items) => format!("array of {} {ty:?}", items.len()),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap what they built themselves.
mod tests {
    use super::*;
    use crate::gguf::fixtures::{SparseModel, VocabStyle, write_sparse_with};
    use crate::gguf::read::{read_header_from, read_model};
    use crate::gguf::types::ValueType;
    use crate::gguf::write::{GgufWriter, TensorData};
    use std::io::Cursor;

    fn params_of(w: &GgufWriter) -> Result<ModelParams, ParamsError> {
        let (mut bytes, offsets) = w.header_bytes().unwrap();
        // Tensor data as zeros (sizes only matter).
        if let (Some(t), Some(off)) = (w.tensors().last(), offsets.last()) {
            let end = bytes.len() as u64 + off + t.ty.tensor_bytes(&t.dims).unwrap();
            bytes.resize(end as usize, 0);
        }
        let file =
            read_header_from(Cursor::new(&bytes), bytes.len() as u64, Path::new("p.gguf")).unwrap();
        model_params(&GgufModel::from(file))
    }

    fn base(arch: &str, n_layer: u32) -> GgufWriter {
        let mut w = GgufWriter::new();
        let k = |s: &str| format!("{arch}.{s}");
        w.meta("general.architecture", Value::String(arch.into()))
            .meta(&k("context_length"), Value::U32(4096))
            .meta(&k("embedding_length"), Value::U32(256))
            .meta(&k("block_count"), Value::U32(n_layer))
            .meta(&k("feed_forward_length"), Value::U32(512))
            .meta(&k("attention.head_count"), Value::U32(8));
        w
    }

    fn ints(ty: ValueType, v: &[u32]) -> Value {
        Value::Array(
            ty,
            v.iter()
                .map(|&x| match ty {
                    ValueType::I32 => Value::I32(x as i32),
                    _ => Value::U32(x),
                })
                .collect(),
        )
    }

    #[test]
    fn fixture_models_give_their_published_hyper_parameters() {
        let dir = tempfile::tempdir().unwrap();
        for kind in SparseModel::ALL {
            let spec = kind.spec();
            let path = dir.path().join(spec.file_name);
            write_sparse_with(kind, &path, VocabStyle::SizeOnly).unwrap();
            let model = read_model(&path).unwrap();
            let p = model_params(&model).unwrap();
            let n = p.block_count as usize;
            assert_eq!(p.architecture, spec.arch);
            assert_eq!(p.split_count, 1);
            assert_eq!(p.tensor_count, model.first().tensors.len() as u64);
            let bytes: u64 = model.first().tensors.iter().map(|t| t.bytes).sum();
            assert_eq!(p.weight_bytes, bytes);
            assert!(p.weight_bytes < model.file_size(), "{}", spec.name);
            assert!(p.parameter_count > 0);
            let embd = model.tensor("token_embd.weight").unwrap();
            assert_eq!(p.vocab_size, embd.dims[1], "{}", spec.name);
            for v in [&p.head_count, &p.head_count_kv] {
                assert_eq!(v.len(), n, "{}", spec.name);
            }
            assert_eq!((p.swa_layers.len(), p.recurrent_layers.len()), (n, n));
            assert!(!p.name.is_empty() && !p.quantization.is_empty());
            assert!(
                !p.quantization.starts_with("(guessed)"),
                "{}",
                p.quantization
            );

            match kind {
                SparseModel::Llama31_8B => {
                    assert_eq!(
                        (n, p.context_length, p.embedding_length),
                        (32, 131_072, 4096)
                    );
                    assert!(p.head_count.iter().all(|&h| h == 32));
                    assert!(p.head_count_kv.iter().all(|&h| h == 8));
                    assert_eq!((p.key_length, p.value_length), (128, 128));
                    assert_eq!(p.rope_dimension_count, 128);
                    assert_eq!(p.feed_forward_length, 14336);
                    assert_eq!(p.quantization, "Q4_K - Medium");
                    assert_eq!(p.vocab_size, 128_256);
                    assert_eq!(p.expert_count, 0);
                }
                SparseModel::Qwen3Coder30B => {
                    assert_eq!(n, 48);
                    assert!(p.head_count_kv.iter().all(|&h| h == 4));
                    // key_length 128 overrides n_embd / n_head = 2048 / 32.
                    assert_eq!((p.key_length, p.value_length), (128, 128));
                    assert_eq!((p.expert_count, p.expert_used_count), (128, 8));
                    assert_eq!(p.quantization, "Q8_0");
                }
                SparseModel::Qwen3_235B => {
                    assert_eq!(n, 94);
                    assert_eq!(p.quantization, "Q3_K - Medium");
                }
                SparseModel::DeepSeekV31 => {
                    assert_eq!(n, 61);
                    assert!(p.head_count_kv.iter().all(|&h| h == 1));
                    assert_eq!(p.kv_lora_rank, 512);
                    assert_eq!((p.key_length, p.value_length), (576, 512));
                    assert_eq!((p.key_length_mla, p.value_length_mla), (192, 128));
                    assert_eq!(p.rope_dimension_count, 64);
                    assert_eq!(p.leading_dense_block_count, 3);
                    assert_eq!(
                        (p.expert_count, p.expert_used_count, p.expert_shared_count),
                        (256, 8, 1)
                    );
                    assert_eq!(p.quantization, "IQ1_S - 1.5625 bpw");
                    assert_eq!(p.sliding_window, 0);
                }
                SparseModel::GptOss20B => {
                    assert_eq!(n, 24);
                    assert_eq!(p.sliding_window, 128);
                    // load_swa_pattern(ml, 2): even layers SWA.
                    let expected: Vec<bool> = (0..n).map(|i| i % 2 == 0).collect();
                    assert_eq!(p.swa_layers, expected);
                    assert_eq!((p.key_length, p.value_length), (64, 64));
                    assert_eq!((p.expert_count, p.expert_used_count), (32, 4));
                    assert_eq!(p.quantization, "MXFP4 MoE");
                }
                SparseModel::Nemotron3Nano30B => {
                    assert_eq!(n, 52);
                    let pattern = crate::gguf::fixtures::SparseModel::Nemotron3Nano30B;
                    let _ = pattern;
                    let mamba = p.recurrent_layers.iter().filter(|&&r| r).count();
                    let attn = p.head_count_kv.iter().filter(|&&h| h > 0).count();
                    assert_eq!((mamba, attn), (23, 6));
                    for i in 0..n {
                        assert!(!(p.recurrent_layers[i] && p.head_count_kv[i] > 0));
                    }
                    assert_eq!(
                        (
                            p.ssm_conv_kernel,
                            p.ssm_inner_size,
                            p.ssm_state_size,
                            p.ssm_group_count,
                            p.ssm_time_step_rank
                        ),
                        (4, 4096, 128, 8, 64)
                    );
                    assert_eq!((p.key_length, p.value_length), (128, 128));
                    assert!(p.swa_layers.iter().all(|&s| !s));
                }
                SparseModel::Qwen3Next80B => {
                    assert_eq!(n, 48);
                    // full_attention_interval 4: layers 3, 7, ..., 47 attend.
                    let full: Vec<usize> = (0..n).filter(|&i| !p.recurrent_layers[i]).collect();
                    assert_eq!(full, (0..12).map(|k| 4 * k + 3).collect::<Vec<_>>());
                    assert_eq!((p.key_length, p.value_length), (256, 256));
                    assert_eq!(p.rope_dimension_count, 64);
                    assert_eq!(
                        (
                            p.ssm_conv_kernel,
                            p.ssm_inner_size,
                            p.ssm_state_size,
                            p.ssm_group_count,
                            p.ssm_time_step_rank
                        ),
                        (4, 4096, 128, 16, 32)
                    );
                    assert_eq!((p.expert_count, p.expert_used_count), (512, 10));
                    assert_eq!(p.expert_feed_forward_length, 512);
                    assert_eq!(p.nextn_predict_layers, 0);
                    assert_eq!(p.quantization, "Q4_K - Medium");
                }
                SparseModel::Qwen35_35B => {
                    // 40 trunk blocks, 10 of them full attention, and the
                    // MTP block, which is not recurrent.
                    assert_eq!((n, p.nextn_predict_layers), (41, 1));
                    let full: Vec<usize> = (0..n).filter(|&i| !p.recurrent_layers[i]).collect();
                    let mut expected: Vec<usize> = (0..10).map(|k| 4 * k + 3).collect();
                    expected.push(40);
                    assert_eq!(full, expected);
                    assert_eq!((p.expert_count, p.expert_used_count), (256, 8));
                }
                SparseModel::Glm45Air => {
                    // 46 trunk blocks and the NextN block.
                    assert_eq!((n, p.nextn_predict_layers), (47, 1));
                    assert!(p.head_count_kv.iter().all(|&h| h == 8));
                    assert_eq!(p.leading_dense_block_count, 1);
                    assert_eq!(
                        (p.expert_count, p.expert_used_count, p.expert_shared_count),
                        (128, 8, 1)
                    );
                    assert_eq!(p.expert_feed_forward_length, 1408);
                    assert!(p.recurrent_layers.iter().all(|&r| !r));
                }
                SparseModel::MiniMaxM2 => {
                    assert_eq!(n, 62);
                    assert_eq!((p.head_count[0], p.head_count_kv[0]), (48, 8));
                    assert_eq!((p.expert_count, p.expert_used_count), (256, 8));
                    assert_eq!(p.expert_feed_forward_length, 1536);
                    assert_eq!(p.quantization, "Q3_K - Medium");
                }
                SparseModel::Gemma3_27B => {
                    assert_eq!((n, p.embedding_length), (62, 5376));
                    assert_eq!(p.sliding_window, 1024);
                    // load_swa_pattern(ml, 6): every sixth layer is global.
                    let expected: Vec<bool> = (0..n).map(|i| i % 6 != 5).collect();
                    assert_eq!(p.swa_layers, expected);
                    assert_eq!(p.swa_layers.iter().filter(|&&s| !s).count(), 10);
                    // head_dim 128, not n_embd / n_head = 168.
                    assert_eq!((p.key_length, p.value_length), (128, 128));
                    assert_eq!((p.key_length_swa, p.value_length_swa), (0, 0));
                    assert!(p.head_count_kv.iter().all(|&h| h == 16));
                    assert_eq!(p.vocab_size, 262_144);
                    // Tied: the embedding is the output head too.
                    let embd = model.tensor("token_embd.weight").unwrap().bytes;
                    assert_eq!(p.tied_output_bytes, embd);
                    assert!(p.attention_extra_ops && !p.ffn_ungated);
                }
                SparseModel::StarCoder2_15B => {
                    assert_eq!((n, p.context_length), (40, 16_384));
                    assert!(p.head_count_kv.iter().all(|&h| h == 4));
                    // No window rule for starcoder2: llama.cpp reads none.
                    assert_eq!(p.sliding_window, 0);
                    assert!(p.swa_layers.iter().all(|&s| !s));
                    assert!(p.ffn_ungated && p.attention_extra_ops);
                    assert_eq!(p.tied_output_bytes, 0);
                }
                SparseModel::Qwen3_32B => {
                    assert_eq!(
                        (n, p.context_length, p.embedding_length),
                        (64, 40_960, 5120)
                    );
                    assert!(p.head_count.iter().all(|&h| h == 64));
                    assert_eq!((p.key_length, p.value_length), (128, 128));
                    assert!(p.attention_extra_ops && !p.ffn_ungated);
                }
                SparseModel::SeedOss36B => {
                    assert_eq!((n, p.context_length), (64, 524_288));
                    assert!(p.head_count.iter().all(|&h| h == 80));
                    assert_eq!(p.vocab_size, 155_136);
                    assert!(p.attention_extra_ops && !p.ffn_ungated);
                }
                // Not in ALL: `fixtures/lfm2.rs` and `rwkv7.rs` check them.
                SparseModel::Lfm2_1_2B | SparseModel::Rwkv7_1_5B => {}
            }
        }
    }

    #[test]
    fn sliding_window_head_sizes_and_kv_sharing_follow_load_hparams() {
        // key_length_swa / value_length_swa apply to the SWA layers only.
        let mut w = base("gemma4", 6);
        w.meta("gemma4.attention.key_length", Value::U32(512))
            .meta("gemma4.attention.value_length", Value::U32(512))
            .meta("gemma4.attention.key_length_swa", Value::U32(256))
            .meta("gemma4.attention.value_length_swa", Value::U32(256))
            .meta("gemma4.attention.sliding_window", Value::U32(512))
            .meta(
                "gemma4.attention.sliding_window_pattern",
                Value::Array(
                    ValueType::Bool,
                    [true, true, false, true, true, false]
                        .map(Value::Bool)
                        .to_vec(),
                ),
            )
            .meta("gemma4.attention.shared_kv_layers", Value::U32(2));
        let p = params_of(&w).unwrap();
        assert_eq!((p.key_length_swa, p.value_length_swa), (256, 256));
        // n_layer_kv_from_start = n_layer - shared_kv_layers.
        assert_eq!(p.kv_layer_count, 4);
        w.meta("gemma4.attention.shared_kv_layers", Value::U32(6));
        let err = params_of(&w).unwrap_err();
        assert!(
            err.to_string()
                .contains("`gemma4.attention.shared_kv_layers`: 6 leaves no layer"),
            "{err}"
        );

        // gemma3n: 20 layers keep their KV (fixed in load_arch_hparams).
        let mut w = base("gemma3n", 30);
        w.meta("gemma3n.attention.sliding_window", Value::U32(512));
        assert_eq!(params_of(&w).unwrap().kv_layer_count, 20);
        // Equal sizes are kept as 0 (= the full layers' sizes); other
        // architectures share nothing.
        let mut w = base("llama", 2);
        w.meta("llama.attention.key_length_swa", Value::U32(32));
        let p = params_of(&w).unwrap();
        assert_eq!((p.key_length_swa, p.kv_layer_count), (0, 0));
    }

    #[test]
    fn tensor_names_say_tied_output_ungated_ffn_and_attention_extras() {
        let mut w = base("starcoder2", 1);
        for (name, dims) in [
            ("token_embd.weight", &[64u64, 10][..]),
            ("blk.0.ffn_up.weight", &[64, 128]),
            ("blk.0.attn_q.bias", &[64]),
        ] {
            w.tensor(name, GgmlType::F32, dims, TensorData::Hole);
        }
        let p = params_of(&w).unwrap();
        assert_eq!(p.tied_output_bytes, 64 * 10 * 4);
        assert!(p.ffn_ungated && p.attention_extra_ops);
        w.tensor("output.weight", GgmlType::F32, &[64, 10], TensorData::Hole)
            .tensor(
                "blk.0.ffn_gate.weight",
                GgmlType::F32,
                &[64, 128],
                TensorData::Hole,
            );
        let p = params_of(&w).unwrap();
        assert_eq!(p.tied_output_bytes, 0);
        assert!(!p.ffn_ungated);
        // No Q/K norms or biases: llama-style attention.
        let p = params_of(&base("llama", 1)).unwrap();
        assert!(!p.attention_extra_ops);
    }

    #[test]
    fn block_input_and_output_bytes_add_up_to_the_weights_of_every_fixture() {
        let dir = tempfile::tempdir().unwrap();
        for kind in SparseModel::ALL {
            let name = kind.spec().name;
            let path = dir.path().join(kind.spec().file_name);
            write_sparse_with(kind, &path, VocabStyle::SizeOnly).unwrap();
            let model = read_model(&path).unwrap();
            let p = model_params(&model).unwrap();
            assert_eq!(p.block_weight_bytes.len(), p.block_count as usize, "{name}");
            assert!(p.block_weight_bytes.iter().all(|&b| b > 0), "{name}");
            let blocks: u64 = p.block_weight_bytes.iter().sum();
            assert_eq!(
                blocks + p.input_weight_bytes + p.output_weight_bytes,
                p.weight_bytes,
                "{name}"
            );
            let embd = model.tensor("token_embd.weight").unwrap().bytes;
            assert!(p.input_weight_bytes >= embd, "{name}");
            let norm = model.tensor("output_norm.weight").unwrap().bytes;
            assert!(p.output_weight_bytes >= norm, "{name}");
            if kind == SparseModel::DeepSeekV31 {
                // Three dense FFN blocks, then MoE blocks with 256 experts.
                let dense = p.leading_dense_block_count as usize;
                assert_eq!(dense, 3);
                let max_dense = p.block_weight_bytes[..dense].iter().max().unwrap();
                let min_moe = p.block_weight_bytes[dense..].iter().min().unwrap();
                assert!(max_dense * 4 < *min_moe, "{max_dense} vs {min_moe}");
            }
        }
    }

    #[test]
    fn weight_layout_sums_split_parts_and_puts_other_tensors_with_the_input() {
        use crate::gguf::read::{
            KEY_SPLIT_COUNT, KEY_SPLIT_NO, KEY_SPLIT_TENSORS_COUNT, split_part_name,
        };
        let dir = tempfile::tempdir().unwrap();
        // 2 blocks over three parts; rope_freqs and a stray blk.7 count as input.
        let parts: [&[(&str, u64)]; 3] = [
            &[("token_embd.weight", 8), ("rope_freqs.weight", 2)],
            &[
                ("blk.0.attn_q.weight", 4),
                ("blk.1.attn_q.weight", 6),
                ("blk.0.ffn_up.weight", 3),
            ],
            &[
                ("blk.1.ffn_up.weight", 5),
                ("blk.7.x.weight", 1),
                ("output_norm.weight", 2),
                ("output.weight", 8),
            ],
        ];
        let total = parts.iter().map(|p| p.len()).sum::<usize>() as i32;
        let mut first = None;
        for (i, tensors) in parts.iter().enumerate() {
            let mut w = if i == 0 {
                base("llama", 2)
            } else {
                GgufWriter::new()
            };
            w.meta(KEY_SPLIT_NO, Value::U16(i as u16))
                .meta(KEY_SPLIT_COUNT, Value::U16(3))
                .meta(KEY_SPLIT_TENSORS_COUNT, Value::I32(total));
            for (name, n) in tensors.iter() {
                w.tensor(
                    name,
                    GgmlType::F32,
                    &[*n],
                    TensorData::Bytes(vec![0; *n as usize * 4]),
                );
            }
            let path = dir.path().join(split_part_name("m", i as u32 + 1, 3));
            w.write_to(&path).unwrap();
            first.get_or_insert(path);
        }
        let model = read_model(&first.unwrap()).unwrap();
        let p = model_params(&model).unwrap();
        assert_eq!(p.split_count, 3);
        assert_eq!(p.block_weight_bytes, [(4 + 3) * 4, (6 + 5) * 4]);
        assert_eq!(p.input_weight_bytes, (8 + 2 + 1) * 4);
        assert_eq!(p.output_weight_bytes, (2 + 8) * 4);
        assert_eq!(p.weight_bytes, 39 * 4);
    }

    #[test]
    fn per_layer_keys_take_scalars_or_one_entry_per_layer() {
        let mut w = base("llama", 4);
        w.meta(
            "llama.attention.head_count",
            ints(ValueType::I32, &[8, 8, 4, 4]),
        )
        .meta(
            "llama.feed_forward_length",
            ints(ValueType::U32, &[100, 200, 300, 400]),
        )
        .meta("llama.rope.dimension_count", Value::U32(32));
        let p = params_of(&w).unwrap();
        assert_eq!(p.head_count, [8, 8, 4, 4]);
        // head_count_kv defaults to head_count.
        assert_eq!(p.head_count_kv, [8, 8, 4, 4]);
        assert_eq!(p.feed_forward_length, 100);
        // n_embd / n_head(0)
        assert_eq!((p.key_length, p.value_length), (32, 32));

        w.meta("llama.attention.head_count_kv", Value::U16(2));
        assert_eq!(params_of(&w).unwrap().head_count_kv, [2; 4]);

        w.meta(
            "llama.attention.head_count_kv",
            ints(ValueType::U32, &[1, 2, 3]),
        );
        let err = params_of(&w).unwrap_err();
        assert!(
            matches!(&err, ParamsError::ArrayLength { len: 3, expected: 4, key, .. } if key == "llama.attention.head_count_kv"),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.starts_with("p.gguf: at byte "), "{msg}");
    }

    #[test]
    fn head_sizes_default_like_load_hparams() {
        let mut w = base("qwen3moe", 2);
        w.meta("qwen3moe.attention.key_length", Value::U32(64));
        let p = params_of(&w).unwrap();
        // value_length defaults to n_embd / n_head, not to key_length.
        assert_eq!((p.key_length, p.value_length), (64, 32));
        // n_rot defaults to the key head size.
        assert_eq!(p.rope_dimension_count, 64);

        // llama insists on n_rot == key_length.
        let mut w = base("llama", 2);
        w.meta("llama.rope.dimension_count", Value::U32(16));
        let err = params_of(&w).unwrap_err();
        assert!(matches!(err, ParamsError::OutOfRange { .. }), "{err}");

        // No heads: no head sizes.
        let mut w = base("mamba", 2);
        w.meta("mamba.attention.head_count", Value::U32(0));
        let p = params_of(&w).unwrap();
        assert_eq!(
            (p.key_length, p.value_length, p.rope_dimension_count),
            (0, 0, 0)
        );
        assert_eq!(p.recurrent_layers, [true, true]);
    }

    #[test]
    fn sliding_window_layers_follow_each_architecture() {
        // gpt-oss: window required.
        let w = base("gpt-oss", 4);
        let err = params_of(&w).unwrap_err();
        assert!(
            matches!(&err, ParamsError::MissingKey { key, .. } if key == "gpt-oss.attention.sliding_window"),
            "{err}"
        );
        // A scalar period replaces the default 2.
        let mut w = base("gpt-oss", 6);
        w.meta("gpt-oss.attention.sliding_window", Value::U32(128))
            .meta("gpt-oss.attention.sliding_window_pattern", Value::U32(3));
        let p = params_of(&w).unwrap();
        assert_eq!(p.swa_layers, [true, true, false, true, true, false]);
        // A per-layer array wins; entries past it stay dense.
        w.meta(
            "gpt-oss.attention.sliding_window_pattern",
            Value::Array(ValueType::Bool, vec![Value::Bool(false), Value::Bool(true)]),
        );
        let p = params_of(&w).unwrap();
        assert_eq!(p.swa_layers, [false, true, false, false, false, false]);
        // Trailing MTP layers are dense.
        let mut w = base("gpt-oss", 4);
        w.meta("gpt-oss.attention.sliding_window", Value::U32(128))
            .meta("gpt-oss.nextn_predict_layers", Value::U32(2));
        assert_eq!(
            params_of(&w).unwrap().swa_layers,
            [true, false, false, false]
        );

        // gemma2: 4096 by default, every other layer.
        let p = params_of(&base("gemma2", 4)).unwrap();
        assert_eq!(p.sliding_window, 4096);
        assert_eq!(p.swa_layers, [true, false, true, false]);
        // gemma3: only with a window; period 6.
        assert!(
            params_of(&base("gemma3", 7))
                .unwrap()
                .swa_layers
                .iter()
                .all(|&s| !s)
        );
        let mut w = base("gemma3", 7);
        w.meta("gemma3.attention.sliding_window", Value::U32(1024));
        let p = params_of(&w).unwrap();
        assert_eq!(p.swa_layers, [true, true, true, true, true, false, true]);

        // llama ignores a window key; an unknown architecture reports it
        // but marks layers only from an explicit per-layer array.
        let mut w = base("llama", 2);
        w.meta("llama.attention.sliding_window", Value::U32(4096));
        let p = params_of(&w).unwrap();
        assert_eq!(p.swa_layers, [false, false]);
        let mut w = base("someday", 2);
        w.meta("someday.attention.sliding_window", Value::U32(512));
        let p = params_of(&w).unwrap();
        assert_eq!(
            (p.sliding_window, p.swa_layers.clone()),
            (512, vec![false, false])
        );
        w.meta(
            "someday.attention.sliding_window_pattern",
            ints(ValueType::U32, &[1, 0]),
        );
        assert_eq!(params_of(&w).unwrap().swa_layers, [true, false]);
    }

    #[test]
    fn nemotron_h_layers_are_recurrent_when_they_have_no_kv_heads_and_no_ffn() {
        let mut w = base("nemotron_h", 5);
        for (k, v) in [
            ("ssm.conv_kernel", 4),
            ("ssm.inner_size", 512),
            ("ssm.state_size", 16),
            ("ssm.time_step_rank", 8),
            ("ssm.group_count", 2),
        ] {
            w.meta(&format!("nemotron_h.{k}"), Value::U32(v));
        }
        w.meta(
            "nemotron_h.attention.head_count_kv",
            ints(ValueType::I32, &[0, 2, 0, 0, 0]),
        )
        .meta(
            "nemotron_h.feed_forward_length",
            ints(ValueType::I32, &[0, 0, 64, 0, 0]),
        )
        .meta("nemotron_h.nextn_predict_layers", Value::U32(1));
        let p = params_of(&w).unwrap();
        // Layer 4 is an MTP block: dense even with no heads and no FFN.
        assert_eq!(p.recurrent_layers, [true, false, false, true, false]);
        assert_eq!(p.head_count_kv, [0, 2, 0, 0, 0]);
        assert_eq!(p.ssm_inner_size, 512);
        assert_eq!(p.feed_forward_length, 0);

        let mut w = base("nemotron_h", 1);
        w.meta("nemotron_h.ssm.conv_kernel", Value::U32(4));
        let err = params_of(&w).unwrap_err();
        assert!(
            matches!(&err, ParamsError::MissingKey { key, arch, .. } if key == "nemotron_h.ssm.inner_size" && arch == "nemotron_h"),
            "{err}"
        );
    }

    #[test]
    fn qwen3next_layers_are_linear_attention_but_each_interval_th() {
        let with_ssm = |n: u32| {
            let mut w = base("qwen3next", n);
            for (k, v) in [
                ("ssm.conv_kernel", 4),
                ("ssm.inner_size", 512),
                ("ssm.state_size", 16),
                ("ssm.time_step_rank", 8),
                ("ssm.group_count", 4),
            ] {
                w.meta(&format!("qwen3next.{k}"), Value::U32(v));
            }
            w
        };
        // No interval key: 4, the last of each four layers attends.
        let p = params_of(&with_ssm(8)).unwrap();
        assert_eq!(
            p.recurrent_layers,
            [true, true, true, false, true, true, true, false]
        );
        assert_eq!(p.ssm_inner_size, 512);
        // full_attention_interval 2; a trailing MTP block is not recurrent.
        let mut w = with_ssm(5);
        w.meta("qwen3next.full_attention_interval", Value::U32(2))
            .meta("qwen3next.nextn_predict_layers", Value::U32(1));
        let p = params_of(&w).unwrap();
        assert_eq!(p.recurrent_layers, [true, false, true, false, false]);
        assert_eq!(p.nextn_predict_layers, 1);
        // A per-layer array wins over the interval.
        w.meta(
            "qwen3next.attention.recurrent_layers",
            Value::Array(
                ValueType::Bool,
                [true, true, false, false, false]
                    .into_iter()
                    .map(Value::Bool)
                    .collect(),
            ),
        );
        let p = params_of(&w).unwrap();
        assert_eq!(p.recurrent_layers, [true, true, false, false, false]);
        // Wrong length, zero interval, missing ssm sizes: refused.
        w.meta(
            "qwen3next.attention.recurrent_layers",
            Value::Array(ValueType::Bool, vec![Value::Bool(true)]),
        );
        assert!(matches!(
            params_of(&w).unwrap_err(),
            ParamsError::ArrayLength {
                len: 1,
                expected: 5,
                ..
            }
        ));
        let mut w = with_ssm(4);
        w.meta("qwen3next.full_attention_interval", Value::U32(0));
        let err = params_of(&w).unwrap_err().to_string();
        assert!(err.contains("full_attention_interval"), "{err}");
        let err = params_of(&base("qwen3next", 4)).unwrap_err();
        assert!(
            matches!(&err, ParamsError::MissingKey { key, .. } if key == "qwen3next.ssm.conv_kernel"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_refused_with_the_key_and_offset() {
        let mut w = base("llama", 2);
        w.meta("llama.block_count", Value::String("two".into()));
        let err = params_of(&w).unwrap_err();
        assert!(matches!(err, ParamsError::WrongType { .. }), "{err}");
        assert!(
            err.to_string().contains(
                "`llama.block_count`: expected an unsigned integer, found string \"two\""
            ),
            "{err}"
        );

        w.meta("llama.block_count", Value::I32(-1));
        assert!(matches!(
            params_of(&w).unwrap_err(),
            ParamsError::OutOfRange { .. }
        ));
        w.meta("llama.block_count", Value::U32(0));
        assert!(matches!(
            params_of(&w).unwrap_err(),
            ParamsError::OutOfRange { .. }
        ));
        w.meta("llama.block_count", Value::U32(513));
        assert!(matches!(
            params_of(&w).unwrap_err(),
            ParamsError::OutOfRange { .. }
        ));
        w.meta("llama.block_count", Value::U64(2));
        params_of(&w).unwrap();
        w.meta("llama.expert_used_count", Value::U32(2));
        let err = params_of(&w).unwrap_err();
        assert!(err.to_string().contains("exceeds expert_count 0"), "{err}");

        let mut w = GgufWriter::new();
        w.meta("general.name", Value::String("x".into()));
        let err = params_of(&w).unwrap_err();
        assert!(
            matches!(&err, ParamsError::MissingKey { key, .. } if key == "general.architecture"),
            "{err}"
        );

        let mut w = base("llama", 2);
        w.meta("general.architecture", Value::U32(1));
        assert!(matches!(
            params_of(&w).unwrap_err(),
            ParamsError::WrongType { .. }
        ));
    }

    #[test]
    fn unknown_architectures_get_the_generic_fields() {
        let mut w = base("qwen9", 3);
        w.meta("qwen9.attention.head_count_kv", Value::U32(2))
            .meta("qwen9.expert_count", Value::U32(16))
            .meta("qwen9.expert_used_count", ints(ValueType::U32, &[2, 4, 2]))
            .meta(
                "tokenizer.ggml.tokens",
                Value::Array(ValueType::String, vec![Value::String("a".into()); 5]),
            );
        let p = params_of(&w).unwrap();
        assert_eq!(p.architecture, "qwen9");
        assert_eq!(p.block_count, 3);
        assert_eq!(p.head_count_kv, [2, 2, 2]);
        assert_eq!(p.expert_used_count, 4);
        assert_eq!(p.vocab_size, 5);
        assert_eq!(p.recurrent_layers, [false; 3]);
        assert_eq!(p.quantization, "");

        // mmproj files stop at the general keys, as load_hparams does.
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String("clip".into()));
        w.tensor(
            "v.patch_embd.weight",
            GgmlType::F16,
            &[16, 4],
            TensorData::Hole,
        );
        let p = params_of(&w).unwrap();
        assert_eq!(
            (p.architecture.as_str(), p.block_count, p.weight_bytes),
            ("clip", 0, 128)
        );
        assert_eq!(p.quantization, "(guessed) F16");
    }

    #[test]
    fn quantization_names_match_llama_ftype_name() {
        let mut w = base("llama", 1);
        w.meta("general.file_type", Value::U32(15));
        assert_eq!(params_of(&w).unwrap().quantization, "Q4_K - Medium");
        w.meta("general.file_type", Value::U32(1024 | 7));
        assert_eq!(params_of(&w).unwrap().quantization, "(guessed) Q8_0");
        w.meta("general.file_type", Value::U32(4));
        assert_eq!(params_of(&w).unwrap().quantization, "unknown, may not work");

        // Guessed from the most common type, ties to the first in
        // weight_name_comparer order (layer, then name).
        let mut w = base("llama", 2);
        for (name, ty, dims) in [
            ("blk.1.attn_q.weight", GgmlType::Q4_K, &[256u64, 2][..]),
            ("blk.0.attn_q.weight", GgmlType::Q4_K, &[256, 2]),
            ("output_norm.weight", GgmlType::F32, &[256]),
            ("blk.0.attn_norm.weight", GgmlType::F32, &[256]),
            ("token_embd.weight", GgmlType::Q6_K, &[256, 4]),
        ] {
            w.tensor(name, ty, dims, TensorData::Hole);
        }
        // Q4_K and F32 both count 2. In file order Q4_K gets there first; in
        // llama.cpp's order (output_norm at layer -1, then blk.0.attn_norm)
        // F32 does.
        let p = params_of(&w).unwrap();
        assert_eq!(p.quantization, "(guessed) all F32");
        assert_eq!(p.vocab_size, 4);
        assert_eq!(p.tensor_count, 5);
        assert_eq!(p.parameter_count, 512 * 2 + 256 * 2 + 1024);
        assert_eq!(p.weight_bytes, 2 * (2 * 144) + 2 * 1024 + 4 * 210);

        assert_eq!(layer_of("blk.12.attn"), 12);
        assert_eq!(layer_of("blk.x"), -1);
        assert_eq!(layer_of("output.weight"), -1);
    }
}
