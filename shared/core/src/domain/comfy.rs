//! What a ComfyUI server's answers say about one prompt: the pod backend's reading of
//! `POST /prompt`, `GET /queue`, `GET /history/{id}` and `GET /api/jobs/{id}`, decided here so
//! that the HTTP adapter only fetches.
//!
//! The facts relied on (ComfyUI's `server.py` and `execution.py`; `docs/comfyui-api.md`):
//! - history is `{}` while a prompt is queued or running, for an unknown id, and for a prompt
//!   that failed validation: an empty history proves nothing, so the queue is read first;
//! - history forgets its oldest entries past about 10,000, and a restart loses the queue, the
//!   running prompt and the history: a prompt in neither is lost only when seen so twice, some
//!   seconds apart (the second look rules out a prompt moving from the queue to the history
//!   between the two reads);
//! - a finished entry's `status.status_str` is `success` or `error`; an error's last message is
//!   `execution_error` (node, type, message) or `execution_interrupted`;
//! - a 400 from `POST /prompt` carries `error.type` (`missing_node_type`,
//!   `prompt_outputs_failed_validation`, `prompt_no_outputs`, `invalid_prompt_id`, …) and
//!   `node_errors`.
use serde_json::Value;

/// One file a prompt wrote, as `/view` takes it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComfyFile {
    pub filename: String,
    pub subfolder: String,
    /// `output`, `temp` or `input`.
    pub kind: String,
}

/// Where a prompt stands, as the server's answers show it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PromptState {
    Queued,
    Running,
    /// Ran to the end; every image its output nodes saved, node by node.
    Succeeded(Vec<ComfyFile>),
    /// Ran and failed: the node and its message (an `execution_error`).
    Failed(String),
    /// Stopped by an interrupt.
    Interrupted,
    /// In neither the queue nor the history (nor the jobs route): not proof of loss alone.
    Unseen,
}

/// Where `prompt_id` is in a `GET /queue` answer: running, pending, or not there.
pub fn in_queue(queue: &Value, prompt_id: &str) -> Option<PromptState> {
    let holds = |list: &str| {
        queue[list]
            .as_array()
            .is_some_and(|items| items.iter().any(|item| item[1].as_str() == Some(prompt_id)))
    };
    if holds("queue_running") {
        Some(PromptState::Running)
    } else if holds("queue_pending") {
        Some(PromptState::Queued)
    } else {
        None
    }
}

/// What a `GET /history/{id}` answer says of `prompt_id`; `None` while it has no entry (queued,
/// running, unknown, forgotten, or refused at validation: the history cannot tell these apart).
pub fn in_history(history: &Value, prompt_id: &str) -> Option<PromptState> {
    let entry = history.get(prompt_id)?;
    let status = &entry["status"];
    let messages = status["messages"].as_array();
    let last_event = |name: &str| {
        messages.and_then(|m| {
            m.iter()
                .rev()
                .find(|event| event[0].as_str() == Some(name))
                .map(|event| event[1].clone())
        })
    };
    if let Some(error) = last_event("execution_error") {
        return Some(PromptState::Failed(execution_error(&error)));
    }
    if last_event("execution_interrupted").is_some() {
        return Some(PromptState::Interrupted);
    }
    // `status` exists only since early 2024: an entry without one finished, as older
    // servers wrote only finished prompts with their outputs.
    if status["status_str"].as_str() == Some("error") {
        return Some(PromptState::Failed(
            "the prompt ended in error without saying why".into(),
        ));
    }
    Some(PromptState::Succeeded(outputs(&entry["outputs"])))
}

/// What a `GET /api/jobs/{id}` answer (servers since December 2025) says, for the states it
/// settles on its own; a finished job's outputs are read from the history.
pub fn in_jobs_route(job: &Value) -> Option<PromptState> {
    match job["status"].as_str()? {
        "pending" => Some(PromptState::Queued),
        "in_progress" => Some(PromptState::Running),
        "cancelled" => Some(PromptState::Interrupted),
        _ => None,
    }
}

/// The images every output node saved, in node order (numeric ids numerically), each image
/// once. Entries other than images (text, or fields newer servers add) are passed over.
pub fn outputs(outputs: &Value) -> Vec<ComfyFile> {
    let Some(nodes) = outputs.as_object() else {
        return Vec::new();
    };
    let mut ids: Vec<&String> = nodes.keys().collect();
    ids.sort_by_key(|id| (id.parse::<u64>().unwrap_or(u64::MAX), (*id).clone()));
    let mut files: Vec<ComfyFile> = Vec::new();
    for id in ids {
        for image in nodes[id.as_str()]["images"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let Some(filename) = image["filename"].as_str() else {
                continue;
            };
            let file = ComfyFile {
                filename: filename.to_string(),
                subfolder: image["subfolder"].as_str().unwrap_or_default().to_string(),
                kind: image["type"].as_str().unwrap_or("output").to_string(),
            };
            if !files.contains(&file) {
                files.push(file);
            }
        }
    }
    files
}

fn execution_error(error: &Value) -> String {
    let node = error["node_id"].as_str().unwrap_or("?");
    let node_type = error["node_type"].as_str().unwrap_or("?");
    let message = error["exception_message"]
        .as_str()
        .unwrap_or("no message")
        .trim();
    cut(&format!("node {node} ({node_type}): {message}"))
}

/// Why a `POST /prompt` answered 400, for the job's error: the server's summary, then each
/// failing node's first message.
pub fn refusal_message(body: &Value) -> String {
    let error = &body["error"];
    let mut text = error["message"]
        .as_str()
        .or_else(|| error["type"].as_str())
        .unwrap_or("the server refused the prompt")
        .to_string();
    if let Some(nodes) = body["node_errors"].as_object() {
        let mut ids: Vec<&String> = nodes.keys().collect();
        ids.sort();
        for id in ids {
            let node = &nodes[id.as_str()];
            if let Some(first) = node["errors"].as_array().and_then(|e| e.first()) {
                let class = node["class_type"].as_str().unwrap_or("?");
                let message = first["message"].as_str().unwrap_or("invalid");
                let details = first["details"].as_str().unwrap_or_default();
                text.push_str(&format!("; node {id} ({class}): {message}"));
                if !details.is_empty() {
                    text.push_str(&format!(" ({details})"));
                }
            }
        }
    }
    cut(&text)
}

/// Errors from a server are stored on the job: bounded.
fn cut(text: &str) -> String {
    text.chars().take(500).collect()
}

/// The `prompt_id` of a job's dispatch attempt: a canonical lowercase UUID (ComfyUI refuses any
/// other form), the same every time it is computed. So a dispatch that lost the answer to its
/// `POST /prompt` can look the prompt up before posting again (ComfyUI does not refuse a
/// duplicate id), with nothing recorded first.
pub fn prompt_id(job_id: &str, attempt: u32) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("comfy-prompt:{job_id}:{attempt}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .to_string()
}

/// Whether the server took our `prompt_id`: one that answers with another id ignores the
/// field (servers from before it existed), and then a lost answer cannot be looked up by id.
pub fn honours_prompt_id(answer: &Value, sent: &str) -> bool {
    answer["prompt_id"].as_str() == Some(sent)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const ID: &str = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b";

    #[test]
    fn the_queue_tells_running_from_pending_and_knows_nothing_else() {
        let queue = json!({
            "queue_running": [[1, ID, {}, {}, ["9"]]],
            "queue_pending": [[2, "other", {}, {}, ["9"]]],
        });
        assert_eq!(in_queue(&queue, ID), Some(PromptState::Running));
        assert_eq!(in_queue(&queue, "other"), Some(PromptState::Queued));
        assert_eq!(in_queue(&queue, "unknown"), None);
        assert_eq!(in_queue(&json!({}), ID), None);
    }

    #[test]
    fn an_empty_history_says_nothing() {
        assert_eq!(in_history(&json!({}), ID), None);
    }

    #[test]
    fn a_successful_entry_gives_every_saved_image_in_node_order_once() {
        let history = json!({ID: {
            "outputs": {
                "12": {"images": [{"filename": "b_00001_.png", "subfolder": "", "type": "output"}]},
                "9": {"images": [
                    {"filename": "a_00001_.png", "subfolder": "x", "type": "output"},
                    {"filename": "a_00001_.png", "subfolder": "x", "type": "output"}
                ], "text": ["ignored"]},
            },
            "status": {"status_str": "success", "completed": true, "messages": []},
        }});
        let Some(PromptState::Succeeded(files)) = in_history(&history, ID) else {
            panic!("succeeded")
        };
        let names: Vec<&str> = files.iter().map(|f| f.filename.as_str()).collect();
        assert_eq!(names, ["a_00001_.png", "b_00001_.png"]);
        assert_eq!(files[0].subfolder, "x");
    }

    #[test]
    fn an_execution_error_fails_with_the_node_and_its_message() {
        let history = json!({ID: {
            "outputs": {},
            "status": {"status_str": "error", "completed": false, "messages": [
                ["execution_start", {"prompt_id": ID}],
                ["execution_error", {"prompt_id": ID, "node_id": "3", "node_type": "KSampler",
                  "exception_message": "CUDA out of memory\n", "exception_type": "RuntimeError"}]
            ]},
        }});
        assert_eq!(
            in_history(&history, ID),
            Some(PromptState::Failed(
                "node 3 (KSampler): CUDA out of memory".into()
            ))
        );
    }

    #[test]
    fn an_interrupted_run_is_told_apart_from_a_failure() {
        let history = json!({ID: {"outputs": {}, "status": {"status_str": "error",
            "completed": false, "messages": [["execution_interrupted", {"prompt_id": ID}]]}}});
        assert_eq!(in_history(&history, ID), Some(PromptState::Interrupted));
    }

    #[test]
    fn an_entry_from_a_server_without_status_counts_as_finished() {
        let history = json!({ID: {"outputs": {"9": {"images": [
            {"filename": "r.png", "subfolder": "", "type": "output"}]}}}});
        assert!(matches!(
            in_history(&history, ID),
            Some(PromptState::Succeeded(files)) if files.len() == 1
        ));
    }

    #[test]
    fn a_validation_refusal_names_the_failing_nodes() {
        let body = json!({
            "error": {"type": "prompt_outputs_failed_validation",
                      "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
            "node_errors": {"3": {"errors": [{"type": "value_bigger_than_max",
                "message": "Value 2.0 bigger than max of 1.0", "details": "denoise", "extra_info": {}}],
                "dependent_outputs": ["9"], "class_type": "KSampler"}}
        });
        assert_eq!(
            refusal_message(&body),
            "Prompt outputs failed validation; node 3 (KSampler): Value 2.0 bigger than max of 1.0 (denoise)"
        );
        let missing = json!({"error": {"type": "missing_node_type",
            "message": "Node 'Foo' not found. The custom node may not be installed."}, "node_errors": {}});
        assert!(refusal_message(&missing).contains("Foo"));
    }

    #[test]
    fn a_server_answering_with_another_id_ignores_ours() {
        assert!(honours_prompt_id(
            &json!({"prompt_id": ID, "number": 3}),
            ID
        ));
        assert!(!honours_prompt_id(
            &json!({"prompt_id": "minted-by-the-server"}),
            ID
        ));
    }

    #[test]
    fn a_prompt_id_is_a_canonical_uuid_fixed_by_the_job_and_its_attempt() {
        let id = prompt_id("0190a1b2-0000-7000-8000-000000000001", 1);
        let parsed = uuid::Uuid::parse_str(&id).unwrap();
        assert_eq!(parsed.hyphenated().to_string(), id, "canonical, lowercase");
        assert_eq!(id, prompt_id("0190a1b2-0000-7000-8000-000000000001", 1));
        assert_ne!(id, prompt_id("0190a1b2-0000-7000-8000-000000000001", 2));
        assert_ne!(id, prompt_id("0190a1b2-0000-7000-8000-000000000002", 1));
    }

    #[test]
    fn the_jobs_route_settles_only_what_it_can() {
        assert_eq!(
            in_jobs_route(&json!({"status": "pending"})),
            Some(PromptState::Queued)
        );
        assert_eq!(
            in_jobs_route(&json!({"status": "in_progress"})),
            Some(PromptState::Running)
        );
        assert_eq!(
            in_jobs_route(&json!({"status": "completed"})),
            None,
            "outputs: history"
        );
        assert_eq!(in_jobs_route(&json!({"error": "Job not found"})), None);
    }
}
