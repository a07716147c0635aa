//! The callback queue's consumer: tells clients of their jobs' events (each notice becomes a
//! message in the job's delivery log) and makes each delivery attempt when it is due, signed
//! with the owner's secrets, off every other function's path.
use aws_lambda_events::event::sqs::{SqsBatchResponse, SqsEvent};
use gateway_aws::adapters::sqs::handle_callback_batch;
use gateway_aws::metrics::flushed;
use gateway_aws::wiring::Wiring;
use lambda_runtime::{service_fn, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    let wiring = Wiring::from_env().await?;
    let callbacks = wiring.callbacks()?;
    let callbacks = &callbacks;
    wiring.ready();
    lambda_runtime::run(service_fn(move |event: LambdaEvent<SqsEvent>| async move {
        Ok::<SqsBatchResponse, lambda_runtime::Error>(
            flushed(handle_callback_batch(callbacks, event.payload)).await,
        )
    }))
    .await
}
