//! Controller crash safety: 20 placements of the tiny model with the
//! controller SIGKILLed at random points (during Place calls and while its
//! reconciler is starting instances) and restarted each time. Every
//! acknowledged placement survives, and in the end every placement has
//! exactly one instance: a start retried after a crash carries the same
//! request id, so the agent returns the instance it already started.

use proto::v1;
use std::collections::BTreeMap;
use std::time::Duration;
use tests::cluster::live_instances;
use tests::cluster::{connect, eventually, tiny_controller, tiny_speed_pair, wait_nodes};

const PLACEMENTS: usize = 20;

/// A small deterministic generator (seed printed, so a failure replays).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_at_random_points_loses_no_placement_and_starts_no_duplicate() {
    let seed = std::env::var("HALO_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("HALO_CRASH_SEED={seed}");
    let mut rng = Lcg(seed);
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = tiny_speed_pair(dir.path(), 12);
    let mut ctl = tiny_controller(
        dir.path(),
        &nodes,
        &["--heartbeat-ms", "200", "--requeue-ms", "200"],
    );
    let [a, b] = &nodes;
    ctl.start();
    let mut acknowledged: Vec<String> = Vec::new();
    let mut kills = 0;
    for i in 0..PLACEMENTS {
        let name = format!("c{i:02}");
        let mut c = connect(&ctl.url()).await;
        assert!(
            wait_nodes(
                &mut c,
                &["halo1", "halo2"],
                v1::NodeStatus::Ready,
                Duration::from_secs(20)
            )
            .await
        );
        // Every acknowledged placement is still there after every restart.
        let names: Vec<String> = c
            .list_placements(v1::ListPlacementsRequest {})
            .await
            .expect("list")
            .into_inner()
            .placements
            .into_iter()
            .map(|p| p.name)
            .collect();
        for n in &acknowledged {
            assert!(
                names.contains(n),
                "acknowledged {n} lost after a crash: {names:?}\n{}",
                ctl.logs()
            );
        }
        if names.contains(&name) {
            // Written before the crash cut the reply off.
            acknowledged.push(name);
            continue;
        }
        let req = v1::PlaceRequest {
            role: "speed".into(),
            model: "tiny".into(),
            name: name.clone(),
            ..v1::PlaceRequest::default()
        };
        let mut call = c.clone();
        let place = tokio::spawn(async move { call.place(req).await });
        let kill_now = rng.next(3) != 0;
        if kill_now {
            // Somewhere in the Place call or the reconcile that follows it.
            tokio::time::sleep(Duration::from_millis(rng.next(120))).await;
            ctl.kill9();
            kills += 1;
        }
        match place.await.expect("join") {
            Ok(r) => {
                let r = r.into_inner();
                assert!(r.accepted, "{:?}", r.explanation);
                acknowledged.push(name);
            }
            Err(s) => assert!(kill_now, "place failed without a crash: {s}"),
        }
        if kill_now {
            ctl.start();
        }
    }
    // Anything the last crash left unacknowledged is placed now.
    let mut c = connect(&ctl.url()).await;
    assert!(
        wait_nodes(
            &mut c,
            &["halo1", "halo2"],
            v1::NodeStatus::Ready,
            Duration::from_secs(20)
        )
        .await
    );
    let stored: Vec<String> = c
        .list_placements(v1::ListPlacementsRequest {})
        .await
        .expect("list")
        .into_inner()
        .placements
        .into_iter()
        .map(|p| p.name)
        .collect();
    let unacknowledged_stored = stored.len() - acknowledged.len();
    for i in 0..PLACEMENTS {
        let name = format!("c{i:02}");
        if !stored.contains(&name) {
            let r = c
                .place(v1::PlaceRequest {
                    role: "speed".into(),
                    model: "tiny".into(),
                    name,
                    ..v1::PlaceRequest::default()
                })
                .await
                .expect("place after the last crash")
                .into_inner();
            assert!(r.accepted, "{:?}", r.explanation);
        }
    }
    let placed = c
        .list_placements(v1::ListPlacementsRequest {})
        .await
        .expect("list")
        .into_inner()
        .placements;
    eprintln!("{unacknowledged_stored} stored but unacknowledged before the end");
    eprintln!(
        "{kills} kills; {} placements acknowledged, {} stored",
        acknowledged.len(),
        placed.len()
    );
    assert_eq!(placed.len(), PLACEMENTS);

    // Converge: one ready instance per stored placement, no duplicates.
    let want = placed.len();
    let converged = eventually(Duration::from_secs(90), || {
        let mut c = c.clone();
        async move {
            let live = live_instances(&mut c).await;
            let ready = live
                .iter()
                .filter(|(_, i)| i.state == v1::InstanceState::Ready as i32)
                .count();
            (ready == want && live.len() == want).then_some(live)
        }
    })
    .await
    .unwrap_or_else(|| panic!("did not converge to {want} instances:\n{}", ctl.logs()));
    let mut per_placement: BTreeMap<String, usize> = BTreeMap::new();
    for (_, i) in &converged {
        let key = proto::domain::ReplicaKey::parse(&i.request_id).expect("a controller request id");
        *per_placement.entry(key.placement).or_default() += 1;
    }
    assert_eq!(per_placement.len(), want);
    assert!(per_placement.values().all(|&n| n == 1), "{per_placement:?}");
    assert_eq!(
        a.servers().len() + b.servers().len(),
        want,
        "one llama-server per placement"
    );
}
