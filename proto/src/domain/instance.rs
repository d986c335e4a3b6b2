//! llama-server instances: the typed, range-checked options an instance is
//! started with, its lifecycle state, and what the agent observed of it.
//! `TryFrom<v1::InstanceOptions>` is where every option's range is checked,
//! so the agent builds an argv only from values already known to be sane.

use super::ProcessMemory;
use crate::ConversionError;
use crate::v1;
use serde::{Deserialize, Serialize};

/// Largest context accepted (16 Mi tokens): far past any model's, small
/// enough that arithmetic on it cannot overflow.
pub const MAX_CONTEXT_SIZE: u32 = 1 << 24;
/// Most parallel slots (`-np`).
pub const MAX_PARALLEL: u32 = 256;
/// Most threads (`-t`).
pub const MAX_THREADS: u32 = 1024;
/// Largest logical batch (`-b`).
pub const MAX_BATCH_SIZE: u32 = 1 << 20;
/// Most layers offloaded (`-ngl`); anything at or above the model's layer
/// count means "all".
pub const MAX_GPU_LAYERS: u32 = 10_000;
/// Longest alias.
pub const MAX_ALIAS_LEN: usize = 128;
/// Most extra flags in one request.
pub const MAX_EXTRA_FLAGS: usize = 32;
/// Longest extra flag entry.
pub const MAX_EXTRA_FLAG_LEN: usize = 256;
/// Most RPC servers one llama-server may use.
pub const MAX_RPC_SERVERS: usize = 16;
/// Most `--tensor-split` entries: llama.cpp's argument parser refuses
/// `llama_max_devices()` (16) or more.
pub const MAX_TENSOR_SPLIT_LEN: usize = 15;
/// Largest `--tensor-split` proportion.
pub const MAX_TENSOR_SPLIT: u32 = 1_000_000;

/// What program an instance runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InstanceKind {
    /// llama-server.
    #[default]
    LlamaServer,
    /// ggml-rpc-server: a helper's share of a split model, used by one
    /// llama-server on another node.
    RpcServer,
}

impl InstanceKind {
    /// Lower-case name for people and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceKind::LlamaServer => "llama-server",
            InstanceKind::RpcServer => "rpc-server",
        }
    }
}

impl From<InstanceKind> for v1::InstanceKind {
    fn from(k: InstanceKind) -> Self {
        match k {
            InstanceKind::LlamaServer => v1::InstanceKind::LlamaServer,
            InstanceKind::RpcServer => v1::InstanceKind::RpcServer,
        }
    }
}

impl InstanceKind {
    /// The kind a wire value names (unspecified = llama-server).
    pub fn from_wire(v: i32) -> Result<InstanceKind, ConversionError> {
        match v1::InstanceKind::try_from(v) {
            Ok(v1::InstanceKind::Unspecified | v1::InstanceKind::LlamaServer) => {
                Ok(InstanceKind::LlamaServer)
            }
            Ok(v1::InstanceKind::RpcServer) => Ok(InstanceKind::RpcServer),
            Err(_) => Err(ConversionError::Invalid {
                field: "kind",
                reason: format!("unknown instance kind {v}"),
            }),
        }
    }
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InstanceState {
    /// The agent is preparing or spawning the process.
    Starting,
    /// The process runs; its model is not ready yet (`/health` refused or 503).
    Loading,
    /// `/health` answers 200.
    Ready,
    /// A stop was requested; the process is being terminated.
    Stopping,
    /// Stopped on request; no process.
    Stopped,
    /// The process exited, failed to load or stalled; the reason is kept and
    /// a restart follows after a back-off.
    Failed,
    /// A llama-server this agent found running but did not start.
    Unmanaged,
    /// A ready llama-server stopped answering `/health`; the agent kills it
    /// and restarts it after a back-off.
    Unhealthy,
}

impl InstanceState {
    /// Lower-case name for people and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Starting => "starting",
            InstanceState::Loading => "loading",
            InstanceState::Ready => "ready",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::Failed => "failed",
            InstanceState::Unmanaged => "unmanaged",
            InstanceState::Unhealthy => "unhealthy",
        }
    }
}

impl InstanceState {
    /// The state a wire value names; `None` for unspecified or a value
    /// outside the enum.
    pub fn from_wire(v: i32) -> Option<InstanceState> {
        v1::InstanceState::try_from(v).ok()?.try_into().ok()
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<InstanceState> for v1::InstanceState {
    fn from(s: InstanceState) -> Self {
        match s {
            InstanceState::Starting => v1::InstanceState::Starting,
            InstanceState::Loading => v1::InstanceState::Loading,
            InstanceState::Ready => v1::InstanceState::Ready,
            InstanceState::Stopping => v1::InstanceState::Stopping,
            InstanceState::Stopped => v1::InstanceState::Stopped,
            InstanceState::Failed => v1::InstanceState::Failed,
            InstanceState::Unmanaged => v1::InstanceState::Unmanaged,
            InstanceState::Unhealthy => v1::InstanceState::Unhealthy,
        }
    }
}

impl TryFrom<v1::InstanceState> for InstanceState {
    type Error = ConversionError;

    fn try_from(s: v1::InstanceState) -> Result<Self, Self::Error> {
        Ok(match s {
            v1::InstanceState::Unspecified => return Err(ConversionError::Missing("state")),
            v1::InstanceState::Starting => InstanceState::Starting,
            v1::InstanceState::Loading => InstanceState::Loading,
            v1::InstanceState::Ready => InstanceState::Ready,
            v1::InstanceState::Stopping => InstanceState::Stopping,
            v1::InstanceState::Stopped => InstanceState::Stopped,
            v1::InstanceState::Failed => InstanceState::Failed,
            v1::InstanceState::Unmanaged => InstanceState::Unmanaged,
            v1::InstanceState::Unhealthy => InstanceState::Unhealthy,
        })
    }
}

/// A KV cache element type llama-server accepts for `-ctk`/`-ctv`
/// (`kv_cache_types` in llama.cpp's `common/arg.cpp`), with the block sizes
/// the memory estimate needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum CacheType {
    /// `f16`, llama.cpp's default.
    #[default]
    F16,
    /// `bf16`.
    Bf16,
    /// `q8_0`.
    Q8_0,
    /// `q4_0`.
    Q4_0,
    /// `q4_1`.
    Q4_1,
    /// `q5_0`.
    Q5_0,
    /// `q5_1`.
    Q5_1,
    /// `iq4_nl`.
    Iq4Nl,
    /// `f32`.
    F32,
}

impl CacheType {
    /// The cache type a wire value names; `None` for unspecified, an error
    /// naming `field` for a value outside the enum.
    pub fn from_wire(field: &'static str, raw: i32) -> Result<Option<CacheType>, ConversionError> {
        cache_type_from_wire(field, raw)
    }

    /// Every cache type llama.cpp accepts.
    pub const ALL: [CacheType; 9] = [
        CacheType::F32,
        CacheType::F16,
        CacheType::Bf16,
        CacheType::Q8_0,
        CacheType::Q4_0,
        CacheType::Q4_1,
        CacheType::Q5_0,
        CacheType::Q5_1,
        CacheType::Iq4Nl,
    ];

    /// The name llama.cpp uses on its command line (`ggml_type_name`).
    pub fn name(self) -> &'static str {
        match self {
            CacheType::F16 => "f16",
            CacheType::Bf16 => "bf16",
            CacheType::Q8_0 => "q8_0",
            CacheType::Q4_0 => "q4_0",
            CacheType::Q4_1 => "q4_1",
            CacheType::Q5_0 => "q5_0",
            CacheType::Q5_1 => "q5_1",
            CacheType::Iq4Nl => "iq4_nl",
            CacheType::F32 => "f32",
        }
    }

    /// `(elements per block, bytes per block)`: `blck_size` and `type_size`
    /// of the `type_traits` table in `ggml/src/ggml.c`; the block structs
    /// (`block_q8_0` = f16 scale + 32 int8 = 34 bytes, ...) are in
    /// `ggml/src/ggml-common.h`.
    pub fn block(self) -> (u64, u64) {
        match self {
            CacheType::F32 => (1, 4),
            CacheType::F16 | CacheType::Bf16 => (1, 2),
            CacheType::Q8_0 => (32, 34),
            CacheType::Q4_0 | CacheType::Iq4Nl => (32, 18),
            CacheType::Q4_1 => (32, 20),
            CacheType::Q5_0 => (32, 22),
            CacheType::Q5_1 => (32, 24),
        }
    }

    /// Bytes of one row of `n` elements (`ggml_row_size`), rounding a
    /// partial block up (llama.cpp refuses such rows; see [`Self::fits`]).
    pub fn row_bytes(self, n: u64) -> u64 {
        let (blck, size) = self.block();
        n.div_ceil(blck) * size
    }

    /// Whether a row of `n` elements is a whole number of blocks, as
    /// `ggml_row_size` asserts.
    pub fn fits(self, n: u64) -> bool {
        n.is_multiple_of(self.block().0)
    }

    /// Whether the type is block-quantized (`ggml_is_quantized`).
    pub fn is_quantized(self) -> bool {
        self.block().0 > 1
    }
}

impl std::fmt::Display for CacheType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A string that names no cache type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown cache type `{0}`")]
pub struct UnknownCacheType(pub String);

impl std::str::FromStr for CacheType {
    type Err = UnknownCacheType;

    /// llama.cpp's names, case-insensitive.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CacheType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownCacheType(s.to_owned()))
    }
}

impl From<CacheType> for v1::CacheType {
    fn from(c: CacheType) -> Self {
        match c {
            CacheType::F16 => v1::CacheType::F16,
            CacheType::Bf16 => v1::CacheType::Bf16,
            CacheType::Q8_0 => v1::CacheType::Q80,
            CacheType::Q4_0 => v1::CacheType::Q40,
            CacheType::Q4_1 => v1::CacheType::Q41,
            CacheType::Q5_0 => v1::CacheType::Q50,
            CacheType::Q5_1 => v1::CacheType::Q51,
            CacheType::Iq4Nl => v1::CacheType::Iq4Nl,
            CacheType::F32 => v1::CacheType::F32,
        }
    }
}

/// `None` (unspecified) becomes `CACHE_TYPE_UNSPECIFIED`.
pub(super) fn cache_type_to_wire(c: Option<CacheType>) -> i32 {
    c.map_or(v1::CacheType::Unspecified, v1::CacheType::from) as i32
}

/// A cache type's llama.cpp name on the wire: an unknown name becomes
/// `CACHE_TYPE_UNSPECIFIED`.
pub(super) fn cache_name_to_wire(name: &str) -> i32 {
    cache_type_to_wire(name.parse().ok())
}

/// The cache type a wire value names; `None` for unspecified, an error
/// naming `field` for a value outside the enum.
pub(super) fn cache_type_from_wire(
    field: &'static str,
    raw: i32,
) -> Result<Option<CacheType>, ConversionError> {
    let w = v1::CacheType::try_from(raw).map_err(|_| ConversionError::Invalid {
        field,
        reason: format!("unknown cache type {raw}"),
    })?;
    Ok(match w {
        v1::CacheType::Unspecified => None,
        v1::CacheType::F16 => Some(CacheType::F16),
        v1::CacheType::Bf16 => Some(CacheType::Bf16),
        v1::CacheType::Q80 => Some(CacheType::Q8_0),
        v1::CacheType::Q40 => Some(CacheType::Q4_0),
        v1::CacheType::Q41 => Some(CacheType::Q4_1),
        v1::CacheType::Q50 => Some(CacheType::Q5_0),
        v1::CacheType::Q51 => Some(CacheType::Q5_1),
        v1::CacheType::Iq4Nl => Some(CacheType::Iq4Nl),
        v1::CacheType::F32 => Some(CacheType::F32),
    })
}

/// The llama.cpp name of a wire cache type, llama.cpp's default (`f16`)
/// for unspecified; an error naming `field` for a value outside the enum.
pub(super) fn cache_name_from_wire(
    field: &'static str,
    raw: i32,
) -> Result<String, ConversionError> {
    Ok(cache_type_from_wire(field, raw)?
        .unwrap_or_default()
        .name()
        .to_owned())
}

/// One `--rpc` entry: an `IP:port` with a port and a specified address.
pub fn parse_rpc_server(a: &str) -> Result<std::net::SocketAddr, ConversionError> {
    a.parse::<std::net::SocketAddr>()
        .ok()
        .filter(|s| s.port() != 0 && !s.ip().is_unspecified())
        .ok_or_else(|| ConversionError::Invalid {
            field: "rpc_servers",
            reason: format!("`{}` is not IP:port", a.escape_debug()),
        })
}

/// Options for one llama-server instance. Every value has been range
/// checked; the agent turns them into argv and passes nothing verbatim.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceOptions {
    /// `-c`; 0 means the model's trained context.
    pub context_size: u32,
    /// `-np`, at least 1.
    pub parallel: u32,
    /// `-ctk`; `None` leaves llama.cpp's default (f16).
    pub cache_type_k: Option<CacheType>,
    /// `-ctv`; `None` leaves llama.cpp's default (f16).
    pub cache_type_v: Option<CacheType>,
    /// `-fa on|off`; `None` leaves llama.cpp's `auto`.
    pub flash_attention: Option<bool>,
    /// `-ngl`; `None` leaves llama.cpp's default.
    pub gpu_layers: Option<u32>,
    /// `-t`; `None` leaves llama.cpp's default.
    pub threads: Option<u32>,
    /// `-b`; `None` leaves llama.cpp's default.
    pub batch_size: Option<u32>,
    /// `-ub`; `None` leaves llama.cpp's default.
    pub ubatch_size: Option<u32>,
    /// `--alias`; empty leaves llama.cpp's default (the file name).
    pub alias: String,
    /// Entries of the agent's allow-list of extra flags.
    pub extra_flags: Vec<String>,
    /// Allow `context_size` above the model's trained maximum.
    pub allow_context_over_trained: bool,
    /// `--rpc`: the helpers' ggml-rpc-servers, in device order.
    #[serde(default)]
    pub rpc_servers: Vec<std::net::SocketAddr>,
    /// `--tensor-split`: one proportion per device (RPC servers first).
    #[serde(default)]
    pub tensor_split: Vec<u32>,
    /// ggml-rpc-server: the only host allowed to use it.
    #[serde(default)]
    pub rpc_client: Option<std::net::IpAddr>,
}

impl From<InstanceOptions> for v1::InstanceOptions {
    fn from(o: InstanceOptions) -> Self {
        v1::InstanceOptions {
            context_size: o.context_size,
            parallel: o.parallel,
            cache_type_k: cache_type_to_wire(o.cache_type_k),
            cache_type_v: cache_type_to_wire(o.cache_type_v),
            flash_attention: o.flash_attention,
            gpu_layers: o.gpu_layers,
            threads: o.threads,
            batch_size: o.batch_size,
            ubatch_size: o.ubatch_size,
            alias: o.alias,
            extra_flags: o.extra_flags,
            allow_context_over_trained: o.allow_context_over_trained,
            rpc_servers: o.rpc_servers.iter().map(ToString::to_string).collect(),
            tensor_split: o.tensor_split,
            rpc_client: o.rpc_client.map(|a| a.to_string()).unwrap_or_default(),
        }
    }
}

fn check_range(
    field: &'static str,
    v: Option<u32>,
    min: u32,
    max: u32,
) -> Result<(), ConversionError> {
    match v {
        Some(v) if v < min || v > max => Err(ConversionError::Invalid {
            field,
            reason: format!("{v} is outside {min}..={max}"),
        }),
        _ => Ok(()),
    }
}

impl TryFrom<v1::InstanceOptions> for InstanceOptions {
    type Error = ConversionError;

    fn try_from(o: v1::InstanceOptions) -> Result<Self, Self::Error> {
        check_range("context_size", Some(o.context_size), 0, MAX_CONTEXT_SIZE)?;
        // 0 means "not set": one slot.
        let parallel = o.parallel.max(1);
        check_range("parallel", Some(parallel), 1, MAX_PARALLEL)?;
        check_range("gpu_layers", o.gpu_layers, 0, MAX_GPU_LAYERS)?;
        check_range("threads", o.threads, 1, MAX_THREADS)?;
        check_range("batch_size", o.batch_size, 1, MAX_BATCH_SIZE)?;
        check_range("ubatch_size", o.ubatch_size, 1, MAX_BATCH_SIZE)?;
        if let (Some(b), Some(ub)) = (o.batch_size, o.ubatch_size)
            && ub > b
        {
            return Err(ConversionError::Invalid {
                field: "ubatch_size",
                reason: format!("{ub} is larger than batch_size {b}"),
            });
        }
        if o.alias.len() > MAX_ALIAS_LEN
            || !o
                .alias
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._:/-".contains(&b))
        {
            return Err(ConversionError::Invalid {
                field: "alias",
                reason: format!(
                    "must be at most {MAX_ALIAS_LEN} characters of A-Z a-z 0-9 . _ : / -"
                ),
            });
        }
        if o.extra_flags.len() > MAX_EXTRA_FLAGS {
            return Err(ConversionError::Invalid {
                field: "extra_flags",
                reason: format!("{} entries, at most {MAX_EXTRA_FLAGS}", o.extra_flags.len()),
            });
        }
        if let Some(f) = o
            .extra_flags
            .iter()
            .find(|f| f.len() > MAX_EXTRA_FLAG_LEN || f.contains('\0'))
        {
            return Err(ConversionError::Invalid {
                field: "extra_flags",
                reason: format!(
                    "an entry of {} bytes (at most {MAX_EXTRA_FLAG_LEN}, no NUL)",
                    f.len()
                ),
            });
        }
        if o.rpc_servers.len() > MAX_RPC_SERVERS {
            return Err(ConversionError::Invalid {
                field: "rpc_servers",
                reason: format!("{} entries, at most {MAX_RPC_SERVERS}", o.rpc_servers.len()),
            });
        }
        let rpc_servers = o
            .rpc_servers
            .iter()
            .map(|a| parse_rpc_server(a))
            .collect::<Result<Vec<_>, _>>()?;
        if !o.tensor_split.is_empty()
            && (o.tensor_split.len() > MAX_TENSOR_SPLIT_LEN
                || o.tensor_split.iter().any(|&t| t > MAX_TENSOR_SPLIT)
                || o.tensor_split.iter().all(|&t| t == 0))
        {
            return Err(ConversionError::Invalid {
                field: "tensor_split",
                reason: format!(
                    "at most {MAX_TENSOR_SPLIT_LEN} proportions (llama.cpp's device limit) of \
                     0..={MAX_TENSOR_SPLIT}, not all zero"
                ),
            });
        }
        let rpc_client = if o.rpc_client.is_empty() {
            None
        } else {
            Some(
                o.rpc_client
                    .parse::<std::net::IpAddr>()
                    .ok()
                    .filter(|a| !a.is_unspecified())
                    .ok_or_else(|| ConversionError::Invalid {
                        field: "rpc_client",
                        reason: format!("`{}` is not an IP address", o.rpc_client.escape_debug()),
                    })?,
            )
        };
        Ok(InstanceOptions {
            rpc_servers,
            tensor_split: o.tensor_split,
            rpc_client,
            context_size: o.context_size,
            parallel,
            cache_type_k: cache_type_from_wire("cache_type_k", o.cache_type_k)?,
            cache_type_v: cache_type_from_wire("cache_type_v", o.cache_type_v)?,
            flash_attention: o.flash_attention,
            gpu_layers: o.gpu_layers,
            threads: o.threads,
            batch_size: o.batch_size,
            ubatch_size: o.ubatch_size,
            alias: o.alias,
            extra_flags: o.extra_flags,
            allow_context_over_trained: o.allow_context_over_trained,
        })
    }
}

/// A StartInstance request: what to run, with the request id that makes
/// retries of the same start one start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartRequest {
    /// Deterministic id (see [`super::ReplicaKey::request_id`]).
    pub request_id: String,
    /// The model file (empty for ggml-rpc-server).
    pub model_id: String,
    /// What the instance runs with.
    pub options: InstanceOptions,
    /// Generation of the replica.
    pub generation: u64,
    /// The sender's leader term (0: not sent yet).
    pub leader_revision: u64,
    /// llama-server or ggml-rpc-server.
    pub kind: InstanceKind,
    /// The sender's estimate of what it needs, bytes (0: none).
    pub estimate_bytes: u64,
}

impl From<StartRequest> for v1::StartInstanceRequest {
    fn from(r: StartRequest) -> Self {
        v1::StartInstanceRequest {
            request_id: r.request_id,
            model_id: r.model_id,
            options: Some(r.options.into()),
            generation: r.generation,
            leader_revision: r.leader_revision,
            kind: v1::InstanceKind::from(r.kind) as i32,
            estimate_bytes: r.estimate_bytes,
        }
    }
}

impl TryFrom<v1::StartInstanceRequest> for StartRequest {
    type Error = ConversionError;

    fn try_from(r: v1::StartInstanceRequest) -> Result<Self, Self::Error> {
        Ok(StartRequest {
            options: r.options.unwrap_or_default().try_into()?,
            kind: InstanceKind::from_wire(r.kind)?,
            request_id: r.request_id,
            model_id: r.model_id,
            generation: r.generation,
            leader_revision: r.leader_revision,
            estimate_bytes: r.estimate_bytes,
        })
    }
}

/// Buffer sizes llama-server printed while loading, summed over devices
/// (the agent reads them from the instance's log: `agent::loadlog`). `None`
/// where the log printed no such line, never a zero that looks real.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedBuffers {
    /// `model buffer size` lines: the weights, every buffer type.
    pub model_bytes: Option<u64>,
    /// The memory-mapped part of [`Self::model_bytes`] (`CPU_Mapped` and
    /// other `*_Mapped` buffers). A mapped buffer spans the whole tensor data
    /// range of the file, including tensors that were copied out into a
    /// repacked buffer (`CPU_REPACK`), so mapped + repacked counts those
    /// tensors twice; the mapped copies are clean page cache.
    pub mapped_model_bytes: Option<u64>,
    /// The KV cache: the caches' `size =` summaries (exact even when a
    /// `no_alloc` pass logged dummy buffers), else `KV buffer size` lines.
    pub kv_bytes: Option<u64>,
    /// Recurrent state: the `size =` summaries, else `RS buffer size` lines.
    pub recurrent_bytes: Option<u64>,
    /// `compute buffer size` lines of the last reservation, all backends.
    pub compute_bytes: Option<u64>,
    /// `output buffer size` (logits/embeddings).
    pub output_bytes: Option<u64>,
    /// The `memory breakdown` table llama.cpp logs (at exit for
    /// llama-server), summed over its rows.
    pub breakdown: Option<MemoryBreakdown>,
}

/// llama.cpp's `memory breakdown [MiB]` table (`common_memory_breakdown_print`
/// in `common/fit.cpp`), summed over its rows. Each row is printed in whole
/// MiB, rounded down; the figures here are those MiB in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryBreakdown {
    /// Weights ("model").
    pub model_bytes: u64,
    /// KV cache and recurrent state ("context").
    pub context_bytes: u64,
    /// Compute buffers ("compute").
    pub compute_bytes: u64,
}

impl ObservedBuffers {
    /// KV cache plus recurrent state: llama.cpp's "context" bucket.
    pub fn context_bytes(&self) -> Option<u64> {
        match (self.kv_bytes, self.recurrent_bytes) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0).saturating_add(b.unwrap_or(0))),
        }
    }

    /// Whether the log said anything about buffers at all.
    pub fn is_empty(&self) -> bool {
        self.model_bytes.is_none()
            && self.kv_bytes.is_none()
            && self.recurrent_bytes.is_none()
            && self.compute_bytes.is_none()
            && self.output_bytes.is_none()
            && self.breakdown.is_none()
    }

    /// Sum of the buffers the log printed (weights, context, compute,
    /// output); `None` when it printed none of them. The weights are
    /// [`Self::model_bytes`] as logged, which counts repacked tensors twice
    /// when [`Self::weights_double_counted`]; for what an instance holds
    /// use [`Self::resident_bytes`].
    pub fn total_bytes(&self) -> Option<u64> {
        [
            self.model_bytes,
            self.context_bytes(),
            self.compute_bytes,
            self.output_bytes,
        ]
        .into_iter()
        .flatten()
        .reduce(u64::saturating_add)
    }

    /// Whether [`Self::model_bytes`] counts some tensors twice: a
    /// memory-mapped weight buffer spans the file's whole tensor data, so
    /// any other weight buffer next to it (the CPU's repacked copies,
    /// `CPU_REPACK`) holds tensors the mapping already counts.
    pub fn weights_double_counted(&self) -> bool {
        matches!(
            (self.model_bytes, self.mapped_model_bytes),
            (Some(all), Some(mapped)) if all > mapped
        )
    }

    /// Like [`Self::total_bytes`], with the weights counted once: when
    /// [`Self::weights_double_counted`], the weights are
    /// `header_weight_bytes` (the GGUF header's tensor bytes), or without
    /// them the mapped part (which spans the same tensor data).
    pub fn resident_bytes(&self, header_weight_bytes: Option<u64>) -> Option<u64> {
        let weights = if self.weights_double_counted() {
            header_weight_bytes.or(self.mapped_model_bytes)
        } else {
            self.model_bytes
        };
        [
            weights,
            self.context_bytes(),
            self.compute_bytes,
            self.output_bytes,
        ]
        .into_iter()
        .flatten()
        .reduce(u64::saturating_add)
    }
}

impl From<MemoryBreakdown> for v1::MemoryBreakdown {
    fn from(b: MemoryBreakdown) -> Self {
        v1::MemoryBreakdown {
            model_bytes: b.model_bytes,
            context_bytes: b.context_bytes,
            compute_bytes: b.compute_bytes,
        }
    }
}

impl From<v1::MemoryBreakdown> for MemoryBreakdown {
    fn from(b: v1::MemoryBreakdown) -> Self {
        MemoryBreakdown {
            model_bytes: b.model_bytes,
            context_bytes: b.context_bytes,
            compute_bytes: b.compute_bytes,
        }
    }
}

impl From<ObservedBuffers> for v1::ObservedBuffers {
    fn from(b: ObservedBuffers) -> Self {
        v1::ObservedBuffers {
            model_bytes: b.model_bytes,
            kv_bytes: b.kv_bytes,
            compute_bytes: b.compute_bytes,
            output_bytes: b.output_bytes,
            recurrent_bytes: b.recurrent_bytes,
            mapped_model_bytes: b.mapped_model_bytes,
            breakdown: b.breakdown.map(Into::into),
        }
    }
}

impl From<v1::ObservedBuffers> for ObservedBuffers {
    fn from(b: v1::ObservedBuffers) -> Self {
        ObservedBuffers {
            model_bytes: b.model_bytes,
            mapped_model_bytes: b.mapped_model_bytes,
            kv_bytes: b.kv_bytes,
            recurrent_bytes: b.recurrent_bytes,
            compute_bytes: b.compute_bytes,
            output_bytes: b.output_bytes,
            breakdown: b.breakdown.map(Into::into),
        }
    }
}

/// One llama-server instance as an agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instance {
    /// Agent-chosen id, unique on the node.
    pub id: String,
    /// The model id (path relative to a model directory); empty when unmanaged.
    pub model_id: String,
    /// Where it is in its life.
    pub state: InstanceState,
    /// What it was started with.
    pub options: InstanceOptions,
    /// The running process, if any.
    pub pid: Option<u32>,
    /// HTTP port.
    pub port: u16,
    /// Base URL clients use (`http://host:port`).
    pub endpoint: String,
    /// Restarts after failures since the instance was created.
    pub restart_count: u32,
    /// Why it last failed (exit code or signal, last log lines); empty if never.
    pub last_error: String,
    /// When `state` was entered (Unix ms).
    pub state_since_unix_ms: u64,
    /// Buffer sizes parsed from the load log.
    pub observed: Option<ObservedBuffers>,
    /// Live memory use of the process.
    pub memory: Option<ProcessMemory>,
    /// Generation of the request that created it.
    pub generation: u64,
    /// Bearer token of its HTTP API.
    pub api_key: String,
    /// The start request id that created it.
    pub request_id: String,
    /// For unmanaged instances, the process's command line.
    pub command_line: String,
    /// llama-server or ggml-rpc-server.
    #[serde(default)]
    pub kind: InstanceKind,
    /// What changed, when the model file it loaded was deleted or replaced
    /// while it runs (a restart is then refused); empty otherwise.
    #[serde(default)]
    pub model_file_changed: String,
    /// Set when the kernel killed it for lack of memory.
    #[serde(default)]
    pub oom_kill: Option<OomKill>,
    /// The estimate it was started with, bytes (0: none given).
    #[serde(default)]
    pub estimate_bytes: u64,
}

/// How the kernel's out-of-memory killer ended an instance, with the
/// figures that explain it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OomKill {
    /// When the agent saw the process gone (Unix ms).
    pub at_unix_ms: u64,
    /// RSS plus GPU memory at its last sample before the kill.
    pub used_bytes: u64,
    /// RSS part of `used_bytes`.
    pub rss_bytes: u64,
    /// GPU part (VRAM and GTT) of `used_bytes`.
    pub gpu_bytes: u64,
    /// The estimate it was started with (0: none given).
    pub estimate_bytes: u64,
    /// The node's `MemAvailable` at the last sample before the kill.
    pub node_available_bytes: Option<u64>,
    /// The counter that told it apart from another SIGKILL.
    pub evidence: String,
}

impl OomKill {
    /// "killed for lack of memory: it used X, the estimate was Y, the node
    /// had Z free (EVIDENCE)".
    pub fn describe(&self, program: &str) -> String {
        use crate::units::bytes;
        let mut s = format!(
            "{program} was killed for lack of memory: it used {}",
            bytes(self.used_bytes)
        );
        if self.gpu_bytes > 0 {
            s += &format!(
                " (RSS {}, GPU {})",
                bytes(self.rss_bytes),
                bytes(self.gpu_bytes)
            );
        }
        if self.estimate_bytes > 0 {
            s += &format!(", the estimate was {}", bytes(self.estimate_bytes));
        }
        if let Some(free) = self.node_available_bytes {
            s += &format!(", the node had {} free", bytes(free));
        }
        s += &format!(" ({})", self.evidence);
        s
    }
}

impl From<OomKill> for v1::OomKill {
    fn from(o: OomKill) -> Self {
        v1::OomKill {
            at_unix_ms: o.at_unix_ms,
            used_bytes: o.used_bytes,
            rss_bytes: o.rss_bytes,
            gpu_bytes: o.gpu_bytes,
            estimate_bytes: o.estimate_bytes,
            node_available_bytes: o.node_available_bytes,
            evidence: o.evidence,
        }
    }
}

impl From<v1::OomKill> for OomKill {
    fn from(o: v1::OomKill) -> Self {
        OomKill {
            at_unix_ms: o.at_unix_ms,
            used_bytes: o.used_bytes,
            rss_bytes: o.rss_bytes,
            gpu_bytes: o.gpu_bytes,
            estimate_bytes: o.estimate_bytes,
            node_available_bytes: o.node_available_bytes,
            evidence: o.evidence,
        }
    }
}

/// Whether an instance reported with the same request id as `old` takes
/// its place: agents keep stopped instances, and a live one is preferred
/// over a stopped one.
pub fn replaces(old: Option<&Instance>) -> bool {
    old.is_none_or(|o| o.state == InstanceState::Stopped)
}

impl From<Instance> for v1::Instance {
    fn from(i: Instance) -> Self {
        v1::Instance {
            id: i.id,
            model_id: i.model_id,
            state: v1::InstanceState::from(i.state) as i32,
            options: Some(i.options.into()),
            pid: i.pid,
            port: u32::from(i.port),
            endpoint: i.endpoint,
            restart_count: i.restart_count,
            last_error: i.last_error,
            state_since_unix_ms: i.state_since_unix_ms,
            observed: i.observed.map(Into::into),
            memory: i.memory.map(Into::into),
            generation: i.generation,
            api_key: i.api_key,
            request_id: i.request_id,
            command_line: i.command_line,
            kind: v1::InstanceKind::from(i.kind) as i32,
            model_file_changed: i.model_file_changed,
            oom_kill: i.oom_kill.map(Into::into),
            estimate_bytes: i.estimate_bytes,
        }
    }
}

impl TryFrom<v1::Instance> for Instance {
    type Error = ConversionError;

    fn try_from(i: v1::Instance) -> Result<Self, Self::Error> {
        let state = v1::InstanceState::try_from(i.state).map_err(|_| ConversionError::Invalid {
            field: "state",
            reason: format!("unknown state {}", i.state),
        })?;
        let port = u16::try_from(i.port).map_err(|_| ConversionError::Invalid {
            field: "port",
            reason: format!("{} is not a TCP port", i.port),
        })?;
        Ok(Instance {
            id: i.id,
            model_id: i.model_id,
            state: state.try_into()?,
            options: i.options.unwrap_or_default().try_into()?,
            pid: i.pid,
            port,
            endpoint: i.endpoint,
            restart_count: i.restart_count,
            last_error: i.last_error,
            state_since_unix_ms: i.state_since_unix_ms,
            observed: i.observed.map(Into::into),
            memory: i.memory.map(Into::into),
            generation: i.generation,
            api_key: i.api_key,
            request_id: i.request_id,
            command_line: i.command_line,
            kind: InstanceKind::from_wire(i.kind)?,
            model_file_changed: i.model_file_changed,
            oom_kill: i.oom_kill.map(Into::into),
            estimate_bytes: i.estimate_bytes,
        })
    }
}

/// One line of an instance's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLine {
    /// When the agent read it (Unix ms).
    pub at_unix_ms: u64,
    /// The line, without its newline.
    pub line: String,
}

impl From<LogLine> for v1::LogLine {
    fn from(l: LogLine) -> Self {
        v1::LogLine {
            at_unix_ms: l.at_unix_ms,
            line: l.line,
        }
    }
}

impl From<v1::LogLine> for LogLine {
    fn from(l: v1::LogLine) -> Self {
        LogLine {
            at_unix_ms: l.at_unix_ms,
            line: l.line,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_instance_is_preferred_over_a_stopped_one_with_the_same_id() {
        let at = |state| Instance {
            estimate_bytes: 0,
            oom_kill: None,
            id: "i-1".into(),
            model_id: "tiny.gguf".into(),
            state,
            options: InstanceOptions::default(),
            pid: None,
            port: 8100,
            endpoint: String::new(),
            restart_count: 0,
            last_error: String::new(),
            state_since_unix_ms: 1,
            observed: None,
            memory: None,
            generation: 1,
            api_key: String::new(),
            request_id: "halo.tiny.r0.g1".into(),
            command_line: String::new(),
            model_file_changed: String::new(),
            kind: InstanceKind::LlamaServer,
        };
        assert!(replaces(None));
        assert!(replaces(Some(&at(InstanceState::Stopped))));
        assert!(!replaces(Some(&at(InstanceState::Ready))));
    }

    #[test]
    fn options_round_trip_through_the_wire() {
        let o = InstanceOptions {
            context_size: 4096,
            parallel: 2,
            cache_type_k: Some(CacheType::Q8_0),
            cache_type_v: None,
            flash_attention: Some(true),
            gpu_layers: Some(99),
            threads: Some(4),
            batch_size: Some(512),
            ubatch_size: Some(256),
            alias: "qwen3-coder:30b".into(),
            extra_flags: vec!["--jinja".into()],
            allow_context_over_trained: false,
            rpc_servers: vec!["10.0.0.2:50052".parse().expect("addr")],
            tensor_split: vec![30, 31],
            rpc_client: Some("10.0.0.1".parse().expect("ip")),
        };
        let back = InstanceOptions::try_from(v1::InstanceOptions::from(o.clone()));
        assert_eq!(back, Ok(o));
    }

    #[test]
    fn instance_states_from_the_wire_are_none_when_unspecified_or_unknown() {
        let ready = v1::InstanceState::from(InstanceState::Ready) as i32;
        assert_eq!(InstanceState::from_wire(ready), Some(InstanceState::Ready));
        assert_eq!(InstanceState::from_wire(0), None);
        assert_eq!(InstanceState::from_wire(99), None);
    }

    #[test]
    fn start_requests_round_trip_through_the_wire() {
        let r = StartRequest {
            request_id: "halo.m.r0s1.g3".into(),
            model_id: String::new(),
            options: InstanceOptions {
                parallel: 1,
                rpc_client: Some("10.0.0.1".parse().expect("ip")),
                ..InstanceOptions::default()
            },
            generation: 3,
            leader_revision: 7,
            kind: InstanceKind::RpcServer,
            estimate_bytes: 123,
        };
        let back = StartRequest::try_from(v1::StartInstanceRequest::from(r.clone()));
        assert_eq!(back, Ok(r));
    }

    #[test]
    fn cache_types_cross_the_wire_by_name_and_unknown_names_are_unspecified() {
        for t in CacheType::ALL {
            let w = cache_name_to_wire(t.name());
            assert_eq!(cache_type_from_wire("k", w), Ok(Some(t)));
            assert_eq!(cache_name_from_wire("k", w).as_deref(), Ok(t.name()));
        }
        let unknown = cache_name_to_wire("q3_k");
        assert_eq!(unknown, v1::CacheType::Unspecified as i32);
        assert_eq!(cache_name_from_wire("k", unknown).as_deref(), Ok("f16"));
        assert!(cache_name_from_wire("k", 99).is_err());
    }

    #[test]
    fn options_out_of_range_are_refused_with_the_field_named() {
        let bad = [
            (
                v1::InstanceOptions {
                    context_size: MAX_CONTEXT_SIZE + 1,
                    ..Default::default()
                },
                "context_size",
            ),
            (
                v1::InstanceOptions {
                    threads: Some(0),
                    ..Default::default()
                },
                "threads",
            ),
            (
                v1::InstanceOptions {
                    batch_size: Some(64),
                    ubatch_size: Some(128),
                    ..Default::default()
                },
                "ubatch_size",
            ),
            (
                v1::InstanceOptions {
                    alias: "a,b".into(),
                    ..Default::default()
                },
                "alias",
            ),
            (
                v1::InstanceOptions {
                    cache_type_k: 99,
                    ..Default::default()
                },
                "cache_type_k",
            ),
        ];
        for (o, field) in bad {
            match InstanceOptions::try_from(o) {
                Err(ConversionError::Invalid { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
    }

    #[test]
    fn cache_types_parse_like_llama_cpp_flags_and_size_their_blocks() {
        for t in CacheType::ALL {
            assert_eq!(t.name().parse::<CacheType>(), Ok(t));
        }
        assert_eq!("Q8_0".parse::<CacheType>(), Ok(CacheType::Q8_0));
        assert!("q3_k".parse::<CacheType>().is_err());
        assert_eq!(CacheType::Q8_0.row_bytes(1024), 1088);
        assert!(!CacheType::Q4_0.fits(100));
    }

    #[test]
    fn observed_buffers_round_trip_and_absent_stays_absent() {
        let b = ObservedBuffers {
            model_bytes: Some(100),
            mapped_model_bytes: Some(60),
            kv_bytes: Some(0),
            recurrent_bytes: None,
            compute_bytes: Some(7),
            output_bytes: None,
            breakdown: Some(MemoryBreakdown {
                model_bytes: 1 << 20,
                context_bytes: 0,
                compute_bytes: 2 << 20,
            }),
        };
        assert_eq!(ObservedBuffers::from(v1::ObservedBuffers::from(b)), b);
        assert_eq!(b.context_bytes(), Some(0));
        assert_eq!(b.total_bytes(), Some(107));
        let none = ObservedBuffers::default();
        assert!(none.is_empty());
        assert_eq!((none.context_bytes(), none.total_bytes()), (None, None));
        assert_eq!(none.resident_bytes(Some(1)), None);
    }

    #[test]
    fn resident_bytes_count_mapped_and_repacked_weights_once() {
        // CPU repack: a 60-byte mapping of the file plus 40 repacked bytes.
        let repacked = ObservedBuffers {
            model_bytes: Some(100),
            mapped_model_bytes: Some(60),
            kv_bytes: Some(5),
            compute_bytes: Some(7),
            ..ObservedBuffers::default()
        };
        assert!(repacked.weights_double_counted());
        assert_eq!(repacked.total_bytes(), Some(112));
        assert_eq!(repacked.resident_bytes(Some(58)), Some(58 + 5 + 7));
        assert_eq!(repacked.resident_bytes(None), Some(60 + 5 + 7));
        // Mapped only, or no mapping: the logged weights stand.
        for mapped in [Some(100), None] {
            let b = ObservedBuffers {
                mapped_model_bytes: mapped,
                ..repacked
            };
            assert!(!b.weights_double_counted());
            assert_eq!(b.resident_bytes(Some(58)), Some(112));
        }
    }

    #[test]
    fn parallel_zero_means_one_slot() {
        let o = InstanceOptions::try_from(v1::InstanceOptions::default()).expect("valid");
        assert_eq!(o.parallel, 1);
        assert_eq!(o.cache_type_k, None);
    }
}
