//! RunPod's webhook receiver as a Lambda behind API Gateway (no authorizer: the per-job token in
//! the URL is the authentication).
use std::sync::Arc;

use gateway_aws::wiring::Wiring;
use gateway_http::webhook::router;

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    let wiring = Wiring::from_env().await?;
    let handler = wiring.webhook()?;
    wiring.ready();
    lambda_http::run(gateway_http::after_each_request(
        router(Arc::new(handler)),
        gateway_aws::metrics::flush,
    ))
    .await
}
