//! Malformed GGUF headers: every structural mistake the reader must refuse,
//! each with its specific [`GgufErrorKind`] and a message naming the file
//! and the byte offset; plus a valid file cut at every length and corrupted
//! at every byte, which must never panic.

#![allow(clippy::unwrap_used)] // Tests unwrap what they built themselves.

use super::read::{
    GgufError, GgufErrorKind, ReadLimits, read_header_from, read_header_from_with_limits,
};
use super::types::{GgmlType, Value, ValueType};
use super::write::{GgufWriter, TensorData};
use std::path::Path;

/// Hand-built GGUF bytes.
#[derive(Debug, Clone, Default)]
struct Raw(Vec<u8>);

impl Raw {
    /// Magic, version, tensor count, metadata count.
    fn header(version: u32, n_tensors: u64, n_kv: u64) -> Raw {
        let mut r = Raw::default();
        r.bytes(b"GGUF").u32(version).u64(n_tensors).u64(n_kv);
        r
    }

    fn pos(&self) -> u64 {
        self.0.len() as u64
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Raw {
        self.0.extend_from_slice(b);
        self
    }

    fn u32(&mut self, v: u32) -> &mut Raw {
        self.bytes(&v.to_le_bytes())
    }

    fn u64(&mut self, v: u64) -> &mut Raw {
        self.bytes(&v.to_le_bytes())
    }

    fn str(&mut self, s: &[u8]) -> &mut Raw {
        self.u64(s.len() as u64).bytes(s)
    }

    fn kv_u32(&mut self, key: &str, v: u32) -> &mut Raw {
        self.str(key.as_bytes()).u32(ValueType::U32 as u32).u32(v)
    }

    fn kv_str(&mut self, key: &str, v: &str) -> &mut Raw {
        self.str(key.as_bytes())
            .u32(ValueType::String as u32)
            .str(v.as_bytes())
    }

    /// A tensor info; returns where its offset field is.
    fn tensor(&mut self, name: &str, dims: &[u64], ty: u32, offset: u64) -> u64 {
        self.str(name.as_bytes()).u32(dims.len() as u32);
        for d in dims {
            self.u64(*d);
        }
        self.u32(ty);
        let at = self.pos();
        self.u64(offset);
        at
    }

    /// Pads to `align` and appends `data` bytes of tensor data.
    fn data(&mut self, align: usize, data: usize) -> &mut Raw {
        let n = self.0.len().div_ceil(align) * align + data;
        self.0.resize(n, 0);
        self
    }

    fn done(&self) -> Vec<u8> {
        self.0.clone()
    }
}

type Check = fn(&GgufError) -> bool;

/// A metadata string that makes room for the counts' bounds.
const PAD: &str = "0123456789012345678901234567890123456789";

/// One malformed file: its name, bytes, the variant expected and the byte
/// offset the error must name.
struct Case {
    name: &'static str,
    bytes: Vec<u8>,
    check: Check,
    offset: u64,
    limits: ReadLimits,
}

fn case(name: &'static str, bytes: Vec<u8>, offset: u64, check: Check) -> Case {
    Case {
        name,
        bytes,
        check,
        offset,
        limits: ReadLimits::default(),
    }
}

/// A file with one F32 tensor `w` of `dims` at offset 0 (alignment 32),
/// its info starting at byte 24.
fn one_tensor(dims: &[u64], ty: u32) -> (Raw, u64) {
    let mut r = Raw::header(3, 1, 0);
    let at = r.tensor("w", dims, ty, 0);
    (r, at)
}

/// Where the fields of a tensor info named `w` with `n` dims start, when the
/// info starts at byte 24: (n_dims, first dim, type, offset).
fn w_fields(n: u64) -> (u64, u64, u64, u64) {
    w_fields_at(24, n)
}

/// [`w_fields`] for an info starting at `start`.
fn w_fields_at(start: u64, n: u64) -> (u64, u64, u64, u64) {
    let nd = start + 8 + 1;
    let d0 = nd + 4;
    let ty = d0 + 8 * n;
    (nd, d0, ty, ty + 4)
}

fn cases() -> Vec<Case> {
    use GgufErrorKind as E;
    let mut v = Vec::new();

    // Magic and version.
    v.push(case("empty", vec![], 0, |e| {
        matches!(e.kind(), E::UnexpectedEof { .. })
    }));
    v.push(case("short-magic", b"GG".to_vec(), 0, |e| {
        matches!(
            e.kind(),
            E::UnexpectedEof {
                needed: 4,
                left: 2,
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 0, 0);
    r.0[..4].copy_from_slice(b"GGML");
    v.push(case(
        "bad-magic",
        r.done(),
        0,
        |e| matches!(e.kind(), E::BadMagic { found, .. } if found == b"GGML"),
    ));
    let mut r = Raw::header(3, 0, 0);
    r.0[..4].copy_from_slice(b"gguf");
    v.push(case("lowercase-magic", r.done(), 0, |e| {
        matches!(e.kind(), E::BadMagic { .. })
    }));
    v.push(case("version-0", Raw::header(0, 0, 0).done(), 4, |e| {
        matches!(e.kind(), E::UnsupportedVersion { version: 0, .. })
    }));
    v.push(case("version-1", Raw::header(1, 0, 0).done(), 4, |e| {
        matches!(e.kind(), E::UnsupportedVersion { version: 1, .. })
    }));
    v.push(case("version-99", Raw::header(99, 0, 0).done(), 4, |e| {
        matches!(e.kind(), E::UnsupportedVersion { version: 99, .. })
    }));
    v.push(case(
        "version-big-endian",
        Raw::header(3u32.swap_bytes(), 0, 0).done(),
        4,
        |e| matches!(e.kind(), E::UnsupportedVersion { reason, .. } if reason.contains("endian")),
    ));

    // Truncated in the fixed header.
    v.push(case("cut-after-magic", b"GGUF".to_vec(), 4, |e| {
        matches!(e.kind(), E::UnexpectedEof { .. })
    }));
    let full = Raw::header(3, 0, 0).done();
    v.push(case("cut-in-tensor-count", full[..12].to_vec(), 8, |e| {
        matches!(
            e.kind(),
            E::UnexpectedEof {
                needed: 8,
                left: 4,
                ..
            }
        )
    }));
    v.push(case(
        "cut-in-metadata-count",
        full[..20].to_vec(),
        16,
        |e| matches!(e.kind(), E::UnexpectedEof { .. }),
    ));

    // Absurd counts.
    v.push(case(
        "absurd-tensor-count",
        Raw::header(3, u64::MAX, 0).done(),
        8,
        |e| {
            matches!(
                e.kind(),
                E::PastEnd {
                    what: "tensor count",
                    ..
                }
            )
        },
    ));
    v.push(case(
        "absurd-metadata-count",
        Raw::header(3, 0, 1 << 40).done(),
        16,
        |e| {
            matches!(
                e.kind(),
                E::PastEnd {
                    what: "metadata count",
                    ..
                }
            )
        },
    ));
    v.push(case(
        "negative-metadata-count",
        Raw::header(3, 0, (-1i64) as u64).done(),
        16,
        |e| matches!(e.kind(), E::PastEnd { .. }),
    ));
    let mut r = Raw::header(3, 0, 2);
    r.kv_u32("a", 1);
    v.push(case("metadata-count-past-end", r.done(), 16, |e| {
        matches!(
            e.kind(),
            E::PastEnd {
                what: "metadata count",
                count: 2,
                ..
            }
        )
    }));

    // Keys.
    let mut r = Raw::header(3, 0, 2);
    r.kv_str("pad", PAD);
    let at = r.pos();
    r.bytes(&[5, 0, 0]);
    v.push(case("cut-in-key-length", r.done(), at, |e| {
        matches!(e.kind(), E::UnexpectedEof { .. })
    }));
    let mut r = Raw::header(3, 0, 1);
    r.u64(10).bytes(b"general");
    v.push(case("cut-in-key", r.done(), 24, |e| {
        matches!(
            e.kind(),
            E::PastEnd {
                what: "key length",
                count: 10,
                left: 7,
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 0, 1);
    r.u64(u64::MAX).bytes(b"general.name");
    v.push(case("absurd-key-length", r.done(), 24, |e| {
        matches!(
            e.kind(),
            E::PastEnd {
                what: "key length",
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 0, 1);
    r.kv_u32(&"k".repeat(70_000), 1);
    v.push(case("key-too-long", r.done(), 24, |e| {
        matches!(
            e.kind(),
            E::TooLong {
                what: "key length",
                len: 70_000,
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 0, 1);
    r.kv_u32("", 1);
    v.push(case("empty-key", r.done(), 24, |e| {
        matches!(e.kind(), E::EmptyKey)
    }));
    let mut r = Raw::header(3, 0, 1);
    r.str(b"general.\xff\xfe").u32(ValueType::U32 as u32).u32(1);
    v.push(case("non-utf8-key", r.done(), 32, |e| {
        matches!(e.kind(), E::InvalidUtf8 { what: "key", .. })
    }));
    let mut r = Raw::header(3, 0, 3);
    r.kv_u32("a", 1).kv_str("general.name", "x");
    let dup = r.pos();
    r.kv_u32("a", 2);
    v.push(case(
        "duplicate-key",
        r.done(),
        dup,
        |e| matches!(e.kind(), E::DuplicateKey { key, first_offset: 37, .. } if key == "a"),
    ));

    // Value types and values.
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k");
    let at = r.pos();
    r.u32(13).u32(0);
    v.push(case("unknown-value-type", r.done(), at, |e| {
        matches!(e.kind(), E::UnknownValueType { type_id: 13, .. })
    }));
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k");
    let at = r.pos();
    r.u32(u32::MAX).u32(0);
    v.push(case("negative-value-type", r.done(), at, |e| {
        matches!(e.kind(), E::UnknownValueType { .. })
    }));
    let mut r = Raw::header(3, 0, 2);
    r.kv_str("pad", PAD).str(b"k");
    let at = r.pos();
    r.bytes(&[4, 0]);
    v.push(case("cut-in-value-type", r.done(), at, |e| {
        matches!(e.kind(), E::UnexpectedEof { .. })
    }));
    let mut r = Raw::header(3, 0, 1);
    r.str(b"k").u32(ValueType::U64 as u32).bytes(&[1, 2, 3]);
    v.push(case("cut-in-u64-value", r.done(), 37, |e| {
        matches!(
            e.kind(),
            E::UnexpectedEof {
                needed: 8,
                left: 3,
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 0, 1);
    r.str(b"general.name")
        .u32(ValueType::String as u32)
        .u64(u64::MAX)
        .bytes(b"tiny");
    v.push(case("absurd-string-length", r.done(), 48, |e| {
        matches!(
            e.kind(),
            E::PastEnd {
                what: "string length",
                left: 4,
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 0, 1);
    r.str(b"a").u32(ValueType::Array as u32).bytes(&[8, 0]);
    v.push(case("cut-in-array-type", r.done(), 37, |e| {
        matches!(e.kind(), E::UnexpectedEof { .. })
    }));
    let mut r = Raw::header(3, 0, 1);
    r.str(b"a").u32(ValueType::Array as u32).u32(77).u64(0);
    v.push(case("array-of-unknown-type", r.done(), 37, |e| {
        matches!(e.kind(), E::UnknownValueType { type_id: 77, .. })
    }));
    let mut r = Raw::header(3, 0, 1);
    r.str(b"a")
        .u32(ValueType::Array as u32)
        .u32(ValueType::U32 as u32)
        .u64(u64::MAX);
    v.push(case("absurd-array-count", r.done(), 41, |e| {
        matches!(
            e.kind(),
            E::PastEnd {
                what: "array count",
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 0, 1);
    r.str(b"a")
        .u32(ValueType::Array as u32)
        .u32(ValueType::U32 as u32)
        .u64(3)
        .u32(1)
        .u32(2)
        .bytes(&[3, 0, 0]);
    v.push(case("array-one-byte-short", r.done(), 41, |e| {
        matches!(
            e.kind(),
            E::PastEnd {
                what: "array count",
                count: 3,
                needed: 12,
                left: 11,
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 0, 1);
    r.str(b"tokenizer.ggml.tokens")
        .u32(ValueType::Array as u32)
        .u32(ValueType::String as u32)
        .u64(2)
        .str(b"<s>");
    let at = r.pos();
    r.u64(100).bytes(&[b'x'; 10]);
    v.push(case("cut-in-array-string", r.done(), at, |e| {
        matches!(
            e.kind(),
            E::PastEnd {
                what: "string length",
                count: 100,
                ..
            }
        )
    }));
    // Five levels of arrays; four are allowed.
    let mut r = Raw::header(3, 0, 1);
    r.str(b"deep");
    r.u32(ValueType::Array as u32);
    for _ in 0..4 {
        r.u32(ValueType::Array as u32).u64(1);
    }
    let at = r.pos();
    r.u32(ValueType::U8 as u32).u64(0);
    v.push(case("nesting-too-deep", r.done(), at, |e| {
        matches!(e.kind(), E::NestingTooDeep { max: 4, .. })
    }));
    let mut r = Raw::header(3, 0, 1);
    r.str(b"many")
        .u32(ValueType::Array as u32)
        .u32(ValueType::U8 as u32)
        .u64(1000)
        .bytes(&[0; 1000]);
    v.push(Case {
        limits: ReadLimits {
            max_values: 100,
            ..ReadLimits::default()
        },
        ..case("too-many-values", r.done(), 44, |e| {
            matches!(
                e.kind(),
                E::TooManyValues {
                    count: 1000,
                    max: 100,
                    ..
                }
            )
        })
    });
    let mut r = Raw::header(3, 0, 1);
    r.kv_str("big", &"x".repeat(5000));
    v.push(Case {
        limits: ReadLimits {
            max_header_bytes: 1024,
            ..ReadLimits::default()
        },
        ..case("header-over-cap", r.done(), 39, |e| {
            matches!(e.kind(), E::HeaderTooLarge { cap: 1024, .. })
        })
    });

    // general.alignment.
    for (name, align) in [
        ("alignment-0", 0u32),
        ("alignment-3", 3),
        ("alignment-48", 48),
    ] {
        let mut r = Raw::header(3, 0, 1);
        r.kv_u32("general.alignment", align);
        v.push(case(name, r.done(), 24 + 8 + 17 + 4, |e| {
            matches!(e.kind(), E::AlignmentNotPowerOfTwo { .. })
        }));
    }
    let mut r = Raw::header(3, 0, 1);
    r.str(b"general.alignment")
        .u32(ValueType::U64 as u32)
        .u64(32);
    v.push(case("alignment-u64", r.done(), 53, |e| {
        matches!(
            e.kind(),
            E::AlignmentWrongType {
                found: ValueType::U64,
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 0, 1);
    r.kv_str("general.alignment", "32");
    v.push(case("alignment-string", r.done(), 53, |e| {
        matches!(
            e.kind(),
            E::AlignmentWrongType {
                found: ValueType::String,
                ..
            }
        )
    }));

    // Tensor infos.
    let mut r = Raw::header(3, 1, 0);
    r.tensor(&"n".repeat(64), &[32], 0, 0);
    v.push(case("tensor-name-too-long", r.done(), 24, |e| {
        matches!(
            e.kind(),
            E::TooLong {
                what: "tensor name length",
                len: 64,
                max: 63,
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 1, 0);
    r.str(b"blk.\xc0.w").u32(1).u64(32).u32(0).u64(0);
    r.data(32, 128);
    v.push(case("non-utf8-tensor-name", r.done(), 32, |e| {
        matches!(
            e.kind(),
            E::InvalidUtf8 {
                what: "tensor name",
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 2, 0);
    r.tensor("w", &[8], 0, 0);
    let second = r.pos();
    r.tensor("w", &[8], 0, 32);
    r.data(32, 64);
    v.push(case(
        "duplicate-tensor-name",
        r.done(),
        second,
        |e| matches!(e.kind(), E::DuplicateTensor { name, .. } if name == "w"),
    ));
    let (nd, d0, ty_at, off_at) = w_fields(1);
    let mut r = Raw::header(3, 1, 0);
    r.str(b"w").u32(0).u32(0).u64(0);
    v.push(case("zero-dims", r.done(), nd, |e| {
        matches!(e.kind(), E::BadDimCount { n_dims: 0, .. })
    }));
    let (r5, _) = one_tensor(&[1, 1, 1, 1, 1], 0);
    v.push(case("five-dims", r5.done(), nd, |e| {
        matches!(e.kind(), E::BadDimCount { n_dims: 5, .. })
    }));
    let (r, _) = one_tensor(&[32, 0], 0);
    v.push(case("zero-dim", r.done(), d0 + 8, |e| {
        matches!(
            e.kind(),
            E::BadDim {
                dim: 1,
                value: 0,
                ..
            }
        )
    }));
    let (r, _) = one_tensor(&[(-32i64) as u64], 0);
    v.push(case("negative-dim", r.done(), d0, |e| {
        matches!(e.kind(), E::BadDim { dim: 0, .. })
    }));
    let (r, _) = one_tensor(&[1 << 32, 1 << 31], 0);
    v.push(case("element-overflow", r.done(), d0, |e| {
        matches!(e.kind(), E::ElementCountOverflow { .. })
    }));
    let (r, _) = one_tensor(&[1 << 62, 1], GgmlType::F64.id);
    v.push(case("byte-size-overflow", r.done(), w_fields(2).2, |e| {
        matches!(e.kind(), E::TensorTooLarge { .. })
    }));
    let (r, _) = one_tensor(&[32], 43);
    v.push(case("unknown-ggml-type", r.done(), ty_at, |e| {
        matches!(e.kind(), E::UnknownTensorType { type_id: 43, .. })
    }));
    let (r, _) = one_tensor(&[32], u32::MAX);
    v.push(case("negative-ggml-type", r.done(), ty_at, |e| {
        matches!(e.kind(), E::UnknownTensorType { .. })
    }));
    let (r, _) = one_tensor(&[32], 4);
    v.push(case("removed-type-4", r.done(), ty_at, |e| {
        matches!(e.kind(), E::RemovedTensorType { type_id: 4, .. })
    }));
    let (r, _) = one_tensor(&[32], 36);
    v.push(case("removed-type-36", r.done(), ty_at, |e| {
        matches!(e.kind(), E::RemovedTensorType { type_id: 36, .. })
    }));
    let (r, _) = one_tensor(&[33, 2], GgmlType::Q4_0.id);
    v.push(case(
        "row-not-block-multiple",
        r.done(),
        w_fields(2).2,
        |e| matches!(e.kind(), E::RowNotBlockMultiple { ne0: 33, .. }),
    ));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[8], 0, 16);
    r.data(32, 64);
    v.push(case("misaligned-offset", r.done(), off_at, |e| {
        matches!(
            e.kind(),
            E::MisalignedTensorOffset {
                value: 16,
                alignment: 32,
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[8], 0, 32);
    r.data(32, 64);
    v.push(case("first-offset-not-zero", r.done(), off_at, |e| {
        matches!(
            e.kind(),
            E::TensorOffsetMismatch {
                value: 32,
                expected: 0,
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[16], 0, 0);
    let at = r.tensor("b", &[16], 0, 32);
    r.data(32, 128);
    v.push(case("overlapping-tensors", r.done(), at, |e| {
        matches!(
            e.kind(),
            E::TensorOverlap {
                value: 32,
                expected: 64,
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 2, 0);
    r.tensor("a", &[16], 0, 0);
    let at = r.tensor("b", &[16], 0, 128);
    r.data(32, 256);
    v.push(case("gap-between-tensors", r.done(), at, |e| {
        matches!(
            e.kind(),
            E::TensorOffsetMismatch {
                value: 128,
                expected: 64,
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 1, 1);
    r.kv_u32("general.alignment", 64);
    let at = r.tensor("w", &[4], 0, 32);
    r.data(64, 16);
    v.push(case("offset-misaligned-to-64", r.done(), at, |e| {
        matches!(e.kind(), E::MisalignedTensorOffset { alignment: 64, .. })
    }));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[64], 0, 0);
    r.data(32, 255);
    v.push(case("data-past-eof", r.done(), off_at, |e| {
        matches!(
            e.kind(),
            E::TensorPastEof {
                start: 64,
                end: 320,
                file_size: 319,
                ..
            }
        )
    }));
    let mut r = Raw::header(3, 1, 0);
    r.tensor("w", &[64], 0, 0);
    let end = r.pos();
    v.push(case("data-section-past-eof", r.done(), end, |e| {
        matches!(
            e.kind(),
            E::DataSectionPastEof {
                data_offset: 64,
                ..
            }
        )
    }));

    // Truncated inside a tensor info (after a metadata string long enough
    // for the tensor count to pass its bound).
    let mut full = Raw::header(3, 1, 1);
    full.kv_str("pad", PAD);
    let start = full.pos();
    full.tensor("w", &[32, 2], 0, 0);
    let (nd, d0, ty_at, off_at) = w_fields_at(start, 2);
    for (name, cut, at) in [
        ("cut-in-tensor-name", start + 8, start),
        ("cut-in-n-dims", nd + 2, nd),
        ("cut-in-dims", d0 + 12, d0 + 8),
        ("cut-in-tensor-type", ty_at + 1, ty_at),
        ("cut-in-tensor-offset", off_at + 7, off_at),
    ] {
        let bytes = full.0[..cut as usize].to_vec();
        let check: Check = if name == "cut-in-tensor-name" {
            |e| {
                matches!(
                    e.kind(),
                    E::PastEnd {
                        what: "tensor name length",
                        ..
                    }
                )
            }
        } else {
            |e| matches!(e.kind(), E::UnexpectedEof { .. })
        };
        v.push(case(name, bytes, at, check));
    }
    v
}

fn check_case(c: &Case) {
    let file = format!("{}.gguf", c.name);
    let result = read_header_from_with_limits(
        &c.bytes[..],
        c.bytes.len() as u64,
        Path::new(&file),
        &c.limits,
    );
    let err = match result {
        Ok(f) => panic!("{}: parsed: {f:?}", c.name),
        Err(e) => e,
    };
    let msg = err.to_string();
    assert!((c.check)(&err), "{}: unexpected error: {msg}", c.name);
    assert!(
        msg.starts_with(&format!("{file}: at byte {}: ", c.offset)),
        "{}: wrong file or offset (expected byte {}): {msg}",
        c.name,
        c.offset
    );
}

#[test]
fn every_malformed_header_is_refused_with_its_own_error() {
    let cases = cases();
    assert!(cases.len() >= 30, "only {} cases", cases.len());
    let mut names = std::collections::HashSet::new();
    let mut failures = Vec::new();
    for c in &cases {
        let r = std::panic::catch_unwind(|| check_case(c));
        if let Err(e) = r {
            failures.push(format!("{}: {:?}", c.name, e.downcast_ref::<String>()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    for c in &cases {
        assert!(names.insert(c.name), "duplicate case {}", c.name);
        let file = format!("{}.gguf", c.name);
        let result = read_header_from_with_limits(
            &c.bytes[..],
            c.bytes.len() as u64,
            Path::new(&file),
            &c.limits,
        );
        let err = match result {
            Ok(f) => panic!("{}: parsed: {f:?}", c.name),
            Err(e) => e,
        };
        let msg = err.to_string();
        assert!(
            (c.check)(&err),
            "{}: unexpected error: {msg}\n{err:?}",
            c.name
        );
        assert!(
            msg.starts_with(&format!("{file}: at byte {}: ", c.offset)),
            "{}: wrong file or offset (expected byte {}): {msg}",
            c.name,
            c.offset
        );
        assert_eq!(err.offset(), c.offset, "{}", c.name);
        assert_eq!(err.path(), Path::new(&file));
        assert!(!err.field().is_empty(), "{}", c.name);
    }
}

/// A valid file with every value type, a nested array, three tensors of
/// different types and alignment 64.
fn valid_file() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("general.alignment", Value::U32(64))
        .meta("a.u8", Value::U8(1))
        .meta("a.i16", Value::I16(-2))
        .meta("a.f32", Value::F32(0.5))
        .meta("a.bool", Value::Bool(true))
        .meta("a.u64", Value::U64(7))
        .meta("a.f64", Value::F64(1.0))
        .meta(
            "a.tokens",
            Value::Array(
                ValueType::String,
                vec![Value::String("<s>".into()), Value::String("é".into())],
            ),
        )
        .meta(
            "a.nested",
            Value::Array(
                ValueType::Array,
                vec![Value::Array(ValueType::I32, vec![Value::I32(3)])],
            ),
        )
        .tensor(
            "token_embd.weight",
            GgmlType::Q8_0,
            &[32, 2],
            TensorData::Bytes(vec![1; 68]),
        )
        .tensor(
            "blk.0.w",
            GgmlType::F16,
            &[3],
            TensorData::Bytes(vec![2; 6]),
        )
        .tensor(
            "output.weight",
            GgmlType::F32,
            &[2],
            TensorData::Bytes(vec![3; 8]),
        );
    let (mut bytes, offsets) = w.header_bytes().unwrap();
    let end = bytes.len() + *offsets.last().unwrap() as usize + 8;
    bytes.resize(end, 0);
    bytes
}

#[test]
fn a_valid_file_cut_at_any_length_is_refused() {
    let bytes = valid_file();
    let path = Path::new("cut.gguf");
    let f = read_header_from(&bytes[..], bytes.len() as u64, path).unwrap();
    assert_eq!(f.tensors.len(), 3);
    assert_eq!(f.alignment, 64);
    for len in 0..bytes.len() {
        let cut = &bytes[..len];
        let err = read_header_from(cut, len as u64, path)
            .err()
            .unwrap_or_else(|| panic!("a file cut at {len} bytes parsed"));
        let msg = err.to_string();
        assert!(msg.starts_with("cut.gguf: at byte "), "{len}: {msg}");
        assert!(err.offset() <= len as u64, "{len}: {msg}");
    }
}

#[test]
fn a_valid_file_with_any_byte_corrupted_never_panics() {
    let bytes = valid_file();
    let path = Path::new("flip.gguf");
    let mut refused = 0;
    for i in 0..bytes.len() {
        for v in [0x00, 0x01, 0x7f, 0x80, 0xff] {
            let mut b = bytes.clone();
            if b[i] == v {
                continue;
            }
            b[i] = v;
            if let Err(e) = read_header_from(&b[..], b.len() as u64, path) {
                assert!(e.to_string().starts_with("flip.gguf: at byte "));
                refused += 1;
            }
        }
    }
    assert!(refused > 0);
}

#[test]
fn a_file_whose_declared_size_exceeds_its_bytes_is_an_io_error() {
    // The reader trusts the size it is given for bounds; a source that ends
    // early (a file truncated while being read) is an I/O error, not a panic.
    let bytes = valid_file();
    let err =
        read_header_from(&bytes[..40], bytes.len() as u64, Path::new("short.gguf")).unwrap_err();
    assert!(matches!(err.kind(), GgufErrorKind::Io { .. }), "{err}");
    assert!(err.to_string().starts_with("short.gguf: at byte "), "{err}");
}

/// Small valid files for the fuzzer's seed corpus
/// (`agent/fuzz/corpus/gguf_header/seed-*`): one per shape of header the
/// reader and `model_params` handle.
fn fuzz_seeds() -> Vec<(&'static str, Vec<u8>)> {
    fn bytes_of(w: &GgufWriter) -> Vec<u8> {
        let (mut bytes, offsets) = w.header_bytes().unwrap();
        if let (Some(t), Some(off)) = (w.tensors().last(), offsets.last()) {
            let end = bytes.len() as u64 + off + t.ty.tensor_bytes(&t.dims).unwrap();
            bytes.resize(end as usize, 0);
        }
        bytes
    }
    fn arch(w: &mut GgufWriter, arch: &str, n_layer: u32) {
        let k = |s: &str| format!("{arch}.{s}");
        w.meta("general.architecture", Value::String(arch.into()))
            .meta("general.name", Value::String(format!("seed {arch}")))
            .meta("general.file_type", Value::U32(7))
            .meta(&k("context_length"), Value::U32(2048))
            .meta(&k("embedding_length"), Value::U32(64))
            .meta(&k("block_count"), Value::U32(n_layer))
            .meta(&k("feed_forward_length"), Value::U32(128))
            .meta(&k("attention.head_count"), Value::U32(4))
            .meta(&k("attention.head_count_kv"), Value::U32(2))
            .meta(
                "tokenizer.ggml.tokens",
                Value::Array(
                    ValueType::String,
                    ["<unk>", "<s>", "</s>", "a", "b"]
                        .iter()
                        .map(|t| Value::String((*t).into()))
                        .collect(),
                ),
            );
        w.tensor(
            "token_embd.weight",
            GgmlType::Q8_0,
            &[64, 5],
            TensorData::Hole,
        );
        for i in 0..n_layer {
            w.tensor(
                &format!("blk.{i}.attn_norm.weight"),
                GgmlType::F32,
                &[64],
                TensorData::Hole,
            );
        }
    }
    let per_layer =
        |v: &[i32]| Value::Array(ValueType::I32, v.iter().map(|&x| Value::I32(x)).collect());

    let mut seeds = vec![("seed-every-value-type", valid_file())];

    let mut w = GgufWriter::new();
    w.version(2);
    arch(&mut w, "llama", 2);
    w.meta("llama.rope.dimension_count", Value::U32(16));
    seeds.push(("seed-llama-v2", bytes_of(&w)));

    let mut w = GgufWriter::new();
    arch(&mut w, "gpt-oss", 4);
    w.meta("gpt-oss.attention.sliding_window", Value::U32(128))
        .meta("gpt-oss.expert_count", Value::U32(4))
        .meta("gpt-oss.expert_used_count", Value::U32(2))
        .meta(
            "gpt-oss.attention.sliding_window_pattern",
            Value::Array(ValueType::Bool, vec![Value::Bool(true), Value::Bool(false)]),
        );
    seeds.push(("seed-gpt-oss", bytes_of(&w)));

    let mut w = GgufWriter::new();
    arch(&mut w, "deepseek2", 3);
    w.meta("deepseek2.attention.kv_lora_rank", Value::U32(32))
        .meta("deepseek2.attention.key_length", Value::U32(48))
        .meta("deepseek2.attention.value_length", Value::U32(32))
        .meta("deepseek2.attention.key_length_mla", Value::U32(24))
        .meta("deepseek2.attention.value_length_mla", Value::U32(16))
        .meta("deepseek2.rope.dimension_count", Value::U32(16))
        .meta("deepseek2.leading_dense_block_count", Value::U32(1))
        .meta("deepseek2.expert_count", Value::U32(8))
        .meta("deepseek2.expert_used_count", Value::U32(2))
        .meta("deepseek2.expert_shared_count", Value::U32(1))
        .meta("general.alignment", Value::U32(64));
    seeds.push(("seed-deepseek2-align64", bytes_of(&w)));

    let mut w = GgufWriter::new();
    arch(&mut w, "nemotron_h", 4);
    for (k, v) in [
        ("ssm.conv_kernel", 4),
        ("ssm.inner_size", 128),
        ("ssm.state_size", 16),
        ("ssm.time_step_rank", 8),
        ("ssm.group_count", 2),
    ] {
        w.meta(&format!("nemotron_h.{k}"), Value::U32(v));
    }
    w.meta(
        "nemotron_h.attention.head_count_kv",
        per_layer(&[0, 2, 0, 0]),
    )
    .meta("nemotron_h.feed_forward_length", per_layer(&[0, 0, 128, 0]));
    seeds.push(("seed-nemotron-h", bytes_of(&w)));

    let mut w = GgufWriter::new();
    w.meta("split.no", Value::U16(1))
        .meta("split.count", Value::U16(3))
        .meta("split.tensors.count", Value::I32(4))
        .tensor(
            "blk.0.ffn_up.weight",
            GgmlType::Q4_K,
            &[256, 2],
            TensorData::Hole,
        )
        .tensor(
            "blk.0.ffn_down.weight",
            GgmlType::IQ4_XS,
            &[256],
            TensorData::Hole,
        );
    seeds.push(("seed-split-part", bytes_of(&w)));

    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("clip".into()));
    seeds.push(("seed-no-tensors", bytes_of(&w)));
    seeds
}

#[test]
fn fuzz_seed_corpus_parses() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/gguf_header");
    let seeds = fuzz_seeds();
    // HALO_WRITE_FUZZ_SEEDS=1 cargo test -p agent --lib fuzz_seed writes them.
    if std::env::var_os("HALO_WRITE_FUZZ_SEEDS").is_some() {
        std::fs::create_dir_all(&dir).unwrap();
        for (name, bytes) in &seeds {
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }
    let mut total = 0;
    for (name, bytes) in &seeds {
        total += bytes.len();
        let f = read_header_from(&bytes[..], bytes.len() as u64, Path::new(name)).unwrap();
        let params = crate::gguf::model_params(&crate::gguf::GgufModel::from(f));
        // A later split part has no architecture and the value-type seed no
        // model keys; every other seed is a model.
        let model = !matches!(*name, "seed-split-part" | "seed-every-value-type");
        assert_eq!(params.is_ok(), model, "{name}: {params:?}");
    }
    assert!(total < 100_000, "seeds take {total} bytes");
    // Every committed seed parses; every input the fuzzer kept is read
    // without a panic (most are malformed on purpose).
    for entry in std::fs::read_dir(&dir).into_iter().flatten() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        let read = read_header_from(&bytes[..], bytes.len() as u64, &path);
        let seed = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("seed-"));
        if seed {
            read.unwrap();
        }
    }
}
