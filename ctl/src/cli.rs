//! haloctl's command line (clap derive). Every command's `--help` carries an
//! example.

use crate::output::Format;
use clap::{Args, Parser, Subcommand};
use controller::estimate::CacheType;
use std::path::PathBuf;

/// halo: run local LLMs across a few machines, placed by real memory
/// arithmetic.
#[derive(Debug, Parser)]
#[command(name = "haloctl", version, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// haloctl's commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Memory needed by a GGUF model per context size, and whether it fits.
    #[command(after_help = "Examples:\n  \
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
}

/// Arguments of `haloctl plan`.
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// A GGUF file (for a split set, any part).
    pub model: PathBuf,
    /// Context sizes to show (repeatable); default: 4096 up to the trained
    /// context in powers of two.
    #[arg(long = "ctx", value_name = "TOKENS", value_parser = clap::value_parser!(u32).range(1..))]
    pub ctx: Vec<u32>,
    /// KV cache type for K: f16, bf16, f32, q8_0, q4_0, q4_1, q5_0, q5_1, iq4_nl.
    #[arg(long, default_value = "f16", value_parser = parse_cache)]
    pub cache_type_k: CacheType,
    /// KV cache type for V (same choices as --cache-type-k).
    #[arg(long, default_value = "f16", value_parser = parse_cache)]
    pub cache_type_v: CacheType,
    /// Parallel sequences (llama-server --parallel).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub parallel: u32,
    /// Memory budget in GiB to check against; default: this machine's usable
    /// memory as the agent's probe reads it.
    #[arg(long, value_name = "GIB", value_parser = parse_gib)]
    pub memory: Option<f64>,
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
