//! The dispatch queue on SQS. A message carries only the job id: the job record is the truth,
//! so a stale or duplicated message can never carry outdated instructions. The consuming side
//! turns an SQS batch (the Lambda event source's shape) into one dispatch per message.
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct DispatchMessage {
    pub job_id: String,
}

#[cfg(feature = "sqs-events")]
pub use events::{handle_batch, handle_batch_before};
#[cfg(feature = "sqs")]
pub use queue::{client, SqsJobQueue};

/// The SQS operation [`SqsJobQueue`] calls.
pub const AWS_OPERATIONS: &[&str] = &["SendMessage"];

#[cfg(feature = "sqs")]
mod queue {
    use async_trait::async_trait;
    use aws_sdk_sqs::Client;
    use gateway::ports::{JobQueue, QueueError};

    use super::{DispatchMessage, AWS_OPERATIONS};
    use crate::adapters::declared::DeclaredOperations;

    /// An SQS client that makes only the queue's call.
    pub fn client(sdk: &aws_config::SdkConfig) -> Client {
        Client::from_conf(
            aws_sdk_sqs::config::Builder::from(sdk)
                .interceptor(DeclaredOperations::new("job queue", AWS_OPERATIONS))
                .build(),
        )
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
}

#[cfg(feature = "sqs-events")]
mod events {
    use aws_lambda_events::event::sqs::{BatchItemFailure, SqsBatchResponse, SqsEvent};
    use futures::StreamExt;
    use gateway::app::dispatch::Dispatcher;

    use super::DispatchMessage;

    /// Handles an SQS batch, reporting failed messages individually so that one slow job does
    /// not send its neighbours round again (`ReportBatchItemFailures`).
    pub async fn handle_batch(dispatcher: &Dispatcher, event: SqsEvent) -> SqsBatchResponse {
        handle_batch_before(dispatcher, event, None).await
    }

    /// [`handle_batch`] within an invocation that ends at `deadline` (epoch ms, the Lambda
    /// context's): no `/run` starts too late to record its answer.
    pub async fn handle_batch_before(
        dispatcher: &Dispatcher,
        event: SqsEvent,
        deadline: Option<i64>,
    ) -> SqsBatchResponse {
        let failures = futures::stream::iter(event.records)
            .map(|record| async move {
                let message_id = record.message_id.clone().unwrap_or_default();
                let parsed = record
                    .body
                    .as_deref()
                    .and_then(|b| serde_json::from_str::<DispatchMessage>(b).ok());
                let Some(message) = parsed else {
                    // A poison message: no job can be read from it, and no retry will change
                    // that. Report it failed so that SQS moves it to the dead-letter queue after
                    // maxReceiveCount receives, where the DLQ alarm shows it and it can be
                    // inspected (a producer bug, a message format change). Dropping it would hide
                    // the problem behind a log line.
                    tracing::error!(message_id, "unreadable dispatch message; left for the DLQ");
                    let mut failure = BatchItemFailure::default();
                    failure.item_identifier = message_id;
                    return Some(failure);
                };
                match dispatcher.dispatch_before(&message.job_id, deadline).await {
                    Ok(outcome) => {
                        tracing::info!(job_id = %message.job_id, ?outcome, "dispatched");
                        None
                    }
                    Err(err) => {
                        tracing::warn!(job_id = %message.job_id, error = %err, "dispatch deferred");
                        let mut failure = BatchItemFailure::default();
                        failure.item_identifier = message_id;
                        Some(failure)
                    }
                }
            })
            .buffer_unordered(4)
            .filter_map(|failure| async move { failure })
            .collect::<Vec<_>>()
            .await;
        let mut response = SqsBatchResponse::default();
        response.batch_item_failures = failures;
        response
    }
}
