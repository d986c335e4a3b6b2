//! The controller's errors and their one mapping to gRPC status codes.

use crate::store::StoreError;

/// Why a controller operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// This controller is not the leader (or its term lapsed).
    #[error("not the leader: only the leader writes desired state")]
    NotLeader,
    /// The request is malformed.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The named thing does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// What the request would make already exists (e.g. a user key's name).
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The request is valid but cannot be served in the current state
    /// (e.g. a placement with no instance yet).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A concurrent write won; retry.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The store failed or cannot be reached.
    #[error("store: {0}")]
    Store(StoreError),
    /// A stored value does not parse.
    #[error("stored value under {key} is not valid: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why.
        reason: String,
    },
}

impl From<StoreError> for Error {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => Error::Conflict(e.to_string()),
            e => Error::Store(e),
        }
    }
}

impl From<proto::ConversionError> for Error {
    fn from(e: proto::ConversionError) -> Self {
        Error::InvalidArgument(e.to_string())
    }
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::NotLeader => Code::FailedPrecondition,
            Error::InvalidArgument(_) => Code::InvalidArgument,
            Error::NotFound(_) => Code::NotFound,
            Error::AlreadyExists(_) => Code::AlreadyExists,
            Error::FailedPrecondition(_) => Code::FailedPrecondition,
            Error::Conflict(_) => Code::Aborted,
            Error::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            Error::Store(_) | Error::Corrupt { .. } => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
