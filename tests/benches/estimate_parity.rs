//! Parity of halo's memory estimate with llama.cpp's own projection.
//!
//! For every sparse fixture model (`agent::gguf::fixtures`, real headers,
//! holes for data), at several context sizes and with f16 and q8_0 caches,
//! runs `llama-fit-params --fit-print on` and compares its model / context /
//! compute figures with `controller::estimate::estimate` on the parameters
//! the agent's GGUF reader extracts. Prints one table row per case; a row
//! passes when each figure is within 2 % or 16 MiB.
//!
//! ```text
//! cargo bench -p tests --bench estimate_parity
//! HALO_LLAMA_BIN=/path/to/bin      directory holding llama-fit-params
//! HALO_FIXTURE_DIR=/tmp/fixtures   keep the sparse files there
//! HALO_PARITY_STRICT=1             exit 1 when a row misses
//! HALO_PARITY_ONLY=deepseek        only models whose name contains this
//! HALO_BENCH_SMOKE=1               one model, one llama-fit-params case;
//!                                  no llama-fit-params or a failed run
//!                                  is an error, not a skipped row
//! ```
//!
//! `--write-tiny PATH` writes the tiny llama model instead (used to capture
//! real `llama-server` load logs for `agent::loadlog`'s test data).

use agent::gguf::fixtures::{SparseModel, VocabStyle, write_sparse_with, write_tiny_llama};
use agent::gguf::{model_params, read_model};
use anyhow::{Context, bail};
use controller::estimate::compute::infer_expert_ff;
use controller::estimate::{CacheType, EstimateOptions, FlashAttn, estimate};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tests::parity::{
    LlamaProjection, ParityError, ParityRow, Tolerance, run_fit_params, run_server_projection,
};

/// Where the llama.cpp binaries are: `$HALO_LLAMA_BIN`, else the cache
/// directory `deploy/build-llama.sh` installs into, else its build tree.
fn llama_bin_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("HALO_LLAMA_BIN") {
        return Some(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").map(PathBuf::from)?;
    let cache = std::env::var_os("HALO_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| home.join(".cache/halo"));
    [
        cache.join("llama.cpp-11434.0.0/bin"),
        cache.join("llama.cpp-11434.0.0.work/build/bin"),
    ]
    .into_iter()
    .find(|d| d.join("llama-fit-params").is_file())
}

struct Case {
    opts: EstimateOptions,
}

fn cases(context_length: u64) -> Vec<Case> {
    let mut ctxs = vec![4096, 16_384, 32_768, 65_536];
    if context_length >= 131_072 {
        ctxs.push(131_072);
    } else if let Ok(trained) = u32::try_from(context_length)
        && trained > 0
        && !ctxs.contains(&trained)
    {
        // The trained context when it is none of the above.
        ctxs.push(trained);
    }
    let mut out = Vec::new();
    for ctx in ctxs {
        for cache in [CacheType::F16, CacheType::Q8_0] {
            out.push(Case {
                opts: EstimateOptions::with_ctx(ctx).cache(cache),
            });
        }
    }
    out
}

/// Extra shapes: flash attention off, several sequences, full SWA cache.
fn extra_cases() -> Vec<Case> {
    vec![
        Case {
            opts: EstimateOptions {
                flash_attn: FlashAttn::Off,
                ..EstimateOptions::with_ctx(4096)
            },
        },
        Case {
            opts: EstimateOptions {
                flash_attn: FlashAttn::Off,
                ..EstimateOptions::with_ctx(16_384)
            },
        },
        Case {
            opts: EstimateOptions {
                parallel: 4,
                ..EstimateOptions::with_ctx(32_768)
            },
        },
        Case {
            opts: EstimateOptions {
                swa_full: true,
                ..EstimateOptions::with_ctx(16_384).cache(CacheType::Q8_0)
            },
        },
        Case {
            opts: EstimateOptions {
                n_ubatch: 1024,
                n_batch: 4096,
                ..EstimateOptions::with_ctx(16_384)
            },
        },
        Case {
            opts: EstimateOptions {
                n_ubatch: 256,
                ..EstimateOptions::with_ctx(16_384).cache(CacheType::Q4_0)
            },
        },
    ]
}

/// llama-server's own shapes: 4 slots on one unified KV cache (its
/// default), and 1 or 4 slots with per-slot streams; one logit row per slot.
fn server_cases(context_length: u64) -> Vec<Case> {
    let mut out = Vec::new();
    let mut ctxs = vec![16_384, 65_536];
    if context_length >= 131_072 {
        ctxs.push(131_072);
    }
    for ctx in ctxs {
        for cache in [CacheType::F16, CacheType::Q8_0] {
            out.push(Case {
                opts: EstimateOptions::llama_server(ctx).cache(cache),
            });
        }
    }
    out.push(Case {
        opts: EstimateOptions::llama_server_slots(32_768, 1, false),
    });
    out.push(Case {
        opts: EstimateOptions::llama_server_slots(32_768, 4, false),
    });
    out.push(Case {
        opts: EstimateOptions {
            flash_attn: FlashAttn::Off,
            ..EstimateOptions::llama_server(16_384)
        },
    });
    out
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tool {
    FitParams,
    Server,
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == "--write-tiny") {
        let path = args.get(i + 1).context("--write-tiny needs a path")?;
        let size = write_tiny_llama(Path::new(path), 1)?;
        println!("wrote {path} ({size} bytes)");
        return Ok(());
    }
    // `cargo bench` passes `--bench`; nothing else is expected.

    let smoke = tests::smoke();
    let Some(bin_dir) = llama_bin_dir() else {
        if smoke {
            bail!("llama-fit-params not found (set HALO_LLAMA_BIN)");
        }
        println!("estimate_parity: llama-fit-params not found (set HALO_LLAMA_BIN); skipped");
        return Ok(());
    };
    let fit = bin_dir.join("llama-fit-params");
    let server = bin_dir.join("llama-server");
    let sections = match std::env::var("HALO_PARITY_SECTIONS") {
        Ok(s) => s,
        Err(_) if smoke => "fit".into(),
        Err(_) => "fit,extra,server".into(),
    };
    let tmp;
    let dir = match std::env::var_os("HALO_FIXTURE_DIR") {
        Some(d) => {
            let d = PathBuf::from(d);
            std::fs::create_dir_all(&d)?;
            d
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_owned()
        }
    };
    let only = std::env::var("HALO_PARITY_ONLY").unwrap_or_default();
    let tol = Tolerance::default();
    println!("llama-fit-params: {}", fit.display());
    println!(
        "tolerance: {:.0} % or {} MiB per figure",
        tol.rel * 100.0,
        tol.abs_mib
    );
    println!();

    let mut main_rows = Vec::new();
    let mut extra_rows = Vec::new();
    let mut server_rows = Vec::new();
    let mut failures = Vec::new();
    let kinds = if smoke {
        &SparseModel::ALL[..1]
    } else {
        &SparseModel::ALL[..]
    };
    for &kind in kinds {
        let spec = kind.spec();
        if !only.is_empty() && !spec.name.contains(&only) {
            continue;
        }
        let path = dir.join(spec.file_name);
        if !path.exists() {
            write_sparse_with(kind, &path, VocabStyle::SizeOnly)
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let model = read_model(&path).with_context(|| format!("reading {}", path.display()))?;
        let params = model_params(&model)?;
        let label = format!("{} ({})", spec.name, spec.arch);
        let header_ff = model.first().get_u64(&format!(
            "{}.expert_feed_forward_length",
            params.architecture
        ));
        if header_ff.is_some() {
            println!(
                "{label}: expert_feed_forward_length {header_ff:?} in the header, {:?} inferred from the parameter count",
                infer_expert_ff(&params)
            );
        }
        for (section, tool, set, rows) in [
            (
                "fit",
                Tool::FitParams,
                cases(params.context_length),
                &mut main_rows,
            ),
            ("extra", Tool::FitParams, extra_cases(), &mut extra_rows),
            (
                "server",
                Tool::Server,
                server_cases(params.context_length),
                &mut server_rows,
            ),
        ] {
            if !sections.split(',').any(|s| s == section) {
                continue;
            }
            let cases = if smoke { 1 } else { set.len() };
            for case in set.into_iter().take(cases) {
                let est = estimate(&params, &case.opts);
                let proj: Result<LlamaProjection, ParityError> = match tool {
                    Tool::FitParams => run_fit_params(&fit, &path, &case.opts),
                    Tool::Server => {
                        run_server_projection(&server, &path, &case.opts, Duration::from_secs(120))
                    }
                };
                match proj {
                    Ok(proj) => {
                        let row = ParityRow::new(&label, &case.opts, &est, &proj, tol);
                        if !row.passes() {
                            failures.push((row.clone(), est.notes.clone(), proj));
                        }
                        rows.push(row);
                    }
                    Err(e) if smoke => bail!("{label} ctx {}: {e}", case.opts.ctx),
                    Err(e) => println!("{label} ctx {}: {e}", case.opts.ctx),
                }
            }
        }
    }

    println!("{}", ParityRow::header());
    for row in &main_rows {
        println!("{row}");
    }
    println!();
    println!("extra shapes (flash attention off, 4 sequences, --swa-full, other batch sizes):");
    println!("{}", ParityRow::header());
    for row in &extra_rows {
        println!("{row}");
    }
    println!();
    println!(
        "llama-server's own projection (--fit pass, one logit row per slot; kvu = unified KV):"
    );
    println!("{}", ParityRow::header());
    for row in &server_rows {
        println!("{row}");
    }
    println!();
    let total = main_rows.len() + extra_rows.len() + server_rows.len();
    println!(
        "{} of {total} rows within tolerance",
        total - failures.len()
    );
    for (row, notes, proj) in &failures {
        println!();
        println!("MISS {row}");
        println!("  llama.cpp precise: {:?}", proj.precise.buffers());
        for n in notes {
            println!("  {n}");
        }
    }
    if !failures.is_empty() && std::env::var_os("HALO_PARITY_STRICT").is_some() {
        bail!("{} rows outside tolerance", failures.len());
    }
    Ok(())
}
