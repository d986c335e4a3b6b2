//! halo-agent as a library: what a node knows about itself (GGUF models on
//! its disks, its memory) and, later, the llama-server instances it runs.
//! `main.rs` is a thin shell over this.

pub mod cli;
pub mod gguf;
pub mod probe;
