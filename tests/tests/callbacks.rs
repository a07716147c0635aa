//! Client callbacks are signed so that the official Standard Webhooks verifier (the
//! `standardwebhooks` package from PyPI, a client nobody here wrote) accepts them: in real time,
//! since it checks the timestamp against its own clock.
use std::time::Duration;

use gateway::domain::callback::{signature_headers, SigningSecret};
use gateway::ports::{Clock, SystemClock};
use gateway_tests::run_python;
use rand::SeedableRng;

const BODY: &str = r#"{"type":"job.succeeded","data":{"job_id":"0190a1b2-0000-7000-8000-000000000001","status":"succeeded"}}"#;

/// Whether the official library accepts `body` with these headers, for `secret`.
async fn verifies(
    secret: &SigningSecret,
    headers: &[(&'static str, String); 3],
    body: &str,
) -> bool {
    let env = [
        ("SECRET", secret.expose()),
        ("WEBHOOK_ID", headers[0].1.clone()),
        ("WEBHOOK_TIMESTAMP", headers[1].1.clone()),
        ("WEBHOOK_SIGNATURE", headers[2].1.clone()),
        ("BODY", body.to_string()),
    ];
    let (ok, stdout, stderr) =
        run_python("verify_standard_webhook.py", &env, Duration::from_secs(120)).await;
    assert!(
        ok || stdout.contains("refused"),
        "the verifier did not run: {stdout}{stderr}"
    );
    ok
}

fn secret(seed: u64) -> SigningSecret {
    SigningSecret::generate(&mut rand::rngs::StdRng::seed_from_u64(seed))
}

#[tokio::test]
async fn a_callback_signed_now_verifies_with_the_official_library() {
    let secret = secret(1);
    let headers = signature_headers(
        std::slice::from_ref(&secret),
        "msg_2x7",
        SystemClock.now_ms(),
        BODY.as_bytes(),
    );
    assert!(verifies(&secret, &headers, BODY).await);
}

#[tokio::test]
async fn a_changed_body_or_another_secret_does_not_verify() {
    let secret = secret(2);
    let headers = signature_headers(
        std::slice::from_ref(&secret),
        "msg_2x8",
        SystemClock.now_ms(),
        BODY.as_bytes(),
    );
    assert!(!verifies(&secret, &headers, &BODY.replace("succeeded", "failed")).await);
    assert!(!verifies(&self::secret(3), &headers, BODY).await);
}

#[tokio::test]
async fn during_a_rotation_either_secret_verifies_the_same_message() {
    let (old, new) = (secret(4), secret(5));
    let headers = signature_headers(
        &[new.clone(), old.clone()],
        "msg_2x9",
        SystemClock.now_ms(),
        BODY.as_bytes(),
    );
    assert!(verifies(&new, &headers, BODY).await);
    assert!(verifies(&old, &headers, BODY).await);
}

#[tokio::test]
async fn a_signature_from_ten_minutes_ago_is_refused_so_each_retry_is_signed_anew() {
    let secret = secret(6);
    let stale = SystemClock.now_ms() - 10 * 60 * 1000;
    let headers = signature_headers(
        std::slice::from_ref(&secret),
        "msg_2xa",
        stale,
        BODY.as_bytes(),
    );
    assert!(!verifies(&secret, &headers, BODY).await);
}

// ------------------------------------------------------------------ the HTTP sender

mod sender {
    use std::net::SocketAddr;
    use std::time::Duration;

    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use axum::routing::post;
    use gateway::domain::callback::AttemptResult;
    use gateway::domain::egress::Destination;
    use gateway::ports::CallbackSender;
    use gateway_aws::adapters::callback_http::HttpCallbackSender;

    /// A receiver on loopback.
    async fn receiver(app: axum::Router) -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        (address, task)
    }

    async fn send(address: SocketAddr, path: &str, sender: &HttpCallbackSender) -> AttemptResult {
        // A name, pinned to the receiver's address: nothing resolves it.
        let url =
            url::Url::parse(&format!("http://receiver.test:{}{path}", address.port())).unwrap();
        let to = Destination {
            host: "receiver.test".into(),
            address,
        };
        let headers = [
            ("webhook-id", "msg_1".to_string()),
            ("content-type", "application/json".to_string()),
        ];
        sender.post(&url, &to, &headers, b"{}").await
    }

    #[tokio::test]
    async fn answers_map_to_delivered_gone_refused_with_retry_after_and_redirects_are_not_followed()
    {
        let app = axum::Router::new()
            .route(
                "/ok",
                post(|headers: HeaderMap| async move {
                    assert_eq!(headers["webhook-id"], "msg_1");
                    // The name the URL gave, though the connection went to the pinned address.
                    assert!(headers["host"]
                        .to_str()
                        .unwrap()
                        .starts_with("receiver.test:"));
                    StatusCode::NO_CONTENT
                }),
            )
            .route("/gone", post(|| async { StatusCode::GONE }))
            .route(
                "/busy",
                post(|| async {
                    (StatusCode::SERVICE_UNAVAILABLE, [("retry-after", "120")]).into_response()
                }),
            )
            .route(
                "/moved",
                post(|| async { (StatusCode::FOUND, [("location", "/ok")]).into_response() }),
            );
        let (address, _server) = receiver(app).await;
        let sender = HttpCallbackSender::default();

        assert_eq!(
            send(address, "/ok", &sender).await,
            AttemptResult::Delivered(204)
        );
        assert_eq!(send(address, "/gone", &sender).await, AttemptResult::Gone);
        assert_eq!(
            send(address, "/busy", &sender).await,
            AttemptResult::Refused {
                status: 503,
                retry_after_secs: Some(120)
            }
        );
        assert_eq!(
            send(address, "/moved", &sender).await,
            AttemptResult::Refused {
                status: 302,
                retry_after_secs: None
            }
        );
    }

    #[tokio::test]
    async fn an_endpoint_that_never_answers_is_given_up_after_the_timeout() {
        let app = axum::Router::new().route(
            "/slow",
            post(|| async {
                std::future::pending::<()>().await;
                StatusCode::OK
            }),
        );
        let (address, _server) = receiver(app).await;
        let sender = HttpCallbackSender::with_timeout(Duration::from_millis(500));

        let result = send(address, "/slow", &sender).await;

        assert!(matches!(result, AttemptResult::NoAnswer(_)), "{result:?}");
    }
}

// ------------------------------------------------------------------ the delivery queue's consumer

#[tokio::test]
async fn the_callback_consumer_attempts_each_request_and_returns_only_what_it_cannot_read() {
    use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
    use gateway::domain::callback::CallbackEvent;
    use gateway_aws::adapters::sqs::{handle_callback_batch, CallbackMessage, CallbackTarget};
    use testkit::Kit;

    let kit = Kit::new();
    kit.resolver.set("client.example", &["93.184.216.34"]);
    let mut job = kit.queued_job("alice");
    job.callback_url = Some("https://client.example/hook".into());
    kit.store.put(job.clone());
    let job = kit.api().cancel("alice", &job.id).await.unwrap();
    kit.callbacks()
        .notify(&job, CallbackEvent::Ended)
        .await
        .unwrap();
    let (job_id, message_id, _) = kit.callback_queue.take().remove(0);
    let mut event = SqsEvent::default();
    for (id, body) in [
        (
            "m-1",
            serde_json::to_string(&CallbackMessage {
                deliver: CallbackTarget { job_id, message_id },
            })
            .unwrap(),
        ),
        ("m-2", r#"{"finalize":"x"}"#.to_string()),
    ] {
        let mut record = SqsMessage::default();
        record.message_id = Some(id.into());
        record.body = Some(body);
        event.records.push(record);
    }

    let response = handle_callback_batch(&kit.callbacks(), event).await;

    let failed: Vec<&str> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    assert_eq!(failed, ["m-2"]);
    assert_eq!(kit.receiver.posted().len(), 1);
}
