//! `gateway-bench`: the gateway's performance figures, printed as a Markdown table.
//!
//! 1. cold start of each function (init, first and second event) against a Lambda Runtime API
//!    stub, beside a hello-world `lambda_runtime` binary and a Python submit under awslambdaric;
//! 2. peak RSS while finalizing 1, 10, 100 and 200 MB outputs;
//! 3. DynamoDB items one sweep reads with 100 due jobs among 100,000 finished ones;
//! 4. handler time per job, the Lambda GB-seconds it implies, and the Celery worker-seconds;
//! 5. webhook arrival to downloadable result for a 10 MB output;
//! 6. submit throughput through the local runner against raw DynamoDB + SQS calls;
//! 7. compute per job in the function binaries under Lambda's CPU share for their memory sizes,
//!    at the template's sizes and at each candidate size;
//! 8. cold start again, under `cargo lambda watch` (cargo-lambda's own Lambda emulator).
//!
//! Run it through `scripts/bench` (release build, Python tools); `--quick` for small N,
//! `--only 1,3` for some figures. Progress goes to stderr, the table to stdout.
mod coldstart;
mod common;
mod compute;
mod lambda;
mod memory;
mod share;
mod sweeper;
mod template;
mod throughput;
mod watch;

use std::collections::BTreeSet;
use std::fmt::Write as _;

use common::{BoxError, Moto, Names};

struct Options {
    quick: bool,
    only: BTreeSet<u8>,
}

impl Options {
    fn parse() -> Result<Self, BoxError> {
        let mut options = Self {
            quick: false,
            only: (1..=8).collect(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--quick" => options.quick = true,
                "--only" => {
                    let list = args.next().ok_or("--only needs a list, e.g. 1,3")?;
                    options.only = list
                        .split(',')
                        .map(|n| n.trim().parse::<u8>())
                        .collect::<Result<_, _>>()?;
                }
                "-h" | "--help" => {
                    println!("usage: gateway-bench [--quick] [--only 1,2,3,4,5,6,7,8]");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other}").into()),
            }
        }
        Ok(options)
    }

    fn runs(&self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let memory_gib = common::proc_status_kb_file("/proc/meminfo", "MemTotal")
        .map(|kb| kb as f64 / 1_048_576.0)
        .unwrap_or(0.0);
    format!(
        "{cpu}, {cores} cores, {memory_gib:.0} GiB, {}",
        std::env::consts::ARCH
    )
}

fn ratio(ours: f64, base: f64) -> String {
    if base > 0.0 && ours > 0.0 {
        format!("{:.2}×", ours / base)
    } else {
        "n/a".into()
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let options = Options::parse()?;
    // The local runner's functions count metrics, which would be printed among the report.
    gateway_aws::metrics::capture();
    let started = std::time::Instant::now();
    let load_start = load_average();
    let memory = template::MemorySizes::load();
    // moto must be forked from the main thread (it dies with the thread that started it).
    let moto = Moto::start()?;
    progress!("moto on {} (pid {})", moto.endpoint, moto.pid());
    let sdk = common::sdk_config(&moto.endpoint).await;
    let mut out = String::new();
    let mut summary = String::new();
    let mut details = String::new();
    let mut notes: Vec<String> = Vec::new();
    let mut loads = vec![format!("start {load_start}")];
    let runs = options.runs(10, 3);

    // 1. Cold start.
    if options.only.contains(&1) {
        progress!("figure 1: cold start ({runs} runs per binary)");
        let emulator = common::emulator(false).await?;
        let names = Names::fresh(&moto.endpoint, "cold");
        let env = coldstart::env(&moto.endpoint, &emulator, &names, "http://127.0.0.1:9").await?;
        common::wiring(&sdk, &env).await?;
        let figures = coldstart::measure(&coldstart::subjects(), &env, &memory, runs).await?;
        emulator.shutdown().await;
        let find = |name: &str| {
            figures
                .iter()
                .find(|f| f.name == name)
                .cloned()
                .unwrap_or_default()
        };
        let hello = find("hello-world");
        let python = find("python-submit");
        for name in [
            "submit",
            "dispatch",
            "webhook",
            "finalize",
            "sweeper",
            "janitor",
            "callbacks",
        ] {
            let f = find(name);
            let _ = writeln!(
                summary,
                "| 1 | Init: {name} (ms, exec → first `/next`) | {} | {} hello-world · {} Python |",
                f.init.show(1),
                ratio(f.init.median, hello.init.median),
                ratio(f.init.median, python.init.median),
            );
        }
        let _ = writeln!(
            summary,
            "| 1 | Init baselines: hello-world `lambda_runtime` · Python submit (awslambdaric + boto3) (ms) | {} · {} | |",
            hello.init.show(1),
            python.init.show(1)
        );
        let submit = find("submit");
        let warmed = find("submit-warmed");
        // The headline: init and the first event together, so that work moved from init into
        // the first event (lazily built clients) does not flatter the figure.
        let cold = |f: &coldstart::Figure| f.init.median + f.first.median;
        let _ = writeln!(
            summary,
            "| 1 | Init + first event, submit `POST /jobs` (ms) | {:.1} | {} hello-world's {:.1} (target ≤ 1.50×) |",
            cold(&submit),
            ratio(cold(&submit), cold(&hello)),
            cold(&hello),
        );
        let _ = writeln!(
            summary,
            "| 1 | First event, submit `POST /jobs` (ms, cold connections) → second event (warm) | {} → {} | Python: {} → {} |",
            submit.first.show(1),
            submit.second.show(1),
            python.first.show(1),
            python.second.show(1),
        );
        let _ = writeln!(
            summary,
            "| 1 | Startup warming (submit + DescribeTable/GetQueueAttributes/HeadObject in init): init · first event (ms) | {} · {} | init {}, first event {} of unwarmed |",
            warmed.init.show(1),
            warmed.first.show(1),
            ratio(warmed.init.median, submit.init.median),
            ratio(warmed.first.median, submit.first.median),
        );
        let _ = writeln!(
            details,
            "\n**1a. Where init goes** (each function's own `init` log line, medians over every start, ms; `clients`: its clients and use cases, built after the shared wiring)\n\n\
             | Function | SDK config | Secrets | Config + catalog | Tracing + metrics | Clients | Total |\n|---|---|---|---|---|---|---|"
        );
        for f in figures.iter().filter(|f| !f.phases.is_empty()) {
            let cells: Vec<String> = f
                .phases
                .iter()
                .map(|(_, s)| format!("{:.2}", s.median))
                .collect();
            let _ = writeln!(details, "| {} | {} |", f.name, cells.join(" | "));
        }
        let _ = writeln!(
            details,
            "\n**1. Cold start** ({runs} starts each after one untimed start; Runtime API stub on loopback; moto over plain HTTP, so no TLS handshake is in these numbers)\n\n\
             | Binary | Init (ms) | First event (ms) | Second event (ms) | Peak RSS (MB) | Binary (MB) | Memory size (MB) |\n|---|---|---|---|---|---|---|"
        );
        for f in &figures {
            let _ = writeln!(
                details,
                "| {} | {} | {} | {} | {} | {} | {} |",
                f.name,
                f.init.show(1),
                f.first.show(1),
                f.second.show(1),
                f.max_rss_mb.show(1),
                f.binary_mb
                    .map(|m| format!("{m:.1}"))
                    .unwrap_or_else(|| "—".into()),
                memory.of(match f.name.as_str() {
                    "submit-warmed" | "python-submit" => "submit",
                    other => other,
                }),
            );
            for err in f.errors.iter().take(3) {
                notes.push(format!("cold start {}: {err}", f.name));
            }
        }
        let _ = writeln!(
            details,
            "\nEach function is told of the secrets `template.yaml` gives it (secrets in moto), so its init includes one GetSecretValue per secret: {}.",
            [
                "submit", "dispatch", "webhook", "finalize", "sweeper", "janitor", "callbacks"
            ]
            .iter()
            .map(|f| {
                let told: Vec<&str> = gateway::config::SECRET_SOURCES
                    .iter()
                    .filter(|s| memory.told_of(f, s.arn_var))
                    .map(|s| s.arn_var.trim_end_matches("_SECRET_ARN"))
                    .collect();
                format!(
                    "{f} {}",
                    if told.is_empty() {
                        "none".to_string()
                    } else {
                        told.join(", ").to_lowercase()
                    }
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
        );
        let _ = writeln!(
            details,
            "\nEvents: submit `POST /jobs` with a 96×72 JPEG inline (S3 PutObject, DynamoDB PutItem, SQS SendMessage; Python does the same three calls with boto3, without image validation); dispatch an SQS batch naming an unknown job (one GetItem); webhook a valid token for an unknown job (one GetItem); sweeper a schedule event over an empty index (4 Queries); callbacks an end notice for an unknown job (one GetItem); hello-world echoes."
        );
        loads.push(format!("after 1: {}", load_average()));
    }

    // 4. Compute per job, 5. webhook to result.
    if options.only.contains(&4) {
        let n = options.runs(5, 2);
        progress!("figure 4: compute per job ({n} jobs)");
        let f = compute::measure_compute(&sdk, &moto.endpoint, &memory, n).await?;
        let typical_gpu_s = 20.0;
        let _ = writeln!(
            summary,
            "| 4 | Compute per job: handler time summed (ms) → Lambda GB-s | {} → {} GB-s | Celery: {:.3} worker-s (emulator GPU run) · {typical_gpu_s:.0} worker-s (typical restore) |",
            f.total_ms.show(1),
            f.gb_seconds.show(4),
            f.gpu_ms.median / 1000.0,
        );
        let _ = writeln!(
            details,
            "\n**4. Compute per job** ({n} restore jobs at 0.25 MP, one at a time, after one untimed job; handler time inside each function; memory sizes from {})\n\n\
             | Handler | Function (MB) | Time (ms) |\n|---|---|---|\n\
             | `POST /jobs` (validate, decode image, S3 put, DynamoDB put, SQS send) | submit ({}) | {} |\n\
             | SQS batch of one (get, lease, copy input to volume, RunPod `/run`, save) | dispatch ({}) | {} |\n\
             | RunPod webhook (verify, `/status`, store the report, hand off, save) | webhook ({}) | {} |\n\
             | Finalize, SQS batch of one (read the report, lease, copy output volume → results, save) | finalize ({}) | {} |\n\
             | … of which the output copy alone (volume GetObject → results PutObject, measured separately) | | {} |\n\
             | `GET /jobs/{{id}}` once succeeded (get, presign) | submit ({}) | {} |\n\
             | **Sum** | | **{}** |\n\
             | Lambda GB-seconds for the sum (each call rounded up to 1 ms) | | {} |\n\
             | Sweeper, one sweep with nothing due (per minute, not per job) | sweeper ({}) | {} |\n\
             | RunPod `executionTime` of the job (emulator worker: the Celery design blocks a worker this long) | | {} |\n\
             | Output size (bytes) | | {} |",
            memory.source,
            memory.of("submit"),
            f.submit_ms.show(1),
            memory.of("dispatch"),
            f.dispatch_ms.show(1),
            memory.of("webhook"),
            f.webhook_ms.show(1),
            memory.of("finalize"),
            f.finalize_ms.show(1),
            f.copy_ms.show(1),
            memory.of("submit"),
            f.get_ms.show(1),
            f.total_ms.show(1),
            f.gb_seconds.show(5),
            memory.of("sweeper"),
            f.sweep_idle_ms.show(1),
            f.gpu_ms.show(0),
            f.output_bytes.show(0),
        );
        let gbs = f.gb_seconds.median;
        if gbs > 0.0 {
            let _ = writeln!(
                details,
                "\nPer job the Lambda side bills {gbs:.4} GB-s; a blocking Celery worker spends {:.3} s of worker time with the emulator's run and {typical_gpu_s:.0} s with a typical 20 s restoration run, i.e. {:.0}× the Lambda compute time (wall-clock seconds vs summed handler seconds).",
                f.gpu_ms.median / 1000.0,
                typical_gpu_s * 1000.0 / f.total_ms.median.max(1e-9),
            );
        }
        for err in f.errors.iter().take(3) {
            notes.push(format!("compute per job: {err}"));
        }
        loads.push(format!("after 4: {}", load_average()));
    }
    if options.only.contains(&5) {
        let n = options.runs(5, 2);
        progress!("figure 5: webhook to result, 10 MB ({n} runs)");
        let f = compute::measure_webhook(&sdk, &moto.endpoint, 10, n).await?;
        let _ = writeln!(
            summary,
            "| 5 | Webhook arrival → result downloadable, 10 MB output (ms) | {} | webhook handled (200) after {}; fully downloaded after {} |",
            f.downloadable_ms.show(0),
            f.handled_ms.show(0),
            f.downloaded_ms.show(0),
        );
        for err in f.errors.iter().take(3) {
            notes.push(format!("webhook to result: {err}"));
        }
        loads.push(format!("after 5: {}", load_average()));
    }

    // 2. Peak memory while finalizing.
    if options.only.contains(&2) {
        let n = options.runs(3, 1);
        let sizes = [1u64, 10, 100, 1024];
        // worker_comfyui: one base64 image in the report, up to the per-image cap (50 MiB).
        let inline_sizes = [1u64, 10, 50];
        progress!("figure 2: peak RSS while finalizing {sizes:?} MB files and {inline_sizes:?} MB inline images ({n} runs each)");
        let emulator = common::emulator(false).await?;
        let names = Names::fresh(&moto.endpoint, "memory");
        let env = common::gateway_env(&moto.endpoint, &emulator, &names, "http://127.0.0.1:9");
        let wiring = common::wiring(&sdk, &env).await?;
        let figures = memory::measure(
            &sdk,
            &emulator,
            &env,
            &wiring,
            &sizes,
            n,
            memory::Output::VolumeFile,
        )
        .await?;
        let inline = memory::measure(
            &sdk,
            &emulator,
            &env,
            &wiring,
            &inline_sizes,
            n,
            memory::Output::InlineImage,
        )
        .await?;
        emulator.shutdown().await;
        let peak_of = |figures: &[memory::Figure], size: u64| {
            figures
                .iter()
                .find(|f| f.size_mb == size)
                .map(|f| f.peak_rss_mb.median)
                .unwrap_or(0.0)
        };
        let row = |figures: &[memory::Figure]| {
            figures
                .iter()
                .map(|f| format!("{} MB: {}", f.size_mb, f.peak_rss_mb.show(1)))
                .collect::<Vec<_>>()
                .join(" · ")
        };
        let _ = writeln!(
            summary,
            "| 2 | Peak RSS handing off and finalizing a `volume_files` output of 1 · 10 · 100 · 1024 MB (MB) | {} | 1024 MB ÷ 100 MB: {}; 1024 MB − 1 MB: {:+.1} MB for 1023 MB more output |",
            row(&figures),
            ratio(peak_of(&figures, 1024), peak_of(&figures, 100)),
            peak_of(&figures, 1024) - peak_of(&figures, 1),
        );
        let _ = writeln!(
            summary,
            "| 2 | Peak RSS for a `worker_comfyui` output, one base64 image of 1 · 10 · 50 MB (the per-image cap) (MB) | {} | 50 MB − 1 MB: {:+.1} MB: the report is held, and one image decoded at a time |",
            row(&inline),
            peak_of(&inline, 50) - peak_of(&inline, 1),
        );
        let _ = writeln!(
            details,
            "\n**2. Peak memory while finalizing** (child process wired like the webhook and finalize functions, handing the job off then finalizing it; {n} runs per size; copy volume S3 API → results bucket in 8 MiB parts)\n\n\
             | Output | Peak RSS (MB) | RSS before (MB) | Hand-off + finalize time (ms) |\n|---|---|---|---|"
        );
        for (label, f) in figures
            .iter()
            .map(|f| ("file", f))
            .chain(inline.iter().map(|f| ("inline image", f)))
        {
            let _ = writeln!(
                details,
                "| {} MB {label} | {} | {} | {} |",
                f.size_mb,
                f.peak_rss_mb.show(1),
                f.rss_before_mb.show(1),
                f.copy_ms.show(0)
            );
            for err in f.errors.iter().take(3) {
                notes.push(format!("peak RSS: {err}"));
            }
        }
        loads.push(format!("after 2: {}", load_average()));
    }

    // 6. Submit throughput.
    if options.only.contains(&6) {
        let n = options.runs(3, 1);
        let (requests, concurrency) = if options.quick { (100, 8) } else { (300, 8) };
        progress!(
            "figure 6: submit throughput ({n} rounds of {requests} at concurrency {concurrency})"
        );
        let f = throughput::measure(&sdk, &moto.endpoint, requests, concurrency, n).await?;
        let _ = writeln!(
            summary,
            "| 6 | Submit throughput through the local runner (jobs/s, concurrency {}) | {} | {} of the fair baseline, raw PutObject + PutItem + SendMessage ({}/s; target ≥ 0.80) |",
            f.concurrency,
            f.runner.show(0),
            f.ratio.show(2),
            f.raw_with_s3.show(0),
        );
        let _ = writeln!(
            details,
            "\n**6. Submit throughput** ({n} rounds of {} requests at concurrency {}, interleaved; inline JPEG of {} bytes; one moto process serves everything)\n\n\
             | Path | Per second |\n|---|---|\n\
             | `POST /jobs` through the local runner (its SQS poller dispatching meanwhile) | {} |\n\
             | … the same with per-tenant in-flight limits off (no job takes a slot of its owner's) | {} |\n\
             | `POST /jobs` through the API router alone (no dispatch load) | {} |\n\
             | Raw: DynamoDB PutItem + SQS SendMessage (the gateway's adapters, no HTTP) | {} |\n\
             | Raw + S3 PutObject of the image (the fair baseline: the least I/O a submit can do) | {} |\n\
             | Runner ÷ fair baseline (per round; the headline) | {} |\n\
             | Runner ÷ raw PutItem + SendMessage (per round) | {} |\n\n\
             Besides the three calls, a submit spends a token of its owner's submit bucket (one conditional UpdateItem) and reads the owner's limits once a minute per instance.",
            f.requests,
            f.concurrency,
            f.image_bytes,
            f.runner.show(0),
            f.runner_unheld.show(0),
            f.api_only.show(0),
            f.raw.show(0),
            f.raw_with_s3.show(0),
            f.ratio.show(2),
            f.ratio_two_calls.show(2),
        );
        for err in f.errors.iter().take(3) {
            notes.push(format!("throughput: {err}"));
        }
        loads.push(format!("after 6: {}", load_average()));
    }

    // 7. Compute per job in the binaries, under Lambda's CPU share.
    if options.only.contains(&7) {
        let n = options.runs(5, 2);
        let candidates: &[u32] = &[128, 256, 512, 1024];
        match lambda::CpuShare::available() {
            Err(err) => {
                let _ = writeln!(
                    summary,
                    "| 7 | Compute per job in the function binaries under Lambda's CPU share (GB-s) | n/a | {err} |"
                );
            }
            Ok(()) => {
                progress!(
                    "figure 7: compute per job under Lambda's CPU share ({n} jobs per setting)"
                );
                let periods = [lambda::DEFAULT_PERIOD_US, lambda::SHORT_PERIOD_US];
                let mut settings = vec![share::Setting::template(&memory, None)];
                settings.extend(
                    periods
                        .iter()
                        .map(|p| share::Setting::template(&memory, Some(*p))),
                );
                for period in periods {
                    settings.extend(
                        candidates
                            .iter()
                            .map(|mb| share::Setting::uniform(*mb, period)),
                    );
                }
                // A moto of its own: the earlier figures leave items and queues that slow it.
                let moto = Moto::start()?;
                let sdk = common::sdk_config(&moto.endpoint).await;
                let rows = share::measure(&sdk, &moto.endpoint, &memory, &settings, n).await?;
                report_share(
                    &rows,
                    candidates,
                    &periods,
                    &memory,
                    n,
                    &mut summary,
                    &mut details,
                );
                for err in rows.iter().flat_map(|r| r.errors.iter()).take(3) {
                    notes.push(format!("compute under CPU share: {err}"));
                }
            }
        }
        loads.push(format!("after 7: {}", load_average()));
    }

    // 8. Cold start under cargo-lambda's emulator.
    if options.only.contains(&8) {
        let n = options.runs(5, 2);
        progress!("figure 8: cold start under cargo lambda watch ({n} runs per binary)");
        let emulator = common::emulator(false).await?;
        let names = Names::fresh(&moto.endpoint, "watch");
        let env = coldstart::env(&moto.endpoint, &emulator, &names, "http://127.0.0.1:9").await?;
        common::wiring(&sdk, &env).await?;
        let subjects: Vec<coldstart::Subject> = coldstart::subjects()
            .into_iter()
            .filter(|s| !matches!(s.name, "python-submit" | "submit-warmed"))
            .collect();
        match watch::measure(&subjects, &env, &memory, n).await {
            Ok(figures) => {
                let hello = figures
                    .iter()
                    .find(|f| f.name == "hello-world")
                    .cloned()
                    .unwrap_or_default();
                let submit = figures
                    .iter()
                    .find(|f| f.name == "submit")
                    .cloned()
                    .unwrap_or_default();
                let _ = writeln!(
                    summary,
                    "| 8 | Init + first event under `cargo lambda watch`, submit `POST /jobs` (ms, spawn → answer) | {} | {} hello-world's {} (target ≤ 1.50×) |",
                    submit.cold.show(1),
                    ratio(submit.cold.median, hello.cold.median),
                    hello.cold.show(1),
                );
                let _ = writeln!(
                    details,
                    "\n**8. Cold start under `cargo lambda watch`** (cargo-lambda {}'s Runtime API and invoke API, `--only-lambda-apis`; the release binaries started by the benchmark against it; {n} starts each after one untimed start)\n\n\
                     | Binary | Spawn → first answer (ms) | ÷ hello-world | Second event (ms) |\n|---|---|---|---|",
                    watch::version(),
                );
                for f in &figures {
                    let _ = writeln!(
                        details,
                        "| {} | {} | {} | {} |",
                        f.name,
                        f.cold.show(1),
                        ratio(f.cold.median, hello.cold.median),
                        f.warm.show(1),
                    );
                    for err in f.errors.iter().take(3) {
                        notes.push(format!("cargo lambda watch {}: {err}", f.name));
                    }
                }
            }
            Err(err) => {
                let _ = writeln!(
                    summary,
                    "| 8 | Init + first event under `cargo lambda watch` | n/a | {err} |"
                );
            }
        }
        emulator.shutdown().await;
        loads.push(format!("after 8: {}", load_average()));
    }

    // 3. Sweeper cost, on a moto of its own (the 100,000 items stay out of the other figures).
    if options.only.contains(&3) {
        drop(moto);
        let finished = if options.quick { 10_000 } else { 100_000 };
        let n = options.runs(3, 2);
        progress!("figure 3: sweeper cost ({finished} finished jobs, 100 due, {n} sweeps)");
        let moto = Moto::start()?;
        let sdk = common::sdk_config(&moto.endpoint).await;
        let emulator = common::emulator(false).await?;
        let names = Names::fresh(&moto.endpoint, "sweep");
        let env = common::gateway_env(&moto.endpoint, &emulator, &names, "http://127.0.0.1:9");
        let wiring = common::wiring(&sdk, &env).await?;
        let f = sweeper::measure(&wiring, finished, 100, n).await?;
        emulator.shutdown().await;
        let _ = writeln!(
            summary,
            "| 3 | Sweeper: DynamoDB items read by one sweep's index Query, {} finished + {} due jobs | {} | {} items per due job |",
            f.finished,
            f.due,
            f.index_items.show(0),
            f.per_due.show(2),
        );
        let _ = writeln!(
            details,
            "\n**3. Sweeper cost** ({n} sweeps; {} finished jobs loaded with BatchWriteItem in {:.0} s; the due jobs are real RunPod jobs still queued at the emulator)\n\n\
             | What one sweep did | Count |\n|---|---|\n\
             | Jobs found due | {} |\n\
             | Items read by the sweep-index Query (`ScannedCount`) | {} |\n\
             | … per due job | {} |\n\
             | Items read in all (index + the GetItem each polled job is re-read with) | {} |\n\
             | Conditional writes (reschedules) | {} |\n\
             | Sweep time on moto (ms; moto walks every item for a GSI query, DynamoDB does not) | {} |\n\
             | A Scan would read | {} |",
            f.finished,
            f.load_secs,
            f.due_found.show(0),
            f.index_items.show(0),
            f.per_due.show(2),
            f.all_reads.show(0),
            f.writes.show(0),
            f.sweep_ms.show(0),
            f.finished + f.due + 1,
        );
        for err in f.errors.iter().take(3) {
            notes.push(format!("sweeper: {err}"));
        }
        loads.push(format!("after 3: {}", load_average()));
    }

    let _ = writeln!(
        out,
        "## Gateway benchmark{}\n\n\
         Machine: {}. Load average (1, 5, 15 min): {}. Release build. Total time {:.0} s.\n\n\
         | # | Figure | Median (min–max) | Ratio / baseline |\n|---|---|---|---|\n{summary}{details}",
        if options.quick { " (--quick)" } else { "" },
        machine(),
        loads.join("; "),
        started.elapsed().as_secs_f64(),
    );
    if !notes.is_empty() {
        let _ = writeln!(out, "\nProblems during the run:\n");
        for note in &notes {
            let _ = writeln!(out, "- {note}");
        }
    }
    print!("{out}");
    Ok(())
}

/// Figure 7's rows: the headline at the template's sizes, each setting's steps, and the size
/// each function bills least at. `settings` are: the template's sizes at full CPU, then under the
/// share for each of `periods`, then every candidate size for each of `periods`.
fn report_share(
    rows: &[share::Row],
    candidates: &[u32],
    periods: &[u64],
    memory: &template::MemorySizes,
    n: usize,
    summary: &mut String,
    details: &mut String,
) {
    let Some(full) = rows.first() else {
        return;
    };
    let period_ms = |p: &u64| p / 1000;
    for (i, period) in periods.iter().enumerate() {
        let Some(shared) = rows.get(1 + i) else {
            continue;
        };
        let cpu_ms: f64 = shared.step_cpu_ms.iter().map(|s| s.median).sum();
        let _ = writeln!(
            summary,
            "| 7 | Compute per job in the function binaries at the template's sizes, CPU share enforced per {} ms (GB-s) · time in the functions (ms) · of which on CPU (ms) | {} · {} · {cpu_ms:.1} | {} of the same at full CPU ({} GB-s); target ≤ 0.025 GB-s |",
            period_ms(period),
            shared.gb_s.show(4),
            shared.total_ms.show(1),
            ratio(shared.gb_s.median, full.gb_s.median),
            full.gb_s.show(4),
        );
    }
    let steps: Vec<String> = share::STEPS
        .iter()
        .map(|(step, function)| format!("{step} ({function})"))
        .collect();
    let _ = writeln!(
        details,
        "\n**7. Compute per job in the function binaries under Lambda's CPU share** ({n} restore jobs at 0.25 MP per setting, one at a time, after one untimed job; one warm instance per function; after init each instance is held by a cgroup to `memory ÷ 1,769 MB` of one core, enforced per 100 ms (the kernel's default) or per 20 ms (Lambda's period is not published); duration = event handed out → `/response`, as Lambda bills; CPU = the process's own, from schedstat; moto and the emulator run outside the quota; medians, ms (CPU ms))\n\n\
         | Setting | {} | Per job (ms) | GB-s per job |\n|---|{}---|---|",
        steps.join(" | "),
        "---|".repeat(steps.len()),
    );
    for row in rows {
        let cells: Vec<String> = row
            .step_ms
            .iter()
            .zip(&row.step_cpu_ms)
            .map(|(t, c)| format!("{:.1} ({:.1})", t.median, c.median))
            .collect();
        let cells = if cells.is_empty() {
            vec!["n/a".to_string(); steps.len()]
        } else {
            cells
        };
        let _ = writeln!(
            details,
            "| {} | {} | {} | {} |",
            row.setting,
            cells.join(" | "),
            row.total_ms.show(1),
            row.gb_s.show(4),
        );
    }

    // Each function's GB-s per job at each candidate size and period, and the least.
    let _ = writeln!(
        details,
        "\n**7a. GB-s per job by function and memory size** (under the share, enforced per 100 ms · per 20 ms; each function's steps summed; the least is taken at the stricter 20 ms; peak RSS of its instance in the jobs above: {})\n\n\
         | Function | {} | Least | Template |\n|---|{}---|---|",
        share::FUNCTIONS
            .iter()
            .enumerate()
            .map(|(i, f)| format!(
                "{f} {:.0} MB",
                rows.iter()
                    .filter_map(|r| r.peak_rss_mb.get(i))
                    .fold(0.0f64, |a, b| a.max(*b))
            ))
            .collect::<Vec<_>>()
            .join(", "),
        candidates
            .iter()
            .map(|mb| format!("{mb} MB"))
            .collect::<Vec<_>>()
            .join(" | "),
        "---|".repeat(candidates.len()),
    );
    let first_candidate = 1 + periods.len();
    let row_of = |p: usize, c: usize| rows.get(first_candidate + p * candidates.len() + c);
    for function in share::FUNCTIONS {
        let cost = |row: &share::Row| -> Option<f64> {
            let mut gbs = 0.0;
            for (i, (_, f)) in share::STEPS.iter().enumerate() {
                if *f == function {
                    let g = row.step_gb_s.get(i).filter(|g| g.n > 0)?;
                    gbs += g.median;
                }
            }
            Some(gbs)
        };
        let cells: Vec<String> = (0..candidates.len())
            .map(|c| {
                (0..periods.len())
                    .map(|p| {
                        row_of(p, c)
                            .and_then(cost)
                            .map_or("n/a".into(), |g| format!("{g:.5}"))
                    })
                    .collect::<Vec<_>>()
                    .join(" · ")
            })
            .collect();
        let strict = periods.len() - 1;
        let least = candidates
            .iter()
            .enumerate()
            .filter_map(|(c, mb)| row_of(strict, c).and_then(cost).map(|g| (*mb, g)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map_or("n/a".into(), |(mb, _)| format!("{mb} MB"));
        let _ = writeln!(
            details,
            "| {function} | {} | {least} | {} MB |",
            cells.join(" | "),
            memory.of(function),
        );
    }
}
