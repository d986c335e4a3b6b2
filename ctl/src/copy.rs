//! `haloctl models copy NAME --to NODE [--from NODE]`: asks the controller
//! to have NODE's agent pull a catalog model's file(s) from a node that
//! holds them, and shows bytes, rate and time left while it waits (one
//! rewritten line on a terminal, a line every few seconds otherwise).
//! Leaving (Ctrl-C) leaves the copy running on the agents.
//! `haloctl models copy --all-roles`: the same, one copy at a time, for
//! every catalog model and every live node of its role that lacks it, then
//! a summary.

use crate::Failure;
use crate::cli::CopyArgs;
use crate::client::Target;
use crate::output::{Format, Table, print, print_json};
use proto::domain::{CopyProgress, CopyState};
use proto::v1;
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// How often a line is printed when stderr is not a terminal.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// The result line for people.
pub fn render_result(p: &CopyProgress) -> String {
    match p.state {
        CopyState::AlreadyPresent => format!(
            "{}: an identical file is already on {} ({}); nothing was copied\n",
            p.model_id,
            p.to_node,
            proto::units::bytes(p.bytes_total)
        ),
        _ => {
            let secs = p.elapsed_ms as f64 / 1000.0;
            let rate = p.rate_bytes_per_sec().map_or_else(
                || "-".to_owned(),
                |r| format!("{}/s", proto::units::bytes(r as u64)),
            );
            let resumed = if p.resumed_from_bytes > 0 {
                format!("; resumed at {}", proto::units::bytes(p.resumed_from_bytes))
            } else {
                String::new()
            };
            format!(
                "{}: copied {} from {} to {} in {secs:.1} s ({rate}{resumed}), sha256 {}\n",
                p.model_id,
                proto::units::bytes(p.bytes_total),
                p.from_node,
                p.to_node,
                p.sha256.join(",")
            )
        }
    }
}

/// Runs the copy (or, with `--all-roles`, every copy the catalog's roles
/// call for) and waits for its end.
pub fn run(t: &Target, a: &CopyArgs) -> Result<(), Failure> {
    if a.all_roles {
        return all_roles(t, a.output);
    }
    let (Some(name), Some(to)) = (&a.name, &a.to) else {
        return Err(Failure::Usage(
            "name a model and --to NODE, or use --all-roles".into(),
        ));
    };
    let rt = crate::client::runtime()?;
    let last = rt.block_on(async {
        let mut c = t.connect().await?;
        follow(&mut c, name, to, a.from.as_deref(), a.output)
            .await
            .map_err(|s| t.status(s))
    })?;
    let Some(p) = last else {
        return Err(Failure::Other(anyhow::anyhow!(
            "the controller ended the copy's stream without a result"
        )));
    };
    match a.output {
        Format::Json => print_json(&serde_json::json!({
            "model_id": p.model_id,
            "from_node": p.from_node,
            "to_node": p.to_node,
            "state": p.state.name(),
            "bytes_total": p.bytes_total,
            "resumed_from_bytes": p.resumed_from_bytes,
            "elapsed_ms": p.elapsed_ms,
            "bytes_per_sec": p.rate_bytes_per_sec(),
            "sha256": p.sha256,
            "message": p.message,
        }))?,
        Format::Table if p.state != CopyState::Failed => print(&render_result(&p)),
        Format::Table => {}
    }
    match p.state {
        CopyState::Failed => Err(Failure::Refused(format!(
            "copy of {} to {} failed: {}",
            p.model_id, p.to_node, p.message
        ))),
        CopyState::Copying => Err(Failure::Other(anyhow::anyhow!(
            "the copy's stream ended before the copy did; it may still be running on {}",
            p.to_node
        ))),
        CopyState::Done | CopyState::AlreadyPresent => Ok(()),
    }
}

/// Asks for the copy of `name` to `to` and follows it to its end, showing
/// its progress on stderr for people (one rewritten line on a terminal, a
/// line every few seconds otherwise); the last report.
async fn follow(
    c: &mut crate::client::Client,
    name: &str,
    to: &str,
    from: Option<&str>,
    output: Format,
) -> Result<Option<CopyProgress>, tonic::Status> {
    let mut stream = c
        .copy_model(v1::CopyModelRequest {
            model: name.to_owned(),
            to_node: to.to_owned(),
            from_node: from.unwrap_or_default().to_owned(),
        })
        .await?
        .into_inner();
    let tty = std::io::stderr().is_terminal();
    let mut shown: Option<Instant> = None;
    let mut last = None;
    while let Some(p) = stream.message().await? {
        let p = CopyProgress::try_from(p)
            .map_err(|e| tonic::Status::internal(format!("a bad progress report: {e}")))?;
        // The first report comes before the size is known.
        if p.state == CopyState::Copying && p.bytes_total > 0 && output == Format::Table {
            if tty {
                let mut err = std::io::stderr();
                let _ = write!(err, "\r\x1b[2K{}", p.line());
                let _ = err.flush();
            } else if shown.is_none_or(|at| at.elapsed() >= LINE_EVERY) {
                eprintln!("{}", p.line());
                shown = Some(Instant::now());
            }
        }
        let end = p.state.is_final();
        last = Some(p);
        if end {
            break;
        }
    }
    if tty && output == Format::Table && shown.is_some() {
        eprintln!();
    }
    Ok(last)
}

/// What became of one copy `--all-roles` called for.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    /// Catalog name.
    pub model: String,
    /// Receiving node.
    pub node: String,
    /// `copied`, `already present` or `failed`.
    pub result: &'static str,
    /// The sending node, when a copy ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_node: Option<String>,
    /// Bytes of the file, when known.
    pub bytes_total: u64,
    /// How it went, in words (why it failed).
    pub message: String,
}

/// Which live nodes each catalog model should be on by its role and is
/// not: (model, node) in catalog then node order; the others are
/// `already present` outcomes.
pub fn wanted_copies(
    entries: &[v1::CatalogEntry],
    nodes: &[v1::NodeView],
) -> (Vec<(String, String)>, Vec<Outcome>) {
    let live: Vec<&v1::NodeIdentity> = nodes
        .iter()
        .filter(|n| n.status == v1::NodeStatus::Ready as i32)
        .filter_map(|n| n.node.as_ref())
        .collect();
    let mut todo = Vec::new();
    let mut present = Vec::new();
    for e in entries {
        for n in &live {
            if !e.role.is_empty() && !n.roles.iter().any(|r| r == &e.role) {
                continue;
            }
            if e.nodes.contains(&n.name) {
                present.push(Outcome {
                    model: e.name.clone(),
                    node: n.name.clone(),
                    result: "already present",
                    from_node: None,
                    bytes_total: e.file_size_bytes,
                    message: String::new(),
                });
            } else {
                todo.push((e.name.clone(), n.name.clone()));
            }
        }
    }
    (todo, present)
}

/// `--all-roles`: every copy [`wanted_copies`] lists, one at a time, then
/// the summary; exit 1 when any failed.
fn all_roles(t: &Target, output: Format) -> Result<(), Failure> {
    let rt = crate::client::runtime()?;
    let outcomes = rt.block_on(async {
        let mut c = t.connect().await?;
        let entries = c
            .list_catalog(v1::ListCatalogRequest {})
            .await
            .map_err(|s| t.status(s))?
            .into_inner()
            .entries;
        let nodes = c
            .list_nodes(v1::ListNodesRequest {})
            .await
            .map_err(|s| t.status(s))?
            .into_inner()
            .nodes;
        let (todo, mut outcomes) = wanted_copies(&entries, &nodes);
        for (model, node) in todo {
            if output == Format::Table {
                eprintln!("{model} -> {node}:");
            }
            let o = match follow(&mut c, &model, &node, None, output).await {
                Ok(Some(p)) => outcome(&model, &p),
                Ok(None) => failed(&model, &node, "the controller ended the copy's stream"),
                // The controller cannot be reached: no other copy can be
                // asked for either.
                Err(s) if s.code() == tonic::Code::Unavailable => return Err(t.status(s)),
                Err(s) => failed(&model, &node, s.message()),
            };
            outcomes.push(o);
        }
        // Catalog order, then node order, whatever was copied.
        let rank = |m: &str| entries.iter().position(|e| e.name == m);
        outcomes.sort_by(|a, b| {
            rank(&a.model)
                .cmp(&rank(&b.model))
                .then(a.node.cmp(&b.node))
        });
        Ok::<_, Failure>(outcomes)
    })?;
    match output {
        Format::Json => print_json(&outcomes)?,
        Format::Table => print(&render_summary(&outcomes)),
    }
    let failures = outcomes.iter().filter(|o| o.result == "failed").count();
    if failures > 0 {
        return Err(Failure::Refused(format!(
            "{failures} cop{} failed",
            if failures == 1 { "y" } else { "ies" }
        )));
    }
    Ok(())
}

fn failed(model: &str, node: &str, why: &str) -> Outcome {
    Outcome {
        model: model.to_owned(),
        node: node.to_owned(),
        result: "failed",
        from_node: None,
        bytes_total: 0,
        message: why.to_owned(),
    }
}

/// The outcome of a copy of `model` that ended with `p`.
fn outcome(model: &str, p: &CopyProgress) -> Outcome {
    let (result, message) = match p.state {
        CopyState::Done => ("copied", render_result(p).trim_end().to_owned()),
        CopyState::AlreadyPresent => ("already present", p.message.clone()),
        CopyState::Failed => ("failed", p.message.clone()),
        CopyState::Copying => (
            "failed",
            "the copy's stream ended before the copy did".to_owned(),
        ),
    };
    Outcome {
        model: model.to_owned(),
        node: p.to_node.clone(),
        result,
        from_node: Some(p.from_node.clone()).filter(|f| !f.is_empty()),
        bytes_total: p.bytes_total,
        message,
    }
}

/// The `--all-roles` summary: one row per model and node, then the counts.
pub fn render_summary(outcomes: &[Outcome]) -> String {
    if outcomes.is_empty() {
        return "No live node of any catalog model's role: nothing to copy.\n".into();
    }
    let mut t = Table::new(["MODEL", "NODE", "RESULT", "DETAIL"]);
    for o in outcomes {
        t.row([
            o.model.clone(),
            o.node.clone(),
            o.result.to_owned(),
            if o.message.is_empty() {
                "-".to_owned()
            } else {
                o.message.clone()
            },
        ]);
    }
    let count = |r: &str| outcomes.iter().filter(|o| o.result == r).count();
    format!(
        "{}copied {}, already present {}, failed {}\n",
        t.render(),
        count("copied"),
        count("already present"),
        count("failed")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_result_line_says_size_rate_resume_and_hash() {
        let p = CopyProgress {
            model_id: "m.gguf".into(),
            from_node: "halo1".into(),
            to_node: "halo2".into(),
            bytes_total: 300 << 20,
            bytes_done: 300 << 20,
            resumed_from_bytes: 100 << 20,
            elapsed_ms: 4000,
            state: CopyState::Done,
            sha256: vec!["ab12".into()],
            message: String::new(),
        };
        assert_eq!(
            render_result(&p),
            "m.gguf: copied 300.0 MiB from halo1 to halo2 in 4.0 s (50.0 MiB/s; resumed at \
             100.0 MiB), sha256 ab12\n"
        );
    }

    fn node(name: &str, role: &str, ready: bool) -> v1::NodeView {
        v1::NodeView {
            node: Some(v1::NodeIdentity {
                name: name.into(),
                roles: vec![role.into()],
                ..Default::default()
            }),
            status: if ready {
                v1::NodeStatus::Ready as i32
            } else {
                v1::NodeStatus::Lost as i32
            },
            ..Default::default()
        }
    }

    #[test]
    fn all_roles_copies_each_model_to_the_live_nodes_of_its_role_that_lack_it() {
        let entries = vec![
            v1::CatalogEntry {
                name: "coder".into(),
                role: "speed".into(),
                nodes: vec!["halo1".into()],
                ..Default::default()
            },
            v1::CatalogEntry {
                name: "any".into(),
                nodes: vec!["halo2".into()],
                ..Default::default()
            },
        ];
        let nodes = vec![
            node("halo1", "speed", true),
            node("halo2", "speed", true),
            node("halo3", "reasoning", true),
            node("halo4", "speed", false),
        ];
        let (todo, present) = wanted_copies(&entries, &nodes);
        assert_eq!(
            todo,
            [
                ("coder".to_owned(), "halo2".to_owned()),
                ("any".to_owned(), "halo1".to_owned()),
                ("any".to_owned(), "halo3".to_owned()),
            ]
        );
        let shown: Vec<(&str, &str)> = present
            .iter()
            .map(|o| (o.model.as_str(), o.node.as_str()))
            .collect();
        assert_eq!(shown, [("coder", "halo1"), ("any", "halo2")]);
        let mut all = present;
        all.push(failed("any", "halo3", "not enough room in /srv/models"));
        let table = render_summary(&all);
        assert!(
            table.contains("not enough room in /srv/models")
                && table.ends_with("copied 0, already present 2, failed 1\n"),
            "{table}"
        );
    }
}
