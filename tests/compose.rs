//! Fault tests on the docker-compose cluster (`deploy/compose/`): etcd, two
//! controllers and two agents (halo1 `speed`, halo2 `reasoning`, each with
//! the simulated 128 GB Strix Halo memory tree, the tiny real model and
//! sparse big models, and each serving the gateway over HTTPS) in
//! containers built `FROM scratch`, with real llama-server instances inside
//! the agent containers. Each test starts its own cluster (its own compose
//! project and subnet), breaks it the way a user's cluster breaks (`docker
//! kill`, `pause`, `network disconnect`, `restart`), asserts what a user
//! would see, and prints the measured times. Every gRPC link speaks mutual
//! TLS with certificates for the containers' addresses from the test
//! process's CA ([`tests::pki`]).
//!
//! They need images built from this build: run them with
//! `bash tests/compose.sh` (which sets `HALO_COMPOSE_TAG`); the normal run
//! skips them (`#[ignore]`, listed as skipped). Run without the images,
//! they fail loudly instead of passing.

use controller::store::{LEADER, Store};
use proto::v1;
use proto::v1::agent_service_client::AgentServiceClient;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tests::cluster::live_instances;
use tests::cluster::{Client, channel, connect, eventually, wait_nodes};
use tests::cluster::{chat, endpoint};
use tests::text;
use tonic::Code;

/// The cluster's timings (deploy/compose/docker-compose.yml).
const GRACE: Duration = Duration::from_secs(2);
const MOVE_AFTER: Duration = Duration::from_secs(10);
const LEASE: Duration = Duration::from_secs(3);
/// The agent's heartbeat (the controller's default memory sample period).
const HEARTBEAT: Duration = Duration::from_millis(500);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_owned()
}

/// The image tag `tests/compose.sh` built.
fn image_tag() -> String {
    match std::env::var("HALO_COMPOSE_TAG") {
        Ok(t) if !t.is_empty() => t,
        _ => panic!(
            "HALO_COMPOSE_TAG is not set: the compose fault tests need the images built from \
             this build.\nRun them with:  bash tests/compose.sh"
        ),
    }
}

fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("docker {args:?}: {e}"))
}

/// A compose project: its data directory, subnet, and the containers.
/// `down -v` on drop; every container's log is printed when a test fails.
struct Cluster {
    project: String,
    net: String,
    tag: String,
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Writes the models, brings the project up on a free subnet and waits
    /// until both nodes are ready and a controller leads.
    async fn up(test: &str) -> Cluster {
        let tag = image_tag();
        let dir = tempfile::tempdir().expect("tempdir");
        write_models(dir.path());
        let pid = std::process::id();
        let mut cl = Cluster {
            project: format!("halo-{test}-{pid}"),
            net: String::new(),
            tag,
            dir,
        };
        let mut last = String::new();
        for attempt in 0..6u32 {
            // 172.29.X.0/24, X from the pid: concurrent runs do not share
            // a subnet; another network in the way moves it on.
            cl.net = format!("172.29.{}", 10 + (pid + attempt * 37) % 240);
            cl.write_certs();
            let started = Instant::now();
            let out = cl.compose(&["up", "-d", "--no-build"]);
            if out.status.success() {
                eprintln!(
                    "compose: project {} on {}.0/24 up in {:.1?}",
                    cl.project,
                    cl.net,
                    started.elapsed()
                );
                cl.wait_ready().await;
                return cl;
            }
            last = text(&out.stderr);
            let _ = cl.compose(&["down", "-v", "-t", "1"]);
            assert!(
                last.contains("overlap") || last.contains("Pool"),
                "docker-compose up failed:\n{last}"
            );
        }
        panic!("no free subnet for the compose network:\n{last}");
    }

    /// Certificates for this subnet's addresses in `DIR/tls`, as the
    /// compose file names them, readable by the images' user (uid 10001).
    fn write_certs(&self) {
        let tls = self.dir.path().join("tls");
        for (role, svc) in [
            ("agent", "halo1"),
            ("agent", "halo2"),
            ("controller", "controller1"),
            ("controller", "controller2"),
        ] {
            tests::pki::pki().export(&tls, role, svc, &[&self.ip(svc), svc], svc);
        }
    }

    fn compose_cmd(&self) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(repo().join("deploy/compose"))
            .arg("-f")
            .arg("docker-compose.yml")
            .arg("-p")
            .arg(&self.project)
            .env("HALO_IMAGE_TAG", &self.tag)
            .env("HALO_NET", &self.net)
            .env("HALO_MODELS", self.dir.path().join("models"))
            .env("HALO_TLS_DIR", self.dir.path().join("tls"))
            .env("HALO_CATALOG", repo().join("deploy/compose/catalog.toml"))
            .env(
                "HALO_PROBE_ROOT",
                repo().join("tests/fixtures/probe/strix-halo-128g"),
            );
        cmd
    }

    /// `docker-compose ARGS` in this project.
    fn compose(&self, args: &[&str]) -> Output {
        self.compose_cmd().args(args).output().unwrap_or_else(|e| {
            panic!("docker-compose {args:?}: {e} (apt-get install docker-compose)")
        })
    }

    /// `docker ACTION CONTAINER…` on services (kill, pause, unpause, start,
    /// restart): the plain docker client, faster than docker-compose, so
    /// measured times start when the fault happens.
    fn fault(&self, action: &str, services: &[&str]) {
        let containers: Vec<String> = services.iter().map(|s| self.container(s)).collect();
        let mut args = vec![action];
        args.extend(containers.iter().map(String::as_str));
        let out = docker(&args);
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            text(&out.stderr)
        );
    }

    /// The container of `service`.
    fn container(&self, service: &str) -> String {
        format!("{}_{service}_1", self.project)
    }

    fn network(&self) -> String {
        format!("{}_halo", self.project)
    }

    /// The fixed address of `service` on the private network.
    fn ip(&self, service: &str) -> String {
        let host = match service {
            "etcd" => 10,
            "controller1" => 11,
            "controller2" => 12,
            "halo1" => 21,
            "halo2" => 22,
            other => panic!("no service {other}"),
        };
        format!("{}.{host}", self.net)
    }

    fn controller_url(&self, service: &str) -> String {
        format!("https://{}:7300", self.ip(service))
    }

    /// The gateway agent `service` serves (HTTPS, its own certificate).
    fn gateway_url(&self, service: &str) -> String {
        format!("https://{}:8443", self.ip(service))
    }

    async fn client(&self, service: &str) -> Client {
        connect(&self.controller_url(service)).await
    }

    /// The id of the leading controller, from etcd's leader key.
    async fn leader(&self) -> Option<String> {
        let etcd = controller::store::etcd::EtcdStore::connect(&[format!(
            "http://{}:2379",
            self.ip("etcd")
        )])
        .await
        .ok()?;
        let kv = tokio::time::timeout(Duration::from_secs(2), etcd.get(LEADER))
            .await
            .ok()?
            .ok()??;
        Some(kv.value)
    }

    /// Waits until `want` (any controller when `None`) leads.
    async fn wait_leader(&self, want: Option<&str>, timeout: Duration) -> Option<String> {
        eventually(timeout, || async {
            self.leader().await.filter(|l| want.is_none_or(|w| w == l))
        })
        .await
    }

    /// The controller that accepts a write (re-putting the catalog's
    /// `tiny` entry unchanged), trying both until `timeout`, and how long
    /// that took. Right after etcd restarts, its leader key can still name
    /// a controller that already stepped down (etcd restores leases with a
    /// fresh TTL), so this, not the key, is what a user meets.
    async fn writable_leader(&self, timeout: Duration) -> Option<(String, Duration)> {
        let t = Instant::now();
        eventually(timeout, || async {
            for svc in ["controller1", "controller2"] {
                let Ok(ch) = channel(&self.controller_url(svc), "admin").connect().await else {
                    continue;
                };
                let mut c = Client::new(ch);
                let Ok(catalog) = c.list_catalog(v1::ListCatalogRequest::default()).await else {
                    continue;
                };
                let entry = catalog
                    .into_inner()
                    .entries
                    .into_iter()
                    .find(|e| e.name == "tiny");
                if entry.is_some()
                    && c.put_catalog_entry(v1::PutCatalogEntryRequest { entry })
                        .await
                        .is_ok()
                {
                    return Some((svc.to_owned(), t.elapsed()));
                }
            }
            None
        })
        .await
    }

    async fn wait_ready(&self) {
        for svc in ["controller1", "controller2"] {
            let mut c = self.client(svc).await;
            assert!(
                wait_nodes(
                    &mut c,
                    &["halo1", "halo2"],
                    v1::NodeStatus::Ready,
                    Duration::from_secs(60)
                )
                .await,
                "{svc} never saw both nodes ready"
            );
        }
        assert!(
            self.wait_leader(None, Duration::from_secs(30))
                .await
                .is_some(),
            "no controller leads"
        );
    }

    /// llama-server processes running in `service`'s container
    /// (`docker top`; none when the container is not running).
    fn llama_servers(&self, service: &str) -> usize {
        let out = docker(&["top", &self.container(service), "-eo", "pid,args"]);
        if !out.status.success() {
            return 0;
        }
        text(&out.stdout)
            .lines()
            .filter(|l| l.contains("/llama-server"))
            .count()
    }

    fn all_llama_servers(&self) -> usize {
        self.llama_servers("halo1") + self.llama_servers("halo2")
    }

    /// Every container's log.
    fn logs(&self) -> String {
        let out = self.compose(&["logs", "--no-color", "--timestamps"]);
        text(&out.stdout) + &text(&out.stderr)
    }

    /// One service's log.
    fn log(&self, service: &str) -> String {
        let out = docker(&["logs", &self.container(service)]);
        text(&out.stdout) + &text(&out.stderr)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- compose project {} ({}.0/24) logs -----\n{}",
                self.project,
                self.net,
                self.logs()
            );
        }
        // A paused container cannot be stopped; a disconnected one is
        // removed with the network anyway.
        let _ = self.compose(&["unpause"]);
        let out = self.compose(&["down", "-v", "-t", "2", "--remove-orphans"]);
        if !out.status.success() {
            eprintln!("docker-compose down: {}", text(&out.stderr));
        }
    }
}

/// Per node: the tiny real model, and sparse big models (real headers over
/// file holes) as on the real boxes: halo1 (speed) a 34 GB coder model,
/// halo2 (reasoning) a 110 GB and a 170 GB one. Readable by uid 10001.
fn write_models(root: &Path) {
    use agent::gguf::fixtures::{SparseModel, VocabStyle, write_sparse_with, write_tiny_llama};
    use std::os::unix::fs::PermissionsExt;
    let models = root.join("models");
    let nodes: [(&str, &[SparseModel]); 2] = [
        ("halo1", &[SparseModel::Qwen3Coder30B]),
        (
            "halo2",
            &[SparseModel::Qwen3_235B, SparseModel::DeepSeekV31],
        ),
    ];
    for (node, sparse) in nodes {
        let d = models.join(node);
        std::fs::create_dir_all(&d).expect("mkdir models");
        write_tiny_llama(&d.join("tiny.gguf"), 7).expect("tiny model");
        for m in sparse {
            let path = d.join(format!("{}.gguf", m.spec().name));
            write_sparse_with(*m, &path, VocabStyle::SizeOnly).expect("sparse model");
        }
        for f in std::fs::read_dir(&d).expect("ls").flatten() {
            std::fs::set_permissions(f.path(), std::fs::Permissions::from_mode(0o644))
                .expect("chmod");
        }
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    for d in [root, &models] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
}

/// A placement of the tiny model named `name`: with `role` on its nodes,
/// or floating over every node (`any_node`) when `role` is empty.
fn tiny(name: &str, role: &str) -> v1::PlaceRequest {
    v1::PlaceRequest {
        role: role.into(),
        model: "tiny".into(),
        name: name.into(),
        any_node: role.is_empty(),
        ..v1::PlaceRequest::default()
    }
}

/// Places through `c`, retrying while it is not (yet) the leader; the
/// time it took.
async fn place(c: &Client, req: v1::PlaceRequest, timeout: Duration) -> Option<Duration> {
    let t = Instant::now();
    eventually(timeout, || {
        let mut c = c.clone();
        let req = req.clone();
        async move { c.place(req).await.ok().filter(|r| r.get_ref().accepted) }
    })
    .await
    .map(|_| t.elapsed())
}

async fn placements(c: &Client) -> Vec<v1::Placement> {
    c.clone()
        .list_placements(v1::ListPlacementsRequest::default())
        .await
        .map(|r| r.into_inner().placements)
        .unwrap_or_default()
}

/// (node, generation) of placement `name`'s first replica.
async fn replica(c: &Client, name: &str) -> Option<(String, u64)> {
    placements(c)
        .await
        .into_iter()
        .find(|p| p.name == name)
        .and_then(|p| p.replicas.into_iter().next())
        .map(|r| (r.node, r.generation))
}

/// How long until the controller reports `node` with `status`.
async fn wait_status(
    c: &Client,
    node: &str,
    status: v1::NodeStatus,
    timeout: Duration,
) -> Option<Duration> {
    let t = Instant::now();
    let mut c = c.clone();
    wait_nodes(&mut c, &[node], status, timeout)
        .await
        .then(|| t.elapsed())
}

/// The code endpoint of placement `name` once it is ready on `node`.
async fn endpoint_on(
    c: &Client,
    name: &str,
    node: &str,
    timeout: Duration,
) -> Option<v1::Endpoint> {
    eventually(timeout, || {
        let mut c = c.clone();
        async move {
            c.endpoints(v1::EndpointsRequest::default())
                .await
                .ok()?
                .into_inner()
                .endpoints
                .into_iter()
                .find(|e| {
                    e.placement == name && e.node == node && e.mode == v1::EditorMode::Code as i32
                })
        }
    })
    .await
}

fn other_node(node: &str) -> &'static str {
    if node == "halo1" { "halo2" } else { "halo1" }
}

/// After a node comes back: exactly one instance of everything placed, on
/// `node`, in the controller's view and as llama-server processes in the
/// containers, and still so 5 s later. The time until it first held.
async fn exactly_one_on(cl: &Cluster, c: &Client, node: &str) -> Duration {
    let t = Instant::now();
    let one = |c: Client| async move {
        let mut c = c;
        let live = live_instances(&mut c).await;
        (live.len() == 1 && live[0].0 == node && cl.all_llama_servers() == 1).then_some(())
    };
    assert!(
        eventually(Duration::from_secs(60), || one(c.clone()))
            .await
            .is_some(),
        "not exactly one instance on {node}: {:?}, llama-server processes halo1 {} halo2 {}",
        live_instances(&mut c.clone()).await,
        cl.llama_servers("halo1"),
        cl.llama_servers("halo2"),
    );
    let settled = t.elapsed();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(one(c.clone()).await.is_some(), "a second instance appeared");
    }
    settled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the compose images: bash tests/compose.sh"]
async fn compose_killed_node_is_detected_its_model_moves_and_one_instance_remains() {
    let cl = Cluster::up("kill").await;
    let leader = cl.wait_leader(None, LEASE * 10).await.expect("a leader");
    let c = cl.client(&leader).await;

    // The simulated 128 GB Strix Halo: the 110 GB model fits halo2 (this
    // machine has far less), the 170 GB one fits no node.
    let mut dry = tiny("", "reasoning");
    dry.dry_run = true;
    dry.model = "qwen3-235b".into();
    let r = c
        .clone()
        .place(dry.clone())
        .await
        .expect("plan")
        .into_inner();
    assert!(r.accepted, "qwen3-235b does not fit halo2: {:?}", r.fits);
    dry.model = "deepseek-v3.1-1bit".into();
    let r = c.clone().place(dry).await.expect("plan").into_inner();
    assert!(!r.accepted, "deepseek-v3.1-1bit fits a 128 GB node?");

    let t = Instant::now();
    place(&c, tiny("tiny", ""), LEASE * 5)
        .await
        .expect("placed");
    let first = endpoint(&c, "tiny", Duration::from_secs(120))
        .await
        .expect("the placement never became ready");
    let ready = t.elapsed();
    chat(&first.base_url, &first.api_key, "tiny").expect("chat on the first node");
    let host = first.node.clone();
    let other = other_node(&host);
    assert_eq!(cl.all_llama_servers(), 1);

    let t0 = Instant::now();
    cl.fault("kill", &[&host]);
    let detected = wait_status(&c, &host, v1::NodeStatus::Unreachable, GRACE * 5)
        .await
        .expect("the killed node was never seen unreachable");
    // When the controller re-assigns the replica, and when it answers.
    let decided = eventually(MOVE_AFTER * 4, || async {
        replica(&c, "tiny")
            .await
            .filter(|(n, _)| n == other)
            .map(|_| t0.elapsed())
    })
    .await
    .expect("the placement never moved");
    let moved = endpoint_on(&c, "tiny", other, Duration::from_secs(60))
        .await
        .expect("never ready on the other node");
    let reply = chat(&moved.base_url, &moved.api_key, "tiny").expect("chat on the other node");
    let answered = t0.elapsed();
    assert_eq!(replica(&c, "tiny").await, Some((other.to_owned(), 2)));

    let t1 = Instant::now();
    cl.fault("start", &[&host]);
    wait_status(&c, &host, v1::NodeStatus::Ready, Duration::from_secs(60))
        .await
        .expect("the node never came back");
    let back = t1.elapsed();
    let one = exactly_one_on(&cl, &c, other).await;
    chat(&moved.base_url, &moved.api_key, "tiny").expect("still answering");
    eprintln!(
        "TIMING compose node kill: first ready {ready:.1?} after place; docker kill {host} -> \
         unreachable {detected:.1?} (grace 2 s), moved to {other} {decided:.1?} (period 10 s), \
         answering there {answered:.1?} ({reply:?}); docker start {host} -> ready {back:.1?}, \
         exactly one instance {:.1?} after the start",
        back + one,
    );
    assert!(
        detected <= GRACE + HEARTBEAT + Duration::from_millis(1500),
        "detection took {detected:?} (grace {GRACE:?})"
    );
    assert!(
        decided >= MOVE_AFTER - Duration::from_secs(1),
        "moved after {decided:?}, before the period {MOVE_AFTER:?}"
    );
}

/// A node cut off without dying.
#[derive(Debug, Clone, Copy)]
enum Cut {
    /// `docker pause`: the agent and its llama-server frozen.
    Pause,
    /// `docker network disconnect`: both keep running, unreachable.
    Disconnect,
}

impl Cluster {
    fn cut(&self, node: &str, how: Cut) {
        match how {
            Cut::Pause => self.fault("pause", &[node]),
            Cut::Disconnect => {
                let out = docker(&[
                    "network",
                    "disconnect",
                    &self.network(),
                    &self.container(node),
                ]);
                assert!(out.status.success(), "{}", text(&out.stderr));
            }
        }
    }

    fn heal(&self, node: &str, how: Cut) {
        match how {
            Cut::Pause => self.fault("unpause", &[node]),
            Cut::Disconnect => {
                let out = docker(&[
                    "network",
                    "connect",
                    "--ip",
                    &self.ip(node),
                    &self.network(),
                    &self.container(node),
                ]);
                assert!(out.status.success(), "{}", text(&out.stderr));
            }
        }
    }
}

/// Cuts the node serving a floating placement off for 5 s (longer than
/// the grace, shorter than the period): it is seen unreachable, nothing
/// moves, then or after. Then for the period + 5 s: the placement moves
/// and answers on the other node; when the node is back, one instance
/// remains.
async fn cut_short_then_long(test: &str, how: Cut) {
    let cl = Cluster::up(test).await;
    let leader = cl.wait_leader(None, LEASE * 10).await.expect("a leader");
    let c = cl.client(&leader).await;
    place(&c, tiny("tiny", ""), LEASE * 5)
        .await
        .expect("placed");
    let first = endpoint(&c, "tiny", Duration::from_secs(120))
        .await
        .expect("the placement never became ready");
    chat(&first.base_url, &first.api_key, "tiny").expect("chat");
    let host = first.node.clone();
    let other = other_node(&host);
    let instance = live_instances(&mut c.clone()).await[0].1.id.clone();

    // Short: unreachable, nothing moves.
    let short = Duration::from_secs(5);
    let t0 = Instant::now();
    cl.cut(&host, how);
    let detected = wait_status(&c, &host, v1::NodeStatus::Unreachable, GRACE * 5)
        .await
        .expect("the cut-off node was never seen unreachable");
    while t0.elapsed() < short {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            replica(&c, "tiny").await,
            Some((host.clone(), 1)),
            "a {short:?} {how:?} moved the placement"
        );
    }
    cl.heal(&host, how);
    let healed = t0.elapsed();
    let back = wait_status(&c, &host, v1::NodeStatus::Ready, Duration::from_secs(30))
        .await
        .expect("the node never came back");
    // Past the period counted from the cut: still nothing moved.
    while t0.elapsed() < MOVE_AFTER + Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            replica(&c, "tiny").await,
            Some((host.clone(), 1)),
            "the placement moved after a short {how:?}"
        );
    }
    let live = live_instances(&mut c.clone()).await;
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].1.id, instance, "the instance was replaced");
    assert_eq!(cl.all_llama_servers(), 1);
    chat(&first.base_url, &first.api_key, "tiny").expect("chat after the short cut");

    // Long: moves after the period, one instance once the node is back.
    let long = MOVE_AFTER + Duration::from_secs(5);
    let t1 = Instant::now();
    cl.cut(&host, how);
    let detected_long = wait_status(&c, &host, v1::NodeStatus::Unreachable, GRACE * 5)
        .await
        .expect("the cut-off node was never seen unreachable");
    let decided = eventually(MOVE_AFTER * 4, || async {
        replica(&c, "tiny")
            .await
            .filter(|(n, _)| n == other)
            .map(|_| t1.elapsed())
    })
    .await
    .expect("the placement never moved");
    let moved = endpoint_on(&c, "tiny", other, Duration::from_secs(60))
        .await
        .expect("never ready on the other node");
    chat(&moved.base_url, &moved.api_key, "tiny").expect("chat on the other node");
    let answered = t1.elapsed();
    while t1.elapsed() < long {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    cl.heal(&host, how);
    let healed_long = t1.elapsed();
    let back_long = wait_status(&c, &host, v1::NodeStatus::Ready, Duration::from_secs(30))
        .await
        .expect("the node never came back");
    let one = exactly_one_on(&cl, &c, other).await;
    chat(&moved.base_url, &moved.api_key, "tiny").expect("still answering");
    eprintln!(
        "TIMING compose {how:?} {host}, short ({healed:.1?}): unreachable {detected:.1?}, ready \
         again {back:.1?} after the heal, nothing moved; long ({healed_long:.1?}): unreachable \
         {detected_long:.1?}, moved to {other} {decided:.1?}, answering there {answered:.1?}, \
         back {back_long:.1?} after the heal, exactly one instance {:.1?} after the heal",
        back_long + one
    );
    assert!(
        decided >= MOVE_AFTER - Duration::from_secs(1),
        "moved after {decided:?}, before the period {MOVE_AFTER:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the compose images: bash tests/compose.sh"]
async fn compose_paused_node_moves_nothing_when_short_and_its_model_when_long() {
    cut_short_then_long("pause", Cut::Pause).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the compose images: bash tests/compose.sh"]
async fn compose_disconnected_node_moves_nothing_when_short_and_its_model_when_long() {
    cut_short_then_long("netcut", Cut::Disconnect).await;
}

/// The term from a controller log line `elected leader term=N`.
fn last_term(log: &str) -> Option<u64> {
    log.lines()
        .filter(|l| l.contains("elected leader"))
        .filter_map(|l| {
            l.split("term=")
                .nth(1)?
                .split(|ch: char| !ch.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .next_back()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the compose images: bash tests/compose.sh"]
async fn compose_killed_leader_is_replaced_and_a_paused_one_on_waking_is_refused() {
    let cl = Cluster::up("leader").await;
    let first = cl.wait_leader(None, LEASE * 10).await.expect("a leader");
    let standby = if first == "controller1" {
        "controller2"
    } else {
        "controller1"
    };
    let c1 = cl.client(&first).await;
    place(&c1, tiny("t1", "speed"), LEASE * 5)
        .await
        .expect("placed");
    endpoint(&c1, "t1", Duration::from_secs(120))
        .await
        .expect("t1 never ready");
    let t1_instance = live_instances(&mut c1.clone()).await[0].1.id.clone();

    // Kill the leader: the standby leads and reconciles (starts t2).
    let c2 = cl.client(standby).await;
    let refused = c2.clone().place(tiny("t-standby", "speed")).await;
    assert_eq!(
        refused.map(|_| ()).map_err(|e| e.code()),
        Err(Code::FailedPrecondition),
        "the standby wrote"
    );
    let t0 = Instant::now();
    cl.fault("kill", &[&first]);
    cl.wait_leader(Some(standby), LEASE * 10)
        .await
        .expect("the standby never led");
    let took_over = t0.elapsed();
    place(&c2, tiny("t2", "speed"), LEASE * 5)
        .await
        .expect("the new leader never placed");
    endpoint(&c2, "t2", Duration::from_secs(60))
        .await
        .expect("the new leader did not start t2");
    let reconciled = t0.elapsed();
    let live = live_instances(&mut c2.clone()).await;
    assert_eq!(live.len(), 2, "{live:?}");
    assert!(
        live.iter().any(|(_, i)| i.id == t1_instance),
        "t1 was restarted"
    );

    // The old leader comes back as standby; then the new leader is paused
    // past its lease: the old one leads again and starts t3.
    cl.fault("start", &[&first]);
    let c1 = cl.client(&first).await;
    let t1 = Instant::now();
    cl.fault("pause", &[standby]);
    cl.wait_leader(Some(&first), LEASE * 10)
        .await
        .expect("no takeover from the paused leader");
    let took_back = t1.elapsed();
    place(&c1, tiny("t3", "speed"), LEASE * 5)
        .await
        .expect("the leader never placed t3");
    endpoint(&c1, "t3", Duration::from_secs(60))
        .await
        .expect("t3 never ready");
    let paused_term = last_term(&cl.log(standby)).expect("the paused leader's term");
    let term = last_term(&cl.log(&first)).expect("the leader's term");
    assert!(term > paused_term, "{term} <= {paused_term}");

    // Wake the paused leader: its writes and its commands are refused.
    let log_before = cl.log(standby).len();
    cl.fault("unpause", &[standby]);
    let woke = Instant::now();
    let write = c2
        .clone()
        .place(tiny("t4", "speed"))
        .await
        .expect_err("the woken leader wrote");
    assert_eq!(write.code(), Code::FailedPrecondition, "{write:?}");
    let delete = c2
        .clone()
        .unplace(v1::UnplaceRequest { name: "t1".into() })
        .await
        .expect_err("the woken leader deleted");
    assert_eq!(delete.code(), Code::FailedPrecondition, "{delete:?}");
    let refused_after = woke.elapsed();
    let mut agent = AgentServiceClient::new(
        channel(&format!("https://{}:7301", cl.ip("halo1")), "controller")
            .connect()
            .await
            .expect("agent halo1"),
    );
    let fenced = agent
        .stop_instance(v1::StopInstanceRequest {
            instance_id: t1_instance.clone(),
            leader_revision: paused_term,
        })
        .await
        .expect_err("halo1 took a stop with the old term");
    assert_eq!(fenced.code(), Code::FailedPrecondition, "{fenced:?}");
    // Give it time to act on stale beliefs, if it would: it does not.
    tokio::time::sleep(LEASE + Duration::from_secs(1)).await;
    let log = cl.log(standby);
    let after = &log[log_before.min(log.len())..];
    for kind in ["\"started\"", "\"stopped\"", "\"moved\"", "\"placed\""] {
        assert!(
            !after.contains(kind),
            "the woken leader acted ({kind}):\n{after}"
        );
    }
    let live = live_instances(&mut c1.clone()).await;
    assert_eq!(live.len(), 3, "{live:?}");
    assert!(live.iter().any(|(_, i)| i.id == t1_instance));
    assert_eq!(placements(&c1).await.len(), 3);
    eprintln!(
        "TIMING compose leader: docker kill {first} -> {standby} leads {took_over:.1?} (lease 3 s), \
         its first placement answering {reconciled:.1?}; docker pause {standby} -> {first} leads \
         {took_back:.1?}; woken {standby}: writes refused within {refused_after:.1?}, halo1 refuses \
         term {paused_term} (current {term})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the compose images: bash tests/compose.sh"]
async fn compose_etcd_restart_loses_no_placement_and_the_cluster_converges() {
    let cl = Cluster::up("etcd").await;
    let leader = cl.wait_leader(None, LEASE * 10).await.expect("a leader");
    let c = cl.client(&leader).await;
    for (name, role) in [("fast", "speed"), ("deep", "reasoning")] {
        place(&c, tiny(name, role), LEASE * 5)
            .await
            .expect("placed");
        endpoint(&c, name, Duration::from_secs(120))
            .await
            .expect("never ready");
    }
    let before: Vec<(String, String)> = {
        let mut v: Vec<_> = live_instances(&mut c.clone())
            .await
            .into_iter()
            .map(|(n, i)| (n, i.id))
            .collect();
        v.sort();
        v
    };
    assert_eq!(before.len(), 2);

    let t0 = Instant::now();
    cl.fault("restart", &["etcd"]);
    let restarted = t0.elapsed();
    let (leader_again, _) = cl
        .writable_leader(Duration::from_secs(60))
        .await
        .expect("no controller accepts writes after the etcd restart");
    let led = t0.elapsed();
    let c = cl.client(&leader_again).await;
    place(&c, tiny("after", ""), LEASE * 5)
        .await
        .expect("no placement accepted after the etcd restart");
    endpoint(&c, "after", Duration::from_secs(60))
        .await
        .expect("the new placement never started");
    let converged = t0.elapsed();

    let names: Vec<String> = {
        let mut v: Vec<_> = placements(&c).await.into_iter().map(|p| p.name).collect();
        v.sort();
        v
    };
    assert_eq!(names, ["after", "deep", "fast"], "a placement was lost");
    for (name, node) in [("fast", "halo1"), ("deep", "halo2")] {
        assert_eq!(replica(&c, name).await, Some((node.to_owned(), 1)));
        let e = endpoint(&c, name, Duration::from_secs(5))
            .await
            .expect("endpoint");
        chat(&e.base_url, &e.api_key, "tiny").expect("chat");
    }
    let live = live_instances(&mut c.clone()).await;
    assert_eq!(live.len(), 3, "{live:?}");
    for (node, id) in &before {
        assert!(
            live.iter().any(|(n, i)| n == node && &i.id == id),
            "{id} on {node} was restarted: {live:?}"
        );
    }
    assert_eq!(cl.all_llama_servers(), 3);
    eprintln!(
        "TIMING compose etcd restart: docker restart etcd took {restarted:.1?}; \
         {leader_again} accepts writes {led:.1?}, a new placement answers \
         {converged:.1?} after the restart began; no placement lost, no instance restarted"
    );
}

/// Chat completions in a loop until `stop`: (when, latency or error).
fn load_loop(
    base: String,
    key: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Instant, Result<Duration, String>)>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let t = Instant::now();
            let r = chat(&base, &key, "tiny")
                .map(|_| t.elapsed())
                .map_err(|e| e.to_string());
            out.push((t, r));
            // ~40 requests a second: a busy editor, not a CPU hog.
            std::thread::sleep(Duration::from_millis(20));
        }
        out
    })
}

/// An HTTPS client for the gateways that trusts only the test CA (the
/// agents serve the gateway with their own certificates, issued by it).
fn gateway_http() -> ureq::Agent {
    use ureq::tls::{Certificate, RootCerts, TlsConfig, TlsProvider};
    let pem = std::fs::read(tests::pki::pki().ca()).expect("CA certificate");
    let ca = Certificate::from_pem(&pem).expect("CA PEM").to_owned();
    let tls = TlsConfig::builder()
        .provider(TlsProvider::Rustls)
        .root_certs(RootCerts::Specific(Arc::new(vec![ca])))
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .build();
    ureq::Agent::config_builder()
        .tls_config(tls)
        .timeout_global(Some(Duration::from_secs(60)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// One chat completion through a gateway: the node that served it (the
/// gateway's `x-halo-node`), or what went wrong. A stream counts only when
/// it ends with `data: [DONE]`.
fn gateway_chat(
    http: &ureq::Agent,
    url: &str,
    key: &str,
    model: &str,
    stream: bool,
) -> Result<String, String> {
    use std::io::Read;
    let body = serde_json::json!({
        "model": model,
        "stream": stream,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "Hello"}],
    });
    let mut resp = http
        .post(&format!("{url}/v1/chat/completions"))
        .header("Authorization", &format!("Bearer {key}"))
        .header("Content-Type", "application/json")
        .send(body.to_string())
        .map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let node = resp
        .headers()
        .get("x-halo-node")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let mut text = String::new();
    resp.body_mut()
        .as_reader()
        .read_to_string(&mut text)
        .map_err(|e| format!("{status}, body cut: {e}"))?;
    let complete = text.contains("\"choices\"") && (!stream || text.contains("data: [DONE]"));
    if status == 200 && complete {
        Ok(node)
    } else {
        Err(format!(
            "{status} {}",
            text.chars().take(300).collect::<String>()
        ))
    }
}

/// A request through a gateway: when it started, whether it streamed,
/// which gateway took it, and the serving node or the error.
struct ViaGateway {
    at: Instant,
    took: Duration,
    stream: bool,
    gateway: &'static str,
    served: Result<String, String>,
}

/// `threads` clients per gateway of `nodes`, each alternating streaming
/// and non-streaming chat completions for `model` with `key`, about
/// `per_second` a second each, until `stop`.
fn gateway_load(
    cl: &Cluster,
    nodes: &[&'static str],
    threads: u32,
    per_second: u32,
    key: &str,
    model: &str,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<Vec<ViaGateway>>> {
    let period = Duration::from_secs(1) / per_second;
    let mut handles = Vec::new();
    for &gateway in nodes {
        for t in 0..threads {
            let (url, key, model) = (cl.gateway_url(gateway), key.to_owned(), model.to_owned());
            let stop = stop.clone();
            handles.push(std::thread::spawn(move || {
                let http = gateway_http();
                let mut out = Vec::new();
                let mut n = t;
                while !stop.load(Ordering::Relaxed) {
                    let at = Instant::now();
                    let stream = n % 2 == 0;
                    let served = gateway_chat(&http, &url, &key, &model, stream);
                    out.push(ViaGateway {
                        at,
                        took: at.elapsed(),
                        stream,
                        gateway,
                        served,
                    });
                    n += 1;
                    if let Some(rest) = period.checked_sub(at.elapsed()) {
                        std::thread::sleep(rest);
                    }
                }
                out
            }));
        }
    }
    handles
}

/// A user key from the leader's `CreateKey` (as `haloctl keys create`).
async fn create_key(c: &Client, name: &str) -> String {
    let secret = c
        .clone()
        .create_key(v1::CreateKeyRequest {
            name: name.into(),
            ..v1::CreateKeyRequest::default()
        })
        .await
        .expect("CreateKey")
        .into_inner()
        .secret;
    assert!(secret.starts_with("halo-"), "{secret}");
    secret
}

/// Waits until `node`'s gateway answers `model` with `key` (it has read
/// the routes and the key): the node that served.
async fn gateway_answers(
    cl: &Cluster,
    node: &str,
    key: &str,
    model: &str,
    timeout: Duration,
) -> Result<String, String> {
    let url = cl.gateway_url(node);
    let (key, model) = (key.to_owned(), model.to_owned());
    tokio::task::spawn_blocking(move || {
        let http = gateway_http();
        let deadline = Instant::now() + timeout;
        loop {
            match gateway_chat(&http, &url, &key, &model, false) {
                Ok(served) => return Ok(served),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    })
    .await
    .expect("gateway probe")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the compose images: bash tests/compose.sh"]
async fn compose_controllers_and_etcd_down_a_minute_fail_no_request_direct_or_via_gateways() {
    let outage = Duration::from_secs(60);
    let cl = Cluster::up("outage").await;
    let leader = cl.wait_leader(None, LEASE * 10).await.expect("a leader");
    let c = cl.client(&leader).await;
    place(&c, tiny("tiny", ""), LEASE * 5)
        .await
        .expect("placed");
    let e = endpoint(&c, "tiny", Duration::from_secs(120))
        .await
        .expect("never ready");
    let instance = live_instances(&mut c.clone()).await[0].1.id.clone();
    // The editor's view: a user key and a mode, no instance URL or key.
    let key = create_key(&c, "editor").await;
    drop(c);
    for node in ["halo1", "halo2"] {
        let served = gateway_answers(&cl, node, &key, "code", Duration::from_secs(30)).await;
        assert_eq!(
            served.as_deref(),
            Ok(e.node.as_str()),
            "{node}'s gateway does not answer `code`"
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    let load = load_loop(e.base_url.clone(), e.api_key.clone(), stop.clone());
    // About 20 a second through the gateways: the serving node's own and
    // the other one's, which reaches the instance across the network.
    let via = gateway_load(&cl, &["halo1", "halo2"], 2, 5, &key, "code", &stop);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let down_at = Instant::now();
    cl.fault("kill", &["controller1", "controller2", "etcd"]);
    tokio::time::sleep(outage).await;
    let up_at = Instant::now();
    cl.fault("start", &["etcd", "controller1", "controller2"]);
    let (leader, led) = cl
        .writable_leader(Duration::from_secs(60))
        .await
        .expect("no controller accepts writes after the outage");
    let c = cl.client(&leader).await;
    assert!(
        wait_nodes(
            &mut c.clone(),
            &["halo1", "halo2"],
            v1::NodeStatus::Ready,
            Duration::from_secs(30)
        )
        .await
    );
    let nodes_ready = up_at.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let results = load.join().expect("load loop");
    let via: Vec<ViaGateway> = via
        .into_iter()
        .flat_map(|h| h.join().expect("gateway client"))
        .collect();

    let failures: Vec<_> = results
        .iter()
        .filter_map(|(t, r)| r.as_ref().err().map(|e| (t.duration_since(down_at), e)))
        .collect();
    let during: Vec<Duration> = results
        .iter()
        .filter(|(t, _)| *t >= down_at && *t < up_at)
        .filter_map(|(_, r)| r.as_ref().ok().copied())
        .collect();
    let mut lat: Vec<Duration> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok().copied())
        .collect();
    lat.sort();
    let p50 = lat.get(lat.len() / 2).copied().unwrap_or_default();
    let max = lat.last().copied().unwrap_or_default();
    let via_failed: Vec<String> = via
        .iter()
        .filter_map(|v| {
            v.served.as_ref().err().map(|e| {
                format!(
                    "[{:+.1?} from the outage, via {}, stream={}] {e}",
                    v.at.saturating_duration_since(down_at),
                    v.gateway,
                    v.stream
                )
            })
        })
        .collect();
    let via_during = via
        .iter()
        .filter(|v| v.at >= down_at && v.at < up_at && v.served.is_ok())
        .count();
    let via_after = via
        .iter()
        .filter(|v| v.at >= up_at && v.served.is_ok())
        .count();
    let by_gateway = |g: &str| via.iter().filter(|v| v.gateway == g).count();
    let mut via_lat: Vec<Duration> = via
        .iter()
        .filter(|v| v.served.is_ok())
        .map(|v| v.took)
        .collect();
    via_lat.sort();
    let via_p50 = via_lat.get(via_lat.len() / 2).copied().unwrap_or_default();
    let via_max = via_lat.last().copied().unwrap_or_default();
    eprintln!(
        "TIMING compose outage: controllers and etcd down {:.1?}; direct: {} chat completions \
         in all, {} during the outage, {} failed, latency p50 {p50:.1?} max {max:.1?}; through \
         the gateways (model `code`, a user key, HTTPS; the instance on {}): {} in all ({} \
         streaming; via halo1 {}, via halo2 {}), {} during the outage, {} after it, {} failed, \
         latency p50 {via_p50:.1?} max {via_max:.1?}; after the restart a leader in {led:.1?}, \
         both nodes ready in {nodes_ready:.1?}",
        up_at.duration_since(down_at),
        results.len(),
        during.len(),
        failures.len(),
        e.node,
        via.len(),
        via.iter().filter(|v| v.stream).count(),
        by_gateway("halo1"),
        by_gateway("halo2"),
        via_during,
        via_after,
        via_failed.len(),
    );
    assert!(
        failures.is_empty(),
        "requests failed (since the outage began): {failures:?}"
    );
    assert!(
        via_failed.is_empty(),
        "{} requests through the gateways failed: {:?}",
        via_failed.len(),
        via_failed.iter().take(10).collect::<Vec<_>>()
    );
    assert!(
        during.len() >= 300,
        "only {} requests during the outage",
        during.len()
    );
    assert!(
        via_during >= 300,
        "only {via_during} requests through the gateways during the outage"
    );
    assert!(via_after > 0, "nothing went through the gateways after");
    let wrong_node: Vec<&str> = via
        .iter()
        .filter_map(|v| v.served.as_deref().ok())
        .filter(|n| *n != e.node)
        .collect();
    assert!(
        wrong_node.is_empty(),
        "answered by nodes other than {}: {wrong_node:?}",
        e.node
    );
    // Nothing was restarted or duplicated.
    let live = live_instances(&mut c.clone()).await;
    assert_eq!(live.len(), 1, "{live:?}");
    assert_eq!(live[0].1.id, instance, "the instance was replaced");
    assert_eq!(replica(&c, "tiny").await.map(|r| r.1), Some(1));
    assert_eq!(cl.all_llama_servers(), 1);
    // The gateways read the controllers again: a key made now works.
    let fresh = create_key(&c, "after-the-outage").await;
    for node in ["halo1", "halo2"] {
        let served = gateway_answers(&cl, node, &fresh, "code", Duration::from_secs(10)).await;
        assert_eq!(
            served.as_deref(),
            Ok(e.node.as_str()),
            "{node}'s gateway does not take a key made after the outage"
        );
    }
}
