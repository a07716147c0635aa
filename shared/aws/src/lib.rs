//! The gateway's adapters and wiring: the ports implemented against DynamoDB, SQS, S3 (AWS
//! buckets and the RunPod volume), Secrets Manager and RunPod over HTTPS, and the start-up wiring
//! that builds the use cases from the environment.
pub mod adapters;
pub mod metrics;
pub mod wiring;
