//! Observing and finalizing: what a RunPod report means for the job, the hand-off of a
//! completed run, and collecting its outputs exactly once.
use gateway::app::finalize::FinalizeError;
use gateway::app::observe::{decide, Decision, Outcome};
use gateway::domain::job::{Actor, ErrorCode, Job, JobError, JobState, LeaseKind};
use gateway::ports::{JobStore, ObjectStore, RunPodStatus};
use testkit::fakes::{Answer, BrokenKey};
use testkit::{Kit, VOLUME_ROOT};

/// A job dispatched to RunPod as `rp-1`.
async fn submitted(kit: &Kit) -> Job {
    let job = kit.queued_job("alice");
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    kit.stored(&job.id)
}

fn report(status: &str, output: Option<serde_json::Value>) -> RunPodStatus {
    RunPodStatus {
        id: Some("rp-1".into()),
        status: Some(status.into()),
        output,
        ..RunPodStatus::default()
    }
}

/// What `status`, reported to `by`, comes to for `job` once finalize has run on it.
async fn finalize(
    kit: &Kit,
    job: &Job,
    status: &RunPodStatus,
    by: Actor,
) -> Result<Outcome, FinalizeError> {
    kit.observe_then_finalize(job.clone(), status, by).await
}

/// The copies of outputs in the results bucket (the stored reports aside).
fn copies(kit: &Kit) -> Vec<String> {
    without_reports(kit.results.keys())
}

/// Every key of the results bucket ever written or read, the stored reports aside.
fn copies_touched(kit: &Kit) -> Vec<String> {
    without_reports(kit.results.touched())
}

fn without_reports(keys: Vec<String>) -> Vec<String> {
    keys.into_iter()
        .filter(|key| !key.contains("/report-"))
        .collect()
}

fn output_key(job: &Job, name: &str) -> String {
    format!("{VOLUME_ROOT}outputs/{}/{name}", job.id)
}

#[tokio::test]
async fn each_terminal_report_ends_the_job_with_its_code() {
    let cases = [
        ("FAILED", JobState::Failed, ErrorCode::WorkerFailed),
        (
            "TIMED_OUT",
            JobState::TimedOut,
            ErrorCode::ExecutionTimedOut,
        ),
        (
            "CANCELLED",
            JobState::Cancelled,
            ErrorCode::CancelledByRunpod,
        ),
    ];
    for (status, state, code) in cases {
        let kit = Kit::new();
        let job = submitted(&kit).await;

        let outcome = finalize(&kit, &job, &report(status, None), Actor::Webhook)
            .await
            .unwrap();

        assert_eq!(outcome, Outcome::Finished(state), "{status}");
        let stored = kit.stored(&job.id);
        assert_eq!(stored.error.unwrap().code, code, "{status}");
        assert!(kit.results.keys().is_empty(), "{status}: nothing stored");
    }
}

#[tokio::test]
async fn a_running_report_moves_the_job_on_and_schedules_the_next_look() {
    let kit = Kit::new();
    let job = submitted(&kit).await;

    let outcome = finalize(&kit, &job, &report("IN_PROGRESS", None), Actor::Sweeper)
        .await
        .unwrap();

    assert_eq!(outcome, Outcome::Progressed(JobState::Running));
    assert_eq!(kit.stored(&job.id).state, JobState::Running);
}

#[tokio::test]
async fn a_report_without_a_status_asks_runpod() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let empty = RunPodStatus::default();

    let outcome = finalize(&kit, &job, &empty, Actor::Webhook).await.unwrap();

    assert_eq!(outcome, Outcome::NeedsStatus);
    assert_eq!(kit.stored(&job.id).version, job.version, "nothing written");
}

#[tokio::test]
async fn outputs_outside_the_jobs_folder_fail_the_job_and_nothing_is_copied() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    kit.volume.insert("outputs/someone-else/x.png", b"not ours");
    let output = serde_json::json!({"files": ["/runpod-volume/outputs/someone-else/x.png"]});

    let outcome = finalize(
        &kit,
        &job,
        &report("COMPLETED", Some(output)),
        Actor::Webhook,
    )
    .await
    .unwrap();

    assert_eq!(outcome, Outcome::Finished(JobState::Failed));
    let stored = kit.stored(&job.id);
    assert_eq!(stored.error.unwrap().code, ErrorCode::InvalidOutputPath);
    assert!(kit.results.keys().is_empty());
    assert!(!kit
        .volume
        .touched()
        .iter()
        .any(|k| k.contains("someone-else")));
}

#[tokio::test]
async fn a_named_output_missing_from_the_volume_fails_the_job_and_keeps_no_partial_copy() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let present = output_key(&job, "restore_00001_.png");
    kit.volume.insert(&present, b"first");
    let output = serde_json::json!({"files": [
        format!("/runpod-volume/{present}"),
        format!("/runpod-volume/{}", output_key(&job, "restore_00002_.png")),
    ]});

    let outcome = finalize(
        &kit,
        &job,
        &report("COMPLETED", Some(output)),
        Actor::Webhook,
    )
    .await
    .unwrap();

    assert_eq!(outcome, Outcome::Finished(JobState::Failed));
    assert_eq!(
        kit.stored(&job.id).error.unwrap().code,
        ErrorCode::OutputMissing
    );
    assert!(kit.results.keys().is_empty(), "the first copy was removed");
}

#[tokio::test]
async fn a_volume_outage_releases_the_lease_for_a_later_try() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let key = output_key(&job, "restore_00001_.png");
    let status = kit.completed_run("rp-1", std::slice::from_ref(&key));
    kit.volume.break_key(&key, BrokenKey::Transient);

    let outcome = finalize(&kit, &job, &status, Actor::Webhook).await;

    assert!(matches!(outcome, Ok(Outcome::Retrying(_))), "{outcome:?}");
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Running, "handed off, not ended");
    assert!(stored.lease.is_none(), "released");
    assert_eq!(stored.check_failures, 1);
    assert!(copies(&kit).is_empty());
    let retry = kit.finalize.take();
    assert_eq!(retry.len(), 1, "finalize is asked to try again");
    assert!(
        retry[0].delay > std::time::Duration::ZERO,
        "later, not at once"
    );
}

#[tokio::test]
async fn a_job_another_finalize_holds_is_busy_and_untouched() {
    let kit = Kit::new();
    let mut job = submitted(&kit).await;
    let status = kit.completed_run("rp-1", &[output_key(&job, "restore_00001_.png")]);
    let read = job.version;
    job.acquire_lease(LeaseKind::Finalize, kit.now(), 60_000)
        .unwrap();
    job.version += 1;
    kit.store.save(&job, read).await.unwrap();
    let writes = kit.store.writes();

    let outcome = finalize(&kit, &job, &status, Actor::Sweeper).await.unwrap();

    assert_eq!(outcome, Outcome::Busy);
    assert_eq!(kit.store.writes(), writes);
    assert!(kit.results.keys().is_empty(), "no second copy");
}

#[tokio::test]
async fn outputs_copied_for_a_job_cancelled_meanwhile_are_removed() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let status = kit.completed_run("rp-1", &[output_key(&job, "restore_00001_.png")]);
    // The client's cancel lands after the finalize copied the output, just before it records
    // the success.
    let now = kit.now();
    kit.store.interleave(Some(JobState::Succeeded), move |job| {
        job.cancel(
            JobError::new(ErrorCode::CancelledByClient, "cancelled"),
            now,
        )
        .unwrap();
    });

    let outcome = finalize(&kit, &job, &status, Actor::Webhook).await;

    assert_eq!(outcome.unwrap(), Outcome::Unchanged);
    assert_eq!(kit.stored(&job.id).state, JobState::Cancelled);
    assert!(kit.results.keys().is_empty(), "no orphaned copy is left");
}

#[test]
fn each_status_is_decided_from_the_report_alone() {
    let status = |s: Option<&str>| RunPodStatus {
        status: s.map(String::from),
        ..RunPodStatus::default()
    };
    assert_eq!(decide(&status(None)), Decision::AskStatus);
    assert_eq!(decide(&status(Some("SOMETHING_NEW"))), Decision::AskStatus);
    assert_eq!(decide(&status(Some("IN_QUEUE"))), Decision::Wait);
    assert_eq!(
        decide(&status(Some("IN_PROGRESS"))),
        Decision::MarkRunning(None)
    );
    assert_eq!(decide(&status(Some("COMPLETED"))), Decision::Collect(None));
    for (reported, state) in [
        ("FAILED", JobState::Failed),
        ("TIMED_OUT", JobState::TimedOut),
        ("CANCELLED", JobState::Cancelled),
    ] {
        assert!(
            matches!(decide(&status(Some(reported))), Decision::End(s, _) if s == state),
            "{reported}"
        );
    }
}

#[tokio::test]
async fn a_write_that_slips_in_under_the_lease_does_not_cost_the_result() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let status = kit.completed_run("rp-1", &[output_key(&job, "restore_00001_.png")]);
    // A progress write lands between the copy and the success, leaving the lease in place.
    kit.store.interleave(Some(JobState::Succeeded), |job| {
        job.delay_time_ms = Some(1);
    });

    let outcome = finalize(&kit, &job, &status, Actor::Webhook).await;

    assert_eq!(outcome.unwrap(), Outcome::Finished(JobState::Succeeded));
    assert_eq!(kit.stored(&job.id).outputs.len(), 1);
    assert_eq!(kit.results.keys().len(), 1);
}

#[tokio::test]
async fn a_finalize_whose_lease_another_took_over_leaves_the_job_to_it_and_removes_its_own_copies()
{
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let status = kit.completed_run("rp-1", &[output_key(&job, "restore_00001_.png")]);
    // Our lease runs out mid-copy and another finalizer takes the job; it stores its own copies.
    let later = kit.now() + 1_000_000;
    kit.store.interleave(Some(JobState::Succeeded), move |job| {
        job.lease = None;
        job.acquire_lease(LeaseKind::Finalize, later, 120_000)
            .unwrap();
    });

    let outcome = finalize(&kit, &job, &status, Actor::Webhook).await;

    assert_eq!(outcome.unwrap(), Outcome::Unchanged);
    let stored = kit.stored(&job.id);
    assert_eq!(
        stored.state,
        JobState::Running,
        "the other finalizer decides"
    );
    assert_eq!(stored.lease.unwrap().until, later + 120_000);
    assert!(
        copies(&kit).is_empty(),
        "ours, in our own folder, are removed: {:?}",
        kit.results.keys()
    );
}

#[tokio::test]
async fn a_success_whose_save_answer_was_lost_keeps_its_outputs() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let status = kit.completed_run("rp-1", &[output_key(&job, "a1/restore_00001_.png")]);
    // The write that ends the job lands, but its answer is lost.
    kit.store.before_save(|store, about_to_write| {
        if about_to_write.state == JobState::Succeeded {
            store.lose_answers(1);
            return true;
        }
        false
    });

    let outcome = finalize(&kit, &job, &status, Actor::Webhook).await.unwrap();

    assert!(matches!(outcome, Outcome::Finished(_)), "{outcome:?}");
    let stored = kit.stored(&job.id);
    assert_eq!(stored.state, JobState::Succeeded);
    assert_eq!(stored.outputs.len(), 1);
    assert_eq!(kit.results.keys().len(), 1, "the output stays");
}

#[tokio::test]
async fn a_volume_file_over_its_cap_fails_output_too_large_with_nothing_stored() {
    let kit = Kit::new().with_settings(|s| s.max_output_file_bytes = 10);
    let job = submitted(&kit).await;
    let status = kit.completed_run("rp-1", &[output_key(&job, "a1/restore_00001_.png")]);

    let outcome = finalize(&kit, &job, &status, Actor::Webhook).await.unwrap();

    assert_eq!(outcome, Outcome::Finished(JobState::Failed));
    let stored = kit.stored(&job.id);
    assert_eq!(stored.error.unwrap().code, ErrorCode::OutputTooLarge);
    assert!(
        copies_touched(&kit).is_empty(),
        "{:?}",
        kit.results.touched()
    );
}

/// A job whose run completed with two output files; and the size of each.
async fn two_outputs(kit: &Kit) -> (Job, RunPodStatus, u64) {
    let job = submitted(kit).await;
    let files = [
        output_key(&job, "a1/restore_00001_.png"),
        output_key(&job, "a1/restore_00002_.png"),
    ];
    let status = kit.completed_run("rp-1", &files);
    let one = kit.volume.get(&files[0]).unwrap().len() as u64;
    (job, status, one)
}

#[tokio::test]
async fn volume_files_over_the_jobs_cap_together_fail_before_any_copy() {
    let kit = Kit::new();
    let (job, status, one) = two_outputs(&kit).await;
    let kit = kit.with_settings(|s| {
        s.max_output_file_bytes = one;
        s.max_output_job_bytes = one + 1;
    });

    let outcome = finalize(&kit, &job, &status, Actor::Webhook).await.unwrap();

    assert_eq!(outcome, Outcome::Finished(JobState::Failed));
    assert_eq!(
        kit.stored(&job.id).error.unwrap().code,
        ErrorCode::OutputTooLarge
    );
    assert!(
        copies_touched(&kit).is_empty(),
        "{:?}",
        kit.results.touched()
    );
}

#[tokio::test]
async fn volume_files_within_both_caps_are_all_stored() {
    let kit = Kit::new();
    let (job, status, one) = two_outputs(&kit).await;
    let kit = kit.with_settings(|s| {
        s.max_output_file_bytes = one;
        s.max_output_job_bytes = 2 * one;
    });

    let outcome = finalize(&kit, &job, &status, Actor::Webhook).await.unwrap();

    assert_eq!(outcome, Outcome::Finished(JobState::Succeeded));
    assert_eq!(kit.results.keys().len(), 2);
}

#[tokio::test]
async fn each_attempt_stores_into_its_own_folder_and_a_later_one_never_shares_it() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let files = [
        output_key(&job, "a1/restore_00001_.png"),
        output_key(&job, "a1/restore_00002_.png"),
    ];
    let status = kit.completed_run("rp-1", &files);
    // The first attempt copies both files, but its lease runs out before it records them:
    // another takes the job, and the first cleans up after itself.
    let later = kit.now() + 1_000;
    kit.store.interleave(Some(JobState::Succeeded), move |job| {
        job.lease = None;
        job.acquire_lease(LeaseKind::Finalize, later, 1_000)
            .unwrap();
    });
    let first = finalize(&kit, &job, &status, Actor::Webhook).await;
    assert_eq!(first.unwrap(), Outcome::Unchanged);
    let first_keys: std::collections::BTreeSet<String> = copies_touched(&kit).into_iter().collect();
    assert_eq!(first_keys.len(), 2, "{first_keys:?}");
    assert!(copies(&kit).is_empty(), "removed by the first attempt");

    // The other holder's lease ran out too; the sweeper's attempt finishes the job.
    kit.clock.advance(std::time::Duration::from_secs(10));
    let second = finalize(&kit, &kit.stored(&job.id), &status, Actor::Sweeper).await;

    assert_eq!(second.unwrap(), Outcome::Finished(JobState::Succeeded));
    let stored = kit.stored(&job.id);
    for output in &stored.outputs {
        assert!(!first_keys.contains(&output.key), "{} reused", output.key);
        assert!(kit.results.get(&output.key).is_some());
    }
}

// ---------------------------------------------------------------------------------------------
// The hand-off: the webhook and the sweeper store the report and ask finalize
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn a_completed_run_is_handed_to_finalize_with_its_report_and_no_output_is_touched() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let status = kit.completed_run("rp-1", &[output_key(&job, "restore_00001_.png")]);

    let outcome = kit
        .observer()
        .observe_as(job.clone(), &status, Actor::Webhook)
        .await
        .unwrap();

    assert_eq!(outcome, Outcome::HandedOff);
    let stored = kit.stored(&job.id);
    assert_eq!(
        stored.state,
        JobState::Running,
        "running until finalize ends it"
    );
    let handoff = stored.handoff.expect("the hand-off is recorded");
    assert_eq!(handoff.run, "rp-1");
    assert_eq!(
        kit.results.keys(),
        std::slice::from_ref(&handoff.report_key)
    );
    let kept: RunPodStatus =
        serde_json::from_slice(&kit.results.get(&handoff.report_key).unwrap()).unwrap();
    assert_eq!(kept, status, "the report is RunPod's answer as it was");
    assert_eq!(kit.finalize.take().len(), 1);
    assert!(copies(&kit).is_empty(), "finalize copies, not the webhook");
}

#[tokio::test]
async fn a_second_report_of_the_same_run_hands_off_once_and_asks_finalize_again() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let status = kit.completed_run("rp-1", &[output_key(&job, "restore_00001_.png")]);
    let observer = kit.observer();
    observer
        .observe_as(job.clone(), &status, Actor::Webhook)
        .await
        .unwrap();
    let first = kit.stored(&job.id);
    kit.clock.advance(std::time::Duration::from_secs(5));

    let again = observer
        .observe_as(first.clone(), &status, Actor::Sweeper)
        .await
        .unwrap();

    assert_eq!(again, Outcome::Unchanged);
    assert_eq!(
        kit.stored(&job.id).version,
        first.version,
        "nothing written"
    );
    assert_eq!(kit.finalize.take().len(), 2, "a lost request is made good");
}

#[tokio::test]
async fn a_hand_off_whose_report_cannot_be_stored_records_nothing() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let status = kit.completed_run("rp-1", &[output_key(&job, "restore_00001_.png")]);
    let report = gateway::domain::keys::report(&job.owner, &job.id, "rp-1");
    kit.results.break_key(&report, BrokenKey::Transient);

    let outcome = kit
        .observer()
        .observe_as(job.clone(), &status, Actor::Webhook)
        .await;

    assert!(
        matches!(outcome, Err(FinalizeError::RetryLater(_))),
        "{outcome:?}"
    );
    assert!(kit.stored(&job.id).handoff.is_none());
    assert!(kit.finalize.sent().is_empty());
}

/// A job whose run completed with one output, handed to finalize by its webhook.
async fn handed_off(kit: &Kit) -> Job {
    let job = submitted(kit).await;
    let status = kit.completed_run("rp-1", &[output_key(&job, "restore_00001_.png")]);
    kit.observer()
        .observe_as(job.clone(), &status, Actor::Webhook)
        .await
        .unwrap();
    job
}

#[tokio::test]
async fn finalize_collects_from_the_stored_report_after_runpod_has_forgotten_the_run() {
    let kit = Kit::new();
    let job = handed_off(&kit).await;
    kit.runpod.fail_status("rp-1", Answer::NotFound);

    let outcome = kit.finalize_job(&job.id).await.unwrap();

    assert_eq!(outcome, Outcome::Finished(JobState::Succeeded));
    let stored = kit.stored(&job.id);
    assert_eq!(stored.outputs.len(), 1);
    assert_eq!(
        kit.results.keys(),
        [stored.outputs[0].key.clone()],
        "the report went with the job's end"
    );
}

#[tokio::test]
async fn a_finalize_request_for_a_job_not_handed_off_changes_nothing() {
    let kit = Kit::new();
    let job = submitted(&kit).await;

    let outcome = kit.finalizer().finalize(&job.id, None).await.unwrap();

    assert_eq!(outcome, Outcome::Unchanged);
    assert_eq!(kit.stored(&job.id).version, job.version);
}

#[tokio::test]
async fn a_duplicate_finalize_request_after_the_end_changes_nothing() {
    let kit = Kit::new();
    let job = submitted(&kit).await;
    let status = kit.completed_run("rp-1", &[output_key(&job, "restore_00001_.png")]);
    finalize(&kit, &job, &status, Actor::Webhook).await.unwrap();
    let ended = kit.stored(&job.id);

    let again = kit.finalizer().finalize(&job.id, None).await.unwrap();

    assert_eq!(again, Outcome::Unchanged);
    assert_eq!(kit.stored(&job.id), ended);
}

#[tokio::test]
async fn a_stored_report_that_is_gone_fails_the_job_output_missing() {
    let kit = Kit::new();
    let job = handed_off(&kit).await;
    let report = kit.stored(&job.id).handoff.unwrap().report_key;
    kit.results.delete(&report).await.unwrap();

    let outcome = kit.finalize_job(&job.id).await.unwrap();

    assert_eq!(outcome, Outcome::Finished(JobState::Failed));
    assert_eq!(
        kit.stored(&job.id).error.unwrap().code,
        ErrorCode::OutputMissing
    );
}

#[tokio::test]
async fn a_stored_report_over_the_status_cap_fails_the_job_output_too_large() {
    let kit = Kit::new().with_settings(|s| s.max_status_bytes = 64);
    let job = handed_off(&kit).await;

    let outcome = kit.finalize_job(&job.id).await.unwrap();

    assert_eq!(outcome, Outcome::Finished(JobState::Failed));
    assert_eq!(
        kit.stored(&job.id).error.unwrap().code,
        ErrorCode::OutputTooLarge
    );
    assert!(kit.results.keys().is_empty(), "nothing stored, report gone");
}

#[tokio::test]
async fn a_finalize_lease_lasts_no_longer_than_its_invocation() {
    let kit = Kit::new();
    let job = handed_off(&kit).await;
    let leases = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = leases.clone();
    kit.store.before_save(move |_, about_to_write| {
        seen.lock().unwrap().extend(about_to_write.lease.clone());
        false
    });
    let deadline = kit.now() + 30_000;

    let outcome = kit.finalizer().finalize(&job.id, Some(deadline)).await;

    assert_eq!(outcome.unwrap(), Outcome::Finished(JobState::Succeeded));
    let leases = leases.lock().unwrap();
    assert_eq!(leases.len(), 1);
    assert!(leases[0].until > deadline, "it outlives the invocation");
    assert!(leases[0].until <= deadline + 5_000, "by a margin only");
}

#[tokio::test]
async fn a_finalize_without_time_left_for_the_next_file_gives_the_job_back_for_a_retry() {
    let kit = Kit::new();
    let job = handed_off(&kit).await;
    kit.finalize.take();
    // Less than the reserve kept for the final write.
    let deadline = kit.now() + 1_000;

    let outcome = kit.finalizer().finalize(&job.id, Some(deadline)).await;

    assert!(matches!(outcome, Ok(Outcome::Retrying(_))), "{outcome:?}");
    let stored = kit.stored(&job.id);
    assert!(stored.lease.is_none(), "given back");
    assert!(!stored.is_terminal());
    assert!(copies(&kit).is_empty(), "no copy begun");
    assert_eq!(kit.finalize.take().len(), 1, "and asked again");
}
