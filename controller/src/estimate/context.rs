//! llama.cpp's "context" bucket: the KV cache of attention layers and the
//! fixed state of recurrent layers, as `llama_model::create_memory`
//! (`src/llama-model.cpp`) builds them.
//!
//! * Attention layers: `llama_kv_cache` (`src/llama-kv-cache.cpp`) makes,
//!   per layer, `K = type_k[n_embd_k_gqa(il), kv_size, n_stream]` and
//!   `V = type_v[n_embd_v_gqa(il), kv_size, n_stream]`, with
//!   `n_embd_k_gqa(il) = n_embd_head_k(il) * n_head_kv(il)`
//!   (`llama_hparams::n_embd_k_gqa`, `src/llama-hparams.cpp`; SWA layers
//!   take `key_length_swa` / `value_length_swa` when given). Layers from
//!   `n_layer_kv_from_start` on reuse an earlier layer's cache and hold
//!   none (`llama_hparams::has_kv`, Gemma 3n/4).
//! * MLA (DeepSeek with `key_length_mla`): `llama_hparams::is_mla()` is
//!   true, the cache keeps K only (`has_v = !is_mla`), and K's head is the
//!   compressed latent plus the rope part (`key_length` = kv_lora_rank +
//!   n_rot, one KV head).
//! * Sliding-window layers: `llama_kv_cache_iswa`
//!   (`src/llama-kv-cache-iswa.cpp`) gives them a second cache of
//!   `GGML_PAD(min(kv_size, n_swa * (unified ? n_seq_max : 1) + n_ubatch),
//!   256)` cells, or `kv_size` with `--swa-full`.
//! * Recurrent layers: `llama_memory_recurrent`
//!   (`src/llama-memory-recurrent.cpp`) holds per layer `r` (conv state,
//!   `n_embd_r()`) and `s` (SSM state, `n_embd_s()`) f32 rows, one row per
//!   sequence (`mem_size = max(1, n_seq_max)`), whatever the context.

use super::{EstimateOptions, Resolved, pad};
use proto::domain::ModelParams;
use proto::units;

/// One group of layers that share a cache geometry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerGroup {
    /// What the layers are, e.g. `full attention`, `sliding window`, `MLA`,
    /// `recurrent`.
    pub kind: &'static str,
    /// How many layers.
    pub layers: u32,
    /// Cells (tokens) per stream for KV layers, rows for recurrent layers.
    pub cells: u64,
    /// Streams (KV) or 1 (recurrent).
    pub streams: u64,
    /// K (or recurrent `r`) bytes of one layer.
    pub k_bytes_per_layer: u64,
    /// V (or recurrent `s`) bytes of one layer.
    pub v_bytes_per_layer: u64,
    /// All layers of the group.
    pub bytes: u64,
}

/// The "context" bucket, per layer kind.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ContextMemory {
    /// The layer groups.
    pub groups: Vec<LayerGroup>,
    /// Cells per stream of the full-attention cache (0 when there is none).
    pub kv_size: u64,
    /// Cells per stream of the sliding-window cache (0 when there is none).
    pub swa_size: u64,
    /// KV bytes of full-attention (and MLA) layers.
    pub kv_full_bytes: u64,
    /// KV bytes of sliding-window layers.
    pub kv_swa_bytes: u64,
    /// Recurrent state bytes.
    pub recurrent_bytes: u64,
    /// Everything.
    pub total_bytes: u64,
    /// KV or recurrent-state bytes of each layer (what moves with a layer
    /// when a model is split across nodes).
    pub per_layer: Vec<u64>,
    /// Explanations.
    pub notes: Vec<String>,
}

/// Whether layer `il` has an attention KV cache: it has KV heads and is not
/// recurrent (the Nemotron-H `filter_attn` in `llama_model::create_memory`
/// also drops MLP layers, which have no KV heads).
pub fn is_attention_layer(params: &ModelParams, il: usize) -> bool {
    let kv_heads = params.head_count_kv.get(il).copied().unwrap_or(0);
    let recurrent = params.recurrent_layers.get(il).copied().unwrap_or(false);
    kv_heads > 0 && !recurrent && !is_unattended_nextn_layer(params, il)
}

/// Whether layer `il` is a trailing NextN (multi-token-prediction) block
/// (the last `nextn_predict_layers` of `block_count`).
pub fn is_nextn_layer(params: &ModelParams, il: usize) -> bool {
    let n_layer = params.block_count as usize;
    il < n_layer && il >= n_layer.saturating_sub(params.nextn_predict_layers as usize)
}

/// Whether layer `il` is a NextN block the main context gives no cache:
/// `llama_model::create_memory` filters layers to `il < n_layer()` for
/// models with NextN blocks (the plain KV cache's filter, and the hybrid
/// filters of the Qwen3-Next family), so the draft head's cache exists only
/// in a separate MTP context. Nemotron-H's hybrid filters test only the
/// layer kind and keep them.
fn is_unattended_nextn_layer(params: &ModelParams, il: usize) -> bool {
    is_nextn_layer(params, il)
        && !matches!(
            params.architecture.as_str(),
            "nemotron_h" | "nemotron_h_moe"
        )
}

/// `llama_hparams::has_kv` (`src/llama-hparams.cpp`): with
/// `n_layer_kv_from_start` set, only the layers before it keep a KV cache;
/// the later ones reuse one of those (Gemma 3n/4 KV sharing).
pub fn has_kv(params: &ModelParams, il: usize) -> bool {
    params.kv_layer_count == 0 || il < params.kv_layer_count as usize
}

/// `llama_hparams::n_embd_head_k(il)`: sliding-window layers use
/// `key_length_swa` when the header gives one.
pub fn head_k(params: &ModelParams, il: usize) -> u32 {
    if params.key_length_swa != 0 && params.swa_layers.get(il).copied().unwrap_or(false) {
        params.key_length_swa
    } else {
        params.key_length
    }
}

/// `llama_hparams::n_embd_head_v(il)`, as [`head_k`] for values.
pub fn head_v(params: &ModelParams, il: usize) -> u32 {
    if params.value_length_swa != 0 && params.swa_layers.get(il).copied().unwrap_or(false) {
        params.value_length_swa
    } else {
        params.value_length
    }
}

/// Whether layer `il` uses the sliding window.
pub fn is_swa_layer(params: &ModelParams, il: usize) -> bool {
    params.sliding_window > 0 && params.swa_layers.get(il).copied().unwrap_or(false)
}

/// `llama_hparams::is_mla()`: both MLA head sizes are present.
pub fn is_mla(params: &ModelParams) -> bool {
    params.key_length_mla != 0 && params.value_length_mla != 0
}

/// `llama_hparams::n_embd_r()` for Mamba/Mamba2 layers: the conv state,
/// `(d_conv - 1) * (d_inner + 2 * n_group * d_state)` (the first column is
/// shifted out, so it is not stored).
pub fn n_embd_r(params: &ModelParams) -> u64 {
    u64::from(params.ssm_conv_kernel.saturating_sub(1))
        * (u64::from(params.ssm_inner_size)
            + 2 * u64::from(params.ssm_group_count) * u64::from(params.ssm_state_size))
}

/// `llama_hparams::n_embd_s()` for Mamba/Mamba2 layers: the SSM state,
/// `d_state * d_inner`.
pub fn n_embd_s(params: &ModelParams) -> u64 {
    u64::from(params.ssm_state_size) * u64::from(params.ssm_inner_size)
}

/// Computes the context bucket.
pub fn context_memory(params: &ModelParams, opts: &EstimateOptions, r: &Resolved) -> ContextMemory {
    let n_layer = params.block_count as usize;
    let mla = is_mla(params);
    let cached = |il: usize| is_attention_layer(params, il) && has_kv(params, il);
    let any_swa = (0..n_layer).any(|il| cached(il) && is_swa_layer(params, il));
    let kv_size = r.n_ctx_seq;
    // llama_kv_cache_iswa: size_swa = GGML_PAD(min(size_base, n_swa *
    // (unified ? n_seq_max : 1) + n_ubatch), 256), or size_base with
    // swa_full. "the SWA cache is always padded to 256 for performance".
    let swa_size = if !any_swa {
        0
    } else if opts.swa_full {
        kv_size
    } else {
        let per = u64::from(params.sliding_window) * if opts.kv_unified { r.n_seq } else { 1 };
        pad(kv_size.min(per + r.n_ubatch), 256)
    };

    // [TAG_V_CACHE_VARIABLE] without flash attention V is stored transposed
    // and every layer's V row is padded to n_embd_v_gqa_max() when the V
    // sizes differ between layers (is_n_embd_v_gqa_variable compares every
    // layer, including those without KV heads, against layer 0).
    let v_row = |il: usize| -> u64 {
        u64::from(head_v(params, il))
            * u64::from(params.head_count_kv.get(il).copied().unwrap_or(0))
    };
    let v_variable = (0..n_layer).any(|il| v_row(il) != v_row(0));
    let v_max = (0..n_layer).map(v_row).max().unwrap_or(0);
    let v_trans = !r.flash_attn;

    let mut out = ContextMemory {
        per_layer: vec![0; n_layer],
        kv_size: if (0..n_layer).any(cached) { kv_size } else { 0 },
        swa_size,
        ..ContextMemory::default()
    };

    // Group attention layers by (kind, k row, v row) so the notes stay short.
    let mut attn: Vec<(&'static str, u64, u64, u64, u32)> = Vec::new();
    for il in 0..n_layer {
        if !cached(il) {
            continue;
        }
        let heads_kv = u64::from(params.head_count_kv[il]);
        let n_embd_k_gqa = u64::from(head_k(params, il)) * heads_kv;
        let n_embd_v_gqa = if mla {
            0
        } else if v_trans && v_variable {
            v_max
        } else {
            u64::from(head_v(params, il)) * heads_kv
        };
        let swa = is_swa_layer(params, il);
        let (kind, cells) = match (mla, swa) {
            (true, _) => ("MLA latent (K only)", kv_size),
            (false, true) => ("sliding window", swa_size),
            (false, false) => ("full attention", kv_size),
        };
        out.per_layer[il] = (opts.cache_type_k.row_bytes(n_embd_k_gqa)
            + opts.cache_type_v.row_bytes(n_embd_v_gqa))
            * cells
            * r.n_stream;
        if let Some(g) = attn
            .iter_mut()
            .find(|g| g.0 == kind && g.1 == n_embd_k_gqa && g.2 == n_embd_v_gqa)
        {
            g.4 += 1;
        } else {
            attn.push((kind, n_embd_k_gqa, n_embd_v_gqa, cells, 1));
        }
    }
    for (kind, k_row, v_row, cells, layers) in attn {
        let k = opts.cache_type_k.row_bytes(k_row) * cells * r.n_stream;
        let v = opts.cache_type_v.row_bytes(v_row) * cells * r.n_stream;
        let bytes = (k + v) * u64::from(layers);
        if kind == "sliding window" {
            out.kv_swa_bytes += bytes;
        } else {
            out.kv_full_bytes += bytes;
        }
        let v_part = if v_row == 0 {
            "no V (MLA keeps the latent once)".to_owned()
        } else {
            format!("V {v_row} x {}", opts.cache_type_v)
        };
        out.notes.push(format!(
            "KV {kind}: {layers} layer(s) x (K {k_row} x {} + {v_part}) per cell x {cells} cells x {} stream(s) = {}",
            opts.cache_type_k,
            r.n_stream,
            units::bytes(bytes)
        ));
        if !opts.cache_type_k.fits(k_row) || !opts.cache_type_v.fits(v_row) {
            out.notes.push(format!(
                "warning: a KV row ({k_row}/{v_row} values) is not a whole number of {}/{} blocks; llama.cpp refuses it",
                opts.cache_type_k, opts.cache_type_v
            ));
        }
        out.groups.push(LayerGroup {
            kind,
            layers,
            cells,
            streams: r.n_stream,
            k_bytes_per_layer: k,
            v_bytes_per_layer: v,
            bytes,
        });
    }

    // llama_memory_recurrent: mem_size = max(1, n_seq_max) rows (times 1 +
    // n_rs_seq, which is 0 without speculative decoding), r and s in f32.
    let recurrent = params
        .recurrent_layers
        .iter()
        .take(n_layer)
        .filter(|&&x| x)
        .count() as u32;
    if recurrent > 0 {
        let rows = r.n_seq;
        let r_bytes = n_embd_r(params) * 4 * rows;
        let s_bytes = n_embd_s(params) * 4 * rows;
        let bytes = (r_bytes + s_bytes) * u64::from(recurrent);
        out.recurrent_bytes = bytes;
        for (il, &rec) in params.recurrent_layers.iter().take(n_layer).enumerate() {
            if rec {
                out.per_layer[il] = r_bytes + s_bytes;
            }
        }
        out.notes.push(format!(
            "recurrent: {recurrent} layer(s) x (conv {} + ssm {}) f32 x {rows} sequence row(s) = {} (fixed, independent of context)",
            n_embd_r(params),
            n_embd_s(params),
            units::bytes(bytes)
        ));
        if n_embd_r(params) + n_embd_s(params) == 0 {
            out.notes.push(
                "warning: recurrent layers without ssm.* sizes (RWKV, LFM2, KDA use other state shapes); their state is not counted".to_owned(),
            );
        }
        out.groups.push(LayerGroup {
            kind: "recurrent",
            layers: recurrent,
            cells: rows,
            streams: 1,
            k_bytes_per_layer: r_bytes,
            v_bytes_per_layer: s_bytes,
            bytes,
        });
    }

    out.total_bytes = out.kv_full_bytes + out.kv_swa_bytes + out.recurrent_bytes;
    out
}
