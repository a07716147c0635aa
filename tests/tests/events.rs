//! Every sample event in `events/` runs through its function's handler against the local stack,
//! exactly as the Lambda runtime would hand it over: API Gateway v2 payloads through
//! `lambda_http` into the axum routers, the SQS batches into the dispatcher and the finalizer, the
//! schedules' inputs into the sweeper and the janitor.
use std::path::PathBuf;
use std::time::Duration;

use gateway::domain::job::Job;
use gateway::ports::JobStore;
use gateway_http::api::identity::IdentitySource;
use gateway_tests::{Stack, StackOptions};
use http_body_util::BodyExt;
use serde_json::Value;
use testkit::stack_env::LOCAL_VOLUME_ROOT;
use tower::ServiceExt;

/// The owner the sample API events' JWT names (`requestContext.authorizer.jwt.claims.sub`).
const SUB: &str = "4a8b2c1d-0e9f-4a7b-8c6d-5e4f3a2b1c0d";
/// The job the samples refer to, and the RunPod id the webhook sample carries.
const JOB: &str = "01a21c12-6fa0-7c4b-9a1e-2f3d4c5b6a79";
const SECOND_JOB: &str = "01a21c0a-3240-7d1e-8f3a-4b5c6d7e8f90";
const RUNPOD_ID: &str = "5f0c7e8a-3b2d-4c1e-9f8a-7b6c5d4e3f21-e1";

fn event(name: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../events")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

async fn stack() -> Stack {
    Stack::start_with(StackOptions {
        // The webhook sample's token is signed with this (fake) secret.
        extra_env: vec![(
            "WEBHOOK_SECRET",
            "example-webhook-secret-not-real-0001".into(),
        )],
        ..StackOptions::default()
    })
    .await
}

/// Stores a job as the API would have, with its input in the uploads bucket.
async fn seed_job(stack: &Stack, id: &str) -> Job {
    stack.store_queued_job(SUB, id, 3_600_000).await
}

async fn call(router: axum::Router, event: &str) -> (u16, Value) {
    let request = lambda_http::request::from_str(event).expect("an API Gateway event");
    let response = router.oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

fn submit_router(stack: &Stack) -> axum::Router {
    let state = gateway_http::api::ApiState::new(
        stack.wiring().api().unwrap(),
        stack.wiring().callbacks().unwrap(),
        IdentitySource::JwtClaims,
    );
    gateway_http::api::router(std::sync::Arc::new(state))
}

#[tokio::test]
async fn the_create_job_event_creates_a_job_for_the_jwt_subject() {
    let stack = stack().await;
    let (status, body) = call(submit_router(&stack), &event("submit-create-job.json")).await;
    assert_eq!(status, 202, "{body}");
    let job = stack.stored_job(body["job_id"].as_str().unwrap()).await;
    assert_eq!(job.owner, SUB);
    // The sample carries an Idempotency-Key: sending it again answers what the first got.
    let (again, body_again) = call(submit_router(&stack), &event("submit-create-job.json")).await;
    assert_eq!(again, 202);
    assert_eq!(body_again, body);
    stack.stop().await;
}

#[tokio::test]
async fn the_get_job_event_reads_the_subjects_job() {
    let stack = stack().await;
    seed_job(&stack, JOB).await;
    let (status, body) = call(submit_router(&stack), &event("submit-get-job.json")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["job_id"], JOB);
    assert_eq!(body["status"], "queued");
    stack.stop().await;
}

#[tokio::test]
async fn without_authorizer_claims_the_api_answers_401() {
    let stack = stack().await;
    let mut raw: Value = serde_json::from_str(&event("submit-get-job.json")).unwrap();
    raw["requestContext"]
        .as_object_mut()
        .unwrap()
        .remove("authorizer");
    let (status, _) = call(submit_router(&stack), &raw.to_string()).await;
    assert_eq!(status, 401);
    stack.stop().await;
}

#[tokio::test]
async fn the_webhook_event_hands_its_job_to_finalize() {
    let stack = stack().await;
    let job = seed_job(&stack, JOB).await;
    let store = stack.wiring().job_store().unwrap();
    let mut submitted = job.clone();
    submitted
        .mark_submitted(
            RUNPOD_ID.into(),
            job.timestamps.created_at + 1,
            i64::MAX / 2,
        )
        .unwrap();
    store.save(&submitted, job.version).await.unwrap();
    // The file the sample's output names, on the volume.
    let output = stack.emulator.volume_dir.join(format!(
        "{LOCAL_VOLUME_ROOT}/outputs/{JOB}/restore_00001_.png"
    ));
    std::fs::create_dir_all(output.parent().unwrap()).unwrap();
    image::RgbImage::new(8, 6).save(&output).unwrap();

    // The webhook is only a trigger: RunPod's /status must say the run completed, with the
    // output the sample's body reports.
    let sample: Value = serde_json::from_str(&event("webhook-completed.json")).unwrap();
    let reported: Value = serde_json::from_str(sample["body"].as_str().unwrap()).unwrap();
    stack
        .emulator
        .insert_completed(RUNPOD_ID, reported["output"].clone());

    let state = stack.wiring().webhook().unwrap();
    let router = gateway_http::webhook::router(std::sync::Arc::new(state));
    let (status, body) = call(router, &event("webhook-completed.json")).await;
    assert_eq!(status, 200, "{body}");

    // Handed to the finalize queue, whose consumer (the stack's runner) collects the output.
    let done = stack.stored_terminal(JOB, Duration::from_secs(60)).await;
    assert_eq!(done.state, gateway::domain::job::JobState::Succeeded);
    assert_eq!(
        stack.result_files(SUB, JOB).await,
        vec!["restore_00001_.png"]
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_finalize_event_collects_its_handed_off_job() {
    let stack = stack().await;
    let job = seed_job(&stack, JOB).await;
    let store = stack.wiring().job_store().unwrap();
    let output = format!("{LOCAL_VOLUME_ROOT}/outputs/{JOB}/restore_00001_.png");
    let file = stack.emulator.volume_dir.join(&output);
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    image::RgbImage::new(8, 6).save(&file).unwrap();
    // What the webhook left for finalize: RunPod's answer in the job's results folder, and the
    // hand-off on the job (made here directly, so that no message reaches the stack's runner).
    let report = gateway::ports::RunPodStatus {
        id: Some(RUNPOD_ID.into()),
        status: Some("COMPLETED".into()),
        output: Some(serde_json::json!({"files": [format!("/runpod-volume/{output}")]})),
        ..Default::default()
    };
    let report_key = gateway::domain::keys::report(SUB, JOB, RUNPOD_ID);
    let results = stack.wiring().results().unwrap();
    gateway::ports::ObjectStore::put_bytes(
        results.as_ref(),
        &report_key,
        serde_json::to_vec(&report).unwrap().into(),
        "application/json",
    )
    .await
    .unwrap();
    let mut handed = job.clone();
    let at = job.timestamps.created_at + 1;
    handed
        .mark_submitted(RUNPOD_ID.into(), at, i64::MAX / 2)
        .unwrap();
    handed
        .hand_off(RUNPOD_ID, report_key, at, i64::MAX / 2)
        .unwrap();
    handed.version = job.version + 1;
    store.save(&handed, job.version).await.unwrap();

    let sqs: aws_lambda_events::event::sqs::SqsEvent =
        serde_json::from_str(&event("finalize-sqs.json")).unwrap();
    let finalizer = stack.wiring().finalizer().unwrap();
    let response = gateway_aws::adapters::sqs::handle_finalize_batch(&finalizer, sqs, None).await;

    assert!(response.batch_item_failures.is_empty());
    let done = store.get(JOB).await.unwrap().unwrap();
    assert_eq!(done.state, gateway::domain::job::JobState::Succeeded);
    assert_eq!(
        done.history.last().unwrap().by,
        gateway::domain::job::Actor::Finalize
    );
    assert_eq!(
        stack.result_files(SUB, JOB).await,
        vec!["restore_00001_.png"]
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_sqs_event_dispatches_both_jobs() {
    let stack = stack().await;
    seed_job(&stack, JOB).await;
    seed_job(&stack, SECOND_JOB).await;
    let sqs: aws_lambda_events::event::sqs::SqsEvent =
        serde_json::from_str(&event("dispatch-sqs.json")).unwrap();
    let consumer = stack.wiring().consumer().unwrap();
    let response = gateway_aws::adapters::sqs::handle_batch(&consumer, sqs).await;
    assert!(response.batch_item_failures.is_empty());
    let store = stack.wiring().job_store().unwrap();
    for id in [JOB, SECOND_JOB] {
        let job = store.get(id).await.unwrap().unwrap();
        let runpod_id = job.runpod_job_id.expect("submitted to RunPod");
        assert!(stack.emulator.job(&runpod_id).is_some());
    }
    stack.stop().await;
}

#[tokio::test]
async fn the_janitors_schedule_event_runs_the_janitor() {
    let stack = stack().await;
    let input: Value = serde_json::from_str(&event("janitor-schedule.json")).unwrap();
    assert_eq!(input["source"], "gateway.janitor");
    let report = stack.wiring().janitor().unwrap().run_before(None).await;
    assert_eq!(report.errors, 0);
    assert_eq!(
        report.folders_seen, 0,
        "a fresh stack's volume folder is empty"
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_schedule_event_runs_a_sweep() {
    let stack = stack().await;
    let input: Value = serde_json::from_str(&event("sweeper-schedule.json")).unwrap();
    assert!(input.is_object());
    let report = stack.wiring().sweeper().unwrap().sweep().await.unwrap();
    assert_eq!(report.errors, 0);
    stack.stop().await;
}
