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

use super::types::{GgmlType, Value, ValueType};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, Read};
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

/// Why a GGUF header was refused. Every variant names the file, the byte
/// offset the problem was found at, and the field.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened, inspected or read.
    #[error("{}: at byte {offset}: {field}: {cause}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Where reading failed.
        offset: u64,
        /// What was being read.
        field: String,
        /// The I/O error (shown in the message, so not a `source`).
        cause: io::Error,
    },
    /// The path is not a regular file (a directory, FIFO, device...).
    #[error("{}: at byte {offset}: {field}: not a regular file ({kind})", path.display())]
    NotAFile {
        /// The path.
        path: PathBuf,
        /// Always 0.
        offset: u64,
        /// Always `file`.
        field: String,
        /// What it is instead.
        kind: String,
    },
    /// The file does not start with `GGUF`.
    #[error("{}: at byte {offset}: {field}: expected `GGUF`, found `{}`", path.display(), found.escape_ascii())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// Always 0.
        offset: u64,
        /// Always `magic`.
        field: String,
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The GGUF version is not 2 or 3.
    #[error("{}: at byte {offset}: {field}: version {version}: {reason}", path.display())]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// Always 4.
        offset: u64,
        /// Always `version`.
        field: String,
        /// The version read.
        version: u32,
        /// Why it is refused (as `gguf.cpp` explains it).
        reason: &'static str,
    },
    /// The file ends inside the header.
    #[error("{}: at byte {offset}: {field}: needs {needed} bytes but the file ends after {left}", path.display())]
    UnexpectedEof {
        /// The file.
        path: PathBuf,
        /// Where the field starts.
        offset: u64,
        /// The field being read.
        field: String,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file.
        left: u64,
    },
    /// The header is bigger than [`ReadLimits::max_header_bytes`].
    #[error("{}: at byte {offset}: {field}: the header goes past the {cap}-byte read cap", path.display())]
    HeaderTooLarge {
        /// The file.
        path: PathBuf,
        /// Where the field starts.
        offset: u64,
        /// The field being read.
        field: String,
        /// The cap.
        cap: u64,
    },
    /// A length is longer than this reader allows.
    #[error("{}: at byte {offset}: {field}: {what} {len} exceeds the maximum {max}", path.display())]
    TooLong {
        /// The file.
        path: PathBuf,
        /// Where the length is stored.
        offset: u64,
        /// The field.
        field: String,
        /// Which length (`string length`, `key length`, `tensor name length`).
        what: &'static str,
        /// The length read.
        len: u64,
        /// The maximum.
        max: u64,
    },
    /// A length or count needs more bytes than are left in the file.
    #[error("{}: at byte {offset}: {field}: {what} {count} exceeds the {left} bytes left (needs at least {needed})", path.display())]
    PastEnd {
        /// The file.
        path: PathBuf,
        /// Where the length or count is stored.
        offset: u64,
        /// The field.
        field: String,
        /// Which count (`string length`, `array count`, `tensor count`...).
        what: &'static str,
        /// The count read.
        count: u64,
        /// Least bytes that many items take.
        needed: u128,
        /// Bytes left in the file.
        left: u64,
    },
    /// More metadata values than [`ReadLimits::max_values`].
    #[error("{}: at byte {offset}: {field}: array count {count} brings the file to {total} values, more than the maximum {max}", path.display())]
    TooManyValues {
        /// The file.
        path: PathBuf,
        /// Where the array count is stored.
        offset: u64,
        /// The field.
        field: String,
        /// The array count.
        count: u64,
        /// Values with this array.
        total: u64,
        /// The maximum.
        max: u64,
    },
    /// A metadata value type id is not a `gguf_type`.
    #[error("{}: at byte {offset}: {field}: unknown value type {type_id}", path.display())]
    UnknownValueType {
        /// The file.
        path: PathBuf,
        /// Where the type id is stored.
        offset: u64,
        /// The field.
        field: String,
        /// The id read.
        type_id: u32,
    },
    /// Arrays nest deeper than [`ReadLimits::max_array_depth`].
    #[error("{}: at byte {offset}: {field}: arrays nest deeper than {max} levels", path.display())]
    NestingTooDeep {
        /// The file.
        path: PathBuf,
        /// Where the too-deep array starts.
        offset: u64,
        /// The field.
        field: String,
        /// The maximum depth.
        max: u32,
    },
    /// A metadata key is empty (`gguf.cpp`: "key is empty").
    #[error("{}: at byte {offset}: {field}: empty key", path.display())]
    EmptyKey {
        /// The file.
        path: PathBuf,
        /// Where the key is stored.
        offset: u64,
        /// The field.
        field: String,
    },
    /// A key or tensor name is not UTF-8.
    #[error("{}: at byte {offset}: {field}: {what} is not valid UTF-8", path.display())]
    InvalidUtf8 {
        /// The file.
        path: PathBuf,
        /// Where the string's bytes start.
        offset: u64,
        /// The field.
        field: String,
        /// `key` or `tensor name`.
        what: &'static str,
    },
    /// A metadata key appears twice.
    #[error("{}: at byte {offset}: {field}: duplicate key `{key}` (first at byte {first_offset})", path.display())]
    DuplicateKey {
        /// The file.
        path: PathBuf,
        /// Where the second key is stored.
        offset: u64,
        /// The field.
        field: String,
        /// The key.
        key: String,
        /// Where the first one's value is.
        first_offset: u64,
    },
    /// `general.alignment` is not a `uint32`.
    #[error("{}: at byte {offset}: {field}: must be of type U32 but is {found:?}", path.display())]
    AlignmentWrongType {
        /// The file.
        path: PathBuf,
        /// Where the value is stored.
        offset: u64,
        /// Always `general.alignment`.
        field: String,
        /// The type found.
        found: ValueType,
    },
    /// `general.alignment` is 0 or not a power of two.
    #[error("{}: at byte {offset}: {field}: alignment {value} is not a power of 2", path.display())]
    AlignmentNotPowerOfTwo {
        /// The file.
        path: PathBuf,
        /// Where the value is stored.
        offset: u64,
        /// Always `general.alignment`.
        field: String,
        /// The value.
        value: u32,
    },
    /// Two tensors share a name (in one file or across a split set).
    #[error("{}: at byte {offset}: {field}: duplicate tensor name `{name}` (first: {first})", path.display())]
    DuplicateTensor {
        /// The file holding the second one.
        path: PathBuf,
        /// Where the second one's info starts.
        offset: u64,
        /// The field.
        field: String,
        /// The name.
        name: String,
        /// Where the first one is.
        first: String,
    },
    /// `n_dims` is not in `1..=GGML_MAX_DIMS`.
    #[error("{}: at byte {offset}: {field}: {n_dims} dimensions, expected 1 to {MAX_DIMS}", path.display())]
    BadDimCount {
        /// The file.
        path: PathBuf,
        /// Where `n_dims` is stored.
        offset: u64,
        /// The field.
        field: String,
        /// The value.
        n_dims: u32,
    },
    /// A dimension is zero or negative (as `int64_t`).
    #[error("{}: at byte {offset}: {field}: ne[{dim}] = {} is not in 1..=INT64_MAX", path.display(), *value as i64)]
    BadDim {
        /// The file.
        path: PathBuf,
        /// Where the dimension is stored.
        offset: u64,
        /// The field.
        field: String,
        /// Which dimension.
        dim: u32,
        /// The raw value.
        value: u64,
    },
    /// The element count does not fit `int64_t`.
    #[error("{}: at byte {offset}: {field}: shape {dims:?} has more than INT64_MAX elements", path.display())]
    ElementCountOverflow {
        /// The file.
        path: PathBuf,
        /// Where the dimensions start.
        offset: u64,
        /// The field.
        field: String,
        /// The dimensions.
        dims: Vec<u64>,
    },
    /// A tensor type id this llama.cpp does not know.
    #[error("{}: at byte {offset}: {field}: unknown ggml type {type_id} (known: 0..{})", path.display(), GgmlType::COUNT)]
    UnknownTensorType {
        /// The file.
        path: PathBuf,
        /// Where the type id is stored.
        offset: u64,
        /// The field.
        field: String,
        /// The id.
        type_id: u32,
    },
    /// A tensor type llama.cpp has removed (ids 4, 5, 31..33, 36..38).
    #[error("{}: at byte {offset}: {field}: ggml type {type_id} has been removed from llama.cpp", path.display())]
    RemovedTensorType {
        /// The file.
        path: PathBuf,
        /// Where the type id is stored.
        offset: u64,
        /// The field.
        field: String,
        /// The id.
        type_id: u32,
    },
    /// `ne[0]` is not a whole number of blocks of the tensor's type.
    #[error("{}: at byte {offset}: {field}: {ne0} elements per row is not a multiple of the {ty} block size {}", path.display(), ty.block_size)]
    RowNotBlockMultiple {
        /// The file.
        path: PathBuf,
        /// Where the type id is stored.
        offset: u64,
        /// The field.
        field: String,
        /// `ne[0]`.
        ne0: u64,
        /// The type.
        ty: GgmlType,
    },
    /// The tensor's byte size (or its padded size) overflows 64 bits.
    #[error("{}: at byte {offset}: {field}: {ty} tensor of shape {dims:?} has a byte size that overflows", path.display())]
    TensorTooLarge {
        /// The file.
        path: PathBuf,
        /// Where the field is stored.
        offset: u64,
        /// The field.
        field: String,
        /// The dimensions.
        dims: Vec<u64>,
        /// The type.
        ty: GgmlType,
    },
    /// A tensor offset is not a multiple of the alignment.
    #[error("{}: at byte {offset}: {field}: offset {value} is not a multiple of the alignment {alignment}", path.display())]
    MisalignedTensorOffset {
        /// The file.
        path: PathBuf,
        /// Where the offset is stored.
        offset: u64,
        /// The field.
        field: String,
        /// The tensor offset (relative to the data section).
        value: u64,
        /// The alignment.
        alignment: u64,
    },
    /// A tensor's data starts before the previous tensor's (padded) end.
    #[error("{}: at byte {offset}: {field}: offset {value} overlaps the previous tensor, which ends at {expected}", path.display())]
    TensorOverlap {
        /// The file.
        path: PathBuf,
        /// Where the offset is stored.
        offset: u64,
        /// The field.
        field: String,
        /// The tensor offset (relative to the data section).
        value: u64,
        /// Where it must start.
        expected: u64,
    },
    /// A tensor's data does not start right after the previous tensor's
    /// padded end (`gguf.cpp`: "tensor has offset X, expected Y").
    #[error("{}: at byte {offset}: {field}: offset {value}, expected {expected}", path.display())]
    TensorOffsetMismatch {
        /// The file.
        path: PathBuf,
        /// Where the offset is stored.
        offset: u64,
        /// The field.
        field: String,
        /// The tensor offset (relative to the data section).
        value: u64,
        /// Where it must start.
        expected: u64,
    },
    /// The data section would start past the end of the file.
    #[error("{}: at byte {offset}: {field}: data section starts at {data_offset}, past the end of the {file_size}-byte file", path.display())]
    DataSectionPastEof {
        /// The file.
        path: PathBuf,
        /// End of the header.
        offset: u64,
        /// Always `data section`.
        field: String,
        /// Where the data section would start.
        data_offset: u64,
        /// The file size.
        file_size: u64,
    },
    /// A tensor's data is not within the file (`llama_tensor_weight`: "data
    /// is not within the file bounds").
    #[error("{}: at byte {offset}: {field}: data {start}..{end} is not within the {file_size}-byte file", path.display())]
    TensorPastEof {
        /// The file.
        path: PathBuf,
        /// Where the tensor's offset is stored.
        offset: u64,
        /// The field.
        field: String,
        /// Absolute start of the data.
        start: u64,
        /// Absolute end (exclusive), saturated.
        end: u64,
        /// The file size.
        file_size: u64,
    },
    /// A part of a split set does not exist.
    #[error("{}: at byte {offset}: {field}: part {index} of {count}, `{}`, is missing", path.display(), part.display())]
    SplitPartMissing {
        /// Part 1 of the set.
        path: PathBuf,
        /// Where `split.count` is stored in part 1.
        offset: u64,
        /// Always `split.count`.
        field: String,
        /// The missing part's path.
        part: PathBuf,
        /// 1-based part number.
        index: u32,
        /// Parts in the set.
        count: u32,
    },
    /// This file is a later part of a split set; read part 1 instead.
    #[error("{}: at byte {offset}: {field}: this is part {index} of a split set; load part 1{}", path.display(), first.as_ref().map(|p| format!(" `{}`", p.display())).unwrap_or_default())]
    SplitNotFirst {
        /// The file.
        path: PathBuf,
        /// Where `split.no` is stored.
        offset: u64,
        /// Always `split.no`.
        field: String,
        /// 1-based part number.
        index: u64,
        /// Part 1's path, when the file name follows the split pattern.
        first: Option<PathBuf>,
    },
    /// Split metadata and file names disagree.
    #[error("{}: at byte {offset}: {field}: {reason}", path.display())]
    SplitMismatch {
        /// The file.
        path: PathBuf,
        /// Where the key's value is stored (0 when the key is absent).
        offset: u64,
        /// The key.
        field: String,
        /// What disagrees.
        reason: String,
    },
}

impl GgufError {
    /// The file the error is about.
    pub fn path(&self) -> &Path {
        self.parts().0
    }

    /// Byte offset of the problem.
    pub fn offset(&self) -> u64 {
        self.parts().1
    }

    /// The field the problem is in.
    pub fn field(&self) -> &str {
        self.parts().2
    }

    fn parts(&self) -> (&Path, u64, &str) {
        macro_rules! parts {
            ($($variant:ident),*) => {
                match self {
                    $(GgufError::$variant { path, offset, field, .. })|* => {
                        (path.as_path(), *offset, field.as_str())
                    }
                }
            };
        }
        parts!(
            Io,
            NotAFile,
            BadMagic,
            UnsupportedVersion,
            UnexpectedEof,
            HeaderTooLarge,
            TooLong,
            PastEnd,
            TooManyValues,
            UnknownValueType,
            NestingTooDeep,
            EmptyKey,
            InvalidUtf8,
            DuplicateKey,
            AlignmentWrongType,
            AlignmentNotPowerOfTwo,
            DuplicateTensor,
            BadDimCount,
            BadDim,
            ElementCountOverflow,
            UnknownTensorType,
            RemovedTensorType,
            RowNotBlockMultiple,
            TensorTooLarge,
            MisalignedTensorOffset,
            TensorOverlap,
            TensorOffsetMismatch,
            DataSectionPastEof,
            TensorPastEof,
            SplitPartMissing,
            SplitNotFirst,
            SplitMismatch
        )
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
        move |cause| GgufError::Io {
            path: path.to_owned(),
            offset: 0,
            field,
            cause,
        }
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
    Err(GgufError::NotAFile {
        path: path.to_owned(),
        offset: 0,
        field: "file".into(),
        kind: kind.into(),
    })
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
    let limit = file_size.min(limits.max_header_bytes);
    let mut p = Parser {
        r: BufReader::with_capacity(
            READ_BUF_BYTES,
            Counting {
                inner: reader.take(limit),
                count: 0,
            },
        ),
        pos: 0,
        limit,
        file_size,
        path,
        limits,
        values: 0,
    };
    p.file()
}

/// Counts bytes pulled from the underlying reader.
struct Counting<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// Describes the field being read; only called when building an error.
type Field<'f> = &'f dyn Fn() -> String;

struct Parser<'a, R: Read> {
    r: BufReader<Counting<io::Take<R>>>,
    /// Bytes consumed so far (= offset of the next field).
    pos: u64,
    /// Most bytes that may be consumed: `min(file_size, max_header_bytes)`.
    limit: u64,
    file_size: u64,
    path: &'a Path,
    limits: &'a ReadLimits,
    /// Metadata values decoded so far.
    values: u64,
}

impl<R: Read> Parser<'_, R> {
    fn path(&self) -> PathBuf {
        self.path.to_owned()
    }

    /// Fails unless `n` more bytes may be read: they must exist in the file
    /// and stay under the header cap.
    fn need(&self, n: u64, field: Field) -> Result<(), GgufError> {
        let file_left = self.file_size.saturating_sub(self.pos);
        if n > file_left {
            return Err(GgufError::UnexpectedEof {
                path: self.path(),
                offset: self.pos,
                field: field(),
                needed: n,
                left: file_left,
            });
        }
        if n > self.limit.saturating_sub(self.pos) {
            return Err(self.too_large(self.pos, field));
        }
        Ok(())
    }

    fn too_large(&self, offset: u64, field: Field) -> GgufError {
        GgufError::HeaderTooLarge {
            path: self.path(),
            offset,
            field: field(),
            cap: self.limits.max_header_bytes,
        }
    }

    /// Fails unless `count` items of at least `min_size` bytes each can fit
    /// in what is left; `at` is where the count was stored.
    fn check_count(
        &self,
        at: u64,
        what: &'static str,
        count: u64,
        min_size: u64,
        field: Field,
    ) -> Result<(), GgufError> {
        let needed = u128::from(count) * u128::from(min_size);
        let file_left = self.file_size.saturating_sub(self.pos);
        if needed > u128::from(file_left) {
            return Err(GgufError::PastEnd {
                path: self.path(),
                offset: at,
                field: field(),
                what,
                count,
                needed,
                left: file_left,
            });
        }
        if needed > u128::from(self.limit.saturating_sub(self.pos)) {
            return Err(self.too_large(at, field));
        }
        Ok(())
    }

    fn fill(&mut self, buf: &mut [u8], field: Field) -> Result<(), GgufError> {
        self.need(buf.len() as u64, field)?;
        self.r.read_exact(buf).map_err(|cause| GgufError::Io {
            path: self.path.to_owned(),
            offset: self.pos,
            field: field(),
            cause,
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, field: Field) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.fill(&mut b, field)?;
        Ok(b)
    }

    fn u32(&mut self, field: Field) -> Result<u32, GgufError> {
        self.array(field).map(u32::from_le_bytes)
    }

    fn u64(&mut self, field: Field) -> Result<u64, GgufError> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// A GGUF string (u64 length + bytes), at most `max` bytes long.
    fn string_bytes(
        &mut self,
        max: u64,
        what: &'static str,
        field: Field,
    ) -> Result<Vec<u8>, GgufError> {
        let at = self.pos;
        let len = self.u64(field)?;
        self.check_count(at, what, len, 1, field)?;
        if len > max {
            return Err(GgufError::TooLong {
                path: self.path(),
                offset: at,
                field: field(),
                what,
                len,
                max,
            });
        }
        // `len` is at most the bytes left under the cap, checked above.
        let mut buf = vec![0u8; len as usize];
        self.fill(&mut buf, field)?;
        Ok(buf)
    }

    fn utf8(
        &self,
        bytes: Vec<u8>,
        at: u64,
        what: &'static str,
        field: Field,
    ) -> Result<String, GgufError> {
        String::from_utf8(bytes).map_err(|_| GgufError::InvalidUtf8 {
            path: self.path(),
            offset: at + 8,
            field: field(),
            what,
        })
    }

    fn value_type(&mut self, field: Field) -> Result<ValueType, GgufError> {
        let at = self.pos;
        let id = self.u32(field)?;
        ValueType::from_id(id).ok_or_else(|| GgufError::UnknownValueType {
            path: self.path(),
            offset: at,
            field: field(),
            type_id: id,
        })
    }

    fn value(&mut self, ty: ValueType, depth: u32, field: Field) -> Result<Value, GgufError> {
        Ok(match ty {
            ValueType::U8 => Value::U8(u8::from_le_bytes(self.array(field)?)),
            ValueType::I8 => Value::I8(i8::from_le_bytes(self.array(field)?)),
            ValueType::U16 => Value::U16(u16::from_le_bytes(self.array(field)?)),
            ValueType::I16 => Value::I16(i16::from_le_bytes(self.array(field)?)),
            ValueType::U32 => Value::U32(u32::from_le_bytes(self.array(field)?)),
            ValueType::I32 => Value::I32(i32::from_le_bytes(self.array(field)?)),
            ValueType::F32 => Value::F32(f32::from_le_bytes(self.array(field)?)),
            // gguf.cpp `gguf_reader::read(bool &)`: any non-zero byte is true.
            ValueType::Bool => Value::Bool(self.array::<1>(field)?[0] != 0),
            ValueType::String => {
                let bytes =
                    self.string_bytes(self.limits.max_string_len, "string length", field)?;
                Value::String(match String::from_utf8(bytes) {
                    Ok(s) => s,
                    Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
                })
            }
            ValueType::U64 => Value::U64(u64::from_le_bytes(self.array(field)?)),
            ValueType::I64 => Value::I64(i64::from_le_bytes(self.array(field)?)),
            ValueType::F64 => Value::F64(f64::from_le_bytes(self.array(field)?)),
            ValueType::Array => {
                // gguf.cpp refuses nested arrays ("invalid GGUF type" for an
                // array of arrays); the GGUF spec and gguf-py allow them, so
                // they are read here, to a bounded depth.
                if depth >= self.limits.max_array_depth {
                    return Err(GgufError::NestingTooDeep {
                        path: self.path(),
                        offset: self.pos,
                        field: field(),
                        max: self.limits.max_array_depth,
                    });
                }
                let elem = self.value_type(field)?;
                let at = self.pos;
                let count = self.u64(field)?;
                self.check_count(at, "array count", count, min_value_bytes(elem), field)?;
                let total = self.values.saturating_add(count);
                if total > self.limits.max_values {
                    return Err(GgufError::TooManyValues {
                        path: self.path(),
                        offset: at,
                        field: field(),
                        count,
                        total,
                        max: self.limits.max_values,
                    });
                }
                self.values = total;
                let mut items = Vec::with_capacity(count.min(MAX_PREALLOC) as usize);
                for i in 0..count {
                    let elem_field = || format!("{} element {i}", field());
                    items.push(self.value(elem, depth + 1, &elem_field)?);
                }
                Value::Array(elem, items)
            }
        })
    }

    fn file(&mut self) -> Result<GgufFile, GgufError> {
        // Magic and version (gguf.cpp `gguf_init_from_reader`, "file magic"
        // and "header").
        let magic: [u8; 4] = self.array(&|| "magic".into())?;
        if &magic != b"GGUF" {
            return Err(GgufError::BadMagic {
                path: self.path(),
                offset: 0,
                field: "magic".into(),
                found: magic,
            });
        }
        let version = self.u32(&|| "version".into())?;
        let refuse = |reason| GgufError::UnsupportedVersion {
            path: self.path(),
            offset: 4,
            field: "version".into(),
            version,
            reason,
        };
        if version == 0 {
            return Err(refuse("bad GGUF version"));
        }
        if version & 0xFFFF == 0 {
            return Err(refuse(
                "extremely large; is the file big-endian? only little-endian GGUF is read",
            ));
        }
        if version == 1 {
            return Err(refuse("GGUF v1 is no longer supported by llama.cpp"));
        }
        if version > GGUF_VERSION {
            return Err(refuse("newer than GGUF v3, the latest this reader knows"));
        }

        let at = self.pos;
        let tensors_field = || "tensor count".to_owned();
        let n_tensors = self.u64(&tensors_field)?;
        // Checked against what is left after both counts (16 bytes).
        self.check_count(
            at,
            "tensor count",
            n_tensors,
            MIN_TENSOR_INFO_BYTES,
            &tensors_field,
        )?;
        let at = self.pos;
        let kv_field = || "metadata count".to_owned();
        let n_kv = self.u64(&kv_field)?;
        self.check_count(at, "metadata count", n_kv, MIN_KV_BYTES, &kv_field)?;

        // Metadata.
        let mut metadata: Vec<(String, Value)> =
            Vec::with_capacity(n_kv.min(MAX_PREALLOC) as usize);
        let mut value_offsets = Vec::with_capacity(n_kv.min(MAX_PREALLOC) as usize);
        let mut index: HashMap<String, usize> = HashMap::new();
        for i in 0..n_kv {
            let key_at = self.pos;
            let key_field = || format!("metadata key #{i}");
            let bytes = self.string_bytes(self.limits.max_key_len, "key length", &key_field)?;
            if bytes.is_empty() {
                return Err(GgufError::EmptyKey {
                    path: self.path(),
                    offset: key_at,
                    field: key_field(),
                });
            }
            let key = self.utf8(bytes, key_at, "key", &key_field)?;
            let field = || format!("metadata key #{i} `{key}`");
            if let Some(&first) = index.get(&key) {
                return Err(GgufError::DuplicateKey {
                    path: self.path(),
                    offset: key_at,
                    field: field(),
                    key: key.clone(),
                    first_offset: value_offsets[first],
                });
            }
            let ty = self.value_type(&field)?;
            let value_at = self.pos;
            self.values = self.values.saturating_add(1);
            let value = self.value(ty, 0, &field)?;
            index.insert(key.clone(), metadata.len());
            value_offsets.push(value_at);
            metadata.push((key, value));
        }

        // general.alignment: must be a u32 power of two (gguf.cpp, after the
        // key-value pairs).
        let alignment = match index.get(KEY_ALIGNMENT) {
            None => DEFAULT_ALIGNMENT,
            Some(&i) => {
                let offset = value_offsets[i];
                match metadata[i].1 {
                    Value::U32(a) if a.is_power_of_two() => u64::from(a),
                    Value::U32(a) => {
                        return Err(GgufError::AlignmentNotPowerOfTwo {
                            path: self.path(),
                            offset,
                            field: KEY_ALIGNMENT.into(),
                            value: a,
                        });
                    }
                    ref other => {
                        return Err(GgufError::AlignmentWrongType {
                            path: self.path(),
                            offset,
                            field: KEY_ALIGNMENT.into(),
                            found: other.value_type(),
                        });
                    }
                }
            }
        };

        // Tensor infos (gguf.cpp "read the tensor info"), with the running
        // offset check of "compute the total size of the data section".
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors.min(MAX_PREALLOC) as usize);
        let mut offset_fields: Vec<u64> = Vec::with_capacity(tensors.capacity());
        let mut names: HashMap<String, u64> = HashMap::new();
        let mut expected: u64 = 0;
        for i in 0..n_tensors {
            let info_at = self.pos;
            let name_field = || format!("tensor #{i} name");
            let bytes =
                self.string_bytes(MAX_TENSOR_NAME_LEN, "tensor name length", &name_field)?;
            let name = self.utf8(bytes, info_at, "tensor name", &name_field)?;
            let field = |part: &str| format!("tensor #{i} `{name}` {part}");
            if let Some(&first) = names.get(&name) {
                return Err(GgufError::DuplicateTensor {
                    path: self.path(),
                    offset: info_at,
                    field: field("name"),
                    name: name.clone(),
                    first: format!("tensor info at byte {first}"),
                });
            }

            let nd_at = self.pos;
            let n_dims = self.u32(&|| field("n_dims"))?;
            // gguf.cpp accepts n_dims = 0 (a scalar); no llama.cpp writer
            // emits it (`ggml_n_dims` is at least 1), so it is refused here.
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::BadDimCount {
                    path: self.path(),
                    offset: nd_at,
                    field: field("n_dims"),
                    n_dims,
                });
            }
            let dims_at = self.pos;
            let mut dims = Vec::with_capacity(n_dims as usize);
            let mut elements: Option<u64> = Some(1);
            for j in 0..n_dims {
                let at = self.pos;
                let d = self.u64(&|| field(&format!("ne[{j}]")))?;
                // gguf.cpp refuses ne < 0 and allows 0; a zero-element
                // tensor in a model is refused here as corrupt.
                if d == 0 || d > i64::MAX as u64 {
                    return Err(GgufError::BadDim {
                        path: self.path(),
                        offset: at,
                        field: field(&format!("ne[{j}]")),
                        dim: j,
                        value: d,
                    });
                }
                dims.push(d);
                elements = elements
                    .and_then(|n| n.checked_mul(d))
                    .filter(|&n| n <= i64::MAX as u64);
            }
            let Some(elements) = elements else {
                return Err(GgufError::ElementCountOverflow {
                    path: self.path(),
                    offset: dims_at,
                    field: field("dims"),
                    dims,
                });
            };

            let type_at = self.pos;
            let type_id = self.u32(&|| field("type"))?;
            let ty = match GgmlType::from_id(type_id) {
                Some(ty) => ty,
                None if GgmlType::is_removed_id(type_id) => {
                    return Err(GgufError::RemovedTensorType {
                        path: self.path(),
                        offset: type_at,
                        field: field("type"),
                        type_id,
                    });
                }
                None => {
                    return Err(GgufError::UnknownTensorType {
                        path: self.path(),
                        offset: type_at,
                        field: field("type"),
                        type_id,
                    });
                }
            };
            if !dims[0].is_multiple_of(ty.block_size) {
                return Err(GgufError::RowNotBlockMultiple {
                    path: self.path(),
                    offset: type_at,
                    field: field("type"),
                    ne0: dims[0],
                    ty,
                });
            }
            let path = self.path;
            let too_large = |dims: Vec<u64>| GgufError::TensorTooLarge {
                path: path.to_owned(),
                offset: type_at,
                field: field("type"),
                dims,
                ty,
            };
            let Some(bytes) = (elements / ty.block_size).checked_mul(ty.type_size) else {
                return Err(too_large(dims));
            };
            let Some(padded) = align_up(bytes, alignment) else {
                return Err(too_large(dims));
            };

            let off_at = self.pos;
            let off_field = || field("offset");
            let rel = self.u64(&off_field)?;
            if !rel.is_multiple_of(alignment) {
                return Err(GgufError::MisalignedTensorOffset {
                    path: self.path(),
                    offset: off_at,
                    field: off_field(),
                    value: rel,
                    alignment,
                });
            }
            if rel < expected {
                return Err(GgufError::TensorOverlap {
                    path: self.path(),
                    offset: off_at,
                    field: off_field(),
                    value: rel,
                    expected,
                });
            }
            if rel != expected {
                return Err(GgufError::TensorOffsetMismatch {
                    path: self.path(),
                    offset: off_at,
                    field: off_field(),
                    value: rel,
                    expected,
                });
            }
            let Some(next) = expected.checked_add(padded) else {
                return Err(too_large(dims));
            };
            expected = next;
            names.insert(name.clone(), info_at);
            offset_fields.push(off_at);
            tensors.push(TensorInfo {
                name,
                ty,
                dims,
                offset: rel,
                bytes,
                info_offset: info_at,
            });
        }

        // Data section: gguf.cpp seeks to the padded header end only when
        // there are tensors, and fails if that is past the end of the file.
        let header_len = self.pos;
        let data_offset = if tensors.is_empty() {
            header_len
        } else {
            match align_up(header_len, alignment) {
                Some(d) if d <= self.file_size => d,
                d => {
                    return Err(GgufError::DataSectionPastEof {
                        path: self.path(),
                        offset: header_len,
                        field: "data section".into(),
                        data_offset: d.unwrap_or(u64::MAX),
                        file_size: self.file_size,
                    });
                }
            }
        };
        // llama_tensor_weight: every tensor's data must lie within the file.
        for (t, &off_at) in tensors.iter_mut().zip(&offset_fields) {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.bytes));
            match (start, end) {
                (Some(start), Some(end)) if end <= self.file_size => t.offset = start,
                (start, end) => {
                    return Err(GgufError::TensorPastEof {
                        path: self.path(),
                        offset: off_at,
                        field: format!("tensor `{}` data", t.name),
                        start: start.unwrap_or(u64::MAX),
                        end: end.unwrap_or(u64::MAX),
                        file_size: self.file_size,
                    });
                }
            }
        }

        Ok(GgufFile {
            path: self.path(),
            version,
            metadata,
            alignment,
            tensors,
            header_len,
            data_offset,
            file_size: self.file_size,
            header_bytes_read: self.r.get_ref().count,
            index,
            value_offsets,
        })
    }
}

/// Least bytes one value of type `ty` takes in a file.
fn min_value_bytes(ty: ValueType) -> u64 {
    match ty {
        ValueType::U8 | ValueType::I8 | ValueType::Bool => 1,
        ValueType::U16 | ValueType::I16 => 2,
        ValueType::U32 | ValueType::I32 | ValueType::F32 => 4,
        ValueType::U64 | ValueType::I64 | ValueType::F64 => 8,
        // The length prefix.
        ValueType::String => 8,
        // Element type + count.
        ValueType::Array => 4 + 8,
    }
}

/// `n` rounded up to a multiple of `align` (a power of two), or `None` on
/// overflow (`GGML_PAD`).
fn align_up(n: u64, align: u64) -> Option<u64> {
    Some(n.checked_add(align - 1)? & !(align - 1))
}

/// Splits a split-set part name `NAME-00002-of-00003.gguf` into
/// `("NAME", 2, 3)`: the format of `llama_split_path` in `src/llama.cpp`
/// (`"%s-%05d-of-%05d.gguf"`, part numbers from 1).
pub fn parse_split_name(file_name: &str) -> Option<(&str, u32, u32)> {
    let stem = file_name.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, no) = rest.rsplit_once('-')?;
    let no = parse_split_number(no)?;
    let count = parse_split_number(count)?;
    (!prefix.is_empty() && no >= 1 && no <= count).then_some((prefix, no, count))
}

/// A `%05d` number exactly as `llama_split_path` prints it.
fn parse_split_number(s: &str) -> Option<u32> {
    if s.len() < 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u32 = s.parse().ok()?;
    (format!("{n:05}") == s).then_some(n)
}

/// The file name of part `no` (from 1) of `count` (`llama_split_path`).
pub fn split_part_name(prefix: &str, no: u32, count: u32) -> String {
    format!("{prefix}-{no:05}-of-{count:05}.gguf")
}

/// Reads a model: one GGUF file, or when part 1 of a split set is given
/// (`split.count` > 1), every part's header. Metadata comes from part 1;
/// tensors are the union; each part's tensors are checked against that
/// part's size. Follows `llama_model_loader::llama_model_loader` in
/// `src/llama-model-loader.cpp`.
pub fn read_model(path: &Path) -> Result<GgufModel, GgufError> {
    read_model_with_limits(path, &ReadLimits::default())
}

/// [`read_model`] within `limits` (per part).
pub fn read_model_with_limits(path: &Path, limits: &ReadLimits) -> Result<GgufModel, GgufError> {
    let first = read_header_with_limits(path, limits)?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let by_name = parse_split_name(name);
    let mismatch = |file: &GgufFile, key: &str, reason: String| GgufError::SplitMismatch {
        path: file.path.clone(),
        offset: file.value_offset(key).unwrap_or(0),
        field: key.into(),
        reason,
    };
    let split_key = |file: &GgufFile, key: &str| -> Result<Option<u64>, GgufError> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                mismatch(
                    file,
                    key,
                    format!("expected an unsigned integer, found {:?}", v.value_type()),
                )
            }),
        }
    };

    let count = split_key(&first, KEY_SPLIT_COUNT)?.unwrap_or(0);
    let no = split_key(&first, KEY_SPLIT_NO)?;
    // llama.cpp reads split.count as a uint16_t.
    if count > u64::from(u16::MAX) {
        return Err(mismatch(
            &first,
            KEY_SPLIT_COUNT,
            format!("{count} parts is more than {}", u16::MAX),
        ));
    }
    if count <= 1 {
        // llama.cpp loads additional parts only when split.count > 1.
        if let Some((_, n, c)) = by_name.filter(|&(_, _, c)| c > 1) {
            return Err(mismatch(
                &first,
                KEY_SPLIT_COUNT,
                format!("file name says part {n} of {c} but `split.count` is {count}"),
            ));
        }
        return Ok(GgufModel::from(first));
    }
    let count = count as u32;
    match no {
        Some(0) => {}
        Some(idx) => {
            let first_part =
                by_name.map(|(prefix, _, c)| path.with_file_name(split_part_name(prefix, 1, c)));
            return Err(GgufError::SplitNotFirst {
                path: first.path.clone(),
                offset: first.value_offset(KEY_SPLIT_NO).unwrap_or(0),
                field: KEY_SPLIT_NO.into(),
                index: idx.saturating_add(1),
                first: first_part,
            });
        }
        None => {
            return Err(mismatch(
                &first,
                KEY_SPLIT_NO,
                format!("missing, but `split.count` is {count}"),
            ));
        }
    }
    // llama_split_prefix: the name must end in -00001-of-{count}.gguf.
    let prefix = match by_name {
        Some((prefix, 1, c)) if c == count => prefix,
        _ => {
            return Err(mismatch(
                &first,
                KEY_SPLIT_COUNT,
                format!(
                    "`split.count` is {count} but the file name `{name}` does not end in `{}`",
                    split_part_name("", 1, count)
                ),
            ));
        }
    };

    let mut seen: HashMap<String, (usize, u64)> = HashMap::new();
    for t in &first.tensors {
        seen.insert(t.name.clone(), (0, t.info_offset));
    }
    let count_at = first.value_offset(KEY_SPLIT_COUNT).unwrap_or(0);
    let mut parts = vec![first];
    for idx in 1..count {
        let part_path = path.with_file_name(split_part_name(prefix, idx + 1, count));
        match std::fs::symlink_metadata(&part_path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(GgufError::SplitPartMissing {
                    path: path.to_owned(),
                    offset: count_at,
                    field: KEY_SPLIT_COUNT.into(),
                    part: part_path,
                    index: idx + 1,
                    count,
                });
            }
            _ => {}
        }
        let part = read_header_with_limits(&part_path, limits)?;
        match split_key(&part, KEY_SPLIT_NO)? {
            Some(n) if n == u64::from(idx) => {}
            found => {
                return Err(mismatch(
                    &part,
                    KEY_SPLIT_NO,
                    match found {
                        Some(n) => format!("is {n}, expected {idx} for part {}", idx + 1),
                        None => format!("missing in part {} of {count}", idx + 1),
                    },
                ));
            }
        }
        for t in &part.tensors {
            if let Some(&(p, at)) = seen.get(&t.name) {
                return Err(GgufError::DuplicateTensor {
                    path: part.path.clone(),
                    offset: t.info_offset,
                    field: format!("tensor `{}` name", t.name),
                    name: t.name.clone(),
                    first: format!("tensor info at byte {at} of `{}`", parts[p].path.display()),
                });
            }
            seen.insert(t.name.clone(), (parts.len(), t.info_offset));
        }
        parts.push(part);
    }
    let model = GgufModel { parts };
    // llama.cpp requires split.tensors.count and checks it.
    let first = model.first();
    let total = model.tensor_count();
    match split_key(first, KEY_SPLIT_TENSORS_COUNT)? {
        Some(n) if n == total => Ok(model),
        Some(n) => Err(mismatch(
            first,
            KEY_SPLIT_TENSORS_COUNT,
            format!("is {n} but the {count} parts hold {total} tensors"),
        )),
        None => Err(mismatch(
            first,
            KEY_SPLIT_TENSORS_COUNT,
            format!("missing in a split set of {count} parts"),
        )),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests unwrap what they built themselves.
mod tests {
    use super::*;
    use crate::gguf::write::{GgufWriter, TensorData};
    use std::io::Cursor;

    fn every_value() -> Vec<(&'static str, Value)> {
        vec![
            ("t.u8", Value::U8(200)),
            ("t.i8", Value::I8(-100)),
            ("t.u16", Value::U16(60000)),
            ("t.i16", Value::I16(-30000)),
            ("t.u32", Value::U32(4_000_000_000)),
            ("t.i32", Value::I32(-2_000_000_000)),
            ("t.f32", Value::F32(1.5e-5)),
            ("t.bool.true", Value::Bool(true)),
            ("t.bool.false", Value::Bool(false)),
            ("t.string", Value::String("héllo wörld".into())),
            ("t.string.empty", Value::String(String::new())),
            ("t.u64", Value::U64(u64::MAX)),
            ("t.i64", Value::I64(i64::MIN)),
            ("t.f64", Value::F64(-2.5e300)),
            (
                "t.arr.u8",
                Value::Array(ValueType::U8, vec![Value::U8(1), Value::U8(2)]),
            ),
            (
                "t.arr.f32",
                Value::Array(ValueType::F32, vec![Value::F32(0.5), Value::F32(-1.0)]),
            ),
            (
                "t.arr.str",
                Value::Array(
                    ValueType::String,
                    vec![Value::String("<s>".into()), Value::String("</s>".into())],
                ),
            ),
            ("t.arr.empty", Value::Array(ValueType::I64, vec![])),
            (
                "t.arr.nested",
                Value::Array(
                    ValueType::Array,
                    vec![
                        Value::Array(ValueType::I32, vec![Value::I32(1), Value::I32(-2)]),
                        Value::Array(
                            ValueType::Array,
                            vec![Value::Array(ValueType::Bool, vec![Value::Bool(true)])],
                        ),
                        Value::Array(ValueType::String, vec![]),
                    ],
                ),
            ),
        ]
    }

    fn writer_with_everything(version: u32) -> GgufWriter {
        let mut w = GgufWriter::new();
        w.version(version);
        for (k, v) in every_value() {
            w.meta(k, v);
        }
        w.tensor(
            "a",
            GgmlType::F32,
            &[3, 2],
            TensorData::Bytes((0u8..24).collect()),
        );
        w.tensor(
            "b.q8",
            GgmlType::Q8_0,
            &[64],
            TensorData::Bytes(vec![7; 68]),
        );
        w.tensor("c", GgmlType::F16, &[5], TensorData::Bytes(vec![9; 10]));
        w
    }

    #[test]
    fn every_value_type_round_trips_in_v2_and_v3() {
        let dir = tempfile::tempdir().unwrap();
        for version in [2, 3] {
            let path = dir.path().join(format!("v{version}.gguf"));
            let w = writer_with_everything(version);
            let size = w.write_to(&path).unwrap();
            let f = read_header(&path).unwrap();
            assert_eq!(f.version, version);
            assert_eq!(f.file_size, size);
            let expected: Vec<(String, Value)> = every_value()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect();
            assert_eq!(f.metadata, expected);
            for (k, v) in &expected {
                assert_eq!(f.get(k), Some(v), "{k}");
            }
            assert_eq!(f.get_u64("t.u32"), Some(4_000_000_000));
            assert_eq!(f.get_u64("t.i8"), None);
            assert_eq!(f.get_str("t.string"), Some("héllo wörld"));
            assert_eq!(f.get_f64("t.f64"), Some(-2.5e300));
            assert_eq!(f.array_len("t.arr.str"), Some(2));
            assert_eq!(f.get_u64_array("t.arr.u8"), Some(vec![1, 2]));
            assert_eq!(f.get_str_array("t.arr.str"), Some(vec!["<s>", "</s>"]));
            assert_eq!(f.get_u64_array("t.arr.f32"), None);
            assert_eq!(f.get("missing"), None);

            let (header, offsets) = w.header_bytes().unwrap();
            assert_eq!(f.data_offset, header.len() as u64);
            assert_eq!(f.alignment, 32);
            let names: Vec<_> = f.tensors.iter().map(|t| t.name.as_str()).collect();
            assert_eq!(names, ["a", "b.q8", "c"]);
            assert_eq!(f.tensors[0].dims, [3, 2]);
            assert_eq!(f.tensors[1].ty, GgmlType::Q8_0);
            assert_eq!(f.tensors[1].bytes, 68);
            assert_eq!(f.tensors[1].elements(), 64);
            for (t, off) in f.tensors.iter().zip(offsets) {
                assert_eq!(t.offset, f.data_offset + off);
            }
            assert_eq!(f.weight_bytes(), 24 + 68 + 10);

            // The same bytes from memory parse the same, except I/O counts.
            let bytes = std::fs::read(&path).unwrap();
            let g = read_header_from(Cursor::new(&bytes), bytes.len() as u64, &path).unwrap();
            assert_eq!(
                GgufFile {
                    header_bytes_read: 0,
                    ..g
                },
                GgufFile {
                    header_bytes_read: 0,
                    ..f
                }
            );
        }
    }

    #[test]
    fn tensor_offsets_point_at_the_tensor_bytes_for_every_alignment() {
        let dir = tempfile::tempdir().unwrap();
        for align in [1u32, 8, 32, 64, 4096] {
            let mut w = GgufWriter::new();
            w.meta(KEY_ALIGNMENT, Value::U32(align));
            w.meta(
                "general.name",
                Value::String("x".repeat(align as usize % 7)),
            );
            let data: Vec<Vec<u8>> = (0..3u8)
                .map(|i| vec![i + 1; 4 * (5 + i as usize)])
                .collect();
            for (i, d) in data.iter().enumerate() {
                w.tensor(
                    &format!("t{i}"),
                    GgmlType::F32,
                    &[d.len() as u64 / 4],
                    TensorData::Bytes(d.clone()),
                );
            }
            let path = dir.path().join(format!("align{align}.gguf"));
            w.write_to(&path).unwrap();
            let f = read_header(&path).unwrap();
            assert_eq!(f.alignment, u64::from(align));
            assert_eq!(f.data_offset % u64::from(align), 0);
            assert!(
                f.data_offset >= f.header_len && f.data_offset - f.header_len < u64::from(align)
            );
            let bytes = std::fs::read(&path).unwrap();
            for (t, d) in f.tensors.iter().zip(&data) {
                assert_eq!((t.offset - f.data_offset) % u64::from(align), 0);
                let start = t.offset as usize;
                assert_eq!(
                    &bytes[start..start + t.bytes as usize],
                    d.as_slice(),
                    "align {align}"
                );
            }
        }
    }

    #[test]
    fn a_file_without_tensors_has_its_data_section_at_the_header_end() {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String("llama".into()));
        let (mut bytes, _) = w.header_bytes().unwrap();
        // gguf.cpp only seeks to the padded offset when there are tensors,
        // so a file cut right after the metadata is fine.
        let end = bytes.len() - (bytes.len() % 32);
        let f = read_header_from(&bytes[..], bytes.len() as u64, Path::new("m.gguf")).unwrap();
        assert_eq!(f.data_offset, f.header_len);
        bytes.truncate(f.header_len as usize);
        assert!(end <= bytes.len() + 32);
        read_header_from(&bytes[..], bytes.len() as u64, Path::new("m.gguf")).unwrap();
    }

    #[test]
    fn a_sparse_model_reads_only_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.gguf");
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String("llama".into()));
        // 16 GiB of Q4_0 weights in two holes.
        let dims = [8192u64, 8192, 128];
        w.tensor(
            "blk.0.ffn_up.weight",
            GgmlType::Q4_0,
            &dims,
            TensorData::Hole,
        );
        w.tensor(
            "blk.1.ffn_up.weight",
            GgmlType::Q4_0,
            &dims,
            TensorData::Hole,
        );
        let size = w.write_to(&path).unwrap();
        let f = read_header(&path).unwrap();
        let per = 8192 / 32 * 18 * 8192 * 128;
        assert_eq!(f.weight_bytes(), 2 * per);
        assert_eq!(f.file_size, size);
        assert_eq!(f.tensors[1].offset + per, size);
        assert!(
            f.header_bytes_read <= f.data_offset + 64 * 1024,
            "read {} bytes for a {}-byte header",
            f.header_bytes_read,
            f.data_offset
        );
        assert!(f.header_bytes_read >= f.header_len);
    }

    #[test]
    fn a_header_bigger_than_the_cap_is_refused() {
        let mut w = GgufWriter::new();
        w.meta("big", Value::String("x".repeat(10_000)));
        let (bytes, _) = w.header_bytes().unwrap();
        let limits = ReadLimits {
            max_header_bytes: 4096,
            ..ReadLimits::default()
        };
        let err = read_header_from_with_limits(
            &bytes[..],
            bytes.len() as u64,
            Path::new("cap.gguf"),
            &limits,
        )
        .unwrap_err();
        assert!(
            matches!(err, GgufError::HeaderTooLarge { cap: 4096, .. }),
            "{err}"
        );
        let limits = ReadLimits {
            max_string_len: 100,
            ..ReadLimits::default()
        };
        let err = read_header_from_with_limits(
            &bytes[..],
            bytes.len() as u64,
            Path::new("cap.gguf"),
            &limits,
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                GgufError::TooLong {
                    len: 10_000,
                    max: 100,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn errors_say_file_offset_and_field() {
        let mut w = GgufWriter::new();
        w.meta("general.architecture", Value::String("llama".into()));
        w.meta("general.name", Value::String("tiny".into()));
        let (mut bytes, _) = w.header_bytes().unwrap();
        // The second key's string length: 24 + key 1 (8 + 20) + type 4 +
        // value (8 + 5) + key 2 (8 + 12) + type 4.
        let at = 24 + 8 + 20 + 4 + 8 + 5 + 8 + 12 + 4;
        bytes[at..at + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        let err =
            read_header_from(&bytes[..], bytes.len() as u64, Path::new("model.gguf")).unwrap_err();
        let left = bytes.len() - at - 8;
        assert_eq!(
            err.to_string(),
            format!(
                "model.gguf: at byte {at}: metadata key #1 `general.name`: string length \
                 18446744073709551615 exceeds the {left} bytes left (needs at least \
                 18446744073709551615)"
            )
        );
        assert_eq!(err.offset(), at as u64);
        assert_eq!(err.path(), Path::new("model.gguf"));
        assert_eq!(err.field(), "metadata key #1 `general.name`");
    }

    fn split_writer(no: u16, count: u16, tensors: &[&str], total: i32) -> GgufWriter {
        let mut w = GgufWriter::new();
        if no == 0 {
            w.meta("general.architecture", Value::String("llama".into()));
        }
        w.meta(KEY_SPLIT_NO, Value::U16(no));
        w.meta(KEY_SPLIT_COUNT, Value::U16(count));
        w.meta(KEY_SPLIT_TENSORS_COUNT, Value::I32(total));
        for t in tensors {
            w.tensor(t, GgmlType::F32, &[4, 2], TensorData::Bytes(vec![1; 32]));
        }
        w
    }

    fn write_split_set(dir: &Path) -> Vec<PathBuf> {
        let parts: [&[&str]; 3] = [
            &["token_embd.weight"],
            &["blk.0.a", "blk.0.b"],
            &["output.weight"],
        ];
        parts
            .iter()
            .enumerate()
            .map(|(i, tensors)| {
                let path = dir.join(split_part_name("model", i as u32 + 1, 3));
                split_writer(i as u16, 3, tensors, 4)
                    .write_to(&path)
                    .unwrap();
                path
            })
            .collect()
    }

    #[test]
    fn a_split_set_reads_every_part() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_split_set(dir.path());
        let m = read_model(&paths[0]).unwrap();
        assert_eq!(m.split_count(), 3);
        assert_eq!(m.tensor_count(), 4);
        assert_eq!(m.weight_bytes(), 4 * 32);
        assert_eq!(m.parameter_count(), 4 * 8);
        assert_eq!(m.path(), paths[0]);
        assert_eq!(m.first().get_str("general.architecture"), Some("llama"));
        let sizes: u64 = paths
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().len())
            .sum();
        assert_eq!(m.file_size(), sizes);
        assert_eq!(m.parts()[2].path, paths[2]);
        assert!(m.tensor("output.weight").is_some());
        let names: Vec<_> = m.tensors().map(|t| t.name.as_str()).collect();
        assert_eq!(
            names,
            ["token_embd.weight", "blk.0.a", "blk.0.b", "output.weight"]
        );
    }

    #[test]
    fn a_missing_split_part_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_split_set(dir.path());
        std::fs::remove_file(&paths[1]).unwrap();
        let err = read_model(&paths[0]).unwrap_err();
        assert!(
            matches!(
                err,
                GgufError::SplitPartMissing {
                    index: 2,
                    count: 3,
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains("model-00002-of-00003.gguf"), "{msg}");
        assert!(msg.contains("model-00001-of-00003.gguf: at byte"), "{msg}");
    }

    #[test]
    fn split_sets_are_checked_like_llama_cpp() {
        let dir = tempfile::tempdir().unwrap();
        let paths = write_split_set(dir.path());

        // Reading a later part points at part 1.
        let err = read_model(&paths[1]).unwrap_err();
        match &err {
            GgufError::SplitNotFirst { index, first, .. } => {
                assert_eq!(*index, 2);
                assert_eq!(first.as_deref(), Some(paths[0].as_path()));
            }
            other => panic!("{other}"),
        }

        // A part with the wrong split.no.
        split_writer(2, 3, &["blk.0.a", "blk.0.b"], 4)
            .write_to(&paths[1])
            .unwrap();
        let err = read_model(&paths[0]).unwrap_err();
        assert!(
            matches!(&err, GgufError::SplitMismatch { field, .. } if field == KEY_SPLIT_NO),
            "{err}"
        );
        assert_eq!(err.path(), paths[1]);

        // The same tensor in two parts.
        split_writer(1, 3, &["blk.0.a", "output.weight"], 4)
            .write_to(&paths[1])
            .unwrap();
        let err = read_model(&paths[0]).unwrap_err();
        assert!(
            matches!(&err, GgufError::DuplicateTensor { name, .. } if name == "output.weight"),
            "{err}"
        );

        // split.tensors.count disagrees.
        split_writer(1, 3, &["blk.0.a", "blk.0.b"], 4)
            .write_to(&paths[1])
            .unwrap();
        split_writer(0, 3, &["token_embd.weight"], 5)
            .write_to(&paths[0])
            .unwrap();
        let err = read_model(&paths[0]).unwrap_err();
        assert!(
            matches!(&err, GgufError::SplitMismatch { field, .. } if field == KEY_SPLIT_TENSORS_COUNT),
            "{err}"
        );

        // A split-set name without split metadata.
        let lone = dir.path().join("lone-00001-of-00002.gguf");
        GgufWriter::new().write_to(&lone).unwrap();
        let err = read_model(&lone).unwrap_err();
        assert!(matches!(err, GgufError::SplitMismatch { .. }), "{err}");

        // split.count > 1 under a plain name.
        let plain = dir.path().join("plain.gguf");
        split_writer(0, 3, &["x"], 3).write_to(&plain).unwrap();
        let err = read_model(&plain).unwrap_err();
        assert!(matches!(err, GgufError::SplitMismatch { .. }), "{err}");

        // A single file named like a one-part split set is fine.
        let one = dir.path().join("one-00001-of-00001.gguf");
        GgufWriter::new().write_to(&one).unwrap();
        assert_eq!(read_model(&one).unwrap().split_count(), 1);
    }

    #[test]
    fn split_names_follow_llama_split_path() {
        assert_eq!(split_part_name("a/b", 2, 3), "a/b-00002-of-00003.gguf");
        assert_eq!(parse_split_name("m-00002-of-00003.gguf"), Some(("m", 2, 3)));
        assert_eq!(
            parse_split_name("x-y-00001-of-123456.gguf"),
            Some(("x-y", 1, 123456))
        );
        for bad in [
            "m-0002-of-00003.gguf",
            "m-00004-of-00003.gguf",
            "m-00000-of-00003.gguf",
            "m-00001-of-00003.bin",
            "-00001-of-00003.gguf",
            "m-000001-of-00003.gguf",
            "m-00001-of-0000x.gguf",
            "model.gguf",
        ] {
            assert_eq!(parse_split_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn directories_and_missing_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = read_header(dir.path()).unwrap_err();
        assert!(matches!(err, GgufError::NotAFile { .. }), "{err}");
        let err = read_header(&dir.path().join("nope.gguf")).unwrap_err();
        assert!(matches!(err, GgufError::Io { .. }), "{err}");
        assert!(err.to_string().contains("nope.gguf"));
    }
}
