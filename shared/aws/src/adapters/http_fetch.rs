//! Downloads of worker outputs named by URL (worker-comfyui's `s3_url` images), over reqwest.
//! The caller has already checked the URL against the allow-list; here redirects are refused (a
//! redirect could leave the allowed hosts) and every wait is bounded.
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use gateway::ports::{FetchError, Fetched, ObjectError, UrlFetcher};

#[derive(Clone)]
pub struct HttpFetcher {
    http: reqwest::Client,
}

impl HttpFetcher {
    pub fn new(http: reqwest::Client) -> Self {
        Self { http }
    }

    /// The client for output downloads: no redirects, bounded connect, idle-read and total
    /// time.
    pub fn client() -> Result<reqwest::Client, reqwest::Error> {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(300))
            .build()
    }
}

#[async_trait]
impl UrlFetcher for HttpFetcher {
    async fn open(&self, url: &url::Url) -> Result<Fetched, FetchError> {
        let response = self
            .http
            .get(url.as_str())
            .send()
            .await
            // The URL may carry a presigned signature: keep it out of errors and logs.
            .map_err(|e| FetchError::Transient(e.without_url().to_string()))?;
        let status = response.status();
        if status.as_u16() == 429 || status.is_server_error() {
            return Err(FetchError::Transient(format!("HTTP {}", status.as_u16())));
        }
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        let size = response.content_length();
        let body = response
            .bytes_stream()
            .map(|chunk| chunk.map_err(|e| ObjectError::Transient(e.without_url().to_string())))
            .boxed();
        Ok(Fetched { size, body })
    }
}
