//! Placement decision time, printed (not asserted): `controller::placement::place`
//! on real GGUF headers (sparse fixtures) for 2 nodes with a 50-model
//! catalog, and for 1,000 simulated nodes carrying 10,000 placements.
//! Targets: < 1 ms and < 20 ms per decision.
//!
//!     cargo bench -p tests --bench placement
//!
//! `HALO_BENCH_SMOKE=1`: one decision each, 10 nodes with 100 placements.

use agent::gguf::fixtures::SparseModel;
use controller::placement::{NodeState, PlaceRequest, SplitCaps, place};
use proto::domain::{CatalogEntry, ModelParams, Placement, PlacementOptions, Replica};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::placing::{GIB, node, params};
use tests::smoke;

fn time(label: &str, runs: u32, mut f: impl FnMut() -> bool) {
    let mut samples: Vec<Duration> = Vec::new();
    let mut accepted = 0;
    for _ in 0..runs {
        let t = Instant::now();
        accepted += u32::from(f());
        samples.push(t.elapsed());
    }
    samples.sort();
    let median = samples[samples.len() / 2];
    let p99 = samples[(samples.len() * 99 / 100).min(samples.len() - 1)];
    println!("{label}: median {median:?}, p99 {p99:?} over {runs} decisions ({accepted} accepted)");
}

fn main() {
    let kinds = [
        SparseModel::GptOss20B,
        SparseModel::Qwen3Coder30B,
        SparseModel::Llama31_8B,
        SparseModel::Nemotron3Nano30B,
        SparseModel::Qwen3_235B,
    ];
    let files: Vec<(SparseModel, Arc<ModelParams>)> =
        kinds.iter().map(|&k| (k, params(k))).collect();
    let held: Vec<(SparseModel, &Arc<ModelParams>)> = files.iter().map(|(k, p)| (*k, p)).collect();
    // Every node holds every file; even nodes serve speed, odd reasoning;
    // none can take part in a split.
    let node = |i: usize| {
        let role = if i.is_multiple_of(2) {
            "speed"
        } else {
            "reasoning"
        };
        NodeState {
            split: SplitCaps::default(),
            ..node(&format!("node-{i:04}"), role, &held)
        }
    };
    // 50 catalog names over the 5 files, different contexts and priorities.
    let mut catalog = BTreeMap::new();
    for i in 0..50 {
        let (k, _) = &files[i % files.len()];
        let mut e = CatalogEntry::new(&format!("m{i:02}-{}", k.spec().name), k.spec().file_name);
        e.default_context = [8192, 16384, 32768][i % 3];
        e.priority = i32::try_from(i % 7).unwrap_or(0);
        catalog.insert(e.name.clone(), e);
    }
    let names: Vec<String> = catalog.keys().cloned().collect();

    // Smoke: one decision each, and 10 nodes carrying 100 placements.
    let (small_runs, big_runs, nodes) = if smoke() { (1, 1, 10) } else { (500, 50, 1000) };

    // 2 nodes, 50 models.
    let two: Vec<NodeState> = (0..2).map(node).collect();
    let mut k = 0;
    time("2 nodes, 50-model catalog", small_runs, || {
        k += 1;
        let req = PlaceRequest {
            role: "speed".into(),
            model: names[k % names.len()].clone(),
            ..PlaceRequest::default()
        };
        place(&two, &[], &catalog, &req).accepted
    });

    // 1,000 nodes, 10,000 placements (10 small ones per node).
    let many: Vec<NodeState> = (0..nodes).map(node).collect();
    let placements: Vec<Placement> = (0..nodes * 10)
        .map(|i| Placement {
            on_demand: false,
            placed_at_unix_ms: 0,
            copy_if_missing: false,
            oom_kills: Vec::new(),
            held: None,
            learned_bytes: 0,
            name: format!("p{i:05}"),
            role: "speed".into(),
            model: names[i % names.len()].clone(),
            model_id: "x".into(),
            pinned_node: None,
            options: PlacementOptions {
                context_size: 8192,
                parallel: 1,
                cache_type_k: "f16".into(),
                cache_type_v: "f16".into(),
                extra_flags: Vec::new(),
                allow_context_over_trained: false,
            },
            estimate_bytes: 5 * GIB,
            priority: 1,
            replicas: vec![Replica {
                index: 0,
                node: format!("node-{:04}", i % nodes),
                generation: 1,
            }],
            paused: false,
            split: None,
        })
        .collect();
    let label = format!("{nodes} nodes, {} placements", nodes * 10);
    time(&label, big_runs, || {
        k += 1;
        let req = PlaceRequest {
            role: "speed".into(),
            model: names[k % names.len()].clone(),
            replicas: 3,
            ..PlaceRequest::default()
        };
        place(&many, &placements, &catalog, &req).accepted
    });
}
