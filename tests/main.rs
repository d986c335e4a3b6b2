//! halo's integration tests, one binary (one link on a 2-core machine).
//! Each module drives real processes: llama.cpp's binaries, and halo's own.

mod agent;
mod agent_rpc;
mod bench_cmd;
mod cluster_crash;
mod cluster_failover;
mod cluster_leader;
mod compose;
mod controller_config;
mod controller_etcd_tls;
mod controller_place;
mod controller_placement;
mod controller_store;
mod copy;
mod ctl;
mod ctl_cluster;
mod deploy;
mod engine_check;
mod estimate;
mod fitparams;
mod gateway;
mod hostile;
mod keys;
mod liveness;
mod llama;
mod metrics;
mod ondemand;
mod oom;
mod split;
mod tls;
mod tls_reload;
