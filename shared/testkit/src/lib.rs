//! The test kit: in-memory fakes of every port ([`fakes`]), a world of them that builds each use
//! case ([`Kit`]), and builders of jobs and images. Tests of the use cases run over it in
//! milliseconds, with no AWS stand-in, no RunPod emulator and no Python.
//!
//! The fakes keep the promises the adapters make, so a use case cannot pass here and fail
//! against the real thing for a reason the fakes hide: the job store writes only on the
//! version read (as DynamoDB's conditional write does), keeps idempotency keys, and lists due
//! jobs as the sparse index does; the object stores stream and delete; the clock moves only
//! when told.
pub mod fakes;
pub mod images;
pub mod jobs;
mod kit;
#[cfg(feature = "local-aws")]
pub mod local_aws;
pub mod observed;
#[cfg(feature = "local-aws")]
pub mod stack_env;

pub use kit::{Kit, POD_POLL, POD_VOLUME_ROOT, SECRET, START, VOLUME_ROOT};
