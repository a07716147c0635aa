//! Human-readable text from the API's JSON: tables, a job's details, a progress line.
//! Each takes the API's body as it came: a field missing renders as `-`, never a panic.

use serde_json::Value;

pub const TERMINAL_STATES: [&str; 4] = ["succeeded", "failed", "cancelled", "timed_out"];

pub fn is_terminal(job: &Value) -> bool {
    job["status"]
        .as_str()
        .is_some_and(|s| TERMINAL_STATES.contains(&s))
}

/// Rows as columns padded to their widest cell, two spaces apart; the last column is not
/// padded, so a long description does not push trailing spaces.
pub fn table(rows: &[Vec<String>], indent: &str) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::from(indent);
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(cell);
                line.push_str(&" ".repeat(widths[i] - cell.chars().count() + 2));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A JSON value as a person writes it: strings without quotes, `-` for nothing.
fn plain(value: &Value) -> String {
    match value {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A string field as it reads, `-` when absent.
pub fn text(value: &Value) -> String {
    value.as_str().unwrap_or("-").to_string()
}

/// `running 10% loading workflow`: the state, then the worker's progress while the job is
/// not over (after the end, the last progress report would read as if it were still going).
pub fn progress_line(job: &Value) -> String {
    let mut line = job["status"].as_str().unwrap_or("unknown").to_string();
    if !is_terminal(job) {
        if let Some(percent) = percent(job) {
            line.push_str(&format!(" {percent}%"));
        }
        if let Some(message) = job["progress"]["message"].as_str() {
            if !message.is_empty() {
                line.push(' ');
                line.push_str(message);
            }
        }
    }
    line
}

/// The progress fraction as a whole percentage, 0 to 100.
pub fn percent(job: &Value) -> Option<u64> {
    let fraction = job["progress"]["fraction"].as_f64()?;
    if !fraction.is_finite() {
        return None;
    }
    Some((fraction.clamp(0.0, 1.0) * 100.0).round() as u64)
}

/// `GET /workflows`: per workflow, a table of its parameters from their JSON Schema.
pub fn workflows(body: &Value) -> Option<String> {
    let mut out = String::new();
    for (i, workflow) in body["workflows"].as_array()?.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&format!(
            "{} (version {})\n",
            text(&workflow["name"]),
            plain(&workflow["version"])
        ));
        if let Some(description) = workflow["description"].as_str() {
            out.push_str(&format!("  {description}\n"));
        }
        out.push_str(&params_table(&workflow["params"]));
    }
    Some(out)
}

/// The parameters of one JSON Schema object: name, type, bounds, default, description.
pub fn params_table(schema: &Value) -> String {
    let Some(properties) = schema["properties"].as_object().filter(|p| !p.is_empty()) else {
        return "  (no parameters)\n".into();
    };
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut rows = vec![vec![
        "NAME".to_string(),
        "TYPE".into(),
        "BOUNDS".into(),
        "DEFAULT".into(),
        "DESCRIPTION".into(),
    ]];
    for (name, param) in properties {
        let default = match param.get("default") {
            Some(value) => plain(value),
            None if required.contains(&name.as_str()) => "(required)".into(),
            None => "-".into(),
        };
        rows.push(vec![
            name.clone(),
            type_of(param),
            bounds(param),
            default,
            param["description"].as_str().unwrap_or("").to_string(),
        ]);
    }
    table(&rows, "  ")
}

fn type_of(param: &Value) -> String {
    match &param["type"] {
        Value::String(t) => t.clone(),
        Value::Array(types) => types.iter().map(plain).collect::<Vec<_>>().join("|"),
        _ if param.get("enum").is_some() => "enum".into(),
        _ => "any".into(),
    }
}

/// Bounds in interval notation (`[0.01, 4.0]`, `(0, 1]`, `>= 0`), choices, length limits.
fn bounds(param: &Value) -> String {
    if let Some(choices) = param["enum"].as_array() {
        return format!(
            "one of: {}",
            choices.iter().map(plain).collect::<Vec<_>>().join(", ")
        );
    }
    let low = match (param.get("minimum"), param.get("exclusiveMinimum")) {
        (_, Some(x)) if x.is_number() => Some(("(", ">", x)),
        (Some(x), _) if x.is_number() => Some(("[", ">=", x)),
        _ => None,
    };
    let high = match (param.get("maximum"), param.get("exclusiveMaximum")) {
        (_, Some(x)) if x.is_number() => Some((")", "<", x)),
        (Some(x), _) if x.is_number() => Some(("]", "<=", x)),
        _ => None,
    };
    let range = match (low, high) {
        (Some((open, _, low)), Some((close, _, high))) => format!("{open}{low}, {high}{close}"),
        (Some((_, op, low)), None) => format!("{op} {low}"),
        (None, Some((_, op, high))) => format!("{op} {high}"),
        (None, None) => String::new(),
    };
    let length = match (param.get("minLength"), param.get("maxLength")) {
        (Some(min), Some(max)) => format!("length [{min}, {max}]"),
        (Some(min), None) => format!("length >= {min}"),
        (None, Some(max)) => format!("length <= {max}"),
        (None, None) => String::new(),
    };
    let parts: Vec<String> = [range, length]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

/// `GET /jobs/{id}` as `key  value` lines.
pub fn job_details(job: &Value) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut row = |key: &str, value: String| rows.push(vec![key.to_string(), value]);
    row("job", text(&job["job_id"]));
    row("status", progress_line(job));
    row(
        "workflow",
        format!(
            "{} (version {})",
            text(&job["workflow"]),
            plain(&job["workflow_version"])
        ),
    );
    if let Some(params) = job["params"].as_object() {
        let params: Vec<String> = params
            .iter()
            .map(|(k, v)| format!("{k}={}", plain(v)))
            .collect();
        row("params", params.join(" "));
    }
    for (key, field) in [
        ("created", "created_at"),
        ("submitted", "submitted_at"),
        ("running", "running_at"),
        ("finished", "finished_at"),
        ("expires", "expires_at"),
    ] {
        if let Some(at) = job[field].as_str() {
            row(key, at.to_string());
        }
    }
    if let Some(seconds) = job["gpu_seconds"].as_f64() {
        row("gpu", format!("{seconds:.3} s"));
    }
    if let Some(cost) = job["cost_usd"].as_f64() {
        row("cost", format!("${cost:.6}"));
    }
    if job["error"].is_object() {
        row(
            "error",
            format!(
                "{}: {}",
                text(&job["error"]["code"]),
                text(&job["error"]["message"])
            ),
        );
    }
    for (i, output) in job["outputs"].as_array().into_iter().flatten().enumerate() {
        row(
            if i == 0 { "outputs" } else { "" },
            format!(
                "{}  {}  {} bytes  {}",
                text(&output["file_name"]),
                text(&output["content_type"]),
                plain(&output["size"]),
                text(&output["url"])
            ),
        );
    }
    table(&rows, "")
}

/// `GET /jobs`: one line per job.
pub fn jobs_table(jobs: &[Value]) -> String {
    if jobs.is_empty() {
        return "no jobs\n".into();
    }
    let mut rows = vec![vec![
        "JOB".to_string(),
        "STATUS".into(),
        "WORKFLOW".into(),
        "CREATED".into(),
    ]];
    for job in jobs {
        rows.push(vec![
            text(&job["job_id"]),
            text(&job["status"]),
            text(&job["workflow"]),
            text(&job["created_at"]),
        ]);
    }
    table(&rows, "")
}

/// `GET /jobs/{id}/deliveries`: a line per callback, with its last answer.
pub fn deliveries_table(log: &Value) -> Option<String> {
    let deliveries = log["deliveries"].as_array()?;
    if deliveries.is_empty() {
        return Some("no callbacks\n".into());
    }
    let mut rows = vec![[
        "DELIVERY", "TYPE", "STATUS", "ATTEMPTS", "LAST", "NEXT", "URL",
    ]
    .map(String::from)
    .to_vec()];
    for delivery in deliveries {
        let attempts = delivery["attempts"].as_array().cloned().unwrap_or_default();
        let last = attempts.last().map_or("-".to_string(), |a| {
            a["status_code"]
                .as_u64()
                .map(|code| code.to_string())
                .or_else(|| a["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| "-".into())
        });
        rows.push(vec![
            text(&delivery["delivery_id"]),
            text(&delivery["type"]),
            text(&delivery["status"]),
            attempts.len().to_string(),
            last,
            text(&delivery["next_attempt_at"]),
            text(&delivery["url"]),
        ]);
    }
    Some(table(&rows, ""))
}

/// `GET /usage`: a line per day, then the totals.
pub fn usage_table(usage: &Value) -> Option<String> {
    let days = usage["days"].as_array()?;
    let mut rows = vec![[
        "DAY",
        "JOBS",
        "SUCCEEDED",
        "FAILED",
        "CANCELLED",
        "TIMED_OUT",
        "GPU_SECONDS",
        "COST_USD",
    ]
    .map(String::from)
    .to_vec()];
    let line = |label: String, totals: &Value| {
        let mut row = vec![label];
        for field in ["jobs", "succeeded", "failed", "cancelled", "timed_out"] {
            row.push(plain(&totals[field]));
        }
        row.push(
            totals["gpu_seconds"]
                .as_f64()
                .map_or("-".into(), |s| format!("{s:.3}")),
        );
        row.push(
            totals["cost_usd"]
                .as_f64()
                .map_or("-".into(), |c| format!("{c:.6}")),
        );
        row
    };
    for day in days {
        rows.push(line(text(&day["day"]), day));
    }
    rows.push(line("total".into(), &usage["total"]));
    Some(table(&rows, ""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// What `GET /workflows` answers for the built-in `restore` workflow.
    fn restore_workflows() -> Value {
        json!({"workflows": [{
            "name": "restore",
            "version": "1",
            "description": "Photo restoration.",
            "params": {
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "denoise": {"type": "number", "minimum": 0.0, "maximum": 1.0, "default": 0.7,
                                "description": "How much the model may repaint."},
                    "megapixels": {"type": "number", "minimum": 0.01, "maximum": 4.0, "default": 1.0,
                                   "description": "Size of the working image."},
                    "seed": {"type": "integer", "minimum": 0, "maximum": 4294967295u64,
                             "description": "Sampler seed. Drawn at random when left out."}
                }
            }
        }]})
    }

    #[test]
    fn a_workflows_params_become_a_table_of_type_bounds_default_and_description() {
        let out = workflows(&restore_workflows()).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "restore (version 1)");
        assert_eq!(lines[1], "  Photo restoration.");
        assert_eq!(
            lines[2],
            "  NAME        TYPE     BOUNDS           DEFAULT  DESCRIPTION"
        );
        assert_eq!(
            lines[3],
            "  denoise     number   [0.0, 1.0]       0.7      How much the model may repaint."
        );
        assert_eq!(
            lines[4],
            "  megapixels  number   [0.01, 4.0]      1.0      Size of the working image."
        );
        assert_eq!(
            lines[5],
            "  seed        integer  [0, 4294967295]  -        Sampler seed. Drawn at random when left out."
        );
    }

    #[test]
    fn choices_exclusive_bounds_and_required_params_are_shown() {
        let schema = json!({
            "properties": {
                "style": {"type": "string", "enum": ["sepia", "color"]},
                "strength": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                "steps": {"type": "integer", "minimum": 1},
                "prompt": {"type": ["string", "null"], "maxLength": 200}
            },
            "required": ["style"]
        });
        let out = params_table(&schema);
        let line = |name: &str| {
            out.lines()
                .find(|l| l.trim_start().starts_with(name))
                .unwrap()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            line("style"),
            "style string one of: sepia, color (required)"
        );
        assert_eq!(line("strength"), "strength number (0, 1] -");
        assert_eq!(line("steps"), "steps integer >= 1 -");
        assert_eq!(line("prompt"), "prompt string|null length <= 200 -");
    }

    #[test]
    fn a_schema_without_properties_says_so_and_an_answer_without_workflows_renders_nothing() {
        assert_eq!(params_table(&json!({})), "  (no parameters)\n");
        assert_eq!(workflows(&json!({"unexpected": true})), None);
        assert_eq!(workflows(&json!("text")), None);
    }

    #[test]
    fn the_progress_line_shows_state_percentage_and_message_while_the_job_runs() {
        let job = json!({"status": "running", "progress": {"fraction": 0.1, "message": "loading workflow"}});
        assert_eq!(progress_line(&job), "running 10% loading workflow");
        let job = json!({"status": "running", "progress": {"message": "warming up"}});
        assert_eq!(progress_line(&job), "running warming up");
        let job = json!({"status": "queued", "progress": null});
        assert_eq!(progress_line(&job), "queued");
    }

    #[test]
    fn an_ended_job_shows_its_state_without_its_last_progress() {
        let job = json!({"status": "succeeded", "progress": {"fraction": 0.5, "message": "running the workflow"}});
        assert_eq!(progress_line(&job), "succeeded");
    }

    #[test]
    fn a_fraction_out_of_range_is_clamped() {
        assert_eq!(percent(&json!({"progress": {"fraction": 1.7}})), Some(100));
        assert_eq!(percent(&json!({"progress": {"fraction": -1}})), Some(0));
        assert_eq!(percent(&json!({"progress": {"fraction": "half"}})), None);
    }

    #[test]
    fn a_jobs_details_name_its_error_and_outputs() {
        let job = json!({
            "job_id": "j1", "status": "failed", "workflow": "restore", "workflow_version": "1",
            "params": {"megapixels": 0.25}, "created_at": "2026-01-01T00:00:00Z",
            "gpu_seconds": 1.5, "cost_usd": 0.000465,
            "error": {"code": "worker_failed", "message": "CUDA out of memory", "retryable": true},
            "outputs": []
        });
        let out = job_details(&job);
        assert!(out.contains("status    failed\n"), "{out}");
        assert!(out.contains("params    megapixels=0.25\n"), "{out}");
        assert!(out.contains("gpu       1.500 s\n"), "{out}");
        assert!(out.contains("cost      $0.000465\n"), "{out}");
        assert!(
            out.contains("error     worker_failed: CUDA out of memory\n"),
            "{out}"
        );
    }

    #[test]
    fn details_of_an_unexpected_body_render_without_panicking() {
        for body in [json!(null), json!([1, 2]), json!({"status": 7}), json!("x")] {
            let _ = job_details(&body);
            let _ = progress_line(&body);
            let _ = usage_table(&body);
            let _ = jobs_table(&[body]);
        }
    }

    #[test]
    fn usage_has_a_line_per_day_and_a_total() {
        let totals = json!({"jobs": 2, "succeeded": 1, "failed": 1, "cancelled": 0, "timed_out": 0,
                            "gpu_seconds": 3.25, "cost_usd": 0.001});
        let mut day = totals.clone();
        day["day"] = json!("2026-01-01");
        let out = usage_table(&json!({"days": [day], "total": totals})).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("DAY"));
        assert_eq!(
            lines[1].split_whitespace().collect::<Vec<_>>(),
            ["2026-01-01", "2", "1", "1", "0", "0", "3.250", "0.001000"]
        );
        assert!(lines[2].starts_with("total"));
    }
}
