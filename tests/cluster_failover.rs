//! Node loss with real processes: a controller (embedded store), two
//! agents and real llama-server instances of the tiny model. The floating
//! placement is served; a pause of its agent shorter than the move period
//! moves nothing; then its agent is killed (its llama-server keeps
//! running, as under systemd's `KillMode=process`), the node is detected
//! unreachable, the placement moves to the other node and answers there;
//! when the agent comes back with the stale instance, exactly one remains.

use proto::v1;
use std::time::{Duration, Instant};
use tests::cluster::{
    Client, chat, endpoint, eventually, live_instances, tiny_controller, tiny_speed_pair,
    wait_nodes,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floating_placement_moves_off_a_lost_node_and_one_instance_remains_when_it_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = tiny_speed_pair(dir.path(), 4);
    let mut ctl = tiny_controller(
        dir.path(),
        &nodes,
        &[
            "--grace-ms",
            "1000",
            "--heartbeat-ms",
            "250",
            "--move-after-secs",
            "3",
            "--requeue-ms",
            "300",
        ],
    );
    let [mut a, mut b] = nodes;
    let mut c = ctl.start_and_wait(&["halo1", "halo2"]).await;

    // Pin nothing: place, wait for the endpoint, chat.
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
    let first = endpoint(&c, "tiny", Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("no endpoint:\n{}", ctl.logs()));
    let reply = chat(&first.base_url, &first.api_key, "tiny").expect("chat on the first node");
    eprintln!("first node {} answered {reply:?}", first.node);

    // A partition shorter than the move period moves nothing: pause the
    // hosting agent past the grace period, then let it back.
    let host = if first.node == "halo1" { &a } else { &b };
    let pid = rustix::process::Pid::from_raw(
        i32::try_from(host.proc.as_ref().expect("running").pid()).expect("pid"),
    )
    .expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::STOP).expect("SIGSTOP");
    let paused = wait_nodes(
        &mut c,
        &[&first.node],
        v1::NodeStatus::Unreachable,
        Duration::from_secs(5),
    )
    .await;
    rustix::process::kill_process(pid, rustix::process::Signal::CONT).expect("SIGCONT");
    assert!(
        paused,
        "a silent agent was not seen unreachable:\n{}",
        ctl.logs()
    );
    assert!(
        wait_nodes(
            &mut c,
            &[&first.node],
            v1::NodeStatus::Ready,
            Duration::from_secs(5)
        )
        .await
    );
    let p = c
        .list_placements(v1::ListPlacementsRequest {})
        .await
        .expect("list")
        .into_inner()
        .placements;
    assert_eq!(
        p[0].replicas[0].node, first.node,
        "a short partition moved the placement"
    );
    assert_eq!(p[0].replicas[0].generation, 1);
    assert_eq!(live_instances(&mut c).await.len(), 1);

    // Kill the hosting node's agent (its llama-server keeps running).
    let (lost, other) = if first.node == "halo1" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let lost_name = lost.name.clone();
    let other_name = other.name.clone();
    let killed_at = Instant::now();
    lost.kill9();
    assert!(
        wait_nodes(
            &mut c,
            &[&lost_name],
            v1::NodeStatus::Unreachable,
            Duration::from_secs(5)
        )
        .await,
        "node not detected unreachable:\n{}",
        ctl.logs()
    );
    let detected = killed_at.elapsed();
    let moved = endpoint_on(&c, &other_name, Duration::from_secs(60))
        .await
        .unwrap_or_else(|| panic!("placement did not move:\n{}", ctl.logs()));
    let answered = killed_at.elapsed();
    let reply = chat(&moved.base_url, &moved.api_key, "tiny").expect("chat on the other node");
    eprintln!(
        "node loss: detected unreachable after {detected:?}; moved and ready on {other_name} after {answered:?} \
         (move period 3 s); answered {reply:?}"
    );
    assert!(
        detected < Duration::from_secs(3),
        "detection took {detected:?}"
    );

    // The lost agent returns and re-adopts the stale instance: it is stopped.
    lost.start();
    let one = eventually(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move {
            let live = live_instances(&mut c).await;
            (live.len() == 1).then_some(live)
        }
    })
    .await
    .unwrap_or_else(|| panic!("duplicate not resolved:\n{}", ctl.logs()));
    assert_eq!(one[0].0, other_name, "the moved instance stays");
    let stale_gone = eventually(Duration::from_secs(20), || async {
        lost.servers().is_empty().then_some(())
    })
    .await;
    assert!(
        stale_gone.is_some(),
        "stale llama-server still running on {lost_name}"
    );
    assert_eq!(other.servers().len(), 1);
    chat(&moved.base_url, &moved.api_key, "tiny").expect("still answering");
}

/// The code endpoint of placement `tiny` once it is ready on `node`.
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
