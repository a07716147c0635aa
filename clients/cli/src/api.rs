//! The gateway's public API over HTTP, and the presigned transfers it hands out. Every answer is
//! read as text first, so a body that is not JSON is a [`Failure`], never a panic.

use std::path::Path;
use std::time::Duration;

use reqwest::multipart::{Form, Part};
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use url::Url;

use crate::failure::Failure;

/// How long an API call may take. Uploads and downloads have no overall limit (a large photo
/// on a slow line takes what it takes); a stalled connection still ends at the read timeout.
const API_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// How much of an unreadable body an error message quotes.
const QUOTE_CHARS: usize = 200;

pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: String,
}

impl Client {
    pub fn new(base: Url, token: impl Into<String>) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("gateway-cli/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|e| Failure::Io(format!("cannot set up HTTP: {}", describe(&e))))?;
        Ok(Self {
            http,
            base,
            token: token.into(),
        })
    }

    /// The base URL with `segments` appended, each percent-encoded as one segment: an id
    /// holding `/` or `?` stays an id. A base with a path (an API Gateway stage) keeps it.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> Result<Value, Failure> {
        let response = request
            .bearer_auth(&self.token)
            .timeout(API_TIMEOUT)
            .send()
            .await
            .map_err(|e| Failure::Unreachable(describe(&e)))?;
        let status = response.status().as_u16();
        let body = response
            .text()
            .await
            .map_err(|e| Failure::Unreachable(describe(&e)))?;
        read_answer(status, &body)
    }

    pub async fn create_job(
        &self,
        body: &Value,
        idempotency_key: Option<&str>,
    ) -> Result<Value, Failure> {
        let mut request = self.http.post(self.url(&["jobs"])).json(body);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        self.call(request).await
    }

    pub async fn create_upload(&self, content_type: &str) -> Result<Value, Failure> {
        let body = serde_json::json!({ "content_type": content_type });
        self.call(self.http.post(self.url(&["uploads"])).json(&body))
            .await
    }

    pub async fn job(&self, id: &str) -> Result<Value, Failure> {
        self.call(self.http.get(self.url(&["jobs", id]))).await
    }

    pub async fn jobs(
        &self,
        status: Option<&str>,
        limit: Option<u32>,
        cursor: Option<&str>,
    ) -> Result<Value, Failure> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(status) = status {
            query.push(("status", status.to_string()));
        }
        if let Some(limit) = limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(cursor) = cursor {
            query.push(("cursor", cursor.to_string()));
        }
        self.call(self.http.get(self.url(&["jobs"])).query(&query))
            .await
    }

    pub async fn cancel(&self, id: &str) -> Result<Value, Failure> {
        self.call(self.http.post(self.url(&["jobs", id, "cancel"])))
            .await
    }

    pub async fn delete(&self, id: &str) -> Result<Value, Failure> {
        self.call(self.http.delete(self.url(&["jobs", id]))).await
    }

    pub async fn usage(&self, from: &str, to: &str) -> Result<Value, Failure> {
        self.call(
            self.http
                .get(self.url(&["usage"]))
                .query(&[("from", from), ("to", to)]),
        )
        .await
    }

    pub async fn workflows(&self) -> Result<Value, Failure> {
        self.call(self.http.get(self.url(&["workflows"]))).await
    }

    pub async fn deliveries(&self, id: &str) -> Result<Value, Failure> {
        self.call(self.http.get(self.url(&["jobs", id, "deliveries"])))
            .await
    }

    pub async fn redeliver(&self, id: &str, delivery: &str) -> Result<Value, Failure> {
        self.call(
            self.http
                .post(self.url(&["jobs", id, "deliveries", delivery, "redeliver"])),
        )
        .await
    }

    /// Sends the file to a `POST /uploads` answer's URL as S3's browser form expects: every
    /// signed field in the order given, then the file as the last field, `file`. No bearer
    /// token: the signature is the authorization, and S3 refuses a request carrying both.
    pub async fn upload(
        &self,
        upload: &Value,
        path: &Path,
        content_type: &str,
    ) -> Result<(), Failure> {
        let url = upload["url"].as_str().ok_or_else(|| missing("url"))?;
        let fields = upload["fields"]
            .as_array()
            .ok_or_else(|| missing("fields"))?;
        let mut form = Form::new();
        for field in fields {
            let (Some(name), Some(value)) = (field["name"].as_str(), field["value"].as_str())
            else {
                return Err(missing("fields[].name/value"));
            };
            form = form.text(name.to_string(), value.to_string());
        }
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|e| Failure::Io(format!("cannot read {}: {e}", path.display())))?;
        let len = file
            .metadata()
            .await
            .map_err(|e| Failure::Io(format!("cannot read {}: {e}", path.display())))?
            .len();
        let part = Part::stream_with_length(file, len)
            .file_name("photo")
            .mime_str(content_type)
            .map_err(|e| Failure::Usage(format!("content type {content_type}: {e}")))?;
        let response = self
            .http
            .post(url)
            .multipart(form.part("file", part))
            .send()
            .await
            .map_err(|e| Failure::Unreachable(describe(&e.without_url())))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let body = response.text().await.unwrap_or_default();
        Err(Failure::Storage(format!(
            "the upload was refused (HTTP {}): {}",
            status.as_u16(),
            storage_error(&body)
        )))
    }

    /// Downloads a presigned output URL into `to`, through a `.part` file renamed at the end,
    /// so an interrupted download never leaves what looks like a whole file. Returns the size.
    pub async fn download(&self, url: &str, to: &Path) -> Result<u64, Failure> {
        let mut response = self
            .http
            .get(url)
            .send()
            .await
            // The URL's query is a signature: it stays out of messages.
            .map_err(|e| Failure::Unreachable(describe(&e.without_url())))?;
        let status = response.status();
        if !status.is_success() {
            let body = response.text().await.unwrap_or_default();
            return Err(Failure::Storage(format!(
                "the download of {} was refused (HTTP {}): {}",
                to.display(),
                status.as_u16(),
                storage_error(&body)
            )));
        }
        let partial = partial_path(to);
        let io =
            |e: std::io::Error| Failure::Io(format!("cannot write {}: {e}", partial.display()));
        let mut file = tokio::fs::File::create(&partial).await.map_err(io)?;
        let mut size = 0u64;
        let written: Result<(), Failure> = async {
            while let Some(chunk) = response
                .chunk()
                .await
                .map_err(|e| Failure::Unreachable(describe(&e.without_url())))?
            {
                file.write_all(&chunk).await.map_err(io)?;
                size += chunk.len() as u64;
            }
            file.flush().await.map_err(io)?;
            Ok(())
        }
        .await;
        drop(file);
        if let Err(failure) = written {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(failure);
        }
        tokio::fs::rename(&partial, to).await.map_err(|e| {
            Failure::Io(format!("cannot move {} into place: {e}", partial.display()))
        })?;
        Ok(size)
    }
}

fn partial_path(to: &Path) -> std::path::PathBuf {
    let name = to
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    to.with_file_name(format!(".{name}.part"))
}

fn missing(field: &str) -> Failure {
    Failure::BadAnswer {
        status: None,
        detail: format!("the upload answer has no {field}"),
    }
}

/// An API answer: the body of a 2xx, or the refusal its error body names. Anything else, a
/// body that is not JSON above all (a proxy's HTML page, a cut-off answer), is a bad answer.
pub fn read_answer(status: u16, body: &str) -> Result<Value, Failure> {
    let success = (200..300).contains(&status);
    if success && body.trim().is_empty() {
        return Ok(Value::Null);
    }
    let Ok(json) = serde_json::from_str::<Value>(body) else {
        return Err(Failure::BadAnswer {
            status: Some(status),
            detail: format!("the body is not JSON: {}", quote(body)),
        });
    };
    if success {
        return Ok(json);
    }
    let error = &json["error"];
    match (error["code"].as_str(), error["message"].as_str()) {
        (Some(code), message) => Err(Failure::Api {
            status,
            code: code.to_string(),
            message: message.unwrap_or("").to_string(),
        }),
        (None, _) => Err(Failure::BadAnswer {
            status: Some(status),
            detail: format!("an error without a code: {}", quote(body)),
        }),
    }
}

/// S3's XML error (`<Code>…</Code><Message>…</Message>`) as `Code: Message`, else the body.
pub fn storage_error(body: &str) -> String {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find(&format!("</{name}>"))? + start;
        Some(body[start..end].trim().to_string())
    };
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(message)) => format!("{code}: {message}"),
        (Some(code), None) => code,
        _ if body.trim().is_empty() => "no explanation given".into(),
        _ => quote(body),
    }
}

/// The start of a body, on one line, for an error message.
fn quote(body: &str) -> String {
    let flat: String = body.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.is_empty() {
        return "(empty)".into();
    }
    let mut quoted: String = flat.chars().take(QUOTE_CHARS).collect();
    if flat.chars().count() > QUOTE_CHARS {
        quoted.push('…');
    }
    quoted
}

/// An HTTP error with its causes (`error sending request: connection refused`): reqwest's own
/// text alone rarely says what went wrong.
pub fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::extract::{Request, State};
    use axum::http::StatusCode;
    use axum::response::IntoResponse;
    use axum::routing::{any, post};
    use axum::Router;
    use serde_json::json;
    use std::sync::{Arc, Mutex};

    type Seen = Arc<Mutex<Vec<(String, String, Option<String>, Vec<u8>)>>>;
    type Answer = fn(&str) -> axum::response::Response;

    /// A stand-in gateway on loopback that records each request (method, path and query,
    /// Authorization, body) and answers with `answer`.
    async fn serve(answer: Answer) -> (Url, Seen) {
        let seen: Seen = Arc::default();
        async fn record(
            State((seen, answer)): State<(Seen, Answer)>,
            request: Request,
        ) -> axum::response::Response {
            let method = request.method().to_string();
            let uri = request.uri().to_string();
            let auth = request
                .headers()
                .get("authorization")
                .map(|v| v.to_str().unwrap().to_string());
            let body = axum::body::to_bytes(request.into_body(), usize::MAX)
                .await
                .unwrap()
                .to_vec();
            seen.lock()
                .unwrap()
                .push((method.clone(), uri.clone(), auth, body));
            answer(&uri)
        }
        let app = Router::new()
            .route("/{*path}", any(record))
            .route("/", post(record))
            .with_state((seen.clone(), answer));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, seen)
    }

    fn ok_json(_: &str) -> axum::response::Response {
        axum::Json(json!({"job_id": "j1", "status": "queued"})).into_response()
    }

    #[tokio::test]
    async fn the_token_goes_as_a_bearer_and_an_id_stays_one_path_segment() {
        let (url, seen) = serve(ok_json).await;
        let client = Client::new(url, "secret-token").unwrap();
        let job = client.job("a/b?c").await.unwrap();
        assert_eq!(job["job_id"], "j1");
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].0, "GET");
        assert_eq!(seen[0].1, "/jobs/a%2Fb%3Fc");
        assert_eq!(seen[0].2.as_deref(), Some("Bearer secret-token"));
    }

    #[tokio::test]
    async fn a_base_url_with_a_stage_path_keeps_it() {
        let client = Client::new(Url::parse("https://api.example/prod/").unwrap(), "t").unwrap();
        assert_eq!(
            client.url(&["jobs", "x", "cancel"]).as_str(),
            "https://api.example/prod/jobs/x/cancel"
        );
        let client = Client::new(Url::parse("https://api.example/prod").unwrap(), "t").unwrap();
        assert_eq!(
            client.url(&["usage"]).as_str(),
            "https://api.example/prod/usage"
        );
    }

    #[tokio::test]
    async fn list_filters_and_usage_ranges_go_in_the_query() {
        let (url, seen) = serve(ok_json).await;
        let client = Client::new(url, "t").unwrap();
        client
            .jobs(Some("running"), Some(5), Some("c&d"))
            .await
            .unwrap();
        client.usage("2026-01-01", "2026-01-31").await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].1, "/jobs?status=running&limit=5&cursor=c%26d");
        assert_eq!(seen[1].1, "/usage?from=2026-01-01&to=2026-01-31");
    }

    #[tokio::test]
    async fn the_idempotency_key_and_the_job_go_with_post_jobs() {
        let (url, seen) = serve(ok_json).await;
        let client = Client::new(url, "t").unwrap();
        let body = json!({"workflow": "restore", "input": {"image_base64": "aGk="}});
        client.create_job(&body, Some("key-1")).await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen[0].1, "/jobs");
        assert_eq!(serde_json::from_slice::<Value>(&seen[0].3).unwrap(), body);
    }

    #[tokio::test]
    async fn a_refusal_becomes_its_code_and_message() {
        let (url, _) = serve(|_| {
            (
                StatusCode::NOT_FOUND,
                axum::Json(json!({"error": {"code": "not_found", "message": "no such route"}})),
            )
                .into_response()
        })
        .await;
        let client = Client::new(url, "t").unwrap();
        assert_eq!(
            client.deliveries("j1").await.unwrap_err(),
            Failure::Api {
                status: 404,
                code: "not_found".into(),
                message: "no such route".into()
            }
        );
    }

    #[tokio::test]
    async fn a_body_that_is_not_json_is_a_bad_answer_not_a_panic() {
        let (url, _) = serve(|_| {
            (
                StatusCode::BAD_GATEWAY,
                "<html><body>Bad Gateway</body></html>",
            )
                .into_response()
        })
        .await;
        let client = Client::new(url, "t").unwrap();
        let failure = client.workflows().await.unwrap_err();
        assert!(
            matches!(
                &failure,
                Failure::BadAnswer {
                    status: Some(502),
                    ..
                }
            ),
            "{failure:?}"
        );
        assert!(failure.to_string().contains("Bad Gateway"), "{failure}");
        assert!(failure.is_transient());
    }

    #[tokio::test]
    async fn a_gateway_not_listening_is_unreachable() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = Url::parse(&format!("http://{}", listener.local_addr().unwrap())).unwrap();
        drop(listener);
        let failure = Client::new(url, "t").unwrap().job("j").await.unwrap_err();
        assert!(matches!(failure, Failure::Unreachable(_)), "{failure:?}");
        assert_eq!(failure.exit_code(), 1);
    }

    #[test]
    fn answers_are_read_whatever_their_shape() {
        assert_eq!(
            read_answer(200, "{\"ok\":true}").unwrap(),
            json!({"ok": true})
        );
        assert_eq!(read_answer(204, "").unwrap(), Value::Null);
        assert!(matches!(
            read_answer(200, "{\"ok\":"),
            Err(Failure::BadAnswer {
                status: Some(200),
                ..
            })
        ));
        assert!(matches!(
            read_answer(500, "{\"message\":\"Internal Server Error\"}"),
            Err(Failure::BadAnswer {
                status: Some(500),
                ..
            })
        ));
        assert!(matches!(
            read_answer(400, "{\"error\":{\"code\":\"invalid_params\"}}"),
            Err(Failure::Api { status: 400, .. })
        ));
        let long = "x".repeat(10_000);
        let failure = read_answer(502, &long).unwrap_err().to_string();
        assert!(failure.len() < 400, "{failure}");
    }

    #[tokio::test]
    async fn an_upload_sends_every_field_in_order_then_the_file_last_without_the_token() {
        let (url, seen) = serve(|_| StatusCode::NO_CONTENT.into_response()).await;
        let client = Client::new(url.clone(), "t").unwrap();
        let dir = std::env::temp_dir().join(format!("gateway-cli-upload-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let photo = dir.join("photo.png");
        std::fs::write(&photo, b"\x89PNG\r\n\x1a\nPIXELS").unwrap();
        let upload = json!({
            "upload_id": "u1",
            "url": url.join("bucket").unwrap().to_string(),
            "fields": [
                {"name": "key", "value": "uploads/alice/u1"},
                {"name": "Content-Type", "value": "image/png"},
                {"name": "policy", "value": "cG9saWN5"},
                {"name": "x-amz-signature", "value": "abc"}
            ]
        });
        client.upload(&upload, &photo, "image/png").await.unwrap();
        let seen = seen.lock().unwrap();
        let (_, path, auth, body) = &seen[0];
        assert_eq!(path, "/bucket");
        assert_eq!(auth, &None);
        let body = String::from_utf8_lossy(body);
        let at = |needle: &str| {
            body.find(needle)
                .unwrap_or_else(|| panic!("{needle} missing"))
        };
        let order = [
            at("name=\"key\""),
            at("name=\"Content-Type\""),
            at("name=\"policy\""),
            at("name=\"x-amz-signature\""),
            at("name=\"file\""),
            at("PIXELS"),
        ];
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{body}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_storage_refusal_names_s3s_code_and_message() {
        let (url, _) = serve(|_| {
            (
                StatusCode::BAD_REQUEST,
                "<?xml version=\"1.0\"?><Error><Code>EntityTooLarge</Code><Message>Your proposed upload exceeds the maximum allowed size</Message></Error>",
            )
                .into_response()
        })
        .await;
        let client = Client::new(url.clone(), "t").unwrap();
        let dir = std::env::temp_dir().join(format!("gateway-cli-refused-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let photo = dir.join("photo.jpg");
        std::fs::write(&photo, [0xFF, 0xD8, 0xFF, 0xE0]).unwrap();
        let upload = json!({"url": url.join("bucket").unwrap().to_string(), "fields": []});
        let failure = client
            .upload(&upload, &photo, "image/jpeg")
            .await
            .unwrap_err();
        assert_eq!(
            failure.to_string(),
            "storage: the upload was refused (HTTP 400): EntityTooLarge: Your proposed upload exceeds the maximum allowed size"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_download_lands_whole_or_not_at_all() {
        let (url, _) = serve(|uri| {
            if uri.starts_with("/ok") {
                (StatusCode::OK, "IMAGE BYTES").into_response()
            } else {
                (StatusCode::FORBIDDEN, "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>").into_response()
            }
        })
        .await;
        let client = Client::new(url.clone(), "t").unwrap();
        let dir = std::env::temp_dir().join(format!("gateway-cli-dl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let to = dir.join("restored.png");
        let size = client
            .download(url.join("ok?X-Amz-Signature=s").unwrap().as_str(), &to)
            .await
            .unwrap();
        assert_eq!(size, 11);
        assert_eq!(std::fs::read(&to).unwrap(), b"IMAGE BYTES");
        let expired = dir.join("expired.png");
        let failure = client
            .download(
                url.join("gone?X-Amz-Signature=s").unwrap().as_str(),
                &expired,
            )
            .await
            .unwrap_err();
        assert!(failure
            .to_string()
            .contains("AccessDenied: Request has expired"));
        assert!(
            !failure.to_string().contains("X-Amz-Signature"),
            "{failure}"
        );
        assert!(!expired.exists());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
