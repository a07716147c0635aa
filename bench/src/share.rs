//! Figure 7: compute per job in the function binaries themselves, under Lambda's CPU share.
//!
//! Lambda gives a function CPU in proportion to its memory (one vCPU at 1,769 MB), so the
//! GB-seconds of a smaller size are only honest when measured with the CPU that size gets. Each
//! function runs here as one warm instance ([`Instance`]) in a cgroup holding it to that share,
//! and one restore job at a time goes through all of them as Lambda would hand them their events:
//! `POST /jobs` to submit, the dispatch queue's message to dispatch, RunPod's webhook (caught by
//! the benchmark, which the emulator's worker calls once the workflow has run) to the webhook
//! function, the finalize queue's message to finalize, the end notice that frees the job's
//! tenant slot to callbacks, and `GET /jobs/{id}` to submit again. Each invocation's duration is
//! what Lambda bills.
//!
//! The same jobs run at the template's sizes with full CPU, at the template's sizes under the
//! share, and at every candidate size under the share, which is how the sizes are chosen.
use std::collections::HashMap;
use std::time::{Duration, Instant};

use aws_config::SdkConfig;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::Router;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::coldstart::{http_event, submit_event};
use crate::common::{jpeg, BoxError, Names, Summary};
use crate::lambda::{Instance, Launch};
use crate::template::MemorySizes;

/// The functions a job passes through, in order.
pub const FUNCTIONS: [&str; 5] = ["submit", "dispatch", "webhook", "finalize", "callbacks"];

/// The invocations of one job: (step, function).
pub const STEPS: [(&str, &str); 6] = [
    ("POST /jobs", "submit"),
    ("dispatch", "dispatch"),
    ("webhook", "webhook"),
    ("finalize", "finalize"),
    ("callbacks: end notice", "callbacks"),
    ("GET /jobs/{id}", "submit"),
];

/// One way to run the functions: each one's memory size, and whether it gets Lambda's CPU
/// share for that size (enforced over periods of so many µs) or the whole machine.
#[derive(Clone, Debug)]
pub struct Setting {
    pub label: String,
    pub memory: HashMap<&'static str, u32>,
    pub cpu_share: Option<u64>,
}

fn share_label(cpu_share: Option<u64>) -> String {
    match cpu_share {
        Some(period_us) => format!("CPU share per {} ms", period_us / 1000),
        None => "full CPU".into(),
    }
}

impl Setting {
    pub fn template(template: &MemorySizes, cpu_share: Option<u64>) -> Self {
        Self {
            label: format!("template sizes, {}", share_label(cpu_share)),
            memory: FUNCTIONS.iter().map(|f| (*f, template.of(f))).collect(),
            cpu_share,
        }
    }

    pub fn uniform(mb: u32, period_us: u64) -> Self {
        Self {
            label: format!("all {mb} MB, {}", share_label(Some(period_us))),
            memory: FUNCTIONS.iter().map(|f| (*f, mb)).collect(),
            cpu_share: Some(period_us),
        }
    }

    pub fn of(&self, function: &str) -> u32 {
        self.memory.get(function).copied().unwrap_or(128)
    }
}

/// What one setting measured.
#[derive(Clone, Debug, Default)]
pub struct Row {
    pub setting: String,
    /// Per step (`STEPS`): duration (ms) and the process's CPU meanwhile (ms).
    pub step_ms: Vec<Summary>,
    pub step_cpu_ms: Vec<Summary>,
    /// Per step: GB-s billed (each invocation rounded up to 1 ms).
    pub step_gb_s: Vec<Summary>,
    pub total_ms: Summary,
    pub gb_s: Summary,
    /// Per function (`FUNCTIONS`): peak RSS (MB) of its instance.
    pub peak_rss_mb: Vec<f64>,
    pub errors: Vec<String>,
}

/// Lambda bills duration in 1 ms steps.
pub fn gb_seconds(duration_ms: f64, memory_mb: u32) -> f64 {
    duration_ms.ceil() / 1000.0 * f64::from(memory_mb) / 1024.0
}

/// RunPod's webhook requests, as the emulator's worker sends them: path with query, and body.
type Caught = mpsc::UnboundedReceiver<(String, String, String)>;

async fn catch(
    State(tx): State<mpsc::UnboundedSender<(String, String, String)>>,
    uri: Uri,
    body: String,
) -> StatusCode {
    let _ = tx.send((
        uri.path().to_string(),
        uri.query().unwrap_or("").to_string(),
        body,
    ));
    StatusCode::OK
}

pub async fn measure(
    sdk: &SdkConfig,
    moto: &str,
    template: &MemorySizes,
    settings: &[Setting],
    runs: usize,
) -> Result<Vec<Row>, BoxError> {
    let emulator = crate::common::emulator(true).await?;
    let (tx, mut caught) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(async move {
        let app = Router::new().fallback(catch).with_state(tx);
        let _ = axum::serve(listener, app).await;
    });
    let names = Names::fresh(moto, "share");
    let env = crate::coldstart::env(moto, &emulator, &names, &base).await?;
    crate::common::wiring(sdk, &env).await?;
    let sqs = aws_sdk_sqs::Client::new(sdk);
    let log = std::env::temp_dir().join("gateway-bench-share.log");
    let _ = std::fs::remove_file(&log);
    let mut rows = Vec::new();
    for setting in settings {
        crate::progress!("compute under Lambda's CPU share: {}", setting.label);
        let row = match run_setting(
            setting,
            template,
            &env,
            &names,
            &sqs,
            &mut caught,
            &log,
            runs,
        )
        .await
        {
            Ok(row) => row,
            Err(err) => Row {
                setting: setting.label.clone(),
                errors: vec![err.to_string()],
                ..Row::default()
            },
        };
        rows.push(row);
    }
    server.abort();
    emulator.shutdown().await;
    Ok(rows)
}

#[allow(clippy::too_many_arguments)]
async fn run_setting(
    setting: &Setting,
    template: &MemorySizes,
    env: &[(String, String)],
    names: &Names,
    sqs: &aws_sdk_sqs::Client,
    caught: &mut Caught,
    log: &std::path::Path,
    runs: usize,
) -> Result<Row, BoxError> {
    let bins = crate::common::bin_dir();
    let mut instances: HashMap<&str, Instance> = HashMap::new();
    for function in FUNCTIONS {
        let launch = Launch {
            name: function.to_string(),
            program: bins.join(function),
            args: Vec::new(),
            cwd: None,
            env: env
                .iter()
                .filter(|(k, _)| !k.ends_with("_SECRET_ARN") || template.told_of(function, k))
                .cloned()
                .collect(),
            memory_mb: setting.of(function),
            cpu_share: setting.cpu_share,
        };
        instances.insert(function, Instance::start(&launch, log).await?);
    }
    let image = jpeg(640, 480);
    let mut durations: Vec<Vec<f64>> = vec![Vec::new(); STEPS.len()];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); STEPS.len()];
    let mut gbs: Vec<Vec<f64>> = vec![Vec::new(); STEPS.len()];
    let (mut totals, mut job_gbs) = (Vec::new(), Vec::new());
    let mut errors = Vec::new();
    // One untimed job first: the first invocation of an instance opens its connections, which
    // figure 1 reports; this figure is about warm instances.
    for run in 0..=runs {
        match one_job(&mut instances, &image, names, sqs, caught).await {
            Ok(_) if run == 0 => {}
            Ok(invocations) => {
                let mut total = 0.0;
                let mut billed = 0.0;
                for (i, (ms, cpu)) in invocations.iter().enumerate() {
                    let g = gb_seconds(*ms, setting.of(STEPS[i].1));
                    durations[i].push(*ms);
                    cpus[i].push(*cpu);
                    gbs[i].push(g);
                    total += ms;
                    billed += g;
                }
                totals.push(total);
                job_gbs.push(billed);
                crate::progress!(
                    "  job {run}/{runs}: {total:.1} ms in the functions, {billed:.4} GB-s"
                );
            }
            Err(err) => {
                crate::progress!("  job {run}/{runs} failed: {err}");
                errors.push(format!("{}: job {run}: {err}", setting.label));
                // A failed job may leave messages behind that would be taken for the next one's.
                purge(sqs, names).await;
            }
        }
    }
    let summaries = |values: &[Vec<f64>]| values.iter().map(|v| Summary::of(v)).collect();
    Ok(Row {
        setting: setting.label.clone(),
        step_ms: summaries(&durations),
        step_cpu_ms: summaries(&cpus),
        step_gb_s: summaries(&gbs),
        total_ms: Summary::of(&totals),
        gb_s: Summary::of(&job_gbs),
        peak_rss_mb: FUNCTIONS
            .iter()
            .map(|f| instances[f].peak_rss_kb() as f64 / 1024.0)
            .collect(),
        errors,
    })
}

/// One job through every function; each step's (duration ms, CPU ms).
async fn one_job(
    instances: &mut HashMap<&str, Instance>,
    image: &[u8],
    names: &Names,
    sqs: &aws_sdk_sqs::Client,
    caught: &mut Caught,
) -> Result<Vec<(f64, f64)>, BoxError> {
    let mut steps = Vec::new();
    let mut step = async |function: &str, event: Value| -> Result<Value, BoxError> {
        let instance = instances
            .get_mut(function)
            .ok_or_else(|| format!("no instance of {function}"))?;
        let invocation = instance.invoke(&event).await?;
        steps.push((invocation.ms(), crate::common::ms(invocation.cpu)));
        Ok(invocation.json())
    };

    let accepted = step("submit", submit_event(image)).await?;
    let job_id = http_body(&accepted, 202)?["job_id"]
        .as_str()
        .ok_or("submit gave no job id")?
        .to_string();

    let (event, receipt) = crate::compute::receive_one(sqs, &names.queue_url).await?;
    let answer = step("dispatch", serde_json::to_value(&event)?).await?;
    no_failures("dispatch", &answer)?;
    crate::compute::delete(sqs, &names.queue_url, receipt).await?;

    let (path, query, body) = webhook_for(caught, &job_id).await?;
    let answer = step("webhook", http_event("POST", &path, &query, Some(body))).await?;
    http_body(&answer, 200)?;

    let (event, receipt) = crate::compute::receive_one(sqs, &names.finalize_queue_url).await?;
    let answer = step("finalize", serde_json::to_value(&event)?).await?;
    no_failures("finalize", &answer)?;
    crate::compute::delete(sqs, &names.finalize_queue_url, receipt).await?;

    let (event, receipt) = crate::compute::receive_one(sqs, &names.callback_queue_url).await?;
    let answer = step("callbacks", serde_json::to_value(&event)?).await?;
    no_failures("callbacks", &answer)?;
    crate::compute::delete(sqs, &names.callback_queue_url, receipt).await?;

    let view = step(
        "submit",
        http_event("GET", &format!("/jobs/{job_id}"), "", None),
    )
    .await?;
    let view = http_body(&view, 200)?;
    if view["status"] != "succeeded" {
        return Err(format!("job ended {}: {}", view["status"], view["error"]).into());
    }
    Ok(steps)
}

/// The JSON body of an API Gateway response, which must have `status`.
fn http_body(response: &Value, status: u64) -> Result<Value, BoxError> {
    let body = response["body"].as_str().unwrap_or_default();
    if response["statusCode"].as_u64() != Some(status) {
        return Err(format!(
            "answered {} instead of {status}: {}",
            response["statusCode"],
            body.chars().take(300).collect::<String>()
        )
        .into());
    }
    Ok(serde_json::from_str(body).unwrap_or(Value::Null))
}

fn no_failures(function: &str, answer: &Value) -> Result<(), BoxError> {
    match answer["batchItemFailures"].as_array() {
        Some(failures) if !failures.is_empty() => {
            Err(format!("{function} reported a failed message: {answer}").into())
        }
        _ => Ok(()),
    }
}

/// RunPod's webhook for `job_id`, as the emulator's worker sent it once the workflow ran.
async fn webhook_for(
    caught: &mut Caught,
    job_id: &str,
) -> Result<(String, String, String), BoxError> {
    let give_up = Instant::now() + Duration::from_secs(180);
    loop {
        let left = give_up.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, caught.recv()).await {
            Ok(Some((path, query, body))) if path.ends_with(job_id) => {
                return Ok((path, query, body))
            }
            // Another job's webhook (RunPod retries): not this one's.
            Ok(Some(_)) => continue,
            Ok(None) => return Err("the webhook catcher stopped".into()),
            Err(_) => return Err(format!("no webhook for {job_id} within 180 s").into()),
        }
    }
}

async fn purge(sqs: &aws_sdk_sqs::Client, names: &Names) {
    for url in [
        &names.queue_url,
        &names.finalize_queue_url,
        &names.callback_queue_url,
    ] {
        let _ = sqs.purge_queue().queue_url(url).send().await;
    }
}
