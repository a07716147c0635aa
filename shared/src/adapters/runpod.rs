//! The RunPod serverless endpoint API over HTTPS (`/v2/{endpoint}/run`, `/status`, `/cancel`).
use async_trait::async_trait;
use reqwest::StatusCode;

use crate::config::RunPodConfig;
use crate::ports::{RunPod, RunPodError, RunPodStatus, RunRequest};

#[derive(Clone)]
pub struct HttpRunPod {
    http: reqwest::Client,
    base: String,
    api_key: String,
}

impl HttpRunPod {
    /// `http` is built once per process and shared, so connections are reused across
    /// invocations of a warm Lambda.
    pub fn new(http: reqwest::Client, config: &RunPodConfig) -> Self {
        Self {
            http,
            base: format!("{}/v2/{}", config.api_base, config.endpoint_id),
            api_key: config.api_key.clone(),
        }
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, RunPodError> {
        let response = request
            .bearer_auth(&self.api_key)
            .send()
            .await
            .map_err(|e| RunPodError::Transient(without_url(e)))?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        let message: String = body.chars().take(300).collect();
        Err(match status {
            StatusCode::NOT_FOUND => RunPodError::NotFound,
            StatusCode::TOO_MANY_REQUESTS | StatusCode::REQUEST_TIMEOUT => {
                RunPodError::Transient(format!("{status}: {message}"))
            }
            s if s.is_server_error() => RunPodError::Transient(format!("{status}: {message}")),
            s => RunPodError::Permanent {
                status: s.as_u16(),
                message,
            },
        })
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

#[async_trait]
impl RunPod for HttpRunPod {
    async fn run(&self, request: &RunRequest) -> Result<String, RunPodError> {
        let response = self
            .send(self.http.post(format!("{}/run", self.base)).json(request))
            .await?;
        let status: RunPodStatus = response
            .json()
            .await
            .map_err(|e| RunPodError::Transient(without_url(e)))?;
        status
            .id
            .filter(|id| !id.is_empty())
            .ok_or_else(|| RunPodError::Permanent {
                status: 200,
                message: "RunPod accepted the job but returned no id".into(),
            })
    }

    async fn status(&self, runpod_job_id: &str) -> Result<RunPodStatus, RunPodError> {
        let response = self
            .send(
                self.http
                    .get(format!("{}/status/{}", self.base, urlencode(runpod_job_id))),
            )
            .await?;
        response
            .json()
            .await
            .map_err(|e| RunPodError::Transient(without_url(e)))
    }

    async fn cancel(&self, runpod_job_id: &str) -> Result<(), RunPodError> {
        self.send(
            self.http
                .post(format!("{}/cancel/{}", self.base, urlencode(runpod_job_id))),
        )
        .await
        .map(|_| ())
    }
}

fn urlencode(segment: &str) -> String {
    url::form_urlencoded::byte_serialize(segment.as_bytes()).collect()
}
