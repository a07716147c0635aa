//! Chaos: hundreds of jobs through the whole local stack (moto, the RunPod emulator, the local
//! runner) while everything around the gateway misbehaves at random, under one seed:
//!
//! - RunPod (the emulator's `ChaosConfig`): `/run` answers 429 or 5xx; `/status` and `/cancel`
//!   answer 5xx; workers fail or hang until TIMED_OUT; jobs are deleted by their TTL (404);
//!   results expire early; webhooks are lost, duplicated in parallel, delayed past the sweeper,
//!   sent empty, or followed by a stale out-of-order report; the volume's S3 API answers 502,
//!   is slow, or cuts reads short;
//! - AWS (a seeded fault proxy in front of each moto process, `CHAOS_AWS_FAULTS`): DynamoDB
//!   `ThrottlingException` / `ProvisionedThroughputExceededException`, S3 `SlowDown`, SQS
//!   `RequestThrottled`, 500/503 in each service's wire format, slow answers, dropped
//!   connections, and writes that committed but whose answer was lost; only the gateway's own
//!   calls go through it, while jobs are in flight;
//! - the pod backend (a share of the jobs, `CHAOS_POD_SHARE`, 0.2, run on the ComfyUI emulator):
//!   the server restarts (its queue, running prompt and history lost), executions fail, answers
//!   slow down; a pod job's end and outputs are checked against the emulator's own record of
//!   its prompt (`ComfyEmulator::ended`), and no prompt may be left queued nor any file of a
//!   job left in ComfyUI's folders;
//! - the client and AWS (this test): cancels at random moments, duplicate SQS messages,
//!   unparseable (poison) messages, dispatch and finalize invocations killed midway, as a
//!   Lambda timing out mid-copy would be (its work stops at an await; its lease stays), and
//!   a webhook's finalize, the sweeper's finalize and a sweep started at the same moment once
//!   RunPod completes a job (the race a fast machine otherwise rarely lines up).
//!
//! Then every job is checked: terminal, and never kept past its deadline; in the state RunPod's
//! own record of it calls for; history strictly forward with exactly one terminal entry;
//! failures coded; outputs all in the results bucket, byte-identical to the files the worker
//! wrote, and nothing else there; nothing in flight anywhere; nothing changed after the end;
//! the DLQ holding exactly the poison messages. A table of the run is printed; any violation
//! fails the test.
//!
//! **Independent of the machine's speed.** Before the run, a fault-free stack is measured
//! ([`Pace`]): how long one job takes end to end, and how many jobs a second it finishes when
//! loaded. Jobs are then submitted at a fixed share of that capacity (`CHAOS_LOAD`, 0.5), and
//! the deadlines, leases and timeouts are sized from the measured latency ([`Timings`]), so a
//! machine several times slower runs the same jobs more slowly, not into their deadlines.
//! What proves correctness is kept apart from what measures speed:
//! - a job the gateway timed out at its deadline is a correct outcome when the deadline had
//!   really passed and RunPod had not finished it early enough for the gateway to notice; it is
//!   a violation when RunPod had, or when the gateway kept any job past its deadline;
//! - a bug that stalls jobs still fails the run: at least a floor of the jobs must succeed,
//!   80 % of the share the fault rates leave (a stalled job times out instead);
//! - time to terminal is printed, never judged.
//!
//! CI runs 300 jobs. A longer run, or a replay of a failure (the seed is printed):
//!
//! ```sh
//! CHAOS_JOBS=3000 CHAOS_SEED=1234 cargo test -p gateway-tests --test chaos -- --nocapture
//! ```
//!
//! Jobs go through in waves of `CHAOS_WAVE` (300), each on a fresh stack: moto answers index
//! queries by scanning the whole table, so a single table of thousands of jobs would make moto,
//! not the gateway, the bottleneck. The run has moto processes of its own (one per service), and
//! prints the CPU each used: the cost of each service to the local stack.
//!
//! Replays: the emulator keys each job's faults by its index (put in the job's `seed`
//! parameter), and this test draws its own actions per index, so the same seed hits the same
//! jobs with the same faults. Thread timing still decides which S3 and status requests get
//! their faults, where a killed invocation stops, and how the gateway's work interleaves.
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_proxy::{FaultCounts, FaultPlan};
use gateway::app::dispatch::Dispatcher;
use gateway::app::finalize::Finalizer;
use gateway::app::observe::Observer;
use gateway::app::sweeper::Sweeper;
use gateway::domain::job::{Actor, BackendKind, ErrorCode, Job, JobState};
use gateway::ports::RunPodStatus;
use gateway_tests::{jpeg, restore_request, LocalAws, Stack, StackOptions, StatusCode, ALICE};
use rand::{Rng, SeedableRng};
use runpod_emulator::{ChaosConfig, EmulatorConfig, Faults, JobStatus};
use serde_json::json;
use testkit::local_aws::read_object;

/// The AWS-side faults of a wave (`CHAOS_AWS_FAULTS` overrides the rates; see aws-proxy's
/// text form). Each attempt of an AWS call meets one with this chance; the SDK retries (3
/// attempts), so the gateway itself sees a few of them through, and every lost answer.
const AWS_FAULTS: &str = "throttle=0.03,5xx=0.02,slow=0.02,slow_by=200ms,drop=0.01,lost=0.01";

fn aws_faults(seed: u64) -> FaultPlan {
    let rates = std::env::var("CHAOS_AWS_FAULTS").unwrap_or_else(|_| AWS_FAULTS.to_string());
    FaultPlan::parse(&format!("seed={seed},{rates}"))
        .unwrap_or_else(|e| panic!("CHAOS_AWS_FAULTS: {e}"))
}

/// Tries of one submit that keeps being answered 503.
const SUBMIT_TRIES: u32 = 5;

/// Unparseable dispatch messages: each must end in the DLQ, and nothing else may.
const POISON: [&str; 3] = [
    "not json at all",
    r#"{"job_id": 42}"#,
    r#"{"jobId": "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"}"#,
];
/// The share of the measured capacity the run submits at.
const LOAD: f64 = 0.5;
/// The share of the fault rates' expected successes that must succeed (the stall floor).
const FLOOR_SHARE: f64 = 0.8;
/// Jobs run one after another to measure the latency, and at once to measure the capacity.
const CALIBRATION_SERIAL: usize = 4;
const CALIBRATION_BURST: usize = 30;
/// Receives before a message goes to the DLQ (the runner's queue, like the template's).
const MAX_RECEIVES: u64 = local_runner::resources::MAX_RECEIVES as u64;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn chaos_config(seed: u64) -> ChaosConfig {
    ChaosConfig {
        seed,
        // Each job's `seed` parameter is its index: the key of its faults.
        job_key_pointer: Some("/workflow_api/3/inputs/seed".into()),
        p_run_429: 0.08,
        p_run_5xx: 0.04,
        // Set per wave to outlast the gateway's request timeout (`Timings::request_timeout`).
        p_run_answer_lost: 0.04,
        run_answer_hang_ms: 0,
        p_api_5xx: 0.03,
        p_api_slow: 0.05,
        api_slow_ms: 200,
        p_worker_failed: 0.05,
        p_worker_timed_out: 0.03,
        worker_delay_min_ms: 20,
        worker_delay_max_ms: 300,
        p_ttl_delete: 0.03,
        ttl_delete_min_ms: 200,
        ttl_delete_max_ms: 1_500,
        p_result_expiry: 0.10,
        result_expiry_ms: 400,
        p_webhook_lost: 0.10,
        p_webhook_duplicate: 0.10,
        p_webhook_delayed: 0.08,
        webhook_delay_ms: 2_500,
        p_webhook_empty: 0.05,
        p_webhook_out_of_order: 0.05,
        p_s3_502: 0.05,
        p_s3_slow: 0.05,
        s3_slow_ms: 300,
        p_s3_truncated: 0.03,
    }
}

fn emulator_config(config: &mut EmulatorConfig) {
    config.worker_concurrency = 6;
    config.min_execution_timeout = Duration::from_secs(1);
    config.webhook_retry_delay = Duration::from_millis(200);
    config.webhook_timeout = Duration::from_secs(5);
}

/// What a fault-free stack on this machine was measured to do, just before the run.
#[derive(Debug, Clone, Copy)]
struct Pace {
    /// One job alone, submit to terminal: the slowest of a few.
    latency: Duration,
    /// Jobs finished per second with many in flight at once.
    capacity: f64,
    /// Between two submissions of the run: `1 / (LOAD × capacity)`.
    interval: Duration,
}

/// Deadlines, leases and timeouts for the run, sized from the measured latency: each is the
/// gateway's usual setting for a fast machine, or a multiple of the latency where that is
/// longer, so nothing expires only because every step of this machine is slow.
#[derive(Debug, Clone)]
struct Timings {
    deadline: Duration,
    /// How long the gateway may take to notice what it could not have known sooner: a finalize
    /// lease left by a killed invocation, a poll's retry budget, the poll interval, two sweeps.
    slack: Duration,
    execution_timeout: Duration,
    requeue_after: Duration,
    dispatch_lease: Duration,
    finalize_lease: Duration,
    request_timeout: Duration,
    retry_budget: Duration,
    /// How long a job whose `/run` answer was lost waits for its run to announce itself.
    run_outcome_grace: Duration,
    queue_visibility: Duration,
    sweep_every: Duration,
    /// How long finalize may keep trying after RunPod confirmed a run completed.
    finalize_give_up: Duration,
    poll_interval: Duration,
}

impl Timings {
    fn from_pace(pace: &Pace) -> Self {
        let unit = pace.latency;
        // Whole seconds: that is what the gateway's variables take.
        let at_least = |secs: u64, units: u32| {
            Duration::from_secs(secs.max((unit * units).as_secs_f64().ceil() as u64))
        };
        let sweep_every = Duration::from_millis(300);
        let poll_interval = Duration::from_secs(1);
        let mut timings = Self {
            deadline: Duration::ZERO,
            slack: Duration::ZERO,
            execution_timeout: at_least(2, 2),
            requeue_after: at_least(10, 10),
            dispatch_lease: at_least(6, 6),
            finalize_lease: at_least(4, 4),
            request_timeout: at_least(2, 2),
            retry_budget: at_least(5, 5),
            run_outcome_grace: at_least(3, 3),
            queue_visibility: at_least(3, 3),
            sweep_every,
            finalize_give_up: Duration::ZERO,
            poll_interval,
        };
        let webhook_delay = Duration::from_millis(chaos_config(0).webhook_delay_ms);
        timings.slack = timings.finalize_lease
            + timings.retry_budget
            + poll_interval
            + sweep_every * 2
            + unit * 4;
        // The longest path a job may rightly take: stuck behind a killed dispatch's lease until
        // the sweeper re-enqueues it, /run retried to its budget, the worker's whole execution
        // timeout, a delayed webhook, a killed finalize's lease, one more poll. Twice that, and
        // ten jobs' worth of this machine's latency besides.
        let longest = timings.requeue_after
            + timings.dispatch_lease
            + timings.request_timeout
            + timings.run_outcome_grace
            + timings.retry_budget
            + timings.execution_timeout
            + webhook_delay
            + timings.finalize_lease
            + poll_interval
            + sweep_every * 2;
        timings.deadline =
            Duration::from_secs((longest * 2 + unit * 10).as_secs_f64().ceil() as u64);
        timings.finalize_give_up = timings.deadline;
        timings
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let secs = |d: Duration| d.as_secs().to_string();
        vec![
            ("JOB_DEADLINE_SECS", secs(self.deadline)),
            ("JOB_EXECUTION_TIMEOUT_SECS", secs(self.execution_timeout)),
            ("JOB_REQUEUE_AFTER_SECS", secs(self.requeue_after)),
            ("DISPATCH_LEASE_SECS", secs(self.dispatch_lease)),
            ("FINALIZE_LEASE_SECS", secs(self.finalize_lease)),
            ("RUNPOD_REQUEST_TIMEOUT_SECS", secs(self.request_timeout)),
            ("RUNPOD_RETRY_BUDGET_SECS", secs(self.retry_budget)),
            ("RUN_OUTCOME_GRACE_SECS", secs(self.run_outcome_grace)),
            ("STATUS_POLL_INTERVAL_SECS", secs(self.poll_interval)),
            ("FINALIZE_GIVE_UP_SECS", secs(self.finalize_give_up)),
        ]
    }

    fn stack_options(&self, faults: Faults, aws: &Arc<LocalAws>) -> StackOptions {
        StackOptions {
            faults,
            sweep_every: self.sweep_every,
            configure_emulator: emulator_config,
            queue_visibility_secs: self.queue_visibility.as_secs() as u32,
            extra_env: self.env(),
            aws: Some(aws.clone()),
            ..StackOptions::default()
        }
    }
}

/// The share of jobs the fault rates let succeed: neither failed nor timed out by the worker,
/// deleted by their TTL, nor cancelled by the client.
fn expected_success_share() -> f64 {
    let chaos = chaos_config(0);
    let plan = plan_probabilities();
    // Half the raced finalizes come with a cancel.
    (1.0 - chaos.p_worker_failed)
        * (1.0 - chaos.p_worker_timed_out)
        * (1.0 - chaos.p_ttl_delete)
        * (1.0 - plan.cancel)
        * (1.0 - plan.race_finalizers / 2.0)
}

/// Measures a fault-free stack with the run's own settings: a few jobs one after another for
/// the latency, then a burst for the capacity. Times come from the jobs' own records.
async fn measure_pace(aws: &Arc<LocalAws>) -> Pace {
    // The settings the run would use on a fast machine; the latency decides the rest.
    let nominal = Timings::from_pace(&Pace {
        latency: Duration::ZERO,
        capacity: 1.0,
        interval: Duration::ZERO,
    });
    let stack = Stack::start_with(nominal.stack_options(Faults::default(), aws)).await;
    let image = jpeg(64, 48);
    let took = |job: &Job| {
        Duration::from_millis(
            (job.timestamps.finished_at.unwrap_or(i64::MAX) - job.timestamps.created_at).max(0)
                as u64,
        )
    };
    let mut latency = Duration::ZERO;
    // The first job pays for connections and first-time work; it is not measured.
    for i in 0..=CALIBRATION_SERIAL {
        let id = stack
            .submit_restore(
                ALICE,
                &image,
                json!({"megapixels": 0.01, "seed": 1_000_000 + i}),
            )
            .await;
        stack.wait_terminal(ALICE, &id, nominal.deadline).await;
        if i > 0 {
            latency = latency.max(took(&stack.stored_job(&id).await));
        }
    }
    let started = now_ms();
    let ids: Vec<String> = futures::future::join_all((0..CALIBRATION_BURST).map(|i| {
        let stack = &stack;
        let image = &image;
        async move {
            stack
                .submit_restore(
                    ALICE,
                    image,
                    json!({"megapixels": 0.01, "seed": 2_000_000 + i}),
                )
                .await
        }
    }))
    .await;
    let mut last = started;
    for id in &ids {
        stack.wait_terminal(ALICE, id, nominal.deadline).await;
        let job = stack.stored_job(id).await;
        assert_eq!(
            job.state,
            JobState::Succeeded,
            "calibration job {id} failed: {job:?}"
        );
        last = last.max(job.timestamps.finished_at.unwrap_or(last));
    }
    stack.stop().await;
    let burst = Duration::from_millis((last - started).max(1) as u64);
    let capacity = CALIBRATION_BURST as f64 / burst.as_secs_f64();
    let load: f64 = env_or("CHAOS_LOAD", LOAD);
    Pace {
        latency,
        capacity,
        interval: Duration::from_secs_f64(1.0 / (load * capacity)),
    }
}

fn now_ms() -> i64 {
    gateway::ports::Clock::now_ms(&gateway::ports::SystemClock)
}

/// What the client side does to one job, drawn from the seed and the job's index.
#[derive(Debug, Default, Clone)]
struct Plan {
    cancel_after: Option<Duration>,
    duplicate_after: Option<Duration>,
    kill_dispatch_after: Option<Duration>,
    kill_finalize_after: Option<Duration>,
    /// Once RunPod completes the job: a webhook's finalize, the sweeper's finalize and a sweep,
    /// all at once and from the same copy of the job; `Some(true)`: a client's cancel lands
    /// after that copy was read and before they start.
    race_finalizers: Option<bool>,
    /// Runs on the pod backend (the ComfyUI emulator), not on serverless.
    pod: bool,
}

/// How often the client side does each thing to a job.
struct PlanProbabilities {
    cancel: f64,
    duplicate: f64,
    kill_dispatch: f64,
    kill_finalize: f64,
    race_finalizers: f64,
    pod: f64,
}

fn plan_probabilities() -> PlanProbabilities {
    PlanProbabilities {
        cancel: 0.08,
        duplicate: 0.10,
        kill_dispatch: 0.03,
        kill_finalize: 0.03,
        race_finalizers: 0.10,
        pod: env_or("CHAOS_POD_SHARE", 0.2),
    }
}

fn plan(seed: u64, index: usize) -> Plan {
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
    );
    let mut maybe = |p: f64, min_ms: u64, max_ms: u64| {
        let hit = rng.random_bool(p);
        let after = Duration::from_millis(rng.random_range(min_ms..=max_ms));
        hit.then_some(after)
    };
    let p = plan_probabilities();
    Plan {
        cancel_after: maybe(p.cancel, 0, 3_000),
        duplicate_after: maybe(p.duplicate, 0, 2_000),
        kill_dispatch_after: maybe(p.kill_dispatch, 2, 120),
        kill_finalize_after: maybe(p.kill_finalize, 1, 40),
        race_finalizers: maybe(p.race_finalizers, 0, 1).map(|d| d.as_millis() == 1),
        // Drawn last, so that the draws above are what they were before pod jobs existed.
        pod: maybe(p.pod, 0, 0).is_some(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancel {
    Accepted,
    AlreadyFinished,
    Unavailable,
}

#[derive(Debug, Default, Clone)]
struct Driven {
    id: Option<String>,
    submit_error: Option<String>,
    /// Submits answered 503 and sent again with the same Idempotency-Key.
    submit_retries: u32,
    cancel: Option<Cancel>,
    duplicates: u32,
    killed_dispatch: bool,
    killed_finalize: bool,
    raced_finalizers: bool,
}

struct World {
    stack: Stack,
    dispatcher: Dispatcher,
    observer: Observer,
    finalizer: Finalizer,
    sweeper: Sweeper,
    timings: Timings,
}

/// Submits job `index` and does to it what its plan says.
async fn drive(world: Arc<World>, index: usize, image: Arc<Vec<u8>>, plan: Plan) -> Driven {
    let stack = &world.stack;
    let mut driven = Driven::default();
    let mut request = restore_request(&image, json!({"megapixels": 0.01, "seed": index}));
    if plan.pod {
        request["backend"] = json!("pod");
    }
    // As a careful client does: a 503 (the job store throttled past the SDK's retries) is
    // retried with the same Idempotency-Key, so it never makes two jobs.
    let key = format!("chaos-{index}");
    let mut tries = 0;
    let (status, body) = loop {
        tries += 1;
        let response = stack
            .http
            .post(stack.url("/jobs"))
            .bearer_auth(ALICE)
            .header("Idempotency-Key", &key)
            .json(&request)
            .send()
            .await
            .expect("the gateway answers");
        let status = response.status();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        if status != StatusCode::SERVICE_UNAVAILABLE || tries == SUBMIT_TRIES {
            break (status, body);
        }
        driven.submit_retries += 1;
        tokio::time::sleep(Duration::from_millis(100 * tries as u64)).await;
    };
    if status != StatusCode::ACCEPTED {
        driven.submit_error = Some(format!("{status} {body}"));
        return driven;
    }
    let id = body["job_id"].as_str().unwrap().to_string();
    driven.id = Some(id.clone());

    let kill_dispatch = async {
        let after = plan.kill_dispatch_after?;
        // A dispatch invocation racing the runner's, cut off at its deadline like a Lambda
        // timing out: wherever it stopped (lease taken, input half copied, /run sent), it stays.
        let cut = tokio::time::timeout(after, world.dispatcher.dispatch(&id)).await;
        Some(cut.is_err())
    };
    let kill_finalize = async {
        let after = plan.kill_finalize_after?;
        let (job, status) = wait_runpod_completed(stack, &id, world.timings.deadline).await?;
        // A webhook hands the run over, and a finalize invocation takes it up and is cut off
        // like a Lambda timing out, wherever it stopped (lease taken, outputs half copied).
        let _ = world
            .observer
            .observe_as(job, &status, Actor::Webhook)
            .await;
        let cut = tokio::time::timeout(after, world.finalizer.finalize(&id, None)).await;
        Some(cut.is_err())
    };
    let race_finalizers = async {
        let with_cancel = plan.race_finalizers?;
        let (job, status) = wait_runpod_completed(stack, &id, world.timings.deadline).await?;
        // With a cancel, it lands between the finalizers' read of the job and their first
        // write: they act on a stale copy, which every write must notice. (Started together,
        // the in-process finalizers nearly always wrote before the HTTP cancel arrived.)
        let cancelled = if with_cancel {
            let path = format!("/jobs/{id}/cancel");
            Some(match stack.post_json(ALICE, &path, &json!({})).await.0 {
                StatusCode::OK => Cancel::Accepted,
                StatusCode::CONFLICT => Cancel::AlreadyFinished,
                _ => Cancel::Unavailable,
            })
        } else {
            None
        };
        // Their outcomes are judged by the job's end, like every other action's.
        let _ = tokio::join!(
            world
                .observer
                .observe_as(job.clone(), &status, Actor::Webhook),
            world.observer.observe_as(job, &status, Actor::Sweeper),
            world.finalizer.finalize(&id, None),
            world.finalizer.finalize(&id, None),
            world.sweeper.sweep(),
        );
        Some(cancelled)
    };
    let cancel = async {
        let after = plan.cancel_after?;
        tokio::time::sleep(after).await;
        let mut outcome = Cancel::Unavailable;
        for _ in 0..3 {
            let (status, _) = stack
                .post_json(ALICE, &format!("/jobs/{id}/cancel"), &json!({}))
                .await;
            outcome = match status {
                StatusCode::OK => Cancel::Accepted,
                StatusCode::CONFLICT => Cancel::AlreadyFinished,
                _ => Cancel::Unavailable,
            };
            if outcome != Cancel::Unavailable {
                break;
            }
        }
        Some(outcome)
    };
    let duplicate = async {
        let after = plan.duplicate_after?;
        tokio::time::sleep(after).await;
        stack
            .sqs()
            .send_message()
            .queue_url(&stack.queue_url)
            .message_body(json!({ "job_id": id }).to_string())
            .send()
            .await
            .ok()
            .map(|_| 1)
    };
    let (killed_dispatch, killed_finalize, raced, cancel, duplicates) = tokio::join!(
        kill_dispatch,
        kill_finalize,
        race_finalizers,
        cancel,
        duplicate
    );
    driven.killed_dispatch = killed_dispatch == Some(true);
    driven.killed_finalize = killed_finalize == Some(true);
    driven.raced_finalizers = raced.is_some();
    // Both cancels are the client's: the one the gateway accepted decides the expected end.
    let raced_cancel = raced.flatten();
    driven.cancel = match (cancel, raced_cancel) {
        (Some(Cancel::Accepted), _) | (_, Some(Cancel::Accepted)) => Some(Cancel::Accepted),
        (Some(c), _) | (None, Some(c)) => Some(c),
        (None, None) => None,
    };
    driven.duplicates = duplicates.unwrap_or(0);
    driven
}

/// The job and RunPod's COMPLETED report, once RunPod has completed it and the gateway has not
/// finished it yet; `None` if that moment never comes.
async fn wait_runpod_completed(
    stack: &Stack,
    id: &str,
    limit: Duration,
) -> Option<(Job, RunPodStatus)> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let job = stack.stored_job(id).await;
        if job.is_terminal() {
            return None;
        }
        if let Some(runpod_id) = &job.runpod_job_id {
            match stack.emulator.job(runpod_id) {
                Some(snapshot) if snapshot.status == JobStatus::Completed => {
                    let status = serde_json::from_value(snapshot.status_body()).ok()?;
                    return Some((job, status));
                }
                Some(snapshot) if snapshot.status.is_terminal() => return None,
                None => return None,
                _ => {}
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    None
}

/// Every job record in the table, by id (the test may scan; the gateway never does).
async fn all_jobs(stack: &Stack, ids: &[String]) -> HashMap<String, Job> {
    let mut jobs = HashMap::new();
    for chunk in ids.chunks(16) {
        let read = futures::future::join_all(chunk.iter().map(|id| async move {
            use gateway::ports::JobStore;
            let store = gateway_aws::adapters::dynamodb::DynamoJobStore::new(
                stack.dynamodb(),
                &stack.table,
            );
            (id, store.get(id).await.unwrap())
        }))
        .await;
        for (_, job) in read {
            // A missing one is reported by the check that looks for it.
            if let Some(job) = job {
                jobs.insert(job.id.clone(), job);
            }
        }
    }
    jobs
}

/// How many of `ids` are not terminal yet: one paginated scan of the states.
async fn open_jobs(stack: &Stack, ids: &HashSet<String>) -> usize {
    let mut open = 0;
    let mut start = None;
    loop {
        let out = stack
            .dynamodb()
            .scan()
            .table_name(&stack.table)
            .projection_expression("pk, #s")
            .expression_attribute_names("#s", "state")
            .set_exclusive_start_key(start)
            .send()
            .await
            .unwrap();
        for item in out.items() {
            let id = item.get("pk").and_then(|v| v.as_s().ok());
            let state = item
                .get("state")
                .and_then(|v| v.as_s().ok())
                .and_then(|s| JobState::parse(s));
            if id.is_some_and(|id| ids.contains(id)) && !state.is_some_and(JobState::is_terminal) {
                open += 1;
            }
        }
        start = out.last_evaluated_key().cloned();
        if start.is_none() {
            return open;
        }
    }
}

async fn all_keys(stack: &Stack, bucket: &str, prefix: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let out = stack
            .s3()
            .list_objects_v2()
            .bucket(bucket)
            .prefix(prefix)
            .set_continuation_token(token)
            .send()
            .await
            .unwrap();
        keys.extend(
            out.contents()
                .iter()
                .filter_map(|o| o.key().map(str::to_string)),
        );
        token = out.next_continuation_token().map(str::to_string);
        if token.is_none() {
            return keys;
        }
    }
}

async fn drain(stack: &Stack, queue_url: &str) -> Vec<String> {
    let mut bodies = Vec::new();
    loop {
        let out = stack
            .sqs()
            .receive_message()
            .queue_url(queue_url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .visibility_timeout(60)
            .send()
            .await
            .unwrap();
        let messages = out.messages();
        if messages.is_empty() {
            return bodies;
        }
        bodies.extend(messages.iter().filter_map(|m| m.body().map(str::to_string)));
    }
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((sorted.len() as f64) * p).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The terminal outcome RunPod's own record of a job calls for, if it calls for one.
fn expected_from_runpod(status: JobStatus) -> Option<(JobState, ErrorCode)> {
    match status {
        JobStatus::Completed => Some((JobState::Succeeded, ErrorCode::WorkerFailed)),
        JobStatus::Failed => Some((JobState::Failed, ErrorCode::WorkerFailed)),
        JobStatus::TimedOut => Some((JobState::TimedOut, ErrorCode::ExecutionTimedOut)),
        _ => None,
    }
}

/// Checks one terminal job against its history, RunPod's record and the stored outputs.
#[allow(clippy::too_many_arguments)]
fn check_job(
    stack: &Stack,
    job: &Job,
    driven: &Driven,
    results: &HashMap<String, Vec<u8>>,
    slack: Duration,
    give_up: Duration,
    pod_restarts: &[u64],
    violations: &mut Vec<String>,
) {
    let slack_ms = slack.as_millis() as i64;
    let give_up_ms = give_up.as_millis() as i64;
    let id = &job.id;
    let mut violation = |message: String| violations.push(format!("job {id}: {message}"));
    if !job.is_terminal() {
        violation(format!("not terminal: {}", job.state));
        return;
    }
    // Never kept past its deadline: the sweeper enforces it within a sweep, or once a lease
    // left by a killed invocation runs out. A run RunPod confirmed completed before that is
    // handed to finalize, which has until FINALIZE_GIVE_UP_SECS after the hand-off instead.
    let finished = job.timestamps.finished_at.unwrap_or(i64::MAX);
    let handed = job.handoff.as_ref().map(|h| h.at);
    let (limit, from) = match handed {
        Some(at) if at <= job.deadline_at + slack_ms => (at + give_up_ms + slack_ms, "hand-off"),
        _ => (job.deadline_at + slack_ms, "deadline"),
    };
    if finished > limit {
        violation(format!(
            "kept {} ms past its {from}'s limit",
            finished - limit
        ));
    }
    if let Some(at) = handed.filter(|at| *at > job.deadline_at + slack_ms) {
        violation(format!(
            "handed off {} ms past its deadline",
            at - job.deadline_at
        ));
    }
    // Cleaned up, it is due again only when its retention ends (to purge its data).
    if job.lease.is_some() || job.next_check_at != Some(job.retained_until()) {
        violation("terminal but still leased, or due before its retention ends".into());
    }

    // History: strictly forward, exactly one terminal entry, the last, matching the state.
    let history = &job.history;
    let forward = history
        .first()
        .is_some_and(|e| e.from.is_none() && e.to == JobState::Queued)
        && history.windows(2).all(|w| {
            w[1].from == Some(w[0].to) && rank(w[1].to) > rank(w[0].to) && w[1].at >= w[0].at
        });
    let terminal_entries = history.iter().filter(|e| e.to.is_terminal()).count();
    if !forward || terminal_entries != 1 || history.last().map(|e| e.to) != Some(job.state) {
        violation(format!(
            "history not strictly forward to one end: {history:?}"
        ));
    }

    // A coded cause on every unsuccessful end.
    if job.state != JobState::Succeeded {
        match &job.error {
            Some(error) if !error.message.is_empty() => {}
            other => violation(format!("{} without a coded cause: {other:?}", job.state)),
        }
    } else if job.error.is_some() {
        violation("succeeded with an error".into());
    }
    let code = job.error.as_ref().map(|e| e.code);
    if job.backend == BackendKind::Pod {
        check_pod_job(
            stack,
            job,
            driven,
            code,
            results,
            slack_ms,
            pod_restarts,
            &mut violation,
        );
        return;
    }

    // The right end, given what the client did and what RunPod recorded.
    let runpod = job.runpod_job_id.as_deref();
    let ended = runpod.and_then(|rp| stack.emulator.ended_job(rp));
    let removed = runpod.and_then(|rp| stack.emulator.removal(rp));
    let ended_at = runpod.and_then(|rp| stack.emulator.ended_at_ms(rp));
    match (driven.cancel, job.state, code) {
        _ if client_cancel_decides(driven, job.state, code, &mut violation) => {}
        (_, JobState::Failed, Some(ErrorCode::DispatchAttemptsExhausted)) => {
            if runpod.is_some() {
                violation("dispatch exhausted although RunPod has the job".into());
            }
        }
        (_, JobState::Failed, Some(ErrorCode::RunpodJobExpired)) => {
            if removed.is_none() {
                violation("failed as expired, but RunPod still has the job".into());
            }
        }
        // A correct outcome when the deadline really passed, unless RunPod had finished the
        // job early enough that the gateway should have noticed (a stuck job).
        (_, JobState::TimedOut, Some(ErrorCode::DeadlineExceeded)) => {
            if finished < job.deadline_at {
                violation(format!(
                    "timed out {} ms before its deadline",
                    job.deadline_at - finished
                ));
            }
            let runpod_end = ended.as_ref().map(|e| e.status);
            if let (Some(status), Some(at)) = (runpod_end, ended_at) {
                let early = job.deadline_at - at as i64;
                if status != JobStatus::Cancelled && early > slack_ms {
                    violation(format!(
                        "timed out at its deadline, but RunPod had ended it {status} {early} ms \
                         before (more than the {slack_ms} ms the gateway may need to notice); \
                         error {:?}, hand-off {:?}, history {:?}",
                        job.error, job.handoff, job.history
                    ));
                }
            }
        }
        (_, state, code) => match ended.as_ref().and_then(|e| expected_from_runpod(e.status)) {
            Some((JobState::Succeeded, _)) if state == JobState::Succeeded => {}
            Some((want, want_code)) if want == state && code == Some(want_code) => {}
            _ => violation(format!(
                "ended {state} ({code:?}) but RunPod recorded {:?}",
                ended.as_ref().map(|e| e.status)
            )),
        },
    }

    // Outputs: every file the worker named, byte for byte, and nothing for any other end.
    if job.state == JobState::Succeeded {
        let files: Vec<String> = ended
            .as_ref()
            .and_then(|e| e.output.as_ref())
            .and_then(|o| o["files"].as_array())
            .map(|files| {
                files
                    .iter()
                    .filter_map(|f| f.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        if files.is_empty() || files.len() != job.outputs.len() {
            violation(format!(
                "{} outputs stored for {} files the worker wrote",
                job.outputs.len(),
                files.len()
            ));
        }
        for file in &files {
            let key = file.trim_start_matches("/runpod-volume/");
            let name = key.rsplit('/').next().unwrap_or_default();
            let written = stack.emulator.worker_wrote(key).unwrap_or_default();
            let Some(output) = job.outputs.iter().find(|o| o.file_name == name) else {
                violation(format!("{name} is missing from the job's outputs"));
                continue;
            };
            match results.get(&output.key) {
                Some(stored) if *stored == written && output.size == written.len() as u64 => {}
                Some(stored) => violation(format!(
                    "{name}: {} bytes stored (record says {}), the worker wrote {}, or they differ",
                    stored.len(),
                    output.size,
                    written.len()
                )),
                None => violation(format!("{name} is not in the results bucket")),
            }
        }
    } else if !job.outputs.is_empty() {
        violation(format!("{} but has outputs", job.state));
    }
}

/// A pod job's end and outputs against the ComfyUI emulator's own record of its prompt.
#[allow(clippy::too_many_arguments)]
fn check_pod_job(
    stack: &Stack,
    job: &Job,
    driven: &Driven,
    code: Option<ErrorCode>,
    results: &HashMap<String, Vec<u8>>,
    slack_ms: i64,
    pod_restarts: &[u64],
    violation: &mut dyn FnMut(String),
) {
    let prompt = job.runpod_job_id.as_deref();
    let ended = prompt.and_then(|p| stack.comfy.ended(p));
    let outcome = ended.as_ref().map(|e| e.outcome);
    let finished = job.timestamps.finished_at.unwrap_or(i64::MAX);
    match (driven.cancel, job.state, code) {
        _ if client_cancel_decides(driven, job.state, code, violation) => {}
        (_, JobState::Succeeded, _) if outcome == Some("completed") => {}
        (_, JobState::Failed, Some(ErrorCode::WorkerFailed)) if outcome == Some("failed") => {}
        // Lost twice: its second prompt never ended at the server, or its end was wiped
        // from the history by a restart before a check could see it (ComfyUI keeps no
        // history across a restart, so such a prompt is lost to the gateway).
        (_, JobState::Failed, Some(ErrorCode::BackendLost)) => {
            let wiped = ended.as_ref().is_none_or(|e| {
                pod_restarts
                    .iter()
                    .any(|at| *at >= e.ended_at_ms && (*at as i64) <= finished)
            });
            if job.reruns != 1 || !wiped {
                violation(format!(
                    "failed backend_lost after {} re-runs, its prompt ended {outcome:?} with no \
                     restart after it",
                    job.reruns
                ));
            }
        }
        (_, JobState::Failed, Some(ErrorCode::DispatchAttemptsExhausted)) if prompt.is_none() => {}
        (_, JobState::TimedOut, Some(ErrorCode::DeadlineExceeded)) => {
            if finished < job.deadline_at {
                violation(format!(
                    "timed out {} ms before its deadline",
                    job.deadline_at - finished
                ));
            }
            if let Some(ended) = ended.as_ref().filter(|e| e.outcome != "cancelled") {
                let early = job.deadline_at - ended.ended_at_ms as i64;
                if early > slack_ms {
                    violation(format!(
                        "timed out at its deadline, but its prompt ended {} {early} ms before",
                        ended.outcome
                    ));
                }
            }
        }
        (_, state, code) => violation(format!(
            "ended {state} ({code:?}) but the pod recorded its prompt {prompt:?} as {outcome:?}"
        )),
    }
    if job.state != JobState::Succeeded {
        if !job.outputs.is_empty() {
            violation(format!("{} but has outputs", job.state));
        }
        return;
    }
    let files = ended.map(|e| e.files).unwrap_or_default();
    if files.is_empty() || files.len() != job.outputs.len() {
        violation(format!(
            "{} outputs stored for {} files the prompt saved",
            job.outputs.len(),
            files.len()
        ));
    }
    for (_, name, written) in &files {
        let Some(output) = job.outputs.iter().find(|o| o.file_name == *name) else {
            violation(format!("{name} is missing from the job's outputs"));
            continue;
        };
        match results.get(&output.key) {
            Some(stored) if stored == written && output.size == written.len() as u64 => {}
            Some(stored) => violation(format!(
                "{name}: {} bytes stored, the prompt saved {}, or they differ",
                stored.len(),
                written.len()
            )),
            None => violation(format!("{name} is not in the results bucket")),
        }
    }
}

/// What the pod's ComfyUI server suffers during a wave, drawn from the seed: restarts (its
/// queue, running prompt and history lost), failed executions and slow answers.
#[derive(Default)]
struct PodFaults {
    restarts: std::sync::atomic::AtomicU64,
    /// When each restart happened, epoch ms.
    restart_times: std::sync::Mutex<Vec<u64>>,
    failed_executions: std::sync::atomic::AtomicU64,
    slow_spells: std::sync::atomic::AtomicU64,
}

async fn pod_chaos(world: Arc<World>, seed: u64, counts: Arc<PodFaults>) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let comfy = &world.stack.comfy;
    loop {
        let wait = Duration::from_millis(rng.random_range(1_500..=4_000));
        tokio::time::sleep(wait).await;
        match rng.random_range(0..10) {
            0..=2 => {
                comfy.restart();
                counts.restarts.fetch_add(1, Relaxed);
                counts.restart_times.lock().unwrap().push(now_ms() as u64);
            }
            3..=6 => {
                comfy.fail_next_executions(1);
                counts.failed_executions.fetch_add(1, Relaxed);
            }
            _ => {
                comfy.slow_answers(Duration::from_millis(300));
                tokio::time::sleep(Duration::from_secs(1)).await;
                comfy.slow_answers(Duration::ZERO);
                counts.slow_spells.fetch_add(1, Relaxed);
            }
        }
    }
}

/// The end a client's cancel calls for, whatever the backend: an accepted cancel must end the
/// job cancelled, and nothing else may. Whether it decided the job's end (then checked).
fn client_cancel_decides(
    driven: &Driven,
    state: JobState,
    code: Option<ErrorCode>,
    violation: &mut dyn FnMut(String),
) -> bool {
    match (driven.cancel, state, code) {
        (Some(Cancel::Accepted), JobState::Cancelled, Some(ErrorCode::CancelledByClient)) => {}
        (Some(Cancel::Accepted), state, _) => violation(format!(
            "the client's cancel was accepted, yet it ended {state}"
        )),
        (_, JobState::Cancelled, _) => {
            violation(format!("cancelled ({code:?}) without the client asking"))
        }
        _ => return false,
    }
    true
}

fn rank(state: JobState) -> u8 {
    match state {
        JobState::Queued => 0,
        JobState::Submitted => 1,
        JobState::Running => 2,
        _ => 3,
    }
}

/// Everything counted over a run (one or more waves).
#[derive(Default)]
struct Tally {
    jobs: usize,
    waves: usize,
    faults: BTreeMap<&'static str, u64>,
    cancels: usize,
    cancels_accepted: usize,
    cancels_too_late: usize,
    cancels_unavailable: usize,
    duplicates: u32,
    submit_retries: u32,
    poison: usize,
    killed_dispatches: usize,
    killed_finalizes: usize,
    raced_finalizers: usize,
    outcomes: BTreeMap<String, usize>,
    extra_attempts: u32,
    retried_jobs: usize,
    webhook_attempts: usize,
    webhook_failed: usize,
    finished_by: BTreeMap<&'static str, usize>,
    run_twice: usize,
    runs_started: usize,
    runs_adopted: usize,
    extra_runs_cancelled: usize,
    extra_runs_silent: usize,
    extra_gpu_ms: u64,
    two_run_results: usize,
    volume_bytes_left: u64,
    times: Vec<i64>,
    moto_cpu: BTreeMap<&'static str, Duration>,
    moto_wall: Duration,
    aws_faults: BTreeMap<&'static str, FaultCounts>,
    floor: usize,
    pod: PodTally,
    violations: Vec<String>,
}

/// The pod backend's share of a run.
#[derive(Default)]
struct PodTally {
    jobs: usize,
    reruns: usize,
    restarts: u64,
    failed_executions: u64,
    slow_spells: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_every_job_ends_once_in_the_right_state_with_its_outputs_intact() {
    let jobs: usize = env_or("CHAOS_JOBS", 300);
    // A fixed default keeps CI reproducible; set CHAOS_SEED to explore other fault sequences.
    let seed: u64 = env_or("CHAOS_SEED", 7);
    // moto answers index queries by scanning the table, so one table per few hundred jobs keeps
    // the local stack (not the gateway) from becoming the bottleneck of long runs.
    let wave_size: usize = env_or("CHAOS_WAVE", 300).max(1);
    println!("chaos: seed {seed}, {jobs} jobs (replay: CHAOS_SEED={seed} CHAOS_JOBS={jobs})");
    let aws = Arc::new(LocalAws::launch_faultable());
    let started = Instant::now();
    let pace = measure_pace(&aws).await;
    let timings = Timings::from_pace(&pace);
    println!(
        "  measured without faults: one job {} ms end to end, {:.1} jobs/s with {} in flight \
         ({:.1} s); submitting one job every {} ms",
        pace.latency.as_millis(),
        pace.capacity,
        CALIBRATION_BURST,
        started.elapsed().as_secs_f64(),
        pace.interval.as_millis()
    );
    println!(
        "  sized from it: deadline {} s, slack {} ms, leases dispatch {} s / finalize {} s, \
         RunPod request timeout {} s, retry budget {} s, execution timeout {} s",
        timings.deadline.as_secs(),
        timings.slack.as_millis(),
        timings.dispatch_lease.as_secs(),
        timings.finalize_lease.as_secs(),
        timings.request_timeout.as_secs(),
        timings.retry_budget.as_secs(),
        timings.execution_timeout.as_secs()
    );
    let cpu_before = aws.cpu_times();
    let run_started = Instant::now();
    let mut tally = Tally::default();
    let mut first = 0;
    while first < jobs {
        let count = wave_size.min(jobs - first);
        wave(seed, first, count, &pace, &timings, &aws, &mut tally).await;
        first += count;
    }
    let run_time = run_started.elapsed();
    tally.moto_cpu = aws
        .cpu_times()
        .into_iter()
        .map(|(service, cpu)| (service, cpu.saturating_sub(cpu_before[service])))
        .collect();
    tally.moto_wall = run_time;
    tally.aws_faults = aws.fault_counts();

    // The stall floor: a gateway that stalls jobs times them out instead of finishing them.
    let succeeded = tally.outcomes.get("succeeded").copied().unwrap_or(0);
    let floor = (FLOOR_SHARE * expected_success_share() * tally.jobs as f64).floor() as usize;
    tally.floor = floor;
    if succeeded < floor {
        tally.violations.push(format!(
            "only {succeeded} of {} jobs succeeded, below the floor of {floor} ({:.0} % of the \
             {:.1} % the fault rates leave, at {:.0} % of the measured capacity): jobs stall",
            tally.jobs,
            FLOOR_SHARE * 100.0,
            expected_success_share() * 100.0,
            env_or("CHAOS_LOAD", LOAD) * 100.0
        ));
    }
    print_table(seed, started.elapsed(), &mut tally);
    assert!(
        tally.violations.is_empty(),
        "{} violations (replay with CHAOS_SEED={seed} CHAOS_JOBS={jobs})",
        tally.violations.len()
    );
}

/// Items in the sweep index: jobs in flight, and ended jobs whose leftovers are still there.
/// Jobs in the sweep index with work due before their retention could end: in flight, or
/// ended with leftovers still to remove. (An ended, cleaned-up job stays in the index until its
/// retention ends, days away, when its data is purged.)
async fn sweep_index_count(stack: &Stack) -> i32 {
    let soon = gateway::ports::Clock::now_ms(&gateway::ports::SystemClock) + 3_600_000;
    stack
        .dynamodb()
        .scan()
        .table_name(&stack.table)
        .index_name("sweep-index")
        .filter_expression("next_check_at < :soon")
        .expression_attribute_values(
            ":soon",
            aws_sdk_dynamodb::types::AttributeValue::N(soon.to_string()),
        )
        .send()
        .await
        .unwrap()
        .count()
}

/// Bytes of this wave's jobs left on the RunPod volume (their input and output folders).
fn volume_bytes_left(stack: &Stack, ids: &[String]) -> (u64, Vec<String>) {
    fn walk(dir: &std::path::Path, bytes: &mut u64, files: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, bytes, files);
            } else if let Ok(meta) = entry.metadata() {
                *bytes += meta.len();
                files.push(path.display().to_string());
            }
        }
    }
    let (mut bytes, mut files) = (0, Vec::new());
    for id in ids {
        for folder in ["inputs", "outputs"] {
            walk(
                &stack.emulator.volume_dir.join(folder).join(id),
                &mut bytes,
                &mut files,
            );
        }
    }
    (bytes, files)
}

/// Jobs `first..first + count` through a fresh stack, every check, counted into `tally`.
async fn wave(
    seed: u64,
    first: usize,
    count: usize,
    pace: &Pace,
    timings: &Timings,
    aws: &Arc<LocalAws>,
    tally: &mut Tally,
) {
    let wave_started = Instant::now();
    let mut chaos = chaos_config(seed);
    // A lost answer that hangs outlasts the gateway's wait for it.
    chaos.run_answer_hang_ms =
        (timings.request_timeout + Duration::from_secs(1)).as_millis() as u64;
    let stack = Stack::start_with(timings.stack_options(
        Faults {
            chaos: Some(chaos),
            ..Faults::default()
        },
        aws,
    ))
    .await;
    let world = Arc::new(World {
        dispatcher: stack.wiring().dispatcher().unwrap(),
        observer: stack.wiring().observer().unwrap(),
        finalizer: stack.wiring().finalizer().unwrap(),
        sweeper: stack.wiring().sweeper().unwrap(),
        stack,
        timings: timings.clone(),
    });
    let stack = &world.stack;
    let violations = &mut tally.violations;
    // The gateway meets AWS faults while its jobs are in flight; the test's own setup and
    // checks go straight to moto.
    aws.set_faults(Some(&aws_faults(seed.wrapping_add(first as u64))));
    let pod_counts = Arc::new(PodFaults::default());
    let pod_faults = tokio::spawn(pod_chaos(
        world.clone(),
        seed ^ (first as u64).wrapping_mul(0x2545_f491_4f6c_dd1d),
        pod_counts.clone(),
    ));

    for poison in POISON {
        stack
            .sqs()
            .send_message()
            .queue_url(&stack.queue_url)
            .message_body(poison)
            .send()
            .await
            .unwrap();
    }
    // A readable message for a job that does not exist: consumed, not dead-lettered.
    stack
        .sqs()
        .send_message()
        .queue_url(&stack.queue_url)
        .message_body(json!({"job_id": "01900000-0000-7000-8000-00000000dead"}).to_string())
        .send()
        .await
        .unwrap();

    // Submit and drive every job, one every `pace.interval`: a steady share of what this
    // machine's stack was measured to carry, whatever its speed.
    let image = Arc::new(jpeg(64, 48));
    let mut tasks = Vec::with_capacity(count);
    let pacing = tokio::time::Instant::now();
    for (n, index) in (first..first + count).enumerate() {
        tokio::time::sleep_until(pacing + pace.interval * n as u32).await;
        let world = world.clone();
        let image = image.clone();
        let plan = plan(seed, index);
        tasks.push(tokio::spawn(drive(world, index, image, plan)));
    }
    let last_submitted = Instant::now();
    let mut driven = Vec::with_capacity(count);
    for task in tasks {
        driven.push(task.await.unwrap());
    }
    // The pod's faults stop with the client's actions; what they left must still end right.
    pod_faults.abort();
    let _ = pod_faults.await;
    stack.comfy.slow_answers(Duration::ZERO);
    stack.comfy.fail_next_executions(0);
    let submitted_in = wave_started.elapsed();
    let ids: Vec<String> = driven.iter().filter_map(|d| d.id.clone()).collect();
    let id_set: HashSet<String> = ids.iter().cloned().collect();
    violations.extend(
        driven
            .iter()
            .filter_map(|d| d.submit_error.as_ref())
            .map(|e| format!("submit refused: {e}")),
    );

    // Every job must end; the deadline bounds how long that may take.
    let wait_until =
        last_submitted + timings.deadline + timings.finalize_give_up + timings.slack * 2;
    loop {
        let open = open_jobs(stack, &id_set).await;
        if open == 0 {
            break;
        }
        if Instant::now() > wait_until {
            violations.push(format!("{open} jobs never reached a terminal state"));
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let terminal_in = wave_started.elapsed();
    aws.set_faults(None);
    let at_end = all_jobs(stack, &ids).await;
    for id in &ids {
        if !at_end.contains_key(id) {
            let tries = driven.iter().find(|d| d.id.as_deref() == Some(id.as_str()));
            violations.push(format!(
                "job {id} was accepted (202) but is not stored ({} submit retries)",
                tries.map(|d| d.submit_retries).unwrap_or_default()
            ));
        }
    }

    // Let late webhooks, duplicate messages and poison receives play out, then look again:
    // nothing may have changed after the end.
    // A poison message is dead-lettered after its last receive's visibility timeout.
    let settle_until =
        Instant::now() + timings.queue_visibility * (MAX_RECEIVES as u32 + 2) + timings.slack;
    tokio::time::sleep(
        Duration::from_millis(chaos_config(0).webhook_delay_ms) + timings.sweep_every * 4,
    )
    .await;
    // Ended jobs stay in the sweep index until the sweeper has removed their leftovers.
    while (stack.queue_depth().await > 0
        || stack.depth_of(&stack.dlq_url()).await < POISON.len()
        || sweep_index_count(stack).await > 0)
        && Instant::now() < settle_until
    {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let after = all_jobs(stack, &ids).await;
    // Only the clean-up of its leftovers may touch a job after its end.
    let as_ended = |j: &Job| {
        (
            j.state,
            j.error.clone(),
            j.outputs.clone(),
            j.history.clone(),
        )
    };
    for (id, job) in &at_end {
        if after.get(id).map(as_ended) != Some(as_ended(job)) {
            violations.push(format!(
                "job {id}: changed after it ended: {:?}",
                after.get(id).map(|j| &j.history)
            ));
        }
    }

    // Outputs as stored, for the byte-for-byte check; nothing else may be in the bucket.
    let result_keys = all_keys(stack, &stack.results_bucket, "").await;
    let mut results = HashMap::new();
    for chunk in result_keys.chunks(16) {
        let fetched = futures::future::join_all(chunk.iter().map(|key| async move {
            let body = read_object(&stack.s3(), &stack.results_bucket, key).await;
            (key.clone(), body)
        }))
        .await;
        results.extend(fetched);
    }
    let expected_keys: HashSet<&str> = after
        .values()
        .filter(|j| j.state == JobState::Succeeded)
        .flat_map(|j| j.outputs.iter().map(|o| o.key.as_str()))
        .collect();
    for key in &result_keys {
        if !expected_keys.contains(key.as_str()) {
            let job_id = key.split('/').nth(2).unwrap_or_default();
            let state = after.get(job_id).map(|j| j.state);
            // Copies of a killed finalize, or of one that could not clean up after itself,
            // are removed by the sweeper once the job has ended: none may remain.
            violations.push(format!(
                "results bucket holds {key}, no succeeded job's output (job state {state:?})"
            ));
        }
    }

    let pod_restart_times = pod_counts.restart_times.lock().unwrap().clone();
    let by_id: HashMap<&str, &Driven> = driven
        .iter()
        .filter_map(|d| d.id.as_deref().map(|id| (id, d)))
        .collect();
    for id in &ids {
        let Some(job) = after.get(id) else {
            continue;
        };
        check_job(
            stack,
            job,
            by_id[id.as_str()],
            &results,
            timings.slack,
            timings.finalize_give_up,
            &pod_restart_times,
            violations,
        );
    }

    // Nothing in flight: not at RunPod, not due in the sweep index, not on the queue.
    for snapshot in stack.emulator.jobs() {
        if !snapshot.status.is_terminal() {
            violations.push(format!(
                "RunPod job {} still {}",
                snapshot.id, snapshot.status
            ));
        }
    }
    let on_the_pod = stack.comfy.in_queue();
    if on_the_pod > 0 {
        violations.push(format!(
            "{on_the_pod} prompts still queued or running on the pod"
        ));
    }
    let sweep_index = sweep_index_count(stack).await;
    if sweep_index > 0 {
        violations.push(format!("{sweep_index} jobs still in the sweep index"));
    }
    let queued = stack.queue_depth().await;
    if queued > 0 {
        violations.push(format!("{queued} messages left on the dispatch queue"));
    }
    // The DLQ holds exactly the poison messages.
    let mut dead = drain(stack, &stack.dlq_url()).await;
    dead.sort();
    let mut poison: Vec<String> = POISON.iter().map(|p| p.to_string()).collect();
    poison.sort();
    if dead != poison {
        violations.push(format!(
            "the DLQ holds {dead:?}, not exactly the poison messages"
        ));
    }

    // Nothing of a job stays on the volume once it has ended.
    let (left_bytes, mut left_files) = volume_bytes_left(stack, &ids);
    for id in &ids {
        left_files.extend(stack.pod_files_on_the_volume(id));
    }
    if left_bytes > 0 || !left_files.is_empty() {
        violations.push(format!(
            "{left_bytes} bytes left on the volume by ended jobs: {:?}",
            left_files.iter().take(5).collect::<Vec<_>>()
        ));
    }

    // Counts for the table.
    tally.volume_bytes_left += left_bytes;
    {
        use std::sync::atomic::Ordering::Relaxed;
        let pod = &mut tally.pod;
        pod.jobs += after
            .values()
            .filter(|j| j.backend == BackendKind::Pod)
            .count();
        pod.reruns += after.values().map(|j| j.reruns as usize).sum::<usize>();
        pod.restarts += pod_counts.restarts.load(Relaxed);
        pod.failed_executions += pod_counts.failed_executions.load(Relaxed);
        pod.slow_spells += pod_counts.slow_spells.load(Relaxed);
    }
    tally.waves += 1;
    tally.jobs += count;
    for (kind, n) in stack.emulator.fault_counts() {
        *tally.faults.entry(kind.as_str()).or_default() += n;
    }
    let counting = |f: &dyn Fn(&Driven) -> bool| driven.iter().filter(|d| f(d)).count();
    tally.cancels += counting(&|d| d.cancel.is_some());
    tally.cancels_accepted += counting(&|d| d.cancel == Some(Cancel::Accepted));
    tally.cancels_too_late += counting(&|d| d.cancel == Some(Cancel::AlreadyFinished));
    tally.cancels_unavailable += counting(&|d| d.cancel == Some(Cancel::Unavailable));
    tally.duplicates += driven.iter().map(|d| d.duplicates).sum::<u32>();
    tally.submit_retries += driven.iter().map(|d| d.submit_retries).sum::<u32>();
    tally.poison += POISON.len();
    tally.killed_dispatches += counting(&|d| d.killed_dispatch);
    tally.killed_finalizes += counting(&|d| d.killed_finalize);
    tally.raced_finalizers += counting(&|d| d.raced_finalizers);
    for job in after.values() {
        let key = match &job.error {
            Some(error) => format!("{} ({})", job.state, error.code.as_str()),
            None => job.state.to_string(),
        };
        *tally.outcomes.entry(key).or_default() += 1;
        tally.extra_attempts += job.attempts.saturating_sub(1);
        tally.retried_jobs += usize::from(job.attempts > 1);
        if let Some(last) = job.history.last() {
            *tally.finished_by.entry(last.by.as_str()).or_default() += 1;
        }
        if let Some(finished) = job.timestamps.finished_at {
            tally.times.push(finished - job.timestamps.created_at);
        }
    }
    let webhook_log = stack.emulator.webhook_log();
    tally.webhook_attempts += webhook_log.len();
    tally.webhook_failed += webhook_log.iter().filter(|a| !a.delivered).count();
    // Every run RunPod started, by the job its webhook URL names.
    let mut runs_per_job: HashMap<String, Vec<String>> = HashMap::new();
    for (run, webhook) in stack.emulator.accepted_jobs() {
        if let Some(job) = webhook
            .as_deref()
            .and_then(|w| w.split("/webhooks/runpod/").nth(1))
        {
            let job = job.split('?').next().unwrap_or_default().to_string();
            runs_per_job.entry(job).or_default().push(run);
        }
    }
    tally.run_twice += runs_per_job.values().filter(|runs| runs.len() > 1).count();
    for (job_id, runs) in &runs_per_job {
        tally.runs_started += runs.len();
        let Some(job) = after.get(job_id) else {
            continue;
        };
        let adopted = job
            .history
            .iter()
            .any(|e| e.to == JobState::Submitted && e.by == gateway::domain::job::Actor::Webhook);
        tally.runs_adopted += usize::from(adopted);
        let tracked = job.runpod_job_id.as_deref();
        let folder = |run: &str| {
            stack
                .emulator
                .ended_job(run)
                .or_else(|| stack.emulator.job(run))
                .and_then(|snapshot| output_folder(&snapshot.input))
        };
        for extra in runs.iter().filter(|run| Some(run.as_str()) != tracked) {
            match stack.emulator.ended_job(extra) {
                Some(ended) if ended.status == JobStatus::Cancelled => {
                    tally.extra_runs_cancelled += 1;
                    tally.extra_gpu_ms += ended.execution_time_ms;
                }
                Some(ended) => {
                    tally.extra_runs_silent += 1;
                    tally.extra_gpu_ms += ended.execution_time_ms;
                }
                None => tally.extra_runs_silent += 1,
            }
        }
        // A result from two runs: the job's files named outside its own run's folder, or a
        // folder another run of the job also wrote into.
        if let (JobState::Succeeded, Some(tracked)) = (job.state, tracked) {
            let own = folder(tracked);
            let files: Vec<String> = stack
                .emulator
                .ended_job(tracked)
                .and_then(|e| e.output)
                .and_then(|o| o["files"].as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            let shared = runs
                .iter()
                .filter(|run| run.as_str() != tracked)
                .any(|run| folder(run).is_some() && folder(run) == own);
            let outside = own.as_ref().is_none_or(|own| {
                files
                    .iter()
                    .any(|f| !f.trim_start_matches(MOUNT).starts_with(own.as_str()))
            });
            if shared || outside {
                tally.two_run_results += 1;
                tally.violations.push(format!(
                    "job {job_id}: its result may come from two runs (folder {own:?}, files {files:?})"
                ));
            }
        }
    }
    println!(
        "  wave {}: jobs {first}..{}, submitted in {:.1} s, all terminal after {:.1} s, {} violations so far",
        tally.waves,
        first + count,
        submitted_in.as_secs_f64(),
        terminal_in.as_secs_f64(),
        tally.violations.len()
    );

    let World { stack, .. } = Arc::try_unwrap(world).ok().expect("every driver is done");
    stack.stop().await;
}

/// Where the volume is mounted in the paths a worker reports.
const MOUNT: &str = "/runpod-volume/";

/// The folder a run's SaveImage writes into (`outputs/<job>/a<attempt>/`), from its input.
fn output_folder(input: &serde_json::Value) -> Option<String> {
    let graph = input.get("workflow_api")?.as_object()?;
    graph.values().find_map(|node| {
        let prefix = node.get("inputs")?.get("filename_prefix")?.as_str()?;
        Some(prefix[..prefix.rfind('/')? + 1].to_string())
    })
}

fn print_table(seed: u64, elapsed: Duration, tally: &mut Tally) {
    let mut table = String::new();
    let mut line = |s: String| {
        table.push_str(&s);
        table.push('\n');
    };
    line(format!(
        "chaos run: seed {seed}, {} jobs in {} wave(s), {:.1} s",
        tally.jobs,
        tally.waves,
        elapsed.as_secs_f64()
    ));
    line("faults injected (RunPod emulator):".into());
    for (kind, n) in &tally.faults {
        line(format!("  {kind:<24}{n:>7}"));
    }
    line("faults injected (AWS, by the proxy in front of moto):".into());
    line(format!(
        "  {:<10}{:>9}{:>7}{:>7}{:>7}{:>7}",
        "", "throttle", "5xx", "slow", "drop", "lost"
    ));
    for (service, n) in &tally.aws_faults {
        line(format!(
            "  {service:<10}{:>9}{:>7}{:>7}{:>7}{:>7}",
            n.throttle, n.error5xx, n.slow, n.drop, n.lost_response
        ));
    }
    line(format!(
        "pod backend: {} jobs; ComfyUI restarts {}, failed executions {}, slow spells {}; lost prompts run again {}",
        tally.pod.jobs,
        tally.pod.restarts,
        tally.pod.failed_executions,
        tally.pod.slow_spells,
        tally.pod.reruns
    ));
    line("faults injected (client and AWS side):".into());
    line(format!("  {:<24}{:>7}", "client_cancel", tally.cancels));
    line(format!(
        "    accepted / already finished / unavailable: {} / {} / {}",
        tally.cancels_accepted, tally.cancels_too_late, tally.cancels_unavailable
    ));
    line(format!("  {:<24}{:>7}", "sqs_duplicate", tally.duplicates));
    line(format!(
        "  {:<24}{:>7}",
        "submit_503_retried", tally.submit_retries
    ));
    line(format!("  {:<24}{:>7}", "sqs_poison", tally.poison));
    line(format!(
        "  {:<24}{:>7}",
        "dispatch_killed", tally.killed_dispatches
    ));

    line(format!(
        "  {:<24}{:>7}",
        "finalize_killed", tally.killed_finalizes
    ));
    line(format!(
        "  {:<24}{:>7}",
        "finalizers_raced", tally.raced_finalizers
    ));
    line("outcomes:".into());
    for (outcome, n) in &tally.outcomes {
        line(format!("  {outcome:<40}{n:>7}"));
    }
    line("retries and recoveries:".into());
    line(format!(
        "  dispatch attempts beyond the first   {} (on {} jobs)",
        tally.extra_attempts, tally.retried_jobs
    ));
    line(format!(
        "  /run 429s retried within the call    {}",
        tally.faults.get("run_429").copied().unwrap_or(0)
    ));
    line(format!(
        "  webhook attempts                     {} ({} not delivered: retried by RunPod or left to the sweeper)",
        tally.webhook_attempts, tally.webhook_failed
    ));
    line(format!(
        "  ended by                             {}",
        tally
            .finished_by
            .iter()
            .map(|(by, n)| format!("{by} {n}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    line(format!(
        "  jobs run twice at RunPod             {} (a dispatch killed between /run and its record, or a lost /run answer)",
        tally.run_twice
    ));
    line(format!(
        "  runs started / adopted               {} / {} (a lost /run answer's run, taken as the job's when it announced itself)",
        tally.runs_started, tally.runs_adopted
    ));
    line(format!(
        "  extra runs stopped / ran to the end  {} / {} (an extra run announces itself only when it ends)",
        tally.extra_runs_cancelled, tally.extra_runs_silent
    ));
    line(format!(
        "  GPU seconds on extra runs            {:.1}",
        tally.extra_gpu_ms as f64 / 1000.0
    ));
    line(format!(
        "  volume bytes left by ended jobs      {} (must be 0)",
        tally.volume_bytes_left
    ));
    line(format!(
        "  jobs with a result from two runs     {} (must be 0)",
        tally.two_run_results
    ));
    let succeeded = tally.outcomes.get("succeeded").copied().unwrap_or(0);
    line(format!(
        "  succeeded                            {succeeded} (floor {}: jobs that stall fail the run)",
        tally.floor
    ));
    line(format!(
        "local AWS (one moto process each): CPU seconds over {:.1} s of run",
        tally.moto_wall.as_secs_f64()
    ));
    for (service, cpu) in &tally.moto_cpu {
        line(format!(
            "  {service:<12}{:>8.1} s  ({:.0} % of one core)",
            cpu.as_secs_f64(),
            100.0 * cpu.as_secs_f64() / tally.moto_wall.as_secs_f64().max(0.001)
        ));
    }
    tally.times.sort_unstable();
    line(format!(
        "time to terminal (measured, not judged): p50 {} ms, p99 {} ms, max {} ms",
        percentile(&tally.times, 0.50),
        percentile(&tally.times, 0.99),
        tally.times.last().copied().unwrap_or(0)
    ));
    line(format!("violations: {}", tally.violations.len()));
    for violation in tally.violations.iter().take(50) {
        line(format!("  {violation}"));
    }
    println!("{table}");
}
