//! A GGUF v3 writer for test fixtures and the demo model.
//!
//! Writes the header (metadata, tensor infos) in the layout `gguf.cpp`
//! (`gguf_write_to_buf`) produces, then each tensor's data at its aligned
//! offset. Tensor data can be real bytes or a [`TensorData::Hole`]: the file
//! is extended past it with `set_len`, so the filesystem stores a hole and a
//! 170 GB model uses almost no disk.

use super::types::{GgmlType, Value};
use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::Path;

/// GGUF magic, `"GGUF"` read as little-endian bytes.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// `GGUF_DEFAULT_ALIGNMENT` in `ggml/include/gguf.h`.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Where a tensor's bytes come from.
#[derive(Debug, Clone)]
pub enum TensorData {
    /// These exact bytes (length must equal the tensor's byte size).
    Bytes(Vec<u8>),
    /// Leave a file hole of the tensor's byte size.
    Hole,
}

/// One tensor to write.
#[derive(Debug, Clone)]
pub struct TensorSpec {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Element type.
    pub ty: GgmlType,
    /// Dimensions, innermost first (`ne[0]` first), 1 to 4 of them.
    pub dims: Vec<u64>,
    /// The data.
    pub data: TensorData,
}

/// Builds a GGUF file in memory (header) and writes it out.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorSpec>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    /// An empty GGUF v3 file.
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// Write this GGUF version instead of 3 (2 and 3 share the layout).
    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Adds (or replaces) a metadata key.
    pub fn meta(&mut self, key: &str, value: Value) -> &mut Self {
        if let Some(slot) = self.metadata.iter_mut().find(|(k, _)| k == key) {
            slot.1 = value;
        } else {
            self.metadata.push((key.to_owned(), value));
        }
        self
    }

    /// Adds a tensor.
    pub fn tensor(
        &mut self,
        name: &str,
        ty: GgmlType,
        dims: &[u64],
        data: TensorData,
    ) -> &mut Self {
        self.tensors.push(TensorSpec {
            name: name.to_owned(),
            ty,
            dims: dims.to_vec(),
            data,
        });
        self
    }

    /// The metadata added so far.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The tensors added so far.
    pub fn tensors(&self) -> &[TensorSpec] {
        &self.tensors
    }

    /// `general.alignment` if set, else the default.
    pub fn alignment(&self) -> u64 {
        self.metadata
            .iter()
            .find(|(k, _)| k == "general.alignment")
            .and_then(|(_, v)| v.as_u64())
            .filter(|a| *a > 0)
            .unwrap_or(DEFAULT_ALIGNMENT)
    }

    /// Serializes the header (everything before the data section), padded
    /// to the alignment, and returns it with each tensor's offset relative to
    /// the data section.
    pub fn header_bytes(&self) -> io::Result<(Vec<u8>, Vec<u64>)> {
        let align = self.alignment();
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in &self.metadata {
            put_str(&mut out, k);
            out.extend_from_slice(&(v.value_type() as u32).to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offsets = Vec::with_capacity(self.tensors.len());
        let mut offset = 0u64;
        for t in &self.tensors {
            let size = t.ty.tensor_bytes(&t.dims).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("tensor {}: dims {:?} do not fit {}", t.name, t.dims, t.ty),
                )
            })?;
            if let TensorData::Bytes(b) = &t.data
                && b.len() as u64 != size
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("tensor {}: {} bytes given, {size} needed", t.name, b.len()),
                ));
            }
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ty.id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align_up(offset + size, align);
        }
        let padded = align_up(out.len() as u64, align) as usize;
        out.resize(padded, 0);
        Ok((out, offsets))
    }

    /// Total file size this writer produces.
    pub fn file_size(&self) -> io::Result<u64> {
        let (header, offsets) = self.header_bytes()?;
        Ok(self.data_end(header.len() as u64, &offsets))
    }

    fn data_end(&self, header_len: u64, offsets: &[u64]) -> u64 {
        match (self.tensors.last(), offsets.last()) {
            (Some(t), Some(off)) => header_len + off + t.ty.tensor_bytes(&t.dims).unwrap_or(0),
            _ => header_len,
        }
    }

    /// Writes the file; holes are left unwritten. Returns the file size.
    pub fn write_to(&self, path: &Path) -> io::Result<u64> {
        let (header, offsets) = self.header_bytes()?;
        let file = File::create(path)?;
        let mut w = BufWriter::new(file);
        w.write_all(&header)?;
        let base = header.len() as u64;
        for (t, off) in self.tensors.iter().zip(&offsets) {
            if let TensorData::Bytes(b) = &t.data {
                w.seek(SeekFrom::Start(base + off))?;
                w.write_all(b)?;
            }
        }
        let file = w.into_inner().map_err(|e| e.into_error())?;
        let end = self.data_end(base, &offsets);
        file.set_len(end)?;
        file.sync_all()?;
        Ok(end)
    }
}

/// Rounds `n` up to a multiple of `align` (`GGML_PAD`).
pub fn align_up(n: u64, align: u64) -> u64 {
    n.div_ceil(align) * align
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => out.push(*x),
        Value::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => out.push(u8::from(*x)),
        Value::String(s) => put_str(out, s),
        Value::Array(ty, items) => {
            out.extend_from_slice(&(*ty as u32).to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                put_value(out, item);
            }
        }
        Value::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}
