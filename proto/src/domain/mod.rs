//! Domain types: what halo's libraries pass around. Each file pairs a type
//! with its `From`/`TryFrom` conversions to and from the wire.

pub mod bench;
pub mod catalog;
pub mod copy;
pub mod instance;
pub mod memory;
pub mod model;
pub mod node;
pub mod placement;
pub mod projection;

pub use bench::{BenchPoint, BenchResult, BenchSetup, Spread};
pub use catalog::{CatalogEntry, EditorMode};
pub use copy::{CopyProgress, CopyState};
pub use instance::{
    CacheType, Instance, InstanceKind, InstanceOptions, InstanceState, LogLine, MemoryBreakdown,
    ObservedBuffers, OomKill, StartRequest, UnknownCacheType,
};
pub use memory::{GpuMemory, MemoryPressure, MemoryReport, ProcessMemory};
pub use model::{ModelFile, ModelParams, ModelStatus, check_model_id};
pub use node::{AgentEvent, AgentEventKind, NodeIdentity, NodeStatus, Snapshot};
pub use placement::{
    HelpersState, NodeFit, OomRecord, Placement, PlacementOptions, Replica, ReplicaKey, SplitPlan,
    SplitShare,
};
pub use projection::{
    MemoryProjection, ProjectedDevice, ProjectionAnswer, ProjectionRequest, ProjectionSettings,
};

/// A wire message that does not describe a valid domain value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConversionError {
    /// A required field was absent.
    #[error("missing field `{0}`")]
    Missing(&'static str),
    /// A field held a value outside its range.
    #[error("invalid `{field}`: {reason}")]
    Invalid {
        /// The field's name.
        field: &'static str,
        /// Why the value is not accepted.
        reason: String,
    },
}
