//! The node memory probe: reads procfs and sysfs under a root directory
//! (`/` in production, a fixture tree in tests) and returns a
//! [`MemoryReport`]: system RAM, memory pressure, amdgpu VRAM/GTT, what
//! given processes (the agent's llama-servers) use, and the bytes a model may
//! use on this node with the arithmetic behind them.
//!
//! # Sources
//!
//! * `/proc/meminfo`: `MemTotal`, `MemAvailable`, `SwapTotal`, `SwapFree`.
//! * `/proc/pressure/memory` (PSI): `some avg10`, `full avg10`, when present.
//! * `/sys/class/drm/cardN/device/mem_info_{vram,gtt}_{total,used}` for each
//!   `cardN` holding any of those files (amdgpu writes them; connectors such
//!   as `card1-eDP-1`, render nodes and other drivers' cards are skipped),
//!   and `/sys/module/ttm/parameters/pages_limit` × 4096 (0 reads as unset).
//! * Per process: `Name` and `VmRSS` from `/proc/PID/status`, and GPU
//!   memory from `/proc/PID/fdinfo/*` (`drm-memory-{vram,gtt}`, else
//!   `drm-resident-{vram,gtt}`). Only fds naming a `drm-driver` and a
//!   `drm-client-id` count, and each `(drm-pdev, drm-client-id)` counts once:
//!   dup'd or inherited fds share one client, and adding them would count
//!   the same buffers twice (`amdgpu_top` and `nvtop` de-duplicate the same way).
//!   A readable fdinfo directory without DRM clients is a real zero (a
//!   CPU-only llama-server); an unreadable one (another user's process) is
//!   unknown.
//!
//! # Usable model memory
//!
//! On a Strix Halo (an APU) there is no separate graphics memory: the BIOS
//! carves a small VRAM region (512 MiB by default) out of RAM and the GPU
//! reaches the rest through GTT, which *is* system RAM. RAM and GTT are one
//! pool and are never added. The rule ([`usable_memory`]):
//!
//! * no amdgpu card → CPU node: usable = `MemTotal`.
//! * card with VRAM ≤ [`UNIFIED_VRAM_MAX_BYTES`] (4 GiB) and a GTT total →
//!   unified: usable = VRAM carve-out + min(GTT total, ttm limit if set,
//!   `MemTotal`). The carve-out is outside `MemTotal`, so adding it counts
//!   nothing twice; the GTT window is capped by the ttm limit (which bounds
//!   what TTM will allocate, even when amdgpu reports a larger GTT) and by
//!   `MemTotal` (GTT pages come out of RAM). Several unified cards share one
//!   RAM pool, so only the largest counts. The fixture Strix Halo with
//!   128 GB reads 0.50 GiB + min(120, 120, 124.48) GiB = 120.50 GiB.
//! * card with more VRAM → discrete GPU: its VRAM total counts, RAM does
//!   not. llama.cpp can spill layers to the CPU, but that runs far slower;
//!   placement treats it like the mmap overflow a user must opt into. An
//!   APU set to a big BIOS carve-out (e.g. 96 GiB) therefore reads as
//!   discrete and reports its carve-out only: conservative, and the usual
//!   Strix Halo setup (small carve-out, raised `ttm.pages_limit`) is unified.
//!   A discrete card with ≤ 4 GiB VRAM would be misread as unified.
//! * any card whose totals cannot be read → usable is unknown (`None`), not
//!   a partial sum that looks real.
//!
//! `usable` is capacity: what placed instances already use is subtracted by
//! the controller, not here.
//!
//! # Defensive reading
//!
//! Every file is read through one bounded reader ([`MAX_FILE_BYTES`], a cut
//! drops the partial last line) and every directory walk is bounded. A
//! missing or unparsable value is `None`; a malformed line is skipped;
//! nothing read from a file can panic. Reads are synchronous `std::fs`: the
//! files are small and kernel-generated.

mod parse;
mod usable;

pub use usable::{UNIFIED_VRAM_MAX_BYTES, UsableMemory, usable_memory};

use proto::domain::{GpuMemory, MemoryReport, ProcessMemory};
use proto::units::now_unix_ms;
use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

/// Most bytes read from any one file.
pub const MAX_FILE_BYTES: usize = 1 << 20;

/// Most entries taken from `/sys/class/drm` or one `/proc/PID/fdinfo`.
pub const MAX_DIR_ENTRIES: usize = 1 << 16;

/// Most entries taken from `/proc` (Linux's largest `pid_max` is 2^22).
pub const MAX_PROC_ENTRIES: usize = 1 << 22;

/// Page size `ttm.pages_limit` counts in (4 KiB on x86-64, the Strix Halo ISA).
pub const PAGE_SIZE: u64 = 4096;

/// The executable name [`Probe::find_llama_servers`] looks for.
pub const LLAMA_SERVER: &str = "llama-server";

/// Most bytes of `/proc/PID/cmdline` read to find `argv[0]` (`PATH_MAX`).
const MAX_ARGV0_BYTES: u64 = 4096;

/// The four amdgpu sysfs files, in `GpuMemory` field order.
const MEM_INFO_FILES: [&str; 4] = [
    "mem_info_vram_total",
    "mem_info_vram_used",
    "mem_info_gtt_total",
    "mem_info_gtt_used",
];

/// Reads a node's memory under a root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    root: PathBuf,
}

impl Probe {
    /// A probe reading `<root>/proc/…` and `<root>/sys/…`.
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Probe { root: root.into() }
    }

    /// A probe of the running system (root `/`).
    #[must_use]
    pub fn system() -> Self {
        Probe::new("/")
    }

    /// The root directory this probe reads under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// One full reading: system memory, GPUs, the given processes (pids that
    /// no longer exist are left out, duplicates read once) and usable memory.
    pub fn report(&self, pids: &[u32]) -> MemoryReport {
        let mem = self
            .read_text("proc/meminfo")
            .map(|t| parse::meminfo(&t))
            .unwrap_or_default();
        // proto refuses MemAvailable > MemTotal; such a reading is not trusted.
        let available = mem.available.filter(|a| mem.total.is_none_or(|t| *a <= t));
        let psi = self
            .read_text("proc/pressure/memory")
            .map(|t| parse::pressure(&t))
            .unwrap_or_default();
        let gpus = self.gpus();
        let mut seen = HashSet::new();
        let processes = pids
            .iter()
            .filter(|pid| seen.insert(**pid))
            .filter_map(|&pid| self.process(pid))
            .collect();
        let usable = usable_memory(mem.total, &gpus);
        MemoryReport {
            pressure: None,
            sampled_at_unix_ms: now_unix_ms(),
            mem_total_bytes: mem.total,
            mem_available_bytes: available,
            swap_total_bytes: mem.swap_total,
            swap_free_bytes: mem.swap_free,
            psi_some_avg10: psi.some_avg10,
            psi_full_avg10: psi.full_avg10,
            gpus,
            processes,
            usable_bytes: usable.bytes,
            usable_explanation: usable.explanation,
            unified_memory: usable.unified,
        }
    }

    /// The `cardN` entries of `/sys/class/drm` that hold amdgpu `mem_info_*`
    /// files, in card order, each with the global ttm limit.
    pub fn gpus(&self) -> Vec<GpuMemory> {
        let ttm_limit = self
            .read_text("sys/module/ttm/parameters/pages_limit")
            .and_then(|t| parse::single_u64(&t))
            .filter(|&pages| pages > 0)
            .and_then(|pages| pages.checked_mul(PAGE_SIZE));
        let Ok(entries) = fs::read_dir(self.root.join("sys/class/drm")) else {
            return Vec::new();
        };
        let mut cards: Vec<(u32, String)> = entries
            .take(MAX_DIR_ENTRIES)
            .filter_map(Result::ok)
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let index = parse::plain_u64(name.strip_prefix("card")?)?;
                Some((u32::try_from(index).ok()?, name))
            })
            .collect();
        cards.sort_unstable();
        cards
            .into_iter()
            .filter_map(|(_, card)| self.gpu(card, ttm_limit))
            .collect()
    }

    /// One card's `mem_info_*` files; `None` when it has none of them.
    fn gpu(&self, card: String, ttm_limit_bytes: Option<u64>) -> Option<GpuMemory> {
        let device = self.root.join("sys/class/drm").join(&card).join("device");
        if !MEM_INFO_FILES.iter().any(|f| device.join(f).exists()) {
            return None;
        }
        let [vram_total, vram_used, gtt_total, gtt_used] = MEM_INFO_FILES
            .map(|f| read_bounded_text(&device.join(f)).and_then(|t| parse::single_u64(&t)));
        Some(GpuMemory {
            card,
            vram_total_bytes: vram_total,
            vram_used_bytes: vram_used,
            gtt_total_bytes: gtt_total,
            gtt_used_bytes: gtt_used,
            ttm_limit_bytes,
        })
    }

    /// One process's memory; `None` when `/proc/PID/status` cannot be read
    /// (the process is gone, or never existed).
    pub fn process(&self, pid: u32) -> Option<ProcessMemory> {
        let dir = self.proc_dir(pid);
        let status = parse::status(&read_bounded_text(&dir.join("status"))?);
        let name = status.name.or_else(|| self.comm(pid)).unwrap_or_default();
        let (gpu_vram_bytes, gpu_gtt_bytes) = gpu_use(&dir.join("fdinfo"));
        Some(ProcessMemory {
            pid,
            name,
            rss_bytes: status.rss,
            gpu_vram_bytes,
            gpu_gtt_bytes,
        })
    }

    /// Pids (ascending) whose `comm` or `argv[0]` basename is `llama-server`,
    /// whoever started them: the agent compares these with its own instances
    /// to find unmanaged servers.
    pub fn find_llama_servers(&self) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(self.root.join("proc")) else {
            return Vec::new();
        };
        let mut pids: Vec<u32> = entries
            .take(MAX_PROC_ENTRIES)
            .filter_map(Result::ok)
            .filter_map(|e| {
                let index = parse::plain_u64(e.file_name().to_str()?)?;
                u32::try_from(index).ok()
            })
            .filter(|&pid| self.is_llama_server(pid))
            .collect();
        pids.sort_unstable();
        pids
    }

    fn is_llama_server(&self, pid: u32) -> bool {
        if self.comm(pid).as_deref() == Some(LLAMA_SERVER) {
            return true;
        }
        let Some(cmdline) = read_bounded(&self.proc_dir(pid).join("cmdline"), MAX_ARGV0_BYTES)
        else {
            return false;
        };
        let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
        let basename = argv0.rsplit(|&b| b == b'/').next().unwrap_or_default();
        basename == LLAMA_SERVER.as_bytes()
    }

    /// `MemAvailable` from `/proc/meminfo`.
    pub fn mem_available(&self) -> Option<u64> {
        self.read_text("proc/meminfo")
            .map(|t| parse::meminfo(&t))
            .and_then(|m| m.available)
    }

    /// The kernel's count of OOM kills since boot (`oom_kill` in
    /// `/proc/vmstat`, Linux 4.13+).
    pub fn oom_kills(&self) -> Option<u64> {
        self.read_text("proc/vmstat")
            .and_then(|t| parse::keyed_u64(&t, "oom_kill"))
    }

    /// The OOM kill counter of the memory cgroup `pid` runs in: cgroup v1's
    /// `memory.oom_control` under `/sys/fs/cgroup/memory`, else cgroup v2's
    /// `memory.events` under `/sys/fs/cgroup`, whichever exists first. The
    /// file (relative to the root) and its count; `None` when the process
    /// is gone or no counter can be read.
    pub fn cgroup_oom_counter(&self, pid: u32) -> Option<(PathBuf, u64)> {
        let text = read_bounded_text(&self.proc_dir(pid).join("cgroup"))?;
        parse::memory_cgroups(&text).into_iter().find_map(|cg| {
            let file = match cg {
                parse::MemoryCgroup::V1(path) => PathBuf::from("sys/fs/cgroup/memory")
                    .join(path.trim_start_matches('/'))
                    .join("memory.oom_control"),
                parse::MemoryCgroup::V2(path) => PathBuf::from("sys/fs/cgroup")
                    .join(path.trim_start_matches('/'))
                    .join("memory.events"),
            };
            let count = self.read_counter(&file)?;
            Some((file, count))
        })
    }

    /// `oom_kill` in a cgroup counter file found by
    /// [`Probe::cgroup_oom_counter`] (relative to the root).
    pub fn read_counter(&self, file: &Path) -> Option<u64> {
        read_bounded_text(&self.root.join(file)).and_then(|t| parse::keyed_u64(&t, "oom_kill"))
    }

    /// Resident set size of every process under `/proc` (pid → name and
    /// bytes); processes without one (kernel threads) are left out.
    pub fn all_processes(&self) -> BTreeMap<u32, (String, u64)> {
        let Ok(entries) = fs::read_dir(self.root.join("proc")) else {
            return BTreeMap::new();
        };
        entries
            .take(MAX_PROC_ENTRIES)
            .filter_map(Result::ok)
            .filter_map(|e| {
                let pid = u32::try_from(parse::plain_u64(e.file_name().to_str()?)?).ok()?;
                let status = parse::status(&read_bounded_text(&self.proc_dir(pid).join("status"))?);
                Some((pid, (status.name.unwrap_or_default(), status.rss?)))
            })
            .collect()
    }

    /// `/proc/PID/comm` without its newline.
    fn comm(&self, pid: u32) -> Option<String> {
        let text = read_bounded_text(&self.proc_dir(pid).join("comm"))?;
        let comm = text.trim_end_matches('\n');
        (!comm.is_empty()).then(|| comm.to_owned())
    }

    fn proc_dir(&self, pid: u32) -> PathBuf {
        self.root.join("proc").join(pid.to_string())
    }

    fn read_text(&self, relative: &str) -> Option<String> {
        read_bounded_text(&self.root.join(relative))
    }
}

/// Resident VRAM and GTT of one process: the sum over its distinct DRM
/// clients. `None` when the fdinfo directory is unreadable, or when clients
/// exist but none reports the region.
fn gpu_use(fdinfo: &Path) -> (Option<u64>, Option<u64>) {
    let Ok(entries) = fs::read_dir(fdinfo) else {
        return (None, None);
    };
    let mut clients = BTreeMap::new();
    for entry in entries.take(MAX_DIR_ENTRIES).filter_map(Result::ok) {
        // An fd closed between listing and reading is simply skipped.
        let Some(text) = read_bounded_text(&entry.path()) else {
            continue;
        };
        if let Some(client) = parse::drm_client(&text) {
            clients
                .entry((client.pdev.clone(), client.client_id))
                .or_insert(client);
        }
    }
    let vram = sum_reported(clients.values().map(|c| c.vram));
    let gtt = sum_reported(clients.values().map(|c| c.gtt));
    (vram, gtt)
}

/// Sum of the values reported; `Some(0)` for no clients at all, `None` when
/// clients exist but none reported a value, or the sum overflows.
fn sum_reported(values: impl ExactSizeIterator<Item = Option<u64>>) -> Option<u64> {
    if values.len() == 0 {
        return Some(0);
    }
    let reported: Vec<u64> = values.flatten().collect();
    if reported.is_empty() {
        return None;
    }
    reported.into_iter().try_fold(0u64, u64::checked_add)
}

/// At most `limit` bytes of a file; `None` when it cannot be opened or read.
fn read_bounded(path: &Path, limit: u64) -> Option<Vec<u8>> {
    let file = File::open(path).ok()?;
    let mut buf = Vec::new();
    file.take(limit).read_to_end(&mut buf).ok()?;
    Some(buf)
}

/// A text file of at most [`MAX_FILE_BYTES`]. When the file is longer, the
/// partial last line is dropped, so a cut `536870912` never reads as a
/// smaller, real-looking `5368`. Invalid UTF-8 is replaced, and the line
/// holding it is then malformed and skipped by the parsers.
fn read_bounded_text(path: &Path) -> Option<String> {
    let mut buf = read_bounded(path, MAX_FILE_BYTES as u64 + 1)?;
    if buf.len() > MAX_FILE_BYTES {
        buf.truncate(MAX_FILE_BYTES);
        let end = buf.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        buf.truncate(end);
    }
    Some(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    const STRIX: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/probe/strix-halo-128g"
    );
    const CPU_BOX: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/probe/cpu-box"
    );
    const BROKEN: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/probe/broken"
    );

    #[test]
    fn strix_halo_reports_meminfo_psi_and_one_apu() {
        let r = Probe::new(STRIX).report(&[]);
        assert_eq!(r.mem_total_bytes, Some(130_530_896 * KIB));
        assert_eq!(r.mem_available_bytes, Some(86_837_412 * KIB));
        assert_eq!(r.swap_total_bytes, Some(8_388_604 * KIB));
        assert_eq!(r.swap_free_bytes, Some(8_388_604 * KIB));
        assert_eq!(r.psi_some_avg10, Some(0.12));
        assert_eq!(r.psi_full_avg10, Some(0.03));
        // card1-eDP-1, renderD128 and the `version` file are not GPUs.
        assert_eq!(
            r.gpus,
            vec![GpuMemory {
                card: "card1".into(),
                vram_total_bytes: Some(512 * MIB),
                vram_used_bytes: Some(459_276_288),
                gtt_total_bytes: Some(120 * GIB),
                gtt_used_bytes: Some(47_647_293_440),
                // 31_457_280 pages × 4096 = 120 GiB
                ttm_limit_bytes: Some(120 * GIB),
            }]
        );
        assert!(r.sampled_at_unix_ms > 0);
    }

    #[test]
    fn strix_halo_usable_memory_counts_ram_and_gtt_once() {
        let r = Probe::new(STRIX).report(&[]);
        // MemTotal = 130_530_896 kB = 133_663_637_504 B ≈ 124.48 GiB.
        // usable = VRAM carve-out 512 MiB
        //        + min(GTT 120 GiB, ttm 31_457_280 × 4096 = 120 GiB, MemTotal 124.48 GiB)
        //        = 536_870_912 + 128_849_018_880 = 129_385_889_792 B = 120.50 GiB.
        // Adding RAM and GTT would give ~245 GiB on a 128 GB machine.
        assert_eq!(r.usable_bytes, Some(129_385_889_792));
        assert!(r.unified_memory);
        let text = r.usable_explanation.join("\n");
        assert!(text.contains("min(GTT total 120.0 GiB, ttm.pages_limit 120.0 GiB, MemTotal 124.5 GiB) = 120.0 GiB"), "{text}");
        assert!(text.contains("usable = 120.5 GiB (card1)"), "{text}");
    }

    #[test]
    fn strix_halo_process_gpu_memory_counts_each_drm_client_once() {
        let r = Probe::new(STRIX).report(&[2412, 2587]);
        // 2412: client 41 on fds 5 and 7 (a dup) + client 42 on fd 9.
        //   VRAM = (262_144 + 4_096) KiB = 272_629_760 B
        //   GTT  = (33_554_432 + 65_536) KiB = 34_426_847_232 B (32.06 GiB);
        //   counting fd 7 again would claim 64.06 GiB.
        // 2587: client 57 on fds 4, 6 and 8.
        //   VRAM = 131_072 KiB = 134_217_728 B; GTT = 12_845_056 KiB = 13_153_337_344 B.
        assert_eq!(
            r.processes,
            vec![
                ProcessMemory {
                    pid: 2412,
                    name: "llama-server".into(),
                    rss_bytes: Some(1_845_312 * KIB),
                    gpu_vram_bytes: Some(272_629_760),
                    gpu_gtt_bytes: Some(34_426_847_232),
                },
                ProcessMemory {
                    pid: 2587,
                    name: "llama-server".into(),
                    rss_bytes: Some(912_384 * KIB),
                    gpu_vram_bytes: Some(134_217_728),
                    gpu_gtt_bytes: Some(13_153_337_344),
                },
            ]
        );
        // Both servers fit inside what the card reports as used.
        let gtt: u64 = r.processes.iter().filter_map(|p| p.gpu_gtt_bytes).sum();
        assert!(gtt <= 47_647_293_440);
    }

    #[test]
    fn find_llama_servers_finds_exactly_the_two_servers() {
        // 1187 is `journalctl -fu llama-server`: the name in an argument does not count.
        assert_eq!(Probe::new(STRIX).find_llama_servers(), vec![2412, 2587]);
    }

    #[test]
    fn report_leaves_out_gone_pids_and_reads_duplicates_once() {
        let r = Probe::new(STRIX).report(&[2587, 999_999, 2587]);
        let pids: Vec<u32> = r.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, vec![2587]);
    }

    #[test]
    fn cpu_box_usable_memory_is_mem_total() {
        let probe = Probe::new(CPU_BOX);
        let r = probe.report(&[731]);
        // 24_684_092 kB × 1024 = 25_276_510_208 B ≈ 23.54 GiB; no GPU, so all of it.
        assert_eq!(r.mem_total_bytes, Some(25_276_510_208));
        assert_eq!(r.usable_bytes, Some(25_276_510_208));
        assert!(!r.unified_memory);
        // The simpledrm card0 has no mem_info files; there is no PSI file.
        assert!(r.gpus.is_empty());
        assert_eq!((r.psi_some_avg10, r.psi_full_avg10), (None, None));
        assert_eq!((r.swap_total_bytes, r.swap_free_bytes), (Some(0), Some(0)));
        // A CPU-only llama-server holds no DRM client: a real, known zero.
        assert_eq!(
            r.processes,
            vec![ProcessMemory {
                pid: 731,
                name: "llama-server".into(),
                rss_bytes: Some(512_000 * KIB),
                gpu_vram_bytes: Some(0),
                gpu_gtt_bytes: Some(0),
            }]
        );
        assert_eq!(probe.find_llama_servers(), vec![731]);
    }

    #[test]
    fn broken_files_degrade_to_unknown_and_garbage_lines_are_skipped() {
        let probe = Probe::new(BROKEN);
        let r = probe.report(&[4242, 4243]);
        // The one good meminfo line survives the garbage around it.
        assert_eq!(r.mem_total_bytes, Some(16_384_000 * KIB));
        assert_eq!(r.mem_available_bytes, None); // "twelve kB"
        assert_eq!(r.swap_total_bytes, None); // absent
        assert_eq!(r.swap_free_bytes, None); // overflows u64
        assert_eq!((r.psi_some_avg10, r.psi_full_avg10), (None, None));
        assert_eq!(
            r.gpus,
            vec![GpuMemory {
                card: "card0".into(),
                vram_total_bytes: None, // "garbage"
                vram_used_bytes: None,  // absent
                gtt_total_bytes: Some(GIB),
                gtt_used_bytes: None,  // "-5"
                ttm_limit_bytes: None, // pages_limit 0 = unset
            }]
        );
        // Without the VRAM total the card cannot be classified: unknown, not a guess.
        assert_eq!(r.usable_bytes, None);
        assert!(
            r.usable_explanation
                .iter()
                .any(|l| l.contains("card0: VRAM total unknown"))
        );
        // 4242: fd 3 has a bad drm-memory-vram, so drm-resident-vram (3 MiB) fills in, and
        // drm-resident-gtt is plain bytes (its drm-memory-gtt has an unknown unit); fd 4 has
        // no client id, fd 5 no driver, fd 6 is binary junk: none of them count.
        // 4243 has no status file: left out.
        assert_eq!(
            r.processes,
            vec![ProcessMemory {
                pid: 4242,
                name: "llama-server".into(),
                rss_bytes: None, // "abc kB"
                gpu_vram_bytes: Some(3 * MIB),
                gpu_gtt_bytes: Some(1_048_576),
            }]
        );
        // 4242 has no comm and is found by argv[0]; 4243 by comm alone.
        assert_eq!(probe.find_llama_servers(), vec![4242, 4243]);
    }

    #[test]
    fn a_missing_root_reads_as_all_unknown() {
        let probe = Probe::new("/nonexistent/halo-probe-root");
        let r = probe.report(&[1]);
        assert_eq!(r.mem_total_bytes, None);
        assert_eq!(r.mem_available_bytes, None);
        assert!(r.gpus.is_empty());
        assert!(r.processes.is_empty());
        assert_eq!(r.usable_bytes, None);
        assert!(probe.find_llama_servers().is_empty());
        assert_eq!(probe.process(1), None);
    }

    #[test]
    fn an_oversized_file_is_cut_at_a_line_boundary() {
        let dir = tempfile::tempdir().expect("tempdir");
        let device = dir.path().join("sys/class/drm/card0/device");
        fs::create_dir_all(&device).expect("mkdir");
        // A complete first line, then a number straddling the 1 MiB limit: only
        // "5368" of "536870912" lies inside it and must not read as 5368 bytes.
        let first = format!("{}\n", " ".repeat(MAX_FILE_BYTES - 5));
        let path = device.join("mem_info_vram_total");
        fs::write(&path, format!("{first}536870912\n")).expect("write");
        assert_eq!(read_bounded_text(&path), Some(first));
        let gpus = Probe::new(dir.path()).gpus();
        assert_eq!(gpus.len(), 1);
        assert_eq!(gpus[0].vram_total_bytes, None);
    }

    #[test]
    fn mem_available_above_mem_total_is_not_trusted() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("proc")).expect("mkdir");
        fs::write(
            dir.path().join("proc/meminfo"),
            "MemTotal: 4 kB\nMemAvailable: 8 kB\n",
        )
        .expect("write");
        let r = Probe::new(dir.path()).report(&[]);
        assert_eq!(r.mem_total_bytes, Some(4 * KIB));
        assert_eq!(r.mem_available_bytes, None);
    }

    #[test]
    fn system_probe_reads_this_machine_without_panicking() {
        let probe = Probe::system();
        let r = probe.report(&[std::process::id()]);
        assert!(r.mem_total_bytes.is_some_and(|t| t > 0), "{r:#?}");
        assert!(r.mem_available_bytes.is_some());
        if !Path::new("/sys/class/drm").exists() {
            // This build machine has no GPU at all: a CPU node.
            assert!(r.gpus.is_empty());
            assert_eq!(r.usable_bytes, r.mem_total_bytes);
        }
        // The test process itself: RSS known, no DRM client (a real zero).
        let me = r.processes.first().expect("this process");
        assert!(me.rss_bytes.is_some_and(|b| b > 0));
        assert_eq!(me.gpu_vram_bytes, Some(0));
        // Must not panic; other sessions may run llama-servers, so no count is asserted.
        let _ = probe.find_llama_servers();
    }
}
