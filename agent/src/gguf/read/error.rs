//! Why a GGUF header was refused: [`GgufError`] names the file, the byte
//! offset the problem was found at and the field, once for every problem;
//! [`GgufErrorKind`] says what the problem is.

use super::MAX_DIMS;
use crate::gguf::types::{GgmlType, ValueType};
use std::io;
use std::path::{Path, PathBuf};

/// Why a GGUF header was refused: where (file, byte offset, field) and what
/// ([`GgufErrorKind`]). Shown as `PATH: at byte OFFSET: FIELD: WHAT`.
#[derive(Debug, thiserror::Error)]
#[error("{}: at byte {offset}: {field}: {kind}", path.display())]
pub struct GgufError {
    /// The file.
    path: PathBuf,
    /// Where the problem was found.
    offset: u64,
    /// What was being read.
    field: String,
    /// The problem (boxed: errors stay small on the success path).
    kind: Box<GgufErrorKind>,
}

impl GgufError {
    /// The error `kind` at byte `offset` of `path`, in `field`.
    pub fn new(
        path: impl Into<PathBuf>,
        offset: u64,
        field: impl Into<String>,
        kind: GgufErrorKind,
    ) -> Self {
        GgufError {
            path: path.into(),
            offset,
            field: field.into(),
            kind: Box::new(kind),
        }
    }

    /// The file the error is about.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Byte offset of the problem.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The field the problem is in.
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What the problem is.
    pub fn kind(&self) -> &GgufErrorKind {
        &self.kind
    }
}

/// What is wrong with a GGUF header; [`GgufError`] says where.
#[derive(Debug, thiserror::Error)]
pub enum GgufErrorKind {
    /// The file could not be opened, inspected or read.
    #[error("{cause}")]
    Io {
        /// The I/O error (shown in the message, so not a `source`).
        cause: io::Error,
    },
    /// The path is not a regular file (a directory, FIFO, device...);
    /// offset 0, field `file`.
    #[error("not a regular file ({kind})")]
    NotAFile {
        /// What it is instead.
        kind: String,
    },
    /// The file does not start with `GGUF`; offset 0, field `magic`.
    #[error("expected `GGUF`, found `{}`", found.escape_ascii())]
    BadMagic {
        /// The four bytes found.
        found: [u8; 4],
    },
    /// The GGUF version is not 2 or 3; offset 4, field `version`.
    #[error("version {version}: {reason}")]
    UnsupportedVersion {
        /// The version read.
        version: u32,
        /// Why it is refused (as `gguf.cpp` explains it).
        reason: &'static str,
    },
    /// The file ends inside the header (at the start of the field).
    #[error("needs {needed} bytes but the file ends after {left}")]
    UnexpectedEof {
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file.
        left: u64,
    },
    /// The header is bigger than
    /// [`ReadLimits::max_header_bytes`](super::ReadLimits::max_header_bytes).
    #[error("the header goes past the {cap}-byte read cap")]
    HeaderTooLarge {
        /// The cap.
        cap: u64,
    },
    /// A length (where it is stored) is longer than this reader allows.
    #[error("{what} {len} exceeds the maximum {max}")]
    TooLong {
        /// Which length (`string length`, `key length`, `tensor name length`).
        what: &'static str,
        /// The length read.
        len: u64,
        /// The maximum.
        max: u64,
    },
    /// A length or count (where it is stored) needs more bytes than are
    /// left in the file.
    #[error("{what} {count} exceeds the {left} bytes left (needs at least {needed})")]
    PastEnd {
        /// Which count (`string length`, `array count`, `tensor count`...).
        what: &'static str,
        /// The count read.
        count: u64,
        /// Least bytes that many items take.
        needed: u128,
        /// Bytes left in the file.
        left: u64,
    },
    /// More metadata values than
    /// [`ReadLimits::max_values`](super::ReadLimits::max_values), at the
    /// array count.
    #[error("array count {count} brings the file to {total} values, more than the maximum {max}")]
    TooManyValues {
        /// The array count.
        count: u64,
        /// Values with this array.
        total: u64,
        /// The maximum.
        max: u64,
    },
    /// A metadata value type id is not a `gguf_type`.
    #[error("unknown value type {type_id}")]
    UnknownValueType {
        /// The id read.
        type_id: u32,
    },
    /// Arrays nest deeper than
    /// [`ReadLimits::max_array_depth`](super::ReadLimits::max_array_depth),
    /// at the too-deep array.
    #[error("arrays nest deeper than {max} levels")]
    NestingTooDeep {
        /// The maximum depth.
        max: u32,
    },
    /// A metadata key is empty (`gguf.cpp`: "key is empty").
    #[error("empty key")]
    EmptyKey,
    /// A key or tensor name is not UTF-8 (at the string's bytes).
    #[error("{what} is not valid UTF-8")]
    InvalidUtf8 {
        /// `key` or `tensor name`.
        what: &'static str,
    },
    /// A metadata key appears twice (at the second key).
    #[error("duplicate key `{key}` (first at byte {first_offset})")]
    DuplicateKey {
        /// The key.
        key: String,
        /// Where the first one's value is.
        first_offset: u64,
    },
    /// `general.alignment` is not a `uint32`; field `general.alignment`.
    #[error("must be of type U32 but is {found:?}")]
    AlignmentWrongType {
        /// The type found.
        found: ValueType,
    },
    /// `general.alignment` is 0 or not a power of two; field
    /// `general.alignment`.
    #[error("alignment {value} is not a power of 2")]
    AlignmentNotPowerOfTwo {
        /// The value.
        value: u32,
    },
    /// Two tensors share a name (in one file or across a split set); the
    /// error names the file and info of the second one.
    #[error("duplicate tensor name `{name}` (first: {first})")]
    DuplicateTensor {
        /// The name.
        name: String,
        /// Where the first one is.
        first: String,
    },
    /// `n_dims` is not in `1..=GGML_MAX_DIMS`.
    #[error("{n_dims} dimensions, expected 1 to {MAX_DIMS}")]
    BadDimCount {
        /// The value.
        n_dims: u32,
    },
    /// A dimension is zero or negative (as `int64_t`).
    #[error("ne[{dim}] = {} is not in 1..=INT64_MAX", *value as i64)]
    BadDim {
        /// Which dimension.
        dim: u32,
        /// The raw value.
        value: u64,
    },
    /// The element count does not fit `int64_t` (at the dimensions).
    #[error("shape {dims:?} has more than INT64_MAX elements")]
    ElementCountOverflow {
        /// The dimensions.
        dims: Vec<u64>,
    },
    /// A tensor type id this llama.cpp does not know.
    #[error("unknown ggml type {type_id} (known: 0..{})", GgmlType::COUNT)]
    UnknownTensorType {
        /// The id.
        type_id: u32,
    },
    /// A tensor type llama.cpp has removed (ids 4, 5, 31..33, 36..38).
    #[error("ggml type {type_id} has been removed from llama.cpp")]
    RemovedTensorType {
        /// The id.
        type_id: u32,
    },
    /// `ne[0]` is not a whole number of blocks of the tensor's type.
    #[error("{ne0} elements per row is not a multiple of the {ty} block size {}", ty.block_size)]
    RowNotBlockMultiple {
        /// `ne[0]`.
        ne0: u64,
        /// The type.
        ty: GgmlType,
    },
    /// The tensor's byte size (or its padded size) overflows 64 bits.
    #[error("{ty} tensor of shape {dims:?} has a byte size that overflows")]
    TensorTooLarge {
        /// The dimensions.
        dims: Vec<u64>,
        /// The type.
        ty: GgmlType,
    },
    /// A tensor offset is not a multiple of the alignment.
    #[error("offset {value} is not a multiple of the alignment {alignment}")]
    MisalignedTensorOffset {
        /// The tensor offset (relative to the data section).
        value: u64,
        /// The alignment.
        alignment: u64,
    },
    /// A tensor's data starts before the previous tensor's (padded) end.
    #[error("offset {value} overlaps the previous tensor, which ends at {expected}")]
    TensorOverlap {
        /// The tensor offset (relative to the data section).
        value: u64,
        /// Where it must start.
        expected: u64,
    },
    /// A tensor's data does not start right after the previous tensor's
    /// padded end (`gguf.cpp`: "tensor has offset X, expected Y").
    #[error("offset {value}, expected {expected}")]
    TensorOffsetMismatch {
        /// The tensor offset (relative to the data section).
        value: u64,
        /// Where it must start.
        expected: u64,
    },
    /// The data section would start past the end of the file; offset: the
    /// end of the header, field `data section`.
    #[error("data section starts at {data_offset}, past the end of the {file_size}-byte file")]
    DataSectionPastEof {
        /// Where the data section would start.
        data_offset: u64,
        /// The file size.
        file_size: u64,
    },
    /// A tensor's data is not within the file (`llama_tensor_weight`: "data
    /// is not within the file bounds"); offset: where the tensor's offset is
    /// stored.
    #[error("data {start}..{end} is not within the {file_size}-byte file")]
    TensorPastEof {
        /// Absolute start of the data.
        start: u64,
        /// Absolute end (exclusive), saturated.
        end: u64,
        /// The file size.
        file_size: u64,
    },
    /// A part of a split set does not exist; the error names part 1 and
    /// where `split.count` is stored in it.
    #[error("part {index} of {count}, `{}`, is missing", part.display())]
    SplitPartMissing {
        /// The missing part's path.
        part: PathBuf,
        /// 1-based part number.
        index: u32,
        /// Parts in the set.
        count: u32,
    },
    /// This file is a later part of a split set; read part 1 instead; field
    /// `split.no`.
    #[error("this is part {index} of a split set; load part 1{}", first.as_ref().map(|p| format!(" `{}`", p.display())).unwrap_or_default())]
    SplitNotFirst {
        /// 1-based part number.
        index: u64,
        /// Part 1's path, when the file name follows the split pattern.
        first: Option<PathBuf>,
    },
    /// Split metadata and file names disagree; field: the key, offset: where
    /// its value is stored (0 when the key is absent).
    #[error("{reason}")]
    SplitMismatch {
        /// What disagrees.
        reason: String,
    },
}
