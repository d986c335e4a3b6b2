//! A node's memory reading: system RAM, amdgpu VRAM/GTT, per-process use, and
//! the arithmetic that turns them into the bytes a model may use. Anything
//! the probe could not read is `None`, never a zero that looks real.

use crate::v1;
use serde::{Deserialize, Serialize};

/// Smallest safety margin kept on top of an estimate.
pub const MARGIN_MIN_BYTES: u64 = 512 * 1024 * 1024;
/// The margin as a percentage of the estimate, when that is larger.
pub const MARGIN_PERCENT: u64 = 3;

/// The safety margin on top of an estimate of `total` bytes: what the
/// controller keeps free beside a placement, and what an agent's
/// `instance_memory_limit = "estimate"` allows above the estimate.
pub fn margin(total: u64) -> u64 {
    MARGIN_MIN_BYTES.max(total.saturating_mul(MARGIN_PERCENT) / 100)
}

/// One memory reading of a node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MemoryReport {
    /// When the reading was taken (Unix ms).
    pub sampled_at_unix_ms: u64,
    /// `MemTotal` from `/proc/meminfo`.
    pub mem_total_bytes: Option<u64>,
    /// `MemAvailable` from `/proc/meminfo`.
    pub mem_available_bytes: Option<u64>,
    /// `SwapTotal`.
    pub swap_total_bytes: Option<u64>,
    /// `SwapFree`.
    pub swap_free_bytes: Option<u64>,
    /// `/proc/pressure/memory` `some avg10` (percent).
    pub psi_some_avg10: Option<f64>,
    /// `/proc/pressure/memory` `full avg10` (percent).
    pub psi_full_avg10: Option<f64>,
    /// amdgpu devices found under `/sys/class/drm`.
    pub gpus: Vec<GpuMemory>,
    /// Processes of interest (llama-server instances).
    pub processes: Vec<ProcessMemory>,
    /// Bytes a model may use on this node, when it can be worked out.
    pub usable_bytes: Option<u64>,
    /// One line per step of the arithmetic behind `usable_bytes`.
    pub usable_explanation: Vec<String>,
    /// True when the GPU draws from system RAM (an APU such as Strix Halo):
    /// RAM and GTT are then one pool, not two.
    pub unified_memory: bool,
    /// Set while the node is under memory pressure.
    #[serde(default)]
    pub pressure: Option<MemoryPressure>,
}

/// Why a node counts as under memory pressure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryPressure {
    /// Which threshold was crossed, with the figures.
    pub reason: String,
    /// The process outside halo that grew most since before the pressure,
    /// when one did; empty otherwise.
    pub grew: String,
}

impl From<MemoryPressure> for v1::MemoryPressure {
    fn from(p: MemoryPressure) -> Self {
        v1::MemoryPressure {
            reason: p.reason,
            grew: p.grew,
        }
    }
}

impl From<v1::MemoryPressure> for MemoryPressure {
    fn from(p: v1::MemoryPressure) -> Self {
        MemoryPressure {
            reason: p.reason,
            grew: p.grew,
        }
    }
}

/// One amdgpu device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuMemory {
    /// `card0`, `card1`, …
    pub card: String,
    /// `mem_info_vram_total`.
    pub vram_total_bytes: Option<u64>,
    /// `mem_info_vram_used`.
    pub vram_used_bytes: Option<u64>,
    /// `mem_info_gtt_total`.
    pub gtt_total_bytes: Option<u64>,
    /// `mem_info_gtt_used`.
    pub gtt_used_bytes: Option<u64>,
    /// `ttm.pages_limit` × page size, when the parameter is readable.
    pub ttm_limit_bytes: Option<u64>,
}

/// Memory one process uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProcessMemory {
    /// Process id.
    pub pid: u32,
    /// `Name:` from `/proc/PID/status`.
    pub name: String,
    /// `VmRSS`.
    pub rss_bytes: Option<u64>,
    /// Sum of `drm-memory-vram` over distinct `drm-client-id`s.
    pub gpu_vram_bytes: Option<u64>,
    /// Sum of `drm-memory-gtt` over distinct `drm-client-id`s.
    pub gpu_gtt_bytes: Option<u64>,
}

impl From<GpuMemory> for v1::GpuMemory {
    fn from(g: GpuMemory) -> Self {
        v1::GpuMemory {
            card: g.card,
            vram_total_bytes: g.vram_total_bytes,
            vram_used_bytes: g.vram_used_bytes,
            gtt_total_bytes: g.gtt_total_bytes,
            gtt_used_bytes: g.gtt_used_bytes,
            ttm_limit_bytes: g.ttm_limit_bytes,
        }
    }
}

impl From<v1::GpuMemory> for GpuMemory {
    fn from(g: v1::GpuMemory) -> Self {
        GpuMemory {
            card: g.card,
            vram_total_bytes: g.vram_total_bytes,
            vram_used_bytes: g.vram_used_bytes,
            gtt_total_bytes: g.gtt_total_bytes,
            gtt_used_bytes: g.gtt_used_bytes,
            ttm_limit_bytes: g.ttm_limit_bytes,
        }
    }
}

impl From<ProcessMemory> for v1::ProcessMemory {
    fn from(p: ProcessMemory) -> Self {
        v1::ProcessMemory {
            pid: p.pid,
            name: p.name,
            rss_bytes: p.rss_bytes,
            gpu_vram_bytes: p.gpu_vram_bytes,
            gpu_gtt_bytes: p.gpu_gtt_bytes,
        }
    }
}

impl From<v1::ProcessMemory> for ProcessMemory {
    fn from(p: v1::ProcessMemory) -> Self {
        ProcessMemory {
            pid: p.pid,
            name: p.name,
            rss_bytes: p.rss_bytes,
            gpu_vram_bytes: p.gpu_vram_bytes,
            gpu_gtt_bytes: p.gpu_gtt_bytes,
        }
    }
}

impl From<MemoryReport> for v1::MemoryReport {
    fn from(m: MemoryReport) -> Self {
        v1::MemoryReport {
            sampled_at_unix_ms: m.sampled_at_unix_ms,
            mem_total_bytes: m.mem_total_bytes,
            mem_available_bytes: m.mem_available_bytes,
            swap_total_bytes: m.swap_total_bytes,
            swap_free_bytes: m.swap_free_bytes,
            psi_some_avg10: m.psi_some_avg10,
            psi_full_avg10: m.psi_full_avg10,
            gpus: m.gpus.into_iter().map(Into::into).collect(),
            processes: m.processes.into_iter().map(Into::into).collect(),
            usable_bytes: m.usable_bytes,
            usable_explanation: m.usable_explanation,
            unified_memory: m.unified_memory,
            pressure: m.pressure.map(Into::into),
        }
    }
}

impl TryFrom<v1::MemoryReport> for MemoryReport {
    type Error = crate::ConversionError;

    fn try_from(m: v1::MemoryReport) -> Result<Self, Self::Error> {
        if let (Some(total), Some(avail)) = (m.mem_total_bytes, m.mem_available_bytes)
            && avail > total
        {
            return Err(crate::ConversionError::Invalid {
                field: "mem_available_bytes",
                reason: format!("{avail} exceeds mem_total_bytes {total}"),
            });
        }
        Ok(MemoryReport {
            sampled_at_unix_ms: m.sampled_at_unix_ms,
            mem_total_bytes: m.mem_total_bytes,
            mem_available_bytes: m.mem_available_bytes,
            swap_total_bytes: m.swap_total_bytes,
            swap_free_bytes: m.swap_free_bytes,
            psi_some_avg10: m.psi_some_avg10,
            psi_full_avg10: m.psi_full_avg10,
            gpus: m.gpus.into_iter().map(Into::into).collect(),
            processes: m.processes.into_iter().map(Into::into).collect(),
            usable_bytes: m.usable_bytes,
            usable_explanation: m.usable_explanation,
            unified_memory: m.unified_memory,
            pressure: m.pressure.map(Into::into),
        })
    }
}
