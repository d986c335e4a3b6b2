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

pub mod domain;

pub use domain::ConversionError;
