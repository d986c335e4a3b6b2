//! Header parse time and bytes read for the largest sparse fixtures.
//!
//!     cargo bench -p agent --bench gguf_parse
//!
//! Targets: under 20 ms per parse, bytes read under the header size + 64 KiB
//! (the weights are never read). Prints numbers; asserts nothing about time.
//! `HALO_BENCH_SMOKE=1`: the first fixture only, one parse each.

use agent::gguf::{self, fixtures};
use std::time::{Duration, Instant};

/// Whether `HALO_BENCH_SMOKE=1` (tests/bench-smoke.sh): one short pass
/// that only shows the bench still runs.
fn smoke() -> bool {
    std::env::var_os("HALO_BENCH_SMOKE").is_some_and(|v| v == "1")
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let (kinds, runs) = if smoke() {
        (&fixtures::SparseModel::ALL[..1], 1)
    } else {
        (&fixtures::SparseModel::ALL[..], 21)
    };
    let dir = tempfile::tempdir()?;
    println!(
        "{:<22} {:>6} {:>12} {:>12} {:>14} {:>10} {:>10} {:>10}",
        "model", "vocab", "file", "header", "bytes read", "over hdr", "median", "p90"
    );
    for &kind in kinds {
        for (style, label) in [
            (fixtures::VocabStyle::Synthetic, "full"),
            (fixtures::VocabStyle::SizeOnly, "size"),
        ] {
            let spec = kind.spec();
            let path = dir.path().join(format!("{label}-{}", spec.file_name));
            fixtures::write_sparse_with(kind, &path, style)?;
            let mut times = Vec::new();
            let mut model = None;
            for _ in 0..runs {
                let t = Instant::now();
                let m = gguf::read_model(&path)?;
                let _params = gguf::model_params(&m)?;
                times.push(t.elapsed());
                model = Some(m);
            }
            let Some(model) = model else { continue };
            times.sort();
            let header = model.first().data_offset;
            let read = model.header_bytes_read();
            println!(
                "{:<22} {:>6} {:>12} {:>12} {:>14} {:>10} {:>10} {:>10}",
                spec.name,
                label,
                proto::units::bytes(model.file_size()),
                proto::units::bytes(header),
                read,
                format!("+{}", read.saturating_sub(header)),
                ms(times[times.len() / 2]),
                ms(times[times.len() * 9 / 10]),
            );
            std::fs::remove_file(&path)?;
        }
    }
    println!("\ntargets: parse < 20 ms, bytes read < header + 65536");
    Ok(())
}

fn ms(d: Duration) -> String {
    format!("{:.2}ms", d.as_secs_f64() * 1e3)
}
