//! Pure domain code: no I/O, no clocks read directly, unit-tested.
pub mod batch;
pub mod callback;
pub mod comfy;
pub mod egress;
pub mod hold;
pub mod job;
pub mod keys;
pub mod paths;
pub mod report;
pub mod retry;
pub mod tenant;
pub mod token;
pub mod usage;
pub mod workflow;
