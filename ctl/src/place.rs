//! `haloctl place ROLE MODEL`: asks the controller for a decision, prints it
//! with its per-node arithmetic, and (unless `--no-wait` or `--dry-run`)
//! waits until every replica is Ready, with a live progress line on stderr.
//! Exit 1 when refused, when an instance fails, or on `--timeout`.

use crate::Failure;
use crate::cli::PlaceArgs;
use crate::client::Target;
use crate::output::{Format, Table, bytes, print, print_json};
use proto::domain::{HelpersState, InstanceState};
use proto::v1;
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// `haloctl place -o json`: the decision.
#[derive(Debug, Serialize, PartialEq)]
pub struct DecisionJson {
    /// Whether the model was (or, in a dry run, would be) placed.
    pub accepted: bool,
    /// Nothing was recorded.
    pub dry_run: bool,
    /// Placement name, when accepted.
    pub name: Option<String>,
    /// Nodes of the replicas, when accepted.
    pub nodes: Vec<String>,
    /// The estimate of one replica at the chosen (or smallest tried) settings.
    pub estimate: Option<EstimateJson>,
    /// Per-node arithmetic.
    pub fits: Vec<FitJson>,
    /// Placements removed (or that would have to be).
    pub evicted: Vec<String>,
    /// The decision in words.
    pub explanation: Vec<String>,
    /// Per-node shares when the model is split across nodes (helpers
    /// first, the host last).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub split: Vec<ShareJson>,
    /// Hidden-state bytes crossing the network per token, for a split.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub split_traffic_bytes_per_token: Option<u64>,
}

/// One node's share of a split model, as the placement records it.
pub use proto::domain::SplitShare as ShareJson;

/// One replica's estimate.
#[derive(Debug, Serialize, PartialEq)]
pub struct EstimateJson {
    /// Context, tokens.
    pub ctx: u32,
    /// KV cache type K.
    pub cache_type_k: String,
    /// KV cache type V.
    pub cache_type_v: String,
    /// Weights.
    pub weights_bytes: u64,
    /// KV cache.
    pub kv_bytes: u64,
    /// Compute buffers.
    pub compute_bytes: u64,
    /// Output buffer.
    pub output_bytes: u64,
    /// Sum.
    pub total_bytes: u64,
}

/// One node's arithmetic: free = usable − reserve − used; fits when
/// needed (estimate + margin) ≤ free. Its JSON field names are the domain
/// type's.
pub use proto::domain::NodeFit as FitJson;

/// The JSON view of a decision.
pub fn decision_json(r: &v1::PlaceResponse) -> DecisionJson {
    DecisionJson {
        accepted: r.accepted,
        dry_run: r.dry_run,
        name: r.placement.as_ref().map(|p| p.name.clone()),
        nodes: r
            .placement
            .as_ref()
            .map(|p| p.replicas.iter().map(|x| x.node.clone()).collect())
            .unwrap_or_default(),
        estimate: r.estimate.as_ref().map(|e| EstimateJson {
            ctx: e.context_size,
            cache_type_k: e.cache_type_k.clone(),
            cache_type_v: e.cache_type_v.clone(),
            weights_bytes: e.weights_bytes,
            kv_bytes: e.kv_bytes,
            compute_bytes: e.compute_bytes,
            output_bytes: e.output_bytes,
            total_bytes: e.total_bytes,
        }),
        fits: r.fits.iter().cloned().map(FitJson::from).collect(),
        evicted: r.evicted.clone(),
        explanation: r.explanation.clone(),
        split: r
            .placement
            .as_ref()
            .and_then(|p| p.split.as_ref())
            .map(|s| {
                s.shares
                    .iter()
                    .map(|x| ShareJson::from(x.clone()))
                    .collect()
            })
            .unwrap_or_default(),
        split_traffic_bytes_per_token: r
            .placement
            .as_ref()
            .and_then(|p| p.split.as_ref())
            .map(|s| s.traffic_bytes_per_token),
    }
}

/// The decision for people: verdict, estimate, per-node table, reasons.
pub fn render_decision(model: &str, d: &DecisionJson) -> String {
    let mut s = String::new();
    let on = if d.split.is_empty() {
        d.nodes.join(", ")
    } else {
        let host = d
            .split
            .iter()
            .find(|s| s.host)
            .map_or("", |s| s.node.as_str());
        format!(
            "{} split with llama.cpp RPC (host {host})",
            d.split
                .iter()
                .map(|s| s.node.as_str())
                .collect::<Vec<_>>()
                .join(" + ")
        )
    };
    let verdict = match (d.accepted, d.dry_run) {
        (true, true) => format!("dry run: {model} would be placed on {on}"),
        (true, false) => format!(
            "placed {} ({model}) on {on}",
            d.name.as_deref().unwrap_or(model),
        ),
        (false, _) => format!("refused: {model} cannot be placed"),
    };
    s.push_str(&verdict);
    s.push('\n');
    if let Some(e) = &d.estimate {
        s.push_str(&format!(
            "estimate at {} tokens, KV {}/{}: weights {} + KV {} + compute {} + output {} = {}\n",
            e.ctx,
            e.cache_type_k,
            e.cache_type_v,
            bytes(e.weights_bytes),
            bytes(e.kv_bytes),
            bytes(e.compute_bytes),
            bytes(e.output_bytes),
            bytes(e.total_bytes)
        ));
    }
    if !d.fits.is_empty() {
        s.push_str(
            "\nfree = usable - reserve - used; fits when needed (estimate + margin) <= free\n",
        );
        let mut t = Table::new([
            "NODE", "USABLE", "RESERVE", "USED", "FREE", "NEEDED", "CONTEXT", "FITS", "WHY",
        ]);
        for f in &d.fits {
            // A node that could not take the model at all (role, status,
            // file) has no arithmetic: dashes, and the reason.
            let n = |b: u64| {
                if f.candidate || b > 0 {
                    bytes(b)
                } else {
                    "-".into()
                }
            };
            t.row([
                f.node.clone(),
                n(f.usable_bytes),
                n(f.reserve_bytes),
                n(f.used_bytes),
                n(f.free_bytes),
                n(f.needed_bytes),
                if f.context_size > 0 {
                    f.context_size.to_string()
                } else {
                    "-".into()
                },
                if f.fits { "yes" } else { "no" }.into(),
                f.reason.clone(),
            ]);
        }
        s.push_str(&t.render());
    }
    if !d.evicted.is_empty() {
        s.push_str(&format!(
            "{}: {}\n",
            match (d.accepted, d.dry_run) {
                (true, false) => "evicted",
                (true, true) => "would evict",
                (false, _) => "would have to evict",
            },
            d.evicted.join(", ")
        ));
    }
    if !d.explanation.is_empty() {
        s.push('\n');
        for l in &d.explanation {
            s.push_str(l);
            s.push('\n');
        }
    }
    s
}

/// Runs `haloctl place`.
pub fn run(t: &Target, a: &PlaceArgs) -> Result<(), Failure> {
    let req = v1::PlaceRequest {
        role: a.role.clone(),
        model: a.model.clone(),
        context_size: a.ctx,
        node: a.node.clone().unwrap_or_default(),
        replicas: a.replicas,
        evict: a.evict,
        dry_run: a.dry_run,
        name: a.name.clone().unwrap_or_default(),
        split: a.split || a.split_across.is_some(),
        split_across: a.split_across.unwrap_or(0),
        allow_context_over_trained: a.allow_context_over_trained,
        copy: a.copy,
        ..Default::default()
    };
    let rt = crate::client::runtime()?;
    rt.block_on(async {
        let mut c = t.connect().await?;
        let resp = c.place(req).await.map_err(|s| t.status(s))?.into_inner();
        let d = decision_json(&resp);
        match a.output {
            Format::Json => print_json(&d)?,
            Format::Table => print(&render_decision(&a.model, &d)),
        }
        if !d.accepted {
            return Err(Failure::Refused(String::new()));
        }
        if a.dry_run || a.no_wait {
            return Ok(());
        }
        let Some(name) = d.name else {
            return Err(Failure::Other(anyhow::anyhow!(
                "the controller accepted the placement but named none"
            )));
        };
        wait_ready(t, &mut c, &name, Duration::from_secs(a.timeout), a.output).await
    })
}

/// Polls the placement until every replica is Ready; a progress line on
/// stderr (rewritten in place on a terminal, one line per change otherwise).
async fn wait_ready(
    t: &Target,
    c: &mut crate::client::Client,
    name: &str,
    timeout: Duration,
    format: Format,
) -> Result<(), Failure> {
    let start = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let placements = c
            .list_placements(v1::ListPlacementsRequest {})
            .await
            .map_err(|s| t.status(s))?
            .into_inner()
            .placements;
        let Some(p) = placements.into_iter().find(|p| p.name == name) else {
            finish_line(tty);
            return Err(Failure::Refused(format!(
                "placement `{name}` is gone (unplaced or evicted) while waiting"
            )));
        };
        let helpers = p
            .split
            .as_ref()
            .map_or(0, |s| s.shares.len().saturating_sub(1));
        let states: Vec<(String, String, &v1::Replica)> = p
            .replicas
            .iter()
            .map(|r| {
                let sides: Vec<Option<InstanceState>> = r
                    .helpers
                    .iter()
                    .map(|i| InstanceState::from_wire(i.state))
                    .collect();
                let s = match HelpersState::of(helpers, &sides) {
                    HelpersState::Failed => InstanceState::Failed.as_str().to_owned(),
                    HelpersState::Starting => "starting helpers".to_owned(),
                    HelpersState::Ready => crate::cluster::replica_state_text(r),
                };
                (r.node.clone(), s, r)
            })
            .collect();
        let elapsed = start.elapsed().as_secs_f64();
        let summary = states
            .iter()
            .map(|(n, s, _)| format!("{n} {s}"))
            .collect::<Vec<_>>()
            .join(", ");
        if tty {
            eprint!("\r\x1b[2K  {name}: {summary} · {elapsed:.1}s");
            let _ = std::io::stderr().flush();
        } else if summary != last {
            eprintln!("  {name}: {summary} · {elapsed:.1}s");
        }
        last = summary;
        if let Some((n, _, r)) = states.iter().find(|(_, s, _)| *s == "failed") {
            finish_line(tty);
            let why = r
                .helpers
                .iter()
                .chain(r.instance.as_ref())
                .find(|i| InstanceState::from_wire(i.state) == Some(InstanceState::Failed))
                .map_or_else(|| r.start_refused.clone(), |i| i.last_error.clone());
            return Err(Failure::Refused(format!(
                "`{name}` failed on {n}: {why}\nhint: `haloctl status` and the agent's log on {n}"
            )));
        }
        if !states.is_empty() && states.iter().all(|(_, s, _)| *s == "ready") {
            finish_line(tty);
            if format == Format::Table {
                let urls: Vec<String> = states
                    .iter()
                    .filter_map(|(_, _, r)| r.instance.as_ref().map(|i| i.endpoint.clone()))
                    .collect();
                print(&format!(
                    "ready: {name} after {elapsed:.1}s at {}\n(`haloctl endpoints` shows the editor settings: gateway URL and model names)\n",
                    urls.join(", ")
                ));
            }
            return Ok(());
        }
        if start.elapsed() >= timeout {
            finish_line(tty);
            return Err(Failure::Refused(format!(
                "`{name}` not ready after {}s ({last}); it stays placed: `haloctl status` to watch, \
                 `haloctl unplace {name}` to give up",
                timeout.as_secs()
            )));
        }
    }
}

fn finish_line(tty: bool) {
    if tty {
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn place_json_names_each_fit_field_as_scripts_read_it() {
        let r = v1::PlaceResponse {
            fits: vec![v1::NodeFit {
                node: "halo1".into(),
                candidate: true,
                fits: true,
                usable_bytes: 120,
                reserve_bytes: 4,
                used_bytes: 14,
                free_bytes: 102,
                needed_bytes: 38,
                margin_bytes: 1,
                context_size: 4096,
                cache_type: "q8_0".into(),
                reason: "fits".into(),
                replicas: 1,
            }],
            ..Default::default()
        };
        let d = decision_json(&r);
        let json = serde_json::to_string(&d.fits).expect("JSON");
        assert_eq!(
            json,
            r#"[{"node":"halo1","candidate":true,"fits":true,"usable_bytes":120,"reserve_bytes":4,"used_bytes":14,"free_bytes":102,"needed_bytes":38,"ctx":4096,"reason":"fits"}]"#
        );
    }
}
