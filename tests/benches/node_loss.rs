//! Node-loss timing with real processes, printed (not asserted): a
//! controller (default grace 2 s and heartbeat 500 ms; move period cut to
//! 3 s to keep the run short), two agents and the tiny model. Ten times:
//! SIGKILL the agent of the node serving the placement, then read the
//! controller's event stream for `node_unreachable` (detection, target
//! < 3 s, from the kill) and `started` on the other node (re-placement,
//! target < 1 s after the move period, which runs from when the agent was
//! last heard); then bring the agent back and let the duplicate go.
//!
//!     cargo bench -p tests --bench node_loss
//!
//! `HALO_BENCH_SMOKE=1`: one run.

use proto::v1;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tests::cluster::{eventually, tiny_controller, tiny_speed_pair};

const MOVE_AFTER_MS: i64 = 3000;

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(0))
}

fn median(mut v: Vec<i64>) -> i64 {
    v.sort_unstable();
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let runs = if tests::smoke() { 1 } else { 10 };
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = tiny_speed_pair(dir.path(), 4);
    let move_after = (MOVE_AFTER_MS / 1000).to_string();
    let mut ctl = tiny_controller(dir.path(), &nodes, &["--move-after-secs", &move_after]);
    let mut c = ctl.start_and_wait(&["halo1", "halo2"]).await;
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
    let mut events = c
        .watch_events(v1::WatchEventsRequest {
            follow: true,
            recent: Some(0),
        })
        .await
        .expect("events")
        .into_inner();
    let (mut detect, mut replace) = (Vec::new(), Vec::new());
    for run in 0..runs {
        let host = eventually(Duration::from_secs(60), || {
            let mut c = c.clone();
            async move {
                c.endpoints(v1::EndpointsRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .endpoints
                    .into_iter()
                    .next()
                    .map(|e| e.node)
            }
        })
        .await
        .expect("a ready endpoint");
        let i = usize::from(host == "halo2");
        let killed = now_ms();
        nodes[i].kill9();
        // The period runs from when the agent was last heard; the
        // `node_unreachable` event says how long it had been silent.
        let (mut unreachable, mut last_heard, mut started) = (None, 0, None);
        while started.is_none() {
            let e = tokio::time::timeout(Duration::from_secs(30), events.message())
                .await
                .expect("an event within 30 s")
                .expect("event stream")
                .expect("stream open");
            let at = i64::try_from(e.at_unix_ms).unwrap_or(0);
            if e.kind == "node_unreachable" && e.subject == host && unreachable.is_none() {
                unreachable = Some(at);
                let silent: i64 = e
                    .message
                    .split_whitespace()
                    .find_map(|w| w.parse().ok())
                    .unwrap_or(0);
                last_heard = at - silent;
            }
            if e.kind == "started" && e.subject == "tiny" && unreachable.is_some() {
                started = Some(at);
            }
        }
        let d = unreachable.unwrap_or(0) - killed;
        let s = started.unwrap_or(0) - (last_heard + MOVE_AFTER_MS);
        println!(
            "run {run}: {host} detected unreachable after {d} ms; re-placement started {s} ms after the move period"
        );
        detect.push(d);
        replace.push(s);
        nodes[i].start();
        let settled = eventually(Duration::from_secs(30), || {
            let mut c = c.clone();
            async move {
                let n = c
                    .list_nodes(v1::ListNodesRequest {})
                    .await
                    .ok()?
                    .into_inner()
                    .nodes;
                let live: usize = n
                    .iter()
                    .map(|v| {
                        v.instances
                            .iter()
                            .filter(|i| {
                                i.request_id.starts_with("halo.")
                                    && i.state != v1::InstanceState::Stopped as i32
                            })
                            .count()
                    })
                    .sum();
                let ready = n.iter().all(|v| v.status == v1::NodeStatus::Ready as i32);
                (live == 1 && ready).then_some(())
            }
        })
        .await;
        assert!(settled.is_some(), "cluster did not settle:\n{}", ctl.logs());
    }
    println!(
        "node loss over {runs} runs: detection median {} ms (target < 3000); re-placement started median {} ms after the {} ms move period (target < 1000)",
        median(detect),
        median(replace),
        MOVE_AFTER_MS
    );
}
