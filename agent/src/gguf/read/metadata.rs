//! The metadata key-value pairs: non-empty UTF-8 keys, each once, values
//! of any GGUF type (arrays to a bounded depth), and `general.alignment`,
//! which must be a `uint32` power of two (gguf.cpp, after the pairs).

use super::parser::Parser;
use super::{DEFAULT_ALIGNMENT, GgufError, GgufErrorKind, KEY_ALIGNMENT, MAX_PREALLOC};
use crate::gguf::types::Value;
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// The metadata of one file.
pub(super) struct Metadata {
    /// Keys and values in file order.
    pub(super) metadata: Vec<(String, Value)>,
    /// Byte offset of each value, in the same order.
    pub(super) value_offsets: Vec<u64>,
    /// Index into `metadata` by key.
    pub(super) index: HashMap<String, usize>,
}

impl Metadata {
    /// `general.alignment`, or the default when absent.
    pub(super) fn alignment(&self, path: &Path) -> Result<u64, GgufError> {
        let Some(&i) = self.index.get(KEY_ALIGNMENT) else {
            return Ok(DEFAULT_ALIGNMENT);
        };
        let offset = self.value_offsets[i];
        let kind = match self.metadata[i].1 {
            Value::U32(a) if a.is_power_of_two() => return Ok(u64::from(a)),
            Value::U32(a) => GgufErrorKind::AlignmentNotPowerOfTwo { value: a },
            ref other => GgufErrorKind::AlignmentWrongType {
                found: other.value_type(),
            },
        };
        Err(GgufError::new(path, offset, KEY_ALIGNMENT, kind))
    }
}

impl<R: Read> Parser<'_, R> {
    /// Reads `n_kv` key-value pairs.
    pub(super) fn metadata(&mut self, n_kv: u64) -> Result<Metadata, GgufError> {
        let mut m = Metadata {
            metadata: Vec::with_capacity(n_kv.min(MAX_PREALLOC) as usize),
            value_offsets: Vec::with_capacity(n_kv.min(MAX_PREALLOC) as usize),
            index: HashMap::new(),
        };
        for i in 0..n_kv {
            self.key_value(i, &mut m)?;
        }
        Ok(m)
    }

    /// Reads pair `i` into `m`.
    fn key_value(&mut self, i: u64, m: &mut Metadata) -> Result<(), GgufError> {
        let key_at = self.pos;
        let key_field = || format!("metadata key #{i}");
        let bytes = self.string_bytes(self.limits.max_key_len, "key length", &key_field)?;
        if bytes.is_empty() {
            return Err(self.err(key_at, key_field(), GgufErrorKind::EmptyKey));
        }
        let key = self.utf8(bytes, key_at, "key", &key_field)?;
        let field = || format!("metadata key #{i} `{key}`");
        if let Some(&first) = m.index.get(&key) {
            return Err(self.err(
                key_at,
                field(),
                GgufErrorKind::DuplicateKey {
                    key: key.clone(),
                    first_offset: m.value_offsets[first],
                },
            ));
        }
        let ty = self.value_type(&field)?;
        let value_at = self.pos;
        self.values = self.values.saturating_add(1);
        let value = self.value(ty, 0, &field)?;
        m.index.insert(key.clone(), m.metadata.len());
        m.value_offsets.push(value_at);
        m.metadata.push((key, value));
        Ok(())
    }
}
