//! `haloctl fixture`: writes the tiny real model or a sparse big model, so a
//! person can try `plan` on DeepSeek-V3.1 without downloading 170 GB.

use crate::Failure;
use crate::cli::{FixtureArgs, FixtureCommand};
use crate::output::{Table, bytes, print};
use agent::gguf::fixtures::{self, SparseModel, VocabStyle};
use anyhow::Context;

/// Runs `haloctl fixture …`.
pub fn run(args: &FixtureArgs) -> Result<(), Failure> {
    match &args.command {
        FixtureCommand::List => {
            let mut t = Table::new(["name", "architecture", "quantization", "file size"]);
            t.row(["tiny", "llama", "F32", "< 1 MiB (real weights)"].map(String::from));
            for spec in fixtures::sparse_catalog() {
                let size = spec
                    .model
                    .writer(VocabStyle::SizeOnly)
                    .file_size()
                    .map(bytes)
                    .unwrap_or_else(|_| "?".into());
                t.row([
                    spec.name.to_string(),
                    spec.arch.to_string(),
                    spec.quant.to_string(),
                    size,
                ]);
            }
            print(&t.render());
            Ok(())
        }
        FixtureCommand::Write {
            name,
            path,
            size_only_vocab,
        } => {
            let size = if name == "tiny" {
                fixtures::write_tiny_llama(path, 1)
            } else {
                let Some(kind) = SparseModel::from_name(name) else {
                    let known: Vec<_> = fixtures::sparse_catalog().iter().map(|s| s.name).collect();
                    return Err(Failure::Refused(format!(
                        "unknown fixture `{name}`; known: tiny, {}",
                        known.join(", ")
                    )));
                };
                let vocab = if *size_only_vocab {
                    VocabStyle::SizeOnly
                } else {
                    VocabStyle::Synthetic
                };
                fixtures::write_sparse_with(kind, path, vocab)
            }
            .with_context(|| format!("writing {}", path.display()))?;
            // A sparse file's size is not what it costs: say both.
            let disk = std::fs::metadata(path)
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .ok();
            let line = match disk {
                Some(d) if d < size => format!(
                    "wrote {} ({}, {} on disk: a sparse file, its data a hole)\n",
                    path.display(),
                    bytes(size),
                    bytes(d)
                ),
                _ => format!("wrote {} ({})\n", path.display(), bytes(size)),
            };
            print(&line);
            Ok(())
        }
    }
}
