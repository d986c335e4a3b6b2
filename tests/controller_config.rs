//! `halo-controller`'s command line: a bad config is one line on stderr and
//! exit 64, before anything is bound; `--help` documents every key.

use std::net::TcpListener;
use std::process::Command;
use tests::cluster::CONTROLLER;

/// Runs the controller in plaintext on loopback (these tests are about
/// its other keys) unless `args` choose TLS or `--secure` is asked.
fn run(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(&*CONTROLLER);
    if !args
        .iter()
        .any(|a| a.starts_with("--tls") || *a == "--secure")
    {
        cmd.arg("--insecure-loopback-only");
    }
    let out = cmd
        .args(args.iter().filter(|a| **a != "--secure"))
        .env_remove("HALO_CONTROLLER_CONFIG")
        .output()
        .expect("run halo-controller");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_config_exits_64_with_one_line_before_binding() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = tests::free_port();
    let listen = format!("127.0.0.1:{port}");
    let store = dir.path().join("state.json").display().to_string();
    let bad_catalog = dir.path().join("catalog.toml");
    std::fs::write(
        &bad_catalog,
        "[[models]]\nname = \"Bad Name\"\nmodel_id = \"x.gguf\"\n",
    )
    .expect("write");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--node".into(), "halo1".into()], "NAME=HOST:PORT"),
        (vec!["--grace-ms".into(), "5".into()], "grace_ms"),
        (
            vec!["--move-after-secs".into(), "1".into()],
            "move_after_secs",
        ),
        (vec!["--etcd".into(), "127.0.0.1:2379".into()], "etcd"),
        (
            vec![
                "--catalog".into(),
                dir.path().join("missing.toml").display().to_string(),
            ],
            "missing.toml",
        ),
        (
            vec!["--catalog".into(), bad_catalog.display().to_string()],
            "Bad Name",
        ),
        (vec!["--no-such-flag".into()], "no-such-flag"),
        (
            vec!["--metrics-listen".into(), "0.0.0.0:9300".into()],
            "metrics_listen",
        ),
        (
            vec!["--metrics-listen".into(), "nowhere".into()],
            "is not an address",
        ),
        (
            vec!["--node".into(), "halo1=100.64.0.1:7301".into()],
            "--insecure-loopback-only refuses halo1 at 100.64.0.1:7301",
        ),
        (
            vec!["--secure".into()],
            "no TLS configured: set tls_cert, tls_key and tls_ca",
        ),
        (
            vec![
                "--tls-cert".into(),
                "/nonexistent/c.pem".into(),
                "--tls-key".into(),
                "/nonexistent/c.key".into(),
                "--tls-ca".into(),
                "/nonexistent/ca.pem".into(),
            ],
            "/nonexistent/c.pem",
        ),
    ];
    for (extra, needle) in cases {
        let mut args = vec![
            "--listen".to_owned(),
            listen.clone(),
            "--store-path".into(),
            store.clone(),
        ];
        args.extend(extra.iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, err) = run(&refs);
        assert_eq!(code, Some(64), "{extra:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{extra:?}: one line, got {err}"
        );
        assert!(err.contains(needle), "{extra:?}: {err}");
        assert!(
            !dir.path().join("state.json").exists(),
            "nothing opened for {extra:?}"
        );
    }
    // The port was never bound.
    assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
}

#[test]
fn help_names_every_key_with_its_default_and_env_var() {
    let (code, out, _) = run(&["--help"]);
    assert_eq!(code, Some(0));
    for key in [
        "--config",
        "--listen",
        "--etcd",
        "--store-path",
        "--node",
        "--catalog",
        "--grace-ms",
        "--move-after-secs",
        "--heartbeat-ms",
        "--requeue-ms",
        "--lease-secs",
        "--metrics-listen",
        "HALO_CONTROLLER_METRICS_LISTEN",
        "HALO_CONTROLLER_MOVE_AFTER_SECS",
        "[default: 30]",
    ] {
        assert!(out.contains(key), "--help lacks {key}:\n{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_controller_never_dials_a_registered_mesh_node() {
    use tests::cluster::{ControllerProc, connect, eventually};
    let dir = tempfile::tempdir().expect("tempdir");
    let store = dir.path().join("state.json").display().to_string();
    // A TLS controller registers a node on a mesh address in the store.
    let mut tls = ControllerProc::new(
        dir.path(),
        "controller-tls",
        &[
            "--store-path".into(),
            store.clone(),
            "--node".into(),
            "halo9=100.64.0.9:7301".into(),
        ],
    );
    tls.start();
    let mut c = connect(&tls.url()).await;
    let listed = eventually(std::time::Duration::from_secs(10), || {
        let mut c = c.clone();
        async move {
            let n = c
                .list_nodes(proto::v1::ListNodesRequest {})
                .await
                .ok()?
                .into_inner()
                .nodes;
            (!n.is_empty()).then_some(())
        }
    })
    .await;
    assert!(listed.is_some(), "{}", tls.logs());
    // Registration is written once the leader syncs; give it a moment.
    let registered = eventually(std::time::Duration::from_secs(10), || async {
        std::fs::read_to_string(&store)
            .ok()
            .filter(|s| s.contains("100.64.0.9"))
    })
    .await;
    assert!(
        registered.is_some(),
        "halo9 never registered:\n{}",
        tls.logs()
    );
    tls.kill9();
    drop(c);
    // The same store under a plaintext controller: halo9 is not dialed.
    let mut plain = ControllerProc::new(
        dir.path(),
        "controller-plain",
        &[
            "--store-path".into(),
            store,
            "--insecure-loopback-only".into(),
        ],
    );
    plain.start();
    c = connect(&plain.url()).await;
    let nodes = c
        .list_nodes(proto::v1::ListNodesRequest {})
        .await
        .expect("list nodes")
        .into_inner()
        .nodes;
    assert!(nodes.is_empty(), "{nodes:?}");
    let warned = eventually(std::time::Duration::from_secs(5), || async {
        plain
            .logs()
            .contains("registered node not dialed")
            .then_some(())
    })
    .await;
    assert!(warned.is_some(), "{}", plain.logs());
}
