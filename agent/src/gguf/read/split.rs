//! Split sets: a model in several files `NAME-0000K-of-0000N.gguf`, read
//! from part 1 as `llama_model_loader::llama_model_loader` does
//! (`src/llama-model-loader.cpp`): `split.count`, `split.no` and
//! `split.tensors.count` must agree with the file names and with each
//! other, every part must exist, and tensor names are unique over the set.

use super::{
    GgufError, GgufErrorKind, GgufFile, GgufModel, KEY_SPLIT_COUNT, KEY_SPLIT_NO,
    KEY_SPLIT_TENSORS_COUNT, ReadLimits, read_header_with_limits,
};
use std::collections::HashMap;
use std::io;
use std::path::Path;

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
    let Some((prefix, count)) = set_of_first(path, &first)? else {
        return Ok(GgufModel::from(first));
    };
    let model = read_parts(path, prefix, count, first, limits)?;
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

/// Split metadata `key` of `file` disagrees with the file names or the
/// other keys, for `reason`.
fn mismatch(file: &GgufFile, key: &str, reason: String) -> GgufError {
    GgufError::new(
        file.path.clone(),
        file.value_offset(key).unwrap_or(0),
        key,
        GgufErrorKind::SplitMismatch { reason },
    )
}

/// The unsigned integer value of `key` in `file`, if present.
fn split_key(file: &GgufFile, key: &str) -> Result<Option<u64>, GgufError> {
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
}

/// The set `first` (read from `path`) is part 1 of: the name prefix and
/// the part count; `None` when it is a single file.
fn set_of_first<'p>(path: &'p Path, first: &GgufFile) -> Result<Option<(&'p str, u32)>, GgufError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let by_name = parse_split_name(name);
    let count = split_key(first, KEY_SPLIT_COUNT)?.unwrap_or(0);
    let no = split_key(first, KEY_SPLIT_NO)?;
    // llama.cpp reads split.count as a uint16_t.
    if count > u64::from(u16::MAX) {
        return Err(mismatch(
            first,
            KEY_SPLIT_COUNT,
            format!("{count} parts is more than {}", u16::MAX),
        ));
    }
    if count <= 1 {
        // llama.cpp loads additional parts only when split.count > 1.
        if let Some((_, n, c)) = by_name.filter(|&(_, _, c)| c > 1) {
            return Err(mismatch(
                first,
                KEY_SPLIT_COUNT,
                format!("file name says part {n} of {c} but `split.count` is {count}"),
            ));
        }
        return Ok(None);
    }
    let count = count as u32;
    match no {
        Some(0) => {}
        Some(idx) => {
            let first_part =
                by_name.map(|(prefix, _, c)| path.with_file_name(split_part_name(prefix, 1, c)));
            return Err(GgufError::new(
                first.path.clone(),
                first.value_offset(KEY_SPLIT_NO).unwrap_or(0),
                KEY_SPLIT_NO,
                GgufErrorKind::SplitNotFirst {
                    index: idx.saturating_add(1),
                    first: first_part,
                },
            ));
        }
        None => {
            return Err(mismatch(
                first,
                KEY_SPLIT_NO,
                format!("missing, but `split.count` is {count}"),
            ));
        }
    }
    // llama_split_prefix: the name must end in -00001-of-{count}.gguf.
    match by_name {
        Some((prefix, 1, c)) if c == count => Ok(Some((prefix, count))),
        _ => Err(mismatch(
            first,
            KEY_SPLIT_COUNT,
            format!(
                "`split.count` is {count} but the file name `{name}` does not end in `{}`",
                split_part_name("", 1, count)
            ),
        )),
    }
}

/// Reads parts 2 to `count` of the set whose part 1, `first`, is at
/// `path`: each must exist, say its `split.no`, and hold tensors no other
/// part holds.
fn read_parts(
    path: &Path,
    prefix: &str,
    count: u32,
    first: GgufFile,
    limits: &ReadLimits,
) -> Result<GgufModel, GgufError> {
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
                return Err(GgufError::new(
                    path,
                    count_at,
                    KEY_SPLIT_COUNT,
                    GgufErrorKind::SplitPartMissing {
                        part: part_path,
                        index: idx + 1,
                        count,
                    },
                ));
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
                return Err(GgufError::new(
                    part.path.clone(),
                    t.info_offset,
                    format!("tensor `{}` name", t.name),
                    GgufErrorKind::DuplicateTensor {
                        name: t.name.clone(),
                        first: format!("tensor info at byte {at} of `{}`", parts[p].path.display()),
                    },
                ));
            }
            seen.insert(t.name.clone(), (parts.len(), t.info_offset));
        }
        parts.push(part);
    }
    Ok(GgufModel { parts })
}
