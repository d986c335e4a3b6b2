//! One memory cgroup per instance (`instance_cgroup` in the config): the
//! agent creates `halo-INSTANCE` under the configured directory, sets its
//! memory limit (`instance_memory_limit`: none, the instance's estimate
//! plus the controller's margin, or a fixed size), and the child joins it
//! between fork and exec, before it allocates anything. The kernel then
//! counts exactly this instance's OOM kills (cgroup v1
//! `memory.oom_control`, v2 `memory.events`) and its peak use (v1
//! `memory.max_usage_in_bytes`, v2 `memory.peak`), and with a limit a
//! runaway instance is killed inside its own budget instead of taking the
//! desktop or another model with it. The directory is removed when the
//! process is gone.

use crate::config::{CgroupVersion, InstanceCgroupConfig, MemoryLimit};
use proto::domain::memory::margin;
use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// An instance's memory cgroup, ready for a child to join.
#[derive(Debug, Clone)]
pub(super) struct InstanceCgroup {
    dir: PathBuf,
    version: CgroupVersion,
    limit: Option<u64>,
}

impl InstanceCgroup {
    /// Creates (or reuses) the instance's cgroup and sets its limit for an
    /// instance estimated at `estimate_bytes` (0: unknown).
    pub(super) fn prepare(
        config: &InstanceCgroupConfig,
        instance: &str,
        estimate_bytes: u64,
    ) -> Result<InstanceCgroup, String> {
        let dir = config.dir.join(format!("halo-{instance}"));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("cannot create cgroup {}: {e}", dir.display())),
        }
        let limit = match config.limit {
            MemoryLimit::None => None,
            MemoryLimit::Estimate if estimate_bytes == 0 => None,
            MemoryLimit::Estimate => Some(estimate_bytes.saturating_add(margin(estimate_bytes))),
            MemoryLimit::Bytes(b) => Some(b),
        };
        let cg = InstanceCgroup {
            dir,
            version: config.version,
            limit,
        };
        let (file, value) = match cg.version {
            CgroupVersion::V1 => (
                "memory.limit_in_bytes",
                limit.map_or_else(|| "-1".to_owned(), |b| b.to_string()),
            ),
            CgroupVersion::V2 => (
                "memory.max",
                limit.map_or_else(|| "max".to_owned(), |b| b.to_string()),
            ),
        };
        std::fs::write(cg.dir.join(file), value).map_err(|e| {
            format!(
                "cannot set the memory limit in {}: {e}",
                cg.dir.join(file).display()
            )
        })?;
        // A restart starts its peak afresh (v2 before 6.12 cannot: the
        // peak then spans the instance's earlier runs).
        let peak = match cg.version {
            CgroupVersion::V1 => "memory.max_usage_in_bytes",
            CgroupVersion::V2 => "memory.peak",
        };
        let _ = std::fs::write(cg.dir.join(peak), "0");
        Ok(cg)
    }

    /// The cgroup an earlier agent run made for an instance it adopts now
    /// (nothing is written; its limit is not known).
    pub(super) fn existing(
        config: &InstanceCgroupConfig,
        instance: &str,
    ) -> Option<InstanceCgroup> {
        let dir = config.dir.join(format!("halo-{instance}"));
        dir.is_dir().then_some(InstanceCgroup {
            dir,
            version: config.version,
            limit: None,
        })
    }

    /// The directory.
    pub(super) fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The limit set, bytes.
    pub(super) fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// The file holding its `oom_kill` counter.
    pub(super) fn counter_file(&self) -> PathBuf {
        self.dir.join(match self.version {
            CgroupVersion::V1 => "memory.oom_control",
            CgroupVersion::V2 => "memory.events",
        })
    }

    /// Its peak memory use since it was prepared, bytes.
    pub(super) fn peak(&self) -> Option<u64> {
        let file = match self.version {
            CgroupVersion::V1 => "memory.max_usage_in_bytes",
            CgroupVersion::V2 => "memory.peak",
        };
        std::fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// `cgroup.procs` as a C string, for the child to write itself into
    /// between fork and exec (where nothing may allocate).
    pub(super) fn procs_path(&self) -> Result<CString, String> {
        CString::new(self.dir.join("cgroup.procs").as_os_str().as_bytes())
            .map_err(|_| format!("cgroup path {} holds a NUL byte", self.dir.display()))
    }

    /// Removes the directory once its processes are gone (the kernel
    /// refuses while one is in it; that is logged and left).
    pub(super) fn remove(&self) {
        if let Err(e) = std::fs::remove_dir(&self.dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::debug!(cgroup = %self.dir.display(), "cgroup not removed: {e}");
        }
    }
}

/// In the child, between fork and exec: joins the cgroup whose
/// `cgroup.procs` is `procs` (writing `0` moves the writing process).
/// Only system calls, no allocation: safe after fork.
pub(super) fn join_in_child(procs: &std::ffi::CStr) -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let fd = rustix::fs::open(procs, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
    rustix::io::write(&fd, b"0")?;
    Ok(())
}
