//! Wall time of one full `haloctl plan` (process start, header parse,
//! estimate for every context, rendering) for each sparse fixture.
//!
//!     cargo bench -p ctl --bench plan
//!
//! Target: under 50 ms end to end for the largest fixture. Prints numbers;
//! asserts nothing about time. `HALO_BENCH_SMOKE=1`: the first fixture
//! only, one run each.

use agent::gguf::fixtures::{self, SparseModel, VocabStyle};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Whether `HALO_BENCH_SMOKE=1` (tests/bench-smoke.sh): one short pass
/// that only shows the bench still runs.
fn smoke() -> bool {
    std::env::var_os("HALO_BENCH_SMOKE").is_some_and(|v| v == "1")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let haloctl = env!("CARGO_BIN_EXE_haloctl");
    let (kinds, runs) = if smoke() {
        (&SparseModel::ALL[..1], 1)
    } else {
        (&SparseModel::ALL[..], 21)
    };
    let dir = tempfile::tempdir()?;
    println!(
        "{:<22} {:>6} {:>10} {:>10} {:>10}",
        "model", "vocab", "min", "median", "p90"
    );
    for &kind in kinds {
        for (style, label) in [
            (VocabStyle::Synthetic, "full"),
            (VocabStyle::SizeOnly, "size"),
        ] {
            let spec = kind.spec();
            let path = dir.path().join(format!("{label}-{}", spec.file_name));
            fixtures::write_sparse_with(kind, &path, style)?;
            let mut times = Vec::new();
            for _ in 0..runs {
                let t = Instant::now();
                let status = Command::new(haloctl)
                    .arg("plan")
                    .arg(&path)
                    .args(["--memory", "128"])
                    .stdout(Stdio::null())
                    .status()?;
                times.push(t.elapsed());
                // 1 = does not fit: still a full plan.
                if !matches!(status.code(), Some(0 | 1)) {
                    return Err(format!("haloctl plan exited with {status}").into());
                }
            }
            times.sort();
            println!(
                "{:<22} {:>6} {:>10} {:>10} {:>10}",
                spec.name,
                label,
                ms(times[0]),
                ms(times[times.len() / 2]),
                ms(times[times.len() * 9 / 10])
            );
            std::fs::remove_file(&path)?;
        }
    }
    println!("\ntarget: < 50 ms end to end for the largest fixture");
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.1}ms", d.as_secs_f64() * 1e3)
}
