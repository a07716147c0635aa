//! The pod backend's HTTP adapter (`adapters::comfy_http`) against the local ComfyUI server
//! (`local/comfyui-emulator`), whose routes and answers follow ComfyUI's own (and which a
//! third-party client checks in `comfyui_emulator.rs`).
use std::time::{Duration, Instant};

use bytes::Bytes;
use comfyui_emulator::{spawn, ComfyConfig, ComfyEmulator};
use futures::StreamExt;
use gateway::domain::comfy::{ComfyFile, PromptState};
use gateway::ports::{ComfyError, ComfyServer};
use gateway_aws::adapters::comfy_http::HttpComfyServer;
use gateway_tests::jpeg;
use serde_json::{json, Value};

/// Generous: the suite runs on slow, shared machines; each wait ends as soon as it can.
const TIMEOUT: Duration = Duration::from_secs(60);

struct Pod {
    emulator: ComfyEmulator,
    _dir: tempfile::TempDir,
}

async fn pod(change: impl FnOnce(&mut ComfyConfig)) -> Pod {
    let dir = tempfile::tempdir().unwrap();
    let mut config = ComfyConfig::new(dir.path().join("input"), dir.path().join("output"));
    config.temp_dir = dir.path().join("temp");
    change(&mut config);
    let emulator = spawn(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("the ComfyUI emulator starts");
    Pod {
        emulator,
        _dir: dir,
    }
}

fn server(pod: &Pod, token: Option<&str>) -> HttpComfyServer {
    HttpComfyServer::new(
        url::Url::parse(&pod.emulator.url).unwrap(),
        token.map(str::to_string),
    )
    .unwrap()
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The restore workflow's pixel plumbing: load the photo, save it.
fn graph(image: &str) -> Value {
    json!({
        "1": {"class_type": "LoadImage", "inputs": {"image": image}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "gateway/job"}},
    })
}

/// A prompt of the photo uploaded, queued under a new id of ours: its id.
async fn queued(server: &HttpComfyServer) -> String {
    let id = new_id();
    server
        .queue_prompt(&id, &graph(&uploaded(server).await))
        .await
        .unwrap();
    id
}

async fn uploaded(server: &HttpComfyServer) -> String {
    server
        .upload_image("", "photo.jpg", "image/jpeg", Bytes::from(jpeg(64, 48)))
        .await
        .unwrap()
}

/// Polls until the prompt is in a state `done` accepts.
async fn until(
    server: &HttpComfyServer,
    id: &str,
    done: impl Fn(&PromptState) -> bool,
) -> PromptState {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let state = server.prompt_state(id).await.unwrap();
        if done(&state) {
            return state;
        }
        assert!(Instant::now() < deadline, "still {state:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn finished(state: &PromptState) -> bool {
    !matches!(state, PromptState::Queued | PromptState::Running)
}

#[tokio::test]
async fn a_photo_queued_under_our_id_runs_and_its_output_streams_back() {
    let pod = pod(|_| {}).await;
    let server = server(&pod, None);
    let id = new_id();

    let name = uploaded(&server).await;
    assert_eq!(server.queue_prompt(&id, &graph(&name)).await.unwrap(), id);
    let PromptState::Succeeded(files) = until(&server, &id, finished).await else {
        panic!("succeeded")
    };

    assert_eq!(files.len(), 1);
    let mut fetched = server.view(&files[0]).await.unwrap();
    let mut bytes = Vec::new();
    while let Some(chunk) = fetched.body.next().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
}

#[tokio::test]
async fn the_same_name_with_other_bytes_is_stored_under_another_name() {
    let pod = pod(|_| {}).await;
    let server = server(&pod, None);

    let first = uploaded(&server).await;
    let again = uploaded(&server).await;
    let other = server
        .upload_image("", "photo.jpg", "image/jpeg", Bytes::from(jpeg(32, 32)))
        .await
        .unwrap();

    assert_eq!(first, again, "the same bytes: the same file");
    assert_ne!(first, other, "never overwritten");
}

#[tokio::test]
async fn a_graph_with_an_unknown_node_is_refused_with_the_servers_message() {
    let pod = pod(|_| {}).await;
    let server = server(&pod, None);
    let mut graph = graph(&uploaded(&server).await);
    graph["5"] = json!({"class_type": "NoSuchNode", "inputs": {}});

    let refused = server.queue_prompt(&new_id(), &graph).await.unwrap_err();

    let ComfyError::Refused(message) = refused else {
        panic!("refused: {refused:?}")
    };
    assert!(message.contains("NoSuchNode"), "{message}");
}

#[tokio::test]
async fn an_execution_error_reads_as_failed_with_its_node() {
    let pod = pod(|_| {}).await;
    pod.emulator.fail_next_executions(1);
    let server = server(&pod, None);

    let id = queued(&server).await;

    let state = until(&server, &id, finished).await;
    assert!(matches!(state, PromptState::Failed(_)), "{state:?}");
}

#[tokio::test]
async fn a_server_that_ignores_our_id_answers_with_its_own() {
    let pod = pod(|_| {}).await;
    pod.emulator.ignore_prompt_id(true);
    let server = server(&pod, None);
    let id = new_id();

    let answered = server
        .queue_prompt(&id, &graph(&uploaded(&server).await))
        .await
        .unwrap();

    assert_ne!(answered, id);
}

#[tokio::test]
async fn a_restart_leaves_a_queued_prompt_in_neither_queue_nor_history() {
    let pod = pod(|_| {}).await;
    pod.emulator.stall_queue(true);
    let server = server(&pod, None);
    let id = queued(&server).await;
    assert_eq!(server.prompt_state(&id).await.unwrap(), PromptState::Queued);

    pod.emulator.restart();

    assert_eq!(server.prompt_state(&id).await.unwrap(), PromptState::Unseen);
}

#[tokio::test]
async fn cancel_removes_a_pending_prompt_before_it_runs() {
    let pod = pod(|_| {}).await;
    pod.emulator.stall_queue(true);
    let server = server(&pod, None);
    let id = queued(&server).await;

    server.cancel(&id).await.unwrap();
    pod.emulator.stall_queue(false);

    assert_eq!(server.prompt_state(&id).await.unwrap(), PromptState::Unseen);
}

#[tokio::test]
async fn cancel_interrupts_a_running_prompt_and_no_other() {
    let pod = pod(|config| config.min_run_time = Duration::from_secs(600)).await;
    let server = server(&pod, None);
    let name = uploaded(&server).await;
    let (running, waiting) = (new_id(), new_id());
    server.queue_prompt(&running, &graph(&name)).await.unwrap();
    server.queue_prompt(&waiting, &graph(&name)).await.unwrap();
    until(&server, &running, |s| *s == PromptState::Running).await;

    server.cancel(&running).await.unwrap();

    assert_eq!(
        until(&server, &running, finished).await,
        PromptState::Interrupted
    );
    assert_ne!(
        server.prompt_state(&waiting).await.unwrap(),
        PromptState::Unseen,
        "the other prompt is untouched"
    );
}

#[tokio::test]
async fn a_missing_output_file_is_not_found() {
    let pod = pod(|_| {}).await;
    let server = server(&pod, None);
    let missing = ComfyFile {
        filename: "never_00001_.png".into(),
        subfolder: String::new(),
        kind: "output".into(),
    };

    assert!(matches!(
        server.view(&missing).await.err(),
        Some(ComfyError::NotFound)
    ));
}

#[tokio::test]
async fn behind_a_token_checking_proxy_only_the_configured_token_gets_in() {
    let pod = pod(|config| config.bearer_token = Some("pod-test-token".into())).await;

    let refused = server(&pod, None).prompt_state(&new_id()).await;
    let allowed = server(&pod, Some("pod-test-token"))
        .prompt_state(&new_id())
        .await;

    assert!(
        matches!(refused, Err(ComfyError::BadAnswer(_))),
        "{refused:?}"
    );
    assert_eq!(allowed.unwrap(), PromptState::Unseen);
}
