//! Implementations of the ports against real services.
pub mod dynamodb;
pub mod runpod;
pub mod s3;
pub mod sqs;
