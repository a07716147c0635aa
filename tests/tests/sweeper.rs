//! The sweeper rescues what the happy path loses: jobs whose queue message vanished, jobs past
//! their deadline, jobs whose RunPod result expired before anyone asked.
use std::time::Duration;

use gateway_tests::{Stack, StackOptions, ALICE};
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
