//! The job lifecycle: cancel, retry, purge, retention, TTL, executionTimeout, runsync.

use std::time::Duration;

use axum::http::StatusCode;
use runpod_emulator::Faults;
use serde_json::{json, Value};

use crate::common::*;

fn slow(ms: u64) -> Faults {
    Faults {
        worker_delay_ms: ms,
        ..Default::default()
    }
}

#[tokio::test]
async fn cancel_removes_a_queued_job_from_the_queue() {
    let h = start_with(|c| c.builtin_worker = false).await;
    let id = h.run(json!({"input": {}})).await;
    let (status, body) = h.post(&format!("cancel/{id}"), Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"id": id, "status": "CANCELLED"}));
    assert_eq!(h.status(&id).await.1["status"], "CANCELLED");
    assert_eq!(h.get("health").await.1["jobs"]["inQueue"], 0);
}

#[tokio::test]
async fn cancel_stops_a_running_job_for_good() {
    let h = start().await;
    h.emu.set_faults(slow(400));
    let id = h.run(trivial_job(&h.dir)).await;
    h.wait_status(&id, "IN_PROGRESS").await;
    let (_, body) = h.post(&format!("cancel/{id}"), Value::Null).await;
    assert_eq!(body["status"], "CANCELLED");
    tokio::time::sleep(Duration::from_millis(700)).await;
    let (_, body) = h.status(&id).await;
    assert_eq!(body["status"], "CANCELLED");
    assert!(body.get("output").is_none(), "{body}");
    assert_eq!(h.get("health").await.1["workers"]["running"], 0);
}

#[tokio::test]
async fn the_builtin_worker_reports_progress_while_in_progress() {
    let h = start().await;
    h.emu.set_faults(slow(2_000));
    let id = h.run(trivial_job(&h.dir)).await;
    h.wait_status(&id, "IN_PROGRESS").await;

    let (_, body) = h.status(&id).await;

    assert_eq!(body["status"], "IN_PROGRESS");
    assert_eq!(body["output"]["message"], "loading workflow", "{body}");
    assert!(body["output"]["fraction"].as_f64().unwrap() < 1.0);
}

#[tokio::test]
async fn cancel_of_a_terminal_job_keeps_its_status() {
    let h = start().await;
    let id = h.run(trivial_job(&h.dir)).await;
    h.wait_status(&id, "COMPLETED").await;
    let (status, body) = h.post(&format!("cancel/{id}"), Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "COMPLETED");
    assert_eq!(h.status(&id).await.1["status"], "COMPLETED");
}

#[tokio::test]
async fn retry_requeues_a_failed_job_with_the_same_id() {
    let h = start().await;
    h.emu.set_faults(Faults {
        worker_fail_message: Some("CUDA out of memory".into()),
        ..Default::default()
    });
    let id = h.run(trivial_job(&h.dir)).await;
    h.wait_status(&id, "FAILED").await;
    h.emu.set_faults(Faults::default());
    let (status, body) = h.post(&format!("retry/{id}"), Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"id": id, "status": "IN_QUEUE"}));
    let done = h.wait_status(&id, "COMPLETED").await;
    assert!(done.get("error").is_none(), "{done}");
    assert_eq!(done["output"]["file_count"], 1);
    assert_eq!(h.emu.job(&id).unwrap().attempt, 2);
}

#[tokio::test]
async fn retry_of_a_completed_job_is_400() {
    let h = start().await;
    let id = h.run(trivial_job(&h.dir)).await;
    h.wait_status(&id, "COMPLETED").await;
    let (status, body) = h.post(&format!("retry/{id}"), Value::Null).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].is_string());
}

#[tokio::test]
async fn purge_queue_removes_only_queued_jobs() {
    let h = start_with(|c| c.builtin_worker = false).await;
    let a = h.run(json!({"input": {}})).await;
    let b = h.run(json!({"input": {}})).await;
    let (status, body) = h.post("purge-queue", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"removed": 2, "status": "completed"}));
    assert_eq!(h.status(&a).await.0, StatusCode::NOT_FOUND);
    assert_eq!(h.status(&b).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn result_expires_after_retention() {
    let h = start_with(|c| c.result_retention = Duration::from_millis(300)).await;
    let id = h.run(trivial_job(&h.dir)).await;
    h.wait_status(&id, "COMPLETED").await;
    let (code, _) = h
        .wait_for(&id, Duration::from_secs(3), |code, _| {
            code == StatusCode::NOT_FOUND
        })
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    let (status, _) = h.post(&format!("retry/{id}"), Value::Null).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn ttl_expiry_of_a_queued_job_is_404() {
    let h = start_with(|c| c.builtin_worker = false).await;
    let id = h.run(json!({"input": {}, "policy": {"ttl": 200}})).await;
    assert_eq!(h.status(&id).await.0, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(h.status(&id).await.0, StatusCode::NOT_FOUND);
    assert_eq!(h.get("health").await.1["jobs"]["inQueue"], 0);
}

#[tokio::test]
async fn ttl_expiry_of_a_running_job_removes_it_immediately() {
    let h = start().await;
    h.emu.set_faults(slow(1000));
    let id = h.run(json!({"input": {}, "policy": {"ttl": 300}})).await;
    h.wait_status(&id, "IN_PROGRESS").await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(h.status(&id).await.0, StatusCode::NOT_FOUND);
    // The worker's late result must not resurrect it.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(h.status(&id).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn execution_timeout_gives_timed_out_and_ignores_the_late_result() {
    let h = start().await;
    h.emu.set_faults(slow(800));
    let id = h
        .run(json!({"input": {}, "policy": {"executionTimeout": 200}}))
        .await;
    let body = h.wait_status(&id, "TIMED_OUT").await;
    let execution = body["executionTime"].as_u64().unwrap();
    assert!((200..400).contains(&execution), "{body}");
    tokio::time::sleep(Duration::from_millis(900)).await;
    let (_, body) = h.status(&id).await;
    assert_eq!(body["status"], "TIMED_OUT");
    assert!(body.get("output").is_none(), "{body}");
}

#[tokio::test]
async fn timed_out_job_can_be_retried() {
    let h = start().await;
    h.emu.set_faults(slow(500));
    let id = h
        .run(json!({"input": {}, "policy": {"executionTimeout": 100}}))
        .await;
    h.wait_status(&id, "TIMED_OUT").await;
    let (status, _) = h.post(&format!("retry/{id}"), Value::Null).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn status_reports_delay_and_execution_time() {
    let h = start_with(|c| c.builtin_worker = false).await;
    let id = h.run(json!({"input": {}})).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (_, body) = h.status(&id).await;
    assert!(body["delayTime"].as_u64().unwrap() >= 150, "{body}");
    assert_eq!(body["executionTime"], 0);
}

#[tokio::test]
async fn runsync_returns_the_output_when_done() {
    let h = start().await;
    let (status, body) = h.post("runsync", trivial_job(&h.dir)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "COMPLETED", "{body}");
    assert!(body["id"].as_str().unwrap().starts_with("sync-"));
    assert_eq!(body["output"]["file_count"], 1);
    assert!(body["delayTime"].is_u64() && body["executionTime"].is_u64());
}

#[tokio::test]
async fn runsync_returns_a_non_final_status_when_the_wait_ends() {
    let h = start().await;
    h.emu.set_faults(slow(3000));
    let started = tokio::time::Instant::now();
    let (status, body) = h.post("runsync?wait=1000", json!({"input": {}})).await;
    assert_eq!(status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_millis(1000));
    assert_eq!(body["status"], "IN_PROGRESS", "{body}");
    let id = body["id"].as_str().unwrap();
    assert_eq!(h.status(id).await.0, StatusCode::OK);
    let (_, cancelled) = h.post(&format!("cancel/{id}"), Value::Null).await;
    assert_eq!(cancelled["status"], "CANCELLED");
}

#[tokio::test]
async fn runsync_wait_out_of_range_is_400() {
    let h = start().await;
    let (status, _) = h.post("runsync?wait=999", json!({"input": {}})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}
