//! The fixed header (gguf.cpp `gguf_init_from_reader`, "file magic" and
//! "header"): the magic `GGUF`, a little-endian version 2 or 3, and the
//! tensor and metadata counts, each bounded by the bytes left.

use super::parser::Parser;
use super::{GGUF_VERSION, GgufError, GgufErrorKind, MIN_KV_BYTES, MIN_TENSOR_INFO_BYTES};
use std::io::Read;

/// What the fixed header says.
pub(super) struct Counts {
    /// GGUF version (2 or 3).
    pub(super) version: u32,
    /// Tensor infos that follow the metadata.
    pub(super) n_tensors: u64,
    /// Metadata key-value pairs.
    pub(super) n_kv: u64,
}

impl<R: Read> Parser<'_, R> {
    /// Reads magic, version and both counts.
    pub(super) fn header(&mut self) -> Result<Counts, GgufError> {
        let version = self.version()?;
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
        Ok(Counts {
            version,
            n_tensors,
            n_kv,
        })
    }

    /// Reads the magic and a version this reader knows.
    fn version(&mut self) -> Result<u32, GgufError> {
        let magic: [u8; 4] = self.array(&|| "magic".into())?;
        if &magic != b"GGUF" {
            return Err(self.err(0, "magic".into(), GgufErrorKind::BadMagic { found: magic }));
        }
        let version = self.u32(&|| "version".into())?;
        let refuse = |reason| {
            self.err(
                4,
                "version".into(),
                GgufErrorKind::UnsupportedVersion { version, reason },
            )
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
        Ok(version)
    }
}
