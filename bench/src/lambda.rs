//! Function binaries run as Lambda runs them: one process per instance, started with Lambda's
//! environment against a small Runtime API stub on loopback. The stub sees the instance's first
//! `GET /2018-06-01/runtime/invocation/next` (the end of init), hands it one event at a time and
//! times each to its `/response`: what Lambda bills as the invocation's duration.
//!
//! An instance may run under Lambda's CPU share for its memory size ([`CpuShare`]): after init,
//! which Lambda runs with a burst of CPU, the process moves into a cgroup whose CPU quota is
//! `memory / 1,769 MB` of one core (Lambda gives one vCPU at 1,769 MB).
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};

use crate::common::{die_with_parent, ms, proc_status_kb, BoxError};

/// Lambda's memory size at which a function has one full vCPU.
pub const MB_PER_VCPU: f64 = 1769.0;

struct Next {
    at: Instant,
    reply: oneshot::Sender<(String, Value)>,
}

struct Done {
    at: Instant,
    request_id: String,
    ok: bool,
    body: String,
}

#[derive(Clone)]
struct StubState {
    nexts: mpsc::UnboundedSender<Next>,
    done: mpsc::UnboundedSender<Done>,
}

/// The Runtime API stub: one per instance.
struct Stub {
    addr: std::net::SocketAddr,
    nexts: mpsc::UnboundedReceiver<Next>,
    done: mpsc::UnboundedReceiver<Done>,
    server: tokio::task::JoinHandle<()>,
}

async fn next(State(state): State<StubState>) -> Response {
    let at = Instant::now();
    let (reply, event) = oneshot::channel();
    if state.nexts.send(Next { at, reply }).is_err() {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let Ok((request_id, event)) = event.await else {
        // No more events for this instance: hold the long-poll, as Lambda does between events.
        std::future::pending::<()>().await;
        unreachable!()
    };
    let mut headers = HeaderMap::new();
    let deadline = (crate::common::now_ms() + 60_000).to_string();
    let pairs = [
        ("lambda-runtime-aws-request-id", request_id.clone()),
        ("lambda-runtime-deadline-ms", deadline),
        (
            "lambda-runtime-invoked-function-arn",
            "arn:aws:lambda:us-east-1:123456789012:function:bench".to_string(),
        ),
        (
            "lambda-runtime-trace-id",
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=0"
                .to_string(),
        ),
        ("content-type", "application/json".to_string()),
    ];
    for (name, value) in pairs {
        headers.insert(name, HeaderValue::from_str(&value).expect("header value"));
    }
    (StatusCode::OK, headers, event.to_string()).into_response()
}

async fn finished(state: &StubState, request_id: String, ok: bool, body: String) -> Response {
    let _ = state.done.send(Done {
        at: Instant::now(),
        request_id,
        ok,
        body,
    });
    (StatusCode::ACCEPTED, r#"{"status":"OK"}"#).into_response()
}

async fn response(
    State(state): State<StubState>,
    UrlPath(request_id): UrlPath<String>,
    body: String,
) -> Response {
    finished(&state, request_id, true, body).await
}

async fn error(
    State(state): State<StubState>,
    UrlPath(request_id): UrlPath<String>,
    body: String,
) -> Response {
    finished(&state, request_id, false, body).await
}

async fn init_error(State(state): State<StubState>, body: String) -> Response {
    finished(&state, "init".into(), false, body).await
}

impl Stub {
    async fn start() -> Result<Self, BoxError> {
        let (nexts_tx, nexts) = mpsc::unbounded_channel();
        let (done_tx, done) = mpsc::unbounded_channel();
        let state = StubState {
            nexts: nexts_tx,
            done: done_tx,
        };
        let app = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self {
            addr,
            nexts,
            done,
            server,
        })
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> Result<T, BoxError> {
    match tokio::time::timeout(Duration::from_secs(120), rx.recv()).await {
        Ok(Some(value)) => Ok(value),
        Ok(None) => Err(format!("stub closed while waiting for {what}").into()),
        Err(_) => Err(format!("no {what} within 120 s").into()),
    }
}

/// How to start one instance of a function.
#[derive(Clone)]
pub struct Launch {
    /// The function's name (`AWS_LAMBDA_FUNCTION_NAME`), which names its lines in the log.
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub memory_mb: u32,
    /// Run invocations under Lambda's CPU share for `memory_mb`, enforced over periods of this
    /// many microseconds.
    pub cpu_share: Option<u64>,
}

impl Launch {
    /// The process as Lambda starts it, talking to the Runtime API at `runtime_api` (host:port,
    /// or a URL with a path), its output appended to `log`.
    pub fn command(
        &self,
        runtime_api: &str,
        log: &Path,
    ) -> Result<std::process::Command, BoxError> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let mut command = std::process::Command::new(&self.program);
        command
            .args(&self.args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env(
                "HOME",
                std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("AWS_LAMBDA_RUNTIME_API", runtime_api)
            .env("AWS_LAMBDA_FUNCTION_NAME", &self.name)
            .env(
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                self.memory_mb.to_string(),
            )
            .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
            .env("AWS_LAMBDA_LOG_STREAM_NAME", "bench/stream")
            .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/bench")
            .env("_HANDLER", self.args.last().cloned().unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        if let Some(cwd) = &self.cwd {
            command.current_dir(cwd).env("LAMBDA_TASK_ROOT", cwd);
        }
        die_with_parent(&mut command);
        Ok(command)
    }
}

/// One invocation: its duration (event handed out → `/response`), its answer, and the CPU the
/// process spent meanwhile.
pub struct Invocation {
    pub elapsed: Duration,
    pub body: String,
    pub cpu: Duration,
}

impl Invocation {
    pub fn ms(&self) -> f64 {
        ms(self.elapsed)
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }
}

/// A running instance of a function, ready for its next event.
pub struct Instance {
    pub name: String,
    /// Spawn → the first `/next`.
    pub init: Duration,
    stub: Stub,
    child: std::process::Child,
    pending: Option<Next>,
    share: Option<CpuShare>,
}

impl Instance {
    /// Spawns the process and waits for it to finish init. Its output is appended to `log`.
    pub async fn start(launch: &Launch, log: &Path) -> Result<Self, BoxError> {
        let mut stub = Stub::start().await?;
        let mut command = launch.command(&stub.addr.to_string(), log)?;
        let spawned_at = Instant::now();
        let mut child = command.spawn()?;
        let first = match recv(&mut stub.nexts, "first /next").await {
            Ok(first) => first,
            Err(err) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(err);
            }
        };
        let mut instance = Self {
            name: launch.name.clone(),
            init: first.at - spawned_at,
            stub,
            child,
            pending: Some(first),
            share: None,
        };
        if let Some(period_us) = launch.cpu_share {
            let share = CpuShare::new(launch.memory_mb, period_us)?;
            share.hold(instance.child.id())?;
            instance.share = Some(share);
        }
        Ok(instance)
    }

    /// Hands `event` to the instance and waits for its answer; an error answer is an error.
    pub async fn invoke(&mut self, event: &Value) -> Result<Invocation, BoxError> {
        let pending = self
            .pending
            .take()
            .ok_or_else(|| format!("{} is not waiting for an event", self.name))?;
        let request_id = format!("bench-{}", uuid::Uuid::new_v4().simple());
        let cpu_before = process_cpu(self.child.id());
        let sent = Instant::now();
        let _ = pending.reply.send((request_id.clone(), event.clone()));
        let done = recv(&mut self.stub.done, "/response").await?;
        let elapsed = done.at - sent;
        let cpu = process_cpu(self.child.id()).saturating_sub(cpu_before);
        if !done.ok || done.request_id != request_id {
            return Err(format!(
                "{} answered {} for {}: {}",
                self.name,
                if done.ok { "a response" } else { "an error" },
                done.request_id,
                done.body.chars().take(300).collect::<String>()
            )
            .into());
        }
        self.pending = Some(recv(&mut self.stub.nexts, "next /next").await?);
        Ok(Invocation {
            elapsed,
            body: done.body,
            cpu,
        })
    }

    /// The process's peak resident memory so far, in kB.
    pub fn peak_rss_kb(&self) -> u64 {
        proc_status_kb(self.child.id(), "VmHWM").unwrap_or(0)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // The cgroup can go only once its process has.
        self.share.take();
    }
}

/// CPU time of every thread of `pid` (`/proc/<pid>/task/*/schedstat`, nanoseconds on CPU).
fn process_cpu(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

/// A cgroup holding one process to `memory_mb / 1,769` of one core, as Lambda does: cgroup v2's
/// `cpu.max`, or v1's `cpu.cfs_quota_us`. The quota is enforced per period: a process may spend
/// its share of a period at full speed and then waits for the next one, so a short period
/// throttles short bursts of work that a long one lets through. Which period Lambda uses is not
/// published: the benchmark measures with the kernel's default, 100 ms, and with 20 ms.
/// Removed on drop.
pub struct CpuShare {
    dir: PathBuf,
}

/// The kernel's default CFS period.
pub const DEFAULT_PERIOD_US: u64 = 100_000;
/// A short period, as a stricter reading of the same share.
pub const SHORT_PERIOD_US: u64 = 20_000;

impl CpuShare {
    pub fn new(memory_mb: u32, period_us: u64) -> Result<Self, BoxError> {
        let quota = (f64::from(memory_mb) / MB_PER_VCPU).min(1.0);
        // The kernel's least quota is 1 ms.
        let quota_us = ((period_us as f64 * quota) as u64).max(1_000);
        let name = format!(
            "gateway-bench-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let v2 = Path::new("/sys/fs/cgroup/cgroup.controllers").exists();
        let dir = if v2 {
            let root = Path::new("/sys/fs/cgroup");
            // The cpu controller must be enabled for the root's children.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu");
            root.join(&name)
        } else {
            Path::new("/sys/fs/cgroup/cpu").join(&name)
        };
        std::fs::create_dir(&dir).map_err(|e| why(&dir, "create", e))?;
        let share = Self { dir };
        let dir = &share.dir;
        let why = |what: &str, err: std::io::Error| why(dir, what, err);
        if v2 {
            std::fs::write(dir.join("cpu.max"), format!("{quota_us} {period_us}"))
                .map_err(|e| why("cpu.max", e))?;
        } else {
            std::fs::write(dir.join("cpu.cfs_period_us"), period_us.to_string())
                .map_err(|e| why("cpu.cfs_period_us", e))?;
            std::fs::write(dir.join("cpu.cfs_quota_us"), quota_us.to_string())
                .map_err(|e| why("cpu.cfs_quota_us", e))?;
        }
        Ok(share)
    }

    /// Moves process `pid`, every thread of it, into the share.
    pub fn hold(&self, pid: u32) -> Result<(), BoxError> {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string())
            .map_err(|e| why(&self.dir, "cgroup.procs", e))
    }

    /// Whether this machine lets the benchmark make such cgroups.
    pub fn available() -> Result<(), BoxError> {
        CpuShare::new(128, DEFAULT_PERIOD_US).map(drop)
    }
}

fn why(dir: &Path, what: &str, err: std::io::Error) -> BoxError {
    format!(
        "cannot hold a process to Lambda's CPU share ({what} in {}: {err}); this needs root and a writable cgroup cpu controller",
        dir.display()
    )
    .into()
}

impl Drop for CpuShare {
    fn drop(&mut self) {
        // A process still inside keeps the folder; give it a moment to be reaped.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
