//! llama.cpp's "compute" bucket: the graph buffer.
//!
//! `llama_context::sched_reserve` (`src/llama-context.cpp`) builds the
//! worst-case prompt-processing graph (`n_tokens = min(n_ctx, n_ubatch)`
//! tokens, one output row per token up to `n_batch`) and lets ggml-alloc
//! (`ggml/src/ggml-alloc.c`, `ggml_gallocr_alloc_graph_impl`) place every
//! intermediate tensor in one buffer, reusing memory once a tensor's last
//! consumer has run. The buffer size is the allocator's high-water mark,
//! which `llama-fit-params` reads through `ggml_backend_sched_reserve_size`
//! (with `no_alloc`, `llama_context::memory_breakdown`).
//!
//! The high-water mark is reached in one "phase" of the graph; each phase is
//! a few large tensors alive at once plus the graph inputs, which are
//! allocated first and live throughout:
//!
//! * inputs: the KQ mask per KV cache, `n_kv x n_tokens` (f16 with flash
//!   attention, f32 without; `build_attn_inp_kq_mask` in
//!   `src/llama-graph.cpp`), plus token ids, positions and row indices;
//! * output: the logits `n_vocab x n_outputs` f32 (`res->t_logits`, a graph
//!   output that is never freed) next to the final norm;
//! * attention without flash attention: `kq = mul_mat(k, q)` is
//!   `n_kv x n_tokens x n_head` f32 (`build_attn_mha`), soft-maxed in place;
//! * MLA attention (`src/models/deepseek2.cpp`): the absorbed query
//!   `q_nope_absorbed` (`kv_lora_rank` per head) and `Qcur = concat(..,
//!   q_pe)` (`kv_lora_rank + n_rot` per head) next to `q`;
//! * dense gated FFN (`build_ffn`): `gate`, `up` and their GLU product,
//!   `n_ff x n_tokens` f32 each; an ungated FFN (no `ffn_gate`) holds `up`
//!   only (bias and activation run in place);
//! * Mamba2 (`build_mamba2_layer`): the input projection, the conv input and
//!   output, and the scan output with the final state;
//! * gated delta-net (Qwen3-Next, Qwen3.5): the conv output, Q/K repeated
//!   to the value heads, the gate and the fused op's output and states;
//! * MoE experts (`build_moe_ffn`): up, gate, their product and the experts'
//!   output.
//!
//! Each phase also holds a few `n_embd x n_tokens` f32 activations (the
//! residual, the normed input, the layer output, the vector-embedding
//! input). Their count and the exact placement were CALIBRATED against
//! `llama-fit-params` and `llama-server` (see
//! `tests/benches/estimate_parity.rs`): 5 activations next to the FFN or
//! the MLA queries, 5.5 next to the logits,
//! `2 q + k + v` and 4 or 5 next to the attention scores. ggml-alloc's
//! best-fit placement sometimes leaves a hole of about one activation below
//! the logits, which is the error that remains (half an activation either
//! way: 4 MiB for 4096-wide models at 512-token batches).

use super::context::{ContextMemory, head_k, head_v, is_attention_layer, is_mla, is_swa_layer};
use super::{MIB, Resolved};
use proto::domain::ModelParams;
use proto::units;

/// One phase of the worst-case graph and the bytes alive in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    /// What runs, e.g. `output`, `attention (no flash)`.
    pub name: &'static str,
    /// Bytes alive besides the graph inputs.
    pub bytes: u64,
    /// The terms, for people.
    pub detail: String,
}

/// The compute bucket.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ComputeMemory {
    /// Every phase considered.
    pub phases: Vec<Phase>,
    /// The phase with the high-water mark.
    pub dominant: &'static str,
    /// Graph inputs (KQ masks, ids).
    pub inputs_bytes: u64,
    /// `inputs + max(phases)`.
    pub total_bytes: u64,
    /// Explanations.
    pub notes: Vec<String>,
}

/// The sizes every phase is counted in.
#[derive(Debug, Clone, Copy)]
struct Rows {
    /// Tokens in the worst-case batch.
    t: u64,
    /// One f32 value per token.
    f32_row: u64,
    /// One `n_embd x n_tokens` f32 activation.
    act: u64,
}

/// Computes the compute bucket: the graph inputs plus the largest phase of
/// the worst-case graph (output, attention per layer geometry, dense FFN,
/// Mamba2, MoE experts).
pub fn compute_memory(params: &ModelParams, r: &Resolved, ctx: &ContextMemory) -> ComputeMemory {
    let t = r.n_tokens;
    let f32_row = t * 4;
    let rows = Rows {
        t,
        f32_row,
        act: params.embedding_length * f32_row,
    };
    let (inputs_bytes, mask_elem) = inputs(r, ctx, t);
    let mut phases = vec![output_phase(params, r, rows)];
    attention_phases(params, r, ctx, rows, &mut phases);
    phases.extend(dense_ffn_phase(params, rows));
    if gated_delta_net(&params.architecture) {
        phases.extend(gated_delta_net_phase(params, r, rows));
    } else {
        phases.extend(mamba2_phase(params, r, rows));
    }
    let expert_ff_note = match moe_phase(params, rows) {
        Ok(p) => {
            phases.extend(p);
            None
        }
        Err(note) => Some(note),
    };

    let dominant = phases
        .iter()
        .max_by_key(|p| p.bytes)
        .cloned()
        .unwrap_or(Phase {
            name: "none",
            bytes: 0,
            detail: String::new(),
        });
    let total_bytes = inputs_bytes + dominant.bytes;
    let mut notes = vec![format!(
        "compute inputs: KQ mask {} x {t} + SWA mask {} x {t} at {mask_elem} B, ids = {}",
        ctx.kv_size,
        ctx.swa_size,
        units::bytes(inputs_bytes)
    )];
    for p in &phases {
        notes.push(format!(
            "compute phase {}{}: {} = {}",
            p.name,
            if p.name == dominant.name {
                " (high-water mark)"
            } else {
                ""
            },
            p.detail,
            units::bytes(p.bytes)
        ));
    }
    if let Some(n) = expert_ff_note {
        notes.push(n.to_owned());
    }
    notes.push(format!(
        "compute: {} inputs + {} phase = {} (ggml-alloc placement may add ~{} of fragmentation)",
        units::bytes(inputs_bytes),
        dominant.name,
        units::bytes(total_bytes),
        units::bytes(rows.act.max(MIB))
    ));
    ComputeMemory {
        phases,
        dominant: dominant.name,
        inputs_bytes,
        total_bytes,
        notes,
    }
}

/// The graph inputs' bytes for `t` tokens, with the KQ mask's bytes per
/// element.
fn inputs(r: &Resolved, ctx: &ContextMemory, t: u64) -> (u64, u64) {
    // Inputs. build_attn_inp_kq_mask: [n_kv, n_tokens/n_stream, 1, n_stream],
    // f16 for flash attention else f32; one per cache (iswa has two).
    let mask_elem = if r.flash_attn { 2 } else { 4 };
    let full_mask = ctx.kv_size * t * mask_elem;
    let swa_mask = ctx.swa_size * t * mask_elem;
    // Token ids, positions, mixed-batch ids and slots, K/V row indices and
    // output ids: i32/i64 vectors of n_tokens (build_inp_embd,
    // build_inp_pos, build_input_k_idxs, build_inp_out_ids).
    let ids = 40 * t;
    (full_mask + swa_mask + ids, mask_elem)
}

/// The logits and what sits below them.
fn output_phase(params: &ModelParams, r: &Resolved, rows: Rows) -> Phase {
    let act = rows.act;
    // Output: the logits are a graph output (never freed) and come last.
    // Below them sit 5 activations, and in some layouts (seen at 2 to 4
    // activations' worth of KQ mask) one more hole that best-fit placement
    // leaves: count the midpoint, 5.5.
    let logits = params.vocab_size * r.n_outputs * 4;
    Phase {
        name: "output",
        bytes: logits + 11 * act / 2,
        detail: format!(
            "logits {} vocab x {} outputs x 4 B ({}) + 5.5 x n_embd activations ({} each)",
            params.vocab_size,
            r.n_outputs,
            units::bytes(logits),
            units::bytes(act)
        ),
    }
}

/// One attention phase per distinct layer geometry (heads, KV heads, KV
/// size, key length), in layer order.
fn attention_phases(
    params: &ModelParams,
    r: &Resolved,
    ctx: &ContextMemory,
    rows: Rows,
    phases: &mut Vec<Phase>,
) {
    let mla = is_mla(params);
    let mut seen: Vec<(u64, u64, u64, u64, u64)> = Vec::new();
    for il in 0..params.block_count as usize {
        if !is_attention_layer(params, il) {
            continue;
        }
        let n_head = u64::from(params.head_count.get(il).copied().unwrap_or(0));
        let n_head_kv = u64::from(params.head_count_kv[il]);
        let n_kv = if is_swa_layer(params, il) && ctx.swa_size > 0 {
            ctx.swa_size
        } else {
            ctx.kv_size
        };
        let (k_len, v_len) = (u64::from(head_k(params, il)), u64::from(head_v(params, il)));
        let key = (n_head, n_head_kv, n_kv, k_len, v_len);
        if seen.contains(&key) {
            continue;
        }
        seen.push(key);
        // kq = mul_mat(k, q): [n_kv, n_tokens/n_stream, n_head, n_stream] f32
        let kq = if r.flash_attn {
            0
        } else {
            n_kv * n_head * rows.f32_row
        };
        phases.push(if mla {
            mla_phase(params, r, rows, n_head, n_kv, kq)
        } else {
            mha_phase(
                params,
                r,
                rows,
                MhaShape {
                    n_head,
                    n_head_kv,
                    n_kv,
                    k_len,
                    v_len,
                },
                kq,
            )
        });
    }
}

/// MLA attention with absorption: per head `kv_lora_rank`
/// (`q_nope_absorbed`), `kv_lora_rank + n_rot` (`Qcur`) and
/// `key_length_mla` (`q`) values, and the scores `kq` without flash
/// attention.
fn mla_phase(
    params: &ModelParams,
    r: &Resolved,
    rows: Rows,
    n_head: u64,
    n_kv: u64,
    kq: u64,
) -> Phase {
    let t = rows.t;
    let per_head = 2 * (u64::from(params.kv_lora_rank) + u64::from(params.rope_dimension_count))
        + u64::from(params.key_length_mla);
    let q_terms = per_head * n_head * rows.f32_row;
    Phase {
        name: if r.flash_attn {
            "MLA attention"
        } else {
            "MLA attention (no flash)"
        },
        bytes: q_terms + kq + 5 * rows.act,
        detail: format!(
            "{} heads x (2 x ({} latent + {} rope) + {} q) x {t} tokens x 4 B ({}){} + 5 activations",
            n_head,
            params.kv_lora_rank,
            params.rope_dimension_count,
            params.key_length_mla,
            units::bytes(q_terms),
            if kq > 0 {
                format!(
                    " + scores {n_kv} x {t} x {n_head} x 4 B ({})",
                    units::bytes(kq)
                )
            } else {
                String::new()
            }
        ),
    }
}

/// One attention layer geometry: heads, KV heads, cells attended, and the
/// key and value head sizes of the layer (`n_embd_head_k(il)`, which
/// differ for sliding-window layers with `key_length_swa`).
#[derive(Debug, Clone, Copy)]
struct MhaShape {
    n_head: u64,
    n_head_kv: u64,
    n_kv: u64,
    k_len: u64,
    v_len: u64,
}

/// Multi-head attention: Q (twice), K, V and the scores `kq` without flash
/// attention, next to 4 or 5 activations.
fn mha_phase(params: &ModelParams, r: &Resolved, rows: Rows, shape: MhaShape, kq: u64) -> Phase {
    let (t, f32_row) = (rows.t, rows.f32_row);
    let MhaShape {
        n_head,
        n_head_kv,
        n_kv,
        k_len,
        v_len,
    } = shape;
    let q = n_head * k_len * f32_row;
    let k = n_head_kv * k_len * f32_row;
    let v = n_head_kv * v_len * f32_row;
    // Calibrated: 4 activations next to the scores for llama-style
    // blocks, one more where Q/K get their own norm or bias ops
    // (qwen3 q_norm/k_norm, gpt-oss biases and sinks).
    let acts = if params.attention_extra_ops || extra_attention_ops(&params.architecture) {
        5
    } else {
        4
    };
    Phase {
        name: if r.flash_attn {
            "attention"
        } else {
            "attention (no flash)"
        },
        bytes: kq + 2 * q + k + v + acts * rows.act,
        detail: format!(
            "{}2 x Q {} + K {} + V {} + {acts} activations",
            if kq > 0 {
                format!(
                    "scores {n_kv} x {t} x {n_head} heads x 4 B ({}) + ",
                    units::bytes(kq)
                )
            } else {
                String::new()
            },
            units::bytes(q),
            units::bytes(k),
            units::bytes(v)
        ),
    }
}

/// Whether any layer is recurrent (a hybrid model).
fn is_hybrid(params: &ModelParams) -> bool {
    params.recurrent_layers.iter().any(|&x| x)
}

/// Dense gated FFN (build_ffn with LLM_FFN_SILU/GELU + LLM_FFN_PAR): gate,
/// up and the GLU product. Dense models, and DeepSeek's leading dense
/// layers; for MoE models feed_forward_length is not what the experts use.
fn dense_ffn_phase(params: &ModelParams, rows: Rows) -> Option<Phase> {
    if is_hybrid(params)
        || params.feed_forward_length == 0
        || (params.expert_count != 0 && params.leading_dense_block_count == 0)
    {
        return None;
    }
    let ff = params.feed_forward_length * rows.f32_row;
    if params.ffn_ungated {
        return Some(ungated_ffn_phase(params, rows, ff));
    }
    Some(Phase {
        name: "dense FFN",
        bytes: 3 * ff + 5 * rows.act,
        detail: format!(
            "gate, up, product {} x {} x 4 B ({} each) + 5 activations",
            params.feed_forward_length,
            rows.t,
            units::bytes(ff)
        ),
    })
}

/// Ungated dense FFN (`build_ffn` with no gate, `LLM_FFN_SEQ`, e.g.
/// StarCoder2's GELU MLP): `up = ffn_up @ x` (+ bias), the activation,
/// then `down`. ggml-alloc runs the bias add and the activation in place
/// (`ggml_op_can_inplace`), so one `n_ff x n_tokens` f32 tensor lives
/// until `down` has read it, next to 5 activations. Calibrated against
/// `llama-server`'s projection of StarCoder2-15B (one logit row per slot):
/// 108 MiB = 48 MiB up + 5 x 12 MiB at every context and slot count.
fn ungated_ffn_phase(params: &ModelParams, rows: Rows, ff: u64) -> Phase {
    Phase {
        name: "dense FFN (ungated)",
        bytes: UNGATED_FF_TENSORS * ff + 5 * rows.act,
        detail: format!(
            "{UNGATED_FF_TENSORS} x up {} x {} x 4 B ({} each) + 5 activations",
            params.feed_forward_length,
            rows.t,
            units::bytes(ff)
        ),
    }
}

/// `n_ff`-wide f32 tensors alive at once in an ungated FFN.
pub(crate) const UNGATED_FF_TENSORS: u64 = 1;

/// Mamba2 (build_mamba2_layer in src/models/mamba-base.cpp):
/// zxBCdt = ssm_in @ x (2 d_inner + 2 n_group d_state + n_head values per
/// token), the conv input/output (d_inner + 2 n_group d_state), the scan
/// output with the final state (d_state x d_inner per sequence).
fn mamba2_phase(params: &ModelParams, r: &Resolved, rows: Rows) -> Option<Phase> {
    if !is_hybrid(params) || params.ssm_inner_size == 0 {
        return None;
    }
    let f32_row = rows.f32_row;
    let d_inner = u64::from(params.ssm_inner_size);
    let ng_ds = 2 * u64::from(params.ssm_group_count) * u64::from(params.ssm_state_size);
    let in_proj = (2 * d_inner + ng_ds + u64::from(params.ssm_time_step_rank)) * f32_row;
    let conv = (d_inner + ng_ds) * f32_row;
    let state = u64::from(params.ssm_state_size) * d_inner * 4 * r.n_seq;
    // Calibrated: about 6144 f32 per token of scan/gating temporaries.
    let temps = 6144 * f32_row;
    Some(Phase {
        name: "Mamba2",
        bytes: 2 * in_proj + conv + state + 3 * rows.act + temps,
        detail: format!(
            "2 x in_proj {} + conv {} + state {} + temporaries {} + 3 activations",
            units::bytes(in_proj),
            units::bytes(conv),
            units::bytes(state),
            units::bytes(temps)
        ),
    })
}

/// Architectures whose recurrent layers are gated delta-net linear
/// attention (`llm_build_delta_net_base`, `src/models/delta-net-base.cpp`)
/// rather than Mamba2 scans; the header's `ssm.*` keys describe both.
fn gated_delta_net(arch: &str) -> bool {
    matches!(arch, "qwen3next" | "qwen35" | "qwen35moe")
}

/// Gated delta-net layer (`build_layer_attn_linear` in
/// src/models/qwen3next.cpp) around the fused `ggml_gated_delta_net` op
/// (the CPU backend has it, so no chunked temporaries): the conv output
/// (conv_dim = d_inner + 2 n_group d_state values per token; V is a view of
/// it), Q and K repeated to the value heads when they have fewer heads, the
/// gate `z` (d_inner) kept for the gated norm, the op's result (d_inner per
/// token plus the new state) and the old state (d_state x d_inner per
/// sequence each), next to 3 activations. Not the high-water mark in any
/// model measured (Qwen3-Next, Qwen3.5: the experts are), so this phase is
/// counted from its certain terms and not calibrated further.
fn gated_delta_net_phase(params: &ModelParams, r: &Resolved, rows: Rows) -> Option<Phase> {
    if !is_hybrid(params) || params.ssm_inner_size == 0 {
        return None;
    }
    let f32_row = rows.f32_row;
    let d_inner = u64::from(params.ssm_inner_size);
    let key_dim = u64::from(params.ssm_group_count) * u64::from(params.ssm_state_size);
    let conv = (d_inner + 2 * key_dim) * f32_row;
    let value = d_inner * f32_row;
    // Q and K widened to the value heads (d_state x value heads each).
    let v_heads = u64::from(params.ssm_time_step_rank);
    let repeated = if v_heads > u64::from(params.ssm_group_count) {
        2 * v_heads * u64::from(params.ssm_state_size) * f32_row
    } else {
        0
    };
    let state = context_state(params) * r.n_seq;
    Some(Phase {
        name: "gated delta-net",
        bytes: conv + repeated + 2 * value + 2 * state + 3 * rows.act,
        detail: format!(
            "conv output {} + repeated q/k {} + z and output {} each + old and new state {} each + 3 activations",
            units::bytes(conv),
            units::bytes(repeated),
            units::bytes(value),
            units::bytes(state)
        ),
    })
}

/// One sequence's recurrent state of a layer, f32 (`n_embd_s`).
fn context_state(params: &ModelParams) -> u64 {
    super::context::n_embd_s(params) * 4
}

/// MoE (build_moe_ffn in src/llama-graph.cpp): up and gate are
/// [n_ff_exp, n_expert_used, n_tokens] (mid), their GLU product another,
/// then down gives experts = [n_embd, n_expert_used, n_tokens] (out).
/// Calibrated on qwen3moe, gpt-oss and Nemotron-H-MoE under llama-server
/// (one logit row per slot, so nothing else is bigger): gated experts
/// peak at 3 mid + 5 act (up, gate and their product next to the
/// activations) plus `out` when it does not fit the hole up and gate leave
/// (out > 2 mid) and lands above it: to the MiB on qwen3moe, GLM-4.5-Air,
/// Qwen3-Next and Qwen3.5 (out above), MiniMax-M2 and gpt-oss (out in the
/// hole); ungated
/// (relu^2, nemotron_h_moe) at max(2 out, out + mid) + 3 act.
///
/// `Ok(None)` for a model without experts; `Err` a note when the experts'
/// width is unknown.
fn moe_phase(params: &ModelParams, rows: Rows) -> Result<Option<Phase>, &'static str> {
    if params.expert_count == 0 || params.expert_used_count == 0 {
        return Ok(None);
    }
    let from_header = params.expert_feed_forward_length;
    let (ff, how) = match (from_header > 0).then_some(from_header) {
        Some(ff) => (Some(ff), "header"),
        None => (infer_expert_ff(params), "inferred from the parameter count"),
    };
    let Some(ff) = ff else {
        return Err(
            "compute: MoE expert intermediates not modelled (no expert_feed_forward_length)",
        );
    };
    let (f32_row, act) = (rows.f32_row, rows.act);
    let used = u64::from(params.expert_used_count);
    let mid = ff * used * f32_row;
    let out = params.embedding_length * used * f32_row;
    let gated = !ungated_experts(&params.architecture);
    let out_above = out > 2 * mid;
    let bytes = if gated {
        3 * mid + 5 * act + if out_above { out } else { 0 }
    } else {
        (2 * out).max(out + mid) + 3 * act
    };
    Ok(Some(Phase {
        name: "MoE experts",
        bytes,
        detail: format!(
            "{used} experts of {ff} ({how}): mid {} , out {}, {}",
            units::bytes(mid),
            units::bytes(out),
            if gated && out_above {
                "3 mid + 5 act + out (out above the hole up and gate leave)"
            } else if gated {
                "3 mid + 5 act (out fits the hole up and gate leave)"
            } else {
                "max(2 out, out + mid) + 3 act"
            }
        ),
    }))
}

/// Architectures whose attention block has per-head Q/K norms or Q/K/V
/// biases and sinks (one more activation-sized temporary alive next to the
/// scores).
fn extra_attention_ops(arch: &str) -> bool {
    matches!(arch, "qwen3" | "qwen3moe" | "gpt-oss")
}

/// MoE architectures whose experts have no gate (`LLM_FFN_RELU_SQR`).
fn ungated_experts(arch: &str) -> bool {
    matches!(arch, "nemotron_h_moe")
}

/// Infers `expert_feed_forward_length` from the parameter count: what is
/// left after embeddings, attention, routers, Mamba2 and dense layers,
/// spread over the experts' weight matrices. Good to a few percent for the
/// architectures halo knows; only the MoE phase of the compute buffer uses
/// it.
pub fn infer_expert_ff(p: &ModelParams) -> Option<u64> {
    let e = p.embedding_length;
    if p.expert_count == 0 || p.parameter_count == 0 || e == 0 {
        return None;
    }
    let mut rest = 2 * p.vocab_size * e; // token_embd + output
    let mut moe_layers = 0u64;
    let mla = is_mla(p);
    let nemotron = matches!(p.architecture.as_str(), "nemotron_h" | "nemotron_h_moe");
    for il in 0..p.block_count as usize {
        if p.recurrent_layers.get(il).copied().unwrap_or(false) {
            let d_inner = u64::from(p.ssm_inner_size);
            let ng_ds = 2 * u64::from(p.ssm_group_count) * u64::from(p.ssm_state_size);
            rest += e * (2 * d_inner + ng_ds + u64::from(p.ssm_time_step_rank)) + d_inner * e;
            continue;
        }
        let h = u64::from(p.head_count.get(il).copied().unwrap_or(0));
        if is_attention_layer(p, il) {
            let hkv = u64::from(p.head_count_kv[il]);
            rest += if mla {
                let (kvl, rope) = (u64::from(p.kv_lora_rank), u64::from(p.rope_dimension_count));
                let (kq, vo) = (u64::from(p.key_length_mla), u64::from(p.value_length_mla));
                e * h * kq
                    + e * (kvl + rope)
                    + h * kq.saturating_sub(rope) * kvl
                    + kvl * vo * h
                    + h * vo * e
            } else {
                let (dk, dv) = (u64::from(p.key_length), u64::from(p.value_length));
                e * h * dk + e * hkv * (dk + dv) + h * dv * e
            };
            if nemotron {
                continue; // attention-only block
            }
        }
        if (il as u64) < u64::from(p.leading_dense_block_count) {
            rest += 3 * e * p.feed_forward_length;
            continue;
        }
        moe_layers += 1;
        rest += e * u64::from(p.expert_count);
    }
    let mats = if ungated_experts(&p.architecture) {
        2
    } else {
        3
    };
    // Nemotron's shared expert is twice as wide as a routed one.
    let shared = u64::from(p.expert_shared_count) * if nemotron { 2 } else { 1 };
    let per_ff = moe_layers * (u64::from(p.expert_count) + shared) * mats * e;
    (per_ff > 0 && p.parameter_count > rest).then(|| (p.parameter_count - rest) / per_ff)
}
