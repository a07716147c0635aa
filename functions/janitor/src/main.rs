//! The scheduled janitor (EventBridge Scheduler, every 30 minutes): removes from the RunPod
//! volume, under this deployment's folder only, the folders of jobs that ended long ago and of
//! jobs it no longer knows, and aborts multipart uploads nobody finished.
use gateway_aws::metrics::flushed;
use gateway_aws::wiring::Wiring;
use lambda_runtime::{service_fn, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let wiring = Wiring::from_env().await?;
    let janitor = wiring.janitor()?;
    let janitor = &janitor;
    wiring.ready();
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            // What is not reached by the invocation's end waits for the next run.
            let deadline = i64::try_from(event.context.deadline).ok();
            Ok::<_, lambda_runtime::Error>(flushed(janitor.run_before(deadline)).await)
        },
    ))
    .await
}
