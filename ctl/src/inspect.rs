//! `haloctl inspect`: what a GGUF file holds, read from its header only.

use crate::Failure;
use crate::cli::InspectArgs;
use crate::output::{Format, Table, bytes, count, print, print_json};
use agent::gguf::{self, GgufModel};
use anyhow::Context;
use proto::domain::ModelParams;
use std::path::Path;

/// A parsed model: the file set and its hyper-parameters.
#[derive(Debug, serde::Serialize)]
pub struct Inspected {
    /// The path given.
    pub path: String,
    /// Sum of the parts' sizes.
    pub file_size_bytes: u64,
    /// Header bytes read to describe the model (the weights are never read).
    pub header_bytes_read: u64,
    /// Hyper-parameters.
    pub params: ModelParams,
}

/// Reads a model's header and hyper-parameters.
pub fn load(path: &Path) -> Result<(GgufModel, ModelParams), Failure> {
    let model = gguf::read_model(path).map_err(|e| Failure::Other(e.into()))?;
    let params = gguf::model_params(&model)
        .with_context(|| format!("reading hyper-parameters of {}", path.display()))?;
    Ok((model, params))
}

/// One line summarizing a model, e.g. `deepseek2 · 671.0B params · IQ1_S · 158.4 GiB`.
pub fn summary(p: &ModelParams) -> String {
    format!(
        "{} · {} params · {} · weights {} · trained context {}",
        p.architecture,
        count(p.parameter_count),
        p.quantization,
        bytes(p.weight_bytes),
        p.context_length
    )
}

/// Runs `haloctl inspect`.
pub fn run(args: &InspectArgs) -> Result<(), Failure> {
    let (model, params) = load(&args.model)?;
    if args.output == Format::Json {
        return Ok(print_json(&Inspected {
            path: args.model.display().to_string(),
            file_size_bytes: model.file_size(),
            header_bytes_read: model.header_bytes_read(),
            params,
        })?);
    }
    let p = &params;
    let layers = |v: &[u32]| -> String {
        match (v.iter().min(), v.iter().max()) {
            (Some(a), Some(b)) if a == b => a.to_string(),
            (Some(a), Some(b)) => format!("{a}..{b} (per layer)"),
            _ => "-".into(),
        }
    };
    let flagged = |v: &[bool]| v.iter().filter(|b| **b).count();
    let mut t = Table::new(["", ""]);
    let mut kv = |k: &str, v: String| t.row([k.to_owned(), v]);
    kv("file", args.model.display().to_string());
    kv("file size", bytes(model.file_size()));
    if p.split_count > 1 {
        kv("parts", p.split_count.to_string());
    }
    kv("architecture", p.architecture.clone());
    if !p.name.is_empty() {
        kv("name", p.name.clone());
    }
    kv("quantization", p.quantization.clone());
    kv("parameters", count(p.parameter_count));
    kv("weights", bytes(p.weight_bytes));
    kv("tensors", p.tensor_count.to_string());
    kv("trained context", p.context_length.to_string());
    kv("layers", p.block_count.to_string());
    kv("embedding", p.embedding_length.to_string());
    kv("vocabulary", p.vocab_size.to_string());
    kv("attention heads", layers(&p.head_count));
    kv("kv heads", layers(&p.head_count_kv));
    kv(
        "head dims k/v",
        format!("{}/{}", p.key_length, p.value_length),
    );
    if p.sliding_window > 0 {
        kv(
            "sliding window",
            format!(
                "{} tokens on {} layers",
                p.sliding_window,
                flagged(&p.swa_layers)
            ),
        );
    }
    if p.kv_lora_rank > 0 {
        kv(
            "MLA",
            format!(
                "kv_lora_rank {}, rope dims {}",
                p.kv_lora_rank, p.rope_dimension_count
            ),
        );
    }
    if flagged(&p.recurrent_layers) > 0 {
        kv(
            "recurrent layers",
            format!(
                "{} (ssm inner {}, state {}, groups {}, conv {})",
                flagged(&p.recurrent_layers),
                p.ssm_inner_size,
                p.ssm_state_size,
                p.ssm_group_count,
                p.ssm_conv_kernel
            ),
        );
    }
    if p.expert_count > 0 {
        kv(
            "experts",
            format!(
                "{} ({} used, {} shared)",
                p.expert_count, p.expert_used_count, p.expert_shared_count
            ),
        );
    }
    let out: Vec<_> = t.render().lines().skip(1).map(str::to_owned).collect();
    print(&(out.join("\n") + "\n"));
    Ok(())
}
