//! `haloctl plan FILE.gguf`: the memory a model needs per context size and
//! whether it fits a budget, offline, from the GGUF header alone.
//!
//! Figures come from `controller::estimate` for llama-server as halo runs it
//! (`-np` slots with their own KV streams, one logit row per slot). Exit
//! status: 0 when at least one shown context fits, 1 when none does.

use crate::Failure;
use crate::cli::PlanArgs;
use crate::inspect::{load, summary};
use crate::output::{Format, Table, bytes, print, print_json};
use agent::probe::Probe;
use controller::estimate::{CacheType, Estimate, EstimateOptions, estimate, rules};
use proto::domain::ModelParams;
use serde::Serialize;

const GIB: f64 = (1u64 << 30) as f64;

/// One context size's figures (`-o json` field names are stable).
#[derive(Debug, Serialize)]
pub struct PlanRow {
    /// Context in tokens (all slots together).
    pub ctx: u32,
    /// Model weights.
    pub weights_bytes: u64,
    /// KV cache and recurrent state.
    pub kv_bytes: u64,
    /// Compute buffer plus the logits output buffer.
    pub compute_bytes: u64,
    /// Everything.
    pub total_bytes: u64,
    /// `total_bytes <= budget_bytes`.
    pub fits: bool,
}

/// The whole answer of `haloctl plan -o json`.
#[derive(Debug, Serialize)]
pub struct Plan {
    /// The file given.
    pub path: String,
    /// Hyper-parameters read from the header.
    pub model: ModelParams,
    /// The budget checked against.
    pub budget_bytes: u64,
    /// Where the budget came from (`--memory` or this machine's probe).
    pub budget_source: String,
    /// KV cache types and slots used.
    pub cache_type_k: String,
    /// See `cache_type_k`.
    pub cache_type_v: String,
    /// Parallel slots.
    pub parallel: u32,
    /// One row per context size.
    pub rows: Vec<PlanRow>,
    /// Whether any row fits.
    pub fits_any: bool,
    /// What would fit instead, in words, when something does not.
    pub advice: Vec<String>,
    /// About the estimate: "estimate: generic rules for ARCH" for an
    /// architecture halo has no rules of its own for.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// Whether `haloctl plan MODEL` means a file (offline) rather than a
/// catalog name: an existing path, or a name ending in `.gguf` or holding a
/// `/`.
pub fn is_file(model: &std::path::Path) -> bool {
    let s = model.to_string_lossy();
    model.exists() || s.ends_with(".gguf") || s.contains('/')
}

/// Runs `haloctl plan FILE.gguf`.
pub fn run(args: &PlanArgs) -> Result<(), Failure> {
    if args.node.is_some() {
        return Err(Failure::Usage(
            "--node applies to a catalog model; a GGUF file is planned offline (--memory)".into(),
        ));
    }
    let plan = make_plan(args)?;
    if args.output == Format::Json {
        print_json(&plan)?;
    } else {
        print(&render(&plan));
    }
    if plan.fits_any {
        Ok(())
    } else {
        Err(Failure::Refused(String::new()))
    }
}

fn options(ctx: u32, parallel: u32, k: CacheType, v: CacheType) -> EstimateOptions {
    let mut o = EstimateOptions::llama_server_slots(ctx, parallel, false);
    o.cache_type_k = k;
    o.cache_type_v = v;
    o
}

/// Default contexts: 4096 doubling up to the trained context (which is
/// included when it is not a power of two).
fn default_contexts(trained: u64) -> Vec<u32> {
    let trained = u32::try_from(trained).unwrap_or(u32::MAX);
    let mut v = Vec::new();
    let mut c = 4096u32;
    while c <= trained {
        v.push(c);
        c = match c.checked_mul(2) {
            Some(n) => n,
            None => break,
        };
    }
    if trained > 0 && v.last() != Some(&trained) {
        v.push(trained);
    }
    if v.is_empty() {
        v.push(4096);
    }
    v
}

/// Builds the plan (no printing).
pub fn make_plan(args: &PlanArgs) -> Result<Plan, Failure> {
    let (k, v) = (
        args.cache_type_k.unwrap_or_default(),
        args.cache_type_v.unwrap_or_default(),
    );
    let (_, params) = load(&args.model)?;
    let (budget_bytes, budget_source) = match args.memory {
        Some(g) => ((g * GIB) as u64, "--memory".to_owned()),
        None => {
            let report = Probe::system().report(&[]);
            let usable = report.usable_bytes.ok_or_else(|| {
                anyhow::anyhow!("cannot read this machine's memory; pass --memory GIB")
            })?;
            (usable, "this machine's usable memory".to_owned())
        }
    };
    let mut ctxs = if args.ctx.is_empty() {
        default_contexts(params.context_length)
    } else {
        args.ctx.clone()
    };
    ctxs.sort_unstable();
    ctxs.dedup();
    let rows: Vec<PlanRow> = ctxs
        .iter()
        .map(|&ctx| {
            let e = estimate(&params, &options(ctx, args.parallel, k, v));
            row(ctx, &e, budget_bytes)
        })
        .collect();
    let fits_any = rows.iter().any(|r| r.fits);
    let advice = advice(&params, &rows, budget_bytes, args.parallel, k, v);
    let notes = rules::generic_rules_note(&params.architecture)
        .into_iter()
        .collect();
    Ok(Plan {
        path: args.model.display().to_string(),
        model: params,
        budget_bytes,
        budget_source,
        cache_type_k: k.to_string(),
        cache_type_v: v.to_string(),
        parallel: args.parallel,
        rows,
        fits_any,
        advice,
        notes,
    })
}

fn row(ctx: u32, e: &Estimate, budget: u64) -> PlanRow {
    PlanRow {
        ctx,
        weights_bytes: e.weights_bytes,
        kv_bytes: e.kv_bytes,
        compute_bytes: e.compute_bytes + e.output_bytes,
        total_bytes: e.total_bytes,
        fits: e.total_bytes <= budget,
    }
}

/// The largest context (a multiple of 256, at most the trained context)
/// whose total fits `budget`, if any. Memory grows with context, so a
/// binary search over multiples of 256 finds it.
fn largest_fitting(
    params: &ModelParams,
    budget: u64,
    parallel: u32,
    k: CacheType,
    v: CacheType,
) -> Option<u32> {
    let fits = |c: u32| estimate(params, &options(c, parallel, k, v)).total_bytes <= budget;
    let max_steps = u32::try_from(params.context_length / 256).unwrap_or(u32::MAX / 256);
    let (mut lo, mut hi) = (1u32, max_steps.max(1));
    if !fits(256) {
        return None;
    }
    if fits(hi * 256) {
        return Some(hi * 256);
    }
    // Invariant: fits(lo * 256), !fits(hi * 256).
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid * 256) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(lo * 256)
}

fn advice(
    params: &ModelParams,
    rows: &[PlanRow],
    budget: u64,
    parallel: u32,
    k: CacheType,
    v: CacheType,
) -> Vec<String> {
    let mut out = Vec::new();
    if rows.iter().all(|r| r.fits) {
        return out;
    }
    // Smallest useful footprint: a 256-token context.
    let floor = estimate(params, &options(256, parallel, k, v));
    if floor.total_bytes > budget {
        let over = floor.total_bytes - budget;
        if params.weight_bytes > budget {
            out.push(format!(
                "Does not fit at any context: the weights alone ({}) exceed {} by {}. \
                 A smaller context or a quantized KV cache cannot fix that.",
                bytes(params.weight_bytes),
                bytes(budget),
                bytes(params.weight_bytes - budget),
            ));
        } else {
            out.push(format!(
                "Does not fit at any context: even at 256 tokens it needs {} ({} over).",
                bytes(floor.total_bytes),
                bytes(over)
            ));
        }
        let room = budget.saturating_sub(floor.total_bytes - floor.weights_bytes);
        out.push(format!(
            "Options: a smaller quantization of this model whose weights are under about {} \
             (today {}); more memory than one node has (on a cluster, `haloctl place \
             --split` runs the model's layers across nodes); or llama.cpp paging the weights from disk through \
             mmap, which runs at a few tokens per second at best.",
            bytes(room),
            bytes(params.weight_bytes)
        ));
        return out;
    }
    let best = largest_fitting(params, budget, parallel, k, v);
    if let Some(c) = best {
        out.push(format!(
            "Largest context that fits with {k}/{v} KV cache: {c} tokens."
        ));
    }
    for q in [CacheType::Q8_0, CacheType::Q4_0] {
        if q.row_bytes(32) >= k.row_bytes(32).max(v.row_bytes(32)) {
            continue;
        }
        if let Some(c) = largest_fitting(params, budget, parallel, q, q)
            && Some(c) > best
        {
            out.push(format!(
                "With a quantized KV cache (--cache-type-k {q} --cache-type-v {q}): up to {c} tokens."
            ));
        }
    }
    out
}

fn render(plan: &Plan) -> String {
    let p = &plan.model;
    let mut s = String::new();
    s.push_str(&format!("{}\n{}\n", plan.path, summary(p)));
    for n in &plan.notes {
        s.push_str(&format!(
            "{n} (no llama.cpp check offline: `haloctl plan CATALOG-NAME` asks a node)\n"
        ));
    }
    s.push_str(&format!(
        "budget {} ({}); KV cache {}/{}; {} slot{}\n\n",
        bytes(plan.budget_bytes),
        plan.budget_source,
        plan.cache_type_k,
        plan.cache_type_v,
        plan.parallel,
        if plan.parallel == 1 { "" } else { "s" }
    ));
    let mut t = Table::new([
        "context".to_owned(),
        "weights".to_owned(),
        "KV cache".to_owned(),
        "compute".to_owned(),
        "total".to_owned(),
        format!("fits in {}?", bytes(plan.budget_bytes)),
    ]);
    for r in &plan.rows {
        let verdict = if r.fits {
            format!("yes, {} left", bytes(plan.budget_bytes - r.total_bytes))
        } else {
            format!("no, {} over", bytes(r.total_bytes - plan.budget_bytes))
        };
        t.row([
            r.ctx.to_string(),
            bytes(r.weights_bytes),
            bytes(r.kv_bytes),
            bytes(r.compute_bytes),
            bytes(r.total_bytes),
            verdict,
        ]);
    }
    s.push_str(&t.render());
    if !plan.advice.is_empty() {
        s.push('\n');
        for a in &plan.advice {
            s.push_str(a);
            s.push('\n');
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_contexts_double_up_to_the_trained_context() {
        assert_eq!(default_contexts(16_384), [4096, 8192, 16_384]);
        assert_eq!(
            default_contexts(40_960),
            [4096, 8192, 16_384, 32_768, 40_960]
        );
        assert_eq!(default_contexts(2048), [2048]);
    }
}
