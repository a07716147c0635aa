//! Figure 1: cold start. Each function binary is started as Lambda starts it, against a small
//! Lambda Runtime API stub on loopback: init = the stub seeing the first
//! `GET /2018-06-01/runtime/invocation/next` − spawn. The stub then hands out a real event and
//! times it to `/response` (first event, cold connections), then a second one (warm).
use std::collections::HashMap;
use std::path::PathBuf;

use gateway::domain::token::WebhookSigner;
use serde_json::{json, Value};

use crate::common::{
    bin_dir, gateway_env, jpeg, ms, repo_root, restore_request, BoxError, Names, Summary, OWNER,
    REGION, WEBHOOK_SECRET,
};
use crate::lambda::{Instance, Launch};
use crate::template::MemorySizes;

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
    /// The function whose memory size and secrets it gets from `template.yaml`.
    pub function: &'static str,
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

/// The environment `subject` starts with: the gateway's, but only the secrets the template gives
/// its function.
pub(crate) fn subject_env(
    subject: &Subject,
    env: &[(String, String)],
    template: &MemorySizes,
) -> Vec<(String, String)> {
    env.iter()
        .filter(|(k, _)| !k.ends_with("_SECRET_ARN") || template.told_of(subject.function, k))
        .cloned()
        .collect()
}

async fn run_once(
    subject: &Subject,
    env: &[(String, String)],
    template: &MemorySizes,
    log: &std::path::Path,
) -> Result<Run, BoxError> {
    let launch = Launch {
        name: subject.name.to_string(),
        program: subject.program.clone(),
        args: subject.args.clone(),
        cwd: subject.cwd.clone(),
        env: subject_env(subject, env, template),
        memory_mb: template.of(subject.function),
        cpu_share: None,
    };
    let mut instance = Instance::start(&launch, log).await?;
    let first = instance.invoke(&subject.first_event).await?;
    check_response(subject.name, &first.body)?;
    let second = instance.invoke(&subject.second_event).await?;
    check_response(subject.name, &second.body)?;
    Ok(Run {
        init_ms: ms(instance.init),
        first_ms: first.ms(),
        second_ms: second.ms(),
        max_rss_kb: instance.peak_rss_kb(),
    })
}

/// An API Gateway response must be a success; anything else means the event did no real work.
pub(crate) fn check_response(name: &str, body: &str) -> Result<(), BoxError> {
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
    template: &MemorySizes,
    runs: usize,
) -> Result<Vec<Figure>, BoxError> {
    let log = std::env::temp_dir().join("gateway-bench-coldstart.log");
    let _ = std::fs::remove_file(&log);
    let mut results: HashMap<&str, Vec<Run>> = HashMap::new();
    let mut errors: HashMap<&str, Vec<String>> = HashMap::new();
    // One untimed start per subject first, so every timed start finds the binary (and Python's
    // modules) in the page cache, as a Lambda host's local cache would.
    for subject in subjects {
        if let Err(err) = run_once(subject, env, template, &log).await {
            crate::progress!("cold start warm-up of {} failed: {err}", subject.name);
        }
    }
    // Interleaved rounds, so that load from elsewhere on the machine spreads over all subjects.
    for round in 0..runs {
        for subject in subjects {
            match run_once(subject, env, template, &log).await {
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

/// A callback-queue batch of one notice that `job_id` ended (what frees a held job's slot).
pub fn ended_notice_event(job_id: &str) -> Value {
    sqs_event_with(json!({ "notice": { "job_id": job_id, "event": "ended" } }))
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

/// The subjects: the seven functions, the warmed submit, hello world and the Python submit.
pub fn subjects() -> Vec<Subject> {
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
        function: name,
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
        rust(
            "callbacks",
            ended_notice_event(&missing()),
            ended_notice_event(&missing()),
        ),
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
/// function is told only of the secrets the template gives it (`MemorySizes::told_of`). RunPod's
/// webhooks go to `webhook_base`.
pub async fn env(
    moto: &str,
    emulator: &runpod_emulator::Emulator,
    names: &Names,
    webhook_base: &str,
) -> Result<Vec<(String, String)>, BoxError> {
    let mut env = gateway_env(moto, emulator, names, webhook_base);
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
