//! The stopper: the one caller of RunPod's `/cancel`, fed by the stop queue.
use gateway::app::stop::Stopped;
use gateway::domain::comfy::PromptState;
use gateway::domain::job::BackendKind;
use gateway::ports::{StopReason, StopRun};
use testkit::fakes::Answer;
use testkit::Kit;

fn stop(run: &str) -> StopRun {
    StopRun {
        job_id: "0190a1b2-0000-7000-8000-000000000001".into(),
        runpod_id: run.into(),
        reason: StopReason::ClientCancel,
        backend: BackendKind::Serverless,
    }
}

#[tokio::test]
async fn a_stop_cancels_the_run_at_runpod() {
    let kit = Kit::new();

    let stopped = kit.stopper().stop(&stop("rp-3")).await.unwrap();

    assert_eq!(stopped, Stopped::Stopped);
    assert_eq!(kit.runpod.calls(), vec!["cancel rp-3".to_string()]);
}

#[tokio::test]
async fn a_run_runpod_no_longer_knows_needs_no_stop() {
    let kit = Kit::new();
    kit.runpod.answer_cancels(Answer::NotFound);

    assert_eq!(
        kit.stopper().stop(&stop("rp-3")).await.unwrap(),
        Stopped::Gone
    );
}

#[tokio::test]
async fn a_stop_runpod_cannot_take_now_is_handed_back_to_be_retried() {
    let kit = Kit::new();
    kit.runpod.answer_cancels(Answer::Transient);

    assert!(kit.stopper().stop(&stop("rp-3")).await.is_err());
}

#[tokio::test]
async fn a_refused_stop_is_not_dropped_but_handed_back_for_the_dead_letter_queue() {
    // A 401 is a wrong key, not a finished run: the GPU may still be running.
    let kit = Kit::new();
    kit.runpod.answer_cancels(Answer::Permanent(401));

    assert!(kit.stopper().stop(&stop("rp-3")).await.is_err());
}

#[tokio::test]
async fn a_stop_of_a_pod_run_cancels_the_prompt_at_the_comfyui_server() {
    let kit = Kit::new();
    kit.comfy.set_state("prompt-1", PromptState::Running);
    let request = StopRun {
        backend: BackendKind::Pod,
        ..stop("prompt-1")
    };

    let stopped = kit.stopper().stop(&request).await.unwrap();

    assert_eq!(stopped, Stopped::Stopped);
    assert_eq!(kit.comfy.cancelled(), vec!["prompt-1".to_string()]);
    assert_eq!(kit.comfy.state("prompt-1"), Some(PromptState::Interrupted));
    assert!(kit.runpod.calls().is_empty());
}

#[tokio::test]
async fn a_stop_request_from_before_backends_is_a_serverless_run() {
    let body = r#"{"job_id":"j","runpod_id":"rp-3","reason":"client_cancel"}"#;

    let request: StopRun = serde_json::from_str(body).unwrap();

    assert_eq!(request.backend, BackendKind::Serverless);
}
