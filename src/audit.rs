//! `orderflow audit`: checks every invariant of DESIGN.md §5 and prints a JSON report.

#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {}

/// Runs the audit; Ok(true) when clean.
pub async fn run(_config: &orderflow_shared::config::Config, _args: &AuditArgs) -> anyhow::Result<bool> {
    anyhow::bail!("the audit is being written")
}
