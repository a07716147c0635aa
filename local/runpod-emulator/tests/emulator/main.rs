//! Integration tests: a real emulator on 127.0.0.1:0, driven over HTTP.
//! One binary (modules under `tests/emulator/`) to keep link time down.

mod common;

mod api;
mod chaos;
mod controls;
mod jobs;
mod scaling;
mod sdk_worker;
mod unconfirmed;
mod volume;
mod webhooks;
mod worker;
