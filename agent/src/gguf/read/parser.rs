//! The byte-level reader under the header parser: a position and a cap,
//! fixed-size fields, length-prefixed strings and metadata values, each
//! bounded before anything is allocated. [`Parser::file`] reads one header
//! in its three steps: the fixed header ([`super::header`]), the metadata
//! ([`super::metadata`]) and the tensor infos with the data section
//! ([`super::tensors`]).

use super::{GgufError, GgufErrorKind, GgufFile, MAX_PREALLOC, READ_BUF_BYTES, ReadLimits};
use crate::gguf::types::{Value, ValueType};
use std::io::{self, BufReader, Read};
use std::path::{Path, PathBuf};

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
pub(super) type Field<'f> = &'f dyn Fn() -> String;

pub(super) struct Parser<'a, R: Read> {
    r: BufReader<Counting<io::Take<R>>>,
    /// Bytes consumed so far (= offset of the next field).
    pub(super) pos: u64,
    /// Most bytes that may be consumed: `min(file_size, max_header_bytes)`.
    limit: u64,
    pub(super) file_size: u64,
    path: &'a Path,
    pub(super) limits: &'a ReadLimits,
    /// Metadata values decoded so far.
    pub(super) values: u64,
}

impl<'a, R: Read> Parser<'a, R> {
    /// A parser of the `file_size`-byte file in `reader`, named `path` in
    /// errors, reading at most `min(file_size, max_header_bytes)` bytes.
    pub(super) fn new(reader: R, file_size: u64, path: &'a Path, limits: &'a ReadLimits) -> Self {
        let limit = file_size.min(limits.max_header_bytes);
        Parser {
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
        }
    }

    /// Reads the whole header: fixed header, metadata, tensor infos; checks
    /// the data section and every tensor's bounds.
    pub(super) fn file(&mut self) -> Result<GgufFile, GgufError> {
        let counts = self.header()?;
        let meta = self.metadata(counts.n_kv)?;
        let alignment = meta.alignment(self.path)?;
        let (mut tensors, offset_fields) = self.tensor_infos(counts.n_tensors, alignment)?;
        let header_len = self.pos;
        let data_offset = self.data_section(header_len, alignment, &mut tensors, &offset_fields)?;
        Ok(GgufFile {
            path: self.path(),
            version: counts.version,
            metadata: meta.metadata,
            alignment,
            tensors,
            header_len,
            data_offset,
            file_size: self.file_size,
            header_bytes_read: self.r.get_ref().count,
            index: meta.index,
            value_offsets: meta.value_offsets,
        })
    }

    /// The error `kind` at `offset` in `field` of this file.
    pub(super) fn err(&self, offset: u64, field: String, kind: GgufErrorKind) -> GgufError {
        GgufError::new(self.path, offset, field, kind)
    }

    pub(super) fn path(&self) -> PathBuf {
        self.path.to_owned()
    }

    /// Fails unless `n` more bytes may be read: they must exist in the file
    /// and stay under the header cap.
    pub(super) fn need(&self, n: u64, field: Field) -> Result<(), GgufError> {
        let file_left = self.file_size.saturating_sub(self.pos);
        if n > file_left {
            return Err(GgufError::new(
                self.path(),
                self.pos,
                field(),
                GgufErrorKind::UnexpectedEof {
                    needed: n,
                    left: file_left,
                },
            ));
        }
        if n > self.limit.saturating_sub(self.pos) {
            return Err(self.too_large(self.pos, field));
        }
        Ok(())
    }

    pub(super) fn too_large(&self, offset: u64, field: Field) -> GgufError {
        GgufError::new(
            self.path(),
            offset,
            field(),
            GgufErrorKind::HeaderTooLarge {
                cap: self.limits.max_header_bytes,
            },
        )
    }

    /// Fails unless `count` items of at least `min_size` bytes each can fit
    /// in what is left; `at` is where the count was stored.
    pub(super) fn check_count(
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
            return Err(GgufError::new(
                self.path(),
                at,
                field(),
                GgufErrorKind::PastEnd {
                    what,
                    count,
                    needed,
                    left: file_left,
                },
            ));
        }
        if needed > u128::from(self.limit.saturating_sub(self.pos)) {
            return Err(self.too_large(at, field));
        }
        Ok(())
    }

    pub(super) fn fill(&mut self, buf: &mut [u8], field: Field) -> Result<(), GgufError> {
        self.need(buf.len() as u64, field)?;
        self.r.read_exact(buf).map_err(|cause| {
            GgufError::new(
                self.path.to_owned(),
                self.pos,
                field(),
                GgufErrorKind::Io { cause },
            )
        })?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    pub(super) fn array<const N: usize>(&mut self, field: Field) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.fill(&mut b, field)?;
        Ok(b)
    }

    pub(super) fn u32(&mut self, field: Field) -> Result<u32, GgufError> {
        self.array(field).map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self, field: Field) -> Result<u64, GgufError> {
        self.array(field).map(u64::from_le_bytes)
    }

    /// A GGUF string (u64 length + bytes), at most `max` bytes long.
    pub(super) fn string_bytes(
        &mut self,
        max: u64,
        what: &'static str,
        field: Field,
    ) -> Result<Vec<u8>, GgufError> {
        let at = self.pos;
        let len = self.u64(field)?;
        self.check_count(at, what, len, 1, field)?;
        if len > max {
            return Err(GgufError::new(
                self.path(),
                at,
                field(),
                GgufErrorKind::TooLong { what, len, max },
            ));
        }
        // `len` is at most the bytes left under the cap, checked above.
        let mut buf = vec![0u8; len as usize];
        self.fill(&mut buf, field)?;
        Ok(buf)
    }

    pub(super) fn utf8(
        &self,
        bytes: Vec<u8>,
        at: u64,
        what: &'static str,
        field: Field,
    ) -> Result<String, GgufError> {
        String::from_utf8(bytes).map_err(|_| {
            GgufError::new(
                self.path(),
                at + 8,
                field(),
                GgufErrorKind::InvalidUtf8 { what },
            )
        })
    }

    pub(super) fn value_type(&mut self, field: Field) -> Result<ValueType, GgufError> {
        let at = self.pos;
        let id = self.u32(field)?;
        ValueType::from_id(id).ok_or_else(|| {
            GgufError::new(
                self.path(),
                at,
                field(),
                GgufErrorKind::UnknownValueType { type_id: id },
            )
        })
    }

    pub(super) fn value(
        &mut self,
        ty: ValueType,
        depth: u32,
        field: Field,
    ) -> Result<Value, GgufError> {
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
                    return Err(GgufError::new(
                        self.path(),
                        self.pos,
                        field(),
                        GgufErrorKind::NestingTooDeep {
                            max: self.limits.max_array_depth,
                        },
                    ));
                }
                let elem = self.value_type(field)?;
                let at = self.pos;
                let count = self.u64(field)?;
                self.check_count(at, "array count", count, min_value_bytes(elem), field)?;
                let total = self.values.saturating_add(count);
                if total > self.limits.max_values {
                    return Err(GgufError::new(
                        self.path(),
                        at,
                        field(),
                        GgufErrorKind::TooManyValues {
                            count,
                            total,
                            max: self.limits.max_values,
                        },
                    ));
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
}

/// Least bytes one value of type `ty` takes in a file.
pub(super) fn min_value_bytes(ty: ValueType) -> u64 {
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
pub(super) fn align_up(n: u64, align: u64) -> Option<u64> {
    Some(n.checked_add(align - 1)? & !(align - 1))
}
