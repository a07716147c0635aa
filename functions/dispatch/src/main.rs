//! The SQS consumer of both queues: it submits queued jobs to RunPod and stops the runs asked to
//! be stopped, reporting partial batch failures.
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use gateway_aws::adapters::sqs::handle_batch_before;
use gateway_aws::metrics::flushed;
use gateway_aws::wiring::Wiring;
use lambda_runtime::{service_fn, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let wiring = Wiring::from_env().await?;
    let consumer = wiring.consumer()?;
    let consumer = &consumer;
    wiring.ready();
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        // The invocation's end: no /run starts too late to record RunPod's answer.
        let deadline = i64::try_from(event.context.deadline).ok();
        Ok::<SqsBatchResponse, lambda_runtime::Error>(
            flushed(handle_batch_before(consumer, event.payload, deadline)).await,
        )
    }))
    .await
}
