//! The tensor infos (gguf.cpp "read the tensor info"): a unique name, 1 to
//! 4 dimensions each in `1..=INT64_MAX`, a known type whose blocks divide
//! a row, and an offset checked as "compute the total size of the data
//! section" does (aligned, right after the previous tensor's padded end);
//! then the data section, which must start within the file, and each
//! tensor's data, which must lie within it (`llama_tensor_weight`).

use super::parser::{Parser, align_up};
use super::{GgufError, GgufErrorKind, MAX_DIMS, MAX_PREALLOC, MAX_TENSOR_NAME_LEN, TensorInfo};
use crate::gguf::types::GgmlType;
use std::collections::HashMap;
use std::io::Read;

/// Names one field of the tensor info being read.
type TensorField<'f> = &'f dyn Fn(&str) -> String;

impl<R: Read> Parser<'_, R> {
    /// Reads `n_tensors` infos with data offsets relative to the data
    /// section; with where each info's offset field is stored.
    pub(super) fn tensor_infos(
        &mut self,
        n_tensors: u64,
        alignment: u64,
    ) -> Result<(Vec<TensorInfo>, Vec<u64>), GgufError> {
        let mut tensors: Vec<TensorInfo> = Vec::with_capacity(n_tensors.min(MAX_PREALLOC) as usize);
        let mut offset_fields: Vec<u64> = Vec::with_capacity(tensors.capacity());
        let mut names: HashMap<String, u64> = HashMap::new();
        let mut expected: u64 = 0;
        for i in 0..n_tensors {
            let (t, off_at) = self.tensor_info(i, alignment, &names, &mut expected)?;
            names.insert(t.name.clone(), t.info_offset);
            offset_fields.push(off_at);
            tensors.push(t);
        }
        Ok((tensors, offset_fields))
    }

    /// Reads info `i`, whose data must start at `expected` (moved past
    /// it); `names` are the tensors read so far, with their info offsets.
    fn tensor_info(
        &mut self,
        i: u64,
        alignment: u64,
        names: &HashMap<String, u64>,
        expected: &mut u64,
    ) -> Result<(TensorInfo, u64), GgufError> {
        let info_at = self.pos;
        let name_field = || format!("tensor #{i} name");
        let bytes = self.string_bytes(MAX_TENSOR_NAME_LEN, "tensor name length", &name_field)?;
        let name = self.utf8(bytes, info_at, "tensor name", &name_field)?;
        let field = |part: &str| format!("tensor #{i} `{name}` {part}");
        if let Some(&first) = names.get(&name) {
            return Err(self.err(
                info_at,
                field("name"),
                GgufErrorKind::DuplicateTensor {
                    name: name.clone(),
                    first: format!("tensor info at byte {first}"),
                },
            ));
        }
        let (dims, elements) = self.dims(&field)?;
        let type_at = self.pos;
        let ty = self.tensor_type(&dims, &field)?;
        let too_large = |dims: Vec<u64>| {
            self.err(
                type_at,
                field("type"),
                GgufErrorKind::TensorTooLarge { dims, ty },
            )
        };
        let Some(bytes) = (elements / ty.block_size).checked_mul(ty.type_size) else {
            return Err(too_large(dims));
        };
        let Some(padded) = align_up(bytes, alignment) else {
            return Err(too_large(dims));
        };
        let off_at = self.pos;
        let rel = self.tensor_offset(alignment, *expected, &|| field("offset"))?;
        let Some(next) = expected.checked_add(padded) else {
            return Err(self.err(
                type_at,
                field("type"),
                GgufErrorKind::TensorTooLarge { dims, ty },
            ));
        };
        *expected = next;
        let t = TensorInfo {
            name,
            ty,
            dims,
            offset: rel,
            bytes,
            info_offset: info_at,
        };
        Ok((t, off_at))
    }

    /// Reads `n_dims` and the dimensions; with their element count.
    fn dims(&mut self, field: TensorField) -> Result<(Vec<u64>, u64), GgufError> {
        let nd_at = self.pos;
        let n_dims = self.u32(&|| field("n_dims"))?;
        // gguf.cpp accepts n_dims = 0 (a scalar); no llama.cpp writer
        // emits it (`ggml_n_dims` is at least 1), so it is refused here.
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(self.err(
                nd_at,
                field("n_dims"),
                GgufErrorKind::BadDimCount { n_dims },
            ));
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
                return Err(self.err(
                    at,
                    field(&format!("ne[{j}]")),
                    GgufErrorKind::BadDim { dim: j, value: d },
                ));
            }
            dims.push(d);
            elements = elements
                .and_then(|n| n.checked_mul(d))
                .filter(|&n| n <= i64::MAX as u64);
        }
        match elements {
            Some(elements) => Ok((dims, elements)),
            None => Err(self.err(
                dims_at,
                field("dims"),
                GgufErrorKind::ElementCountOverflow { dims },
            )),
        }
    }

    /// Reads the type: known, not removed, its blocks dividing a row of
    /// `dims`.
    fn tensor_type(&mut self, dims: &[u64], field: TensorField) -> Result<GgmlType, GgufError> {
        let type_at = self.pos;
        let type_id = self.u32(&|| field("type"))?;
        let ty = match GgmlType::from_id(type_id) {
            Some(ty) => ty,
            None if GgmlType::is_removed_id(type_id) => {
                return Err(self.err(
                    type_at,
                    field("type"),
                    GgufErrorKind::RemovedTensorType { type_id },
                ));
            }
            None => {
                return Err(self.err(
                    type_at,
                    field("type"),
                    GgufErrorKind::UnknownTensorType { type_id },
                ));
            }
        };
        if !dims[0].is_multiple_of(ty.block_size) {
            return Err(self.err(
                type_at,
                field("type"),
                GgufErrorKind::RowNotBlockMultiple { ne0: dims[0], ty },
            ));
        }
        Ok(ty)
    }

    /// Reads a data offset, which must be aligned and equal `expected`.
    fn tensor_offset(
        &mut self,
        alignment: u64,
        expected: u64,
        off_field: &dyn Fn() -> String,
    ) -> Result<u64, GgufError> {
        let off_at = self.pos;
        let rel = self.u64(off_field)?;
        let kind = if !rel.is_multiple_of(alignment) {
            GgufErrorKind::MisalignedTensorOffset {
                value: rel,
                alignment,
            }
        } else if rel < expected {
            GgufErrorKind::TensorOverlap {
                value: rel,
                expected,
            }
        } else if rel != expected {
            GgufErrorKind::TensorOffsetMismatch {
                value: rel,
                expected,
            }
        } else {
            return Ok(rel);
        };
        Err(self.err(off_at, off_field(), kind))
    }

    /// The data section's offset: gguf.cpp seeks to the padded header end
    /// only when there are tensors, and fails if that is past the end of
    /// the file. Every tensor's data must lie within the file
    /// (`llama_tensor_weight`); their offsets become absolute.
    pub(super) fn data_section(
        &self,
        header_len: u64,
        alignment: u64,
        tensors: &mut [TensorInfo],
        offset_fields: &[u64],
    ) -> Result<u64, GgufError> {
        let data_offset = if tensors.is_empty() {
            header_len
        } else {
            match align_up(header_len, alignment) {
                Some(d) if d <= self.file_size => d,
                d => {
                    return Err(self.err(
                        header_len,
                        "data section".into(),
                        GgufErrorKind::DataSectionPastEof {
                            data_offset: d.unwrap_or(u64::MAX),
                            file_size: self.file_size,
                        },
                    ));
                }
            }
        };
        for (t, &off_at) in tensors.iter_mut().zip(offset_fields) {
            let start = data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(t.bytes));
            match (start, end) {
                (Some(start), Some(end)) if end <= self.file_size => t.offset = start,
                (start, end) => {
                    return Err(self.err(
                        off_at,
                        format!("tensor `{}` data", t.name),
                        GgufErrorKind::TensorPastEof {
                            start: start.unwrap_or(u64::MAX),
                            end: end.unwrap_or(u64::MAX),
                            file_size: self.file_size,
                        },
                    ));
                }
            }
        }
        Ok(data_offset)
    }
}
