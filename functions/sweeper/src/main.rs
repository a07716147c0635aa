//! The scheduled sweeper (EventBridge Scheduler, every minute): rescues jobs whose webhook never
//! came, re-enqueues stuck ones, times out overdue ones.
use gateway_aws::wiring::Wiring;
use lambda_runtime::{service_fn, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let wiring = Wiring::from_env().await?;
    let sweeper = wiring.sweeper()?;
    let sweeper = &sweeper;
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            // The invocation's end: what is not reached by then stays due for the next sweep.
            let deadline = i64::try_from(event.context.deadline).ok();
            let report = sweeper.sweep_before(deadline).await?;
            Ok::<_, lambda_runtime::Error>(report)
        },
    ))
    .await
}
