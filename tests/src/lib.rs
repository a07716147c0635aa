//! The test harness: a whole local stack per test, on loopback.
//!
//! - **moto** (DynamoDB, SQS, S3): one `moto_server` per service per test process ([`aws`]),
//!   started from the repo's `.venv` on first use. Each test gets its own table, queue and
//!   buckets, so tests never see each other's data.
//! - **the RunPod emulator**: in-process, its volume in a fresh temporary directory.
//! - **the gateway**: the local runner in-process, with the same code the Lambda functions run.

pub mod deployment;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use comfyui_emulator::{ComfyConfig, ComfyEmulator};
use gateway::config::Env;
pub use gateway::domain::job::Job;
use gateway_aws::wiring::Wiring;
use local_runner::{Runner, RunnerOptions};
use runpod_emulator::{Emulator, EmulatorConfig, Faults};
use serde_json::Value;

pub use reqwest::StatusCode;
/// A real JPEG photo-like image (a gradient with some structure), `width`×`height`.
pub use testkit::images::jpeg;
pub use testkit::local_aws::{aws_sdk_config, local_aws, LocalAws};
use testkit::local_aws::{repo_root, TiedChild};
use testkit::stack_env::{gateway_env, Resources};

/// Sends `file` to a `POST /uploads` answer's URL as the browser form S3 expects: its signed
/// fields in order, then the file as the last field.
pub async fn post_upload(
    http: &reqwest::Client,
    upload: &Value,
    file: Vec<u8>,
) -> reqwest::Response {
    let boundary = format!("----gateway-test-{}", uuid::Uuid::new_v4().simple());
    let mut body = Vec::new();
    for field in upload["fields"].as_array().expect("upload fields") {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"\r\n\r\n{}\r\n",
                field["name"].as_str().unwrap(),
                field["value"].as_str().unwrap()
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"photo\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(&file);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    http.post(upload["url"].as_str().expect("upload url"))
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .expect("the upload request is sent")
}

/// Where ComfyUI's folders are on a stack's volume.
pub const POD_VOLUME_COMFYUI_ROOT: &str = "ComfyUI";

pub const ALICE: &str = "alice-token";
pub const BOB: &str = "bob-token";
pub const WEBHOOK_SECRET: &str = "test-webhook-secret-not-real-0001";

pub struct StackOptions {
    pub faults: Faults,
    /// How often the runner sweeps; long by default so tests see webhooks do the work.
    pub sweep_every: Duration,
    pub extra_env: Vec<(&'static str, String)>,
    /// Adjusts the emulator's configuration (retention, retry delays, …) before it starts.
    pub configure_emulator: fn(&mut EmulatorConfig),
    /// Visibility timeout of the dispatch queue: how soon a failed dispatch comes back.
    pub queue_visibility_secs: u32,
    /// The local AWS to use; the test process's shared one when `None`.
    pub aws: Option<std::sync::Arc<LocalAws>>,
    /// Dispatch batches the runner keeps in flight (the event source's MaximumConcurrency).
    pub dispatch_concurrency: Option<usize>,
    /// Adjusts the ComfyUI server's configuration (faults, run time) before it starts.
    pub configure_comfy: fn(&mut ComfyConfig),
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            faults: Faults::default(),
            sweep_every: Duration::from_secs(3600),
            extra_env: Vec::new(),
            configure_emulator: |_| {},
            queue_visibility_secs: 2,
            aws: None,
            dispatch_concurrency: None,
            configure_comfy: |_| {},
        }
    }
}

pub struct Stack {
    /// The gateway's configuration, as the runner got it.
    pub env: Env,
    pub emulator: Emulator,
    /// The pod backend's ComfyUI server.
    pub comfy: ComfyEmulator,
    pub runner: Runner,
    /// The test's own view of AWS, past any proxy.
    pub sdk: SdkConfig,
    /// What the gateway uses: through the proxies, when there are any.
    pub gateway_sdk: SdkConfig,
    pub table: String,
    pub queue_url: String,
    pub uploads_bucket: String,
    pub results_bucket: String,
    pub http: reqwest::Client,
    volume_tmp: PathBuf,
}

impl Stack {
    pub async fn start() -> Self {
        Self::start_with(StackOptions::default()).await
    }

    pub async fn start_with(options: StackOptions) -> Self {
        let aws: &LocalAws = match &options.aws {
            Some(aws) => aws,
            None => local_aws(),
        };
        // The gateway goes through the local AWS's proxies (and their faults, when a test
        // switches them on); the test's own checks go straight to moto.
        let gateway_sdk = aws.sdk_config().await;
        let sdk = aws.direct_sdk_config().await;
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let volume_tmp = std::env::temp_dir().join(format!("gateway-test-volume-{id}"));
        let mut emulator_config = EmulatorConfig {
            volume_dir: volume_tmp.clone(),
            faults: options.faults,
            webhook_retry_delay: Duration::from_millis(200),
            ..EmulatorConfig::default()
        };
        (options.configure_emulator)(&mut emulator_config);
        let emulator = runpod_emulator::spawn(
            emulator_config,
            SocketAddr::from(([127, 0, 0, 1], 0)),
            SocketAddr::from(([127, 0, 0, 1], 0)),
        )
        .await
        .expect("start the RunPod emulator");
        // The pod backend's ComfyUI server, its folders on the same volume, as on a pod that
        // mounts the network volume at /workspace with ComfyUI in /workspace/ComfyUI.
        let comfy_root = volume_tmp.join(POD_VOLUME_COMFYUI_ROOT);
        let mut comfy_config =
            ComfyConfig::new(comfy_root.join("input"), comfy_root.join("output"));
        comfy_config.temp_dir = volume_tmp.join("comfyui-temp");
        (options.configure_comfy)(&mut comfy_config);
        let comfy = comfyui_emulator::spawn(comfy_config, SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .expect("start the ComfyUI emulator");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_url = format!("http://{}", listener.local_addr().unwrap());
        let table = format!("jobs-{id}");
        let queue_url = format!("{}/123456789012/jobs-{id}", aws.sqs());
        let uploads_bucket = format!("uploads-{id}");
        let results_bucket = format!("results-{id}");
        let resources = Resources {
            table: table.clone(),
            queue_url: queue_url.clone(),
            stop_queue_url: format!("{}/123456789012/stops-{id}", aws.sqs()),
            finalize_queue_url: format!("{}/123456789012/finalize-{id}", aws.sqs()),
            callback_queue_url: format!("{}/123456789012/callbacks-{id}", aws.sqs()),
            poll_queue_url: format!("{}/123456789012/polls-{id}", aws.sqs()),
            callback_key: format!("alias/callbacks-{id}"),
            uploads: uploads_bucket.clone(),
            results: results_bucket.clone(),
        };
        let mut vars = gateway_env(
            &resources,
            &emulator,
            &gateway_url,
            WEBHOOK_SECRET,
            &format!("{ALICE}=alice,{BOB}=bob"),
        );
        vars.extend([
            ("STATUS_POLL_AFTER_SECS", "1".into()),
            ("STATUS_POLL_INTERVAL_SECS", "1".into()),
            ("JOB_REQUEUE_AFTER_SECS", "5".into()),
            // A lost /run answer's wait for its run to announce itself, short enough for tests.
            ("RUN_OUTCOME_GRACE_SECS", "1".into()),
            // Both backends; jobs that do not ask run on serverless.
            ("BACKENDS", "serverless,pod".into()),
            ("POD_COMFYUI_URL", comfy.url.clone()),
            ("POD_POLL_SECS", "1".into()),
            ("POD_VOLUME_COMFYUI_ROOT", POD_VOLUME_COMFYUI_ROOT.into()),
        ]);
        vars.extend(options.extra_env);
        let env = Env::from_pairs(vars);
        // The metric lines the functions flush are kept for the tests to read, not printed.
        gateway_aws::metrics::capture();
        let wiring = Wiring::new(env.clone(), gateway_sdk.clone()).expect("wire the gateway");
        let runner = local_runner::start_on(
            listener,
            wiring,
            RunnerOptions {
                sweep_every: options.sweep_every,
                queue_visibility_secs: options.queue_visibility_secs,
                dispatch_concurrency: options
                    .dispatch_concurrency
                    .unwrap_or(RunnerOptions::default().dispatch_concurrency),
                ..RunnerOptions::default()
            },
        )
        .await
        .expect("start the local runner");
        Self {
            env,
            emulator,
            comfy,
            runner,
            sdk,
            gateway_sdk,
            table,
            queue_url,
            uploads_bucket,
            results_bucket,
            http: reqwest::Client::new(),
            volume_tmp,
        }
    }

    /// The same wiring the runner uses, to call a function's handler directly.
    /// Whatever `job_id` has on the volume: every file under its input and output folders, and
    /// the folders themselves (RunPod lists empty folders, so a clean-up removes them too).
    pub fn on_the_volume(&self, job_id: &str) -> Vec<String> {
        fn files(dir: &std::path::Path, into: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    files(&path, into);
                } else {
                    into.push(path.display().to_string());
                }
            }
        }
        let root = gateway::domain::keys::VolumeRoot::new(testkit::stack_env::LOCAL_VOLUME_ROOT)
            .expect("a valid root");
        let mut left = Vec::new();
        for folder in [root.inputs(job_id), root.outputs(job_id)] {
            let path = self.emulator.volume_dir.join(folder);
            files(&path, &mut left);
            if path.exists() {
                left.push(format!("{}/", path.display()));
            }
        }
        left
    }

    pub fn wiring(&self) -> Wiring {
        Wiring::new(self.env.clone(), self.gateway_sdk.clone()).expect("wire the gateway")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.runner.url(), path)
    }

    pub async fn post_json(&self, token: &str, path: &str, body: &Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .json(body)
            .send()
            .await
            .unwrap();
        read(response).await
    }

    pub async fn post_raw(&self, token: &str, path: &str, body: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url(path))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        read(response).await
    }

    pub async fn get(&self, token: &str, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        read(response).await
    }

    pub async fn delete(&self, token: &str, path: &str) -> (StatusCode, Value) {
        let response = self
            .http
            .delete(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        read(response).await
    }

    /// Submits a restore job with an inline image; returns the job id.
    pub async fn submit_restore(&self, token: &str, image: &[u8], params: Value) -> String {
        let (status, body) = self
            .post_json(token, "/jobs", &restore_request(image, params))
            .await;
        assert_eq!(status, StatusCode::ACCEPTED, "submit failed: {body}");
        body["job_id"].as_str().unwrap().to_string()
    }

    /// Submits a restore job with an inline image to the pod backend; returns the job id.
    pub async fn submit_restore_on_pod(&self, token: &str, image: &[u8], params: Value) -> String {
        let mut request = restore_request(image, params);
        request["backend"] = Value::from("pod");
        let (status, body) = self.post_json(token, "/jobs", &request).await;
        assert_eq!(status, StatusCode::ACCEPTED, "submit failed: {body}");
        body["job_id"].as_str().unwrap().to_string()
    }

    /// What the pod backend's ComfyUI server left of `job_id` on the volume: its input and
    /// output folders and everything in them.
    pub fn pod_files_on_the_volume(&self, job_id: &str) -> Vec<String> {
        let root = self.emulator.volume_dir.join(POD_VOLUME_COMFYUI_ROOT);
        ["input", "output"]
            .iter()
            .map(|kind| root.join(kind).join("gateway").join(job_id))
            .filter(|path| path.exists())
            .map(|path| path.display().to_string())
            .collect()
    }

    /// Submits a small photo with the workflow's defaults and waits until the job is terminal:
    /// the first step of most fault tests. Returns the job id and its final `GET /jobs/{id}`.
    pub async fn restore_until_terminal(&self, token: &str, timeout: Duration) -> (String, Value) {
        let job_id = self
            .submit_restore(token, &jpeg(200, 150), serde_json::json!({}))
            .await;
        let job = self.wait_terminal(token, &job_id, timeout).await;
        (job_id, job)
    }

    /// Polls `GET /jobs/{id}` until the job is terminal.
    pub async fn wait_terminal(&self, token: &str, job_id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (status, body) = self.get(token, &format!("/jobs/{job_id}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            if matches!(
                body["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled" | "timed_out")
            ) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "job {job_id} not terminal in time: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Polls until the job reaches `state` (public name).
    pub async fn wait_status(
        &self,
        token: &str,
        job_id: &str,
        state: &str,
        timeout: Duration,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, body) = self.get(token, &format!("/jobs/{job_id}")).await;
            if body["status"] == state {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "job {job_id} never reached {state}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn dynamodb(&self) -> aws_sdk_dynamodb::Client {
        aws_sdk_dynamodb::Client::new(&self.sdk)
    }

    pub fn sqs(&self) -> aws_sdk_sqs::Client {
        aws_sdk_sqs::Client::new(&self.sdk)
    }

    pub fn s3(&self) -> aws_sdk_s3::Client {
        aws_sdk_s3::Client::from_conf(
            aws_sdk_s3::config::Builder::from(&self.sdk)
                .force_path_style(true)
                .build(),
        )
    }

    /// Every item in the jobs table. Tests may scan; the gateway never does.
    pub async fn table_items(&self) -> usize {
        self.dynamodb()
            .scan()
            .table_name(&self.table)
            .send()
            .await
            .unwrap()
            .count() as usize
    }

    /// The dispatch queue's dead-letter queue (created by the local runner).
    pub fn dlq_url(&self) -> String {
        format!("{}-dlq", self.queue_url)
    }

    /// Messages waiting or in flight on the dispatch queue.
    pub async fn queue_depth(&self) -> usize {
        self.depth_of(&self.queue_url).await
    }

    /// Messages waiting or in flight on a queue.
    pub async fn depth_of(&self, queue_url: &str) -> usize {
        testkit::local_aws::queue_depth(&self.sqs(), queue_url)
            .await
            .expect("SQS answers")
    }

    /// Object keys in a bucket under a prefix.
    pub async fn keys(&self, bucket: &str, prefix: &str) -> Vec<String> {
        self.s3()
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .send()
            .await
            .unwrap()
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect()
    }

    /// A queued `restore` job stored as the API stores it (its input in the uploads bucket) but
    /// with no queue message, so only what the test does next moves it. The sweeper first looks
    /// at it `first_check_ms` after now; its deadline is ten minutes away.
    pub async fn store_queued_job(&self, owner: &str, id: &str, first_check_ms: i64) -> Job {
        use gateway::domain::job::JobTiming;
        use gateway::ports::JobStore;
        let key = format!("inputs/{owner}/{id}/input.jpg");
        self.s3()
            .put_object()
            .bucket(&self.uploads_bucket)
            .key(&key)
            .body(jpeg(120, 90).into())
            .send()
            .await
            .unwrap();
        let catalog = gateway::domain::workflow::WorkflowCatalog::builtin().unwrap();
        let now = gateway::ports::Clock::now_ms(&gateway::ports::SystemClock);
        let timing = JobTiming {
            deadline_ms: 600_000,
            first_check_ms,
            retention_secs: 3_600,
            tombstone_secs: 7 * 86_400,
            idempotency_window_secs: 86_400,
            cleanup_delay_ms: 120_000,
        };
        let job = testkit::jobs::restore_job(&catalog, id, owner, &key, 1, timing, now);
        gateway_aws::adapters::dynamodb::DynamoJobStore::new(self.dynamodb(), &self.table)
            .create(&job)
            .await
            .unwrap();
        job
    }

    /// Whether the results bucket is, or soon becomes, empty: a failed finalize records the
    /// job's end first and removes what it wrote (and the run's stored report) just after.
    pub async fn results_emptied(&self) -> bool {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            if self.keys(&self.results_bucket, "").await.is_empty() {
                return true;
            }
            if Instant::now() > until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sets `owner`'s limits in the table, as an operator would.
    pub async fn set_limits(
        &self,
        owner: &str,
        overrides: gateway::domain::tenant::LimitOverrides,
    ) {
        use gateway::ports::TenantStore;
        gateway_aws::adapters::dynamodb::DynamoJobStore::new(self.dynamodb(), &self.table)
            .set_overrides(owner, &overrides)
            .await
            .unwrap();
    }

    /// The job record as stored (versions, leases and all), read through the gateway's adapter.
    /// The job as stored once it is terminal (the finalize queue's consumer ends a handed-off
    /// job a moment after the hand-off).
    pub async fn stored_terminal(
        &self,
        job_id: &str,
        timeout: Duration,
    ) -> gateway::domain::job::Job {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.stored_job(job_id).await;
            if job.is_terminal() {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {job_id} not terminal in time: {:?}",
                job.state
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn stored_job(&self, job_id: &str) -> gateway::domain::job::Job {
        use gateway::ports::JobStore;
        gateway_aws::adapters::dynamodb::DynamoJobStore::new(self.dynamodb(), &self.table)
            .get(job_id)
            .await
            .unwrap()
            .expect("job stored")
    }

    /// The RunPod job the gateway submitted for `job_id`, as the emulator holds it.
    pub async fn runpod_job(&self, job_id: &str) -> runpod_emulator::JobSnapshot {
        let runpod_id = self
            .stored_job(job_id)
            .await
            .runpod_job_id
            .expect("job submitted to RunPod");
        self.emulator.job(&runpod_id).expect("RunPod knows the job")
    }

    /// The file names stored for `owner`'s job in the results bucket, sorted; each lies in the
    /// folder of the finalize attempt that stored it (`results/{owner}/{job}/{attempt}/{name}`),
    /// so all must come from one attempt. A stored report of the job's run (kept for finalize,
    /// in the job's folder itself) is not a result.
    pub async fn result_files(&self, owner: &str, job_id: &str) -> Vec<String> {
        let folder = format!("results/{owner}/{job_id}/");
        let keys: Vec<String> = self
            .keys(&self.results_bucket, &folder)
            .await
            .into_iter()
            .filter(|k| k[folder.len()..].contains('/'))
            .collect();
        let folders: std::collections::BTreeSet<&str> = keys
            .iter()
            .filter_map(|k| k.rsplit_once('/').map(|(folder, _)| folder))
            .collect();
        assert!(
            folders.len() <= 1,
            "outputs from several attempts: {keys:?}"
        );
        let mut names: Vec<String> = keys
            .iter()
            .filter_map(|k| k.rsplit_once('/').map(|(_, name)| name.to_string()))
            .collect();
        names.sort();
        names
    }

    /// The RunPod run `runpod_id` once it is cancelled (the stop queue's consumer carries
    /// stops out a moment after they are asked for), or as it stands after `timeout`.
    pub async fn run_once_stopped(
        &self,
        runpod_id: &str,
        timeout: Duration,
    ) -> runpod_emulator::JobSnapshot {
        let until = Instant::now() + timeout;
        loop {
            let run = self.emulator.job(runpod_id).expect("RunPod knows the run");
            if run.status == runpod_emulator::JobStatus::Cancelled || Instant::now() > until {
                return run;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// POSTs a body to a webhook URL as RunPod would (no bearer token).
    pub async fn post_webhook(&self, url: &str, body: &str) -> StatusCode {
        self.http
            .post(url)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .status()
    }

    pub async fn stop(self) {
        self.runner.stop().await;
        self.emulator.shutdown().await;
        self.comfy.shutdown().await;
        let _ = std::fs::remove_dir_all(&self.volume_tmp);
    }
}

async fn read(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

/// Serves `app` on a free loopback port until the test ends: a photo host, a callback receiver,
/// an output server. Its address.
pub async fn serve_on_loopback(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    address
}

/// A child process of the tests: everything it calls is on loopback (an ambient proxy must not
/// capture it), its output is captured, and it dies with the test.
pub fn loopback_child(command: &mut tokio::process::Command) -> &mut tokio::process::Command {
    command
        .env("NO_PROXY", "*")
        .env("no_proxy", "*")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
}

pub fn restore_request(image: &[u8], params: Value) -> Value {
    use base64::Engine as _;
    serde_json::json!({
        "workflow": "restore",
        "params": params,
        "input": { "image_base64": base64::engine::general_purpose::STANDARD.encode(image) },
    })
}

// ---------------------------------------------------------------------------------------------
// The real `runpod` Python SDK, from the repo's .venv
// ---------------------------------------------------------------------------------------------

/// The repo's virtualenv Python (scripts/bootstrap installs `runpod` and Pillow into it).
pub fn venv_python() -> PathBuf {
    let python = repo_root().join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/bootstrap (scripts/test does it for you)",
        python.display()
    );
    python
}

/// `tests/python/`: the handlers and helper scripts the SDK tests run.
pub fn python_dir() -> PathBuf {
    repo_root().join("tests/python")
}

/// A stock `runpod` SDK worker (`runpod.serverless.start`) in a child process, serving one of
/// the handlers in `tests/python/` against the emulator's worker protocol (job-take, job-done,
/// progress, job-stop, ping), as a worker on RunPod would.
///
/// The process dies with the test: it is killed (its whole process group, heartbeat process
/// included) on drop, and `PR_SET_PDEATHSIG` kills it if the test process dies first. The
/// handlers arm the same signal in every process they fork.
pub struct SdkWorker {
    /// The worker id (`RUNPOD_POD_ID`) it uses in the protocol's URLs.
    pub pod_id: String,
    dir: PathBuf,
    process: Option<TiedChild>,
}

impl SdkWorker {
    /// Starts `tests/python/<handler>` as an SDK worker of `emulator`. `env` adds or overrides
    /// variables (e.g. `HANDLER_DELAY_SECS`). Run the emulator with `builtin_worker = false` so
    /// this worker gets the jobs.
    pub fn start(emulator: &Emulator, handler: &str, env: &[(&str, String)]) -> Self {
        let python = venv_python();
        let script = python_dir().join(handler);
        assert!(script.exists(), "{} is missing", script.display());
        let pod_id = format!("sdk-{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
        // HOME without .runpod/config.toml (its api_key would override ours), and the cwd for
        // anything the SDK writes locally.
        let dir = std::env::temp_dir().join(format!("gateway-test-{pod_id}"));
        std::fs::create_dir_all(&dir).expect("worker dir");
        let log = std::fs::File::create(dir.join("worker.log")).expect("worker log");
        let base = emulator.endpoint_url();
        // The SDK appends `&job_in_progress=…`, `&isStream=…`: the templates carry a `?` already.
        let mut vars: Vec<(&str, String)> = vec![
            ("PATH", std::env::var("PATH").unwrap_or_default()),
            ("LANG", "C.UTF-8".into()),
            ("HOME", dir.display().to_string()),
            ("PYTHONUNBUFFERED", "1".into()),
            ("PYTHONDONTWRITEBYTECODE", "1".into()),
            (
                "RUNPOD_WEBHOOK_GET_JOB",
                format!("{base}/job-take/$ID?gpu=SIM"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_OUTPUT",
                format!("{base}/job-done/$RUNPOD_POD_ID/$ID?gpu=SIM"),
            ),
            (
                "RUNPOD_WEBHOOK_POST_STREAM",
                format!("{base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=SIM"),
            ),
            (
                "RUNPOD_WEBHOOK_PING",
                format!("{base}/ping/$RUNPOD_POD_ID?gpu=SIM"),
            ),
            ("RUNPOD_PING_INTERVAL", "2000".into()),
            ("RUNPOD_POD_ID", pod_id.clone()),
            ("RUNPOD_AI_API_KEY", emulator.api_key.clone()),
            // Offline: the fitness checks' 8.8.8.8 probe would os._exit(1) the worker.
            ("RUNPOD_SKIP_AUTO_SYSTEM_CHECKS", "true".into()),
            ("RUNPOD_SKIP_GPU_CHECK", "true".into()),
            ("RUNPOD_LOG_LEVEL", "INFO".into()),
            (
                "RUNPOD_VOLUME_DIR",
                emulator.volume_dir.display().to_string(),
            ),
            ("RUNPOD_VOLUME_MOUNT", emulator.mount_prefix.clone()),
        ];
        for (name, value) in env {
            vars.retain(|(existing, _)| existing != name);
            vars.push((name, value.clone()));
        }
        let mut command = Command::new(python);
        command
            .arg(&script)
            .current_dir(&dir)
            .env_clear()
            .envs(vars)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        // Killed with its process group (the heartbeat process too) on drop.
        let process = TiedChild::spawn(command, libc::SIGKILL).expect("start the SDK worker");
        Self {
            pod_id,
            dir,
            process: Some(process),
        }
    }

    /// Everything the worker printed so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("worker.log")).unwrap_or_default()
    }

    /// Waits until the worker is polling the emulator (its heartbeat arrived), or panics.
    pub async fn wait_ready(&self, emulator: &Emulator, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !emulator
            .worker_calls()
            .iter()
            .any(|call| call.pod == self.pod_id)
        {
            assert!(
                Instant::now() < deadline,
                "the SDK worker never called the emulator; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for SdkWorker {
    fn drop(&mut self) {
        drop(self.process.take());
        if std::thread::panicking() {
            eprintln!("---- SDK worker {} log ----\n{}", self.pod_id, self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `tests/python/<script>` with the venv's Python and `env`, killing it after `timeout`.
/// Returns (exit success, stdout, stderr).
pub async fn run_python(
    script: &str,
    env: &[(&str, String)],
    timeout: Duration,
) -> (bool, String, String) {
    let mut command = tokio::process::Command::new(venv_python());
    command
        .arg(python_dir().join(script))
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    loopback_child(&mut command);
    let child = command.spawn().expect("start python");
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(output) => {
            let output = output.expect("python output");
            (
                output.status.success(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        }
        Err(_) => panic!("{script} did not finish within {timeout:?}"),
    }
}

impl Stack {
    /// A real SDK worker serving this stack's emulator (start the stack with the built-in
    /// worker off: `configure_emulator: |c| c.builtin_worker = false`).
    pub fn sdk_worker(&self, handler: &str, env: &[(&str, String)]) -> SdkWorker {
        SdkWorker::start(&self.emulator, handler, env)
    }

    /// Submits a job of any workflow with an inline image; returns the job id.
    pub async fn submit_workflow(
        &self,
        token: &str,
        workflow: &str,
        image: &[u8],
        params: Value,
    ) -> String {
        let mut request = restore_request(image, params);
        request["workflow"] = Value::String(workflow.to_string());
        let (status, body) = self.post_json(token, "/jobs", &request).await;
        assert_eq!(status, StatusCode::ACCEPTED, "submit failed: {body}");
        body["job_id"].as_str().unwrap().to_string()
    }
}

/// Log lines in memory, written as the functions write them (JSON, fields at the top level),
/// for tests that read what was logged.
#[derive(Clone, Default)]
pub struct LogLines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for LogLines {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogLines {
    /// A subscriber that writes here, configured as the functions' own.
    pub fn subscriber(&self) -> Box<dyn tracing::Subscriber + Send + Sync> {
        let log = gateway::config::LogConfig {
            json: true,
            filter: "info".into(),
            ..gateway::config::LogConfig::from_env(&Env::from_pairs(std::iter::empty::<(
                String,
                String,
            )>()))
        };
        let writer = self.clone();
        gateway_aws::wiring::subscriber(&log, move || writer.clone())
    }

    /// Every line written so far that is JSON.
    pub fn parsed(&self) -> Vec<Value> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }
}
