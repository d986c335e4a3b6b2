//! `halo-controller`: keeps desired state and places models on nodes.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("halo-controller: not built yet")
}
