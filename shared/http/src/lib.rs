//! The gateway's HTTP side: the public API's axum router (routes, identity, the JSON error type,
//! response shapes) and the RunPod webhook route. Served by `lambda_http` in AWS (the submit and
//! webhook functions) and by `axum::serve` in the local runner.
#[cfg(feature = "api")]
pub mod api;
pub mod error;
pub mod webhook;

/// `router` with `hook` run after each response is made: the functions flush the metrics a
/// request counted, before Lambda may freeze the process.
pub fn after_each_request(router: axum::Router, hook: fn()) -> axum::Router {
    router.layer(axum::middleware::map_response(
        move |response: axum::response::Response| async move {
            hook();
            response
        },
    ))
}
