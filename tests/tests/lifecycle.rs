//! The job lifecycle end to end: client → API → DynamoDB/SQS (moto) → dispatch → RunPod
//! emulator (built-in worker on real images) → webhook or sweeper → results bucket → client.
use std::time::Duration;

use gateway_tests::{jpeg, Stack, StackOptions, StatusCode, ALICE};
use runpod_emulator::Faults;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_restored_photo_comes_back_at_the_requested_size() {
    let stack = Stack::start().await;
    let job_id = stack
        .submit_restore(ALICE, &jpeg(1600, 1200), json!({"megapixels": 0.25}))
        .await;

    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let outputs = job["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0]["content_type"], "image/png");

    let url = outputs[0]["url"].as_str().unwrap();
    let bytes = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    assert_eq!(bytes.len() as u64, outputs[0]["size"].as_u64().unwrap());
    let image = image::load_from_memory(&bytes).expect("the output decodes as an image");
    let megapixels = f64::from(image.width() * image.height()) / 1_000_000.0;
    assert!(
        (0.22..=0.29).contains(&megapixels),
        "{}x{} is {megapixels} MP",
        image.width(),
        image.height()
    );
    // Aspect ratio kept.
    let ratio = f64::from(image.width()) / f64::from(image.height());
    assert!((ratio - 4.0 / 3.0).abs() < 0.02, "ratio {ratio}");
    stack.stop().await;
}

#[tokio::test]
async fn with_webhooks_lost_the_sweeper_brings_the_job_home() {
    let stack = Stack::start_with(StackOptions {
        faults: Faults {
            webhooks_enabled: false,
            ..Faults::default()
        },
        sweep_every: Duration::from_millis(500),
        ..StackOptions::default()
    })
    .await;
    let job_id = stack
        .submit_restore(ALICE, &jpeg(320, 240), json!({"megapixels": 0.05}))
        .await;
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(
        stack.emulator.webhook_log().is_empty(),
        "no webhook was sent"
    );
    assert_eq!(job["outputs"].as_array().unwrap().len(), 1);
    stack.stop().await;
}

#[tokio::test]
async fn a_failing_worker_ends_the_job_failed_with_its_message() {
    let stack = Stack::start_with(StackOptions {
        faults: Faults {
            worker_fail_message: Some("CUDA out of memory".into()),
            ..Faults::default()
        },
        ..StackOptions::default()
    })
    .await;
    let (_, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["code"], "worker_failed");
    assert!(job["error"]["message"]
        .as_str()
        .unwrap()
        .contains("CUDA out of memory"));
    assert_eq!(job["outputs"], json!([]));
    stack.stop().await;
}

#[tokio::test]
async fn an_output_path_outside_the_jobs_prefix_fails_and_copies_nothing() {
    let stack = Stack::start_with(StackOptions {
        faults: Faults {
            worker_output_override: Some(json!({
                "prompt_id": "p",
                "files": ["/runpod-volume/outputs/../inputs/secret.png"],
                "file_count": 1
            })),
            ..Faults::default()
        },
        ..StackOptions::default()
    })
    .await;
    let (_, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["code"], "invalid_output_path");
    assert!(stack.results_emptied().await);
    stack.stop().await;
}

#[tokio::test]
async fn an_output_over_the_size_cap_fails_output_too_large_and_stores_nothing() {
    let stack = Stack::start_with(StackOptions {
        extra_env: vec![("OUTPUT_MAX_FILE_BYTES", "64".into())],
        ..StackOptions::default()
    })
    .await;
    let (_, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "output_too_large");
    assert!(stack.results_emptied().await);
    stack.stop().await;
}

#[tokio::test]
async fn cancelling_a_running_job_stops_it_at_runpod() {
    let stack = Stack::start_with(StackOptions {
        faults: Faults {
            worker_delay_ms: 5_000,
            ..Faults::default()
        },
        ..StackOptions::default()
    })
    .await;
    let job_id = stack
        .submit_restore(ALICE, &jpeg(200, 150), json!({}))
        .await;
    stack
        .wait_status(ALICE, &job_id, "submitted", TIMEOUT)
        .await;
    let (status, body) = stack
        .post_json(ALICE, &format!("/jobs/{job_id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelled");
    let run = stack.runpod_job(&job_id).await.id;
    let runpod = stack.run_once_stopped(&run, TIMEOUT).await;
    assert_eq!(runpod.status, runpod_emulator::JobStatus::Cancelled);
    let (status, body) = stack
        .post_json(ALICE, &format!("/jobs/{job_id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    let (_, job) = stack.get(ALICE, &format!("/jobs/{job_id}")).await;
    assert_eq!(job["error"]["code"], "cancelled_by_client");
    stack.stop().await;
}

#[tokio::test]
async fn a_redelivered_dispatch_message_does_not_submit_twice() {
    let stack = Stack::start().await;
    let (job_id, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded");
    let submitted = stack.emulator.jobs().len();
    for _ in 0..2 {
        stack
            .sqs()
            .send_message()
            .queue_url(&stack.queue_url)
            .message_body(json!({"job_id": job_id}).to_string())
            .send()
            .await
            .unwrap();
    }
    let deadline = std::time::Instant::now() + TIMEOUT;
    while stack.queue_depth().await > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "messages never consumed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        stack.emulator.jobs().len(),
        submitted,
        "RunPod got the job twice"
    );
    stack.stop().await;
}

#[tokio::test]
async fn runpod_refusing_for_a_while_only_delays_the_job() {
    // A 500 on /run may mean RunPod took the job, so it is not repeated within the call: each
    // costs a dispatch attempt, and the job waits for a run to announce itself
    // (RUN_OUTCOME_GRACE_SECS) before the sweeper brings it back to dispatch.
    let stack = Stack::start_with(StackOptions {
        faults: Faults {
            run_status: Some(500),
            run_fail_count: 2,
            ..Faults::default()
        },
        sweep_every: Duration::from_millis(500),
        ..StackOptions::default()
    })
    .await;
    let (job_id, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(stack.stored_job(&job_id).await.attempts, 3);
    assert_eq!(stack.emulator.jobs().len(), 1, "submitted once");
    stack.stop().await;
}

#[tokio::test]
async fn runpod_throttling_is_retried_within_the_dispatch() {
    // A 429 means RunPod did not take the job: the dispatch backs off and asks again in the
    // same invocation, without spending the job's attempt budget.
    let stack = Stack::start_with(StackOptions {
        faults: Faults {
            run_status: Some(429),
            run_fail_count: 2,
            ..Faults::default()
        },
        ..StackOptions::default()
    })
    .await;
    let (job_id, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(stack.stored_job(&job_id).await.attempts, 1);
    assert_eq!(stack.emulator.jobs().len(), 1, "submitted once");
    stack.stop().await;
}

#[tokio::test]
async fn a_job_that_runpod_keeps_refusing_fails_once_its_attempts_are_spent() {
    let stack = Stack::start_with(StackOptions {
        faults: Faults {
            run_status: Some(500),
            ..Faults::default()
        },
        extra_env: vec![("MAX_DISPATCH_ATTEMPTS", "2".into())],
        sweep_every: Duration::from_millis(500),
        ..StackOptions::default()
    })
    .await;
    let (job_id, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "dispatch_attempts_exhausted");
    assert_eq!(job["error"]["retryable"], true);
    assert_eq!(stack.stored_job(&job_id).await.attempts, 2);
    // Failed once its attempts are spent (after the last one's grace, in which a run RunPod
    // did take could still have been adopted): nothing is left on the queue.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while stack.queue_depth().await > 0 {
        assert!(std::time::Instant::now() < deadline, "message left over");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_job_shows_each_state_change_once_as_events() {
    let stack = Stack::start().await;
    let job_id = stack
        .submit_restore(ALICE, &jpeg(200, 150), json!({"megapixels": 0.05}))
        .await;
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let events = job["events"].as_array().unwrap();
    assert_eq!(
        events[0],
        json!({"at": job["created_at"], "from": null, "to": "queued", "by": "client"})
    );
    assert_eq!(events[1]["from"], "queued");
    assert_eq!(events[1]["to"], "submitted");
    assert_eq!(events[1]["by"], "dispatch");
    let last = events.last().unwrap();
    assert_eq!(last["to"], "succeeded");
    assert_eq!(last["at"], job["finished_at"]);
    assert_eq!(
        last["by"], "finalize",
        "a completed run is always collected by finalize"
    );
    // Strictly forward, each one taking up where the last left off, in time order.
    for pair in events.windows(2) {
        assert_eq!(pair[1]["from"], pair[0]["to"], "{events:?}");
        assert!(pair[1]["at"].as_str() >= pair[0]["at"].as_str());
    }
    let public = ["queued", "submitted", "running", "succeeded"];
    assert!(events
        .iter()
        .all(|e| public.contains(&e["to"].as_str().unwrap())));
    stack.stop().await;
}

#[tokio::test]
async fn a_poison_message_is_left_for_the_dlq_and_a_stale_one_is_consumed() {
    use aws_lambda_events::event::sqs::{SqsEvent, SqsMessage};
    let stack = Stack::start().await;
    let mut event = SqsEvent::default();
    for (id, body) in [
        ("poison-1", "not json"),
        ("poison-2", r#"{"job_id": 42}"#),
        (
            "unknown-job",
            r#"{"job_id": "01900000-0000-7000-8000-00000000dead"}"#,
        ),
    ] {
        let mut message = SqsMessage::default();
        message.message_id = Some(id.into());
        message.body = Some(body.into());
        event.records.push(message);
    }
    let consumer = stack.wiring().consumer().unwrap();
    let response = gateway_aws::adapters::sqs::handle_batch(&consumer, event).await;
    let mut failed: Vec<_> = response
        .batch_item_failures
        .iter()
        .map(|f| f.item_identifier.as_str())
        .collect();
    failed.sort_unstable();
    // Reported failed, so SQS moves them to the DLQ after maxReceiveCount receives (and the DLQ
    // alarm shows them); a readable message for a job that does not exist is simply consumed.
    assert_eq!(failed, ["poison-1", "poison-2"]);
    stack.stop().await;
}

#[tokio::test]
async fn a_low_priority_job_reaches_runpod_with_low_priority_set() {
    let stack = Stack::start().await;
    let mut request = gateway_tests::restore_request(&jpeg(200, 150), json!({}));
    request["priority"] = json!("low");
    let (status, body) = stack.post_json(ALICE, "/jobs", &request).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job_id = body["job_id"].as_str().unwrap();

    let job = stack.wait_terminal(ALICE, job_id, TIMEOUT).await;

    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["priority"], "low");
    let run = stack.stored_job(job_id).await.runpod_job_id.unwrap();
    let at_runpod = stack
        .emulator
        .ended_job(&run)
        .or_else(|| stack.emulator.job(&run))
        .unwrap();
    assert!(
        at_runpod.low_priority,
        "the emulator got lowPriority: false"
    );
    stack.stop().await;
}
