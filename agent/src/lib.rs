//! halo-agent as a library: what a node knows about itself (GGUF models on
//! its disks, its memory) and the llama-server instances it runs for the
//! controller. `main.rs` is a thin shell over [`cli::main`].
//!
//! * [`config`]: file < env < flag, validated before anything is bound.
//! * [`gguf`]: the GGUF header reader (untrusted input, bounded) and
//!   [`gguf::params`], a model's shape and tensor bytes per block.
//! * [`scan`]: model directories → models (ids, params or why broken).
//! * [`probe`]: memory readings (RAM, amdgpu VRAM/GTT, per process, PSI)
//!   under a root directory; [`procfs`]: process identity and signals.
//! * [`loadlog`]: llama.cpp's load log → the buffers it really allocated.
//! * [`llamabuild`]: the node's llama.cpp build (version, GPU devices, RPC).
//! * [`engine`]: llama.cpp's own memory projection (`llama-fit-params`),
//!   bounded, one run at a time, cached (ProjectMemory).
//! * [`supervisor`]: instances (llama-server and ggml-rpc-server): spawn,
//!   watch, restart, stop, re-adopt.
//! * [`copy`]: model files between agents (FetchModel / PullModel),
//!   verified and resumable.
//! * [`state`]: what survives an agent restart (atomic JSON + lock).
//! * [`service`]: the gRPC `AgentService`; [`error`]: its status codes.
//! * [`metrics`]: `/metrics` (node memory, instances, llama-server's own
//!   counters relabelled by placement), served by `proto::metrics`.
//! * [`daemon`]: wiring and graceful shutdown; [`cli`]: the binary.
//!
//! systemd readiness, stopping and watchdog (`sd_notify`) and the logging
//! and signal setup are shared with the controller: `proto::notify`,
//! `proto::runtime`.

pub mod cli;
pub mod config;
pub mod copy;
pub mod daemon;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod llamabuild;
pub mod loadlog;
pub mod metrics;
pub mod probe;
pub mod procfs;
pub mod scan;
pub mod service;
pub mod state;
pub mod supervisor;
