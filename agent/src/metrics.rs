//! The agent's `/metrics` (on `metrics_listen`), written at scrape time
//! from one memory reading and the instance table: the node's memory
//! (total, usable, reserve, what halo's instances use, free, PSI), each
//! instance's state, restarts, real memory beside the controller's
//! estimate, and llama-server's own counters. Those are read from each
//! ready llama-server's `/metrics` (with its API key, a short deadline,
//! all at once) and re-exported relabelled with placement, model and
//! node: only its counters (`…_total`) and its in-flight gauge, because
//! its other gauges (`prompt_tokens_seconds`, …) restart their window on
//! every read and a scrape here would skew anyone else's.

use crate::supervisor::Supervisor;
use proto::domain::{Instance, InstanceKind, InstanceState, MemoryReport, ReplicaKey};
use proto::metrics::{Kind, Text, parse};
use std::collections::BTreeMap;
use std::time::Duration;

/// Longest the agent waits for one llama-server's `/metrics`.
pub const INSTANCE_SCRAPE_DEADLINE: Duration = Duration::from_millis(800);

/// llama-server's in-flight gauge (a plain count, not a window).
const LLAMA_IN_FLIGHT: &str = "llamacpp:requests_processing";

/// An instance's identifying labels.
struct Labels {
    placement: String,
    model: String,
    instance: String,
}

impl Labels {
    fn of(i: &Instance) -> Labels {
        let placement = ReplicaKey::parse(&i.request_id)
            .map(|k| k.placement)
            .unwrap_or_default();
        let model = if i.options.alias.is_empty() {
            i.model_id.clone()
        } else {
            i.options.alias.clone()
        };
        Labels {
            placement,
            model,
            instance: i.id.clone(),
        }
    }

    fn with<'a>(&'a self, node: &'a str) -> [(&'a str, &'a str); 4] {
        [
            ("placement", &self.placement),
            ("model", &self.model),
            ("node", node),
            ("instance_id", &self.instance),
        ]
    }
}

/// Bytes an instance's process uses for real: resident memory plus the GPU
/// memory its DRM clients hold (VRAM and GTT), each counted once.
pub fn real_bytes(i: &Instance) -> Option<u64> {
    let m = i.memory.as_ref()?;
    let parts = [m.rss_bytes, m.gpu_vram_bytes, m.gpu_gtt_bytes];
    parts
        .iter()
        .any(Option::is_some)
        .then(|| parts.iter().flatten().sum())
}

/// The whole `/metrics` answer.
pub async fn render(supervisor: &Supervisor) -> String {
    let snapshot = supervisor.snapshot().await;
    let estimates = supervisor.estimates();
    let node = snapshot.node.name.clone();
    let reserve = supervisor.config().reserve_bytes;
    let llama = scrape_instances(supervisor, &snapshot.instances).await;
    let mut t = Text::new();
    write_node(
        &mut t,
        &node,
        &snapshot.memory,
        reserve,
        &snapshot.instances,
    );
    let n = "halo_agent_info";
    t.family(
        n,
        Kind::Gauge,
        "The agent's version and its llama.cpp build.",
    )
    .int(
        n,
        &[
            ("node", &node),
            ("version", &snapshot.node.agent_version),
            ("llama_version", &snapshot.node.llama_version),
        ],
        1,
    );
    write_instances(&mut t, &node, &snapshot.instances, &estimates);
    write_llama(&mut t, &node, &snapshot.instances, &llama);
    t.finish()
}

fn write_node(t: &mut Text, node: &str, m: &MemoryReport, reserve: u64, instances: &[Instance]) {
    let l = [("node", node)];
    let mut gauge = |name: &str, help: &str, v: Option<u64>| {
        t.family(name, Kind::Gauge, help);
        if let Some(v) = v {
            t.int(name, &l, v);
        }
    };
    gauge(
        "halo_node_memory_total_bytes",
        "MemTotal: system RAM the kernel manages.",
        m.mem_total_bytes,
    );
    gauge(
        "halo_node_memory_available_bytes",
        "MemAvailable: what the kernel could hand out now.",
        m.mem_available_bytes,
    );
    gauge(
        "halo_node_memory_usable_bytes",
        "Bytes models may use on this node (RAM and GTT one pool on an APU).",
        m.usable_bytes,
    );
    gauge(
        "halo_node_memory_reserve_bytes",
        "Bytes held back for the OS (the agent's reserve).",
        Some(reserve),
    );
    let halo: u64 = instances
        .iter()
        .filter(|i| !i.request_id.is_empty())
        .filter_map(real_bytes)
        .sum();
    gauge(
        "halo_node_memory_halo_bytes",
        "Bytes halo's instances use for real (resident plus GPU memory).",
        Some(halo),
    );
    gauge(
        "halo_node_memory_free_bytes",
        "usable - reserve - what halo's instances use: room for more models.",
        m.usable_bytes
            .map(|u| u.saturating_sub(reserve).saturating_sub(halo)),
    );
    let mut ratio = |name: &str, help: &str, v: Option<f64>| {
        t.family(name, Kind::Gauge, help);
        if let Some(v) = v {
            t.sample(name, &l, v / 100.0);
        }
    };
    ratio(
        "halo_node_memory_pressure_some_ratio",
        "PSI memory `some avg10`: share of the last 10 s some task stalled on memory.",
        m.psi_some_avg10,
    );
    ratio(
        "halo_node_memory_pressure_full_ratio",
        "PSI memory `full avg10`: share of the last 10 s every task stalled on memory.",
        m.psi_full_avg10,
    );
    let n = "halo_node_under_memory_pressure";
    t.family(
        n,
        Kind::Gauge,
        "1 while PSI or real free memory is past the agent's thresholds (nothing new is placed here).",
    );
    t.sample(n, &l, if m.pressure.is_some() { 1.0 } else { 0.0 });
}

fn write_instances(
    t: &mut Text,
    node: &str,
    instances: &[Instance],
    estimates: &std::collections::HashMap<String, u64>,
) {
    let labelled: Vec<(Labels, &Instance)> = instances.iter().map(|i| (Labels::of(i), i)).collect();
    let n = "halo_instance_state";
    t.family(
        n,
        Kind::Gauge,
        "1 for the state each instance is in (starting, loading, ready, unhealthy, stopping, stopped, failed).",
    );
    for (l, i) in &labelled {
        let [a, b, c, d] = l.with(node);
        t.int(n, &[a, b, c, d, ("state", i.state.as_str())], 1);
    }
    let n = "halo_instance_restarts_total";
    t.family(
        n,
        Kind::Counter,
        "Restarts after failures since the instance was created.",
    );
    for (l, i) in &labelled {
        t.int(n, &l.with(node), u64::from(i.restart_count));
    }
    let n = "halo_instance_context_size_tokens";
    t.family(
        n,
        Kind::Gauge,
        "The context each instance was started with (0: the model's own).",
    );
    for (l, i) in labelled
        .iter()
        .filter(|(_, i)| i.kind == InstanceKind::LlamaServer)
    {
        t.int(n, &l.with(node), u64::from(i.options.context_size));
    }
    let n = "halo_instance_resident_memory_bytes";
    t.family(n, Kind::Gauge, "VmRSS of the instance's process.");
    for (l, i) in &labelled {
        if let Some(v) = i.memory.as_ref().and_then(|m| m.rss_bytes) {
            t.int(n, &l.with(node), v);
        }
    }
    let n = "halo_instance_gpu_memory_bytes";
    t.family(
        n,
        Kind::Gauge,
        "GPU memory the instance's DRM clients hold, by kind (vram, gtt).",
    );
    for (l, i) in &labelled {
        let Some(m) = &i.memory else { continue };
        let [a, b, c, d] = l.with(node);
        for (kind, v) in [("vram", m.gpu_vram_bytes), ("gtt", m.gpu_gtt_bytes)] {
            if let Some(v) = v {
                t.int(n, &[a, b, c, d, ("kind", kind)], v);
            }
        }
    }
    let n = "halo_instance_memory_bytes";
    t.family(
        n,
        Kind::Gauge,
        "Real memory of the instance: resident plus GPU memory.",
    );
    for (l, i) in &labelled {
        if let Some(v) = real_bytes(i) {
            t.int(n, &l.with(node), v);
        }
    }
    let n = "halo_instance_estimate_bytes";
    t.family(
        n,
        Kind::Gauge,
        "The controller's memory estimate the instance was started with.",
    );
    for (l, i) in &labelled {
        if let Some(v) = estimates.get(&i.id) {
            t.int(n, &l.with(node), *v);
        }
    }
}

/// llama-server's `/metrics` of every ready llama-server, by instance id,
/// read concurrently.
async fn scrape_instances(
    supervisor: &Supervisor,
    instances: &[Instance],
) -> BTreeMap<String, String> {
    let mut set = tokio::task::JoinSet::new();
    for i in instances.iter().filter(|i| {
        i.state == InstanceState::Ready
            && i.kind == InstanceKind::LlamaServer
            && !i.api_key.is_empty()
            && i.port != 0
    }) {
        let s = supervisor.clone();
        let (id, port, key) = (i.id.clone(), i.port, i.api_key.clone());
        set.spawn(async move {
            let text = s
                .instance_metrics(port, &key, INSTANCE_SCRAPE_DEADLINE)
                .await;
            (id, text)
        });
    }
    let mut out = BTreeMap::new();
    while let Some(r) = set.join_next().await {
        if let Ok((id, Some(text))) = r {
            out.insert(id, text);
        }
    }
    out
}

/// `llamacpp:tokens_predicted_total` → `halo_llamacpp_tokens_predicted_total`.
fn halo_name(llama: &str) -> Option<String> {
    let rest = llama.strip_prefix("llamacpp:")?;
    rest.bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        .then(|| format!("halo_llamacpp_{rest}"))
}

fn write_llama(t: &mut Text, node: &str, instances: &[Instance], texts: &BTreeMap<String, String>) {
    // family name → (llama-server's name, samples)
    let mut families: BTreeMap<String, (String, Vec<(usize, f64)>)> = BTreeMap::new();
    let mut in_flight: Vec<(usize, f64)> = Vec::new();
    let labels: Vec<Labels> = instances.iter().map(Labels::of).collect();
    for (idx, i) in instances.iter().enumerate() {
        let Some(text) = texts.get(&i.id) else {
            continue;
        };
        for s in parse(text) {
            if s.name == LLAMA_IN_FLIGHT {
                in_flight.push((idx, s.value));
                continue;
            }
            if !s.name.ends_with("_total") {
                continue;
            }
            let Some(name) = halo_name(&s.name) else {
                continue;
            };
            families
                .entry(name)
                .or_insert_with(|| (s.name.clone(), Vec::new()))
                .1
                .push((idx, s.value));
        }
    }
    let n = "halo_instance_requests_in_flight";
    t.family(
        n,
        Kind::Gauge,
        "Requests llama-server is processing now (its llamacpp:requests_processing).",
    );
    for (idx, v) in in_flight {
        t.sample(n, &labels[idx].with(node), v);
    }
    for (name, (llama, samples)) in families {
        t.family(
            &name,
            Kind::Counter,
            &format!("llama-server's own {llama}, per instance."),
        );
        for (idx, v) in samples {
            t.sample(&name, &labels[idx].with(node), v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_llama_server_counters_are_renamed() {
        assert_eq!(
            halo_name("llamacpp:tokens_predicted_total").as_deref(),
            Some("halo_llamacpp_tokens_predicted_total")
        );
        assert_eq!(halo_name("other:x_total"), None);
        assert_eq!(halo_name("llamacpp:Bad-Name_total"), None);
    }
}
