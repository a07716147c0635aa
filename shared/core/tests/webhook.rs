//! The webhook: a call proven ours by the per-job token triggers a look at RunPod's `/status`,
//! which alone decides; a completed run is handed to finalize once, and the job finishes once.
use gateway::app::observe::Outcome;
use gateway::app::webhook::WebhookOutcome;
use gateway::domain::job::{Actor, ErrorCode, Job, JobState};
use testkit::Kit;

/// A job dispatched to RunPod (`rp-1`) whose worker has finished, and RunPod's report of it.
async fn completed(kit: &Kit) -> (Job, String) {
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    let status = kit.completed_run("rp-1", &[kit.volume_output(&job.id, "restore_00001_.png")]);
    (kit.stored(&job.id), serde_json::to_string(&status).unwrap())
}

fn token(kit: &Kit, job: &Job) -> String {
    kit.signer.token(&job.id)
}

/// RunPod's webhook call for `job`, with `report` as its body and the job's own token.
async fn deliver(kit: &Kit, job: &Job, report: &gateway::ports::RunPodStatus) -> WebhookOutcome {
    kit.webhook()
        .receive(
            &job.id,
            &token(kit, job),
            serde_json::to_string(report).unwrap().as_bytes(),
        )
        .await
}

#[tokio::test]
async fn a_completed_report_is_handed_off_and_finalize_stores_the_outputs() {
    let kit = Kit::new();
    let (job, body) = completed(&kit).await;
    let touched = kit.volume.touched();

    let outcome = kit
        .webhook()
        .receive(&job.id, &token(&kit, &job), body.as_bytes())
        .await;

    assert_eq!(outcome, WebhookOutcome::Handled(Outcome::HandedOff));
    assert_eq!(kit.volume.touched(), touched, "the webhook reads no volume");
    kit.run_finalize().await;
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Succeeded);
    assert_eq!(stored.outputs.len(), 1);
    let copied = kit.results.get(&stored.outputs[0].key).unwrap();
    let written = kit
        .volume
        .get(&kit.volume_output(&job.id, "restore_00001_.png"))
        .unwrap();
    assert_eq!(copied, written);
    assert_eq!(stored.history.last().unwrap().by, Actor::Finalize);
    assert!(stored.lease.is_none() && stored.cleanup_pending);
}

#[tokio::test]
async fn a_wrong_or_missing_token_is_refused_and_nothing_is_read() {
    let kit = Kit::new();
    let (job, body) = completed(&kit).await;
    let other = kit.queued_job("bob");
    let calls = kit.runpod.calls().len();
    let reads = kit.store.reads();

    for bad in ["", "nonsense", &token(&kit, &other)] {
        let outcome = kit.webhook().receive(&job.id, bad, body.as_bytes()).await;
        assert_eq!(outcome, WebhookOutcome::Unauthorized, "token {bad:?}");
    }
    assert_eq!(kit.stored(&job.id).state, JobState::Submitted);
    assert_eq!(kit.runpod.calls().len(), calls, "no RunPod call");
    assert_eq!(kit.store.reads(), reads, "no job store read");
    assert!(kit.results.keys().is_empty());
}

#[tokio::test]
async fn the_same_report_delivered_twice_finishes_the_job_once() {
    let kit = Kit::new();
    let (job, body) = completed(&kit).await;
    let webhook = kit.webhook();
    webhook
        .receive(&job.id, &token(&kit, &job), body.as_bytes())
        .await;
    let writes = kit.store.writes();

    let again = webhook
        .receive(&job.id, &token(&kit, &job), body.as_bytes())
        .await;

    assert_eq!(again, WebhookOutcome::Handled(Outcome::Unchanged));
    assert_eq!(kit.store.writes(), writes, "no second write");
    kit.run_finalize().await;
    let stored = kit.stored(&job.id);
    let ends = stored.history.iter().filter(|e| e.to.is_terminal()).count();
    assert_eq!(ends, 1);
}

#[tokio::test]
async fn concurrent_deliveries_finish_the_job_once() {
    let kit = Kit::new();
    let (job, body) = completed(&kit).await;
    let (a, b) = (kit.webhook(), kit.webhook());
    let token = token(&kit, &job);

    let (first, second) = tokio::join!(
        a.receive(&job.id, &token, body.as_bytes()),
        b.receive(&job.id, &token, body.as_bytes())
    );

    let handed = [&first, &second]
        .iter()
        .filter(|o| ***o == WebhookOutcome::Handled(Outcome::HandedOff))
        .count();
    assert_eq!(handed, 1, "{first:?} / {second:?}");
    kit.run_finalize().await;
    let stored = kit.stored(&job.id);
    assert_eq!(
        stored.history.iter().filter(|e| e.to.is_terminal()).count(),
        1
    );
}

#[tokio::test]
async fn an_empty_body_is_a_hint_to_ask_runpod() {
    let kit = Kit::new();
    let (job, _) = completed(&kit).await;

    let outcome = kit
        .webhook()
        .receive(&job.id, &token(&kit, &job), b"")
        .await;

    assert_eq!(outcome, WebhookOutcome::Handled(Outcome::HandedOff));
    assert!(kit.runpod.calls().contains(&"status rp-1".to_string()));
}

#[tokio::test]
async fn a_report_about_another_run_is_not_believed() {
    let kit = Kit::new();
    let (job, _) = completed(&kit).await;
    // A well-formed report, for a run this job is not tracking: RunPod is asked instead, and
    // RunPod's own word (rp-1 completed) decides.
    let forged = serde_json::json!({"id": "rp-999", "status": "FAILED", "error": "boom"});

    let outcome = kit
        .webhook()
        .receive(&job.id, &token(&kit, &job), forged.to_string().as_bytes())
        .await;

    assert_eq!(outcome, WebhookOutcome::Handled(Outcome::HandedOff));
}

#[tokio::test]
async fn a_run_runpod_reports_failed_fails_the_job_with_the_workers_message() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    let failed =
        serde_json::json!({"id": "rp-1", "status": "FAILED", "error": "CUDA out of memory"});
    kit.runpod
        .set_status("rp-1", serde_json::from_value(failed.clone()).unwrap());

    kit.webhook()
        .receive(&job.id, &token(&kit, &job), failed.to_string().as_bytes())
        .await;

    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Failed);
    let error = stored.error.unwrap();
    assert_eq!(error.code, ErrorCode::WorkerFailed);
    assert!(
        error.message.contains("CUDA out of memory"),
        "{}",
        error.message
    );
}

#[tokio::test]
async fn a_completed_body_for_a_run_runpod_still_reports_in_progress_changes_nothing() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    // The worker has written files, and someone who saw the webhook URL reports them done.
    let forged = kit.completed_run("rp-1", &[kit.volume_output(&job.id, "restore_00001_.png")]);
    kit.running_run("rp-1");
    let running = gateway::ports::RunPodStatus {
        id: Some("rp-1".into()),
        status: Some("IN_PROGRESS".into()),
        ..Default::default()
    };
    kit.observer()
        .observe(kit.stored(&job.id), &running)
        .await
        .unwrap();
    let before = kit.stored(&job.id);
    assert_eq!(before.state, JobState::Running);

    let outcome = deliver(&kit, &job, &forged).await;

    assert_eq!(outcome, WebhookOutcome::Handled(Outcome::Unchanged));
    assert_eq!(kit.stored(&job.id), before);
    assert!(kit.results.keys().is_empty(), "nothing was copied");
    assert!(kit.runpod.calls().contains(&"status rp-1".to_string()));
}

#[tokio::test]
async fn a_store_outage_defers_the_call_for_runpods_retry() {
    let kit = Kit::new();
    let (job, body) = completed(&kit).await;
    kit.store.fail_next(1);

    let outcome = kit
        .webhook()
        .receive(&job.id, &token(&kit, &job), body.as_bytes())
        .await;

    assert!(
        matches!(outcome, WebhookOutcome::Deferred(_)),
        "{outcome:?}"
    );
    assert_eq!(kit.stored(&job.id).state, JobState::Submitted);
}

// ------------------------------------------------------------------ runs nobody recorded

#[tokio::test]
async fn a_run_whose_answer_was_lost_is_adopted_when_it_announces_itself() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.runpod.answer_runs(&[testkit::fakes::Answer::Lost]);
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    // The run RunPod did take (rp-1) completes and calls the job's webhook.
    let report = kit.completed_run(
        "rp-1",
        &[kit.volume_output(&job.id, "a1/restore_00001_.png")],
    );

    let outcome = deliver(&kit, &job, &report).await;

    assert_eq!(outcome, WebhookOutcome::Handled(Outcome::HandedOff));
    kit.run_finalize().await;
    let stored = kit.stored(&job.id);
    assert_eq!(stored.runpod_job_id.as_deref(), Some("rp-1"));
    assert_eq!(stored.outputs.len(), 1);
    assert_eq!(kit.runpod.accepted().len(), 1, "no second run");
}

#[tokio::test]
async fn a_run_runpod_does_not_know_is_not_adopted() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    let before = kit.stored(&job.id);
    let forged = serde_json::json!({"id": "rp-404", "status": "COMPLETED"});

    let outcome = kit
        .webhook()
        .receive(&job.id, &token(&kit, &job), forged.to_string().as_bytes())
        .await;

    assert_eq!(outcome, WebhookOutcome::Handled(Outcome::Unchanged));
    assert_eq!(kit.stored(&job.id), before);
}

#[tokio::test]
async fn an_extra_run_that_announces_itself_is_cancelled_and_its_result_ignored() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.runpod.answer_runs(&[testkit::fakes::Answer::Lost]);
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.clock.advance(kit.settings.run_outcome_grace);
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.running_run("rp-2");
    // The first run (rp-1) completes after all, and calls the job's webhook.
    let extra = kit.completed_run(
        "rp-1",
        &[kit.volume_output(&job.id, "a1/restore_00001_.png")],
    );

    let outcome = deliver(&kit, &job, &extra).await;

    assert!(matches!(outcome, WebhookOutcome::Handled(_)), "{outcome:?}");
    assert_eq!(kit.stops.runs(), vec!["rp-1".to_string()]);
    let stored = kit.stored(&job.id);
    assert_eq!(stored.runpod_job_id.as_deref(), Some("rp-2"));
    assert_ne!(
        stored.state,
        JobState::Succeeded,
        "rp-1's result is not the job's"
    );
    assert!(kit.results.keys().is_empty());
}

#[tokio::test]
async fn a_runpod_answer_too_long_to_read_fails_the_job_output_too_large() {
    let kit = Kit::new();
    let (job, body) = completed(&kit).await;
    kit.runpod
        .fail_status("rp-1", testkit::fakes::Answer::TooLarge);

    let outcome = kit
        .webhook()
        .receive(&job.id, &token(&kit, &job), body.as_bytes())
        .await;

    assert_eq!(
        outcome,
        WebhookOutcome::Handled(Outcome::Finished(JobState::Failed))
    );
    let stored = kit.stored(&job.id);
    assert_eq!(stored.error.unwrap().code, ErrorCode::OutputTooLarge);
    assert!(kit.results.keys().is_empty(), "nothing stored");
    assert!(kit.finalize.sent().is_empty(), "nothing handed off");
}
