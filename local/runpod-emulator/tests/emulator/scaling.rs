//! The built-in worker's scaling: min/max workers, the idle timeout, and low-priority jobs,
//! which RunPod documents as not triggering worker scaling.
//!
//! Jobs that must stay running are held by a long `worker_delay_ms` and let go by cancelling
//! them, so no assertion depends on how fast this machine runs a job. Scale-ups are decided under
//! the same lock as the submission, so once `/run` has answered, whether the job started a worker
//! is settled; `peak` records every worker that ever came up, so waiting cannot hide one.

use std::time::Duration;

use axum::http::StatusCode;
use runpod_emulator::{EmulatorConfig, Faults, WorkerCounts};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::common::*;

/// Long enough that a held job never ends by itself during a test.
fn hold() -> Faults {
    Faults {
        worker_delay_ms: 600_000,
        ..Default::default()
    }
}

fn low(mut body: Value) -> Value {
    body["policy"] = json!({"lowPriority": true});
    body
}

fn workers(min: usize, max: usize) -> impl FnOnce(&mut EmulatorConfig) {
    move |c| {
        c.workers_min = Some(min);
        c.workers_max = Some(max);
        // Nothing idles out unless a test says so.
        c.worker_idle_timeout = Duration::from_secs(600);
    }
}

async fn wait_workers(h: &Harness, done: impl Fn(&WorkerCounts) -> bool) -> WorkerCounts {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let counts = h.emu.workers();
        if done(&counts) {
            return counts;
        }
        assert!(Instant::now() < deadline, "workers still {counts:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn cancel(h: &Harness, id: &str) {
    let (_, body) = h.post(&format!("cancel/{id}"), Value::Null).await;
    assert_eq!(body["status"], "CANCELLED", "{body}");
}

fn worker_of(h: &Harness, id: &str) -> String {
    h.emu.job(id).unwrap().worker_id.expect("ran on a worker")
}

#[tokio::test]
async fn by_default_every_worker_is_always_up() {
    let h = start().await;
    assert_eq!(
        h.emu.workers(),
        WorkerCounts {
            up: 2,
            idle: 2,
            running: 0,
            peak: 2,
            min: 2,
            max: 2
        }
    );
}

#[tokio::test]
async fn workers_min_above_workers_max_is_refused() {
    let dir = TestDir::new();
    let mut config = fast_config(&dir);
    config.workers_min = Some(2);
    config.workers_max = Some(1);
    let result = runpod_emulator::spawn(config, any_port(), any_port()).await;
    assert!(result.is_err());
}

#[tokio::test]
async fn a_low_priority_job_alone_starts_no_worker_and_stays_queued() {
    let h = start_with(workers(0, 1)).await;
    let id = h.run(low(json!({"input": {}, "policy": {}}))).await;
    let mut body = low(trivial_job(&h.dir));
    body["policy"]["ttl"] = json!(1000);
    let id_with_ttl = h.run(body).await;
    assert_eq!(h.emu.workers().up, 0);

    // Queued all its life: the TTL removes it without a worker ever taking it.
    let (code, _) = h
        .wait_for(&id_with_ttl, Duration::from_secs(10), |code, body| {
            assert!(
                code == StatusCode::NOT_FOUND || body["status"] == "IN_QUEUE",
                "{code} {body}"
            );
            code == StatusCode::NOT_FOUND
        })
        .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    assert_eq!(h.status(&id).await.1["status"], "IN_QUEUE");
    assert_eq!(h.emu.workers().peak, 0);
    assert_eq!(
        h.get("health").await.1["workers"],
        json!({"idle": 0, "running": 0})
    );
}

#[tokio::test]
async fn a_low_priority_job_queued_meanwhile_runs_on_the_worker_a_normal_job_started() {
    let h = start_with(workers(0, 2)).await;
    h.emu.set_faults(hold());
    let normal = h.run(json!({"input": {}})).await;
    h.wait_status(&normal, "IN_PROGRESS").await;

    let low_job = h.run(low(trivial_job(&h.dir))).await;
    assert_eq!(h.emu.workers().up, 1, "the low-priority job started none");
    assert_eq!(h.status(&low_job).await.1["status"], "IN_QUEUE");

    h.emu.set_faults(Faults::default());
    cancel(&h, &normal).await;
    h.wait_status(&low_job, "COMPLETED").await;
    assert_eq!(worker_of(&h, &low_job), worker_of(&h, &normal));
    assert_eq!(h.emu.workers().peak, 1);
}

#[tokio::test]
async fn a_low_priority_job_runs_on_the_always_up_worker() {
    let h = start_with(workers(1, 2)).await;
    let id = h.run(low(trivial_job(&h.dir))).await;
    h.wait_status(&id, "COMPLETED").await;
    assert_eq!(worker_of(&h, &id), "builtin-0");
    assert_eq!(h.emu.workers().peak, 1, "no worker started for it");
}

#[tokio::test]
async fn a_normal_job_starts_a_worker_when_none_is_free() {
    let h = start_with(workers(0, 2)).await;
    assert_eq!(h.emu.workers().up, 0);
    let id = h.run(trivial_job(&h.dir)).await;
    h.wait_status(&id, "COMPLETED").await;
    assert_eq!(h.emu.workers().peak, 1);
}

#[tokio::test]
async fn a_normal_job_left_behind_when_its_worker_takes_a_low_one_starts_another() {
    // FIFO: the worker the normal job starts takes the low-priority job queued before it, so the
    // normal job still has no free worker and starts a second one.
    let h = start_with(workers(1, 3)).await;
    h.emu.set_faults(hold());
    let busy = h.run(json!({"input": {}})).await;
    h.wait_status(&busy, "IN_PROGRESS").await;
    let low_job = h.run(low(json!({"input": {}}))).await;
    let normal = h.run(json!({"input": {}})).await;

    let counts = wait_workers(&h, |c| c.running == 3).await;
    assert_eq!((counts.up, counts.peak), (3, 3));
    assert_eq!(h.status(&low_job).await.1["status"], "IN_PROGRESS");
    assert_eq!(h.status(&normal).await.1["status"], "IN_PROGRESS");
}

#[tokio::test]
async fn never_more_than_workers_max_workers_are_up() {
    let h = start_with(workers(0, 2)).await;
    h.emu.set_faults(hold());
    for _ in 0..5 {
        h.run(json!({"input": {}})).await;
    }
    let counts = wait_workers(&h, |c| c.running == 2).await;
    assert_eq!((counts.up, counts.peak), (2, 2));
    let (_, health) = h.get("health").await;
    assert_eq!(health["jobs"]["inProgress"], 2);
    assert_eq!(health["jobs"]["inQueue"], 3);
    assert_eq!(health["workers"], json!({"idle": 0, "running": 2}));
}

#[tokio::test]
async fn low_priority_last_serves_a_later_normal_job_before_an_earlier_low_one() {
    let h = start_with(|c| {
        workers(1, 1)(c);
        c.low_priority_last = true;
    })
    .await;
    h.emu.set_faults(hold());
    let busy = h.run(json!({"input": {}})).await;
    h.wait_status(&busy, "IN_PROGRESS").await;
    let low_job = h.run(low(json!({"input": {}}))).await;
    let normal = h.run(json!({"input": {}})).await;

    cancel(&h, &busy).await;
    h.wait_status(&normal, "IN_PROGRESS").await;
    assert_eq!(h.status(&low_job).await.1["status"], "IN_QUEUE");
}

#[tokio::test]
async fn without_low_priority_last_the_queue_is_fifo_whatever_the_priority() {
    let h = start_with(workers(1, 1)).await;
    h.emu.set_faults(hold());
    let busy = h.run(json!({"input": {}})).await;
    h.wait_status(&busy, "IN_PROGRESS").await;
    let low_job = h.run(low(json!({"input": {}}))).await;
    let normal = h.run(json!({"input": {}})).await;

    cancel(&h, &busy).await;
    h.wait_status(&low_job, "IN_PROGRESS").await;
    assert_eq!(h.status(&normal).await.1["status"], "IN_QUEUE");
}

#[tokio::test]
async fn an_idle_worker_above_the_minimum_goes_down_after_the_idle_timeout() {
    let idle_timeout = Duration::from_millis(300);
    let h = start_with(|c| {
        workers(1, 2)(c);
        c.worker_idle_timeout = idle_timeout;
    })
    .await;
    h.emu.set_faults(hold());
    let a = h.run(json!({"input": {}})).await;
    let b = h.run(json!({"input": {}})).await;
    wait_workers(&h, |c| c.running == 2).await;

    let freed_at = Instant::now();
    cancel(&h, &a).await;
    cancel(&h, &b).await;
    let counts = wait_workers(&h, |c| c.up == 1).await;
    assert!(freed_at.elapsed() >= idle_timeout);
    assert_eq!((counts.idle, counts.peak), (1, 2));

    // The one left is the minimum's: a low-priority job still finds it.
    h.emu.set_faults(Faults::default());
    let id = h.run(low(trivial_job(&h.dir))).await;
    h.wait_status(&id, "COMPLETED").await;
}

#[tokio::test]
async fn worker_counts_are_visible_over_http() {
    let h = start_with(workers(0, 1)).await;
    let url = format!("{}/_emulator/workers", h.emu.api_url);
    let counts: Value = h.http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        counts,
        json!({"up": 0, "idle": 0, "running": 0, "peak": 0, "min": 0, "max": 1})
    );

    h.emu.set_faults(hold());
    let id = h.run(json!({"input": {}})).await;
    h.wait_status(&id, "IN_PROGRESS").await;
    let counts: Value = h.http.get(&url).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        counts,
        json!({"up": 1, "idle": 0, "running": 1, "peak": 1, "min": 0, "max": 1})
    );
    assert_eq!(
        h.get("health").await.1["workers"],
        json!({"idle": 0, "running": 1})
    );
}
