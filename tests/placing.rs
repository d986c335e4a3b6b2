//! Placement inputs for the tests and benches that call
//! `controller::placement` directly: model parameters read from the sparse
//! fixtures' real headers, and simulated nodes the size of the Strix Halo
//! probe fixture.

use agent::gguf::fixtures::{SparseModel, VocabStyle, write_sparse_with};
use controller::placement::{Liveness, NodeState, SplitCaps};
use proto::domain::ModelParams;
use std::collections::HashMap;
use std::sync::Arc;

/// One GiB.
pub const GIB: u64 = 1 << 30;
/// What the Strix Halo probe fixture reports usable.
pub const USABLE: u64 = 120 * GIB + GIB / 2;
/// The memory a node keeps back.
pub const RESERVE: u64 = 4 * GIB;
/// The llama.cpp build every simulated node reports.
pub const BUILD: &str = "version: 11434 (test)";

/// `kind`'s parameters, read from its sparse fixture (written to a
/// temp dir and removed).
pub fn params(kind: SparseModel) -> Arc<ModelParams> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    write_sparse_with(kind, &path, VocabStyle::SizeOnly).expect("fixture");
    let model = agent::gguf::read_model(&path).expect("header");
    Arc::new(agent::gguf::model_params(&model).expect("params"))
}

/// A ready node `name` with one `role`, [`USABLE`] memory of which
/// [`RESERVE`] is kept back, holding `models` (by fixture file name), and
/// able to take part in splits on a GPU ([`split_caps`]).
pub fn node(name: &str, role: &str, models: &[(SparseModel, &Arc<ModelParams>)]) -> NodeState {
    NodeState {
        pressure: None,
        name: name.into(),
        roles: vec![role.into()],
        liveness: Liveness::Ready,
        usable_bytes: Some(USABLE),
        reserve_bytes: RESERVE,
        models: models
            .iter()
            .map(|(k, p)| (k.spec().file_name.to_owned(), (*p).clone()))
            .collect(),
        observed: HashMap::new(),
        loads: Vec::new(),
        engine: Vec::new(),
        split: split_caps(true),
        allowed_flags: None,
    }
}

/// Split capabilities: llama.cpp [`BUILD`], ggml-rpc-server present, and
/// a GPU or not.
pub fn split_caps(gpu: bool) -> SplitCaps {
    SplitCaps {
        llama_version: BUILD.into(),
        rpc_server: true,
        gpu,
    }
}
