//! Reads the buffer sizes llama-server prints while loading a model, so the
//! agent can report what a load really took next to the controller's
//! estimate. The lines come from llama.cpp's `LLAMA_LOG_INFO` calls (shown
//! only at `-lv 4`, which the agent passes):
//!
//! * `src/llama-model.cpp`: `"%s: %12s model buffer size = %8.2f MiB"`, one
//!   per buffer (several per device for split files): summed.
//! * `src/llama-kv-cache.cpp`: `"%s: %10s KV buffer size = %8.2f MiB"`, one
//!   per device per cache (SWA models have two caches): summed; DeepSeek V4's
//!   `"%10s DSV4 %s state buffer size"` counts as KV too.
//! * `src/llama-memory-recurrent.cpp`: `"%10s RS buffer size"`: summed.
//! * `src/llama-context.cpp`: `"%10s  output buffer size"` (latest wins) and
//!   `"%10s compute buffer size"` per backend; the scheduler may reserve
//!   again, so the latest value per device wins.
//!
//! Lines carry a `0.00.009.659 I ` time/level prefix and a function name
//! that changed between llama.cpp versions (`llama_context:`,
//! `sched_reserve:`), so the parser keys on the text after the device name
//! only. A captured log of the tiny model is in `testdata/`.

use proto::domain::ObservedBuffers;
use std::collections::BTreeMap;

/// Which buffer a line reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferKind {
    /// Model weights.
    Model,
    /// KV cache (and DeepSeek V4 state).
    Kv,
    /// Compute (scheduler) buffer.
    Compute,
    /// Logits/embeddings output buffer.
    Output,
    /// Recurrent state.
    Recurrent,
}

/// One `… buffer size = N MiB` line.
#[derive(Debug, Clone, PartialEq)]
pub struct BufferLine {
    /// What the buffer holds.
    pub kind: BufferKind,
    /// The backend buffer name (`CPU`, `CPU_Mapped`, `ROCm0`, …).
    pub device: String,
    /// Size in bytes (the printed MiB, to its two decimals).
    pub bytes: u64,
}

/// Parses one log line; `None` when it is not a buffer size line.
pub fn parse_line(line: &str) -> Option<BufferLine> {
    const MARK: &str = " buffer size = ";
    let at = line.find(MARK)?;
    let mut value = line[at + MARK.len()..].split_whitespace();
    let mib: f64 = value.next()?.parse().ok()?;
    if value.next() != Some("MiB") || !mib.is_finite() || mib < 0.0 {
        return None;
    }
    let mut words = line[..at].split_whitespace().rev();
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
            BufferKind::Kv
        }
        _ => return None,
    };
    let device = words.next()?.to_owned();
    if device.ends_with(':') {
        // No device name: not one of llama.cpp's formats.
        return None;
    }
    Some(BufferLine {
        kind,
        device,
        bytes: (mib * 1024.0 * 1024.0).round() as u64,
    })
}

/// Accumulates buffer lines of one load.
#[derive(Debug, Clone, Default)]
pub struct LoadLog {
    model: u64,
    kv: u64,
    recurrent: u64,
    output: BTreeMap<String, u64>,
    compute: BTreeMap<String, u64>,
    seen: bool,
}

impl LoadLog {
    /// Feeds one line; returns whether it was a buffer line.
    pub fn feed(&mut self, line: &str) -> bool {
        let Some(b) = parse_line(line) else {
            return false;
        };
        self.seen = true;
        match b.kind {
            BufferKind::Model => self.model = self.model.saturating_add(b.bytes),
            BufferKind::Kv => self.kv = self.kv.saturating_add(b.bytes),
            BufferKind::Recurrent => self.recurrent = self.recurrent.saturating_add(b.bytes),
            BufferKind::Output => {
                self.output.insert(b.device, b.bytes);
            }
            BufferKind::Compute => {
                self.compute.insert(b.device, b.bytes);
            }
        }
        true
    }

    /// The sizes so far; `None` until a buffer line was seen.
    pub fn buffers(&self) -> Option<ObservedBuffers> {
        self.seen.then(|| ObservedBuffers {
            model_bytes: self.model,
            kv_bytes: self.kv,
            compute_bytes: self.compute.values().fold(0, |a, b| a.saturating_add(*b)),
            output_bytes: self.output.values().fold(0, |a, b| a.saturating_add(*b)),
            recurrent_bytes: self.recurrent,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1024.0 * 1024.0;

    fn mib(v: f64) -> u64 {
        (v * MIB).round() as u64
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
                model_bytes: mib(0.51),
                kv_bytes: mib(0.12),
                compute_bytes: mib(0.35),
                output_bytes: 0,
                recurrent_bytes: 0,
            })
        );
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
        for (line, kind, device, v) in cases {
            let b = parse_line(line).unwrap_or_else(|| panic!("{line}"));
            assert_eq!((b.kind, b.device.as_str(), b.bytes), (kind, device, mib(v)));
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
            "",
        ] {
            assert_eq!(parse_line(line), None, "{line}");
        }
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
        assert_eq!(b.model_bytes, mib(1150.0));
        assert_eq!(b.kv_bytes, mib(80.0));
        assert_eq!(b.compute_bytes, mib(210.0));
    }
}
