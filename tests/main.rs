//! halo's integration tests, one binary (one link on a 2-core machine).
