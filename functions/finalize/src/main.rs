//! The finalize queue's consumer: collects the outputs of runs RunPod confirmed completed (the
//! webhook and the sweeper hand them over) into the results bucket, one job at a time.
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use gateway_aws::adapters::sqs::handle_finalize_batch;
use gateway_aws::metrics::flushed;
use gateway_aws::wiring::Wiring;
use lambda_runtime::{service_fn, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let wiring = Wiring::from_env().await?;
    let finalizer = wiring.finalizer()?;
    let finalizer = &finalizer;
    wiring.ready();
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        // The invocation's end: the finalize lease lasts no longer, and no copy starts that
        // could not finish before it.
        let deadline = i64::try_from(event.context.deadline).ok();
        Ok::<SqsBatchResponse, lambda_runtime::Error>(
            flushed(handle_finalize_batch(finalizer, event.payload, deadline)).await,
        )
    }))
    .await
}
