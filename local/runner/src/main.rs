//! `gateway-local`: the whole gateway in one process against the local stack. Configuration is
//! the same environment the Lambda functions read, plus the runner's own variables (README).
use gateway::config::{Env, LocalRunnerConfig};
use gateway_aws::wiring::Wiring;
use local_runner::start;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let options = LocalRunnerConfig::from_env(&Env::process())?;
    let wiring = Wiring::from_env().await?;
    let runner = start(wiring, options).await?;
    println!("gateway listening on {}", runner.url());
    tokio::signal::ctrl_c().await?;
    runner.stop().await;
    Ok(())
}
