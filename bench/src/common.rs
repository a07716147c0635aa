//! What every figure needs: a moto server of the benchmark's own, the RunPod emulator, the
//! gateway's configuration pointed at both, job records, images, and statistics.
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_s3::config::Credentials;
use gateway::config::Env;
use gateway::domain::job::{InputRef, Job, JobTiming, Millis, NewJob};
use gateway::domain::workflow::ValidatedParams;
use gateway_aws::wiring::Wiring;
use runpod_emulator::{Emulator, EmulatorConfig, Faults};
pub use testkit::images::jpeg;
pub use testkit::local_aws::repo_root;
use testkit::local_aws::{spawn_moto, TiedChild};
use testkit::stack_env::{self, Resources};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

pub const REGION: &str = "us-east-1";
pub const WEBHOOK_SECRET: &str = "bench-webhook-secret-not-real-0001";
pub const DEV_TOKEN: &str = "bench-token";
pub const OWNER: &str = "bench-owner";

/// The folder of this executable: the release bins of the workspace sit beside it.
pub fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| repo_root().join("target/release"))
}

/// Ends a child process when this process dies, even on a panic or a kill (Linux).
pub fn die_with_parent(command: &mut Command) {
    unsafe {
        use std::os::unix::process::CommandExt;
        command.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
}

/// A `moto_server` of the benchmark's own (one process for every service, as the baselines
/// were measured); stopped on drop.
pub struct Moto {
    pub endpoint: String,
    process: TiedChild,
}

impl Moto {
    pub fn start() -> Result<Self, BoxError> {
        // The throughput figure empties its queues between rounds, more often than AWS's one
        // purge a minute that moto enforces by default.
        let (process, endpoint) =
            spawn_moto(&[("MOTO_SQS_ENFORCE_STRICT_QUEUE_PURGE_BEHAVIOUR", "false")])?;
        Ok(Self { endpoint, process })
    }

    pub fn pid(&self) -> u32 {
        self.process.pid
    }
}

pub async fn sdk_config(endpoint: &str) -> SdkConfig {
    aws_config::defaults(BehaviorVersion::latest())
        .region(Region::new(REGION))
        .endpoint_url(endpoint)
        .credentials_provider(Credentials::new("bench", "bench", None, None, "bench"))
        .load()
        .await
}

/// The emulator with its volume in a fresh temporary folder. `builtin_worker` off leaves jobs
/// queued at "RunPod" so the benchmark decides what they report.
pub async fn emulator(builtin_worker: bool) -> Result<Emulator, BoxError> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let config = EmulatorConfig {
        volume_dir: std::env::temp_dir().join(format!("gateway-bench-volume-{}", &id[..12])),
        builtin_worker,
        faults: Faults::default(),
        webhook_retry_delay: Duration::from_secs(1),
        ..EmulatorConfig::default()
    };
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    Ok(runpod_emulator::spawn(config, any, any).await?)
}

/// Names of one set of AWS resources (table, queue, buckets), unique per call.
#[derive(Clone, Debug)]
pub struct Names {
    pub table: String,
    pub queue_url: String,
    pub stop_queue_url: String,
    pub finalize_queue_url: String,
    pub callback_queue_url: String,
    pub poll_queue_url: String,
    pub callback_key: String,
    pub uploads: String,
    pub results: String,
}

impl Names {
    pub fn fresh(moto: &str, label: &str) -> Self {
        let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
        Self {
            table: format!("bench-{label}-{id}"),
            queue_url: format!("{moto}/123456789012/bench-{label}-{id}"),
            stop_queue_url: format!("{moto}/123456789012/bench-{label}-stops-{id}"),
            finalize_queue_url: format!("{moto}/123456789012/bench-{label}-finalize-{id}"),
            callback_queue_url: format!("{moto}/123456789012/bench-{label}-callbacks-{id}"),
            poll_queue_url: format!("{moto}/123456789012/bench-{label}-polls-{id}"),
            callback_key: format!("alias/bench-{label}-callbacks-{id}"),
            uploads: format!("bench-{label}-uploads-{id}"),
            results: format!("bench-{label}-results-{id}"),
        }
    }
}

/// The environment the Lambda functions read (README, Configuration), pointed at the local
/// stack. Every credential is a local fake.
pub fn gateway_env(
    moto: &str,
    emulator: &Emulator,
    names: &Names,
    webhook_base: &str,
) -> Vec<(String, String)> {
    let aws = [
        ("AWS_REGION", REGION.to_string()),
        ("AWS_DEFAULT_REGION", REGION.to_string()),
        ("AWS_ACCESS_KEY_ID", "bench-fake".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "bench-fake".to_string()),
        ("AWS_ENDPOINT_URL", moto.to_string()),
    ];
    let resources = Resources {
        table: names.table.clone(),
        queue_url: names.queue_url.clone(),
        stop_queue_url: names.stop_queue_url.clone(),
        finalize_queue_url: names.finalize_queue_url.clone(),
        callback_queue_url: names.callback_queue_url.clone(),
        poll_queue_url: names.poll_queue_url.clone(),
        callback_key: names.callback_key.clone(),
        uploads: names.uploads.clone(),
        results: names.results.clone(),
    };
    let gateway = stack_env::gateway_env(
        &resources,
        emulator,
        webhook_base,
        WEBHOOK_SECRET,
        &format!("{DEV_TOKEN}={OWNER}"),
    );
    aws.into_iter()
        .chain(gateway)
        .map(|(k, v)| (k.to_string(), v))
        .collect()
}

/// Creates a Secrets Manager secret in moto (the JSON protocol, unsigned: moto routes on the
/// credential scope) and returns its ARN. Used to give the functions their `*_SECRET_ARN` as the
/// template does, so that their init pays its GetSecretValue calls.
pub async fn create_secret(
    moto: &str,
    name: &str,
    value: &serde_json::Value,
) -> Result<String, BoxError> {
    let response = reqwest::Client::new()
        .post(format!("{moto}/"))
        .header("content-type", "application/x-amz-json-1.1")
        .header("x-amz-target", "secretsmanager.CreateSecret")
        .header(
            "authorization",
            format!("AWS4-HMAC-SHA256 Credential=bench/20261127/{REGION}/secretsmanager/aws4_request, SignedHeaders=host, Signature=0"),
        )
        .body(serde_json::json!({ "Name": name, "SecretString": value.to_string() }).to_string())
        .send()
        .await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    body["ARN"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| format!("CreateSecret answered {status}: {body}").into())
}

/// An in-process wiring over `vars`, with its table, queue and buckets created in moto.
pub async fn wiring(sdk: &SdkConfig, vars: &[(String, String)]) -> Result<Wiring, BoxError> {
    let wiring = Wiring::new(Env::from_pairs(vars.iter().cloned()), sdk.clone())?;
    local_runner::resources::ensure(&wiring, 30).await?;
    Ok(wiring)
}

/// The local runner on `listener`, over resources `wiring`'s caller created, with no sweep of
/// its own during a figure (the figures that need one run it themselves).
pub async fn runner(
    listener: tokio::net::TcpListener,
    wiring: Wiring,
) -> Result<local_runner::Runner, BoxError> {
    Ok(local_runner::start_on(
        listener,
        wiring,
        local_runner::RunnerOptions {
            sweep_every: Duration::from_secs(3600),
            create_resources: false,
            ..local_runner::RunnerOptions::default()
        },
    )
    .await?)
}

pub fn now_ms() -> Millis {
    gateway::ports::Clock::now_ms(&gateway::ports::SystemClock)
}

/// A restore job as `POST /jobs` would create it (queued, default parameters).
pub fn new_job(owner: &str, now: Millis) -> Job {
    let id = uuid::Uuid::now_v7().to_string();
    let params = ValidatedParams(
        [
            ("megapixels", serde_json::json!(1.0)),
            ("denoise", serde_json::json!(0.7)),
            ("seed", serde_json::json!(123_456_789u64)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
    );
    Job::new(
        NewJob {
            input: InputRef {
                key: format!("inputs/{owner}/{id}/input.jpg"),
                content_type: "image/jpeg".into(),
                size: 48_213,
                extension: "jpg".into(),
                source_url: None,
            },
            id,
            owner: owner.to_string(),
            workflow: "restore".into(),
            workflow_version: "1".into(),
            params,
            idempotency_key: None,
            request_digest: None,
            callback_url: None,
            callback_events: Vec::new(),
            backend: Default::default(),
            priority: Default::default(),
        },
        JobTiming {
            deadline_ms: 3_600_000,
            first_check_ms: 120_000,
            retention_secs: 30 * 86_400,
            tombstone_secs: 7 * 86_400,
            idempotency_window_secs: 86_400,
            cleanup_delay_ms: 120_000,
        },
        now,
    )
}

/// A job RunPod has (`submitted`), next checked at `next_check`.
pub fn submitted_job(owner: &str, runpod_id: &str, now: Millis, next_check: Millis) -> Job {
    let mut job = new_job(owner, now);
    job.mark_submitted(runpod_id.to_string(), now, next_check)
        .expect("a queued job can be submitted");
    job
}

pub fn restore_request(image: &[u8]) -> serde_json::Value {
    use base64::Engine as _;
    serde_json::json!({
        "workflow": "restore",
        "params": { "megapixels": 0.25 },
        "input": { "image_base64": base64::engine::general_purpose::STANDARD.encode(image) },
    })
}

/// Writes `bytes` bytes of incompressible data to `path` without holding them in memory.
pub fn write_file(path: &Path, bytes: u64) -> std::io::Result<()> {
    use rand::RngCore;
    use std::io::Write;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut block = vec![0u8; 1 << 20];
    rand::rng().fill_bytes(&mut block);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        file.write_all(&block[..n])?;
        // Vary each block a little so no two are the same.
        block[0] = block[0].wrapping_add(1);
        left -= n as u64;
    }
    file.flush()
}

/// `field` (e.g. `VmHWM`) of `/proc/<pid>/status`, in kB.
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    proc_status_kb_file(&format!("/proc/{pid}/status"), field)
}

/// `field` of a `/proc` file of `Name:   value kB` lines, in kB.
pub fn proc_status_kb_file(path: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|line| {
            let rest = line.strip_prefix(field)?.strip_prefix(':')?;
            rest.trim().trim_end_matches("kB").trim().parse().ok()
        })
}

/// Median, min and max of repeated measurements.
#[derive(Clone, Copy, Debug, Default)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Summary {
    pub fn of(values: &[f64]) -> Self {
        if values.is_empty() {
            return Self::default();
        }
        let mut sorted = values.to_vec();
        sorted.sort_by(|a, b| a.total_cmp(b));
        let n = sorted.len();
        let median = if n % 2 == 1 {
            sorted[n / 2]
        } else {
            (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
        };
        Self {
            median,
            min: sorted[0],
            max: sorted[n - 1],
            n,
        }
    }

    /// `12.3 (11.9–13.0)` with `decimals` places.
    pub fn show(&self, decimals: usize) -> String {
        if self.n == 0 {
            return "n/a".into();
        }
        format!(
            "{:.d$} ({:.d$}–{:.d$})",
            self.median,
            self.min,
            self.max,
            d = decimals
        )
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Progress on stderr, so stdout holds only the table.
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => {{
        eprintln!("[bench] {}", format!($($arg)*));
    }};
}
