//! Sends client callbacks over reqwest: a POST to the one address the egress rules checked
//! (the client is pinned to it; TLS still checks the certificate for the URL's host), no
//! redirect followed (a redirect is a failure, as the Standard Webhooks spec says), no proxy,
//! and a bounded wait.
use std::time::Duration;

use async_trait::async_trait;

use gateway::domain::callback::AttemptResult;
use gateway::domain::egress::Destination;
use gateway::ports::CallbackSender;

/// The spec's advice: time out after 15 to 30 seconds.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_secs(15);

pub struct HttpCallbackSender {
    timeout: Duration,
}

impl Default for HttpCallbackSender {
    fn default() -> Self {
        Self {
            timeout: CALLBACK_TIMEOUT,
        }
    }
}

impl HttpCallbackSender {
    /// A sender that gives up on an endpoint after `timeout`.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self { timeout }
    }
}

#[async_trait]
impl CallbackSender for HttpCallbackSender {
    async fn post(
        &self,
        url: &url::Url,
        to: &Destination,
        headers: &[(&'static str, String)],
        body: &[u8],
    ) -> AttemptResult {
        let client = match reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .resolve(&to.host, to.address)
            .connect_timeout(Duration::from_secs(5).min(self.timeout))
            .timeout(self.timeout)
            .user_agent("runpod-job-gateway-callbacks/1")
            .build()
        {
            Ok(client) => client,
            Err(err) => return AttemptResult::NoAnswer(err.to_string()),
        };
        let mut request = client.post(url.as_str()).body(body.to_vec());
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = match request.send().await {
            Ok(response) => response,
            // The URL is the client's, but keep it out of the log line all the same.
            Err(err) => return AttemptResult::NoAnswer(err.without_url().to_string()),
        };
        let status = response.status().as_u16();
        match status {
            200..=299 => AttemptResult::Delivered(status),
            410 => AttemptResult::Gone,
            _ => AttemptResult::Refused {
                status,
                retry_after_secs: response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.trim().parse().ok()),
            },
        }
    }
}
