//! A local stand-in for one ComfyUI server, as a pod runs it behind its reverse proxy.
//!
//! [`spawn`] serves ComfyUI's HTTP API (`/prompt`, `/queue`, `/history`, `/interrupt`, `/view`,
//! `/upload/image`, `/object_info`, `/system_stats`, optionally `/api/jobs/{id}`), every route
//! also under `/api`. Prompts run one at a time on a background task through the restore
//! workflow's image nodes (`runpod_emulator::comfy::run_graph`): real files in, real PNGs out.
//! Queue and history live in memory, outputs on disk, as in ComfyUI.
//!
//! Test controls: [`Faults`], set through [`ComfyEmulator`] methods or `/__admin/…` routes.
//! Facts and their sources: `docs/comfyui-api.md`.

mod admin;
mod api;
mod executor;
mod files;
mod nodes;
mod state;

use axum::serve::ListenerExt as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use state::State;

/// Why the emulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum ComfyError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// What the server is and how it behaves; [`ComfyConfig::new`] has ComfyUI's defaults.
#[derive(Debug, Clone)]
pub struct ComfyConfig {
    /// Where uploads land and LoadImage reads (`type=input`). Created if missing.
    pub input_dir: PathBuf,
    /// Where SaveImage writes (`type=output`). Created if missing.
    pub output_dir: PathBuf,
    /// `type=temp` for `/view` and uploads. Created if missing.
    pub temp_dir: PathBuf,
    /// The least time one prompt runs, so that tests can see it queued and running.
    pub min_run_time: Duration,
    /// History entries kept; the oldest go first (ComfyUI: 10,000).
    pub max_history: usize,
    /// Largest request body accepted, uploads included (ComfyUI: 100 MB); larger is 413.
    pub max_upload_bytes: usize,
    /// Serve `/api/jobs/{id}` (newer servers); off, the route is 404 like on older ones.
    pub jobs_api: bool,
    /// Require `Authorization: Bearer <token>`, as a pod's reverse proxy may. ComfyUI has none.
    pub bearer_token: Option<String>,
    /// Faults in force from the start.
    pub faults: Faults,
}

impl ComfyConfig {
    pub fn new(input_dir: impl Into<PathBuf>, output_dir: impl Into<PathBuf>) -> Self {
        let output_dir = output_dir.into();
        let temp_dir = output_dir
            .parent()
            .map_or_else(|| PathBuf::from("temp"), |p| p.join("temp"));
        Self {
            input_dir: input_dir.into(),
            output_dir,
            temp_dir,
            min_run_time: Duration::from_millis(50),
            max_history: 10_000,
            max_upload_bytes: 100 * 1024 * 1024,
            jobs_api: true,
            bearer_token: None,
            faults: Faults::default(),
        }
    }
}

/// Runtime misbehaviour, switchable while the server runs. The counts go down by one for each
/// prompt they hit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Nothing starts running; prompts pile up in the pending queue.
    pub stall_queue: bool,
    /// The next n prompts fail validation (400 `prompt_outputs_failed_validation`).
    pub fail_validation: u32,
    /// The next n prompts to run end with an `execution_error`.
    pub fail_execution: u32,
    /// `/view` answers 404 for every file.
    pub view_not_found: bool,
    /// Every answer (admin routes aside) waits this long first.
    pub delay_ms: u64,
    /// The server mints its own prompt id whatever the client sent, as older servers did.
    pub ignore_prompt_id: bool,
    /// Each run takes at least this long (a slow GPU); 0: the configured `min_run_time`.
    pub slow_run_ms: u64,
}

/// Partial update of [`Faults`]: only the fields present change.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultsPatch {
    pub stall_queue: Option<bool>,
    pub fail_validation: Option<u32>,
    pub fail_execution: Option<u32>,
    pub view_not_found: Option<bool>,
    pub delay_ms: Option<u64>,
    pub ignore_prompt_id: Option<bool>,
    pub slow_run_ms: Option<u64>,
}

impl Faults {
    pub fn apply(&mut self, patch: FaultsPatch) {
        let FaultsPatch {
            stall_queue,
            fail_validation,
            fail_execution,
            view_not_found,
            delay_ms,
            ignore_prompt_id,
            slow_run_ms,
        } = patch;
        if let Some(v) = stall_queue {
            self.stall_queue = v;
        }
        if let Some(v) = fail_validation {
            self.fail_validation = v;
        }
        if let Some(v) = fail_execution {
            self.fail_execution = v;
        }
        if let Some(v) = view_not_found {
            self.view_not_found = v;
        }
        if let Some(v) = delay_ms {
            self.delay_ms = v;
        }
        if let Some(v) = ignore_prompt_id {
            self.ignore_prompt_id = v;
        }
        if let Some(v) = slow_run_ms {
            self.slow_run_ms = v;
        }
    }
}

/// State shared by the handlers and the executor.
#[derive(Debug)]
pub(crate) struct App {
    config: ComfyConfig,
    state: Mutex<State>,
    /// Tells the executor that the queue or the stall switch changed.
    wake: Notify,
    /// Every prompt that ran to an end, and what it saved: the tests' record, which no restart
    /// clears (ComfyUI has none; it is not served over HTTP).
    ledger: Mutex<std::collections::HashMap<String, EndedPrompt>>,
}

/// A prompt that ran to an end, as the emulator's own record keeps it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndedPrompt {
    /// `completed`, `failed` or `cancelled`.
    pub outcome: &'static str,
    /// Each image it saved: `(subfolder, filename, bytes as written)`.
    pub files: Vec<(String, String, Vec<u8>)>,
    /// When it ended, epoch ms.
    pub ended_at_ms: u64,
}

impl App {
    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn ledger(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, EndedPrompt>> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn output_dir(&self) -> &std::path::Path {
        &self.config.output_dir
    }

    fn faults(&self) -> Faults {
        self.state().faults.clone()
    }

    fn update_faults(&self, change: impl FnOnce(&mut Faults)) {
        change(&mut self.state().faults);
        self.wake.notify_one();
    }

    /// What a server restart does to memory: queue, running prompt and history are gone.
    fn restart(&self) {
        self.state().restart();
        self.wake.notify_one();
    }
}

/// A running emulator. Dropping it stops the server and the executor.
#[derive(Debug)]
pub struct ComfyEmulator {
    /// Base URL without a path, e.g. `http://127.0.0.1:8188`.
    pub url: String,
    pub addr: SocketAddr,
    /// The configured directories, canonicalised.
    pub input_dir: PathBuf,
    pub output_dir: PathBuf,
    pub temp_dir: PathBuf,
    app: Arc<App>,
    shutdown_tx: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl ComfyEmulator {
    pub fn faults(&self) -> Faults {
        self.app.faults()
    }

    /// Replaces the whole fault set.
    pub fn set_faults(&self, faults: Faults) {
        self.app.update_faults(|f| *f = faults);
    }

    /// Nothing starts running while on; turning it off lets the queue run again.
    pub fn stall_queue(&self, on: bool) {
        self.app.update_faults(|f| f.stall_queue = on);
    }

    /// The next `count` prompts fail validation.
    pub fn fail_next_validations(&self, count: u32) {
        self.app.update_faults(|f| f.fail_validation = count);
    }

    /// The next `count` prompts to run end with an `execution_error`.
    pub fn fail_next_executions(&self, count: u32) {
        self.app.update_faults(|f| f.fail_execution = count);
    }

    /// `/view` answers 404 while on.
    pub fn view_not_found(&self, on: bool) {
        self.app.update_faults(|f| f.view_not_found = on);
    }

    /// Every answer waits `delay` first (zero: none).
    pub fn slow_answers(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.app.update_faults(|f| f.delay_ms = ms);
    }

    /// The server mints its own prompt ids while on.
    pub fn ignore_prompt_id(&self, on: bool) {
        self.app.update_faults(|f| f.ignore_prompt_id = on);
    }

    /// Each run starting from now takes at least `run_time` (zero: the configured minimum).
    pub fn slow_runs(&self, run_time: Duration) {
        let ms = u64::try_from(run_time.as_millis()).unwrap_or(u64::MAX);
        self.app.update_faults(|f| f.slow_run_ms = ms);
    }

    /// How `prompt_id` ended, if it ran to an end (a prompt a restart cut off did not).
    pub fn ended(&self, prompt_id: &str) -> Option<EndedPrompt> {
        self.app.ledger().get(prompt_id).cloned()
    }

    /// How many prompts are queued or running now.
    pub fn in_queue(&self) -> usize {
        let state = self.app.state();
        state.pending.len() + usize::from(state.running.is_some())
    }

    /// A server restart: queue, running prompt and history are lost (a prompt running now never
    /// gets a history entry); files on disk stay. Faults stay as set.
    pub fn restart(&self) {
        self.app.restart();
    }

    /// Stops the server and the executor and waits for them.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for task in tasks {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for ComfyEmulator {
    fn drop(&mut self) {
        let _ = self.shutdown_tx.send(true);
        for task in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            task.abort();
        }
    }
}

fn prepare_dir(dir: &Path, what: &str) -> Result<PathBuf, ComfyError> {
    if dir.as_os_str().is_empty() {
        return Err(ComfyError::Config(format!("{what} must not be empty")));
    }
    std::fs::create_dir_all(dir)?;
    Ok(dir.canonicalize()?)
}

/// Starts the server on `addr` (port 0 picks a free one: read [`ComfyEmulator::url`]).
pub async fn spawn(config: ComfyConfig, addr: SocketAddr) -> Result<ComfyEmulator, ComfyError> {
    if config.max_history == 0 {
        return Err(ComfyError::Config(
            "max_history must be at least 1".to_owned(),
        ));
    }
    let mut config = config;
    config.input_dir = prepare_dir(&config.input_dir, "input_dir")?;
    config.output_dir = prepare_dir(&config.output_dir, "output_dir")?;
    config.temp_dir = prepare_dir(&config.temp_dir, "temp_dir")?;

    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = Arc::new(App {
        state: Mutex::new(State::new(config.faults.clone())),
        config,
        wake: Notify::new(),
        ledger: Mutex::default(),
    });
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let router = api::router(app.clone()).merge(admin::router(app.clone()));
    let mut server_shutdown = shutdown_rx.clone();
    let server = tokio::spawn(async move {
        let result = axum::serve(listener.tap_io(no_delay), router)
            .with_graceful_shutdown(async move {
                let _ = server_shutdown.wait_for(|stop| *stop).await;
            })
            .await;
        if let Err(err) = result {
            tracing::error!(%err, "ComfyUI emulator server stopped");
        }
    });
    let executor = tokio::spawn(executor::run(app.clone(), shutdown_rx));
    Ok(ComfyEmulator {
        url: format!("http://{local}"),
        addr: local,
        input_dir: app.config.input_dir.clone(),
        output_dir: app.config.output_dir.clone(),
        temp_dir: app.config.temp_dir.clone(),
        app,
        shutdown_tx,
        tasks: Mutex::new(vec![server, executor]),
    })
}

/// Small responses go out at once: with Nagle's algorithm on, a response's last short segment
/// waits for the client's delayed ACK (40 ms on Linux), which showed as a 40 ms stall in most
/// object copies through this server.
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
}
