//! Hostile input against the real daemons: one table of path-traversal
//! and malformed model ids run through every entry point that takes one
//! (the agent's StartInstance and FetchModel, the controller's PutCatalogEntry, Place and
//! PutBenchResult, and the controller's catalog file); the agent's start/stop rate limit;
//! and requests far above the message size limits. Every refusal must name
//! the problem, start nothing, record nothing, and leave the daemon up.

use proto::v1;
use std::path::Path;
use std::time::Duration;
use tests::agent_node::{Client as AgentClient, options, start_request};
use tests::cluster::{AgentNode, CONTROLLER, ControllerProc, connect, tiny_controller};
use tonic::Code;

/// A model id as the table gives it.
#[derive(Debug, Clone, Copy)]
enum Input {
    /// Sent as is.
    Text(&'static str),
    /// `n` times `a`, then the suffix (built at run time: too long for a
    /// literal worth reading).
    Long(usize, &'static str),
    /// Not UTF-8: protobuf strings must be, so this is encoded by hand as
    /// the bytes of the same field.
    Raw(&'static [u8]),
}

impl Input {
    /// The bytes on the wire.
    fn bytes(self) -> Vec<u8> {
        match self {
            Input::Text(s) => s.as_bytes().to_vec(),
            Input::Long(n, suffix) => format!("{}{suffix}", "a".repeat(n)).into_bytes(),
            Input::Raw(b) => b.to_vec(),
        }
    }

    /// The text, when it is UTF-8.
    fn text(self) -> Option<String> {
        String::from_utf8(self.bytes()).ok()
    }
}

/// What an entry point must answer for a row.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Refused with this code and a message containing the text.
    Refused(Code, &'static str),
    /// A well-formed relative id, taken as a literal name: the catalog
    /// records it (whether it resolves is the agent's call), and placing it
    /// is declined because no node holds a usable file of that name.
    Literal,
}

use Expect::{Literal, Refused};

/// The inputs, with what the agent's StartInstance and the catalog
/// (PutCatalogEntry and the catalog file) answer. Place takes a catalog
/// name, which can never contain `/`, `\`, `%` or NUL, so every row is
/// refused there as INVALID_ARGUMENT naming `model` (see `place_expect`).
///
/// * Malformed ids (`..`, absolute, NUL, too long, empty, backslash) are
///   INVALID_ARGUMENT: the request itself is wrong, whatever is on disk.
/// * Non-UTF-8 bytes in a string field do not decode as protobuf: the
///   message is refused before any handler runs, as INVALID_ARGUMENT
///   (halo's codec, `proto::limits::Codec`; tonic's own says INTERNAL).
/// * `%2e%2e/x.gguf` is not URL-decoded anywhere: it names a directory
///   literally called `%2e%2e`, which no agent has, so the agent answers
///   NOT_FOUND and the catalog takes it as a literal name.
/// * The symlink is a well-formed id of a file the agent lists, as broken:
///   the start is refused as FAILED_PRECONDITION (the state of the node's
///   file system stops it; fixing the link makes the same request
///   succeed), naming the escape.
const ROWS: &[(&str, Input, Expect, Expect)] = &[
    (
        "relative climb",
        Input::Text("a/../../etc/passwd"),
        Refused(Code::InvalidArgument, "`..`"),
        Refused(Code::InvalidArgument, "`..`"),
    ),
    (
        "absolute",
        Input::Text("/etc/passwd"),
        Refused(Code::InvalidArgument, "absolute"),
        Refused(Code::InvalidArgument, "absolute"),
    ),
    (
        "dot-dot",
        Input::Text(".."),
        Refused(Code::InvalidArgument, "`..`"),
        Refused(Code::InvalidArgument, "`..`"),
    ),
    (
        "parent file",
        Input::Text("../x.gguf"),
        Refused(Code::InvalidArgument, "`..`"),
        Refused(Code::InvalidArgument, "`..`"),
    ),
    (
        "symlink escape",
        Input::Text("escape.gguf"),
        Refused(Code::FailedPrecondition, "outside the model directories"),
        Literal,
    ),
    (
        "NUL",
        Input::Text("x\0.gguf"),
        Refused(Code::InvalidArgument, "NUL"),
        Refused(Code::InvalidArgument, "NUL"),
    ),
    (
        "10,000 characters",
        Input::Long(10_000, ""),
        Refused(Code::InvalidArgument, "too long"),
        Refused(Code::InvalidArgument, "too long"),
    ),
    (
        "300-character component",
        Input::Long(295, ".gguf"),
        Refused(Code::InvalidArgument, "longer than 255"),
        Refused(Code::InvalidArgument, "longer than 255"),
    ),
    (
        "not UTF-8",
        Input::Raw(b"m\xff\xfe.gguf"),
        Refused(Code::InvalidArgument, "UTF-8"),
        Refused(Code::InvalidArgument, "UTF-8"),
    ),
    (
        "empty",
        Input::Text(""),
        Refused(Code::InvalidArgument, "empty"),
        Refused(Code::InvalidArgument, "empty"),
    ),
    (
        "dot slash",
        Input::Text("./"),
        Refused(Code::InvalidArgument, "`.`"),
        Refused(Code::InvalidArgument, "`.`"),
    ),
    (
        "backslashes",
        Input::Text("..\\..\\x"),
        Refused(Code::InvalidArgument, "backslash"),
        Refused(Code::InvalidArgument, "backslash"),
    ),
    (
        "URL-encoded dot-dot",
        Input::Text("%2e%2e/x.gguf"),
        Refused(Code::NotFound, "unknown model id"),
        Literal,
    ),
];

/// What Place answers for a row's input as the catalog name.
fn place_expect(input: Input) -> Expect {
    match input {
        Input::Raw(_) => Refused(Code::InvalidArgument, "UTF-8"),
        // A valid catalog-name shape that is not in the catalog.
        Input::Text("escape.gguf") => Literal,
        _ => Refused(Code::InvalidArgument, "`model`"),
    }
}

/// StartInstance's first two fields, with the model id as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawStart {
    #[prost(string, tag = "1")]
    request_id: String,
    #[prost(bytes = "vec", tag = "2")]
    model_id: Vec<u8>,
}

/// CatalogEntry's name and model id, the id as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawEntry {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(bytes = "vec", tag = "2")]
    model_id: Vec<u8>,
}

/// PutCatalogEntryRequest over [`RawEntry`].
#[derive(Clone, PartialEq, prost::Message)]
struct RawPut {
    #[prost(message, optional, tag = "1")]
    entry: Option<RawEntry>,
}

/// PlaceRequest's role and model, the model as raw bytes.
#[derive(Clone, PartialEq, prost::Message)]
struct RawPlace {
    #[prost(string, tag = "1")]
    role: String,
    #[prost(bytes = "vec", tag = "2")]
    model: Vec<u8>,
}

/// One unary call of `path` at `url` with a hand-made message.
async fn raw_call<M, R>(url: &str, path: &'static str, msg: M) -> Result<R, tonic::Status>
where
    M: prost::Message + Send + Sync + 'static,
    R: prost::Message + Default + Send + Sync + 'static,
{
    let channel = tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .timeout(Duration::from_secs(20))
        .connect()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    grpc.unary(
        tonic::Request::new(msg),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        tonic_prost::ProstCodec::<M, R>::default(),
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Connects to an agent.
async fn agent_client(address: &str) -> AgentClient {
    for _ in 0..100 {
        if let Ok(c) = AgentClient::connect(format!("http://{address}")).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot connect to the agent at {address}");
}

/// A started agent holding the tiny model and `escape.gguf`, a symlink to
/// a valid model outside its model directory.
fn agent_with_escape(dir: &Path) -> AgentNode {
    let mut node = AgentNode::new(dir, "halo1", &["speed"], 4);
    agent::gguf::fixtures::write_tiny_llama(&node.models.join("tiny.gguf"), 7).expect("tiny");
    let outside = dir.join("outside.gguf");
    agent::gguf::fixtures::write_tiny_llama(&outside, 8).expect("outside");
    std::os::unix::fs::symlink(&outside, node.models.join("escape.gguf")).expect("symlink");
    node.extra_args.push("--insecure-loopback-only".into());
    node.start();
    node
}

/// Asserts the result matches `want`; `what` labels failures.
fn check<T: std::fmt::Debug>(what: &str, got: Result<T, tonic::Status>, want: Expect) -> Option<T> {
    match (got, want) {
        (Err(s), Refused(code, text)) => {
            assert_eq!(s.code(), code, "{what}: {}", s.message());
            assert!(
                s.message().contains(text),
                "{what}: `{text}` not in {}",
                s.message()
            );
            assert!(
                s.message().len() < 1_000,
                "{what}: a {}-byte message",
                s.message().len()
            );
            None
        }
        (Ok(v), Literal) => Some(v),
        (got, want) => panic!("{what}: expected {want:?}, got {got:?}"),
    }
}

/// A bench result of catalog name `model` naming file `model_id`.
fn bench_result(model: &str, model_id: &str, at: u64) -> v1::BenchResult {
    v1::BenchResult {
        setup: Some(v1::BenchSetup {
            model: model.into(),
            model_id: model_id.into(),
            node: "halo1".into(),
            context_size: 256,
            slots: 1,
            flash_attention: "auto".into(),
            ..Default::default()
        }),
        placement: model.into(),
        at_unix_ms: 1_780_000_000_000 + at,
        points: vec![v1::BenchPoint {
            concurrency: 1,
            prompt_tokens: 8,
            gen_tokens: 8,
            runs: 1,
            ..Default::default()
        }],
    }
}

/// Asserts a daemon process is alive.
fn alive(proc: &mut Option<tests::Proc>, what: &str) {
    proc.as_mut()
        .unwrap_or_else(|| panic!("{what} not running"))
        .assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_model_id_is_refused_at_every_entry_point_and_nothing_starts() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut node = agent_with_escape(dir);
    let mut ctl = tiny_controller(
        dir,
        std::slice::from_ref(&node),
        &["--insecure-loopback-only"],
    );
    let mut c = ctl.start_and_wait(&["halo1"]).await;
    let mut a = agent_client(&node.address()).await;
    let agent_url = format!("http://{}", node.address());
    let catalog_before = c
        .list_catalog(v1::ListCatalogRequest {})
        .await
        .expect("catalog")
        .into_inner()
        .entries
        .len();
    let mut literal = 0;
    let mut kept = 0;

    for (i, &(label, input, agent_want, catalog_want)) in ROWS.iter().enumerate() {
        // The agent's StartInstance.
        let rid = format!("hostile-{i}");
        let got = match input.text() {
            Some(id) => a
                .start_instance(start_request(&rid, &id, options(256)))
                .await
                .map(tonic::Response::into_inner),
            None => {
                raw_call::<_, v1::Instance>(
                    &agent_url,
                    "/halo.v1.AgentService/StartInstance",
                    RawStart {
                        request_id: rid.clone(),
                        model_id: input.bytes(),
                    },
                )
                .await
            }
        };
        check(&format!("{label}: StartInstance"), got, agent_want);

        // The agent's FetchModel: nothing but files its scan lists is read
        // (escape.gguf, a symlink out of the model directory, included).
        if let Some(id) = input.text() {
            let got = a
                .fetch_model(v1::FetchModelRequest {
                    model_id: id.clone(),
                    part: 0,
                    offset: 0,
                })
                .await;
            match got {
                Ok(stream) => {
                    let first = stream.into_inner().message().await;
                    assert!(first.is_err(), "{label}: FetchModel sent {first:?}");
                }
                Err(s) => assert!(
                    matches!(s.code(), Code::InvalidArgument | Code::NotFound),
                    "{label}: FetchModel answered {s:?}"
                ),
            }
        }

        // The agent's ProjectMemory: only a model its scan lists is run.
        if let Some(id) = input.text() {
            let got = a
                .project_memory(v1::ProjectMemoryRequest {
                    model_id: id.clone(),
                    context_size: 256,
                    ..v1::ProjectMemoryRequest::default()
                })
                .await;
            match got {
                Ok(r) => panic!("{label}: ProjectMemory answered {r:?}"),
                Err(s) => assert!(
                    matches!(s.code(), Code::InvalidArgument | Code::NotFound),
                    "{label}: ProjectMemory answered {s:?}"
                ),
            }
        }

        // The controller's PutCatalogEntry.
        let name = format!("hostile-{i}");
        let got = match input.text() {
            Some(id) => {
                let mut e = v1::CatalogEntry::from(proto::domain::CatalogEntry::new(&name, "x"));
                e.model_id = id;
                c.put_catalog_entry(v1::PutCatalogEntryRequest { entry: Some(e) })
                    .await
                    .map(tonic::Response::into_inner)
            }
            None => {
                raw_call::<_, v1::CatalogEntry>(
                    &ctl.url(),
                    "/halo.v1.ControllerService/PutCatalogEntry",
                    RawPut {
                        entry: Some(RawEntry {
                            name: name.clone(),
                            model_id: input.bytes(),
                        }),
                    },
                )
                .await
            }
        };
        if check(&format!("{label}: PutCatalogEntry"), got, catalog_want).is_some() {
            literal += 1;
            // Recorded as a literal name; placing it is declined, nothing
            // is recorded.
            let r = c
                .place(v1::PlaceRequest {
                    role: "speed".into(),
                    model: name.clone(),
                    ..Default::default()
                })
                .await
                .expect("place")
                .into_inner();
            assert!(!r.accepted, "{label}: placed {r:?}");
            assert!(
                r.explanation.join(" ").contains("holds"),
                "{label}: {:?}",
                r.explanation
            );
        }

        // The controller's PutBenchResult: the file a kept result names is
        // checked as the catalog checks it (a literal name is kept).
        if let Some(id) = input.text() {
            let got = c
                .put_bench_result(v1::PutBenchResultRequest {
                    result: Some(bench_result(&name, &id, i as u64)),
                })
                .await
                .map(tonic::Response::into_inner);
            if check(&format!("{label}: PutBenchResult"), got, catalog_want).is_some() {
                kept += 1;
            }
        }

        // The controller's Place, the input as the catalog name.
        let got = match input.text() {
            Some(model) => c
                .place(v1::PlaceRequest {
                    role: "speed".into(),
                    model,
                    ..Default::default()
                })
                .await
                .map(tonic::Response::into_inner),
            None => {
                raw_call::<_, v1::PlaceResponse>(
                    &ctl.url(),
                    "/halo.v1.ControllerService/Place",
                    RawPlace {
                        role: "speed".into(),
                        model: input.bytes(),
                    },
                )
                .await
            }
        };
        if let Some(r) = check(&format!("{label}: Place"), got, place_expect(input)) {
            assert!(!r.accepted, "{label}: placed {r:?}");
            assert!(
                r.explanation.join(" ").contains("not in the catalog"),
                "{label}: {:?}",
                r.explanation
            );
        }

        // Both daemons are still up after every row.
        alive(&mut node.proc, "agent");
        alive(&mut ctl.proc, "controller");
    }

    // Nothing started, nothing placed, the catalog holds only what it took
    // as literal names.
    let instances = a
        .list_instances(v1::ListInstancesRequest {})
        .await
        .expect("instances")
        .into_inner()
        .instances;
    assert!(
        instances
            .iter()
            .all(|i| i.state() == v1::InstanceState::Unmanaged),
        "{instances:?}"
    );
    assert!(
        node.servers().is_empty(),
        "a refused request spawned something"
    );
    let placements = c
        .list_placements(v1::ListPlacementsRequest {})
        .await
        .expect("placements")
        .into_inner()
        .placements;
    assert!(placements.is_empty(), "{placements:?}");
    let catalog = c
        .list_catalog(v1::ListCatalogRequest {})
        .await
        .expect("catalog")
        .into_inner()
        .entries;
    assert_eq!(catalog.len(), catalog_before + literal, "{catalog:?}");
    let results = c
        .list_bench_results(v1::ListBenchResultsRequest::default())
        .await
        .expect("bench results")
        .into_inner()
        .results;
    assert_eq!(results.len(), kept, "{results:?}");
    a.get_node(v1::GetNodeRequest {})
        .await
        .expect("agent answers");

    // The catalog file: a refused id stops the controller before it binds,
    // exit 64 with one line naming the field; a literal one starts.
    for (i, &(label, input, _, catalog_want)) in ROWS.iter().enumerate() {
        let file = dir.join(format!("catalog-{i}.toml"));
        let mut toml = b"[[models]]\nname = \"m\"\nmodel_id = \"".to_vec();
        match input.text() {
            // A JSON string literal is a TOML basic string.
            Some(id) => {
                let quoted = serde_json::to_string(&id).expect("json");
                toml.truncate(toml.len() - 1);
                toml.extend_from_slice(quoted.as_bytes());
            }
            None => {
                toml.extend_from_slice(&input.bytes());
                toml.push(b'"');
            }
        }
        toml.push(b'\n');
        std::fs::write(&file, &toml).expect("write catalog");
        let args: Vec<String> = vec![
            "--store-path".into(),
            dir.join(format!("file-store-{i}.json"))
                .display()
                .to_string(),
            "--catalog".into(),
            file.display().to_string(),
            "--insecure-loopback-only".into(),
        ];
        match catalog_want {
            Refused(..) => {
                let mut child = std::process::Command::new(&*CONTROLLER)
                    .arg("--listen")
                    .arg("127.0.0.1:0")
                    .args(&args)
                    .env_remove("HALO_CONTROLLER_CONFIG")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::piped())
                    .spawn()
                    .expect("run controller");
                let status =
                    tests::wait_for(Duration::from_secs(10), || child.try_wait().ok().flatten());
                if status.is_none() {
                    let _ = child.kill();
                }
                let out = child.wait_with_output().expect("controller output");
                let stderr = String::from_utf8_lossy(&out.stderr);
                assert_eq!(status.and_then(|s| s.code()), Some(64), "{label}: {stderr}");
                let why = if matches!(input, Input::Raw(_)) {
                    "UTF-8"
                } else {
                    "model_id"
                };
                assert!(stderr.contains(why), "{label}: {stderr}");
                assert_eq!(stderr.trim().lines().count(), 1, "{label}: {stderr}");
                assert!(stderr.len() < 1_000, "{label}: {stderr}");
            }
            Literal => {
                // Starts and serves (start() panics with its log if not).
                let mut p = ControllerProc::new(dir, &format!("file-{i}"), &args);
                p.start();
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hammered_starts_get_resource_exhausted_and_a_valid_start_works_after_waiting() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut node = agent_with_escape(tmp.path());
    let mut a = agent_client(&node.address()).await;

    // Well-formed but unknown: each would be a NOT_FOUND (and a rescan).
    let mut refused = Vec::new();
    let mut served = 0;
    for i in 0..60 {
        match a
            .start_instance(start_request(
                &format!("hammer-{i}"),
                "nope.gguf",
                options(256),
            ))
            .await
        {
            Err(s) if s.code() == Code::NotFound => served += 1,
            Err(s) if s.code() == Code::ResourceExhausted => refused.push(s.message().to_owned()),
            other => panic!("call {i}: {other:?}"),
        }
    }
    assert!(served >= 20, "the burst was refused: {served} served");
    assert!(!refused.is_empty(), "60 starts at once, none refused");
    let msg = &refused[0];
    assert!(msg.contains("retry in") && msg.contains("ms"), "{msg}");
    // Stops share the bucket.
    let e = a
        .stop_instance(v1::StopInstanceRequest {
            instance_id: "nope".into(),
            leader_revision: 0,
        })
        .await
        .expect_err("stop with an empty bucket");
    assert_eq!(e.code(), Code::ResourceExhausted, "{}", e.message());
    alive(&mut node.proc, "agent");
    assert!(
        node.servers().is_empty(),
        "a refused start spawned something"
    );

    // After the advertised wait, a valid start works and its stop too.
    let ms: u64 = msg
        .split("retry in ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("retry delay in the message");
    tokio::time::sleep(Duration::from_millis(ms.max(200) + 300)).await;
    let started = a
        .start_instance(start_request("valid", "tiny.gguf", options(256)))
        .await
        .expect("a valid start after waiting")
        .into_inner();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let stopped = a
        .stop_instance(v1::StopInstanceRequest {
            instance_id: started.id.clone(),
            leader_revision: 0,
        })
        .await
        .expect("its stop")
        .into_inner();
    assert_eq!(stopped.state(), v1::InstanceState::Stopped, "{stopped:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_far_above_the_size_limits_are_refused_and_the_daemons_stay_up() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let mut node = agent_with_escape(dir);
    let mut ctl = tiny_controller(
        dir,
        std::slice::from_ref(&node),
        &["--insecure-loopback-only"],
    );
    ctl.start();
    let mut c = connect(&ctl.url()).await;
    let mut a = agent_client(&node.address()).await;
    let huge = "x".repeat(8 * 1024 * 1024);
    let too_big = |s: tonic::Status, what: &str| {
        assert!(
            matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted),
            "{what}: {:?} {}",
            s.code(),
            s.message()
        );
        assert!(s.message().contains("too large"), "{what}: {}", s.message());
    };

    let e = a
        .start_instance(start_request(&huge, "tiny.gguf", options(256)))
        .await
        .expect_err("8 MiB start");
    too_big(e, "agent");
    let mut entry = v1::CatalogEntry::from(proto::domain::CatalogEntry::new("big", "x"));
    entry.model_id = huge.clone();
    let e = c
        .put_catalog_entry(v1::PutCatalogEntryRequest { entry: Some(entry) })
        .await
        .expect_err("8 MiB catalog entry");
    too_big(e, "controller");

    alive(&mut node.proc, "agent");
    alive(&mut ctl.proc, "controller");
    a.get_node(v1::GetNodeRequest {})
        .await
        .expect("agent answers");
    let catalog = c
        .list_catalog(v1::ListCatalogRequest {})
        .await
        .expect("controller answers")
        .into_inner()
        .entries;
    assert!(catalog.iter().all(|e| e.name != "big"), "{catalog:?}");
    assert!(node.servers().is_empty());
}
