//! Pure parsers for the procfs and sysfs texts the probe reads: `meminfo`,
//! PSI, `/proc/PID/status`, DRM `fdinfo`, and one-integer sysfs files. They
//! take text, never touch the file system, and turn anything they do not
//! understand into `None` or a skipped line; nothing here can panic on input.

/// Bytes in a KiB (the kernel's `kB` in `meminfo` and `status` is KiB too).
const KIB: u64 = 1024;

/// The `/proc/meminfo` fields the probe reports, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Meminfo {
    /// `MemTotal`.
    pub total: Option<u64>,
    /// `MemAvailable`.
    pub available: Option<u64>,
    /// `SwapTotal`.
    pub swap_total: Option<u64>,
    /// `SwapFree`.
    pub swap_free: Option<u64>,
}

/// Parses `/proc/meminfo`. Each wanted key must read `<integer> kB`; the first
/// well-formed line for a key wins, malformed lines are skipped.
pub(super) fn meminfo(text: &str) -> Meminfo {
    let mut out = Meminfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let slot = match key {
            "MemTotal" => &mut out.total,
            "MemAvailable" => &mut out.available,
            "SwapTotal" => &mut out.swap_total,
            "SwapFree" => &mut out.swap_free,
            _ => continue,
        };
        if slot.is_none() {
            *slot = kib_value(value);
        }
    }
    out
}

/// `<integer> kB` → bytes; anything else (another unit, no unit, overflow) → `None`.
fn kib_value(value: &str) -> Option<u64> {
    let mut words = value.split_whitespace();
    let number = words.next()?;
    if words.next()? != "kB" || words.next().is_some() {
        return None;
    }
    plain_u64(number)?.checked_mul(KIB)
}

/// A decimal integer of ASCII digits only (`u64::from_str` would also take `+1`).
pub(super) fn plain_u64(word: &str) -> Option<u64> {
    if word.is_empty() || !word.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    word.parse().ok()
}

/// A sysfs file holding one integer (surrounding whitespace allowed).
pub(super) fn single_u64(text: &str) -> Option<u64> {
    plain_u64(text.trim())
}

/// `some avg10` and `full avg10` from `/proc/pressure/memory`, in percent.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Pressure {
    /// Share of time at least one task stalled on memory, last 10 s.
    pub some_avg10: Option<f64>,
    /// Share of time all non-idle tasks stalled on memory, last 10 s.
    pub full_avg10: Option<f64>,
}

/// Parses a PSI file (`some avg10=0.12 avg60=… total=…` / `full …`). A value
/// must be a finite percentage in 0..=100; `NaN`, `inf` and junk are `None`.
pub(super) fn pressure(text: &str) -> Pressure {
    let mut out = Pressure::default();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let slot = match words.next() {
            Some("some") => &mut out.some_avg10,
            Some("full") => &mut out.full_avg10,
            _ => continue,
        };
        if slot.is_some() {
            continue;
        }
        *slot = words
            .filter_map(|w| w.strip_prefix("avg10="))
            .find_map(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && (0.0..=100.0).contains(v));
    }
    out
}

/// The value of `key` in a `key value` per line file (`/proc/vmstat`,
/// cgroup v2 `memory.events`, cgroup v1 `memory.oom_control`).
pub(super) fn keyed_u64(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next()? == key).then_some(())?;
        let value = plain_u64(words.next()?)?;
        words.next().is_none().then_some(value)
    })
}

/// Which memory cgroup a process is in, from `/proc/PID/cgroup`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum MemoryCgroup {
    /// cgroup v1 memory controller (`N:memory:/path`, or a joint hierarchy
    /// naming `memory` among its controllers).
    V1(String),
    /// The cgroup v2 unified hierarchy (`0::/path`).
    V2(String),
}

/// The process's memory cgroups, v1 first (a v1 memory controller is the
/// one that counts its OOM kills on a hybrid system), then v2. Paths that
/// climb (`..`) are skipped.
pub(super) fn memory_cgroups(text: &str) -> Vec<MemoryCgroup> {
    let mut v1 = Vec::new();
    let mut v2 = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if !path.starts_with('/') || path.split('/').any(|c| c == "..") {
            continue;
        }
        if id == "0" && controllers.is_empty() {
            v2.push(MemoryCgroup::V2(path.to_owned()));
        } else if controllers.split(',').any(|c| c == "memory") {
            v1.push(MemoryCgroup::V1(path.to_owned()));
        }
    }
    v1.extend(v2);
    v1
}

/// What the probe takes from `/proc/PID/status`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Status {
    /// `Name:` (the kernel's `comm`, at most 15 bytes).
    pub name: Option<String>,
    /// `VmRSS` in bytes.
    pub rss: Option<u64>,
}

/// Parses `/proc/PID/status`; a kernel thread has no `VmRSS`, which stays `None`.
pub(super) fn status(text: &str) -> Status {
    let mut out = Status::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        match key {
            "Name" if out.name.is_none() => {
                let name = value.trim();
                if !name.is_empty() {
                    out.name = Some(name.to_owned());
                }
            }
            "VmRSS" if out.rss.is_none() => out.rss = kib_value(value),
            _ => {}
        }
    }
    out
}

/// One DRM client as one `/proc/PID/fdinfo/FD` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct DrmClient {
    /// `drm-pdev` (PCI address), empty when absent; part of the identity.
    pub pdev: String,
    /// `drm-client-id`: several fds (dup, fork) can share one client.
    pub client_id: u64,
    /// Resident VRAM in bytes (`drm-memory-vram`, else `drm-resident-vram`).
    pub vram: Option<u64>,
    /// Resident GTT in bytes (`drm-memory-gtt`, else `drm-resident-gtt`).
    pub gtt: Option<u64>,
}

/// Parses one fdinfo file. `None` unless it names a `drm-driver` (any) and a
/// numeric `drm-client-id`: without the id the fd cannot be de-duplicated,
/// and counting it might count a buffer twice.
///
/// amdgpu prints both the legacy `drm-memory-<region>` keys (always KiB)
/// and, since Linux 6.11, the generic `drm-resident-<region>` keys (units
/// chosen per value); the legacy key is preferred, the generic one fills in.
pub(super) fn drm_client(text: &str) -> Option<DrmClient> {
    let mut driver = false;
    let mut client_id = None;
    let mut pdev = String::new();
    let (mut memory_vram, mut memory_gtt) = (None, None);
    let (mut resident_vram, mut resident_gtt) = (None, None);
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "drm-driver" => driver |= !value.is_empty(),
            "drm-client-id" => client_id = client_id.or_else(|| plain_u64(value)),
            "drm-pdev" => value.clone_into(&mut pdev),
            "drm-memory-vram" => memory_vram = memory_vram.or_else(|| drm_size(value)),
            "drm-memory-gtt" => memory_gtt = memory_gtt.or_else(|| drm_size(value)),
            "drm-resident-vram" => resident_vram = resident_vram.or_else(|| drm_size(value)),
            "drm-resident-gtt" => resident_gtt = resident_gtt.or_else(|| drm_size(value)),
            _ => {}
        }
    }
    if !driver {
        return None;
    }
    Some(DrmClient {
        pdev,
        client_id: client_id?,
        vram: memory_vram.or(resident_vram),
        gtt: memory_gtt.or(resident_gtt),
    })
}

/// A DRM fdinfo size: `<n>` (bytes), `<n> KiB`, `<n> MiB` or `<n> GiB`
/// (Documentation/gpu/drm-usage-stats.rst; the kernel prints up to MiB).
pub(super) fn drm_size(value: &str) -> Option<u64> {
    let mut words = value.split_whitespace();
    let number = plain_u64(words.next()?)?;
    let scale = match words.next() {
        None => 1,
        Some("KiB") => KIB,
        Some("MiB") => KIB * KIB,
        Some("GiB") => KIB * KIB * KIB,
        Some(_) => return None,
    };
    if words.next().is_some() {
        return None;
    }
    number.checked_mul(scale)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_reads_kib_fields_as_bytes() {
        let m = meminfo(
            "MemTotal:       24684092 kB\nMemFree:  1 kB\nMemAvailable:   23715672 kB\n\
             SwapTotal:             0 kB\nSwapFree:              0 kB\n",
        );
        assert_eq!(m.total, Some(24_684_092 * 1024));
        assert_eq!(m.available, Some(23_715_672 * 1024));
        // A real zero (no swap) stays a zero.
        assert_eq!(m.swap_total, Some(0));
        assert_eq!(m.swap_free, Some(0));
    }

    #[test]
    fn meminfo_rejects_other_units_signs_and_overflow() {
        let m = meminfo(
            "MemTotal: 12 MB\nMemAvailable: +5 kB\nSwapTotal: 99999999999999999999 kB\n\
             SwapFree: 3 kB extra\n",
        );
        assert_eq!(m, Meminfo::default());
    }

    #[test]
    fn meminfo_skips_a_malformed_line_and_takes_a_later_good_one() {
        let m = meminfo("MemTotal: lots kB\nMemTotal: 4 kB\nMemTotal: 8 kB\n");
        assert_eq!(m.total, Some(4096));
    }

    #[test]
    fn pressure_reads_avg10_of_some_and_full() {
        let p = pressure(
            "some avg10=0.12 avg60=0.05 avg300=0.01 total=18342211\n\
             full avg10=0.03 avg60=0.01 avg300=0.00 total=5120334\n",
        );
        assert_eq!(p.some_avg10, Some(0.12));
        assert_eq!(p.full_avg10, Some(0.03));
    }

    #[test]
    fn pressure_refuses_nan_infinity_and_out_of_range_values() {
        for bad in ["NaN", "inf", "-1", "101", "abc", ""] {
            let p = pressure(&format!("some avg10={bad}\nfull avg60=1.0\n"));
            assert_eq!(p, Pressure::default(), "avg10={bad}");
        }
    }

    #[test]
    fn status_reads_name_and_rss() {
        let s = status("Name:\tllama-server\nUmask:\t0022\nVmRSS:\t 1845312 kB\n");
        assert_eq!(s.name.as_deref(), Some("llama-server"));
        assert_eq!(s.rss, Some(1_845_312 * 1024));
    }

    #[test]
    fn status_of_a_kernel_thread_has_no_rss() {
        let s = status("Name:\tkworker/0:1\nState:\tI (idle)\n");
        assert_eq!(s.rss, None);
        assert_eq!(s.name.as_deref(), Some("kworker/0:1"));
    }

    #[test]
    fn drm_size_understands_bytes_kib_mib_and_gib() {
        assert_eq!(drm_size("1048576"), Some(1_048_576));
        assert_eq!(drm_size("123456 KiB"), Some(123_456 * 1024));
        assert_eq!(drm_size("3 MiB"), Some(3 << 20));
        assert_eq!(drm_size("2 GiB"), Some(2 << 30));
        assert_eq!(drm_size("0"), Some(0));
        for bad in [
            "",
            "KiB",
            "12 TiB",
            "12 kB",
            "-1 KiB",
            "1 KiB x",
            "18446744073709551615 KiB",
        ] {
            assert_eq!(drm_size(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn drm_client_prefers_legacy_keys_and_tolerates_the_space_before_the_tab() {
        // amdgpu really prints "drm-memory-gtt: \t…" with a space before the tab.
        let c = drm_client(
            "pos:\t0\ndrm-driver:\tamdgpu\ndrm-client-id:\t41\ndrm-pdev:\t0000:c5:00.0\n\
             drm-resident-vram:\t256 MiB\ndrm-resident-gtt:\t32768 MiB\n\
             drm-memory-vram:\t262144 KiB\ndrm-memory-gtt: \t33554432 KiB\n",
        );
        assert_eq!(
            c,
            Some(DrmClient {
                pdev: "0000:c5:00.0".into(),
                client_id: 41,
                vram: Some(262_144 * 1024),
                gtt: Some(33_554_432 * 1024),
            })
        );
    }

    #[test]
    fn drm_client_falls_back_to_resident_keys() {
        let c = drm_client(
            "drm-driver:\ti915\ndrm-client-id:\t3\ndrm-resident-vram:\t3 MiB\n\
             drm-memory-vram:\tlots KiB\n",
        );
        let c = c.expect("a DRM client");
        assert_eq!(c.vram, Some(3 << 20));
        assert_eq!(c.gtt, None);
    }

    #[test]
    fn drm_client_needs_a_driver_and_a_numeric_client_id() {
        assert_eq!(
            drm_client("drm-client-id:\t8\ndrm-memory-vram:\t9 KiB\n"),
            None
        );
        assert_eq!(
            drm_client("drm-driver:\tamdgpu\ndrm-memory-vram:\t9 KiB\n"),
            None
        );
        assert_eq!(drm_client("drm-driver:\tamdgpu\ndrm-client-id:\tx\n"), None);
        assert_eq!(
            drm_client("pos:\t0\nflags:\t02\nmnt_id:\t24\nino:\t3\n"),
            None
        );
    }

    #[test]
    fn single_u64_trims_whitespace_and_refuses_signs() {
        assert_eq!(single_u64("  1073741824  \n"), Some(1 << 30));
        assert_eq!(single_u64("-5\n"), None);
        assert_eq!(single_u64("garbage\n"), None);
        assert_eq!(single_u64(""), None);
    }

    #[test]
    fn oom_kill_counters_read_from_vmstat_and_both_cgroup_versions() {
        let vmstat = "pgfault 12\noom_kill 3\nthp_fault_alloc 0\n";
        assert_eq!(keyed_u64(vmstat, "oom_kill"), Some(3));
        let v2 = "low 0\nhigh 0\nmax 7\noom 2\noom_kill 2\noom_group_kill 0\n";
        assert_eq!(keyed_u64(v2, "oom_kill"), Some(2));
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 5\n";
        assert_eq!(keyed_u64(v1, "oom_kill"), Some(5));
        // Old kernels have no counter; junk is not a count.
        assert_eq!(keyed_u64("oom_kill_disable 0\n", "oom_kill"), None);
        assert_eq!(keyed_u64("oom_kill -1\noom_kill x\n", "oom_kill"), None);
    }

    #[test]
    fn memory_cgroups_prefer_v1_memory_then_v2_and_refuse_climbing_paths() {
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/e7d4\n0::/\n";
        assert_eq!(
            memory_cgroups(hybrid),
            vec![
                MemoryCgroup::V1("/process_api/e7d4".into()),
                MemoryCgroup::V2("/".into())
            ]
        );
        let unified = "0::/system.slice/halo-agent.service\n";
        assert_eq!(
            memory_cgroups(unified),
            vec![MemoryCgroup::V2("/system.slice/halo-agent.service".into())]
        );
        let joint = "3:cpu,memory:/a\n";
        assert_eq!(memory_cgroups(joint), vec![MemoryCgroup::V1("/a".into())]);
        assert!(memory_cgroups("0::/../../etc\n4:memory:relative\ngarbage\n").is_empty());
    }
}
