//! The GGUF header reader. GGUF files are untrusted input: this module reads
//! the header (magic, version, metadata, tensor infos) of a file or of a split
//! set, validates it the way llama.cpp does, and never reads the weights.
//!
//! The rules follow `ggml/src/gguf.cpp` (`gguf_init_from_reader` and
//! `struct gguf_reader`) and, for file bounds and split sets,
//! `src/llama-model-loader.cpp` (`llama_model_loader::llama_model_loader`,
//! `llama_get_list_splits`), `src/llama-model-loader.h`
//! (`llama_tensor_weight`) and `src/llama.cpp` (`llama_split_path`,
//! `llama_split_prefix`).
//!
//! Every length and count read from the file is checked against the bytes
//! left (and a hard cap on header bytes, [`ReadLimits`]) *before* anything is
//! allocated for it; the reader sits on a bounded buffered reader, so a 170 GB
//! model costs its header plus one buffer of I/O. Errors name the file, the
//! byte offset and the field.

mod error;
mod header;
mod metadata;
mod parser;
mod split;
mod tensors;
#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap what they built themselves.
mod tests;

pub use error::{GgufError, GgufErrorKind};
pub use split::{parse_split_name, read_model, read_model_with_limits, split_part_name};

use super::types::{GgmlType, Value, ValueType};
use parser::Parser;
use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

/// `GGUF_VERSION` in `ggml/include/gguf.h`: the newest version read.
pub const GGUF_VERSION: u32 = 3;
/// `GGUF_DEFAULT_ALIGNMENT` in `ggml/include/gguf.h`.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// `GGML_MAX_DIMS` in `ggml/include/ggml.h`.
pub const MAX_DIMS: u32 = 4;
/// Longest tensor name: `gguf.cpp` refuses `name.length() >= GGML_MAX_NAME`
/// (64, `ggml/include/ggml.h`).
pub const MAX_TENSOR_NAME_LEN: u64 = 63;
/// `general.alignment`.
pub const KEY_ALIGNMENT: &str = "general.alignment";
/// `split.no` (`LLM_KV_SPLIT_NO`, `src/llama-arch.cpp`): 0-based part index.
pub const KEY_SPLIT_NO: &str = "split.no";
/// `split.count` (`LLM_KV_SPLIT_COUNT`): number of parts.
pub const KEY_SPLIT_COUNT: &str = "split.count";
/// `split.tensors.count` (`LLM_KV_SPLIT_TENSORS_COUNT`): tensors over all parts.
pub const KEY_SPLIT_TENSORS_COUNT: &str = "split.tensors.count";

/// I/O buffer: the most the reader reads past the end of the header.
const READ_BUF_BYTES: usize = 32 * 1024;
/// Smallest metadata record: key length (8) + a 1-byte key + type (4) + a
/// 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 1 + 4 + 1;
/// Smallest tensor info: name length (8) + n_dims (4) + one dim (8) + type
/// (4) + offset (8). Empty names are allowed, as in `gguf.cpp`.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
/// Vectors sized from a (checked) count start no bigger than this and grow
/// with what is actually read.
const MAX_PREALLOC: u64 = 4096;

/// Bounds the reader applies on top of the file's own size. The defaults fit
/// every real model seen (the biggest headers are tens of MB of tokenizer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadLimits {
    /// Most header bytes ever read from one file.
    pub max_header_bytes: u64,
    /// Longest metadata key.
    pub max_key_len: u64,
    /// Longest metadata string value (chat templates, embedded tokenizer
    /// JSON; `gguf.cpp` allows 1 GiB, `GGUF_MAX_STRING_LENGTH`).
    pub max_string_len: u64,
    /// Most metadata values decoded in one file, counting every array element
    /// (a decoded value is ~32 bytes of memory whatever its size on disk).
    pub max_values: u64,
    /// Deepest array nesting (1 = arrays of scalars only).
    pub max_array_depth: u32,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_header_bytes: 256 * 1024 * 1024,
            max_key_len: 64 * 1024,
            max_string_len: 64 * 1024 * 1024,
            max_values: 8 * 1024 * 1024,
            max_array_depth: 4,
        }
    }
}

/// One tensor's info record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Element type.
    pub ty: GgmlType,
    /// Dimensions, `ne[0]` first; 1 to 4 of them, each ≥ 1.
    pub dims: Vec<u64>,
    /// Absolute byte offset of the tensor's data in its file.
    pub offset: u64,
    /// Exact bytes of the tensor's data (`ggml_nbytes`, without padding).
    pub bytes: u64,
    /// Byte offset of this tensor's info record in the header.
    pub info_offset: u64,
}

impl TensorInfo {
    /// Number of elements (validated ≤ `INT64_MAX` when read).
    pub fn elements(&self) -> u64 {
        self.dims.iter().fold(1u64, |acc, &d| acc.saturating_mul(d))
    }
}

/// One GGUF file's header.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufFile {
    /// The file the header came from.
    pub path: PathBuf,
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// Data alignment (`general.alignment` or 32).
    pub alignment: u64,
    /// Tensor infos in file order.
    pub tensors: Vec<TensorInfo>,
    /// Bytes of header proper (magic through the last tensor info).
    pub header_len: u64,
    /// Absolute offset of the data section (header padded to `alignment`
    /// when there are tensors, as `gguf.cpp` seeks).
    pub data_offset: u64,
    /// File size from the file system.
    pub file_size: u64,
    /// Bytes actually read from the file (header plus read-ahead).
    pub header_bytes_read: u64,
    index: HashMap<String, usize>,
    value_offsets: Vec<u64>,
}

impl GgufFile {
    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.index.get(key).map(|&i| &self.metadata[i].1)
    }

    /// Byte offset of `key`'s value in the file.
    pub fn value_offset(&self, key: &str) -> Option<u64> {
        self.index.get(key).map(|&i| self.value_offsets[i])
    }

    /// `key` as an unsigned integer (any non-negative integer type).
    pub fn get_u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    /// `key` as a string.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// `key` as a float (any numeric type).
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key).and_then(Value::as_f64)
    }

    /// `key` as an array: its element type and elements.
    pub fn get_array(&self, key: &str) -> Option<(ValueType, &[Value])> {
        match self.get(key)? {
            Value::Array(ty, items) => Some((*ty, items)),
            _ => None,
        }
    }

    /// Number of elements of the array `key`.
    pub fn array_len(&self, key: &str) -> Option<usize> {
        self.get_array(key).map(|(_, items)| items.len())
    }

    /// `key` as an array of unsigned integers; `None` unless every element
    /// is a non-negative integer.
    pub fn get_u64_array(&self, key: &str) -> Option<Vec<u64>> {
        let (_, items) = self.get_array(key)?;
        items.iter().map(Value::as_u64).collect()
    }

    /// `key` as an array of strings; `None` unless every element is a string.
    pub fn get_str_array(&self, key: &str) -> Option<Vec<&str>> {
        let (_, items) = self.get_array(key)?;
        items.iter().map(Value::as_str).collect()
    }

    /// The tensor called `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Exact bytes of all tensor data in this file.
    pub fn weight_bytes(&self) -> u64 {
        self.tensors
            .iter()
            .fold(0u64, |acc, t| acc.saturating_add(t.bytes))
    }
}

/// A model: one GGUF file or every part of a split set, part 1 first.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufModel {
    parts: Vec<GgufFile>,
}

impl From<GgufFile> for GgufModel {
    fn from(file: GgufFile) -> Self {
        GgufModel { parts: vec![file] }
    }
}

impl GgufModel {
    /// Part 1, which holds the model's metadata.
    pub fn first(&self) -> &GgufFile {
        &self.parts[0]
    }

    /// Every part, in order (one for a single file).
    pub fn parts(&self) -> &[GgufFile] {
        &self.parts
    }

    /// Path of part 1.
    pub fn path(&self) -> &Path {
        &self.first().path
    }

    /// Number of files.
    pub fn split_count(&self) -> u32 {
        u32::try_from(self.parts.len()).unwrap_or(u32::MAX)
    }

    /// Every tensor of every part.
    pub fn tensors(&self) -> impl Iterator<Item = &TensorInfo> {
        self.parts.iter().flat_map(|p| p.tensors.iter())
    }

    /// The tensor called `name`, in any part.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors().find(|t| t.name == name)
    }

    /// Number of tensors over all parts.
    pub fn tensor_count(&self) -> u64 {
        self.parts.iter().map(|p| p.tensors.len() as u64).sum()
    }

    /// Exact bytes of all tensor data over all parts (`n_bytes` in
    /// `llama_model_loader`).
    pub fn weight_bytes(&self) -> u64 {
        self.parts
            .iter()
            .fold(0u64, |acc, p| acc.saturating_add(p.weight_bytes()))
    }

    /// Total elements over all tensors (`n_elements` in `llama_model_loader`).
    pub fn parameter_count(&self) -> u64 {
        self.tensors()
            .fold(0u64, |acc, t| acc.saturating_add(t.elements()))
    }

    /// Sum of all parts' file sizes.
    pub fn file_size(&self) -> u64 {
        self.parts
            .iter()
            .fold(0u64, |acc, p| acc.saturating_add(p.file_size))
    }

    /// Bytes read from disk over all parts.
    pub fn header_bytes_read(&self) -> u64 {
        self.parts.iter().map(|p| p.header_bytes_read).sum()
    }
}

/// Reads the header of the GGUF file at `path` with the default limits.
pub fn read_header(path: &Path) -> Result<GgufFile, GgufError> {
    read_header_with_limits(path, &ReadLimits::default())
}

/// Reads the header of the GGUF file at `path` within `limits`.
pub fn read_header_with_limits(path: &Path, limits: &ReadLimits) -> Result<GgufFile, GgufError> {
    let io_err = |field: &str| {
        let field = field.to_owned();
        move |cause| GgufError::new(path, 0, field, GgufErrorKind::Io { cause })
    };
    // Stat before opening: opening a FIFO for reading would block.
    let meta = std::fs::metadata(path).map_err(io_err("file"))?;
    check_regular(path, &meta)?;
    let file = File::open(path).map_err(io_err("file"))?;
    let meta = file.metadata().map_err(io_err("file"))?;
    check_regular(path, &meta)?;
    read_header_from_with_limits(file, meta.len(), path, limits)
}

fn check_regular(path: &Path, meta: &std::fs::Metadata) -> Result<(), GgufError> {
    if meta.is_file() {
        return Ok(());
    }
    let kind = if meta.is_dir() {
        "a directory"
    } else {
        "a special file"
    };
    Err(GgufError::new(
        path.to_owned(),
        0,
        "file",
        GgufErrorKind::NotAFile { kind: kind.into() },
    ))
}

/// Reads a GGUF header from `reader`, which holds a file of `file_size`
/// bytes; `path` names it in errors. Reads at most
/// `min(file_size, max_header_bytes)` bytes. Used for in-memory input and by
/// the fuzzer.
pub fn read_header_from<R: Read>(
    reader: R,
    file_size: u64,
    path: &Path,
) -> Result<GgufFile, GgufError> {
    read_header_from_with_limits(reader, file_size, path, &ReadLimits::default())
}

/// [`read_header_from`] within `limits`.
pub fn read_header_from_with_limits<R: Read>(
    reader: R,
    file_size: u64,
    path: &Path,
    limits: &ReadLimits,
) -> Result<GgufFile, GgufError> {
    Parser::new(reader, file_size, path, limits).file()
}
