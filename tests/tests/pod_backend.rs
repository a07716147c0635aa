//! The pod backend end to end: client → API → dispatch → the ComfyUI emulator over its HTTP
//! API (upload, prompt) → the poll queue's checks → finalize through `/view` → the results
//! bucket → client. The same restore job as on serverless, and the same checks of its output.
use std::time::{Duration, Instant};

use gateway_tests::{jpeg, Stack, StackOptions, ALICE};
use serde_json::json;

/// Generous: the suite runs on slow, shared machines; each wait ends as soon as it can.
const TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the job's status is `status`.
async fn wait_for(stack: &Stack, job_id: &str, status: &str) -> serde_json::Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let (_, job) = stack.get(ALICE, &format!("/jobs/{job_id}")).await;
        if job["status"] == status {
            return job;
        }
        assert!(Instant::now() < deadline, "never {status}: {job}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_restored_photo_comes_back_through_the_pod_at_the_requested_size() {
    let stack = Stack::start().await;
    let job_id = stack
        .submit_restore_on_pod(ALICE, &jpeg(1600, 1200), json!({"megapixels": 0.25}))
        .await;

    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;

    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["backend"], "pod");
    let outputs = job["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0]["content_type"], "image/png");
    let url = outputs[0]["url"].as_str().unwrap();
    let bytes = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    let image = image::load_from_memory(&bytes).expect("the output decodes as an image");
    let megapixels = f64::from(image.width() * image.height()) / 1_000_000.0;
    assert!((0.22..=0.29).contains(&megapixels), "{megapixels} MP");
    let ratio = f64::from(image.width()) / f64::from(image.height());
    assert!((ratio - 4.0 / 3.0).abs() < 0.02, "ratio {ratio}");
    assert!(
        stack.emulator.webhook_log().is_empty(),
        "nothing ran on serverless"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_pod_restart_in_the_middle_of_a_job_runs_it_again_and_it_succeeds() {
    let stack = Stack::start().await;
    stack.comfy.slow_runs(Duration::from_secs(3));
    let job_id = stack
        .submit_restore_on_pod(ALICE, &jpeg(320, 240), json!({"megapixels": 0.05}))
        .await;
    wait_for(&stack, &job_id, "running").await;

    stack.comfy.restart();
    stack.comfy.slow_runs(Duration::ZERO);

    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["outputs"].as_array().unwrap().len(), 1);
    stack.stop().await;
}

#[tokio::test]
async fn a_workflow_the_pod_refuses_fails_the_job_invalid_workflow() {
    let stack = Stack::start().await;
    stack.comfy.fail_next_validations(1);
    let job_id = stack
        .submit_restore_on_pod(ALICE, &jpeg(320, 240), json!({}))
        .await;

    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;

    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "invalid_workflow");
    stack.stop().await;
}

#[tokio::test]
async fn cancelling_a_running_pod_job_interrupts_its_prompt() {
    let stack = Stack::start().await;
    stack.comfy.slow_runs(Duration::from_secs(30));
    let job_id = stack
        .submit_restore_on_pod(ALICE, &jpeg(320, 240), json!({}))
        .await;
    wait_for(&stack, &job_id, "running").await;

    let (status, body) = stack
        .post_json(ALICE, &format!("/jobs/{job_id}/cancel"), &json!({}))
        .await;

    assert!(status.is_success(), "{body}");
    // The server's queue empties once the stop is carried out.
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let queue: serde_json::Value = reqwest::get(format!("{}/queue", stack.comfy.url))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if queue["queue_running"]
            .as_array()
            .is_some_and(|r| r.is_empty())
        {
            break;
        }
        assert!(Instant::now() < deadline, "the prompt still runs: {queue}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_pod_jobs_files_on_the_volume_are_removed_after_it_ends() {
    let stack = Stack::start_with(StackOptions {
        sweep_every: Duration::from_millis(300),
        extra_env: vec![("FINALIZE_LEASE_SECS", "1".into())],
        ..StackOptions::default()
    })
    .await;
    let job_id = stack
        .submit_restore_on_pod(ALICE, &jpeg(320, 240), json!({"megapixels": 0.05}))
        .await;
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");

    let deadline = Instant::now() + TIMEOUT;
    while !stack.pod_files_on_the_volume(&job_id).is_empty() {
        assert!(
            Instant::now() < deadline,
            "left on the volume: {:?}",
            stack.pod_files_on_the_volume(&job_id)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stack.stop().await;
}
