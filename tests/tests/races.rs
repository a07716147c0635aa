//! Races: the same job finished by two callers at once. Exactly one wins; the others change
//! nothing (no write, no history entry, no second copy of the outputs).
//!
//! Each test plays several rounds with different offsets between the two sides
//! (`RACE_ROUNDS`, default 6), so both orders and the overlaps between them come up.
use std::time::{Duration, Instant};

use gateway::app::dispatch::{DispatchOutcome, RetryLater};
use gateway::domain::job::{Actor, Job, JobState};
use gateway::ports::JobStore;
use gateway_aws::adapters::dynamodb::DynamoJobStore;
use gateway_tests::{jpeg, Stack, StackOptions, StatusCode, ALICE};
use runpod_emulator::{ChaosConfig, Faults, JobSnapshot, JobStatus};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(30);

fn rounds() -> u64 {
    std::env::var("RACE_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
}

fn faults(webhooks: bool, slow_volume_ms: u64) -> Faults {
    Faults {
        webhooks_enabled: webhooks,
        // Only to slow the volume down (widening the windows) and to record RunPod's jobs.
        chaos: Some(ChaosConfig {
            p_s3_slow: if slow_volume_ms > 0 { 1.0 } else { 0.0 },
            s3_slow_ms: slow_volume_ms,
            ..ChaosConfig::default()
        }),
        ..Faults::default()
    }
}

/// Waits until RunPod has finished the job (the gateway has not heard: webhooks are off).
async fn runpod_completed(stack: &Stack, job_id: &str) -> JobSnapshot {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        if stack.stored_job(job_id).await.runpod_job_id.is_some() {
            let snapshot = stack.runpod_job(job_id).await;
            if snapshot.status == JobStatus::Completed {
                return snapshot;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "RunPod never completed {job_id}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The webhook RunPod would send for the job: its URL and body.
fn webhook_for(snapshot: &JobSnapshot) -> (String, String) {
    let url = snapshot.webhook.clone().unwrap();
    let mut body = snapshot.status_body();
    body["input"] = snapshot.input.clone();
    body["webhook"] = json!(url);
    (url, body.to_string())
}

/// Checks the one-winner outcome: one terminal history entry, written `writes` versions after
/// `before`, by one of `by`.
fn assert_finished_once(before: &Job, after: &Job, writes: u64, by: &[Actor]) {
    let terminal: Vec<_> = after
        .history
        .iter()
        .filter(|e| e.to.is_terminal())
        .collect();
    assert_eq!(terminal.len(), 1, "{:?}", after.history);
    assert!(by.contains(&terminal[0].by), "{:?}", after.history);
    assert_eq!(
        after.version,
        before.version + writes,
        "the loser wrote to the job: {:?}",
        after.history
    );
    // Out of the way of every finalize; left to the sweeper only for its clean-up.
    assert!(after.lease.is_none() && after.cleanup_pending);
}

/// The job's copies of outputs in the results bucket: its stored report aside, which finalize
/// (or, for a job cancelled before finalize came, the clean-up) removes in its own time.
async fn result_keys(stack: &Stack, job_id: &str) -> Vec<String> {
    stack
        .keys(&stack.results_bucket, &format!("results/alice/{job_id}/"))
        .await
        .into_iter()
        .filter(|key| !key.contains("/report-"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_and_the_sweeper_at_once_hand_off_and_finish_the_job_once() {
    // RunPod's /status answers slowly, so the sweeper reads the job, then waits while the
    // webhook arrives; a slow volume keeps the winner copying while the loser comes and goes.
    let mut faults = faults(false, 200);
    if let Some(chaos) = faults.chaos.as_mut() {
        chaos.p_api_slow = 1.0;
        chaos.api_slow_ms = 150;
    }
    let stack = Stack::start_with(StackOptions {
        faults,
        ..StackOptions::default()
    })
    .await;
    let sweeper = stack.wiring().sweeper().unwrap();
    let mut winners = Vec::new();
    for round in 0..rounds() {
        let job_id = stack
            .submit_restore(ALICE, &jpeg(120, 90), json!({"megapixels": 0.02}))
            .await;
        let snapshot = runpod_completed(&stack, &job_id).await;
        // Due for the sweeper (first poll one second after submission).
        let due = stack.stored_job(&job_id).await.next_check_at.unwrap();
        let wait = due - chrono_now();
        if wait > 0 {
            tokio::time::sleep(Duration::from_millis(wait as u64 + 20)).await;
        }
        let before = stack.stored_job(&job_id).await;
        let (url, body) = webhook_for(&snapshot);
        // Three interleavings, in turn: the webhook comes while the sweeper waits for /status
        // (the sweeper then finds the job leased); the webhook comes after the sweeper took
        // the job (the webhook finds it leased); the sweeper comes while the webhook copies.
        let (webhook_after, sweep_after) = match round % 3 {
            0 => (40 + round * 7 % 40, 0),
            1 => (250 + round * 11 % 60, 0),
            _ => (0, 20 + round * 13 % 80),
        };
        let webhook = async {
            tokio::time::sleep(Duration::from_millis(webhook_after)).await;
            stack.post_webhook(&url, &body).await
        };
        let sweep = async {
            tokio::time::sleep(Duration::from_millis(sweep_after)).await;
            sweeper.sweep().await.unwrap()
        };
        let (status, _report) = tokio::join!(webhook, sweep);
        // The loser answered RunPod "busy, try again" (503) or found the job done (200).
        assert!(
            status == StatusCode::OK || status == StatusCode::SERVICE_UNAVAILABLE,
            "{status}"
        );
        let after = stack.stored_terminal(&job_id, TIMEOUT).await;
        assert_eq!(after.state, JobState::Succeeded, "{:?}", after.history);
        // Exactly the winner's hand-off, then finalize's lease and the end.
        assert_finished_once(&before, &after, 3, &[Actor::Finalize]);
        assert_eq!(result_keys(&stack, &job_id).await.len(), 1);
        winners.push(after.history.last().unwrap().by);
    }
    println!("webhook vs sweeper, winners by round: {winners:?}");
    stack.stop().await;
}

fn chrono_now() -> i64 {
    gateway::ports::Clock::now_ms(&gateway::ports::SystemClock)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_webhook_deliveries_in_parallel_finish_the_job_once() {
    let stack = Stack::start_with(StackOptions {
        faults: faults(false, 0),
        ..StackOptions::default()
    })
    .await;
    for round in 0..rounds() {
        let job_id = stack
            .submit_restore(ALICE, &jpeg(120, 90), json!({"megapixels": 0.02}))
            .await;
        let snapshot = runpod_completed(&stack, &job_id).await;
        let before = stack.stored_job(&job_id).await;
        let (url, body) = webhook_for(&snapshot);
        // Odd rounds: one of the two copies arrives empty (the gateway asks /status).
        let second = if round % 2 == 1 {
            String::new()
        } else {
            body.clone()
        };
        let offset = Duration::from_millis(round * 5 % 20);
        let (a, b) = tokio::join!(stack.post_webhook(&url, &body), async {
            tokio::time::sleep(offset).await;
            stack.post_webhook(&url, &second).await
        });
        assert!(
            [a, b].contains(&StatusCode::OK),
            "one of them finished the job: {a} {b}"
        );
        let after = stack.stored_terminal(&job_id, TIMEOUT).await;
        assert_eq!(after.state, JobState::Succeeded);
        assert_finished_once(&before, &after, 3, &[Actor::Finalize]);
        assert_eq!(result_keys(&stack, &job_id).await.len(), 1);
        // RunPod's retry of the loser, after the end: 200, nothing written.
        assert_eq!(stack.post_webhook(&url, &body).await, StatusCode::OK);
        assert_eq!(stack.stored_job(&job_id).await, after);
    }
    stack.stop().await;
}

/// A queued job with no queue message (so only this test dispatches it) and no sweeper look
/// for ten minutes.
async fn unqueued_job(stack: &Stack) -> Job {
    let id = uuid::Uuid::now_v7().to_string();
    stack.store_queued_job("alice", &id, 600_000).await
}

/// RunPod jobs submitted for the gateway's job `job_id`.
fn runpod_runs(stack: &Stack, job_id: &str) -> usize {
    stack
        .emulator
        .accepted_jobs()
        .iter()
        .filter(|(_, webhook)| {
            webhook
                .as_deref()
                .is_some_and(|w| w.contains(&format!("/webhooks/runpod/{job_id}?")))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dispatch_redelivered_while_the_first_runs_submits_once() {
    // The volume answers slowly, so the first dispatch is still copying the input (holding its
    // lease) when the redelivered message arrives.
    // No worker takes the job, so nothing but the two dispatches touches it.
    let stack = Stack::start_with(StackOptions {
        faults: faults(true, 400),
        configure_emulator: |c| c.builtin_worker = false,
        ..StackOptions::default()
    })
    .await;
    let dispatcher = stack.wiring().dispatcher().unwrap();
    for round in 0..rounds() {
        let job = unqueued_job(&stack).await;
        let offset = Duration::from_millis(round * 37 % 200);
        // The redelivery comes once the first holds the job (not after a fixed time, which a
        // slow machine may not have reached), at a different point of its copy each round.
        let (first, second) = tokio::join!(dispatcher.dispatch(&job.id), async {
            let leased = Instant::now() + Duration::from_secs(60);
            loop {
                let seen = stack.stored_job(&job.id).await;
                if seen.lease.is_some() || seen.state != JobState::Queued {
                    break;
                }
                assert!(
                    Instant::now() < leased,
                    "the first dispatch never took the job"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            tokio::time::sleep(offset).await;
            dispatcher.dispatch(&job.id).await
        });
        assert!(
            matches!(first, Ok(DispatchOutcome::Submitted(_))),
            "{first:?}"
        );
        // The redelivery found the job held and asked to come back later, changing nothing;
        // or, had the first finished already, found nothing left to do.
        assert!(
            matches!(second, Err(RetryLater(_)) | Ok(DispatchOutcome::Skipped(_))),
            "round {round}: {second:?}"
        );
        let stored = stack.stored_job(&job.id).await;
        assert_eq!(stored.state, JobState::Submitted);
        assert_eq!(stored.attempts, 1);
        // Created, leased, submitted: the redelivery wrote nothing.
        assert_eq!(stored.version, job.version + 2);
        let submitted: Vec<_> = stored
            .history
            .iter()
            .filter(|e| e.to == JobState::Submitted)
            .collect();
        assert_eq!(submitted.len(), 1);
        assert_eq!(submitted[0].by, Actor::Dispatch);
        // When it comes back, there is nothing left to do.
        assert_eq!(
            dispatcher.dispatch(&job.id).await.unwrap(),
            DispatchOutcome::Skipped("already dispatched or finished")
        );
        assert_eq!(runpod_runs(&stack, &job.id), 1, "RunPod got the job twice");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_the_webhook_leaves_one_end_and_no_stray_outputs() {
    // A slow volume keeps the finalize copying long enough for cancels to land mid-copy too.
    let stack = Stack::start_with(StackOptions {
        faults: faults(false, 150),
        ..StackOptions::default()
    })
    .await;
    let mut ends = Vec::new();
    for round in 0..rounds() {
        let job_id = stack
            .submit_restore(ALICE, &jpeg(120, 90), json!({"megapixels": 0.02}))
            .await;
        let snapshot = runpod_completed(&stack, &job_id).await;
        let (url, body) = webhook_for(&snapshot);
        let offset = Duration::from_millis(round * 61 % 400);
        let (hook, (cancel, _)) = tokio::join!(stack.post_webhook(&url, &body), async {
            tokio::time::sleep(offset).await;
            stack
                .post_json(ALICE, &format!("/jobs/{job_id}/cancel"), &json!({}))
                .await
        });
        assert!(hook == StatusCode::OK || hook == StatusCode::SERVICE_UNAVAILABLE);
        let after = stack.stored_terminal(&job_id, TIMEOUT).await;
        let keys = result_keys(&stack, &job_id).await;
        match after.state {
            JobState::Succeeded => {
                assert_eq!(cancel, StatusCode::CONFLICT);
                assert_eq!(keys.len(), 1);
            }
            JobState::Cancelled => {
                assert_eq!(cancel, StatusCode::OK);
                // A finalize that was copying when the cancel landed removes its copies once
                // its own write is refused, just after the job shows cancelled.
                let until = std::time::Instant::now() + TIMEOUT;
                let mut keys = keys;
                while !keys.is_empty() && std::time::Instant::now() < until {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    keys = result_keys(&stack, &job_id).await;
                }
                assert!(
                    keys.is_empty(),
                    "outputs left for a cancelled job: {keys:?}"
                );
                assert!(after.outputs.is_empty());
            }
            other => panic!("ended {other}"),
        }
        let terminal = after.history.iter().filter(|e| e.to.is_terminal()).count();
        assert_eq!(terminal, 1, "{:?}", after.history);
        ends.push(after.state);
    }
    println!("webhook vs cancel, ends by round: {ends:?}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweeper_expiring_a_stale_copy_never_leaves_a_gpu_running() {
    // Found by the chaos run: the sweeper read a job from its index before dispatch recorded
    // RunPod's id, found it past its deadline, cancelled nothing at RunPod (it knew of no run),
    // then timed out the fresh record: timed_out, with the GPU still running it.
    let stack = Stack::start_with(StackOptions {
        faults: Faults {
            worker_delay_ms: 20_000,
            ..Faults::default()
        },
        ..StackOptions::default()
    })
    .await;
    let wiring = stack.wiring();
    let job = unqueued_job(&stack).await;
    // Past its deadline already.
    let mut past = job.clone();
    past.deadline_at = chrono_now() - 1;
    past.version += 1;
    DynamoJobStore::new(stack.dynamodb(), &stack.table)
        .save(&past, job.version)
        .await
        .unwrap();
    let stale = stack.stored_job(&job.id).await;

    // Dispatch gets it to RunPod, where it runs (20 s of GPU time).
    let dispatched = wiring
        .dispatcher()
        .unwrap()
        .dispatch(&job.id)
        .await
        .unwrap();
    assert!(matches!(dispatched, DispatchOutcome::Submitted(_)));
    let runpod_id = stack.stored_job(&job.id).await.runpod_job_id.unwrap();

    let sweeper = |stale: Vec<Job>| gateway::app::sweeper::Sweeper {
        // The real store, with a sweep index that answers with copies read earlier, as
        // DynamoDB's eventually consistent index can.
        store: std::sync::Arc::new(
            testkit::observed::ObservedStore::new(std::sync::Arc::new(DynamoJobStore::new(
                stack.dynamodb(),
                &stack.table,
            )))
            .lag_index(stale),
        ),
        callbacks: wiring.callback_queue().unwrap(),
        queue: wiring.queue().unwrap(),
        backends: wiring.backends(Some(wiring.runpod().unwrap())).unwrap(),
        polls: wiring.polls().unwrap(),
        stops: wiring.stops().unwrap(),
        observer: std::sync::Arc::new(wiring.observer().unwrap()),
        finalize: wiring.finalize_queue().unwrap(),
        delivery_logs: wiring.job_store().unwrap(),
        results: wiring.results().unwrap(),
        uploads: wiring.uploads().unwrap(),
        volume: wiring.volume().unwrap().0,
        volume_root: wiring.volume().unwrap().1.root().clone(),
        settings: wiring.settings.clone(),
        clock: wiring.clock.clone(),
    };
    // The sweep working from the stale copy leaves the job alone...
    sweeper(vec![stale]).sweep().await.unwrap();
    let after = stack.stored_job(&job.id).await;
    assert_eq!(after.state, JobState::Submitted, "{:?}", after.history);
    // ...and the next one, from a fresh copy, stops the GPU before timing the job out.
    let fresh = stack.stored_job(&job.id).await;
    sweeper(vec![fresh]).sweep().await.unwrap();
    let ended = stack.stored_job(&job.id).await;
    assert_eq!(ended.state, JobState::TimedOut);
    assert_eq!(
        stack
            .run_once_stopped(&runpod_id, Duration::from_secs(30))
            .await
            .status,
        JobStatus::Cancelled,
        "the run was stopped"
    );
    let times: Vec<_> = ended.history.iter().map(|e| e.at).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    stack.stop().await;
}
