//! Placement through a real controller process and two real agents on
//! simulated 128 GB Strix Halo nodes (the probe fixture tree) holding sparse
//! fixture models (real GGUF headers, data a file hole). llama-server cannot
//! load a hole, so these placements are dry runs or `paused` (the memory is
//! held in desired state but no instance is started); the decisions and
//! their arithmetic are the real ones.

use agent::gguf::fixtures::{SparseModel, VocabStyle, write_sparse_with};
use controller::placement::{estimate_options, margin};
use proto::v1;
use tests::cluster::{AgentNode, ControllerProc, write_catalog};

fn sparse(node: &AgentNode, kind: SparseModel) {
    write_sparse_with(
        kind,
        &node.models.join(kind.spec().file_name),
        VocabStyle::SizeOnly,
    )
    .expect("sparse fixture");
}

fn params(node: &AgentNode, kind: SparseModel) -> proto::domain::ModelParams {
    let m = agent::gguf::read_model(&node.models.join(kind.spec().file_name)).expect("read");
    agent::gguf::model_params(&m).expect("params")
}

fn place(role: &str, model: &str) -> v1::PlaceRequest {
    v1::PlaceRequest {
        role: role.into(),
        model: model.into(),
        ..v1::PlaceRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_refuses_deepseek_with_arithmetic_fits_two_speed_models_and_evicts_only_when_allowed()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut halo1 = AgentNode::new(dir.path(), "halo1", &["speed", "reasoning"], 4);
    let mut halo2 = AgentNode::new(dir.path(), "halo2", &["reasoning"], 4);
    for k in [
        SparseModel::GptOss20B,
        SparseModel::Qwen3Coder30B,
        SparseModel::Qwen3_235B,
        SparseModel::DeepSeekV31,
    ] {
        sparse(&halo1, k);
    }
    sparse(&halo2, SparseModel::DeepSeekV31);
    halo1.start();
    halo2.start();
    let catalog = dir.path().join("catalog.toml");
    write_catalog(
        &catalog,
        &format!(
            r#"
[[models]]
name = "deepseek-v3.1-1bit"
model_id = "{}"
default_context = 16384
priority = 10
modes = ["architect", "debug"]

[[models]]
name = "gpt-oss-20b"
model_id = "{}"
default_context = 32768
priority = 1
modes = ["ask", "autocomplete"]

[[models]]
name = "qwen3-coder-30b"
model_id = "{}"
default_context = 32768
priority = 2
modes = ["code"]

[[models]]
name = "qwen3-235b"
model_id = "{}"
default_context = 8192
min_context = 8192
priority = 50
modes = ["architect"]
"#,
            SparseModel::DeepSeekV31.spec().file_name,
            SparseModel::GptOss20B.spec().file_name,
            SparseModel::Qwen3Coder30B.spec().file_name,
            SparseModel::Qwen3_235B.spec().file_name,
        ),
    );
    let mut ctl = ControllerProc::new(
        dir.path(),
        "controller",
        &[
            "--store-path".into(),
            dir.path().join("state.json").display().to_string(),
            "--node".into(),
            format!("halo1={},halo2={}", halo1.address(), halo2.address()),
            "--catalog".into(),
            catalog.display().to_string(),
        ],
    );
    let mut c = ctl.start_and_wait(&["halo1", "halo2"]).await;

    // DeepSeek 1-bit: refused on both nodes, with the numbers.
    let d = c
        .place(place("reasoning", "deepseek-v3.1-1bit"))
        .await
        .expect("place")
        .into_inner();
    assert!(!d.accepted, "{:?}", d.explanation);
    assert!(
        d.explanation
            .iter()
            .any(|l| l.contains("larger than any node")),
        "{:?}",
        d.explanation
    );
    let fits: Vec<&v1::NodeFit> = d.fits.iter().filter(|f| f.candidate).collect();
    assert_eq!(
        fits.len(),
        2,
        "both reasoning nodes are weighed: {:?}",
        d.fits
    );
    for f in fits {
        assert!(!f.fits);
        assert_eq!(
            f.usable_bytes,
            120 * (1 << 30) + (1 << 29),
            "the probe fixture's 120.5 GiB"
        );
        assert!(f.needed_bytes > f.usable_bytes - f.reserve_bytes, "{f:?}");
    }

    // The catalog says where each model's files are; entries can be added
    // through the API; the plan is the estimate per context and node.
    let cat = c
        .list_catalog(v1::ListCatalogRequest {})
        .await
        .expect("catalog")
        .into_inner();
    let nodes_of = |name: &str| {
        cat.entries
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.nodes.clone())
            .unwrap_or_default()
    };
    assert_eq!(nodes_of("deepseek-v3.1-1bit"), ["halo1", "halo2"]);
    assert_eq!(nodes_of("gpt-oss-20b"), ["halo1"]);
    let added = c
        .put_catalog_entry(v1::PutCatalogEntryRequest {
            entry: Some(v1::CatalogEntry {
                name: "gpt-oss-small-ctx".into(),
                model_id: SparseModel::GptOss20B.spec().file_name.into(),
                default_context: 4096,
                modes: vec![v1::EditorMode::Autocomplete as i32],
                ..v1::CatalogEntry::default()
            }),
        })
        .await
        .expect("put catalog entry")
        .into_inner();
    assert_eq!(added.min_context, 2048);
    let mut dry = place("speed", "gpt-oss-small-ctx");
    dry.dry_run = true;
    let dry = c.place(dry).await.expect("place").into_inner();
    assert!(dry.accepted && dry.dry_run, "{:?}", dry.explanation);
    let bad = c
        .put_catalog_entry(v1::PutCatalogEntryRequest {
            entry: Some(v1::CatalogEntry {
                name: "Not A Name".into(),
                model_id: "x.gguf".into(),
                ..v1::CatalogEntry::default()
            }),
        })
        .await
        .expect_err("invalid name");
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    let plan = c
        .plan(v1::PlanRequest {
            model: "gpt-oss-20b".into(),
            contexts: vec![8192, 32768],
            node: String::new(),
            ..Default::default()
        })
        .await
        .expect("plan")
        .into_inner();
    assert_eq!(plan.rows.len(), 2, "one node holds it, two contexts");
    let e8k = controller::estimate::estimate(
        &params(&halo1, SparseModel::GptOss20B),
        &estimate_options(8192, 1, "f16", "f16"),
    );
    assert_eq!(plan.rows[0].total_bytes, e8k.total_bytes);
    assert!(plan.rows.iter().all(|r| r.fits && r.node == "halo1"));

    // GPT-OSS-20B and Qwen3-Coder-30B together on the speed node (paused).
    let mut g = place("speed", "gpt-oss-20b");
    g.paused = true;
    let g = c.place(g).await.expect("place").into_inner();
    assert!(g.accepted, "{:?}", g.explanation);
    let mut q = place("speed", "qwen3-coder-30b");
    q.paused = true;
    let q = c.place(q).await.expect("place").into_inner();
    assert!(q.accepted, "{:?}", q.explanation);
    let pg = g.placement.expect("placement");
    let pq = q.placement.expect("placement");
    assert_eq!(pg.replicas[0].node, "halo1");
    assert_eq!(pq.replicas[0].node, "halo1");
    let eg = controller::estimate::estimate(
        &params(&halo1, SparseModel::GptOss20B),
        &estimate_options(32768, 1, "f16", "f16"),
    );
    let eq = controller::estimate::estimate(
        &params(&halo1, SparseModel::Qwen3Coder30B),
        &estimate_options(32768, 1, "f16", "f16"),
    );
    assert_eq!(
        pg.estimate_bytes, eg.total_bytes,
        "the total is the estimate"
    );
    assert_eq!(
        pq.estimate_bytes, eq.total_bytes,
        "the total is the estimate"
    );
    let fq = q
        .fits
        .iter()
        .find(|f| f.node == "halo1")
        .expect("halo1 row");
    assert_eq!(
        fq.used_bytes, eg.total_bytes,
        "the first placement counts against the second"
    );
    assert_eq!(fq.needed_bytes, eq.total_bytes + margin(eq.total_bytes));
    assert!(fq.fits);
    eprintln!(
        "speed node: gpt-oss-20b {} B + qwen3-coder-30b {} B",
        eg.total_bytes, eq.total_bytes
    );

    // Qwen3-235B needs the room: refused without permission, listing what
    // would go; a dry run with permission lists the same; with permission,
    // done.
    let big = c
        .place(place("speed", "qwen3-235b"))
        .await
        .expect("place")
        .into_inner();
    assert!(!big.accepted, "{:?}", big.explanation);
    assert!(!big.evicted.is_empty(), "{:?}", big.explanation);
    let mut dry = place("speed", "qwen3-235b");
    dry.evict = true;
    dry.dry_run = true;
    dry.paused = true;
    let dry = c.place(dry).await.expect("place").into_inner();
    assert!(dry.accepted && dry.dry_run);
    assert_eq!(dry.evicted, big.evicted);
    let listed = c
        .list_placements(v1::ListPlacementsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.placements.len(), 2, "a dry run changes nothing");
    let mut ok = place("speed", "qwen3-235b");
    ok.evict = true;
    ok.paused = true;
    let ok = c.place(ok).await.expect("place").into_inner();
    assert!(ok.accepted, "{:?}", ok.explanation);
    assert_eq!(ok.evicted, big.evicted);
    let names: Vec<String> = c
        .list_placements(v1::ListPlacementsRequest {})
        .await
        .expect("list")
        .into_inner()
        .placements
        .into_iter()
        .map(|p| p.name)
        .collect();
    assert!(names.contains(&"qwen3-235b".to_owned()));
    for e in &ok.evicted {
        assert!(!names.contains(e), "{e} was evicted: {names:?}");
    }
    // Nodes, catalog and placements are in the embedded store's file.
    let file = std::fs::read_to_string(dir.path().join("state.json")).expect("store file");
    for key in [
        "/halo/v1/nodes/halo1",
        "/halo/v1/nodes/halo2",
        "/halo/v1/catalog/qwen3-235b",
        "/halo/v1/placements/qwen3-235b",
    ] {
        assert!(file.contains(key), "{key} not stored");
    }
    // Nothing was started for paused placements.
    assert!(halo1.servers().is_empty());
}
