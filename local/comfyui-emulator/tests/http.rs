//! The emulator over HTTP, one ComfyUI behaviour per test (facts: docs/comfyui-api.md).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use comfyui_emulator::{spawn, ComfyConfig, ComfyEmulator};
use reqwest::StatusCode;
use serde_json::{json, Value};

const RESTORE: &str = include_str!("../../../workflows/restore-comfyui.json");
/// Upper bound for anything the tests wait on; only a broken emulator comes near it.
const PATIENCE: Duration = Duration::from_secs(60);

struct Server {
    emulator: ComfyEmulator,
    http: reqwest::Client,
    root: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

async fn start_with(configure: impl FnOnce(&mut ComfyConfig)) -> Server {
    let root = std::env::temp_dir().join(format!("comfyui-emulator-{}", uuid::Uuid::new_v4()));
    let mut config = ComfyConfig::new(root.join("input"), root.join("output"));
    config.temp_dir = root.join("temp");
    configure(&mut config);
    let emulator = spawn(config, "127.0.0.1:0".parse().unwrap())
        .await
        .expect("emulator starts");
    let photo = image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8, y as u8, 128]));
    photo
        .save(emulator.input_dir.join("photo.png"))
        .expect("write the input photo");
    Server {
        emulator,
        http: reqwest::Client::new(),
        root,
    }
}

async fn start() -> Server {
    start_with(|_| {}).await
}

fn restore_graph() -> Value {
    let mut graph: Value = serde_json::from_str(RESTORE).unwrap();
    graph["78"]["inputs"]["image"] = json!("photo.png");
    graph
}

impl Server {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.emulator.url)
    }

    async fn get(&self, path: &str) -> (StatusCode, Value) {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn post(&self, path: &str, body: Value) -> (StatusCode, Value) {
        let response = self
            .http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    async fn queue(&self, body: Value) -> String {
        let (status, answer) = self.post("/prompt", body).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer["prompt_id"].as_str().unwrap().to_owned()
    }

    async fn history(&self, id: &str) -> Value {
        let (status, body) = self.get(&format!("/history/{id}")).await;
        assert_eq!(status, StatusCode::OK);
        body
    }

    /// The history entry of `id`, once there is one.
    async fn finished(&self, id: &str) -> Value {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let body = self.history(id).await;
            if let Some(entry) = body.get(id) {
                return entry.clone();
            }
            assert!(Instant::now() < deadline, "{id} never finished");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_running(&self, id: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let (_, queue) = self.get("/queue").await;
            if queue["queue_running"]
                .as_array()
                .is_some_and(|r| r.iter().any(|item| item[1] == id))
            {
                return;
            }
            assert!(Instant::now() < deadline, "{id} never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn upload(&self, name: &str, bytes: &[u8], fields: &[(&str, &str)]) -> reqwest::Response {
        let mut form = reqwest::multipart::Form::new();
        for (field, value) in fields {
            form = form.text(field.to_string(), value.to_string());
        }
        let image = reqwest::multipart::Part::bytes(bytes.to_vec())
            .file_name(name.to_string())
            .mime_str("image/png")
            .unwrap();
        self.http
            .post(self.url("/upload/image"))
            .multipart(form.part("image", image))
            .send()
            .await
            .unwrap()
    }
}

fn last_message(entry: &Value) -> Value {
    entry["status"]["messages"]
        .as_array()
        .and_then(|m| m.last())
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test]
async fn a_prompt_queued_with_our_id_is_found_in_history_under_that_id() {
    let server = start().await;
    let ours = uuid::Uuid::new_v4().to_string();
    let id = server
        .queue(json!({"prompt": restore_graph(), "prompt_id": ours}))
        .await;
    assert_eq!(id, ours);
    let entry = server.finished(&ours).await;
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["status"]["completed"], true);
    assert_eq!(entry["prompt"][1], ours.as_str());
    assert_eq!(
        entry["outputs"]["60"]["images"][0],
        json!({"filename": "restored_00001_.png", "subfolder": "", "type": "output"})
    );
}

#[tokio::test]
async fn a_finished_output_is_served_by_view_as_a_png_of_the_scaled_size() {
    let server = start().await;
    let id = server.queue(json!({"prompt": restore_graph()})).await;
    let entry = server.finished(&id).await;
    let image = &entry["outputs"]["60"]["images"][0];
    let response = server
        .http
        .get(server.url("/view"))
        .query(&[
            ("filename", image["filename"].as_str().unwrap()),
            ("subfolder", image["subfolder"].as_str().unwrap()),
            ("type", "output"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "image/png");
    let png = image::load_from_memory(&response.bytes().await.unwrap()).unwrap();
    // 64×48 scaled to one binary megapixel (1024²) keeping the aspect ratio.
    assert_eq!((png.width(), png.height()), (1182, 887));
}

#[tokio::test]
async fn history_is_empty_while_the_prompt_is_queued() {
    let server = start().await;
    server.emulator.stall_queue(true);
    let id = server.queue(json!({"prompt": restore_graph()})).await;
    assert_eq!(server.history(&id).await, json!({}));
    let (_, queue) = server.get("/queue").await;
    assert_eq!(queue["queue_pending"][0][1], id.as_str());
    server.emulator.stall_queue(false);
    server.finished(&id).await;
}

#[tokio::test]
async fn a_duplicate_prompt_id_is_queued_again() {
    let server = start().await;
    let ours = uuid::Uuid::new_v4().to_string();
    server.emulator.stall_queue(true);
    let body = json!({"prompt": restore_graph(), "prompt_id": ours});
    assert_eq!(server.queue(body.clone()).await, ours);
    assert_eq!(server.queue(body).await, ours);
    let (_, queue) = server.get("/queue").await;
    assert_eq!(queue["queue_pending"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn a_prompt_id_that_is_not_a_canonical_uuid_is_refused_as_invalid_prompt_id() {
    let server = start().await;
    let upper = uuid::Uuid::new_v4().to_string().to_uppercase();
    for id in ["job-1", upper.as_str()] {
        let (status, body) = server
            .post(
                "/prompt",
                json!({"prompt": restore_graph(), "prompt_id": id}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{id}");
        assert_eq!(body["error"]["type"], "invalid_prompt_id");
    }
}

#[tokio::test]
async fn a_body_without_prompt_is_refused_as_no_prompt() {
    let server = start().await;
    let (status, body) = server.post("/prompt", json!({"client_id": "x"})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["type"], "no_prompt");
    for field in ["message", "details", "extra_info"] {
        assert!(body["error"].get(field).is_some(), "{field}");
    }
    assert_eq!(body["node_errors"], json!({}));
}

#[tokio::test]
async fn an_unknown_node_type_is_refused_as_missing_node_type_naming_it() {
    let server = start().await;
    let mut graph = restore_graph();
    graph["3"]["class_type"] = json!("UltimateSDUpscale");
    let (status, body) = server.post("/prompt", json!({"prompt": graph})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["type"], "missing_node_type");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("UltimateSDUpscale"));
    assert_eq!(body["node_errors"], json!({}));
}

#[tokio::test]
async fn a_graph_without_an_output_node_is_refused_as_prompt_no_outputs() {
    let server = start().await;
    let mut graph = restore_graph();
    graph.as_object_mut().unwrap().remove("60");
    let (status, body) = server.post("/prompt", json!({"prompt": graph})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["type"], "prompt_no_outputs");
}

#[tokio::test]
async fn a_missing_required_input_is_reported_under_its_node() {
    let server = start().await;
    let mut graph = restore_graph();
    graph["3"]["inputs"]
        .as_object_mut()
        .unwrap()
        .remove("denoise");
    let (status, body) = server.post("/prompt", json!({"prompt": graph})).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
    let node = &body["node_errors"]["3"];
    assert_eq!(node["class_type"], "KSampler");
    assert_eq!(node["dependent_outputs"], json!(["60"]));
    assert_eq!(node["errors"][0]["type"], "required_input_missing");
    assert_eq!(node["errors"][0]["extra_info"]["input_name"], "denoise");
}

#[tokio::test]
async fn a_prompt_failing_validation_leaves_no_history() {
    let server = start().await;
    server.emulator.fail_next_validations(1);
    let ours = uuid::Uuid::new_v4().to_string();
    let (status, body) = server
        .post(
            "/prompt",
            json!({"prompt": restore_graph(), "prompt_id": ours}),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(body["error"]["type"], "prompt_outputs_failed_validation");
    assert_eq!(server.history(&ours).await, json!({}));
    // The switch counts down: the next prompt is accepted.
    server.queue(json!({"prompt": restore_graph()})).await;
}

#[tokio::test]
async fn a_failed_run_ends_its_history_with_an_execution_error() {
    let server = start().await;
    server.emulator.fail_next_executions(1);
    let id = server.queue(json!({"prompt": restore_graph()})).await;
    let entry = server.finished(&id).await;
    assert_eq!(entry["status"]["status_str"], "error");
    assert_eq!(entry["status"]["completed"], false);
    let last = last_message(&entry);
    assert_eq!(last[0], "execution_error");
    assert_eq!(last[1]["prompt_id"], id.as_str());
    assert_eq!(last[1]["node_type"], "KSampler");
    for field in [
        "node_id",
        "exception_message",
        "exception_type",
        "traceback",
    ] {
        assert!(last[1].get(field).is_some(), "{field}");
    }
    let (status, job) = server.get(&format!("/api/jobs/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(job["status"], "failed");
}

#[tokio::test]
async fn view_answers_comfyui_status_codes_for_bad_requests() {
    let server = start().await;
    let cases = [
        ("/view", StatusCode::NOT_FOUND),
        ("/view?filename=/etc/passwd", StatusCode::BAD_REQUEST),
        ("/view?filename=../x.png", StatusCode::BAD_REQUEST),
        ("/view?filename=a.png&type=models", StatusCode::BAD_REQUEST),
        (
            "/view?filename=passwd&type=input&subfolder=../../../etc",
            StatusCode::FORBIDDEN,
        ),
        ("/view?filename=nothing.png", StatusCode::NOT_FOUND),
        ("/view?filename=photo.png&type=input", StatusCode::OK),
    ];
    for (path, expected) in cases {
        let (status, _) = server.get(path).await;
        assert_eq!(status, expected, "{path}");
    }
}

#[tokio::test]
async fn view_answers_404_while_the_view_fault_is_on() {
    let server = start().await;
    server.emulator.view_not_found(true);
    let (status, _) = server.get("/view?filename=photo.png&type=input").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn an_upload_of_different_bytes_under_a_taken_name_is_renamed_and_identical_bytes_are_not() {
    let server = start().await;
    let first = server.upload("scan.png", b"one", &[]).await;
    assert_eq!(first.status(), StatusCode::OK);
    assert_eq!(
        first.json::<Value>().await.unwrap(),
        json!({"name": "scan.png", "subfolder": "", "type": "input"})
    );
    let same = server.upload("scan.png", b"one", &[]).await;
    assert_eq!(same.json::<Value>().await.unwrap()["name"], "scan.png");
    let other = server.upload("scan.png", b"two", &[]).await;
    assert_eq!(other.json::<Value>().await.unwrap()["name"], "scan (1).png");
    let third = server.upload("scan.png", b"three", &[]).await;
    assert_eq!(third.json::<Value>().await.unwrap()["name"], "scan (2).png");
    let overwritten = server
        .upload("scan.png", b"four", &[("overwrite", "true")])
        .await;
    assert_eq!(
        overwritten.json::<Value>().await.unwrap()["name"],
        "scan.png"
    );
    let on_disk = std::fs::read(server.emulator.input_dir.join("scan.png")).unwrap();
    assert_eq!(on_disk, b"four");
}

#[tokio::test]
async fn an_upload_into_a_subfolder_escaping_the_input_dir_is_refused() {
    let server = start().await;
    let response = server
        .upload("x.png", b"x", &[("subfolder", "../../outside")])
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn an_upload_over_the_size_limit_is_refused_with_413() {
    let server = start_with(|c| c.max_upload_bytes = 1024).await;
    let response = server.upload("big.png", &vec![7; 4096], &[]).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn deleting_a_pending_prompt_removes_it_from_the_queue() {
    let server = start().await;
    server.emulator.stall_queue(true);
    let keep = server.queue(json!({"prompt": restore_graph()})).await;
    let gone = server.queue(json!({"prompt": restore_graph()})).await;
    let (status, _) = server.post("/queue", json!({"delete": [gone]})).await;
    assert_eq!(status, StatusCode::OK);
    let (_, queue) = server.get("/queue").await;
    let pending: Vec<&Value> = queue["queue_pending"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| &item[1])
        .collect();
    assert_eq!(pending, vec![&json!(keep)]);
}

#[tokio::test]
async fn interrupting_the_running_prompt_ends_it_as_interrupted() {
    let server = start_with(|c| c.min_run_time = PATIENCE * 10).await;
    let id = server.queue(json!({"prompt": restore_graph()})).await;
    server.wait_running(&id).await;
    let other = uuid::Uuid::new_v4().to_string();
    let (status, _) = server.post("/interrupt", json!({"prompt_id": other})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, _) = server.post("/interrupt", json!({"prompt_id": id})).await;
    assert_eq!(status, StatusCode::OK);
    let entry = server.finished(&id).await;
    assert_eq!(entry["status"]["status_str"], "error");
    assert_eq!(last_message(&entry)[0], "execution_interrupted");
    let (_, job) = server.get(&format!("/api/jobs/{id}")).await;
    assert_eq!(job["status"], "cancelled");
}

#[tokio::test]
async fn a_restart_loses_history_queue_and_the_running_prompt() {
    let server = start_with(|c| c.min_run_time = PATIENCE * 10).await;
    let running = server.queue(json!({"prompt": restore_graph()})).await;
    server.wait_running(&running).await;
    let pending = server.queue(json!({"prompt": restore_graph()})).await;
    server.emulator.restart();
    let (_, queue) = server.get("/queue").await;
    assert_eq!(
        queue,
        json!({"queue_running": [], "queue_pending": []}),
        "{pending}"
    );
    let (_, all) = server.get("/history").await;
    assert_eq!(all, json!({}));
    assert_eq!(server.history(&running).await, json!({}));
}

#[tokio::test]
async fn history_from_before_a_restart_is_gone() {
    let server = start().await;
    let id = server.queue(json!({"prompt": restore_graph()})).await;
    let entry = server.finished(&id).await;
    let (status, _) = server.post("/__admin/restart", json!({})).await;
    assert!(status.is_success());
    assert_eq!(server.history(&id).await, json!({}));
    // Output files survive on disk.
    let name = entry["outputs"]["60"]["images"][0]["filename"]
        .as_str()
        .unwrap();
    assert!(server.emulator.output_dir.join(name).is_file());
}

#[tokio::test]
async fn a_server_ignoring_prompt_ids_answers_an_id_of_its_own() {
    let server = start().await;
    server.emulator.ignore_prompt_id(true);
    let ours = uuid::Uuid::new_v4().to_string();
    let id = server
        .queue(json!({"prompt": restore_graph(), "prompt_id": ours}))
        .await;
    assert_ne!(id, ours);
    server.finished(&id).await;
    assert_eq!(server.history(&ours).await, json!({}));
}

#[tokio::test]
async fn with_a_bearer_token_configured_requests_without_it_are_refused_with_401() {
    let server = start_with(|c| c.bearer_token = Some("pod-secret".to_owned())).await;
    let (status, _) = server.get("/queue").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let response = server
        .http
        .get(server.url("/queue"))
        .bearer_auth("pod-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn every_route_is_also_served_under_the_api_prefix() {
    let server = start().await;
    let id = server.queue(json!({"prompt": restore_graph()})).await;
    let (status, body) = server.post("/api/prompt", json!({})).await;
    assert_eq!(
        (status, &body["error"]["type"]),
        (StatusCode::BAD_REQUEST, &json!("no_prompt"))
    );
    server.finished(&id).await;
    let (status, body) = server.get(&format!("/api/history/{id}")).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.get(&id).is_some());
    for path in [
        "/api/queue",
        "/api/prompt",
        "/api/system_stats",
        "/api/object_info",
    ] {
        let (status, _) = server.get(path).await;
        assert_eq!(status, StatusCode::OK, "{path}");
    }
}

#[tokio::test]
async fn the_jobs_api_reports_404_for_unknown_ids_and_is_absent_when_switched_off() {
    let server = start().await;
    let unknown = uuid::Uuid::new_v4();
    let (status, body) = server.get(&format!("/api/jobs/{unknown}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body, json!({"error": "Job not found"}));

    let older = start_with(|c| c.jobs_api = false).await;
    let id = older.queue(json!({"prompt": restore_graph()})).await;
    older.finished(&id).await;
    let (status, _) = older.get(&format!("/api/jobs/{id}")).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn history_max_items_gives_the_newest_entries_oldest_first() {
    let server = start_with(|c| c.max_history = 3).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let id = server.queue(json!({"prompt": restore_graph()})).await;
        server.finished(&id).await;
        ids.push(id);
    }
    let (_, all) = server.get("/history").await;
    assert_eq!(all.as_object().unwrap().len(), 3, "the oldest was dropped");
    let response = server
        .http
        .get(server.url("/history?max_items=2"))
        .send()
        .await
        .unwrap();
    let text = response.text().await.unwrap();
    let third = text.find(&ids[2]).expect("third entry");
    let fourth = text.find(&ids[3]).expect("fourth entry");
    assert!(third < fourth, "oldest first");
    assert!(!text.contains(&ids[1]));
}

#[tokio::test]
async fn admin_routes_switch_faults_for_another_process() {
    let server = start().await;
    let (status, faults) = server
        .post(
            "/__admin/faults",
            json!({"stall_queue": true, "delay_ms": 1}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(faults["stall_queue"], true);
    assert!(server.emulator.faults().stall_queue);
    let (_, faults) = server.get("/__admin/faults").await;
    assert_eq!(faults["delay_ms"], 1);
}
