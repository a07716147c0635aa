//! The sweeper rescues what the happy path loses: jobs whose queue message vanished, jobs past
//! their deadline, jobs whose RunPod result expired before anyone asked.
use std::time::Duration;

use gateway_tests::{Stack, StackOptions, ALICE};
use reqwest::StatusCode;
use runpod_emulator::Faults;

const TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_job_whose_queue_message_was_lost_is_re_enqueued() {
    let stack = Stack::start_with(StackOptions {
        sweep_every: Duration::from_millis(300),
        ..StackOptions::default()
    })
    .await;
    // A job stored as the API stores it, but whose SQS message never made it.
    let id = uuid::Uuid::now_v7().to_string();
    let job = stack.store_queued_job("alice", &id, 0).await;

    let done = stack.wait_terminal(ALICE, &job.id, TIMEOUT).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    stack.stop().await;
}

#[tokio::test]
async fn a_job_past_its_deadline_is_cancelled_at_runpod_and_timed_out() {
    let stack = Stack::start_with(StackOptions {
        faults: Faults {
            worker_delay_ms: 20_000,
            ..Faults::default()
        },
        sweep_every: Duration::from_millis(300),
        extra_env: vec![("JOB_DEADLINE_SECS", "2".into())],
        ..StackOptions::default()
    })
    .await;
    let (job_id, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "timed_out", "{job}");
    assert_eq!(job["error"]["code"], "deadline_exceeded");
    let run = stack.runpod_job(&job_id).await.id;
    let runpod = stack.run_once_stopped(&run, TIMEOUT).await;
    assert_eq!(runpod.status, runpod_emulator::JobStatus::Cancelled);
    stack.stop().await;
}

#[tokio::test]
async fn a_result_that_expired_at_runpod_fails_the_job_as_expired() {
    let stack = Stack::start_with(StackOptions {
        faults: Faults {
            webhooks_enabled: false,
            ..Faults::default()
        },
        sweep_every: Duration::from_secs(3),
        configure_emulator: |config| config.result_retention = Duration::from_millis(100),
        ..StackOptions::default()
    })
    .await;
    let (_, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "runpod_job_expired");
    assert_eq!(job["error"]["retryable"], true);
    stack.stop().await;
}

// ------------------------------------------------------------------ nothing left behind

/// A stack whose sweeper runs often and whose finalize lease is short, so an ended job's
/// clean-up comes soon.
async fn cleaning_stack(faults: Faults, extra_env: Vec<(&'static str, String)>) -> Stack {
    let mut env = vec![("FINALIZE_LEASE_SECS", "1".to_string())];
    env.extend(extra_env);
    Stack::start_with(StackOptions {
        faults,
        sweep_every: Duration::from_millis(300),
        extra_env: env,
        ..StackOptions::default()
    })
    .await
}

/// Waits until the sweeper has cleaned up after the ended job, then lists what of it is left
/// on the volume (its input and output folders) and in the results bucket beyond its outputs.
async fn left_behind(stack: &Stack, job_id: &str) -> Vec<String> {
    let until = std::time::Instant::now() + TIMEOUT;
    while stack.stored_job(job_id).await.cleanup_pending && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let job = stack.stored_job(job_id).await;
    assert!(
        !job.cleanup_pending,
        "the sweeper never cleaned up after {job_id}"
    );
    let mut left = stack.on_the_volume(job_id);
    let outputs: Vec<&str> = job.outputs.iter().map(|o| o.key.as_str()).collect();
    for key in stack
        .keys(&stack.results_bucket, &format!("results/alice/{job_id}/"))
        .await
    {
        if !outputs.contains(&key.as_str()) {
            left.push(key);
        }
    }
    left
}

#[tokio::test]
async fn a_succeeded_job_leaves_only_its_outputs() {
    let stack = cleaning_stack(Faults::default(), vec![]).await;
    let (job_id, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(left_behind(&stack, &job_id).await, Vec::<String>::new());
    assert_eq!(stack.result_files("alice", &job_id).await.len(), 1);
    stack.stop().await;
}

#[tokio::test]
async fn a_failed_job_leaves_nothing_on_the_volume() {
    let faults = Faults {
        worker_fail_message: Some("CUDA out of memory".into()),
        ..Faults::default()
    };
    let stack = cleaning_stack(faults, vec![]).await;
    let (job_id, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(left_behind(&stack, &job_id).await, Vec::<String>::new());
    stack.stop().await;
}

#[tokio::test]
async fn a_timed_out_job_leaves_nothing_on_the_volume() {
    let faults = Faults {
        worker_delay_ms: 20_000,
        ..Faults::default()
    };
    let stack = cleaning_stack(faults, vec![("JOB_DEADLINE_SECS", "2".into())]).await;
    let (job_id, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "timed_out", "{job}");
    assert_eq!(left_behind(&stack, &job_id).await, Vec::<String>::new());
    stack.stop().await;
}

#[tokio::test]
async fn a_cancelled_job_leaves_nothing_on_the_volume() {
    let faults = Faults {
        worker_delay_ms: 5_000,
        ..Faults::default()
    };
    let stack = cleaning_stack(faults, vec![]).await;
    let job_id = stack
        .submit_restore(ALICE, &gateway_tests::jpeg(200, 150), serde_json::json!({}))
        .await;
    stack
        .wait_status(ALICE, &job_id, "submitted", TIMEOUT)
        .await;
    let (status, body) = stack
        .post_json(
            ALICE,
            &format!("/jobs/{job_id}/cancel"),
            &serde_json::json!({}),
        )
        .await;
    assert_eq!(status, gateway_tests::StatusCode::OK, "{body}");
    assert_eq!(left_behind(&stack, &job_id).await, Vec::<String>::new());
    stack.stop().await;
}

// ------------------------------------------------------------------ deletion

/// Every object `job_id` has in either bucket, and everything of it on the volume.
async fn everything_of(stack: &Stack, job_id: &str) -> Vec<String> {
    let mut left = Vec::new();
    for (bucket, prefix) in [
        (&stack.results_bucket, format!("results/alice/{job_id}/")),
        (&stack.uploads_bucket, format!("inputs/alice/{job_id}/")),
    ] {
        left.extend(stack.keys(bucket, &prefix).await);
    }
    left.extend(stack.on_the_volume(job_id));
    left
}

#[tokio::test]
async fn a_deleted_job_leaves_no_object_in_any_bucket_or_on_the_volume() {
    let stack = cleaning_stack(Faults::default(), vec![]).await;
    let (job_id, job) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    let url = job["outputs"][0]["url"].as_str().unwrap().to_string();
    assert!(stack
        .http
        .get(&url)
        .send()
        .await
        .unwrap()
        .status()
        .is_success());

    let (status, body) = stack.delete(ALICE, &format!("/jobs/{job_id}")).await;

    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "deleted");
    assert!(
        !stack
            .http
            .get(&url)
            .send()
            .await
            .unwrap()
            .status()
            .is_success(),
        "a URL handed out before no longer works"
    );
    let (status, body) = stack.get(ALICE, &format!("/jobs/{job_id}")).await;
    assert_eq!(status, StatusCode::GONE, "{body}");
    assert_eq!(body["error"]["code"], "job_deleted");
    // The sweeper purges the rest.
    let until = std::time::Instant::now() + TIMEOUT;
    loop {
        let purged = stack
            .stored_job(&job_id)
            .await
            .deletion
            .is_some_and(|d| d.purged);
        if purged {
            break;
        }
        assert!(std::time::Instant::now() < until, "never purged");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(everything_of(&stack, &job_id).await, Vec::<String>::new());
    // Deleting it again changes nothing.
    let (again, _) = stack.delete(ALICE, &format!("/jobs/{job_id}")).await;
    assert_eq!(again, StatusCode::ACCEPTED);
    stack.stop().await;
}
