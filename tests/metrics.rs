//! `/metrics` of the agents and the controller, read by a real Prometheus
//! (Debian's `prometheus`, from tests/deps.sh) against a local cluster with
//! the tiny model placed: PromQL answers for both nodes' free memory, the
//! placement's state and a predicted-tokens counter that grows after a
//! chat completion; `promtool check metrics` on every daemon's output;
//! deploy/prometheus/ checked with `promtool check config`, `check rules`
//! and `test rules`; and `haloctl top` in a real terminal (tmux).

use proto::v1;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;
use tests::cluster::{AgentNode, ControllerProc, chat, endpoint, tiny_controller};
use tests::{Proc, bin, free_port, text, wait_for};

/// A Debian binary the tests need; panics with how to get it.
fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("{name} not found: run `bash tests/deps.sh` (Debian package prometheus)");
}

fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into()
}

fn get(url: &str) -> Option<String> {
    http()
        .get(url)
        .call()
        .ok()?
        .body_mut()
        .read_to_string()
        .ok()
}

/// `promtool check metrics` on `text`: its complaints, empty when clean.
fn promtool_check_metrics(text: &str) -> String {
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(text.as_bytes()).expect("write");
    }
    let o = child.wait_with_output().expect("promtool");
    let said = format!("{}{}", text_of(&o.stdout), text_of(&o.stderr));
    if o.status.success() && said.trim().is_empty() {
        String::new()
    } else {
        format!("exit {}: {said}", o.status)
    }
}

fn text_of(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Two speed agents holding the tiny model, each serving `/metrics` on a
/// loopback port: (nodes, their metrics URLs).
fn agents_with_metrics(dir: &Path) -> ([AgentNode; 2], [String; 2]) {
    let mut nodes = [
        AgentNode::new(dir, "halo1", &["speed"], 2),
        AgentNode::new(dir, "halo2", &["speed"], 2),
    ];
    let mut urls = [String::new(), String::new()];
    for (n, url) in nodes.iter_mut().zip(&mut urls) {
        agent::gguf::fixtures::write_tiny_llama(&n.models.join("tiny.gguf"), 7)
            .expect("tiny model");
        let port = free_port();
        n.extra_args = vec!["--metrics-listen".into(), format!("127.0.0.1:{port}")];
        *url = format!("http://127.0.0.1:{port}/metrics");
        n.start();
    }
    (nodes, urls)
}

/// The controller with `/metrics` on a loopback port, started, with both
/// nodes ready: (controller, its metrics URL, a client).
async fn controller_with_metrics(
    dir: &Path,
    nodes: &[AgentNode],
) -> (ControllerProc, String, tests::cluster::Client) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut ctl = tiny_controller(
        dir,
        nodes,
        &["--heartbeat-ms", "250", "--metrics-listen", &listen],
    );
    let c = ctl.start_and_wait(&["halo1", "halo2"]).await;
    (ctl, format!("http://{listen}/metrics"), c)
}

/// Places the tiny model on halo1 and waits for its code endpoint.
async fn place_tiny(c: &mut tests::cluster::Client) -> v1::Endpoint {
    let r = c
        .place(v1::PlaceRequest {
            role: "speed".into(),
            model: "tiny".into(),
            node: "halo1".into(),
            replicas: 1,
            ..v1::PlaceRequest::default()
        })
        .await
        .expect("place")
        .into_inner();
    assert!(r.accepted, "{:?}", r.explanation);
    endpoint(c, "tiny", Duration::from_secs(90))
        .await
        .expect("tiny never became ready")
}

/// A Prometheus scraping `targets` (host:port, plain HTTP) every second.
struct Prometheus {
    url: String,
    proc: Proc,
}

impl Prometheus {
    fn start(dir: &Path, targets: &[String]) -> Prometheus {
        let data = dir.join("prometheus-data");
        std::fs::create_dir_all(&data).expect("mkdir");
        let config = dir.join("prometheus.yml");
        let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: halo\n    static_configs:\n      - targets: [{}]\n",
                list.join(", ")
            ),
        )
        .expect("write config");
        let port = free_port();
        let mut cmd = Command::new(tool("prometheus"));
        cmd.arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", data.display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let mut proc = Proc::spawn("prometheus", cmd, dir);
        let url = format!("http://127.0.0.1:{port}");
        let ready = wait_for(Duration::from_secs(30), || {
            proc.assert_running();
            tests::http_status(&format!("{url}/-/ready")).filter(|s| *s == 200)
        });
        assert!(ready.is_some(), "prometheus not ready:\n{}", proc.log());
        Prometheus { url, proc }
    }

    /// The instant vector of `promql`: (labels, value) per series.
    fn query(&self, promql: &str) -> Vec<(serde_json::Value, f64)> {
        let Ok(mut r) = http()
            .get(&format!("{}/api/v1/query", self.url))
            .query("query", promql)
            .call()
        else {
            return Vec::new();
        };
        let Ok(v) = r.body_mut().read_json::<serde_json::Value>() else {
            return Vec::new();
        };
        v["data"]["result"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| {
                        let value = s["value"][1].as_str()?.parse().ok()?;
                        Some((s["metric"].clone(), value))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits (up to a minute) until `promql` answers something `ok` likes.
    fn until(
        &self,
        promql: &str,
        ok: impl Fn(&[(serde_json::Value, f64)]) -> bool,
    ) -> Vec<(serde_json::Value, f64)> {
        let got = wait_for(Duration::from_secs(60), || {
            let r = self.query(promql);
            ok(&r).then_some(r)
        });
        got.unwrap_or_else(|| {
            panic!(
                "prometheus never answered `{promql}` as expected; last answer {:?}\n{}",
                self.query(promql),
                self.proc.log()
            )
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_agents_and_controller_and_tokens_move_after_a_chat() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (nodes, agent_urls) = agents_with_metrics(dir.path());
    let (ctl, ctl_url, mut c) = controller_with_metrics(dir.path(), &nodes).await;
    let ep = place_tiny(&mut c).await;

    // Every daemon's output passes promtool's checks; the agent running
    // the instance re-exports llama-server's counters.
    let halo1 = wait_for(Duration::from_secs(30), || {
        get(&agent_urls[0]).filter(|t| t.contains("halo_llamacpp_tokens_predicted_total{"))
    })
    .expect("halo1's metrics never showed llama-server's counters");
    for (what, t) in [
        ("halo1", halo1.clone()),
        ("halo2", get(&agent_urls[1]).expect("halo2 metrics")),
        ("controller", get(&ctl_url).expect("controller metrics")),
    ] {
        let said = promtool_check_metrics(&t);
        assert!(said.is_empty(), "promtool on {what}'s metrics: {said}\n{t}");
    }

    let targets: Vec<String> = agent_urls
        .iter()
        .chain([&ctl_url])
        .map(|u| {
            u.trim_start_matches("http://")
                .trim_end_matches("/metrics")
                .to_owned()
        })
        .collect();
    let prom = Prometheus::start(dir.path(), &targets);

    // Free memory of both nodes.
    let free = prom.until("halo_node_memory_free_bytes", |r| r.len() == 2);
    let mut names: Vec<&str> = free
        .iter()
        .filter_map(|(m, v)| (*v > 0.0).then_some(m["node"].as_str()?))
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["halo1", "halo2"], "{free:?}");

    // The placement's state, from the controller.
    prom.until(
        "halo_placement_state{placement=\"tiny\",model=\"tiny\",state=\"ready\"} == 1",
        |r| r.len() == 1,
    );
    prom.until("halo_controller_leader == 1", |r| r.len() == 1);
    prom.until("halo_node_up{node=\"halo2\"} == 1", |r| r.len() == 1);

    // A chat completion moves the predicted-tokens counter of the right
    // placement, on the right node.
    let counter = "halo_llamacpp_tokens_predicted_total{placement=\"tiny\",model=\"tiny\"}";
    let before = prom.until(counter, |r| r.len() == 1);
    assert_eq!(before[0].0["node"], "halo1", "{before:?}");
    let v0 = before[0].1;
    chat(&ep.base_url, &ep.api_key, "tiny").expect("chat");
    let after = prom.until(counter, |r| r.len() == 1 && r[0].1 > v0);
    assert!(after[0].1 >= v0 + 1.0, "{v0} -> {after:?}");
    // Nothing of the kind on halo2, which runs no instance.
    assert!(
        prom.query("halo_llamacpp_tokens_predicted_total{node=\"halo2\"}")
            .is_empty()
    );
    drop(ctl);
}

/// deploy/prometheus/ with its certificate paths pointed at real files
/// from the test CA, in `dir`.
fn deploy_copy(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    let pki = tests::pki::pki();
    let (cert, key) = pki.files("read-only", "prometheus");
    for f in ["prometheus.yml", "halo-rules.yml", "halo-rules-test.yml"] {
        let t = std::fs::read_to_string(src.join(f)).expect("read deploy/prometheus");
        let t = t
            .replace(
                "/etc/prometheus/halo/ca.pem",
                &pki.ca().display().to_string(),
            )
            .replace(
                "/etc/prometheus/halo/read-only-prometheus.pem",
                &cert.display().to_string(),
            )
            .replace(
                "/etc/prometheus/halo/read-only-prometheus.key",
                &key.display().to_string(),
            );
        std::fs::write(dir.join(f), t).expect("write");
    }
    dir.to_owned()
}

#[test]
fn the_deployed_scrape_config_and_alert_rules_pass_promtool() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = deploy_copy(dir.path());
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "halo-rules.yml"],
        vec!["test", "rules", "halo-rules-test.yml"],
    ] {
        let o = Command::new(tool("promtool"))
            .args(&args)
            .current_dir(&d)
            .output()
            .expect("promtool");
        assert!(
            o.status.success(),
            "promtool {args:?}:\n{}{}",
            text(&o.stdout),
            text(&o.stderr)
        );
    }
    // The rules test can fail: an alert expected where the rule is quiet.
    let broken = std::fs::read_to_string(d.join("halo-rules.yml"))
        .expect("read")
        .replace("> 0.10", "> 0.50");
    std::fs::write(d.join("halo-rules.yml"), broken).expect("write");
    let o = Command::new(tool("promtool"))
        .args(["test", "rules", "halo-rules-test.yml"])
        .current_dir(&d)
        .output()
        .expect("promtool");
    assert!(!o.status.success(), "a broken rule passed its test");
}

/// tmux on its own socket, killed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn cmd(&self) -> Command {
        let mut c = Command::new(tool("tmux"));
        c.arg("-S").arg(&self.socket);
        c
    }

    fn capture(&self) -> String {
        let o = self
            .cmd()
            .args(["capture-pane", "-p", "-t", "top"])
            .output()
            .expect("tmux capture-pane");
        text(&o.stdout)
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.cmd().arg("kill-server").output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haloctl_top_shows_both_nodes_and_the_tiny_model_generating_in_a_terminal() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (nodes, _) = agents_with_metrics(dir.path());
    let (ctl, _, mut c) = controller_with_metrics(dir.path(), &nodes).await;
    let ep = place_tiny(&mut c).await;
    chat(&ep.base_url, &ep.api_key, "tiny").expect("chat");

    // `--once` for scripts.
    let mut once = Command::new(bin("haloctl-shim"));
    once.env("HOME", dir.path())
        .env_remove("XDG_CONFIG_HOME")
        .envs(ctl.haloctl_env())
        .args(["top", "--once"]);
    let o = once.output().expect("haloctl top --once");
    let frame = text(&o.stdout);
    assert!(o.status.success(), "{frame}{}", text(&o.stderr));
    assert!(
        frame.contains("halo1") && frame.contains("halo2"),
        "{frame}"
    );

    // The live view in a real terminal.
    let tmux = Tmux {
        socket: dir.path().join("tmux.sock"),
    };
    let mut env = String::new();
    for (k, v) in ctl.haloctl_env() {
        env.push_str(&format!("{k}='{v}' "));
    }
    let shell = format!(
        "HOME='{}' {env} '{}' top",
        dir.path().display(),
        bin("haloctl-shim").display()
    );
    let o = tmux
        .cmd()
        .args([
            "new-session",
            "-d",
            "-s",
            "top",
            "-x",
            "160",
            "-y",
            "30",
            &shell,
        ])
        .output()
        .expect("tmux new-session");
    assert!(o.status.success(), "tmux: {}", text(&o.stderr));
    let shown = wait_for(Duration::from_secs(30), || {
        let s = tmux.capture();
        let tiny = s.lines().find(|l| l.starts_with("tiny "))?.to_owned();
        // TOK/S is the last column but one (TOKENS last).
        let speed: f64 = tiny.split_whitespace().rev().nth(1)?.parse().ok()?;
        (s.contains("halo1") && s.contains("halo2") && s.contains("halo top") && speed > 0.0)
            .then_some(s)
    });
    let shown = shown.unwrap_or_else(|| panic!("haloctl top never showed it:\n{}", tmux.capture()));
    println!("haloctl top, as tmux shows it:\n{shown}");
    assert!(
        shown.contains("MEMORY: # halo, = reserve, o other, . free"),
        "{shown}"
    );

    // q quits: the session ends with haloctl.
    let _ = tmux.cmd().args(["send-keys", "-t", "top", "q"]).output();
    let gone = wait_for(Duration::from_secs(10), || {
        let o = tmux
            .cmd()
            .args(["has-session", "-t", "top"])
            .output()
            .ok()?;
        (!o.status.success()).then_some(())
    });
    assert!(gone.is_some(), "q did not quit:\n{}", tmux.capture());
    drop(ctl);
}
