//! Reads what a real `llama-server` (or `llama-fit-params -v`) logged about
//! its buffers, so estimates can learn from real loads.
//!
//! The lines, as llama.cpp prints them:
//!
//! * `load_tensors: CPU_Mapped model buffer size = 4437.80 MiB`, one per
//!   weight buffer (`llama_model_base::load_tensors`, `src/llama-model.cpp`);
//! * `llama_kv_cache: CPU KV buffer size = 512.00 MiB` per device and
//!   `llama_kv_cache: size = 512.00 MiB (4096 cells, ...)` per cache
//!   (`src/llama-kv-cache.cpp`); `llama_memory_recurrent: CPU RS buffer
//!   size = ...` and `llama_memory_recurrent: size = ...`
//!   (`src/llama-memory-recurrent.cpp`);
//! * `llama_context: CPU  output buffer size = 0.49 MiB` and
//!   `sched_reserve: CPU compute buffer size = 294.52 MiB` per backend
//!   (`src/llama-context.cpp`);
//! * the `memory_breakdown_print` table (`common/fit.cpp`), which
//!   `llama-server` logs when it exits: `| - Host | 1500 = 693 + 512 + 294 |`.
//!
//! A log can hold several loads: `llama-server` first measures with
//! `no_alloc` (dummy buffers logged as `0.00 MiB`) when `--fit` is on; the
//! last load wins. Figures are summed over devices.

use super::MIB;

/// Which bucket a logged buffer belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BufferKind {
    /// `model buffer size`
    Model,
    /// `KV buffer size`
    Kv,
    /// `RS buffer size` (recurrent state)
    Recurrent,
    /// `output buffer size`
    Output,
    /// `compute buffer size`
    Compute,
}

/// One logged buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferLine {
    /// The bucket.
    pub kind: BufferKind,
    /// The buffer type, e.g. `CPU_Mapped`, `CPU`, `ROCm0`.
    pub buffer: String,
    /// Its size.
    pub bytes: u64,
}

/// What one load logged. `None` where the log had no such line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedBuffers {
    /// Weight buffers, summed.
    pub model_bytes: Option<u64>,
    /// The memory-mapped part of [`Self::model_bytes`] (`CPU_Mapped` and
    /// other `*_Mapped` buffers). A mapped buffer spans the whole tensor data
    /// range of the file, including tensors that were copied out into a
    /// repacked buffer (`CPU_REPACK`), so mapped + repacked counts those
    /// tensors twice; the mapped copies are clean page cache.
    pub mapped_model_bytes: Option<u64>,
    /// KV cache plus recurrent state, summed over caches and devices.
    pub kv_bytes: Option<u64>,
    /// Compute buffers of the last reservation, summed over backends.
    pub compute_bytes: Option<u64>,
    /// Output (logits) buffer.
    pub output_bytes: Option<u64>,
    /// The exit-time breakdown table `[model, context, compute]` in MiB,
    /// summed over its rows.
    pub breakdown_mib: Option<[u64; 3]>,
    /// `llama_context: n_ctx = ...`
    pub n_ctx: Option<u64>,
    /// `llama_context: n_seq_max = ...`
    pub n_seq_max: Option<u64>,
    /// K and V cache types from `llama_kv_cache: size = ... K (f16): ...`.
    pub cache_types: Option<(String, String)>,
    /// Every buffer line of the last load.
    pub lines: Vec<BufferLine>,
}

impl ObservedBuffers {
    /// Whether the log said anything about buffers at all.
    pub fn is_empty(&self) -> bool {
        self.model_bytes.is_none()
            && self.kv_bytes.is_none()
            && self.compute_bytes.is_none()
            && self.output_bytes.is_none()
            && self.breakdown_mib.is_none()
    }
}

/// `... = 123.45 MiB ...`: the number after the first `=` that is followed
/// by `MiB`, in bytes.
fn mib_after_eq(line: &str) -> Option<u64> {
    let (_, rest) = line.split_once('=')?;
    let mut words = rest.split_whitespace();
    let value: f64 = words.next()?.parse().ok()?;
    (words.next()? == "MiB" && value.is_finite() && value >= 0.0)
        .then(|| (value * MIB as f64).round() as u64)
}

/// `xxx: NAME <what> buffer size = ...`: the word before `<what>`.
fn buffer_name(line: &str, what: &str) -> Option<String> {
    let idx = line.find(what)?;
    let before = line[..idx].trim_end();
    let name = before.rsplit(|c: char| c.is_whitespace()).next()?;
    (!name.is_empty() && !name.ends_with(':')).then(|| name.to_owned())
}

/// `llama_context: n_ctx = 4096`: the integer after `key =`.
fn key_value(line: &str, key: &str) -> Option<u64> {
    let idx = line.find(key)?;
    let rest = line[idx + key.len()..].trim_start();
    let rest = rest.strip_prefix('=')?;
    rest.split_whitespace().next()?.parse().ok()
}

#[derive(Default)]
struct Load {
    lines: Vec<BufferLine>,
    kv_summary: Option<u64>,
    compute: Vec<BufferLine>,
    compute_open: bool,
    cache_types: Option<(String, String)>,
}

/// Parses a llama.cpp load log (stderr of `llama-server`, any verbosity that
/// includes INFO, or `llama-fit-params -v`).
pub fn parse_load_log(text: &str) -> ObservedBuffers {
    let mut load = Load::default();
    let mut seen_non_model = false;
    let mut out = ObservedBuffers::default();
    let mut table: Option<[u64; 3]> = None;

    for line in text.lines() {
        if line.contains("memory_breakdown_print") {
            if line.contains("memory breakdown [MiB]") {
                table = Some([0; 3]);
            } else if let Some((_, m, c, k)) = super::parity::parse_table_row(line) {
                let t = table.get_or_insert([0; 3]);
                t[0] += m;
                t[1] += c;
                t[2] += k;
            }
            continue;
        }
        if let Some(v) = key_value(line, "llama_context: n_ctx ") {
            out.n_ctx = Some(v);
        }
        if let Some(v) = key_value(line, "llama_context: n_seq_max ") {
            out.n_seq_max = Some(v);
        }
        if line.contains("sched_reserve: reserving") {
            load.compute_open = false;
        }
        let kinds = [
            (" model buffer size", BufferKind::Model),
            (" KV buffer size", BufferKind::Kv),
            (" RS buffer size", BufferKind::Recurrent),
            (" output buffer size", BufferKind::Output),
            (" compute buffer size", BufferKind::Compute),
        ];
        if let Some((what, kind)) = kinds.iter().find(|(w, _)| line.contains(w)) {
            let (Some(bytes), Some(buffer)) = (mib_after_eq(line), buffer_name(line, what)) else {
                continue;
            };
            if *kind == BufferKind::Model {
                if seen_non_model {
                    // A new load begins: forget the previous one.
                    load = Load::default();
                    seen_non_model = false;
                }
            } else {
                seen_non_model = true;
            }
            let entry = BufferLine {
                kind: *kind,
                buffer,
                bytes,
            };
            if *kind == BufferKind::Compute {
                // One reservation logs each backend once; a repeated backend
                // or a new "reserving" starts the next reservation.
                if !load.compute_open || load.compute.iter().any(|c| c.buffer == entry.buffer) {
                    load.compute.clear();
                    load.compute_open = true;
                }
                load.compute.push(entry.clone());
            }
            load.lines.push(entry);
            continue;
        }
        // Per-cache summaries carry the real size even when the buffer was a
        // no_alloc dummy: "llama_kv_cache: size =  512.00 MiB (  4096 cells,
        // ...), K (f16): 256.00 MiB, V (f16): 256.00 MiB".
        if line.contains("llama_kv_cache: size =")
            || line.contains("llama_memory_recurrent: size =")
        {
            if let Some(bytes) = mib_after_eq(line) {
                seen_non_model = true;
                *load.kv_summary.get_or_insert(0) += bytes;
            }
            if let (Some(k), Some(v)) = (type_in_parens(line, " K ("), type_in_parens(line, " V ("))
            {
                load.cache_types = Some((k, v));
            }
        }
    }

    let sum = |kind: BufferKind| -> Option<u64> {
        let mut it = load.lines.iter().filter(|l| l.kind == kind).peekable();
        it.peek()?;
        Some(it.map(|l| l.bytes).sum())
    };
    // Dummy (no_alloc) weight buffers log 0.00 MiB: no information.
    out.model_bytes = sum(BufferKind::Model).filter(|&b| b > 0);
    out.mapped_model_bytes = {
        let mapped: Vec<u64> = load
            .lines
            .iter()
            .filter(|l| l.kind == BufferKind::Model && l.buffer.ends_with("_Mapped"))
            .map(|l| l.bytes)
            .collect();
        (!mapped.is_empty() && out.model_bytes.is_some()).then(|| mapped.iter().sum())
    };
    let kv_buffers = match (sum(BufferKind::Kv), sum(BufferKind::Recurrent)) {
        (None, None) => None,
        (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
    };
    out.kv_bytes = match (load.kv_summary, kv_buffers) {
        (Some(s), _) => Some(s),
        (None, b) => b,
    };
    out.compute_bytes =
        (!load.compute.is_empty()).then(|| load.compute.iter().map(|c| c.bytes).sum());
    out.output_bytes = load
        .lines
        .iter()
        .rev()
        .find(|l| l.kind == BufferKind::Output)
        .map(|l| l.bytes);
    out.breakdown_mib = table;
    out.cache_types = load.cache_types;
    out.lines = load.lines;
    out
}

/// `K (f16)` → `f16`.
fn type_in_parens(line: &str, marker: &str) -> Option<String> {
    let idx = line.find(marker)?;
    let rest = &line[idx + marker.len()..];
    let end = rest.find(')')?;
    Some(rest[..end].trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mib(x: f64) -> u64 {
        (x * MIB as f64).round() as u64
    }

    #[test]
    fn buffer_lines_are_summed_per_kind() {
        let log = "\
load_tensors: CPU_Mapped model buffer size =   693.00 MiB
load_tensors:   CPU_REPACK model buffer size =  3744.00 MiB
llama_context:        CPU  output buffer size =     0.49 MiB
llama_kv_cache:        CPU KV buffer size =   512.00 MiB
sched_reserve: reserving ...
sched_reserve:        CPU compute buffer size =   294.52 MiB
";
        let o = parse_load_log(log);
        assert_eq!(o.model_bytes, Some(mib(693.0 + 3744.0)));
        assert_eq!(o.kv_bytes, Some(mib(512.0)));
        assert_eq!(o.output_bytes, Some(mib(0.49)));
        assert_eq!(o.compute_bytes, Some(mib(294.52)));
        assert_eq!(o.breakdown_mib, None);
        assert_eq!(o.lines.len(), 5);
        assert_eq!(o.lines[1].buffer, "CPU_REPACK");
    }

    #[test]
    fn absent_lines_are_none() {
        let o = parse_load_log("main: nothing interesting\n");
        assert!(o.is_empty());
        assert_eq!(o.n_ctx, None);
    }

    #[test]
    fn a_later_load_replaces_a_no_alloc_measurement() {
        let log = "\
load_tensors:          CPU model buffer size =     0.00 MiB
llama_kv_cache:        CPU KV buffer size =     0.00 MiB
llama_kv_cache: size =  512.00 MiB (  4096 cells,  32 layers,  1/1 seqs), K (f16):  256.00 MiB, V (f16):  256.00 MiB
sched_reserve:        CPU compute buffer size =   294.52 MiB
load_tensors:   CPU_Mapped model buffer size =  4437.80 MiB
llama_kv_cache:        CPU KV buffer size =   272.00 MiB
llama_kv_cache: size =  272.00 MiB (  4096 cells,  32 layers,  1/1 seqs), K (q8_0):  136.00 MiB, V (q8_0):  136.00 MiB
sched_reserve:        CPU compute buffer size =   294.60 MiB
";
        let o = parse_load_log(log);
        assert_eq!(o.model_bytes, Some(mib(4437.80)));
        assert_eq!(o.kv_bytes, Some(mib(272.0)));
        assert_eq!(o.compute_bytes, Some(mib(294.60)));
        assert_eq!(o.cache_types, Some(("q8_0".to_owned(), "q8_0".to_owned())));
    }

    #[test]
    fn kv_summaries_are_used_when_buffers_are_dummies() {
        let log = "\
llama_kv_cache:        CPU KV buffer size =     0.00 MiB
llama_kv_cache: size =   96.00 MiB (  4096 cells,  12 layers,  1/1 seqs), K (f16):   48.00 MiB, V (f16):   48.00 MiB
llama_kv_cache:        CPU KV buffer size =     0.00 MiB
llama_kv_cache: size =   18.00 MiB (   768 cells,  12 layers,  1/1 seqs), K (f16):    9.00 MiB, V (f16):    9.00 MiB
";
        assert_eq!(parse_load_log(log).kv_bytes, Some(mib(114.0)));
    }

    #[test]
    fn recurrent_state_counts_as_context() {
        let log = "\
llama_kv_cache:        CPU KV buffer size =     8.00 MiB
llama_memory_recurrent:        CPU RS buffer size =    98.81 MiB
";
        assert_eq!(parse_load_log(log).kv_bytes, Some(mib(8.0) + mib(98.81)));
    }

    #[test]
    fn only_the_last_compute_reservation_counts() {
        let log = "\
sched_reserve: reserving ...
sched_reserve:      ROCm0 compute buffer size =   300.00 MiB
sched_reserve:  ROCm_Host compute buffer size =    10.00 MiB
sched_reserve: reserving ...
sched_reserve:      ROCm0 compute buffer size =   310.00 MiB
sched_reserve:  ROCm_Host compute buffer size =    12.00 MiB
";
        assert_eq!(parse_load_log(log).compute_bytes, Some(mib(322.0)));
    }

    #[test]
    fn breakdown_table_rows_are_summed() {
        let log = "\
llama_memory_breakdown_print: | memory breakdown [MiB] | total   free    self   model   context   compute    unaccounted |
llama_memory_breakdown_print: |   - Host               |                 1500 =   693 +     512 +     294                |
llama_memory_breakdown_print: |   - CPU_REPACK         |                 3744 =  3744 +       0 +       0                |
";
        assert_eq!(parse_load_log(log).breakdown_mib, Some([4437, 512, 294]));
    }

    /// Real `llama-server` logs (see `testdata/README.md`).
    mod real {
        use super::*;

        #[test]
        fn default_verbosity_logs_no_buffers() {
            let o = parse_load_log(include_str!("testdata/server-tiny-default.log"));
            assert!(o.is_empty(), "{o:?}");
            assert_eq!(o.n_ctx, None);
        }

        #[test]
        fn verbose_log_skips_the_no_alloc_fit_pass() {
            let o = parse_load_log(include_str!("testdata/server-tiny-verbose.log"));
            assert_eq!(o.model_bytes, Some(mib(0.51)));
            assert_eq!(o.mapped_model_bytes, Some(mib(0.51)));
            assert_eq!(o.kv_bytes, Some(mib(1.0)));
            assert_eq!(o.compute_bytes, Some(mib(5.14)));
            assert_eq!(o.output_bytes, Some(mib(0.01)));
            assert_eq!(o.breakdown_mib, Some([0, 1, 5]));
            assert_eq!((o.n_ctx, o.n_seq_max), (Some(4096), Some(4)));
            // The fit pass's dummy buffers are gone: one line per kind.
            assert_eq!(o.lines.len(), 4, "{:?}", o.lines);
        }

        #[test]
        fn info_verbosity_has_every_buffer() {
            let o = parse_load_log(include_str!("testdata/server-tiny-lv4.log"));
            assert_eq!(o.model_bytes, Some(mib(0.51)));
            assert_eq!(o.kv_bytes, Some(mib(1.0)));
            assert_eq!(o.compute_bytes, Some(mib(5.14)));
            assert_eq!(o.cache_types, Some(("f16".to_owned(), "f16".to_owned())));
        }

        #[test]
        fn repacked_weights_are_summed_with_the_mapping() {
            let o = parse_load_log(include_str!("testdata/server-llama8b-q4km-lv4.log"));
            assert_eq!(o.model_bytes, Some(mib(4685.30) + mib(3204.0)));
            assert_eq!(o.mapped_model_bytes, Some(mib(4685.30)));
            assert_eq!(o.kv_bytes, Some(mib(1024.0)));
            assert_eq!(o.compute_bytes, Some(mib(132.02)));
            assert_eq!(o.output_bytes, Some(mib(1.96)));
            // The exit table (the last one) counts the mapping in full too.
            assert_eq!(o.breakdown_mib, Some([4685 + 3204, 1024, 132]));
            assert_eq!((o.n_ctx, o.n_seq_max), (Some(8192), Some(4)));
        }

        #[test]
        fn sliding_window_caches_add_up() {
            let o = parse_load_log(include_str!("testdata/server-gptoss-small-iswa-q8-lv4.log"));
            assert_eq!(o.kv_bytes, Some(mib(8.50) + mib(1.59)));
            assert_eq!(o.cache_types, Some(("q8_0".to_owned(), "q8_0".to_owned())));
            assert_eq!(o.model_bytes, Some(mib(128.61) + mib(51.0)));
            assert_eq!(o.compute_bytes, Some(mib(26.84)));
            assert_eq!(o.n_seq_max, Some(2));
        }

        #[test]
        fn recurrent_state_joins_the_kv_cache() {
            let o = parse_load_log(include_str!(
                "testdata/server-nemotronh-small-hybrid-lv4.log"
            ));
            assert_eq!(o.kv_bytes, Some(mib(4.0) + mib(4.21)));
            assert_eq!(o.compute_bytes, Some(mib(83.01)));
            assert_eq!(o.model_bytes, Some(mib(91.03)));
            assert_eq!(o.breakdown_mib, Some([91, 8, 83]));
        }
    }

    #[test]
    fn context_keys_are_read() {
        let log = "\
llama_context: n_seq_max             = 4
llama_context: n_ctx                 = 16384
llama_context: n_ctx_seq             = 16384
";
        let o = parse_load_log(log);
        assert_eq!((o.n_ctx, o.n_seq_max), (Some(16384), Some(4)));
    }
}
