//! The sweeper: what no event brought home, it does: re-enqueue, poll, expire, time out.
use std::time::Duration;

use gateway::app::observe::Outcome;
use gateway::app::webhook::WebhookOutcome;
use gateway::domain::job::{Actor, ErrorCode, JobState};
use testkit::fakes::{Answer, BrokenKey};
use testkit::Kit;

#[tokio::test]
async fn a_job_still_queued_after_the_requeue_delay_is_enqueued_again() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.clock.advance(kit.settings.requeue_after);

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!(report.requeued, 1);
    assert_eq!(kit.queue.sent(), vec![job.id.clone()]);
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Queued);
    assert!(
        stored.next_check_at.unwrap() > kit.now(),
        "looked at again later"
    );
}

#[tokio::test]
async fn nothing_is_due_before_its_time() {
    let kit = Kit::new();
    kit.queued_job("alice");

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!((report.due, report.items_read), (0, 0));
    assert!(kit.queue.sent().is_empty());
}

#[tokio::test]
async fn a_job_whose_webhook_never_came_is_handed_to_finalize_from_runpods_status() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.completed_run("rp-1", &[kit.volume_output(&job.id, "restore_00001_.png")]);
    kit.clock.advance(kit.settings.status_poll_after);

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!((report.polled, report.handed_off), (1, 1));
    let handed = kit.stored(&job.id);
    assert!(handed.handoff.is_some());
    assert_eq!(handed.history.last().unwrap().by, Actor::Sweeper);
    kit.run_finalize().await;
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Succeeded);
    assert_eq!(stored.history.last().unwrap().by, Actor::Finalize);
    assert_eq!(kit.results.keys().len(), 1);
}

/// A job whose completed run was handed to finalize, and whose request to finalize was lost.
async fn handed_off_and_request_lost(kit: &Kit) -> gateway::domain::job::Job {
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    let status = kit.completed_run("rp-1", &[kit.volume_output(&job.id, "restore_00001_.png")]);
    kit.observer()
        .observe_as(kit.stored(&job.id), &status, Actor::Webhook)
        .await
        .unwrap();
    kit.finalize.take();
    kit.stored(&job.id)
}

#[tokio::test]
async fn a_handed_off_job_finalize_has_not_ended_is_asked_for_again() {
    let kit = Kit::new();
    let job = handed_off_and_request_lost(&kit).await;
    kit.clock.advance(Duration::from_millis(
        (job.next_check_at.unwrap() - kit.now()) as u64,
    ));

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!(report.refinalized, 1);
    assert_eq!(kit.finalize.waiting(), 1);
    assert!(kit.stored(&job.id).next_check_at.unwrap() > kit.now());
    kit.run_finalize().await;
    assert_eq!(kit.stored(&job.id).state, JobState::Succeeded);
}

#[tokio::test]
async fn a_handed_off_job_past_its_deadline_is_not_timed_out_while_finalize_may_collect() {
    let kit = Kit::new().with_settings(|s| s.finalize_give_up = s.job_deadline * 2);
    let job = handed_off_and_request_lost(&kit).await;
    kit.clock.advance(Duration::from_millis(
        (job.deadline_at - kit.now()) as u64 + 1_000,
    ));

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!((report.refinalized, report.timed_out), (1, 0));
    assert!(kit.stops.requested().is_empty(), "the run is over anyway");
    kit.run_finalize().await;
    assert_eq!(kit.stored(&job.id).state, JobState::Succeeded);
}

#[tokio::test]
async fn a_handed_off_job_finalize_could_not_collect_in_time_times_out() {
    let kit = Kit::new();
    let job = handed_off_and_request_lost(&kit).await;
    kit.clock.advance(kit.settings.finalize_give_up);

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!(report.timed_out, 1);
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::TimedOut);
    assert_eq!(stored.error.unwrap().code, ErrorCode::DeadlineExceeded);
}

#[tokio::test]
async fn a_job_still_running_is_polled_again_after_the_interval() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.running_run("rp-1");
    kit.clock.advance(kit.settings.status_poll_after);

    kit.sweeper().sweep().await.unwrap();

    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Running);
    let interval = kit.settings.poll_interval.as_millis() as i64;
    assert_eq!(stored.next_check_at, Some(kit.now() + interval));
}

#[tokio::test]
async fn a_job_runpod_no_longer_knows_fails_as_expired() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.clock.advance(kit.settings.status_poll_after);

    kit.sweeper().sweep().await.unwrap();

    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Failed);
    assert_eq!(stored.error.unwrap().code, ErrorCode::RunpodJobExpired);
}

#[tokio::test]
async fn runpod_unavailable_leaves_the_job_for_a_later_sweep() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.runpod.fail_status("rp-1", Answer::Transient);
    kit.clock.advance(kit.settings.status_poll_after);

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!(report.errors, 1);
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Submitted);
    assert_eq!(stored.check_failures, 1);
    assert!(stored.next_check_at.unwrap() > kit.now());
}

#[tokio::test]
async fn a_job_past_its_deadline_has_its_run_stopped_and_is_timed_out() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.running_run("rp-1");
    kit.clock
        .advance(kit.settings.job_deadline + Duration::from_secs(1));

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!(report.timed_out, 1);
    assert_eq!(kit.stops.runs(), vec!["rp-1".to_string()]);
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::TimedOut);
    assert_eq!(stored.error.unwrap().code, ErrorCode::DeadlineExceeded);
}

#[tokio::test]
async fn a_job_past_its_deadline_is_not_timed_out_while_its_stop_cannot_be_queued() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.running_run("rp-1");
    kit.clock
        .advance(kit.settings.job_deadline + Duration::from_secs(1));
    kit.stops.fail_next(1);

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!((report.timed_out, report.errors), (0, 1));
    assert_eq!(kit.stored(&job.id).state, JobState::Submitted);
}

#[tokio::test]
async fn a_job_held_by_a_finalize_is_left_alone() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    let mut held = kit.stored(&job.id);
    let read = held.version;
    held.acquire_lease(
        gateway::domain::job::LeaseKind::Finalize,
        kit.now(),
        kit.settings.finalize_lease.as_millis() as i64,
    )
    .unwrap();
    held.version += 1;
    gateway::ports::JobStore::save(kit.store.as_ref(), &held, read)
        .await
        .unwrap();
    // Due by its next check while the lease is in force: the lease holder decides.
    kit.clock.advance(
        kit.settings
            .status_poll_after
            .min(kit.settings.finalize_lease / 2),
    );
    let writes = kit.store.writes();

    kit.sweeper().sweep().await.unwrap();

    assert_eq!(kit.store.writes(), writes, "the sweeper wrote nothing");
    assert!(kit.stops.requested().is_empty());
}

#[tokio::test]
async fn the_webhook_and_the_sweeper_at_once_hand_off_and_finish_the_job_once() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    let status = kit.completed_run("rp-1", &[kit.volume_output(&job.id, "restore_00001_.png")]);
    kit.clock.advance(kit.settings.status_poll_after);
    let body = serde_json::to_string(&status).unwrap();
    let token = kit.signer.token(&job.id);
    let (webhook, sweeper) = (kit.webhook(), kit.sweeper());

    let (delivered, swept) = tokio::join!(
        webhook.receive(&job.id, &token, body.as_bytes()),
        sweeper.sweep()
    );

    let by_webhook = delivered == WebhookOutcome::Handled(Outcome::HandedOff);
    let by_sweeper = swept.unwrap().handed_off == 1;
    assert!(
        by_webhook ^ by_sweeper,
        "exactly one handed it off: {delivered:?}"
    );
    kit.run_finalize().await;
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Succeeded);
    assert_eq!(
        stored.history.iter().filter(|e| e.to.is_terminal()).count(),
        1
    );
    assert_eq!(kit.results.keys().len(), 1, "one copy of the output");
}

#[tokio::test]
async fn an_unreadable_record_is_skipped_and_counted_and_the_other_jobs_are_swept() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.store.put_unreadable("not-a-job", kit.now());
    kit.clock.advance(kit.settings.requeue_after);

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!(report.requeued, 1, "the readable job is still swept");
    assert_eq!(kit.queue.sent(), vec![job.id.clone()]);
    assert_eq!(report.unreadable, 1);
    assert_eq!(report.errors, 1, "the errors alarm sees it");
}

#[tokio::test]
async fn a_run_that_completed_is_handed_off_at_the_deadline_not_thrown_away() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.completed_run("rp-1", &[kit.volume_output(&job.id, "restore_00001_.png")]);
    kit.clock
        .advance(kit.settings.job_deadline + Duration::from_secs(1));

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!((report.handed_off, report.timed_out), (1, 0));
    kit.run_finalize().await;
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Succeeded);
    assert_eq!(stored.outputs.len(), 1);
    assert!(kit.stops.requested().is_empty());
}

#[tokio::test]
async fn a_status_outage_at_the_deadline_times_nothing_out() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.runpod.fail_status("rp-1", Answer::Transient);
    kit.clock
        .advance(kit.settings.job_deadline + Duration::from_secs(1));

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!(report.errors, 1);
    assert_eq!(kit.stored(&job.id).state, JobState::Submitted);
}

// ------------------------------------------------------------------ ended jobs' leftovers

/// A job that succeeded through `kit`, with a copy of a killed attempt left in its results
/// folder and its input and outputs still on the volume.
async fn succeeded_with_leftovers(kit: &Kit) -> gateway::domain::job::Job {
    let job = kit.queued_job("alice");
    kit.uploads
        .insert(&job.input.key, &testkit::images::jpeg(32, 24));
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    let file = kit.volume_output(&job.id, "a1/restore_00001_.png");
    let status = kit.completed_run("rp-1", std::slice::from_ref(&file));
    kit.observe_then_finalize(kit.stored(&job.id), &status, Actor::Webhook)
        .await
        .unwrap();
    kit.results.insert(
        &format!("results/alice/{}/fdead/restore_00001_.png", job.id),
        b"a killed attempt's copy",
    );
    kit.stored(&job.id)
}

#[tokio::test]
async fn an_ended_jobs_leftovers_wait_until_no_finalize_can_still_be_at_work() {
    let kit = Kit::new();
    let job = succeeded_with_leftovers(&kit).await;
    // A record from before jobs carried their clean-up delay: due as soon as it ended.
    let mut legacy = kit.stored(&job.id);
    legacy.cleanup_delay_ms = 0;
    legacy.next_check_at = legacy.timestamps.finished_at;
    kit.store.put(legacy);
    let volume_before = kit.volume.keys().len();

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!(report.cleaned, 0);
    assert_eq!(kit.volume.keys().len(), volume_before);
    let stored = kit.stored(&job.id);
    let lease = kit.settings.finalize_lease.as_millis() as i64;
    assert_eq!(
        stored.next_check_at,
        Some(stored.timestamps.finished_at.unwrap() + lease)
    );
}

#[tokio::test]
async fn an_ended_job_leaves_nothing_on_the_volume_and_only_its_outputs_in_the_bucket() {
    let kit = Kit::new();
    let job = succeeded_with_leftovers(&kit).await;
    assert!(kit.volume.keys().iter().any(|k| k.contains(&job.id)));
    kit.clock.advance(kit.settings.finalize_lease);

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!(report.cleaned, 1);
    let on_volume: Vec<String> = kit
        .volume
        .keys()
        .into_iter()
        .filter(|k| k.contains(&job.id))
        .collect();
    assert!(on_volume.is_empty(), "{on_volume:?}");
    let stored = kit.stored(&job.id);
    let outputs: Vec<String> = stored.outputs.iter().map(|o| o.key.clone()).collect();
    assert_eq!(
        kit.results.keys(),
        outputs,
        "only the job's own outputs stay"
    );
    assert_eq!(
        stored.next_check_at,
        Some(stored.retained_until()),
        "next due when its retention ends"
    );
    assert!(!stored.cleanup_pending);
}

#[tokio::test]
async fn a_cancelled_jobs_volume_folders_are_removed_too() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.api().cancel("alice", &job.id).await.unwrap();
    assert!(kit.volume.keys().iter().any(|k| k.contains(&job.id)));
    kit.clock.advance(kit.settings.finalize_lease);

    kit.sweeper().sweep().await.unwrap();

    assert!(kit.volume.keys().iter().all(|k| !k.contains(&job.id)));
    let stored = kit.stored(&job.id);
    assert_eq!(stored.next_check_at, Some(stored.retained_until()));
}

#[tokio::test]
async fn a_cleanup_that_fails_is_retried_by_a_later_sweep() {
    let kit = Kit::new();
    let job = succeeded_with_leftovers(&kit).await;
    kit.clock.advance(kit.settings.finalize_lease);
    let stuck = format!("results/alice/{}/fdead/restore_00001_.png", job.id);
    kit.results.break_key(&stuck, BrokenKey::Transient);

    let first = kit.sweeper().sweep().await.unwrap();
    assert_eq!((first.cleaned, first.errors), (0, 1));
    assert!(kit.stored(&job.id).cleanup_pending, "still findable");

    kit.results.mend_key(&stuck);
    kit.clock.advance(kit.settings.poll_interval);
    let second = kit.sweeper().sweep().await.unwrap();
    assert_eq!(second.cleaned, 1);
    assert!(kit.results.get(&stuck).is_none());
}

#[tokio::test]
async fn a_runpod_answer_too_long_to_read_fails_the_job_at_the_poll() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.runpod.fail_status("rp-1", Answer::TooLarge);
    kit.clock.advance(kit.settings.status_poll_after);

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!((report.polled, report.finished), (1, 1));
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Failed);
    assert_eq!(stored.error.unwrap().code, ErrorCode::OutputTooLarge);
}
