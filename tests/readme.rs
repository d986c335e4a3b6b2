//! README.md's samples of haloctl output, held against real output: the
//! quick start's own `$ haloctl …` sections and the tour commands run on
//! the quick-start cluster (`ctl_cluster::quickstart_…` calls
//! [`check_or_update`]). Figures that differ from machine to machine or run
//! to run (memory, ports, keys, times) are compared by shape: every digit
//! run is one digit, a 64-digit hex key is `KEY`, white space is folded.
//! A column, a unit or a line that the code no longer prints fails the
//! test. `HALO_UPDATE_README=1` rewrites the samples from this run instead.

use std::path::{Path, PathBuf};

/// The README's path.
fn readme() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md")
}

/// A `$ haloctl …` line of the README and the output lines after it.
#[derive(Debug)]
pub struct Sample {
    /// The command as written after `$ ` (e.g. `haloctl nodes`).
    pub command: String,
    /// Index of the first output line in the README's lines.
    start: usize,
    /// One past the last output line.
    end: usize,
}

/// The samples of one fenced block: the block holding the first line that
/// begins with `anchor` when that line is a `$ ` command, else the first
/// block after it.
fn samples_in_block(lines: &[&str], anchor: &str) -> Vec<Sample> {
    let Some(at) = lines.iter().position(|l| l.starts_with(anchor)) else {
        panic!("README.md has no line starting with `{anchor}`");
    };
    let open = if anchor.starts_with("$ ") {
        at
    } else {
        lines[at..]
            .iter()
            .position(|l| l.starts_with("```"))
            .map_or_else(|| panic!("no block after `{anchor}`"), |i| at + i + 1)
    };
    let close = lines[open..]
        .iter()
        .position(|l| l.starts_with("```"))
        .map_or(lines.len(), |i| open + i);
    let mut out: Vec<Sample> = Vec::new();
    for (i, l) in lines.iter().enumerate().take(close).skip(open) {
        if l.starts_with("$ ") || l.starts_with("==> ") {
            if let Some(last) = out.last_mut().filter(|s| s.end == usize::MAX) {
                last.end = i;
            }
            if let Some(cmd) = l.strip_prefix("$ ").filter(|c| c.starts_with("haloctl ")) {
                out.push(Sample {
                    command: cmd.to_owned(),
                    start: i + 1,
                    end: usize::MAX,
                });
            }
        }
    }
    if let Some(last) = out.last_mut().filter(|s| s.end == usize::MAX) {
        last.end = close;
    }
    // Trailing blank lines belong to the block, not the output.
    for s in &mut out {
        while s.end > s.start && lines[s.end - 1].trim().is_empty() {
            s.end -= 1;
        }
    }
    out
}

/// A line as compared: digit runs as one `9`, 64-hex keys as `KEY`, white
/// space folded; progress lines (`  NAME: node state · 1.2s`) dropped, as
/// how many a wait prints depends on timing.
fn shape(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| !(l.starts_with("  ") && l.contains(" · ")))
        .map(|l| {
            let mut out = String::new();
            let words: Vec<String> = l
                .split_whitespace()
                .map(|w| {
                    let bare = w.trim_matches(|c: char| !c.is_ascii_alphanumeric());
                    if bare.len() == 64 && bare.chars().all(|c| c.is_ascii_hexdigit()) {
                        w.replace(bare, "KEY")
                    } else {
                        w.to_owned()
                    }
                })
                .collect();
            let mut last_digit = false;
            for c in words.join(" ").chars() {
                if c.is_ascii_digit() {
                    if !last_digit {
                        out.push('9');
                    }
                    last_digit = true;
                } else {
                    out.push(c);
                    last_digit = false;
                }
            }
            out
        })
        .collect()
}

/// The `$ haloctl …` sections of a transcript (the quick start's stdout).
pub fn sections(transcript: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for l in transcript.lines() {
        if let Some(cmd) = l.strip_prefix("$ ") {
            out.push((cmd.to_owned(), String::new()));
        } else if let Some((_, body)) = out.last_mut() {
            body.push_str(l);
            body.push('\n');
        }
    }
    for (_, body) in &mut out {
        let trimmed = body.trim_end().to_owned();
        *body = trimmed;
    }
    out.retain(|(c, _)| c.starts_with("haloctl "));
    out
}

/// Holds the README's samples in the block at `anchor` against
/// `real` (command → output); a sample whose command `real` lacks is not
/// checked here. Under `HALO_UPDATE_README=1` rewrites them instead.
/// Returns the commands checked.
pub fn check_or_update(anchor: &str, real: &[(String, String)]) -> Vec<String> {
    let path = readme();
    let text = std::fs::read_to_string(&path).expect("read README.md");
    let lines: Vec<&str> = text.lines().collect();
    let update = std::env::var_os("HALO_UPDATE_README").is_some();
    let mut checked = Vec::new();
    let mut failures = Vec::new();
    let mut replaced: Vec<(usize, usize, String)> = Vec::new();
    for s in samples_in_block(&lines, anchor) {
        let Some((_, got)) = real.iter().find(|(c, _)| *c == s.command) else {
            continue;
        };
        checked.push(s.command.clone());
        let want = lines[s.start..s.end].join("\n");
        if update {
            replaced.push((s.start, s.end, got.clone()));
        } else if shape(&want) != shape(got) {
            failures.push(format!(
                "README.md's `$ {}` (lines {}-{}) is not what it prints:\n--- README\n{want}\n--- real\n{got}",
                s.command,
                s.start + 1,
                s.end
            ));
        }
    }
    if update && !replaced.is_empty() {
        let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
        replaced.sort_by_key(|r| std::cmp::Reverse(r.0));
        for (start, end, got) in replaced {
            out.splice(start..end, got.lines().map(str::to_owned));
        }
        let mut new = out.join("\n");
        new.push('\n');
        std::fs::write(&path, new).expect("write README.md");
    }
    assert!(
        failures.is_empty(),
        "{}\n(HALO_UPDATE_README=1 rewrites the samples from real output)",
        failures.join("\n\n")
    );
    checked
}

#[test]
fn shapes_ignore_figures_keys_and_spacing_but_not_columns_or_units() {
    let a = "NODE   FREE      CERT\nhalo1  19.5 GiB  expires in 364d";
    let b = "NODE  FREE  CERT\nhalo1  119.25 GiB  expires in 12d";
    assert_eq!(shape(a), shape(b));
    assert_ne!(shape(a), shape("NODE FREE\nhalo1 19.5 GiB"));
    assert_ne!(shape("2.5 MiB"), shape("0.00 GiB"));
    let k = "ask  http://127.0.0.1:7310/v1  tiny  halo1  ";
    assert_eq!(
        shape(&format!("{k}{}", "ab".repeat(32))),
        shape(&format!("{k}{}", "0f".repeat(32)))
    );
    assert_eq!(shape("  tiny: halo1 pending · 0.0s\nready"), vec!["ready"]);
}

#[test]
fn samples_are_found_per_command_up_to_the_next_prompt() {
    let lines = [
        "```text",
        "$ bash deploy/quickstart.sh",
        "==> building",
        "$ haloctl nodes",
        "NODE",
        "halo1",
        "",
        "$ haloctl status",
        "NAME",
        "",
        "```",
    ];
    let s = samples_in_block(&lines, "$ bash deploy/quickstart.sh");
    assert_eq!(s.len(), 2);
    assert_eq!(
        (s[0].command.as_str(), s[0].start, s[0].end),
        ("haloctl nodes", 4, 6)
    );
    assert_eq!(
        (s[1].command.as_str(), s[1].start, s[1].end),
        ("haloctl status", 8, 9)
    );
    let tour = ["Then:", "```text", "$ haloctl models", "NAME", "```"];
    let s = samples_in_block(&tour, "Then:");
    assert_eq!(
        (s[0].command.as_str(), s[0].start, s[0].end),
        ("haloctl models", 3, 4)
    );
    let t = sections("$ haloctl nodes\nNODE\n\n$ curl x\nanswer\n$ haloctl status\nNAME\n");
    assert_eq!(
        t,
        vec![
            ("haloctl nodes".to_owned(), "NODE".to_owned()),
            ("haloctl status".to_owned(), "NAME".to_owned())
        ]
    );
}
