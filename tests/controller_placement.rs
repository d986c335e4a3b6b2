//! `controller::placement::place`, the pure placement function, on the
//! sparse fixture models (real GGUF headers, data a hole) and simulated
//! 128 GB Strix Halo nodes: refusals with arithmetic, context fallback,
//! eviction, replicas, candidates, observed figures (of running replicas
//! and of real loads sizing new requests).

use agent::gguf::fixtures::SparseModel;
use controller::estimate::{EstimateSource, ObservedRecord, estimate};
use controller::placement::{
    Liveness, PlaceRequest, estimate_options, margin, place, used_by_node,
};
use proto::domain::CatalogEntry;
use proto::domain::{ModelParams, ObservedBuffers};
use std::collections::BTreeMap;
use tests::placing::{GIB, RESERVE, USABLE, node, params};

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

const MIB: u64 = 1 << 20;

/// A real load of gpt-oss-20b at `ctx` with `cache` KV, as an agent reports
/// it: figures far from the formula's (2 GiB more weights, 3 GiB of KV,
/// 1 GiB of compute, 100 MiB of output).
fn gpt_oss_load(g: &ModelParams, ctx: u32, cache: &str) -> (ObservedRecord, u64) {
    let formula = estimate(g, &estimate_options(ctx, 1, cache, cache));
    let b = ObservedBuffers {
        model_bytes: Some(formula.weights_bytes + 2 * GIB),
        kv_bytes: Some(3 * GIB),
        compute_bytes: Some(GIB),
        output_bytes: Some(100 * MIB),
        ..ObservedBuffers::default()
    };
    let total = formula.weights_bytes + 2 * GIB + 3 * GIB + GIB + 100 * MIB;
    let id = SparseModel::GptOss20B.spec().file_name;
    let rec = ObservedRecord::new(id, &estimate_options(ctx, 1, cache, cache), b);
    (rec, total)
}

#[test]
fn a_new_request_is_sized_by_a_real_load_at_the_same_settings_and_says_so() {
    let g = params(SparseModel::GptOss20B);
    let mut halo1 = node("halo1", "speed", &[(SparseModel::GptOss20B, &g)]);
    let halo2 = node("halo2", "speed", &[(SparseModel::GptOss20B, &g)]);
    let (rec, observed) = gpt_oss_load(&g, 8192, "f16");
    halo1.loads.push(rec);
    let formula = estimate(&g, &estimate_options(8192, 1, "f16", "f16"));
    assert!(
        observed > formula.total_bytes + 5 * GIB,
        "the load differs markedly from the formula"
    );
    let cat = catalog(vec![entry(SparseModel::GptOss20B, 8192, 1)]);
    // Pinned to halo2: a load seen on another node counts too.
    let mut r = req("speed", "gpt-oss-20b");
    r.node = Some("halo2".into());
    let d = place(&[halo1, halo2], &[], &cat, &r);
    assert!(d.accepted, "{:?}", d.explanation);
    let p = d.placement.as_ref().expect("accepted");
    assert_eq!(p.replicas[0].node, "halo2");
    assert_eq!(
        p.estimate_bytes, observed,
        "the observed total, not the formula's"
    );
    let b = d.estimate.as_ref().expect("estimate");
    assert_eq!(b.total_bytes, observed);
    assert_eq!(b.formula_total_bytes, formula.total_bytes);
    assert_eq!(b.observed_on.as_deref(), Some("halo1"));
    for s in [
        b.sources.weights,
        b.sources.kv,
        b.sources.compute,
        b.sources.output,
    ] {
        assert_eq!(s, EstimateSource::Observed);
    }
    assert_eq!(b.source(), "observed on halo1");
    assert!(
        d.explanation[0].contains("KV 3.0 GiB (observed on halo1)")
            && d.explanation[0].contains("compute 1.0 GiB (observed on halo1)"),
        "{:?}",
        d.explanation
    );
    assert!(
        d.explanation
            .iter()
            .any(|l| l.contains("sized by a real load") && l.contains("where the formula gives")),
        "{:?}",
        d.explanation
    );
    let f = d
        .fits
        .iter()
        .find(|f| f.node == "halo2")
        .expect("halo2 row");
    assert_eq!(f.needed_bytes, observed + margin(observed));
    assert_eq!(f.source, "observed on halo1");
    assert!(
        f.reason.contains("(estimate: observed on halo1)"),
        "{}",
        f.reason
    );
    // A load that logged only some figures: the rest from the formula.
    let (mut partial, _) = gpt_oss_load(&g, 8192, "f16");
    partial.buffers.output_bytes = None;
    let mut halo1 = node("halo1", "speed", &[(SparseModel::GptOss20B, &g)]);
    halo1.loads.push(partial);
    let d = place(&[halo1], &[], &cat, &req("speed", "gpt-oss-20b"));
    let b = d.estimate.expect("estimate");
    assert_eq!(b.sources.output, EstimateSource::Formula);
    assert_eq!(b.output_bytes, formula.output_bytes);
    assert_eq!(b.source(), "observed on halo1 (output: formula)");
    assert!(
        d.explanation[0].contains("(observed on halo1)") && d.explanation[0].contains("(formula)"),
        "{:?}",
        d.explanation
    );
}

#[test]
fn a_real_load_at_other_settings_is_ignored() {
    let g = params(SparseModel::GptOss20B);
    let mut halo1 = node("halo1", "speed", &[(SparseModel::GptOss20B, &g)]);
    // Another context, another cache type, another model.
    let (ctx, _) = gpt_oss_load(&g, 16384, "f16");
    let (q8, _) = gpt_oss_load(&g, 8192, "q8_0");
    let (mut other, _) = gpt_oss_load(&g, 8192, "f16");
    other.model_id = "other.gguf".into();
    halo1.loads = vec![ctx, q8, other];
    let cat = catalog(vec![entry(SparseModel::GptOss20B, 8192, 1)]);
    let d = place(&[halo1], &[], &cat, &req("speed", "gpt-oss-20b"));
    assert!(d.accepted, "{:?}", d.explanation);
    let formula = estimate(&g, &estimate_options(8192, 1, "f16", "f16"));
    assert_eq!(
        d.placement.expect("accepted").estimate_bytes,
        formula.total_bytes
    );
    let b = d.estimate.expect("estimate");
    assert_eq!(b.observed_on, None);
    for s in [
        b.sources.weights,
        b.sources.kv,
        b.sources.compute,
        b.sources.output,
    ] {
        assert_eq!(s, EstimateSource::Formula);
    }
    assert!(
        d.explanation[0].contains("(formula)") && !d.explanation.join(" ").contains("observed"),
        "{:?}",
        d.explanation
    );
    assert_eq!(d.fits[0].source, "formula");
    assert!(
        d.fits[0].reason.contains("(estimate: formula)"),
        "{}",
        d.fits[0].reason
    );
}

#[test]
fn relocation_needs_what_a_real_load_of_the_replica_took() {
    let g = params(SparseModel::GptOss20B);
    let cat = catalog(vec![entry(SparseModel::GptOss20B, 8192, 1)]);
    let mut lost = node("lost", "speed", &[(SparseModel::GptOss20B, &g)]);
    let p = place(
        std::slice::from_ref(&lost),
        &[],
        &cat,
        &req("speed", "gpt-oss-20b"),
    )
    .placement
    .expect("accepted");
    // The replica's own load, reported before its node was lost.
    let (rec, observed) = gpt_oss_load(&g, 8192, "f16");
    lost.loads.push(rec);
    lost.liveness = Liveness::Lost;
    // Room for the formula's estimate, not for what the load took.
    let mut small = node("small", "speed", &[(SparseModel::GptOss20B, &g)]);
    small.usable_bytes = Some(RESERVE + p.estimate_bytes + margin(p.estimate_bytes) + GIB);
    assert!(observed + margin(observed) > p.estimate_bytes + margin(p.estimate_bytes) + GIB);
    let nodes = vec![lost.clone(), small.clone()];
    let why = controller::placement::relocate(&nodes, std::slice::from_ref(&p), &p, 0)
        .expect_err("small is too small for the real load");
    assert!(why.contains("small: needs"), "{why}");
    let nodes = vec![
        lost,
        small,
        node("big", "speed", &[(SparseModel::GptOss20B, &g)]),
    ];
    let to = controller::placement::relocate(&nodes, std::slice::from_ref(&p), &p, 0);
    assert_eq!(to.as_deref(), Ok("big"));
}

#[test]
fn a_pin_to_a_node_without_the_role_says_so_not_that_no_node_holds_the_file() {
    let g = params(SparseModel::GptOss20B);
    let nodes = vec![
        node("halo1", "speed", &[(SparseModel::GptOss20B, &g)]),
        node("halo2", "reasoning", &[(SparseModel::GptOss20B, &g)]),
    ];
    let cat = catalog(vec![entry(SparseModel::GptOss20B, 4096, 1)]);
    let mut r = req("speed", "gpt-oss-20b");
    r.node = Some("halo2".into());
    let d = place(&nodes, &[], &cat, &r);
    assert!(!d.accepted);
    assert!(
        d.explanation[0].contains("the pinned node `halo2` cannot take `gpt-oss-20b`")
            && d.explanation[0].contains("no `speed` role (has: reasoning)"),
        "{:?}",
        d.explanation
    );
}

#[test]
fn with_one_node_of_the_role_a_split_is_neither_offered_nor_said_not_to_fit() {
    let ds = params(SparseModel::DeepSeekV31);
    let nodes = vec![
        node("halo1", "speed", &[]),
        node("halo2", "reasoning", &[(SparseModel::DeepSeekV31, &ds)]),
    ];
    let cat = catalog(vec![entry(SparseModel::DeepSeekV31, 16384, 10)]);
    let d = place(&nodes, &[], &cat, &req("reasoning", "deepseek-v3.1-1bit"));
    assert!(!d.accepted);
    let options = d
        .explanation
        .iter()
        .find(|l| l.starts_with("options:"))
        .expect("options line");
    assert!(
        options.contains("or a second live node of role `reasoning` holding"),
        "{options}"
    );

    let mut across = req("reasoning", "deepseek-v3.1-1bit");
    across.split_across = Some(2);
    let d = place(&nodes, &[], &cat, &across);
    assert!(!d.accepted);
    assert!(
        d.explanation[0].contains("cannot be split across 2 nodes: 1 live node(s) of the role"),
        "{:?}",
        d.explanation
    );
    assert!(
        !d.explanation
            .iter()
            .any(|l| l.contains("does not fit either")),
        "{:?}",
        d.explanation
    );
}

#[test]
fn a_context_the_agent_would_refuse_is_refused_at_decision_time_with_the_way_out() {
    let g = params(SparseModel::GptOss20B);
    let trained = u32::try_from(g.context_length).expect("trained context");
    let nodes = vec![node("halo1", "speed", &[(SparseModel::GptOss20B, &g)])];
    let mut e = entry(SparseModel::GptOss20B, 4096, 1);
    e.min_context = 1024;
    let cat = catalog(vec![e.clone()]);

    let mut over = req("speed", "gpt-oss-20b");
    over.context = Some(trained * 2);
    let d = place(&nodes, &[], &cat, &over);
    assert!(!d.accepted);
    assert!(
        d.explanation[0].contains(&format!(
            "above `{}`'s trained context {trained}",
            e.model_id
        )),
        "{:?}",
        d.explanation
    );
    assert!(
        d.explanation
            .iter()
            .any(|l| l.contains("--allow-context-over-trained")),
        "{:?}",
        d.explanation
    );

    // Allowed by the request, or by the catalog: placed, and the start
    // carries the permission to the agent.
    over.allow_context_over_trained = true;
    let d = place(&nodes, &[], &cat, &over);
    assert!(d.accepted, "{:?}", d.explanation);
    let p = d.placement.expect("placement");
    assert_eq!(p.options.context_size, trained * 2);
    assert!(p.instance_options().allow_context_over_trained);
    let mut allowed = e.clone();
    allowed.allow_context_over_trained = true;
    over.allow_context_over_trained = false;
    let d = place(&nodes, &[], &catalog(vec![allowed]), &over);
    assert!(d.accepted, "{:?}", d.explanation);

    // Below the entry's floor: refused, naming it.
    let mut under = req("speed", "gpt-oss-20b");
    under.context = Some(100);
    let d = place(&nodes, &[], &cat, &under);
    assert!(!d.accepted);
    assert!(
        d.explanation[0].contains("context 100 is below `gpt-oss-20b`'s min_context 1024"),
        "{:?}",
        d.explanation
    );
}

#[test]
fn a_node_whose_agent_does_not_allow_the_entrys_flags_is_not_a_candidate() {
    let g = params(SparseModel::GptOss20B);
    let mut strict = node("halo1", "speed", &[(SparseModel::GptOss20B, &g)]);
    strict.allowed_flags = Some(Vec::new());
    let mut open = node("halo2", "speed", &[(SparseModel::GptOss20B, &g)]);
    open.allowed_flags = Some(vec!["--jinja".into()]);
    let mut e = entry(SparseModel::GptOss20B, 4096, 1);
    e.extra_flags = vec!["--jinja".into()];
    let cat = catalog(vec![e]);
    let d = place(
        &[strict.clone(), open],
        &[],
        &cat,
        &req("speed", "gpt-oss-20b"),
    );
    assert!(d.accepted, "{:?}", d.explanation);
    assert_eq!(d.placement.expect("placement").replicas[0].node, "halo2");
    let d = place(&[strict], &[], &cat, &req("speed", "gpt-oss-20b"));
    assert!(!d.accepted);
    assert!(
        d.fits.iter().any(|f| f.node == "halo1"
            && f.reason
                .contains("does not allow `--jinja` (allowed_flags: none)")),
        "{:?}",
        d.fits
    );
}

#[test]
fn on_demand_evicts_the_least_recently_used_waits_for_young_or_busy_ones_and_refuses_what_fits_nowhere()
 {
    use controller::ondemand::{Demanded, Usage, decide};
    let g = params(SparseModel::GptOss20B);
    let c = params(SparseModel::Qwen3Coder30B);
    let big = params(SparseModel::Qwen3_235B);
    let ds = params(SparseModel::DeepSeekV31);
    let nodes = vec![node(
        "halo1",
        "speed",
        &[
            (SparseModel::GptOss20B, &g),
            (SparseModel::Qwen3Coder30B, &c),
            (SparseModel::Qwen3_235B, &big),
            (SparseModel::DeepSeekV31, &ds),
        ],
    )];
    let on_demand = |kind, ctx, priority| {
        let mut e = entry(kind, ctx, priority);
        e.on_demand = true;
        e.role = "speed".into();
        e.min_context = ctx;
        e
    };
    let cat = catalog(vec![
        on_demand(SparseModel::GptOss20B, 32768, 1),
        on_demand(SparseModel::Qwen3Coder30B, 32768, 1),
        on_demand(SparseModel::Qwen3_235B, 8192, 1),
        on_demand(SparseModel::DeepSeekV31, 16384, 1),
    ]);
    let loaded = |model: &str, placed: &[proto::domain::Placement], at: u64| {
        let mut p = place(&nodes, placed, &cat, &req("speed", model))
            .placement
            .expect("accepted");
        p.on_demand = true;
        p.placed_at_unix_ms = at;
        p
    };
    let now = 1_000_000;
    let p1 = loaded("gpt-oss-20b", &[], 0);
    let p2 = loaded("qwen3-coder-30b", std::slice::from_ref(&p1), 0);
    let placed = vec![p1, p2];
    let usage = Usage::new(0);
    usage.touch("gpt-oss-20b", 400_000);
    usage.touch("qwen3-coder-30b", 900_000);

    // Room is made by the least recently used first.
    match decide(&nodes, &placed, &cat, &cat["qwen3-235b"], &usage, now) {
        Demanded::Place { decision, evicted } => {
            assert!(decision.accepted);
            assert_eq!(evicted[0].0, "gpt-oss-20b", "{evicted:?}");
            assert!(evicted[0].1.contains("idle 600 s"), "{evicted:?}");
        }
        other => panic!("not placed: {other:?}"),
    }

    // Both loaded 10 s ago (min_resident_secs 120): wait, with when.
    let young: Vec<_> = placed
        .iter()
        .cloned()
        .map(|mut p| {
            p.placed_at_unix_ms = now - 10_000;
            p
        })
        .collect();
    match decide(&nodes, &young, &cat, &cat["qwen3-235b"], &usage, now) {
        Demanded::Wait {
            retry_after_ms,
            why,
        } => {
            assert_eq!(retry_after_ms, 10_000, "capped at 10 s");
            assert!(why[0].contains("min_resident_secs"), "{why:?}");
        }
        other => panic!("not told to wait: {other:?}"),
    }
    // A higher priority does not wait for them.
    let mut urgent = cat["qwen3-235b"].clone();
    urgent.priority = 5;
    assert!(matches!(
        decide(&nodes, &young, &cat, &urgent, &usage, now),
        Demanded::Place { .. }
    ));

    // A request in flight at any gateway: wait a second and ask again.
    usage.report(
        "gw",
        &[
            ("gpt-oss-20b".into(), 0, 1),
            ("qwen3-coder-30b".into(), 0, 2),
        ],
        now,
    );
    match decide(&nodes, &placed, &cat, &cat["qwen3-235b"], &usage, now) {
        Demanded::Wait {
            retry_after_ms,
            why,
        } => {
            assert_eq!(retry_after_ms, 1000);
            assert!(why.iter().any(|w| w.contains("in flight")), "{why:?}");
        }
        other => panic!("not told to wait: {other:?}"),
    }

    // Larger than the node even with everything unloaded: refused now,
    // with the arithmetic.
    match decide(
        &nodes,
        &placed,
        &cat,
        &cat["deepseek-v3.1-1bit"],
        &usage,
        now,
    ) {
        Demanded::Refused { why } => {
            assert!(why.iter().any(|w| w.contains("GiB")), "{why:?}");
            assert!(
                why.iter()
                    .any(|w| w.contains("even with every on-demand model")),
                "{why:?}"
            );
        }
        other => panic!("not refused: {other:?}"),
    }
}

#[test]
fn a_node_without_the_file_is_chosen_only_with_copy_after_nodes_that_hold_it() {
    let k = SparseModel::GptOss20B;
    let g = params(k);
    let id = k.spec().file_name;
    // halo1 holds the file but has another role; halo2 and halo3 do not.
    let nodes = vec![
        node("halo1", "reasoning", &[(k, &g)]),
        node("halo2", "speed", &[]),
        node("halo3", "speed", &[]),
    ];
    let cat = catalog(vec![entry(k, 4096, 0)]);
    let name = k.spec().name;

    // Without a copy: refused, saying no node of the role holds it.
    let d = place(&nodes, &[], &cat, &req("speed", name));
    assert!(!d.accepted, "{:?}", d.explanation);
    assert!(
        d.explanation[0].contains(&format!("holds `{id}`")),
        "{:?}",
        d.explanation
    );

    // With one: placed where the file is not, with the copy's size, source
    // and an assumed rate (none measured yet).
    let mut r = req("speed", name);
    r.copy = true;
    let d = place(&nodes, &[], &cat, &r);
    assert!(d.accepted, "{:?}", d.explanation);
    let p = d.placement.expect("placement");
    assert_eq!(p.replicas[0].node, "halo2");
    assert!(p.copy_if_missing, "the placement keeps the copy flag");
    let text = d.explanation.join("\n");
    let size = units_bytes(g.weight_bytes);
    assert!(
        text.contains(&format!(
            "halo2 lacks `{id}`: copy {size} from halo1 first (about "
        )) && text.contains("at an assumed 100.0 MiB/s"),
        "{text}"
    );
    let row = d.fits.iter().find(|f| f.node == "halo2").expect("row");
    assert!(
        row.reason
            .contains("lacks the file: copied from halo1 first"),
        "{}",
        row.reason
    );

    // A measured rate between the two nodes is the one said.
    r.copy_rates
        .insert(("halo1".into(), "halo2".into()), 50.0 * 1024.0 * 1024.0);
    let d = place(&nodes, &[], &cat, &r);
    let text = d.explanation.join("\n");
    assert!(text.contains("at the measured 50.0 MiB/s"), "{text}");

    // The catalog's copy_if_missing does the same without the request's.
    let mut e = entry(k, 4096, 0);
    e.copy_if_missing = true;
    let d = place(&nodes, &[], &catalog(vec![e.clone()]), &req("speed", name));
    assert!(d.accepted, "{:?}", d.explanation);

    // A node of the role that holds the file comes first, even with less
    // free memory.
    let mut holder = node("halo3", "speed", &[(k, &g)]);
    holder.usable_bytes = Some(USABLE / 2);
    let nodes2 = vec![nodes[0].clone(), nodes[1].clone(), holder];
    let d = place(&nodes2, &[], &catalog(vec![e]), &req("speed", name));
    assert!(d.accepted, "{:?}", d.explanation);
    let p = d.placement.expect("placement");
    assert_eq!(p.replicas[0].node, "halo3", "{:?}", d.explanation);
    assert!(!d.explanation.join("\n").contains("lacks"));

    // No live node holds it: nothing to copy from.
    let mut lost = nodes[0].clone();
    lost.liveness = Liveness::Lost;
    let d = place(&[lost, nodes[1].clone(), nodes[2].clone()], &[], &cat, &r);
    assert!(!d.accepted);
    let row = d.fits.iter().find(|f| f.node == "halo2").expect("row");
    assert!(
        row.reason
            .contains("no other live node does to copy it from"),
        "{}",
        row.reason
    );

    // Node loss: a placement with the flag moves to a node without the
    // file; one without it does not.
    let mut p = {
        let d = place(&nodes, &[], &cat, &r);
        d.placement.expect("placement")
    };
    let mut gone = nodes.clone();
    gone[1].liveness = Liveness::Lost;
    let to = controller::placement::relocate(&gone, std::slice::from_ref(&p), &p, 0);
    assert_eq!(to.as_deref(), Ok("halo3"));
    p.copy_if_missing = false;
    let why = controller::placement::relocate(&gone, std::slice::from_ref(&p), &p, 0)
        .expect_err("no node holds the file");
    assert!(why.contains("halo3: does not hold the file"), "{why}");
}

fn units_bytes(b: u64) -> String {
    proto::units::bytes(b)
}
