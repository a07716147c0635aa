//! Webhook delivery with RunPod's retry policy (reference §2), logged attempt by attempt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tokio::sync::watch;

use crate::chaos::{FaultKind, WebhookPlan};
use crate::config::Faults;
use crate::jobs::JobSnapshot;

/// One HTTP attempt to deliver a webhook.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAttempt {
    pub job_id: String,
    /// 1-based; a redelivery continues the job's numbering.
    pub attempt: u32,
    pub url: String,
    /// HTTP status the receiver answered, if it answered at all.
    pub status: Option<u16>,
    /// Transport error or timeout, if there was no usable answer.
    pub error: Option<String>,
    /// Whether this attempt counted as delivered under the current success rule.
    pub delivered: bool,
    /// The exact body sent (empty under the `webhook_empty_body` fault).
    pub body: String,
    /// Sent by `redeliver_webhook` rather than by the retry policy.
    pub redelivery: bool,
    /// Wall-clock send time, ms since the Unix epoch.
    pub sent_at_ms: u64,
}

/// RunPod's webhook body as captured in runpod-python#409: the `/status` fields plus the full
/// original `input` and the `webhook` URL. serde_json's default map keeps keys sorted, which is
/// also the order RunPod sends.
pub(crate) fn payload(job: &JobSnapshot, url: &str, faults: &Faults) -> Value {
    let mut body = Map::new();
    body.insert("delayTime".into(), json!(job.delay_time_ms));
    body.insert("executionTime".into(), json!(job.execution_time_ms));
    body.insert("id".into(), json!(job.id));
    body.insert("input".into(), job.input.clone());
    if let Some(output) = &job.output {
        body.insert("output".into(), output.clone());
    }
    body.insert("status".into(), json!(job.status));
    body.insert("webhook".into(), json!(url));
    if let Some(error) = &job.error {
        body.insert("error".into(), json!(error));
    }
    if let (true, Some(worker)) = (faults.webhook_worker_id, &job.worker_id) {
        body.insert("workerId".into(), json!(worker));
    }
    Value::Object(body)
}

#[derive(Debug, Clone)]
struct Sent {
    url: String,
    body: String,
}

#[derive(Debug)]
pub(crate) struct WebhookDispatcher {
    client: reqwest::Client,
    attempts: u32,
    retry_delay: Duration,
    faults: Arc<crate::faults::FaultState>,
    log: Mutex<Vec<WebhookAttempt>>,
    /// Last webhook decided per job, kept even when sending is switched off so a test can make
    /// a "lost" webhook arrive late with `redeliver_webhook`.
    last: Mutex<HashMap<String, Sent>>,
    shutdown: watch::Receiver<bool>,
}

impl WebhookDispatcher {
    pub(crate) fn new(
        timeout: Duration,
        attempts: u32,
        retry_delay: Duration,
        faults: Arc<crate::faults::FaultState>,
        shutdown: watch::Receiver<bool>,
    ) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            // Receivers are local; an ambient HTTP_PROXY must not capture them.
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self {
            client,
            attempts: attempts.max(1),
            retry_delay,
            faults,
            log: Mutex::new(Vec::new()),
            last: Mutex::new(HashMap::new()),
            shutdown,
        })
    }

    pub(crate) fn log(&self) -> Vec<WebhookAttempt> {
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn record(&self, attempt: WebhookAttempt) -> WebhookAttempt {
        self.log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(attempt.clone());
        attempt
    }

    fn next_attempt_number(&self, job_id: &str) -> u32 {
        let log = self
            .log
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        log.iter()
            .filter(|a| a.job_id == job_id)
            .map(|a| a.attempt)
            .max()
            .unwrap_or(0)
            + 1
    }

    /// Starts background delivery of `payload` to `url`, never blocking the caller. `plan`
    /// carries the chaos faults drawn for the job (all off without chaos).
    pub(crate) fn dispatch(
        self: &Arc<Self>,
        job_id: &str,
        url: &str,
        payload: &Value,
        faults: &Faults,
        plan: WebhookPlan,
    ) {
        let chaos = &self.faults.chaos;
        let body = if faults.webhook_empty_body {
            String::new()
        } else if plan.empty {
            chaos.record(FaultKind::WebhookEmpty, job_id);
            String::new()
        } else {
            payload.to_string()
        };
        let sent = Sent {
            url: url.to_owned(),
            body,
        };
        self.last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(job_id.to_owned(), sent.clone());
        if !faults.webhooks_enabled {
            tracing::info!(job_id, "webhook suppressed (webhooks_enabled = false)");
            return;
        }
        if plan.lost {
            chaos.record(FaultKind::WebhookLost, job_id);
            return;
        }
        if plan.delay.is_some() {
            chaos.record(FaultKind::WebhookDelayed, job_id);
        }
        // An older report of the job, as a reordering network would deliver it after the final
        // one: the same body claiming the job is still running.
        let stale = plan.out_of_order.then(|| {
            chaos.record(FaultKind::WebhookOutOfOrder, job_id);
            let mut stale = payload.clone();
            if let Some(body) = stale.as_object_mut() {
                body.remove("output");
                body.remove("error");
                body.insert("status".into(), Value::from("IN_PROGRESS"));
            }
            Sent {
                url: url.to_owned(),
                body: stale.to_string(),
            }
        });
        let copies = if plan.duplicate {
            chaos.record(FaultKind::WebhookDuplicate, job_id);
            2
        } else {
            1
        };
        for copy in 0..copies {
            let this = Arc::clone(self);
            let job_id = job_id.to_owned();
            let sent = sent.clone();
            let stale = if copy == 0 { stale.clone() } else { None };
            tokio::spawn(async move {
                this.deliver(job_id.clone(), sent, plan.delay).await;
                if let Some(stale) = stale {
                    let number = this.next_attempt_number(&job_id);
                    this.send_once(&job_id, number, &stale, false).await;
                }
            });
        }
    }

    async fn deliver(&self, job_id: String, sent: Sent, delay: Option<Duration>) {
        let mut shutdown = self.shutdown.clone();
        if let Some(delay) = delay {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
        let first = self.next_attempt_number(&job_id);
        for n in 0..self.attempts {
            if n > 0 {
                tokio::select! {
                    () = tokio::time::sleep(self.retry_delay) => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
            let attempt = self.send_once(&job_id, first + n, &sent, false).await;
            if attempt.delivered {
                return;
            }
        }
        tracing::warn!(job_id, attempts = self.attempts, "webhook given up");
    }

    /// Sends the job's last webhook once more, as a duplicate delivery would arrive.
    pub(crate) async fn redeliver(&self, job_id: &str) -> Option<WebhookAttempt> {
        let sent = self
            .last
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(job_id)
            .cloned()?;
        let number = self.next_attempt_number(job_id);
        Some(self.send_once(job_id, number, &sent, true).await)
    }

    async fn send_once(
        &self,
        job_id: &str,
        number: u32,
        sent: &Sent,
        redelivery: bool,
    ) -> WebhookAttempt {
        let faults = self.faults.get();
        let only_200 = faults.webhook_success_only_200;
        let sent_at_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut request = self.client.post(&sent.url).body(sent.body.clone());
        if !faults.webhook_content_type.is_empty() {
            request = request.header(reqwest::header::CONTENT_TYPE, &faults.webhook_content_type);
        }
        let result = request.send().await;
        let (status, error) = match result {
            Ok(response) => {
                let status = response.status().as_u16();
                // Drain the body so the connection can be reused; its content does not matter.
                let _ = response.bytes().await;
                (Some(status), None)
            }
            Err(err) if err.is_timeout() => (None, Some(format!("timeout: {err}"))),
            Err(err) => (None, Some(err.to_string())),
        };
        let delivered = match status {
            Some(200) => true,
            Some(code) => !only_200 && (200..300).contains(&code),
            None => false,
        };
        tracing::info!(
            job_id,
            attempt = number,
            ?status,
            ?error,
            delivered,
            "webhook attempt"
        );
        self.record(WebhookAttempt {
            job_id: job_id.to_owned(),
            attempt: number,
            url: sent.url.clone(),
            status,
            error,
            delivered,
            body: sent.body.clone(),
            redelivery,
            sent_at_ms,
        })
    }
}
