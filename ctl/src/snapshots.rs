//! Snapshot tests: every command's `--help` and the tables of the commands
//! that talk to the controller, rendered from fixed inputs and compared with
//! the files in `ctl/tests/snapshots/`. `HALO_UPDATE_SNAPSHOTS=1 cargo test
//! -p ctl` rewrites the files; review the diff before committing it.

use crate::cluster::{
    endpoints_json, models_json, nodes_json, plan_json, render_endpoints, render_models,
    render_nodes_at, render_plan, render_status, status_json,
};
use crate::place::{decision_json, render_decision};
use proto::v1;
use std::path::PathBuf;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn check(name: &str, actual: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(format!("{name}.txt"));
    if std::env::var_os("HALO_UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir snapshots");
        std::fs::write(&path, actual).expect("write snapshot");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; run with HALO_UPDATE_SNAPSHOTS=1 to create it",
            path.display()
        )
    });
    assert!(
        expected == actual,
        "{} differs (HALO_UPDATE_SNAPSHOTS=1 to accept):\n--- expected\n{expected}--- actual\n{actual}",
        path.display()
    );
}

fn help(args: &[&str]) -> String {
    match crate::cli::parse(args) {
        Ok(_) => panic!("{args:?} parsed instead of printing help"),
        Err(e) => e.render().to_string(),
    }
}

#[test]
fn help_of_every_command_matches_its_snapshot() {
    check("help", &help(&["haloctl", "--help"]));
    // Every subcommand clap knows, so a new one cannot be missed.
    let names: Vec<String> = crate::cli::command()
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    assert!(names.len() >= 12, "{names:?}");
    for cmd in names.iter().map(String::as_str) {
        let h = help(&["haloctl", cmd, "--help"]);
        assert!(h.contains("Example"), "`{cmd} --help` has no example:\n{h}");
        check(&format!("help-{cmd}"), &h);
    }
    for sub in ["init", "issue"] {
        let h = help(&["haloctl", "certs", sub, "--help"]);
        check(&format!("help-certs-{sub}"), &h);
    }
    for sub in ["create", "list", "revoke"] {
        let h = help(&["haloctl", "keys", sub, "--help"]);
        assert!(
            h.contains("Example"),
            "`keys {sub} --help` has no example:\n{h}"
        );
        check(&format!("help-keys-{sub}"), &h);
    }
    let h = help(&["haloctl", "models", "copy", "--help"]);
    assert!(
        h.contains("Example"),
        "`models copy --help` has no example:\n{h}"
    );
    check("help-models-copy", &h);
}

#[test]
fn offline_commands_do_not_offer_the_controller_flags() {
    for args in crate::cli::OFFLINE
        .iter()
        .map(|c| vec!["haloctl", c, "--help"])
        .chain([vec!["haloctl", "certs", "issue", "--help"]])
    {
        let h = help(&args);
        for flag in ["--controller", "--tls-cert", "--tls-key", "--tls-ca"] {
            assert!(!h.contains(flag), "{args:?} offers {flag}:\n{h}");
        }
    }
    // The commands that reach the controller still do.
    let h = help(&["haloctl", "status", "--help"]);
    assert!(h.contains("--controller") && h.contains("--tls-ca"), "{h}");
}

fn node(
    name: &str,
    role: &str,
    status: v1::NodeStatus,
    usable: Option<u64>,
    placed: u64,
) -> v1::NodeView {
    v1::NodeView {
        node: Some(v1::NodeIdentity {
            name: name.into(),
            roles: vec![role.into()],
            agent_address: format!("100.64.0.{}:7301", name.len()),
            ..Default::default()
        }),
        status: status as i32,
        memory: Some(v1::MemoryReport {
            usable_bytes: usable,
            ..Default::default()
        }),
        reserve_bytes: 4 * GIB,
        placed_bytes: placed,
        ..Default::default()
    }
}

#[test]
fn nodes_table_matches_its_snapshot() {
    let nodes = [
        node(
            "halo1",
            "speed",
            v1::NodeStatus::Ready,
            Some(120 * GIB),
            48 * GIB,
        ),
        node(
            "halo2",
            "reasoning",
            v1::NodeStatus::Unreachable,
            Some(120 * GIB),
            0,
        ),
        node("halo3", "speed", v1::NodeStatus::Unknown, None, 0),
    ];
    // halo1's certificate is good for long, halo2's nearly expired, halo3
    // (not heard from) unknown.
    let mut nodes = nodes_json(&nodes);
    nodes[0].cert_not_after_unix = Some(NOW + 312 * DAY + 3600);
    nodes[1].cert_not_after_unix = Some(NOW + 12 * DAY + 60);
    check("nodes", &render_nodes_at(&nodes, NOW));
}

/// A fixed "now" (2026-01-01T00:00:00Z) for expiry columns.
const NOW: i64 = 1_767_225_600;
const DAY: i64 = 86_400;

#[test]
fn certificate_expiry_reads_in_days_then_hours_then_expired_and_warns_within_30_days() {
    use crate::output::{cert_expiry, cert_warning};
    assert_eq!(cert_expiry(NOW + 312 * DAY + 5, NOW), "expires in 312d");
    assert_eq!(cert_expiry(NOW + DAY, NOW), "expires in 1d");
    assert_eq!(cert_expiry(NOW + 2 * 3600 - 1, NOW), "expires in 2h");
    assert_eq!(cert_expiry(NOW, NOW), "EXPIRED");
    assert_eq!(cert_expiry(NOW - 10 * DAY, NOW), "EXPIRED");
    assert_eq!(
        cert_warning("node a's certificate", NOW + 30 * DAY, NOW),
        None
    );
    let soon = cert_warning("node a's certificate", NOW + 29 * DAY, NOW).unwrap_or_default();
    assert!(
        soon.starts_with("warning: node a's certificate expires in 29d"),
        "{soon}"
    );
    let gone = cert_warning("node a's certificate", NOW - 1, NOW).unwrap_or_default();
    assert!(
        gone.starts_with("warning: node a's certificate has EXPIRED"),
        "{gone}"
    );
}

#[test]
fn models_table_matches_its_snapshot() {
    let entry =
        |name: &str, file: &str, size: u64, arch: &str, q: &str, nodes: &[&str]| v1::CatalogEntry {
            name: name.into(),
            model_id: file.into(),
            default_context: 32768,
            min_context: 4096,
            modes: vec![v1::EditorMode::Code as i32, v1::EditorMode::Ask as i32],
            nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
            params: (!nodes.is_empty()).then(|| v1::ModelParams {
                architecture: arch.into(),
                quantization: q.into(),
                ..Default::default()
            }),
            file_size_bytes: size,
            ..Default::default()
        };
    let models = [
        entry(
            "qwen3-coder-30b",
            "Qwen3-Coder-30B-A3B-Q8_0.gguf",
            32 * GIB,
            "qwen3moe",
            "Q8_0",
            &["halo1", "halo2"],
        ),
        entry(
            "gpt-oss-20b",
            "gpt-oss-20b-mxfp4.gguf",
            12 * GIB,
            "gpt-oss",
            "MXFP4",
            &["halo1"],
        ),
        entry("missing", "nowhere.gguf", 0, "", "", &[]),
    ];
    check("models", &render_models(&models_json(&models)));
}

fn replica(index: u32, node: &str, state: Option<v1::InstanceState>, port: u32) -> v1::Replica {
    v1::Replica {
        index,
        node: node.into(),
        instance: state.map(|s| v1::Instance {
            state: s as i32,
            endpoint: format!("http://100.64.0.1:{port}"),
            restart_count: u32::from(s == v1::InstanceState::Loading),
            observed: (s == v1::InstanceState::Ready).then(|| v1::ObservedBuffers {
                model_bytes: Some(31 * GIB),
                kv_bytes: Some(1536 * MIB),
                compute_bytes: Some(300 * MIB),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn placement(
    name: &str,
    model: &str,
    ctx: u32,
    est: u64,
    replicas: Vec<v1::Replica>,
) -> v1::Placement {
    v1::Placement {
        name: name.into(),
        role: "speed".into(),
        model: model.into(),
        options: Some(v1::InstanceOptions {
            context_size: ctx,
            ..Default::default()
        }),
        estimate_bytes: est,
        replicas,
        ..Default::default()
    }
}

#[test]
fn status_table_matches_its_snapshot() {
    let p = [
        placement(
            "qwen3-coder-30b",
            "qwen3-coder-30b",
            16384,
            33 * GIB,
            vec![
                replica(0, "halo1", Some(v1::InstanceState::Ready), 8081),
                replica(1, "halo2", Some(v1::InstanceState::Loading), 8082),
            ],
        ),
        placement(
            "gpt-oss-20b",
            "gpt-oss-20b",
            32768,
            14 * GIB,
            vec![replica(0, "halo1", None, 0)],
        ),
        placement(
            "llama-8b",
            "llama-8b",
            8192,
            9 * GIB,
            vec![
                replica(0, "halo1", Some(v1::InstanceState::Unhealthy), 8083),
                {
                    let mut r = replica(1, "halo2", Some(v1::InstanceState::Ready), 8084);
                    if let Some(i) = &mut r.instance {
                        i.model_file_changed =
                            "the model file /srv/models/llama-8b.gguf was replaced since the \
                             instance started (another file: inode 12 → 13)"
                                .into();
                    }
                    r
                },
            ],
        ),
    ];
    check("status", &render_status(&status_json(&p)));
    check("status-empty", &render_status(&[]));
}

#[test]
fn endpoints_table_matches_its_snapshot() {
    let e = |mode: v1::EditorMode, port: u32, model: &str| v1::Endpoint {
        mode: mode as i32,
        base_url: format!("http://100.64.0.1:{port}"),
        model: model.into(),
        placement: model.into(),
        node: "halo1".into(),
        api_key: "3f9c…".into(),
    };
    let list = [
        e(v1::EditorMode::Code, 8081, "qwen3-coder-30b"),
        e(v1::EditorMode::Ask, 8083, "gpt-oss-20b"),
    ];
    check("endpoints", &render_endpoints(&endpoints_json(&list)));
    // As a read-only certificate sees them: no keys.
    let hidden: Vec<v1::Endpoint> = list
        .iter()
        .cloned()
        .map(|e| v1::Endpoint {
            api_key: String::new(),
            ..e
        })
        .collect();
    check(
        "endpoints-read-only",
        &render_endpoints(&endpoints_json(&hidden)),
    );
    // Two placements of one model, and an entry that serves no mode.
    let two = [
        e(v1::EditorMode::Code, 8081, "qwen3-coder-30b"),
        v1::Endpoint {
            placement: "qwen3-coder-30b-2".into(),
            ..e(v1::EditorMode::Code, 8082, "qwen3-coder-30b")
        },
        e(v1::EditorMode::Unspecified, 8084, "embed"),
    ];
    check(
        "endpoints-placements",
        &render_endpoints(&endpoints_json(&two)),
    );
    // With gateways on the nodes: one base URL, the mode as the model.
    let gateways = [
        ("halo1".to_owned(), "https://100.64.0.1:8443/v1".to_owned()),
        ("halo2".to_owned(), "https://100.64.0.2:8443/v1".to_owned()),
    ];
    check(
        "endpoints-gateway",
        &crate::cluster::render_gateway_endpoints(&gateways, &endpoints_json(&two)),
    );
}

#[test]
fn remote_plan_table_matches_its_snapshot() {
    let row = |ctx: u32, kv: u64, fits: bool| v1::PlanRow {
        node: "halo1".into(),
        context_size: ctx,
        weights_bytes: 158 * GIB,
        kv_bytes: kv,
        compute_bytes: 400 * MIB,
        output_bytes: MIB,
        total_bytes: 158 * GIB + kv + 401 * MIB,
        available_bytes: 116 * GIB,
        fits,
        reason: String::new(),
        formula_total_bytes: 158 * GIB + kv + 401 * MIB,
        engine_total_bytes: None,
        estimate_used: "formula".into(),
        estimate_notes: Vec::new(),
    };
    let mut checked = row(8192, 550 * MIB, false);
    checked.engine_total_bytes = Some(158 * GIB + 560 * MIB + 401 * MIB);
    checked.estimate_notes = vec![
        "formula confirmed by llama.cpp's projection on halo1: 158.8 GiB vs 158.8 GiB (-0.0 %)"
            .into(),
    ];
    let rows = [row(16384, 1100 * MIB, false), checked];
    check(
        "plan-remote",
        &render_plan("deepseek-v3.1-1bit", &plan_json(&rows)),
    );
}

#[test]
fn place_decisions_match_their_snapshots() {
    let fit = |node: &str, candidate: bool, fits: bool, used: u64, needed: u64, reason: &str| {
        v1::NodeFit {
            node: node.into(),
            candidate,
            fits,
            usable_bytes: if candidate { 120 * GIB } else { 0 },
            reserve_bytes: if candidate { 4 * GIB } else { 0 },
            used_bytes: used,
            free_bytes: if candidate { 116 * GIB - used } else { 0 },
            needed_bytes: needed,
            context_size: if candidate { 4096 } else { 0 },
            reason: reason.into(),
            ..Default::default()
        }
    };
    let refused = v1::PlaceResponse {
        accepted: false,
        fits: vec![
            fit(
                "halo2",
                true,
                false,
                0,
                164 * GIB,
                "needs 164 GiB > 116 GiB usable after reserve",
            ),
            fit(
                "halo1",
                false,
                false,
                0,
                0,
                "no `reasoning` role (has: speed)",
            ),
        ],
        explanation: vec!["refused: the model is larger than any node".into()],
        estimate: Some(v1::EstimateBreakdown {
            weights_bytes: 158 * GIB,
            kv_bytes: 146 * MIB,
            compute_bytes: 410 * MIB,
            output_bytes: MIB / 2,
            total_bytes: 159 * GIB,
            context_size: 4096,
            cache_type_k: "q8_0".into(),
            cache_type_v: "q8_0".into(),
        }),
        ..Default::default()
    };
    check(
        "place-refused",
        &render_decision("deepseek-v3.1-1bit", &decision_json(&refused)),
    );
    let accepted = v1::PlaceResponse {
        accepted: true,
        placement: Some(placement(
            "qwen3-coder-30b",
            "qwen3-coder-30b",
            16384,
            33 * GIB,
            vec![replica(0, "halo1", None, 0)],
        )),
        fits: vec![fit("halo1", true, true, 14 * GIB, 38 * GIB, "fits")],
        explanation: vec!["placed on halo1".into()],
        ..Default::default()
    };
    check(
        "place-accepted",
        &render_decision("qwen3-coder-30b", &decision_json(&accepted)),
    );
}

#[test]
fn keys_table_and_created_key_match_their_snapshots() {
    use crate::keys::{CreatedJson, keys_json, render_created, render_keys_at};
    // 2026-03-01 12:00 UTC.
    let t0 = 1_772_366_400_000;
    const DAY: u64 = 86_400_000;
    let key =
        |name: &str, modes: &[v1::EditorMode], models: &[&str], expires: Option<u64>| v1::UserKey {
            name: name.into(),
            sha256: String::new(),
            modes: modes.iter().map(|m| *m as i32).collect(),
            models: models.iter().map(|m| (*m).to_owned()).collect(),
            created_unix_ms: t0,
            expires_unix_ms: expires,
        };
    let keys = [
        key("alice", &[], &[], None),
        key(
            "laptop",
            &[v1::EditorMode::Ask, v1::EditorMode::Code],
            &[],
            Some(t0 + 90 * DAY),
        ),
        key("ci", &[], &["tiny"], Some(t0 + DAY)),
    ];
    check("keys", &render_keys_at(&keys_json(&keys), t0 + 2 * DAY));
    check("keys-empty", &render_keys_at(&[], t0));
    let created = CreatedJson {
        key: keys_json(&keys[1..2]).remove(0),
        secret: format!("halo-{}", "A".repeat(43)),
    };
    check("keys-created", &render_created(&created));
}

#[test]
fn completions_name_every_command() {
    use clap::CommandFactory;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut crate::cli::Cli::command(), "haloctl", &mut out);
        let s = String::from_utf8_lossy(&out);
        for cmd in [
            "nodes",
            "place",
            "unplace",
            "endpoints",
            "keys",
            "completions",
        ] {
            assert!(s.contains(cmd), "{shell:?} completions lack `{cmd}`");
        }
    }
}

fn bench_result(build: &str, at: u64, tg: f64) -> proto::domain::BenchResult {
    use proto::domain::{BenchPoint, BenchResult, BenchSetup, Spread};
    let point = |depth: u32, concurrency: u32, pp: f64, tg: f64, ttft: f64| BenchPoint {
        depth,
        concurrency,
        prompt_tokens: 512,
        gen_tokens: 128,
        runs: 3,
        pp: Spread {
            median: pp,
            min: pp * 0.97,
            max: pp * 1.02,
        },
        tg: Spread {
            median: tg,
            min: tg * 0.99,
            max: tg * 1.01,
        },
        ttft_ms: Spread {
            median: ttft,
            min: ttft * 0.9,
            max: ttft * 1.2,
        },
    };
    BenchResult {
        setup: BenchSetup {
            model: "qwen3-coder-30b".into(),
            model_id: "Qwen3-Coder-30B-A3B-Q8_0.gguf".into(),
            model_file_bytes: 32 * GIB,
            node: "halo1".into(),
            llama_build: build.into(),
            context_size: 65536,
            slots: 2,
            cache_type_k: "q8_0".into(),
            cache_type_v: "q8_0".into(),
            flash_attention: "on".into(),
            threads: 0,
            gateway: String::new(),
            replicas: 0,
        },
        placement: "qwen3-coder-30b".into(),
        at_unix_ms: at,
        points: vec![
            point(0, 1, 812.4, tg, 655.0),
            point(0, 2, 990.0, tg * 1.6, 1210.0),
            point(16384, 1, 402.7, tg * 0.6, 1290.0),
            point(16384, 2, 433.1, tg * 0.9, 2480.0),
        ],
    }
}

#[test]
fn bench_tables_match_their_snapshots() {
    use crate::bench::{BenchJson, render_history, render_results};
    let now = bench_result("version: 6500 (abc1234)", 1_780_000_000_000, 52.3);
    check("bench", &render_results(&[BenchJson::from(&now)]));
    let old = bench_result("version: 6400 (0ddba11)", 1_779_000_000_000, 48.9);
    check(
        "bench-history",
        &render_history(
            "qwen3-coder-30b",
            &[BenchJson::from(&old), BenchJson::from(&now)],
        ),
    );
    check("bench-history-empty", &render_history("tiny", &[]));

    // `haloctl models`: the result of the build that runs now, even when
    // an older build's is newer; and one only measured elsewhere.
    let mut entry = v1::CatalogEntry {
        name: "qwen3-coder-30b".into(),
        model_id: "Qwen3-Coder-30B-A3B-Q8_0.gguf".into(),
        default_context: 65536,
        min_context: 4096,
        nodes: vec!["halo1".into(), "halo2".into()],
        file_size_bytes: 32 * GIB,
        params: Some(v1::ModelParams {
            architecture: "qwen3moe".into(),
            quantization: "Q8_0".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    entry.modes = vec![v1::EditorMode::Code as i32];
    let mut models = crate::cluster::models_json(&[entry]);
    let mut newer_old_build = bench_result("version: 6400 (0ddba11)", 1_781_000_000_000, 1.0);
    newer_old_build.points.truncate(1);
    let mut on_halo2 = bench_result("version: 6500 (abc1234)", 1_778_000_000_000, 40.0);
    on_halo2.setup.node = "halo2".into();
    let placement = v1::Placement {
        name: "qwen3-coder-30b".into(),
        model: "qwen3-coder-30b".into(),
        model_id: "Qwen3-Coder-30B-A3B-Q8_0.gguf".into(),
        options: Some(v1::InstanceOptions {
            context_size: 65536,
            parallel: 2,
            cache_type_k: v1::CacheType::Q80 as i32,
            cache_type_v: v1::CacheType::Q80 as i32,
            flash_attention: Some(true),
            ..Default::default()
        }),
        replicas: vec![v1::Replica {
            node: "halo1".into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let node = v1::NodeView {
        node: Some(v1::NodeIdentity {
            name: "halo1".into(),
            llama_version: "version: 6500 (abc1234)".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    crate::cluster::attach_speed(
        &mut models,
        &[now, newer_old_build, on_halo2],
        &[placement],
        &[node],
    );
    assert!(
        models[0].speed[0].differs.is_empty(),
        "{:?}",
        models[0].speed
    );
    assert_eq!(models[0].speed[0].tg_tokens_per_second, 52.3);
    check("models-speed", &crate::cluster::render_models(&models));
}
