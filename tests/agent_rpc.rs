//! halo-agent's ggml-rpc-server instances with the real binaries: two
//! agents on loopback run the tiny model split across them (ggml-rpc-server
//! on B, `llama-server --rpc` on A) and answer a chat; the refusals of RPC
//! starts; the agent's proxy admitting only the allowed client; an RPC
//! server killed with SIGKILL failing without a restart; and re-adoption
//! after an agent restart. The harness is `tests::agent_node::Node`.

use proto::v1;
use rustix::process::Signal;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tests::agent_node::{
    Client, Node, alive, list, options, port_answers, post, signal_pid, start_request, state_of,
    wait_instance, watch,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::Code;

/// A start of an RPC server for split helper `id` that only `client` may use.
fn rpc_request(id: &str, client: &str, leader_revision: u64) -> v1::StartInstanceRequest {
    v1::StartInstanceRequest {
        request_id: id.into(),
        model_id: String::new(),
        options: Some(v1::InstanceOptions {
            rpc_client: client.into(),
            threads: Some(1),
            ..Default::default()
        }),
        generation: 1,
        leader_revision,
        kind: v1::InstanceKind::RpcServer as i32,
        estimate_bytes: None,
    }
}

/// The last `n` log lines of an instance, through TailLogs.
async fn tail(client: &mut Client, id: &str, n: u32) -> Vec<String> {
    let mut stream = client
        .tail_logs(v1::TailLogsRequest {
            instance_id: id.into(),
            lines: n,
            follow: false,
        })
        .await
        .expect("tail logs")
        .into_inner();
    let mut lines = Vec::new();
    while let Some(l) = stream.message().await.expect("log stream") {
        lines.push(l.line);
    }
    lines
}

/// The instances this agent started (other tests' llama-servers show as
/// unmanaged).
async fn managed(client: &mut Client) -> Vec<v1::Instance> {
    let mut all = list(client).await;
    all.retain(|i| i.state() != v1::InstanceState::Unmanaged);
    all
}

/// Pids of live processes with `dir` as their working directory.
fn running_in(dir: &std::path::Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/cwd")).is_ok_and(|d| d.starts_with(dir))
        })
        .filter(|&pid| alive(pid))
        .collect()
}

/// The loopback port ggml-rpc-server of pid listens on (its `-p`).
fn internal_port(pid: u32) -> u16 {
    let argv = agent::procfs::cmdline(pid).expect("cmdline");
    let at = argv.iter().position(|a| a == "-p").expect("-p");
    argv[at + 1].parse().expect("port")
}

/// Starts an RPC server (`rpc_request(args)`) and waits until it is Ready.
async fn ready_rpc(
    client: &mut Client,
    events: &mut tonic::Streaming<v1::AgentEvent>,
    request_id: &str,
    rpc_client: &str,
    leader_revision: u64,
) -> v1::Instance {
    let rpc = client
        .start_instance(rpc_request(request_id, rpc_client, leader_revision))
        .await
        .expect("start")
        .into_inner();
    wait_instance(events, &rpc.id, |i| state_of(i) == v1::InstanceState::Ready)
        .await
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_split_over_two_agents_answers_and_both_stop_without_a_trace() {
    let mut a = Node::new(4);
    let mut b = Node::new(4);
    let mut host = a.start().await;
    let mut helper = b.start().await;

    // The node reports its build: same binaries, same version line.
    let node_of = |r: v1::GetNodeResponse| r.node.expect("node");
    let na = node_of(
        host.get_node(v1::GetNodeRequest {})
            .await
            .expect("node")
            .into_inner(),
    );
    let nb = node_of(
        helper
            .get_node(v1::GetNodeRequest {})
            .await
            .expect("node")
            .into_inner(),
    );
    assert!(na.llama_version.starts_with("version"), "{na:?}");
    assert_eq!(na.llama_version, nb.llama_version);
    assert!(na.rpc_server_available && nb.rpc_server_available);
    // CPU-only build: `--list-devices` lists `(none)`.
    assert!(na.gpu_devices.is_empty(), "{:?}", na.gpu_devices);

    // B: the helper's RPC server, for A (127.0.0.1) only.
    let mut events_b = watch(&mut helper, 60_000).await;
    let t0 = Instant::now();
    let rpc = helper
        .start_instance(rpc_request("halo.tiny.r0s1.g1", "127.0.0.1", 1))
        .await
        .expect("start rpc server")
        .into_inner();
    assert_eq!(rpc.kind(), v1::InstanceKind::RpcServer);
    assert!(rpc.api_key.is_empty() && rpc.model_id.is_empty(), "{rpc:?}");
    let (rpc_ready, seen) = wait_instance(&mut events_b, &rpc.id, |i| {
        state_of(i) == v1::InstanceState::Ready || state_of(i) == v1::InstanceState::Failed
    })
    .await;
    let rpc_ready_after = t0.elapsed();
    assert_eq!(
        state_of(&rpc_ready),
        v1::InstanceState::Ready,
        "{}\n{}",
        rpc_ready.last_error,
        b.logs()
    );
    assert!(seen.contains(&v1::InstanceState::Loading), "{seen:?}");
    assert_eq!(rpc_ready.endpoint, format!("127.0.0.1:{}", rpc_ready.port));
    assert!((b.ports.0..=b.ports.1).contains(&(rpc_ready.port as u16)));
    let rpc_pid = rpc_ready.pid.expect("rpc pid");
    let internal = internal_port(rpc_pid);
    assert!(!(b.ports.0..=b.ports.1).contains(&internal));
    let oom = std::fs::read_to_string(format!("/proc/{rpc_pid}/oom_score_adj")).expect("oom");
    assert_eq!(
        oom.trim(),
        agent::supervisor::INSTANCE_OOM_SCORE_ADJ.to_string()
    );
    // Same environment rules as llama-server: nothing but the pass-through.
    let environ = std::fs::read(format!("/proc/{rpc_pid}/environ")).expect("environ");
    assert!(
        !environ
            .split(|&c| c == 0)
            .any(|v| v.starts_with(b"HALO_") || v.starts_with(b"LLAMA_ARG")),
        "environment not cleared"
    );
    // Its own process group.
    let stat = std::fs::read_to_string(format!("/proc/{rpc_pid}/stat")).expect("stat");
    let (_, fields) = stat.rsplit_once(')').expect("stat fields");
    let pgrp: u32 = fields
        .split_whitespace()
        .nth(2)
        .expect("pgrp")
        .parse()
        .expect("pgrp");
    assert_eq!(pgrp, rpc_pid);
    // Idempotent by request id.
    let again = helper
        .start_instance(rpc_request("halo.tiny.r0s1.g1", "127.0.0.1", 1))
        .await
        .expect("start again")
        .into_inner();
    assert_eq!(again.id, rpc.id);
    // Its memory is reported like a llama-server's.
    let listed = list(&mut helper).await;
    let me = listed.iter().find(|i| i.id == rpc.id).expect("listed");
    assert!(
        me.memory.as_ref().and_then(|m| m.rss_bytes).unwrap_or(0) > 0,
        "{me:?}"
    );

    // A: llama-server with every layer on B's RPC device.
    let mut events_a = watch(&mut host, 60_000).await;
    let t1 = Instant::now();
    let started = host
        .start_instance(v1::StartInstanceRequest {
            leader_revision: 1,
            ..start_request(
                "halo.tiny.r0.g1",
                "tiny.gguf",
                v1::InstanceOptions {
                    gpu_layers: Some(99),
                    rpc_servers: vec![rpc_ready.endpoint.clone()],
                    alias: "tiny".into(),
                    ..options(512)
                },
            )
        })
        .await
        .expect("start llama-server --rpc")
        .into_inner();
    let (ready, _) = wait_instance(&mut events_a, &started.id, |i| {
        state_of(i) == v1::InstanceState::Ready || state_of(i) == v1::InstanceState::Failed
    })
    .await;
    let host_ready_after = t1.elapsed();
    assert_eq!(
        state_of(&ready),
        v1::InstanceState::Ready,
        "{}\n{}",
        ready.last_error,
        a.logs()
    );
    eprintln!(
        "timing: StartInstance(rpc-server) → Ready {:.0} ms; StartInstance(llama-server --rpc) → Ready {:.0} ms",
        rpc_ready_after.as_secs_f64() * 1e3,
        host_ready_after.as_secs_f64() * 1e3
    );
    let (status, body) = post(
        format!("{}/v1/chat/completions", ready.endpoint),
        Some(ready.api_key.clone()),
        serde_json::json!({
            "model": "tiny",
            "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 8,
        }),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["choices"][0]["message"]["content"].is_string(),
        "{body}"
    );

    // The weights went to the RPC device: A's load log names its buffers,
    // B's server log its client.
    let host_log = tail(&mut host, &started.id, 1000).await;
    let rpc_dev = format!("RPC0[{}]", rpc_ready.endpoint);
    assert!(
        host_log
            .iter()
            .any(|l| l.contains(&rpc_dev) && l.contains("model buffer size")),
        "no `{rpc_dev} model buffer size` line:\n{}",
        host_log.join("\n")
    );
    // What A reports as its load is A's memory only: the weights mapped on
    // its CPU, no KV cache (it is all on B), its own compute buffer.
    let observed = ready.observed.expect("observed buffers");
    assert_eq!(observed.kv_bytes, Some(0), "{observed:?}");
    let model = observed.model_bytes.expect("model bytes");
    assert_eq!(Some(model), observed.mapped_model_bytes, "{observed:?}");
    assert!(model < 256 << 10, "{observed:?}");
    let rpc_log = tail(&mut helper, &rpc.id, 1000).await;
    assert!(
        rpc_log
            .iter()
            .any(|l| l.contains("Accepted client connection")),
        "{}",
        rpc_log.join("\n")
    );
    assert!(
        rpc_log
            .iter()
            .any(|l| l.contains("halo-agent: starting ggml-rpc-server")),
        "{}",
        rpc_log.join("\n")
    );

    // Stop the host, then the helper: nothing is left.
    let host_pid = ready.pid.expect("host pid");
    let stopped = host
        .stop_instance(v1::StopInstanceRequest {
            instance_id: started.id.clone(),
            leader_revision: 1,
        })
        .await
        .expect("stop host")
        .into_inner();
    assert_eq!(stopped.state(), v1::InstanceState::Stopped);
    let stopped = helper
        .stop_instance(v1::StopInstanceRequest {
            instance_id: rpc.id.clone(),
            leader_revision: 1,
        })
        .await
        .expect("stop rpc")
        .into_inner();
    assert_eq!(stopped.state(), v1::InstanceState::Stopped);
    assert!(!alive(host_pid) && !alive(rpc_pid));
    assert!(!port_answers(rpc_ready.port as u16), "proxy still listens");
    assert!(!port_answers(internal), "ggml-rpc-server still listens");
    assert!(a.own_servers().is_empty() && b.own_servers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rpc_server_starts_are_refused_with_the_right_code_and_spawn_nothing() {
    let mut node = Node::new(2);
    let mut client = node.start().await;
    let with = |f: &dyn Fn(&mut v1::StartInstanceRequest)| {
        let mut r = rpc_request("halo.big.r0s1.g1", "127.0.0.1", 3);
        f(&mut r);
        r
    };
    let cases: Vec<(&str, v1::StartInstanceRequest, Code, &str)> = vec![
        (
            "no leader revision",
            with(&|r| r.leader_revision = 0),
            Code::FailedPrecondition,
            "leader",
        ),
        (
            "a model id",
            with(&|r| r.model_id = "tiny.gguf".into()),
            Code::InvalidArgument,
            "model_id",
        ),
        (
            "no allowed client",
            with(&|r| r.options.as_mut().expect("options").rpc_client.clear()),
            Code::InvalidArgument,
            "rpc_client",
        ),
        (
            "a garbage client",
            with(&|r| r.options.as_mut().expect("options").rpc_client = "10.0.0.x".into()),
            Code::InvalidArgument,
            "rpc_client",
        ),
        (
            "an unspecified client",
            with(&|r| r.options.as_mut().expect("options").rpc_client = "0.0.0.0".into()),
            Code::InvalidArgument,
            "rpc_client",
        ),
        (
            "a request id the controller does not make",
            with(&|r| r.request_id = "req-1".into()),
            Code::InvalidArgument,
            "request_id",
        ),
        (
            "a llama-server's request id",
            with(&|r| r.request_id = "halo.big.r0.g1".into()),
            Code::InvalidArgument,
            "request_id",
        ),
        (
            "llama-server options",
            with(&|r| {
                r.options.as_mut().expect("options").rpc_servers = vec!["127.0.0.1:9".into()];
            }),
            Code::InvalidArgument,
            "rpc_servers",
        ),
        (
            "an unknown kind",
            with(&|r| r.kind = 42),
            Code::InvalidArgument,
            "kind",
        ),
        (
            "a llama-server with an RPC client",
            v1::StartInstanceRequest {
                options: Some(v1::InstanceOptions {
                    rpc_client: "127.0.0.1".into(),
                    ..options(256)
                }),
                ..start_request("halo.tiny.r0.g1", "tiny.gguf", options(256))
            },
            Code::InvalidArgument,
            "rpc_client",
        ),
    ];
    for (what, req, code, names) in cases {
        let e = client.start_instance(req).await.expect_err(what);
        assert_eq!(e.code(), code, "{what}: {}", e.message());
        assert!(e.message().contains(names), "{what}: {}", e.message());
    }
    // A revision below one seen (a stop from leader 5 was seen).
    let _ = client
        .stop_instance(v1::StopInstanceRequest {
            instance_id: "i-none".into(),
            leader_revision: 5,
        })
        .await
        .expect_err("unknown instance");
    let e = client
        .start_instance(rpc_request("halo.big.r0s1.g1", "127.0.0.1", 4))
        .await
        .expect_err("stale");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    assert!(
        e.message().contains("stale leader revision 4"),
        "{}",
        e.message()
    );

    assert!(managed(&mut client).await.is_empty());
    assert!(running_in(&node.state).is_empty());
    assert!(node.own_servers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_ggml_rpc_server_says_so_and_refuses_naming_the_path() {
    use std::os::unix::fs::PermissionsExt;
    let mut node = Node::new(2);
    // A llama-server wrapper in a directory without ggml-rpc-server.
    let bin = node.root.path().join("bin");
    std::fs::create_dir(&bin).expect("mkdir");
    let wrapper = bin.join("llama-server");
    std::fs::write(
        &wrapper,
        format!("#!/bin/sh\nexec {:?} \"$@\"\n", node.llama_server),
    )
    .expect("wrapper");
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    node.llama_server = wrapper;
    let mut client = node.start().await;
    let n = client
        .get_node(v1::GetNodeRequest {})
        .await
        .expect("node")
        .into_inner()
        .node
        .expect("node");
    assert!(!n.rpc_server_available);
    assert!(n.llama_version.starts_with("version"), "{n:?}");
    let e = client
        .start_instance(rpc_request("halo.big.r0s1.g1", "127.0.0.1", 1))
        .await
        .expect_err("no rpc server");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let looked = bin
        .canonicalize()
        .expect("canonical")
        .join("ggml-rpc-server");
    assert!(
        e.message().contains(&looked.display().to_string()),
        "{}",
        e.message()
    );
    assert!(managed(&mut client).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rpc_server_fails_with_the_signal_and_is_not_restarted() {
    let mut node = Node::new(2);
    node.extra = vec!["--restart-backoff-ms".into(), "50".into()];
    let mut client = node.start().await;
    let mut events = watch(&mut client, 60_000).await;
    let ready = ready_rpc(&mut client, &mut events, "halo.big.r0s1.g1", "127.0.0.1", 1).await;
    let rpc = ready.clone();
    let pid = ready.pid.expect("pid");
    signal_pid(pid, Signal::KILL);
    let (failed, _) = wait_instance(&mut events, &rpc.id, |i| {
        state_of(i) == v1::InstanceState::Failed
    })
    .await;
    assert!(
        failed
            .last_error
            .contains("ggml-rpc-server was killed by signal 9 (SIGKILL)"),
        "{}",
        failed.last_error
    );
    assert_eq!(failed.pid, None);
    // Many back-off periods later: still failed, nothing new runs, and the
    // proxy no longer listens.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let now = list(&mut client).await;
    let me = now.iter().find(|i| i.id == rpc.id).expect("listed");
    assert_eq!(me.state(), v1::InstanceState::Failed);
    assert_eq!((me.restart_count, me.pid), (0, None));
    // Its proxy ends too: by itself within a poll, else the agent ends it.
    assert!(
        tests::wait_for(Duration::from_secs(10), || running_in(&node.state)
            .is_empty()
            .then_some(()))
        .is_some(),
        "still running: {:?}",
        running_in(&node.state)
    );
    assert!(!port_answers(ready.port as u16));
    // An agent restart leaves it failed and does not start it again.
    node.kill9();
    let mut client = node.start().await;
    let now = managed(&mut client).await;
    let me = now.iter().find(|i| i.id == rpc.id).expect("listed");
    assert_eq!(me.state(), v1::InstanceState::Failed);
    assert!(
        me.last_error.contains("killed by signal 9"),
        "{}",
        me.last_error
    );
    assert_eq!((me.restart_count, me.pid), (0, None));
    assert!(
        tests::wait_for(Duration::from_secs(10), || running_in(&node.state)
            .is_empty()
            .then_some(()))
        .is_some(),
        "{:?}",
        running_in(&node.state)
    );
    // A stop of the failed server completes at once.
    let t = Instant::now();
    let stopped = client
        .stop_instance(v1::StopInstanceRequest {
            instance_id: rpc.id.clone(),
            leader_revision: 1,
        })
        .await
        .expect("stop")
        .into_inner();
    assert_eq!(stopped.state(), v1::InstanceState::Stopped);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_allowed_client_reaches_the_rpc_server_and_it_survives_an_agent_restart() {
    let mut node = Node::new(2);
    let mut client = node.start().await;
    let mut events = watch(&mut client, 60_000).await;
    // Only 127.0.0.9 may connect (loopback answers on all of 127/8).
    let ready = ready_rpc(&mut client, &mut events, "halo.big.r0s1.g1", "127.0.0.9", 1).await;
    let rpc = ready.clone();
    let pid = ready.pid.expect("pid");
    let public: SocketAddr = ready.endpoint.parse().expect("endpoint");

    // From 127.0.0.1: closed at once, before any byte of RPC.
    let mut s = tokio::net::TcpStream::connect(public)
        .await
        .expect("connect");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the proxy answered a refused client");
    // From 127.0.0.9: forwarded (ggml-rpc-server logs the client).
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind("127.0.0.9:0".parse().expect("addr"))
        .expect("bind");
    let mut s = sock.connect(public).await.expect("connect allowed");
    s.write_all(&[0xff]).await.expect("write");
    drop(s);
    let log_has = |lines: &[String], text: &str| lines.iter().any(|l| l.contains(text));
    let deadline = Instant::now() + Duration::from_secs(10);
    let lines = loop {
        let lines = tail(&mut client, &rpc.id, 1000).await;
        if log_has(&lines, "refused an RPC connection from 127.0.0.1")
            && log_has(&lines, "Accepted client connection")
        {
            break lines;
        }
        assert!(Instant::now() < deadline, "{}", lines.join("\n"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The refused connection never reached the server: one client only
    // (the agent's readiness probe goes to the loopback port, not through
    // the proxy, and is the other accepted connection).
    let accepted = lines
        .iter()
        .filter(|l| l.contains("Accepted client connection"))
        .count();
    assert!(accepted <= 2, "{}", lines.join("\n"));

    // kill -9 of the agent: the server runs on; the new agent re-adopts it
    // as an RPC server and listens for its client again.
    node.kill9();
    assert!(alive(pid));
    let mut client = node.start().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let me = loop {
        let now = list(&mut client).await;
        if let Some(me) = now
            .into_iter()
            .find(|i| i.id == rpc.id && state_of(i) == v1::InstanceState::Ready)
        {
            break me;
        }
        assert!(
            Instant::now() < deadline,
            "not re-adopted:\n{}",
            node.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(me.kind(), v1::InstanceKind::RpcServer);
    assert_eq!((me.pid, me.restart_count), (Some(pid), 0));
    assert_eq!(me.endpoint, ready.endpoint);
    assert!(
        port_answers(public.port()),
        "the proxy does not listen again"
    );
    let stopped = client
        .stop_instance(v1::StopInstanceRequest {
            instance_id: rpc.id.clone(),
            leader_revision: 1,
        })
        .await
        .expect("stop")
        .into_inner();
    assert_eq!(stopped.state(), v1::InstanceState::Stopped);
    assert!(!alive(pid));
    assert!(running_in(&node.state).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rpc_server_gone_while_its_agent_was_down_is_failed_not_restarted() {
    let mut node = Node::new(2);
    let mut client = node.start().await;
    let mut events = watch(&mut client, 60_000).await;
    let ready = ready_rpc(&mut client, &mut events, "halo.big.r0s1.g1", "127.0.0.1", 1).await;
    let rpc = ready.clone();
    let pid = ready.pid.expect("pid");
    node.kill9();
    signal_pid(pid, Signal::KILL);
    assert!(
        tests::wait_for(Duration::from_secs(5), || (!alive(pid)).then_some(())).is_some(),
        "pid {pid} survived SIGKILL"
    );
    let mut client = node.start().await;
    let now = managed(&mut client).await;
    let me = now.iter().find(|i| i.id == rpc.id).expect("listed");
    assert_eq!(me.state(), v1::InstanceState::Failed);
    assert!(
        me.last_error.contains(&format!(
            "ggml-rpc-server (pid {pid}) was gone when the agent started"
        )),
        "{}",
        me.last_error
    );
    assert_eq!((me.restart_count, me.pid), (0, None));
    // The orphaned proxy exits on its own or is ended by the agent's task
    // for this record, which runs just after the agent starts serving.
    assert!(
        tests::wait_for(Duration::from_secs(10), || running_in(&node.state)
            .is_empty()
            .then_some(()))
        .is_some(),
        "a process of the failed RPC server still runs: {:?}",
        running_in(&node.state)
    );
    assert!(!port_answers(ready.port as u16));
    let stopped = client
        .stop_instance(v1::StopInstanceRequest {
            instance_id: rpc.id.clone(),
            leader_revision: 1,
        })
        .await
        .expect("stop")
        .into_inner();
    assert_eq!(stopped.state(), v1::InstanceState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_keeps_answering_across_a_restart_of_the_helpers_agent() {
    let mut a = Node::new(2);
    let mut b = Node::new(2);
    a.extra = vec!["--restart-backoff-ms".into(), "100".into()];
    let mut host = a.start().await;
    let mut helper = b.start().await;
    let mut events_b = watch(&mut helper, 60_000).await;
    let rpc = helper
        .start_instance(rpc_request("halo.tiny.r0s1.g1", "127.0.0.1", 1))
        .await
        .expect("start rpc server")
        .into_inner();
    let (rpc_ready, _) = wait_instance(&mut events_b, &rpc.id, |i| {
        state_of(i) == v1::InstanceState::Ready
    })
    .await;
    let mut events_a = watch(&mut host, 60_000).await;
    let started = host
        .start_instance(v1::StartInstanceRequest {
            leader_revision: 1,
            ..start_request(
                "halo.tiny.r0.g1",
                "tiny.gguf",
                v1::InstanceOptions {
                    gpu_layers: Some(99),
                    rpc_servers: vec![rpc_ready.endpoint.clone()],
                    ..options(512)
                },
            )
        })
        .await
        .expect("start host")
        .into_inner();
    let (ready, _) = wait_instance(&mut events_a, &started.id, |i| {
        state_of(i) == v1::InstanceState::Ready
    })
    .await;
    let url = format!("{}/v1/chat/completions", ready.endpoint);
    let key = ready.api_key.clone();
    // The status of one chat, or None when the connection fails.
    let chat = move || {
        let (url, key) = (url.clone(), key.clone());
        async move {
            tokio::task::spawn_blocking(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(10)))
                    .build()
                    .into();
                agent
                    .post(&url)
                    .header("Authorization", format!("Bearer {key}"))
                    .send_json(serde_json::json!({
                        "messages": [{"role": "user", "content": "Hi"}],
                        "max_tokens": 4,
                    }))
                    .ok()
                    .map(|r| r.status().as_u16())
            })
            .await
            .ok()
            .flatten()
        }
    };
    assert_eq!(chat().await, Some(200));

    // The helper's agent dies and comes back: the RPC server and its proxy
    // process run on, and so does the host's connection through it.
    b.kill9();
    let t = Instant::now();
    let _helper = b.start().await;
    assert_eq!(chat().await, Some(200), "{}", a.logs());
    let after = host
        .list_instances(v1::ListInstancesRequest {})
        .await
        .expect("list")
        .into_inner()
        .instances
        .into_iter()
        .find(|i| i.id == started.id)
        .expect("host instance");
    assert_eq!(
        (after.state(), after.restart_count, after.pid),
        (v1::InstanceState::Ready, 0, ready.pid),
        "{}",
        after.last_error
    );
    eprintln!(
        "helper agent restart: chat answered {:.0} ms after the kill, host not restarted",
        t.elapsed().as_secs_f64() * 1e3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_rpc_proxy_fails_the_instance_and_ends_its_server() {
    let mut node = Node::new(2);
    let mut client = node.start().await;
    let mut events = watch(&mut client, 60_000).await;
    let ready = ready_rpc(&mut client, &mut events, "halo.big.r0s1.g1", "127.0.0.1", 1).await;
    let rpc = ready.clone();
    let server = ready.pid.expect("pid");
    let pair = running_in(&node.state);
    assert_eq!(pair.len(), 2, "server and proxy: {pair:?}");
    let proxy = pair.into_iter().find(|&p| p != server).expect("proxy");
    // The proxy is the agent's binary, in the server's process group.
    let argv = agent::procfs::cmdline(proxy).expect("cmdline");
    assert_eq!(argv[1], "__rpc-proxy", "{argv:?}");
    let stat = std::fs::read_to_string(format!("/proc/{proxy}/stat")).expect("stat");
    let (_, fields) = stat.rsplit_once(')').expect("stat fields");
    let pgrp: u32 = fields
        .split_whitespace()
        .nth(2)
        .expect("pgrp")
        .parse()
        .expect("pgrp");
    assert_eq!(pgrp, server);

    signal_pid(proxy, Signal::KILL);
    let (failed, _) = wait_instance(&mut events, &rpc.id, |i| {
        state_of(i) == v1::InstanceState::Failed
    })
    .await;
    assert!(
        failed
            .last_error
            .contains("the RPC proxy was killed by signal 9 (SIGKILL)"),
        "{}",
        failed.last_error
    );
    assert!(!alive(server), "the server outlived its proxy");
    assert!(running_in(&node.state).is_empty());
    let stopped = client
        .stop_instance(v1::StopInstanceRequest {
            instance_id: rpc.id.clone(),
            leader_revision: 1,
        })
        .await
        .expect("stop")
        .into_inner();
    assert_eq!(stopped.state(), v1::InstanceState::Stopped);
}
