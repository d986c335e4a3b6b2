//! halo-controller as a library: desired state, placement and reconcile.
//! Today it holds the memory estimate that placement and `haloctl plan` use.

pub mod estimate;
