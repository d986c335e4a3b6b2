//! The controller's `/metrics` (on `metrics_listen`). Events are counted
//! where they happen, in [`crate::counters`]: placement decisions by
//! outcome and reason, reconcile pass durations, replicas moved off lost
//! nodes, store operation latency. What is a state rather than an
//! event (placements by state, node liveness, leadership) is read at
//! scrape time from the store and the observed nodes, with the same
//! words `Routes` and `haloctl status` use.

use crate::desired::Desired;
use crate::observe::{Observed, instances_by_request};
use proto::domain::{NodeStatus, Placement};
use proto::metrics::{Kind, Text};
use std::collections::{BTreeMap, HashSet};
use tokio::time::Instant;

/// The whole `/metrics` answer: counted events, then the state read now.
pub async fn render(desired: &Desired, observed: &Observed) -> String {
    let mut t = Text::new();
    let leadership = desired.leadership();
    let term = leadership.term();
    let n = "halo_controller_leader";
    t.family(
        n,
        Kind::Gauge,
        "1 while this controller leads (reconciles and writes), else 0.",
    )
    .int(n, &[("id", leadership.id())], u64::from(term.is_some()));
    let n = "halo_controller_term";
    t.family(
        n,
        Kind::Gauge,
        "The leader term (store revision of the leader key) this controller holds.",
    );
    if let Some(term) = term {
        t.int(n, &[("id", leadership.id())], term);
    }
    write_nodes(&mut t, observed);
    write_placements(&mut t, desired, observed).await;
    crate::counters::global().write_counted(&mut t);
    t.finish()
}

fn write_nodes(t: &mut Text, observed: &Observed) {
    let now = Instant::now();
    let timing = observed.timing();
    let nodes = observed.read().clone();
    let n = "halo_node_status";
    t.family(
        n,
        Kind::Gauge,
        "1 for the liveness each node is in (ready, unreachable, lost, unknown), as this controller hears its agent.",
    );
    for (name, o) in &nodes {
        let status = NodeStatus::from(o.liveness(now, &timing));
        t.int(n, &[("node", name), ("status", status.as_str())], 1);
    }
    let n = "halo_node_up";
    t.family(
        n,
        Kind::Gauge,
        "1 when the node's agent stream is live (ready), else 0.",
    );
    for (name, o) in &nodes {
        let up = NodeStatus::from(o.liveness(now, &timing)) == NodeStatus::Ready;
        t.int(n, &[("node", name)], u64::from(up));
    }
    let n = "halo_node_silent_seconds";
    t.family(
        n,
        Kind::Gauge,
        "Time since the node's agent was last heard from.",
    );
    for (name, o) in &nodes {
        t.sample(n, &[("node", name)], o.silent_for(now).as_secs_f64());
    }
}

async fn write_placements(t: &mut Text, desired: &Desired, observed: &Observed) {
    let n = "halo_placement_state";
    t.family(
        n,
        Kind::Gauge,
        "1 for the state each placement is in (its most advanced replica's: ready, loading, starting, moving, pending, unreachable, failed, paused, …).",
    );
    let (placements, catalog) = match tokio::try_join!(desired.placements(), desired.catalog()) {
        Ok(((p, _), c)) => (
            p.into_iter().map(|v| v.value).collect::<Vec<Placement>>(),
            c,
        ),
        Err(e) => {
            tracing::debug!("metrics: store not read: {e}");
            return;
        }
    };
    let by_request = instances_by_request(observed);
    let refused: HashSet<String> = placements
        .iter()
        .flat_map(|p| p.replicas.iter().map(|r| p.key(r).request_id()))
        .filter(|rid| observed.start_refused(rid).is_some())
        .collect();
    let nodes = observed.read().clone();
    let routes = crate::routes::build(&crate::routes::Snapshot {
        placements: &placements,
        catalog: &catalog,
        nodes: &nodes,
        by_request: &by_request,
        refused: &refused,
        keys: &[],
        timing: observed.timing(),
        now: Instant::now(),
        now_unix_ms: proto::units::now_unix_ms(),
    });
    let mut by_state: BTreeMap<String, u64> = BTreeMap::new();
    for r in routes.routes.iter().filter(|r| !r.placement.is_empty()) {
        t.int(
            n,
            &[
                ("placement", &r.placement),
                ("model", &r.model),
                ("state", &r.state),
            ],
            1,
        );
        *by_state.entry(r.state.clone()).or_default() += 1;
    }
    let n = "halo_placements";
    t.family(n, Kind::Gauge, "Placements by state.");
    for (state, v) in &by_state {
        t.int(n, &[("state", state)], *v);
    }
    let n = "halo_placement_replicas";
    t.family(n, Kind::Gauge, "Replicas each placement asks for, by node.");
    for p in &placements {
        let mut per_node: BTreeMap<&str, u64> = BTreeMap::new();
        for r in &p.replicas {
            *per_node.entry(r.node.as_str()).or_default() += 1;
        }
        for (node, v) in per_node {
            t.int(
                n,
                &[("placement", &p.name), ("model", &p.model), ("node", node)],
                v,
            );
        }
    }
}
