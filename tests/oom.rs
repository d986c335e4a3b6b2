//! Out-of-memory kills and memory pressure with real processes: two
//! agents, a controller and llama-server with the tiny model. Each agent
//! reads its own copy of the Strix Halo probe tree, which the test edits
//! the way the kernel would change the real files: `MemAvailable` and PSI
//! fall, a process outside halo grows, `proc/PID/status` shows what the
//! instance uses, and `oom_kill` in `proc/vmstat` rises as the real
//! llama-server dies of a real SIGKILL.

use proto::v1;
use rustix::process::Signal;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tests::cluster::{AgentNode, Client, ControllerProc, eventually, tiny_controller};
use tests::{bin, text};

const GIB: u64 = 1 << 30;

/// Two `speed` nodes holding the tiny model, each with its own probe tree
/// in which a process outside halo (`firefox`, pid 4242) uses 1 GiB.
fn nodes(dir: &Path) -> ([AgentNode; 2], [PathBuf; 2]) {
    let mut nodes = [
        AgentNode::new(dir, "halo1", &["speed"], 4),
        AgentNode::new(dir, "halo2", &["speed"], 4),
    ];
    let probes = nodes.each_mut().map(|n| {
        agent::gguf::fixtures::write_tiny_llama(&n.models.join("tiny.gguf"), 7).expect("tiny");
        let probe = n.own_probe();
        fake_process(&probe, 4242, "firefox", GIB);
        n.start();
        probe
    });
    (nodes, probes)
}

/// Writes `proc/PID/status` in a probe tree.
fn fake_process(probe: &Path, pid: u32, name: &str, rss: u64) {
    let d = probe.join("proc").join(pid.to_string());
    std::fs::create_dir_all(&d).expect("mkdir");
    std::fs::write(
        d.join("status"),
        format!("Name:\t{name}\nVmRSS:\t{} kB\n", rss / 1024),
    )
    .expect("status");
}

/// Sets `MemAvailable` and PSI `some avg10` in a probe tree.
fn memory(probe: &Path, available: u64, psi_some: f64) {
    let meminfo = probe.join("proc/meminfo");
    let text = std::fs::read_to_string(&meminfo).expect("meminfo");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("MemAvailable:") {
                format!("MemAvailable:   {} kB\n", available / 1024)
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    std::fs::write(&meminfo, text).expect("write meminfo");
    std::fs::write(
        probe.join("proc/pressure/memory"),
        format!(
            "some avg10={psi_some:.2} avg60=0.00 avg300=0.00 total=1\n\
             full avg10=0.00 avg60=0.00 avg300=0.00 total=1\n"
        ),
    )
    .expect("write psi");
}

/// What the kernel does at an OOM kill: its counter rises and the process
/// dies of SIGKILL.
fn oom_kill(probe: &Path, pid: u32, count: u64) {
    std::fs::write(
        probe.join("proc/vmstat"),
        format!("pgfault 1\noom_kill {count}\n"),
    )
    .expect("vmstat");
    tests::agent_node::signal_pid(pid, Signal::KILL);
}

fn haloctl(c: &ControllerProc, dir: &Path, args: &[&str]) -> String {
    let o = Command::new(bin("haloctl-shim"))
        .env("HOME", dir)
        .env_remove("XDG_CONFIG_HOME")
        .envs(c.haloctl_env())
        .args(args)
        .output()
        .expect("haloctl");
    assert!(o.status.success(), "{}{}", text(&o.stdout), text(&o.stderr));
    text(&o.stdout)
}

/// The tiny placement as the controller lists it.
async fn placement(c: &mut Client) -> Option<v1::Placement> {
    c.list_placements(v1::ListPlacementsRequest {})
        .await
        .ok()?
        .into_inner()
        .placements
        .into_iter()
        .find(|p| p.name == "tiny")
}

/// The ready tiny instance's (node, pid), once there is one of
/// generation above `after`.
async fn ready(c: &Client, after: u64) -> (String, v1::Instance) {
    eventually(Duration::from_secs(90), || {
        let mut c = c.clone();
        async move {
            tests::cluster::live_instances(&mut c)
                .await
                .into_iter()
                .find(|(_, i)| i.state == v1::InstanceState::Ready as i32 && i.generation > after)
        }
    })
    .await
    .expect("no ready tiny instance")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oom_kill_is_named_and_the_placement_sized_by_what_it_used_moved_or_held() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (nodes, probes) = nodes(dir.path());
    let mut ctl = tiny_controller(dir.path(), &nodes, &[]);
    let mut c = ctl.start_and_wait(&["halo1", "halo2"]).await;
    haloctl(&ctl, dir.path(), &["place", "speed", "tiny"]);
    let (first, i) = ready(&c, 0).await;
    let pid = i.pid.expect("pid");
    let (x, y) = if first == "halo1" { (0, 1) } else { (1, 0) };
    let other = nodes[y].name.clone();

    // Memory runs short on its node: real free memory falls under the
    // floor, PSI climbs, and the browser grew 6 GiB.
    fake_process(&probes[x], 4242, "firefox", 7 * GIB);
    memory(&probes[x], GIB, 35.0);
    let shown = eventually(Duration::from_secs(20), || {
        let out = haloctl(&ctl, dir.path(), &["nodes"]);
        async move { out.contains("is under memory pressure").then_some(out) }
    })
    .await
    .expect("haloctl nodes never showed the pressure");
    println!("{shown}");
    assert!(shown.contains(&format!("node {first} is under memory pressure")));
    assert!(
        shown.contains("memory PSI some avg10 35.0 % >= 10.0 %"),
        "{shown}"
    );
    assert!(shown.contains("MemAvailable 1.0 GiB < 2.0 GiB"), "{shown}");
    assert!(
        shown.contains("firefox (pid 4242, outside halo) grew 6.0 GiB to 7.0 GiB"),
        "{shown}"
    );
    // Nothing new is placed there: a second replica goes to the other node
    // only, and the decision says why.
    let plan = haloctl(&ctl, dir.path(), &["place", "speed", "tiny", "--dry-run"]);
    assert!(plan.contains("under memory pressure"), "{plan}");

    // The kernel kills llama-server, which had grown to 100 GiB.
    fake_process(&probes[x], pid, "llama-server", 100 * GIB);
    tokio::time::sleep(Duration::from_millis(800)).await;
    oom_kill(&probes[x], pid, 1);

    let p = eventually(Duration::from_secs(30), || {
        let mut c = c.clone();
        let first = first.clone();
        async move {
            placement(&mut c)
                .await
                .filter(|p| p.learned_bytes > 0 && p.replicas[0].node != first)
        }
    })
    .await
    .expect("the placement was not sized by what it used and moved");
    assert_eq!(p.learned_bytes, 100 * GIB);
    assert!(p.held.is_empty(), "{}", p.held);
    // The agent named it and did not restart it (the controller has
    // stopped it since: no replica wants it).
    let killed = eventually(Duration::from_secs(10), || {
        let mut c = c.clone();
        let (first, rid) = (first.clone(), i.request_id.clone());
        async move {
            c.list_nodes(v1::ListNodesRequest {})
                .await
                .ok()?
                .into_inner()
                .nodes
                .into_iter()
                .filter(|n| n.node.as_ref().is_some_and(|id| id.name == first))
                .flat_map(|n| n.instances)
                .find(|j| j.request_id == rid && !j.last_error.is_empty())
                .map(|j| (first, j))
        }
    })
    .await
    .expect("the killed instance is not reported");
    let why = &killed.1.last_error;
    println!("{why}");
    assert!(
        why.contains("llama-server was killed for lack of memory: it used 100.0 GiB"),
        "{why}"
    );
    assert!(why.contains("the node had 1.0 GiB free"), "{why}");
    assert!(
        why.contains("oom_kill in /proc/vmstat went 0 -> 1"),
        "{why}"
    );
    assert_eq!(killed.1.restart_count, 0);
    let oom = killed.1.oom_kill.as_ref().expect("oom figures");
    assert_eq!(oom.used_bytes, 100 * GIB);

    // Started again on the other node, and it answers.
    let (now_on, j) = ready(&c, i.generation).await;
    assert_eq!(now_on, other);
    let status = haloctl(&ctl, dir.path(), &["status"]);
    println!("{status}");
    assert!(status.contains("(seen 100.0 GiB)"), "{status}");

    // Killed again, at 125 GiB: no node has room for that plus margin
    // (one is under pressure, the other too small), so it is held with
    // the numbers and nothing is started again.
    fake_process(&probes[y], j.pid.expect("pid"), "llama-server", 125 * GIB);
    tokio::time::sleep(Duration::from_millis(800)).await;
    oom_kill(&probes[y], j.pid.expect("pid"), 1);
    let held = eventually(Duration::from_secs(30), || {
        let mut c = c.clone();
        async move { placement(&mut c).await.filter(|p| !p.held.is_empty()) }
    })
    .await
    .expect("the placement was not held");
    println!("{}", held.held);
    assert_eq!(held.learned_bytes, 125 * GIB);
    assert!(
        held.held.contains(&format!(
            "killed for lack of memory on {other}: it used 125.0 GiB"
        )),
        "{}",
        held.held
    );
    assert!(held.held.contains("under memory pressure"), "{}", held.held);
    assert!(
        held.held.contains("needs 128.8 GiB with margin"),
        "{}",
        held.held
    );
    assert!(
        held.held.contains(&format!(
            "{other}: a replica was killed for lack of memory here"
        )),
        "{}",
        held.held
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    let running: Vec<_> = tests::cluster::live_instances(&mut c)
        .await
        .into_iter()
        .filter(|(_, i)| i.state != v1::InstanceState::Failed as i32)
        .collect();
    assert!(running.is_empty(), "started again: {running:?}");
    let status = haloctl(&ctl, dir.path(), &["status"]);
    println!("{status}");
    assert!(status.contains("held"), "{status}");
    assert!(
        status.contains("tiny is held: killed for lack of memory"),
        "{status}"
    );

    // The pressure ends: an event says so.
    memory(&probes[x], 80 * GIB, 0.1);
    let events = eventually(Duration::from_secs(20), || {
        let out = haloctl(&ctl, dir.path(), &["events"]);
        async move { out.contains("memory pressure ended").then_some(out) }
    })
    .await
    .expect("no event for the end of the pressure");
    println!("{events}");
    assert!(
        events.contains("under memory pressure: memory PSI"),
        "{events}"
    );
    assert!(events.contains("moved to"), "{events}");
    drop(nodes);
}

/// A memory cgroup directory this process may make children in: its own
/// cgroup v1 memory cgroup, or its cgroup v2 cgroup when that enables the
/// memory controller for children. `None` where there is neither.
fn own_memory_cgroup() -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "memory") {
            let dir = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
            if dir.join("memory.limit_in_bytes").is_file() {
                return Some(dir);
            }
        }
    }
    let v2 = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = Path::new("/sys/fs/cgroup").join(v2.trim_start_matches('/'));
    let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).ok()?;
    enabled
        .split_whitespace()
        .any(|c| c == "memory")
        .then_some(dir)
}

/// A cgroup removed at the end of the test.
struct TestCgroup(PathBuf);

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_oom_kill_in_the_instance_cgroup_is_named_not_retried_there_and_the_size_learned() {
    let Some(base) = own_memory_cgroup() else {
        eprintln!(
            "SKIPPED: no memory cgroup this test may make children in (cgroup v1 memory \
             hierarchy or cgroup v2 with memory in cgroup.subtree_control)"
        );
        return;
    };
    let parent = base.join(format!("halo-test-{}", std::process::id()));
    std::fs::create_dir(&parent).expect("create a test cgroup");
    let parent = TestCgroup(parent);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut nodes = [
        AgentNode::new(dir.path(), "halo1", &["speed"], 4),
        AgentNode::new(dir.path(), "halo2", &["speed"], 4),
    ];
    for n in &mut nodes {
        agent::gguf::fixtures::write_tiny_llama(&n.models.join("tiny.gguf"), 7).expect("tiny");
    }
    // halo1 puts each instance in its own cgroup with 4 MiB: the tiny
    // model's llama-server needs about 6 MiB, so the kernel kills it.
    nodes[0].extra_args = vec![
        "--instance-cgroup".into(),
        parent.0.display().to_string(),
        "--instance-memory-limit".into(),
        "4MiB".into(),
    ];
    nodes[0].start();
    let mut ctl = tiny_controller(dir.path(), &nodes, &[]);
    let mut c = ctl.start_and_wait(&["halo1"]).await;
    let placed = c
        .place(v1::PlaceRequest {
            role: "speed".into(),
            model: "tiny".into(),
            ..v1::PlaceRequest::default()
        })
        .await
        .expect("place")
        .into_inner();
    assert!(placed.accepted, "{:?}", placed.explanation);

    // Killed by the kernel in its cgroup, named with the numbers, and held
    // rather than started again on halo1 (halo2 is down).
    let held = eventually(Duration::from_secs(60), || {
        let mut c = c.clone();
        async move { placement(&mut c).await.filter(|p| !p.held.is_empty()) }
    })
    .await
    .unwrap_or_else(|| panic!("never held:\n{}", ctl.logs()));
    println!("{}", held.held);
    assert!(
        held.held.contains("killed for lack of memory on halo1"),
        "{}",
        held.held
    );
    assert!(
        held.held.contains("halo1: a replica was killed"),
        "{}",
        held.held
    );
    assert!(held.held.contains("halo2: not ready"), "{}", held.held);
    // The size is learned: what its cgroup saw it use, above the estimate.
    assert!(
        held.learned_bytes >= 3 << 20 && held.learned_bytes > held.estimate_bytes,
        "learned {} estimate {}",
        held.learned_bytes,
        held.estimate_bytes
    );
    let tried: Vec<v1::Instance> = c
        .list_nodes(v1::ListNodesRequest {})
        .await
        .expect("nodes")
        .into_inner()
        .nodes
        .into_iter()
        .filter(|n| n.node.as_ref().is_some_and(|id| id.name == "halo1"))
        .flat_map(|n| n.instances)
        .filter(|i| i.request_id.starts_with("halo.tiny."))
        .collect();
    assert_eq!(tried.len(), 1, "started more than once on halo1: {tried:?}");
    let why = &tried[0].last_error;
    println!("{why}");
    assert!(
        why.contains("llama-server was killed for lack of memory: it used"),
        "{why}"
    );
    assert!(why.contains("oom_kill in its cgroup's"), "{why}");
    assert!(why.contains("its cgroup's limit is 4.0 MiB"), "{why}");
    assert_eq!(tried[0].restart_count, 0);
    // Its cgroup is gone with it.
    let leftover: Vec<_> = std::fs::read_dir(&parent.0)
        .expect("read cgroup")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("halo-"))
        .map(|e| e.file_name())
        .collect();
    assert!(leftover.is_empty(), "instance cgroups left: {leftover:?}");

    // A node with room comes: the hold is lifted there, and it answers.
    nodes[1].start();
    let (on, i) = ready(&c, 0).await;
    assert_eq!(on, "halo2");
    let answer = tests::cluster::chat(&i.endpoint, &i.api_key, "tiny");
    assert!(answer.is_ok(), "{answer:?}");
    drop(nodes);
    drop(parent);
}
