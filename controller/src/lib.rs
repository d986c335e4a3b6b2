//! halo-controller as a library: the memory estimate ([`estimate`]), the
//! desired-state store ([`store`]), placement as a pure function
//! ([`placement`]), the view of agents ([`observe`]), reconcile and node
//! loss ([`reconcile`]), llama.cpp's own projections asked of the agents
//! ([`projections`]), a replica's generations and a split's sides
//! ([`lifecycle`]), the gRPC API ([`api`]) with the gateways' routing
//! table ([`routes`]), user keys ([`keys`]), bench results ([`bench`]),
//! models on demand ([`ondemand`]) and model copies ([`copies`]), configuration ([`config`]),
//! `/metrics` ([`metrics`]) and the daemon that ties them together
//! ([`daemon`]).

pub mod api;
pub mod ask_engine;
pub mod bench;
pub mod cli;
pub mod config;
pub mod copies;
pub mod counters;
pub mod daemon;
pub mod desired;
pub mod error;
pub mod estimate;
pub mod events;
pub mod keys;
pub mod leader;
pub mod lifecycle;
pub mod metrics;
pub mod nodes;
pub mod observe;
pub mod ondemand;
pub mod placement;
pub mod projections;
pub mod reconcile;
pub mod routes;
pub mod split;
pub mod store;
