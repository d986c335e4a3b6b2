//! Two controllers on a real etcd: one leads, the other stands by. The
//! leader is SIGSTOPped past its lease; the other takes over and acts. The
//! old leader, resumed, can neither write desired state nor command an
//! agent: its term lapsed on its own clock, its writes compare the leader
//! key, and the agent refuses its (older) leader revision.

use agent::gguf::fixtures::write_tiny_llama;
use proto::v1;
use rustix::process::{Pid, Signal, kill_process};
use std::time::{Duration, Instant};
use tests::cluster::TINY_CATALOG;
use tests::cluster::live_instances;
use tests::cluster::{AgentNode, Client, ControllerProc, Etcd, eventually, write_catalog};
use tonic::Code;

fn place(name: &str) -> v1::PlaceRequest {
    v1::PlaceRequest {
        role: "speed".into(),
        model: "tiny".into(),
        name: name.into(),
        ..v1::PlaceRequest::default()
    }
}

/// Places `name` through `c` once it is leader.
async fn place_when_leader(c: &Client, name: &str, timeout: Duration) -> bool {
    eventually(timeout, || {
        let mut c = c.clone();
        async move {
            c.place(place(name))
                .await
                .ok()
                .filter(|r| r.get_ref().accepted)
        }
    })
    .await
    .is_some()
}

fn signal(pid: u32, sig: Signal) {
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid")).expect("pid");
    kill_process(pid, sig).expect("signal");
}

/// The term from a controller log line `elected leader term=N`.
fn term_in(log: &str) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains("elected leader"))
        .filter_map(|l| {
            l.split("term=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .next_back()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_leader_is_replaced_and_on_waking_can_neither_write_nor_command_an_agent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let etcd = Etcd::start(dir.path(), "leader");
    let mut node = AgentNode::new(dir.path(), "halo1", &["speed"], 6);
    write_tiny_llama(&node.models.join("tiny.gguf"), 7).expect("tiny model");
    node.start();
    let catalog = dir.path().join("catalog.toml");
    write_catalog(&catalog, TINY_CATALOG);
    let args = |id: &str| -> Vec<String> {
        vec![
            "--etcd".into(),
            etcd.endpoint.clone(),
            "--id".into(),
            id.into(),
            "--lease-secs".into(),
            "2".into(),
            "--node".into(),
            format!("halo1={}", node.address()),
            "--catalog".into(),
            catalog.display().to_string(),
            "--heartbeat-ms".into(),
            "200".into(),
            "--requeue-ms".into(),
            "200".into(),
        ]
    };
    let mut a = ControllerProc::new(dir.path(), "controller-a", &args("ctl-a"));
    let mut ca = a.start_and_wait(&["halo1"]).await;
    assert!(
        place_when_leader(&ca, "t1", Duration::from_secs(15)).await,
        "A never led:\n{}",
        a.logs()
    );
    let term_a = term_in(&a.logs()).expect("A's term in its log");

    let mut b = ControllerProc::new(dir.path(), "controller-b", &args("ctl-b"));
    let mut cb = b.start_and_wait(&["halo1"]).await;
    let standby = cb
        .place(place("t-standby"))
        .await
        .expect_err("B is not leader");
    assert_eq!(standby.code(), Code::FailedPrecondition, "{standby:?}");
    // The standby reads the same desired state.
    let seen = cb
        .list_placements(v1::ListPlacementsRequest {})
        .await
        .expect("list")
        .into_inner();
    assert_eq!(seen.placements.len(), 1);

    // Pause A past its lease: B takes over and acts.
    let stopped_at = Instant::now();
    signal(a.pid(), Signal::STOP);
    assert!(
        place_when_leader(&cb, "t2", Duration::from_secs(15)).await,
        "B never took over:\n{}",
        b.logs()
    );
    let takeover = stopped_at.elapsed();
    let term_b = term_in(&b.logs()).expect("B's term");
    assert!(term_b > term_a);
    // B's reconcile commands the agent with its term (raising the fence).
    let both = eventually(Duration::from_secs(30), || {
        let mut cb = cb.clone();
        async move {
            let live = live_instances(&mut cb).await;
            (live.len() == 2
                && live
                    .iter()
                    .all(|(_, i)| i.state == v1::InstanceState::Ready as i32))
            .then_some(live)
        }
    })
    .await
    .unwrap_or_else(|| panic!("B did not start t2:\n{}", b.logs()));
    eprintln!("leader change: B took over {takeover:?} after A was paused (lease 2 s)");

    // Wake A: no write, no command.
    let a_log_before = a.logs();
    signal(a.pid(), Signal::CONT);
    let write = ca.place(place("t3")).await.expect_err("A must not write");
    assert_eq!(write.code(), Code::FailedPrecondition, "{write:?}");
    let unplace = ca
        .unplace(v1::UnplaceRequest { name: "t1".into() })
        .await
        .expect_err("A must not delete");
    assert_eq!(unplace.code(), Code::FailedPrecondition, "{unplace:?}");
    // The agent refuses A's term outright.
    let mut agent = tests::cluster::agent_client(&node).await;
    let t1 = both
        .iter()
        .find(|(_, i)| i.request_id.starts_with("halo.t1."))
        .map(|(_, i)| i.id.clone())
        .expect("t1 instance");
    let fenced = agent
        .stop_instance(v1::StopInstanceRequest {
            instance_id: t1,
            leader_revision: term_a,
        })
        .await
        .expect_err("a stop with A's term is refused");
    assert_eq!(fenced.code(), Code::FailedPrecondition, "{fenced:?}");
    // Give A time to notice it lost the lease; it neither started nor
    // stopped anything after waking.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let a_log_after = a.logs();
    let woke = &a_log_after[a_log_before.len().min(a_log_after.len())..];
    assert!(
        woke.contains("stepping down") || !woke.contains("kind=\"started\""),
        "{woke}"
    );
    for kind in [
        "kind=\"started\"",
        "kind=\"stopped\"",
        "kind=\"moved\"",
        "kind=\"placed\"",
    ] {
        assert!(
            !woke.contains(kind),
            "A acted after waking ({kind}):\n{woke}"
        );
    }
    let live = live_instances(&mut cb).await;
    assert_eq!(live.len(), 2, "{live:?}");
    assert_eq!(
        cb.list_placements(v1::ListPlacementsRequest {})
            .await
            .expect("list")
            .into_inner()
            .placements
            .len(),
        2
    );
}
