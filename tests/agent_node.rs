//! One halo-agent as a real process (the `halo-agent-shim` bin of this
//! package) with its own temp dir, model dir (the tiny model), state dir
//! and ports, talking plaintext on loopback unless given `--tls-*` flags:
//! [`Node`], and the client calls and waits the agent tests share. Its log
//! and every instance's are printed when a test fails, and every
//! llama-server a node's agent started is killed when it is dropped.

use crate::{bin, free_port, free_range, llama_bin};
use agent::gguf::fixtures::write_tiny_llama;
use agent::procfs;
use proto::v1::{self, agent_service_client::AgentServiceClient};
use rustix::process::{Pid, Signal};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::LazyLock;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// The agent daemon binary of this package.
pub static AGENT: LazyLock<PathBuf> = LazyLock::new(|| bin("halo-agent-shim"));

pub type Client = AgentServiceClient<Channel>;

/// One agent's world: model dir, state dir, ports, and the running agent.
#[derive(Debug)]
pub struct Node {
    pub root: tempfile::TempDir,
    pub models: PathBuf,
    pub state: PathBuf,
    pub listen: u16,
    pub ports: (u16, u16),
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
    pub llama_server: PathBuf,
    pub agent: Option<Child>,
    pub runs: u32,
}

impl Node {
    /// A node with `tiny.gguf` in its model dir and `ports` instance ports.
    pub fn new(ports: u16) -> Node {
        let root = tempfile::tempdir().expect("tempdir");
        let models = root.path().join("models");
        std::fs::create_dir(&models).expect("mkdir models");
        write_tiny_llama(&models.join("tiny.gguf"), 7).expect("tiny model");
        let ports = free_range(ports);
        let listen = loop {
            let p = free_port();
            if !(ports.0..=ports.1).contains(&p) {
                break p;
            }
        };
        Node {
            state: root.path().join("state"),
            models,
            root,
            listen,
            ports,
            extra: Vec::new(),
            env: Vec::new(),
            llama_server: llama_bin("llama-server"),
            agent: None,
            runs: 0,
        }
    }

    pub fn command(&self) -> Command {
        self.command_listening_on(self.listen)
    }

    pub fn command_listening_on(&self, port: u16) -> Command {
        let mut cmd = Command::new(&*AGENT);
        cmd.arg("--node-name")
            .arg("test-node")
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--model-dir")
            .arg(&self.models)
            .arg("--llama-server")
            .arg(&self.llama_server)
            .arg("--port-range")
            .arg(format!("{}-{}", self.ports.0, self.ports.1))
            .arg("--state-dir")
            .arg(&self.state)
            .arg("--role")
            .arg("speed");
        // These tests talk to the agent alone, in plaintext on loopback;
        // the cluster tests and tests/tls.rs run it with certificates.
        if !self.extra.iter().any(|a| a == "--tls-cert") {
            cmd.arg("--insecure-loopback-only");
        }
        cmd.args(&self.extra)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("HALO_LOG", "info,agent=debug")
            .env_remove("HALO_AGENT_CONFIG");
        cmd
    }

    /// Starts the agent and connects to it.
    pub async fn start(&mut self) -> Client {
        assert!(self.agent.is_none(), "agent already running");
        self.runs += 1;
        let log = self.root.path().join(format!("agent-{}.log", self.runs));
        let out = std::fs::File::create(&log).expect("agent log");
        let err = out.try_clone().expect("agent log");
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("spawn halo-agent");
        self.agent = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("halo-agent exited with {status}:\n{}", self.logs());
            }
            if let Ok(c) = Client::connect(format!("http://127.0.0.1:{}", self.listen)).await {
                return c;
            }
            assert!(
                Instant::now() < deadline,
                "halo-agent did not serve:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the agent (its instances are not touched).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs the agent and waits (bounded) for its exit.
    pub fn sigterm(&mut self) -> ExitStatus {
        let mut c = self.agent.take().expect("agent running");
        signal_pid(c.id(), Signal::TERM);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(s) = c.try_wait().expect("wait") {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "agent ignored SIGTERM:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's logs of every run, then each instance's log.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for run in 1..=self.runs {
            let path = self.root.path().join(format!("agent-{run}.log"));
            s += &format!("----- agent run {run} -----\n");
            s += &std::fs::read_to_string(path).unwrap_or_default();
        }
        if let Ok(dirs) = std::fs::read_dir(self.state.join("instances")) {
            for log in dirs
                .filter_map(Result::ok)
                .flat_map(|d| ["llama-server.log", "rpc-server.log"].map(|f| d.path().join(f)))
            {
                let Ok(text) = std::fs::read_to_string(&log) else {
                    continue;
                };
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                s += &format!("----- {} (last 40 lines) -----\n", log.display());
                for l in tail.into_iter().rev() {
                    s += l;
                    s.push('\n');
                }
            }
        }
        s
    }

    /// Pids of live processes whose command line names this node's state
    /// dir (llama-servers) or that run in one of its instance dirs
    /// (ggml-rpc-servers).
    pub fn own_servers(&self) -> Vec<u32> {
        crate::live_processes_under(&self.state.join("instances"))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
        for pid in self.own_servers() {
            let _ = procfs::signal_group(pid, Signal::KILL);
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

pub fn signal_pid(pid: u32, sig: Signal) {
    if let Some(p) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = rustix::process::kill_process(p, sig);
    }
}

pub fn options(ctx: u32) -> v1::InstanceOptions {
    v1::InstanceOptions {
        context_size: ctx,
        parallel: 1,
        threads: Some(1),
        ..Default::default()
    }
}

pub fn start_request(
    request_id: &str,
    model: &str,
    options: v1::InstanceOptions,
) -> v1::StartInstanceRequest {
    v1::StartInstanceRequest {
        request_id: request_id.into(),
        model_id: model.into(),
        options: Some(options),
        generation: 1,
        leader_revision: 0,
        kind: 0,
        estimate_bytes: None,
    }
}

pub async fn watch(client: &mut Client, memory_period_ms: u32) -> tonic::Streaming<v1::AgentEvent> {
    let mut stream = client
        .watch(v1::WatchRequest { memory_period_ms })
        .await
        .expect("watch")
        .into_inner();
    let first = next_event(&mut stream).await;
    assert!(
        matches!(first.event, Some(v1::agent_event::Event::Snapshot(_))),
        "first event is not a snapshot: {first:?}"
    );
    stream
}

pub async fn next_event(stream: &mut tonic::Streaming<v1::AgentEvent>) -> v1::AgentEvent {
    tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("no event within 30 s")
        .expect("watch stream failed")
        .expect("watch stream ended")
}

/// Reads instance events for `id` until one satisfies `done`; returns it
/// and the states seen on the way.
pub async fn wait_instance(
    stream: &mut tonic::Streaming<v1::AgentEvent>,
    id: &str,
    done: impl Fn(&v1::Instance) -> bool,
) -> (v1::Instance, Vec<v1::InstanceState>) {
    let mut seen = Vec::new();
    loop {
        if let Some(v1::agent_event::Event::Instance(i)) = next_event(stream).await.event
            && i.id == id
        {
            seen.push(i.state());
            if done(&i) {
                return (i, seen);
            }
        }
    }
}

pub fn state_of(i: &v1::Instance) -> v1::InstanceState {
    i.state()
}

pub async fn list(client: &mut Client) -> Vec<v1::Instance> {
    client
        .list_instances(v1::ListInstancesRequest {})
        .await
        .expect("list instances")
        .into_inner()
        .instances
}

/// POST JSON with an optional bearer key: (status, body).
pub async fn post(
    url: String,
    key: Option<String>,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let mut req = agent.post(&url);
        if let Some(k) = key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut resp = req.send_json(&body).expect("http post");
        let status = resp.status().as_u16();
        let json = resp
            .body_mut()
            .read_json()
            .unwrap_or(serde_json::Value::Null);
        (status, json)
    })
    .await
    .expect("post task")
}

pub fn port_answers(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

pub fn alive(pid: u32) -> bool {
    procfs::identify(pid).is_some_and(procfs::is_alive)
}
