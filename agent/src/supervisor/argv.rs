//! The llama-server and ggml-rpc-server command lines, built by the agent
//! from typed options. Nothing from a request reaches argv verbatim: the
//! model path comes from the scan, host and port from the agent's config,
//! numbers and RPC server addresses from range-checked typed options, extra
//! flags only as whole entries of the config's allow-list. Flags were
//! checked against this llama.cpp's `common/arg.cpp` and
//! `tools/rpc/rpc-server.cpp`.

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
    if !o.rpc_servers.is_empty() {
        push("--rpc", join(&o.rpc_servers));
    }
    if !o.tensor_split.is_empty() {
        push("-ts", join(&o.tensor_split));
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
    // Prometheus counters at `/metrics` (behind the API key), which the
    // agent's own `/metrics` re-exports per placement.
    a.push("--metrics".to_owned());
    // Browsers: only the configured origin, never with credentials
    // (llama-server's default echoes every Origin back, credentials on).
    a.extend([
        "--cors-origins".to_owned(),
        config.cors_origin.clone(),
        "--no-cors-credentials".to_owned(),
    ]);
    for f in spec.extra {
        a.extend(f.argv.iter().cloned());
    }
    a
}

/// What one ggml-rpc-server's argv is made of.
#[derive(Debug)]
pub struct RpcArgvSpec<'a> {
    /// Address it binds.
    pub host: std::net::IpAddr,
    /// Port it binds.
    pub port: u16,
    /// Checked options (only `threads` applies).
    pub options: &'a InstanceOptions,
}

/// The full ggml-rpc-server argv, program first:
/// `ggml-rpc-server -H HOST -p PORT [-t THREADS]`. Its parser exits (with
/// status 0) on any flag it does not know, so nothing else is passed.
pub fn build_rpc(config: &Config, spec: &RpcArgvSpec<'_>) -> Vec<String> {
    let mut a = vec![
        config.rpc_server.display().to_string(),
        "-H".to_owned(),
        spec.host.to_string(),
        "-p".to_owned(),
        spec.port.to_string(),
    ];
    if let Some(n) = spec.options.threads {
        a.push("-t".to_owned());
        a.push(n.max(1).to_string());
    }
    a
}

/// `a,b,c`: llama.cpp's list syntax for `--rpc` and `--tensor-split`.
fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The environment llama-server and ggml-rpc-server get: the allow-listed subset of ours.
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
            insecure_loopback_only: true,
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
            "--metrics",
            "--cors-origins",
            "localhost",
            "--no-cors-credentials",
            "--cache-reuse",
            "256",
        ];
        assert_eq!(argv, expect);
    }

    fn config(tmp: &Path) -> Config {
        use std::os::unix::fs::PermissionsExt;
        let models = tmp.join("models");
        std::fs::create_dir_all(&models).expect("mkdir");
        let exe = tmp.join("llama-server");
        std::fs::write(&exe, "").expect("write");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Config::resolve(Args {
            node_name: Some("n".into()),
            listen: Some("127.0.0.1:7301".into()),
            instance_host: Some("10.0.0.1".into()),
            model_dirs: Some(vec![models]),
            llama_server: Some(exe),
            state_dir: Some(tmp.join("state")),
            insecure_loopback_only: true,
            ..Args::default()
        })
        .expect("config")
    }

    #[test]
    fn rpc_servers_and_tensor_split_become_comma_separated_lists() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let options = InstanceOptions {
            context_size: 4096,
            gpu_layers: Some(99),
            rpc_servers: vec![
                "10.0.0.2:8100".parse().expect("addr"),
                "10.0.0.3:8101".parse().expect("addr"),
            ],
            tensor_split: vec![20, 21, 20],
            ..InstanceOptions::default()
        };
        let argv = build(
            &config,
            &ArgvSpec {
                model: Path::new("/m/big.gguf"),
                port: 8100,
                options: &options,
                api_key_file: Path::new("/k"),
                extra: &[],
            },
        );
        let at = |flag: &str| {
            let i = argv.iter().position(|a| a == flag).expect(flag);
            argv[i + 1].as_str()
        };
        assert_eq!(at("--rpc"), "10.0.0.2:8100,10.0.0.3:8101");
        assert_eq!(at("-ts"), "20,21,20");
        assert_eq!(at("-ngl"), "99");
        assert_eq!(argv.iter().filter(|a| *a == "--rpc").count(), 1);

        // Neither flag without the option.
        let argv = build(
            &config,
            &ArgvSpec {
                model: Path::new("/m/big.gguf"),
                port: 8100,
                options: &InstanceOptions::default(),
                api_key_file: Path::new("/k"),
                extra: &[],
            },
        );
        assert!(!argv.iter().any(|a| a == "--rpc" || a == "-ts"), "{argv:?}");
    }

    #[test]
    fn an_rpc_server_gets_host_port_and_threads_only() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = config(tmp.path());
        let rpc = config.rpc_server.display().to_string();
        assert!(rpc.ends_with("/ggml-rpc-server"), "{rpc}");
        let mut options = InstanceOptions {
            threads: Some(4),
            gpu_layers: Some(99),
            rpc_client: Some("10.0.0.1".parse().expect("ip")),
            ..InstanceOptions::default()
        };
        fn spec(o: &InstanceOptions) -> RpcArgvSpec<'_> {
            RpcArgvSpec {
                host: "127.0.0.1".parse().expect("ip"),
                port: 8101,
                options: o,
            }
        }
        assert_eq!(
            build_rpc(&config, &spec(&options)),
            [rpc.as_str(), "-H", "127.0.0.1", "-p", "8101", "-t", "4"]
        );
        options.threads = None;
        assert_eq!(
            build_rpc(&config, &spec(&options)),
            [rpc.as_str(), "-H", "127.0.0.1", "-p", "8101"]
        );
    }

    #[test]
    fn no_allow_list_entry_can_name_rpc_or_tensor_split() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let base = config(tmp.path());
        for entry in [
            "--rpc 10.0.0.9:1",
            "--rpc=10.0.0.9:1",
            "-ts 1,1",
            "--tensor-split=1",
        ] {
            let e = Config::resolve(Args {
                node_name: Some("n".into()),
                model_dirs: Some(base.model_dirs.clone()),
                llama_server: Some(base.llama_server.clone()),
                state_dir: Some(base.state_dir.clone()),
                allowed_flags: Some(vec![entry.into()]),
                insecure_loopback_only: true,
                ..Args::default()
            })
            .expect_err(entry)
            .to_string();
            assert!(e.starts_with("`allowed_flags`"), "{e}");
        }
    }
}
