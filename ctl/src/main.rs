//! `haloctl`: the halo command line.

fn main() -> anyhow::Result<()> {
    anyhow::bail!("haloctl: not built yet")
}
