//! Harness for the controller's multi-process tests: a real etcd on free
//! loopback ports with its own data dir, real agents (`halo-agent-shim`)
//! and real controllers (`halo-controller-shim`), each a [`crate::Proc`]
//! whose log is printed when a test fails. Agents, controllers and clients
//! speak mutual TLS with certificates from the test process's CA
//! ([`crate::pki`]), as a deployment does, unless a test passes its own
//! `--tls-*` flags or `--insecure-loopback-only`.

use crate::{Proc, bin, free_port, free_range, port_outside, wait_for};
use proto::v1;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::LazyLock;
use std::time::Duration;

/// A real etcd server.
#[derive(Debug)]
pub struct Etcd {
    /// The process, killed on drop.
    _server: Proc,
    /// Client URL.
    pub endpoint: String,
    /// Client port.
    pub port: u16,
}

/// Where etcd is: `$HALO_ETCD` or `etcd` on PATH (Debian's `etcd-server`).
fn etcd_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("HALO_ETCD") {
        return PathBuf::from(p);
    }
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("etcd");
        if p.is_file() {
            return p;
        }
    }
    panic!("etcd not found: install Debian's etcd-server (tests/run.sh does) or set HALO_ETCD");
}

impl Etcd {
    /// Starts etcd in `dir/etcd-NAME` and waits until it takes connections.
    pub fn start(dir: &Path, name: &str) -> Etcd {
        Etcd::spawn(dir, name, "http", &[])
    }

    /// Starts etcd serving clients and peers only over TLS with `cert` and
    /// `key`, requiring client (and peer) certificates signed by `ca`.
    pub fn start_tls(dir: &Path, name: &str, cert: &str, key: &str, ca: &str) -> Etcd {
        let tls = [
            "--cert-file",
            cert,
            "--key-file",
            key,
            "--trusted-ca-file",
            ca,
            "--client-cert-auth",
            "--peer-cert-file",
            cert,
            "--peer-key-file",
            key,
            "--peer-trusted-ca-file",
            ca,
            "--peer-client-cert-auth",
        ];
        Etcd::spawn(dir, name, "https", &tls)
    }

    fn spawn(dir: &Path, name: &str, scheme: &str, extra: &[&str]) -> Etcd {
        let client = free_port();
        let peer = free_port();
        let data = dir.join(format!("etcd-{name}"));
        let mut cmd = Command::new(etcd_bin());
        let c = format!("{scheme}://127.0.0.1:{client}");
        let p = format!("{scheme}://127.0.0.1:{peer}");
        cmd.arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(&c)
            .arg("--advertise-client-urls")
            .arg(&c)
            .arg("--listen-peer-urls")
            .arg(&p)
            .arg("--initial-advertise-peer-urls")
            .arg(&p)
            .arg("--initial-cluster")
            .arg(format!("default={p}"))
            .args(extra)
            .env("ETCD_UNSUPPORTED_ARCH", "arm64");
        let mut proc = Proc::spawn(&format!("etcd-{name}"), cmd, dir);
        let up = wait_for(Duration::from_secs(20), || {
            proc.assert_running();
            TcpStream::connect(("127.0.0.1", client)).ok()
        });
        assert!(up.is_some(), "etcd did not listen:\n{}", proc.log());
        Etcd {
            _server: proc,
            endpoint: c,
            port: client,
        }
    }
}

/// The agent daemon binary of this package.
pub static AGENT: LazyLock<PathBuf> = LazyLock::new(|| bin("halo-agent-shim"));
/// The controller daemon binary of this package.
pub static CONTROLLER: LazyLock<PathBuf> = LazyLock::new(|| bin("halo-controller-shim"));

/// The simulated 128 GB Strix Halo probe tree.
pub fn strix_halo_probe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/probe/strix-halo-128g")
}

/// One node: model dir, state dir, ports, and its agent process (restartable).
#[derive(Debug)]
pub struct AgentNode {
    /// Node name.
    pub name: String,
    /// Where its files live.
    pub dir: PathBuf,
    /// Model directory.
    pub models: PathBuf,
    /// State directory.
    pub state: PathBuf,
    /// gRPC port.
    pub port: u16,
    /// Instance ports.
    pub ports: (u16, u16),
    /// Roles.
    pub roles: Vec<String>,
    /// The running agent.
    pub proc: Option<Proc>,
    /// The probe tree its agent reads (`None`: the shared Strix Halo
    /// fixture, read-only; [`AgentNode::own_probe`] makes a copy to edit).
    pub probe: Option<PathBuf>,
    runs: u32,
    /// More agent flags, after the others. With `--tls-cert` or
    /// `--insecure-loopback-only` among them, the harness adds no TLS flags
    /// of its own; otherwise the agent gets an agent certificate.
    pub extra_args: Vec<String>,
}

/// Whether `args` already choose the transport (their own certificate or
/// plaintext on loopback).
fn chooses_transport(args: &[String]) -> bool {
    args.iter()
        .any(|a| a == "--tls-cert" || a == "--insecure-loopback-only")
}

impl AgentNode {
    /// A node under `root/NAME` with `ports` instance ports; nothing runs yet.
    pub fn new(root: &Path, name: &str, roles: &[&str], ports: u16) -> AgentNode {
        let dir = root.join(name);
        let models = dir.join("models");
        std::fs::create_dir_all(&models).expect("mkdir models");
        let ports = free_range(ports);
        AgentNode {
            name: name.to_owned(),
            state: dir.join("state"),
            port: port_outside(ports),
            dir,
            models,
            ports,
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            proc: None,
            probe: None,
            runs: 0,
            extra_args: Vec::new(),
        }
    }

    /// `host:port` of the agent.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts the agent and waits until it accepts connections.
    pub fn start(&mut self) {
        assert!(self.proc.is_none(), "agent {} already running", self.name);
        self.runs += 1;
        let mut cmd = Command::new(&*AGENT);
        cmd.arg("--node-name")
            .arg(&self.name)
            .arg("--listen")
            .arg(self.address())
            .arg("--model-dir")
            .arg(&self.models)
            .arg("--llama-server")
            .arg(crate::llama_bin("llama-server"))
            .arg("--port-range")
            .arg(format!("{}-{}", self.ports.0, self.ports.1))
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--probe-root")
            .arg(self.probe.clone().unwrap_or_else(strix_halo_probe))
            .arg("--stop-timeout-secs")
            .arg("5")
            .env("HALO_LOG", "info")
            .env_remove("HALO_AGENT_CONFIG");
        for r in &self.roles {
            cmd.arg("--role").arg(r);
        }
        if !chooses_transport(&self.extra_args) {
            cmd.args(crate::pki::pki().flags("agent", &self.name));
        }
        cmd.args(&self.extra_args);
        let mut proc = Proc::spawn(
            &format!("agent-{}-{}", self.name, self.runs),
            cmd,
            &self.dir,
        );
        let port = self.port;
        let up = wait_for(Duration::from_secs(20), || {
            proc.assert_running();
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        assert!(
            up.is_some(),
            "agent {} did not listen:\n{}",
            self.name,
            proc.log()
        );
        self.proc = Some(proc);
    }

    /// Gives the node its own copy of the Strix Halo probe tree (under its
    /// directory), which a test may edit while the agent reads it: memory
    /// readings, PSI, the kernel's OOM kill counter (`proc/vmstat`, starting
    /// at 0) and `proc/PID/status` of processes. The copy's root.
    pub fn own_probe(&mut self) -> PathBuf {
        let root = self.dir.join("probe");
        let status = Command::new("cp")
            .arg("-r")
            .arg(strix_halo_probe())
            .arg(&root)
            .status()
            .expect("cp");
        assert!(status.success(), "copying the probe tree failed");
        std::fs::write(root.join("proc/vmstat"), "pgfault 1\noom_kill 0\n").expect("vmstat");
        self.probe = Some(root.clone());
        root
    }

    /// SIGKILLs the agent; its llama-server instances keep running.
    pub fn kill9(&mut self) {
        self.proc = None;
    }

    /// Live processes this node's agent started: llama-server (its command
    /// line names the instance directory) and a split's ggml-rpc-server and
    /// its proxy (they run in it).
    pub fn servers(&self) -> Vec<u32> {
        crate::live_processes_under(&self.state.join("instances"))
    }
}

impl Drop for AgentNode {
    fn drop(&mut self) {
        self.proc = None;
        for pid in self.servers() {
            let _ = agent::procfs::signal_group(pid, rustix::process::Signal::KILL);
        }
    }
}

/// A controller process (restartable) with its command line.
#[derive(Debug)]
pub struct ControllerProc {
    /// Listen port.
    pub port: u16,
    args: Vec<String>,
    dir: PathBuf,
    /// The running process.
    pub proc: Option<Proc>,
    runs: u32,
    name: String,
}

impl ControllerProc {
    /// A controller named `name` started with `args` (plus `--listen`).
    pub fn new(dir: &Path, name: &str, args: &[String]) -> ControllerProc {
        ControllerProc {
            port: free_port(),
            args: args.to_vec(),
            dir: dir.to_owned(),
            proc: None,
            runs: 0,
            name: name.to_owned(),
        }
    }

    /// Whether it speaks TLS with the harness's certificates.
    fn tls(&self) -> bool {
        !chooses_transport(&self.args)
    }

    /// gRPC URL: `https://` unless it runs plaintext or with a test's own
    /// certificates.
    pub fn url(&self) -> String {
        let scheme = if self.tls() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// `haloctl` environment for this controller: its URL and, with TLS,
    /// an admin certificate (`HALO_TLS_*`).
    pub fn haloctl_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![("HALO_CONTROLLER", self.url())];
        if self.tls() {
            for (k, v) in crate::pki::pki().env("admin", "tester") {
                env.push((k, v.display().to_string()));
            }
        }
        env
    }

    /// Starts the controller, connects, and waits (30 s at most) until it
    /// sees every node in `nodes` ready; panics with its log otherwise.
    pub async fn start_and_wait(&mut self, nodes: &[&str]) -> Client {
        self.start();
        let mut c = connect(&self.url()).await;
        let ready = wait_nodes(
            &mut c,
            nodes,
            proto::v1::NodeStatus::Ready,
            Duration::from_secs(30),
        )
        .await;
        assert!(ready, "nodes {nodes:?} not ready:\n{}", self.logs());
        c
    }

    /// Starts the controller and waits until it accepts connections.
    pub fn start(&mut self) {
        self.runs += 1;
        let mut cmd = Command::new(&*CONTROLLER);
        cmd.arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .args(&self.args)
            .args(if self.tls() {
                crate::pki::pki().flags("controller", &self.name)
            } else {
                Vec::new()
            })
            .env("HALO_LOG", "info,controller=debug")
            .env_remove("HALO_CONTROLLER_CONFIG");
        let mut proc = Proc::spawn(&format!("{}-{}", self.name, self.runs), cmd, &self.dir);
        let port = self.port;
        let up = wait_for(Duration::from_secs(20), || {
            proc.assert_running();
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        assert!(up.is_some(), "controller did not listen:\n{}", proc.log());
        self.proc = Some(proc);
    }

    /// SIGKILLs the controller.
    pub fn kill9(&mut self) {
        self.proc = None;
    }

    /// The pid of the running controller.
    pub fn pid(&self) -> u32 {
        self.proc
            .as_ref()
            .map(Proc::pid)
            .expect("controller running")
    }

    /// Every run's log.
    pub fn logs(&self) -> String {
        (1..=self.runs)
            .map(|r| {
                std::fs::read_to_string(self.dir.join(format!("{}-{r}.log", self.name)))
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("\n----- next run -----\n")
    }
}

/// A controller client.
pub type Client =
    proto::v1::controller_service_client::ControllerServiceClient<tonic::transport::Channel>;

/// Connects to a controller; an `https://` URL with the harness's admin
/// certificate.
pub async fn connect(url: &str) -> Client {
    for _ in 0..100 {
        if let Ok(ch) = channel(url, "admin").connect().await {
            return Client::new(ch);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot connect to {url}");
}

/// An endpoint for `url` (`http://…`, or `https://…` with the harness's
/// certificate of `role`).
pub fn channel(url: &str, role: &str) -> tonic::transport::Endpoint {
    let ep = tonic::transport::Endpoint::from_shared(url.to_owned()).expect("url");
    if url.starts_with("https://") {
        ep.tls_config(crate::pki::pki().client(role, "tester"))
            .expect("tls config")
    } else {
        ep
    }
}

/// An agent client for `node`, as the controller (TLS with a controller
/// certificate unless the node runs with its own transport flags).
pub async fn agent_client(
    node: &AgentNode,
) -> proto::v1::agent_service_client::AgentServiceClient<tonic::transport::Channel> {
    let url = if chooses_transport(&node.extra_args) {
        format!("http://{}", node.address())
    } else {
        format!("https://{}", node.address())
    };
    let ch = channel(&url, "controller")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("cannot connect to {url}: {e}"));
    proto::v1::agent_service_client::AgentServiceClient::new(ch)
}

/// Polls `f` every 100 ms until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until the controller reports every node in `names` with `status`.
pub async fn wait_nodes(
    c: &mut Client,
    names: &[&str],
    status: proto::v1::NodeStatus,
    timeout: Duration,
) -> bool {
    eventually(timeout, || {
        let mut c = c.clone();
        async move {
            let nodes = c
                .list_nodes(proto::v1::ListNodesRequest {})
                .await
                .ok()?
                .into_inner()
                .nodes;
            names
                .iter()
                .all(|n| {
                    nodes.iter().any(|v| {
                        v.node.as_ref().is_some_and(|i| i.name == *n) && v.status == status as i32
                    })
                })
                .then_some(())
        }
    })
    .await
    .is_some()
}

/// Writes a catalog TOML file.
pub fn write_catalog(path: &Path, toml: &str) {
    std::fs::write(path, toml).expect("write catalog");
}

/// The tiny model in the catalog, serving code and ask.
pub const TINY_CATALOG: &str = r#"
[[models]]
name = "tiny"
model_id = "tiny.gguf"
default_context = 256
min_context = 256
modes = ["code", "ask"]
"#;

/// Two started `speed` agents, halo1 and halo2, each holding the tiny
/// model, with `ports` instance ports each.
pub fn tiny_speed_pair(dir: &Path, ports: u16) -> [AgentNode; 2] {
    let mut nodes = [
        AgentNode::new(dir, "halo1", &["speed"], ports),
        AgentNode::new(dir, "halo2", &["speed"], ports),
    ];
    for n in &mut nodes {
        agent::gguf::fixtures::write_tiny_llama(&n.models.join("tiny.gguf"), 7)
            .expect("tiny model");
        n.start();
    }
    nodes
}

/// A controller (not yet started) on the embedded store in `dir`, knowing
/// `nodes` and the [`TINY_CATALOG`], with `extra` flags.
pub fn tiny_controller(dir: &Path, nodes: &[AgentNode], extra: &[&str]) -> ControllerProc {
    catalog_controller(dir, nodes, TINY_CATALOG, extra)
}

/// A controller (not yet started) on the embedded store in `dir`, knowing
/// `nodes` and the catalog `toml` (written to `dir/catalog.toml`), with
/// `extra` flags.
pub fn catalog_controller(
    dir: &Path,
    nodes: &[AgentNode],
    toml: &str,
    extra: &[&str],
) -> ControllerProc {
    let catalog = dir.join("catalog.toml");
    write_catalog(&catalog, toml);
    let node_list: Vec<String> = nodes
        .iter()
        .map(|n| format!("{}={}", n.name, n.address()))
        .collect();
    let mut args = vec![
        "--store-path".to_owned(),
        dir.join("state.json").display().to_string(),
        "--node".to_owned(),
        node_list.join(","),
        "--catalog".to_owned(),
        catalog.display().to_string(),
    ];
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    ControllerProc::new(dir, "controller", &args)
}

/// A chat completion through an endpoint with its API key.
pub fn chat(base_url: &str, api_key: &str, model: &str) -> anyhow::Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(60)))
        .build()
        .into();
    let body = serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 4,
    });
    let mut resp = agent
        .post(&format!("{base_url}/v1/chat/completions"))
        .header("Authorization", &format!("Bearer {api_key}"))
        .send_json(&body)?;
    let v: serde_json::Value = resp.body_mut().read_json()?;
    v["choices"][0]["message"]["content"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no content in {v}"))
}

/// The code-mode endpoint of `placement`, once its instance is ready.
pub async fn endpoint(
    c: &Client,
    placement: &str,
    timeout: Duration,
) -> Option<proto::v1::Endpoint> {
    eventually(timeout, || {
        let mut c = c.clone();
        async move {
            c.endpoints(proto::v1::EndpointsRequest {})
                .await
                .ok()?
                .into_inner()
                .endpoints
                .into_iter()
                .find(|e| e.placement == placement && e.mode == proto::v1::EditorMode::Code as i32)
        }
    })
    .await
}

/// Managed, not-stopped instances the controller sees on every node.
pub async fn live_instances(c: &mut Client) -> Vec<(String, v1::Instance)> {
    let nodes = c
        .list_nodes(v1::ListNodesRequest {})
        .await
        .expect("nodes")
        .into_inner()
        .nodes;
    nodes
        .into_iter()
        .flat_map(|n| {
            let name = n.node.map(|i| i.name).unwrap_or_default();
            n.instances
                .into_iter()
                .filter(|i| {
                    i.request_id.starts_with("halo.")
                        && i.state != v1::InstanceState::Stopped as i32
                })
                .map(move |i| (name.clone(), i))
        })
        .collect()
}
