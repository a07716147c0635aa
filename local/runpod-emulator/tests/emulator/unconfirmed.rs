//! Behaviour that rests on facts the reference marks UNCONFIRMED, each behind a switch: both
//! answers are exercised here. The list, with the switches, is in the emulator's README.

use std::time::Duration;

use runpod_emulator::Faults;
use serde_json::{json, Value};

use crate::common::*;

async fn external() -> Harness {
    start_with(|c| {
        c.builtin_worker = false;
        c.worker_poll_hold = Duration::from_millis(200);
    })
    .await
}

async fn take(h: &Harness, pod: &str) -> Value {
    let response = h
        .http
        .get(h.url(&format!("job-take/{pod}?gpu=SIM&job_in_progress=0")))
        .header("authorization", &h.emu.api_key)
        .send()
        .await
        .unwrap();
    decode(response).await.1
}

async fn done(h: &Harness, pod: &str, id: &str, body: String) -> u16 {
    h.http
        .post(h.url(&format!("job-done/{pod}/{id}?gpu=SIM&isStream=false")))
        .header("authorization", &h.emu.api_key)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn s3_config_reaches_the_worker_under_the_configured_key_or_not_at_all() {
    let h = external().await;
    let s3 =
        json!({"accessId": "a", "accessSecret": "s", "bucketName": "b", "endpointUrl": "http://x"});
    h.run(json!({"input": {}, "s3Config": s3})).await;
    assert_eq!(take(&h, "pod1").await["s3Config"], s3);

    let h = start_with(|c| {
        c.builtin_worker = false;
        c.s3_config_job_key = None;
    })
    .await;
    h.run(json!({"input": {}, "s3Config": s3})).await;
    let job = take(&h, "pod1").await;
    assert!(job.get("s3Config").is_none(), "{job}");
    assert_eq!(job["input"], json!({}));
}

#[tokio::test]
async fn job_done_over_the_result_limit_is_400_and_completes_without_output() {
    let h = start_with(|c| {
        c.builtin_worker = false;
        c.job_done_max_bytes = 1024;
    })
    .await;
    let id = h.run(json!({"input": {}})).await;
    take(&h, "pod1").await;
    let big = json!({"output": {"data": "x".repeat(2048)}}).to_string();
    assert_eq!(done(&h, "pod1", &id, big).await, 400);
    let body = h.wait_status(&id, "COMPLETED").await;
    assert!(body.get("output").is_none(), "{body}");

    // The same body under the default (20 MB) limit goes through.
    let h = external().await;
    let id = h.run(json!({"input": {}})).await;
    take(&h, "pod1").await;
    let big = json!({"output": {"data": "x".repeat(2048)}}).to_string();
    assert_eq!(done(&h, "pod1", &id, big).await, 200);
    let body = h.wait_status(&id, "COMPLETED").await;
    assert_eq!(body["output"]["data"].as_str().unwrap().len(), 2048);
}

#[tokio::test]
async fn job_id_suffix_and_not_found_body_are_configurable() {
    let h = start().await;
    let id = h.run(json!({"input": {}})).await;
    assert!(id.ends_with("-e1"), "{id}");
    let (status, body) = h.status("nope").await;
    assert_eq!(status.as_u16(), 404);
    assert_eq!(body, json!({"error": "job not found"}));

    let h = start_with(|c| {
        c.job_id_suffix = "-u1".into();
        c.job_not_found_body = json!({"message": "request does not exist"});
    })
    .await;
    let id = h.run(json!({"input": {}})).await;
    assert!(id.ends_with("-u1"), "{id}");
    let (status, body) = h.status("nope").await;
    assert_eq!(status.as_u16(), 404);
    assert_eq!(body, json!({"message": "request does not exist"}));
}

#[tokio::test]
async fn webhook_content_type_and_worker_id_are_switches() {
    let hook = Receiver::start(200).await;
    let h = start_with(|c| {
        c.faults = Faults {
            webhook_content_type: String::new(),
            webhook_worker_id: true,
            ..Faults::default()
        };
    })
    .await;
    let mut job = trivial_job(&h.dir);
    job["webhook"] = json!(hook.url);
    h.run(job).await;
    let hits = hook.wait_hits(1).await;
    assert_eq!(hits[0].content_type, None);
    let payload: Value = serde_json::from_slice(&hits[0].body).unwrap();
    assert!(
        payload["workerId"]
            .as_str()
            .unwrap()
            .starts_with("builtin-"),
        "{payload}"
    );
}

#[tokio::test]
async fn run_queue_limit_answers_429_while_the_queue_is_full() {
    let h = start_with(|c| {
        c.builtin_worker = false;
        c.faults = Faults {
            run_queue_limit: Some(1),
            ..Faults::default()
        };
    })
    .await;
    h.run(json!({"input": {}})).await;
    h.run(json!({"input": {}})).await;
    let (status, _) = h.post("run", json!({"input": {}})).await;
    assert_eq!(status.as_u16(), 429);
    h.emu.set_faults(Faults::default());
    h.run(json!({"input": {}})).await;
}

#[tokio::test]
async fn worker_calls_are_logged() {
    let h = external().await;
    let id = h.run(json!({"input": {}})).await;
    take(&h, "pod1").await;
    done(
        &h,
        "pod1",
        &id,
        json!({"status": "IN_PROGRESS", "output": 1}).to_string(),
    )
    .await;
    done(&h, "pod1", &id, json!({"output": 2}).to_string()).await;
    let calls: Vec<(String, Vec<String>, u16)> = h
        .emu
        .worker_calls()
        .into_iter()
        .map(|c| (c.route, c.job_ids, c.status))
        .collect();
    assert_eq!(
        calls,
        vec![
            ("job-take".to_owned(), vec![id.clone()], 200),
            ("job-progress".to_owned(), vec![id.clone()], 200),
            ("job-done".to_owned(), vec![id.clone()], 200),
        ]
    );
    let (_, over_http) = h
        .http
        .get(format!("{}/_emulator/worker-calls?pod=pod1", h.emu.api_url))
        .send()
        .await
        .map(|r| async { decode(r).await })
        .unwrap()
        .await;
    assert_eq!(over_http.as_array().unwrap().len(), 3);
}
