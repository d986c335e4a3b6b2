//! Telling an out-of-memory kill apart from any other SIGKILL, and the
//! figures that explain it.
//!
//! While an instance's process lives, [`OomWatch::sample`] keeps (at most
//! every [`SAMPLE_EVERY`]) its peak memory use (RSS plus GPU VRAM and GTT:
//! on a unified-memory APU the GPU's buffers are RAM that RSS does not
//! show), the node's `MemAvailable`, and the OOM kill counters: the
//! process's memory cgroup's (`memory.events` on cgroup v2,
//! `memory.oom_control` on v1) and the kernel's (`oom_kill` in
//! `/proc/vmstat`). When the process then dies of SIGKILL that the agent
//! did not send (or, adopted, of a cause unknown), [`OomWatch::verdict`]
//! reads the counters again: the cgroup's rising names an OOM kill in the
//! instance's own cgroup; the kernel's rising, with no cgroup counter to
//! ask, names one on the node in the window since the last sample (another
//! process killed in that same window could be mistaken for it; with a
//! sample every 250 ms that window is short). Everything is read through
//! the [`Probe`] root, so the fixture trees of the tests take the same path.

use super::cgroup::InstanceCgroup;
use crate::probe::Probe;
use proto::domain::OomKill;
use proto::units::bytes;
use proto::units::now_unix_ms;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Shortest time between two samples.
pub(super) const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The counters and figures of one process's life.
#[derive(Debug)]
pub(super) struct OomWatch {
    pid: u32,
    /// The cgroup counter file (relative to the probe root, or absolute)
    /// and its count.
    cgroup: Option<(PathBuf, u64)>,
    /// The instance's own cgroup, when the agent made one.
    own: Option<InstanceCgroup>,
    /// `oom_kill` in `/proc/vmstat` at the last sample.
    kernel: Option<u64>,
    peak_rss: u64,
    peak_gpu: u64,
    available: Option<u64>,
    sampled: Option<Instant>,
}

impl OomWatch {
    /// Starts watching `pid`: finds its memory cgroup (`own`, the one the
    /// agent made for it, else the one `/proc/PID/cgroup` names) and reads
    /// the counters once.
    pub(super) fn new(probe: &Probe, pid: u32, own: Option<InstanceCgroup>) -> OomWatch {
        let cgroup = match &own {
            Some(cg) => {
                let file = cg.counter_file();
                probe.read_counter(&file).map(|n| (file, n))
            }
            None => probe.cgroup_oom_counter(pid),
        };
        let mut w = OomWatch {
            pid,
            cgroup,
            own,
            kernel: None,
            peak_rss: 0,
            peak_gpu: 0,
            available: None,
            sampled: None,
        };
        w.sample(probe);
        w
    }

    /// Takes a sample unless one was taken within [`SAMPLE_EVERY`].
    pub(super) fn sample(&mut self, probe: &Probe) {
        if self.sampled.is_some_and(|t| t.elapsed() < SAMPLE_EVERY) {
            return;
        }
        self.sampled = Some(Instant::now());
        if let Some(m) = probe.process(self.pid) {
            let gpu = m
                .gpu_vram_bytes
                .unwrap_or(0)
                .saturating_add(m.gpu_gtt_bytes.unwrap_or(0));
            let rss = m.rss_bytes.unwrap_or(0);
            if rss.saturating_add(gpu) >= self.peak_rss.saturating_add(self.peak_gpu) {
                self.peak_rss = rss;
                self.peak_gpu = gpu;
            }
        }
        if let Some(a) = probe.mem_available() {
            self.available = Some(a);
        }
        if let Some(k) = probe.oom_kills() {
            self.kernel = Some(k);
        }
        if let Some((file, _)) = &self.cgroup
            && let Some(n) = probe.read_counter(file)
        {
            self.cgroup = Some((file.clone(), n));
        }
    }

    /// After the process died of SIGKILL the agent did not send: the OOM
    /// kill with its figures when a counter rose since the last sample.
    pub(super) fn verdict(&self, probe: &Probe, estimate_bytes: u64) -> Option<OomKill> {
        let mut evidence = self.evidence(probe)?;
        let sampled = self.peak_rss.saturating_add(self.peak_gpu);
        // The cgroup's own peak sees between samples (a kill during load).
        let peak = self
            .own
            .as_ref()
            .and_then(InstanceCgroup::peak)
            .unwrap_or(0);
        if let Some(limit) = self.own.as_ref().and_then(InstanceCgroup::limit) {
            evidence += &format!("; its cgroup's limit is {}", bytes(limit));
        }
        Some(OomKill {
            at_unix_ms: now_unix_ms(),
            used_bytes: sampled.max(peak),
            rss_bytes: self.peak_rss,
            gpu_bytes: self.peak_gpu,
            estimate_bytes,
            node_available_bytes: self.available,
            evidence,
        })
    }

    fn evidence(&self, probe: &Probe) -> Option<String> {
        if let Some((file, before)) = &self.cgroup
            && let Some(now) = probe.read_counter(file)
        {
            return (now > *before).then(|| {
                let shown = Path::new("/").join(file);
                format!(
                    "oom_kill in its cgroup's {} went {before} -> {now}",
                    shown.display()
                )
            });
        }
        let before = self.kernel?;
        let now = probe.oom_kills()?;
        (now > before).then(|| format!("oom_kill in /proc/vmstat went {before} -> {now}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    /// A probe root with meminfo, vmstat and one process.
    fn root(pid: u32, rss_kib: u64, cgroup: Option<&str>) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("fixture");
        let proc = d.path().join("proc");
        fs::create_dir_all(proc.join(pid.to_string())).expect("fixture");
        fs::write(
            proc.join("meminfo"),
            "MemTotal: 1000000 kB\nMemAvailable: 400000 kB\n",
        )
        .expect("fixture");
        fs::write(proc.join("vmstat"), "oom_kill 3\n").expect("fixture");
        fs::write(
            proc.join(format!("{pid}/status")),
            format!("Name:\tllama-server\nVmRSS:\t{rss_kib} kB\n"),
        )
        .expect("fixture");
        if let Some(cg) = cgroup {
            fs::write(proc.join(format!("{pid}/cgroup")), format!("0::{cg}\n")).expect("fixture");
            let dir = d
                .path()
                .join("sys/fs/cgroup")
                .join(cg.trim_start_matches('/'));
            fs::create_dir_all(&dir).expect("fixture");
            fs::write(dir.join("memory.events"), "oom 0\noom_kill 0\n").expect("fixture");
        }
        d
    }

    #[test]
    fn a_rising_kernel_counter_names_an_oom_kill_with_the_peak_and_free_memory() {
        let d = root(42, 2048, None);
        let probe = Probe::new(d.path());
        let w = OomWatch::new(&probe, 42, None);
        // No counter moved: another SIGKILL (a person's kill -9).
        assert_eq!(w.verdict(&probe, 1 << 20), None);
        fs::write(d.path().join("proc/vmstat"), "oom_kill 4\n").expect("fixture");
        let k = w.verdict(&probe, 1 << 20).expect("an OOM kill");
        assert_eq!(k.used_bytes, 2048 * 1024);
        assert_eq!(k.rss_bytes, 2048 * 1024);
        assert_eq!(k.estimate_bytes, 1 << 20);
        assert_eq!(k.node_available_bytes, Some(400_000 * 1024));
        assert_eq!(k.evidence, "oom_kill in /proc/vmstat went 3 -> 4");
        assert_eq!(
            k.describe("llama-server"),
            "llama-server was killed for lack of memory: it used 2.0 MiB, the estimate was \
             1.0 MiB, the node had 390.6 MiB free (oom_kill in /proc/vmstat went 3 -> 4)"
        );
    }

    #[test]
    fn the_cgroup_counter_decides_when_there_is_one() {
        let d = root(7, 100, Some("/halo.slice/i1"));
        let probe = Probe::new(d.path());
        let mut w = OomWatch::new(&probe, 7, None);
        // Growth is kept as the peak; a later smaller sample does not lower it.
        fs::write(d.path().join("proc/7/status"), "VmRSS:\t900 kB\n").expect("fixture");
        w.sampled = None;
        w.sample(&probe);
        fs::write(d.path().join("proc/7/status"), "VmRSS:\t10 kB\n").expect("fixture");
        w.sampled = None;
        w.sample(&probe);
        // Another process's OOM kill elsewhere on the node is not this one's.
        fs::write(d.path().join("proc/vmstat"), "oom_kill 9\n").expect("fixture");
        assert_eq!(w.verdict(&probe, 0), None);
        let events = d.path().join("sys/fs/cgroup/halo.slice/i1/memory.events");
        fs::write(&events, "oom 1\noom_kill 1\n").expect("fixture");
        let k = w.verdict(&probe, 0).expect("an OOM kill in its cgroup");
        assert_eq!(k.used_bytes, 900 * 1024);
        assert_eq!(
            k.evidence,
            "oom_kill in its cgroup's /sys/fs/cgroup/halo.slice/i1/memory.events went 0 -> 1"
        );
    }
}
