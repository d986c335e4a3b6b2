//! llama.cpp's own memory projection of a model (`ProjectMemory`).
//!
//! `llama-fit-params -m FILE ... --fit-print on -v` loads the model with
//! `no_alloc` (`common_get_device_memory_data_impl` in `common/fit.cpp`):
//! it builds every buffer's layout without allocating it or reading the
//! weights, so it is cheap and sparse fixture files work. `common_fit_print`
//! then prints on stdout one line per device and one `Host <model MiB>
//! <context MiB> <compute MiB>` line (each `bytes / MiB`, rounded down).
//! Only host buffer types are in that line (`ggml_backend_buft_is_host`);
//! the CPU's repacked weights (`CPU_REPACK`) are not host-typed, so they
//! appear only in the `common_memory_breakdown_print` table logged on
//! stderr at debug verbosity. [`run`] reads both (the stderr through
//! [`crate::loadlog`]) and [`Projection::rows`] are what to sum.
//!
//! [`Engine`] is the agent's side of the RPC: one run at a time, each
//! bounded by a deadline (the process is killed when it passes), answers
//! (projections and failures) cached per model file (path, size, mtime)
//! and settings. The binary comes from the same build as llama-server
//! (`fit_params_bin`, by default beside it).

use crate::loadlog::{BreakdownRow, BufferKind, LoadLog, parse_load_log, parse_table_row};
use proto::domain::{MemoryProjection, ProjectedDevice, ProjectionAnswer, ProjectionSettings};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// One mebibyte, the unit llama.cpp prints.
const MIB: u64 = 1024 * 1024;
/// Most of each output stream kept; the rest is read and dropped.
const MAX_OUTPUT: u64 = 16 * MIB;
/// Runs when llama.cpp's asynchronous logger lost the end of the table.
const ATTEMPTS: usize = 5;
/// Answers kept before the cache starts over.
const MAX_CACHED: usize = 1024;

/// Why a run gave no projection. The texts are what the controller shows.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// No file at the configured path.
    #[error("llama-fit-params not found at {}", bin.display())]
    NotFound {
        /// The configured binary.
        bin: PathBuf,
    },
    /// The binary could not be started.
    #[error("cannot run {}: {source}", bin.display())]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The binary exited unsuccessfully.
    #[error("failed ({status}): {stderr_tail}")]
    Failed {
        /// Its exit status.
        status: ExitStatus,
        /// The last lines of its stderr.
        stderr_tail: String,
    },
    /// The binary succeeded but printed no `Host` line.
    #[error("failed: no `Host` projection line in the output of {}: {stdout}", bin.display())]
    NoProjection {
        /// The binary.
        bin: PathBuf,
        /// What it printed on stdout (its end).
        stdout: String,
    },
    /// It ran past the deadline and was killed.
    #[error("timed out after {seconds} s")]
    TimedOut {
        /// The deadline.
        seconds: u64,
    },
}

/// What `llama-fit-params --fit-print on` projected.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    /// The stdout lines (`Host` last), as `common_fit_print` prints them.
    pub printed: Vec<BreakdownRow>,
    /// The stderr breakdown table rows (`Host`, `CPU_REPACK`, devices), when
    /// the log carried them.
    pub table: Vec<BreakdownRow>,
    /// The exact figures the debug log carries (KV `size = ...`, `compute
    /// buffer size = ...`), for diagnosis.
    pub precise: LoadLog,
}

impl Projection {
    /// The rows to sum: the breakdown table when it was logged (it includes
    /// non-host buffer types), else the printed lines.
    pub fn rows(&self) -> &[BreakdownRow] {
        if self.table.is_empty() {
            &self.printed
        } else {
            &self.table
        }
    }

    /// Weights, MiB, over every buffer type.
    pub fn model_mib(&self) -> u64 {
        self.rows().iter().map(|r| r.model_mib).sum()
    }

    /// KV + recurrent state, MiB.
    pub fn context_mib(&self) -> u64 {
        self.rows().iter().map(|r| r.context_mib).sum()
    }

    /// Compute buffers, MiB.
    pub fn compute_mib(&self) -> u64 {
        self.rows().iter().map(|r| r.compute_mib).sum()
    }

    /// The rows as bytes, one device each.
    pub fn memory(&self) -> MemoryProjection {
        MemoryProjection {
            devices: self
                .rows()
                .iter()
                .map(|r| ProjectedDevice {
                    name: r.name.clone(),
                    weights_bytes: r.model_mib * MIB,
                    context_bytes: r.context_mib * MIB,
                    compute_bytes: r.compute_mib * MIB,
                })
                .collect(),
        }
    }

    /// Parses `llama-fit-params` stdout and stderr (`-v`); `None` without
    /// a `Host` line.
    pub fn parse(stdout: &str, stderr: &str) -> Option<Projection> {
        let printed: Vec<BreakdownRow> = stdout.lines().filter_map(parse_printed_line).collect();
        if !printed.iter().any(|r| r.name == "Host") {
            return None;
        }
        Some(Projection {
            printed,
            table: parse_table(stderr),
            precise: parse_load_log(stderr),
        })
    }

    /// Whether the stderr table has a `Host` row equal to the printed line
    /// and a row for every non-host weight buffer the load logged
    /// (`CPU_REPACK`, ...; host types, `CPU` and `*_Mapped`, are folded
    /// into `Host`).
    fn table_is_complete(&self) -> bool {
        let host_printed = self.printed.iter().find(|r| r.name == "Host");
        let host_table = self.table.iter().find(|r| r.name == "Host");
        let others_present = self
            .precise
            .lines()
            .iter()
            .filter(|l| l.kind == BufferKind::Model)
            .filter(|l| l.buffer != "CPU" && !l.buffer.ends_with("_Mapped"))
            .all(|l| {
                self.table
                    .iter()
                    .any(|r| device(&r.name) == device(&l.buffer))
            });
        host_printed.is_some() && host_printed == host_table && others_present
    }
}

/// A buffer or table row's device without its address: the buffer
/// `RPC0[127.0.0.1:50052]` is the row `RPC0 (127.0.0.1:50052)`.
pub fn device(name: &str) -> &str {
    name.split(['[', ' ']).next().unwrap_or(name)
}

/// `Host 693 512 294` (`common_fit_print`): a name then three integers.
fn parse_printed_line(line: &str) -> Option<BreakdownRow> {
    let mut it = line.split_whitespace();
    let name = it.next()?.to_owned();
    let model_mib = it.next()?.parse().ok()?;
    let context_mib = it.next()?.parse().ok()?;
    let compute_mib = it.next()?.parse().ok()?;
    if it.next().is_some() {
        return None;
    }
    Some(BreakdownRow {
        name,
        model_mib,
        context_mib,
        compute_mib,
    })
}

fn parse_table(stderr: &str) -> Vec<BreakdownRow> {
    stderr
        .lines()
        .filter(|l| l.contains("memory_breakdown_print"))
        .filter_map(parse_table_row)
        .collect()
}

/// The flags for `s`, as llama-server is started with them: `-np` slots
/// each with its own KV stream (no `-kvu`), every layer offloaded.
pub fn settings_args(s: &ProjectionSettings) -> Vec<String> {
    vec![
        "-c".to_owned(),
        s.context_size.to_string(),
        "-np".to_owned(),
        s.parallel.max(1).to_string(),
        "-b".to_owned(),
        s.batch_size.to_string(),
        "-ub".to_owned(),
        s.ubatch_size.to_string(),
        "-ctk".to_owned(),
        s.cache_type_k.name().to_owned(),
        "-ctv".to_owned(),
        s.cache_type_v.name().to_owned(),
        "-fa".to_owned(),
        s.flash_attention_name().to_owned(),
        "-ngl".to_owned(),
        "-1".to_owned(),
    ]
}

/// Runs `bin` (`llama-fit-params`) on `model` with `args` and parses its
/// projection, killing it when `timeout` passes (over every attempt). The
/// stderr table comes from llama.cpp's asynchronous logger, which can lose
/// its last lines when the process exits; the run is repeated (up to 5
/// times) until the table is complete, and otherwise the printed `Host`
/// line alone is used. Blocking; the environment is the instances'
/// allow-listed one.
pub fn run(
    bin: &Path,
    model: &Path,
    args: &[String],
    timeout: Duration,
) -> Result<Projection, EngineError> {
    if !bin.exists() {
        return Err(EngineError::NotFound {
            bin: bin.to_owned(),
        });
    }
    let deadline = Instant::now() + timeout;
    let mut last = None;
    for _ in 0..ATTEMPTS {
        let (status, stdout, stderr) = run_once(bin, model, args, deadline, timeout)?;
        if !status.success() {
            let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
            return Err(EngineError::Failed {
                status,
                stderr_tail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            });
        }
        let Some(mut p) = Projection::parse(&stdout, &stderr) else {
            let start = stdout.len().saturating_sub(400);
            let start = (start..stdout.len())
                .find(|&i| stdout.is_char_boundary(i))
                .unwrap_or(0);
            return Err(EngineError::NoProjection {
                bin: bin.to_owned(),
                stdout: stdout[start..].to_owned(),
            });
        };
        if p.table_is_complete() {
            return Ok(p);
        }
        p.table.clear();
        last = Some(p);
        if Instant::now() >= deadline {
            break;
        }
    }
    last.ok_or(EngineError::TimedOut {
        seconds: timeout.as_secs(),
    })
}

/// One run: exit status, stdout, stderr; killed at `deadline`.
fn run_once(
    bin: &Path,
    model: &Path,
    args: &[String],
    deadline: Instant,
    timeout: Duration,
) -> Result<(ExitStatus, String, String), EngineError> {
    let mut child = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(args)
        .args(["--fit-print", "on", "-v"])
        .env_clear()
        .envs(crate::supervisor::instance_environment())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| EngineError::Spawn {
            bin: bin.to_owned(),
            source,
        })?;
    let readers = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ]
    .map(|s| s.map(|s| std::thread::spawn(move || read_bounded(s))));
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            // Our own child, past its deadline (or unwaitable): killed.
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let [out, err] = readers.map(|r| r.and_then(|h| h.join().ok()).unwrap_or_default());
    match status {
        Some(s) => Ok((s, out, err)),
        None => Err(EngineError::TimedOut {
            seconds: timeout.as_secs(),
        }),
    }
}

/// A stream's first [`MAX_OUTPUT`] bytes as text; the rest is drained.
fn read_bounded(mut r: Box<dyn Read + Send>) -> String {
    let mut buf = Vec::new();
    let _ = (&mut r).take(MAX_OUTPUT).read_to_end(&mut buf);
    let _ = std::io::copy(&mut r, &mut std::io::sink());
    String::from_utf8_lossy(&buf).into_owned()
}

/// A model file as it is now and the settings: what an answer is kept by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct CacheKey {
    path: PathBuf,
    size: u64,
    mtime: Option<SystemTime>,
    settings: ProjectionSettings,
}

/// The agent's projection runner: one run at a time, answers cached.
#[derive(Debug)]
pub struct Engine {
    bin: PathBuf,
    timeout: Duration,
    /// Held for the whole of a run: one at a time per agent.
    running: tokio::sync::Mutex<()>,
    cache: Mutex<HashMap<CacheKey, ProjectionAnswer>>,
}

impl Engine {
    /// A runner of `bin` with a `timeout` per projection.
    pub fn new(bin: PathBuf, timeout: Duration) -> Engine {
        Engine {
            bin,
            timeout,
            running: tokio::sync::Mutex::new(()),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The configured binary.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    fn cached(&self, key: &CacheKey) -> Option<ProjectionAnswer> {
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned()
    }

    /// llama.cpp's projection of the file at `path` (resolved by the
    /// caller inside the model directories) under `settings`, and whether
    /// it came from the cache. A missing binary is not cached (it may be
    /// installed later); a failure or a timeout is.
    pub async fn project(
        &self,
        path: &Path,
        settings: &ProjectionSettings,
    ) -> (ProjectionAnswer, bool) {
        let meta = std::fs::metadata(path).ok();
        let key = CacheKey {
            path: path.to_owned(),
            size: meta.as_ref().map_or(0, std::fs::Metadata::len),
            mtime: meta.and_then(|m| m.modified().ok()),
            settings: settings.clone(),
        };
        if let Some(a) = self.cached(&key) {
            return (a, true);
        }
        let _one = self.running.lock().await;
        // Another caller may have run it while this one waited.
        if let Some(a) = self.cached(&key) {
            return (a, true);
        }
        let (bin, model, timeout) = (self.bin.clone(), path.to_owned(), self.timeout);
        let args = settings_args(settings);
        let result = tokio::task::spawn_blocking(move || run(&bin, &model, &args, timeout)).await;
        let answer = match result {
            Ok(Ok(p)) => Ok(p.memory()),
            Ok(Err(e @ EngineError::NotFound { .. })) => return (Err(e.to_string()), false),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(format!("failed: the run's task ended: {e}")),
        };
        if let Err(why) = &answer {
            tracing::info!(model = %path.display(), "llama-fit-params: {why}");
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(key, answer.clone());
        (answer, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STDOUT: &str = "Host 693 512 294 \n";
    const STDERR: &str = "\
0.00.011.161 D sched_reserve:        CPU compute buffer size =   294.52 MiB
0.00.011.421 I common_memory_breakdown_print: | memory breakdown [MiB] | total   free    self   model   context   compute    unaccounted |
0.00.011.421 I common_memory_breakdown_print: |   - Host               |                 1500 =   693 +     512 +     294                |
0.00.011.421 I common_memory_breakdown_print: |   - CPU_REPACK         |                 3744 =  3744 +       0 +       0                |
";

    #[test]
    fn projection_sums_host_line_and_repacked_weights() {
        let p = Projection::parse(STDOUT, STDERR).expect("parse");
        assert_eq!(p.printed.len(), 1);
        assert_eq!(p.table.len(), 2);
        assert_eq!(
            (p.model_mib(), p.context_mib(), p.compute_mib()),
            (693 + 3744, 512, 294)
        );
        let m = p.memory();
        assert_eq!(m.devices.len(), 2);
        assert_eq!(m.total_bytes(), (693 + 3744 + 512 + 294) * MIB);
    }

    #[test]
    fn projection_without_table_uses_printed_lines() {
        let p = Projection::parse(STDOUT, "").expect("parse");
        assert_eq!((p.model_mib(), p.compute_mib()), (693, 294));
        assert!(Projection::parse("nothing here\n", STDERR).is_none());
    }

    #[test]
    fn settings_become_llama_server_flags() {
        let s = ProjectionSettings {
            context_size: 8192,
            parallel: 4,
            cache_type_k: proto::domain::CacheType::Q8_0,
            ..ProjectionSettings::default()
        };
        let a = settings_args(&s).join(" ");
        assert!(
            a.contains("-c 8192 -np 4 -b 2048 -ub 512 -ctk q8_0 -ctv f16 -fa auto"),
            "{a}"
        );
    }

    #[tokio::test]
    async fn a_missing_failing_or_hanging_binary_is_a_named_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let model = dir.path().join("m.gguf");
        std::fs::write(&model, b"GGUF").expect("write");
        let s = ProjectionSettings::default();
        let missing = Engine::new(
            "/nonexistent/llama-fit-params".into(),
            Duration::from_secs(5),
        );
        let (a, cached) = missing.project(&model, &s).await;
        assert_eq!(
            a,
            Err("llama-fit-params not found at /nonexistent/llama-fit-params".to_owned())
        );
        assert!(!cached);

        let failing = Engine::new("/bin/false".into(), Duration::from_secs(5));
        let (a, _) = failing.project(&model, &s).await;
        assert!(a.as_ref().is_err_and(|e| e.starts_with("failed")), "{a:?}");
        let (again, cached) = failing.project(&model, &s).await;
        assert_eq!((again, cached), (a, true));

        let script = dir.path().join("hangs");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 30\n").expect("write");
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let hanging = Engine::new(script, Duration::from_secs(1));
        let (a, _) = hanging.project(&model, &s).await;
        assert_eq!(a, Err("timed out after 1 s".to_owned()));
    }
}
