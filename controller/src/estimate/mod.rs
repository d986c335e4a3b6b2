//! The memory estimate: what one `llama-server` instance will hold in memory
//! for a model at a context size, computed from GGUF header data alone
//! ([`ModelParams`]) so that it matches llama.cpp's own projection
//! (`llama-fit-params --fit-print on`, `common_fit_print` in
//! `common/fit.cpp`).
//!
//! llama.cpp splits a loaded model into three buckets
//! (`llama_context::memory_breakdown` in `src/llama-context.cpp`):
//!
//! * **model**: the weights (`llama_model::memory_breakdown`), here
//!   [`Estimate::weights_bytes`];
//! * **context**: the memory module, i.e. the KV cache and the recurrent
//!   state ([`context`]), here [`Estimate::kv_bytes`];
//! * **compute**: the scheduler's graph buffer, the worst-case graph that
//!   `llama_context::sched_reserve` reserves with ggml-alloc ([`compute`]),
//!   here [`Estimate::compute_bytes`].
//!
//! The logits/embeddings output buffer (`llama_context::output_reserve`) is
//! allocated separately and is in none of the three buckets, so llama.cpp's
//! projection leaves it out; [`Estimate::output_bytes`] reports it and
//! [`Estimate::total_bytes`] includes it.
//!
//! [`observed`] prefers what a real `llama-server` load logged (the agent
//! parses its instances' logs and reports [`proto::domain::ObservedBuffers`])
//! over the formulas when such figures exist. [`engine`] compares the
//! formula with llama.cpp's own projection, which an agent runs
//! (`llama-fit-params`, `ProjectMemory`), and takes llama.cpp's figures
//! when the two disagree by more than 2 %. [`rules`] lists the
//! architectures with their own rules; any other is estimated with the
//! generic ones and the estimate's notes say so. The parity tooling that
//! runs `llama-fit-params` over every fixture is in the `tests` crate
//! (`tests::parity`, `cargo bench -p tests --bench estimate_parity`).
//!
//! Families checked against `llama-fit-params` and `llama-server` on sparse
//! fixtures (every weights and KV figure within 2 % or 16 MiB,
//! `tests/estimate.rs`, the parity bench): llama (dense GQA), qwen3 (dense,
//! Q/K norms), seed_oss (Q/K/V biases), starcoder2 (biases, LayerNorm,
//! ungated FFN; the config's 4096 window is not applied by llama.cpp),
//! gemma3 (5:1 sliding window, tied embeddings), qwen3moe, gpt-oss (MoE,
//! sliding window), minimax-m2, deepseek2 (MLA), nemotron_h_moe (Mamba2
//! hybrid), qwen3next and qwen35moe (gated delta-net hybrids: only every
//! `full_attention_interval`-th layer holds KV, the others a fixed conv +
//! delta-net state per sequence) and glm4moe (NextN block: weights skipped
//! at load, no KV). The rules come from header keys and tensor names, so
//! other families built the same way (per-layer head counts,
//! `key_length_swa`, KV sharing from `n_layer_kv_from_start`, tied or
//! ungated heads) follow them.
//!
//! Tied embeddings (no `output.weight`): llama.cpp's CPU projection counts
//! `token_embd` twice only when the output copy is repacked (Q4_0, Q4_K,
//! IQ4_NL, MXFP4 with AVX2), once otherwise (the Q6_K of most uploads);
//! the estimate does the same ([`tied_output_copy`]).
//!
//! Known gaps (the header report does not carry what they need):
//!
//! * a GPU build holding the output layer keeps a second copy of a tied
//!   embedding on the device whatever its type, and AVX-512 CPUs (Strix
//!   Halo's Zen 5) also repack Q2_K; the single-node estimate follows the
//!   AVX2 CPU projection (a layer split counts the copy on its device);
//! * Gemma 3n/4 graphs (per-layer embeddings, AltUp, shared KV): their KV
//!   follows `key_length_swa` and `n_layer_kv_from_start`, but there is no
//!   fixture, so their compute buffer is not calibrated;
//! * recurrent state of RWKV, LFM2 and KDA layers (other state shapes);
//! * `expert_feed_forward_length` when the header lacks it: inferred from
//!   the parameter count, and the notes say so;
//! * the layer split (`split.rs`) still gives NextN blocks their weights
//!   and places them like trunk layers.
//!
//! Where a node's agent has `llama-fit-params`, [`engine`] catches what
//! these gaps leave out (a RWKV model's per-slot state, for one).

pub mod compute;
pub mod context;
pub mod engine;
pub mod observed;
pub mod rules;
pub mod split;

pub use observed::{EstimateSource, ObservedRecord, SourcedEstimate, estimate_with_observed};
/// The KV cache element type (`-ctk` / `-ctv`) with its block sizes: the
/// domain type instances are started with.
pub use proto::domain::CacheType;

use proto::domain::ModelParams;
use proto::units;
use std::fmt;
use std::str::FromStr;

/// One mebibyte, the unit llama.cpp prints.
pub const MIB: u64 = 1024 * 1024;

/// A string that names no flash-attention mode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`")]
pub struct ParseOptionError {
    /// What was being parsed.
    pub what: &'static str,
    /// The rejected text.
    pub value: String,
}

/// `-fa on|off|auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum FlashAttn {
    /// Always use flash attention.
    On,
    /// Never use it.
    Off,
    /// llama.cpp decides (the default). `llama_context::resolve_fused_ops`
    /// (`src/llama-context.cpp`) keeps it on unless a layer's flash
    /// attention op lands on another device than the layer; with the CPU
    /// backend alone that never happens, so `auto` resolves to on.
    #[default]
    Auto,
}

impl FlashAttn {
    /// The name llama.cpp uses on its command line.
    pub fn name(self) -> &'static str {
        match self {
            FlashAttn::On => "on",
            FlashAttn::Off => "off",
            FlashAttn::Auto => "auto",
        }
    }

    /// Whether flash attention ends up enabled (CPU backend).
    pub fn resolve(self) -> bool {
        !matches!(self, FlashAttn::Off)
    }
}

impl fmt::Display for FlashAttn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FlashAttn {
    type Err = ParseOptionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "on" | "1" | "true" => Ok(FlashAttn::On),
            "off" | "0" | "false" => Ok(FlashAttn::Off),
            "auto" => Ok(FlashAttn::Auto),
            _ => Err(ParseOptionError {
                what: "flash-attention mode",
                value: s.to_owned(),
            }),
        }
    }
}

/// The llama.cpp context parameters that change memory use.
///
/// [`Default`] gives what `llama-fit-params` uses (`common_params` in
/// `common/common.h`: `n_parallel = 1`, `n_batch = 2048`, `n_ubatch = 512`,
/// f16 caches, flash attention `auto`, KV not unified, SWA cache not full);
/// [`EstimateOptions::llama_server`] gives `llama-server`'s, which differ
/// in `-np` (auto = 4 slots with a unified KV cache, `tools/server/server.cpp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EstimateOptions {
    /// `-c`: total context in tokens over all sequences; 0 = the model's
    /// trained context (`llama_context` constructor: `n_ctx == 0 ?
    /// n_ctx_train`).
    pub ctx: u32,
    /// `-np`: parallel sequences (`n_seq_max`), at least 1.
    pub parallel: u32,
    /// `-b`: logical batch size.
    pub n_batch: u32,
    /// `-ub`: physical batch size (tokens per graph evaluation).
    pub n_ubatch: u32,
    /// Most logit rows one batch can ask for (`llama_context_params::
    /// n_outputs_max`); 0 = `n_batch`, as `llama-fit-params` leaves it.
    /// `llama-server` sets it to `-np` (times 1 + draft tokens with
    /// speculative decoding; `server_output_limits` in
    /// `tools/server/server-context.cpp`), which shrinks the worst-case
    /// logits from `n_ubatch` rows to `-np` rows.
    pub n_outputs_max: u32,
    /// `-ctk`
    pub cache_type_k: CacheType,
    /// `-ctv`
    pub cache_type_v: CacheType,
    /// `-fa`
    pub flash_attn: FlashAttn,
    /// `-kvu`: one KV stream shared by all sequences instead of one per
    /// sequence.
    pub kv_unified: bool,
    /// `--swa-full`: sliding-window layers keep the full context.
    pub swa_full: bool,
    /// `-ngl`: layers offloaded to a GPU (-1 = all, llama.cpp's default).
    /// On unified memory the total does not change with it; the estimate is
    /// the CPU backend's and does not split per device.
    pub gpu_layers: i32,
}

impl Default for EstimateOptions {
    fn default() -> Self {
        EstimateOptions {
            ctx: 0,
            parallel: 1,
            n_batch: 2048,
            n_ubatch: 512,
            n_outputs_max: 0,
            cache_type_k: CacheType::F16,
            cache_type_v: CacheType::F16,
            flash_attn: FlashAttn::Auto,
            kv_unified: false,
            swa_full: false,
            gpu_layers: -1,
        }
    }
}

impl EstimateOptions {
    /// `llama-fit-params` defaults at context `ctx`.
    pub fn with_ctx(ctx: u32) -> Self {
        EstimateOptions {
            ctx,
            ..EstimateOptions::default()
        }
    }

    /// `llama-server` defaults at context `ctx`: 4 slots sharing one unified
    /// KV cache (`n_parallel = -1` resolved in `tools/server/server.cpp`),
    /// one logit row per slot.
    pub fn llama_server(ctx: u32) -> Self {
        EstimateOptions {
            ctx,
            parallel: 4,
            kv_unified: true,
            n_outputs_max: 4,
            ..EstimateOptions::default()
        }
    }

    /// `llama-server` with `-np slots` given explicitly: per-slot KV streams
    /// unless `kv_unified`, one logit row per slot.
    pub fn llama_server_slots(ctx: u32, slots: u32, kv_unified: bool) -> Self {
        EstimateOptions {
            ctx,
            parallel: slots.max(1),
            kv_unified,
            n_outputs_max: slots.max(1),
            ..EstimateOptions::default()
        }
    }

    /// Both cache types at once.
    pub fn cache(mut self, t: CacheType) -> Self {
        self.cache_type_k = t;
        self.cache_type_v = t;
        self
    }
}

/// The context parameters after llama.cpp's adjustments.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved {
    /// Total context cells (`cparams.n_ctx`), padded to 256.
    pub n_ctx: u64,
    /// Cells per stream (`cparams.n_ctx_seq`): the KV size of one stream.
    pub n_ctx_seq: u64,
    /// `n_seq_max`.
    pub n_seq: u64,
    /// KV streams: 1 when unified, else `n_seq`.
    pub n_stream: u64,
    /// `cparams.n_batch`.
    pub n_batch: u64,
    /// `cparams.n_ubatch`.
    pub n_ubatch: u64,
    /// Tokens in the reserved worst-case graph.
    pub n_tokens: u64,
    /// Outputs (logit rows) in the reserved worst-case graph.
    pub n_outputs: u64,
    /// Whether flash attention is on.
    pub flash_attn: bool,
}

impl Resolved {
    /// Applies the `llama_context` constructor's rules
    /// (`src/llama-context.cpp`) to the options.
    pub fn new(params: &ModelParams, opts: &EstimateOptions) -> Resolved {
        let n_seq = u64::from(opts.parallel.max(1));
        // cparams.n_ctx = params.n_ctx == 0 ? hparams.n_ctx_train : params.n_ctx
        let requested = if opts.ctx == 0 {
            params.context_length
        } else {
            u64::from(opts.ctx)
        };
        // cparams.n_ctx = GGML_PAD(cparams.n_ctx, 256)
        let mut n_ctx = pad(requested.max(1), 256);
        let n_ctx_seq = if opts.kv_unified {
            n_ctx
        } else {
            // n_ctx_seq = GGML_PAD(n_ctx / n_seq_max, 256); n_ctx = n_ctx_seq * n_seq_max
            let seq = pad(n_ctx / n_seq, 256).max(256);
            n_ctx = seq * n_seq;
            seq
        };
        // with causal attention, the batch size is limited by the context size
        let n_batch = u64::from(opts.n_batch.max(1)).min(n_ctx);
        let n_ubatch = if opts.n_ubatch == 0 {
            n_batch
        } else {
            u64::from(opts.n_ubatch).min(n_batch)
        };
        // sched_reserve: n_tokens = min(n_ctx, n_ubatch); graph_reserve rounds
        // it up to a multiple of n_seqs.
        let n_tokens = pad(n_ctx.min(n_ubatch), n_seq);
        // cparams.n_outputs_max = params.n_outputs_max == 0 ? n_batch :
        // params.n_outputs_max; sched_reserve: n_outputs_pp = min(n_tokens,
        // n_outputs_max)
        let n_outputs_max = if opts.n_outputs_max == 0 {
            n_batch
        } else {
            u64::from(opts.n_outputs_max)
        };
        let n_outputs = n_tokens.min(n_outputs_max);
        Resolved {
            n_ctx,
            n_ctx_seq,
            n_seq,
            n_stream: if opts.kv_unified { 1 } else { n_seq },
            n_batch,
            n_ubatch,
            n_tokens,
            n_outputs,
            flash_attn: opts.flash_attn.resolve(),
        }
    }
}

/// The bytes llama.cpp's CPU backend holds a second time for a tied output
/// head (no `output.weight`): `load_arch_tensors` creates the output from
/// `token_embd` with `TENSOR_DUPLICATED`, and
/// `llama_model_loader::create_tensor` reuses the embedding's tensor when
/// the output's buffer type is the embedding's (`CPU`), but makes a second
/// one when the output goes to `CPU_REPACK` (a type with a repacked
/// layout, [`ModelParams::tied_output_repacked`]). `llama-fit-params`
/// counts that second tensor in its model figure.
pub fn tied_output_copy(params: &ModelParams) -> u64 {
    if params.tied_output_repacked {
        params.tied_output_bytes
    } else {
        0
    }
}

/// `GGML_PAD`: rounds `n` up to a multiple of `to`.
pub(crate) fn pad(n: u64, to: u64) -> u64 {
    if to == 0 { n } else { n.div_ceil(to) * to }
}

/// The estimate, in bytes, with the arithmetic spelled out.
#[derive(Debug, Clone, PartialEq)]
pub struct Estimate {
    /// Weights: the sum of all tensors' bytes (llama.cpp's "model").
    pub weights_bytes: u64,
    /// KV cache plus recurrent state (llama.cpp's "context").
    pub kv_bytes: u64,
    /// Compute (graph) buffer (llama.cpp's "compute").
    pub compute_bytes: u64,
    /// Logits output buffer; not in llama.cpp's projection.
    pub output_bytes: u64,
    /// `weights + kv + compute + output`.
    pub total_bytes: u64,
    /// The context parameters after llama.cpp's adjustments.
    pub resolved: Resolved,
    /// The KV / recurrent state per layer kind.
    pub context: context::ContextMemory,
    /// The compute buffer's terms.
    pub compute: compute::ComputeMemory,
    /// One line per term: how each number was computed.
    pub notes: Vec<String>,
}

impl Estimate {
    /// What llama.cpp's projection covers: model + context + compute.
    pub fn projected_bytes(&self) -> u64 {
        self.weights_bytes + self.kv_bytes + self.compute_bytes
    }
}

/// Tensor bytes of the trailing NextN (multi-token-prediction) blocks,
/// which llama.cpp does not load: each architecture's `load_arch_tensors`
/// creates them with `TENSOR_SKIP` unless `load_mtp` is set (it is not, by
/// default nor in `llama-fit-params`), and `llama_model_loader::
/// create_tensor` then returns no tensor and takes their bytes out of
/// `size_data` ("model has unused tensor ... ignoring"). 0 without NextN
/// blocks or without per-block sums.
pub fn nextn_weight_bytes(params: &ModelParams) -> u64 {
    let n_layer = params.block_count as usize;
    let first = n_layer.saturating_sub(params.nextn_predict_layers as usize);
    params
        .block_weight_bytes
        .iter()
        .take(n_layer)
        .skip(first)
        .sum()
}

/// Estimates the memory of one `llama-server` context for `params` under
/// `opts`, following llama.cpp's own rules (each cited where applied).
pub fn estimate(params: &ModelParams, opts: &EstimateOptions) -> Estimate {
    let resolved = Resolved::new(params, opts);
    let mut notes: Vec<String> = rules::generic_rules_note(&params.architecture)
        .into_iter()
        .collect();
    notes.push(format!(
        "context: n_ctx {} (padded to 256), {} sequence(s), {} KV stream(s) of {} cells; \
         batch {}, ubatch {}; flash attention {}",
        resolved.n_ctx,
        resolved.n_seq,
        resolved.n_stream,
        resolved.n_ctx_seq,
        resolved.n_batch,
        resolved.n_ubatch,
        if resolved.flash_attn { "on" } else { "off" },
    ));

    // Weights: llama_model::memory_breakdown sums every weight buffer; each
    // tensor is ggml_nbytes padded to the buffer alignment (32 bytes on the
    // CPU), which the header's tensor bytes already are up to a few bytes.
    let skipped = nextn_weight_bytes(params);
    let weights_bytes = params.weight_bytes.saturating_sub(skipped) + tied_output_copy(params);
    notes.push(format!(
        "weights: {} tensors over {} file(s) = {}",
        params.tensor_count,
        params.split_count.max(1),
        units::bytes(params.weight_bytes)
    ));
    if skipped > 0 {
        notes.push(format!(
            "weights: the {} NextN (multi-token-prediction) block(s) are not loaded: {} left out",
            params.nextn_predict_layers,
            units::bytes(skipped)
        ));
    }
    if params.tied_output_bytes > 0 {
        notes.push(if params.tied_output_repacked {
            format!(
                "weights: tied embeddings: the output head is a second, repacked copy of \
                 token_embd ({} more) = {}",
                units::bytes(params.tied_output_bytes),
                units::bytes(weights_bytes)
            )
        } else {
            format!(
                "weights: tied embeddings: the output head shares token_embd on the CPU \
                 (a GPU holding the output layer keeps another {})",
                units::bytes(params.tied_output_bytes)
            )
        });
    }

    let context = context::context_memory(params, opts, &resolved);
    notes.extend(context.notes.iter().cloned());

    let compute = compute::compute_memory(params, &resolved, &context);
    notes.extend(compute.notes.iter().cloned());

    // llama_context::output_reserve: logits n_vocab x max(n_outputs,
    // n_seq_max) floats; at load n_outputs = n_seq_max, and llama-server asks
    // for at most one output per slot per batch.
    let output_bytes = params.vocab_size * resolved.n_seq * 4;
    notes.push(format!(
        "output: logits {} vocab x {} row(s) x 4 B = {} (outside llama.cpp's projection)",
        params.vocab_size,
        resolved.n_seq,
        units::bytes(output_bytes)
    ));

    if !resolved.flash_attn && opts.cache_type_v.is_quantized() {
        notes.push(format!(
            "warning: llama.cpp refuses a quantized V cache ({}) without flash attention",
            opts.cache_type_v
        ));
    }

    let total_bytes = weights_bytes + context.total_bytes + compute.total_bytes + output_bytes;
    Estimate {
        weights_bytes,
        kv_bytes: context.total_bytes,
        compute_bytes: compute.total_bytes,
        output_bytes,
        total_bytes,
        resolved,
        context,
        compute,
        notes,
    }
}

#[cfg(test)]
mod tests;
