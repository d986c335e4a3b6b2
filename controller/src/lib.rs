//! halo-controller as a library: desired state, placement and reconcile.
