//! Certificates replaced under a running agent, on real processes: the
//! agent's `tls_cert`, `tls_key` and `tls_ca` are overwritten with another
//! CA's material, and new connections get it, on SIGHUP and (without a
//! signal) when the files change (the agent polls them every 2 s); a broken
//! key file keeps the last good material serving and is logged. The
//! certificate's expiry reaches `haloctl nodes` through the controller.

use proto::v1;
use proto::v1::agent_service_client::AgentServiceClient;
use proto::v1::controller_service_client::ControllerServiceClient;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tests::cluster::{AgentNode, ControllerProc, wait_nodes};
use tonic::transport::ClientTlsConfig;

use tests::tls_client::{channel, client_config, haloctl, ok, tls_flags};

/// A CA made by `haloctl certs init` in `root/NAME`, with an agent
/// certificate valid `agent_days` days (None: the default), a controller
/// and an admin certificate.
fn make_ca(root: &Path, name: &str, agent_days: Option<&str>) -> PathBuf {
    let dir = root.join(name);
    let d = dir.display().to_string();
    ok(&["certs", "init", "--dir", &d]);
    let host = ["--host", "127.0.0.1", "--host", "localhost"];
    for (role, who) in [
        ("agent", "halo1"),
        ("controller", "ctl"),
        ("admin", "alice"),
    ] {
        let mut a = vec!["certs", "issue", role, who, "--dir", &d];
        a.extend(host);
        if role == "agent"
            && let Some(days) = agent_days
        {
            a.extend(["--days", days]);
        }
        ok(&a);
    }
    dir
}

/// A daemon's live files, which the tests overwrite.
struct Live {
    base: &'static str,
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

impl Live {
    /// Live files for the `base` (`ROLE-NAME`) material of each CA.
    fn new(root: &Path, base: &'static str) -> Live {
        let dir = root.join(format!("live-{base}"));
        std::fs::create_dir_all(&dir).expect("mkdir live");
        Live {
            base,
            cert: dir.join("cert.pem"),
            key: dir.join("cert.key"),
            ca: dir.join("ca.pem"),
        }
    }

    /// Replaces each file (write + rename) with this daemon's material of
    /// `ca`.
    fn install(&self, ca: &Path) {
        for (from, to) in [
            (format!("{}.pem", self.base), &self.cert),
            (format!("{}.key", self.base), &self.key),
            ("ca.pem".to_owned(), &self.ca),
        ] {
            replace(to, &std::fs::read(ca.join(&from)).expect("read material"));
        }
    }

    fn flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
            "--tls-ca".into(),
            self.ca.display().to_string(),
        ]
    }
}

fn replace(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// A client trusting only the CA in `ca`, showing its `ROLE-NAME`.
fn client(ca: &Path, base: &str) -> ClientTlsConfig {
    client_config(ca, Some((ca, base)))
}

/// GetNode over a new connection (a new TLS handshake).
async fn get_node(port: u16, tls: ClientTlsConfig) -> Result<v1::NodeIdentity, String> {
    let ch = channel(port, tls);
    AgentServiceClient::new(ch)
        .get_node(v1::GetNodeRequest {})
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner()
        .node
        .ok_or_else(|| "no node in the answer".to_owned())
}

fn not_after(ca: &Path) -> i64 {
    let pem = std::fs::read(ca.join("agent-halo1.pem")).expect("read cert");
    proto::tls::cert_not_after_unix(&pem).expect("a parsable certificate")
}

/// Waits (≤ 15 s) until a CA2 client gets GetNode answered and a CA1 client
/// is refused; the identity CA2's client got.
async fn switched(port: u16, ca1: &Path, ca2: &Path, log: impl Fn() -> String) -> v1::NodeIdentity {
    let mut last = String::new();
    for _ in 0..150 {
        match get_node(port, client(ca2, "controller-ctl")).await {
            Ok(id) => {
                let old = get_node(port, client(ca1, "controller-ctl")).await;
                assert!(old.is_err(), "a CA1 client still connects: {old:?}");
                return id;
            }
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the agent never served CA2's certificate (last: {last}):\n{}",
        log()
    );
}

async fn wait_log(what: &str, log: impl Fn() -> String) {
    for _ in 0..150 {
        if log().contains(what) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the log never said `{what}`:\n{}", log());
}

fn agent_log(a: &AgentNode) -> String {
    a.proc.as_ref().map(|p| p.log()).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_another_cas_certificates_after_sighup_and_keeps_the_last_good_ones_when_a_file_breaks()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let ca1 = make_ca(root, "ca1", None);
    let ca2 = make_ca(root, "ca2", Some("20"));
    let live = Live::new(root, "agent-halo1");
    live.install(&ca1);
    let mut halo1 = AgentNode::new(root, "halo1", &["speed"], 2);
    halo1.extra_args = live.flags();
    halo1.start();
    let port = halo1.port;

    // A client that connects and never says a word does not hold up the
    // others' handshakes.
    let _idle = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let id = get_node(port, client(&ca1, "controller-ctl"))
        .await
        .unwrap_or_else(|e| panic!("CA1 client refused: {e}\n{}", agent_log(&halo1)));
    assert_eq!(id.tls_cert_not_after_unix, Some(not_after(&ca1)));
    assert!(
        get_node(port, client(&ca2, "controller-ctl"))
            .await
            .is_err(),
        "a CA2 client connects before the switch"
    );

    // New files, then SIGHUP: the next connections get CA2's material, and
    // GetNode reports the new certificate's expiry.
    live.install(&ca2);
    let pid = halo1.proc.as_ref().map(|p| p.pid()).expect("agent running");
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    let id = switched(port, &ca1, &ca2, || agent_log(&halo1)).await;
    assert_eq!(id.tls_cert_not_after_unix, Some(not_after(&ca2)));
    wait_log("TLS certificates reloaded", || agent_log(&halo1)).await;
    // A 20-day certificate is warned about (19 or 20 days left, by when
    // the second turned).
    wait_log("days (not after", || agent_log(&halo1)).await;

    // A broken key: logged naming the file, and the last good material
    // keeps serving new connections (SIGHUP, then the poll, both try).
    replace(
        &live.key,
        b"-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n",
    );
    let hup = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(hup.success());
    let key = live.key.display().to_string();
    wait_log("TLS certificates not reloaded", || agent_log(&halo1)).await;
    let log = agent_log(&halo1);
    let line = log
        .lines()
        .find(|l| l.contains("TLS certificates not reloaded"))
        .unwrap_or_default();
    assert!(line.contains(&key), "the error does not name {key}: {line}");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let id = get_node(port, client(&ca2, "controller-ctl"))
        .await
        .unwrap_or_else(|e| panic!("last good material not served: {e}\n{}", agent_log(&halo1)));
    assert_eq!(id.tls_cert_not_after_unix, Some(not_after(&ca2)));
    assert!(
        get_node(port, client(&ca1, "controller-ctl"))
            .await
            .is_err()
    );
    if let Some(p) = halo1.proc.as_mut() {
        p.assert_running();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_follows_changed_certificate_files_without_a_signal_and_haloctl_nodes_shows_the_expiry()
 {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let ca1 = make_ca(root, "ca1", None);
    let ca2 = make_ca(root, "ca2", Some("20"));
    let live = Live::new(root, "agent-halo1");
    live.install(&ca1);
    let mut halo1 = AgentNode::new(root, "halo1", &["speed"], 2);
    halo1.extra_args = live.flags();
    halo1.start();
    let port = halo1.port;

    // A CA1 controller: `haloctl nodes` shows the agent's certificate.
    let controller = |name: &str, ca: &Path| {
        let mut args = vec![
            "--store-path".to_owned(),
            root.join(format!("{name}.json")).display().to_string(),
            "--node".to_owned(),
            format!("halo1={}", halo1.address()),
        ];
        args.extend(tls_flags(ca, "controller-ctl"));
        let mut c = ControllerProc::new(root, name, &args);
        c.start();
        c
    };
    let nodes = |c: &ControllerProc, ca: &Path, json: bool| {
        let url = format!("https://127.0.0.1:{}", c.port);
        let mut a = vec!["--controller".to_owned(), url, "nodes".to_owned()];
        if json {
            a.extend(["-o".to_owned(), "json".to_owned()]);
        }
        a.extend(tls_flags(ca, "admin-alice"));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        haloctl(&a)
    };
    let c1 = controller("controller1", &ca1);
    let mut admin = ControllerServiceClient::new(channel(c1.port, client(&ca1, "admin-alice")));
    let up = wait_nodes(
        &mut admin,
        &["halo1"],
        v1::NodeStatus::Ready,
        Duration::from_secs(30),
    )
    .await;
    assert!(up, "controller never saw halo1:\n{}", c1.logs());
    let na1 = not_after(&ca1);
    let o = nodes(&c1, &ca1, false);
    let table = String::from_utf8_lossy(&o.stdout);
    let want = ctl::output::cert_expiry(na1, proto::units::now_unix());
    assert!(table.contains("CERT"), "{table}");
    assert!(table.contains(&want), "no `{want}` in:\n{table}");
    assert!(!table.contains("warning:"), "{table}");
    let o = nodes(&c1, &ca1, true);
    let json: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(json[0]["cert_not_after_unix"], serde_json::json!(na1));

    // The files change, no signal: the poll picks them up.
    live.install(&ca2);
    let id = switched(port, &ca1, &ca2, || agent_log(&halo1)).await;
    assert_eq!(id.tls_cert_not_after_unix, Some(not_after(&ca2)));
    wait_log("TLS certificates reloaded", || agent_log(&halo1)).await;
    drop(c1);

    // A CA2 controller reaches the agent with its new certificate, and
    // `haloctl nodes` warns that it expires within 30 days.
    let c2 = controller("controller2", &ca2);
    let mut admin = ControllerServiceClient::new(channel(c2.port, client(&ca2, "admin-alice")));
    let up = wait_nodes(
        &mut admin,
        &["halo1"],
        v1::NodeStatus::Ready,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        up,
        "controller never saw halo1 after the switch:\n{}",
        c2.logs()
    );
    let o = nodes(&c2, &ca2, false);
    let table = String::from_utf8_lossy(&o.stdout);
    let days = ["19d", "20d"];
    assert!(
        days.iter()
            .any(|d| table.contains(&format!("expires in {d}"))),
        "{table}"
    );
    assert!(
        days.iter()
            .any(|d| table.contains(&format!("warning: node halo1's certificate expires in {d}"))),
        "{table}"
    );

    // haloctl warns (stderr) about its own certificate expiring soon.
    let d = ca2.display().to_string();
    ok(&[
        "certs", "issue", "admin", "soon", "--dir", &d, "--days", "10",
    ]);
    let url = format!("https://127.0.0.1:{}", c2.port);
    let mut a = vec!["--controller".to_owned(), url, "nodes".to_owned()];
    a.extend(tls_flags(&ca2, "admin-soon"));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let o = haloctl(&a);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("warning: haloctl's certificate")
            && (err.contains("expires in 9d") || err.contains("expires in 10d")),
        "{err}"
    );
}

fn hup(pid: u32) {
    let ok = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill");
    assert!(ok.success());
}

/// ListNodes over a new connection with `tls`: halo1's status and the
/// expiry of the agent certificate the controller last saw.
async fn controller_sees(port: u16, tls: ClientTlsConfig) -> Result<(i32, Option<i64>), String> {
    let ch = channel(port, tls);
    ControllerServiceClient::new(ch)
        .list_nodes(v1::ListNodesRequest {})
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner()
        .nodes
        .iter()
        .find(|n| n.node.as_ref().is_some_and(|i| i.name == "halo1"))
        .map(|n| {
            let seen = n.node.as_ref().and_then(|i| i.tls_cert_not_after_unix);
            (n.status, seen)
        })
        .ok_or_else(|| "no halo1".to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_moves_to_a_new_ca_on_sighup_serving_and_dialing_agents_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let ca1 = make_ca(root, "ca1", None);
    // CA2's agent certificate has another expiry: seeing it proves the
    // controller dialed the restarted agent.
    let ca2 = make_ca(root, "ca2", Some("20"));
    let (agent_live, ctl_live) = (
        Live::new(root, "agent-halo1"),
        Live::new(root, "controller-ctl"),
    );
    agent_live.install(&ca1);
    ctl_live.install(&ca1);
    let mut halo1 = AgentNode::new(root, "halo1", &["speed"], 2);
    halo1.extra_args = agent_live.flags();
    halo1.start();
    let mut args = vec![
        "--store-path".to_owned(),
        root.join("state.json").display().to_string(),
        "--node".to_owned(),
        format!("halo1={}", halo1.address()),
    ];
    args.extend(ctl_live.flags());
    let mut ctl = ControllerProc::new(root, "controller", &args);
    ctl.start();
    let ready = v1::NodeStatus::Ready as i32;
    let want = Ok((ready, Some(not_after(&ca1))));
    let mut seen = Err(String::new());
    for _ in 0..100 {
        seen = controller_sees(ctl.port, client(&ca1, "admin-alice")).await;
        if seen == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(seen, want, "halo1 never ready over CA1:\n{}", ctl.logs());

    // Both move to CA2; the agent restarts (so the controller must dial
    // it anew), the controller only gets SIGHUP.
    agent_live.install(&ca2);
    ctl_live.install(&ca2);
    halo1.kill9();
    halo1.start();
    hup(ctl.pid());
    wait_log("TLS certificates reloaded", || ctl.logs()).await;
    // CA2's admin is served, CA1's is refused, and the controller reaches
    // the CA2 agent with its reloaded client certificate.
    let want = Ok((ready, Some(not_after(&ca2))));
    let mut last = Err(String::new());
    for _ in 0..150 {
        last = controller_sees(ctl.port, client(&ca2, "admin-alice")).await;
        if last == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last,
        want,
        "halo1 not ready over CA2 after the reload:\n{}",
        ctl.logs()
    );
    assert!(
        controller_sees(ctl.port, client(&ca1, "admin-alice"))
            .await
            .is_err(),
        "a CA1 client still connects"
    );
}
