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

pub mod domain;

pub use domain::ConversionError;
