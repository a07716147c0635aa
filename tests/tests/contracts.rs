//! The two output contracts, chosen per workflow in its manifest, end to end on the built-in
//! worker: `volume_files` (lifecycle.rs, sdk.rs) and `worker_comfyui`
//! (`{"images": [{"filename", "type": "base64" | "s3_url", "data"}]}`). Both end in the same
//! results layout, `results/{owner}/{job}/{file}`; a worker-comfyui output that is not valid
//! throughout stores nothing.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, StatusCode as HttpStatus};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use gateway_tests::{jpeg, Stack, StackOptions, ALICE};
use runpod_emulator::Faults;
use serde_json::{json, Value};
use testkit::stack_env::LOCAL_VOLUME_ROOT;

const TIMEOUT: Duration = Duration::from_secs(30);
const COMFY: &str = "restore-comfyui";

fn png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]));
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A stand-in for the bucket a worker-comfyui uploads to: serves `/ok.png` (a PNG),
/// `/big.bin` (5000 bytes, declared), `/chunked.bin` (5000 bytes, no Content-Length),
/// `/missing.png` (404) and `/moved.png` (a redirect to `/ok.png`), counting requests.
struct Files {
    origin: String,
    hits: Arc<AtomicUsize>,
    ok: Vec<u8>,
}

impl Files {
    async fn start() -> Self {
        let ok = png(64, 48);
        let hits = Arc::new(AtomicUsize::new(0));
        let state = (Bytes::from(ok.clone()), hits.clone());
        let app = axum::Router::new()
            .route("/ok.png", get(serve_ok))
            .route("/big.bin", get(|| async { vec![1u8; 5000] }))
            .route(
                "/chunked.bin",
                get(|| async {
                    let chunks =
                        (0..5).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![2u8; 1000])));
                    Body::from_stream(futures::stream::iter(chunks))
                }),
            )
            .route("/missing.png", get(|| async { HttpStatus::NOT_FOUND }))
            .route(
                "/moved.png",
                get(|| async { (HttpStatus::FOUND, [(header::LOCATION, "/ok.png")]) }),
            )
            .layer(axum::middleware::from_fn_with_state(
                state.1.clone(),
                |State(hits): State<Arc<AtomicUsize>>,
                 request: axum::extract::Request,
                 next: axum::middleware::Next| async move {
                    hits.fetch_add(1, Ordering::SeqCst);
                    next.run(request).await
                },
            ))
            .with_state(state);
        let origin = format!("http://{}", gateway_tests::serve_on_loopback(app).await);
        Self { origin, hits, ok }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.origin)
    }
}

async fn serve_ok(State((ok, _)): State<(Bytes, Arc<AtomicUsize>)>) -> Response {
    ([(header::CONTENT_TYPE, "image/png")], ok).into_response()
}

async fn stack_with(files: Option<&Files>, extra: Vec<(&'static str, String)>) -> Stack {
    let mut extra_env = extra;
    if let Some(files) = files {
        extra_env.push(("OUTPUT_URL_ALLOWED_HOSTS", files.origin.clone()));
    }
    Stack::start_with(StackOptions {
        extra_env,
        ..StackOptions::default()
    })
    .await
}

/// Runs one restore-comfyui job whose worker returns `output`; returns the final job.
async fn run_with_output(stack: &Stack, output: Value) -> (String, Value) {
    stack.emulator.set_faults(Faults {
        worker_output_override: Some(output),
        ..Faults::default()
    });
    let job_id = stack
        .submit_workflow(ALICE, COMFY, &jpeg(200, 150), json!({}))
        .await;
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    (job_id, job)
}

#[tokio::test]
async fn restore_comfyui_on_the_builtin_worker_comes_back_as_stored_images() {
    let stack = Stack::start().await;
    let job_id = stack
        .submit_workflow(ALICE, COMFY, &jpeg(1200, 900), json!({"megapixels": 0.2}))
        .await;
    let job = stack.wait_terminal(ALICE, &job_id, TIMEOUT).await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(job["workflow"], COMFY, "{job}");
    let outputs = job["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!(outputs[0]["file_name"], "restore-comfyui_00001_.png");
    assert_eq!(outputs[0]["content_type"], "image/png");
    let bytes = reqwest::get(outputs[0]["url"].as_str().unwrap())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(bytes.len() as u64, outputs[0]["size"].as_u64().unwrap());
    let image = image::load_from_memory(&bytes).unwrap();
    let pixels = f64::from(image.width() * image.height());
    assert!((pixels / (0.2 * 1024.0 * 1024.0) - 1.0).abs() < 0.01);
    assert_eq!(
        stack.result_files("alice", &job_id).await,
        vec!["restore-comfyui_00001_.png"]
    );
    assert_eq!(stack.keys(&stack.results_bucket, "results/").await.len(), 1);
    // worker-comfyui's input shape (its graph, and the gateway's job and trace ids, a key it
    // does not read), small; and nothing of the output on the volume.
    let runpod = stack.runpod_job(&job_id).await;
    assert_eq!(
        runpod.input.as_object().unwrap().keys().collect::<Vec<_>>(),
        vec!["gateway", "workflow"]
    );
    assert!(runpod.input.to_string().len() < 16 * 1024);
    assert!(!stack
        .emulator
        .volume_dir
        .join(format!("{LOCAL_VOLUME_ROOT}/outputs/{job_id}"))
        .exists());
    stack.stop().await;
}

#[tokio::test]
async fn an_allowed_url_image_is_downloaded_under_a_safe_name() {
    let files = Files::start().await;
    let stack = stack_with(Some(&files), vec![]).await;
    let (job_id, job) = run_with_output(
        &stack,
        json!({"images": [
            {"filename": "../../etc/restored.png", "type": "s3_url", "data": files.url("/ok.png")},
            {"filename": "inline.png", "type": "base64", "data": b64(&png(8, 8))},
        ]}),
    )
    .await;
    assert_eq!(job["status"], "succeeded", "{job}");
    assert_eq!(
        stack.result_files("alice", &job_id).await,
        vec!["inline.png", "restored.png"]
    );
    assert_eq!(stack.keys(&stack.results_bucket, "results/").await.len(), 2);
    let outputs = job["outputs"].as_array().unwrap();
    let restored = outputs
        .iter()
        .find(|o| o["file_name"] == "restored.png")
        .unwrap();
    let bytes = reqwest::get(restored["url"].as_str().unwrap())
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(bytes.as_ref(), files.ok.as_slice());
    stack.stop().await;
}

#[tokio::test]
async fn a_url_off_the_allow_list_is_never_fetched_and_nothing_is_stored() {
    let files = Files::start().await;
    let stack = stack_with(Some(&files), vec![]).await;
    // Same server, other host name: not on the list.
    let elsewhere = files.url("/ok.png").replace("127.0.0.1", "localhost");
    let (_, job) = run_with_output(
        &stack,
        json!({"images": [
            {"filename": "a.png", "type": "base64", "data": b64(&png(8, 8))},
            {"filename": "b.png", "type": "s3_url", "data": elsewhere},
        ]}),
    )
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "invalid_output");
    assert!(job["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not allowed"));
    assert!(stack.results_emptied().await);
    assert_eq!(files.hits.load(Ordering::SeqCst), 0);

    // Redirects are not followed, even to an allowed place.
    let (_, job) = run_with_output(
        &stack,
        json!({"images": [{"filename": "m.png", "type": "s3_url", "data": files.url("/moved.png")}]}),
    )
    .await;
    assert_eq!(job["status"], "failed", "{job}");
    assert_eq!(job["error"]["code"], "output_missing");
    assert!(stack.results_emptied().await);
    stack.stop().await;
}

#[tokio::test]
async fn oversized_images_fail_the_job_and_nothing_is_stored() {
    let files = Files::start().await;
    let stack = stack_with(
        Some(&files),
        vec![("OUTPUT_MAX_IMAGE_BYTES", "2000".into())],
    )
    .await;
    let small = json!({"filename": "a.png", "type": "base64", "data": b64(&[9; 100])});
    for (what, big) in [
        (
            "declared",
            json!({"filename": "b.bin", "type": "s3_url", "data": files.url("/big.bin")}),
        ),
        (
            "streamed",
            json!({"filename": "b.bin", "type": "s3_url", "data": files.url("/chunked.bin")}),
        ),
        (
            "base64",
            json!({"filename": "b.png", "type": "base64", "data": b64(&[9; 2001])}),
        ),
    ] {
        let (_, job) = run_with_output(&stack, json!({"images": [small, big]})).await;
        assert_eq!(job["status"], "failed", "{what}: {job}");
        assert_eq!(job["error"]["code"], "output_too_large", "{what}: {job}");
        assert!(
            job["error"]["message"]
                .as_str()
                .unwrap()
                .contains("2000-byte limit"),
            "{what}: {job}"
        );
        assert!(
            stack.results_emptied().await,
            "{what}: something was stored"
        );
    }
    stack.stop().await;
}

#[tokio::test]
async fn bad_or_missing_images_fail_the_job_and_nothing_is_stored() {
    let files = Files::start().await;
    let stack = stack_with(Some(&files), vec![]).await;
    let good = json!({"filename": "a.png", "type": "base64", "data": b64(&png(8, 8))});
    for (output, code) in [
        (
            json!({"images": [good, {"filename": "b.png", "type": "base64", "data": "%%% not base64"}]}),
            "invalid_output",
        ),
        (
            json!({"images": [good, {"filename": "b.png", "type": "s3_url", "data": files.url("/missing.png")}]}),
            "output_missing",
        ),
        (
            json!({"images": (0..65).map(|_| good.clone()).collect::<Vec<_>>()}),
            "invalid_output",
        ),
        (
            json!({"status": "success_no_images", "images": []}),
            "empty_output",
        ),
        // A volume-files answer to a worker-comfyui workflow is not its contract.
        (
            json!({"prompt_id": "p", "files": ["/runpod-volume/outputs/x/a.png"], "file_count": 1}),
            "invalid_output",
        ),
    ] {
        let (_, job) = run_with_output(&stack, output.clone()).await;
        assert_eq!(job["status"], "failed", "{output}: {job}");
        assert_eq!(job["error"]["code"], code, "{job}");
        assert!(stack.results_emptied().await);
    }
    stack.stop().await;
}
