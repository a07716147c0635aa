//! Auth, request validation and error shapes of the endpoint API.

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

#[tokio::test]
async fn missing_authorization_is_401() {
    let h = start().await;
    let response = h
        .http
        .post(h.url("run"))
        .json(&json!({"input": {}}))
        .send()
        .await
        .unwrap();
    let (status, body) = decode(response).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(body["error"].is_string(), "{body}");
}

#[tokio::test]
async fn wrong_key_is_401() {
    let h = start().await;
    let response = h
        .http
        .get(h.url("health"))
        .bearer_auth("not-the-key")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
}

#[tokio::test]
async fn raw_key_without_bearer_is_accepted() {
    let h = start().await;
    let response = h
        .http
        .get(h.url("health"))
        .header("authorization", &h.emu.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn unknown_endpoint_is_404() {
    let h = start().await;
    let response = h
        .http
        .get(format!("{}/v2/other-endpoint/health", h.emu.api_url))
        .bearer_auth(&h.emu.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
}

#[tokio::test]
async fn run_without_input_is_400() {
    let h = start().await;
    let (status, body) = h
        .post("run", json!({"webhook": "http://127.0.0.1:1/x"}))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].as_str().unwrap().contains("input"), "{body}");
    let (status, _) = h.post("run", json!({"input": "not an object"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn invalid_json_is_400() {
    let h = start().await;
    let response = h
        .http
        .post(h.url("run"))
        .bearer_auth(&h.emu.api_key)
        .header("content-type", "application/json")
        .body("{\"input\": ")
        .send()
        .await
        .unwrap();
    let (status, body) = decode(response).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(body["error"].is_string(), "{body}");
}

#[tokio::test]
async fn policy_out_of_range_is_400() {
    // Production limits, not the test harness's lowered minimums.
    let h = start_with(|c| {
        c.min_execution_timeout = std::time::Duration::from_secs(5);
        c.min_ttl = std::time::Duration::from_secs(10);
    })
    .await;
    for policy in [
        json!({"executionTimeout": 4999}),
        json!({"executionTimeout": 7 * 24 * 3_600_000u64 + 1}),
        json!({"ttl": 9999}),
        json!({"ttl": "600000"}),
    ] {
        let (status, body) = h.post("run", json!({"input": {}, "policy": policy})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{policy} -> {body}");
    }
    let (status, _) = h
        .post("run", json!({"input": {}, "policy": {"executionTimeout": 5000, "ttl": 10000, "lowPriority": true}}))
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn body_over_10_mb_is_rejected() {
    let h = start().await;
    let big = "x".repeat(10 * 1024 * 1024 + 1);
    let (status, _) = h.post("run", json!({"input": {"blob": big}})).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn status_of_unknown_job_is_404_json() {
    let h = start().await;
    let (status, body) = h.status("00000000-0000-0000-0000-000000000000-e1").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, json!({"error": "job not found"}));
}

#[tokio::test]
async fn run_ids_are_uuid_with_suffix() {
    let h = start_with(|c| c.builtin_worker = false).await;
    let id = h.run(json!({"input": {}})).await;
    let uuid_part = id.strip_suffix("-e1").expect("-e1 suffix");
    assert!(uuid::Uuid::parse_str(uuid_part).is_ok(), "{id}");
}

#[tokio::test]
async fn status_accepts_post_too() {
    let h = start_with(|c| c.builtin_worker = false).await;
    let id = h.run(json!({"input": {}})).await;
    let (status, body) = h.post(&format!("status/{id}"), Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["status"], "IN_QUEUE");
}

#[tokio::test]
async fn run_status_fault_answers_429_for_the_next_n_runs() {
    let h = start().await;
    h.emu.set_faults(runpod_emulator::Faults {
        run_status: Some(429),
        run_fail_count: 1,
        ..Default::default()
    });
    let (status, _) = h.post("run", json!({"input": {}})).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    let (status, _) = h.post("run", json!({"input": {}})).await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn run_status_fault_without_count_fails_every_run() {
    let h = start().await;
    h.emu.set_faults(runpod_emulator::Faults {
        run_status: Some(500),
        ..Default::default()
    });
    for _ in 0..3 {
        let (status, _) = h.post("run", json!({"input": {}})).await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    }
}

#[tokio::test]
async fn health_reports_jobs_and_workers() {
    let h = start_with(|c| c.worker_concurrency = 1).await;
    h.emu.set_faults(runpod_emulator::Faults {
        worker_delay_ms: 1500,
        ..Default::default()
    });
    let first = h.run(json!({"input": {}})).await;
    h.wait_status(&first, "IN_PROGRESS").await;
    h.run(json!({"input": {}})).await;
    let (status, health) = h.get("health").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        health,
        json!({
            "jobs": {"completed": 0, "failed": 0, "inProgress": 1, "inQueue": 1, "retried": 0},
            "workers": {"idle": 0, "running": 1}
        })
    );
}

#[tokio::test]
async fn health_counts_completed_failed_and_retried() {
    let h = start().await;
    let ok = h.run(trivial_job(&h.dir)).await;
    h.wait_status(&ok, "COMPLETED").await;
    h.emu.set_faults(runpod_emulator::Faults {
        worker_fail_message: Some("boom".into()),
        ..Default::default()
    });
    let bad = h.run(json!({"input": {}})).await;
    h.wait_status(&bad, "FAILED").await;
    let (status, _) = h.post(&format!("retry/{bad}"), Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    h.wait_status(&bad, "FAILED").await;
    let (_, health) = h.get("health").await;
    assert_eq!(health["jobs"]["completed"], 1);
    assert_eq!(health["jobs"]["failed"], 2);
    assert_eq!(health["jobs"]["retried"], 1);
    assert_eq!(health["workers"], json!({"idle": 2, "running": 0}));
}
