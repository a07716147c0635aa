//! The cold-start baseline: the smallest `lambda_runtime` function, as in maxday/lambda-perf
//! (no SDK, no TLS, no configuration). It echoes the event.
use lambda_runtime::{service_fn, LambdaEvent};

#[tokio::main]
async fn main() -> Result<(), lambda_runtime::Error> {
    lambda_runtime::run(service_fn(
        |event: LambdaEvent<serde_json::Value>| async move {
            Ok::<_, lambda_runtime::Error>(event.payload)
        },
    ))
    .await
}
