//! ComfyUI's prompt worker: one prompt at a time, lowest queue number first, each ending in a
//! history entry (success, `execution_error` or `execution_interrupted`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use runpod_emulator::comfy::{run_graph, GraphError, SavedImage};
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Notify};

use crate::nodes;
use crate::state::{now_ms, HistoryEntry, Outcome, QueueItem, Running};
use crate::App;

pub(crate) async fn run(app: Arc<App>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let next = {
            let mut state = app.state();
            state.take_next().map(|item| {
                let interrupt = Arc::new(Notify::new());
                let started_ms = now_ms();
                state.running = Some(Running {
                    item: item.clone(),
                    started_ms,
                    interrupt: interrupt.clone(),
                });
                let fail = state.faults.fail_execution > 0;
                if fail {
                    state.faults.fail_execution -= 1;
                }
                let run_time = app
                    .config
                    .min_run_time
                    .max(Duration::from_millis(state.faults.slow_run_ms));
                let run = Run {
                    interrupt,
                    epoch: state.epoch,
                    started_ms,
                    fail,
                    run_time,
                };
                (item, run)
            })
        };
        match next {
            Some((item, run)) => execute(&app, item, run).await,
            None => {
                tokio::select! {
                    () = app.wake.notified() => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
        }
    }
}

enum Ended {
    Saved(Vec<SavedImage>),
    Error(GraphError, &'static str),
    Interrupted,
}

/// How one prompt is to run, fixed when it starts.
struct Run {
    interrupt: Arc<Notify>,
    epoch: u64,
    started_ms: u64,
    fail: bool,
    run_time: Duration,
}

async fn execute(app: &App, item: QueueItem, run: Run) {
    let Run {
        interrupt,
        epoch,
        started_ms,
        fail,
        run_time,
    } = run;
    let work = async {
        tokio::time::sleep(run_time).await;
        if fail {
            return Ended::Error(
                GraphError {
                    node_id: Some(injected_failure_node(&item)),
                    message: "Allocation on device".to_owned(),
                },
                "torch.OutOfMemoryError",
            );
        }
        if !nodes::has_save_image(&item.prompt) {
            // PreviewImage-only graphs: the emulator keeps no temp previews.
            return Ended::Saved(Vec::new());
        }
        let graph = item.prompt.clone();
        let input_dir: PathBuf = app.config.input_dir.clone();
        let output_dir: PathBuf = app.config.output_dir.clone();
        match tokio::task::spawn_blocking(move || run_graph(&graph, &input_dir, &output_dir)).await
        {
            Ok(Ok(saved)) => Ended::Saved(saved),
            Ok(Err(err)) => Ended::Error(err, "RuntimeError"),
            Err(join) => Ended::Error(
                GraphError {
                    node_id: None,
                    message: join.to_string(),
                },
                "RuntimeError",
            ),
        }
    };
    let ended = tokio::select! {
        ended = work => ended,
        () = interrupt.notified() => Ended::Interrupted,
    };

    // What it saved, read back as written, for the emulator's own record.
    let files: Vec<(String, String, Vec<u8>)> = match &ended {
        Ended::Saved(saved) => saved
            .iter()
            .map(|image| {
                let path = app
                    .output_dir()
                    .join(&image.subfolder)
                    .join(&image.filename);
                let bytes = std::fs::read(path).unwrap_or_default();
                (image.subfolder.clone(), image.filename.clone(), bytes)
            })
            .collect(),
        _ => Vec::new(),
    };
    let mut state = app.state();
    if state.epoch != epoch {
        return;
    }
    state.running = None;
    let ended_ms = now_ms();
    let (entry_body, outcome) = history_body(&item, ended, started_ms, ended_ms);
    app.ledger().insert(
        item.prompt_id.clone(),
        crate::EndedPrompt {
            outcome: outcome.job_status(),
            files,
            ended_at_ms: ended_ms,
        },
    );
    state.record(
        item.prompt_id.clone(),
        HistoryEntry {
            body: entry_body,
            outcome,
            item,
            started_ms,
            ended_ms,
        },
        app.config.max_history,
    );
    drop(state);
    app.wake.notify_one();
}

/// The node an injected failure blames: the sampler, where real runs fail (out of memory),
/// else the first output node.
fn injected_failure_node(item: &QueueItem) -> String {
    let nodes = item.prompt.as_object();
    nodes
        .and_then(|nodes| {
            nodes
                .iter()
                .find(|(_, node)| node["class_type"] == "KSampler")
                .map(|(id, _)| id.clone())
        })
        .or_else(|| item.outputs.first().cloned())
        .unwrap_or_default()
}

fn class_of(item: &QueueItem, node_id: &str) -> Value {
    item.prompt
        .get(node_id)
        .and_then(|node| node.get("class_type"))
        .cloned()
        .unwrap_or(Value::Null)
}

fn history_body(
    item: &QueueItem,
    ended: Ended,
    started_ms: u64,
    ended_ms: u64,
) -> (Value, Outcome) {
    let id = &item.prompt_id;
    let mut messages = vec![
        json!(["execution_start", {"prompt_id": id, "timestamp": started_ms}]),
        json!(["execution_cached", {"nodes": [], "prompt_id": id, "timestamp": started_ms}]),
    ];
    let mut outputs = Map::new();
    let mut meta = Map::new();
    let outcome = match ended {
        Ended::Saved(saved) => {
            for image in saved {
                let node = outputs
                    .entry(image.node_id.clone())
                    .or_insert_with(|| json!({"images": []}));
                if let Some(images) = node["images"].as_array_mut() {
                    images.push(json!({
                        "filename": image.filename,
                        "subfolder": image.subfolder,
                        "type": "output",
                    }));
                }
                meta.insert(
                    image.node_id.clone(),
                    json!({
                        "node_id": image.node_id,
                        "display_node": image.node_id,
                        "parent_node": null,
                        "real_node_id": image.node_id,
                    }),
                );
            }
            messages.push(json!(["execution_success", {"prompt_id": id, "timestamp": ended_ms}]));
            Outcome::Completed
        }
        Ended::Error(err, exception_type) => {
            let node_id = err
                .node_id
                .unwrap_or_else(|| item.outputs.first().cloned().unwrap_or_default());
            messages.push(json!(["execution_error", {
                "prompt_id": id,
                "node_id": node_id,
                "node_type": class_of(item, &node_id),
                "executed": [],
                "exception_message": err.message,
                "exception_type": exception_type,
                "traceback": [],
                "current_inputs": {},
                "current_outputs": [],
                "timestamp": ended_ms,
            }]));
            Outcome::Failed
        }
        Ended::Interrupted => {
            let node_id = item.outputs.first().cloned().unwrap_or_default();
            messages.push(json!(["execution_interrupted", {
                "prompt_id": id,
                "node_id": node_id,
                "node_type": class_of(item, &node_id),
                "executed": [],
                "timestamp": ended_ms,
            }]));
            Outcome::Cancelled
        }
    };
    let success = outcome == Outcome::Completed;
    let body = json!({
        "prompt": item.to_json(),
        "outputs": outputs,
        "status": {
            "status_str": if success { "success" } else { "error" },
            "completed": success,
            "messages": messages,
        },
        "meta": meta,
    });
    (body, outcome)
}
