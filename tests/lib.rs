//! Shared harness for halo's integration tests: temp dirs, the llama.cpp
//! binaries, fixture paths.
