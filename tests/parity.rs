//! Parity with llama.cpp's own projection.
//!
//! `llama-fit-params -m FILE -c CTX --fit-print on` loads the model with
//! `no_alloc` (`common_get_device_memory_data_impl` in `common/fit.cpp`):
//! it builds every buffer's layout without reading the weights, so sparse
//! fixture files work. `common_fit_print` then prints, on stdout, one line
//! per device and one `Host <model MiB> <context MiB> <compute MiB>` line
//! (each value `bytes / MiB`, rounded down). Only host buffer types are in
//! that line (`ggml_backend_buft_is_host`); the CPU's repacked weights
//! (`CPU_REPACK`) are not host-typed, so they appear only in the
//! `common_memory_breakdown_print` table logged on stderr at debug
//! verbosity (`-v`). [`run_fit_params`] reads both and sums every row; the
//! stderr goes through the agent's load-log parser (`agent::loadlog`).
//! Running and parsing the tool is the agent's (`agent::engine`, which
//! answers the controller's `ProjectMemory`); this module keeps the test
//! side: the flags of an [`EstimateOptions`], tolerances and the table.
//!
//! Test and bench tooling: `tests/estimate.rs` asserts parity,
//! `cargo bench -p tests --bench estimate_parity` prints the whole table.

use agent::engine::EngineError;
pub use agent::engine::{Projection as LlamaProjection, device};
use agent::loadlog::{parse_load_log, parse_table_row};
use controller::estimate::{CacheType, Estimate, EstimateOptions, FlashAttn, MIB};
use std::fmt;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long one `llama-fit-params` run may take in tests (a loaded
/// machine, the largest fixtures).
pub const FIT_PARAMS_TIMEOUT: Duration = Duration::from_secs(300);

/// Why a `llama-fit-params` run gave no projection.
#[derive(Debug, thiserror::Error)]
pub enum ParityError {
    /// The agent's runner: not found, failed, no projection, timed out.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// An option has no `llama-fit-params` flag.
    #[error("llama-fit-params has no flag for {0}")]
    Unsupported(&'static str),
    /// The binary could not be started.
    #[error("cannot run {bin}: {source}")]
    Spawn {
        /// The binary.
        bin: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `llama-server` printed no projection table in time.
    #[error("{bin} printed no memory breakdown within {seconds} s: {stderr_tail}")]
    NoTable {
        /// The binary.
        bin: PathBuf,
        /// The deadline.
        seconds: u64,
        /// The last lines of its stderr.
        stderr_tail: String,
    },
}

/// The command-line flags for `opts`.
pub fn fit_params_args(opts: &EstimateOptions) -> Result<Vec<String>, ParityError> {
    if opts.kv_unified {
        // -kvu is registered for the server, perplexity and batched tools only.
        return Err(ParityError::Unsupported("--kv-unified"));
    }
    if opts.n_outputs_max != 0 && u64::from(opts.n_outputs_max) < u64::from(opts.n_ubatch) {
        // common_params::n_outputs_max has no command-line flag.
        return Err(ParityError::Unsupported("n_outputs_max"));
    }
    Ok(common_args(opts))
}

/// Flags both tools share.
fn common_args(opts: &EstimateOptions) -> Vec<String> {
    let mut args = vec![
        "-c".to_owned(),
        opts.ctx.to_string(),
        "-np".to_owned(),
        opts.parallel.max(1).to_string(),
        "-b".to_owned(),
        opts.n_batch.to_string(),
        "-ub".to_owned(),
        opts.n_ubatch.to_string(),
        "-ctk".to_owned(),
        opts.cache_type_k.name().to_owned(),
        "-ctv".to_owned(),
        opts.cache_type_v.name().to_owned(),
        "-fa".to_owned(),
        opts.flash_attn.name().to_owned(),
        "-ngl".to_owned(),
        opts.gpu_layers.to_string(),
    ];
    if opts.swa_full {
        args.push("--swa-full".to_owned());
    }
    args
}

/// Runs `bin` (`llama-fit-params`) on `model` with `opts` and parses its
/// projection ([`agent::engine::run`]: repeated until llama.cpp's
/// asynchronous logger delivered the whole stderr table, killed after
/// [`FIT_PARAMS_TIMEOUT`]).
pub fn run_fit_params(
    bin: &Path,
    model: &Path,
    opts: &EstimateOptions,
) -> Result<LlamaProjection, ParityError> {
    run_fit_params_with(bin, model, opts, &[])
}

/// [`run_fit_params`] with `extra` flags after the others (e.g. `--rpc`).
pub fn run_fit_params_with(
    bin: &Path,
    model: &Path,
    opts: &EstimateOptions,
    extra: &[String],
) -> Result<LlamaProjection, ParityError> {
    let mut args = fit_params_args(opts)?;
    args.extend(extra.iter().cloned());
    Ok(agent::engine::run(bin, model, &args, FIT_PARAMS_TIMEOUT)?)
}

/// The projection `llama-server` itself makes before loading: with `--fit`
/// on (its default) it measures the model with `no_alloc` exactly like
/// `llama-fit-params`, but with its own context parameters (one logit row
/// per slot, `-kvu`), and logs the breakdown table at `-v`. This starts
/// `bin` (`llama-server`) on `model`, reads stderr until that first table is
/// complete and kills the server before it loads any weight, so sparse
/// files work. `n_outputs_max` follows `-np` (`server_output_limits`).
pub fn run_server_projection(
    bin: &Path,
    model: &Path,
    opts: &EstimateOptions,
    timeout: Duration,
) -> Result<LlamaProjection, ParityError> {
    let mut args = common_args(opts);
    args.push(if opts.kv_unified { "-kvu" } else { "-no-kvu" }.to_owned());
    // A port nobody listens on; the server is stopped before it binds.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(18_999);
    let mut child = Command::new(bin)
        .arg("-m")
        .arg(model)
        .args(&args)
        .args(["--host", "127.0.0.1", "--port", &port.to_string(), "-v"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| ParityError::Spawn {
            bin: bin.to_owned(),
            source,
        })?;
    let (tx, rx) = mpsc::channel::<String>();
    let reader = child.stderr.take().map(|stderr| {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        })
    });
    let deadline = Instant::now() + timeout;
    let mut log = String::new();
    let mut table = Vec::new();
    let mut in_table = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            break; // deadline, or the server exited
        };
        log.push_str(&line);
        log.push('\n');
        if line.contains("memory breakdown [MiB]") {
            in_table = true;
        } else if in_table {
            match parse_table_row(&line) {
                Some(row) if line.contains("memory_breakdown_print") => table.push(row),
                _ => break,
            }
        }
    }
    // Our own child; it is stopped before it loads weights or binds.
    let _ = child.kill();
    let _ = child.wait();
    drop(rx);
    if let Some(r) = reader {
        let _ = r.join();
    }
    if table.is_empty() {
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        return Err(ParityError::NoTable {
            bin: bin.to_owned(),
            seconds: timeout.as_secs(),
            stderr_tail: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(LlamaProjection {
        printed: Vec::new(),
        table,
        precise: parse_load_log(&log),
    })
}

/// [`run_fit_params`] at `llama-fit-params` defaults with one context size
/// and cache type for both K and V.
pub fn run_fit_params_ctx(
    bin: &Path,
    model: &Path,
    ctx: u32,
    cache: CacheType,
) -> Result<LlamaProjection, ParityError> {
    run_fit_params(bin, model, &EstimateOptions::with_ctx(ctx).cache(cache))
}

/// How close is close enough: within `rel` of llama.cpp's figure or
/// `abs_mib`, whichever is larger.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Tolerance {
    /// Relative tolerance (0.02 = 2 %).
    pub rel: f64,
    /// Absolute tolerance in MiB.
    pub abs_mib: f64,
}

impl Default for Tolerance {
    /// 2 % or 16 MiB.
    fn default() -> Self {
        Tolerance {
            rel: 0.02,
            abs_mib: 16.0,
        }
    }
}

impl Tolerance {
    /// Whether `ours` (MiB) is close enough to `theirs` (MiB).
    pub fn allows(&self, theirs: f64, ours: f64) -> bool {
        (ours - theirs).abs() <= (self.rel * theirs.abs()).max(self.abs_mib)
    }
}

/// One comparison: llama.cpp's projection against ours.
#[derive(Debug, Clone, PartialEq)]
pub struct ParityRow {
    /// Architecture or model label.
    pub label: String,
    /// Requested context.
    pub ctx: u32,
    /// K/V cache type.
    pub cache: CacheType,
    /// Flash attention option.
    pub flash_attn: FlashAttn,
    /// Parallel sequences.
    pub parallel: u32,
    /// Other options that differ from the defaults (`kvu`, `swa-full`,
    /// `out=N` logit rows).
    pub flags: String,
    /// llama.cpp `[model, context, compute]`, MiB (rounded down per row).
    pub llama_mib: [u64; 3],
    /// Ours, MiB (exact).
    pub halo_mib: [f64; 3],
    /// Whether each of the three is within tolerance.
    pub ok: [bool; 3],
}

impl ParityRow {
    /// Compares `est` with `proj`. llama.cpp rounds each buffer row down to
    /// whole MiB, so a figure may sit up to one MiB per row under ours.
    pub fn new(
        label: &str,
        opts: &EstimateOptions,
        est: &Estimate,
        proj: &LlamaProjection,
        tol: Tolerance,
    ) -> ParityRow {
        let llama_mib = [proj.model_mib(), proj.context_mib(), proj.compute_mib()];
        let halo_mib = [
            est.weights_bytes as f64 / MIB as f64,
            est.kv_bytes as f64 / MIB as f64,
            est.compute_bytes as f64 / MIB as f64,
        ];
        let rows = proj.rows().len().max(1) as f64;
        let ok = [0, 1, 2].map(|i| {
            let theirs = llama_mib[i] as f64;
            // Compare against the midpoint of the rounding interval.
            tol.allows(theirs + rows / 2.0, halo_mib[i]) || tol.allows(theirs, halo_mib[i])
        });
        let mut flags = Vec::new();
        if opts.kv_unified {
            flags.push("kvu".to_owned());
        }
        if opts.swa_full {
            flags.push("swa-full".to_owned());
        }
        if opts.n_outputs_max != 0 {
            flags.push(format!("out={}", opts.n_outputs_max));
        }
        if (opts.n_batch, opts.n_ubatch) != (2048, 512) {
            flags.push(format!("b={},ub={}", opts.n_batch, opts.n_ubatch));
        }
        ParityRow {
            label: label.to_owned(),
            ctx: opts.ctx,
            cache: opts.cache_type_k,
            flash_attn: opts.flash_attn,
            parallel: opts.parallel,
            flags: flags.join(","),
            llama_mib,
            halo_mib,
            ok,
        }
    }

    /// Whether all three figures are within tolerance.
    pub fn passes(&self) -> bool {
        self.ok.iter().all(|&x| x)
    }

    /// Relative error of figure `i` in percent (0 when llama.cpp says 0).
    pub fn error_pct(&self, i: usize) -> f64 {
        let theirs = self.llama_mib[i] as f64;
        if theirs == 0.0 {
            0.0
        } else {
            (self.halo_mib[i] - theirs) / theirs * 100.0
        }
    }

    /// The table header matching [`fmt::Display`].
    pub fn header() -> String {
        format!(
            "{:<36} {:>7} {:>5} {:>4} {:>3} {:<14} | {:>8} {:>8} {:>7} | {:>8} {:>8} {:>7} | {:>7} {:>7} {:>7} | ok",
            "model",
            "ctx",
            "cache",
            "fa",
            "np",
            "flags",
            "ll.model",
            "ll.ctx",
            "ll.comp",
            "hl.model",
            "hl.ctx",
            "hl.comp",
            "err.m%",
            "err.c%",
            "err.k%"
        )
    }
}

impl fmt::Display for ParityRow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = |b: bool| if b { "" } else { "!" };
        write!(
            f,
            "{:<36} {:>7} {:>5} {:>4} {:>3} {:<14} | {:>8} {:>8} {:>7} | {:>8.0} {:>8.0} {:>7.0} | {:>6.2}{:1} {:>6.2}{:1} {:>6.2}{:1} | {}",
            self.label,
            self.ctx,
            self.cache.name(),
            self.flash_attn.name(),
            self.parallel,
            self.flags,
            self.llama_mib[0],
            self.llama_mib[1],
            self.llama_mib[2],
            self.halo_mib[0],
            self.halo_mib[1],
            self.halo_mib[2],
            self.error_pct(0),
            mark(self.ok[0]),
            self.error_pct(1),
            mark(self.ok[1]),
            self.error_pct(2),
            mark(self.ok[2]),
            if self.passes() { "yes" } else { "NO" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerance_is_two_percent_or_sixteen_mib() {
        let t = Tolerance::default();
        assert!(t.allows(100.0, 115.0));
        assert!(!t.allows(100.0, 117.0));
        assert!(t.allows(10_000.0, 10_190.0));
        assert!(!t.allows(10_000.0, 10_210.0));
    }

    #[test]
    fn args_follow_the_options() {
        let args =
            fit_params_args(&EstimateOptions::with_ctx(4096).cache(CacheType::Q8_0)).expect("args");
        let joined = args.join(" ");
        assert!(joined.contains("-c 4096"));
        assert!(joined.contains("-ctk q8_0 -ctv q8_0"));
        assert!(joined.contains("-fa auto"));
        let unified = EstimateOptions {
            kv_unified: true,
            ..EstimateOptions::default()
        };
        assert!(fit_params_args(&unified).is_err());
    }
}
