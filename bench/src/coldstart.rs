//! Figure 1: cold start. Each function binary is started as Lambda starts it, against a small
//! Lambda Runtime API stub on loopback: init = the stub seeing the first
//! `GET /2018-06-01/runtime/invocation/next` − spawn. The stub then hands out a real event and
//! times it to `/response` (first event, cold connections), then a second one (warm).
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use gateway::domain::token::WebhookSigner;
use serde_json::{json, Value};
use tokio::sync::{mpsc, oneshot};

use crate::common::{
    bin_dir, die_with_parent, gateway_env, jpeg, ms, proc_status_kb, repo_root, restore_request,
    BoxError, Names, Summary, OWNER, REGION, WEBHOOK_SECRET,
};

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

/// The Runtime API stub: one per process run.
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
        // No more events for this process: hold the long-poll, as Lambda does between events.
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

async fn response(
    State(state): State<StubState>,
    Path(request_id): Path<String>,
    body: String,
) -> Response {
    let _ = state.done.send(Done {
        at: Instant::now(),
        request_id,
        ok: true,
        body,
    });
    (StatusCode::ACCEPTED, r#"{"status":"OK"}"#).into_response()
}

async fn error(
    State(state): State<StubState>,
    Path(request_id): Path<String>,
    body: String,
) -> Response {
    let _ = state.done.send(Done {
        at: Instant::now(),
        request_id,
        ok: false,
        body,
    });
    (StatusCode::ACCEPTED, r#"{"status":"OK"}"#).into_response()
}

async fn init_error(State(state): State<StubState>, body: String) -> Response {
    let _ = state.done.send(Done {
        at: Instant::now(),
        request_id: "init".into(),
        ok: false,
        body,
    });
    (StatusCode::ACCEPTED, r#"{"status":"OK"}"#).into_response()
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

/// What one cold start of one binary measured.
#[derive(Clone, Debug)]
struct Run {
    init_ms: f64,
    first_ms: f64,
    second_ms: f64,
    max_rss_kb: u64,
}

/// One subject: a binary (or the Python runtime) and the events it gets.
#[derive(Clone)]
pub struct Subject {
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub cwd: Option<PathBuf>,
    pub first_event: Value,
    pub second_event: Value,
    /// Template memory size, for `AWS_LAMBDA_FUNCTION_MEMORY_SIZE`.
    pub memory_mb: u32,
}

#[derive(Clone, Debug, Default)]
pub struct Figure {
    pub name: String,
    pub init: Summary,
    pub first: Summary,
    pub second: Summary,
    pub max_rss_mb: Summary,
    pub binary_mb: Option<f64>,
    /// Where the init went, phase by phase (`INIT_PHASES`), from the function's own `init`
    /// log line; empty for binaries that write none (the baselines).
    pub phases: Vec<(&'static str, Summary)>,
    pub errors: Vec<String>,
}

/// The phases of a function's `init` log line (`Wiring::ready`), in order.
pub const INIT_PHASES: [&str; 6] = [
    "sdk_config_ms",
    "secrets_ms",
    "config_ms",
    "tracing_ms",
    "clients_ms",
    "total_ms",
];

/// Each function's `init` lines in the log, phase by phase.
fn init_phases(log: &std::path::Path) -> HashMap<String, Vec<(&'static str, Summary)>> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut values: HashMap<String, HashMap<&'static str, Vec<f64>>> = HashMap::new();
    for line in text.lines() {
        let Ok(doc) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if doc["message"] != "init" {
            continue;
        }
        let Some(function) = doc["function"].as_str() else {
            continue;
        };
        let phases = values.entry(function.to_string()).or_default();
        for phase in INIT_PHASES {
            if let Some(v) = doc[phase].as_f64() {
                phases.entry(phase).or_default().push(v);
            }
        }
    }
    values
        .into_iter()
        .map(|(function, phases)| {
            let summaries = INIT_PHASES
                .iter()
                .map(|phase| {
                    (
                        *phase,
                        Summary::of(phases.get(phase).map_or(&[][..], Vec::as_slice)),
                    )
                })
                .collect();
            (function, summaries)
        })
        .collect()
}

async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> Result<T, BoxError> {
    match tokio::time::timeout(Duration::from_secs(60), rx.recv()).await {
        Ok(Some(value)) => Ok(value),
        Ok(None) => Err(format!("stub closed while waiting for {what}").into()),
        Err(_) => Err(format!("no {what} within 60 s").into()),
    }
}

/// Whether `function` is told of the secret named by `arn_var`, as in `template.yaml`: the
/// public submit function of none, the webhook of all but the volume's, the sweeper of all but
/// the webhook's, finalize and the janitor of the volume's alone.
pub fn told_of(function: &str, arn_var: &str) -> bool {
    match function {
        "dispatch" => true,
        "webhook" => arn_var != "VOLUME_SECRET_ARN",
        "sweeper" => arn_var != "WEBHOOK_SECRET_ARN",
        "finalize" | "janitor" => arn_var == "VOLUME_SECRET_ARN",
        _ => false,
    }
}

async fn run_once(
    subject: &Subject,
    env: &[(String, String)],
    log: &std::path::Path,
) -> Result<Run, BoxError> {
    let env: Vec<&(String, String)> = env
        .iter()
        .filter(|(k, _)| !k.ends_with("_SECRET_ARN") || told_of(subject.name, k))
        .collect();
    let mut stub = Stub::start().await?;
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    let mut command = std::process::Command::new(&subject.program);
    command
        .args(&subject.args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env(
            "HOME",
            std::env::var("HOME").unwrap_or_else(|_| "/tmp".into()),
        )
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("AWS_LAMBDA_RUNTIME_API", stub.addr.to_string())
        .env("AWS_LAMBDA_FUNCTION_NAME", subject.name)
        .env(
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
            subject.memory_mb.to_string(),
        )
        .env("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST")
        .env("AWS_LAMBDA_LOG_STREAM_NAME", "bench/stream")
        .env("AWS_LAMBDA_LOG_GROUP_NAME", "/aws/lambda/bench")
        .env("_HANDLER", subject.args.last().cloned().unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file);
    if let Some(cwd) = &subject.cwd {
        command.current_dir(cwd).env("LAMBDA_TASK_ROOT", cwd);
    }
    die_with_parent(&mut command);
    let spawned_at = Instant::now();
    let mut child = command.spawn()?;
    let pid = child.id();
    let result = async {
        let first_next = recv(&mut stub.nexts, "first /next").await?;
        let init_ms = ms(first_next.at - spawned_at);
        let mut timings = Vec::new();
        let mut pending = first_next;
        for (i, event) in [&subject.first_event, &subject.second_event]
            .into_iter()
            .enumerate()
        {
            let request_id = format!("bench-{}-{i}", uuid::Uuid::new_v4().simple());
            let sent = Instant::now();
            let _ = pending.reply.send((request_id.clone(), event.clone()));
            let done = recv(&mut stub.done, "/response").await?;
            if !done.ok || done.request_id != request_id {
                return Err(format!(
                    "{} answered {} for {}: {}",
                    subject.name,
                    if done.ok { "a response" } else { "an error" },
                    done.request_id,
                    done.body.chars().take(300).collect::<String>()
                )
                .into());
            }
            check_response(subject.name, &done.body)?;
            timings.push(ms(done.at - sent));
            pending = recv(&mut stub.nexts, "next /next").await?;
        }
        let max_rss_kb = proc_status_kb(pid, "VmHWM").unwrap_or(0);
        drop(pending);
        Ok::<_, BoxError>(Run {
            init_ms,
            first_ms: timings[0],
            second_ms: timings[1],
            max_rss_kb,
        })
    }
    .await;
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// An API Gateway response must be a success; anything else means the event did no real work.
fn check_response(name: &str, body: &str) -> Result<(), BoxError> {
    let value: Value = serde_json::from_str(body).unwrap_or(Value::Null);
    if let Some(status) = value.get("statusCode").and_then(Value::as_u64) {
        if !(200..300).contains(&status) {
            return Err(format!(
                "{name} answered HTTP {status}: {}",
                body.chars().take(300).collect::<String>()
            )
            .into());
        }
    }
    Ok(())
}

pub async fn measure(
    subjects: &[Subject],
    env: &[(String, String)],
    runs: usize,
) -> Result<Vec<Figure>, BoxError> {
    let log = std::env::temp_dir().join("gateway-bench-coldstart.log");
    let _ = std::fs::remove_file(&log);
    let mut results: HashMap<&str, Vec<Run>> = HashMap::new();
    let mut errors: HashMap<&str, Vec<String>> = HashMap::new();
    // One untimed start per subject first, so every timed start finds the binary (and Python's
    // modules) in the page cache, as a Lambda host's local cache would.
    for subject in subjects {
        if let Err(err) = run_once(subject, env, &log).await {
            crate::progress!("cold start warm-up of {} failed: {err}", subject.name);
        }
    }
    // Interleaved rounds, so that load from elsewhere on the machine spreads over all subjects.
    for round in 0..runs {
        for subject in subjects {
            match run_once(subject, env, &log).await {
                Ok(run) => results.entry(subject.name).or_default().push(run),
                Err(err) => {
                    crate::progress!("cold start of {} failed: {err}", subject.name);
                    errors
                        .entry(subject.name)
                        .or_default()
                        .push(err.to_string());
                }
            }
        }
        crate::progress!("cold start: round {}/{} done", round + 1, runs);
    }
    let mut phases = init_phases(&log);
    Ok(subjects
        .iter()
        .map(|subject| {
            let runs = results.remove(subject.name).unwrap_or_default();
            let pick = |f: fn(&Run) -> f64| Summary::of(&runs.iter().map(f).collect::<Vec<_>>());
            Figure {
                name: subject.name.to_string(),
                init: pick(|r| r.init_ms),
                first: pick(|r| r.first_ms),
                second: pick(|r| r.second_ms),
                max_rss_mb: pick(|r| r.max_rss_kb as f64 / 1024.0),
                binary_mb: std::fs::metadata(&subject.program)
                    .ok()
                    .filter(|_| subject.args.is_empty())
                    .map(|m| m.len() as f64 / 1_048_576.0),
                phases: phases.remove(subject.name).unwrap_or_default(),
                errors: errors.remove(subject.name).unwrap_or_default(),
            }
        })
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// An API Gateway HTTP API (payload 2.0) event, with the JWT authorizer's claims.
pub fn http_event(method: &str, path: &str, query: &str, body: Option<String>) -> Value {
    let query_params: serde_json::Map<String, Value> = url_pairs(query);
    json!({
        "version": "2.0",
        "routeKey": format!("{method} {path}"),
        "rawPath": path,
        "rawQueryString": query,
        "queryStringParameters": if query.is_empty() { Value::Null } else { Value::Object(query_params) },
        "headers": {
            "content-type": "application/json",
            "host": "bench.execute-api.us-east-1.amazonaws.com",
            "user-agent": "gateway-bench",
        },
        "requestContext": {
            "accountId": "123456789012",
            "apiId": "bench",
            "domainName": "bench.execute-api.us-east-1.amazonaws.com",
            "domainPrefix": "bench",
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": "gateway-bench",
            },
            "requestId": uuid::Uuid::new_v4().to_string(),
            "routeKey": format!("{method} {path}"),
            "stage": "$default",
            "time": "27/Nov/2026:08:00:00 +0000",
            "timeEpoch": crate::common::now_ms(),
            "authorizer": { "jwt": { "claims": { "sub": OWNER }, "scopes": null } },
        },
        "body": body,
        "isBase64Encoded": false,
    })
}

fn url_pairs(query: &str) -> serde_json::Map<String, Value> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
        .collect()
}

pub fn submit_event(image: &[u8]) -> Value {
    http_event(
        "POST",
        "/jobs",
        "",
        Some(restore_request(image).to_string()),
    )
}

pub fn sqs_event(job_id: &str) -> Value {
    sqs_event_with(json!({ "job_id": job_id }))
}

/// A finalize-queue batch of one request for `job_id`.
pub fn finalize_event(job_id: &str) -> Value {
    sqs_event_with(json!({ "finalize": job_id }))
}

fn sqs_event_with(body: Value) -> Value {
    json!({
        "Records": [{
            "messageId": uuid::Uuid::new_v4().to_string(),
            "receiptHandle": "bench-receipt",
            "body": body.to_string(),
            "attributes": {
                "ApproximateReceiveCount": "1",
                "SentTimestamp": crate::common::now_ms().to_string(),
                "SenderId": "123456789012",
                "ApproximateFirstReceiveTimestamp": crate::common::now_ms().to_string(),
            },
            "messageAttributes": {},
            "md5OfBody": "",
            "eventSource": "aws:sqs",
            "eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:bench",
            "awsRegion": REGION,
        }]
    })
}

/// A webhook with a valid token for a job the table does not hold: verified, one GetItem, 200.
pub fn webhook_event(job_id: &str) -> Value {
    let token = WebhookSigner::new(WEBHOOK_SECRET.as_bytes(), None).token(job_id);
    http_event(
        "POST",
        &format!("/webhooks/runpod/{job_id}"),
        &format!("token={token}"),
        Some(r#"{"id":"bench","status":"COMPLETED"}"#.to_string()),
    )
}

pub fn schedule_event() -> Value {
    json!({
        "version": "0",
        "id": uuid::Uuid::new_v4().to_string(),
        "detail-type": "Scheduled Event",
        "source": "aws.scheduler",
        "account": "123456789012",
        "time": "2026-11-27T08:00:00Z",
        "region": REGION,
        "resources": ["arn:aws:scheduler:us-east-1:123456789012:schedule/default/sweeper"],
        "detail": {},
    })
}

/// The subjects: the five functions, the warmed submit, hello world and the Python submit.
pub fn subjects(memory: &crate::template::MemorySizes) -> Vec<Subject> {
    let bins = bin_dir();
    let image = jpeg(96, 72);
    let missing = || uuid::Uuid::now_v7().to_string();
    let rust = |name: &'static str, first: Value, second: Value| Subject {
        name,
        program: bins.join(name),
        args: Vec::new(),
        cwd: None,
        first_event: first,
        second_event: second,
        memory_mb: memory.of(name),
    };
    vec![
        rust("submit", submit_event(&image), submit_event(&image)),
        rust("dispatch", sqs_event(&missing()), sqs_event(&missing())),
        rust(
            "webhook",
            webhook_event(&missing()),
            webhook_event(&missing()),
        ),
        rust(
            "finalize",
            finalize_event(&missing()),
            finalize_event(&missing()),
        ),
        rust("sweeper", schedule_event(), schedule_event()),
        rust("janitor", schedule_event(), schedule_event()),
        Subject {
            name: "submit-warmed",
            program: bins.join("bench-submit-warmed"),
            ..rust("submit", submit_event(&image), submit_event(&image))
        },
        Subject {
            name: "hello-world",
            program: bins.join("bench-hello"),
            ..rust(
                "hello-world",
                json!({"hello": "world"}),
                json!({"hello": "again"}),
            )
        },
        Subject {
            name: "python-submit",
            program: repo_root().join(".venv/bin/python"),
            args: vec![
                "-m".into(),
                "awslambdaric".into(),
                "submit_handler.handler".into(),
            ],
            cwd: Some(repo_root().join("bench/python")),
            ..rust("submit", submit_event(&image), submit_event(&image))
        },
    ]
}

/// The environment for the functions: the gateway's variables, pointed at moto and the
/// emulator, with resources created beforehand.
///
/// As in `template.yaml`, each `*_SECRET_ARN` names a secret (created in moto) holding its
/// secret variables (`config::SECRET_SOURCES`); they stay in the plain environment too. Each
/// function is told only of the secrets the template gives it ([`told_of`]).
pub async fn env(
    moto: &str,
    emulator: &runpod_emulator::Emulator,
    names: &Names,
) -> Result<Vec<(String, String)>, BoxError> {
    let mut env = gateway_env(moto, emulator, names, "http://127.0.0.1:9");
    for source in gateway::config::SECRET_SOURCES {
        let secret: serde_json::Map<String, Value> = env
            .iter()
            .filter(|(k, _)| source.keys.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let arn = crate::common::create_secret(
            moto,
            &format!("{}-{}", names.table, source.arn_var.to_ascii_lowercase()),
            &Value::Object(secret),
        )
        .await?;
        env.push((source.arn_var.into(), arn));
    }
    env.push(("RUST_LOG".into(), "info".into()));
    Ok(env)
}
