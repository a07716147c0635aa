//! A local stand-in for one RunPod serverless endpoint and its network volume.
//!
//! [`spawn`] starts, in-process:
//! - the endpoint API (`/v2/{endpoint_id}/run`, `runsync`, `status`, `cancel`, `retry`,
//!   `purge-queue`, `health`) with RunPod's auth, policy limits, result retention and TTL;
//! - webhooks in RunPod's shape with its retry policy;
//! - the volume's S3-compatible API over a local directory (s3s + s3s-fs, SigV4);
//! - a built-in worker that runs the restore workflow's image nodes on real files, scaled like
//!   RunPod's workers (min/max workers, idle timeout, low-priority jobs starting none), and the
//!   worker protocol (`job-take`, `job-done`, `job-stop`, `ping`) for a real `runpod` SDK worker;
//! - test controls: [`Emulator`] methods, mirrored under `/_emulator/…` on the API port.
//!
//! Facts and their sources: `docs/runpod-platform.md`. Behaviour the reference marks
//! UNCONFIRMED is switchable through [`Faults`] or [`EmulatorConfig`].

mod admin;
mod api;
mod chaos;
pub mod comfy;
mod config;
mod faults;
mod jobs;
mod volume;
mod webhook;
mod worker;
mod worker_api;

use axum::serve::ListenerExt as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use chaos::{FaultKind, InjectedFault, Removal};
pub use config::{ChaosConfig, EmulatorConfig, Faults};
pub use jobs::{JobSnapshot, JobStatus, WorkerCounts};
pub use volume::StagedUpload;
pub use webhook::WebhookAttempt;
pub use worker_api::WorkerCall;

use faults::FaultState;
use jobs::Store;
use volume::VolumeRoot;
use webhook::WebhookDispatcher;

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("volume S3 API: {0}")]
    Volume(String),
    #[error("HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// State shared by the HTTP handlers.
#[derive(Debug)]
pub(crate) struct App {
    config: Arc<EmulatorConfig>,
    store: Arc<Store>,
    faults: Arc<FaultState>,
    hooks: Arc<WebhookDispatcher>,
    /// What external workers asked and were told.
    worker_log: worker_api::WorkerLog,
    /// Ends long-polls when the emulator stops.
    shutdown: watch::Receiver<bool>,
}

/// A running emulator. Dropping it stops the servers and workers (without waiting);
/// [`Emulator::shutdown`] also waits for them.
#[derive(Debug)]
pub struct Emulator {
    /// Base URL of the endpoint API, e.g. `http://127.0.0.1:8090`; routes are under
    /// `{api_url}/v2/{endpoint_id}/…` and `{api_url}/_emulator/…`.
    pub api_url: String,
    /// Endpoint URL of the volume S3 API (path-style), e.g. `http://127.0.0.1:8091`.
    pub s3_url: String,
    pub endpoint_id: String,
    pub api_key: String,
    /// The S3 bucket name of the volume.
    pub volume_id: String,
    /// The volume root, canonicalised; the same files the S3 API serves.
    pub volume_dir: PathBuf,
    pub volume_access_key: String,
    pub volume_secret_key: String,
    pub mount_prefix: String,
    app: Arc<App>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    volume_root: VolumeRoot,
}

impl Emulator {
    /// `{api_url}/v2/{endpoint_id}`: the base a RunPod client appends `/run`, `/status/{id}`… to.
    pub fn endpoint_url(&self) -> String {
        format!("{}/v2/{}", self.api_url, self.endpoint_id)
    }

    /// Replaces the whole fault set (and restarts the `run_fail_count` count).
    pub fn set_faults(&self, faults: Faults) {
        self.app.faults.set(faults);
    }

    pub fn faults(&self) -> Faults {
        self.app.faults.get()
    }

    /// Every webhook attempt so far, oldest first.
    pub fn webhook_log(&self) -> Vec<WebhookAttempt> {
        self.app.hooks.log()
    }

    /// Sends the job's last webhook once more (a duplicate delivery) and returns that attempt;
    /// `None` if no webhook was ever due for the job. Works even while `webhooks_enabled` is
    /// off, so a test can make a suppressed webhook arrive late.
    pub async fn redeliver_webhook(&self, job_id: &str) -> Option<WebhookAttempt> {
        self.app.hooks.redeliver(job_id).await
    }

    /// Every fault the chaos configuration injected so far, oldest first.
    pub fn injected_faults(&self) -> Vec<InjectedFault> {
        self.app.faults.chaos.log()
    }

    /// The bytes the built-in worker wrote at volume key `key` (`outputs/<job>/…`), whether or
    /// not the file is still on the volume.
    pub fn worker_wrote(&self, key: &str) -> Option<Vec<u8>> {
        self.app.store.written(key)
    }

    /// How many faults of each kind the chaos configuration injected so far.
    pub fn fault_counts(&self) -> std::collections::BTreeMap<FaultKind, u64> {
        self.app.faults.chaos.counts()
    }

    /// The job as it ended (COMPLETED, FAILED, TIMED_OUT, CANCELLED), kept after RunPod removed
    /// it. Recorded while a chaos configuration is set.
    pub fn ended_job(&self, id: &str) -> Option<JobSnapshot> {
        self.app.faults.chaos.ended_job(id)
    }

    /// When the job first reached a terminal status (Unix ms), recorded like [`Self::ended_job`].
    pub fn ended_at_ms(&self, id: &str) -> Option<u64> {
        self.app.faults.chaos.ended_at(id)
    }

    /// Every job `/run` accepted (id, webhook URL), oldest first. Recorded while a chaos
    /// configuration is set.
    pub fn accepted_jobs(&self) -> Vec<(String, Option<String>)> {
        self.app.faults.chaos.accepted_jobs()
    }

    /// Why a job stopped existing, if it did. Recorded while a chaos configuration is set.
    pub fn removal(&self, id: &str) -> Option<Removal> {
        self.app.faults.chaos.removal(id)
    }

    /// Multipart uploads begun on the volume and neither completed nor aborted, by key: what
    /// ListMultipartUploads answers, with the bytes each holds on the volume.
    pub fn staged_uploads(&self) -> Vec<StagedUpload> {
        volume::staged_uploads(&self.volume_dir)
    }

    /// Bytes the multipart uploads in progress hold on the volume, in its hidden
    /// `.s3compat_uploads/` folder: capacity an upload never completed nor aborted keeps using.
    pub fn staged_upload_bytes(&self) -> u64 {
        volume::staged_upload_bytes(&self.volume_dir)
    }

    /// Bytes of every file on the volume, staged multipart parts included.
    pub fn volume_bytes(&self) -> u64 {
        volume::volume_bytes(&self.volume_dir)
    }

    /// Every answered call of an external (SDK) worker so far, oldest first: job-take,
    /// job-done, progress, job-stop, ping.
    pub fn worker_calls(&self) -> Vec<WorkerCall> {
        self.app.worker_log.calls()
    }

    /// The built-in worker's workers now: up (idle, running), the most ever up, and the bounds.
    pub fn workers(&self) -> WorkerCounts {
        self.app.store.workers()
    }

    /// The job as the platform sees it now; `None` once it is unknown, expired or purged.
    pub fn job(&self, id: &str) -> Option<JobSnapshot> {
        self.app.store.get(id)
    }

    /// Records a job that COMPLETED elsewhere with `output`, under `id`, so `/status/{id}`
    /// answers it: the RunPod state a test starts from.
    pub fn insert_completed(&self, id: &str, output: serde_json::Value) -> JobSnapshot {
        self.app.store.insert_completed(id, output)
    }

    /// Every job still held (queued, running, or terminal within retention).
    pub fn jobs(&self) -> Vec<JobSnapshot> {
        self.app.store.all()
    }

    /// Stops servers, workers and pending webhook retries, and waits (up to a few seconds) for
    /// them to end.
    pub async fn shutdown(self) {
        self.shutdown_tx.send_replace(true);
        let tasks = std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
        );
        for task in tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(Duration::from_secs(3), task)
                .await
                .is_err()
            {
                abort.abort();
            }
        }
        // Drop removes the s3s-fs root.
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.shutdown_tx.send_replace(true);
        self.volume_root.remove();
    }
}

/// Starts the emulator: the endpoint API on `api_addr`, the volume S3 API on `s3_addr` (port 0
/// picks a free port; read the real URLs from the returned [`Emulator`]).
pub async fn spawn(
    config: EmulatorConfig,
    api_addr: SocketAddr,
    s3_addr: SocketAddr,
) -> Result<Emulator, EmulatorError> {
    if config.builtin_worker {
        let (min, max) = config.worker_bounds();
        if max == 0 {
            return Err(EmulatorError::Config(
                "workers_max (or worker_concurrency) must be at least 1 with the built-in worker"
                    .to_owned(),
            ));
        }
        if min > max {
            return Err(EmulatorError::Config(format!(
                "workers_min ({min}) must not exceed workers_max ({max})"
            )));
        }
    }
    if config.api_key.is_empty() {
        return Err(EmulatorError::Config(
            "api_key must not be empty".to_owned(),
        ));
    }
    let volume_root = VolumeRoot::prepare(&config)?;
    let result = start(config, api_addr, s3_addr, &volume_root).await;
    match result {
        Ok(parts) => Ok(parts.into_emulator(volume_root)),
        Err(err) => {
            volume_root.remove();
            Err(err)
        }
    }
}

struct Started {
    config: Arc<EmulatorConfig>,
    api_url: String,
    s3_url: String,
    volume_dir: PathBuf,
    app: Arc<App>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Started {
    fn into_emulator(self, volume_root: VolumeRoot) -> Emulator {
        Emulator {
            api_url: self.api_url,
            s3_url: self.s3_url,
            endpoint_id: self.config.endpoint_id.clone(),
            api_key: self.config.api_key.clone(),
            volume_id: self.config.volume_id.clone(),
            volume_dir: self.volume_dir,
            volume_access_key: self.config.volume_access_key.clone(),
            volume_secret_key: self.config.volume_secret_key.clone(),
            mount_prefix: self.config.mount_prefix.clone(),
            app: self.app,
            shutdown_tx: self.shutdown_tx,
            tasks: Mutex::new(self.tasks),
            volume_root,
        }
    }
}

async fn start(
    mut config: EmulatorConfig,
    api_addr: SocketAddr,
    s3_addr: SocketAddr,
    volume_root: &VolumeRoot,
) -> Result<Started, EmulatorError> {
    config.volume_dir = volume_root.volume_dir.clone();
    let config = Arc::new(config);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let s3_service = volume::service(&config, volume_root)?;
    let api_listener = TcpListener::bind(api_addr).await?;
    let s3_listener = TcpListener::bind(s3_addr).await?;
    let api_url = format!(
        "http://{}",
        loopback_if_unspecified(api_listener.local_addr()?)
    );
    let s3_url = format!(
        "http://{}",
        loopback_if_unspecified(s3_listener.local_addr()?)
    );

    let faults = Arc::new(FaultState::new(config.faults.clone()));
    let hooks = Arc::new(WebhookDispatcher::new(
        config.webhook_timeout,
        config.webhook_attempts,
        config.webhook_retry_delay,
        faults.clone(),
        shutdown_rx.clone(),
    )?);
    let store = Arc::new(Store::new(config.clone(), faults.clone(), hooks.clone()));
    let app = Arc::new(App {
        config: config.clone(),
        store: store.clone(),
        faults: faults.clone(),
        hooks,
        worker_log: worker_api::WorkerLog::default(),
        shutdown: shutdown_rx.clone(),
    });

    let mut tasks = Vec::new();
    let api_router = api::router(app.clone())
        .merge(admin::router(app.clone()))
        .fallback(|| async { api::error(axum::http::StatusCode::NOT_FOUND, "not found") });
    tasks.push(serve(api_listener, api_router, shutdown_rx.clone()));
    tasks.push(serve(
        s3_listener,
        volume::router(s3_service, config.s3_reject_presigned, faults.clone()),
        shutdown_rx.clone(),
    ));
    tasks.push(tokio::spawn(deadlines(store.clone(), shutdown_rx.clone())));
    if config.builtin_worker {
        tasks.extend(worker::spawn(
            worker::WorkerContext {
                store,
                faults,
                volume_dir: config.volume_dir.clone(),
                mount_prefix: config.mount_prefix.clone(),
            },
            shutdown_rx,
        ));
    }
    tracing::info!(%api_url, %s3_url, endpoint_id = %config.endpoint_id, volume_id = %config.volume_id,
        volume_dir = %config.volume_dir.display(), "runpod emulator listening");
    Ok(Started {
        volume_dir: config.volume_dir.clone(),
        config,
        api_url,
        s3_url,
        app,
        shutdown_tx,
        tasks,
    })
}

fn loopback_if_unspecified(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

fn serve(
    listener: TcpListener,
    router: axum::Router,
    mut shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let result = axum::serve(listener.tap_io(no_delay), router)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(err) = result {
            tracing::error!(%err, "server stopped");
        }
    })
}

/// Applies executionTimeout, TTL and result retention as they fall due, so timeouts fire their
/// webhooks and stop workers even when nobody is polling.
async fn deadlines(store: Arc<Store>, mut shutdown: watch::Receiver<bool>) {
    let mut changes = store.subscribe();
    loop {
        changes.borrow_and_update();
        let next = store.tick();
        let sleep_until =
            next.unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(60));
        tokio::select! {
            () = tokio::time::sleep_until(sleep_until) => {}
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
            }
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// Small responses go out at once: with Nagle's algorithm on, a response's last short segment
/// waits for the client's delayed ACK (40 ms on Linux), which showed as a 40 ms stall in most
/// object copies through this server.
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
}
