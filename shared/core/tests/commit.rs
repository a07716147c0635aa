//! The conditional write every use case goes through: a change is decided on the job as stored
//! at the moment of writing, never on a stale copy.
use gateway::app::{commit_as, commit_leased, Committed};
use gateway::domain::job::{Actor, ErrorCode, JobError, JobState, LeaseKind, TransitionError};
use gateway::ports::JobStore;
use testkit::Kit;

#[tokio::test]
async fn a_change_made_on_a_stale_copy_is_decided_again_on_the_stored_job() {
    let kit = Kit::new();
    let stale = kit.queued_job("alice");
    let id = stale.id.clone();
    // Someone else cancels the job after our read.
    let cancelled = commit_as(kit.store.as_ref(), stale.clone(), Actor::Client, |job| {
        job.cancel(
            JobError::new(ErrorCode::CancelledByClient, "cancelled"),
            kit.now(),
        )
    })
    .await
    .unwrap();
    assert!(matches!(cancelled, Committed::Written(_)));

    // Our change, decided on the copy read before the cancel, must not undo it.
    let ours = commit_as(kit.store.as_ref(), stale, Actor::Sweeper, |job| {
        job.reschedule(kit.now(), kit.now() + 1_000)
    })
    .await
    .unwrap();

    assert!(
        matches!(
            ours,
            Committed::Refused(_, TransitionError::AlreadyTerminal(_))
        ),
        "a terminal job refuses the change"
    );
    let stored = kit.store.get(&id).await.unwrap().unwrap();
    assert_eq!(stored.state, JobState::Cancelled);
}

#[tokio::test]
async fn a_change_that_still_applies_is_written_on_top_of_the_other_writers_change() {
    let kit = Kit::new();
    let stale = kit.queued_job("alice");
    let failed_check = |job: &mut gateway::domain::job::Job| {
        job.note_check_failure();
        job.reschedule(kit.now(), kit.now() + 5_000)
    };
    let Committed::Written(first) = commit_as(
        kit.store.as_ref(),
        stale.clone(),
        Actor::Sweeper,
        failed_check,
    )
    .await
    .unwrap() else {
        panic!("the first write went through")
    };

    let second = commit_as(kit.store.as_ref(), stale, Actor::Sweeper, failed_check)
        .await
        .unwrap();

    let Committed::Written(stored) = second else {
        panic!("re-applied to the fresh job")
    };
    assert_eq!(stored.check_failures, 2, "both failures counted, none lost");
    assert_eq!(stored.version, first.version + 1);
}

#[tokio::test]
async fn a_change_decided_under_a_lease_is_refused_once_the_lease_is_gone() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    let mut leased = job.clone();
    leased
        .acquire_lease(LeaseKind::Finalize, kit.now(), 60_000)
        .unwrap();
    kit.store.save(&leased, job.version).await.unwrap();
    let mut released = leased.clone();
    released.release_lease(kit.now(), kit.now());
    kit.store.save(&released, leased.version).await.unwrap();

    let committed = commit_leased(
        kit.store.as_ref(),
        kit.callback_queue.as_ref(),
        &leased,
        Actor::Sweeper,
        |job| {
            job.note_check_failure();
            Ok(())
        },
    )
    .await
    .unwrap();

    assert!(
        matches!(committed, Committed::Refused(_, TransitionError::LeaseLost)),
        "refused"
    );
    assert_eq!(kit.stored(&job.id).check_failures, 0);
}

#[tokio::test]
async fn a_change_that_touches_no_timestamp_still_takes_a_new_version() {
    let kit = Kit::new();
    let job = kit.queued_job("alice");
    let note = |job: &mut gateway::domain::job::Job| {
        job.note_check_failure();
        Ok(())
    };

    let first = commit_as(kit.store.as_ref(), job.clone(), Actor::Sweeper, note)
        .await
        .unwrap();
    let Committed::Written(written) = first else {
        panic!("not written")
    };
    assert_eq!(written.version, job.version + 1);
    // A second writer that read the same version must not overwrite the first.
    let mut stale = job.clone();
    stale.note_check_failure();
    stale.version += 1;
    assert!(kit.store.save(&stale, job.version).await.is_err());
}
