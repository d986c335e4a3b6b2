//! Fuzzes the GGUF header reader (`agent::gguf::read`) and the
//! hyper-parameter extraction on whatever parses: arbitrary bytes must give
//! a header or an error, never a panic, a hang or an unbounded allocation.
//!
//! Run from `agent/fuzz`: `cargo fuzz run gguf_header` (nightly), or on a
//! stable toolchain `RUSTC_BOOTSTRAP=1 cargo fuzz run gguf_header`.

#![no_main]

use agent::gguf::{GgufModel, model_params, read_header_from};
use libfuzzer_sys::fuzz_target;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    match read_header_from(data, data.len() as u64, Path::new("fuzz.gguf")) {
        Ok(file) => {
            assert!(file.header_bytes_read <= data.len() as u64);
            assert!(file.data_offset <= data.len() as u64);
            for t in &file.tensors {
                assert!(t.offset.saturating_add(t.bytes) <= data.len() as u64);
            }
            if let Err(e) = model_params(&GgufModel::from(file)) {
                let _ = e.to_string();
            }
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.starts_with("fuzz.gguf: at byte "), "{msg}");
            assert!(e.offset() <= data.len() as u64, "{msg}");
        }
    }
});
