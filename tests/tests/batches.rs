//! Batches end to end: `POST /batches` with many photos, one job each, through the pod backend
//! (the ComfyUI emulator) with no more than `max_in_flight` of them on the pod at once;
//! `GET /batches/{id}` counts them; each job's result is its own photo, restored.
use std::time::{Duration, Instant};

use base64::Engine as _;
use gateway_tests::{jpeg, Stack, StatusCode, ALICE, BOB};
use serde_json::{json, Value};

/// Generous: the suite runs on slow, shared machines; each wait ends as soon as it can.
const TIMEOUT: Duration = Duration::from_secs(240);

fn inputs(count: usize) -> Vec<Value> {
    (0..count)
        .map(|i| {
            // Each photo its own size, so that each result can be told to be its own.
            let photo = jpeg(160 + 2 * i as u32, 120);
            json!({"image_base64": base64::engine::general_purpose::STANDARD.encode(photo)})
        })
        .collect()
}

#[tokio::test]
async fn a_batch_of_50_photos_completes_through_the_pod_a_few_at_a_time() {
    let stack = Stack::start().await;
    let request = json!({
        "workflow": "restore",
        "params": {"megapixels": 0.02},
        "inputs": inputs(50),
        "backend": "pod",
        "max_in_flight": 3,
    });

    let (status, batch) = stack.post_json(ALICE, "/batches", &request).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{batch}");
    let batch_id = batch["batch_id"].as_str().unwrap().to_string();
    assert_eq!(batch["jobs"].as_array().unwrap().len(), 50);

    // Until every job ends: never more than 3 of the batch's prompts on the pod at once.
    let deadline = Instant::now() + TIMEOUT;
    let mut most_on_the_pod = 0;
    let view = loop {
        most_on_the_pod = most_on_the_pod.max(stack.comfy.in_queue());
        let (_, view) = stack.get(ALICE, &format!("/batches/{batch_id}")).await;
        let ended: u64 = ["succeeded", "failed", "cancelled", "timed_out"]
            .iter()
            .map(|s| view["counts"][s].as_u64().unwrap_or(0))
            .sum();
        if ended == 50 {
            break view;
        }
        assert!(
            Instant::now() < deadline,
            "not done in time: {}",
            view["counts"]
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(view["counts"]["succeeded"], 50, "{}", view["counts"]);
    assert!(
        most_on_the_pod <= 3,
        "{most_on_the_pod} prompts on the pod at once"
    );

    // Each job's result: a PNG, its own photo's aspect ratio (each input has its own width).
    for (i, job) in view["jobs"].as_array().unwrap().iter().enumerate() {
        let job_id = job["job_id"].as_str().unwrap();
        let (_, detail) = stack.get(ALICE, &format!("/jobs/{job_id}")).await;
        assert_eq!(detail["backend"], "pod");
        assert_eq!(detail["batch_id"], batch_id.as_str());
        let url = detail["outputs"][0]["url"].as_str().unwrap();
        let bytes = reqwest::get(url).await.unwrap().bytes().await.unwrap();
        let image = image::load_from_memory(&bytes).expect("a restored image");
        let ratio = f64::from(image.width()) / f64::from(image.height());
        let expected = f64::from(160 + 2 * i as u32) / 120.0;
        assert!(
            (ratio - expected).abs() < 0.05,
            "job {i}: ratio {ratio}, expected {expected}"
        );
    }
    stack.stop().await;
}

#[tokio::test]
async fn a_batch_with_one_bad_input_is_refused_whole() {
    let stack = Stack::start().await;
    let mut photos = inputs(3);
    photos[1] = json!({"image_base64": "bm90IGFuIGltYWdl"});

    let (status, body) = stack
        .post_json(
            ALICE,
            "/batches",
            &json!({"workflow": "restore", "inputs": photos}),
        )
        .await;

    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("inputs[1]"),
        "{body}"
    );
    let (_, jobs) = stack.get(ALICE, "/jobs").await;
    assert!(jobs["jobs"].as_array().unwrap().is_empty(), "{jobs}");
    stack.stop().await;
}

#[tokio::test]
async fn cancelling_a_batch_cancels_its_jobs_and_another_owner_cannot() {
    let stack = Stack::start().await;
    stack.comfy.slow_runs(Duration::from_secs(30));
    let (_, batch) = stack
        .post_json(
            ALICE,
            "/batches",
            &json!({"workflow": "restore", "inputs": inputs(4), "max_in_flight": 1}),
        )
        .await;
    let batch_id = batch["batch_id"].as_str().unwrap();

    let (status, _) = stack
        .post_json(BOB, &format!("/batches/{batch_id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, after) = stack
        .post_json(ALICE, &format!("/batches/{batch_id}/cancel"), &json!({}))
        .await;

    assert_eq!(status, StatusCode::OK, "{after}");
    assert_eq!(after["counts"]["cancelled"], 4, "{}", after["counts"]);
    stack.stop().await;
}
