//! The public API as a Lambda behind API Gateway (HTTP API, JWT authorizer).
use std::sync::Arc;

use gateway_aws::wiring::Wiring;
use gateway_http::api::{identity::IdentitySource, router, ApiState};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    let wiring = Wiring::from_env().await?;
    let state = ApiState::new(
        wiring.api()?,
        wiring.callbacks()?,
        IdentitySource::JwtClaims,
    );
    wiring.ready();
    lambda_http::run(gateway_http::after_each_request(
        router(Arc::new(state)),
        gateway_aws::metrics::flush,
    ))
    .await
}
