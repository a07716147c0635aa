//! The public API's contract: identity, ownership, validation (a bad job leaves no trace),
//! listing, idempotency and uploads.
use std::time::Duration;

use gateway_tests::{jpeg, restore_request, Stack, StatusCode, ALICE, BOB};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(30);

async fn assert_rejected_without_trace(
    stack: &Stack,
    status: StatusCode,
    body: &Value,
    code: &str,
) {
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    assert_eq!(
        stack.table_items().await,
        0,
        "a rejected job wrote to the table"
    );
    assert_eq!(
        stack.queue_depth().await,
        0,
        "a rejected job reached the queue"
    );
}

#[tokio::test]
async fn out_of_range_params_are_refused_and_nothing_is_written() {
    let stack = Stack::start().await;
    let (status, body) = stack
        .post_json(
            ALICE,
            "/jobs",
            &restore_request(&jpeg(64, 48), json!({"denoise": 1.5})),
        )
        .await;
    assert_rejected_without_trace(&stack, status, &body, "invalid_params").await;
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("denoise"));
    stack.stop().await;
}

#[tokio::test]
async fn an_unknown_workflow_is_refused_and_nothing_is_written() {
    let stack = Stack::start().await;
    let mut request = restore_request(&jpeg(64, 48), json!({}));
    request["workflow"] = json!("colorize-everything");
    let (status, body) = stack.post_json(ALICE, "/jobs", &request).await;
    assert_rejected_without_trace(&stack, status, &body, "unknown_workflow").await;
    stack.stop().await;
}

#[tokio::test]
async fn a_non_image_input_is_refused_and_nothing_is_written() {
    let stack = Stack::start().await;
    let (status, body) = stack
        .post_json(
            ALICE,
            "/jobs",
            &restore_request(b"%PDF-1.4 definitely not a photo", json!({})),
        )
        .await;
    assert_rejected_without_trace(&stack, status, &body, "invalid_input_image").await;
    assert!(
        stack.keys(&stack.uploads_bucket, "").await.is_empty(),
        "input stored"
    );
    stack.stop().await;
}

#[tokio::test]
async fn malformed_json_is_refused_and_nothing_is_written() {
    let stack = Stack::start().await;
    let (status, body) = stack
        .post_raw(ALICE, "/jobs", "{\"workflow\": \"restore\", \"params\": {")
        .await;
    assert_rejected_without_trace(&stack, status, &body, "invalid_json").await;
    stack.stop().await;
}

#[tokio::test]
async fn bad_base64_and_both_inputs_are_refused() {
    let stack = Stack::start().await;
    let (status, body) = stack
        .post_json(
            ALICE,
            "/jobs",
            &json!({"workflow": "restore", "input": {"image_base64": "***"}}),
        )
        .await;
    assert_rejected_without_trace(&stack, status, &body, "invalid_input_image").await;
    let (status, body) = stack
        .post_json(
            ALICE,
            "/jobs",
            &json!({"workflow": "restore", "input": {"image_base64": "aGk=", "upload_id": "x"}}),
        )
        .await;
    assert_rejected_without_trace(&stack, status, &body, "invalid_input").await;
    stack.stop().await;
}

#[tokio::test]
async fn requests_without_a_valid_token_get_401() {
    let stack = Stack::start().await;
    let (status, body) = stack.get("not-a-token", "/jobs").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(body["error"]["code"], "unauthorized");
    let response = stack.http.get(stack.url("/jobs")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    stack.stop().await;
}

#[tokio::test]
async fn another_owners_job_is_not_found_for_reading_or_cancelling() {
    let stack = Stack::start().await;
    let job_id = stack
        .submit_restore(ALICE, &jpeg(200, 150), json!({"megapixels": 0.02}))
        .await;
    let (status, body) = stack.get(BOB, &format!("/jobs/{job_id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{body}");
    assert_eq!(body["error"]["code"], "not_found");
    let (status, _) = stack
        .post_json(BOB, &format!("/jobs/{job_id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(
        job["status"], "succeeded",
        "bob's cancel must not touch alice's job"
    );
    let (_, list) = stack.get(BOB, "/jobs").await;
    assert_eq!(list["jobs"], json!([]));
    stack.stop().await;
}

#[tokio::test]
async fn listing_is_newest_first_and_paginated() {
    let stack = Stack::start().await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            stack
                .submit_restore(ALICE, &jpeg(64, 48), json!({"megapixels": 0.01}))
                .await,
        );
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let path = match &cursor {
            Some(c) => format!("/jobs?limit=2&cursor={c}"),
            None => "/jobs?limit=2".to_string(),
        };
        let (status, page) = stack.get(ALICE, &path).await;
        assert_eq!(status, StatusCode::OK, "{page}");
        let jobs = page["jobs"].as_array().unwrap();
        assert!(jobs.len() <= 2);
        seen.extend(
            jobs.iter()
                .map(|j| j["job_id"].as_str().unwrap().to_string()),
        );
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_string()),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(seen, ids);
    let (status, body) = stack
        .get(BOB, &format!("/jobs?cursor={}", cursor.unwrap_or_default()))
        .await;
    assert!(
        status == StatusCode::OK || status == StatusCode::BAD_REQUEST,
        "{body}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_status_filter_lists_only_jobs_in_that_state() {
    let stack = Stack::start().await;
    let (done, _) = stack.restore_until_terminal(ALICE, TIMEOUT).await;
    let cancelled = stack
        .submit_restore(ALICE, &jpeg(64, 48), json!({"megapixels": 0.01}))
        .await;
    stack
        .post_json(ALICE, &format!("/jobs/{cancelled}/cancel"), &json!({}))
        .await;
    let ids = |page: &Value| -> Vec<String> {
        page["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["job_id"].as_str().unwrap().to_string())
            .collect()
    };

    let (_, succeeded) = stack.get(ALICE, "/jobs?status=succeeded").await;
    let (_, cancelled_page) = stack.get(ALICE, "/jobs?status=cancelled").await;
    let (_, bobs) = stack.get(BOB, "/jobs?status=succeeded").await;
    let (status, bad) = stack.get(ALICE, "/jobs?status=finished").await;

    assert_eq!(ids(&succeeded), [done]);
    assert_eq!(ids(&cancelled_page), [cancelled]);
    assert!(ids(&bobs).is_empty());
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(bad["error"]["code"], "invalid_status");
    stack.stop().await;
}

#[tokio::test]
async fn the_workflows_are_listed_with_their_params_as_json_schema() {
    let stack = Stack::start().await;

    let (status, body) = stack.get(ALICE, "/workflows").await;

    assert_eq!(status, StatusCode::OK, "{body}");
    let restore = body["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "restore")
        .expect("restore is listed");
    assert_eq!(restore["params"]["type"], "object");
    assert_eq!(
        restore["params"]["properties"]["megapixels"]["maximum"],
        4.0
    );
    assert_eq!(restore["params"]["additionalProperties"], false);
    stack.stop().await;
}

#[tokio::test]
async fn an_idempotency_key_returns_the_first_job_instead_of_a_second() {
    let stack = Stack::start().await;
    let request = restore_request(&jpeg(64, 48), json!({"megapixels": 0.01}));
    let send = || {
        stack
            .http
            .post(stack.url("/jobs"))
            .bearer_auth(ALICE)
            .header("idempotency-key", "order-42")
            .json(&request)
            .send()
    };
    let first = send().await.unwrap();
    assert_eq!(first.status(), StatusCode::ACCEPTED);
    let first: Value = first.json().await.unwrap();
    let second = send().await.unwrap();
    assert_eq!(
        second.status(),
        StatusCode::ACCEPTED,
        "the replay gets the first answer"
    );
    let second: Value = second.json().await.unwrap();
    assert_eq!(first, second);
    let (_, list) = stack.get(ALICE, "/jobs").await;
    assert_eq!(list["jobs"].as_array().unwrap().len(), 1);
    assert_eq!(
        stack.keys(&stack.uploads_bucket, "inputs/").await.len(),
        1,
        "the replay stored no input"
    );

    // The same key for another request is refused, and stores nothing either.
    let other = restore_request(&jpeg(64, 48), json!({"megapixels": 0.02}));
    let reused = stack
        .http
        .post(stack.url("/jobs"))
        .bearer_auth(ALICE)
        .header("idempotency-key", "order-42")
        .json(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: Value = reused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "idempotency_key_reused");
    assert_eq!(stack.keys(&stack.uploads_bucket, "inputs/").await.len(), 1);
    stack.stop().await;
}

#[tokio::test]
async fn a_large_photo_goes_through_a_presigned_upload() {
    let stack = Stack::start().await;
    let (status, upload) = stack
        .post_json(ALICE, "/uploads", &json!({"content_type": "image/jpeg"}))
        .await;
    assert_eq!(status, StatusCode::CREATED, "{upload}");
    assert_eq!(upload["method"], "POST");
    // The bucket enforces the size at upload time: the signed policy carries the range. (moto
    // does not enforce POST policy conditions; the copy made at POST /jobs checks the size
    // again.)
    let fields: Vec<(String, String)> = upload["fields"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f["value"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let policy = gateway_aws::adapters::s3_post::policy_of(&fields).expect("a signed policy");
    assert!(
        policy["conditions"].as_array().unwrap().contains(&json!([
            "content-length-range",
            1,
            upload["max_bytes"]
        ])),
        "{policy}"
    );
    let photo = jpeg(800, 600);
    let posted = gateway_tests::post_upload(&stack.http, &upload, photo).await;
    assert!(posted.status().is_success(), "{}", posted.status());

    let (status, body) = stack
        .post_json(
            ALICE,
            "/jobs",
            &json!({"workflow": "restore", "params": {"megapixels": 0.1}, "input": {"upload_id": upload["upload_id"]}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let job = stack
        .wait_terminal(ALICE, body["job_id"].as_str().unwrap(), TIMEOUT)
        .await;
    assert_eq!(job["status"], "succeeded", "{job}");

    // Bob cannot use Alice's upload.
    let (status, body) = stack
        .post_json(
            BOB,
            "/jobs",
            &json!({"workflow": "restore", "input": {"upload_id": upload["upload_id"]}}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["code"], "unknown_upload");
    stack.stop().await;
}

// ------------------------------------------------------------------ inputs given by URL

/// A web server on loopback serving `photo` at `/photo.jpg`, and counting its requests.
async fn photo_host(photo: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().route(
        "/photo.jpg",
        axum::routing::get(move || {
            let photo = photo.clone();
            counted.fetch_add(1, Ordering::SeqCst);
            async move { ([("content-type", "image/jpeg")], photo) }
        }),
    );
    let address = gateway_tests::serve_on_loopback(app).await;
    (format!("http://{address}/photo.jpg"), hits)
}

#[tokio::test]
async fn a_photo_from_an_allowed_local_host_is_restored() {
    let stack = Stack::start_with(gateway_tests::StackOptions {
        extra_env: vec![("OUTBOUND_ALLOW_LOOPBACK", "true".into())],
        ..gateway_tests::StackOptions::default()
    })
    .await;
    let (url, hits) = photo_host(jpeg(120, 90)).await;

    let (status, accepted) = stack
        .post_json(
            ALICE,
            "/jobs",
            &json!({"workflow": "restore", "params": {"megapixels": 0.01}, "input": {"url": url}}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{accepted}");
    let job_id = accepted["job_id"].as_str().unwrap();
    let done = stack.wait_terminal(ALICE, job_id, TIMEOUT).await;

    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    stack.stop().await;
}

#[tokio::test]
async fn a_url_to_a_private_or_loopback_address_is_refused_and_never_fetched() {
    let stack = Stack::start().await;
    let (local, hits) = photo_host(jpeg(120, 90)).await;
    for url in [
        local.as_str(),
        "https://127.0.0.1/photo.jpg",
        "https://10.0.0.1/photo.jpg",
        "https://169.254.169.254/latest/meta-data/",
        "https://[::1]/photo.jpg",
    ] {
        let (status, body) = stack
            .post_json(
                ALICE,
                "/jobs",
                &json!({"workflow": "restore", "input": {"url": url}}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}: {body}");
        assert_eq!(body["error"]["code"], "input_url_refused", "{url}: {body}");
    }
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(stack.table_items().await, 0);
    stack.stop().await;
}
