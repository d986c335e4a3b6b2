//! Reads the buffer sizes llama.cpp prints while loading a model, so the
//! agent can report what a load really took ([`ObservedBuffers`]) next to
//! the controller's estimate. The one parser of llama.cpp load logs in halo:
//! the agent feeds it its instances' logs line by line, and the integration
//! tests feed it captured logs and `llama-fit-params -v` output.
//!
//! The lines come from llama.cpp's `LLAMA_LOG_INFO` calls (shown by
//! `llama-server` only at `-lv 4` or `-v`; the agent passes `-lv 4`):
//!
//! * `src/llama-model.cpp`: `"%s: %12s model buffer size = %8.2f MiB"`, one
//!   per weight buffer (several per device for split files, and a
//!   `CPU_REPACK` next to `CPU_Mapped`): summed.
//! * `src/llama-kv-cache.cpp`: `"%s: %10s KV buffer size = %8.2f MiB"` per
//!   device per cache (SWA models have two caches), and one `"%s: size =
//!   %7.2f MiB (... cells ...), K (%s): ..., V (%s): ..."` summary per cache,
//!   which carries the real size even when the buffer was a `no_alloc` dummy:
//!   the summaries win, else the buffers are summed. DeepSeek V4's
//!   `"%10s DSV4 %s state buffer size"` (`src/llama-kv-cache-dsv4.cpp`) has
//!   no such summary and is added to the KV cache.
//! * `src/llama-memory-recurrent.cpp`: `"%10s RS buffer size"` and its
//!   `size =` summary, likewise.
//! * `src/llama-context.cpp`: `"%10s  output buffer size"` (the latest wins)
//!   and, after `sched_reserve: reserving ...`, `"%10s compute buffer size"`
//!   per backend. The scheduler may reserve again: a new `reserving` line
//!   starts a new reservation, and within one the latest value per backend
//!   wins.
//! * `llama_context: n_ctx = ...` and `n_seq_max = ...`.
//! * the `memory breakdown [MiB]` table (`common_memory_breakdown_print`,
//!   `common/fit.cpp`): `| - Host | 1500 = 693 + 512 + 294 |`, which
//!   `llama-server` logs when it exits and `llama-fit-params` after its
//!   measurement: rows summed.
//!
//! A log can hold several loads: with `--fit` on (its default)
//! `llama-server` first measures with `no_alloc` (weight and KV buffers
//! logged as dummy `0.00 MiB` lines, then a projection table); a weight
//! buffer line after anything else starts a new load, and the last load
//! wins, with the table logged after it (the projection before a load is
//! not an observation of it). Dummy weight buffers say nothing and count as
//! absent.
//!
//! A split model's host (`llama-server --rpc`) logs the buffers of its RPC
//! devices too, named `RPC0[10.0.0.2:8100]` (rows `RPC0 (10.0.0.2:8100)` in
//! the table): memory on other nodes. [`LoadLog::buffers`] counts every
//! device; [`LoadLog::local_buffers`], what the agent reports for its
//! node, leaves RPC devices out (the helpers' agents report their
//! ggml-rpc-servers' memory), and then takes the KV cache from its local
//! buffer lines, since the `size =` summary spans all devices.
//!
//! Lines carry a `0.00.009.659 I ` time/level prefix and a function name
//! that changed between llama.cpp versions (`llama_context:`,
//! `sched_reserve:`), so buffer lines are keyed on the text after the
//! buffer name only. Captured logs are in `testdata/` (see its README).

use proto::domain::{MemoryBreakdown, ObservedBuffers};

/// One mebibyte, the unit llama.cpp prints.
const MIB: u64 = 1024 * 1024;

/// Which buffer a line reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BufferKind {
    /// Model weights.
    Model,
    /// KV cache (and DeepSeek V4 state).
    Kv,
    /// Recurrent state.
    Recurrent,
    /// Logits/embeddings output buffer.
    Output,
    /// Compute (scheduler) buffer.
    Compute,
}

/// One `… buffer size = N MiB` line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferLine {
    /// What the buffer holds.
    pub kind: BufferKind,
    /// The backend buffer name (`CPU`, `CPU_Mapped`, `CPU_REPACK`, `ROCm0`, …).
    pub buffer: String,
    /// Size in bytes (the printed MiB, to its two decimals).
    pub bytes: u64,
}

/// Parses one log line; `None` when it is not a buffer size line.
pub fn parse_line(line: &str) -> Option<BufferLine> {
    parse_buffer(line).map(|(b, _)| b)
}

/// [`parse_line`], and whether the line is a DeepSeek V4 state buffer (which
/// no `size =` summary covers).
fn parse_buffer(line: &str) -> Option<(BufferLine, bool)> {
    const MARK: &str = " buffer size = ";
    let at = line.find(MARK)?;
    let mut value = line[at + MARK.len()..].split_whitespace();
    let mib: f64 = value.next()?.parse().ok()?;
    if value.next() != Some("MiB") || !mib.is_finite() || mib < 0.0 {
        return None;
    }
    let mut words = line[..at].split_whitespace().rev();
    let mut state = false;
    let kind = match words.next()? {
        "model" => BufferKind::Model,
        "KV" => BufferKind::Kv,
        "compute" => BufferKind::Compute,
        "output" => BufferKind::Output,
        "RS" => BufferKind::Recurrent,
        "state" => {
            // `%10s DSV4 %s state buffer size`
            let _sub = words.next()?;
            if words.next()? != "DSV4" {
                return None;
            }
            state = true;
            BufferKind::Kv
        }
        _ => return None,
    };
    let buffer = words.next()?.to_owned();
    if buffer.ends_with(':') {
        // No buffer name: not one of llama.cpp's formats.
        return None;
    }
    let bytes = (mib * MIB as f64).round() as u64;
    Some((
        BufferLine {
            kind,
            buffer,
            bytes,
        },
        state,
    ))
}

/// One row of llama.cpp's memory projection, in whole MiB as it prints them
/// (each rounded down).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakdownRow {
    /// `Host`, a device name, or a buffer type such as `CPU_REPACK`.
    pub name: String,
    /// Weights.
    pub model_mib: u64,
    /// KV cache and recurrent state.
    pub context_mib: u64,
    /// Compute buffer.
    pub compute_mib: u64,
}

/// A `common_memory_breakdown_print` row. Host and buffer-type rows read
/// `| - Host | self = model + context + compute |`; device rows read
/// `| - Dev (desc) | total = free + (self = model + context + compute) +
/// unaccounted |`.
pub fn parse_table_row(line: &str) -> Option<BreakdownRow> {
    let mut cells = line.split('|').skip(1);
    let name = cells.next()?.trim().strip_prefix("- ")?.trim().to_owned();
    let values = cells.next()?;
    let inner = match (values.find('('), values.rfind(')')) {
        (Some(a), Some(b)) if a < b => &values[a + 1..b],
        _ => values,
    };
    let (_, sum) = inner.split_once('=')?;
    let mut parts = sum.split('+').map(|p| p.trim().parse::<u64>());
    let model_mib = parts.next()?.ok()?;
    let context_mib = parts.next()?.ok()?;
    let compute_mib = parts.next()?.ok()?;
    Some(BreakdownRow {
        name,
        model_mib,
        context_mib,
        compute_mib,
    })
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

/// `llama_context: n_ctx = 4096`: the integer after `key =`.
fn key_value(line: &str, key: &str) -> Option<u64> {
    let idx = line.find(key)?;
    let rest = line[idx + key.len()..].trim_start();
    let rest = rest.strip_prefix('=')?;
    rest.split_whitespace().next()?.parse().ok()
}

/// `K (f16)` → `f16`.
fn type_in_parens(line: &str, marker: &str) -> Option<String> {
    let idx = line.find(marker)?;
    let rest = &line[idx + marker.len()..];
    let end = rest.find(')')?;
    Some(rest[..end].trim().to_owned())
}

fn add(slot: &mut Option<u64>, bytes: u64) {
    *slot = Some(slot.unwrap_or(0).saturating_add(bytes));
}

/// What one load logged so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Load {
    /// The buffer lines ([`LoadLog::lines`]).
    lines: Vec<BufferLine>,
    /// `llama_kv_cache: size =` summaries.
    kv_summary: Option<u64>,
    /// `llama_memory_recurrent: size =` summaries.
    recurrent_summary: Option<u64>,
    /// DeepSeek V4 state buffers.
    state: Option<u64>,
    /// A `reserving` line was seen since the last compute line.
    compute_stale: bool,
    /// K and V cache types.
    cache_types: Option<(String, String)>,
    /// The breakdown table `[model, context, compute]` in MiB.
    table: Option<[u64; 3]>,
    /// The same without RPC device rows.
    table_local: Option<[u64; 3]>,
}

impl Load {
    /// The sum of `kind`'s lines (of local devices only when `local`).
    fn sum(&self, kind: BufferKind, local: bool) -> Option<u64> {
        self.lines
            .iter()
            .filter(|l| l.kind == kind && !(local && is_remote(&l.buffer)))
            .map(|l| l.bytes)
            .reduce(u64::saturating_add)
    }

    /// Whether a buffer of kind `kind` sits on an RPC device.
    fn has_remote(&self, kind: BufferKind) -> bool {
        self.lines
            .iter()
            .any(|l| l.kind == kind && is_remote(&l.buffer))
    }
}

/// Whether a buffer or table row names an RPC device (`RPC0[host:port]`,
/// `RPC0 (host:port)`): memory on another node.
pub fn is_remote(name: &str) -> bool {
    name.strip_prefix("RPC")
        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))
}

/// Accumulates the lines of a llama.cpp log (stderr of `llama-server` at any
/// verbosity that includes INFO, or `llama-fit-params -v`); the last load
/// wins. The agent feeds it for an instance's whole life, so it stays small:
/// weight, KV and state lines come once per load, and the lines that recur
/// while a server runs (compute reservations, output reallocations) replace
/// the ones they supersede.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadLog {
    load: Load,
    /// A line of the current load other than a weight buffer was seen: the
    /// next weight buffer starts a new load.
    seen_non_model: bool,
    n_ctx: Option<u64>,
    n_seq_max: Option<u64>,
}

/// Parses a whole log.
pub fn parse_load_log(text: &str) -> LoadLog {
    let mut log = LoadLog::default();
    for line in text.lines() {
        log.feed(line);
    }
    log
}

impl LoadLog {
    /// Feeds one line; returns whether it was a buffer line.
    pub fn feed(&mut self, line: &str) -> bool {
        if line.contains("memory_breakdown_print") {
            if line.contains("memory breakdown [MiB]") {
                self.seen_non_model = true;
                self.load.table = Some([0; 3]);
                self.load.table_local = Some([0; 3]);
            } else if let Some(r) = parse_table_row(line) {
                self.seen_non_model = true;
                let mut tables = vec![&mut self.load.table];
                if !is_remote(&r.name) {
                    tables.push(&mut self.load.table_local);
                }
                for table in tables {
                    let t = table.get_or_insert([0; 3]);
                    t[0] = t[0].saturating_add(r.model_mib);
                    t[1] = t[1].saturating_add(r.context_mib);
                    t[2] = t[2].saturating_add(r.compute_mib);
                }
            }
            return false;
        }
        if let Some(v) = key_value(line, "llama_context: n_ctx ") {
            self.n_ctx = Some(v);
        }
        if let Some(v) = key_value(line, "llama_context: n_seq_max ") {
            self.n_seq_max = Some(v);
        }
        if line.contains("sched_reserve: reserving") {
            self.load.compute_stale = true;
        }
        if let Some((b, state)) = parse_buffer(line) {
            if b.kind == BufferKind::Model {
                if self.seen_non_model {
                    // A new load begins: forget the previous one.
                    self.load = Load::default();
                    self.seen_non_model = false;
                }
            } else {
                self.seen_non_model = true;
            }
            if state {
                add(&mut self.load.state, b.bytes);
            }
            let lines = &mut self.load.lines;
            match b.kind {
                BufferKind::Compute => {
                    if std::mem::take(&mut self.load.compute_stale) {
                        lines.retain(|l| l.kind != BufferKind::Compute);
                    }
                    match lines
                        .iter_mut()
                        .find(|l| l.kind == BufferKind::Compute && l.buffer == b.buffer)
                    {
                        Some(l) => l.bytes = b.bytes,
                        None => lines.push(b),
                    }
                }
                BufferKind::Output => {
                    lines.retain(|l| l.kind != BufferKind::Output);
                    lines.push(b);
                }
                _ => lines.push(b),
            }
            return true;
        }
        // "llama_kv_cache: size =  512.00 MiB (  4096 cells, ...), K (f16):
        // 256.00 MiB, V (f16):  256.00 MiB"
        let kv = line.contains("llama_kv_cache: size =");
        if kv || line.contains("llama_memory_recurrent: size =") {
            if let Some(bytes) = mib_after_eq(line) {
                self.seen_non_model = true;
                let slot = if kv {
                    &mut self.load.kv_summary
                } else {
                    &mut self.load.recurrent_summary
                };
                add(slot, bytes);
            }
            if let (Some(k), Some(v)) = (type_in_parens(line, " K ("), type_in_parens(line, " V ("))
            {
                self.load.cache_types = Some((k, v));
            }
        }
        false
    }

    /// The sizes of the last load so far, every device counted; `None`
    /// while the log said nothing about buffers.
    pub fn buffers(&self) -> Option<ObservedBuffers> {
        self.observed(false)
    }

    /// The sizes of the last load so far on this node: without the buffers
    /// of RPC devices (other nodes' ggml-rpc-servers). What the agent
    /// reports for an instance.
    pub fn local_buffers(&self) -> Option<ObservedBuffers> {
        self.observed(true)
    }

    fn observed(&self, local: bool) -> Option<ObservedBuffers> {
        let load = &self.load;
        // Dummy (no_alloc) weight buffers log 0.00 MiB: no information.
        let model_bytes = load.sum(BufferKind::Model, local).filter(|&b| b > 0);
        let mapped_model_bytes = load
            .lines
            .iter()
            .filter(|l| l.kind == BufferKind::Model && l.buffer.ends_with("_Mapped"))
            .map(|l| l.bytes)
            .reduce(u64::saturating_add)
            .filter(|_| model_bytes.is_some());
        // The `size =` summaries span every device: with RPC devices, the
        // local buffer lines (DeepSeek V4 state included) count; none at
        // all means everything is remote.
        let kv_bytes = if local && load.has_remote(BufferKind::Kv) {
            Some(load.sum(BufferKind::Kv, true).unwrap_or(0))
        } else {
            let kv_buffers = load
                .sum(BufferKind::Kv, false)
                .map(|b| b.saturating_sub(load.state.unwrap_or(0)));
            match (load.kv_summary.or(kv_buffers), load.state) {
                (None, None) => None,
                (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
            }
        };
        let recurrent_bytes = if local && load.has_remote(BufferKind::Recurrent) {
            Some(load.sum(BufferKind::Recurrent, true).unwrap_or(0))
        } else {
            load.recurrent_summary
                .or(load.sum(BufferKind::Recurrent, false))
        };
        let table = if local { load.table_local } else { load.table };
        let b = ObservedBuffers {
            model_bytes,
            mapped_model_bytes,
            kv_bytes,
            recurrent_bytes,
            compute_bytes: load.sum(BufferKind::Compute, local),
            output_bytes: load.sum(BufferKind::Output, local),
            breakdown: table.map(|[m, c, k]| MemoryBreakdown {
                model_bytes: m.saturating_mul(MIB),
                context_bytes: c.saturating_mul(MIB),
                compute_bytes: k.saturating_mul(MIB),
            }),
        };
        (!b.is_empty()).then_some(b)
    }

    /// The buffer lines of the last load: every weight, KV and state line,
    /// the output line and the current compute reservation.
    pub fn lines(&self) -> &[BufferLine] {
        &self.load.lines
    }

    /// `llama_context: n_ctx = ...`: the context cells actually allocated.
    pub fn n_ctx(&self) -> Option<u64> {
        self.n_ctx
    }

    /// `llama_context: n_seq_max = ...`: the sequences (slots).
    pub fn n_seq_max(&self) -> Option<u64> {
        self.n_seq_max
    }

    /// K and V cache types from the KV cache summary (`K (f16): ...`).
    pub fn cache_types(&self) -> Option<(&str, &str)> {
        self.load
            .cache_types
            .as_ref()
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mib(v: f64) -> u64 {
        (v * MIB as f64).round() as u64
    }

    fn parse(log: &str) -> ObservedBuffers {
        parse_load_log(log).buffers().expect("buffers")
    }

    /// The breakdown table in whole MiB.
    fn table(model: u64, context: u64, compute: u64) -> Option<MemoryBreakdown> {
        Some(MemoryBreakdown {
            model_bytes: model * MIB,
            context_bytes: context * MIB,
            compute_bytes: compute * MIB,
        })
    }

    #[test]
    fn the_captured_tiny_model_log_gives_all_four_buffers() {
        let log = include_str!("testdata/llama-server-tiny-load.log");
        let mut l = LoadLog::default();
        let n = log.lines().filter(|line| l.feed(line)).count();
        assert_eq!(n, 4);
        assert_eq!(
            l.buffers(),
            Some(ObservedBuffers {
                model_bytes: Some(mib(0.51)),
                mapped_model_bytes: Some(mib(0.51)),
                kv_bytes: Some(mib(0.12)),
                recurrent_bytes: None,
                compute_bytes: Some(mib(0.35)),
                output_bytes: Some(0),
                // The table before the load was the --fit projection.
                breakdown: None,
            })
        );
        assert_eq!((l.n_ctx(), l.n_seq_max()), (Some(512), Some(2)));
    }

    #[test]
    fn each_format_parses_with_its_device() {
        let cases = [
            (
                "load_tensors:   CPU_Mapped model buffer size =     1.23 MiB",
                BufferKind::Model,
                "CPU_Mapped",
                1.23,
            ),
            (
                "llama_kv_cache:        ROCm0 KV buffer size =  8192.00 MiB",
                BufferKind::Kv,
                "ROCm0",
                8192.0,
            ),
            (
                "0.00.011.461 I llama_context:        CPU compute buffer size =    66.50 MiB",
                BufferKind::Compute,
                "CPU",
                66.5,
            ),
            (
                "llama_context:  CPU  output buffer size =     0.12 MiB",
                BufferKind::Output,
                "CPU",
                0.12,
            ),
            (
                "llama_memory_recurrent:        CPU RS buffer size =    16.50 MiB",
                BufferKind::Recurrent,
                "CPU",
                16.5,
            ),
            (
                "init:      ROCm0 DSV4 compressed state buffer size =   100.00 MiB",
                BufferKind::Kv,
                "ROCm0",
                100.0,
            ),
        ];
        for (line, kind, buffer, v) in cases {
            let b = parse_line(line).unwrap_or_else(|| panic!("{line}"));
            assert_eq!((b.kind, b.buffer.as_str(), b.bytes), (kind, buffer, mib(v)));
        }
    }

    #[test]
    fn lookalike_lines_are_not_buffers() {
        for line in [
            "llama_kv_cache: size =    0.12 MiB (   512 cells,   2 layers,  1/1 seqs)",
            "llama_adapter_lora_init_impl:        CPU LoRA buffer size =    10.00 MiB",
            "load_tensors: model buffer size = 1.00 MiB",
            "load_tensors:   CPU model buffer size = many MiB",
            "load_tensors:   CPU model buffer size = 1.00 GiB",
            "load_tensors:   CPU model buffer size = -1.00 MiB",
            "~llama_context:        CPU compute buffer size is   5.1426 MiB, matches expectation of   5.1426 MiB",
            "",
        ] {
            assert_eq!(parse_line(line), None, "{line}");
        }
    }

    #[test]
    fn a_split_hosts_log_counts_its_rpc_devices_only_in_the_all_device_view() {
        // Every layer on RPC0 (another node): weights 0.11 MiB mapped on
        // the CPU here, 0.39 MiB there; the KV cache entirely there.
        let l = parse_load_log(include_str!("testdata/server-tiny-rpc-host-lv4.log"));
        let all = l.buffers().expect("all");
        assert_eq!(all.model_bytes, Some(mib(0.11) + mib(0.39)));
        assert_eq!(all.kv_bytes, Some(mib(0.12)));
        assert_eq!(all.compute_bytes, Some(mib(1.76) + mib(1.02)));
        assert_eq!(all.breakdown, table(0, 0, 2));
        let local = l.local_buffers().expect("local");
        assert_eq!(local.model_bytes, Some(mib(0.11)));
        assert_eq!(local.mapped_model_bytes, Some(mib(0.11)));
        assert_eq!(local.kv_bytes, Some(0));
        assert_eq!(local.compute_bytes, Some(mib(1.02)));
        assert_eq!(local.output_bytes, all.output_bytes);
        assert_eq!(local.breakdown, table(0, 0, 1));
        assert!(is_remote("RPC0[127.0.0.1:50052]") && is_remote("RPC12 (10.0.0.2:8100)"));
        assert!(!is_remote("CPU_Mapped") && !is_remote("RPCX") && !is_remote("ROCm0"));
        // Without RPC devices both views agree.
        let l = parse_load_log(include_str!("testdata/server-gptoss-small-iswa-q8-lv4.log"));
        assert_eq!(l.buffers(), l.local_buffers());
    }

    #[test]
    fn model_and_kv_buffers_add_up_and_compute_takes_the_latest_per_device() {
        let mut l = LoadLog::default();
        for line in [
            "load_tensors:   CPU_Mapped model buffer size =   100.00 MiB",
            "load_tensors:   CPU_Mapped model buffer size =    50.00 MiB",
            "load_tensors:        ROCm0 model buffer size =  1000.00 MiB",
            "llama_kv_cache:        ROCm0 KV buffer size =    64.00 MiB",
            "llama_kv_cache:        ROCm0 KV buffer size =    16.00 MiB",
            "sched_reserve:      ROCm0 compute buffer size =   300.00 MiB",
            "sched_reserve:  ROCm_Host compute buffer size =    10.00 MiB",
            "sched_reserve:      ROCm0 compute buffer size =   200.00 MiB",
        ] {
            assert!(l.feed(line), "{line}");
        }
        let b = l.buffers().expect("seen");
        assert_eq!(b.model_bytes, Some(mib(1150.0)));
        assert_eq!(b.mapped_model_bytes, Some(mib(150.0)));
        assert_eq!(b.kv_bytes, Some(mib(80.0)));
        assert_eq!(b.compute_bytes, Some(mib(210.0)));
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
        let l = parse_load_log(log);
        let o = l.buffers().expect("buffers");
        assert_eq!(o.model_bytes, Some(mib(693.0 + 3744.0)));
        assert_eq!(o.context_bytes(), Some(mib(512.0)));
        assert_eq!(o.output_bytes, Some(mib(0.49)));
        assert_eq!(o.compute_bytes, Some(mib(294.52)));
        assert_eq!(o.breakdown, None);
        assert_eq!(l.lines().len(), 5);
        assert_eq!(l.lines()[1].buffer, "CPU_REPACK");
    }

    #[test]
    fn absent_lines_are_none() {
        let l = parse_load_log("main: nothing interesting\n");
        assert_eq!(l.buffers(), None);
        assert_eq!(l.n_ctx(), None);
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
        let l = parse_load_log(log);
        let o = l.buffers().expect("buffers");
        assert_eq!(o.model_bytes, Some(mib(4437.80)));
        assert_eq!(o.context_bytes(), Some(mib(272.0)));
        assert_eq!(o.compute_bytes, Some(mib(294.60)));
        assert_eq!(l.cache_types(), Some(("q8_0", "q8_0")));
    }

    #[test]
    fn kv_summaries_are_used_when_buffers_are_dummies() {
        let log = "\
llama_kv_cache:        CPU KV buffer size =     0.00 MiB
llama_kv_cache: size =   96.00 MiB (  4096 cells,  12 layers,  1/1 seqs), K (f16):   48.00 MiB, V (f16):   48.00 MiB
llama_kv_cache:        CPU KV buffer size =     0.00 MiB
llama_kv_cache: size =   18.00 MiB (   768 cells,  12 layers,  1/1 seqs), K (f16):    9.00 MiB, V (f16):    9.00 MiB
";
        assert_eq!(parse(log).context_bytes(), Some(mib(114.0)));
    }

    #[test]
    fn recurrent_state_counts_as_context() {
        let log = "\
llama_kv_cache:        CPU KV buffer size =     8.00 MiB
llama_memory_recurrent:        CPU RS buffer size =    98.81 MiB
";
        let o = parse(log);
        assert_eq!(o.context_bytes(), Some(mib(8.0) + mib(98.81)));
        assert_eq!(
            (o.kv_bytes, o.recurrent_bytes),
            (Some(mib(8.0)), Some(mib(98.81)))
        );
    }

    #[test]
    fn deepseek_v4_state_adds_to_the_summarised_kv_cache() {
        let log = "\
llama_kv_cache:        CPU KV buffer size =    64.00 MiB
llama_kv_cache: size =   64.00 MiB (  4096 cells,  4 layers,  1/1 seqs), K (f16):   32.00 MiB, V (f16):   32.00 MiB
init:        CPU DSV4 compressed state buffer size =    10.00 MiB
";
        assert_eq!(parse(log).kv_bytes, Some(mib(74.0)));
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
        assert_eq!(parse(log).compute_bytes, Some(mib(322.0)));
    }

    #[test]
    fn a_long_running_server_keeps_one_line_per_recurring_buffer() {
        let mut l = LoadLog::default();
        l.feed("load_tensors:   CPU_Mapped model buffer size =   100.00 MiB");
        for i in 0..1000 {
            l.feed("sched_reserve: reserving ...");
            l.feed(&format!(
                "sched_reserve:        CPU compute buffer size =   {i}.00 MiB"
            ));
            l.feed(&format!(
                "llama_context:        CPU  output buffer size =   {i}.00 MiB"
            ));
        }
        assert_eq!(l.lines().len(), 3, "{:?}", l.lines());
        let b = l.buffers().expect("buffers");
        assert_eq!(
            (b.compute_bytes, b.output_bytes),
            (Some(mib(999.0)), Some(mib(999.0)))
        );
    }

    #[test]
    fn breakdown_table_rows_are_summed() {
        let log = "\
llama_memory_breakdown_print: | memory breakdown [MiB] | total   free    self   model   context   compute    unaccounted |
llama_memory_breakdown_print: |   - Host               |                 1500 =   693 +     512 +     294                |
llama_memory_breakdown_print: |   - CPU_REPACK         |                 3744 =  3744 +       0 +       0                |
";
        assert_eq!(parse(log).breakdown, table(4437, 512, 294));
    }

    #[test]
    fn device_rows_read_the_parenthesised_sum() {
        let row = "x: |   - ROCm0 (8060S) | 98304 = 50000 + (40000 = 30000 + 8000 + 2000) + 8304 |";
        assert_eq!(
            parse_table_row(row),
            Some(BreakdownRow {
                name: "ROCm0 (8060S)".to_owned(),
                model_mib: 30000,
                context_mib: 8000,
                compute_mib: 2000,
            })
        );
        assert_eq!(parse_table_row("| memory breakdown [MiB] | total |"), None);
    }

    #[test]
    fn context_keys_are_read() {
        let log = "\
llama_context: n_seq_max             = 4
llama_context: n_ctx                 = 16384
llama_context: n_ctx_seq             = 16384
";
        let l = parse_load_log(log);
        assert_eq!((l.n_ctx(), l.n_seq_max()), (Some(16384), Some(4)));
    }

    /// Real `llama-server` logs (see `testdata/README.md`).
    mod real {
        use super::*;

        #[test]
        fn default_verbosity_logs_no_buffers() {
            let l = parse_load_log(include_str!("testdata/server-tiny-default.log"));
            assert_eq!(l.buffers(), None);
            assert_eq!(l.n_ctx(), None);
        }

        #[test]
        fn verbose_log_skips_the_no_alloc_fit_pass() {
            let l = parse_load_log(include_str!("testdata/server-tiny-verbose.log"));
            let o = l.buffers().expect("buffers");
            assert_eq!(o.model_bytes, Some(mib(0.51)));
            assert_eq!(o.mapped_model_bytes, Some(mib(0.51)));
            assert_eq!(o.context_bytes(), Some(mib(1.0)));
            assert_eq!(o.compute_bytes, Some(mib(5.14)));
            assert_eq!(o.output_bytes, Some(mib(0.01)));
            assert_eq!(o.breakdown, table(0, 1, 5));
            assert_eq!((l.n_ctx(), l.n_seq_max()), (Some(4096), Some(4)));
            // The fit pass's dummy buffers are gone: one line per kind.
            assert_eq!(l.lines().len(), 4, "{:?}", l.lines());
        }

        #[test]
        fn info_verbosity_has_every_buffer() {
            let l = parse_load_log(include_str!("testdata/server-tiny-lv4.log"));
            let o = l.buffers().expect("buffers");
            assert_eq!(o.model_bytes, Some(mib(0.51)));
            assert_eq!(o.context_bytes(), Some(mib(1.0)));
            assert_eq!(o.compute_bytes, Some(mib(5.14)));
            assert_eq!(l.cache_types(), Some(("f16", "f16")));
        }

        #[test]
        fn repacked_weights_are_summed_with_the_mapping() {
            let l = parse_load_log(include_str!("testdata/server-llama8b-q4km-lv4.log"));
            let o = l.buffers().expect("buffers");
            assert_eq!(o.model_bytes, Some(mib(4685.30) + mib(3204.0)));
            assert_eq!(o.mapped_model_bytes, Some(mib(4685.30)));
            assert_eq!(o.context_bytes(), Some(mib(1024.0)));
            assert_eq!(o.compute_bytes, Some(mib(132.02)));
            assert_eq!(o.output_bytes, Some(mib(1.96)));
            // The exit table (the last one) counts the mapping in full too.
            assert_eq!(o.breakdown, table(4685 + 3204, 1024, 132));
            assert_eq!((l.n_ctx(), l.n_seq_max()), (Some(8192), Some(4)));
        }

        #[test]
        fn sliding_window_caches_add_up() {
            let l = parse_load_log(include_str!("testdata/server-gptoss-small-iswa-q8-lv4.log"));
            let o = l.buffers().expect("buffers");
            assert_eq!(o.context_bytes(), Some(mib(8.50) + mib(1.59)));
            assert_eq!(l.cache_types(), Some(("q8_0", "q8_0")));
            assert_eq!(o.model_bytes, Some(mib(128.61) + mib(51.0)));
            assert_eq!(o.compute_bytes, Some(mib(26.84)));
            assert_eq!(l.n_seq_max(), Some(2));
        }

        #[test]
        fn recurrent_state_joins_the_kv_cache() {
            let o = parse(include_str!(
                "testdata/server-nemotronh-small-hybrid-lv4.log"
            ));
            assert_eq!(o.context_bytes(), Some(mib(4.0) + mib(4.21)));
            assert_eq!(
                (o.kv_bytes, o.recurrent_bytes),
                (Some(mib(4.0)), Some(mib(4.21)))
            );
            assert_eq!(o.compute_bytes, Some(mib(83.01)));
            assert_eq!(o.model_bytes, Some(mib(91.03)));
            assert_eq!(o.breakdown, table(91, 8, 83));
        }
    }
}
