//! Progress, cost and usage: what a running job shows of its worker's progress, what an ended
//! job cost, and the owner's totals per day, counted once by the write that ends each job.
use gateway::app::api::Refusal;
use gateway::app::observe::Outcome;
use gateway::domain::job::{utc_day, Actor, Job, JobState};
use gateway::ports::{JobStore, RunPodStatus};
use serde_json::{json, Value};
use testkit::images::jpeg;
use testkit::jobs::inline_request;
use testkit::Kit;

/// A job RunPod has, its run named `rp-1`.
async fn submitted(kit: &Kit) -> Job {
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.stored(&job.id)
}

fn in_progress(output: Value) -> RunPodStatus {
    RunPodStatus {
        id: Some("rp-1".into()),
        status: Some("IN_PROGRESS".into()),
        output: Some(output),
        ..RunPodStatus::default()
    }
}

async fn observe(kit: &Kit, job_id: &str, status: &RunPodStatus) -> Outcome {
    kit.observer()
        .observe_as(kit.stored(job_id), status, Actor::Sweeper)
        .await
        .unwrap()
}

/// Runs `job` to success on RunPod with `gpu_ms` of GPU time.
async fn succeed(kit: &Kit, job: &Job, gpu_ms: u64) -> Job {
    let mut status = kit.completed_run("rp-1", &[kit.volume_output(&job.id, "restore_00001_.png")]);
    status.execution_time = Some(gpu_ms);
    kit.runpod.set_status("rp-1", status.clone());
    kit.observe_then_finalize(kit.stored(&job.id), &status, Actor::Webhook)
        .await
        .unwrap();
    let done = kit.stored(&job.id);
    assert_eq!(done.state, JobState::Succeeded);
    done
}

async fn usage_today(kit: &Kit, owner: &str) -> gateway::domain::usage::DailyUsage {
    let day = utc_day(kit.now());
    kit.store
        .usage(owner, std::slice::from_ref(&day))
        .await
        .unwrap()
        .pop()
        .unwrap_or_else(|| gateway::domain::usage::DailyUsage::new(&day))
}

// ------------------------------------------------------------------ progress

#[tokio::test]
async fn a_workers_progress_shows_on_the_running_job() {
    let kit = Kit::new();
    let job = submitted(&kit).await;

    observe(
        &kit,
        &job.id,
        &in_progress(json!({"percent": 40, "message": "restoring"})),
    )
    .await;

    let running = kit.stored(&job.id);
    assert_eq!(running.state, JobState::Running);
    let progress = running.progress.unwrap();
    assert_eq!(progress.fraction, Some(0.4));
    assert_eq!(progress.message.as_deref(), Some("restoring"));
}

#[tokio::test]
async fn each_progress_report_replaces_the_last_and_adds_no_history() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    observe(&kit, &job.id, &in_progress(json!("loading workflow"))).await;
    let history = kit.stored(&job.id).history.len();

    observe(&kit, &job.id, &in_progress(json!(0.75))).await;

    let stored = kit.stored(&job.id);
    assert_eq!(stored.history.len(), history);
    let progress = stored.progress.unwrap();
    assert_eq!((progress.fraction, progress.message), (Some(0.75), None));
}

#[tokio::test]
async fn the_same_progress_reported_again_writes_nothing() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let report = in_progress(json!({"progress": 0.5}));
    observe(&kit, &job.id, &report).await;
    let writes = kit.store.writes();

    let again = observe(&kit, &job.id, &report).await;

    assert_eq!(again, Outcome::Unchanged);
    assert_eq!(kit.store.writes(), writes);
}

#[tokio::test]
async fn a_progress_report_the_gateway_cannot_read_still_marks_the_job_running() {
    let kit = Kit::new();
    let job = submitted(&kit).await;

    observe(&kit, &job.id, &in_progress(json!([{"weird": true}]))).await;

    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Running);
    assert_eq!(stored.progress, None);
}

#[tokio::test]
async fn a_progress_report_for_an_ended_job_changes_nothing() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let done = succeed(&kit, &job, 1_000).await;

    observe(&kit, &job.id, &in_progress(json!(0.9))).await;

    assert_eq!(kit.stored(&job.id).version, done.version);
}

// ------------------------------------------------------------------ cost

#[tokio::test]
async fn a_job_costs_its_gpu_time_at_the_price_when_it_was_accepted() {
    let kit = Kit::new().with_settings(|s| s.gpu_price_nano_usd = Some(310_000));
    let accepted = match kit
        .api()
        .submit("alice", inline_request(&jpeg(64, 48)), None)
        .await
    {
        Ok(gateway::app::api::Submitted::Accepted(job)) => job,
        other => panic!("{other:?}"),
    };
    assert_eq!(accepted.gpu_price_nano_usd, Some(310_000));
    kit.dispatcher().dispatch(&accepted.id).await.unwrap();

    let done = succeed(&kit, &accepted, 2_000).await;

    assert_eq!(done.gpu_seconds(), Some(2.0));
    assert_eq!(done.cost_nano_usd(), Some(620_000));
}

#[tokio::test]
async fn without_a_price_a_job_shows_no_cost() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let done = succeed(&kit, &job, 2_000).await;
    assert_eq!(done.cost_nano_usd(), None);
    assert_eq!(done.gpu_seconds(), Some(2.0));
}

// ------------------------------------------------------------------ usage

#[tokio::test]
async fn an_ended_job_counts_in_its_owners_usage_for_the_day() {
    let kit = Kit::new();
    let mut job = submitted(&kit).await;
    job.gpu_price_nano_usd = Some(1_000_000);
    kit.store.put(job.clone());

    succeed(&kit, &job, 1_500).await;

    let day = usage_today(&kit, "alice").await;
    assert_eq!((day.succeeded, day.jobs()), (1, 1));
    assert_eq!((day.gpu_ms, day.cost_nano_usd), (1_500, 1_500_000));
    assert_eq!(usage_today(&kit, "bob").await.jobs(), 0, "per owner");
}

#[tokio::test]
async fn every_kind_of_end_is_counted_by_its_state() {
    let kit = Kit::new();
    let cancelled = kit.queued_job("alice");
    kit.api().cancel("alice", &cancelled.id).await.unwrap();
    let failed = submitted(&kit).await;
    let status = RunPodStatus {
        id: Some("rp-1".into()),
        status: Some("FAILED".into()),
        error: Some(json!("boom")),
        execution_time: Some(300),
        ..RunPodStatus::default()
    };
    observe(&kit, &failed.id, &status).await;

    let day = usage_today(&kit, "alice").await;
    assert_eq!((day.cancelled, day.failed, day.gpu_ms), (1, 1, 300));
}

#[tokio::test]
async fn reports_after_the_end_never_count_the_job_again() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let mut status = kit.completed_run("rp-1", &[kit.volume_output(&job.id, "restore_00001_.png")]);
    status.execution_time = Some(1_000);
    let done = succeed(&kit, &job, 1_000).await;

    kit.observe_then_finalize(done, &status, Actor::Webhook)
        .await
        .unwrap();
    kit.sweeper().sweep().await.unwrap();
    kit.clock.advance(kit.settings.finalize_lease * 2);
    kit.sweeper().sweep().await.unwrap();

    assert_eq!(usage_today(&kit, "alice").await.succeeded, 1);
}

#[tokio::test]
async fn an_ending_write_whose_answer_was_lost_counts_once() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.store.lose_answers(1);

    kit.api().cancel("alice", &job.id).await.unwrap();

    assert_eq!(kit.stored(&job.id).state, JobState::Cancelled);
    assert_eq!(usage_today(&kit, "alice").await.cancelled, 1);
}

#[tokio::test]
async fn two_writers_racing_to_end_a_job_count_it_once() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let status = RunPodStatus {
        id: Some("rp-1".into()),
        status: Some("FAILED".into()),
        error: Some(json!("boom")),
        ..RunPodStatus::default()
    };
    let (a, b) = (kit.observer(), kit.observer());

    let _ = tokio::join!(
        a.observe_as(kit.stored(&job.id), &status, Actor::Webhook),
        b.observe_as(kit.stored(&job.id), &status, Actor::Sweeper)
    );

    assert_eq!(usage_today(&kit, "alice").await.failed, 1);
}

#[tokio::test]
async fn the_usage_api_answers_every_day_of_the_range() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.api().cancel("alice", &job.id).await.unwrap();
    let today = utc_day(kit.now());

    let days = kit
        .api()
        .usage("alice", "2027-01-13", &today)
        .await
        .unwrap();

    assert_eq!(days.len(), 3, "{days:?}");
    assert_eq!(days.last().unwrap().day, today);
    assert_eq!(days.last().unwrap().cancelled, 1);
    assert!(days[..2].iter().all(|d| d.jobs() == 0));
}

#[tokio::test]
async fn a_usage_range_that_is_no_range_is_refused() {
    let kit = Kit::new();
    let api = kit.api();
    for (from, to) in [
        ("2027-01-15", "2027-01-14"),
        ("2027-01-01", "2027-12-31"),
        ("yesterday", "2027-01-14"),
    ] {
        let refused = api.usage("alice", from, to).await;
        assert!(
            matches!(
                refused,
                Err(Refusal::Invalid {
                    code: "invalid_range",
                    ..
                })
            ),
            "{from}..{to}: {refused:?}"
        );
    }
}
