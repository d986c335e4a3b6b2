//! Models on disk: the hyper-parameters a memory estimate needs, as read from
//! a GGUF header, and the file (or split set) they came from.

use crate::v1;
use serde::{Deserialize, Serialize};

/// Hyper-parameters read from a GGUF header. Per-layer vectors have one entry
/// per block (`block_count` entries); scalar GGUF keys are expanded.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelParams {
    /// `general.architecture`, e.g. `llama`, `qwen3moe`, `deepseek2`.
    pub architecture: String,
    /// `general.name`, empty when absent.
    pub name: String,
    /// llama.cpp's name for `general.file_type` (e.g. `Q4_K - Medium`), or
    /// the dominant tensor type when the key is absent.
    pub quantization: String,
    /// Total elements over all tensors.
    pub parameter_count: u64,
    /// Exact bytes of all tensor data.
    pub weight_bytes: u64,
    /// `{arch}.context_length`: the trained context.
    pub context_length: u64,
    /// `{arch}.block_count`.
    pub block_count: u32,
    /// `{arch}.embedding_length`.
    pub embedding_length: u64,
    /// Rows of `token_embd` (or the tokenizer's token count).
    pub vocab_size: u64,
    /// `{arch}.attention.head_count`, one per layer.
    pub head_count: Vec<u32>,
    /// `{arch}.attention.head_count_kv`, one per layer (0 = no attention).
    pub head_count_kv: Vec<u32>,
    /// `{arch}.attention.key_length` (default `embedding_length / head_count`).
    pub key_length: u32,
    /// `{arch}.attention.value_length` (default `embedding_length / head_count`).
    pub value_length: u32,
    /// `{arch}.attention.sliding_window`, 0 when the model has none.
    pub sliding_window: u32,
    /// Which layers use the sliding window.
    pub swa_layers: Vec<bool>,
    /// `{arch}.attention.kv_lora_rank` (DeepSeek MLA), else 0.
    pub kv_lora_rank: u32,
    /// `{arch}.rope.dimension_count`.
    pub rope_dimension_count: u32,
    /// `{arch}.attention.key_length_mla`, else 0.
    pub key_length_mla: u32,
    /// `{arch}.attention.value_length_mla`, else 0.
    pub value_length_mla: u32,
    /// `{arch}.ssm.conv_kernel`.
    pub ssm_conv_kernel: u32,
    /// `{arch}.ssm.inner_size`.
    pub ssm_inner_size: u32,
    /// `{arch}.ssm.state_size`.
    pub ssm_state_size: u32,
    /// `{arch}.ssm.group_count`.
    pub ssm_group_count: u32,
    /// `{arch}.ssm.time_step_rank`.
    pub ssm_time_step_rank: u32,
    /// Which layers are recurrent (hold a fixed state, no KV).
    pub recurrent_layers: Vec<bool>,
    /// `{arch}.expert_count`.
    pub expert_count: u32,
    /// `{arch}.expert_used_count`.
    pub expert_used_count: u32,
    /// `{arch}.expert_shared_count`.
    pub expert_shared_count: u32,
    /// `{arch}.feed_forward_length` (first layer's when an array).
    pub feed_forward_length: u64,
    /// `{arch}.leading_dense_block_count`.
    pub leading_dense_block_count: u32,
    /// Number of tensors over all parts.
    pub tensor_count: u64,
    /// Number of files in the split set (1 for a single file).
    pub split_count: u32,
    /// `{arch}.expert_feed_forward_length`: one expert's FFN width, 0 when
    /// the header does not say.
    pub expert_feed_forward_length: u64,
    /// Tensor bytes of each block (`blk.N.*`), one per block (empty when
    /// the reader did not sum them).
    #[serde(default)]
    pub block_weight_bytes: Vec<u64>,
    /// Tensor bytes of the input embedding (`token_embd*`).
    #[serde(default)]
    pub input_weight_bytes: u64,
    /// Tensor bytes of the output head (`output*`).
    #[serde(default)]
    pub output_weight_bytes: u64,
    /// `{arch}.nextn_predict_layers`: how many of the last blocks are
    /// multi-token-prediction (NextN) blocks, 0 when the header has none.
    #[serde(default)]
    pub nextn_predict_layers: u32,
    /// `{arch}.attention.key_length_swa`: the key head size of
    /// sliding-window layers, 0 when it is `key_length`.
    #[serde(default)]
    pub key_length_swa: u32,
    /// `{arch}.attention.value_length_swa`, 0 when it is `value_length`.
    #[serde(default)]
    pub value_length_swa: u32,
    /// `n_layer_kv_from_start`: layers from this index on reuse an earlier
    /// layer's KV cache and keep none of their own; 0 = every layer has one.
    #[serde(default)]
    pub kv_layer_count: u32,
    /// Bytes of `token_embd` when there is no `output.weight` (tied
    /// embeddings: llama.cpp makes the output head from the embedding);
    /// 0 when the file has its own output head.
    #[serde(default)]
    pub tied_output_bytes: u64,
    /// The tied embedding's type has a repacked CPU layout (x86 AVX2: Q4_0,
    /// Q4_K, IQ4_NL, MXFP4, rows a multiple of 8), so the CPU backend holds
    /// the output head as a second copy; otherwise it uses the embedding.
    #[serde(default)]
    pub tied_output_repacked: bool,
    /// The dense FFN is ungated: `ffn_up` without `ffn_gate`.
    #[serde(default)]
    pub ffn_ungated: bool,
    /// Attention blocks have per-head Q/K norms or Q/K/V biases.
    #[serde(default)]
    pub attention_extra_ops: bool,
}

/// Whether a model file could be read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ModelStatus {
    /// The header parsed.
    Ok(Box<ModelParams>),
    /// The header did not parse; the reason names file, offset and field.
    Broken(String),
}

/// A model file (or split set) an agent found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelFile {
    /// Path relative to its model directory.
    pub id: String,
    /// Index of the model directory in the agent's config.
    pub dir_index: u32,
    /// Sum of all parts' sizes.
    pub file_size_bytes: u64,
    /// Part file names relative to the model directory.
    pub parts: Vec<String>,
    /// Parsed parameters or the reason the file is broken.
    pub status: ModelStatus,
}

impl From<ModelParams> for v1::ModelParams {
    fn from(p: ModelParams) -> Self {
        v1::ModelParams {
            architecture: p.architecture,
            name: p.name,
            quantization: p.quantization,
            parameter_count: p.parameter_count,
            weight_bytes: p.weight_bytes,
            context_length: p.context_length,
            block_count: p.block_count,
            embedding_length: p.embedding_length,
            vocab_size: p.vocab_size,
            head_count: p.head_count,
            head_count_kv: p.head_count_kv,
            key_length: p.key_length,
            value_length: p.value_length,
            sliding_window: p.sliding_window,
            swa_layers: p.swa_layers,
            kv_lora_rank: p.kv_lora_rank,
            rope_dimension_count: p.rope_dimension_count,
            key_length_mla: p.key_length_mla,
            value_length_mla: p.value_length_mla,
            ssm_conv_kernel: p.ssm_conv_kernel,
            ssm_inner_size: p.ssm_inner_size,
            ssm_state_size: p.ssm_state_size,
            ssm_group_count: p.ssm_group_count,
            ssm_time_step_rank: p.ssm_time_step_rank,
            recurrent_layers: p.recurrent_layers,
            expert_count: p.expert_count,
            expert_used_count: p.expert_used_count,
            expert_shared_count: p.expert_shared_count,
            feed_forward_length: p.feed_forward_length,
            leading_dense_block_count: p.leading_dense_block_count,
            tensor_count: p.tensor_count,
            split_count: p.split_count,
            expert_feed_forward_length: p.expert_feed_forward_length,
            block_weight_bytes: p.block_weight_bytes,
            input_weight_bytes: p.input_weight_bytes,
            output_weight_bytes: p.output_weight_bytes,
            nextn_predict_layers: p.nextn_predict_layers,
            key_length_swa: p.key_length_swa,
            value_length_swa: p.value_length_swa,
            kv_layer_count: p.kv_layer_count,
            tied_output_bytes: p.tied_output_bytes,
            ffn_ungated: p.ffn_ungated,
            attention_extra_ops: p.attention_extra_ops,
            tied_output_repacked: p.tied_output_repacked,
        }
    }
}

impl TryFrom<v1::ModelParams> for ModelParams {
    type Error = crate::ConversionError;

    fn try_from(p: v1::ModelParams) -> Result<Self, Self::Error> {
        let layers = p.block_count as usize;
        for (field, len) in [
            ("head_count", p.head_count.len()),
            ("head_count_kv", p.head_count_kv.len()),
            ("swa_layers", p.swa_layers.len()),
            ("recurrent_layers", p.recurrent_layers.len()),
            ("block_weight_bytes", p.block_weight_bytes.len()),
        ] {
            // Empty means "not given"; otherwise one entry per layer.
            if len != 0 && len != layers {
                return Err(crate::ConversionError::Invalid {
                    field,
                    reason: format!("{len} entries for {layers} layers"),
                });
            }
        }
        Ok(ModelParams {
            architecture: p.architecture,
            name: p.name,
            quantization: p.quantization,
            parameter_count: p.parameter_count,
            weight_bytes: p.weight_bytes,
            context_length: p.context_length,
            block_count: p.block_count,
            embedding_length: p.embedding_length,
            vocab_size: p.vocab_size,
            head_count: p.head_count,
            head_count_kv: p.head_count_kv,
            key_length: p.key_length,
            value_length: p.value_length,
            sliding_window: p.sliding_window,
            swa_layers: p.swa_layers,
            kv_lora_rank: p.kv_lora_rank,
            rope_dimension_count: p.rope_dimension_count,
            key_length_mla: p.key_length_mla,
            value_length_mla: p.value_length_mla,
            ssm_conv_kernel: p.ssm_conv_kernel,
            ssm_inner_size: p.ssm_inner_size,
            ssm_state_size: p.ssm_state_size,
            ssm_group_count: p.ssm_group_count,
            ssm_time_step_rank: p.ssm_time_step_rank,
            recurrent_layers: p.recurrent_layers,
            expert_count: p.expert_count,
            expert_used_count: p.expert_used_count,
            expert_shared_count: p.expert_shared_count,
            feed_forward_length: p.feed_forward_length,
            leading_dense_block_count: p.leading_dense_block_count,
            tensor_count: p.tensor_count,
            split_count: p.split_count,
            expert_feed_forward_length: p.expert_feed_forward_length,
            block_weight_bytes: p.block_weight_bytes,
            input_weight_bytes: p.input_weight_bytes,
            output_weight_bytes: p.output_weight_bytes,
            nextn_predict_layers: p.nextn_predict_layers,
            key_length_swa: p.key_length_swa,
            value_length_swa: p.value_length_swa,
            kv_layer_count: p.kv_layer_count,
            tied_output_bytes: p.tied_output_bytes,
            ffn_ungated: p.ffn_ungated,
            attention_extra_ops: p.attention_extra_ops,
            tied_output_repacked: p.tied_output_repacked,
        })
    }
}

impl From<ModelFile> for v1::ModelFile {
    fn from(m: ModelFile) -> Self {
        v1::ModelFile {
            id: m.id,
            dir_index: m.dir_index,
            file_size_bytes: m.file_size_bytes,
            parts: m.parts,
            status: Some(match m.status {
                ModelStatus::Ok(p) => v1::model_file::Status::Params((*p).into()),
                ModelStatus::Broken(r) => v1::model_file::Status::Broken(r),
            }),
        }
    }
}

impl TryFrom<v1::ModelFile> for ModelFile {
    type Error = crate::ConversionError;

    fn try_from(m: v1::ModelFile) -> Result<Self, Self::Error> {
        let status = match m.status.ok_or(crate::ConversionError::Missing("status"))? {
            v1::model_file::Status::Params(p) => ModelStatus::Ok(Box::new(p.try_into()?)),
            v1::model_file::Status::Broken(r) => ModelStatus::Broken(r),
        };
        Ok(ModelFile {
            id: m.id,
            dir_index: m.dir_index,
            file_size_bytes: m.file_size_bytes,
            parts: m.parts,
            status,
        })
    }
}

/// Longest model id accepted from outside (a request or the catalog).
pub const MAX_MODEL_ID_LEN: usize = 1024;

/// Why a model id from outside (a start request, a catalog entry) is
/// refused before any lookup, when it could never name a file inside a
/// model directory: empty, too long, NUL, absolute, a backslash, or a `..`,
/// `.` or empty path component. Ids are looked up literally: nothing is
/// URL-decoded, so `%2e%2e/x.gguf` is just a name no scan reports.
pub fn check_model_id(id: &str) -> Result<(), &'static str> {
    if id.is_empty() {
        return Err("is empty");
    }
    if id.len() > MAX_MODEL_ID_LEN {
        return Err("is too long (at most 1024 bytes)");
    }
    if id.contains('\0') {
        return Err("contains NUL");
    }
    if id.starts_with('/') {
        return Err("is an absolute path; ids are relative to a model directory");
    }
    if id.contains('\\') {
        return Err("contains a backslash");
    }
    if id.split('/').any(|c| c == ".." || c == "." || c.is_empty()) {
        return Err("contains `..`, `.` or an empty path component");
    }
    if id.split('/').any(|c| c.len() > 255) {
        return Err("has a path component longer than 255 bytes");
    }
    Ok(())
}

/// A model id as error messages show it: escaped, and cut to 80 characters
/// so a hostile 10,000-byte id does not become a 10,000-byte status.
pub fn shown_id(id: &str) -> String {
    let escaped: String = id.escape_debug().collect();
    match escaped.char_indices().nth(80) {
        Some((cut, _)) => format!("{}… ({} bytes)", &escaped[..cut], id.len()),
        None => escaped,
    }
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn model_ids_that_could_leave_a_model_directory_are_refused() {
        let long = "a".repeat(MAX_MODEL_ID_LEN + 1);
        let component = format!("{}.gguf", "b".repeat(300));
        for id in [
            "",
            "..",
            "./",
            "../x.gguf",
            "a/../../etc/passwd",
            "/etc/passwd",
            "x\0.gguf",
            "..\\..\\x",
            "a//b",
            long.as_str(),
            component.as_str(),
        ] {
            assert!(check_model_id(id).is_err(), "{id:?}");
        }
        for id in [
            "tiny.gguf",
            "sub/m-00001-of-00002.gguf",
            "x..y.gguf",
            "%2e%2e/x.gguf",
        ] {
            assert_eq!(check_model_id(id), Ok(()), "{id:?}");
        }
        assert_eq!(shown_id("a\0b"), "a\\0b");
        assert!(shown_id(&long).ends_with("… (1025 bytes)"));
    }
}
