//! The agent's request errors and the one place they become gRPC status
//! codes. Each variant says what the caller did or what state stopped it;
//! the code is chosen per variant, never a blanket `Internal`.

use crate::state::StateError;

/// Why a request to the agent failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request field is missing, malformed or out of range.
    #[error("invalid `{field}`: {reason}")]
    InvalidArgument {
        /// The field.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A model id that can never name a model (`..`, absolute, NUL…).
    #[error("model id `{}` {reason}", proto::domain::model::shown_id(id))]
    BadModelId {
        /// The id as sent.
        id: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// No model with this id was found in the model directories.
    #[error(
        "unknown model id `{}`: ListModels (with rescan) shows the ids this agent serves",
        proto::domain::model::shown_id(id)
    )]
    UnknownModel {
        /// The id as sent.
        id: String,
    },
    /// No instance with this id.
    #[error("unknown instance id `{}`", id.escape_debug())]
    UnknownInstance {
        /// The id as sent.
        id: String,
    },
    /// The instance is a llama-server this agent did not start.
    #[error("instance `{id}` was not started by this agent; it is reported, never stopped")]
    Unmanaged {
        /// The id.
        id: String,
    },
    /// The model's file did not parse.
    #[error("model `{id}` is broken: {reason}")]
    BrokenModel {
        /// The model id.
        id: String,
        /// Why it did not parse.
        reason: String,
    },
    /// The model's file now resolves outside the model directories.
    #[error("model `{id}` now resolves outside the model directories; refused")]
    ModelEscapes {
        /// The model id.
        id: String,
    },
    /// The requested context is above what the model was trained for.
    #[error(
        "context_size {requested} is above model `{id}`'s trained context {trained}; \
         set allow_context_over_trained to run it anyway"
    )]
    ContextOverTrained {
        /// The model id.
        id: String,
        /// Requested context.
        requested: u32,
        /// `{arch}.context_length`.
        trained: u64,
    },
    /// An extra flag the agent's allow-list does not hold.
    #[error("extra flag `{}` is not in this agent's allow-list [{}]", flag.escape_debug(), allowed.join(", "))]
    FlagNotAllowed {
        /// The flag as sent.
        flag: String,
        /// The allow-list.
        allowed: Vec<String>,
    },
    /// Every port of the range is taken.
    #[error("no free port in {range}: all {count} are in use")]
    PortsExhausted {
        /// The range, `first-last`.
        range: String,
        /// How many ports it has.
        count: usize,
    },
    /// A start request id was already used for a different request.
    #[error(
        "request id `{request_id}` was already used for a different start request (instance `{instance}`)"
    )]
    RequestIdReused {
        /// The request id.
        request_id: String,
        /// The instance it created.
        instance: String,
    },
    /// A mutating request carried a leader revision older than one seen.
    #[error("stale leader revision {got}: this agent has seen {highest}")]
    StaleLeader {
        /// The request's revision.
        got: u64,
        /// The highest seen.
        highest: u64,
    },
    /// An RPC server start without a leader revision: RPC servers are
    /// started only for a placement from the current controller leader.
    #[error(
        "leader_revision 0: an RPC server is started only for a placement from the current \
         controller leader, which sends its revision (> 0)"
    )]
    LeaderRevisionRequired,
    /// This node has no ggml-rpc-server to run.
    #[error(
        "this node cannot run an RPC server: {} is not an executable file (install ggml-rpc-server \
         beside llama-server, from the same llama.cpp build, or set `rpc_server`)",
        path.display()
    )]
    RpcServerUnavailable {
        /// Where the agent looked.
        path: std::path::PathBuf,
    },
    /// The agent is shutting down and takes no new work.
    #[error("the agent is shutting down")]
    ShuttingDown,
    /// Too many start/stop calls: the token bucket is empty.
    #[error(
        "{method} rate limited: at most {burst} start/stop calls at once and {rate} per \
         second after; retry in {retry_after_ms} ms"
    )]
    RateLimited {
        /// The refused method.
        method: &'static str,
        /// The bucket's size.
        burst: u32,
        /// Its refill per second.
        rate: u32,
        /// When one call will be taken again.
        retry_after_ms: u128,
    },
    /// The state directory could not be written.
    #[error("state: {0}")]
    State(#[from] StateError),
    /// A file the agent prepares (API key, instance directory) failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        source: std::io::Error,
    },
}

impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        use tonic::Code;
        let code = match &e {
            Error::InvalidArgument { .. }
            | Error::BadModelId { .. }
            | Error::ContextOverTrained { .. }
            | Error::FlagNotAllowed { .. } => Code::InvalidArgument,
            Error::UnknownModel { .. } | Error::UnknownInstance { .. } => Code::NotFound,
            Error::Unmanaged { .. }
            | Error::BrokenModel { .. }
            | Error::ModelEscapes { .. }
            | Error::StaleLeader { .. }
            | Error::LeaderRevisionRequired
            | Error::RpcServerUnavailable { .. } => Code::FailedPrecondition,
            Error::PortsExhausted { .. } | Error::RateLimited { .. } => Code::ResourceExhausted,
            Error::RequestIdReused { .. } => Code::AlreadyExists,
            Error::ShuttingDown => Code::Unavailable,
            Error::State(_) | Error::Io { .. } => Code::Internal,
        };
        tonic::Status::new(code, e.to_string())
    }
}
impl From<proto::ConversionError> for Error {
    fn from(e: proto::ConversionError) -> Self {
        match e {
            proto::ConversionError::Missing(field) => Error::InvalidArgument {
                field,
                reason: "missing".into(),
            },
            proto::ConversionError::Invalid { field, reason } => {
                Error::InvalidArgument { field, reason }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_maps_to_the_code_a_client_can_act_on() {
        use tonic::Code;
        let cases = [
            (Error::UnknownModel { id: "x".into() }, Code::NotFound),
            (
                Error::BadModelId {
                    id: "../x".into(),
                    reason: "contains `..`",
                },
                Code::InvalidArgument,
            ),
            (
                Error::PortsExhausted {
                    range: "8100-8101".into(),
                    count: 2,
                },
                Code::ResourceExhausted,
            ),
            (
                Error::RequestIdReused {
                    request_id: "r".into(),
                    instance: "i".into(),
                },
                Code::AlreadyExists,
            ),
            (
                Error::StaleLeader { got: 1, highest: 2 },
                Code::FailedPrecondition,
            ),
            (Error::ShuttingDown, Code::Unavailable),
            (
                Error::RateLimited {
                    method: "StartInstance",
                    burst: 20,
                    rate: 5,
                    retry_after_ms: 200,
                },
                Code::ResourceExhausted,
            ),
            (Error::LeaderRevisionRequired, Code::FailedPrecondition),
            (
                Error::RpcServerUnavailable {
                    path: "/opt/llama/ggml-rpc-server".into(),
                },
                Code::FailedPrecondition,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(tonic::Status::from(e).code(), code);
        }
    }
}
