//! The worker protocol, driven with the exact requests the `runpod` SDK 1.12 makes
//! (reference §4.2–4.3): raw-key auth, `?gpu=…&job_in_progress=…`, job-done as JSON text under a
//! form content type.

use std::time::Duration;

use axum::http::StatusCode;
use serde_json::{json, Value};

use crate::common::*;

async fn external() -> Harness {
    start_with(|c| {
        c.builtin_worker = false;
        c.worker_poll_hold = Duration::from_millis(300);
    })
    .await
}

impl Harness {
    async fn job_take(&self, pod: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(self.url(&format!("job-take/{pod}?gpu=SIM&job_in_progress=0")))
            .header("authorization", &self.emu.api_key)
            .send()
            .await
            .unwrap();
        decode(response).await
    }

    async fn job_done(&self, pod: &str, id: &str, body: Value) -> StatusCode {
        self.http
            .post(self.url(&format!("job-done/{pod}/{id}?gpu=SIM&isStream=false")))
            .header("authorization", &self.emu.api_key)
            .header("content-type", "application/x-www-form-urlencoded")
            .header("charset", "utf-8")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
            .try_into()
            .unwrap()
    }

    async fn job_stop(&self, pod: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(self.url(&format!("job-stop/{pod}?gpu=SIM")))
            .header("authorization", &self.emu.api_key)
            .send()
            .await
            .unwrap();
        decode(response).await
    }
}

#[tokio::test]
async fn job_take_hands_out_the_job_and_job_done_completes_it() {
    let h = external().await;
    let hook = Receiver::start(200).await;
    let id = h.run(json!({"input": {"x": 1}, "webhook": hook.url})).await;
    let (status, job) = h.job_take("pod1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        job,
        json!({"id": id, "input": {"x": 1}, "webhook": hook.url})
    );
    assert_eq!(h.status(&id).await.1["status"], "IN_PROGRESS");

    let status = h
        .job_done("pod1", &id, json!({"output": {"echo": {"x": 1}}}))
        .await;
    assert_eq!(status, StatusCode::OK);
    let body = h.wait_status(&id, "COMPLETED").await;
    assert_eq!(body["output"], json!({"echo": {"x": 1}}));
    let hits = hook.wait_hits(1).await;
    let payload: Value = serde_json::from_slice(&hits[0].body).unwrap();
    assert_eq!(payload["status"], "COMPLETED");
}

#[tokio::test]
async fn job_take_holds_the_poll_then_answers_204() {
    let h = external().await;
    let started = tokio::time::Instant::now();
    let (status, _) = h.job_take("pod1").await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn job_take_wakes_up_when_a_job_arrives() {
    let h = start_with(|c| {
        c.builtin_worker = false;
        c.worker_poll_hold = Duration::from_secs(5);
    })
    .await;
    let started = tokio::time::Instant::now();
    let (take, id) = tokio::join!(h.job_take("pod1"), async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        h.run(json!({"input": {}})).await
    });
    assert_eq!(take.0, StatusCode::OK);
    assert_eq!(take.1["id"], id);
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn job_take_batch_returns_a_list() {
    let h = external().await;
    h.run(json!({"input": {"n": 1}})).await;
    h.run(json!({"input": {"n": 2}})).await;
    let response = h
        .http
        .get(h.url("job-take-batch/pod1?gpu=SIM&batch_size=5&job_in_progress=0"))
        .header("authorization", &h.emu.api_key)
        .send()
        .await
        .unwrap();
    let (status, jobs) = decode(response).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(jobs.as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn job_done_with_a_string_error_fails_the_job() {
    let h = external().await;
    let id = h.run(json!({"input": {}})).await;
    h.job_take("pod1").await;
    let status = h
        .job_done(
            "pod1",
            &id,
            json!({"output": {"partial": 1}, "error": "bad input"}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let body = h.wait_status(&id, "FAILED").await;
    assert_eq!(body["error"], "bad input");
}

#[tokio::test]
async fn job_done_with_a_dict_error_completes_the_job() {
    let h = external().await;
    let id = h.run(json!({"input": {}})).await;
    h.job_take("pod1").await;
    h.job_done("pod1", &id, json!({"error": {"message": "oops"}}))
        .await;
    h.wait_status(&id, "COMPLETED").await;
}

#[tokio::test]
async fn progress_update_shows_in_status_output() {
    let h = external().await;
    let id = h.run(json!({"input": {}})).await;
    h.job_take("pod1").await;
    let status = h
        .job_done(
            "pod1",
            &id,
            json!({"status": "IN_PROGRESS", "output": {"pct": 50}}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, body) = h.status(&id).await;
    assert_eq!(body["status"], "IN_PROGRESS");
    assert_eq!(body["output"], json!({"pct": 50}));
}

#[tokio::test]
async fn cancel_reaches_the_worker_through_job_stop() {
    let h = external().await;
    let id = h.run(json!({"input": {}})).await;
    h.job_take("pod1").await;
    assert_eq!(h.job_stop("pod1").await.0, StatusCode::NO_CONTENT);
    h.post(&format!("cancel/{id}"), Value::Null).await;
    let (status, body) = h.job_stop("pod1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body, json!({"jobsToStop": [id]}));
    // A result sent anyway changes nothing.
    h.job_done("pod1", &id, json!({"output": 1})).await;
    assert_eq!(h.status(&id).await.1["status"], "CANCELLED");
}

#[tokio::test]
async fn job_done_after_ttl_expiry_is_404() {
    let h = external().await;
    let id = h.run(json!({"input": {}, "policy": {"ttl": 200}})).await;
    h.job_take("pod1").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = h.job_done("pod1", &id, json!({"output": 1})).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn pinging_worker_counts_in_health() {
    let h = external().await;
    let response = h
        .http
        .get(h.url("ping/pod1?gpu=SIM&runpod_version=1.12.0"))
        .header("authorization", &h.emu.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(
        h.get("health").await.1["workers"],
        json!({"idle": 1, "running": 0})
    );
    h.run(json!({"input": {}})).await;
    h.job_take("pod1").await;
    assert_eq!(
        h.get("health").await.1["workers"],
        json!({"idle": 0, "running": 1})
    );
}

#[tokio::test]
async fn worker_routes_require_the_api_key() {
    let h = external().await;
    let response = h
        .http
        .get(h.url("job-take/pod1?gpu=SIM"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
}
