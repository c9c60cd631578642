//! `orderflow bench`: load against a running system.

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {}

pub async fn run(_args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("the benchmark is being written")
}
