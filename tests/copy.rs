//! `haloctl models copy` between real agents over their mutual-TLS link: a
//! generated GGUF file of ~100 MiB of random data arrives byte for byte and
//! a second copy finds it identical; a copy whose receiver is SIGKILLed
//! midway (slowed by a rate cap) resumes from its partial file after a
//! restart, and one whose partial file was corrupted meanwhile fails on the
//! hash and deletes it; a node whose model directory is a 50 MiB tmpfs
//! refuses before anything is sent, with the numbers. `haloctl models`
//! shows a copy in flight, and a copy goes on when haloctl is left with
//! Ctrl-C.

use agent::gguf::GgmlType;
use agent::gguf::fixtures::tiny_llama;
use agent::gguf::write::TensorData;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tests::cluster::{AgentNode, ControllerProc, write_catalog};
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
    let catalog = dir.join("catalog.toml");
    write_catalog(&catalog, CATALOG);
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
