//! Command line of `halo-agent`.

/// Entry point of the `halo-agent` binary.
pub fn main() -> anyhow::Result<()> {
    anyhow::bail!("halo-agent: the daemon is not built yet")
}
