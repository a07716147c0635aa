//! The sweeper rescues what the happy path loses: jobs whose queue message vanished, jobs past
//! their deadline, jobs whose RunPod result expired before anyone asked.
use std::time::Duration;

use gateway::adapters::dynamodb::DynamoJobStore;
use gateway::domain::job::{InputRef, Job, JobTiming, NewJob};
use gateway::domain::workflow::WorkflowCatalog;
use gateway::ports::JobStore;
use gateway_tests::{jpeg, Stack, StackOptions, ALICE};
use runpod_emulator::Faults;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn a_job_whose_queue_message_was_lost_is_re_enqueued() {
    let stack = Stack::start_with(StackOptions {
        sweep_every: Duration::from_millis(300),
        ..StackOptions::default()
    })
    .await;
    // A job stored as the API stores it, but whose SQS message never made it.
    let key = "inputs/alice/lost/input.jpg";
    stack
        .s3()
        .put_object()
        .bucket(&stack.uploads_bucket)
        .key(key)
        .body(jpeg(200, 150).into())
        .send()
        .await
        .unwrap();
    let workflow = WorkflowCatalog::builtin().unwrap();
    let restore = workflow.get("restore").unwrap();
    let params = restore
        .validate(&serde_json::Map::new(), &mut rand_seed())
        .unwrap();
    let job = Job::new(
        NewJob {
            id: uuid::Uuid::now_v7().to_string(),
            owner: "alice".into(),
            workflow: "restore".into(),
            workflow_version: restore.version().into(),
            params,
            input: InputRef {
                key: key.into(),
                content_type: "image/jpeg".into(),
                size: 1,
                extension: "jpg".into(),
            },
            idempotency_key: None,
            callback_url: None,
        },
        JobTiming {
            deadline_ms: 600_000,
            first_check_ms: 0,
            retention_secs: 3_600,
        },
        now_ms(),
    );
    DynamoJobStore::new(stack.dynamodb(), &stack.table)
        .create(&job)
        .await
        .unwrap();

    let done = stack.wait_terminal(ALICE, &job.id, TIMEOUT).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    stack.stop().await;
}

fn rand_seed() -> impl rand::Rng {
    rand::rngs::StdRng::seed_from_u64(7)
}
use rand::SeedableRng;

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
    let job_id = stack
        .submit_restore(ALICE, &jpeg(200, 150), json!({}))
        .await;
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "timed_out", "{job}");
    assert_eq!(job["error"]["code"], "deadline_exceeded");
    let runpod = stack.runpod_job(&job_id).await;
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
    let job_id = stack
        .submit_restore(ALICE, &jpeg(200, 150), json!({}))
        .await;
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "runpod_job_expired");
    assert_eq!(job["error"]["retryable"], true);
    stack.stop().await;
}
