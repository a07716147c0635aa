//! The three queues on SQS, and their consumers.
//!
//! - The dispatch queue: a message carries only the job id. The job record is the truth, so a
//!   stale or duplicated message can never carry outdated instructions.
//! - The stop queue: a message names a RunPod run to stop ([`StopRun`]); stopping a run twice
//!   is harmless, so duplicates need no care either.
//! - The finalize queue: a message names a job whose completed run was handed off
//!   ([`FinalizeMessage`]); again the job record is the truth. Its own function consumes it.
//!
//! The consuming side turns an SQS batch (the Lambda event source's shape) into one dispatch or
//! one stop per message. Both queues feed the dispatch function, which holds the RunPod key; the
//! stop queue's event source is capped in concurrency so that, with each consumer paced, the
//! gateway stays under RunPod's limit on cancels.
use gateway::ports::StopRun;
use serde::{Deserialize, Serialize};

/// Unknown fields are refused, so that a malformed stop is never taken for a dispatch.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DispatchMessage {
    pub job_id: String,
}

/// A request to collect a handed-off job's outputs: `{"finalize": "<job id>"}`, a shape no
/// dispatch or stop message has, so a message on the wrong queue is refused, never acted on.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FinalizeMessage {
    pub finalize: String,
}

/// A message of the callback queue: an event to tell a client
/// (`{"notice": {"job_id", "event"}}`), or one attempt at a message already in a job's log
/// (`{"deliver": {"job_id", "message_id"}}`).
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum CallbackMessage {
    Notice(CallbackNotice),
    Deliver(CallbackTarget),
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CallbackNotice {
    pub job_id: String,
    pub event: gateway::domain::callback::CallbackEvent,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CallbackTarget {
    pub job_id: String,
    pub message_id: String,
}

/// A check of one job asked for by the poll chain of a polled backend:
/// `{"check": {"job_id", "due"}}`, acted on only if the job is still due at `due`.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PollMessage {
    pub check: PollCheck,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PollCheck {
    pub job_id: String,
    pub due: i64,
}

/// The longest delay SQS allows on a message.
pub const MAX_DELAY_SECS: u64 = 900;

/// What a message on either queue asks for. A stop names its run and reason; a dispatch names
/// only the job. Anything else is a poison message.
#[derive(Debug, PartialEq)]
pub enum Message {
    Dispatch(DispatchMessage),
    Stop(StopRun),
}

impl Message {
    pub fn parse(body: &str) -> Option<Self> {
        if let Ok(stop) = serde_json::from_str::<StopRun>(body) {
            return Some(Self::Stop(stop));
        }
        serde_json::from_str::<DispatchMessage>(body)
            .ok()
            .map(Self::Dispatch)
    }
}

#[cfg(feature = "sqs-events")]
pub use events::{
    handle_batch, handle_batch_before, handle_callback_batch, handle_finalize_batch,
    handle_poll_batch, Consumer,
};
pub use queue::{
    client, SqsCallbackQueue, SqsFinalizeQueue, SqsJobQueue, SqsPollQueue, SqsStopQueue,
};

/// The SQS operation the queues call.
pub const AWS_OPERATIONS: &[&str] = &["SendMessage"];

mod queue {
    use async_trait::async_trait;
    use aws_sdk_sqs::Client;
    use std::time::Duration;

    use gateway::ports::{
        CallbackQueue, FinalizeQueue, JobQueue, PollQueue, QueueError, StopQueue, StopRun,
    };

    use super::{
        CallbackMessage, CallbackNotice, CallbackTarget, DispatchMessage, FinalizeMessage,
        PollCheck, PollMessage, AWS_OPERATIONS, MAX_DELAY_SECS,
    };
    use crate::adapters::declared::DeclaredOperations;

    /// An SQS client that makes only the queues' call.
    pub fn client(sdk: &aws_config::SdkConfig) -> Client {
        Client::from_conf(
            aws_sdk_sqs::config::Builder::from(sdk)
                .interceptor(DeclaredOperations::new("queues", AWS_OPERATIONS))
                .build(),
        )
    }

    async fn send(client: &Client, queue_url: &str, body: String) -> Result<(), QueueError> {
        send_after(client, queue_url, body, Duration::ZERO).await
    }

    async fn send_after(
        client: &Client,
        queue_url: &str,
        body: String,
        delay: Duration,
    ) -> Result<(), QueueError> {
        // Rounded up: a message that arrives before its time is only asked for again.
        let delay = (delay.as_millis().div_ceil(1000) as u64).min(MAX_DELAY_SECS) as i32;
        client
            .send_message()
            .queue_url(queue_url)
            .message_body(body)
            .set_delay_seconds((delay > 0).then_some(delay))
            .send()
            .await
            .map(|_| ())
            .map_err(|e| QueueError(format!("{e:?}")))
    }

    /// The stop queue: runs to stop at RunPod.
    #[derive(Clone)]
    pub struct SqsStopQueue {
        client: Client,
        queue_url: String,
    }

    impl SqsStopQueue {
        pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
            Self {
                client,
                queue_url: queue_url.into(),
            }
        }
    }

    #[async_trait]
    impl StopQueue for SqsStopQueue {
        async fn request_stop(&self, stop: &StopRun) -> Result<(), QueueError> {
            let body = serde_json::to_string(stop).map_err(|e| QueueError(e.to_string()))?;
            send(&self.client, &self.queue_url, body).await
        }
    }

    /// The finalize queue: jobs whose completed run awaits collection.
    #[derive(Clone)]
    pub struct SqsFinalizeQueue {
        client: Client,
        queue_url: String,
    }

    impl SqsFinalizeQueue {
        pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
            Self {
                client,
                queue_url: queue_url.into(),
            }
        }
    }

    #[async_trait]
    impl FinalizeQueue for SqsFinalizeQueue {
        async fn request_finalize(&self, job_id: &str, delay: Duration) -> Result<(), QueueError> {
            let body = serde_json::to_string(&FinalizeMessage {
                finalize: job_id.to_string(),
            })
            .map_err(|e| QueueError(e.to_string()))?;
            send_after(&self.client, &self.queue_url, body, delay).await
        }
    }

    /// The poll queue: single checks of a polled backend's jobs, each delayed to its time.
    #[derive(Clone)]
    pub struct SqsPollQueue {
        client: Client,
        queue_url: String,
    }

    impl SqsPollQueue {
        pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
            Self {
                client,
                queue_url: queue_url.into(),
            }
        }
    }

    #[async_trait]
    impl PollQueue for SqsPollQueue {
        async fn request_check(
            &self,
            job_id: &str,
            due: i64,
            delay: Duration,
        ) -> Result<(), QueueError> {
            let body = serde_json::to_string(&PollMessage {
                check: PollCheck {
                    job_id: job_id.to_string(),
                    due,
                },
            })
            .map_err(|e| QueueError(e.to_string()))?;
            send_after(&self.client, &self.queue_url, body, delay).await
        }
    }

    /// The callback queue: one message per event to tell, and per attempt due at a client
    /// callback.
    pub struct SqsCallbackQueue {
        client: Client,
        queue_url: String,
    }

    impl SqsCallbackQueue {
        pub fn new(client: Client, queue_url: impl Into<String>) -> Self {
            Self {
                client,
                queue_url: queue_url.into(),
            }
        }
    }

    #[async_trait]
    impl CallbackQueue for SqsCallbackQueue {
        async fn request_notice(
            &self,
            job_id: &str,
            event: gateway::domain::callback::CallbackEvent,
        ) -> Result<(), QueueError> {
            self.send(
                CallbackMessage::Notice(CallbackNotice {
                    job_id: job_id.to_string(),
                    event,
                }),
                Duration::ZERO,
            )
            .await
        }

        async fn request_delivery(
            &self,
            job_id: &str,
            message_id: &str,
            delay: Duration,
        ) -> Result<(), QueueError> {
            self.send(
                CallbackMessage::Deliver(CallbackTarget {
                    job_id: job_id.to_string(),
                    message_id: message_id.to_string(),
                }),
                delay,
            )
            .await
        }
    }

    impl SqsCallbackQueue {
        async fn send(&self, message: CallbackMessage, delay: Duration) -> Result<(), QueueError> {
            let body = serde_json::to_string(&message).map_err(|e| QueueError(e.to_string()))?;
            send_after(&self.client, &self.queue_url, body, delay).await
        }
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
        async fn enqueue(&self, job_id: &str, trace_id: Option<&str>) -> Result<(), QueueError> {
            let body = serde_json::to_string(&DispatchMessage {
                job_id: job_id.to_string(),
            })
            .map_err(|e| QueueError(e.to_string()))?;
            let mut request = self
                .client
                .send_message()
                .queue_url(&self.queue_url)
                .message_body(body);
            // X-Ray's own header for SQS: Lambda's event source links the consumer's trace to
            // it, and the consumer logs under it before it reads the job.
            if let Some(trace) = trace_id {
                request = request.message_system_attributes(
                    aws_sdk_sqs::types::MessageSystemAttributeNameForSends::AwsTraceHeader,
                    aws_sdk_sqs::types::MessageSystemAttributeValue::builder()
                        .data_type("String")
                        .string_value(format!("Root={trace};Sampled=1"))
                        .build()
                        .map_err(|e| QueueError(e.to_string()))?,
                );
            }
            request
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
    use gateway::app::finalize::Finalizer;
    use gateway::app::stop::Stopper;

    /// A message of the batch that SQS must hand out again (or, in the end, to the DLQ).
    fn failure(message_id: &str) -> BatchItemFailure {
        let mut failure = BatchItemFailure::default();
        failure.item_identifier = message_id.to_string();
        failure
    }

    /// The partial-batch answer: only the failures come back.
    fn response(failures: Vec<BatchItemFailure>) -> SqsBatchResponse {
        let mut response = SqsBatchResponse::default();
        response.batch_item_failures = failures;
        response
    }

    use super::{FinalizeMessage, Message};

    /// What consumes the two queues: dispatch, and the stopper (the RunPod key's holder).
    pub struct Consumer {
        pub dispatcher: Dispatcher,
        pub stopper: Stopper,
    }

    /// Handles an SQS batch, reporting failed messages individually so that one slow job does
    /// not send its neighbours round again (`ReportBatchItemFailures`).
    pub async fn handle_batch(consumer: &Consumer, event: SqsEvent) -> SqsBatchResponse {
        handle_batch_before(consumer, event, None).await
    }

    /// [`handle_batch`] within an invocation that ends at `deadline` (epoch ms, the Lambda
    /// context's): no `/run` starts too late to record its answer.
    pub async fn handle_batch_before(
        consumer: &Consumer,
        event: SqsEvent,
        deadline: Option<i64>,
    ) -> SqsBatchResponse {
        let failures = futures::stream::iter(event.records)
            .map(|record| async move {
                let message_id = record.message_id.clone().unwrap_or_default();
                let failed = || Some(failure(&message_id));
                match record.body.as_deref().and_then(Message::parse) {
                    // A poison message: nothing can be read from it, and no retry will change
                    // that. Report it failed so that SQS moves it to the dead-letter queue
                    // after maxReceiveCount receives, where the DLQ alarm shows it and it can
                    // be inspected (a producer bug, a message format change). Dropping it
                    // would hide the problem behind a log line.
                    None => {
                        tracing::error!(message_id, "unreadable queue message; left for the DLQ");
                        failed()
                    }
                    Some(Message::Dispatch(message)) => {
                        use tracing::Instrument as _;
                        // The sender's trace (X-Ray's header on the message), when it knew it;
                        // the dispatcher's own lines carry the job's from its record.
                        let trace = record
                            .attributes
                            .get("AWSTraceHeader")
                            .and_then(|header| gateway::domain::job::trace_from_header(header))
                            .unwrap_or_default();
                        let span = tracing::info_span!("message", job_id = %message.job_id, trace_id = %trace);
                        async {
                            match consumer
                                .dispatcher
                                .dispatch_before(&message.job_id, deadline)
                                .await
                            {
                                Ok(outcome) => {
                                    tracing::info!(?outcome, "dispatched");
                                    None
                                }
                                Err(err) => {
                                    tracing::warn!(error = %err, "dispatch deferred");
                                    failed()
                                }
                            }
                        }
                        .instrument(span)
                        .await
                    }
                    // The stopper logs both outcomes; a failure comes back to be retried.
                    Some(Message::Stop(stop)) => match consumer.stopper.stop(&stop).await {
                        Ok(_) => None,
                        Err(_) => failed(),
                    },
                }
            })
            .buffer_unordered(4)
            .filter_map(|failure| async move { failure })
            .collect::<Vec<_>>()
            .await;
        response(failures)
    }

    /// Handles a batch of the callback queue: one attempt per message, a few at once (each
    /// waits on a client's endpoint, up to its timeout). A message is reported failed only
    /// when its attempt could not be recorded or the next one not queued; SQS then returns it.
    pub async fn handle_callback_batch(
        callbacks: &gateway::app::callbacks::Callbacks,
        event: SqsEvent,
    ) -> SqsBatchResponse {
        let failures = futures::stream::iter(event.records)
            .map(|record| async move {
                let message_id = record.message_id.clone().unwrap_or_default();
                let failed = || Some(failure(&message_id));
                let Some(message) = record
                    .body
                    .as_deref()
                    .and_then(|body| serde_json::from_str::<super::CallbackMessage>(body).ok())
                else {
                    tracing::error!(message_id, "unreadable callback message; left for the DLQ");
                    return failed();
                };
                let handled = match message {
                    super::CallbackMessage::Notice(notice) => callbacks
                        .on_notice(&notice.job_id, notice.event)
                        .await
                        .is_ok(),
                    super::CallbackMessage::Deliver(target) => callbacks
                        .deliver(&target.job_id, &target.message_id)
                        .await
                        .is_ok(),
                };
                // The use case logged the outcome, under the job's trace.
                if handled {
                    None
                } else {
                    failed()
                }
            })
            .buffer_unordered(4)
            .filter_map(|failure| async move { failure })
            .collect::<Vec<_>>()
            .await;
        response(failures)
    }

    /// Handles a batch of the poll queue: each message one job's check, if still due at its
    /// time. A check that could not even read the job comes back after the visibility timeout;
    /// one that ran is done whatever it found (the check itself asks for the next).
    pub async fn handle_poll_batch(
        sweeper: &gateway::app::sweeper::Sweeper,
        event: SqsEvent,
    ) -> SqsBatchResponse {
        each_message(event, "poll", |super::PollMessage { check }| async move {
            match sweeper.check_polled(&check.job_id, check.due).await {
                Ok(action) => {
                    tracing::debug!(job_id = %check.job_id, ?action, "polled");
                    true
                }
                Err(err) => {
                    tracing::warn!(job_id = %check.job_id, error = %err, "poll deferred");
                    false
                }
            }
        })
        .await
    }

    /// Handles a batch of the finalize queue within an invocation that ends at `deadline`
    /// (epoch ms), one job at a time: the function's memory is sized for one job's largest
    /// output, and each job's copy gets what is left of the invocation. A message is reported
    /// failed only when neither the job nor a retry could be recorded; SQS then returns it
    /// after the visibility timeout, and the sweeper asks again meanwhile if it is due.
    pub async fn handle_finalize_batch(
        finalizer: &Finalizer,
        event: SqsEvent,
        deadline: Option<i64>,
    ) -> SqsBatchResponse {
        each_message(event, "finalize", |message: FinalizeMessage| async move {
            // The use case logs the outcome, under the job's trace.
            finalizer
                .finalize(&message.finalize, deadline)
                .await
                .is_ok()
        })
        .await
    }

    /// Handles each message of `event` in turn with `handle` (true: done), and reports the
    /// messages it could not read, or whose handling failed, for SQS to return: an unreadable
    /// one ends in the dead-letter queue after its last receive.
    async fn each_message<M, F, Fut>(event: SqsEvent, kind: &str, mut handle: F) -> SqsBatchResponse
    where
        M: serde::de::DeserializeOwned,
        F: FnMut(M) -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let mut failures = Vec::new();
        for record in event.records {
            let message_id = record.message_id.clone().unwrap_or_default();
            let message = record
                .body
                .as_deref()
                .and_then(|body| serde_json::from_str::<M>(body).ok());
            let done = match message {
                None => {
                    tracing::error!(message_id, kind, "unreadable message; left for the DLQ");
                    false
                }
                Some(message) => handle(message).await,
            };
            if !done {
                failures.push(failure(&message_id));
            }
        }
        response(failures)
    }
}

#[cfg(test)]
mod tests {
    use gateway::ports::StopReason;

    use super::*;

    #[test]
    fn a_stop_and_a_dispatch_are_told_apart() {
        let stop = StopRun {
            job_id: "j".into(),
            runpod_id: "r".into(),
            reason: StopReason::Deadline,
            backend: Default::default(),
        };
        let body = serde_json::to_string(&stop).unwrap();
        assert_eq!(Message::parse(&body), Some(Message::Stop(stop)));
        assert_eq!(
            Message::parse(r#"{"job_id":"j"}"#),
            Some(Message::Dispatch(DispatchMessage { job_id: "j".into() }))
        );
    }

    #[test]
    fn a_finalize_request_is_neither_a_dispatch_nor_a_stop() {
        let body = serde_json::to_string(&FinalizeMessage {
            finalize: "j".into(),
        })
        .unwrap();
        assert_eq!(body, r#"{"finalize":"j"}"#);
        assert_eq!(Message::parse(&body), None, "refused on the dispatch queue");
        assert!(serde_json::from_str::<FinalizeMessage>(r#"{"job_id":"j"}"#).is_err());
    }

    #[test]
    fn a_callback_request_is_no_other_queues_message() {
        let body = serde_json::to_string(&CallbackMessage::Deliver(CallbackTarget {
            job_id: "j".into(),
            message_id: "msg_1".into(),
        }))
        .unwrap();
        assert_eq!(body, r#"{"deliver":{"job_id":"j","message_id":"msg_1"}}"#);
        let notice = serde_json::to_string(&CallbackMessage::Notice(CallbackNotice {
            job_id: "j".into(),
            event: gateway::domain::callback::CallbackEvent::Ended,
        }))
        .unwrap();
        assert_eq!(notice, r#"{"notice":{"job_id":"j","event":"ended"}}"#);
        assert_eq!(Message::parse(&notice), None);
        assert_eq!(Message::parse(&body), None);
        assert!(serde_json::from_str::<FinalizeMessage>(&body).is_err());
        assert!(serde_json::from_str::<CallbackMessage>(r#"{"finalize":"j"}"#).is_err());
    }

    #[test]
    fn a_stop_without_its_run_is_not_a_dispatch_either() {
        // Half a stop must not start a run of the job it names.
        assert_eq!(
            Message::parse(r#"{"job_id":"j","reason":"deadline"}"#),
            None
        );
        assert_eq!(Message::parse("not json"), None);
    }
}
