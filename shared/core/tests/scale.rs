//! The sweep at scale. If RunPod's webhooks stop for everyone, the sweeper alone must poll every
//! job in flight, and hand each completed run to finalize before RunPod drops its result, 30
//! minutes after completion. Simulated over the in-memory ports and a virtual clock: one sweep
//! per virtual minute, each taking at most `sweep_batch` jobs, as the sweeper function does in
//! AWS at its share of RunPod's `/status` limit. (moto cannot hold this many jobs: it walks
//! every item of the table on an index query.)
use std::time::Duration;

use gateway::domain::job::Millis;
use gateway::ports::RunPodStatus;
use testkit::Kit;

/// How long RunPod keeps a finished `/run` job's result.
const RESULT_KEPT: Duration = Duration::from_secs(30 * 60);

fn jobs_in_flight() -> usize {
    std::env::var("SCALE_JOBS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(100_000)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_webhooks_every_job_in_flight_is_handed_off_before_runpod_drops_its_result() {
    let kit = Kit::new();
    let jobs = jobs_in_flight();
    let timing = gateway::app::api::timing(&kit.settings, None);
    let started = kit.now();
    for i in 0..jobs {
        let id = format!("0190a1b2-0000-7000-8000-{i:012x}");
        let run = format!("rp-{i}");
        let mut job = testkit::jobs::restore_job(
            &kit.catalog,
            &id,
            "alice",
            &format!("inputs/alice/{id}/input.jpg"),
            1_000,
            timing,
            started,
        );
        // Submitted and running at RunPod, every one due for a poll now.
        job.mark_submitted(run.clone(), started, started).unwrap();
        kit.store.put(job);
        // The whole fleet completes at once, and not one webhook comes.
        kit.runpod.set_status(
            &run,
            RunPodStatus {
                id: Some(run.clone()),
                status: Some("COMPLETED".into()),
                output: Some(serde_json::json!({"files": []})),
                ..RunPodStatus::default()
            },
        );
    }

    let sweeper = kit.sweeper();
    let (mut handed_off, mut sweeps, mut last_hand_off): (usize, usize, Millis) = (0, 0, started);
    while handed_off < jobs && kit.now() - started <= 2 * RESULT_KEPT.as_millis() as Millis {
        let report = sweeper.sweep().await.unwrap();
        sweeps += 1;
        assert_eq!(report.errors, 0, "{report:?}");
        assert!(
            report.due <= kit.settings.sweep_batch as usize,
            "{report:?}"
        );
        if report.handed_off > 0 {
            handed_off += report.handed_off;
            last_hand_off = kit.now();
        }
        // Finalize is not simulated: the hand-offs' requests are dropped.
        kit.finalize.take();
        kit.clock.advance(Duration::from_secs(60));
    }

    let took = Duration::from_millis((last_hand_off - started) as u64);
    println!(
        "{jobs} jobs in flight: all handed off after {} min, {sweeps} sweeps of at most {} jobs",
        took.as_secs() / 60,
        kit.settings.sweep_batch
    );
    assert_eq!(handed_off, jobs, "every completed run handed off");
    assert!(
        took < RESULT_KEPT,
        "the last hand-off came {} s after completion",
        took.as_secs()
    );
}
