//! Mutual TLS, opt-in, on real processes: certificates
//! made by the real `haloctl certs` commands; an agent and a controller
//! serving TLS; every RPC method of both services called with no
//! certificate, a certificate from another CA, an expired certificate, the
//! wrong role (a model file's bytes, FetchModel, only to another agent) —
//! each refused with nothing changed — and the right
//! certificates placing the tiny model end to end.

use proto::v1;
use proto::v1::agent_service_client::AgentServiceClient;
use proto::v1::controller_service_client::ControllerServiceClient;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;
use tests::cluster::{AgentNode, ControllerProc, TINY_CATALOG, write_catalog};
use tests::tls_client::{HALOCTL, channel, client_config, haloctl, ok, tls_flags};
use tonic::Code;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// The CA, its certificates, and another CA's.
struct Pki {
    dir: PathBuf,
}

impl Pki {
    fn make(root: &Path) -> Pki {
        let dir = root.join("tls");
        let d = dir.display().to_string();
        ok(&["certs", "init", "--dir", &d]);
        let host = ["--host", "127.0.0.1", "--host", "localhost"];
        for (role, name) in [
            ("agent", "halo1"),
            ("controller", "ctl"),
            ("admin", "alice"),
            ("read-only", "bob"),
            ("gateway", "gw"),
        ] {
            let mut a = vec!["certs", "issue", role, name, "--dir", &d];
            a.extend(host);
            ok(&a);
        }
        // Expired: valid until the moment it was made.
        ok(&["certs", "issue", "admin", "old", "--dir", &d, "--days", "0"]);
        // Another CA, an admin certificate from it.
        let other = root.join("other");
        let o = other.display().to_string();
        ok(&["certs", "init", "--dir", &o]);
        ok(&["certs", "issue", "admin", "mallory", "--dir", &o]);
        Pki { dir }
    }

    fn file(&self, name: &str) -> String {
        self.dir.join(name).display().to_string()
    }

    /// `--tls-cert/--tls-key/--tls-ca` for a `ROLE-NAME` of this CA.
    fn flags(&self, base: &str) -> Vec<String> {
        tls_flags(&self.dir, base)
    }

    /// A client config trusting this CA, showing `who` (a `ROLE-NAME` in
    /// `dir`), or no certificate.
    fn client(&self, who: Option<(&Path, &str)>) -> ClientTlsConfig {
        client_config(&self.dir, who)
    }
}

/// Calls every AgentService method; each outcome's code (`Ok` for success).
async fn agent_matrix(ch: Channel) -> Vec<(&'static str, Code)> {
    let mut c = AgentServiceClient::new(ch);
    let code = |r: Result<(), tonic::Status>| r.map_or_else(|s| s.code(), |()| Code::Ok);
    vec![
        (
            "GetNode",
            code(c.get_node(v1::GetNodeRequest {}).await.map(drop)),
        ),
        (
            "GetMemory",
            code(c.get_memory(v1::GetMemoryRequest {}).await.map(drop)),
        ),
        (
            "ListModels",
            code(
                c.list_models(v1::ListModelsRequest { rescan: false })
                    .await
                    .map(drop),
            ),
        ),
        (
            "ListInstances",
            code(
                c.list_instances(v1::ListInstancesRequest {})
                    .await
                    .map(drop),
            ),
        ),
        (
            "StartInstance",
            code(
                c.start_instance(v1::StartInstanceRequest {
                    request_id: "tls-intruder".into(),
                    model_id: "tiny.gguf".into(),
                    options: Some(v1::InstanceOptions {
                        context_size: 256,
                        ..v1::InstanceOptions::default()
                    }),
                    generation: 1,
                    ..v1::StartInstanceRequest::default()
                })
                .await
                .map(drop),
            ),
        ),
        (
            "StopInstance",
            code(
                c.stop_instance(v1::StopInstanceRequest {
                    instance_id: "none".into(),
                    leader_revision: 0,
                })
                .await
                .map(drop),
            ),
        ),
        (
            "Watch",
            code(
                c.watch(v1::WatchRequest {
                    memory_period_ms: 0,
                })
                .await
                .map(drop),
            ),
        ),
        (
            "TailLogs",
            code(
                c.tail_logs(v1::TailLogsRequest {
                    instance_id: "none".into(),
                    lines: 1,
                    follow: false,
                })
                .await
                .map(drop),
            ),
        ),
        (
            "FetchModel",
            code(
                c.fetch_model(v1::FetchModelRequest {
                    model_id: "none.gguf".into(),
                    ..v1::FetchModelRequest::default()
                })
                .await
                .map(drop),
            ),
        ),
        (
            "PullModel",
            code(
                c.pull_model(v1::PullModelRequest {
                    model_id: "intruder.gguf".into(),
                    source_address: "127.0.0.1:1".into(),
                    source_node: "intruder".into(),
                    leader_revision: 0,
                })
                .await
                .map(drop),
            ),
        ),
        (
            "ProjectMemory",
            code(
                c.project_memory(v1::ProjectMemoryRequest {
                    model_id: "none.gguf".into(),
                    context_size: 256,
                    ..v1::ProjectMemoryRequest::default()
                })
                .await
                .map(drop),
            ),
        ),
    ]
}

/// Calls every ControllerService method; each outcome's code.
async fn controller_matrix(ch: Channel) -> Vec<(&'static str, Code)> {
    let mut c = ControllerServiceClient::new(ch);
    let code = |r: Result<(), tonic::Status>| r.map_or_else(|s| s.code(), |()| Code::Ok);
    vec![
        (
            "ListNodes",
            code(c.list_nodes(v1::ListNodesRequest {}).await.map(drop)),
        ),
        (
            "ListCatalog",
            code(c.list_catalog(v1::ListCatalogRequest {}).await.map(drop)),
        ),
        (
            "PutCatalogEntry",
            code(
                c.put_catalog_entry(v1::PutCatalogEntryRequest {
                    entry: Some(v1::CatalogEntry {
                        name: "intruder".into(),
                        model_id: "tiny.gguf".into(),
                        default_context: 256,
                        min_context: 256,
                        ..v1::CatalogEntry::default()
                    }),
                })
                .await
                .map(drop),
            ),
        ),
        (
            "ListPlacements",
            code(
                c.list_placements(v1::ListPlacementsRequest {})
                    .await
                    .map(drop),
            ),
        ),
        (
            "Plan",
            code(
                c.plan(v1::PlanRequest {
                    model: "tiny".into(),
                    ..v1::PlanRequest::default()
                })
                .await
                .map(drop),
            ),
        ),
        (
            "Place",
            code(
                c.place(v1::PlaceRequest {
                    role: "speed".into(),
                    model: "tiny".into(),
                    name: "intruder".into(),
                    ..v1::PlaceRequest::default()
                })
                .await
                .map(drop),
            ),
        ),
        (
            "Unplace",
            code(
                c.unplace(v1::UnplaceRequest {
                    name: "tiny-tls".into(),
                })
                .await
                .map(drop),
            ),
        ),
        (
            "Endpoints",
            code(c.endpoints(v1::EndpointsRequest {}).await.map(drop)),
        ),
        (
            "PlacementLogs",
            code(
                c.placement_logs(v1::PlacementLogsRequest {
                    placement: "tiny-tls".into(),
                    ..v1::PlacementLogsRequest::default()
                })
                .await
                .map(drop),
            ),
        ),
        (
            "WatchEvents",
            code(
                c.watch_events(v1::WatchEventsRequest {
                    follow: false,
                    recent: Some(1),
                })
                .await
                .map(drop),
            ),
        ),
        (
            "Routes",
            code(c.routes(v1::RoutesRequest {}).await.map(drop)),
        ),
        (
            "CreateKey",
            code(
                c.create_key(v1::CreateKeyRequest {
                    name: "intruder".into(),
                    ..v1::CreateKeyRequest::default()
                })
                .await
                .map(drop),
            ),
        ),
        (
            "ListKeys",
            code(c.list_keys(v1::ListKeysRequest {}).await.map(drop)),
        ),
        (
            "RevokeKey",
            code(
                c.revoke_key(v1::RevokeKeyRequest {
                    name: "intruder".into(),
                })
                .await
                .map(drop),
            ),
        ),
        (
            "PutBenchResult",
            code(
                c.put_bench_result(v1::PutBenchResultRequest { result: None })
                    .await
                    .map(drop),
            ),
        ),
        (
            "ListBenchResults",
            code(
                c.list_bench_results(v1::ListBenchResultsRequest::default())
                    .await
                    .map(drop),
            ),
        ),
        (
            "Demand",
            code(
                c.demand(v1::DemandRequest {
                    model: "no-such-model".into(),
                    ..v1::DemandRequest::default()
                })
                .await
                .map(drop),
            ),
        ),
        (
            "ReportUse",
            code(
                c.report_use(v1::ReportUseRequest {
                    gateway: "intruder".into(),
                    uses: Vec::new(),
                })
                .await
                .map(drop),
            ),
        ),
        (
            "CopyModel",
            code(
                c.copy_model(v1::CopyModelRequest {
                    model: "no-such-model".into(),
                    to_node: "halo1".into(),
                    from_node: String::new(),
                })
                .await
                .map(drop),
            ),
        ),
    ]
}

const AGENT_MUTATING: &[&str] = &["StartInstance", "StopInstance", "PullModel"];
const CONTROLLER_MUTATING: &[&str] = &[
    "Place",
    "Unplace",
    "PutCatalogEntry",
    "CreateKey",
    "RevokeKey",
    "PutBenchResult",
    "CopyModel",
];

/// Every outcome in `got` is `want` (for the methods `only` names, or all).
fn expect_all(what: &str, got: &[(&str, Code)], want: &[Code], only: Option<&[&str]>) {
    for (m, c) in got {
        if only.is_some_and(|o| !o.contains(m)) {
            continue;
        }
        assert!(
            want.contains(c),
            "{what}: {m} answered {c:?}, expected one of {want:?}; all: {got:?}"
        );
    }
}

/// A TLS handshake the server refuses reaches no service, so no gRPC status
/// comes back: the client reports the broken connection, with a code that
/// depends on when it noticed (tonic: Unavailable, Unknown, Cancelled or
/// Internal). What matters: never Ok, and nothing changes (checked after).
const HANDSHAKE_REFUSED: &[Code] = &[
    Code::Unavailable,
    Code::Unknown,
    Code::Cancelled,
    Code::Internal,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_refuses_every_wrong_caller_on_every_method_and_places_with_the_right_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let pki = Pki::make(root);

    let mut halo1 = AgentNode::new(root, "halo1", &["speed"], 4);
    agent::gguf::fixtures::write_tiny_llama(&halo1.models.join("tiny.gguf"), 7).expect("tiny");
    halo1.extra_args = pki.flags("agent-halo1");
    halo1.start();
    let catalog = root.join("catalog.toml");
    write_catalog(&catalog, TINY_CATALOG);
    let mut args = vec![
        "--store-path".to_owned(),
        root.join("state.json").display().to_string(),
        "--node".to_owned(),
        format!("halo1={}", halo1.address()),
        "--catalog".to_owned(),
        catalog.display().to_string(),
    ];
    args.extend(pki.flags("controller-ctl"));
    let mut ctl = ControllerProc::new(root, "controller", &args);
    ctl.start();
    let (ap, cp) = (halo1.port, ctl.port);
    let other = root.join("other");
    let tls_dir = pki.dir.clone();

    // The controller reaches the agent through TLS with its own certificate.
    let admin_ctl =
        ControllerServiceClient::new(channel(cp, pki.client(Some((&tls_dir, "admin-alice")))));
    let up = tests::cluster::wait_nodes(
        &mut admin_ctl.clone(),
        &["halo1"],
        v1::NodeStatus::Ready,
        Duration::from_secs(30),
    )
    .await;
    assert!(up, "controller never saw halo1 over TLS:\n{}", ctl.logs());

    // Plaintext is not served.
    let plain = Endpoint::from_shared(format!("http://127.0.0.1:{cp}"))
        .expect("url")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy();
    let got = controller_matrix(plain).await;
    expect_all("plaintext → controller", &got, HANDSHAKE_REFUSED, None);

    // No certificate, another CA's, an expired one: the handshake fails.
    for (what, who) in [
        ("no certificate", None),
        ("another CA", Some((other.as_path(), "admin-mallory"))),
        ("expired", Some((tls_dir.as_path(), "admin-old"))),
    ] {
        let got = agent_matrix(channel(ap, pki.client(who))).await;
        expect_all(&format!("{what} → agent"), &got, HANDSHAKE_REFUSED, None);
        let got = controller_matrix(channel(cp, pki.client(who))).await;
        expect_all(
            &format!("{what} → controller"),
            &got,
            HANDSHAKE_REFUSED,
            None,
        );
    }

    // Valid certificates with the wrong role.
    let me = |base: &'static str| pki.client(Some((tls_dir.as_path(), base)));
    // People look; gateways (a gateway's own certificate, or another
    // node's agent serving one) watch; only the controller starts; only an
    // agent reads a model file's bytes (FetchModel).
    for base in ["read-only-bob", "admin-alice", "agent-halo1", "gateway-gw"] {
        let got = agent_matrix(channel(ap, me(base))).await;
        let mut refused = AGENT_MUTATING.to_vec();
        if base != "agent-halo1" {
            refused.push("FetchModel");
        }
        expect_all(
            &format!("{base} → agent"),
            &got,
            &[Code::PermissionDenied],
            Some(&refused),
        );
        // Reads are theirs (TailLogs of no instance: NotFound, past the check).
        let reads: Vec<_> = got
            .iter()
            .filter(|(m, _)| !refused.contains(m))
            .copied()
            .collect();
        expect_all(
            &format!("{base} reads agent"),
            &reads,
            &[Code::Ok, Code::NotFound],
            None,
        );
    }
    // Read-only, gateways and agents read the controller, and change
    // nothing; Routes (instance API keys, user-key hashes) is not
    // read-only's.
    for base in ["read-only-bob", "agent-halo1", "gateway-gw"] {
        let got = controller_matrix(channel(cp, me(base))).await;
        let refused: &[&str] = if base == "read-only-bob" {
            &[
                "Place",
                "Unplace",
                "PutCatalogEntry",
                "CreateKey",
                "RevokeKey",
                "PutBenchResult",
                "CopyModel",
                "Routes",
                "Demand",
                "ReportUse",
            ]
        } else {
            CONTROLLER_MUTATING
        };
        expect_all(
            &format!("{base} → controller"),
            &got,
            &[Code::PermissionDenied],
            Some(refused),
        );
        let reads: Vec<_> = got
            .iter()
            .filter(|(m, _)| !refused.contains(m))
            .copied()
            .collect();
        expect_all(
            &format!("{base} reads controller"),
            &reads,
            &[Code::Ok, Code::NotFound],
            None,
        );
    }
    let got = controller_matrix(channel(cp, me("controller-ctl"))).await;
    expect_all(
        "controller-ctl → controller",
        &got,
        &[Code::PermissionDenied],
        None,
    );

    // Nothing changed: no instance, no placement, no catalog entry.
    let mut agent_admin = AgentServiceClient::new(channel(ap, me("admin-alice")));
    let instances = agent_admin
        .list_instances(v1::ListInstancesRequest {})
        .await
        .expect("list instances")
        .into_inner()
        .instances;
    // (Other llama-servers on this machine show up as Unmanaged.)
    let ours: Vec<_> = instances
        .iter()
        .filter(|i| i.state != v1::InstanceState::Unmanaged as i32)
        .collect();
    assert!(ours.is_empty(), "an instance started: {ours:?}");
    let mut c = admin_ctl.clone();
    let placements = c
        .list_placements(v1::ListPlacementsRequest {})
        .await
        .expect("list placements")
        .into_inner()
        .placements;
    assert!(placements.is_empty(), "a placement written: {placements:?}");
    let catalog = c
        .list_catalog(v1::ListCatalogRequest {})
        .await
        .expect("catalog")
        .into_inner();
    assert!(
        !format!("{catalog:?}").contains("intruder"),
        "catalog entry written: {catalog:?}"
    );
    let keys = c
        .list_keys(v1::ListKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .keys;
    assert!(keys.is_empty(), "a user key made: {keys:?}");

    // haloctl with a read-only certificate: refused, exit 1, says why.
    let url = format!("https://127.0.0.1:{cp}");
    let mut unplace = vec!["--controller", url.as_str(), "unplace", "tiny-tls"];
    let bob = pki.flags("read-only-bob");
    unplace.extend(bob.iter().map(String::as_str));
    let o = haloctl(&unplace);
    assert_eq!(o.status.code(), Some(1), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("PermissionDenied"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // The right certificate: haloctl places the tiny model (waiting for
    // Ready), through the controller and on to the agent, all over TLS.
    let alice = pki.flags("admin-alice");
    let mut place = vec![
        "--controller",
        url.as_str(),
        "place",
        "speed",
        "tiny",
        "--name",
        "tiny-tls",
        "--timeout",
        "120",
    ];
    place.extend(alice.iter().map(String::as_str));
    let o = haloctl(&place);
    assert!(
        o.status.success(),
        "place over TLS: {}{}\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        ctl.logs()
    );
    let ready = agent_admin
        .list_instances(v1::ListInstancesRequest {})
        .await
        .expect("list instances")
        .into_inner()
        .instances
        .iter()
        .any(|i| i.state == v1::InstanceState::Ready as i32);
    assert!(ready, "no Ready instance on halo1 after place");
    // Keys: an admin sees the endpoint's API key, a read-only certificate
    // sees the endpoint without it, on the controller and on the agent.
    let endpoints = |who: &'static str| {
        let mut c = ControllerServiceClient::new(channel(cp, me(who)));
        async move {
            c.endpoints(v1::EndpointsRequest {})
                .await
                .expect("endpoints")
                .into_inner()
                .endpoints
        }
    };
    let admin_sees = endpoints("admin-alice").await;
    assert!(
        !admin_sees.is_empty() && admin_sees.iter().all(|e| !e.api_key.is_empty()),
        "{admin_sees:?}"
    );
    let bob_sees = endpoints("read-only-bob").await;
    assert!(
        bob_sees.len() == admin_sees.len() && bob_sees.iter().all(|e| e.api_key.is_empty()),
        "{bob_sees:?}"
    );
    let bob_lists = AgentServiceClient::new(channel(ap, me("read-only-bob")))
        .list_instances(v1::ListInstancesRequest {})
        .await
        .expect("list instances")
        .into_inner()
        .instances;
    assert!(
        bob_lists.iter().all(|i| i.api_key.is_empty()),
        "{bob_lists:?}"
    );
    // A plain `http://` controller URL is upgraded when TLS is configured.
    let mut status = vec!["--controller", "127.0.0.1:0"];
    let plain_url = format!("http://127.0.0.1:{cp}");
    status[1] = plain_url.as_str();
    status.push("status");
    let bob = pki.flags("read-only-bob");
    status.extend(bob.iter().map(String::as_str));
    let o = haloctl(&status);
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("tiny-tls"),
        "status over TLS: {o:?}"
    );
    // The same through HALO_TLS_* and through haloctl.toml's keys.
    let o = Command::new(&*HALOCTL)
        .args(["--controller", url.as_str(), "status"])
        .env("HALO_TLS_CERT", pki.file("read-only-bob.pem"))
        .env("HALO_TLS_KEY", pki.file("read-only-bob.key"))
        .env("HALO_TLS_CA", pki.file("ca.pem"))
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env_remove("HALO_CONTROLLER")
        .output()
        .expect("haloctl");
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("tiny-tls"),
        "status with HALO_TLS_*: {o:?}"
    );
    let xdg = root.join("xdg");
    std::fs::create_dir_all(xdg.join("halo")).expect("mkdir");
    std::fs::write(
        xdg.join("halo/haloctl.toml"),
        format!(
            "controller = \"127.0.0.1:{cp}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_ca = \"{}\"\n",
            pki.file("read-only-bob.pem"),
            pki.file("read-only-bob.key"),
            pki.file("ca.pem")
        ),
    )
    .expect("haloctl.toml");
    let o = Command::new(&*HALOCTL)
        .arg("status")
        .env("XDG_CONFIG_HOME", &xdg)
        .env_remove("HALO_CONTROLLER")
        .env_remove("HALO_TLS_CERT")
        .env_remove("HALO_TLS_KEY")
        .env_remove("HALO_TLS_CA")
        .output()
        .expect("haloctl");
    assert!(
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("tiny-tls"),
        "status with haloctl.toml: {o:?}"
    );
    // What a person gets wrong first, each told as what it is.
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    // An agent's port is no controller (exit 3, not "Unimplemented").
    let agent_url = format!("https://127.0.0.1:{ap}");
    let mut args = vec!["--controller", agent_url.as_str(), "status"];
    args.extend(alice.iter().map(String::as_str));
    let o = haloctl(&args);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(
        stderr(&o).contains("is not a halo-controller"),
        "{}",
        stderr(&o)
    );
    // https:// without a certificate: a usage error said once, before any
    // connection, and no "is it running?".
    let o = Command::new(&*HALOCTL)
        .args(["--controller", url.as_str(), "status"])
        .env_remove("HALO_TLS_CERT")
        .env_remove("HALO_TLS_KEY")
        .env_remove("HALO_TLS_CA")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .env("HALO_LOCAL_DIR", "/srv/halo-local")
        .output()
        .expect("haloctl");
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(e.contains("has no client certificate"), "{e}");
    assert!(!e.contains("running?"), "{e}");
    assert_eq!(e.matches("HTTPS without TLS").count(), 0, "{e}");
    // The hint names where HALO_LOCAL_DIR put the quick start's settings.
    assert!(e.contains("/srv/halo-local/env"), "{e}");
    // An expired own certificate: exit 3 with the TLS cause.
    let old = [
        "--tls-cert",
        &pki.file("admin-old.pem"),
        "--tls-key",
        &pki.file("admin-old.key"),
        "--tls-ca",
        &pki.file("ca.pem"),
    ]
    .map(str::to_owned);
    let mut args = vec!["--controller", url.as_str(), "status"];
    args.extend(old.iter().map(String::as_str));
    let o = haloctl(&args);
    let e = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    assert!(
        e.contains("a TLS failure") && e.contains("admin-old.pem has expired"),
        "{e}"
    );

    // Unplace as admin stops the instance.
    let mut unplace = vec!["--controller", url.as_str(), "unplace", "tiny-tls"];
    unplace.extend(alice.iter().map(String::as_str));
    ok(&unplace);
    let gone = tests::cluster::eventually(Duration::from_secs(30), || {
        let mut a = agent_admin.clone();
        async move {
            let i = a
                .list_instances(v1::ListInstancesRequest {})
                .await
                .ok()?
                .into_inner()
                .instances;
            (!i.iter().any(|i| i.state == v1::InstanceState::Ready as i32)).then_some(())
        }
    })
    .await;
    assert!(gone.is_some(), "the instance still runs after unplace");
    drop(ctl);
}

#[test]
fn a_partial_tls_config_exits_64_with_one_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pem = dir.path().join("x.pem");
    std::fs::write(&pem, "x").expect("write");
    let llama = tests::llama_bin("llama-server").display().to_string();
    let state = dir.path().join("s").display().to_string();
    let models = dir.path().join("m");
    std::fs::create_dir_all(&models).expect("mkdir");
    let models = models.display().to_string();
    let store = dir.path().join("s.json").display().to_string();
    for (bin, extra) in [
        (
            tests::cluster::AGENT.as_path(),
            vec![
                "--state-dir",
                state.as_str(),
                "--llama-server",
                llama.as_str(),
                "--model-dir",
                models.as_str(),
            ],
        ),
        (
            tests::cluster::CONTROLLER.as_path(),
            vec!["--store-path", store.as_str()],
        ),
    ] {
        let o = Command::new(bin)
            .args(&extra)
            .arg("--tls-cert")
            .arg(&pem)
            .env_remove("HALO_AGENT_CONFIG")
            .env_remove("HALO_CONTROLLER_CONFIG")
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(64), "{}: {err}", bin.display());
        assert_eq!(err.trim().lines().count(), 1, "{}: {err}", bin.display());
        assert!(err.contains("tls_key"), "{}: {err}", bin.display());
    }
}

#[test]
fn a_key_that_is_not_the_certificates_exits_64() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::make(dir.path());
    let store = dir.path().join("s.json").display().to_string();
    let o = Command::new(&*tests::cluster::CONTROLLER)
        .args(["--store-path", store.as_str()])
        .args([
            "--tls-cert",
            &pki.file("admin-alice.pem"),
            "--tls-key",
            &pki.file("read-only-bob.key"),
            "--tls-ca",
            &pki.file("ca.pem"),
        ])
        .env_remove("HALO_CONTROLLER_CONFIG")
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(64), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn haloctl_tls_flags_must_come_as_a_set() {
    let o = haloctl(&["--tls-cert", "/nonexistent.pem", "status"]);
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--tls-key"),
        "{o:?}"
    );
}
