//! halo's gRPC API, `halo.v1`: the generated prost/tonic code in [`v1`] and
//! the hand-written domain types in [`domain`] that the rest of halo uses;
//! plus [`etcd`], the generated client for the part of etcd's API v3 the
//! controller uses.
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

/// A subset of etcd's API v3 (`proto/etcd/`), generated the same way: the
/// gRPC client the controller's etcd backend is built on.
#[allow(missing_docs, clippy::all, missing_debug_implementations)]
pub mod etcd {
    /// etcd's keys, values and watch events.
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// etcd's KV, Watch and Lease services.
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }
}

pub mod config;
pub mod domain;
pub mod limits;
pub mod notify;
pub mod runtime;
pub mod tls;
pub mod tls_reload;
pub mod transport;
pub mod units;

pub use domain::ConversionError;

/// An error and its sources, `: `-separated, on one line (transport errors
/// hide the useful part, such as a TLS alert, in their sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
