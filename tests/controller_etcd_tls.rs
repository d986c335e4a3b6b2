//! The controller on an etcd that speaks only TLS and requires client
//! certificates (`--client-cert-auth`), with certificates made by the real
//! `haloctl certs` commands (`etcd` for etcd's side, `controller` as the
//! controller's client certificate): the right files lead and write desired
//! state that a TLS client reads back from etcd; a CA from another
//! `haloctl certs init`, no client certificate, or a client certificate
//! from another CA each fail at start with one line saying it is TLS; and
//! mixed or incomplete etcd TLS settings are config errors (exit 64).

use controller::store::etcd::{EtcdIdentity, EtcdStore, EtcdTls};
use controller::store::{CATALOG, LEADER, Store};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::cluster::{ControllerProc, Etcd, TINY_CATALOG, write_catalog};
use tests::free_port;

use tests::tls_client::ok;
const CONTROLLER: &str = env!("CARGO_BIN_EXE_halo-controller-shim");

/// halo's CA with an `etcd` certificate for etcd and a `controller` one for
/// the controller, and another CA with a controller certificate.
struct Pki {
    dir: PathBuf,
    other: PathBuf,
}

impl Pki {
    fn make(root: &Path) -> Pki {
        let dir = root.join("tls");
        let other = root.join("other");
        let (d, o) = (dir.display().to_string(), other.display().to_string());
        ok(&["certs", "init", "--dir", &d]);
        ok(&[
            "certs",
            "issue",
            "etcd",
            "etcd1",
            "--dir",
            &d,
            "--host",
            "127.0.0.1",
        ]);
        ok(&[
            "certs",
            "issue",
            "controller",
            "ctl",
            "--dir",
            &d,
            "--host",
            "127.0.0.1",
        ]);
        ok(&["certs", "init", "--dir", &o]);
        ok(&["certs", "issue", "controller", "mallory", "--dir", &o]);
        Pki { dir, other }
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    fn other(&self, name: &str) -> String {
        self.other.join(name).display().to_string()
    }

    /// The controller's flags for etcd: `etcd_ca`, and a client
    /// certificate unless `with_cert` is false.
    fn flags(&self, ca: &str, cert: Option<(&str, &str)>) -> Vec<String> {
        let mut f = vec!["--etcd-ca".to_owned(), ca.to_owned()];
        if let Some((c, k)) = cert {
            f.extend([
                "--etcd-cert".into(),
                c.into(),
                "--etcd-key".into(),
                k.into(),
            ]);
        }
        f
    }
}

/// Runs the controller with `args` until it exits or `limit` passes (then
/// kills it): its exit code (`None`: still running at the limit) and stderr.
fn run_controller(dir: &Path, args: &[String], limit: Duration) -> (Option<i32>, String) {
    let err_path = dir.join(format!("controller-{}.err", free_port()));
    let err = std::fs::File::create(&err_path).expect("stderr file");
    let mut child = Command::new(CONTROLLER)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(args)
        .env_remove("HALO_CONTROLLER_CONFIG")
        .env("HALO_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(err)
        .spawn()
        .expect("start halo-controller");
    let started = Instant::now();
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status.code();
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, std::fs::read_to_string(&err_path).unwrap_or_default())
}

fn catalog_args(dir: &Path) -> Vec<String> {
    let catalog = dir.join("catalog.toml");
    write_catalog(&catalog, TINY_CATALOG);
    vec![
        "--catalog".into(),
        catalog.display().to_string(),
        "--insecure-loopback-only".into(),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_on_tls_etcd_with_client_cert_leads_and_writes_desired_state() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::make(dir.path());
    let etcd = Etcd::start_tls(
        dir.path(),
        "tls",
        &pki.file("etcd-etcd1.pem"),
        &pki.file("etcd-etcd1.key"),
        &pki.file("ca.pem"),
    );
    let mut args = vec!["--etcd".to_owned(), etcd.endpoint.clone()];
    args.extend(pki.flags(
        &pki.file("ca.pem"),
        Some((
            &pki.file("controller-ctl.pem"),
            &pki.file("controller-ctl.key"),
        )),
    ));
    args.extend(["--id".into(), "tls-ctl".into()]);
    args.extend(catalog_args(dir.path()));
    let mut ctl = ControllerProc::new(dir.path(), "ctl-etcd-tls", &args);
    ctl.start();

    // Read back from etcd over TLS, as a separate client.
    let tls = EtcdTls {
        ca: pki.dir.join("ca.pem"),
        identity: Some(EtcdIdentity {
            cert: pki.dir.join("controller-ctl.pem"),
            key: pki.dir.join("controller-ctl.key"),
        }),
    };
    let store = EtcdStore::connect_with(std::slice::from_ref(&etcd.endpoint), Some(&tls))
        .await
        .expect("a TLS client with the right certificate connects");
    let deadline = Instant::now() + Duration::from_secs(20);
    let (catalog, leader) = loop {
        let (kvs, _) = store.list(CATALOG).await.expect("list the catalog");
        let (leader, _) = store.list(LEADER).await.expect("list the leader");
        if kvs.iter().any(|kv| kv.key.ends_with("/tiny")) && !leader.is_empty() {
            break (kvs, leader);
        }
        assert!(
            Instant::now() < deadline,
            "no leader or catalog entry in etcd after 20 s:\n{}",
            ctl.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        catalog.iter().any(|kv| kv.value.contains("tiny.gguf")),
        "{catalog:?}"
    );
    assert!(
        leader.iter().any(|kv| kv.value.contains("tls-ctl")),
        "{leader:?}"
    );
    assert!(ctl.logs().contains("elected leader"), "{}", ctl.logs());

    // The same data through the controller's API.
    let mut c = tests::cluster::connect(&ctl.url()).await;
    let models = c
        .list_catalog(proto::v1::ListCatalogRequest::default())
        .await
        .expect("list catalog")
        .into_inner();
    assert!(format!("{models:?}").contains("tiny"), "{models:?}");

    // Plaintext to the same port does not work: etcd speaks only TLS.
    let plain = EtcdStore::connect(&[format!("http://127.0.0.1:{}", etcd.port)])
        .await
        .expect("lazy connect");
    assert!(
        plain.get("/x").await.is_err(),
        "plaintext reached a TLS etcd"
    );
}

#[test]
fn controller_fails_fast_with_a_tls_message_when_etcd_refuses_the_handshake() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::make(dir.path());
    let etcd = Etcd::start_tls(
        dir.path(),
        "tls",
        &pki.file("etcd-etcd1.pem"),
        &pki.file("etcd-etcd1.key"),
        &pki.file("ca.pem"),
    );
    let own = (
        pki.file("controller-ctl.pem"),
        pki.file("controller-ctl.key"),
    );
    let mallory = (
        pki.other("controller-mallory.pem"),
        pki.other("controller-mallory.key"),
    );
    let cases: Vec<(&str, Vec<String>, &[&str])> = vec![
        (
            "a CA from another `haloctl certs init`",
            pki.flags(&pki.other("ca.pem"), Some((&own.0, &own.1))),
            &["TLS", "etcd's certificate is not signed by etcd_ca"],
        ),
        (
            "no client certificate",
            pki.flags(&pki.file("ca.pem"), None),
            &["TLS", "client certificate", "etcd_cert"],
        ),
        (
            "a client certificate from another CA",
            pki.flags(&pki.file("ca.pem"), Some((&mallory.0, &mallory.1))),
            &["TLS", "client certificate"],
        ),
    ];
    for (what, flags, needles) in cases {
        let mut args = vec!["--etcd".to_owned(), etcd.endpoint.clone()];
        args.extend(flags);
        args.extend(catalog_args(dir.path()));
        let started = Instant::now();
        let (code, err) = run_controller(dir.path(), &args, Duration::from_secs(20));
        assert_eq!(code, Some(69), "{what}: {err}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{what}: took {:?}",
            started.elapsed()
        );
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{what}: one line, got {err}");
        for n in needles {
            assert!(err.contains(n), "{what}: {n:?} not in {err}");
        }
    }
}

#[test]
fn mixed_or_incomplete_etcd_tls_settings_exit_64_naming_the_key_or_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::make(dir.path());
    let port = free_port();
    let https = format!("https://127.0.0.1:{port}");
    let http = format!("http://127.0.0.1:{port}");
    let ca = pki.file("ca.pem");
    let (cert, key) = (
        pki.file("controller-ctl.pem"),
        pki.file("controller-ctl.key"),
    );
    let not_pem = dir.path().join("not.pem");
    std::fs::write(&not_pem, "hello").expect("write");
    let not_pem = not_pem.display().to_string();
    let missing = dir.path().join("missing.pem").display().to_string();
    let s = |v: &[&str]| -> Vec<String> { v.iter().map(|a| (*a).to_owned()).collect() };
    let cases: Vec<(Vec<String>, &str)> = vec![
        (s(&["--etcd", &http, "--etcd-ca", &ca]), "etcd_ca"),
        (s(&["--etcd", &https]), "etcd_ca"),
        (
            s(&["--etcd", &format!("{https},{http}"), "--etcd-ca", &ca]),
            "plaintext",
        ),
        (
            s(&["--etcd", &https, "--etcd-ca", &ca, "--etcd-cert", &cert]),
            "etcd_key",
        ),
        (
            s(&["--etcd", &https, "--etcd-ca", &ca, "--etcd-key", &key]),
            "etcd_cert",
        ),
        (s(&["--etcd", &https, "--etcd-ca", &not_pem]), "not.pem"),
        (s(&["--etcd", &https, "--etcd-ca", &missing]), "missing.pem"),
        (
            s(&[
                "--etcd",
                &https,
                "--etcd-ca",
                &ca,
                "--etcd-cert",
                &cert,
                "--etcd-key",
                &ca,
            ]),
            "ca.pem",
        ),
        (
            s(&[
                "--etcd",
                &https,
                "--etcd-ca",
                &ca,
                "--etcd-cert",
                &key,
                "--etcd-key",
                &key,
            ]),
            "controller-ctl.key",
        ),
        (
            s(&[
                "--store-path",
                &dir.path().join("s.json").display().to_string(),
                "--etcd-ca",
                &ca,
            ]),
            "etcd_ca",
        ),
    ];
    for (mut args, needle) in cases {
        args.push("--insecure-loopback-only".into());
        let (code, err) = run_controller(dir.path(), &args, Duration::from_secs(10));
        assert_eq!(code, Some(64), "{args:?}: {err}");
        assert_eq!(
            err.trim().lines().count(),
            1,
            "{args:?}: one line, got {err}"
        );
        assert!(err.contains(needle), "{args:?}: {needle:?} not in {err}");
    }
}

#[test]
fn help_names_the_etcd_tls_keys_and_their_env_vars() {
    let out = Command::new(CONTROLLER)
        .arg("--help")
        .output()
        .expect("run halo-controller");
    let text = String::from_utf8_lossy(&out.stdout);
    for key in [
        "--etcd-ca",
        "--etcd-cert",
        "--etcd-key",
        "HALO_CONTROLLER_ETCD_CA",
        "HALO_CONTROLLER_ETCD_CERT",
        "HALO_CONTROLLER_ETCD_KEY",
    ] {
        assert!(text.contains(key), "--help lacks {key}:\n{text}");
    }
}
