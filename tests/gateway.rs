//! The gateway with real processes: agents, a controller, llama-server
//! with the tiny model, and `haloctl gateway` (the workstation form) or an
//! agent's own gateway. One URL and one user key; the model may be a mode.

use proto::v1;
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tests::cluster::{
    AgentNode, ControllerProc, connect, eventually, tiny_controller, tiny_speed_pair, wait_nodes,
};
use tests::front::{
    Answer, chat_body, complete, create_key, haloctl, http, post, workstation_gateway,
};
use tests::{text, wait_for};

/// Waits until requests through the gateway at `url` are served by two
/// different nodes (both replicas ready and known to the gateway).
fn both_replicas_serve(url: &str, key: &str) {
    let both = wait_for(Duration::from_secs(90), || {
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..8 {
            let a = post(
                url,
                Some(key),
                &chat_body("tiny", &format!("probe {i}"), false),
            )
            .ok()?;
            if complete(&a, false) {
                seen.insert(a.node);
            }
        }
        (seen.len() == 2).then_some(())
    });
    assert!(both.is_some(), "one replica never served");
}

async fn place(c: &ControllerProc, node: Option<&str>, replicas: u32) {
    let mut client = connect(&c.url()).await;
    let r = client
        .place(v1::PlaceRequest {
            role: "speed".into(),
            model: "tiny".into(),
            node: node.unwrap_or_default().to_owned(),
            replicas,
            ..v1::PlaceRequest::default()
        })
        .await
        .expect("place")
        .into_inner();
    assert!(r.accepted, "{:?}", r.explanation);
}

/// Requests at a steady rate from several threads: a mix of streaming and
/// not, each recorded with when it started and ended.
struct Load {
    stop: Arc<AtomicBool>,
    results: Arc<Mutex<Vec<Outcome>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    t0: Instant,
}

#[derive(Debug, Clone)]
struct Outcome {
    start: Duration,
    end: Duration,
    ok: bool,
    stream: bool,
    what: String,
}

impl Load {
    /// `per_second` requests a second in total, over `threads` threads.
    fn start(url: &str, key: &str, model: &str, per_second: u32, threads: u32) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let results = Arc::new(Mutex::new(Vec::new()));
        let t0 = Instant::now();
        let period = Duration::from_secs_f64(f64::from(threads) / f64::from(per_second));
        let handles = (0..threads)
            .map(|t| {
                let (stop, results) = (stop.clone(), results.clone());
                let url = format!("{url}/v1/chat/completions");
                let (key, model) = (key.to_owned(), model.to_owned());
                std::thread::spawn(move || {
                    let mut n = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        let stream = (n + t).is_multiple_of(2);
                        let begin = Instant::now();
                        let body = chat_body(&model, &format!("client {t}"), stream);
                        let r = post(&url, Some(&key), &body);
                        let (ok, what) = match &r {
                            Ok(a) => (
                                complete(a, stream),
                                format!(
                                    "{} {}",
                                    a.status,
                                    a.body.chars().take(200).collect::<String>()
                                ),
                            ),
                            Err(e) => (false, e.clone()),
                        };
                        results.lock().expect("results").push(Outcome {
                            start: begin - t0,
                            end: t0.elapsed(),
                            ok,
                            stream,
                            what,
                        });
                        n += 1;
                        if let Some(rest) = period.checked_sub(begin.elapsed()) {
                            std::thread::sleep(rest);
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            results,
            threads: handles,
            t0,
        }
    }

    fn now(&self) -> Duration {
        self.t0.elapsed()
    }

    fn finish(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        self.results.lock().expect("results").clone()
    }
}

fn summary(v: &[Outcome]) -> String {
    let failed: Vec<&Outcome> = v.iter().filter(|o| !o.ok).collect();
    format!(
        "{} requests ({} streaming), {} failed: {:?}",
        v.len(),
        v.iter().filter(|o| o.stream).count(),
        failed.len(),
        failed
            .iter()
            .take(5)
            .map(|o| format!(
                "[{:?}..{:?} stream={}] {}",
                o.start, o.end, o.stream, o.what
            ))
            .collect::<Vec<_>>()
    )
}

/// Seconds of load per phase (`HALO_GATEWAY_LOAD_SECS`, default 12; the
/// issue's full run is 60).
fn load_secs() -> u64 {
    std::env::var("HALO_GATEWAY_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mode_answers_through_one_url_and_key_and_bad_keys_reach_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = tiny_speed_pair(dir.path(), 2);
    let mut ctl = tiny_controller(dir.path(), &nodes, &["--heartbeat-ms", "250"]);
    ctl.start_and_wait(&["halo1", "halo2"]).await;
    let front = workstation_gateway(dir.path(), &ctl, &[]);
    let home = dir.path();
    let key = create_key(&ctl, home, "editor", &[]);
    let ask_only = create_key(&ctl, home, "asker", &["--modes", "ask"]);

    // Placed after the gateway started: a request sent meanwhile waits for
    // the model instead of failing.
    let url = format!("{}/v1/chat/completions", front.url);
    let early = {
        let (url, key) = (url.clone(), key.clone());
        std::thread::spawn(move || post(&url, Some(&key), &chat_body("code", "early", false)))
    };
    std::thread::sleep(Duration::from_millis(500));
    place(&ctl, Some("halo1"), 1).await;
    let early = early.join().expect("thread").expect("early request");
    assert!(complete(&early, false), "{early:?}");

    let a = post(&url, Some(&key), &chat_body("code", "s", false)).expect("post");
    assert!(complete(&a, false), "{a:?}");
    assert_eq!(a.node, "halo1");
    let s = post(&url, Some(&key), &chat_body("tiny", "s", true)).expect("stream");
    assert!(complete(&s, true), "{s:?}");
    assert!(s.body.matches("data: ").count() >= 3, "{}", s.body);

    // /v1/models: placements, catalog names and modes.
    let mut m = http()
        .get(&format!("{}/v1/models", front.url))
        .header("Authorization", &format!("Bearer {key}"))
        .call()
        .expect("models");
    let models: serde_json::Value = m.body_mut().read_json().expect("json");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("data")
        .iter()
        .filter_map(|x| x["id"].as_str())
        .collect();
    for id in ["tiny", "code", "ask"] {
        assert!(ids.contains(&id), "{models}");
    }

    let served_before = served_requests(&nodes[0]);
    // Unknown model: 404 naming what exists.
    let u = post(&url, Some(&key), &chat_body("nope/../x", "s", false)).expect("post");
    assert_eq!(u.status, 404, "{u:?}");
    assert!(
        u.body.contains("\"error\"") && u.body.contains("code"),
        "{}",
        u.body
    );
    // No key, a wrong key: 401. A key for `ask` asking for `code`: 403.
    let none = post(&url, None, &chat_body("code", "s", false)).expect("post");
    assert_eq!(none.status, 401, "{none:?}");
    let wrong = post(&url, Some("halo-wrong"), &chat_body("code", "s", false)).expect("post");
    assert_eq!(wrong.status, 401, "{wrong:?}");
    let scoped = post(&url, Some(&ask_only), &chat_body("code", "s", false)).expect("post");
    assert_eq!(scoped.status, 403, "{scoped:?}");
    let ok = post(&url, Some(&ask_only), &chat_body("ask", "s", false)).expect("post");
    assert!(complete(&ok, false), "{ok:?}");

    // Revoked: refused within moments (the gateway reads keys every second).
    let o = haloctl(&ctl, home)
        .args(["keys", "revoke", "asker"])
        .output()
        .expect("revoke");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let t = Instant::now();
    let mut served_while_revoking = 0;
    let refused = wait_for(Duration::from_secs(10), || {
        let r = post(&url, Some(&ask_only), &chat_body("ask", "s", false)).ok()?;
        if r.status == 200 {
            served_while_revoking += 1;
        }
        (r.status == 401).then_some(())
    });
    eprintln!("MEASURE revoked key refused after {:?}", t.elapsed());
    assert!(refused.is_some(), "a revoked key still works");
    // Of all the refused requests, none reached llama-server: only the
    // asker's allowed requests did.
    let served = wait_for(Duration::from_secs(5), || {
        let n = served_requests(&nodes[0]);
        (n >= served_before + 1 + served_while_revoking).then_some(n)
    });
    assert_eq!(served, Some(served_before + 1 + served_while_revoking));
    nodes[1].kill9();
}

/// Tasks llama-server of `node` has logged as started (one per completion).
fn served_requests(node: &AgentNode) -> usize {
    let mut n = 0;
    let Ok(rd) = std::fs::read_dir(node.state.join("instances")) else {
        return 0;
    };
    for e in rd.flatten() {
        let Ok(f) = std::fs::File::open(e.path().join("llama-server.log")) else {
            continue;
        };
        n += BufReader::new(f)
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.contains("processing task"))
            .count();
    }
    n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_a_node_loss_fails_only_requests_in_flight_and_a_replace_fails_none() {
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
    let mut c = ctl.start_and_wait(&["halo1", "halo2"]).await;
    // Floating (not pinned): a node loss moves it.
    place(&ctl, None, 1).await;
    let ep = tests::cluster::endpoint(&c, "tiny", Duration::from_secs(60))
        .await
        .expect("ready");
    let [x, y] = nodes;
    let (mut a, b) = if ep.node == x.name { (x, y) } else { (y, x) };
    let front = workstation_gateway(dir.path(), &ctl, &[]);
    let key = create_key(&ctl, dir.path(), "load", &[]);
    let secs = load_secs();

    // Node loss: the serving agent and its llama-server die together.
    let load = Load::start(&front.url, &key, "code", 20, 8);
    std::thread::sleep(Duration::from_secs(secs / 3));
    let kill_at = load.now();
    let servers = a.servers();
    a.kill9();
    for pid in servers {
        let _ = agent::procfs::signal_group(pid, rustix::process::Signal::KILL);
    }
    std::thread::sleep(Duration::from_secs(secs));
    let v = load.finish();
    eprintln!("MEASURE node loss under load: {}", summary(&v));
    let after: Vec<&Outcome> = v.iter().filter(|o| o.start > kill_at).collect();
    let in_flight = v
        .iter()
        .filter(|o| o.start <= kill_at && o.end > kill_at)
        .count();
    let failed_in_flight = v.iter().filter(|o| !o.ok && o.start <= kill_at).count();
    assert!(failed_in_flight <= in_flight, "{}", summary(&v));
    assert!(
        after.iter().all(|o| o.ok),
        "requests sent after the kill failed: {}\n{}",
        summary(&v),
        ctl.logs()
    );
    // At least one request per client thread came after the kill (how
    // many depends on the machine's speed).
    assert!(
        after.len() >= 8,
        "{} after the kill: {}",
        after.len(),
        summary(&v)
    );

    // Unplace, then place on the other node, under load: nothing fails.
    a.start();
    assert!(
        wait_nodes(
            &mut c,
            &["halo1", "halo2"],
            v1::NodeStatus::Ready,
            Duration::from_secs(20)
        )
        .await
    );
    let load = Load::start(&front.url, &key, "code", 20, 8);
    std::thread::sleep(Duration::from_secs(secs / 3));
    let o = haloctl(&ctl, dir.path())
        .args(["unplace", "tiny"])
        .output()
        .expect("unplace");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let back = a.name.clone();
    place(&ctl, Some(&back), 1).await;
    std::thread::sleep(Duration::from_secs(secs));
    let v = load.finish();
    eprintln!("MEASURE unplace + place under load: {}", summary(&v));
    assert!(v.iter().all(|o| o.ok), "{}\n{}", summary(&v), ctl.logs());
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_controller_down_running_models_keep_answering() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = tiny_speed_pair(dir.path(), 2);
    let mut ctl = tiny_controller(dir.path(), &nodes, &["--heartbeat-ms", "250"]);
    let c = ctl.start_and_wait(&["halo1", "halo2"]).await;
    place(&ctl, None, 1).await;
    let _ = tests::cluster::endpoint(&c, "tiny", Duration::from_secs(60))
        .await
        .expect("ready");
    let front = workstation_gateway(dir.path(), &ctl, &[]);
    let key = create_key(&ctl, dir.path(), "load", &[]);
    // The gateway has read the table at least once.
    let warm = eventually(Duration::from_secs(10), || {
        let (u, k) = (front.url.clone(), key.clone());
        async move {
            let a = post(
                &format!("{u}/v1/chat/completions"),
                Some(&k),
                &chat_body("code", "w", false),
            )
            .ok()?;
            complete(&a, false).then_some(())
        }
    })
    .await;
    assert!(warm.is_some());
    let load = Load::start(&front.url, &key, "code", 20, 8);
    std::thread::sleep(Duration::from_secs(1));
    ctl.kill9();
    std::thread::sleep(Duration::from_secs(load_secs()));
    let v = load.finish();
    eprintln!("MEASURE controller down under load: {}", summary(&v));
    assert!(v.iter().all(|o| o.ok), "{}", summary(&v));
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_both_serve_and_a_conversation_stays_on_its_replica() {
    let dir = tempfile::tempdir().expect("tempdir");
    let nodes = tiny_speed_pair(dir.path(), 2);
    let mut ctl = tiny_controller(dir.path(), &nodes, &["--heartbeat-ms", "250"]);
    ctl.start_and_wait(&["halo1", "halo2"]).await;
    place(&ctl, None, 2).await;
    let front = workstation_gateway(dir.path(), &ctl, &[]);
    let key = create_key(&ctl, dir.path(), "pair", &[]);
    let url = format!("{}/v1/chat/completions", front.url);
    // Both replicas ready through the gateway.
    both_replicas_serve(&url, &key);

    // 8 clients, each its own conversation, 6 turns each, concurrently,
    // with an editor's pause between turns (loads even, not saturated).
    let per_client: Vec<Vec<String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..8)
            .map(|i| {
                let (url, key) = (&url, &key);
                s.spawn(move || {
                    (0..6)
                        .filter_map(|_| {
                            std::thread::sleep(Duration::from_millis(200));
                            post(
                                url,
                                Some(key),
                                &chat_body(
                                    "tiny",
                                    &format!("conversation {i}: you are a helpful assistant"),
                                    false,
                                ),
                            )
                            .ok()
                        })
                        .filter(|a| complete(a, false))
                        .map(|a| a.node)
                        .collect::<Vec<String>>()
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().expect("client")).collect()
    });
    // A turn "lands on the same replica" when it goes where the turn
    // before went: the replica holding the conversation's prompt cache.
    let mut same = 0usize;
    let mut follow_ups = 0usize;
    let mut by_node = std::collections::BTreeMap::<String, usize>::new();
    for turns in &per_client {
        for n in turns {
            *by_node.entry(n.clone()).or_default() += 1;
        }
        for w in turns.windows(2) {
            follow_ups += 1;
            if w[0] == w[1] {
                same += 1;
            }
        }
    }
    let total: usize = by_node.values().sum();
    eprintln!(
        "MEASURE 8 clients x 6 turns: split {by_node:?}, {same}/{follow_ups} follow-up turns \
         on the replica of the turn before: {per_client:?}"
    );
    assert_eq!(total, 48, "{per_client:?}");
    assert_eq!(by_node.len(), 2, "{by_node:?}");
    assert!(
        same * 10 >= follow_ups * 9,
        "{same}/{follow_ups} follow-up turns stayed"
    );
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_replica_turns_unhealthy_and_the_gateway_serves_from_the_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Probes every second, 500 ms each, 3 misses; a long restart back-off
    // keeps the hung replica's node out while the test looks.
    let mut nodes = [
        AgentNode::new(dir.path(), "halo1", &["speed"], 2),
        AgentNode::new(dir.path(), "halo2", &["speed"], 2),
    ];
    for n in &mut nodes {
        agent::gguf::fixtures::write_tiny_llama(&n.models.join("tiny.gguf"), 7)
            .expect("tiny model");
        n.extra_args = [
            "--health-period-ms",
            "1000",
            "--health-timeout-ms",
            "500",
            "--health-failures",
            "3",
            "--restart-backoff-ms",
            "60000",
            "--restart-backoff-max-ms",
            "60000",
        ]
        .map(String::from)
        .to_vec();
        n.start();
    }
    let mut ctl = tiny_controller(dir.path(), &nodes, &["--heartbeat-ms", "250"]);
    ctl.start_and_wait(&["halo1", "halo2"]).await;
    place(&ctl, None, 2).await;
    let front = workstation_gateway(dir.path(), &ctl, &[]);
    let key = create_key(&ctl, dir.path(), "hang", &[]);
    let url = format!("{}/v1/chat/completions", front.url);
    both_replicas_serve(&url, &key);

    let mut agent1 = tests::cluster::agent_client(&nodes[0]).await;
    let mut events = agent1
        .watch(v1::WatchRequest {
            memory_period_ms: 60_000,
        })
        .await
        .expect("watch")
        .into_inner();
    let servers = nodes[0].servers();
    assert_eq!(servers.len(), 1, "{servers:?}");
    let hung = servers[0];

    // Requests keep coming while halo1's llama-server hangs.
    let load = Load::start(&front.url, &key, "tiny", 4, 2);
    tests::agent_node::signal_pid(hung, rustix::process::Signal::STOP);
    let stopped_at = Instant::now();
    let unhealthy = loop {
        let e = tokio::time::timeout(Duration::from_secs(30), events.message())
            .await
            .expect("no event within 30 s")
            .expect("watch")
            .expect("watch ended");
        if let Some(v1::agent_event::Event::Instance(i)) = e.event
            && i.state() == v1::InstanceState::Unhealthy
        {
            break i;
        }
    };
    eprintln!(
        "MEASURE SIGSTOP → unhealthy after {:?}: {}",
        stopped_at.elapsed(),
        unhealthy.last_error
    );
    assert!(
        unhealthy.last_error.contains("/health probes in a row"),
        "{}",
        unhealthy.last_error
    );
    // From now on the gateway knows: every request is answered by halo2.
    let after: Vec<Answer> = (0..6)
        .map(|i| {
            post(
                &url,
                Some(&key),
                &chat_body("tiny", &format!("after {i}"), false),
            )
        })
        .collect::<Result<_, _>>()
        .expect("post");
    std::thread::sleep(Duration::from_secs(2));
    let outcomes = load.finish();
    let slowest = outcomes.iter().map(|o| o.end - o.start).max();
    eprintln!(
        "MEASURE while hung: {}; slowest {slowest:?}",
        summary(&outcomes)
    );
    for a in &after {
        assert!(complete(a, false), "{a:?}");
        assert_eq!(a.node, "halo2", "{a:?}");
    }
    assert!(
        outcomes.iter().all(|o| o.ok),
        "requests failed while a replica hung: {}",
        summary(&outcomes)
    );
    // The hung process was killed (not merely routed around).
    assert!(
        wait_for(Duration::from_secs(10), || (!tests::agent_node::alive(
            hung
        ))
        .then_some(()))
        .is_some(),
        "the hung llama-server is still there"
    );
}
