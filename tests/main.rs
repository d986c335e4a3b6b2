//! halo's integration tests, one binary (one link on a 2-core machine).
//! Each module drives real processes: llama.cpp's binaries, and halo's own.

mod agent;
mod ctl;
mod estimate;
mod fitparams;
mod llama;
