//! The public API as a Lambda behind API Gateway (HTTP API, JWT authorizer).
use std::sync::Arc;

use gateway::app::api::{identity::IdentitySource, router};
use gateway::wiring::{init_tracing, Wiring};

#[tokio::main]
async fn main() -> Result<(), lambda_http::Error> {
    init_tracing();
    let wiring = Wiring::from_env().await?;
    let state = wiring.api(IdentitySource::JwtClaims)?;
    lambda_http::run(router(Arc::new(state))).await
}
