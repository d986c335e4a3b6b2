//! `haloctl models copy NAME --to NODE [--from NODE]`: asks the controller
//! to have NODE's agent pull a catalog model's file(s) from a node that
//! holds them, and shows bytes, rate and time left while it waits (one
//! rewritten line on a terminal, a line every few seconds otherwise).
//! Leaving (Ctrl-C) leaves the copy running on the agents.

use crate::Failure;
use crate::cli::CopyArgs;
use crate::client::Target;
use crate::output::{Format, print, print_json};
use proto::domain::{CopyProgress, CopyState};
use proto::v1;
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

/// Runs the copy and waits for its end.
pub fn run(t: &Target, a: &CopyArgs) -> Result<(), Failure> {
    let rt = crate::client::runtime()?;
    let last = rt.block_on(async {
        let mut c = t.connect().await?;
        let mut stream = c
            .copy_model(v1::CopyModelRequest {
                model: a.name.clone(),
                to_node: a.to.clone(),
                from_node: a.from.clone().unwrap_or_default(),
            })
            .await
            .map_err(|s| t.status(s))?
            .into_inner();
        let tty = std::io::stderr().is_terminal();
        let mut shown: Option<Instant> = None;
        let mut last = None;
        while let Some(p) = stream.message().await.map_err(|s| t.status(s))? {
            let p = CopyProgress::try_from(p)
                .map_err(|e| Failure::Other(anyhow::anyhow!("a bad progress report: {e}")))?;
            if p.state == CopyState::Copying && a.output == Format::Table {
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
        if tty && a.output == Format::Table {
            eprintln!();
        }
        Ok::<_, Failure>(last)
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
}
