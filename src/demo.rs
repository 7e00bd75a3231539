//! placeholder, replaced below
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {}
pub async fn run(_a: DemoArgs) -> anyhow::Result<()> {
    Ok(())
}
