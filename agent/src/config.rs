//! The agent's configuration: a TOML file, `HALO_AGENT_*` environment
//! variables and command-line flags (precedence file < env < flag; clap
//! merges env and flag, [`Config::resolve`] lays them over the file), parsed
//! and validated in full before anything is bound or spawned. Every error is
//! one line naming the key.

use clap::Parser;
pub use proto::config::ConfigError;
use proto::config::{TomlErrors, invalid, read_toml};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default gRPC listen address (loopback; a node's mesh address needs TLS).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7301";
/// Default instance port range.
pub const DEFAULT_PORT_RANGE: &str = "8100-8199";
/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/halo-agent";
/// File name of llama.cpp's RPC server, looked for beside llama-server.
pub const DEFAULT_RPC_SERVER: &str = "ggml-rpc-server";
/// llama.cpp's memory projection tool, looked for beside llama-server.
pub const DEFAULT_FIT_PARAMS: &str = "llama-fit-params";

/// Flags the agent sets itself or that reach the network or the file
/// system on their own; no allow-list entry may name them.
pub const DENIED_FLAGS: &[&str] = &[
    // Set by the agent from typed options.
    "-m",
    "--model",
    "--host",
    "--port",
    "-c",
    "--ctx-size",
    "-np",
    "--parallel",
    "-ctk",
    "--cache-type-k",
    "-ctv",
    "--cache-type-v",
    "-fa",
    "--flash-attn",
    "-ngl",
    "--gpu-layers",
    "--n-gpu-layers",
    "-t",
    "--threads",
    "-b",
    "--batch-size",
    "-ub",
    "--ubatch-size",
    "-a",
    "--alias",
    "--api-key",
    "--api-key-file",
    "-lv",
    "--verbosity",
    "--log-verbosity",
    "--log-file",
    "--log-disable",
    "--ui",
    "--webui",
    "--metrics",
    "--no-ui",
    "--no-webui",
    "-ts",
    "--tensor-split",
    // Reach other machines or download.
    "--rpc",
    "-hf",
    "-hfr",
    "--hf-repo",
    "-hff",
    "--hf-file",
    "-hfv",
    "-hfrv",
    "--hf-repo-v",
    "-hffv",
    "--hf-file-v",
    "-hft",
    "--hf-token",
    "-mu",
    "--model-url",
    "-dr",
    "--docker-repo",
    "-mmu",
    "--mmproj-url",
    // Serve or write files, or change TLS.
    "--path",
    "--ssl-key-file",
    "--ssl-cert-file",
    "--slot-save-path",
    "--media-path",
    "--models-dir",
    "--models-preset",
    // Open instances to other web pages or run tools on the node.
    "--cors-origins",
    "--cors-methods",
    "--cors-headers",
    "--cors-credentials",
    "--no-cors-credentials",
    "--api-prefix",
    "--reuse-port",
    "--tools",
    "--tools-runtime",
    "--ui-mcp-proxy",
    "--webui-mcp-proxy",
    "--ui-config",
    "--webui-config",
    "--ui-config-file",
    "--webui-config-file",
];

/// `localhost`, or one origin: http(s)://HOST[:PORT] with no path. llama-server
/// sends any other value back verbatim as Access-Control-Allow-Origin, so a
/// list, `*` or `null` (sandboxed frames) would open instances to pages
/// the operator never meant.
fn check_origin(o: &str) -> Result<(), String> {
    if o == "localhost" {
        return Ok(());
    }
    let rest = o
        .strip_prefix("https://")
        .or_else(|| o.strip_prefix("http://"))
        .ok_or_else(|| format!("`{o}`: use `localhost` or one origin such as https://host:port"))?;
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, Some(p)),
        _ => (rest, None),
    };
    let host_ok = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.[]:".contains(&b));
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(format!(
            "`{o}`: one origin, scheme://host[:port] with no path, list or wildcard"
        ))
    }
}

/// Command line of `halo-agent`. Every option is also an environment
/// variable and a key of the `--config` file (same name, `_` for `-`).
#[derive(Debug, Default, Parser)]
#[command(
    name = "halo-agent",
    version,
    args_override_self = true,
    about = "halo's per-node daemon: reports memory and GGUF models, runs llama-server"
)]
pub struct Args {
    /// TOML config file; flags and env vars override its keys.
    #[arg(long, env = "HALO_AGENT_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Node name (default: the host name).
    #[arg(long, env = "HALO_AGENT_NODE_NAME")]
    pub node_name: Option<String>,
    /// gRPC listen address, host:port [default: 127.0.0.1:7301].
    #[arg(long, env = "HALO_AGENT_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Roles placement matches on (speed, reasoning…); repeat or comma-separate.
    #[arg(long = "role", env = "HALO_AGENT_ROLES", value_delimiter = ',')]
    pub roles: Option<Vec<String>>,
    /// Labels as key=value; repeat or comma-separate.
    #[arg(long = "label", env = "HALO_AGENT_LABELS", value_delimiter = ',')]
    pub labels: Option<Vec<String>>,
    /// Directories holding GGUF models; repeat, or `:`-separate in the env var.
    #[arg(
        long = "model-dir",
        env = "HALO_AGENT_MODEL_DIRS",
        value_delimiter = ':'
    )]
    pub model_dirs: Option<Vec<PathBuf>>,
    /// The llama-server executable (a path, or a name looked up in PATH).
    #[arg(long, env = "HALO_AGENT_LLAMA_SERVER", value_name = "PATH")]
    pub llama_server: Option<PathBuf>,
    /// ggml-rpc-server, for this node's share of a model split across nodes
    /// [default: beside llama-server: the same build, as its RPC protocol
    /// requires].
    #[arg(long, env = "HALO_AGENT_RPC_SERVER", value_name = "PATH")]
    pub rpc_server: Option<PathBuf>,
    /// llama-fit-params, llama.cpp's own memory projection, which the
    /// controller checks its estimate against (ProjectMemory) [default:
    /// beside llama-server: the same build]. When it is missing the agent
    /// still runs and answers that the check is unavailable.
    #[arg(long, env = "HALO_AGENT_FIT_PARAMS_BIN", value_name = "PATH")]
    pub fit_params_bin: Option<PathBuf>,
    /// Ports given to instances, FIRST-LAST [default: 8100-8199].
    #[arg(long, env = "HALO_AGENT_PORT_RANGE", value_name = "FIRST-LAST")]
    pub port_range: Option<String>,
    /// Ports given to ggml-rpc-server (a split's helper share), FIRST-LAST,
    /// apart from port_range so a mesh ACL can let only split hosts reach
    /// them [default: port_range].
    #[arg(long, env = "HALO_AGENT_RPC_PORT_RANGE", value_name = "FIRST-LAST")]
    pub rpc_port_range: Option<String>,
    /// Address instances listen on (default: the listen address's host).
    #[arg(long, env = "HALO_AGENT_INSTANCE_HOST", value_name = "IP")]
    pub instance_host: Option<String>,
    /// Which web pages may call instances from a browser (CORS): `localhost`
    /// (pages served from this machine) or one origin such as
    /// https://chat.example.ts.net; never with credentials [default: localhost].
    #[arg(long, env = "HALO_AGENT_CORS_ORIGIN", value_name = "ORIGIN")]
    pub cors_origin: Option<String>,
    /// Memory held back for the OS and the agent, e.g. 8GiB [default: 4GiB].
    #[arg(long, env = "HALO_AGENT_RESERVE", value_name = "SIZE")]
    pub reserve: Option<String>,
    /// Memory PSI `some avg10` (percent of time a task stalled on memory)
    /// at or above which the node is under memory pressure: the controller
    /// places nothing new on it; 0 turns it off [default: 10].
    #[arg(long, env = "HALO_AGENT_PRESSURE_PSI_SOME", value_name = "PERCENT")]
    pub pressure_psi_some: Option<f64>,
    /// Real free memory (MemAvailable) below which the node is under
    /// memory pressure; 0 turns it off [default: 2GiB].
    #[arg(long, env = "HALO_AGENT_PRESSURE_MIN_AVAILABLE", value_name = "SIZE")]
    pub pressure_min_available: Option<String>,
    /// A memory cgroup directory (cgroup v1 memory hierarchy, or v2 with
    /// the memory controller enabled in its cgroup.subtree_control) the
    /// agent may create one child per instance in: exact OOM attribution
    /// and peak use per instance, and a limit when asked [default: off].
    #[arg(long, env = "HALO_AGENT_INSTANCE_CGROUP", value_name = "DIR")]
    pub instance_cgroup: Option<PathBuf>,
    /// Each instance's cgroup memory limit: `none`, `estimate` (its
    /// estimate plus the controller's margin) or a size such as 64GiB;
    /// needs instance_cgroup [default: none].
    #[arg(long, env = "HALO_AGENT_INSTANCE_MEMORY_LIMIT", value_name = "LIMIT")]
    pub instance_memory_limit: Option<String>,
    /// Root the memory probe reads /proc and /sys under [default: /].
    #[arg(long, env = "HALO_AGENT_PROBE_ROOT", value_name = "DIR")]
    pub probe_root: Option<PathBuf>,
    /// Where the agent keeps instance records, API keys and logs
    /// [default: /var/lib/halo-agent].
    #[arg(long, env = "HALO_AGENT_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Seconds a model may take to load before the instance fails [default: 600].
    #[arg(long, env = "HALO_AGENT_LOAD_TIMEOUT_SECS", value_name = "SECS")]
    pub load_timeout_secs: Option<u64>,
    /// Default period of memory samples on Watch streams [default: 5000].
    #[arg(long, env = "HALO_AGENT_MEMORY_SAMPLE_MS", value_name = "MS")]
    pub memory_sample_ms: Option<u64>,
    /// Seconds between SIGTERM and SIGKILL when stopping [default: 15].
    #[arg(long, env = "HALO_AGENT_STOP_TIMEOUT_SECS", value_name = "SECS")]
    pub stop_timeout_secs: Option<u64>,
    /// First restart delay after a failure; doubles up to the max [default: 1000].
    #[arg(long, env = "HALO_AGENT_RESTART_BACKOFF_MS", value_name = "MS")]
    pub restart_backoff_ms: Option<u64>,
    /// Longest restart delay [default: 60000].
    #[arg(long, env = "HALO_AGENT_RESTART_BACKOFF_MAX_MS", value_name = "MS")]
    pub restart_backoff_max_ms: Option<u64>,
    /// Seconds ready after which the back-off starts over [default: 60].
    #[arg(long, env = "HALO_AGENT_RESTART_STABLE_SECS", value_name = "SECS")]
    pub restart_stable_secs: Option<u64>,
    /// How often a ready llama-server's /health is probed [default: 5000].
    #[arg(long, env = "HALO_AGENT_HEALTH_PERIOD_MS", value_name = "MS")]
    pub health_period_ms: Option<u64>,
    /// How long one /health probe waits for an answer; at most the period
    /// [default: 2000].
    #[arg(long, env = "HALO_AGENT_HEALTH_TIMEOUT_MS", value_name = "MS")]
    pub health_timeout_ms: Option<u64>,
    /// Failed /health probes in a row after which a ready llama-server is
    /// unhealthy, killed and restarted [default: 3].
    #[arg(long, env = "HALO_AGENT_HEALTH_FAILURES", value_name = "N")]
    pub health_failures: Option<u32>,
    /// Size at which an instance's log file is rotated [default: 64MiB].
    #[arg(long, env = "HALO_AGENT_MAX_LOG_SIZE", value_name = "SIZE")]
    pub max_log_size: Option<String>,
    /// Most bytes per second a model copy into this node reads from the
    /// sender, e.g. 100MiB; 0 for no cap [default: 0].
    #[arg(long, env = "HALO_AGENT_COPY_RATE_LIMIT", value_name = "SIZE")]
    pub copy_rate_limit: Option<String>,
    /// Free space a model copy into this node must leave on the disk of
    /// the first model directory [default: 1GiB].
    #[arg(long, env = "HALO_AGENT_COPY_DISK_MARGIN", value_name = "SIZE")]
    pub copy_disk_margin: Option<String>,
    /// Extra llama-server flags requests may name, e.g. "--jinja" or
    /// "--cache-reuse 256"; repeat or comma-separate.
    #[arg(
        long = "allow-flag",
        env = "HALO_AGENT_ALLOWED_FLAGS",
        value_delimiter = ',',
        allow_hyphen_values = true
    )]
    pub allowed_flags: Option<Vec<String>>,
    /// This daemon's certificate (PEM) for mutual TLS; with tls_key and
    /// tls_ca the gRPC server speaks only TLS and requires client
    /// certificates signed by tls_ca. Required unless
    /// --insecure-loopback-only.
    #[arg(long, env = "HALO_AGENT_TLS_CERT", value_name = "PEM")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "HALO_AGENT_TLS_KEY", value_name = "PEM")]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that signs every halo certificate (`haloctl certs init`).
    #[arg(long, env = "HALO_AGENT_TLS_CA", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Serve plaintext gRPC, without TLS: refused unless the listen address
    /// is loopback (a local cluster on one machine). Anything else needs
    /// tls_cert/key/ca.
    #[arg(long, env = "HALO_AGENT_INSECURE_LOOPBACK_ONLY")]
    pub insecure_loopback_only: bool,
    /// Serve halo's OpenAI-compatible gateway on this address (one URL for
    /// every model and editor mode in the cluster); off when unset.
    #[arg(long, env = "HALO_AGENT_GATEWAY_LISTEN", value_name = "ADDR")]
    pub gateway_listen: Option<String>,
    /// Controllers the gateway reads its routing table from (URLs); needed
    /// with gateway_listen. Repeat or comma-separate.
    #[arg(
        long = "gateway-controller",
        env = "HALO_AGENT_GATEWAY_CONTROLLERS",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub gateway_controllers: Option<Vec<String>>,
    /// HTTPS certificate of the gateway (PEM) [default: tls_cert, when set].
    #[arg(long, env = "HALO_AGENT_GATEWAY_TLS_CERT", value_name = "PEM")]
    pub gateway_tls_cert: Option<PathBuf>,
    /// Its key (PEM) [default: tls_key, when set].
    #[arg(long, env = "HALO_AGENT_GATEWAY_TLS_KEY", value_name = "PEM")]
    pub gateway_tls_key: Option<PathBuf>,
    /// Interfaces (the WireGuard mesh, e.g. tailscale0) on whose addresses
    /// the gateway may serve plain HTTP; otherwise plain HTTP only on
    /// loopback. Repeat or comma-separate.
    #[arg(
        long = "gateway-plain-http-on",
        env = "HALO_AGENT_GATEWAY_PLAIN_HTTP_ON",
        value_delimiter = ',',
        value_name = "IFACE"
    )]
    pub gateway_plain_http_on: Option<Vec<String>>,
    /// Serve Prometheus metrics at /metrics on this address; off when
    /// unset. Plain HTTP on loopback only; elsewhere HTTPS with this
    /// agent's certificate, a client certificate from tls_ca required.
    #[arg(long, env = "HALO_AGENT_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,
}

/// A byte size in a config file: an integer, or a string such as `8GiB`.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum SizeValue {
    Bytes(u64),
    Text(String),
}

impl SizeValue {
    fn into_text(self) -> String {
        match self {
            SizeValue::Bytes(b) => b.to_string(),
            SizeValue::Text(t) => t,
        }
    }
}

/// The config file's schema: every key optional, unknown keys refused.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    node_name: Option<String>,
    listen: Option<String>,
    roles: Option<Vec<String>>,
    labels: Option<BTreeMap<String, String>>,
    model_dirs: Option<Vec<PathBuf>>,
    llama_server: Option<PathBuf>,
    rpc_server: Option<PathBuf>,
    fit_params_bin: Option<PathBuf>,
    port_range: Option<String>,
    rpc_port_range: Option<String>,
    instance_host: Option<String>,
    cors_origin: Option<String>,
    reserve: Option<SizeValue>,
    pressure_psi_some: Option<f64>,
    pressure_min_available: Option<SizeValue>,
    instance_cgroup: Option<PathBuf>,
    instance_memory_limit: Option<SizeValue>,
    probe_root: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    load_timeout_secs: Option<u64>,
    memory_sample_ms: Option<u64>,
    stop_timeout_secs: Option<u64>,
    restart_backoff_ms: Option<u64>,
    restart_backoff_max_ms: Option<u64>,
    restart_stable_secs: Option<u64>,
    health_period_ms: Option<u64>,
    health_timeout_ms: Option<u64>,
    health_failures: Option<u32>,
    max_log_size: Option<SizeValue>,
    copy_rate_limit: Option<SizeValue>,
    copy_disk_margin: Option<SizeValue>,
    allowed_flags: Option<Vec<String>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_ca: Option<PathBuf>,
    insecure_loopback_only: Option<bool>,
    gateway_listen: Option<String>,
    gateway_controllers: Option<Vec<String>>,
    gateway_tls_cert: Option<PathBuf>,
    gateway_tls_key: Option<PathBuf>,
    gateway_plain_http_on: Option<Vec<String>>,
    metrics_listen: Option<String>,
}

/// An inclusive range of TCP ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    /// First port.
    pub first: u16,
    /// Last port (inclusive).
    pub last: u16,
}

impl PortRange {
    /// Whether `port` is in the range.
    pub fn contains(&self, port: u16) -> bool {
        (self.first..=self.last).contains(&port)
    }

    /// Every port, in order.
    pub fn iter(&self) -> impl Iterator<Item = u16> {
        self.first..=self.last
    }

    /// Number of ports.
    pub fn len(&self) -> usize {
        usize::from(self.last - self.first) + 1
    }

    /// Never empty (first ≤ last is validated); here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl std::fmt::Display for PortRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// One allow-listed extra flag: the entry as configured (the name requests
/// use) and the argv words it expands to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedFlag {
    /// The entry, e.g. `--cache-reuse 256`.
    pub entry: String,
    /// Its words, e.g. `["--cache-reuse", "256"]`.
    pub argv: Vec<String>,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Node name.
    pub node_name: String,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Roles.
    pub roles: Vec<String>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Model directories, canonical.
    pub model_dirs: Vec<PathBuf>,
    /// The llama-server executable, canonical.
    pub llama_server: PathBuf,
    /// The ggml-rpc-server executable: canonical when set explicitly (it
    /// must then exist); by default `ggml-rpc-server` beside `llama_server`,
    /// which may be absent (the node then cannot take a share of a split).
    pub rpc_server: PathBuf,
    /// llama-fit-params: `fit_params_bin` as given (made absolute), by
    /// default beside `llama_server`; it may be absent (ProjectMemory then
    /// answers that the projection is unavailable).
    pub fit_params_bin: PathBuf,
    /// Longest a llama-fit-params run may take before it is killed.
    pub fit_params_timeout: Duration,
    /// Instance ports.
    pub port_range: PortRange,
    /// ggml-rpc-server ports (by default `port_range`).
    pub rpc_port_range: PortRange,
    /// Address instances listen on.
    pub instance_host: IpAddr,
    /// llama-server's `--cors-origins`: `localhost` or one origin.
    pub cors_origin: String,
    /// Bytes held back for the OS.
    pub reserve_bytes: u64,
    /// PSI `some avg10` (percent) at or above which the node is under
    /// memory pressure (0: never).
    pub pressure_psi_some: f64,
    /// MemAvailable below which the node is under memory pressure (0: never).
    pub pressure_min_available_bytes: u64,
    /// One memory cgroup per instance, when configured.
    pub instance_cgroup: Option<InstanceCgroupConfig>,
    /// Memory probe root.
    pub probe_root: PathBuf,
    /// State directory, canonical.
    pub state_dir: PathBuf,
    /// Longest model load.
    pub load_timeout: Duration,
    /// Default memory sample period.
    pub memory_sample_period: Duration,
    /// SIGTERM → SIGKILL grace.
    pub stop_timeout: Duration,
    /// First restart delay.
    pub restart_backoff: Duration,
    /// Longest restart delay.
    pub restart_backoff_max: Duration,
    /// Ready time after which the back-off resets.
    pub restart_stable: Duration,
    /// Period of the liveness probe of a ready llama-server.
    pub health_period: Duration,
    /// Deadline of one liveness probe.
    pub health_timeout: Duration,
    /// Failed probes in a row that make a ready instance unhealthy.
    pub health_failures: u32,
    /// Log rotation size.
    pub max_log_bytes: u64,
    /// Bytes per second a copy into this node reads (0: no cap).
    pub copy_rate_limit_bytes: u64,
    /// Free bytes a copy into this node leaves on the disk.
    pub copy_disk_margin_bytes: u64,
    /// Extra flags requests may name.
    pub allowed_flags: Vec<AllowedFlag>,
    /// Mutual TLS files, when configured (all three were set).
    pub tls: Option<proto::tls::TlsFiles>,
    /// The gateway, when `gateway_listen` is set.
    pub gateway: Option<GatewayConfig>,
    /// Where `/metrics` is served, when `metrics_listen` is set (HTTPS
    /// with client certificates when `tls` is set, else loopback only).
    pub metrics_listen: Option<SocketAddr>,
}

impl Config {
    /// Reads the file named by `args.config` (if any), lays env and flags
    /// over it, and validates everything. Creates the state directory.
    ///
    /// The steps, in the order their errors are reported: the node's name,
    /// address, roles and labels; the model directories and executables;
    /// ports and instance addresses; memory sizes; the probe root and state
    /// directory; timings; allowed flags; TLS.
    pub fn resolve(args: Args) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_toml(path, TomlErrors::Line)?,
            None => FileConfig::default(),
        };
        let s = Settings::merge(args, file);
        let node = NodeKeys::check(s.node_name, s.listen, s.roles, s.labels)?;
        let model_dirs = check_model_dirs(s.model_dirs.unwrap_or_default())?;
        let (llama_server, rpc_server) = executables(s.llama_server, s.rpc_server)?;
        let fit_params_bin = fit_params_path(&llama_server, s.fit_params_bin);
        let ports = Ports::check(
            node.listen,
            s.port_range,
            s.rpc_port_range,
            s.instance_host,
            s.cors_origin,
        )?;
        let (reserve_bytes, max_log_bytes) = sizes(s.reserve, s.max_log_size)?;
        let (copy_rate_limit_bytes, copy_disk_margin_bytes) =
            copy_sizes(s.copy_rate_limit, s.copy_disk_margin)?;
        let (pressure_psi_some, pressure_min_available_bytes) =
            pressure(s.pressure_psi_some, s.pressure_min_available)?;
        let instance_cgroup = instance_cgroup(s.instance_cgroup, s.instance_memory_limit)?;
        let (probe_root, state_dir) = directories(s.probe_root, s.state_dir, &model_dirs)?;
        let t = Timings::check(&s.timings)?;
        let allowed_flags = check_allowed_flags(s.allowed_flags.unwrap_or_default())?;
        let tls = tls(s.tls, s.insecure_loopback_only, node.listen)?;
        let gateway = gateway(s.gateway, tls.as_ref())?;
        let metrics_listen = metrics_listen(s.metrics_listen, tls.is_some())?;
        Ok(Config {
            tls,
            gateway,
            metrics_listen,
            node_name: node.node_name,
            listen: node.listen,
            roles: node.roles,
            labels: node.labels,
            model_dirs,
            llama_server,
            rpc_server,
            fit_params_bin,
            fit_params_timeout: DEFAULT_FIT_PARAMS_TIMEOUT,
            port_range: ports.port_range,
            rpc_port_range: ports.rpc_port_range,
            instance_host: ports.instance_host,
            cors_origin: ports.cors_origin,
            reserve_bytes,
            pressure_psi_some,
            pressure_min_available_bytes,
            instance_cgroup,
            probe_root,
            state_dir,
            load_timeout: t.load_timeout,
            memory_sample_period: t.memory_sample_period,
            stop_timeout: t.stop_timeout,
            restart_backoff: t.restart_backoff,
            restart_backoff_max: t.restart_backoff_max,
            restart_stable: t.restart_stable,
            health_period: t.health_period,
            health_timeout: t.health_timeout,
            health_failures: t.health_failures,
            max_log_bytes,
            copy_rate_limit_bytes,
            copy_disk_margin_bytes,
            allowed_flags,
        })
    }

    /// The host part of instance endpoints: the instance host, or the node
    /// name when instances listen on every address.
    pub fn endpoint_host(&self) -> String {
        match self.instance_host {
            ip if ip.is_unspecified() => self.node_name.clone(),
            IpAddr::V6(ip) => format!("[{ip}]"),
            IpAddr::V4(ip) => ip.to_string(),
        }
    }
}

/// Labels as given: `key=value` pairs from flags or env, or the file's table.
#[derive(Debug)]
enum Labels {
    Pairs(Vec<String>),
    Table(BTreeMap<String, String>),
}

/// The timing keys, each from a flag, env or the file.
#[derive(Debug, Default)]
struct TimingKeys {
    load_timeout_secs: Option<u64>,
    memory_sample_ms: Option<u64>,
    stop_timeout_secs: Option<u64>,
    restart_backoff_ms: Option<u64>,
    restart_backoff_max_ms: Option<u64>,
    restart_stable_secs: Option<u64>,
    health_period_ms: Option<u64>,
    health_timeout_ms: Option<u64>,
    health_failures: Option<u32>,
}

/// Every key with the layers merged (file < env < flag; clap already put
/// env under flag), not yet checked.
#[derive(Debug)]
struct Settings {
    node_name: Option<String>,
    listen: Option<String>,
    roles: Option<Vec<String>>,
    labels: Option<Labels>,
    model_dirs: Option<Vec<PathBuf>>,
    llama_server: Option<PathBuf>,
    rpc_server: Option<PathBuf>,
    fit_params_bin: Option<PathBuf>,
    port_range: Option<String>,
    rpc_port_range: Option<String>,
    instance_host: Option<String>,
    cors_origin: Option<String>,
    reserve: Option<String>,
    pressure_psi_some: Option<f64>,
    pressure_min_available: Option<String>,
    instance_cgroup: Option<PathBuf>,
    instance_memory_limit: Option<String>,
    max_log_size: Option<String>,
    copy_rate_limit: Option<String>,
    copy_disk_margin: Option<String>,
    probe_root: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    timings: TimingKeys,
    allowed_flags: Option<Vec<String>>,
    /// `tls_cert`, `tls_key`, `tls_ca`.
    tls: (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>),
    insecure_loopback_only: bool,
    gateway: GatewayKeys,
    metrics_listen: Option<String>,
}

/// The `gateway_*` keys as given.
#[derive(Debug, Default)]
struct GatewayKeys {
    listen: Option<String>,
    controllers: Option<Vec<String>>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    plain_http_on: Option<Vec<String>>,
}

/// The gateway an agent serves.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Where it listens.
    pub listen: SocketAddr,
    /// Controllers it reads routes from.
    pub controllers: Vec<String>,
    /// HTTPS certificate and key; `None` = plain HTTP (loopback or a named
    /// mesh interface only).
    pub https: Option<(PathBuf, PathBuf)>,
}

impl GatewayConfig {
    /// The URL editors use.
    pub fn url(&self) -> String {
        let scheme = if self.https.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.listen)
    }
}

/// Checks the `gateway_*` keys: an address, at least one controller URL,
/// and HTTPS (its own certificate, else the agent's) or plain HTTP where
/// that is allowed.
fn gateway(
    k: GatewayKeys,
    tls: Option<&proto::tls::TlsFiles>,
) -> Result<Option<GatewayConfig>, ConfigError> {
    let Some(text) = k.listen.filter(|l| !l.trim().is_empty()) else {
        return Ok(None);
    };
    let listen: SocketAddr = text.parse().map_err(|_| {
        invalid(
            "gateway_listen",
            format!("`{text}` is not an address such as 127.0.0.1:8080"),
        )
    })?;
    let controllers: Vec<String> = k
        .controllers
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.trim().to_owned())
        .filter(|c| !c.is_empty())
        .collect();
    if controllers.is_empty() {
        return Err(invalid(
            "gateway_controllers",
            "gateway_listen needs the controllers to read routes from, e.g. \"http://127.0.0.1:7300\"",
        ));
    }
    if let Some(c) = controllers
        .iter()
        .find(|c| !(c.starts_with("http://") || c.starts_with("https://")))
    {
        return Err(invalid(
            "gateway_controllers",
            format!("`{c}` is not a URL such as http://127.0.0.1:7300"),
        ));
    }
    let https = match (k.tls_cert, k.tls_key) {
        (Some(c), Some(k)) => Some((c, k)),
        (None, None) => tls.map(|t| (t.cert.clone(), t.key.clone())),
        _ => {
            return Err(invalid(
                "gateway_tls_cert",
                "set gateway_tls_cert and gateway_tls_key together",
            ));
        }
    };
    if https.is_none() {
        gateway::check_plain_listen(listen, &k.plain_http_on.unwrap_or_default())
            .map_err(|e| invalid("gateway_listen", e))?;
    }
    Ok(Some(GatewayConfig {
        listen,
        controllers,
        https,
    }))
}

/// Checks `metrics_listen`: an address, plain HTTP only on loopback
/// unless the agent has its mutual TLS (`tls`).
fn metrics_listen(text: Option<String>, tls: bool) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(text) = text.filter(|l| !l.trim().is_empty()) else {
        return Ok(None);
    };
    let addr: SocketAddr = text.trim().parse().map_err(|_| {
        invalid(
            "metrics_listen",
            format!("`{text}` is not an address such as 127.0.0.1:9301"),
        )
    })?;
    proto::metrics::check_listen(addr, tls).map_err(|e| invalid("metrics_listen", e))?;
    Ok(Some(addr))
}

impl Settings {
    /// `args` (flags over env) laid over `file`.
    fn merge(args: Args, file: FileConfig) -> Settings {
        Settings {
            node_name: args.node_name.or(file.node_name),
            listen: args.listen.or(file.listen),
            roles: args.roles.or(file.roles),
            labels: match args.labels {
                Some(pairs) => Some(Labels::Pairs(pairs)),
                None => file.labels.map(Labels::Table),
            },
            model_dirs: args.model_dirs.or(file.model_dirs),
            llama_server: args.llama_server.or(file.llama_server),
            rpc_server: args.rpc_server.or(file.rpc_server),
            fit_params_bin: args.fit_params_bin.or(file.fit_params_bin),
            port_range: args.port_range.or(file.port_range),
            rpc_port_range: args.rpc_port_range.or(file.rpc_port_range),
            instance_host: args.instance_host.or(file.instance_host),
            cors_origin: args.cors_origin.or(file.cors_origin),
            reserve: args.reserve.or(file.reserve.map(SizeValue::into_text)),
            pressure_psi_some: args.pressure_psi_some.or(file.pressure_psi_some),
            pressure_min_available: args
                .pressure_min_available
                .or(file.pressure_min_available.map(SizeValue::into_text)),
            instance_cgroup: args.instance_cgroup.or(file.instance_cgroup),
            instance_memory_limit: args
                .instance_memory_limit
                .or(file.instance_memory_limit.map(SizeValue::into_text)),
            max_log_size: args
                .max_log_size
                .or(file.max_log_size.map(SizeValue::into_text)),
            copy_rate_limit: args
                .copy_rate_limit
                .or(file.copy_rate_limit.map(SizeValue::into_text)),
            copy_disk_margin: args
                .copy_disk_margin
                .or(file.copy_disk_margin.map(SizeValue::into_text)),
            probe_root: args.probe_root.or(file.probe_root),
            state_dir: args.state_dir.or(file.state_dir),
            timings: TimingKeys {
                load_timeout_secs: args.load_timeout_secs.or(file.load_timeout_secs),
                memory_sample_ms: args.memory_sample_ms.or(file.memory_sample_ms),
                stop_timeout_secs: args.stop_timeout_secs.or(file.stop_timeout_secs),
                restart_backoff_ms: args.restart_backoff_ms.or(file.restart_backoff_ms),
                restart_backoff_max_ms: args.restart_backoff_max_ms.or(file.restart_backoff_max_ms),
                restart_stable_secs: args.restart_stable_secs.or(file.restart_stable_secs),
                health_period_ms: args.health_period_ms.or(file.health_period_ms),
                health_timeout_ms: args.health_timeout_ms.or(file.health_timeout_ms),
                health_failures: args.health_failures.or(file.health_failures),
            },
            allowed_flags: args.allowed_flags.or(file.allowed_flags),
            tls: (
                args.tls_cert.or(file.tls_cert),
                args.tls_key.or(file.tls_key),
                args.tls_ca.or(file.tls_ca),
            ),
            insecure_loopback_only: args.insecure_loopback_only
                || file.insecure_loopback_only.unwrap_or(false),
            gateway: GatewayKeys {
                listen: args.gateway_listen.or(file.gateway_listen),
                controllers: args.gateway_controllers.or(file.gateway_controllers),
                tls_cert: args.gateway_tls_cert.or(file.gateway_tls_cert),
                tls_key: args.gateway_tls_key.or(file.gateway_tls_key),
                plain_http_on: args.gateway_plain_http_on.or(file.gateway_plain_http_on),
            },
            metrics_listen: args.metrics_listen.or(file.metrics_listen),
        }
    }
}

/// Who the node is and where it listens.
struct NodeKeys {
    node_name: String,
    listen: SocketAddr,
    roles: Vec<String>,
    labels: BTreeMap<String, String>,
}

impl NodeKeys {
    /// The node name (default: the host name), listen address, roles and
    /// labels, checked.
    fn check(
        node_name: Option<String>,
        listen: Option<String>,
        roles: Option<Vec<String>>,
        labels: Option<Labels>,
    ) -> Result<NodeKeys, ConfigError> {
        let node_name = match node_name {
            Some(n) => n,
            None => hostname()
                .ok_or_else(|| invalid("node_name", "not set and the host name is unreadable"))?,
        };
        if node_name.is_empty()
            || node_name.len() > 63
            || !node_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(invalid(
                "node_name",
                format!("`{node_name}`: use 1-63 characters of A-Z a-z 0-9 - _ ."),
            ));
        }
        let listen_text = listen.unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen: SocketAddr = listen_text.parse().map_err(|_| {
            invalid(
                "listen",
                format!("`{listen_text}` is not an address such as 127.0.0.1:7301"),
            )
        })?;
        let roles = roles.unwrap_or_default();
        for r in &roles {
            check_word("roles", r)?;
        }
        let labels = match labels {
            Some(Labels::Pairs(pairs)) => parse_labels(&pairs)?,
            Some(Labels::Table(t)) => t,
            None => BTreeMap::new(),
        };
        for (k, v) in &labels {
            check_word("labels", k)?;
            if v.len() > 256 || v.contains('\0') {
                return Err(invalid(
                    "labels",
                    format!("value of `{k}` is too long or has NUL"),
                ));
            }
        }
        Ok(NodeKeys {
            node_name,
            listen,
            roles,
            labels,
        })
    }
}

/// How long one llama-fit-params run may take: it reads only the header
/// and builds buffer layouts, seconds even for the largest models (and
/// under the controller's 30 s deadline for one agent call).
pub const DEFAULT_FIT_PARAMS_TIMEOUT: Duration = Duration::from_secs(20);

/// llama-fit-params: `given` made absolute (relative to the working
/// directory; it need not exist), else beside `llama_server`.
fn fit_params_path(llama_server: &Path, given: Option<PathBuf>) -> PathBuf {
    match given {
        Some(p) if p.is_absolute() => p,
        Some(p) => std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p),
        None => llama_server.with_file_name(DEFAULT_FIT_PARAMS),
    }
}

/// llama-server (default: found in PATH) and ggml-rpc-server (default:
/// beside llama-server, which may be absent).
fn executables(
    llama_server: Option<PathBuf>,
    rpc_server: Option<PathBuf>,
) -> Result<(PathBuf, PathBuf), ConfigError> {
    let llama_server = llama_server.unwrap_or_else(|| PathBuf::from("llama-server"));
    let llama_server = find_executable("llama_server", &llama_server)?;
    let rpc_server = match rpc_server {
        Some(p) => find_executable("rpc_server", &p)?,
        None => llama_server.with_file_name(DEFAULT_RPC_SERVER),
    };
    Ok((llama_server, rpc_server))
}

/// Where instances listen and who may call them.
struct Ports {
    port_range: PortRange,
    rpc_port_range: PortRange,
    instance_host: IpAddr,
    cors_origin: String,
}

impl Ports {
    /// The port ranges (apart from the `listen` port), the instance host
    /// (default: the listen address's) and the CORS origin.
    fn check(
        listen: SocketAddr,
        port_range: Option<String>,
        rpc_port_range: Option<String>,
        instance_host: Option<String>,
        cors_origin: Option<String>,
    ) -> Result<Ports, ConfigError> {
        let range_text = port_range.unwrap_or_else(|| DEFAULT_PORT_RANGE.into());
        let port_range = parse_port_range(&range_text)?;
        if port_range.contains(listen.port()) {
            return Err(invalid(
                "port_range",
                format!("{port_range} includes the listen port {}", listen.port()),
            ));
        }
        let rpc_port_range = match rpc_port_range {
            None => port_range,
            Some(t) => {
                let r = parse_port_range(&t)
                    .map_err(|_| invalid("rpc_port_range", format!("`{t}` is not FIRST-LAST")))?;
                if r.contains(listen.port()) {
                    return Err(invalid(
                        "rpc_port_range",
                        format!("{r} includes the listen port {}", listen.port()),
                    ));
                }
                r
            }
        };
        let instance_host = match instance_host {
            Some(h) => h
                .parse()
                .map_err(|_| invalid("instance_host", format!("`{h}` is not an IP address")))?,
            None => listen.ip(),
        };
        let cors_origin = cors_origin.unwrap_or_else(|| "localhost".into());
        check_origin(&cors_origin).map_err(|r| invalid("cors_origin", r))?;
        Ok(Ports {
            port_range,
            rpc_port_range,
            instance_host,
            cors_origin,
        })
    }
}

/// A cgroup hierarchy's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// cgroup v1's memory controller hierarchy.
    V1,
    /// The cgroup v2 unified hierarchy.
    V2,
}

/// How each instance's memory cgroup is limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryLimit {
    /// No limit: accounting and OOM attribution only.
    None,
    /// The instance's estimate plus the controller's margin (no limit when
    /// the start request carries no estimate).
    Estimate,
    /// A fixed size, bytes.
    Bytes(u64),
}

/// One memory cgroup per instance under `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceCgroupConfig {
    /// The directory the agent creates `halo-INSTANCE` children in.
    pub dir: PathBuf,
    /// Its hierarchy's version.
    pub version: CgroupVersion,
    /// The limit each child gets.
    pub limit: MemoryLimit,
}

/// `instance_cgroup` (an existing memory cgroup directory: v1 when it holds
/// `memory.limit_in_bytes`, v2 when its `cgroup.subtree_control` enables
/// `memory`) and `instance_memory_limit` (needs the first).
fn instance_cgroup(
    dir: Option<PathBuf>,
    limit: Option<String>,
) -> Result<Option<InstanceCgroupConfig>, ConfigError> {
    let limit =
        match limit.as_deref().map(str::trim) {
            None | Some("none") => MemoryLimit::None,
            Some("estimate") => MemoryLimit::Estimate,
            Some(t) => MemoryLimit::Bytes(parse_size(t).map_err(|r| {
                invalid("instance_memory_limit", format!("{r} (or none, estimate)"))
            })?),
        };
    let Some(dir) = dir else {
        if limit != MemoryLimit::None {
            return Err(invalid(
                "instance_memory_limit",
                "needs instance_cgroup (the cgroup directory instances are limited in)",
            ));
        }
        return Ok(None);
    };
    let version = if dir.join("memory.limit_in_bytes").is_file() {
        CgroupVersion::V1
    } else if dir.join("cgroup.subtree_control").is_file() {
        let enabled =
            std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
        if !enabled.split_whitespace().any(|c| c == "memory") {
            return Err(invalid(
                "instance_cgroup",
                format!(
                    "{} does not enable the memory controller for its children \
                     (echo +memory > {}/cgroup.subtree_control)",
                    dir.display(),
                    dir.display()
                ),
            ));
        }
        CgroupVersion::V2
    } else {
        return Err(invalid(
            "instance_cgroup",
            format!(
                "{} is not a memory cgroup directory (no memory.limit_in_bytes, no \
                 cgroup.subtree_control)",
                dir.display()
            ),
        ));
    };
    Ok(Some(InstanceCgroupConfig {
        dir,
        version,
        limit,
    }))
}

/// The memory pressure thresholds: PSI `some avg10` percent (default 10,
/// 0..=100) and the MemAvailable floor in bytes (default 2 GiB); 0 turns
/// either off.
fn pressure(psi: Option<f64>, min_available: Option<String>) -> Result<(f64, u64), ConfigError> {
    let psi = psi.unwrap_or(10.0);
    if !psi.is_finite() || !(0.0..=100.0).contains(&psi) {
        return Err(invalid(
            "pressure_psi_some",
            format!("{psi} is not a percentage in 0..=100"),
        ));
    }
    let floor = match min_available {
        Some(t) => parse_size(&t).map_err(|r| invalid("pressure_min_available", r))?,
        None => 2 << 30,
    };
    Ok((psi, floor))
}

/// The reserve (default 4 GiB) and the log rotation size (default 64 MiB,
/// at least 64 KiB), in bytes.
fn sizes(reserve: Option<String>, max_log_size: Option<String>) -> Result<(u64, u64), ConfigError> {
    let reserve_bytes = match reserve {
        Some(t) => parse_size(&t).map_err(|r| invalid("reserve", r))?,
        None => 4 << 30,
    };
    let max_log_bytes = match max_log_size {
        Some(t) => parse_size(&t).map_err(|r| invalid("max_log_size", r))?,
        None => 64 << 20,
    };
    if max_log_bytes < 64 << 10 {
        return Err(invalid("max_log_size", "must be at least 64KiB"));
    }
    Ok((reserve_bytes, max_log_bytes))
}

/// The copy cap (default none) and disk margin (default 1 GiB).
fn copy_sizes(rate: Option<String>, margin: Option<String>) -> Result<(u64, u64), ConfigError> {
    let rate = match rate {
        Some(t) => parse_size(&t).map_err(|r| invalid("copy_rate_limit", r))?,
        None => 0,
    };
    if rate > 0 && rate < 64 << 10 {
        return Err(invalid(
            "copy_rate_limit",
            "must be 0 (no cap) or at least 64KiB",
        ));
    }
    let margin = match margin {
        Some(t) => parse_size(&t).map_err(|r| invalid("copy_disk_margin", r))?,
        None => 1 << 30,
    };
    Ok((rate, margin))
}

/// The probe root (an existing directory) and the state directory
/// (created, writable, apart from every model directory).
fn directories(
    probe_root: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    model_dirs: &[PathBuf],
) -> Result<(PathBuf, PathBuf), ConfigError> {
    let probe_root = probe_root.unwrap_or_else(|| PathBuf::from("/"));
    if !probe_root.is_dir() {
        return Err(invalid(
            "probe_root",
            format!("{} is not a directory", probe_root.display()),
        ));
    }
    let state_dir = state_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR));
    let state_dir = prepare_state_dir(&state_dir)?;
    for d in model_dirs {
        if state_dir.starts_with(d) || d.starts_with(&state_dir) {
            return Err(invalid(
                "state_dir",
                format!("{} overlaps model dir {}", state_dir.display(), d.display()),
            ));
        }
    }
    Ok((probe_root, state_dir))
}

/// The instance timings, checked.
struct Timings {
    load_timeout: Duration,
    memory_sample_period: Duration,
    stop_timeout: Duration,
    restart_backoff: Duration,
    restart_backoff_max: Duration,
    restart_stable: Duration,
    health_period: Duration,
    health_timeout: Duration,
    health_failures: u32,
}

impl Timings {
    /// Each key within its bounds (or its default), the back-off's maximum
    /// at least its start, and a health probe's timeout at most its period.
    fn check(k: &TimingKeys) -> Result<Timings, ConfigError> {
        let secs = |key, v: Option<u64>, default, max| -> Result<Duration, ConfigError> {
            let v = v.unwrap_or(default);
            if v == 0 || v > max {
                return Err(invalid(key, format!("{v} is outside 1..={max}")));
            }
            Ok(Duration::from_secs(v))
        };
        let millis = |key, v: Option<u64>, default, min, max| -> Result<Duration, ConfigError> {
            let v = v.unwrap_or(default);
            if v < min || v > max {
                return Err(invalid(key, format!("{v} is outside {min}..={max}")));
            }
            Ok(Duration::from_millis(v))
        };
        let load_timeout = secs("load_timeout_secs", k.load_timeout_secs, 600, 7 * 86_400)?;
        let memory_sample_period = millis(
            "memory_sample_ms",
            k.memory_sample_ms,
            5_000,
            100,
            3_600_000,
        )?;
        let stop_timeout = secs("stop_timeout_secs", k.stop_timeout_secs, 15, 3_600)?;
        let restart_backoff = millis(
            "restart_backoff_ms",
            k.restart_backoff_ms,
            1_000,
            10,
            3_600_000,
        )?;
        let restart_backoff_max = millis(
            "restart_backoff_max_ms",
            k.restart_backoff_max_ms,
            60_000,
            10,
            86_400_000,
        )?;
        if restart_backoff_max < restart_backoff {
            return Err(invalid(
                "restart_backoff_max_ms",
                "is smaller than restart_backoff_ms",
            ));
        }
        let restart_stable = secs("restart_stable_secs", k.restart_stable_secs, 60, 86_400)?;
        let health_period = millis(
            "health_period_ms",
            k.health_period_ms,
            5_000,
            100,
            3_600_000,
        )?;
        let health_timeout = millis("health_timeout_ms", k.health_timeout_ms, 2_000, 10, 600_000)?;
        if health_timeout > health_period {
            return Err(invalid(
                "health_timeout_ms",
                "is longer than health_period_ms (one probe must end before the next)",
            ));
        }
        let health_failures = k.health_failures.unwrap_or(3);
        if !(1..=100).contains(&health_failures) {
            return Err(invalid(
                "health_failures",
                format!("{health_failures} is outside 1..=100"),
            ));
        }
        Ok(Timings {
            load_timeout,
            memory_sample_period,
            stop_timeout,
            restart_backoff,
            restart_backoff_max,
            restart_stable,
            health_period,
            health_timeout,
            health_failures,
        })
    }
}

/// Mutual TLS from its three files (all or none, read and checked), and
/// plaintext only on a loopback `listen` with `insecure_loopback_only`.
fn tls(
    (cert, key, ca): (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>),
    insecure: bool,
    listen: SocketAddr,
) -> Result<Option<proto::tls::TlsFiles>, ConfigError> {
    let tls = proto::tls::TlsFiles::from_parts(cert, key, ca)
        .map_err(|e| invalid("tls", e.to_string()))?;
    if let Some(t) = &tls {
        t.check().map_err(|e| invalid("tls", e.to_string()))?;
    }
    proto::transport::check(tls.is_some(), insecure, listen, &[]).map_err(|e| invalid("tls", e))?;
    Ok(tls)
}

fn check_word(key: &'static str, w: &str) -> Result<(), ConfigError> {
    if w.is_empty()
        || w.len() > 63
        || !w
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
    {
        return Err(invalid(
            key,
            format!("`{w}`: use 1-63 characters of A-Z a-z 0-9 - _ . /"),
        ));
    }
    Ok(())
}

fn parse_labels(pairs: &[String]) -> Result<BTreeMap<String, String>, ConfigError> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| invalid("labels", format!("`{p}` is not key=value")))
        })
        .collect()
}

fn check_model_dirs(dirs: Vec<PathBuf>) -> Result<Vec<PathBuf>, ConfigError> {
    if dirs.is_empty() {
        return Err(invalid(
            "model_dirs",
            "at least one model directory is needed",
        ));
    }
    let mut out: Vec<PathBuf> = Vec::new();
    for d in dirs {
        let c = d
            .canonicalize()
            .map_err(|e| invalid("model_dirs", format!("{}: {e}", d.display())))?;
        if !c.is_dir() {
            return Err(invalid(
                "model_dirs",
                format!("{} is not a directory", d.display()),
            ));
        }
        if let Some(o) = out.iter().find(|o| o.starts_with(&c) || c.starts_with(o)) {
            return Err(invalid(
                "model_dirs",
                format!("{} and {} overlap", o.display(), c.display()),
            ));
        }
        out.push(c);
    }
    Ok(out)
}

/// Whether `p` is a file someone may execute.
pub fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn find_executable(key: &'static str, p: &Path) -> Result<PathBuf, ConfigError> {
    let candidates: Vec<PathBuf> = if p.components().count() > 1 || p.is_absolute() {
        vec![p.to_owned()]
    } else {
        std::env::var_os("PATH")
            .map(|path| std::env::split_paths(&path).map(|d| d.join(p)).collect())
            .unwrap_or_default()
    };
    for c in &candidates {
        if is_executable(c) {
            return c
                .canonicalize()
                .map_err(|e| invalid(key, format!("{}: {e}", c.display())));
        }
    }
    Err(invalid(
        key,
        format!("{}: no such executable file", p.display()),
    ))
}

fn parse_port_range(t: &str) -> Result<PortRange, ConfigError> {
    let bad = || {
        invalid(
            "port_range",
            format!("`{t}` is not FIRST-LAST with 1024 <= FIRST <= LAST <= 65535"),
        )
    };
    let (a, b) = t.split_once('-').ok_or_else(bad)?;
    let first: u16 = a.trim().parse().map_err(|_| bad())?;
    let last: u16 = b.trim().parse().map_err(|_| bad())?;
    if first < 1024 || first > last {
        return Err(bad());
    }
    Ok(PortRange { first, last })
}

/// Parses `8GiB`, `512 MiB`, `1G`, `4096` (bytes) and the like: binary
/// units for `K`/`KiB`…, decimal for `KB`….
pub fn parse_size(t: &str) -> Result<u64, String> {
    let t = t.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim().to_ascii_lowercase();
    let mult: u64 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => {
            return Err(format!(
                "`{t}`: unknown unit `{unit}` (use B, KiB, MiB, GiB, TiB)"
            ));
        }
    };
    let value: f64 = num
        .parse()
        .map_err(|_| format!("`{t}` is not a size such as 8GiB"))?;
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("`{t}` is out of range"));
    }
    Ok(bytes as u64)
}

fn prepare_state_dir(d: &Path) -> Result<PathBuf, ConfigError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(d)
        .map_err(|e| invalid("state_dir", format!("{}: {e}", d.display())))?;
    let c = d
        .canonicalize()
        .map_err(|e| invalid("state_dir", format!("{}: {e}", d.display())))?;
    let probe = c.join(".write-test");
    std::fs::write(&probe, b"")
        .and_then(|()| std::fs::remove_file(&probe))
        .map_err(|e| invalid("state_dir", format!("{} is not writable: {e}", c.display())))?;
    Ok(c)
}

fn check_allowed_flags(entries: Vec<String>) -> Result<Vec<AllowedFlag>, ConfigError> {
    let mut out: Vec<AllowedFlag> = Vec::new();
    for entry in entries {
        let entry = entry.trim().to_owned();
        let argv: Vec<String> = entry.split_whitespace().map(str::to_owned).collect();
        let Some(name) = argv.first() else {
            return Err(invalid("allowed_flags", "an empty entry"));
        };
        if !name.starts_with('-') || entry.contains('\0') {
            return Err(invalid(
                "allowed_flags",
                format!("`{entry}` does not start with a flag"),
            ));
        }
        // `--flag=value` names the same flag.
        let bare = name.split('=').next().unwrap_or(name);
        if DENIED_FLAGS.contains(&bare) {
            return Err(invalid(
                "allowed_flags",
                format!(
                    "`{bare}` is set by the agent or reaches beyond this node; it cannot be allowed"
                ),
            ));
        }
        if out.iter().any(|f| f.entry == entry) {
            return Err(invalid(
                "allowed_flags",
                format!("`{entry}` is listed twice"),
            ));
        }
        out.push(AllowedFlag { entry, argv });
    }
    Ok(out)
}

fn hostname() -> Option<String> {
    let h = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .ok()?;
    let h = h.trim();
    (!h.is_empty()).then(|| h.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Dirs {
        _tmp: tempfile::TempDir,
        models: PathBuf,
        state: PathBuf,
        exe: PathBuf,
    }

    fn dirs() -> Dirs {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().expect("tempdir");
        let models = tmp.path().join("models");
        std::fs::create_dir(&models).expect("mkdir");
        let exe = tmp.path().join("llama-server");
        std::fs::write(&exe, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        Dirs {
            state: tmp.path().join("state"),
            models,
            exe,
            _tmp: tmp,
        }
    }

    fn args(d: &Dirs) -> Args {
        Args {
            node_name: Some("n1".into()),
            model_dirs: Some(vec![d.models.clone()]),
            llama_server: Some(d.exe.clone()),
            state_dir: Some(d.state.clone()),
            insecure_loopback_only: true,
            ..Args::default()
        }
    }

    #[test]
    fn cors_origin_is_localhost_or_one_exact_origin() {
        for ok in [
            "localhost",
            "https://chat.example.ts.net",
            "http://100.64.0.5:3000",
            "https://[fd7a::1]:8443",
        ] {
            assert!(check_origin(ok).is_ok(), "{ok}");
        }
        for bad in [
            "*",
            "null",
            "",
            "https://a.example,https://b.example",
            "https://a.example/path",
            "ftp://a.example",
            "https://",
            "http://a:0",
            "http://a:99999",
        ] {
            assert!(check_origin(bad).is_err(), "{bad}");
        }
        let d = dirs();
        let c = Config::resolve(args(&d)).expect("valid");
        assert_eq!(c.cors_origin, "localhost");
    }

    #[test]
    fn metrics_are_off_by_default_and_plain_only_on_loopback() {
        let d = dirs();
        assert!(
            Config::resolve(args(&d))
                .expect("valid")
                .metrics_listen
                .is_none()
        );
        let with = |listen: &str| {
            let mut a = args(&d);
            a.metrics_listen = Some(listen.into());
            Config::resolve(a)
        };
        let c = with("127.0.0.1:9301").expect("valid");
        assert_eq!(
            c.metrics_listen,
            Some("127.0.0.1:9301".parse().expect("addr"))
        );
        for (listen, says) in [("nowhere", "not an address"), ("0.0.0.0:9301", "tls_cert")] {
            let e = with(listen).expect_err(listen).to_string();
            assert!(
                e.contains("metrics_listen") && e.contains(says),
                "{listen}: {e}"
            );
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn the_gateway_needs_an_address_controllers_and_https_off_loopback() {
        let d = dirs();
        assert!(Config::resolve(args(&d)).expect("valid").gateway.is_none());
        let with = |listen: &str, controllers: &[&str]| {
            let mut a = args(&d);
            a.gateway_listen = Some(listen.into());
            a.gateway_controllers = Some(controllers.iter().map(|c| (*c).to_owned()).collect());
            Config::resolve(a)
        };
        let c = with("127.0.0.1:8080", &["http://127.0.0.1:7300"]).expect("valid");
        let g = c.gateway.expect("gateway");
        assert_eq!(g.url(), "http://127.0.0.1:8080");
        assert!(g.https.is_none());
        for (listen, controllers, key, says) in [
            (
                "nowhere",
                &["http://127.0.0.1:7300"][..],
                "gateway_listen",
                "not an address",
            ),
            (
                "127.0.0.1:8080",
                &[][..],
                "gateway_controllers",
                "needs the controllers",
            ),
            (
                "127.0.0.1:8080",
                &["127.0.0.1:7300"][..],
                "gateway_controllers",
                "not a URL",
            ),
            (
                "10.1.2.3:8080",
                &["http://127.0.0.1:7300"][..],
                "gateway_listen",
                "clear text",
            ),
        ] {
            let e = with(listen, controllers).expect_err(listen).to_string();
            assert!(e.contains(key) && e.contains(says), "{listen}: {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn defaults_fill_every_unset_key() {
        let d = dirs();
        let c = Config::resolve(args(&d)).expect("valid");
        assert_eq!(c.listen, DEFAULT_LISTEN.parse().expect("addr"));
        assert_eq!(
            c.port_range,
            PortRange {
                first: 8100,
                last: 8199
            }
        );
        assert_eq!(c.instance_host, c.listen.ip());
        assert_eq!(c.reserve_bytes, 4 << 30);
        assert_eq!(c.load_timeout, Duration::from_secs(600));
        assert!(c.state_dir.is_dir());
    }

    #[test]
    fn flags_override_the_file() {
        let d = dirs();
        let file = d.state.with_file_name("agent.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nreserve = \"8GiB\"\nroles = [\"speed\"]\n\
             allowed_flags = [\"--jinja\", \"--cache-reuse 256\"]\n",
        )
        .expect("write");
        let c = Config::resolve(Args {
            config: Some(file),
            reserve: Some("1GiB".into()),
            ..args(&d)
        })
        .expect("valid");
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.reserve_bytes, 1 << 30);
        assert_eq!(c.roles, vec!["speed".to_owned()]);
        assert_eq!(c.allowed_flags[1].argv, vec!["--cache-reuse", "256"]);
    }

    #[test]
    fn rpc_servers_get_their_own_port_range_when_set() {
        let d = dirs();
        let c = Config::resolve(args(&d)).expect("valid");
        assert_eq!(c.rpc_port_range, c.port_range);
        let c = Config::resolve(Args {
            rpc_port_range: Some("8200-8215".into()),
            ..args(&d)
        })
        .expect("valid");
        assert_eq!(
            (c.rpc_port_range.first, c.rpc_port_range.last),
            (8200, 8215)
        );
        let e = Config::resolve(Args {
            rpc_port_range: Some("8215-8200".into()),
            ..args(&d)
        })
        .expect_err("reversed");
        assert!(e.to_string().contains("`rpc_port_range`"), "{e}");
    }

    #[test]
    fn health_probe_keys_default_merge_and_are_bounded() {
        let d = dirs();
        let c = Config::resolve(args(&d)).expect("valid");
        assert_eq!(c.health_period, Duration::from_secs(5));
        assert_eq!(c.health_timeout, Duration::from_secs(2));
        assert_eq!(c.health_failures, 3);
        let file = d.state.with_file_name("agent.toml");
        std::fs::write(
            &file,
            "health_period_ms = 1000\nhealth_timeout_ms = 400\nhealth_failures = 5\n",
        )
        .expect("write");
        let c = Config::resolve(Args {
            config: Some(file),
            health_failures: Some(2),
            ..args(&d)
        })
        .expect("valid");
        assert_eq!(c.health_period, Duration::from_millis(1000));
        assert_eq!(c.health_timeout, Duration::from_millis(400));
        assert_eq!(c.health_failures, 2);
        for (a, key, says) in [
            (
                Args {
                    health_timeout_ms: Some(6_000),
                    ..args(&d)
                },
                "`health_timeout_ms`",
                "longer than health_period_ms",
            ),
            (
                Args {
                    health_period_ms: Some(10),
                    ..args(&d)
                },
                "`health_period_ms`",
                "outside 100..=3600000",
            ),
            (
                Args {
                    health_failures: Some(0),
                    ..args(&d)
                },
                "`health_failures`",
                "outside 1..=100",
            ),
        ] {
            let e = Config::resolve(a).expect_err(key).to_string();
            assert!(e.starts_with(key) && e.contains(says), "{e}");
        }
    }

    #[test]
    fn bad_values_name_their_key_in_one_line() {
        let d = dirs();
        let cases: Vec<(Args, &str)> = vec![
            (
                Args {
                    listen: Some("nowhere".into()),
                    ..args(&d)
                },
                "`listen`",
            ),
            (
                Args {
                    port_range: Some("9000-8000".into()),
                    ..args(&d)
                },
                "`port_range`",
            ),
            (
                Args {
                    allowed_flags: Some(vec!["--rpc 10.0.0.1:50052".into()]),
                    ..args(&d)
                },
                "`allowed_flags`",
            ),
            (
                Args {
                    model_dirs: Some(vec!["/nonexistent/models".into()]),
                    ..args(&d)
                },
                "`model_dirs`",
            ),
            (
                Args {
                    llama_server: Some("/nonexistent/llama-server".into()),
                    ..args(&d)
                },
                "`llama_server`",
            ),
            (
                Args {
                    reserve: Some("8 parsecs".into()),
                    ..args(&d)
                },
                "`reserve`",
            ),
            (
                Args {
                    pressure_psi_some: Some(140.0),
                    ..args(&d)
                },
                "`pressure_psi_some`",
            ),
            (
                Args {
                    instance_memory_limit: Some("estimate".into()),
                    ..args(&d)
                },
                "`instance_memory_limit`",
            ),
            (
                Args {
                    instance_cgroup: Some(d._tmp.path().to_owned()),
                    ..args(&d)
                },
                "`instance_cgroup`",
            ),
            (
                Args {
                    instance_cgroup: Some(d._tmp.path().to_owned()),
                    instance_memory_limit: Some("lots".into()),
                    ..args(&d)
                },
                "`instance_memory_limit`",
            ),
        ];
        for (a, key) in cases {
            let e = Config::resolve(a).expect_err(key).to_string();
            assert!(e.starts_with(key), "{e}");
            assert!(!e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn an_unknown_file_key_is_refused_with_its_line() {
        let d = dirs();
        let file = d.state.with_file_name("agent.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:9000\"\nlisten_adress = 1\n").expect("write");
        let e = Config::resolve(Args {
            config: Some(file),
            ..args(&d)
        })
        .expect_err("unknown key");
        let s = e.to_string();
        assert!(s.contains("line 2") && s.contains("listen_adress"), "{s}");
        assert!(!s.contains('\n'), "{s}");
    }

    #[test]
    fn rpc_server_defaults_to_beside_llama_server_and_an_explicit_one_must_exist() {
        use std::os::unix::fs::PermissionsExt;
        let d = dirs();
        // Default: beside the canonical llama-server, present or not.
        let c = Config::resolve(args(&d)).expect("valid");
        assert_eq!(
            c.rpc_server,
            c.llama_server.with_file_name(DEFAULT_RPC_SERVER)
        );
        assert!(!is_executable(&c.rpc_server));
        // Explicit, from the file, elsewhere: accepted (the daemon warns).
        let other = d.state.with_file_name("other");
        std::fs::create_dir_all(&other).expect("mkdir");
        let rpc = other.join("ggml-rpc-server");
        std::fs::write(&rpc, "#!/bin/sh\n").expect("write");
        std::fs::set_permissions(&rpc, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let file = d.state.with_file_name("agent.toml");
        std::fs::write(
            &file,
            format!("rpc_server = {:?}\n", rpc.display().to_string()),
        )
        .expect("write");
        let c = Config::resolve(Args {
            config: Some(file),
            ..args(&d)
        })
        .expect("valid");
        assert_eq!(c.rpc_server, rpc.canonicalize().expect("canonical"));
        // Explicit but missing: refused, naming the key.
        let e = Config::resolve(Args {
            rpc_server: Some("/nonexistent/ggml-rpc-server".into()),
            ..args(&d)
        })
        .expect_err("missing")
        .to_string();
        assert!(e.starts_with("`rpc_server`"), "{e}");
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("8GiB"), Ok(8 << 30));
        assert_eq!(parse_size("512 MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2GB"), Ok(2_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("-1").is_err());
        assert!(parse_size("GiB").is_err());
    }
}
