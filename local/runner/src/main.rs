//! `gateway-local`: the whole gateway in one process against the local stack. Configuration is
//! the same environment the Lambda functions read, plus the runner's own variables (README).
use std::time::Duration;

use gateway::config::Env;
use gateway_aws::wiring::{init_tracing, Wiring};
use local_runner::{start, RunnerOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    init_tracing();
    let env = Env::process();
    let defaults = RunnerOptions::default();
    let options = RunnerOptions {
        listen: env
            .get("GATEWAY_LISTEN")
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(defaults.listen),
        sweep_every: env
            .get("SWEEP_EVERY_SECS")
            .map(|s| s.parse().map(Duration::from_secs))
            .transpose()?
            .unwrap_or(defaults.sweep_every),
        queue_visibility_secs: env
            .get("LOCAL_QUEUE_VISIBILITY_SECS")
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(defaults.queue_visibility_secs),
        create_resources: env.get("LOCAL_CREATE_RESOURCES").as_deref() != Some("false"),
        dispatch_concurrency: env
            .get("LOCAL_DISPATCH_CONCURRENCY")
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(defaults.dispatch_concurrency),
        dispatch_batch_size: env
            .get("LOCAL_DISPATCH_BATCH_SIZE")
            .map(|s| s.parse())
            .transpose()?
            .unwrap_or(defaults.dispatch_batch_size),
    };
    let wiring = Wiring::from_env().await?;
    let runner = start(wiring, options).await?;
    println!("gateway listening on {}", runner.url());
    tokio::signal::ctrl_c().await?;
    runner.stop().await;
    Ok(())
}
