//! What this node's llama.cpp build is, asked once at boot: `llama-server
//! --version` (its build line, which a split compares across nodes: the RPC
//! protocol between llama-server and ggml-rpc-server must match),
//! `llama-server --list-devices` (the non-CPU devices layers can be
//! offloaded to), and whether ggml-rpc-server can be run. Each command has
//! a short deadline and the instances' cleared environment; a failure
//! leaves its field empty and is logged, never fatal.

use crate::config::{Config, is_executable};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;
use tokio::process::Command;

/// Deadline of one probe command (`--list-devices` initialises every GPU
/// backend, which takes a second or two on a Vulkan or ROCm box).
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most bytes of a probe's output kept.
const MAX_OUTPUT: usize = 64 * 1024;

/// The node's llama.cpp build, as [`probe`] found it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LlamaBuild {
    /// The `version: …` line of `llama-server --version`, trimmed; empty
    /// when it could not be run or printed none.
    pub version: String,
    /// Device names of `llama-server --list-devices` (e.g. `Vulkan0`);
    /// empty on a CPU-only build.
    pub gpu_devices: Vec<String>,
    /// Whether `rpc_server` is an executable file.
    pub rpc_server_available: bool,
}

/// Runs the probes (concurrently) for `config`'s llama-server and
/// ggml-rpc-server.
pub async fn probe(config: &Config) -> LlamaBuild {
    let exe = config.llama_server.as_path();
    let (version, devices) = tokio::join!(
        run(exe, "--version", PROBE_TIMEOUT),
        run(exe, "--list-devices", PROBE_TIMEOUT)
    );
    let version = match version {
        Ok(out) => parse_version(&out).unwrap_or_else(|| {
            tracing::warn!(llama_server = %exe.display(), "`--version` printed no version line");
            String::new()
        }),
        Err(e) => {
            tracing::warn!(llama_server = %exe.display(), "`--version` failed: {e}");
            String::new()
        }
    };
    let gpu_devices = match devices {
        Ok(out) => parse_devices(&out),
        Err(e) => {
            tracing::warn!(llama_server = %exe.display(), "`--list-devices` failed: {e}");
            Vec::new()
        }
    };
    let rpc_server_available = is_executable(&config.rpc_server);
    if !rpc_server_available {
        tracing::info!(
            rpc_server = %config.rpc_server.display(),
            "no ggml-rpc-server: this node cannot hold a share of a split model"
        );
    }
    if !is_executable(&config.fit_params_bin) {
        tracing::warn!(
            fit_params_bin = %config.fit_params_bin.display(),
            "no llama-fit-params: the controller's estimate cannot be checked against llama.cpp's \
             own projection on this node"
        );
    }
    if config.rpc_server.parent() != config.llama_server.parent() {
        tracing::warn!(
            rpc_server = %config.rpc_server.display(),
            llama_server = %exe.display(),
            "rpc_server is not beside llama_server: both must come from the same llama.cpp build, \
             or llama.cpp's RPC protocol may not match"
        );
    }
    LlamaBuild {
        version,
        gpu_devices,
        rpc_server_available,
    }
}

/// Runs `program arg` with the instances' environment; its stdout then
/// stderr, or why it could not run or did not exit 0 in time.
async fn run(program: &Path, arg: &str, deadline: Duration) -> Result<String, String> {
    let child = Command::new(program)
        .arg(arg)
        .env_clear()
        .envs(crate::supervisor::instance_environment())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start: {e}"))?;
    let out = tokio::time::timeout(deadline, child.wait_with_output())
        .await
        .map_err(|_| format!("no exit within {deadline:?}"))?
        .map_err(|e| format!("waiting failed: {e}"))?;
    let mut text =
        String::from_utf8_lossy(&out.stdout[..out.stdout.len().min(MAX_OUTPUT)]).into_owned();
    text.push('\n');
    text.push_str(&String::from_utf8_lossy(
        &out.stderr[..out.stderr.len().min(MAX_OUTPUT)],
    ));
    if !out.status.success() {
        let last = text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
        return Err(format!("{}: {}", out.status, last.trim()));
    }
    Ok(text)
}

/// The first line naming the version (llama.cpp prints `version: N (commit)`
/// on stderr, then `built with …`), trimmed.
pub fn parse_version(output: &str) -> Option<String> {
    output
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("version"))
        .or_else(|| {
            output
                .lines()
                .map(str::trim)
                .find(|l| l.contains("version"))
        })
        .map(str::to_owned)
}

/// Device names from `--list-devices` (`common_print_available_devices`:
/// `Available devices:`, then `  NAME: description (N MiB, M MiB free)`
/// per non-CPU device, or `  (none)`). Lines before the header (backend
/// initialisation chatter) are ignored.
pub fn parse_devices(output: &str) -> Vec<String> {
    let Some((_, list)) = output.split_once("Available devices:") else {
        return Vec::new();
    };
    list.lines()
        .skip(1)
        .take_while(|l| l.starts_with(' ') || l.starts_with('\t'))
        .filter_map(|l| {
            let (name, _) = l.trim().split_once(": ")?;
            (!name.is_empty() && !name.contains(char::is_whitespace)).then(|| name.to_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_line_is_found_on_either_stream() {
        let cpu = "\nversion: 0.6.0-dev (build 0, commit unknown)\nbuilt with GNU 12.2.0 for Linux x86_64\n";
        assert_eq!(
            parse_version(cpu).as_deref(),
            Some("version: 0.6.0-dev (build 0, commit unknown)")
        );
        assert_eq!(
            parse_version("ggml_vulkan: Found 1 Vulkan devices:\nversion: 6500 (a1b2c3d)\n")
                .as_deref(),
            Some("version: 6500 (a1b2c3d)")
        );
        assert_eq!(parse_version("\n\n"), None);
    }

    #[test]
    fn devices_are_the_names_listed_after_the_header() {
        assert!(parse_devices("Available devices:\n  (none)\n").is_empty());
        let vulkan = "ggml_vulkan: Found 1 Vulkan devices:\n\
                      ggml_vulkan: 0 = Radeon 8060S Graphics (RADV GFX1151) | uma: 1\n\
                      Available devices:\n  \
                      Vulkan0: Radeon 8060S Graphics (RADV GFX1151) (98304 MiB, 97000 MiB free)\n  \
                      ROCm0: AMD Radeon Graphics (65536 MiB, 65000 MiB free)\n\
                      \nbuilt with …\n";
        assert_eq!(parse_devices(vulkan), ["Vulkan0", "ROCm0"]);
        assert!(parse_devices("error: unknown argument\n").is_empty());
    }

    #[tokio::test]
    async fn a_missing_or_failing_program_is_an_error_not_a_hang() {
        let e = run(
            Path::new("/nonexistent/llama-server"),
            "--version",
            PROBE_TIMEOUT,
        )
        .await
        .expect_err("missing");
        assert!(e.starts_with("cannot start"), "{e}");
        let e = run(Path::new("/bin/false"), "--version", PROBE_TIMEOUT)
            .await
            .expect_err("false");
        assert!(e.contains("exit status: 1"), "{e}");
        let e = run(Path::new("/bin/sleep"), "5", Duration::from_millis(100))
            .await
            .expect_err("timeout");
        assert!(e.starts_with("no exit within"), "{e}");
    }
}
