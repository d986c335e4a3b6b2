//! `haloctl` against a real local cluster, driven only as a process (its
//! stdout, stderr and exit code): a controller on the embedded store, two
//! agents (halo1 speed, halo2 reasoning) with the tiny real model and a
//! sparse DeepSeek-V3.1 1-bit, real llama-server instances. Covers nodes,
//! models, plan, place with wait, status, endpoints, a chat completion
//! through the endpoint, events, unplace, and the error paths: unknown
//! model, unknown role, refusal with arithmetic (exit 1), unreachable
//! controller (exit 3), usage (exit 2).

use agent::gguf::fixtures::{self, SparseModel, VocabStyle, write_tiny_llama};
use std::io::BufRead;
use std::process::{Command, Output, Stdio};
use std::time::Duration;
use tests::cluster::chat;
use tests::cluster::{AgentNode, ControllerProc, write_catalog};
use tests::{text, wait_for};

const HALOCTL: &str = env!("CARGO_BIN_EXE_haloctl-shim");

/// The catalog: the tiny model for every mode and the sparse DeepSeek.
const CATALOG: &str = r#"
[[models]]
name = "tiny"
model_id = "tiny.gguf"
default_context = 512
min_context = 256
modes = ["ask", "code"]

[[models]]
name = "deepseek-v3.1-1bit"
model_id = "deepseek-v3.1-1bit.gguf"
default_context = 16384
min_context = 4096
modes = ["architect", "debug"]
"#;

struct Ctl {
    url: String,
    home: tempfile::TempDir,
    /// `HALO_TLS_*` for the controller's admin certificate.
    tls: Vec<(&'static str, String)>,
}

impl Ctl {
    fn cmd(&self) -> Command {
        let mut c = Command::new(HALOCTL);
        c.arg("--controller")
            .arg(&self.url)
            .env_remove("HALO_CONTROLLER")
            .env("HOME", self.home.path())
            .env_remove("XDG_CONFIG_HOME")
            .envs(self.tls.iter().cloned());
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("run haloctl")
    }
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", show(o)))
}

#[test]
fn haloctl_drives_a_local_cluster_from_nodes_to_a_completion_and_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut a = AgentNode::new(dir.path(), "halo1", &["speed"], 4);
    let mut b = AgentNode::new(dir.path(), "halo2", &["reasoning"], 4);
    for n in [&a, &b] {
        write_tiny_llama(&n.models.join("tiny.gguf"), 7).expect("tiny model");
    }
    fixtures::write_sparse_with(
        SparseModel::DeepSeekV31,
        &b.models.join("deepseek-v3.1-1bit.gguf"),
        VocabStyle::SizeOnly,
    )
    .expect("sparse deepseek");
    a.start();
    b.start();
    let (controller, ctl) = controller_for(dir.path(), &[&a, &b]);
    let logs = || format!("{}\n", controller.logs());

    // nodes: both ready, with roles and memory.
    let ready = wait_for(Duration::from_secs(20), || {
        let v = json(&ctl.run(&["nodes", "-o", "json"]));
        let n = v.as_array()?;
        (n.len() == 2 && n.iter().all(|n| n["status"] == "ready")).then_some(v)
    });
    let nodes = ready.unwrap_or_else(|| panic!("nodes not ready\n{}", logs()));
    assert_eq!(nodes[0]["name"], "halo1");
    assert_eq!(nodes[0]["roles"][0], "speed");
    assert!(nodes[0]["usable_bytes"].as_u64().is_some_and(|u| u > 0));
    let table = ctl.run(&["nodes"]);
    assert_eq!(table.status.code(), Some(0), "{}", show(&table));
    let out = text(&table.stdout);
    assert!(out.starts_with("NODE "), "{out}");
    assert!(out.contains("halo2  reasoning  ready"), "{out}");

    // models: both entries, which nodes hold them.
    let models = ctl.run(&["models", "-o", "json"]);
    let m = json(&models);
    let tiny = m
        .as_array()
        .and_then(|v| v.iter().find(|e| e["name"] == "tiny"))
        .unwrap_or_else(|| panic!("{}", show(&models)));
    assert_eq!(tiny["architecture"], "llama");
    assert_eq!(tiny["nodes"], serde_json::json!(["halo1", "halo2"]));
    let out = text(&ctl.run(&["models"]).stdout);
    assert!(
        out.contains("deepseek-v3.1-1bit") && out.contains("158.4 GiB"),
        "{out}"
    );

    // plan through the controller: fits (0) and does not (1).
    let plan = ctl.run(&["plan", "tiny"]);
    assert_eq!(plan.status.code(), Some(0), "{}", show(&plan));
    assert!(text(&plan.stdout).contains("halo1"), "{}", show(&plan));
    let plan = ctl.run(&["plan", "deepseek-v3.1-1bit", "-o", "json"]);
    assert_eq!(plan.status.code(), Some(1), "{}", show(&plan));
    assert!(json(&plan).as_array().is_some_and(|r| !r.is_empty()));

    // Error paths: unknown model, unknown role, refusal with the numbers.
    let o = ctl.run(&["place", "speed", "no-such-model"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        text(&o.stdout).contains("not in the catalog"),
        "{}",
        show(&o)
    );
    let o = ctl.run(&["place", "gpu", "tiny"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(text(&o.stdout).contains("refused"), "{}", show(&o));
    assert!(text(&o.stdout).contains("`gpu`"), "{}", show(&o));
    let o = ctl.run(&["place", "reasoning", "deepseek-v3.1-1bit"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    let out = text(&o.stdout);
    assert!(out.starts_with("refused: deepseek-v3.1-1bit"), "{out}");
    assert!(out.contains("weights 158.4 GiB"), "{out}");
    assert!(out.contains("free = usable - reserve - used"), "{out}");
    assert!(out.contains("larger than any node"), "{out}");
    let o = ctl.run(&["place", "speed", "tiny", "--dry-run", "-o", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let d = json(&o);
    assert_eq!(
        (d["accepted"].clone(), d["dry_run"].clone()),
        (true.into(), true.into())
    );
    assert_eq!(d["nodes"], serde_json::json!(["halo1"]));
    // A dry run places nothing, and its words say so.
    let lines: Vec<&str> = d["explanation"]
        .as_array()
        .map(|v| v.iter().filter_map(|l| l.as_str()).collect())
        .unwrap_or_default();
    assert!(
        lines.iter().any(|l| l.starts_with("would place `tiny`"))
            && !lines.iter().any(|l| l.starts_with("placed ")),
        "{lines:?}"
    );

    // events: a follower started before the placement sees it.
    let mut follower = ctl
        .cmd()
        .args(["events", "-f", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("haloctl events");
    let stdout = follower.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(700));

    // place with wait: the decision, progress on stderr, ready.
    let o = ctl.run(&["place", "speed", "tiny", "--timeout", "120"]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", show(&o), logs());
    let out = text(&o.stdout);
    assert!(out.starts_with("placed tiny (tiny) on halo1"), "{out}");
    assert!(out.contains("ready: tiny after"), "{out}");
    assert!(text(&o.stderr).contains("tiny: halo1"), "{}", show(&o));

    let placed = wait_for(Duration::from_secs(10), || {
        rx.try_iter().find(|l| l.contains("\"kind\":\"placed\""))
    });
    let _ = follower.kill();
    let _ = follower.wait();
    let placed = placed.expect("a `placed` event");
    let ev: serde_json::Value = serde_json::from_str(&placed).expect("event JSON");
    assert_eq!(ev["subject"], "tiny");
    // Without -f: what happened recently, then exit.
    let o = ctl.run(&["events", "-o", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        text(&o.stdout)
            .lines()
            .any(|l| l.contains("\"kind\":\"placed\"")),
        "{}",
        show(&o)
    );
    let o = ctl.run(&["events", "-n", "0"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(text(&o.stdout).is_empty(), "{}", show(&o));

    // status: the replica ready on halo1, estimate and real figures.
    let o = ctl.run(&["status", "-o", "json"]);
    let s = json(&o);
    let r = &s[0]["replicas"][0];
    assert_eq!(s[0]["name"], "tiny", "{}", show(&o));
    assert_eq!(r["node"], "halo1");
    assert_eq!(r["state"], "ready");
    assert!(
        r["real_bytes"].as_u64().is_some_and(|b| b > 0),
        "{}",
        show(&o)
    );
    let out = text(&ctl.run(&["status"]).stdout);
    assert!(out.contains("tiny  tiny   halo1  ready"), "{out}");

    // endpoints and a completion through the code-mode one.
    let o = ctl.run(&["endpoints", "-o", "json"]);
    let e = json(&o);
    let code = e
        .as_array()
        .and_then(|v| v.iter().find(|e| e["mode"] == "code"))
        .unwrap_or_else(|| panic!("{}", show(&o)));
    let base = code["base_url"].as_str().expect("base_url");
    let key = code["api_key"].as_str().expect("api_key");
    assert!(base.ends_with("/v1"), "{base}");
    let answer = chat(base.trim_end_matches("/v1"), key, "tiny").expect("chat completion");
    assert!(!answer.is_empty());
    let out = text(&ctl.run(&["endpoints"]).stdout);
    assert!(out.contains("Authorization: Bearer"), "{out}");

    // logs: llama-server's own load log, through the controller and agent.
    let o = ctl.run(&["logs", "tiny", "-n", "400"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = text(&o.stdout);
    assert!(out.contains("starting llama-server"), "{out}");
    assert!(out.contains("buffer size"), "{out}");
    let o = ctl.run(&["logs", "tiny", "--replica", "3"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(text(&o.stderr).contains("no replica 3"), "{}", show(&o));
    let o = ctl.run(&["logs", "nope"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));

    // HALO_CONTROLLER works as well as --controller.
    let o = Command::new(HALOCTL)
        .arg("status")
        .env("HALO_CONTROLLER", &ctl.url)
        .envs(ctl.tls.iter().cloned())
        .env("HOME", ctl.home.path())
        .output()
        .expect("haloctl");
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));

    // unplace: gone from status, its instance stopped; twice is an error.
    let o = ctl.run(&["unplace", "tiny"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let gone = wait_for(Duration::from_secs(20), || {
        a.servers().is_empty().then_some(())
    });
    assert!(gone.is_some(), "instance still running\n{}", logs());
    assert!(text(&ctl.run(&["status"]).stdout).starts_with("No placements."));
    let o = ctl.run(&["unplace", "tiny"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("no placement `tiny`"),
        "{}",
        show(&o)
    );

    // Usage errors exit 2.
    let o = ctl.run(&["place", "speed"]);
    assert_eq!(o.status.code(), Some(2), "{}", show(&o));
}

#[test]
fn haloctl_exits_3_with_the_address_and_a_hint_when_no_controller_answers() {
    let port = tests::free_port();
    let url = format!("http://127.0.0.1:{port}");
    let home = tempfile::tempdir().expect("home");
    for args in [
        vec!["nodes"],
        vec!["status", "-o", "json"],
        vec!["place", "speed", "tiny"],
    ] {
        let o = Command::new(HALOCTL)
            .arg("--controller")
            .arg(&url)
            .args(&args)
            .env("HOME", home.path())
            .output()
            .expect("haloctl");
        assert_eq!(o.status.code(), Some(3), "{args:?}: {}", show(&o));
        let err = text(&o.stderr);
        assert!(err.contains(&url) && err.contains("--controller"), "{err}");
        assert!(err.contains("hint:"), "{err}");
        assert!(o.stdout.is_empty(), "{}", show(&o));
    }
    // The config file names the controller when nothing else does.
    let cfg = home.path().join(".config/halo");
    std::fs::create_dir_all(&cfg).expect("mkdir");
    std::fs::write(
        cfg.join("haloctl.toml"),
        format!("controller = \"{url}\"\n"),
    )
    .expect("write");
    let o = Command::new(HALOCTL)
        .arg("nodes")
        .env("HOME", home.path())
        .env_remove("HALO_CONTROLLER")
        .env_remove("XDG_CONFIG_HOME")
        .output()
        .expect("haloctl");
    assert_eq!(o.status.code(), Some(3), "{}", show(&o));
    assert!(text(&o.stderr).contains("haloctl.toml"), "{}", show(&o));
}

/// Runs `deploy/quickstart.sh down` for its directory when dropped, so a
/// failed assertion leaves no process behind.
struct Quickstart {
    dir: tempfile::TempDir,
    port: u16,
}

impl Quickstart {
    /// `deploy/quickstart.sh ARG` on this run's directory and ports.
    fn command(&self, arg: &str) -> Command {
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/quickstart.sh");
        let llama = tests::llama_bin("llama-server");
        let mut c = Command::new("bash");
        c.arg(script)
            .arg(arg)
            .env("HALO_LOCAL_DIR", self.dir.path().join("local"))
            .env("HALO_LOCAL_PORT", self.port.to_string())
            .env("HALO_LLAMA_BIN", llama.parent().expect("llama bin dir"));
        c
    }

    fn run(&self, arg: &str) -> Output {
        self.command(arg).output().expect("run quickstart.sh")
    }

    /// Runs the quick start with stdout and stderr in one transcript, as a
    /// terminal shows them (haloctl's progress goes to stderr).
    fn run_merged(&self, arg: &str) -> (std::process::ExitStatus, String) {
        let log = self.dir.path().join(format!("quickstart-{arg}.out"));
        let file = std::fs::File::create(&log).expect("transcript");
        let status = self
            .command(arg)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("transcript"))
            .stderr(file)
            .status()
            .expect("run quickstart.sh");
        (status, std::fs::read_to_string(&log).unwrap_or_default())
    }

    /// haloctl as the quick start tells a person to run it (`. DIR/env`):
    /// stdout, then stderr.
    fn haloctl(&self, args: &[&str]) -> String {
        let local = self.dir.path().join("local");
        let tls = local.join("tls");
        let o = Command::new(HALOCTL)
            .args(args)
            .env(
                "HALO_CONTROLLER",
                format!("https://127.0.0.1:{}", self.port),
            )
            .env("HALO_TLS_CERT", tls.join("admin-local.pem"))
            .env("HALO_TLS_KEY", tls.join("admin-local.key"))
            .env("HALO_TLS_CA", tls.join("ca.pem"))
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .output()
            .expect("run haloctl");
        let mut out = text(&o.stdout);
        out.push_str(&text(&o.stderr));
        out.trim_end().to_owned()
    }

    /// `text` with this run's ports written as the quick start's defaults
    /// (7300 and up), as README.md shows them.
    fn as_default_ports(&self, text: &str) -> String {
        (0..30u16).rev().fold(text.to_owned(), |t, k| {
            t.replace(
                &format!("127.0.0.1:{}", self.port + k),
                &format!("127.0.0.1:{}", 7300 + k),
            )
        })
    }

    /// Processes whose command line names the quick start's directory.
    fn processes(&self) -> Vec<u32> {
        let mark = self.dir.path().display().to_string();
        let Ok(entries) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|&pid| {
                agent::procfs::cmdline(pid).is_some_and(|a| a.iter().any(|w| w.contains(&mark)))
            })
            .collect()
    }
}

impl Drop for Quickstart {
    fn drop(&mut self) {
        let _ = self.run("down");
    }
}

#[test]
fn quickstart_answers_runs_twice_and_down_leaves_no_process() {
    let qs = Quickstart {
        dir: tempfile::tempdir().expect("tempdir"),
        port: tests::free_range(30).0,
    };
    let (status, out) = qs.run_merged("up");
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(out.contains("$ haloctl place speed tiny"), "{out}");
    assert!(out.contains("tiny  tiny   halo1  ready"), "{out}");
    assert!(out.contains("\nanswer: "), "{out}");
    // The answer came through halo1's gateway, with a user key, model "code".
    assert!(out.contains("\"model\":\"code\""), "{out}");
    assert!(
        out.contains(&format!("base URL  https://127.0.0.1:{}/v1", qs.port + 3)),
        "{out}"
    );
    assert!(out.contains("API key   halo-"), "{out}");
    assert!(out.contains("bash deploy/quickstart.sh down"), "{out}");
    let servers = qs
        .processes()
        .into_iter()
        .filter(|&p| {
            agent::procfs::cmdline(p)
                .is_some_and(|a| a.first().is_some_and(|w| w.ends_with("llama-server")))
        })
        .count();
    assert_eq!(servers, 1, "one llama-server instance");

    // README's samples are what this cluster prints: the quick start's
    // own, and the tour's commands after it.
    let checked = tests::readme::check_or_update(
        "$ bash deploy/quickstart.sh",
        &tests::readme::sections(&qs.as_default_ports(&out)),
    );
    assert_eq!(
        checked,
        [
            "haloctl nodes",
            "haloctl place speed tiny",
            "haloctl status"
        ],
        "the quick start's samples in README.md"
    );
    let tour: Vec<(String, String)> = [
        "haloctl nodes",
        "haloctl models",
        "haloctl plan deepseek-v3.1-1bit --ctx 16384",
        "haloctl status",
        "haloctl endpoints",
        "haloctl place reasoning deepseek-v3.1-1bit",
    ]
    .iter()
    .map(|c| {
        let args: Vec<&str> = c.split_whitespace().skip(1).collect();
        ((*c).to_owned(), qs.as_default_ports(&qs.haloctl(&args)))
    })
    .collect();
    let checked = tests::readme::check_or_update("The rest of the tour", &tour);
    assert_eq!(
        checked.len(),
        5,
        "the tour's samples in README.md: {checked:?}"
    );
    let checked =
        tests::readme::check_or_update("$ haloctl place reasoning deepseek-v3.1-1bit", &tour);
    assert_eq!(checked, ["haloctl place reasoning deepseek-v3.1-1bit"]);

    let again = qs.run("up");
    assert_eq!(again.status.code(), Some(0), "{}", show(&again));
    assert!(
        text(&again.stderr).contains("already running"),
        "{}",
        show(&again)
    );
    assert!(
        text(&again.stdout).contains("\nanswer: "),
        "{}",
        show(&again)
    );

    let down = qs.run("down");
    assert_eq!(down.status.code(), Some(0), "{}", show(&down));
    let left = wait_for(Duration::from_secs(10), || {
        qs.processes().is_empty().then_some(())
    });
    assert!(left.is_some(), "left behind: {:?}", qs.processes());
    assert!(!qs.dir.path().join("local").exists());
}

/// A controller (embedded store, [`CATALOG`], quick heartbeats) for
/// `agents` (named as they are), started, and haloctl for it.
fn controller_for(dir: &std::path::Path, agents: &[&AgentNode]) -> (ControllerProc, Ctl) {
    let catalog = dir.join("catalog.toml");
    write_catalog(&catalog, CATALOG);
    let nodes: Vec<String> = agents
        .iter()
        .map(|a| format!("{}={}", a.name, a.address()))
        .collect();
    let mut controller = ControllerProc::new(
        dir,
        "controller",
        &[
            "--store-path".into(),
            dir.join("state.json").display().to_string(),
            "--node".into(),
            nodes.join(","),
            "--catalog".into(),
            catalog.display().to_string(),
            "--heartbeat-ms".into(),
            "250".into(),
            "--requeue-ms".into(),
            "300".into(),
        ],
    );
    controller.start();
    let ctl = Ctl {
        url: controller.url(),
        home: tempfile::tempdir().expect("home"),
        tls: controller
            .haloctl_env()
            .into_iter()
            .filter(|(k, _)| *k != "HALO_CONTROLLER")
            .collect(),
    };
    (controller, ctl)
}

/// A cluster of one agent (`speed`) with `ports` instance ports and the
/// tiny model, its controller, and haloctl for it.
fn one_node(dir: &std::path::Path, ports: u16) -> (AgentNode, ControllerProc, Ctl) {
    let mut a = AgentNode::new(dir, "halo1", &["speed"], ports);
    write_tiny_llama(&a.models.join("tiny.gguf"), 7).expect("tiny model");
    a.start();
    let (controller, ctl) = controller_for(dir, &[&a]);
    let ready = wait_for(Duration::from_secs(20), || {
        let v = json(&ctl.run(&["nodes", "-o", "json"]));
        (v[0]["status"] == "ready").then_some(())
    });
    assert!(ready.is_some(), "halo1 not ready\n{}", controller.logs());
    (a, controller, ctl)
}

#[test]
fn refusals_that_would_repeat_end_place_at_once_with_the_reason() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (_a, controller, ctl) = one_node(dir.path(), 1);

    // Above the trained context (2048): refused when decided, not retried.
    let t0 = std::time::Instant::now();
    let o = ctl.run(&["place", "speed", "tiny", "--ctx", "65536"]);
    eprintln!(
        "TIMING place over the trained context answered in {:?}",
        t0.elapsed()
    );
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        text(&o.stdout).contains("above `tiny.gguf`'s trained context 2048"),
        "{}",
        show(&o)
    );
    let st = json(&ctl.run(&["status", "-o", "json"]));
    assert_eq!(st.as_array().map(Vec::len), Some(0), "nothing placed: {st}");

    // The agent's one port taken: a second start is refused by the agent
    // itself, and place says so at once instead of waiting for its timeout.
    let o = ctl.run(&["place", "speed", "tiny", "--timeout", "120"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}\n{}",
        show(&o),
        controller.logs()
    );
    let o = ctl.run(&[
        "place",
        "speed",
        "tiny",
        "--name",
        "tiny-b",
        "--timeout",
        "120",
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}\n{}",
        show(&o),
        controller.logs()
    );
    assert!(
        text(&o.stderr).contains("`tiny-b` failed on halo1: no free port"),
        "{}",
        show(&o)
    );
    let st = json(&ctl.run(&["status", "-o", "json"]));
    let b = st
        .as_array()
        .and_then(|v| v.iter().find(|p| p["name"] == "tiny-b"))
        .unwrap_or_else(|| panic!("tiny-b in {st}"));
    assert_eq!(b["replicas"][0]["state"], "failed", "{st}");
    assert!(
        b["replicas"][0]["last_error"]
            .as_str()
            .is_some_and(|e| e.starts_with("no free port")),
        "{st}"
    );
    let table = text(&ctl.run(&["status"]).stdout);
    assert!(table.contains("failed"), "{table}");
    // Its logs: there are none, and haloctl says why.
    let o = ctl.run(&["logs", "tiny-b"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("its start was refused on halo1: no free port"),
        "{}",
        show(&o)
    );

    // Events were kept: -n 0 does not claim there are none.
    let o = ctl.run(&["events", "-n", "0"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(!text(&o.stderr).contains("no events yet"), "{}", show(&o));
    assert!(text(&o.stderr).contains("-f -n 0"), "{}", show(&o));
}

#[test]
fn plan_of_a_catalog_name_honours_cache_types_names_a_missing_node_and_fits_no_lost_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut a, _controller, ctl) = one_node(dir.path(), 2);
    let kv = |extra: &[&str]| {
        let mut args = vec!["plan", "tiny", "--ctx", "2048", "-o", "json"];
        args.extend(extra);
        let o = ctl.run(&args);
        assert_eq!(o.status.code(), Some(0), "{}", show(&o));
        json(&o)[0]["kv_bytes"].as_u64().expect("kv_bytes")
    };
    let f16 = kv(&[]);
    let q8 = kv(&["--cache-type-k", "q8_0", "--cache-type-v", "q8_0"]);
    assert!(
        q8 * 3 < f16 * 2,
        "q8_0 KV {q8} is not smaller than f16 {f16}"
    );

    let o = ctl.run(&["plan", "tiny", "--node", "halo3"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("no node named `halo3`"),
        "{}",
        show(&o)
    );

    // A node the controller no longer hears from fits nothing.
    a.kill9();
    let lost = wait_for(Duration::from_secs(20), || {
        let v = json(&ctl.run(&["plan", "tiny", "-o", "json"]));
        (v[0]["fits"] == false).then_some(v)
    });
    let v = lost.expect("plan still says the unreachable node fits");
    assert!(
        v[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("unreachable")),
        "{v}"
    );
}
