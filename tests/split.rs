//! Splitting one model across nodes (llama.cpp RPC): the plan on sparse
//! fixtures and simulated 128 GB Strix Halo nodes.

use agent::gguf::fixtures::{SparseModel, VocabStyle, write_sparse_with};
use controller::estimate::estimate;
use controller::estimate::split::{self, SplitNode, assign_layers};
use controller::placement::{Liveness, NodeState, PlaceRequest, SplitCaps, place};
use proto::domain::{CatalogEntry, ModelParams};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

const GIB: u64 = 1 << 30;
/// What the Strix Halo probe fixture reports usable.
const USABLE: u64 = 120 * GIB + GIB / 2;
const RESERVE: u64 = 4 * GIB;
const BUILD: &str = "version: 11434 (test)";

fn params(kind: SparseModel) -> Arc<ModelParams> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("m.gguf");
    write_sparse_with(kind, &path, VocabStyle::SizeOnly).expect("fixture");
    let model = agent::gguf::read_model(&path).expect("header");
    Arc::new(agent::gguf::model_params(&model).expect("params"))
}

fn node(name: &str, kind: SparseModel, p: &Arc<ModelParams>, caps: SplitCaps) -> NodeState {
    NodeState {
        name: name.into(),
        roles: vec!["reasoning".into()],
        liveness: Liveness::Ready,
        usable_bytes: Some(USABLE),
        reserve_bytes: RESERVE,
        models: [(kind.spec().file_name.to_owned(), p.clone())].into(),
        observed: HashMap::new(),
        loads: Vec::new(),
        split: caps,
    }
}

fn caps(gpu: bool) -> SplitCaps {
    SplitCaps {
        llama_version: BUILD.into(),
        rpc_server: true,
        gpu,
    }
}

fn deepseek(ctx: u32) -> BTreeMap<String, CatalogEntry> {
    let k = SparseModel::DeepSeekV31;
    let mut e = CatalogEntry::new(k.spec().name, k.spec().file_name);
    e.default_context = ctx;
    [(e.name.clone(), e)].into()
}

fn place_req(split: bool) -> PlaceRequest {
    PlaceRequest {
        role: "reasoning".into(),
        model: "deepseek-v3.1-1bit".into(),
        split,
        ..PlaceRequest::default()
    }
}

#[test]
fn deepseek_1bit_on_two_128_gb_nodes_is_offered_a_split_and_placed_with_split() {
    let k = SparseModel::DeepSeekV31;
    let ds = params(k);
    let nodes = vec![
        node("halo1", k, &ds, caps(true)),
        node("halo2", k, &ds, caps(true)),
    ];
    let cat = deepseek(16384);

    // Without the opt-in: refused, and told that a split would fit.
    let d = place(&nodes, &[], &cat, &place_req(false));
    assert!(!d.accepted, "{:#?}", d.explanation);
    let text = d.explanation.join("\n");
    assert!(
        text.contains("it fits split across") && text.contains("--split"),
        "{text}"
    );

    // With it: one placement, host + helper, each share fits with margin.
    let d = place(&nodes, &[], &cat, &place_req(true));
    assert!(d.accepted, "{}", d.explanation.join("\n"));
    let p = d.placement.expect("placement");
    let plan = p.split.as_ref().expect("split plan");
    assert_eq!(plan.shares.len(), 2);
    assert_eq!(p.replicas.len(), 1);
    let host = plan.host().expect("host");
    assert_eq!(p.replicas[0].node, host.node);
    assert_eq!(p.options.context_size, 16384, "{:#?}", d.explanation);
    let est = estimate(
        &ds,
        &controller::placement::estimate_options(16384, 1, "f16", "f16"),
    );
    for s in &plan.shares {
        assert!(
            s.total_bytes + s.margin_bytes <= s.free_bytes,
            "{s:?} does not fit"
        );
        assert!(s.layers > 0, "{s:?}");
        assert_eq!(
            s.total_bytes,
            s.weights_bytes + s.kv_bytes + s.compute_bytes + s.output_bytes
        );
    }
    // Every weight and KV byte is somewhere, once.
    let sum = |f: fn(&proto::domain::SplitShare) -> u64| plan.shares.iter().map(f).sum::<u64>();
    assert_eq!(sum(|s| s.weights_bytes), ds.weight_bytes);
    assert_eq!(sum(|s| s.kv_bytes), est.kv_bytes);
    assert_eq!(
        plan.shares.iter().map(|s| s.layers).sum::<u32>(),
        ds.block_count
    );
    // The hidden state crosses twice per token: host → helper → host.
    assert_eq!(plan.traffic_bytes_per_token, 2 * ds.embedding_length * 4);
    let notes = plan.notes.join("\n");
    assert!(
        notes.contains("cost:") && notes.contains("--tensor-split"),
        "{notes}"
    );
    println!("{}", d.explanation.join("\n"));
}

#[test]
fn a_split_needs_the_same_llama_cpp_build_and_an_rpc_server_on_helpers() {
    let k = SparseModel::DeepSeekV31;
    let ds = params(k);
    let mut other = caps(true);
    other.llama_version = "version: 11000 (old)".into();
    let nodes = vec![
        node("halo1", k, &ds, caps(true)),
        node("halo2", k, &ds, other),
    ];
    let d = place(&nodes, &[], &deepseek(16384), &place_req(true));
    assert!(!d.accepted);
    let text = d.explanation.join("\n");
    assert!(text.contains("RPC protocol must match"), "{text}");

    let mut no_rpc = caps(true);
    no_rpc.rpc_server = false;
    let nodes = vec![
        node("halo1", k, &ds, caps(true)),
        node("halo2", k, &ds, no_rpc),
    ];
    let d = place(&nodes, &[], &deepseek(16384), &place_req(true));
    assert!(!d.accepted);
    let text = d.explanation.join("\n");
    assert!(text.contains("cannot start ggml-rpc-server"), "{text}");
}

#[test]
fn a_cpu_only_host_keeps_its_layers_on_its_cpu_and_offloads_the_rest() {
    let k = SparseModel::DeepSeekV31;
    let ds = params(k);
    let nodes = vec![
        node("halo1", k, &ds, caps(false)),
        node("halo2", k, &ds, caps(false)),
    ];
    let d = place(&nodes, &[], &deepseek(16384), &place_req(true));
    assert!(d.accepted, "{}", d.explanation.join("\n"));
    let p = d.placement.expect("placement");
    let plan = p.split.expect("plan");
    let helper_layers: u32 = plan
        .shares
        .iter()
        .filter(|s| !s.host)
        .map(|s| s.layers)
        .sum();
    // llama.cpp with -ngl (helper layers + output) puts exactly those on the
    // RPC device.
    let devs = assign_layers(ds.block_count, helper_layers + 1, &[1]);
    let offloaded = devs[..ds.block_count as usize]
        .iter()
        .filter(|d| d.is_some())
        .count();
    assert_eq!(offloaded as u32, helper_layers);
}

/// llama.cpp's own projection of the split the planner makes: the sparse
/// DeepSeek fixture loaded by `llama-fit-params --rpc` against a real
/// ggml-rpc-server on loopback, with the plan's `-ngl` (a CPU-only host
/// here: its layers stay on its CPU, the helper's go to the RPC device).
/// Each share's weights and KV must match llama.cpp's per-device rows
/// within 1 % (or 16 MiB), and the compute buffer the planner reserves must
/// cover llama.cpp's with at most 10 % (or 64 MiB) to spare.
#[test]
fn deepseek_split_plan_matches_llama_fit_params_with_a_real_rpc_server() {
    use tests::parity::{device, run_fit_params_with};
    const MIB: u64 = 1 << 20;
    let k = SparseModel::DeepSeekV31;
    let ds = params(k);
    // llama-fit-params reserves compute for a full ubatch of outputs (no
    // flag sets llama-server's one per slot), so plan with its options.
    let opts = controller::estimate::EstimateOptions::with_ctx(16384);
    let est = estimate(&ds, &opts);
    let free = USABLE - RESERVE;
    let n = |name: &str| SplitNode {
        name: name.into(),
        free_bytes: free,
    };
    let l = split::plan(
        &ds,
        &est,
        &[n("halo2")],
        &n("halo1"),
        false,
        controller::placement::margin,
    );
    assert!(l.fits(), "{:#?}", split::describe(&l));
    let (helper, host) = (&l.shares[0], &l.shares[1]);

    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join(k.spec().file_name);
    write_sparse_with(k, &model, VocabStyle::SizeOnly).expect("fixture");
    let port = tests::free_port();
    let mut rpc = std::process::Command::new(tests::llama_bin("ggml-rpc-server"));
    rpc.args(["-H", "127.0.0.1", "-p", &port.to_string()]);
    let _rpc = tests::Proc::spawn("ggml-rpc-server", rpc, dir.path());
    tests::wait_for(std::time::Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok()
    })
    .expect("ggml-rpc-server accepts connections");

    let extra = [
        "--rpc".to_owned(),
        format!("127.0.0.1:{port}"),
        "-ngl".to_owned(),
        l.gpu_layers.to_string(),
    ];
    let proj = run_fit_params_with(&tests::llama_bin("llama-fit-params"), &model, &opts, &extra)
        .expect("llama-fit-params --rpc");
    let rows = if proj.table.is_empty() {
        &proj.printed
    } else {
        &proj.table
    };
    let sum = |rpc: bool, f: fn(&agent::loadlog::BreakdownRow) -> u64| -> u64 {
        rows.iter()
            .filter(|r| device(&r.name).starts_with("RPC") == rpc)
            .map(f)
            .sum::<u64>()
            * MIB
    };
    let close = |what: &str, ours: u64, theirs: u64, pct: u64, slack: u64| {
        let tol = (theirs * pct / 100).max(slack * MIB);
        println!(
            "{what}: halo {} MiB, llama.cpp {} MiB",
            ours / MIB,
            theirs / MIB
        );
        assert!(
            ours.abs_diff(theirs) <= tol + MIB,
            "{what}: halo {ours} vs llama.cpp {theirs} (tolerance {tol}); rows {rows:?}"
        );
    };
    for (share, rpc, name) in [(helper, true, "helper"), (host, false, "host")] {
        close(
            &format!("{name} weights"),
            share.weights_bytes,
            sum(rpc, |r| r.model_mib),
            1,
            16,
        );
        close(
            &format!("{name} KV"),
            share.kv_bytes,
            sum(rpc, |r| r.context_mib),
            1,
            16,
        );
        let theirs = sum(rpc, |r| r.compute_mib);
        assert!(
            share.compute_bytes + MIB >= theirs,
            "{name} compute: halo {} < llama.cpp {theirs}",
            share.compute_bytes
        );
        close(
            &format!("{name} compute"),
            share.compute_bytes,
            theirs,
            10,
            64,
        );
    }
}
