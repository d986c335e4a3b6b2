//! `halo-agent`: the per-node daemon.

fn main() -> anyhow::Result<()> {
    agent::cli::main()
}
