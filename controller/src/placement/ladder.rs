//! The settings tried, largest first: the request's context (else the
//! catalog default) halved down to the catalog floor, at each size the
//! catalog's KV cache types and then [`FALLBACK_CACHE`]; and the estimate
//! of one replica at each, computed once per model file.

use super::{Breakdown, FALLBACK_CACHE, PlaceRequest, checked_breakdown};
use crate::nodes::{NodeState, estimate_options};
use proto::domain::{CatalogEntry, ModelParams};
use std::collections::HashMap;
use std::sync::Arc;

/// One setting tried: context and cache types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Attempt {
    pub(super) ctx: u32,
    pub(super) ctk: String,
    pub(super) ctv: String,
}

/// The settings of one request, in the order they are tried.
pub(super) struct Ladder {
    /// The context asked for (or the catalog default).
    pub(super) ctx0: u32,
    /// The smallest context tried.
    pub(super) floor: u32,
    /// Every setting, largest first.
    pub(super) attempts: Vec<Attempt>,
}

impl Ladder {
    /// The ladder of `req` for `entry`.
    pub(super) fn new(entry: &CatalogEntry, req: &PlaceRequest) -> Ladder {
        let ctx0 = req.context.unwrap_or(entry.default_context).max(1);
        let floor = entry.min_context.min(ctx0).max(1);
        let mut ctxs = vec![ctx0];
        let mut c = ctx0;
        while c / 2 >= floor {
            c /= 2;
            ctxs.push(c);
        }
        if *ctxs.last().unwrap_or(&ctx0) != floor {
            ctxs.push(floor);
        }
        let mut attempts = Vec::new();
        for &ctx in &ctxs {
            attempts.push(Attempt {
                ctx,
                ctk: entry.cache_type_k.clone(),
                ctv: entry.cache_type_v.clone(),
            });
            if entry.cache_type_k != FALLBACK_CACHE || entry.cache_type_v != FALLBACK_CACHE {
                attempts.push(Attempt {
                    ctx,
                    ctk: FALLBACK_CACHE.to_owned(),
                    ctv: FALLBACK_CACHE.to_owned(),
                });
            }
        }
        Ladder {
            ctx0,
            floor,
            attempts,
        }
    }

    /// The index of the smallest setting.
    pub(super) fn last(&self) -> usize {
        self.attempts.len() - 1
    }

    /// The settings as (context, `-ctk`, `-ctv`), as a split takes them.
    pub(super) fn tuples(&self) -> Vec<(u32, String, String)> {
        self.attempts
            .iter()
            .map(|a| (a.ctx, a.ctk.clone(), a.ctv.clone()))
            .collect()
    }
}

/// Estimates per (attempt, model parameters): nodes holding the same file
/// share one.
pub(super) struct Estimates<'a> {
    nodes: &'a [NodeState],
    model_id: &'a str,
    parallel: u32,
    attempts: &'a [Attempt],
    memo: HashMap<(usize, *const ModelParams), Breakdown>,
}

impl<'a> Estimates<'a> {
    /// Estimates of `model_id` with `parallel` slots at `attempts`.
    pub(super) fn new(
        nodes: &'a [NodeState],
        model_id: &'a str,
        parallel: u32,
        attempts: &'a [Attempt],
    ) -> Self {
        Estimates {
            nodes,
            model_id,
            parallel,
            attempts,
            memo: HashMap::new(),
        }
    }

    /// One replica's estimate at attempt `a` for the file `p`.
    pub(super) fn get(&mut self, a: usize, p: &Arc<ModelParams>) -> Breakdown {
        let (nodes, model_id, parallel, at) =
            (self.nodes, self.model_id, self.parallel, &self.attempts[a]);
        self.memo
            .entry((a, Arc::as_ptr(p)))
            .or_insert_with(|| {
                let opts = estimate_options(at.ctx, parallel, &at.ctk, &at.ctv);
                checked_breakdown(nodes, model_id, p, &opts, (at.ctx, &at.ctk, &at.ctv))
            })
            .clone()
    }

    /// Estimate plus margin: what one replica needs at attempt `a`.
    pub(super) fn need(&mut self, a: usize, p: &Arc<ModelParams>) -> u64 {
        let b = self.get(a, p);
        b.total_bytes + crate::nodes::margin(b.total_bytes)
    }
}
