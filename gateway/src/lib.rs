//! halo's OpenAI-compatible gateway: one stable URL and one user key for
//! every model halo places. Requests name a placement, a catalog name or an
//! editor mode; the gateway picks a ready replica (fewest in flight, with
//! conversation affinity), queues while none is ready, retries what never
//! reached the client, and streams answers through unbuffered.
//!
//! One implementation, served in two places: by `halo-agent`
//! (`gateway_listen`) and by `haloctl gateway` on a workstation.

pub mod balance;
pub mod config;
pub mod control;
pub mod demand;
pub mod feed;
pub mod listen;
pub mod metrics;
pub mod proxy;
pub mod server;
pub mod table;

pub use config::GatewayConfig;
pub use server::{Gateway, check_plain_listen, tls_acceptor};
