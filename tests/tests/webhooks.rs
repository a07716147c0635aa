//! The webhook receiver: only RunPod's calls for the right job get in, and however often they
//! come, a job is finalized once.
use std::time::Duration;

use gateway_tests::{jpeg, Stack, StackOptions, StatusCode, ALICE};
use runpod_emulator::Faults;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

fn without_webhooks() -> StackOptions {
    StackOptions {
        faults: Faults {
            webhooks_enabled: false,
            ..Faults::default()
        },
        ..StackOptions::default()
    }
}

/// Waits until RunPod has finished the job (the gateway has not heard yet: webhooks are off).
async fn wait_runpod_completed(stack: &Stack, job_id: &str) -> runpod_emulator::JobSnapshot {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if stack.stored_job(job_id).await.runpod_job_id.is_some() {
            let snapshot = stack.runpod_job(job_id).await;
            if snapshot.status == runpod_emulator::JobStatus::Completed {
                return snapshot;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "RunPod never completed {job_id}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn the_same_webhook_delivered_twice_finalizes_once() {
    let stack = Stack::start().await;
    let job_id = stack
        .submit_restore(ALICE, &jpeg(400, 300), json!({"megapixels": 0.05}))
        .await;
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let finalized = stack.stored_job(&job_id).await;
    let keys = stack
        .keys(&stack.results_bucket, &format!("results/alice/{job_id}/"))
        .await;
    let head = stack
        .s3()
        .head_object()
        .bucket(&stack.results_bucket)
        .key(&keys[0])
        .send()
        .await
        .unwrap();

    let runpod_id = finalized.runpod_job_id.clone().unwrap();
    for _ in 0..2 {
        let again = stack.emulator.redeliver_webhook(&runpod_id).await.unwrap();
        assert_eq!(again.status, Some(200));
    }

    let after = stack.stored_job(&job_id).await;
    assert_eq!(after, finalized, "a duplicate webhook changed the job");
    assert_eq!(
        stack
            .keys(&stack.results_bucket, &format!("results/alice/{job_id}/"))
            .await,
        keys,
        "one output copy"
    );
    let head_after = stack
        .s3()
        .head_object()
        .bucket(&stack.results_bucket)
        .key(&keys[0])
        .send()
        .await
        .unwrap();
    assert_eq!(head_after.e_tag(), head.e_tag());
    assert_eq!(
        head_after.last_modified(),
        head.last_modified(),
        "output copied again"
    );
    stack.stop().await;
}

#[tokio::test]
async fn concurrent_duplicate_webhooks_finalize_once() {
    let stack = Stack::start_with(without_webhooks()).await;
    let job_id = stack
        .submit_restore(ALICE, &jpeg(400, 300), json!({"megapixels": 0.05}))
        .await;
    let snapshot = wait_runpod_completed(&stack, &job_id).await;
    let url = snapshot.webhook.clone().unwrap();
    let mut body = snapshot.status_body();
    body["input"] = snapshot.input.clone();
    body["webhook"] = json!(url);
    let body = body.to_string();
    let before = stack.stored_job(&job_id).await;

    let deliveries = (0..4).map(|_| stack.post_webhook(&url, &body));
    let statuses = futures::future::join_all(deliveries).await;
    assert!(statuses.contains(&StatusCode::OK), "{statuses:?}");
    // Losers either saw the job handed off already (200) or busy (503, RunPod would retry).
    assert!(statuses
        .iter()
        .all(|s| *s == StatusCode::OK || *s == StatusCode::SERVICE_UNAVAILABLE));

    let after = stack
        .stored_terminal(&job_id, Duration::from_secs(60))
        .await;
    assert_eq!(after.state, gateway::domain::job::JobState::Succeeded);
    // Exactly three writes: the hand-off, the finalize lease, then the terminal state.
    assert_eq!(
        after.version,
        before.version + 3,
        "job written more than once: {:?}",
        after.history
    );
    assert_eq!(after.outputs.len(), 1);
    stack.stop().await;
}

#[tokio::test]
async fn webhooks_without_the_right_token_get_401_and_change_nothing() {
    let stack = Stack::start_with(without_webhooks()).await;
    let job_a = stack
        .submit_restore(ALICE, &jpeg(200, 150), json!({"megapixels": 0.02}))
        .await;
    let job_b = stack
        .submit_restore(ALICE, &jpeg(200, 150), json!({"megapixels": 0.02}))
        .await;
    let snapshot = wait_runpod_completed(&stack, &job_a).await;
    let snapshot_b = wait_runpod_completed(&stack, &job_b).await;
    let good_url = snapshot.webhook.clone().unwrap();
    let token_b = snapshot_b
        .webhook
        .unwrap()
        .split("token=")
        .nth(1)
        .unwrap()
        .to_string();
    let base = good_url.split('?').next().unwrap().to_string();
    let mut body = snapshot.status_body();
    body["input"] = snapshot.input.clone();
    let body = body.to_string();
    let before = stack.stored_job(&job_a).await;

    let wrong = format!("{base}?token={}", "0".repeat(64));
    let other_jobs_token = format!("{base}?token={token_b}");
    for url in [
        wrong,
        other_jobs_token,
        base.clone(),
        format!("{base}?token="),
    ] {
        assert_eq!(
            stack.post_webhook(&url, &body).await,
            StatusCode::UNAUTHORIZED,
            "{url}"
        );
    }
    assert_eq!(
        stack.stored_job(&job_a).await,
        before,
        "a refused webhook changed the job"
    );
    let (_, job) = stack.get(ALICE, &format!("/jobs/{job_a}")).await;
    assert_eq!(job["status"], "submitted");
    stack.stop().await;
}

#[tokio::test]
async fn an_empty_webhook_body_is_checked_against_runpod_status() {
    let stack = Stack::start_with(StackOptions {
        faults: Faults {
            webhook_empty_body: true,
            ..Faults::default()
        },
        ..StackOptions::default()
    })
    .await;
    let job_id = stack
        .submit_restore(ALICE, &jpeg(300, 200), json!({"megapixels": 0.03}))
        .await;
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(stack
        .emulator
        .webhook_log()
        .iter()
        .all(|a| a.body.is_empty()));
    stack.stop().await;
}

#[tokio::test]
async fn a_webhook_claiming_success_is_not_trusted_over_runpod() {
    // A forged-looking but correctly signed body (say, replayed from another job) names another
    // RunPod id: the gateway asks RunPod instead of believing it.
    let stack = Stack::start_with(without_webhooks()).await;
    let job_id = stack
        .submit_restore(ALICE, &jpeg(300, 200), json!({"megapixels": 0.03}))
        .await;
    let snapshot = wait_runpod_completed(&stack, &job_id).await;
    let body = json!({
        "id": "someone-elses-job",
        "status": "COMPLETED",
        "output": {"files": ["/runpod-volume/outputs/x/evil.png"]},
    });
    let status = stack
        .post_webhook(snapshot.webhook.as_ref().unwrap(), &body.to_string())
        .await;
    assert_eq!(status, StatusCode::OK);
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(
        job["status"], "succeeded",
        "RunPod's own status decides: {job}"
    );
    assert!(job["outputs"][0]["file_name"]
        .as_str()
        .unwrap()
        .starts_with("restore"));
    stack.stop().await;
}
