//! The gateway's HTTP side: the public API's axum router (routes, identity, the JSON error type,
//! response shapes) and the RunPod webhook route. Served by `lambda_http` in AWS (the submit and
//! webhook functions) and by `axum::serve` in the local runner.
#[cfg(feature = "api")]
pub mod api;
pub mod error;
pub mod webhook;
