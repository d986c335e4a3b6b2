//! `controller::placement::place`, the pure placement function, on the
//! sparse fixture models (real GGUF headers, data a hole) and simulated
//! 128 GB Strix Halo nodes: refusals with arithmetic, context fallback,
//! eviction, replicas, candidates, observed figures.

use agent::gguf::fixtures::{SparseModel, VocabStyle, write_sparse_with};
use controller::placement::{
    Liveness, NodeState, PlaceRequest, estimate_options, place, used_by_node,
};
use proto::domain::CatalogEntry;
use proto::domain::ModelParams;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

const GIB: u64 = 1 << 30;
/// What the Strix Halo probe fixture reports usable.
const USABLE: u64 = 120 * GIB + GIB / 2;
const RESERVE: u64 = 4 * GIB;

fn params(kind: SparseModel) -> Arc<ModelParams> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    write_sparse_with(kind, &path, VocabStyle::SizeOnly).expect("fixture");
    let model = agent::gguf::read_model(&path).expect("header");
    Arc::new(agent::gguf::model_params(&model).expect("params"))
}

fn node(name: &str, role: &str, models: &[(SparseModel, &Arc<ModelParams>)]) -> NodeState {
    NodeState {
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
    }
}

fn entry(kind: SparseModel, ctx: u32, priority: i32) -> CatalogEntry {
    let mut e = CatalogEntry::new(kind.spec().name, kind.spec().file_name);
    e.default_context = ctx;
    e.priority = priority;
    e
}

fn catalog(entries: Vec<CatalogEntry>) -> BTreeMap<String, CatalogEntry> {
    entries.into_iter().map(|e| (e.name.clone(), e)).collect()
}

fn req(role: &str, model: &str) -> PlaceRequest {
    PlaceRequest {
        role: role.into(),
        model: model.into(),
        ..PlaceRequest::default()
    }
}

#[test]
fn deepseek_1bit_is_refused_as_larger_than_any_node_with_its_arithmetic() {
    let ds = params(SparseModel::DeepSeekV31);
    let nodes = vec![
        node("halo1", "reasoning", &[(SparseModel::DeepSeekV31, &ds)]),
        node("halo2", "reasoning", &[(SparseModel::DeepSeekV31, &ds)]),
    ];
    let cat = catalog(vec![entry(SparseModel::DeepSeekV31, 16384, 10)]);
    let d = place(&nodes, &[], &cat, &req("reasoning", "deepseek-v3.1-1bit"));
    assert!(!d.accepted);
    assert!(
        d.explanation[0].contains("even at the floor context"),
        "{:?}",
        d.explanation
    );
    assert!(
        d.explanation
            .iter()
            .any(|l| l.contains("larger than any node"))
    );
    assert!(
        d.explanation
            .iter()
            .any(|l| l.contains("smaller quantization"))
    );
    assert_eq!(d.fits.len(), 2);
    for f in &d.fits {
        assert!(f.candidate && !f.fits);
        assert!(f.needed_bytes > f.usable_bytes - f.reserve_bytes, "{f:?}");
    }
}

#[test]
fn gpt_oss_and_qwen3_coder_fit_together_on_the_speed_node() {
    let g = params(SparseModel::GptOss20B);
    let q = params(SparseModel::Qwen3Coder30B);
    let nodes = vec![node(
        "halo1",
        "speed",
        &[
            (SparseModel::GptOss20B, &g),
            (SparseModel::Qwen3Coder30B, &q),
        ],
    )];
    let cat = catalog(vec![
        entry(SparseModel::GptOss20B, 32768, 5),
        entry(SparseModel::Qwen3Coder30B, 32768, 5),
    ]);
    let d1 = place(&nodes, &[], &cat, &req("speed", "gpt-oss-20b"));
    assert!(d1.accepted, "{:?}", d1.explanation);
    let p1 = d1.placement.expect("accepted");
    let want = controller::estimate::estimate(&g, &estimate_options(32768, 1, "f16", "f16"));
    assert_eq!(p1.estimate_bytes, want.total_bytes);
    let d2 = place(
        &nodes,
        std::slice::from_ref(&p1),
        &cat,
        &req("speed", "qwen3-coder-30b"),
    );
    assert!(d2.accepted, "{:?}", d2.explanation);
    let f = &d2.fits[0];
    assert_eq!(
        f.used_bytes, p1.estimate_bytes,
        "the first placement is counted"
    );
    assert_eq!(f.free_bytes, USABLE - RESERVE - p1.estimate_bytes);
    assert_eq!(
        f.needed_bytes,
        d2.placement.expect("accepted").estimate_bytes + f.margin_bytes
    );
}

#[test]
fn context_falls_back_to_a_smaller_size_and_says_so() {
    let q = params(SparseModel::Qwen3_235B);
    let nodes = vec![node("halo1", "speed", &[(SparseModel::Qwen3_235B, &q)])];
    let cat = catalog(vec![entry(SparseModel::Qwen3_235B, 262_144, 5)]);
    let d = place(&nodes, &[], &cat, &req("speed", "qwen3-235b"));
    assert!(d.accepted, "{:?}", d.explanation);
    let p = d.placement.expect("accepted");
    assert!(p.options.context_size < 262_144 || p.options.cache_type_k == "q8_0");
    assert!(
        d.explanation
            .iter()
            .any(|l| l.contains("did not fit; chose context")),
        "{:?}",
        d.explanation
    );
}

#[test]
fn eviction_is_listed_and_refused_without_permission_and_done_with_it() {
    let g = params(SparseModel::GptOss20B);
    let c = params(SparseModel::Qwen3Coder30B);
    let big = params(SparseModel::Qwen3_235B);
    let nodes = vec![node(
        "halo1",
        "speed",
        &[
            (SparseModel::GptOss20B, &g),
            (SparseModel::Qwen3Coder30B, &c),
            (SparseModel::Qwen3_235B, &big),
        ],
    )];
    let mut big_entry = entry(SparseModel::Qwen3_235B, 8192, 50);
    big_entry.min_context = 8192;
    let cat = catalog(vec![
        entry(SparseModel::GptOss20B, 32768, 1),
        entry(SparseModel::Qwen3Coder30B, 32768, 2),
        big_entry,
    ]);
    let p1 = place(&nodes, &[], &cat, &req("speed", "gpt-oss-20b"))
        .placement
        .expect("accepted");
    let p2 = place(
        &nodes,
        std::slice::from_ref(&p1),
        &cat,
        &req("speed", "qwen3-coder-30b"),
    )
    .placement
    .expect("accepted");
    let placed = vec![p1, p2];
    let refused = place(&nodes, &placed, &cat, &req("speed", "qwen3-235b"));
    assert!(!refused.accepted);
    assert!(!refused.evicted.is_empty(), "{:?}", refused.explanation);
    assert!(refused.explanation[0].contains("allow eviction"));
    let mut r = req("speed", "qwen3-235b");
    r.evict = true;
    let ok = place(&nodes, &placed, &cat, &r);
    assert!(ok.accepted, "{:?}", ok.explanation);
    assert_eq!(ok.evicted, refused.evicted);
    // Lowest priority goes first.
    assert_eq!(ok.evicted[0], "gpt-oss-20b");
}

#[test]
fn higher_priority_placements_are_never_evicted() {
    let c = params(SparseModel::Qwen3Coder30B);
    let big = params(SparseModel::Qwen3_235B);
    let nodes = vec![node(
        "halo1",
        "speed",
        &[
            (SparseModel::Qwen3Coder30B, &c),
            (SparseModel::Qwen3_235B, &big),
        ],
    )];
    let mut big_entry = entry(SparseModel::Qwen3_235B, 8192, 1);
    big_entry.min_context = 8192;
    let cat = catalog(vec![entry(SparseModel::Qwen3Coder30B, 32768, 9), big_entry]);
    let p = place(&nodes, &[], &cat, &req("speed", "qwen3-coder-30b"))
        .placement
        .expect("accepted");
    let mut r = req("speed", "qwen3-235b");
    r.evict = true;
    let d = place(&nodes, &[p], &cat, &r);
    assert!(!d.accepted);
    assert!(d.evicted.is_empty());
}

#[test]
fn replicas_spread_over_nodes_or_pack_onto_one() {
    let g = params(SparseModel::GptOss20B);
    let nodes = vec![
        node("a", "speed", &[(SparseModel::GptOss20B, &g)]),
        node("b", "speed", &[(SparseModel::GptOss20B, &g)]),
    ];
    let cat = catalog(vec![entry(SparseModel::GptOss20B, 8192, 1)]);
    let mut r = req("speed", "gpt-oss-20b");
    r.replicas = 2;
    let spread = place(&nodes, &[], &cat, &r).placement.expect("accepted");
    let on: Vec<&str> = spread.replicas.iter().map(|x| x.node.as_str()).collect();
    assert!(on.contains(&"a") && on.contains(&"b"), "{on:?}");
    r.pack = true;
    let packed = place(&nodes, &[], &cat, &r).placement.expect("accepted");
    assert_eq!(packed.replicas[0].node, packed.replicas[1].node);
}

#[test]
fn nodes_without_the_role_the_file_or_a_live_agent_are_not_candidates() {
    let g = params(SparseModel::GptOss20B);
    let mut down = node("down", "speed", &[(SparseModel::GptOss20B, &g)]);
    down.liveness = Liveness::Unreachable;
    let nodes = vec![
        down,
        node("reason", "reasoning", &[(SparseModel::GptOss20B, &g)]),
        node("empty", "speed", &[]),
    ];
    let cat = catalog(vec![entry(SparseModel::GptOss20B, 8192, 1)]);
    let d = place(&nodes, &[], &cat, &req("speed", "gpt-oss-20b"));
    assert!(!d.accepted);
    let reasons: Vec<&str> = d.fits.iter().map(|f| f.reason.as_str()).collect();
    assert!(
        reasons.iter().any(|r| r.contains("unreachable")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("role")), "{reasons:?}");
    assert!(
        reasons.iter().any(|r| r.contains("does not hold")),
        "{reasons:?}"
    );
    let mut any = req("speed", "gpt-oss-20b");
    any.any_node = true;
    let d = place(&nodes, &[], &cat, &any);
    assert_eq!(d.placement.expect("accepted").replicas[0].node, "reason");
}

#[test]
fn observed_figures_replace_the_estimate_of_running_replicas() {
    let g = params(SparseModel::GptOss20B);
    let mut n = node("a", "speed", &[(SparseModel::GptOss20B, &g)]);
    let cat = catalog(vec![entry(SparseModel::GptOss20B, 8192, 1)]);
    let p = place(
        std::slice::from_ref(&n),
        &[],
        &cat,
        &req("speed", "gpt-oss-20b"),
    )
    .placement
    .expect("accepted");
    let rid = p.key(&p.replicas[0]).request_id();
    n.observed.insert(rid, 7 * GIB);
    let used = used_by_node(&[n], &[p], &[]);
    assert_eq!(used["a"], 7 * GIB);
}

#[test]
fn a_replica_on_a_lost_node_moves_to_a_live_node_with_the_role_the_file_and_room() {
    let g = params(SparseModel::GptOss20B);
    let cat = catalog(vec![entry(SparseModel::GptOss20B, 8192, 1)]);
    let mut lost = node("lost", "speed", &[(SparseModel::GptOss20B, &g)]);
    let nodes_before = vec![lost.clone()];
    let p = place(&nodes_before, &[], &cat, &req("speed", "gpt-oss-20b"))
        .placement
        .expect("accepted");
    lost.liveness = Liveness::Lost;
    let mut full = node("full", "speed", &[(SparseModel::GptOss20B, &g)]);
    full.usable_bytes = Some(RESERVE + GIB);
    let nodes = vec![
        lost,
        full,
        node("other-role", "reasoning", &[(SparseModel::GptOss20B, &g)]),
        node("no-file", "speed", &[]),
        node("good", "speed", &[(SparseModel::GptOss20B, &g)]),
    ];
    let to = controller::placement::relocate(&nodes, std::slice::from_ref(&p), &p, 0);
    assert_eq!(to.as_deref(), Ok("good"));
    let nowhere = controller::placement::relocate(&nodes[..4], std::slice::from_ref(&p), &p, 0)
        .expect_err("no node qualifies");
    assert!(nowhere.contains("full: needs"), "{nowhere}");
    assert!(nowhere.contains("no-file: does not hold"), "{nowhere}");
}
