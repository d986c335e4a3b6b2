//! Splitting one model across nodes (llama.cpp RPC): the plan on sparse
//! fixtures and simulated 128 GB Strix Halo nodes.

use agent::gguf::fixtures::{SparseModel, VocabStyle, write_sparse_with};
use controller::estimate::estimate;
use controller::estimate::split::{self, SplitNode, assign_layers};
use controller::placement::{NodeState, PlaceRequest, place};
use proto::domain::CatalogEntry;
use std::collections::BTreeMap;
use tests::placing::{RESERVE, USABLE, node, params, split_caps};

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
        NodeState {
            split: split_caps(true),
            ..node("halo1", "reasoning", &[(k, &ds)])
        },
        NodeState {
            split: split_caps(true),
            ..node("halo2", "reasoning", &[(k, &ds)])
        },
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
    let mut other = split_caps(true);
    other.llama_version = "version: 11000 (old)".into();
    let nodes = vec![
        NodeState {
            split: split_caps(true),
            ..node("halo1", "reasoning", &[(k, &ds)])
        },
        NodeState {
            split: other,
            ..node("halo2", "reasoning", &[(k, &ds)])
        },
    ];
    let d = place(&nodes, &[], &deepseek(16384), &place_req(true));
    assert!(!d.accepted);
    let text = d.explanation.join("\n");
    assert!(text.contains("RPC protocol must match"), "{text}");

    let mut no_rpc = split_caps(true);
    no_rpc.rpc_server = false;
    let nodes = vec![
        NodeState {
            split: split_caps(true),
            ..node("halo1", "reasoning", &[(k, &ds)])
        },
        NodeState {
            split: no_rpc,
            ..node("halo2", "reasoning", &[(k, &ds)])
        },
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
        NodeState {
            split: split_caps(false),
            ..node("halo1", "reasoning", &[(k, &ds)])
        },
        NodeState {
            split: split_caps(false),
            ..node("halo2", "reasoning", &[(k, &ds)])
        },
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

/// The placement's host replica as the controller reports it.
async fn split_replica(c: &mut tests::cluster::Client, name: &str) -> Option<proto::v1::Replica> {
    c.list_placements(proto::v1::ListPlacementsRequest {})
        .await
        .ok()?
        .into_inner()
        .placements
        .into_iter()
        .find(|p| p.name == name)?
        .replicas
        .into_iter()
        .next()
}

/// The recent events the controller keeps.
async fn events(c: &mut tests::cluster::Client) -> Vec<proto::v1::ClusterEvent> {
    let mut s = c
        .watch_events(proto::v1::WatchEventsRequest {
            follow: false,
            recent: None,
        })
        .await
        .expect("events")
        .into_inner();
    let mut out = Vec::new();
    while let Ok(Some(e)) = s.message().await {
        out.push(e);
    }
    out
}

/// Places the tiny model split across two nodes (it fits one).
async fn place_tiny_split(c: &mut tests::cluster::Client) -> proto::v1::PlaceResponse {
    c.place(proto::v1::PlaceRequest {
        role: "speed".into(),
        model: "tiny".into(),
        split_across: 2,
        ..proto::v1::PlaceRequest::default()
    })
    .await
    .expect("place")
    .into_inner()
}

fn alive(pid: u32) -> bool {
    agent::procfs::identify(pid).is_some_and(agent::procfs::is_alive)
}

/// The tiny model split across two real agents on loopback: the helper's
/// ggml-rpc-server holds layers, the host's llama-server uses it with
/// `--rpc` and answers a chat completion. Killing the rpc-server fails the
/// split as a whole (the host's llama-server is stopped, nothing
/// half-alive) and the controller plans it again, which answers again;
/// unplacing leaves no process behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_model_split_over_two_agents_answers_fails_as_a_whole_and_is_replanned() {
    use proto::v1;
    use std::time::{Duration, Instant};
    use tests::cluster::{chat, endpoint};
    use tests::cluster::{eventually, tiny_controller, tiny_speed_pair};

    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = tiny_speed_pair(dir.path(), 6);
    let mut ctl = tiny_controller(
        dir.path(),
        &nodes,
        &["--heartbeat-ms", "250", "--requeue-ms", "300"],
    );
    let mut c = ctl.start_and_wait(&["halo1", "halo2"]).await;

    // The tiny model fits one node: ask for a split over two.
    let t0 = Instant::now();
    let r = place_tiny_split(&mut c).await;
    assert!(r.accepted, "{:#?}", r.explanation);
    let plan = r
        .placement
        .as_ref()
        .and_then(|p| p.split.clone())
        .expect("split plan");
    assert_eq!(plan.shares.len(), 2, "{:#?}", r.explanation);
    let host = plan
        .shares
        .iter()
        .find(|s| s.host)
        .expect("host")
        .node
        .clone();
    let helper = plan
        .shares
        .iter()
        .find(|s| !s.host)
        .expect("helper")
        .node
        .clone();
    assert_ne!(host, helper);

    let ep = endpoint(&c, "tiny", Duration::from_secs(90))
        .await
        .unwrap_or_else(|| panic!("split never ready:\n{}", ctl.logs()));
    println!("place -> Ready (split over 2 agents): {:.2?}", t0.elapsed());
    let reply = chat(&ep.base_url, &ep.api_key, "tiny").expect("chat through the split");
    println!("split reply: {reply:?}");

    let first = split_replica(&mut c, "tiny").await.expect("replica");
    let host_pid = first
        .instance
        .as_ref()
        .and_then(|i| i.pid)
        .expect("host pid");
    let rpc = first.helpers.first().expect("helper instance").clone();
    let rpc_pid = rpc.pid.expect("rpc-server pid");
    assert_eq!(rpc.kind, v1::InstanceKind::RpcServer as i32);
    let opts = first
        .instance
        .as_ref()
        .and_then(|i| i.options.clone())
        .expect("options");
    assert_eq!(opts.rpc_servers, vec![rpc.endpoint.clone()]);

    // The host's load log names the RPC device it put layers on.
    let mut logs = c
        .placement_logs(v1::PlacementLogsRequest {
            placement: "tiny".into(),
            lines: 1000,
            ..v1::PlacementLogsRequest::default()
        })
        .await
        .expect("logs")
        .into_inner();
    let mut text = String::new();
    while let Ok(Some(l)) = logs.message().await {
        text.push_str(&l.line);
        text.push('\n');
    }
    assert!(
        text.lines()
            .any(|l| l.contains("RPC0[") && l.contains("model buffer size")),
        "no RPC model buffer in the host's log:\n{text}"
    );

    // Kill the helper's rpc-server: the split fails as a whole and is
    // planned again under a new generation.
    let t1 = Instant::now();
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(rpc_pid as i32).expect("pid"),
        rustix::process::Signal::KILL,
    )
    .expect("kill rpc-server");
    let again = eventually(Duration::from_secs(90), || {
        let mut c = c.clone();
        let old = first.request_id.clone();
        async move {
            let r = split_replica(&mut c, "tiny").await?;
            let ready = r.instance.as_ref()?.state == v1::InstanceState::Ready as i32
                && !r.helpers.is_empty()
                && r.helpers
                    .iter()
                    .all(|h| h.state == v1::InstanceState::Ready as i32);
            (r.request_id != old && ready).then_some(r)
        }
    })
    .await
    .unwrap_or_else(|| panic!("split not planned again:\n{}", ctl.logs()));
    println!(
        "rpc-server killed -> split Ready again: {:.2?}",
        t1.elapsed()
    );
    // The old host's llama-server is stopped (SIGTERM, then a bounded wait).
    let stopped = eventually(Duration::from_secs(15), || async move {
        (!alive(host_pid)).then_some(())
    })
    .await;
    assert!(
        stopped.is_some(),
        "the old host llama-server was left running"
    );
    let ep = endpoint(&c, "tiny", Duration::from_secs(30))
        .await
        .expect("endpoint after re-plan");
    chat(&ep.base_url, &ep.api_key, "tiny").expect("chat after re-plan");
    let kinds: Vec<String> = events(&mut c)
        .await
        .iter()
        .map(|e| format!("{} {} {}", e.kind, e.subject, e.message))
        .collect();
    assert!(
        kinds.iter().any(|k| k.starts_with("split_replanned tiny")),
        "{kinds:#?}"
    );

    // Unplace: nothing left.
    let pids: Vec<u32> = again
        .instance
        .iter()
        .chain(again.helpers.iter())
        .filter_map(|i| i.pid)
        .collect();
    c.unplace(v1::UnplaceRequest {
        name: "tiny".into(),
    })
    .await
    .expect("unplace");
    let gone = tests::cluster::eventually(Duration::from_secs(30), || {
        let pids = pids.clone();
        async move { pids.iter().all(|&p| !alive(p)).then_some(()) }
    })
    .await;
    assert!(gone.is_some(), "processes left after unplace: {pids:?}");

    // Placed again under the same name: the agents still list the old
    // (stopped) instances, whose request ids the new placement must not
    // reuse; it comes up at once, without re-plans.
    let r = place_tiny_split(&mut c).await;
    assert!(r.accepted, "{:#?}", r.explanation);
    let ep = endpoint(&c, "tiny", Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("placed again, never ready:\n{}", ctl.logs()));
    chat(&ep.base_url, &ep.api_key, "tiny").expect("chat after placing again");
    let replans: Vec<String> = events(&mut c)
        .await
        .into_iter()
        .filter(|e| e.kind == "split_replanned")
        .map(|e| e.message)
        .collect();
    assert_eq!(replans.len(), 1, "only the kill re-plans: {replans:#?}");
    drop(nodes);
}

/// `haloctl place reasoning deepseek-v3.1-1bit` on two simulated 128 GB
/// Strix Halo agents holding the sparse fixture: without `--split` a
/// refusal that says a split would fit; with `--split --dry-run` the plan,
/// per node, each share fitting with its margin. (Not run: the sparse file
/// has no weights to send over RPC.)
#[test]
fn haloctl_offers_and_dry_runs_the_deepseek_split_on_two_simulated_strix_halos() {
    use std::process::Command;
    use std::time::Duration;
    use tests::cluster::{AgentNode, ControllerProc, write_catalog};

    let dir = tempfile::tempdir().expect("tempdir");
    let k = SparseModel::DeepSeekV31;
    let mut nodes = [
        AgentNode::new(dir.path(), "halo1", &["reasoning"], 2),
        AgentNode::new(dir.path(), "halo2", &["reasoning"], 2),
    ];
    for n in &mut nodes {
        write_sparse_with(k, &n.models.join(k.spec().file_name), VocabStyle::SizeOnly)
            .expect("sparse deepseek");
        n.start();
    }
    let catalog = dir.path().join("catalog.toml");
    write_catalog(
        &catalog,
        &format!(
            "[[models]]\nname = \"deepseek-v3.1-1bit\"\nmodel_id = \"{}\"\ndefault_context = 16384\nmin_context = 4096\n",
            k.spec().file_name
        ),
    );
    let mut ctl = ControllerProc::new(
        dir.path(),
        "controller",
        &[
            "--store-path".into(),
            dir.path().join("state.json").display().to_string(),
            "--node".into(),
            format!("halo1={},halo2={}", nodes[0].address(), nodes[1].address()),
            "--catalog".into(),
            catalog.display().to_string(),
            "--heartbeat-ms".into(),
            "250".into(),
        ],
    );
    ctl.start();
    let home = tempfile::tempdir().expect("home");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_haloctl-shim"))
            .args(args)
            .envs(ctl.haloctl_env())
            .env("HOME", home.path())
            .output()
            .expect("haloctl")
    };
    let text = |o: &std::process::Output| {
        format!(
            "exit {:?}\n{}{}",
            o.status.code(),
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    // Both nodes ready and holding the file.
    let ready = tests::wait_for(Duration::from_secs(30), || {
        let o = run(&["place", "reasoning", "deepseek-v3.1-1bit", "--dry-run"]);
        let t = text(&o);
        t.contains("it fits split across").then_some(o)
    });
    let o = ready.unwrap_or_else(|| {
        let o = run(&["place", "reasoning", "deepseek-v3.1-1bit", "--dry-run"]);
        panic!("no split offered:\n{}\n{}", text(&o), ctl.logs())
    });
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("--split"), "{}", text(&o));

    let o = run(&[
        "place",
        "reasoning",
        "deepseek-v3.1-1bit",
        "--split",
        "--dry-run",
    ]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(0), "{t}");
    assert!(
        t.contains("helper, ggml-rpc-server") && t.contains("host, llama-server"),
        "{t}"
    );
    assert!(t.contains("cost:"), "{t}");
    println!("{t}");
    // README.md shows this dry run: it must be what haloctl prints.
    let cmd = "haloctl place reasoning deepseek-v3.1-1bit --split --dry-run";
    let shown = String::from_utf8_lossy(&o.stdout).trim_end().to_owned();
    let checked = tests::readme::check_or_update(&format!("$ {cmd}"), &[(cmd.to_owned(), shown)]);
    assert_eq!(checked, [cmd]);

    let o = run(&[
        "place",
        "reasoning",
        "deepseek-v3.1-1bit",
        "--split",
        "--dry-run",
        "-o",
        "json",
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let shares = v["split"].as_array().expect("split shares");
    assert_eq!(shares.len(), 2, "{v:#}");
    for s in shares {
        let need =
            s["total_bytes"].as_u64().expect("total") + s["margin_bytes"].as_u64().expect("margin");
        assert!(need <= s["free_bytes"].as_u64().expect("free"), "{s:#}");
    }
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(1), "{v:#}");
    // A dry run records nothing.
    let o = run(&["status", "-o", "json"]);
    assert!(
        !String::from_utf8_lossy(&o.stdout).contains("deepseek"),
        "{}",
        text(&o)
    );
}
