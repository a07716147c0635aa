//! Implementations of the ports against real services.
pub mod callback_http;
pub mod comfy_http;
pub mod declared;
pub mod dynamodb;
pub mod http_fetch;
#[cfg(feature = "images")]
pub mod images;
pub mod runpod;
pub mod s3;
pub mod s3_post;
#[cfg(feature = "secrets")]
pub mod secrets;
#[cfg(feature = "callbacks")]
pub mod signing_keys;
pub mod sqs;
