//! The pod backend: a ComfyUI server reached over its own HTTP API, polled, its lost prompts
//! started again once. The use cases are the serverless ones; only the backend differs.
use gateway::app::api::Submitted;
use gateway::app::dispatch::DispatchOutcome;
use gateway::domain::comfy::{self, PromptState};
use gateway::domain::job::{ErrorCode, JobState};
use testkit::images::jpeg;
use testkit::jobs::inline_request;
use testkit::Kit;
use testkit::{POD_POLL, POD_VOLUME_ROOT};

/// A pod job dispatched: its prompt queued at the server.
async fn dispatched(kit: &Kit) -> (String, String) {
    let job = kit.queued_pod_job("alice");
    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();
    let prompt = comfy::prompt_id(&job.id, 1);
    assert_eq!(outcome, DispatchOutcome::Submitted(prompt.clone()));
    (job.id, prompt)
}

/// Checks the job as its poll message would, at its due time.
async fn poll(kit: &Kit, job_id: &str) {
    let due = kit.stored(job_id).next_check_at.expect("a check is due");
    let now = kit.now();
    if due > now {
        kit.clock
            .advance(std::time::Duration::from_millis((due - now) as u64));
    }
    kit.sweeper().check_polled(job_id, due).await.unwrap();
}

#[tokio::test]
async fn a_pod_job_uploads_its_input_and_queues_the_rendered_graph_under_our_prompt_id() {
    let kit = Kit::new();
    let (job_id, prompt) = dispatched(&kit).await;

    assert_eq!(
        kit.comfy.uploads(),
        vec![(format!("gateway/{job_id}"), "a1.jpg".to_string())]
    );
    let (queued, graph) = kit.comfy.graphs().remove(0);
    assert_eq!(queued, prompt);
    let text = graph.to_string();
    assert!(text.contains(&format!("gateway/{job_id}/a1.jpg")), "{text}");
    assert!(
        text.contains(&format!("gateway/{job_id}/a1/restore")),
        "{text}"
    );
    let stored = kit.stored(&job_id);
    assert_eq!(stored.state, JobState::Submitted);
    assert_eq!(stored.runpod_job_id.as_deref(), Some(prompt.as_str()));
    assert!(kit.runpod.calls().is_empty(), "nothing went to RunPod");
}

#[tokio::test]
async fn a_pod_job_is_checked_at_the_pods_pace_from_its_submission() {
    let kit = Kit::new();
    let (job_id, _) = dispatched(&kit).await;

    let due = kit.stored(&job_id).next_check_at.unwrap();
    assert_eq!(due, kit.now() + POD_POLL.as_millis() as i64);
    assert_eq!(kit.polls.take(), vec![(job_id, due, POD_POLL)]);
}

#[tokio::test]
async fn each_check_of_a_pod_job_in_flight_asks_for_the_next() {
    let kit = Kit::new();
    let (job_id, prompt) = dispatched(&kit).await;
    kit.polls.take();
    kit.comfy.set_state(&prompt, PromptState::Running);

    poll(&kit, &job_id).await;

    let stored = kit.stored(&job_id);
    assert_eq!(stored.state, JobState::Running);
    let next = stored.next_check_at.unwrap();
    assert_eq!(kit.polls.take(), vec![(job_id, next, POD_POLL)]);
}

#[tokio::test]
async fn a_check_asked_for_a_time_the_job_is_no_longer_due_at_does_nothing() {
    let kit = Kit::new();
    let (job_id, prompt) = dispatched(&kit).await;
    kit.comfy.set_state(&prompt, PromptState::Running);
    let due = kit.stored(&job_id).next_check_at.unwrap();
    poll(&kit, &job_id).await;
    kit.polls.take();
    let version = kit.stored(&job_id).version;

    // A duplicate of the message the check above answered.
    kit.sweeper().check_polled(&job_id, due).await.unwrap();

    assert_eq!(kit.stored(&job_id).version, version);
    assert_eq!(kit.polls.waiting(), 0, "no second chain of checks");
}

#[tokio::test]
async fn a_finished_prompt_is_collected_through_the_servers_view() {
    let kit = Kit::new();
    let (job_id, prompt) = dispatched(&kit).await;
    let folder = format!("gateway/{job_id}/a1");
    kit.comfy
        .succeed(&prompt, &[(&folder, "restore_00001_.png", b"png bytes")]);

    poll(&kit, &job_id).await;
    kit.run_finalize().await;

    let stored = kit.stored(&job_id);
    assert_eq!(stored.state, JobState::Succeeded, "{:?}", stored.error);
    assert_eq!(stored.outputs.len(), 1);
    assert_eq!(stored.outputs[0].file_name, "restore_00001_.png");
    assert_eq!(
        kit.results.get(&stored.outputs[0].key).unwrap().as_ref(),
        b"png bytes"
    );
}

#[tokio::test]
async fn a_file_the_server_lists_outside_the_jobs_folder_is_never_fetched() {
    let kit = Kit::new();
    let (job_id, prompt) = dispatched(&kit).await;
    kit.comfy
        .succeed(&prompt, &[("gateway/another-job/a1", "theirs.png", b"x")]);

    poll(&kit, &job_id).await;
    kit.run_finalize().await;

    let stored = kit.stored(&job_id);
    assert_eq!(stored.state, JobState::Failed);
    assert_eq!(stored.error.unwrap().code, ErrorCode::InvalidOutputPath);
    assert!(kit.results.keys().is_empty());
}

#[tokio::test]
async fn a_prompt_the_server_refuses_fails_the_job_with_the_servers_message() {
    let kit = Kit::new();
    let job = kit.queued_pod_job("alice");
    kit.comfy
        .refuse_next("missing_node_type: Node 'UpscaleModelLoader' not found");

    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

    assert_eq!(outcome, DispatchOutcome::Failed(ErrorCode::InvalidWorkflow));
    let error = kit.stored(&job.id).error.unwrap();
    assert!(error.message.contains("UpscaleModelLoader"), "{error:?}");
}

#[tokio::test]
async fn an_execution_error_fails_the_job_as_the_workers_failure() {
    let kit = Kit::new();
    let (job_id, prompt) = dispatched(&kit).await;
    kit.comfy.set_state(
        &prompt,
        PromptState::Failed("KSampler: out of memory".into()),
    );

    poll(&kit, &job_id).await;

    let stored = kit.stored(&job_id);
    assert_eq!(stored.state, JobState::Failed);
    let error = stored.error.unwrap();
    assert_eq!(error.code, ErrorCode::WorkerFailed);
    assert!(error.message.contains("out of memory"), "{error:?}");
}

#[tokio::test]
async fn a_lost_prompt_answer_is_settled_by_looking_the_prompt_up() {
    let kit = Kit::new();
    let job = kit.queued_pod_job("alice");
    kit.comfy.lose_next_answer();

    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

    let prompt = comfy::prompt_id(&job.id, 1);
    assert_eq!(outcome, DispatchOutcome::Submitted(prompt));
    assert_eq!(kit.comfy.graphs().len(), 1, "queued once");
}

#[tokio::test]
async fn a_redispatch_adopts_the_prompt_an_earlier_attempt_queued() {
    let kit = Kit::new();
    let job = kit.queued_pod_job("alice");
    // The first attempt queued its prompt, and neither the answer nor a look got back.
    kit.comfy
        .set_state(&comfy::prompt_id(&job.id, 1), PromptState::Queued);
    let mut job = kit.stored(&job.id);
    job.attempts = 1;
    kit.store.put(job.clone());

    let outcome = kit.dispatcher().dispatch(&job.id).await.unwrap();

    assert_eq!(
        outcome,
        DispatchOutcome::Submitted(comfy::prompt_id(&job.id, 1))
    );
    assert!(kit.comfy.graphs().is_empty(), "nothing queued twice");
}

#[tokio::test]
async fn a_prompt_missing_once_is_not_yet_lost() {
    let kit = Kit::new();
    let (job_id, _) = dispatched(&kit).await;
    kit.comfy.restart();

    poll(&kit, &job_id).await;

    let stored = kit.stored(&job_id);
    assert_eq!(stored.state, JobState::Submitted);
    assert!(stored.unseen_at.is_some());
    assert!(!stored.rerun_pending);
}

#[tokio::test]
async fn a_prompt_seen_again_after_a_miss_is_not_lost() {
    let kit = Kit::new();
    let (job_id, prompt) = dispatched(&kit).await;
    kit.comfy.restart();
    poll(&kit, &job_id).await;
    kit.comfy.set_state(&prompt, PromptState::Running);

    poll(&kit, &job_id).await;

    let stored = kit.stored(&job_id);
    assert_eq!(stored.state, JobState::Running);
    assert_eq!(stored.unseen_at, None);
}

#[tokio::test]
async fn a_prompt_lost_in_a_restart_is_queued_again_once_with_the_same_input() {
    let kit = Kit::new();
    let (job_id, _) = dispatched(&kit).await;
    kit.comfy.restart();
    poll(&kit, &job_id).await;

    poll(&kit, &job_id).await;

    let stored = kit.stored(&job_id);
    assert!(stored.rerun_pending, "{:?}", stored);
    assert_eq!(stored.reruns, 1);
    assert!(kit.queue.sent().contains(&job_id), "back to dispatch");
    let outcome = kit.dispatcher().dispatch(&job_id).await.unwrap();
    let second = comfy::prompt_id(&job_id, 2);
    assert_eq!(outcome, DispatchOutcome::Submitted(second.clone()));
    let stored = kit.stored(&job_id);
    assert_eq!(stored.runpod_job_id.as_deref(), Some(second.as_str()));
    assert!(!stored.rerun_pending);
    assert_eq!(stored.state, JobState::Submitted);
    assert_eq!(
        kit.comfy.uploads().len(),
        2,
        "the same input uploaded again"
    );
}

#[tokio::test]
async fn a_job_whose_second_prompt_is_lost_too_fails_backend_lost() {
    let kit = Kit::new();
    let (job_id, _) = dispatched(&kit).await;
    kit.comfy.restart();
    poll(&kit, &job_id).await;
    poll(&kit, &job_id).await;
    kit.dispatcher().dispatch(&job_id).await.unwrap();
    kit.comfy.restart();
    poll(&kit, &job_id).await;

    poll(&kit, &job_id).await;

    let stored = kit.stored(&job_id);
    assert_eq!(stored.state, JobState::Failed);
    assert_eq!(stored.error.unwrap().code, ErrorCode::BackendLost);
}

#[tokio::test]
async fn the_clean_up_of_a_pod_job_empties_its_comfyui_folders_on_the_volume() {
    let kit = Kit::new();
    let (job_id, prompt) = dispatched(&kit).await;
    let input = format!("{POD_VOLUME_ROOT}/input/gateway/{job_id}/a1.jpg");
    let output = format!("{POD_VOLUME_ROOT}/output/gateway/{job_id}/a1/restore_00001_.png");
    let other = format!("{POD_VOLUME_ROOT}/output/gateway/another-job/a1/x.png");
    for key in [&input, &output, &other] {
        kit.volume.insert(key, b"bytes");
    }
    let folder = format!("gateway/{job_id}/a1");
    kit.comfy
        .succeed(&prompt, &[(&folder, "restore_00001_.png", b"png bytes")]);
    poll(&kit, &job_id).await;
    kit.run_finalize().await;
    kit.clock.advance(kit.settings.finalize_lease * 2);

    kit.sweeper().sweep().await.unwrap();

    assert_eq!(kit.volume.keys(), vec![other]);
}

#[tokio::test]
async fn a_client_may_ask_for_the_pod_backend() {
    let kit = Kit::new();
    let mut request = inline_request(&jpeg(64, 48));
    request.backend = Some("pod".into());

    let Submitted::Accepted(job) = kit.api().submit("alice", request, None).await.unwrap() else {
        panic!("a new job");
    };

    assert_eq!(job.backend, gateway::domain::job::BackendKind::Pod);
}

#[tokio::test]
async fn a_job_that_does_not_ask_runs_on_the_default_backend() {
    let kit = Kit::new();

    let Submitted::Accepted(job) = kit
        .api()
        .submit("alice", inline_request(&jpeg(64, 48)), None)
        .await
        .unwrap()
    else {
        panic!("a new job");
    };

    assert_eq!(job.backend, gateway::domain::job::BackendKind::Serverless);
}

#[tokio::test]
async fn a_backend_the_deployment_does_not_run_is_refused_before_anything_is_stored() {
    let kit = Kit::new().with_settings(|s| {
        s.backends = vec![gateway::domain::job::BackendKind::Serverless];
    });
    let mut request = inline_request(&jpeg(64, 48));
    request.backend = Some("pod".into());

    let refusal = kit.api().submit("alice", request, None).await.unwrap_err();

    assert_eq!(refusal.code(), "backend_unavailable");
    assert!(kit.uploads.keys().is_empty());
}

#[tokio::test]
async fn an_unknown_backend_is_refused() {
    let kit = Kit::new();
    let mut request = inline_request(&jpeg(64, 48));
    request.backend = Some("gpu-farm".into());

    let refusal = kit.api().submit("alice", request, None).await.unwrap_err();

    assert_eq!(refusal.code(), "backend_unavailable");
}

#[tokio::test]
async fn cancelling_a_pod_job_stops_its_prompt_through_the_stop_queue() {
    let kit = Kit::new();
    let (job_id, prompt) = dispatched(&kit).await;

    kit.api().cancel("alice", &job_id).await.unwrap();
    for stop in kit.stops.requested() {
        kit.stopper().stop(&stop).await.unwrap();
    }

    assert_eq!(kit.stored(&job_id).state, JobState::Cancelled);
    assert_eq!(kit.comfy.cancelled(), vec![prompt]);
}
