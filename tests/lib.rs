//! Shared harness for halo's integration tests: where the llama.cpp binaries
//! are, free ports, and real child processes that are killed (and whose logs
//! are printed) when a test ends. [`parity`] compares halo's memory estimate
//! with llama.cpp's own projection.

pub mod parity;
pub mod pki;

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

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
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
