//! The job lifecycle end to end: client → API → DynamoDB/SQS (moto) → dispatch → RunPod
//! emulator (built-in worker on real images) → webhook or sweeper → results bucket → client.
use std::time::Duration;

use gateway_tests::{jpeg, Stack, StackOptions, StatusCode, ALICE, BOB};
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
