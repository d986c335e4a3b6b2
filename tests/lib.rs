//! Shared harness for halo's integration tests and the benches beside them:
//! where the llama.cpp binaries and this package's shims are, free ports,
//! and real child processes that are killed (and whose logs are printed)
//! when a test ends. [`cluster`] runs etcd, agents and controllers;
//! [`agent_node`] one agent alone; [`tls_client`] haloctl and TLS clients;
//! [`placing`] placement inputs from the sparse fixtures; [`parity`]
//! compares halo's memory estimate with llama.cpp's own projection.
//! Test modules (`main.rs`) share helpers only through this library.

pub mod agent_node;
pub mod cluster;
pub mod front;
pub mod parity;
pub mod pki;
pub mod placing;
pub mod readme;
pub mod tls_client;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The llama.cpp version the project pins (`deploy/build-llama.sh`).
pub const LLAMA_VERSION: &str = "11434.0.0";

/// Directory holding `llama-server`, `llama-fit-params` and `rpc-server`:
/// `$HALO_LLAMA_BIN` when set, else the build script's default cache.
///
/// Panics with instructions when the binary is missing: a test that needs
/// llama.cpp never skips silently.
pub fn llama_bin(name: &str) -> PathBuf {
    let dir = match std::env::var_os("HALO_LLAMA_BIN") {
        Some(d) => PathBuf::from(d),
        None => default_llama_dir(),
    };
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} not found.\nBuild llama.cpp (cached, ~6 min on 2 cores) and point the tests at it:\n  \
         export HALO_LLAMA_BIN=\"$(bash deploy/build-llama.sh)\"",
        path.display()
    );
    path
}

fn default_llama_dir() -> PathBuf {
    let cache = std::env::var_os("HALO_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("halo")))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/halo")))
        .unwrap_or_else(|| PathBuf::from(".cache/halo"));
    cache.join(format!("llama.cpp-{LLAMA_VERSION}")).join("bin")
}

/// A binary of this package (`halo-agent-shim`, `halo-controller-shim`,
/// `haloctl-shim`). Cargo builds them for integration tests and benches
/// but tells only those targets where (`CARGO_BIN_EXE_*`), not this
/// library, so they are found at run time: nextest's
/// `NEXTEST_BIN_EXE_<name>` when set, else beside the `deps/` directory the
/// test or bench executable runs from (`target/<profile>/`).
pub fn bin(name: &str) -> PathBuf {
    for var in [
        format!("NEXTEST_BIN_EXE_{name}"),
        format!("CARGO_BIN_EXE_{name}"),
    ] {
        if let Some(p) = std::env::var_os(var) {
            return PathBuf::from(p);
        }
    }
    let exe = std::env::current_exe().expect("current exe");
    let path = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join(name))
        .unwrap_or_else(|| PathBuf::from(name));
    assert!(
        path.is_file(),
        "{} not found (built with the tests and benches of package `tests`)",
        path.display()
    );
    path
}

/// Whether a bench runs as a smoke test (`HALO_BENCH_SMOKE=1`, as
/// `tests/bench-smoke.sh` runs them): one short pass with tiny sizes that
/// shows the bench still starts and finishes, no figures worth reading.
pub fn smoke() -> bool {
    std::env::var_os("HALO_BENCH_SMOKE").is_some_and(|v| v == "1")
}

/// Output bytes as text, invalid UTF-8 replaced.
pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A loopback port that was free a moment ago, drawn below the kernel's
/// ephemeral range as [`free_range`] explains: a port-0 port can be taken
/// by another process's outgoing connection before the daemon it is meant
/// for binds it (etcd lost one that way).
pub fn free_port() -> u16 {
    free_range(1).0
}

/// A loopback port outside `range`.
pub fn port_outside(range: (u16, u16)) -> u16 {
    loop {
        let p = free_port();
        if !(range.0..=range.1).contains(&p) {
            return p;
        }
    }
}

/// `n` consecutive loopback ports that are free now, for an agent's
/// `--port-range`. The first is drawn by time and pid from 10000 up to the
/// kernel's ephemeral range (`ip_local_port_range`, 32768..60999 by
/// default), not asked of the kernel: port 0 and every outgoing
/// connection take ports from the ephemeral range, so a range
/// there can be handed to another process of a concurrent test run
/// between this check and the agent's bind (the quick-start builds halo
/// in that window). Bounded: panics after 200 tries.
pub fn free_range(n: u16) -> (u16, u16) {
    let below = ephemeral_low().max(10_000 + 2 * n);
    for _ in 0..200 {
        let first = 10_000 + (rand_u16() % (below - 10_000 - n));
        let last = first + (n - 1);
        if (first..=last).all(|p| TcpListener::bind(("127.0.0.1", p)).is_ok()) {
            return (first, last);
        }
    }
    panic!("no {n} free consecutive ports");
}

/// The first port of the kernel's ephemeral range (32768 when unreadable).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

fn rand_u16() -> u16 {
    static DRAWS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let n = DRAWS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mixed =
        (t ^ std::process::id().wrapping_mul(2_654_435_761)).wrapping_add(n.wrapping_mul(40_503));
    u16::try_from(mixed % 65_536).unwrap_or(0)
}

/// A child process killed on drop; its stderr goes to a log file that is
/// printed when the test panics.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stdout and stderr going to `dir/<name>.log`.
    pub fn spawn(name: &str, mut cmd: Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).expect("create log");
        let err = out.try_clone().expect("clone log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(&self.log) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    /// Panics (with the log) if the process has exited.
    pub fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited with {status}:\n{}", self.name, self.log());
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "----- {} log ({}) -----\n{}",
                self.name,
                self.log.display(),
                self.log()
            );
        }
    }
}

/// Live processes of `dir`: their command line names a path under it, or
/// they run in it (pid, start time and liveness checked, so a recycled pid
/// does not count).
pub fn live_processes_under(dir: &Path) -> Vec<u32> {
    let mark = dir.display().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let ours = agent::procfs::cmdline(pid)
                .is_some_and(|a| a.iter().any(|w| w.contains(&mark)))
                || std::fs::read_link(format!("/proc/{pid}/cwd"))
                    .is_ok_and(|cwd| cwd.starts_with(dir));
            ours && agent::procfs::identify(pid).is_some_and(agent::procfs::is_alive)
        })
        .collect()
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// HTTP status of `GET url`, or `None` when nothing answers.
pub fn http_status(url: &str) -> Option<u16> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .into();
    agent.get(url).call().ok().map(|r| r.status().as_u16())
}

/// `POST url` with a JSON body; the JSON answer.
pub fn post_json(url: &str, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    let mut resp = agent.post(url).send_json(body)?;
    Ok(resp.body_mut().read_json()?)
}
