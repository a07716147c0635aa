//! Downloads by URL over reqwest: worker outputs named by URL (worker-comfyui's `s3_url`
//! images, whose URL the caller checked against the allow-list), and inputs a client named,
//! fetched only from the address the egress rules checked. Redirects are refused (a redirect
//! could lead anywhere) and every wait is bounded.
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use gateway::domain::egress::Destination;
use gateway::ports::{FetchError, Fetched, ObjectError, Resolver, UrlFetcher};

/// The system's resolver (getaddrinfo through tokio): what the egress checks judge.
pub struct SystemResolver;

#[async_trait]
impl Resolver for SystemResolver {
    async fn resolve(&self, host: &str, port: u16) -> Result<Vec<std::net::SocketAddr>, String> {
        match tokio::net::lookup_host((host, port)).await {
            Ok(addresses) => Ok(addresses.collect()),
            Err(err) => Err(err.to_string()),
        }
    }
}

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
        Self::builder().build()
    }

    fn builder() -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            // The environment's proxy must not carry a request the egress rules judged.
            .no_proxy()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(30))
            .timeout(Duration::from_secs(300))
    }
}

#[async_trait]
impl UrlFetcher for HttpFetcher {
    async fn open(&self, url: &url::Url) -> Result<Fetched, FetchError> {
        get(&self.http, url).await
    }

    async fn open_at(&self, url: &url::Url, to: &Destination) -> Result<Fetched, FetchError> {
        // A client of its own, whose only answer for the host is the address checked: the
        // connection cannot go where a second resolution would send it. TLS still checks the
        // certificate against the host's name.
        let http = Self::builder()
            .resolve(&to.host, to.address)
            .build()
            .map_err(|e| FetchError::Transient(e.to_string()))?;
        get(&http, url).await
    }
}

async fn get(http: &reqwest::Client, url: &url::Url) -> Result<Fetched, FetchError> {
    let response = http
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
    Ok(fetched(response))
}

/// A 2xx answer's body as it arrives, with its declared length. A broken stream is transient,
/// and its error names no URL (it may carry a presigned signature).
pub fn fetched(response: reqwest::Response) -> Fetched {
    let size = response.content_length();
    let body = response
        .bytes_stream()
        .map(|chunk| chunk.map_err(|e| ObjectError::Transient(e.without_url().to_string())))
        .boxed();
    Fetched { size, body }
}
