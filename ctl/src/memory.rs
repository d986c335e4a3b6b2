//! `haloctl memory`: this machine's memory report from the agent's probe.

use crate::Failure;
use crate::cli::MemoryArgs;
use crate::output::{Format, Table, bytes, print, print_json};
use agent::probe::Probe;

/// Prints the probe's report.
pub fn run(args: &MemoryArgs) -> Result<(), Failure> {
    // Every figure would read "unknown": say the root is wrong instead.
    let meminfo = args.root.join("proc/meminfo");
    if !meminfo.is_file() {
        return Err(Failure::Refused(format!(
            "{} has no proc/meminfo: --root must be / or a copy of a machine's /proc and /sys \
             (e.g. tests/fixtures/probe/strix-halo-128g)",
            args.root.display()
        )));
    }
    let probe = Probe::new(&args.root);
    let report = probe.report(&probe.find_llama_servers());
    if args.output == Format::Json {
        return Ok(print_json(&report)?);
    }
    let opt = |v: Option<u64>| v.map_or_else(|| "unknown".to_owned(), bytes);
    let mut t = Table::new(["", ""]);
    t.row(["RAM total".to_owned(), opt(report.mem_total_bytes)]);
    t.row(["RAM available".to_owned(), opt(report.mem_available_bytes)]);
    t.row(["swap total".to_owned(), opt(report.swap_total_bytes)]);
    if let Some(psi) = report.psi_some_avg10 {
        t.row(["pressure (some avg10)".to_owned(), format!("{psi:.2}%")]);
    }
    for g in &report.gpus {
        t.row([format!("{} VRAM", g.card), opt(g.vram_total_bytes)]);
        t.row([format!("{} GTT", g.card), opt(g.gtt_total_bytes)]);
        if let Some(l) = g.ttm_limit_bytes {
            t.row([format!("{} ttm limit", g.card), bytes(l)]);
        }
    }
    t.row(["usable for models".to_owned(), opt(report.usable_bytes)]);
    let mut out = t.render().lines().skip(1).collect::<Vec<_>>().join("\n");
    out.push('\n');
    if !report.usable_explanation.is_empty() {
        out.push_str("\nhow usable is worked out:\n");
        for l in &report.usable_explanation {
            out.push_str("  ");
            out.push_str(l);
            out.push('\n');
        }
    }
    if !report.processes.is_empty() {
        let mut p = Table::new(["pid", "process", "rss", "gpu vram", "gpu gtt"]);
        for pr in &report.processes {
            p.row([
                pr.pid.to_string(),
                pr.name.clone(),
                opt(pr.rss_bytes),
                opt(pr.gpu_vram_bytes),
                opt(pr.gpu_gtt_bytes),
            ]);
        }
        out.push('\n');
        out.push_str(&p.render());
    }
    print(&out);
    Ok(())
}
