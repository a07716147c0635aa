//! The real `runpod` SDK in the loop (PyPI `runpod`, pinned in local/python/requirements.txt):
//! a stock SDK worker runs the handlers in `tests/python/` against the emulator's worker
//! protocol (job-take, job-done, progress, job-stop, ping), with the emulator's built-in worker
//! switched off; and the SDK's client drives the emulator's endpoint API.
//!
//! gateway → emulator → SDK worker → webhook → results bucket → `GET /jobs/{id}` → download.
use std::net::SocketAddr;
use std::time::Duration;

use gateway_tests::{jpeg, run_python, SdkWorker, Stack, StackOptions, StatusCode, ALICE};
use runpod_emulator::{EmulatorConfig, JobStatus};
use serde_json::{json, Value};
use testkit::stack_env::LOCAL_VOLUME_ROOT;

const TIMEOUT: Duration = Duration::from_secs(60);

fn sdk_stack_options() -> StackOptions {
    StackOptions {
        configure_emulator: |c| c.builtin_worker = false,
        ..StackOptions::default()
    }
}

async fn download(url: &str) -> Vec<u8> {
    reqwest::get(url)
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec()
}

/// Waits until RunPod (the emulator) has the gateway's job in `status`.
async fn wait_runpod_status(stack: &Stack, job_id: &str, status: JobStatus) -> String {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let stored = stack.stored_job(job_id).await;
        if let Some(runpod_id) = stored.runpod_job_id {
            if stack.emulator.job(&runpod_id).map(|j| j.status) == Some(status) {
                return runpod_id;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "RunPod never had job {job_id} {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The routes `pod` called about `runpod_id`, in order.
fn calls_about(stack: &Stack, pod: &str, runpod_id: &str) -> Vec<String> {
    stack
        .emulator
        .worker_calls()
        .into_iter()
        .filter(|c| c.pod == pod && c.job_ids.iter().any(|id| id == runpod_id))
        .map(|c| c.route)
        .collect()
}

#[tokio::test]
async fn a_real_sdk_worker_restores_the_photo_end_to_end() {
    let stack = Stack::start_with(sdk_stack_options()).await;
    let worker = stack.sdk_worker("seed_handler.py", &[]);
    let job_id = stack
        .submit_restore(ALICE, &jpeg(1600, 1200), json!({"megapixels": 0.25}))
        .await;

    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", worker.log());
    let outputs = job["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "{job}");
    assert_eq!(outputs[0]["content_type"], "image/png");
    let bytes = download(outputs[0]["url"].as_str().unwrap()).await;
    assert_eq!(bytes.len() as u64, outputs[0]["size"].as_u64().unwrap());
    let image = image::load_from_memory(&bytes).expect("the output decodes as an image");
    // ComfyUI's binary megapixels: 0.25 MP is 262 144 pixels.
    let pixels = f64::from(image.width() * image.height());
    assert!(
        (pixels / 262_144.0 - 1.0).abs() < 0.01,
        "{}x{}",
        image.width(),
        image.height()
    );
    let ratio = f64::from(image.width()) / f64::from(image.height());
    assert!((ratio - 4.0 / 3.0).abs() < 0.01, "ratio {ratio}");
    assert_eq!(
        stack.result_files("alice", &job_id).await,
        vec!["restore_00001_.png"]
    );

    // The SDK worker did the work, through the protocol, and the webhook brought it home.
    let runpod = stack.runpod_job(&job_id).await;
    assert_eq!(runpod.worker_id.as_deref(), Some(worker.pod_id.as_str()));
    let routes = calls_about(&stack, &worker.pod_id, &runpod.id);
    assert_eq!(routes.first().map(String::as_str), Some("job-take"));
    assert!(routes.contains(&"job-done".to_string()), "{routes:?}");
    // The handler's progress update comes from a thread of its own and may trail the result
    // (runpod-python#250); the emulator takes it either way.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !calls_about(&stack, &worker.pod_id, &runpod.id).contains(&"job-progress".to_string()) {
        assert!(std::time::Instant::now() < deadline, "no progress update");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stack
        .emulator
        .webhook_log()
        .iter()
        .any(|a| a.job_id == runpod.id && a.delivered));
    // RunPod's echoed input is the graph alone: volume keys, no base64.
    let input = runpod.input.to_string();
    assert!(runpod.input.get("workflow_api").is_some(), "{input}");
    assert!(input.len() < 16 * 1024, "input is {} bytes", input.len());
    assert!(
        input.contains(&format!("{LOCAL_VOLUME_ROOT}/inputs/{job_id}/input.jpg")),
        "{input}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_raising_handler_fails_the_job_with_its_message_and_no_traceback() {
    let stack = Stack::start_with(sdk_stack_options()).await;
    let message = "CUDA out of memory. Tried to allocate 2.00 GiB";
    let worker = stack.sdk_worker("seed_handler.py", &[("HANDLER_RAISE", message.to_string())]);
    let job_id = stack
        .submit_restore(ALICE, &jpeg(200, 150), json!({}))
        .await;
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "failed", "{job}\n{}", worker.log());
    assert_eq!(job["error"]["code"], "worker_failed");
    assert_eq!(job["error"]["message"], message);
    let shown = job.to_string();
    for leak in [
        "Traceback",
        "seed_handler.py",
        "error_traceback",
        "RuntimeError",
    ] {
        assert!(!shown.contains(leak), "{leak} leaked: {shown}");
    }
    assert_eq!(job["outputs"], json!([]));
    // RunPod itself has the SDK's whole report, traceback included: the gateway cut it.
    let runpod = stack.runpod_job(&job_id).await;
    assert_eq!(runpod.status, JobStatus::Failed);
    assert!(runpod.error.unwrap().contains("Traceback"));
    assert!(stack.results_emptied().await);
    stack.stop().await;
}

#[tokio::test]
async fn progress_and_cost_from_a_real_sdk_worker_show_on_the_job() {
    let stack = Stack::start_with(StackOptions {
        sweep_every: Duration::from_millis(200),
        extra_env: vec![
            ("STATUS_POLL_AFTER_SECS", "1".into()),
            ("STATUS_POLL_INTERVAL_SECS", "1".into()),
            ("GPU_PRICE_USD_PER_SECOND", "0.00031".into()),
        ],
        ..sdk_stack_options()
    })
    .await;
    let gate = std::env::temp_dir().join(format!("gateway-gate-{}", uuid::Uuid::new_v4()));
    let worker = stack.sdk_worker(
        "seed_handler.py",
        &[("HANDLER_GATE", gate.display().to_string())],
    );
    let job_id = stack
        .submit_restore(ALICE, &jpeg(200, 150), json!({}))
        .await;

    // The handler holds the job open until it is told to go on: the sweeper's polls carry its
    // progress_update to the job meanwhile.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let running = loop {
        let (_, job) = stack.get(ALICE, &format!("/jobs/{job_id}")).await;
        if job["progress"]["message"] == "restoring" {
            break job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{job}\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    std::fs::write(&gate, b"go").unwrap();
    let done = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    let _ = std::fs::remove_file(&gate);

    assert_eq!(running["status"], "running");
    assert_eq!(running["progress"]["fraction"], 0.4);
    assert_eq!(done["status"], "succeeded", "{done}");
    let gpu_seconds = done["gpu_seconds"].as_f64().unwrap();
    let runpod = stack.runpod_job(&job_id).await;
    assert_eq!(gpu_seconds, runpod.execution_time_ms as f64 / 1000.0);
    let cost = done["cost_usd"].as_f64().unwrap();
    assert!((cost - gpu_seconds * 0.00031).abs() < 1e-9, "{done}");
    assert!(done["queue_seconds"].as_f64().is_some(), "{done}");
    let today = done["finished_at"].as_str().unwrap()[..10].to_string();
    let (status, usage) = stack
        .get(ALICE, &format!("/usage?from={today}&to={today}"))
        .await;
    assert_eq!(status, StatusCode::OK, "{usage}");
    assert_eq!(usage["total"]["succeeded"], 1, "{usage}");
    assert!((usage["total"]["cost_usd"].as_f64().unwrap() - cost).abs() < 1e-9);
    stack.stop().await;
}

#[tokio::test]
async fn cancelling_mid_run_stops_the_sdk_worker_through_job_stop() {
    let stack = Stack::start_with(sdk_stack_options()).await;
    let worker = stack.sdk_worker("seed_handler.py", &[("HANDLER_DELAY_SECS", "30".into())]);
    let job_id = stack
        .submit_restore(ALICE, &jpeg(200, 150), json!({}))
        .await;
    let runpod_id = wait_runpod_status(&stack, &job_id, JobStatus::InProgress).await;
    // Cancel once the handler runs (its progress update arrived). A stop that lands in the
    // ~100 ms between job-take and the SDK starting the handler task is dropped by the SDK
    // (runpod 1.12 `JobScaler.stop_job` finds no task yet), and is not sent again.
    let deadline = std::time::Instant::now() + TIMEOUT;
    while !calls_about(&stack, &worker.pod_id, &runpod_id).contains(&"job-progress".to_string()) {
        assert!(std::time::Instant::now() < deadline, "{}", worker.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (status, body) = stack
        .post_json(ALICE, &format!("/jobs/{job_id}/cancel"), &json!({}))
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["status"], "cancelled");
    assert_eq!(
        stack
            .run_once_stopped(&runpod_id, Duration::from_secs(30))
            .await
            .status,
        JobStatus::Cancelled
    );

    // The worker hears about it on its job-stop long-poll, and stops the handler.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !worker.log().contains("Job stopped.") {
        assert!(
            std::time::Instant::now() < deadline,
            "the worker never stopped the job; its log:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let routes = calls_about(&stack, &worker.pod_id, &runpod_id);
    assert!(routes.contains(&"job-stop".to_string()), "{routes:?}");
    // A stopped job sends no result.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let routes = calls_about(&stack, &worker.pod_id, &runpod_id);
    assert!(!routes.contains(&"job-done".to_string()), "{routes:?}");

    let (_, job) = stack.get(ALICE, &format!("/jobs/{job_id}")).await;
    assert_eq!(job["status"], "cancelled");
    assert_eq!(job["error"]["code"], "cancelled_by_client");
    assert!(stack.results_emptied().await);
    stack.stop().await;
}

#[tokio::test]
async fn an_execution_timeout_stops_the_sdk_worker_and_the_job_times_out() {
    let stack = Stack::start_with(StackOptions {
        configure_emulator: |c| {
            c.builtin_worker = false;
            c.min_execution_timeout = Duration::from_millis(500);
        },
        extra_env: vec![("JOB_EXECUTION_TIMEOUT_SECS", "2".into())],
        ..StackOptions::default()
    })
    .await;
    let worker = stack.sdk_worker("seed_handler.py", &[("HANDLER_DELAY_SECS", "30".into())]);
    let job_id = stack
        .submit_restore(ALICE, &jpeg(200, 150), json!({}))
        .await;
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "timed_out", "{job}\n{}", worker.log());
    assert_eq!(job["error"]["code"], "execution_timed_out");
    let runpod = stack.runpod_job(&job_id).await;
    assert_eq!(runpod.status, JobStatus::TimedOut);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !calls_about(&stack, &worker.pod_id, &runpod.id).contains(&"job-stop".to_string()) {
        assert!(
            std::time::Instant::now() < deadline,
            "no job-stop for the timed-out job; worker log:\n{}",
            worker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stack.stop().await;
}

#[tokio::test]
async fn worker_comfyui_base64_images_from_the_real_sdk_end_to_end() {
    let stack = Stack::start_with(sdk_stack_options()).await;
    let worker = stack.sdk_worker("comfyui_handler.py", &[]);
    let job_id = stack
        .submit_workflow(
            ALICE,
            "restore-comfyui",
            &jpeg(800, 600),
            json!({"megapixels": 0.1}),
        )
        .await;
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", worker.log());
    let outputs = job["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1, "{job}");
    let bytes = download(outputs[0]["url"].as_str().unwrap()).await;
    let image = image::load_from_memory(&bytes).expect("a PNG");
    let pixels = f64::from(image.width() * image.height());
    assert!((pixels / (0.1 * 1024.0 * 1024.0) - 1.0).abs() < 0.01);
    // Same results layout as volume files.
    assert_eq!(
        stack.result_files("alice", &job_id).await,
        vec!["restore-comfyui_00001_.png"]
    );
    // worker-comfyui's input key; the image travelled through the volume, not the input.
    let runpod = stack.runpod_job(&job_id).await;
    assert!(runpod.input.get("workflow").is_some(), "{}", runpod.input);
    assert!(runpod.input.get("images").is_none());
    assert!(runpod.input.to_string().len() < 16 * 1024);
    assert!(runpod.output.unwrap()["images"][0]["type"] == "base64");
    assert!(!stack
        .emulator
        .volume_dir
        .join(format!("{LOCAL_VOLUME_ROOT}/outputs/{job_id}"))
        .exists());
    stack.stop().await;
}

#[tokio::test]
async fn worker_comfyui_s3_urls_from_the_real_sdk_are_fetched_from_an_allowed_host() {
    let moto = gateway_tests::local_aws().s3().to_string();
    let stack = Stack::start_with(StackOptions {
        configure_emulator: |c| c.builtin_worker = false,
        extra_env: vec![("OUTPUT_URL_ALLOWED_HOSTS", moto.clone())],
        ..StackOptions::default()
    })
    .await;
    // worker-comfyui's upload path: the SDK's rp_upload.upload_image → a presigned S3 URL.
    let worker = stack.sdk_worker(
        "comfyui_handler.py",
        &[
            ("BUCKET_ENDPOINT_URL", moto.clone()),
            ("BUCKET_ACCESS_KEY_ID", "testing".into()),
            ("BUCKET_SECRET_ACCESS_KEY", "testing".into()),
            ("AWS_DEFAULT_REGION", "us-east-1".into()),
        ],
    );
    let job_id = stack
        .submit_workflow(
            ALICE,
            "restore-comfyui",
            &jpeg(400, 300),
            json!({"megapixels": 0.05}),
        )
        .await;
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}\n{}", worker.log());
    let runpod = stack.runpod_job(&job_id).await;
    let image = &runpod.output.unwrap()["images"][0];
    assert_eq!(image["type"], "s3_url");
    assert!(image["data"].as_str().unwrap().starts_with(&moto));
    let outputs = job["outputs"].as_array().unwrap();
    let bytes = download(outputs[0]["url"].as_str().unwrap()).await;
    assert_eq!(bytes.len() as u64, outputs[0]["size"].as_u64().unwrap());
    image::load_from_memory(&bytes).expect("a PNG");
    assert_eq!(outputs[0]["file_name"], "restore-comfyui_00001_.png");
    stack.stop().await;
}

#[tokio::test]
async fn the_official_sdk_client_drives_the_emulator_endpoint_api() {
    let dir = std::env::temp_dir().join(format!(
        "gateway-test-sdk-client-{}",
        uuid::Uuid::new_v4().simple()
    ));
    let emulator = runpod_emulator::spawn(
        EmulatorConfig {
            volume_dir: dir.join("volume"),
            builtin_worker: false,
            webhook_retry_delay: Duration::from_millis(200),
            ..EmulatorConfig::default()
        },
        SocketAddr::from(([127, 0, 0, 1], 0)),
        SocketAddr::from(([127, 0, 0, 1], 0)),
    )
    .await
    .expect("start the emulator");
    let image_key = "inputs/sdk-client/input.jpg";
    let image_path = emulator.volume_dir.join(image_key);
    std::fs::create_dir_all(image_path.parent().unwrap()).unwrap();
    std::fs::write(&image_path, jpeg(320, 240)).unwrap();
    let worker = SdkWorker::start(
        &emulator,
        "seed_handler.py",
        &[("HANDLER_DELAY_SECS", "2".into())],
    );
    worker.wait_ready(&emulator, Duration::from_secs(30)).await;

    let (ok, stdout, stderr) = run_python(
        "sdk_client_check.py",
        &[
            (
                "RUNPOD_ENDPOINT_BASE_URL",
                format!("{}/v2", emulator.api_url),
            ),
            ("RUNPOD_API_KEY", emulator.api_key.clone()),
            ("ENDPOINT_ID", emulator.endpoint_id.clone()),
            ("IMAGE_KEY", image_key.into()),
            ("MOUNT", emulator.mount_prefix.clone()),
        ],
        Duration::from_secs(120),
    )
    .await;
    assert!(
        ok,
        "stdout:\n{stdout}\nstderr:\n{stderr}\nworker:\n{}",
        worker.log()
    );
    let summary: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(summary["unauthorized"], true);
    assert_eq!(summary["unknown_job_404"], true);
    let cancelled = summary["cancelled"].as_array().unwrap();
    for id in cancelled {
        let job = emulator.job(id.as_str().unwrap()).unwrap();
        assert_eq!(job.status, JobStatus::Cancelled);
    }
    // The running one was stopped at the worker through job-stop.
    let running = cancelled[0].as_str().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !emulator
        .worker_calls()
        .iter()
        .any(|c| c.route == "job-stop" && c.job_ids.iter().any(|id| id == running))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no job-stop for {running}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(emulator
        .volume_dir
        .join("outputs/sdk-client/run_00001_.png")
        .exists());
    drop(worker);
    emulator.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
