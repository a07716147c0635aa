//! Client callbacks: a job's events queued as signed messages to the URL its client gave, and
//! each message delivered, retried and logged, the Standard Webhooks way
//! (`domain::callback`).
//!
//! - `notify` adds a message to the job's delivery log (one record per job, written
//!   conditionally) and asks the delivery queue for an attempt. Message ids are derived from
//!   the job and the event, so a notify repeated (a retried write, a sweep after a webhook)
//!   adds nothing.
//! - `deliver` makes one attempt when it is due: the URL checked against the egress rules again
//!   and the connection made to the address checked, the message signed at send time with the
//!   owner's current secrets, the result logged, and the next attempt queued. A wait longer
//!   than the queue's 15-minute delay is a chain of delayed requests, each finding the message
//!   not yet due and asking again.
//! - Two deliveries of one request (SQS delivers at least once) may both send: the receiver
//!   drops the second by its `webhook-id`, as the spec intends.
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::app::api::output_links;
use crate::app::inputs;
use crate::config::Settings;
use crate::domain::callback::{
    signature_headers, AttemptResult, CallbackEvent, DeliveryLog, DeliveryRefusal, MessageState,
    SigningSecret, MAX_BODY_BYTES,
};
use crate::domain::job::{rfc3339, Job, JobState, Millis};
use crate::ports::{
    CallbackQueue, CallbackSender, Clock, DeliveryLogs, JobStore, ObjectError, ObjectStore,
    QueueError, Resolver, SigningKeys, StoreError,
};

/// The event whose body carries download links.
const SUCCEEDED: &str = "job.succeeded";

/// The longest delay the delivery queue takes (SQS: 15 minutes).
pub const MAX_QUEUE_DELAY: Duration = Duration::from_secs(900);

pub struct Callbacks {
    pub store: Arc<dyn JobStore>,
    pub logs: Arc<dyn DeliveryLogs>,
    pub queue: Arc<dyn CallbackQueue>,
    pub sender: Arc<dyn CallbackSender>,
    pub keys: Arc<dyn SigningKeys>,
    pub resolver: Arc<dyn Resolver>,
    /// For the outputs' download links in a succeeded job's message.
    pub results: Arc<dyn ObjectStore>,
    /// A held job's end gives its slot back and wakes the next in line.
    pub turns: Arc<crate::app::holds::Turns>,
    pub settings: Settings,
    pub clock: Arc<dyn Clock>,
}

#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error(transparent)]
    Objects(#[from] ObjectError),
    #[error(transparent)]
    Refused(#[from] DeliveryRefusal),
}

/// What one delivery request came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// An attempt was made; the next, if any, is queued.
    Attempted(AttemptResult),
    /// Not due yet: asked again for later.
    NotDue(Millis),
    /// Delivered, failed for good, or disabled already: nothing to do.
    Settled,
    /// No such message (its job was deleted, or the log trimmed it).
    Unknown,
}

/// How many times a log write is re-applied to a fresh copy after losing a race.
const LOG_RETRIES: usize = 3;

impl Callbacks {
    /// Queues `event` about `job` to the job's callback URL, if it has one and asked for the
    /// event; returns the message's id. Repeating it adds nothing.
    pub async fn notify(
        &self,
        job: &Job,
        event: CallbackEvent,
    ) -> Result<Option<String>, CallbackError> {
        let Some(url) = job.callback_url.clone() else {
            return Ok(None);
        };
        if !job.wants_callback(event) {
            return Ok(None);
        }
        let now = self.clock.now_ms();
        let id = message_id(job, event);
        let event_type = event.event_type(job.state);
        let body = self.body(job, event_type, now, now).await?;
        let added = self
            .change_log(&job.id, &job.owner, |log| {
                log.trace_id.get_or_insert_with(|| job.trace());
                log.add(&id, event_type, &url, body.clone(), now)
            })
            .await;
        match added {
            Ok(()) => {}
            // A URL that said it is gone gets nothing more: not an error of the job's.
            Err(CallbackError::Refused(DeliveryRefusal::Disabled(_))) => return Ok(None),
            Err(other) => return Err(other),
        }
        self.queue
            .request_delivery(&job.id, &id, Duration::ZERO)
            .await?;
        Ok(Some(id))
    }

    /// A request to tell `event` about job `job_id`: the event as the job stands now, if it
    /// still applies (a job ended meanwhile is not said to be running, and a deleted one is
    /// told nothing more).
    pub async fn on_notice(
        &self,
        job_id: &str,
        event: CallbackEvent,
    ) -> Result<Option<String>, CallbackError> {
        let Some(job) = self.store.get(job_id).await? else {
            return Ok(None);
        };
        let span = crate::app::job_span(&job);
        let noticed = async {
            let told = self.notice(job, event).await;
            match &told {
                Ok(told) => tracing::info!(?event, ?told, "callback notice handled"),
                Err(err) => {
                    tracing::warn!(?event, error = %err, "callback notice not handled; SQS returns it")
                }
            }
            told
        };
        tracing::Instrument::instrument(noticed, span).await
    }

    async fn notice(
        &self,
        job: Job,
        event: CallbackEvent,
    ) -> Result<Option<String>, CallbackError> {
        // The end of a held job frees its slot, whatever else it is told (a deleted job too);
        // a failure comes back with the notice.
        if event == CallbackEvent::Ended && job.is_terminal() {
            self.turns.release(&job).await?;
        }
        if !job.wants_callback(event) {
            return Ok(None);
        }
        let applies = job.deletion.is_none()
            && match event {
                CallbackEvent::Ended => job.is_terminal(),
                CallbackEvent::Running => job.state == JobState::Running,
                CallbackEvent::Progress => job.state == JobState::Running && job.progress.is_some(),
            };
        if !applies {
            return Ok(None);
        }
        self.notify(&job, event).await
    }

    /// One attempt at message `message_id` of job `job_id`, if it is due.
    pub async fn deliver(&self, job_id: &str, message_id: &str) -> Result<Delivery, CallbackError> {
        let Some((log, _)) = self.logs.delivery_log(job_id).await? else {
            return Ok(Delivery::Unknown);
        };
        let span = tracing::info_span!(
            "job",
            job_id,
            trace_id = log.trace_id.as_deref().unwrap_or_default()
        );
        let delivered = async {
            let delivered = self.deliver_logged(log, message_id).await;
            match &delivered {
                Ok(outcome) => tracing::info!(message_id, ?outcome, "callback delivery handled"),
                Err(err) => {
                    tracing::warn!(message_id, error = %err, "callback delivery not handled; SQS returns it")
                }
            }
            delivered
        };
        tracing::Instrument::instrument(delivered, span).await
    }

    async fn deliver_logged(
        &self,
        log: DeliveryLog,
        message_id: &str,
    ) -> Result<Delivery, CallbackError> {
        let job_id = log.job_id.clone();
        let job_id = job_id.as_str();
        let Some(message) = log.message(message_id).cloned() else {
            return Ok(Delivery::Unknown);
        };
        if message.state != MessageState::Pending {
            return Ok(Delivery::Settled);
        }
        let now = self.clock.now_ms();
        let due = message.next_attempt_at.unwrap_or(now);
        if due > now {
            self.queue
                .request_delivery(job_id, message_id, delay_until(due, now))
                .await?;
            return Ok(Delivery::NotDue(due));
        }
        // A job deleted or past its retention is told nothing more: its data is gone, and its
        // log goes with it at the purge.
        let Some(job) = self.store.get(job_id).await? else {
            return Ok(Delivery::Unknown);
        };
        if job.gone(now).is_some() {
            return Ok(Delivery::Unknown);
        }
        if !message.attempts.is_empty() {
            crate::metrics::retried("callback");
        }
        // A success's download links are signed anew for each attempt: a retry hours later
        // carries links that work, valid from when it is sent.
        let body = if message.event_type == SUCCEEDED {
            self.body(&job, SUCCEEDED, message.created_at, now).await?
        } else {
            message.body.clone()
        };
        let result = match url::Url::parse(&message.url) {
            Err(_) => AttemptResult::NoAnswer("the callback URL is not valid".into()),
            Ok(url) => {
                match inputs::destination(self.settings.egress, self.resolver.as_ref(), &url).await
                {
                    // Nothing is sent where the rules do not allow, whatever the URL said
                    // when the job was accepted: a refusal is logged like a failed attempt.
                    Err(refusal) => AttemptResult::NoAnswer(format!("refused: {refusal}")),
                    Ok(destination) => {
                        self.send(&log.owner, &url, &destination, &message.id, &body)
                            .await?
                    }
                }
            }
        };
        let at = self.clock.now_ms();
        let jitter: f64 = rand::random();
        let mut next = None;
        self.change_log(job_id, &log.owner, |log| {
            next = log.record(message_id, &result, at, jitter)?;
            // The log shows what this attempt carried.
            if let Some(sent) = log.messages.iter_mut().find(|m| m.id == message_id) {
                sent.body = body.clone();
            }
            Ok(())
        })
        .await?;
        if let Some(next) = next {
            self.queue
                .request_delivery(job_id, message_id, delay_until(next, at))
                .await?;
        }
        Ok(Delivery::Attempted(result))
    }

    /// The owner's job's delivery log; `None` for a job without callbacks (or not theirs).
    pub async fn log(
        &self,
        owner: &str,
        job_id: &str,
    ) -> Result<Option<DeliveryLog>, CallbackError> {
        Ok(self
            .logs
            .delivery_log(job_id)
            .await?
            .map(|(log, _)| log)
            .filter(|log| log.owner == owner))
    }

    /// The owner asks for message `message_id` again: due at once.
    pub async fn redeliver(
        &self,
        owner: &str,
        job_id: &str,
        message_id: &str,
    ) -> Result<bool, CallbackError> {
        if self.log(owner, job_id).await?.is_none() {
            return Ok(false);
        }
        let now = self.clock.now_ms();
        self.change_log(job_id, owner, |log| log.redeliver(message_id, now))
            .await?;
        self.queue
            .request_delivery(job_id, message_id, Duration::ZERO)
            .await?;
        Ok(true)
    }

    /// Sends a signed `test` event to `url` now, as a job's callback would be sent (the same
    /// egress rules, the owner's current secrets, no redirect followed), so an owner can check
    /// their receiver before a job depends on it. `Ok(Err(why))`: the URL is refused.
    pub async fn test_event(
        &self,
        owner: &str,
        url: &str,
    ) -> Result<Result<AttemptResult, String>, CallbackError> {
        let (url, destination) =
            match inputs::checked_url(self.settings.egress, self.resolver.as_ref(), url).await {
                Ok(checked) => checked,
                Err(why) => return Ok(Err(why)),
            };
        let now = self.clock.now_ms();
        let id = format!("msg_test_{}", uuid::Uuid::new_v4().simple());
        let body = json!({
            "type": "test",
            "timestamp": rfc3339(now),
            "data": {"message": "a test event from the job gateway"},
        })
        .to_string();
        Ok(Ok(self.send(owner, &url, &destination, &id, &body).await?))
    }

    /// Signs `body` as message `id` with the owner's current secrets, at this moment, and
    /// posts it to the address checked.
    async fn send(
        &self,
        owner: &str,
        url: &url::Url,
        destination: &crate::domain::egress::Destination,
        id: &str,
        body: &str,
    ) -> Result<AttemptResult, CallbackError> {
        let secrets = self.keys.secrets(owner).await?;
        let sent_at = self.clock.now_ms();
        let mut headers = vec![("content-type", "application/json".to_string())];
        headers.extend(signature_headers(&secrets, id, sent_at, body.as_bytes()));
        Ok(self
            .sender
            .post(url, destination, &headers, body.as_bytes())
            .await)
    }

    /// The owner's signing secrets, current first (their first is made on first ask).
    pub async fn secrets(&self, owner: &str) -> Result<Vec<SigningSecret>, CallbackError> {
        Ok(self.keys.secrets(owner).await?)
    }

    /// Starts a rotation: a new secret signs first, the one before it beside it.
    pub async fn rotate(&self, owner: &str) -> Result<Vec<SigningSecret>, CallbackError> {
        Ok(self.keys.rotate(owner).await?)
    }

    /// Applies `change` to the job's log (a new one if it has none) and saves it
    /// conditionally, re-applying it to a fresh copy after losing a race.
    async fn change_log<F>(
        &self,
        job_id: &str,
        owner: &str,
        mut change: F,
    ) -> Result<(), CallbackError>
    where
        F: FnMut(&mut DeliveryLog) -> Result<(), DeliveryRefusal>,
    {
        for _ in 0..LOG_RETRIES {
            let (mut log, version) = self
                .logs
                .delivery_log(job_id)
                .await?
                .unwrap_or_else(|| (DeliveryLog::new(job_id, owner), 0));
            change(&mut log)?;
            match self.logs.save_delivery_log(&log, version).await {
                Ok(()) => return Ok(()),
                Err(StoreError::Conflict) => continue,
                Err(other) => return Err(other.into()),
            }
        }
        Err(StoreError::Conflict.into())
    }

    /// The message's body: the job's summary, with its outputs' download links when it
    /// succeeded. Links, never bytes; past [`MAX_BODY_BYTES`] the links are left out and the
    /// client reads them from `GET /jobs/{id}`.
    async fn body(
        &self,
        job: &Job,
        event_type: &str,
        event_at: Millis,
        now: Millis,
    ) -> Result<String, CallbackError> {
        let mut data = json!({
            "job_id": job.id,
            "status": job.state.as_str(),
            "workflow": job.workflow,
            "created_at": rfc3339(job.timestamps.created_at),
            "finished_at": job.timestamps.finished_at.map(rfc3339),
            "expires_at": rfc3339(job.retained_until()),
            "error": job.error.as_ref().map(|e| json!({"code": e.code.as_str(), "message": e.message})),
            "progress": job.progress.as_ref().map(|p| json!({"fraction": p.fraction, "message": p.message})),
            "gpu_seconds": job.gpu_seconds(),
            "cost_usd": job.cost_nano_usd().map(|n| n as f64 / 1e9),
        });
        let envelope = |data: &Value| {
            json!({"type": event_type, "timestamp": rfc3339(event_at), "data": data}).to_string()
        };
        if job.state == JobState::Succeeded {
            let links = output_links(self.results.as_ref(), &self.settings, job, now).await?;
            let outputs: Vec<Value> = links
                .iter()
                .map(|(output, url)| {
                    json!({
                        "file_name": output.file_name,
                        "content_type": output.content_type,
                        "size": output.size,
                        "url": url,
                    })
                })
                .collect();
            data["outputs"] = Value::from(outputs);
            let body = envelope(&data);
            if body.len() <= MAX_BODY_BYTES {
                return Ok(body);
            }
            data["outputs"] = Value::from(
                job.outputs
                    .iter()
                    .map(|o| json!({"file_name": o.file_name, "content_type": o.content_type, "size": o.size}))
                    .collect::<Vec<_>>(),
            );
        }
        Ok(envelope(&data))
    }
}

/// Asks the delivery function to tell the job's client what a write brought, when the client
/// asked to be told: the job's end, or a worker taking it (`before`: its state before the
/// write). Never fails its caller: a lost request for the end is made again by the sweeper
/// (the job's `callback_pending`), and the others are informational.
pub async fn announce(queue: &dyn CallbackQueue, before: JobState, job: &Job) {
    let event = if job.is_terminal() && job.callback_pending {
        CallbackEvent::Ended
    } else if job.state == JobState::Running && before != JobState::Running {
        CallbackEvent::Running
    } else {
        return;
    };
    // A held job's end is announced even without a callback: its slot is freed on it.
    let frees_a_slot = event == CallbackEvent::Ended && !job.holds.is_empty();
    if job.wants_callback(event) || frees_a_slot {
        tell(queue, job, event).await;
    }
}

/// Asks for `event` about `job` to be told, logging a failure rather than returning it.
pub async fn tell(queue: &dyn CallbackQueue, job: &Job, event: CallbackEvent) {
    if let Err(err) = queue.request_notice(&job.id, event).await {
        tracing::warn!(job_id = %job.id, ?event, error = %err, "could not ask for a callback");
    }
}

/// A message's id, from the job and the event alone: the same event notified twice is one
/// message. Progress messages are told apart by when the progress was reported.
pub fn message_id(job: &Job, event: CallbackEvent) -> String {
    use sha2::{Digest, Sha256};
    let discriminator = match event {
        CallbackEvent::Ended => "ended".to_string(),
        CallbackEvent::Running => "running".to_string(),
        CallbackEvent::Progress => {
            format!("progress:{}", job.progress.as_ref().map_or(0, |p| p.at))
        }
    };
    let digest = Sha256::digest(format!("{}:{discriminator}", job.id).as_bytes());
    format!("msg_{}", hex::encode(&digest[..12]))
}

fn delay_until(at: Millis, now: Millis) -> Duration {
    Duration::from_millis((at - now).max(0) as u64).min(MAX_QUEUE_DELAY)
}
