//! Configuration from the environment, read once at start-up, and only here: every variable
//! any binary reads is read in this module, with its default written once. Each function reads
//! only the groups it needs, so a missing variable names itself at cold start rather than
//! mid-request. [`Env`] records every name read, so what a function reads is data (the
//! deployment contract test compares it with `template.yaml`).
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::domain::egress::EgressPolicy;
use crate::domain::job::BackendKind;
use crate::domain::keys::VolumeRoot;
use crate::domain::report::UrlAllowList;
use crate::domain::retry::{Backoff, RetryPolicy};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("environment variable {0} is required")]
    Missing(&'static str),
    #[error("environment variable {name} is invalid: {reason}")]
    Invalid { name: &'static str, reason: String },
}

/// Where configuration comes from: the process environment in Lambda and the local runner, or an
/// explicit map in tests (several gateways in one test process must not share globals).
#[derive(Clone, Default)]
pub struct Env {
    vars: Option<HashMap<String, String>>,
    /// Values that win over `vars`: the secrets fetched from Secrets Manager at start-up.
    secrets: HashMap<String, String>,
    /// Every name asked for, set or not; shared by clones.
    read: Arc<Mutex<BTreeSet<String>>>,
}

impl std::fmt::Debug for Env {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Names only: values include secrets.
        f.debug_struct("Env")
            .field("process", &self.vars.is_none())
            .field("secrets", &self.secrets.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Env {
    pub fn process() -> Self {
        Self::default()
    }

    /// This environment with secret values laid over it.
    pub fn with_secrets(mut self, secrets: HashMap<String, String>) -> Self {
        self.secrets = secrets;
        self
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: Some(
                pairs
                    .into_iter()
                    .map(|(k, v)| (k.into(), v.into()))
                    .collect(),
            ),
            secrets: HashMap::new(),
            read: Arc::default(),
        }
    }

    /// Every variable read so far through this environment or a clone of it.
    pub fn names_read(&self) -> BTreeSet<String> {
        self.read.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn get(&self, name: &str) -> Option<String> {
        self.read
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string());
        if let Some(secret) = self.secrets.get(name) {
            return Some(secret.clone()).filter(|v| !v.trim().is_empty());
        }
        let value = match &self.vars {
            None => std::env::var(name).ok(),
            Some(map) => map.get(name).cloned(),
        };
        value.filter(|v| !v.trim().is_empty())
    }

    fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.get(name).ok_or(ConfigError::Missing(name))
    }
}

fn parsed<T: std::str::FromStr>(env: &Env, name: &'static str, default: T) -> Result<T, ConfigError>
where
    T::Err: std::fmt::Display,
{
    match env.get(name) {
        None => Ok(default),
        Some(raw) => raw
            .trim()
            .parse()
            .map_err(|e: T::Err| ConfigError::Invalid {
                name,
                reason: e.to_string(),
            }),
    }
}

fn seconds(env: &Env, name: &'static str, default: u64) -> Result<Duration, ConfigError> {
    parsed(env, name, default).map(Duration::from_secs)
}

fn flag(env: &Env, name: &'static str, default: bool) -> Result<bool, ConfigError> {
    match env
        .get(name)
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        None => Ok(default),
        Some("1" | "true" | "yes") => Ok(true),
        Some("0" | "false" | "no") => Ok(false),
        Some(other) => Err(ConfigError::Invalid {
            name,
            reason: format!("expected true or false, got {other:?}"),
        }),
    }
}

/// The longest RunPod answer read when `RUNPOD_MAX_STATUS_BYTES` is not set: room for one
/// worker-comfyui image at the per-image cap (50 MiB, about 67 MiB in base64) and its JSON.
pub const DEFAULT_MAX_STATUS_BYTES: u64 = 80 * 1024 * 1024;

/// Timing and size policy shared by every function.
#[derive(Clone, Debug)]
pub struct Settings {
    /// RunPod `policy.executionTimeout`: the longest a worker may run the job.
    pub execution_timeout: Duration,
    /// RunPod `policy.ttl`: the job's whole life at RunPod, queue included.
    pub runpod_ttl: Duration,
    /// From acceptance to a terminal state; past it the sweeper cancels the job as `timed_out`.
    pub job_deadline: Duration,
    /// A job still queued this long after acceptance (or its last re-enqueue) is re-enqueued.
    pub requeue_after: Duration,
    /// First `/status` poll after submission when no webhook came; then every `poll_interval`.
    /// Both must stay well inside RunPod's 30-minute result retention.
    pub status_poll_after: Duration,
    pub poll_interval: Duration,
    pub dispatch_lease: Duration,
    pub finalize_lease: Duration,
    pub max_dispatch_attempts: u32,
    /// After a `/run` whose outcome is unknown, how long before the job may be dispatched
    /// again: time for a run RunPod did take to announce itself (its webhook), so that it is
    /// adopted rather than run twice.
    pub run_outcome_grace: Duration,
    /// Dispatch starts `/run` only with at least this long of its invocation left, enough to
    /// record RunPod's answer (a `/run` with its retries, and the save).
    pub run_reserve: Duration,
    /// How long presigned result and upload URLs stay valid.
    pub presign_ttl: Duration,
    /// How long a job's data (input, outputs) is kept when the client does not say
    /// (`JOB_RETENTION_DAYS`); a client may ask for `retention_min`..=`retention_max`.
    pub record_retention: Duration,
    pub retention_min: Duration,
    pub retention_max: Duration,
    /// How long a deleted or expired job's record stays after its data, so that it answers 410
    /// rather than 404 (`TOMBSTONE_DAYS`); then DynamoDB's TTL removes it.
    pub tombstone: Duration,
    /// How long an `Idempotency-Key` stands for the job it created; after it, the same key
    /// creates a new job.
    pub idempotency_window: Duration,
    /// Most due jobs one sweep takes (`SWEEP_BATCH`), read from the index a page at a time.
    pub sweep_batch: u32,
    /// Checks in flight at once within a sweep (`SWEEP_CONCURRENCY`).
    pub sweep_concurrency: usize,
    /// The sweeper's share of RunPod's `/status` limit (2,000 per 10 s per endpoint), in calls
    /// per second (`SWEEP_STATUS_PER_SEC`); the webhook's `/status` calls use the rest. The
    /// sweeper's RunPod client is paced to it.
    pub sweep_status_per_sec: u32,
    pub max_inline_bytes: usize,
    pub max_upload_bytes: u64,
    /// Hosts a worker's `s3_url` images (worker-comfyui contract) may be fetched from
    /// (`OUTPUT_URL_ALLOWED_HOSTS`, comma-separated; see [`UrlAllowList`]). Empty: none.
    pub output_url_allowed_hosts: UrlAllowList,
    /// Largest output image the gateway stores from a worker-comfyui output, decoded or
    /// downloaded (`OUTPUT_MAX_IMAGE_BYTES`).
    pub max_output_image_bytes: u64,
    /// Largest single output file copied from the volume (`OUTPUT_MAX_FILE_BYTES`).
    pub max_output_file_bytes: u64,
    /// Most bytes of outputs one job may store, all files together (`OUTPUT_MAX_JOB_BYTES`).
    pub max_output_job_bytes: u64,
    /// Longest `/status` answer read from RunPod, and so the longest stored report
    /// (`RUNPOD_MAX_STATUS_BYTES`). A completed run's answer carries its output (base64 images,
    /// for worker-comfyui); a longer one fails the job `output_too_large`.
    pub max_status_bytes: u64,
    /// How long after RunPod confirmed a run completed finalize may keep trying to collect
    /// its outputs (`FINALIZE_GIVE_UP_SECS`); then the job fails `deadline_exceeded`.
    pub finalize_give_up: Duration,
    /// The price of a GPU-second (`GPU_PRICE_USD_PER_SECOND`, in USD, such as `0.00031`), in
    /// nano-USD: each job is priced at what is set when it is accepted. Unset: jobs show no
    /// cost.
    pub gpu_price_nano_usd: Option<u64>,
    /// Where the gateway may connect on a client's word (input URLs): public https only, and
    /// loopback too when `OUTBOUND_ALLOW_LOOPBACK` is set (the local stack's test hosts).
    pub egress: EgressPolicy,
    /// The backends this deployment runs jobs on (`BACKENDS`, comma-separated: `serverless`,
    /// `pod`); a job may ask for one of them.
    pub backends: Vec<BackendKind>,
    /// The backend of a job that does not ask (`DEFAULT_BACKEND`; the first of `BACKENDS`).
    pub default_backend: BackendKind,
    /// The backend of a batch that does not ask (`BATCH_BACKEND`): the pod when the deployment
    /// runs one (the seed's intent: batches on a warm pod), else the default.
    pub batch_backend: Option<BackendKind>,
    /// Most jobs of one batch dispatched at once, when the batch does not say
    /// (`BATCH_MAX_IN_FLIGHT`): a pod's queue stays this short.
    pub batch_max_in_flight: u32,
    /// Every owner's limits unless an operator set others for it (`TENANT_MAX_IN_FLIGHT`,
    /// `TENANT_SUBMITS_PER_MINUTE`, `TENANT_SUBMIT_BURST`; 0 turns one off).
    pub tenant_limits: crate::domain::tenant::TenantLimits,
}

fn backends(env: &Env) -> Result<(Vec<BackendKind>, BackendKind), ConfigError> {
    let invalid = |name, reason: String| ConfigError::Invalid { name, reason };
    let mut kinds = Vec::new();
    for name in env
        .get("BACKENDS")
        .unwrap_or_else(|| "serverless".into())
        .split(',')
    {
        let name = name.trim();
        if name.is_empty() {
            continue;
        }
        let kind = BackendKind::parse(name).ok_or_else(|| {
            invalid(
                "BACKENDS",
                format!("unknown backend {name:?}; known: serverless, pod"),
            )
        })?;
        if !kinds.contains(&kind) {
            kinds.push(kind);
        }
    }
    let Some(first) = kinds.first().copied() else {
        return Err(invalid("BACKENDS", "names no backend".into()));
    };
    let default = match env.get("DEFAULT_BACKEND") {
        None => first,
        Some(name) => BackendKind::parse(name.trim())
            .filter(|kind| kinds.contains(kind))
            .ok_or_else(|| {
                invalid(
                    "DEFAULT_BACKEND",
                    format!("{name:?} is not one of BACKENDS"),
                )
            })?,
    };
    Ok((kinds, default))
}

impl Settings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let (backends, default_backend) = backends(env)?;
        let settings = Self {
            execution_timeout: seconds(env, "JOB_EXECUTION_TIMEOUT_SECS", 600)?,
            runpod_ttl: seconds(env, "RUNPOD_JOB_TTL_SECS", 86_400)?,
            job_deadline: seconds(env, "JOB_DEADLINE_SECS", 3_600)?,
            requeue_after: seconds(env, "JOB_REQUEUE_AFTER_SECS", 120)?,
            status_poll_after: seconds(env, "STATUS_POLL_AFTER_SECS", 60)?,
            poll_interval: seconds(env, "STATUS_POLL_INTERVAL_SECS", 60)?,
            dispatch_lease: seconds(env, "DISPATCH_LEASE_SECS", 60)?,
            finalize_lease: seconds(env, "FINALIZE_LEASE_SECS", 120)?,
            max_dispatch_attempts: parsed(env, "MAX_DISPATCH_ATTEMPTS", 5)?,
            run_outcome_grace: seconds(env, "RUN_OUTCOME_GRACE_SECS", 120)?,
            run_reserve: seconds(env, "DISPATCH_RUN_RESERVE_SECS", 20)?,
            presign_ttl: seconds(env, "PRESIGN_TTL_SECS", 3_600)?,
            record_retention: seconds(env, "JOB_RETENTION_DAYS", 30).map(|d| d * 86_400)?,
            retention_min: seconds(env, "JOB_RETENTION_MIN_SECS", 3_600)?,
            retention_max: seconds(env, "JOB_RETENTION_MAX_DAYS", 90).map(|d| d * 86_400)?,
            tombstone: seconds(env, "TOMBSTONE_DAYS", 7).map(|d| d * 86_400)?,
            idempotency_window: seconds(env, "IDEMPOTENCY_WINDOW_HOURS", 24).map(|h| h * 3_600)?,
            sweep_batch: parsed(env, "SWEEP_BATCH", 4_500)?,
            sweep_concurrency: parsed(env, "SWEEP_CONCURRENCY", 32)?,
            sweep_status_per_sec: parsed(env, "SWEEP_STATUS_PER_SEC", 100)?,
            max_inline_bytes: 4 * 1024 * 1024,
            max_upload_bytes: 50 * 1024 * 1024,
            output_url_allowed_hosts: UrlAllowList::parse(
                &env.get("OUTPUT_URL_ALLOWED_HOSTS").unwrap_or_default(),
            )
            .map_err(|reason| ConfigError::Invalid {
                name: "OUTPUT_URL_ALLOWED_HOSTS",
                reason,
            })?,
            max_output_image_bytes: parsed(env, "OUTPUT_MAX_IMAGE_BYTES", 50 * 1024 * 1024)?,
            max_output_file_bytes: parsed(env, "OUTPUT_MAX_FILE_BYTES", 1024 * 1024 * 1024)?,
            max_output_job_bytes: parsed(env, "OUTPUT_MAX_JOB_BYTES", 2 * 1024 * 1024 * 1024)?,
            max_status_bytes: parsed(env, "RUNPOD_MAX_STATUS_BYTES", DEFAULT_MAX_STATUS_BYTES)?,
            finalize_give_up: seconds(env, "FINALIZE_GIVE_UP_SECS", 3_600)?,
            gpu_price_nano_usd: gpu_price(env)?,
            egress: EgressPolicy {
                allow_loopback: flag(env, "OUTBOUND_ALLOW_LOOPBACK", false)?,
            },
            batch_backend: match env.get("BATCH_BACKEND") {
                Some(name) => Some(
                    BackendKind::parse(name.trim())
                        .filter(|kind| backends.contains(kind))
                        .ok_or_else(|| ConfigError::Invalid {
                            name: "BATCH_BACKEND",
                            reason: format!("{name:?} is not one of BACKENDS"),
                        })?,
                ),
                None => backends
                    .contains(&BackendKind::Pod)
                    .then_some(BackendKind::Pod),
            },
            batch_max_in_flight: parsed(env, "BATCH_MAX_IN_FLIGHT", 4)?,
            tenant_limits: crate::domain::tenant::TenantLimits {
                max_in_flight: parsed(env, "TENANT_MAX_IN_FLIGHT", 10)?,
                submits_per_minute: parsed(env, "TENANT_SUBMITS_PER_MINUTE", 600)?,
                submit_burst: parsed(env, "TENANT_SUBMIT_BURST", 100)?,
            },
            backends,
            default_backend,
        };
        if !(1..=64).contains(&settings.batch_max_in_flight) {
            return Err(ConfigError::Invalid {
                name: "BATCH_MAX_IN_FLIGHT",
                reason: "must be between 1 and 64".into(),
            });
        }
        if settings.tenant_limits.submits_per_minute > 0 && settings.tenant_limits.submit_burst == 0
        {
            return Err(ConfigError::Invalid {
                name: "TENANT_SUBMIT_BURST",
                reason: "must be at least 1 while TENANT_SUBMITS_PER_MINUTE is set".into(),
            });
        }
        if !(settings.retention_min..=settings.retention_max).contains(&settings.record_retention) {
            return Err(ConfigError::Invalid {
                name: "JOB_RETENTION_DAYS",
                reason: "must lie between JOB_RETENTION_MIN_SECS and JOB_RETENTION_MAX_DAYS".into(),
            });
        }
        if settings.status_poll_after >= Duration::from_secs(25 * 60)
            || settings.poll_interval >= Duration::from_secs(25 * 60)
        {
            return Err(ConfigError::Invalid {
                name: "STATUS_POLL_INTERVAL_SECS",
                reason: "must stay well under RunPod's 30-minute result retention".into(),
            });
        }
        Ok(settings)
    }
}

/// `GPU_PRICE_USD_PER_SECOND` in nano-USD: a decimal number of dollars, at most $1 a second
/// (RunPod's dearest GPUs cost a fraction of a cent), with no more than nine decimals.
fn gpu_price(env: &Env) -> Result<Option<u64>, ConfigError> {
    let Some(raw) = env.get("GPU_PRICE_USD_PER_SECOND") else {
        return Ok(None);
    };
    let invalid = |reason: &str| ConfigError::Invalid {
        name: "GPU_PRICE_USD_PER_SECOND",
        reason: reason.to_string(),
    };
    let raw = raw.trim();
    let (units, decimals) = raw.split_once('.').unwrap_or((raw, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if units.is_empty() && decimals.is_empty() || !digits(units) || !digits(decimals) {
        return Err(invalid(
            "expected a decimal number of US dollars, such as 0.00031",
        ));
    }
    if decimals.len() > 9 {
        return Err(invalid("at most nine decimals (a nano-dollar)"));
    }
    let units: u64 = if units.is_empty() {
        0
    } else {
        units.parse().map_err(|_| invalid("too large"))?
    };
    let nanos: u64 = format!("{decimals:0<9}")
        .parse()
        .map_err(|_| invalid("not a number"))?;
    let price = units
        .checked_mul(1_000_000_000)
        .and_then(|u| u.checked_add(nanos))
        .filter(|p| *p <= 1_000_000_000)
        .ok_or_else(|| invalid("at most 1 US dollar a second"))?;
    Ok(Some(price))
}

impl Default for Settings {
    /// The settings of an environment that sets none of the variables: each default is
    /// written once, in [`Settings::from_env`].
    fn default() -> Self {
        Self::from_env(&Env::from_pairs(std::iter::empty::<(String, String)>()))
            .expect("the defaults are valid")
    }
}

// Names of the AWS resources; endpoints and credentials come from the SDK's own environment
// (`AWS_REGION`, `AWS_ENDPOINT_URL`, …). Each function reads only those it uses.

/// The jobs table (`JOBS_TABLE`).
pub fn jobs_table(env: &Env) -> Result<String, ConfigError> {
    env.required("JOBS_TABLE")
}

/// The dispatch queue (`JOBS_QUEUE_URL`).
pub fn queue_url(env: &Env) -> Result<String, ConfigError> {
    env.required("JOBS_QUEUE_URL")
}

/// The bucket for input images (`UPLOADS_BUCKET`).
pub fn uploads_bucket(env: &Env) -> Result<String, ConfigError> {
    env.required("UPLOADS_BUCKET")
}

/// The bucket for outputs (`RESULTS_BUCKET`).
pub fn results_bucket(env: &Env) -> Result<String, ConfigError> {
    env.required("RESULTS_BUCKET")
}

/// Path-style S3 addressing (`S3_FORCE_PATH_STYLE`), needed for local S3 servers such as moto.
pub fn s3_force_path_style(env: &Env) -> Result<bool, ConfigError> {
    flag(env, "S3_FORCE_PATH_STYLE", false)
}

/// The stop queue (`STOP_QUEUE_URL`): runs to stop at RunPod, for the stopper.
pub fn stop_queue_url(env: &Env) -> Result<String, ConfigError> {
    env.required("STOP_QUEUE_URL")
}

/// The finalize queue (`FINALIZE_QUEUE_URL`): handed-off jobs, for the finalize function.
pub fn finalize_queue_url(env: &Env) -> Result<String, ConfigError> {
    env.required("FINALIZE_QUEUE_URL")
}

/// The poll queue (`POLL_QUEUE_URL`): single checks of jobs on a backend that is polled (the
/// pod), for the sweeper function, every `POD_POLL_SECS`.
pub fn poll_queue_url(env: &Env) -> Result<String, ConfigError> {
    env.required("POLL_QUEUE_URL")
}

/// The callback queue (`CALLBACK_QUEUE_URL`): events to tell clients, and delivery attempts.
/// Every function that may end a job or start it running asks for its callbacks there.
pub fn callback_queue_url(env: &Env) -> Result<String, ConfigError> {
    env.required("CALLBACK_QUEUE_URL")
}

/// The KMS key the owners' signing secrets are encrypted with (`CALLBACK_KEY_ID`: a key id,
/// ARN or alias).
pub fn callback_key_id(env: &Env) -> Result<String, ConfigError> {
    env.required("CALLBACK_KEY_ID")
}

/// A Secrets Manager secret: a JSON object of some of the gateway's secret variables, laid over
/// the environment at start-up. One secret per kind of credential, so that each function's
/// role can be allowed exactly the ones it uses.
#[derive(Debug, PartialEq, Eq)]
pub struct SecretSource {
    /// The variable holding the secret's ARN; unset for a function that needs none of it.
    pub arn_var: &'static str,
    /// The only keys the secret may hold: a typo is refused rather than leaving a real secret
    /// unused, and a stray setting cannot hide in a secret.
    pub keys: &'static [&'static str],
}

pub const SECRET_SOURCES: &[SecretSource] = &[
    SecretSource {
        arn_var: "RUNPOD_SECRET_ARN",
        keys: &["RUNPOD_API_KEY"],
    },
    SecretSource {
        arn_var: "VOLUME_SECRET_ARN",
        keys: &["VOLUME_ACCESS_KEY_ID", "VOLUME_SECRET_ACCESS_KEY"],
    },
    SecretSource {
        arn_var: "WEBHOOK_SECRET_ARN",
        keys: &["WEBHOOK_SECRET", "WEBHOOK_SECRET_PREVIOUS"],
    },
    SecretSource {
        arn_var: "POD_SECRET_ARN",
        keys: &["POD_COMFYUI_TOKEN"],
    },
];

/// The secrets this function is told to read, with their ARNs; none locally.
pub fn secrets_to_read(env: &Env) -> Vec<(&'static SecretSource, String)> {
    SECRET_SOURCES
        .iter()
        .filter_map(|source| env.get(source.arn_var).map(|arn| (source, arn)))
        .collect()
}

/// Structured logging: JSON lines unless `GATEWAY_LOG_FORMAT=text`; the level filter from
/// `RUST_LOG` (tracing's filter syntax), `info` by default.
#[derive(Clone, Debug, PartialEq)]
pub struct LogConfig {
    pub json: bool,
    pub filter: String,
    /// The CloudWatch namespace of the metric lines (`METRICS_NAMESPACE`, `RunPodGateway`).
    pub metrics_namespace: String,
    /// Their one dimension, `Service` (`METRICS_SERVICE`, `runpod-gateway`; the template sets
    /// the stack's name, so that two stacks' metrics stay apart).
    pub metrics_service: String,
    /// The function, a property of each metric line: Lambda's `AWS_LAMBDA_FUNCTION_NAME`.
    pub function: String,
}

impl LogConfig {
    pub fn from_env(env: &Env) -> Self {
        Self {
            json: env.get("GATEWAY_LOG_FORMAT").as_deref() != Some("text"),
            filter: env.get("RUST_LOG").unwrap_or_else(|| "info".into()),
            metrics_namespace: env
                .get("METRICS_NAMESPACE")
                .unwrap_or_else(|| "RunPodGateway".into()),
            metrics_service: env
                .get("METRICS_SERVICE")
                .unwrap_or_else(|| "runpod-gateway".into()),
            function: env
                .get("AWS_LAMBDA_FUNCTION_NAME")
                .unwrap_or_else(|| "local".into()),
        }
    }
}

/// A ComfyUI server, the pod backend: read only by the functions that talk to it (dispatch,
/// finalize, the sweeper and the stopper).
#[derive(Clone)]
pub struct PodConfig {
    /// The server's base URL (`POD_COMFYUI_URL`): on a RunPod pod, its proxy URL
    /// `https://{pod_id}-8188.proxy.runpod.net`. Required once `BACKENDS` names `pod`.
    pub url: Option<String>,
    /// Sent as `Authorization: Bearer …` when set (`POD_COMFYUI_TOKEN`, a secret): ComfyUI has
    /// no authentication of its own, so a reverse proxy on the pod checks it.
    pub token: Option<String>,
    /// One request's limit (`POD_REQUEST_TIMEOUT_SECS`); RunPod's proxy cuts at 100 s.
    pub request_timeout: Duration,
    /// How often a pod job is checked (`POD_POLL_SECS`).
    pub poll_every: Duration,
    /// Where ComfyUI's folders are on the RunPod volume (`POD_VOLUME_COMFYUI_ROOT`; empty: not
    /// on the volume, nothing cleaned there).
    pub volume_comfyui_root: Option<String>,
}

impl PodConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let request_timeout = seconds(env, "POD_REQUEST_TIMEOUT_SECS", 30)?;
        if request_timeout >= Duration::from_secs(90) || request_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                name: "POD_REQUEST_TIMEOUT_SECS",
                reason: "must be between 1 and 89 s: RunPod's proxy cuts requests at 100 s".into(),
            });
        }
        let poll_every = seconds(env, "POD_POLL_SECS", 10)?;
        if poll_every.is_zero() || poll_every > Duration::from_secs(15 * 60) {
            return Err(ConfigError::Invalid {
                name: "POD_POLL_SECS",
                reason: "must be between 1 s and 15 minutes (SQS's longest delay)".into(),
            });
        }
        Ok(Self {
            url: env.get("POD_COMFYUI_URL").filter(|url| !url.is_empty()),
            token: env.get("POD_COMFYUI_TOKEN").filter(|t| !t.is_empty()),
            request_timeout,
            poll_every,
            volume_comfyui_root: pod_volume_comfyui_root(env),
        })
    }
}

/// Where the pod's ComfyUI folders are on the RunPod volume (`POD_VOLUME_COMFYUI_ROOT`,
/// `ComfyUI`; empty: not on the volume). The janitor reads it alone.
pub fn pod_volume_comfyui_root(env: &Env) -> Option<String> {
    match env.get("POD_VOLUME_COMFYUI_ROOT") {
        None => Some("ComfyUI".into()),
        Some(root) if root.trim_matches('/').is_empty() => None,
        Some(root) => Some(root.trim_matches('/').to_string()),
    }
}

/// The RunPod serverless endpoint.
#[derive(Clone)]
pub struct RunPodConfig {
    pub api_base: String,
    pub endpoint_id: String,
    pub api_key: String,
    pub request_timeout: Duration,
    /// How one RunPod call is retried within an invocation (README, "Retries and error codes").
    pub retry: RetryPolicy,
    /// `/cancel` calls a process starts per second at most (RunPod allows 100 per 10 s per
    /// endpoint). Only the stop queue's consumer cancels, so this times the consumers the
    /// queue's event source runs at once is the gateway's whole rate.
    pub cancels_per_second: u32,
}

impl RunPodConfig {
    pub const DEFAULT_CANCELS_PER_SEC: u32 = 5;
}

/// First and longest wait between two attempts of one RunPod call.
pub const RUNPOD_RETRY_BACKOFF: Backoff = Backoff {
    base: Duration::from_millis(250),
    cap: Duration::from_secs(2),
};

impl std::fmt::Debug for RunPodConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunPodConfig")
            .field("api_base", &self.api_base)
            .field("endpoint_id", &self.endpoint_id)
            .field("api_key", &"<redacted>")
            .finish()
    }
}

impl RunPodConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            api_base: env
                .get("RUNPOD_API_BASE")
                .unwrap_or_else(|| "https://api.runpod.ai".into())
                .trim_end_matches('/')
                .to_string(),
            endpoint_id: env.required("RUNPOD_ENDPOINT_ID")?,
            api_key: env.required("RUNPOD_API_KEY")?,
            request_timeout: seconds(env, "RUNPOD_REQUEST_TIMEOUT_SECS", 10)?,
            retry: RetryPolicy {
                max_attempts: parsed(env, "RUNPOD_RETRY_ATTEMPTS", 3u32)?.max(1),
                backoff: RUNPOD_RETRY_BACKOFF,
                // Under the shortest function timeout that calls RunPod (submit, 20 s).
                budget: seconds(env, "RUNPOD_RETRY_BUDGET_SECS", 15)?,
            },
            cancels_per_second: parsed(
                env,
                "RUNPOD_CANCELS_PER_SEC",
                Self::DEFAULT_CANCELS_PER_SEC,
            )?
            .max(1),
        })
    }
}

/// The RunPod network volume's S3-compatible API.
#[derive(Clone)]
pub struct VolumeConfig {
    pub volume_id: String,
    pub region: String,
    pub endpoint: String,
    pub access_key_id: String,
    pub secret_access_key: String,
    pub mount_prefixes: Vec<String>,
    /// This deployment's folder on the volume (`VOLUME_ROOT`): every file it writes there lies
    /// under it, and the janitor removes nothing outside it. Required, and different for each
    /// stack sharing a volume: a shared root would let one stack's janitor take another's
    /// files for orphans.
    pub root: VolumeRoot,
}

impl std::fmt::Debug for VolumeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeConfig")
            .field("volume_id", &self.volume_id)
            .field("region", &self.region)
            .field("endpoint", &self.endpoint)
            .field("root", &self.root)
            .field("access_key_id", &"<redacted>")
            .finish()
    }
}

impl VolumeConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        // RunPod names datacenters in upper case; the S3 host and signing region want lower.
        let region = env.required("VOLUME_DATACENTER")?.to_ascii_lowercase();
        Ok(Self {
            volume_id: env.required("VOLUME_ID")?,
            endpoint: env
                .get("VOLUME_S3_ENDPOINT")
                .unwrap_or_else(|| format!("https://s3api-{region}.runpod.io")),
            region,
            access_key_id: env.required("VOLUME_ACCESS_KEY_ID")?,
            secret_access_key: env.required("VOLUME_SECRET_ACCESS_KEY")?,
            mount_prefixes: env
                .get("VOLUME_MOUNT_PREFIXES")
                .unwrap_or_else(|| "/runpod-volume,/workspace".into())
                .split(',')
                .map(|p| p.trim().to_string())
                .filter(|p| !p.is_empty())
                .collect(),
            root: VolumeRoot::new(&env.required("VOLUME_ROOT")?).map_err(|e| {
                ConfigError::Invalid {
                    name: "VOLUME_ROOT",
                    reason: e.to_string(),
                }
            })?,
        })
    }
}

/// The janitor's rules (`JANITOR_*`): what it may remove from the volume, and how much it does
/// per run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JanitorSettings {
    /// A job's volume folders go once the job ended at least this long ago; a folder whose job
    /// is unknown, once its id is this old (`JANITOR_MIN_AGE_SECS`, at least an hour, so that
    /// no finalize can still be copying).
    pub min_age: Duration,
    /// Most job folders one run looks at (`JANITOR_MAX_FOLDERS`); the rest wait for the next.
    pub max_folders: usize,
    /// Abort multipart uploads under the root left unfinished (`JANITOR_ABORT_UPLOADS`). A
    /// switch: whether RunPod's volume lists them as AWS does is UNCONFIRMED.
    pub abort_uploads: bool,
    /// How old an unfinished upload must be to be aborted (`JANITOR_ABORT_UPLOADS_AFTER_SECS`).
    pub abort_uploads_after: Duration,
}

/// The shortest `JANITOR_MIN_AGE_SECS`: longer than any finalize attempt (15 minutes at most,
/// its lease a little more), with room to spare.
pub const JANITOR_MIN_AGE_FLOOR: Duration = Duration::from_secs(3_600);

impl JanitorSettings {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let settings = Self {
            min_age: seconds(env, "JANITOR_MIN_AGE_SECS", 6 * 3_600)?,
            max_folders: parsed(env, "JANITOR_MAX_FOLDERS", 2_000)?,
            abort_uploads: flag(env, "JANITOR_ABORT_UPLOADS", true)?,
            abort_uploads_after: seconds(env, "JANITOR_ABORT_UPLOADS_AFTER_SECS", 86_400)?,
        };
        if settings.min_age < JANITOR_MIN_AGE_FLOOR {
            return Err(ConfigError::Invalid {
                name: "JANITOR_MIN_AGE_SECS",
                reason: format!(
                    "must be at least {} s: a finalize may still be copying before that",
                    JANITOR_MIN_AGE_FLOOR.as_secs()
                ),
            });
        }
        if settings.abort_uploads_after < JANITOR_MIN_AGE_FLOOR {
            return Err(ConfigError::Invalid {
                name: "JANITOR_ABORT_UPLOADS_AFTER_SECS",
                reason: format!(
                    "must be at least {} s: an upload in progress must not be cut short",
                    JANITOR_MIN_AGE_FLOOR.as_secs()
                ),
            });
        }
        Ok(settings)
    }
}

impl Default for JanitorSettings {
    fn default() -> Self {
        Self::from_env(&Env::from_pairs(std::iter::empty::<(String, String)>()))
            .expect("the defaults are valid")
    }
}

/// Where RunPod should send webhooks: the gateway's public base URL (dispatch only).
pub fn webhook_base_url(env: &Env) -> Result<String, ConfigError> {
    Ok(env
        .required("WEBHOOK_BASE_URL")?
        .trim_end_matches('/')
        .to_string())
}

/// The keys of per-job webhook tokens.
#[derive(Clone)]
pub struct WebhookSecrets {
    pub secret: String,
    /// The secret before the last rotation, still accepted for jobs in flight.
    pub previous_secret: Option<String>,
}

impl WebhookSecrets {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let secret = env.required("WEBHOOK_SECRET")?;
        if secret.len() < 16 {
            return Err(ConfigError::Invalid {
                name: "WEBHOOK_SECRET",
                reason: "must be at least 16 characters".into(),
            });
        }
        Ok(Self {
            secret,
            previous_secret: env.get("WEBHOOK_SECRET_PREVIOUS"),
        })
    }
}

/// The template's defaults for the dispatch event source (`DispatchMaxConcurrency`,
/// `DispatchBatchSize`), which the local runner copies; the deployment contract test holds
/// them equal.
pub const TEMPLATE_DISPATCH_CONCURRENCY: usize = 5;
pub const TEMPLATE_DISPATCH_BATCH_SIZE: u8 = 5;

/// The local runner's own variables; the Lambda functions never read them.
#[derive(Clone, Debug)]
pub struct LocalRunnerConfig {
    /// `GATEWAY_LISTEN`: where the API and the webhook route listen.
    pub listen: SocketAddr,
    /// `SWEEP_EVERY_SECS`: the sweeper's tick (in AWS, the schedule's `rate(1 minute)`).
    pub sweep_every: Duration,
    /// `JANITOR_EVERY_SECS`: the janitor's tick (in AWS, the schedule's `rate(30 minutes)`).
    pub janitor_every: Duration,
    /// `LOCAL_QUEUE_VISIBILITY_SECS`: how soon a failed dispatch comes back.
    pub queue_visibility_secs: u32,
    /// `LOCAL_CREATE_RESOURCES`: create the table, queue and buckets in moto at start.
    pub create_resources: bool,
    /// `LOCAL_DISPATCH_CONCURRENCY`: dispatch batches in flight at once, like the event source
    /// mapping's `ScalingConfig.MaximumConcurrency`.
    pub dispatch_concurrency: usize,
    /// `LOCAL_DISPATCH_BATCH_SIZE`: messages per dispatch batch (SQS allows 1 to 10).
    pub dispatch_batch_size: u8,
}

impl LocalRunnerConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        Ok(Self {
            listen: parsed(
                env,
                "GATEWAY_LISTEN",
                SocketAddr::from(([127, 0, 0, 1], 3000)),
            )?,
            sweep_every: seconds(env, "SWEEP_EVERY_SECS", 60)?,
            janitor_every: seconds(env, "JANITOR_EVERY_SECS", 1_800)?,
            queue_visibility_secs: parsed(env, "LOCAL_QUEUE_VISIBILITY_SECS", 30)?,
            create_resources: flag(env, "LOCAL_CREATE_RESOURCES", true)?,
            dispatch_concurrency: parsed(
                env,
                "LOCAL_DISPATCH_CONCURRENCY",
                TEMPLATE_DISPATCH_CONCURRENCY,
            )?,
            dispatch_batch_size: parsed(
                env,
                "LOCAL_DISPATCH_BATCH_SIZE",
                TEMPLATE_DISPATCH_BATCH_SIZE,
            )?,
        })
    }
}

impl Default for LocalRunnerConfig {
    fn default() -> Self {
        Self::from_env(&Env::from_pairs(std::iter::empty::<(String, String)>()))
            .expect("the defaults are valid")
    }
}

/// The local runner's bearer tokens (`GATEWAY_DEV_TOKENS`, `token=owner` pairs separated by
/// commas), standing in for the JWT authorizer; in AWS it names the caller.
pub fn dev_tokens(env: &Env) -> String {
    env.get("GATEWAY_DEV_TOKENS")
        .unwrap_or_else(|| "dev-token=dev".into())
}

#[cfg(test)]
mod default_tests {
    use super::*;

    #[test]
    fn the_defaults_are_those_of_an_empty_environment() {
        let settings = Settings::default();
        assert_eq!(settings.execution_timeout, Duration::from_secs(600));
        assert_eq!(settings.finalize_lease, Duration::from_secs(120));
        assert_eq!(settings.record_retention, Duration::from_secs(30 * 86_400));
        assert_eq!(settings.max_output_image_bytes, 50 * 1024 * 1024);
        assert_eq!(settings.max_output_file_bytes, 1024 * 1024 * 1024);
        assert_eq!(settings.max_output_job_bytes, 2 * 1024 * 1024 * 1024);
        assert_eq!(settings.gpu_price_nano_usd, None);
    }

    fn price(raw: &str) -> Result<Option<u64>, ConfigError> {
        gpu_price(&Env::from_pairs([("GPU_PRICE_USD_PER_SECOND", raw)]))
    }

    #[test]
    fn a_gpu_price_is_read_exactly_in_nano_dollars() {
        assert_eq!(price("0.00031").unwrap(), Some(310_000));
        assert_eq!(price(".5").unwrap(), Some(500_000_000));
        assert_eq!(price("1").unwrap(), Some(1_000_000_000));
        assert_eq!(price("0").unwrap(), Some(0));
        assert_eq!(price("0.000000001").unwrap(), Some(1));
    }

    #[test]
    fn a_gpu_price_that_is_no_plain_small_number_is_refused() {
        for bad in [".", "abc", "-0.1", "1e-4", "0.0000000001", "1.5", "0,5"] {
            assert!(price(bad).is_err(), "{bad:?}");
        }
    }
}
