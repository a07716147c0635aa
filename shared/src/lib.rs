//! The RunPod job gateway's library: every Lambda function and the local runner link it.
//!
//! Three layers, kept apart on purpose:
//! - [`domain`]: jobs, their states and transitions, workflow rendering, path mapping, webhook
//!   tokens. Pure code, no I/O.
//! - [`ports`]: the narrow traits the application needs from the outside world.
//! - [`adapters`]: DynamoDB, SQS, S3 (AWS buckets and the RunPod volume), RunPod over HTTP.
//!
//! [`app`] holds the use cases (submit API, dispatch, webhook, sweeper) written against the ports.
pub mod adapters;
pub mod app;
pub mod config;
pub mod domain;
pub mod ports;
pub mod wiring;
