//! The `Routes` answer, as a pure function of desired and observed state:
//! every placement with its catalog name and modes, its state in words and
//! its replicas' instances (endpoint, API key, state), every node with its
//! agent address and gateway URL, and the user keys (hashed). Gateways
//! route by it; the agents' own watch streams keep it current between
//! reads.

use crate::keys::KeyRecord;
use crate::nodes::Liveness;
use crate::observe::{NodeObs, Timing};
use proto::domain::{CatalogEntry, Instance, InstanceState, NodeStatus, Placement};
use proto::v1;
use std::collections::{BTreeMap, HashMap, HashSet};
use tokio::time::Instant;

/// Everything the answer is made of, read at one moment.
#[derive(Debug)]
pub struct Snapshot<'a> {
    /// Placements in the store.
    pub placements: &'a [Placement],
    /// The catalog by name.
    pub catalog: &'a BTreeMap<String, CatalogEntry>,
    /// Observed nodes by name.
    pub nodes: &'a BTreeMap<String, NodeObs>,
    /// Instances by request id, with their node
    /// ([`crate::observe::instances_by_request`]).
    pub by_request: &'a HashMap<String, (String, Instance)>,
    /// Request ids (of these placements' replicas) whose last start an
    /// agent refused.
    pub refused: &'a HashSet<String>,
    /// User keys in the store.
    pub keys: &'a [KeyRecord],
    /// Liveness timing.
    pub timing: Timing,
    /// Now, for liveness.
    pub now: Instant,
    /// Now, Unix ms, for the answer's stamp.
    pub now_unix_ms: u64,
}

/// One replica's state in words (the words of `haloctl status`, plus
/// `moving` and `unreachable` while its node is silent).
fn replica_word(
    p: &Placement,
    instance: Option<&Instance>,
    liveness: Liveness,
    refused: bool,
) -> &'static str {
    match liveness {
        // A floating placement is moved off a node that stays silent; a
        // pinned one waits for it.
        Liveness::Unreachable | Liveness::Lost if p.pinned_node.is_none() => "moving",
        Liveness::Unreachable | Liveness::Lost => "unreachable",
        Liveness::Ready | Liveness::Unknown => match instance {
            Some(i) => i.state.as_str(),
            None if refused => InstanceState::Failed.as_str(),
            None => "pending",
        },
    }
}

/// How far along a state is: the placement is as far as its best replica.
const ORDER: [&str; 10] = [
    "ready",
    "loading",
    "starting",
    "moving",
    "pending",
    "unreachable",
    "unhealthy",
    "stopping",
    "stopped",
    "failed",
];

/// A placement's state in words from its replicas': `paused`, `held: WHY`
/// (no node has room for what it was seen to use), `unplaced` (no replica),
/// else the most advanced of its replicas' states.
pub fn placement_state<'a>(p: &Placement, replicas: impl IntoIterator<Item = &'a str>) -> String {
    if p.paused {
        return "paused".into();
    }
    if let Some(why) = &p.held {
        return format!("held: {why}");
    }
    replicas
        .into_iter()
        .min_by_key(|w| ORDER.iter().position(|o| o == w).unwrap_or(ORDER.len()))
        .unwrap_or("unplaced")
        .to_owned()
}

/// The `Routes` answer.
pub fn build(s: &Snapshot<'_>) -> v1::RoutesResponse {
    let liveness = |node: &str| {
        s.nodes
            .get(node)
            .map_or(Liveness::Unknown, |n| n.liveness(s.now, &s.timing))
    };
    let routes = s
        .placements
        .iter()
        .map(|p| {
            let modes: Vec<i32> = s
                .catalog
                .get(&p.model)
                .map(|e| {
                    e.modes
                        .iter()
                        .map(|m| v1::EditorMode::from(*m) as i32)
                        .collect()
                })
                .unwrap_or_default();
            let mut words = Vec::new();
            let replicas = p
                .replicas
                .iter()
                .map(|r| {
                    let rid = p.key(r).request_id();
                    // An instance of this request on another node is not
                    // the replica's (as in Endpoints).
                    let instance = s
                        .by_request
                        .get(&rid)
                        .filter(|(node, _)| node == &r.node)
                        .map(|(_, i)| i);
                    let live = liveness(&r.node);
                    words.push(replica_word(p, instance, live, s.refused.contains(&rid)));
                    // What a silent node's instance does now is unknown.
                    let state = match (instance, live) {
                        (Some(i), Liveness::Ready) => v1::InstanceState::from(i.state),
                        _ => v1::InstanceState::Unspecified,
                    };
                    v1::RouteReplica {
                        node: r.node.clone(),
                        agent_address: s
                            .nodes
                            .get(&r.node)
                            .map(|n| n.config.address.clone())
                            .unwrap_or_default(),
                        instance_id: instance.map(|i| i.id.clone()).unwrap_or_default(),
                        request_id: rid,
                        base_url: instance.map(|i| i.endpoint.clone()).unwrap_or_default(),
                        api_key: instance.map(|i| i.api_key.clone()).unwrap_or_default(),
                        state: state as i32,
                    }
                })
                .collect();
            v1::Route {
                placement: p.name.clone(),
                model: p.model.clone(),
                modes,
                replicas,
                state: placement_state(p, words),
                on_demand: s.catalog.get(&p.model).is_some_and(|e| e.on_demand),
            }
        })
        .collect::<Vec<v1::Route>>();
    // Catalog models with no placement: a gateway knows their names and
    // modes, so a request during an unplace-then-place waits instead of
    // hearing "no such model".
    let mut routes = routes;
    for (name, e) in s.catalog {
        if !s.placements.iter().any(|p| &p.model == name) {
            routes.push(v1::Route {
                placement: String::new(),
                model: name.clone(),
                modes: e
                    .modes
                    .iter()
                    .map(|m| v1::EditorMode::from(*m) as i32)
                    .collect(),
                replicas: Vec::new(),
                state: if e.on_demand {
                    "not loaded (on demand)".into()
                } else {
                    "not placed".into()
                },
                on_demand: e.on_demand,
            });
        }
    }
    let nodes = s
        .nodes
        .values()
        .map(|n| v1::RouteNode {
            name: n.config.name.clone(),
            agent_address: n.config.address.clone(),
            status: v1::NodeStatus::from(NodeStatus::from(n.liveness(s.now, &s.timing))) as i32,
            gateway_url: n
                .identity
                .as_ref()
                .map(|i| i.gateway_url.clone())
                .unwrap_or_default(),
        })
        .collect();
    v1::RoutesResponse {
        routes,
        nodes,
        keys: s.keys.iter().map(|k| k.to_wire(true)).collect(),
        at_unix_ms: s.now_unix_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::NodeConfig;
    use proto::domain::{EditorMode, InstanceKind, InstanceOptions, PlacementOptions, Replica};
    use std::time::Duration;

    const TIMING: Timing = Timing {
        grace: Duration::from_secs(5),
        move_after: Duration::from_secs(30),
        heartbeat: Duration::from_secs(1),
    };

    fn placement(name: &str, nodes: &[&str], pinned: bool) -> Placement {
        Placement {
            on_demand: false,
            placed_at_unix_ms: 0,
            copy_if_missing: false,
            oom_kills: Vec::new(),
            held: None,
            learned_bytes: 0,
            name: name.into(),
            role: "speed".into(),
            model: "tiny".into(),
            model_id: "tiny.gguf".into(),
            pinned_node: pinned.then(|| nodes[0].to_owned()),
            options: PlacementOptions {
                context_size: 256,
                parallel: 1,
                cache_type_k: "f16".into(),
                cache_type_v: "f16".into(),
                extra_flags: vec![],
                allow_context_over_trained: false,
            },
            estimate_bytes: 1,
            priority: 0,
            replicas: nodes
                .iter()
                .enumerate()
                .map(|(i, n)| Replica {
                    index: i as u32,
                    node: (*n).into(),
                    generation: 1,
                })
                .collect(),
            paused: false,
            split: None,
        }
    }

    fn instance(rid: &str, state: InstanceState) -> Instance {
        Instance {
            estimate_bytes: 0,
            oom_kill: None,
            kind: InstanceKind::LlamaServer,
            id: format!("id-{rid}"),
            model_id: "tiny.gguf".into(),
            state,
            options: InstanceOptions::default(),
            pid: Some(1),
            port: 8080,
            endpoint: "http://127.0.0.1:8080".into(),
            restart_count: 0,
            last_error: String::new(),
            state_since_unix_ms: 0,
            observed: None,
            memory: None,
            generation: 1,
            api_key: "instance-key".into(),
            request_id: rid.into(),
            command_line: String::new(),
            model_file_changed: String::new(),
        }
    }

    fn node(name: &str, now: Instant, silent: Duration) -> NodeObs {
        NodeObs {
            config: NodeConfig {
                name: name.into(),
                address: format!("10.0.0.{}:7301", name.len()),
                roles: vec![],
            },
            identity: None,
            reserve_bytes: 0,
            memory: None,
            models: vec![],
            instances: BTreeMap::new(),
            last_heard: Some(now - silent),
            watching_since: now - silent,
            connected: true,
            allowed_flags: None,
        }
    }

    #[test]
    fn a_placement_is_as_far_along_as_its_best_replica() {
        let p = placement("tiny", &["a", "b"], false);
        assert_eq!(placement_state(&p, ["failed", "ready"]), "ready");
        assert_eq!(placement_state(&p, ["pending", "loading"]), "loading");
        assert_eq!(placement_state(&p, ["failed", "moving"]), "moving");
        assert_eq!(placement_state(&p, ["failed"]), "failed");
        assert_eq!(placement_state(&p, []), "unplaced");
        let mut paused = p.clone();
        paused.paused = true;
        assert_eq!(placement_state(&paused, ["ready"]), "paused");
        let mut held = p.clone();
        held.held = Some("no node has room".into());
        assert_eq!(placement_state(&held, ["failed"]), "held: no node has room");
    }

    #[test]
    fn routes_carry_replicas_nodes_modes_and_hashed_keys() {
        let now = Instant::now() + Duration::from_secs(120);
        let mut placements = vec![
            placement("tiny", &["a", "b"], false),
            placement("pinned", &["b"], true),
            placement("waiting", &["a"], false),
        ];
        placements[1].model = "not-in-catalog".into();
        let mut catalog = BTreeMap::new();
        catalog.insert(
            "tiny".to_owned(),
            CatalogEntry {
                modes: vec![EditorMode::Code, EditorMode::Ask],
                ..toml_entry()
            },
        );
        let mut nodes = BTreeMap::new();
        nodes.insert("a".to_owned(), node("a", now, Duration::ZERO));
        // b has been silent past the move period.
        nodes.insert("b".to_owned(), node("b", now, Duration::from_secs(60)));
        let mut by_request = HashMap::new();
        let a0 = placements[0].key(&placements[0].replicas[0]).request_id();
        let b1 = placements[0].key(&placements[0].replicas[1]).request_id();
        by_request.insert(
            a0.clone(),
            ("a".into(), instance(&a0, InstanceState::Ready)),
        );
        by_request.insert(
            b1.clone(),
            ("b".into(), instance(&b1, InstanceState::Ready)),
        );
        let waiting = placements[2].key(&placements[2].replicas[0]).request_id();
        let refused = HashSet::from([waiting]);
        let key = crate::keys::new_key_request(&v1::CreateKeyRequest {
            name: "alice".into(),
            modes: vec![v1::EditorMode::Ask as i32],
            ..Default::default()
        })
        .expect("key")
        .record("halo-secret", 7);
        let r = build(&Snapshot {
            placements: &placements,
            catalog: &catalog,
            nodes: &nodes,
            by_request: &by_request,
            refused: &refused,
            keys: std::slice::from_ref(&key),
            timing: TIMING,
            now,
            now_unix_ms: 42,
        });
        assert_eq!(r.at_unix_ms, 42);
        let tiny = &r.routes[0];
        assert_eq!(
            (tiny.placement.as_str(), tiny.state.as_str()),
            ("tiny", "ready")
        );
        assert_eq!(
            tiny.modes,
            vec![v1::EditorMode::Code as i32, v1::EditorMode::Ask as i32]
        );
        let ready = &tiny.replicas[0];
        assert_eq!(ready.state, v1::InstanceState::Ready as i32);
        assert_eq!(ready.base_url, "http://127.0.0.1:8080");
        assert_eq!(ready.api_key, "instance-key");
        assert_eq!(ready.request_id, a0);
        assert_eq!(ready.instance_id, format!("id-{a0}"));
        assert_eq!(ready.agent_address, "10.0.0.1:7301");
        // The lost node's instance: known, but not claimed ready.
        assert_eq!(
            tiny.replicas[1].state,
            v1::InstanceState::Unspecified as i32
        );
        assert_eq!(tiny.replicas[1].base_url, "http://127.0.0.1:8080");
        assert_eq!(r.routes[1].state, "unreachable", "pinned to a lost node");
        assert!(r.routes[1].modes.is_empty(), "no catalog entry, no modes");
        assert_eq!(r.routes[2].state, "failed", "its start was refused");
        assert!(r.routes[2].replicas[0].base_url.is_empty());
        let statuses: Vec<_> = r
            .nodes
            .iter()
            .map(|n| (n.name.as_str(), n.status))
            .collect();
        assert_eq!(
            statuses,
            vec![
                ("a", v1::NodeStatus::Ready as i32),
                ("b", v1::NodeStatus::Lost as i32)
            ]
        );
        assert_eq!(r.keys.len(), 1);
        assert_eq!(r.keys[0].sha256, crate::keys::sha256_hex("halo-secret"));
        assert_eq!(r.keys[0].modes, vec![v1::EditorMode::Ask as i32]);

        // A floating placement on the lost node is moving.
        let moving = vec![placement("m", &["b"], false)];
        let r = build(&Snapshot {
            placements: &moving,
            catalog: &catalog,
            nodes: &nodes,
            by_request: &by_request,
            refused: &HashSet::new(),
            keys: &[],
            timing: TIMING,
            now,
            now_unix_ms: 0,
        });
        assert_eq!(r.routes[0].state, "moving");
    }

    fn toml_entry() -> CatalogEntry {
        serde_json::from_str(r#"{"name":"tiny","model_id":"tiny.gguf"}"#).expect("entry")
    }
}
