//! The llama-server command line, built by the agent from typed options.
//! Nothing from a request reaches argv verbatim: the model path comes from
//! the scan, host and port from the agent's config, numbers from range-checked
//! options, extra flags only as whole entries of the config's allow-list.
//! Flags were checked against this llama.cpp's `common/arg.cpp`.

use crate::config::{AllowedFlag, Config};
use proto::domain::InstanceOptions;
use std::ffi::OsString;
use std::path::Path;

/// Verbosity passed as `-lv`: llama.cpp prints its `LLAMA_LOG_INFO` lines
/// (the buffer sizes [`crate::loadlog`] reads) only at 4
/// (`common_log_get_verbosity` maps INFO to `LOG_LEVEL_TRACE`).
pub const LOG_VERBOSITY: &str = "4";

/// Environment variables passed through to llama-server; everything else is
/// cleared, above all `LLAMA_ARG_*` (llama.cpp reads every flag from the
/// environment too, `--rpc` and `-hf` included) and `HF_*`.
const ENV_PASSTHROUGH: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "LD_LIBRARY_PATH",
];
/// Prefixes of GPU runtime variables passed through (device selection).
const ENV_PREFIX_PASSTHROUGH: &[&str] = &["HIP_", "ROCR_", "HSA_", "GGML_", "AMD_", "VK_"];

/// What one instance's argv is made of.
#[derive(Debug)]
pub struct ArgvSpec<'a> {
    /// Canonical model path (part 1).
    pub model: &'a Path,
    /// Port from the agent's range.
    pub port: u16,
    /// Checked options.
    pub options: &'a InstanceOptions,
    /// The instance's API key file.
    pub api_key_file: &'a Path,
    /// Allow-list entries the request named, already checked.
    pub extra: &'a [AllowedFlag],
}

/// The full argv, program first.
pub fn build(config: &Config, spec: &ArgvSpec<'_>) -> Vec<String> {
    let o = spec.options;
    let mut a: Vec<String> = vec![config.llama_server.display().to_string()];
    let mut push = |flag: &str, value: String| {
        a.push(flag.to_owned());
        a.push(value);
    };
    push("-m", spec.model.display().to_string());
    push("--host", config.instance_host.to_string());
    push("--port", spec.port.to_string());
    push("-c", o.context_size.to_string());
    push("-np", o.parallel.max(1).to_string());
    if let Some(t) = o.cache_type_k {
        push("-ctk", t.name().to_owned());
    }
    if let Some(t) = o.cache_type_v {
        push("-ctv", t.name().to_owned());
    }
    if let Some(fa) = o.flash_attention {
        push("-fa", if fa { "on" } else { "off" }.to_owned());
    }
    if let Some(n) = o.gpu_layers {
        push("-ngl", n.to_string());
    }
    if let Some(n) = o.threads {
        push("-t", n.to_string());
    }
    if let Some(n) = o.batch_size {
        push("-b", n.to_string());
    }
    if let Some(n) = o.ubatch_size {
        push("-ub", n.to_string());
    }
    if !o.alias.is_empty() {
        push("--alias", o.alias.clone());
    }
    push("--api-key-file", spec.api_key_file.display().to_string());
    push("-lv", LOG_VERBOSITY.to_owned());
    a.push("--no-webui".to_owned());
    for f in spec.extra {
        a.extend(f.argv.iter().cloned());
    }
    a
}

/// The environment llama-server gets: the allow-listed subset of ours.
pub fn environment() -> Vec<(OsString, OsString)> {
    std::env::vars_os()
        .filter(|(k, _)| {
            k.to_str().is_some_and(|k| {
                ENV_PASSTHROUGH.contains(&k)
                    || ENV_PREFIX_PASSTHROUGH.iter().any(|p| k.starts_with(p))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Args, Config};
    use proto::domain::CacheType;

    #[test]
    fn argv_holds_only_agent_chosen_values_in_llama_server_flags() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let models = tmp.path().join("models");
        std::fs::create_dir(&models).expect("mkdir");
        let exe = tmp.path().join("llama-server");
        std::fs::write(&exe, "").expect("write");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let config = Config::resolve(Args {
            node_name: Some("n".into()),
            listen: Some("127.0.0.1:7301".into()),
            model_dirs: Some(vec![models.clone()]),
            llama_server: Some(exe.clone()),
            state_dir: Some(tmp.path().join("state")),
            allowed_flags: Some(vec!["--cache-reuse 256".into()]),
            ..Args::default()
        })
        .expect("config");
        let options = InstanceOptions {
            context_size: 512,
            parallel: 2,
            cache_type_k: Some(CacheType::Q8_0),
            flash_attention: Some(false),
            threads: Some(1),
            alias: "tiny".into(),
            ..InstanceOptions::default()
        };
        let argv = build(
            &config,
            &ArgvSpec {
                model: &models.join("tiny.gguf"),
                port: 8123,
                options: &options,
                api_key_file: Path::new("/state/instances/i-1/api-key"),
                extra: &config.allowed_flags,
            },
        );
        let exe = exe.canonicalize().expect("canonical").display().to_string();
        let model = models.join("tiny.gguf").display().to_string();
        let expect: Vec<&str> = vec![
            &exe,
            "-m",
            &model,
            "--host",
            "127.0.0.1",
            "--port",
            "8123",
            "-c",
            "512",
            "-np",
            "2",
            "-ctk",
            "q8_0",
            "-fa",
            "off",
            "-t",
            "1",
            "--alias",
            "tiny",
            "--api-key-file",
            "/state/instances/i-1/api-key",
            "-lv",
            "4",
            "--no-webui",
            "--cache-reuse",
            "256",
        ];
        assert_eq!(argv, expect);
    }
}
