//! `haloctl models copy` between real agents over their mutual-TLS link: a
//! generated GGUF file of ~100 MiB of random data arrives byte for byte and
//! a second copy finds it identical; a copy whose receiver is SIGKILLed
//! midway (slowed by a rate cap) resumes from its partial file after a
//! restart, and one whose partial file was corrupted meanwhile fails on the
//! hash and deletes it; a node whose model directory is a 50 MiB tmpfs
//! refuses before anything is sent, with the numbers. `haloctl models`
//! shows a copy in flight, and a copy goes on when haloctl is left with
//! Ctrl-C; a copy whose receiver restarts is resumed by the controller
//! without being asked again; a split set arrives part by part.
//!
//! Placement copies: a catalog model with `copy_if_missing` whose file only
//! a node of another role holds is copied to a node of its role, served
//! there, and after that node's loss copied to the next one and served
//! again (the time from loss to answer is printed); `place --copy` moves a
//! replica whose copy failed to another node; `models copy --all-roles`
//! copies each model to the live nodes of its role and sums up.

use agent::gguf::GgmlType;
use agent::gguf::fixtures::tiny_llama;
use agent::gguf::write::TensorData;
use proto::v1;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tests::cluster::{
    AgentNode, Client, ControllerProc, catalog_controller, chat, eventually, write_catalog,
};
use tests::{text, wait_for};

const HALOCTL: &str = env!("CARGO_BIN_EXE_haloctl-shim");

/// Floats of random data in the filler tensor: 100 MiB.
const FILLER_FLOATS: u64 = 25 << 20;

const CATALOG: &str = r#"
[[models]]
name = "big"
model_id = "big.gguf"
default_context = 256
min_context = 256
modes = ["ask"]
"#;

/// The tiny real model plus a filler tensor of random bytes (xorshift, no
/// file holes): a real GGUF file the agents list, about 100 MiB.
fn write_big(path: &Path, seed: u64) {
    let mut x = seed | 1;
    let mut data = Vec::with_capacity((FILLER_FLOATS * 4) as usize);
    for _ in 0..FILLER_FLOATS / 2 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        data.extend_from_slice(&x.to_le_bytes());
    }
    let mut w = tiny_llama(seed);
    w.tensor(
        "halo.filler",
        GgmlType::F32,
        &[FILLER_FLOATS],
        TensorData::Bytes(data),
    );
    w.write_to(path).expect("write the model");
}

fn haloctl(c: &ControllerProc, home: &Path, args: &[&str]) -> Output {
    haloctl_cmd(c, home, args).output().expect("run haloctl")
}

fn haloctl_cmd(c: &ControllerProc, home: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(HALOCTL);
    cmd.args(args)
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .envs(c.haloctl_env());
    cmd
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// A controller knowing `nodes` and the `big` catalog model, started, and
/// waited for until the catalog lists `big` on `holder`.
fn controller(dir: &Path, nodes: &[&AgentNode], holder: &str) -> ControllerProc {
    controller_with(dir, nodes, holder, CATALOG)
}

/// [`controller`] with the catalog `toml` (its first model is waited for).
fn controller_with(dir: &Path, nodes: &[&AgentNode], holder: &str, toml: &str) -> ControllerProc {
    let catalog = dir.join("catalog.toml");
    write_catalog(&catalog, toml);
    let list: Vec<String> = nodes
        .iter()
        .map(|n| format!("{}={}", n.name, n.address()))
        .collect();
    let args = vec![
        "--store-path".to_owned(),
        dir.join("state.json").display().to_string(),
        "--node".to_owned(),
        list.join(","),
        "--catalog".to_owned(),
        catalog.display().to_string(),
    ];
    let mut c = ControllerProc::new(dir, "controller", &args);
    c.start();
    wait_until_listed(&c, dir, holder);
    c
}

/// Waits until `haloctl models -o json` says `node` holds `big`.
fn wait_until_listed(c: &ControllerProc, home: &Path, node: &str) {
    let seen = wait_for(Duration::from_secs(30), || {
        let o = haloctl(c, home, &["models", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let nodes = v.as_array()?.first()?.get("nodes")?.as_array()?.clone();
        nodes.iter().any(|n| n == node).then_some(())
    });
    assert!(seen.is_some(), "`big` never listed on {node}");
}

fn same_bytes(a: &Path, b: &Path) -> bool {
    let (a, b) = (
        std::fs::read(a).expect("read a"),
        std::fs::read(b).expect("read b"),
    );
    a.len() == b.len() && a == b
}

/// Unmounts a tmpfs when the test ends, however it ends.
struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_model_file_is_copied_identical_once_and_refused_without_room() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut halo1 = AgentNode::new(dir.path(), "halo1", &["speed"], 2);
    let mut halo2 = AgentNode::new(dir.path(), "halo2", &["speed"], 2);
    let mut halo3 = AgentNode::new(dir.path(), "halo3", &["speed"], 2);
    write_big(&halo1.models.join("big.gguf"), 11);
    // halo3's model directory: a 50 MiB file system for a 100 MiB model.
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=50m", "tmpfs"])
        .arg(&halo3.models)
        .status()
        .expect("mount");
    assert!(mount.success(), "mounting a tmpfs needs root");
    let _mounted = Mounted(halo3.models.clone());
    for n in [&mut halo1, &mut halo2, &mut halo3] {
        n.start();
    }
    let c = controller(dir.path(), &[&halo1, &halo2, &halo3], "halo1");
    let home = dir.path();

    let o = haloctl(&c, home, &["models", "copy", "big", "--to", "halo2"]);
    assert!(o.status.success(), "{}", show(&o));
    let out = text(&o.stdout);
    // The result line (rate included) in the test's output, and README.md
    // shows it: it must be what haloctl prints.
    println!("{out}");
    let cmd = "haloctl models copy big --to halo2";
    let checked = tests::readme::check_or_update(
        &format!("$ {cmd}"),
        &[(cmd.to_owned(), out.trim_end().to_owned())],
    );
    assert_eq!(checked, [cmd]);
    assert!(
        out.contains("big.gguf: copied 100.") && out.contains("from halo1 to halo2"),
        "{}",
        show(&o)
    );
    assert!(out.contains("sha256 "), "{}", show(&o));
    assert!(
        same_bytes(
            &halo1.models.join("big.gguf"),
            &halo2.models.join("big.gguf")
        ),
        "the copy differs from the original"
    );
    assert!(!halo2.models.join(".big.gguf.partial").exists());
    // The receiver lists it now.
    wait_until_listed(&c, home, "halo2");

    // Again: the identical file is found, nothing is sent.
    let o = haloctl(
        &c,
        home,
        &["models", "copy", "big", "--to", "halo2", "--from", "halo1"],
    );
    assert!(o.status.success(), "{}", show(&o));
    assert!(
        text(&o.stdout).contains("an identical file is already on halo2"),
        "{}",
        show(&o)
    );

    // No room: refused before a byte is written, with the numbers.
    let o = haloctl(&c, home, &["models", "copy", "big", "--to", "halo3"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let err = text(&o.stderr);
    assert!(
        err.contains("not enough room in")
            && err.contains("needs 100.")
            && err.contains("plus a margin of 1.0 GiB")
            && err.contains("50.0 MiB is free"),
        "{}",
        show(&o)
    );
    let left: Vec<_> = std::fs::read_dir(&halo3.models)
        .expect("read halo3's models")
        .collect();
    assert!(left.is_empty(), "halo3 got files: {left:?}");
    // The controller's events record each copy's start and end, and the
    // refusal with its reason.
    let o = haloctl(&c, home, &["events"]);
    let events = text(&o.stdout);
    for want in [
        "big.gguf from halo1 to halo2: started",
        "done: 100.5 MiB in",
        "an identical file is already there",
        "failed: not enough room in",
    ] {
        assert!(events.contains(want), "no `{want}` in:\n{}", show(&o));
    }
    // Unknown names are refused by the controller.
    let o = haloctl(&c, home, &["models", "copy", "nope", "--to", "halo2"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("`nope` is not in the catalog"),
        "{}",
        show(&o)
    );
}

/// Starts a copy of `big` to `node`; once its partial file holds 20 MiB,
/// leaves haloctl with Ctrl-C (SIGINT) and sees the copy go on, then
/// SIGKILLs the node's agent; returns the partial file's length.
fn interrupt(c: &ControllerProc, home: &Path, node: &mut AgentNode) -> u64 {
    let partial = node.models.join(".big.gguf.partial");
    let copy = haloctl_cmd(c, home, &["models", "copy", "big", "--to", &node.name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn haloctl");
    let at = wait_for(Duration::from_secs(60), || {
        std::fs::metadata(&partial)
            .ok()
            .map(|m| m.len())
            .filter(|l| *l >= 20 << 20)
    })
    .expect("the partial file never grew to 20 MiB");
    // `haloctl models` shows the copy in flight.
    let o = haloctl(c, home, &["models"]);
    let want = format!("copying big.gguf halo1 -> {}: ", node.name);
    assert!(text(&o.stdout).contains(&want), "{}", show(&o));
    let o = haloctl(c, home, &["models", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let shown = &v[0]["copies"][0];
    assert_eq!(shown["to_node"], node.name.as_str(), "{}", show(&o));
    assert!(shown["bytes_done"].as_u64() > Some(0), "{}", show(&o));
    // Ctrl-C: haloctl goes, the copy does not.
    let pid =
        rustix::process::Pid::from_raw(i32::try_from(copy.id()).expect("pid")).expect("a pid");
    rustix::process::kill_process(pid, rustix::process::Signal::INT).expect("SIGINT");
    let o = copy.wait_with_output().expect("haloctl");
    assert!(!o.status.success(), "{}", show(&o));
    let left_at = std::fs::metadata(&partial).expect("partial").len();
    let grew = wait_for(Duration::from_secs(30), || {
        std::fs::metadata(&partial)
            .ok()
            .filter(|m| m.len() >= left_at + (5 << 20))
    });
    assert!(grew.is_some(), "the copy stopped when haloctl was left");
    node.kill9();
    let kept = std::fs::metadata(&partial).expect("partial kept").len();
    assert!(kept >= at && kept < 100 << 20, "partial {kept} bytes");
    kept
}

/// `haloctl models copy big --to NODE -o json` once the controller's link
/// to the (restarted) agent is back.
fn copy_when_connected(c: &ControllerProc, home: &Path, node: &str) -> Output {
    wait_for(Duration::from_secs(30), || {
        let o = haloctl(
            c,
            home,
            &["models", "copy", "big", "--to", node, "-o", "json"],
        );
        (!text(&o.stderr).contains("is not connected")).then_some(o)
    })
    .unwrap_or_else(|| panic!("{node} never connected again"))
}

#[test]
fn a_copy_interrupted_by_a_receiver_crash_resumes_and_a_corrupt_partial_file_is_deleted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut halo1 = AgentNode::new(dir.path(), "halo1", &["speed"], 2);
    let mut halo2 = AgentNode::new(dir.path(), "halo2", &["speed"], 2);
    write_big(&halo1.models.join("big.gguf"), 23);
    // Slow enough to be caught midway: 100 MiB at 10 MiB/s.
    halo2.extra_args = vec!["--copy-rate-limit".into(), "10MiB".into()];
    halo1.start();
    halo2.start();
    let c = controller(dir.path(), &[&halo1, &halo2], "halo1");
    let home = dir.path();
    let partial = halo2.models.join(".big.gguf.partial");
    let (original, copied) = (halo1.models.join("big.gguf"), halo2.models.join("big.gguf"));

    let kept = interrupt(&c, home, &mut halo2);
    halo2.start();
    let o = copy_when_connected(&c, home, "halo2");
    assert!(o.status.success(), "{}", show(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["state"], "done", "{}", show(&o));
    let resumed = v["resumed_from_bytes"]
        .as_u64()
        .expect("resumed_from_bytes");
    assert!(
        resumed >= kept,
        "resumed at {resumed}, {kept} were there; {}",
        show(&o)
    );
    assert!(
        same_bytes(&original, &copied),
        "the resumed copy differs from the original"
    );
    assert!(!partial.exists());

    // Once more, and a byte of the partial file goes bad while the agent
    // is down: the resumed copy's hash cannot match; it fails saying so,
    // the partial file is deleted and nothing takes the final name.
    std::fs::remove_file(&copied).expect("remove the copy");
    interrupt(&c, home, &mut halo2);
    let mut bytes = std::fs::read(&partial).expect("read partial");
    bytes[4 << 20] ^= 0x55;
    std::fs::write(&partial, &bytes).expect("corrupt partial");
    halo2.start();
    let o = copy_when_connected(&c, home, "halo2");
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["state"], "failed", "{}", show(&o));
    let why = v["message"].as_str().unwrap_or_default();
    assert!(
        why.contains("SHA-256") && why.contains("the partial file was deleted"),
        "{}",
        show(&o)
    );
    assert!(!partial.exists(), "the corrupt partial file is still there");
    assert!(!copied.exists(), "a corrupt copy took the final name");
}

/// The tiny model, placed by copy where it is missing (catalog
/// `copy_if_missing`), on the nodes of role `speed`.
const COPY_CATALOG: &str = r#"
[[models]]
name = "tiny"
model_id = "tiny.gguf"
default_context = 256
min_context = 256
modes = ["code", "ask"]
role = "speed"
copy_if_missing = true
"#;

/// Controller flags for node loss within seconds.
const FAST_LOSS: [&str; 8] = [
    "--grace-ms",
    "1000",
    "--heartbeat-ms",
    "250",
    "--move-after-secs",
    "3",
    "--requeue-ms",
    "300",
];

/// halo1 (`reasoning`) holds the tiny model; halo2 and halo3 (`speed`)
/// hold nothing. Not started.
fn holder_and_two_empty(dir: &Path) -> [AgentNode; 3] {
    let halo1 = AgentNode::new(dir, "halo1", &["reasoning"], 2);
    agent::gguf::fixtures::write_tiny_llama(&halo1.models.join("tiny.gguf"), 7)
        .expect("tiny model");
    [
        halo1,
        AgentNode::new(dir, "halo2", &["speed"], 2),
        AgentNode::new(dir, "halo3", &["speed"], 2),
    ]
}

/// The code-mode endpoint of placement `tiny` once ready on `node`.
async fn endpoint_on(c: &Client, node: &str, timeout: Duration) -> Option<v1::Endpoint> {
    eventually(timeout, || {
        let mut c = c.clone();
        let node = node.to_owned();
        async move {
            c.endpoints(v1::EndpointsRequest {})
                .await
                .ok()?
                .into_inner()
                .endpoints
                .into_iter()
                .find(|e| {
                    e.placement == "tiny" && e.node == node && e.mode == v1::EditorMode::Code as i32
                })
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_missing_on_its_role_is_copied_then_served_and_copied_again_after_node_loss() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path();
    let mut nodes = holder_and_two_empty(home);
    // halo2 receives slowly (64 KiB/s, some seconds for the tiny model):
    // the copy is seen in flight.
    nodes[1].extra_args = vec!["--copy-rate-limit".into(), "64KiB".into()];
    for n in &mut nodes {
        n.start();
    }
    let mut ctl = catalog_controller(home, &nodes, COPY_CATALOG, &FAST_LOSS);
    let [halo1, mut halo2, halo3] = nodes;
    let mut c = ctl.start_and_wait(&["halo1", "halo2", "halo3"]).await;

    // The decision: halo1 holds the file but has another role; halo2 has
    // the room, and the file is copied there first.
    let r = c
        .place(v1::PlaceRequest {
            role: "speed".into(),
            model: "tiny".into(),
            ..v1::PlaceRequest::default()
        })
        .await
        .expect("place")
        .into_inner();
    assert!(r.accepted, "{:?}", r.explanation);
    let decision = r.explanation.join("\n");
    eprintln!("{decision}");
    assert!(
        decision.contains("halo2 lacks `tiny.gguf`: copy ")
            && decision.contains(" from halo1 first (about 1 s at an assumed 100.0 MiB/s)"),
        "{decision}"
    );
    let fits = r
        .fits
        .iter()
        .find(|f| f.node == "halo1")
        .expect("halo1's row");
    assert!(fits.reason.contains("no `speed` role"), "{}", fits.reason);

    // While it copies, haloctl status says so, with the sender.
    let copying = wait_for(Duration::from_secs(30), || {
        let o = haloctl(&ctl, home, &["status"]);
        let t = text(&o.stdout);
        (t.contains("copying ") && t.contains("% from halo1")).then_some(t)
    });
    assert!(copying.is_some(), "no copy seen in haloctl status");
    eprintln!("{}", copying.unwrap_or_default());

    // Then the replica starts there and answers.
    let first = endpoint_on(&c, "halo2", Duration::from_secs(90))
        .await
        .unwrap_or_else(|| panic!("not served on halo2:\n{}", ctl.logs()));
    chat(&first.base_url, &first.api_key, "tiny").expect("chat on halo2");
    assert!(same_bytes(
        &halo1.models.join("tiny.gguf"),
        &halo2.models.join("tiny.gguf")
    ));

    // Node loss: halo2's agent is killed. The controller copies the file
    // to halo3 from halo1 (halo2 is gone) and the replica answers there.
    let killed_at = std::time::Instant::now();
    halo2.kill9();
    let moved = endpoint_on(&c, "halo3", Duration::from_secs(120))
        .await
        .unwrap_or_else(|| panic!("not served on halo3:\n{}", ctl.logs()));
    let reply = chat(&moved.base_url, &moved.api_key, "tiny").expect("chat on halo3");
    eprintln!(
        "node loss to an answer on halo3 (detection, move period 3 s, copy, load): {:?}; \
         answered {reply:?}",
        killed_at.elapsed()
    );
    assert!(same_bytes(
        &halo1.models.join("tiny.gguf"),
        &halo3.models.join("tiny.gguf")
    ));
    let o = haloctl(&ctl, home, &["events"]);
    let events = text(&o.stdout);
    for want in [
        "tiny.gguf from halo1 to halo2: started",
        "tiny.gguf from halo1 to halo3: started",
        "replica 0 halo2 -> halo3",
    ] {
        assert!(events.contains(want), "no `{want}` in:\n{}", show(&o));
    }
    ctl.kill9();
}

#[test]
fn place_copy_after_a_failed_copy_moves_the_replica_to_another_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path();
    let mut nodes = holder_and_two_empty(home);
    // halo2's model directory: 50 MiB, below the agents' 1 GiB disk margin:
    // every copy there is refused.
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=50m", "tmpfs"])
        .arg(&nodes[1].models)
        .status()
        .expect("mount");
    assert!(mount.success(), "mounting a tmpfs needs root");
    let _mounted = Mounted(nodes[1].models.clone());
    for n in &mut nodes {
        n.start();
    }
    let mut ctl = catalog_controller(home, &nodes, tests::cluster::TINY_CATALOG, &FAST_LOSS);
    ctl.start();
    let listed = wait_for(Duration::from_secs(30), || {
        let o = haloctl(&ctl, home, &["models", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        (v[0]["nodes"][0] == "halo1").then_some(())
    });
    assert!(listed.is_some(), "tiny never listed on halo1");

    // Without --copy no node of the role holds it.
    let o = haloctl(&ctl, home, &["place", "speed", "tiny", "--no-wait"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        text(&o.stdout).contains("no live node with role `speed` holds `tiny.gguf`"),
        "{}",
        show(&o)
    );

    // With it: halo2 first; its copy is refused, the replica moves to
    // halo3, is copied there and becomes ready (haloctl waits for that).
    let o = haloctl(
        &ctl,
        home,
        &["place", "speed", "tiny", "--copy", "--timeout", "120"],
    );
    assert!(o.status.success(), "{}\n{}", show(&o), ctl.logs());
    let out = text(&o.stdout);
    assert!(
        out.contains("halo2 lacks `tiny.gguf`: copy") && out.contains("ready: tiny"),
        "{}",
        show(&o)
    );
    let o = haloctl(&ctl, home, &["status", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v[0]["replicas"][0]["node"], "halo3", "{}", show(&o));
    assert_eq!(v[0]["replicas"][0]["state"], "ready", "{}", show(&o));
    let o = haloctl(&ctl, home, &["events"]);
    let events = text(&o.stdout);
    for want in [
        "tiny.gguf from halo1 to halo2: started",
        "failed: not enough room in",
        "replica 0 halo2 -> halo3: the copy of `tiny.gguf` to halo2 failed (not enough room",
        "tiny.gguf from halo1 to halo3: started",
    ] {
        assert!(events.contains(want), "no `{want}` in:\n{}", show(&o));
    }
    assert!(same_bytes(
        &nodes[0].models.join("tiny.gguf"),
        &nodes[2].models.join("tiny.gguf")
    ));
}

#[test]
fn models_copy_all_roles_copies_each_model_to_the_live_nodes_of_its_role() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path();
    let mut halo1 = AgentNode::new(home, "halo1", &["speed"], 2);
    let mut halo2 = AgentNode::new(home, "halo2", &["speed"], 2);
    let mut halo3 = AgentNode::new(home, "halo3", &["reasoning"], 2);
    agent::gguf::fixtures::write_tiny_llama(&halo1.models.join("tiny.gguf"), 7)
        .expect("tiny model");
    agent::gguf::fixtures::write_tiny_llama(&halo1.models.join("any.gguf"), 9)
        .expect("second model");
    // halo3 refuses every copy (50 MiB below the 1 GiB disk margin).
    let mount = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=50m", "tmpfs"])
        .arg(&halo3.models)
        .status()
        .expect("mount");
    assert!(mount.success(), "mounting a tmpfs needs root");
    let _mounted = Mounted(halo3.models.clone());
    for n in [&mut halo1, &mut halo2, &mut halo3] {
        n.start();
    }
    // `tiny` belongs on speed nodes; `any` (no role) on every node.
    let catalog = r#"
[[models]]
name = "tiny"
model_id = "tiny.gguf"
role = "speed"

[[models]]
name = "any"
model_id = "any.gguf"
"#;
    let list = format!(
        "halo1={},halo2={},halo3={}",
        halo1.address(),
        halo2.address(),
        halo3.address()
    );
    write_catalog(&home.join("catalog.toml"), catalog);
    let mut ctl = ControllerProc::new(
        home,
        "controller",
        &[
            "--store-path".to_owned(),
            home.join("state.json").display().to_string(),
            "--node".to_owned(),
            list,
            "--catalog".to_owned(),
            home.join("catalog.toml").display().to_string(),
        ],
    );
    ctl.start();
    let ready = wait_for(Duration::from_secs(30), || {
        let o = haloctl(&ctl, home, &["nodes", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let ready = v
            .as_array()?
            .iter()
            .filter(|n| n["status"] == "ready")
            .count();
        let o = haloctl(&ctl, home, &["models", "-o", "json"]);
        let m: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        let listed = m
            .as_array()?
            .iter()
            .all(|e| e["nodes"].as_array().is_some_and(|n| !n.is_empty()));
        (ready == 3 && listed).then_some(())
    });
    assert!(
        ready.is_some(),
        "the cluster never came up:\n{}",
        ctl.logs()
    );

    let o = haloctl(&ctl, home, &["models", "copy", "--all-roles"]);
    println!("{}", show(&o));
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let out = text(&o.stdout);
    assert!(
        out.contains("copied 2, already present 2, failed 1"),
        "{}",
        show(&o)
    );
    assert!(text(&o.stderr).contains("1 copy failed"), "{}", show(&o));
    let o = haloctl(&ctl, home, &["models", "copy", "--all-roles", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let rows: Vec<(String, String, String)> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|r| {
            (
                r["model"].as_str().unwrap_or_default().to_owned(),
                r["node"].as_str().unwrap_or_default().to_owned(),
                r["result"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let row = |m: &str, n: &str| {
        rows.iter()
            .find(|(rm, rn, _)| rm == m && rn == n)
            .map(|(_, _, r)| r.as_str())
    };
    // The second run: what the first copied is there now; halo3 still
    // refuses, with the reason; `tiny` is never sent to the reasoning node.
    assert_eq!(row("tiny", "halo1"), Some("already present"), "{rows:?}");
    assert_eq!(row("tiny", "halo2"), Some("already present"), "{rows:?}");
    assert_eq!(row("tiny", "halo3"), None, "{rows:?}");
    assert_eq!(row("any", "halo2"), Some("already present"), "{rows:?}");
    assert_eq!(row("any", "halo3"), Some("failed"), "{rows:?}");
    let why = v
        .as_array()
        .and_then(|a| a.iter().find(|r| r["node"] == "halo3"))
        .and_then(|r| r["message"].as_str())
        .unwrap_or_default();
    assert!(why.contains("not enough room in"), "{why}");
    assert!(same_bytes(
        &halo1.models.join("any.gguf"),
        &halo2.models.join("any.gguf")
    ));
    assert!(same_bytes(
        &halo1.models.join("tiny.gguf"),
        &halo2.models.join("tiny.gguf")
    ));
}

#[test]
fn a_copy_whose_receiver_restarts_resumes_without_being_asked_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut halo1 = AgentNode::new(dir.path(), "halo1", &["speed"], 2);
    let mut halo2 = AgentNode::new(dir.path(), "halo2", &["speed"], 2);
    write_big(&halo1.models.join("big.gguf"), 31);
    // 100 MiB at 10 MiB/s: caught midway.
    halo2.extra_args = vec!["--copy-rate-limit".into(), "10MiB".into()];
    halo1.start();
    halo2.start();
    let c = controller(dir.path(), &[&halo1, &halo2], "halo1");
    let home = dir.path();
    let partial = halo2.models.join(".big.gguf.partial");
    let copy = haloctl_cmd(&c, home, &["models", "copy", "big", "--to", "halo2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn haloctl");
    let at = wait_for(Duration::from_secs(60), || {
        std::fs::metadata(&partial)
            .ok()
            .map(|m| m.len())
            .filter(|l| *l >= 20 << 20)
    })
    .expect("the partial file never grew to 20 MiB");
    // The receiving agent dies midway and comes back; nobody asks again.
    halo2.kill9();
    std::thread::sleep(Duration::from_secs(2));
    halo2.start();
    // The haloctl that asked sees the copy through to its end.
    let o = copy.wait_with_output().expect("haloctl");
    assert!(o.status.success(), "{}\n{}", show(&o), c.logs());
    let out = text(&o.stdout);
    assert!(out.contains("big.gguf: copied 100."), "{}", show(&o));
    assert!(out.contains("resumed at"), "{}", show(&o));
    assert!(
        same_bytes(
            &halo1.models.join("big.gguf"),
            &halo2.models.join("big.gguf")
        ),
        "the resumed copy differs from the original"
    );
    assert!(!partial.exists());
    let o = haloctl(&c, home, &["events"]);
    let events = text(&o.stdout);
    for want in [
        "interrupted (",
        "resumed when halo2 is back",
        "big.gguf from halo1 to halo2: resumed",
    ] {
        assert!(events.contains(want), "no `{want}` in:\n{}", show(&o));
    }
    eprintln!("receiver killed after {at} bytes; resumed and finished");
}

#[test]
fn a_split_set_is_copied_part_by_part_each_verified() {
    use agent::gguf::Value;
    use agent::gguf::read::{KEY_SPLIT_COUNT, KEY_SPLIT_NO, KEY_SPLIT_TENSORS_COUNT};
    use agent::gguf::write::GgufWriter;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut halo1 = AgentNode::new(dir.path(), "halo1", &["speed"], 2);
    let mut halo2 = AgentNode::new(dir.path(), "halo2", &["speed"], 2);
    // Three parts of 8 MiB of random data each, as llama.cpp's gguf-split
    // names and marks them.
    let names: Vec<String> = (1..=3)
        .map(|no| agent::gguf::read::split_part_name("big", no, 3))
        .collect();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (i, name) in names.iter().enumerate() {
        let mut data = Vec::with_capacity(8 << 20);
        for _ in 0..(1 << 20) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        let mut w = GgufWriter::new();
        if i == 0 {
            w.meta("general.architecture", Value::String("llama".into()));
        }
        w.meta(KEY_SPLIT_NO, Value::U16(u16::try_from(i).expect("part")))
            .meta(KEY_SPLIT_COUNT, Value::U16(3))
            .meta(KEY_SPLIT_TENSORS_COUNT, Value::I32(3));
        w.tensor(
            &format!("halo.part{i}"),
            GgmlType::F32,
            &[2 << 20],
            TensorData::Bytes(data),
        );
        w.write_to(&halo1.models.join(name)).expect("write a part");
    }
    halo1.start();
    halo2.start();
    let catalog = format!(
        "[[models]]\nname = \"big\"\nmodel_id = \"{}\"\ndefault_context = 256\nmin_context = 256\n",
        names[0]
    );
    let c = controller_with(dir.path(), &[&halo1, &halo2], "halo1", &catalog);
    let home = dir.path();
    let o = haloctl(
        &c,
        home,
        &["models", "copy", "big", "--to", "halo2", "-o", "json"],
    );
    assert!(o.status.success(), "{}", show(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(v["state"], "done", "{}", show(&o));
    // One verified SHA-256 per part.
    let sums = v["sha256"].as_array().expect("sha256");
    assert_eq!(sums.len(), 3, "{}", show(&o));
    for name in &names {
        assert!(
            same_bytes(&halo1.models.join(name), &halo2.models.join(name)),
            "{name} differs"
        );
        assert!(!halo2.models.join(format!(".{name}.partial")).exists());
    }
    let total: u64 = names
        .iter()
        .map(|n| std::fs::metadata(halo1.models.join(n)).expect("part").len())
        .sum();
    assert_eq!(v["bytes_total"].as_u64(), Some(total), "{}", show(&o));
    // The receiver lists the set as one model.
    wait_until_listed(&c, home, "halo2");
}
