//! Batches: many inputs, one workflow, one job each, checked as a whole before anything is
//! written; their jobs held back to `max_in_flight` dispatched at once, started in input order.
use gateway::app::api::{JobInput, Refusal};
use gateway::app::batches::BatchRequest;
use gateway::app::dispatch::DispatchOutcome;
use gateway::domain::comfy::{self, PromptState};
use gateway::domain::job::{BackendKind, JobState};
use testkit::images::jpeg;
use testkit::Kit;

fn inline(bytes: &[u8]) -> JobInput {
    use base64::Engine as _;
    JobInput {
        image_base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
        upload_id: None,
        url: None,
    }
}

fn request(inputs: usize, max_in_flight: u32) -> BatchRequest {
    BatchRequest {
        workflow: "restore".into(),
        inputs: (0..inputs).map(|_| inline(&jpeg(64, 48))).collect(),
        max_in_flight: Some(max_in_flight),
        ..BatchRequest::default()
    }
}

/// The pod finishes the job's prompt, and the job is collected and ended.
async fn finish(kit: &Kit, job_id: &str) {
    let job = kit.stored(job_id);
    let prompt = job.runpod_job_id.clone().unwrap();
    let folder = format!("gateway/{job_id}/a{}", job.attempts);
    kit.comfy
        .succeed(&prompt, &[(&folder, "restore_00001_.png", b"png")]);
    let due = kit.stored(job_id).next_check_at.unwrap();
    kit.clock.advance(std::time::Duration::from_millis(
        (due - kit.now()).max(0) as u64
    ));
    kit.sweeper().check_polled(job_id, due).await.unwrap();
    kit.run_finalize().await;
    assert_eq!(kit.stored(job_id).state, JobState::Succeeded);
    // The end's notice: the callbacks function gives the slot back and wakes the next.
    kit.deliver_waiting().await;
}

#[tokio::test]
async fn a_batch_makes_one_queued_job_per_input_under_its_id() {
    let kit = Kit::new();

    let (batch, jobs) = kit
        .api()
        .submit_batch("alice", request(3, 2))
        .await
        .unwrap();

    assert_eq!(jobs.len(), 3);
    assert_eq!(
        batch.job_ids,
        jobs.iter().map(|j| j.id.clone()).collect::<Vec<_>>()
    );
    for job in &jobs {
        let stored = kit.stored(&job.id);
        assert_eq!(stored.state, JobState::Queued);
        assert_eq!(stored.batch_id.as_deref(), Some(batch.id.as_str()));
    }
}

#[tokio::test]
async fn a_batch_goes_to_the_pod_when_the_deployment_runs_one() {
    let kit = Kit::new();

    let (batch, jobs) = kit
        .api()
        .submit_batch("alice", request(2, 1))
        .await
        .unwrap();

    assert_eq!(batch.backend, BackendKind::Pod);
    assert!(jobs.iter().all(|j| j.backend == BackendKind::Pod));
}

#[tokio::test]
async fn one_bad_input_refuses_the_whole_batch_and_stores_nothing() {
    let kit = Kit::new();
    let mut request = request(3, 2);
    request.inputs[2] = inline(b"not an image at all");

    let refusal = kit.api().submit_batch("alice", request).await.unwrap_err();

    match refusal {
        Refusal::Invalid { message, .. } => assert!(message.starts_with("inputs[2]"), "{message}"),
        other => panic!("{other:?}"),
    }
    assert!(kit.uploads.keys().is_empty());
    assert_eq!(kit.store.jobs().len(), 0);
    assert_eq!(kit.batches.count(), 0);
}

#[tokio::test]
async fn a_batch_whose_record_cannot_be_stored_leaves_no_input_behind() {
    let kit = Kit::new();
    kit.batches.fail_next(1);

    let refusal = kit
        .api()
        .submit_batch("alice", request(3, 2))
        .await
        .unwrap_err();

    assert!(
        matches!(refusal, Refusal::Unavailable { .. }),
        "{refusal:?}"
    );
    assert!(kit.uploads.keys().is_empty());
    assert_eq!(kit.store.jobs().len(), 0);
}

#[tokio::test]
async fn no_more_than_max_in_flight_of_a_batchs_jobs_are_dispatched_at_once() {
    let kit = Kit::new();
    let (_, jobs) = kit
        .api()
        .submit_batch("alice", request(5, 2))
        .await
        .unwrap();

    let submitted = kit.dispatch_waiting().await;

    assert_eq!(submitted, vec![jobs[0].id.clone(), jobs[1].id.clone()]);
    for held in &jobs[2..] {
        assert_eq!(kit.stored(&held.id).state, JobState::Queued);
    }
}

#[tokio::test]
async fn a_held_job_dispatched_out_of_turn_waits_and_holds_no_run() {
    let kit = Kit::new();
    let (_, jobs) = kit
        .api()
        .submit_batch("alice", request(3, 1))
        .await
        .unwrap();
    kit.dispatch_waiting().await;

    // A duplicate message, or the sweeper's requeue, for the last job.
    let outcome = kit.dispatcher().dispatch(&jobs[2].id).await.unwrap();

    assert_eq!(
        outcome,
        DispatchOutcome::Skipped("held back until a slot frees")
    );
    assert_eq!(kit.comfy.graphs().len(), 1);
}

#[tokio::test]
async fn as_each_job_ends_the_next_in_input_order_starts() {
    let kit = Kit::new();
    let (_, jobs) = kit
        .api()
        .submit_batch("alice", request(4, 2))
        .await
        .unwrap();
    let mut started = kit.dispatch_waiting().await;

    for job in jobs.iter() {
        finish(&kit, &job.id).await;
        started.extend(kit.dispatch_waiting().await);
    }

    let order: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    assert_eq!(started, order);
    assert!(jobs
        .iter()
        .all(|j| kit.stored(&j.id).state == JobState::Succeeded));
}

#[tokio::test]
async fn a_job_that_fails_frees_its_slot_too() {
    let kit = Kit::new();
    let (_, jobs) = kit
        .api()
        .submit_batch("alice", request(2, 1))
        .await
        .unwrap();
    kit.dispatch_waiting().await;
    let prompt = comfy::prompt_id(&jobs[0].id, 1);
    kit.comfy.set_state(
        &prompt,
        PromptState::Failed("KSampler: out of memory".into()),
    );
    let due = kit.stored(&jobs[0].id).next_check_at.unwrap();
    kit.clock
        .advance(std::time::Duration::from_millis((due - kit.now()) as u64));
    kit.sweeper().check_polled(&jobs[0].id, due).await.unwrap();
    kit.deliver_waiting().await;

    let started = kit.dispatch_waiting().await;

    assert_eq!(kit.stored(&jobs[0].id).state, JobState::Failed);
    assert_eq!(started, vec![jobs[1].id.clone()]);
}

#[tokio::test]
async fn cancelling_a_batch_cancels_every_job_running_or_waiting() {
    let kit = Kit::new();
    let (batch, jobs) = kit
        .api()
        .submit_batch("alice", request(3, 1))
        .await
        .unwrap();
    kit.dispatch_waiting().await;

    let (_, after) = kit.api().cancel_batch("alice", &batch.id).await.unwrap();

    assert!(after.iter().all(|j| j.state == JobState::Cancelled));
    assert_eq!(
        kit.stops.requested().len(),
        1,
        "only the running one had a run"
    );
    // Their ends free the slot and empty the line: nothing is dispatched after.
    kit.deliver_waiting().await;
    assert!(kit.dispatch_waiting().await.is_empty());
    let slots = kit.slots.get(&format!("batch:{}", batch.id)).unwrap();
    assert!(slots.is_idle(), "{slots:?}");
    let _ = jobs;
}

#[tokio::test]
async fn another_owner_cannot_see_or_cancel_a_batch() {
    let kit = Kit::new();
    let (batch, _) = kit
        .api()
        .submit_batch("alice", request(1, 1))
        .await
        .unwrap();

    assert_eq!(
        kit.api().batch("bob", &batch.id).await.unwrap_err(),
        Refusal::NotFound
    );
    assert_eq!(
        kit.api().cancel_batch("bob", &batch.id).await.unwrap_err(),
        Refusal::NotFound
    );
}

#[tokio::test]
async fn a_batch_of_no_inputs_is_refused() {
    let kit = Kit::new();

    let refusal = kit
        .api()
        .submit_batch("alice", request(0, 1))
        .await
        .unwrap_err();

    assert_eq!(refusal.code(), "invalid_batch");
}
