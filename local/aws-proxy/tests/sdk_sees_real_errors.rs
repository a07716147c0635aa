//! The real AWS SDK clients, pointed at the proxy, see its faults as the real services' errors:
//! the code a caller matches on, the typed error where the SDK models one, and the retry
//! decision the SDK's own classifiers make.
//!
//! No moto: a stub upstream answers the few calls used, and counts them, so a test can tell a
//! request that never left the proxy from one whose answer was lost on the way back.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_config::retry::RetryConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_proxy::{FaultKind, FaultPlan, Options, Proxy};
use aws_sdk_dynamodb::config::http::HttpResponse;
use aws_sdk_dynamodb::config::{Credentials, SharedCredentialsProvider};
use aws_sdk_dynamodb::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::operation::get_item::GetItemError;
use aws_sdk_dynamodb::types::AttributeValue;
use aws_sdk_sqs::operation::send_message::SendMessageError;
use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::HeaderMap;

/// MD5 of "hello", the body every test sends. aws-sdk-sqs does not check it today, but a stub
/// that answers with the right digest stays right if it starts to.
const HELLO_MD5: &str = "5d41402abc4b2a76b9719d911017c592";

async fn stub_answer(
    State(seen): State<Arc<AtomicU64>>,
    headers: HeaderMap,
    _body: Bytes,
) -> Response {
    seen.fetch_add(1, Ordering::SeqCst);
    let json = |body: String| {
        (
            [("content-type", "application/x-amz-json-1.0")],
            body.into_bytes(),
        )
            .into_response()
    };
    let target = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    match target {
        "DynamoDB_20120810.GetItem" | "DynamoDB_20120810.PutItem" => json("{}".into()),
        "AmazonSQS.SendMessage" => json(format!(
            r#"{{"MessageId":"6d1d5c3e-0000-4000-8000-000000000001","MD5OfMessageBody":"{HELLO_MD5}"}}"#
        )),
        "AmazonSQS.ReceiveMessage" => json("{}".into()),
        // S3's PutObject, the only REST call the tests make.
        _ => ([("etag", format!("\"{HELLO_MD5}\""))], "").into_response(),
    }
}

/// A stub upstream with the proxy in front of it.
struct Stack {
    proxy: Proxy,
    upstream_requests: Arc<AtomicU64>,
}

impl Stack {
    async fn new() -> Self {
        let upstream_requests = Arc::new(AtomicU64::new(0));
        let app = axum::Router::new()
            .fallback(stub_answer)
            .with_state(upstream_requests.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = aws_proxy::spawn_with(listener, &upstream, Options::default())
            .await
            .unwrap();
        Stack {
            proxy,
            upstream_requests,
        }
    }

    fn faults(&self, plan: FaultPlan) {
        self.proxy.faults.set(Some(plan)).unwrap();
    }

    fn reached_upstream(&self) -> u64 {
        self.upstream_requests.load(Ordering::SeqCst)
    }

    /// The SDK's standard retry mode with `attempts` tries, and backoffs short enough for a test.
    fn sdk(&self, attempts: u32) -> SdkConfig {
        SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(SharedCredentialsProvider::new(Credentials::new(
                "test", "test", None, None, "test",
            )))
            .endpoint_url(self.proxy.url())
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(attempts)
                    .with_initial_backoff(Duration::from_millis(5))
                    .with_max_backoff(Duration::from_millis(20)),
            )
            .build()
    }

    fn dynamodb(&self, attempts: u32) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.sdk(attempts))
    }

    fn s3(&self, attempts: u32) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::config::Builder::from(&self.sdk(attempts))
            .force_path_style(true)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }

    fn sqs(&self, attempts: u32) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.sdk(attempts))
    }
}

async fn get_item(
    client: &aws_sdk_dynamodb::Client,
) -> Result<
    aws_sdk_dynamodb::operation::get_item::GetItemOutput,
    SdkError<GetItemError, HttpResponse>,
> {
    client
        .get_item()
        .table_name("jobs")
        .key("id", AttributeValue::S("j-1".into()))
        .send()
        .await
}

async fn put_item(
    client: &aws_sdk_dynamodb::Client,
) -> Result<(), SdkError<impl std::error::Error + ProvideErrorMetadata, HttpResponse>> {
    client
        .put_item()
        .table_name("jobs")
        .item("id", AttributeValue::S("j-1".into()))
        .send()
        .await
        .map(|_| ())
}

async fn put_object(
    client: &aws_sdk_s3::Client,
) -> Result<(), SdkError<impl std::error::Error + ProvideErrorMetadata, HttpResponse>> {
    client
        .put_object()
        .bucket("uploads")
        .key("in/hello.txt")
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"hello"))
        .send()
        .await
        .map(|_| ())
}

async fn send_message(
    client: &aws_sdk_sqs::Client,
) -> Result<
    aws_sdk_sqs::operation::send_message::SendMessageOutput,
    SdkError<SendMessageError, HttpResponse>,
> {
    client
        .send_message()
        .queue_url("http://127.0.0.1/000000000000/jobs")
        .message_body("hello")
        .send()
        .await
}

/// The HTTP status and error code the SDK saw.
fn seen<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> (Option<u16>, Option<String>) {
    (
        err.raw_response().map(|r| r.status().as_u16()),
        err.code().map(str::to_string),
    )
}

fn some(status: u16, code: &str) -> (Option<u16>, Option<String>) {
    (Some(status), Some(code.to_string()))
}

#[tokio::test]
async fn a_throttle_is_each_services_own_typed_throttling_error() {
    let stack = Stack::new().await;

    stack.faults(FaultPlan::first_n(1, FaultKind::Throttle));
    let err = get_item(&stack.dynamodb(1)).await.unwrap_err();
    assert_eq!(seen(&err), some(400, "ThrottlingException"));
    assert!(
        matches!(
            err.into_service_error(),
            GetItemError::ThrottlingException(_)
        ),
        "the SDK parsed DynamoDB's modelled error"
    );

    stack.faults(FaultPlan::first_n(1, FaultKind::Throttle));
    let err = put_object(&stack.s3(1)).await.unwrap_err();
    assert_eq!(seen(&err), some(503, "SlowDown"));

    stack.faults(FaultPlan::first_n(1, FaultKind::Throttle));
    let err = send_message(&stack.sqs(1)).await.unwrap_err();
    assert_eq!(seen(&err), some(403, "RequestThrottled"));
    assert!(
        matches!(
            err.into_service_error(),
            SendMessageError::RequestThrottled(_)
        ),
        "the SDK parsed SQS's modelled error"
    );

    assert_eq!(
        stack.reached_upstream(),
        0,
        "a throttled call is not forwarded"
    );
    assert_eq!(stack.proxy.stats.faults().throttle, 3);
    assert_eq!(stack.proxy.stats.requests(), 3);
}

#[tokio::test]
async fn dynamodb_throttles_come_as_both_of_its_throttling_errors() {
    let stack = Stack::new().await;
    stack.faults(FaultPlan::parse("seed=11,throttle=1").unwrap());
    let client = stack.dynamodb(1);
    let mut codes = std::collections::BTreeSet::new();
    for _ in 0..12 {
        let err = get_item(&client).await.unwrap_err();
        codes.insert(err.code().unwrap_or_default().to_string());
        if err.code() == Some("ProvisionedThroughputExceededException") {
            assert!(matches!(
                err.into_service_error(),
                GetItemError::ProvisionedThroughputExceededException(_)
            ));
        }
    }
    assert_eq!(
        codes.into_iter().collect::<Vec<_>>(),
        [
            "ProvisionedThroughputExceededException",
            "ThrottlingException"
        ]
    );
}

/// DynamoDB's throttle is a 400 and SQS's a 403, statuses the SDK never retries by themselves:
/// a retry here is the SDK's error-code classifier recognising a throttling error.
#[tokio::test]
async fn the_sdk_retries_a_throttle_as_throttling_and_gives_up_after_its_attempts() {
    let stack = Stack::new().await;

    stack.faults(FaultPlan::first_n(2, FaultKind::Throttle));
    get_item(&stack.dynamodb(3)).await.expect("third attempt");
    stack.faults(FaultPlan::first_n(2, FaultKind::Throttle));
    put_object(&stack.s3(3)).await.expect("third attempt");
    stack.faults(FaultPlan::first_n(2, FaultKind::Throttle));
    send_message(&stack.sqs(3)).await.expect("third attempt");
    assert_eq!(stack.proxy.stats.faults().throttle, 6);
    assert_eq!(stack.reached_upstream(), 3);

    stack.faults(FaultPlan::first_n(3, FaultKind::Throttle));
    let err = get_item(&stack.dynamodb(3)).await.unwrap_err();
    assert_eq!(err.code(), Some("ThrottlingException"));
    assert_eq!(stack.proxy.stats.faults().throttle, 9, "three attempts");
    assert_eq!(stack.reached_upstream(), 3);
}

#[tokio::test]
async fn a_5xx_is_each_services_server_error_and_is_retried() {
    let stack = Stack::new().await;

    stack.faults(FaultPlan::first_n(1, FaultKind::Error5xx));
    let err = get_item(&stack.dynamodb(1)).await.unwrap_err();
    assert_eq!(seen(&err), some(500, "InternalServerError"));
    assert!(matches!(
        err.into_service_error(),
        GetItemError::InternalServerError(_)
    ));
    stack.faults(FaultPlan::first_n(1, FaultKind::Error5xx));
    let err = put_object(&stack.s3(1)).await.unwrap_err();
    assert_eq!(seen(&err), some(500, "InternalError"));
    stack.faults(FaultPlan::first_n(1, FaultKind::Error5xx));
    let err = send_message(&stack.sqs(1)).await.unwrap_err();
    assert_eq!(seen(&err), some(500, "InternalFailure"));

    stack.faults(FaultPlan::first_n(1, FaultKind::Error5xx));
    get_item(&stack.dynamodb(2)).await.expect("second attempt");
    stack.faults(FaultPlan::first_n(1, FaultKind::Error5xx));
    put_object(&stack.s3(2)).await.expect("second attempt");
    stack.faults(FaultPlan::first_n(1, FaultKind::Error5xx));
    send_message(&stack.sqs(2)).await.expect("second attempt");
    assert_eq!(stack.proxy.stats.faults().error5xx, 6);
    assert_eq!(stack.reached_upstream(), 3);
}

#[tokio::test]
async fn a_drop_is_a_dispatch_failure_not_a_service_error_and_is_retried() {
    let stack = Stack::new().await;

    stack.faults(FaultPlan::first_n(1, FaultKind::Drop));
    let err = get_item(&stack.dynamodb(1)).await.unwrap_err();
    assert!(
        matches!(err, SdkError::DispatchFailure(_)),
        "a connection closed without an answer: {err:?}"
    );
    assert_eq!(err.code(), None);
    stack.faults(FaultPlan::first_n(1, FaultKind::Drop));
    let err = put_object(&stack.s3(1)).await.unwrap_err();
    assert!(matches!(err, SdkError::DispatchFailure(_)), "{err:?}");
    stack.faults(FaultPlan::first_n(1, FaultKind::Drop));
    let err = send_message(&stack.sqs(1)).await.unwrap_err();
    assert!(matches!(err, SdkError::DispatchFailure(_)), "{err:?}");
    assert_eq!(
        stack.reached_upstream(),
        0,
        "a dropped call is not forwarded"
    );

    stack.faults(FaultPlan::first_n(1, FaultKind::Drop));
    get_item(&stack.dynamodb(2)).await.expect("second attempt");
    stack.faults(FaultPlan::first_n(1, FaultKind::Drop));
    put_object(&stack.s3(2)).await.expect("second attempt");
    stack.faults(FaultPlan::first_n(1, FaultKind::Drop));
    send_message(&stack.sqs(2)).await.expect("second attempt");
    assert_eq!(stack.reached_upstream(), 3);
    assert_eq!(stack.proxy.stats.faults().drop, 6);
}

#[tokio::test]
async fn a_lost_response_reaches_the_upstream_but_not_the_caller() {
    let stack = Stack::new().await;

    stack.faults(FaultPlan::first_n(1, FaultKind::LostResponse));
    let err = put_item(&stack.dynamodb(1)).await.unwrap_err();
    assert!(matches!(err, SdkError::DispatchFailure(_)), "{err:?}");
    assert_eq!(stack.reached_upstream(), 1, "the write was made");

    stack.faults(FaultPlan::first_n(1, FaultKind::LostResponse));
    let err = send_message(&stack.sqs(1)).await.unwrap_err();
    assert!(matches!(err, SdkError::DispatchFailure(_)), "{err:?}");
    assert_eq!(stack.reached_upstream(), 2, "the message was sent");

    // With retries on, the SDK repeats the call: the upstream sees the same write twice.
    stack.faults(FaultPlan::first_n(1, FaultKind::LostResponse));
    put_item(&stack.dynamodb(2)).await.expect("second attempt");
    assert_eq!(stack.reached_upstream(), 4);
    assert_eq!(stack.proxy.stats.faults().lost_response, 3);
}

#[tokio::test]
async fn a_receive_is_never_given_a_lost_response() {
    let stack = Stack::new().await;
    stack.faults(FaultPlan::first_n(1, FaultKind::LostResponse));
    stack
        .sqs(1)
        .receive_message()
        .queue_url("http://127.0.0.1/000000000000/jobs")
        .wait_time_seconds(1)
        .send()
        .await
        .expect("the receive went through");
    assert_eq!(stack.reached_upstream(), 1);
    assert_eq!(stack.proxy.stats.faults().lost_response, 0);
}

#[tokio::test]
async fn a_slow_answer_arrives_late_and_intact() {
    let stack = Stack::new().await;
    let client = stack.sqs(1);
    stack.faults(FaultPlan {
        slow_by: Duration::from_millis(300),
        ..FaultPlan::first_n(1, FaultKind::Slow)
    });
    let started = Instant::now();
    let sent = send_message(&client)
        .await
        .expect("a slow answer is an answer");
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(sent.md5_of_message_body(), Some(HELLO_MD5));
    assert_eq!(stack.proxy.stats.faults().slow, 1);
    assert!(stack.proxy.stats.added_time() >= Duration::from_millis(300));
}

#[tokio::test]
async fn faults_switched_off_let_every_call_through() {
    let stack = Stack::new().await;
    let client = stack.dynamodb(1);
    stack.faults(FaultPlan::parse("seed=1,throttle=0.5,5xx=0.5").unwrap());
    for _ in 0..3 {
        get_item(&client).await.unwrap_err();
    }
    stack.proxy.faults.set(None).unwrap();
    for _ in 0..5 {
        get_item(&client).await.expect("no faults");
    }
    assert_eq!(stack.reached_upstream(), 5);
    let faults = stack.proxy.stats.faults();
    assert_eq!(faults.throttle + faults.error5xx, 3);
    assert_eq!(faults.total(), 3);
}
