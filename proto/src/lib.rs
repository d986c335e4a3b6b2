//! halo's gRPC API, `halo.v1`: the generated prost/tonic code in [`v1`] and
//! the hand-written domain types in [`domain`] that the rest of halo uses.
//! Conversions between the two live beside the domain types; business logic
//! never touches prost types.

/// Generated from `proto/halo/v1/*.proto` by `build.rs` (protox, no system
/// `protoc`).
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod v1 {
    tonic::include_proto!("halo.v1");
}

/// The encoded `FileDescriptorSet` of `halo.v1`, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/halo_v1_descriptor.bin"));

pub mod backoff;
pub mod config;
pub mod domain;
pub mod fsutil;
#[cfg(feature = "fuzz")]
pub mod fuzz;
pub mod limits;
pub mod metrics;
pub mod notify;
pub mod runtime;
pub mod tls;
pub mod tls_reload;
pub mod transport;
pub mod units;

pub use domain::ConversionError;

/// An error and its sources, `: `-separated, on one line (transport errors
/// hide the useful part, such as a TLS alert, in their sources). A source
/// whose text the line already holds (many errors print their source) is
/// left out.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let part = c.to_string();
        if !s.contains(&part) {
            s.push_str(": ");
            s.push_str(&part);
        }
        cur = c.source();
    }
    s
}
