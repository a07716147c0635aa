//! ComfyUI's HTTP routes (`server.py`), each also under `/api`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::files;
use crate::nodes;
use crate::state::{now_ms, OrderedObject, QueueItem};
use crate::App;

pub(crate) type Shared = State<Arc<App>>;

pub(crate) fn router(app: Arc<App>) -> Router {
    let mut api = routes();
    if app.config.jobs_api {
        api = api.route("/jobs/{id}", get(job));
    }
    Router::new()
        .merge(routes())
        .nest("/api", api)
        .layer(DefaultBodyLimit::max(app.config.max_upload_bytes))
        .layer(middleware::from_fn_with_state(app.clone(), gate))
        .with_state(app)
}

fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/prompt", get(prompt_info).post(post_prompt))
        .route("/queue", get(get_queue).post(post_queue))
        .route("/interrupt", post(interrupt))
        .route("/history", get(get_history).post(post_history))
        .route("/history/{id}", get(get_history_entry))
        .route("/view", get(files::view))
        .route("/upload/image", post(files::upload_image))
        .route("/object_info", get(object_info))
        .route("/object_info/{class}", get(object_info_one))
        .route("/system_stats", get(system_stats))
        .route("/embeddings", get(|| async { Json(json!([])) }))
        .route("/extensions", get(|| async { Json(json!([])) }))
}

/// The reverse proxy's token check and the slow-answers fault, before any route.
async fn gate(State(app): Shared, request: Request, next: Next) -> Response {
    if let Some(token) = &app.config.bearer_token {
        let expected = format!("Bearer {token}");
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        if given != Some(expected.as_str()) {
            return (StatusCode::UNAUTHORIZED, "401 Unauthorized").into_response();
        }
    }
    let delay = app.faults().delay_ms;
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    next.run(request).await
}

fn bad_request(error: Value, node_errors: Value) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": error, "node_errors": node_errors})),
    )
        .into_response()
}

fn parse_body(body: &Bytes) -> Result<Value, Box<Response>> {
    serde_json::from_slice(body).map_err(|err| {
        Box::new(bad_request(
            nodes::error("invalid_json", "Request body is not JSON", &err.to_string()),
            json!({}),
        ))
    })
}

/// ComfyUI's own format: a canonical, lowercase, hyphenated UUID.
fn canonical_uuid(id: &str) -> bool {
    uuid::Uuid::try_parse(id).is_ok_and(|u| u.hyphenated().to_string() == id)
}

async fn post_prompt(State(app): Shared, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(v) => v,
        Err(response) => return *response,
    };
    let Some(prompt) = body.get("prompt").cloned() else {
        let error = nodes::error("no_prompt", "No prompt provided", "No prompt provided");
        return bad_request(error, json!({}));
    };
    let faults = app.faults();
    let prompt_id = match body.get("prompt_id") {
        Some(_) if faults.ignore_prompt_id => uuid::Uuid::new_v4().to_string(),
        Some(Value::String(id)) if canonical_uuid(id) => id.clone(),
        Some(Value::Null) | None => uuid::Uuid::new_v4().to_string(),
        Some(_) => {
            let error = nodes::error(
                "invalid_prompt_id",
                "prompt_id must be a valid UUID",
                "prompt_id must be a UUID string in canonical lowercase hyphenated form; \
                 omit it to let the server generate one",
            );
            return bad_request(error, json!({}));
        }
    };
    let inject = {
        let mut state = app.state();
        let inject = state.faults.fail_validation > 0;
        if inject {
            state.faults.fail_validation -= 1;
        }
        inject
    };
    let outputs = match nodes::validate(&prompt, &app.config.input_dir, inject) {
        Ok(outputs) => outputs,
        Err(invalid) => return bad_request(invalid.error, invalid.node_errors),
    };
    let mut extra_data = match body.get("extra_data") {
        Some(Value::Object(map)) => map.clone(),
        _ => serde_json::Map::new(),
    };
    if let Some(client_id) = body.get("client_id") {
        extra_data.insert("client_id".to_owned(), client_id.clone());
    }
    extra_data.insert("create_time".to_owned(), json!(now_ms()));

    let mut state = app.state();
    let (number, order) = match body.get("number").and_then(number_of) {
        Some(n) => (json!(n), n),
        None => {
            let minted = state.next_number;
            state.next_number += 1;
            let front = body.get("front").is_some_and(truthy);
            let signed = if front {
                -(minted as f64)
            } else {
                minted as f64
            };
            let number = if front {
                json!(-i64::try_from(minted).unwrap_or(i64::MAX))
            } else {
                json!(minted)
            };
            (number, signed)
        }
    };
    let seq = state.next_seq;
    state.next_seq += 1;
    state.pending.push(QueueItem {
        number: number.clone(),
        order,
        seq,
        prompt_id: prompt_id.clone(),
        prompt,
        extra_data: Value::Object(extra_data),
        outputs,
    });
    drop(state);
    app.wake.notify_one();
    Json(json!({"prompt_id": prompt_id, "number": number, "node_errors": {}})).into_response()
}

/// Python's `float(x)` for what a client may send as `number`.
fn number_of(value: &Value) -> Option<f64> {
    match value {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Python truthiness of a JSON value.
fn truthy(value: &Value) -> bool {
    match value {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
    }
}

async fn prompt_info(State(app): Shared) -> Json<Value> {
    let state = app.state();
    let remaining = state.pending.len() + usize::from(state.running.is_some());
    Json(json!({"exec_info": {"queue_remaining": remaining}}))
}

async fn get_queue(State(app): Shared) -> Json<Value> {
    let mut state = app.state();
    state.sort_pending();
    let running: Vec<Value> = state.running.iter().map(|r| r.item.to_json()).collect();
    let pending: Vec<Value> = state.pending.iter().map(QueueItem::to_json).collect();
    Json(json!({"queue_running": running, "queue_pending": pending}))
}

fn id_list(body: &Value) -> Vec<String> {
    body.get("delete")
        .and_then(Value::as_array)
        .map(|ids| {
            ids.iter()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

async fn post_queue(State(app): Shared, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(v) => v,
        Err(response) => return *response,
    };
    let mut state = app.state();
    if body.get("clear").is_some_and(truthy) {
        state.pending.clear();
    }
    let delete = id_list(&body);
    state
        .pending
        .retain(|item| !delete.contains(&item.prompt_id));
    StatusCode::OK.into_response()
}

async fn interrupt(State(app): Shared, body: Bytes) -> StatusCode {
    // ComfyUI reads the body leniently: none, or not JSON, means "whatever runs".
    let target = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| {
            v.get("prompt_id")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .filter(|id| !id.is_empty());
    let state = app.state();
    if let Some(running) = &state.running {
        if target.is_none_or(|id| id == running.item.prompt_id) {
            running.interrupt.notify_one();
        }
    }
    StatusCode::OK
}

async fn get_history(
    State(app): Shared,
    Query(query): Query<HashMap<String, String>>,
) -> Json<OrderedObject> {
    let state = app.state();
    let max_items = query.get("max_items").and_then(|m| m.parse::<usize>().ok());
    let skip = match max_items {
        Some(max) => state.history.len().saturating_sub(max),
        None => 0,
    };
    let entries = state
        .history
        .iter()
        .skip(skip)
        .map(|(id, entry)| (id.clone(), entry.body.clone()))
        .collect();
    Json(OrderedObject(entries))
}

async fn get_history_entry(State(app): Shared, Path(id): Path<String>) -> Json<Value> {
    let state = app.state();
    match state.history_entry(&id) {
        Some(entry) => Json(json!({ id: entry.body })),
        None => Json(json!({})),
    }
}

async fn post_history(State(app): Shared, body: Bytes) -> Response {
    let body = match parse_body(&body) {
        Ok(v) => v,
        Err(response) => return *response,
    };
    let mut state = app.state();
    if body.get("clear").is_some_and(truthy) {
        state.history.clear();
    }
    let delete = id_list(&body);
    state.history.retain(|(id, _)| !delete.contains(id));
    StatusCode::OK.into_response()
}

async fn job(State(app): Shared, Path(id): Path<String>) -> Response {
    let state = app.state();
    let found = if let Some(running) = state.running.as_ref().filter(|r| r.item.prompt_id == id) {
        Some(json!({
            "id": id,
            "status": "in_progress",
            "priority": running.item.number,
            "create_time": running.item.create_time(),
            "execution_start_time": running.started_ms,
        }))
    } else if let Some(item) = state.pending.iter().find(|i| i.prompt_id == id) {
        Some(json!({
            "id": id,
            "status": "pending",
            "priority": item.number,
            "create_time": item.create_time(),
        }))
    } else {
        state.history_entry(&id).map(|entry| {
            let outputs = &entry.body["outputs"];
            let count: usize = outputs
                .as_object()
                .map(|o| {
                    o.values()
                        .map(|n| n["images"].as_array().map_or(0, Vec::len))
                        .sum()
                })
                .unwrap_or(0);
            let mut job = json!({
                "id": id,
                "status": entry.outcome.job_status(),
                "priority": entry.item.number,
                "create_time": entry.item.create_time(),
                "execution_start_time": entry.started_ms,
                "execution_end_time": entry.ended_ms,
                "outputs": outputs,
                "outputs_count": count,
            });
            let last = entry.body["status"]["messages"]
                .as_array()
                .and_then(|m| m.last())
                .cloned();
            if let Some(last) = last.filter(|m| m[0] == "execution_error") {
                job["execution_error"] = last[1].clone();
            }
            job
        })
    };
    match found {
        Some(job) => Json(job).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "Job not found"})),
        )
            .into_response(),
    }
}

fn input_files(app: &App) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&app.config.input_dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

async fn object_info(State(app): Shared) -> Json<Value> {
    let files = input_files(&app);
    let all: serde_json::Map<String, Value> = nodes::NODE_TYPES
        .iter()
        .map(|kind| (kind.name.to_owned(), nodes::object_info(kind, &files)))
        .collect();
    Json(Value::Object(all))
}

async fn object_info_one(State(app): Shared, Path(class): Path<String>) -> Json<Value> {
    match nodes::node_type(&class) {
        Some(kind) => Json(json!({ class: nodes::object_info(kind, &input_files(&app)) })),
        None => Json(json!({})),
    }
}

async fn system_stats() -> Json<Value> {
    Json(json!({
        "system": {
            "os": "posix",
            "ram_total": 0,
            "ram_free": 0,
            "comfyui_version": concat!("0.3.0+emulator.", env!("CARGO_PKG_VERSION")),
            "python_version": "3.12.0 (comfyui-emulator)",
            "pytorch_version": "none",
            "embedded_python": false,
            "argv": ["main.py"],
        },
        "devices": [],
    }))
}
