//! `haloctl top`: the cluster at a glance, redrawn every second. Per node
//! a memory bar (what halo's instances really use, the reserve, what
//! everything else uses, what is free) from the controller's `ListNodes`;
//! per instance its state, context and real memory from the same answer,
//! and from the agent's `/metrics` (its `metrics_url`, read with haloctl's
//! own certificate when it is https) the controller's estimate, requests
//! in flight and generation speed (llama-server's predicted tokens over
//! the seconds it spent predicting them). `q` quits; `--once` prints one
//! frame and exits, for scripts.

use crate::Failure;
use crate::cli::TopArgs;
use crate::client::{Client, Target};
use crate::cluster::{instance_state, node_status};
use crate::output::{Table, bytes, print};
use proto::domain::ReplicaKey;
use proto::v1;
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// How often the live view is redrawn.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Longest one agent's `/metrics` may take.
const METRICS_DEADLINE: Duration = Duration::from_secs(2);

/// Cells in a memory bar.
const BAR: u64 = 30;

/// One node's line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopNode {
    /// Node name.
    pub name: String,
    /// Liveness as the controller hears it.
    pub status: String,
    /// Bytes models may use.
    pub usable_bytes: Option<u64>,
    /// What halo's instances really use (resident plus GPU memory).
    pub halo_bytes: u64,
    /// Held back for the OS.
    pub reserve_bytes: u64,
    /// Used by everything else (MemTotal − MemAvailable − halo).
    pub other_bytes: Option<u64>,
    /// usable − reserve − halo − other.
    pub free_bytes: Option<u64>,
    /// Why the agent's metrics are missing (empty when read).
    pub metrics_error: String,
}

/// One instance's line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopInstance {
    /// Placement name (empty for an instance halo did not start).
    pub placement: String,
    /// Catalog model name.
    pub model: String,
    /// Node.
    pub node: String,
    /// Instance state.
    pub state: String,
    /// Context it was started with (0: the model's own).
    pub context: u32,
    /// Real memory: resident plus GPU memory.
    pub real_bytes: Option<u64>,
    /// The controller's estimate it was started with.
    pub estimate_bytes: Option<u64>,
    /// Requests llama-server is processing now.
    pub in_flight: Option<u64>,
    /// Generation speed: predicted tokens / seconds spent predicting.
    pub tokens_per_second: Option<f64>,
    /// Tokens predicted so far.
    pub tokens_predicted: Option<u64>,
}

/// One frame.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Frame {
    /// Nodes, in the controller's order.
    pub nodes: Vec<TopNode>,
    /// Instances, by node then placement.
    pub instances: Vec<TopInstance>,
}

/// What an agent's `/metrics` says about one instance.
#[derive(Debug, Default, Clone, Copy)]
struct Live {
    estimate: Option<u64>,
    in_flight: Option<u64>,
    predicted: Option<f64>,
    predicted_seconds: Option<f64>,
}

/// Per instance id, from one agent's `/metrics` text.
fn live_by_instance(text: &str) -> HashMap<String, Live> {
    let mut out: HashMap<String, Live> = HashMap::new();
    for s in proto::metrics::parse(text) {
        let Some(id) = s
            .labels
            .iter()
            .find(|(k, _)| k == "instance_id")
            .map(|(_, v)| v.clone())
        else {
            continue;
        };
        let l = out.entry(id).or_default();
        match s.name.as_str() {
            "halo_instance_estimate_bytes" => l.estimate = Some(s.value as u64),
            "halo_instance_requests_in_flight" => l.in_flight = Some(s.value as u64),
            "halo_llamacpp_tokens_predicted_total" => l.predicted = Some(s.value),
            "halo_llamacpp_tokens_predicted_seconds_total" => l.predicted_seconds = Some(s.value),
            _ => {}
        }
    }
    out
}

/// Real memory of an instance: resident plus GPU memory.
fn real(m: Option<&v1::ProcessMemory>) -> Option<u64> {
    let m = m?;
    let parts = [m.rss_bytes, m.gpu_vram_bytes, m.gpu_gtt_bytes];
    parts
        .iter()
        .any(Option::is_some)
        .then(|| parts.iter().flatten().sum())
}

/// The frame from `ListNodes` and the agents' metrics texts (by node
/// name: the text, or why there is none).
pub fn frame(nodes: &[v1::NodeView], metrics: &HashMap<String, Result<String, String>>) -> Frame {
    let mut f = Frame::default();
    for n in nodes {
        let id = n.node.clone().unwrap_or_default();
        let live = match metrics.get(&id.name) {
            Some(Ok(text)) => live_by_instance(text),
            _ => HashMap::new(),
        };
        let mut halo = 0;
        let mut rows = Vec::new();
        for i in &n.instances {
            let r = real(i.memory.as_ref());
            let managed = !i.request_id.is_empty();
            if managed {
                halo += r.unwrap_or(0);
            }
            let options = i.options.clone().unwrap_or_default();
            let l = live.get(&i.id).copied().unwrap_or_default();
            rows.push(TopInstance {
                placement: ReplicaKey::parse(&i.request_id)
                    .map(|k| k.placement)
                    .unwrap_or_default(),
                model: if options.alias.is_empty() {
                    i.model_id.clone()
                } else {
                    options.alias
                },
                node: id.name.clone(),
                state: instance_state(i.state).into(),
                context: options.context_size,
                real_bytes: r,
                estimate_bytes: l.estimate,
                in_flight: l.in_flight,
                tokens_per_second: match (l.predicted, l.predicted_seconds) {
                    (Some(t), Some(s)) if s > 0.0 => Some(t / s),
                    _ => None,
                },
                tokens_predicted: l.predicted.map(|t| t as u64),
            });
        }
        rows.sort_by(|a, b| a.placement.cmp(&b.placement));
        f.instances.extend(rows);
        let m = n.memory.as_ref();
        let usable = m.and_then(|m| m.usable_bytes);
        let other = m.and_then(|m| {
            let used = m.mem_total_bytes?.saturating_sub(m.mem_available_bytes?);
            Some(used.saturating_sub(halo))
        });
        f.nodes.push(TopNode {
            name: id.name.clone(),
            status: node_status(n.status).into(),
            usable_bytes: usable,
            halo_bytes: halo,
            reserve_bytes: n.reserve_bytes,
            other_bytes: other,
            free_bytes: usable.map(|u| {
                u.saturating_sub(n.reserve_bytes)
                    .saturating_sub(halo)
                    .saturating_sub(other.unwrap_or(0))
            }),
            metrics_error: match metrics.get(&id.name) {
                Some(Err(e)) => e.clone(),
                Some(Ok(_)) => String::new(),
                None => "the agent serves no metrics (metrics_listen)".into(),
            },
        });
    }
    f
}

/// `[###==oo.....]`: halo, reserve, other, free, in shares of `usable`.
pub fn bar(usable: u64, halo: u64, reserve: u64, other: u64) -> String {
    if usable == 0 {
        return String::new();
    }
    let cells = |b: u64| (b.min(usable).saturating_mul(BAR) + usable / 2) / usable;
    let h = cells(halo);
    let r = cells(reserve).min(BAR - h);
    let o = cells(other).min(BAR - h - r);
    format!(
        "[{}{}{}{}]",
        "#".repeat(h as usize),
        "=".repeat(r as usize),
        "o".repeat(o as usize),
        ".".repeat((BAR - h - r - o) as usize)
    )
}

fn dash<T>(v: Option<T>, f: impl FnOnce(T) -> String) -> String {
    v.map_or_else(|| "-".into(), f)
}

/// The frame as text.
pub fn render(f: &Frame) -> String {
    let mut t = Table::new([
        "NODE", "STATUS", "USABLE", "HALO", "RESERVE", "OTHER", "FREE", "MEMORY",
    ]);
    for n in &f.nodes {
        t.row([
            n.name.clone(),
            n.status.clone(),
            dash(n.usable_bytes, bytes),
            bytes(n.halo_bytes),
            bytes(n.reserve_bytes),
            dash(n.other_bytes, bytes),
            dash(n.free_bytes, bytes),
            n.usable_bytes
                .map(|u| bar(u, n.halo_bytes, n.reserve_bytes, n.other_bytes.unwrap_or(0)))
                .unwrap_or_default(),
        ]);
    }
    let mut s = t.render();
    s.push_str("MEMORY: # halo, = reserve, o other, . free\n");
    for n in f.nodes.iter().filter(|n| !n.metrics_error.is_empty()) {
        s.push_str(&format!("{}: no metrics: {}\n", n.name, n.metrics_error));
    }
    s.push('\n');
    let mut t = Table::new([
        "PLACEMENT",
        "MODEL",
        "NODE",
        "STATE",
        "CONTEXT",
        "REAL",
        "ESTIMATE",
        "IN-FLIGHT",
        "TOK/S",
        "TOKENS",
    ]);
    for i in &f.instances {
        t.row([
            if i.placement.is_empty() {
                "-".into()
            } else {
                i.placement.clone()
            },
            i.model.clone(),
            i.node.clone(),
            i.state.clone(),
            if i.context == 0 {
                "model".into()
            } else {
                i.context.to_string()
            },
            dash(i.real_bytes, bytes),
            dash(i.estimate_bytes, bytes),
            dash(i.in_flight, |v| v.to_string()),
            dash(i.tokens_per_second, |v| format!("{v:.1}")),
            dash(i.tokens_predicted, |v| v.to_string()),
        ]);
    }
    if f.instances.is_empty() {
        s.push_str("no instances\n");
    } else {
        s.push_str(&t.render());
    }
    s
}

/// One frame read now: `ListNodes`, then every agent's `/metrics` at once.
async fn gather(t: &Target, c: &mut Client) -> Result<Frame, Failure> {
    let nodes = c
        .list_nodes(v1::ListNodesRequest {})
        .await
        .map_err(|s| t.status(s))?
        .into_inner()
        .nodes;
    let mut set = tokio::task::JoinSet::new();
    for n in &nodes {
        let id = n.node.clone().unwrap_or_default();
        if id.metrics_url.is_empty() {
            continue;
        }
        let material = t.material.clone();
        set.spawn(async move {
            let text =
                proto::metrics::fetch(&id.metrics_url, material.as_ref(), METRICS_DEADLINE).await;
            (id.name, text)
        });
    }
    let mut metrics = HashMap::new();
    while let Some(r) = set.join_next().await {
        if let Ok((name, text)) = r {
            metrics.insert(name, text);
        }
    }
    Ok(frame(&nodes, &metrics))
}

/// `haloctl top`.
pub fn run(t: &Target, a: &TopArgs) -> Result<(), Failure> {
    let rt = crate::client::runtime()?;
    rt.block_on(async {
        let mut c = t.connect().await?;
        if a.once {
            let f = gather(t, &mut c).await?;
            print(&render(&f));
            return Ok(());
        }
        live(t, &mut c).await
    })
}

/// The live view until `q`, end of input or Ctrl-C: the alternate screen,
/// keys read one at a time without echo, restored on the way out.
async fn live(t: &Target, c: &mut Client) -> Result<(), Failure> {
    let _term = RawTerminal::enter();
    let (tx, mut keys) = tokio::sync::mpsc::channel::<Option<u8>>(16);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = std::io::stdin();
        let mut b = [0u8; 1];
        loop {
            let key = match stdin.read(&mut b) {
                Ok(1) => Some(b[0]),
                _ => None,
            };
            let end = key.is_none();
            if tx.blocking_send(key).is_err() || end {
                return;
            }
        }
    });
    loop {
        let body = match gather(t, c).await {
            Ok(f) => render(&f),
            Err(e) => format!("{e}\n"),
        };
        let now = proto::units::now_unix();
        let header = format!(
            "halo top - {} - {} - every {}s, q quits\n\n",
            clock(now),
            t.url,
            REFRESH.as_secs()
        );
        print(&format!("\x1b[H\x1b[2J{header}{body}"));
        tokio::select! {
            k = keys.recv() => match k {
                Some(Some(b'q' | b'Q')) | Some(None) | None => return Ok(()),
                _ => {}
            },
            _ = tokio::signal::ctrl_c() => return Ok(()),
            () = tokio::time::sleep(REFRESH) => {}
        }
    }
}

/// `HH:MM:SS` UTC.
fn clock(unix: i64) -> String {
    let s = unix.rem_euclid(86_400);
    format!("{:02}:{:02}:{:02} UTC", s / 3600, s / 60 % 60, s % 60)
}

/// The terminal in the alternate screen with line editing and echo off
/// (so `q` needs no Enter), put back on drop.
struct RawTerminal {
    saved: Option<rustix::termios::Termios>,
}

impl RawTerminal {
    fn enter() -> RawTerminal {
        use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
        let stdin = std::io::stdin();
        let saved = tcgetattr(&stdin).ok();
        if let Some(old) = &saved {
            let mut raw = old.clone();
            raw.local_modes -= LocalModes::ICANON | LocalModes::ECHO;
            let _ = tcsetattr(&stdin, OptionalActions::Now, &raw);
        }
        print("\x1b[?1049h\x1b[?25l");
        RawTerminal { saved }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        print("\x1b[?25h\x1b[?1049l");
        if let Some(old) = &self.saved {
            let _ = rustix::termios::tcsetattr(
                std::io::stdin(),
                rustix::termios::OptionalActions::Now,
                old,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_shows_halo_reserve_other_and_free_in_shares_of_usable() {
        assert_eq!(
            bar(300, 30, 30, 60),
            format!("[###===oooooo{}]", ".".repeat(18))
        );
        assert_eq!(bar(0, 1, 1, 1), "");
        assert_eq!(bar(10, 20, 5, 5), format!("[{}]", "#".repeat(30)));
    }

    #[test]
    fn instances_take_speed_and_in_flight_from_their_agents_metrics() {
        let node = v1::NodeView {
            node: Some(v1::NodeIdentity {
                name: "halo1".into(),
                metrics_url: "http://127.0.0.1:1/metrics".into(),
                ..Default::default()
            }),
            status: v1::NodeStatus::Ready as i32,
            memory: Some(v1::MemoryReport {
                mem_total_bytes: Some(1000),
                mem_available_bytes: Some(700),
                usable_bytes: Some(900),
                ..Default::default()
            }),
            reserve_bytes: 100,
            instances: vec![v1::Instance {
                id: "i-1".into(),
                request_id: "halo.tiny.r0.g1".into(),
                state: v1::InstanceState::Ready as i32,
                options: Some(v1::InstanceOptions {
                    context_size: 512,
                    alias: "tiny".into(),
                    ..Default::default()
                }),
                memory: Some(v1::ProcessMemory {
                    rss_bytes: Some(200),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = "halo_instance_estimate_bytes{placement=\"tiny\",instance_id=\"i-1\"} 250\n\
                    halo_instance_requests_in_flight{instance_id=\"i-1\"} 1\n\
                    halo_llamacpp_tokens_predicted_total{instance_id=\"i-1\"} 100\n\
                    halo_llamacpp_tokens_predicted_seconds_total{instance_id=\"i-1\"} 4\n";
        let metrics = HashMap::from([("halo1".to_owned(), Ok(text.to_owned()))]);
        let f = frame(&[node], &metrics);
        assert_eq!(f.nodes[0].halo_bytes, 200);
        assert_eq!(f.nodes[0].other_bytes, Some(100));
        assert_eq!(f.nodes[0].free_bytes, Some(500));
        let i = &f.instances[0];
        assert_eq!((i.placement.as_str(), i.model.as_str()), ("tiny", "tiny"));
        assert_eq!(i.estimate_bytes, Some(250));
        assert_eq!(i.in_flight, Some(1));
        assert_eq!(i.tokens_per_second, Some(25.0));
        let s = render(&f);
        assert!(s.contains("25.0"), "{s}");
    }
}
