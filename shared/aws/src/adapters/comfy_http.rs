//! A ComfyUI server over its own HTTP API (`ports::ComfyServer`): on a RunPod pod through
//! RunPod's proxy (`https://{pod}-{port}.proxy.runpod.net`), or anywhere else. What the answers
//! mean is decided in `domain::comfy`; this adapter only fetches, in the order that makes the
//! reading sound (the queue before the history).
//!
//! ComfyUI has no authentication. A pod should put a reverse proxy in front of it that checks a
//! bearer token; the adapter sends one when configured. RunPod's proxy closes a request with no
//! answer after 100 s (524), so every call here is bounded well under that.
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde_json::{json, Value};

use gateway::domain::comfy::{self, ComfyFile, PromptState};
use gateway::ports::{ComfyError, ComfyServer, Fetched};

/// Each call's bound, well under the RunPod proxy's 100 s.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Who the gateway says it is in `client_id` (ComfyUI routes websocket events by it; the
/// gateway polls, so it only labels the prompts in the server's queue).
const CLIENT_ID: &str = "runpod-job-gateway";

#[derive(Clone)]
pub struct HttpComfyServer {
    http: reqwest::Client,
    base: url::Url,
    token: Option<String>,
}

impl HttpComfyServer {
    /// A server at `base` (no path: ComfyUI's routes sit at the root), with the bearer token a
    /// proxy in front of it checks, if any.
    pub fn new(base: url::Url, token: Option<String>) -> Result<Self, ComfyError> {
        Self::with_timeout(base, token, REQUEST_TIMEOUT)
    }

    /// [`HttpComfyServer::new`] with each request bounded by `timeout` (keep it well under the
    /// 100 s at which RunPod's proxy cuts a request).
    pub fn with_timeout(
        base: url::Url,
        token: Option<String>,
        timeout: Duration,
    ) -> Result<Self, ComfyError> {
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(5))
            .timeout(timeout)
            .build()
            .map_err(|e| ComfyError::Unavailable(e.to_string()))?;
        Ok(Self { http, base, token })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base.as_str().trim_end_matches('/'))
    }

    fn authorized(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, ComfyError> {
        self.authorized(request)
            .send()
            .await
            .map_err(|e| ComfyError::Unavailable(e.without_url().to_string()))
    }

    /// A JSON answer of a 2xx; a failure's class otherwise.
    async fn json(&self, request: reqwest::RequestBuilder) -> Result<Value, ComfyError> {
        let response = self.send(request).await?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(status_error(status));
        }
        response
            .json()
            .await
            .map_err(|e| ComfyError::BadAnswer(format!("unreadable JSON: {}", e.without_url())))
    }
}

/// A non-2xx answer's class: the proxy's and the server's troubles pass, the rest do not.
fn status_error(status: u16) -> ComfyError {
    match status {
        404 => ComfyError::NotFound,
        408 | 429 | 500..=599 => ComfyError::Unavailable(format!("HTTP {status}")),
        other => ComfyError::BadAnswer(format!("HTTP {other}")),
    }
}

#[async_trait]
impl ComfyServer for HttpComfyServer {
    async fn upload_image(
        &self,
        subfolder: &str,
        name: &str,
        content_type: &str,
        body: Bytes,
    ) -> Result<String, ComfyError> {
        let part = reqwest::multipart::Part::bytes(body.to_vec())
            .file_name(name.to_string())
            .mime_str(content_type)
            .map_err(|e| ComfyError::BadAnswer(format!("content type {content_type}: {e}")))?;
        // No `overwrite`: a name already taken by other bytes is renamed, never replaced.
        let form = reqwest::multipart::Form::new()
            .part("image", part)
            .text("type", "input")
            .text("subfolder", subfolder.to_string());
        let answer = self
            .json(self.http.post(self.url("/upload/image")).multipart(form))
            .await?;
        let stored = answer["name"]
            .as_str()
            .ok_or_else(|| ComfyError::BadAnswer("an upload answer without a name".into()))?;
        Ok(match answer["subfolder"].as_str().unwrap_or_default() {
            "" => stored.to_string(),
            subfolder => format!("{subfolder}/{stored}"),
        })
    }

    async fn queue_prompt(&self, prompt_id: &str, graph: &Value) -> Result<String, ComfyError> {
        let body = json!({"prompt": graph, "prompt_id": prompt_id, "client_id": CLIENT_ID});
        let response = self
            .send(self.http.post(self.url("/prompt")).json(&body))
            .await?;
        let status = response.status().as_u16();
        let answer: Value = response.json().await.unwrap_or(Value::Null);
        match status {
            200 => answer["prompt_id"]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| ComfyError::BadAnswer("a /prompt answer without an id".into())),
            400 => Err(ComfyError::Refused(comfy::refusal_message(&answer))),
            other => Err(status_error(other)),
        }
    }

    async fn prompt_state(&self, prompt_id: &str) -> Result<PromptState, ComfyError> {
        let queue = self.json(self.http.get(self.url("/queue"))).await?;
        if let Some(state) = comfy::in_queue(&queue, prompt_id) {
            return Ok(state);
        }
        let history = self
            .json(self.http.get(self.url(&format!("/history/{prompt_id}"))))
            .await?;
        Ok(comfy::in_history(&history, prompt_id).unwrap_or(PromptState::Unseen))
    }

    async fn view(&self, file: &ComfyFile) -> Result<Fetched, ComfyError> {
        let request = self.http.get(self.url("/view")).query(&[
            ("filename", file.filename.as_str()),
            ("subfolder", file.subfolder.as_str()),
            ("type", file.kind.as_str()),
        ]);
        let response = self.send(request).await?;
        let status = response.status().as_u16();
        if status != 200 {
            return Err(status_error(status));
        }
        Ok(crate::adapters::http_fetch::fetched(response))
    }

    async fn cancel(&self, prompt_id: &str) -> Result<(), ComfyError> {
        // Both, in this order: a pending prompt is removed before it can start, and one that
        // started meanwhile is interrupted. Neither touches another prompt.
        let dequeue = self
            .send(
                self.http
                    .post(self.url("/queue"))
                    .json(&json!({"delete": [prompt_id]})),
            )
            .await?;
        if !dequeue.status().is_success() {
            return Err(status_error(dequeue.status().as_u16()));
        }
        let interrupt = self
            .send(
                self.http
                    .post(self.url("/interrupt"))
                    .json(&json!({"prompt_id": prompt_id})),
            )
            .await?;
        if !interrupt.status().is_success() {
            return Err(status_error(interrupt.status().as_u16()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxys_and_the_servers_troubles_pass_and_the_rest_do_not() {
        assert!(matches!(status_error(524), ComfyError::Unavailable(_)));
        assert!(matches!(status_error(502), ComfyError::Unavailable(_)));
        assert!(matches!(status_error(429), ComfyError::Unavailable(_)));
        assert!(matches!(status_error(404), ComfyError::NotFound));
        assert!(matches!(status_error(401), ComfyError::BadAnswer(_)));
    }
}
