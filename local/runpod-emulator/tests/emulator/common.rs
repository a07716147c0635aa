//! Shared test plumbing: a fast-config emulator, a webhook receiver, images and workflows.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use runpod_emulator::{Emulator, EmulatorConfig};
use serde_json::{json, Value};
use tokio::time::Instant;

pub fn any_port() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A fresh directory per test; the volume lives one level down so the emulator's private
/// s3s-fs root (a sibling of the volume) stays inside it too.
pub struct TestDir {
    pub root: PathBuf,
}

impl TestDir {
    pub fn new() -> Self {
        let root = std::env::temp_dir()
            .join("runpod-emulator-tests")
            .join(uuid::Uuid::new_v4().simple().to_string());
        std::fs::create_dir_all(&root).expect("create test dir");
        Self { root }
    }

    pub fn volume(&self) -> PathBuf {
        self.root.join("volume")
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Production defaults with every delay shrunk so the suite stays fast.
pub fn fast_config(dir: &TestDir) -> EmulatorConfig {
    EmulatorConfig {
        volume_dir: dir.volume(),
        webhook_retry_delay: Duration::from_millis(100),
        webhook_timeout: Duration::from_secs(2),
        min_execution_timeout: Duration::from_millis(50),
        min_ttl: Duration::from_millis(50),
        ..EmulatorConfig::default()
    }
}

pub struct Harness {
    pub emu: Emulator,
    pub http: reqwest::Client,
    // Dropped last: the emulator must stop before its directory goes.
    pub dir: TestDir,
}

pub async fn start() -> Harness {
    start_with(|_| {}).await
}

pub async fn start_with(tune: impl FnOnce(&mut EmulatorConfig)) -> Harness {
    let dir = TestDir::new();
    let mut config = fast_config(&dir);
    tune(&mut config);
    let emu = runpod_emulator::spawn(config, any_port(), any_port())
        .await
        .expect("emulator starts");
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    Harness { emu, http, dir }
}

impl Harness {
    pub fn url(&self, route: &str) -> String {
        format!(
            "{}/{}",
            self.emu.endpoint_url(),
            route.trim_start_matches('/')
        )
    }

    pub async fn post(&self, route: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url(route))
            .bearer_auth(&self.emu.api_key)
            .json(&body)
            .send()
            .await
            .expect("request");
        decode(response).await
    }

    pub async fn get(&self, route: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(self.url(route))
            .bearer_auth(&self.emu.api_key)
            .send()
            .await
            .expect("request");
        decode(response).await
    }

    /// Submits to `/run`, asserting acceptance; returns the job id.
    pub async fn run(&self, body: Value) -> String {
        let (status, response) = self.post("run", body).await;
        assert_eq!(status, StatusCode::OK, "{response}");
        assert_eq!(response["status"], "IN_QUEUE");
        response["id"].as_str().expect("id").to_owned()
    }

    pub async fn status(&self, id: &str) -> (StatusCode, Value) {
        self.get(&format!("status/{id}")).await
    }

    /// Polls `/status` until `done` holds for the body, or panics after `within`.
    pub async fn wait_for(
        &self,
        id: &str,
        within: Duration,
        done: impl Fn(StatusCode, &Value) -> bool,
    ) -> (StatusCode, Value) {
        let deadline = Instant::now() + within;
        loop {
            let (code, body) = self.status(id).await;
            if done(code, &body) {
                return (code, body);
            }
            assert!(Instant::now() < deadline, "job {id} still {code} {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn wait_status(&self, id: &str, wanted: &str) -> Value {
        self.wait_for(id, Duration::from_secs(10), |code, body| {
            code == StatusCode::OK && body["status"] == wanted
        })
        .await
        .1
    }
}

/// An S3 client to the emulator's volume, configured as against RunPod.
pub fn volume_s3(emu: &Emulator) -> aws_sdk_s3::Client {
    volume_s3_with_secret(emu, &emu.volume_secret_key)
}

pub fn volume_s3_with_secret(emu: &Emulator, secret: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        // RunPod's datacenter id; the emulator does not check it.
        .region(Region::new("eu-ro-1"))
        .endpoint_url(&emu.s3_url)
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            &emu.volume_access_key,
            secret,
            None,
            None,
            "test",
        ))
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

/// Starts a multipart upload of `key` on the volume; returns its upload id.
pub async fn begin_upload(client: &aws_sdk_s3::Client, emu: &Emulator, key: &str) -> String {
    client
        .create_multipart_upload()
        .bucket(&emu.volume_id)
        .key(key)
        .send()
        .await
        .expect("create multipart upload")
        .upload_id()
        .expect("upload id")
        .to_owned()
}

/// Uploads part `number`; returns its ETag.
pub async fn send_part(
    client: &aws_sdk_s3::Client,
    emu: &Emulator,
    key: &str,
    upload_id: &str,
    number: i32,
    data: Vec<u8>,
) -> String {
    client
        .upload_part()
        .bucket(&emu.volume_id)
        .key(key)
        .upload_id(upload_id)
        .part_number(number)
        .body(aws_sdk_s3::primitives::ByteStream::from(data))
        .send()
        .await
        .expect("upload part")
        .e_tag()
        .expect("part etag")
        .to_owned()
}

/// Keys of one recursive ListObjectsV2 page (no delimiter).
pub async fn list_page(client: &aws_sdk_s3::Client, emu: &Emulator, prefix: &str) -> Vec<String> {
    client
        .list_objects_v2()
        .bucket(&emu.volume_id)
        .prefix(prefix)
        .send()
        .await
        .expect("list")
        .contents()
        .iter()
        .filter_map(|o| o.key().map(str::to_owned))
        .collect()
}

pub async fn decode(response: reqwest::Response) -> (StatusCode, Value) {
    let status = StatusCode::from_u16(response.status().as_u16()).expect("status");
    let bytes = response.bytes().await.expect("body");
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, body)
}

/// Writes a `width`×`height` JPEG with a gradient into the volume at `relative`.
pub fn write_jpeg(volume: &Path, relative: &str, width: u32, height: u32) {
    let path = volume.join(relative);
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    std::fs::write(&path, jpeg_bytes(width, height)).expect("write jpeg");
}

pub fn jpeg_bytes(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x % 256) as u8, (y % 256) as u8, ((x + y) % 256) as u8])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(image)
        .write_to(&mut out, image::ImageFormat::Jpeg)
        .expect("encode jpeg");
    out.into_inner()
}

/// The restore workflow's shape: load → scale → (diffusion chain) → save.
pub fn restore_workflow(image: &str, megapixels: f64, prefix: &str) -> Value {
    json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl.safetensors"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "restored photo", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}},
        "78": {"class_type": "LoadImage", "inputs": {"image": image}},
        "93": {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["78", 0], "megapixels": megapixels, "upscale_method": "lanczos"}},
        "12": {"class_type": "VAEEncode", "inputs": {"pixels": ["93", 0], "vae": ["4", 2]}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["12", 0],
            "seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 0.7
        }},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "60": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": prefix}}
    })
}

/// A `/run` body for the restore workflow on an image already in the volume.
pub fn restore_job(image: &str, megapixels: f64, prefix: &str) -> Value {
    json!({"input": {"workflow_api": restore_workflow(image, megapixels, prefix)}})
}

/// A workflow that needs no input file: for tests about the job lifecycle, not about images.
pub fn trivial_job(dir: &TestDir) -> Value {
    write_jpeg(&dir.volume(), "inputs/trivial.jpg", 16, 16);
    restore_job("inputs/trivial.jpg", 0.01, "outputs/trivial/out")
}

#[derive(Debug, Clone)]
pub struct Hit {
    pub content_type: Option<String>,
    pub body: Bytes,
    pub at: Instant,
}

#[derive(Clone)]
struct ReceiverState {
    hits: Arc<Mutex<Vec<Hit>>>,
    status: Arc<AtomicU16>,
}

/// A webhook receiver on 127.0.0.1:0 answering `status` to every POST and recording it.
pub struct Receiver {
    pub url: String,
    hits: Arc<Mutex<Vec<Hit>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    pub async fn start(status: u16) -> Self {
        let state = ReceiverState {
            hits: Arc::default(),
            status: Arc::new(AtomicU16::new(status)),
        };
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(receive))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(any_port())
            .await
            .expect("bind");
        let url = format!(
            "http://{}/hook?token=abc",
            listener.local_addr().expect("addr")
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            hits: state.hits,
            status: state.status,
        }
    }

    pub fn hits(&self) -> Vec<Hit> {
        self.hits.lock().expect("lock").clone()
    }

    pub fn set_status(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Waits until at least `n` deliveries arrived.
    pub async fn wait_hits(&self, n: usize) -> Vec<Hit> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let hits = self.hits();
            if hits.len() >= n {
                return hits;
            }
            assert!(
                Instant::now() < deadline,
                "only {} webhook(s) arrived",
                hits.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn receive(
    State(state): State<ReceiverState>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    state.hits.lock().expect("lock").push(Hit {
        content_type: headers
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body,
        at: Instant::now(),
    });
    StatusCode::from_u16(state.status.load(Ordering::SeqCst)).expect("status")
}
