//! The header reader on files written here: every value type, offsets,
//! alignment, the read cap, split sets and file names.

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
        assert!(f.data_offset >= f.header_len && f.data_offset - f.header_len < u64::from(align));
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
        matches!(err.kind(), GgufErrorKind::HeaderTooLarge { cap: 4096, .. }),
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
            err.kind(),
            GgufErrorKind::TooLong {
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
            err.kind(),
            GgufErrorKind::SplitPartMissing {
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
    match err.kind() {
        GgufErrorKind::SplitNotFirst { index, first } => {
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
        matches!(err.kind(), GgufErrorKind::SplitMismatch { .. }) && err.field() == KEY_SPLIT_NO,
        "{err}"
    );
    assert_eq!(err.path(), paths[1]);

    // The same tensor in two parts.
    split_writer(1, 3, &["blk.0.a", "output.weight"], 4)
        .write_to(&paths[1])
        .unwrap();
    let err = read_model(&paths[0]).unwrap_err();
    assert!(
        matches!(err.kind(), GgufErrorKind::DuplicateTensor { name, .. } if name == "output.weight"),
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
        matches!(err.kind(), GgufErrorKind::SplitMismatch { .. })
            && err.field() == KEY_SPLIT_TENSORS_COUNT,
        "{err}"
    );

    // A split-set name without split metadata.
    let lone = dir.path().join("lone-00001-of-00002.gguf");
    GgufWriter::new().write_to(&lone).unwrap();
    let err = read_model(&lone).unwrap_err();
    assert!(
        matches!(err.kind(), GgufErrorKind::SplitMismatch { .. }),
        "{err}"
    );

    // split.count > 1 under a plain name.
    let plain = dir.path().join("plain.gguf");
    split_writer(0, 3, &["x"], 3).write_to(&plain).unwrap();
    let err = read_model(&plain).unwrap_err();
    assert!(
        matches!(err.kind(), GgufErrorKind::SplitMismatch { .. }),
        "{err}"
    );

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
    assert!(
        matches!(err.kind(), GgufErrorKind::NotAFile { .. }),
        "{err}"
    );
    let err = read_header(&dir.path().join("nope.gguf")).unwrap_err();
    assert!(matches!(err.kind(), GgufErrorKind::Io { .. }), "{err}");
    assert!(err.to_string().contains("nope.gguf"));
}
