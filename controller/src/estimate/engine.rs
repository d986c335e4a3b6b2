//! The formula checked against llama.cpp's own projection.
//!
//! An agent runs `llama-fit-params` on its file at the settings of a
//! placement (`ProjectMemory`, `agent::engine`) and answers per-device
//! weights, context and compute ([`ProjectionAnswer`]). That tool makes
//! its projection with `n_outputs_max = n_batch` (it has no flag for it),
//! where `llama-server` reserves one logit row per slot; so the formula is
//! compared at the tool's own options ([`fit_params_options`]) and, when
//! llama.cpp's figures are taken, its compute buffer is lowered by what
//! the formula says those extra rows cost.
//!
//! Two totals disagree when they differ by more than [`DISAGREE_PERCENT`]
//! of llama.cpp's figure and by more than [`DISAGREE_FLOOR`] (the parity
//! tests' tolerance; it also covers llama.cpp printing each row in whole
//! MiB, rounded down, which makes a small model's figures meaningless). Then llama.cpp's figures replace the formula's
//! (never observed ones: a real load beats both) and the estimate says so.

use super::observed::{EstimateSource, SourcedEstimate};
use super::{EstimateOptions, MIB, estimate};
use proto::domain::{ModelParams, ProjectionAnswer, ProjectionSettings};
use proto::units;

/// How far apart (percent of llama.cpp's total) the two may be and still
/// agree.
pub const DISAGREE_PERCENT: f64 = 2.0;
/// Differences up to this many bytes are never a disagreement.
pub const DISAGREE_FLOOR: u64 = 16 * MIB;

/// The options `llama-fit-params` projects at for `opts`: the same, with
/// its logit rows (`n_outputs_max` 0 = `n_batch`, `common_context_params_to_llama`
/// in `common/common.cpp`).
pub fn fit_params_options(opts: &EstimateOptions) -> EstimateOptions {
    EstimateOptions {
        n_outputs_max: 0,
        ..opts.clone()
    }
}

/// What an agent is asked to project for `opts` (halo's llama-server:
/// per-slot KV streams).
pub fn projection_settings(opts: &EstimateOptions) -> ProjectionSettings {
    ProjectionSettings {
        context_size: opts.ctx,
        parallel: opts.parallel.max(1),
        cache_type_k: opts.cache_type_k,
        cache_type_v: opts.cache_type_v,
        flash_attention: match opts.flash_attn {
            super::FlashAttn::On => Some(true),
            super::FlashAttn::Off => Some(false),
            super::FlashAttn::Auto => None,
        },
        batch_size: opts.n_batch,
        ubatch_size: opts.n_ubatch,
    }
}

/// An agent's answer for one model and settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineRecord {
    /// The model id.
    pub model_id: String,
    /// The settings asked about.
    pub settings: ProjectionSettings,
    /// The projection, or why there is none.
    pub answer: ProjectionAnswer,
}

impl EngineRecord {
    /// Whether this answers `model_id` at `opts`.
    pub fn matches(&self, model_id: &str, opts: &EstimateOptions) -> bool {
        self.model_id == model_id && self.settings == projection_settings(opts)
    }
}

/// The formula and llama.cpp side by side, `[weights, context, compute]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// The node whose llama-fit-params answered.
    pub node: String,
    /// The formula at the tool's options.
    pub formula: [u64; 3],
    /// llama.cpp's projection.
    pub engine: [u64; 3],
    /// What the tool's extra logit rows add to the compute buffer (formula
    /// at the tool's options less at llama-server's).
    pub extra_rows_bytes: u64,
}

const BUCKETS: [&str; 3] = ["weights", "KV cache", "compute"];

impl Comparison {
    /// The formula's total at the tool's options.
    pub fn formula_total(&self) -> u64 {
        self.formula.iter().sum()
    }

    /// llama.cpp's total.
    pub fn engine_total(&self) -> u64 {
        self.engine.iter().sum()
    }

    /// Whether `ours` is off `theirs` by more than the tolerance.
    fn apart(&self, theirs: u64, ours: u64) -> bool {
        let diff = theirs.abs_diff(ours) as f64;
        diff > theirs as f64 * DISAGREE_PERCENT / 100.0 && diff > DISAGREE_FLOOR as f64
    }

    /// Whether the totals disagree.
    pub fn disagrees(&self) -> bool {
        self.apart(self.engine_total(), self.formula_total())
    }

    /// Signed difference of the formula from llama.cpp, percent.
    pub fn percent(&self) -> f64 {
        let theirs = self.engine_total().max(1) as f64;
        (self.formula_total() as f64 - theirs) / theirs * 100.0
    }

    /// The buckets that differ, "KV cache: formula 1.0 GiB, llama.cpp
    /// 2.0 GiB"; the largest difference when none does alone.
    pub fn buckets(&self) -> Vec<String> {
        let text = |i: usize| {
            format!(
                "{}: formula {}, llama.cpp {}",
                BUCKETS[i],
                units::bytes(self.formula[i]),
                units::bytes(self.engine[i])
            )
        };
        let apart: Vec<String> = (0..3)
            .filter(|&i| self.apart(self.engine[i], self.formula[i]))
            .map(text)
            .collect();
        if !apart.is_empty() {
            return apart;
        }
        let i = (0..3)
            .max_by_key(|&i| self.engine[i].abs_diff(self.formula[i]))
            .unwrap_or(0);
        vec![text(i)]
    }
}

/// The check of one estimate against llama.cpp.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineCheck {
    /// llama.cpp answered.
    Compared(Comparison),
    /// It could not, and why (the agent's words).
    Unavailable {
        /// The node asked.
        node: String,
        /// "llama-fit-params not found at PATH", "failed: ...", ...
        reason: String,
    },
}

impl EngineCheck {
    /// The check of `params` under `opts` against `answer` from `node`.
    pub fn new(
        node: &str,
        params: &ModelParams,
        opts: &EstimateOptions,
        answer: &ProjectionAnswer,
    ) -> EngineCheck {
        let p = match answer {
            Ok(p) => p,
            Err(reason) => {
                return EngineCheck::Unavailable {
                    node: node.to_owned(),
                    reason: reason.clone(),
                };
            }
        };
        let at_tool = estimate(params, &fit_params_options(opts));
        let at_server = estimate(params, opts);
        EngineCheck::Compared(Comparison {
            node: node.to_owned(),
            formula: [
                at_tool.weights_bytes,
                at_tool.kv_bytes,
                at_tool.compute_bytes,
            ],
            engine: [p.weights_bytes(), p.context_bytes(), p.compute_bytes()],
            extra_rows_bytes: at_tool
                .compute_bytes
                .saturating_sub(at_server.compute_bytes),
        })
    }

    /// Whether llama.cpp's figures are to be used.
    pub fn disagrees(&self) -> bool {
        matches!(self, EngineCheck::Compared(c) if c.disagrees())
    }

    /// The node asked.
    pub fn node(&self) -> &str {
        match self {
            EngineCheck::Compared(c) => &c.node,
            EngineCheck::Unavailable { node, .. } => node,
        }
    }

    /// The check in words, for plans and decisions.
    pub fn note(&self) -> String {
        self.note_when(false)
    }

    /// [`Self::note`] for an estimate whose figures (`observed`) came from
    /// a real load, which stays above both.
    pub fn note_when(&self, observed: bool) -> String {
        match self {
            EngineCheck::Compared(c) if c.disagrees() => format!(
                "formula {} and llama.cpp's projection on {} {} disagree by {:.1} % ({}); {}",
                units::bytes(c.formula_total()),
                c.node,
                units::bytes(c.engine_total()),
                c.percent().abs(),
                c.buckets().join("; "),
                if observed {
                    "a real load's figures are used"
                } else {
                    "using llama.cpp's figures"
                }
            ),
            EngineCheck::Compared(c) => format!(
                "formula confirmed by llama.cpp's projection on {}: {} vs {} ({:+.1} %{})",
                c.node,
                units::bytes(c.formula_total()),
                units::bytes(c.engine_total()),
                c.percent(),
                if c.percent().abs() > DISAGREE_PERCENT {
                    format!(", within {}", units::bytes(DISAGREE_FLOOR))
                } else {
                    String::new()
                }
            ),
            EngineCheck::Unavailable { node, reason } => {
                format!("engine check unavailable on {node}: {reason}; using the formula")
            }
        }
    }
}

/// What `s` totals with llama.cpp's figures (where the formula's stand),
/// whether or not they are used.
pub fn engine_total(s: &SourcedEstimate, c: &Comparison) -> u64 {
    let e = &s.estimate;
    let pick = |src: EstimateSource, ours: u64, theirs: u64| {
        if src == EstimateSource::Observed {
            ours
        } else {
            theirs
        }
    };
    pick(s.sources.weights, e.weights_bytes, c.engine[0])
        + pick(s.sources.kv, e.kv_bytes, c.engine[1])
        + pick(
            s.sources.compute,
            e.compute_bytes,
            c.engine[2].saturating_sub(c.extra_rows_bytes),
        )
        + e.output_bytes
}

/// `s` with llama.cpp's figures in place of the formula's when `check`
/// disagrees; figures observed in a real load stay.
pub fn apply(mut s: SourcedEstimate, check: &EngineCheck) -> SourcedEstimate {
    let EngineCheck::Compared(c) = check else {
        return s;
    };
    if !c.disagrees() {
        return s;
    }
    let observed = s.source == EstimateSource::Observed;
    let e = &mut s.estimate;
    let take = |slot: &mut u64, src: &mut EstimateSource, v: u64| {
        if *src == EstimateSource::Formula {
            *slot = v;
            *src = EstimateSource::Engine;
        }
    };
    take(&mut e.weights_bytes, &mut s.sources.weights, c.engine[0]);
    take(&mut e.kv_bytes, &mut s.sources.kv, c.engine[1]);
    take(
        &mut e.compute_bytes,
        &mut s.sources.compute,
        c.engine[2].saturating_sub(c.extra_rows_bytes),
    );
    e.total_bytes = e.weights_bytes + e.kv_bytes + e.compute_bytes + e.output_bytes;
    e.notes.push(check.note_when(observed));
    if s.source == EstimateSource::Formula {
        s.source = EstimateSource::Engine;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estimate::estimate_with_observed;
    use proto::domain::{MemoryProjection, ProjectedDevice};

    fn params() -> ModelParams {
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

    fn answer(w: u64, kv: u64, c: u64) -> ProjectionAnswer {
        Ok(MemoryProjection {
            devices: vec![ProjectedDevice {
                name: "Host".into(),
                weights_bytes: w,
                context_bytes: kv,
                compute_bytes: c,
            }],
        })
    }

    #[test]
    fn agreement_keeps_the_formula_and_a_disagreement_takes_llama_cpp_figures() {
        let p = params();
        let opts = crate::nodes::estimate_options(8192, 1, "f16", "f16");
        let at_tool = estimate(&p, &fit_params_options(&opts));
        let same = answer(
            at_tool.weights_bytes,
            at_tool.kv_bytes,
            at_tool.compute_bytes,
        );
        let check = EngineCheck::new("halo1", &p, &opts, &same);
        assert!(!check.disagrees());
        assert!(
            check
                .note()
                .starts_with("formula confirmed by llama.cpp's projection on halo1")
        );
        let s = apply(estimate_with_observed("m", &p, &opts, &[]), &check);
        assert_eq!(s.source, EstimateSource::Formula);

        // Twice the KV cache: the KV bucket is named and llama.cpp's used.
        let big = answer(
            at_tool.weights_bytes,
            at_tool.kv_bytes * 2,
            at_tool.compute_bytes,
        );
        let check = EngineCheck::new("halo1", &p, &opts, &big);
        assert!(check.disagrees());
        let note = check.note();
        assert!(note.contains("KV cache: formula"), "{note}");
        assert!(!note.contains("weights:"), "{note}");
        let formula = estimate(&p, &opts);
        let s = apply(estimate_with_observed("m", &p, &opts, &[]), &check);
        assert_eq!(s.source, EstimateSource::Engine);
        assert_eq!(s.sources.kv, EstimateSource::Engine);
        assert_eq!(s.estimate.kv_bytes, at_tool.kv_bytes * 2);
        // The tool's extra logit rows are taken off its compute figure.
        assert_eq!(s.estimate.compute_bytes, formula.compute_bytes);
        assert_eq!(
            s.estimate.total_bytes,
            formula.total_bytes + at_tool.kv_bytes
        );
    }

    #[test]
    fn a_difference_under_16_mib_is_no_disagreement_however_small_the_model() {
        let p = params();
        let opts = crate::nodes::estimate_options(256, 1, "f16", "f16");
        let at_tool = estimate(&p, &fit_params_options(&opts));
        // llama.cpp's whole MiB, rounded down, 15 MiB short in all.
        let short = answer(
            at_tool.weights_bytes - 5 * MIB,
            at_tool.kv_bytes - 5 * MIB,
            at_tool.compute_bytes - 5 * MIB,
        );
        assert!(!EngineCheck::new("halo1", &p, &opts, &short).disagrees());
        // 17 MiB short on a model under 850 MiB (2 % of it) is one.
        let small = ModelParams {
            weight_bytes: 400 * MIB,
            ..p.clone()
        };
        let at_small = estimate(&small, &fit_params_options(&opts));
        assert!(at_small.projected_bytes() < 850 * MIB);
        let shorter_small = answer(
            at_small.weights_bytes - 17 * MIB,
            at_small.kv_bytes,
            at_small.compute_bytes,
        );
        assert!(EngineCheck::new("halo1", &small, &opts, &shorter_small).disagrees());
    }

    #[test]
    fn an_unavailable_engine_is_named_and_changes_nothing() {
        let p = params();
        let opts = crate::nodes::estimate_options(8192, 1, "f16", "f16");
        let check = EngineCheck::new(
            "halo2",
            &p,
            &opts,
            &Err("llama-fit-params not found at /x".into()),
        );
        assert_eq!(
            check.note(),
            "engine check unavailable on halo2: llama-fit-params not found at /x; using the formula"
        );
        let before = estimate_with_observed("m", &p, &opts, &[]);
        assert_eq!(apply(before.clone(), &check), before);
    }
}
