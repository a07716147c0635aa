//! The scheduled sweeper (EventBridge Scheduler, every minute): rescues jobs whose webhook never
//! came, re-enqueues stuck ones, times out overdue ones. Its second event source, the poll
//! queue, asks it to check single jobs of a polled backend (the pod) every few seconds.
use gateway_aws::metrics::flushed;
use gateway_aws::wiring::Wiring;
use lambda_runtime::{service_fn, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let wiring = Wiring::from_env().await?;
    let sweeper = wiring.sweeper()?;
    let sweeper = &sweeper;
    wiring.ready();
    lambda_runtime::run(service_fn(
        move |event: LambdaEvent<serde_json::Value>| async move {
            // The poll queue's batches carry `Records`; the schedule's event does not.
            if event.payload.get("Records").is_some() {
                let batch: aws_lambda_events::event::sqs::SqsEvent =
                    serde_json::from_value(event.payload)?;
                let response = flushed(gateway_aws::adapters::sqs::handle_poll_batch(
                    sweeper, batch,
                ))
                .await;
                return Ok::<_, lambda_runtime::Error>(serde_json::to_value(response)?);
            }
            // The invocation's end: what is not reached by then stays due for the next sweep.
            let deadline = i64::try_from(event.context.deadline).ok();
            let report = flushed(sweeper.sweep_before(deadline)).await?;
            Ok(serde_json::to_value(report)?)
        },
    ))
    .await
}
