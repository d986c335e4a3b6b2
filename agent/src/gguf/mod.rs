//! GGUF: the file format llama.cpp loads models from. This module reads
//! headers (metadata and tensor infos, never the weights) as untrusted input,
//! extracts what a memory estimate needs, and writes files for tests and the
//! demo (a tiny real model, and sparse big models whose data is a file hole).

pub mod fixtures;
#[cfg(test)]
mod malformed_tests;
pub mod params;
pub mod read;
pub mod types;
pub mod write;

pub use params::{ParamsError, model_params};
pub use read::{
    GgufError, GgufFile, GgufModel, ReadLimits, TensorInfo, read_header, read_header_from,
    read_model,
};
pub use types::{GgmlType, Value, ValueType};
