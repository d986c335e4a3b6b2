//! Models on demand with real processes: two agents, a controller,
//! `haloctl gateway` and llama-server with the tiny model. halo1 (role
//! `speed`) has room for one on-demand model at a time (its reserve leaves
//! 517 MiB: one tiny model needs a few MiB plus the 512 MiB margin), so two
//! of them swap; halo2 (role `steady`) holds a hand-placed model.

use proto::v1;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use tests::cluster::{AgentNode, ControllerProc, catalog_controller, connect, eventually};
use tests::front::{Answer, chat_body, complete, create_key, haloctl, post, workstation_gateway};
use tests::text;

/// `code` is served by `tiny`, `ask` by `tiny2` (both on demand, on
/// `speed` nodes), `steady` is placed by hand.
const CATALOG: &str = r#"
[[models]]
name = "tiny"
model_id = "tiny.gguf"
default_context = 256
min_context = 256
modes = ["code"]
on_demand = true
role = "speed"
idle_unload_secs = 8
min_resident_secs = 3

[[models]]
name = "tiny2"
model_id = "tiny.gguf"
default_context = 2048
min_context = 2048
modes = ["ask"]
on_demand = true
role = "speed"
idle_unload_secs = 8
min_resident_secs = 3

[[models]]
name = "steady"
model_id = "tiny.gguf"
default_context = 256
min_context = 256
"#;

/// The controller's events, oldest first.
fn events(c: &ControllerProc, home: &Path) -> Vec<Value> {
    let o = haloctl(c, home)
        .args(["events", "-o", "json"])
        .output()
        .expect("haloctl events");
    assert!(o.status.success(), "{}", text(&o.stderr));
    text(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn of_kind<'a>(events: &'a [Value], kind: &str, subject: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["kind"] == kind && e["subject"] == subject)
        .collect()
}

async fn placements(c: &ControllerProc) -> Vec<v1::Placement> {
    connect(&c.url())
        .await
        .list_placements(v1::ListPlacementsRequest {})
        .await
        .expect("placements")
        .into_inner()
        .placements
}

/// A chat through the gateway, on its own thread.
fn ask(
    url: &str,
    key: &str,
    model: &str,
    body: Value,
) -> std::thread::JoinHandle<(Answer, Duration)> {
    let (url, key) = (format!("{url}/v1/chat/completions"), key.to_owned());
    let mut body = body;
    body["model"] = Value::from(model);
    std::thread::spawn(move || {
        let t = Instant::now();
        let a = post(&url, Some(&key), &body).expect("request");
        (a, t.elapsed())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_models_load_once_for_many_swap_by_the_rules_and_unload_when_idle() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path();
    let mut halo1 = AgentNode::new(home, "halo1", &["speed"], 4);
    let mut halo2 = AgentNode::new(home, "halo2", &["steady"], 4);
    // 120.5 GiB usable - 122875 MiB = 517 MiB for models on halo1: tiny
    // (1.3 MiB at context 256) or tiny2 (4.2 MiB at 2048), each with
    // the 512 MiB margin, but never both.
    halo1.extra_args = vec!["--reserve".into(), "122875MiB".into()];
    for n in [&mut halo1, &mut halo2] {
        agent::gguf::fixtures::write_tiny_llama(&n.models.join("tiny.gguf"), 7).expect("tiny");
        n.start();
    }
    let nodes = [halo1, halo2];
    let mut ctl = catalog_controller(home, &nodes, CATALOG, &[]);
    let _c = ctl.start_and_wait(&["halo1", "halo2"]).await;
    let o = haloctl(&ctl, home)
        .args(["place", "steady", "steady"])
        .output()
        .expect("place");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let key = create_key(&ctl, home, "alice", &[]);
    let gw = workstation_gateway(home, &ctl, &[]);

    // 20 first requests at once for `code`: one placement, 20 answers.
    let short = chat_body("x", "be brief", false);
    let batch: Vec<_> = (0..20)
        .map(|_| ask(&gw.url, &key, "code", short.clone()))
        .collect();
    let answers: Vec<(Answer, Duration)> = batch
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    for (a, _) in &answers {
        assert!(complete(a, false), "{} {}", a.status, a.body);
    }
    let slowest = answers.iter().map(|(_, t)| *t).max().unwrap_or_default();
    println!("20 first requests for an unloaded model: all answered, slowest {slowest:?}");
    let ps = placements(&ctl).await;
    assert_eq!(ps.iter().filter(|p| p.model == "tiny").count(), 1, "{ps:?}");
    let ev = events(&ctl, home);
    let loaded = of_kind(&ev, "loaded", "tiny");
    assert_eq!(loaded.len(), 1, "{ev:?}");
    let how = loaded[0]["message"].as_str().unwrap_or_default();
    assert!(
        how.contains("on demand for a request through gateway"),
        "{how}"
    );
    assert!(how.contains("(key alice)"), "{how}");
    let status = text(
        &haloctl(&ctl, home)
            .arg("status")
            .output()
            .expect("status")
            .stdout,
    );
    println!("{status}");
    assert!(
        status.contains("tiny was loaded on demand: last request"),
        "{status}"
    );

    // `ask` needs tiny2, which cannot fit beside tiny: tiny goes, but not
    // before its min_resident_secs (3 s) are over.
    let (a, took) = ask(&gw.url, &key, "ask", short.clone())
        .join()
        .expect("thread");
    assert!(complete(&a, false), "{} {}", a.status, a.body);
    println!("`ask` answered after {took:?} (tiny evicted, tiny2 loaded)");
    let ev = events(&ctl, home);
    let evicted = of_kind(&ev, "evicted", "tiny");
    assert_eq!(evicted.len(), 1, "{ev:?}");
    let loaded_at = loaded[0]["at_unix_ms"].as_u64().unwrap_or(0);
    let evicted_at = evicted[0]["at_unix_ms"].as_u64().unwrap_or(0);
    assert!(
        evicted_at >= loaded_at + 3000,
        "evicted {} ms after loading, within min_resident_secs",
        evicted_at - loaded_at
    );
    assert!(
        evicted[0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("to make room for `tiny2`"),
        "{ev:?}"
    );

    // A long answer from tiny2 is in flight when `code` comes (tiny2 is
    // past its min_resident_secs): tiny waits for it, the stream is whole.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let long = serde_json::json!({
        "stream": true,
        "max_tokens": 1800,
        "ignore_eos": true,
        "messages": [{"role": "user", "content": "Tell a long story"}],
    });
    let streaming = ask(&gw.url, &key, "ask", long);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let code = ask(&gw.url, &key, "code", short.clone());
    let (s, stream_took) = streaming.join().expect("thread");
    let (a, code_took) = code.join().expect("thread");
    let chunks = s.body.matches("data: ").count();
    println!(
        "long stream of {chunks} events took {stream_took:?}; `code` meanwhile answered \
         after {code_took:?}"
    );
    assert!(
        complete(&s, true),
        "the stream was cut: {}",
        &s.body[s.body.len().saturating_sub(300)..]
    );
    assert!(
        s.body.contains("\"finish_reason\":\"length\""),
        "the stream ended early"
    );
    assert!(
        chunks > 1500,
        "tiny2 runs at a smaller context than asked: {chunks} events"
    );
    assert!(
        code_took + Duration::from_millis(300) >= stream_took,
        "tiny2 was evicted while its stream ran"
    );
    assert!(complete(&a, false), "{} {}", a.status, a.body);
    let ev = events(&ctl, home);
    let evicted2 = of_kind(&ev, "evicted", "tiny2");
    assert_eq!(evicted2.len(), 1, "{ev:?}");

    // `haloctl place` of the loaded on-demand model makes it resident.
    let o = haloctl(&ctl, home)
        .args(["place", "speed", "tiny"])
        .output()
        .expect("place");
    let said = text(&o.stdout) + &text(&o.stderr);
    assert!(o.status.success(), "{said}");
    assert!(said.contains("now resident"), "{said}");
    let tiny = placements(&ctl).await;
    assert!(
        tiny.iter().any(|p| p.model == "tiny" && !p.on_demand),
        "{tiny:?}"
    );

    // Idle: a model loaded on demand unloads after idle_unload_secs (8 s);
    // the resident and the hand-placed ones stay.
    let a = ask(&gw.url, &key, "ask", short.clone())
        .join()
        .expect("thread")
        .0;
    assert_eq!(
        a.status, 503,
        "tiny2 cannot fit beside resident tiny: {}",
        a.body
    );
    assert!(a.body.contains("model_does_not_fit"), "{}", a.body);
    let o = haloctl(&ctl, home)
        .args(["unplace", "tiny"])
        .output()
        .expect("unplace");
    assert!(o.status.success(), "{}", text(&o.stderr));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let a = ask(&gw.url, &key, "ask", short).join().expect("thread").0;
    assert!(complete(&a, false), "{} {}", a.status, a.body);
    let gone = eventually(Duration::from_secs(40), || {
        let ctl = &ctl;
        async move {
            let ps = placements(ctl).await;
            (!ps.iter().any(|p| p.model == "tiny2")).then_some(ps)
        }
    })
    .await
    .expect("tiny2 was not unloaded when idle");
    assert!(gone.iter().any(|p| p.model == "steady"), "{gone:?}");
    let ev = events(&ctl, home);
    let unloaded = of_kind(&ev, "unloaded", "tiny2");
    assert_eq!(unloaded.len(), 1, "{ev:?}");
    println!("{}", unloaded[0]["message"]);
    drop(gw);
    drop(nodes);
}
