//! What every halo gRPC server and client bounds, defined once so the agent,
//! the controller and haloctl agree: message sizes per service, the unary
//! deadline, calls per connection and HTTP/2 keep-alive.
//!
//! Sizes are set from the largest real message with a wide margin:
//!
//! * Requests are small on both services. The largest agent request is a
//!   StartInstance (a request id, a model id of at most
//!   [`crate::domain::model::MAX_MODEL_ID_LEN`] bytes, options with a few
//!   extra flags): well under 16 KiB. The largest controller request is a
//!   PutCatalogEntry or Place: under 16 KiB too.
//! * Responses grow with the cluster. The agent's Watch snapshot and
//!   ListModels list every model file (about 0.5 KiB each with its
//!   parameters): 10,000 files are about 5 MiB. The controller's
//!   ListPlacements and ListNodes for 1,000 nodes and 10,000 placements,
//!   each with its instance (about 2 KiB), are about 20 MiB.
//!
//! The unary deadline ([`Limits::unary_timeout`]) is tonic's server
//! `timeout`: it bounds a handler until it returns its response, which for
//! a server stream (Watch, TailLogs, WatchEvents, PlacementLogs) is as soon
//! as the stream is set up; the messages that follow are not cut. It is a
//! backstop for clients that send no deadline of their own; halo's own
//! clients send a shorter one ([`AGENT_CALL_TIMEOUT`],
//! [`CONTROLLER_CALL_TIMEOUT`]), so theirs is the one that fires.

use std::time::Duration;

/// The bounds of one gRPC service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request message the server decodes (larger: `OUT_OF_RANGE`).
    pub max_request_bytes: usize,
    /// Largest response message the server encodes and clients decode.
    pub max_response_bytes: usize,
    /// Server-side deadline of one call until its response starts.
    pub unary_timeout: Duration,
}

/// `halo.v1.AgentService`: 1 MiB requests (64 times the largest real one),
/// 16 MiB responses (a snapshot of ~30,000 model files), 60 s per call
/// (a stop waits up to the agent's stop timeout, 15 s by default, plus
/// 10 s; a stop still running when the deadline passes finishes anyway).
pub const AGENT: Limits = Limits {
    max_request_bytes: 1024 * 1024,
    max_response_bytes: 16 * 1024 * 1024,
    unary_timeout: Duration::from_secs(60),
};

/// `halo.v1.ControllerService`: 4 MiB requests (tonic's default decode
/// limit, far above any real request), 32 MiB responses (ListPlacements of
/// 10,000 placements with their instances, with room to spare), 60 s per
/// call (a Place waits at most 10 s for another decision, then writes the
/// store).
pub const CONTROLLER: Limits = Limits {
    max_request_bytes: 4 * 1024 * 1024,
    max_response_bytes: 32 * 1024 * 1024,
    unary_timeout: Duration::from_secs(60),
};

/// The controller's deadline for one unary call to an agent.
pub const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// haloctl's deadline for one unary call to the controller.
pub const CONTROLLER_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Calls one connection may have in flight before more wait: halo's own
/// clients use a few (the controller's link to an agent: a Watch plus the
/// odd start or stop; haloctl: one), so 32 only stops a single connection
/// from taking every handler. A stream holds its slot only until it is set
/// up.
pub const CONCURRENCY_PER_CONNECTION: usize = 32;

/// Open HTTP/2 streams (calls, including long-lived server streams) per
/// connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 128;

/// How often a server pings an idle client over HTTP/2, and how long it
/// waits for the answer before closing the connection: a peer that
/// vanished (power loss, a cable pulled) frees its streams within 40 s.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// See [`KEEPALIVE_INTERVAL`].
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// A tonic server builder with `limits`' deadline and the shared
/// concurrency and keep-alive settings. Message sizes are set on each
/// generated service (`max_decoding_message_size`…), which the builder
/// cannot do.
pub fn server(limits: &Limits) -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .timeout(limits.unary_timeout)
        .concurrency_limit_per_connection(CONCURRENCY_PER_CONNECTION)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

/// Whether a status is a deadline that passed: a `DEADLINE_EXCEEDED`, or
/// the `CANCELLED` "Timeout expired" tonic reports when its own timeout
/// (client `Endpoint::timeout` or server `timeout`) fires.
pub fn is_timeout(s: &tonic::Status) -> bool {
    s.code() == tonic::Code::DeadlineExceeded
        || (s.code() == tonic::Code::Cancelled && s.message().contains("Timeout expired"))
}

/// The codec of `halo.v1`'s generated clients and servers: prost's, except
/// that a message that does not decode (broken wire format, a string field
/// that is not UTF-8) is `INVALID_ARGUMENT`, the sender's fault, rather
/// than tonic's `INTERNAL`, which would blame the receiver.
#[derive(Debug, Clone)]
pub struct Codec<T, U>(tonic_prost::ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(tonic_prost::ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = tonic_prost::ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(self.0.decoder())
    }
}

/// [`Codec`]'s decoder.
#[derive(Debug, Clone)]
pub struct Decoder<U>(tonic_prost::ProstDecoder<U>);

impl<U: prost::Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<U>, tonic::Status> {
        self.0.decode(buf).map_err(|s| {
            if s.code() == tonic::Code::Internal {
                tonic::Status::invalid_argument(format!("malformed message: {}", s.message()))
            } else {
                s
            }
        })
    }

    fn buffer_settings(&self) -> tonic::codec::BufferSettings {
        self.0.buffer_settings()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_bounded_far_below_responses_and_clients_give_up_first() {
        for l in [AGENT, CONTROLLER] {
            assert!(l.max_request_bytes < l.max_response_bytes);
            assert!(l.max_request_bytes >= 64 * 1024);
        }
        assert!(AGENT_CALL_TIMEOUT < AGENT.unary_timeout);
        assert!(CONTROLLER_CALL_TIMEOUT < CONTROLLER.unary_timeout);
    }

    #[test]
    fn tonic_timeouts_count_as_deadlines() {
        assert!(is_timeout(&tonic::Status::deadline_exceeded("x")));
        assert!(is_timeout(&tonic::Status::cancelled("Timeout expired")));
        assert!(!is_timeout(&tonic::Status::cancelled("client went away")));
    }
}
