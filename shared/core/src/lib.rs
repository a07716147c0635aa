//! The RunPod job gateway's core: the domain, the ports and the use cases. It knows nothing of
//! AWS, Lambda or HTTP; the crate's dependencies enforce that (no axum, lambda, AWS SDK or HTTP
//! client here).
//!
//! - [`domain`]: jobs, their states and transitions, workflow rendering, path mapping, webhook
//!   tokens, RunPod reports. Pure code, no I/O.
//! - [`ports`]: the narrow traits the use cases need from the outside world.
//! - [`app`]: the use cases (submit API, dispatch, webhook, finalize, sweeper), written against
//!   the ports.
//! - [`config`]: every environment variable, read once at start-up into typed settings.
//!
//! The HTTP routes are `gateway-http`'s; the adapters and the wiring are `gateway-aws`'s.
pub mod app;
pub mod config;
pub mod domain;
pub mod metrics;
pub mod ports;
