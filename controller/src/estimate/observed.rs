//! Learning from real loads: when a model has been loaded before with the
//! same settings, what `llama-server` logged beats any formula. The agent
//! reads its instances' load logs (`agent::loadlog`) and reports the sizes as
//! [`ObservedBuffers`]; an [`ObservedRecord`] pairs them with the settings
//! of that load. [`estimate_with_observed`] prefers observed figures, field
//! by field, and says where each came from.

use super::{CacheType, Estimate, EstimateOptions, Resolved, estimate};
use proto::domain::{ModelParams, ObservedBuffers};
use proto::units;

/// Where a figure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EstimateSource {
    /// llama.cpp's rules applied to the GGUF header.
    Formula,
    /// A real load's log.
    Observed,
    /// llama.cpp's own projection (`llama-fit-params` on a node), taken
    /// when the formula disagrees with it ([`super::engine`]).
    Engine,
}

/// What a real load of a model logged, and under which settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedRecord {
    /// The model's id (its path relative to the model directory).
    pub model_id: String,
    /// The requested context (`-c`, 0 = trained context).
    pub ctx: u32,
    /// `-ctk`
    pub cache_type_k: CacheType,
    /// `-ctv`
    pub cache_type_v: CacheType,
    /// `-np`
    pub parallel: u32,
    /// Whether flash attention was on; the compute buffer depends on it.
    pub flash_attn: bool,
    /// `-kvu`
    pub kv_unified: bool,
    /// What the agent read from the load's log.
    pub buffers: ObservedBuffers,
}

impl ObservedRecord {
    /// A record for a load made with `opts`.
    pub fn new(model_id: &str, opts: &EstimateOptions, buffers: ObservedBuffers) -> Self {
        ObservedRecord {
            model_id: model_id.to_owned(),
            ctx: opts.ctx,
            cache_type_k: opts.cache_type_k,
            cache_type_v: opts.cache_type_v,
            parallel: opts.parallel.max(1),
            flash_attn: opts.flash_attn.resolve(),
            kv_unified: opts.kv_unified,
            buffers,
        }
    }

    /// Whether this record describes a load of `model_id` under `opts`:
    /// same model, same context after llama.cpp's padding, same cache types,
    /// sequences, KV layout and flash attention.
    pub fn matches(&self, model_id: &str, params: &ModelParams, opts: &EstimateOptions) -> bool {
        let want = Resolved::new(params, opts);
        let had = Resolved::new(
            params,
            &EstimateOptions {
                ctx: self.ctx,
                parallel: self.parallel,
                kv_unified: self.kv_unified,
                ..opts.clone()
            },
        );
        self.model_id == model_id
            && had.n_ctx == want.n_ctx
            && self.cache_type_k == opts.cache_type_k
            && self.cache_type_v == opts.cache_type_v
            && self.parallel == opts.parallel.max(1)
            && self.kv_unified == opts.kv_unified
            && self.flash_attn == want.flash_attn
    }
}

/// The source of each figure of a [`SourcedEstimate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sources {
    /// Weights.
    pub weights: EstimateSource,
    /// KV + recurrent state.
    pub kv: EstimateSource,
    /// Compute buffer.
    pub compute: EstimateSource,
    /// Output buffer.
    pub output: EstimateSource,
}

/// An estimate whose figures may come from a real load.
#[derive(Debug, Clone, PartialEq)]
pub struct SourcedEstimate {
    /// The figures used (observed where available).
    pub estimate: Estimate,
    /// [`EstimateSource::Observed`] when any figure came from a real load,
    /// else [`EstimateSource::Engine`] when any came from llama.cpp's
    /// projection.
    pub source: EstimateSource,
    /// Per figure.
    pub sources: Sources,
    /// The formula's figures, kept for comparison.
    pub formula: Estimate,
}

/// Estimates like [`estimate`], but takes each figure from the first record
/// in `observed` that matches (model id, context, cache types, sequences,
/// KV layout, flash attention) and logged it.
pub fn estimate_with_observed(
    model_id: &str,
    params: &ModelParams,
    opts: &EstimateOptions,
    observed: &[ObservedRecord],
) -> SourcedEstimate {
    let formula = estimate(params, opts);
    let mut est = formula.clone();
    let mut sources = Sources {
        weights: EstimateSource::Formula,
        kv: EstimateSource::Formula,
        compute: EstimateSource::Formula,
        output: EstimateSource::Formula,
    };
    if let Some(rec) = observed
        .iter()
        .find(|r| r.matches(model_id, params, opts) && !r.buffers.is_empty())
    {
        let b = &rec.buffers;
        let breakdown = b.breakdown;
        let mut notes = Vec::new();
        let mut take =
            |value: Option<u64>, slot: &mut u64, src: &mut EstimateSource, what: &str| {
                if let Some(v) = value {
                    notes.push(format!(
                        "observed {what}: {} (formula {})",
                        units::bytes(v),
                        units::bytes(*slot)
                    ));
                    *slot = v;
                    *src = EstimateSource::Observed;
                }
            };
        // A memory-mapped weight buffer next to other weight buffers (the
        // CPU's repacked copies) counts the repacked tensors twice: keep the
        // header's exact bytes then.
        let double_counted = b.weights_double_counted();
        if !double_counted {
            take(
                b.model_bytes.or(breakdown.map(|t| t.model_bytes)),
                &mut est.weights_bytes,
                &mut sources.weights,
                "weights",
            );
        }
        take(
            b.context_bytes().or(breakdown.map(|t| t.context_bytes)),
            &mut est.kv_bytes,
            &mut sources.kv,
            "context",
        );
        take(
            b.compute_bytes.or(breakdown.map(|t| t.compute_bytes)),
            &mut est.compute_bytes,
            &mut sources.compute,
            "compute",
        );
        take(
            b.output_bytes,
            &mut est.output_bytes,
            &mut sources.output,
            "output",
        );
        if double_counted {
            notes.push(format!(
                "observed weights {} include a {} file mapping that also holds the repacked tensors; using the header's {}",
                units::bytes(b.model_bytes.unwrap_or(0)),
                units::bytes(b.mapped_model_bytes.unwrap_or(0)),
                units::bytes(est.weights_bytes)
            ));
        }
        est.notes.extend(notes);
        est.total_bytes = est.weights_bytes + est.kv_bytes + est.compute_bytes + est.output_bytes;
    }
    let any = [sources.weights, sources.kv, sources.compute, sources.output]
        .contains(&EstimateSource::Observed);
    SourcedEstimate {
        estimate: est,
        source: if any {
            EstimateSource::Observed
        } else {
            EstimateSource::Formula
        },
        sources,
        formula,
    }
}
