//! Retention and deletion: each job's data is served until its `expires_at` and then deleted by
//! the gateway itself; `DELETE /jobs/{id}` cancels a job in flight, removes everything it left,
//! and leaves a tombstone that answers 410.
use std::time::Duration;

use base64::Engine as _;
use gateway::app::api::{JobInput, JobRequest, Refusal, Submitted};
use gateway::domain::job::{DeletionReason, ErrorCode, Job, JobState};
use testkit::images::jpeg;
use testkit::Kit;

fn request(retention_secs: Option<u64>) -> JobRequest {
    JobRequest {
        workflow: "restore".into(),
        params: None,
        input: JobInput {
            image_base64: Some(base64::engine::general_purpose::STANDARD.encode(jpeg(64, 48))),
            upload_id: None,
            url: None,
        },
        retention_secs,
        callback_url: None,
        callback_events: None,
        backend: None,
        priority: None,
    }
}

async fn submit(kit: &Kit, retention_secs: Option<u64>, key: Option<&str>) -> Job {
    match kit
        .api()
        .submit("alice", request(retention_secs), key.map(str::as_bytes))
        .await
        .unwrap()
    {
        Submitted::Accepted(job) | Submitted::Existing(job) => job,
    }
}

/// A job that succeeded through the kit, with its output in the results bucket and its files
/// still on the volume.
async fn succeeded(kit: &Kit, retention_secs: Option<u64>, key: Option<&str>) -> Job {
    let job = submit(kit, retention_secs, key).await;
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    let status = kit.completed_run(
        "rp-1",
        &[kit.volume_output(&job.id, "a1/restore_00001_.png")],
    );
    kit.observe_then_finalize(
        kit.stored(&job.id),
        &status,
        gateway::domain::job::Actor::Webhook,
    )
    .await
    .unwrap();
    let done = kit.stored(&job.id);
    assert_eq!(done.state, JobState::Succeeded);
    done
}

/// Every object the job left in any bucket or on the volume.
fn everything_of(kit: &Kit, job: &Job) -> Vec<String> {
    let mut keys: Vec<String> = kit
        .results
        .keys()
        .into_iter()
        .chain(kit.uploads.keys())
        .chain(kit.volume.keys())
        .filter(|k| k.contains(&job.id))
        .collect();
    keys.sort();
    keys
}

fn gone_code(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::Gone { code, .. } => code,
        other => panic!("expected 410, got {other:?}"),
    }
}

#[tokio::test]
async fn a_job_is_kept_the_default_retention_unless_the_client_asks() {
    let kit = Kit::new();
    let default = submit(&kit, None, None).await;
    let short = submit(&kit, Some(7_200), None).await;

    let retention = |job: &Job| job.retained_until() - job.timestamps.created_at;
    assert_eq!(
        retention(&default),
        kit.settings.record_retention.as_millis() as i64
    );
    assert_eq!(retention(&short), 7_200_000);
    assert!(
        short.expires_at * 1000
            >= short.retained_until() + kit.settings.tombstone.as_millis() as i64 - 1000,
        "the record outlives the data by the tombstone period"
    );
}

#[tokio::test]
async fn a_retention_outside_the_bounds_is_refused_before_anything_is_stored() {
    let kit = Kit::new();
    let too_long = kit.settings.retention_max.as_secs() + 1;
    for asked in [1, too_long] {
        let refused = kit
            .api()
            .submit("alice", request(Some(asked)), None)
            .await
            .unwrap_err();
        assert_eq!(refused.code(), "invalid_retention", "{asked}");
    }
    assert!(kit.uploads.keys().is_empty());
}

#[tokio::test]
async fn no_download_url_outlives_the_jobs_retention() {
    let kit = Kit::new().with_settings(|s| s.presign_ttl = Duration::from_secs(3_600));
    let job = succeeded(&kit, Some(3_600), None).await;
    kit.clock.advance(Duration::from_secs(3_000));

    let detail = kit.api().job("alice", &job.id).await.unwrap();

    let url = &detail.outputs[0].1;
    assert!(url.contains("expires=600"), "{url}");
}

#[tokio::test]
async fn past_its_retention_a_job_answers_gone_before_the_sweeper_has_purged_it() {
    let kit = Kit::new();
    let job = succeeded(&kit, Some(3_600), None).await;
    kit.clock.advance(Duration::from_secs(3_600));

    let refused = kit.api().job("alice", &job.id).await.unwrap_err();

    assert_eq!(gone_code(refused), "job_expired");
    let listed = kit.api().list("alice", None, None, None).await.unwrap();
    assert!(listed.jobs.iter().all(|j| j.id != job.id), "not listed");
}

#[tokio::test]
async fn the_sweeper_deletes_an_expired_jobs_data_and_leaves_a_tombstone() {
    let kit = Kit::new();
    let job = succeeded(&kit, Some(3_600), Some("order-1")).await;
    assert!(!everything_of(&kit, &job).is_empty());
    kit.clock.advance(Duration::from_secs(3_600));

    let report = kit.sweeper().sweep().await.unwrap();

    assert_eq!(report.purged, 1, "{report:?}");
    assert!(
        everything_of(&kit, &job).is_empty(),
        "{:?}",
        everything_of(&kit, &job)
    );
    let tombstone = kit.stored(&job.id);
    let deletion = tombstone.deletion.clone().unwrap();
    assert_eq!(deletion.reason, DeletionReason::Expired);
    assert!(deletion.purged);
    assert!(tombstone.outputs.is_empty());
    assert_eq!(tombstone.next_check_at, None, "out of the sweep index");
    assert!(!kit.store.idempotency_key_taken("alice", "order-1"));
}

#[tokio::test]
async fn deleting_a_finished_job_removes_its_outputs_at_once_and_the_rest_at_the_next_sweep() {
    let kit = Kit::new();
    let job = succeeded(&kit, None, Some("order-1")).await;
    let output = job.outputs[0].key.clone();

    let deleted = kit.api().delete("alice", &job.id).await.unwrap();

    assert_eq!(deleted.deletion.unwrap().reason, DeletionReason::Client);
    assert!(
        kit.results.get(&output).is_none(),
        "no URL handed out works"
    );
    assert!(kit.uploads.get(&job.input.key).is_none());
    assert_eq!(
        gone_code(kit.api().job("alice", &job.id).await.unwrap_err()),
        "job_deleted"
    );
    // The sweeper purges the rest (the volume's folders, the idempotency record) once no
    // finalize attempt can still be copying.
    kit.clock.advance(kit.settings.finalize_lease);
    kit.sweeper().sweep().await.unwrap();
    assert!(
        everything_of(&kit, &job).is_empty(),
        "{:?}",
        everything_of(&kit, &job)
    );
    assert!(kit.stored(&job.id).deletion.unwrap().purged);
    assert!(!kit.store.idempotency_key_taken("alice", "order-1"));
    // The key is free for a new job.
    let again = submit(&kit, None, Some("order-1")).await;
    assert_ne!(again.id, job.id);
}

#[tokio::test]
async fn deleting_a_job_in_flight_cancels_it_and_stops_its_run() {
    let kit = Kit::new();
    let job = submit(&kit, None, None).await;
    kit.dispatcher().dispatch(&job.id).await.unwrap();

    let deleted = kit.api().delete("alice", &job.id).await.unwrap();

    assert_eq!(deleted.state, JobState::Cancelled);
    assert_eq!(deleted.error.unwrap().code, ErrorCode::CancelledByClient);
    assert_eq!(kit.stops.runs(), ["rp-1"]);
    assert!(deleted.deletion.is_some());
}

#[tokio::test]
async fn a_job_deleted_while_finalize_copies_keeps_nothing() {
    let kit = Kit::new();
    let job = submit(&kit, None, None).await;
    kit.dispatcher().dispatch(&job.id).await.unwrap();
    let status = kit.completed_run(
        "rp-1",
        &[kit.volume_output(&job.id, "a1/restore_00001_.png")],
    );
    kit.observer()
        .observe_as(
            kit.stored(&job.id),
            &status,
            gateway::domain::job::Actor::Webhook,
        )
        .await
        .unwrap();
    // The owner's DELETE lands after finalize copied the output, before it records it.
    let now = kit.now();
    kit.store.interleave(Some(JobState::Succeeded), move |job| {
        job.cancel(
            gateway::domain::job::JobError::new(ErrorCode::CancelledByClient, "deleted"),
            now,
        )
        .unwrap();
        job.delete(now).unwrap();
    });

    kit.run_finalize().await;
    kit.clock.advance(kit.settings.finalize_lease);
    kit.sweeper().sweep().await.unwrap();

    let stored = kit.stored(&job.id);
    assert!(stored.deletion.unwrap().purged);
    assert!(
        everything_of(&kit, &job).is_empty(),
        "{:?}",
        everything_of(&kit, &job)
    );
}

#[tokio::test]
async fn deleting_a_job_twice_changes_nothing_the_second_time() {
    let kit = Kit::new();
    let job = succeeded(&kit, None, None).await;
    let first = kit.api().delete("alice", &job.id).await.unwrap();

    let second = kit.api().delete("alice", &job.id).await.unwrap();

    assert_eq!(second, first);
    assert_eq!(kit.stored(&job.id), first);
}

#[tokio::test]
async fn another_owners_job_cannot_be_deleted() {
    let kit = Kit::new();
    let job = succeeded(&kit, None, None).await;

    let refused = kit.api().delete("bob", &job.id).await.unwrap_err();

    assert_eq!(refused, Refusal::NotFound);
    assert!(kit.stored(&job.id).deletion.is_none());
    assert!(kit.results.get(&job.outputs[0].key).is_some());
}

#[tokio::test]
async fn a_deleted_job_cannot_be_cancelled_or_listed() {
    let kit = Kit::new();
    let job = succeeded(&kit, None, None).await;
    kit.api().delete("alice", &job.id).await.unwrap();

    assert_eq!(
        gone_code(kit.api().cancel("alice", &job.id).await.unwrap_err()),
        "job_deleted"
    );
    let listed = kit.api().list("alice", None, None, None).await.unwrap();
    assert!(listed.jobs.is_empty());
}

#[tokio::test]
async fn a_purge_that_fails_is_retried_at_a_later_sweep() {
    let kit = Kit::new();
    let job = succeeded(&kit, Some(3_600), None).await;
    kit.clock.advance(Duration::from_secs(3_600));
    let output = job.outputs[0].key.clone();
    kit.results
        .break_key(&output, testkit::fakes::BrokenKey::Transient);

    let first = kit.sweeper().sweep().await.unwrap();
    assert_eq!((first.purged, first.errors), (0, 1));
    kit.results.mend_key(&output);
    kit.clock.advance(kit.settings.poll_interval);
    let second = kit.sweeper().sweep().await.unwrap();

    assert_eq!(second.purged, 1);
    assert!(everything_of(&kit, &job).is_empty());
}
