//! A placement replica's life as the controller drives it, in one place:
//!
//! * generations: a replica's generation is part of its request id
//!   ([`ReplicaKey::request_id`]), so every restart, move or re-plan
//!   ([`restart`], [`move_replica`], [`next_generation`]) bumps it, and a
//!   new placement reusing an old name continues after the generations
//!   agents still report ([`continue_after`]);
//! * what a node is asked to start: the replica's llama-server
//!   ([`start_request`]), a split helper's ggml-rpc-server
//!   ([`helper_request`]) and the split host's `--rpc`, `-ngl` and `-ts`
//!   ([`split_host`]);
//! * a replica the kernel killed for lack of memory ([`oom_killed`]):
//!   reconcile sizes its placement by what it used and places it again;
//! * when a split is whole: its host is wanted once every helper is Ready
//!   ([`ready_helper`]), and it is broken when a node of it is lost or one
//!   side of its current generation failed or was stopped
//!   ([`split_broken`]).
//!
//! Which of two instances with one request id counts (a live one over a
//! stopped one) is `proto::domain::instance::replaces`: the agents' view
//! (`observe`) needs it too, and it needs nothing of a placement.
//!
//! Reconcile, the API and split re-planning call these; none of them works
//! out a generation or a split's state on its own.

use crate::observe::NodeObs;
use proto::ConversionError;
use proto::domain::instance::parse_rpc_server;
use proto::domain::{
    Instance, InstanceKind, InstanceOptions, InstanceState, OomKill, Placement, Replica,
    ReplicaKey, SplitPlan, StartRequest,
};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// The generation a replica is first placed under.
pub const FIRST_GENERATION: u64 = 1;

/// Restarts replica `index` under the next generation (a new request id:
/// the agent keeps the stopped instance under the old one). `false` when
/// the placement has no such replica.
pub fn restart(p: &mut Placement, index: u32) -> bool {
    match p.replicas.iter_mut().find(|r| r.index == index) {
        Some(r) => {
            r.generation += 1;
            true
        }
        None => false,
    }
}

/// Moves replica `index` to node `to` under the next generation; the node
/// it left, or `None` when the placement has no such replica.
pub fn move_replica(p: &mut Placement, index: u32, to: String) -> Option<String> {
    let r = p.replicas.iter_mut().find(|r| r.index == index)?;
    r.generation += 1;
    Some(std::mem::replace(&mut r.node, to))
}

/// The generation after every one of `p`'s replicas: what a re-planned
/// split starts under, so every side starts afresh.
pub fn next_generation(p: &Placement) -> u64 {
    p.replicas.iter().map(|r| r.generation).max().unwrap_or(0) + 1
}

/// Lifts a new placement's generations past `seen`, the highest any agent
/// reports for its name: agents keep stopped instances, and a start with a
/// request id they have seen returns that instance, so a new placement
/// reusing an old one's name continues after its generations.
pub fn continue_after(p: &mut Placement, seen: u64) {
    for r in &mut p.replicas {
        r.generation = r.generation.max(seen.saturating_add(1));
    }
}

/// The start of replica `r`'s llama-server (a split's host still needs
/// [`split_host`]); its leader revision is filled in when sent.
pub fn start_request(p: &Placement, r: &Replica) -> StartRequest {
    StartRequest {
        request_id: p.key(r).request_id(),
        model_id: p.model_id.clone(),
        options: p.instance_options(),
        generation: r.generation,
        leader_revision: 0,
        kind: InstanceKind::LlamaServer,
        estimate_bytes: match &p.split {
            Some(plan) => plan.host().map_or(p.estimate_bytes, |h| h.total_bytes),
            None => p.sized_bytes(),
        },
    }
}

/// The replicas of `p` (not split) whose instance of the current
/// generation the kernel killed for lack of memory: index, node and the
/// figures.
pub fn oom_killed(
    p: &Placement,
    observed: &BTreeMap<String, NodeObs>,
) -> Vec<(u32, String, OomKill)> {
    if p.split.is_some() {
        return Vec::new();
    }
    p.replicas
        .iter()
        .filter_map(|r| {
            let rid = p.key(r).request_id();
            let i = observed
                .get(&r.node)?
                .instances
                .values()
                .find(|i| i.request_id == rid && i.state == InstanceState::Failed)?;
            Some((r.index, r.node.clone(), i.oom_kill.clone()?))
        })
        .collect()
}

/// The start of a split helper's ggml-rpc-server (`key`: the helper's),
/// which only `host_ip`, the host agent's address, may use.
pub fn helper_request(key: &ReplicaKey, host_ip: IpAddr) -> StartRequest {
    StartRequest {
        request_id: key.request_id(),
        model_id: String::new(),
        options: InstanceOptions {
            rpc_client: Some(host_ip),
            ..InstanceOptions::default()
        },
        generation: key.generation,
        leader_revision: 0,
        kind: InstanceKind::RpcServer,
        estimate_bytes: 0,
    }
}

/// The host's `-ngl` and `--tensor-split` for a plan: every layer on a
/// device but the host's CPU share, plus the output layer. With a GPU on
/// the host, its share is the last device; without one, the host's
/// layers stay on its CPU and only the helpers are devices.
pub fn host_offload(plan: &SplitPlan) -> (u32, Vec<u32>) {
    let host_gpu = plan.host().is_some_and(|h| h.tensor_split > 0);
    let devices = plan.shares.iter().filter(|s| host_gpu || !s.host);
    let layers: u32 = devices.clone().map(|s| s.layers).sum();
    (layers + 1, devices.map(|s| s.tensor_split).collect())
}

/// Makes `o` the split host's options: `--rpc` the helpers' endpoints (in
/// device order) and [`host_offload`]'s `-ngl` and `-ts`. `Err` when an
/// endpoint is not `IP:port`.
pub fn split_host(
    o: &mut InstanceOptions,
    plan: &SplitPlan,
    endpoints: &[String],
) -> Result<(), ConversionError> {
    o.rpc_servers = endpoints
        .iter()
        .map(|e| parse_rpc_server(e))
        .collect::<Result<_, _>>()?;
    let (gpu_layers, tensor_split) = host_offload(plan);
    o.gpu_layers = Some(gpu_layers);
    o.tensor_split = tensor_split;
    Ok(())
}

/// The helper `key`'s instance on `node` when it is Ready: the host's
/// llama-server may start only once each helper is.
pub fn ready_helper<'a>(node: Option<&'a NodeObs>, key: &ReplicaKey) -> Option<&'a Instance> {
    let rid = key.request_id();
    node?
        .instances
        .values()
        .find(|i| i.request_id == rid && i.state == InstanceState::Ready)
}

/// Why a split must be planned again, if it must: a node of it is lost
/// (`lost`), or a side of its current generation failed or was stopped.
pub fn split_broken(
    p: &Placement,
    lost: impl Fn(&str) -> bool,
    observed: &BTreeMap<String, NodeObs>,
) -> Option<String> {
    let plan = p.split.as_ref()?;
    let gone: Vec<&str> = plan
        .shares
        .iter()
        .map(|s| s.node.as_str())
        .filter(|n| lost(n))
        .collect();
    if gone.is_empty() {
        split_failure(p, observed)
    } else {
        Some(format!("node(s) {} lost", gone.join(", ")))
    }
}

/// Why a split is broken, if a side of its current generation failed or
/// was stopped behind the controller's back.
pub fn split_failure(p: &Placement, observed: &BTreeMap<String, NodeObs>) -> Option<String> {
    let plan = p.split.as_ref()?;
    let r = p.replicas.first()?;
    let key = p.key(r);
    let mut sides: Vec<(String, &str)> = vec![(key.request_id(), r.node.as_str())];
    sides.extend(
        plan.helper_keys(&key)
            .map(|(k, s)| (k.request_id(), s.node.as_str())),
    );
    for (rid, node) in sides {
        let Some(i) = observed
            .get(node)
            .and_then(|n| n.instances.values().find(|i| i.request_id == rid))
        else {
            continue;
        };
        if let Some(why) = side_failure(i) {
            return Some(format!("{} on {node} {why}", program(i.kind)));
        }
    }
    None
}

/// How one side of a split ended, when it did: `failed: REASON` or
/// `stopped: REASON` (the first line of its last error).
fn side_failure(i: &Instance) -> Option<String> {
    if !matches!(i.state, InstanceState::Failed | InstanceState::Stopped) {
        return None;
    }
    let reason = i.last_error.lines().next().unwrap_or("stopped");
    Some(format!("{}: {reason}", i.state))
}

/// The program an instance runs, as events name it.
fn program(kind: InstanceKind) -> &'static str {
    match kind {
        InstanceKind::RpcServer => "ggml-rpc-server",
        InstanceKind::LlamaServer => "llama-server",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::domain::{PlacementOptions, SplitShare};

    fn placement(generations: &[u64]) -> Placement {
        Placement {
            on_demand: false,
            placed_at_unix_ms: 0,
            copy_if_missing: false,
            oom_kills: Vec::new(),
            held: None,
            learned_bytes: 0,
            name: "m".into(),
            role: String::new(),
            model: "m".into(),
            model_id: "m.gguf".into(),
            pinned_node: None,
            options: PlacementOptions {
                context_size: 4096,
                parallel: 1,
                cache_type_k: "q8_0".into(),
                cache_type_v: "f16".into(),
                extra_flags: Vec::new(),
                allow_context_over_trained: false,
            },
            estimate_bytes: 0,
            priority: 0,
            replicas: generations
                .iter()
                .zip(0..)
                .map(|(&generation, index)| Replica {
                    index,
                    node: format!("halo{index}"),
                    generation,
                })
                .collect(),
            paused: false,
            split: None,
        }
    }

    fn share(node: &str, host: bool, layers: u32, tensor_split: u32) -> SplitShare {
        SplitShare {
            node: node.into(),
            host,
            layers,
            tensor_split,
            ..SplitShare::default()
        }
    }

    fn instance(rid: &str, state: InstanceState, kind: InstanceKind) -> Instance {
        Instance {
            estimate_bytes: 0,
            oom_kill: None,
            id: format!("id-{rid}"),
            model_id: String::new(),
            state,
            options: InstanceOptions::default(),
            pid: None,
            port: 50052,
            endpoint: "10.0.0.2:50052".into(),
            restart_count: 0,
            last_error: "exit 1\nmore".into(),
            state_since_unix_ms: 1,
            observed: None,
            memory: None,
            generation: 1,
            api_key: String::new(),
            request_id: rid.into(),
            command_line: String::new(),
            model_file_changed: String::new(),
            kind,
        }
    }

    fn node(name: &str, instances: Vec<Instance>) -> NodeObs {
        NodeObs {
            config: crate::observe::NodeConfig {
                name: name.into(),
                address: "10.0.0.1:7200".into(),
                roles: Vec::new(),
            },
            identity: None,
            reserve_bytes: 0,
            memory: None,
            models: Vec::new(),
            instances: instances.into_iter().map(|i| (i.id.clone(), i)).collect(),
            last_heard: None,
            watching_since: tokio::time::Instant::now(),
            connected: true,
            allowed_flags: None,
        }
    }

    #[test]
    fn a_restart_or_a_move_bumps_only_that_replicas_generation() {
        let mut p = placement(&[3, 5]);
        assert!(restart(&mut p, 1));
        assert_eq!(p.key(&p.replicas[1]).request_id(), "halo.m.r1.g6");
        assert!(!restart(&mut p, 7));
        assert_eq!(
            move_replica(&mut p, 0, "halo9".into()).as_deref(),
            Some("halo0")
        );
        assert_eq!(
            (p.replicas[0].node.as_str(), p.replicas[0].generation),
            ("halo9", 4)
        );
        assert_eq!(p.replicas[1].generation, 6);
        assert_eq!(move_replica(&mut p, 7, "x".into()), None);
    }

    #[test]
    fn a_replan_starts_after_every_replicas_generation() {
        assert_eq!(next_generation(&placement(&[2, 9, 4])), 10);
        assert_eq!(next_generation(&placement(&[])), 1);
    }

    #[test]
    fn a_new_placement_continues_after_generations_agents_still_report() {
        let mut p = placement(&[FIRST_GENERATION, 8]);
        continue_after(&mut p, 4);
        let g: Vec<u64> = p.replicas.iter().map(|r| r.generation).collect();
        assert_eq!(g, [5, 8]);
        continue_after(&mut p, u64::MAX);
        assert_eq!(p.replicas[0].generation, u64::MAX);
    }

    #[test]
    fn a_replica_starts_llama_server_with_the_placements_options() {
        let p = placement(&[2]);
        let s = start_request(&p, &p.replicas[0]);
        assert_eq!(s.request_id, "halo.m.r0.g2");
        assert_eq!(
            (s.kind, s.generation, s.leader_revision),
            (InstanceKind::LlamaServer, 2, 0)
        );
        assert_eq!(s.options, p.instance_options());
        assert_eq!(s.options.alias, "m");
    }

    #[test]
    fn a_helper_starts_rpc_server_for_the_host_only() {
        let p = placement(&[2]);
        let key = p.key(&p.replicas[0]).helper(1);
        let s = helper_request(&key, "10.0.0.1".parse().expect("ip"));
        assert_eq!(s.request_id, "halo.m.r0s1.g2");
        assert_eq!((s.kind, s.generation), (InstanceKind::RpcServer, 2));
        assert!(s.model_id.is_empty());
        assert_eq!(s.options.rpc_client, "10.0.0.1".parse().ok());
    }

    #[test]
    fn the_host_offloads_every_device_layer_plus_the_output() {
        let plan = |host_split: u32| SplitPlan {
            shares: vec![
                share("a", false, 10, 40),
                share("b", false, 6, 25),
                share("h", true, 8, host_split),
            ],
            traffic_bytes_per_token: 0,
            notes: Vec::new(),
        };
        assert_eq!(host_offload(&plan(35)), (25, vec![40, 25, 35]));
        // No GPU on the host: its layers stay on its CPU.
        assert_eq!(host_offload(&plan(0)), (17, vec![40, 25]));
        let mut o = InstanceOptions::default();
        let ends = ["10.0.0.2:50052".to_owned(), "10.0.0.3:50052".to_owned()];
        assert_eq!(split_host(&mut o, &plan(35), &ends), Ok(()));
        assert_eq!(o.gpu_layers, Some(25));
        assert_eq!(o.rpc_servers.len(), 2);
        let by_name = ["halo2:50052".to_owned()];
        assert!(split_host(&mut o, &plan(35), &by_name).is_err());
    }

    #[test]
    fn a_split_is_broken_when_a_side_of_its_generation_failed_or_stopped() {
        let mut p = placement(&[2]);
        p.replicas[0].node = "h".into();
        p.split = Some(SplitPlan {
            shares: vec![share("a", false, 10, 40), share("h", true, 8, 35)],
            traffic_bytes_per_token: 0,
            notes: Vec::new(),
        });
        let mut observed = BTreeMap::new();
        let helper = "halo.m.r0s1.g2";
        observed.insert(
            "a".to_owned(),
            node(
                "a",
                vec![instance(
                    helper,
                    InstanceState::Ready,
                    InstanceKind::RpcServer,
                )],
            ),
        );
        observed.insert("h".to_owned(), node("h", Vec::new()));
        assert_eq!(split_failure(&p, &observed), None);
        let key = p.key(&p.replicas[0]).helper(1);
        assert!(ready_helper(observed.get("a"), &key).is_some());
        // An older generation's failure is not this split's.
        observed.insert(
            "h".to_owned(),
            node(
                "h",
                vec![instance(
                    "halo.m.r0.g1",
                    InstanceState::Failed,
                    InstanceKind::LlamaServer,
                )],
            ),
        );
        assert_eq!(split_failure(&p, &observed), None);
        observed.insert(
            "a".to_owned(),
            node(
                "a",
                vec![instance(
                    helper,
                    InstanceState::Failed,
                    InstanceKind::RpcServer,
                )],
            ),
        );
        assert_eq!(
            split_failure(&p, &observed).as_deref(),
            Some("ggml-rpc-server on a failed: exit 1")
        );
        assert!(ready_helper(observed.get("a"), &key).is_none());
        // A lost node comes first, naming every lost node of the split.
        assert_eq!(
            split_broken(&p, |n| n != "x", &observed).as_deref(),
            Some("node(s) a, h lost")
        );
        assert_eq!(
            split_broken(&p, |_| false, &observed).as_deref(),
            Some("ggml-rpc-server on a failed: exit 1")
        );
    }
}
