//! The dispatch queue on SQS. A message carries only the job id: the job record is the truth,
//! so a stale or duplicated message can never carry outdated instructions.
use async_trait::async_trait;
use aws_sdk_sqs::Client;
use serde::{Deserialize, Serialize};

use crate::ports::{JobQueue, QueueError};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DispatchMessage {
    pub job_id: String,
}

#[derive(Clone)]
pub struct SqsJobQueue {
    client: Client,
    queue_url: String,
}

impl SqsJobQueue {
    pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
        Self {
            client,
            queue_url: queue_url.into(),
        }
    }
}

#[async_trait]
impl JobQueue for SqsJobQueue {
    async fn enqueue(&self, job_id: &str) -> Result<(), QueueError> {
        let body = serde_json::to_string(&DispatchMessage {
            job_id: job_id.to_string(),
        })
        .map_err(|e| QueueError(e.to_string()))?;
        self.client
            .send_message()
            .queue_url(&self.queue_url)
            .message_body(body)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| QueueError(format!("{e:?}")))
    }
}
