//! User keys and the gateways' routing table against a real controller and
//! agent (mutual TLS, certificates from `haloctl certs`), driven through
//! `haloctl` as a process and the gRPC API: a key is shown once and stored
//! only as its hash; `Routes` carries a placed tiny model's ready replica
//! (endpoint and instance key, which answer a real chat completion), its
//! modes, the node and the key, and loses the key on revoke; bad names,
//! modes, duplicates and unknown keys are refused with clear messages and
//! haloctl's exit codes; certificate roles decide who may read `Routes`
//! and who may make keys.

use proto::v1;
use std::process::{Command, Output};
use std::time::Duration;
use tests::cluster::{
    AgentNode, Client, ControllerProc, chat, connect, tiny_controller, wait_nodes,
};
use tests::text;
use tonic::Code;

const HALOCTL: &str = env!("CARGO_BIN_EXE_haloctl-shim");

/// haloctl as a process for `controller`, with the harness's certificate
/// of `role`.
fn haloctl(controller: &ControllerProc, role: &str, args: &[&str]) -> Output {
    let home = tempfile::tempdir().expect("home");
    Command::new(HALOCTL)
        .arg("--controller")
        .arg(controller.url())
        .args(args)
        .env_remove("HALO_CONTROLLER")
        .env("HOME", home.path())
        .env_remove("XDG_CONFIG_HOME")
        .envs(tests::pki::pki().env(role, "tester"))
        .output()
        .expect("run haloctl")
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

/// The words of `s` that look like a user key's text.
fn secrets_in(s: &str) -> Vec<String> {
    s.split(|c: char| c.is_whitespace() || c == '"')
        .filter(|w| w.starts_with("halo-") && w.len() == 5 + 43)
        .map(str::to_owned)
        .collect()
}

/// A controller client showing the harness's certificate of `role`.
async fn as_role(controller: &ControllerProc, role: &str) -> Client {
    let ch = tests::cluster::channel(&controller.url(), role)
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect as {role}: {e}"));
    Client::new(ch)
}

async fn routes(c: &mut Client) -> Result<v1::RoutesResponse, tonic::Status> {
    c.routes(v1::RoutesRequest {}).await.map(|r| r.into_inner())
}

/// One agent (halo1, `speed`) with the tiny model, and its controller.
fn cluster(dir: &std::path::Path) -> (AgentNode, ControllerProc) {
    let mut a = AgentNode::new(dir, "halo1", &["speed"], 4);
    agent::gguf::fixtures::write_tiny_llama(&a.models.join("tiny.gguf"), 7).expect("tiny model");
    a.start();
    let mut c = tiny_controller(dir, std::slice::from_ref(&a), &["--heartbeat-ms", "250"]);
    c.start();
    (a, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_is_shown_once_stored_hashed_routed_and_revoked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (agent, controller) = cluster(dir.path());
    let logs = || controller.logs();
    let ctl = |args: &[&str]| haloctl(&controller, "admin", args);
    let mut admin = connect(&controller.url()).await;
    let up = wait_nodes(
        &mut admin,
        &["halo1"],
        v1::NodeStatus::Ready,
        Duration::from_secs(30),
    )
    .await;
    assert!(up, "halo1 never ready:\n{}", logs());

    let o = ctl(&["place", "speed", "tiny", "--timeout", "120"]);
    assert_eq!(o.status.code(), Some(0), "{}\n{}", show(&o), logs());

    // Made: the key once, with how to use it.
    let o = ctl(&[
        "keys",
        "create",
        "alice",
        "--modes",
        "ask,code",
        "--expires",
        "30",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let out = text(&o.stdout);
    let secrets = secrets_in(&out);
    assert_eq!(secrets.len(), 1, "one key printed: {out}");
    let secret = secrets[0].clone();
    assert!(
        secret[5..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{secret}"
    );
    assert!(out.contains("Authorization: Bearer <key>"), "{out}");
    assert!(out.contains("modes ask,code"), "{out}");
    let hash = controller::keys::sha256_hex(&secret);

    // A second key, for every mode, in JSON.
    let o = ctl(&["keys", "create", "ci-bot", "-o", "json"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let created: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let ci_secret = created["secret"].as_str().expect("secret").to_owned();
    assert_eq!(secrets_in(&ci_secret).len(), 1, "{created}");
    assert_ne!(ci_secret, secret);
    assert_eq!(created["modes"], serde_json::json!([]));

    // Listed, never with its text or hash.
    let o = ctl(&["keys", "list"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let table = text(&o.stdout);
    assert!(table.starts_with("NAME "), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("alice ") && l.contains("ask,code")),
        "{table}"
    );
    assert!(table.lines().any(|l| l.starts_with("ci-bot ")), "{table}");
    let o = ctl(&["keys", "list", "-o", "json"]);
    let listed = text(&o.stdout);
    let v: serde_json::Value = serde_json::from_str(&listed).expect("json");
    let names: Vec<&str> = v
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    assert_eq!(names, ["alice", "ci-bot"]);
    assert!(v[0]["expires_unix_ms"].as_u64().is_some(), "{listed}");
    for s in [&table, &listed] {
        assert!(
            secrets_in(s).is_empty() && !s.contains(&hash),
            "a key's text or hash listed:\n{s}"
        );
    }

    // The store holds the hash, and the text nowhere; nor do the logs.
    let store = std::fs::read_to_string(dir.path().join("state.json")).expect("store");
    assert!(store.contains(&hash), "hash not stored:\n{store}");
    for (what, s) in [("store", &store), ("controller log", &logs())] {
        for t in [&secret, &ci_secret] {
            assert!(!s.contains(t.as_str()), "the {what} holds a key's text");
        }
    }

    // Routes: the ready replica, with an endpoint and key that answer.
    let r = routes(&mut admin).await.expect("routes");
    let tiny = r
        .routes
        .iter()
        .find(|p| p.placement == "tiny")
        .unwrap_or_else(|| panic!("no route for tiny: {r:?}"));
    assert_eq!(tiny.model, "tiny");
    assert_eq!(tiny.state, "ready", "{r:?}");
    assert_eq!(
        tiny.modes,
        vec![v1::EditorMode::Code as i32, v1::EditorMode::Ask as i32]
    );
    let rep = &tiny.replicas[0];
    assert_eq!(rep.node, "halo1");
    assert_eq!(rep.agent_address, agent.address());
    assert_eq!(rep.state, v1::InstanceState::Ready as i32);
    assert!(rep.request_id.starts_with("halo.tiny.r0.g"), "{rep:?}");
    assert!(
        !rep.instance_id.is_empty() && !rep.api_key.is_empty(),
        "{rep:?}"
    );
    let answer = chat(&rep.base_url, &rep.api_key, "tiny");
    assert!(
        answer.is_ok(),
        "the routed replica does not answer: {answer:?}"
    );
    let node = r.nodes.iter().find(|n| n.name == "halo1").expect("node");
    assert_eq!(node.status, v1::NodeStatus::Ready as i32);
    assert_eq!(node.agent_address, agent.address());
    assert!(r.at_unix_ms > 0);
    let alice = r
        .keys
        .iter()
        .find(|k| k.name == "alice")
        .unwrap_or_else(|| panic!("no key alice in {:?}", r.keys));
    assert_eq!(alice.sha256, hash);
    assert_eq!(
        alice.modes,
        vec![v1::EditorMode::Ask as i32, v1::EditorMode::Code as i32]
    );
    let ms = alice.expires_unix_ms.expect("expiry") - alice.created_unix_ms;
    assert_eq!(ms, 30 * 86_400_000);

    // Refusals, each with its exit code and what went wrong.
    for (args, code, says) in [
        (
            &["keys", "create", "alice"][..],
            1,
            "a user key named `alice` already exists",
        ),
        (&["keys", "create", "no/slash"], 1, "key name `no/slash`"),
        (&["keys", "create", "x", "--models", "../etc"], 1, "models"),
        (
            &["keys", "create", "x", "--modes", "chat"],
            2,
            "one of: ask, code",
        ),
        (&["keys", "create", "x", "--expires", "4000"], 2, "1..=3650"),
        (
            &["keys", "revoke", "nobody"],
            1,
            "no user key named `nobody`",
        ),
    ] {
        let o = ctl(args);
        assert_eq!(o.status.code(), Some(code), "{args:?}\n{}", show(&o));
        assert!(text(&o.stderr).contains(says), "{args:?}\n{}", show(&o));
    }
    // The same checks in the controller, for callers other than haloctl.
    for (req, says) in [
        (
            v1::CreateKeyRequest {
                name: "x".into(),
                modes: vec![99],
                ..Default::default()
            },
            "99 is no editor mode",
        ),
        (
            v1::CreateKeyRequest {
                name: "x".into(),
                expires_days: 3651,
                ..Default::default()
            },
            "at most 3650",
        ),
        (
            v1::CreateKeyRequest {
                name: "x".repeat(65),
                ..Default::default()
            },
            "1-64 characters",
        ),
    ] {
        let e = admin.create_key(req).await.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains(says), "{e:?}");
    }
    let r = routes(&mut admin).await.expect("routes");
    let mut names: Vec<&str> = r.keys.iter().map(|k| k.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["alice", "ci-bot"], "a refused key was stored");

    // Revoked: gone from Routes, the list and the store.
    let o = ctl(&["keys", "revoke", "alice"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert!(
        text(&o.stdout).contains("revoked key alice"),
        "{}",
        show(&o)
    );
    let r = routes(&mut admin).await.expect("routes");
    assert!(
        r.keys.iter().all(|k| k.name != "alice" && k.sha256 != hash),
        "{:?}",
        r.keys
    );
    assert!(r.keys.iter().any(|k| k.name == "ci-bot"));
    let store = std::fs::read_to_string(dir.path().join("state.json")).expect("store");
    assert!(
        !store.contains(&hash),
        "a revoked key's hash is still stored"
    );
    let o = ctl(&["keys", "revoke", "ci-bot"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    let o = ctl(&["keys", "list"]);
    assert!(text(&o.stdout).contains("No user keys"), "{}", show(&o));
    // The name is free again.
    let o = ctl(&["keys", "create", "alice"]);
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_ne!(secrets_in(&text(&o.stdout)), vec![secret]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_roles_decide_who_reads_routes_and_who_makes_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (agent, controller) = cluster(dir.path());

    // Read-only: may list keys, not read Routes (it carries secrets) nor
    // make or revoke keys.
    let mut ro = as_role(&controller, "read-only").await;
    let e = routes(&mut ro).await.expect_err("read-only read Routes");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("role is read-only") && e.message().contains("gateway"),
        "{e:?}"
    );
    let e = ro
        .create_key(v1::CreateKeyRequest {
            name: "intruder".into(),
            ..Default::default()
        })
        .await
        .expect_err("read-only made a key");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(ro.list_keys(v1::ListKeysRequest {}).await.is_ok());
    let o = haloctl(&controller, "read-only", &["keys", "create", "intruder"]);
    assert_eq!(o.status.code(), Some(1), "{}", show(&o));
    assert!(
        text(&o.stderr).contains("CreateKey needs role admin"),
        "{}",
        show(&o)
    );

    // Gateway: reads Routes, makes no keys, revokes none.
    let mut gw = as_role(&controller, "gateway").await;
    let r = routes(&mut gw).await.expect("a gateway reads Routes");
    assert!(r.nodes.iter().any(|n| n.name == "halo1"), "{r:?}");
    for e in [
        gw.create_key(v1::CreateKeyRequest {
            name: "intruder".into(),
            ..Default::default()
        })
        .await
        .map(drop),
        gw.revoke_key(v1::RevokeKeyRequest {
            name: "anyone".into(),
        })
        .await
        .map(drop),
    ] {
        let e = e.expect_err("a gateway wrote a key");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    }
    // An agent serves a gateway too; a controller certificate reads nothing.
    let mut ag = as_role(&controller, "agent").await;
    assert!(routes(&mut ag).await.is_ok(), "an agent may read Routes");
    let mut ct = as_role(&controller, "controller").await;
    let e = routes(&mut ct).await.expect_err("controller read Routes");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // The gateway watches agents: reads allowed, starts refused.
    let url = format!("https://{}", agent.address());
    let ch = tests::cluster::channel(&url, "gateway")
        .connect()
        .await
        .expect("connect agent");
    let mut a = v1::agent_service_client::AgentServiceClient::new(ch);
    assert!(
        a.list_instances(v1::ListInstancesRequest {}).await.is_ok(),
        "a gateway may list an agent's instances"
    );
    let e = a
        .start_instance(v1::StartInstanceRequest {
            request_id: "gateway-intruder".into(),
            model_id: "tiny.gguf".into(),
            generation: 1,
            ..Default::default()
        })
        .await
        .expect_err("a gateway started an instance");
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");

    // Nothing was made; an admin may.
    let mut admin = connect(&controller.url()).await;
    let keys = admin
        .list_keys(v1::ListKeysRequest {})
        .await
        .expect("list")
        .into_inner()
        .keys;
    assert!(keys.is_empty(), "{keys:?}");
    let made = admin
        .create_key(v1::CreateKeyRequest {
            name: "ok".into(),
            ..Default::default()
        })
        .await
        .expect("admin makes a key")
        .into_inner();
    assert!(made.key.is_some_and(|k| k.sha256.is_empty()));
    let r = routes(&mut gw).await.expect("routes");
    assert_eq!(
        r.keys.iter().map(|k| k.sha256.clone()).collect::<Vec<_>>(),
        vec![controller::keys::sha256_hex(&made.secret)]
    );
}
