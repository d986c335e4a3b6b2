//! halo's memory estimate agrees with llama.cpp's own projection: for every
//! sparse fixture architecture, at contexts 4096 … 131072 (where the model
//! allows) with f16 and q8_0 caches, each of model / context / compute is
//! within 2 % or 16 MiB of what `llama-fit-params` prints.
//! (`cargo bench -p controller --bench estimate_parity` prints the table.)

use agent::gguf::{self, fixtures};
use controller::estimate::parity::{ParityRow, Tolerance, run_fit_params};
use controller::estimate::{CacheType, EstimateOptions, estimate};
use tests::llama_bin;

#[test]
fn estimate_matches_llama_fit_params_for_every_fixture_context_and_cache_type() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = llama_bin("llama-fit-params");
    let mut rows = Vec::new();
    for kind in fixtures::SparseModel::ALL {
        let spec = kind.spec();
        let path = dir.path().join(spec.file_name);
        fixtures::write_sparse_with(kind, &path, fixtures::VocabStyle::SizeOnly)
            .expect("write fixture");
        let params = gguf::model_params(&gguf::read_model(&path).expect("read")).expect("params");
        let mut ctxs = vec![4096, 16_384, 32_768, 65_536];
        if params.context_length >= 131_072 {
            ctxs.push(131_072);
        }
        for ctx in ctxs {
            for cache in [CacheType::F16, CacheType::Q8_0] {
                let opts = EstimateOptions::with_ctx(ctx).cache(cache);
                let theirs = run_fit_params(&bin, &path, &opts)
                    .unwrap_or_else(|e| panic!("{} ctx {ctx}: {e}", spec.name));
                let ours = estimate(&params, &opts);
                rows.push(ParityRow::new(
                    spec.name,
                    &opts,
                    &ours,
                    &theirs,
                    Tolerance::default(),
                ));
            }
        }
    }
    let failed: Vec<String> = rows
        .iter()
        .filter(|r| !r.passes())
        .map(ToString::to_string)
        .collect();
    assert!(rows.len() >= 50, "only {} rows compared", rows.len());
    assert!(
        failed.is_empty(),
        "{} of {} rows off by more than 2 % or 16 MiB:\n{}\n{}",
        failed.len(),
        rows.len(),
        ParityRow::header(),
        failed.join("\n")
    );
}
