//! Memory pressure before the kill: a node is under pressure while the
//! kernel's memory PSI (`some avg10`: the share of the last 10 s in which
//! at least one task waited for memory) is at or above
//! `pressure_psi_some`, or its real free memory (`MemAvailable`, what the
//! kernel can hand out without swapping, whoever holds the rest) is below
//! `pressure_min_available`. halo's books count only its own placements;
//! these readings see everything else on the machine too (a desktop, a
//! browser, a build).
//!
//! At the onset the agent names the process outside halo that grew most
//! since its last look without pressure (a full `/proc` scan at most every
//! [`BASELINE_EVERY`] while calm), when one grew by at least [`GREW_MIN`];
//! the name stays while the pressure lasts.

use crate::probe::Probe;
use proto::domain::{MemoryPressure, MemoryReport};
use proto::units::bytes;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How old the calm baseline of every process's RSS may get.
pub(super) const BASELINE_EVERY: Duration = Duration::from_secs(30);
/// Growth below this is not named.
pub(super) const GREW_MIN: u64 = 256 << 20;

/// Every process's name and RSS, by pid.
type Processes = BTreeMap<u32, (String, u64)>;

/// The thresholds, from the agent's config.
#[derive(Debug, Clone, Copy)]
pub(super) struct Thresholds {
    /// PSI `some avg10` percent (0: off).
    pub psi_some: f64,
    /// MemAvailable floor, bytes (0: off).
    pub min_available: u64,
}

/// The pressure state across readings.
#[derive(Debug, Default)]
pub(super) struct PressureWatch {
    baseline: Option<(Instant, Processes)>,
    /// Set while under pressure: what grew, named at the onset.
    current: Option<String>,
}

impl PressureWatch {
    /// Sets `report.pressure` from the thresholds; `ours` are halo's own
    /// processes (never named as the grower).
    pub(super) fn assess(
        &mut self,
        probe: &Probe,
        t: Thresholds,
        report: &mut MemoryReport,
        ours: &[u32],
    ) {
        let Some(reason) = crossed(t, report) else {
            self.current = None;
            if self
                .baseline
                .as_ref()
                .is_none_or(|(at, _)| at.elapsed() >= BASELINE_EVERY)
            {
                self.baseline = Some((Instant::now(), probe.all_processes()));
            }
            return;
        };
        let grew = match &self.current {
            Some(g) => g.clone(),
            None => {
                let g = self
                    .baseline
                    .as_ref()
                    .and_then(|(_, before)| grower(before, &probe.all_processes(), ours))
                    .unwrap_or_default();
                self.current = Some(g.clone());
                g
            }
        };
        report.pressure = Some(MemoryPressure { reason, grew });
    }
}

/// Which threshold a reading crosses, in words with the figures.
fn crossed(t: Thresholds, r: &MemoryReport) -> Option<String> {
    let mut why = Vec::new();
    if t.psi_some > 0.0
        && let Some(psi) = r.psi_some_avg10
        && psi >= t.psi_some
    {
        why.push(format!(
            "memory PSI some avg10 {psi:.1} % >= {:.1} %",
            t.psi_some
        ));
    }
    if t.min_available > 0
        && let Some(a) = r.mem_available_bytes
        && a < t.min_available
    {
        why.push(format!(
            "MemAvailable {} < {}",
            bytes(a),
            bytes(t.min_available)
        ));
    }
    (!why.is_empty()).then(|| why.join(", "))
}

/// The process outside `ours` whose RSS grew most from `before` to `now`
/// (a process new since `before` grew from nothing), when by at least
/// [`GREW_MIN`].
fn grower(before: &Processes, now: &Processes, ours: &[u32]) -> Option<String> {
    now.iter()
        .filter(|(pid, _)| !ours.contains(pid))
        .map(|(pid, (name, rss))| {
            let was = before
                .get(pid)
                .filter(|(n, _)| n == name)
                .map_or(0, |(_, r)| *r);
            (rss.saturating_sub(was), *pid, name, was, *rss)
        })
        .filter(|(growth, ..)| *growth >= GREW_MIN)
        .max_by_key(|(growth, ..)| *growth)
        .map(|(growth, pid, name, was, rss)| {
            if was == 0 {
                format!(
                    "{name} (pid {pid}, outside halo) started since and uses {}",
                    bytes(rss)
                )
            } else {
                format!(
                    "{name} (pid {pid}, outside halo) grew {} to {}",
                    bytes(growth),
                    bytes(rss)
                )
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn reading(psi: f64, available: u64) -> MemoryReport {
        MemoryReport {
            psi_some_avg10: Some(psi),
            mem_available_bytes: Some(available),
            ..MemoryReport::default()
        }
    }

    #[test]
    fn either_threshold_makes_pressure_and_zero_turns_one_off() {
        let t = Thresholds {
            psi_some: 10.0,
            min_available: 2 * GIB,
        };
        assert_eq!(crossed(t, &reading(0.1, 80 * GIB)), None);
        assert_eq!(
            crossed(t, &reading(23.45, 80 * GIB)).as_deref(),
            Some("memory PSI some avg10 23.4 % >= 10.0 %")
        );
        assert_eq!(
            crossed(t, &reading(0.1, GIB)).as_deref(),
            Some("MemAvailable 1.0 GiB < 2.0 GiB")
        );
        let off = Thresholds {
            psi_some: 0.0,
            min_available: 0,
        };
        assert_eq!(crossed(off, &reading(99.0, 0)), None);
        // A reading without PSI (old kernel) is judged on free memory only.
        let no_psi = MemoryReport {
            mem_available_bytes: Some(80 * GIB),
            ..MemoryReport::default()
        };
        assert_eq!(crossed(t, &no_psi), None);
    }

    #[test]
    fn the_grower_is_outside_halo_and_grew_most() {
        let before: BTreeMap<u32, (String, u64)> = [
            (10, ("firefox".to_owned(), GIB)),
            (20, ("llama-server".to_owned(), 10 * GIB)),
            (30, ("sshd".to_owned(), 10 << 20)),
        ]
        .into();
        let mut now = before.clone();
        now.insert(10, ("firefox".to_owned(), 7 * GIB));
        now.insert(20, ("llama-server".to_owned(), 30 * GIB));
        now.insert(30, ("sshd".to_owned(), 12 << 20));
        assert_eq!(
            grower(&before, &now, &[20]).as_deref(),
            Some("firefox (pid 10, outside halo) grew 6.0 GiB to 7.0 GiB")
        );
        // A new process counts from nothing; small growth is not named.
        now.insert(40, ("cc1plus".to_owned(), 9 * GIB));
        assert_eq!(
            grower(&before, &now, &[20]).as_deref(),
            Some("cc1plus (pid 40, outside halo) started since and uses 9.0 GiB")
        );
        let calm: BTreeMap<u32, (String, u64)> = [(30, ("sshd".to_owned(), 20 << 20))].into();
        assert_eq!(grower(&before, &calm, &[]), None);
    }
}
