//! The RunPod serverless endpoint API over HTTPS (`/v2/{endpoint}/run`, `/status`, `/cancel`).
//!
//! Each call is retried within the invocation under the configured [`RetryPolicy`]
//! (exponential backoff, full jitter, a time budget). `/status` and `/cancel` are idempotent and
//! retried on every transient failure; `/run` is not, so it is retried only when RunPod cannot
//! have accepted the job (429, 503, 408, no connection). Any other failure of `/run` (a
//! timeout, 500/502/504, a 200 whose body names no readable id) may hide a run RunPod did
//! start: it is handed back as [`RunPodError::Unknown`], and dispatch waits for that run to
//! announce itself instead of starting another. A 200 is read leniently for the id.
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use reqwest::StatusCode;

use gateway::config::RunPodConfig;
use gateway::domain::retry::RetryPolicy;
use gateway::ports::{RunPod, RunPodError, RunPodStatus, RunRequest};

#[derive(Clone)]
pub struct HttpRunPod {
    http: reqwest::Client,
    base: String,
    api_key: String,
    retry: RetryPolicy,
    request_timeout: Duration,
    cancels: Arc<CancelPace>,
    /// Paces `/status` when set: the sweeper's client, which keeps to its share of RunPod's
    /// limit however many jobs are due.
    statuses: Option<Arc<CancelPace>>,
    /// The longest answer read; a longer one is [`RunPodError::TooLarge`], and never held.
    max_body: u64,
}

/// Spaces calls (`/cancel`, and the sweeper's `/status`) at most `per_second` apart, across
/// every clone of the client.
struct CancelPace {
    interval: Duration,
    next: Mutex<Instant>,
}

impl CancelPace {
    fn new(per_second: u32) -> Self {
        Self {
            interval: Duration::from_secs(1) / per_second.max(1),
            next: Mutex::new(Instant::now()),
        }
    }

    /// Waits for this call's turn; refuses (transient) a turn further off than `budget`.
    async fn turn(&self, budget: Duration) -> Result<(), RunPodError> {
        let wait = {
            let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let at = (*next).max(now);
            if at - now > budget {
                return Err(RunPodError::Transient(
                    "RunPod rate limit: too many calls queued".into(),
                ));
            }
            *next = at + self.interval;
            at - now
        };
        tokio::time::sleep(wait).await;
        Ok(())
    }
}

/// Whether repeating a request could do the work twice.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    /// Reads and cancels: safe to repeat on any transient failure.
    Idempotent,
    /// `/run`: repeat only when RunPod certainly did not take the request.
    Submit,
}

/// One failed attempt.
struct Failure {
    error: RunPodError,
    /// The request certainly did not reach RunPod's handling (refused, throttled, no connection).
    not_processed: bool,
    /// A transient failure an idempotent call may repeat.
    transient: bool,
    retry_after: Option<Duration>,
}

impl HttpRunPod {
    /// `http` is built once per process and shared, so connections are reused across
    /// invocations of a warm Lambda.
    pub fn new(http: reqwest::Client, config: &RunPodConfig) -> Self {
        Self {
            http,
            base: format!("{}/v2/{}", config.api_base, config.endpoint_id),
            api_key: config.api_key.clone(),
            retry: config.retry,
            request_timeout: config.request_timeout,
            cancels: Arc::new(CancelPace::new(config.cancels_per_second)),
            max_body: gateway::config::DEFAULT_MAX_STATUS_BYTES,
            statuses: None,
        }
    }

    /// Starts no more than `per_second` `/status` calls a second, across every clone.
    pub fn with_status_pace(mut self, per_second: u32) -> Self {
        self.statuses = Some(Arc::new(CancelPace::new(per_second)));
        self
    }

    /// Reads no answer longer than `bytes` (`RUNPOD_MAX_STATUS_BYTES`).
    pub fn with_max_body(mut self, bytes: u64) -> Self {
        self.max_body = bytes;
        self
    }

    /// Sends the request built by `request` under the retry policy; returns the body of the
    /// first successful answer.
    async fn call(
        &self,
        kind: Call,
        what: &str,
        request: impl Fn() -> reqwest::RequestBuilder,
    ) -> Result<bytes::Bytes, RunPodError> {
        let started = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let failure = match self.attempt(request()).await {
                Ok(body) => return Ok(body),
                Err(failure) => failure,
            };
            let may_repeat = match kind {
                Call::Idempotent => failure.transient,
                Call::Submit => failure.not_processed,
            };
            let delay = may_repeat
                .then(|| {
                    self.retry.next_delay(
                        attempts,
                        started.elapsed(),
                        self.request_timeout,
                        failure.retry_after,
                        rand::random::<f64>(),
                    )
                })
                .flatten();
            let Some(delay) = delay else {
                return Err(match (kind, failure.error) {
                    (Call::Submit, RunPodError::Transient(reason)) if !failure.not_processed => {
                        RunPodError::Unknown(reason)
                    }
                    // RunPod answered /run, so it may well have taken the job.
                    (Call::Submit, error @ RunPodError::TooLarge { .. }) => {
                        RunPodError::Unknown(error.to_string())
                    }
                    (_, error) => error,
                });
            };
            tracing::warn!(
                call = what,
                attempt = attempts,
                error = %failure.error,
                retry_in_ms = delay.as_millis() as u64,
                "RunPod call failed; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(&self, request: reqwest::RequestBuilder) -> Result<bytes::Bytes, Failure> {
        let response = match request.bearer_auth(&self.api_key).send().await {
            Ok(response) => response,
            Err(err) => {
                return Err(Failure {
                    not_processed: err.is_connect(),
                    transient: true,
                    retry_after: None,
                    error: RunPodError::Transient(without_url(err)),
                })
            }
        };
        let status = response.status();
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        if status.is_success() {
            return self.read_at_most(response).await;
        }
        let body = response.text().await.unwrap_or_default();
        let message: String = body.chars().take(300).collect();
        let not_processed = matches!(
            status,
            StatusCode::TOO_MANY_REQUESTS
                | StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::REQUEST_TIMEOUT
        );
        let transient = not_processed || status.is_server_error();
        let error = match status {
            StatusCode::NOT_FOUND => RunPodError::NotFound,
            _ if transient => RunPodError::Transient(format!("{status}: {message}")),
            s => RunPodError::Permanent {
                status: s.as_u16(),
                message,
            },
        };
        Err(Failure {
            error,
            not_processed,
            transient,
            retry_after,
        })
    }
}

impl HttpRunPod {
    /// The answer's body, read no further than `max_body`: a longer one is refused as soon as
    /// its declared length or its bytes so far say so, and what was read is dropped.
    async fn read_at_most(&self, mut response: reqwest::Response) -> Result<bytes::Bytes, Failure> {
        let too_large = || Failure {
            not_processed: false,
            transient: false,
            retry_after: None,
            error: RunPodError::TooLarge {
                limit: self.max_body,
            },
        };
        if response
            .content_length()
            .is_some_and(|length| length > self.max_body)
        {
            return Err(too_large());
        }
        let capacity = response.content_length().unwrap_or(0) as usize;
        let mut body = bytes::BytesMut::with_capacity(capacity);
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if (body.len() + chunk.len()) as u64 > self.max_body {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body.freeze()),
                Err(err) => {
                    return Err(Failure {
                        not_processed: false,
                        transient: true,
                        retry_after: None,
                        error: RunPodError::Transient(without_url(err)),
                    })
                }
            }
        }
    }
}

/// reqwest errors print the URL; ours carry nothing secret, but keep logs short and stable.
fn without_url(err: reqwest::Error) -> String {
    err.without_url().to_string()
}

/// The shared HTTP client for RunPod calls: rustls, bounded timeouts.
pub fn http_client(config: &RunPodConfig) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(config.request_timeout)
        .pool_idle_timeout(std::time::Duration::from_secs(60))
        .build()
}

fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, RunPodError> {
    serde_json::from_slice(body)
        .map_err(|e| RunPodError::Transient(format!("unreadable answer from RunPod: {e}")))
}

#[async_trait]
impl RunPod for HttpRunPod {
    async fn run(&self, request: &RunRequest) -> Result<String, RunPodError> {
        let url = format!("{}/run", self.base);
        let body = self
            .call(Call::Submit, "run", || self.http.post(&url).json(request))
            .await?;
        let parsed = serde_json::from_slice::<RunPodStatus>(&body)
            .ok()
            .and_then(|status| status.id);
        parsed
            .or_else(|| lenient_id(&body))
            .filter(|id| !id.is_empty())
            .ok_or_else(|| {
                RunPodError::Unknown(format!(
                    "RunPod answered 200 without a readable id: {}",
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ))
            })
    }

    async fn status(&self, runpod_job_id: &str) -> Result<RunPodStatus, RunPodError> {
        if let Some(pace) = &self.statuses {
            // A sweep's own calls queue here; the retry budget bounds the wait, as for cancels.
            pace.turn(self.retry.budget).await?;
        }
        let url = format!("{}/status/{}", self.base, urlencode(runpod_job_id));
        let body = self
            .call(Call::Idempotent, "status", || self.http.get(&url))
            .await?;
        decode(&body)
    }

    async fn cancel(&self, runpod_job_id: &str) -> Result<(), RunPodError> {
        self.cancels.turn(self.retry.budget).await?;
        let url = format!("{}/cancel/{}", self.base, urlencode(runpod_job_id));
        self.call(Call::Idempotent, "cancel", || self.http.post(&url))
            .await
            .map(|_| ())
    }
}

/// The `"id": "…"` of a body that is not the JSON expected (cut off, extra text around it).
fn lenient_id(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let after = &text[text.find("\"id\"")? + 4..];
    let value = after
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let id: String = value.chars().take_while(|c| *c != '"').collect();
    (value.len() > id.len()
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
    .then_some(id)
}

fn urlencode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::extract::State;
    use axum::http::StatusCode as Code;
    use axum::routing::{get, post};

    use super::*;
    use gateway::domain::retry::Backoff;

    type Statuses = Arc<Mutex<Vec<u16>>>;

    /// A RunPod stand-in answering each request with the next status of `script` (then 200),
    /// counting requests.
    async fn scripted(script: Vec<u16>) -> (HttpRunPod, Statuses) {
        let remaining = Arc::new(Mutex::new(script));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let state = (remaining, seen.clone());
        async fn answer(State((remaining, seen)): State<(Statuses, Statuses)>) -> (Code, String) {
            let next = {
                let mut remaining = remaining.lock().unwrap();
                if remaining.is_empty() {
                    200
                } else {
                    remaining.remove(0)
                }
            };
            seen.lock().unwrap().push(next);
            let body = if next == 200 {
                r#"{"id":"rp-1","status":"IN_QUEUE"}"#.to_string()
            } else {
                "nope".to_string()
            };
            (Code::from_u16(next).unwrap(), body)
        }
        let app = axum::Router::new()
            .route("/v2/ep/run", post(answer))
            .route("/v2/ep/status/{id}", get(answer))
            .route("/v2/ep/cancel/{id}", post(answer))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = test_config(base, 3);
        let runpod = HttpRunPod::new(http_client(&config).unwrap(), &config);
        (runpod, seen)
    }

    /// A client of the RunPod stand-in at `base`, making up to `attempts` attempts a call.
    fn test_config(base: String, attempts: u32) -> RunPodConfig {
        RunPodConfig {
            api_base: base,
            endpoint_id: "ep".into(),
            api_key: "k".into(),
            request_timeout: Duration::from_secs(2),
            retry: RetryPolicy {
                max_attempts: attempts,
                backoff: Backoff {
                    base: Duration::from_millis(5),
                    cap: Duration::from_millis(20),
                },
                budget: Duration::from_secs(10),
            },
            cancels_per_second: 4,
        }
    }

    #[tokio::test]
    async fn cancels_are_spaced_at_the_configured_rate_across_clones() {
        let (runpod, seen) = scripted(vec![]).await;
        let other = runpod.clone();
        let started = Instant::now();

        let (a, b, c) = tokio::join!(runpod.cancel("a"), other.cancel("b"), runpod.cancel("c"));

        assert!(a.is_ok() && b.is_ok() && c.is_ok());
        assert_eq!(seen.lock().unwrap().len(), 3);
        // At 4 per second the third starts 2 × 250 ms after the first, however fast the machine.
        assert!(
            started.elapsed() >= Duration::from_millis(500),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn a_cancel_whose_turn_is_beyond_the_budget_is_refused_as_transient() {
        let pace = CancelPace::new(1);
        pace.turn(Duration::from_secs(5)).await.unwrap();
        pace.turn(Duration::from_secs(5)).await.unwrap();
        // The next turn is a second off: more than a 500 ms budget.
        assert!(matches!(
            pace.turn(Duration::from_millis(500)).await,
            Err(RunPodError::Transient(_))
        ));
    }

    fn run_request() -> RunRequest {
        RunRequest {
            input: serde_json::json!({}),
            webhook: None,
            policy: gateway::ports::RunPolicy {
                execution_timeout: 1,
                ttl: 1,
                low_priority: false,
            },
        }
    }

    #[tokio::test]
    async fn an_answer_longer_than_the_cap_is_refused_at_once_and_not_retried() {
        let (runpod, seen) = scripted(vec![]).await;
        let runpod = runpod.with_max_body(10);

        let answer = runpod.status("x").await;

        assert!(
            matches!(answer, Err(RunPodError::TooLarge { limit: 10 })),
            "{answer:?}"
        );
        assert_eq!(*seen.lock().unwrap(), [200], "asked once");
    }

    #[tokio::test]
    async fn a_run_answer_longer_than_the_cap_may_have_started_the_job() {
        let (runpod, _) = scripted(vec![]).await;
        let runpod = runpod.with_max_body(10);

        let answer = runpod.run(&run_request()).await;

        assert!(matches!(answer, Err(RunPodError::Unknown(_))), "{answer:?}");
    }

    #[tokio::test]
    async fn an_answer_of_undeclared_length_is_cut_off_at_the_cap() {
        // Chunked, with no Content-Length: the cap is met while reading.
        let app = axum::Router::new().route(
            "/v2/ep/status/{id}",
            get(|| async {
                let chunks = (0..8).map(|_| Ok::<_, std::io::Error>(vec![b' '; 1024]));
                axum::body::Body::from_stream(futures::stream::iter(chunks))
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let config = test_config(base, 1);
        let runpod = HttpRunPod::new(http_client(&config).unwrap(), &config).with_max_body(4096);

        let answer = runpod.status("x").await;

        assert!(
            matches!(answer, Err(RunPodError::TooLarge { limit: 4096 })),
            "{answer:?}"
        );
    }

    #[tokio::test]
    async fn status_is_retried_through_server_errors() {
        let (runpod, seen) = scripted(vec![500, 502]).await;
        assert_eq!(
            runpod.status("x").await.unwrap().id.as_deref(),
            Some("rp-1")
        );
        assert_eq!(*seen.lock().unwrap(), [500, 502, 200]);
    }

    #[tokio::test]
    async fn retries_stop_at_the_attempt_limit() {
        let (runpod, seen) = scripted(vec![503, 503, 503, 503]).await;
        assert!(matches!(
            runpod.cancel("x").await,
            Err(RunPodError::Transient(_))
        ));
        assert_eq!(seen.lock().unwrap().len(), 3);
    }

    #[tokio::test]
    async fn run_is_retried_only_when_runpod_cannot_have_taken_it() {
        let (runpod, seen) = scripted(vec![429, 503]).await;
        assert_eq!(runpod.run(&run_request()).await.unwrap(), "rp-1");
        assert_eq!(*seen.lock().unwrap(), [429, 503, 200]);

        // A 500, 502 or 504 may have created the job: handed back at once as unknown.
        for code in [500, 502, 504] {
            let (runpod, seen) = scripted(vec![code]).await;
            assert!(matches!(
                runpod.run(&run_request()).await,
                Err(RunPodError::Unknown(_))
            ));
            assert_eq!(*seen.lock().unwrap(), [code]);
        }
    }

    #[test]
    fn an_odd_accepted_answer_is_read_leniently_for_the_id() {
        assert_eq!(
            lenient_id(br#"{"id": "abc-123-e1", "status": "IN_QUE"#).as_deref(),
            Some("abc-123-e1")
        );
        assert_eq!(
            lenient_id(b"garbage {\"id\":\"x9\"} more").as_deref(),
            Some("x9")
        );
        assert_eq!(
            lenient_id(br#"{"id": "cut-off"#),
            None,
            "an id cut short is no id"
        );
        assert_eq!(lenient_id(b"<html>502</html>"), None);
        assert_eq!(lenient_id(br#"{"id": "a b"}"#), None);
    }

    #[tokio::test]
    async fn final_answers_are_not_retried() {
        let (runpod, seen) = scripted(vec![404]).await;
        assert!(matches!(
            runpod.status("x").await,
            Err(RunPodError::NotFound)
        ));
        let (runpod2, seen2) = scripted(vec![400]).await;
        assert!(matches!(
            runpod2.run(&run_request()).await,
            Err(RunPodError::Permanent { status: 400, .. })
        ));
        assert_eq!(seen.lock().unwrap().len(), 1);
        assert_eq!(seen2.lock().unwrap().len(), 1);
    }
}
