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
            serde_json::to_string(&CallbackMessage::Deliver(CallbackTarget {
                job_id,
                message_id,
            }))
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

// ------------------------------------------------------------------ end to end, on the local stack

mod end_to_end {
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use axum::http::HeaderMap;
    use axum::response::IntoResponse;
    use axum::routing::post;
    use gateway_tests::{jpeg, Stack, StackOptions, StatusCode, ALICE, BOB};
    use serde_json::{json, Value};

    /// Generous: the suite runs on slow, shared machines; a pass takes seconds.
    const TIMEOUT: Duration = Duration::from_secs(180);

    /// One callback as the receiver got it.
    #[derive(Clone, Debug)]
    struct Received {
        path: String,
        id: String,
        timestamp: String,
        signature: String,
        body: String,
    }

    /// A client's endpoint on loopback: `/hook` refuses its first `fail_first` callbacks with a
    /// 503 and answers the rest slowly (a quarter second), `/moved` redirects to `/hook`.
    async fn receiver(fail_first: usize) -> (String, Arc<Mutex<Vec<Received>>>) {
        let got: Arc<Mutex<Vec<Received>>> = Arc::default();
        let record = |path: &'static str, got: Arc<Mutex<Vec<Received>>>| {
            move |headers: HeaderMap, body: String| {
                let got = got.clone();
                async move {
                    let header = |name: &str| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string()
                    };
                    let mut got = got.lock().unwrap();
                    got.push(Received {
                        path: path.into(),
                        id: header("webhook-id"),
                        timestamp: header("webhook-timestamp"),
                        signature: header("webhook-signature"),
                        body,
                    });
                    got.iter().filter(|r| r.path == path).count()
                }
            }
        };
        let hook = record("/hook", got.clone());
        let moved = record("/moved", got.clone());
        let app = axum::Router::new()
            .route(
                "/hook",
                post(move |headers: HeaderMap, body: String| async move {
                    let seen = hook(headers, body).await;
                    if seen <= fail_first {
                        return StatusCode::SERVICE_UNAVAILABLE.into_response();
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    StatusCode::NO_CONTENT.into_response()
                }),
            )
            .route(
                "/moved",
                post(move |headers: HeaderMap, body: String| async move {
                    moved(headers, body).await;
                    (StatusCode::TEMPORARY_REDIRECT, [("location", "/hook")]).into_response()
                }),
            );
        let address = gateway_tests::serve_on_loopback(app).await;
        (format!("http://{address}"), got)
    }

    async fn local_stack() -> Stack {
        Stack::start_with(StackOptions {
            extra_env: vec![("OUTBOUND_ALLOW_LOOPBACK", "true".into())],
            ..StackOptions::default()
        })
        .await
    }

    async fn submit_with_callback(
        stack: &Stack,
        url: &str,
        events: &[&str],
    ) -> (StatusCode, Value) {
        let mut request =
            gateway_tests::restore_request(&jpeg(120, 90), json!({"megapixels": 0.01}));
        request["callback_url"] = json!(url);
        request["callback_events"] = json!(events);
        stack.post_json(ALICE, "/jobs", &request).await
    }

    /// Polls `GET /jobs/{id}/deliveries` until `done` holds.
    async fn deliveries_until(stack: &Stack, job_id: &str, done: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let (status, log) = stack
                .get(ALICE, &format!("/jobs/{job_id}/deliveries"))
                .await;
            assert_eq!(status, StatusCode::OK, "{log}");
            if done(&log) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "deliveries never got there: {log}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether the official verifier accepts what the receiver got, with `secret`.
    async fn verified(secret: &str, got: &Received) -> bool {
        let env = [
            ("SECRET", secret.to_string()),
            ("WEBHOOK_ID", got.id.clone()),
            ("WEBHOOK_TIMESTAMP", got.timestamp.clone()),
            ("WEBHOOK_SIGNATURE", got.signature.clone()),
            ("BODY", got.body.clone()),
        ];
        let (ok, stdout, stderr) =
            gateway_tests::run_python("verify_standard_webhook.py", &env, TIMEOUT).await;
        assert!(ok || stdout.contains("refused"), "{stdout}{stderr}");
        ok
    }

    #[tokio::test]
    async fn a_callback_survives_a_receiver_down_at_first_verifies_shows_in_the_log_and_redelivers()
    {
        let stack = local_stack().await;
        let (base, got) = receiver(1).await;

        let (status, accepted) = submit_with_callback(&stack, &format!("{base}/hook"), &[]).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        let job_id = accepted["job_id"].as_str().unwrap().to_string();
        let done = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
        assert_eq!(done["status"], "succeeded", "{done}");

        // The end: refused once (503), delivered on the retry five seconds later.
        let log = deliveries_until(&stack, &job_id, |log| {
            log["deliveries"]
                .as_array()
                .unwrap()
                .iter()
                .any(|d| d["type"] == "job.succeeded" && d["status"] == "delivered")
        })
        .await;
        let end = log["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["type"] == "job.succeeded")
            .unwrap()
            .clone();
        let attempts: Vec<Value> = end["attempts"].as_array().unwrap().clone();
        let codes: Vec<u64> = attempts
            .iter()
            .filter_map(|a| a["status_code"].as_u64())
            .collect();
        assert_eq!(codes, [503, 204], "{end}");

        // Every callback received verifies with the official library and the owner's secret.
        let (status, secrets) = stack.get(ALICE, "/callbacks/secret").await;
        assert_eq!(status, StatusCode::OK, "{secrets}");
        let secret = secrets["secret"].as_str().unwrap().to_string();
        assert!(secret.starts_with("whsec_"));
        let received = got.lock().unwrap().clone();
        assert_eq!(received.len(), 2, "{received:?}");
        for callback in &received {
            assert!(verified(&secret, callback).await, "{callback:?}");
        }
        let delivered = received
            .iter()
            .filter(|r| r.id == end["delivery_id"].as_str().unwrap())
            .count();
        assert_eq!(delivered, 2, "the retry kept its webhook-id");
        let body: Value = serde_json::from_str(&received.last().unwrap().body).unwrap();
        assert_eq!(body["data"]["job_id"], job_id.as_str());

        // Redelivery: the same message again, now, marked manual in the log.
        let id = end["delivery_id"].as_str().unwrap();
        let (status, again) = stack
            .post_json(
                ALICE,
                &format!("/jobs/{job_id}/deliveries/{id}/redeliver"),
                &json!({}),
            )
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "{again}");
        let log = deliveries_until(&stack, &job_id, |log| {
            log["deliveries"].as_array().unwrap().iter().any(|d| {
                d["delivery_id"] == id
                    && d["attempts"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|a| a["manual"] == true && a["status_code"] == 204)
            })
        })
        .await;
        assert!(log["deliveries"].as_array().is_some());

        // Another owner sees nothing of it.
        let (status, _) = stack.get(BOB, &format!("/jobs/{job_id}/deliveries")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        stack.stop().await;
    }

    #[tokio::test]
    async fn a_redirect_is_a_failed_attempt_never_followed_and_a_private_callback_is_refused() {
        let stack = local_stack().await;
        let (base, got) = receiver(0).await;

        let (status, refused) = submit_with_callback(&stack, "https://10.1.2.3/hook", &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{refused}");
        assert_eq!(refused["error"]["code"], "callback_url_refused");

        let (status, accepted) = submit_with_callback(&stack, &format!("{base}/moved"), &[]).await;
        assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
        let job_id = accepted["job_id"].as_str().unwrap().to_string();
        stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
        let log = deliveries_until(&stack, &job_id, |log| {
            log["deliveries"].as_array().unwrap().iter().any(|d| {
                d["attempts"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|a| a["status_code"] == 307)
            })
        })
        .await;
        let end = &log["deliveries"][0];
        assert_eq!(end["status"], "pending", "retried later: {log}");
        assert!(end["next_attempt_at"].is_string());
        assert!(
            got.lock().unwrap().iter().all(|r| r.path == "/moved"),
            "the redirect was not followed"
        );

        // A test event to the same receiver, answered at once.
        let (status, test) = stack
            .post_json(
                ALICE,
                "/callbacks/test",
                &json!({"url": format!("{base}/hook")}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{test}");
        assert_eq!(test["delivered"], true, "{test}");
        assert_eq!(test["status_code"], 204);
        stack.stop().await;
    }
}
