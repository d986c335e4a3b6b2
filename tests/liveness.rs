//! Liveness after Ready and the model file under a running instance, with
//! halo-agent and the real llama-server on the tiny model, real signals
//! (`SIGSTOP`/`SIGCONT`/`SIGKILL`) and real file replacement. Probe periods
//! are shortened by the agent's own flags; deadlines are generous and the
//! times seen are printed.

use agent::gguf::fixtures::write_tiny_llama;
use proto::v1;
use rustix::process::Signal;
use std::time::{Duration, Instant};
use tests::agent_node::{
    Client, Node, alive, next_event, options, post, signal_pid, start_request, state_of,
    wait_instance, watch,
};

type Events = tonic::Streaming<v1::AgentEvent>;

/// A node whose agent probes every `period_ms` with `timeout_ms` and calls
/// an instance unhealthy after `failures` failed probes in a row.
fn node(period_ms: u64, timeout_ms: u64, failures: u32) -> Node {
    let mut node = Node::new(2);
    node.extra = vec![
        "--health-period-ms".into(),
        period_ms.to_string(),
        "--health-timeout-ms".into(),
        timeout_ms.to_string(),
        "--health-failures".into(),
        failures.to_string(),
    ];
    node
}

/// Starts `tiny.gguf` and waits until it is ready.
async fn ready_instance(client: &mut Client, events: &mut Events, ctx: u32) -> v1::Instance {
    let started = client
        .start_instance(start_request("req-1", "tiny.gguf", options(ctx)))
        .await
        .expect("start")
        .into_inner();
    wait_instance(events, &started.id, |i| {
        state_of(i) == v1::InstanceState::Ready
    })
    .await
    .0
}

/// A short completion through the instance's own API: (status, text).
async fn complete(i: &v1::Instance, n_predict: u32) -> (u16, serde_json::Value) {
    post(
        format!("{}/completion", i.endpoint),
        Some(i.api_key.clone()),
        serde_json::json!({"prompt": "Once upon a time", "n_predict": n_predict, "ignore_eos": true}),
    )
    .await
}

/// Waits (bounded) until the agent's log contains `needle`.
async fn agent_log_says(node: &Node, needle: &str, within: Duration) {
    let end = Instant::now() + within;
    while !node.logs().contains(needle) {
        assert!(
            Instant::now() < end,
            "the agent never logged `{needle}` within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Instance events for `id` that arrive within `window`.
async fn events_for(events: &mut Events, id: &str, window: Duration) -> Vec<v1::Instance> {
    let end = tokio::time::Instant::now() + window;
    let mut seen = Vec::new();
    while let Ok(e) = tokio::time::timeout_at(end, next_event(events)).await {
        if let Some(v1::agent_event::Event::Instance(i)) = e.event
            && i.id == id
        {
            seen.push(i);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_llama_server_turns_unhealthy_is_killed_restarted_and_answers_again() {
    let (period, timeout, failures) = (1_000, 500, 3);
    let mut node = node(period, timeout, failures);
    let mut client = node.start().await;
    let mut events = watch(&mut client, 60_000).await;
    let ready = ready_instance(&mut client, &mut events, 256).await;
    let pid = ready.pid.expect("pid");

    signal_pid(pid, Signal::STOP);
    let stopped_at = Instant::now();
    let (unhealthy, _) = wait_instance(&mut events, &ready.id, |i| {
        state_of(i) != v1::InstanceState::Ready
    })
    .await;
    let took = stopped_at.elapsed();
    println!(
        "SIGSTOP → unhealthy after {took:?} (probe every {period} ms, {timeout} ms timeout, \
         {failures} failures)"
    );
    assert_eq!(
        state_of(&unhealthy),
        v1::InstanceState::Unhealthy,
        "{unhealthy:?}"
    );
    assert!(
        unhealthy.last_error.contains(
            "failed 3 /health probes in a row (every 1000 ms, last: no answer within 500 ms)"
        ),
        "{}",
        unhealthy.last_error
    );
    // failures × period + timeout at most, and a wide margin for a loaded
    // machine.
    assert!(took < Duration::from_secs(3 + 1 + 20), "{took:?}");

    let (failed, _) = wait_instance(&mut events, &ready.id, |i| {
        state_of(i) != v1::InstanceState::Unhealthy
    })
    .await;
    assert_eq!(state_of(&failed), v1::InstanceState::Failed, "{failed:?}");
    assert!(
        failed.last_error.contains("killed with SIGKILL"),
        "{}",
        failed.last_error
    );
    assert!(!alive(pid), "the stopped llama-server was left running");

    let (again, _) = wait_instance(&mut events, &ready.id, |i| {
        state_of(i) == v1::InstanceState::Ready
    })
    .await;
    let new_pid = again.pid.expect("pid");
    assert_ne!(new_pid, pid);
    assert_eq!(again.restart_count, 1);
    assert_eq!(node.own_servers(), vec![new_pid]);
    let (status, body) = complete(&again, 4).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["content"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_llama_server_stopped_for_less_than_the_threshold_is_left_alone() {
    // The third failure in a row would come two periods (4 s) after the
    // first: the test resumes the process as soon as the first is logged.
    let (period, timeout, failures) = (2_000, 1_000, 3);
    let mut node = node(period, timeout, failures);
    let mut client = node.start().await;
    let mut events = watch(&mut client, 60_000).await;
    let ready = ready_instance(&mut client, &mut events, 256).await;
    let pid = ready.pid.expect("pid");

    signal_pid(pid, Signal::STOP);
    agent_log_says(
        &node,
        "/health probe failed (1 of 3 in a row): no answer within 1000 ms",
        Duration::from_secs(30),
    )
    .await;
    signal_pid(pid, Signal::CONT);
    agent_log_says(
        &node,
        "/health answered again after",
        Duration::from_secs(30),
    )
    .await;

    // Nothing happens: no state change for three more periods.
    let seen = events_for(&mut events, &ready.id, Duration::from_secs(6)).await;
    assert!(
        seen.iter().all(|i| state_of(i) == v1::InstanceState::Ready),
        "{:?}",
        seen.iter().map(state_of).collect::<Vec<_>>()
    );
    let now = client
        .list_instances(v1::ListInstancesRequest {})
        .await
        .expect("list")
        .into_inner()
        .instances
        .into_iter()
        .find(|i| i.id == ready.id)
        .expect("listed");
    assert_eq!(state_of(&now), v1::InstanceState::Ready);
    assert_eq!(now.pid, Some(pid));
    assert_eq!(now.restart_count, 0);
    assert!(!node.logs().contains("unhealthy"), "{}", node.logs());
    let (status, body) = complete(&now, 4).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_generation_does_not_make_its_instance_unhealthy() {
    // Stricter than the defaults: two failures, a timeout of one period.
    let (period, timeout, failures) = (1_000, 1_000, 2);
    let mut node = node(period, timeout, failures);
    let mut client = node.start().await;
    let mut events = watch(&mut client, 60_000).await;
    let ready = ready_instance(&mut client, &mut events, 2048).await;
    let pid = ready.pid.expect("pid");

    // Generations back to back for at least six probe periods, while the
    // watch stream is read for the same time.
    let busy = {
        let ready = ready.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let mut tokens = 0u64;
            let mut generations = 0u32;
            while started.elapsed() < Duration::from_secs(6) {
                let (status, body) = complete(&ready, 4_000).await;
                assert_eq!(status, 200, "{body}");
                tokens += body["tokens_predicted"].as_u64().unwrap_or(0);
                generations += 1;
            }
            (started.elapsed(), generations, tokens)
        })
    };
    let seen = events_for(&mut events, &ready.id, Duration::from_secs(6)).await;
    let (busy_for, generations, tokens) = busy.await.expect("generation task");
    println!("{generations} generation(s), {tokens} tokens in {busy_for:?}");
    assert!(tokens > 0);
    assert!(
        seen.iter().all(|i| state_of(i) == v1::InstanceState::Ready),
        "{:?}",
        seen.iter()
            .map(|i| (state_of(i), i.last_error.clone()))
            .collect::<Vec<_>>()
    );
    let logs = node.logs();
    assert!(!logs.contains("/health probe failed"), "{logs}");
    assert_eq!(node.own_servers(), vec![pid]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_file_replaced_under_a_running_instance_is_reported_and_its_restart_refused() {
    let mut node = node(300, 300, 3);
    let mut client = node.start().await;
    let mut events = watch(&mut client, 60_000).await;
    let ready = ready_instance(&mut client, &mut events, 256).await;
    let pid = ready.pid.expect("pid");
    assert!(ready.model_file_changed.is_empty(), "{ready:?}");

    // Another model renamed over the name, as a download tool would.
    let new = node.models.join("tiny.gguf.part");
    write_tiny_llama(&new, 8).expect("another tiny model");
    std::fs::rename(&new, node.models.join("tiny.gguf")).expect("rename");
    let (reported, _) =
        wait_instance(&mut events, &ready.id, |i| !i.model_file_changed.is_empty()).await;
    let change = reported.model_file_changed.clone();
    assert!(
        change.contains("tiny.gguf was replaced since the instance started")
            && change.contains("another file: inode"),
        "{change}"
    );
    // It keeps running from what it loaded.
    assert_eq!(state_of(&reported), v1::InstanceState::Ready);
    assert_eq!(reported.pid, Some(pid));
    let (status, body) = complete(&reported, 4).await;
    assert_eq!(status, 200, "{body}");

    // Once it dies, the restart is refused with the reason, and nothing is
    // started.
    signal_pid(pid, Signal::KILL);
    let (refused, _) = wait_instance(&mut events, &ready.id, |i| {
        state_of(i) == v1::InstanceState::Failed && i.last_error.contains("was replaced")
    })
    .await;
    assert!(
        refused
            .last_error
            .contains("not restarted: it would load a different file under the same name"),
        "{}",
        refused.last_error
    );
    assert_eq!(refused.pid, None);
    assert!(!refused.model_file_changed.is_empty());
    assert!(node.own_servers().is_empty(), "{:?}", node.own_servers());

    // The name gone altogether: the next attempt (after its back-off) says so.
    std::fs::remove_file(node.models.join("tiny.gguf")).expect("rm");
    let (gone, _) = wait_instance(&mut events, &ready.id, |i| {
        state_of(i) == v1::InstanceState::Failed && i.last_error.contains("was deleted")
    })
    .await;
    assert!(
        gone.model_file_changed
            .ends_with("tiny.gguf was deleted since the instance started"),
        "{}",
        gone.model_file_changed
    );
    assert!(node.own_servers().is_empty(), "{:?}", node.own_servers());
    // Refused spawns are no restarts: nothing ran again.
    assert_eq!(gone.restart_count, 0);
}
