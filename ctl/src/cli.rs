//! haloctl's command line (clap derive). Every command's `--help` carries an
//! example.

use crate::output::Format;
use clap::{Args, Parser, Subcommand};
use controller::estimate::CacheType;
use proto::domain::EditorMode;
use std::path::PathBuf;

/// halo: run local LLMs across a few machines, placed by real memory
/// arithmetic.
#[derive(Debug, Parser)]
#[command(
    name = "haloctl",
    version,
    propagate_version = true,
    after_help = "The controller: --controller URL, else $HALO_CONTROLLER, else `controller = \"URL\"` in\n\
        ~/.config/halo/haloctl.toml, else http://127.0.0.1:7300.\n\
        Mutual TLS: all of --tls-cert, --tls-key, --tls-ca (else $HALO_TLS_CERT, $HALO_TLS_KEY,\n\
        $HALO_TLS_CA, else tls_cert, tls_key, tls_ca in haloctl.toml); see `haloctl certs`.\n\
        Exit status: 0 ok, 1 refused or failed, 2 usage, 3 cannot reach the controller.\n\n\
        Example:\n  haloctl --controller http://halo1:7300 status"
)]
pub struct Cli {
    /// The controller's gRPC address (also $HALO_CONTROLLER).
    #[arg(long, global = true, value_name = "URL")]
    pub controller: Option<String>,
    /// Client certificate for mutual TLS (also $HALO_TLS_CERT); with
    /// --tls-key and --tls-ca, haloctl speaks https to the controller,
    /// which requires it unless started with --insecure-loopback-only.
    #[arg(long, global = true, value_name = "PEM", help_heading = "Mutual TLS")]
    pub tls_cert: Option<PathBuf>,
    /// The client certificate's key (also $HALO_TLS_KEY).
    #[arg(long, global = true, value_name = "PEM", help_heading = "Mutual TLS")]
    pub tls_key: Option<PathBuf>,
    /// The CA that signed the controller's certificate (also $HALO_TLS_CA).
    #[arg(long, global = true, value_name = "PEM", help_heading = "Mutual TLS")]
    pub tls_ca: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands that never reach the controller.
pub const OFFLINE: [&str; 5] = ["inspect", "memory", "fixture", "certs", "completions"];

/// The flags that say how to reach the controller.
const CONNECTION_FLAGS: [&str; 4] = ["controller", "tls_cert", "tls_key", "tls_ca"];

/// haloctl's command line as clap builds it, with the connection flags
/// left out of the offline commands' help (they still parse there, as
/// global flags do, and mean nothing).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let cmd = Cli::command();
    // A subcommand that already has a global's id keeps its own copy when
    // globals are propagated: give the offline ones hidden copies.
    let hidden: Vec<clap::Arg> = cmd
        .get_arguments()
        .filter(|a| CONNECTION_FLAGS.contains(&a.get_id().as_str()))
        .map(|a| a.clone().hide(true))
        .collect();
    OFFLINE.iter().fold(cmd, |cmd, name| {
        cmd.mut_subcommand(name, |c| hidden.iter().cloned().fold(c, clap::Command::arg))
    })
}

/// Parses haloctl's arguments (the first is the program name).
pub fn parse<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::FromArgMatches;
    let matches = command().try_get_matches_from(args)?;
    Cli::from_arg_matches(&matches)
}

/// haloctl's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Nodes: roles, reachability, usable memory, what halo uses, what is free.
    #[command(after_help = "Examples:\n  haloctl nodes\n  haloctl nodes -o json")]
    Nodes(ListArgs),
    /// The model catalog: names, files, sizes, architectures, which nodes hold them.
    #[command(after_help = "Examples:\n  \
        haloctl models\n  \
        haloctl models -o json\n  \
        haloctl models copy qwen3-coder-30b --to halo2")]
    Models(ModelsArgs),
    /// Decide where a catalog model runs, then wait until it answers.
    #[command(after_help = "Examples:\n  \
        haloctl place speed qwen3-coder-30b\n  \
        haloctl place reasoning deepseek-v3.1-1bit --ctx 16384 --dry-run\n  \
        haloctl place speed gpt-oss-20b --node halo1 --replicas 2 --no-wait")]
    Place(PlaceArgs),
    /// Remove a placement; its instances are stopped.
    #[command(after_help = "Example:\n  haloctl unplace qwen3-coder-30b")]
    Unplace(UnplaceArgs),
    /// Placements: node, state, context, estimated vs real memory, endpoint.
    #[command(after_help = "Examples:\n  haloctl status\n  haloctl status -o json")]
    Status(ListArgs),
    /// The cluster live: node memory, instances, requests in flight, tokens/s.
    ///
    /// Redrawn every second: per node a memory bar (halo, reserve, other,
    /// free), per instance its state, context, real memory and estimate,
    /// requests in flight and tokens per second. `q` quits.
    #[command(after_help = "Examples:\n  haloctl top\n  haloctl top --once\n\n\
        In-flight requests and tokens per second come from each agent's /metrics\n\
        (metrics_listen), read with haloctl's certificate when it is https.")]
    Top(TopArgs),
    /// What to put in an editor per mode: the gateway's base URL and the
    /// model name to send (`--direct`: each instance's URL and API key).
    #[command(
        after_help = "Examples:\n  haloctl endpoints\n  haloctl endpoints --direct\n  haloctl endpoints -o json | jq -r '.[] | select(.mode==\"code\") | .base_url'"
    )]
    Endpoints(EndpointsArgs),
    /// Serve halo's OpenAI-compatible gateway here: one base URL and one
    /// user key for every model and editor mode, routed to the cluster.
    #[command(after_help = "Examples:\n  \
        haloctl gateway\n  \
        haloctl gateway --listen 127.0.0.1:8080 --controllers http://10.0.0.1:7300,http://10.0.0.2:7300\n  \
        haloctl gateway --listen 100.64.0.5:8443 --https-cert gw.pem --https-key gw-key.pem\n\n\
        Editors then use base URL http://127.0.0.1:8080/v1, a key from `haloctl keys create`,\n\
        and a model name, a catalog name or a mode (ask, code, autocomplete, architect, debug).")]
    Gateway(GatewayArgs),
    /// User keys for the gateways: create (the key is shown once), list, revoke.
    #[command(after_help = "Examples:\n  \
        haloctl keys create alice --modes ask,code --expires 90\n  \
        haloctl keys list\n  \
        haloctl keys revoke alice")]
    Keys(KeysArgs),
    /// Measure a placed model's speed on each of its nodes (prompt and
    /// generation tokens/s, time to first token) with llama-server's own
    /// timings, and keep the result; `--history` shows the kept results.
    #[command(after_help = "Examples:\n  \
        haloctl bench qwen3-coder-30b --yes\n  \
        haloctl bench gpt-oss-20b --depth 0,4096,16384 --concurrency 1,4 --runs 5 --yes\n  \
        haloctl bench tiny --node halo1 --prompt-tokens 256 --gen-tokens 64 -o json --yes\n  \
        haloctl bench qwen3-coder-30b --gateway --concurrency 1,8 --yes\n  \
        haloctl bench --history qwen3-coder-30b\n\n\
        Benchmarking takes the model's slots away from its users while it runs (it never\n\
        changes the placement): it runs only with --yes. Figures are medians over --runs,\n\
        with the smallest and largest run; results of another llama.cpp build or other\n\
        settings are kept and shown apart, never averaged together.")]
    Bench(BenchArgs),
    /// The log of a placement's llama-server, read through its agent.
    #[command(
        after_help = "Examples:\n  haloctl logs gpt-oss-20b\n  haloctl logs qwen3-coder-30b --replica 1 -n 200 -f"
    )]
    Logs(LogsArgs),
    /// What the controller decided and saw recently; `-f` streams new events.
    #[command(
        after_help = "Examples:\n  haloctl events\n  haloctl events -f -n 0\n  haloctl events -f -o json --count 5"
    )]
    Events(EventsArgs),
    /// Shell completions for bash, zsh or fish, on stdout.
    #[command(after_help = "Examples:\n  \
        haloctl completions bash > ~/.local/share/bash-completion/completions/haloctl\n  \
        haloctl completions zsh > ~/.zfunc/_haloctl\n  \
        haloctl completions fish > ~/.config/fish/completions/haloctl.fish")]
    Completions(CompletionsArgs),
    /// Memory needed per context size and node: a catalog model (asks the
    /// controller, which checks its formula against llama.cpp's own
    /// projection on each node and shows both) or a GGUF file (offline).
    #[command(after_help = "Examples:\n  \
        haloctl plan deepseek-v3.1-1bit\n  \
        haloctl plan ~/models/Qwen3-Coder-30B-A3B-Q8_0.gguf\n  \
        haloctl plan deepseek-v3.1-1bit.gguf --memory 128 --ctx 16384 --cache-type-k q8_0\n  \
        haloctl plan model.gguf -o json")]
    Plan(PlanArgs),
    /// What a GGUF file holds: architecture, size, hyper-parameters.
    #[command(after_help = "Example:\n  haloctl inspect ~/models/gpt-oss-20b-mxfp4.gguf")]
    Inspect(InspectArgs),
    /// This machine's memory as halo's agent reads it, with the arithmetic
    /// behind "usable".
    #[command(
        after_help = "Examples:\n  haloctl memory\n  haloctl memory --root tests/fixtures/probe/strix-halo-128g"
    )]
    Memory(MemoryArgs),
    /// Write test models: the tiny real model, or sparse big models (true
    /// size and header, data left as a file hole).
    #[command(after_help = "Examples:\n  \
        haloctl fixture list\n  \
        haloctl fixture write deepseek-v3.1-1bit /tmp/deepseek-v3.1-1bit.gguf\n  \
        haloctl fixture write tiny /tmp/tiny.gguf")]
    Fixture(FixtureArgs),
    /// Mutual TLS material: a small CA, and certificates it signs for
    /// agents, controllers, gateways and people (admin or read-only).
    #[command(after_help = "Examples:\n  \
        haloctl certs init --dir /etc/halo/tls\n  \
        haloctl certs issue controller halo-ctl --dir /etc/halo/tls --host halo1\n  \
        haloctl certs issue agent halo1 --dir /etc/halo/tls --host halo1 --host 10.0.0.11\n  \
        haloctl certs issue admin alice --dir /etc/halo/tls --days 90")]
    Certs(CertsArgs),
}

/// Arguments of the listing commands.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

/// Arguments of `haloctl models`: the listing, or a subcommand.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct ModelsArgs {
    /// What to do instead of listing.
    #[command(subcommand)]
    pub command: Option<ModelsCommand>,
    /// The listing's arguments.
    #[command(flatten)]
    pub list: ListArgs,
}

/// `haloctl models` subcommands.
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Copy a catalog model's file(s) to a node from a node that holds
    /// them, verified (size and SHA-256) and resumable; Ctrl-C leaves the
    /// copy running. With --all-roles, every catalog model to every live
    /// node of its role that lacks it, one copy at a time.
    #[command(after_help = "Examples:\n  \
        haloctl models copy qwen3-coder-30b --to halo2\n  \
        haloctl models copy gpt-oss-20b --to halo3 --from halo1\n  \
        haloctl models copy --all-roles")]
    Copy(CopyArgs),
}

/// Arguments of `haloctl models copy`.
#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Catalog name (see `haloctl models`).
    #[arg(required_unless_present = "all_roles")]
    pub name: Option<String>,
    /// The node that receives the file.
    #[arg(long, value_name = "NODE", required_unless_present = "all_roles")]
    pub to: Option<String>,
    /// The node to copy from [default: the connected node holding it with
    /// the fastest measured copy to NODE].
    #[arg(long, value_name = "NODE")]
    pub from: Option<String>,
    /// Copy each catalog model to every live node of its role (the catalog
    /// entry's `role`; none: every node) that lacks the file, one copy at a
    /// time, then print what was copied, already there, or failed and why.
    /// Exits 1 when any copy failed.
    #[arg(long, conflicts_with_all = ["name", "to", "from"])]
    pub all_roles: bool,
    /// Output format of the result.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

/// Arguments of `haloctl top`.
#[derive(Debug, Args)]
pub struct TopArgs {
    /// Print one frame and exit (for scripts), instead of the live view.
    #[arg(long)]
    pub once: bool,
}

/// Arguments of `haloctl endpoints`.
#[derive(Debug, Args)]
pub struct EndpointsArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
    /// Each ready instance's own URL and API key, which change whenever
    /// halo moves the model, instead of the gateways'.
    #[arg(long)]
    pub direct: bool,
}

/// Arguments of `haloctl place`.
#[derive(Debug, Args)]
pub struct PlaceArgs {
    /// Node role to place on: `speed` or `reasoning` (node config labels).
    pub role: String,
    /// Catalog name (see `haloctl models`).
    pub model: String,
    /// Context in tokens (default: the catalog's default context); from the
    /// entry's min_context up to the model's trained context.
    #[arg(long = "ctx", value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    pub ctx: Option<u32>,
    /// Allow a context above the model's trained context (llama.cpp runs it
    /// with RoPE scaling, often at a cost in quality).
    #[arg(long)]
    pub allow_context_over_trained: bool,
    /// Pin to this node (pinned placements never move).
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Instances to run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub replicas: u32,
    /// Allow evicting lower-priority placements to make room.
    #[arg(long)]
    pub evict: bool,
    /// When no single node fits, split the model's layers across nodes of
    /// the role (llama.cpp RPC: llama-server on one, ggml-rpc-server on the
    /// others). Slower than one node; `--dry-run` shows the per-node plan.
    #[arg(long)]
    pub split: bool,
    /// Split across exactly N nodes (≥ 2) even when one would fit, e.g. to
    /// leave room on each node for other models. Implies --split.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(2..=15))]
    pub split_across: Option<u32>,
    /// A node of the role that has the memory but lacks the model's file
    /// may be chosen (after those that hold it) when a live node holds it:
    /// the controller copies the file there first, and the replica starts
    /// once the copy is verified; also when it moves after a node loss.
    /// The decision says how long the copy should take. The catalog
    /// entry's `copy_if_missing = true` does the same for every placement.
    #[arg(long)]
    pub copy: bool,
    /// Decide and explain, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Return once the placement is recorded instead of waiting for Ready.
    #[arg(long)]
    pub no_wait: bool,
    /// Placement name (default: the model name, made unique).
    #[arg(long)]
    pub name: Option<String>,
    /// Give up waiting for Ready after this many seconds (exit 1).
    #[arg(long, default_value_t = 900, value_name = "SECS")]
    pub timeout: u64,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

/// Arguments of `haloctl unplace`.
#[derive(Debug, Args)]
pub struct UnplaceArgs {
    /// Placement name (see `haloctl status`).
    pub name: String,
}

/// Arguments of `haloctl bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Placement (or catalog) name (see `haloctl status`).
    pub name: String,
    /// Show the kept results of NAME instead of measuring.
    #[arg(long)]
    pub history: bool,
    /// Context depths: tokens already in the slot's cache before the
    /// measured prompt (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "0",
        env = "HALO_BENCH_DEPTH"
    )]
    pub depth: Vec<u32>,
    /// Prompt tokens measured per stream.
    #[arg(long, default_value_t = 512, env = "HALO_BENCH_PROMPT_TOKENS",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub prompt_tokens: u32,
    /// Tokens generated per stream.
    #[arg(long, default_value_t = 128, env = "HALO_BENCH_GEN_TOKENS",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub gen_tokens: u32,
    /// Runs per point (the median is shown, with the spread).
    #[arg(long, default_value_t = 3, env = "HALO_BENCH_RUNS",
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub runs: u32,
    /// Parallel streams, one slot each (comma-separated; at most the
    /// placement's slots).
    #[arg(long, value_delimiter = ',', default_value = "1", env = "HALO_BENCH_CONCURRENCY",
          value_parser = clap::value_parser!(u32).range(1..=256))]
    pub concurrency: Vec<u32>,
    /// Only the replica on this node (with --history: only its results).
    #[arg(long, env = "HALO_BENCH_NODE")]
    pub node: Option<String>,
    /// Send the streams through the cluster's gateway (a node's
    /// `gateway_listen`), which spreads them over every ready replica, as
    /// users' requests are: aggregate tokens/s of the placement. Depth 0
    /// only; a temporary user key is made and revoked.
    #[arg(long, env = "HALO_BENCH_GATEWAY", conflicts_with = "node")]
    pub gateway: bool,
    /// Run even though the model serves users (their requests slow down
    /// while it runs).
    #[arg(long)]
    pub yes: bool,
    /// Measure and print, but do not keep the result.
    #[arg(long)]
    pub no_store: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

/// Arguments of `haloctl logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Placement name (see `haloctl status`).
    pub name: String,
    /// Which replica (0 = the first).
    #[arg(long, default_value_t = 0)]
    pub replica: u32,
    /// Lines from the end to show first.
    #[arg(short = 'n', long, default_value_t = 100)]
    pub lines: u32,
    /// Keep printing new lines until the instance stops (Ctrl-C to quit).
    #[arg(short, long)]
    pub follow: bool,
}

/// Arguments of `haloctl events`.
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Keep printing new events as they happen (Ctrl-C to stop).
    #[arg(short, long)]
    pub follow: bool,
    /// Recent events to show first (default: all the controller keeps, up
    /// to 256).
    #[arg(short = 'n', long = "recent", value_name = "N")]
    pub recent: Option<u32>,
    /// Stop after printing this many events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Output format (`json`: one object per line).
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

/// Arguments of `haloctl completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell.
    pub shell: clap_complete::Shell,
}

/// Arguments of `haloctl plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// A catalog name (asks the controller) or a GGUF file (offline; for a
    /// split set, any part).
    pub model: PathBuf,
    /// Context sizes to show (repeatable); default: 4096 up to the trained
    /// context in powers of two (a catalog model: its default and halvings).
    #[arg(long = "ctx", value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    pub ctx: Vec<u32>,
    /// KV cache type for K: f16, bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1,
    /// iq4_nl (default: f16 for a file, the catalog entry's for a name).
    #[arg(long, value_parser = parse_cache)]
    pub cache_type_k: Option<CacheType>,
    /// KV cache type for V (same choices and defaults as --cache-type-k).
    #[arg(long, value_parser = parse_cache)]
    pub cache_type_v: Option<CacheType>,
    /// Parallel sequences (llama-server --parallel).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub parallel: u32,
    /// Memory budget in GiB to check against; default: this machine's usable
    /// memory as the agent's probe reads it.
    #[arg(long, value_name = "GIB", value_parser = parse_gib)]
    pub memory: Option<f64>,
    /// A catalog model: only this node.
    #[arg(long, value_name = "NODE")]
    pub node: Option<String>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

/// Arguments of `haloctl inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A GGUF file (for a split set, any part).
    pub model: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

/// Arguments of `haloctl memory`.
#[derive(Debug, Args)]
pub struct MemoryArgs {
    /// Read /proc and /sys under this directory instead of `/`.
    #[arg(long, default_value = "/", env = "HALO_PROBE_ROOT")]
    pub root: PathBuf,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

/// Arguments of `haloctl fixture`.
#[derive(Debug, Args)]
pub struct FixtureArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: FixtureCommand,
}

/// `haloctl fixture` subcommands.
#[derive(Debug, Subcommand)]
pub enum FixtureCommand {
    /// The models that can be written.
    List,
    /// Write one model to a file.
    Write {
        /// `tiny`, or a sparse model name from `haloctl fixture list`.
        name: String,
        /// Where to write it (an existing file is replaced).
        path: PathBuf,
        /// Sparse models only: keep the header small (vocabulary size
        /// without token strings) so the file uses well under 1 MB of disk.
        #[arg(long)]
        size_only_vocab: bool,
    },
}

/// Arguments of `haloctl certs`.
#[derive(Debug, Args)]
pub struct CertsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: CertsCommand,
}

/// `haloctl certs` subcommands.
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make a CA: DIR/ca.pem (certificate) and DIR/ca.key (key, mode 0600).
    #[command(after_help = "Example:\n  haloctl certs init --dir /etc/halo/tls")]
    Init {
        /// Directory to write the CA into (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Replace an existing CA (every certificate it signed stops working).
        #[arg(long)]
        force: bool,
        /// Days the CA is valid [default: 3650].
        #[arg(long, value_name = "N")]
        days: Option<u32>,
    },
    /// Sign a certificate and key for one role: writes ROLE-NAME.pem and
    /// ROLE-NAME.key (mode 0600), the role recorded as the SAN URI
    /// urn:halo:role:ROLE.
    #[command(
        after_help = "Roles: agent (a node's halo-agent), controller (halo-controller; the only \
        role that may start\nor stop instances on agents), admin (may change placements, the \
        catalog and user keys),\nread-only (may look), gateway (`haloctl gateway`: reads the \
        routes with the instances' API keys,\nserves HTTPS to editors).\n\
        etcd is no role: etcd's own server and peer certificate (serverAuth and clientAuth), \
        without a\nrole URI, so no halo service accepts it.\n\n\
        Examples:\n  \
        haloctl certs issue agent halo1 --dir /etc/halo/tls --host halo1 --host 10.0.0.11\n  \
        haloctl certs issue read-only grafana --dir /etc/halo/tls --days 30\n  \
        haloctl certs issue etcd halo1 --dir /etc/halo/tls --host 10.0.0.11"
    )]
    Issue(IssueArgs),
}

/// Arguments of `haloctl certs issue`.
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// agent, controller, admin (`client` is the same), read-only or
    /// gateway; or etcd, for etcd itself.
    pub role: String,
    /// Who the certificate is for (its common name), e.g. a node or a person.
    pub name: String,
    /// Directory holding the CA (ca.pem, ca.key).
    #[arg(long, value_name = "DIR")]
    pub dir: PathBuf,
    /// Directory to write the certificate and key into [default: --dir].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Host name or IP address the certificate's server answers on (DNS or
    /// IP SAN); repeat. Agents and controllers need the address others dial.
    #[arg(long = "host", value_name = "H")]
    pub hosts: Vec<String>,
    /// Days the certificate is valid (0: already expired, for tests).
    #[arg(long, value_name = "N", default_value_t = 365)]
    pub days: u32,
    /// Replace existing files.
    #[arg(long)]
    pub force: bool,
}

fn parse_cache(s: &str) -> Result<CacheType, String> {
    s.parse::<CacheType>().map_err(|_| {
        let all: Vec<String> = CacheType::ALL.iter().map(ToString::to_string).collect();
        format!("one of: {}", all.join(", "))
    })
}

fn parse_gib(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(g) if g.is_finite() && g > 0.0 => Ok(g),
        _ => Err("a positive number of GiB, e.g. 128 or 120.5".into()),
    }
}

/// Arguments of `haloctl gateway`.
#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// Address to serve on.
    #[arg(long, env = "HALO_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// Every controller to read routes from, tried in turn (default: the
    /// one --controller names).
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    pub controllers: Vec<String>,
    /// HTTPS certificate (PEM), e.g. from `haloctl certs issue gateway`.
    #[arg(long, value_name = "PEM", requires = "https_key")]
    pub https_cert: Option<PathBuf>,
    /// The HTTPS certificate's key (PEM).
    #[arg(long, value_name = "PEM", requires = "https_cert")]
    pub https_key: Option<PathBuf>,
    /// Interfaces (the WireGuard mesh, e.g. tailscale0) on whose addresses
    /// plain HTTP is allowed; otherwise plain HTTP only on loopback.
    #[arg(long = "plain-http-on", value_delimiter = ',', value_name = "IFACE")]
    pub plain_http_on: Vec<String>,
    /// How long a request waits for a model with no ready replica (loading,
    /// moving, restarting) before a 503.
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub queue_timeout: u64,
}

/// Arguments of `haloctl keys`.
#[derive(Debug, Args)]
pub struct KeysArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: KeysCommand,
}

/// `haloctl keys` subcommands.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key and print it; it is shown only this once.
    #[command(
        after_help = "The key is sent as `Authorization: Bearer <key>` to a gateway's \
        base URL (`haloctl endpoints`).\n\n\
        Examples:\n  \
        haloctl keys create alice\n  \
        haloctl keys create laptop --modes ask,code --expires 90\n  \
        haloctl keys create ci --models tiny -o json"
    )]
    Create(CreateArgs),
    /// The keys: name, modes and models they may use, when made, when they expire.
    #[command(after_help = "Examples:\n  haloctl keys list\n  haloctl keys list -o json")]
    List(ListKeysArgs),
    /// Delete a key; gateways refuse it from then on.
    #[command(after_help = "Example:\n  haloctl keys revoke alice")]
    Revoke(RevokeArgs),
}

/// Arguments of `haloctl keys create`.
#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The key's name (1-64 of A-Z a-z 0-9 . _ -, starting with a letter or
    /// digit): shown in lists, logs and metrics instead of the key.
    pub name: String,
    /// Editor modes the key may use, comma-separated: ask, code,
    /// autocomplete, architect, debug [default: all].
    #[arg(long, value_name = "MODE,…", value_delimiter = ',', value_parser = parse_mode)]
    pub modes: Vec<EditorMode>,
    /// Catalog or placement names the key may use, comma-separated
    /// [default: all].
    #[arg(long, value_name = "NAME,…", value_delimiter = ',')]
    pub models: Vec<String>,
    /// Days until the key stops working (1-3650) [default: never].
    #[arg(long, value_name = "DAYS", value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub expires: Option<u32>,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

/// Arguments of `haloctl keys list`.
#[derive(Debug, Args)]
pub struct ListKeysArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t)]
    pub output: Format,
}

/// Arguments of `haloctl keys revoke`.
#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// The key's name (see `haloctl keys list`).
    pub name: String,
}

/// An editor mode on the command line.
fn parse_mode(s: &str) -> Result<EditorMode, String> {
    s.parse::<EditorMode>().map_err(|_| {
        let all: Vec<&str> = EditorMode::ALL.iter().map(|m| m.as_str()).collect();
        format!("one of: {}", all.join(", "))
    })
}
