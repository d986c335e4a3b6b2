//! halo-agent as a real process (the `halo-agent-shim` bin of this package)
//! driving the real llama-server on the tiny model, over loopback, through
//! the gRPC client from `proto`. Each test gets its own temp dir, ports and
//! state dir; the agent's and every instance's logs are printed when a test
//! fails, and every llama-server a test's agent started is killed at the end.

use proto::v1;
use rustix::process::Signal;
use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};
use tests::agent_node::{
    AGENT, Client, Node, alive, list, next_event, options, port_answers, post, signal_pid,
    start_request, state_of, wait_instance, watch,
};
use tests::free_port;
use tonic::Code;
use tonic::transport::Channel;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_goes_loading_then_ready_answers_with_its_key_and_stops_without_a_trace() {
    let mut node = Node::new(4);
    let mut client = node.start().await;
    // The standard health service says the agent serves.
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", node.listen))
        .expect("uri")
        .connect()
        .await
        .expect("channel");
    let health_channel = channel.clone();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "halo.v1.AgentService".into(),
        })
        .await
        .expect("health check")
        .into_inner();
    assert_eq!(
        status.status(),
        tonic_health::pb::health_check_response::ServingStatus::Serving
    );
    // Reflection lists the agent's service.
    {
        use tonic_reflection::pb::v1::{
            ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        };
        let mut reflection = ServerReflectionClient::new(health_channel.clone());
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = reflection
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .expect("reflection")
            .into_inner();
        let answer = answers
            .message()
            .await
            .expect("reflection answer")
            .expect("one answer");
        let Some(MessageResponse::ListServicesResponse(list)) = answer.message_response else {
            panic!("not a service list: {answer:?}");
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.contains(&"halo.v1.AgentService".to_owned()),
            "{names:?}"
        );
    }
    let mut events = watch(&mut client, 200).await;

    let started = client
        .start_instance(start_request(
            "req-1",
            "tiny.gguf",
            v1::InstanceOptions {
                alias: "tiny".into(),
                ..options(512)
            },
        ))
        .await
        .expect("start")
        .into_inner();
    assert!((node.ports.0..=node.ports.1).contains(&(started.port as u16)));
    let (ready, seen) = wait_instance(&mut events, &started.id, |i| {
        state_of(i) == v1::InstanceState::Ready
    })
    .await;
    let loading = seen.iter().position(|s| *s == v1::InstanceState::Loading);
    assert!(loading.is_some(), "Loading not seen before Ready: {seen:?}");
    let pid = ready.pid.expect("ready instance has a pid");
    // An out-of-memory kill picks the instance, never the agent.
    let oom = std::fs::read_to_string(format!("/proc/{pid}/oom_score_adj")).expect("oom_score_adj");
    assert_eq!(
        oom.trim(),
        agent::supervisor::INSTANCE_OOM_SCORE_ADJ.to_string()
    );
    // Buffer sizes parsed from the real load log.
    let observed = ready.observed.expect("observed buffers");
    assert!(
        observed.model_bytes.is_some_and(|b| b > 400_000),
        "{observed:?}"
    );
    assert!(
        observed.kv_bytes.is_some_and(|b| b > 0) && observed.compute_bytes.is_some_and(|b| b > 0),
        "{observed:?}"
    );

    // The instance answers, but only with its key.
    let base = ready.endpoint.clone();
    let key = Some(ready.api_key.clone());
    let body = serde_json::json!({"prompt": "Hello", "n_predict": 4});
    let (status, _) = post(format!("{base}/completion"), None, body.clone()).await;
    assert_eq!(status, 401, "no key must be refused");
    let (status, completion) = post(format!("{base}/completion"), key.clone(), body).await;
    assert_eq!(status, 200, "{completion}");
    assert!(completion["content"].is_string(), "{completion}");
    let (status, chat) = post(
        format!("{base}/v1/chat/completions"),
        key,
        serde_json::json!({"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200, "{chat}");
    assert!(
        chat["choices"][0]["message"]["content"].is_string(),
        "{chat}"
    );
    // Browsers: a page from another site is not let in; one served from
    // this machine is, and never with credentials.
    let cors = |origin: &'static str| {
        let url = format!("{base}/health");
        tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let resp = agent
                .get(&url)
                .header("Origin", origin)
                .call()
                .expect("health");
            let h = |n: &str| {
                resp.headers()
                    .get(n)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            (
                h("access-control-allow-origin"),
                h("access-control-allow-credentials"),
            )
        })
    };
    let (allow, _) = cors("https://evil.example").await.expect("cors task");
    assert_eq!(allow, None, "another site's page let in");
    let (allow, _) = cors("http://localhost:3000").await.expect("cors task");
    assert_eq!(allow.as_deref(), Some("http://localhost:3000"));

    // Memory samples on the stream carry the instance's process.
    loop {
        if let Some(v1::agent_event::Event::Memory(m)) = next_event(&mut events).await.event {
            let p = m
                .processes
                .iter()
                .find(|p| p.pid == pid)
                .expect("instance in memory sample");
            assert!(p.rss_bytes.unwrap_or(0) > 0, "{p:?}");
            break;
        }
    }
    let listed = list(&mut client).await;
    let me = listed.iter().find(|i| i.id == started.id).expect("listed");
    assert!(
        me.memory.as_ref().and_then(|m| m.rss_bytes).unwrap_or(0) > 0,
        "{me:?}"
    );

    // A retried start is the same instance, never a second process.
    let again = client
        .start_instance(start_request(
            "req-1",
            "tiny.gguf",
            v1::InstanceOptions {
                alias: "tiny".into(),
                ..options(512)
            },
        ))
        .await
        .expect("retried start")
        .into_inner();
    assert_eq!(
        (again.id.as_str(), again.pid),
        (started.id.as_str(), Some(pid))
    );
    assert_eq!(node.own_servers(), vec![pid]);

    // The load log is tailed.
    let mut tail = client
        .tail_logs(v1::TailLogsRequest {
            instance_id: started.id.clone(),
            lines: 1000,
            follow: false,
        })
        .await
        .expect("tail")
        .into_inner();
    let mut lines = Vec::new();
    while let Some(l) = tail.message().await.expect("tail stream") {
        lines.push(l.line);
    }
    assert!(
        lines.iter().any(|l| l.contains("model buffer size")),
        "{lines:#?}"
    );

    // Following the log shows new lines as the server writes them, and
    // ends when the instance stops.
    let mut follow = client
        .tail_logs(v1::TailLogsRequest {
            instance_id: started.id.clone(),
            lines: 0,
            follow: true,
        })
        .await
        .expect("follow")
        .into_inner();
    let (status, _) = post(
        format!("{base}/completion"),
        Some(ready.api_key.clone()),
        serde_json::json!({"prompt": "Again", "n_predict": 2}),
    )
    .await;
    assert_eq!(status, 200);
    loop {
        let l = tokio::time::timeout(Duration::from_secs(10), follow.message())
            .await
            .expect("no new log line within 10 s")
            .expect("follow stream")
            .expect("follow stream ended early");
        if l.line.contains("prompt eval time") {
            break;
        }
    }

    // Stop: process and port gone; a second stop is a no-op.
    let stopped = client
        .stop_instance(v1::StopInstanceRequest {
            instance_id: started.id.clone(),
            leader_revision: 0,
        })
        .await
        .expect("stop")
        .into_inner();
    assert_eq!(stopped.state(), v1::InstanceState::Stopped);
    assert_eq!(stopped.pid, None);
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while let Ok(Some(_)) = follow.message().await {}
    })
    .await;
    assert!(
        ended.is_ok(),
        "the follow stream did not end after the stop"
    );
    assert!(!alive(pid), "llama-server {pid} still alive after stop");
    assert!(
        !port_answers(ready.port as u16),
        "port still answers after stop"
    );
    assert!(node.own_servers().is_empty());
    let again = client
        .stop_instance(v1::StopInstanceRequest {
            instance_id: started.id.clone(),
            leader_revision: 0,
        })
        .await
        .expect("second stop")
        .into_inner();
    assert_eq!(again.state(), v1::InstanceState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_llama_server_fails_with_the_signal_and_is_restarted_after_a_back_off() {
    let mut node = Node::new(2);
    let mut client = node.start().await;
    let mut events = watch(&mut client, 60_000).await;
    let started = client
        .start_instance(start_request("req-1", "tiny.gguf", options(256)))
        .await
        .expect("start")
        .into_inner();
    let (ready, _) = wait_instance(&mut events, &started.id, |i| {
        state_of(i) == v1::InstanceState::Ready
    })
    .await;
    let pid = ready.pid.expect("pid");

    signal_pid(pid, Signal::KILL);
    let killed_at = Instant::now();
    let (failed, _) = wait_instance(&mut events, &started.id, |i| {
        state_of(i) == v1::InstanceState::Failed
    })
    .await;
    assert!(
        failed.last_error.contains("killed by signal 9 (SIGKILL)"),
        "{}",
        failed.last_error
    );
    // The reason quotes the log's last lines.
    assert!(
        failed.last_error.contains("last log lines:"),
        "{}",
        failed.last_error
    );
    let (again, _) = wait_instance(&mut events, &started.id, |i| {
        state_of(i) == v1::InstanceState::Ready
    })
    .await;
    let waited = killed_at.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "restarted after only {waited:?}"
    );
    assert_eq!(again.restart_count, 1);
    let new_pid = again.pid.expect("pid");
    assert_ne!(new_pid, pid);
    assert!(alive(new_pid));
    assert_eq!(node.own_servers(), vec![new_pid]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_restarting_ten_times_leaves_the_same_llama_server_serving() {
    let mut node = Node::new(2);
    let mut client = node.start().await;
    let mut events = watch(&mut client, 60_000).await;
    let started = client
        .start_instance(start_request("req-1", "tiny.gguf", options(256)))
        .await
        .expect("start")
        .into_inner();
    let (ready, _) = wait_instance(&mut events, &started.id, |i| {
        state_of(i) == v1::InstanceState::Ready
    })
    .await;
    let pid = ready.pid.expect("pid");
    let health = format!("{}/health", ready.endpoint);
    drop(events);

    // A graceful stop first: exit 0, and the instance is left running.
    let status = node.sigterm();
    assert_eq!(status.code(), Some(0), "{}", node.logs());
    assert_eq!(tests::http_status(&health), Some(200));

    for round in 0..10 {
        let t0 = Instant::now();
        let mut client = node.start().await;
        let me = loop {
            let listed = list(&mut client).await;
            let me = listed
                .into_iter()
                .find(|i| i.id == started.id)
                .expect("instance kept");
            if me.state() == v1::InstanceState::Ready {
                break me;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "round {round}: not Ready within 5 s: {me:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "round {round}: {:?}",
            t0.elapsed()
        );
        assert_eq!(me.pid, Some(pid), "round {round}: a different process");
        assert_eq!(me.restart_count, 0, "round {round}: the instance restarted");
        assert!(me.last_error.is_empty(), "round {round}: {}", me.last_error);
        node.kill9();
        // llama-server never notices: it writes to a file, not a pipe.
        assert_eq!(tests::http_status(&health), Some(200), "round {round}");
    }
    assert_eq!(node.own_servers(), vec![pid]);

    // The re-adopted instance is still ours to stop.
    let mut client = node.start().await;
    let stopped = client
        .stop_instance(v1::StopInstanceRequest {
            instance_id: started.id.clone(),
            leader_revision: 0,
        })
        .await
        .expect("stop")
        .into_inner();
    assert_eq!(stopped.state(), v1::InstanceState::Stopped);
    assert!(!alive(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let mut node = Node::new(1);
    let full = std::fs::read(node.models.join("tiny.gguf")).expect("read");
    std::fs::write(node.models.join("cut.gguf"), &full[..full.len() / 2]).expect("cut");
    let outside = node.root.path().join("outside.gguf");
    std::fs::write(&outside, &full).expect("outside");
    std::os::unix::fs::symlink(&outside, node.models.join("escape.gguf")).expect("symlink");
    node.extra = vec!["--allow-flag=--jinja".into()];
    let mut client = node.start().await;

    let models = client
        .list_models(v1::ListModelsRequest { rescan: true })
        .await
        .expect("models")
        .into_inner()
        .models;
    let cut = models
        .iter()
        .find(|m| m.id == "cut.gguf")
        .expect("cut listed");
    match &cut.status {
        Some(v1::model_file::Status::Broken(r)) => {
            assert!(r.starts_with("cut.gguf: at byte"), "{r}")
        }
        other => panic!("cut.gguf not broken: {other:?}"),
    }
    assert!(matches!(
        models.iter().find(|m| m.id == "tiny.gguf").and_then(|m| m.status.as_ref()),
        Some(v1::model_file::Status::Params(p)) if p.context_length == 2048
    ));

    let outside_path = outside.display().to_string();
    let cases: Vec<(&str, v1::StartInstanceRequest, Code, &str)> = vec![
        (
            "unknown id",
            start_request("a", "nope.gguf", options(256)),
            Code::NotFound,
            "unknown model id",
        ),
        (
            "dot-dot",
            start_request("b", "../outside.gguf", options(256)),
            Code::InvalidArgument,
            "`..`",
        ),
        (
            "absolute",
            start_request("c", &outside_path, options(256)),
            Code::InvalidArgument,
            "absolute",
        ),
        (
            "nul",
            start_request("d", "tiny.gguf\0x", options(256)),
            Code::InvalidArgument,
            "NUL",
        ),
        (
            "escaping symlink",
            start_request("e", "escape.gguf", options(256)),
            Code::FailedPrecondition,
            "outside the model directories",
        ),
        (
            "truncated file",
            start_request("f", "cut.gguf", options(256)),
            Code::FailedPrecondition,
            "broken",
        ),
        (
            "over trained context",
            start_request("g", "tiny.gguf", options(4096)),
            Code::InvalidArgument,
            "trained context 2048",
        ),
        (
            "disallowed flag",
            start_request(
                "h",
                "tiny.gguf",
                v1::InstanceOptions {
                    extra_flags: vec!["--rpc 10.0.0.9:50052".into()],
                    ..options(256)
                },
            ),
            Code::InvalidArgument,
            "not in this agent's allow-list [--jinja]",
        ),
        (
            "out of range option",
            start_request(
                "i",
                "tiny.gguf",
                v1::InstanceOptions {
                    threads: Some(0),
                    ..options(256)
                },
            ),
            Code::InvalidArgument,
            "threads",
        ),
        (
            "no request id",
            start_request("", "tiny.gguf", options(256)),
            Code::InvalidArgument,
            "request_id",
        ),
    ];
    for (what, req, code, text) in cases {
        let e = client.start_instance(req).await.expect_err(what);
        assert_eq!(e.code(), code, "{what}: {}", e.message());
        assert!(e.message().contains(text), "{what}: {}", e.message());
    }
    assert!(
        list(&mut client)
            .await
            .iter()
            .all(|i| i.state() == v1::InstanceState::Unmanaged)
    );
    assert!(
        node.own_servers().is_empty(),
        "a refused request spawned something"
    );

    // Over the trained context is fine when asked for; it takes the only port.
    let over = client
        .start_instance(start_request(
            "over",
            "tiny.gguf",
            v1::InstanceOptions {
                allow_context_over_trained: true,
                extra_flags: vec!["--jinja".into()],
                ..options(4096)
            },
        ))
        .await
        .expect("allowed over-trained start")
        .into_inner();
    let e = client
        .start_instance(start_request("full", "tiny.gguf", options(256)))
        .await
        .expect_err("port range exhausted");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    assert!(
        e.message().contains(&format!(
            "no free port in {}-{}",
            node.ports.0, node.ports.1
        )),
        "{}",
        e.message()
    );
    // A request id reused for something else.
    let e = client
        .start_instance(start_request("over", "tiny.gguf", options(256)))
        .await
        .expect_err("reused request id");
    assert_eq!(e.code(), Code::AlreadyExists, "{}", e.message());
    // Fencing: a revision is remembered, an older one refused.
    let mut fenced = start_request(
        "over",
        "tiny.gguf",
        v1::InstanceOptions {
            allow_context_over_trained: true,
            extra_flags: vec!["--jinja".into()],
            ..options(4096)
        },
    );
    fenced.leader_revision = 5;
    assert_eq!(
        client
            .start_instance(fenced.clone())
            .await
            .expect("rev 5")
            .into_inner()
            .id,
        over.id
    );
    fenced.leader_revision = 4;
    let e = client
        .start_instance(fenced)
        .await
        .expect_err("stale revision");
    assert_eq!(e.code(), Code::FailedPrecondition, "{}", e.message());
    let e = client
        .stop_instance(v1::StopInstanceRequest {
            instance_id: "i-doesnotexist".into(),
            leader_revision: 5,
        })
        .await
        .expect_err("unknown instance");
    assert_eq!(e.code(), Code::NotFound);

    let managed: Vec<v1::Instance> = list(&mut client)
        .await
        .into_iter()
        .filter(|i| i.state() != v1::InstanceState::Unmanaged)
        .collect();
    assert_eq!(managed.len(), 1, "{managed:?}");
    assert_eq!(node.own_servers().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_on_one_machine_leave_each_other_alone() {
    let mut a = Node::new(2);
    let mut b = Node::new(2);
    let mut ca = a.start().await;
    let mut cb = b.start().await;
    let mut ea = watch(&mut ca, 60_000).await;
    let mut eb = watch(&mut cb, 60_000).await;
    let ia = ca
        .start_instance(start_request("r", "tiny.gguf", options(256)))
        .await
        .expect("start a")
        .into_inner();
    let ib = cb
        .start_instance(start_request("r", "tiny.gguf", options(256)))
        .await
        .expect("start b")
        .into_inner();
    let (ra, _) = wait_instance(&mut ea, &ia.id, |i| state_of(i) == v1::InstanceState::Ready).await;
    let (rb, _) = wait_instance(&mut eb, &ib.id, |i| state_of(i) == v1::InstanceState::Ready).await;
    let (pa, pb) = (ra.pid.expect("pid a"), rb.pid.expect("pid b"));

    // Each sees the other's server as unmanaged, and cannot stop it.
    let seen_by_a = list(&mut ca).await;
    let foreign = seen_by_a
        .iter()
        .find(|i| i.pid == Some(pb))
        .expect("a lists b's server");
    assert_eq!(foreign.state(), v1::InstanceState::Unmanaged);
    assert!(foreign.command_line.contains("llama-server"), "{foreign:?}");
    let e = ca
        .stop_instance(v1::StopInstanceRequest {
            instance_id: foreign.id.clone(),
            leader_revision: 0,
        })
        .await
        .expect_err("stopping an unmanaged server");
    assert_eq!(e.code(), Code::FailedPrecondition);

    // Stopping a's instance leaves b's serving, and vice versa the state dirs.
    ca.stop_instance(v1::StopInstanceRequest {
        instance_id: ia.id.clone(),
        leader_revision: 0,
    })
    .await
    .expect("stop a");
    assert!(!alive(pa));
    assert!(alive(pb));
    assert_eq!(
        tests::http_status(&format!("{}/health", rb.endpoint)),
        Some(200)
    );
    let b_view = list(&mut cb).await;
    let b_inst = b_view.iter().find(|i| i.id == ib.id).expect("b instance");
    assert_eq!(
        (b_inst.state(), b_inst.pid),
        (v1::InstanceState::Ready, Some(pb))
    );

    // A third agent on a's state dir is refused: one line, exit 64.
    let out = a
        .command_listening_on(free_port())
        .output()
        .expect("run third agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("is in use by another halo-agent"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_exits_64_with_one_line_before_binding_anything() {
    let node = Node::new(2);
    // The listen port is taken: had the agent bound it before validating,
    // it would report the bind failure (exit 69) instead of the config error.
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken_port = taken.local_addr().expect("addr").port();
    let file = node.root.path().join("agent.toml");
    std::fs::write(&file, "listen = \"127.0.0.1:1\"\nmodel_dir = \"/x\"\n").expect("toml");
    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "missing model dir",
            vec!["--model-dir".into(), "/nonexistent/models".into()],
            "`model_dirs`",
        ),
        (
            "reversed port range",
            vec!["--port-range".into(), "9000-8000".into()],
            "`port_range`",
        ),
        (
            "denied allow-flag",
            vec!["--allow-flag".into(), "--rpc".into()],
            "`allowed_flags`",
        ),
        (
            "unknown file key",
            vec!["--config".into(), file.display().to_string()],
            "line 2: unknown field `model_dir`",
        ),
        ("unknown flag", vec!["--frobnicate".into()], "--frobnicate"),
        (
            "plaintext on a mesh address",
            vec!["--listen".into(), "100.64.0.1:7301".into()],
            "--insecure-loopback-only refuses listen address 100.64.0.1:7301",
        ),
        (
            "plaintext on every address",
            vec!["--listen".into(), "0.0.0.0:7301".into()],
            "refuses listen address 0.0.0.0:7301",
        ),
    ];
    for (what, args, text) in cases {
        let out = node
            .command_listening_on(taken_port)
            .args(&args)
            .output()
            .expect("run agent");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{what}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "{what}: not one line: {err}"
        );
        assert!(err.contains(text), "{what}: {err}");
    }
    // Neither certificates nor --insecure-loopback-only: refused, with how
    // to make certificates.
    let mut bare = Command::new(&*AGENT);
    bare.arg("--node-name")
        .arg("test-node")
        .arg("--listen")
        .arg(format!("127.0.0.1:{taken_port}"))
        .arg("--model-dir")
        .arg(&node.models)
        .arg("--llama-server")
        .arg(&node.llama_server)
        .arg("--state-dir")
        .arg(&node.state)
        .env_remove("HALO_AGENT_CONFIG");
    let out = bare.output().expect("run agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("no TLS configured") && err.contains("haloctl certs init"),
        "{err}"
    );
    // The same taken port with a good config: a clear bind error, exit 69.
    let out = node
        .command_listening_on(taken_port)
        .output()
        .expect("run agent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{taken_port}")),
        "{err}"
    );
    drop(taken);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_fails_to_load_is_failed_with_llama_servers_own_words() {
    let mut node = Node::new(1);
    let mut client = node.start().await;
    let mut events = watch(&mut client, 60_000).await;
    // The tiny model's 16-wide heads do not divide into q8_0's 32-blocks:
    // llama-server refuses the context and exits 1.
    let started = client
        .start_instance(start_request(
            "q8",
            "tiny.gguf",
            v1::InstanceOptions {
                cache_type_k: v1::CacheType::Q80 as i32,
                ..options(256)
            },
        ))
        .await
        .expect("start")
        .into_inner();
    let (failed, _) = wait_instance(&mut events, &started.id, |i| {
        state_of(i) == v1::InstanceState::Failed
    })
    .await;
    assert!(
        failed
            .last_error
            .starts_with("llama-server exited with code 1"),
        "{}",
        failed.last_error
    );
    assert!(
        failed
            .last_error
            .contains("does not divide n_embd_head_k=16"),
        "{}",
        failed.last_error
    );
    let stopped = client
        .stop_instance(v1::StopInstanceRequest {
            instance_id: started.id.clone(),
            leader_revision: 0,
        })
        .await
        .expect("stop")
        .into_inner();
    assert_eq!(stopped.state(), v1::InstanceState::Stopped);
    assert!(node.own_servers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_stalls_past_the_timeout_fails_and_backs_off_doubling() {
    use std::os::unix::fs::PermissionsExt;
    let mut node = Node::new(1);
    // A scripted server for this one edge: it runs, never answers /health.
    let script = node.root.path().join("stalling-server");
    std::fs::write(&script, "#!/bin/sh\nexec sleep 600\n").expect("script");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    node.llama_server = script;
    node.extra = vec![
        "--load-timeout-secs=1".into(),
        "--restart-backoff-ms=200".into(),
        "--stop-timeout-secs=2".into(),
    ];
    let mut client = node.start().await;
    let mut events = watch(&mut client, 60_000).await;
    let started = client
        .start_instance(start_request("stall", "tiny.gguf", options(256)))
        .await
        .expect("start")
        .into_inner();
    let mut gaps = Vec::new();
    let mut pids = Vec::new();
    for _ in 0..2 {
        let (loading, _) = wait_instance(&mut events, &started.id, |i| {
            state_of(i) == v1::InstanceState::Loading
        })
        .await;
        pids.push(loading.pid.expect("pid"));
        let (failed, _) = wait_instance(&mut events, &started.id, |i| {
            state_of(i) == v1::InstanceState::Failed
        })
        .await;
        assert!(
            failed.last_error.contains("did not become ready within 1s"),
            "{}",
            failed.last_error
        );
        let (starting, _) = wait_instance(&mut events, &started.id, |i| {
            state_of(i) == v1::InstanceState::Starting
        })
        .await;
        gaps.push(starting.state_since_unix_ms - failed.state_since_unix_ms);
    }
    // The stalled processes were terminated, not left behind.
    for pid in &pids {
        assert!(!alive(*pid), "stalled server {pid} left running");
    }
    assert!(
        gaps[0] >= 190 && gaps[1] >= 390,
        "back-off gaps {gaps:?} ms"
    );
    client
        .stop_instance(v1::StopInstanceRequest {
            instance_id: started.id.clone(),
            leader_revision: 0,
        })
        .await
        .expect("stop");
    assert!(node.own_servers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_comes_from_the_file_then_env_then_flags() {
    let mut node = Node::new(2);
    let file = node.root.path().join("agent.toml");
    std::fs::write(
        &file,
        "reserve = \"8GiB\"\nroles = [\"reasoning\"]\nallowed_flags = [\"--jinja\"]\n\
         [labels]\nrack = \"a\"\n",
    )
    .expect("toml");
    node.extra = vec!["--config".into(), file.display().to_string()];
    async fn seen(client: &mut Client) -> (u64, Vec<String>, Option<String>, Vec<String>) {
        let r = client
            .get_node(v1::GetNodeRequest {})
            .await
            .expect("get node")
            .into_inner();
        let n = r.node.expect("node");
        let rack = n.labels.get("rack").cloned();
        (r.reserve_bytes >> 30, n.roles, rack, r.allowed_flags)
    }
    // The file, except `roles`: the harness passes --role speed.
    let mut client = node.start().await;
    let jinja = vec!["--jinja".to_owned()];
    let speed = vec!["speed".to_owned()];
    assert_eq!(
        seen(&mut client).await,
        (8, speed.clone(), Some("a".into()), jinja.clone())
    );
    node.kill9();
    // The environment beats the file.
    node.env = vec![
        ("HALO_AGENT_RESERVE".into(), "2GiB".into()),
        ("HALO_AGENT_LABELS".into(), "rack=b".into()),
    ];
    let mut client = node.start().await;
    assert_eq!(
        seen(&mut client).await,
        (2, speed.clone(), Some("b".into()), jinja.clone())
    );
    node.kill9();
    // A flag beats the environment.
    node.extra.push("--reserve=1GiB".into());
    let mut client = node.start().await;
    assert_eq!(seen(&mut client).await, (1, speed, Some("b".into()), jinja));
}
