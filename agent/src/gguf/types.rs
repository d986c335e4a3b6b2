//! GGUF value types and ggml tensor types with their block geometry.
//!
//! The tensor type table follows `ggml/include/ggml.h` (`enum ggml_type`) and
//! the `type_traits` table in `ggml/src/ggml.c` (`blck_size`, `type_size`);
//! block structs are in `ggml/src/ggml-common.h`.

use std::fmt;

/// A ggml tensor type: how many elements one block holds and its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType {
    /// The numeric id stored in GGUF tensor infos (`enum ggml_type`).
    pub id: u32,
    /// llama.cpp's name for it (`type_traits[].type_name`, upper-cased).
    pub name: &'static str,
    /// Elements per block (`blck_size`).
    pub block_size: u64,
    /// Bytes per block (`type_size`).
    pub type_size: u64,
}

macro_rules! ggml_types {
    ($( $konst:ident = $id:literal, $name:literal, $blck:expr, $size:expr; )*) => {
        impl GgmlType {
            $(
                #[doc = concat!("`GGML_TYPE_", $name, "`")]
                pub const $konst: GgmlType =
                    GgmlType { id: $id, name: $name, block_size: $blck, type_size: $size };
            )*
            /// Every type llama.cpp ships, in id order.
            pub const ALL: &'static [GgmlType] = &[$(GgmlType::$konst),*];
        }
    };
}

const QK_K: u64 = 256;

// blck_size and type_size per ggml/src/ggml.c `type_traits`; the byte counts
// spelled out are sizeof(block_*) from ggml/src/ggml-common.h, written the way
// its `static_assert(sizeof(block_*) == ...)` lines spell them (ggml_half = 2
// bytes, K_SCALE_SIZE = 12, IQ3S_N_SCALE = QK_K/64). Every entry was checked
// against those asserts; see `table_matches_ggml_common_sizes` below. Ids 4, 5
// (Q4_2, Q4_3) and 31..33, 36..38 (the removed *_4_4/_4_8/_8_8 repacks) have
// `blck_size = 0` in `type_traits` and are refused (see [`GgmlType::is_removed_id`]).
ggml_types! {
    F32 = 0, "F32", 1, 4;
    F16 = 1, "F16", 1, 2;
    Q4_0 = 2, "Q4_0", 32, 2 + 16;
    Q4_1 = 3, "Q4_1", 32, 2 + 2 + 16;
    Q5_0 = 6, "Q5_0", 32, 2 + 4 + 16;
    Q5_1 = 7, "Q5_1", 32, 2 + 2 + 4 + 16;
    Q8_0 = 8, "Q8_0", 32, 2 + 32;
    Q8_1 = 9, "Q8_1", 32, 4 + 32;
    Q2_K = 10, "Q2_K", QK_K, 2 * 2 + QK_K / 16 + QK_K / 4;
    Q3_K = 11, "Q3_K", QK_K, 2 + QK_K / 4 + QK_K / 8 + 12;
    Q4_K = 12, "Q4_K", QK_K, 2 * 2 + 12 + QK_K / 2;
    Q5_K = 13, "Q5_K", QK_K, 2 * 2 + 12 + QK_K / 8 + QK_K / 2;
    Q6_K = 14, "Q6_K", QK_K, 2 + QK_K / 16 + 3 * QK_K / 4;
    Q8_K = 15, "Q8_K", QK_K, 4 + QK_K + QK_K / 16 * 2;
    IQ2_XXS = 16, "IQ2_XXS", QK_K, 2 + QK_K / 8 * 2;
    IQ2_XS = 17, "IQ2_XS", QK_K, 2 + QK_K / 8 * 2 + QK_K / 32;
    IQ3_XXS = 18, "IQ3_XXS", QK_K, 2 + 3 * QK_K / 8;
    IQ1_S = 19, "IQ1_S", QK_K, 2 + QK_K / 8 + QK_K / 16;
    IQ4_NL = 20, "IQ4_NL", 32, 2 + 16;
    IQ3_S = 21, "IQ3_S", QK_K, 2 + QK_K / 4 + QK_K / 32 + QK_K / 8 + QK_K / 64;
    IQ2_S = 22, "IQ2_S", QK_K, 2 + QK_K / 4 + QK_K / 16;
    IQ4_XS = 23, "IQ4_XS", QK_K, 2 + 2 + QK_K / 64 + QK_K / 2;
    I8 = 24, "I8", 1, 1;
    I16 = 25, "I16", 1, 2;
    I32 = 26, "I32", 1, 4;
    I64 = 27, "I64", 1, 8;
    F64 = 28, "F64", 1, 8;
    IQ1_M = 29, "IQ1_M", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32;
    BF16 = 30, "BF16", 1, 2;
    TQ1_0 = 34, "TQ1_0", QK_K, (QK_K - 4 * QK_K / 64) / 5 + QK_K / 64 + 2;
    TQ2_0 = 35, "TQ2_0", QK_K, QK_K / 4 + 2;
    MXFP4 = 39, "MXFP4", 32, 1 + 16;
    // block_nvfp4: 4 UE4M3 scales (one per 16-element sub-block) + 32 bytes
    // of packed E2M1 quants; QK_NVFP4 = 64.
    NVFP4 = 40, "NVFP4", 64, 64 / 16 + 64 / 2;
    // block_q1_0: ggml_half d + QK1_0 / 8 bytes of sign bits; QK1_0 = 128.
    Q1_0 = 41, "Q1_0", 128, 2 + 128 / 8;
    // block_q2_0: ggml_half d + QK2_0 / 4 bytes of 2-bit quants; QK2_0 = 64.
    Q2_0 = 42, "Q2_0", 64, 2 + 64 / 4;
}

impl GgmlType {
    /// `GGML_TYPE_COUNT` in `ggml/include/ggml.h`: ids at or above this are
    /// unknown to this llama.cpp.
    pub const COUNT: u32 = 43;

    /// Whether `id` names a type llama.cpp has removed (`Q4_2`, `Q4_3`, the
    /// `Q4_0_*_*` and `IQ4_NL_*_*` repacks): `type_traits` keeps a
    /// `blck_size = 0` placeholder for them and `gguf.cpp` refuses them.
    pub fn is_removed_id(id: u32) -> bool {
        matches!(id, 4 | 5 | 31..=33 | 36..=38)
    }

    /// The type with this id, if llama.cpp still ships it.
    pub fn from_id(id: u32) -> Option<GgmlType> {
        GgmlType::ALL.iter().copied().find(|t| t.id == id)
    }

    /// The type with this name (case-insensitive), e.g. `q8_0`.
    pub fn from_name(name: &str) -> Option<GgmlType> {
        GgmlType::ALL
            .iter()
            .copied()
            .find(|t| t.name.eq_ignore_ascii_case(name))
    }

    /// Bytes of one row of `ne0` elements, or `None` when `ne0` is not a
    /// whole number of blocks (`ggml_row_size`).
    pub fn row_bytes(self, ne0: u64) -> Option<u64> {
        if !ne0.is_multiple_of(self.block_size) {
            return None;
        }
        (ne0 / self.block_size).checked_mul(self.type_size)
    }

    /// Bytes of a tensor with these dimensions, or `None` on overflow or a
    /// first dimension that is not a whole number of blocks.
    pub fn tensor_bytes(self, dims: &[u64]) -> Option<u64> {
        let (&ne0, rest) = dims.split_first()?;
        rest.iter()
            .try_fold(self.row_bytes(ne0)?, |acc, &d| acc.checked_mul(d))
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// GGUF metadata value type ids (`enum gguf_type` in `ggml/include/gguf.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum ValueType {
    /// `GGUF_TYPE_UINT8`
    U8 = 0,
    /// `GGUF_TYPE_INT8`
    I8 = 1,
    /// `GGUF_TYPE_UINT16`
    U16 = 2,
    /// `GGUF_TYPE_INT16`
    I16 = 3,
    /// `GGUF_TYPE_UINT32`
    U32 = 4,
    /// `GGUF_TYPE_INT32`
    I32 = 5,
    /// `GGUF_TYPE_FLOAT32`
    F32 = 6,
    /// `GGUF_TYPE_BOOL`
    Bool = 7,
    /// `GGUF_TYPE_STRING`
    String = 8,
    /// `GGUF_TYPE_ARRAY`
    Array = 9,
    /// `GGUF_TYPE_UINT64`
    U64 = 10,
    /// `GGUF_TYPE_INT64`
    I64 = 11,
    /// `GGUF_TYPE_FLOAT64`
    F64 = 12,
}

impl ValueType {
    /// The value type with this id.
    pub fn from_id(id: u32) -> Option<ValueType> {
        use ValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }
}

/// A GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `uint8`
    U8(u8),
    /// `int8`
    I8(i8),
    /// `uint16`
    U16(u16),
    /// `int16`
    I16(i16),
    /// `uint32`
    U32(u32),
    /// `int32`
    I32(i32),
    /// `float32`
    F32(f32),
    /// `bool`
    Bool(bool),
    /// `string` (GGUF strings are UTF-8; invalid bytes are replaced).
    String(String),
    /// `array` of one element type (arrays may nest).
    Array(ValueType, Vec<Value>),
    /// `uint64`
    U64(u64),
    /// `int64`
    I64(i64),
    /// `float64`
    F64(f64),
}

impl Value {
    /// The value's type id.
    pub fn value_type(&self) -> ValueType {
        match self {
            Value::U8(_) => ValueType::U8,
            Value::I8(_) => ValueType::I8,
            Value::U16(_) => ValueType::U16,
            Value::I16(_) => ValueType::I16,
            Value::U32(_) => ValueType::U32,
            Value::I32(_) => ValueType::I32,
            Value::F32(_) => ValueType::F32,
            Value::Bool(_) => ValueType::Bool,
            Value::String(_) => ValueType::String,
            Value::Array(..) => ValueType::Array,
            Value::U64(_) => ValueType::U64,
            Value::I64(_) => ValueType::I64,
            Value::F64(_) => ValueType::F64,
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of
    /// any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(v) => Some(v.into()),
            _ => None,
        }
    }

    /// The value as a float, if numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, if it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn table_has_unique_sorted_ids_and_names() {
        let mut ids = HashSet::new();
        let mut names = HashSet::new();
        for t in GgmlType::ALL {
            assert!(ids.insert(t.id), "duplicate id {}", t.id);
            assert!(names.insert(t.name), "duplicate name {}", t.name);
            assert!(t.block_size > 0 && t.type_size > 0, "{t}");
            assert!(t.id < GgmlType::COUNT, "{t}");
            assert!(!GgmlType::is_removed_id(t.id), "{t} is a removed id");
            assert_eq!(GgmlType::from_id(t.id), Some(*t));
            assert_eq!(GgmlType::from_name(&t.name.to_lowercase()), Some(*t));
        }
        assert!(GgmlType::ALL.windows(2).all(|w| w[0].id < w[1].id));
        // Every id below GGML_TYPE_COUNT is either shipped or removed.
        for id in 0..GgmlType::COUNT {
            assert!(
                GgmlType::from_id(id).is_some() != GgmlType::is_removed_id(id),
                "id {id}"
            );
        }
        assert_eq!(GgmlType::from_id(GgmlType::COUNT), None);
    }

    #[test]
    fn table_matches_ggml_common_sizes() {
        // (id, blck_size, sizeof(block)) as the static_asserts in
        // ggml/src/ggml-common.h evaluate with QK_K = 256.
        let expected: &[(u32, u64, u64)] = &[
            (0, 1, 4),
            (1, 1, 2),
            (2, 32, 18),
            (3, 32, 20),
            (6, 32, 22),
            (7, 32, 24),
            (8, 32, 34),
            (9, 32, 36),
            (10, 256, 84),
            (11, 256, 110),
            (12, 256, 144),
            (13, 256, 176),
            (14, 256, 210),
            (15, 256, 292),
            (16, 256, 66),
            (17, 256, 74),
            (18, 256, 98),
            (19, 256, 50),
            (20, 32, 18),
            (21, 256, 110),
            (22, 256, 82),
            (23, 256, 136),
            (24, 1, 1),
            (25, 1, 2),
            (26, 1, 4),
            (27, 1, 8),
            (28, 1, 8),
            (29, 256, 56),
            (30, 1, 2),
            (34, 256, 54),
            (35, 256, 66),
            (39, 32, 17),
            (40, 64, 36),
            (41, 128, 18),
            (42, 64, 18),
        ];
        assert_eq!(expected.len(), GgmlType::ALL.len());
        for &(id, blck, size) in expected {
            let t = GgmlType::from_id(id).expect("id in table");
            assert_eq!((t.block_size, t.type_size), (blck, size), "{t}");
        }
    }

    #[test]
    fn tensor_bytes_checks_blocks_and_overflow() {
        assert_eq!(GgmlType::Q4_K.tensor_bytes(&[512, 3]), Some(2 * 144 * 3));
        assert_eq!(GgmlType::Q4_K.tensor_bytes(&[100]), None);
        assert_eq!(GgmlType::F32.tensor_bytes(&[u64::MAX, 2]), None);
        assert_eq!(GgmlType::F32.tensor_bytes(&[]), None);
    }
}
